"""How much each concept matters to its class: CRAFT's Sobol total indices and gradient × coefficient.

The coefficients of an image's layer activations on a class's concept vectors H (k, channels) are the NMF
coefficients U ≥ 0 with A ≈ U H at every position (:func:`concept_coefficients`, scikit-learn's
``NMF.transform``). As in CRAFT (Fel et al. 2023; Xplique's ``Craft.estimate_importance``) the activation is
rebuilt from masked coefficients, (U ⊙ m) H with m ∈ [0, 1]^k the same at every position, and the model runs
from the layer on; the residual A − U H is dropped, as in CRAFT:

- ``method="sobol"``: per image, the total Sobol index of each mask coordinate for the class's logit, with
  Jansen's estimator on a replicated quasi-Monte-Carlo design (scipy's unscrambled Sobol sequence in 2k
  dimensions split into A and B, and k copies of A with column i taken from B: (k + 2)·``n_design`` masks);
  ST_i = Σ_n (f(A_n) − f(C^i_n))² / (2 · n_design · Var f(A)); averaged over the images.
- ``method="gradient"``: gradient × coefficient, Σ_positions U ⊙ ∂f/∂U at m = 1 (the rebuilt activation),
  averaged over the images.

Everything runs batched on the model's device: the layers before the layer run once per chunk of images and
every masked copy goes through the rest of the network in one call of up to ``max_rows`` rows
(``attribution.layer.outputs_from_layer``, which falls back to whole-model runs for a skip connection around
the layer).
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn

from ..attribution.core import (OutputSelector, check_model_input, check_output_selector, preserve_model_state,
                                selected_output, warn_if_training)
from ..attribution.layer import check_layer_shape, layer_activations, outputs_from_layer, resolve_layer
from ..attribution.methods import model_device
from ..data.base import ImageDataset
from ..errors import InputError
from .basis import ConceptBasis, as_images, check_logits
from .nmf import nmf_transform

__all__ = ["concept_importance", "concept_coefficients", "sobol_masks", "jansen_total_indices", "top_concepts",
           "IMPORTANCE_METHODS"]

#: How :func:`concept_importance` scores a concept: "sobol" (total Sobol indices of masked concept coefficients)
#: or "gradient" (coefficient times the gradient of the class logit).
IMPORTANCE_METHODS = ("sobol", "gradient")


def top_concepts(importance: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` most important concepts of each class, (classes, n) long, from an importance matrix (classes,
    concepts) of :func:`concept_importance`; each row in increasing concept index (so ``n`` = all concepts gives
    the concepts in their own order); ties go to the lower index."""
    if not isinstance(importance, torch.Tensor) or importance.dim() != 2:
        raise InputError(f"importance must be a (classes, concepts) tensor, got {getattr(importance, 'shape', type(importance).__name__)}.")
    k = importance.shape[1]
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= k:
        raise InputError(f"n must be an integer in 1..{k} (the concepts per class), got {n!r}.")
    if not bool(torch.isfinite(importance).all()):
        raise InputError("importance holds NaN/inf; the top concepts are not defined.")
    # a stable sort on −importance: equal importances keep index order, so ties go to the lower index
    order = torch.sort(-importance.double(), dim=1, stable=True).indices[:, :n]
    return order.sort(dim=1).values


def sobol_masks(k: int, n_design: int) -> torch.Tensor:
    """CRAFT's replicated design ((k + 2)·n_design, k) in [0, 1), float64: A, B, then C^1..C^k (C^i = A with
    column i from B), from scipy's unscrambled Sobol sequence in 2k dimensions (Xplique's ScipySobolSequenceRS)."""
    from scipy.stats import qmc

    with warnings.catch_warnings():  # scipy warns when n_design is not a power of 2 (balance): CRAFT's 32 is
        warnings.simplefilter("ignore", UserWarning)
        ab = torch.from_numpy(qmc.Sobol(2 * k, scramble=False).random(n_design))
    a, b = ab[:, :k], ab[:, k:]
    c = a.unsqueeze(0).repeat(k, 1, 1)
    idx = torch.arange(k)
    c[idx, :, idx] = b.T
    return torch.cat([a, b, c.reshape(k * n_design, k)])


