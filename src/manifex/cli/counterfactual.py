"""`manifex counterfactual`: system 3, diffeomorphic counterfactuals (latent vs pixel space)."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from . import main
from .common import _csv, classifier_options, environment_options, executor_options, make_executor, preflight


#: The options the helix experiment takes (CLI parameter -> HelixConfig field; None: not a setting of the experiment).
HELIX_OPTIONS = {"dataset": None, "out_dir": None, "cache_dir": None, "quiet": None, "seed": "seed", "n": "n",
                 "max_steps": "max_steps", "generator_epochs": "flow_epochs"}


def _helix_settings(ctx: click.Context) -> dict:
    """HelixConfig fields from the options given on the command line; any other given option is refused (exit 2,
    before any work): the helix is a fixed toy experiment (its own flow and MLP, one lr, stop at f = 0.9 / 0.1)."""
    from click.core import ParameterSource

    given = [p for p in ctx.command.params if ctx.get_parameter_source(p.name) in (ParameterSource.COMMANDLINE,
                                                                                 ParameterSource.ENVIRONMENT)]
    unused = [p.opts[0] for p in given if p.name not in HELIX_OPTIONS
              and not (p.name == "device" and str(ctx.params[p.name]).lower() == "cpu")]
    if unused:
        takes = ", ".join(o for p in ctx.command.params if p.name in HELIX_OPTIONS and p.name != "dataset" for o in p.opts[:1])
        raise click.UsageError(f"--dataset helix does not use {', '.join(unused)}: it is the research's fixed toy experiment "
                               f"(its own flow and MLP on the CPU); drop {'them' if len(unused) > 1 else 'it'} (it takes {takes}).")
    return {field: ctx.params[name] for name, field in HELIX_OPTIONS.items() if field is not None
            and name in {p.name for p in given}}


def _lr(ctx, param, value):
    if value is None or str(value).lower() in ("none", "default"):
        return None
    try:
        v = float(value)
    except ValueError:
        raise click.BadParameter(f"expected a learning rate such as 5e-2, or 'default'; got {value!r}") from None
    if not v > 0:
        raise click.BadParameter("the learning rate must be > 0")
    return v


@main.command()
@click.option("--dataset", default="mnist5k", show_default=True,
              help="mnist5k, digits8, 'known:<data>' (images sampled from a VAE trained on <data>: the manifold is "
                   "known, so the distance of each counterfactual to it is measured), a .npz (x, y), an image folder, "
                   "or 'helix' (the research's toy experiment: a 3-D flow and an MLP, exact distances to the helix; it "
                   "takes --n, --max-steps, --generator-epochs and --seed, and refuses the other settings).")
@click.option("--generator", type=click.Choice(["flow", "vae", "gan"]), default="flow", show_default=True,
              help="Generative model whose latent space is searched (trained on the data and cached).")
@click.option("--classifier", type=click.Choice(["lenet", "mlp", "vgg", "resnet"]), default="lenet", show_default=True,
              help="Built-in classifier under test (or your own with --model).")
@click.option("--second-classifier", type=click.Choice(["lenet", "mlp", "vgg", "resnet"]), default=None,
              help="Architecture of the second-network judge [default: mlp, or lenet when --classifier is mlp].")
@click.option("--epochs", "classifier_epochs", type=click.IntRange(1), default=3, show_default=True, help="Classifier epochs.")
@click.option("--source", type=int, default=4, show_default=True, help="Class of the images to change (-1: any class but --target).")
@click.option("--target", type=int, default=9, show_default=True, help="Class the counterfactuals should get.")
@click.option("--n", type=click.IntRange(1), default=32, show_default=True, help="Images (correctly classified test images of --source).")
@click.option("--space", "spaces", callback=_csv, default="latent,pixel", show_default=True,
              help="Search spaces: latent (through the generator), pixel (the adversarial baseline), or both.")
@click.option("--lr-latent", callback=_lr, default=None, help="Adam lr in latent space [default: the zoo image flow's measured 1e-2 (the research's 5e-2 overshoots "
                   "with it: larger, less natural changes); vae/gan 5e-3, the research's].")
@click.option("--lr-pixel", callback=_lr, default=None, help="Adam lr in pixel space [default: 5e-4, the research's].")
@click.option("--max-steps", type=click.IntRange(1), default=2000, show_default=True, help="Step budget per image.")
@click.option("--stop-prob", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.99, show_default=True,
              help="Stop once p(target) exceeds this.")
@click.option("--path-frames", type=click.IntRange(2), default=8, show_default=True, help="Frames in each path strip.")
@click.option("--generator-epochs", type=click.IntRange(1), default=None,
              help="Override the generator's documented training schedule (part of the cache key).")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True,
              help="Images searched together (one resumable unit). Larger is faster on CPU: the slowest image sets a "
                   "batch's length (measured: the default 32 images took 4.0 min in one batch, 5.4 in two of 16).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/cf"),
              show_default=True, help="Output folder: report.html, metrics.json, results.jsonl, figures.")
@click.option("--resume/--no-resume", default=True, show_default=True, help="Skip images already in --out/results.jsonl.")
@classifier_options
@environment_options
@executor_options
def counterfactual(out_dir: Path, cache_dir: Path | None, quiet: bool, device: str, spaces, resume: bool,
                   model_spec, weights, normalize, output, num_classes, workers, ray_address, gpus_per_worker, **options) -> None:
    """Counterfactuals through a generative model's latent space vs pixel space.

    \b
    For each image of class --source, search x' with p(--target | x') > 0.99:
    by Adam on the latent code of a flow / VAE / GAN (the change follows the
    data manifold), and on the pixels (adversarial noise). Then compare them:
    success and steps, size of the change, whether an SVM, the 10 nearest
    training images and a second network agree with the target, the tangent
    fraction of the change, the generator's spectrum (manifold dimension), and
    on known:<data> the distance to the true manifold.

    \b
    Examples:
        manifex counterfactual                                # MNIST 4 -> 9, 32 images, flow
        manifex counterfactual --dataset known:mnist5k        # + distance to the known manifold
        manifex counterfactual --generator vae --source 3 --target 8 --n 16
        manifex counterfactual --dataset helix --out runs/helix  # the toy experiment
        manifex counterfactual --dataset digits8 --n 8 --max-steps 500 --space latent
    Interrupted runs resume (trained models are cached, finished images skipped).
    """
    from ..errors import InputError
    from ..models import ModelCache

    helix_settings = _helix_settings(click.get_current_context()) if options["dataset"] == "helix" else None
    device = preflight(device=device, out_dir=out_dir, cache_dir=cache_dir)
    command = "manifex " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    cache = ModelCache(cache_dir)
    if options["dataset"] == "helix":
        from ..counterfactuals.helix import HelixConfig, run_helix
        from ..counterfactuals.report import write_helix_report

        res = run_helix(HelixConfig(**helix_settings), cache=cache, progress=not quiet)
        report = write_helix_report(res, out_dir, command=command)
        s = res["summary"]
        click.echo(f"  success: latent {s['latent']['success_rate']:.0%}, pixel {s['pixel']['success_rate']:.0%}; median "
                   f"distance to the helix latent/pixel = {s['distance_ratio_median']:.3f}; dimension 1 for "
                   f"{s['spectrum']['dimension_is_1_fraction']:.0%} of points")
        click.echo(f"report: {report}")
        return
    from ..counterfactuals.campaign import CounterfactualConfig, check_classes, run_campaign
    from ..counterfactuals.report import write_report

    spaces = tuple(spaces or ("latent", "pixel"))
    bad = [s for s in spaces if s not in ("latent", "pixel")]
    if bad:
        raise InputError(f"--space takes latent and/or pixel, got {', '.join(bad)}.")
    if options["source"] is not None and options["source"] < 0:
        options["source"] = None
    executor = make_executor(workers, ray_address, gpus_per_worker)
    user_model = None
    from .common import check_model_flags, load_classifier, load_data

    check_model_flags(model_spec, weights=weights, normalize=normalize, output=output)
    # the data checks and the classes, before any training (known:<data> takes the classes of <data>)
    dataset = options["dataset"]
    base = dataset[len("known:"):] if dataset.startswith("known:") else dataset
    data, _ = load_data(base, trust_pickle=options["trust_pickle"], num_classes=num_classes)
    check_classes(options["source"], options["target"], num_classes or data.num_classes, dataset)
    if model_spec is not None:
        train, test = data.split(0.2, seed=options["seed"])
        user_model, _ = load_classifier(train, test, model_spec=model_spec, weights=weights, normalize=normalize, output=output,
                                        device=device, cache_dir=cache_dir, progress=not quiet)
    cfg = CounterfactualConfig(spaces=spaces, device=device, **options)
    result = run_campaign(cfg, out_dir, cache=cache, executor=executor, resume=resume, progress=not quiet,
                          classifier=user_model, classifier_name=f"--model {model_spec}" if model_spec else None)
    report = write_report(result, command=command)
    from ..counterfactuals.report import findings

    for line in findings(result.summary, list(spaces)):
        click.echo(f"  {line}")
    click.echo(f"report: {report}")
