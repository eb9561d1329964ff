"""MXFP4 checkpoints (gpt-oss's experts), read as mxfp4 without a second rounding.

Each MoE layer stores its experts stacked, rows = output features:
  mlp.experts.gate_up_proj_blocks  uint8 [E, 2F, H / 32, 16]  two fp4 e2m1 codes a byte, the even
                                   input feature in the low nibble; rows alternate gate, up
  mlp.experts.gate_up_proj_scales  uint8 [E, 2F, H / 32]      e8m0: a block's weights times 2^(s - 127)
  mlp.experts.down_proj_blocks     uint8 [E, H, F / 32, 16], down_proj_scales [E, H, F / 32]
(biases and everything else in bf16). An expert's gate rows, up rows and down rows are taken
as they are: rows are independent, so nothing is re-encoded.
"""

from __future__ import annotations

from specplan.errors import InputError
from specplan.formats import MX_BLOCK, WeightFormat, WeightFormats

from ..quant import QWeight


def formats(q: dict, source: str) -> WeightFormats:
    return WeightFormats(experts=WeightFormat("mxfp4"))


def _names(stem: str) -> tuple[str, int, int | None]:
    """(the stacked tensor's prefix, expert, 0 / 1 for gate / up rows or None for down)."""
    parts = stem.split(".")  # model.layers.{i}.block_sparse_moe.experts.{e}.w{1,2,3}
    prefix = ".".join(parts[:3]) + ".mlp.experts."
    w = parts[6]
    return prefix + ("down_proj" if w == "w2" else "gate_up_proj"), int(parts[5]), None if w == "w2" else int(w == "w3")


def stores(files, stem: str) -> bool:
    if "block_sparse_moe" not in stem or ".experts." not in stem:
        return False
    return f"{_names(stem)[0]}_blocks" in files


def check(files, spec) -> None:
    """Every layer's stacked expert tensors have the config's shapes (read from the headers)."""
    h, f, e = spec.hidden, spec.ffn_inner, spec.experts
    for i in range(spec.layers):
        for name, rows, cols in (("gate_up_proj", 2 * f, h), ("down_proj", h, f)):
            stem = f"model.layers.{i}.mlp.experts.{name}"
            want = (e, rows, cols // MX_BLOCK, MX_BLOCK // 2)
            for key, shape in ((f"{stem}_blocks", want), (f"{stem}_scales", want[:3])):
                got = files.shape(key) if key in files else None
                if got != shape:
                    raise InputError(str(files.path), key, f"has shape {list(got) if got else 'none'}",
                                     f"{list(shape)} for this config (experts, rows, blocks{', 16 bytes' if len(shape) == 4 else ''})")


def read(files, stem: str, rows: int, cols: int, fmt: WeightFormat, q: dict) -> QWeight:
    name, e, half = _names(stem)
    blocks, scales = files[f"{name}_blocks"], files[f"{name}_scales"]
    pick = slice(None) if half is None else slice(half, None, 2)
    codes = blocks[e, pick].reshape(rows, cols // 2).contiguous()
    return QWeight(fmt, (rows, cols), codes, scale=scales[e, pick].contiguous())
