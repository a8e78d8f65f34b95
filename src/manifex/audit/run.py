"""``manifex audit``: one model through every system, each stage its own experiment in ``out_dir/<stage>/``.

>>> from manifex.audit import AuditConfig, audit
>>> result = audit(AuditConfig(dataset="digits8", budget="quick"), "runs/audit")
>>> result.recommendation, result.report
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import InputError, ManifexError, param
from ..experiment import EXPERIMENT_FILE, ExperimentFolder, UserModel, result_settings, run_experiment, write_metrics
from ..models.resolve import ModelInfo
from ..runs import to_jsonable
from .plan import STAGES, AuditConfig, find_concept_layer, stage_configs
from .stages import attackable_methods
from .summary import recommendation, scorecard, stage_headline, stage_of

__all__ = ["AuditResult", "audit"]


@dataclass
class AuditResult:
    """What :func:`audit` returns: every stage's result (None where skipped), the reasons of the skipped stages, the
    scorecard rows, the recommendation, the checks and the files."""

    out_dir: Path
    stages: dict[str, Any]
    skipped: dict[str, str]
    metrics: dict[str, Any]
    scorecard: list[dict[str, Any]]
    recommendation: str
    checks: list[str]
    report: Path
    seconds: dict[str, float] = field(default_factory=dict)
    #: where ``overwrite=True`` moved the earlier audit folder (None: nothing was moved)
    moved_to: Path | None = None


def _experiments() -> dict[str, Any]:
    from ..concepts import ConceptsExperiment, ContrastExperiment
    from ..counterfactuals.experiment import CounterfactualExperiment
    from ..evaluation.experiment import EvaluateExperiment
    from ..manipulation import AttackExperiment, SmoothExperiment
    from .stages import ManifoldExperiment, ModelExperiment

    return {"model": ModelExperiment, "manifold": ManifoldExperiment, "evaluate": EvaluateExperiment, "attack": AttackExperiment, "smooth": SmoothExperiment,
            "counterfactual": CounterfactualExperiment, "concepts": ConceptsExperiment, "contrast": ContrastExperiment}


def _probe_model(config: AuditConfig, data, model: UserModel | nn.Module | None) -> nn.Module:
    """A network of the audited architecture to find the concept layer on: the built-in one untrained (its layers and
    their grids do not depend on the weights), your module as given, or your model file loaded."""
    import torch

    from ..models.classifiers import ClassifierConfig, build_classifier
    from ..models.user import load_model

    if isinstance(model, nn.Module):
        return model
    if isinstance(model, UserModel):
        return load_model(model.spec, model.weights)
    with torch.random.fork_rng():  # building the network draws initial weights: leave the global generator as found
        return build_classifier(ClassifierConfig(config.classifier, tuple(data.image_shape), data.num_classes))


class _AuditFolder(ExperimentFolder):
    """The audit's own folder: its records are its stages' folders (``<stage>/results*.jsonl``) and the gathered
    ``metrics.json``, so a resume is guarded as soon as any stage has finished a unit."""

    def has_results(self) -> bool:
        return (self.path / "metrics.json").is_file() or any(
            p.is_file() and p.stat().st_size > 0 for p in self.path.glob("*/results*.jsonl"))


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(to_jsonable(value), sort_keys=True))


def _audited_model(config: AuditConfig, train, test, model: UserModel | nn.Module | None, *, device: str, cache_dir,
                   progress: bool) -> tuple[UserModel | nn.Module | None, ModelInfo]:
    """The audited classifier, resolved once before any stage on the stages' split ``train``/``test`` (the data split
    80/20 as :meth:`Experiment.load_data` does, or the known manifold's images of ``known:<data>``): ``(what every
    stage gets as model=, its ModelInfo)``.
    The built-in standard model is trained (cached) here and each stage re-reads it from the cache (model=None, so
    its records name the built-in classifier); ``training="l2"`` is the l2-robust fine-tune of ``manifex align``
    (:func:`manifex.alignment.pipeline.robust_classifier`, the same cache entry), handed to every stage as the module."""
    from ..models import accuracy, state_fingerprint
    from ..models.resolve import resolve_classifier

    u = model if isinstance(model, UserModel) else UserModel("")
    spec = u.spec if isinstance(model, UserModel) else model
    net, info = resolve_classifier(train, test, model=spec, weights=u.weights, normalize=u.normalize, output=u.output,
                                   classifier=config.classifier, epochs=config.epochs, seed=config.seed, device=device,
                                   cache_dir=cache_dir, progress=progress)
    if config.training == "standard":
        return model, info
    from ..alignment.pipeline import AlignConfig, robust_classifier

    align = AlignConfig(dataset=config.dataset, classifier=config.classifier, classifier_epochs=config.epochs,
                        seed=config.seed)
    robust, trained = robust_classifier(train, net, align, cache_dir=cache_dir, device=device, progress=progress)
    how = (f"PGD-l2 fine-tune of the standard {config.classifier} ({_epochs(config.epochs)}) for "
           f"{_epochs(align.robust_epochs)}, eps in {{{', '.join(f'{e:g}' for e in align.robust_epsilons)}}}, {align.robust_steps} steps")
    info = ModelInfo(name=f"{config.classifier} l2-robust", source="built-in",
                     architecture=config.classifier, spec=f"l2-robust: {how}", fingerprint=state_fingerprint(robust),
                     accuracy=float(accuracy(robust, test)), epochs=config.epochs, cached=trained.get("cached"),
                     checks=(f"model: the l2-robust {config.classifier} of manifex align ({how}); every stage audits "
                             "this module",))
    return robust, info


def _epochs(n: int) -> str:
    return f"{n} epoch{'s' if n != 1 else ''}"


def _earlier_stage(folder: Path, settings: dict[str, Any], fingerprint: str | None, data_print: str) -> str | None:
    """Why a stage folder left by an earlier call cannot join this audit's report (None: it can: same settings, same
    model, same data, finished)."""
    try:
        record = json.loads((folder / EXPERIMENT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{folder.name}/{EXPERIMENT_FILE} is missing or unreadable"
    if not (folder / "metrics.json").is_file():
        return "it did not finish (no metrics.json)"
    if record.get("settings") != settings:
        return "it was made with other stage settings"
    if (record.get("model") or {}).get("fingerprint") != fingerprint:
        return "it audited another model (weights fingerprint)"
    if (record.get("data") or {}).get("fingerprint") != data_print:
        return "it was made on other data"
    return None


def audit(config: AuditConfig, out_dir: str | os.PathLike, *, model: UserModel | nn.Module | str | None = None,
          resume: bool = True, overwrite: bool = False, executor=None, progress: bool = True,
          cache_dir: str | os.PathLike | None = None, trust_pickle: bool = False, num_classes: int | None = None,
          command: str | None = None) -> AuditResult:
    """Audit one classifier with every system: explanations (faithfulness, tangent alignment), manipulability at an
    L∞ budget of 8/255 and β-smoothing, counterfactuals (latent vs pixel), concepts at the last layer with a grid of
    at least 2×2 and one contrast pair. Each stage is its system's experiment in ``out_dir/<stage>/`` (resumed on its
    own, with its own report); ``out_dir/report.html`` and ``metrics.json`` gather the headline numbers.

    ``out_dir/experiment.json`` is the audit's own identity (its settings, the data, the audited model), claimed
    before any stage trains: a resume with other settings or another model is refused in one line. ``stages`` is not
    a setting: a later call with other stages adds them, and the report gathers every stage folder made with the
    same settings (marked as from an earlier call). ``model``: None (the built-in ``config.classifier``;
    ``config.training="l2"``: its l2-robust fine-tune as ``manifex align`` trains it), a :class:`UserModel` or its
    spec string, or an ``nn.Module`` (left as found). A stage that cannot run on this model or data is skipped, with
    its reason in the checks. ``overwrite=True`` moves the whole audit folder aside once and starts over;
    ``resume=False`` recomputes every selected stage in place.
    """
    from ..attribution.core import preserve_model_state
    from ..models.resolve import check_writable_dir, resolve_device

    if not isinstance(config, AuditConfig):
        raise InputError(f"config must be an AuditConfig, got {type(config).__name__}.")
    names = config.selected()  # budget and stages checked before anything is loaded
    if config.training not in ("standard", "l2"):
        raise InputError(f"{param('training', config.training)} is not one of standard, l2.")
    if isinstance(model, (str, os.PathLike)):
        model = UserModel(os.fspath(model))
    if config.training != "standard" and model is not None:
        raise InputError(f"{param('training', config.training)} fine-tunes the built-in {param('classifier')}; with your own "
                         f"{param('model')} leave {param('training', 'standard')} (train it robustly yourself).")
    device = resolve_device(config.device)
    guard: Any = contextlib.nullcontext()
    if isinstance(model, nn.Module):  # the device follows the module; its state is left as found (also on an error)
        guard = preserve_model_state(model)
        first = next(model.parameters(), None)
        device = str(first.device) if first is not None else device
    out = check_writable_dir(out_dir, param("out_dir"))
    check_writable_dir(cache_dir, param("cache_dir"))
    with guard:
        return _audit(config, names, out, model=model, device=device, resume=resume, overwrite=overwrite,
                      executor=executor, progress=progress, cache_dir=cache_dir, trust_pickle=trust_pickle,
                      num_classes=num_classes, command=command)


def _audit(config: AuditConfig, names: tuple[str, ...], out: Path, *, model, device: str, resume: bool, overwrite: bool,
           executor, progress: bool, cache_dir, trust_pickle: bool, num_classes, command) -> AuditResult:
    from ..models.known_manifold import KnownData, known_base
    from ..models.resolve import data_identity, resolve_data

    # known:<data>: the base data here (cheap: its classes, shapes and the probes), its known manifold after the claims
    base = known_base(config.dataset)
    data, _ = resolve_data(base or config.dataset, trust_pickle=trust_pickle, num_classes=num_classes)
    checks: list[str] = [f"budget {config.budget}: stages {', '.join(names)}"]
    skipped: dict[str, str] = {}
    layer = probe = None
    concept_stages = [s for s in ("concepts", "contrast") if s in names or (out / s / EXPERIMENT_FILE).is_file()]
    if concept_stages:
        probe = _probe_model(config, data, model)
        layer, why = find_concept_layer(probe, data.x[:4])
        if layer is None:
            skipped.update((s, why) for s in concept_stages if s in names)
        else:
            checks.append(why)
    layout = "strip" if model is None and config.classifier == "resnet" else "canvas"  # the strip needs global pooling
    probed: dict[tuple[str, ...], tuple[list[str], dict[str, str]]] = {}

    def attackable(methods: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:  # the attack runs per method it can take
        if methods not in probed:
            probed[methods] = attackable_methods(probe if probe is not None else _probe_model(config, data, model),
                                                 data.x[:2], methods)
        return probed[methods]

    n_classes = num_classes or data.num_classes
    configs = stage_configs(config, num_classes=n_classes, layer=layer, layout=layout, notes=checks,
                            attackable=attackable if "attack" in names else None)
    # every stage's folder this audit could have (to gather those an earlier call with other --stages made)
    every = stage_configs(dataclasses.replace(config, stages=None), num_classes=n_classes, layer=layer, layout=layout,
                          attackable=attackable)
    kinds = _experiments()
    experiments = {name: kinds[stage_of(name)]() for name in {**every, **configs}}
    for name, cfg in configs.items():  # every stage's own option checks before the first stage trains anything
        try:
            experiments[name].check_options(cfg)
        except ManifexError as e:
            raise type(e)(f"audit stage {name}: {e}") from e
    # the audit's identity, claimed before anything is trained (the model once resolved): a resume with other
    # settings or another model is refused here in one line, before any stage runs
    folder = _AuditFolder(out, command="audit", resume=resume, overwrite=overwrite, what="an audit")
    folder.claim("settings", result_settings(config))
    identity = data_identity(config.dataset, data.x, data.y)
    folder.claim("data", identity)
    if base is None:
        train, test = data.split(0.2, seed=config.seed)  # the stages' split (Experiment.load_data)
    else:  # the stages' known manifold (Experiment.derive_data): built once here, every stage reads it from the cache
        from ..models import ModelCache
        from ..models.known_manifold import known_check, known_data

        known = KnownData(seed=config.seed)
        folder.claim("known_manifold", known.to_dict())
        km, _ = known_data(data, known, cache=ModelCache(cache_dir), device=device, progress=progress)
        train, test = km.train, km.test
        checks.append(known_check(km, known))
        checks.extend(f"FAILED: {p}" for p in km.warnings)
    stage_model, info = _audited_model(config, train, test, model, device=device, cache_dir=cache_dir, progress=progress)
    folder.claim("model", info.identity())
    checks.extend(info.checks)
    results: dict[str, Any] = {s: None for s in names}
    seconds: dict[str, float] = {}
    for name, cfg in configs.items():
        start = time.perf_counter()
        try:
            results[name] = run_experiment(experiments[name], cfg, out / name, model=stage_model, resume=resume,
                                           executor=executor, progress=progress, cache_dir=cache_dir,
                                           trust_pickle=trust_pickle, num_classes=num_classes, command=command,
                                           model_name=info.name)
        except ManifexError as e:  # say which stage refused (its own settings are named in the message)
            raise type(e)(f"audit stage {name}: {e}") from e
        seconds[name] = round(time.perf_counter() - start, 1)
    # stages of earlier calls (other --stages) with the same settings, model and data join the report
    earlier: list[str] = []
    refused: set[str] = set()
    for name, cfg in every.items():
        if stage_of(name) in names or not (out / name).is_dir():
            continue
        why = _earlier_stage(out / name, _plain(experiments[name].settings(cfg)), info.fingerprint, identity["fingerprint"])
        if why is None:
            earlier.append(name)
        else:
            refused.add(stage_of(name))
            checks.append(f"stage {name} in {out / name} is left out of this report: {why} (rerun it with --stages "
                          f"{stage_of(name)})")
    earlier = [e for e in earlier if stage_of(e) not in refused]  # a stage joins whole (every method's attack) or not
    if earlier:
        checks.append(f"from an earlier call with the same settings and model: stage{'s' if len(earlier) > 1 else ''} "
                      f"{', '.join(earlier)}")
    shown = [s for s in STAGES if s in names or any(stage_of(e) == s for e in earlier)]
    for name, why in skipped.items():
        checks.append(f"FAILED: stage {name} skipped: {why}")
    fingerprints = {r.model_info.fingerprint for r in results.values() if r is not None and r.model_info is not None}
    if fingerprints == {info.fingerprint}:
        checks.append(f"every stage audited the same model (weights fingerprint {info.fingerprint})")
    elif fingerprints:
        checks.append(f"FAILED: the stages audited {len(fingerprints | {info.fingerprint})} different models "
                      "(weights fingerprints differ)")
    stage_metrics = {key: _read_metrics(out / key) for key in [*configs, *earlier]
                     if stage_of(key) in shown and stage_of(key) not in skipped}
    for name, m in stage_metrics.items():
        checks.extend(f"FAILED: stage {name}: {c[len('FAILED: '):]}" for c in m.get("checks", [])
                      if isinstance(c, str) and c.startswith("FAILED: "))
    stages = {name: {"status": "skipped", "reason": skipped[name]} if name in skipped else
              {"status": "done", "seconds": round(sum(v for k, v in seconds.items() if stage_of(k) == name), 1),
               "report": f"{name}/report.html", "earlier": name not in names,
               "headline": stage_headline(name, stage_metrics)} for name in shown}
    rows = scorecard(stages)
    advice = recommendation(rows, stages)
    metrics = {"command": "audit", "schema": 2,
               "config": {**{k: getattr(config, k) for k in ("dataset", "classifier", "epochs", "budget", "training",
                                                             "seed")}, "stages": shown},
               "data": identity, "model": info.to_dict(), "stages": stages, "scorecard": rows,
               "recommendation": advice, "checks": checks, "seconds": seconds}
    write_metrics(out / "metrics.json", metrics)
    from .report import write_audit_report

    report = write_audit_report(out, metrics, command=command)
    return AuditResult(out_dir=out, stages=results, skipped=skipped, metrics=metrics, scorecard=rows,
                       recommendation=advice, checks=checks, report=report, seconds=seconds, moved_to=folder.moved_to)


def _read_metrics(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}

