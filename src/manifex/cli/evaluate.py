"""`manifex evaluate`: which explanation to trust — the field's metrics (Quantus) and manifold-aware ones, per method."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from . import main
from .common import _csv, check_model_flags, classifier_options, environment_options, executor_options, load_classifier, load_data, make_executor, preflight


@main.command()
@click.option("--dataset", default="known:digits8", show_default=True,
              help="'known:<data>' samples images from a VAE trained on <data> (the manifold is known: exact tangent "
                   "spaces and latent codes); any other dataset (digits8, mnist5k, a .npz, an image folder) gets a VAE "
                   "trained on its training split (an estimated manifold).")
@click.option("--classifier", type=click.Choice(["lenet", "mlp", "vgg", "resnet"]), default="lenet", show_default=True,
              help="Built-in classifier trained (and cached) on the data; see --model for your own.")
@classifier_options
@click.option("--epochs", type=click.IntRange(1), default=10, show_default=True, help="Classifier epochs (cached).")
@click.option("--methods", callback=_csv, default=None,
              help="Comma-separated attribution methods (see 'manifex methods'). Default: gradient, smoothgrad, "
                   "integrated_gradients, input_x_gradient, lrp (EpsilonPlus composite), deeplift, gradcam (left out for a "
                   "model without a conv layer).")
@click.option("--metrics", callback=_csv, default=None,
              help="Comma-separated metrics: Quantus class names or snake_case (pixel_flipping, max_sensitivity, mprt, ...) "
                   "and TangentAlignment, ManifoldDeletion (the three deletion curves). Default: PixelFlipping, "
                   "FaithfulnessCorrelation, MaxSensitivity, RandomLogit, Sparseness, Complexity, TangentAlignment, "
                   "ManifoldDeletion.")
@click.option("--n", type=click.IntRange(2), default=64, show_default=True, help="Test images scored (a seeded random pick).")
@click.option("--curve-steps", type=click.IntRange(1), default=10, show_default=True,
              help="Points of the deletion curves: fractions 0, 1/steps, ... of the pixels removed.")
@click.option("--infill-steps", type=click.IntRange(1), default=100, show_default=True,
              help="Adam steps of the in-fill (the latent code that best explains the kept pixels).")
@click.option("--nr-samples", type=click.IntRange(1), default=10, show_default=True, help="MaxSensitivity's noisy copies.")
@click.option("--vae-epochs", "generator_epochs", type=click.IntRange(1), default=20, show_default=True,
              help="Epochs of the VAE (the known manifold's generator, or the estimated manifold; cached).")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True, help="Images per explanation batch.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/evaluate"), show_default=True)
@click.option("--resume/--no-resume", default=True, show_default=True, help="Skip methods already finished in --out.")
@environment_options
@executor_options
def evaluate(dataset, classifier, model_spec, weights, normalize, output, num_classes, epochs, methods, metrics, n, curve_steps,
             infill_steps, nr_samples, generator_epochs, batch_size, out_dir, resume, workers, ray_address, gpus_per_worker,
             device, seed, cache_dir, trust_pickle, quiet) -> None:
    """Which explanation should I trust for this model?

    \b
    Scores every method by the field's metrics through Quantus (faithfulness,
    robustness, randomisation, complexity; pip install "manifex[eval]") and by
    manifold-aware ones: tangent alignment, and deletion with the removed
    pixels in-filled from a generator beside black and ROAD deletion, with the
    perturbed images' distance to the manifold. Writes report.html,
    metrics.json and results.jsonl (one record per method; a re-run resumes).

    \b
    Examples:
      manifex evaluate                                        # LeNet on known:digits8, 7 methods
      manifex evaluate --dataset digits8 --methods gradient,lrp,ig --metrics pixel_flipping,ManifoldDeletion
      manifex evaluate --model mynet.py:build --weights w.pt --dataset known:mnist5k
    """
    from ..evaluation.experiment import DEFAULT_METHODS, DEFAULT_METRICS, EvaluateConfig, _check_config, run_evaluation
    from ..models import ModelCache

    t0 = time.time()
    device = preflight(device=device, out_dir=out_dir, cache_dir=cache_dir)
    executor = make_executor(workers, ray_address, gpus_per_worker)
    config = EvaluateConfig(dataset=dataset, classifier=classifier, epochs=epochs, methods=tuple(methods or DEFAULT_METHODS),
                            metrics=tuple(metrics or DEFAULT_METRICS), n=n, generator_epochs=generator_epochs,
                            curve_steps=curve_steps, infill_steps=infill_steps, nr_samples=nr_samples, batch_size=batch_size,
                            seed=seed, device=device, trust_pickle=trust_pickle)
    _check_config(config)  # names, Quantus installed: before any data or training
    real, checks = load_data(dataset.split(":", 1)[1] if dataset.startswith("known:") else dataset, trust_pickle=trust_pickle,
                             num_classes=num_classes)
    model = info = None
    if model_spec is not None:
        train, test = real.split(0.2, seed=seed)  # the user's model is checked on real images of the data's shape
        model, info = load_classifier(train, test, model_spec=model_spec, weights=weights, normalize=normalize,
                                      output=output, device=device)
        checks = list(checks) + info.pop("checks", [])
    else:
        check_model_flags(model_spec, weights=weights, normalize=normalize, output=output)
    summary = run_evaluation(config, out_dir, classifier=model, classifier_info=info, cache=ModelCache(cache_dir),
                             executor=executor, resume=resume, progress=not quiet, checks=checks,
                             command="manifex " + " ".join(sys.argv[1:]))
    rc = summary.get("ranking_change")
    if rc:
        click.echo(f"  deletion ranking {'changes' if rc['changes'] else 'does not change'} on the manifold: best black "
                   f"{rc['top']['black']}, ROAD {rc['top']['road']}, in-filled {rc['top']['manifold']}")
    click.echo(f"report: {Path(out_dir) / 'report.html'} ({time.time() - t0:.0f} s)")
