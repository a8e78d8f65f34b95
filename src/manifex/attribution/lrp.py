"""Layer-wise relevance propagation (LRP) as a modified gradient, by temporary hooks on the user's modules.

How it works
------------
Inside :meth:`LRP.context` every layer that a :class:`Composite` maps to a rule gets a forward hook that
replaces the layer's output ``y`` by a tensor with the *same value* whose backward is the rule. The gradient
that then flows backward through the model is the relevance itself (as in Zennit and Captum):

* at the output, a seed turns the gradient of the explained score into ``R(y) = y ⊙ ∂score/∂y``
  (``y[target]`` for a class index: the usual initial relevance);
* a linear-type layer (Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, eval-mode BatchNorm, average pooling)
  maps the relevance ``R_out`` at its output to ``R_in = Σ_t sign_t · in_t ⊙ ∂/∂in_t [z_t ⊙ R_out / stab(Z)]``
  where each *term* ``z_t = layer(in_t(x); w_t, b_t)`` is the layer evaluated on a modified input with
  modified parameters and ``Z = Σ_t sign_t z_t`` (a rule declares its terms: :class:`LinearRule`);
* ``Pass`` (the default for activations and dropout) hands the relevance through unchanged;
* layers without a rule and without parameters (Flatten, Identity, reshapes, ``torch.cat``, max pooling)
  use the plain gradient: for max pooling that sends all relevance to the maximum (winner takes all).

So ``LRP(model, composite).attribute(x, target)`` is *one* call of :func:`~.core.target_gradient` on the
hooked model: the gradient it returns at the input is the relevance map, shaped like ``x``; its sum over an
example equals the explained logit for conservative rules (bias-free layers, zero stabiliser).
For LRP-0 (``Epsilon(0)``) on ReLU networks the result equals gradient × input.

Second order
------------
The rule backward is written with differentiable torch operations (a local vector-Jacobian product of the
rule's modified forward, recomputed from the saved layer input), so with ``create_graph=True`` the relevance
can be differentiated again. Every hook shares the session's ``active`` flag: when the context exits the
flag goes off, and a later backward pass through the same graph (the second-order pass) sees each hooked
layer's true Jacobian again. Setting ``session.active = False`` inside a context does the same.

Canonizers
----------
:class:`BatchNormFolding` folds an eval-mode BatchNorm into the Linear/Conv layer whose output it directly
receives (detected during the forward pass by tensor identity, so it works for Sequentials and for
``self.bn1(self.conv1(x))``-style blocks alike). It never writes to a parameter or buffer: the folded weights
are new tensors used by the hooks only. :class:`ResidualSum` gives every same-shape tensor addition executed
inside the model's forward (``a + b``, ``a += b``, ``torch.add``) the ε rule for sums,
``R_a = a / stab(a + b) · R``, by a torch-function mode active only during the context; without it the plain
gradient of ``+`` would copy the full relevance into both summands and break conservation.
Both are on by default; ``canonizers=()`` turns them off.

Limitations: LRP needs an ``nn.Module`` whose ruled layers are called with one tensor; activations applied
functionally (``F.softplus``) get their plain gradient (fine for ReLU, not for smooth activations: use
modules); elementwise products (gating, attention) have no rule; only additions are canonized, not
subtractions.
"""
from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Literal, NamedTuple, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from ..errors import InputError, ModelError
from .core import Target, target_gradient
from .methods import Explainer

__all__ = [
    "Rule", "Pass", "LinearRule", "Term", "Epsilon", "Norm", "Gamma", "AlphaBeta", "ZPlus", "ZBox", "Flat",
    "WSquare", "stabilize",
    "Composite", "EpsilonGammaBox", "EpsilonPlus", "EpsilonAlpha2Beta1", "GammaByBlock", "vgg16_gamma_preset",
    "Canonizer", "BatchNormFolding", "ResidualSum", "LRPSession",
    "LRP", "LRPEpsilon", "LRPGamma", "LRPZPlus", "LRPEpsilonGammaBox", "LRPEpsilonPlus",
    "LINEAR_TYPES", "CONV_TYPES", "ACTIVATION_TYPES", "AVGPOOL_TYPES",
]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: Layers whose parameters a rule may modify (plus eval-mode BatchNorm, treated as a per-channel affine map).
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear,) + _CONV + _CONV_TRANSPOSE
CONV_TYPES: tuple[type[nn.Module], ...] = _CONV + _CONV_TRANSPOSE
AVGPOOL_TYPES: tuple[type[nn.Module], ...] = (
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)
#: Elementwise activations and dropout: relevance passes through them unchanged (the :class:`Pass` rule).
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Softplus, nn.Tanh, nn.Sigmoid, nn.LogSigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softsign,
    nn.Tanhshrink, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)

BiasMode = Literal["rule", "keep", "zero"]


# --------------------------------------------------------------------------------------------------------
# rules


