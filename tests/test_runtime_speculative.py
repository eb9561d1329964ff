"""Verification rules. Greedy on hand-made logits; sampling by a chi-square test that the
emitted tokens follow the target's p at every position, which must pass for the real
verifier and fail for two plausible bugs (always accepting; resampling from p instead of
the residual max(0, p - q))."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare

from specplan.runtime.speculative import leading_true, sample, verify_greedy, verify_sampling

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


def emitted_by(verifier, seed: int = 1) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run `verifier` on N rows; the i-th emitted token of every row that emitted at least i + 1."""
    p, q = fixed_distributions()
    gen = torch.Generator().manual_seed(seed)
    P, Q = p.expand(N, -1, -1), q.expand(N, -1, -1)
    draft = sample(Q, gen)
    n, nxt = verifier(draft, Q, P, gen)
    tokens = torch.cat([draft, torch.zeros(N, 1, dtype=torch.long)], 1)
    tokens[torch.arange(N), n] = nxt
    return [tokens[n >= i, i] for i in range(GAMMA + 1)], n


def p_value(tokens: torch.Tensor, dist: torch.Tensor) -> float:
    observed = torch.bincount(tokens, minlength=V).double()
    expected = dist.double() / dist.double().sum() * len(tokens)
    return chisquare(observed.numpy(), expected.numpy()).pvalue


def always_accept(draft, q, p, gen):
    n = torch.full((draft.shape[0],), draft.shape[1])
    return n, sample(p[:, -1], gen)


def residual_from_p(draft, q, p, gen):
    px = p[:, :-1].gather(-1, draft[..., None]).squeeze(-1)
    qx = q.gather(-1, draft[..., None]).squeeze(-1)
    n = leading_true(torch.rand(draft.shape, generator=gen) * qx < px)
    return n, sample(p[torch.arange(len(n)), n], gen)


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
    gen = torch.Generator().manual_seed(0)
    draft = sample(P[:, :GAMMA], gen)
    n, nxt = verify_sampling(draft, P[:, :GAMMA], P, gen)
    assert n.tolist() == [GAMMA] * 8  # p(x) / q(x) = 1: everything accepted
    assert ((nxt >= 0) & (nxt < V)).all()


def test_top_k_and_top_p_keep_the_most_likely_tokens():
    from specplan.runtime.speculative import probs

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

    from specplan.runtime.speculative import probs

    v, n_rows = 12, 30_000
    g = torch.Generator().manual_seed(3)
    base = 2.0 * torch.randn(GAMMA + 1, v, generator=g)
    lt, ld = base + 0.7 * torch.randn(GAMMA + 1, v, generator=g), base[:GAMMA] + 0.7 * torch.randn(GAMMA, v, generator=g)
    p, q = probs(lt, 0.8, top_p=0.9), probs(ld, 0.8, top_p=0.9)
    assert (p == 0).any(), "top-p should drop tokens here"

    def emitted(p_verify, seed):
        gen = torch.Generator().manual_seed(seed)
        Q, P = q.expand(n_rows, -1, -1), p_verify.expand(n_rows, -1, -1)
        draft = sample(Q, gen)
        n, nxt = verify_sampling(draft, Q, P, gen)
        tokens = torch.cat([draft, torch.zeros(n_rows, 1, dtype=torch.long)], 1)
        tokens[torch.arange(n_rows), n] = nxt
        return [tokens[n >= i, i] for i in range(GAMMA + 1)]

    def worst_p_value(by_position, seed):
        gen = torch.Generator().manual_seed(seed)
        worst = 1.0
        for i, tokens in enumerate(by_position):
            reference = sample(p[i].expand(len(tokens), -1), gen)  # target-only sampling, same count
            table = torch.stack([torch.bincount(tokens, minlength=v), torch.bincount(reference, minlength=v)])
            table = table[:, table.sum(0) > 0]
            worst = min(worst, chi2_contingency(table.numpy())[1])
        return worst

    good = emitted(p, seed=11)
    assert all(len(t) > 1000 for t in good)
    assert worst_p_value(good, seed=12) > 1e-3
    assert all((p[i][t] > 0).all() for i, t in enumerate(good))  # nothing top-p dropped is ever emitted
    broken = emitted(probs(lt, 0.8), seed=11)  # verifier against the unfiltered target
    assert worst_p_value(broken, seed=12) < 1e-6
