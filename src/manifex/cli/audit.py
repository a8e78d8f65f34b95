"""`manifex audit`: one model through every system (explanations, manipulation, counterfactuals, concepts), one report."""
from __future__ import annotations

import click

from ..audit.plan import AuditConfig
from . import main
from .common import classifier_options, command_line, environment_options, executor_options, make_executor, run_options
from .generate import config_from_params, config_options, run_params


@main.command()
@config_options(AuditConfig)
@classifier_options
@run_options("runs/audit", resume_help="Keep every stage's finished units in --out/<stage> (a changed setting or model "
             "is refused); --no-resume recomputes them all in the same folders.")
@environment_options
@executor_options
def audit(**params) -> None:
    """Can I trust this model's explanations, and which ones?

    \b
    Runs every system on one classifier, each stage its own experiment in
    --out/<stage> (resumed stage by stage, with its own report): model
    (held-out accuracy, calibration, the checks), manifold (the generators'
    quality and dimension), evaluate (faithfulness, tangent alignment and the
    randomisation check of the explanations), attack (manipulability of each
    method at L-inf 8/255) and smooth (the gradient attack with beta-smoothing),
    counterfactual (latent vs pixel), concepts (at the last layer with a grid
    of at least 2x2, found on the model) and contrast (one class pair).
    Writes report.html (scorecard, recommendation, one section per stage)
    and metrics.json (every stage's headline numbers under one schema).

    \b
    Examples:
      manifex audit --dataset digits8 --budget quick       # a smoke run in minutes
      manifex audit --dataset mnist5k --budget standard
      manifex audit --model mynet.py:build --weights w.pt --stages evaluate,attack
    """
    from ..audit import audit as run_audit
    from ..errors import speaking_flags
    from ..experiment.config import config_flags

    config = config_from_params(AuditConfig, params)
    run = run_params(params)
    executor = make_executor(run.pop("workers", None), run.pop("ray_address", None), run.pop("gpus_per_worker", 0.0))
    quiet = run.pop("quiet", False)
    with speaking_flags(config_flags(AuditConfig)):
        result = run_audit(config, run.pop("out_dir"), executor=executor, progress=not quiet, command=command_line(), **run)
    for name, why in result.skipped.items():
        click.secho(f"  skipped {name}: {why}", fg="yellow", err=True)
    click.echo(f"  {result.recommendation}")
    click.echo(f"report: {result.report}")
