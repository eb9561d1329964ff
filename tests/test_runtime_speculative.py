"""Verification rules. Greedy on hand-made logits; sampling by a chi-square test that the
emitted tokens follow the target's p at every position, which must pass for the real
verifier and fail for two plausible bugs (always accepting; resampling from p instead of
the residual max(0, p - q))."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare

from specplan.runtime.sampling import ACCEPT, DRAFT, TOKEN, draw, probs, row_key, uniform
from specplan.runtime.speculative import leading_true, verify_greedy, verify_sampling

V, GAMMA, N = 6, 3, 20_000


def test_greedy_accepts_the_matching_prefix_and_returns_the_correction():
    target_choice = torch.tensor([[2, 3, 4, 5], [2, 3, 4, 5], [2, 3, 4, 5]])
    logits = F.one_hot(target_choice, V).float()
    draft = torch.tensor([[2, 3, 4], [2, 0, 4], [1, 3, 4]])
    n, nxt = verify_greedy(draft, logits)
    assert n.tolist() == [3, 1, 0]
    assert nxt.tolist() == [5, 3, 2]  # bonus after all three; else the target's own token


def test_leading_true_stops_at_the_first_rejection():
    mask = torch.tensor([[True, False, True], [True, True, True], [False, True, True]])
    assert leading_true(mask).tolist() == [1, 3, 0]


def fixed_distributions() -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position target p [gamma + 1, V] and draft q [gamma, V]: related (acceptance ~0.7, so
    later positions are reached often) but different enough for the broken verifiers to show."""
    g = torch.Generator().manual_seed(0)
    base = 1.5 * torch.randn(GAMMA + 1, V, generator=g)
    p = F.softmax(base + torch.randn(GAMMA + 1, V, generator=g), -1)
    q = F.softmax(base[:GAMMA] + torch.randn(GAMMA, V, generator=g), -1)
    return p, q


def streams(rows: int, seed: int, gamma: int = GAMMA) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The engine's three draws for one round of `rows` rows keyed by (seed, row index), all
    starting at position 5: the draft's, the accept tests' and the emitted tokens'."""
    keys = torch.tensor([row_key(seed, i) for i in range(rows)])
    at = 5 + torch.arange(gamma + 1).expand(rows, -1)
    return uniform(keys, at[:, :-1], DRAFT), uniform(keys, at[:, :-1], ACCEPT), uniform(keys, at, TOKEN)


def emitted(verifier, p: torch.Tensor, q: torch.Tensor, rows: int, seed: int, p_verify: torch.Tensor | None = None):
    """Run `verifier` on `rows` rows drafting from q, verified against p_verify (default p);
    the i-th emitted token of every row that emitted at least i + 1, and each row's n."""
    ud, ua, ut = streams(rows, seed, q.shape[0])
    P, Q = (p if p_verify is None else p_verify).expand(rows, -1, -1), q.expand(rows, -1, -1)
    draft = draw(Q, ud)
    n, nxt = verifier(draft, Q, P, ua, ut)
    tokens = torch.cat([draft, torch.zeros(rows, 1, dtype=torch.long)], 1)
    tokens[torch.arange(rows), n] = nxt
    return [tokens[n >= i, i] for i in range(q.shape[0] + 1)], n


def emitted_by(verifier, seed: int = 1) -> tuple[list[torch.Tensor], torch.Tensor]:
    p, q = fixed_distributions()
    return emitted(verifier, p, q, N, seed)


def p_value(tokens: torch.Tensor, dist: torch.Tensor) -> float:
    observed = torch.bincount(tokens, minlength=V).double()
    expected = dist.double() / dist.double().sum() * len(tokens)
    return chisquare(observed.numpy(), expected.numpy()).pvalue


def always_accept(draft, q, p, ua, ut):
    n = torch.full((draft.shape[0],), draft.shape[1])
    return n, draw(p[:, -1], ut[:, -1])


def residual_from_p(draft, q, p, ua, ut):
    px = p[:, :-1].gather(-1, draft[..., None]).squeeze(-1)
    qx = q.gather(-1, draft[..., None]).squeeze(-1)
    n = leading_true(ua * qx < px)
    rows = torch.arange(len(n))
    return n, draw(p[rows, n], ut[rows, n])


