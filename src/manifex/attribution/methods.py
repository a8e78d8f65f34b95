"""Gradient-based explainers: one interface, one gradient path (``target_gradient``), bounded memory.

Every explainer maps a batch ``x`` (N, ...) and a target to an attribution of the same shape as ``x``.
The public ``attribute`` validates, moves inputs to the model's device and protects the model's state;
the private ``_attribute`` holds the maths and is what wrappers such as :class:`SmoothGrad` call.
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from .core import Target, check_input, preserve_model_state, target_gradient

__all__ = [
    "Explainer",
    "Gradient",
    "InputXGradient",
    "IntegratedGradients",
    "SmoothGrad",
    "integration_rule",
    "model_device",
]

Model = Callable[[torch.Tensor], torch.Tensor]


def model_device(model: object) -> torch.device | None:
    """The device of the model's first parameter or buffer (``None`` for a plain callable)."""
    if isinstance(model, nn.Module):
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    return None


def _repeat_target(target: Target, times: int) -> Target:
    """The target for a batch made of ``times`` stacked copies of the original batch."""
    if isinstance(target, torch.Tensor) and target.dim() == 1:
        return target.repeat(times)
    return target


def _target_rows(target: Target, start: int, size: int) -> Target:
    """The target of the examples ``start : start + size`` (per-example tensors are sliced)."""
    if isinstance(target, torch.Tensor) and target.dim() == 1:
        return target[start : start + size]
    return target


class Explainer:
    """Base class: ``explainer(x, target, create_graph=False) -> attribution`` shaped like ``x``."""

    name = "explainer"

    def __init__(self, model: Model) -> None:
        if not callable(model):
            raise InputError(f"model must be callable (an nn.Module or function), got {type(model).__name__}.")
        self.model = model

    def attribute(self, x: torch.Tensor, target: Target = None, *, create_graph: bool = False) -> torch.Tensor:
        """Attribution of ``target`` for the batch ``x`` (N, ...), same shape as ``x``."""
        check_input(x)
        dev = model_device(self.model)
        if dev is not None and x.device != dev:
            x = x.to(dev)
        if isinstance(self.model, nn.Module):
            dtypes = {p.dtype for p in self.model.parameters() if p.is_floating_point()}
            if dtypes and x.dtype not in dtypes:
                raise InputError(f"inputs have dtype {x.dtype} but the model's parameters are {sorted(map(str, dtypes))}; "
                                 f"convert one of them (x.to({sorted(map(str, dtypes))[0]}) or model.to(x.dtype)).")
        if isinstance(target, torch.Tensor):
            target = target.to(x.device)
        with preserve_model_state(self.model):
            target = self._fix_target(x, target)
            out = self._attribute(x, target, create_graph)
        # Without create_graph the result must not carry a partial graph back to ``x`` (x * grad would
        # otherwise differentiate as if the gradient were constant: a silently wrong derivative).
        return out if create_graph else out.detach()

    __call__ = attribute

    def _fix_target(self, x: torch.Tensor, target: Target) -> Target:
        """Resolve a callable that picks class indices once, at ``x``: methods that evaluate the model at
        other points (IG paths, noisy copies) then explain the same class throughout, as Captum does.
        Callables that return float scores stay callables."""
        if not callable(target) or isinstance(target, torch.Tensor):
            return target
        with torch.no_grad():
            picked = target(self.model(x))
        if isinstance(picked, torch.Tensor) and not picked.is_floating_point():
            return picked
        return target

    def _attribute(self, x: torch.Tensor, target: Target, create_graph: bool) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Gradient(Explainer):
    """The signed gradient of the target score with respect to the input (Saliency without abs)."""

    name = "gradient"

    def _attribute(self, x, target, create_graph):
        return target_gradient(self.model, x, target, create_graph=create_graph)[0]


class InputXGradient(Explainer):
    """Input times gradient."""

    name = "input_x_gradient"

    def _attribute(self, x, target, create_graph):
        return x * target_gradient(self.model, x, target, create_graph=create_graph)[0]


IntegrationMethod = Literal["gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"]


