"""`manifex attack` and `manifex smooth`: system 2, explanation manipulation and β-smoothing."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from . import main
from .common import (_beta_pair, _betas, _fraction, classifier_options, environment_options, executor_options, load_classifier, load_data,
                     make_executor, preflight)


#: Methods whose explanation of a ReLU network has a zero input-derivative: they need β-growth to be attacked.
_NEEDS_BETA = {"gradient", "guided_backprop", "smoothgrad", "smoothgrad_sq", "vargrad", "integrated_gradients_path"}


def unsupported_option(f):
    """--unsupported raise|warn|ignore: β-smoothing's policy for activations it cannot smooth (parameter ``unsupported``)."""
    return click.option(
        "--unsupported", type=click.Choice(["raise", "warn", "ignore"]), default="raise", show_default=True,
        help="What β-smoothing does with activations it has no softplus analogue for (SELU, ELU with α ≠ 1, "
             "Threshold, Hardshrink, ...): refuse the model before any work (raise), warn, or leave them as they "
             "are (ignore; the attack then gets no curvature from them).")(f)


@main.command()
@click.option("--dataset", default="mnist5k", show_default=True,
              help="Data the classifier is trained on and pairs are drawn from (same forms as `align --dataset`, "
                   "without 'known:').")
@click.option("--classifier", type=click.Choice(["lenet", "mlp", "vgg", "resnet"]), default="lenet", show_default=True,
              help="Built-in classifier, trained by manifex on --dataset (cached); see --model for your own.")
@classifier_options
@click.option("--epochs", type=click.IntRange(1), default=3, show_default=True, help="Classifier epochs (cached).")
@click.option("--method", default="gradient", show_default=True, help="Explanation method to manipulate (`manifex methods`).")
@click.option("--pairs", "n_pairs", type=click.IntRange(1), default=16, show_default=True,
              help="Pairs sampled from the test split (original and target of different classes).")
@click.option("--pairs-csv", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="CSV with columns original,target (image file names) instead of sampled pairs.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder the CSV's file names are relative to (default: the CSV's folder).")
@click.option("--iterations", type=click.IntRange(1), default=500, show_default=True, help="Adam steps (the research used 1500).")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate (the research used 2e-4 at 224²).")
@click.option("--gamma", type=float, default=None,
              help="Output-term weight relative to the map term; default: the research balance rescaled to this image size.")
@click.option("--loss", "map_loss", type=click.Choice(["mse", "pcc"]), default="mse", show_default=True,
              help="Map term: the research MSE of the normalised maps, or 'pcc' (1 - Pearson correlation, same "
                   "scale), which ignores the map's scale and reaches a higher correlation in a small budget.")
@click.option("--budget", callback=_fraction, default=None,
              help="Optional perturbation budget in pixel units of [0, 1], e.g. 8/255 (see --norm).")
@click.option("--norm", type=click.Choice(["linf", "l2"]), default="linf", show_default=True)
@click.option("--beta-growth", callback=_beta_pair, default="auto", show_default=True,
              help="Softplus β from B0 to B1 during the attack ('B0,B1'); 'auto' = 10,100 for methods whose "
                   "ReLU explanation has no input derivative (gradient, guided backprop, ...), 'none' = off.")