def test_sampling_verification_preserves_the_target_distribution_at_every_position():
    p, q = fixed_distributions()
    by_position, n = emitted_by(verify_sampling)
    for i, tokens in enumerate(by_position):
        assert len(tokens) > 500
        assert p_value(tokens, p[i]) > 1e-3, f"position {i}"
    # and the first draft token is accepted with probability sum_x min(p(x), q(x))
    alpha = torch.minimum(p[0], q[0]).sum().item()
    assert (n >= 1).double().mean().item() == pytest.approx(alpha, abs=0.015)


@pytest.mark.parametrize("broken", [always_accept, residual_from_p])
def test_chi_square_catches_a_broken_verifier(broken):
    p, _ = fixed_distributions()
    by_position, _ = emitted_by(broken)
    assert min(p_value(tokens, p[i]) for i, tokens in enumerate(by_position)) < 1e-6


def test_residual_falls_back_to_p_when_draft_equals_target():
    p, _ = fixed_distributions()
    P = p[None].expand(8, -1, -1)
    ud, ua, ut = streams(8, 0)
    draft = draw(P[:, :GAMMA], ud)
    n, nxt = verify_sampling(draft, P[:, :GAMMA], P, ua, ut)
    assert n.tolist() == [GAMMA] * 8  # p(x) / q(x) = 1: everything accepted
    assert ((nxt >= 0) & (nxt < V)).all()


def test_top_k_and_top_p_keep_the_most_likely_tokens():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    assert probs(logits, 1.0, top_k=1).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    full = probs(logits, 1.0)
    kept = probs(logits, 1.0, top_p=0.8)  # 0.64 + 0.24 reaches 0.8: two tokens
    assert (kept > 0).tolist() == [[True, False, True, False]]
    assert kept[0, 0] / kept[0, 2] == pytest.approx(full[0, 0] / full[0, 2])
    assert (probs(logits, 1.0, top_p=0.01) > 0).sum() == 1  # never empty


def test_speculative_sampling_at_temperature_and_top_p_matches_target_only_sampling():
    """At temperature 0.8, top-p 0.9, the tokens speculative sampling emits follow what
    target-only sampling draws (two-sample chi-square per position), and a verifier that
    checks the drafts against the unfiltered target fails the same test."""
    from scipy.stats import chi2_contingency

    v, n_rows = 12, 30_000
    g = torch.Generator().manual_seed(3)
    base = 2.0 * torch.randn(GAMMA + 1, v, generator=g)
    lt, ld = base + 0.7 * torch.randn(GAMMA + 1, v, generator=g), base[:GAMMA] + 0.7 * torch.randn(GAMMA, v, generator=g)
    p, q = probs(lt, 0.8, top_p=0.9), probs(ld, 0.8, top_p=0.9)
    assert (p == 0).any(), "top-p should drop tokens here"

    def worst_p_value(by_position, seed):
        worst = 1.0
        for i, tokens in enumerate(by_position):
            keys = torch.tensor([row_key(seed, r) for r in range(len(tokens))])
            u = uniform(keys, torch.full((len(tokens),), i), TOKEN)
            reference = draw(p[i].expand(len(tokens), -1), u)  # target-only sampling, same count
            table = torch.stack([torch.bincount(tokens, minlength=v), torch.bincount(reference, minlength=v)])
            table = table[:, table.sum(0) > 0]
            worst = min(worst, chi2_contingency(table.numpy())[1])
        return worst

    good, _ = emitted(verify_sampling, p, q, n_rows, seed=11)
    assert all(len(t) > 1000 for t in good)
    assert worst_p_value(good, seed=12) > 1e-3
    assert all((p[i][t] > 0).all() for i, t in enumerate(good))  # nothing top-p dropped is ever emitted
    broken, _ = emitted(verify_sampling, p, q, n_rows, seed=11, p_verify=probs(lt, 0.8))  # against the unfiltered target
    assert worst_p_value(broken, seed=12) < 1e-6


def test_counter_based_uniforms_are_uniform_and_independent_of_each_other():
    """The draws the engine keys by (row, position, which draw): uniform on [0, 1) (KS test),
    the same for the same key, and neither repeated nor correlated across draws, positions
    and rows."""
    from scipy.stats import kstest, pearsonr

    keys = torch.tensor([row_key(7, i) for i in range(400)])
    at = torch.arange(100).expand(400, -1)
    u = {d: uniform(keys, at, d) for d in (DRAFT, ACCEPT, TOKEN)}
    for d, x in u.items():
        assert 0 <= x.min() and x.max() < 1
        assert kstest(x.flatten().numpy(), "uniform").pvalue > 1e-3, d
    assert torch.equal(uniform(keys, at, TOKEN), u[TOKEN])
    flat = torch.cat([x.flatten() for x in u.values()])
    assert flat.unique().numel() == flat.numel()
    assert abs(pearsonr(u[DRAFT].flatten().numpy(), u[ACCEPT].flatten().numpy())[0]) < 0.02
    assert abs(pearsonr(u[TOKEN][:, :-1].flatten().numpy(), u[TOKEN][:, 1:].flatten().numpy())[0]) < 0.02
    assert abs(pearsonr(u[TOKEN][:-1].flatten().numpy(), u[TOKEN][1:].flatten().numpy())[0]) < 0.02
    assert row_key(7) != row_key(8) and row_key(7, 0) != row_key(7, 1) != row_key(8, 1)


