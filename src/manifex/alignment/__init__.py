"""System 1: manifold alignment of attributions (known-manifold data, scoring, report).

``manifex.alignment`` is both this package and the score function :func:`manifex.geometry.alignment`: once
the package is imported, Python binds the name ``manifex.alignment`` to it, so the package itself is made
callable and ``manifex.alignment(E, T)`` keeps meaning the score whatever was imported first.
"""
import sys as _sys
import types as _types

from ..models.known_manifold import KnownManifold, KnownManifoldConfig, make_known_manifold, upsampled_decoder
from .experiment import AlignExperiment, run_alignment
from .pipeline import DEFAULT_METHODS, AlignConfig
from .result import SEED_REFERENCE, AlignmentResult


def write_report(result: AlignmentResult, out_dir):
    """Write report.html, metrics.json and the PNG figures; return the report path."""
    from .report import write_report as _write

    return _write(result, out_dir)


__all__ = [
    "KnownManifold", "KnownManifoldConfig", "make_known_manifold", "upsampled_decoder",
    "DEFAULT_METHODS", "AlignConfig", "AlignExperiment", "run_alignment", "SEED_REFERENCE", "AlignmentResult", "write_report",
]


class _CallablePackage(_types.ModuleType):
    def __call__(self, *args, **kwargs):
        from ..geometry import alignment as score

        return score(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallablePackage
