"""`manifex align`: system 1, manifold alignment of attributions."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from . import main
from .common import (_csv, _positive_floats, check_model_flags, classifier_options, environment_options, executor_options, load_classifier, load_data,
                     make_executor, preflight)


@main.command()
@click.option("--dataset", default="known:mnist5k", show_default=True,
              help="'known:<data>' samples a dataset with an exact manifold from a VAE trained on <data>; "
                   "otherwise the manifold is estimated. <data>: mnist5k, digits8, a .npz (x, y), an image "
                   "folder (one subfolder per class), an MNIST32 .pt file, or an MNIST256 folder.")
@click.option("--methods", callback=_csv, default=None,
              help="Comma-separated attribution methods (see `manifex methods`). "
                   "Default: gradient, input_x_gradient, integrated_gradients_path, integrated_gradients, smoothgrad.")
@click.option("--samples", "n_samples", type=click.IntRange(2), default=300, show_default=True, help="Test images to score.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/align"),
              show_default=True, help="Output directory for report.html, metrics.json and PNG figures.")
@click.option("--classifier", type=click.Choice(["lenet", "mlp", "vgg", "resnet"]), default="lenet", show_default=True,
              help="Built-in classifier trained by manifex on the (generated) data; see --model for your own.")
@classifier_options
@click.option("--epochs", "classifier_epochs", type=click.IntRange(1), default=10, show_default=True, help="Classifier epochs.")
@click.option("--robust/--no-robust", default=True, show_default=True, help="Also train an l2-robust classifier (PGD-l2).")
@click.option("--robust-epochs", type=click.IntRange(1), default=2, show_default=True)
@click.option("--robust-steps", type=click.IntRange(1), default=7, show_default=True,
              help="PGD steps per batch (the seed used 100; fewer keeps the demo under 10 minutes).")
@click.option("--robust-eps", "robust_epsilons", default="0.5,1,2", show_default=True,
              callback=_positive_floats,
              help="l2 radii, drawn per example (the seed trained from scratch with 1,4,8 for 15 epochs; "
                   "the demo fine-tunes the standard model for --robust-epochs, where smaller radii keep accuracy).")
@click.option("--vae-epochs", "generative_epochs", type=click.IntRange(1), default=20, show_default=True)
@click.option("--latent-dim", type=click.IntRange(1), default=10, show_default=True, help="Manifold dimension k of the VAE.")
@click.option("--n-train", type=click.IntRange(10), default=6000, show_default=True, help="Generated training images.")
@click.option("--n-test", type=click.IntRange(2), default=1000, show_default=True, help="Generated test images.")
@click.option("--allow-degenerate", is_flag=True,
              help="Write the report even when the generated known-manifold dataset fails its checks (labeler near "
                   "chance, one class dominating, near-uniform labeler); the report then opens with the warning.")
@environment_options
@executor_options
def align(out_dir: Path, cache_dir: Path | None, quiet: bool, methods, model_spec, weights, normalize, output, num_classes,
          workers, ray_address, gpus_per_worker, **options) -> None:
    """Score how much attributions lie in the data manifold's tangent space.

    \b
    For each classifier (standard and l2-robust) and attribution method, the
    score ‖P_T E‖/‖E‖ is computed per image against the random baseline (a
    random direction's expected score, a little below √(k/d)).
    Writes report.html, metrics.json and PNG figures to --out. Interrupted runs
    resume: trained models and finished attributions are cached.

    \b
    Examples:
      manifex align --out runs/align                        # the demo (about 5 min on 2 cores)
      manifex align --dataset known:digits8 --vae-epochs 40 --samples 100
      manifex align --model my_nets.py:SmallNet --weights small.pt   # score your own classifier
      manifex align --workers 2                             # attributions on 2 Ray workers
    """
    from ..alignment import AlignConfig, run_alignment, write_report
    from ..models import ModelCache

    if methods:
        options["methods"] = methods
    # Everything that can be wrong is checked before the VAE or a classifier is trained.
    options["device"] = preflight(device=options["device"], out_dir=out_dir, cache_dir=cache_dir)
    executor = make_executor(workers, ray_address, gpus_per_worker)
    cfg = AlignConfig(**options)
    from ..attribution import canonical_method

    for m in cfg.methods:
        canonical_method(m)
    known = cfg.dataset.startswith("known:")
    real, checks = load_data(cfg.dataset.split(":", 1)[1] if known else cfg.dataset, trust_pickle=cfg.trust_pickle,
                             num_classes=num_classes)
    n_test = cfg.n_test if known else max(1, round(0.2 * len(real)))
    if cfg.n_samples > n_test:
        click.echo(f"  note: --samples {cfg.n_samples} is more than the {n_test} test images; scoring all {n_test}"
                   + (" (raise --n-test for more)" if known else ""), err=True)
    model = None
    if model_spec is not None:
        train, test = real.split(0.2, seed=cfg.seed)  # the model is checked on real images of the data's shape
        model, info = load_classifier(train, test, model_spec=model_spec, weights=weights, normalize=normalize, output=output,
                                      device=cfg.device)
        checks += info["checks"]
        if cfg.robust:
            click.echo("  note: the l2-robust model is a fine-tune of a built-in classifier; scoring your model only.",
                       err=True)
            cfg = replace(cfg, robust=False)
    else:
        check_model_flags(model_spec, weights=weights, normalize=normalize, output=output)
    result = run_alignment(cfg, cache=ModelCache(cache_dir), progress=not quiet, classifier=model,
                           executor=executor)
    result.metrics["checks"] = checks + result.metrics.get("checks", [])
    report = write_report(result, out_dir)
    for w in result.metrics.get("warnings", []):
        click.secho(f"  warning: {w}", fg="yellow", err=True)
    if result.metrics.get("warnings"):
        click.echo(f"  findings withheld: the inputs failed {len(result.metrics['warnings'])} check(s); "
                   "the report shows the numbers as a diagnosis")
    else:
        for line in result.metrics.get("findings", []):
            click.echo(f"  {line}")
    click.echo(f"report: {report}")
