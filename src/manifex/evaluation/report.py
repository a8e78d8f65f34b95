"""The evaluation report: a methods × metrics table (direction of "better", per-example spread), a rank plot, the
three deletion curves side by side with the perturbed images' distance to the manifold, and the checks."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..reports import render, write_json
from ..runs import atomic_write_bytes
from .bridge import MANIFEX_METRICS, MetricInfo, metric_info

__all__ = ["summarize", "write_evaluation_report", "columns", "column_info"]

_CURVES = {"black": "BlackDeletion", "road": "ROADDeletion", "manifold": "ManifoldDeletion"}
_KIND_LABEL = {"black": "black (pixel-flipping)", "road": "ROAD (noisy linear imputation)", "manifold": "in-filled from the generator"}
_EXTRA = {
    "BlackDeletion": MetricInfo("BlackDeletion", "manifold", False, False, "area under the deletion curve with removed "
                                "pixels set to black (the same curve as ManifoldDeletion, off the manifold)", "manifex"),
    "ROADDeletion": MetricInfo("ROADDeletion", "manifold", False, False, "area under the deletion curve with removed pixels "
                               "imputed as in ROAD (noisy linear imputation)", "manifex"),
}


def column_info(name: str) -> MetricInfo:
    return _EXTRA.get(name) or metric_info(name)


def columns(metrics: Sequence[str]) -> list[str]:
    """The table's columns: every metric, the deletion curve as its three versions (black, ROAD, in-filled)."""
    out: list[str] = []
    for m in metrics:
        out += ["BlackDeletion", "ROADDeletion", "ManifoldDeletion"] if m == "ManifoldDeletion" else [m]
    return out


def _stats(values: Sequence[Any]) -> dict[str, Any]:
    v = np.array([float(x) for x in values if x is not None and math.isfinite(float(x))], dtype=np.float64)
    if not len(v):
        return {"mean": None, "sd": None, "median": None, "q1": None, "q3": None, "n": 0}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "median": float(np.median(v)),
            "q1": float(np.quantile(v, 0.25)), "q3": float(np.quantile(v, 0.75)), "n": int(len(v))}


def _ranks(means: dict[str, float | None], higher: bool) -> dict[str, int | None]:
    ok = [(m, v) for m, v in means.items() if v is not None]
    order = sorted(ok, key=lambda t: -t[1] if higher else t[1])
    out: dict[str, int | None] = {m: None for m in means}
    for i, (m, _) in enumerate(order):
        out[m] = i + 1
    return out