@unsupported_option
@click.option("--stop-pcc", type=click.FloatRange(-1, 1), default=None, help="Stop a pair early at this PCC to the target.")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/attack"), show_default=True)
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Skip pairs already finished in --out (an interrupted campaign loses at most one batch).")
@environment_options
@executor_options
def attack(dataset, classifier, model_spec, weights, normalize, output, num_classes, epochs, method, n_pairs, pairs_csv, data_dir,
           iterations, lr, gamma, map_loss, budget, norm, beta_growth, unsupported, stop_pcc, batch_size, out_dir, resume, device,
           seed, cache_dir, trust_pickle, workers, ray_address, gpus_per_worker, quiet) -> None:
    """Manipulate explanations: make them match another image's while the prediction stays.

    \b
    Trains (or reuses) a classifier, then for each (original, target) pair
    perturbs the original so that its explanation matches the target image's
    explanation (Dombrowski et al. 2019). Writes report.html, metrics.json,
    results.jsonl (one line per finished pair) and per-pair tensors and
    figures under pairs/. Re-running resumes an interrupted campaign.

    \b
    Examples (default LeNet on the embedded MNIST, 16 sampled pairs):
      manifex attack --out runs/attack                      # research loss, no budget
      manifex attack --budget 8/255 --loss pcc --lr 3e-3    # barely visible
      manifex attack --method lrp_epsilon_gamma_box --pairs-csv pairs.csv
      manifex attack --model my_nets.py:SmallNet --weights small.pt --normalize 0.1307,0.3081
      manifex attack --pairs 1000 --workers 4               # 4 Ray workers on this machine
      manifex attack --pairs 1000 --ray-address auto        # join the Ray cluster of this node
    """
    from ..attribution import canonical_method
    from ..manipulation import pairs_from_csv, pairs_from_dataset, research_gamma, run_campaign
    from ..manipulation.report import write_attack_report
    from ..models import accuracy

    # Everything that can be wrong is checked before the classifier is trained or the campaign starts.
    method = canonical_method(method)
    device = preflight(device=device, out_dir=out_dir, cache_dir=cache_dir, cache=model_spec is None)
    executor = make_executor(workers, ray_address, gpus_per_worker)
    data, checks = load_data(dataset, trust_pickle=trust_pickle, num_classes=num_classes)
    train, test = data.split(0.2, seed=seed)
    if pairs_csv:
        pairs = pairs_from_csv(pairs_csv, data_dir, image_shape=data.image_shape)
    else:
        _check_pairs(n_pairs, test)
        pairs = pairs_from_dataset(test, n_pairs, seed=seed)
    model, info = load_classifier(train, test, model_spec=model_spec, weights=weights, normalize=normalize, output=output,
                                  classifier=classifier, epochs=epochs, seed=seed, device=device, cache_dir=cache_dir,
                                  progress=not quiet)
    acc = accuracy(model, test)
    checks += info["checks"]
    warnings = _accuracy_check(acc, test, checks)
    if beta_growth == "auto":
        beta_growth = (10.0, 100.0) if method in _NEEDS_BETA else None
    if beta_growth is not None:
        _check_smoothable(model, test.x[:8].to(device), unsupported)
    h, w = data.image_shape[1:]
    options = dict(iterations=iterations, lr=lr, gamma=gamma if gamma is not None else research_gamma(h * w, data.num_classes),
                   map_loss=map_loss, epsilon=budget, norm=norm, beta_growth=beta_growth, stop_pcc=stop_pcc)
    if beta_growth is not None and unsupported != "raise":  # recorded in the settings only when not the default
        options["unsupported"] = unsupported
    summary = run_campaign(model, method, pairs, out_dir, batch_size=batch_size, resume=resume, progress=not quiet,
                           executor=executor, **options)
    report = write_attack_report(summary, out_dir, method=method, model_info=_model_info(info, dataset, acc, epochs),
                                 command="manifex " + " ".join(sys.argv[1:]), checks=checks, warnings=warnings)
    for w in warnings:
        click.secho(f"  warning: {w}", fg="yellow", err=True)
    m = summary.means
    click.echo(f"  {summary.n_pairs} pairs: PCC to target {m.get('pcc_orig_target', float('nan')):.2f} → "
               f"{m.get('pcc_manip_target', float('nan')):.2f}, top-1 kept {summary.top1_kept_rate:.0%}, "
               f"max |Δp| {m.get('max_dp', float('nan')):.3f}, L∞ {m.get('linf', float('nan')) * 255:.1f}/255")
    click.echo(f"report: {report}")


@main.command()
@click.option("--dataset", default="mnist5k", show_default=True, help="Data the classifier is trained on and pairs come from.")
@click.option("--classifier", type=click.Choice(["lenet", "mlp", "vgg", "resnet"]), default="lenet", show_default=True,
              help="Built-in classifier, trained by manifex on --dataset (cached); see --model for your own.")
