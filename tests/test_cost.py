"""Cost primitives against closed forms and Monte-Carlo estimates."""

import dataclasses

import numpy as np
import pytest

from specplan import cost
from specplan.hardware import CopyPath, load_profile
from specplan.models import ModelSpec
from specplan.tables import KernelTable

TRIALS = 200_000


# ---- speculative decoding ---------------------------------------------------------------------


def _mc_accepted(alpha: float, gamma: int, trials: int = TRIALS, seed: int = 0) -> float:
    """Per-token Bernoulli(alpha) acceptance until the first rejection; accepted drafts + 1
    correction/bonus token, at most gamma + 1."""
    rng = np.random.default_rng(seed)
    accept = rng.random((trials, gamma)) < alpha
    # number of leading accepted drafts = index of the first rejection (gamma if none)
    first_reject = np.where(accept.all(axis=1), gamma, np.argmin(accept, axis=1))
    return float(np.mean(np.minimum(first_reject + 1, gamma + 1)))


def _closed_form(alpha, gamma):
    return sum(alpha**i for i in range(gamma + 1))


@pytest.mark.parametrize("alpha,gamma", [(0.0, 4), (0.3, 1), (0.5, 3), (0.7, 6), (0.8, 4), (0.9, 8), (0.95, 16), (1.0, 5)])
def test_expected_accepted_tokens_closed_form_and_monte_carlo(alpha, gamma):
    e = cost.expected_accepted_tokens(alpha, gamma)
    assert e == pytest.approx(_closed_form(alpha, gamma), rel=1e-12)
    assert e == pytest.approx(_mc_accepted(alpha, gamma), rel=0.01)
    assert e == pytest.approx(cost.expected_accepted_tokens_table((alpha,) * gamma), rel=1e-12)  # the other form


def test_expected_accepted_tokens_edges():
    assert cost.expected_accepted_tokens(0.0, 7) == 1.0
    assert cost.expected_accepted_tokens(1.0, 7) == 8.0
    assert cost.expected_accepted_tokens(0.6, 0) == 1.0
    # increasing in alpha and in gamma
    assert cost.expected_accepted_tokens(0.6, 4) < cost.expected_accepted_tokens(0.7, 4)
    assert cost.expected_accepted_tokens(0.7, 4) < cost.expected_accepted_tokens(0.7, 5)
    for bad in [(-0.1, 3), (1.1, 3), (0.5, -1)]:
        with pytest.raises(ValueError):
            cost.expected_accepted_tokens(*bad)


def test_expected_accepted_tokens_not_the_wrong_formula():
    alpha, gamma = 0.7, 6
    e = cost.expected_accepted_tokens(alpha, gamma)
    wrong = e - gamma * alpha ** (gamma + 1)
    assert abs(e - wrong) > 0.1
    assert e == pytest.approx(_mc_accepted(alpha, gamma, seed=1), rel=0.01)
    assert wrong != pytest.approx(_mc_accepted(alpha, gamma, seed=1), rel=0.01)


@pytest.mark.parametrize("alpha,gamma", [(0.0, 3), (0.55, 1), (0.7, 6), (0.9, 10), (1.0, 4)])
def test_table_with_equal_rates_equals_closed_form(alpha, gamma):
    assert cost.expected_accepted_tokens_table([alpha] * gamma) == pytest.approx(
        cost.expected_accepted_tokens(alpha, gamma), rel=1e-12)


def test_table_with_decreasing_rates_below_closed_form_at_first_rate():
    rates = [0.9, 0.8, 0.7, 0.6, 0.5]
    e = cost.expected_accepted_tokens_table(rates)
    assert e < cost.expected_accepted_tokens(rates[0], len(rates))
    assert e > cost.expected_accepted_tokens(rates[-1], len(rates))
    # explicit: 1 + .9 + .9*.8 + .9*.8*.7 + ...
    assert e == pytest.approx(1 + 0.9 + 0.72 + 0.504 + 0.3024 + 0.1512)
    assert cost.expected_accepted_tokens_table([]) == 1.0


def test_table_matches_monte_carlo():
    rates = np.array([0.9, 0.75, 0.6, 0.5])
    rng = np.random.default_rng(3)
    accept = rng.random((TRIALS, len(rates))) < rates
    lead = np.where(accept.all(axis=1), len(rates), np.argmin(accept, axis=1))
    assert cost.expected_accepted_tokens_table(rates.tolist()) == pytest.approx(np.mean(lead + 1), rel=0.01)


# ---- MoE --------------------------------------------------------------------------------------


