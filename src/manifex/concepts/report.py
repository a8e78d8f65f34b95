"""The concepts campaign (one unit per class, resumable on the shared run layer) and its HTML report.

``run_concept_campaign`` runs classes in batches through :func:`process_classes` (class_concepts, top-k
prototypes from both pools, the prediction-from-components test and its random control), appends one record
per class to ``results.jsonl`` and writes the class's figure; a re-run skips finished classes.
``write_concepts_report`` turns the records into ``metrics.json`` and ``report.html``.
"""
from __future__ import annotations

import io
import math
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..attribution.core import preserve_model_state, selected_output
from ..errors import InputError
from ..reports import render, write_json
from ..models.cache import state_fingerprint
from ..runs import Unit, atomic_write_bytes, check_settings, run_units, tensor_fingerprint, unit_dir
from .basis import class_concepts
from .components import RESEARCH_NUMBERS, component_statistics, prediction_from_components
from .importance import concept_importance, top_concepts
from .maps import concept_maps
from .prototypes import concept_prototypes, pooled_activations
from .stability import matrix_stability

#: A concept whose smallest matched cosine over the other seeds and bootstrap halves is below this is "unstable".
UNSTABLE_BELOW = 0.8

__all__ = ["run_concept_campaign", "process_classes", "summarize", "write_concepts_report", "class_figure", "concept_figure",
           "maps_figure", "rate_text", "UNSTABLE_BELOW"]

POOLS = ("include", "exclude")


