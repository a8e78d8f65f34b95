"""Scale-out on Ray: the batches of :func:`~manifex.runs.run_units` run on a pool of Ray actors.

Ray is an optional extra (``pip install "manifex[ray]"``), imported only when a :class:`RayExecutor` runs.
One actor per worker receives the run's ``context`` (model, data, options) once — put in Ray's object
store once per run — and the ``process`` function; batches of units are then sent to the actors, at most
``in_flight`` per actor, and their records come back to the driver, which alone appends them to the
results file. So a campaign started on Ray resumes locally and the other way round, and a worker that
dies loses only its batch: Ray restarts the actor and resends the batch (``max_retries``), and whatever
is still missing after a crash of the driver is run again by the next run.
"""
from __future__ import annotations

import collections
import types
import weakref
import os
from pathlib import Path
from typing import Any, Iterator

from ..errors import InputError, ManifexError
from .units import Process, Unit, run_batch

__all__ = ["RayExecutor", "import_ray", "ship_by_value"]

# Modules a worker cannot import by name (a user's model loaded from path/to/file.py gets a private module name):
# Ray pickles their classes and functions by value instead, so a --model file works on every worker.
_BY_VALUE: "weakref.WeakSet[types.ModuleType]" = weakref.WeakSet()


def ship_by_value(module: types.ModuleType) -> None:
    """Have Ray workers receive ``module``'s classes and functions by value (see ``_BY_VALUE``)."""
    _BY_VALUE.add(module)

INSTALL_HINT = 'Ray is not installed; scaling out (--workers, --ray-address) needs it: pip install "manifex[ray]"'


def import_ray():
    """The ``ray`` module, or ManifexError with the install hint."""
    try:
        import ray
    except ImportError as e:
        raise ManifexError(f"{INSTALL_HINT} (import failed: {e}).") from e
    return ray


class _Worker:
    """A Ray actor: holds the run's context and process function; runs one batch per call."""

    def __init__(self, context_box: list, process: Process, threads: int | None, gpus: float = 0) -> None:
        import ray
        import torch

        # the context's ObjectRef comes boxed in a list, so Ray passes the reference and this worker fetches
        # it (once); the driver keeps the reference alive for the whole run, also for restarted workers
        context = ray.get(context_box[0])
        if threads:
            torch.set_num_threads(int(threads))
        if gpus and torch.cuda.is_available():  # Ray made this worker's GPU(s) the visible ones
            _modules_to(context, torch.device("cuda"))
        self.context, self.process = context, process

    def run(self, batch: list[Unit], out_dir: str) -> list[dict]:
        return run_batch(self.process, batch, self.context, Path(out_dir))

    def pid(self) -> int:
        return os.getpid()


def _modules_to(context: Any, device: Any) -> None:
    """Move every nn.Module found in ``context`` (a dict or an object's attributes, one level deep) to
    ``device``, in place — explainers that hold the same module follow it."""
    from torch import nn

    values = context.values() if isinstance(context, dict) else vars(context).values() if hasattr(context, "__dict__") else ()
    for v in ([context] if isinstance(context, nn.Module) else values):
        if isinstance(v, nn.Module):
            v.to(device)


def _positive_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InputError(f"{name} must be an integer >= {low}, got {value!r}.")
    return value


