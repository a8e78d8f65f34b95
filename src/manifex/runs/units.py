"""Campaigns of independent units: run in batches by an executor, one JSON line per finished unit, resumable.

A long job (attack pairs, β sweeps, per-image attributions, concepts per class, counterfactuals per image)
is a list of :class:`Unit` s with stable ids. :func:`run_units` skips the units already in the results file,
sends the rest in batches to an executor (:class:`LocalExecutor` here, or
:class:`~manifex.runs.RayExecutor` across processes and machines) and appends each batch's records as soon
as it returns. ``out_dir`` then holds::

    results.jsonl        one JSON object per finished unit (with "id"), appended under a lock
    units/<id>/...       per-unit artefacts, if ``process`` writes any (see :func:`unit_dir`)

The record line is the commit: a unit whose line is missing is recomputed (its artefacts overwritten,
atomically), a unit with a line is never run or written again, and a line torn by a crash is dropped. Two
processes (or a Ray run and a local run) may work on the same ``out_dir``: each appends only ids that are
not in the file yet, checked under the lock.

Determinism: batches are cut from the full unit list (units ``[0, b)``, ``[b, 2b)``, ...) whatever has
finished already, so a unit always runs with the same neighbours, and before each batch the executor seeds
torch's RNG from the batch's first unit id (:func:`unit_seed`), inside ``torch.random.fork_rng`` so the
caller's RNG is untouched. So a record does not depend on the executor, the worker or an interruption
(bit-identical in our tests); it does depend, by float round-off, on ``batch_size`` (batched kernels sum
in another order, and an iterative attack amplifies that) — measured in docs/guide/scaling.rst.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

from ..errors import InputError, ManifexError
from .files import JsonlLog, to_jsonable

__all__ = ["Unit", "run_units", "LocalExecutor", "Executor", "unit_dir", "unit_seed", "summarize_records", "Process"]

PathLike = str | os.PathLike
#: ``process(units, context, out_dir) -> records``: a picklable top-level function.
Process = Callable[[list["Unit"], Any, Path], list[dict]]


@dataclass(frozen=True)
class Unit:
    """One independent piece of work: ``id`` (unique in its campaign, stable across runs: it is how a resume
    recognises finished work) and a JSON-able ``payload`` telling ``process`` what to do."""

    id: str
    payload: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise InputError(f"Unit.id must be a non-empty string, got {self.id!r}.")


def unit_seed(unit_id: str, seed: int = 0) -> int:
    """A stable 63-bit seed for a unit (hash of its id and ``seed``): the same on every worker and run."""
    h = hashlib.sha256(f"{seed}:{unit_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") >> 1


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def unit_dir(out_dir: PathLike, unit_id: str, folder: str = "units", *, create: bool = True) -> Path:
    """The artefact folder of a unit: ``out_dir/<folder>/<id>`` (characters other than letters, digits,
    ``_.-`` in the id become ``-``). Write into it with the atomic helpers of :mod:`manifex.runs`."""
    name = _UNSAFE.sub("-", unit_id).strip(".") or "unit"
    d = Path(out_dir).expanduser() / folder / name
    if create:
        d.mkdir(parents=True, exist_ok=True)
    return d


class Executor(Protocol):
    """Runs batches of units. ``map`` yields ``(batch, records)`` as batches finish (any order)."""

    def map(self, process: Process, batches: list[list[Unit]], context: Any, out_dir: Path
            ) -> Iterator[tuple[list[Unit], list[dict]]]: ...


def run_batch(process: Process, batch: list[Unit], context: Any, out_dir: Path) -> list[dict]:
    """``process`` on one batch, with torch's RNG seeded from the batch's first unit (caller's RNG kept)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(unit_seed(batch[0].id))
        return process(batch, context, out_dir)


class LocalExecutor:
    """Runs the batches one after another in this process (the default executor)."""

    def map(self, process: Process, batches: list[list[Unit]], context: Any, out_dir: Path
            ) -> Iterator[tuple[list[Unit], list[dict]]]:
        for batch in batches:
            yield batch, run_batch(process, batch, context, out_dir)

    def __repr__(self) -> str:
        return "LocalExecutor()"


def check_records(batch: Sequence[Unit], records: Any) -> list[dict]:
    """The records of a batch as JSON values, checked: a list with one dict per unit, each with its unit's id."""
    if not isinstance(records, (list, tuple)) or len(records) != len(batch):
        n = len(records) if isinstance(records, (list, tuple)) else type(records).__name__
        raise ManifexError(f"process must return a list with one record per unit ({len(batch)}), got {n}.")
    ids = [u.id for u in batch]
    got = [r.get("id") if isinstance(r, dict) else None for r in records]
    if sorted(map(str, got)) != sorted(ids):
        raise ManifexError(f"process returned records with ids {got[:5]} for units {ids[:5]}; each record needs "
                           "'id' = its unit's id.")
    return [to_jsonable(r) for r in records]


def run_units(
    units: Sequence[Unit],
    process: Process,
    out_dir: PathLike,
    *,
    context: Any = None,
    batch_size: int = 16,
    executor: Executor | None = None,
    resume: bool = True,
    progress: bool = True,
    results: str = "results.jsonl",
    desc: str | None = None,
) -> list[dict]:
    """Run ``process`` over every unit not yet finished in ``out_dir/results``; return all records in unit order.

    ``process(units, context, out_dir) -> list[dict]``: a picklable top-level function that handles one
    batch (``batch_size`` units) and returns one JSON-able record per unit, each with ``"id"`` = its unit's
    id (other keys free). ``context``: what every batch needs (model, data, options); sent to each worker
    once per run. ``executor``: :class:`LocalExecutor` (default) or :class:`~manifex.runs.RayExecutor`.
    ``resume=False``: delete the results file first. Records are appended as each batch finishes, so an
    interruption loses at most the batches in flight. Returns the records of all ``units`` found in the
    file after the run (earlier runs included), in the order of ``units``.
    """
    units = list(units)
    if not all(isinstance(u, Unit) for u in units):
        bad = next(u for u in units if not isinstance(u, Unit))
        raise InputError(f"units must be manifex.runs.Unit objects, got {type(bad).__name__}.")
    ids = [u.id for u in units]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = [i for i in ids if i in seen or seen.add(i)]
        raise InputError(f"unit ids must be unique; repeated: {dup[:5]}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    if not callable(process):
        raise InputError(f"process must be a function process(units, context, out_dir), got {type(process).__name__}.")
    if not isinstance(results, str) or not results or os.sep in results:
        raise InputError(f"results must be a file name inside out_dir, got {results!r}.")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    log = JsonlLog(out / results, key="id")
    if not resume:
        log.clear()
    done = log.load(repair=True)
    # Batch boundaries are fixed over *all* units, so a unit always runs with the same neighbours (batched
    # kernels round differently for other compositions) whatever finished before, on whichever executor.
    batches = [[u for u in units[i:i + batch_size] if u.id not in done] for i in range(0, len(units), batch_size)]
    batches = [b for b in batches if b]
    todo = [u for b in batches for u in b]
    executor = executor if executor is not None else LocalExecutor()
    if batches:
        from tqdm.auto import tqdm

        with tqdm(total=len(todo), disable=not progress, desc=desc or "units") as bar:
            for batch, records in executor.map(process, batches, context, out):
                log.append(check_records(batch, records))
                bar.update(len(batch))
    by_id = log.load(repair=False)
    return [by_id[i] for i in ids if i in by_id]


def summarize_records(records: Sequence[dict], keys: Sequence[str] | None = None) -> dict[str, Any]:
    """``{"n": count, "means": {key: mean}}`` over ``records``: every numeric field (bools count as 0/1;
    None/NaN skipped), or only ``keys``."""
    if keys is None:
        keys = list(dict.fromkeys(k for r in records for k, v in r.items() if isinstance(v, (int, float)) and k != "id"))
    means: dict[str, float] = {}
    for k in keys:
        vals = [float(r[k]) for r in records if isinstance(r.get(k), (int, float)) and math.isfinite(float(r[k]))]
        if vals:
            means[k] = sum(vals) / len(vals)
    return {"n": len(records), "means": means}