def _mosaic(crops: np.ndarray, gap: int = 1, value: float = 1.0) -> np.ndarray:
    """(rows, cols, C, h, w) crops → one (H, W, C) image with ``gap``-pixel white lines between crops."""
    r, c, ch, h, w = crops.shape
    out = np.full((r * (h + gap) - gap, c * (w + gap) - gap, ch), value, dtype=np.float32)
    for i in range(r):
        for j in range(c):
            out[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = crops[i, j].transpose(1, 2, 0)
    return out


def class_figure(crops: dict[str, torch.Tensor], strips: dict[str, torch.Tensor], path: Path, scale: int = 3, *,
                 label: str | None = None, p: dict[str, float] | None = None,
                 strip_concepts: Sequence[int] | None = None) -> Path:
    """One labelled PNG per class (see :func:`concept_figure`), written atomically; returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = concept_figure(crops, strips, scale=scale, label=label, p=p, strip_concepts=strip_concepts)
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


def concept_figure(crops: dict[str, torch.Tensor], strips: dict[str, torch.Tensor], *, scale: int = 3,
                   label: str | None = None, p: dict[str, float] | None = None,
                   strip_concepts: Sequence[int] | None = None):
    """The class's matplotlib Figure (no pyplot state): the top crops of each concept (one labelled row per
    concept) from any image and from images not predicted as the class, then the two strips with their p(A).
    ``label``: the class's name; ``p``: p(A) of each strip by pool; ``scale``: resolution (40·scale dpi on an
    11-inch-wide figure: 1,320 px at the default 3, with 10–13 pt labels); ``strip_concepts``: the concepts (0-based)
    whose crops the strips hold, when not all of them (``component_concepts``)."""
    from matplotlib.figure import Figure

    name = "A" if label is None else str(label)
    k = int(crops[POOLS[0]].shape[0])
    panels = [_mosaic(crops[q].clamp(0, 1).numpy()) for q in POOLS]
    panels += [strips[q].clamp(0, 1).numpy().transpose(1, 2, 0) for q in POOLS]
    titles = ["top crops of each concept,\nany image", f"top crops, images not\npredicted as {name}"]
    for q, what in zip(POOLS, ("any image", f"not {name}")):
        titles.append(f"strip ({what})" + (f"\np({name}) = {p[q]:.2f}" if p and q in p else ""))
    widths = [q.shape[1] for q in panels]
    ratios = [max(w, 0.45 * widths[0]) for w in widths]
    fig = Figure(figsize=(11, 1.6 + 0.42 * k), dpi=40 * scale, layout="constrained")
    axes = fig.subplots(1, 4, width_ratios=ratios)
    for j, (ax, img, title) in enumerate(zip(axes, panels, titles)):
        ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=11)
        ax.set_xticks([])
        shown = list(range(k)) if j < 2 or strip_concepts is None else [int(m) for m in strip_concepts]
        rows = np.arange(len(shown)) * (img.shape[0] / len(shown)) + img.shape[0] / (2 * len(shown))
        ax.set_yticks(rows, [f"concept {m + 1}" if j == 0 else str(m + 1) for m in shown], fontsize=10)
        ax.tick_params(length=0)
        for side in ax.spines.values():
            side.set_visible(False)
    fig.suptitle(f"class {name}: {k} concepts" + (f" (strips: the {len(strip_concepts)} most important)"
                                                   if strip_concepts is not None else ""), fontsize=13, fontweight="bold")
    return fig


def maps_figure(image: torch.Tensor, maps: torch.Tensor, relmax: torch.Tensor | None, path: Path, *, labels: Sequence[str],
                title: str, method: str, scale: int = 3) -> Path:
    """One PNG per class: the example image beside the map of every concept on it (one row per concept, red positive,
    blue negative, each row scaled to its own largest |value|) and, if given, the relevance-ranked (RelMax) top
    crops (k, top_k, C, h, w) of each concept; ``labels``: one per concept row. Written atomically."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = int(maps.shape[0])
    m = maps.sum(1).double()  # (k, H, W): summed over the image's channels
    m = m / m.flatten(1).abs().amax(1).clamp_min(1e-30)[:, None, None]
    rgb = torch.from_numpy(colormaps["bwr"]((m.numpy() + 1) / 2)[..., :3]).permute(0, 3, 1, 2).float()  # (k, 3, H, W)
    img = image.detach().cpu().float().clamp(0, 1)
    img = img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3]
    pairs = torch.stack([img.expand(k, -1, -1, -1), rgb], 1)  # (k, 2, 3, H, W): the image beside each map
    panels = [_mosaic(pairs.numpy())]
    titles = [f"image, concept map ({method})"]
    if relmax is not None:
        panels.append(_mosaic(relmax.clamp(0, 1).numpy()))
        titles.append("top crops by relevance (RelMax)")
    widths = [q.shape[1] for q in panels]
    fig = Figure(figsize=(11 if relmax is not None else 6, 1.6 + 0.42 * k), dpi=40 * scale, layout="constrained")
    axes = fig.subplots(1, len(panels), width_ratios=[max(w, 0.45 * max(widths)) for w in widths], squeeze=False)[0]
    for j, (ax, pic, t) in enumerate(zip(axes, panels, titles)):
        ax.imshow(pic[..., 0] if pic.shape[2] == 1 else pic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(t, fontsize=11)
        ax.set_xticks([])
        rows = np.arange(k) * (pic.shape[0] / k) + pic.shape[0] / (2 * k)
        ax.set_yticks(rows, list(labels) if j == 0 else [str(i + 1) for i in range(k)], fontsize=10)
        ax.tick_params(length=0)
        for side in ax.spines.values():
            side.set_visible(False)
    fig.suptitle(title, fontsize=13, fontweight="bold")
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _concept_labels(importance: list[float] | None, stability: list[float] | None) -> list[str]:
    """Row labels "concept 2 · #1 · stab 0.97" (importance rank, smallest matched cosine, "unstable" below the bar)."""
    k = len(importance if importance is not None else stability or [])
    rank = {int(j): r + 1 for r, j in enumerate(np.argsort(-np.asarray(importance)))} if importance is not None else {}
    out = []
    for j in range(k):
        parts = [f"concept {j + 1}"]
        if rank:
            parts.append(f"#{rank[j]}")
        if stability is not None:
            parts.append(f"stab {stability[j]:.2f}" + (" unstable" if stability[j] < UNSTABLE_BELOW else ""))
        out.append(" · ".join(parts))
    return out


def process_classes(units: list[Unit], context: dict[str, Any], out_dir: Path) -> list[dict]:
    """A batch of classes: concepts (batched), prototypes of both pools, the components test, figures.
    A class left out of the basis (no predicted image, or relevance <= 0 everywhere on all its images) gets a
    skipped record with the reason; it never enters the components test."""
    model, x, preds, opts = context["model"], context["x"], context["predictions"], context["options"]
    class_names = context.get("class_names") or []
    classes = [int(u.payload["class"]) for u in units]
    import warnings as _w

    with _w.catch_warnings(record=True) as caught:
        _w.simplefilter("always", RuntimeWarning)
        try:
            basis = class_concepts(model, x, opts["layer"], classes=classes, n_components=opts["components"],
                                   images_per_class=opts["images_per_class"], relevance=opts["relevance"],
                                   relevance_options={"n_samples": opts["samples"]}, solver=opts["solver"], seed=opts["seed"],
                                   batch_size=opts["batch_size"], predictions=preds, output=context.get("output"),
                                   keep_matrix=bool(opts.get("stability_seeds") or opts.get("stability_halves")))
        except InputError as e:
            if "relevance is <= 0" not in str(e):
                raise
            reason = "its relevance is <= 0 at every position on all its images"
            return [{"id": u.id, "class": c, "skipped": True, "reason": reason, "warnings": [str(w.message) for w in caught]}
                    for u, c in zip(units, classes)]
        pooled = context.get("pooled")
        if pooled is None:
            pooled = pooled_activations(model, x, opts["layer"], pool=opts["pool"])
        importance = _importance(model, x, basis, opts, context.get("output"))
        n_top = opts.get("component_concepts")
        if n_top and importance is None:
            raise InputError("component_concepts picks the most important concepts: it needs importance 'sobol' or 'gradient'.")
        chosen = top_concepts(importance, int(n_top)) if n_top else None
        results: dict[str, Any] = {}
        every: dict[str, Any] = {}  # with component_concepts: the test on all concepts, for comparison
        for pool in POOLS:
            protos = concept_prototypes(model, x, basis, top_k=max(opts["top_k"], opts["strips"]), exclude_target=pool == "exclude",
                                        pool=opts["pool"], geometry=opts["geometry"], predictions=preds, pooled=pooled,
                                        output=context.get("output"))
            test = partial(prediction_from_components, model, x, basis, exclude_target=pool == "exclude", layout=opts["layout"],
                           n_control=opts["controls"], strips_per_class=opts["strips"], prototypes=protos,
                           predictions=preds, pool=opts["pool"], seed=opts["seed"], output=context.get("output"))
            results[pool] = (protos, test(concepts=chosen))
            if chosen is not None:
                every[pool] = test()
        extras = _concept_extras(model, x, basis, preds, opts, context.get("output"), pooled, importance)
    records = []
    for u, c in zip(units, classes):
        if c not in basis.classes:
            records.append({"id": u.id, "class": c, "skipped": True, "reason": basis.skipped.get(c, "not in the basis")})
            continue
        i = basis.classes.index(c)
        rec: dict[str, Any] = {"id": u.id, "class": c, "skipped": False, "n_images": basis.n_images[i],
                               "n_excluded": basis.n_excluded[i] if basis.n_excluded else 0,
                               "recon_error": float(basis.recon_error[i]), "relative_error": float(basis.relative_error[i]),
                               "nmf_iterations": basis.n_iter[i], "vectors": basis.vectors[i].tolist(),
                               "image_indices": basis.image_indices[i].tolist(), "grid": list(results["include"][0].grid)}
        crops, strips = {}, {}
        for pool in POOLS:
            protos, test = results[pool]
            p = test.p[i].reshape(-1)
            hit = test.hit[i].reshape(-1)
            rec[pool] = {"p": p.tolist(), "hit": hit.tolist(), "predicted": test.predicted[i].reshape(-1).tolist(),
                         "control_p": test.control_p[i].tolist(), "control_hit": test.control_hit[i].tolist(),
                         "top_image_index": protos.image_index[i].tolist(), "top_scores": protos.scores[i].tolist()}
            if chosen is not None:
                rec[pool]["all_concepts"] = {"p": every[pool].p[i].reshape(-1).tolist(), "hit": every[pool].hit[i].reshape(-1).tolist(),
                                             "predicted": every[pool].predicted[i].reshape(-1).tolist()}
            crops[pool] = protos.crops[i, :, : opts["top_k"]]
            strips[pool] = test.inputs[i] if test.inputs.dim() == 4 else test.inputs[i, 0]
        fig = unit_dir(out_dir, u.id) / "figure.png"
        name = class_names[c] if c < len(class_names) else str(c)
        class_figure(crops, strips, fig, label=name, p={pool: float(results[pool][1].p[i].reshape(-1)[0]) for pool in POOLS},
                     strip_concepts=chosen[i].tolist() if chosen is not None else None)
        rec["figure"] = str(fig.relative_to(out_dir))
        if chosen is not None:
            rec["component_concepts"] = chosen[i].tolist()
        rec.update(_extra_record(extras, i, x, basis, opts, fig.parent, out_dir, name))
        records.append(rec)
    warned = list(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)))
    if warned and records:
        records[0]["warnings"] = warned
    return records


