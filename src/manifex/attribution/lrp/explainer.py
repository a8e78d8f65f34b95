"""The LRP explainer (a context manager over the hooked model) and its preset explainers."""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Iterator, Sequence

import torch
from torch import nn

from ...errors import InputError, ModelError
from ..core import OutputSelector, Target, target_gradient
from ..methods import Explainer
from .canonizers import BatchNormFolding, Canonizer, ResidualSum
from .composites import Composite, EpsilonGammaBox, EpsilonPlus, _under
from .engine import LRPSession, _BoundRule
from .layers import _has_own_parameters
from .rules import Epsilon, Gamma, GammaMode, Rule, ZPlus

__all__ = ["LRP", "LRPEpsilon", "LRPGamma", "LRPZPlus", "LRPEpsilonGammaBox", "LRPEpsilonPlus"]

def _default_canonizers() -> tuple[Canonizer, ...]:
    return (BatchNormFolding(), ResidualSum())


class LRP(Explainer):
    """Layer-wise relevance propagation: relevance of ``target`` for ``x`` (N, ...), shaped like ``x``.

    ``composite`` maps layers to rules (default :class:`EpsilonPlus`); ``canonizers`` default to
    ``(BatchNormFolding(), ResidualSum())``, pass ``()`` for none. A layer with parameters that no rule and
    no canonizer covers raises ``ModelError`` naming it. The model's modules are only hooked, never
    modified; ``context()`` exposes the hooked state for hand-written passes. ``output``: which part of a
    tuple/dict model output holds the logits (index, key or callable; see :class:`~manifex.attribution.Explainer`).
    """

    name = "lrp"

    def __init__(self, model: nn.Module, composite: Composite | None = None, *,
                 canonizers: Sequence[Canonizer] | None = None, output: OutputSelector = None) -> None:
        super().__init__(model, output=output)
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

    def __init__(self, model: nn.Module, *, epsilon: float = 1e-6, canonizers: Sequence[Canonizer] | None = None,
                 output: OutputSelector = None) -> None:
        super().__init__(model, Composite.uniform(Epsilon(epsilon)), canonizers=canonizers, output=output)


class LRPGamma(LRP):
    """LRP-γ on every Linear/Conv layer; ``gamma_mode`` "sign_aware" (default) or "textbook" (:class:`Gamma`)."""

    name = "lrp_gamma"

    def __init__(self, model: nn.Module, *, gamma: float = 0.25, stabilizer: float = 1e-6,
                 gamma_mode: GammaMode = "sign_aware", canonizers: Sequence[Canonizer] | None = None,
                 output: OutputSelector = None) -> None:
        rule = Gamma(gamma, stabilizer=stabilizer, mode=gamma_mode)
        super().__init__(model, Composite.uniform(rule), canonizers=canonizers, output=output)


class LRPZPlus(LRP):
    """LRP-α1β0 (z⁺) on every Linear/Conv layer."""

    name = "lrp_alpha1beta0"

    def __init__(self, model: nn.Module, *, stabilizer: float = 1e-6, canonizers: Sequence[Canonizer] | None = None,
                 output: OutputSelector = None) -> None:
        super().__init__(model, Composite.uniform(ZPlus(stabilizer=stabilizer)), canonizers=canonizers, output=output)


class LRPEpsilonGammaBox(LRP):
    """z^B first layer (inputs in [low, high]), γ on convolutions, ε on dense layers (:class:`EpsilonGammaBox`)."""

    name = "lrp_epsilon_gamma_box"

    def __init__(self, model: nn.Module, *, low: float | torch.Tensor = 0.0, high: float | torch.Tensor = 1.0,
                 epsilon: float = 1e-6, gamma: float = 0.25, gamma_mode: GammaMode = "sign_aware",
                 canonizers: Sequence[Canonizer] | None = None, output: OutputSelector = None) -> None:
        composite = EpsilonGammaBox(low, high, epsilon=epsilon, gamma=gamma, gamma_mode=gamma_mode)
        super().__init__(model, composite, canonizers=canonizers, output=output)


class LRPEpsilonPlus(LRP):
    """z⁺ on convolutions, ε on dense layers."""

    name = "lrp_epsilon_plus"

    def __init__(self, model: nn.Module, *, epsilon: float = 1e-6, canonizers: Sequence[Canonizer] | None = None,
                 output: OutputSelector = None) -> None:
        super().__init__(model, EpsilonPlus(epsilon=epsilon), canonizers=canonizers, output=output)

