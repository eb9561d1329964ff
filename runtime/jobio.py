"""The dataset job's files: the prompts it reads and the results it streams to disk.

Input (`read_dataset`): .txt (one prompt per line: token ids, or text through the target's
tokenizer), .jsonl (one object a line: `id`, and `prompt` or `messages`, the latter through
the tokenizer's chat template), .parquet, or a Hugging Face `datasets` directory saved with
`save_to_disk` (both read with pyarrow; `column` picks the text column). A row may set
`max_tokens`, `stop`, and its own sampling (`temperature`, 0 greedy; `top_p`; `top_k`;
`seed`, which keys its random stream by itself); rows without an id get their line (or row)
number. A .txt or .jsonl may be gzip-compressed (`data.jsonl.gz`).

Output (`JobWriter`): one JSON object a line, appended as each row finishes, flushed at
once and fsync'd at a bounded interval, so a crash loses at most the rows of the last
interval; a torn last line (a kill mid-write) is cut off when the job resumes, never read as
a result. Beside it, `OUT.job.json` records hashes of the plan, the models and the input, and
`--resume` refuses an output made by another job.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specplan.errors import InputError
from specplan.fileio import read_text, write_atomic, write_json

from .sampling import MAX_SEED, MIN_TEMPERATURE

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed")  # a row's own sampling (sampling.SamplingParams.row)
ROW_FIELDS = {"id", "prompt", "messages", "max_tokens", "stop", *SAMPLING_FIELDS}
FSYNC_EVERY_S = 2.0


@dataclass(frozen=True)
class JobRow:
    id: str
    ids: tuple[int, ...]  # the prompt's token ids (chat template applied)
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    sampling: tuple[tuple[str, float | int], ...] = ()  # the SAMPLING_FIELDS the row sets, in that order


@dataclass
class Dataset:
    path: Path
    rows: list[JobRow]
    sha256: str  # of the input file (or directory's files), for resume
    chat: bool = False  # some row went through the chat template
    tokenizer: Any = None  # the one that read the text rows, if any did


# ---- reading ------------------------------------------------------------------------------------------


def _file_hash(path: Path) -> str:
    """The input's content, not its name (a moved or renamed copy is the same input): its
    format (.jsonl, .txt, parquet, a datasets directory) and its bytes, uncompressed where it is
    gzipped; a datasets directory's .arrow files by their names within it and their bytes."""
    import gzip

    h = hashlib.sha256(("datasets" if path.is_dir() else _kind(path)).encode() + b"\0")
    files = sorted(path.glob("*.arrow")) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(f.name.encode() + b"\0")
        _hash_file(h, f, gzip.open if f.suffix == ".gz" else open)
    return h.hexdigest()[:16]


def _hash_file(h, path: Path, opener=open) -> None:
    with opener(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)


def legacy_identity(identity: dict, dataset: "Dataset") -> dict:
    """`identity` as specplan 0.1.0 before the input counted by its content recorded it (the
    input's path, and a hash of its files' names and bytes): an output it wrote still resumes."""
    path = dataset.path
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        h.update(f.name.encode())
        _hash_file(h, f)
    return {**identity, "input": str(path.resolve()), "input_sha256": h.hexdigest()[:16]}


def _ids_or_none(text: str) -> list[int] | None:
    words = text.split()
    return [int(w) for w in words] if words and all(w.isascii() and w.isdigit() for w in words) else None


def _lines(text: str) -> list[str]:
    """Lines split at \n only (str.splitlines also splits at U+2028 and other characters a
    JSON string may hold raw)."""
    return [ln.rstrip("\r") for ln in text.split("\n")]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def has_tokenizer(model_dir: Path | None) -> bool:
    """A model directory with tokenizer files, or a GGUF file (its metadata holds one)."""
    if model_dir is not None and model_dir.suffix.lower() == ".gguf":
        return model_dir.is_file()
    return model_dir is not None and any((model_dir / f).exists() for f in TOKENIZER_FILES)


def load_tokenizer(model_dir: Path | None) -> Any:
    """The model directory's tokenizer (or a GGUF file's, with its chat template), or None
    when it has none (a preset, or weights only)."""
    if not has_tokenizer(model_dir):
        return None
    from transformers import AutoTokenizer

    if model_dir.suffix.lower() == ".gguf":
        return AutoTokenizer.from_pretrained(str(model_dir.parent), gguf_file=model_dir.name, local_files_only=True)
    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


