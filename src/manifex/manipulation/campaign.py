"""Manipulation campaigns: many (original, target) pairs attacked in batches, resumable.

A *pair* is an original image, whose explanation is manipulated, and a target image, whose explanation
(for the class the model predicts on it) is the target map — as in the research code. Pairs come from a CSV
with columns ``original,target`` naming image files (:func:`pairs_from_csv`) or are sampled from an
:class:`~manifex.data.ImageDataset` (:func:`pairs_from_dataset`).

:func:`run_campaign` writes into ``out_dir`` the one experiment-folder layout (:mod:`manifex.experiment`)::

    experiment.json             the settings (explainer and attack options) under "settings"; a resume must use
                                the same ones (``resume=False`` starts over)
    results.jsonl               one JSON object per finished pair, appended after each batch
    units/<pair_id>/pair.pt     tensors of the pair (torch.load(..., weights_only=True))
    units/<pair_id>/figure.png  overview: original, manipulated, difference, original/target/manipulated maps
    summary.json                means over all finished pairs, rewritten at the end of every run

A pair's files are written before its line in ``results.jsonl``; the line is the commit. A re-run skips
every pair with a line, drops a truncated last line left by an interrupted write, and so loses at most the
batch in flight and duplicates nothing. The ``manifex attack`` and ``manifex smooth`` experiments
(:mod:`manifex.manipulation.experiment`, :mod:`manifex.manipulation.smooth_experiment`) run the same batch
function (:func:`attack_batch`) on the experiment contract.
"""
from __future__ import annotations

import contextlib
import csv
import inspect
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..attribution import Explainer, beta_smooth, make_explainer, preserve_model_state
from ..attribution.core import OutputSelector, check_output_selector, select_output, selected_output
from ..attribution.methods import model_device
from ..data import ImageDataset
from ..errors import DataError, InputError
from ..metrics import mse, output_change, pearson, perturbation_norms, ssim
from ..experiment import ExperimentFolder
from ..runs import Executor, JsonlLog, Unit, atomic_torch_save, atomic_write_json, read_jsonl, run_units, to_jsonable, unit_dir
from .attack import ManipulationResult, manipulate

__all__ = ["PairSet", "pairs_from_csv", "pairs_from_dataset", "run_campaign", "CampaignSummary", "read_results"]

PathLike = str | os.PathLike
RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
_SSIM_MIN_SIZE = 11  # manifex.metrics.ssim's Gaussian window
#: Per-pair numbers averaged in the summary (SSIM only for maps of at least 11×11).
METRIC_KEYS = tuple(f"{m}_{pair}" for pair in ("manip_target", "manip_orig", "orig_target") for m in ("pcc", "ssim", "mse")) + (
    "max_dp", "top1_kept", "l2", "linf", "iterations", "stopped", "seconds")
#: Attack options that do not change results (left out of the settings a resume is checked against).
_VOLATILE_OPTIONS = {"callback", "progress", "history_every"}


# ------------------------------------------------------------------------------------------------------
# pairs


