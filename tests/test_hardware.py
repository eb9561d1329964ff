"""HardwareProfile loading, saving, composing and validation; KernelTable interpolation."""

import copy
import dataclasses
import json
import warnings

import numpy as np
import pytest

from specplan import hardware
from specplan.errors import InputError, UnknownNameError
from specplan.hardware import load_profile
from specplan.tables import KernelTable, OutOfProfiledRange

EXPECTED_SHIPPED = {"rtx4090", "rtx3090", "a100-40gb", "a100-80gb", "h100-pcie", "h100-sxm", "h200", "l4", "t4"}


def _shipped_dict(name: str = "rtx4090") -> dict:
    return load_profile(name).to_dict()


def _write(tmp_path, d, name="profile.json"):
    path = tmp_path / name
    path.write_text(json.dumps(d))
    return path


# ---- shipped profiles ---------------------------------------------------------------------


def test_shipped_names_cover_expected():
    assert EXPECTED_SHIPPED <= set(hardware.shipped_names())


@pytest.mark.parametrize("name", sorted(EXPECTED_SHIPPED))
def test_shipped_profile_loads_with_datasheet_provenance(name):
    p = load_profile(name)
    assert p.name == name
    assert p.schema_version == hardware.SCHEMA_VERSION
    assert p.provenance.kind == "datasheet"
    assert len(p.provenance.sources) > 0 and all(isinstance(s, str) and s for s in p.provenance.sources)
    g = p.gpu
    assert g.memory_bytes > 8e9
    assert g.memory_bandwidth_bytes_per_s > 1e11
    assert g.flops_per_s("bfloat16") > 1e12 and g.flops_per_s("bf16") == g.flops_per_s("bfloat16")
    assert 0 < g.matmul_efficiency <= 1 and 0 < g.bandwidth_efficiency <= 1
    assert p.link.h2d_pinned.bytes_per_s > p.link.h2d_pageable.bytes_per_s
    assert p.host.memory_bytes > 0 and p.host.cores > 0


def test_rtx4090_datasheet_values():
    p = load_profile("rtx4090")
    assert p.gpu.memory_bytes == 24 * 2**30
    assert p.gpu.memory_bandwidth_bytes_per_s == 1008e9
    assert p.link.name == "pcie4x16"


def test_name_lookup_case_insensitive():
    assert load_profile("RTX4090").to_dict() == load_profile("rtx4090").to_dict()


# ---- save / load --------------------------------------------------------------------------


def _table_1d():
    return KernelTable.from_dict("gpu_ffn:h64:f96:float32",
                                 {"axes": ["tokens"], "grid": [[1, 16, 256]], "seconds": [1e-5, 2e-5, 2e-4]}, "test")


def _table_3d():
    rows, q, ctx = [1, 4], [1, 8], [128, 1024, 8192]
    sec = [[[r * ql * c * 1e-9 + 1e-6 for c in ctx] for ql in q] for r in rows]
    return KernelTable.from_dict("cpu_attention", {"axes": ["rows", "q_len", "context"],
                                                   "grid": [rows, q, ctx], "seconds": sec}, "test")


@pytest.mark.parametrize("name", ["rtx4090", "h100-sxm"])
def test_save_load_roundtrip(tmp_path, name):
    p = load_profile(name)
    path = p.save(tmp_path / "sub" / f"{name}.json")
    q = load_profile(path)
    assert q.to_dict() == p.to_dict()
    assert q == p


def test_save_load_roundtrip_with_kernel_tables(tmp_path):
    t1, t3 = _table_1d(), _table_3d()
    p = dataclasses.replace(load_profile("rtx4090"), kernels={t1.op: t1, t3.op: t3})
    path = p.save(tmp_path / "measured.json")
    q = load_profile(str(path))
    assert q.to_dict() == p.to_dict()
    assert set(q.kernels) == {t1.op, t3.op}
    assert q.kernel(t3.op)(4, 8, 1024) == pytest.approx(t3(4, 8, 1024))
    assert q.kernel("missing") is None


