"""Option parsers and helpers shared by the commands of every system."""
from __future__ import annotations

import math
import os
import tempfile
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


def _trained_classifier(dataset, classifier, epochs, seed, device, cache_dir, trust_pickle, quiet):
    """(model, data, test, info) for a built-in classifier trained (or reused from the cache) on ``dataset``."""
    data, _ = load_data(dataset, trust_pickle=trust_pickle)
    train, test = data.split(0.2, seed=seed)
    model, info = load_classifier(train, test, classifier=classifier, epochs=epochs, seed=seed, device=device,
                                  cache_dir=cache_dir, progress=not quiet)
    return model, data, test, info


# ------------------------------------------------------------------------------------------------------------------
# Checks done before any compute: device, writable folders, data, the classifier on one batch.
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


def preflight(*, device: str, out_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
              cache: bool = True) -> str:
    """The environment checks every command runs first: the device, --out and --cache-dir writable."""
    device = resolve_device(device)
    if out_dir is not None:
        check_writable_dir(out_dir, "--out")
    if cache:
        check_writable_dir(cache_dir, "--cache-dir")
    return device


def load_data(dataset: str, *, trust_pickle: bool = False, num_classes: int | None = None, option: str = "--dataset"):
    """Load and check a classification dataset; return (dataset, checks) (:func:`manifex.models.resolve.resolve_data`)."""
    from ..models.resolve import resolve_data

    return resolve_data(dataset, trust_pickle=trust_pickle, num_classes=num_classes, option=option)


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


def check_layer_first(model_spec: str | None, classifier: str, data, layer: str, *, command: str) -> tuple | None:
    """A built-in classifier's layer names and output shapes are known before it is trained: check ``--layer`` on
    the untrained network (one small batch), so a wrong name or an unusable shape never waits for the training.
    Returns the layer's output shape per image; None with ``--model`` (checked as soon as it is loaded)."""
    if model_spec is None:
        import torch

        from ..attribution.layer import check_layer_shape, layer_activations, resolve_layer
        from ..models.classifiers import ClassifierConfig, build_classifier

        with torch.random.fork_rng():  # building the network draws its initial weights
            net = build_classifier(ClassifierConfig(classifier, tuple(data.image_shape), data.num_classes)).eval()
        resolve_layer(net, layer)
        with torch.no_grad():
            probe = layer_activations(net, data.x[:2], layer)
        check_layer_shape(tuple(probe.shape), layer, what=command)
        return tuple(probe.shape[1:])
    return None


def load_classifier(train, test, *, model_spec: str | None = None, weights: str | os.PathLike | None = None,
                    normalize: tuple | None = None, output: str | None = None, classifier: str = "lenet", epochs: int = 3, seed: int = 0,
                    device: str = "cpu", cache_dir: str | os.PathLike | None = None, progress: bool = True):
    """The classifier under test, checked once on one test batch; returns (model, info).

    With ``model_spec`` the user's model is loaded (:func:`manifex.models.user.load_model`), wrapped in
    :class:`~manifex.models.user.SelectOutput` when ``output`` (``--output``: which part of a tuple or dict output
    holds the logits) is given and in :class:`~manifex.models.user.Normalize` when ``normalize`` = (mean, std)
    is given, and checked BEFORE any
    work. Otherwise the built-in ``classifier`` is trained on ``train`` (or reused from the cache) and checked
    after training. ``info["checks"]`` lists what was verified, for the report's checks box.
    """
    from ..errors import InputError
    from ..models import ModelCache, TrainConfig, get_classifier
    from ..models.user import Normalize, SelectOutput, check_classifier, load_model, parse_output

    check_model_flags(model_spec, weights=weights, normalize=normalize, output=output)
    batch = test.x[: min(8, len(test))]
    c = test.image_shape[0]
    if model_spec is None:
        model, info = get_classifier(train, classifier, TrainConfig(epochs=epochs, seed=seed), cache=ModelCache(cache_dir),
                                     device=device, progress=progress)
        info = {**info, "source": "built-in", "classifier": classifier}
        name = f"the built-in {classifier}"
    else:
        if normalize is not None and len(normalize[0]) not in (1, c):
            raise InputError(f"--normalize has {len(normalize[0])} channel values but the images have {c} channel(s).")
        model = load_model(model_spec, weights)
        if output is not None:
            model = SelectOutput(model, parse_output(output))
        if normalize is not None:
            model = Normalize(model, *normalize)
        model = model.to(device).eval()
        info = {"source": "user", "classifier": model_spec, "weights": str(weights) if weights else None,
                "normalize": {"mean": list(normalize[0]), "std": list(normalize[1])} if normalize else None,
                "output": output}
        name = f"--model {model_spec}"
    logits = check_classifier(model, batch, test.num_classes, name=name)
    info["checks"] = [f"model ({name}): logits of shape {tuple(logits.shape)} on a test batch, finite; "
                      f"{logits.shape[1]} outputs = the data's {test.num_classes} classes"]
    return model, info


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
