"""The single gradient path that every explainer uses, target and output handling, model-state protection.

``target_gradient`` is the one place where manifex calls ``torch.autograd.grad`` for an explanation;
it takes ``create_graph`` so that explanations can themselves be differentiated (double backprop).
``selected_output`` is the one place where a model's tuple/dict output is reduced to the logits (the
``output=`` option of every explainer and of ``manipulate``).
"""
from __future__ import annotations

import contextlib
import contextvars
import numbers
import warnings
import weakref
from collections.abc import Mapping
from typing import Any, Callable, Iterator, Union

import torch
from torch import nn

from ..errors import InputError, ManifexError, ModelError, check_finite, check_tensor

__all__ = [
    "Target", "OutputSelector", "select_target", "select_output", "selected_output", "call_model", "as_target",
    "target_gradient", "preserve_model_state", "check_input", "check_model_input", "model_device",
    "TrainModeWarning", "warn_if_training",
]

#: A target: one class index for the whole batch, a (N,) tensor or a list of class indices (one per
#: example), or a callable that maps the model output (N, ...) to either (N,) integer class indices or (N,)
#: float scores to explain.
Target = Union[int, torch.Tensor, list[int], Callable[[torch.Tensor], torch.Tensor], None]

#: Which part of a model's output holds the logits, for models that return a tuple/list (an index), a dict
#: or Hugging Face style output (a key, or an attribute name), or anything else (a callable
#: ``output -> (N, ...) tensor``). ``None``: the model returns the logits tensor itself.
OutputSelector = Union[int, str, Callable[[Any], torch.Tensor], None]


def as_target(target: Target) -> Target:
    """A list of class indices as a (N,) long tensor; anything else unchanged (checked later).

    A tuple is refused: Captum reads ``target=(i, j)`` as one index into a multi-dimensional output for every
    example, not as one class per example, so accepting it here would silently change its meaning.
    """
    if isinstance(target, tuple):
        raise InputError(
            f"target={target!r}: a tuple is one multi-dimensional output index in Captum, not one class per example; "
            "pass a list or a (N,) tensor of class indices, or a callable that picks the scores from the output."
        )
    if isinstance(target, list):
        if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in target):
            raise InputError(f"a target list must hold integer class indices (one per example), got {list(target)[:10]}.")
        return torch.tensor([int(t) for t in target], dtype=torch.long)
    return target


def _describe(out: object) -> str:
    if isinstance(out, torch.Tensor):
        return f"tensor {tuple(out.shape)}"
    if isinstance(out, Mapping):
        return f"{type(out).__name__} with keys {list(out)[:8]}"
    if isinstance(out, (tuple, list)):
        return f"{type(out).__name__} of {len(out)} ({', '.join(_describe(o) for o in out[:4])}{', ...' if len(out) > 4 else ''})"
    return type(out).__name__


def _output_hint(out: object) -> str:
    if isinstance(out, Mapping):
        keys = [k for k in out if isinstance(k, str)]
        key = "logits" if "logits" in keys else (keys[0] if keys else "logits")
        return f'output="{key}" (a key)'
    if isinstance(out, (tuple, list)):
        return "output=0 (an index)"
    return 'output="logits" (an attribute name)'


def check_output_selector(output: object) -> OutputSelector:
    """``output`` if it is a valid selector (None, an int index, a str key or a callable), else InputError."""
    if output is None or isinstance(output, str) or callable(output):
        return output
    if isinstance(output, numbers.Integral) and not isinstance(output, bool):
        return int(output)
    raise InputError(
        f"output must be an index (int), a key (str) or a callable that picks the logits from the model's output, "
        f"got {type(output).__name__}; e.g. output=0 for a tuple, output=\"logits\" for a dict."
    )


