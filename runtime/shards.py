"""A dataset job cut into shards, each shard's results in a file of its own, merged at the end.

The job's output OUT.jsonl is written once, at the end, from the shard files in OUT.jsonl.shards/
(`shard-NNNNN.jsonl`, one result line per finished row, the single-machine job's line format).
Each shard file is one assignment of rows to one worker and has one writer: the job's driver,
which appends a row the moment the worker hands it over. A row whose worker was lost before
handing it over is in no file and runs again in a new shard, so no id is ever written twice.

Resuming (`--resume`) reads the ids of OUT.jsonl (a job merged earlier) and of every shard file
(torn last lines not counted), and cuts the rows still to run into new shards; the merge copies
each id's line once, in input order, and refuses an id found in two places.
"""

from __future__ import annotations

import os
import shutil
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from specplan.errors import InputError, SpecplanError

from .jobio import _fsync_dir, result_lines, resume_state, sidecar_path


def shards_dir(output: Path) -> Path:
    return output.with_name(output.name + ".shards")


def shard_path(output: Path, shard: int) -> Path:
    return shards_dir(output) / f"shard-{shard:05d}.jsonl"


def _shard_files(output: Path) -> list[tuple[int, Path]]:
    d = shards_dir(output)
    found = []
    for f in sorted(d.glob("shard-*.jsonl")) if d.is_dir() else []:
        try:
            found.append((int(f.stem.split("-", 1)[1]), f))
        except ValueError:
            continue  # not one of ours
    return found


@dataclass(frozen=True)
class Shard:
    id: int
    places: tuple[int, ...]  # the rows' places in the input


def prepare(output: Path, identity: dict, resume: bool, input_ids: set[str] | None = None, repair: bool = False,
            say=None, legacy=None) -> tuple[set[str], int]:
    """Check OUT and its shards against this job (the single-machine job's rules: an existing
    output needs --resume, --resume refuses another job's, and an id written twice or not in
    the input is refused, or with `repair` dropped); returns the ids done and the first free
    shard number. Writes nothing but a repair."""
    shards = _shard_files(output)
    if shards and not resume:
        raise InputError("--output", str(shards_dir(output)), "holds an unfinished job's shards",
                         "--resume to continue that job, or a new path")
    if shards and not sidecar_path(output).exists():
        raise InputError(str(shards_dir(output)), "job", f"has no {sidecar_path(output).name} beside {output.name}, "
                         "so which job wrote it is unknown", "the shards and .job.json specplan batch wrote")
    done, _ = resume_state(output, identity, resume, input_ids, repair, say, legacy, also=[f for _, f in shards])
    return done, max((n for n, _ in shards), default=-1) + 1


class ShardQueue:
    """The rows still to hand out: new shards are cut from the front of `todo` on demand, of
    the size the asking worker wants; rows given back (their worker was lost) go out first,
    as a new shard."""

    def __init__(self, todo: list[int], first_id: int = 0):
        self._todo = deque(todo)
        self._back: deque[tuple[int, ...]] = deque()
        self._next = first_id

    def __len__(self) -> int:
        return len(self._todo) + sum(len(b) for b in self._back)

    def cut(self, rows: int) -> Shard | None:
        if self._back:
            places = self._back.popleft()
        elif self._todo:
            places = tuple(self._todo.popleft() for _ in range(min(rows, len(self._todo))))
        else:
            return None
        self._next += 1
        return Shard(self._next - 1, places)

    def give_back(self, places: list[int]) -> None:
        if places:
            self._back.append(tuple(places))


def merge(output: Path, ids_in_order: list[str]) -> int:
    """Write OUT (atomically: a temporary file renamed over it) with each id's result line once,
    in input order, from OUT as merged before and the shard files; then remove the shards.
    Every id must be found exactly once. Returns the rows written."""
    where: dict[str, tuple[Path, int, int]] = {}
    for f in [output] + [f for _, f in _shard_files(output)]:
        for rid, start, end in result_lines(f)[0]:
            if rid in where:
                raise SpecplanError(f"{output}: id {rid!r} is in {where[rid][0]} and in {f}; "
                                    "the job's ledger was broken, nothing merged")
            where[rid] = (f, start, end)
    missing = [i for i in ids_in_order if i not in where]
    if missing:
        raise SpecplanError(f"{output}: {len(missing)} rows have no result yet (first: {missing[0]!r}); "
                            "--resume runs them")
    tmp = output.with_name(f".{output.name}.merging")
    handles: dict[Path, object] = {}
    try:
        with open(tmp, "wb") as out:
            for rid in ids_in_order:
                f, start, end = where[rid]
                fh = handles.get(f) or handles.setdefault(f, open(f, "rb"))
                fh.seek(start)
                out.write(fh.read(end - start))
            out.flush()
            os.fsync(out.fileno())
    finally:
        for fh in handles.values():
            fh.close()
    os.replace(tmp, output)
    _fsync_dir(output.parent)
    shutil.rmtree(shards_dir(output), ignore_errors=True)
    return len(ids_in_order)
