"""The audit's own stages, each an experiment on the shared contract (resumable, its own folder, ``metrics.json`` and
``report.html``): **model** (the classifier and its data: held-out accuracy, calibration, the checks) and **manifold**
(the generators the other stages rely on: their held-out quality and the dimension their decoder's Jacobian spectrum
estimates).

Calibration is the expected calibration error over 15 equal-width confidence bins (Guo et al., 2017: bin b holds the
top-1 confidences in (b/15, (b+1)/15]; ECE = Σ_b n_b/N · |accuracy_b − mean confidence_b|), computed in float64.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import InputError, param
from ..experiment import Experiment, Run, Stage, setting
from ..runs import Unit

__all__ = ["ModelConfig", "ModelExperiment", "ManifoldConfig", "ManifoldExperiment", "calibration", "IMBALANCE_LIMIT",
           "ECE_BINS"]

#: Equal-width confidence bins of the ECE and the reliability diagram (the usual 15, Guo et al. 2017).
ECE_BINS = 15
#: Largest ratio of the biggest to the smallest class (training split) before the checks call the data imbalanced:
#: beyond it a class is < 1/10 of another and accuracy is dominated by the large classes.
IMBALANCE_LIMIT = 10.0


# ------------------------------------------------------------------------------------------------------------------
# calibration
# ------------------------------------------------------------------------------------------------------------------
def calibration(probs: torch.Tensor, y: torch.Tensor, bins: int = ECE_BINS) -> dict[str, Any]:
    """Expected calibration error of softmax ``probs`` (N, C) against labels ``y`` (N,) over ``bins`` equal-width bins
    of the top-1 confidence (bin b: (b/bins, (b+1)/bins]; a confidence of exactly 0 falls in the first bin), in float64.
    Returns ``ece``, ``mce`` (the largest bin gap) and per bin ``lo``, ``hi``, ``n``, ``accuracy``, ``confidence``
    (None for an empty bin)."""
    if probs.dim() != 2 or y.shape != probs.shape[:1]:
        raise InputError(f"probs must be (N, C) and y (N,), got {tuple(probs.shape)} and {tuple(y.shape)}.")
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 1:
        raise InputError(f"bins must be an integer >= 1, got {bins!r}.")
    p = probs.detach().to(torch.float64).cpu()
    conf, pred = p.max(1)
    correct = (pred == y.cpu()).to(torch.float64)
    idx = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)  # (lo, hi] bins
    n = len(conf)
    rows, ece, mce = [], 0.0, 0.0
    for b in range(bins):
        sel = idx == b
        k = int(sel.sum())
        acc = float(correct[sel].mean()) if k else None
        cf = float(conf[sel].mean()) if k else None
        if k:
            gap = abs(acc - cf)
            ece += k / n * gap
            mce = max(mce, gap)
        rows.append({"lo": b / bins, "hi": (b + 1) / bins, "n": k, "accuracy": acc, "confidence": cf})
    return {"ece": ece, "mce": mce, "bins": rows, "n": n, "mean_confidence": float(conf.mean()),
            "accuracy": float(correct.mean())}


def _reliability_figure(cal: dict[str, Any], path: Path) -> Path:
    """The reliability diagram: accuracy per confidence bin against the diagonal (perfect calibration), with the
    share of images in each bin below."""
    from matplotlib.figure import Figure

    from ..viz import save_figure

    fig = Figure(figsize=(4.6, 4.6))
    ax, hx = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = 1.0 / len(cal["bins"])
    first = True
    for b in cal["bins"]:
        if b["n"]:  # accuracy (filled) and the gap to the bin's mean confidence (hatched), either side of it
            ax.bar(b["lo"], b["accuracy"], width=width, align="edge", color="#1e4e9c", edgecolor="white",
                   label="accuracy" if first else None)
            lo, hi = sorted((b["accuracy"], b["confidence"]))
            ax.bar(b["lo"], hi - lo, bottom=lo, width=width, align="edge", fill=False, edgecolor="#d9480f", hatch="///",
                   lw=0.8, label="gap to the mean confidence" if first else None)
            first = False
        hx.bar(b["lo"], b["n"] / max(1, cal["n"]), width=width, align="edge", color="#5b6478", edgecolor="white")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy in the bin",
           title=f"ECE {cal['ece']:.3f} over {len(cal['bins'])} bins (n = {cal['n']})")
    hx.set(xlabel="top-1 confidence", ylabel="share")
    fig.tight_layout()
    return save_figure(fig, path)


def _stage_report(run: Run, template_args: dict[str, Any]) -> Path:
    from ..reports import render

    failed = [c[len("FAILED: "):] for c in run.checks if c.startswith("FAILED: ")]
    return render("audit_stage.html.j2", run.out / "report.html", checks=list(dict.fromkeys(run.checks)),
                  warnings=failed, command=run.command, **template_args)


# ------------------------------------------------------------------------------------------------------------------
# stage "model": the classifier and its data
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    """The model stage: the classifier (built-in, trained and cached as in every other stage, or yours) scored on
    the held-out split."""

    dataset: str = setting("digits8", "Data the classifier is trained on (the held-out 20% is scored).")
    classifier: str = setting("lenet", "Built-in classifier (see --model for your own).",
                              choices=("lenet", "resnet", "vgg", "mlp"))
    epochs: int = setting(3, "Classifier epochs (cached).", low=1)
    bins: int = setting(ECE_BINS, "Equal-width confidence bins of the calibration error.", low=2)
    seed: int = setting(0, "Seed of the data split and training.", cli=False)
    device: str = setting("cpu", "torch device.", result=False, cli=False)


def _logits(model: torch.nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The model's logits on ``x`` in eval mode (state restored), in the model's dtype and on its device."""
    from ..attribution.core import call_model, model_device, preserve_model_state

    dev = model_device(model)
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    out = []
    with preserve_model_state(model), torch.no_grad():
        model.eval()
        for i in range(0, len(x), batch):
            xb = x[i:i + batch]
            xb = xb.to(device=dev if dev is not None else xb.device, dtype=first.dtype if first is not None else xb.dtype)
            out.append(call_model(model, xb).detach().cpu())
    return torch.cat(out)


