"""β-smoothing: every piecewise-linear activation of a model replaced by its softplus(β) analogue, reversibly.

``softplus_β(z) = log(1 + exp(β z)) / β`` tends to ``relu(z)`` as β → ∞ (the gap is at most log 2 / β).
A ReLU network's explanation is piecewise constant, so its derivative with respect to the input is zero
almost everywhere; the smoothed network has a useful second derivative (Dombrowski et al., 2019), which
attacks on explanations need. For one ReLU layer the smoothed gradient is the ReLU gradient averaged under
logistic noise on the pre-activations: ``σ(β z) = E[relu'(z + ε)]``, ε ~ Logistic(0, 1/β).

The table (``s = softplus_β``; module and functional forms alike; every analogue → the original as β → ∞,
within a few ``log 2 / β``):

=============================================  ===========================================================
activation                                     smoothed
=============================================  ===========================================================
ReLU · F.relu, torch.relu, Tensor.relu, relu_  ``s(x)``
LeakyReLU(α) · F.leaky_relu(_)                 ``αx + (1 − α)·s(x)``
PReLU (learned α, per channel) · F.prelu       ``αx + (1 − α)·s(x)``
RReLU(l, u), eval mode · F.rrelu(training=F)   as LeakyReLU with α = (l + u)/2
Hardtanh(a, b) · F.hardtanh(_)                 ``a + s(x − a) − s(x − b)``
ReLU6 · F.relu6                                ``s(x) − s(x − 6)``
Hardsigmoid · F.hardsigmoid                    ``(s(x + 3) − s(x − 3)) / 6``
Hardswish · F.hardswish                        ``x·(s(x + 3) − s(x − 3)) / 6``
GELU, SiLU, Mish, Softplus, Tanh, Sigmoid,     left alone (differentiable, nonzero second derivative)
LogSigmoid, Softsign, Tanhshrink, CELU,
ELU(α = 1), Softmax, GLU
ELU(α ≠ 1), SELU, Threshold, Hardshrink,       not smoothable: ``unsupported="raise"`` (default; ModelError
Softshrink, RReLU in train mode                naming them), ``"warn"`` or ``"ignore"`` (left as they are)
max pooling, ``clamp``, ``maximum``, ``abs``   left alone, by design: the research smooths activations only;
                                               behind a smoothed activation the second derivative is nonzero
=============================================  ===========================================================

Two forms:

- :func:`beta_smooth` — a context manager that patches the model in place and always undoes it::

      with beta_smooth(model, 10.0) as smoothing:
          for i in range(steps):
              smoothing.set_beta(10 * 10 ** (i / steps))      # β-growth, no re-hooking
              e = Gradient(model)(x_adv, y, create_graph=True)  # β-smoothed explanation

  Activation modules of the table get forward hooks whose output replaces the module's output.
  Activations called as functions in ``forward`` (``F.relu``, ``torch.relu``, ``Tensor.relu``, ``relu_``,
  ``F.leaky_relu``, ``F.hardtanh``, ``F.relu6``, ``F.prelu``, ..., in place or not) are swapped by a
  :class:`~torch.overrides.TorchFunctionMode` that is active only while a module of the model runs
  ``forward`` (``functional="handle"``, the default); ``functional="error"`` raises :class:`ModelError`
  naming the module instead, ``"ignore"`` leaves every functional call (unsupported ones too) as it is.
- :func:`beta_smoothed` — a deep copy whose ``nn.ReLU`` modules are :class:`SmoothReLU` (an
  ``nn.Softplus`` with a mutable ``beta``) and whose other piecewise-linear activations are
  :class:`SmoothActivation`; the original is untouched. A copy cannot intercept functional calls: pass
  ``example_input`` to have them detected (ModelError) or use :func:`beta_smooth`.

:func:`functional_relu_calls` lists the modules whose own ``forward`` calls a functional ReLU.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Callable, Literal, NamedTuple

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
    "SmoothActivation",
    "SmoothedExplainer",
    "SMOOTHED_MODULES",
    "SMOOTH_MODULES",
    "beta_smooth",
    "beta_smoothed",
    "count_relus",
    "count_smoothed",
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
        if func in self.patch.functions and self.patch._mode is self:
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
    #: Functions routed to :meth:`_on_functional` while a module of the model runs ``forward``.
    functions: frozenset = _RELU_FUNCTIONS

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


def _functional_message(where: list[str], alternative: str, what: str = "a functional ReLU (F.relu / torch.relu / "
                        "Tensor.relu / relu_)", module: str = "nn.ReLU") -> str:
    return (
        f"the forward of {', '.join(where)} calls {what} that module hooks cannot see; make it an {module} module "
        f"(self.act = {module}() in __init__, self.act(x) in forward), or {alternative}."
    )


# --------------------------------------------------------------------------------------------------------
# the smoothing table: piecewise-linear activations and their softplus analogues

UnsupportedPolicy = Literal["raise", "warn", "ignore"]


def _softplus(x: torch.Tensor, beta: float, threshold: float) -> torch.Tensor:
    return F.softplus(x, beta, threshold)


def _smooth_leaky(x: torch.Tensor, slope: float | torch.Tensor, beta: float, threshold: float) -> torch.Tensor:
    """``αx + (1 − α)·softplus_β(x)`` (LeakyReLU, PReLU, eval-mode RReLU; α = 0 is plain softplus)."""
    return slope * x + (1 - slope) * _softplus(x, beta, threshold)


def _smooth_hardtanh(x: torch.Tensor, low: float, high: float, beta: float, threshold: float) -> torch.Tensor:
    """``low + softplus_β(x − low) − softplus_β(x − high)`` (Hardtanh; ReLU6 is low = 0, high = 6)."""
    return low + _softplus(x - low, beta, threshold) - _softplus(x - high, beta, threshold)


def _smooth_hardsigmoid(x: torch.Tensor, beta: float, threshold: float) -> torch.Tensor:
    """``(softplus_β(x + 3) − softplus_β(x − 3)) / 6``: the smoothed ``relu6(x + 3) / 6``."""
    return _smooth_hardtanh(x + 3, 0.0, 6.0, beta, threshold) / 6


def _prelu_slope(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """PReLU's slopes broadcast as ``F.prelu`` does: one per channel (dim 1; dim 0 for 1-D inputs) or one."""
    if weight.numel() == 1:
        return weight.reshape(())
    shape = [1] * x.dim()
    shape[1 if x.dim() >= 2 else 0] = -1
    return weight.reshape(shape)