def summarize(records: list[dict], metrics: Sequence[str], *, reference_distance: Any = None) -> dict[str, Any]:
    """Per column and method: mean, sd, median, quartiles, n; ranks (1 = best in the metric's direction); whether
    the ranking of methods by deletion changes between black, ROAD and the in-fill (Kendall τ, top method); the
    perturbed images' distance to the manifold against the real images' (``reference_distance``, (n,))."""
    from scipy.stats import kendalltau

    methods = [r["method"] for r in records]
    cols = columns(metrics)
    table: dict[str, dict[str, dict]] = {}
    ranks: dict[str, dict[str, int | None]] = {}
    direction: dict[str, str] = {}
    for c in cols:
        info = column_info(c)
        direction[c] = "higher" if info.higher_is_better else "lower"
        table[c] = {r["method"]: _stats(r["scores"].get(c, [])) for r in records}
        ranks[c] = _ranks({m: s["mean"] for m, s in table[c].items()}, info.higher_is_better)
    out: dict[str, Any] = {"methods": methods, "columns": cols, "direction": direction, "table": table, "ranks": ranks}
    if "ManifoldDeletion" in metrics and len(methods) >= 2:
        change = {}
        kinds = list(_CURVES)
        for i, a in enumerate(kinds):
            for b in kinds[i + 1 :]:
                ra = [ranks[_CURVES[a]][m] for m in methods]
                rb = [ranks[_CURVES[b]][m] for m in methods]
                tau = kendalltau(ra, rb).statistic if None not in ra + rb else float("nan")
                change[f"{a} vs {b}"] = {"kendall_tau": float(tau), "same_order": ra == rb}
        top = {k: min(methods, key=lambda m: ranks[_CURVES[k]][m] or 1e9) for k in kinds}
        out["ranking_change"] = {"pairs": change, "top": top, "changes": len({tuple(ranks[_CURVES[k]][m] for m in methods)
                                                                               for k in kinds}) > 1}
    if records and records[0].get("distance"):
        dist = {}
        for k in _CURVES:
            curves = np.array([r["distance"][k]["mean"] for r in records if k in r.get("distance", {})])
            if len(curves):
                dist[k] = curves.mean(0).tolist()
        out["distance"] = dist
        prob = {k: {r["method"]: r["curves"][k]["mean"] for r in records if k in r.get("curves", {})} for k in _CURVES}
        out["curves"] = prob
        if reference_distance is not None:
            ref = np.asarray(reference_distance, dtype=np.float64)
            out["reference_distance"] = _stats(ref.tolist())
            hi = float(np.quantile(ref, 0.95))
            out["reference_distance"]["q95"] = hi
            out["manifold_check"] = {k: {"max_mean_distance": float(max(v)), "within_reference": float(max(v)) <= hi}
                                     for k, v in dist.items()}
    return out


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    a = abs(v)
    return f"{v:.{digits}g}" if a and (a < 1e-2 or a >= 1e4) else f"{v:.{digits}f}"


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def rank_figure(summary: dict) -> bytes:
    """Rank of every method (1 = best) per metric, one line per method."""
    from matplotlib.figure import Figure

    cols, methods = summary["columns"], summary["methods"]
    fig = Figure(figsize=(max(6, 1.1 * len(cols)), 3.6), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    for i, m in enumerate(methods):
        r = [summary["ranks"][c][m] if summary["ranks"][c][m] is not None else np.nan for c in cols]
        ax.plot(range(len(cols)), r, marker="o", label=m, color=f"C{i % 10}")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([f"{c}\n({'↑' if summary['direction'][c] == 'higher' else '↓'})" for c in cols], fontsize=7)
    ax.set_yticks(range(1, len(methods) + 1))
    ax.invert_yaxis()
    ax.set_ylabel("rank (1 = best)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return _png(fig)


def curves_figure(summary: dict, fractions: Sequence[float]) -> bytes:
    """The three deletion curves side by side (mean target probability per method), and the perturbed images'
    mean distance to the manifold per removal against the real images' distance."""
    from matplotlib.figure import Figure

    kinds = [k for k in _CURVES if summary.get("curves", {}).get(k)]
    fig = Figure(figsize=(3.3 * (len(kinds) + 1), 3.2), dpi=110)
    f = np.asarray(fractions)
    for j, k in enumerate(kinds):
        ax = fig.add_subplot(1, len(kinds) + 1, j + 1)
        for i, (m, c) in enumerate(summary["curves"][k].items()):
            ax.plot(f, c, label=m, color=f"C{i % 10}")
        ax.set_title(_KIND_LABEL[k], fontsize=9)
        ax.set_xlabel("fraction of pixels removed")
        if j == 0:
            ax.set_ylabel("p(target)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    ax = fig.add_subplot(1, len(kinds) + 1, len(kinds) + 1)
    for i, k in enumerate(kinds):
        if k in summary.get("distance", {}):
            ax.plot(f, summary["distance"][k], label=k, color=["#333333", "#d9480f", "#1e4e9c"][i % 3])
    ref = summary.get("reference_distance")
    if ref and ref.get("mean") is not None:
        ax.axhspan(ref["q1"], ref["q3"], color="#1b7a43", alpha=0.15, label="real images (IQR)")
        ax.axhline(ref["q95"], color="#1b7a43", ls="--", lw=1, label="real images (95%)")
    ax.set_title("distance to the manifold", fontsize=9)
    ax.set_xlabel("fraction of pixels removed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    return _png(fig)


def evaluation_checks(summary: dict, checks: Sequence[str]) -> list[str]:
    """The run's checks plus the manifold check of the perturbed images (FAILED when the in-fill leaves the manifold)."""
    checks = list(checks)
    mc = summary.get("manifold_check")
    if mc:
        ref = summary["reference_distance"]
        for k, v in mc.items():
            checks.append(f"{'' if v['within_reference'] or k != 'manifold' else 'FAILED: '}{_KIND_LABEL[k]}: perturbed images at "
                          f"mean distance ≤ {v['max_mean_distance']:.3f} from the manifold (real images: median "
                          f"{ref['median']:.3f}, 95% ≤ {ref['q95']:.3f}); {'within' if v['within_reference'] else 'beyond'} "
                          "the real images' distance")
    return checks


def evaluation_metrics(records: list[dict], summary: dict, *, config: Any, model_info: dict, data_info: dict,
                       checks: Sequence[str] = (), seconds: float | None = None) -> dict[str, Any]:
    """The content of ``metrics.json``: summary, options, model, data, checks, warnings, fractions, per-method records."""
    checks = evaluation_checks(summary, checks)
    warnings = [c[8:] for c in checks if c.startswith("FAILED: ")]
    fractions = [i / config.curve_steps for i in range(config.curve_steps)]
    return {"summary": summary, "options": config.to_dict(), "model": model_info, "data": data_info, "checks": checks,
            "warnings": warnings, "seconds": seconds, "fractions": fractions, "records": [dict(r) for r in records]}


def write_evaluation_report(records: list[dict], summary: dict, out_dir: str | Path, *, config: Any, model_info: dict,
                            data_info: dict, checks: Sequence[str] = (), command: str | None = None,
                            seconds: float | None = None, metrics_file: bool = True) -> Path:
    """``rank.png``, ``curves.png``, ``report.html`` (and ``metrics.json`` unless ``metrics_file=False``: the experiment
    contract writes it) in ``out_dir``; returns the HTML path."""
    out = Path(out_dir)
    metrics = evaluation_metrics(records, summary, config=config, model_info=model_info, data_info=data_info,
                                 checks=checks, seconds=seconds)
    options, fractions, checks, warnings = metrics["options"], metrics["fractions"], metrics["checks"], metrics["warnings"]
    if metrics_file:
        write_json(metrics, out / "metrics.json")
    atomic_write_bytes(out / "rank.png", rank_figure(summary))
    has_curves = bool(summary.get("curves"))
    if has_curves:
        atomic_write_bytes(out / "curves.png", curves_figure(summary, fractions))
    head = [{"name": c, "arrow": "↑" if summary["direction"][c] == "higher" else "↓"} for c in summary["columns"]]
    rows = []
    for m in summary["methods"]:
        cells = []
        for c in summary["columns"]:
            s = summary["table"][c][m]
            cells.append({"mean": _fmt(s["mean"]), "sd": _fmt(s["sd"], 2), "iqr": f"{_fmt(s['q1'], 2)}–{_fmt(s['q3'], 2)}",
                          "rank": summary["ranks"][c][m], "best": summary["ranks"][c][m] == 1})
        rows.append({"method": m, "cells": cells})
    legend = [{"name": c, "category": column_info(c).category, "direction": "higher" if column_info(c).higher_is_better else "lower",
               "what": column_info(c).description, "source": column_info(c).source} for c in summary["columns"]]
    findings = []
    rc = summary.get("ranking_change")
    if rc:
        top = rc["top"]
        findings.append("The ranking of methods by deletion " + ("changes" if rc["changes"] else "does not change")
                        + f" when the removed pixels stay on the manifold: best by black deletion {top['black']}, by ROAD "
                        f"{top['road']}, by the in-filled deletion {top['manifold']} (Kendall τ black vs in-filled "
                        f"{rc['pairs']['black vs manifold']['kendall_tau']:.2f}).")
    mc = summary.get("manifold_check")
    if mc:
        findings.append(f"Black deletion takes the images to distance {mc['black']['max_mean_distance']:.2f} from the manifold, "
                        f"the in-fill to {mc['manifold']['max_mean_distance']:.2f}; real images lie at "
                        f"{summary['reference_distance']['median']:.2f} (median).")
    return render("evaluate.html.j2", out / "report.html", title="manifex · evaluate",
                  headline="Which explanation to trust: methods × metrics", subtitle=(
                      f"{model_info.get('classifier')} on {config.dataset} · {model_info.get('images scored')} test images · "
                      f"{len(summary['methods'])} methods · {len(summary['columns'])} scores"),
                  findings=findings, head=head, rows=rows, legend=legend, has_curves=has_curves, options=options,
                  model=model_info, data=data_info, checks=checks, warnings=warnings, command=command, seconds=seconds)
