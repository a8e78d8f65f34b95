"""LRP rules, declared: a rule lists the modified forward passes (terms) of a layer; one engine runs them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple

import torch

from ...errors import InputError, ModelError

__all__ = ["Rule", "Pass", "LinearRule", "Term", "Epsilon", "Norm", "Gamma", "AlphaBeta", "ZPlus", "ZBox", "Flat",
           "WSquare", "stabilize"]

#: How a :class:`LinearRule` treats a layer's bias: "rule" as the rule declares (a weight on a constant input),
#: "keep" the original bias in the first term of each group (as Captum), "zero" drops it.
BiasMode = Literal["rule", "keep", "zero"]
#: How :class:`Gamma` boosts: "sign_aware" boosts the contributions of each output's own sign (stable on negative
#: outputs, the default) or "textbook" (``w + γw⁺`` for every output, as Captum).
GammaMode = Literal["sign_aware", "textbook"]


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


#: Which outputs a :class:`Group` explains: all of them, or only those of one sign (of the reference
#: pre-activation).
OutputSign = Literal["all", "positive", "negative"]


class Group(NamedTuple):
    """Terms sharing one denominator, the coefficient their relevance is multiplied by, and the outputs the
    group explains: "all", or only those whose reference pre-activation ``z = layer(x; w, b)`` is
    "positive" (``z >= 0``, sign(0) = +1 as in :func:`stabilize`) or "negative" (``z < 0``).

    A plain ``(coefficient, terms)`` pair is accepted too and means ``outputs="all"``.
    """

    coefficient: float
    terms: tuple[Term, ...]
    outputs: OutputSign = "all"


class Rule:
    """Base class of LRP rules. A rule is a value: the same instance may serve many layers."""


@dataclass(frozen=True)
class Pass(Rule):
    """Relevance passes through unchanged (activations, dropout); the layer must keep the shape."""


class LinearRule(Rule):
    """A rule for a linear-type layer, declared by :meth:`LinearRule.groups`.

    For each group ``(c, terms, outputs)``: ``Z = Σ_t sign_t z_t``, ``s = R_out / stab(Z)`` on the selected
    outputs (0 elsewhere) and the group adds ``c · Σ_t sign_t in_t ⊙ J_t^T s`` to ``R_in`` (``J_t``: Jacobian
    of ``z_t`` wrt its input ``in_t``).
    ``bias``: "rule" treats the bias as the rule declares (as a weight on a constant input, the textbook
    view), "keep" uses the original bias in the first term of each group (as Captum's rules do), "zero"
    drops it.
    """

    stabilizer: float = 0.0
    bias: BiasMode = "rule"
    #: False for rules that evaluate the layer as it is (any module with a single input will do).
    modifies_parameters: bool = True

    def groups(self) -> tuple[Group, ...]:
        """The rule's declaration: its groups (:class:`Group`) of terms (:class:`Term`); each subclass defines them."""
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
        groups = [Group(*g) for g in self.groups()]
        signs = None
        if any(g.outputs != "all" for g in groups):
            with torch.no_grad():  # the reference pre-activation, with the bias as this rule uses it
                signs = forward(x.detach(), weight, None if self.bias == "zero" else bias) >= 0
        # a term on x⁻ (no bias) is exactly zero when x has no negative entry (after a ReLU): skip it
        nonnegative = bool((x >= 0).all()) if any(t.input is _negative for g in groups for t in g.terms) else False
        with torch.enable_grad():
            for coefficient, terms, selected in groups:
                if coefficient == 0:
                    continue
                if nonnegative:
                    terms = tuple(t for t in terms if t.input is not _negative or t.bias is not None) or terms[:1]
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
                if selected != "all":
                    assert signs is not None
                    keep = signs if selected == "positive" else ~signs
                    ratio = torch.where(keep, ratio, torch.zeros_like(ratio))
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
    """LRP-γ: contributions that agree in sign with the output are boosted by ``(1 + γ)``.

    For a layer ``z_j = Σ_i x_i w_ij + b_j`` (``p⁺ = max(p, 0)``, ``p⁻ = min(p, 0)``):

    * ``mode="sign_aware"`` (default; the "generalised" γ rule, as in Zennit): an output with ``z_j >= 0``
      uses ``z'_j = Σ_i [x_i⁺ (w_ij + γ w_ij⁺) + x_i⁻ (w_ij + γ w_ij⁻)] + b_j + γ b_j⁺``, an output with
      ``z_j < 0`` uses ``z'_j = Σ_i [x_i⁺ (w_ij + γ w_ij⁻) + x_i⁻ (w_ij + γ w_ij⁺)] + b_j + γ b_j⁻``, and
      ``R_i = Σ_j (the same boosted contribution of i to j) · R_j / z'_j``. Only contributions of the sign
      of ``z_j`` grow, so ``|z'_j| >= |z_j|``: the denominator never crosses zero, for negative outputs
      (negative logits, inside residual blocks) and negative inputs alike.
    * ``mode="textbook"`` (Montavon et al. 2019; what Captum's ``GammaRule`` does): every output uses
      ``z'_j = Σ_i x_i (w_ij + γ w_ij⁺) + b_j + γ b_j⁺`` and ``R_i = Σ_j x_i (w_ij + γ w_ij⁺) R_j / z'_j``.
      Equal to "sign_aware" where inputs are non-negative and outputs positive; elsewhere the boosted
      denominator can nearly cancel and the relevance explode (x = [1, 1], w = [1, −1.2], b = 0, γ = 0.2:
      z = −0.2 gives R = [−2.4e5, 2.4e5] with textbook, [0.4545, −0.6545] with sign_aware).

    ``Gamma(0)`` is LRP-0 with a stabiliser (both modes). ``bias`` as in :class:`LinearRule` (with "keep"
    the original bias stays in the denominators).
    """

    gamma: float = 0.25
    stabilizer: float = 1e-6
    bias: BiasMode = "rule"
    mode: GammaMode = "sign_aware"

    def __post_init__(self) -> None:
        _check_nonnegative(gamma=self.gamma, stabilizer=self.stabilizer)
        _check_bias_mode(self.bias)
        if self.mode not in ("sign_aware", "textbook"):
            raise InputError(f"Gamma mode must be 'sign_aware' (the default) or 'textbook', got {self.mode!r}.")

    def groups(self) -> tuple[Group, ...]:
        gamma = self.gamma

        def boost_positive(p: torch.Tensor) -> torch.Tensor:
            return p + gamma * p.clamp(min=0)

        def boost_negative(p: torch.Tensor) -> torch.Tensor:
            return p + gamma * p.clamp(max=0)

        if self.mode == "textbook":
            return (Group(1.0, (Term(_identity, boost_positive, boost_positive),)),)
        return (
            Group(1.0, (Term(_positive, boost_positive, boost_positive), Term(_negative, boost_negative, None)),
                  "positive"),
            Group(1.0, (Term(_positive, boost_negative, boost_negative), Term(_negative, boost_positive, None)),
                  "negative"),
        )


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

