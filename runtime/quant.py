"""Compressed weight matrices: quantize at load, keep the codes, dequantize just before use.

The formats and their byte counts are specplan.formats'. A QWeight holds one [rows, cols]
matrix as codes plus per-row or per-group scales (and zero points): the weight store packs
those pieces into a streamed unit like any other tensors, and hands back a QWeight of views
into the slot. `dense(w)` turns one into the compute dtype in the store's scratch buffer, a
single preallocated buffer reused by every dequantization, so the model's arithmetic after
that point is the uncompressed model's, operation for operation.

Rows are independent in every format (scales never span rows), so fusing q|k|v or gate|up
concatenates codes and scales row-wise and gives the same codes as quantizing each part.

A format marked fused (`int8+fused`, `int4g64+fused`) skips the scratch: `linear` hands the
codes to torch's weight-only kernel, which reads them as they are and dequantizes inside the
matmul (int8: `_weight_int8pack_mm`, the codes and per-row scales unchanged; int4: the
device's packed layout, repacked once at load by `fused_layout`, and the zero point moved to
the kernel's convention, w = (q - 8) * s + (z + 8 s)). Which path a plan takes is the
profile's measurement (the planner prices both); `fused_ok` says where a kernel runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from specplan.formats import DEQUANT_BLOCK_ELEMS, FLOAT_FORMATS, FP8_BLOCK, WeightFormat

FP8_MAX = 448.0  # largest finite float8 e4m3fn
# the sixteen fp4 e2m1 values (sign, two exponent bits, one mantissa bit), by code (OCP MX spec)
FP4_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
_FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PARTS = ("codes", "scale", "zero")


def fp8_dtype() -> torch.dtype | None:
    return getattr(torch, "float8_e4m3fn", None)


@dataclass
class QWeight:
    """One matrix in a compressed (or another float) format. `scratch`: where `dense` writes,
    set by the weight store on the views it hands out; None: a fresh tensor."""

    fmt: WeightFormat
    shape: tuple[int, int]
    codes: torch.Tensor  # int8 [r, c] | uint8 [r, c/2] (int4) | float8 [r, c] | float [r, c]
    scale: torch.Tensor | None = None  # float16 [r] (int8, fp8) or [r, c/g] (int4, int4zp); float32 [r] (fp8s)
    #                                    or [r, ceil(c/128)] (fp8b128)
    zero: torch.Tensor | None = None  # float16 [r, c/g] (int4), uint8 [r, c/g] (int4zp)
    # (mxfp4: scale is uint8 e8m0 [r, c/32], no zero)
    scratch: torch.Tensor | None = None  # flat, of the compute dtype
    block: torch.Tensor | None = None  # flat float32, for a 16-bit scratch (DEQUANT_BLOCK_ELEMS)

    def parts(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in PARTS if getattr(self, k) is not None}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.parts().values())

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None,
                   block: torch.Tensor | None = None) -> torch.Tensor:
        """The matrix in `dtype`: (q * s + z) in float32, each operation rounded once, then cast.
        Into `out`: in place when it is float32, else through the float32 `block` buffer a
        band of rows at a time (no temporary the size of the matrix)."""
        if self.fmt.name in FLOAT_FORMATS:  # a cast
            return self.codes.to(dtype) if out is None else out.copy_(self.codes)
        if out is None:
            out = torch.empty(self.shape, dtype=dtype, device=self.codes.device)
        if out.dtype == torch.float32 and self.fmt.block is None:
            return self._dequantize_into(out)
        # a 16-bit out, or GGUF blocks (whose unpacking makes temporaries the size of what it
        # unpacks): a band of rows at a time
        return self._dequantize_banded(out, block)

    def _dequantize_into(self, out: torch.Tensor) -> torch.Tensor:
        """The arithmetic, written straight into a float32 `out` (the codes are converted into
        it, then scaled in place): no temporary the size of the matrix."""
        r, c = self.shape
        if self.fmt.block is not None:  # a GGUF block format (runtime/blocks.py)
            from .blocks import dequantize_blocks

            return out.view(-1).copy_(dequantize_blocks(self.fmt.name, self.codes)).view(r, c)
        if self.fmt.name == "fp8b128":  # a float32 scale a row per 128 columns
            out.copy_(self.codes)
            for j in range(self.scale.shape[1]):
                out[:, j * FP8_BLOCK:(j + 1) * FP8_BLOCK].mul_(self.scale[:, j:j + 1].float())
            return out
        if self.fmt.group_size is None:  # int8, fp8, fp8s: one scale a row
            return out.copy_(self.codes).mul_(self.scale.float()[:, None])
        g = self.fmt.group_size
        pairs = out.view(r, c // 2, 2)
        if self.fmt.name == "mxfp4":  # e2m1 codes through their table, times 2^(e - 127)
            table = FP4_E2M1.to(out.device)
            pairs[:, :, 0].copy_(table[(self.codes & 0xF).long()])
            pairs[:, :, 1].copy_(table[(self.codes >> 4).long()])
            return out.view(r, c // g, g).mul_(torch.exp2(self.scale.float() - 127.0)[:, :, None]).view(r, c)
        pairs[:, :, 0].copy_(self.codes & 0xF)
        pairs[:, :, 1].copy_(self.codes >> 4)
        grouped = out.view(r, c // g, g)
        if self.fmt.name.startswith("int4zp"):  # AWQ / GPTQ: an integer zero point, w = (q - z) * s
            return grouped.sub_(self.zero.float()[:, :, None]).mul_(self.scale.float()[:, :, None]).view(r, c)
        return grouped.mul_(self.scale.float()[:, :, None]).add_(self.zero.float()[:, :, None]).view(r, c)

    def _dequantize_banded(self, out: torch.Tensor, block: torch.Tensor | None) -> torch.Tensor:
        r, c = self.shape
        if block is None:
            block = torch.empty(min(r * c, DEQUANT_BLOCK_ELEMS), dtype=torch.float32, device=out.device)
        band = max(1, block.numel() // c)
        for a in range(0, r, band):
            b = min(r, a + band)
            rows = replace(self, shape=(b - a, c), **{k: t[a:b] for k, t in self.parts().items()})
            out[a:b].copy_(rows._dequantize_into(block[:(b - a) * c].view(b - a, c)))
        return out

    def to(self, device: torch.device) -> "QWeight":
        return replace(self, **{k: t.to(device, copy=True) for k, t in self.parts().items()})

    def rows(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `index` dequantized (an embedding lookup), without dequantizing the rest."""
        sub = replace(self, shape=(int(index.numel()), self.shape[1]),
                      **{k: t[index.reshape(-1)] for k, t in self.parts().items()})
        return sub.dequantize(dtype).view(*index.shape, self.shape[1])


