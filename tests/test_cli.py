"""The `specplan` command, run as `python -m specplan.cli` in a subprocess."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from specplan.hardware import load_profile, shipped_names


def run(*args, columns: int = 80, **kw):
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "TERM_PROGRAM")}
    # a plain 80-column terminal, no colour: what a user piping the output sees
    env.update(COLUMNS=str(columns), NO_COLOR="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "specplan.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=60, **kw)


def _one_line_error(res) -> str:
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


def test_models_json_mixtral():
    res = run("models", "mixtral-8x7b", "--json")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["total_params"] == 46702792704
    assert d["bytes"]["kv_bytes_per_token"] == 131072
    assert d["experts"] == 8 and d["top_k"] == 2


def test_models_json_weight_formats():
    res = run("models", "mixtral-8x7b", "--weights", "int4", "--json")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["dtype"] == "bfloat16" and d["weights"] == {"attention": "int4g64", "experts": "int4g64"}
    from specplan.models import ModelSpec

    m = ModelSpec.from_preset("mixtral-8x7b")
    matrices = m.layers * (m.attention_params_per_layer + m.experts * m.expert_params)
    rest = m.total_params - matrices
    # half a byte a weight, two float16 values (scale, zero point) per 64; the rest in bf16
    assert d["bytes"]["total_bytes"] == matrices / 2 + matrices / 64 * 4 + rest * 2
    res = run("models", "mixtral-8x7b", "--dtype", "int4")
    assert res.returncode == 2 and "dtype" in res.stderr


def test_models_from_config_file(tmp_path):
    from specplan.models import ModelSpec

    cfg = dict(ModelSpec.from_preset("qwen2.5-7b").hf_config)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    res = run("models", tmp_path, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["total_params"] == ModelSpec.from_preset("qwen2.5-7b").total_params


def test_models_list_json():
    res = run("models", "--json")
    assert res.returncode == 0, res.stderr
    names = {d["name"] for d in json.loads(res.stdout)}
    assert {"mixtral-8x7b", "mixtral-8x22b", "llama-3.1-8b", "qwen2.5-7b"} <= names


def test_models_show_table():
    res = run("models", "mixtral-8x7b", columns=200)
    assert res.returncode == 0, res.stderr
    assert "46.70B" in res.stdout and "131.07 KB" in res.stdout


def test_hardware_json_rtx4090():
    res = run("hardware", "rtx4090", "--json")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["gpu"]["memory_bytes"] == 24 * 2**30
    assert d["provenance"]["kind"] == "datasheet"
    assert d == load_profile("rtx4090").to_dict()


def test_hardware_json_composed():
    res = run("hardware", "rtx4090", "--pcie", "3", "--host-mem", "256GB", "--json")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["host"]["memory_bytes"] == 256e9
    assert d["link"]["name"] == "pcie3x16"
    assert d == load_profile("rtx4090", pcie="3", host_memory_bytes=256e9).to_dict()


def test_hardware_list_json_has_all_shipped():
    res = run("hardware", "--json")
    assert res.returncode == 0, res.stderr
    assert [d["name"] for d in json.loads(res.stdout)] == shipped_names()


@pytest.mark.parametrize("columns", [80, 200])
def test_hardware_list_shows_every_name(columns):
    # The table listing must show each profile name in full, including on an 80-column terminal
    # or when piped (Rich then assumes 80 columns).
    res = run("hardware", columns=columns)
    assert res.returncode == 0, res.stderr
    missing = [n for n in shipped_names() if n not in res.stdout]
    assert not missing, f"names not shown in full: {missing}\n{res.stdout}"


def test_hardware_show_table():
    res = run("hardware", "rtx4090", columns=200)
    assert res.returncode == 0, res.stderr
    assert "NVIDIA GeForce RTX 4090" in res.stdout and "pcie4x16" in res.stdout


def test_unknown_model_one_line_error():
    res = run("models", "nope")
    line = _one_line_error(res)
    assert "unknown model" in line and "'nope'" in line
    assert res.stdout == ""


def test_unknown_model_suggestion():
    line = _one_line_error(run("models", "mixtrl"))
    assert "mixtral-8x7b" in line


def test_negative_host_mem():
    line = _one_line_error(run("hardware", "rtx4090", "--host-mem", "-5GB"))
    assert "--host-mem" in line


def test_unparseable_host_mem():
    line = _one_line_error(run("hardware", "rtx4090", "--host-mem", "lots"))
    assert "--host-mem" in line and "lots" in line


def test_unknown_gpu_suggests():
    line = _one_line_error(run("hardware", "rtx4080"))
    assert "unknown GPU profile" in line and "rtx4090" in line


def test_bad_schema_version_file(tmp_path):
    d = load_profile("rtx4090").to_dict()
    d["schema_version"] = 99
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    line = _one_line_error(run("hardware", path))
    assert "schema_version" in line and str(path) in line and "99" in line


def test_error_message_printed_verbatim(tmp_path):
    # Error text is data, not Rich markup: a field such as "grid[tokens]" must survive.
    d = load_profile("rtx4090").to_dict()
    d["kernels"] = {"gpu_ffn": {"axes": ["tokens"], "grid": [[1, 4, 2]], "seconds": [1e-5, 2e-5, 3e-5]}}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    line = _one_line_error(run("hardware", path))
    assert "kernels.gpu_ffn.grid[tokens]" in line, line


def test_error_with_bracketed_path_printed_verbatim(tmp_path):
    folder = tmp_path / "[profiles]"
    folder.mkdir()
    path = folder / "missing.json"
    line = _one_line_error(run("hardware", path))
    assert str(path) in line, line


def test_usage_error_exits_nonzero():
    res = run("models", "mixtral-8x7b", "--no-such-flag")
    assert res.returncode != 0
    assert "no-such-flag" in res.stderr


def test_installed_script_matches_module():
    exe = shutil.which("specplan") or os.path.join(os.path.dirname(sys.executable), "specplan")
    if not os.path.exists(exe):
        pytest.skip("specplan console script not installed")
    res = subprocess.run([exe, "models", "mixtral-8x7b", "--json"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["total_params"] == 46702792704


def test_written_files_get_the_umask_mode_or_keep_their_own(tmp_path):
    """Atomic writes go through a private temporary file; the result is not left 0600."""
    import os
    import stat

    from specplan.fileio import write_json

    old = os.umask(0o022)
    try:
        new = write_json(tmp_path / "plan.json", {"a": 1})
        assert stat.S_IMODE(new.stat().st_mode) == 0o644
        new.chmod(0o640)
        write_json(new, {"a": 2})
        assert stat.S_IMODE(new.stat().st_mode) == 0o640
    finally:
        os.umask(old)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