@dataclass
class PairSet:
    """Pairs of a campaign. ``ids``, ``originals``, ``targets``: one entry per pair (ids unique, used as file
    names); ``load(name)`` returns one image (C, H, W) float32 in [0, 1]; ``image_shape`` (C, H, W).
    ``labels``: optional ``(original label, target label)`` per pair (datasets only)."""

    ids: list[str]
    originals: list[str]
    targets: list[str]
    load: Callable[[str], torch.Tensor]
    image_shape: tuple[int, int, int]
    source: str = ""
    labels: list[tuple[int, int]] | None = None

    def __post_init__(self) -> None:
        if not (len(self.ids) == len(self.originals) == len(self.targets)):
            raise InputError("ids, originals and targets must have one entry per pair.")
        if len(set(self.ids)) != len(self.ids):
            dup = sorted({i for i in self.ids if self.ids.count(i) > 1})
            raise InputError(f"pair ids must be unique; repeated: {dup[:5]}.")
        if self.labels is not None and len(self.labels) != len(self.ids):
            raise InputError("labels must have one (original, target) entry per pair.")

    def __len__(self) -> int:
        return len(self.ids)

    def images(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Originals and targets of the pairs at ``indices``: two (n, C, H, W) tensors."""
        xo = torch.stack([self.load(self.originals[i]) for i in indices])
        xt = torch.stack([self.load(self.targets[i]) for i in indices])
        return xo, xt


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(name).stem).strip("-")[:40] or "x"


_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "F")


def _image_loader(root: Path, channels: int) -> Callable[[str], torch.Tensor]:
    def load(name: str) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        path = root / name
        try:
            with Image.open(path) as im:
                im = im.convert("L" if channels == 1 else "RGB")
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(f"cannot read image {path} ({e}); delete or re-export the file.") from e
        a = np.asarray(im, dtype=np.float32) / 255.0
        t = torch.from_numpy(a.copy())
        return t.unsqueeze(0) if channels == 1 else t.permute(2, 0, 1).contiguous()

    return load


def pairs_from_csv(csv_path: PathLike, data_dir: PathLike | None = None, *,
                   image_shape: tuple[int, int, int] | None = None) -> PairSet:
    """Pairs listed in a CSV with a header row containing ``original,target`` (image file names relative to
    ``data_dir``, default the CSV's folder); other columns are ignored.

    Images are read with PIL, converted to grey (C = 1) or RGB (C = 3) and scaled to [0, 1]. With
    ``image_shape=(C, H, W)`` (the model input) every image must be H×W; without it every image must have
    the size of the first, and C = 1 if all are grey, else 3. Sizes are checked here, pixels read lazily.
    Pair ids: ``<row>_<original stem>_<target stem>`` (row counted from 0 after the header).
    DataError for a missing CSV, missing columns, missing image files and size mismatches.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(csv_path).expanduser()
    if not path.is_file():
        raise DataError(f"pairs CSV {path}: no such file; pass a CSV with a header row `original,target` naming image files.")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in ("original", "target") if c not in fields]
        if missing:
            raise DataError(
                f"pairs CSV {path}: missing column(s) {', '.join(missing)} (found: {', '.join(fields) or 'no header'}); "
                "the first row must be a header naming the columns `original,target`."
            )
        rows = []
        for line_no, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() if isinstance(v, str) else v for k, v in row.items()}
            if not any(row.values()):
                continue
            if not row.get("original") or not row.get("target"):
                raise DataError(f"pairs CSV {path}, line {line_no}: empty `original` or `target` value.")
            rows.append((row["original"], row["target"]))
    if not rows:
        raise DataError(f"pairs CSV {path} lists no pairs (only a header); add rows `original,target`.")
    root = Path(data_dir).expanduser() if data_dir is not None else path.parent
    if not root.is_dir():
        raise DataError(f"data directory {root}: no such directory (the images named in {path} are looked up there).")

    names = list(dict.fromkeys(n for pair in rows for n in pair))
    absent = [n for n in names if not (root / n).is_file()]
    if absent:
        shown = ", ".join(absent[:5]) + (f", ... ({len(absent) - 5} more)" if len(absent) > 5 else "")
        raise DataError(f"{len(absent)} image file(s) named in {path} are missing under {root}: {shown}.")

    sizes: dict[str, tuple[int, int]] = {}
    grey = True
    for n in names:
        try:
            with Image.open(root / n) as im:
                sizes[n], mode = im.size, im.mode
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"cannot read image {root / n} ({e}); delete or re-export the file.") from e
        if mode in _HIGH_DEPTH_MODES:
            raise DataError(f"image {root / n} has mode {mode} (16-bit/float); only 8-bit images are supported, re-export it.")
        grey &= mode in ("L", "1", "LA")
    if image_shape is not None:
        if len(image_shape) != 3 or image_shape[0] not in (1, 3):
            raise InputError(f"image_shape must be (C, H, W) with C = 1 or 3, got {image_shape!r}.")
        channels, (h, w) = int(image_shape[0]), (int(image_shape[1]), int(image_shape[2]))
        expected, what = (w, h), f"the model input {h}×{w} (H×W)"
    else:
        channels = 1 if grey else 3
        expected = sizes[names[0]]
        w, h = expected
        what = f"the first image {names[0]} ({h}×{w}, H×W)"
    wrong = [n for n in names if sizes[n] != expected]
    if wrong:
        shown = ", ".join(f"{n} ({sizes[n][1]}×{sizes[n][0]})" for n in wrong[:5])
        raise DataError(
            f"{len(wrong)} image(s) in {root} do not match {what}: {shown}{', ...' if len(wrong) > 5 else ''}; "
            "resize them to the model's input size."
        )
    ids = [f"{k:05d}_{_safe(o)}_{_safe(t)}" for k, (o, t) in enumerate(rows)]
    return PairSet(ids=ids, originals=[o for o, _ in rows], targets=[t for _, t in rows],
                   load=_image_loader(root, channels), image_shape=(channels, h, w), source=str(path))


