"""Deprecated: the counterfactual campaign moved to :mod:`manifex.counterfactuals.experiment` (the experiment
contract's layout: one system, one ``experiment.py``). This module re-exports it for one release."""
from __future__ import annotations

import warnings

from .experiment import (CLASSIFIERS, GENERATORS, SECOND_CLASSIFIER, CampaignResult, CounterfactualConfig, build_context,
                         check_classes, check_pixels, generator_warnings, known_check, known_manifold, prepare,
                         process_units, run_campaign, spectrum_summary)

__all__ = ["CounterfactualConfig", "CampaignResult", "run_campaign", "prepare", "build_context", "check_classes",
           "process_units", "spectrum_summary", "generator_warnings", "SECOND_CLASSIFIER", "CLASSIFIERS", "GENERATORS",
           "check_pixels", "known_check", "known_manifold"]

warnings.warn("manifex.counterfactuals.campaign is deprecated: import from manifex.counterfactuals.experiment "
              "(run_campaign, CounterfactualConfig, ... are there).", DeprecationWarning, stacklevel=2)