def integration_rule(steps: int, method: IntegrationMethod = "gausslegendre") -> tuple[list[float], list[float]]:
    """Nodes ``alphas`` in [0, 1] and ``weights`` summing to 1 (same conventions as Captum)."""
    if steps < 1 or (method == "riemann_trapezoid" and steps < 2):
        raise InputError(f"steps must be >= {2 if method == 'riemann_trapezoid' else 1}, got {steps}.")
    if method == "gausslegendre":
        nodes, w = np.polynomial.legendre.leggauss(steps)
        return list(0.5 * (nodes + 1)), list(0.5 * w)
    if method == "riemann_left":
        return [i / steps for i in range(steps)], [1 / steps] * steps
    if method == "riemann_right":
        return [(i + 1) / steps for i in range(steps)], [1 / steps] * steps
    if method == "riemann_middle":
        return [(i + 0.5) / steps for i in range(steps)], [1 / steps] * steps
    if method == "riemann_trapezoid":
        h = 1 / (steps - 1)
        return [i * h for i in range(steps)], [h / 2] + [h] * (steps - 2) + [h / 2]
    raise InputError(
        f"unknown integration method {method!r}; use one of gausslegendre, riemann_left, riemann_right, "
        "riemann_middle, riemann_trapezoid."
    )


class IntegratedGradients(Explainer):
    """Integrated Gradients along the straight path from ``baseline`` to ``x``.

    ``multiply_by_inputs=False`` returns the path-averaged gradient (the seed's MNIST setting).
    ``internal_batch_size`` bounds how many interpolated examples go through the model at once (a batch
    larger than it is explained in chunks of examples).
    """

    name = "integrated_gradients"

    def __init__(
        self,
        model: Model,
        *,
        steps: int = 50,
        method: IntegrationMethod = "gausslegendre",
        baseline: float | torch.Tensor = 0.0,
        multiply_by_inputs: bool = True,
        internal_batch_size: int = 512,
    ) -> None:
        super().__init__(model)
        self.alphas, self.weights = integration_rule(steps, method)
        self.steps, self.method = steps, method
        self.baseline = baseline
        self.multiply_by_inputs = multiply_by_inputs
        if internal_batch_size < 1:
            raise InputError(f"internal_batch_size must be >= 1, got {internal_batch_size}.")
        self.internal_batch_size = internal_batch_size

    def _baseline_like(self, x: torch.Tensor) -> torch.Tensor:
        b = self.baseline
        if isinstance(b, torch.Tensor):
            b = b.to(x)
            if b.shape not in (x.shape, x.shape[1:], ()):
                raise InputError(f"baseline must be a scalar or have shape {tuple(x.shape)} or {tuple(x.shape[1:])}, got {tuple(b.shape)}.")
            return b.expand_as(x)
        return torch.full_like(x, float(b))

    def _attribute(self, x, target, create_graph):
        base = self._baseline_like(x)
        size = self.internal_batch_size
        if x.shape[0] <= size:
            return self._integrate(x, base, target, create_graph)
        # even one step of the whole batch would exceed the bound: chunks of examples (they are independent)
        return torch.cat([self._integrate(x[s : s + size], base[s : s + size], _target_rows(target, s, size), create_graph)
                          for s in range(0, x.shape[0], size)])

    def _integrate(self, x: torch.Tensor, base: torch.Tensor, target: Target, create_graph: bool) -> torch.Tensor:
        delta = x - base
        per_chunk = max(1, self.internal_batch_size // x.shape[0])
        total = torch.zeros_like(x)
        for start in range(0, self.steps, per_chunk):
            a = torch.tensor(self.alphas[start : start + per_chunk], dtype=x.dtype, device=x.device)
            w = torch.tensor(self.weights[start : start + per_chunk], dtype=x.dtype, device=x.device)
            shape = (-1,) + (1,) * x.dim()
            points = (base.unsqueeze(0) + a.view(shape) * delta.unsqueeze(0)).reshape(-1, *x.shape[1:])
            g = target_gradient(self.model, points, _repeat_target(target, len(a)), create_graph=create_graph)[0]
            total = total + (w.view(shape) * g.reshape(len(a), *x.shape)).sum(0)
        return total * delta if self.multiply_by_inputs else total

    def __repr__(self) -> str:
        return f"IntegratedGradients(steps={self.steps}, method={self.method!r}, multiply_by_inputs={self.multiply_by_inputs})"


NoiseKind = Literal["smoothgrad", "smoothgrad_sq", "vargrad"]


class SmoothGrad(Explainer):
    """Average of any explainer over Gaussian-perturbed copies of the input.

    ``sigma`` is absolute (input units) unless ``relative=True``, then it is a fraction of each example's
    value range (max − min). ``kind`` = "smoothgrad" (mean), "smoothgrad_sq" (mean of squares) or "vargrad"
    (variance). ``seed`` makes the noise reproducible; ``internal_batch_size`` bounds memory.
    """

    name = "smoothgrad"

    def __init__(
        self,
        explainer: Explainer,
        *,
        sigma: float = 0.15,
        n_samples: int = 25,
        relative: bool = False,
        kind: NoiseKind = "smoothgrad",
        seed: int | None = 0,
        internal_batch_size: int = 512,
    ) -> None:
        if not isinstance(explainer, Explainer):
            raise InputError("SmoothGrad wraps a manifex Explainer, e.g. SmoothGrad(Gradient(model)).")
        super().__init__(explainer.model)
        if sigma < 0 or not math.isfinite(sigma):
            raise InputError(f"sigma must be a finite non-negative number, got {sigma}.")
        if n_samples < 1:
            raise InputError(f"n_samples must be >= 1, got {n_samples}.")
        if kind not in ("smoothgrad", "smoothgrad_sq", "vargrad"):
            raise InputError(f"kind must be 'smoothgrad', 'smoothgrad_sq' or 'vargrad', got {kind!r}.")
        self.inner, self.sigma, self.n_samples = explainer, sigma, n_samples
        self.relative, self.kind, self.seed = relative, kind, seed
        self.internal_batch_size = internal_batch_size

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        """All noise draws, shape (n_samples, *x.shape), sample-major.

        One draw per sample is shared by every example of the batch, so that an example's explanation
        does not depend on which batch (or position) it is explained in: batched == per-example.
        """
        g = None
        if self.seed is not None:
            g = torch.Generator(device=x.device).manual_seed(self.seed)
        eps = torch.randn((self.n_samples, 1, *x.shape[1:]), generator=g, device=x.device, dtype=x.dtype)
        eps = eps.expand(self.n_samples, *x.shape)
        if self.relative:
            flat = x.detach().reshape(x.shape[0], -1)
            scale = (flat.max(1).values - flat.min(1).values).view(1, -1, *([1] * (x.dim() - 1)))
            return eps * (self.sigma * scale)
        return eps * self.sigma

    def _attribute(self, x, target, create_graph):
        n, size = x.shape[0], self.internal_batch_size
        if n > size:  # chunks of examples; the seeded noise is shared across examples, so they match one batch
            return torch.cat([self._attribute(x[s : s + size], _target_rows(target, s, size), create_graph)
                              for s in range(0, n, size)])
        noise = self._noise(x)
        per_chunk = max(1, self.internal_batch_size // n)
        s1 = torch.zeros_like(x)
        s2 = torch.zeros_like(x)
        for start in range(0, self.n_samples, per_chunk):
            eps = noise[start : start + per_chunk]
            m = eps.shape[0]
            noisy = (x.unsqueeze(0) + eps).reshape(-1, *x.shape[1:])
            attr = self.inner._attribute(noisy, _repeat_target(target, m), create_graph).reshape(m, *x.shape)
            s1 = s1 + attr.sum(0)
            s2 = s2 + (attr * attr).sum(0)
        mean = s1 / self.n_samples
        if self.kind == "smoothgrad":
            return mean
        if self.kind == "smoothgrad_sq":
            return s2 / self.n_samples
        return s2 / self.n_samples - mean * mean

    def __repr__(self) -> str:
        return f"SmoothGrad({self.inner!r}, sigma={self.sigma}, n_samples={self.n_samples}, kind={self.kind!r})"