class _Encoder:
    """Text -> token ids through the target's tokenizer, loaded on first need."""

    def __init__(self, model_dir: Path | None, source: str):
        self.model_dir, self.source, self._tok = model_dir, source, None

    def tokenizer(self, where: str):
        if self._tok is None:
            self._tok = load_tokenizer(self.model_dir)
            if self._tok is None:
                raise InputError(self.source, where, "is text, and the target has no tokenizer to read it "
                                 f"({'a preset has none' if self.model_dir is None else f'none in {self.model_dir}'})",
                                 "token ids separated by spaces, or --target a model directory with a tokenizer")
        return self._tok

    def text(self, text: str, where: str) -> list[int]:
        ids = _ids_or_none(text)
        return ids if ids is not None else self.tokenizer(where).encode(text)

    def chat(self, messages: Any, where: str) -> list[int]:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise InputError(self.source, f"{where}: messages", "is not a list of {role, content} objects",
                             '[{"role": "user", "content": "..."}]')
        tok = self.tokenizer(where)
        if not getattr(tok, "chat_template", None):
            raise InputError(self.source, f"{where}: messages", f"need a chat template and {self.model_dir} has none",
                             "a tokenizer_config.json with chat_template, or rows with 'prompt'")
        # the template writes its own special tokens (BOS, turn markers) into the text
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tok.encode(text, add_special_tokens=False)


def _row(obj: dict, where: str, fallback_id: str, enc: _Encoder, source: str) -> JobRow:
    if not isinstance(obj, dict):
        raise InputError(source, where, "is not a JSON object", '{"id": ..., "prompt": "..."}')
    unknown = set(obj) - ROW_FIELDS
    if unknown:
        raise InputError(source, f"{where}: {', '.join(sorted(unknown))}", "unknown field", ", ".join(sorted(ROW_FIELDS)))
    if ("prompt" in obj) == ("messages" in obj):
        raise InputError(source, where, "needs exactly one of 'prompt' and 'messages'", '"prompt": "..." or "messages": [...]')
    rid = obj.get("id", fallback_id)
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise InputError(source, f"{where}: id", f"got {rid!r}", "a string or an integer")
    if "prompt" in obj:
        prompt = obj["prompt"]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = prompt  # token ids, given as a list
        elif isinstance(prompt, str) and prompt.strip():
            ids = enc.tokenizer(where).encode(prompt)  # a string is text (ids go in a list)
        else:
            raise InputError(source, f"{where}: prompt", "is empty, or neither a string nor a list of token ids",
                             'a non-empty string, or a list of token ids')
    else:
        ids = enc.chat(obj["messages"], where)
    if not ids:
        raise InputError(source, f"{where}: prompt", "has no tokens", "a prompt of at least one token")
    mt = obj.get("max_tokens")
    if mt is not None and (not isinstance(mt, int) or isinstance(mt, bool) or mt < 1):
        raise InputError(source, f"{where}: max_tokens", f"got {mt!r}", "a positive integer")
    stop = obj.get("stop", ())
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise InputError(source, f"{where}: stop", f"got {obj.get('stop')!r}", "a string or a list of non-empty strings")
    return JobRow(str(rid), tuple(ids), mt, tuple(stop), _row_sampling(obj, where, source))


def _row_sampling(obj: dict, where: str, source: str) -> tuple[tuple[str, float | int], ...]:
    """The sampling fields a row sets, checked."""
    import math

    out = []
    for name in SAMPLING_FIELDS:
        if name not in obj:
            continue
        v = obj[name]
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        integer = number and isinstance(v, int)
        ok, expected = {
            "temperature": (number and (v == 0 or v >= MIN_TEMPERATURE), f"0 (greedy) or a number >= {MIN_TEMPERATURE}"),
            "top_p": (number and 0 < v <= 1, "a probability mass in (0, 1]"),
            "top_k": (integer and v >= 0, "an integer >= 0 (0 keeps every token)"),
            "seed": (integer and 0 <= v < MAX_SEED, "an integer in [0, 2^63)"),
        }[name]
        if not ok:
            raise InputError(source, f"{where}: {name}", f"got {v!r}", expected)
        out.append((name, float(v) if name in ("temperature", "top_p") else v))
    return tuple(out)


