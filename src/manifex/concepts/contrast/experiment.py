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

from ..attribution.core import OutputSelector, check_output_selector, preserve_model_state
from ..attribution.layer import layer_activations
from ..data.base import ImageDataset
from ..errors import InputError
from ..models.cache import state_fingerprint
from ..runs import (Unit, atomic_savefig, atomic_torch_save, atomic_write_json, check_settings, run_units, safe_torch_load,
                   tensor_fingerprint, to_jsonable)
from ..attribution.methods import model_device
from .basis import as_images, predict_classes
from .contrast import (
    Hyperplanes,
    _check_model_layer,
    _pick_images,
    check_pair,
    class_activation_data,
    contrastive_concepts,
    fit_ood_filter,
    model_session,
    train_hyperplanes,
)
from .shift import T_GRID, first_swap, patch_test, shifting_test

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
                            seed=cfg.seed + 1000 * a + b, batch_size=cfg.batch_size, relu=context.get("relu", True),
                            output=context.get("output"))
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
                 checks: Sequence[str] = (), info: dict | None = None, output: OutputSelector = None) -> ContrastRun:
    """The contrast campaign: per-class activation data and batched hyperplanes for the classes of ``pairs``
    (cached in ``out_dir/hyperplanes.pt``), one shifting-test unit per pair on :func:`manifex.runs.run_units`
    (``results.jsonl``; finished pairs skipped on resume), and the contrastive concepts of
    ``config.concepts_pair`` (default the first pair) with their top crops. Everything is checked on one batch
    before any relevance is computed.

    A layer with negative activations on the images the tests use (a convolution or BatchNorm before its ReLU,
    Tanh, ELU) is shifted purely, a + t·w (the research code's ``use_relu=False``; ReLU(a + t·w) would change it
    even at t = 0), and its contrastive concepts are skipped with a warning (NMF needs non-negative data).
    ``output``: which part of a tuple/dict model output holds the logits (as in ``explain``). The model is left
    as found (train/eval flags, buffers, hooks)."""
    cfg = config or ContrastConfig()
    output = check_output_selector(output)
    x = as_images(data)
    out = Path(out_dir).expanduser()
    with preserve_model_state(model):
        with model_session(model, output):
            module, layer, n_classes, acts = _check_model_layer(model, x, cfg.layer, "manifex contrast")
            cfg.layer = layer
            pairs = _check_pairs(pairs, n_classes)
            cpair = tuple(cfg.concepts_pair) if cfg.concepts_pair else pairs[0]
            check_pair(cpair[0], cpair[1], n_classes)
            if cfg.n_components > acts.shape[1]:
                raise InputError(f"--components {cfg.n_components} exceeds the {acts.shape[1]} channels of layer {layer!r}.")
            preds = predict_classes(model, x, cfg.batch_size)
            classes = sorted({c for p in pairs for c in p} | set(cpair))
            counts = {c: int((preds == c).sum()) for c in classes}
            missing = [c for c, n in counts.items() if n == 0]
            if missing:
                raise InputError(f"no image of the data is predicted as class(es) {missing}; the pairs need images of both "
                                 "classes — drop those pairs or use more data.")
            # the layer's sign on every image the shifting test and the contrastive concepts will use (one cheap pass)
            used = sorted({int(i) for c in {a for a, _ in pairs} | {cpair[0]} for i in _pick_images(preds, [c], cfg.images_per_class, cfg.seed)[1][0]})
            minimum = min(float(acts.min()), _layer_min(model, x, module, torch.tensor(used), cfg.batch_size))
        out.mkdir(parents=True, exist_ok=True)
        return _run(model, x, out, cfg, module, layer, acts, pairs, cpair, preds, classes, counts, minimum, executor, resume,
                    progress, checks, info, output)


@torch.no_grad()
def _layer_min(model: nn.Module, x: torch.Tensor, module: nn.Module, index: torch.Tensor, batch_size: int) -> float:
    dev = model_device(model)
    lo = float("inf")
    for s in range(0, index.numel(), batch_size):
        xb = x[index[s : s + batch_size]]
        lo = min(lo, float(layer_activations(model, xb.to(dev) if dev is not None else xb, module).min()))
    return lo


