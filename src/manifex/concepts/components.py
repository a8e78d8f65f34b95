"""The prediction-from-components test: do a class's concepts alone make the model predict the class?

For each class A, the top crop of each of its k concepts is assembled into one input — the research's
vertical strip (k·s × s pixels, fed unresized: models with global pooling accept it) or, for models that
need their own input size, a canvas of that size with the crops in a grid — and the model's softmax p(A) is
read. Statistics over classes: mean and std of p(A), the fraction with argmax = A, and the fractions with
p(A) > 0.1 / 0.2 / 0.5. The control assembles k *random* crops of the same size from the same pool of images
(several draws per class); a test that the concepts pass should beat it clearly.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from torch import nn

from ..attribution.core import OutputSelector, call_model, preserve_model_state, selected_output
from ..attribution.methods import model_device
from ..data.base import ImageDataset
from ..errors import InputError, ModelError
from .basis import ConceptBasis, as_images, predict_classes
from .prototypes import Prototypes, cell_boxes, concept_prototypes, crop_boxes

__all__ = ["ComponentTest", "prediction_from_components", "assemble", "component_statistics", "RESEARCH_NUMBERS",
           "wilson_interval"]

Layout = Literal["strip", "canvas"]

#: The research's numbers (ResNet50 on ImageNet, 1000 classes, 6 concepts, from the shipped results).
RESEARCH_NUMBERS = {
    "ResNet50 layer4.2, include target": {"mean_p": 0.898, "p_gt_0.5": 0.921},
    "ResNet50 layer4.2, exclude target": {"mean_p": 0.619, "p_gt_0.5": 0.626, "p_gt_0.1": 0.860},
    "ResNet50 layer3.5, include target": {"mean_p": 0.539, "p_gt_0.5": 0.540},
}


#: The 97.5% quantile of the standard normal distribution: a two-sided 95% interval.
Z_95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion k/n (95% for the default ``z``); (nan, nan) for n = 0.

    centre = (p̂ + z²/2n) / (1 + z²/n), half-width = z·√(p̂(1 − p̂)/n + z²/4n²) / (1 + z²/n): unlike p̂ ± z·√(p̂(1 − p̂)/n)
    it stays inside [0, 1] and does not collapse to a point at k = 0 or k = n."""
    if n <= 0:
        return (math.nan, math.nan)
    p, z2 = k / n, z * z
    d = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / d
    # at k = 0 (k = n) the lower (upper) bound is exactly 0 (1); the formula gives it up to round-off
    return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


def component_statistics(p: torch.Tensor, hit: torch.Tensor) -> dict[str, float]:
    """The research's five statistics of p(A) (any shape) and argmax = A (same shape, bool), with the counts
    behind the argmax rate: ``n`` inputs, ``argmax_count`` hits and the 95% Wilson interval
    ``argmax_ci_low``/``argmax_ci_high``."""
    p = p.double().flatten()
    n, k = int(p.numel()), int(hit.sum())
    lo, hi = wilson_interval(k, n)
    return {"mean_p": float(p.mean()), "std_p": float(p.std()) if p.numel() > 1 else 0.0,
            "argmax_rate": float(hit.double().mean()), "p_gt_0.1": float((p > 0.1).double().mean()),
            "p_gt_0.2": float((p > 0.2).double().mean()), "p_gt_0.5": float((p > 0.5).double().mean()),
            "n": n, "argmax_count": k, "argmax_ci_low": lo, "argmax_ci_high": hi}


@dataclass
class ComponentTest:
    """Per class: the assembled input ``inputs`` (C, channels, H', W'), p(A) ``p`` (C,), ``hit`` (C,) argmax = A
    (with ``strips_per_class`` n > 1: (C, n, ...), (C, n));
    the control's ``control_p``/``control_hit`` (C, n_control); ``stats``/``control_stats`` (five statistics)."""

    classes: list[int]
    inputs: torch.Tensor
    p: torch.Tensor
    hit: torch.Tensor
    predicted: torch.Tensor
    control_p: torch.Tensor
    control_hit: torch.Tensor
    stats: dict[str, float]
    control_stats: dict[str, float]
    exclude_target: bool
    layout: str
    crop_size: tuple[int, int]
    prototypes: Prototypes | None = field(default=None, repr=False)
    whole_image_crops: bool = False
    concepts: torch.Tensor | None = None  # (C, k′): the concepts assembled per class; None: all

    @property
    def margin(self) -> float:
        """argmax = A rate minus the control's, in points (percent)."""
        return 100.0 * (self.stats["argmax_rate"] - self.control_stats["argmax_rate"])


