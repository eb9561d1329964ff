"""Weight formats: how a tensor group is stored in host memory, streamed, and turned back
into the compute dtype on the device. One source of truth for what a matrix of a format
weighs (codes and scales) and for which format each group of a model has.

Formats (a weight matrix is [rows = output features, cols = input features]):

  bf16 / fp16 / fp32  the values in that dtype (a dtype other than the model's is cast on use)
  int8                symmetric, one scale per row: w = q * s, q in [-127, 127]
  int4, int4gN        asymmetric, groups of N (32, 64 or 128; int4 = int4g64) consecutive
                      input features per row: w = q * s + z, q in [0, 15], two codes a byte
                      (the even column in the low nibble); s and z per group
  fp8                 float8 e4m3 codes, one scale per row: w = q * s, |q| <= 448

  q8_0 q4_0 q4_1 q5_0 GGML's block formats, as a GGUF file keeps them (runtime/blocks.py has
  q5_1 q4_k q5_k q6_k the layouts): read from the file and streamed as they are, never a
                      target of --weights (specplan does not quantize into them)
  int4zpN             AWQ's and GPTQ's 4-bit codes: groups of N input features of a row with a
                      float16 scale and an integer zero point, w = (q - z) * s (codes two a
                      byte as int4gN, zero points a byte each)
  mxfp4               OCP MX fp4 (e2m1) codes, two a byte as int4gN, and one power-of-two scale
                      (e8m0, a byte) per 32 input features of a row (gpt-oss's experts)
  fp8s, fp8b128       fp8 e4m3 codes with float32 scales: one a row (a per-tensor or per-channel
                      checkpoint), or one per 128 x 128 block (DeepSeek-style), kept once per
                      row of its block so that rows stay independent; w = q * s
                      (these and the block formats: read from a checkpoint that has them)
  +fused              (int8, int4gN) the same bytes, multiplied by torch's weight-only kernel
                      straight from the codes instead of dequantized into a scratch buffer
                      first; the planner weighs it where the profile measured the kernel

Scales and zero points are float16. Quantization is round to nearest; dequantization computes
q * s (+ z) in float32, each product and sum rounded once, then casts to the compute dtype.

Tensor groups: `attention` (q, k, v, o), `experts` (each expert, or the dense MLP), `lm_head`,
`embed`, each of the target; `draft` is every matrix group of a separate draft. Norms and the
MoE router stay in the model's dtype.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from .errors import InputError

FLOAT_FORMATS = {"fp32": 4, "bf16": 2, "fp16": 2}
DTYPE_FORMAT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
SCALE_BYTES = 2  # float16 scales and zero points
# float32 elements a dequantization into a 16-bit scratch works through at a time: the block
# buffer beside the scratch (the arithmetic is float32, the scratch the compute dtype)
DEQUANT_BLOCK_ELEMS = 1 << 22
GROUPS = ("attention", "experts", "lm_head", "embed", "draft")
# what a bare format (--weights int4) applies to: the layers' matrices, which are what streams
LAYER_GROUPS = ("attention", "experts", "draft")
FORMAT_NAMES = ("bf16", "fp16", "fp32", "int8", "int4", "int4g32", "int4g64", "int4g128", "fp8")
FUSED_SUFFIX = "+fused"
FP8_BLOCK = 128  # fp8b128's block edge
MX_BLOCK = 32  # mxfp4's weights a scale
# GGML block formats: name -> (weights a block, bytes a block)
GGML_BLOCKS = {"q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24),
               "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210)}


@dataclass(frozen=True)
class WeightFormat:
    name: str  # canonical: bf16 | fp16 | fp32 | int8 | int4g32 | int4g64 | int4g128 | fp8
    fused: bool = False  # multiplied by a weight-only kernel from the codes (no dequantization)

    @property
    def label(self) -> str:
        """The name with its kernel: `int8`, `int8+fused` (what plan.json and tables say)."""
        return self.name + (FUSED_SUFFIX if self.fused else "")

    @property
    def can_fuse(self) -> bool:
        """torch has a weight-only kernel for this format's codes (int8, int4): fp8's
        (_scaled_mm) rounds the activations to fp8 too, another computation than this format's."""
        return self.name == "int8" or self.name.startswith("int4g")

    @property
    def compressed(self) -> bool:
        return self.name not in FLOAT_FORMATS

    @property
    def block(self) -> tuple[int, int] | None:
        """A GGML block format's (weights, bytes) a block; None for specplan's own formats."""
        return GGML_BLOCKS.get(self.name)

    @property
    def read_only(self) -> bool:
        """Read from a checkpoint that has it (GGUF, AWQ, GPTQ, FP8), never quantized into."""
        return self.block is not None or self.name.startswith("int4zp") or self.name in ("fp8s", "fp8b128", "mxfp4")

    @property
    def group_size(self) -> int | None:
        """Input features that share a scale: None for float formats, the row for int8 / fp8."""
        if self.name.startswith("int4zp"):
            return int(self.name[6:])
        if self.name == "mxfp4":
            return MX_BLOCK
        return int(self.name[5:]) if self.name.startswith("int4g") else None

    @property
    def code_bits(self) -> int:
        if self.name in FLOAT_FORMATS:
            return 8 * FLOAT_FORMATS[self.name]
        return 4 if self.name.startswith("int4") or self.name == "mxfp4" else 8

    def matrix_bytes(self, rows: int, cols: int) -> int:
        """Bytes of a [rows, cols] matrix in this format: codes, scales and zero points."""
        if self.block is not None:
            elems, nbytes = self.block
            return rows * (cols // elems) * nbytes
        codes = rows * cols * self.code_bits // 8
        if not self.compressed:
            return codes
        if self.name == "fp8s":
            return codes + rows * 4  # a float32 scale a row
        if self.name == "fp8b128":
            return codes + rows * -(-cols // FP8_BLOCK) * 4  # each block's scale repeated on its rows
        if self.name.startswith("int4zp"):
            return codes + rows * (cols // self.group_size) * (SCALE_BYTES + 1)  # float16 scale, uint8 zero point
        if self.name == "mxfp4":
            return codes + rows * (cols // MX_BLOCK)  # one e8m0 scale byte a block
        if self.group_size is None:
            return codes + rows * SCALE_BYTES  # one scale per row
        return codes + rows * (cols // self.group_size) * 2 * SCALE_BYTES  # scale and zero per group

    def check_shape(self, rows: int, cols: int, source: str, field: str) -> None:
        """Refuse a matrix this format cannot hold (an int4 group that does not divide the row)."""
        g = self.group_size or (self.block or (None,))[0]
        if g is not None and cols % g:
            raise InputError(source, field, f"{self.name} groups of {g} do not divide the {cols} input features "
                             f"of a [{rows}, {cols}] matrix", f"a group size dividing {cols} (int4g32 / int4g64 / int4g128), "
                             "or int8 / fp8")
        if self.code_bits == 4 and cols % 2:
            raise InputError(source, field, f"int4 packs two codes a byte; {cols} input features is odd", "int8 or fp8")


def parse_format(text: str, source: str = "argument", field: str = "--weights") -> WeightFormat:
    t = text.strip().lower()
    fused = t.endswith(FUSED_SUFFIX)
    if fused:
        t = t[:-len(FUSED_SUFFIX)]
    t = {"int4": "int4g64", "bfloat16": "bf16", "float16": "fp16", "float32": "fp32",
         "fp8_e4m3": "fp8", "e4m3": "fp8"}.get(t, t)
    if (t in GGML_BLOCKS or t in ("fp8s", "fp8b128", "mxfp4") or re.fullmatch(r"int4zp(32|64|128|256|512|1024|2048)", t)) \
            and not fused:
        return WeightFormat(t)
    if t not in FORMAT_NAMES:
        raise InputError(source, field, f"'{text}' is not a weight format",
                         " | ".join(FORMAT_NAMES) + f" (int8 and int4 also as FORMAT{FUSED_SUFFIX})")
    fmt = WeightFormat(t, fused)
    if fused and not fmt.can_fuse:
        raise InputError(source, field, f"'{text}': {t} has no weight-only fused kernel (fp8's rounds the "
                         "activations too)", f"int8{FUSED_SUFFIX} or int4gN{FUSED_SUFFIX}, or {t} dequantized")
    return fmt


@dataclass(frozen=True)
class WeightFormats:
    """The format of each tensor group; None: the model's own dtype."""

    attention: WeightFormat | None = None
    experts: WeightFormat | None = None
    lm_head: WeightFormat | None = None
    embed: WeightFormat | None = None
    draft: WeightFormat | None = None

    def of(self, group: str, model_dtype: str) -> WeightFormat:
        f = getattr(self, group)
        return f if f is not None else WeightFormat(DTYPE_FORMAT.get(model_dtype, "bf16"))

    def for_draft(self) -> "WeightFormats":
        """A separate draft's formats: its `draft` format on its layers, the rest its dtype."""
        return WeightFormats(attention=self.draft, experts=self.draft)

    def to_dict(self) -> dict[str, str]:
        """Only the groups that differ from the model's dtype (plan.json's `weights`)."""
        return {g: getattr(self, g).label for g in GROUPS if getattr(self, g) is not None}

    @classmethod
    def from_dict(cls, d: object, source: str) -> "WeightFormats":
        if d in (None, {}):
            return cls()
        if not isinstance(d, dict):
            raise InputError(source, "weights", f"got {d!r}", "an object of group: format")
        for g in d:
            if g not in GROUPS:
                raise InputError(source, f"weights.{g}", "is not a tensor group", " | ".join(GROUPS))
        out = cls(**{g: parse_format(str(v), source, f"weights.{g}") for g, v in d.items()})
        out.check_fused(source, "weights")
        return out

    def check_fused(self, source: str, field: str) -> None:
        """A fused kernel multiplies whole matrices: the embedding (a row lookup) and the LM
        head are dequantized."""
        for g in ("embed", "lm_head"):
            f = getattr(self, g)
            if f is not None and f.fused:
                raise InputError(source, field, f"{g}={f.label}: the {g} is not multiplied by a fused kernel",
                                 f"{g}={f.name}; +fused applies to attention, experts and draft")

    def stored(self) -> "WeightFormats":
        """The same formats without their kernels: what is kept on disk and in host memory."""
        return WeightFormats(**{g: replace(f, fused=False) if f is not None else None
                                for g, f in ((g, getattr(self, g)) for g in GROUPS)})

    def describe(self) -> str:
        d = self.to_dict()
        return ", ".join(f"{g}={f}" for g, f in d.items()) or "the model's dtype"


@dataclass(frozen=True)
class WeightsChoice:
    """What --weights asked for: fixed formats, and per group the formats `auto` may choose from."""

    fixed: WeightFormats
    auto: dict[str, tuple[WeightFormat | None, ...]]  # group -> candidates (the planner picks; None: the dtype)

    def candidates(self) -> list[WeightFormats]:
        """Every assignment the planner weighs: the fixed groups as given, each auto group one
        of its candidates."""
        out = [self.fixed]
        for group, options in self.auto.items():
            out = [replace(f, **{group: o}) for f in out for o in options]
        return list(dict.fromkeys(out))


AUTO_DEFAULT = ("dtype", "int8", "int4g64")  # fp8 weighs what int8 does; name it to weigh it too


def parse_weights(text: str | None, source: str = "argument", field: str = "--weights") -> WeightsChoice:
    """`--weights`: a format for the layer groups (`int4`), `auto` (the planner chooses each layer
    group among the model's dtype, int8 and int4), `auto:dtype+int8+fp8` (among those), or per group,
    `experts=int4,attention=int8,lm_head=int8,draft=auto`; a bare format with groups named
    (`int4,attention=int8`) is the other layer groups' format."""
    if text is None or not text.strip():
        return WeightsChoice(WeightFormats(), {})
    fixed: dict[str, WeightFormat] = {}
    auto: dict[str, tuple[WeightFormat | None, ...]] = {}
    items = [p.strip() for p in text.split(",") if p.strip()]
    bare = [p for p in items if "=" not in p]
    if len(bare) == 1:  # a bare format is the layer groups' unless a group names its own
        named = {p.partition("=")[0].strip() for p in items if "=" in p}
        items = [f"{g}={bare[0]}" for g in LAYER_GROUPS if g not in named] + [p for p in items if "=" in p]
    for item in items:
        group, eq, value = item.partition("=")
        group = {"mlp": "experts", "ffn": "experts", "attn": "attention", "head": "lm_head"}.get(group.strip(), group.strip())
        if not eq or group not in GROUPS:
            raise InputError(source, field, f"'{item}' is not GROUP=FORMAT",
                             f"a format ({' | '.join(FORMAT_NAMES)} | auto), or GROUP=FORMAT,... with GROUP one of "
                             + " | ".join(GROUPS))
        if group in fixed or group in auto:
            raise InputError(source, field, f"group '{group}' is given twice", "each group once")
        value = value.strip().lower()
        if value == "auto" or value.startswith("auto:"):
            names = value[5:].split("+") if value.startswith("auto:") else list(AUTO_DEFAULT)
            auto[group] = tuple(dict.fromkeys(None if n.strip() == "dtype" else parse_format(n, source, field)
                                              for n in names if n.strip()))
            if not auto[group]:
                raise InputError(source, field, f"'{item}' allows no format", "auto, or auto:FORMAT+FORMAT")
        else:
            fixed[group] = parse_format(value, source, field)
            if fixed[group].read_only:
                raise InputError(source, field, f"{value} is a checkpoint's own format (GGUF, AWQ, GPTQ, FP8): read "
                                 "from a checkpoint that has it, not quantized to",
                                 " | ".join(FORMAT_NAMES) + " (such a target keeps its own formats)")
    out = WeightsChoice(WeightFormats(**fixed), auto)
    out.fixed.check_fused(source, field)
    if any(f is not None and f.fused for g in ("embed", "lm_head") for f in auto.get(g, ())):
        raise InputError(source, field, "the embed and lm_head groups have no fused kernel", "their plain formats")
    return out
