"""Benchmark: randomised top-k generator spectrum against the full Jacobian SVD, at d = k = 1024.

Decoder: manifex's multi-scale image flow on MNIST-5k 32×32 (the zoo's default: 3 levels × 4 Glow blocks, 32 hidden
channels), its latent a list of three tensors with 1,024 numbers in all, evaluated at the encodings of test images.
``--trained`` (default) takes the flow from the model cache ($MANIFEX_CACHE; trained on first use, minutes);
``--untrained`` a random-init flow (ActNorm initialised on data) — its spectrum is flatter, so the randomised
values need more power iterations there.

Reference: ``generator_spectrum(..., method="exact")`` = 1,024 forward-mode JVPs per image (batched) and an SVD.
manifex: ``generator_spectrum(..., top=k, method="randomized")`` = (2q + 2)(k + 10) JVP/VJP products, no Jacobian.
Both in one run, same images; prints the speed ratio and the relative error of the top-k singular values.

    python benchmarks/bench_spectrum.py [--images 8] [--top 10] [--power-iters 2] [--threads 2] [--untrained]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

try:
    import manifex  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from manifex.data import load_mnist5k
from manifex.geometry import estimate_dimension, generator_spectrum
from manifex.models import ImageFlow, ModelCache, as_generator, get_image_flow


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--power-iters", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="best of this many timings")
    ap.add_argument("--untrained", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_mnist5k()
    x = data.x[-args.images:]
    if args.untrained:
        torch.manual_seed(0)
        flow = ImageFlow(data.image_shape).eval()
        flow.initialize(data.x[:512])
    else:
        flow, info = get_image_flow(data, cache=ModelCache(), progress=True)
        print(f"flow: {info['key']} ({'cached' if info['cached'] else 'trained now'}), train bits/dim {info['bits_per_dim']:.3f}")
    gen = as_generator(flow)
    with torch.no_grad():
        z = gen.encode(x)

    def timed(fn):
        best, out = float("inf"), None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t0)
        return best, out

    t_exact, exact = timed(lambda: generator_spectrum(gen, z, method="exact", batch_size=args.images))
    t_fast, fast = timed(lambda: generator_spectrum(gen, z, top=args.top, method="randomized",
                                                    power_iters=args.power_iters, batch_size=args.images))
    k = args.top
    rel = (fast.singular_values - exact.singular_values[:, :k]).abs() / exact.singular_values[:, :k]
    a = fast.vectors.reshape(len(x), k, -1)
    b = exact.vectors[:, :k].reshape(len(x), k, -1)
    cos = torch.linalg.svdvals(a @ b.transpose(1, 2))  # cosines of the principal angles between the top-k spans
    print(f"d = k = {exact.singular_values.shape[1]}, {len(x)} images, threads {args.threads}, top {k}, power iterations {args.power_iters}")
    print(f"full Jacobian + SVD: {t_exact:.2f} s   randomised top-{k}: {t_fast:.2f} s   speed-up {t_exact / t_fast:.1f}x")
    print(f"top-{k} singular values: max relative error {float(rel.max()):.2e} (leading value {float(rel[:, 0].max()):.2e}); "
          f"smallest principal-angle cosine of the top-{k} spans {float(cos.min()):.4f}")
    s = exact.singular_values
    print(f"exact spectrum (image 0): s_1 = {float(s[0, 0]):.3g}, s_10 = {float(s[0, 9]):.3g}, s_100 = {float(s[0, 99]):.3g}, "
          f"s_1024 = {float(s[0, -1]):.3g}")
    for e in (0.9, 0.99):
        dims = estimate_dimension(s, "energy", energy=e)
        print(f"dimension (energy {e}): median {int(dims.median())}, range {int(dims.min())}–{int(dims.max())}")
    print(f"dimension (largest gap): {estimate_dimension(s, 'gap').tolist()}")


if __name__ == "__main__":
    main()
