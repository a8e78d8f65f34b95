"""The alignment experiment on the shared contract (:mod:`manifex.experiment`): how much of each explanation lies in
the data manifold's tangent space? The data (a known manifold sampled from a VAE, or a manifold estimated from the
data), the standard classifier and its l2-robust fine-tune come from the model cache; the attributions are units of
the experiment folder, one per (model, method, chunk of ``batch_size`` images), committed as each finishes, so a
run resumes from its ``--out`` like every other command.

>>> from manifex.experiment import run_experiment
>>> result = run_experiment(AlignExperiment(), AlignConfig(dataset="known:digits8", n_samples=20), "runs/align")
>>> result.summary["scores"]["standard"]["gradient"]["mean"], result.report
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..errors import InputError, param
from ..experiment import Experiment, Run, Stage, run_experiment
from ..models import ModelCache
from ..models.known_manifold import known_base
from ..runs import Executor, Unit
from .pipeline import AlignConfig
from .result import AlignmentResult

__all__ = ["AlignExperiment", "run_alignment"]


def _known(cfg: AlignConfig) -> bool:
    return known_base(cfg.dataset) is not None


class AlignExperiment(Experiment):
    """``manifex align`` on the contract: checks before any training, the data and the models from the cache, the
    attribution chunks as units, then the scores, metrics.json and the report.

    ``notify``: where a note for the user goes (the CLI prints it; default: nowhere). One instance per run: the
    run's :class:`~manifex.alignment.AlignmentResult` is left in ``self.result``.
    """

    command = "align"
    what = "an align run"
    run_fields = ("device", "batch_size", "trust_pickle", "allow_degenerate")

    def __init__(self, notify: Callable[[str], None] | None = None) -> None:
        self.notify = notify or (lambda line: None)
        self.result: AlignmentResult | None = None
        self._derived: dict[str, Any] = {}

    # -- checks ------------------------------------------------------------------------------------------------
    def check_options(self, cfg: AlignConfig) -> None:
        from ..attribution import canonical_method

        if not isinstance(cfg, AlignConfig):
            raise InputError(f"an align run takes an AlignConfig, got {type(cfg).__name__}.")
        if not cfg.methods:
            raise InputError(f"{param('methods')} is empty; name at least one attribution method (see `manifex methods`).")
        for m in cfg.methods:
            canonical_method(m)  # an unknown name lists the registry
        if cfg.n_samples < 2:
            raise InputError(f"{param('n_samples')} must be >= 2, got {cfg.n_samples}.")
        if cfg.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {cfg.batch_size}.")
        known_base(cfg.dataset)  # 'known:' without its data is refused here, before anything is loaded

    def load_data(self, run: Run) -> None:
        """The base data (for ``known:<data>`` the data the VAE learns), loaded and checked once; the split and the
        generated data come in :meth:`~manifex.experiment.Experiment.derive_data`, after the settings are claimed."""
        from ..models.resolve import resolve_data

        cfg = run.config
        spec = known_base(cfg.dataset) or cfg.dataset
        run.data, checks = resolve_data(spec, trust_pickle=run.trust_pickle or cfg.trust_pickle, num_classes=run.num_classes)
        run.checks.extend(checks)

    def check_data(self, run: Run) -> None:
        """Before any training: the user's model on a batch of the real data (its shape and classes are those of the
        generated data), and --samples against the test set."""
        from ..experiment import UserModel
        from ..models.resolve import resolve_classifier

        cfg, real = run.config, run.data
        train, test = real.split(0.2, seed=cfg.seed)
        n_test = cfg.n_test if _known(cfg) else len(test)
        if cfg.n_samples > n_test:
            self.notify(f"--samples {cfg.n_samples} is more than the {n_test} test images; scoring all {n_test}"
                        + (" (raise --n-test for more)" if _known(cfg) else ""))
        user = run.user_model
        if user is None:
            return
        if cfg.robust:
            raise InputError(f"{param('robust')} fine-tunes a built-in classifier; with your own {param('model')} use {param('robust', False)} "
                             "(robust=False).")
        u = user if isinstance(user, UserModel) else UserModel("")
        spec = u.spec if isinstance(user, UserModel) else user
        run.model, run.model_info = resolve_classifier(
            train, test, model=spec, weights=u.weights, normalize=u.normalize, output=u.output, device=run.device,
            cache_dir=run.cache_dir, progress=run.progress, measure_accuracy=False, name=run.model_name)
        run.checks.extend(run.model_info.checks)

    # -- data and models ---------------------------------------------------------------------------------------
    def derive_data(self, run: Run) -> None:
        from ..models import ModelCache
        from .pipeline import prepare_data

        cfg = run.config
        torch.manual_seed(cfg.seed)
        run.train, run.test, generative, info, ginfo = prepare_data(cfg, run.data, ModelCache(run.cache_dir), run.progress,
                                                                     run.device)
        run.checks.extend(info.pop("checks", []))
        run.warnings.extend(info.pop("warnings", []))
        self._derived = {"generative": generative, "data_info": info, "generative_info": ginfo}

    def resolve_model(self, run: Run) -> None:
        """The user's model (loaded and checked in :meth:`check_data`) or the built-in standard classifier trained on
        the (generated) training data; the accuracy on the (generated) test data."""
        from ..models import ModelCache, TrainConfig, accuracy, get_classifier
        from ..models.resolve import resolve_classifier

        cfg = run.config
        if run.model is not None:
            name, info = "your model", {}
        else:
            run.model, run.model_info = resolve_classifier(
                run.train, run.test, classifier=cfg.classifier, epochs=cfg.classifier_epochs, seed=cfg.seed,
                device=run.device, cache_dir=run.cache_dir, progress=run.progress, measure_accuracy=False)
            run.checks.extend(run.model_info.checks)
            # the training record (seconds, history) of the cache entry just resolved (a cache hit, nothing trained)
            _, info = get_classifier(run.train, cfg.classifier, TrainConfig(epochs=cfg.classifier_epochs, seed=cfg.seed),
                                     cache=ModelCache(run.cache_dir), device=run.device, progress=False)
            info = {**info, "cached": run.model_info.cached}
            name = "standard"
        acc = accuracy(run.model, run.test)
        run.model_info = replace(run.model_info, accuracy=round(float(acc), 4))
        self._derived["models"] = {name: run.model}
        self._derived["model_info"] = {name: {"classifier": run.model_info.name, "accuracy": acc, **info}}

    # -- the work ----------------------------------------------------------------------------------------------
    def prepare(self, run: Run) -> dict[str, Any]:
        from ..attribution import canonical_method, make_explainer
        from ..errors import check_pixel_range
        from ..geometry import TangentSpace, random_baseline, tangent_space
        from ..models import accuracy, state_fingerprint
        from .pipeline import _one_per_class_first, robust_classifier

        cfg, train, test, d = run.config, run.train, run.test, self._derived
        models, model_info = d["models"], d["model_info"]
        methods = list(dict.fromkeys(canonical_method(m) for m in cfg.methods))
        # an explainer's options (steps, sigma, ...) change its records: a changed default is refused on resume
        run.folder.claim("explainers", {m: repr(make_explainer(run.model, m)) for m in methods})
        if cfg.robust:  # the l2-robust model: a PGD-l2 fine-tune of the standard one (cached)
            models["robust"], info = robust_classifier(train, models["standard"], cfg, cache_dir=run.cache_dir,
                                                       device=run.device, progress=run.progress)
            model_info["robust"] = {"classifier": f"{run.model_info.name} (l2-robust fine-tune)",
                                    "accuracy": accuracy(models["robust"], test), **info}

        check_pixel_range(test.x, f"images of {cfg.dataset}")  # the classifiers and VAE work on [0, 1]
        # chance = always guessing the most frequent test class (1/K when balanced)
        chance = float(torch.bincount(test.y, minlength=max(test.num_classes, 1)).max()) / max(len(test), 1)
        for name, mi in model_info.items():
            low = mi["accuracy"] < chance + 0.2 * (1 - chance)  # not clearly better than guessing
            run.checks.append(f"{'FAILED: ' if low else ''}{name} classifier: test accuracy {mi['accuracy']:.1%} (chance: "
                              f"{chance:.1%}, the most frequent class; needs ≥ {chance + 0.2 * (1 - chance):.1%})")
            if low:
                run.warnings.append(f"the {name} classifier's test accuracy {mi['accuracy']:.1%} is near chance "
                                    f"({chance:.1%}); its explanations carry little about the data")
        n = min(cfg.n_samples, len(test))
        if n < cfg.n_samples:
            run.checks.append(f"scored all {n:,} test images (--samples {cfg.n_samples:,} asks for more than there are)")
        sample = _one_per_class_first(test, n, min(cfg.n_show, n), cfg.seed)
        x, y = sample.x.to(run.device), sample.y.to(run.device)

        # the tangent spaces of the scored images: a shared intermediate of the folder, keyed by what it depends on
        generative = d["generative"]

        def build() -> dict:
            t0 = time.perf_counter()
            t = tangent_space(generative.decode, sample.z.to(run.device), progress=run.progress)
            return {"basis": t.basis.cpu(), "rank": t.rank.cpu(), "singular_values": t.singular_values.cpu(),
                    "rtol": float(t.rtol), "seconds": time.perf_counter() - t0}

        key = {"images": sample.fingerprint(), "generator": state_fingerprint(generative)}
        art = run.folder.artefact("tangent", key, build)
        tangent = TangentSpace(art["basis"].to(run.device), art["rank"].to(run.device),
                               art["singular_values"].to(run.device), art["rtol"])
        k, dim = int(tangent.rank.max()), math.prod(x.shape[1:])
        return {"models": models, "model_info": model_info, "methods": methods, "sample": sample, "x": x, "y": y, "n": n,
                "tangent": tangent, "tangent_seconds": float(art["seconds"]), "k": k, "d": dim,
                "baseline": random_baseline(k, dim)}

    def plan(self, run: Run, context: dict[str, Any]) -> Iterator[Stage]:
        from .pipeline import attribute_chunks

        n, chunk = context["n"], run.config.batch_size
        units = [Unit(f"{model.replace(' ', '_')}-{method}-{i:06d}-{min(i + chunk, n):06d}",
                      {"model": model, "method": method, "start": i, "stop": min(i + chunk, n)})
                 for model in context["models"] for method in context["methods"] for i in range(0, n, chunk)]
        stage_context = {"models": context["models"], "x": context["x"], "y": context["y"]}
        yield Stage("attributions", units, attribute_chunks, stage_context, batch_size=1, desc="attributions")

    def summarize(self, run: Run, context: dict[str, Any]) -> dict[str, Any]:
        from ..geometry import alignment, decompose, random_baseline, tangent_mass
        from ..models import state_fingerprint
        from .pipeline import _findings, _seed_applies, _seed_comparison, _summary, load_chunks
        from .result import SEED_REFERENCE

        cfg, tangent, x = run.config, context["tangent"], context["x"]
        n, k, d, baseline = context["n"], context["k"], context["d"], context["baseline"]
        records = run.records.get("attributions", [])
        show = slice(0, min(cfg.n_show, n))
        scores: dict[str, dict[str, torch.Tensor]] = {}
        parts: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        timings: dict[str, dict[str, float]] = {}
        for model in context["models"]:
            scores[model], parts[model], timings[model] = {}, {}, {}
            for method in [*context["methods"], "random"]:
                if method == "random":
                    t0 = time.perf_counter()
                    E = torch.randn(x.shape, generator=torch.Generator().manual_seed(cfg.seed)).to(x)
                    seconds = time.perf_counter() - t0
                else:
                    mine = [r for r in records if r["model"] == model and r["method"] == method]
                    E = load_chunks(run.out, mine, x.device)
                    seconds = sum(r["seconds"] for r in mine)
                timings[model][method] = seconds
                scores[model][method] = alignment(E, tangent).cpu()
                tp, op = decompose(E[show], tangent[show])
                parts[model][method] = (tp.cpu(), op.cpu())

        user = run.model_info is not None and run.model_info.source != "built-in"
        train, test, sample = run.train, run.test, context["sample"]
        data_info, ginfo = self._derived["data_info"], self._derived["generative_info"]
        score_summary = {m: {meth: _summary(s) for meth, s in per.items()} for m, per in scores.items()}
        rmin = int(tangent.rank.min())
        run.checks.append(f"tangent spaces: rank {rmin if rmin == k else f'{rmin}–{k}'} of latent dimension {cfg.latent_dim}, "
                          f"d = {d:,} pixels; random baseline {baseline:.3f}")
        findings = _findings(score_summary, baseline)
        if _seed_applies(cfg, user):
            findings += _seed_comparison(score_summary, cfg, len(train))
        t_tangent = context["tangent_seconds"]
        metrics = {
            "k": k, "d": d, "baseline": baseline, "baseline_rms": random_baseline(k, d, rms=True),
            "tangent_rank": {"min": rmin, "max": k, "mean": float(tangent.rank.float().mean())},
            "dataset": {**data_info, "n_train": len(train), "n_test": len(test), "n_scored": n,
                        "image_shape": list(x.shape[1:])},
            "generative": {"arch": "vae" if _known(cfg) else cfg.generative, "latent_dim": cfg.latent_dim,
                           "train_seconds": ginfo.get("train_seconds"), "cached": ginfo.get("cached")},
            # each model's weights fingerprint: what a run on another command (manifex audit --training l2) matches
            "models": {m: {"classifier": i["classifier"], "accuracy": i["accuracy"], "train_seconds": i.get("train_seconds"),
                           "cached": i.get("cached"), "epochs": len(i.get("history", [])),
                           "fingerprint": state_fingerprint(context["models"][m])}
                       for m, i in context["model_info"].items()},
            "model": run.model_info.to_dict() if run.model_info is not None else None,
            "scores": score_summary,
            "seed_reference": {m: v for m, v in SEED_REFERENCE.items() if m in scores} if _seed_applies(cfg, user) else {},
            "timings": {"tangent_seconds": t_tangent, "tangent_seconds_per_image": t_tangent / n,
                        "attribution_seconds": timings, "total_seconds": time.perf_counter() - run.started},
            "config": cfg.to_dict(),
            "checks": run.checks, "warnings": run.warnings, "findings": findings,
        }
        if run.command:
            metrics["command"] = run.command
        self.result = AlignmentResult(scores, sample.x[show].cpu(), sample.y[show].cpu(), parts,
                                      tangent_mass(tangent[show]).cpu(), metrics)
        return {"k": k, "d": d, "baseline": baseline, "scores": score_summary, "n_scored": n, "findings": findings}

    def metrics(self, run: Run, summary: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        assert self.result is not None
        return self.result.metrics

    def findings(self, run: Run, summary: dict[str, Any]) -> list[str]:
        if run.warnings:  # findings are claims; on inputs that failed their checks they are withheld
            return [f"findings withheld: the inputs failed {len(run.warnings)} check(s); the report shows the numbers "
                    "as a diagnosis"]
        return list(summary.get("findings", []))

    def report(self, run: Run, summary: dict[str, Any], context: dict[str, Any]) -> Path:
        from .report import write_report

        assert self.result is not None
        return write_report(self.result, run.out, metrics_file=False)


def run_alignment(cfg: AlignConfig = AlignConfig(), *, cache: ModelCache | None = None, progress: bool = True,
                  classifier: torch.nn.Module | None = None, executor: Executor | None = None,
                  out_dir: str | os.PathLike | None = None) -> AlignmentResult:
    """Run the alignment experiment and return scores, example decompositions and metrics.

    ``classifier``: your own model to score (any nn.Module mapping images in [0, 1] to logits) instead of the
    built-in ``cfg.classifier`` trained here; it is reported as "your model" and not fine-tuned (``cfg.robust``
    must be False). ``metrics["checks"]`` lists what was verified about the inputs, ``metrics["warnings"]``
    the checks that failed (degenerate generated data, allowed by ``cfg.allow_degenerate``).
    ``executor``: where the attributions run, in chunks of ``cfg.batch_size`` images: here (default) or a
    :class:`manifex.runs.RayExecutor`. ``out_dir``: the experiment folder (experiment.json, results.jsonl, the
    chunks in units/, summary.json, metrics.json, report.html), resumed when run again with the same settings;
    None runs in a temporary folder that is deleted afterwards. Trained models and datasets stay in ``cache``.
    """
    if classifier is not None and cfg.robust:
        raise InputError("robust=True fine-tunes a built-in classifier; with your own classifier set robust=False.")
    experiment = AlignExperiment()
    cache_dir = cache.root if cache is not None else None
    with tempfile.TemporaryDirectory(prefix="manifex-align-") as tmp:
        run_experiment(experiment, cfg, out_dir if out_dir is not None else tmp, model=classifier, executor=executor,
                       progress=progress, cache_dir=cache_dir, trust_pickle=cfg.trust_pickle, device=cfg.device,
                       write_files=out_dir is not None)
    assert experiment.result is not None
    return experiment.result