def _run(model, x, out, cfg, module, layer, acts, pairs, cpair, preds, classes, counts, minimum, executor, resume, progress,
         checks, info, output) -> ContrastRun:
    checks = list(checks)
    warnings_: list[str] = []
    checks.append(f"layer {layer!r}: output {tuple(acts.shape[1:])} per image, finite on a first batch")
    relu = minimum >= 0
    if relu:
        checks.append(f"layer {layer!r} is non-negative on every image the tests use, so the shift ReLU(a + t·w) at "
                      "t = 0 leaves the output unchanged")
    else:
        warnings_.append(f"layer {layer!r} has negative activations (min {minimum:.3g}): the shifting test uses the pure shift "
                         "a + t·w (ReLU(a + t·w) would change the output even at t = 0) and the contrastive concepts are "
                         "skipped (NMF needs non-negative data); for them pick a layer after a ReLU.")
        checks.append(f"layer {layer!r} has negative activations (min {minimum:.3g}): shift a + t·w, the identity at t = 0 "
                      "(the research code's use_relu=False)")
    few = [c for c, n in counts.items() if n < min(10, cfg.images_per_class)]
    if few:
        warnings_.append(f"few images predicted as class(es) {few} ({[counts[c] for c in few]}): their numbers are noisy.")
    checks.append(f"images predicted per class (of {x.shape[0]}): " + ", ".join(f"{c}: {counts[c]}" for c in classes)
                  + f"; up to {cfg.images_per_class} used per class")

    model_fp, data_fp = state_fingerprint(model), tensor_fingerprint(x)
    # a pair's record depends on these settings, the model and the images; not on the batch size or the options
    # of the contrastive concepts (recomputed every run), nor on which other pairs run
    pair_settings = {k: v for k, v in cfg.to_dict().items()
                     if k not in ("batch_size", "concepts_pair", "top_k", "n_components", "ood")}
    check_settings(out, {"config": pair_settings, "model": model_fp, "data": data_fp,
                         "relu": relu, "output": None if output is None or callable(output) else output},
                   resume=resume, what="a contrast campaign")
    key = cfg.hyperplane_key(data_fp, model_fp, classes)
    hp_path = out / "hyperplanes.pt"
    hp = None
    if resume and hp_path.exists():
        saved = safe_torch_load(hp_path, what="the hyperplane file", fix="delete it (it is rebuilt) or use a new --out")
        if saved.get("key") == key:
            hp = Hyperplanes.from_dict(saved["hyperplanes"])
            data_info = saved["data"]
    if hp is None:
        cdata = class_activation_data(model, x, module, classes=classes, images_per_class=cfg.images_per_class,
                                      threshold=cfg.threshold, relevance=cfg.relevance,
                                      relevance_options={"n_samples": cfg.n_samples}, seed=cfg.seed,
                                      batch_size=64, predictions=preds, progress=progress, output=output)
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
    context = {"model": model, "x": x, "preds": preds, "hyperplanes": hp, "config": cfg, "relu": relu, "output": output}
    records = run_units(units, shift_units, out, context=context, batch_size=4, executor=executor, resume=resume,
                        progress=progress, desc="contrast: shifting test")
    summary = summarize(records)
    if cfg.n_random:
        checks.append(f"random-direction control: {cfg.n_random} Gaussian directions per pair, each scaled to ‖w_AB‖")
    else:
        warnings_.append("no random-direction control (--random-directions 0): the swap rate along w_AB has no baseline.")

    concepts = _contrastive(model, x, hp, cpair, cfg, preds, out, output) if relu else None
    return ContrastRun(config=cfg, out_dir=out, pairs=pairs, records=records, summary=summary, hyperplanes=hp,
                       checks=checks, warnings=warnings_, concepts=concepts, info={**(info or {}), "hyperplane_key": key})


def summarize(records: Sequence[dict]) -> dict[str, Any]:
    """Swap rate along w_AB and along random directions, their ratio, mean hyperplane accuracy, curves.

    Without random directions (``n_random=0``) the control's rate and the ratio are ``None`` ("no control"),
    and so is the ratio when no random direction swapped (``swap_ratio_unbounded`` says so): never NaN or inf."""
    if not records:
        return {"n_pairs": 0}
    sw = np.array([r["swapped"] for r in records], dtype=float)
    ctrl = np.array([v for r in records for v in r["control_swapped"]], dtype=float)
    p_b = np.array([r["p_b"] for r in records])
    cp_b = np.array([c for r in records for c in r["control_p_b"]]) if ctrl.size else np.zeros((0, p_b.shape[1]))
    rate = float(sw.mean())
    crate = float(ctrl.mean()) if ctrl.size else None
    t_first = [t for t in (swap_t(r) for r in records) if t is not None]
    return {
        "n_pairs": len(records), "swap_rate": rate, "n_swapped": int(sw.sum()),
        "control_swap_rate": crate, "n_control": int(ctrl.size), "n_control_swapped": int(ctrl.sum()),
        "swap_ratio": rate / crate if crate else None,
        "swap_ratio_unbounded": bool(crate == 0 and rate > 0),
        "median_t_swap": float(np.median(t_first)) if t_first else None,
        "hyperplane_accuracy": float(np.mean([r["accuracy"] for r in records])),
        "ts": list(records[0]["ts"]),
        "mean_p_b": p_b.mean(0).tolist(), "mean_p_a": np.array([r["p_a"] for r in records]).mean(0).tolist(),
        "control_mean_p_b": cp_b.mean(0).tolist() if cp_b.size else None,
        "control_p_b_q10": np.quantile(cp_b, 0.1, axis=0).tolist() if cp_b.size else None,
        "control_p_b_q90": np.quantile(cp_b, 0.9, axis=0).tolist() if cp_b.size else None,
    }