def dense(w: torch.Tensor | QWeight) -> torch.Tensor:
    """A weight ready for a matmul: a tensor as it is, a QWeight dequantized into its scratch
    (valid until the next dense() of the same store)."""
    if isinstance(w, torch.Tensor):
        return w
    if w.fmt.fused:
        raise RuntimeError(f"a {w.fmt.label} weight goes through linear(), not dense()")
    if w.scratch is None:
        raise RuntimeError("a compressed weight without a scratch buffer")  # the store always sets one
    n = w.shape[0] * w.shape[1]
    return w.dequantize(w.scratch.dtype, w.scratch[:n].view(w.shape), w.block)


def linear(x: torch.Tensor, w: torch.Tensor | QWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ bias): a fused format through its kernel, any other through dense()."""
    if not (isinstance(w, QWeight) and w.fmt.fused):
        return F.linear(x, dense(w), bias)
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    if w.fmt.name == "int8":
        y = torch._weight_int8pack_mm(flat, w.codes, w.scale.to(x.dtype))
    else:
        y = _int4_mm(flat, w)
    if bias is not None:
        y = y.add_(bias)
    return y.view(*x.shape[:-1], w.shape[0])


def _int4_mm(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    s = w.scale.float()
    zeros = w.zero.float().add_(s, alpha=8.0)  # the kernel's zero point: w = (q - 8) * s + zeros
    scales_and_zeros = torch.stack((s.t(), zeros.t()), dim=-1).to(x.dtype).contiguous()
    if x.device.type == "cpu":
        return torch._weight_int4pack_mm_for_cpu(x, w.codes, w.fmt.group_size, scales_and_zeros)
    return torch._weight_int4pack_mm(x, w.codes, w.fmt.group_size, scales_and_zeros)


INT4_INNER_K_TILES = 2  # the packing parameter torch's int4 kernels take (2, 4 or 8)


def fused_layout(w: QWeight, device: torch.device) -> QWeight:
    """A fused int4 matrix's codes in the packed layout of `device`'s kernel (same bytes);
    any other matrix as it is."""
    if not (w.fmt.fused and w.fmt.group_size is not None):
        return w
    r, c = w.shape
    q = torch.empty(r, c, dtype=torch.int32)
    q[:, 0::2], q[:, 1::2] = w.codes & 0xF, w.codes >> 4
    if device.type == "cpu":
        packed = torch._convert_weight_to_int4pack_for_cpu(q, INT4_INNER_K_TILES)
    else:  # the CUDA kernel takes two codes a byte, the even column in the high nibble
        hi_lo = (q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8).to(device)
        packed = torch._convert_weight_to_int4pack(hi_lo, INT4_INNER_K_TILES).cpu()
    return replace(w, codes=packed)


def fused_ok(fmt: WeightFormat, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if `fmt`'s fused kernel runs on `device` in `dtype` and agrees with the
    dequantized matmul; else why not (the profiler records a fused table only where this
    passes, and specrun refuses a fused plan where it does not)."""
    if not fmt.fused:
        return None
    r, c, t = 64, 4 * (fmt.group_size or 32), 8
    gen = torch.Generator().manual_seed(0)
    w = quantize(torch.randn(r, c, generator=gen), replace(fmt, fused=False))
    x = torch.randn(t, c, generator=gen).to(dtype)
    ref = F.linear(x.float(), w.dequantize(torch.float32)).to(dtype)
    try:
        got = linear(x.to(device), fused_layout(replace(w, fmt=fmt), device).to(device)).cpu()
    except (RuntimeError, NotImplementedError, AttributeError) as e:
        return f"torch has no {fmt.label} kernel for {dtype} on {device.type} ({str(e).splitlines()[0][:80]})"
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    err = float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))
    if not err <= tol:
        return f"the {fmt.label} kernel on {device.type} disagrees with dequantization (relative error {err:.2g})"
    return None