def _importance(model, x, basis, opts, output) -> torch.Tensor | None:
    """The importance matrix (classes, concepts) the options ask for (None for ``importance`` "none")."""
    method = opts.get("importance", "none")
    if method == "none":
        return None
    return concept_importance(model, x, basis, method=method, indices=basis.image_indices,
                              n_design=int(opts.get("sobol_designs", 32)), output=output)


def _concept_extras(model, x, basis, preds, opts, output, pooled, importance: torch.Tensor | None) -> dict[str, Any]:
    """Importance (given: :func:`_importance`), stability, concept maps of each class's example image and RelMax
    references, as the options ask (each off when its option is absent: ``importance`` "none", 0 seeds and halves,
    ``map_method`` "none", ``relmax`` False)."""
    out: dict[str, Any] = {}
    if importance is not None:
        out["importance"] = importance
    seeds, halves = int(opts.get("stability_seeds") or 0), int(opts.get("stability_halves") or 0)
    if seeds or halves:
        s0 = int(opts.get("seed", 0))
        out["stability"] = matrix_stability(basis.matrix, basis.vectors, n_rows=basis.n_rows,
                                            rows_per_image=basis.rows_per_image, seeds=range(s0 + 1, s0 + 1 + seeds),
                                            bootstrap=halves if min(basis.n_images) // 2 * basis.rows_per_image
                                            >= basis.n_components else 0, seed=s0,
                                            solver=opts.get("solver", "auto"))
    map_method = opts.get("map_method", "none")
    if map_method != "none":
        examples = torch.stack([idx[0] for idx in basis.image_indices])  # each class's first (seeded) image
        out["examples"] = examples
        out["maps"] = [concept_maps(model, x[int(examples[i]) : int(examples[i]) + 1], basis, c, method=map_method,
                                    batch_size=int(opts.get("batch_size", 64)), output=output)[0]  # (k, C, H, W)
                       for i, c in enumerate(basis.classes)]
    if opts.get("relmax"):
        out["relmax"] = concept_prototypes(model, x, basis, top_k=opts["top_k"], pool=opts["pool"], geometry=opts["geometry"],
                                           predictions=preds, pooled=pooled, output=output, rank_by="relevance")
    return out


