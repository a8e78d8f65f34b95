"""`manifex contrast`: system 4's class contrasting — class hyperplanes, the shifting test, contrastive concepts."""
from __future__ import annotations

from ..concepts.contrast.experiment import ContrastConfig
from . import main
from .common import classifier_options, environment_options, executor_options, run_command, run_options
from .generate import config_from_params, config_options, run_params


@main.command()
@config_options(ContrastConfig)
@classifier_options
@run_options("runs/contrast")
@environment_options
@executor_options
def contrast(**params) -> None:
    """Class contrasting: what separates class A from class B inside the network?

    \b
    Per class, the activation vectors of --layer at the positions relevant for
    the class (LayerDeepLift in a noise tunnel, > 0.25 × the image's max); per
    ordered pair a logistic hyperplane (all pairs trained at once; the normal
    w_AB points from A toward B). The shifting test moves the layer's output of
    A's images to ReLU(a + t·w_AB), t in {0, 0.5, ..., 200} (to a + t·w_AB on
    a layer with negative activations, which gets no contrastive concepts): a
    swap is p(B) > 0.5 and ≥ p(A) at the same t; random directions of the same
    norm are the control. Contrastive concepts ("why A rather than B") are NMF components of
    A's activations weighted by their distance toward A. Writes report.html,
    metrics.json, results.jsonl (one record per pair), artefacts/hyperplanes.pt,
    units/concepts-A-B-.../ (the contrastive concepts and their figure).

    \b
    Examples:
        manifex contrast                                   # 20 random pairs, MNIST-5k, SmallResNet
        manifex contrast --class-pairs 4:9,3:5,7:1 --out runs/c  # chosen pairs
        manifex contrast --random-pairs 90                 # every ordered pair of 10 classes
        manifex contrast --layer blocks.1 --concepts-pair 3:8 --ood
        manifex contrast --model my_net.py:Net --weights w.pt --layer features.4 --class-pairs 0:1
    Interrupted runs resume (hyperplanes kept in --out/artefacts, finished pairs skipped).
    """
    from ..concepts.contrast.experiment import ContrastExperiment

    config = config_from_params(ContrastConfig, params)
    run_command(ContrastExperiment(), config, **run_params(params))