def swap_t(record: dict) -> float | None:
    """The first t where the pair's prediction swaps to B (``None`` without a swap), from its curves: also right
    for records of older runs, whose ``t_swap`` held the t of the largest p(B)."""
    if not record["swapped"]:
        return None
    k = first_swap(record["p_a"], record["p_b"], record.get("threshold", 0.5))
    return None if k is None else float(record["ts"][k])


def _contrastive(model, x, hp, pair, cfg: ContrastConfig, preds, out: Path, output: OutputSelector = None) -> dict[str, Any] | None:
    from .prototypes import concept_prototypes

    a, b = pair
    ood = None
    if cfg.ood:
        saved = safe_torch_load(out / "hyperplanes.pt", what="the hyperplane file",
                                fix="delete it (it is rebuilt) or use a new --out")
        from .contrast import ClassActivations

        vecs = saved.get("vectors") or {}
        ood = fit_ood_filter(ClassActivations(vectors=list(vecs.values()), classes=list(vecs), layer=cfg.layer),
                             classes=[a], seed=cfg.seed)
    cc = contrastive_concepts(model, x, hp, a, b, n_components=cfg.n_components, images_per_class=cfg.images_per_class,
                              seed_compat=cfg.seed_compat, ood=ood, seed=cfg.seed, predictions=preds, output=output)
    with model_session(model, output):
        protos = concept_prototypes(model, x, cc.basis, top_k=cfg.top_k, predictions=preds)
    atomic_torch_save({"vectors": cc.vectors.cpu(), "pair": [a, b], "crops": protos.crops[0], "scores": protos.scores[0],
                       "image_index": protos.image_index[0]}, out / "contrastive_concepts.pt")
    # patch test: each concept's top crop pasted into images of B (bottom-right) against a mean-colour patch
    _, picks = _pick_images(preds, [b], cfg.images_per_class, cfg.seed)
    patches = []
    if picks and protos.crops.shape[-2] <= x.shape[-2] and protos.crops.shape[-1] <= x.shape[-1]:
        for i in range(cc.vectors.shape[0]):
            r = patch_test(model, x[picks[0]], protos.crops[0, i, 0], a, b, position="bottom-right", batch_size=cfg.batch_size,
                           output=output)
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
    relu = all(r.get("shift", "relu") == "relu" for r in records)
    ax.set_xlabel("shift t (a → ReLU(a + t·w_AB))" if relu else "shift t (a → a + t·w_AB)")
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


#: The report's content width at a 1280 px window (``.wrap``: 1180 px less 2 × 28 px padding) and the dpi of its
#: figures: a figure at most this wide is shown at its own pixel size, so a label of f points is f·dpi/72 px tall.
REPORT_WIDTH_PX = 1124
FIGURE_DPI = 110


