"""Explainers that modify the backward pass or read an inner layer: Guided Backprop and Grad-CAM.

Both go through ``target_gradient`` and install their hooks only for the duration of one call.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, ModelError
from .core import OutputSelector, Target, call_model, target_gradient
from .layer import resolve_layer
from .methods import Explainer, Model
from .smoothing import FunctionalPolicy, ReLUPatch, SmoothReLU

__all__ = ["GuidedBackprop", "GradCAM", "last_conv_layer"]


class _PositiveGradient(torch.autograd.Function):
    """Identity forward; backward lets only positive gradients through (the guided-backprop rule), but only
    while ``patch`` is active, i.e. during the backward pass that computes the explanation.

    Differentiating the explanation afterwards (``create_graph=True``) must see the network's true
    Jacobian in the forward graph: a rule that also fired in that second pass would clamp second-order
    gradients too, giving a wrong derivative. The clamp recorded in the first pass stays differentiable.
    The forward returns a copy so that later in-place ops on the activation cannot corrupt the graph.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, patch: ReLUPatch) -> torch.Tensor:
        ctx.patch = patch
        return y.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return (grad.clamp(min=0) if ctx.patch.active else grad), None


class _GuidedReLU(ReLUPatch):
    """Every ReLU (and β-smoothed ReLU) passes back only positive gradients: ``relu'(z) · max(g, 0)``."""

    relu_types = (nn.ReLU, SmoothReLU)

    def _module_output(self, module, x, y):
        return _PositiveGradient.apply(y, self)

    def _functional_output(self, x):
        # F.relu dispatches to any mode below ours, e.g. an enclosing beta_smooth turns it into softplus.
        return _PositiveGradient.apply(F.relu(x), self)


class GuidedBackprop(Explainer):
    """Guided Backprop (Springenberg et al., 2015): the input gradient where every ReLU's backward passes
    only positive gradients. Equals Captum's ``GuidedBackprop`` on networks of ``nn.ReLU`` modules.

    ReLUs called as functions in ``forward`` are guided too (``functional="handle"``; Captum ignores
    them), or raise ModelError (``"error"``), or stay plain (``"ignore"``). Inside ``beta_smooth`` (or on a
    :func:`beta_smoothed` copy) the rule applies to the softplus: ``σ(β z) · max(g, 0)``.

    Second order: with ``create_graph=True`` the result is the exact derivative of the map x ↦ GBP(x) (the
    rule acts only in the backward pass that computes the explanation). On a ReLU network that map is
    piecewise constant, so its derivative is zero almost everywhere, as for the plain gradient; under
    β-smoothing it is smooth except where an upstream gradient changes sign (a kink of the max(g, 0)).
    """

    name = "guided_backprop"

    def __init__(self, model: Model, *, functional: FunctionalPolicy = "handle", output: OutputSelector = None) -> None:
        super().__init__(model, output=output)
        if not isinstance(model, nn.Module):
            raise InputError(f"GuidedBackprop hooks the model's ReLU modules and needs an nn.Module, got {type(model).__name__}.")
        if functional not in ("handle", "error", "ignore"):
            raise InputError(f"functional must be 'handle', 'error' or 'ignore', got {functional!r}.")
        self.functional = functional

    def _attribute(self, x, target, create_graph):
        with _GuidedReLU(self.model, functional=self.functional):
            return target_gradient(self.model, x, target, create_graph=create_graph)[0]

    def __repr__(self) -> str:
        return f"GuidedBackprop(functional={self.functional!r})"


def _layer_candidates(model: nn.Module, limit: int = 12, conv_only: bool = False) -> str:
    """Some valid layer names, convolutional layers first, last one first (the usual Grad-CAM layer)."""
    named = [(n, m) for n, m in model.named_modules() if n]
    conv = [f"{n} ({type(m).__name__})" for n, m in named if isinstance(m, nn.modules.conv._ConvNd)]
    other = [f"{n} ({type(m).__name__})" for n, m in named if not isinstance(m, nn.modules.conv._ConvNd)]
    names = conv[::-1] + ([] if conv_only and conv else other)
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "(the model has no submodules)"


