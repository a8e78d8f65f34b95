"""Figures and the HTML report of an alignment run (Bordt et al. 2023).

``write_report(result, out_dir)`` writes, into one folder that can be copied or zipped as a whole:

- ``density.png``: score densities per method, one panel per model, with a random direction's mean score (the baseline);
- ``summary.png``: mean score per method, grouped by model, with the seed's numbers as markers;
- ``parts_<model>.png``: examples split into tangent and orthogonal parts (each part normalised on its
  own, clipped at the 99.5% quantile, blue-white-red);
- ``tangent_mass.png``: per-pixel tangent mass diag(U Uᵀ), which sums to k;
- ``metrics.json`` and ``report.html`` (inline CSS, relative image links, no external assets).
"""
from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..reports import environment, write_json
from ..runs import atomic_write_text
from ..viz import ABSOLUTE_CMAP, as_image, image_grid, save_figure, to_numpy
from .result import AlignmentResult

__all__ = ["alignment_figures", "write_report", "MAX_EXAMPLES"]

#: Most examples shown in the parts grids and the tangent-mass figure.
MAX_EXAMPLES = 6
#: Most methods per example grid (2 columns each); more are split over several figures.
METHODS_PER_GRID = 3
_TEMPLATE = "align.html.j2"
_RANDOM_GREY = "#8a8a8a"


# --------------------------------------------------------------------------------------------- helpers
def _finite(x: Any) -> np.ndarray:
    a = to_numpy(x).ravel()
    return a[np.isfinite(a)]


def _methods(result: AlignmentResult) -> list[str]:
    """Methods in first-seen order over all models."""
    seen: list[str] = []
    for per_model in result.scores.values():
        for method in per_model:
            if method not in seen:
                seen.append(method)
    return seen


def _method_colours(methods: list[str]) -> dict[str, str]:
    """One colour per method, the same in every figure; "random" is grey."""
    from matplotlib import colormaps

    palette = [colormaps["tab10"](i) for i in range(10)]
    palette = [p for i, p in enumerate(palette) if i != 7]  # tab10's grey is reserved for "random"
    colours: dict[str, str] = {}
    i = 0
    for m in methods:
        if m == "random":
            colours[m] = _RANDOM_GREY
        else:
            r, g, b, _ = palette[i % len(palette)]
            colours[m] = f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"
            i += 1
    return colours