@classifier_options
@click.option("--epochs", type=click.IntRange(1), default=3, show_default=True)
@click.option("--method", default="gradient", show_default=True)
@click.option("--betas", callback=_betas, default="30,10,5,3", show_default=True,
              help="Softplus β values to compare with ReLU. The research used 10,3,1 on VGG16 (ImageNet-normalised "
                   "inputs); on the default LeNet β=1 costs most of the accuracy, so the default stops at 3.")
@click.option("--pairs", "n_pairs", type=click.IntRange(0), default=16, show_default=True,
              help="Pairs for the robustness sweep (0 skips the sweep).")
@click.option("--iterations", type=click.IntRange(1), default=200, show_default=True, help="Adam steps per attack.")
@click.option("--lr", type=float, default=1e-2, show_default=True, help="Adam learning rate of the attacks.")
@click.option("--budget", callback=_fraction, default="32/255", show_default=True,
              help="L∞ perturbation budget of the sweep's attacks, in pixel units of [0, 1] ('none': unbounded). "
                   "The same budget for every β, so the PCC reached measures how manipulable each model is.")
@click.option("--loss", "map_loss", type=click.Choice(["mse", "pcc"]), default="mse", show_default=True,
              help="Map term of the sweep's attacks (see `manifex attack --help`).")
@unsupported_option
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/smooth"), show_default=True)
@environment_options
@executor_options
def smooth(dataset, classifier, model_spec, weights, normalize, output, num_classes, epochs, method, betas, n_pairs, iterations, lr,
           budget, map_loss, unsupported, batch_size, out_dir, device, seed, cache_dir, trust_pickle, workers, ray_address,
           gpus_per_worker, quiet) -> None:
    """β-smoothing defence: explanations, accuracy, curvature and manipulability across β.

    \b
    Replaces every ReLU by softplus(β) for each --betas value and compares with
    the ReLU model: the explanations of a few test images, test accuracy, the
    curvature (top input-Hessian eigenvalue) and, with --pairs > 0, the same
    manipulation campaign against each smoothed model (resumable per β).
    Writes report.html, metrics.json and figures to --out.

    \b
    Example (about 1.5 min on 2 cores with the cached default LeNet):
      manifex smooth --out runs/smooth
    prints one line per model: the PCC to the target before -> after the
    attack and its gain (smaller for smaller β), accuracy and curvature.
    With --workers N the sweep's attacks run on N Ray workers.
    """
    from ..attribution import canonical_method
    from ..manipulation import (RELU, accuracy_across_beta, explanations_across_beta, pairs_from_dataset,
                               research_gamma, robustness_sweep)
    from ..manipulation.report import smooth_figure, write_smooth_report
    from ..viz import image_grid

    method = canonical_method(method)
    device = preflight(device=device, out_dir=out_dir, cache_dir=cache_dir, cache=model_spec is None)
    executor = make_executor(workers, ray_address, gpus_per_worker)
    data, checks = load_data(dataset, trust_pickle=trust_pickle, num_classes=num_classes)
    train, test = data.split(0.2, seed=seed)
    if n_pairs:
        _check_pairs(n_pairs, test)
    model, info = load_classifier(train, test, model_spec=model_spec, weights=weights, normalize=normalize, output=output,
                                  classifier=classifier, epochs=epochs, seed=seed, device=device, cache_dir=cache_dir,
                                  progress=not quiet)
    checks += info["checks"]
    _check_smoothable(model, test.x[:8].to(device), unsupported)
    x = test.x[:4].to(device)
    maps = explanations_across_beta(model, x, method=method, betas=betas, unsupported=unsupported)
    order = [RELU, *betas]
    image_grid([[x[i], *(maps[b][i] for b in order)] for i in range(len(x))],
               kinds=["image"] + ["signed"] * len(order),
               col_titles=["image"] + ["ReLU" if b == RELU else f"β = {b:g}" for b in order],
               path=out_dir / "explanations_beta.png")
    accuracy = accuracy_across_beta(model, test, betas=betas, unsupported=unsupported)
    warnings = _accuracy_check(accuracy[RELU], test, checks)
    sweep, curves = [], None
    if n_pairs:
        h, w = data.image_shape[1:]
        sweep = robustness_sweep(model, method, pairs_from_dataset(test, n_pairs, seed=seed), [*betas, RELU], out_dir,
                                 data=test, batch_size=batch_size, progress=not quiet, executor=executor,
                                 unsupported=unsupported, iterations=iterations, lr=lr,
                                 epsilon=budget, map_loss=map_loss, gamma=research_gamma(h * w, data.num_classes))
        smooth_figure(sweep, out_dir / "beta_curves.png")
        curves = "beta_curves.png"
    report = write_smooth_report(sweep, out_dir, method=method, accuracy=accuracy, explanations_png="explanations_beta.png",
                                 curves_png=curves, model_info=_model_info(info, dataset, accuracy[RELU], epochs),
                                 command="manifex " + " ".join(sys.argv[1:]), budget=budget, checks=checks, warnings=warnings)
    for w in warnings:
        click.secho(f"  warning: {w}", fg="yellow", err=True)
    for r in sweep:
        b = "ReLU" if r["beta"] == RELU else f"β={r['beta']:g}"
        click.echo(f"  {b:8s} PCC to target {r['pcc_orig_target']:.2f} → {r['pcc_manip_target']:.2f} "
                   f"(gain {r['pcc_gain']:+.2f}), "
                   f"accuracy {r['accuracy']:.3f}, curvature {r['curvature']:.3g}")
    click.echo(f"report: {report}")


