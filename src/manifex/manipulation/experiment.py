"""``manifex attack`` on the experiment contract (:mod:`manifex.experiment`): make the explanations of (original,
target) pairs match the target image's while the prediction stays. One unit per pair (:func:`attack_batch`, the
same batch function as :func:`~manifex.manipulation.run_campaign`), committed batch by batch.

Layout of the folder: ``experiment.json`` (settings, data — with ``--pairs-csv`` the CSV and the images it names —,
model), ``results.jsonl`` (one line per pair), ``units/<pair id>/pair.pt`` and ``figure.png``, ``summary.json``,
``metrics.json``, ``report.html``.

>>> from manifex.experiment import run_experiment
>>> result = run_experiment(AttackExperiment(), AttackConfig(dataset="digits8", n_pairs=4, iterations=50), "runs/attack")
>>> result.summary["means"]["pcc_manip_target"], result.report

The checks shared with ``manifex smooth`` (:mod:`manifex.manipulation.smooth_experiment`) live here too:
:func:`check_smoothable`, :func:`check_pairs`, :func:`accuracy_check`, :func:`model_footer`.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import InputError, ModelError, param
from ..experiment import Experiment, Run, Stage, setting
from ..models.resolve import data_identity, file_sha256

__all__ = ["AttackConfig", "AttackExperiment", "NEEDS_BETA", "check_smoothable", "check_pairs", "accuracy_check",
           "model_footer"]

#: Methods whose explanation of a ReLU network has a zero input-derivative: they need β-growth to be attacked.
NEEDS_BETA = frozenset({"gradient", "guided_backprop", "smoothgrad", "smoothgrad_sq", "vargrad", "integrated_gradients_path"})

_UNSUPPORTED_HELP = ("What β-smoothing does with activations it has no softplus analogue for (SELU, ELU with α ≠ 1, "
                     "Threshold, Hardshrink, ...): refuse the model before any work (raise), warn, or leave them as they "
                     "are (ignore; the attack then gets no curvature from them).")
_CLASSIFIERS = ("lenet", "mlp", "vgg", "resnet")


@dataclass(frozen=True)
class AttackConfig:
    """The settings of an attack campaign (each a CLI option of ``manifex attack``)."""

    dataset: str = setting("mnist5k", "Data the classifier is trained on and pairs are drawn from (the forms of "
                           "`align --dataset`, 'known:<data>' included).")
    classifier: str = setting("lenet", "Built-in classifier, trained by manifex on --dataset (cached); see --model for "
                              "your own.", choices=_CLASSIFIERS)
    epochs: int = setting(3, "Classifier epochs (cached).", low=1)
    method: str = setting("gradient", "Explanation method to manipulate (`manifex methods`).")
    # the first k sampled pairs do not depend on the count (a larger campaign extends a smaller one): no record changes
    n_pairs: int = setting(16, "Pairs sampled from the test split (original and target of different classes); a re-run "
                           "with more pairs extends the campaign.", flag="--pairs", low=1, result=False)
    pairs_csv: str | None = setting(None, "CSV with columns original,target (image file names) instead of sampled pairs.",
                                    metavar="FILE", result=False)
    data_dir: str | None = setting(None, "Folder the CSV's file names are relative to (default: the CSV's folder).",
                                   metavar="DIR", result=False)
    iterations: int = setting(500, "Adam steps (the research used 1500).", low=1)
    lr: float = setting(1e-3, "Adam learning rate (the research used 2e-4 at 224²).")
    gamma: float | None = setting(None, "Output-term weight relative to the map term; default: the research balance "
                                  "rescaled to this image size.")
    map_loss: str = setting("mse", "Map term: the research MSE of the normalised maps, or 'pcc' (1 - Pearson correlation, "
                            "same scale), which ignores the map's scale and reaches a higher correlation in a small "
                            "budget.", flag="--loss", choices=("mse", "pcc"))
    budget: float | None = setting(None, "Optional perturbation budget in pixel units of [0, 1], e.g. 8/255 (see --norm).",
                                   parse="fraction")
    norm: str = setting("linf", "The norm of --budget.", choices=("linf", "l2"))
    beta_growth: Any = setting("auto", "Softplus β from B0 to B1 during the attack ('B0,B1'); 'auto' = 10,100 for "
                               "methods whose ReLU explanation has no input derivative (gradient, guided backprop, ...), "
                               "'none' = off.", parse="beta_pair")
    unsupported: str = setting("raise", _UNSUPPORTED_HELP, choices=("raise", "warn", "ignore"))
    stop_pcc: float | None = setting(None, "Stop a pair early at this PCC to the target.", low=-1, high=1)
    batch_size: int = setting(16, "Pairs attacked together (one unit batch).", low=1, result=False)
    seed: int = setting(0, "Seed of the data split, training and the pair sample.", cli=False)
    device: str = setting("cpu", "torch device.", result=False, cli=False)


# ------------------------------------------------------------------------------------------------------------------
# checks shared by attack and smooth


def check_options_common(cfg: Any) -> str:
    """The method (its registry name, returned) and the attack's numbers; one line each."""
    from ..attribution import canonical_method

    method = canonical_method(cfg.method)

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not (number(cfg.lr) and cfg.lr > 0):
        raise InputError(f"{param('lr')} must be a finite number > 0, got {cfg.lr!r}.")
    if not (isinstance(cfg.iterations, int) and not isinstance(cfg.iterations, bool) and cfg.iterations >= 1):
        raise InputError(f"{param('iterations')} must be an integer >= 1, got {cfg.iterations!r}.")
    if cfg.budget is not None and not (number(cfg.budget) and cfg.budget > 0):
        raise InputError(f"{param('budget')} must be a finite number > 0 in pixel units of [0, 1] (e.g. 8/255) or none, got {cfg.budget!r}.")
    gamma = getattr(cfg, "gamma", None)
    if gamma is not None and not (number(gamma) and gamma >= 0):
        raise InputError(f"{param('gamma')} must be a finite number >= 0 (the output term's weight), got {gamma!r}.")
    stop = getattr(cfg, "stop_pcc", None)
    if stop is not None and not (number(stop) and -1 < stop <= 1):
        raise InputError(f"{param('stop_pcc')} is a Pearson correlation in (-1, 1], got {stop!r}.")
    return method


