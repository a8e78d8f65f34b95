"""Layer attribution: the relevance of a layer's output (N, *layer_shape) instead of the input's.

``manifex.explain(model, x, target, method=..., layer="blocks.2")`` routes here for the methods where a
layer attribution is defined (Captum's ``Layer*`` classes, ``attribute_to_layer_input=False``):

- ``gradient``: ``∂score/∂A`` (Captum ``LayerGradientXActivation(multiply_by_inputs=False)``),
- ``input_x_gradient``: gradient × activation ``A ⊙ ∂score/∂A`` (``LayerGradientXActivation``),
- ``integrated_gradients``: IG in the layer's space, from the layer's output at the baseline input ``Ā`` to
  ``A`` (``LayerIntegratedGradients``; the model runs on ``x`` with the layer's output replaced),
- ``deeplift``: DeepLift (Rescale) in the layer's space, ``(A − Ā) ⊙ g`` (``LayerDeepLift``).

Each goes through the one gradient path (``core.target_gradient``): the gradient is taken with respect to
a zero probe added to (or, for IG, a tensor replacing) the layer's output by a temporary forward hook.
The layer must run exactly once per forward and return one tensor. :func:`layer_activations` returns the
layer's output itself. SmoothGrad wraps any of them (the noise is added to the input).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..errors import InputError, ModelError
from .core import Target, target_gradient
from .deeplift import DeepLiftRules, _check_eps, _check_functional, _check_maxpool, expand_baseline, paired_forward
from .methods import Explainer, Model, integration_rule

__all__ = [
    "resolve_layer",
    "layer_candidates",
    "layer_activations",
    "check_layer_shape",
    "LayerExplainer",
    "LayerGradient",
    "LayerGradientXActivation",
    "LayerIntegratedGradients",
    "LayerDeepLift",
    "LAYER_METHODS",
    "outputs_from_layer",
]


def layer_candidates(model: nn.Module, limit: int = 16) -> str:
    """Some valid layer names with their types, deepest containers (blocks) and convolutions first."""
    named = [(n, m) for n, m in model.named_modules() if n]
    if not named:
        return "(the model has no submodules)"
    names = [f"{n} ({type(m).__name__})" for n, m in named]
    more = f", ... ({len(names) - limit} more; see dict(model.named_modules()))" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def resolve_layer(model: nn.Module, layer: nn.Module | str, *,
                  candidates: Callable[[nn.Module], str] = layer_candidates) -> tuple[nn.Module, str]:
    """``(module, qualified name)`` of ``layer`` (a name such as ``"blocks.2"`` or a submodule of ``model``).

    An unknown name raises InputError listing ``candidates(model)``."""
    if not isinstance(model, nn.Module):
        raise InputError(f"layer attribution reads an inner layer and needs an nn.Module, got {type(model).__name__}.")
    named = dict(model.named_modules())
    if isinstance(layer, str):
        # wrappers that only adapt the input or output (Normalize, SelectOutput: ``transparent``) keep the
        # inner model's layer names, so ``--layer layer4`` works with ``--normalize`` and ``--output`` too
        inner, prefix = model, ""
        while getattr(inner, "transparent", False) and isinstance(getattr(inner, "model", None), nn.Module):
            inner, prefix = inner.model, prefix + "model."
            if layer and layer not in named and prefix + layer in named:
                return named[prefix + layer], prefix + layer
        if layer not in named or layer == "":
            close = [n for n in named if n and (layer in n or n in layer)]
            hint = f" (did you mean {', '.join(close[:4])}?)" if close else ""
            raise InputError(f"unknown layer {layer!r}{hint}; valid names: {candidates(model)}.")
        return named[layer], layer
    if isinstance(layer, nn.Module):
        for n, m in named.items():
            if m is layer and n:
                return m, n
        raise InputError(f"layer {type(layer).__name__} is not a submodule of the model; pass one of: {candidates(model)}.")
    raise InputError(f"layer must be a qualified module name (str) or a submodule, got {type(layer).__name__}.")


def check_layer_shape(shape: tuple[int, ...], name: str, *, what: str = "this method") -> None:
    """InputError unless a layer output's shape is (N, C, H, W) or (N, C) (what channel-wise consumers need)."""
    if len(shape) not in (2, 4):
        raise InputError(
            f"{what} needs a layer whose output is (N, C, H, W) (a convolutional block) or (N, C) (a dense layer), "
            f"but layer {name!r} outputs shape {tuple(shape)}; choose a block or convolution output, e.g. "
            "print(dict(model.named_modules()).keys())."
        )


