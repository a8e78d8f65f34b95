"""The class-contrasting campaign behind ``manifex contrast``: hyperplanes, one shifting-test unit per pair on
the shared run layer (resumable, any executor), contrastive concepts of one pair, figures, ``metrics.json``
and ``report.html``.

>>> run = run_contrast(model, data, "blocks.2", pairs=[(4, 9), (3, 5)], out_dir="runs/contrast")
>>> run.summary["swap_rate"], run.summary["control_swap_rate"]
>>> write_contrast_report(run)
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from ..data.base import ImageDataset
from ..errors import InputError
from ..runs import Unit, atomic_savefig, atomic_torch_save, atomic_write_json, run_units, to_jsonable
from .basis import as_images, predict_classes
from .contrast import (
    Hyperplanes,
    _check_model_layer,
    _pick_images,
    check_pair,
    class_activation_data,
    contrastive_concepts,
    fit_ood_filter,
    train_hyperplanes,
)
from .shift import T_GRID, patch_test, shifting_test

__all__ = ["ContrastConfig", "ContrastRun", "run_contrast", "random_pairs", "write_contrast_report", "parse_pairs"]


def parse_pairs(text: str) -> list[tuple[int, int]]:
    """``"4:9,3:5"`` → [(4, 9), (3, 5)] (A:B, A rather than B); InputError on a malformed pair."""
    pairs = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        bits = part.split(":")
        if len(bits) != 2 or not all(b.strip().lstrip("-").isdigit() for b in bits):
            raise InputError(f"--pairs takes A:B class pairs separated by commas (e.g. 4:9,3:5), got {part!r}.")
        pairs.append((int(bits[0]), int(bits[1])))
    if not pairs:
        raise InputError("--pairs is empty; give A:B pairs such as 4:9,3:5.")
    return pairs


def random_pairs(n: int, n_classes: int, *, seed: int = 0) -> list[tuple[int, int]]:
    """``n`` distinct ordered pairs (A ≠ B) of ``n_classes`` classes, seeded (all of them if n ≥ C·(C−1))."""
    every = [(a, b) for a in range(n_classes) for b in range(n_classes) if a != b]
    if n >= len(every):
        return every
    return sorted(random.Random(seed).sample(every, n))


@dataclass
class ContrastConfig:
    """Options of a contrast campaign (the research's settings by default)."""

    layer: str = "blocks.2"
    images_per_class: int = 60
    threshold: float = 0.25
    relevance: str = "deeplift"
    n_samples: int = 20
    epochs: int = 100
    lr: float = 0.01
    ts: tuple[float, ...] = T_GRID
    n_random: int = 10
    n_components: int = 6
    seed_compat: bool = False
    ood: bool = False
    concepts_pair: tuple[int, int] | None = None
    top_k: int = 8
    seed: int = 0
    batch_size: int = 256

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["ts"] = list(self.ts)
        d["concepts_pair"] = list(self.concepts_pair) if self.concepts_pair else None
        return d

    def hyperplane_key(self, data_fp: str, model_fp: str, classes: Sequence[int]) -> str:
        keys = ("layer", "images_per_class", "threshold", "relevance", "n_samples", "epochs", "lr", "seed")
        blob = json.dumps({**{k: getattr(self, k) for k in keys}, "data": data_fp, "model": model_fp,
                           "classes": sorted(classes)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class ContrastRun:
    """What :func:`run_contrast` produced: ``records`` (one per pair, in ``pairs`` order), ``summary``,
    ``hyperplanes``, ``concepts`` (contrastive concepts of one pair, with prototypes), ``checks``."""

    config: ContrastConfig
    out_dir: Path
    pairs: list[tuple[int, int]]
    records: list[dict]
    summary: dict[str, Any]
    hyperplanes: Hyperplanes
    checks: list[str]
    warnings: list[str] = field(default_factory=list)
    concepts: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _fingerprint(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _model_fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def shift_units(units: list[Unit], context: dict, out_dir: Path) -> list[dict]:
    """Run-layer process: the shifting test of each unit's pair (payload {"a", "b"})."""
    cfg: ContrastConfig = context["config"]
    model, x, preds, hp = context["model"], context["x"], context["preds"], context["hyperplanes"]
    out = []
    for u in units:
        a, b = int(u.payload["a"]), int(u.payload["b"])
        _, picks = _pick_images(preds, [a], cfg.images_per_class, cfg.seed)
        w, bias = hp.pair(a, b)
        res = shifting_test(model, x[picks[0]], cfg.layer, w, a, b, ts=cfg.ts, n_random=cfg.n_random,
                            seed=cfg.seed + 1000 * a + b, batch_size=cfg.batch_size)
        i, j = hp.classes.index(a), hp.classes.index(b)
        out.append({"id": u.id, **res.to_record(), "accuracy": float(hp.accuracy[i, j]), "bias": float(bias)})
    return out


def _check_pairs(pairs: Sequence[tuple[int, int]], n_classes: int) -> list[tuple[int, int]]:
    pairs = [check_pair(int(a), int(b), n_classes) for a, b in pairs]
    if not pairs:
        raise InputError("no class pair to contrast; give --pairs A:B,... or --random-pairs N.")
    if len(set(pairs)) != len(pairs):
        raise InputError(f"pairs repeat: {pairs}; give each A:B once.")
    return pairs


def run_contrast(model: nn.Module, data: ImageDataset | torch.Tensor, pairs: Sequence[tuple[int, int]], out_dir: str | Path, *,
                 config: ContrastConfig | None = None, executor: Any = None, resume: bool = True, progress: bool = True,
                 checks: Sequence[str] = (), info: dict | None = None) -> ContrastRun:
    """The contrast campaign: per-class activation data and batched hyperplanes for the classes of ``pairs``
    (cached in ``out_dir/hyperplanes.pt``), one shifting-test unit per pair on :func:`manifex.runs.run_units`
    (``results.jsonl``; finished pairs skipped on resume), and the contrastive concepts of
    ``config.concepts_pair`` (default the first pair) with their top crops. Everything is checked on one batch
    before any relevance is computed."""
    cfg = config or ContrastConfig()
    x = as_images(data)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    module, layer, n_classes, acts = _check_model_layer(model, x, cfg.layer, "manifex contrast")
    cfg.layer = layer
    pairs = _check_pairs(pairs, n_classes)
    cpair = tuple(cfg.concepts_pair) if cfg.concepts_pair else pairs[0]
    check_pair(cpair[0], cpair[1], n_classes)
    if cfg.n_components > acts.shape[1]:
        raise InputError(f"--components {cfg.n_components} exceeds the {acts.shape[1]} channels of layer {layer!r}.")
    checks = list(checks)
    warnings_: list[str] = []
    checks.append(f"layer {layer!r}: output {tuple(acts.shape[1:])} per image, finite on a first batch")
    if bool((acts < 0).any()):
        warnings_.append(f"layer {layer!r} has negative activations (min {float(acts.min()):.3g}): ReLU(a + t·w) changes "
                         "them even at t = 0, so the shifting test is not a pure shift; choose a block output after a ReLU.")
        checks.append(f"FAILED: layer {layer!r} is non-negative (so t = 0 leaves the output unchanged)")
    else:
        checks.append(f"layer {layer!r} is non-negative on a first batch, so t = 0 leaves the output unchanged")
    preds = predict_classes(model, x, cfg.batch_size)
    classes = sorted({c for p in pairs for c in p} | set(cpair))
    counts = {c: int((preds == c).sum()) for c in classes}
    missing = [c for c, n in counts.items() if n == 0]
    if missing:
        raise InputError(f"no image of the data is predicted as class(es) {missing}; the pairs need images of both "
                         "classes — drop those pairs or use more data.")
    few = [c for c, n in counts.items() if n < min(10, cfg.images_per_class)]
    if few:
        warnings_.append(f"few images predicted as class(es) {few} ({[counts[c] for c in few]}): their numbers are noisy.")
    checks.append(f"images predicted per class (of {x.shape[0]}): " + ", ".join(f"{c}: {counts[c]}" for c in classes)
                  + f"; up to {cfg.images_per_class} used per class")

    key = cfg.hyperplane_key(_fingerprint(x), _model_fingerprint(model), classes)
    hp_path = out / "hyperplanes.pt"
    hp = None
    if resume and hp_path.exists():
        saved = torch.load(hp_path, weights_only=False)
        if saved.get("key") == key:
            hp = Hyperplanes.from_dict(saved["hyperplanes"])
            data_info = saved["data"]
    if hp is None:
        cdata = class_activation_data(model, x, module, classes=classes, images_per_class=cfg.images_per_class,
                                      threshold=cfg.threshold, relevance=cfg.relevance,
                                      relevance_options={"n_samples": cfg.n_samples}, seed=cfg.seed,
                                      batch_size=64, predictions=preds, progress=progress)
        hp = train_hyperplanes(cdata, epochs=cfg.epochs, lr=cfg.lr, seed=cfg.seed)  # every ordered pair of these classes
        hp.layer = layer
        data_info = {"rows": {c: int(v.shape[0]) for c, v in zip(cdata.classes, cdata.vectors)},
                     "fraction": {c: f for c, f in zip(cdata.classes, cdata.fraction)},
                     "fallback": {c: n for c, n in zip(cdata.classes, cdata.fallback) if n},
                     "images": {c: int(len(i)) for c, i in zip(cdata.classes, cdata.image_indices)}}
        atomic_torch_save({"key": key, "hyperplanes": hp.to_dict(), "data": data_info,
                           "vectors": {c: v for c, v in zip(cdata.classes, cdata.vectors)}}, hp_path)
    checks.append(f"hyperplane data: rows per class {data_info['rows']} (positions above {cfg.threshold} × the image's max "
                  f"relevance: {', '.join(f'{c}: {f:.0%}' for c, f in data_info['fraction'].items())})")
    if data_info.get("fallback"):
        checks.append("relevance ≤ 0 at every position (the research's cut τ·max keeps nothing; cut at min + τ·(max − min) "
                      "instead) for images of class " + ", ".join(f"{c}: {n}/{data_info['images'][c]}" for c, n in data_info["fallback"].items()))

    units = [Unit(f"pair-{a}-{b}", {"a": a, "b": b}) for a, b in pairs]
    context = {"model": model, "x": x, "preds": preds, "hyperplanes": hp, "config": cfg}
    records = run_units(units, shift_units, out, context=context, batch_size=4, executor=executor, resume=resume,
                        progress=progress, desc="contrast: shifting test")
    summary = summarize(records)
    checks.append(f"random-direction control: {cfg.n_random} Gaussian directions per pair, each scaled to ‖w_AB‖")

    concepts = _contrastive(model, x, hp, cpair, cfg, preds, out)
    return ContrastRun(config=cfg, out_dir=out, pairs=pairs, records=records, summary=summary, hyperplanes=hp,
                       checks=checks, warnings=warnings_, concepts=concepts, info={**(info or {}), "hyperplane_key": key})


def summarize(records: Sequence[dict]) -> dict[str, Any]:
    """Swap rate along w_AB and along random directions, their ratio, mean hyperplane accuracy, curves."""
    if not records:
        return {"n_pairs": 0}
    sw = np.array([r["swapped"] for r in records], dtype=float)
    ctrl = np.array([v for r in records for v in r["control_swapped"]], dtype=float)
    p_b = np.array([r["p_b"] for r in records])
    cp_b = np.array([c for r in records for c in r["control_p_b"]]) if ctrl.size else np.zeros((0, p_b.shape[1]))
    rate, crate = float(sw.mean()), float(ctrl.mean()) if ctrl.size else float("nan")
    return {
        "n_pairs": len(records), "swap_rate": rate, "n_swapped": int(sw.sum()),
        "control_swap_rate": crate, "n_control": int(ctrl.size),
        "swap_ratio": (rate / crate) if crate > 0 else (float("inf") if rate > 0 else float("nan")),
        "hyperplane_accuracy": float(np.mean([r["accuracy"] for r in records])),
        "ts": list(records[0]["ts"]),
        "mean_p_b": p_b.mean(0).tolist(), "mean_p_a": np.array([r["p_a"] for r in records]).mean(0).tolist(),
        "control_mean_p_b": cp_b.mean(0).tolist() if cp_b.size else None,
        "control_p_b_q10": np.quantile(cp_b, 0.1, axis=0).tolist() if cp_b.size else None,
        "control_p_b_q90": np.quantile(cp_b, 0.9, axis=0).tolist() if cp_b.size else None,
    }


def _contrastive(model, x, hp, pair, cfg: ContrastConfig, preds, out: Path) -> dict[str, Any] | None:
    from .prototypes import concept_prototypes

    a, b = pair
    ood = None
    if cfg.ood:
        saved = torch.load(out / "hyperplanes.pt", weights_only=False)
        from .contrast import ClassActivations

        vecs = saved.get("vectors") or {}
        ood = fit_ood_filter(ClassActivations(vectors=list(vecs.values()), classes=list(vecs), layer=cfg.layer),
                             classes=[a], seed=cfg.seed)
    cc = contrastive_concepts(model, x, hp, a, b, n_components=cfg.n_components, images_per_class=cfg.images_per_class,
                              seed_compat=cfg.seed_compat, ood=ood, seed=cfg.seed, predictions=preds)
    protos = concept_prototypes(model, x, cc.basis, top_k=cfg.top_k, predictions=preds)
    atomic_torch_save({"vectors": cc.vectors.cpu(), "pair": [a, b], "crops": protos.crops[0], "scores": protos.scores[0],
                       "image_index": protos.image_index[0]}, out / "contrastive_concepts.pt")
    # patch test: each concept's top crop pasted into images of B (bottom-right) against a mean-colour patch
    _, picks = _pick_images(preds, [b], cfg.images_per_class, cfg.seed)
    patches = []
    if picks and protos.crops.shape[-2] <= x.shape[-2] and protos.crops.shape[-1] <= x.shape[-1]:
        for i in range(cc.vectors.shape[0]):
            r = patch_test(model, x[picks[0]], protos.crops[0, i, 0], a, b, position="bottom-right", batch_size=cfg.batch_size)
            patches.append({"concept": i + 1, **r.to_record()})
    return {"a": a, "b": b, "mask_fraction": cc.mask_fraction, "relative_error": float(cc.basis.relative_error[0]),
            "ood_kept": cc.ood_kept, "seed_compat": cc.seed_compat, "patches": patches,
            "crops": protos.crops[0], "scores": protos.scores[0]}


# ------------------------------------------------------------------------------------------------ figures and report
def shift_figure(summary: dict, records: Sequence[dict]) -> Figure:
    """p(B) against t: every pair (thin), their mean (bold), the random-direction band (10–90% and mean)."""
    ts = np.array(summary["ts"])
    x = np.arange(len(ts))
    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.subplots()
    for r in records[:60]:
        ax.plot(x, r["p_b"], color="#1e4e9c", alpha=0.12, lw=1)
    if summary.get("control_p_b_q10") is not None:
        ax.fill_between(x, summary["control_p_b_q10"], summary["control_p_b_q90"], color="#999999", alpha=0.3,
                        label="random directions, same norm (10–90%)")
        ax.plot(x, summary["control_mean_p_b"], color="#555555", lw=1.5, ls="--", label="random directions, mean p(B)")
    ax.plot(x, summary["mean_p_b"], color="#1e4e9c", lw=2.5, label="along w_AB, mean p(B)")
    ax.plot(x, summary["mean_p_a"], color="#d9480f", lw=1.5, label="along w_AB, mean p(A)")
    ax.axhline(0.5, color="k", lw=0.6, ls=":")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{t:g}" for t in ts])
    ax.set_xlabel("shift t (a → ReLU(a + t·w_AB))")
    ax.set_ylabel("mean softmax over the images of A")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    return fig


def accuracy_figure(hp: Hyperplanes) -> Figure:
    acc = hp.accuracy.detach().cpu().float().numpy()
    C = len(hp.classes)
    fig = Figure(figsize=(1.2 + 0.42 * C, 1.0 + 0.38 * C))
    ax = fig.subplots()
    im = ax.imshow(np.ma.masked_invalid(acc), vmin=0.5, vmax=1.0, cmap="viridis")
    for i in range(C):
        for j in range(C):
            if np.isfinite(acc[i, j]):
                ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w" if acc[i, j] < 0.8 else "k")
    ax.set_xticks(range(C))
    ax.set_xticklabels(hp.classes)
    ax.set_yticks(range(C))
    ax.set_yticklabels(hp.classes)
    ax.set_xlabel("B")
    ax.set_ylabel("A")
    fig.colorbar(im, ax=ax, fraction=0.046, label="hyperplane accuracy")
    fig.tight_layout()
    return fig


def crops_figure(crops: torch.Tensor, scores: torch.Tensor) -> Figure:
    """(k, top_k, C, h, w) crops: one row per contrastive concept."""
    k, n = crops.shape[:2]
    fig = Figure(figsize=(1.0 * n + 0.6, 1.05 * k + 0.2))
    axes = fig.subplots(k, n, squeeze=False)
    for i in range(k):
        for j in range(n):
            a = crops[i, j].detach().cpu().float().numpy()
            a = a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))
            axes[i, j].imshow(a.clip(0, 1), cmap="gray" if a.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            axes[i, j].set_xlabel(f"{float(scores[i, j]):.2f}", fontsize=6, labelpad=1)
        axes[i, 0].set_ylabel(f"concept {i + 1}", fontsize=7)
    fig.subplots_adjust(wspace=0.08, hspace=0.35, left=0.06, right=0.99, top=0.98, bottom=0.04)
    return fig


def findings(summary: dict, cfg: ContrastConfig) -> list[str]:
    if not summary.get("n_pairs"):
        return []
    out = [f"Moving layer {cfg.layer}'s activations along w_AB swaps the prediction to B for "
           f"{summary['n_swapped']}/{summary['n_pairs']} pairs ({summary['swap_rate']:.0%}); random directions of the same "
           f"norm swap {summary['control_swap_rate']:.0%} of {summary['n_control']} tries."]
    ratio = summary["swap_ratio"]
    if np.isfinite(ratio):
        out.append(f"Swap rate along w_AB ÷ random directions: {ratio:.1f}× (goal ≥ 3×).")
    elif summary["swap_rate"] > 0:
        out.append("No random direction swapped the prediction: the swap is specific to w_AB.")
    out.append(f"Mean hyperplane accuracy over the pairs: {summary['hyperplane_accuracy']:.1%}.")
    return out


def write_contrast_report(run: ContrastRun, *, command: str | None = None) -> Path:
    """Figures, ``metrics.json`` and ``report.html`` in ``run.out_dir``; returns the report's path."""
    from ..reports import render

    out, s, cfg = run.out_dir, run.summary, run.config
    figures = {}
    if s.get("n_pairs"):
        atomic_savefig(shift_figure(s, run.records), out / "shift.png", dpi=110)
        figures["shift"] = "shift.png"
    atomic_savefig(accuracy_figure(run.hyperplanes), out / "hyperplane_accuracy.png", dpi=110)
    figures["accuracy"] = "hyperplane_accuracy.png"
    concepts = None
    if run.concepts is not None:
        c = run.concepts
        atomic_savefig(crops_figure(c["crops"], c["scores"]), out / "contrastive_concepts.png", dpi=110)
        figures["concepts"] = "contrastive_concepts.png"
        concepts = {k: v for k, v in c.items() if k not in ("crops", "scores")}
    metrics = {"config": cfg.to_dict(), "summary": s, "pairs": [list(p) for p in run.pairs], "concepts": concepts,
               "checks": run.checks, "warnings": run.warnings, "info": run.info}
    atomic_write_json(out / "metrics.json", to_jsonable(metrics, inf_as_string=True))
    f = findings(s, cfg)
    cards = []
    if s.get("n_pairs"):
        ratio = s["swap_ratio"]
        cards = [
            {"label": "swap rate along w_AB", "value": f"{s['swap_rate']:.0%}", "sub": f"{s['n_swapped']} of {s['n_pairs']} pairs", "accent": True},
            {"label": "random directions", "value": f"{s['control_swap_rate']:.0%}", "sub": f"{s['n_control']} tries, same norm"},
            {"label": "ratio", "value": f"{ratio:.1f}×" if np.isfinite(ratio) else "∞" if s["swap_rate"] > 0 else "n/a",
             "sub": "w_AB ÷ random (goal ≥ 3×)", "accent": True},
            {"label": "hyperplane accuracy", "value": f"{s['hyperplane_accuracy']:.1%}", "sub": "mean over the pairs"},
        ]
    rows = [{"a": r["a"], "b": r["b"], "acc": f"{r['accuracy']:.3f}", "swapped": r["swapped"], "t": r["t_swap"],
             "pb": f"{max(r['p_b']):.3f}", "pa": f"{r['p_a'][r['ts'].index(r['t_swap'])]:.3f}",
             "ctrl": f"{r['control_swap_rate']:.0%}" if r["control_swapped"] else "n/a", "n": r["n_images"]} for r in run.records]
    warnings_ = list(run.warnings)
    headline = f[0] if f and not warnings_ else "Class contrasting"
    return render("contrast.html.j2", out / "report.html", title="Class contrasting report", headline=headline,
                  subtitle=f"{s.get('n_pairs', 0)} class pairs at layer {cfg.layer}; shifts t ∈ {{{', '.join(f'{t:g}' for t in cfg.ts)}}}",
                  findings=f[1:] if not warnings_ else f, cards=cards, figures=figures, rows=rows, concepts=concepts,
                  checks=run.checks, warnings=warnings_, settings=cfg.to_dict(), info=run.info, command=command)
