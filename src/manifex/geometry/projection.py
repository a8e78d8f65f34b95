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


def _row_scaled(E: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(E / m, m) with m = max |entry| of each row, shapes (N, d) in ``dtype`` and (N, 1) in E's dtype.

    Every score here is linear or scale-invariant in E, so working on rows scaled into [−1, 1] loses nothing,
    while squaring (norms) or casting extreme raw values would overflow to inf or underflow to 0 in float32
    (‖1e20 · e‖² = inf, ‖1e-22 · e‖² = 0). The scaling is done in E's own dtype, before any cast, and by
    division (1/m itself may overflow for subnormal m). Zero rows keep m = 0 and stay zero.
    """
    flat = E.reshape(E.shape[0], -1)
    m = flat.abs().amax(dim=1, keepdim=True) if flat.shape[1] else flat.new_zeros(flat.shape[0], 1)
    scaled = flat / torch.where(m > 0, m, torch.ones_like(m))
    return scaled.to(dtype), m


def _scaled_coefficients(E: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Uᵀ(e/m), e/m, m): coordinates of the row-scaled attribution, the scaled rows (N, d) and the scales (N, 1)."""
    E = _check_attribution(E, basis)
    U = basis.reshape(basis.shape[0], basis.shape[1], -1)
    scaled, m = _row_scaled(E, U.dtype)
    return torch.einsum("nrd,nd->nr", U, scaled), scaled, m


def tangent_coefficients(E: torch.Tensor, tangent: TangentSpace | torch.Tensor) -> torch.Tensor:
    """Coordinates of E in the tangent basis, (N, r): c = Uᵀ e (computed on e / max|e| and scaled back).

    The dtype is the wider of E's and the basis's, so a float64 E beyond float32's range stays finite.
    """
    c, _, m = _scaled_coefficients(E, _basis(tangent))
    dtype = torch.promote_types(c.dtype, m.dtype)
    return c.to(dtype) * m.to(dtype)


def project(E: torch.Tensor, tangent: TangentSpace | torch.Tensor) -> torch.Tensor:
    """P_T E = U Uᵀ e, shaped like E (computed on e / max|e| per sample and scaled back, so any finite scale works)."""
    basis = _basis(tangent)
    c, _, m = _scaled_coefficients(E, basis)
    U = basis.reshape(basis.shape[0], basis.shape[1], -1)
    return (torch.einsum("nrd,nr->nd", U, c).to(E.dtype) * m).reshape(E.shape)


def decompose(E: torch.Tensor, tangent: TangentSpace | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split E into its tangent part P_T E and orthogonal part E − P_T E."""
    p = project(E, tangent)
    return p, E.reshape(p.shape) - p


def alignment(E: torch.Tensor, tangent: TangentSpace | torch.Tensor) -> torch.Tensor:
    """Fraction of E in the tangent space, ‖P_T E‖₂ / ‖E‖₂ per sample, shape (N,), in [0, 1].

    ``E`` is any attribution tensor ``(N, *x_shape)`` — from manifex, Captum or elsewhere. The score is
    scale-invariant and computed so: each row is divided by its largest ``|entry|`` first, so E × 1e20 or
    E × 1e-22 in float32 scores exactly like E. Only samples with E exactly 0 get NaN (the score is
    undefined), with a warning. Compare with :func:`random_baseline`.
    """
    c, scaled, m = _scaled_coefficients(E, _basis(tangent))
    zero = m[:, 0] == 0
    if bool(zero.any()):
        warnings.warn(f"{int(zero.sum())} attributions are exactly zero; their alignment is NaN.", RuntimeWarning, stacklevel=2)
    score = c.norm(dim=1) / scaled.norm(dim=1)
    return torch.where(zero, torch.full_like(score, float("nan")), score.clamp(max=1.0))


def random_baseline(k: int, d: int, *, rms: bool = False) -> float:
    """Alignment ‖P_T e‖/‖e‖ of a uniformly random direction e with a k-dimensional subspace T of R^d.

    ‖P_T e‖²/‖e‖² ~ Beta(k/2, (d − k)/2), so the **expectation** (the default, what "× baseline" ratios use) is

        E[‖P_T e‖/‖e‖] = Γ((k+1)/2) Γ(d/2) / (Γ(k/2) Γ((d+1)/2)),

    computed with log-gamma functions (stable for any d). ``rms=True`` returns the root mean square
    √E[‖P_T e‖²/‖e‖²] = √(k/d) instead, the figure the research quotes. The mean is the smaller:
    0.0964 vs 0.0988 at (k, d) = (10, 1024) (0.976 ×), 0.2026 vs 0.25 at (1, 16) (0.81 ×).
    """
    if isinstance(k, bool) or isinstance(d, bool) or int(k) != k or int(d) != d:
        raise InputError(f"k and d must be integers, got k={k!r}, d={d!r}.")
    k, d = int(k), int(d)
    if not 0 < k <= d:
        raise InputError(f"need 0 < k <= d, got k={k}, d={d}.")
    if rms:
        return math.sqrt(k / d)
    if k == d:
        return 1.0
    from scipy.special import gammaln

    return math.exp(gammaln((k + 1) / 2) + gammaln(d / 2) - gammaln(k / 2) - gammaln((d + 1) / 2))


def tangent_mass(tangent: TangentSpace | torch.Tensor) -> torch.Tensor:
    """Per-pixel tangent mass diag(U Uᵀ), shaped ``(N, *x_shape)``; sums to the rank of each sample."""
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
