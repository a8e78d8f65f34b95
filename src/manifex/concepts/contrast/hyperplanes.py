"""Class contrasting (Herdt & Otero Baguer, §3 of RESEARCH.md): what separates class A from class B at a layer.

1. :func:`class_activation_data` — per class, the raw activation vectors (rows, channels) at the positions
   where the class's layer relevance is high: channel-mean attribution (no ReLU) > ``threshold`` × the
   image's max, on up to ``images_per_class`` images the model *predicts* as the class.
2. :func:`train_hyperplanes` — one logistic hyperplane per ordered class pair (i, j), every pair trained at
   once as one batched torch problem with the research settings (``Linear(c, 1)``, BCE-with-logits,
   full-batch SGD, lr 0.01, 100 epochs, class i → 0, class j → 1). **Orientation:** the normal
   ``normals[i, j]`` points from class i toward class j: ⟨a, w_ij⟩ + b_ij > 0 on j's side.
3. :func:`contrastive_concepts` — "why A rather than B": on images predicted A, the mask
   m = ReLU(⟨a, w⟩ + b) with the hyperplane oriented toward A (w = −w_AB, b = −b_AB), then NMF on a ⊙ m.
   ``seed_compat=True`` reproduces the research code, which negated the normal but not the bias.

Why the hyperplanes are written by hand: scikit-learn's ``LogisticRegression`` fits one pair per call with its
own solvers (lbfgs, regularised), not the research's plain SGD schedule; the research trained the C·(C−1)
pairs in a Python loop. Here every pair's parameters live in one (C, C, c) tensor and one autograd step
updates them all (the loss is the sum of the pairs' mean losses, so each pair's gradient is its own).
"""
from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ...attribution.core import (
    OutputSelector,
    call_model,
    check_model_input,
    check_output_selector,
    preserve_model_state,
    selected_output,
    warn_if_training,
)
from ...attribution.layer import check_layer_shape, layer_activations, resolve_layer
from ...attribution.methods import model_device
from ...data.base import ImageDataset
from ...errors import InputError, ModelError
from ..basis import _DEFAULT_OPTIONS, RELEVANCES, ConceptBasis, as_images, predict_classes, relevance_explainer, select_class_images
from ..nmf import NMF_SOLVERS, nmf, nmf_error

__all__ = [
    "ClassActivations", "class_activation_data", "Hyperplanes", "train_hyperplanes", "hyperplane_loop",
    "ContrastiveConcepts", "contrastive_concepts", "OODFilter", "fit_ood_filter", "check_pair", "negative_layer_message",
]