def _safe_name(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", model) or "model"


def _accuracy(result: AlignmentResult, model: str) -> float | None:
    acc = result.metrics.get("models", {}).get(model, {}).get("accuracy")
    return float(acc) if isinstance(acc, (int, float)) else None


def _score_stats(result: AlignmentResult) -> dict[str, dict[str, dict[str, float]]]:
    """model → method → {mean, median, std, n}: from ``metrics["scores"]`` where present, else the tensors."""
    given = result.metrics.get("scores", {}) or {}
    stats: dict[str, dict[str, dict[str, float]]] = {}
    for model, per_model in result.scores.items():
        stats[model] = {}
        for method, scores in per_model.items():
            s = given.get(model, {}).get(method)
            if not s or "mean" not in s:
                a = _finite(scores)
                s = {
                    "mean": float(a.mean()) if a.size else math.nan,
                    "median": float(np.median(a)) if a.size else math.nan,
                    "std": float(a.std()) if a.size else math.nan,
                    "n": int(a.size),
                }
            stats[model][method] = {k: s.get(k, math.nan) for k in ("mean", "median", "std", "n")}
    return stats


# --------------------------------------------------------------------------------------------- figures
_SCORE_LABEL = r"alignment $\|P_T E\| \,/\, \|E\|$"


def _densities(a: np.ndarray, grid: np.ndarray) -> np.ndarray | None:
    """Gaussian KDE of the scores on ``grid``; None when undefined (constant or single scores)."""
    from scipy.stats import gaussian_kde

    if a.size < 2 or float(a.std()) <= 1e-12:
        return None
    try:
        return gaussian_kde(a)(grid)
    except (np.linalg.LinAlgError, ValueError):
        return None


def _density_figure(result: AlignmentResult, colours: dict[str, str]) -> Figure:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    models = list(result.scores)
    grid = np.linspace(0.0, 1.0, 401)
    bins = np.linspace(0.0, 1.0, 51)
    curves = {model: {method: (_finite(s), None) for method, s in per.items()} for model, per in result.scores.items()}
    curves = {model: {method: (a, _densities(a, grid)) for method, (a, _) in per.items()} for model, per in curves.items()}
    # The random method's density is a narrow spike at the baseline (the dashed line says the same); scale the
    # y axis to the explanation methods and let that spike (and constant-score histograms) run off the top.
    peaks = [float(dens.max()) for per in curves.values() for m, (_, dens) in per.items() if dens is not None and m != "random"]
    ymax = 1.2 * max(peaks) if peaks else None

    fig = Figure(figsize=(4.4 * len(models) + 0.4, 3.7), layout="constrained")
    axes = fig.subplots(1, len(models), squeeze=False, sharey=True)[0]
    clipped: set[str] = set()
    handles: dict[str, Any] = {}
    for ax, model in zip(axes, models):
        for method, (a, density) in curves[model].items():
            if a.size == 0:
                continue
            c = colours[method]
            if density is not None:
                ax.fill_between(grid, density, color=c, alpha=0.18, linewidth=0)
                ax.plot(grid, density, color=c, lw=1.8)
                handles.setdefault(method, Line2D([], [], color=c, lw=1.8))
                peak = float(density.max())
            else:  # constant (or single) scores: a KDE is undefined, draw the histogram
                counts, _, _ = ax.hist(a, bins=bins, density=True, color=c, alpha=0.55, edgecolor=c)
                handles.setdefault(method, Patch(color=c, alpha=0.55))
                peak = float(np.max(counts))
            if ymax is not None and peak > ymax:
                clipped.add(method)
            # the mean as a small triangle on the x axis
            ax.plot([float(a.mean())], [0.0], marker="^", ms=8, color=c, clip_on=False, zorder=6,
                    markeredgecolor="white", markeredgewidth=0.6, transform=ax.get_xaxis_transform())
        ax.axvline(result.baseline, color="black", ls="--", lw=1.2)
        acc = _accuracy(result, model)
        ax.set_title(model + (f"  (accuracy {acc:.1%})" if acc is not None and acc <= 1 else ""), fontsize=11)
        ax.set_xlim(0, 1)
        ax.set_xlabel(_SCORE_LABEL)
        ax.grid(alpha=0.25)
    if ymax is not None:
        axes[0].set_ylim(0, ymax)
    axes[0].set_ylabel("density")
    labels = [m + (" (off scale)" if m in clipped else "") for m in handles]
    legend_handles = list(handles.values()) + [Line2D([], [], color="black", ls="--", lw=1.2),
                                               Line2D([], [], color="grey", marker="^", ls="", ms=7)]
    labels += [f"random direction, mean = {result.baseline:.3f}", "mean"]
    fig.legend(legend_handles, labels, loc="outside lower center", ncols=min(len(labels), 5), frameon=False, fontsize=10)
    return fig


def _summary_figure(result: AlignmentResult, stats: dict, colours: dict[str, str]) -> Figure:
    models = list(result.scores)
    methods = _methods(result)
    seed = result.metrics.get("seed_reference") or {}
    fig = Figure(figsize=(max(4.5, 1.2 + 0.55 * len(methods) * len(models) + 0.6 * len(models)), 3.8), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(methods))
    seed_labelled = False
    labelled: set[str] = set()
    top = result.baseline
    for i, model in enumerate(models):
        for j, method in enumerate(methods):
            s = stats[model].get(method)
            if s is None or not math.isfinite(s["mean"]):
                continue
            x = i - 0.4 + width * (j + 0.5)
            std = s["std"] if math.isfinite(s["std"]) else 0.0
            ax.bar(x, s["mean"], width * 0.9, yerr=std, color=colours[method], capsize=2,
                   error_kw={"lw": 0.8, "alpha": 0.6}, label=None if method in labelled else method)
            labelled.add(method)
            ref = seed.get(model, {}).get(method) if isinstance(seed.get(model), dict) else None
            # the value label sits above the error bar and above the seed's diamond, so neither hides it
            label_y = max(s["mean"] + std, float(ref) + 0.025 if isinstance(ref, (int, float)) else 0.0) + 0.015
            ax.text(x, label_y, f"{s['mean']:.2f}", ha="center", va="bottom", fontsize=8)
            top = max(top, label_y + 0.04)
            if isinstance(ref, (int, float)):
                ax.scatter([x], [ref], marker="D", s=36, color="black", edgecolor="white", zorder=5,
                           label=None if seed_labelled else "seed reference")
                seed_labelled = True
                top = max(top, float(ref))
    ax.axhline(result.baseline, color="black", ls="--", lw=1.1, label=f"random direction, mean = {result.baseline:.3f}")
    ax.set_xticks(range(len(models)), models)
    ax.set_ylabel("mean " + _SCORE_LABEL)
    ax.set_ylim(0, min(1.05, top + 0.12) if top <= 1 else top * 1.1)
    ax.grid(axis="y", alpha=0.25)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Mean alignment per method (error bars: ±1 std)", fontsize=11)
    return fig


def _wrap_name(name: str, width: int = 14) -> str:
    """'integrated_gradients_path' → 'integrated_\ngradients_path': long method names on several lines, broken
    after underscores, so neighbouring column titles of the example grids do not overlap."""
    lines, line = [], ""
    for part in re.split(r"(?<=_)", name):
        if line and len(line) + len(part) > width:
            lines.append(line)
            line = ""
        line += part
    return "\n".join(lines + [line])


def _parts_figure(result: AlignmentResult, model: str, m: int, methods: list[str] | None = None) -> Figure:
    parts = result.parts[model]
    methods = list(parts) if methods is None else methods
    kinds = ["image"] + ["signed"] * (2 * len(methods))
    col_titles = ["image"]
    for method in methods:
        name = _wrap_name(method)
        col_titles += [f"{name}\ntangent", f"{name}\northogonal"]
    labels = to_numpy(result.labels).ravel() if result.labels is not None else None
    rows = []
    for i in range(m):
        row: list[Any] = [result.images[i]]
        for method in methods:
            tangent, orthogonal = parts[method]
            row += [tangent[i], orthogonal[i]]
        rows.append(row)
    row_titles = [f"label {int(labels[i])}" for i in range(m)] if labels is not None and labels.size >= m else None
    return image_grid(rows, kinds=kinds, col_titles=col_titles, row_titles=row_titles, shared_scale=False,
                      clip_quantile=0.995,
                      title=f"{model}: tangent part P_T E and orthogonal part E − P_T E "
                            "(each part normalised on its own, 99.5% clip; red +, blue −)",
                      cell_size=1.3)


def _tangent_mass_figure(result: AlignmentResult, m: int) -> Figure:
    mass = [to_numpy(result.tangent_mass[i]) for i in range(m)]
    mass = [x.sum(axis=0) if x.ndim == 3 else x for x in mass]  # channels summed: the map then sums to k
    vmax = max(float(np.quantile(x, 0.995)) for x in mass) or 1.0
    rows = [[result.images[i] for i in range(m)], mass]
    fig = Figure(figsize=(1.6 * m + 1.0, 3.9), layout="constrained")
    axes = fig.subplots(2, m, squeeze=False)
    im = None
    for j in range(m):
        for r in range(2):
            ax = axes[r][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        img = as_image(rows[0][j])
        axes[0][j].imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
        im = axes[1][j].imshow(mass[j], cmap=ABSOLUTE_CMAP, vmin=0.0, vmax=vmax, interpolation="nearest")
        axes[1][j].set_title(f"Σ = {mass[j].sum():.2f}", fontsize=8)
    axes[0][0].set_ylabel("image", fontsize=9)
    axes[1][0].set_ylabel("tangent mass", fontsize=9)
    cb = fig.colorbar(im, ax=[axes[1][j] for j in range(m)], location="right", shrink=0.9, aspect=12)
    cb.ax.tick_params(labelsize=7)
    fig.suptitle(f"Per-pixel tangent mass diag(U Uᵀ) — each map sums to k = {result.k}",
                 fontsize=10)
    return fig


def alignment_figures(result: AlignmentResult, out_dir: Path) -> dict[str, Path]:
    """Write the report's PNGs into ``out_dir``; returns {"density", "summary", "parts_<model>", "tangent_mass"} → path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    colours = _method_colours(_methods(result))
    stats = _score_stats(result)
    paths: dict[str, Path] = {}
    paths["summary"] = save_figure(_summary_figure(result, stats, colours), out_dir / "summary.png")
    paths["density"] = save_figure(_density_figure(result, colours), out_dir / "density.png")
    m = min(MAX_EXAMPLES, int(result.images.shape[0]))
    if m > 0:
        for model in result.parts:
            methods = list(result.parts[model])
            # at most METHODS_PER_GRID methods per figure, so a 1280-px page shows the titles at a readable size:
            # parts_<model>.png, then parts_<model>_2.png, ...
            for c, start in enumerate(range(0, len(methods), METHODS_PER_GRID)):
                name = f"parts_{_safe_name(model)}" + (f"_{c + 1}" if c else "")
                fig = _parts_figure(result, model, m, methods[start:start + METHODS_PER_GRID])
                paths[name] = save_figure(fig, out_dir / f"{name}.png")
        if result.tangent_mass is not None and int(result.tangent_mass.shape[0]) >= m:
            paths["tangent_mass"] = save_figure(_tangent_mass_figure(result, m), out_dir / "tangent_mass.png")
    return paths


# --------------------------------------------------------------------------------------------- HTML
@lru_cache(maxsize=1)
def _environment():
    env = environment()
    env.filters["num"] = _fmt_num
    return env


def _fmt_num(v: Any, digits: int = 3) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def _pretty_key(key: str) -> str:
    """"tangent_seconds_per_image" → "tangent time per image"."""
    key = re.sub(r"_seconds(?=_|$)", " time", str(key))
    return key.replace("_", " ")


def _fmt_seconds(v: float) -> str:
    if v < 1:
        return f"{v * 1000:.1f} ms"
    if v < 60:
        return f"{v:.1f} s"
    if v < 3600:
        return f"{int(v // 60)} min {v % 60:.0f} s"
    return f"{int(v // 3600)} h {int(v % 3600 // 60)} min"


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flatten(v, key + " / ")
        else:
            out.append((key, v))
    return out


def _fmt_timing(v: Any) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return _fmt_seconds(float(v))  # timings are seconds by convention
    return str(v)


def _mix(hex_from: str, hex_to: str, t: float) -> str:
    t = min(1.0, max(0.0, t))
    a = [int(hex_from[i:i + 2], 16) for i in (1, 3, 5)]
    b = [int(hex_to[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(a, b))


def _score_cell(v: float) -> dict[str, str]:
    """Background for a score in [0, 1]: white → deep blue."""
    if not math.isfinite(v):
        return {"bg": "#ffffff", "fg": "#222"}
    return {"bg": _mix("#f3f7fd", "#1e4e9c", v), "fg": "#ffffff" if v > 0.55 else "#14213d"}


def _ratio_cell(r: float) -> dict[str, str]:
    """Background for a ratio to the baseline: grey at 1× (random), green as it grows (log scale, 10× = full)."""
    if not math.isfinite(r) or r <= 0:
        return {"bg": "#ffffff", "fg": "#222"}
    t = math.log10(r) if r > 1 else 0.0
    if r < 1:
        return {"bg": "#fbe9e7", "fg": "#8a1c0f"}
    return {"bg": _mix("#eeeeee", "#1b7a43", t), "fg": "#ffffff" if t > 0.55 else "#1d2b21"}


def _headline(stats: dict) -> str | None:
    """"Robust model's gradients are 2.1× more aligned than the standard model's", when both models exist."""
    if "standard" not in stats or "robust" not in stats:
        return None
    common = [m for m in stats["standard"] if m in stats["robust"] and m != "random"]
    if not common:
        return None
    method = "gradient" if "gradient" in common else common[0]
    s, r = stats["standard"][method]["mean"], stats["robust"][method]["mean"]
    if not (math.isfinite(s) and math.isfinite(r)) or s <= 0 or r <= 0:
        return None
    what = "gradients" if method == "gradient" else f"{method} explanations"
    ratio = r / s
    if round(ratio, 2) == 1.0:
        return f"Robust and standard model's {what} are about equally aligned ({r:.3f} vs {s:.3f})"
    if ratio >= 1:
        return f"Robust model's {what} are {_times(ratio)} more aligned than the standard model's"
    return f"Robust model's {what} are {_times(1 / ratio)} less aligned than the standard model's"


def _times(ratio: float) -> str:
    """1.03 → '1.03×', 2.14 → '2.1×': two decimals near 1, where one would round 1.03 to '1.0×'."""
    return f"{ratio:.2f}×" if ratio < 1.995 else f"{ratio:.1f}×"


def _unreliable(headline: str | None, warnings: Any) -> str | None:
    """A report on inputs that failed their checks never states its result confidently."""
    if not warnings:
        return headline
    n = len(warnings)
    return f"Unreliable: the inputs failed {n} check{'s' if n != 1 else ''}, so this run supports no conclusion"


def _fmt_dataset_value(key: str, v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "×".join(map(str, v))
    if key in ("labeler_accuracy", "acceptance_rate") and isinstance(v, float):
        return f"{v:.1%}"
    return _fmt_num(v)


def _class_fractions(fractions: Any) -> list[dict[str, str]]:
    """Per class: label, percentage and a bar height in px (48 = the largest class), for the report's small bars."""
    if not isinstance(fractions, (list, tuple)) or not fractions:
        return []
    top = max(float(f) for f in fractions) or 1.0
    return [{"label": str(i), "pct": f"{float(f):.0%}", "height": f"{48 * float(f) / top:.0f}"} for i, f in enumerate(fractions)]


def _rank_note(rank: Any) -> str:
    if isinstance(rank, dict) and isinstance(rank.get("min"), (int, float)) and isinstance(rank.get("max"), (int, float)):
        if rank["min"] == rank["max"]:
            return f"tangent space rank {rank['max']} for every image"
        return f"tangent space rank {rank['min']}–{rank['max']} (mean {rank.get('mean', math.nan):.2f})"
    return "tangent space rank"


def _context(result: AlignmentResult, figures: dict[str, Path]) -> dict[str, Any]:
    metrics = result.metrics
    stats = _score_stats(result)
    baseline = result.baseline  # the expectation E‖P_T e‖/‖e‖ of a random direction; the ratios use it
    # √(k/d), the root mean square (the research's figure); older metrics files lack it
    baseline_rms = float(metrics.get("baseline_rms") or math.sqrt(result.k / result.d))
    seed = metrics.get("seed_reference") or {}
    models = list(result.scores)
    methods = _methods(result)
    colours = _method_colours(methods)
    models_info = metrics.get("models") or {}
    dataset = metrics.get("dataset") or {}

    cards: list[dict[str, str]] = [
        {"label": "manifold dimension k", "value": f"{result.k:,}", "sub": _rank_note(metrics.get("tangent_rank"))},
        {"label": "input dimension d", "value": f"{result.d:,}", "sub": "pixels × channels"},
        {"label": "random baseline (mean)", "value": f"{baseline:.3f}",
         "sub": f"a random direction's expected score; √(k/d) = {baseline_rms:.3f} is its RMS"},
    ]
    for model in models:
        acc = models_info.get(model, {}).get("accuracy")
        if isinstance(acc, (int, float)):
            cards.append({"label": f"{model} accuracy", "value": f"{acc:.2%}" if acc <= 1 else f"{acc:.2f}",
                          "sub": "test set"})
    for model in models:
        method = "gradient" if "gradient" in stats[model] else next(iter(stats[model]), None)
        if method is None:
            continue
        mean = stats[model][method]["mean"]
        ref = seed.get(model, {}).get(method) if isinstance(seed.get(model), dict) else None
        sub = f"{mean / baseline:.1f}× random" if baseline > 0 and math.isfinite(mean) else ""
        if isinstance(ref, (int, float)):
            sub += f" · seed {ref:.3f} ({mean - ref:+.3f})"
        cards.append({"label": f"{model} · mean {method} score", "value": _fmt_num(mean), "sub": sub, "accent": "1"})

    table = []
    for model in models:
        for method in methods:
            s = stats[model].get(method)
            if s is None:
                continue
            ratio = s["mean"] / baseline if baseline > 0 else math.nan
            ref = seed.get(model, {}).get(method) if isinstance(seed.get(model), dict) else None
            table.append({
                "model": model, "method": method, "colour": colours[method],
                "mean": _fmt_num(s["mean"]), "median": _fmt_num(s["median"]), "std": _fmt_num(s["std"]),
                "n": _fmt_num(s["n"]) if isinstance(s["n"], (int, float)) else "–",
                "ratio": f"{ratio:.2f}×" if math.isfinite(ratio) else "–",
                "seed": f"{ref:.3f}" if isinstance(ref, (int, float)) else "",
                "mean_style": _score_cell(s["mean"]), "median_style": _score_cell(s["median"]),
                "ratio_style": _ratio_cell(ratio),
            })

    model_keys: list[str] = []
    for info in models_info.values():
        for k, v in (info or {}).items():
            if not isinstance(v, (dict, list)) and k not in model_keys:
                model_keys.append(k)
    model_rows = []
    for model, info in models_info.items():
        cells = []
        for k in model_keys:
            v = (info or {}).get(k)
            if v is None:
                cells.append("")
            elif k == "accuracy" and isinstance(v, (int, float)) and v <= 1:
                cells.append(f"{v:.2%}")
            elif "second" in k and isinstance(v, (int, float)):
                cells.append(_fmt_seconds(float(v)))
            else:
                cells.append(_fmt_num(v))
        model_rows.append({"model": model, "cells": cells})

    config = metrics.get("config")
    command = None
    if isinstance(config, dict):
        command = config.get("command")
    command = command or metrics.get("command")
    name = lambda key: figures[key].name if key in figures else None  # noqa: E731
    n_scores = max((int(s["n"]) for per in stats.values() for s in per.values()
                    if isinstance(s["n"], (int, float)) and math.isfinite(s["n"])), default=0)
    return {
        "title": f"Alignment report · {dataset.get('name', 'dataset')}" if dataset else "Alignment report",
        "headline": _unreliable(_headline(stats), metrics.get("warnings")),
        "subtitle": (f"How much of each explanation lies in the data manifold's tangent space — "
                     f"{n_scores:,} test images, {len(models)} model{'s' if len(models) != 1 else ''}, "
                     f"{len(methods)} methods"),
        # findings are claims; on inputs that failed their checks they are withheld (metrics.json keeps them)
        "findings": [] if metrics.get("warnings") else [str(f) for f in (metrics.get("findings") or [])],
        "cards": cards,
        "k": result.k, "d": result.d, "baseline": f"{baseline:.3f}", "baseline_rms": f"{baseline_rms:.3f}",
        "dataset": [(_pretty_key(k), _fmt_dataset_value(k, v)) for k, v in dataset.items()
                    if not isinstance(v, dict) and k not in ("class_fractions", "checks", "warnings")],
        "methods": [{"name": m, "colour": colours[m]} for m in methods],
        "table": table,
        "model_keys": [_pretty_key(k) for k in model_keys],
        "model_rows": model_rows,
        "summary_png": name("summary"),
        "density_png": name("density"),
        "parts": [{"model": m, "pngs": [f.name for k, f in figures.items()
                                        if k == f"parts_{_safe_name(m)}" or k.startswith(f"parts_{_safe_name(m)}_")]}
                  for m in result.parts if f"parts_{_safe_name(m)}" in figures],
        "tangent_mass_png": name("tangent_mass"),
        "generative": [(_pretty_key(k), _fmt_seconds(float(v)) if "second" in k and isinstance(v, (int, float)) else _fmt_num(v))
                       for k, v in (metrics.get("generative") or {}).items() if not isinstance(v, (dict, list))],
        "timings": [(_pretty_key(k), _fmt_timing(v)) for k, v in _flatten(metrics.get("timings") or {})],
        "command": str(command) if command else None,
        "has_seed": any(isinstance(v, dict) and v for v in seed.values()),
        "warnings": [str(w) for w in (metrics.get("warnings") or [])],
        "checks": [str(c) for c in (metrics.get("checks") or [])],
        "class_fractions": _class_fractions(dataset.get("class_fractions")),
        "config": json.dumps(config, indent=2, default=str, ensure_ascii=False) if config else None,
    }


def write_report(result: AlignmentResult, out_dir: Path, *, metrics_file: bool = True) -> Path:
    """Write the figures, ``metrics.json`` (unless ``metrics_file=False``: an experiment run writes it once, through
    the contract's encoder) and ``report.html`` into ``out_dir``; returns the HTML's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = alignment_figures(result, out_dir)
    if metrics_file:
        write_json(result.metrics, out_dir / "metrics.json")
    html = _environment().get_template(_TEMPLATE).render(**_context(result, figures))
    path = out_dir / "report.html"
    atomic_write_text(path, html)
    return path
