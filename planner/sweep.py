"""`specplan sweep`: the best plan at every point of a grid of machines, models and workloads,
priced, each point cached by the hash of its inputs.

A point is one GPU profile composed with a link and a host memory size, one target (and
draft) model and one workload. Planning a point is `optimize` at that point (the program,
then the simulator), so the sweep's best point is what `specplan optimize` says there. The
points run in forked processes, one per core, each planning serially; each writes its
result to the cache as soon as it has it, so an interrupted sweep keeps what it finished
and a rerun with one more point plans one point.

Cache key: the point's resolved inputs (the profile after composition, the models' configs,
the workload) and a fingerprint of specplan's own code, so a changed planner never serves a
stale result.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from specplan import __version__
from specplan.errors import InfeasibleError, InputError
from specplan.fileio import read_text, sha256_of, write_json
from specplan.models import ModelSpec, model_shape, resolve_draft
from specplan.workload import Workload

DEFAULT_MODELS = (("mixtral-8x7b", "mistral-7b-v0.2"),)
GRID_KEYS = ("gpu", "pcie", "host_mem", "models", "prompt_len", "gen_len", "num_prompts", "acceptance", "prices")
RESOURCE_NAMES = {"h2d": "link", "d2h": "link to host", "gpu": "GPU compute", "cpu": "CPU attention", "disk": "disk"}
FULL = 0.97  # a memory this full binds: the planner would have used more of it


@dataclass(frozen=True)
class SweepPoint:
    gpu: str
    pcie: str | None  # None: the profile's own link
    host_mem: str | None  # e.g. "256GB"; None: the profile's own
    target: str
    draft: str  # "none": non-speculative plans only
    prompt_len: int
    gen_len: int
    num_prompts: int
    acceptance: float
    weights: str | None = None  # --weights (fixed formats); None: the models' dtype

    @property
    def machine(self) -> str:
        return " ".join(x for x in (self.gpu, f"PCIe {self.pcie}" if self.pcie else "",
                                    f"{self.host_mem} host" if self.host_mem else "") if x)


@dataclass(frozen=True)
class Grid:
    gpus: tuple[str, ...]
    pcies: tuple[str | None, ...] = (None,)
    host_mems: tuple[str | None, ...] = (None,)
    models: tuple[tuple[str, str], ...] = DEFAULT_MODELS
    prompt_lens: tuple[int, ...] = (512,)
    gen_lens: tuple[int, ...] = (128,)
    num_prompts: tuple[int, ...] = (512,)
    acceptances: tuple[float, ...] = (0.7,)
    prices: dict[str, float] = field(default_factory=dict, compare=False)  # GPU -> $ per hour
    weights: str | None = None  # every point's weight formats (--weights)

    def points(self) -> list[SweepPoint]:
        return [SweepPoint(g, p, h, t, d, pl, gl, n, a, self.weights) for (t, d), g, p, h, pl, gl, n, a in itertools.product(
            self.models, self.gpus, self.pcies, self.host_mems, self.prompt_lens, self.gen_lens, self.num_prompts,
            self.acceptances)]

    @classmethod
    def from_mapping(cls, source: str, data: Any, where: str = "") -> "Grid":
        """One grid: each key (GRID_KEYS) one value or a list; `where` prefixes field names."""
        if not isinstance(data, dict):
            raise InputError(source, where or "grid", "is not a mapping", "keys " + ", ".join(GRID_KEYS))
        unknown = sorted(set(data) - set(GRID_KEYS))
        if unknown:
            raise InputError(source, where + unknown[0], "is not a grid key", ", ".join(GRID_KEYS))
        if "gpu" not in data:
            raise InputError(source, where + "gpu", "is missing", "a GPU profile name or a list of them")
        models = tuple(_models(source, data["models"], where)) if "models" in data else DEFAULT_MODELS
        at = lambda key: where + key  # noqa: E731
        host_mems = _list(source, at("host_mem"), data.get("host_mem"), str, "a size such as 256GB", none=True)
        from specplan.hardware import memory_size

        for i, h in enumerate(host_mems):
            if h is not None:
                memory_size(h, source, at("host_mem") + (f"[{i}]" if isinstance(data.get("host_mem"), list) else ""))
        return cls(
            gpus=_list(source, at("gpu"), data["gpu"], str, "a GPU profile name"),
            pcies=_list(source, at("pcie"), data.get("pcie"), str, "a PCIe generation (3, 4, 5) or link name", none=True),
            host_mems=host_mems,
            models=models,
            prompt_lens=_list(source, at("prompt_len"), data.get("prompt_len", 512), int, "a positive integer"),
            gen_lens=_list(source, at("gen_len"), data.get("gen_len", 128), int, "a positive integer"),
            num_prompts=_list(source, at("num_prompts"), data.get("num_prompts", 512), int, "a positive integer"),
            acceptances=_list(source, at("acceptance"), data.get("acceptance", 0.7), float, "a rate in [0, 1]"),
            prices=parse_prices(data.get("prices") or {}, source, at("prices")),
        )

    @classmethod
    def from_file(cls, path: str) -> list["Grid"]:
        """A grid file, JSON or YAML (by suffix): one grid's keys, or {"grids": [grid, ...]},
        whose points are joined (a grid of one point adds one point)."""
        data = read_mapping(path, "grid")
        if isinstance(data, dict) and "grids" in data:
            extra = sorted(set(data) - {"grids"})
            if extra:
                raise InputError(path, extra[0], "is beside grids", "grids: [..] alone, each grid with its own keys")
            if not isinstance(data["grids"], list) or not data["grids"]:
                raise InputError(path, "grids", "is not a list of grids", "grids: [{gpu: ..}, ..]")
            return [cls.from_mapping(path, g, f"grids[{i}].") for i, g in enumerate(data["grids"])]
        return [cls.from_mapping(path, data)]


def _yaml_load(text: str) -> Any:
    """YAML's safe subset, a date left as the text it is (so that a prices file's
    `date: 2024-13-45` is refused as a date, not as unreadable YAML)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader


def read_mapping(path: str, what: str) -> Any:
    """A JSON file, or YAML for a .yaml / .yml one, parsed; a parse error is one line with
    the line it is on."""
    text = read_text(path, f"a JSON or YAML {what} file")
    try:
        if path.endswith((".yaml", ".yml")):
            return _yaml_load(text)
        return json.loads(text)
    except ValueError as e:
        raise InputError(path, what, f"is not JSON ({e})", "JSON, or YAML in a .yaml / .yml file") from None
    except Exception as e:  # noqa: BLE001 - yaml.YAMLError, without importing yaml for JSON files
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InputError(path, what, f"is not YAML ({problem}{where})", "YAML, or JSON in a .json file") from None


def _list(source: str, key: str, value: Any, kind: type, expected: str, none: bool = False) -> tuple:
    if value is None:
        if none:
            return (None,)
        raise InputError(source, key, "is empty", expected)
    values = value if isinstance(value, list) else [value]
    if not values:
        raise InputError(source, key, "is an empty list", expected)
    out = []
    for i, v in enumerate(values):
        where = f"{key}[{i}]" if isinstance(value, list) else key
        if kind is str and isinstance(v, (str, int)) and not isinstance(v, bool):
            out.append(str(v))
        elif kind is int and isinstance(v, int) and not isinstance(v, bool) and v > 0:
            out.append(v)
        elif kind is float and isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1:
            out.append(float(v))
        else:
            raise InputError(source, where, f"is {v!r}", expected)
    return tuple(dict.fromkeys(out))


def _models(source: str, value: Any, where: str = "") -> list[tuple[str, str]]:
    items = value if isinstance(value, list) else [value]
    out = []
    for i, m in enumerate(items):
        if isinstance(m, str):
            m = {"target": m}
        if not isinstance(m, dict) or not isinstance(m.get("target"), str) or set(m) - {"target", "draft"}:
            raise InputError(source, f"{where}models[{i}]", f"is {m!r}", "{target: NAME, draft: NAME or none}")
        out.append((m["target"], str(m.get("draft", "none"))))
    if not out:
        raise InputError(source, f"{where}models", "is an empty list", "one {target, draft} at least")
    return out


def parse_prices(prices: Any, source: str, where: str) -> dict[str, float]:
    """GPU -> $ per hour, from a mapping ({rtx4090: 0.35}) or flags (['rtx4090=0.35'])."""
    if isinstance(prices, dict):
        items = list(prices.items())
    else:
        items = []
        for flag in prices:
            name, sep, value = str(flag).partition("=")
            if not sep or not name:
                raise InputError(source, where, f"'{flag}' is not NAME=PRICE", "e.g. --price rtx4090=0.35 ($ per hour)")
            items.append((name, value))
        twice = [n for n in dict.fromkeys(n for n, _ in items) if sum(m == n for m, _ in items) > 1]
        if twice:
            raise InputError(source, f"{where}.{twice[0]}", "is priced twice", "one price per GPU")
    out = {}
    for name, value in items:
        try:
            v = -1.0 if isinstance(value, bool) else float(value)  # true is no price
        except (TypeError, ValueError):
            v = -1.0
        if not math.isfinite(v) or v <= 0:
            raise InputError(source, f"{where}.{name}", f"is {value!r}", "a price in $ per hour > 0")
        out[str(name)] = v
    return out