def _mc_experts(tokens: int, experts: int, top_k: int, trials: int = 20_000, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    # each token picks top_k distinct experts uniformly: the first top_k of a random permutation
    picks = np.argsort(rng.random((trials, tokens, experts)), axis=2)[:, :, :top_k]
    hit = np.zeros((trials, experts), dtype=bool)
    hit[np.arange(trials)[:, None], picks.reshape(trials, -1)] = True
    return float(hit.sum(axis=1).mean())


@pytest.mark.parametrize("tokens,experts,top_k", [(1, 8, 2), (4, 8, 2), (64, 8, 2), (3, 8, 1), (2, 16, 4)])
def test_expected_experts_touched_monte_carlo(tokens, experts, top_k):
    e = cost.expected_experts_touched(tokens, experts, top_k)
    assert e == pytest.approx(_mc_experts(tokens, experts, top_k), rel=0.02)


def test_expected_experts_touched_limits():
    assert cost.expected_experts_touched(1, 8, 2) == pytest.approx(2.0)
    assert cost.expected_experts_touched(512, 8, 2) == pytest.approx(8.0, abs=1e-6)
    assert cost.expected_experts_touched(0, 8, 2) == 0.0
    assert cost.expected_experts_touched(10, 1, 1) == 1.0
    vals = [cost.expected_experts_touched(t, 8, 2) for t in range(0, 40)]
    assert all(b > a for a, b in zip(vals, vals[1:]))
    assert max(vals) <= 8


# ---- transfers --------------------------------------------------------------------------------


def test_transfer_time():
    p = CopyPath(latency_s=1e-5, bytes_per_s=25e9)
    assert cost.transfer_time_s(1e9, p) == pytest.approx(1e-5 + 0.04)
    assert cost.transfer_time_s(0, p) == 0.0
    assert cost.transfer_time_s(-5, p) == 0.0
    assert cost.transfer_time_s(1, p) > 1e-5
    slow = cost.transfer_time_s(1e9, p, duplex_factor=0.8)
    assert slow > cost.transfer_time_s(1e9, p)
    assert slow == pytest.approx(1e-5 + 1e9 / (25e9 * 0.8))


def test_profile_transfer_helpers():
    prof = load_profile("rtx4090")
    link = prof.link
    assert cost.h2d_time_s(prof, 2.82e9) == pytest.approx(link.h2d_pinned.latency_s + 2.82e9 / link.h2d_pinned.bytes_per_s)
    assert cost.h2d_time_s(prof, 1e9, pinned=False) > cost.h2d_time_s(prof, 1e9)
    assert cost.d2h_time_s(prof, 1e9) == pytest.approx(link.d2h_pinned.latency_s + 1e9 / link.d2h_pinned.bytes_per_s)
    assert cost.disk_read_time_s(prof, 6e9) == pytest.approx(1.0)
    assert cost.disk_read_time_s(prof, 0) == 0.0
    # PCIe 3 is slower than PCIe 4
    assert cost.h2d_time_s(load_profile("rtx4090", pcie=3), 1e9) > cost.h2d_time_s(prof, 1e9)


# ---- compute ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prof():
    return load_profile("rtx4090")


@pytest.fixture(scope="module", params=["mixtral-8x7b", "mistral-7b-v0.2", "qwen2.5-7b"])
def model(request):
    return ModelSpec.from_preset(request.param)


TOKENS = [0, 0.5, 1, 2, 3, 4, 7, 8, 16, 31, 64, 100, 256, 512, 1000, 2048, 8192]
CONTEXTS = [0, 1, 16, 128, 512, 1024, 4096, 16384, 32768]


def _non_decreasing(xs):
    return all(b >= a for a, b in zip(xs, xs[1:]))


@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_ffn_time_non_decreasing_in_tokens(prof, model, device):
    ts = [cost.ffn_time_s(prof, model, t, device=device) for t in TOKENS]
    assert ts[0] == 0.0
    assert _non_decreasing(ts), ts
    assert ts[-1] > ts[2] > 0


@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_attention_time_non_decreasing_in_context(prof, model, device):
    ts = [cost.attention_time_s(prof, model, 8, 4, c, device=device) for c in CONTEXTS]
    assert _non_decreasing(ts), ts
    assert ts[-1] > ts[1]
    assert cost.attention_time_s(prof, model, 0, 4, 1024) == 0.0
    assert cost.attention_time_s(prof, model, 8, 0, 1024) == 0.0


def test_attention_time_non_decreasing_in_rows_and_q_len(prof, model):
    rows = [cost.attention_time_s(prof, model, r, 1, 1024) for r in (1, 2, 8, 64, 256)]
    q = [cost.attention_time_s(prof, model, 8, ql, 1024) for ql in (1, 2, 8, 64)]
    assert _non_decreasing(rows) and _non_decreasing(q)


def test_decode_attention_is_kv_read_bound_on_cpu(prof):
    m = ModelSpec.from_preset("mixtral-8x7b")
    rows, ctx = 64, 4096
    t = cost.attention_time_s(prof, m, rows, 1, ctx, device="cpu")
    kv = rows * ctx * m.kv_bytes_per_token_per_layer
    bw = prof.host.memory_bandwidth_bytes_per_s * prof.host.attention_efficiency
    assert t >= kv / bw
    assert t == pytest.approx(kv / bw, rel=0.01)


def test_doubling_gpu_bandwidth_never_slower(prof, model):
    fast = dataclasses.replace(prof, gpu=dataclasses.replace(
        prof.gpu, memory_bandwidth_bytes_per_s=2 * prof.gpu.memory_bandwidth_bytes_per_s))
    for t in TOKENS:
        assert cost.ffn_time_s(fast, model, t) <= cost.ffn_time_s(prof, model, t)
        assert cost.attn_proj_time_s(fast, model, t) <= cost.attn_proj_time_s(prof, model, t)
    for c in CONTEXTS:
        assert cost.attention_time_s(fast, model, 8, 1, c, device="gpu") <= cost.attention_time_s(prof, model, 8, 1, c, device="gpu")
        # CPU attention does not depend on the GPU
        assert cost.attention_time_s(fast, model, 8, 1, c) == cost.attention_time_s(prof, model, 8, 1, c)
    # decode (one token) FFN is bandwidth bound: strictly faster
    assert cost.ffn_time_s(fast, model, 1) < cost.ffn_time_s(prof, model, 1)


def test_single_token_dense_ffn_reads_all_weights(prof):
    m = ModelSpec.from_preset("mistral-7b-v0.2")
    g = prof.gpu
    t = cost.ffn_time_s(prof, m, 1)
    lower = m.layer_bytes.expert / (g.memory_bandwidth_bytes_per_s * g.bandwidth_efficiency)
    assert t >= lower
    assert t == pytest.approx(lower + g.kernel_launch_s, rel=0.01)


def test_moe_ffn_one_token_reads_top_k_experts(prof):
    m = ModelSpec.from_preset("mixtral-8x7b")
    one_expert = cost.ffn_time_s(prof, dataclasses.replace(m, experts=1, top_k=1), 1)
    assert cost.ffn_time_s(prof, m, 1) == pytest.approx(2 * one_expert, rel=0.01)
    # many tokens touch all 8 experts
    big = cost.ffn_time_s(prof, m, 4096)
    assert big >= 8 * m.layer_bytes.expert / prof.gpu.memory_bandwidth_bytes_per_s


def test_kernel_table_takes_precedence(prof):
    m = ModelSpec.from_preset("mistral-7b-v0.2")
    op = cost.ffn_op_name(m, "gpu")
    table = KernelTable.from_dict(op, {"axes": ["tokens"], "grid": [[1, 1024]], "seconds": [1e-3, 2e-3]}, "t")
    measured = dataclasses.replace(prof, kernels={op: table})
    assert cost.ffn_time_s(measured, m, 1) == pytest.approx(1e-3)
    assert cost.ffn_time_s(measured, m, 1024) == pytest.approx(2e-3)
    assert cost.ffn_time_s(measured, m, 1) != pytest.approx(cost.ffn_time_s(prof, m, 1))


def test_resident_step_time_positive_and_grows(prof):
    m = ModelSpec.from_preset("llama-3.2-1b")
    a = cost.resident_step_time_s(prof, m, 1, 1, 128)
    b = cost.resident_step_time_s(prof, m, 8, 5, 2048)
    assert 0 < a < b


# ---- memory ----------------------------------------------------------------------------------------


def test_kv_cache_bytes():
    m = ModelSpec.from_preset("mixtral-8x7b")
    assert cost.kv_cache_bytes(m, 256, 640) == 256 * 640 * 131072
    assert cost.kv_cache_bytes(m.with_dtype("float32"), 256, 640) == 256 * 640 * 131072 * 2


def test_activation_bytes_grows_with_tokens():
    m = ModelSpec.from_preset("mixtral-8x7b")
    vals = [cost.activation_bytes(m, rows, 8, 512) for rows in (1, 16, 1024, 4096)]
    assert _non_decreasing(vals) and vals[0] > 0


@pytest.mark.parametrize("gamma", [1, 4, 8])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.7, 0.95])
def test_acceptance_for_tokens_per_round_inverts_e(alpha, gamma):
    e = cost.expected_accepted_tokens(alpha, gamma)
    assert cost.acceptance_for_tokens_per_round(e, gamma) == pytest.approx(alpha, abs=1e-9)
    # not the accepted fraction of drafted tokens, which is (E - 1) / gamma: 0.443 for 0.7 at gamma 4
    if gamma > 1 and 0 < alpha < 1:
        assert (e - 1) / gamma < alpha


