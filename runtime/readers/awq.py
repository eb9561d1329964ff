"""AWQ checkpoints (AutoAWQ's GEMM layout), read as int4zpN without a second rounding.

A quantized Linear `X` of in_features K and out_features N is stored as
  X.qweight  int32 [K, N / 8]   eight 4-bit codes an int32 along the output features; the code of
                                output column 8 j + ORDER[i] in bits 4 i .. 4 i + 3 of column j
  X.qzeros   int32 [K / g, N / 8] the groups' integer zero points, packed the same way
  X.scales   float16 [K / g, N]
and means W[n, k] = (q[k, n] - z[k / g, n]) * s[k / g, n]. The codes and zero points are
unpacked once at load into specplan's int4zpN layout (rows = output features, two codes a byte);
the float16 scales are kept as they are.
"""

from __future__ import annotations

import torch

from specplan.errors import InputError
from specplan.formats import WeightFormat, WeightFormats

from ..quant import QWeight, pack_int4

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an int32 holds output column 8 j + ORDER[i]
GROUPS = (32, 64, 128)


def formats(q: dict, source: str) -> WeightFormats:
    def refuse(field: str, got, expected: str):
        raise InputError(source, f"quantization_config.{field}", f"{got!r} is not supported", expected)

    if int(q.get("bits", q.get("w_bit", 4))) != 4:
        refuse("bits", q.get("bits", q.get("w_bit")), "4")
    version = str(q.get("version", "gemm")).lower()
    if version != "gemm":
        refuse("version", version, "gemm (AutoAWQ's GEMM layout)")
    if q.get("desc_act"):
        refuse("desc_act", q.get("desc_act"), "false (AWQ keeps the input order)")
    if not q.get("zero_point", True):
        refuse("zero_point", q.get("zero_point"), "true")
    return layer_formats(int(q.get("group_size", q.get("q_group_size", 128))), refuse)


def layer_formats(g: int, refuse) -> WeightFormats:
    """int4zp`g` on the layers' matrices (the embedding and LM head stay unquantized)."""
    if g not in GROUPS:
        refuse("group_size", g, " | ".join(map(str, GROUPS)))
    fmt = WeightFormat(f"int4zp{g}")
    return WeightFormats(attention=fmt, experts=fmt)


def stores(files, stem: str) -> bool:
    return f"{stem}.qweight" in files


def unpack_columns(packed: torch.Tensor, order=ORDER) -> torch.Tensor:
    """int32 [R, C / 8] -> uint8 [R, C]: nibble i of packed column j is column 8 j + order[i]."""
    r, c8 = packed.shape
    out = torch.empty(r, c8, 8, dtype=torch.uint8)
    for i, col in enumerate(order):
        out[:, :, col] = ((packed >> (4 * i)) & 0xF).to(torch.uint8)
    return out.view(r, c8 * 8)


def read(files, stem: str, rows: int, cols: int, fmt: WeightFormat, q: dict) -> QWeight:
    qweight, qzeros, scales = files[f"{stem}.qweight"], files[f"{stem}.qzeros"], files[f"{stem}.scales"]
    g = fmt.group_size
    if tuple(qweight.shape) != (cols, rows // 8) or tuple(scales.shape) != (cols // g, rows):
        raise InputError(str(files.path), f"{stem}.qweight", f"has shape {tuple(qweight.shape)} (scales "
                         f"{tuple(scales.shape)}); the config gives [{cols}, {rows // 8}] ({cols // g}, {rows})",
                         "an AWQ GEMM checkpoint of this config")
    codes = unpack_columns(qweight).t()  # [N, K]
    zeros = unpack_columns(qzeros).t().contiguous()  # [N, K / g]
    return QWeight(fmt, (rows, cols), pack_int4(codes), scale=scales.t().contiguous().half(), zero=zeros)
