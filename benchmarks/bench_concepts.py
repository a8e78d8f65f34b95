"""Speed of the concepts pipeline against a faithful reimplementation of the research loop, in one run.

1. End to end per class: the research's loop — Captum ``NoiseTunnel(LayerDeepLift)`` at batch 1 (20 samples,
   ``nt_samples_batch_size=1``), the layer's activations, mean(ReLU(attr)) × activation, scikit-learn
   ``NMF(6)`` per class — against ``manifex.class_concepts`` for the same images (all classes batched).
2. NMF at equal error over a batch of classes: scikit-learn per class against manifex's batched solver on the
   same relevance-weighted matrices (errors printed side by side; the ratio is sklearn time / manifex time):
   the default "hals" (scikit-learn's iterates) and the opt-in "ahals" (extrapolated, scikit-learn's error).

    python benchmarks/bench_concepts.py [--classes 3] [--images 60] [--samples 20] [--threads 2]

The model is `manifex concepts`' default: the SmallResNet trained on MNIST-5k (cached; the first run trains
it), layer blocks.2 (64 × 8 × 8). Images are MNIST-5k digits of each class (labels
stand in for predictions so both sides explain the same images). Times are wall-clock, best of --repeats (the median printed beside the NMF's).
--threads limits torch and numpy's BLAS (scikit-learn) alike (threadpoolctl): left alone, numpy's BLAS uses
every core, which on a loaded machine made scikit-learn's thin products several times slower and the "one
thread" comparison unfair. The load average is printed with the figures (the machine may be shared).
"""
from __future__ import annotations

import argparse
import os
import time
import warnings

import torch
import torch.nn.functional as F

from manifex.attribution.layer import LayerDeepLift, layer_activations
from manifex.attribution.methods import SmoothGrad
from manifex.concepts import class_concepts, matched_cosine, nmf, nmf_error
from manifex.data import load_mnist5k
from manifex.models import ModelCache, TrainConfig, get_classifier


def research_loop(model, layer, images, target, *, samples, sigma, baseline, k=6):
    import captum.attr as ca
    from sklearn.decomposition import NMF

    nt = ca.NoiseTunnel(ca.LayerDeepLift(model, layer, multiply_by_inputs=True))
    attrs, acts = [], []
    handle = layer.register_forward_hook(lambda m, a, o: acts.append(o.detach()))
    try:
        for img in images:  # the research's DataLoader(batch_size=1)
            attrs.append(nt.attribute(img[None], target=int(target), nt_samples=samples, stdevs=sigma,
                                      nt_samples_batch_size=1, baselines=baseline).detach())
        acts.clear()
        with torch.no_grad():
            for img in images:
                model(img[None])
    finally:
        handle.remove()
    r = F.relu(torch.cat(attrs)).mean(1, keepdim=True)
    a = torch.cat(acts)
    X = (r * a).permute(0, 2, 3, 1).reshape(-1, a.shape[1])
    m = NMF(n_components=k)
    m.fit(X.numpy())
    return torch.from_numpy(m.components_), m.reconstruction_err_


def weighted_matrices(model, layer, x, labels, classes, n, samples=2):
    """Relevance-weighted activation matrices (B, n·h·w, c) of the classes, for the NMF benchmark."""
    out = []
    explainer = SmoothGrad(LayerDeepLift(model, layer, baseline=0.44), sigma=0.08, n_samples=samples)
    for c in classes:
        xc = x[labels == c][:n]
        a = layer_activations(model, xc, layer)
        r = explainer(xc, c).clamp(min=0).mean(1, keepdim=True)
        out.append((r * a).permute(0, 2, 3, 1).reshape(-1, a.shape[1]))
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, default=3, help="classes in the end-to-end comparison")
    ap.add_argument("--nmf-classes", type=int, default=10, help="classes in the NMF batch")
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="NMF timing: best of this many")
    args = ap.parse_args()
    import sklearn.decomposition  # noqa: F401  (loads scikit-learn's BLAS now: threadpool_limits limits only
    from threadpoolctl import threadpool_limits  # the libraries loaded when it is entered)

    torch.set_num_threads(args.threads)
    with threadpool_limits(limits=args.threads):
        run(args)


