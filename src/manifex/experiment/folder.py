"""The experiment folder: one layout for every system, one identity guard, one way to start over.

Layout (every command)::

    experiment.json      what the records were made with: settings, the model's identity (weights fingerprint),
                         the data's identity, the manifex version, the command; written before the first unit
    results.jsonl        one JSON line per finished unit (stages after the first: results-<stage>.jsonl)
    units/<id>/...       per-unit artefacts (tensors, figures)
    artefacts/<name>.pt  intermediates the units share (hyperplanes, ...), keyed by the settings they depend on
    summary.json         the summary of all records
    metrics.json         the headline numbers (NaN/inf as null, listed under "nonfinite")
    report.html, *.png   the report and its figures

Resume rules: a folder that holds results is resumed only with the same identity — every section of
``experiment.json`` (settings, model, data) must match, or the run is refused in one line naming each
difference and the ways out: the same options, a new ``--out``, or ``--overwrite`` (the old folder is moved
aside to ``<out>.replaced-<time>``, never deleted). ``resume=False`` (``--no-resume``) recomputes every unit in
the same folder. The manifex version is recorded, not compared: a newer version resumes an older run's
records (they were made by the settings recorded beside them).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import DataError, InputError, param
from ..runs import atomic_torch_save, atomic_write_json, file_lock, safe_torch_load, to_jsonable
from ..runs.settings import settings_diff

__all__ = ["ExperimentFolder", "EXPERIMENT_FILE", "write_metrics"]

#: The file in an experiment folder that records the resolved settings, the model's identity and the data; a
#: resumed run compares it and refuses a changed setting.
EXPERIMENT_FILE = "experiment.json"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("manifex")
    except Exception:  # pragma: no cover - running from a source tree without metadata
        return "unknown"


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(to_jsonable(value), sort_keys=True))


def write_metrics(path: str | os.PathLike, metrics: Mapping[str, Any]) -> Path:
    """Write ``metrics.json`` with the one encoder: NaN/inf become null and their keys are listed under
    ``"nonfinite"``, so a reader can tell "not finite" from "not measured"."""
    import math

    bad: list[str] = []

    def walk(v: Any, key: str) -> None:
        if isinstance(v, float) and not math.isfinite(v):
            bad.append(key)
        elif isinstance(v, Mapping):
            for k, w in v.items():
                walk(w, f"{key}.{k}" if key else str(k))
        elif isinstance(v, (list, tuple)):
            for i, w in enumerate(v):
                walk(w, f"{key}[{i}]")

    plain = to_jsonable(dict(metrics))
    walk(dict(metrics), "")
    if bad:
        plain["nonfinite"] = bad
    p = Path(path)
    atomic_write_json(p, plain)
    return p


class ExperimentFolder:
    """The folder of one experiment run (see the module docstring for the layout and the resume rules).

    ``resume``: keep finished units (default); False recomputes every unit here. ``overwrite``: move an existing
    non-empty folder aside first (``<out>.replaced-<YYYYmmdd-HHMMSS>``). ``what``: how errors name the run
    ("a concepts run"). Claim each identity section with :meth:`claim` as soon as it is known — settings
    before any training, the model after resolving it — so a mismatch is refused before the expensive step.
    """

    def __init__(self, path: str | os.PathLike, *, command: str, resume: bool = True, overwrite: bool = False,
                 what: str | None = None, advice: str | None = None) -> None:
        self.path = Path(path).expanduser()
        self.advice = advice
        self.command = command
        self.what = what or f"a {command} run"
        self.resume = bool(resume)
        self.moved_to: Path | None = None
        if overwrite and self.path.is_dir() and any(self.path.iterdir()):
            stamp = time.strftime("%Y%m%d-%H%M%S")
            target = self.path.with_name(f"{self.path.name}.replaced-{stamp}")
            i = 1
            while target.exists():
                target = self.path.with_name(f"{self.path.name}.replaced-{stamp}-{i}")
                i += 1
            os.replace(self.path, target)
            self.moved_to = target
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.resume:  # start over here: the records and their identity go, artefacts are overwritten
            for p in [*self.path.glob("results*.jsonl"), self.file]:
                p.unlink(missing_ok=True)
        self._claimed: dict[str, Any] = {}

    # -- identity ----------------------------------------------------------------------------------------------
    @property
    def file(self) -> Path:
        return self.path / EXPERIMENT_FILE

    def has_results(self) -> bool:
        """Whether the folder holds finished units (a results file with at least one byte)."""
        return any(p.stat().st_size > 0 for p in self.path.glob("results*.jsonl") if p.is_file())

    def _read(self) -> dict[str, Any] | None:
        if not self.file.is_file():
            return None
        try:
            data = json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"{self.file} is unreadable ({e}); start over with {param('overwrite', True)} (the folder is moved aside) "
                            f"or use a new {param('out_dir')}.") from e
        if not isinstance(data, dict):
            raise DataError(f"{self.file} is not an experiment record (a JSON object); start over with {param('overwrite', True)} or a new {param('out_dir')}.")
        return data

    def claim(self, section: str, value: Any) -> dict[str, Any]:
        """Record ``value`` as section ``section`` of ``experiment.json``; on a resume of a folder with results,
        first compare it with what is recorded there and refuse any difference (one line, every differing key)."""
        new = _plain(value)
        with file_lock(self.file):
            old = self._read()
            if self.resume and self.has_results():
                if old is None:
                    raise InputError(f"{self.path} holds results but no {EXPERIMENT_FILE} (a folder of an older manifex, or "
                                     f"not a manifex run): use a new {param('out_dir')}, or {param('overwrite', True)} to move it aside and start over.")
                if old.get("command", self.command) != self.command:
                    raise InputError(f"{self.path} holds a {old.get('command')} run, not {self.command}; use a new {param('out_dir')}, "
                                     f"or {param('overwrite', True)} to move it aside.")
                old_section, new_section = old.get(section, {}), new
                if not isinstance(old_section, Mapping) or not isinstance(new_section, Mapping):
                    old_section, new_section = {"value": old_section}, {"value": new_section}
                shown = settings_diff(old_section, new_section, prefix=f"{section}.", shown=5, width=48)
                if shown:
                    advice = self.advice or (f"resume with the same options, use a new {param('out_dir')}, or "
                                             f"{param('overwrite', True)} to move the old folder aside and start over.")
                    raise InputError(f"{self.path} holds {self.what} made with other {section} ({shown}); {advice}")
            record = dict(old or {}) if (self.resume and self.has_results()) else {}
            record.update({"command": self.command, "manifex": _version(), **{k: v for k, v in self._claimed.items()}})
            record[section] = new
            atomic_write_json(self.file, record)
        self._claimed[section] = new
        return new

    # -- files -------------------------------------------------------------------------------------------------
    def results_file(self, stage: str | None = None) -> str:
        """The results file of a stage: ``results.jsonl`` for the first (or only) stage, else ``results-<stage>.jsonl``."""
        return "results.jsonl" if not stage else f"results-{stage}.jsonl"

    def artefact(self, name: str, key: Mapping[str, Any], build: Callable[[], dict]) -> dict:
        """A shared intermediate of the run (``artefacts/<name>.pt``): loaded when it was built with the same
        ``key`` (the settings it depends on), else built by ``build()`` (a dict of tensors and plain values) and
        saved. Loaded with ``weights_only=True``: a file in the folder can never run code; a corrupt one is rebuilt."""
        path = self.path / "artefacts" / f"{name}.pt"
        key = _plain(dict(key))
        if path.is_file():
            try:
                hit = safe_torch_load(path)
            except DataError:
                hit = None
            if isinstance(hit, dict) and hit.get("__key__") == json.dumps(key, sort_keys=True):
                return {k: v for k, v in hit.items() if k != "__key__"}
        value = build()
        atomic_torch_save({**value, "__key__": json.dumps(key, sort_keys=True)}, path)
        return value

    def write_json(self, name: str, value: Any) -> Path:
        p = self.path / name
        atomic_write_json(p, to_jsonable(value))
        return p

    def write_metrics(self, metrics: Mapping[str, Any]) -> Path:
        return write_metrics(self.path / "metrics.json", metrics)

    def __repr__(self) -> str:
        return f"ExperimentFolder({str(self.path)!r}, command={self.command!r}, resume={self.resume})"
