"""The settings guard every campaign shares: a run folder remembers the settings its records were made with,
and a resume with other settings is refused in one line instead of silently mixing records.

``check_settings(out, settings, resume=...)`` writes ``out/<file>`` (the settings as plain JSON) and, when the
folder already holds results, compares first: each differing setting is named with its old and new value.
Settings are what changes a record — options, the model's identity (a fingerprint of its weights), the data's
identity — never where or how fast the work runs (device, batch size, workers).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from ..errors import DataError, InputError
from .files import PathLike, atomic_write_json, to_jsonable

__all__ = ["check_settings", "settings_diff", "tensor_fingerprint", "SETTINGS_FILE"]

#: The default settings file of a run folder.
SETTINGS_FILE = "settings.json"


def tensor_fingerprint(t: Any) -> str:
    """A content hash of a tensor (its dtype, shape and bytes): the identity of a run's data."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _short(v: Any, width: int = 60) -> str:
    text = "(not set)" if v is _MISSING else json.dumps(v)
    return text if len(text) <= width else text[: width - 3] + "..."


_MISSING = object()


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any], *, prefix: str = "", shown: int = 6,
                  width: int = 60) -> str:
    """The keys that differ between two settings dicts (nested keys dotted, ``prefix`` before each), as
    ``key: old -> new; ...`` (at most ``shown``, then how many more); an empty string when they are equal."""
    a, b = _flat(dict(old), prefix), _flat(dict(new), prefix)
    diff = sorted(k for k in set(a) | set(b) if a.get(k, _MISSING) != b.get(k, _MISSING))
    text = "; ".join(f"{k}: {_short(a.get(k, _MISSING), width)} -> {_short(b.get(k, _MISSING), width)}" for k in diff[:shown])
    return text + (f" (and {len(diff) - shown} more)" if len(diff) > shown else "")


def check_settings(out_dir: PathLike, settings: Mapping[str, Any], *, resume: bool = True, file: str = SETTINGS_FILE,
                   results: str = "results.jsonl", what: str = "a campaign") -> dict[str, Any]:
    """Write ``settings`` to ``out_dir/file``; on a resume of a folder that holds results, refuse other settings.

    Returns the settings as written (plain JSON). Raises :class:`InputError` naming every differing setting
    (``old -> new``) and the ways out (the same options, ``resume=False`` to start over, another folder), and
    :class:`DataError` for an unreadable settings file. A folder without results takes any settings."""
    out = Path(out_dir).expanduser()
    path = out / file
    new = json.loads(json.dumps(to_jsonable(dict(settings)), sort_keys=True))
    has_results = (out / results).is_file() and (out / results).stat().st_size > 0
    if resume and has_results and path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"{path} is unreadable ({e}); delete the folder's results to start over, or use a new "
                            "output folder.") from e
        shown = settings_diff(old, new)
        if shown:
            raise InputError(f"{out} holds {what} with other settings ({shown}); resume with the same settings, "
                             "start over with resume=False (--no-resume), or use a new output folder (--out).")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, new)
    return new