def process_model(units: list[Unit], context: dict[str, Any], out_dir: Path) -> list[dict]:
    """The one record of the model stage: accuracy, per-class numbers, calibration, prediction counts."""
    model, test, train_counts, bins = context["model"], context["test"], context["train_counts"], context["bins"]
    records = []
    for u in units:
        t0 = time.perf_counter()
        logits = _logits(model, test.x)
        k = test.num_classes
        if logits.dim() != 2 or logits.shape[1] != k:
            raise InputError(f"the model returns logits of shape {tuple(logits.shape)} for {len(test)} images; expected "
                             f"({len(test)}, {k}) for the data's {k} classes.")
        finite = torch.isfinite(logits).all(1)
        lf = logits[finite].to(torch.float64)
        y = test.y[finite]
        probs = torch.softmax(lf, 1)
        cal = calibration(probs, y, bins) if len(y) else None
        pred = lf.argmax(1)
        true_counts = torch.bincount(test.y, minlength=k)
        per_class = [float((pred[y == c] == c).double().mean()) if bool((y == c).any()) else None for c in range(k)]
        records.append({
            "id": u.id, "n_test": len(test), "n_nonfinite": int((~finite).sum()), "num_classes": k,
            "accuracy": float((pred == y).double().mean()) if len(y) else None,
            "balanced_accuracy": (sum(a for a in per_class if a is not None) / sum(a is not None for a in per_class)
                                  if any(a is not None for a in per_class) else None),
            "per_class_accuracy": per_class, "chance": float(true_counts.max()) / max(1, len(test)),
            "test_counts": true_counts.tolist(), "train_counts": train_counts,
            "predicted_counts": torch.bincount(pred, minlength=k).tolist(),
            "logit_sd": float(lf.std(0).mean()) if len(lf) > 1 else None,
            "calibration": cal, "seconds": round(time.perf_counter() - t0, 2),
        })
    return records


