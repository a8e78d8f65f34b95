"""Option parsers and helpers shared by the commands of every system."""
from __future__ import annotations

import math
import os
from pathlib import Path

import click


def _csv(ctx, param, value: str | None):
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


def _fraction(ctx, param, value: str | None):
    """'8/255' or '0.03' → a finite float > 0; 'none' → None."""
    if value is None or value.lower() == "none":
        return None
    try:
        num, _, den = value.partition("/")
        num, den = float(num), (float(den) if den else 1.0)
    except ValueError:
        raise click.BadParameter(f"expected a number such as 0.03 or 8/255, got {value!r}") from None
    if den == 0 or not math.isfinite(num / den) or num / den <= 0:
        raise click.BadParameter(f"must be a finite number > 0 in pixel units of [0, 1] (e.g. 8/255) or 'none', got {value!r}")
    return num / den


def _positive_floats(ctx, param, value: str | None):
    """'0.5,1,2' → (0.5, 1.0, 2.0): comma-separated finite numbers > 0."""
    if value is None:
        return None
    try:
        vals = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers > 0 such as 0.5,1,2, got {value!r}") from None
    if not vals or any(not math.isfinite(v) or v <= 0 for v in vals):
        raise click.BadParameter(f"every value must be a finite number > 0, got {value!r}")
    return vals


