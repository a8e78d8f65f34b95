"""DeepLift with the Rescale rule (Shrikumar et al., 2017), batched and differentiable.

DeepLift explains ``f(x) − f(x̄)`` for a reference (baseline) ``x̄``: the model runs once on the stacked
batch ``[x; x̄]`` and the backward pass replaces each nonlinearity's local derivative by the secant slope
between the two points,

    m = (y − ȳ) / (z − z̄)        (z: the nonlinearity's input, y = act(z); the bar: the same at the reference),

the local derivative where ``|z − z̄| < eps``. Max-pooling uses Captum's rule (the cross maximum of the
pooled outputs, routed back through the argmax positions of both points). ``nn.Softmax`` uses Captum's softmax
rule: the Rescale multipliers of its elements (read elementwise, the local derivative where ``|Δz| < eps``)
minus their mean over the example's elements (softmax is unchanged by adding one constant to its input, so
only multipliers relative to their mean carry information). This rule gives up completeness: the attributions
of a softmax output sum to ``Δy − m̄ · ΣΔz``, not ``Δy`` (``m̄`` the mean multiplier, ``ΣΔz`` the summed change of
the softmax's input), as in Captum. Linear layers, BatchNorm in eval mode and residual sums keep their true
gradient. The attribution is ``(x − x̄) ⊙ g`` with ``g`` the modified gradient (``multiply_by_inputs=True``),
which sums to ``f(x) − f(x̄)`` over the input (completeness; except through a softmax, above).

The rules are installed by :class:`DeepLiftRules` as forward hooks for the duration of one call, on every
elementwise activation module (ReLU, ELU, LeakyReLU, Sigmoid, Tanh, Softplus), on ``nn.Softmax``, on
functional ReLUs called in ``forward`` (``F.relu``, ``torch.relu``, ``Tensor.relu``, as :func:`~manifex.attribution.beta_smooth`
catches them) and on max-pool modules (1-d, 2-d, 3-d). Functional max-pooling and other functional
nonlinearities keep their gradient, as in Captum. A rule acts only during the backward pass that computes
the explanation; a second differentiation (``create_graph=True``) sees the network's true Jacobian, so the
derivative of ``x ↦ DeepLift(x)`` is exact.

Max-pool rule (``maxpool=``): Captum 0.9 applies its max-pool rule except where a hooked activation feeds
the pool directly (ReLU → MaxPool, the usual CNN order): there the activation's backward hook reads the
pool's gradient before the pool's own hook rewrites it, so the pool keeps its plain gradient. ``"captum"``
(default) reproduces that exactly; ``"rescale"`` applies the max-pool rule everywhere; ``"gradient"`` never
(the original DeepLIFT implementation's default for max-pooling).

Equal to Captum 0.9 ``DeepLift`` / ``LayerDeepLift`` (``multiply_by_inputs=True``) on networks whose
activations are modules used once each. Where they differ: a max-pool with overlapping windows sends the
multiplier of an input that is the maximum of several windows back once per window here (the adjoint of
max-pooling), once in total in Captum (``max_unpool``); at max-pool positions where ``x`` and ``x̄`` agree,
Captum uses the gradient of the batch's first example for every example, manifex each example's own. Captum's
softmax rule subtracts the mean over its whole stacked tensor ``[x; x̄]`` — every example of the batch and
both halves — so its batched result depends on the other examples; manifex subtracts each example's own mean
(batched = per example) and equals Captum called with one example at a time. At batch 1 the two means agree
wherever the softmax's output gradient is the same at ``x`` and ``x̄`` (a softmax head, or one followed only by
linear layers and rule-carrying activations: the rules use the same multipliers for both halves).
"""
from __future__ import annotations

from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .core import Target, target_gradient
from .methods import Explainer, Model
from .smoothing import FunctionalPolicy, ReLUPatch

__all__ = ["DeepLift", "DeepLiftRules", "expand_baseline", "ELEMENTWISE_ACTIVATIONS", "SOFTMAX", "MAX_POOLS"]