def model_checks(r: dict[str, Any]) -> list[str]:
    """The checks of the model stage from its record (``FAILED: `` where the audit's numbers cannot be trusted)."""
    k, checks = r["num_classes"], []
    tc = r["train_counts"]
    small, large = min(tc), max(tc)
    ratio = large / small if small else math.inf
    if small == 0:
        checks.append(f"FAILED: class balance: classes {[c for c, n in enumerate(tc) if n == 0]} have no training image")
    elif ratio > IMBALANCE_LIMIT:
        checks.append(f"FAILED: class balance: the largest class has {ratio:.1f}× the images of the smallest ({large} vs "
                      f"{small}; limit {IMBALANCE_LIMIT:g}×): accuracy is dominated by the large classes")
    else:
        checks.append(f"class balance: {small} to {large} training images per class ({ratio:.2f}×; limit {IMBALANCE_LIMIT:g}×)")
    missing = [c for c, n in enumerate(r["test_counts"]) if n == 0]
    if missing:
        checks.append(f"FAILED: classes {missing} have no held-out image: their accuracy is not measured")
    if r["n_nonfinite"]:
        checks.append(f"FAILED: non-finite outputs: the model gives NaN/inf logits on {r['n_nonfinite']} of {r['n_test']} "
                      "held-out images (left out of every number here)")
    else:
        checks.append(f"outputs finite on all {r['n_test']} held-out images")
    predicted = [c for c, n in enumerate(r["predicted_counts"]) if n]
    never = [c for c, n in enumerate(r["predicted_counts"]) if n == 0 and r["test_counts"][c] > 0]
    if r["n_nonfinite"] == r["n_test"]:
        pass  # no finite output: nothing was predicted (said above)
    elif len(predicted) <= 1 or (r["logit_sd"] is not None and r["logit_sd"] == 0.0):
        checks.append(f"FAILED: constant predictions: the model predicts class {predicted[0] if predicted else '-'} for "
                      "every held-out image")
    elif never:
        checks.append(f"FAILED: degenerate predictions: classes {never} are never predicted on the held-out images "
                      "(explanations of those classes describe a model that does not recognise them)")
    else:
        checks.append(f"every one of the {k} classes is predicted on the held-out images")
    acc, chance = r["accuracy"], r["chance"]
    if acc is not None:  # the rule of the evaluate stage: a fifth of the way from chance to perfect at least
        low = acc < chance + 0.2 * (1 - chance)
        checks.append(f"{'FAILED: ' if low else ''}held-out accuracy {acc:.1%} (chance, the largest class's share: {chance:.1%})")
    return checks


class ModelExperiment(Experiment):
    """The audit's model stage: the classifier resolved as in every stage (so the same weights fingerprint), scored
    on the held-out split in one unit: accuracy against chance, per-class accuracy, ECE with a reliability diagram,
    and the checks (class balance, constant or degenerate predictions, non-finite outputs)."""

    command = "audit-model"
    what = "the audit's model stage"

    def check_options(self, cfg: ModelConfig) -> None:
        if not isinstance(cfg.bins, int) or isinstance(cfg.bins, bool) or cfg.bins < 2:
            raise InputError(f"{param('bins')} must be an integer >= 2, got {cfg.bins!r}.")

    def prepare(self, run: Run) -> dict[str, Any]:
        counts = torch.bincount(run.train.y, minlength=run.test.num_classes).tolist()
        return {"model": run.model, "test": run.test, "train_counts": counts, "bins": run.config.bins}

    def plan(self, run: Run, context: dict[str, Any]) -> Iterator[Stage]:
        yield Stage("model", [Unit("model", {})], process_model, context, desc="model")

    def summarize(self, run: Run, context: dict[str, Any]) -> dict[str, Any]:
        r = run.records["model"][0]
        run.checks.extend(model_checks(r))
        return {k: v for k, v in r.items() if k != "id"}

    def report(self, run: Run, summary: dict[str, Any], context: dict[str, Any]) -> Path:
        cal = summary["calibration"]
        figures = []
        if cal:
            _reliability_figure(cal, run.out / "reliability.png")
            figures.append({"src": "reliability.png", "caption": "Reliability diagram: accuracy in each confidence bin "
                            "(blue) against the diagonal of perfect calibration; hatched: the gap to the bin's mean "
                            "confidence (above the bar: overconfident, below: underconfident). Below: the share of "
                            "held-out images per bin."})
        cards = [{"label": "held-out accuracy", "value": _pct(summary["accuracy"]),
                  "sub": f"chance {_pct(summary['chance'])} · balanced {_pct(summary['balanced_accuracy'])}"},
                 {"label": f"ECE ({run.config.bins} bins)", "value": _fmt(cal and cal["ece"], 3),
                  "sub": f"0 = calibrated · mean confidence {_pct(cal and cal['mean_confidence'])}"},
                 {"label": "held-out images", "value": str(summary["n_test"]),
                  "sub": f"{summary['n_nonfinite']} with non-finite logits"}]
        k = summary["num_classes"]
        table = {"title": "Per class", "header": ["class", "training images", "held-out images", "predicted", "accuracy"],
                 "rows": [[c, summary["train_counts"][c], summary["test_counts"][c], summary["predicted_counts"][c],
                           _pct(summary["per_class_accuracy"][c])] for c in range(k)]}
        info = run.model_info
        return _stage_report(run, dict(
            title="manifex · audit · model", kicker="audit · model", headline="The model and its data",
            subtitle=f"{info.name if info else run.config.classifier} on {run.config.dataset}: held-out accuracy, "
                     "calibration and the checks", cards=cards, figures=figures, tables=[table],
            options={k_: getattr(run.config, k_) for k_ in ("dataset", "classifier", "epochs", "bins", "seed")}))


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _fmt(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


# ------------------------------------------------------------------------------------------------------------------
# stage "manifold": the generators
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ManifoldConfig:
    """The manifold stage: each generator the audit's other stages use, from the same cache entry (the same data
    split, architecture, epochs and seed), measured on the held-out split."""

    dataset: str = setting("digits8", "Data the generators are trained on (the held-out 20% is scored).")
    generators: tuple[str, ...] = setting(("vae", "flow"), "Generators to measure: vae (latent 10, the evaluate "
                                          "stage's manifold), flow (the counterfactual stage's).", parse="csv")
    vae_epochs: int = setting(20, "Epochs of the VAE (as the evaluate stage's).", low=1)
    flow_epochs: int | None = setting(None, "Epochs of the flow (as the counterfactual stage's; default: the zoo's "
                                      "schedule).", low=1)
    n: int = setting(256, "Held-out images the quality is measured on (all, if fewer).", low=2)
    spectrum_n: int = setting(16, "Held-out images the decoder Jacobian's spectrum is computed at.", low=1)
    spectrum_top: int = setting(32, "Leading singular values where the latent has more than 128 dimensions "
                                "(else all are computed).", low=2)
    seed: int = setting(0, "Seed of the data split, training and sampling.", cli=False)
    device: str = setting("cpu", "torch device.", result=False, cli=False)


_GENERATORS = ("vae", "flow")


def _generator(kind: str, cfg: ManifoldConfig, train, cache, device: str, progress: bool):
    """The generator exactly as the evaluate (VAE) and counterfactual (flow) stages get it, so the cache is shared."""
    from ..models import GenerativeTrainConfig, get_generative
    from ..models.generator_zoo import get_generator
    from ..models.generators import as_generator

    if kind == "vae":
        vae, info = get_generative(train, "vae", 10, GenerativeTrainConfig(epochs=cfg.vae_epochs, seed=cfg.seed),
                                   cache=cache, device=device, progress=progress)
        return as_generator(vae), info
    return get_generator(train, "flow", cache=cache, device=device, progress=progress, epochs=cfg.flow_epochs,
                         seed=cfg.seed)


def _sample(n_total: int, n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def process_generators(units: list[Unit], context: dict[str, Any], out_dir: Path) -> list[dict]:
    """One record per generator: its held-out quality (bits/dim for a flow, reconstruction error for a VAE, each
    with its reference) and the spectrum of ∂decode/∂z at held-out images with the dimension it estimates."""
    from ..counterfactuals.experiment import spectrum_summary
    from ..geometry.projection import estimate_dimension
    from ..geometry.spectrum import generator_spectrum
    from ..models import ModelCache
    from ..models.cache import state_fingerprint
    from ..models.flows import dequantize
    from ..models.generators import flatten_latent

    cfg: ManifoldConfig = context["config"]
    train, test = context["train"], context["test"]
    records = []
    for u in units:
        kind = u.payload["kind"]
        t0 = time.perf_counter()
        if kind == "vae" and context.get("known") is not None:
            records.append(_known_record(u, context["known"], test, cfg, t0))
            continue
        gen, info = _generator(kind, cfg, train, ModelCache(context["cache_dir"]), context["device"], context["progress"])
        dev = gen.device
        x = test.x[_sample(len(test), min(cfg.n, len(test)), cfg.seed)].to(dev)
        rec: dict[str, Any] = {"id": u.id, "kind": kind, "name": gen.name, "exact": gen.exact, "n": int(x.shape[0]),
                               "fingerprint": state_fingerprint(gen.module) if gen.module is not None else None,
                               "cached": info.get("cached"), "train_seconds": info.get("train_seconds"),
                               "epochs": cfg.vae_epochs if kind == "vae" else cfg.flow_epochs}
        with torch.no_grad():
            z = gen.encode(x)
            xr = gen.decode(z)
            err = (xr - x).reshape(len(x), -1)
            rec["round_trip_max"] = float(err.abs().max())
            if kind == "flow":
                g = torch.Generator().manual_seed(cfg.seed)
                bpd = gen.bits_per_dim(dequantize(x.cpu(), g).to(dev), strict=False).double()
                rec.update(bits_per_dim=float(bpd[torch.isfinite(bpd)].mean()) if bool(torch.isfinite(bpd).any()) else None,
                           bits_per_dim_nonfinite=int((~torch.isfinite(bpd)).sum()),
                           train_bits_per_dim=info.get("bits_per_dim"), uniform_bits_per_dim=8.0)
            else:
                mean_image = train.x.to(dev).mean(0, keepdim=True)
                mse = float(err.double().pow(2).mean())
                ref = float((x - mean_image).reshape(len(x), -1).double().pow(2).mean())
                rec.update(recon_mse=mse, mean_image_mse=ref, r2=1 - mse / ref if ref > 0 else None,
                           recon_max=float(err.abs().max()))
        zs = gen.encode(x[: cfg.spectrum_n])
        k = flatten_latent(zs).shape[1]
        top = None if k <= 128 else min(cfg.spectrum_top, k)
        spec = generator_spectrum(gen, zs, top=top, seed=cfg.seed)
        rec["latent_dim"] = k
        rec["spectrum"] = spectrum_summary([{"singular_values": s.tolist(), "dimension": int(d)} for s, d in
                                            zip(spec.singular_values, spec.dimension)])
        rec["spectrum"]["method"] = spec.method
        # a second estimate that always gives a number: the fewest singular values holding 99% of Σσ² (of those
        # computed: all of them unless the latent has more than 128 dimensions)
        energy = estimate_dimension(spec.singular_values, "energy", energy=0.99).double()
        rec["spectrum"]["dimension_energy_median"] = float(energy.median())
        rec["singular_values_median"] = spec.singular_values.double().median(0).values.tolist()
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        records.append(rec)
    return records


def _known_record(u: Unit, km, test, cfg: ManifoldConfig, t0: float) -> dict[str, Any]:
    """The record of a known manifold (``known:<data>``): nothing is estimated. Its dimension is the VAE's latent
    dimension k by construction (every image is decode(z) of a stored z); the rank of ∂decode/∂z at ``spectrum_n``
    test images confirms that the decoder is an immersion there (rank k: the tangent spaces are k-dimensional)."""
    from ..geometry import tangent_space
    from ..models.cache import state_fingerprint

    z = test.z[_sample(len(test), min(cfg.spectrum_n, len(test)), cfg.seed)]
    dev = next(km.generative.parameters()).device
    t = tangent_space(km.decode, z.to(dev), progress=False)
    return {"id": u.id, "kind": "vae", "known": True, "name": "the VAE decoder the images are sampled from",
            "exact": False, "n": len(test), "fingerprint": state_fingerprint(km.generative), "epochs": cfg.vae_epochs,
            "latent_dim": km.latent_dim, "dimension": km.latent_dim, "labeler_accuracy": km.labeler_accuracy,
            "acceptance_rate": km.acceptance_rate, "tangent_rank_min": int(t.rank.min()),
            "tangent_rank_max": int(t.rank.max()), "tangent_rank_n": int(len(z)),
            "seconds": round(time.perf_counter() - t0, 2)}


def manifold_checks(r: dict[str, Any]) -> list[str]:
    """The checks of one generator's record (``FAILED: `` where findings that rest on it should be withheld)."""
    name, out = f"{r['kind']} ({r['name']})", []
    if r.get("known"):
        k, lo, hi = r["dimension"], r["tangent_rank_min"], r["tangent_rank_max"]
        ranks = f"{lo}" if lo == hi else f"{lo}–{hi}"
        return [f"{'' if lo == k else 'FAILED: '}known manifold: dimension k = {k} exactly, the images sampled from a "
                f"VAE decoder (labeler accuracy {r['labeler_accuracy']:.1%}, acceptance {r['acceptance_rate']:.1%}); "
                f"tangent spaces exact, no reconstruction or R² applies; ∂decode/∂z has rank {ranks} at "
                f"{r['tangent_rank_n']} test images" + ("" if lo == k else f" (< {k}: some tangent spaces are degenerate)")]
    if r["kind"] == "flow":
        if r["round_trip_max"] > 1e-3:
            out.append(f"FAILED: {name}: decode(encode(x)) differs from x by up to {r['round_trip_max']:.3g} although a "
                       "flow is a bijection (tolerance 1e-3): its latent results are not about x")
        else:
            out.append(f"{name}: exact inverse (max |decode(encode(x)) − x| = {r['round_trip_max']:.2g})")
        if r.get("bits_per_dim") is None or r.get("bits_per_dim_nonfinite"):
            out.append(f"FAILED: {name}: the likelihood overflows on {r.get('bits_per_dim_nonfinite')} of {r['n']} held-out "
                       "images")
        elif r["bits_per_dim"] >= r["uniform_bits_per_dim"]:
            out.append(f"FAILED: {name}: held-out {r['bits_per_dim']:.2f} bits/dim, no better than a uniform density "
                       f"({r['uniform_bits_per_dim']:g}): it has not learnt the data")
    else:
        r2 = r.get("r2")
        if r2 is None or r2 <= 0:
            out.append(f"FAILED: {name}: held-out reconstruction error {r['recon_mse']:.4g} is no better than the training "
                       f"mean image's ({r['mean_image_mse']:.4g}): tangent spaces and in-fills from it are not the data's")
        else:
            out.append(f"{name}: held-out reconstruction error {r['recon_mse']:.4g} per pixel ({r2:.0%} of the variance "
                       f"around the mean image explained); not a bijection, so latent results are about decode(encode(x))")
    s = r["spectrum"]
    if s.get("dimension_median") is None:
        out.append(f"{name}: spectrum dimension {s.get('dimension_note', 'not determined')}")
    return out


class ManifoldExperiment(Experiment):
    """The audit's manifold stage: no classifier; one unit per generator (trained, or reused from the cache entry the
    evaluate and counterfactual stages use), its held-out quality and its decoder Jacobian's spectrum."""

    command = "audit-manifold"
    what = "the audit's manifold stage"

    def check_options(self, cfg: ManifoldConfig) -> None:
        bad = [g for g in cfg.generators if g not in _GENERATORS]
        if bad or not cfg.generators:
            raise InputError(f"{param('generators')} takes {', '.join(_GENERATORS)}; got {', '.join(bad) or 'nothing'}.")
        for key in ("vae_epochs", "n", "spectrum_n", "spectrum_top") + (("flow_epochs",) if cfg.flow_epochs is not None else ()):
            v = getattr(cfg, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{param(key)} must be an integer >= 1, got {v!r}.")

    def load_data(self, run: Run) -> None:
        super().load_data(run)
        if run.train is not None:  # as the evaluate stage's split (the same data fingerprint, so the same cache)
            run.train.z = run.test.z = None

    def known_settings(self, run: Run):
        """known:<data>: the known manifold with the VAE epochs of the evaluate stage (the generating VAE's)."""
        from ..models.known_manifold import KnownData

        return KnownData(vae_epochs=run.config.vae_epochs, seed=run.config.seed)

    def resolve_model(self, run: Run) -> None:
        """No classifier: the generators alone."""

    def prepare(self, run: Run) -> dict[str, Any]:
        return {"config": run.config, "train": run.train, "test": run.test, "cache_dir": run.cache_dir,
                "device": run.device, "progress": run.progress, "known": run.extra.get("known")}

    def plan(self, run: Run, context: dict[str, Any]) -> Iterator[Stage]:
        units = [Unit(f"generator-{g}", {"kind": g}) for g in run.config.generators]
        yield Stage("generators", units, process_generators, context, desc="generators")

    def summarize(self, run: Run, context: dict[str, Any]) -> dict[str, Any]:
        gens = {r["kind"]: {k: v for k, v in r.items() if k != "id"} for r in run.records["generators"]}
        for r in gens.values():
            run.checks.extend(manifold_checks(r))
        return {"generators": gens, "image_shape": list(run.data.image_shape),
                "pixels": int(math.prod(run.data.image_shape))}

    def report(self, run: Run, summary: dict[str, Any], context: dict[str, Any]) -> Path:
        cards, rows = [], []
        for kind, r in summary["generators"].items():
            if r.get("known"):
                cards.append({"label": "known manifold: dimension", "value": str(r["dimension"]),
                              "sub": f"exactly (latent of the VAE the images are sampled from) · labeler accuracy "
                                     f"{_pct(r['labeler_accuracy'])} · acceptance {_pct(r['acceptance_rate'])}"})
                rows.append([kind, r["name"], r.get("epochs"), r["latent_dim"], r["n"], "— (the data's generator)",
                             f"{r['dimension']} exactly (∂decode/∂z rank {r['tangent_rank_min']}–{r['tangent_rank_max']})",
                             "—", "n/a"])
                continue
            s = r["spectrum"]
            if kind == "flow":
                cards.append({"label": "flow: held-out bits/dim", "value": _fmt(r.get("bits_per_dim"), 2),
                              "sub": f"training {_fmt(r.get('train_bits_per_dim'), 2)} · uniform {r['uniform_bits_per_dim']:g}"
                                     " · lower = better"})
            else:
                cards.append({"label": "VAE: held-out reconstruction MSE", "value": _fmt(r.get("recon_mse"), 4),
                              "sub": f"mean image {_fmt(r.get('mean_image_mse'), 4)} · R² {_fmt(r.get('r2'), 2)}"})
            gap = s.get("dimension_median")
            cards.append({"label": f"{kind}: spectrum dimension", "value": "no gap" if gap is None else _fmt(gap, 0),
                          "sub": f"gap σᵢ/σᵢ₊₁ ≥ 10 found for {_pct(s.get('gap_found_fraction'))} · 99% of Σσ² in "
                                 f"{_fmt(s.get('dimension_energy_median'), 0)} of {s['top']} (latent {r['latent_dim']})"})
            rows.append([kind, r["name"], r.get("epochs") or "zoo default", r["latent_dim"], r["n"],
                         _fmt(r.get("bits_per_dim") if kind == "flow" else r.get("recon_mse"), 4),
                         f"{'no gap' if s.get('dimension_median') is None else _fmt(s['dimension_median'], 0)} · 99% of Σσ²: "
                         f"{_fmt(s.get('dimension_energy_median'), 0)}",
                         f"{_fmt(s.get('sigma_first_median'), 3)} … {_fmt(s.get('sigma_last_median'), 3)} (top {s['top']})",
                         "yes" if r.get("cached") else "no"])
        table = {"title": "Generators", "header": ["kind", "name", "epochs", "latent dims", "held-out images",
                                                   "bits/dim or MSE", "dimension: gap · energy", "median σ₁ … σ_last",
                                                   "from cache"], "rows": rows}
        return _stage_report(run, dict(
            title="manifex · audit · manifold", kicker="audit · manifold", headline="The data manifold",
            subtitle=f"{run.config.dataset} ({'×'.join(map(str, summary['image_shape']))}): the generators the audit's "
                     "stages use, their held-out quality and the dimension of their decoder's Jacobian spectrum "
                     "(the number of singular values before the largest gap σᵢ/σᵢ₊₁ ≥ 10)"
                     + ("; the data's own generator, the VAE its images are sampled from, is known: its dimension is "
                        "stated, not estimated" if run.extra.get("known") is not None else ""),
            cards=cards, figures=[], tables=[table],
            options={k: getattr(run.config, k) for k in ("dataset", "generators", "vae_epochs", "flow_epochs", "n",
                                                          "spectrum_n", "seed")}))


# ------------------------------------------------------------------------------------------------------------------
# which methods the attack stage can manipulate
# ------------------------------------------------------------------------------------------------------------------
def attackable_methods(model: torch.nn.Module, x: torch.Tensor, methods: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """The ``methods`` whose explanation of ``x`` (a probe batch; the model's weights do not matter) is a
    differentiable function of the input shaped like ``x`` — what the manipulation attack descends on — and, for the
    others, why not. One explanation each with ``create_graph``; the model's state is left as found."""
    from ..attribution import make_explainer
    from ..attribution.core import preserve_model_state

    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    if first is not None:
        x = x.to(device=first.device, dtype=first.dtype)
    ok, why = [], {}
    with preserve_model_state(model):
        model.eval()
        with torch.no_grad():
            out = model(x)
        target = out.argmax(1) if isinstance(out, torch.Tensor) and out.dim() == 2 else torch.zeros(len(x), dtype=torch.long)
        for m in methods:
            xa = x.clone().requires_grad_(True)
            try:
                e = make_explainer(model, m).attribute(xa, target, create_graph=True)
            except (TypeError, RuntimeError, ValueError) as err:  # the method cannot build a graph of its explanation
                why[m] = f"its explanation cannot be differentiated ({' '.join(str(err).split())[:120]})"
                continue
            if not isinstance(e, torch.Tensor) or e.shape != x.shape:
                why[m] = f"its maps are not shaped like the images ({tuple(getattr(e, 'shape', ()))})"
            elif not e.requires_grad:
                why[m] = "its explanation does not depend differentiably on the input"
            else:
                ok.append(m)
    return ok, why
