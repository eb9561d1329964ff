"""GPTQ checkpoints (4-bit, symmetric or not, desc_act false), read as int4zpN without a
second rounding.

A quantized Linear `X` of in_features K and out_features N is stored as
  X.qweight  int32 [K / 8, N]    eight 4-bit codes an int32 along the input features: the code
                                 of input row 8 r + i in bits 4 i .. 4 i + 3 of row r
  X.qzeros   int32 [K / g, N / 8] the groups' zero points, packed along the output features in
                                 order; the original format ("gptq") stores z - 1, "gptq_v2" z
  X.scales   float16 [K / g, N]
  X.g_idx    int32 [K]           each input feature's group (k / g when desc_act is false)
and means W[n, k] = (q[k, n] - z[k / g, n]) * s[k / g, n].
"""

from __future__ import annotations

import torch

from specplan.errors import InputError
from specplan.formats import WeightFormat, WeightFormats  # noqa: F401

from ..quant import QWeight, pack_int4
from .awq import layer_formats, stores, unpack_columns  # noqa: F401 (stores: the same tensors)

SEQUENTIAL = tuple(range(8))


def formats(q: dict, source: str) -> WeightFormats:
    def refuse(field: str, got, expected: str):
        raise InputError(source, f"quantization_config.{field}", f"{got!r} is not supported", expected)

    if int(q.get("bits", 4)) != 4:
        refuse("bits", q.get("bits"), "4")
    if q.get("desc_act"):
        refuse("desc_act", q.get("desc_act"), "false (input features in their own order)")
    fmt_name = str(q.get("checkpoint_format", "gptq")).lower()
    if fmt_name not in ("gptq", "gptq_v2"):
        refuse("checkpoint_format", fmt_name, "gptq | gptq_v2")
    return layer_formats(int(q.get("group_size", 128)), refuse)


def read(files, stem: str, rows: int, cols: int, fmt: WeightFormat, q: dict) -> QWeight:
    zero_offset = 0 if str(q.get("checkpoint_format", "gptq")).lower() == "gptq_v2" else 1
    qweight, qzeros, scales = files[f"{stem}.qweight"], files[f"{stem}.qzeros"], files[f"{stem}.scales"]
    g = fmt.group_size
    if tuple(qweight.shape) != (cols // 8, rows) or tuple(scales.shape) != (cols // g, rows):
        raise InputError(str(files.path), f"{stem}.qweight", f"has shape {tuple(qweight.shape)} (scales "
                         f"{tuple(scales.shape)}); the config gives [{cols // 8}, {rows}] ({cols // g}, {rows})",
                         "a GPTQ checkpoint of this config")
    if f"{stem}.g_idx" in files:
        g_idx = files[f"{stem}.g_idx"]
        if not torch.equal(g_idx.long(), torch.arange(cols) // g):
            raise InputError(str(files.path), f"{stem}.g_idx", "reorders the input features (act-order)",
                             "a checkpoint quantized with desc_act false")
    codes = unpack_columns(qweight.t().contiguous(), SEQUENTIAL)  # [N, K]: row n's int32s unpack along k
    zeros = unpack_columns(qzeros, SEQUENTIAL).t().contiguous() + zero_offset  # [N, K / g]
    return QWeight(fmt, (rows, cols), pack_int4(codes), scale=scales.t().contiguous().half(), zero=zeros)
