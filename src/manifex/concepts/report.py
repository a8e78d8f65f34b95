"""The concepts campaign (one unit per class, resumable on the shared run layer) and its HTML report.

``run_concept_campaign`` runs classes in batches through :func:`process_classes` (class_concepts, top-k
prototypes from both pools, the prediction-from-components test and its random control), appends one record
per class to ``results.jsonl`` and writes the class's figure; a re-run skips finished classes.
``write_concepts_report`` turns the records into ``metrics.json`` and ``report.html``.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..reports import render, write_json
from ..runs import Unit, atomic_write_bytes, run_units
from .basis import class_concepts
from .components import RESEARCH_NUMBERS, component_statistics, prediction_from_components
from .prototypes import concept_prototypes, pooled_activations

__all__ = ["run_concept_campaign", "process_classes", "summarize", "write_concepts_report", "class_figure"]

POOLS = ("include", "exclude")


def _mosaic(crops: np.ndarray, gap: int = 1, value: float = 1.0) -> np.ndarray:
    """(rows, cols, C, h, w) crops → one (H, W, C) image with ``gap``-pixel white lines between crops."""
    r, c, ch, h, w = crops.shape
    out = np.full((r * (h + gap) - gap, c * (w + gap) - gap, ch), value, dtype=np.float32)
    for i in range(r):
        for j in range(c):
            out[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = crops[i, j].transpose(1, 2, 0)
    return out


def class_figure(crops: dict[str, torch.Tensor], strips: dict[str, torch.Tensor], path: Path, scale: int = 3) -> Path:
    """One image per class, composed in NumPy and written as a PNG (no plotting machinery: fast under load):
    the top crops of each concept (rows) from any image, from images not predicted as the class, then the
    two strips. Gaps are white; the report's caption names the panels."""
    import matplotlib.pyplot as plt

    panels = [_mosaic(crops[p].clamp(0, 1).numpy()) for p in POOLS]
    panels += [strips[p].clamp(0, 1).numpy().transpose(1, 2, 0) for p in POOLS]
    height = max(q.shape[0] for q in panels)
    gap = np.ones((height, 4, panels[0].shape[2]), dtype=np.float32)
    row = []
    for q in panels:
        padded = np.ones((height, q.shape[1], q.shape[2]), dtype=np.float32)
        padded[: q.shape[0]] = q
        row += [padded, gap]
    img = np.concatenate(row[:-1], axis=1).repeat(scale, 0).repeat(scale, 1)
    img = img[..., 0] if img.shape[2] == 1 else img
    buf = io.BytesIO()
    plt.imsave(buf, img, cmap="gray", vmin=0, vmax=1, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path


def process_classes(units: list[Unit], context: dict[str, Any], out_dir: Path) -> list[dict]:
    """A batch of classes: concepts (batched), prototypes of both pools, the components test, figures."""
    model, x, preds, opts = context["model"], context["x"], context["predictions"], context["options"]
    classes = [int(u.payload["class"]) for u in units]
    import warnings as _w

    with _w.catch_warnings(record=True) as caught:
        _w.simplefilter("always", RuntimeWarning)
        basis = class_concepts(model, x, opts["layer"], classes=classes, n_components=opts["components"],
                               images_per_class=opts["images_per_class"], relevance=opts["relevance"],
                               relevance_options={"n_samples": opts["samples"]}, solver=opts["solver"], seed=opts["seed"],
                               batch_size=opts["batch_size"], predictions=preds)
    pooled = context.get("pooled")
    if pooled is None:
        pooled = pooled_activations(model, x, opts["layer"], pool=opts["pool"])
    results: dict[str, Any] = {}
    for pool in POOLS:
        protos = concept_prototypes(model, x, basis, top_k=max(opts["top_k"], opts["strips"]), exclude_target=pool == "exclude",
                                    pool=opts["pool"], geometry=opts["geometry"], predictions=preds, pooled=pooled)
        test = prediction_from_components(model, x, basis, exclude_target=pool == "exclude", layout=opts["layout"],
                                          n_control=opts["controls"], strips_per_class=opts["strips"], prototypes=protos,
                                          predictions=preds, pool=opts["pool"], seed=opts["seed"])
        results[pool] = (protos, test)
    records = []
    for u, c in zip(units, classes):
        if c not in basis.classes:
            records.append({"id": u.id, "class": c, "skipped": True, "reason": "no image is predicted as this class"})
            continue
        i = basis.classes.index(c)
        rec: dict[str, Any] = {"id": u.id, "class": c, "skipped": False, "n_images": basis.n_images[i],
                               "recon_error": float(basis.recon_error[i]), "relative_error": float(basis.relative_error[i]),
                               "nmf_iterations": basis.n_iter[i], "vectors": basis.vectors[i].tolist(),
                               "image_indices": basis.image_indices[i].tolist()}
        crops, strips = {}, {}
        for pool in POOLS:
            protos, test = results[pool]
            p = test.p[i].reshape(-1)
            hit = test.hit[i].reshape(-1)
            rec[pool] = {"p": p.tolist(), "hit": hit.tolist(), "predicted": test.predicted[i].reshape(-1).tolist(),
                         "control_p": test.control_p[i].tolist(), "control_hit": test.control_hit[i].tolist(),
                         "top_image_index": protos.image_index[i].tolist(), "top_scores": protos.scores[i].tolist()}
            crops[pool] = protos.crops[i, :, : opts["top_k"]]
            strips[pool] = test.inputs[i] if test.inputs.dim() == 4 else test.inputs[i, 0]
        fig = Path(out_dir) / "classes" / f"class_{c:03d}.png"
        class_figure(crops, strips, fig)
        rec["figure"] = str(fig.relative_to(out_dir))
        records.append(rec)
    warned = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if warned and records:
        records[0]["warnings"] = warned
    return records


def run_concept_campaign(model: nn.Module, x: torch.Tensor, classes: Sequence[int], out_dir: str | Path, *,
                         options: dict[str, Any], class_names: Sequence[str] = (), predictions: torch.Tensor | None = None,
                         batch_size: int = 16, executor: Any = None, resume: bool = True, progress: bool = True) -> list[dict]:
    """One unit per class on the shared run layer (``results.jsonl`` in ``out_dir``, resumable)."""
    from .basis import predict_classes

    preds = predict_classes(model, x) if predictions is None else predictions
    units = [Unit(f"class{c:03d}", {"class": int(c)}) for c in classes]
    context = {"model": model, "x": x, "predictions": preds, "options": dict(options), "class_names": list(class_names)}
    return run_units(units, process_classes, out_dir, context=context, batch_size=batch_size, executor=executor,
                     resume=resume, progress=progress, desc="concepts")


def summarize(records: list[dict]) -> dict[str, Any]:
    """The five statistics per pool for the concepts and the random control, and NMF errors, over the classes."""
    done = [r for r in records if not r.get("skipped")]
    out: dict[str, Any] = {"classes": [r["class"] for r in done], "skipped": [r["class"] for r in records if r.get("skipped")]}
    for pool in POOLS:
        p = torch.tensor([v for r in done for v in r[pool]["p"]])
        hit = torch.tensor([v for r in done for v in r[pool]["hit"]])
        cp = torch.tensor([v for r in done for v in r[pool]["control_p"]])
        ch = torch.tensor([v for r in done for v in r[pool]["control_hit"]])
        out[pool] = {"concepts": component_statistics(p, hit) if p.numel() else {},
                     "control": component_statistics(cp, ch) if cp.numel() else {}}
        if p.numel():
            out[pool]["margin_points"] = 100 * (out[pool]["concepts"]["argmax_rate"] - out[pool]["control"]["argmax_rate"])
    if done:
        rel = [r["relative_error"] for r in done]
        out["nmf"] = {"mean_relative_error": float(np.mean(rel)), "max_relative_error": float(np.max(rel)),
                      "mean_error": float(np.mean([r["recon_error"] for r in done]))}
    return out


def _pct(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


_STATS = (("mean_p", "mean p(A)", lambda v: f"{v:.3f}"), ("std_p", "std p(A)", lambda v: f"{v:.3f}"),
          ("argmax_rate", "argmax = A", _pct), ("p_gt_0.1", "p > 0.1", _pct), ("p_gt_0.2", "p > 0.2", _pct),
          ("p_gt_0.5", "p > 0.5", _pct))


def write_concepts_report(records: list[dict], out_dir: str | Path, *, options: dict[str, Any], model_info: dict | None = None,
                          class_names: Sequence[str] = (), checks: Sequence[str] = (), warnings: Sequence[str] = (),
                          command: str | None = None, headline_pool: str = "include", seconds: float | None = None) -> Path:
    """``metrics.json`` and ``report.html`` from the campaign's records; returns the HTML path."""
    out = Path(out_dir)
    summary = summarize(records)
    warnings = list(warnings)
    for r in records:
        warnings += r.get("warnings", [])
    done = [r for r in records if not r.get("skipped")]
    write_json({"summary": summary, "options": options, "model": model_info or {}, "checks": list(checks),
                "warnings": warnings, "research": RESEARCH_NUMBERS, "seconds": seconds,
                "classes": [{k: v for k, v in r.items() if k not in ("vectors",)} for r in records]}, out / "metrics.json")
    name = lambda c: class_names[c] if c < len(class_names) else str(c)  # noqa: E731
    rows = []
    for pool in POOLS:
        for what in ("concepts", "control"):
            s = summary.get(pool, {}).get(what) or {}
            label = f"{'concept strips' if what == 'concepts' else 'random crops (control)'}, {pool} target"
            rows.append({"label": label, "bold": what == "concepts", "cells": [fmt(s[k]) if k in s else "n/a" for k, _, fmt in _STATS]})
    research = [{"label": f"{k} (ImageNet, 1000 classes)", "cells": [fmt(v[key]) if key in v else "—" for key, _, fmt in _STATS]}
                for k, v in RESEARCH_NUMBERS.items()]
    per_class = [{"cls": name(r["class"]), "n": r["n_images"], "rel": f"{r['relative_error']:.3f}", "iters": r["nmf_iterations"],
                  "p_in": f"{r['include']['p'][0]:.2f}", "pred_in": name(r["include"]["predicted"][0]),
                  "p_ex": f"{r['exclude']['p'][0]:.2f}", "pred_ex": name(r["exclude"]["predicted"][0]),
                  "ok_in": bool(r["include"]["hit"][0]), "ok_ex": bool(r["exclude"]["hit"][0]), "figure": r["figure"]}
                 for r in done]
    main = summary.get(headline_pool, {})
    cards = []
    for pool in POOLS:
        s = summary.get(pool, {})
        if s.get("concepts"):
            cards.append({"label": f"argmax = A, {pool} target", "value": _pct(s["concepts"]["argmax_rate"]),
                          "sub": f"random crops: {_pct(s['control']['argmax_rate'])} ({s['margin_points']:+.0f} points)",
                          "accent": pool == headline_pool})
    if "nmf" in summary:
        cards.append({"label": "NMF relative error", "value": f"{summary['nmf']['mean_relative_error']:.3f}",
                      "sub": f"‖X − WH‖/‖X‖, mean over classes (max {summary['nmf']['max_relative_error']:.3f})"})
    cards.append({"label": "classes", "value": str(len(done)), "sub": f"{options.get('components')} concepts each"
                  + (f"; {len(summary['skipped'])} skipped" if summary["skipped"] else "")})
    headline = "Concepts per class"
    if main.get("concepts"):
        headline = (f"Strips of each class's {options.get('components')} concept crops are classified as the class "
                    f"{_pct(main['concepts']['argmax_rate'])} of the time ({headline_pool} target), random crops "
                    f"{_pct(main['control']['argmax_rate'])}")
    findings = []
    for pool in POOLS:
        s = summary.get(pool, {})
        if s.get("concepts"):
            findings.append(f"{pool} target: mean p(A) {s['concepts']['mean_p']:.2f} vs {s['control']['mean_p']:.2f} for random "
                            f"crops; argmax = A {s['margin_points']:+.0f} points over the control.")
    return render("concepts.html.j2", out / "report.html", title="manifex · concepts", headline=headline,
                  subtitle=(f"layer {options.get('layer')} · {options.get('relevance')} relevance in a noise tunnel "
                            f"({options.get('samples')} samples) · NMF with {options.get('components')} components · up to "
                            f"{options.get('images_per_class')} images predicted as each class"),
                  findings=findings, cards=cards, stat_labels=[lab for _, lab, _ in _STATS], rows=rows, research=research,
                  per_class=per_class, options=options, model=model_info or {}, command=command, checks=list(checks),
                  warnings=warnings)
