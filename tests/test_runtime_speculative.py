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
