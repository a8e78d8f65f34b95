"""Safe files: every file manifex writes goes through one atomic write; results are appended under a lock.

- :func:`atomic_write_bytes` (and ``_text``, ``_json``, :func:`atomic_torch_save`, :func:`atomic_savefig`):
  the content goes to a *unique* temporary file in the target's folder, is flushed and fsynced, then
  ``os.replace``-d over the target. A reader sees the old file or the new one, never a part; two writers
  never share a temporary file; a crash leaves at most a hidden ``.<name>.<random>.tmp`` behind.
- :func:`append_jsonl`: records appended as JSON lines by one ``write`` under a file lock, so concurrent
  processes interleave whole lines only; a line cut short by a writer that died is dropped first.
- :func:`read_jsonl`: the records of such a file; an incomplete last line is skipped (and cut off with
  ``repair=True``); a bad line before it raises DataError.
- :func:`file_lock`: an inter-process lock (the ``filelock`` library) on a sibling ``<path>.lock`` file.
- :func:`safe_torch_load`: the one way a tensor file is read back from a run folder: ``weights_only=True``
  (tensors and plain containers; a file can never run code), and one DataError naming a corrupt file and the fix.
- :func:`to_jsonable`: tensors, NumPy values, paths, tuples → plain JSON values.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Mapping

from ..errors import DataError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_torch_save",
    "safe_torch_load",
    "atomic_savefig",
    "append_jsonl",
    "read_jsonl",
    "file_lock",
    "to_jsonable",
]

PathLike = str | os.PathLike


def _check_path(path: object, fn: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{fn}: path must be a str or os.PathLike (argument order: see its docstring), got {type(path).__name__}.")
    return Path(path).expanduser()


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every platform/file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)  # read it (there is no getter) and put it back at once
    os.umask(mask)
    return mask


_UMASK = _umask()


def _atomic(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file private (0600); give it the mode a plain open() would (or the old file's),
        # so results on a shared file system stay readable by whoever could read them before
        try:
            mode = path.stat().st_mode & 0o777
        except OSError:
            mode = 0o666 & ~_UMASK
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (unique temp file in the same folder, fsync, ``os.replace``);
    parent folders are created. Returns the path."""
    return _atomic(_check_path(path, "atomic_write_bytes"), lambda f: f.write(data))


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write_bytes` for text."""
    return _atomic(_check_path(path, "atomic_write_text"), lambda f: f.write(text.encode(encoding)))


def atomic_write_json(path: PathLike, obj: Any, *, indent: int | None = 2, inf_as_string: bool = False) -> Path:
    """``obj`` as JSON at ``path``, atomically, after :func:`to_jsonable` (non-finite floats → null, or
    ``"inf"``/``"-inf"`` with ``inf_as_string``)."""
    text = json.dumps(to_jsonable(obj, inf_as_string=inf_as_string), indent=indent, allow_nan=False)
    return _atomic(_check_path(path, "atomic_write_json"), lambda f: f.write(text.encode("utf-8")))


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj, path)`` atomically (argument order as torch.save)."""
    import torch

    return _atomic(_check_path(path, "atomic_torch_save"), lambda f: torch.save(obj, f))


def safe_torch_load(path: PathLike, *, map_location: Any = "cpu", what: str = "file", fix: str | None = None) -> Any:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and containers of them, never code.

    A file that is truncated, corrupt or holds pickled objects beyond that raises one DataError naming the
    file (``what`` says what it is) and ``fix`` (default: delete it so that it is rebuilt)."""
    import torch

    p = _check_path(path, "safe_torch_load")
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure of a file we did not write right is the same for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"{what} {p} cannot be read safely ({type(e).__name__}: {first}); "
                        f"{fix or 'delete it and run again to rebuild it'}.") from e


def atomic_savefig(fig: Any, path: PathLike, **savefig_kwargs: Any) -> Path:
    """``fig.savefig(path, **savefig_kwargs)`` atomically; the format follows ``path``'s suffix unless
    ``format=`` is given."""
    p = _check_path(path, "atomic_savefig")
    kwargs = dict(savefig_kwargs)
    kwargs.setdefault("format", p.suffix[1:].lower() or "png")
    return _atomic(p, lambda f: fig.savefig(f, **kwargs))


# ------------------------------------------------------------------------------------------------------
# locks and JSON lines


def _lock_path(path: Path) -> Path:
    return path if path.suffix == ".lock" else path.with_name(path.name + ".lock")


def file_lock(path: PathLike, *, timeout: float = -1):
    """An inter-process lock guarding ``path`` (the lock file is ``<path>.lock``, kept after use).

    Use as a context manager: ``with file_lock(p): ...``. ``timeout`` seconds (-1: wait for ever) before
    ``filelock.Timeout``. Built on the ``filelock`` library (fcntl/msvcrt locks released by the OS when the
    holder dies); on network file systems it is only as good as their lock support. Not reentrant across
    two calls in one process: do not nest locks on the same path."""
    from filelock import FileLock

    p = _check_path(path, "file_lock")
    p.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(_lock_path(p)), timeout=timeout)


def _dumps(record: Any) -> str:
    return json.dumps(to_jsonable(record), allow_nan=False, separators=(",", ":"))


def _drop_partial_tail(f: IO[bytes]) -> int:
    """Cut off text after the last newline (a line a dead writer left incomplete); return the new size."""
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return 0
    f.seek(size - 1)
    if f.read(1) == b"\n":
        return size
    pos, block = size, 1 << 16
    while pos > 0:
        start = max(0, pos - block)
        f.seek(start)
        chunk = f.read(pos - start)
        k = chunk.rfind(b"\n")
        if k >= 0:
            keep = start + k + 1
            break
        pos = start
    else:
        keep = 0
    f.truncate(keep)
    warnings.warn(f"{getattr(f, 'name', 'results file')}: dropped an incomplete last line (an interrupted write).", stacklevel=3)
    return keep


def _append_locked(path: Path, lines: bytes) -> None:
    with open(path, "a+b") as f:  # caller holds the lock
        _drop_partial_tail(f)
        if lines:
            f.write(lines)  # O_APPEND, one write: readers and crashes see whole-line prefixes only
        f.flush()
        os.fsync(f.fileno())


def append_jsonl(path: PathLike, records: Iterable[Mapping[str, Any]]) -> Path:
    """Append ``records`` (JSON-able after :func:`to_jsonable`) to ``path``, one JSON line each, by one write
    under :func:`file_lock` — safe with other processes appending to the same file. A last line left
    incomplete by a writer that died is removed first. Returns the path."""
    p = _check_path(path, "append_jsonl")
    data = "".join(_dumps(r) + "\n" for r in records).encode("utf-8")
    with file_lock(p):
        _append_locked(p, data)
    return p


def _parse(path: Path, raw: bytes, *, first_line: int = 1) -> tuple[list[dict], int, bool]:
    """(records, bytes consumed, tail_bad) of JSON lines ``raw``: text after the last newline is not
    consumed; an invalid *last* complete line is treated as a torn write (consumed = before it)."""
    end = raw.rfind(b"\n") + 1
    lines = raw[:end].split(b"\n")[:-1]
    records: list[dict] = []
    consumed = 0
    for k, line in enumerate(lines):
        try:
            value = json.loads(line) if line.strip() else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            if k == len(lines) - 1:
                return records, consumed, True
            raise DataError(
                f"{path}, line {first_line + k}: not valid JSON; the results file is corrupt (fix or delete the line)."
            ) from None
        if value is not None:
            if not isinstance(value, dict):
                raise DataError(f"{path}, line {first_line + k}: expected a JSON object per line, got {type(value).__name__}.")
            records.append(value)
        consumed += len(line) + 1
    return records, consumed, end < len(raw)


def read_jsonl(path: PathLike, repair: bool = False) -> list[dict]:
    """The records (one JSON object per line) of ``path``; ``[]`` if it does not exist.

    A last line cut short (no newline, or not valid JSON) is skipped with a warning — it is the write of a
    process that died, or one still in progress — and with ``repair=True`` removed from the file (under
    the file's lock, so an append in progress is never cut). A bad line before the last raises DataError.
    """
    p = _check_path(path, "read_jsonl")
    if not p.is_file():
        return []
    if not repair:
        records, _, bad = _parse(p, p.read_bytes())
        if bad:
            warnings.warn(f"{p}: skipped an incomplete last line (an interrupted or unfinished write).", stacklevel=2)
        return records
    with file_lock(p):
        raw = p.read_bytes()
        records, consumed, bad = _parse(p, raw)
        if bad:
            warnings.warn(f"{p}: dropped an incomplete last line (an interrupted write); its record will be recomputed.",
                          stacklevel=2)
            with open(p, "r+b") as f:
                f.truncate(consumed)
                f.flush()
                os.fsync(f.fileno())
    return records


class JsonlLog:
    """A JSON-lines results file whose records carry a unique ``key`` (``"id"``): :meth:`JsonlLog.append` writes only
    records whose key is not in the file yet — checked under the lock, against what *any* process has
    appended — so two processes that finish the same unit never duplicate it. Reads are incremental (only
    the bytes appended since the last look), so appends stay cheap for large campaigns."""

    def __init__(self, path: PathLike, key: str = "id") -> None:
        self.path = _check_path(path, "JsonlLog")
        self.key = key
        self._offset = 0
        self._lines = 0
        self._by_key: dict[Any, dict] = {}

    def _refresh(self, *, repair: bool) -> None:
        if not self.path.is_file():
            self._offset, self._lines, self._by_key = 0, 0, {}
            return
        size = self.path.stat().st_size
        if size < self._offset:  # rewritten or cut by someone else: start over
            self._offset, self._lines, self._by_key = 0, 0, {}
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            raw = f.read()
        records, consumed, bad = _parse(self.path, raw, first_line=self._lines + 1)
        if bad and repair:
            warnings.warn(f"{self.path}: dropped an incomplete last line (an interrupted write); its record will be "
                          "recomputed.", stacklevel=3)
            with open(self.path, "r+b") as f:
                f.truncate(self._offset + consumed)
                f.flush()
                os.fsync(f.fileno())
        self._offset += consumed
        self._lines += raw[:consumed].count(b"\n")
        for r in records:
            self._by_key.setdefault(r.get(self.key), r)  # first record of a key wins

    def load(self, *, repair: bool = True) -> dict[Any, dict]:
        """``{key: record}`` of every record in the file (first per key); ``repair``: cut a torn last line."""
        if repair and self.path.is_file():
            with file_lock(self.path):
                self._refresh(repair=True)
        else:
            self._refresh(repair=False)
        return dict(self._by_key)

    def append(self, records: Iterable[Mapping[str, Any]]) -> list[dict]:
        """Append the records whose key is new (one write, under the lock); returns those written."""
        new: list[dict] = []
        with file_lock(self.path):
            if self.path.is_file():
                with open(self.path, "a+b") as f:
                    _drop_partial_tail(f)
            self._refresh(repair=False)
            seen = set(self._by_key)
            for r in records:
                k = r.get(self.key)
                if k is None:
                    raise DataError(f"record without {self.key!r}: {str(dict(r))[:200]}")
                if k not in seen:
                    seen.add(k)
                    new.append(dict(r))
            data = "".join(_dumps(r) + "\n" for r in new).encode("utf-8")
            _append_locked(self.path, data)
            self._refresh(repair=False)
        return new

    def clear(self) -> None:
        """Delete the file (start the results over)."""
        with file_lock(self.path):
            self.path.unlink(missing_ok=True)
        self._offset, self._lines, self._by_key = 0, 0, {}


# ------------------------------------------------------------------------------------------------------
# JSON values


def to_jsonable(value: Any, *, inf_as_string: bool = False) -> Any:
    """A plain JSON value for ``value``: tensors and NumPy arrays → (nested) lists, NumPy/torch scalars →
    numbers, tuples/sets → lists, dict keys → strings, paths → strings, dataclass-like objects with
    ``to_dict()`` → their dict; NaN → null, ±inf → null (or ``"inf"``/``"-inf"`` with ``inf_as_string``);
    anything else → its ``repr`` (so settings that hold callables still compare)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        if inf_as_string and math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return None
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v, inf_as_string=inf_as_string) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [to_jsonable(v, inf_as_string=inf_as_string) for v in items]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # torch tensors, NumPy arrays and scalars
        return to_jsonable(value.tolist(), inf_as_string=inf_as_string)
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return to_jsonable(value.to_dict(), inf_as_string=inf_as_string)
    return repr(value)
