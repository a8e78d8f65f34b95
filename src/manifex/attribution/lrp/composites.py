"""Composites: which rule for which layer (by type, name, regex or callable; first match wins), and presets."""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence, Union

import torch
from torch import nn

from ...errors import InputError
from .layers import ACTIVATION_TYPES, AVGPOOL_TYPES, CONV_TYPES, LINEAR_TYPES
from .rules import AlphaBeta, Epsilon, Gamma, GammaMode, Norm, Pass, Rule, ZBox, ZPlus, _check_nonnegative

__all__ = ["Selector", "Composite", "EpsilonGammaBox", "EpsilonPlus", "EpsilonAlpha2Beta1", "GammaByBlock",
           "vgg16_gamma_preset"]

#: What picks the layers a composite's rule applies to: a module type or tuple of types, a layer name (a string
#: with regex syntax matches the whole qualified name), a compiled pattern, or ``f(name, module) -> bool``.
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
    """z^B on the first layer (inputs in ``[low, high]``), γ on convolutions, ε on dense layers.

    ``gamma_mode``: the :class:`Gamma` variant, "sign_aware" (default) or "textbook".
    """

    def __init__(self, low: float | torch.Tensor = 0.0, high: float | torch.Tensor = 1.0, *, epsilon: float = 1e-6,
                 gamma: float = 0.25, stabilizer: float = 1e-6, gamma_mode: GammaMode = "sign_aware") -> None:
        super().__init__(
            [(CONV_TYPES, Gamma(gamma, stabilizer=stabilizer, mode=gamma_mode)), (nn.Linear, Epsilon(epsilon))],
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
    ``rules`` (e.g. a z^B ``first_layer``) take precedence. ``gamma_mode``: the :class:`Gamma` variant,
    "sign_aware" (default) or "textbook".
    """

    def __init__(self, gammas: Sequence[float] = (0.5, 0.5, 0.25, 0.1, 0.0), classifier_gamma: float = 0.0, *,
                 stabilizer: float = 1e-6, pool_types: tuple[type[nn.Module], ...] = (nn.MaxPool2d,),
                 rules: Sequence[tuple[Selector, Rule]] = (), first_layer: Rule | None = None,
                 gamma_mode: GammaMode = "sign_aware") -> None:
        super().__init__(rules, first_layer=first_layer)
        self.gammas = tuple(float(g) for g in gammas)
        self.classifier_gamma = float(classifier_gamma)
        _check_nonnegative(classifier_gamma=self.classifier_gamma, **{f"gammas[{i}]": g for i, g in enumerate(self.gammas)})
        self.stabilizer = stabilizer
        self.pool_types = pool_types
        self.gamma_mode = Gamma(0.0, stabilizer=stabilizer, mode=gamma_mode).mode  # validated now

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
            special[name] = Gamma(gamma, stabilizer=self.stabilizer, mode=self.gamma_mode)
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
                f"stabilizer={self.stabilizer}, pool_types=({pools},), gamma_mode={self.gamma_mode!r}, "
                f"{self._options_repr()})")


def vgg16_gamma_preset(*, stabilizer: float = 1e-6, first_layer: Rule | None = None,
                       gamma_mode: GammaMode = "sign_aware") -> GammaByBlock:
    """γ = 0.5 in VGG blocks 1–2, 0.25 in block 3, 0.1 in block 4, 0 in block 5 and the classifier."""
    return GammaByBlock((0.5, 0.5, 0.25, 0.1, 0.0), 0.0, stabilizer=stabilizer, first_layer=first_layer,
                        gamma_mode=gamma_mode)

