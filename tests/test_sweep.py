"""specplan sweep: its best point is what optimize says there, cached rows equal fresh ones,
a rerun plans only the points it has not seen, prices turn into $ per million tokens."""

import json
import subprocess
import sys

import pytest

from specplan.errors import InfeasibleError, InputError
from specplan.hardware import HardwareProfile, load_profile
from specplan.models import ModelSpec
from specplan.planner import shapes as shapes_mod
from specplan.planner.optimize import make_plan, optimize
from specplan.planner.sweep import Grid, SweepPoint, binding, load_prices, price_rows, resolve, run_sweep, sort_rows
from specplan.workload import Workload

from conftest import toy_profile_dict

TINY = {"target": "tiny-mixtral", "draft": "tiny-draft"}


@pytest.fixture
def small_space(monkeypatch):
    """The planner's candidate sets shrunk, as test_planner's brute force uses them."""
    monkeypatch.setattr(shapes_mod, "BATCHES", (2, 4, 8))
    monkeypatch.setattr(shapes_mod, "GAMMAS", (1, 3))
    monkeypatch.setattr(shapes_mod, "DRAFT_BATCHES", (2, 4))
    monkeypatch.setattr(shapes_mod, "PREFILL_CHUNKS", (4, 8))


@pytest.fixture
def toy_gpus(tmp_path):
    """Two toy machines whose GPUs hold only part of the tiny target, so placement and host
    memory matter."""
    paths = []
    for name, gpu_bytes, link in (("toy-small", 2.2e6, 1e9), ("toy-large", 3.5e6, 4e9)):
        d = toy_profile_dict(memory_bytes=gpu_bytes)
        d["name"] = name
        d["link"]["h2d_pinned"]["bytes_per_s"] = link
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(d))
        paths.append(str(path))
    return paths


def _grid(gpus, hosts=("2.5MB", "64GB")) -> Grid:
    return Grid(gpus=tuple(gpus), host_mems=tuple(hosts), models=(("tiny-mixtral", "tiny-draft"),),
                prompt_lens=(8,), gen_lens=(12,), num_prompts=(16,), acceptances=(0.7,))


def _plain(rows):
    return json.loads(json.dumps(rows))


def test_every_point_is_what_optimize_says_there(small_space, toy_gpus):
    """Points planned in processes, one machine's host sizes one after another sharing their
    work (optimize.Memo): each equals a fresh optimize at that point, the best point too."""
    rows = run_sweep(_grid(toy_gpus).points(), None).rows
    assert len(rows) == 4 and sum(r["status"] == "ok" for r in rows) >= 3
    for row in rows:
        r = resolve(SweepPoint(**row["point"]))
        if row["status"] != "ok":
            with pytest.raises(InfeasibleError):
                optimize(r.target, r.draft, r.profile, r.workload)
            continue
        best = optimize(r.target, r.draft, r.profile, r.workload).best
        plan = make_plan(best, "tiny-mixtral", "tiny-draft", r.target, r.draft, r.profile, r.workload).to_dict()
        assert row["tok_s"] == best.tok_s
        assert row["plan"]["schedule"] == _plain(plan["schedule"])
        assert row["plan"]["placement"] == _plain(plan["placement"])
    top = sort_rows(rows, "tok_s")[0]
    assert top["tok_s"] == max(r["tok_s"] for r in rows if r["status"] == "ok")


def test_cached_rows_equal_fresh_ones_and_a_new_point_costs_one(small_space, toy_gpus, tmp_path):
    cache = str(tmp_path / "cache")
    grid = _grid(toy_gpus)
    first = run_sweep(grid.points(), cache)
    assert first.planned == 4
    again = run_sweep(grid.points(), cache)
    assert again.planned == 0
    fresh = run_sweep(grid.points(), None)
    assert _plain(again.rows) == _plain(first.rows) == _plain(fresh.rows)
    more = run_sweep(_grid(toy_gpus, ("2.5MB", "64GB", "8MB")).points(), cache)  # one host size more: two points
    assert more.planned == 2 and len(more.rows) == 6
    one = run_sweep([*grid.points(), SweepPoint(toy_gpus[0], "3", "64GB", "tiny-mixtral", "tiny-draft", 8, 12, 16, 0.7)],
                    cache)
    assert one.planned == 1 and len(one.rows) == 5
    # two spellings of one point: planned once, each row labelled as asked, fresh or cached
    alias = Grid(**{**grid.__dict__, "gpus": (toy_gpus[0],), "pcies": ("4", "pcie4x16"), "host_mems": ("64GB",)})
    for run in (run_sweep(alias.points(), str(tmp_path / "alias")), run_sweep(alias.points(), str(tmp_path / "alias"))):
        assert [r["point"]["pcie"] for r in run.rows] == ["4", "pcie4x16"]
        assert run.rows[0]["tok_s"] == run.rows[1]["tok_s"] and run.planned <= 1
    # a changed input is a new point, not a stale hit
    wl = run_sweep(Grid(**{**grid.__dict__, "gen_lens": (10,)}).points(), cache)
    assert wl.planned == 4


