"""`specplan profile`: measure this machine into a HardwareProfile.

What is timed is what runs: the runtime's own SwiGLU expert/MLP, attention projections and
attention (`specplan.runtime.model` / `.attention`), the copies its weight store makes, and
the draft model's whole decode step. Each measurement is the median of repeated runs after
warm-up, with CUDA events (GPU) or perf_counter (CPU).

Without a GPU the CPU is profiled as the compute device and memory-to-memory copies stand
in for the link, so profile -> optimize -> specrun -> compare runs end to end anywhere.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from specplan.host import cpu_device_name, cpu_model, machine_load
from specplan import __version__
from specplan.cost import attention_op_name, attn_proj_op_name, ffn_op_name, head_op_name, step_op_name
from specplan.hardware import SCHEMA_VERSION, HardwareProfile
from specplan.models import ModelSpec
from specplan.runtime.attention import cuda_sdpa_kernels
from specplan.runtime.checkpoint import TORCH_DTYPES

KiB, MiB, GiB = 2**10, 2**20, 2**30
FUSED_CALL_BUDGET_S = 0.02  # a fused kernel's token axis stops past the size whose largest call takes this


@dataclass(frozen=True)
class Grid:
    link_bytes: tuple[int, ...]
    ffn_tokens: tuple[int, ...]
    attn_rows: tuple[int, ...]
    attn_q: tuple[int, ...]
    attn_ctx: tuple[int, ...]
    step_rows: tuple[int, ...]
    step_ctx: tuple[int, ...]
    repeat: int
    gemm_n: int


QUICK = Grid(link_bytes=(64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB), ffn_tokens=(1, 8, 64, 512, 2048),
             attn_rows=(1, 8, 32), attn_q=(1, 4, 64), attn_ctx=(16, 128, 512), step_rows=(1, 8, 32),
             step_ctx=(16, 128, 512), repeat=5, gemm_n=1024)
FULL = Grid(link_bytes=tuple(64 * KiB * 4**i for i in range(8)),  # 64 KiB .. 1 GiB
            ffn_tokens=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
            attn_rows=(1, 4, 16, 64, 256), attn_q=(1, 4, 8), attn_ctx=(128, 512, 2048, 4096),
            step_rows=(1, 4, 16, 64, 256), step_ctx=(128, 512, 2048), repeat=7, gemm_n=4096)


# ---- timing -------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time_s(fn: Callable[[], object], device: torch.device, repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fit_latency_bandwidth(sizes: list[float], seconds: list[float]) -> tuple[float, float, float]:
    """Least squares of t = latency + bytes / bandwidth, weighted by 1/t so small and large
    copies count alike. Returns (latency_s, bytes_per_s, median relative error)."""
    from scipy.optimize import nnls

    x, t = np.asarray(sizes, float), np.asarray(seconds, float)
    w = 1.0 / t
    scale = x.max()  # keep the two columns of comparable size
    a = np.stack([np.ones_like(x), x / scale], axis=1) * w[:, None]
    (lat, inv_bw), _ = nnls(a, t * w)  # latency and 1/bandwidth are never negative
    inv_bw /= scale
    if inv_bw <= 0:  # degenerate sweep: fall back to the largest copy's rate
        inv_bw = t[-1] / x[-1]
    lat = float(lat)
    pred = lat + x * inv_bw
    err = float(np.median(np.abs(pred - t) / t))
    return lat, float(1.0 / inv_bw), err


# ---- link -------------------------------------------------------------------------------------------


def _buffers(nbytes: int, device: torch.device, pinned: bool, direction: str):
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned and device.type == "cuda")
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return (host, dev) if direction == "h2d" else (dev, host)


def _copy_time_s(nbytes: int, device: torch.device, pinned: bool, direction: str, repeat: int) -> float:
    src, dst = _buffers(nbytes, device, pinned, direction)
    return median_time_s(lambda: dst.copy_(src, non_blocking=pinned), device, repeat)


def measure_copies(device: torch.device, grid: Grid, on_progress=None) -> dict:
    """Copy time over sizes, per direction and memory kind, fitted; plus the duplex slowdown."""
    out = {}
    for direction in ("h2d", "d2h"):
        for pinned in (True, False):
            sizes, times = [], []
            for n in grid.link_bytes:
                t = _copy_time_s(n, device, pinned, direction, grid.repeat)
                sizes.append(n)
                times.append(t)
                if on_progress:
                    on_progress(f"{direction} {'pinned' if pinned else 'pageable'} {n / MiB:.2f} MiB", n / t)
            lat, bw, err = fit_latency_bandwidth(sizes, times)
            out[f"{direction}_{'pinned' if pinned else 'pageable'}"] = {
                "latency_s": lat, "bytes_per_s": bw, "fit_rel_error": err,
                "table": {"bytes": sizes, "seconds": times}}
    out["duplex_factor"] = measure_duplex(device, grid.link_bytes[-1], grid.repeat)
    return out


def measure_duplex(device: torch.device, nbytes: int, repeat: int) -> float:
    """Each direction's rate with the other running at the same time, over its rate alone."""
    h_src, h_dst = _buffers(nbytes, device, True, "h2d")
    d_src, d_dst = _buffers(nbytes, device, True, "d2h")
    alone = median_time_s(lambda: h_dst.copy_(h_src, non_blocking=True), device, repeat)
    if device.type == "cuda":
        s1, s2 = torch.cuda.Stream(device), torch.cuda.Stream(device)

        def both():
            with torch.cuda.stream(s1):
                h_dst.copy_(h_src, non_blocking=True)
            with torch.cuda.stream(s2):
                d_dst.copy_(d_src, non_blocking=True)
            torch.cuda.synchronize(device)
    else:
        def both():
            th = threading.Thread(target=lambda: d_dst.copy_(d_src))
            th.start()
            h_dst.copy_(h_src)
            th.join()
    together = median_time_s(both, torch.device("cpu"), repeat)
    # both copies moved in `together`; alone, one copy took `alone`
    return float(min(1.0, max(0.05, alone / together)))


