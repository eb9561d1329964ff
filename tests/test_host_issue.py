"""The host thread that issues the runtime's work: measured by the profiler on the runtime's own
code, charged by the cost model (all of it on a device that is the host's cores, what the device
work does not hide on a GPU), and, on such a device, "GPU" and "CPU" work queue on one pool."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import toy_profile_dict
from specplan import cost
from specplan.errors import InputError
from specplan.hardware import HardwareProfile
from specplan.models import ModelSpec
from specplan.plan import Schedule
from specplan.workload import Workload


def _profile(**gpu) -> HardwareProfile:
    return HardwareProfile.from_dict(toy_profile_dict(**gpu), "toy")


MODEL = ModelSpec.from_preset("tiny-llama")
MOE = ModelSpec.from_preset("tiny-mixtral")


def test_a_profile_without_host_fields_predicts_as_before():
    bare, zero = _profile(), _profile(host_layer_s=0.0, host_pass_s=0.0, host_expert_s=0.0)
    for device in ("cpu", "gpu"):
        assert cost.target_layer_costs(bare, MODEL, 8, 1, 64, device) == cost.target_layer_costs(zero, MODEL, 8, 1, 64, device)
        assert cost.target_layer_costs(bare, MODEL, 8, 1, 64, device).host == 0.0
    assert cost.draft_step_s(bare, MODEL, 8, 1, 64) == cost.draft_step_s(zero, MODEL, 8, 1, 64)


def test_shared_cores_charge_all_issuing_and_a_gpu_only_what_its_kernels_do_not_hide():
    shared = _profile(host_layer_s=1e-3, host_pass_s=2e-3, shares_host_cores=True)
    gpu = _profile(host_layer_s=1e-3, host_pass_s=2e-3)
    c = cost.target_layer_costs(shared, MODEL, 8, 1, 64, "gpu")
    assert c.host == pytest.approx(1e-3)
    g = cost.target_layer_costs(gpu, MODEL, 8, 1, 64, "gpu")
    assert g.host == pytest.approx(max(0.0, 1e-3 - (g.proj + g.attention + g.ffn)))
    big = cost.target_layer_costs(gpu, MODEL, 1 << 16, 1, 64, "gpu")  # kernels long enough to hide the issuing
    assert big.proj + big.ffn > 1e-3 and big.host == 0.0
    # CPU attention runs on the issuing thread: only the GPU's own work hides issuing
    a = cost.target_layer_costs(gpu, MODEL, 8, 1, 64, "cpu")
    assert a.host == pytest.approx(max(0.0, 1e-3 - (a.proj + a.ffn)))
    # the head carries the pass's fixed part once
    assert cost.target_head_s(shared, MODEL, 8) == pytest.approx(cost.target_head_s(_profile(), MODEL, 8) + 2e-3)


def test_moe_layers_pay_issuing_per_expert_they_run():
    p = _profile(host_layer_s=1e-4, host_expert_s=1e-4, shares_host_cores=True)
    one = cost.target_layer_costs(p, MOE, 1, 1, 16, "gpu").host
    many = cost.target_layer_costs(p, MOE, 256, 1, 16, "gpu").host
    assert one == pytest.approx(1e-4 + MOE.top_k * 1e-4, rel=0.01)
    assert many == pytest.approx(1e-4 + MOE.experts * 1e-4, rel=0.01)


def test_a_draft_step_without_a_measured_table_pays_its_issuing():
    shared = _profile(host_layer_s=1e-3, host_pass_s=2e-3, shares_host_cores=True)
    base = cost.draft_step_s(_profile(), MODEL, 4, 1, 32)
    assert cost.draft_step_s(shared, MODEL, 4, 1, 32) == pytest.approx(base + MODEL.layers * 1e-3 + 2e-3)


def test_host_fields_are_checked():
    with pytest.raises(InputError, match="gpu.shares_host_cores"):
        _profile(shares_host_cores="yes")
    with pytest.raises(InputError, match="gpu.host_layer_s"):
        _profile(host_layer_s=-1.0)
    with pytest.raises(InputError, match="gpu.host_layer_s"):
        _profile(host_layer_s=5.0)  # not plausible: a second and more a layer
    with pytest.raises(InputError, match="gpu.lanes"):
        _profile(lanes=0)
    with pytest.raises(InputError, match="gpu.lane_factor"):
        _profile(lane_factor=1.5)
    p = _profile(host_layer_s=1e-4, shares_host_cores=True)
    again = HardwareProfile.from_dict(p.to_dict(), "round trip")
    assert again.gpu == p.gpu


def test_on_shared_cores_cpu_attention_and_the_draft_queue_on_the_same_pool():
    """specoffload's draft (on the "GPU") and the verifying batch's CPU attention overlap in
    the simulator on a GPU machine, and cannot when both are the host's cores."""
    from specplan.simulator.cli import default_placement
    from specplan.simulator.run import SimConfig, simulate

    sch = Schedule("specoffload", 8, 2, 8, 8, 3, "cpu", 1).validate()
    wl = Workload.make(32, 16, 16, 0.7)
    apart = _profile(memory_bandwidth_bytes_per_s=1e10)
    shared = _profile(memory_bandwidth_bytes_per_s=1e10, shares_host_cores=True)
    two_lanes = _profile(memory_bandwidth_bytes_per_s=1e10, shares_host_cores=True, lanes=2)
    pl = default_placement(MODEL, MODEL, sch, wl, apart)
    t_apart = simulate(SimConfig(MODEL, MODEL, apart, wl, sch, pl), seed=0)
    t_shared = simulate(SimConfig(MODEL, MODEL, shared, wl, sch, pl), seed=0)
    t_two = simulate(SimConfig(MODEL, MODEL, two_lanes, wl, sch, pl), seed=0)
    assert t_shared.throughput_tok_s < t_apart.throughput_tok_s
    # two lanes (two cores, one torch thread each): the draft's thread runs beside the target's
    assert t_two.throughput_tok_s > t_shared.throughput_tok_s
    # lanes that slow each other while both are busy land in between
    slowed = _profile(memory_bandwidth_bytes_per_s=1e10, shares_host_cores=True, lanes=2, lane_factor=0.6)
    t_slowed = simulate(SimConfig(MODEL, MODEL, slowed, wl, sch, pl), seed=0)
    assert t_shared.throughput_tok_s < t_slowed.throughput_tok_s < t_two.throughput_tok_s
    # every second of work is still done, only no longer at once
    assert t_shared.stage_s["target_attention"] == pytest.approx(t_apart.stage_s["target_attention"], rel=1e-6)