def test_prices_give_dollars_per_million_tokens_and_the_jobs_cost(tmp_path):
    rows = [{"point": {"gpu": "a"}, "status": "ok", "tok_s": 100.0, "job_s": 7200.0},
            {"point": {"gpu": "b"}, "status": "ok", "tok_s": 50.0, "job_s": 3600.0},
            {"point": {"gpu": "c"}, "status": "infeasible", "tok_s": None}]
    price_rows(rows, {"a": 0.36, "b": 0.09})
    assert rows[0]["usd_per_mtok"] == pytest.approx(0.36 / 3600 / 100 * 1e6)
    assert rows[0]["job_usd"] == pytest.approx(0.72)
    assert rows[2]["usd_per_mtok"] is None
    assert [r["point"]["gpu"] for r in sort_rows(rows, "cost")] == ["b", "a", "c"]
    assert [r["point"]["gpu"] for r in sort_rows(rows, "tok_s")] == ["a", "b", "c"]
    good = tmp_path / "prices.yaml"
    good.write_text("date: 2026-12-01\nsource: a quote from a rental page\nprices:\n  rtx4090: 0.35\n")
    assert load_prices(str(good)) == {"rtx4090": 0.35}
    undated = tmp_path / "undated.json"
    undated.write_text(json.dumps({"source": "x", "prices": {"rtx4090": 0.35}}))
    with pytest.raises(InputError, match="date"):
        load_prices(str(undated))


def test_a_grid_file_in_yaml_and_its_mistakes(tmp_path):
    f = tmp_path / "grid.yaml"
    f.write_text("gpu: [rtx4090, l4]\npcie: [3, 4]\nhost_mem: 256GB\n"
                 "models:\n  - {target: mixtral-8x7b, draft: mistral-7b-v0.2}\n  - llama-3.3-70b\n"
                 "prompt_len: [256, 512]\nprices: {l4: 0.5}\n")
    [g] = Grid.from_file(str(f))
    assert len(g.points()) == 2 * 2 * 1 * 2 * 2 and g.prices == {"l4": 0.5}
    assert ("llama-3.3-70b", "none") in g.models
    f.write_text("grids:\n  - {gpu: [rtx4090, l4], pcie: [3, 4]}\n  - {gpu: rtx4090, pcie: 4, host_mem: 1TB}\n")
    a, b = Grid.from_file(str(f))
    assert len(a.points()) == 4 and len(b.points()) == 1  # a grid of one point adds one point
    for text, field in (("gpu: rtx4090\nhostmem: 1GB\n", "hostmem"), ("pcie: 4\n", "gpu"),
                        ("grids:\n  - {gpu: l4}\n  - {gpu: t4, pcie: [3, [4]]}\n", "grids[1].pcie[1]"),
                        ("gpu: rtx4090\ngen_len: [128, 0]\n", "gen_len[1]"), ("gpu: [rtx4090\n", "grid")):
        f.write_text(text)
        with pytest.raises(InputError, match=field.replace("[", r"\[")):
            Grid.from_file(str(f))


def test_what_binds_names_the_link_when_the_stream_fills_the_wall_time():
    from specplan.plan import Placement

    class Sim:
        utilisation = {"gpu": 0.3, "h2d": 0.9, "d2h": 0.1, "cpu": 0.2, "disk": 0.0}
        peak_gpu_bytes = 23.9e9
        peak_pinned_bytes = 10e9

    profile = load_profile("rtx4090")
    b = binding(Sim(), Placement(draft_kv="cpu"), profile)
    assert b.startswith("link 90%") and "GPU memory full" in b and "draft KV on host" in b
    Sim.utilisation = {"gpu": 0.95, "h2d": 0.2, "d2h": 0.0, "cpu": 0.0, "disk": 0.0}
    Sim.peak_gpu_bytes = 1e9
    assert binding(Sim(), Placement(ffn="disk"), profile) == "GPU compute 95%, host memory (weights on disk)"


def test_sweep_cli_writes_its_table_csv_plots_and_json(tmp_path):
    cmd = [sys.executable, "-m", "specplan.cli", "sweep", "--gpu", "rtx4090", "--gpu", "l4", "--target", "tiny-mixtral",
           "--draft", "tiny-draft", "--prompt-len", "16", "--gen-len", "8", "--num-prompts", "16",
           "--price", "rtx4090=0.35", "--price", "l4=0.5", "--cache", str(tmp_path / "cache"),
           "--csv", str(tmp_path / "s.csv"), "--plots", str(tmp_path / "plots"), "--plan-out", str(tmp_path / "p.json")]
    r = subprocess.run([*cmd, "--json", "--sort", "cost"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["planned"] == 2 and len(out["rows"]) == 2
    costs = [row["usd_per_mtok"] for row in out["rows"]]
    assert costs == sorted(costs) and all(c > 0 for c in costs)
    assert (tmp_path / "s.csv").read_text().splitlines()[0].startswith("target,draft,gpu")
    assert {p.split("/")[-1] for p in out["plots"]} == {"tok_s_by_gpu.png", "usd_per_mtok_by_gpu.png",
                                                         "heatmap_link_host_tiny-mixtral.png"}
    assert all((tmp_path / "plots" / n).read_bytes()[:4] == b"\x89PNG" for n in ("tok_s_by_gpu.png",))
    assert json.loads((tmp_path / "p.json").read_text())["hardware"]
    table = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert table.returncode == 0 and "2 from the cache" in table.stdout and "$/M tok" in table.stdout


def test_profiles_differing_only_in_host_memory_share_a_memo_scope():
    from specplan.planner.optimize import Memo

    t, d = ModelSpec.from_preset("tiny-mixtral"), ModelSpec.from_preset("tiny-draft")
    wl = Workload.make(prompt_len=8, gen_len=8, num_prompts=8)
    a = HardwareProfile.from_dict(toy_profile_dict(), "toy").compose(host_memory_bytes=1e9)
    b = a.compose(host_memory_bytes=2e9)
    m = Memo().enter(t, d, a, wl)
    m.sims["x"] = 1
    assert m.enter(t, d, b, wl).sims == {"x": 1}  # same machine, other host size: kept
    assert m.enter(t, d, b.compose(pcie="3"), wl).sims == {}  # another link: a new scope