#: Module types β-smoothing replaces by a softplus analogue (ReLU6 is a Hardtanh).
SMOOTHED_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish,
)
#: Module types left as they are: already smooth enough (C¹, second derivative nonzero), or no activation.
SMOOTH_MODULES: tuple[type[nn.Module], ...] = (
    nn.GELU, nn.SiLU, nn.Mish, nn.Softplus, nn.Tanh, nn.Sigmoid, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink,
    nn.CELU, nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.GLU,
)


def _smooth_module(module: nn.Module, x: torch.Tensor, beta: float, threshold: float) -> torch.Tensor | None:
    """The softplus analogue of ``module(x)``, or None if ``module`` is not replaced (see the table)."""
    if isinstance(module, nn.ReLU):
        return _softplus(x, beta, threshold)
    if isinstance(module, nn.Hardtanh):  # ReLU6 too
        return _smooth_hardtanh(x, float(module.min_val), float(module.max_val), beta, threshold)
    if isinstance(module, nn.LeakyReLU):
        return _smooth_leaky(x, float(module.negative_slope), beta, threshold)
    if isinstance(module, nn.PReLU):
        return _smooth_leaky(x, _prelu_slope(module.weight, x), beta, threshold)
    if isinstance(module, nn.RReLU):
        # eval mode: the slope is the mean (lower + upper) / 2; train mode (random slopes) is unsupported
        return None if module.training else _smooth_leaky(x, (module.lower + module.upper) / 2, beta, threshold)
    if isinstance(module, nn.Hardsigmoid):
        return _smooth_hardsigmoid(x, beta, threshold)
    if isinstance(module, nn.Hardswish):
        return x * _smooth_hardsigmoid(x, beta, threshold)
    return None