def _col(cls: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return cls if like.dim() == 1 else cls[:, None]


def assemble(crops: torch.Tensor, layout: Layout = "strip", canvas: tuple[int, int] | None = None, fill: float = 0.0) -> torch.Tensor:
    """One input from crops (..., k, C, s_h, s_w): a vertical strip (..., C, k·s_h, s_w) or a canvas
    (..., C, H, W) with the crops row by row in a grid (``fill`` elsewhere)."""
    *lead, k, ch, sh, sw = crops.shape
    if layout == "strip":
        return crops.transpose(-4, -3).reshape(*lead, ch, k * sh, sw)
    if layout != "canvas":
        raise InputError(f"layout must be 'strip' or 'canvas', got {layout!r}.")
    if canvas is None:
        raise InputError("layout='canvas' needs the model's input size (H, W).")
    H, W = canvas
    per_row = max(1, W // sw)
    rows = -(-k // per_row)
    if per_row * sw > W or rows * sh > H:
        raise InputError(f"{k} crops of {sh}×{sw} px do not fit a {H}×{W} canvas; use fewer concepts or a smaller layer grid.")
    out = crops.new_full((*lead, ch, H, W), fill)
    for m in range(k):
        r, c = divmod(m, per_row)
        out[..., r * sh : (r + 1) * sh, c * sw : (c + 1) * sw] = crops[..., m, :, :, :]
    return out


@torch.no_grad()
def _softmax(model: nn.Module, x: torch.Tensor, layout: str, batch_size: int = 256, output: OutputSelector = None) -> torch.Tensor:
    dev = model_device(model)
    outs = []
    try:
        with preserve_model_state(model), selected_output(model, output):
            for s in range(0, x.shape[0], batch_size):
                xb = x[s : s + batch_size]
                outs.append(torch.softmax(call_model(model, xb.to(dev) if dev is not None else xb).float(), dim=1).cpu())
    except (RuntimeError, ValueError) as e:
        if layout == "strip":
            raise ModelError(
                f"the model rejects the {tuple(x.shape[2:])} strip of concept crops ({type(e).__name__}: {str(e)[:160]}); "
                "a model without global pooling needs its own input size: use layout='canvas' (--layout canvas)."
            ) from None
        raise
    return torch.cat(outs)


def prediction_from_components(
    model: nn.Module,
    data: ImageDataset | torch.Tensor,
    basis: ConceptBasis,
    *,
    exclude_target: bool = False,
    layout: Layout = "strip",
    n_control: int = 10,
    strips_per_class: int = 1,
    prototypes: Prototypes | None = None,
    predictions: torch.Tensor | None = None,
    pool: int | str = 2,
    seed: int = 0,
    fill: float = 0.0,
    batch_size: int = 256,
    output: OutputSelector = None,
    concepts: torch.Tensor | Sequence[Sequence[int]] | None = None,
) -> ComponentTest:
    """Run the prediction-from-components test for every class of ``basis`` (see the module docstring).

    ``exclude_target``: crops only from images not predicted as the class (both for the concepts and the
    control). ``layout``: "strip" (the research's; needs a model with global pooling) or "canvas" (the
    model's input size). ``n_control`` random assemblies per class. ``strips_per_class``: the research
    assembles the top-1 crop of each concept (1); n > 1 also assembles the rank-2 … rank-n crops into n
    inputs per class (statistics over all of them: steadier with few classes). ``prototypes``: reuse
    computed ones (with ``top_k`` ≥ ``strips_per_class``). ``output``: for a model returning a tuple/dict, which
    part holds the logits (as for ``explain``). ``concepts``: per class of the basis (rows in its order), the indices
    of the concepts whose crops are assembled, the same number for every class (e.g. the k most important:
    :func:`~manifex.concepts.importance.top_concepts`); the control then assembles as many random crops. Default:
    all of them.

    A pooled grid of 1×1 (a layer after global pooling, or a pool as large as the layer's grid) makes every
    crop the whole image: the test then classifies k whole images, not concepts; a RuntimeWarning says so and
    ``whole_image_crops`` is True.
    """
    x = as_images(data)
    if isinstance(n_control, bool) or not isinstance(n_control, int) or n_control < 1:
        raise InputError(f"n_control must be a positive int, got {n_control!r}.")
    if layout not in ("strip", "canvas"):
        raise InputError(f"layout must be 'strip' or 'canvas', got {layout!r}.")
    if isinstance(strips_per_class, bool) or not isinstance(strips_per_class, int) or strips_per_class < 1:
        raise InputError(f"strips_per_class must be a positive int, got {strips_per_class!r}.")
    n_s = strips_per_class
    chosen = _check_concepts(concepts, basis)
    if predictions is None:
        predictions = predict_classes(model, x, batch_size, output=output)
    if prototypes is None:
        prototypes = concept_prototypes(model, x, basis, top_k=n_s, exclude_target=exclude_target, pool=pool,
                                        predictions=predictions, batch_size=batch_size, output=output)
    elif prototypes.exclude_target != exclude_target or prototypes.scores.shape[2] < n_s:
        raise InputError(f"the prototypes were computed with exclude_target={prototypes.exclude_target} and "
                         f"top_k={prototypes.scores.shape[2]}; need exclude_target={exclude_target}, top_k >= {n_s}.")
    whole = tuple(prototypes.grid) == (1, 1)
    if whole:
        warnings.warn("the pooled crop grid is 1×1: every crop is the whole image, so the prediction-from-components "
                      "test classifies strips of whole images and says nothing about concepts; use an earlier layer "
                      "or a smaller pool.", RuntimeWarning, stacklevel=2)
    crops = prototypes.crops[:, :, :n_s].transpose(1, 2)  # (C, n_s, k, ch, sh, sw): rank-r crop of each concept
    if chosen is not None:  # only the chosen concepts' crops, in the given order
        crops = torch.stack([crops[i][:, chosen[i]] for i in range(len(chosen))])
    canvas = tuple(x.shape[2:])
    inputs = assemble(crops, layout, canvas, fill)  # (C, n_s, ch, H', W')
    cls = torch.tensor(prototypes.classes)
    probs = _softmax(model, inputs.flatten(0, 1), layout, batch_size, output).reshape(len(cls), n_s, -1)
    p = probs.gather(2, cls[:, None, None].expand(len(cls), n_s, 1))[..., 0]
    predicted = probs.argmax(2)
    if n_s == 1:
        inputs, p, predicted = inputs[:, 0], p[:, 0], predicted[:, 0]

    # control: k random cells of the same grid geometry (same crop size) from the same image pool
    g = torch.Generator().manual_seed(seed)
    h, w = prototypes.grid
    C, k = len(cls), crops.shape[2]
    grid_boxes = cell_boxes(canvas, (h, w)) if prototypes.geometry == "grid" else None
    ctrl = []
    for i, c in enumerate(prototypes.classes):
        allowed = (predictions != c).nonzero().flatten() if exclude_target else torch.arange(x.shape[0])
        img = allowed[torch.randint(allowed.numel(), (n_control * k,), generator=g)]
        if grid_boxes is not None:
            cell = torch.randint(h * w, (n_control * k,), generator=g)
            boxes = grid_boxes.reshape(-1, 4)[cell]
        else:  # receptive-field crops: random boxes of the same size inside the padded image
            sh, sw = prototypes.crop_size
            top = torch.randint(x.shape[2] - sh + 1, (n_control * k,), generator=g) if x.shape[2] >= sh else torch.zeros(n_control * k, dtype=torch.long)
            left = torch.randint(x.shape[3] - sw + 1, (n_control * k,), generator=g) if x.shape[3] >= sw else torch.zeros(n_control * k, dtype=torch.long)
            boxes = torch.stack([top, left, top + sh, left + sw], 1)
        ctrl.append(crop_boxes(x, img, boxes, fill).reshape(n_control, k, *crops.shape[3:]))
    ctrl_inputs = assemble(torch.stack(ctrl), layout, canvas, fill)  # (C, n_control, ch, H', W')
    cprobs = _softmax(model, ctrl_inputs.flatten(0, 1), layout, batch_size, output).reshape(C, n_control, -1)
    control_p = cprobs.gather(2, cls[:, None, None].expand(C, n_control, 1))[..., 0]
    control_hit = cprobs.argmax(2) == cls[:, None]
    return ComponentTest(
        classes=list(prototypes.classes), inputs=inputs, p=p, hit=predicted == _col(cls, p), predicted=predicted,
        control_p=control_p, control_hit=control_hit, stats=component_statistics(p, predicted == _col(cls, p)),
        control_stats=component_statistics(control_p, control_hit), exclude_target=bool(exclude_target),
        layout=layout, crop_size=prototypes.crop_size, prototypes=prototypes, whole_image_crops=whole,
        concepts=chosen,
    )


def _check_concepts(concepts, basis: ConceptBasis) -> torch.Tensor | None:
    """``concepts`` as a (classes, k′) long tensor of distinct concept indices per class, or None (all)."""
    if concepts is None:
        return None
    try:
        chosen = torch.as_tensor(concepts)
    except (TypeError, ValueError):
        raise InputError("concepts must be a (classes, k) table of concept indices, one row per class of the basis, "
                         "the same number in every row.") from None
    k = basis.n_components
    if chosen.dim() != 2 or chosen.shape[0] != len(basis.classes) or chosen.shape[1] < 1 or chosen.dtype.is_floating_point \
            or chosen.dtype == torch.bool:
        raise InputError(f"concepts must hold integer concept indices of shape ({len(basis.classes)}, k) (one row per "
                         f"class of the basis, 1 <= k <= {k}), got {tuple(chosen.shape)} of {chosen.dtype}.")
    chosen = chosen.long()
    if bool(((chosen < 0) | (chosen >= k)).any()):
        raise InputError(f"concepts holds indices outside 0..{k - 1} (the basis has {k} concepts per class).")
    if any(len(set(row.tolist())) < len(row) for row in chosen):
        raise InputError("concepts names a concept more than once for a class; list each concept once.")
    return chosen
