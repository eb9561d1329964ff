"""`specplan batch`: a dataset job on a Ray cluster. The shard bookkeeping on its own, then
whole jobs on a two-node local cluster (started here, CPU only, tiny-llama with random weights)
whose nodes carry different hardware profiles: the merged output against the single-process
job's, workers killed mid-job (ray.kill of the actor, SIGKILL of its process), a job stopped as
a whole and resumed, and the errors that stop a job before any weight is read."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from specplan.errors import InputError, SpecplanError
from specplan.runtime import shards

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


# ---- the shards, without Ray -------------------------------------------------------------------------------


def _line(rid: str, n: int = 1) -> str:
    return json.dumps({"id": rid, "token_ids": [n], "generated_tokens": 1}) + "\n"


def test_the_queue_cuts_shards_on_demand_and_sends_given_back_rows_first():
    q = shards.ShardQueue(list(range(10)), first_id=3)
    a = q.cut(4)
    assert (a.id, a.places) == (3, (0, 1, 2, 3)) and len(q) == 6
    q.give_back([2, 3])  # a lost worker handed over rows 0 and 1
    b = q.cut(4)
    assert (b.id, b.places) == (4, (2, 3))  # a new shard, so each shard file has one writer
    assert q.cut(100).places == (4, 5, 6, 7, 8, 9) and q.cut(1) is None and len(q) == 0


def test_merge_writes_each_id_once_in_input_order_and_refuses_a_duplicate(tmp_path):
    out = tmp_path / "out.jsonl"
    d = shards.shards_dir(out)
    d.mkdir()
    shards.shard_path(out, 0).write_text(_line("c") + _line("a"))
    shards.shard_path(out, 1).write_text(_line("b") + '{"id": "d", "tok')  # a torn last line is not a result
    with pytest.raises(SpecplanError, match="1 rows have no result yet"):
        shards.merge(out, ["a", "b", "c", "d"])
    assert not out.exists()
    assert shards.merge(out, ["a", "b", "c"]) == 3
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["a", "b", "c"]
    assert not d.exists()
    d.mkdir()
    shards.shard_path(out, 2).write_text(_line("a", 9))
    with pytest.raises(SpecplanError, match="'a' is in .* and in"):
        shards.merge(out, ["a", "b", "c"])


def test_prepare_reads_the_done_ids_of_the_output_and_the_shards_and_refuses_without_resume(tmp_path):
    from specplan.runtime.jobio import sidecar_path

    out = tmp_path / "out.jsonl"
    shards.shards_dir(out).mkdir()
    shards.shard_path(out, 4).write_text(_line("x") + _line("y"))
    with pytest.raises(InputError, match="holds an unfinished job's shards"):
        shards.prepare(out, {"input_sha256": "h"}, resume=False)
    with pytest.raises(InputError, match="has no out.jsonl.job.json"):
        shards.prepare(out, {"input_sha256": "h"}, resume=True)
    sidecar_path(out).write_text(json.dumps({"input_sha256": "h"}))
    with pytest.raises(InputError, match="differ from this job's"):
        shards.prepare(out, {"input_sha256": "other"}, resume=True)
    assert shards.prepare(out, {"input_sha256": "h"}, resume=True) == ({"x", "y"}, 5)


def test_worker_slots_are_one_per_gpu_else_per_cpus_and_spread_over_nodes():
    from specplan.errors import InfeasibleError
    from specplan.runtime.cluster import worker_slots

    nodes = [{"NodeID": "a", "Alive": True, "NodeManagerHostname": "a", "Resources": {"CPU": 16, "GPU": 2}},
             {"NodeID": "b", "Alive": True, "NodeManagerHostname": "b", "Resources": {"CPU": 4}},
             {"NodeID": "c", "Alive": False, "Resources": {"CPU": 64}}]
    slots = worker_slots(nodes, "auto", 2, None)
    assert [(s.node_id, s.gpus, s.cpus) for s in slots] == [("a", 1, 1), ("b", 0, 2), ("a", 1, 1), ("b", 0, 2)]
    assert [s.node_id for s in worker_slots(nodes, "auto", 2, 2)] == ["a", "b"]
    assert all(s.gpus == 0 for s in worker_slots(nodes, "cpu", 4, None))
    with pytest.raises(InfeasibleError, match="no node has a GPU"):
        worker_slots(nodes[1:], "cuda", 1, None)


# ---- whole jobs on a local two-node cluster ---------------------------------------------------------------

try:
    import ray
except ImportError:  # pragma: no cover - ray is in the dev extra
    ray = None


def _profiles(d: Path) -> tuple[Path, Path]:
    """Two profiles of this CPU (so the plans may run here unforced) that plan differently."""
    from specplan.host import cpu_device_name

    base = json.loads((ROOT / "hwprofiles" / "measured" / "cpu-2core-xeon.json").read_text())
    base["gpu"]["name"] = cpu_device_name()
    a, b = json.loads(json.dumps(base)), json.loads(json.dumps(base))
    a["name"], b["name"] = "node-a", "node-b"
    b["gpu"]["memory_bytes"] = 2e6
    pa, pb = d / "a.json", d / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    return pa, pb


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if ray is None:
        pytest.skip("ray is not installed (pip install -e '.[ray]')")
    from ray.cluster_utils import Cluster

    from specplan.runtime.cluster import PROFILE_ENV

    pa, pb = _profiles(tmp_path_factory.mktemp("profiles"))
    env = {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                      "env_vars": env | {PROFILE_ENV: str(pa)}})
    c.add_node(num_cpus=1, env_vars=env | {PROFILE_ENV: str(pb)})
    c.wait_for_nodes()
    yield c
    c.shutdown()


GEN_LEN = 24


def _job(d: Path, prompts: int) -> list[str]:
    import kill_resume as kr

    kr.make_job(d, prompts=prompts, gen_len=GEN_LEN, rows=4)  # data.jsonl, and plan.json for specrun
    return ["batch", "--prompts", "data.jsonl", "--target", "tiny-llama", "--draft", "tiny-llama", "--random-weights",
            "--draft-seed", "0", "--device", "cpu", "--gen-len", str(GEN_LEN)]


def _batch(args: list[str], cwd: Path, wait: bool = True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "NO_COLOR": "1",
           "RAY_USAGE_STATS_ENABLED": "0"}
    p = subprocess.Popen([sys.executable, "-m", "specplan.cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    if not wait:
        return p
    out, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _results(path: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        assert r["id"] not in out, f"id {r['id']} twice"
        r.pop("accepted_per_verification")  # the plan's, and each machine has its own
        out[r["id"]] = r
    return out


def _single_process(d: Path) -> dict[str, dict]:
    import kill_resume as kr

    kr.specrun(["--plan", "plan.json", "--target", "tiny-llama", "--draft", "tiny-llama", "--random-weights",
                "--draft-seed", "0", "--device", "cpu", "--force", "--threads", "1", "--prompts", "data.jsonl",
                "--output", "whole.jsonl"], d)
    return _results(d / "whole.jsonl")


def test_a_two_worker_job_equals_the_single_process_job_with_a_plan_per_node(cluster, tmp_path):
    args = _job(tmp_path, prompts=24)
    r = _batch([*args, "--output", "out.jsonl", "--address", cluster.address, "--json"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    merged = _results(tmp_path / "out.jsonl")
    assert list(merged) == [f"row-{i}" for i in range(24)]  # input order, each id once
    assert merged == _single_process(tmp_path)
    assert not shards.shards_dir(tmp_path / "out.jsonl").exists()
    rep = json.loads(r.stdout)
    assert rep == json.loads((tmp_path / "out.jsonl.report.json").read_text())
    workers = rep["workers"]
    assert sorted(w["profile"] for w in workers) == ["node-a", "node-b"]
    plans = {w["profile"]: w["plan"] for w in workers}
    assert plans["node-a"] != plans["node-b"]  # each machine planned for its own profile
    assert all(w["predicted_tok_s"] > 0 and w["measured_tok_s"] > 0 for w in workers)
    assert sum(w["rows"] for w in workers) == 24 and all(w["rows"] > 0 for w in workers)
    assert {"connect_s", "workers_start_s", "plan_s", "load_s", "run_s", "merge_s", "total_s"} <= set(rep["times_s"])


def _kill_one_worker_mid_job(tmp_path: Path, cluster, how: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Start a job, and once rows are on disk kill one of its workers (`how`: ray.kill of its
    actor, or SIGKILL of its process); returns the finished job and its report."""
    from specplan.runtime.cluster import ACTOR_PREFIX, NAMESPACE

    args = _job(tmp_path, prompts=64)
    out = tmp_path / "out.jsonl"
    p = _batch([*args, "--output", "out.jsonl", "--address", cluster.address, "--shard-rows", "8", "--json"], tmp_path,
               wait=False)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:
            on_disk = sum(f.read_bytes().count(b"\n") for f in shards.shards_dir(out).glob("*.jsonl")) \
                if shards.shards_dir(out).exists() else 0
            if on_disk >= 6:
                break
            time.sleep(0.005)
        assert p.poll() is None, "the job ended before a worker could be killed"
        names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                       if a["namespace"] == NAMESPACE and a["name"].startswith(f"{ACTOR_PREFIX}{p.pid}-"))
        victim = ray.get_actor(names[0], namespace=NAMESPACE)
        if how == "ray.kill":
            ray.kill(victim)
        else:
            os.kill(ray.get(victim.describe.remote())["pid"], signal.SIGKILL)
    finally:
        ray.shutdown()
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0 and stdout.strip(), f"{p.returncode}: {stderr[-2000:]}"
    return subprocess.CompletedProcess(p.args, 0, stdout, stderr), json.loads(stdout)


