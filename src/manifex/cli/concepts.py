"""`manifex concepts`: system 4, concept-based explanations per class and the prediction-from-components test."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from . import main
from .common import _csv, check_layer_first, classifier_options, environment_options, executor_options, load_classifier, load_data, make_executor, preflight


def _pool(ctx, param, value):
    if value is None or str(value).lower() == "auto":
        return "auto"
    try:
        v = int(value)
    except ValueError:
        raise click.BadParameter(f"expected a positive int or auto, got {value!r}") from None
    if v < 1:
        raise click.BadParameter(f"expected a positive int or auto, got {value!r}")
    return v


@main.command()
@click.option("--dataset", default="mnist5k", show_default=True,
              help="Images to explain (the held-out split is used; the classifier trains on the rest): mnist5k, "
                   "digits8, a .npz with x and y, or an image folder with one subfolder per class.")
@click.option("--classifier", type=click.Choice(["resnet", "vgg", "lenet", "mlp"]), default="resnet", show_default=True,
              help="Built-in classifier trained (and cached) on the data. The strip test needs global pooling (resnet); "
                   "for the others use --layout canvas.")
@classifier_options
@click.option("--epochs", type=click.IntRange(1), default=3, show_default=True, help="Classifier epochs (cached).")
@click.option("--layer", default="blocks.2", show_default=True,
              help="Layer whose output is decomposed: a block output after a ReLU, (N, C, H, W) or (N, C). An unknown "
                   "name lists the model's layers.")
@click.option("--components", type=click.IntRange(1), default=6, show_default=True, help="Concepts per class (NMF components).")
@click.option("--images-per-class", type=click.IntRange(1), default=60, show_default=True,
              help="At most this many images the model predicts as each class (a seeded random pick).")
@click.option("--classes", callback=_csv, default=None, help="Only these classes, e.g. 3,5,8 (default: all).")
@click.option("--relevance", type=click.Choice(["deeplift", "integrated_gradients", "gradient_x_activation", "none"]),
              default="deeplift", show_default=True, help="Relevance that weights the activations (research: deeplift).")
@click.option("--samples", type=click.IntRange(0), default=20, show_default=True,
              help="Noise-tunnel samples of the relevance (research: 20; 0 = no noise). σ = 0.25·std of the data and "
                   "the baseline mean + std: the research's values (0.25, 1.0) in normalised units.")
@click.option("--solver", type=click.Choice(["auto", "hals", "mu", "sklearn"]), default="auto", show_default=True,
              help="NMF solver: auto = hals, scikit-learn's coordinate descent batched over the classes.")
@click.option("--pool", callback=_pool, default="auto", show_default=True,
              help="Average-pool size of the activations for the crop grid, or auto: the largest pool <= 4 that leaves "
                   "a grid of at least 2x2 cells (4 at MNIST-5k's blocks.2, 8x8; 1 at digits8's blocks.2, 2x2). The "
                   "research used 2 on 224-px ImageNet (cells of 1/7 and 1/3 of the image); on 32-px MNIST at blocks.2 "
                   "a pool of 2 gives 8-px cells (1/4 of a digit image) and 4 gives 16-px cells (1/2).")
@click.option("--geometry", type=click.Choice(["grid", "receptive_field"]), default="grid", show_default=True,
              help="Crop the grid cell (research) or the cell's receptive field.")
@click.option("--layout", type=click.Choice(["strip", "canvas"]), default="strip", show_default=True,
              help="Assemble the crops as a vertical strip (research; needs global pooling) or on a canvas of the "
                   "model's input size.")
@click.option("--exclude-target", is_flag=True,
              help="Headline the stricter crop pool (images not predicted as the class). Both pools are always "
                   "computed and shown.")
@click.option("--top-k", type=click.IntRange(1), default=8, show_default=True, help="Crops shown per concept.")
@click.option("--strips", type=click.IntRange(1), default=5, show_default=True,
              help="Strips per class: the top-1 crops of the concepts (the research's test, also reported alone), "
                   "then the rank-2..n crops; more strips give a narrower interval for argmax = A (cheap: the "
                   "crops are already ranked).")
@click.option("--controls", type=click.IntRange(1), default=20, show_default=True, help="Random-crop strips per class (control).")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True, help="Images per attribution batch.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/concepts"), show_default=True)
@click.option("--resume/--no-resume", default=True, show_default=True, help="Skip classes already finished in --out.")
@environment_options
@executor_options
def concepts(dataset, classifier, model_spec, weights, normalize, output, num_classes, epochs, layer, components, images_per_class,
             classes, relevance, samples, solver, pool, geometry, layout, exclude_target, top_k, strips, controls, batch_size,
             out_dir, resume, workers, ray_address, gpus_per_worker, device, seed, cache_dir, trust_pickle, quiet) -> None:
    """Which few visual concepts make the model call an image class A?

    \b
    For each class: the images the model predicts as A, the relevance of a
    layer's activations (LayerDeepLift in a noise tunnel), NMF into a few
    concept vectors, their top crops from the data, and the prediction-from-
    components test (a strip of each concept's top crop: is it still A?)
    against random crops. Writes report.html, metrics.json, results.jsonl
    (one record per class; a re-run resumes) and classes/*.png.

    \b
    Examples:
      manifex concepts                                   # SmallResNet on MNIST-5k, blocks.2, 6 concepts
      manifex concepts --classes 3,5,8 --components 4 --samples 5
      manifex concepts --layer blocks.1 --pool 2 --exclude-target
      manifex concepts --model mynet.py:build --weights w.pt --layer layer4 --layout canvas
    """
    import torch

    from ..concepts.basis import predict_classes
    from ..concepts.prototypes import resolve_pool
    from ..concepts.report import run_concept_campaign, write_concepts_report
    from ..attribution.layer import check_layer_shape, layer_activations, resolve_layer
    from ..errors import InputError
    from ..models import accuracy

    t0 = time.time()
    device = preflight(device=device, out_dir=out_dir, cache_dir=cache_dir)
    executor = make_executor(workers, ray_address, gpus_per_worker)
    data, checks = load_data(dataset, trust_pickle=trust_pickle, num_classes=num_classes)
    train, test = data.split(0.2, seed=seed)
    wanted = None
    if classes:
        try:
            wanted = [int(c) for c in classes]
        except ValueError:
            raise InputError(f"--classes takes class indices such as 3,5,8, got {','.join(classes)}.") from None
        bad = [c for c in wanted if not 0 <= c < data.num_classes]
        if bad:
            raise InputError(f"--classes {bad} out of range: the data has classes 0..{data.num_classes - 1}.")
        dup = sorted({c for c in wanted if wanted.count(c) > 1})
        if dup:
            raise InputError(f"--classes lists {', '.join(map(str, dup))} more than once; name each class once.")
    shape = check_layer_first(model_spec, classifier, data, layer, command="manifex concepts")
    if shape is not None:  # the pool against the built-in network's grid, before training it
        resolve_pool(pool, tuple(shape[1:]), f"--layer {layer}")
    model, info = load_classifier(train, test, model_spec=model_spec, weights=weights, normalize=normalize, output=output,
                                  classifier=classifier, epochs=epochs, seed=seed, device=device, cache_dir=cache_dir,
                                  progress=not quiet)
    checks = list(checks) + list(info.get("checks", []))
    # the layer, on one batch, before any attribution
    resolve_layer(model, layer)
    probe = layer_activations(model, test.x[:8].to(device), layer)
    check_layer_shape(tuple(probe.shape), layer, what="manifex concepts")
    if bool((probe < 0).any()):
        raise InputError(f"--layer {layer} has negative activations; NMF needs a layer after a ReLU (a block output).")
    checks.append(f"layer {layer}: output {tuple(probe.shape[1:])} per image, non-negative on a test batch")
    grid = tuple(probe.shape[2:])
    pool = resolve_pool(pool, grid, f"--layer {layer}")  # before any attribution: a pool larger than the grid is refused
    cells = tuple(g // pool for g in grid) if grid else (1, 1)
    if cells == (1, 1):
        whole = (f"the crop grid of --layer {layer} is 1x1 ({'a dense layer' if not grid else f'{grid[0]}x{grid[1]} grid, pool {pool}'}): "
                 "every crop is the whole image, so the prediction-from-components test is not informative about concepts; "
                 "use an earlier layer or a smaller --pool.")
        click.echo(f"warning: {whole}", err=True)
        checks.append("FAILED: crops smaller than the image (the crop grid is 1x1: every crop is the whole image)")
    else:
        checks.append(f"crop grid {cells[0]}x{cells[1]} (layer grid {grid[0]}x{grid[1]}, pool {pool}): crops of "
                      f"{tuple(x // c for x, c in zip(test.x.shape[2:], cells))} px")
    x = test.x
    preds = predict_classes(model, x.to(device))
    counts = torch.bincount(preds, minlength=data.num_classes)
    todo = wanted if wanted is not None else list(range(data.num_classes))
    warnings = [f"class {data.classes[c]}: no test image is predicted as it (skipped)" for c in todo if counts[c] == 0]
    few = [f"{data.classes[c]} ({int(counts[c])})" for c in todo if 0 < counts[c] < min(10, images_per_class)]
    if few:
        warnings.append(f"classes with fewer than 10 predicted images (their concepts rest on little data): {', '.join(few)}")
    checks.append(f"predicted images per class: {', '.join(f'{data.classes[c]}: {int(counts[c])}' for c in todo)}")
    options = {"dataset": dataset, "layer": layer, "components": components, "images_per_class": images_per_class,
               "relevance": relevance, "samples": samples, "solver": solver, "pool": pool, "geometry": geometry,
               "layout": layout, "top_k": top_k, "strips": strips, "controls": controls, "seed": seed, "batch_size": batch_size}
    records = run_concept_campaign(model, x, [c for c in todo if counts[c] > 0], out_dir, options=options,
                                   class_names=data.classes, predictions=preds, executor=executor, resume=resume,
                                   progress=not quiet)
    done = [r for r in records if not r.get("skipped")]
    checks.append(f"NMF relative error below 1 for every class (max {max(r['relative_error'] for r in done):.3f})"
                  if done and max(r["relative_error"] for r in done) < 1 else "FAILED: an NMF did not reduce the error")
    checks.append(f"the model accepted every assembled {layout} (strips of {components} crops)")
    excluded = {r["class"]: r["n_excluded"] for r in done if r.get("n_excluded")}
    n_used = sum(r["n_images"] for r in done)
    checks.append(f"relevance > 0 somewhere on every image used ({n_used} images)" if not excluded else
                  f"relevance > 0 somewhere on every image used ({n_used}); {sum(excluded.values())} images with relevance <= 0 "
                  f"everywhere were excluded ({', '.join(f'{data.classes[c]}: {n}' for c, n in excluded.items())})")
    dead = [r["class"] for r in records if r.get("skipped") and "relevance" in r.get("reason", "")]
    if dead:
        checks.append(f"FAILED: every class has an image with relevance > 0 (classes {', '.join(data.classes[c] for c in dead)} "
                      "have relevance <= 0 everywhere on all their images: skipped, not counted in the test)")
    model_info = {"classifier": info.get("classifier"), "source": info.get("source"), "dataset": dataset,
                  "test accuracy": round(accuracy(model, test), 4), "epochs": epochs if info.get("source") == "built-in" else None,
                  "cached": info.get("cached")}
    report = write_concepts_report(records, out_dir, options=options, model_info=model_info, class_names=data.classes,
                                   checks=checks, warnings=warnings, command="manifex " + " ".join(sys.argv[1:]),
                                   headline_pool="exclude" if exclude_target else "include", seconds=round(time.time() - t0, 1))
    from ..concepts.report import rate_text, summarize

    s = summarize(records)
    for p in ("include", "exclude"):
        if s.get(p, {}).get("concepts"):
            click.echo(f"  {p} target: argmax = A {rate_text(s[p]['concepts'])}, random crops {rate_text(s[p]['control'])}; "
                       f"mean p(A) {s[p]['concepts']['mean_p']:.2f}")
    if s["skipped"]:
        click.echo(f"  skipped: {', '.join(f'{data.classes[int(c)]} ({why})' for c, why in s['skipped_reasons'].items())}")
    click.echo(f"report: {report}")
