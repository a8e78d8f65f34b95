"""`manifex align`: system 1, manifold alignment of attributions."""
from __future__ import annotations

from dataclasses import replace

import click

from ..alignment.pipeline import AlignConfig
from . import main
from .common import classifier_options, environment_options, executor_options, run_command, run_options
from .generate import config_from_params, config_options, run_params


@main.command()
@config_options(AlignConfig)
@classifier_options
@run_options("runs/align")
@environment_options
@executor_options
def align(**params) -> None:
    """Score how much attributions lie in the data manifold's tangent space.

    \b
    For each classifier (standard and l2-robust) and attribution method, the
    score ‖P_T E‖/‖E‖ is computed per image against the random baseline (a
    random direction's expected score, a little below √(k/d)).
    Writes report.html, metrics.json, PNG figures and the attributions
    (results.jsonl, one record per chunk of images; units/<chunk>/E.pt) to
    --out. Interrupted runs resume from --out; trained models are cached.

    \b
    Examples:
      manifex align --out runs/align                        # the demo (about 5 min on 2 cores)
      manifex align --dataset known:digits8 --vae-epochs 40 --samples 100
      manifex align --model my_nets.py:SmallNet --weights small.pt   # score your own classifier
      manifex align --workers 2                             # attributions on 2 Ray workers
    """
    from ..alignment.experiment import AlignExperiment

    def note(line: str) -> None:
        click.echo(f"  note: {line}", err=True)

    config = config_from_params(AlignConfig, params)
    run = run_params(params)
    if run["model"] is not None and config.robust:
        note("the l2-robust model is a fine-tune of a built-in classifier; scoring your model only.")
        config = replace(config, robust=False)
    run_command(AlignExperiment(notify=note), config, **run)