class RayExecutor:
    """Run batches on ``workers`` Ray actors.

    ``workers=None`` (with ``address``): one per ``threads_per_worker`` CPUs of the cluster.
    ``address=None`` starts a local Ray cluster (``ray.init(num_cpus=workers × threads_per_worker)``) for the
    run and stops it afterwards; ``address="auto"`` or ``"ray://host:10001"`` joins an existing cluster (its
    nodes must see ``out_dir`` and import manifex). If Ray is already initialised in this process, that
    session is used and left running. ``gpus_per_worker``: GPUs each actor reserves (fractions share one
    GPU); the nn.Modules of ``context`` (a dict or an object's attributes) are moved to the worker's GPU,
    so the driver may stay on the CPU, and ``process`` should follow the model's device (manifex's do). ``threads_per_worker``:
    torch threads per actor (and the CPUs it reserves); default: the local cores divided by ``workers``
    on a local cluster, 1 on an existing one — so N workers never oversubscribe the cores.
    ``in_flight``: batches queued per actor (2 keeps it busy while the driver writes). ``max_retries``:
    how often a batch is resent after its actor died. ``ray_init``: extra ``ray.init`` keywords (e.g.
    ``runtime_env``).
    """

    def __init__(self, workers: int | None = 2, address: str | None = None, gpus_per_worker: float = 0,
                 threads_per_worker: int | None = None, *, in_flight: int = 2, max_retries: int = 2,
                 ray_init: dict | None = None) -> None:
        if workers is None and address is None:
            raise InputError("workers=None (as many as the cluster has CPUs) needs the address of a cluster.")
        self.workers = None if workers is None else _positive_int("workers", workers)
        if address is not None and (not isinstance(address, str) or not address.strip()):
            raise InputError(f"address must be a Ray address such as 'auto' or 'ray://host:10001', got {address!r}.")
        self.address = address
        if isinstance(gpus_per_worker, bool) or not isinstance(gpus_per_worker, (int, float)) or gpus_per_worker < 0:
            raise InputError(f"gpus_per_worker must be a number >= 0, got {gpus_per_worker!r}.")
        self.gpus_per_worker = float(gpus_per_worker)
        if threads_per_worker is None:
            threads_per_worker = max(1, (os.cpu_count() or 1) // self.workers) if address is None else 1  # type: ignore[operator]
        self.threads_per_worker = _positive_int("threads_per_worker", threads_per_worker)
        self.in_flight = _positive_int("in_flight", in_flight)
        self.max_retries = _positive_int("max_retries", max_retries, 0)
        self.ray_init = dict(ray_init or {})

    def __repr__(self) -> str:
        return (f"RayExecutor(workers={self.workers}, address={self.address!r}, gpus_per_worker={self.gpus_per_worker:g}, "
                f"threads_per_worker={self.threads_per_worker})")

    def _start(self, ray) -> bool:
        """Initialise Ray unless it already is; True if this call started it."""
        if ray.is_initialized():
            return False
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "warning", **self.ray_init}
        if self.address is None:
            kwargs.setdefault("num_cpus", self.workers * self.threads_per_worker)
        else:
            kwargs["address"] = self.address
        try:
            ray.init(**kwargs)
        except Exception as e:
            where = f"the Ray cluster at {self.address!r}" if self.address else "a local Ray cluster"
            raise ManifexError(f"could not start or join {where} ({type(e).__name__}: {e}); check the address "
                               "(`ray status` on the head node) or run without --ray-address.") from e
        return True

    def map(self, process: Process, batches: list[list[Unit]], context: Any, out_dir: Path
            ) -> Iterator[tuple[list[Unit], list[dict]]]:
        ray = import_ray()
        started = self._start(ray)
        actors: list[Any] = []
        try:
            for module in list(_BY_VALUE):
                ray.cloudpickle.register_pickle_by_value(module)
            context_ref = ray.put(context)  # once per run; each actor fetches it once
            Actor = ray.remote(_Worker).options(
                num_cpus=self.threads_per_worker, num_gpus=self.gpus_per_worker,
                max_restarts=self.max_retries, max_task_retries=self.max_retries,
            )
            workers = self.workers or max(1, int(ray.cluster_resources().get("CPU", 1)) // self.threads_per_worker)
            n = min(workers, len(batches))
            actors = [Actor.remote([context_ref], process, self.threads_per_worker, self.gpus_per_worker) for _ in range(n)]
            queue = collections.deque(batches)
            pending: dict[Any, tuple[list[Unit], Any]] = {}

            def submit(actor: Any) -> None:
                batch = queue.popleft()
                pending[actor.run.remote(batch, str(out_dir))] = (batch, actor)

            for _ in range(self.in_flight):
                for actor in actors:
                    if queue:
                        submit(actor)
            while pending:
                (ready,), _ = ray.wait(list(pending), num_returns=1)
                batch, actor = pending.pop(ready)
                try:
                    records = ray.get(ready)
                except ray.exceptions.RayActorError as e:  # the worker died (more often than max_retries)
                    raise ManifexError(
                        f"a Ray worker died while running units {[u.id for u in batch][:3]}... ({type(e).__name__}); "
                        "the units finished so far are saved: run the same command again to resume."
                    ) from e
                if queue:
                    submit(actor)
                yield batch, records
        finally:
            for actor in actors:
                try:
                    ray.kill(actor)
                except Exception:  # already gone
                    pass
            if started:
                ray.shutdown()