def quantize(w: torch.Tensor, fmt: WeightFormat) -> QWeight:
    """Round-to-nearest quantization of a [rows, cols] matrix (computed in float32)."""
    r, c = w.shape
    x = w.float()
    if fmt.read_only:
        raise ValueError(f"{fmt.name} is read from a checkpoint that has it; specplan does not quantize into it")
    if fmt.name in FLOAT_FORMATS:
        return QWeight(fmt, (r, c), w.to(_FLOAT_DTYPES[fmt.name]).contiguous())
    if fmt.name == "int8":
        scale = (x.abs().amax(dim=1) / 127.0).half()
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        codes = torch.round(x / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        return QWeight(fmt, (r, c), codes, scale=scale)
    if fmt.name == "fp8":
        scale = (x.abs().amax(dim=1) / FP8_MAX).half()
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        codes = (x / scale.float()[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(fp8_dtype())
        return QWeight(fmt, (r, c), codes, scale=scale)
    g = fmt.group_size
    xg = x.view(r, c // g, g)
    lo, hi = xg.amin(dim=2), xg.amax(dim=2)
    scale = ((hi - lo) / 15.0).half()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = lo.half()
    q = torch.round((xg - zero.float()[:, :, None]) / scale.float()[:, :, None]).clamp_(0, 15).to(torch.uint8)
    q = q.view(r, c)
    codes = pack_int4(q)
    return QWeight(fmt, (r, c), codes, scale=scale, zero=zero)


def sample(fmt: WeightFormat, rows: int, cols: int, generator: torch.Generator | None = None) -> QWeight:
    """A random [rows, cols] matrix in `fmt` (what the profiler times): normal weights
    quantized, or valid random blocks of a GGUF format."""
    if fmt.block is not None:
        from .blocks import random_blocks

        return QWeight(fmt, (rows, cols), random_blocks(fmt.name, rows, cols, generator))
    if fmt.name.startswith("int4zp"):
        groups = (rows, cols // fmt.group_size)
        return QWeight(fmt, (rows, cols), torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8, generator=generator),
                       scale=(torch.rand(groups, generator=generator) * 0.01 + 1e-3).half(),
                       zero=torch.randint(0, 16, groups, dtype=torch.uint8, generator=generator))
    if fmt.name == "mxfp4":
        return QWeight(fmt, (rows, cols), torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8, generator=generator),
                       scale=torch.randint(117, 127, (rows, cols // fmt.group_size), dtype=torch.uint8, generator=generator))
    if fmt.name in ("fp8s", "fp8b128"):
        b = FP8_BLOCK
        scale = torch.rand((rows,) if fmt.name == "fp8s" else (rows, -(-cols // b)), generator=generator) * 1e-3
        return QWeight(fmt, (rows, cols), torch.randn(rows, cols, generator=generator).to(fp8_dtype()), scale=scale)
    return quantize(torch.randn(rows, cols, generator=generator), fmt)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, cols] 4-bit codes -> two a byte, the even column in the low nibble."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def cat(ws: list[QWeight]) -> QWeight:
    """Row-wise concatenation (a fused projection): rows keep their own scales."""
    first = ws[0]
    assert all(w.fmt == first.fmt and w.shape[1] == first.shape[1] for w in ws)
    return replace(first, shape=(sum(w.shape[0] for w in ws), first.shape[1]),
                   **{k: torch.cat([getattr(w, k) for w in ws]) for k in first.parts()})


def assemble(fmt: WeightFormat, shape: tuple[int, int], parts: dict[str, torch.Tensor],
             scratch: torch.Tensor | None, block: torch.Tensor | None = None) -> QWeight:
    return QWeight(fmt, shape, parts["codes"], parts.get("scale"), parts.get("zero"), scratch, block)