def _beta_pair(ctx, param, value: str):
    if value.lower() in ("none", "off"):
        return None
    if value.lower() == "auto":
        return "auto"
    try:
        b0, b1 = (float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected 'B0,B1' (e.g. 10,100), 'auto' or 'none', got {value!r}") from None
    return (b0, b1)


def _betas(ctx, param, value: str):
    try:
        betas = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers such as 10,3,1, got {value!r}") from None
    if any(b <= 0 for b in betas):
        raise click.BadParameter("every β must be > 0")
    return betas


# ------------------------------------------------------------------------------------------------------------------
# Checks done before any compute (the one resolution lives in manifex.models.resolve; these name the CLI flags).
# Each raises a manifex error (one line, exit status 2 from the CLI group) naming the option and the fix.
# ------------------------------------------------------------------------------------------------------------------
def resolve_device(device: str) -> str:
    """Validate a ``--device`` value against this machine (:func:`manifex.models.resolve.resolve_device`)."""
    from ..models.resolve import resolve_device as resolve

    return resolve(device)


def check_writable_dir(path: str | os.PathLike | None, option: str) -> Path:
    """Create ``path`` if needed and check that a file can be written in it (before any training)."""
    from ..models.resolve import check_writable_dir as check

    return check(path, option)


def check_model_flags(model_spec: str | None, *, weights=None, normalize=None, output=None) -> None:
    """--weights, --normalize and --output describe your own --model: refuse them without it (one line)."""
    from ..models.resolve import check_model_flags as check

    check(model_spec, weights=weights, normalize=normalize, output=output)


def _normalize(ctx, param, value: str | None):
    if value is None:
        return None
    from ..errors import InputError
    from ..models.user import parse_normalize

    try:
        return parse_normalize(value)
    except InputError as e:
        raise click.BadParameter(str(e)) from None


def classifier_options(f):
    """Click options for the classifier under test: built-in (--classifier) or the user's own (--model ...)."""
    options = [
        click.option("--model", "model_spec", default=None, metavar="MODULE:FACTORY|FILE",
                     help="Your own classifier instead of a built-in one: MODULE:FACTORY (an importable module or "
                          "path/to/file.py, and a function or class in it that returns the nn.Module; add --weights), "
                          "or a torch.export program (.pt2) / TorchScript file. It must map images (N, C, H, W) in "
                          "[0, 1] to logits (N, classes); it is checked on one batch before any work."),
        click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="State dict for --model MODULE:FACTORY (torch.save(model.state_dict(), FILE); loaded with "
                          "weights_only=True)."),
        click.option("--normalize", callback=_normalize, default=None, metavar="MEAN,STD",
                     help="Per-channel normalisation your --model expects, e.g. 0.1307,0.3081 or "
                          "0.485,0.456,0.406,0.229,0.224,0.225 (means, then stds). Applied inside a wrapper, so "
                          "budgets, clipping and figures stay in pixel units of [0, 1]."),
        click.option("--output", "output", default=None, metavar="INDEX|KEY",
                     help="Where your --model's output holds the logits, when forward returns a tuple or a dict: an "
                          "index (0) or a key / attribute name (logits). Layer names stay those of your model."),
        click.option("--num-classes", type=click.IntRange(2), default=None,
                     help="Number of classes when the labels leave some unused (e.g. labels {0..9, 57} with a "
                          "58-output model); by default such labels are refused."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def environment_options(f):
    """Click options every command shares: --device, --seed, --cache-dir, --trust-pickle, --quiet (parameters
    ``device``, ``seed``, ``cache_dir``, ``trust_pickle``, ``quiet``)."""
    options = [
        click.option("--device", default="cpu", show_default=True,
                     help="torch device, e.g. cpu, cuda or cuda:1 (checked before any work)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of data splits, training and sampling."),
        click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Model cache (default $MANIFEX_CACHE or ~/.cache/manifex). Re-runs reuse trained models; "
                          "concurrent runs share it safely."),
        click.option("--trust-pickle", is_flag=True,
                     help="Allow loading pickled dataset files (MNIST32 .pt); only for files you trust."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def executor_options(f):
    """Click options that choose where a campaign's units run: --workers, --ray-address, --gpus-per-worker
    (parameters ``workers``, ``ray_address``, ``gpus_per_worker``; build the executor with :func:`make_executor`)."""
    options = [
        click.option("--workers", type=click.IntRange(0), default=None, metavar="N",
                     help="Run the units on N Ray workers: a local Ray cluster with N worker processes (needs "
                          'pip install "manifex[ray]"), or N workers on the cluster of --ray-address. Default: '
                          "this process alone. Results go to the same files, so a run resumes either way."),
        click.option("--ray-address", default=None, metavar="ADDR",
                     help="Join an existing Ray cluster ('auto' on a cluster node, or ray://HEAD:10001) instead of "
                          "starting one; --out, --cache-dir and the data must be on a file system its nodes share."),
        click.option("--gpus-per-worker", type=click.FloatRange(0), default=0.0, show_default=True,
                     help="GPUs each Ray worker reserves (0.5: two workers share a GPU)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def make_executor(workers: int | None = None, ray_address: str | None = None, gpus_per_worker: float = 0.0):
    """The executor the --workers/--ray-address/--gpus-per-worker options ask for: None (run here) unless Ray
    is asked for; a :class:`manifex.runs.RayExecutor` otherwise. Ray is imported now, so a missing install is
    reported (with the install command) before any work."""
    from ..errors import InputError

    if not workers and ray_address is None:
        if gpus_per_worker:
            raise InputError("--gpus-per-worker needs Ray workers: add --workers N (or --ray-address ADDR).")
        return None
    from ..runs import RayExecutor, import_ray

    import_ray()
    return RayExecutor(workers=workers or None, address=ray_address, gpus_per_worker=gpus_per_worker)


def run_options(default_out: str, *, resume_help: str = "Keep the units already finished in --out (a changed setting "
                "or model is refused); --no-resume recomputes them all in the same folder."):
    """Click options of the experiment folder every command shares: --out, --resume/--no-resume, --overwrite
    (parameters ``out_dir``, ``resume``, ``overwrite``)."""
    options = [
        click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path(default_out),
                     show_default=True, help="The experiment folder: experiment.json, results.jsonl, units/, summary.json, "
                                             "metrics.json, report.html and figures."),
        click.option("--resume/--no-resume", default=True, show_default=True, help=resume_help),
        click.option("--overwrite", is_flag=True,
                     help="Start over in --out: an existing folder is moved aside to <out>.replaced-<time> (never deleted)."),
    ]

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def user_model(model_spec: str | None, weights=None, normalize=None, output=None):
    """The --model/--weights/--normalize/--output options as a :class:`manifex.experiment.UserModel` (None: built-in)."""
    check_model_flags(model_spec, weights=weights, normalize=normalize, output=output)
    if model_spec is None:
        return None
    from ..experiment import UserModel

    return UserModel(model_spec, weights=weights, normalize=normalize, output=output)


def command_line() -> str:
    """The command as typed (for the report)."""
    import shlex
    import sys

    return "manifex " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def run_command(experiment, config, *, out_dir, resume: bool = True, overwrite: bool = False, model=None,
                workers=None, ray_address=None, gpus_per_worker: float = 0.0, cache_dir=None, trust_pickle: bool = False,
                num_classes=None, quiet: bool = False, device: str | None = None):
    """The one command skeleton: executor (Ray imported now), :func:`manifex.experiment.run_experiment`, then the
    warnings, the findings (withheld when a check failed) and ``report: PATH``. Returns the ExperimentResult."""
    from ..errors import speaking_flags
    from ..experiment import run_experiment
    from ..experiment.config import config_flags

    executor = make_executor(workers, ray_address, gpus_per_worker)
    with speaking_flags(config_flags(type(config))):
        result = run_experiment(experiment, config, out_dir, model=model, resume=resume, overwrite=overwrite, executor=executor,
                                progress=not quiet, cache_dir=cache_dir, trust_pickle=trust_pickle,
                                num_classes=num_classes, device=device, command=command_line())
    if result.moved_to is not None:
        click.echo(f"  the earlier run was moved aside to {result.moved_to}")
    for w in result.warnings:
        click.secho(f"  warning: {w}", fg="yellow", err=True)
    failed = [c for c in result.checks if str(c).startswith("FAILED")]
    if failed and result.findings:  # a degenerate input: the numbers are a diagnosis, not a finding
        click.echo(f"  findings withheld: the inputs failed {len(failed)} check(s); the report shows the numbers as a diagnosis")
    else:
        for line in result.findings:
            click.echo(f"  {line}")
    if result.report is not None:
        click.echo(f"report: {result.report}")
    return result
