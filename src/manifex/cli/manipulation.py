"""`manifex attack` and `manifex smooth`: system 2, explanation manipulation and β-smoothing (generated options from
:class:`~manifex.manipulation.experiment.AttackConfig` / :class:`~manifex.manipulation.smooth_experiment.SmoothConfig`,
run by the one command skeleton)."""
from __future__ import annotations

from ..manipulation.experiment import AttackConfig
from ..manipulation.smooth_experiment import SmoothConfig
from . import main
from .common import classifier_options, environment_options, executor_options, run_command, run_options
from .generate import config_from_params, config_options, run_params


@main.command()
@config_options(AttackConfig)
@classifier_options
@run_options("runs/attack", resume_help="Skip pairs already finished in --out (an interrupted campaign loses at most one "
             "batch; a changed setting or model is refused); --no-resume recomputes them all in the same folder.")
@environment_options
@executor_options
def attack(**params) -> None:
    """Manipulate explanations: make them match another image's while the prediction stays.

    \b
    Trains (or reuses) a classifier, then for each (original, target) pair
    perturbs the original so that its explanation matches the target image's
    explanation (Dombrowski et al. 2019). Writes report.html, metrics.json,
    experiment.json, results.jsonl (one line per finished pair) and per-pair
    tensors and figures under units/<pair>/. Re-running resumes an
    interrupted campaign.

    \b
    Examples (default LeNet on the embedded MNIST, 16 sampled pairs):
      manifex attack --out runs/attack                      # research loss, no budget
      manifex attack --budget 8/255 --loss pcc --lr 3e-3    # barely visible
      manifex attack --method lrp_epsilon_gamma_box --pairs-csv pairs.csv
      manifex attack --model my_nets.py:SmallNet --weights small.pt --normalize 0.1307,0.3081
      manifex attack --pairs 1000 --workers 4               # 4 Ray workers on this machine
      manifex attack --pairs 1000 --ray-address auto        # join the Ray cluster of this node
    """
    from ..manipulation.experiment import AttackExperiment

    run_command(AttackExperiment(), config_from_params(AttackConfig, params), **run_params(params))


@main.command()
@config_options(SmoothConfig)
@classifier_options
@run_options("runs/smooth")
@environment_options
@executor_options
def smooth(**params) -> None:
    """β-smoothing defence: explanations, accuracy, curvature and manipulability across β.

    \b
    Replaces every ReLU by softplus(β) for each --betas value and compares with
    the ReLU model: the explanations of a few test images, test accuracy, the
    curvature (top input-Hessian eigenvalue) and, with --pairs > 0, the same
    manipulation campaign against each smoothed model. Stages: the models
    (results.jsonl), one attack campaign per model, the curvature per model
    (results-<stage>.jsonl); a re-run resumes, more --betas or --pairs extend.
    Writes report.html, metrics.json and figures to --out.

    \b
    Example (about 1.5 min on 2 cores with the cached default LeNet):
      manifex smooth --out runs/smooth
    prints one line per model: the PCC to the target before -> after the
    attack and its gain (smaller for smaller β), accuracy and curvature.
    With --workers N the sweep's attacks run on N Ray workers.
    """
    from ..manipulation.smooth_experiment import SmoothExperiment

    run_command(SmoothExperiment(), config_from_params(SmoothConfig, params), **run_params(params))