def check_pairs(n_pairs: int, test) -> None:
    """There must be an original for every pair in the test split (a one-line error naming --pairs)."""
    if n_pairs > len(test):
        raise InputError(f"{param('n_pairs')} {n_pairs}: the test split has only {len(test)} images to draw originals from; use "
                         f"{param('n_pairs')} {len(test)} or fewer (or {param('pairs_csv')}).")
    if int(torch.unique(test.y).numel()) < 2:
        raise InputError(f"{param('n_pairs')} needs originals and targets of different classes, but the test split has one class.")


def check_known_pairs(n_pairs: int, n_test: int, base) -> None:
    """:func:`check_pairs` for ``known:<data>`` before its images are sampled: ``n_test`` test images will be sampled
    from a VAE trained on ``base`` (labelled with ``base``'s classes)."""
    if n_pairs > n_test:
        raise InputError(f"{param('n_pairs')} {n_pairs}: the test split of known:<data> has {n_test} sampled images to draw "
                         f"originals from; use {param('n_pairs')} {n_test} or fewer.")
    if int(torch.unique(base.y).numel()) < 2:
        raise InputError(f"{param('n_pairs')} needs originals and targets of different classes, but the data has one class.")


def check_smoothable(model, x: torch.Tensor, unsupported: str) -> None:
    """Refuse, before any work, a model with activations β-smoothing cannot smooth (one smoothed forward on ``x``),
    naming the --unsupported option; nothing to check unless --unsupported raise. The model's state is kept."""
    if unsupported != "raise":
        return
    from ..attribution import beta_smooth, preserve_model_state

    try:
        with preserve_model_state(model), torch.no_grad():
            model.eval()
            with beta_smooth(model, 10.0, unsupported="raise"):
                model(x)
    except ModelError as e:
        message = str(e).replace("pass unsupported='warn' or 'ignore'", "pass --unsupported warn or --unsupported ignore")
        if "--unsupported" not in message:
            message += " (--unsupported warn or ignore leaves them as they are)"
        raise ModelError(message) from None


def accuracy_check(acc: float, test, checks: list[str]) -> list[str]:
    """Add the accuracy check to ``checks``; return a warning when the model is no better than chance
    (always guessing the most frequent test class: 1/K when the classes are balanced)."""
    num_classes = test.num_classes
    chance = float(torch.bincount(test.y, minlength=num_classes).max()) / len(test)
    low = acc < chance + 0.2 * (1 - chance)  # not clearly better than guessing
    checks.append(f"{'FAILED: ' if low else ''}test accuracy {acc:.1%} (chance: {chance:.1%}, the most frequent of "
                  f"{num_classes} classes; needs ≥ {chance + 0.2 * (1 - chance):.1%})")
    if low:
        return [f"the classifier's test accuracy {acc:.1%} is near chance ({chance:.1%}): it has not learned this data, "
                "so its explanations (and their manipulation) say little; train it longer or check --model/--normalize."]
    return []