def test_draw_follows_p_and_never_picks_a_zero_probability_token():
    from scipy.stats import chisquare

    p = torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0])
    keys = torch.tensor([row_key(3, i) for i in range(20_000)])
    tokens = draw(p.expand(len(keys), -1), uniform(keys, torch.zeros(len(keys), dtype=torch.long), TOKEN))
    counts = torch.bincount(tokens, minlength=5)
    assert counts[1] == counts[4] == 0
    assert chisquare(counts[[0, 2, 3]].numpy(), (p[[0, 2, 3]] * len(keys)).numpy()).pvalue > 1e-3
    # u at the very top of [0, 1) still lands on the last token with mass
    assert draw(p[None], torch.tensor([1 - 2 ** -53], dtype=torch.float64)).item() == 3


def test_per_row_parameters_and_greedy_rows_in_a_sampled_batch():
    """Each row keeps its own temperature / top-k / top-p; a temperature-0 row is the one-hot of
    its argmax, so verifying it with the sampling rule is greedy verification."""
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]] * 4)
    p = probs(logits, torch.tensor([0.0, 1.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 0.8, 1.0]),
              torch.tensor([0, 0, 0, 1]))
    assert p[0].tolist() == [1.0, 0.0, 0.0, 0.0]  # greedy
    assert torch.allclose(p[1], torch.softmax(logits[1], -1))  # unfiltered
    assert (p[2] > 0).tolist() == [True, False, True, False]  # top-p 0.8
    assert p[3].tolist() == [1.0, 0.0, 0.0, 0.0]  # top-k 1
    assert torch.allclose(probs(logits[:1], 1.0, top_k=2), probs(logits[:1], 1.0, top_k=torch.tensor([2])))
    # greedy verification through the sampling verifier: target argmax [2, 3, 4, 5] per position
    choice = torch.tensor([[2, 3, 4, 5]] * 3)
    target = probs(F.one_hot(choice, V).float() * 5, 0.0)
    draft = torch.tensor([[2, 3, 4], [2, 0, 4], [1, 3, 4]])
    q = F.one_hot(draft, V).float()
    _, ua, ut = streams(3, 0)
    n, nxt = verify_sampling(draft, q, target, ua, ut)
    assert (n.tolist(), nxt.tolist()) == verify_greedy(draft, F.one_hot(choice, V).float()) == ([3, 1, 0], [5, 3, 2]) \
        or (n.tolist(), nxt.tolist()) == ([3, 1, 0], [5, 3, 2])


def test_rows_whose_keys_share_a_half_draw_unrelated_numbers():
    from scipy.stats import pearsonr

    at = torch.arange(2000)
    for a, b in [((5 << 32) | 1, (5 << 32) | 2), ((5 << 32) | 1, (6 << 32) | 1)]:
        ua, ub = uniform(torch.tensor([a]), at[None], TOKEN)[0], uniform(torch.tensor([b]), at[None], TOKEN)[0]
        assert abs(pearsonr(ua.numpy(), ub.numpy())[0]) < 0.1
        assert ((ua - ub).abs() < 1e-6).sum() == 0


def test_a_row_without_top_p_keeps_its_tail_beside_a_row_with_one():
    """top_p = 1 means no cut, even when another row of the batch filters (a float32 cumsum
    reaches 1 before the tail of a large vocabulary)."""
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(2, 49152, generator=g)
    alone = probs(logits[:1], 1.0)
    beside = probs(logits, 1.0, torch.tensor([1.0, 0.9]), torch.tensor([0, 0]))
    assert torch.equal(beside[0] > 0, alone[0] > 0)
    peaked = -torch.arange(1000.0) / 2
    peaked[0] = 20
    assert (probs(peaked[None], 1.0, 1.0, 50) > 0).sum() == 50  # top-k alone keeps k
