"""``class_concepts``: a few concept vectors per class at one layer (Herdt & Otero Baguer's recipe, batched).

Research recipe (the defaults), for each class A:

1. up to ``images_per_class`` images the model *predicts* as A (argmax, not the label), a seeded random pick;
2. relevance of the layer's output for A: LayerDeepLift (Rescale, × activation) in a SmoothGrad noise tunnel,
   20 samples, σ = 0.25 and baseline = the constant 1.0 *in the model's normalised input space*;
3. ``r`` = mean over channels of ReLU(relevance) (N, 1, h, w); ``A′ = r ⊙ activation`` (the clean image's);
4. rows = every spatial position of every image → an (N·h·w) × channels matrix; NMF with ``n_components``
   (scikit-learn's defaults); the components (k × channels, ≥ 0) are the class's concept vectors.

manifex's images live in [0, 1] without a normalisation layer, so σ and the baseline are translated from the
normalised space with the data's per-channel statistics: σ = 0.25 · std, baseline = mean + 1.0 · std (for
MNIST-5k: σ ≈ 0.08, baseline ≈ 0.44 gray). Pass numbers in ``relevance_options`` to override. All classes are
explained in one batched pass (per-example targets) and factorised in one batched NMF.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..attribution.layer import (
    LayerDeepLift,
    LayerGradientXActivation,
    LayerIntegratedGradients,
    check_layer_shape,
    layer_activations,
    resolve_layer,
)
from ..attribution.core import (
    OutputSelector,
    call_model,
    check_model_input,
    check_output_selector,
    preserve_model_state,
    selected_output,
    warn_if_training,
)
from ..attribution.methods import SmoothGrad, model_device
from ..data.base import ImageDataset
from ..errors import InputError, ModelError
from .nmf import NMF_SOLVERS, nmf, nmf_error

__all__ = ["ConceptBasis", "class_concepts", "RELEVANCES", "predict_classes", "as_images", "relevance_explainer",
           "select_class_images"]

#: The relevance that weights the activations before the NMF (:func:`class_concepts`): the layer attribution of
#: the class logit by DeepLift, Integrated Gradients or gradient × activation, or "none" (plain activations).
RELEVANCES = ("deeplift", "integrated_gradients", "gradient_x_activation", "none")
_DEFAULT_OPTIONS = {"n_samples": 20, "sigma": "auto", "baseline": "auto", "noise": None, "steps": 50, "relu": True}


@dataclass
class ConceptBasis:
    """Concept vectors of several classes at one layer.

    ``vectors`` (C, k, channels) ≥ 0: row j of class i is concept j (an NMF component, a direction in the
    layer's channel space). ``classes``: the class index of each row; ``n_images``: images used per class;
    ``recon_error`` (C,): the NMF's ‖X − W H‖_F, ``relative_error`` (C,) the same over ‖X‖_F;
    ``image_indices``: per class, the indices (into the data) of the images used; ``options``: the recipe.
    ``n_excluded``: per class, its images left out because their relevance was <= 0 at every position (they
    carry no weight, so no concept); ``skipped``: class → reason, for the requested classes not in the basis
    (no image predicted as it, or relevance <= 0 everywhere on all its images). ``matrix``, ``n_rows``,
    ``rows_per_image``: the NMF's input, kept only on request (``keep_matrix=True``, for ``concept_stability``).
    """

    vectors: torch.Tensor
    classes: list[int]
    n_images: list[int]
    recon_error: torch.Tensor
    relative_error: torch.Tensor
    layer: str
    image_indices: list[torch.Tensor] = field(default_factory=list)
    n_iter: list[int] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    n_excluded: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    #: with ``class_concepts(..., keep_matrix=True)``: the factorised matrices (C, rows, channels), zero-padded,
    #: their real row counts (C,) and the rows of one image (its positions); not saved by ``to_dict``
    matrix: torch.Tensor | None = field(default=None, repr=False)
    n_rows: torch.Tensor | None = field(default=None, repr=False)
    rows_per_image: int = 0

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def n_components(self) -> int:
        return int(self.vectors.shape[1])

    def of(self, cls: int) -> torch.Tensor:
        """The (k, channels) concept vectors of class ``cls``."""
        if cls not in self.classes:
            raise InputError(f"class {cls} is not in this basis; it has classes {self.classes}.")
        return self.vectors[self.classes.index(cls)]

    def to_dict(self) -> dict[str, Any]:
        return {"vectors": self.vectors.detach().cpu(), "classes": list(self.classes), "n_images": list(self.n_images),
                "recon_error": self.recon_error.detach().cpu(), "relative_error": self.relative_error.detach().cpu(),
                "layer": self.layer, "image_indices": [i.cpu() for i in self.image_indices], "n_iter": list(self.n_iter),
                "options": {k: v for k, v in self.options.items() if not isinstance(v, torch.Tensor)},
                "n_excluded": list(self.n_excluded), "skipped": dict(self.skipped)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ConceptBasis":
        return cls(**d)

    def __repr__(self) -> str:
        return (f"ConceptBasis(layer={self.layer!r}, classes={self.classes}, vectors={tuple(self.vectors.shape)}, "
                f"mean relative error={float(self.relative_error.mean()):.3f})")


def as_images(data: ImageDataset | torch.Tensor, name: str = "data") -> torch.Tensor:
    """The image tensor (N, C, H, W) of an ImageDataset or a tensor, checked finite."""
    x = data.x if isinstance(data, ImageDataset) else data
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        hint = "; add the channel axis with x.unsqueeze(1)" if isinstance(x, torch.Tensor) and x.dim() == 3 else ""
        raise InputError(f"{name} must be an ImageDataset or a float tensor of images (N, C, H, W), got {got}{hint}.")
    if x.shape[0] == 0:
        raise InputError(f"{name} holds no images.")
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        raise InputError(f"{name} contains {int(bad.sum())} NaN/inf pixel values; clean the images first.")
    return x


@torch.no_grad()
def predict_classes(model: nn.Module, x: torch.Tensor, batch_size: int = 256, *, output: OutputSelector = None) -> torch.Tensor:
    """argmax predictions (N,) on the CPU, in batches, on the model's device; the model's state (BatchNorm
    statistics of a train-mode model included) is left as found. ``output``: as for ``explain``."""
    out = []
    with preserve_model_state(model), selected_output(model, output):
        for s in range(0, x.shape[0], batch_size):
            logits = call_model(model, check_model_input(model, x[s : s + batch_size], "images"))
            check_logits(logits, "predict_classes")
            out.append(logits.argmax(1).cpu())
    return torch.cat(out)


def check_logits(out: object, what: str) -> int:
    """The number of classes of a (N, classes) logits output, else ModelError."""
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"{what} needs a model that returns logits (N, classes), got {got}; for a tuple/dict output "
                         "pass output= (an index or key, as for explain).")
    return int(out.shape[1])


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_relevance_options(opts: dict[str, Any], image_shape: tuple[int, ...] | None = None) -> None:
    """InputError for an unknown or invalid entry of ``relevance_options`` (merged with the defaults), so that
    a wrong value is refused in one line before any relevance is computed."""
    unknown = set(opts) - set(_DEFAULT_OPTIONS) - {"seed"}
    if unknown:
        raise InputError(f"unknown relevance_options {sorted(unknown)}; known: {sorted(_DEFAULT_OPTIONS)}.")
    n = opts["n_samples"]
    if not _is_int(n) or n < 0:
        raise InputError(f"relevance_options['n_samples'] must be an int >= 0 (0 = no noise tunnel), got {n!r}.")
    if not _is_int(opts["steps"]) or opts["steps"] < 1:
        raise InputError(f"relevance_options['steps'] must be a positive int, got {opts['steps']!r}.")
    if not isinstance(opts["relu"], bool):
        raise InputError(f"relevance_options['relu'] must be True or False, got {opts['relu']!r}.")
    if "seed" in opts and opts["seed"] is not None and not _is_int(opts["seed"]):
        raise InputError(f"relevance_options['seed'] must be an int, got {opts['seed']!r}.")
    sigma = opts["sigma"]
    if sigma != "auto" and (isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0):
        raise InputError(f"relevance_options['sigma'] must be 'auto' or a number >= 0, got {sigma!r}.")
    base = opts["baseline"]
    if isinstance(base, str) and base != "auto" or isinstance(base, bool) or not isinstance(base, (str, int, float, torch.Tensor)):
        raise InputError(f"relevance_options['baseline'] must be 'auto', a number or a tensor, got {base!r}.")
    if isinstance(base, (int, float)) and not math.isfinite(base) or isinstance(base, torch.Tensor) and not bool(torch.isfinite(base).all()):
        raise InputError("relevance_options['baseline'] must be finite.")
    noise = opts["noise"]
    if noise is not None:
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or not bool(torch.isfinite(noise).all()):
            raise InputError("relevance_options['noise'] must be None or a finite float tensor (n_samples, C, H, W).")
        if image_shape is not None and tuple(noise.shape[1:]) != tuple(image_shape):
            raise InputError(f"relevance_options['noise'] has shape {tuple(noise.shape)}; it must be (n_samples, "
                             f"{', '.join(map(str, image_shape))}) like the images.")


def select_class_images(predictions: torch.Tensor, classes: Sequence[int], images_per_class: int, seed: int = 0,
                        ) -> tuple[list[int], list[torch.Tensor]]:
    """``(kept classes, per class the sorted indices of at most images_per_class images predicted as it)``: a
    seeded random pick; a class without predicted images is skipped with a RuntimeWarning."""
    g = torch.Generator().manual_seed(seed)
    kept, picks = [], []
    for c in classes:
        idx = (predictions == c).nonzero().flatten()
        if idx.numel() == 0:
            warnings.warn(f"no image is predicted as class {c}; it is skipped.", RuntimeWarning, stacklevel=3)
            continue
        kept.append(int(c))
        picks.append(idx[torch.randperm(idx.numel(), generator=g)][:images_per_class].sort().values)
    return kept, picks


def _stat_options(x: torch.Tensor, opts: dict[str, Any]) -> tuple[float | torch.Tensor, float | torch.Tensor]:
    """(σ, baseline): numbers from the options, or translated from the normalised space ("auto")."""
    mean = x.mean((0, 2, 3))
    std = x.std((0, 2, 3)).clamp_min(1e-6)
    sigma = opts["sigma"]
    if sigma == "auto":
        sigma = 0.25 * float(std.mean())
    base = opts["baseline"]
    if isinstance(base, str):
        base = (mean + std).view(-1, 1, 1).expand(x.shape[1:]).clone()
    return float(sigma), base


def relevance_explainer(model: nn.Module, layer: str | nn.Module, x: torch.Tensor, relevance: str = "deeplift",
                        relevance_options: dict[str, Any] | None = None, seed: int = 0):
    """``(explainer, sigma, baseline)``: the layer-relevance explainer of the recipe (see :func:`class_concepts`
    for ``relevance`` and ``relevance_options``; σ and the baseline "auto" come from the images ``x``).
    ``explainer.attribute(images, targets)`` returns the relevance shaped like the layer's output; ``None``
    for ``relevance="none"``."""
    opts = {**_DEFAULT_OPTIONS, **(relevance_options or {}), "seed": seed}
    check_relevance_options(opts, tuple(x.shape[1:]))
    if relevance == "none":
        return None, None, None
    sigma, base = _stat_options(x, opts)
    if relevance == "deeplift":
        inner = LayerDeepLift(model, layer, baseline=base)
    elif relevance == "integrated_gradients":
        inner = LayerIntegratedGradients(model, layer, baseline=base, steps=int(opts["steps"]))
    else:
        return LayerGradientXActivation(model, layer), sigma, base
    noise, n = opts["noise"], int(opts["n_samples"])
    if noise is None and n == 0:
        return inner, sigma, base
    return SmoothGrad(inner, sigma=sigma, n_samples=max(n, 1), noise=noise, seed=opts.get("seed", 0)), sigma, base


def class_concepts(
    model: nn.Module,
    data: ImageDataset | torch.Tensor,
    layer: str | nn.Module,
    *,
    classes: Sequence[int] | None = None,
    n_components: int = 6,
    images_per_class: int = 60,
    relevance: str = "deeplift",
    relevance_options: dict[str, Any] | None = None,
    solver: str = "auto",
    seed: int = 0,
    batch_size: int = 64,
    predictions: torch.Tensor | None = None,
    progress: bool = False,
    output: OutputSelector = None,
    keep_matrix: bool = False,
) -> ConceptBasis:
    """Concept vectors of each class at ``layer`` (the research recipe by default; see the module docstring).

    ``data``: images (N, C, H, W) in the model's input space and dtype, or an ImageDataset (labels are not
    used: a class's images are those the model predicts as it). ``classes``: default every class the model
    outputs. ``relevance``: "deeplift" (LayerDeepLift in a noise tunnel), "integrated_gradients" (LayerIG in a
    noise tunnel), "gradient_x_activation", or "none" (plain activations). ``relevance_options``: ``n_samples``
    (20; 0 = no noise tunnel), ``sigma`` ("auto" = 0.25 · data std), ``baseline`` ("auto" = mean + std, or a
    number/tensor), ``noise`` (fixed draws (n_samples, C, H, W), shared by all images), ``steps`` (IG, 50),
    ``relu`` (True: ReLU of the relevance before the channel mean). ``solver``: NMF solver ("auto", "hals",
    "ahals", "mu", "sklearn"; see :func:`~manifex.concepts.nmf`). ``predictions``: the model's argmax on
    ``data``, if already known. ``output``: for a model returning a tuple/dict, which part holds the logits
    (an index, key or callable, as for ``explain``).
    ``keep_matrix``: keep the factorised matrices in the basis (``matrix``, ``n_rows``, ``rows_per_image``), so
    that :func:`~manifex.concepts.concept_stability` can refactorise them without recomputing the relevance.

    Images whose relevance map is <= 0 at every position carry no weight and are left out (counted in
    ``n_excluded``); a class without predicted images, or whose relevance is <= 0 everywhere on all its
    images, is skipped with a RuntimeWarning naming it (and listed in ``skipped``); InputError if none
    remains. The model's state (train/eval flags, requires_grad, buffers, hooks) is left as found; a model in
    train mode with Dropout/BatchNorm is explained as it is, with a TrainModeWarning.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"class_concepts needs an nn.Module (it hooks a layer), got {type(model).__name__}.")
    output = check_output_selector(output)
    x = as_images(data)
    module, layer_name = resolve_layer(model, layer)
    if relevance not in RELEVANCES:
        raise InputError(f"relevance must be one of {', '.join(RELEVANCES)}, got {relevance!r}.")
    opts = {**_DEFAULT_OPTIONS, **(relevance_options or {})}
    check_relevance_options(opts, tuple(x.shape[1:]))
    if solver not in NMF_SOLVERS:
        raise InputError(f"solver must be one of {', '.join(NMF_SOLVERS)}, got {solver!r}.")
    for name, v in (("images_per_class", images_per_class), ("batch_size", batch_size), ("n_components", n_components)):
        if not _is_int(v) or v < 1:
            raise InputError(f"{name} must be a positive int, got {v!r}.")
    # dtype (and device) on one batch, before the model runs
    probe = check_model_input(model, x[: min(8, x.shape[0])], "data")
    warn_if_training(model)
    with preserve_model_state(model), selected_output(model, output):
        return _class_concepts(model, x, probe, module, layer_name, classes, n_components, images_per_class, relevance,
                               opts, solver, seed, batch_size, predictions, progress, bool(keep_matrix))