def test_the_profiler_measures_the_runtimes_issuing_on_its_tiny_twin():
    from specplan.hwprofiles.profiler import measure_host_issue
    from specplan.runtime.profiling import tiny_twin

    twin = tiny_twin(ModelSpec.from_preset("smollm2-135m"), 3)
    assert (twin.layers, twin.hidden, twin.arch) == (3, 64, "LlamaForCausalLM")
    got = measure_host_issue(dataclasses.replace(MODEL), torch.device("cpu"), repeat=5)
    assert 1e-6 < got["host_layer_s"] < 0.05 and got["host_pass_s"] >= 0 and got["host_expert_s"] == 0
    moe = measure_host_issue(MOE, torch.device("cpu"), repeat=5)
    assert moe["host_expert_s"] > 0
    from specplan.hwprofiles.profiler import measure_lane_factor

    assert 0 < measure_lane_factor(MODEL, repeat=1, window_s=0.02) <= 1  # the target beside itself
    draft = dataclasses.replace(MODEL, name="tiny-draft", layers=1)
    assert 0 < measure_lane_factor(MODEL, draft, repeat=1, window_s=0.02) <= 1  # beside the draft's step


def test_two_threads_on_a_pool_of_cores_overlap_as_the_lane_factor_allows():
    gpu = _profile()
    assert cost.pool_pair_s(gpu, 1.0, 0.5) == 1.5  # one GPU: one after the other
    free = _profile(shares_host_cores=True, lanes=2)
    assert cost.pool_pair_s(free, 1.0, 0.5) == 1.0  # two lanes that do not slow each other
    slowed = _profile(shares_host_cores=True, lanes=2, lane_factor=0.5)
    assert cost.pool_pair_s(slowed, 1.0, 0.5) == pytest.approx(1.5)  # the shorter at half speed
    assert cost.pool_pair_s(_profile(shares_host_cores=True, lanes=2, lane_factor=0.25), 1.0, 0.5) == 1.5  # capped
