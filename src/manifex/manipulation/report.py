"""HTML report and ``metrics.json`` of a manipulation campaign (and of a β-smoothing sweep)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..reports import render, write_json
from .campaign import CampaignSummary

__all__ = ["write_attack_report", "write_smooth_report", "smooth_figure", "attack_metrics", "smooth_metrics"]

#: Most per-pair overview figures embedded in the page (all are in units/<pair id>/figure.png).
MAX_FIGURES = 12


def _fmt(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _budget_card(attack: dict) -> dict:
    eps, norm = attack.get("epsilon"), attack.get("norm", "linf")
    if eps is None:
        return {"label": "budget", "value": "none", "sub": "unbounded perturbation (clipped to [0, 1])"}
    if norm == "linf":
        return {"label": "budget", "value": f"{eps * 255:.3g}/255", "sub": "L∞ bound per pixel"}
    return {"label": "budget", "value": f"{eps:.3g}", "sub": f"{norm.upper()} bound (pixels in [0, 1])"}


def _readable(model_info: dict) -> dict:
    """Model facts for the footer: accuracy as a percentage, booleans as yes/no."""
    out = {}
    for k, v in model_info.items():
        if k == "test accuracy" and isinstance(v, float):
            v = f"{v:.1%}"
        elif isinstance(v, bool):
            v = "yes" if v else "no"
        elif isinstance(v, dict):
            v = ", ".join(f"{a} {b}" for a, b in v.items())
        out[k] = v
    return out


def write_attack_report(
    summary: CampaignSummary,
    out_dir: str | Path,
    *,
    method: str,
    model_info: dict | None = None,
    sweep: list[dict] | None = None,
    sweep_png: str | None = None,
    command: str | None = None,
    checks: list[str] | None = None,
    warnings: list[str] | None = None,
    metrics_file: bool = True,
) -> Path:
    """Write ``metrics.json`` and ``report.html`` for a finished campaign; returns the HTML path.

    ``sweep`` (records of :func:`manifex.manipulation.defence.robustness_sweep`) and ``sweep_png`` add the
    β-smoothing section. ``checks`` (what was verified about the inputs) fill the report's checks box;
    ``warnings`` (failed checks) go to the top of the report and to ``metrics.json`` ``warnings``.
    ``metrics_file=False``: write only the report (the experiment contract writes ``metrics.json`` itself, from
    :func:`attack_metrics`).
    """
    out = Path(out_dir)
    m = summary.means
    warnings = list(warnings or [])
    if metrics_file:
        write_json(attack_metrics(summary, method=method, model_info=model_info, sweep=sweep, checks=checks,
                                  warnings=warnings), out / "metrics.json")
    kept = summary.top1_kept_rate
    headline = (
        f"{method}: similarity to the target map {_fmt(m.get('pcc_orig_target'), 2)} → {_fmt(m.get('pcc_manip_target'), 2)} "
        f"(PCC) with the prediction kept for {kept * 100:.0f}% of pairs" if kept is not None else f"{method}: no finished pairs"
    )
    cards = [
        {"label": "pairs", "value": summary.n_pairs, "sub": f"{summary.n_new} new, {summary.n_skipped} resumed"},
        {"label": "PCC to target", "value": f"{_fmt(m.get('pcc_orig_target'), 2)} → {_fmt(m.get('pcc_manip_target'), 2)}",
         "sub": "before → after (mean)", "accent": True},
        {"label": "SSIM to target", "value": f"{_fmt(m.get('ssim_orig_target'), 2)} → {_fmt(m.get('ssim_manip_target'), 2)}",
         "sub": "before → after (mean)"},
        {"label": "top-1 kept", "value": "n/a" if kept is None else f"{kept * 100:.0f}%", "sub": "prediction unchanged"},
        {"label": "max |Δp|", "value": _fmt(m.get("max_dp")), "sub": "mean over pairs"},
        {"label": "L∞ perturbation", "value": "n/a" if m.get("linf") is None else f"{m['linf'] * 255:.1f}/255",
         "sub": f"L2 {_fmt(m.get('l2'), 2)} (pixels in [0, 1])"},
        _budget_card((summary.settings or {}).get("attack", {})),
    ]
    rows = [
        {"id": r["pair_id"], "classes": f"{r.get('explained_class')} / {r.get('class_target_image')}",
         "before": _fmt(r.get("pcc_orig_target"), 2), "after": _fmt(r.get("pcc_manip_target"), 2),
         "ssim": _fmt(r.get("ssim_manip_target"), 2), "dp": _fmt(r.get("max_dp")),
         "kept": "yes" if r.get("top1_kept") else "NO", "linf": f"{(r.get('linf') or 0) * 255:.1f}",
         "iters": r.get("iterations"), "figure": (r.get("files") or {}).get("figure")}
        for r in summary.records
    ]
    figures = [r for r in rows if r["figure"] and (out / r["figure"]).is_file()][:MAX_FIGURES]
    return render(
        "attack.html.j2", out / "report.html", title=f"Manipulation report · {method}", headline=headline,
        subtitle=f"{summary.n_pairs} (original, target) pairs; explanation method {method}",
        findings=[], cards=cards, rows=rows, figures=figures, sweep=sweep or [], sweep_png=sweep_png,
        settings=summary.settings, model=_readable(model_info or {}), command=command, checks=list(checks or []),
        warnings=warnings,
    )


def attack_metrics(summary: CampaignSummary, *, method: str, model_info: dict | None = None, sweep: list[dict] | None = None,
                   checks: list[str] | None = None, warnings: list[str] | None = None) -> dict[str, Any]:
    """The content of a campaign's ``metrics.json``: the summary (counts, means, settings), the method, the model,
    the β sweep if any, the checks and the warnings."""
    return {**summary.to_dict(), "method": method, "model": model_info or {}, "sweep": sweep or [],
            "checks": list(checks or []), "warnings": list(warnings or [])}


def _beta_label(b: float) -> str:
    return "ReLU" if b == float("inf") else f"β={b:g}"


def smooth_metrics(sweep: list[dict], *, method: str, accuracy: dict[float, float], model_info: dict | None = None,
                   budget: float | None = None, checks: list[str] | None = None,
                   warnings: list[str] | None = None) -> dict[str, Any]:
    """The content of a β sweep's ``metrics.json``: accuracy and sweep records keyed by "β=10" / "ReLU"."""
    return {"method": method, "accuracy": {_beta_label(b): a for b, a in accuracy.items()},
            "sweep": [{**r, "beta": _beta_label(r["beta"])} for r in sweep], "model": model_info or {},
            "budget_linf": budget, "checks": list(checks or []), "warnings": list(warnings or [])}


