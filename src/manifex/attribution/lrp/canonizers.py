"""Canonizers: temporary, always-undone changes to how a model is explained (BatchNorm folding, residual sums)."""
from __future__ import annotations

import contextlib
import functools
from typing import Any, ContextManager, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from ...errors import ModelError
from .composites import Selector, _check_selector, _matches, _selector_repr
from .engine import LRPSession, _RuleRelevance, _SumRelevance
from .layers import _CONV, _CONV_TRANSPOSE, _batchnorm_affine
from .rules import LinearRule, _check_nonnegative

__all__ = ["Canonizer", "BatchNormFolding", "ResidualSum"]

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