def test_roundtrip_of_composed_profile(tmp_path):
    p = load_profile("rtx4090", pcie=3, host="server", gpu_memory_bytes=20e9)
    q = load_profile(p.save(tmp_path / "c.json"))
    assert q.to_dict() == p.to_dict()


# ---- compose ---------------------------------------------------------------------------------


def test_compose_pcie3_and_host_memory():
    base = load_profile("rtx4090")
    p = load_profile("rtx4090", pcie=3, host_memory_bytes=256e9)
    assert p.link.h2d_pinned.bytes_per_s < base.link.h2d_pinned.bytes_per_s
    assert p.link.d2h_pinned.bytes_per_s < base.link.d2h_pinned.bytes_per_s
    assert p.link.name == "pcie3x16"
    assert p.host.memory_bytes == 256e9
    assert p.gpu == base.gpu
    assert p.name != base.name
    assert p.name.startswith("rtx4090")
    assert "pcie3" in p.name and "256" in p.name
    assert "composed" in p.provenance.notes


def test_compose_host_memory_only_changes_memory():
    base = load_profile("rtx4090")
    p = load_profile("rtx4090", host_memory_bytes=64e9)
    assert p.host.memory_bytes == 64e9
    assert p.host.memory_bandwidth_bytes_per_s == base.host.memory_bandwidth_bytes_per_s
    assert p.link == base.link


def test_compose_pcie5_faster_and_host_cores_scale_flops():
    base = load_profile("rtx4090")
    p = load_profile("rtx4090", pcie="5", host_cores=8)
    assert p.link.h2d_pinned.bytes_per_s > base.link.h2d_pinned.bytes_per_s
    assert p.host.cores == 8
    for k, v in base.host.matmul_flops_per_s.items():
        assert p.host.matmul_flops_per_s[k] == pytest.approx(v * 8 / base.host.cores)


def test_compose_none_values_ignored():
    assert load_profile("t4", pcie=None, host_memory_bytes=None).to_dict() == load_profile("t4").to_dict()


@pytest.mark.parametrize("kw,flag", [({"host_memory_bytes": -5e9}, "--host-mem"), ({"host_cores": 0}, "--host-cores"),
                                     ({"gpu_memory_bytes": 0.0}, "--gpu-mem")])
def test_compose_bad_values(kw, flag):
    with pytest.raises(InputError, match=flag):
        load_profile("rtx4090", **kw)


def test_unknown_pcie_generation():
    with pytest.raises(UnknownNameError) as ei:
        load_profile("rtx4090", pcie=6)
    assert "PCIe" in str(ei.value) and "'6'" in str(ei.value)


def test_unknown_host_part():
    with pytest.raises(UnknownNameError, match="host"):
        load_profile("rtx4090", host="laptop")


# ---- bad input ------------------------------------------------------------------------------


def test_unknown_gpu_suggests_close_name():
    with pytest.raises(UnknownNameError) as ei:
        load_profile("rtx4080")
    assert ei.value.suggestions[0] == "rtx4090"
    assert "rtx4090" in str(ei.value)


def _assert_input_error(path, *fields):
    with pytest.raises(InputError) as ei:
        load_profile(path)
    msg = str(ei.value)
    assert str(path) in msg, msg
    for f in fields:
        assert f in msg, msg
    return ei.value


def test_schema_version_99(tmp_path):
    d = _shipped_dict()
    d["schema_version"] = 99
    e = _assert_input_error(_write(tmp_path, d), "schema_version", "99")
    assert e.field == "schema_version"


def test_missing_schema_version(tmp_path):
    d = _shipped_dict()
    del d["schema_version"]
    _assert_input_error(_write(tmp_path, d), "schema_version")


def test_missing_gpu_memory(tmp_path):
    d = _shipped_dict()
    del d["gpu"]["memory_bytes"]
    e = _assert_input_error(_write(tmp_path, d), "gpu.memory_bytes", "missing")
    assert e.field == "gpu.memory_bytes"


def test_negative_link_bandwidth(tmp_path):
    d = _shipped_dict()
    d["link"]["h2d_pinned"]["bytes_per_s"] = -25e9
    _assert_input_error(_write(tmp_path, d), "link.h2d_pinned.bytes_per_s")