def write_smooth_report(
    sweep: list[dict],
    out_dir: str | Path,
    *,
    method: str,
    accuracy: dict[float, float],
    explanations_png: str | None,
    curves_png: str | None,
    model_info: dict | None = None,
    command: str | None = None,
    budget: float | None = None,
    checks: list[str] | None = None,
    warnings: list[str] | None = None,
    metrics_file: bool = True,
) -> Path:
    """Write ``metrics.json`` and ``report.html`` for a β-smoothing sweep; returns the HTML path.

    ``budget``: the sweep's L∞ budget in pixel units of [0, 1] (None: unbounded), stated in the report.
    ``checks``/``warnings`` as in :func:`write_attack_report`; ``metrics_file=False``: the report only
    (:func:`smooth_metrics` is the content of ``metrics.json``).
    """
    out = Path(out_dir)
    label = _beta_label
    warnings = list(warnings or [])
    if metrics_file:
        write_json(smooth_metrics(sweep, method=method, accuracy=accuracy, model_info=model_info, budget=budget,
                                  checks=checks, warnings=warnings), out / "metrics.json")
    rows = [{"beta": label(r["beta"]), **{k: fmt(r.get(k)) for k, _, fmt in _SMOOTH_COLUMNS}} for r in sweep]
    budget_text = "unbounded" if budget is None else f"L∞ ≤ {budget * 255:.3g}/255"
    relu = next((r for r in sweep if r["beta"] == float("inf")), None)
    smallest = min((r for r in sweep if r["beta"] != float("inf")), key=lambda r: r["beta"], default=None)
    headline = f"β-smoothing against manipulation of {method} explanations"
    if relu and smallest and relu.get("pcc_gain") is not None and smallest.get("pcc_gain") is not None:
        cost = ""
        if relu.get("accuracy") is not None and smallest.get("accuracy") is not None:
            cost = f" (accuracy {relu['accuracy'] * 100:.1f}% → {smallest['accuracy'] * 100:.1f}%)"
        headline = (f"{method}: the attack raises the PCC to the target by {relu['pcc_gain']:+.2f} on the ReLU model "
                    f"and by {smallest['pcc_gain']:+.2f} at β={smallest['beta']:g}{cost}")
    cards = [{"label": f"accuracy {label(b)}", "value": f"{a * 100:.1f}%", "sub": "test set", "accent": b == float("inf")}
             for b, a in accuracy.items()]
    if sweep:
        cards.append({"label": "attack budget", "value": "none" if budget is None else f"{budget * 255:.3g}/255",
                      "sub": "L∞, the same for every model" if budget is not None else "unbounded perturbation"})
    columns = [{"key": k, "label": lab} for k, lab, _ in _SMOOTH_COLUMNS]
    return render("smooth.html.j2", out / "report.html", title=f"β-smoothing report · {method}", headline=headline,
                  subtitle=f"softplus(β) in place of every ReLU; {len(sweep)} models compared"
                           + (f"; every attack within the same budget ({budget_text})" if sweep else ""),
                  findings=[], cards=cards, rows=rows, columns=columns, explanations_png=explanations_png,
                  curves_png=curves_png, model=_readable(model_info or {}), command=command, budget=budget_text,
                  checks=list(checks or []), warnings=warnings)


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{v * 100:.1f}%"


