"""FP8 checkpoints: e4m3 weights with float scales, read as fp8s or fp8b128 (the codes and the
scales as the file has them, scales widened to float32, which is exact).

  compressed-tensors ("float-quantized"): X.weight float8_e4m3fn [N, K] and X.weight_scale, one
      for the tensor ([] or [1]), one a row ([N, 1]: strategy "channel") or one per 128 x 128
      block ([N / 128, K / 128]: strategy "block"); W = q * s.
  "fp8" (DeepSeek-style, transformers' fine-grained FP8): X.weight and X.weight_scale_inv
      [ceil(N / 128), ceil(K / 128)], which despite its name multiplies: W = q * s.
A per-tensor scale is one a row, repeated; a block's scale is repeated on each of its rows
(exact; rows stay independent, so q|k|v fuse as any other format's). Activation scales (input_scale) are not used:
specplan multiplies in the compute dtype after dequantizing the weights.
"""

from __future__ import annotations

import torch

from specplan.errors import InputError
from specplan.formats import FP8_BLOCK, WeightFormat, WeightFormats

from ..quant import QWeight


def formats(q: dict, source: str) -> WeightFormats:
    def refuse(field: str, got, expected: str):
        raise InputError(source, f"quantization_config.{field}", f"{got!r} is not supported", expected)

    method = str(q.get("quant_method")).lower()
    if method == "fp8":
        block = q.get("weight_block_size", [FP8_BLOCK, FP8_BLOCK])  # transformers' default; null: per tensor
        if block not in (None, [FP8_BLOCK, FP8_BLOCK]):
            refuse("weight_block_size", block, f"[{FP8_BLOCK}, {FP8_BLOCK}] or none (per tensor)")
        if str(q.get("fmt", "e4m3")).lower() != "e4m3":
            refuse("fmt", q.get("fmt"), "e4m3")
        fmt = WeightFormat("fp8b128" if block else "fp8s")
        return WeightFormats(attention=fmt, experts=fmt)
    groups = q.get("config_groups") or {}
    if not isinstance(groups, dict) or len(groups) != 1:
        refuse("config_groups", f"{len(groups) if isinstance(groups, dict) else groups} groups", "one group")
    name, group = next(iter(groups.items()))
    w = (group or {}).get("weights") or {}
    if w.get("type") != "float" or int(w.get("num_bits", 0)) != 8:
        refuse(f"config_groups.{name}.weights", f"{w.get('num_bits')}-bit {w.get('type')}", "8-bit float (fp8 e4m3)")
    strategy = str(w.get("strategy", "tensor")).lower()
    if strategy == "block":
        if list(w.get("block_structure") or []) != [FP8_BLOCK, FP8_BLOCK]:
            refuse(f"config_groups.{name}.weights.block_structure", w.get("block_structure"), f"[{FP8_BLOCK}, {FP8_BLOCK}]")
        fmt = WeightFormat("fp8b128")
    elif strategy in ("tensor", "channel"):
        fmt = WeightFormat("fp8s")
    else:
        refuse(f"config_groups.{name}.weights.strategy", strategy, "tensor | channel | block")
    return WeightFormats(attention=fmt, experts=fmt)


def stores(files, stem: str) -> bool:
    return f"{stem}.weight_scale" in files or f"{stem}.weight_scale_inv" in files


def read(files, stem: str, rows: int, cols: int, fmt: WeightFormat, q: dict) -> QWeight:
    codes = files[f"{stem}.weight"]
    name = f"{stem}.weight_scale" if f"{stem}.weight_scale" in files else f"{stem}.weight_scale_inv"
    scale = files[name].float()
    blocks = (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
    if tuple(codes.shape) != (rows, cols) or codes.dtype != torch.float8_e4m3fn:
        raise InputError(str(files.path), f"{stem}.weight", f"is {codes.dtype} {tuple(codes.shape)}",
                         f"float8_e4m3fn [{rows}, {cols}]")
    if fmt.name == "fp8b128":
        if tuple(scale.shape) != blocks:
            raise InputError(str(files.path), name, f"has shape {tuple(scale.shape)}", f"{list(blocks)} (128 x 128 blocks)")
        scale = scale.repeat_interleave(FP8_BLOCK, dim=0)[:rows].contiguous()  # each row its blocks' scales
    elif scale.numel() == 1:
        scale = scale.reshape(1).expand(rows).contiguous()
    elif scale.numel() == rows:
        scale = scale.reshape(rows).contiguous()
    else:
        raise InputError(str(files.path), name, f"has shape {tuple(scale.shape)}", f"one scale, or [{rows}, 1]")
    return QWeight(fmt, (rows, cols), codes, scale=scale)