def _unsupported_module(module: nn.Module) -> str | None:
    """Why β-smoothing cannot smooth ``module`` (a non-smooth activation without a softplus analogue), or None."""
    if isinstance(module, nn.ELU) and float(module.alpha) != 1.0:
        return f"ELU(alpha={module.alpha:g}) has a kink at 0 (only alpha = 1 is differentiable there)"
    if isinstance(module, nn.SELU):
        return "SELU has a kink at 0"
    if isinstance(module, (nn.Threshold, nn.Hardshrink, nn.Softshrink)):
        return f"{type(module).__name__} is not differentiable at its thresholds"
    if isinstance(module, nn.RReLU) and module.training:
        return "RReLU in train mode draws random slopes (call model.eval() first)"
    return None


class _FunctionalSpec(NamedTuple):
    kind: str
    params: tuple[tuple[str, Any], ...]  # the arguments after the input, with their defaults
    inplace: bool = False  # always in place (relu_, hardtanh_, ...)


def _specs() -> dict[Callable, _FunctionalSpec]:
    inplace = (("inplace", False),)
    table = {
        F.relu: _FunctionalSpec("relu", inplace), torch.relu: _FunctionalSpec("relu", ()),
        torch.relu_: _FunctionalSpec("relu", (), True), torch.Tensor.relu: _FunctionalSpec("relu", ()),
        torch.Tensor.relu_: _FunctionalSpec("relu", (), True),
        F.leaky_relu: _FunctionalSpec("leaky_relu", (("negative_slope", 0.01),) + inplace),
        F.leaky_relu_: _FunctionalSpec("leaky_relu", (("negative_slope", 0.01),), True),
        torch.prelu: _FunctionalSpec("prelu", (("weight", None),)),
        torch.Tensor.prelu: _FunctionalSpec("prelu", (("weight", None),)),
        F.rrelu: _FunctionalSpec("rrelu", (("lower", 1 / 8), ("upper", 1 / 3), ("training", False)) + inplace),
        torch.rrelu: _FunctionalSpec("rrelu", (("lower", 1 / 8), ("upper", 1 / 3), ("training", False))),
        torch.rrelu_: _FunctionalSpec("rrelu", (("lower", 1 / 8), ("upper", 1 / 3), ("training", False)), True),
        F.hardtanh: _FunctionalSpec("hardtanh", (("min_val", -1.0), ("max_val", 1.0)) + inplace),
        F.hardtanh_: _FunctionalSpec("hardtanh", (("min_val", -1.0), ("max_val", 1.0)), True),
        F.relu6: _FunctionalSpec("relu6", inplace),
        F.hardsigmoid: _FunctionalSpec("hardsigmoid", inplace),
        F.hardswish: _FunctionalSpec("hardswish", inplace),
        # not smoothable: refused (or warned about, or ignored) by the `unsupported` policy
        F.elu: _FunctionalSpec("elu", (("alpha", 1.0),) + inplace),
        F.elu_: _FunctionalSpec("elu", (("alpha", 1.0),), True),
        F.selu: _FunctionalSpec("selu", inplace), torch.selu: _FunctionalSpec("selu", ()),
        torch.selu_: _FunctionalSpec("selu", (), True),
        F.threshold: _FunctionalSpec("threshold", (("threshold", None), ("value", None)) + inplace),
        torch.threshold: _FunctionalSpec("threshold", (("threshold", None), ("value", None))),
        torch.threshold_: _FunctionalSpec("threshold", (("threshold", None), ("value", None)), True),
        torch.hardshrink: _FunctionalSpec("hardshrink", (("lambd", 0.5),)),
        torch.Tensor.hardshrink: _FunctionalSpec("hardshrink", (("lambd", 0.5),)),
        F.softshrink: _FunctionalSpec("softshrink", (("lambd", 0.5),)),
    }
    return table