def _check_smoothable(model, x, unsupported: str) -> None:
    """Refuse, before any work, a model with activations β-smoothing cannot smooth (one smoothed forward on
    ``x``), naming the --unsupported option; nothing to check unless --unsupported raise."""
    if unsupported != "raise":
        return
    import torch

    from ..attribution import beta_smooth, preserve_model_state
    from ..errors import ModelError

    try:
        with preserve_model_state(model), torch.no_grad():
            model.eval()
            with beta_smooth(model, 10.0, unsupported="raise"):
                model(x)
    except ModelError as e:
        message = str(e).replace("pass unsupported='warn' or 'ignore'", "pass --unsupported warn or --unsupported ignore")
        if "--unsupported" not in message:
            message += " (--unsupported warn or ignore leaves them as they are)"
        raise ModelError(message) from None


def _check_pairs(n_pairs: int, test) -> None:
    if n_pairs > len(test):
        raise click.BadParameter(f"{n_pairs} pairs, but the test split has only {len(test)} images to draw originals "
                                 f"from; use --pairs {len(test)} or fewer (or --pairs-csv).", param_hint="'--pairs'")


def _accuracy_check(acc: float, test, checks: list[str]) -> list[str]:
    """Add the accuracy check to ``checks``; return a warning when the model is no better than chance
    (always guessing the most frequent test class: 1/K when the classes are balanced)."""
    import torch

    num_classes = test.num_classes
    chance = float(torch.bincount(test.y, minlength=num_classes).max()) / len(test)
    low = acc < chance + 0.2 * (1 - chance)  # not clearly better than guessing
    checks.append(f"{'FAILED: ' if low else ''}test accuracy {acc:.1%} (chance: {chance:.1%}, the most frequent of "
                  f"{num_classes} classes; needs ≥ {chance + 0.2 * (1 - chance):.1%})")
    if low:
        return [f"the classifier's test accuracy {acc:.1%} is near chance ({chance:.1%}): it has not learned this data, "
                "so its explanations (and their manipulation) say little; train it longer or check --model/--normalize."]
    return []


def _model_info(info: dict, dataset: str, acc: float, epochs: int) -> dict:
    out = {"classifier": info.get("classifier"), "dataset": dataset, "test accuracy": round(float(acc), 4)}
    if info.get("source") == "user":
        out.update({"source": "your model (--model)", "weights": info.get("weights") or "–",
                    "normalize": info.get("normalize") or "none (pixels in [0, 1])"})
    else:
        out.update({"epochs": epochs, "cached": info.get("cached")})
    return out
