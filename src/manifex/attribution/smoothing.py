"""β-smoothing: every ReLU of a model replaced by softplus(β), reversibly.

``softplus_β(z) = log(1 + exp(β z)) / β`` tends to ``relu(z)`` as β → ∞ (the gap is at most log 2 / β).
A ReLU network's explanation is piecewise constant, so its derivative with respect to the input is zero
almost everywhere; the smoothed network has a useful second derivative (Dombrowski et al., 2019), which
attacks on explanations need. For one ReLU layer the smoothed gradient is the ReLU gradient averaged under
logistic noise on the pre-activations: ``σ(β z) = E[relu'(z + ε)]``, ε ~ Logistic(0, 1/β).

Two forms:

- :func:`beta_smooth` — a context manager that patches the model in place and always undoes it::

      with beta_smooth(model, 10.0) as smoothing:
          for i in range(steps):
              smoothing.set_beta(10 * 10 ** (i / steps))      # β-growth, no re-hooking
              e = Gradient(model)(x_adv, y, create_graph=True)  # β-smoothed explanation

  ``nn.ReLU`` modules get forward hooks whose output replaces the ReLU's output. ReLUs called as functions
  in ``forward`` (``F.relu``, ``torch.relu``, ``Tensor.relu``, ``relu_``, ``F.relu(..., inplace=True)``)
  are swapped for softplus by a :class:`~torch.overrides.TorchFunctionMode` that is active only while a
  module of the model runs ``forward`` (``functional="handle"``, the default); ``functional="error"``
  raises :class:`ModelError` naming the module instead, ``"ignore"`` leaves them as ReLU.
- :func:`beta_smoothed` — a deep copy whose ``nn.ReLU`` modules are :class:`SmoothReLU` (an
  ``nn.Softplus`` with a mutable ``beta``); the original is untouched. A copy cannot intercept
  functional calls: pass ``example_input`` to have them detected (ModelError) or use :func:`beta_smooth`.

:func:`functional_relu_calls` lists the modules whose own ``forward`` calls a functional ReLU.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from ..errors import InputError, ModelError
from .core import Target, preserve_model_state
from .methods import Explainer

__all__ = [
    "BetaSmoothing",
    "SmoothReLU",
    "SmoothedExplainer",
    "beta_smooth",
    "beta_smoothed",
    "count_relus",
    "functional_relu_calls",
    "set_smooth_beta",
]

FunctionalPolicy = Literal["handle", "error", "ignore"]

#: Every spelling of a functional ReLU that reaches ``__torch_function__`` (``F.relu_`` is ``torch.relu_``).
_RELU_FUNCTIONS = frozenset({F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_})
_INPLACE_RELU_FUNCTIONS = frozenset({torch.relu_, torch.Tensor.relu_})


def _check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise InputError(f"beta must be a finite number > 0 (softplus sharpness; ReLU is beta -> inf), got {beta!r}.")
    return float(beta)


def _check_module(model: object, what: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise InputError(f"{what} needs an nn.Module (it hooks the model's ReLU modules), got {type(model).__name__}.")
    return model


def _describe(name: str, module: nn.Module) -> str:
    return f"{name or '<root>'} ({type(module).__name__})"


def count_relus(model: nn.Module) -> int:
    """Number of distinct ``nn.ReLU`` modules in ``model`` (functional calls are not counted)."""
    return sum(isinstance(m, nn.ReLU) for m in _check_module(model, "count_relus").modules())


class _FunctionalReLUMode(TorchFunctionMode):
    """Routes functional ReLU calls to the patch; everything else passes through unchanged."""

    def __init__(self, patch: "ReLUPatch") -> None:
        super().__init__()
        self.patch = patch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # a mode orphaned on the stack (its patch gone, or another mode left on top of it) stays inert
        if func in _RELU_FUNCTIONS and self.patch._mode is self:
            return self.patch._on_functional(func, args, kwargs)
        return func(*args, **kwargs)


class ReLUPatch:
    """Reversible patch of every ReLU of ``model`` (base of β-smoothing and guided backprop).

    Module ReLUs (instances of ``relu_types``) get a forward hook: ``_module_output(module, x, y)`` replaces
    the output ``y`` computed from input ``x`` (for ``inplace`` ReLUs the module runs on a clone, so ``x`` is
    the unmodified input). Functional ReLUs not made by such a module go to ``_functional_output(x)``
    (out-of-place; in-place calls are emulated by copying the result back into ``x``).

    While any module of the model runs ``forward``, a TorchFunctionMode is pushed on the current thread
    and popped when that outermost call ends, also on exceptions. Hooks are installed by ``__enter__``
    and removed by ``__exit__``; a patch can be entered again after it has been exited.
    """

    relu_types: tuple[type[nn.Module], ...] = (nn.ReLU,)

    def __init__(self, model: nn.Module, *, functional: FunctionalPolicy = "handle") -> None:
        self.model = _check_module(model, type(self).__name__)
        if functional not in ("handle", "error", "ignore"):
            raise InputError(f"functional must be 'handle', 'error' or 'ignore', got {functional!r}.")
        self.functional = functional
        self._handles: list[RemovableHandle] = []
        self._stack: list[nn.Module] = []  # modules whose forward is running, innermost last
        self._saved_inputs: dict[int, list[torch.Tensor]] = {}
        self._mode: _FunctionalReLUMode | None = None
        self._names: dict[int, str] = {}
        self._active = False

    # -- overridden by subclasses ---------------------------------------------------------------------
    def _module_output(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y

    def _functional_output(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)

    # -- installation ---------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """True between ``__enter__`` and ``__exit__`` (hooks installed)."""
        return self._active

    def __enter__(self) -> "ReLUPatch":
        if self.active:
            raise RuntimeError(f"this {type(self).__name__} is already active; patches are not re-entrant.")
        self._active = True
        try:
            self._install()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _install(self) -> None:
        track = self.functional != "ignore"
        for name, module in self.model.named_modules():
            self._names[id(module)] = name
            if track:
                self._handles.append(module.register_forward_pre_hook(self._push))
                self._handles.append(module.register_forward_hook(self._pop, always_call=True, prepend=True))
            if isinstance(module, self.relu_types):
                self._handles.append(module.register_forward_pre_hook(self._save_input, with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._replace_output))

    def remove(self) -> None:
        """Remove every hook and leave no mode behind (also after an interrupted forward)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._active = False
        self._stack.clear()
        self._saved_inputs.clear()
        self._exit_mode()

    def _enter_mode(self) -> None:
        if self._mode is None:
            self._mode = _FunctionalReLUMode(self)
            self._mode.__enter__()

    def _exit_mode(self) -> None:
        mode, self._mode = self._mode, None
        if mode is None:
            return
        stack = torch.overrides._get_current_function_mode_stack()
        if stack and stack[-1] is mode:
            mode.__exit__(None, None, None)

    # -- hooks --------------------------------------------------------------------------------------
    def _push(self, module: nn.Module, args: tuple) -> None:
        if not self._stack:
            self._enter_mode()
        self._stack.append(module)

    def _pop(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._stack and self._stack[-1] is module:
            self._stack.pop()
        if not self._stack:
            self._exit_mode()

    def _save_input(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args and isinstance(args[0], torch.Tensor):
            x = args[0]
        elif isinstance(kwargs.get("input"), torch.Tensor):
            x = kwargs["input"]
        else:
            return None
        self._saved_inputs.setdefault(id(module), []).append(x)
        if not getattr(module, "inplace", False):
            return None
        # let the in-place ReLU overwrite a copy: the replacement is computed from the untouched input
        if args and args[0] is x:
            return (x.clone(), *args[1:]), kwargs
        return args, {**kwargs, "input": x.clone()}

    def _replace_output(self, module: nn.Module, args: tuple, output: Any) -> Any:
        saved = self._saved_inputs.get(id(module))
        if not saved or not isinstance(output, torch.Tensor):
            return None
        return self._module_output(module, saved.pop(), output)

    def _on_functional(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        inner = self._stack[-1] if self._stack else None
        if self.functional == "ignore" or isinstance(inner, self.relu_types):
            return func(*args, **kwargs)
        if self.functional == "error":
            name = self._names.get(id(inner), "?") if inner is not None else "?"
            where = [_describe(name, inner)] if inner is not None else ["?"]
            raise ModelError(_functional_message(where, "pass functional='handle', which swaps functional calls too"))
        x = args[0]
        if func in _INPLACE_RELU_FUNCTIONS or kwargs.get("inplace", False):
            x.copy_(self._functional_output(x.clone()))  # in-place semantics, graph through the clone
            return x
        return self._functional_output(x)


def _functional_message(where: list[str], alternative: str) -> str:
    return (
        f"the forward of {', '.join(where)} calls a functional ReLU (F.relu / torch.relu / Tensor.relu / relu_) "
        "that module hooks cannot see; make it an nn.ReLU module (self.act = nn.ReLU() in __init__, "
        f"self.act(x) in forward), or {alternative}."
    )


class BetaSmoothing(ReLUPatch):
    """Context manager returned by :func:`beta_smooth`; ``beta`` may change while it is active."""

    def __init__(self, model: nn.Module, beta: float, *, threshold: float = 20.0, functional: FunctionalPolicy = "handle") -> None:
        super().__init__(model, functional=functional)
        self._beta = _check_beta(beta)
        self.threshold = float(threshold)

    @property
    def beta(self) -> float:
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        self._beta = _check_beta(value)

    def set_beta(self, beta: float) -> "BetaSmoothing":
        """Change β in place (takes effect at the next forward); returns self."""
        self.beta = beta
        return self

    def _module_output(self, module, x, y):
        return F.softplus(x, self._beta, self.threshold)

    def _functional_output(self, x):
        return F.softplus(x, self._beta, self.threshold)

    def __repr__(self) -> str:
        return f"BetaSmoothing(beta={self._beta:g}, relus={count_relus(self.model)}, functional={self.functional!r}, active={self.active})"


def beta_smooth(model: nn.Module, beta: float, *, threshold: float = 20.0, functional: FunctionalPolicy = "handle") -> BetaSmoothing:
    """Context manager: inside it, every ReLU of ``model`` computes softplus(β) (``F.softplus(z, beta, threshold)``).

    ``with beta_smooth(model, beta) as s:`` — ``s.set_beta(b)`` changes β in place. Hooks are removed on
    exit, also when the body raises. No module is replaced and no parameter changes. An ``inplace``
    ``nn.ReLU`` runs on a copy of its input while smoothed (its input is not overwritten).
    ``functional``: what to do with ReLUs called as functions in ``forward`` (see the module docstring).
    """
    return BetaSmoothing(model, beta, threshold=threshold, functional=functional)


class SmoothReLU(nn.Softplus):
    """The softplus(β) that :func:`beta_smoothed` puts in place of an ``nn.ReLU``; ``beta`` is a plain, mutable float."""

    def __init__(self, beta: float = 10.0, threshold: float = 20.0) -> None:
        super().__init__(beta=_check_beta(beta), threshold=threshold)


def set_smooth_beta(model: nn.Module, beta: float) -> int:
    """Set β of every :class:`SmoothReLU` in ``model`` (a :func:`beta_smoothed` copy); returns how many."""
    beta = _check_beta(beta)
    count = 0
    for m in _check_module(model, "set_smooth_beta").modules():
        if isinstance(m, SmoothReLU):
            m.beta = beta
            count += 1
    return count


def beta_smoothed(model: nn.Module, beta: float, *, threshold: float = 20.0, example_input: torch.Tensor | None = None) -> nn.Module:
    """A deep copy of ``model`` with every ``nn.ReLU`` replaced by :class:`SmoothReLU` (β); ``model`` is untouched.

    Functional ReLUs in ``forward`` cannot be replaced in a copy: with ``example_input`` (a batch the model
    accepts) they are detected and raise :class:`ModelError`; without it they stay ReLUs silently.
    Change β later with :func:`set_smooth_beta`.
    """
    beta = _check_beta(beta)
    smoothed = copy.deepcopy(_check_module(model, "beta_smoothed"))
    for parent in list(smoothed.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(parent, child_name, SmoothReLU(beta, threshold))
    if example_input is not None:
        calls = functional_relu_calls(smoothed, example_input)
        if calls:
            named = dict(smoothed.named_modules())
            where = [_describe(n, named[n]) for n in calls]
            raise ModelError(_functional_message(where, "use `with beta_smooth(model, beta):`, which swaps functional calls too"))
    return smoothed


class _FunctionalRecorder(ReLUPatch):
    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, functional="handle")
        self.calls: dict[str, int] = {}

    def _on_functional(self, func, args, kwargs):
        inner = self._stack[-1] if self._stack else None
        if inner is not None and not isinstance(inner, self.relu_types):
            name = self._names.get(id(inner), "?")
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **kwargs)


def functional_relu_calls(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """``{qualified module name: number of calls}`` of functional ReLUs made by each module's own forward.

    Runs one forward of ``example_input`` without gradients; the model's state (buffers, flags, hooks) is
    restored. The root module is named ``""``. Calls made inside ``nn.ReLU`` modules are not counted.
    """
    _check_module(model, "functional_relu_calls")
    recorder = _FunctionalRecorder(model)
    with preserve_model_state(model), torch.no_grad(), recorder:
        model(example_input)
    return recorder.calls


class SmoothedExplainer(Explainer):
    """Any explainer evaluated on the β-smoothed model: ``SmoothedExplainer(Gradient(model), beta=10)``.

    Same as ``with beta_smooth(model, beta): explainer(x, target)``. A callable target that picks class
    indices is resolved once on the original (ReLU) model. ``beta`` may be changed between calls.
    """

    name = "beta_smoothed"

    def __init__(self, explainer: Explainer, beta: float, *, threshold: float = 20.0, functional: FunctionalPolicy = "handle") -> None:
        if not isinstance(explainer, Explainer):
            raise InputError("SmoothedExplainer wraps a manifex Explainer, e.g. SmoothedExplainer(Gradient(model), beta=10).")
        super().__init__(_check_module(explainer.model, "SmoothedExplainer"))
        self.inner = explainer
        self.beta = _check_beta(beta)
        self.threshold, self.functional = threshold, functional

    def _attribute(self, x: torch.Tensor, target: Target, create_graph: bool) -> torch.Tensor:
        with beta_smooth(self.model, _check_beta(self.beta), threshold=self.threshold, functional=self.functional):
            return self.inner._attribute(x, target, create_graph)

    def __repr__(self) -> str:
        return f"SmoothedExplainer({self.inner!r}, beta={self.beta:g})"