def _kind(path: Path) -> str:
    """A file's format by its name: data.jsonl.gz is a .jsonl."""
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _arrow_rows(path: Path, column: str | None):
    """(where, record) from a parquet file or a `save_to_disk` directory of arrow files."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(str(path), "file", "is parquet or a datasets directory, which needs pyarrow",
                         "pip install pyarrow, or a .jsonl / .txt file") from None
    if path.is_dir():
        files = sorted(path.glob("*.arrow"))
        if not files:
            raise InputError(str(path), "directory", "holds no .arrow files", "a directory written by datasets' save_to_disk")
        tables = []
        for f in files:
            try:
                with pa.memory_map(str(f)) as src:
                    try:
                        tables.append(pa.ipc.open_stream(src).read_all())
                    except pa.ArrowInvalid:
                        src.seek(0)
                        tables.append(pa.ipc.open_file(src).read_all())
            except (pa.ArrowException, OSError) as e:
                raise InputError(str(f), "file", f"is not a readable Arrow file ({_first_line(e)})",
                                 "the .arrow files datasets' save_to_disk writes") from None
        try:
            table = pa.concat_tables(tables)
        except pa.ArrowException as e:
            raise InputError(str(path), "directory", f"holds .arrow files of different columns ({_first_line(e)})",
                             "one dataset's files, written by save_to_disk") from None
    else:
        try:
            table = pq.read_table(str(path))
        except (pa.ArrowException, OSError) as e:
            raise InputError(str(path), "file", f"is not a readable parquet file ({_first_line(e)})",
                             "a parquet file, e.g. written by pandas' to_parquet") from None
    names = table.column_names
    text_col = column or ("prompt" if "prompt" in names else "messages" if "messages" in names else None)
    if text_col is None or text_col not in names:
        raise InputError(str(path), f"column {column or 'prompt'}", "does not exist",
                         f"--column one of {', '.join(names)}")
    keep = [c for c in names if c in ROW_FIELDS and c != text_col] + [text_col]
    for i, rec in enumerate(table.select(keep).to_pylist()):
        text = rec.pop(text_col)
        key = "messages" if isinstance(text, list) and text and isinstance(text[0], dict) else "prompt"
        yield f"row {i}", {k: v for k, v in rec.items() if v is not None} | {key: text}


def read_dataset(path: str | Path, model_dir: Path | None, vocab: int, column: str | None = None) -> Dataset:
    """Every row of a dataset job, tokenized and checked (see the module's docstring)."""
    path = Path(path)
    source = str(path)
    enc = _Encoder(model_dir, source)
    rows: list[JobRow] = []
    chat = False
    if not path.exists():
        raise InputError(source, "file", "does not exist", "a .txt, .jsonl or .parquet file or a datasets directory")
    if path.is_dir() or path.suffix == ".parquet":
        for where, obj in _arrow_rows(path, column):
            chat |= "messages" in obj
            rows.append(_row(obj, where, where.split()[-1], enc, source))
    elif _kind(path) in (".jsonl", ".json"):
        if column is not None:
            obj_key = column
        for n, line in enumerate(_lines(read_text(path, "a UTF-8 JSONL file, one object a line")), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(source, f"line {n}", f"is not JSON ({e.msg} at column {e.colno})",
                                 '{"id": ..., "prompt": "..."} a line') from None
            if column is not None and isinstance(obj, dict):
                if obj_key not in obj:
                    raise InputError(source, f"line {n}: {obj_key}", "is missing", f"a '{obj_key}' field (--column)")
                v = obj[obj_key]
                key = "messages" if isinstance(v, list) and v and isinstance(v[0], dict) else "prompt"
                obj = {k: x for k, x in obj.items() if k in ROW_FIELDS and k not in ("prompt", "messages")} \
                    | {key: v}
            chat |= isinstance(obj, dict) and "messages" in obj
            rows.append(_row(obj, f"line {n}", str(n), enc, source))
    else:
        for n, line in enumerate(_lines(read_text(path, "a UTF-8 text file, one prompt per line")), 1):
            if line.strip():
                ids = enc.text(line, f"line {n}")
                if not ids:
                    raise InputError(source, f"line {n}", "has no tokens", "a prompt of at least one token")
                rows.append(JobRow(str(n), tuple(ids)))
    if not rows:
        raise InputError(source, "file", "has no prompts", "one prompt per line or row")
    seen: dict[str, int] = {}
    for i, r in enumerate(rows):
        if r.id in seen:
            raise InputError(source, f"id {r.id!r}", f"appears twice (rows {seen[r.id] + 1} and {i + 1})", "unique ids")
        seen[r.id] = i
        if max(r.ids) >= vocab or min(r.ids) < 0:
            raise InputError(source, f"id {r.id!r}", "has token ids outside the vocabulary", f"ids in [0, {vocab})")
    return Dataset(path, rows, _file_hash(path), chat, enc._tok)


# ---- writing and resuming -----------------------------------------------------------------------------


def sidecar_path(output: Path) -> Path:
    return output.with_name(output.name + ".job.json")


def job_identity(plan_sha: str, target: str, draft: str | None, dataset: Dataset, settings: dict) -> dict:
    """What makes two runs the same job: resuming one with another's output is refused. The
    input counts by its content (a moved or renamed copy is the same input)."""
    return {"plan": plan_sha, "target": target, "draft": draft, "input_sha256": dataset.sha256, "settings": settings}


def result_lines(output: Path, data: bytes | None = None) -> tuple[list[tuple[str, int, int]], int]:
    """(id, start, end) byte offsets of every complete result line of `output` (read, unless
    its bytes are given), and where its complete lines end (none, and 0, if it does not
    exist): a torn last line, from a kill mid-write, is not one, and is cut off before appending."""
    if data is None:
        if not output.exists():
            return [], 0
        data = output.read_bytes()
    end = data.rfind(b"\n") + 1  # everything after the last newline is a torn line
    found: list[tuple[str, int, int]] = []
    at = 0
    for n, line in enumerate(data[:end].split(b"\n")[:-1], 1):
        start, at = at, at + len(line) + 1
        if not line.strip():
            continue
        try:
            found.append((str(json.loads(line)["id"]), start, at))
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise InputError(str(output), f"line {n}", "is not a result line of specrun",
                             "an output written by specrun --output") from None
    return found, end


def read_done(output: Path) -> tuple[set[str], int]:
    """Ids already in `output`, and the byte length of its complete lines."""
    lines, end = result_lines(output)
    return {i for i, _, _ in lines}, end


def audit_results(files: list[Path], input_ids: set[str], repair: bool,
                  say=None) -> tuple[set[str], dict[Path, int]]:
    """The ids done in a job's result files (its output, a batch's shards), each checked: an
    id written twice, or one the input does not hold, is refused with the id named; with
    `repair`, the extra lines are dropped (the file rewritten atomically, each drop said).
    Also where each file's complete lines end (result_lines). Each file is read once."""
    seen: dict[str, Path] = {}
    ends: dict[Path, int] = {}
    for f in files:
        data = f.read_bytes() if f.exists() else b""
        lines, ends[f] = result_lines(f, data)
        keep = []
        for rid, start, stop in lines:
            if rid in seen:
                why = f"has two result lines in {f}" if seen[rid] == f else f"has result lines in {seen[rid]} and in {f}"
            elif rid not in input_ids:
                why = "is not in the input, so this line is another job's"
            else:
                seen[rid] = f
                keep.append((start, stop))
                continue
            if not repair:
                raise InputError(str(f), f"id {rid!r}", why,
                                 "--resume --repair to keep each input id's first line and drop the others")
            if say is not None:
                say(f"{f}: dropped the line of id {rid!r}: it {why}")
        if len(keep) < len(lines):
            kept = b"".join(data[a:b] for a, b in keep)
            write_atomic(f, kept)
            ends[f] = len(kept)
    return set(seen), ends


def resume_state(output: Path, identity: dict, resume: bool, input_ids: set[str] | None = None,
                 repair: bool = False, say=None, legacy=None, also: list[Path] = ()) -> tuple[set[str], int]:
    """Check `output` against this job and read what is done: the ids it (and the result files
    `also`, a batch's shards) hold, and where appending to it starts. Refused: an existing
    output without --resume, one whose .job.json records another job, and (given `input_ids`)
    an id written twice or one the input lacks (audit_results; `repair` drops those lines
    instead). `legacy()`: the identity as an earlier format of .job.json recorded it
    (legacy_identity), for outputs it wrote."""
    side = sidecar_path(output)
    if resume and (output.exists() or side.exists()):
        if not side.exists():
            raise InputError(str(output), "job", f"has no {side.name} beside it, so which job wrote it is unknown",
                             "an output written by specrun --output, with its .job.json")
        from specplan.fileio import read_json

        theirs = read_json(side)
        if not isinstance(theirs, dict):
            raise InputError(str(side), "top level", "is not a JSON object", "the .job.json specrun wrote")
        diff = [k for k in identity if theirs.get(k) != identity[k]]
        if diff and legacy is not None and "input" in theirs:  # written before the input counted by content
            old = legacy()
            diff = [k for k in old if theirs.get(k) != old[k]]
        if diff:
            raise InputError(str(side), ", ".join(diff), "differ from this job's, so its results are another job's",
                             "--resume with the plan, models, input and sampling that wrote it, or a new --output")
        if input_ids is not None:
            done, ends = audit_results([output, *also], input_ids, repair, say)
            return done, ends[output]
        done, end = read_done(output)
        return done.union(*(read_done(f)[0] for f in also)), end
    if output.exists() and not resume:
        raise InputError("--output", str(output), "exists", "--resume to continue that job, or a new path")
    return set(), 0


@dataclass
class JobWriter:
    """Appends one result line per finished row and flushes it at once; a timer thread
    fsyncs what was written at most FSYNC_EVERY_S seconds later (and close does), so a
    machine crash loses at most that interval's rows whether or not more rows finish."""

    path: Path
    fsync_every_s: float = FSYNC_EVERY_S
    written: int = 0
    syncs: int = 0  # fsyncs of the output so far
    _fh: Any = field(default=None, repr=False)
    _dirty: bool = False  # written since the last fsync
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _syncer: threading.Thread | None = field(default=None, repr=False)
    _error: OSError | None = field(default=None, repr=False)  # a failed fsync of the timer thread

    identity: dict | None = field(default_factory=dict)  # recorded beside the output; None: nothing beside it
    _end: int = 0  # where appending starts: after the last complete line

    @classmethod
    def prepare(cls, output: Path, identity: dict, resume: bool, input_ids: set[str] | None = None,
                repair: bool = False, say=None, legacy=None) -> tuple["JobWriter", set[str]]:
        """Check the output against this job and read what is done (resume_state); writes
        nothing but a --repair's fixes (start() does, once the run is sure to begin, so a
        refused plan leaves no file behind)."""
        done, end = resume_state(output, identity, resume, input_ids, repair, say, legacy)
        return cls(output, identity=identity, _end=end), done

    @classmethod
    def open(cls, output: Path, identity: dict, resume: bool) -> tuple["JobWriter", set[str]]:
        w, done = cls.prepare(output, identity, resume)
        w.start()
        return w, done

    def start(self) -> None:
        """Record the job beside the output and open it for appending (a torn last line cut)."""
        if self._fh is not None:
            return
        if self.identity is not None:
            write_json(sidecar_path(self.path), self.identity)
        new = not self.path.exists()
        fh = open(self.path, "r+b" if not new else "wb")
        fh.truncate(self._end)
        fh.seek(self._end)
        if new:  # the file's directory entry survives a crash too
            _fsync_dir(self.path.parent)
        self._fh = fh
        self._syncer = threading.Thread(target=self._sync_loop, name="output-fsync", daemon=True)
        self._syncer.start()

    def write(self, record: dict) -> None:
        if self._error is not None:  # the timer's fsync failed: say so here, not never
            raise self._error
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        with self._lock:
            self._fh.write(line)
            self._fh.flush()
            self.written += 1
            self._dirty = True

    def _sync(self) -> None:
        """fsync what was written, outside the lock (a slow disk must not hold up a write);
        the file stays open until close, which joins this thread first."""
        with self._lock:
            if not self._dirty or self._fh is None:
                return
            self._dirty = False
            fd = self._fh.fileno()
        os.fsync(fd)
        self.syncs += 1

    def _sync_loop(self) -> None:
        try:
            while not self._stop.wait(self.fsync_every_s):
                self._sync()
        except OSError as e:
            self._error = e

    def close(self) -> None:
        if self._fh is None:
            return
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join()
        try:
            self._sync()
        finally:
            with self._lock:
                self._fh.close()
                self._fh = None
        if self._error is not None:
            raise self._error


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not every filesystem lets a directory be opened; the data itself is still synced
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