# ------------------------------------------------------------------------------------------------ checks
def check_pair(a: int, b: int, n_classes: int) -> tuple[int, int]:
    """(a, b) as ints, or InputError for A = B or a class outside [0, n_classes)."""
    for name, v in (("A", a), ("B", b)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise InputError(f"class {name} must be an int class index, got {v!r}.")
    a, b = int(a), int(b)
    bad = [v for v in (a, b) if not 0 <= v < n_classes]
    if bad:
        raise InputError(f"class {bad[0]} is out of range: the model has {n_classes} classes, so use 0..{n_classes - 1}.")
    if a == b:
        raise InputError(f"the pair ({a}, {b}) contrasts a class with itself; choose two different classes A ≠ B.")
    return a, b


@contextlib.contextmanager
def model_session(model: nn.Module, output: OutputSelector = None) -> Iterator[None]:
    """The model as the explainers use it: a TrainModeWarning for a model in train mode, its logits picked by
    ``output`` (tuple/dict outputs), and its flags, ``requires_grad``, buffers and hooks restored afterwards,
    also on an exception."""
    warn_if_training(model, stacklevel=5)
    with preserve_model_state(model), selected_output(model, output):
        yield


def negative_layer_message(name: str, minimum: float, what: str) -> str:
    """The one-line refusal of a layer with negative activations where ``what`` needs a non-negative one."""
    return (f"layer {name!r} has negative activations (min {minimum:.3g}), but {what} needs a non-negative layer; "
            "pick a layer after a ReLU (a block output such as 'blocks.2', not a convolution or BatchNorm before its ReLU).")


def _check_model_layer(model: nn.Module, x: torch.Tensor, layer: str | nn.Module, what: str) -> tuple[nn.Module, str, int, torch.Tensor]:
    """(module, name, n_classes, activations of one batch): the model and layer checked on one batch (the images'
    dtype against the model's, their shape through :func:`call_model`). Call inside :func:`model_session`."""
    if not isinstance(model, nn.Module):
        raise InputError(f"{what} needs an nn.Module (it hooks a layer), got {type(model).__name__}.")
    module, name = resolve_layer(model, layer)
    probe = check_model_input(model, x[: min(8, x.shape[0])], "the images")
    with torch.no_grad():
        out = call_model(model, probe)
    if out.dim() != 2:
        raise ModelError(f"{what} needs a model that returns logits (N, classes), got {tuple(out.shape)}.")
    acts = layer_activations(model, probe, module)
    check_layer_shape(tuple(acts.shape), name, what=what)
    if not bool(torch.isfinite(acts).all()):
        raise ModelError(f"layer {name!r} produced NaN/inf activations on the first batch; check the model and its inputs.")
    return module, name, int(out.shape[1]), acts


def _pick_images(preds: torch.Tensor, classes: Sequence[int], per_class: int, seed: int) -> tuple[list[int], list[torch.Tensor]]:
    """The same seeded pick as ``class_concepts``: up to ``per_class`` images predicted as each class."""
    return select_class_images(preds, classes, per_class, seed)


def _rows(a: torch.Tensor) -> torch.Tensor:
    """(N, c, h, w) or (N, c) → (N, h·w, c)."""
    return a.permute(0, 2, 3, 1).reshape(a.shape[0], -1, a.shape[1]) if a.dim() == 4 else a[:, None, :]


# ------------------------------------------------------------------------------------------------ activation data
@dataclass
class ClassActivations:
    """Per class, the raw activation vectors at its high-relevance positions.

    ``vectors[k]`` (n_k, channels): rows of class ``classes[k]``; ``image_indices[k]``: the images used
    (indices into the data); ``fraction[k]``: the share of positions kept; ``fallback[k]``: images whose relevance
    was ≤ 0 everywhere (cut at min + threshold · (max − min) instead); ``layer``: the layer's name.
    """

    vectors: list[torch.Tensor]
    classes: list[int]
    layer: str
    image_indices: list[torch.Tensor] = field(default_factory=list)
    fraction: list[float] = field(default_factory=list)
    fallback: list[int] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return int(self.vectors[0].shape[1])

    def of(self, cls: int) -> torch.Tensor:
        if cls not in self.classes:
            raise InputError(f"class {cls} has no activation data; available classes: {self.classes}.")
        return self.vectors[self.classes.index(cls)]

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(X (C, n_max, channels) zero-padded, counts (C,))."""
        counts = torch.tensor([v.shape[0] for v in self.vectors])
        X = self.vectors[0].new_zeros(len(self.vectors), int(counts.max()), self.channels)
        for k, v in enumerate(self.vectors):
            X[k, : v.shape[0]] = v
        return X, counts


def class_activation_data(
    model: nn.Module,
    data: ImageDataset | torch.Tensor,
    layer: str | nn.Module,
    *,
    classes: Sequence[int] | None = None,
    images_per_class: int = 60,
    threshold: float = 0.25,
    relevance: str = "deeplift",
    relevance_options: dict[str, Any] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    predictions: torch.Tensor | None = None,
    progress: bool = False,
    output: OutputSelector = None,
) -> ClassActivations:
    """The hyperplane training data of each class: raw activation vectors (rows, channels) of ``layer`` at the
    positions whose channel-mean relevance for the class (no ReLU) exceeds ``threshold`` × that image's max.
    An image whose relevance is ≤ 0 everywhere (where the research rule keeps nothing) is cut at
    min + ``threshold`` · (max − min) instead; ``fallback`` counts those images per class.

    Images: up to ``images_per_class`` the model predicts as the class (the seeded pick of ``class_concepts``).
    ``relevance`` and ``relevance_options`` as in :func:`~manifex.concepts.class_concepts` (LayerDeepLift in a
    noise tunnel by default; "none" = the channel mean of the activations). A class without predicted images
    is skipped with a warning; InputError if none remains. ``output``: which part of a tuple/dict model output
    holds the logits (as in ``explain``). The model is left as found (train/eval flags, buffers, hooks).
    """
    output = check_output_selector(output)
    x = as_images(data)
    with model_session(model, output):
        return _class_activation_data(model, x, layer, classes, images_per_class, threshold, relevance, relevance_options,
                                      seed, batch_size, predictions, progress)


def _class_activation_data(model, x, layer, classes, images_per_class, threshold, relevance, relevance_options, seed,
                           batch_size, predictions, progress) -> ClassActivations:
    module, name, n_classes, _ = _check_model_layer(model, x, layer, "class_activation_data")
    if relevance not in RELEVANCES:
        raise InputError(f"relevance must be one of {', '.join(RELEVANCES)}, got {relevance!r}.")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
        raise InputError(f"threshold must be a number in [0, 1) (a fraction of each image's max relevance), got {threshold!r}.")
    for nm, v in (("images_per_class", images_per_class), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{nm} must be a positive int, got {v!r}.")
    opts = {**_DEFAULT_OPTIONS, **(relevance_options or {}), "relu": False}
    unknown = set(opts) - set(_DEFAULT_OPTIONS) - {"seed"}
    if unknown:
        raise InputError(f"unknown relevance_options {sorted(unknown)}; known: {sorted(_DEFAULT_OPTIONS)}.")
    classes = list(range(n_classes)) if classes is None else [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c < n_classes]
    if bad or not classes:
        raise InputError(f"classes must be indices in [0, {n_classes - 1}] (the model has {n_classes} outputs), got {bad or classes}.")
    preds = predict_classes(model, x, 4 * batch_size) if predictions is None else torch.as_tensor(predictions).cpu()
    if preds.shape != (x.shape[0],):
        raise InputError(f"predictions must have shape ({x.shape[0]},), got {tuple(preds.shape)}.")
    kept, picks = _pick_images(preds, classes, images_per_class, seed)
    if not kept:
        raise InputError(f"no image of the data is predicted as any of the classes {classes}; use more or other data.")
    explainer = relevance_explainer(model, module, x, relevance, {k: v for k, v in opts.items() if k != "seed"}, seed)[0]
    dev = model_device(model)
    index = torch.cat(picks)
    targets = torch.cat([torch.full((len(p),), c, dtype=torch.long) for c, p in zip(kept, picks)])
    rows, keep, nonpos = [], [], []
    for s in tqdm(range(0, index.numel(), batch_size), desc="contrast: relevance", disable=not progress, leave=False):
        xb = x[index[s : s + batch_size]]
        xb = xb.to(dev) if dev is not None else xb
        a = layer_activations(model, xb, module)
        r = a if explainer is None else explainer.attribute(xb, targets[s : s + batch_size].to(xb.device)).detach()
        r = r.mean(1)  # (n, h, w) or (n,): channel mean, no ReLU (the research's hyperplane path)
        r = r.reshape(r.shape[0], -1)
        hi, lo = r.max(1, keepdim=True).values, r.min(1, keepdim=True).values
        # the research rule r > τ·max keeps nothing when an image's relevance is negative everywhere (its
        # baseline scores higher than the image); such images use the same cut within their range instead
        cut = torch.where(hi > 0, threshold * hi, lo + threshold * (hi - lo))
        keep.append((r > cut).cpu())
        nonpos.append((hi[:, 0] <= 0).cpu())
        rows.append(_rows(a).cpu())
    A, K, NP = torch.cat(rows), torch.cat(keep), torch.cat(nonpos)
    if not bool(torch.isfinite(A).all()):
        raise ModelError(f"layer {name!r} produced NaN/inf activations; check the model and its inputs.")
    vectors, fraction, fallback, start = [], [], [], 0
    for p in picks:
        sel = K[start : start + len(p)]
        vectors.append(A[start : start + len(p)][sel])
        fraction.append(float(sel.float().mean()))
        fallback.append(int(NP[start : start + len(p)].sum()))
        start += len(p)
    return ClassActivations(vectors=vectors, classes=kept, layer=name, image_indices=picks, fraction=fraction, fallback=fallback,
                            options={"threshold": threshold, "relevance": relevance, "images_per_class": images_per_class,
                                     "seed": seed, **{k: v for k, v in opts.items() if k != "noise"}})


# ------------------------------------------------------------------------------------------------ hyperplanes
@dataclass
class Hyperplanes:
    """Logistic hyperplanes of every ordered class pair.

    ``normals`` (C, C, channels): ``normals[i, j]`` = w_ij, pointing from class ``classes[i]`` toward class
    ``classes[j]`` (⟨a, w_ij⟩ + b_ij > 0 is j's side); ``biases`` (C, C); ``accuracy`` (C, C) on the pair's
    training rows after training (NaN on the diagonal and for untrained pairs); ``trained`` (C, C) bool.
    """

    normals: torch.Tensor
    biases: torch.Tensor
    accuracy: torch.Tensor
    trained: torch.Tensor
    classes: list[int]
    layer: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    def _ix(self, cls: int) -> int:
        if cls not in self.classes:
            raise InputError(f"class {cls} has no hyperplanes; available classes: {self.classes}.")
        return self.classes.index(cls)

    def pair(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_AB (channels,), b_AB ()) — the normal points from A toward B."""
        if a == b:
            raise InputError(f"the pair ({a}, {b}) contrasts a class with itself; choose two different classes A ≠ B.")
        i, j = self._ix(a), self._ix(b)
        if not bool(self.trained[i, j]):
            raise InputError(f"the hyperplane ({a} → {b}) was not trained; include the pair in train_hyperplanes(pairs=...).")
        return self.normals[i, j], self.biases[i, j]

    def mean_accuracy(self) -> float:
        return float(self.accuracy[self.trained].mean()) if bool(self.trained.any()) else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"normals": self.normals.detach().cpu(), "biases": self.biases.detach().cpu(), "accuracy": self.accuracy.cpu(),
                "trained": self.trained.cpu(), "classes": list(self.classes), "layer": self.layer, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Hyperplanes":
        return cls(**d)


def _as_class_list(data: ClassActivations | Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[int], str]:
    if isinstance(data, ClassActivations):
        return list(data.vectors), list(data.classes), data.layer
    vecs = list(data)
    return vecs, list(range(len(vecs))), ""


def _pair_mask(C: int, classes: list[int], pairs: Sequence[tuple[int, int]] | None) -> torch.Tensor:
    if pairs is None:
        return ~torch.eye(C, dtype=torch.bool)
    mask = torch.zeros(C, C, dtype=torch.bool)
    for p in pairs:
        a, b = (int(v) for v in p)
        if a == b:
            raise InputError(f"the pair ({a}, {b}) contrasts a class with itself; choose two different classes A ≠ B.")
        for v in (a, b):
            if v not in classes:
                raise InputError(f"class {v} of pair ({a}, {b}) has no activation data; available classes: {classes}.")
        mask[classes.index(a), classes.index(b)] = True
    return mask


def hyperplane_init(C: int, channels: int, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The starting (W (C, C, channels), b (C, C)): nn.Linear's default, U(−1/√c, 1/√c), seeded."""
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(channels)
    W = (torch.rand(C, C, channels, generator=g, dtype=torch.float64) * 2 - 1) * bound
    b = (torch.rand(C, C, generator=g, dtype=torch.float64) * 2 - 1) * bound
    return W.to(dtype=dtype, device=device), b.to(dtype=dtype, device=device)


def _check_vectors(vecs: list[torch.Tensor]) -> None:
    if len(vecs) < 2:
        raise InputError(f"hyperplanes need the activation data of at least 2 classes, got {len(vecs)}.")
    c = vecs[0].shape[-1] if vecs[0].dim() == 2 else None
    for k, v in enumerate(vecs):
        if not isinstance(v, torch.Tensor) or v.dim() != 2 or v.shape[1] != c or not v.is_floating_point():
            raise InputError(f"class data {k} must be a float tensor (rows, {c}) like the others, got "
                             f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}.")
        if v.shape[0] == 0:
            raise InputError(f"class data {k} has no rows; lower the relevance threshold or use more images.")
        if not bool(torch.isfinite(v).all()):
            raise InputError(f"class data {k} contains NaN/inf values; check the activations it was built from.")
        if v.dtype != vecs[0].dtype or v.device != vecs[0].device:
            raise InputError(f"class data {k} is {v.dtype} on {v.device} but class data 0 is {vecs[0].dtype} on "
                             f"{vecs[0].device}; convert them to one dtype and device (e.g. [v.to({vecs[0].dtype}) for v in data]).")


def _check_init(init: object, C: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    want = f"(W ({C}, {C}, {c}), b ({C}, {C}))"
    if not isinstance(init, (tuple, list)) or len(init) != 2 or not all(isinstance(t, torch.Tensor) for t in init):
        raise InputError(f"init must be a pair of tensors {want}, got {type(init).__name__}.")
    W0, b0 = init
    if W0.shape != (C, C, c) or b0.shape != (C, C):
        raise InputError(f"init must be {want}, got {tuple(W0.shape)}, {tuple(b0.shape)}.")
    if not (W0.is_floating_point() and b0.is_floating_point()) or not bool(torch.isfinite(W0).all() and torch.isfinite(b0).all()):
        raise InputError("init must hold finite floating-point values; check the starting hyperplanes.")
    return W0, b0


def train_hyperplanes(
    data: ClassActivations | Sequence[torch.Tensor],
    *,
    pairs: Sequence[tuple[int, int]] | None = None,
    epochs: int = 100,
    lr: float = 0.01,
    seed: int = 0,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Hyperplanes:
    """One logistic hyperplane per ordered class pair, all trained at once (research settings by default).

    For the pair (i, j): logits ⟨a, w_ij⟩ + b_ij on the rows of class i (label 0) and class j (label 1),
    mean BCE-with-logits over those n_i + n_j rows, ``epochs`` full-batch SGD steps of size ``lr`` from
    ``init`` (default :func:`hyperplane_init`, nn.Linear's). So ``normals[i, j]`` points from class i toward
    class j. ``data``: a :class:`ClassActivations` or a list of (rows, channels) tensors, one per class (class
    k = index k). ``pairs``: ordered (A, B) class pairs to train (default every ordered pair i ≠ j). Runs in
    the data's dtype and on its device; equal to :func:`hyperplane_loop` (the research's per-pair loop).
    """
    vecs, classes, layer = _as_class_list(data)
    _check_vectors(vecs)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise InputError(f"epochs must be a positive int, got {epochs!r}.")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise InputError(f"lr must be a positive number, got {lr!r}.")
    C, c = len(vecs), vecs[0].shape[1]
    mask = _pair_mask(C, classes, pairs)
    dtype, dev = vecs[0].dtype, vecs[0].device
    counts = torch.tensor([v.shape[0] for v in vecs], device=dev)
    X = vecs[0].new_zeros(C, int(counts.max()), c)
    for k, v in enumerate(vecs):
        X[k, : v.shape[0]] = v.to(dtype)
    valid = (torch.arange(X.shape[1], device=dev)[None, :] < counts[:, None]).to(dtype)  # (C, n_max)
    W0, b0 = _check_init(init, C, c) if init is not None else hyperplane_init(C, c, seed=seed, dtype=dtype, device=dev)
    W = W0.detach().to(dtype=dtype, device=dev).clone()
    b = b0.detach().to(dtype=dtype, device=dev).clone()
    pm = mask.to(dev)
    denom = (counts[:, None] + counts[None, :]).to(dtype)  # (C, C): rows of the pair (i, j)
    scale = pm.to(dtype) / denom                           # d(mean loss)/d(row loss) of each trained pair, else 0
    v = valid[:, :, None]
    # Class i's rows meet the pairs (i, ·) as label 0, class j's rows the pairs (·, j) as label 1: two batched
    # matmuls give exactly the logits every pair needs, with no row of a class outside the pair. The gradient
    # of the mean BCE-with-logits is written out (σ(z) − y per row), which is what autograd would compute for
    # the per-pair loss, without building a graph each step.
    for _ in range(epochs):
        zi = torch.baddbmm(b[:, None, :], X, W.transpose(1, 2))                    # (C_i, n, C_j): pair (i, j) on i's rows
        Wt = W.transpose(0, 1)                                                       # Wt[j, i] = w_ij
        zj = torch.baddbmm(b.transpose(0, 1)[:, None, :], X, Wt.transpose(1, 2))    # (C_j, n, C_i): pair (i, j) on j's rows
        gi = torch.sigmoid(zi).mul_(v).mul_(scale[:, None, :])                      # label 0: σ(z)
        gj = torch.sigmoid(zj).sub_(1).mul_(v).mul_(scale.transpose(0, 1)[:, None, :])  # label 1: σ(z) − 1
        gW = torch.bmm(gi.transpose(1, 2), X) + torch.bmm(gj.transpose(1, 2), X).transpose(0, 1)
        gb = gi.sum(1) + gj.sum(1).transpose(0, 1)
        W -= lr * gW
        b -= lr * gb
    W, b = W.detach(), b.detach()
    with torch.no_grad():
        zi = torch.bmm(X, W.transpose(1, 2)) + b[:, None, :]
        zj = torch.bmm(X, W.permute(1, 2, 0)) + b.transpose(0, 1)[:, None, :]
        ci = ((zi <= 0).to(dtype) * valid[:, :, None]).sum(1)
        cj = ((zj > 0).to(dtype) * valid[:, :, None]).sum(1).transpose(0, 1)
        acc = ((ci + cj) / denom).masked_fill(~pm, float("nan"))
    zero = torch.zeros((), dtype=dtype, device=dev)
    return Hyperplanes(normals=torch.where(pm[:, :, None], W, zero), biases=torch.where(pm, b, zero), accuracy=acc,
                       trained=pm, classes=classes, layer=layer, options={"epochs": epochs, "lr": lr, "seed": seed})


def hyperplane_loop(data: ClassActivations | Sequence[torch.Tensor], *, pairs: Sequence[tuple[int, int]] | None = None,
                    epochs: int = 100, lr: float = 0.01, seed: int = 0,
                    init: tuple[torch.Tensor, torch.Tensor] | None = None, progress: bool = False) -> Hyperplanes:
    """The research's per-pair loop (one ``nn.Linear(c, 1)``, ``BCEWithLogitsLoss``, ``optim.SGD`` per pair),
    from the same starting point as :func:`train_hyperplanes`: the reference it is tested and benchmarked against."""
    vecs, classes, layer = _as_class_list(data)
    _check_vectors(vecs)
    C, c = len(vecs), vecs[0].shape[1]
    mask = _pair_mask(C, classes, pairs)
    dtype, dev = vecs[0].dtype, vecs[0].device
    W0, b0 = _check_init(init, C, c) if init is not None else hyperplane_init(C, c, seed=seed, dtype=dtype, device=dev)
    normals = torch.zeros(C, C, c, dtype=dtype, device=dev)
    biases = torch.zeros(C, C, dtype=dtype, device=dev)
    acc = torch.full((C, C), float("nan"), dtype=dtype, device=dev)
    for i, j in tqdm(mask.nonzero().tolist(), desc="hyperplanes (loop)", disable=not progress, leave=False):
        lin = nn.Linear(c, 1).to(dtype=dtype, device=dev)
        with torch.no_grad():
            lin.weight.copy_(W0[i, j][None])
            lin.bias.copy_(b0[i, j][None])
        feats = torch.cat([vecs[i], vecs[j]])
        y = torch.cat([torch.zeros(len(vecs[i])), torch.ones(len(vecs[j]))]).to(dtype=dtype, device=dev)
        opt = torch.optim.SGD(lin.parameters(), lr=lr)
        crit = nn.BCEWithLogitsLoss()
        with torch.enable_grad():
            for _ in range(epochs):
                loss = crit(lin(feats).squeeze(1), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            out = lin(feats).squeeze(1)
            acc[i, j] = ((out > 0).to(dtype) == y).to(dtype).mean()
        normals[i, j], biases[i, j] = lin.weight.detach()[0], lin.bias.detach()[0]
    return Hyperplanes(normals=normals, biases=biases, accuracy=acc, trained=mask.to(dev), classes=classes, layer=layer,
                       options={"epochs": epochs, "lr": lr, "seed": seed, "loop": True})


# ------------------------------------------------------------------------------------------------ OOD filter
@dataclass
class OODFilter:
    """Per class, a Gaussian mixture on its hyperplane data; a position is in-distribution for the class when
    its log-likelihood exceeds ``threshold`` (the research: 10 full-covariance components, −300)."""

    mixtures: dict[int, Any]
    threshold: float = -300.0

    def keep(self, cls: int, vectors: torch.Tensor) -> torch.Tensor:
        """(rows,) bool: which rows (rows, channels) the class's mixture keeps."""
        if cls not in self.mixtures:
            raise InputError(f"the OOD filter has no mixture for class {cls}; it has {sorted(self.mixtures)}.")
        ll = self.mixtures[cls].score_samples(vectors.detach().cpu().double().numpy())
        return torch.as_tensor(ll > self.threshold)


def fit_ood_filter(data: ClassActivations, *, n_components: int = 10, threshold: float = -300.0, seed: int = 0,
                   classes: Sequence[int] | None = None) -> OODFilter:
    """Fit scikit-learn ``GaussianMixture(n_components, covariance_type="full")`` per class on its rows."""
    from sklearn.mixture import GaussianMixture

    mixtures = {}
    for cls in (data.classes if classes is None else classes):
        v = data.of(int(cls))
        if v.shape[0] < n_components:
            raise InputError(f"class {cls} has {v.shape[0]} rows, fewer than the mixture's {n_components} components; "
                             "lower n_components or use more images.")
        gm = GaussianMixture(n_components=n_components, covariance_type="full", random_state=seed, reg_covar=1e-4)
        mixtures[int(cls)] = gm.fit(v.detach().cpu().double().numpy())
    return OODFilter(mixtures=mixtures, threshold=float(threshold))


# ------------------------------------------------------------------------------------------------ contrastive concepts
@dataclass
class ContrastiveConcepts:
    """Concepts of "A rather than B": ``basis`` is a one-class :class:`ConceptBasis` (class A) whose vectors
    (1, k, channels) are the NMF components of a ⊙ m; ``mask_fraction``: share of positions with m > 0."""

    a: int
    b: int
    basis: ConceptBasis
    mask_fraction: float
    seed_compat: bool
    ood_kept: float | None = None

    @property
    def vectors(self) -> torch.Tensor:
        return self.basis.vectors[0]


def contrastive_concepts(
    model: nn.Module,
    data: ImageDataset | torch.Tensor,
    hyperplanes: Hyperplanes,
    a: int,
    b: int,
    *,
    n_components: int = 6,
    images_per_class: int = 60,
    seed_compat: bool = False,
    ood: OODFilter | None = None,
    solver: str = "auto",
    seed: int = 0,
    batch_size: int = 64,
    predictions: torch.Tensor | None = None,
    output: OutputSelector = None,
) -> ContrastiveConcepts:
    """Why A rather than B: NMF (``n_components``) of a ⊙ m on images predicted A, at ``hyperplanes.layer``.

    m = ReLU(⟨a, w⟩ + b) per position, with the hyperplane oriented toward A: w = −w_AB, b = −b_AB (positive
    on A's side, growing with the distance from the A/B boundary). ``seed_compat=True`` uses b = +b_AB (the
    research code's defect: it negated the normal only). ``ood``: drop positions that class A's mixture calls
    out of distribution. Returns a :class:`ContrastiveConcepts` whose ``basis`` works with
    :func:`~manifex.concepts.concept_prototypes` (top crops). NMF needs non-negative activations: a layer with
    negative ones (a convolution or BatchNorm before its ReLU) is refused on the first batch, before any work.
    ``output``: which part of a tuple/dict model output holds the logits (as in ``explain``).
    """
    output = check_output_selector(output)
    x = as_images(data)
    if not isinstance(hyperplanes, Hyperplanes):
        raise InputError(f"hyperplanes must be a Hyperplanes (from train_hyperplanes), got {type(hyperplanes).__name__}.")
    with model_session(model, output):
        return _contrastive_concepts(model, x, hyperplanes, a, b, n_components, images_per_class, seed_compat, ood, solver,
                                     seed, batch_size, predictions)


def _contrastive_concepts(model, x, hyperplanes, a, b, n_components, images_per_class, seed_compat, ood, solver, seed,
                          batch_size, predictions) -> ContrastiveConcepts:
    module, name, n_classes, acts = _check_model_layer(model, x, hyperplanes.layer, "contrastive_concepts")
    what = "contrastive concepts (NMF of a ⊙ m)"
    if bool((acts < 0).any()):
        raise InputError(negative_layer_message(name, float(acts.min()), what))
    a, b = check_pair(a, b, n_classes)
    w_ab, b_ab = hyperplanes.pair(a, b)
    if acts.shape[1] != w_ab.shape[0]:
        raise InputError(f"the hyperplanes have {w_ab.shape[0]} channels but layer {name!r} has {acts.shape[1]}.")
    if solver not in NMF_SOLVERS:
        raise InputError(f"solver must be one of {', '.join(NMF_SOLVERS)}, got {solver!r}.")
    preds = predict_classes(model, x, 4 * batch_size) if predictions is None else torch.as_tensor(predictions).cpu()
    kept, picks = _pick_images(preds, [a], images_per_class, seed)
    if not kept:
        raise InputError(f"no image of the data is predicted as class {a}; contrastive concepts need images of A.")
    w = -w_ab
    bias = b_ab if seed_compat else -b_ab
    dev = model_device(model)
    rows = []
    for s in range(0, picks[0].numel(), batch_size):
        xb = x[picks[0][s : s + batch_size]]
        rows.append(_rows(layer_activations(model, xb.to(dev) if dev is not None else xb, module)).cpu())
    R = torch.cat(rows).reshape(-1, acts.shape[1])  # (n·h·w, c)
    if bool((R < 0).any()):
        raise InputError(negative_layer_message(name, float(R.min()), what))
    m = torch.relu(R @ w.to(R) + bias.to(R))
    ood_kept = None
    if ood is not None:
        ok = ood.keep(a, R)
        ood_kept = float(ok.float().mean())
        m = m * ok.to(m)
    X = R * m[:, None]
    if int((X.sum(1) > 0).sum()) < n_components:
        raise InputError(f"only {int((X.sum(1) > 0).sum())} positions of class {a} lie on A's side of the ({a} → {b}) "
                         f"hyperplane; NMF with {n_components} components needs more (more images, fewer components).")
    W, H, n_iter = nmf(X, n_components, solver=solver, seed=seed, return_n_iter=True)
    err = nmf_error(X, W, H)
    basis = ConceptBasis(vectors=H.detach()[None], classes=[a], n_images=[int(picks[0].numel())], recon_error=err[None],
                         relative_error=(err.double() / X.double().norm().clamp_min(1e-30)).to(err.dtype)[None],
                         layer=name, image_indices=picks, n_iter=[int(n_iter[0])],
                         options={"contrast": [a, b], "seed_compat": bool(seed_compat), "n_components": n_components,
                                  "solver": solver, "seed": seed, "ood": ood is not None})
    return ContrastiveConcepts(a=a, b=b, basis=basis, mask_fraction=float((m > 0).float().mean()),
                               seed_compat=bool(seed_compat), ood_kept=ood_kept)