def _check_day(day: Any, path: str) -> None:
    """A prices file's date: a real day written YYYY-MM-DD (not 2024-13-45)."""
    import datetime
    import re

    expected = "the day the prices were read, YYYY-MM-DD"
    if day is None:
        raise InputError(path, "date", "is missing", expected)
    if not isinstance(day, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", day):
        raise InputError(path, "date", f"is {day!r}", expected)
    try:
        datetime.date.fromisoformat(day)
    except ValueError:
        raise InputError(path, "date", f"{day!r} is not a day of the calendar", expected) from None


def load_prices(path: str) -> dict[str, float]:
    """A prices file: {"date": "YYYY-MM-DD", "source": "where they came from", "prices":
    {gpu: $ per hour}}. A price is a claim about a market on a day: without its date and its
    source it is refused."""
    data = read_mapping(path, "prices")
    if not isinstance(data, dict):
        raise InputError(path, "prices", "is not a mapping", '{"date": .., "source": .., "prices": {gpu: $/h}}')
    unknown = sorted(set(data) - {"date", "source", "prices", "note"})
    if unknown:
        raise InputError(path, unknown[0], "is not a prices-file key", "date, source, prices, note")
    _check_day(data.get("date"), path)
    if not isinstance(data.get("source"), str) or not data["source"].strip():
        raise InputError(path, "source", "is missing", "where the prices were read: a URL or a quote")
    if not isinstance(data.get("prices"), dict) or not data["prices"]:
        raise InputError(path, "prices", "is missing or empty", "{gpu: $ per hour}")
    return parse_prices(data["prices"], path, "prices")


def check_prices(prices: dict[str, float], gpus: tuple[str, ...], source: str) -> dict[str, float]:
    """`prices`, if every priced GPU is one the sweep plans (a typo would price nothing)."""
    for name in prices:
        if name not in gpus:
            raise InputError(source, name, "is not a GPU of this sweep", ", ".join(gpus))
    return prices


# ---- one point --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Resolved:
    point: SweepPoint
    profile: Any
    target: ModelSpec
    draft: ModelSpec | None
    workload: Workload
    key: str


def resolve(point: SweepPoint) -> Resolved:
    """The point's profile, models and workload (a bad name fails here, before any planning)."""
    from specplan.cli import profile_from_flags

    profile = profile_from_flags(point.gpu, point.pcie, None, point.host_mem, None)
    target = ModelSpec.resolve(point.target)
    draft = resolve_draft(point.draft, target, "draft")
    if point.weights:
        from specplan.formats import parse_weights
        from specplan.models import apply_weights

        choice = parse_weights(point.weights)
        if choice.auto:
            raise InputError("argument", "--weights", "auto is not a sweep axis", "fixed formats, e.g. int4")
        target, draft = apply_weights(target, draft, choice.fixed)
    workload = Workload.make(point.prompt_len, point.gen_len, point.num_prompts, point.acceptance, source="sweep")
    workload.check_positions("sweep", target, *([draft] if draft else []))
    key = sha256_of({"profile": profile.to_dict(), "workload": workload.to_dict(), "code": code_fingerprint(),
                     "target": [target.hf_config, model_shape(target)], "weights": point.weights,
                     "draft": [draft.hf_config, model_shape(draft)] if draft else None})
    return Resolved(point, profile, target, draft, workload, key)


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of specplan's Python sources (the planner's and everything it calls)."""
    import specplan
    import specplan.planner
    import specplan.simulator

    h = hashlib.sha256(__version__.encode())
    for pkg in (specplan, specplan.planner, specplan.simulator):
        for f in sorted(Path(pkg.__file__).parent.glob("*.py")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def binding(sim, placement, profile, rows_held_by: str | None = None) -> str:
    """What limits the plan: its busiest resource (share of the wall time), the memory that
    holds its batch where one does (`rows_held_by`, see rows_limit), and the memories it fills
    or works around."""
    util = sim.utilisation
    top = max(util, key=util.get)
    parts = [f"{RESOURCE_NAMES.get(top, top)} {util[top]:.0%}"]
    if rows_held_by:
        parts.append(f"rows held by {rows_held_by}")
    gpu_cap = profile.gpu.memory_bytes - profile.gpu.reserved_bytes
    if sim.peak_gpu_bytes >= FULL * gpu_cap and rows_held_by != "GPU memory":
        parts.append("GPU memory full")
    pinned_cap = profile.host.memory_bytes * profile.host.pinned_fraction
    if "disk" in (placement.ffn, placement.attention):
        parts.append("host memory (weights on disk)")
    elif (sim.peak_pinned_bytes >= FULL * pinned_cap or "cpu_pageable" in (placement.ffn, placement.attention)) \
            and rows_held_by not in ("host memory", "pinned host memory"):
        parts.append("host memory")
    if placement.draft_kv == "cpu":
        parts.append("draft KV on host")
    elif placement.draft_kv == "recompute":
        parts.append("draft KV recomputed")
    return ", ".join(parts)


def rows_limit(target, draft, schedule, placement, workload, profile) -> str | None:
    """The memory (GPU, host, pinned host) that twice the rows per batch (as many as the job
    has, at most) would overflow with this placement, or None where they would fit or every
    prompt is in flight already. (The next size up need not help: a job of 512 prompts runs
    2 x 192 rows in two waves, as slow as 2 x 128.)"""
    from specplan.memory import plan_memory

    cap = max(1, workload.num_prompts // schedule.num_batches)
    if schedule.target_batch >= cap:
        return None
    sch = replace(schedule, target_batch=min(2 * schedule.target_batch, cap))
    broken = plan_memory(target, draft, sch, placement, workload).violations(profile)
    return broken[0].split(":")[0] if broken else None


def plan_point(r: Resolved, memo=None) -> dict:
    """`optimize` at one point, serially (the sweep runs points side by side), as a result row.
    `memo` (optimize.Memo) carries work over from the same machine with another host size."""
    from .optimize import make_plan, optimize

    base = {"point": asdict(r.point), "key": r.key, "machine": r.point.machine}
    try:
        res = optimize(r.target, r.draft, r.profile, r.workload, processes=1, memo=memo)
    except InfeasibleError as e:
        return {**base, "status": "infeasible", "why": str(e)}
    best = res.best
    sch, pl = best.candidate.shape.schedule(best.candidate.prefetch_depth), best.candidate.placement
    plan = make_plan(best, r.point.target, r.point.draft if r.draft else None, r.target, r.draft, r.profile, r.workload)
    non_spec = res.best_of(("flexgen", "sequential"))
    return {**base, "status": "ok", "why": None, "policy": sch.policy, "tok_s": best.tok_s,
            "program_tok_s": best.candidate.estimate_tok_s, "job_s": best.sim.workload_s,
            "generated_tokens": r.workload.num_prompts * r.workload.gen_len,
            "rows": f"{sch.num_batches} x {sch.target_batch}", "gamma": sch.gamma if sch.speculative else None,
            "admission": sch.admission,
            "binds": binding(best.sim, pl, r.profile, rows_limit(r.target, r.draft, sch, pl, r.workload, r.profile)),
            "best_non_speculative_tok_s": non_spec.tok_s if non_spec else None,
            # policies whose best was not simulated (it could not reach the winner): their estimates
            "unsimulated_program_tok_s": {p: c.estimate_tok_s for p, c in res.unsimulated.items()},
            "peak_gpu_bytes": best.sim.peak_gpu_bytes, "peak_pinned_bytes": best.sim.peak_pinned_bytes,
            "utilisation": best.sim.utilisation, "plan": plan.to_dict()}


def _plan_group(group: list[Resolved], cache_dir: str | None) -> list[dict]:
    """Points that differ only in host memory, one after another (they share a Memo), each
    written to the cache as soon as it is planned; the rows in the group's order."""
    from .optimize import Memo

    memo, rows = Memo(), {}
    # the smallest host first: each program then starts from the best of the size before (Memo.optima)
    for i in sorted(range(len(group)), key=lambda i: group[i].profile.host.memory_bytes):
        rows[i] = plan_point(group[i], memo)
        if cache_dir:
            write_json(Path(cache_dir) / f"{group[i].key}.json", rows[i])
    return [rows[i] for i in range(len(group))]