def pairs_from_dataset(dataset: ImageDataset, n_pairs: int, *, seed: int = 0) -> PairSet:
    """``n_pairs`` seeded random pairs from ``dataset``: distinct originals, each with a target image of a
    different label. The first k pairs do not depend on ``n_pairs`` (a larger campaign extends a smaller
    one). Names are dataset indices; ids ``<k>_o<original index>_t<target index>``."""
    if not isinstance(dataset, ImageDataset):
        raise InputError(f"dataset must be an ImageDataset, got {type(dataset).__name__}.")
    if isinstance(n_pairs, bool) or not isinstance(n_pairs, int) or not 1 <= n_pairs <= len(dataset):
        raise InputError(f"n_pairs must be an integer in [1, {len(dataset)}] (the dataset size), got {n_pairs!r}.")
    y = dataset.y
    if int(torch.unique(y).numel()) < 2:
        raise InputError("pairs need originals and targets of different classes, but the dataset has one class.")
    g = torch.Generator().manual_seed(seed)
    originals = torch.randperm(len(dataset), generator=g)[:n_pairs].tolist()
    targets = []
    for io in originals:
        candidates = (y != y[io]).nonzero().flatten()
        targets.append(int(candidates[torch.randint(len(candidates), (1,), generator=g)]))
    x = dataset.x
    return PairSet(
        ids=[f"{k:05d}_o{io}_t{it}" for k, (io, it) in enumerate(zip(originals, targets))],
        originals=[str(i) for i in originals], targets=[str(i) for i in targets],
        load=lambda name: x[int(name)], image_shape=tuple(dataset.image_shape), source=f"{dataset.name} (seed {seed})",
        labels=[(int(y[io]), int(y[it])) for io, it in zip(originals, targets)],
    )


# ------------------------------------------------------------------------------------------------------
# results file


def read_results(path: PathLike, *, repair: bool = False) -> list[dict]:
    """The records of a ``results.jsonl`` (:func:`manifex.runs.read_jsonl`). A last line cut short by an
    interrupted write (no newline, or not valid JSON) is ignored with a warning, and removed from the file
    when ``repair``; a bad line before the last raises DataError."""
    return read_jsonl(path, repair=repair)


def _num(t: torch.Tensor) -> float | None:
    v = float(t)
    return v if math.isfinite(v) else None


# ------------------------------------------------------------------------------------------------------
# the campaign


