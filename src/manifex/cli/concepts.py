"""`manifex concepts`: system 4, concept-based explanations per class and the prediction-from-components test."""
from __future__ import annotations

import click

from ..concepts.experiment import ConceptsConfig
from . import main
from .common import classifier_options, environment_options, executor_options, run_command, run_options
from .generate import config_from_params, config_options, run_params


@main.command()
@config_options(ConceptsConfig)
@classifier_options
@run_options("runs/concepts")
@environment_options
@executor_options
def concepts(**params) -> None:
    """Which few visual concepts make the model call an image class A?

    \b
    For each class: the images the model predicts as A, the relevance of a
    layer's activations (LayerDeepLift in a noise tunnel), NMF into a few
    concept vectors, their top crops from the data, and the prediction-from-
    components test (a strip of each concept's top crop: is it still A?)
    against random crops. Writes report.html, metrics.json, results.jsonl
    (one record per class; a re-run resumes), units/<class>/figure.png.

    \b
    Examples:
      manifex concepts                                   # SmallResNet on MNIST-5k, blocks.2, 6 concepts
      manifex concepts --classes 3,5,8 --components 4 --noise-samples 5
      manifex concepts --layer blocks.1 --pool 2 --exclude-target
      manifex concepts --component-concepts 2              # strips of the 2 most important concepts
      manifex concepts --model mynet.py:build --weights w.pt --layer layer4 --layout canvas
    """
    from ..concepts.experiment import ConceptsExperiment

    config = config_from_params(ConceptsConfig, params)
    run_command(ConceptsExperiment(), config, **run_params(params))


_ = click  # the decorators above come from click via the generated options
