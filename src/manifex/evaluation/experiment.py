"""``run_evaluation``: methods × metrics on one model and data, as one call (``manifex evaluate`` is a thin layer on it).

1. Data and generator: ``known:<data>`` samples images from a VAE trained on ``<data>`` (the manifold is known:
   tangent spaces exact, the latent codes of the images stored); any other dataset gets a VAE trained on its
   training split (an estimated manifold, codes by its encoder).
2. The classifier: built-in (trained and cached) or the user's own (``classifier=``).
3. One unit per method on the shared run layer (``results.jsonl``, resumable, any executor): the attributions of
   ``n`` test images, every Quantus metric of ``metrics`` (through :func:`.bridge.evaluate`), the tangent alignment
   and the three deletion curves (black, ROAD, in-filled from the generator) with the perturbed images' distance
   to the manifold.
4. ``metrics.json`` and ``report.html`` (:mod:`.report`).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..attribution import canonical_method, last_conv_layer
from ..attribution.core import model_device, preserve_model_state, warn_if_training
from ..errors import DataError, InputError
from ..models.cache import state_fingerprint
from ..runs import Unit, check_settings, run_units, tensor_fingerprint, unit_seed
from .bridge import MANIFEX_METRICS, evaluate, explain_func, import_quantus, metric_info, metric_name
from .manifold import PERTURBATIONS, deletion_curves, manifold_distance, tangent_alignment

__all__ = ["EvaluateConfig", "run_evaluation", "DEFAULT_METHODS", "DEFAULT_METRICS", "metric_options", "process_methods"]

#: gradient, SmoothGrad, IG, Input×Gradient, an LRP composite (EpsilonPlus), DeepLift, Grad-CAM (models with a conv layer)
DEFAULT_METHODS = ("gradient", "smoothgrad", "integrated_gradients", "input_x_gradient", "lrp", "deeplift", "gradcam")
#: one or two of each category, and the manifold-aware ones
DEFAULT_METRICS = ("PixelFlipping", "FaithfulnessCorrelation", "MaxSensitivity", "RandomLogit", "Sparseness", "Complexity",
                   "TangentAlignment", "ManifoldDeletion")
#: the deletion curves' names in the table (ManifoldDeletion is the in-filled one)
CURVE_METRICS = {"black": "BlackDeletion", "road": "ROADDeletion", "manifold": "ManifoldDeletion"}


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of an evaluation run (every field but ``device`` and ``trust_pickle`` decides the results).

    ``n``: test images scored. ``curve_steps``: points of the deletion curves (fractions 0, 1/steps, …);
    ``infill_steps``/``distance_steps``: Adam steps of the in-fill and of the distance to the manifold.
    ``nr_samples``: MaxSensitivity's noisy copies; ``nr_runs``: FaithfulnessCorrelation's random subsets.
    """

    dataset: str = "known:digits8"
    classifier: str = "lenet"
    epochs: int = 10
    methods: tuple[str, ...] = DEFAULT_METHODS
    metrics: tuple[str, ...] = DEFAULT_METRICS
    n: int = 64
    latent_dim: int = 10
    generator_epochs: int = 20
    known_n_train: int = 2000
    known_n_test: int = 500
    curve_steps: int = 10
    infill_steps: int = 100
    distance_steps: int = 100
    nr_samples: int = 10
    nr_runs: int = 50
    batch_size: int = 64
    seed: int = 0
    device: str = "cpu"
    trust_pickle: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def result_settings(self) -> dict:
        """The settings that decide the records (the resume guard compares them)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("device", "trust_pickle")}


def metric_options(name: str, *, n_features: int, num_classes: int, config: EvaluateConfig) -> dict[str, Any]:
    """The Quantus options the run uses for a metric (sizes fitted to the images: Quantus's defaults assume
    224-px ImageNet images and 1000 classes)."""
    opts: dict[str, Any] = {}
    if name == "PixelFlipping":
        opts = {"return_auc_per_sample": True}
    elif name == "FaithfulnessCorrelation":
        opts = {"nr_runs": config.nr_runs, "subset_size": max(1, n_features // 8)}
    elif name in ("MaxSensitivity", "AvgSensitivity"):
        opts = {"nr_samples": config.nr_samples}
    elif name == "RandomLogit":
        opts = {"num_classes": num_classes, "seed": config.seed}
    return opts


def _check_config(cfg: EvaluateConfig) -> tuple[list[str], list[str]]:
    """(methods, metrics) canonical; names, sizes and Quantus checked before any data or model work."""
    if not cfg.methods:
        raise InputError("methods is empty; name at least one attribution method (e.g. --methods gradient).")
    if not cfg.metrics:
        raise InputError("metrics is empty; name at least one metric (e.g. --metrics pixel_flipping).")
    methods = list(dict.fromkeys(canonical_method(m) for m in cfg.methods))
    metrics = list(dict.fromkeys(metric_name(m) for m in cfg.metrics))
    if any(m not in MANIFEX_METRICS for m in metrics):
        import_quantus()
    for key in ("n", "curve_steps", "infill_steps", "distance_steps", "nr_samples", "nr_runs", "batch_size", "epochs",
                "generator_epochs", "latent_dim"):
        v = getattr(cfg, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{key} must be an integer >= 1, got {v!r}.")
    if cfg.n < 2:
        raise InputError(f"n must be >= 2 (a spread over examples), got {cfg.n}.")
    return methods, metrics


def _prepare_data(cfg: EvaluateConfig, cache, progress: bool, classifier: nn.Module | None = None):
    """(train, test, generative, z_of_test or None, real_reference_images, checks, info); the user's ``classifier``
    is checked on one batch of the data (shape, classes, finite logits) before the generator is trained."""
    from ..data import load_dataset
    from ..data.loaders import check_classification_data
    from ..models import GenerativeTrainConfig, get_generative
    from ..models.known_manifold import KnownManifoldConfig, make_known_manifold

    known = cfg.dataset.startswith("known:")
    spec = cfg.dataset.split(":", 1)[1] if known else cfg.dataset
    real = load_dataset(spec, trust_pickle=cfg.trust_pickle)
    checks = list(check_classification_data(real, where=f"--dataset {spec}"))  # worded as the CLI's check: listed once
    lo, hi = float(real.x.min()), float(real.x.max())
    if lo < 0 or hi > 1:
        raise DataError(f"{cfg.dataset}: pixels lie in [{lo:.3g}, {hi:.3g}]; the generator and the black baseline need "
                        "images in [0, 1].")
    if classifier is not None:
        from ..models.user import check_classifier

        with preserve_model_state(classifier):
            check_classifier(classifier, real.x[:8], real.num_classes, name="the classifier")
    gtrain = GenerativeTrainConfig(epochs=cfg.generator_epochs, seed=cfg.seed)
    if known:
        vae, ginfo = get_generative(real, "vae", cfg.latent_dim, gtrain, cache=cache, device=cfg.device, progress=progress)
        km = make_known_manifold(real, vae, KnownManifoldConfig(n_train=cfg.known_n_train, n_test=cfg.known_n_test,
                                                                seed=cfg.seed), cache=cache, progress=progress)
        checks += km.checks
        _, real_test = real.split(0.2, seed=cfg.seed)
        info = {"manifold": "known (images sampled from a VAE decoder; tangent spaces exact, latent codes stored)",
                "labeler_accuracy": km.labeler_accuracy, "acceptance_rate": km.acceptance_rate}
        return km.train, km.test, vae, km.test.z, real_test.x, checks, info
    train, test = real.split(0.2, seed=cfg.seed)
    train.z = test.z = None
    vae, ginfo = get_generative(train, "vae", cfg.latent_dim, gtrain, cache=cache, device=cfg.device, progress=progress)
    info = {"manifold": f"estimated by a VAE (latent {cfg.latent_dim}) trained on the training split; tangent spaces and "
                        "in-fills from its decoder at the encoder's codes"}
    return train, test, vae, None, test.x, checks, info


def _sample(n_total: int, n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def _per_example(scores: torch.Tensor, n: int) -> list[float]:
    """One score per example from what a Quantus metric returns: scores (N,) as they are; a curve per example
    (N, steps) by its area with unit steps (Quantus's AUC); per layer (layers, N), as MPRT returns them, the last
    layer's (every layer randomised)."""
    if scores.dim() == 1 and scores.shape[0] == n:
        return scores.tolist()
    if scores.dim() == 2 and scores.shape[0] == n:
        return (np.trapezoid if hasattr(np, "trapezoid") else np.trapz)(scores.numpy(), dx=1, axis=1).tolist()
    if scores.dim() == 2 and scores.shape[1] == n:
        return scores[-1].tolist()
    raise InputError(f"a metric returned scores of shape {tuple(scores.shape)} for {n} examples; expected (N,), (N, steps) "
                     "or (layers, N).")


def process_methods(units: list[Unit], context: dict, out_dir: Path) -> list[dict]:
    """One record per method unit: per-example scores of every metric, mean deletion curves and manifold distances."""
    cfg: EvaluateConfig = context["config"]
    model, x, y, z, gen = context["model"], context["x"], context["y"], context["z"], context["generator"]
    metrics = context["metrics"]
    records = []
    for u in units:
        method = u.payload["method"]
        t0 = time.perf_counter()
        # Quantus draws its noise and subsets from NumPy's global generator: seeded per unit (and restored after),
        # so a method's record is the same whichever run, order or worker computes it
        numpy_state = np.random.get_state()
        np.random.seed(unit_seed(u.id, cfg.seed) % 2**32)
        try:
            records.append(_process_method(u, method, cfg, model, x, y, z, gen, metrics, context, t0))
        finally:
            np.random.set_state(numpy_state)
    return records


def _process_method(u: Unit, method: str, cfg: EvaluateConfig, model, x, y, z, gen, metrics, context, t0) -> dict:
    """The record of one method (see :func:`process_methods`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Quantus's own notices; manifex's checks are in the report
        a = explain_func(model, x, y, method=method, reduce_axes=(), batch_size=cfg.batch_size)
        a = np.broadcast_to(a, x.shape).copy() if a.shape != tuple(x.shape) else a
        summed = a.sum(axis=1, keepdims=True)  # Quantus's convention: relevance summed over channels
        scores: dict[str, list] = {}
        for name in metrics:
            if name in MANIFEX_METRICS:
                continue
            opts = metric_options(name, n_features=int(np.prod(x.shape[2:])), num_classes=context["num_classes"], config=cfg)
            r = evaluate(model, x, y, summed, metrics=[name], method=method, batch_size=cfg.batch_size,
                         explain_func_kwargs={}, **opts)
            scores[name] = _per_example(r[name], x.shape[0])
        curves = distance = {}
        if "ManifoldDeletion" in metrics:
            dc = deletion_curves(model, x, y, a, generator=gen, z=z, kinds=PERTURBATIONS, steps=cfg.curve_steps,
                                 infill_steps=cfg.infill_steps, distance_steps=cfg.distance_steps, seed=cfg.seed,
                                 batch_size=max(256, cfg.batch_size))
            for kind, metric in CURVE_METRICS.items():
                scores[metric] = dc.auc[kind].tolist()
            curves = {k: {"mean": v.mean(0).tolist(), "sd": v.std(0).tolist()} for k, v in dc.prob.items()}
            distance = {k: {"mean": v.mean(0).tolist(), "sd": v.std(0).tolist()} for k, v in dc.distance.items()}
        if "TangentAlignment" in metrics:
            ta = tangent_alignment(a, gen, x=x, z=z, batch_size=cfg.batch_size)
            scores["TangentAlignment"] = ta.ratio.tolist()
            scores["TangentAlignmentRaw"] = ta.score.tolist()
    return {"id": u.id, "method": method, "scores": scores, "curves": curves, "distance": distance,
            "seconds": round(time.perf_counter() - t0, 2)}


def run_evaluation(config: EvaluateConfig = EvaluateConfig(), out_dir: str | Path = "runs/evaluate", *,
                   classifier: nn.Module | None = None, classifier_info: dict | None = None, cache: Any = None,
                   executor: Any = None, resume: bool = True, progress: bool = True, checks: Sequence[str] = (),
                   command: str | None = None) -> dict:
    """Evaluate every method of ``config`` by every metric on ``config.n`` test images; write ``results.jsonl`` (one
    record per method, resumable), ``metrics.json`` and ``report.html`` in ``out_dir``; return the summary.

    ``classifier``: your own model (images in [0, 1] → logits) instead of the built-in ``config.classifier``
    trained here; ``classifier_info`` describes it for the report. A resume with other result settings, another
    model or other images is refused in one line (``resume=False`` starts over).
    """
    from ..models import ModelCache, TrainConfig, accuracy, get_classifier
    from .report import summarize, write_evaluation_report

    t_start = time.perf_counter()
    methods, metrics = _check_config(config)
    cache = cache or ModelCache()
    torch.manual_seed(config.seed)
    train, test, gen, z_all, real_ref, data_checks, data_info = _prepare_data(config, cache, progress, classifier)
    checks = list(dict.fromkeys(list(checks) + data_checks))  # the CLI has checked the same data already
    if classifier is None:
        model, info = get_classifier(train, config.classifier, TrainConfig(epochs=config.epochs, seed=config.seed),
                                     cache=cache, device=config.device, progress=progress)
        info = {"source": "built-in", "classifier": config.classifier, **{k: v for k, v in info.items() if k != "key"}}
    else:  # the user's model as it is (its device, its mode: a model in train mode is warned about, not changed)
        model, info = classifier, {"source": "user", **(classifier_info or {})}
        warn_if_training(model)
    device = model_device(model) or torch.device(config.device)
    gen = gen.to(device).eval()
    with preserve_model_state(model):
        acc = accuracy(model, test)
    chance = float(torch.bincount(test.y, minlength=test.num_classes).max()) / len(test)
    low = acc < chance + 0.2 * (1 - chance)
    checks.append(f"{'FAILED: ' if low else ''}classifier test accuracy {acc:.1%} (chance {chance:.1%})")
    idx = _sample(len(test), min(config.n, len(test)), config.seed)
    x, y = test.x[idx].to(device), test.y[idx].to(device)
    z = z_all[idx].to(device) if z_all is not None else None
    if "gradcam" in methods and isinstance(model, nn.Module):
        try:
            last_conv_layer(model)
        except InputError:
            methods.remove("gradcam")
            checks.append("Grad-CAM left out: the model has no conv layer")
    result_settings = config.result_settings()
    if classifier is not None:  # the built-in classifier's settings do not apply to the user's model
        result_settings = {k: v for k, v in result_settings.items() if k not in ("classifier", "epochs")}
    settings = {"config": result_settings, "methods": methods, "metrics": metrics,
                "model": {"type": type(model).__name__, "fingerprint": state_fingerprint(model)},
                "generator": state_fingerprint(gen), "data": tensor_fingerprint(x.cpu()), "targets": tensor_fingerprint(y.cpu())}
    check_settings(out_dir, settings, resume=resume, what="an evaluation")
    # the real images' distance to the generator's manifold: the reference the perturbed images are measured against
    ref = None
    if "ManifoldDeletion" in metrics:
        real = real_ref[_sample(len(real_ref), min(config.n, len(real_ref)), config.seed + 1)].to(device)
        with preserve_model_state(gen), torch.no_grad():
            z0 = gen.encode(real)
        ref = manifold_distance(gen, real, z0, steps=config.distance_steps)
    units = [Unit(f"method-{m}", {"method": m}) for m in methods]
    context = {"config": config, "model": model, "x": x, "y": y, "z": z, "generator": gen, "metrics": metrics,
               "num_classes": test.num_classes}
    records = run_units(units, process_methods, out_dir, context=context, batch_size=1, executor=executor, resume=resume,
                        progress=progress, desc="methods")
    summary = summarize(records, metrics, reference_distance=ref)
    model_info = {**info, "test accuracy": round(acc, 4), "dataset": config.dataset, "images scored": int(x.shape[0])}
    write_evaluation_report(records, summary, out_dir, config=config, model_info=model_info, data_info=data_info,
                            checks=checks, command=command, seconds=round(time.perf_counter() - t_start, 1))
    return summary