@contextlib.contextmanager
def _layer_hook(layer: nn.Module, name: str, edit: Callable[[torch.Tensor], torch.Tensor] | None) -> Iterator[list]:
    """Record the layer's outputs during the body; ``edit`` maps the output to what the model continues with."""
    outputs: list[Any] = []

    def hook(module, args, output):
        outputs.append(output)
        if edit is not None and isinstance(output, torch.Tensor) and len(outputs) == 1:
            return edit(output)
        return None

    handle = layer.register_forward_hook(hook)
    try:
        yield outputs
    finally:
        handle.remove()
    _check_outputs(outputs, layer, name)


def _check_outputs(outputs: list, layer: nn.Module, name: str) -> None:
    where = f"layer {name!r} ({type(layer).__name__})"
    if not outputs:
        raise ModelError(f"{where} is not used by the model's forward; choose a layer the forward runs.")
    if len(outputs) > 1:
        raise ModelError(f"{where} runs {len(outputs)} times per forward; layer attribution needs a layer that runs once.")
    if not isinstance(outputs[0], torch.Tensor):
        raise ModelError(f"{where} returns {type(outputs[0]).__name__}, not a tensor; choose a layer with one tensor output.")


def layer_activations(model: nn.Module, x: torch.Tensor, layer: nn.Module | str, *, create_graph: bool = False) -> torch.Tensor:
    """The output of ``layer`` for the batch ``x`` (one forward; without a graph unless ``create_graph``)."""
    module, name = resolve_layer(model, layer)
    with _layer_hook(module, name, None) as outs, torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
        model(x)
    return outs[0] if create_graph else outs[0].detach()


