"""Preallocated KV cache with per-row lengths.

Layout [layers, rows, max_len, kv_heads, head_dim]. Row r holds valid keys and values at
positions [0, lengths[r]). A pass writes its q_len new tokens at positions lengths[r] ..
lengths[r] + q_len - 1; the caller then sets lengths[r] to however many it keeps. Rejected
draft positions are never shifted or cleared: they lie past lengths[r], the attention mask
hides them, and the next pass overwrites them. Lengths live on the CPU: the scheduler reads
them every round and the mask is rebuilt from them on the attention device.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, layers: int, rows: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, pin: bool = False):
        shape = (layers, rows, max_len, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin)
        self.v = torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin)
        self.lengths = torch.zeros(rows, dtype=torch.long)
        self.max_len = max_len

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def write(self, layer: int, rows: slice, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [B, q_len, kv_heads, head_dim] at each row's next q_len positions."""
        start = self.lengths[rows]
        q_len = k.shape[1]
        end = int(start.max()) + q_len
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: a row needs position {end - 1}, cache holds {self.max_len}")
        pos = (start[:, None] + torch.arange(q_len)).to(self.device)
        b = torch.arange(k.shape[0], device=self.device)[:, None]
        # Asynchronous only towards the GPU: a non-blocking copy to the CPU may return before
        # the data has landed, and the CPU reads it at once.
        async_ok = self.device.type == "cuda"
        self.k[layer, rows][b, pos] = k.to(self.device, non_blocking=async_ok)
        self.v[layer, rows][b, pos] = v.to(self.device, non_blocking=async_ok)

    def view(self, layer: int, rows: slice, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, length, kv_heads, head_dim] of positions [0, length), no copy."""
        return self.k[layer, rows, :length], self.v[layer, rows, :length]

    def copy_rows_(self, src: "KVCache", src_rows: slice, dst_rows: slice) -> None:
        """Swap rows between caches (the draft's CPU-resident KV and its GPU buffer)."""
        n = int(src.lengths[src_rows].max())
        self.k[:, dst_rows, :n].copy_(src.k[:, src_rows, :n], non_blocking=True)
        self.v[:, dst_rows, :n].copy_(src.v[:, src_rows, :n], non_blocking=True)
        self.lengths[dst_rows] = src.lengths[src_rows]
