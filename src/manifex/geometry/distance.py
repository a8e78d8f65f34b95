"""The distance of images to a generated manifold {decode(z)}: the one search both the counterfactual judges and the
on-manifold evaluation use."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["manifold_distance"]


def manifold_distance(
    decode: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    z_init: torch.Tensor | Sequence[torch.Tensor],
    *,
    steps: int = 300,
    lr: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance of each x (N, ...) to the manifold {decode(z)}: min over z of ‖decode(z) − x‖₂ (N,), and the best
    z (N, k), on x's device.

    Adam on z (summed per-row squared errors, so rows do not interact) from each of the starting codes in
    ``z_init`` (a (N, k) tensor or a list of them, e.g. the code of the original image and an encoder's guess);
    the smallest distance found wins. An upper bound on the true distance (a local search). Written by hand:
    it must run batched through any differentiable decoder, which no library's projection does.
    """
    inits = [z_init] if isinstance(z_init, torch.Tensor) else list(z_init)
    xf = x.detach().reshape(x.shape[0], -1)
    best = torch.full((x.shape[0],), float("inf"), dtype=x.dtype, device=x.device)
    best_z = inits[0].detach().clone().to(x.device)
    for z0 in inits:
        z = z0.detach().clone().to(x.device).requires_grad_(True)
        opt = torch.optim.Adam([z], lr=lr)
        for i in range(steps + 1):
            with torch.enable_grad():  # callers may hold torch.no_grad()
                d2 = (decode(z).reshape(x.shape[0], -1) - xf).pow(2).sum(1)
                loss = d2.sum()
            dist = d2.detach().clamp_min(0).sqrt()
            better = dist < best
            best = torch.where(better, dist, best)
            best_z[better] = z.detach()[better]
            if i == steps:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
    return best, best_z
