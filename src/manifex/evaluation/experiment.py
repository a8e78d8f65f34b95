"""``run_evaluation``: methods × metrics on one model and data, as one call (``manifex evaluate`` is a thin layer on it).

1. Data and generator: ``known:<data>`` samples images from a VAE trained on ``<data>`` (the manifold is known:
   tangent spaces exact, the latent codes of the images stored); any other dataset gets a VAE trained on its
   training split (an estimated manifold, codes by its encoder).
2. The classifier: built-in (trained and cached) or the user's own (``classifier=``).
3. One unit per method on the shared run layer (``results.jsonl``, resumable, any executor): the attributions of
   ``n`` test images, every Quantus metric of ``metrics`` (through :func:`.bridge.evaluate`), the tangent alignment
   and the three deletion curves (black, ROAD, in-filled from the generator) with the perturbed images' distance
   to the manifold.
4. ``metrics.json`` and ``report.html`` (``report``).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..attribution import canonical_method, last_conv_layer
from ..attribution.core import model_device, preserve_model_state, warn_if_training
from ..errors import DataError, InputError, param
from ..models.cache import state_fingerprint
from ..models.known_manifold import known_base
from ..experiment import Experiment, Run, Stage, run_experiment, setting
from ..runs import Unit, unit_seed
from .bridge import MANIFEX_METRICS, evaluate, explain_func, import_quantus, metric_info, metric_name
from .manifold import PERTURBATIONS, deletion_curves, manifold_distance, tangent_alignment

__all__ = ["EvaluateConfig", "EvaluateExperiment", "run_evaluation", "DEFAULT_METHODS", "DEFAULT_METRICS", "metric_options", "process_methods"]

#: gradient, SmoothGrad, IG, Input×Gradient, an LRP composite (EpsilonPlus), DeepLift, Grad-CAM (models with a conv layer)
DEFAULT_METHODS = ("gradient", "smoothgrad", "integrated_gradients", "input_x_gradient", "lrp", "deeplift", "gradcam")
#: one or two of each category, and the manifold-aware ones
DEFAULT_METRICS = ("PixelFlipping", "FaithfulnessCorrelation", "MaxSensitivity", "RandomLogit", "Sparseness", "Complexity",
                   "TangentAlignment", "ManifoldDeletion")
#: the deletion curves' names in the table (ManifoldDeletion is the in-filled one)
CURVE_METRICS = {"black": "BlackDeletion", "road": "ROADDeletion", "manifold": "ManifoldDeletion"}


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of an evaluation run (each a CLI option of ``manifex evaluate`` unless marked Python-only).

    ``n``: test images scored. ``curve_steps``: points of the deletion curves (fractions 0, 1/steps, …);
    ``infill_steps``/``distance_steps``: Adam steps of the in-fill and of the distance to the manifold.
    ``nr_samples``: MaxSensitivity's noisy copies; ``nr_runs``: FaithfulnessCorrelation's random subsets.
    """

    dataset: str = setting("known:digits8", "'known:<data>' samples images from a VAE trained on <data> (the manifold is "
                           "known: exact tangent spaces and latent codes); any other dataset gets a VAE trained on it.")
    classifier: str = setting("lenet", "Built-in classifier trained (and cached) on the data; see --model for your own.",
                              choices=("lenet", "mlp", "vgg", "resnet"))
    epochs: int = setting(10, "Classifier epochs (cached).", low=1)
    methods: tuple[str, ...] = setting(DEFAULT_METHODS, "Comma-separated attribution methods (see `manifex methods`); "
                                       "Grad-CAM is left out for a model without a conv layer.", parse="csv")
    metrics: tuple[str, ...] = setting(DEFAULT_METRICS, "Comma-separated metrics: Quantus class names or snake_case "
                                       "(pip install \"manifex[eval]\"), and the manifold-aware TangentAlignment and "
                                       "ManifoldDeletion.", parse="csv")
    n: int = setting(64, "Test images scored (a seeded random pick).", low=2)
    latent_dim: int = setting(10, "Latent dimension of the VAE.", low=1, cli=False)
    generator_epochs: int = setting(20, "Epochs of the VAE (the manifold).", low=1, flag="--vae-epochs")
    known_n_train: int = setting(2000, "Generated training images of known:<data>.", low=1, cli=False)
    known_n_test: int = setting(500, "Generated test images of known:<data>.", low=1, cli=False)
    curve_steps: int = setting(10, "Points of the deletion curves.", low=1)
    infill_steps: int = setting(100, "Adam steps of the on-manifold in-fill.", low=1)
    distance_steps: int = setting(100, "Adam steps of the distance to the manifold.", low=1, cli=False)
    flip_steps: int | None = setting(None, "PixelFlipping's curve points: pixels are removed in this many equal groups "
                                     "at most (the fewest pixels per step that divide the image; default: one pixel per "
                                     "step, Quantus's default).", low=1)
    nr_samples: int = setting(10, "MaxSensitivity's noisy copies.", low=1)
    nr_runs: int = setting(50, "FaithfulnessCorrelation's random subsets.", low=1, cli=False)
    batch_size: int = setting(64, "Images per explanation batch.", low=1, result=False)
    seed: int = setting(0, "Seed of the split, training and sampling.", cli=False)
    device: str = setting("cpu", "torch device.", result=False, cli=False)
    trust_pickle: bool = setting(False, "Allow pickled dataset files.", result=False, cli=False)

    def to_dict(self) -> dict:
        return asdict(self)

    def result_settings(self) -> dict:
        """The settings that decide the records (the resume guard compares them)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("device", "trust_pickle")}


def flip_features_in_step(n_features: int, steps: int) -> int:
    """Pixels per PixelFlipping step for at most ``steps`` steps: the smallest divisor of ``n_features`` (Quantus asks
    that it divide the features) with ``n_features / divisor <= steps`` (1024 pixels, 64 steps: 16 per step)."""
    return next(d for d in range(1, n_features + 1) if n_features % d == 0 and n_features // d <= steps)


def metric_options(name: str, *, n_features: int, num_classes: int, config: EvaluateConfig) -> dict[str, Any]:
    """The Quantus options the run uses for a metric (sizes fitted to the images: Quantus's defaults assume
    224-px ImageNet images and 1000 classes)."""
    opts: dict[str, Any] = {}
    if name == "PixelFlipping":
        opts = {"return_auc_per_sample": True}
        if config.flip_steps is not None:
            opts["features_in_step"] = flip_features_in_step(n_features, config.flip_steps)
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
        raise InputError(f"methods is empty; name at least one attribution method (e.g. {param('methods')} gradient).")
    if not cfg.metrics:
        raise InputError(f"metrics is empty; name at least one metric (e.g. {param('metrics')} pixel_flipping).")
    methods = list(dict.fromkeys(canonical_method(m) for m in cfg.methods))
    metrics = list(dict.fromkeys(metric_name(m) for m in cfg.metrics))
    if any(m not in MANIFEX_METRICS for m in metrics):
        import_quantus()
    for key in ("n", "curve_steps", "infill_steps", "distance_steps", "nr_samples", "nr_runs", "batch_size", "epochs",
                "generator_epochs", "latent_dim", "flip_steps"):
        v = getattr(cfg, key)
        if key == "flip_steps" and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{key} must be an integer >= 1, got {v!r}.")
    if cfg.n < 2:
        raise InputError(f"n must be >= 2 (a spread over examples), got {cfg.n}.")
    return methods, metrics


def _derive_data(cfg: EvaluateConfig, real, cache, progress: bool, device: str):
    """(train, test, generative, z_of_test or None, real_reference_images, checks, info) from the loaded base data."""
    from ..models import GenerativeTrainConfig, get_generative
    from ..models.known_manifold import KnownData, known_base, known_data

    gtrain = GenerativeTrainConfig(epochs=cfg.generator_epochs, seed=cfg.seed)
    if known_base(cfg.dataset) is not None:
        settings = KnownData(vae_epochs=cfg.generator_epochs, latent_dim=cfg.latent_dim, n_train=cfg.known_n_train,
                             n_test=cfg.known_n_test, seed=cfg.seed)
        km, _ = known_data(real, settings, cache=cache, device=device, progress=progress)
        vae = km.generative
        _, real_test = real.split(0.2, seed=cfg.seed)
        info = {"manifold": "known (images sampled from a VAE decoder; tangent spaces exact, latent codes stored)",
                "labeler_accuracy": km.labeler_accuracy, "acceptance_rate": km.acceptance_rate}
        return km.train, km.test, vae, km.test.z, real_test.x, list(km.checks), info
    train, test = real.split(0.2, seed=cfg.seed)
    train.z = test.z = None
    vae, _ = get_generative(train, "vae", cfg.latent_dim, gtrain, cache=cache, device=device, progress=progress)
    info = {"manifold": f"estimated by a VAE (latent {cfg.latent_dim}) trained on the training split; tangent spaces and "
                        "in-fills from its decoder at the encoder's codes"}
    return train, test, vae, None, test.x, [], info


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
        seconds = {"explain": time.perf_counter() - t0}  # where a method's time goes, per metric (the report's table)
        for name in metrics:
            if name in MANIFEX_METRICS:
                continue
            t1 = time.perf_counter()
            opts = metric_options(name, n_features=int(np.prod(x.shape[2:])), num_classes=context["num_classes"], config=cfg)
            r = evaluate(model, x, y, summed, metrics=[name], method=method, batch_size=cfg.batch_size,
                         explain_func_kwargs={}, **opts)
            scores[name] = _per_example(r[name], x.shape[0])
            seconds[name] = time.perf_counter() - t1
        curves = distance = {}
        if "ManifoldDeletion" in metrics:
            t1 = time.perf_counter()
            dc = deletion_curves(model, x, y, a, generator=gen, z=z, kinds=PERTURBATIONS, steps=cfg.curve_steps,
                                 infill_steps=cfg.infill_steps, distance_steps=cfg.distance_steps, seed=cfg.seed,
                                 batch_size=max(256, cfg.batch_size))
            for kind, metric in CURVE_METRICS.items():
                scores[metric] = dc.auc[kind].tolist()
            curves = {k: {"mean": v.mean(0).tolist(), "sd": v.std(0).tolist()} for k, v in dc.prob.items()}
            distance = {k: {"mean": v.mean(0).tolist(), "sd": v.std(0).tolist()} for k, v in dc.distance.items()}
            seconds["deletion curves"] = time.perf_counter() - t1
        if "TangentAlignment" in metrics:
            t1 = time.perf_counter()
            ta = tangent_alignment(a, gen, x=x, z=z, batch_size=cfg.batch_size)
            scores["TangentAlignment"] = ta.ratio.tolist()
            scores["TangentAlignmentRaw"] = ta.score.tolist()
            seconds["TangentAlignment"] = time.perf_counter() - t1
    return {"id": u.id, "method": method, "scores": scores, "curves": curves, "distance": distance,
            "seconds": round(time.perf_counter() - t0, 2), "metric_seconds": {k: round(v, 2) for k, v in seconds.items()}}


class EvaluateExperiment(Experiment):
    """``manifex evaluate`` on the experiment contract: the base data checked, your model checked on it before the
    generator is trained, the manifold (known or estimated), the classifier, one unit per method, the report."""

    command = "evaluate"
    what = "an evaluation"

    def check_options(self, cfg: EvaluateConfig) -> None:
        _check_config(cfg)  # names, sizes, Quantus installed: before any data or training

    def load_data(self, run: Run) -> None:
        from ..models.resolve import resolve_data

        cfg = run.config
        spec = known_base(cfg.dataset) or cfg.dataset
        real, checks = resolve_data(spec, trust_pickle=run.trust_pickle or cfg.trust_pickle, num_classes=run.num_classes)
        run.data = real
        run.checks.extend(checks)

    def check_data(self, run: Run) -> None:
        """Your model on one batch of the real data (shape, classes, finite logits), before the generator is trained."""
        from ..experiment import UserModel
        from ..models.resolve import resolve_classifier

        user = run.user_model
        if user is None:
            return
        train, test = run.data.split(0.2, seed=run.config.seed)
        u = user if isinstance(user, UserModel) else UserModel("")
        run.model, run.model_info = resolve_classifier(
            train, test, model=u.spec if isinstance(user, UserModel) else user, weights=u.weights, normalize=u.normalize,
            output=u.output, device=run.device, cache_dir=run.cache_dir, progress=run.progress, measure_accuracy=False,
            name=run.model_name)
        run.checks.extend(run.model_info.checks)

    def derive_data(self, run: Run) -> None:
        from ..models import ModelCache

        cfg = run.config
        torch.manual_seed(cfg.seed)
        run.train, run.test, gen, z_all, real_ref, checks, info = _derive_data(cfg, run.data, ModelCache(run.cache_dir),
                                                                               run.progress, run.device)
        run.checks.extend(checks)
        run.extra.update(generator=gen, z_all=z_all, real_ref=real_ref, data_info=info)

    def resolve_model(self, run: Run) -> None:
        if run.model is not None:  # your model, loaded and checked in check_data
            warn_if_training(run.model)
            return
        super().resolve_model(run)

    def prepare(self, run: Run) -> dict[str, Any]:
        from ..models import accuracy
        from ..models.cache import state_fingerprint

        cfg, model, test = run.config, run.model, run.test
        methods, metrics = _check_config(cfg)
        device = model_device(model) or torch.device(run.device)
        gen = run.extra["generator"].to(device).eval()
        run.folder.claim("generator", {"fingerprint": state_fingerprint(gen)})
        with preserve_model_state(model):
            acc = accuracy(model, test)
        chance = float(torch.bincount(test.y, minlength=test.num_classes).max()) / len(test)
        low = acc < chance + 0.2 * (1 - chance)
        run.checks.append(f"{'FAILED: ' if low else ''}classifier test accuracy {acc:.1%} (chance {chance:.1%})")
        idx = _sample(len(test), min(cfg.n, len(test)), cfg.seed)
        x, y = test.x[idx].to(device), test.y[idx].to(device)
        z_all = run.extra["z_all"]
        z = z_all[idx].to(device) if z_all is not None else None
        if "gradcam" in methods:
            try:
                last_conv_layer(model)
            except InputError:
                methods.remove("gradcam")
                run.checks.append("Grad-CAM left out: the model has no conv layer")
        # the real images' distance to the generator's manifold: the reference the perturbed images are measured against
        ref = None
        if "ManifoldDeletion" in metrics:
            real_ref = run.extra["real_ref"]
            real = real_ref[_sample(len(real_ref), min(cfg.n, len(real_ref)), cfg.seed + 1)].to(device)
            with preserve_model_state(gen), torch.no_grad():
                z0 = gen.encode(real)
            ref = manifold_distance(gen, real, z0, steps=cfg.distance_steps)
        info = run.model_info
        model_info = {"classifier": info.name, "source": info.source, "fingerprint": info.fingerprint,
                      "test accuracy": round(acc, 4), "dataset": cfg.dataset, "images scored": int(x.shape[0])}
        return {"config": cfg, "model": model, "x": x, "y": y, "z": z, "generator": gen, "metrics": metrics,
                "methods": methods, "num_classes": test.num_classes, "reference": ref, "model_info": model_info}

    def plan(self, run: Run, context: dict[str, Any]) -> Iterator[Stage]:
        units = [Unit(f"method-{m}", {"method": m}) for m in context["methods"]]
        yield Stage("methods", units, process_methods, context, batch_size=1, desc="methods")

    def summarize(self, run: Run, context: dict[str, Any]) -> dict[str, Any]:
        from .report import summarize

        return summarize(run.records["methods"], context["metrics"], reference_distance=context["reference"])

    def _report_args(self, run: Run, context: dict[str, Any]) -> dict[str, Any]:
        return {"config": run.config, "model_info": context["model_info"], "data_info": run.extra["data_info"],
                "checks": list(dict.fromkeys(run.checks)), "seconds": run.seconds}

    def metrics(self, run: Run, summary: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        from .report import evaluation_metrics

        return evaluation_metrics(run.records["methods"], summary, **self._report_args(run, context))

    def report(self, run: Run, summary: dict[str, Any], context: dict[str, Any]) -> Path:
        from .report import write_evaluation_report

        return write_evaluation_report(run.records["methods"], summary, run.out, command=run.command, metrics_file=False,
                                       **self._report_args(run, context))

    def findings(self, run: Run, summary: dict[str, Any]) -> list[str]:
        rc = summary.get("ranking_change")
        if not rc:
            return []
        return [f"deletion ranking {'changes' if rc['changes'] else 'does not change'} on the manifold: best black "
                f"{rc['top']['black']}, ROAD {rc['top']['road']}, in-filled {rc['top']['manifold']}"]


def run_evaluation(config: EvaluateConfig = EvaluateConfig(), out_dir: str | Path = "runs/evaluate", *,
                   classifier: nn.Module | None = None, classifier_info: dict | None = None, cache: Any = None,
                   executor: Any = None, resume: bool = True, progress: bool = True, checks: Sequence[str] = (),
                   command: str | None = None, overwrite: bool = False) -> dict:
    """Evaluate every method of ``config`` by every metric on ``config.n`` test images; write the experiment folder
    (``results.jsonl``: one record per method, resumable; ``metrics.json``, ``report.html``) in ``out_dir``; return
    the summary. A thin call of :func:`manifex.experiment.run_experiment` with :class:`EvaluateExperiment`.

    ``classifier``: your own model (images in [0, 1] → logits) instead of the built-in ``config.classifier``
    trained here, left as found. A resume with other settings, another model or other data is refused in one line
    (``resume=False`` starts over in the folder, ``overwrite=True`` moves it aside). ``classifier_info`` and
    ``checks`` are accepted for compatibility (the model is described by its ModelInfo now).
    """
    del classifier_info, checks
    cache_dir = getattr(cache, "root", None)
    result = run_experiment(EvaluateExperiment(), config, out_dir, model=classifier, resume=resume, overwrite=overwrite,
                            executor=executor, progress=progress, cache_dir=cache_dir, trust_pickle=config.trust_pickle,
                            device=config.device, command=command)
    return result.summary
