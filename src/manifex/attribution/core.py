"""The single gradient path that every explainer uses, target handling and model-state protection.

``target_gradient`` is the one place where manifex calls ``torch.autograd.grad`` for an explanation;
it takes ``create_graph`` so that explanations can themselves be differentiated (double backprop).
"""
from __future__ import annotations

import contextlib
import numbers
import warnings
from typing import Callable, Iterator, Union

import torch
from torch import nn

from ..errors import InputError, ModelError, check_finite, check_tensor

__all__ = ["Target", "select_target", "target_gradient", "preserve_model_state", "check_input"]

#: A target: one class index for the whole batch, a (N,) tensor of class indices, or a callable that maps
#: the model output (N, ...) to either (N,) integer class indices or (N,) float scores to explain.
Target = Union[int, torch.Tensor, Callable[[torch.Tensor], torch.Tensor], None]


def select_target(output: torch.Tensor, target: Target) -> torch.Tensor:
    """The (N,) scores to explain: ``output[i, target_i]`` (or the callable's scores)."""
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


def target_gradient(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    target: Target,
    *,
    create_graph: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the selected score with respect to ``x``; returns ``(gradient, scores)``.

    Examples are independent, so the gradient of the summed scores is the per-example gradient.
    With ``create_graph=True`` the result stays attached to the graph of ``x`` (if ``x`` requires grad)
    and can be differentiated again.
    """
    if create_graph and x.requires_grad:
        inp = x
    else:
        inp = x.detach().requires_grad_(True)
    with torch.enable_grad():
        output = model(inp)
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
                if b.shape == saved.shape:
                    b.copy_(saved)
