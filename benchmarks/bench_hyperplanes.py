"""Hyperplanes of all ordered pairs of 10 classes: manifex's one batched problem vs the research's per-pair loop.

Both start from the same nn.Linear-style initialisation and run the research settings (BCE-with-logits,
full-batch SGD, lr 0.01, 100 epochs), so they compute the same hyperplanes (the max difference is printed).
Data: per class ``--rows`` activation vectors of ``--channels`` channels (the size of the MNIST-5k SmallResNet's
blocks.2 data: 60 images × 64 positions × ~30% kept ≈ 1,200 rows × 64 channels), Gaussian blobs.

    python benchmarks/bench_hyperplanes.py                 # 90 pairs, float32, 1 thread
    python benchmarks/bench_hyperplanes.py --classes 20 --threads 2

Goal (issue 9): batched ≥ 10× the loop. Timings on a shared CPU are noisy; the ratio is taken in one run.
"""
from __future__ import annotations

import argparse
import time

import torch

from manifex.concepts.contrast import hyperplane_loop, train_hyperplanes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--rows", type=int, default=1200)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(args.classes, args.channels, generator=g).abs()
    # rows per class vary (as the relevance threshold keeps different shares of positions)
    vecs = [(centres[k] + torch.randn(args.rows - 37 * k, args.channels, generator=g)).relu().to(dtype) for k in range(args.classes)]
    pairs = args.classes * (args.classes - 1)

    train_hyperplanes(vecs, epochs=2)  # warm-up
    t = time.perf_counter()
    batched = train_hyperplanes(vecs, epochs=args.epochs)
    t_batched = time.perf_counter() - t
    t = time.perf_counter()
    loop = hyperplane_loop(vecs, epochs=args.epochs)
    t_loop = time.perf_counter() - t
    diff = float((batched.normals - loop.normals).abs().max())
    print(f"{pairs} ordered pairs, {args.classes} classes × ~{args.rows} rows × {args.channels} channels, {args.epochs} "
          f"epochs, {args.dtype}, {args.threads} thread(s)")
    print(f"per-pair loop (research): {t_loop:8.2f} s")
    print(f"batched (manifex):        {t_batched:8.2f} s")
    print(f"ratio loop / batched:     {t_loop / t_batched:8.1f}x   (goal >= 10x)")
    print(f"max |w_batched - w_loop| = {diff:.2e}; mean accuracy {batched.mean_accuracy():.4f} vs {loop.mean_accuracy():.4f}")


if __name__ == "__main__":
    main()
