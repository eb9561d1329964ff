"""Speculative verification: how many drafted tokens each row keeps, and the token after them.

Both verifiers take the drafted tokens x [B, gamma] and the target's distributions at the
gamma + 1 positions [B, gamma + 1, V] (position i predicts the token after x_1..x_i), and
return per row n, the number of drafted tokens accepted, and the next token: the target's
correction at the first rejected position, or the bonus token after gamma acceptances.

Greedy: accept x_i while it is the target's argmax; the output is exactly target-only
greedy decoding. Sampling (Leviathan et al. 2023; Chen et al. 2023): accept x_i with
probability min(1, p(x_i) / q(x_i)); at the first rejection sample from
norm(max(0, p - q)); after gamma acceptances sample the bonus from p. Every emitted token
is then distributed exactly as the target's p, whatever the draft's q. A greedy row has
one-hot p and q (sampling.probs), and the same rule is then greedy verification.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .sampling import draw


def leading_true(mask: torch.Tensor) -> torch.Tensor:
    """Per row, how many leading entries of mask [B, gamma] are True."""
    return mask.int().cumprod(dim=1).sum(dim=1)


def verify_greedy(draft: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    choice = target_logits.argmax(dim=-1)  # [B, gamma + 1]
    n = leading_true(choice[:, :-1] == draft)
    return n, choice.gather(1, n[:, None]).squeeze(1)


def verify_sampling(draft: torch.Tensor, q: torch.Tensor, p: torch.Tensor, u_accept: torch.Tensor,
                    u_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """draft [B, gamma] drawn from q [B, gamma, V]; p [B, gamma + 1, V] the target's
    probabilities; u_accept [B, gamma] the accept tests' uniforms and u_token [B, gamma + 1]
    the uniform for the token emitted at each position (sampling.uniform)."""
    B, gamma = draft.shape
    px = p[:, :gamma].gather(-1, draft[..., None]).squeeze(-1)
    qx = q.gather(-1, draft[..., None]).squeeze(-1)  # > 0: x was drawn from q
    n = leading_true(u_accept.to(p.device) * qx < px)  # u < p/q, without dividing
    rows = torch.arange(B, device=p.device)
    # q is padded with a zero distribution at position gamma, so the "residual" there is p
    # itself: the bonus token comes out of the same line as the corrections.
    q_n = F.pad(q, (0, 0, 0, 1))[rows, n]
    p_n = p[rows, n]
    residual = (p_n - q_n).clamp_min(0)
    # p == q up to rounding leaves nothing to resample from; then p is the right distribution.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)
    return n, draw(residual, u_token.to(p.device).gather(1, n[:, None]).squeeze(1))
