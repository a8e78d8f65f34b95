"""Prototype crops: the image regions whose activation vectors point most nearly along a concept vector.

Research geometry (the default, ``geometry="grid"``): the layer's activations of every image (no relevance
weighting) are 2×2 average-pooled to (c, h, w); each concept vector is compared by cosine similarity with
every pooled position; the winning cell (i, j) is the pixel box [i·s, (i+1)·s) × [j·s, (j+1)·s) with
s = ⌊H / h⌋ (the cell's share of the image). ``geometry="receptive_field"`` crops instead the cell's
receptive field: the box of input pixels on which the pooled cell depends (measured once, by gradients on a
few data images), zero-padded at the image border so that every crop of a layer has the same size.

``rank_by="relevance"`` ranks the cells by the concept's relevance for its class instead of the cosine (RelMax,
as Zennit-CRP's reference images): at every position the activation's component along the unit concept vector
ĥ, ⟨a, ĥ⟩ ĥ, times the gradient of the class's logit, i.e. ⟨a, ĥ⟩ · ⟨∂f_A/∂a, ĥ⟩ (gradient × input of that
component), average-pooled like the activations (:func:`pooled_concept_relevance`). Activation ranking finds
where the concept is strongest; relevance ranking where it adds most to the class's logit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..attribution.core import OutputSelector, check_model_input, preserve_model_state, selected_output, warn_if_training
from ..attribution.layer import LayerGradient, check_layer_shape, layer_activations, resolve_layer
from ..attribution.methods import model_device
from ..data.base import ImageDataset
from ..errors import InputError
from .basis import ConceptBasis, as_images, predict_classes

__all__ = ["Prototypes", "concept_prototypes", "pooled_activations", "pooled_concept_relevance", "cell_boxes", "crop_boxes",
           "resolve_pool", "MAX_AUTO_POOL", "RANK_BY"]

#: How :func:`concept_prototypes` ranks the image cells of a concept: by its activation or by its relevance.
RANK_BY = ("activation", "relevance")

#: The largest pool that ``pool="auto"`` picks (the CLI's MNIST-5k setting: 16-px cells at blocks.2).
MAX_AUTO_POOL = 4

Geometry = Literal["grid", "receptive_field"]


@dataclass
class Prototypes:
    """Top crops of every concept of every class.

    ``scores`` (C, k, top_k): cosine similarity (``rank_by="activation"``) or the concept's pooled relevance
    for its class (``"relevance"``); ``image_index`` (C, k, top_k): index into the data;
    ``cells`` (C, k, top_k, 2): (i, j) of the pooled grid; ``boxes`` (C, k, top_k, 4): pixel box
    (top, left, bottom, right), bottom/right exclusive, possibly outside the image for the receptive field;
    ``crops`` (C, k, top_k, channels, s_h, s_w). ``exclude_target``: crops only from images not predicted
    as the class.
    """

    scores: torch.Tensor
    image_index: torch.Tensor
    cells: torch.Tensor
    boxes: torch.Tensor
    crops: torch.Tensor
    classes: list[int]
    exclude_target: bool
    geometry: str
    grid: tuple[int, int]
    rank_by: str = "activation"

    @property
    def crop_size(self) -> tuple[int, int]:
        return tuple(self.crops.shape[-2:])  # type: ignore[return-value]


def resolve_pool(pool: int | str, layer_grid: tuple[int, ...], layer: str = "the layer") -> int:
    """The pool size for a layer whose spatial grid is ``layer_grid`` (h, w) (``()`` for a dense (N, C) layer).

    ``"auto"``: the largest pool <= ``MAX_AUTO_POOL`` (4) that leaves a pooled grid of at least 2×2 (1 when the
    layer's grid is smaller than 4×4; MNIST-5k's blocks.2, 8×8: 4; digits8's blocks.2, 2×2: 1). An int larger
    than the grid is refused (InputError), since the pooled grid would be empty."""
    if pool == "auto":
        return max(1, min(MAX_AUTO_POOL, min(layer_grid) // 2)) if layer_grid else 1
    if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
        raise InputError(f"pool must be a positive int or 'auto', got {pool!r}.")
    if layer_grid and pool > min(layer_grid):
        raise InputError(f"pool {pool} is larger than the {layer_grid[0]}×{layer_grid[1]} grid of {layer}; use a pool of at "
                         f"most {min(layer_grid)} ('auto' picks {resolve_pool('auto', layer_grid)}).")
    return pool


@torch.no_grad()
def pooled_activations(model: nn.Module, x: torch.Tensor, layer: str | nn.Module, *, pool: int | str = 2,
                       batch_size: int = 256) -> torch.Tensor:
    """The layer's activations of every image, ``pool`` × ``pool`` average-pooled: (N, c, h, w) on the CPU
    (``pool="auto"``: see :func:`resolve_pool`; a pool larger than the layer's grid is an InputError, raised
    on the first batch). The model's state is left as found."""
    dev = model_device(model)
    out = []
    with preserve_model_state(model):
        for s in range(0, x.shape[0], batch_size):
            xb = x[s : s + batch_size]
            a = layer_activations(model, xb.to(dev) if dev is not None else xb, layer)
            check_layer_shape(tuple(a.shape), str(layer), what="concept prototypes")
            if s == 0:
                pool = resolve_pool(pool, tuple(a.shape[2:]), f"layer {layer if isinstance(layer, str) else type(layer).__name__}")
            if a.dim() == 2:
                a = a[:, :, None, None]
            elif pool > 1:
                a = F.avg_pool2d(a, pool, pool)
            out.append(a.cpu())
    return torch.cat(out)


def pooled_concept_relevance(model: nn.Module, x: torch.Tensor, basis: ConceptBasis, *, pool: int | str = 2,
                             batch_size: int = 64, output: OutputSelector = None) -> torch.Tensor:
    """Per image, the relevance of every concept of ``basis`` for its class at every pooled cell:
    (N, C, k, h, w) on the CPU, ⟨a, ĥ⟩ · ⟨∂f_class/∂a, ĥ⟩ per position (ĥ the unit concept vector),
    ``pool`` × ``pool`` average-pooled (see the module docstring). One layer-gradient pass per class and batch,
    on the model's device; the model's state is left as found."""
    module, name = resolve_layer(model, basis.layer)
    vecs = torch.nn.functional.normalize(basis.vectors.detach().double(), dim=-1)  # (C, k, c)
    explainer = LayerGradient(model, module, output=output)
    out = []
    with preserve_model_state(model), selected_output(model, output):
        for s in range(0, x.shape[0], batch_size):
            xb = check_model_input(model, x[s : s + batch_size], "data")
            a = layer_activations(model, xb, module)
            check_layer_shape(tuple(a.shape), name, what="concept prototypes")
            if s == 0:
                pool = resolve_pool(pool, tuple(a.shape[2:]), f"layer {name!r}")
            a4 = a[:, :, None, None] if a.dim() == 2 else a
            v = vecs.to(a.device)
            coeff = torch.einsum("nchw,ikc->nikhw", a4.double(), v)
            rel = []
            for i, cls in enumerate(basis.classes):
                g = explainer.attribute(xb, cls)
                g4 = g[:, :, None, None] if g.dim() == 2 else g
                rel.append(coeff[:, i] * torch.einsum("nchw,kc->nkhw", g4.double(), v[i]))
            r = torch.stack(rel, 1)  # (n, C, k, h, w)
            if a.dim() == 4 and pool > 1:
                n, C, k, h, w = r.shape
                r = F.avg_pool2d(r.reshape(n, C * k, h, w), pool, pool).reshape(n, C, k, h // pool, w // pool)
            out.append(r.cpu())
    return torch.cat(out)


def cell_boxes(image_hw: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """The research's pixel box of every grid cell: (h, w, 4) as (top, left, bottom, right), s = ⌊H/h⌋."""
    (H, W), (h, w) = image_hw, grid
    sh, sw = H // h, W // w
    i = torch.arange(h)[:, None].expand(h, w)
    j = torch.arange(w)[None, :].expand(h, w)
    return torch.stack([i * sh, j * sw, (i + 1) * sh, (j + 1) * sw], dim=-1)


def _receptive_boxes(model: nn.Module, x: torch.Tensor, layer, pool: int, grid: tuple[int, int]) -> torch.Tensor:
    """Per pooled cell, the bounding box of input pixels with a non-zero gradient of the cell's channel sum,
    over a few images; every box is then widened to the largest box size, centred on its own box."""
    dev = model_device(model)
    xb = x[: min(8, x.shape[0])].to(dev) if dev is not None else x[:8]
    h, w = grid
    boxes = torch.zeros(h, w, 4, dtype=torch.long)
    for i in range(h):
        for j in range(w):
            inp = xb.clone().requires_grad_(True)
            with torch.enable_grad(), preserve_model_state(model):
                a = layer_activations(model, inp, layer, create_graph=True)
                if pool > 1 and a.dim() == 4:
                    a = F.avg_pool2d(a, pool, pool)
                (g,) = torch.autograd.grad(a[:, :, i, j].sum(), inp)
            nz = g.abs().sum((0, 1)) > 0
            rows, cols = nz.any(1).nonzero().flatten(), nz.any(0).nonzero().flatten()
            if rows.numel() == 0:
                boxes[i, j] = torch.tensor([0, 0, x.shape[2], x.shape[3]])
            else:
                boxes[i, j] = torch.tensor([int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1])
    size_h = int((boxes[..., 2] - boxes[..., 0]).max())
    size_w = int((boxes[..., 3] - boxes[..., 1]).max())
    ch = (boxes[..., 0] + boxes[..., 2]) // 2
    cw = (boxes[..., 1] + boxes[..., 3]) // 2
    top, left = ch - size_h // 2, cw - size_w // 2
    return torch.stack([top, left, top + size_h, left + size_w], dim=-1)


def crop_boxes(x: torch.Tensor, index: torch.Tensor, boxes: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Crops (M, C, s_h, s_w) of images ``x[index]`` at ``boxes`` (M, 4); all boxes of one size; parts outside
    the image are ``fill``."""
    if index.numel() == 0:
        return x.new_zeros(0, x.shape[1], 0, 0)
    sh = int(boxes[0, 2] - boxes[0, 0])
    sw = int(boxes[0, 3] - boxes[0, 1])
    pad = max(0, int(-boxes[:, :2].min()), int(boxes[:, 2].max()) - x.shape[2], int(boxes[:, 3].max()) - x.shape[3])
    imgs = x[index.cpu()]
    if pad:
        imgs = F.pad(imgs, (pad, pad, pad, pad), value=fill)
    out = torch.empty(index.numel(), x.shape[1], sh, sw, dtype=x.dtype)
    for m in range(index.numel()):
        t, l_ = int(boxes[m, 0]) + pad, int(boxes[m, 1]) + pad
        out[m] = imgs[m, :, t : t + sh, l_ : l_ + sw]
    return out


def concept_prototypes(
    model: nn.Module,
    data: ImageDataset | torch.Tensor,
    basis: ConceptBasis,
    *,
    top_k: int = 8,
    exclude_target: bool = False,
    pool: int | str = 2,
    geometry: Geometry = "grid",
    batch_size: int = 256,
    predictions: torch.Tensor | None = None,
    pooled: torch.Tensor | None = None,
    progress: bool = False,
    output: OutputSelector = None,
    rank_by: str = "activation",
    relevance: torch.Tensor | None = None,
) -> Prototypes:
    """The ``top_k`` crops of every concept of ``basis`` among all pooled positions of ``data``.

    ``exclude_target``: only images the model does not predict as the concept's class (the research's
    stricter pool). ``pool``: the average-pool size of the layer's grid, or "auto" (:func:`resolve_pool`).
    ``geometry``: "grid" (the research's cell boxes) or "receptive_field". ``pooled`` and
    ``predictions`` may be passed when already computed (see :func:`pooled_activations`). ``output``: for a model
    returning a tuple/dict, which part holds the logits (to predict, with ``exclude_target``, and for the
    relevance). ``rank_by``: "activation" (the cosine, the research's ranking) or "relevance" (RelMax: the
    concept's relevance for its class, see the module docstring; ``relevance`` may pass it precomputed by
    :func:`pooled_concept_relevance`).
    """
    if rank_by not in RANK_BY:
        raise InputError(f"rank_by must be one of {', '.join(RANK_BY)}, got {rank_by!r}.")
    if not isinstance(basis, ConceptBasis):
        raise InputError(f"basis must be a ConceptBasis (from class_concepts), got {type(basis).__name__}.")
    if geometry not in ("grid", "receptive_field"):
        raise InputError(f"geometry must be 'grid' or 'receptive_field', got {geometry!r}.")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise InputError(f"top_k must be a positive int, got {top_k!r}.")
    x = as_images(data)
    module, _ = resolve_layer(model, basis.layer)
    dev = model_device(model)
    with preserve_model_state(model):
        grid = tuple(layer_activations(model, x[:1].to(dev) if dev is not None else x[:1], module).shape[2:])
    pool = resolve_pool(pool, grid, f"layer {basis.layer!r}")
    if pooled is None:
        pooled = pooled_activations(model, x, module, pool=pool, batch_size=batch_size)
    N, c, h, w = pooled.shape
    if c != basis.vectors.shape[-1]:
        raise InputError(f"the basis has {basis.vectors.shape[-1]} channels but layer {basis.layer!r} has {c}.")
    if exclude_target and predictions is None:
        predictions = predict_classes(model, x, batch_size, output=output)
    C, k = len(basis.classes), basis.n_components
    empty = [cl for cl, v in zip(basis.classes, basis.vectors) if not bool((v != 0).any())]
    if empty:
        raise InputError(f"the concept vectors of classes {empty} are all zero (their relevance was <= 0 everywhere), so "
                         "every crop would score 0 and be arbitrary; drop these classes from the basis.")
    pool_size = N if not exclude_target else int(min((predictions != cl).sum() for cl in basis.classes))
    if pool_size * h * w < top_k:
        raise InputError(f"only {pool_size * h * w} positions to choose {top_k} crops from; lower top_k or use more data.")
    if rank_by == "relevance":
        if relevance is None:
            warn_if_training(model)
            relevance = pooled_concept_relevance(model, x, basis, pool=pool, batch_size=batch_size, output=output)
        if tuple(relevance.shape) != (N, C, k, h, w):
            raise InputError(f"relevance must have shape {(N, C, k, h, w)} (images, classes, concepts, pooled grid), got "
                             f"{tuple(relevance.shape)}.")
    vecs = F.normalize(basis.vectors.detach().cpu().float().reshape(C * k, c), dim=1)
    best = torch.full((C * k, top_k), -float("inf"))
    best_pos = torch.zeros(C * k, top_k, dtype=torch.long)
    cls_of_row = torch.tensor(basis.classes).repeat_interleave(k)
    for s in tqdm(range(0, N, batch_size), desc="concepts: prototypes", disable=not progress, leave=False):
        if rank_by == "relevance":
            cos = relevance[s : s + batch_size].float().permute(1, 2, 0, 3, 4).reshape(C * k, -1)  # (C·k, n·h·w)
        else:
            p = F.normalize(pooled[s : s + batch_size].float().permute(0, 2, 3, 1).reshape(-1, c), dim=1)
            cos = vecs @ p.T  # (C·k, n·h·w)
        if exclude_target:
            img_pred = predictions[s : s + batch_size].repeat_interleave(h * w)
            cos = cos.masked_fill(cls_of_row[:, None] == img_pred[None, :], -float("inf"))
        pos = torch.arange(s * h * w, s * h * w + cos.shape[1]).expand_as(cos)
        merged, order = torch.cat([best, cos], 1).topk(top_k, dim=1)
        best, best_pos = merged, torch.cat([best_pos, pos], 1).gather(1, order)
    image_index = best_pos // (h * w)
    cell = best_pos % (h * w)
    cells = torch.stack([cell // w, cell % w], -1)
    table = cell_boxes(tuple(x.shape[2:]), (h, w)) if geometry == "grid" else _receptive_boxes(model, x, module, pool, (h, w))
    boxes = table[cells[..., 0], cells[..., 1]]
    crops = crop_boxes(x, image_index.flatten(), boxes.reshape(-1, 4))
    shape = (C, k, top_k)
    return Prototypes(scores=best.reshape(shape), image_index=image_index.reshape(shape), cells=cells.reshape(*shape, 2),
                      boxes=boxes.reshape(*shape, 4), crops=crops.reshape(*shape, *crops.shape[1:]), classes=list(basis.classes),
                      exclude_target=bool(exclude_target), geometry=geometry, grid=(h, w), rank_by=rank_by)