# ---- compute ------------------------------------------------------------------------------------


def measure_gemm_flops(device: torch.device, dtype: torch.dtype, n: int, repeat: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = median_time_s(lambda: a @ b, device, repeat)
    return 2 * n**3 / t


def measure_memory_bandwidth(device: torch.device, nbytes: int, repeat: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = median_time_s(lambda: dst.copy_(src), device, repeat)
    return 2 * nbytes / t  # read + write


def measure_disk_read(nbytes: int = 256 * MiB) -> float:
    """Sequential read of a fresh file, evicted from the page cache first where the OS allows."""
    import tempfile

    with tempfile.NamedTemporaryFile(dir=os.environ.get("SPECPLAN_DISK_DIR"), delete=True) as f:
        f.write(os.urandom(MiB) * (nbytes // MiB))
        f.flush()
        os.fsync(f.fileno())
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        with open(f.name, "rb", buffering=0) as g:
            while g.read(16 * MiB):
                pass
        return nbytes / (time.perf_counter() - t0)


def measure_launch_s(device: torch.device) -> float:
    x = torch.zeros(1, device=device)
    return median_time_s(lambda: x.add_(1), device, 20, warmup=3)


def measure_host_issue(model: ModelSpec, device: torch.device, repeat: int) -> dict:
    """The host's time to issue the runtime's work for `model`'s structure, from passes of its
    tiny twin (runtime.profiling.tiny_twin), where the kernels themselves cost next to nothing
    (their launches are part of what is measured):
      host_layer_s  the slope over layers (2 -> 18) of a one-group pass: one layer, one group;
      host_pass_s   the rest of a pass: embedding, positions, LM head;
      host_expert_s for an MoE structure, one expert's share of a layer (gather, SwiGLU,
                    scatter): a pass of 64 rows, which reaches every expert, against one
                    row, which reaches top_k of them; host_layer_s is then the rest.
    Medians of `repeat` passes, after a warm-up."""
    from specplan.runtime.profiling import forward_timer, tiny_twin

    def one(spec: ModelSpec, rows: int = 1) -> float:
        return median_time_s(forward_timer(spec, device, rows), device, repeat, warmup=3)

    lo, hi = 2, 18
    t_lo, t_hi = one(tiny_twin(model, lo)), one(tiny_twin(model, hi))
    layer_s = max(t_hi - t_lo, 0.0) / (hi - lo)
    out = {"host_layer_s": layer_s, "host_pass_s": max(t_lo - lo * layer_s, 0.0), "host_expert_s": 0.0}
    if model.is_moe and model.experts > model.top_k:
        t_all = one(tiny_twin(model, hi), rows=64)
        expert_s = max(t_all - t_hi, 0.0) / (hi * (model.experts - model.top_k))
        out["host_expert_s"] = expert_s
        out["host_layer_s"] = max(layer_s - model.top_k * expert_s, 0.0)
    return out


def measure_lane_factor(target: ModelSpec, draft: ModelSpec | None = None, repeat: int = 3,
                        window_s: float = 0.2) -> float:
    """On a CPU profiled as the device: the speed a lane keeps while the other is busy, on the
    two threads the runtime runs at once (specoffload's target pass beside its draft).

    One thread does what a streamed target layer does on this device: copy the FFN's weights
    from host memory (fresh copies, larger than the cache) into a slot, then compute the FFN
    of 16 decode rows from the slot. The other runs the draft's decode step (8 rows at
    context 128), resident; without a draft, a second target thread. Each runs its work over
    and over for `window_s`, alone and then beside the other; a lane's factor is its rate
    together over its rate alone, and the profile keeps the mean of the two (median of
    `repeat`). Two threads of one fresh-weight linear, a proxy for this pair, slowed each
    other to 0.46-0.59 on a 2-core AMD EPYC, where specoffload's draft ran unslowed beside
    the target (docs/validation.md section 12); this pair measured 0.70-0.90 there."""
    from specplan.runtime.model import rms_norm, swiglu
    from specplan.runtime.profiling import decode_step_timer

    cpu = torch.device("cpu")
    dt = TORCH_DTYPES.get(target.dtype, torch.float32)
    h, f = target.hidden, target.ffn_inner
    fresh = _Cycle(_copies(lambda: (_rand((2 * f, h), cpu, dt), _rand((h, f), cpu, dt)),
                           3 * h * f * target.dtype_bytes))
    slot = (torch.empty(2 * f, h, dtype=dt), torch.empty(h, f, dtype=dt))
    norm, x = torch.ones(h, dtype=dt), _rand((16, 1, h), cpu, dt, 1.0)

    def streamed_layer() -> None:
        for dst, src in zip(slot, fresh.next()):
            dst.copy_(src)
        x + swiglu(rms_norm(x, norm, target.rms_norm_eps), *slot)

    beside = decode_step_timer(draft, cpu, 8, 128) if draft is not None else streamed_layer
    works = (streamed_layer, beside)

    def rate(fn, start: threading.Barrier | None = None) -> float:
        fn()  # warm
        if start is not None:
            start.wait()
        n, t0 = 0, time.perf_counter()
        while (t := time.perf_counter() - t0) < window_s:
            fn()
            n += 1
        return n / t

    factors = []
    for _ in range(repeat):
        alone = [rate(fn) for fn in works]
        together = [0.0, 0.0]
        start = threading.Barrier(2)

        def run(k: int) -> None:
            together[k] = rate(works[k], start)
        threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        factors.append(min(1.0, sum(b / a for a, b in zip(alone, together)) / 2))
    return float(np.median(factors))


def _rand(shape, device, dtype, std=0.02):
    return (torch.randn(*shape, device=device, dtype=torch.float32) * std).to(dtype)


# Kernels are timed on weights that are not in cache, as in the runtime, where each layer's
# weights arrive fresh for every pass: enough copies are cycled to exceed the last-level
# cache. (Timing one small weight set over and over measures the cache, not the kernel.)
COLD_BYTES = 512 * MiB  # above the LLC of the machines seen (300 MiB on the CI VM)
MAX_COPIES = 128


def _n_copies(nbytes: float) -> int:
    return int(min(MAX_COPIES, max(1, -(-COLD_BYTES // max(int(nbytes), 1)))))


def _copies(make: Callable[[], object], nbytes: float) -> list:
    return [make() for _ in range(_n_copies(nbytes))]


class _Cycle:
    """Hands out the next of several equivalent argument sets on every call."""

    def __init__(self, items: list):
        self.items, self.i = items, 0

    def next(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def _layer_weights(model: ModelSpec, device: torch.device, dt: torch.dtype, groups: tuple[str, ...] | None = None) -> dict:
    """One layer's tensors under the runtime's names (random; only shapes matter for timing),
    those of the given tensor groups (attention, ffn, router, norm) or all."""
    from specplan.runtime.checkpoint import random_checkpoint, tensor_group
    from specplan.runtime.model import fuse_layer

    return {name: t.to(device) for name, t in fuse_layer(random_checkpoint(model, dt).layer(0)).items()
            if groups is None or tensor_group(name) in groups}


def ffn_table(model: ModelSpec, device: torch.device, grid: Grid) -> dict:
    """What the runtime's `target_ffn` stage runs: for a dense model the post-attention norm,
    the SwiGLU MLP and the residual add; for an MoE model one expert's SwiGLU (the cost model
    multiplies by the experts touched)."""
    from specplan.runtime.model import rms_norm, swiglu

    dt = TORCH_DTYPES.get(model.dtype, torch.bfloat16)
    h, f = model.hidden, model.ffn_inner
    weights = _Cycle(_copies(lambda: (_rand((2 * f, h), device, dt), _rand((h, f), device, dt)),
                             3 * h * f * model.dtype_bytes))
    norm = torch.ones(h, device=device, dtype=dt)
    secs = []
    for t in grid.ffn_tokens:
        x = _rand((1, t, h), device, dt, 1.0)
        if model.is_moe:
            fn = lambda: swiglu(x, *weights.next())  # noqa: E731
        else:
            fn = lambda: x + swiglu(rms_norm(x, norm, model.rms_norm_eps), *weights.next())  # noqa: E731
        secs.append(median_time_s(fn, device, grid.repeat))
    return {"axes": ["tokens"], "grid": [list(grid.ffn_tokens)], "seconds": secs}


def attn_proj_table(model: ModelSpec, device: torch.device, grid: Grid) -> dict:
    """What the runtime's `target_proj` stage runs: input norm, q/k/v projections, RoPE, and
    later the o projection with its residual add."""
    from specplan.runtime.model import linear, qkv_proj, rope_cos_sin, rope_inv_freq

    dt = TORCH_DTYPES.get(model.dtype, torch.bfloat16)
    # the attention weights alone: n copies of a whole MoE layer would fill the GPU with experts
    first = _layer_weights(model, device, dt, groups=("attention", "norm"))
    n = _n_copies(model.attention_params_per_layer * model.dtype_bytes)
    layers = _Cycle([first] + [{k: v.clone() for k, v in first.items()} for _ in range(n - 1)])
    inv_freq = rope_inv_freq(model).to(device)
    secs = []
    for t in grid.ffn_tokens:
        x = _rand((1, t, model.hidden), device, dt, 1.0)
        cos, sin = rope_cos_sin(inv_freq, torch.arange(t, device=device)[None], dt)

        def run():
            w = layers.next()
            q = qkv_proj(x, w, model, (cos, sin))[:, :, :model.heads]
            return x + linear(q.reshape(1, t, -1), w, "self_attn.o_proj")
        secs.append(median_time_s(run, device, grid.repeat))
    return {"axes": ["tokens"], "grid": [list(grid.ffn_tokens)], "seconds": secs}


def head_table(model: ModelSpec, device: torch.device, grid: Grid) -> dict:
    """What the runtime's `target_head` stage runs: final norm, LM head, fp32 logits."""
    import torch.nn.functional as F

    from specplan.runtime.model import rms_norm

    dt = TORCH_DTYPES.get(model.dtype, torch.bfloat16)
    heads = _Cycle(_copies(lambda: _rand((model.vocab, model.hidden), device, dt), model.head_bytes))
    norm = torch.ones(model.hidden, device=device, dtype=dt)
    secs = []
    for t in grid.ffn_tokens:
        x = _rand((t, model.hidden), device, dt, 1.0)
        secs.append(median_time_s(lambda: F.linear(rms_norm(x, norm, model.rms_norm_eps), heads.next()).float(),
                                  device, grid.repeat))
    return {"axes": ["tokens"], "grid": [list(grid.ffn_tokens)], "seconds": secs}


def attention_table(model: ModelSpec, device: torch.device, grid: Grid) -> dict:
    """What the runtime's `target_attention` stage runs: write the new K/V into a KV cache on
    `device`, then attend over the row's context (the cache's view, masked per row)."""
    from specplan.runtime.attention import attend
    from specplan.runtime.kvcache import KVCache

    dt = TORCH_DTYPES.get(model.dtype, torch.bfloat16)
    if device.type == "cpu" and dt == torch.float16:
        dt = torch.float32
    secs = np.zeros((len(grid.attn_rows), len(grid.attn_q), len(grid.attn_ctx)))
    for i, rows in enumerate(grid.attn_rows):
        for j, q_len in enumerate(grid.attn_q):
            for k, ctx in enumerate(grid.attn_ctx):
                kv_bytes = 2 * rows * (ctx + q_len) * model.kv_heads * model.head_dim * torch.finfo(dt).bits // 8
                caches = _Cycle(_copies(lambda: KVCache(1, rows, ctx + q_len, model.kv_heads, model.head_dim, dt, device),
                                        kv_bytes))
                q = _rand((rows, q_len, model.heads, model.head_dim), device, dt, 1.0)
                kn = _rand((rows, q_len, model.kv_heads, model.head_dim), device, dt, 1.0)
                vn = _rand((rows, q_len, model.kv_heads, model.head_dim), device, dt, 1.0)
                all_rows = slice(0, rows)

                def run():
                    cache = caches.next()
                    cache.lengths[:] = ctx
                    cache.write(0, all_rows, kn, vn)
                    kc, vc = cache.view(0, all_rows, ctx + q_len)
                    return attend(q, kc, vc, cache.lengths[all_rows])
                secs[i, j, k] = median_time_s(run, device, grid.repeat)
    return {"axes": ["rows", "q_len", "context"],
            "grid": [list(grid.attn_rows), list(grid.attn_q), list(grid.attn_ctx)], "seconds": secs.tolist()}


MEASURED_FORMATS = ("int8", "int4g32", "int4g64", "int4g128", "fp8")
CHECKPOINT_FORMATS = ("int4zp32", "int4zp64", "int4zp128", "fp8s", "fp8b128", "mxfp4")  # AWQ / GPTQ and FP8 checkpoints' own


def _format_matrices(models: list[ModelSpec], fmt, key_of) -> tuple[dict[int, tuple[int, int]], str | None]:
    """The matrices these models multiply one call each (ModelSpec.call_shapes of attention
    and experts) with their layers in `fmt`, by size, and the kernel-table key `key_of` gives;
    a model whose rows `fmt`'s groups do not divide, or in another dtype than the first
    model's (the one the tables are timed in), is left out."""
    from specplan.formats import WeightFormats

    sizes: dict[int, tuple[int, int]] = {}
    key = None
    for m in models:
        if m.dtype != models[0].dtype:  # timed in the first model's dtype: its key says so
            continue
        try:
            m = m.with_weights(WeightFormats(attention=fmt, experts=fmt))
        except Exception:  # noqa: BLE001 - a group size that does not divide this model's rows
            continue
        for rows, cols in m.call_shapes("attention") + m.call_shapes("experts"):
            sizes.setdefault(rows * cols, (rows, cols))
        key = key_of(m)
    return sizes, key


def dequant_tables(models: list[ModelSpec], device: torch.device, grid: Grid) -> dict[str, dict]:
    """What the runtime does before a compressed group's matmuls: dequantize it into the
    scratch buffer (runtime/quant.py), per format, over the matrices these models dequantize
    one call each (ModelSpec.dequant_shapes), on fresh (uncached) codes. A format
    this device cannot run is left out, and priced by the cost model's roofline."""
    from specplan.cost import dequant_op_name
    from specplan.formats import DEQUANT_BLOCK_ELEMS, GGML_BLOCKS, parse_format
    from specplan.runtime.quant import sample

    tables: dict[str, dict] = {}
    for fmt in MEASURED_FORMATS + tuple(GGML_BLOCKS) + CHECKPOINT_FORMATS:
        sizes, key = _format_matrices(models, parse_format(fmt), lambda m: dequant_op_name(m, "attention", "gpu"))
        if not sizes:
            continue
        dt = TORCH_DTYPES.get(models[0].dtype, torch.bfloat16)
        secs = []
        try:
            for params, (rows, cols) in sorted(sizes.items()):
                one = sample(parse_format(fmt), rows, cols)
                copies = _Cycle(_copies(lambda: one.to(device), one.nbytes))
                out = torch.empty(rows, cols, dtype=dt, device=device)
                block = torch.empty(min(params, DEQUANT_BLOCK_ELEMS), dtype=torch.float32, device=device)
                secs.append(median_time_s(lambda: copies.next().dequantize(dt, out, block), device, grid.repeat))
        except (RuntimeError, TypeError):  # e.g. no float8 on this device
            continue
        tables[key] = {"axes": ["params"], "grid": [sorted(sizes)], "seconds": secs}
    return tables


def fused_tables(models: list[ModelSpec], device: torch.device, grid: Grid, say=lambda m: None) -> dict[str, dict]:
    """The other way to run a compressed group: torch's weight-only kernel straight from the
    codes (runtime/quant.py linear), per format, over tokens x the matrices these models
    multiply one call each. Only where the kernel runs on this device and agrees with the
    dequantized matmul (quant.fused_ok): the planner weighs a fused format only where this
    measured it, so the measurement decides between the two paths."""
    from specplan.cost import fused_op_name
    from specplan.formats import parse_format
    from specplan.runtime.quant import fused_layout, fused_ok, linear, quantize

    dt = TORCH_DTYPES.get(models[0].dtype, torch.bfloat16)
    tables: dict[str, dict] = {}
    for name in MEASURED_FORMATS:
        fmt = parse_format(name)
        if not fmt.can_fuse:
            continue
        fused = replace(fmt, fused=True)
        why = fused_ok(fused, device, dt)
        if why is not None:
            say(f"kernels: no fused {name} ({why})")
            continue
        sizes, key = _format_matrices(models, fused, lambda m: fused_op_name(m, "attention", "gpu"))
        if not sizes:
            continue
        calls = {}
        for params, (rows, cols) in sorted(sizes.items(), reverse=True):  # the largest matrix sets the token axis
            one = fused_layout(replace(quantize(_rand((rows, cols), torch.device("cpu"), torch.float32), fmt), fmt=fused),
                               device)
            copies = _Cycle(_copies(lambda: one.to(device), one.nbytes))
            calls[params] = lambda t, cols=cols, copies=copies: (lambda x: lambda: linear(x, copies.next()))(
                _rand((t, cols), device, dt, 1.0))
        secs: dict[int, list[float]] = {p: [] for p in calls}
        tokens = []
        for t in grid.ffn_tokens:  # up to the first size whose largest call passes the budget: beyond
            tokens.append(t)      # it, time grows with the tokens (cost.fused_time_s scales it)
            for params, call in calls.items():
                secs[params].append(median_time_s(call(t), device, grid.repeat))
            if secs[max(calls)][-1] > FUSED_CALL_BUDGET_S:
                break
        order = sorted(calls)
        tables[key] = {"axes": ["tokens", "params"], "grid": [tokens, order],
                       "seconds": [[secs[p][i] for p in order] for i in range(len(tokens))]}
    return tables


def step_table(model: ModelSpec, device: torch.device, grid: Grid) -> dict:
    """The whole decode step of a resident model (the draft) over rows x context."""
    from specplan.runtime.profiling import decode_step_timer

    secs = np.zeros((len(grid.step_rows), len(grid.step_ctx)))
    for i, rows in enumerate(grid.step_rows):
        for j, ctx in enumerate(grid.step_ctx):
            step = decode_step_timer(model, device, rows, ctx)
            secs[i, j] = median_time_s(step, device, grid.repeat)
    return {"axes": ["rows", "context"], "grid": [list(grid.step_rows), list(grid.step_ctx)], "seconds": secs.tolist()}


# ---- the whole profile -------------------------------------------------------------------------------


def _total_ram_bytes() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16e9


def _driver_version() -> str | None:
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


@cuda_sdpa_kernels()  # kernels timed with the attention kernels the runtime uses
def profile_machine(models: list[ModelSpec], *, quick: bool = True, device: str = "auto",
                    gpu_memory_bytes: float | None = None, name: str | None = None,
                    on_progress: Callable[[str, float | None], None] | None = None,
                    load: dict | None = None) -> HardwareProfile:
    grid = QUICK if quick else FULL
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    say = on_progress or (lambda msg, rate=None: None)
    load = machine_load() if load is None else load  # recorded: a profile taken on a busy machine is slow
    cpu = torch.device("cpu")
    ram = _total_ram_bytes()
    if dev.type == "cuda":
        # What the plan cannot have: the CUDA context and other processes, read before this
        # profiler allocates anything (its freed buffers stay in torch's cache until the end).
        torch.empty(1, device=dev)
        free, total = torch.cuda.mem_get_info(dev)
        reserved = float(total - free)
    has = float(total) if dev.type == "cuda" else ram  # on the CPU the device's memory is the host's
    if gpu_memory_bytes and has and gpu_memory_bytes > has:
        from specplan.errors import InputError
        from specplan.units import fmt_bytes

        raise InputError("argument", "--gpu-mem", f"{fmt_bytes(gpu_memory_bytes)} is more than this device's "
                         f"{fmt_bytes(has)}; it can only cap it", f"at most {fmt_bytes(has)}")

    say("link: copy sweep")
    link = measure_copies(dev, grid, on_progress=say)
    say("disk: sequential read")
    disk_bw = measure_disk_read(64 * MiB if quick else 1 * GiB)
    say("compute: GEMM peak")
    # a GPU reaches its peak only on large products (n = 1024 gave an H200 6% of it)
    gemm_n = grid.gemm_n if dev.type == "cpu" else max(grid.gemm_n, 8192)
    dev_flops = {k: measure_gemm_flops(dev, dt, gemm_n, grid.repeat) for k, dt in
                 (("bfloat16", torch.bfloat16), ("float32", torch.float32))}
    dev_bw = measure_memory_bandwidth(dev, 256 * MiB, grid.repeat)
    host_flops = dev_flops if dev.type == "cpu" else {
        k: measure_gemm_flops(cpu, dt, 1024, 3) for k, dt in (("bfloat16", torch.bfloat16), ("float32", torch.float32))}
    host_bw = dev_bw if dev.type == "cpu" else measure_memory_bandwidth(cpu, 256 * MiB, 3)

    kernels: dict[str, dict] = {}
    seen = set()
    for m in models:
        if (m.hidden, m.ffn_inner, m.dtype) not in seen:
            say(f"kernels: {m.name} FFN")
            kernels[ffn_op_name(m, "gpu")] = ffn_table(m, dev, grid)
            say(f"kernels: {m.name} attention projections")
            kernels[attn_proj_op_name(m, "gpu")] = attn_proj_table(m, dev, grid)
            kernels[head_op_name(m, "gpu")] = head_table(m, dev, grid)
            seen.add((m.hidden, m.ffn_inner, m.dtype))
        say(f"kernels: {m.name} attention")
        kernels[attention_op_name(m, "gpu")] = attention_table(m, dev, grid)
        kernels[attention_op_name(m, "cpu")] = (kernels[attention_op_name(m, "gpu")] if dev.type == "cpu"
                                                 else attention_table(m, cpu, grid))
    say("kernels: dequantization per weight format")
    kernels.update(dequant_tables(models, dev, grid))
    say("kernels: fused weight-only matmuls per weight format")
    kernels.update(fused_tables(models, dev, grid, say))
    if len(models) > 1:
        say(f"kernels: {models[-1].name} whole decode step")
        kernels[step_op_name(models[-1], "gpu")] = step_table(models[-1], dev, grid)
    lanes = max(1, (os.cpu_count() or 1) // torch.get_num_threads()) if dev.type == "cpu" else 1
    lane_factor = 1.0
    if lanes > 1:
        say("host: two threads of work at once")
        lane_factor = measure_lane_factor(models[0], models[-1] if len(models) > 1 else None)
    say(f"host: issuing {models[0].name}'s layers")
    host_issue = measure_host_issue(models[0], dev, max(grid.repeat, 20))

    if dev.type == "cuda":
        torch.cuda.empty_cache()
        gpu_name = torch.cuda.get_device_name(dev)
        mem = float(total)
    else:
        gpu_name = cpu_device_name()
        mem = float(gpu_memory_bytes or ram / 2)
        reserved = 0.0
    if gpu_memory_bytes:
        mem = float(gpu_memory_bytes)

    paths = {k: {kk: v[kk] for kk in ("latency_s", "bytes_per_s", "fit_rel_error")} for k, v in link.items() if k != "duplex_factor"}
    ranges = {"link_bytes": [grid.link_bytes[0], grid.link_bytes[-1]], "ffn_tokens": [grid.ffn_tokens[0], grid.ffn_tokens[-1]],
              "attention_rows": list(grid.attn_rows), "attention_q_len": list(grid.attn_q),
              "attention_context": list(grid.attn_ctx), "models": [m.name for m in models],
              "link_tables": {k: v["table"] for k, v in link.items() if k != "duplex_factor"}}
    d = {
        "schema_version": SCHEMA_VERSION,
        "name": name or ("cpu-" + platform.node() if dev.type == "cpu" else gpu_name.lower().replace(" ", "-")),
        "provenance": {
            "kind": "measured", "sources": [f"specplan profile{' --quick' if quick else ''} on {platform.node()}"],
            "notes": ("CPU profiled as the compute device; memory-to-memory copies stand in for the link."
                      if dev.type == "cpu" else ""),
            "date": _dt.date.today().isoformat(), "tool_version": __version__, "torch_version": torch.__version__,
            "cuda_version": torch.version.cuda, "driver_version": _driver_version() if dev.type == "cuda" else None,
            "device_name": gpu_name, "cpu_model": cpu_model(), "profiled_ranges": ranges, "machine_load": load},
        "gpu": {"name": gpu_name, "memory_bytes": mem, "peak_flops_per_s": {**dev_flops, "float16": dev_flops["bfloat16"]},
                "memory_bandwidth_bytes_per_s": dev_bw, "matmul_efficiency": 1.0, "bandwidth_efficiency": 1.0,
                "kernel_launch_s": measure_launch_s(dev), "reserved_bytes": reserved, **host_issue,
                "shares_host_cores": dev.type == "cpu",
                "lanes": lanes, "lane_factor": lane_factor},
        "link": {"name": "measured", **paths, "duplex_factor": link["duplex_factor"],
                 "disk_read_bytes_per_s": disk_bw},
        "host": {"name": cpu_model(), "memory_bytes": ram, "cores": os.cpu_count() or 1,
                 "matmul_flops_per_s": host_flops, "memory_bandwidth_bytes_per_s": host_bw,
                 "attention_efficiency": 1.0, "pinned_fraction": 0.9},
        "kernels": kernels,
    }
    return HardwareProfile.from_dict(d, "specplan profile")