def _extra_record(extras: dict[str, Any], i: int, x: torch.Tensor, basis, opts: dict[str, Any], folder: Path, out_dir: Path,
                  name: str) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    imp = extras["importance"][i].tolist() if "importance" in extras else None
    if imp is not None:
        rec["importance"] = imp
        rec["importance_method"] = opts.get("importance")
        rec["importance_rank"] = [int(j) for j in np.argsort(-np.asarray(imp))]
    stab = None
    if "stability" in extras:
        st = extras["stability"]
        stab = st.cosine[i].tolist()
        rec["stability"] = stab
        rec["stability_seed_cosine"] = st.seed_cosine[i].tolist()
        rec["stability_bootstrap_cosine"] = st.bootstrap_cosine[i].tolist()
        rec["unstable"] = [j for j, v in enumerate(stab) if v < UNSTABLE_BELOW]
    if "relmax" in extras:
        rel = extras["relmax"]
        rec["relmax_top_image_index"] = rel.image_index[i].tolist()
        rec["relmax_top_scores"] = rel.scores[i].tolist()
    if "maps" in extras:
        path = folder / "maps.png"
        ex = int(extras["examples"][i])
        maps_figure(x[ex], extras["maps"][i].cpu(), extras["relmax"].crops[i] if "relmax" in extras else None, path,
                    labels=_concept_labels(imp, stab), title=f"class {name}: where each concept is (image {ex})",
                    method=opts.get("map_method"))
        rec["maps_figure"] = str(path.relative_to(out_dir))
        rec["map_image_index"] = ex
        rec["map_sums"] = extras["maps"][i].flatten(1).sum(1).tolist()
    return rec


