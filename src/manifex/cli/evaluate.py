"""`manifex evaluate`: which explanation should I trust? Attribution metrics (Quantus) and manifold-aware ones."""
from __future__ import annotations

from ..evaluation.experiment import EvaluateConfig
from . import main
from .common import classifier_options, environment_options, executor_options, run_command, run_options
from .generate import config_from_params, config_options, run_params


@main.command()
@config_options(EvaluateConfig)
@classifier_options
@run_options("runs/evaluate")
@environment_options
@executor_options
def evaluate(**params) -> None:
    """Which explanation should I trust for this model?

    \b
    Scores every method by the field's metrics through Quantus (faithfulness,
    robustness, randomisation, complexity; pip install "manifex[eval]") and by
    manifold-aware ones: tangent alignment, and deletion with the removed
    pixels in-filled from a generator beside black and ROAD deletion, with the
    perturbed images' distance to the manifold. Writes report.html,
    metrics.json and results.jsonl (one record per method; a re-run resumes).

    \b
    Examples:
      manifex evaluate                                        # LeNet on known:digits8, 7 methods
      manifex evaluate --dataset digits8 --methods gradient,lrp,ig --metrics pixel_flipping,ManifoldDeletion
      manifex evaluate --model mynet.py:build --weights w.pt --dataset known:mnist5k
    """
    from ..evaluation.experiment import EvaluateExperiment

    config = config_from_params(EvaluateConfig, params)
    run_command(EvaluateExperiment(), config, **run_params(params))
