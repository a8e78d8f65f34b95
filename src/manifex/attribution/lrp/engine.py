"""The hook engine: one LRP session, the forward hooks that install rules and the autograd functions that
carry them (relevance as a modified gradient; the ``active`` switch restores true gradients)."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ...errors import ModelError
from .composites import _under
from .layers import _batchnorm_affine, _has_own_parameters, _layer_function
from .rules import LinearRule, Pass, Rule, _safe_divide, stabilize

__all__ = ["LRPSession"]

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

