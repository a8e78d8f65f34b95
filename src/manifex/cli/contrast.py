"""`manifex contrast`: system 4's class contrasting — class hyperplanes, the shifting test, contrastive concepts."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from . import main
from .common import check_layer_first, classifier_options, environment_options, executor_options, make_executor, preflight


@main.command()
@click.option("--dataset", default="mnist5k", show_default=True,
              help="mnist5k, digits8, a .npz (x, y) or an image folder. The held-out split (20%) supplies the images.")
@click.option("--classifier", type=click.Choice(["lenet", "mlp", "vgg", "resnet"]), default="resnet", show_default=True,
              help="Built-in classifier under test (or your own with --model).")
@click.option("--epochs", "classifier_epochs", type=click.IntRange(1), default=3, show_default=True, help="Classifier epochs.")
@click.option("--layer", default="blocks.2", show_default=True,
              help="Layer whose output is contrasted (a module name; an unknown name lists the candidates).")
@click.option("--pairs", default=None, metavar="A:B,...", help="Class pairs 'A rather than B', e.g. 4:9,3:5.")
@click.option("--random-pairs", type=click.IntRange(1), default=None, metavar="N",
              help="N random ordered pairs (seeded) instead of --pairs [default: 20 when --pairs is not given].")
@click.option("--images-per-class", type=click.IntRange(1), default=60, show_default=True,
              help="Images predicted as each class (hyperplane data and shifting test).")
@click.option("--random-directions", "n_random", type=click.IntRange(0), default=10, show_default=True,
              help="Control: random directions of the same norm as w_AB per pair (0: no control, reported as such).")
@click.option("--components", "n_components", type=click.IntRange(1), default=6, show_default=True,
              help="Contrastive concepts (NMF components).")
@click.option("--concepts-pair", default=None, metavar="A:B", help="Pair whose contrastive concepts are shown [default: the first pair].")
@click.option("--noise-samples", "n_samples", type=click.IntRange(0), default=20, show_default=True,
              help="SmoothGrad samples around LayerDeepLift for the relevance (0: plain DeepLift).")
@click.option("--ood/--no-ood", default=False, show_default=True,
              help="Drop positions that a 10-component Gaussian mixture of class A calls out of distribution (log-lik ≤ −300).")
@click.option("--seed-compat", is_flag=True, help="Reproduce the research code's mask sign (normal negated, bias not).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/contrast"),
              show_default=True, help="Output folder: report.html, metrics.json, results.jsonl, hyperplanes.pt, figures.")
@click.option("--resume/--no-resume", default=True, show_default=True, help="Skip pairs already in --out/results.jsonl.")
@classifier_options
@environment_options
@executor_options
def contrast(dataset: str, classifier: str, classifier_epochs: int, layer: str, pairs: str | None, random_pairs: int | None,
             images_per_class: int, n_random: int, n_components: int, concepts_pair: str | None, n_samples: int, ood: bool,
             seed_compat: bool, out_dir: Path, resume: bool, device: str, seed: int, cache_dir: Path | None,
             trust_pickle: bool, quiet: bool, model_spec, weights, normalize, output, num_classes, workers, ray_address,
             gpus_per_worker) -> None:
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
    A's activations weighted by their distance toward A.

    \b
    Examples:
        manifex contrast                                   # 20 random pairs, MNIST-5k, SmallResNet
        manifex contrast --pairs 4:9,3:5,7:1 --out runs/c  # chosen pairs
        manifex contrast --random-pairs 90                 # every ordered pair of 10 classes
        manifex contrast --layer blocks.1 --concepts-pair 3:8 --ood
        manifex contrast --model my_net.py:Net --weights w.pt --layer features.4 --pairs 0:1
    Interrupted runs resume (hyperplanes cached in --out, finished pairs skipped).
    """
    from ..concepts.contrast_run import ContrastConfig, parse_pairs, random_pairs as draw_pairs, run_contrast, write_contrast_report
    from ..errors import InputError
    from .common import load_classifier, load_data

    if pairs is not None and random_pairs is not None:
        raise InputError("give either --pairs or --random-pairs, not both.")
    chosen = parse_pairs(pairs) if pairs is not None else None
    cpair = parse_pairs(concepts_pair) if concepts_pair is not None else None
    if cpair is not None and len(cpair) != 1:
        raise InputError(f"--concepts-pair takes one A:B pair, got {concepts_pair!r}.")
    device = preflight(device=device, out_dir=out_dir, cache_dir=cache_dir)
    executor = make_executor(workers, ray_address, gpus_per_worker)
    command = "manifex " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    data, data_checks = load_data(dataset, trust_pickle=trust_pickle, num_classes=num_classes)
    if chosen is not None or cpair is not None:  # class indices checked against the data before any training
        from ..concepts.contrast import check_pair

        for a, b in (chosen or []) + (cpair or []):
            check_pair(a, b, num_classes or data.num_classes)
    check_layer_first(model_spec, classifier, data, layer, command="manifex contrast")
    train, test = data.split(0.2, seed=seed)
    model, info = load_classifier(train, test, model_spec=model_spec, weights=weights, normalize=normalize, output=output,
                                  classifier=classifier, epochs=classifier_epochs, seed=seed, device=device,
                                  cache_dir=cache_dir, progress=not quiet)
    model.eval()
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) == 1 and test.x.dtype not in dtypes:  # e.g. a float64 --model: its images in its own dtype
        import dataclasses

        test = dataclasses.replace(test, x=test.x.to(dtypes.pop()))
    n_classes = test.num_classes
    if chosen is None:
        chosen = draw_pairs(random_pairs or 20, n_classes, seed=seed)
    cfg = ContrastConfig(layer=layer, images_per_class=images_per_class, n_samples=n_samples, n_random=n_random,
                         n_components=n_components, seed_compat=seed_compat, ood=ood,
                         concepts_pair=cpair[0] if cpair else None, seed=seed)
    checks = [c for c in (data_checks or [])] + list(info.get("checks", []))
    run_info = {k: v for k, v in info.items() if k in ("source", "classifier", "cached", "key", "weights", "normalize")}
    run_info.update({"dataset": dataset, "images": len(test), "device": device})
    run = run_contrast(model, test, chosen, out_dir, config=cfg, executor=executor, resume=resume, progress=not quiet,
                       checks=checks, info=run_info)
    report = write_contrast_report(run, command=command)
    from ..concepts.contrast_run import findings

    for line in findings(run.summary, cfg):
        click.echo(f"  {line}")
    for w in run.warnings:
        click.secho(f"  warning: {w}", fg="yellow")
    click.echo(f"report: {report}")