def _class_concepts(model, x, probe, module, layer_name, classes, n_components, images_per_class, relevance, opts, solver,
                    seed, batch_size, predictions, progress, keep_matrix=False) -> ConceptBasis:
    dev = model_device(model)
    # one batch first: the layer's output shape, channels, sign, and the number of classes
    with torch.no_grad():
        n_classes = check_logits(call_model(model, probe), "class_concepts")
    acts = layer_activations(model, probe, module)
    check_layer_shape(tuple(acts.shape), layer_name, what="class_concepts")
    channels = acts.shape[1]
    if n_components > channels:
        raise InputError(f"n_components={n_components} exceeds the {channels} channels of layer {layer_name!r}; use at most {channels}.")
    if bool((acts < 0).any()):
        raise InputError(
            f"layer {layer_name!r} has negative activations (min {float(acts.min()):.3g}) and NMF needs non-negative "
            "data; choose a layer after a ReLU (a block output such as 'blocks.2', not a convolution or BatchNorm)."
        )
    classes = list(range(n_classes)) if classes is None else [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c < n_classes]
    if bad or not classes:
        raise InputError(f"classes must be indices in [0, {n_classes - 1}] (the model has {n_classes} outputs), got {bad or classes}.")
    if len(set(classes)) != len(classes):
        raise InputError(f"classes must not repeat, got {classes}.")

    preds = predict_classes(model, x, batch_size=4 * batch_size) if predictions is None else torch.as_tensor(predictions).cpu()
    if preds.shape != (x.shape[0],):
        raise InputError(f"predictions must have shape ({x.shape[0]},), got {tuple(preds.shape)}.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        kept, picks = select_class_images(preds, classes, images_per_class, seed)
    skipped = {c: "no image is predicted as it" for c in classes if c not in kept}
    for w in caught:  # re-issued here, so that the warning points at the caller
        warnings.warn(str(w.message), w.category, stacklevel=3)
    if not kept:
        raise InputError(f"no image of the data is predicted as any of the classes {classes}; use more or other data.")

    explainer = None if relevance == "none" else relevance_explainer(model, module, x, relevance, opts, seed)
    index = torch.cat(picks)
    targets = torch.cat([torch.full((len(p),), c, dtype=torch.long) for c, p in zip(kept, picks)])
    weighted, positive = [], []
    chunks = range(0, index.numel(), batch_size)
    for s in tqdm(chunks, desc="concepts: relevance", disable=not progress, leave=False):
        xb = x[index[s : s + batch_size]]
        xb = xb.to(dev) if dev is not None else xb
        a = layer_activations(model, xb, module)
        if explainer is None:
            w = a
            positive.append(torch.ones(a.shape[0], dtype=torch.bool))
        else:
            attr = explainer[0].attribute(xb, targets[s : s + batch_size].to(xb.device))
            r = (attr.clamp(min=0) if opts["relu"] else attr).mean(1, keepdim=True)
            # an image whose relevance map is <= 0 everywhere has no relevant position: it would add only zero
            # (or negative) rows, so it is left out and counted
            positive.append((r.flatten(1) > 0).any(1).cpu())
            w = r * a
        weighted.append(w.detach())
    A = torch.cat(weighted)  # (n, channels, h, w) or (n, channels)
    pos = torch.cat(positive)
    rows = A.permute(0, 2, 3, 1).reshape(A.shape[0], -1, channels) if A.dim() == 4 else A[:, None, :]
    per_image = rows.shape[1]
    # per class, the images with some positive relevance
    bounds = torch.tensor([0] + [len(p) for p in picks]).cumsum(0).tolist()
    keeps = [pos[bounds[i] : bounds[i + 1]] for i in range(len(picks))]
    for c, k in zip(kept, keeps):
        if not bool(k.any()):
            skipped[c] = f"its relevance is <= 0 at every position on all {k.numel()} of its images"
            warnings.warn(
                f"class {c}: the relevance ({relevance}) is <= 0 at every position on all {k.numel()} of its images, so "
                "it has no concepts; it is skipped (try another baseline in relevance_options, or relevance="
                "'gradient_x_activation').", RuntimeWarning, stacklevel=3)
    sel = [i for i, k in enumerate(keeps) if bool(k.any())]
    if not sel:
        raise InputError(f"the relevance is <= 0 at every position on every image of the classes {kept}: there are no "
                         "concepts to find; try another baseline in relevance_options, or relevance='gradient_x_activation'.")
    n_excluded = [int((~keeps[i]).sum()) for i in sel]
    counts = [int(keeps[i].sum()) for i in sel]
    X = A.new_zeros(len(sel), max(counts) * per_image, channels)
    for j, i in enumerate(sel):
        X[j, : counts[j] * per_image] = rows[bounds[i] : bounds[i + 1]][keeps[i].to(rows.device)].reshape(-1, channels)
    kept, picks = [kept[i] for i in sel], [picks[i][keeps[i]] for i in sel]
    n_rows = torch.tensor([n * per_image for n in counts], device=X.device)
    W, H, n_iter = nmf(X, n_components, solver=solver, n_rows=n_rows, seed=seed, return_n_iter=True)
    err = nmf_error(X, W, H)
    norm = X.double().flatten(1).norm(dim=1).clamp_min(1e-30)
    recipe = {"relevance": relevance, "n_components": n_components, "images_per_class": images_per_class,
              "solver": solver, "seed": seed, **{k: v for k, v in opts.items() if k != "noise"}}
    if explainer is not None:
        recipe["sigma"], b = explainer[1], explainer[2]
        recipe["baseline"] = [round(float(v), 4) for v in b.reshape(b.shape[0], -1)[:, 0]] if isinstance(b, torch.Tensor) else b
        recipe["noise"] = "fixed" if opts["noise"] is not None else "seeded"
    return ConceptBasis(
        vectors=H.detach(), classes=kept, n_images=counts, recon_error=err.detach(),
        relative_error=(err.double() / norm).to(err.dtype), layer=layer_name, image_indices=picks,
        n_iter=[int(i) for i in n_iter], options=recipe, n_excluded=n_excluded, skipped=skipped,
        matrix=X.detach() if keep_matrix else None, n_rows=n_rows.cpu() if keep_matrix else None,
        rows_per_image=per_image if keep_matrix else 0,
    )