@pytest.mark.parametrize("how", ["ray.kill", "SIGKILL"])
def test_a_worker_killed_mid_job_leaves_every_id_once_equal_to_the_uninterrupted_run(cluster, tmp_path, how):
    _, rep = _kill_one_worker_mid_job(tmp_path, cluster, how)
    lost = [w for w in rep["workers"] if w["lost"]]
    assert len(lost) == 1 and "lost" in lost[0]["lost"], rep["workers"]
    merged = _results(tmp_path / "out.jsonl")
    assert list(merged) == [f"row-{i}" for i in range(64)]
    assert merged == _single_process(tmp_path)


def test_a_job_stopped_as_a_whole_resumes_across_the_cluster(cluster, tmp_path):
    args = _job(tmp_path, prompts=64)
    out = tmp_path / "out.jsonl"
    job = [*args, "--output", "out.jsonl", "--address", cluster.address, "--shard-rows", "8", "--resume"]
    p = _batch(job, tmp_path, wait=False)
    while p.poll() is None:  # stop the driver once some rows are on disk
        if shards.shards_dir(out).exists() and sum(f.read_bytes().count(b"\n")
                                                   for f in shards.shards_dir(out).glob("*.jsonl")) >= 6:
            p.send_signal(signal.SIGINT)
            break
        time.sleep(0.005)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert not out.exists() and shards.shards_dir(out).exists()
    done, _ = shards.prepare(out, json.loads((tmp_path / "out.jsonl.job.json").read_text()), resume=True)
    assert 6 <= len(done) < 64
    r = _batch(job, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{len(done)} of 64 rows done" in r.stderr
    merged = _results(out)
    assert list(merged) == [f"row-{i}" for i in range(64)]
    assert merged == _single_process(tmp_path)
    again = _batch(job, tmp_path)  # a finished job: nothing to run, the output untouched
    assert again.returncode == 0 and "every row is done" in again.stderr


# ---- errors before any weight is read ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line_error(r: subprocess.CompletedProcess, code: int, *words: str) -> str:
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == code, r.stderr[-2000:]
    assert lines[-1].startswith("error:") and "Traceback" not in r.stderr, r.stderr[-2000:]
    for w in words:
        assert w in lines[-1], lines[-1]
    return lines[-1]


def test_an_unreachable_address_is_one_line_before_anything_runs(tmp_path):
    args = _job(tmp_path, prompts=4)
    r = _batch([*args, "--output", "out.jsonl", "--address", f"127.0.0.1:{_free_port()}"], tmp_path)
    _one_line_error(r, 2, "--address", "nothing answers at 127.0.0.1:")
    assert not (tmp_path / "out.jsonl").exists() and not shards.shards_dir(tmp_path / "out.jsonl").exists()


def test_a_cluster_with_no_worker_that_can_hold_the_model_is_one_line(cluster, tmp_path):
    args = _job(tmp_path, prompts=4)
    # the smallest memories a profile may have (1 MB) hold tiny-llama: a 135M-parameter target does not fit them
    args[args.index("--target") + 1], args[args.index("--draft") + 1] = "smollm2-135m", "none"
    r = _batch([*args, "--output", "out.jsonl", "--address", cluster.address, "--gpu-mem", "2MB", "--host-mem", "2MB"],
               tmp_path)
    _one_line_error(r, 3, "no worker can hold the model", "node-a", "node-b")
    assert not (tmp_path / "out.jsonl").exists() and not shards.shards_dir(tmp_path / "out.jsonl").exists()


def test_a_node_without_a_profile_is_one_line_naming_it(tmp_path, monkeypatch):
    if ray is None:
        pytest.skip("ray is not installed (pip install -e '.[ray]')")
    from specplan.runtime.cluster import PROFILE_ENV

    monkeypatch.delenv(PROFILE_ENV, raising=False)
    args = _job(tmp_path, prompts=4)
    r = _batch([*args, "--output", "out.jsonl", "--address", "local", "--local-cpus", "1"], tmp_path)
    _one_line_error(r, 2, f"node {socket.gethostname()}: no hardware profile", PROFILE_ENV)
    assert not (tmp_path / "out.jsonl").exists() and not shards.shards_dir(tmp_path / "out.jsonl").exists()


def test_a_nodes_broken_profile_is_not_answered_with_give_profile_when_profile_was_given(tmp_path, monkeypatch):
    from specplan.runtime.cluster import PROFILE_ENV, node_profile, profile_hint

    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    monkeypatch.setenv(PROFILE_ENV, str(bad))
    fallback = json.loads((ROOT / "hwprofiles" / "measured" / "cpu-2core-xeon.json").read_text())
    profile, why = node_profile("some CPU", fallback)  # the node's own profile wins, and it is broken
    assert profile is None and str(bad) in why
    assert "give --profile" not in profile_hint(fallback) and PROFILE_ENV in profile_hint(fallback)
    assert "give --profile" in profile_hint(None)


def test_resume_over_the_output_and_its_shards_refuses_an_id_in_two_of_them_and_repair_keeps_the_first(tmp_path):
    from specplan.runtime.jobio import sidecar_path

    out = tmp_path / "out.jsonl"
    line = lambda rid: json.dumps({"id": rid, "token_ids": [1]}) + "\n"  # noqa: E731
    out.write_text(line("a") + line("b"))
    sidecar_path(out).write_text(json.dumps({"plan": None}))
    shards.shards_dir(out).mkdir()
    shards.shard_path(out, 0).write_text(line("c") + line("a"))
    shards.shard_path(out, 1).write_text(line("zz"))
    before = {p: p.read_bytes() for p in (out, shards.shard_path(out, 0), shards.shard_path(out, 1))}
    with pytest.raises(InputError, match=r"shard-00000.jsonl: id 'a': has result lines in .*out.jsonl and in"):
        shards.prepare(out, {"plan": None}, resume=True, input_ids={"a", "b", "c", "d"})
    assert {p: p.read_bytes() for p in before} == before
    said: list[str] = []
    done, next_shard = shards.prepare(out, {"plan": None}, resume=True, input_ids={"a", "b", "c", "d"}, repair=True,
                                      say=said.append)
    assert done == {"a", "b", "c"} and next_shard == 2 and len(said) == 2
    assert shards.shard_path(out, 0).read_text() == line("c") and shards.shard_path(out, 1).read_text() == ""