def test_efficiency_above_one(tmp_path):
    d = _shipped_dict()
    d["gpu"]["matmul_efficiency"] = 1.5
    _assert_input_error(_write(tmp_path, d), "gpu.matmul_efficiency", "1.5")


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d["host"].__setitem__("memory_bytes", "256GB"), "host.memory_bytes"),
    (lambda d: d["host"].__setitem__("attention_efficiency", 0), "host.attention_efficiency"),
    (lambda d: d["link"].__setitem__("duplex_factor", 1.2), "link.duplex_factor"),
    (lambda d: d["gpu"]["peak_flops_per_s"].__setitem__("bfloat16", -1), "gpu.peak_flops_per_s.bfloat16"),
    (lambda d: d["gpu"].__setitem__("kernel_launch_s", True), "gpu.kernel_launch_s"),
    (lambda d: d.pop("link"), "link"),
    (lambda d: d["provenance"].__setitem__("kind", "guess"), "provenance.kind"),
    (lambda d: d.__setitem__("kernels", []), "kernels"),
])
def test_other_bad_fields(tmp_path, mutate, field):
    d = _shipped_dict()
    mutate(d)
    _assert_input_error(_write(tmp_path, d), field)


def test_zero_kernel_launch_allowed(tmp_path):
    d = _shipped_dict()
    d["gpu"]["kernel_launch_s"] = 0
    assert load_profile(_write(tmp_path, d)).gpu.kernel_launch_s == 0


def test_invalid_json_and_non_object(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    _assert_input_error(path, "invalid JSON")
    _assert_input_error(_write(tmp_path, [1, 2], "list.json"), "top level")
    _assert_input_error(tmp_path / "absent.json", "does not exist")


def test_malformed_kernel_table_in_profile(tmp_path):
    d = _shipped_dict()
    d["kernels"] = {"gpu_ffn": {"axes": ["tokens"], "grid": [[1, 2, 3]], "seconds": [1e-5, 2e-5]}}
    _assert_input_error(_write(tmp_path, d), "kernels.gpu_ffn")


# ---- KernelTable ----------------------------------------------------------------------------


def _t1(grid=(1, 16, 256), sec=(1e-5, 2e-5, 2e-4), op="t1"):
    return KernelTable.from_dict(op, {"axes": ["tokens"], "grid": [list(grid)], "seconds": list(sec)}, "test")


def test_1d_exact_at_grid_points():
    grid, sec = (1, 16, 256, 4096), (1e-5, 2e-5, 2e-4, 3e-3)
    t = _t1(grid, sec)
    for g, s in zip(grid, sec):
        assert t(g) == pytest.approx(s, rel=1e-12)


def test_1d_linear_between_points():
    t = _t1((10, 20), (1.0, 3.0))
    assert t(15) == pytest.approx(2.0)
    assert t(12.5) == pytest.approx(1.5)


def test_3d_exact_at_grid_points():
    t = _table_3d()
    for r in t.grid[0]:
        for q in t.grid[1]:
            for c in t.grid[2]:
                assert t(r, q, c) == pytest.approx(r * q * c * 1e-9 + 1e-6, rel=1e-12)


def test_3d_multilinear_between_points():
    t = KernelTable.from_dict("bilinear", {"axes": ["a", "b", "c"], "grid": [[0, 1], [0, 1], [0, 1]],
                                           "seconds": [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]}, "test")
    # trilinear interpolation of f = 4a + 2b + c is exact
    for a, b, c in [(0.5, 0.5, 0.5), (0.25, 0.75, 0.1), (0.9, 0.0, 1.0)]:
        assert t(a, b, c) == pytest.approx(4 * a + 2 * b + c)


def test_monotone_between_points_on_monotone_data():
    grid = (1, 2, 4, 8, 16, 64, 256, 1024)
    sec = (5e-6, 5e-6, 6e-6, 9e-6, 1.5e-5, 5e-5, 2e-4, 8e-4)
    t = _t1(grid, sec)
    xs = np.linspace(1, 1024, 5001)
    ys = [t(x) for x in xs]
    # monotone up to floating-point rounding (a flat segment may wobble by one ulp)
    assert all(b >= a * (1 - 1e-12) for a, b in zip(ys, ys[1:]))
    assert ys[-1] == pytest.approx(8e-4) and ys[0] == pytest.approx(5e-6)
    # and stays within each segment's end values
    for x, y in zip(xs, ys):
        i = max(0, int(np.searchsorted(grid, x)) - 1)
        i = min(i, len(grid) - 2)
        assert sec[i] * (1 - 1e-12) <= y <= sec[i + 1] * (1 + 1e-12)


def test_3d_monotone_along_each_axis():
    t = _table_3d()
    rng = np.random.default_rng(0)
    for _ in range(200):
        r, q, c = rng.uniform(1, 4), rng.uniform(1, 8), rng.uniform(128, 8192)
        base = t(r, q, c)
        assert t(min(r + 0.5, 4), q, c) >= base
        assert t(r, min(q + 1, 8), c) >= base
        assert t(r, q, min(c + 500, 8192)) >= base


def test_extrapolates_linearly_above_and_warns():
    t = _t1((1, 16, 256), (1e-5, 2e-5, 2e-4))
    slope = (2e-4 - 2e-5) / (256 - 16)
    with pytest.warns(OutOfProfiledRange, match="tokens"):
        y = t(512)
    assert y == pytest.approx(2e-4 + slope * 256)
    # linear: more work, more time
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OutOfProfiledRange)
        assert t(1024) == pytest.approx(2e-4 + slope * 768)
        assert t(1024) > t(512)