@contextlib.contextmanager
def _frozen_parameters(model: nn.Module, frozen: bool) -> Iterator[None]:
    """No graph through the parameters (and so none above the layer, whose probe is the only leaf):
    less memory and time. Only without create_graph: a caller may differentiate through the weights then."""
    if not frozen:
        yield
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class LayerExplainer(Explainer):
    """Base of the layer explainers: ``attribute(x, target)`` returns a tensor shaped like the layer's output."""

    name = "layer"

    def __init__(self, model: Model, layer: nn.Module | str, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.layer, self.layer_name = resolve_layer(model, layer)  # type: ignore[arg-type]

    def _probe_gradient(self, run_input: torch.Tensor, model_call: Callable[[torch.Tensor], Any], shape: torch.Size,
                        target: Target, create_graph: bool, *, pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(∂score/∂A, A): the gradient at the layer's output via a zero probe added to it.

        ``model_call(run_input)`` runs the model; with ``pad_to`` the layer sees a batch of that many rows of
        which the first ``shape[0]`` are probed (DeepLift's [x; x̄])."""
        probe: list[torch.Tensor] = []
        acts: list[torch.Tensor] = []

        def edit(out: torch.Tensor) -> torch.Tensor:
            acts.append(out)
            p = probe[0]
            if pad_to is not None:
                p = torch.cat([p, p.new_zeros((out.shape[0] - p.shape[0], *p.shape[1:]))])
            return out + p

        def run(p: torch.Tensor) -> Any:
            probe[:] = [p]
            return model_call(run_input)

        zeros = torch.zeros(shape, dtype=run_input.dtype, device=run_input.device)
        with _frozen_parameters(self.model, not create_graph), _layer_hook(self.layer, self.layer_name, edit):
            grad, _ = target_gradient(run, zeros, target, create_graph=create_graph)
        a = acts[0] if create_graph else acts[0].detach()
        return grad, a

    def _layer_shape(self, x: torch.Tensor) -> torch.Size:
        with torch.no_grad(), _layer_hook(self.layer, self.layer_name, None) as outs:
            self.model(x[:1])
        return torch.Size((x.shape[0], *outs[0].shape[1:]))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer_name!r})"


class LayerGradient(LayerExplainer):
    """``∂score/∂A`` at the layer's output A."""

    name = "layer_gradient"

    def _attribute(self, x, target, create_graph):
        return self._probe_gradient(x, self.model, self._layer_shape(x), target, create_graph)[0]


class LayerGradientXActivation(LayerExplainer):
    """Gradient × activation ``A ⊙ ∂score/∂A`` at the layer's output (Captum ``LayerGradientXActivation``)."""

    name = "layer_gradient_x_activation"

    def _attribute(self, x, target, create_graph):
        grad, a = self._probe_gradient(x, self.model, self._layer_shape(x), target, create_graph)
        return a * grad


class LayerIntegratedGradients(LayerExplainer):
    """Integrated Gradients in the layer's space: ``(A − Ā) ⊙ Σ_i w_i ∂score/∂A (Ā + α_i (A − Ā))`` where
    ``Ā`` is the layer's output at the baseline input (Captum ``LayerIntegratedGradients``). The model runs on
    ``x`` with the layer's output replaced by the interpolated point. ``steps``, ``integration``,
    ``baseline``, ``multiply_by_inputs`` and ``internal_batch_size`` as for :class:`IntegratedGradients`."""

    name = "layer_integrated_gradients"

    def __init__(self, model: Model, layer: nn.Module | str, *, steps: int = 50, integration: str = "gausslegendre",
                 baseline: float | torch.Tensor = 0.0, multiply_by_inputs: bool = True, internal_batch_size: int = 512,
                 **kwargs: Any) -> None:
        super().__init__(model, layer, **kwargs)
        self.alphas, self.weights = integration_rule(steps, integration)
        self.steps, self.integration, self.baseline = steps, integration, baseline
        self.multiply_by_inputs = bool(multiply_by_inputs)
        if internal_batch_size < 1:
            raise InputError(f"internal_batch_size must be >= 1, got {internal_batch_size}.")
        self.internal_batch_size = internal_batch_size

    def _attribute(self, x, target, create_graph):
        size = self.internal_batch_size
        if x.shape[0] > size:
            from .methods import _target_rows
            return torch.cat([self._attribute(x[s : s + size], _target_rows(target, s, size), create_graph)
                              for s in range(0, x.shape[0], size)])
        base = expand_baseline(self.baseline, x).detach()
        a = layer_activations(self.model, x, self.layer, create_graph=create_graph)
        a0 = layer_activations(self.model, base, self.layer)
        delta = a - a0
        n = x.shape[0]
        per_chunk = max(1, size // n)
        total = torch.zeros_like(a)
        for start in range(0, self.steps, per_chunk):
            alphas = self.alphas[start : start + per_chunk]
            k = len(alphas)
            al = torch.tensor(alphas, dtype=a.dtype, device=a.device).view(-1, *([1] * a.dim()))
            w = torch.tensor(self.weights[start : start + per_chunk], dtype=a.dtype, device=a.device).view(-1, *([1] * a.dim()))
            points = (a0.unsqueeze(0) + al * delta.unsqueeze(0)).reshape(k * n, *a.shape[1:])
            xs = x.detach().repeat(k, *([1] * (x.dim() - 1)))
            grad = self._replaced_gradient(xs, points, _repeat(target, k), create_graph)
            total = total + (w * grad.reshape(k, *a.shape)).sum(0)
        return total * delta if self.multiply_by_inputs else total

    def _replaced_gradient(self, xs, points, target, create_graph):
        """∂score/∂A at the points: the layer's output is replaced by ``points`` (target_gradient's leaf)."""
        current: list[torch.Tensor] = []

        def run(p: torch.Tensor) -> Any:
            current[:] = [p]
            return self.model(xs)

        with _frozen_parameters(self.model, not create_graph), _layer_hook(self.layer, self.layer_name, lambda out: current[0]):
            grad, _ = target_gradient(run, points, target, create_graph=create_graph)
        return grad

    def __repr__(self) -> str:
        return (f"LayerIntegratedGradients(layer={self.layer_name!r}, steps={self.steps}, integration={self.integration!r}, "
                f"multiply_by_inputs={self.multiply_by_inputs})")


def _repeat(target: Target, times: int) -> Target:
    if isinstance(target, torch.Tensor) and target.dim() == 1:
        return target.repeat(times)
    return target


class LayerDeepLift(LayerExplainer):
    """DeepLift (Rescale) at the layer's output: ``(A − Ā) ⊙ g``, with ``Ā`` the layer's output at the
    baseline input and ``g`` the DeepLift multipliers of the layers above it (Captum ``LayerDeepLift``,
    ``multiply_by_inputs=True``). Options as :class:`~manifex.attribution.deeplift.DeepLift`."""

    name = "layer_deeplift"

    def __init__(self, model: Model, layer: nn.Module | str, *, baseline: float | torch.Tensor = 0.0,
                 multiply_by_inputs: bool = True, eps: float = 1e-10, functional: str = "handle", maxpool: str = "captum",
                 **kwargs: Any) -> None:
        super().__init__(model, layer, **kwargs)
        self.baseline, self.multiply_by_inputs = baseline, bool(multiply_by_inputs)
        self.eps, self.functional, self.maxpool = _check_eps(eps), _check_functional(functional), _check_maxpool(maxpool)

    def _attribute(self, x, target, create_graph):
        ref = expand_baseline(self.baseline, x).detach()
        shape = self._layer_shape(x)
        n = x.shape[0]
        with DeepLiftRules(self.model, eps=self.eps, functional=self.functional, maxpool=self.maxpool):  # type: ignore[arg-type]
            grad, a = self._probe_gradient(x, paired_forward(self.model, ref), shape, target, create_graph, pad_to=2 * n)
        ax, aref = a[:n], a[n:]
        return (ax - aref) * grad if self.multiply_by_inputs else grad

    def __repr__(self) -> str:
        return f"LayerDeepLift(layer={self.layer_name!r}, multiply_by_inputs={self.multiply_by_inputs})"


def outputs_from_layer(model: Callable[[torch.Tensor], Any], layer: nn.Module, name: str, x: torch.Tensor,
                       replacement: torch.Tensor, *, reuse_prefix: bool = True) -> Any:
    """The model's output when ``layer``'s output for the images ``x`` (n, ...) is replaced by ``replacement``
    (G·n, *layer_shape), whose row r belongs to image ``r % n`` (G groups of the n images, group-major).

    ``reuse_prefix``: the layers before ``layer`` run once on the n images and the hook hands all G·n rows to
    the rest of the network — exact when the layers after it treat rows independently and read the input only
    through ``layer`` (a feed-forward net in eval mode). When the rest refuses the larger batch (a skip
    connection around the layer, a reshape by the input's batch size: an error, or an output that does not
    have G·n rows) every row runs through the whole model instead (x repeated G times). Gradients flow to
    ``replacement``. The caller holds the model's state (preserve_model_state) and the output selection."""
    n, rows = x.shape[0], replacement.shape[0]
    if rows % n:
        raise InputError(f"the replacement has {rows} rows, not a multiple of the {n} images.")
    if reuse_prefix and rows > n:
        try:
            with _layer_hook(layer, name, lambda out: replacement):
                out = model(x)
            if isinstance(out, torch.Tensor) and out.shape[0] == rows:
                return out
        except RuntimeError:
            pass  # the rest of the model mixes the rows with tensors from before the layer: no reuse
    with _layer_hook(layer, name, lambda out: replacement):
        return model(x.repeat(rows // n, *([1] * (x.dim() - 1))))


#: Registry method name → layer explainer (``explain(..., layer=...)``).
LAYER_METHODS: dict[str, type[LayerExplainer]] = {
    "gradient": LayerGradient,
    "input_x_gradient": LayerGradientXActivation,
    "integrated_gradients": LayerIntegratedGradients,
    "integrated_gradients_path": LayerIntegratedGradients,
    "deeplift": LayerDeepLift,
}