def run_concept_campaign(model: nn.Module, x: torch.Tensor, classes: Sequence[int], out_dir: str | Path, *,
                         options: dict[str, Any], class_names: Sequence[str] = (), predictions: torch.Tensor | None = None,
                         batch_size: int = 1, executor: Any = None, resume: bool = True, progress: bool = True,
                         output: Any = None) -> list[dict]:
    """One unit per class on the shared run layer (``results.jsonl`` in ``out_dir``, resumable). ``output``: for a
    model returning a tuple/dict, which part holds the logits (as for ``explain``; used by class_concepts).

    ``batch_size`` classes are computed together (their NMFs batched) and committed together: the default 1
    commits each class as it finishes (a kill loses at most one class) and gives ``--workers N`` one class each
    at a time; batching classes only saves part of the NMF time, which is small next to the relevance."""
    from .basis import predict_classes

    preds = predict_classes(model, x, output=output) if predictions is None else predictions
    # a class's record depends on every option but the batch size, on the model's weights and on the images
    settings = {"options": {k: v for k, v in options.items() if k != "batch_size"},
                "model": {"type": type(model).__name__,
                          "fingerprint": state_fingerprint(model) if isinstance(model, nn.Module) else None},
                "data": tensor_fingerprint(x), "output": None if output is None or callable(output) else output}
    check_settings(out_dir, settings, resume=resume, what="a concepts campaign")
    units = [Unit(f"class{c:03d}", {"class": int(c)}) for c in classes]
    # the layer's pooled activations of every image, once per run (every class's prototypes rank crops of all
    # images; computed per unit, a one-class batch would redo this forward over the whole data for each class)
    with preserve_model_state(model), selected_output(model, output):
        pooled = pooled_activations(model, x, options["layer"], pool=options["pool"])
    context = {"model": model, "x": x, "predictions": preds, "options": dict(options), "class_names": list(class_names),
               "output": output, "pooled": pooled}
    return run_units(units, process_classes, out_dir, context=context, batch_size=batch_size, executor=executor,
                     resume=resume, progress=progress, desc="concepts")


