"""Figures, ``metrics.json`` and ``report.html`` of a counterfactual campaign and of the helix experiment.

Figures are matplotlib ``Figure`` objects (no pyplot state) written with :func:`manifex.runs.atomic_savefig`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from ..reports import environment
from ..experiment.folder import write_metrics
from ..runs import atomic_savefig, atomic_write_text, safe_torch_load
from .ascent import DEFAULT_LR
from .evaluate import METRIC_DIRECTIONS
from .mask import load_mask

__all__ = ["grid_figure", "path_figure", "spectrum_figure", "helix_figure", "diverse_figure", "write_report",
           "write_helix_report", "findings", "campaign_metrics", "metrics_rows"]

#: Images shown in the research grid and the path strips.
MAX_GRID, MAX_PATHS = 8, 4


def _img(ax, t: torch.Tensor, cmap: str = "gray", vmin: float = 0.0, vmax: float = 1.0) -> None:
    a = t.detach().cpu().float().numpy()
    if a.ndim == 3:
        a = a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))
    ax.imshow(a, cmap=cmap if a.ndim == 2 else None, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _absdiff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().sum(0) if a.dim() == 3 else (a - b).abs()


def p_label(p: float | None, stop_prob: float = 0.99) -> str:
    """p(target) for a figure label, floored (never rounded up) to one digit more than ``stop_prob`` has, at least 3:
    a failed search (p ≤ stop_prob) never reads as the threshold (0.9885 → "0.988", not "0.99")."""
    if p is None:
        return "n/a"
    digits = max(3, math.ceil(-math.log10(1 - stop_prob) - 1e-9) + 1)
    return f"{math.floor(p * 10**digits) / 10**digits:.{digits}f}"


def _outline(ax, mask: torch.Tensor | None) -> None:
    """The region that may change (``--mask``), outlined in red on an image axis."""
    if mask is not None:
        m = mask.detach().cpu().float()
        m = (m.amax(0) if m.dim() == 3 else m).numpy() >= 0.5
        # along the pixel edges: the mask upsampled 8× (nearest), so the outline has square corners
        up = np.kron(m, np.ones((8, 8))).astype(float)
        h, w = m.shape
        ax.contour((np.arange(8 * w) + 0.5) / 8 - 0.5, (np.arange(8 * h) + 0.5) / 8 - 0.5, up, levels=[0.5],
                   colors="#e03131", linewidths=1.2)


def grid_figure(items: list[dict], spaces: list[str], stop_prob: float = 0.99, mask: torch.Tensor | None = None) -> Figure:
    """The research grid, one row per image: x | decode(encode(x)) | latent x′ | |δ| | pixel x′ | |δ|.

    ``items``: dicts with the tensors of ``units/<id>/cf.pt`` and the record (p, steps per space); with K
    counterfactuals per image, the first of them (:func:`_first`). ``mask``: outlined on x."""
    cols = [("x", None)] + ([("decode(encode(x))", None)] if "latent" in spaces else [])
    for s in spaces:
        cols += [(f"{s} x′", s), (f"|δ| {s}", s)]
    fig = Figure(figsize=(1.5 * len(cols), 1.6 * len(items) + 0.4))
    axes = fig.subplots(len(items), len(cols), squeeze=False)
    for r, it in enumerate(items):
        t = it["tensors"]
        scale = max(float(_absdiff(t[f"x_cf_{s}"], t["x"]).max()) for s in spaces) or 1.0
        c = 0
        _img(axes[r, c], t["x"]); _outline(axes[r, c], mask); c += 1
        if "latent" in spaces:
            _img(axes[r, c], t.get("x_recon", t["x"]).clamp(0, 1)); c += 1
        for s in spaces:
            rec = it["record"][s]
            _img(axes[r, c], t[f"x_cf_{s}"])
            p = p_label(rec.get("p_target"), stop_prob)
            axes[r, c].set_xlabel(f"p={p}, {rec['steps']} st" + ("" if rec["success"] else " ✗"), fontsize=7)
            _img(axes[r, c + 1], _absdiff(t[f"x_cf_{s}"], t["x"]), cmap="magma", vmax=scale)
            c += 2
        axes[r, 0].set_ylabel(f"#{it['record']['index']}", fontsize=7)
    for c, (title, _) in enumerate(cols):
        axes[0, c].set_title(title, fontsize=8)
    fig.subplots_adjust(wspace=0.05, hspace=0.35, left=0.04, right=0.99, top=0.93, bottom=0.03)
    return fig


def _first(item: dict, spaces: list[str]) -> dict:
    """An item of a record with K counterfactuals per image reduced to its first (tensors with a leading K axis and
    a list of K metric dicts per space); an item with one counterfactual is returned as it is."""
    if not any(isinstance(item["record"].get(s), list) for s in spaces):
        return item
    t = dict(item["tensors"])
    for s in spaces:
        for key in (f"x_cf_{s}", f"path_{s}", f"path_steps_{s}"):
            t[key] = t[key][0]
    return {"record": {**item["record"], **{s: item["record"][s][0] for s in spaces}}, "tensors": t}


def diverse_figure(items: list[dict], spaces: list[str], stop_prob: float = 0.99, mask: torch.Tensor | None = None) -> Figure:
    """K counterfactuals per image, one row per image: x | latent x′₁ … x′_K | pixel x′₁ … x′_K; under each x′ its
    p(target) and steps (✗: not reached), beside x the image's mean pairwise distances among its K (d_x: images;
    d_z: latent codes). ``mask``: outlined on x."""
    k = items[0]["tensors"][f"x_cf_{spaces[0]}"].shape[0]
    cols = ["x"] + [f"{s} x′{j + 1}" for s in spaces for j in range(k)]
    fig = Figure(figsize=(1.25 * len(cols) + 1.2, 1.45 * len(items) + 0.5))
    axes = fig.subplots(len(items), len(cols), squeeze=False)
    for r, it in enumerate(items):
        t, rec = it["tensors"], it["record"]
        _img(axes[r, 0], t["x"])
        _outline(axes[r, 0], mask)
        spread = rec.get("diversity", {})
        lines = [f"#{rec['index']}"]
        for s in spaces:
            d = spread.get(s, {})
            lines.append(f"{s[:3]} d_x={_fmt(d.get('pixel'), 2)}" + (f"\nd_z={_fmt(d.get('latent'), 2)}" if d.get("latent") is not None else ""))
        axes[r, 0].set_ylabel("\n".join(lines), fontsize=7, rotation=0, ha="right", va="center", labelpad=4)
        c = 1
        for s in spaces:
            for j in range(k):
                m = rec[s][j]
                _img(axes[r, c], t[f"x_cf_{s}"][j])
                axes[r, c].set_xlabel(f"p={p_label(m.get('p_target'), stop_prob)}, {m['steps']} st" + ("" if m["success"] else " ✗"),
                                      fontsize=7)
                c += 1
    for c, title in enumerate(cols):
        axes[0, c].set_title(title, fontsize=8)
    fig.subplots_adjust(wspace=0.08, hspace=0.45, left=0.11, right=0.99, top=0.93, bottom=0.04)
    return fig


def path_figure(items: list[dict], spaces: list[str]) -> Figure:
    """One strip of frames from the start to x′ per image and space (steps under each frame)."""
    k = items[0]["tensors"][f"path_{spaces[0]}"].shape[0]
    rows = [(it, s) for it in items for s in spaces]
    fig = Figure(figsize=(1.2 * k + 0.8, 1.35 * len(rows) + 0.2))
    axes = fig.subplots(len(rows), k, squeeze=False)
    for r, (it, s) in enumerate(rows):
        frames, steps = it["tensors"][f"path_{s}"], it["tensors"][f"path_steps_{s}"]
        for j in range(k):
            _img(axes[r, j], frames[j])
            axes[r, j].set_xlabel(f"{int(steps[j])}", fontsize=7)
        axes[r, 0].set_ylabel(f"#{it['record']['index']}\n{s}", fontsize=7)
    fig.subplots_adjust(wspace=0.05, hspace=0.45, left=0.07, right=0.99, top=0.98, bottom=0.04)
    return fig


def spectrum_figure(singular_values: np.ndarray, dims: np.ndarray, title: str = "") -> Figure:
    """Singular values of ∂decode/∂z (median and 10–90% band over examples), log scale, with the estimated dimension."""
    s = np.asarray(singular_values, dtype=float)
    fig = Figure(figsize=(5.2, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    i = np.arange(1, s.shape[1] + 1)
    ax.fill_between(i, np.percentile(s, 10, axis=0), np.percentile(s, 90, axis=0), color="#1e4e9c", alpha=0.2, lw=0)
    ax.plot(i, np.median(s, axis=0), "o-", color="#1e4e9c", ms=3, label="median")
    # None (or k, as estimate_dimension returns it) where no σᵢ/σᵢ₊₁ ≥ 10: no gap, no estimate
    dims = np.array([s.shape[1] if d is None else d for d in dims], dtype=float)
    gap = dims < s.shape[1]
    if gap.mean() >= 0.5:
        med = float(np.median(dims[gap]))
        ax.axvline(med + 0.5, color="#c0392b", ls="--", lw=1, label=f"estimated dimension (median {med:g})")
    else:
        ax.plot([], [], " ", label=f"no gap (σᵢ/σᵢ₊₁ ≥ 10) in the top {s.shape[1]} at {(~gap).sum()} of {len(dims)}:\n"
                                    "dimension not determined")
    ax.set_yscale("log")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("σᵢ of ∂decode/∂z")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def helix_figure(dist_latent: np.ndarray, dist_pixel: np.ndarray) -> Figure:
    """The research's box plot: distance to the helix of successful counterfactuals, data space vs latent space."""
    fig = Figure(figsize=(4.6, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    ax.boxplot([dist_pixel, dist_latent], positions=[1, 2], widths=0.6, patch_artist=True,
               boxprops=dict(facecolor="#dbe6f6", color="k"), medianprops=dict(color="#c0392b", lw=2))
    ax.set_xticks([1, 2], ["in X (pixel)", "in Z (latent)"])
    ax.set_ylabel("distance to the helix")
    ax.set_xlabel("gradient ascent")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _stat(summary: dict, space: str, key: str, which: str = "mean") -> float | None:
    """Over the successful counterfactuals of ``space``; over every searched example when none succeeded."""
    sp = summary.get(space, {})
    v = sp.get(key) if sp.get("n_success") else sp.get("all", {}).get(key)
    return None if v is None else v[which]


def _render(template: str, path: Path, **context: Any) -> Path:
    return atomic_write_text(path, environment().get_template(template).render(**context))


def campaign_metrics(result: Any) -> dict:
    """The content of a campaign's ``metrics.json`` (``result``: a
    :class:`~manifex.counterfactuals.experiment.CampaignResult`): its config (your model's name in place of the unused built-in
    choice), summary, info, checks, warnings and counts."""
    config = result.config.to_dict()
    if result.info.get("classifier", {}).get("source") == "user":  # the built-in choice was not used
        config["classifier"] = result.info["classifier"]["name"]
    return {"config": config, "summary": result.summary, "info": result.info, "checks": result.checks,
            "warnings": result.warnings, "n_images": len(result.records), "n_new": result.n_new}


def write_report(result: Any, *, command: str | None = None, metrics_file: bool = True) -> Path:
    """Write the figures, ``metrics.json`` (``metrics_file=False``: the experiment contract writes it) and
    ``report.html`` of a campaign (a :class:`~manifex.counterfactuals.experiment.CampaignResult`) into its
    ``out_dir``; returns the HTML path."""
    out, cfg, summary, records = result.out_dir, result.config, result.summary, result.records
    spaces = [s for s in cfg.spaces if s in summary]
    figures: dict[str, str] = {}
    items = []
    for rec in records[: max(MAX_GRID, MAX_PATHS)]:
        p = out / rec["files"]["tensors"]
        if p.is_file():
            items.append({"record": rec, "tensors": safe_torch_load(p, what="counterfactual tensors")})
    mask = None
    if getattr(cfg, "mask", None) is not None and items:
        mask = load_mask(cfg.mask, tuple(items[0]["tensors"]["x"].shape))
    per_input = getattr(cfg, "per_input", 1)
    if items:
        firsts = [_first(it, spaces) for it in items]
        atomic_savefig(grid_figure(firsts[:MAX_GRID], spaces, cfg.stop_prob, mask), out / "grid.png", dpi=110)
        figures["grid"] = "grid.png"
        atomic_savefig(path_figure(firsts[:MAX_PATHS], spaces), out / "paths.png", dpi=110)
        figures["paths"] = "paths.png"
        if per_input > 1:
            atomic_savefig(diverse_figure(items[:MAX_GRID], spaces, cfg.stop_prob, mask), out / "diverse.png", dpi=110)
            figures["diverse"] = "diverse.png"
    if records and "singular_values" in records[0]:
        s = np.array([r["singular_values"] for r in records])
        atomic_savefig(spectrum_figure(s, [r.get("dimension") for r in records],
                                       f"{result.info.get('generator', {}).get('name', '')} at encode(x)"),
                       out / "spectrum.png", dpi=110)
        figures["spectrum"] = "spectrum.png"
    judges = [("svm", "RBF-SVM on pixels"), ("knn_vote", "10-NN majority vote"), ("knn_fraction", "10-NN: share with the target label"),
              ("second", f"second classifier ({result.info.get('second_classifier', {}).get('arch', '')})")]
    judge_rows = [{"name": label, **{s: _fmt(_stat(summary, s, key)) for s in spaces}} for key, label in judges
                  if any(_stat(summary, s, key) is not None for s in spaces)]
    metric_rows = []
    for key, label, which, digits in [
        ("steps", "steps (median)", "median", 0), ("l1", "L1 of δ (mean)", "mean", 2), ("l2", "L2 of δ (mean)", "mean", 3),
        ("linf", "L∞ of δ (mean)", "mean", 3), ("tangent_fraction", "tangent fraction of the change (median)", "median", 3),
        ("manifold_distance", "distance to the known manifold (median)", "median", 3),
        ("off_manifold_fraction", "off-manifold fraction dist/‖δ‖ (median)", "median", 3),
        ("bpd_before", "bits/dim of x (median)", "median", 3), ("bpd_after", "bits/dim of x′ (median)", "median", 3),
    ]:
        vals = {s: _stat(summary, s, key, which) for s in spaces}
        over = {s: (summary[s] if summary[s].get("n_success") else summary[s].get("all", {})).get(f"{key}_overflow", 0)
                for s in spaces}
        if any(v is not None for v in vals.values()) or any(over.values()):
            cells = {s: "n/a" if v is None else f"{v:.3g}" if abs(v) >= 1e4 else f"{v:.{digits}f}" for s, v in vals.items()}
            for s in spaces:  # bits/dim beyond float range: far outside the flow's support, not in the mean
                if over[s]:
                    cells[s] += f" (+{over[s]} overflow: −log p beyond float range)"
            metric_rows.append({"name": label, **cells})
    cf_rows = metrics_rows(summary, spaces, cfg)
    cards = []
    for s in spaces:
        sr = summary[s].get("success_rate")
        cards.append({"label": f"{s} success", "value": "n/a" if sr is None else f"{sr * 100:.0f}%",
                      "sub": f"p(target) > {cfg.stop_prob:g} within {cfg.max_steps} steps", "accent": s == "latent"})
    for key, label in (("svm", "SVM agrees"), ("knn_vote", "10-NN agrees")):
        vals = [_stat(summary, s, key) for s in spaces]
        if all(v is not None for v in vals):
            cards.append({"label": label, "value": " / ".join(f"{v * 100:.0f}%" for v in vals), "sub": " / ".join(spaces)})
    lvp = summary.get("latent_vs_pixel", {})
    ratio = lvp.get("off_manifold_fraction_median", lvp.get("off_manifold_fraction_median_all"))
    if ratio is not None:
        cards.append({"label": "off-manifold, latent ÷ pixel", "value": f"{ratio:.2f}×", "sub": "median fraction dist/‖δ‖", "accent": True})
    for s in spaces:
        d = (summary[s].get("diversity") or {}).get("pixel")
        if d is not None:
            cards.append({"label": f"{s}: {per_input} per image", "value": f"{d['mean']:.2f}",
                          "sub": "mean pairwise ‖x′ᵢ − x′ⱼ‖₂ among them", "accent": s == "latent"})
    lines = findings(summary, spaces, per_input)
    if metrics_file:
        write_metrics(out / "metrics.json", campaign_metrics(result))
    headline = lines[0] if lines else "Counterfactuals"
    return _render("counterfactual.html.j2", out / "report.html", title="Counterfactual report", headline=headline,
                   subtitle=f"{len(records)} images of class {cfg.source} → {cfg.target} on {cfg.dataset}"
                            f"{f' × {per_input} counterfactuals' if per_input > 1 else ''}"
                            f"{f', changes confined to the mask {cfg.mask}' if mask is not None else ''}; "
                            f"generator {cfg.generator}, classifier {result.info.get('classifier', {}).get('name') or cfg.classifier}",
                   findings=lines[1:], cards=cards, spaces=spaces, judge_rows=judge_rows, metric_rows=metric_rows,
                   cf_rows=cf_rows, figures=figures, checks=result.checks, mask_spec=getattr(cfg, "mask", None),
                   settings={**cfg.to_dict(), "lr_latent_effective": cfg.effective_lr_latent(),
                             "lr_pixel_effective": cfg.lr_pixel if cfg.lr_pixel is not None else DEFAULT_LR[None]},
                   info=result.info, command=command,
                   helix=None)


#: The counterfactual metrics table: summary key, label, statistic, digits, what it measures.
CF_METRICS = (
    ("validity", "validity", "mean", 3, "share of searched examples whose counterfactual the classifier assigns to the target (argmax)"),
    ("l0", "L0: pixels changed", "median", 0, "pixels that moved by more than the L0 tolerance"),
    ("sparsity", "sparsity", "mean", 3, "1 − L0 / number of pixels"),
    ("l1", "L1 of δ", "mean", 2, "sum of |x′ − x|"),
    ("l2", "L2 of δ", "mean", 3, "‖x′ − x‖₂"),
    ("linf", "L∞ of δ", "mean", 3, "largest |x′ − x|"),
    ("ynn", "yNN", "mean", 3, "share of the 10 nearest training images the classifier labels as the target"),
    ("im1", "IM1", "median", 3, "target-class autoencoder error ÷ original-class autoencoder error on x′"),
    ("im2", "IM2", "median", 4, "‖AE_target(x′) − AE_all(x′)‖² ÷ ‖x′‖₁"),
    ("seconds", "seconds per counterfactual", "mean", 3, "wall time of the batched search ÷ counterfactuals"),
    ("fid", "Fréchet distance to real target images", "value", 2, "in the second judge's penultimate features"),
    ("outside_mask", "change outside the mask", "mean", 4, "Σ|δ| outside the --mask region ÷ Σ|δ| (pixel space: 0 exactly; "
     "latent space: held down by a penalty)"),
    ("diversity.pixel", "diversity: images", "mean", 3, "per image, mean pairwise ‖x′ᵢ − x′ⱼ‖₂ among its K counterfactuals"),
    ("diversity.latent", "diversity: latent codes", "mean", 3, "per image, mean pairwise ‖z′ᵢ − z′ⱼ‖₂ among its K latent codes"),
)


def metrics_rows(summary: dict, spaces: list[str], cfg: Any = None) -> list[dict]:
    """Rows of the report's counterfactual metrics table (one per metric the summary holds; a column per space)."""
    rows = []
    for key, label, which, digits, what in CF_METRICS:
        vals = {}
        for s in spaces:
            sp = summary.get(s, {})
            if key == "fid":
                v = (sp.get("fid") or {}).get("value")
            elif key.startswith("diversity."):
                v = ((sp.get("diversity") or {}).get(key.split(".")[1]) or {}).get(which)
            elif key == "validity":
                v = (sp.get("validity") or {}).get("mean")
            else:
                v = _stat(summary, s, key, which)
            vals[s] = v
        if all(v is None for v in vals.values()):
            continue
        if key == "l0" and cfg is not None and getattr(cfg, "l0_tol", None) is not None:
            what = f"{what} ({cfg.l0_tol:.3g})"
        if key == "fid":
            n = {s: (summary.get(s, {}).get("fid") or {}).get("n") for s in spaces}
            cells = {s: "n/a" if vals[s] is None else f"{vals[s]:.{digits}f} (n={n[s]})" for s in spaces}
        else:
            cells = {s: "n/a" if v is None else f"{v:.{digits}f}" for s, v in vals.items()}
        rows.append({"name": f"{label} ({which})" if which != "value" else label,
                     "direction": "↑" if METRIC_DIRECTIONS[key.split(".")[0]] == "higher" else "↓", "what": what, **cells})
    return rows


def findings(summary: dict, spaces: list[str], per_input: int = 1) -> list[str]:
    """The report's findings; ``per_input`` K > 1: success and the paired numbers count the N·K counterfactuals
    (the k-th of an image in one space paired with its k-th in the other)."""
    out = []
    of, each = ("% of images", "") if per_input == 1 else ("%", f" ({per_input} per image, each counted)")
    if "latent" in summary and "pixel" in summary:
        lat, pix = summary["latent"], summary["pixel"]
        if lat.get("success_rate") is not None and pix.get("success_rate") is not None:
            out.append(f"Latent counterfactuals succeed for {lat['success_rate'] * 100:.0f}{of}, pixel ones for "
                       f"{pix['success_rate'] * 100:.0f}%{each}.")
        for key, name in (("svm", "the RBF-SVM"), ("knn_vote", "the 10 nearest training images")):
            a, b = _stat(summary, "latent", key), _stat(summary, "pixel", key)
            if a is not None and b is not None:
                out.append(f"{name[0].upper() + name[1:]} agree{'s' if key == 'svm' else ''} with the target for "
                           f"{a * 100:.0f}% of latent and {b * 100:.0f}% of pixel counterfactuals.")
        pair = summary.get("paired", {})
        if pair.get("n") and "svm" in pair and "knn_vote" in pair:
            out.append(f"On the {pair['n']} {'images' if per_input == 1 else 'counterfactual pairs (image, k)'} where both "
                       "searches succeeded: the RBF-SVM agrees for "
                       f"{pair['svm']['latent'] * 100:.0f}% (latent) vs {pair['svm']['pixel'] * 100:.0f}% (pixel), the "
                       f"10-NN vote for {pair['knn_vote']['latent'] * 100:.0f}% vs {pair['knn_vote']['pixel'] * 100:.0f}%.")
        lvp = summary.get("latent_vs_pixel", {})
        ratio = lvp.get("off_manifold_fraction_median", lvp.get("off_manifold_fraction_median_all"))
        if ratio is not None:
            out.append(f"Off-manifold part of the change (distance to the known manifold ÷ ‖δ‖, median): latent is "
                       f"{ratio:.2f}× pixel's.")
    for s in spaces:
        d = summary.get(s, {}).get("diversity") or {}
        if d.get("pixel"):
            out.append(f"{s[0].upper() + s[1:]}: the counterfactuals of an image lie {d['pixel']['mean']:.2f} apart in pixels"
                       + (f" and {d['latent']['mean']:.2f} in the latent space" if d.get("latent") else "")
                       + f" (mean pairwise L2 over {d['pixel']['n']} images).")
        o = _stat(summary, s, "outside_mask")
        if o is not None:
            out.append(f"{s[0].upper() + s[1:]}: {o:.2%} of the change lies outside the mask (mean Σ|δ| share).")
    sp = summary.get("spectrum")
    if sp and sp.get("gap_found_fraction") is not None:
        if sp["gap_found_fraction"] < 0.5:
            out.append(f"Generator spectrum: no gap (σᵢ/σᵢ₊₁ ≥ 10) among the top {sp['top']} singular values for "
                       f"{(1 - sp['gap_found_fraction']) * 100:.0f}% of images (median σ₁ {sp['sigma_first_median']:.3g} → "
                       f"σ_{sp['top']} {sp['sigma_last_median']:.3g}): the manifold dimension is not determined here.")
        else:
            out.append(f"Generator spectrum: estimated dimension {sp['dimension_median_where_gap']:g} (median, gap "
                       f"found for {sp['gap_found_fraction'] * 100:.0f}% of images).")
    return out


def write_helix_report(res: dict, out_dir: str | Path, *, command: str | None = None, run_files: bool = True) -> Path:
    """Figures and ``report.html`` of the helix experiment from its records and summary (what :func:`run_helix`
    returns, or :class:`~manifex.counterfactuals.experiment.HelixExperiment`'s); with ``run_files`` also its
    ``results.jsonl`` and ``metrics.json`` (False: the experiment contract wrote them)."""
    from ..runs import append_jsonl

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s, records = res["summary"], res["records"]
    d = {sp: np.array([r[sp]["distance"] for r in records if r[sp]["success"] and not r[sp]["already"]], dtype=np.float64)
         for sp in ("latent", "pixel")}
    atomic_savefig(helix_figure(d["latent"], d["pixel"]), out / "helix_distances.png", dpi=110)
    atomic_savefig(spectrum_figure(np.array([r["singular_values"] for r in records], dtype=np.float64),
                                   np.array([r["dimension"] for r in records]), "helix flow at encode(x)"),
                   out / "spectrum.png", dpi=110)
    if run_files:
        (out / "results.jsonl").unlink(missing_ok=True)
        append_jsonl(out / "results.jsonl", records)
        write_metrics(out / "metrics.json", {"config": res["config"], "summary": s})
    ratio = s.get("distance_ratio_median")
    headline = (f"Helix: latent counterfactuals end {1 / ratio:.1f}× closer to the data manifold than pixel ones (median)"
                if ratio else "Helix counterfactuals")
    findings = [
        f"Success: latent {s['latent']['success_rate'] * 100:.0f}%, pixel {s['pixel']['success_rate'] * 100:.0f}% "
        f"({s['n']} points; classifier accuracy {s['classifier_accuracy'] * 100:.0f}%).",
        f"Median distance to the helix: latent {_fmt(s['latent']['distance_median'])}, pixel {_fmt(s['pixel']['distance_median'])}.",
        f"Flow Jacobian spectrum: median σ₁/σ₂ = {s['spectrum']['ratio_s1_s2_median']:.1f}; the dimension estimate is 1 for "
        f"{s['spectrum']['dimension_is_1_fraction'] * 100:.0f}% of points.",
    ]
    cards = [
        {"label": "latent success", "value": f"{s['latent']['success_rate'] * 100:.0f}%", "sub": "f past 0.9 / 0.1", "accent": True},
        {"label": "pixel success", "value": f"{s['pixel']['success_rate'] * 100:.0f}%", "sub": "f past 0.9 / 0.1"},
        {"label": "distance ratio", "value": "n/a" if ratio is None else f"{ratio:.3f}", "sub": "median latent ÷ pixel (goal ≤ 0.2)", "accent": True},
        {"label": "dimension = 1", "value": f"{s['spectrum']['dimension_is_1_fraction'] * 100:.0f}%", "sub": "gap estimate on σ(J)"},
    ]
    checks = [f"classifier accuracy on the helix: {s['classifier_accuracy']:.3f}",
              f"flow: {s['flow']['epochs']} epochs × {s['flow']['steps_per_epoch']} steps (final NLL "
              f"{_fmt((s['flow'].get('nll_history') or [None])[-1])} nats)",
              "distances are exact (1-D minimisation over the curve parameter, t in [−4, 4])"]
    return _render("counterfactual.html.j2", out / "report.html", title="Helix counterfactuals", headline=headline,
                   subtitle="x = (sin t, cos t, t); RealNVP flow, MLP 3-256-1; research settings (lr 3e-2, ≤ 1000 steps)",
                   findings=findings, cards=cards, spaces=["latent", "pixel"], judge_rows=[], metric_rows=[],
                   figures={"spectrum": "spectrum.png"}, checks=checks, settings=res["config"], info={}, command=command,
                   helix={"figure": "helix_distances.png", "summary": s})