def run(args) -> None:
    warnings.filterwarnings("ignore")
    data = load_mnist5k()
    train, _ = data.split(0.2, seed=0)
    # the default model of `manifex concepts` (trained once and cached; the first run trains it)
    model, _ = get_classifier(train, "resnet", TrainConfig(epochs=3, seed=0), cache=ModelCache(None), progress=False)
    layer = model.blocks[2]
    x, y = data.x, data.y
    sigma, baseline = 0.08, 0.44  # manifex's translation of the research's σ = 0.25, baseline 1.0 (MNIST-5k)
    classes = list(range(args.classes))
    print(f"SmallResNet 1×32×32, layer blocks.2 (64×8×8); {args.classes} classes × {args.images} images; "
          f"{args.samples} noise samples; {args.threads} threads")

    t = time.perf_counter()
    ref = [research_loop(model, layer, x[y == c][: args.images], c, samples=args.samples, sigma=sigma, baseline=baseline)
           for c in classes]
    t_ref = (time.perf_counter() - t) / len(classes)
    pick = torch.cat([(y == c).nonzero().flatten()[: args.images] for c in classes])
    t = time.perf_counter()
    basis = class_concepts(model, x[pick], "blocks.2", classes=classes, images_per_class=args.images, predictions=y[pick],
                           relevance_options={"n_samples": args.samples, "sigma": sigma, "baseline": baseline})
    t_mx = (time.perf_counter() - t) / len(classes)
    errs = " ".join(f"{float(basis.recon_error[i]):.3f}/{e:.3f}" for i, (_, e) in enumerate(ref))
    cos = " ".join(f"{float(matched_cosine(basis.vectors[i], comps).mean()):.3f}" for i, (comps, _) in enumerate(ref))
    print(f"end to end per class: research loop {t_ref:.2f} s, manifex {t_mx:.2f} s  → ratio {t_ref / t_mx:.1f}×")
    print(f"  NMF error manifex/research per class: {errs}; mean matched cosine {cos} (different noise draws)")

    X = weighted_matrices(model, "blocks.2", x, y, list(range(args.nmf_classes)), args.images)
    from sklearn.decomposition import NMF

    Xn = X.numpy()
    runs = {"sk": lambda: [NMF(n_components=6).fit(Xn[b]) for b in range(X.shape[0])],
            "mx": lambda: nmf(X, 6, return_n_iter=True), "ax": lambda: nmf(X, 6, solver="ahals", return_n_iter=True)}
    wall, cpu, out = {k: [] for k in runs}, {k: [] for k in runs}, {}
    names = list(runs)
    for r in range(args.repeats):  # interleaved, so that a change of the machine's load hits all three; the order
        for name in names[r % 3:] + names[: r % 3]:  # rotates, so that no solver always runs after the same one
            t, c = time.perf_counter(), time.process_time()
            out[name] = runs[name]()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    (best_sk, best_mx, best_ax), (cpu_sk, cpu_mx, cpu_ax) = ([min(d[k]) for k in names] for d in (wall, cpu))
    med = {k: sorted(v)[len(v) // 2] for k, v in wall.items()}
    sk, (W, H, n_iter), (Wa, Ha, n_iter_a) = out["sk"], out["mx"], out["ax"]
    e_sk = torch.tensor([m.reconstruction_err_ for m in sk])
    e_mx = nmf_error(X, W, H)
    worst = float((e_mx / e_sk - 1).abs().max())
    same_iter = n_iter.tolist() == [m.n_iter_ for m in sk]
    print(f"NMF, {X.shape[0]} classes × {X.shape[1]} rows × {X.shape[2]} channels, k = 6: scikit-learn {best_sk:.3f} s, "
          f"manifex batched {best_mx:.3f} s → ratio {best_sk / best_mx:.1f}× (largest error difference {100 * worst:.3f}%; "
          f"iterations {'equal' if same_iter else 'differ'}: {sum(n_iter.tolist())} in all); load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    # CPU time of this process (all its threads): on a loaded machine the wall clock also counts the time the
    # other jobs held the cores; with --threads 1 the CPU-time ratio is the quiet machine's, up to cache sharing
    print(f"  CPU time, best of {args.repeats}: scikit-learn {cpu_sk:.3f} s, manifex {cpu_mx:.3f} s → ratio "
          f"{cpu_sk / cpu_mx:.1f}×")
    # solver="ahals" (extrapolated HALS): scikit-learn's error, not its iterates; the error per class is
    # computed in float64 from the factors, as scikit-learn's reconstruction_err_ is from its own
    rel = nmf_error(X.double(), Wa.double(), Ha.double()) / e_sk.double() - 1
    print(f"  solver='ahals': {best_ax:.3f} s (CPU {cpu_ax:.3f} s) → ratio {best_sk / best_ax:.2f}× (CPU "
          f"{cpu_sk / cpu_ax:.2f}×); {sum(n_iter_a.tolist())} iterations in all; error against scikit-learn's per "
          f"class from {float(rel.min()):+.1e} to {float(rel.max()):+.1e} (relative)")
    # the median of the repeats beside the best: on a shared machine the best is the quiet machine's figure and the
    # median what a run typically sees
    print(f"  median of {args.repeats} repeats (wall): scikit-learn {med['sk']:.3f} s, hals {med['mx']:.3f} s, ahals "
          f"{med['ax']:.3f} s → ratios {med['sk'] / med['mx']:.2f}× and {med['sk'] / med['ax']:.2f}×")


if __name__ == "__main__":
    main()
