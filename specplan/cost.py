"""Cost primitives: the one source of truth for every formula the planner, the simulator
and the runtime's report use. Times in seconds, sizes in bytes, rates per second.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from .hardware import CopyPath, HardwareProfile
from .models import ModelSpec

if TYPE_CHECKING:
    import numpy as np

LOGITS_CHUNK_TOKENS = 1024  # the runtime computes the LM head over at most this many tokens at once
# The runtime runs a layer over at most this many tokens at a time (prefill chunks are
# sliced), which bounds activation memory without changing the bytes streamed per pass.
ACTIVATION_SLICE_TOKENS = 4096
ACTIVATION_TOKEN_OVERHEAD_BYTES = 16  # per token: positions, fp32 norm statistics, routing weights
MASK_HOLD_BYTES = 1 << 20  # a row group's attention mask up to this size is built once a pass and held (runtime.model)

# ---- speculative decoding --------------------------------------------------------------


def expected_accepted_tokens(alpha: float, gamma: int) -> float:
    """Expected tokens a row gains per verification round with gamma drafted tokens and
    per-token acceptance alpha, counting the target's own correction/bonus token:
    E = (1 - alpha^(gamma+1)) / (1 - alpha)   (Leviathan et al., 2023)."""
    if gamma < 0 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"need gamma >= 0 and alpha in [0, 1], got gamma={gamma}, alpha={alpha}")
    if alpha == 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def expected_accepted_tokens_table(rates: Sequence[float]) -> float:
    """Same as above with position-dependent acceptance a_1..a_gamma (each conditional on the
    earlier ones): E = 1 + sum_i prod_{j<=i} a_j. Equals the closed form when all a_j = alpha."""
    total, survive = 1.0, 1.0
    for a in rates:
        survive *= a
        total += survive
    return total


def acceptance_for_tokens_per_round(tokens_per_round: float, gamma: int) -> float:
    """The per-token acceptance alpha whose expected_accepted_tokens(alpha, gamma) is the
    measured tokens per round, by bisection: the rate the simulator and planner take. (The
    fraction of drafted tokens accepted is another thing: about (E - 1) / gamma.)"""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_accepted_tokens(mid, gamma) < tokens_per_round else (lo, mid)
    return (lo + hi) / 2


def max_acceptance_spread(mean: float) -> float:
    """The largest spread between rows a Beta distribution with this mean allows, less 1%."""
    return 0.99 * max(mean * (1.0 - mean), 0.0) ** 0.5


def row_acceptance_stats(rounds: Sequence[int], accepted: Sequence[int], gamma: int) -> tuple[float, float]:
    """How per-token acceptance differed between a run's rows: (mean, spread) of each row's own
    alpha (E(alpha, gamma) inverted from its tokens per round). The spread is their standard
    deviation less the part a row's finite number of rounds alone would give (method of
    moments: observed variance minus the mean sampling variance of one row's estimate, by the
    delta method; cut at 0, so rows alike still read slightly above 0). Rows never verified
    are skipped; the spread is capped by max_acceptance_spread. The mean is the rows' own,
    not the pooled rate: slow rows take more rounds and pull a pooled rate down."""
    alphas, noise = [], []
    for r, a in zip(rounds, accepted):
        if r <= 0:
            continue
        alpha = acceptance_for_tokens_per_round(1.0 + a / r, gamma)
        pmf = tokens_per_round_pmf((alpha,) * gamma)
        mean_j = sum(p * j for j, p in enumerate(pmf, start=1))
        var_j = sum(p * j * j for j, p in enumerate(pmf, start=1)) - mean_j ** 2
        lo, hi = max(alpha - 1e-4, 0.0), min(alpha + 1e-4, 1.0)
        slope = (expected_accepted_tokens(hi, gamma) - expected_accepted_tokens(lo, gamma)) / (hi - lo)
        alphas.append(alpha)
        noise.append(var_j / r / slope ** 2)
    if not alphas:
        return 0.0, 0.0
    mean = sum(alphas) / len(alphas)
    if len(alphas) < 2:
        return mean, 0.0
    observed = sum((x - mean) ** 2 for x in alphas) / len(alphas)
    spread = max(observed - sum(noise) / len(noise), 0.0) ** 0.5
    return mean, min(spread, max_acceptance_spread(mean))


ROW_ACCEPTANCE_POINTS = 16  # equal-probability points standing for the rows' acceptance distribution


def row_acceptance_factors(mean: float, spread: float, n: int, rng=None) -> "np.ndarray":
    """Per-row multipliers of the per-token acceptance: each row's own rate u_r, drawn from a
    Beta distribution with this mean and standard deviation, over the mean (so a row's rates
    are a_i u_r / mean, capped at 1). With `rng`, n random draws (the simulator's rows); without,
    the n equal-probability quantiles (the planner's expectation over rows). All 1 when spread is 0."""
    import numpy as np

    if spread <= 0.0:
        return np.ones(n)
    kappa = mean * (1.0 - mean) / (spread * spread) - 1.0  # Beta(a, b) with a + b = kappa
    if not (0.0 < mean < 1.0 and kappa > 0.0):
        raise ValueError(f"no Beta distribution has mean {mean} and standard deviation {spread}")
    a, b = mean * kappa, (1.0 - mean) * kappa
    if rng is not None:
        u = rng.beta(a, b, size=n)
    else:
        from scipy.stats import beta

        u = beta.ppf((np.arange(n) + 0.5) / n, a, b)
    return u / mean


def tokens_per_round_pmf(rates: Sequence[float]) -> list[float]:
    """P(a row gains j tokens in one round), j = 1..gamma+1: j-1 drafts accepted, then the
    target's own token (a correction, or the bonus when all gamma were accepted)."""
    pmf, survive = [], 1.0
    for a in rates:
        pmf.append(survive * (1.0 - a))
        survive *= a
    pmf.append(survive)
    return pmf


def expected_rounds_slowest_row(rates: Sequence[float], tokens: int, rows: int, spread: float = 0.0,
                                mean: float | None = None) -> float:
    """Expected verification rounds until the slowest of `rows` independent rows has gained
    `tokens` tokens: E[max_i N_i] = sum_n (1 - P(N <= n)^rows). A static batch runs until its
    slowest row is done. With `spread` > 0 each row has its own acceptance around `mean` (the
    workload's mean rate; the rates' mean if not given; see row_acceptance_factors), and
    P(N <= n) is the mixture over ROW_ACCEPTANCE_POINTS rows."""
    import numpy as np

    if tokens <= 0 or rows <= 0:
        return 0.0
    rates = tuple(float(a) for a in rates)
    mean = (sum(rates) / len(rates) if rates else 0.0) if mean is None else float(mean)
    cdf = _rows_cdf(rates, int(tokens), float(spread), mean)
    return float(np.sum(1.0 - cdf ** int(rows)))


def expected_verify_passes(policy: str, rates: Sequence[float], tokens: int, batch_rows: int, batches: int,
                           spread: float = 0.0, mean: float | None = None) -> tuple[float, float]:
    """(verification passes, mean live rows per pass) to give every row `tokens` tokens.
    spec-serial verifies each batch to its slowest row, one batch after another. specoffload
    alternates its two batches until the live rows fit in one batch (about when the mean row
    is done), then merges them, so one pass serves all that is left:
    passes = E[rounds of one row] + E[rounds of the slowest of all rows]."""
    return _expected_verify_passes(policy, tuple(float(a) for a in rates), int(tokens), int(batch_rows), int(batches),
                                   float(spread), None if mean is None else float(mean))


@lru_cache(maxsize=4096)  # the planner asks for the same few thousand times over
def _expected_verify_passes(policy: str, rates: tuple[float, ...], tokens: int, batch_rows: int, batches: int,
                            spread: float, mean: float | None) -> tuple[float, float]:
    one = expected_rounds_slowest_row(rates, tokens, 1, spread, mean)
    if policy == "specoffload" and batches == 2:
        passes = one + expected_rounds_slowest_row(rates, tokens, 2 * batch_rows, spread, mean)
    else:
        passes = batches * expected_rounds_slowest_row(rates, tokens, batch_rows, spread, mean)
    return passes, (batches * batch_rows * one / passes if passes else float(batch_rows))


@lru_cache(maxsize=1024)
def _rows_cdf(rates: tuple[float, ...], tokens: int, spread: float, mean: float) -> "np.ndarray":
    """P(a row picked at random is done within n rounds): one row's curve, or with a spread
    the mean of ROW_ACCEPTANCE_POINTS rows' curves at the Beta quantiles."""
    import numpy as np

    if not (spread > 0.0 and 0.0 < mean < 1.0):
        return _rounds_cdf(rates, tokens)
    factors = row_acceptance_factors(mean, spread, ROW_ACCEPTANCE_POINTS)
    curves = [_rounds_cdf(tuple(min(1.0, a * f) for a in rates), tokens) for f in factors]
    size = max(len(c) for c in curves)
    return np.mean([np.pad(c, (0, size - len(c)), constant_values=1.0) for c in curves], axis=0)


@lru_cache(maxsize=4096)
def _rounds_cdf(rates: tuple[float, ...], tokens: int) -> "np.ndarray":
    """P(one row has gained `tokens` tokens within n rounds), n = 0, 1, ... until it is ~1."""
    import numpy as np

    # gains of 0..gamma+1 tokens a round (0 never happens); the rows not done yet, by tokens
    # gained so far: each round convolves them with the gains, and what reaches `tokens` is done
    gains = np.concatenate(([0.0], tokens_per_round_pmf(rates)))
    live = np.zeros(tokens)
    live[0] = 1.0
    done = 0.0
    cdf = []
    while True:
        cdf.append(done)
        if 1.0 - done < 1e-15 or len(cdf) > 4 * tokens + 100:
            return np.asarray(cdf)
        nxt = np.convolve(live, gains)
        done += float(nxt[tokens:].sum())
        live = nxt[:tokens]


def memcpy_s(profile: HardwareProfile, nbytes: float, on_gpu: bool) -> float:
    """A copy within one memory, host or GPU: every byte read and written once."""
    if nbytes <= 0:
        return 0.0
    if on_gpu:
        return 2.0 * nbytes / (profile.gpu.memory_bandwidth_bytes_per_s * profile.gpu.bandwidth_efficiency)
    return 2.0 * nbytes / profile.host.memory_bandwidth_bytes_per_s


# ---- mixture of experts ----------------------------------------------------------------------


def expected_experts_touched(tokens: float, experts: int, top_k: int) -> float:
    """Expected number of distinct experts hit when `tokens` tokens each route to top_k of
    `experts` experts uniformly: n * (1 - (1 - k/n)^t)."""
    if experts <= 1:
        return float(experts)
    return experts * (1.0 - (1.0 - top_k / experts) ** max(tokens, 0.0))


# ---- data movement -----------------------------------------------------------------------------


def transfer_time_s(nbytes: float, path: CopyPath, *, duplex_factor: float = 1.0) -> float:
    """Copy time of one transfer: latency + bytes / bandwidth. `duplex_factor` < 1 when the
    opposite direction is busy at the same time."""
    if nbytes <= 0:
        return 0.0
    return path.latency_s + nbytes / (path.bytes_per_s * duplex_factor)


def h2d_time_s(profile: HardwareProfile, nbytes: float, *, pinned: bool = True) -> float:
    return transfer_time_s(nbytes, profile.link.path("h2d", pinned))


def d2h_time_s(profile: HardwareProfile, nbytes: float, *, pinned: bool = True) -> float:
    return transfer_time_s(nbytes, profile.link.path("d2h", pinned))


def disk_read_time_s(profile: HardwareProfile, nbytes: float) -> float:
    return nbytes / profile.link.disk_read_bytes_per_s if nbytes > 0 else 0.0


# ---- compute ------------------------------------------------------------------------------------


def roofline_time_s(flops: float, nbytes: float, flops_per_s: float, bytes_per_s: float) -> float:
    """Lower bound of a kernel's time: limited by compute or by memory traffic."""
    return max(flops / flops_per_s, nbytes / bytes_per_s)


def gpu_kernel_time_s(profile: HardwareProfile, flops: float, nbytes: float, dtype: str) -> float:
    g = profile.gpu
    return g.kernel_launch_s + roofline_time_s(
        flops, nbytes, g.flops_per_s(dtype) * g.matmul_efficiency, g.memory_bandwidth_bytes_per_s * g.bandwidth_efficiency)


def cpu_kernel_time_s(profile: HardwareProfile, flops: float, nbytes: float, dtype: str) -> float:
    h = profile.host
    return roofline_time_s(flops, nbytes, h.flops_per_s(dtype), h.memory_bandwidth_bytes_per_s * h.attention_efficiency)


def _table_or(profile: HardwareProfile, op: str, point: tuple[float, ...], fallback: float) -> float:
    table = profile.kernel(op)
    return table(*point) if table is not None else fallback


def ffn_op_name(model: ModelSpec, device: str) -> str:
    """Kernel-table key for one expert / dense MLP of this shape (the profiler writes the same key)."""
    return f"{device}_ffn:h{model.hidden}:f{model.ffn_inner}:{model.dtype}"


def attn_proj_op_name(model: ModelSpec, device: str) -> str:
    return f"{device}_attn_proj:h{model.hidden}:q{model.heads * model.head_dim}:kv{model.kv_heads * model.head_dim}:{model.dtype}"


def attention_op_name(model: ModelSpec, device: str) -> str:
    return f"{device}_attention:q{model.heads}:kv{model.kv_heads}:d{model.head_dim}:{model.dtype}"


def step_op_name(model: ModelSpec, device: str) -> str:
    """Kernel-table key for a resident model's whole decode step (rows x context)."""
    formats = ",".join(f"{g}={f}" for g, f in model.weights.to_dict().items())
    return f"{device}_step:{model.name}:L{model.layers}:h{model.hidden}:{model.dtype}" + (f":{formats}" if formats else "")


def dequant_op_name(model: ModelSpec, group: str, device: str) -> str:
    """Kernel-table key for turning a group's format into the compute dtype (the profiler
    writes the same key); its one axis is the weights dequantized."""
    return f"{device}_dequant:{model.fmt(group).name}:{model.dtype}"


def dequant_time_s(profile: HardwareProfile, model: ModelSpec, group: str, *, device: str = "gpu") -> float:
    """One use of a group's matrices dequantized into the scratch buffer, one call per matrix
    the runtime dequantizes (ModelSpec.dequant_shapes); 0 when the group is in the compute
    dtype. Without a measured table: a memory-bound kernel reading the codes and scales and
    writing the dtype."""
    fmt = model.fmt(group)
    kernel = gpu_kernel_time_s if device == "gpu" else cpu_kernel_time_s
    total = 0.0
    for rows, cols in model.dequant_shapes(group):  # one call each, as the runtime makes them
        params = rows * cols
        fallback = kernel(profile, 2.0 * params, fmt.matrix_bytes(rows, cols) + params * model.dtype_bytes, model.dtype)
        total += _table_or(profile, dequant_op_name(model, group, device), (params,), fallback)
    return total


def fused_op_name(model: ModelSpec, group: str, device: str) -> str:
    """Kernel-table key for a fused weight-only matmul of a group's format (the profiler writes
    the same key, only where the kernel runs and agrees with dequantization); its axes are
    the tokens multiplied and the weights."""
    return fused_key(model.fmt(group), model.dtype, device)


def fused_key(fmt, dtype: str, device: str) -> str:
    return f"{device}_fused:{fmt.name}:{dtype}"


def fused_time_s(profile: HardwareProfile, model: ModelSpec, group: str, tokens: float, *, device: str = "gpu") -> float:
    """One use of a group whose format is fused: each matrix's kernel call (ModelSpec.fused_shapes)
    for `tokens` tokens, reading the codes. Without a measured table (a format the planner
    only weighs where the profile has one): the roofline of the compressed bytes and the flops."""
    fmt = model.fmt(group)
    kernel = gpu_kernel_time_s if device == "gpu" else cpu_kernel_time_s
    total = 0.0
    for rows, cols in model.fused_shapes(group):
        params = rows * cols
        nbytes = fmt.matrix_bytes(rows, cols) + tokens * (rows + cols) * model.dtype_bytes
        table = profile.kernel(fused_op_name(model, group, device))
        if table is None:
            total += kernel(profile, 2.0 * params * tokens, nbytes, model.dtype)
            continue
        top = table.grid[0][-1]  # measured up to where a call is long enough to grow with its tokens
        total += table(min(tokens, top), params) * max(1.0, tokens / top)
    return total


def ffn_time_s(profile: HardwareProfile, model: ModelSpec, tokens: float, *, device: str = "gpu") -> float:
    """One layer's FFN for `tokens` tokens: dense MLP, or each touched expert over its share."""
    if tokens <= 0:
        return 0.0
    # the GEMM reads the weights in the compute dtype (a compressed expert is dequantized first)
    weight_bytes = model.expert_params * model.dtype_bytes
    if model.is_moe:
        touched = expected_experts_touched(tokens, model.experts, model.top_k)
        per_expert_tokens = tokens * model.top_k / touched
        one = _ffn_one(profile, model, per_expert_tokens, device, weight_bytes)
        return touched * one
    return _ffn_one(profile, model, tokens, device, weight_bytes)


def _ffn_one(profile: HardwareProfile, model: ModelSpec, tokens: float, device: str, weight_bytes: float) -> float:
    if model.fmt("experts").fused:  # the kernel reads the codes; the activation is small beside it
        return fused_time_s(profile, model, "experts", tokens, device=device)
    flops = 2.0 * model.expert_params * tokens
    act_bytes = tokens * (2 * model.hidden + 2 * model.ffn_inner) * model.dtype_bytes
    kernel = gpu_kernel_time_s if device == "gpu" else cpu_kernel_time_s
    fallback = kernel(profile, flops, weight_bytes + act_bytes, model.dtype)
    return _table_or(profile, ffn_op_name(model, device), (tokens,), fallback) + dequant_time_s(profile, model, "experts",
                                                                                              device=device)


def attn_proj_time_s(profile: HardwareProfile, model: ModelSpec, tokens: float, *, device: str = "gpu") -> float:
    """Q, K, V and O projections (plus router and norms, which are small) for `tokens` tokens."""
    if tokens <= 0:
        return 0.0
    if model.fmt("attention").fused:  # q|k|v and o through the kernel; router and norms are small
        return fused_time_s(profile, model, "attention", tokens, device=device)
    params = model.attention_params_per_layer + model.router_params_per_layer
    flops = 2.0 * params * tokens
    nbytes = params * model.dtype_bytes + tokens * 4 * model.hidden * model.dtype_bytes
    kernel = gpu_kernel_time_s if device == "gpu" else cpu_kernel_time_s
    return (_table_or(profile, attn_proj_op_name(model, device), (tokens,), kernel(profile, flops, nbytes, model.dtype))
            + dequant_time_s(profile, model, "attention", device=device))


def attention_time_s(profile: HardwareProfile, model: ModelSpec, rows: float, q_len: float, context: float,
                     *, device: str = "cpu") -> float:
    """Scaled dot-product attention of one layer: `rows` sequences, `q_len` new tokens each,
    attending to `context` cached tokens. Decode attention is bound by reading the KV cache."""
    if rows <= 0 or q_len <= 0:
        return 0.0
    flops = 4.0 * rows * q_len * context * model.heads * model.head_dim
    kv_bytes = rows * context * model.kv_bytes_per_token_per_layer
    io_bytes = kv_bytes + rows * q_len * 2 * model.heads * model.head_dim * model.dtype_bytes
    kernel = gpu_kernel_time_s if device == "gpu" else cpu_kernel_time_s
    fallback = kernel(profile, flops, io_bytes, model.dtype)
    return _table_or(profile, attention_op_name(model, device), (rows, q_len, context), fallback)


def head_op_name(model: ModelSpec, device: str) -> str:
    return f"{device}_head:h{model.hidden}:v{model.vocab}:{model.dtype}"


def lm_head_time_s(profile: HardwareProfile, model: ModelSpec, tokens: float, *, device: str = "gpu") -> float:
    if tokens <= 0:
        return 0.0
    params = model.vocab * model.hidden
    kernel = gpu_kernel_time_s if device == "gpu" else cpu_kernel_time_s
    fallback = kernel(profile, 2.0 * params * tokens, params * model.dtype_bytes, model.dtype)
    return (_table_or(profile, head_op_name(model, device), (tokens,), fallback)
            + dequant_time_s(profile, model, "lm_head", device=device))


def resident_step_time_s(profile: HardwareProfile, model: ModelSpec, rows: float, q_len: float, context: float) -> float:
    """One forward step of a model held entirely on the GPU (the draft): every layer's
    projections, attention against its GPU KV cache, FFN, then the LM head, and the host's
    issuing of it (host_issue_s). A measured whole-step table, when the profile has one, is
    used for single-token steps: it timed the runtime's own step, issuing included."""
    table = profile.kernel(step_op_name(model, "gpu"))
    if table is not None and q_len == 1:
        return table(rows, context)
    tokens = rows * q_len
    per_layer = (attn_proj_time_s(profile, model, tokens) + attention_time_s(profile, model, rows, q_len, context, device="gpu")
                 + ffn_time_s(profile, model, tokens))
    device_s = model.layers * per_layer + lm_head_time_s(profile, model, tokens)
    return device_s + host_issue_s(profile, device_s, model.layers * layer_host_s(profile, model, tokens)
                                   + profile.gpu.host_pass_s)


# ---- the host thread that issues the work --------------------------------------------------------


def layer_host_s(profile: HardwareProfile, model: ModelSpec, tokens: float) -> float:
    """Host seconds the runtime spends issuing one layer for one row group of `tokens` tokens:
    the layer's own calls, and an MoE layer's per expert it runs."""
    g = profile.gpu
    experts = expected_experts_touched(tokens, model.experts, model.top_k) if model.is_moe else 0.0
    return g.host_layer_s + experts * g.host_expert_s


def host_issue_s(profile: HardwareProfile, device_s: float, host_s: float) -> float:
    """What issuing `host_s` of work adds to its `device_s`: on a device that is the host's own
    cores, all of it (one thread issues and computes); on a GPU, the part the device work does
    not hide (the host runs ahead of the kernels it queued), so a host-bound step is predicted
    host-bound."""
    if profile.gpu.shares_host_cores:
        return host_s
    return max(0.0, host_s - device_s)


def copies_overlap_compute(profile: HardwareProfile) -> bool:
    """Whether a weight copy can run while the layer before it computes: on a GPU the copy
    engine does it; on a device that is the host's own cores the runtime's weight store
    copies on the thread that computes (runtime/weights.py), so a prefetch overlaps nothing
    and every copy sits between two layers' compute."""
    return not profile.gpu.shares_host_cores


def pool_pair_s(profile: HardwareProfile, a_s: float, b_s: float) -> float:
    """Two threads of work taking a_s and b_s alone, on a device that is a pool of host cores
    with a lane for each (gpu.lanes >= 2): at once, each at gpu.lane_factor of its speed while
    both run (as simulator.machine slows a use that starts beside another), never longer than
    one after the other. Otherwise one after the other."""
    g = profile.gpu
    if not (g.shares_host_cores and g.lanes >= 2):
        return a_s + b_s
    short, long_ = sorted((a_s, b_s))
    return min(short / g.lane_factor + (long_ - short), a_s + b_s)


# ---- comparing a prediction with a measurement ----------------------------------------------


def stage_total(stage_s: dict, stage: str) -> float:
    """A stage's seconds, decode and prefill ("prefill." prefix) together, from a report's or a
    simulation's stage_s."""
    return float(stage_s.get(stage) or 0.0) + float(stage_s.get(f"prefill.{stage}") or 0.0)


def error_pct(measured: float | None, predicted: float | None) -> float | None:
    """(predicted - measured) / measured in percent: positive = the prediction was optimistic
    about a rate, or pessimistic about a time. None when there is nothing to compare."""
    if measured in (None, 0) or predicted is None:
        return None
    return 100.0 * (predicted - measured) / measured


# ---- one target layer and one draft step, as the simulator and the planner see them -----------------


def stage_factor(profile: HardwareProfile, stage: str) -> float:
    """Multiplier `specplan calibrate` learned for a stage from measured runs (1 if none)."""
    return profile.calibration.get(stage, 1.0)


@dataclass(frozen=True)
class LayerCosts:
    """Seconds one target layer takes for `rows` rows of `q_len` new tokens at context `ctx`."""

    proj: float  # q/k/v/o projections (and router) on the GPU
    attention: float  # attention on its device
    attention_on_cpu: bool
    act_d2h: float  # Q/K/V to the CPU (CPU attention only)
    act_h2d: float  # attention output back
    kv_d2h: float  # prefill with a host KV cache: the chunk's K/V to the host
    ffn: float  # experts / MLP on the GPU
    host: float = 0.0  # what the host's issuing adds beyond the layer's device work (host_issue_s)


def sliced_dequant_s(profile: HardwareProfile, model: ModelSpec, rows: float, q_len: float) -> tuple[float, float]:
    """What a pass of more than ACTIVATION_SLICE_TOKENS tokens adds to a layer's projections and
    FFN: the runtime runs it in slices of whole rows, and each slice dequantizes the layer's
    compressed matrices again (each expert a slice routes to); attn_proj_time_s and ffn_time_s
    price one dequantization for the whole pass."""
    slices = math.ceil(rows / rows_per_slice(q_len)) if rows > 0 else 0
    if slices <= 1:
        return 0.0, 0.0
    proj = (slices - 1) * dequant_time_s(profile, model, "attention")
    tokens = rows * q_len
    calls = (slices * expected_experts_touched(tokens / slices, model.experts, model.top_k)
             - expected_experts_touched(tokens, model.experts, model.top_k)) if model.is_moe else slices - 1
    return proj, calls * dequant_time_s(profile, model, "experts")


def target_layer_costs(profile: HardwareProfile, model: ModelSpec, rows: float, q_len: float, ctx: float,
                       attention_device: str, prefill: bool = False) -> LayerCosts:
    tokens = rows * q_len
    extra_proj, extra_ffn = sliced_dequant_s(profile, model, rows, q_len)
    proj = (attn_proj_time_s(profile, model, tokens) + extra_proj) * stage_factor(profile, "target_proj")
    ffn = (ffn_time_s(profile, model, tokens) + extra_ffn) * stage_factor(profile, "target_ffn")
    att_factor = stage_factor(profile, "target_attention")
    issue = layer_host_s(profile, model, tokens)
    if prefill or attention_device == "gpu":  # prefill attention always runs next to the fresh K/V
        att = attention_time_s(profile, model, rows, q_len, ctx, device="gpu") * att_factor
        kv = d2h_time_s(profile, tokens * model.kv_bytes_per_token_per_layer) if prefill and attention_device == "cpu" else 0.0
        return LayerCosts(proj, att, False, 0.0, 0.0, kv, ffn, host_issue_s(profile, proj + att + ffn, issue))
    qkv = tokens * (model.heads + 2 * model.kv_heads) * model.head_dim * model.dtype_bytes
    out = tokens * model.heads * model.head_dim * model.dtype_bytes
    att = attention_time_s(profile, model, rows, q_len, ctx, device="cpu") * att_factor
    # CPU attention runs on the issuing thread itself, so only the GPU work hides issuing
    return LayerCosts(proj, att, True, d2h_time_s(profile, qkv) * att_factor, h2d_time_s(profile, out) * att_factor,
                      0.0, ffn, host_issue_s(profile, proj + ffn, issue))


def target_head_s(profile: HardwareProfile, model: ModelSpec, tokens: float) -> float:
    """The LM head of a target pass, and the pass's fixed host part (embedding, positions,
    choosing tokens: GpuSpec.host_pass_s), which is issued once per pass like the head."""
    head = lm_head_time_s(profile, model, tokens) * stage_factor(profile, "target_head")
    return head + host_issue_s(profile, head, profile.gpu.host_pass_s)


def draft_step_s(profile: HardwareProfile, model: ModelSpec, rows: float, q_len: float, context: float) -> float:
    return resident_step_time_s(profile, model, rows, q_len, context) * stage_factor(profile, "draft")


def weights_h2d_s(profile: HardwareProfile, pinned_bytes: float, pageable_bytes: float) -> float:
    """One streamed unit's copy: its pinned part and its pageable part."""
    return (h2d_time_s(profile, pinned_bytes, pinned=True) + h2d_time_s(profile, pageable_bytes, pinned=False)) \
        * stage_factor(profile, "h2d")


# ---- memory ----------------------------------------------------------------------------------------


def kv_cache_bytes(model: ModelSpec, rows: int, tokens: int) -> float:
    """KV cache preallocated for `rows` sequences of up to `tokens` tokens each."""
    return rows * tokens * model.kv_bytes_per_token


def rows_per_slice(q_len: float, max_tokens: int = ACTIVATION_SLICE_TOKENS) -> int:
    """Rows of q_len tokens in one slice of a pass: as many as fit in max_tokens, one at least
    (runtime.model.cut_rows cuts by this)."""
    return max(1, int(max_tokens // max(q_len, 1)))


def activation_slice_tokens(rows: float, q_len: float) -> float:
    """Tokens of the largest row slice a pass of `rows` rows is cut into."""
    return min(rows, rows_per_slice(q_len)) * q_len


def activation_bytes(model: ModelSpec, rows: float, q_len: float, context: float) -> float:
    """Peak device working set of one pass of `rows` rows with `q_len` new tokens each, keys
    up to `context` positions; the logits are counted apart (memory.logits_bytes).

    The runtime cuts the pass into row slices (activation_slice_tokens) and takes the slices
    through each layer in turn, so it holds every slice's hidden state and RoPE table, plus
    the working set of one slice at the larger of its two peaks, per token:
      attention: the layer input, its norm, the attention output (3 hidden), the packed Q/K/V
        (RoPE in place) and the query copy attending makes ((2 heads + 2 kv_heads) head_dim),
        and the boolean mask, repeated per query group and turned into an additive one by the
        GPU kernel: (3 g + 1) bytes per key, g = heads / kv_heads;
      FFN: the hidden state (the residual adds are in place), its norm, the down projection's
        output (3 hidden) and the fused gate|up output, two FFN-wide (runtime.model.swiglu works
        in place); for MoE the norm, the output accumulator and the gathered input of the
        expert at work instead (2 + share hidden, with the hidden state), the
        intermediates for that expert's share of the tokens only, the share taken as twice
        the uniform top_k / experts (routing is uneven);
      and ACTIVATION_TOKEN_OVERHEAD_BYTES of small tensors;
    and for the whole pass, what runtime.model.Geometry holds: each token's K/V write position
    and each row's length and number (int64), and the repeated boolean mask when it is at most
    MASK_HOLD_BYTES (a larger one is built per layer, as counted above).
    tests/test_memory_activations.py checks this against the live tensors of a forward."""
    b = model.dtype_bytes
    tokens = rows * q_len
    sliced = activation_slice_tokens(rows, q_len)
    h, d = model.hidden, model.head_dim
    g = model.heads // model.kv_heads
    small = ACTIVATION_TOKEN_OVERHEAD_BYTES
    attention = sliced * ((3 * h + 2 * (model.heads + model.kv_heads) * d) * b + (3 * g + 1) * context + small)
    if model.is_moe:
        share = min(1.0, 2.0 * model.top_k / model.experts)
        ffn = sliced * (((3 + share) * h + 2 * model.ffn_inner * share) * b + small)
    else:
        ffn = sliced * ((3 * h + 2 * model.ffn_inner) * b + small)
    # other slices' hidden states; RoPE cos/sin; where each token's K/V is written and each
    # row's cache length and row number, held for the pass (runtime.model.Geometry), int64
    held = (tokens - sliced) * h * b + tokens * 2 * d * b + (tokens + 2 * rows) * 8
    mask = tokens * g * context  # a group's boolean mask, held for the pass when it is small
    held += mask if mask <= MASK_HOLD_BYTES else 0
    return held + max(attention, ffn)