def stabilize(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``z + ε·sign(z)`` with sign(0) = +1 (the convention of Zennit and Captum)."""
    return z + torch.where(z >= 0, epsilon, -epsilon)


def _safe_divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den``, and 0 where ``den == 0`` (a zero denominator passes no relevance); differentiable."""
    zero = den == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, torch.ones_like(den), den))


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _positive(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(min=0)


def _negative(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(max=0)


def _ones(t: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(t)


def _square(t: torch.Tensor) -> torch.Tensor:
    return t * t


def _constant(value: float | torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def fill(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x) + torch.as_tensor(value, dtype=x.dtype, device=x.device)

    return fill


class Term(NamedTuple):
    """One modified forward pass of a layer: ``sign · layer(input(x); weight(w), bias(b))``.

    ``bias=None`` leaves the bias out of this term.
    """

    input: Callable[[torch.Tensor], torch.Tensor]
    weight: Callable[[torch.Tensor], torch.Tensor]
    bias: Callable[[torch.Tensor], torch.Tensor] | None
    sign: float = 1.0


#: A group of terms sharing one denominator, and the coefficient its relevance is multiplied by.
Group = tuple[float, tuple[Term, ...]]


class Rule:
    """Base class of LRP rules. A rule is a value: the same instance may serve many layers."""


@dataclass(frozen=True)
class Pass(Rule):
    """Relevance passes through unchanged (activations, dropout); the layer must keep the shape."""


class LinearRule(Rule):
    """A rule for a linear-type layer, declared by :meth:`groups`.

    For each group ``(c, terms)``: ``Z = Σ_t sign_t z_t``, ``s = R_out / stab(Z)`` and the group adds
    ``c · Σ_t sign_t in_t ⊙ J_t^T s`` to ``R_in`` (``J_t``: Jacobian of ``z_t`` wrt its input ``in_t``).
    ``bias``: "rule" treats the bias as the rule declares (as a weight on a constant input, the textbook
    view), "keep" uses the original bias in the first term of each group (as Captum's rules do), "zero"
    drops it.
    """

    stabilizer: float = 0.0
    bias: BiasMode = "rule"
    #: False for rules that evaluate the layer as it is (any module with a single input will do).
    modifies_parameters: bool = True

    def groups(self) -> tuple[Group, ...]:
        raise NotImplementedError

    def relevance(
        self,
        forward: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor],
        x: torch.Tensor,
        r_out: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """``R_in`` (shaped like ``x``) from ``R_out`` (shaped like the layer output).

        Differentiable (in ``x``, ``r_out`` and the parameters) when grad mode is on, which is the case
        inside a backward pass run with ``create_graph=True``.
        """
        create_graph = torch.is_grad_enabled()
        total: torch.Tensor | None = None
        with torch.enable_grad():
            for coefficient, terms in self.groups():
                if coefficient == 0:
                    continue
                handles, outputs, z_sum = [], [], None
                for i, term in enumerate(terms):
                    h = term.input(x if create_graph else x.detach())
                    # a distinct graph node per term, so that two terms never share one gradient slot
                    h = h.view_as(h) if (create_graph and h.requires_grad) else h.detach().requires_grad_(True)
                    w = None if weight is None else term.weight(weight)
                    z = forward(h, w, self._term_bias(term, bias, first=i == 0))
                    handles.append(h)
                    outputs.append(z)
                    z_sum = term.sign * z if z_sum is None else z_sum + term.sign * z
                assert z_sum is not None
                if z_sum.shape != r_out.shape:
                    raise ModelError(
                        f"the {type(self).__name__} rule recomputed an output of shape {tuple(z_sum.shape)} but the "
                        f"layer returned {tuple(r_out.shape)} (e.g. a ConvTranspose called with output_size=); "
                        "give this layer another rule."
                    )
                ratio = _safe_divide(r_out, stabilize(z_sum, self.stabilizer))
                if not create_graph:
                    ratio = ratio.detach()
                grads = torch.autograd.grad(
                    outputs, handles, [term.sign * ratio for term in terms],
                    create_graph=create_graph, allow_unused=True,
                )
                if not create_graph:
                    handles = [h.detach() for h in handles]
                part = sum(h * g for h, g in zip(handles, grads) if g is not None)
                part = coefficient * part if coefficient != 1 else part
                total = part if total is None else total + part
        if total is None or not isinstance(total, torch.Tensor):
            return torch.zeros_like(x)
        return total

    def _term_bias(self, term: Term, bias: torch.Tensor | None, first: bool) -> torch.Tensor | None:
        if bias is None or self.bias == "zero":
            return None
        if self.bias == "keep":
            return bias if first else None
        return None if term.bias is None else term.bias(bias)


def _check_nonnegative(**values: float) -> None:
    for name, v in values.items():
        if not (isinstance(v, (int, float)) and v >= 0 and v == v):
            raise InputError(f"{name} must be a non-negative number, got {v!r}.")


def _check_bias_mode(bias: str) -> None:
    if bias not in ("rule", "keep", "zero"):
        raise InputError(f"bias must be 'rule', 'keep' or 'zero', got {bias!r}.")


@dataclass(frozen=True)
class Epsilon(LinearRule):
    """LRP-ε: ``R_in = x ⊙ W^T (R_out / (z + ε·sign z))``; ``Epsilon(0)`` is LRP-0."""

    epsilon: float = 1e-6
    modifies_parameters = False

    def __post_init__(self) -> None:
        _check_nonnegative(epsilon=self.epsilon)

    @property
    def stabilizer(self) -> float:  # type: ignore[override]
        return self.epsilon

    def groups(self) -> tuple[Group, ...]:
        return ((1.0, (Term(_identity, _identity, _identity),)),)


@dataclass(frozen=True)
class Norm(Epsilon):
    """ε rule for parameter-free linear layers (average pooling): relevance split by contribution."""


@dataclass(frozen=True)
class Gamma(LinearRule):
    """LRP-γ: the layer with ``w + γ·w⁺`` (and ``b + γ·b⁺``) favours positive contributions.

    Meant for non-negative inputs (after a ReLU); ``Gamma(0)`` is LRP-0 with a stabiliser.
    """

    gamma: float = 0.25
    stabilizer: float = 1e-6
    bias: BiasMode = "rule"

    def __post_init__(self) -> None:
        _check_nonnegative(gamma=self.gamma, stabilizer=self.stabilizer)
        _check_bias_mode(self.bias)

    def groups(self) -> tuple[Group, ...]:
        gamma = self.gamma

        def boost(p: torch.Tensor) -> torch.Tensor:
            return p + gamma * p.clamp(min=0)

        return ((1.0, (Term(_identity, boost, boost),)),)


@dataclass(frozen=True)
class AlphaBeta(LinearRule):
    """LRP-αβ: ``R_in = α·R⁺ − β·R⁻`` with positive ``z⁺ = x⁺w⁺ + x⁻w⁻ + b⁺`` and negative
    ``z⁻ = x⁺w⁻ + x⁻w⁺ + b⁻`` contributions normalised separately; conservative when ``α − β = 1``."""

    alpha: float = 2.0
    beta: float = 1.0
    stabilizer: float = 1e-6
    bias: BiasMode = "rule"

    def __post_init__(self) -> None:
        _check_nonnegative(alpha=self.alpha, beta=self.beta, stabilizer=self.stabilizer)
        _check_bias_mode(self.bias)

    def groups(self) -> tuple[Group, ...]:
        positive = (Term(_positive, _positive, _positive), Term(_negative, _negative, None))
        negative = (Term(_positive, _negative, _negative), Term(_negative, _positive, None))
        return ((float(self.alpha), positive), (-float(self.beta), negative))


@dataclass(frozen=True)
class ZPlus(AlphaBeta):
    """z⁺ = α1β0: only positive contributions carry relevance."""

    alpha: float = 1.0
    beta: float = 0.0


@dataclass(frozen=True, eq=False)
class ZBox(LinearRule):
    """z^B for an input layer whose inputs lie in ``[low, high]`` (floats or tensors broadcastable to x):
    ``Z = x·w − low·w⁺ − high·w⁻`` (no bias)."""

    low: float | torch.Tensor = 0.0
    high: float | torch.Tensor = 1.0
    stabilizer: float = 1e-6
    bias: BiasMode = "rule"

    def __post_init__(self) -> None:
        _check_nonnegative(stabilizer=self.stabilizer)
        _check_bias_mode(self.bias)
        if bool(torch.as_tensor(self.low > self.high).any()):
            raise InputError(f"ZBox needs low <= high, got low={self.low!r}, high={self.high!r}.")

    def groups(self) -> tuple[Group, ...]:
        return ((1.0, (
            Term(_identity, _identity, None),
            Term(_constant(self.low), _positive, None, -1.0),
            Term(_constant(self.high), _negative, None, -1.0),
        )),)


@dataclass(frozen=True)
class Flat(LinearRule):
    """Flat: relevance spread uniformly over each output's receptive field (weights and inputs set to 1)."""

    stabilizer: float = 1e-6

    def groups(self) -> tuple[Group, ...]:
        return ((1.0, (Term(_ones, _ones, None),)),)


@dataclass(frozen=True)
class WSquare(LinearRule):
    """w²: relevance spread in proportion to the squared weights, independently of the input."""

    stabilizer: float = 1e-6

    def groups(self) -> tuple[Group, ...]:
        return ((1.0, (Term(_ones, _square, None),)),)


# --------------------------------------------------------------------------------------------------------
# layers as functions of (input, weight, bias)

LayerForward = Callable[[torch.Tensor, Union[torch.Tensor, None], Union[torch.Tensor, None]], torch.Tensor]


def _batchnorm_affine(bn: _BatchNorm, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm as ``x * scale + shift`` per channel."""
    if bn.training or bn.running_mean is None or bn.running_var is None:
        raise ModelError(
            f"BatchNorm layer '{name}' ({type(bn).__name__}) must be in eval mode with running statistics for LRP "
            "(it is then a fixed affine map); call model.eval() first."
        )
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _layer_function(name: str, module: nn.Module) -> tuple[LayerForward, Callable[[], tuple[Any, Any]], bool]:
    """``(forward(u, w, b), own_params() -> (w, b), knows_parameters)`` for one module."""
    if isinstance(module, nn.Linear):
        return F.linear, lambda: (module.weight, module.bias), True
    if isinstance(module, _CONV):
        return (lambda u, w, b: module._conv_forward(u, w, b)), lambda: (module.weight, module.bias), True
    if isinstance(module, _CONV_TRANSPOSE):
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[len(module.kernel_size)]

        def conv_transpose(u, w, b):
            return fn(u, w, b, module.stride, module.padding, module.output_padding, module.groups, module.dilation)

        return conv_transpose, lambda: (module.weight, module.bias), True
    if isinstance(module, _BatchNorm):

        def affine(u, w, b):
            shape = (1, -1) + (1,) * (u.dim() - 2)
            out = u * w.view(shape)
            return out if b is None else out + b.view(shape)

        return affine, lambda: _batchnorm_affine(module, name), True
    return (lambda u, w, b: module.forward(u)), lambda: (None, None), False


def _has_own_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


# --------------------------------------------------------------------------------------------------------
# composites: which rule for which layer

Selector = Union[type, tuple, str, "re.Pattern[str]", Callable[[str, nn.Module], bool]]


_REGEX_SYNTAX = set("\\^$*+?{}[]|()")


def _matches(selector: Selector, name: str, module: nn.Module) -> bool:
    if isinstance(selector, type) or (isinstance(selector, tuple) and all(isinstance(s, type) for s in selector)):
        return isinstance(module, selector)
    if isinstance(selector, re.Pattern):
        return selector.fullmatch(name) is not None
    if isinstance(selector, str):
        if name == selector:
            return True
        # a string with regex syntax (other than the dots of qualified names) is a pattern for the whole name
        if _REGEX_SYNTAX & set(selector):
            try:
                return re.fullmatch(selector, name) is not None
            except re.error:
                return False
        return False
    return bool(selector(name, module))


def _check_selector(selector: Any) -> None:
    ok = (
        isinstance(selector, (type, str, re.Pattern))
        or (isinstance(selector, tuple) and selector and all(isinstance(s, type) for s in selector))
        or callable(selector)
    )
    if not ok:
        raise InputError(
            f"a selector must be a module type, a tuple of types, a module name or regex, or a callable "
            f"(name, module) -> bool; got {selector!r}."
        )


def _under(name: str, covered: Sequence[str]) -> bool:
    """Whether ``name`` lies inside a module in ``covered`` (a rule on a container covers its children)."""
    return any(c == "" or name.startswith(c + ".") for c in covered)


class Composite:
    """Maps layers to rules; the first matching entry wins.

    ``rules``: ``[(selector, rule), ...]``; a selector is a module type, a tuple of types, a qualified
    module name from ``named_modules()`` ("features.0"; a string with regex syntax such as
    ``"block[12].conv1"``, or an ``re.compile`` pattern, must match the whole name), or a callable
    ``(name, module) -> bool``. ``first_layer``: a rule for the first Linear/Conv layer in module order
    (takes precedence). ``defaults=True`` appends ``Pass`` for activations/dropout and ``Norm`` for
    average pooling. A rule on a container covers everything inside it.
    """

    def __init__(self, rules: Sequence[tuple[Selector, Rule]] = (), *, first_layer: Rule | None = None,
                 defaults: bool = True) -> None:
        checked = []
        for entry in rules:
            if not (isinstance(entry, tuple) and len(entry) == 2):
                raise InputError(f"each composite entry must be a (selector, rule) pair, got {entry!r}.")
            selector, rule = entry
            _check_selector(selector)
            if not isinstance(rule, Rule):
                raise InputError(f"the rule for selector {selector!r} must be an LRP Rule (e.g. Epsilon()), got {rule!r}.")
            checked.append((selector, rule))
        if first_layer is not None and not isinstance(first_layer, Rule):
            raise InputError(f"first_layer must be an LRP Rule, got {first_layer!r}.")
        self.rules = checked
        self.first_layer = first_layer
        self.defaults = defaults

    @classmethod
    def uniform(cls, rule: Rule, **kwargs: Any) -> "Composite":
        """``rule`` on every Linear/Conv/ConvTranspose layer (plus the defaults)."""
        return cls([(LINEAR_TYPES, rule)], **kwargs)

    def _default_rules(self) -> list[tuple[Selector, Rule]]:
        return [(ACTIVATION_TYPES, Pass()), (AVGPOOL_TYPES, Norm())] if self.defaults else []

    def _special(self, model: nn.Module) -> dict[str, Rule]:
        """Rules fixed per module name for this model (taking precedence over ``rules``)."""
        if self.first_layer is None:
            return {}
        for name, module in model.named_modules():
            if isinstance(module, LINEAR_TYPES):
                return {name: self.first_layer}
        return {}

    def assign(self, model: nn.Module) -> dict[str, Rule]:
        """``{qualified name: rule}`` for every module that gets a rule ('' is the model itself)."""
        special = self._special(model)
        table = self.rules + self._default_rules()
        out: dict[str, Rule] = {}
        for name, module in model.named_modules():
            if _under(name, list(out)):
                continue
            rule = special.get(name)
            if rule is None:
                rule = next((r for s, r in table if _matches(s, name, module)), None)
            if rule is not None:
                out[name] = rule
        return out

    def _options_repr(self) -> str:
        rules = ", ".join(f"({_selector_repr(s)}, {r!r})" for s, r in self.rules)
        first = f", first_layer={self.first_layer!r}" if self.first_layer is not None else ""
        defaults = "" if self.defaults else ", defaults=False"
        return f"rules=[{rules}]{first}{defaults}"

    def __repr__(self) -> str:  # complete: used in cache keys
        return f"{type(self).__name__}({self._options_repr()})"


def _selector_repr(selector: Any) -> str:
    if isinstance(selector, type):
        return selector.__name__
    if isinstance(selector, tuple):
        return "(" + ", ".join(s.__name__ for s in selector) + ")"
    return repr(selector)


class EpsilonGammaBox(Composite):
    """z^B on the first layer (inputs in ``[low, high]``), γ on convolutions, ε on dense layers."""

    def __init__(self, low: float | torch.Tensor = 0.0, high: float | torch.Tensor = 1.0, *, epsilon: float = 1e-6,
                 gamma: float = 0.25, stabilizer: float = 1e-6) -> None:
        super().__init__(
            [(CONV_TYPES, Gamma(gamma, stabilizer=stabilizer)), (nn.Linear, Epsilon(epsilon))],
            first_layer=ZBox(low, high, stabilizer=stabilizer),
        )


class EpsilonPlus(Composite):
    """z⁺ on convolutions, ε on dense layers."""

    def __init__(self, *, epsilon: float = 1e-6, stabilizer: float = 1e-6) -> None:
        super().__init__([(CONV_TYPES, ZPlus(stabilizer=stabilizer)), (nn.Linear, Epsilon(epsilon))])


class EpsilonAlpha2Beta1(Composite):
    """α2β1 on convolutions, ε on dense layers."""

    def __init__(self, *, epsilon: float = 1e-6, stabilizer: float = 1e-6) -> None:
        super().__init__([(CONV_TYPES, AlphaBeta(2.0, 1.0, stabilizer=stabilizer)), (nn.Linear, Epsilon(epsilon))])


class GammaByBlock(Composite):
    """γ decreasing with depth: ``gammas[k]`` for the convolutions of block ``k + 1``, ``classifier_gamma``
    for dense layers and for layers after the last listed block.

    Blocks are found by counting pooling layers (``pool_types``) in module-registration order, which for a
    Sequential is the execution order: block 1 runs up to the first pool, block 2 up to the second, ...
    If the model has a ``features`` submodule (the VGG layout) only pools and convolutions inside it count
    and every Linear/Conv layer outside it belongs to the classifier; otherwise the whole model is walked.
    ``rules`` (e.g. a z^B ``first_layer``) take precedence.
    """

    def __init__(self, gammas: Sequence[float] = (0.5, 0.5, 0.25, 0.1, 0.0), classifier_gamma: float = 0.0, *,
                 stabilizer: float = 1e-6, pool_types: tuple[type[nn.Module], ...] = (nn.MaxPool2d,),
                 rules: Sequence[tuple[Selector, Rule]] = (), first_layer: Rule | None = None) -> None:
        super().__init__(rules, first_layer=first_layer)
        self.gammas = tuple(float(g) for g in gammas)
        self.classifier_gamma = float(classifier_gamma)
        _check_nonnegative(classifier_gamma=self.classifier_gamma, **{f"gammas[{i}]": g for i, g in enumerate(self.gammas)})
        self.stabilizer = stabilizer
        self.pool_types = pool_types

    def blocks(self, model: nn.Module) -> dict[str, int]:
        """``{layer name: block}`` for every Linear/Conv layer; block 0 is the classifier."""
        features = getattr(model, "features", None)
        prefix = "features" if isinstance(features, nn.Module) else None
        pools, out = 0, {}
        for name, module in model.named_modules():
            inside = prefix is None or name == prefix or name.startswith(prefix + ".")
            if inside and isinstance(module, self.pool_types):
                pools += 1
            elif isinstance(module, LINEAR_TYPES):
                conv_block = inside and isinstance(module, CONV_TYPES) and pools < len(self.gammas)
                out[name] = pools + 1 if conv_block else 0
        return out

    def _special(self, model: nn.Module) -> dict[str, Rule]:
        special = {}
        for name, block in self.blocks(model).items():
            gamma = self.gammas[block - 1] if block else self.classifier_gamma
            special[name] = Gamma(gamma, stabilizer=self.stabilizer)
        # explicit rules and the first-layer rule win over the block schedule
        explicit = super()._special(model)
        for name, module in model.named_modules():
            if name in explicit:
                continue
            if any(_matches(s, name, module) for s, _ in self.rules):
                special.pop(name, None)
        special.update(explicit)
        return special

    def __repr__(self) -> str:
        pools = ", ".join(t.__name__ for t in self.pool_types)
        return (f"GammaByBlock(gammas={self.gammas}, classifier_gamma={self.classifier_gamma}, "
                f"stabilizer={self.stabilizer}, pool_types=({pools},), {self._options_repr()})")


def vgg16_gamma_preset(*, stabilizer: float = 1e-6, first_layer: Rule | None = None) -> GammaByBlock:
    """γ = 0.5 in VGG blocks 1–2, 0.25 in block 3, 0.1 in block 4, 0 in block 5 and the classifier."""
    return GammaByBlock((0.5, 0.5, 0.25, 0.1, 0.0), 0.0, stabilizer=stabilizer, first_layer=first_layer)


# --------------------------------------------------------------------------------------------------------
# the session: hooks, the active switch and the autograd functions that carry the rules


class LRPSession:
    """One LRP context. ``rules``: ``{layer name: rule}``; ``active``: whether the rule backward is used
    (True inside the context, False after it, so later passes through the graph see true gradients)."""

    def __init__(self, model: nn.Module, rules: dict[str, Rule]) -> None:
        self.model = model
        self.rules = rules
        self.active = True
        self._internal_depth = 0
        # outputs of ruled layers during the current forward: id -> (tensor, bound rule, input, params)
        self._produced: dict[int, tuple[torch.Tensor, "_BoundRule", torch.Tensor, Any]] = {}

    @contextlib.contextmanager
    def _internal(self) -> Iterator[None]:
        """manifex's own computations inside the forward/backward: hooks and canonizers stand aside."""
        self._internal_depth += 1
        try:
            yield
        finally:
            self._internal_depth -= 1

    @property
    def _bypassed(self) -> bool:
        return self._internal_depth > 0

    def covers(self, name: str) -> bool:
        """Whether the module ``name`` has a rule, or lies inside a module that has one."""
        return name in self.rules or _under(name, list(self.rules))

    def _seed_hook(self, module: nn.Module, args: tuple, out: Any) -> Any:
        if self._bypassed:
            return None
        self._produced.clear()
        if not isinstance(out, torch.Tensor):
            raise ModelError(f"LRP needs a model that returns one tensor, got {type(out).__name__}.")
        return _Seed.apply(self, out)

    def __repr__(self) -> str:
        return f"LRPSession(active={self.active}, rules={len(self.rules)})"


class _Seed(torch.autograd.Function):
    """Identity on the model output; backward turns ∂score/∂y into the initial relevance y ⊙ ∂score/∂y."""

    @staticmethod
    def forward(ctx, session, out):
        ctx.session = session
        ctx.save_for_backward(out)
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        if not ctx.session.active:
            return None, grad
        (out,) = ctx.saved_tensors
        return None, grad * out


class _PassRelevance(torch.autograd.Function):
    """Value of ``y``; backward hands the relevance at ``y`` to ``x`` unchanged (true gradient when inactive)."""

    @staticmethod
    def forward(ctx, session, x, y):
        ctx.session = session
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        if not ctx.session.active:
            return None, None, grad
        return None, grad, None


class _RuleRelevance(torch.autograd.Function):
    """Value of ``y = layer(x)``; backward applies the layer's rule (true gradient when inactive)."""

    @staticmethod
    def forward(ctx, bound, params, x, y):
        ctx.bound, ctx.params = bound, params
        ctx.save_for_backward(x)
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        bound = ctx.bound
        if not bound.session.active:
            return None, None, None, grad
        if not ctx.needs_input_grad[2]:
            return None, None, None, None
        (x,) = ctx.saved_tensors
        return None, None, bound.relevance(x, grad, ctx.params), None


class _SumRelevance(torch.autograd.Function):
    """``a + b``; backward splits the relevance in proportion to the summands (ε rule for sums)."""

    @staticmethod
    def forward(ctx, session, stabilizer, a, b):
        ctx.session, ctx.stabilizer = session, stabilizer
        ctx.save_for_backward(a, b)
        return a + b

    @staticmethod
    def backward(ctx, grad):
        if not ctx.session.active:
            return None, None, grad, grad
        a, b = ctx.saved_tensors
        ratio = _safe_divide(grad, stabilize(a + b, ctx.stabilizer))
        return None, None, a * ratio, b * ratio


class _BoundRule:
    """A rule bound to one layer in one session: the forward pre-hook and hook that install it."""

    def __init__(self, session: LRPSession, name: str, module: nn.Module, rule: Rule) -> None:
        self.session, self.name, self.module, self.rule = session, name, module, rule
        self.forward, self.own_params, known = _layer_function(name, module)
        if isinstance(rule, LinearRule) and rule.modifies_parameters and not known and _has_own_parameters(module):
            raise ModelError(
                f"the {type(rule).__name__} rule modifies layer parameters, which LRP can do only for Linear, Conv, "
                f"ConvTranspose and BatchNorm layers; layer '{name}' ({type(module).__name__}) needs Epsilon() or Pass()."
            )
        self._inputs: list[torch.Tensor] = []

    def describe(self) -> str:
        return f"'{self.name}' ({type(self.module).__name__})"

    def pre_hook(self, module: nn.Module, args: tuple) -> Any:
        if self.session._bypassed:
            return None
        if len(args) != 1 or not isinstance(args[0], torch.Tensor):
            raise ModelError(
                f"the LRP rule {self.rule!r} on layer {self.describe()} needs a layer called with one tensor, got "
                f"{len(args)} positional argument(s); give it another rule or restructure the model."
            )
        x = args[0]
        self._inputs.append(x)
        if getattr(module, "inplace", False):
            return (x.clone(),)  # keep the layer input intact: the rule needs it, and x is routed around the layer
        return None

    def hook(self, module: nn.Module, args: tuple, out: Any) -> Any:
        if self.session._bypassed:
            return None
        x = self._inputs.pop()
        if not isinstance(out, torch.Tensor):
            raise ModelError(f"the LRP rule on layer {self.describe()} needs a layer that returns one tensor.")
        if isinstance(self.rule, Pass):
            if out.shape != x.shape:
                raise ModelError(
                    f"Pass on layer {self.describe()} needs the output shape {tuple(out.shape)} to equal the input "
                    f"shape {tuple(x.shape)}; give this layer another rule."
                )
            new = _PassRelevance.apply(self.session, x, out)
        elif isinstance(self.rule, LinearRule):
            if isinstance(module, _BatchNorm):
                with self.session._internal():  # fails now, not in the backward pass, if in train mode
                    _batchnorm_affine(module, self.name)
            new = _RuleRelevance.apply(self, None, x, out)
        else:
            raise ModelError(f"unknown LRP rule {self.rule!r} on layer {self.describe()}.")
        self.session._produced[id(new)] = (new, self, x, None)
        return new

    def relevance(self, x: torch.Tensor, r_out: torch.Tensor, params: Any) -> torch.Tensor:
        assert isinstance(self.rule, LinearRule)
        with self.session._internal():
            weight, bias = params if params is not None else self.own_params()
            return self.rule.relevance(self.forward, x, r_out, weight, bias)


# --------------------------------------------------------------------------------------------------------
# canonizers


class Canonizer:
    """Temporarily changes how the model is explained, inside an LRP context; always undone on exit.

    ``claims(name, module)``: modules this canonizer takes care of (so that a layer with parameters and
    no rule is not an error). ``canonize(model, session)``: a context manager that installs it.
    """

    def claims(self, name: str, module: nn.Module) -> bool:
        return False

    def canonize(self, model: nn.Module, session: LRPSession) -> ContextManager[None]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _foldable(layer: nn.Module, received: torch.Tensor) -> bool:
    if isinstance(layer, nn.Linear):
        return received.dim() == 2
    if isinstance(layer, _CONV_TRANSPOSE):
        return layer.groups == 1
    return isinstance(layer, _CONV)


def _fold_batchnorm(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, bn: _BatchNorm,
                    bn_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    scale, shift = _batchnorm_affine(bn, bn_name)
    channel_dim = 1 if isinstance(layer, _CONV_TRANSPOSE) else 0
    if weight.shape[channel_dim] != scale.shape[0]:
        raise ModelError(f"BatchNorm '{bn_name}' has {scale.shape[0]} channels but the layer before it has "
                         f"{weight.shape[channel_dim]} outputs.")
    shape = [1] * weight.dim()
    shape[channel_dim] = -1
    folded_bias = shift if bias is None else bias * scale + shift
    return weight * scale.view(shape), folded_bias


class BatchNormFolding(Canonizer):
    """Folds each eval-mode BatchNorm into the Linear/Conv layer whose output it directly receives.

    During the forward pass the BatchNorm's output is replaced by that layer evaluated with
    ``w' = w·γ/σ`` and ``b' = (b − μ)·γ/σ + β`` (same value up to rounding), carrying the layer's rule
    with the folded parameters, so the layer and the BatchNorm are explained as one layer. No parameter or
    buffer is written. A BatchNorm that has its own rule in the composite is left alone; one that has no
    rule and does not directly follow such a layer raises ``ModelError``.
    """

    def claims(self, name: str, module: nn.Module) -> bool:
        return isinstance(module, _BatchNorm)

    @contextlib.contextmanager
    def canonize(self, model: nn.Module, session: LRPSession) -> Iterator[None]:
        handles = []
        try:
            for name, module in model.named_modules():
                if isinstance(module, _BatchNorm) and not session.covers(name):
                    handles.append(module.register_forward_hook(functools.partial(self._fold, session, name)))
            yield
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def _fold(session: LRPSession, name: str, bn: _BatchNorm, args: tuple, out: Any) -> Any:
        if session._bypassed:
            return None
        received = args[0] if len(args) == 1 else None
        record = session._produced.get(id(received)) if isinstance(received, torch.Tensor) else None
        if record is None or record[0] is not received:
            raise ModelError(
                f"BatchNormFolding cannot fold BatchNorm '{name}' ({type(bn).__name__}): it does not directly receive "
                f"the output of a Linear/Conv layer. Give it a rule instead, e.g. Composite(rules=[('{name}', "
                "Epsilon()), ...]) (it is then explained as a per-channel affine layer)."
            )
        _, bound, x, params = record
        if not isinstance(bound.rule, LinearRule) or not _foldable(bound.module, received):
            raise ModelError(f"BatchNormFolding cannot fold BatchNorm '{name}' into layer {bound.describe()} "
                             f"(rule {bound.rule!r}); give the BatchNorm a rule instead.")
        with session._internal():
            weight, bias = params if params is not None else bound.own_params()
            folded = _fold_batchnorm(bound.module, weight, bias, bn, name)
            y = bound.forward(x, *folded)
        new = _RuleRelevance.apply(bound, folded, x, y)
        session._produced[id(new)] = (new, bound, x, folded)
        return new


_ADD = {torch.add, torch.Tensor.add, torch.Tensor.__add__}
_ADD_INPLACE = {torch.Tensor.add_, torch.Tensor.__iadd__}


class _SumMode(TorchFunctionMode):
    def __init__(self, session: LRPSession, stack: list[nn.Module], selected: set[int], stabilizer: float) -> None:
        super().__init__()
        self.session, self.stack, self.selected, self.stabilizer = session, stack, selected, stabilizer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in _ADD or func in _ADD_INPLACE) and self.stack and not self.session._bypassed \
                and id(self.stack[-1]) in self.selected:
            pair = _addends(args, kwargs)
            if pair is not None:
                a, b = pair
                # clones: the saved summands stay valid even if the model later writes into a or b in place
                total = _SumRelevance.apply(self.session, self.stabilizer, a.clone(), b.clone())
                return a.copy_(total) if func in _ADD_INPLACE else total
        return func(*args, **kwargs)


def _addends(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not args or not isinstance(args[0], torch.Tensor) or set(kwargs) - {"other", "alpha"}:
        return None
    a = args[0]
    b = args[1] if len(args) > 1 else kwargs.get("other")
    if len(args) > 2 or kwargs.get("alpha", 1) != 1 or not isinstance(b, torch.Tensor):
        return None
    if a.shape != b.shape or a.dtype != b.dtype or not a.is_floating_point():
        return None
    if not torch.is_grad_enabled() or not (a.requires_grad or b.requires_grad):
        return None
    return a, b


class ResidualSum(Canonizer):
    """The ε rule for sums on same-shape tensor additions (``a + b``, ``a += b``, ``torch.add``) executed
    in the forward code of the selected modules (``selector`` as in :class:`Composite`; default: every
    module of the model), e.g. ``out + self.shortcut(x)`` in a ResNet block.

    Without it the gradient of ``+`` hands the full relevance to both summands (relevance is counted twice);
    with it ``R_a = a / stab(a + b) · R`` and ``R_b = b / stab(a + b) · R``. Implemented by a torch-function
    mode active only inside the context, plus hooks tracking which module's forward is running.
    """

    def __init__(self, selector: Selector | None = None, *, stabilizer: float = 1e-6) -> None:
        if selector is not None:
            _check_selector(selector)
        _check_nonnegative(stabilizer=stabilizer)
        self.selector, self.stabilizer = selector, stabilizer

    @contextlib.contextmanager
    def canonize(self, model: nn.Module, session: LRPSession) -> Iterator[None]:
        stack: list[nn.Module] = []
        selected = {id(m) for name, m in model.named_modules() if self.selector is None or _matches(self.selector, name, m)}

        def enter(module, args):
            stack.append(module)

        def leave(module, args, out):
            if stack and stack[-1] is module:
                stack.pop()

        handles = []
        try:
            for module in model.modules():
                handles.append(module.register_forward_pre_hook(enter, prepend=True))
                handles.append(module.register_forward_hook(leave, always_call=True))
            with _SumMode(session, stack, selected, self.stabilizer):
                yield
        finally:
            for h in handles:
                h.remove()
            stack.clear()

    def __repr__(self) -> str:
        selector = "" if self.selector is None else f"{_selector_repr(self.selector)}, "
        return f"ResidualSum({selector}stabilizer={self.stabilizer})"


# --------------------------------------------------------------------------------------------------------
# the explainer


def _default_canonizers() -> tuple[Canonizer, ...]:
    return (BatchNormFolding(), ResidualSum())


class LRP(Explainer):
    """Layer-wise relevance propagation: relevance of ``target`` for ``x`` (N, ...), shaped like ``x``.

    ``composite`` maps layers to rules (default :class:`EpsilonPlus`); ``canonizers`` default to
    ``(BatchNormFolding(), ResidualSum())``, pass ``()`` for none. A layer with parameters that no rule and
    no canonizer covers raises ``ModelError`` naming it. The model's modules are only hooked, never
    modified; ``context()`` exposes the hooked state for hand-written passes.
    """

    name = "lrp"

    def __init__(self, model: nn.Module, composite: Composite | None = None, *,
                 canonizers: Sequence[Canonizer] | None = None) -> None:
        super().__init__(model)
        if not isinstance(model, nn.Module):
            raise ModelError(
                f"LRP hooks the layers of an nn.Module; got {type(model).__name__}. Wrap the function in a module "
                "or use a gradient-based method."
            )
        if composite is None:
            composite = EpsilonPlus()
        if not isinstance(composite, Composite):
            raise InputError(f"composite must be a Composite (e.g. EpsilonPlus()), got {composite!r}.")
        canonizers = _default_canonizers() if canonizers is None else tuple(canonizers)
        for c in canonizers:
            if not isinstance(c, Canonizer):
                raise InputError(f"canonizers must be Canonizer instances (e.g. BatchNormFolding()), got {c!r}.")
        self.composite, self.canonizers = composite, canonizers
        self._open: list[ContextManager[LRPSession]] = []
        self.assign()  # fail early on layers without a rule

    def assign(self, model: nn.Module | None = None) -> dict[str, Rule]:
        """``{layer name: rule}`` this explainer uses; raises ``ModelError`` for uncovered layers."""
        model = self.model if model is None else model
        rules = self.composite.assign(model)
        missing = [
            (name, m) for name, m in model.named_modules()
            if name not in rules and not _under(name, list(rules)) and _has_own_parameters(m)
            and not any(c.claims(name, m) for c in self.canonizers)
        ]
        if missing:
            listed = ", ".join(f"'{n}' ({type(m).__name__})" for n, m in missing)
            example = missing[0][0]
            raise ModelError(
                f"LRP has no rule for the layer(s) {listed}, which have parameters. Add a rule to the composite "
                f"(first match wins), e.g. LRP(model, Composite(rules=[('{example}', Epsilon()), ...])), or by "
                f"type: Composite(rules=[({type(missing[0][1]).__name__}, Epsilon())])."
            )
        return rules

    @contextlib.contextmanager
    def context(self, model: nn.Module | None = None) -> Iterator[LRPSession]:
        """Hooks installed (and canonizers applied) inside, removed on exit, also on an exception.

        Inside, ``model(x)`` computes the normal output and the gradient of a score with respect to the
        input is its relevance: ``R = torch.autograd.grad(model(x)[:, c].sum(), x)[0]``.
        """
        model = self.model if model is None else model
        if not isinstance(model, nn.Module):
            raise ModelError(f"LRP hooks the layers of an nn.Module; got {type(model).__name__}.")
        session = LRPSession(model, self.assign(model))
        handles = []
        try:
            with contextlib.ExitStack() as stack:
                for name, module in model.named_modules():
                    rule = session.rules.get(name)
                    if rule is None:
                        continue
                    bound = _BoundRule(session, name, module, rule)
                    handles.append(module.register_forward_pre_hook(bound.pre_hook))
                    handles.append(module.register_forward_hook(bound.hook))
                for canonizer in self.canonizers:
                    stack.enter_context(canonizer.canonize(model, session))
                handles.append(model.register_forward_hook(session._seed_hook))
                yield session
        finally:
            session.active = False
            for h in reversed(handles):
                h.remove()
            session._produced.clear()

    def __enter__(self) -> LRPSession:
        cm = self.context()
        session = cm.__enter__()
        self._open.append(cm)
        return session

    def __exit__(self, *exc: Any) -> bool | None:
        return self._open.pop().__exit__(*exc)

    def _attribute(self, x: torch.Tensor, target: Target, create_graph: bool) -> torch.Tensor:
        with self.context():
            relevance, _ = target_gradient(self.model, x, target, create_graph=create_graph)
        return relevance

    def __repr__(self) -> str:
        return f"{type(self).__name__}(composite={self.composite!r}, canonizers={list(self.canonizers)!r})"


class LRPEpsilon(LRP):
    """LRP-ε on every Linear/Conv layer."""

    name = "lrp_epsilon"

    def __init__(self, model: nn.Module, *, epsilon: float = 1e-6, canonizers: Sequence[Canonizer] | None = None) -> None:
        super().__init__(model, Composite.uniform(Epsilon(epsilon)), canonizers=canonizers)


class LRPGamma(LRP):
    """LRP-γ on every Linear/Conv layer."""

    name = "lrp_gamma"

    def __init__(self, model: nn.Module, *, gamma: float = 0.25, stabilizer: float = 1e-6,
                 canonizers: Sequence[Canonizer] | None = None) -> None:
        super().__init__(model, Composite.uniform(Gamma(gamma, stabilizer=stabilizer)), canonizers=canonizers)


class LRPZPlus(LRP):
    """LRP-α1β0 (z⁺) on every Linear/Conv layer."""

    name = "lrp_alpha1beta0"

    def __init__(self, model: nn.Module, *, stabilizer: float = 1e-6, canonizers: Sequence[Canonizer] | None = None) -> None:
        super().__init__(model, Composite.uniform(ZPlus(stabilizer=stabilizer)), canonizers=canonizers)


class LRPEpsilonGammaBox(LRP):
    """z^B first layer (inputs in [low, high]), γ on convolutions, ε on dense layers."""

    name = "lrp_epsilon_gamma_box"

    def __init__(self, model: nn.Module, *, low: float | torch.Tensor = 0.0, high: float | torch.Tensor = 1.0,
                 epsilon: float = 1e-6, gamma: float = 0.25, canonizers: Sequence[Canonizer] | None = None) -> None:
        super().__init__(model, EpsilonGammaBox(low, high, epsilon=epsilon, gamma=gamma), canonizers=canonizers)


class LRPEpsilonPlus(LRP):
    """z⁺ on convolutions, ε on dense layers."""

    name = "lrp_epsilon_plus"

    def __init__(self, model: nn.Module, *, epsilon: float = 1e-6, canonizers: Sequence[Canonizer] | None = None) -> None:
        super().__init__(model, EpsilonPlus(epsilon=epsilon), canonizers=canonizers)