_FUNCTIONAL_SPECS: dict[Callable, _FunctionalSpec] = _specs()
#: Every functional activation β-smoothing intercepts inside the model's forward.
_SMOOTHING_FUNCTIONS = frozenset(_FUNCTIONAL_SPECS)
_FUNCTION_MODULES = {"relu": "nn.ReLU", "leaky_relu": "nn.LeakyReLU", "prelu": "nn.PReLU", "rrelu": "nn.RReLU",
                     "hardtanh": "nn.Hardtanh", "relu6": "nn.ReLU6", "hardsigmoid": "nn.Hardsigmoid",
                     "hardswish": "nn.Hardswish"}


def _bind(spec: _FunctionalSpec, args: tuple, kwargs: dict) -> dict[str, Any]:
    values = dict(spec.params)
    for (name, _), value in zip(spec.params, args[1:]):
        values[name] = value
    values.update({k: v for k, v in kwargs.items() if k in values})
    return values


def _smooth_functional(spec: _FunctionalSpec, x: torch.Tensor, p: dict[str, Any], beta: float,
                       threshold: float) -> torch.Tensor | None:
    """The softplus analogue of a functional activation call, or None if it is not smoothable."""
    kind = spec.kind
    if kind == "relu":
        return _softplus(x, beta, threshold)
    if kind == "leaky_relu":
        return _smooth_leaky(x, float(p["negative_slope"]), beta, threshold)
    if kind == "prelu":
        return _smooth_leaky(x, _prelu_slope(p["weight"], x), beta, threshold)
    if kind == "rrelu" and not p["training"]:
        return _smooth_leaky(x, (p["lower"] + p["upper"]) / 2, beta, threshold)
    if kind == "hardtanh":
        return _smooth_hardtanh(x, float(p["min_val"]), float(p["max_val"]), beta, threshold)
    if kind == "relu6":
        return _smooth_hardtanh(x, 0.0, 6.0, beta, threshold)
    if kind == "hardsigmoid":
        return _smooth_hardsigmoid(x, beta, threshold)
    if kind == "hardswish":
        return x * _smooth_hardsigmoid(x, beta, threshold)
    return None


def _unsupported_functional(spec: _FunctionalSpec, p: dict[str, Any]) -> str | None:
    if spec.kind == "elu":
        return None if float(p["alpha"]) == 1.0 else f"elu(alpha={p['alpha']:g}) has a kink at 0"
    if spec.kind == "rrelu" and p["training"]:
        return "rrelu(training=True) draws random slopes"
    if spec.kind in ("selu", "threshold", "hardshrink", "softshrink"):
        return f"{spec.kind} is not differentiable everywhere and has no softplus analogue here"
    return None


def _check_unsupported_policy(unsupported: str) -> str:
    if unsupported not in ("raise", "warn", "ignore"):
        raise InputError(f"unsupported must be 'raise', 'warn' or 'ignore', got {unsupported!r}.")
    return unsupported


def _unsupported_message(found: list[str]) -> str:
    return (
        f"β-smoothing cannot smooth {'; '.join(found)}: the model's input second derivative would stay zero "
        "(or be undefined) there. Replace these activations (e.g. by nn.ReLU, nn.GELU or nn.ELU()), or pass "
        "unsupported='warn' or 'ignore' to leave them as they are."
    )


def _report_unsupported(found: list[str], policy: str) -> None:
    if not found or policy == "ignore":
        return
    if policy == "raise":
        raise ModelError(_unsupported_message(found))
    warnings.warn(_unsupported_message(found), UserWarning, stacklevel=4)


def _scan_unsupported(model: nn.Module) -> list[str]:
    found = []
    for name, module in model.named_modules():
        reason = _unsupported_module(module)
        if reason is not None:
            found.append(f"{_describe(name, module)}: {reason}")
    return found