def crops_figure(crops: torch.Tensor, scores: torch.Tensor) -> Figure:
    """(k, top_k, C, h, w) crops: one row per contrastive concept, at most :data:`REPORT_WIDTH_PX` wide at
    :data:`FIGURE_DPI` (shown full width, unscaled), with labels of 10–11 pt (15–17 px)."""
    k, n = crops.shape[:2]
    cell = min(1.0, (REPORT_WIDTH_PX / FIGURE_DPI - 1.2) / n)  # inches per crop; 1.2 in for the row labels
    fig = Figure(figsize=(cell * n + 1.2, (cell + 0.3) * k + 0.1))
    axes = fig.subplots(k, n, squeeze=False)
    for i in range(k):
        for j in range(n):
            a = crops[i, j].detach().cpu().float().numpy()
            a = a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))
            axes[i, j].imshow(a.clip(0, 1), cmap="gray" if a.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            axes[i, j].set_xlabel(f"{float(scores[i, j]):.2f}", fontsize=10, labelpad=2)
        axes[i, 0].set_ylabel(f"concept {i + 1}", fontsize=11)
    fig.subplots_adjust(wspace=0.08, hspace=0.45, left=1.1 / (cell * n + 1.2), right=0.99, top=0.98,
                        bottom=0.3 / ((cell + 0.3) * k + 0.1))
    return fig


def findings(summary: dict, cfg: ContrastConfig) -> list[str]:
    if not summary.get("n_pairs"):
        return []
    head = (f"Moving layer {cfg.layer}'s activations along w_AB swaps the prediction to B for "
            f"{summary['n_swapped']}/{summary['n_pairs']} pairs ({summary['swap_rate']:.0%})")
    if summary.get("median_t_swap") is not None:
        head += f", at a median t = {summary['median_t_swap']:g}"
    if summary["control_swap_rate"] is None:
        out = [head + "; no random-direction control was run (--random-directions 0), so there is no baseline."]
    else:
        out = [head + f"; random directions of the same norm swap {summary['control_swap_rate']:.0%} of "
                      f"{summary['n_control']} tries."]
        if summary["swap_ratio"] is not None:
            out.append(f"Swap rate along w_AB ÷ random directions: {summary['swap_ratio']:.1f}× (goal ≥ 3×).")
        elif summary["swap_rate"] > 0:
            out.append(f"No random direction swapped the prediction (0 of {summary['n_control']}): the swap is specific to w_AB.")
    out.append(f"Mean hyperplane accuracy over the pairs: {summary['hyperplane_accuracy']:.1%}.")
    return out


def _ratio_card(s: dict) -> dict[str, Any]:
    if s["control_swap_rate"] is None:
        return {"label": "ratio", "value": "—", "sub": "no control run", "accent": True}
    if s["swap_ratio"] is not None:
        return {"label": "ratio", "value": f"{s['swap_ratio']:.1f}×", "sub": "w_AB ÷ random (goal ≥ 3×)", "accent": True}
    sub = f"no random swap in {s['n_control']} tries" if s["swap_rate"] > 0 else "no swap either way"
    return {"label": "ratio", "value": "—", "sub": sub, "accent": True}


def write_contrast_report(run: ContrastRun, *, command: str | None = None) -> Path:
    """Figures, ``metrics.json`` and ``report.html`` in ``run.out_dir``; returns the report's path."""
    from ..reports import render

    out, s, cfg = run.out_dir, run.summary, run.config
    figures = {}
    if s.get("n_pairs"):
        atomic_savefig(shift_figure(s, run.records), out / "shift.png", dpi=FIGURE_DPI)
        figures["shift"] = "shift.png"
    atomic_savefig(accuracy_figure(run.hyperplanes), out / "hyperplane_accuracy.png", dpi=FIGURE_DPI)
    figures["accuracy"] = "hyperplane_accuracy.png"
    concepts = None
    if run.concepts is not None:
        c = run.concepts
        atomic_savefig(crops_figure(c["crops"], c["scores"]), out / "contrastive_concepts.png", dpi=FIGURE_DPI)
        figures["concepts"] = "contrastive_concepts.png"
        concepts = {k: v for k, v in c.items() if k not in ("crops", "scores")}
    metrics = {"config": cfg.to_dict(), "summary": s, "pairs": [list(p) for p in run.pairs], "concepts": concepts,
               "checks": run.checks, "warnings": run.warnings, "info": run.info}
    atomic_write_json(out / "metrics.json", to_jsonable(metrics, inf_as_string=True))
    f = findings(s, cfg)
    cards = []
    if s.get("n_pairs"):
        control = ({"label": "random directions", "value": "—", "sub": "no control (0 directions)"} if s["control_swap_rate"] is None
                   else {"label": "random directions", "value": f"{s['control_swap_rate']:.0%}", "sub": f"{s['n_control']} tries, same norm"})
        cards = [
            {"label": "swap rate along w_AB", "value": f"{s['swap_rate']:.0%}", "sub": f"{s['n_swapped']} of {s['n_pairs']} pairs", "accent": True},
            control, _ratio_card(s),
            {"label": "hyperplane accuracy", "value": f"{s['hyperplane_accuracy']:.1%}", "sub": "mean over the pairs"},
        ]
    rows = []
    for r in run.records:
        t = swap_t(r)
        k = int(np.argmax(r["p_b"]))
        rows.append({"a": r["a"], "b": r["b"], "acc": f"{r['accuracy']:.3f}", "swapped": r["swapped"],
                     "t": "—" if t is None else f"{t:g}", "pb": f"{r['p_b'][k]:.3f}", "tmax": f"{r['ts'][k]:g}",
                     "pa": f"{r['p_a'][k]:.3f}",
                     "ctrl": f"{np.mean(r['control_swapped']):.0%}" if r["control_swapped"] else "n/a", "n": r["n_images"]})
    warnings_ = list(run.warnings)
    headline = f[0] if f and not warnings_ else "Class contrasting"
    return render("contrast.html.j2", out / "report.html", title="Class contrasting report", headline=headline,
                  subtitle=f"{s.get('n_pairs', 0)} class pairs at layer {cfg.layer}; shifts t ∈ {{{', '.join(f'{t:g}' for t in cfg.ts)}}}",
                  findings=f[1:] if not warnings_ else f, cards=cards, figures=figures, rows=rows, concepts=concepts,
                  checks=run.checks, warnings=warnings_, settings=cfg.to_dict(), info=run.info, command=command)