def cached(r: Resolved, cache_dir: str | None) -> dict | None:
    """The point's cached row, if one was written for exactly these inputs and this code."""
    if not cache_dir:
        return None
    path = Path(cache_dir) / f"{r.key}.json"
    try:
        row = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or unreadable: plan it again
        return None
    if not isinstance(row, dict) or row.get("key") != r.key:
        return None
    # another spelling of the same point (--pcie 4 and --pcie pcie4x16) shares the row: label it as asked
    return {**row, "point": asdict(r.point), "machine": r.point.machine}


def default_cache_dir() -> str:
    return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "specplan" / "sweep")


@dataclass
class SweepResult:
    rows: list[dict]  # in grid order
    planned: int  # points planned now (the rest came from the cache)


def run_sweep(points: list[SweepPoint], cache_dir: str | None, progress=None) -> SweepResult:
    """Every point's row, from the cache where it holds one; the rest planned in processes."""
    from specplan.progress import Steps

    from .optimize import map_in_processes, parallel_workers

    bar = progress or Steps(None, None)
    resolved = [resolve(p) for p in points]
    rows: list[dict | None] = [cached(r, cache_dir) for r in resolved]
    todo = [i for i, row in enumerate(rows) if row is None]
    first_of: dict[str, int] = {}  # points spelled differently that resolve alike are planned once
    for i in todo:
        first_of.setdefault(resolved[i].key, i)
    groups: dict[tuple, list[int]] = {}  # the points of one machine but for its host memory, together
    for i in first_of.values():
        groups.setdefault(replace(points[i], host_mem=None), []).append(i)
    jobs = list(groups.values())
    workers = parallel_workers(len(jobs))
    bar.say(f"planning {len(todo)} of {len(points)} points" + (f" in {workers} processes" if workers > 1 else "")
            + (f" ({len(points) - len(todo)} cached)" if len(todo) < len(points) else ""))
    bar.set(0, len(jobs))
    done = map_in_processes(_plan_group, [([resolved[i] for i in idx], cache_dir) for idx in jobs], workers,
                            bar.advance)
    for idx, group_rows in zip(jobs, done):
        for i, row in zip(idx, group_rows):
            rows[i] = row
    for i in todo:
        if rows[i] is None:  # an alias of a point planned above
            twin = rows[first_of[resolved[i].key]]
            rows[i] = {**twin, "point": asdict(points[i]), "machine": points[i].machine}
    return SweepResult([r for r in rows if r is not None], len(first_of))


