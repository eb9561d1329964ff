"""Checkpoint readers for files that are not a HF directory of 16/32-bit safetensors: each keeps
the weights in the bits the file has them (memory-mapped where it can) and hands out the
runtime's tensor names, a quantized matrix as a QWeight in the file's own format.

  gguf.py   a llama.cpp GGUF file (--target FILE.gguf)
  awq.py    a HF directory of AWQ (GEMM) safetensors          quantization_config.quant_method "awq"
  gptq.py   a HF directory of GPTQ safetensors (desc_act off)  "gptq"
  fp8.py    a HF directory of fp8 e4m3 weights with scales     "compressed-tensors", "fp8"
  mxfp4.py  gpt-oss's MXFP4 experts                            "mxfp4"
"""

from __future__ import annotations

from pathlib import Path

import torch

from specplan.errors import InputError

from ..checkpoint import Checkpoint, SafetensorsDir, _resolver
from ..quant import QWeight


class FileCheckpoint(Checkpoint):
    """A checkpoint whose matrices may come back as QWeights in the file's own format: those
    pass through as they are, plain tensors are converted to the compute dtype."""

    def tensor(self, name: str):
        t = self._get(name)
        return t if isinstance(t, QWeight) else t.to(self.dtype)

    def globals(self) -> dict:
        out = {n: self.tensor(n) for n in ("model.embed_tokens.weight", "model.norm.weight")}
        out["lm_head.weight"] = out["model.embed_tokens.weight"] if self.spec.tie_embeddings else self.tensor("lm_head.weight")
        return out


class QuantizedDirCheckpoint(FileCheckpoint):
    """A HF directory whose layer matrices a quantization method stores in its own tensors
    (`read(files, stem, rows, cols)` gives the QWeight of `stem`.weight); everything else as
    any HF checkpoint (runtime.checkpoint's names, fused experts included)."""

    def __init__(self, spec, path: Path, dtype: torch.dtype, method: str):
        self.files = SafetensorsDir(path)
        self.method = method
        self.reader = reader(method)
        if hasattr(self.reader, "check"):  # shapes against the config, before any weight is read
            self.reader.check(self.files, spec)
        plain = _resolver(spec, self.files.__contains__, self.files.__getitem__, str(path))
        super().__init__(spec, lambda name: self._read(name, plain), dtype, str(path))

    def _read(self, name: str, plain):
        from ..checkpoint import _shape, matrix_group

        short = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
        stem = name[:-len(".weight")]
        group = matrix_group(short)
        if group is not None and not self.reader.stores(self.files, stem):
            stem = _expert_stem(stem, self.files, self.reader)
        if group is not None and self.reader.stores(self.files, stem):
            if group not in ("attention", "experts"):
                raise InputError(str(self.files.path), stem, f"is quantized ({self.method}); specplan reads quantized "
                                 "layer matrices only", "an unquantized embedding and LM head")
            rows, cols = _shape(self.spec, short)
            return self.reader.read(self.files, stem, rows, cols, self.spec.fmt(group),
                                    self.spec.hf_config.get("quantization_config") or {})
        return plain(name)


def _expert_stem(stem: str, files, reader) -> str:
    """An expert's name as Qwen3-MoE writes it (mlp.experts.E.gate_proj), where the file has it."""
    from ..checkpoint import EXPERT_NAMES

    parts = stem.split(".")
    if "block_sparse_moe" in parts and "experts" in parts:
        other = ".".join(parts[:3] + ["mlp", "experts", parts[5], EXPERT_NAMES[parts[6]]])
        if reader.stores(files, other):
            return other
    return stem


def quantized_formats(cfg: dict, source: str):
    """The formats a HF config's quantization_config gives each group, and the method's name;
    (None, None) without one. Refused in one line: a method or a variant specplan cannot read."""
    q = cfg.get("quantization_config")
    if not q:
        return None, None
    if not isinstance(q, dict):
        raise InputError(source, "quantization_config", f"got {q!r}", "an object")
    method = str(q.get("quant_method", "")).lower()
    if method not in METHODS:
        raise InputError(source, "quantization_config.quant_method", f"'{method}' is not supported", " | ".join(METHODS))
    return reader(method).formats(q, source), method


METHODS = ("awq", "gptq", "compressed-tensors", "fp8", "mxfp4")  # quantization_config.quant_method


def reader(method: str):
    """The module reading a quantization method's tensors (its `formats`, `stores`, `read`)."""
    from . import awq, fp8, gptq, mxfp4

    return {"awq": awq, "gptq": gptq, "compressed-tensors": fp8, "fp8": fp8, "mxfp4": mxfp4}[method]