def select_output(out: object, output: OutputSelector) -> torch.Tensor:
    """The logits tensor in a model output ``out``: ``out[output]`` (an index into a tuple/list, a key of a dict,
    or an attribute name), ``output(out)`` for a callable, ``out`` itself for ``None`` (a tensor is required)."""
    if output is None:
        if isinstance(out, torch.Tensor):
            return out
        raise InputError(
            f"the model returns a {_describe(out)}, not a tensor of logits; say which part holds the logits with "
            f"{_output_hint(out)}, or output=callable (e.g. output=lambda out: out.logits)."
        )
    if callable(output):
        picked = output(out)
    elif isinstance(out, torch.Tensor):
        raise InputError(
            f"output={output!r} picks a part of a tuple or dict output, but the model returns one tensor "
            f"{tuple(out.shape)}; drop output= (or pass a callable)."
        )
    elif isinstance(output, int) and isinstance(out, (tuple, list)):
        if not -len(out) <= output < len(out):
            raise InputError(f"output={output} is out of range for the model's {_describe(out)}.")
        picked = out[output]
    elif isinstance(output, str) and isinstance(out, Mapping):
        if output not in out:
            raise InputError(f"output={output!r} is not a key of the model's output; its keys are {list(out)}.")
        picked = out[output]
    elif isinstance(output, str) and hasattr(out, output):
        picked = getattr(out, output)
    else:
        raise InputError(
            f"output={output!r} cannot select from the model's {_describe(out)}; use {_output_hint(out)} or a callable."
        )
    if not isinstance(picked, torch.Tensor):
        raise InputError(f"output={output!r} selected a {_describe(picked)} from the model's output; it must select the logits tensor.")
    return picked


# The output selections in force: (model, selector) pairs, innermost last. A module gets one forward hook
# (installed by the outermost selection) that applies the innermost selector; a plain callable is looked up
# in ``call_model``. A context variable, so nested explainers (SmoothGrad over IG, LRP's own forward, an
# explainer inside ``manipulate``) all see the same selection without passing it through every signature.
_SELECTIONS: contextvars.ContextVar[tuple[tuple[object, OutputSelector], ...]] = contextvars.ContextVar(
    "manifex_output_selections", default=()
)


def _selector_for(model: object) -> tuple[bool, OutputSelector]:
    """(whether a selection for ``model`` is in force, its innermost non-None selector)."""
    found, selector = False, None
    for m, sel in _SELECTIONS.get():
        if m is model:
            found = True
            if sel is not None:
                selector = sel
    return found, selector


def _selection_hook(module: nn.Module, args: object, out: object) -> torch.Tensor:
    return select_output(out, _selector_for(module)[1])


@contextlib.contextmanager
def selected_output(model: object, output: OutputSelector = None) -> Iterator[None]:
    """Inside, every call of ``model`` (by an explainer, LRP's hooks or ``manipulate``) returns the logits
    tensor picked by ``output``; a model that returns a tuple/dict without a selector raises InputError
    naming the option. For an ``nn.Module`` by a forward hook (removed on exit, also on an exception);
    for a plain callable through ``call_model``. Nested selections on one model: the innermost
    non-None selector applies."""
    output = check_output_selector(output)
    first = not _selector_for(model)[0]
    token = _SELECTIONS.set(_SELECTIONS.get() + ((model, output),))
    handle = model.register_forward_hook(_selection_hook) if first and isinstance(model, nn.Module) else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
        _SELECTIONS.reset(token)


# Fragments of the messages torch raises when a layer meets an input of the wrong shape, channel count or
# dtype. They only decide whether a model's own RuntimeError is re-raised with the input named in it (the
# original message is kept, chained); an unknown message passes through unchanged.
_INPUT_MISMATCH = (
    "expected input", "channels", "shapes cannot be multiplied", "size mismatch", "must match the size",
    "expected scalar type", "should be the same", "same dtype", "to be 3d", "to be 4d", "unbatched",
    "dimension out of range", "cannot be multiplied", "invalid for input of size", "found dtype",
)