def test_in_range_does_not_warn():
    t = _t1()
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutOfProfiledRange)
        t(1)
        t(100)
        t(256)


def test_holds_first_value_below():
    t = _t1((4, 16, 256), (1e-5, 2e-5, 2e-4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OutOfProfiledRange)
        assert t(1) == pytest.approx(1e-5)
        assert t(0) == pytest.approx(1e-5)
        assert t(3.999) == pytest.approx(1e-5)


def test_3d_out_of_range_axis_warns_and_extrapolates():
    t = _table_3d()
    with pytest.warns(OutOfProfiledRange, match="context"):
        y = t(4, 8, 16384)
    assert y == pytest.approx(4 * 8 * 16384 * 1e-9 + 1e-6)


def test_wrong_number_of_sizes():
    with pytest.raises(ValueError):
        _table_3d()(1, 2)


def test_table_to_dict_roundtrip():
    t = _table_3d()
    assert KernelTable.from_dict(t.op, json.loads(json.dumps(t.to_dict())), "x") == t


@pytest.mark.parametrize("bad", [
    {"axes": ["tokens"], "grid": [[1, 2, 3]], "seconds": [1e-5, 2e-5]},  # shape mismatch
    {"axes": ["tokens"], "grid": [[1, 4, 2]], "seconds": [1e-5, 2e-5, 3e-5]},  # not ascending
    {"axes": ["tokens"], "grid": [[1, 2, 2]], "seconds": [1e-5, 2e-5, 3e-5]},  # repeated point
    {"axes": ["a", "b"], "grid": [[1, 2], [1, 2]], "seconds": [[1, 2], [3]]},  # ragged
    {"axes": ["a", "b"], "grid": [[1, 2]], "seconds": [1, 2]},  # axes/grid mismatch
    {"axes": ["tokens"], "grid": [[1, 2]], "seconds": [1e-5, -1]},  # negative time
    {"axes": ["tokens"], "seconds": [1e-5]},  # missing grid
    {"axes": ["tokens"], "grid": [["a", "b"]], "seconds": [1, 2]},  # non-numeric
])
def test_malformed_table_raises_input_error(bad):
    with pytest.raises(InputError) as ei:
        KernelTable.from_dict("gpu_ffn", copy.deepcopy(bad), "prof.json")
    assert "prof.json" in str(ei.value) and "kernels.gpu_ffn" in str(ei.value)
