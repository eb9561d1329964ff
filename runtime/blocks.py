"""GGML's block formats, dequantized with torch on the device.

A GGUF file keeps a quantized matrix as rows of blocks; a block holds a fixed number of
consecutive weights of one row with its own scale (and minimum). specplan keeps the blocks as
the file has them (host memory holds the file's bytes, a streamed unit carries them, no second
rounding) and turns them into float32 here, just before the matmul, like its own formats
(runtime/quant.py). The layouts (ggml's, as its `block_*` structs declare them; all
little-endian, `half` a float16):

  q8_0   32 weights, 34 bytes:  half d; int8 q[32]                         w = d * q
  q4_0   32, 18:   half d; q[16] (weight j in the low nibble of byte j,
                   weight j+16 in its high nibble)                         w = d * (q - 8)
  q4_1   32, 20:   half d, m; q[16] as q4_0                                w = d * q + m
  q5_0   32, 22:   half d; uint32 qh (bit j: weight j's fifth bit); q[16]  w = d * (q - 16)
  q5_1   32, 24:   half d, m; qh; q[16]                                     w = d * q + m
  q4_k   256, 144: half d, dmin; 12 bytes of eight 6-bit scales and mins;
                   q[128]: four runs of 32 bytes, each two sub-blocks of 32
                   (low nibbles, then high)                                w = (d * sc) * q - dmin * mn
  q5_k   256, 176: as q4_k, plus qh[32] (bit 2i / 2i + 1 of byte l: the
                   fifth bit of weight l of sub-block 2i / 2i + 1)
  q6_k   256, 210: ql[128], qh[64] (two high bits a weight), int8 sc[16],
                   half d; sixteen sub-blocks of 16                        w = (d * sc) * (q - 32)

Every product is float32, in the order written above (the order the `gguf` package's own
dequantization uses, which the tests compare against bit for bit).
"""

from __future__ import annotations

import torch

from specplan.formats import GGML_BLOCKS as BLOCKS  # format -> (weights a block, bytes a block)


def _half(b: torch.Tensor) -> torch.Tensor:
    """Two bytes a value -> float32 [n, k / 2]."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 32] codes: the low nibbles (weights 0..15), then the high ones."""
    return torch.cat((q & 0xF, q >> 4), dim=1)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes of a little-endian uint32 -> [n, 32] of 0 / 16 (bit j -> weight j)."""
    bits = torch.arange(8, device=qh.device, dtype=torch.uint8)
    return (((qh[:, :, None] >> bits) & 1).reshape(-1, 32) << 4)


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes -> eight 6-bit scales and eight 6-bit mins ([n, 8] each): the first four in
    the low six bits of bytes 0..3 (scales) and 4..7 (mins); the last four from the nibbles of
    bytes 8..11 with their top two bits in the high bits of bytes 0..3 and 4..7."""
    lo_sc, lo_mn = s[:, 0:4] & 63, s[:, 4:8] & 63
    hi_sc = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    hi_mn = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return torch.cat((lo_sc, hi_sc), dim=1).float(), torch.cat((lo_mn, hi_mn), dim=1).float()


def _k_codes(q: torch.Tensor) -> torch.Tensor:
    """[n, 128] bytes -> [n, 8, 32] 4-bit codes: run r's low nibbles are sub-block 2r, its
    high nibbles sub-block 2r + 1."""
    runs = q.reshape(-1, 4, 1, 32)
    return torch.cat((runs & 0xF, runs >> 4), dim=2).reshape(-1, 8, 32)


def dequantize_blocks(name: str, raw: torch.Tensor) -> torch.Tensor:
    """Blocks of format `name` (uint8 [..., n_blocks * block bytes]) -> float32 [n_blocks * elems]."""
    elems, nbytes = BLOCKS[name]
    b = raw.reshape(-1, nbytes)
    if name == "q8_0":
        return (_half(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()).reshape(-1)
    if name in ("q4_0", "q4_1"):
        d = _half(b[:, :2])
        q = _nibbles(b[:, 2:] if name == "q4_0" else b[:, 4:]).float()
        if name == "q4_0":
            return (d * (q - 8)).reshape(-1)
        return (d * q + _half(b[:, 2:4])).reshape(-1)
    if name in ("q5_0", "q5_1"):
        d = _half(b[:, :2])
        off = 2 if name == "q5_0" else 4
        q = (_nibbles(b[:, off + 4:]) | _fifth_bits(b[:, off:off + 4])).float()
        if name == "q5_0":
            return (d * (q - 16)).reshape(-1)
        return (d * q + _half(b[:, 2:4])).reshape(-1)
    if name in ("q4_k", "q5_k"):
        d, dmin = _half(b[:, 0:2]), _half(b[:, 2:4])
        sc, mn = _scale_min_k4(b[:, 4:16])
        if name == "q4_k":
            q = _k_codes(b[:, 16:144])
        else:
            qh = b[:, 16:48]  # bit s of byte l: the fifth bit of weight l of sub-block s
            bits = torch.arange(8, device=b.device, dtype=torch.uint8)
            high = ((qh[:, None, :] >> bits[None, :, None]) & 1) << 4  # [n, 8, 32]
            q = _k_codes(b[:, 48:176]) | high
        scale = (d * sc)[:, :, None]
        minimum = (dmin * mn)[:, :, None]
        return (scale * q.float() - minimum).reshape(-1)
    if name == "q6_k":
        ql, qh = b[:, 0:128], b[:, 128:192]
        sc = b[:, 192:208].contiguous().view(torch.int8).float()
        d = _half(b[:, 208:210])
        halves = []
        for h in range(2):  # each half: 128 weights from ql[64 h : 64 h + 64] and qh[32 h : 32 h + 32]
            lo, hb = ql[:, 64 * h:64 * h + 64], qh[:, 32 * h:32 * h + 32]
            parts = [(lo[:, :32] & 0xF) | ((hb & 3) << 4), (lo[:, 32:] & 0xF) | (((hb >> 2) & 3) << 4),
                     (lo[:, :32] >> 4) | (((hb >> 4) & 3) << 4), (lo[:, 32:] >> 4) | (((hb >> 6) & 3) << 4)]
            halves.append(torch.stack(parts, dim=1).reshape(-1, 8, 16))  # 8 sub-blocks of 16
        q = torch.cat(halves, dim=1).float() - 32  # [n, 16, 16]
        return ((d * sc)[:, :, None] * q).reshape(-1)
    raise ValueError(f"no block format {name!r}")


def random_blocks(name: str, rows: int, cols: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Valid random blocks of a [rows, cols] matrix (codes uniform, scales small and finite):
    what the profiler times and the tests feed the reference."""
    elems, nbytes = BLOCKS[name]
    n = rows * cols // elems
    raw = torch.randint(0, 256, (n, nbytes), dtype=torch.uint8, generator=generator)
    halves = {"q8_0": [0], "q4_0": [0], "q4_1": [0, 2], "q5_0": [0], "q5_1": [0, 2], "q4_k": [0, 2], "q5_k": [0, 2],
              "q6_k": [208]}[name]
    for at in halves:
        v = (torch.rand(n, generator=generator) * 0.01 + 1e-4).half()
        if name in ("q4_1", "q5_1") and at == 2:
            v = -v  # the minimum is negative, as a real one usually is
        raw[:, at:at + 2] = v.view(torch.uint8).view(n, 2)
    return raw.view(rows, cols // elems * nbytes)