def test_row_acceptance_factors_have_the_mean_and_spread():
    q = cost.row_acceptance_factors(0.6, 0.15, 400)  # quantiles
    d = cost.row_acceptance_factors(0.6, 0.15, 20000, np.random.default_rng(0))  # draws
    for u in (q * 0.6, d * 0.6):
        assert u.mean() == pytest.approx(0.6, abs=0.005)
        assert u.std() == pytest.approx(0.15, rel=0.03)
        assert 0.0 < u.min() and u.max() < 1.0
    assert list(cost.row_acceptance_factors(0.6, 0.0, 3)) == [1.0, 1.0, 1.0]


def test_slowest_row_needs_more_rounds_when_rows_differ():
    rates = (0.7,) * 4
    alike = cost.expected_rounds_slowest_row(rates, 127, 256)
    assert cost.expected_rounds_slowest_row(rates, 127, 256, 0.0) == alike
    more = [cost.expected_rounds_slowest_row(rates, 127, 256, s) for s in (0.05, 0.1, 0.2)]
    assert alike < more[0] < more[1] < more[2]
    # one row alone, on average: barely moved by the spread (E is nearly linear in alpha here)
    one = cost.expected_rounds_slowest_row(rates, 127, 1)
    assert cost.expected_rounds_slowest_row(rates, 127, 1, 0.1) == pytest.approx(one, rel=0.05)


