"""`manifex audit`: one model through every system (explanations, manipulation, counterfactuals, concepts), one report."""
from __future__ import annotations

from pathlib import Path

import click

from ..audit.plan import AuditConfig
from . import main
from .common import classifier_options, command_line, environment_options, executor_options, make_executor, run_options
from .generate import config_from_params, config_options, run_params


@main.command()
@click.option("--compare", "compare", nargs=2, type=click.Path(file_okay=False, path_type=Path), default=None,
              metavar="RUN_A RUN_B", help="Compare two finished audits (their --out folders) side by side instead of "
              "running one: writes report.html and compare.json to --out (default runs/audit-compare); trains nothing.")
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
    --out/experiment.json guards the audit: a re-run with other settings or
    another model is refused; --stages may change between calls (the
    report keeps the stages of earlier calls with the same settings).

    \b
    Examples:
      manifex audit --dataset digits8 --budget quick       # a smoke run in minutes
      manifex audit --dataset mnist5k --budget standard
      manifex audit --model mynet.py:build --weights w.pt --stages evaluate,attack
      manifex audit --training l2 --out runs/audit-l2     # align's l2-robust model
      manifex audit --compare runs/audit runs/audit-l2    # side by side
    """
    from ..audit import audit as run_audit
    from ..errors import speaking_flags
    from ..experiment.config import config_flags

    pair = params.pop("compare")
    if pair is not None:
        _compare(pair, params)
        return

    config = config_from_params(AuditConfig, params)
    run = run_params(params)
    executor = make_executor(run.pop("workers", None), run.pop("ray_address", None), run.pop("gpus_per_worker", 0.0))
    quiet = run.pop("quiet", False)
    with speaking_flags(config_flags(AuditConfig)):
        result = run_audit(config, run.pop("out_dir"), executor=executor, progress=not quiet, command=command_line(), **run)
    if result.moved_to is not None:
        click.echo(f"  the earlier audit was moved aside to {result.moved_to}")
    for name, why in result.skipped.items():
        click.secho(f"  skipped {name}: {why}", fg="yellow", err=True)
    click.echo(f"  {result.recommendation}")
    click.echo(f"report: {result.report}")


def _compare(pair: tuple[Path, Path], params: dict) -> None:
    """``--compare A B``: only --out (and --quiet) go with it; an option of a new audit given beside it is refused."""
    from ..audit import compare

    ctx = click.get_current_context()
    given = [p for p in ctx.command.params if p.name not in ("compare", "out_dir", "quiet")
             and ctx.get_parameter_source(p.name) is click.core.ParameterSource.COMMANDLINE]
    if given:
        raise click.UsageError(f"--compare reads two finished audits; {given[0].opts[0]} is an option of a new audit: "
                               "drop it (only --out goes with --compare).")
    out = params["out_dir"]
    if ctx.get_parameter_source("out_dir") is not click.core.ParameterSource.COMMANDLINE:
        out = Path("runs/audit-compare")
    result = compare(pair[0], pair[1], out, command=command_line())
    for w in result.warnings:
        click.secho(f"  warning: {w}", fg="yellow", err=True)
    for line in result.findings:
        click.echo(f"  {line}")
    click.echo(f"report: {result.report}")