def price_rows(rows: list[dict], prices: dict[str, float]) -> None:
    """$ per million generated tokens, and the job's time and cost, where the GPU has a price."""
    for row in rows:
        price = prices.get(row["point"]["gpu"])
        row["usd_per_hour"] = price
        if price is None or row["status"] != "ok" or row["tok_s"] <= 0:
            row["usd_per_mtok"] = row["job_usd"] = None
            continue
        row["usd_per_mtok"] = price / 3600.0 / row["tok_s"] * 1e6
        row["job_usd"] = price * row["job_s"] / 3600.0


def sort_rows(rows: list[dict], by: str) -> list[dict]:
    """Best first: highest tok/s, or lowest $ per million tokens (unpriced and infeasible last)."""
    if by == "cost":
        return sorted(rows, key=lambda r: (r.get("usd_per_mtok") is None, r.get("usd_per_mtok") or 0.0,
                                           -(r.get("tok_s") or 0.0)))
    return sorted(rows, key=lambda r: (r["status"] != "ok", -(r.get("tok_s") or 0.0)))


CSV_COLUMNS = ("target", "draft", "gpu", "pcie", "host_mem", "prompt_len", "gen_len", "num_prompts", "acceptance",
               "status", "policy", "rows", "gamma", "admission", "tok_s", "program_tok_s", "job_s",
               "best_non_speculative_tok_s", "unsimulated_program_tok_s", "usd_per_hour", "usd_per_mtok", "job_usd",
               "binds", "why")


def csv_text(rows: list[dict]) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for r in rows:
        merged = {**r["point"], **{k: v for k, v in r.items() if k != "point"}}
        merged["unsimulated_program_tok_s"] = " ".join(f"{p}={v:.2f}" for p, v in
                                                      (merged.get("unsimulated_program_tok_s") or {}).items())
        w.writerow(["" if merged.get(c) is None else merged.get(c) for c in CSV_COLUMNS])
    return buf.getvalue()
