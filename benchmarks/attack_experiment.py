"""Experiment: explanation manipulation on the default LeNet trained on the embedded MNIST (issue 4, "Done when").

Model: ``get_classifier(train, "lenet", TrainConfig(epochs=3), cache=ModelCache())`` on the train split of
``load_mnist5k()`` (32×32, ``.split(0.2, seed=0)``); pairs: ``pairs_from_dataset(test, N, seed=0)`` (original
and target image of different classes). The target map is the explanation of the target image for the class
the model predicts on it; the explained class of the original is its predicted class (as ``run_campaign``).
Maps are compared as in the research code: Σ_c |relevance| normalised to sum 1.

For each method ``manipulate`` runs with the settings in ``SETTINGS`` (tuned by hand, see the comments there)
on ``--pairs`` pairs in batches of ``--batch``, and the script prints per method: PCC and SSIM of the
manipulated map to the target map (before = original map, after = manipulated map, means), the top-1 kept
rate, the mean max |Δp|, the L∞ perturbation (mean / max, in /255), the iterations and the wall time.
``--epsilons`` reruns every method at other L∞ budgets (in /255; ``inf`` = no budget; see
``budget_options`` for the lr and iterations used there) to show what is reachable with which perturbation size.

Findings (16 pairs): every method keeps the class for all pairs (mean max|Δp| ≤ 0.014 within 32/255), but
the PCC to the target rises only a little under a small budget. With ``--loss pcc`` (MSE in brackets) at
8/255: gradient 0.35 → 0.44 (0.40), input×gradient 0.14 → 0.17 (0.16), IG 0.13 → 0.16 (0.16), LRP 0.27 → 0.29
(0.29); at 32/255 0.60 / 0.28 / 0.26 / 0.38; unbounded 0.79 / 0.87 / 0.85 / 0.81, with some pixels saturated
(L∞ = 255/255, L2 ≈ 11). The limit is the model, not the optimiser: the β-smoothed surrogate's own map
plateaus at the same PCC within 8/255, and lr, γ, the β range, iterations or 10 instead of 3 training epochs
move it by ≤ 0.015. It is not only MNIST's zero background either (input×gradient taken in the normalised
input space, background −0.42, gives 0.17 → 0.19 at 8/255): a trained LeNet's explanation maps move little
within a few /255.

    PYTHONPATH=src python benchmarks/attack_experiment.py [--methods gradient input_x_gradient ...]
        [--pairs 16] [--batch 16] [--threads 2] [--epsilons 4 8 16 inf] [--iterations N] [--loss mse|pcc]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

try:
    import manifex  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from manifex.attribution import make_explainer
from manifex.data import load_mnist5k
from manifex.manipulation import manipulate, pairs_from_dataset, research_gamma
from manifex.metrics import output_change, pearson, perturbation_norms, ssim
from manifex.models import ModelCache, TrainConfig, get_classifier

GAMMA = research_gamma(32 * 32, 10)  # 2.4e-4: the seed's map/output balance for 32×32 maps and 10 classes

#: Best settings found per method at an L∞ budget of 8/255: (explainer name, explainer options, manipulate
#: options); epsilon in [0, 1] units. Tuning notes (16 test pairs, batch 16): at 8/255 the PCC plateaus after
#: ~50-100 steps, so more iterations buy little; lr 3e-4 … 1e-2 give the same PCC (±0.01); γ = 0 instead of
#: research_gamma changes the PCC by < 0.01 (the output term is not what limits the attack) but raises max|Δp|;
#: β-growth (30, 300) or (3, 30) instead of (10, 100) changes the gradient PCC by ±0.015. β-growth is needed
#: for the gradient, helps Input×Gradient and IG a little, and hurts LRP (0.263 vs 0.286), so LRP runs without.
#: LRP: the ε-γ-box composite (z^B first layer, as the research code): its maps are not zero on the black
#: background, unlike lrp_epsilon_plus (z+ first layer, PCC before 0.137, after 0.155).
SETTINGS: dict[str, tuple[str, dict, dict]] = {
    "gradient": ("gradient", {}, dict(beta_growth=(10.0, 100.0), lr=3e-3, iterations=200, epsilon=8 / 255, gamma=GAMMA)),
    "input_x_gradient": ("input_x_gradient", {}, dict(beta_growth=(10.0, 100.0), lr=3e-3, iterations=200, epsilon=8 / 255, gamma=GAMMA)),
    "integrated_gradients": ("integrated_gradients", {"steps": 16},
                             dict(beta_growth=(10.0, 100.0), lr=3e-3, iterations=100, epsilon=8 / 255, gamma=GAMMA)),
    "lrp": ("lrp_epsilon_gamma_box", {}, dict(lr=3e-3, iterations=200, epsilon=8 / 255, gamma=GAMMA)),
}


def budget_options(attack: dict, epsilon: float | None) -> dict:
    """The settings for another L∞ budget: lr 1e-2 from 32/255 up (Adam moves ≈ lr per step, so a small lr
    cannot use a large budget in time) and, without a budget, 1.5× the iterations."""
    opts = {**attack, "epsilon": epsilon}
    if epsilon is None or epsilon >= 32 / 255:
        opts["lr"] = 1e-2
    if epsilon is None:
        opts["iterations"] = int(1.5 * attack["iterations"])
    return opts


def run_method(model, name: str, xo: torch.Tensor, xt: torch.Tensor, batch: int, **overrides) -> dict:
    method, expl_opts, attack = SETTINGS[name]
    attack = {**attack, **overrides}
    explainer = make_explainer(model, method, **expl_opts)
    with torch.no_grad():
        class_t = model(xt).argmax(1)
    target_expl = explainer.attribute(xt, class_t)
    t0 = time.perf_counter()
    results = [manipulate(model, explainer, xo[s:s + batch], target_expl[s:s + batch], **attack)
               for s in range(0, len(xo), batch)]
    seconds = time.perf_counter() - t0
    cat = lambda key: torch.cat([getattr(r, key) for r in results])  # noqa: E731
    om, tm, mm = cat("original_map"), cat("target_map"), cat("manipulated_map")
    change = output_change(cat("logits"), cat("logits_adv"))
    norms = perturbation_norms(cat("x"), cat("x_adv"))
    linf = norms.linf * 255
    eps = attack.get("epsilon")
    return {
        "method": name if method == name else f"{name} ({method})",
        "pcc_before": float(pearson(om, tm).nanmean()), "pcc_after": float(pearson(mm, tm).nanmean()),
        "pcc_after_min": float(pearson(mm, tm).min()),
        "ssim_before": float(ssim(om, tm).mean()), "ssim_after": float(ssim(mm, tm).mean()),
        "top1_kept": float(change.top1_kept.float().mean()), "max_dp": float(change.max_prob_change.mean()),
        "max_dp_max": float(change.max_prob_change.max()),
        "linf_mean": float(linf.mean()), "linf_max": float(linf.max()), "l2_mean": float(norms.l2.mean()),
        "eps": "none" if eps is None else f"{eps * 255:.0f}/255",
        "iterations": float(cat("iterations").float().mean()), "seconds": seconds,
        "settings": attack,
    }


HEADER = (f"{'method':<34} {'budget':>7} {'PCC before→after':>17} {'(min)':>6} {'SSIM before→after':>18} "
          f"{'top-1 kept':>10} {'max|Δp| mean/max':>16} {'L∞·255 mean/max':>15} {'L2':>5} {'iters':>6} {'time s':>7}")


def row(r: dict) -> str:
    return (f"{r['method']:<34} {r['eps']:>7} {r['pcc_before']:>7.3f} → {r['pcc_after']:<7.3f} {r['pcc_after_min']:>6.2f} "
            f"{r['ssim_before']:>8.3f} → {r['ssim_after']:<7.3f} {r['top1_kept']:>10.0%} "
            f"{r['max_dp']:>7.3f}/{r['max_dp_max']:<7.3f}  {r['linf_mean']:>6.1f}/{r['linf_max']:<6.1f} {r['l2_mean']:>5.2f} "
            f"{r['iterations']:>6.0f} {r['seconds']:>7.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=None, help="override every method's iterations")
    ap.add_argument("--loss", choices=["mse", "pcc"], default="mse",
                    help="map term of the loss: the research MSE or 1 - Pearson correlation (manipulate(map_loss=...))")
    ap.add_argument("--epsilons", nargs="*", default=[], help="extra L∞ budgets in /255 (inf = no budget) to rerun every method at")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UserWarning)

    train, test = load_mnist5k().split(0.2, seed=0)
    t0 = time.perf_counter()
    model, info = get_classifier(train, "lenet", TrainConfig(epochs=3), cache=ModelCache(), progress=False)
    with torch.no_grad():
        acc = float((model(test.x).argmax(1) == test.y).float().mean())
    print(f"LeNet (3 epochs, {'from cache' if info.get('cached') else f'trained in {time.perf_counter() - t0:.0f} s'}): "
          f"test accuracy {acc:.3f} on {len(test)} images; {args.pairs} test pairs, batch {args.batch}, "
          f"{torch.get_num_threads()} thread(s), γ = {GAMMA:.3g}", flush=True)
    pairs = pairs_from_dataset(test, args.pairs, seed=0)
    xo, xt = pairs.images(range(args.pairs))

    overrides = {"map_loss": args.loss}
    if args.iterations is not None:
        overrides["iterations"] = args.iterations
    results = []
    for name in args.methods:
        r = run_method(model, name, xo, xt, args.batch, **overrides)
        results.append(r)
        print(row(r), flush=True)
        for e in args.epsilons:
            eps = None if e in ("inf", "none") else float(e) / 255
            r = run_method(model, name, xo, xt, args.batch, **{**budget_options(SETTINGS[name][2], eps), **overrides})
            results.append(r)
            print(row(r), flush=True)

    print()
    print(HEADER)
    print("-" * len(HEADER))
    for r in results:
        print(row(r))
    print()
    print("settings (manipulate options; epsilon in [0, 1] units)" + (", other budgets: see budget_options (lr 1e-2 from 32/255 up; 1.5x the iterations without a budget)" if args.epsilons else "") + ":")
    for name in args.methods:
        method, expl_opts, attack = SETTINGS[name]
        opts = {**attack, **overrides}
        shown = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in opts.items()}
        print(f"  {name}: explainer {method}{expl_opts or ''}, {shown}")


if __name__ == "__main__":
    main()
