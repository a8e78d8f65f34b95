"""System 1: manifold alignment of attributions (known-manifold data, scoring, report)."""
from .known_manifold import KnownManifold, KnownManifoldConfig, make_known_manifold, upsampled_decoder
from .pipeline import DEFAULT_METHODS, AlignConfig, run_alignment
from .result import SEED_REFERENCE, AlignmentResult


def write_report(result: AlignmentResult, out_dir):
    """Write report.html, metrics.json and the PNG figures; return the report path."""
    from .report import write_report as _write

    return _write(result, out_dir)


__all__ = [
    "KnownManifold", "KnownManifoldConfig", "make_known_manifold", "upsampled_decoder",
    "DEFAULT_METHODS", "AlignConfig", "run_alignment", "SEED_REFERENCE", "AlignmentResult", "write_report",
]
