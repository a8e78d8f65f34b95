"""Toy data with a known manifold: the research's helix (Dombrowski et al., diffeomorphic counterfactuals).

The helix is the curve h(t) = (sin t, cos t, t) for t in [−4, 4]; a point's label is [x₃ > 0]. Because the curve is
known, the distance of any point to it is computable exactly (:func:`distance_to_helix`), which is how latent and
pixel-space counterfactuals are compared.
"""
from __future__ import annotations

import torch

from ..errors import InputError, check_finite, check_tensor

__all__ = ["helix", "helix_point", "distance_to_helix", "HELIX_T_RANGE"]

HELIX_T_RANGE = (-4.0, 4.0)


def helix_point(t: torch.Tensor) -> torch.Tensor:
    """h(t) = (sin t, cos t, t), shape (*t.shape, 3)."""
    return torch.stack([torch.sin(t), torch.cos(t), t], dim=-1)


def helix(n: int, seed: int = 0, *, t_range: tuple[float, float] = HELIX_T_RANGE) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points on the helix with t ~ U(t_range) drawn with ``seed``: x (n, 3) float32 and y (n,) int64 = [x₃ > 0]."""
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise InputError(f"helix: n must be a positive integer, got {n!r}.")
    lo, hi = t_range
    if not lo < hi:
        raise InputError(f"helix: t_range must be (low, high) with low < high, got {t_range}.")
    g = torch.Generator().manual_seed(int(seed))
    t = lo + (hi - lo) * torch.rand(int(n), generator=g, dtype=torch.float64)
    x = helix_point(t).float()
    return x, (x[:, 2] > 0).long()


def _d2(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Squared distance from x (N, 1, 3) to h(t) for t (N, M)."""
    return (x[..., 0] - torch.sin(t)) ** 2 + (x[..., 1] - torch.cos(t)) ** 2 + (x[..., 2] - t) ** 2


def distance_to_helix(
    x: torch.Tensor,
    *,
    t_range: tuple[float, float] | None = HELIX_T_RANGE,
    grid: int = 2048,
    newton_steps: int = 30,
    return_t: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance of each point x (N, 3) to the helix, (N,), computed in float64.

    ``t_range`` restricts the curve to the data's segment (default [−4, 4]); ``None`` takes the infinite helix.
    Exact 1-D minimisation of D(t) = ‖x − h(t)‖²: the minimiser lies within |t − x₃| ≤ ‖(x₁, x₂)‖ + 1 (since
    D(x₃) ≤ (r + 1)² and D(t) ≥ (t − x₃)²), so a dense grid of ``grid`` points over that bracket finds the basin of
    the global minimum, and safeguarded Newton steps on D′(t) = 2(t − x₃) − 2x₁cos t + 2x₂ sin t,
    D″(t) = 2 + 2x₁ sin t + 2x₂ cos t refine the best three grid points to machine precision.
    Returns the distance, and the curve parameter t* of the nearest point with ``return_t=True``.
    """
    check_tensor(x, "x", ndim=2)
    if x.shape[1] != 3:
        raise InputError(f"distance_to_helix: x must have shape (N, 3), got {tuple(x.shape)}.")
    check_finite(x, "x")
    xd = x.detach().to(torch.float64)
    n = xd.shape[0]
    if n == 0:
        return (xd.new_zeros(0), xd.new_zeros(0)) if return_t else xd.new_zeros(0)
    r = xd[:, :2].norm(dim=1)
    lo, hi = xd[:, 2] - r - 1.0, xd[:, 2] + r + 1.0
    if t_range is not None:
        a, b = float(t_range[0]), float(t_range[1])
        lo, hi = lo.clamp(a, b), hi.clamp(a, b)
    u = torch.linspace(0.0, 1.0, grid, dtype=torch.float64, device=xd.device)
    ts = lo[:, None] + (hi - lo)[:, None] * u[None, :]
    h = ((hi - lo) / (grid - 1)).clamp_min(0.0)
    xx = xd[:, None, :]
    d2 = _d2(xx, ts)
    k = min(3, grid)
    best = d2.topk(k, dim=1, largest=False).indices
    t = ts.gather(1, best)  # (N, k) candidates, each refined inside its own grid cell ± h
    left, right = (t - h[:, None]).maximum(lo[:, None]), (t + h[:, None]).minimum(hi[:, None])
    x1, x2, x3 = xd[:, 0:1], xd[:, 1:2], xd[:, 2:3]
    for _ in range(newton_steps):
        g1 = 2 * (t - x3) - 2 * x1 * torch.cos(t) + 2 * x2 * torch.sin(t)
        g2 = 2 + 2 * x1 * torch.sin(t) + 2 * x2 * torch.cos(t)
        step = torch.where(g2 > 1e-12, g1 / g2.clamp_min(1e-12), g1 * 0.25 / (1 + r[:, None]))
        t = torch.minimum(torch.maximum(t - step, left), right)
    d2t = _d2(xx, t)
    # Keep the better of the refined candidates and the grid points themselves (endpoints of a clamped segment).
    i = d2t.argmin(1, keepdim=True)
    t_star = t.gather(1, i)[:, 0]
    dist2 = d2t.gather(1, i)[:, 0]
    grid_best = d2.min(1)
    use_grid = grid_best.values < dist2
    t_star = torch.where(use_grid, ts.gather(1, grid_best.indices[:, None])[:, 0], t_star)
    dist = torch.where(use_grid, grid_best.values, dist2).clamp_min(0.0).sqrt()
    return (dist, t_star) if return_t else dist