def jansen_total_indices(outputs: torch.Tensor, k: int, n_design: int) -> torch.Tensor:
    """Jansen's total Sobol indices (..., k) from the outputs (..., (k + 2)·n_design) at :func:`sobol_masks`:
    Σ_n (f(A_n) − f(C^i_n))² / (2 · n_design · Var f(A)) (Var with n − 1; at least 1e-12, as Xplique)."""
    if outputs.shape[-1] != (k + 2) * n_design:
        raise InputError(f"outputs must have (k + 2)·n_design = {(k + 2) * n_design} entries, got {outputs.shape[-1]}.")
    a = outputs[..., :n_design]
    c = outputs[..., 2 * n_design :].reshape(*outputs.shape[:-1], k, n_design)
    var = a.var(-1, correction=1).clamp_min(1e-12) if n_design > 1 else torch.full_like(a[..., 0], 1e-12)
    return ((a.unsqueeze(-2) - c) ** 2).sum(-1) / (2 * n_design * var.unsqueeze(-1))


def concept_coefficients(activations: torch.Tensor, vectors: torch.Tensor, *, max_iter: int = 200,
                         tol: float = 1e-4) -> torch.Tensor:
    """The NMF coefficients U ≥ 0 of layer activations on concept vectors: ``activations`` (n, c, h, w) or (n, c)
    and ``vectors`` (k, c) or (B, k, c) → U (n, h, w, k) or (n, k) (with a leading B for a batch of bases)."""
    spatial = activations.dim() == 4
    rows = activations.permute(0, 2, 3, 1).reshape(-1, activations.shape[1]) if spatial else activations
    if vectors.dim() == 3:
        rows = rows.unsqueeze(0).expand(vectors.shape[0], *rows.shape)
    u = nmf_transform(rows, vectors, max_iter=max_iter, tol=tol)
    if spatial:
        n, _, h, w = activations.shape
        u = u.reshape(*u.shape[:-2], n, h, w, u.shape[-1])
    return u


def _rebuild(u: torch.Tensor, vectors: torch.Tensor, spatial: bool) -> torch.Tensor:
    """Activations (…, c, h, w) or (…, c) from coefficients (…, h, w, k) or (…, k) and vectors (k, c)."""
    a = u @ vectors
    return a.movedim(-1, -3) if spatial else a


