"""Moved to :mod:`manifex.concepts.contrast.experiment` (the experiment) and :mod:`manifex.concepts.contrast.report`
(figures and report); this module re-exports their names for one release."""
import warnings

from .contrast.experiment import (ContrastConfig, ContrastExperiment, ContrastRun, parse_pairs, random_pairs,  # noqa: F401
                                  run_contrast, shift_units, summarize, swap_t, write_contrast_report)
from .contrast.report import FIGURE_DPI, REPORT_WIDTH_PX, accuracy_figure, crops_figure, findings, shift_figure  # noqa: F401

__all__ = ["ContrastConfig", "ContrastExperiment", "ContrastRun", "run_contrast", "random_pairs", "write_contrast_report",
           "parse_pairs", "summarize", "swap_t", "findings", "shift_figure", "accuracy_figure", "crops_figure", "FIGURE_DPI",
           "REPORT_WIDTH_PX"]

warnings.warn("manifex.concepts.contrast_run moved to manifex.concepts.contrast (experiment, report); import it from there.",
              DeprecationWarning, stacklevel=2)