def summarize(records: list[dict]) -> dict[str, Any]:
    """Per pool, the statistics (with counts k/n and 95% Wilson intervals of argmax = A) of all strips, of the
    top-1 strips alone (the research's test) and of the random control; NMF errors; skipped classes with their
    reasons; images excluded for relevance <= 0; whether the crops are whole images (a 1×1 grid)."""
    done = [r for r in records if not r.get("skipped")]
    out: dict[str, Any] = {"classes": [r["class"] for r in done], "skipped": [r["class"] for r in records if r.get("skipped")],
                           "skipped_reasons": {str(r["class"]): r.get("reason", "") for r in records if r.get("skipped")},
                           "excluded_images": {str(r["class"]): r.get("n_excluded", 0) for r in done if r.get("n_excluded")},
                           "whole_image_crops": any(tuple(r.get("grid", ())) == (1, 1) for r in done)}
    for pool in POOLS:
        p = torch.tensor([v for r in done for v in r[pool]["p"]])
        hit = torch.tensor([v for r in done for v in r[pool]["hit"]])
        p1 = torch.tensor([r[pool]["p"][0] for r in done])
        hit1 = torch.tensor([r[pool]["hit"][0] for r in done])
        cp = torch.tensor([v for r in done for v in r[pool]["control_p"]])
        ch = torch.tensor([v for r in done for v in r[pool]["control_hit"]])
        out[pool] = {"concepts": component_statistics(p, hit) if p.numel() else {},
                     "concepts_top1": component_statistics(p1, hit1) if p1.numel() else {},
                     "control": component_statistics(cp, ch) if cp.numel() else {}}
        every = [r[pool]["all_concepts"] for r in done if "all_concepts" in r[pool]]
        if every:  # with component_concepts: the same strips assembled from all concepts
            out[pool]["concepts_all"] = component_statistics(torch.tensor([v for e in every for v in e["p"]]),
                                                             torch.tensor([v for e in every for v in e["hit"]]))
        if p.numel():
            out[pool]["margin_points"] = 100 * (out[pool]["concepts"]["argmax_rate"] - out[pool]["control"]["argmax_rate"])
    stab = [v for r in done for v in r.get("stability", [])]
    if stab:
        out["stability"] = {"mean_cosine": float(np.mean(stab)), "min_cosine": float(np.min(stab)), "threshold": UNSTABLE_BELOW,
                            "unstable": sum(len(r.get("unstable", [])) for r in done), "concepts": len(stab)}
    if any("component_concepts" in r for r in done):
        out["component_concepts"] = {"k": len(next(r["component_concepts"] for r in done if "component_concepts" in r)),
                                     "method": next(r.get("importance_method") for r in done if "component_concepts" in r),
                                     "per_class": {str(r["class"]): r["component_concepts"] for r in done
                                                   if "component_concepts" in r}}
    if any("importance" in r for r in done):
        out["importance"] = {"method": next(r["importance_method"] for r in done if "importance" in r),
                             "most_important": {str(r["class"]): r["importance_rank"][0] for r in done if "importance" in r}}
    if done:
        rel = [r["relative_error"] for r in done]
        out["nmf"] = {"mean_relative_error": float(np.mean(rel)), "max_relative_error": float(np.max(rel)),
                      "mean_error": float(np.mean([r["recon_error"] for r in done]))}
    return out


def _pct(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def rate_text(s: dict[str, Any]) -> str:
    """argmax = A as "60.0% (6/10; 95% CI 31–83%)"."""
    if not s or "argmax_count" not in s:
        return _pct(s.get("argmax_rate")) if s else "n/a"
    return (f"{_pct(s['argmax_rate'])} ({s['argmax_count']}/{s['n']}; 95% CI "
            f"{100 * s['argmax_ci_low']:.0f}–{100 * s['argmax_ci_high']:.0f}%)")


_STATS = (("mean_p", "mean p(A)", lambda v: f"{v:.3f}"), ("std_p", "std p(A)", lambda v: f"{v:.3f}"),
          ("argmax_rate", "argmax = A", _pct), ("p_gt_0.1", "p > 0.1", _pct), ("p_gt_0.2", "p > 0.2", _pct),
          ("p_gt_0.5", "p > 0.5", _pct))


def _warnings(records: list[dict], summary: dict[str, Any], class_names: Sequence[str], warnings: Sequence[str]) -> list[str]:
    warnings = list(warnings)
    for r in records:
        warnings += r.get("warnings", [])
    if summary["whole_image_crops"]:
        warnings.append("the pooled crop grid is 1×1 (a layer after global pooling, or a pool as large as the layer's "
                        "grid): every crop is the whole image, so the prediction-from-components test classifies strips "
                        "of whole images and is not informative about concepts; use an earlier layer or a smaller --pool.")
    name = lambda c: class_names[c] if c < len(class_names) else str(c)  # noqa: E731
    for r in records:
        if r.get("skipped"):
            warnings.append(f"class {name(r['class'])} skipped: {r.get('reason', 'not in the basis')}; it is not counted "
                            "in the prediction-from-components test.")
    return list(dict.fromkeys(warnings))


def concepts_metrics(records: list[dict], *, options: dict[str, Any], model_info: dict | None = None,
                     class_names: Sequence[str] = (), checks: Sequence[str] = (), warnings: Sequence[str] = (),
                     command: str | None = None, headline_pool: str = "include", seconds: float | None = None) -> dict[str, Any]:
    """The content of ``metrics.json``: summary, options, model, checks, warnings, the research's numbers, per-class records."""
    summary = summarize(records)
    return {"summary": summary, "options": options, "model": model_info or {}, "checks": list(checks),
            "warnings": _warnings(records, summary, class_names, warnings), "research": RESEARCH_NUMBERS, "seconds": seconds,
            "classes": [{k: v for k, v in r.items() if k not in ("vectors",)} for r in records]}


def write_concepts_report(records: list[dict], out_dir: str | Path, *, options: dict[str, Any], model_info: dict | None = None,
                          class_names: Sequence[str] = (), checks: Sequence[str] = (), warnings: Sequence[str] = (),
                          command: str | None = None, headline_pool: str = "include", seconds: float | None = None,
                          metrics_file: bool = True) -> Path:
    """``report.html`` (and ``metrics.json`` unless ``metrics_file=False``) from the campaign's records; returns the HTML path."""
    out = Path(out_dir)
    summary = summarize(records)
    warnings = _warnings(records, summary, class_names, warnings)
    name = lambda c: class_names[c] if c < len(class_names) else str(c)  # noqa: E731
    done = [r for r in records if not r.get("skipped")]
    if metrics_file:
        write_json(concepts_metrics(records, options=options, model_info=model_info, class_names=class_names, checks=checks,
                                    warnings=warnings, seconds=seconds), out / "metrics.json")
    rows = []
    whats = ("concepts", "concepts_top1", "control") if int(options.get("strips") or 1) > 1 else ("concepts", "control")
    top = summary.get("component_concepts")
    if top:
        whats += ("concepts_all",)
    labels = {"concepts": "concept strips" if not top else f"strips of the {top['k']} most important concepts",
              "concepts_top1": "top-1 strips only (the research's test)", "control": "random crops (control)",
              "concepts_all": f"strips of all {options.get('components')} concepts (for comparison)"}
    for pool in POOLS:
        for what in whats:
            s = summary.get(pool, {}).get(what) or {}
            label = f"{labels[what]}, {pool} target"
            cells = [fmt(s[k]) if k in s else "n/a" for k, _, fmt in _STATS] + [f"{s['argmax_count']}/{s['n']}" if "n" in s else "n/a",
                     f"{100 * s['argmax_ci_low']:.0f}–{100 * s['argmax_ci_high']:.0f}%" if "n" in s else "n/a"]
            rows.append({"label": label, "bold": what == "concepts", "first": what == "concepts", "cells": cells})
    research = [{"label": f"{k} (ImageNet, 1000 classes)", "cells": [fmt(v[key]) if key in v else "—" for key, _, fmt in _STATS] + ["", ""]}
                for k, v in RESEARCH_NUMBERS.items()]
    per_class = [{"cls": name(r["class"]), "n": r["n_images"], "excluded": r.get("n_excluded", 0), "rel": f"{r['relative_error']:.3f}", "iters": r["nmf_iterations"],
                  "p_in": f"{r['include']['p'][0]:.2f}", "pred_in": name(r["include"]["predicted"][0]),
                  "p_ex": f"{r['exclude']['p'][0]:.2f}", "pred_ex": name(r["exclude"]["predicted"][0]),
                  "ok_in": bool(r["include"]["hit"][0]), "ok_ex": bool(r["exclude"]["hit"][0]), "figure": r["figure"],
                  "important": (f"{r['importance_rank'][0] + 1} ({r['importance'][r['importance_rank'][0]]:.2f})"
                                if "importance" in r else "—"),
                  "ranking": " > ".join(str(j + 1) for j in r["importance_rank"]) if "importance" in r else "—",
                  "stability": f"{min(r['stability']):.2f}" if r.get("stability") else "—",
                  "unstable": ", ".join(str(j + 1) for j in r.get("unstable", [])) or ("none" if r.get("stability") else "—"),
                  "maps_figure": r.get("maps_figure"), "map_image": r.get("map_image_index"),
                  "strip_concepts": ", ".join(str(j + 1) for j in r["component_concepts"]) if "component_concepts" in r else "all"}
                 for r in done]
    main = summary.get(headline_pool, {})
    cards = []
    for pool in POOLS:
        s = summary.get(pool, {})
        if s.get("concepts"):
            c = s["concepts"]
            cards.append({"label": f"argmax = A, {pool} target", "value": _pct(c["argmax_rate"]),
                          "sub": f"{c['argmax_count']}/{c['n']} strips, 95% CI {100 * c['argmax_ci_low']:.0f}–"
                                 f"{100 * c['argmax_ci_high']:.0f}%; random crops: {rate_text(s['control'])} "
                                 f"({s['margin_points']:+.0f} points)",
                          "accent": pool == headline_pool})
    if "nmf" in summary:
        cards.append({"label": "NMF relative error", "value": f"{summary['nmf']['mean_relative_error']:.3f}",
                      "sub": f"‖X − WH‖/‖X‖, mean over classes (max {summary['nmf']['max_relative_error']:.3f})"})
    if "stability" in summary:
        st = summary["stability"]
        cards.append({"label": "concept stability", "value": f"{st['min_cosine']:.2f}",
                      "sub": f"smallest matched cosine over other seeds and bootstrap halves (mean {st['mean_cosine']:.2f}); "
                             f"{st['unstable']} of {st['concepts']} concepts below {st['threshold']}"})
    n_ex = sum(summary["excluded_images"].values())
    cards.append({"label": "classes", "value": str(len(done)), "sub": f"{options.get('components')} concepts each"
                  + (f", strips of the {top['k']} most important" if top else "")
                  + (f"; {len(summary['skipped'])} skipped" if summary["skipped"] else "")
                  + (f"; {n_ex} images excluded (relevance ≤ 0 everywhere)" if n_ex else "")})
    headline = "Concepts per class"
    if main.get("concepts"):
        headline = (f"Strips of each class's {top['k'] if top else options.get('components')}"
                    f"{' most important' if top else ''} concept crops are classified as the class "
                    f"{rate_text(main['concepts'])} of the time ({headline_pool} target), random crops "
                    f"{rate_text(main['control'])}")
        if summary["whole_image_crops"]:
            headline += " — but every crop is the whole image (1×1 grid), so this does not test concepts"

    findings = []
    for pool in POOLS:
        s = summary.get(pool, {})
        if s.get("concepts"):
            findings.append(f"{pool} target: mean p(A) {s['concepts']['mean_p']:.2f} vs {s['control']['mean_p']:.2f} for random "
                            f"crops; argmax = A {s['margin_points']:+.0f} points over the control.")
        if s.get("concepts") and s.get("concepts_all"):
            findings.append(f"{pool} target: the {top['k']} most important concepts ({top['method']}) give argmax = A "
                            f"{rate_text(s['concepts'])}, all {options.get('components')} concepts "
                            f"{rate_text(s['concepts_all'])}.")
    return render("concepts.html.j2", out / "report.html", title="manifex · concepts", headline=headline,
                  subtitle=(f"layer {options.get('layer')} · {options.get('relevance')} relevance in a noise tunnel "
                            f"({options.get('samples')} samples) · NMF with {options.get('components')} components · up to "
                            f"{options.get('images_per_class')} images predicted as each class"),
                  findings=findings, cards=cards, stat_labels=[lab for _, lab, _ in _STATS] + ["argmax = A, k/n", "95% CI (Wilson)"], rows=rows, research=research,
                  per_class=per_class, options=options, model=model_info or {}, command=command, checks=list(checks),
                  warnings=warnings)
