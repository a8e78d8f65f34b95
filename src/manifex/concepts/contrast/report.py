"""The figures and the report of a contrast run: p(B) along w_AB against the random directions, the hyperplane
accuracy matrix, the contrastive concepts' top crops, the findings, ``metrics.json`` and ``report.html``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from ...runs import atomic_savefig
from .hyperplanes import Hyperplanes
from .shift import swap_t

__all__ = ["shift_figure", "accuracy_figure", "crops_figure", "findings", "contrast_metrics", "write_contrast_report",
           "REPORT_WIDTH_PX", "FIGURE_DPI"]


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


def findings(summary: dict, cfg: Any) -> list[str]:
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


def contrast_metrics(run: Any) -> dict[str, Any]:
    """The content of ``metrics.json``: the settings, the model, the summary, the pairs, the contrastive concepts
    (without their crops), the checks and the warnings (written with the one encoder: NaN/inf -> null)."""
    concepts = None if run.concepts is None else {k: v for k, v in run.concepts.items() if k not in ("crops", "scores")}
    return {"command": "contrast", "config": run.config.to_dict(),
            "model": run.model_info.to_dict() if run.model_info is not None else None, "summary": run.summary,
            "pairs": [list(p) for p in run.pairs], "concepts": concepts, "checks": run.checks, "warnings": run.warnings,
            "info": run.info}


def write_contrast_report(run: Any, *, command: str | None = None, metrics_file: bool = True) -> Path:
    """Figures, ``metrics.json`` (unless ``metrics_file=False``: the experiment contract writes it) and
    ``report.html`` in ``run.out_dir``; returns the report's path."""
    from ...experiment import write_metrics
    from ...reports import render

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
        figure = c.get("figure")
        if not figure or not (out / figure).is_file():  # the unit's figure, or drawn here from the crops
            figure = "contrastive_concepts.png"
            atomic_savefig(crops_figure(c["crops"], c["scores"]), out / figure, dpi=FIGURE_DPI)
        figures["concepts"] = figure
        concepts = {k: v for k, v in c.items() if k not in ("crops", "scores")}
    if metrics_file:
        write_metrics(out / "metrics.json", contrast_metrics(run))
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