def call_model(model: Callable[[torch.Tensor], Any], x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` reduced to its logits tensor by the selection in force (see :func:`selected_output`).

    A shape, channel or dtype mismatch inside the model is re-raised as an :class:`InputError` that names
    the input's shape and dtype (the model's own message is kept), so every entry point reports it alike."""
    try:
        out = model(x)
    except RuntimeError as e:
        msg = str(e)
        if isinstance(e, ManifexError) or not any(k in msg.lower() for k in _INPUT_MISMATCH):
            raise
        raise InputError(
            f"the model cannot run on inputs of shape {tuple(x.shape)} and dtype {x.dtype} "
            f"({msg.splitlines()[0][:300]}); pass a batch shaped (N, C, H, W) with the channels, image size and "
            "dtype the model was built for."
        ) from e
    if isinstance(model, nn.Module) and _selector_for(model)[0]:
        return out  # the forward hook has selected already
    return select_output(out, _selector_for(model)[1])


class TrainModeWarning(UserWarning):
    """A model is explained in train mode with layers (Dropout, BatchNorm) that behave differently in eval."""


# Models already warned about: one warning per model (by identity; weak, so models are not kept alive).
_WARNED_TRAINING: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _mode_dependent(m: nn.Module) -> bool:
    """Layers whose output differs between train and eval mode: Dropout of every kind, and normalisation
    layers that keep running statistics (BatchNorm, InstanceNorm with ``track_running_stats``)."""
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return m.p > 0
    return isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats


def warn_if_training(model: object, stacklevel: int = 3) -> None:
    """Warn once per model if it is explained with Dropout or BatchNorm layers in train mode: two identical
    calls then give different maps and BatchNorm couples the examples of a batch."""
    if not isinstance(model, nn.Module) or model in _WARNED_TRAINING:
        return
    active = sorted({type(m).__name__ for m in model.modules() if m.training and _mode_dependent(m)})
    if not active:
        return
    _WARNED_TRAINING.add(model)
    warnings.warn(
        f"the model is in train mode with {', '.join(active)} layers active: explanations are random (Dropout) or "
        "depend on the other examples of the batch (BatchNorm). Call model.eval() before explaining (manifex "
        "leaves the mode as it finds it; this warning is shown once per model).",
        TrainModeWarning,
        stacklevel=stacklevel,
    )


def select_target(output: torch.Tensor, target: Target) -> torch.Tensor:
    """The (N,) scores to explain: ``output[i, target_i]`` (or the callable's scores)."""
    output = select_output(output, None)  # a clear error for a tuple/dict output without output=
    target = as_target(target)
    n = output.shape[0]
    if callable(target) and not isinstance(target, torch.Tensor):
        picked = target(output)
        if not isinstance(picked, torch.Tensor) or picked.shape != (n,):
            got = tuple(picked.shape) if isinstance(picked, torch.Tensor) else type(picked).__name__
            raise InputError(f"a callable target must return a ({n},) tensor of class indices or scores, got {got}.")
        if picked.is_floating_point():
            return picked
        target = picked
    if output.dim() == 1:
        if target is not None:
            raise InputError("the model returns one score per example (shape (N,)); pass target=None.")
        return output
    flat = output.reshape(n, -1)
    if target is None:
        if flat.shape[1] != 1:
            raise InputError(
                f"the model returns {flat.shape[1]} outputs per example; pass target= a class index, "
                "a (N,) tensor of indices, or a callable."
            )
        return flat[:, 0]
    if isinstance(target, bool):
        raise InputError("target must be a class index, not a bool.")
    if isinstance(target, numbers.Integral):
        target = int(target)
    if isinstance(target, int):
        idx = torch.full((n,), target, dtype=torch.long, device=output.device)
    elif isinstance(target, torch.Tensor):
        if target.is_floating_point():
            raise InputError(f"target tensor must hold integer class indices, got dtype {target.dtype}.")
        if target.dim() == 0:
            target = target.expand(n)
        if target.shape != (n,):
            raise InputError(f"target must have shape ({n},) (one class per example), got {tuple(target.shape)}.")
        idx = target.to(device=output.device, dtype=torch.long)
    else:
        raise InputError(f"target must be an int, a tensor or a callable, got {type(target).__name__}.")
    if bool(((idx < 0) | (idx >= flat.shape[1])).any()):
        raise InputError(
            f"target indices must lie in [0, {flat.shape[1] - 1}] (the model has {flat.shape[1]} outputs), "
            f"got values in [{int(idx.min())}, {int(idx.max())}]."
        )
    return flat.gather(1, idx[:, None]).squeeze(1)


def check_input(x: torch.Tensor, name: str = "inputs") -> torch.Tensor:
    """Batch-first floating-point input without NaN/inf."""
    check_tensor(x, name, min_ndim=2)
    return check_finite(x, name)


def model_device(model: object) -> torch.device | None:
    """The device of the model's first parameter or buffer (``None`` for a plain callable)."""
    if isinstance(model, nn.Module):
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    return None


def check_model_input(model: object, x: torch.Tensor, name: str = "inputs") -> torch.Tensor:
    """The checks every entry point runs on a batch before the model sees it; returns ``x`` on the model's device.

    ``x`` must be a batch-first, floating-point tensor without NaN/inf, of the dtype of the model's
    floating-point parameters (a float64 batch for a float32 model is refused with the conversion to make,
    not silently cast). Shape and channel mismatches are named when the model first runs (:func:`call_model`)."""
    check_input(x, name)
    dev = model_device(model)
    if dev is not None and x.device != dev:
        x = x.to(dev)
    if isinstance(model, nn.Module):
        dtypes = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point()})
        if dtypes and str(x.dtype) not in dtypes:
            raise InputError(
                f"{name} have dtype {x.dtype} but the model's parameters are {dtypes}; convert one of them "
                f"({name}.to({dtypes[0]}) or model.to({x.dtype}))."
            )
    return x


def target_gradient(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    target: Target,
    *,
    create_graph: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the selected score with respect to ``x``; returns ``(gradient, scores)``.

    Examples are independent, so the gradient of the summed scores is the per-example gradient.
    ``model(x)`` is reduced to its logits by the output selection in force (:func:`selected_output`).
    With ``create_graph=True`` the result stays attached to the graph of ``x`` (if ``x`` requires grad)
    and can be differentiated again.
    """
    if create_graph and x.requires_grad:
        inp = x
    else:
        inp = x.detach().requires_grad_(True)
    with torch.enable_grad():
        output = call_model(model, inp)
        scores = select_target(output, target)
        if not scores.requires_grad:
            raise ModelError(
                "the model output does not depend differentiably on its input (no gradient path); "
                "remove torch.no_grad()/.detach() from forward, or use a method that needs no gradient."
            )
        (grad,) = torch.autograd.grad(scores.sum(), inp, create_graph=create_graph, allow_unused=True)
    if grad is None:
        raise ModelError("the model output does not depend on its input; the gradient is undefined.")
    if create_graph and x.requires_grad and not grad.requires_grad:
        warnings.warn(
            "create_graph=True, but the explanation does not depend differentiably on the input: its input "
            "derivative is zero or undefined (an affine model, or a non-differentiable op on the path). "
            "For ReLU networks, smooth the model first (manifex.beta_smooth).",
            RuntimeWarning,
            stacklevel=3,
        )
    return grad, scores.detach() if not create_graph else scores


@contextlib.contextmanager
def preserve_model_state(model: object) -> Iterator[None]:
    """Restore train/eval flags, ``requires_grad`` of every parameter, buffers and the hook dicts afterwards.

    Also restores them when the body raises, so a failed explanation never leaves hooks behind.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    modules = list(model.modules())
    training = [m.training for m in modules]
    params = list(model.parameters())
    req = [p.requires_grad for p in params]
    hook_attrs = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    hooks = [{a: dict(getattr(m, a, {})) for a in hook_attrs} for m in modules]
    # Buffers (e.g. BatchNorm running statistics) change when a model in train mode runs forward.
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        for m, t, h in zip(modules, training, hooks):
            m.training = t
            for a, saved in h.items():
                current = getattr(m, a, None)
                if current is not None and dict(current) != saved:
                    current.clear()
                    current.update(saved)
        for p, r in zip(params, req):
            p.requires_grad_(r)
        with torch.no_grad():
            for b, saved in buffers:
                # only buffers that changed: an in-place copy bumps the version counter, which breaks a
                # create_graph explanation that saved the buffer (eval-mode BatchNorm) for a later backward
                if b.shape == saved.shape and not torch.equal(b, saved):
                    b.copy_(saved)