@pytest.mark.parametrize("true", [0.0, 0.1, 0.2])
def test_row_acceptance_stats_recover_the_rows_own_spread(true):
    """Rows with their own alpha (mean 0.6, sd `true`), 40 rounds each: the estimate removes
    what 40 rounds of chance alone add, so rows alike give ~0, not the sampling noise (~0.07)."""
    rng = np.random.default_rng(0)
    gamma, estimates = 3, []
    for _ in range(10):
        alphas = np.clip(0.6 + true * rng.standard_normal(64), 0.01, 0.99)
        accepted = [int(np.cumprod(rng.random((40, gamma)) < a, axis=1).sum()) for a in alphas]
        mean, spread = cost.row_acceptance_stats([40] * 64, accepted, gamma)
        estimates.append(spread)
        assert mean == pytest.approx(np.mean(alphas), abs=0.03)
    assert np.mean(estimates) == pytest.approx(true, abs=0.02)
    assert cost.row_acceptance_stats([5, 0], [3, 0], gamma)[1] == 0.0  # one verified row: no spread


def test_planner_spreads_around_the_workloads_mean_not_the_padded_tables():
    """A table shorter than gamma is padded with its last rate; the spread is about the
    workload's mean, and an impossible Beta is refused rather than read as 'accept all'."""
    rates = (0.95, 0.5, 0.5, 0.5)  # acceptance [0.95, 0.5] at gamma 4
    with_mean = cost.expected_rounds_slowest_row(rates, 63, 64, 0.3, mean=0.725)
    alike = cost.expected_rounds_slowest_row(rates, 63, 64)
    assert with_mean > alike
    with pytest.raises(ValueError, match="no Beta"):
        cost.row_acceptance_factors(0.95, 0.4, 4)


def test_expected_verify_passes_per_policy():
    """spec-serial: each batch to its slowest row; specoffload: alternate until the live rows
    fit in one batch (about the mean row's rounds), then one pass for what is left."""
    rates, tokens, b = (0.7,) * 4, 63, 32
    one = cost.expected_rounds_slowest_row(rates, tokens, 1)
    serial, live_s = cost.expected_verify_passes("spec-serial", rates, tokens, b, 2)
    assert serial == pytest.approx(2 * cost.expected_rounds_slowest_row(rates, tokens, b))
    merged, live_m = cost.expected_verify_passes("specoffload", rates, tokens, b, 2)
    assert merged == pytest.approx(one + cost.expected_rounds_slowest_row(rates, tokens, 2 * b))
    assert merged < serial
    for passes, live in ((serial, live_s), (merged, live_m)):  # row-rounds are the same either way
        assert passes * live == pytest.approx(2 * b * one)