def model_footer(run: Run, accuracy: float) -> dict[str, Any]:
    """The model facts of the report's footer and ``metrics.json`` (from ``run.model_info``: name, source, fingerprint)."""
    info = run.model_info
    out: dict[str, Any] = {"classifier": info.name if info else None, "dataset": run.config.dataset,
                           "test accuracy": round(float(accuracy), 4)}
    if info is not None and info.source != "built-in":
        out.update({"source": "your model (--model)" if info.source == "user" else "your nn.Module (Python)",
                    "weights": info.weights or "–",
                    "normalize": info.normalize or "none (pixels in [0, 1])"})
    elif info is not None:
        out.update({"epochs": info.epochs, "cached": info.cached})
    if info is not None:
        out["fingerprint"] = info.fingerprint
    return out


def _csv_identity(csv_path: str, data_dir: str | None, pairs) -> dict[str, Any]:
    """The identity of --pairs-csv: a hash of the CSV and of every image file it names (content, not paths)."""
    root = Path(data_dir).expanduser() if data_dir is not None else Path(csv_path).expanduser().parent
    h = hashlib.sha256()
    for name in dict.fromkeys([*pairs.originals, *pairs.targets]):
        h.update(name.encode() + b"\0" + file_sha256(root / name).encode())
    return {"csv": file_sha256(Path(csv_path).expanduser()), "images": h.hexdigest()[:16], "n_pairs": len(pairs)}


# ------------------------------------------------------------------------------------------------------------------


