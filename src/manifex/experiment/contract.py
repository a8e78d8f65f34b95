"""The experiment contract: every system's command walks the same corridor, written once here.

A system supplies a frozen ``Config`` and an :class:`Experiment` that declares only what the system knows:
which settings change a record, what to check before anything is trained, how to prepare the units' context,
its stages of units, the summary, the findings and the report. :func:`run_experiment` does everything else,
in this order, for every system::

    check_options     the options alone (ranges, names, combinations)            nothing loaded yet
    device, folders   --device against this machine, --out and --cache-dir writable
    load_data         the dataset loaded and checked (labels, classes, range)    cheap
    check_data        what the system can check before training (classes against the data, a built-in
                      network's layer and its grid on the untrained network, ...)
    folder + claims   experiment.json: settings and data claimed; on resume any difference is refused
    derive_data       expensive data the classifier needs (the known manifold of known:<data>, whose base data
                      load_data loaded and checked)
    resolve_model     the built-in classifier trained (cached) or the user's model loaded; checked on a batch;
                      its identity (weights fingerprint) claimed
    prepare           the units' context (one-batch checks of the system, predictions, generators, ...)
    plan -> stages    units on the run layer (resumable, any executor); a stage may read earlier stages' records
    summarize         summary.json; metrics.json (one encoder, NaN -> null + "nonfinite"); the report

So resume guards, the user's ``--model``, checks before training, safe loads and the folder layout hold for every
system at once; a new system is a Config, an Experiment, its primitive and its report.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from torch import nn

from ..errors import InputError, param
from ..models.known_manifold import KnownData, known_base
from ..models.resolve import ModelInfo, check_writable_dir, data_identity, resolve_classifier, resolve_data, resolve_device
from ..runs import JsonlLog, Unit, run_units
from ..runs.units import Executor, Process
from .config import result_settings
from .folder import ExperimentFolder

__all__ = ["Experiment", "Stage", "Run", "UserModel", "ExperimentResult", "run_experiment"]


@dataclass(frozen=True)
class UserModel:
    """The user's own classifier as the CLI describes it: a spec (``nets.py:build``, ``pkg.mod:Net``, a ``.pt2`` or
    TorchScript file), optional state-dict ``weights``, per-channel ``normalize`` = (mean, std) and the ``output``
    selector (index or key of a tuple/dict output)."""

    spec: str
    weights: str | os.PathLike | None = None
    normalize: tuple | None = None
    output: str | None = None


@dataclass(frozen=True)
class Stage:
    """One campaign of units: ``process(batch, context, out_dir) -> records`` over ``units`` in batches of
    ``batch_size``. The first stage writes ``results.jsonl``, a later one ``results-<name>.jsonl``."""

    name: str
    units: Sequence[Unit]
    process: Process
    context: Any = None
    batch_size: int = 1
    desc: str | None = None


@dataclass
class Run:
    """The state of one run as the corridor fills it in; every hook of an :class:`Experiment` receives it."""

    config: Any
    folder: ExperimentFolder | None
    device: str
    cache_dir: str | os.PathLike | None
    executor: Executor | None
    progress: bool
    trust_pickle: bool = False
    num_classes: int | None = None
    user_model: UserModel | nn.Module | None = None
    command: str | None = None
    #: how reports name a model given as an nn.Module (None: "your <class name>"); pass it to resolve_classifier(name=)
    model_name: str | None = None
    data: Any = None
    train: Any = None
    test: Any = None
    model: nn.Module | None = None
    model_info: ModelInfo | None = None
    checks: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    records: dict[str, list[dict]] = field(default_factory=dict)
    n_new: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    #: what a system's hooks hand on to its later hooks (a generator, derived data, notes)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        assert self.folder is not None
        return self.folder.path

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.started, 1)


@dataclass
class ExperimentResult:
    """What :func:`run_experiment` returns: the records per stage, the summary, findings, checks and the files."""

    command: str
    out_dir: Path
    summary: dict[str, Any]
    findings: list[str]
    records: dict[str, list[dict]]
    model_info: ModelInfo | None
    checks: list[str]
    warnings: list[str]
    report: Path | None
    n_new: dict[str, int]
    moved_to: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Experiment:
    """A system's experiment: override the hooks it needs (each has a default that fits most systems).

    ``command``: the CLI command name (the ``command`` of ``experiment.json``); ``what``: how errors name a run.
    ``run_fields``: Config fields that never change a record (device, batch sizes, progress) and so are left
    out of the settings guard.
    """

    command: str = "experiment"
    what: str = "an experiment"
    run_fields: tuple[str, ...] = ("device",)

    # -- before anything is loaded ---------------------------------------------------------------------------
    def check_options(self, config: Any) -> None:
        """Refuse impossible options (one line each) before any data is read."""

    def settings(self, config: Any) -> dict[str, Any]:
        """The settings that change a record: every Config field declared with ``result=True`` (see
        :func:`manifex.experiment.config.setting`; plain fields count) but ``run_fields``."""
        return {k: v for k, v in result_settings(config).items() if k not in self.run_fields}

    # -- data ------------------------------------------------------------------------------------------------
    def load_data(self, run: Run) -> None:
        """Default: ``config.dataset`` loaded and checked, split 80/20 with ``config.seed`` into train and test.
        For ``known:<data>`` the base data ``<data>`` is loaded and checked here (cheap); ``run.train`` and
        ``run.test`` stay None until :meth:`derive_data` has sampled the known manifold."""
        cfg = run.config
        base = known_base(cfg.dataset)
        data, checks = resolve_data(base or cfg.dataset, trust_pickle=run.trust_pickle, num_classes=run.num_classes)
        run.data = data
        if base is None:
            run.train, run.test = data.split(0.2, seed=getattr(cfg, "seed", 0))
        run.checks.extend(checks)

    def check_data(self, run: Run) -> None:
        """What can be checked once the data is known and before any training (classes, a layer of the untrained
        built-in network, ...)."""

    def data_identity(self, run: Run) -> dict[str, Any]:
        return data_identity(run.config.dataset, run.data.x, run.data.y) if run.data is not None else {}

    def known_settings(self, run: Run) -> KnownData:
        """How the known manifold of ``known:<data>`` is built: ``manifex align``'s defaults with the config's seed
        (so the same cached VAE, dataset and classifier as align's)."""
        return KnownData(seed=getattr(run.config, "seed", 0))

    def derive_data(self, run: Run) -> None:
        """Expensive data the classifier needs, after the settings are claimed. Default: for ``known:<data>`` the
        known manifold (:func:`manifex.models.known_manifold.known_data`, cached), its settings claimed;
        ``run.train, run.test`` are its images and ``run.extra["known"]`` the :class:`KnownManifold`."""
        if known_base(getattr(run.config, "dataset", None)) is None:  # a config without a dataset (the helix): nothing
            return
        from ..models import ModelCache
        from ..models.known_manifold import known_check, known_data

        settings = self.known_settings(run)
        if run.folder is not None:
            run.folder.claim("known_manifold", settings.to_dict())
        km, _ = known_data(run.data, settings, cache=ModelCache(run.cache_dir), device=run.device, progress=run.progress)
        run.train, run.test = km.train, km.test
        run.extra["known"] = km
        run.checks.append(known_check(km, settings))
        run.checks.extend(km.checks)
        run.warnings.extend(km.warnings)

    # -- model -----------------------------------------------------------------------------------------------
    def resolve_model(self, run: Run) -> None:
        """Default: the user's model, or the built-in ``config.classifier`` trained for ``config.epochs``."""
        cfg, user = run.config, run.user_model
        spec = user.spec if isinstance(user, UserModel) else user
        u = user if isinstance(user, UserModel) else UserModel("")
        run.model, run.model_info = resolve_classifier(
            run.train, run.test, model=spec, weights=u.weights, normalize=u.normalize, output=u.output,
            classifier=getattr(cfg, "classifier", "lenet"), epochs=getattr(cfg, "epochs", 3), seed=getattr(cfg, "seed", 0),
            device=run.device, cache_dir=run.cache_dir, progress=run.progress, name=run.model_name)
        run.checks.extend(run.model_info.checks)

    # -- the work --------------------------------------------------------------------------------------------
    def prepare(self, run: Run) -> Any:
        """The units' context: one-batch checks of the system, predictions, generators; ``None`` by default."""
        return None

    def plan(self, run: Run, context: Any) -> Iterator[Stage]:
        """The stages, in order; a later stage may read ``run.records`` of the earlier ones."""
        return iter(())

    def summarize(self, run: Run, context: Any) -> dict[str, Any]:
        return {name: {"n": len(r)} for name, r in run.records.items()}

    def metrics(self, run: Run, summary: dict[str, Any], context: Any) -> dict[str, Any]:
        """metrics.json: by default the summary with the model, the checks and the timing."""
        return {"command": self.command, "config": self.settings(run.config),
                "model": run.model_info.to_dict() if run.model_info else None, **summary,
                "checks": run.checks, "warnings": run.warnings, "seconds": run.seconds}

    def findings(self, run: Run, summary: dict[str, Any]) -> list[str]:
        return []

    def report(self, run: Run, summary: dict[str, Any], context: Any) -> Path | None:
        """Write report.html (and its figures) into ``run.out``; return its path."""
        return None


def run_experiment(experiment: Experiment, config: Any, out_dir: str | os.PathLike, *,
                   model: UserModel | nn.Module | str | None = None, resume: bool = True, overwrite: bool = False,
                   executor: Executor | None = None, progress: bool = True, cache_dir: str | os.PathLike | None = None,
                   trust_pickle: bool = False, num_classes: int | None = None, device: str | None = None,
                   command: str | None = None, write_files: bool = True, model_name: str | None = None) -> ExperimentResult:
    """Run (or resume) ``experiment`` with ``config`` in ``out_dir`` (see the module docstring for the order).

    ``model``: None for the built-in classifier of the config, a :class:`UserModel` (or its spec string), or an
    ``nn.Module``. ``resume=False`` recomputes every unit in ``out_dir``; ``overwrite=True`` moves an existing
    folder aside first. ``executor``: where the units run (:class:`manifex.runs.RayExecutor` or local).
    ``device``: default ``config.device`` (or cpu). ``command``: the command line shown in the report.
    ``model_name``: how the report and metrics name a model given as an ``nn.Module`` (default "your <class name>";
    e.g. the audit's "lenet l2-robust"); a built-in or ``--model`` classifier keeps its own name.
    """
    if not isinstance(experiment, Experiment):
        raise InputError(f"experiment must be a manifex.experiment.Experiment, got {type(experiment).__name__}.")
    if isinstance(model, (str, os.PathLike)):
        model = UserModel(os.fspath(model))
    experiment.check_options(config)
    dev = resolve_device(device if device is not None else getattr(config, "device", "cpu"))
    guard: Any = contextlib.nullcontext()
    if isinstance(model, nn.Module):  # a model given in Python: the device follows it, its state is left as found
        from ..attribution.core import preserve_model_state

        guard = preserve_model_state(model)
        first = next(model.parameters(), None)
        dev = str(first.device) if first is not None else dev
    with guard:
        return _run(experiment, config, out_dir, model=model, dev=dev, resume=resume, overwrite=overwrite, executor=executor,
                    progress=progress, cache_dir=cache_dir, trust_pickle=trust_pickle, num_classes=num_classes,
                    command=command, write_files=write_files, model_name=model_name)


def _run(experiment: Experiment, config: Any, out_dir, *, model, dev: str, resume: bool, overwrite: bool, executor,
         progress: bool, cache_dir, trust_pickle: bool, num_classes, command, write_files: bool,
         model_name: str | None = None) -> ExperimentResult:
    check_writable_dir(out_dir, param("out_dir"), keep=False)  # ExperimentFolder creates it once the data passed
    check_writable_dir(cache_dir, param("cache_dir"))
    run = Run(config=config, folder=None, device=dev, cache_dir=cache_dir, executor=executor, progress=progress,
              trust_pickle=trust_pickle, num_classes=num_classes, user_model=model, command=command,
              model_name=model_name)
    experiment.load_data(run)
    experiment.check_data(run)
    run.folder = folder = ExperimentFolder(out_dir, command=experiment.command, resume=resume, overwrite=overwrite,
                                           what=experiment.what)
    folder.claim("settings", experiment.settings(config))
    folder.claim("data", experiment.data_identity(run))
    experiment.derive_data(run)
    experiment.resolve_model(run)
    if run.model_info is not None:
        folder.claim("model", run.model_info.identity())
    context = experiment.prepare(run)
    for stage in experiment.plan(run, context):
        results = folder.results_file(None if not run.records else stage.name)
        before = len(JsonlLog(folder.path / results, key="id").load(repair=True)) if (folder.path / results).is_file() else 0
        run.records[stage.name] = run_units(stage.units, stage.process, folder.path, context=stage.context,
                                            batch_size=stage.batch_size, executor=executor, resume=True, progress=progress,
                                            results=results, desc=stage.desc or stage.name)
        run.n_new[stage.name] = max(0, len(run.records[stage.name]) - before)
    summary = experiment.summarize(run, context)
    report = None
    if write_files:
        folder.write_json("summary.json", summary)
        folder.write_metrics(experiment.metrics(run, summary, context))
        report = experiment.report(run, summary, context)
    return ExperimentResult(command=experiment.command, out_dir=folder.path, summary=summary,
                            findings=experiment.findings(run, summary), records=run.records, model_info=run.model_info,
                            checks=run.checks, warnings=run.warnings, report=report, n_new=run.n_new,
                            moved_to=folder.moved_to)
