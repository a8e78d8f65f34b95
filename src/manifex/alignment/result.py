"""The result of an alignment run: what the report, the figures and ``metrics.json`` are made from."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["AlignmentResult", "SEED_REFERENCE"]

#: Mean alignment of the gradient in the seed's outputs (MNIST32, 10k validation images).
SEED_REFERENCE = {"standard": {"gradient": 0.312}, "robust": {"gradient": 0.675}}


@dataclass
class AlignmentResult:
    """Scores per model and method, example decompositions, tangent masses and the metrics dict.

    - ``scores[model][method]``: (N,) alignment scores ‖P_T E‖/‖E‖ (method "random" = Gaussian vectors).
    - ``images``: (M, C, H, W) the M examples shown in figures; ``labels`` (M,).
    - ``parts[model][method]``: (tangent part, orthogonal part), each (M, C, H, W).
    - ``tangent_mass``: (M, C, H, W) per-pixel diag(U Uᵀ) of the shown examples.
    - ``metrics``: the JSON-serialisable summary written to ``metrics.json``; keys ``k``, ``d``,
      ``baseline``, ``dataset``, ``models`` (per model: accuracy, timings), ``scores`` (per model and method:
      mean, median, std, n), ``seed_reference``, ``timings``, ``findings``.
    """

    scores: dict[str, dict[str, torch.Tensor]]
    images: torch.Tensor
    labels: torch.Tensor
    parts: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]
    tangent_mass: torch.Tensor
    metrics: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.metrics["k"])

    @property
    def d(self) -> int:
        return int(self.metrics["d"])

    @property
    def baseline(self) -> float:
        return float(self.metrics["baseline"])
