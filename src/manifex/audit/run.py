"""``manifex audit``: one model through every system, each stage its own experiment in ``out_dir/<stage>/``.

>>> from manifex.audit import AuditConfig, audit
>>> result = audit(AuditConfig(dataset="digits8", budget="quick"), "runs/audit")
>>> result.recommendation, result.report
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import InputError, ManifexError, param
from ..experiment import UserModel, run_experiment, write_metrics
from .plan import AuditConfig, find_concept_layer, stage_configs
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


def _experiments() -> dict[str, Any]:
    from ..concepts import ConceptsExperiment, ContrastExperiment
    from ..counterfactuals.experiment import CounterfactualExperiment
    from ..evaluation.experiment import EvaluateExperiment
    from ..manipulation import AttackExperiment, SmoothExperiment
    from .stages import ManifoldExperiment, ModelExperiment

    return {"model": ModelExperiment, "manifold": ManifoldExperiment, "evaluate": EvaluateExperiment,
            "attack": AttackExperiment, "smooth": SmoothExperiment, "counterfactual": CounterfactualExperiment, "concepts": ConceptsExperiment, "contrast": ContrastExperiment}


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


def audit(config: AuditConfig, out_dir: str | os.PathLike, *, model: UserModel | nn.Module | str | None = None,
          resume: bool = True, overwrite: bool = False, executor=None, progress: bool = True,
          cache_dir: str | os.PathLike | None = None, trust_pickle: bool = False, num_classes: int | None = None,
          command: str | None = None) -> AuditResult:
    """Audit one classifier with every system: explanations (faithfulness, tangent alignment), manipulability at an
    L∞ budget of 8/255 and β-smoothing, counterfactuals (latent vs pixel), concepts at the last layer with a grid of
    at least 2×2 and one contrast pair. Each stage is its system's experiment in ``out_dir/<stage>/`` (resumed on its
    own, with its own report); ``out_dir/report.html`` and ``metrics.json`` gather the headline numbers.

    ``model``: None (the built-in ``config.classifier``), a :class:`UserModel` or its spec string, or an
    ``nn.Module`` (left as found). A stage that cannot run on this model or data is skipped, with its reason in
    the checks. ``overwrite=True`` moves every stage's existing folder aside before it starts over.
    """
    from ..models.resolve import check_writable_dir, resolve_data, resolve_device

    if not isinstance(config, AuditConfig):
        raise InputError(f"config must be an AuditConfig, got {type(config).__name__}.")
    names = config.selected()  # budget and stages checked before anything is loaded
    if isinstance(model, (str, os.PathLike)):
        model = UserModel(os.fspath(model))
    resolve_device(config.device)
    out = check_writable_dir(out_dir, param("out_dir"))
    check_writable_dir(cache_dir, param("cache_dir"))
    data, _ = resolve_data(config.dataset, trust_pickle=trust_pickle, num_classes=num_classes)
    checks: list[str] = [f"budget {config.budget}: stages {', '.join(names)}"]
    skipped: dict[str, str] = {}
    layer = probe = None
    if {"concepts", "contrast"} & set(names):
        probe = _probe_model(config, data, model)
        layer, why = find_concept_layer(probe, data.x[:4])
        if layer is None:
            for s in ("concepts", "contrast"):
                if s in names:
                    skipped[s] = why
        else:
            checks.append(why)
    layout = "strip" if model is None and config.classifier == "resnet" else "canvas"  # the strip needs global pooling

    def attackable(methods: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:  # the attack runs per method it can take
        return attackable_methods(probe if probe is not None else _probe_model(config, data, model), data.x[:2], methods)

    configs = stage_configs(config, num_classes=num_classes or data.num_classes, layer=layer, layout=layout, notes=checks,
                            attackable=attackable if "attack" in names else None)
    kinds = _experiments()
    experiments = {name: kinds[stage_of(name)]() for name in configs}
    for name, cfg in configs.items():  # every stage's own option checks before the first stage trains anything
        experiments[name].check_options(cfg)
    results: dict[str, Any] = {s: None for s in names}
    seconds: dict[str, float] = {}
    for name, cfg in configs.items():
        start = time.perf_counter()
        try:
            results[name] = run_experiment(experiments[name], cfg, out / name, model=model, resume=resume,
                                           overwrite=overwrite, executor=executor, progress=progress, cache_dir=cache_dir,
                                           trust_pickle=trust_pickle, num_classes=num_classes, command=command)
        except ManifexError as e:  # say which stage refused (its own settings are named in the message)
            raise type(e)(f"audit stage {name}: {e}") from e
        seconds[name] = round(time.perf_counter() - start, 1)
    for name, why in skipped.items():
        checks.append(f"FAILED: stage {name} skipped: {why}")
    fingerprints = {r.model_info.fingerprint for r in results.values() if r is not None and r.model_info is not None}
    if len(fingerprints) == 1:
        checks.append("every stage audited the same model (one weights fingerprint)")
    elif len(fingerprints) > 1:
        checks.append(f"FAILED: the stages audited {len(fingerprints)} different models (weights fingerprints differ)")
    stage_metrics = {name: _read_metrics(out / name) for name in configs}
    for name, m in stage_metrics.items():
        checks.extend(f"FAILED: stage {name}: {c[len('FAILED: '):]}" for c in m.get("checks", [])
                      if isinstance(c, str) and c.startswith("FAILED: "))
    stages = {name: {"status": "skipped", "reason": skipped[name]} if name in skipped else
              {"status": "done", "seconds": round(sum(v for k, v in seconds.items() if stage_of(k) == name), 1),
               "report": f"{name}/report.html", "headline": stage_headline(name, stage_metrics)} for name in names}
    rows = scorecard(stages)
    advice = recommendation(rows, stages)
    first = next((r for r in results.values() if r is not None and r.model_info is not None), None)
    metrics = {"command": "audit", "schema": 1, "config": {k: getattr(config, k) for k in ("dataset", "classifier", "epochs",
                                                                                           "budget", "seed")},
               "model": first.model_info.to_dict() if first else None, "stages": stages, "scorecard": rows,
               "recommendation": advice, "checks": checks, "seconds": seconds}
    write_metrics(out / "metrics.json", metrics)
    from .report import write_audit_report

    report = write_audit_report(out, metrics, command=command)
    return AuditResult(out_dir=out, stages=results, skipped=skipped, metrics=metrics, scorecard=rows,
                       recommendation=advice, checks=checks, report=report, seconds=seconds)


def _read_metrics(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}

