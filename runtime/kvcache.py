"""Preallocated KV cache with per-row lengths.

Indexed [layers, rows, max_len, kv_heads, head_dim] (`k`, `v`). Row r holds valid keys and
values at positions [0, lengths[r]). A pass writes its q_len new tokens at positions
lengths[r] .. lengths[r] + q_len - 1; the caller then sets lengths[r] to however many it
keeps. Rejected draft positions are never shifted or cleared: they lie past lengths[r], the
attention mask hides them, and the next pass overwrites them. Lengths live on the CPU: the
scheduler reads them every round and the mask is rebuilt from them on the attention device.

Two memory layouts behind the same indexing:
    layer-major (default)  k, v: two tensors [layers, rows, max_len, kv_heads, head_dim];
    row-major              one tensor `kv` [rows, max_len, 2, layers, kv_heads, head_dim], with
                           k and v strided views of it. A row's positions [a, b) over all
                           layers, keys and values, are one contiguous block, so the draft's
                           KV swaps (`copy_positions_`) move exactly the positions they need
                           with one copy per row, no temporary on either side.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, layers: int, rows: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, pin: bool = False, row_major: bool = False):
        self.kv: torch.Tensor | None = None
        if row_major:
            self.kv = torch.zeros((rows, max_len, 2, layers, kv_heads, head_dim), dtype=dtype, device=device,
                                  pin_memory=pin)
            self.k = self.kv[:, :, 0].permute(2, 0, 1, 3, 4)
            self.v = self.kv[:, :, 1].permute(2, 0, 1, 3, 4)
        else:
            shape = (layers, rows, max_len, kv_heads, head_dim)
            self.k = torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin)
            self.v = torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin)
        self.lengths = torch.zeros(rows, dtype=torch.long)
        self.max_len = max_len

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def bytes_per_position(self) -> int:
        """Bytes of one row's keys and values at one position, all layers."""
        return self.nbytes // (self.rows * self.max_len)

    def write_index(self, rows: slice, q_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where `write` puts q_len new positions of rows: (row index [B, 1], positions [B, q_len])
        on the cache's device. The same at every layer of a pass (lengths change between
        passes), so a pass computes it once per row group and hands it to each write."""
        start = self.lengths[rows]
        end = int(start.max()) + q_len
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: a row needs position {end - 1}, cache holds {self.max_len}")
        pos = (start[:, None] + torch.arange(q_len)).to(self.device, non_blocking=self.device.type == "cuda")
        return torch.arange(len(start), device=self.device)[:, None], pos

    def write(self, layer: int, rows: slice, k: torch.Tensor, v: torch.Tensor,
              index: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Store k, v [B, q_len, kv_heads, head_dim] at each row's next q_len positions
        (`index`: write_index's, when the caller has it)."""
        b, pos = index if index is not None else self.write_index(rows, k.shape[1])
        # Asynchronous only towards the GPU: a non-blocking copy to the CPU may return before
        # the data has landed, and the CPU reads it at once.
        async_ok = self.device.type == "cuda"
        self.k[layer, rows][b, pos] = k.to(self.device, non_blocking=async_ok)
        self.v[layer, rows][b, pos] = v.to(self.device, non_blocking=async_ok)

    def view(self, layer: int, rows: slice, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, length, kv_heads, head_dim] of positions [0, length), no copy."""
        return self.k[layer, rows, :length], self.v[layer, rows, :length]

    def copy_row_(self, src: int, dst: int, end: int | None = None) -> None:
        """Row dst becomes a copy of row src's positions [0, end) (all of them if None), every
        layer, and takes its length."""
        n = self.max_len if end is None else max(0, min(int(end), self.max_len))
        if self.kv is not None:
            self.kv[dst, :n].copy_(self.kv[src, :n])
        else:
            self.k[:, dst, :n].copy_(self.k[:, src, :n])
            self.v[:, dst, :n].copy_(self.v[:, src, :n])
        self.lengths[dst] = self.lengths[src]

    def copy_positions_(self, src: "KVCache", src_row: int, dst_row: int, start: int, end: int) -> int:
        """Copy positions [start, end) of one row, every layer, keys and values, from `src`
        (both caches row-major): one contiguous block, asynchronous between pinned host memory
        and the GPU (on the current stream). Returns the bytes copied."""
        if end <= start:
            return 0
        dst = self.kv[dst_row, start:end]
        dst.copy_(src.kv[src_row, start:end], non_blocking=True)
        return dst.nbytes