class BetaSmoothing(ReLUPatch):
    """Context manager returned by :func:`beta_smooth`; ``beta`` may change while it is active."""

    relu_types = SMOOTHED_MODULES
    functions = _SMOOTHING_FUNCTIONS

    def __init__(self, model: nn.Module, beta: float, *, threshold: float = 20.0, functional: FunctionalPolicy = "handle",
                 unsupported: UnsupportedPolicy = "raise") -> None:
        super().__init__(model, functional=functional)
        self._beta = _check_beta(beta)
        self.threshold = float(threshold)
        self.unsupported = _check_unsupported_policy(unsupported)
        self._warned: set[tuple[int, Callable]] = set()

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

    def _install(self) -> None:
        _report_unsupported(_scan_unsupported(self.model), self.unsupported)  # before any hook
        super()._install()

    def _module_output(self, module, x, y):
        smooth = _smooth_module(module, x, self._beta, self.threshold)
        return y if smooth is None else smooth

    def _functional_output(self, x):
        return F.softplus(x, self._beta, self.threshold)

    def _on_functional(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        inner = self._stack[-1] if self._stack else None
        # inside an activation module the module hook (or the module policy) has the say
        if self.functional == "ignore" or isinstance(inner, SMOOTHED_MODULES + SMOOTH_MODULES) \
                or (inner is not None and _unsupported_module(inner) is not None) \
                or not args or not isinstance(args[0], torch.Tensor):
            return func(*args, **kwargs)
        spec = _FUNCTIONAL_SPECS[func]
        p = _bind(spec, args, kwargs)
        reason = _unsupported_functional(spec, p)
        where = _describe(self._names.get(id(inner), "?"), inner) if inner is not None else "?"
        if reason is not None:
            if self.unsupported == "raise":
                raise ModelError(_unsupported_message([f"a functional call in the forward of {where}: {reason}"]))
            if self.unsupported == "warn" and (id(inner), func) not in self._warned:
                self._warned.add((id(inner), func))
                warnings.warn(_unsupported_message([f"a functional call in the forward of {where}: {reason}"]),
                              UserWarning, stacklevel=3)
            return func(*args, **kwargs)
        if spec.kind not in _FUNCTION_MODULES:  # smooth already (elu with alpha = 1)
            return func(*args, **kwargs)
        if self.functional == "error":
            what = f"a functional {spec.kind} ({getattr(func, '__name__', func)})"
            raise ModelError(_functional_message([where], "pass functional='handle', which swaps functional calls "
                                                 "too", what=what, module=_FUNCTION_MODULES[spec.kind]))
        x = args[0]
        if spec.inplace or p.get("inplace"):
            x.copy_(_smooth_functional(spec, x.clone(), p, self._beta, self.threshold))  # graph through the clone
            return x
        return _smooth_functional(spec, x, p, self._beta, self.threshold)

    def __repr__(self) -> str:
        return (f"BetaSmoothing(beta={self._beta:g}, activations={count_smoothed(self.model)}, "
                f"functional={self.functional!r}, unsupported={self.unsupported!r}, active={self.active})")


def count_smoothed(model: nn.Module) -> int:
    """Number of activation modules β-smoothing replaces (ReLU, LeakyReLU, PReLU, RReLU, Hardtanh, ReLU6,
    Hardsigmoid, Hardswish); functional calls are not counted."""
    modules = list(_check_module(model, "count_smoothed").modules())
    replaced = {id(m.original) for m in modules if isinstance(m, SmoothActivation)}  # in a beta_smoothed copy
    return sum(isinstance(m, SMOOTHED_MODULES) and id(m) not in replaced for m in modules)


def beta_smooth(model: nn.Module, beta: float, *, threshold: float = 20.0, functional: FunctionalPolicy = "handle",
                unsupported: UnsupportedPolicy = "raise") -> BetaSmoothing:
    """Context manager: inside it, every piecewise-linear activation of ``model`` computes its softplus(β)
    analogue (the table in the module docstring; ReLU → ``F.softplus(z, beta, threshold)``).

    ``with beta_smooth(model, beta) as s:`` — ``s.set_beta(b)`` changes β in place. Hooks are removed on
    exit, also when the body raises. No module is replaced and no parameter changes. An ``inplace``
    activation runs on a copy of its input while smoothed (its input is not overwritten).
    ``functional``: what to do with activations called as functions in ``forward`` (module docstring).
    ``unsupported``: what to do with a non-smooth activation that has no analogue (ELU with α ≠ 1, SELU,
    Threshold, Hardshrink, Softshrink, train-mode RReLU): "raise" (default, ModelError naming them, on
    entering for modules, at the call for functions), "warn" or "ignore" (left as they are).
    """
    return BetaSmoothing(model, beta, threshold=threshold, functional=functional, unsupported=unsupported)


class SmoothReLU(nn.Softplus):
    """The softplus(β) that :func:`beta_smoothed` puts in place of an ``nn.ReLU``; ``beta`` is a plain, mutable float."""

    def __init__(self, beta: float = 10.0, threshold: float = 20.0) -> None:
        super().__init__(beta=_check_beta(beta), threshold=threshold)


class SmoothActivation(nn.Module):
    """The softplus(β) analogue that :func:`beta_smoothed` puts in place of a piecewise-linear activation
    other than ReLU (``original``: the replaced module, kept with its parameters, e.g. PReLU's slopes)."""

    def __init__(self, original: nn.Module, beta: float = 10.0, threshold: float = 20.0) -> None:
        super().__init__()
        if not isinstance(original, SMOOTHED_MODULES):
            raise InputError(f"SmoothActivation smooths one of {', '.join(t.__name__ for t in SMOOTHED_MODULES)}, "
                             f"got {type(original).__name__}.")
        self.original, self.beta, self.threshold = original, _check_beta(beta), float(threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        smooth = _smooth_module(self.original, x, self.beta, self.threshold)
        return self.original(x) if smooth is None else smooth

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}, threshold={self.threshold:g}"


def set_smooth_beta(model: nn.Module, beta: float) -> int:
    """Set β of every :class:`SmoothReLU` and :class:`SmoothActivation` in ``model`` (a :func:`beta_smoothed`
    copy); returns how many."""
    beta = _check_beta(beta)
    count = 0
    for m in _check_module(model, "set_smooth_beta").modules():
        if isinstance(m, (SmoothReLU, SmoothActivation)):
            m.beta = beta
            count += 1
    return count


def beta_smoothed(model: nn.Module, beta: float, *, threshold: float = 20.0, example_input: torch.Tensor | None = None,
                  unsupported: UnsupportedPolicy = "raise") -> nn.Module:
    """A deep copy of ``model`` with every ``nn.ReLU`` replaced by :class:`SmoothReLU` (β) and every other
    piecewise-linear activation module by its :class:`SmoothActivation`; ``model`` is untouched.

    Functional activations in ``forward`` cannot be replaced in a copy: with ``example_input`` (a batch the
    model accepts) they are detected and raise :class:`ModelError`; without it they stay as they are silently.
    ``unsupported`` as in :func:`beta_smooth`. Change β later with :func:`set_smooth_beta`.
    """
    beta = _check_beta(beta)
    _check_unsupported_policy(unsupported)
    _report_unsupported(_scan_unsupported(_check_module(model, "beta_smoothed")), unsupported)
    smoothed = copy.deepcopy(model)
    for parent in list(smoothed.modules()):
        if isinstance(parent, SmoothActivation):
            continue
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(parent, child_name, SmoothReLU(beta, threshold))
            elif isinstance(child, SMOOTHED_MODULES) and not (isinstance(child, nn.RReLU) and child.training):
                setattr(parent, child_name, SmoothActivation(child, beta, threshold))
    if example_input is not None:
        calls = _functional_calls(smoothed, example_input, _SMOOTHING_FUNCTIONS)
        if calls:
            named = dict(smoothed.named_modules())
            where = [_describe(n, named[n]) for n in calls]
            raise ModelError(_functional_message(
                where, "use `with beta_smooth(model, beta):`, which swaps functional calls too",
                what="a functional piecewise-linear activation (F.relu, F.leaky_relu, F.hardtanh, ...)",
                module="nn.ReLU (nn.LeakyReLU, ...)",
            ))
    return smoothed


class _FunctionalRecorder(ReLUPatch):
    def __init__(self, model: nn.Module, functions: frozenset = _RELU_FUNCTIONS) -> None:
        super().__init__(model, functional="handle")
        self.calls: dict[str, int] = {}
        self.functions = functions
        if functions is not _RELU_FUNCTIONS:
            self.relu_types = SMOOTHED_MODULES + SMOOTH_MODULES

    def _on_functional(self, func, args, kwargs):
        inner = self._stack[-1] if self._stack else None
        if inner is not None and not isinstance(inner, self.relu_types) and self._counts(func, args, kwargs):
            name = self._names.get(id(inner), "?")
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **kwargs)

    def _counts(self, func, args, kwargs) -> bool:
        if self.functions is _RELU_FUNCTIONS:
            return True
        spec = _FUNCTIONAL_SPECS[func]
        p = _bind(spec, args, kwargs)
        # smoothable (in the table) or refused; smooth calls (elu with alpha = 1) are not counted
        return spec.kind in _FUNCTION_MODULES or _unsupported_functional(spec, p) is not None