def _check(model, x, basis, method, n_design, batch_size, max_rows, indices):
    if not isinstance(model, nn.Module):
        raise InputError(f"concept_importance needs an nn.Module (it runs the model from a layer on), got {type(model).__name__}.")
    if not isinstance(basis, ConceptBasis):
        raise InputError(f"basis must be a ConceptBasis (from class_concepts), got {type(basis).__name__}.")
    if method not in IMPORTANCE_METHODS:
        raise InputError(f"method must be one of {', '.join(IMPORTANCE_METHODS)}, got {method!r}.")
    for name, v in (("n_design", n_design), ("batch_size", batch_size), ("max_rows", max_rows)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{name} must be a positive int, got {v!r}.")
    if method == "sobol" and n_design < 2:
        raise InputError(f"n_design must be at least 2 for the Sobol estimator (its variance), got {n_design}; CRAFT uses 32.")
    if indices is not None:
        if len(indices) != len(basis.classes):
            raise InputError(f"indices must hold one index tensor per class of the basis ({len(basis.classes)}), got {len(indices)}.")
        for c, idx in zip(basis.classes, indices):
            idx = torch.as_tensor(idx)
            if idx.numel() == 0 or idx.dtype in (torch.bool,) or idx.is_floating_point() or \
                    bool(((idx < 0) | (idx >= x.shape[0])).any()):
                raise InputError(f"indices of class {c} must be a non-empty list of image indices in [0, {x.shape[0] - 1}].")


def concept_importance(
    model: nn.Module,
    x: ImageDataset | torch.Tensor,
    basis: ConceptBasis,
    *,
    method: str = "sobol",
    indices: Sequence[torch.Tensor] | None = None,
    n_design: int = 32,
    batch_size: int = 32,
    max_rows: int = 4096,
    output: OutputSelector = None,
) -> torch.Tensor:
    """Importance of every concept of ``basis`` for its class: (classes, concepts), float64 on the CPU, row i for
    ``basis.classes[i]`` (see the module docstring for the two methods). Larger = more important; each Sobol
    total index lies in [0, 1] up to the estimator's error, and they sum to more than 1 when concepts interact.

    ``x``: images (N, C, H, W) in the model's input space and dtype (an ImageDataset's images); every class is
    scored on all of them unless ``indices`` gives per class the images to use (e.g. ``basis.image_indices``,
    the class's own images, as CRAFT does). ``n_design``: the Sobol design size (CRAFT: 32; cost (k + 2)·n_design
    runs of the network above the layer per image). ``batch_size``: images per chunk; ``max_rows``: rows per
    call of the network above the layer. ``output``: which part of a tuple/dict output holds the logits. The
    model's state is left as found (also after an exception).
    """
    output = check_output_selector(output)
    x = as_images(x)
    _check(model, x, basis, method, n_design, batch_size, max_rows, indices)
    module, name = resolve_layer(model, basis.layer)
    probe = check_model_input(model, x[:1], "x")
    warn_if_training(model)
    with preserve_model_state(model), selected_output(model, output):
        with torch.no_grad():
            a = layer_activations(model, probe, module)
            n_classes = check_logits(model(probe), "concept_importance")
        check_layer_shape(tuple(a.shape), name, what="concept_importance")
        if bool((a < 0).any()):
            raise InputError(f"layer {name!r} has negative activations (min {float(a.min()):.3g}); concept coefficients "
                             "are NMF coefficients and need a layer after a ReLU (the basis's layer).")
        if a.shape[1] != basis.vectors.shape[-1]:
            raise InputError(f"the basis has {basis.vectors.shape[-1]} channels but layer {name!r} outputs {a.shape[1]}; "
                             "use the basis of this model and layer.")
        bad = [c for c in basis.classes if not 0 <= c < n_classes]
        if bad:
            raise InputError(f"the basis has classes {bad} but the model has {n_classes} outputs.")
        dev = probe.device
        vectors = basis.vectors.detach().to(dev, probe.dtype)
        picks = [torch.arange(x.shape[0])] * len(basis.classes) if indices is None else [torch.as_tensor(i).long() for i in indices]
        out = torch.zeros(len(basis.classes), basis.n_components, dtype=torch.float64)
        masks = sobol_masks(basis.n_components, n_design).to(dev, probe.dtype) if method == "sobol" else None
        for ci, (cls, pick) in enumerate(zip(basis.classes, picks)):
            total = torch.zeros(basis.n_components, dtype=torch.float64, device=dev)
            for s in range(0, pick.numel(), batch_size):
                xb = check_model_input(model, x[pick[s : s + batch_size]], "x")
                if masks is None:
                    total += _gradient_importance(model, module, name, xb, vectors[ci], cls, max_rows).sum(0)
                else:
                    total += _sobol_importance(model, module, name, xb, vectors[ci], cls, masks, n_design, max_rows).sum(0)
            out[ci] = (total / pick.numel()).cpu()
    return out


def _gradient_importance(model, module, name, xb, H, cls, max_rows) -> torch.Tensor:
    """(n, k) float64: Σ_positions U ⊙ ∂f_cls/∂U at the rebuilt activation U H."""
    with torch.no_grad():
        a = layer_activations(model, xb, module)
    if bool((a < 0).any()):
        raise InputError(f"layer {name!r} has negative activations; concept coefficients need a layer after a ReLU.")
    spatial = a.dim() == 4
    u = concept_coefficients(a, H).detach().requires_grad_(True)
    with torch.enable_grad():
        logits = outputs_from_layer(model, module, name, xb, _rebuild(u, H, spatial))
        (g,) = torch.autograd.grad(logits[:, cls].sum(), u)
    r = (g * u).detach().double()
    return r.flatten(1, -2).sum(1) if spatial else r


@torch.no_grad()
def _sobol_importance(model, module, name, xb, H, cls, masks, n_design, max_rows) -> torch.Tensor:
    """(n, k) float64: Jansen's total indices of the mask coordinates, per image."""
    a = layer_activations(model, xb, module)
    if bool((a < 0).any()):
        raise InputError(f"layer {name!r} has negative activations; concept coefficients need a layer after a ReLU.")
    spatial = a.dim() == 4
    u = concept_coefficients(a, H)  # (n, h, w, k) or (n, k)
    n, D = xb.shape[0], masks.shape[0]
    per_call = max(1, max_rows // n)
    ys = []
    for s in range(0, D, per_call):
        m = masks[s : s + per_call]  # (G, k)
        shape = (m.shape[0],) + (1,) * (u.dim() - 1) + (m.shape[1],)
        rebuilt = _rebuild(u.unsqueeze(0) * m.reshape(shape), H, spatial)  # (G, n, c, h, w): group-major rows
        logits = outputs_from_layer(model, module, name, xb, rebuilt.reshape(-1, *rebuilt.shape[2:]))
        ys.append(logits[:, cls].double().reshape(m.shape[0], n))
    y = torch.cat(ys).T  # (n, D)
    return jansen_total_indices(y, H.shape[0], n_design)