def last_conv_layer(model: nn.Module) -> str:
    """Qualified name of the last convolutional module in registration order (the usual Grad-CAM layer).

    Registration order is usually, not necessarily, execution order; name the layer when in doubt.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not names:
        raise InputError(f"the model has no convolutional layer; pass GradCAM a layer explicitly: {_layer_candidates(model)}.")
    return names[-1]


UpsampleMode = Literal["bilinear", "bicubic", "nearest", "area"]


class GradCAM(Explainer):
    """Grad-CAM (Selvaraju et al., 2017) at a convolutional ``layer`` (a submodule or its qualified name).

    Default layer: the last convolution the forward *runs*, found by the first call's shape probe (until
    then ``layer``/``layer_name`` hold :func:`last_conv_layer`, the last one registered, which is usually
    the same); name the layer to fix it.

    With ``A`` the layer output (N, C, h, w) and ``α_c`` the spatial mean of ∂score/∂A_c, the map is
    ``relu(Σ_c α_c A_c)`` (N, 1, h, w) (:meth:`layer_map`; ``relu=False`` keeps the sign). ``attribute``
    upsamples it to the input's (H, W) (``upsample_mode``, ``align_corners=False``, as Captum's
    ``LayerAttribution.interpolate``) and broadcasts it over the input channels: the result has the input's
    shape (N, C, H, W), every channel holding the same map. Inputs must be 4-D images for ``attribute``.
    The layer must run exactly once per forward and output a 4-D tensor.
    """

    name = "gradcam"

    def __init__(self, model: Model, layer: nn.Module | str | None = None, *, relu: bool = True,
                 upsample_mode: UpsampleMode = "bilinear", output: OutputSelector = None) -> None:
        super().__init__(model, output=output)
        if not isinstance(model, nn.Module):
            raise InputError(f"GradCAM reads an inner layer and needs an nn.Module, got {type(model).__name__}.")
        if upsample_mode not in ("bilinear", "bicubic", "nearest", "area"):
            raise InputError(f"upsample_mode must be 'bilinear', 'bicubic', 'nearest' or 'area', got {upsample_mode!r}.")
        self.layer, self.layer_name = self._resolve_layer(model, last_conv_layer(model) if layer is None else layer)
        self._find_layer = layer is None  # pick the last executed convolution on the first call
        self.relu, self.upsample_mode = relu, upsample_mode

    @staticmethod
    def _resolve_layer(model: nn.Module, layer: nn.Module | str) -> tuple[nn.Module, str]:
        return resolve_layer(model, layer, candidates=_layer_candidates)

    def layer_map(self, x: torch.Tensor, target: Target = None, *, create_graph: bool = False) -> torch.Tensor:
        """The Grad-CAM map at the layer's resolution, (N, 1, h, w), before upsampling."""
        return _GradCAMLayerMap(self).attribute(x, target, create_graph=create_graph)

    def _layer_map(self, x: torch.Tensor, target: Target, create_graph: bool) -> torch.Tensor:
        first = self._probe(x)  # the layer's output without a graph: its shape, checked usable
        outputs: list[object] = []
        probe: list[torch.Tensor] = []

        def hook(module, args, output):
            outputs.append(output)
            if probe and isinstance(output, torch.Tensor) and output.shape == probe[0].shape:
                return output + probe[0]  # ∂score/∂probe = ∂score/∂A, since probe = 0
            return None

        def run(p: torch.Tensor) -> torch.Tensor:  # target_gradient passes its own leaf copy of the probe
            probe[:] = [p]
            return call_model(self.model, x)

        handle = self.layer.register_forward_hook(hook)
        try:
            zeros = torch.zeros(first.shape, dtype=first.dtype, device=first.device)
            grad, _ = target_gradient(run, zeros, target, create_graph=create_graph)
        finally:
            handle.remove()
        self._check_layer_outputs(outputs)
        acts = outputs[0] if create_graph else outputs[0].detach()
        alpha = grad.mean(dim=(2, 3), keepdim=True)
        cam = (alpha * acts).sum(dim=1, keepdim=True)
        return F.relu(cam) if self.relu else cam

    def _probe(self, x: torch.Tensor) -> torch.Tensor:
        """One no-grad forward: the layer's output, checked usable. With the default layer, the same forward
        also finds the convolution that runs last (registration order can differ) and makes it the layer."""
        candidates = [m for m in self.model.modules() if isinstance(m, nn.modules.conv._ConvNd)] if self._find_layer else [self.layer]
        ran: list[tuple[nn.Module, object]] = []
        handles = [m.register_forward_hook(lambda m, a, o: ran.append((m, o))) for m in candidates]
        try:
            with torch.no_grad():
                call_model(self.model, x)
        finally:
            for h in handles:
                h.remove()
        if self._find_layer:
            if not ran:
                raise ModelError(f"the model's forward runs no convolution; pass GradCAM a layer explicitly: {_layer_candidates(self.model)}.")
            self.layer, self.layer_name = self._resolve_layer(self.model, ran[-1][0])
            self._find_layer = False
        outputs = [o for m, o in ran if m is self.layer]
        self._check_layer_outputs(outputs)
        return outputs[0]

    def _check_layer_outputs(self, outputs: list[object]) -> None:
        where = f"layer {self.layer_name!r} ({type(self.layer).__name__})"
        if not outputs:
            raise ModelError(f"{where} is not used by the model's forward; choose a layer the forward runs.")
        if len(outputs) > 1:
            raise ModelError(f"{where} runs {len(outputs)} times per forward; Grad-CAM needs a layer that runs once.")
        out = outputs[0]
        if not isinstance(out, torch.Tensor):
            raise ModelError(f"{where} returns {type(out).__name__}, not a tensor; choose a layer with one tensor output.")
        if out.dim() != 4:
            raise ModelError(
                f"Grad-CAM needs a convolutional layer with output (N, C, h, w), but {where} outputs shape "
                f"{tuple(out.shape)}; choose a convolutional layer, e.g. one of: {_layer_candidates(self.model, 6, conv_only=True)}."
            )

    def _attribute(self, x, target, create_graph):
        if x.dim() != 4:
            raise InputError(
                f"GradCAM.attribute upsamples the map to the input's (H, W) and needs (N, C, H, W) inputs, got shape "
                f"{tuple(x.shape)}; use layer_map(...) for the map at the layer's resolution."
            )
        cam = self._layer_map(x, target, create_graph)
        align = False if self.upsample_mode in ("bilinear", "bicubic") else None
        up = F.interpolate(cam, size=tuple(x.shape[2:]), mode=self.upsample_mode, align_corners=align)
        return up.expand_as(x).contiguous()

    def __repr__(self) -> str:
        return f"GradCAM(layer={self.layer_name!r}, relu={self.relu}, upsample_mode={self.upsample_mode!r})"


class _GradCAMLayerMap(Explainer):
    """``GradCAM.layer_map`` through the public ``attribute`` (validation, device, state protection)."""

    def __init__(self, cam: GradCAM) -> None:
        super().__init__(cam.model, output=cam.output)
        self.cam = cam

    def _attribute(self, x, target, create_graph):
        return self.cam._layer_map(x, target, create_graph)
