"""Evaluation system: which explanation to trust, by the field's metrics (through Quantus) and manifold-aware ones.

>>> from manifex.evaluation import explain_func, evaluate, TangentAlignment
>>> a = explain_func(model, x, y, method="lrp")                       # Quantus-compatible, NumPy out
>>> scores = evaluate(model, x, y, metrics=["pixel_flipping", "max_sensitivity"], method="ig")
>>> quantus.evaluate(metrics={"tangent": TangentAlignment(generator=vae)}, ...)

Quantus is the optional extra ``pip install "manifex[eval]"``; the manifold-aware metrics need only torch.
"""
from .bridge import MANIFEX_METRICS, MetricInfo, evaluate, explain_func, import_quantus, metric_info, metric_name
from .manifold import (
    PERTURBATIONS,
    BatchedPixelFlipping,
    DeletionCurves,
    ManifoldDeletion,
    TangentAlignment,
    TangentAlignmentResult,
    deletion_curves,
    manifold_distance,
    manifold_infill,
    pixel_flipping,
    road_impute,
    tangent_alignment,
)

__all__ = [
    "explain_func", "evaluate", "import_quantus", "metric_info", "metric_name", "MetricInfo", "MANIFEX_METRICS",
    "TangentAlignment", "ManifoldDeletion", "TangentAlignmentResult", "DeletionCurves", "PERTURBATIONS",
    "tangent_alignment", "deletion_curves", "manifold_distance", "manifold_infill", "pixel_flipping", "road_impute", "BatchedPixelFlipping",
]