def _functional_calls(model: nn.Module, example_input: torch.Tensor, functions: frozenset) -> dict[str, int]:
    recorder = _FunctionalRecorder(model, functions)
    with preserve_model_state(model), torch.no_grad(), recorder:
        model(example_input)
    return recorder.calls


def functional_relu_calls(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """``{qualified module name: number of calls}`` of functional ReLUs made by each module's own forward.

    Runs one forward of ``example_input`` without gradients; the model's state (buffers, flags, hooks) is
    restored. The root module is named ``""``. Calls made inside ``nn.ReLU`` modules are not counted.
    """
    return _functional_calls(_check_module(model, "functional_relu_calls"), example_input, _RELU_FUNCTIONS)


class SmoothedExplainer(Explainer):
    """Any explainer evaluated on the β-smoothed model: ``SmoothedExplainer(Gradient(model), beta=10)``.

    Same as ``with beta_smooth(model, beta): explainer(x, target)``. A callable target that picks class
    indices is resolved once on the original (ReLU) model. ``beta`` may be changed between calls.
    """

    name = "beta_smoothed"

    def __init__(self, explainer: Explainer, beta: float, *, threshold: float = 20.0, functional: FunctionalPolicy = "handle",
                 unsupported: UnsupportedPolicy = "raise") -> None:
        if not isinstance(explainer, Explainer):
            raise InputError("SmoothedExplainer wraps a manifex Explainer, e.g. SmoothedExplainer(Gradient(model), beta=10).")
        super().__init__(_check_module(explainer.model, "SmoothedExplainer"))
        self.inner = explainer
        self.beta = _check_beta(beta)
        self.threshold, self.functional = threshold, functional
        self.unsupported = _check_unsupported_policy(unsupported)
        if unsupported == "raise":  # fail now, not at the first call
            _report_unsupported(_scan_unsupported(self.model), unsupported)

    def _attribute(self, x: torch.Tensor, target: Target, create_graph: bool) -> torch.Tensor:
        with beta_smooth(self.model, _check_beta(self.beta), threshold=self.threshold, functional=self.functional,
                         unsupported=self.unsupported):
            return self.inner._attribute(x, target, create_graph)

    def __repr__(self) -> str:
        return f"SmoothedExplainer({self.inner!r}, beta={self.beta:g})"