def _per255(v: Any) -> str:
    return "n/a" if v is None else f"{v * 255:.1f}"


#: The smooth report's table: (record key, column header, formatter). L∞ in /255 like everywhere else.
_SMOOTH_COLUMNS = (
    ("pcc_orig_target", "PCC before", lambda v: _fmt(v, 2)),
    ("pcc_manip_target", "PCC after", lambda v: _fmt(v, 2)),
    ("pcc_gain", "PCC gain", lambda v: "n/a" if v is None else f"{v:+.2f}"),
    ("max_dp", "max |Δp|", _fmt),
    ("top1_kept_rate", "top-1 kept", lambda v: "n/a" if v is None else f"{v * 100:.0f}%"),
    ("linf", "L∞ (/255)", _per255),
    ("curvature", "curvature |λmax|", lambda v: "n/a" if v is None else f"{v:.3g}"),
    ("accuracy", "test accuracy", _pct),
)


def smooth_figure(sweep: list[dict], path: str | Path | None = None):
    """The β sweep in three panels that share the β axis, one quantity each so no two curves overlap:
    attack success (PCC to the target before and after, with the gain annotated), test accuracy, and
    curvature (mean |λ_max| of the input Hessian, log axis). The ReLU model sits at the right end; its
    curvature is 0 almost everywhere and is noted, not plotted. Returns the Figure (saved as PNG at ``path``).
    """
    from matplotlib.figure import Figure

    from ..viz import save_figure

    inf = float("inf")
    def beta(r: dict) -> float:  # records from memory (floats) or from sweep.json ("inf" / "ReLU" / "β=10")
        b = r["beta"]
        if isinstance(b, str):
            b = b.replace("β=", "").strip()
            return inf if b.lower() in ("inf", "infinity", "relu") else float(b)
        return float(b)

    rows = sorted(({**r, "beta": beta(r)} for r in sweep), key=lambda r: r["beta"])  # smoothest first, ReLU last
    xs = list(range(len(rows)))
    names = ["ReLU" if r["beta"] == inf else f"β = {r['beta']:g}" for r in rows]
    fig = Figure(figsize=(11.5, 3.5), layout="constrained")
    ax_pcc, ax_acc, ax_curv = fig.subplots(1, 3)

    def series(key):
        return [(x, r[key]) for x, r in zip(xs, rows) if r.get(key) is not None]

    before, after = series("pcc_orig_target"), series("pcc_manip_target")
    if before:
        ax_pcc.plot(*zip(*before), "o:", color="#888888", label="before the attack")
    if after:
        ax_pcc.plot(*zip(*after), "o-", color="#c0392b", lw=2, label="after the attack")
    for x, r in zip(xs, rows):
        if r.get("pcc_gain") is not None and r.get("pcc_manip_target") is not None:
            ax_pcc.annotate(f"{r['pcc_gain']:+.2f}", (x, r["pcc_manip_target"]), textcoords="offset points",
                            xytext=(0, 7), ha="center", fontsize=9, color="#c0392b")
    ax_pcc.set_title("attack success: PCC to the target map", fontsize=11)
    ax_pcc.legend(fontsize=9, frameon=False, loc="lower left")
    ax_pcc.margins(y=0.25)

    acc = series("accuracy")
    if acc:
        ax_acc.plot(*zip(*acc), "s-", color="#2e7d32", lw=2)
        for x, a in acc:
            ax_acc.annotate(f"{a:.1%}", (x, a), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=9)
    ax_acc.set_title("test accuracy", fontsize=11)
    ax_acc.margins(y=0.3)
    ax_acc.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}" if abs(v * 100 - round(v * 100)) < 1e-6 else f"{v:.1%}")

    curv = [(x, c) for x, c in series("curvature") if rows[x]["beta"] != inf and c > 0]
    if curv:
        ax_curv.plot(*zip(*curv), "^-", color="#e67e22", lw=2)
        ax_curv.set_yscale("log")
        for x, c in curv:
            ax_curv.annotate(f"{c:.3g}", (x, c), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=9)
        ax_curv.margins(y=0.3)
        ax_curv.yaxis.set_major_formatter(lambda v, _: f"{v:g}")
        ax_curv.yaxis.set_minor_formatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else "")
    if rows and rows[-1]["beta"] == inf:
        ax_curv.text(0.97, 0.5, "ReLU:\n∇²f = 0\nalmost\neverywhere", transform=ax_curv.transAxes, ha="right",
                     va="center", fontsize=9, color="#e67e22")
    ax_curv.set_title("curvature: mean |λ_max(∇²f)|", fontsize=11)

    for ax in (ax_pcc, ax_acc, ax_curv):
        ax.set_xticks(xs, names)
        ax.set_xlim(-0.5, len(xs) - 0.5)
        ax.grid(alpha=0.25)
        ax.tick_params(labelsize=9)
    fig.supxlabel("softplus β: smoother to the left, the ReLU model at the right", fontsize=10)
    if path is not None:
        save_figure(fig, Path(path))
    return fig
