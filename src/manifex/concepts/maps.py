"""Where a concept is in an image: the relevance of the concept's coefficient at the layer, propagated to the input.

For an image x and a concept vector h (channels,), the concept's coefficient is s(x) = Σ_p ⟨a_p(x), h⟩ over the
layer's positions p. :func:`concept_maps` explains s with the engine's own explainers (nothing is re-implemented):
the model runs up to the layer (the rest is skipped), its output a is the "logits" and the target is the
weighted sum ⟨a, h⟩, so

- ``"lrp"``: the relevance at the layer is R_a = a ⊙ h (LRP's seed y ⊙ ∂s/∂y), propagated down with the
  composite's rules (default EpsilonPlus, with BatchNorm folding and the ε rule on residual sums): the map sums
  to s(x) wherever the rules conserve (z/ε → 0 rules, no biases), through residual blocks too — the
  concept-conditional relevance of CRP for a concept direction;
- ``"deeplift"``: DeepLift (Rescale) of s against ``baseline``: the map sums to s(x) − s(x̄);
- ``"gradient_x_input"``: x ⊙ ∂s/∂x;
- ``"upsampled"``: the cheap version — the coefficient map ⟨a_p, h⟩ (N, 1, h, w) bilinearly upsampled to the
  image and repeated over its channels; a picture of where the concept is, not a relevance (no conservation).

Every map is input-shaped (N, C, H, W). The model's state is left as found (the explainers' contract).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attribution.core import (OutputSelector, TrainModeWarning, check_model_input, check_output_selector,
                                preserve_model_state, warn_if_training)
from ..attribution.layer import check_layer_shape, layer_activations, resolve_layer
from ..data.base import ImageDataset
from ..errors import InputError, ModelError
from .basis import ConceptBasis, as_images

__all__ = ["concept_maps", "concept_direction", "MAP_METHODS"]

#: How :func:`concept_maps` locates a concept in the input: an attribution of the concept's direction in the
#: layer ("lrp", "deeplift", "gradient_x_input") or the coefficient map upsampled to the image ("upsampled").
MAP_METHODS = ("lrp", "deeplift", "gradient_x_input", "upsampled")


class _Reached(BaseException):
    """Raised by the layer's hook to stop the forward there (a BaseException: a model's ``except Exception``
    does not swallow it)."""


class _UpToLayer(nn.Module):
    """The model up to ``layer``: returns the layer's output, flattened (N, features); the layers after it
    never run. Its modules are the model's, under the model's own names (``named_modules`` is the model's), so
    the explainers' hooks (LRP rules, DeepLift's Rescale), a composite that selects layers by name and their
    error messages see the model as it is."""

    def __init__(self, model: nn.Module, layer: nn.Module, name: str) -> None:
        super().__init__()
        self.model = model
        self._layer = [layer]  # not a submodule: it is already one of model's
        self.layer_name = name

    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True):
        return self.model.named_modules(memo, prefix, remove_duplicate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seen: list[torch.Tensor] = []

        def hook(module, args, out):
            seen.append(out)
            raise _Reached

        handle = self._layer[0].register_forward_hook(hook)
        try:
            self.model(x)
        except _Reached:
            pass
        finally:
            handle.remove()
        if not seen:
            raise ModelError(f"layer {self.layer_name!r} is not used by the model's forward; choose a layer the forward runs.")
        if not isinstance(seen[0], torch.Tensor):
            raise ModelError(f"layer {self.layer_name!r} returns {type(seen[0]).__name__}, not a tensor.")
        return seen[0].flatten(1)


def concept_direction(basis: ConceptBasis | None, concept: Any, channels: int) -> tuple[torch.Tensor, bool]:
    """``(vectors (m, channels), several)``: the concept vector(s) named by ``concept`` — a (class, index) pair of
    ``basis``, a class of ``basis`` (all its concepts), a vector (channels,) or vectors (m, channels);
    ``several`` is False for one pair or one vector."""
    if isinstance(concept, torch.Tensor):
        h = concept.detach()
        if h.dim() not in (1, 2) or h.shape[-1] != channels or h.numel() == 0 or not h.is_floating_point() \
                or not bool(torch.isfinite(h).all()):
            raise InputError(f"a concept tensor must be a finite float vector ({channels},) or vectors (m, {channels}) of the "
                             f"layer's channels, got {tuple(h.shape)} {h.dtype}.")
        return (h[None], False) if h.dim() == 1 else (h, True)
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if is_int(concept) or isinstance(concept, tuple) and len(concept) == 2 and all(is_int(v) for v in concept):
        if basis is None:
            raise InputError("a concept named by its class needs the basis it comes from.")
        cls = concept if is_int(concept) else concept[0]
        vecs = basis.of(cls).detach()
        if is_int(concept):
            return vecs, True
        j = concept[1]
        if not 0 <= j < vecs.shape[0]:
            raise InputError(f"concept index {j} is out of range: class {cls} has {vecs.shape[0]} concepts (0..{vecs.shape[0] - 1}).")
        return vecs[j : j + 1], False
    raise InputError(f"concept must be a (class, index) pair of the basis, e.g. (3, 0), a class (all its concepts), or "
                     f"a (channels,) or (m, channels) tensor, got {concept!r}.")


def concept_maps(
    model: nn.Module,
    x: ImageDataset | torch.Tensor,
    basis: ConceptBasis | None,
    concept: tuple[int, int] | int | torch.Tensor,
    *,
    method: str = "lrp",
    layer: str | nn.Module | None = None,
    baseline: float | torch.Tensor = 0.0,
    composite: Any = None,
    canonizers: Any = None,
    batch_size: int = 64,
    output: OutputSelector = None,
) -> torch.Tensor:
    """Input-shaped maps of the concept ``concept`` in the images ``x`` (see the module docstring): (N, C, H, W)
    for one concept — a (class, index) pair of ``basis`` or a vector (channels,) —, (N, m, C, H, W) for several —
    a class of ``basis`` (its k concepts) or vectors (m, channels) —, computed in one batched pass (image × concept
    rows, ``batch_size`` rows per call). With a vector, ``basis`` may be None and ``layer`` names the layer.

    ``method``: "lrp", "deeplift", "gradient_x_input" or "upsampled" (the cheap picture). ``baseline``:
    DeepLift's reference (a number, one image (C, H, W) or one per image (N, C, H, W)). ``composite``/``canonizers``:
    LRP's (the engine's defaults when None; a composite selects layers by the model's own names).
    ``output`` is accepted for symmetry with the other concept functions; the maps never use the logits.
    """
    check_output_selector(output)
    if not isinstance(model, nn.Module):
        raise InputError(f"concept_maps needs an nn.Module (it reads an inner layer), got {type(model).__name__}.")
    if method not in MAP_METHODS:
        raise InputError(f"method must be one of {', '.join(MAP_METHODS)}, got {method!r}.")
    if basis is not None and not isinstance(basis, ConceptBasis):
        raise InputError(f"basis must be a ConceptBasis (from class_concepts) or None, got {type(basis).__name__}.")
    if layer is None:
        if basis is None:
            raise InputError("concept_maps needs the basis or layer= to know the layer.")
        layer = basis.layer
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}.")
    if method != "deeplift" and not (isinstance(baseline, (int, float)) and baseline == 0.0):
        raise InputError(f"baseline is DeepLift's reference; method {method!r} takes none.")
    x = as_images(x)
    module, name = resolve_layer(model, layer)
    probe = check_model_input(model, x[:1], "x")
    with preserve_model_state(model):
        a = layer_activations(model, probe, module)
    check_layer_shape(tuple(a.shape), name, what="concept_maps")
    H, several = concept_direction(basis, concept, a.shape[1])
    H = H.to(probe.device, probe.dtype)
    N, m = x.shape[0], H.shape[0]
    if method == "upsampled":
        maps = _upsampled(model, module, x, H, batch_size)
        return maps if several else maps[:, 0]
    from ..attribution import make_explainer

    options: dict[str, Any] = {}
    if method == "deeplift":
        options["baseline"] = baseline
        if isinstance(baseline, torch.Tensor) and baseline.dim() == x.dim():  # one reference per image: per row
            if baseline.shape[0] != N:
                raise InputError(f"baseline has {baseline.shape[0]} images for {N} images in x.")
    elif method == "lrp":
        if composite is not None:
            options["composite"] = composite
        if canonizers is not None:
            options["canonizers"] = canonizers
    head = _UpToLayer(model, module, name)
    # per concept, its weight on the flattened layer output: s_j = out · weights[j]
    weights = H.reshape(m, -1, *([1] * (a.dim() - 2))).expand(m, *a.shape[1:]).reshape(m, -1)
    rows = torch.arange(N * m)  # row r: image r // m, concept r % m
    explainer = make_explainer(head, "input_x_gradient" if method == "gradient_x_input" else method, **options)
    warn_if_training(model)  # once per model (the wrapper is new at every call: its own warning is silenced)
    maps = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainModeWarning)
        for s in range(0, N * m, batch_size):
            r = rows[s : s + batch_size]
            xb = check_model_input(model, x[r // m], "x")
            w = weights[(r % m).to(weights.device)]

            def target(out: torch.Tensor, w: torch.Tensor = w) -> torch.Tensor:  # s = Σ_p ⟨a_p, h⟩ per row
                return (out * w.to(out)).sum(1)

            if method == "deeplift" and isinstance(baseline, torch.Tensor) and baseline.dim() == x.dim():
                explainer.baseline = baseline[r // m]
            maps.append(explainer.attribute(xb, target).detach())
    out = torch.cat(maps).reshape(N, m, *x.shape[1:])
    return out if several else out[:, 0]


@torch.no_grad()
def _upsampled(model, module, x, H, batch_size) -> torch.Tensor:
    """(N, m, C, H, W): the coefficient maps ⟨a_p, h_j⟩, bilinearly upsampled, repeated over the channels."""
    out = []
    with preserve_model_state(model):
        for s in range(0, x.shape[0], batch_size):
            xb = check_model_input(model, x[s : s + batch_size], "x")
            a = layer_activations(model, xb, module)
            c = torch.einsum("nc...,mc->nm...", a, H)
            c = c if c.dim() == 4 else c[:, :, None, None]
            n, m = c.shape[:2]
            if c.shape[2:] != xb.shape[2:]:
                c = F.interpolate(c, size=tuple(xb.shape[2:]), mode="bilinear", align_corners=False)
            out.append(c[:, :, None].expand(n, m, xb.shape[1], *xb.shape[2:]).clone())
    return torch.cat(out)