class AttackExperiment(Experiment):
    """``manifex attack`` on the contract: checks before training, one unit per pair, the summary and the report."""

    command = "attack"
    what = "an attack campaign"

    def check_options(self, cfg: AttackConfig) -> None:
        check_options_common(cfg)
        if cfg.data_dir is not None and cfg.pairs_csv is None:
            raise InputError(f"{param('data_dir')} is the folder of the {param('pairs_csv')} images; pass {param('pairs_csv')} too (or leave out {param('data_dir')}).")
        if cfg.pairs_csv is not None and not Path(cfg.pairs_csv).expanduser().is_file():
            raise InputError(f"{param('pairs_csv')} {cfg.pairs_csv}: no such file; pass a CSV with a header row `original,target`.")
        bg = cfg.beta_growth
        if bg not in ("auto", None) and not (isinstance(bg, (tuple, list)) and len(bg) == 2
                                            and all(isinstance(b, (int, float)) and math.isfinite(b) and b > 0 for b in bg)):
            raise InputError(f"{param('beta_growth')} must be 'B0,B1' with finite β > 0, 'auto' or 'none'; got {bg!r}.")

    def pairs(self, run: Run):
        """The campaign's pairs: from --pairs-csv (sizes checked against the data's images) or sampled from the test
        split (None while the test split of known:<data> is not sampled yet)."""
        from .campaign import pairs_from_csv, pairs_from_dataset

        cfg = run.config
        if cfg.pairs_csv is not None:
            return pairs_from_csv(cfg.pairs_csv, cfg.data_dir, image_shape=tuple(run.data.image_shape))
        if run.test is None:  # known:<data>: what can be checked before the images are sampled
            check_known_pairs(cfg.n_pairs, self.known_settings(run).n_test, run.data)
            return None
        check_pairs(cfg.n_pairs, run.test)
        return pairs_from_dataset(run.test, cfg.n_pairs, seed=cfg.seed)

    def check_data(self, run: Run) -> None:
        run.pairs = self.pairs(run)  # every CSV mistake (columns, missing files, sizes) before any training

    def derive_data(self, run: Run) -> None:
        super().derive_data(run)
        if run.pairs is None:  # known:<data>: the pairs are drawn from its sampled test split
            run.pairs = self.pairs(run)

    def data_identity(self, run: Run) -> dict[str, Any]:
        ident = data_identity(run.config.dataset, run.data.x, run.data.y)
        if run.config.pairs_csv is not None:
            ident["pairs_csv"] = _csv_identity(run.config.pairs_csv, run.config.data_dir, run.pairs)
        return ident

    def prepare(self, run: Run) -> dict[str, Any]:
        from ..attribution import make_explainer
        from ..attribution.core import check_output_selector
        from .attack import research_gamma
        from .campaign import CampaignContext, campaign_settings, check_model_accepts

        cfg, model, test, pairs = run.config, run.model, run.test, run.pairs
        method = check_options_common(cfg)
        acc = run.model_info.accuracy if run.model_info and run.model_info.accuracy is not None else 0.0
        run.warnings.extend(accuracy_check(acc, test, run.checks))
        beta_growth = cfg.beta_growth
        if beta_growth == "auto":
            beta_growth = (10.0, 100.0) if method in NEEDS_BETA else None
        elif beta_growth is not None:
            beta_growth = tuple(float(b) for b in beta_growth)
        dev = next((p.device for p in model.parameters()), torch.device(run.device))
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        if beta_growth is not None:
            check_smoothable(model, test.x[:8].to(device=dev, dtype=dtype), cfg.unsupported)
        h, w = run.data.image_shape[1:]
        options = dict(iterations=cfg.iterations, lr=cfg.lr,
                       gamma=cfg.gamma if cfg.gamma is not None else research_gamma(h * w, run.data.num_classes),
                       map_loss=cfg.map_loss, epsilon=cfg.budget, norm=cfg.norm, beta_growth=beta_growth,
                       stop_pcc=cfg.stop_pcc)
        if beta_growth is not None and cfg.unsupported != "raise":  # recorded in the settings only when not the default
            options["unsupported"] = cfg.unsupported
        explainer = make_explainer(model, method)
        output = check_output_selector(explainer.output)
        if len(pairs):
            check_model_accepts(model, pairs, 0, dev, dtype, output)
        run.checks.append(f"pairs: {len(pairs)} from {pairs.source}; the model accepts their images {tuple(pairs.image_shape)}")
        settings = campaign_settings(explainer, options, 1.0, output)
        ctx = CampaignContext(model=model, explainer=explainer, pairs=pairs, attack_options=options, pixel_scale=1.0,
                              figures=True, smooth=None, output=output)
        return {"campaign": ctx, "settings": settings, "method": method, "accuracy": acc}

    def plan(self, run: Run, context: dict[str, Any]) -> Iterator[Stage]:
        from .campaign import attack_batch, pair_units

        yield Stage("pairs", pair_units(run.pairs), attack_batch, context["campaign"], batch_size=run.config.batch_size,
                    desc="campaign")

    def campaign_summary(self, run: Run, context: dict[str, Any]):
        from .campaign import summarise

        records = run.records.get("pairs", [])
        n_new = run.n_new.get("pairs", 0)
        return summarise(run.out, run.pairs, records, n_new=n_new, n_skipped=len(records) - n_new,
                         settings=context["settings"])

    def summarize(self, run: Run, context: dict[str, Any]) -> dict[str, Any]:
        s = self.campaign_summary(run, context)
        return {**s.to_dict(), "records": s.records}

    def metrics(self, run: Run, summary: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        from .report import attack_metrics

        m = attack_metrics(self.campaign_summary(run, context), method=context["method"],
                           model_info=model_footer(run, context["accuracy"]), checks=run.checks, warnings=run.warnings)
        return {"command": self.command, "config": self.settings(run.config), **m,
                "model_info": run.model_info.to_dict() if run.model_info else None, "seconds": run.seconds}

    def report(self, run: Run, summary: dict[str, Any], context: dict[str, Any]) -> Path:
        from .report import write_attack_report

        return write_attack_report(self.campaign_summary(run, context), run.out, method=context["method"],
                                   model_info=model_footer(run, context["accuracy"]), command=run.command,
                                   checks=run.checks, warnings=run.warnings, metrics_file=False)

    def findings(self, run: Run, summary: dict[str, Any]) -> list[str]:
        m, kept = summary["means"], summary["top1_kept_rate"]
        nan = float("nan")
        return [f"{summary['n_pairs']} pairs: PCC to target {m.get('pcc_orig_target', nan):.2f} → "
                f"{m.get('pcc_manip_target', nan):.2f}, top-1 kept {'n/a' if kept is None else format(kept, '.0%')}, "
                f"max |Δp| {m.get('max_dp', nan):.3f}, L∞ {m.get('linf', nan) * 255:.1f}/255"]