#: Activation modules that get the Rescale rule (``nn.Softplus`` covers manifex's ``SmoothReLU``).
ELEMENTWISE_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ELU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Softplus)
#: Softmax modules that get Captum's softmax rule (Rescale multipliers minus their per-example mean).
SOFTMAX: tuple[type[nn.Module], ...] = (nn.Softmax,)
#: Max-pool modules that get Captum's max-pool rule.
MAX_POOLS: tuple[type[nn.Module], ...] = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
MaxPoolRule = Literal["captum", "rescale", "gradient"]
_POOL_FUNCTIONS = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d, nn.MaxPool3d: F.max_pool3d}


def expand_baseline(baseline: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The reference batch for ``x``: a number, one input (``x.shape[1:]``) or one per example (``x.shape``)."""
    if isinstance(baseline, torch.Tensor):
        b = baseline.to(x)
        if b.shape not in (x.shape, x.shape[1:], ()):
            raise InputError(
                f"baseline must be a number or have shape {tuple(x.shape[1:])} (one input) or {tuple(x.shape)} "
                f"(one per example), got {tuple(b.shape)}."
            )
        if not bool(torch.isfinite(b).all()):
            raise InputError("baseline contains NaN/inf values.")
        return b.expand_as(x)
    if isinstance(baseline, bool) or not isinstance(baseline, (int, float)):
        raise InputError(f"baseline must be a number or a tensor, got {type(baseline).__name__}.")
    return torch.full_like(x, float(baseline))


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise InputError(f"eps must be a number > 0, got {eps!r}.")
    return float(eps)


def _check_maxpool(rule: str) -> str:
    if rule not in ("captum", "rescale", "gradient"):
        raise InputError(f"maxpool must be 'captum', 'rescale' or 'gradient', got {rule!r}.")
    return rule


def _check_functional(policy: str) -> str:
    if policy not in ("handle", "error", "ignore"):
        raise InputError(f"functional must be 'handle', 'error' or 'ignore', got {policy!r}.")
    return policy


def _paired(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(value at x, value at the reference) of a tensor computed on the stacked batch [x; x̄]."""
    n = t.shape[0] // 2
    return t[:n], t[n:]


class _Rescale(torch.autograd.Function):
    """Identity on ``y = act(z)``; while the rules are active, the backward sends ``g · Δy/Δz`` to ``z``
    (and ``g`` to ``y``, i.e. through the true derivative, where ``|Δz| < eps``). Inactive, it is the
    identity, so a second differentiation sees the true network. The backward is made of differentiable
    operations on the saved ``z`` and ``y``: the multiplier's own dependence on ``x`` is part of the graph."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, y: torch.Tensor, rules: "DeepLiftRules") -> torch.Tensor:
        ctx.save_for_backward(z, y)
        ctx.rules = rules
        return y.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        if not ctx.rules.active:
            return None, g, None
        z, y = ctx.saved_tensors
        zx, zr = _paired(z)
        yx, yr = _paired(y)
        dz = torch.cat([zx - zr] * 2)
        dy = torch.cat([yx - yr] * 2)
        small = dz.abs() < ctx.rules.eps
        slope = dy / torch.where(small, torch.ones_like(dz), dz)
        zero = torch.zeros_like(g)
        return torch.where(small, zero, g * slope), torch.where(small, g, zero), None


def _softmax_dim(module: nn.Module, ndim: int) -> int:
    """The dimension ``nn.Softmax`` normalises (``dim=None``: torch's legacy implicit choice)."""
    dim = module.dim if module.dim is not None else (0 if ndim in (0, 1, 3) else 1)
    return dim % max(ndim, 1)


class _SoftmaxRescale(torch.autograd.Function):
    """Identity on ``y = softmax(z)``; while the rules are active, the backward sends ``z`` the multipliers
    ``m = g · Δy/Δz`` (elementwise; the softmax's true backward at ``x`` where ``|Δz| < eps``) minus their mean
    over each example's elements, Captum's softmax rule per example. Built of differentiable operations on
    the saved ``z`` and ``y``, like :class:`_Rescale`; inactive, the identity."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, y: torch.Tensor, rules: "DeepLiftRules", dim: int) -> torch.Tensor:
        ctx.save_for_backward(z, y)
        ctx.rules, ctx.dim = rules, dim
        return y.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        if not ctx.rules.active:
            return None, g, None, None
        z, y = ctx.saved_tensors
        zx, zr = _paired(z)
        yx, yr = _paired(y)
        gx = _paired(g)[0]  # only the inputs' rows carry the explained output's gradient
        dz = zx - zr
        small = dz.abs() < ctx.rules.eps
        true = yx * (gx - (gx * yx).sum(ctx.dim, keepdim=True))  # softmax's own backward at x
        m = torch.where(small, true, gx * (yx - yr) / torch.where(small, torch.ones_like(dz), dz))
        m = m - m.flatten(1).mean(1).view(-1, *[1] * (m.dim() - 1))
        return torch.cat([m, torch.zeros_like(m)]), None, None, None


def _unpool(values: torch.Tensor, indices: torch.Tensor, in_shape: torch.Size, nd: int) -> torch.Tensor:
    """The adjoint of max-pooling: ``values`` summed into the argmax positions ``indices`` (flat per channel)."""
    lead = values.shape[: values.dim() - nd]
    flat = values.new_zeros(*lead, int(torch.tensor(in_shape[-nd:]).prod()))
    out = flat.scatter_add(-1, indices.reshape(*lead, -1), values.reshape(*lead, -1))
    return out.reshape(*lead, *in_shape[-nd:])


class _MaxPoolRescale(torch.autograd.Function):
    """Captum's max-pool rule on ``y = maxpool(z)`` (see the module docstring); identity while inactive."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, y: torch.Tensor, rules: "DeepLiftRules", module: nn.Module) -> torch.Tensor:
        pool = _POOL_FUNCTIONS[type(module)] if type(module) in _POOL_FUNCTIONS else next(
            f for t, f in _POOL_FUNCTIONS.items() if isinstance(module, t))
        with torch.no_grad():
            _, idx = pool(z, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode, True)
        ctx.save_for_backward(z, y)
        ctx.idx, ctx.rules = idx, rules
        ctx.nd = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}[pool]
        return y.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        if not ctx.rules.active:
            return None, g, None, None
        z, y = ctx.saved_tensors
        zx, zr = _paired(z)
        yx, yr = _paired(y)
        ix, ir = _paired(ctx.idx)
        gx = _paired(g)[0]  # the reference half carries the same gradient in Captum; only x's is needed
        ymax = torch.maximum(yx, yr)
        nd = ctx.nd
        routed = _unpool(gx * (ymax - yr), ix, z.shape, nd) + _unpool(gx * (yx - ymax), ir, z.shape, nd)
        dz = zx - zr
        small = dz.abs() < ctx.rules.eps
        new = torch.where(small, _unpool(gx, ix, z.shape, nd), routed / torch.where(small, torch.ones_like(dz), dz))
        return torch.cat([new, torch.zeros_like(new)]), None, None, None


class DeepLiftRules(ReLUPatch):
    """Context manager installing the DeepLift (Rescale) rules on ``model`` for one explanation.

    Inside it, every forward must run on a stacked batch ``[x; x̄]`` (first half the inputs, second half
    their references), as :class:`DeepLift` and :class:`~manifex.attribution.layer.LayerDeepLift` do.
    Hooks are removed on exit, also when the body raises; no module is modified. ``functional``: what to do
    with ReLUs called as functions in ``forward`` ("handle": the Rescale rule, "error", "ignore": gradient).
    """

    relu_types = ELEMENTWISE_ACTIVATIONS + SOFTMAX

    def __init__(self, model: nn.Module, *, eps: float = 1e-10, functional: FunctionalPolicy = "handle",
                 maxpool: MaxPoolRule = "captum") -> None:
        super().__init__(model, functional=functional)
        self.eps, self.maxpool = _check_eps(eps), _check_maxpool(maxpool)

    def _install(self) -> None:
        super()._install()
        for module in self.model.modules():
            if self.maxpool != "gradient" and isinstance(module, MAX_POOLS) and not module.return_indices:
                self._handles.append(module.register_forward_hook(self._pool_output))

    def _module_output(self, module, x, y):
        if isinstance(module, SOFTMAX):
            dim = _softmax_dim(module, x.dim())
            if dim == 0:
                raise InputError(
                    f"DeepLift: {module!r} normalises over dimension 0 of a {x.dim()}-d input, the batch, which "
                    "DeepLift runs as [x; baseline]; give the softmax the class dimension (nn.Softmax(dim=1) or dim=-1).")
            return _SoftmaxRescale.apply(x, y, self, dim)
        return _Rescale.apply(x, y, self)

    def _functional_output(self, x):
        return _Rescale.apply(x, F.relu(x), self)

    def _pool_output(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
            return None
        if self.maxpool == "captum" and type(args[0].grad_fn).__name__ in ("_RescaleBackward", "_SoftmaxRescaleBackward"):
            return None  # fed directly by a rescaled activation: Captum's hook order leaves the gradient
        return _MaxPoolRescale.apply(args[0], output, self, module)


def paired_forward(model: Callable[[torch.Tensor], Any], reference: torch.Tensor) -> Callable[[torch.Tensor], Any]:
    """``inp ↦ model([inp; reference])`` restricted to the first half of the output (the inputs' rows)."""
    n = reference.shape[0]

    def run(inp: torch.Tensor) -> torch.Tensor:
        return model(torch.cat([inp, reference]))[:n]

    return run


class DeepLift(Explainer):
    """DeepLift (Rescale) of ``target`` with respect to the input, against ``baseline`` (Captum: ``baselines``).

    ``baseline``: a number (default 0), one input (C, H, W) or one per example (N, C, H, W).
    ``multiply_by_inputs=False`` returns the multipliers ``g`` instead of ``(x − x̄) ⊙ g``.
    ``eps``: below this ``|Δz|`` a nonlinearity keeps its local derivative (Captum's ``eps``).
    ``functional``: ReLUs called as functions get the rule ("handle"), raise ("error") or keep their gradient
    ("ignore", as Captum). ``maxpool``: "captum" (default), "rescale" or "gradient" (module docstring).
    The model must be in eval mode for BatchNorm to be linear (it runs on [x; x̄]).
    """

    name = "deeplift"

    def __init__(
        self,
        model: Model,
        *,
        baseline: float | torch.Tensor = 0.0,
        multiply_by_inputs: bool = True,
        eps: float = 1e-10,
        functional: FunctionalPolicy = "handle",
        maxpool: MaxPoolRule = "captum",
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        if not isinstance(model, nn.Module):
            raise InputError(f"DeepLift hooks the model's activation modules and needs an nn.Module, got {type(model).__name__}.")
        self.baseline, self.multiply_by_inputs = baseline, bool(multiply_by_inputs)
        self.eps, self.functional, self.maxpool = _check_eps(eps), _check_functional(functional), _check_maxpool(maxpool)

    def _attribute(self, x: torch.Tensor, target: Target, create_graph: bool) -> torch.Tensor:
        ref = expand_baseline(self.baseline, x).detach()
        with DeepLiftRules(self.model, eps=self.eps, functional=self.functional, maxpool=self.maxpool):
            grad, _ = target_gradient(paired_forward(self.model, ref), x, target, create_graph=create_graph)
        return (x - ref) * grad if self.multiply_by_inputs else grad

    def __repr__(self) -> str:
        b = f"tensor{tuple(self.baseline.shape)}" if isinstance(self.baseline, torch.Tensor) else self.baseline
        return f"DeepLift(baseline={b}, multiply_by_inputs={self.multiply_by_inputs})"