@dataclass
class CampaignSummary:
    """The outcome of a campaign over all finished pairs (this run and earlier ones).

    ``means``: mean of every numeric metric over the pairs (NaN/None entries skipped); ``top1_kept_rate``:
    fraction of pairs whose predicted class was kept; ``records``: one dict per finished pair, in pair
    order; ``n_new``/``n_skipped``: pairs computed in this run / found finished."""

    out_dir: Path
    n_pairs: int
    n_new: int
    n_skipped: int
    top1_kept_rate: float | None
    means: dict[str, float]
    records: list[dict] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"out_dir": str(self.out_dir), "n_pairs": self.n_pairs, "n_new": self.n_new, "n_skipped": self.n_skipped,
                "top1_kept_rate": self.top1_kept_rate, "means": self.means, "settings": self.settings}


_ATTACK_PARAMS = {
    name for name, p in inspect.signature(manipulate).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
} - {"target", "explainer_options"}


def _check_attack_options(attack_options: dict[str, Any]) -> None:
    unknown = sorted(set(attack_options) - _ATTACK_PARAMS)
    if unknown:
        raise InputError(f"unknown attack option(s) {', '.join(unknown)}; valid: {', '.join(sorted(_ATTACK_PARAMS))}.")


def run_campaign(
    model: nn.Module,
    explainer: Explainer | str,
    pairs: PairSet,
    out_dir: PathLike,
    *,
    batch_size: int = 16,
    explainer_options: dict[str, Any] | None = None,
    resume: bool = True,
    figures: bool = True,
    pixel_scale: float | Sequence[float] | torch.Tensor = 1.0,
    progress: bool = False,
    executor: Executor | None = None,
    output: OutputSelector = None,
    desc: str | None = None,
    **attack_options: Any,
) -> CampaignSummary:
    """Attack every pair of ``pairs`` (batches of ``batch_size``) and record the results in ``out_dir``.

    ``explainer``: an Explainer built on ``model`` or a method name (+ ``explainer_options``). The target map
    of a pair is the explanation of its target image for the class the model predicts on it; the
    explained class of the original is the model's prediction (see :func:`manipulate`, which gets
    ``attack_options``). ``resume``: skip pairs already in ``results.jsonl`` (the settings must match
    those recorded in ``experiment.json``); ``resume=False`` starts the results over. ``figures``: write an overview PNG per
    pair. ``pixel_scale``: the std of the model's input normalisation, to report L2/L∞ in [0, 1] pixel
    units (1 for models that read [0, 1] images). SSIM needs maps of at least 11×11 (else null).
    ``executor``: where the batches run — :class:`manifex.runs.LocalExecutor` (default: here) or
    :class:`manifex.runs.RayExecutor` (Ray workers; the model, explainer and pairs go to each worker once,
    and the pairs' images must be readable there). Records are the same up to float round-off.
    ``output``: for a model returning a tuple or dict, which part holds the logits (index, key or callable;
    default the explainer's own ``output``); every model call of the campaign (the target images' classes,
    the attack) then sees only the logits. It travels to the workers with the model; a callable must be
    picklable there (a top-level function, not a lambda). ``desc``: the progress bar's label (default
    "campaign").
    Returns a :class:`CampaignSummary` (also written to ``summary.json``).
    """
    if not isinstance(pairs, PairSet):
        raise InputError(f"pairs must be a PairSet (pairs_from_csv / pairs_from_dataset), got {type(pairs).__name__}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    _check_attack_options(attack_options)
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be an nn.Module, got {type(model).__name__}.")
    if isinstance(explainer, str):
        explainer = make_explainer(model, explainer, **(explainer_options or {}))
    elif explainer_options:
        raise InputError("explainer_options only apply when the explainer is given by name.")
    elif not isinstance(explainer, Explainer) or explainer.model is not model:
        raise InputError("explainer must be a method name or a manifex Explainer built on the campaign's model.")

    return _campaign(model, explainer, pairs, out_dir, batch_size=batch_size, resume=resume, figures=figures,
                     pixel_scale=pixel_scale, progress=progress, executor=executor, smooth=None, attack_options=attack_options,
                     output=output, desc=desc)


def _output_setting(output: OutputSelector) -> Any:
    """The selector as the campaign's settings record it (a callable by name, stable across runs)."""
    return output if output is None or isinstance(output, (int, str)) else getattr(output, "__qualname__", repr(output))


def _campaign(model: nn.Module, explainer: Explainer, pairs: PairSet, out_dir: PathLike, *, batch_size: int,
              resume: bool, figures: bool, pixel_scale: Any, progress: bool, executor: Executor | None,
              smooth: tuple | None, attack_options: dict[str, Any], output: OutputSelector = None,
              desc: str | None = None) -> CampaignSummary:
    """run_campaign after its checks; ``smooth=(β, functional[, unsupported])``: attack the softplus(β) model
    (applied by whichever process runs a batch, so it also holds on Ray workers). ``output``: the logits
    selector (default the explainer's), applied around every model call of a batch."""
    output = check_output_selector(explainer.output if output is None else output)
    out = Path(out_dir).expanduser()
    settings = campaign_settings(explainer, attack_options, pixel_scale, output)
    folder = ExperimentFolder(out, command="campaign", resume=resume, what="a campaign", advice=PYTHON_ADVICE)
    log = JsonlLog(out / RESULTS_FILE, key="id")
    previous = log.load(repair=True)  # a line cut short by a killed writer is dropped before the comparison
    folder.claim("settings", settings)
    todo = [i for i in range(len(pairs)) if pairs.ids[i] not in previous]
    n_skipped = len(pairs) - len(todo)
    if todo:
        dev = model_device(model)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        check_model_accepts(model, pairs, todo[0], dev, dtype, output)

    context = CampaignContext(model=model, explainer=explainer, pairs=pairs, attack_options=dict(attack_options),
                              pixel_scale=pixel_scale, figures=figures, smooth=smooth, output=output)
    run_units(pair_units(pairs), attack_batch, out, context=context, batch_size=batch_size, executor=executor, resume=True,
              progress=progress, results=RESULTS_FILE, desc=desc or "campaign")
    summary = summarise(out, pairs, read_results(out / RESULTS_FILE), n_new=len(todo), n_skipped=n_skipped, settings=settings)
    atomic_write_json(out / SUMMARY_FILE, {**summary.to_dict(), "records": summary.records})
    return summary


#: the ways out of a refused resume that a Python caller has (run_campaign and robustness_sweep take no overwrite)
PYTHON_ADVICE = "pass the same settings, resume=False to start over in this folder, or another out_dir."


def campaign_settings(explainer: Explainer, attack_options: dict[str, Any], pixel_scale: Any,
                      output: OutputSelector = None) -> dict[str, Any]:
    """What a campaign's records depend on beyond the model and the pairs: the explainer, the attack options (less
    the volatile ones), the pixel scale and the output selector (recorded only when set, so campaigns of plain
    models resume as before). ``experiment.json`` claims it as ``settings``; reports show it."""
    settings = {
        "explainer": repr(explainer),
        "attack": {k: to_jsonable(v) for k, v in sorted(attack_options.items()) if k not in _VOLATILE_OPTIONS},
        "pixel_scale": to_jsonable(pixel_scale),
    }
    if output is not None:
        settings["output"] = _output_setting(output)
    return settings


def pair_units(pairs: PairSet, prefix: str = "") -> list[Unit]:
    """One run-layer unit per pair: id ``<prefix><pair id>`` (its files go to ``units/<id>/``), payload its index."""
    return [Unit(f"{prefix}{pid}", {"index": i}) for i, pid in enumerate(pairs.ids)]


@dataclass
class CampaignContext:
    """What every batch of a campaign needs; sent once to each worker."""

    model: nn.Module
    explainer: Explainer
    pairs: PairSet
    attack_options: dict[str, Any]
    pixel_scale: Any
    figures: bool
    smooth: tuple | None = None  # (β, functional[, unsupported])
    output: OutputSelector = None  # the logits selector of a tuple/dict-output model


def attack_batch(units: list[Unit], ctx: CampaignContext, out: Path) -> list[dict]:
    """The run-layer process of a campaign: attack one batch of pairs, write their files (``units/<unit id>/pair.pt``
    and ``figure.png``), return one record per pair (``id`` = the unit's id, ``pair_id`` = the pair's)."""
    model, explainer, pairs = ctx.model, ctx.explainer, ctx.pairs
    batch = [int(u.payload["index"]) for u in units]
    dev = model_device(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    eval_mode = ctx.attack_options.get("eval_mode", True)
    signed = bool(ctx.attack_options.get("signed", False))
    t0 = time.perf_counter()
    xo, xt = pairs.images(batch)
    xo, xt = xo.to(device=dev, dtype=dtype), xt.to(device=dev, dtype=dtype)
    with contextlib.ExitStack() as stack:
        stack.enter_context(selected_output(model, ctx.output))  # model(xt) below sees the logits too
        if ctx.smooth is not None:
            stack.enter_context(preserve_model_state(model))
            unsupported = ctx.smooth[2] if len(ctx.smooth) > 2 else "raise"
            stack.enter_context(beta_smooth(model, ctx.smooth[0], functional=ctx.smooth[1], unsupported=unsupported))
        with preserve_model_state(model):
            if eval_mode:
                model.eval()
            with torch.no_grad():
                class_t = model(xt).argmax(1)
            target_expl = explainer.attribute(xt, class_t)
        res = manipulate(model, explainer, xo, target_expl, output=ctx.output, **ctx.attack_options)
    seconds = (time.perf_counter() - t0) / len(batch)
    records = _records(res, pairs, batch, class_t, ctx.pixel_scale, seconds)
    for j, (unit, rec) in enumerate(zip(units, records)):
        rec["id"] = unit.id
        folder = unit_dir(out, unit.id)
        rel = folder.relative_to(out).as_posix()
        atomic_torch_save({
            "x": res.x[j].cpu(), "x_adv": res.x_adv[j].cpu(), "x_target": xt[j].cpu(),
            "original_explanation": res.original_explanation[j].cpu(),
            "target_explanation": target_expl[j].detach().cpu(),
            "manipulated_explanation": res.manipulated_explanation[j].cpu(),
            "original_map": res.original_map[j].cpu(), "target_map": res.target_map[j].cpu(),
            "manipulated_map": res.manipulated_map[j].cpu(),
            "logits": res.logits[j].cpu(), "logits_adv": res.logits_adv[j].cpu(), "target": res.target[j].cpu(),
        }, folder / "pair.pt")
        rec["files"] = {"tensors": f"{rel}/pair.pt"}
        if ctx.figures:
            _overview(res, j, xt[j], rec, signed, folder / "figure.png")
            rec["files"]["figure"] = f"{rel}/figure.png"
    return records


def check_model_accepts(model: nn.Module, pairs: PairSet, i: int, dev: torch.device | None, dtype: torch.dtype,
                         output: OutputSelector = None) -> None:
    x = pairs.load(pairs.originals[i]).unsqueeze(0).to(device=dev, dtype=dtype)
    try:
        with preserve_model_state(model), torch.no_grad():
            model.eval()
            raw = model(x)
    except Exception as e:  # the model's own error says little about the images
        raise InputError(
            f"the model does not accept the pair images of shape {tuple(pairs.image_shape)} (C, H, W) ({type(e).__name__}: {e}); "
            "the images must have the model's input size and channels."
        ) from e
    out = select_output(raw, output)  # a tuple/dict output without output= is an InputError naming the option
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise InputError(f"the model must return (N, K) logits, got {type(out).__name__} of shape {tuple(getattr(out, 'shape', ()))}.")


def _records(res: ManipulationResult, pairs: PairSet, batch: list[int], class_t: torch.Tensor,
             pixel_scale: Any, seconds: float) -> list[dict]:
    om, tm, mm = res.original_map, res.target_map, res.manipulated_map
    sim = {"manip_target": (mm, tm), "manip_orig": (mm, om), "orig_target": (om, tm)}
    values: dict[str, torch.Tensor | None] = {}
    big_enough = min(om.shape[-2:]) >= _SSIM_MIN_SIZE
    for key, (a, b) in sim.items():
        values[f"pcc_{key}"] = pearson(a, b)
        values[f"ssim_{key}"] = ssim(a, b) if big_enough else None
        values[f"mse_{key}"] = mse(a, b)
    change = output_change(res.logits, res.logits_adv)
    norms = perturbation_norms(res.x, res.x_adv, pixel_scale)
    records = []
    for j, i in enumerate(batch):
        rec: dict[str, Any] = {"id": pairs.ids[i], "pair_id": pairs.ids[i], "original": pairs.originals[i],
                               "target": pairs.targets[i]}
        if pairs.labels is not None:
            rec["label_original"], rec["label_target"] = pairs.labels[i]
        rec.update({
            "explained_class": int(res.target[j]), "class_target_image": int(class_t[j]),
            "class_manipulated": int(change.top1_adv[j]),
        })
        for k, v in values.items():
            rec[k] = None if v is None else _num(v[j])
        rec.update({
            "max_dp": _num(change.max_prob_change[j]), "top1_kept": bool(change.top1_kept[j]),
            "l2": _num(norms.l2[j]), "linf": _num(norms.linf[j]),
            "iterations": int(res.iterations[j]), "stopped": bool(res.stopped[j]), "seconds": round(seconds, 4),
        })
        records.append(rec)
    return records


def _overview_title(rec: dict) -> str:
    """The overview figure's title for a pair's record; L∞ in units of 1/255 like the reports."""
    fmt = lambda v, spec=".2f": "n/a" if v is None else format(v, spec)  # noqa: E731
    linf = None if rec.get("linf") is None else rec["linf"] * 255
    return (f"{rec['pair_id']}: PCC to target {fmt(rec['pcc_orig_target'])} → {fmt(rec['pcc_manip_target'])}, "
            f"max |Δp| {fmt(rec['max_dp'], '.3f')}, L∞ {fmt(linf, '.1f')}/255, "
            f"top-1 {'kept' if rec['top1_kept'] else 'changed'}")


def _overview(res: ManipulationResult, j: int, x_target: torch.Tensor, rec: dict, signed: bool, path: Path) -> None:
    from ..viz import image_grid

    kind = "signed" if signed else "absolute"
    image_grid(
        [[res.x[j], x_target, res.x_adv[j], res.x_adv[j] - res.x[j], res.original_map[j], res.target_map[j], res.manipulated_map[j]]],
        kinds=["image", "image", "image", "signed", kind, kind, kind],
        col_titles=["original", "target image", "manipulated", "difference", "original map", "target map", "manipulated map"],
        title=_overview_title(rec),
        path=path,
    )


def summarise(out: Path, pairs: PairSet, records: list[dict], *, n_new: int, n_skipped: int,
              settings: dict) -> CampaignSummary:
    """The :class:`CampaignSummary` of ``records`` (any order; matched to ``pairs`` by ``pair_id``)."""
    by_id = {r.get("pair_id"): r for r in records}
    ordered = [by_id[i] for i in pairs.ids if i in by_id]
    means: dict[str, float] = {}
    for k in METRIC_KEYS:
        vals = [float(r[k]) for r in ordered if isinstance(r.get(k), (int, float))]  # bools count as 0/1
        if vals:
            means[k] = float(np.mean(vals))
    kept = [bool(r["top1_kept"]) for r in ordered if "top1_kept" in r]
    return CampaignSummary(
        out_dir=out, n_pairs=len(ordered), n_new=n_new, n_skipped=n_skipped,
        top1_kept_rate=float(np.mean(kept)) if kept else None, means=means, records=ordered, settings=settings,
    )
