"""Profiler: the fit, a measured profile's round trip, and its use by planner and simulator."""

import numpy as np
import pytest

from specplan.hardware import load_profile
from specplan.hwprofiles.profiler import Grid, fit_latency_bandwidth, profile_machine
from specplan.models import ModelSpec

TINY_GRID = Grid(link_bytes=(64 * 1024, 1 << 20, 4 << 20), ffn_tokens=(1, 8, 32), attn_rows=(1, 4), attn_q=(1, 2),
                 attn_ctx=(16, 64), step_rows=(1, 4), step_ctx=(16, 64), repeat=2, gemm_n=256)


@pytest.mark.parametrize("lat,bw", [(10e-6, 25e9), (0.0, 12.5e9), (2e-3, 1e9)])
def test_fit_recovers_latency_and_bandwidth(lat, bw):
    sizes = [64 * 1024 * 4**i for i in range(8)]
    t = [lat + s / bw for s in sizes]
    got_lat, got_bw, err = fit_latency_bandwidth(sizes, t)
    assert got_lat == pytest.approx(lat, abs=1e-9)
    assert got_bw == pytest.approx(bw, rel=1e-6)
    assert err < 1e-6


def test_fit_with_noise_stays_close():
    rng = np.random.default_rng(0)
    sizes = [64 * 1024 * 4**i for i in range(8)]
    t = [(8e-6 + s / 20e9) * (1 + rng.normal(0, 0.01)) for s in sizes]
    lat, bw, err = fit_latency_bandwidth(sizes, t)
    assert bw == pytest.approx(20e9, rel=0.03)
    assert lat == pytest.approx(8e-6, rel=0.3)
    assert 0 < err < 0.05


@pytest.fixture(scope="module")
def measured(monkeypatch_module=None):
    import specplan.hwprofiles.profiler as prof

    old = prof.QUICK
    prof.QUICK = TINY_GRID
    try:
        return profile_machine([ModelSpec.from_preset("tiny-mixtral"), ModelSpec.from_preset("tiny-draft")],
                               quick=True, device="cpu", gpu_memory_bytes=2e9, name="test-cpu")
    finally:
        prof.QUICK = old


def test_measured_profile_is_valid_and_round_trips(measured, tmp_path):
    assert measured.provenance.kind == "measured"
    assert measured.provenance.torch_version and measured.provenance.cpu_model
    assert measured.gpu.memory_bytes == 2e9
    for path in ("h2d_pinned", "h2d_pageable", "d2h_pinned", "d2h_pageable"):
        p = getattr(measured.link, path)
        assert p.bytes_per_s > 0 and p.fit_rel_error is not None
    assert any(op.startswith("gpu_ffn:h64:f96") for op in measured.kernels)
    assert any(op.startswith("gpu_step:tiny-draft") for op in measured.kernels)
    path = measured.save(tmp_path / "p.json")
    again = load_profile(path)
    assert again.to_dict() == measured.to_dict()


def test_planner_and_simulator_use_measured_profile(measured):
    from specplan.cost import ffn_op_name, ffn_time_s
    from specplan.planner.optimize import optimize
    from specplan.workload import Workload

    t, d = ModelSpec.from_preset("tiny-mixtral"), ModelSpec.from_preset("tiny-draft")
    # a measured table is what the cost model returns at a measured point
    table = measured.kernel(ffn_op_name(t, "gpu"))
    assert table is not None
    one_expert_tokens = 8  # 16 tokens, top-2 of 4 experts, all 4 touched: 8 tokens each
    assert ffn_time_s(measured, t, 16) == pytest.approx(4 * table(one_expert_tokens), rel=0.02)
    res = optimize(t, d, measured, Workload.make(prompt_len=16, gen_len=8, num_prompts=8))
    assert res.best.tok_s > 0
