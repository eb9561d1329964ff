"""Atomic file writes and JSON reading with errors that name the file."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable

from .errors import InputError


def _file_mode(path: Path) -> int:
    """The permissions `path` should end with: an existing file's own, else what the umask
    gives a new file (mkstemp's temporary file is private, 0600)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    perms = _file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, perms)
        with os.fdopen(fd, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    return write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def check_writable(path: str | Path, source: str) -> Path:
    """Refuse, before any work, an output path that cannot be written: a directory, a path
    under a file, or a folder where no file can be created (probed with a temporary file in
    the nearest folder that exists; missing folders below it are created when writing).
    `source` names the option, e.g. "--out"."""
    path = Path(path)
    if path.is_dir():
        raise InputError(source, str(path), "is a directory", "a file path")
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(source, str(path), f"cannot be created: {parent} is not a directory", "a path in a writable directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", dir=parent)
    except OSError as e:
        raise InputError(source, str(path), f"cannot be written ({e.strerror} in {parent})",
                         "a path in a writable directory") from None
    os.close(fd)
    os.unlink(probe)
    return path


def _same_file(a: Path, b: Path) -> bool:
    """The same file: one resolved path, or one inode (a hard link, a bind mount)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def _files_read(path: Path, whole: bool) -> Iterable[Path]:
    """What reading `path` reads: the file itself, a folder's files (a model's config and
    weights); a `whole` folder (a datasets directory) is read entire, new files included."""
    if not path.is_dir() or whole:
        return [path]
    try:
        return [f for f in path.iterdir() if f.is_file()]
    except OSError:  # a folder we may not list: its reader will say so
        return []


def check_not_inputs(writes: Iterable[tuple], reads: Iterable[tuple]) -> None:
    """The rule for every file a command writes: it is none of the files the same command reads,
    nor another of its outputs. Compared by resolved path and by inode, before any work.
    `writes` and `reads` are (option, path) pairs (path None: not given). A third item True
    marks a folder used entire: a read folder (a datasets directory) in which no output may
    go, or a written folder (shards, removed after the merge) that may hold no input.
    Refused with both options named (exit 2)."""
    outs = [(flag, Path(p), bool(rest and rest[0])) for flag, p, *rest in writes if p is not None]
    ins = []
    for flag, p, *rest in reads:
        whole = bool(rest and rest[0])
        if p is not None and Path(p).exists():
            ins += [(flag, f, whole) for f in _files_read(Path(p), whole)]
    for i, (flag, path, folder) in enumerate(outs):
        for other, used, whole in ins:
            if _same_file(path, used):
                where = "is"
            elif whole and used.resolve() in path.resolve().parents:
                where = "is inside"
            elif folder and path.resolve() in used.resolve().parents:
                where = "holds"
            else:
                continue
            raise InputError("argument", flag, f"{path} {where} what {other} reads, and writing it would destroy "
                             "that input", "a path that no option of this command reads")
        for other, earlier, _ in outs[:i]:
            if _same_file(path, earlier):
                raise InputError("argument", flag, f"{path} is also written as {other}", "a path of its own for each output")


def read_text(path: str | Path, expected: str) -> str:
    """A UTF-8 text file, gunzipped where its name ends in .gz, or one line naming the file and
    what was wrong."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(str(path), "file", "does not exist", expected) from None
    except IsADirectoryError:
        raise InputError(str(path), "file", "is a directory", expected) from None
    except OSError as e:
        raise InputError(str(path), "file", f"cannot be read ({e.strerror})", expected) from None
    gz = path.suffix == ".gz"
    if gz:
        import gzip
        import zlib

        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:  # not gzip, or cut short
            raise InputError(str(path), "file", f"is not a whole gzip file ({e})", f"{expected}, gzipped") from None
    try:
        return data.decode("utf-8-sig")  # a byte-order mark is not part of the text
    except UnicodeDecodeError as e:
        raise InputError(str(path), f"byte {e.start}" + (" (uncompressed)" if gz else ""), "is not UTF-8 text",
                         expected) from None


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():  # a device or a pipe may never end
        raise InputError(str(path), "file", "is not a regular file (a device or a pipe)", "a JSON file")
    text = read_text(path, "a readable JSON file (UTF-8)")
    try:
        return json.loads(text, parse_constant=_no_constant(path))
    except json.JSONDecodeError as e:
        raise InputError(str(path), f"line {e.lineno} column {e.colno}", f"invalid JSON ({e.msg})") from None


def _no_constant(path: Path):
    """json accepts NaN and Infinity, which are not JSON and no profile or plan value may be."""
    def refuse(name: str):
        raise InputError(str(path), "value", f"{name} is not a JSON number", "finite numbers")
    return refuse


def sha256_of(obj: Any) -> str:
    """Stable hash of a JSON-serialisable object (inputs recorded in a plan)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
