"""Scaled dot-product attention with per-row positions, on the GPU or the CPU.

Row b's queries sit at absolute positions start[b] .. start[b] + q_len - 1 and its keys at
0 .. kv_len - 1. Query j of row b sees key t iff t <= start[b] + j (causal; this also hides
whatever lies past the row's length: padding, rejected draft tokens) and, with a sliding
window W, t > start[b] + j - W (Mistral's rule, as transformers applies it).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

# On an H200 with torch 2.11, SDPA picked cuDNN for these masked calls, and cuDNN spent 5.8 ms
# of host time per call (apparently planning anew for each key length, which grows every step)
# while its kernel ran 37 us: 38% of a specrun's host time (docs/validation.md, section 6).
# Runs therefore hold cuda_sdpa_kernels(): the memory-efficient kernel takes a boolean mask and
# builds no per-shape plan.


def visible(start: torch.Tensor, q_len: int, kv_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean mask [B, 1, q_len, kv_len]: True where query j may attend to key t."""
    q_pos = start.to(device, non_blocking=device.type == "cuda")[:, None] + torch.arange(q_len, device=device)  # [B, q]
    t = torch.arange(kv_len, device=device)
    mask = t <= q_pos[..., None]
    if window is not None:
        mask &= t > q_pos[..., None] - window
    return mask[:, None]


def group_mask(start: torch.Tensor, q_len: int, kv_len: int, window: int | None, groups: int,
               device: torch.device) -> torch.Tensor:
    """The mask `attend` applies, [B, 1, groups * q_len, kv_len]: `visible` repeated for the
    query heads that share a KV head. The same for every layer of a pass, so a pass builds it
    once per row group (runtime.model)."""
    return visible(start, q_len, kv_len, window, device).repeat(1, 1, groups, 1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor,
           window: int | None = None, mask: torch.Tensor | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, q_len, H, D]; k, v [B, kv_len, KV, D] (cache views, any strides); -> [B, q_len, H, D].

    Runs on k's device in k's dtype. Grouped-query attention without copying the cache:
    the H / KV query heads that share a KV head are folded into the query axis
    ([B, KV, G * q_len, D]), so SDPA sees one KV head per group and any backend applies.
    `mask` is group_mask's for these shapes, when the caller built it already. `sinks` [H]:
    a logit per head that joins each softmax and takes its share of the weight to no value
    (gpt-oss); computed out in full, as transformers' eager attention does.
    """
    B, q_len, H, D = q.shape
    kv_heads = k.shape[2]
    g = H // kv_heads
    q = q.to(k.device, k.dtype).transpose(1, 2).reshape(B, kv_heads, g * q_len, D)
    if mask is None:
        mask = group_mask(start, q_len, k.shape[1], window, g, k.device)
    if sinks is not None:
        out = _attend_with_sinks(q, k.transpose(1, 2), v.transpose(1, 2), mask, sinks, g, q_len)
    else:
        out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.reshape(B, H, q_len, D).transpose(1, 2)


def _attend_with_sinks(q, k, v, mask, sinks, groups: int, q_len: int) -> torch.Tensor:
    """q [B, KV, G * q_len, D] against k, v [B, KV, kv_len, D]: softmax over the scores and
    each head's sink logit, the sink's share dropped."""
    scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    B, kv_heads, rows, _ = scores.shape
    sink = sinks.to(scores.dtype).view(kv_heads, groups, 1, 1).expand(kv_heads, groups, q_len, 1).reshape(1, kv_heads, rows, 1)
    logits = torch.cat([scores, sink.expand(B, -1, -1, -1)], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = F.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)


@contextmanager
def cuda_sdpa_kernels():
    """Keep CUDA SDPA off cuDNN while inside (flash takes no mask, so the memory-efficient
    kernel is what remains). The switch is process-wide, so this goes around a whole run (an
    Engine's life, a profile), not around each call: the draft thread attends while the
    target's does. (The flash switch is left alone: it governs the CPU's kernel too.)"""
    was = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)
