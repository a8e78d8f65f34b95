"""Projections onto tangent spaces and the alignment score ‖P_T E‖ / ‖E‖."""
from __future__ import annotations

import math
import warnings
from typing import Literal

import torch

from ..errors import InputError, check_finite, check_tensor
from .tangent import TangentSpace

__all__ = [
    "alignment",
    "random_baseline",
    "tangent_coefficients",
    "project",
    "decompose",
    "tangent_mass",
    "estimate_dimension",
]


def _basis(tangent: TangentSpace | torch.Tensor) -> torch.Tensor:
    if isinstance(tangent, TangentSpace):
        return tangent.basis
    check_tensor(tangent, "tangent basis", min_ndim=3)
    return tangent


def _check_attribution(E: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    check_tensor(E, "attribution E", min_ndim=2)
    expected = (basis.shape[0], *basis.shape[2:])
    if tuple(E.shape) != expected:
        # Accept only the flat form (N, d); any other reshape (e.g. channels-last) would silently scramble pixels.
        if E.dim() == 2 and E.shape[0] == basis.shape[0] and E.shape[1] == math.prod(basis.shape[2:]):
            return check_finite(E.reshape(expected), "attribution E")
        raise InputError(
            f"attribution E must have shape {expected} (one attribution per tangent space, shaped like the "
            f"images), got {tuple(E.shape)}."
        )
    return check_finite(E, "attribution E")


def tangent_coefficients(E: torch.Tensor, tangent: TangentSpace | torch.Tensor) -> torch.Tensor:
    """Coordinates of E in the tangent basis, (N, r): c = Uᵀ e."""
    basis = _basis(tangent)
    E = _check_attribution(E, basis)
    U = basis.reshape(basis.shape[0], basis.shape[1], -1)
    return torch.einsum("nrd,nd->nr", U, E.reshape(E.shape[0], -1).to(U.dtype))


def project(E: torch.Tensor, tangent: TangentSpace | torch.Tensor) -> torch.Tensor:
    """P_T E = U Uᵀ e, shaped like E."""
    basis = _basis(tangent)
    c = tangent_coefficients(E, basis)
    U = basis.reshape(basis.shape[0], basis.shape[1], -1)
    return torch.einsum("nrd,nr->nd", U, c).reshape(E.shape).to(E.dtype)


def decompose(E: torch.Tensor, tangent: TangentSpace | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split E into its tangent part P_T E and orthogonal part E − P_T E."""
    p = project(E, tangent)
    return p, E.reshape(p.shape) - p


def alignment(E: torch.Tensor, tangent: TangentSpace | torch.Tensor) -> torch.Tensor:
    """Fraction of E in the tangent space, ‖P_T E‖₂ / ‖E‖₂ per sample, shape (N,), in [0, 1].

    ``E`` is any attribution tensor (N, *x_shape) — from manifex, Captum or elsewhere. Samples with E = 0
    get NaN (the score is undefined) and a warning.
    """
    c = tangent_coefficients(E, tangent)
    norm = E.reshape(E.shape[0], -1).to(c.dtype).norm(dim=1)
    zero = norm == 0
    if bool(zero.any()):
        warnings.warn(f"{int(zero.sum())} attributions are exactly zero; their alignment is NaN.", RuntimeWarning, stacklevel=2)
    score = c.norm(dim=1) / norm
    return torch.where(zero, torch.full_like(score, float("nan")), score.clamp(max=1.0))


def random_baseline(k: int, d: int) -> float:
    """Expected alignment of a random direction with a k-dimensional subspace of R^d: √(k/d)."""
    if not 0 < k <= d:
        raise InputError(f"need 0 < k <= d, got k={k}, d={d}.")
    return math.sqrt(k / d)


def tangent_mass(tangent: TangentSpace | torch.Tensor) -> torch.Tensor:
    """Per-pixel tangent mass diag(U Uᵀ), shaped (N, *x_shape); sums to the rank of each sample."""
    basis = _basis(tangent)
    return (basis * basis).sum(1)


def estimate_dimension(
    singular_values: torch.Tensor | TangentSpace,
    method: Literal["gap", "energy"] = "gap",
    *,
    energy: float = 0.99,
) -> torch.Tensor:
    """Manifold dimension per sample from a singular-value spectrum (N, k), largest first.

    ``"gap"``: position of the largest ratio s_i / s_{i+1} (the spectrum's biggest drop), i.e. the number of
    directions before it; a flat spectrum (largest ratio < 10) gives k. ``"energy"``: smallest m with
    Σ_{i<m} s_i² ≥ ``energy`` · Σ s_i².
    """
    s = singular_values.singular_values if isinstance(singular_values, TangentSpace) else singular_values
    check_tensor(s, "singular_values", ndim=2)
    k = s.shape[1]
    if method == "energy":
        if not 0 < energy <= 1:
            raise InputError(f"energy must be in (0, 1], got {energy}.")
        e = (s * s).cumsum(1)
        return (e < energy * e[:, -1:]).sum(1) + 1
    if method == "gap":
        if k == 1:
            return torch.ones(s.shape[0], dtype=torch.long, device=s.device)
        tiny = torch.finfo(s.dtype).tiny
        ratio = s[:, :-1] / s[:, 1:].clamp_min(tiny)
        best = ratio.max(1)
        return torch.where(best.values >= 10.0, best.indices + 1, torch.full_like(best.indices, k))
    raise InputError(f"method must be 'gap' or 'energy', got {method!r}.")
