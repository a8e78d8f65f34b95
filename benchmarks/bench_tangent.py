"""Benchmark: manifex.geometry.tangent_space against the research seed's per-pixel backward loop.

The seed computed the tangent space of ONE image with one backward pass per output pixel
(``torch.autograd.grad(x_flat[i], z, retain_graph=True)`` for i in range(d)), then
``scipy.linalg.orth`` of the (d, k) Jacobian, zero-padded to k columns when rank-deficient.
manifex builds the same Jacobian from k forward-mode JVPs batched over images and latent directions,
then reduces each image's k x k Gram matrix (float64) to the basis with one batched product.

It also prints what tangent_space costs relative to k batched forward passes of the decoder (k calls of
decoder(z) on the whole batch, no autograd) — the floor for any method that needs the k Jacobian columns —
split into the forward-mode Jacobian and the rest, next to what a batched SVD of the same Jacobians costs
(the former reduction). Those figures are the minimum over --repeats interleaved runs, which is the honest
statistic on a machine shared with other jobs.

Decoder: the seed's VAE decoder architecture, k=10 → Linear 256 → Linear 256 → Linear 512 → (32, 4, 4)
→ 3 × ConvTranspose2d(4, stride 2, padding 1) (32→32→32→1 channels, 4→8→16→32 px) → sigmoid, ReLU inside,
RANDOM INIT (torch.manual_seed(0)), eval mode, float32. The 256×256 variant appends
F.interpolate(size=256, mode="bilinear", align_corners=False). Speed does not depend on trained weights.

    PYTHONPATH=src python benchmarks/bench_tangent.py            # full run (a few minutes on 2 cores)
    PYTHONPATH=src python benchmarks/bench_tangent.py --quick    # < 1 minute
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

import numpy as np
import scipy
import scipy.linalg
import torch
import torch.nn as nn

try:
    from manifex.geometry import alignment, decompose, decoder_jacobian, random_baseline, tangent_space
    from manifex.models import VAE
    from manifex.alignment import upsampled_decoder
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    from manifex.geometry import alignment, decompose, decoder_jacobian, random_baseline, tangent_space
    from manifex.models import VAE
    from manifex.alignment import upsampled_decoder


def make_decoders(k: int) -> tuple[nn.Module, object]:
    """The seed's VAE decoder (manifex's VAE, random init) and the same followed by bilinear upsampling to 256."""
    torch.manual_seed(0)
    dec = VAE((1, 32, 32), latent_dim=k).decoder.eval()
    return dec, upsampled_decoder(dec, 256)


# ------------------------------------------------------------------------------------------------------
# The seed's method, reimplemented faithfully: one image, one backward pass per output pixel, orth, pad.
# ------------------------------------------------------------------------------------------------------


def seed_tangent_space(decoder: nn.Module, z1: torch.Tensor, max_pixels: int | None = None):
    """Tangent basis of one image the seed's way. Returns (U (d, k) zero-padded, rank, J (d, k), n_passes).

    ``max_pixels`` stops the pixel loop early (for extrapolation); the remaining Jacobian rows stay zero.
    """
    k = z1.shape[-1]
    z = z1.detach().clone().reshape(1, k).requires_grad_(True)
    x = decoder(z)
    x_flat = x.view(-1)
    d = x_flat.numel()
    n = d if max_pixels is None else min(d, max_pixels)
    J = np.zeros((d, k), dtype=np.float32)
    for i in range(n):
        (g,) = torch.autograd.grad(x_flat[i], z, retain_graph=True)
        J[i] = g.detach().cpu().numpy().ravel()
    U = scipy.linalg.orth(J)
    rank = U.shape[1]
    if rank < k:
        U = np.concatenate([U, np.zeros((d, k - rank), dtype=U.dtype)], axis=1)
    return U, rank, J, n


# ------------------------------------------------------------------------------------------------------


def timed(fn, repeats: int = 1):
    """(median seconds over ``repeats`` calls, last result)."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def fmt_s(s: float) -> str:
    if s >= 100:
        return f"{s:,.0f} s"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def cost_vs_forward(decoder, z: torch.Tensor, repeats: int) -> dict[str, float]:
    """Minimum seconds over ``repeats`` interleaved runs of: k forward passes (no grad), the Jacobian alone,
    tangent_space, and a batched SVD of the same Jacobian (the former reduction)."""
    k = z.shape[1]
    J = decoder_jacobian(decoder, z)
    rows = J.reshape(J.shape[0], k, -1)
    best = {"forward": math.inf, "jacobian": math.inf, "tangent_space": math.inf, "svd": math.inf}

    def fwd():
        with torch.no_grad():
            for _ in range(k):
                decoder(z)

    for _ in range(repeats):
        for key, fn in (("forward", fwd), ("jacobian", lambda: decoder_jacobian(decoder, z)),
                        ("tangent_space", lambda: tangent_space(decoder, z)),
                        ("svd", lambda: torch.linalg.svd(rows, full_matrices=False))):
            t0 = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t0)
    return best


def loadavg() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run: fewer images and backward passes")
    ap.add_argument("--k", type=int, default=10, help="latent dimension (default 10)")
    ap.add_argument("--n32", type=int, default=None, help="images for manifex at 32x32 (default 64; quick 16)")
    ap.add_argument("--seed-images", type=int, default=None,
                    help="images for the seed loop at 32x32 (default: all of --n32; quick 2)")
    ap.add_argument("--seed-budget", type=float, default=None,
                    help="seconds the 32x32 seed loop may take before it stops and extrapolates (default 180; quick 20)")
    ap.add_argument("--n256", type=int, default=None, help="images for manifex at 256x256 (default 64; quick 8)")
    ap.add_argument("--passes256", type=int, default=None,
                    help="backward passes timed for the seed loop at 256x256 (default 2000; quick 300)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats of manifex timings, median (default 3; quick 1)")
    ap.add_argument("--cost-images", type=int, default=64,
                    help="images for the cost-vs-forward-passes section at both sizes (default 64, also with --quick)")
    ap.add_argument("--cost-repeats", type=int, default=5,
                    help="interleaved runs for the cost-vs-forward-passes section; the minimum is reported (default 5)")
    ap.add_argument("--seed", type=int, default=0, help="torch seed for weights and latent codes")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for both methods (default: leave torch's default)")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    q = args.quick
    k = args.k
    n32 = args.n32 or (16 if q else 64)
    seed_images = min(args.seed_images or (2 if q else n32), n32)
    seed_budget = args.seed_budget if args.seed_budget is not None else (20.0 if q else 180.0)
    n256 = args.n256 or (8 if q else 64)
    passes256 = args.passes256 or (300 if q else 2000)
    repeats = args.repeats or (1 if q else 3)

    print("manifex tangent-space benchmark: forward-mode JVP + float64 Gram reduction vs the seed's per-pixel backward loop")
    print(f"python {platform.python_version()} | torch {torch.__version__} | numpy {np.__version__} | scipy {scipy.__version__}")
    print(f"torch threads: {torch.get_num_threads()} (intra-op, {'set by --threads' if args.threads is not None else 'torch default'}) | CPU cores: {os.cpu_count()} | "
          f"load average at start (1/5/15 min): {loadavg()}")
    print(f"decoder: VAE decoder k={k} -> 256 -> 256 -> 512 -> 32x4x4 -> 3x ConvTranspose2d -> sigmoid, "
          f"RANDOM INIT (torch.manual_seed({args.seed})), eval, float32; 256x256 = + bilinear F.interpolate")
    print(f"mode: {'quick' if q else 'full'} | manifex timings: median of {repeats} warm call(s)")
    try:
        if os.getloadavg()[0] > (os.cpu_count() or 1):
            print("WARNING: the CPU is busy with other processes (load > cores); timings are noisy, and oversubscribed "
                  "threads slow the seed loop's thousands of tiny passes more than manifex's few large ones.")
    except OSError:
        pass
    print()

    torch.manual_seed(args.seed)
    dec32, dec256 = make_decoders(k)
    z32 = torch.randn(n32, k)
    z256 = torch.randn(n256, k)

    rows: list[tuple[str, str, str, str, str, str]] = []

    # ---------------------------------------------------------------- 32x32
    d32 = 32 * 32
    # warm-up (first forward-mode call traces/initialises functorch; first backward allocates)
    t_cold, _ = timed(lambda: tangent_space(dec32, z32[:2]))
    seed_tangent_space(dec32, z32[0], max_pixels=32)

    seed_U, seed_rank, seed_times = [], [], []
    t_start = time.perf_counter()
    for i in range(seed_images):
        t0 = time.perf_counter()
        U, r, _, _ = seed_tangent_space(dec32, z32[i])
        seed_times.append(time.perf_counter() - t0)
        seed_U.append(U)
        seed_rank.append(r)
        if time.perf_counter() - t_start > seed_budget and i + 1 < seed_images:
            break
    n_seed_done = len(seed_times)
    seed32_per_image = sum(seed_times) / n_seed_done
    seed32_total = seed32_per_image * n32
    seed32_extrapolated = n_seed_done < n32

    t_mx32, T32 = timed(lambda: tangent_space(dec32, z32), repeats)
    mx32_per_image = t_mx32 / n32

    angles = []
    for i in range(n_seed_done):
        r = seed_rank[i]
        mine = T32.basis[i, : int(T32.rank[i])].reshape(int(T32.rank[i]), -1).T.double().numpy()
        angles.append(float(np.max(scipy.linalg.subspace_angles(seed_U[i][:, :r].astype(np.float64), mine))))
    ranks_agree = all(int(T32.rank[i]) == seed_rank[i] for i in range(n_seed_done))

    rows.append((
        "32x32", "seed loop (autograd.grad per pixel + orth)", f"{n_seed_done} measured",
        f"{d32:,}/image", fmt_s(seed32_per_image),
        fmt_s(seed32_total) + (f" (EXTRAPOLATED from {n_seed_done} to {n32} images)" if seed32_extrapolated else f" ({n32} images, measured)"),
    ))
    rows.append((
        "32x32", "manifex tangent_space (JVP + Gram)", f"{n32}", "0 (k JVP rows)", fmt_s(mx32_per_image),
        fmt_s(t_mx32) + f" ({n32} images, measured)",
    ))

    # ---------------------------------------------------------------- 256x256
    d256 = 256 * 256
    tangent_space(dec256, z256[:2])  # warm-up
    seed_tangent_space(dec256, z256[0], max_pixels=16)
    t0 = time.perf_counter()
    zz = z256[0].detach().clone().reshape(1, k).requires_grad_(True)
    x_flat = dec256(zz).view(-1)
    t_fwd = time.perf_counter() - t0
    J_partial = np.zeros((d256, k), dtype=np.float32)
    t0 = time.perf_counter()
    for i in range(passes256):
        (g,) = torch.autograd.grad(x_flat[i], zz, retain_graph=True)
        J_partial[i] = g.detach().cpu().numpy().ravel()
    t_passes = time.perf_counter() - t0
    per_pass = t_passes / passes256
    # orth of a full 65,536 x k Jacobian, measured (on the exact Jacobian from forward mode, as the seed would have it)
    J_full = decoder_jacobian(dec256, z256[:1])[0].reshape(k, -1).T.contiguous().numpy()
    t_orth, _ = timed(lambda: scipy.linalg.orth(J_full), 3)
    seed256_per_image = t_fwd + per_pass * d256 + t_orth
    # the rows the seed loop did compute agree with forward mode
    rel_err_256 = float(np.abs(J_partial[:passes256] - J_full[:passes256]).max() / max(np.abs(J_full[:passes256]).max(), 1e-30))

    t_mx256, T256 = timed(lambda: tangent_space(dec256, z256), repeats)
    mx256_per_image = t_mx256 / n256

    rows.append((
        "256x256", "seed loop (autograd.grad per pixel + orth)", "1 (partial)",
        f"{passes256:,} of {d256:,}", fmt_s(seed256_per_image) + " EXTRAPOLATED",
        f"{fmt_s(per_pass)}/pass x {d256:,} + fwd {fmt_s(t_fwd)} + orth {fmt_s(t_orth)} (orth measured)",
    ))
    rows.append((
        "256x256", "manifex tangent_space (JVP + Gram)", f"{n256}", "0 (k JVP rows)", fmt_s(mx256_per_image),
        fmt_s(t_mx256) + f" ({n256} images, measured)",
    ))

    # ---------------------------------------------------------------- projection + alignment
    g = torch.Generator().manual_seed(args.seed + 1)
    E32 = torch.randn(n32, 1, 32, 32, generator=g)
    E256 = torch.randn(n256, 1, 256, 256, generator=g)
    alignment(E32, T32), alignment(E256, T256)  # warm-up
    proj_reps = max(repeats, 5)
    t_al32, a32 = timed(lambda: alignment(E32, T32), proj_reps)
    t_de32, _ = timed(lambda: decompose(E32, T32), proj_reps)
    t_al256, a256 = timed(lambda: alignment(E256, T256), proj_reps)
    t_de256, _ = timed(lambda: decompose(E256, T256), proj_reps)
    rows.append(("32x32", "manifex alignment(E, T)", f"{n32}", "-", fmt_s(t_al32 / n32), fmt_s(t_al32)))
    rows.append(("32x32", "manifex decompose(E, T) (projection)", f"{n32}", "-", fmt_s(t_de32 / n32), fmt_s(t_de32)))
    rows.append(("256x256", "manifex alignment(E, T)", f"{n256}", "-", fmt_s(t_al256 / n256), fmt_s(t_al256)))
    rows.append(("256x256", "manifex decompose(E, T) (projection)", f"{n256}", "-", fmt_s(t_de256 / n256), fmt_s(t_de256)))

    # ---------------------------------------------------------------- print
    header = ("resolution", "method", "images", "backward passes", "per image", "total")
    widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print()
    ratio32 = seed32_per_image / mx32_per_image
    ratio256 = seed256_per_image / mx256_per_image
    print("speed-up per image (seed time / manifex time):")
    print(f"  32x32   : {ratio32:,.0f}x   (goal >= 100x: {'MET' if ratio32 >= 100 else 'NOT MET'})"
          + (f"   [seed time measured on {n_seed_done} image(s), extrapolated linearly to {n32}]" if seed32_extrapolated
             else f"   [seed time measured on all {n32} images]"))
    print(f"  256x256 : {ratio256:,.0f}x   (goal >= 1000x: {'MET' if ratio256 >= 1000 else 'NOT MET'})"
          f"   [seed time EXTRAPOLATED from {passes256:,} timed backward passes to {d256:,}]")
    print(f"  manifex first (cold) call, 2 images at 32x32, incl. one-time functorch set-up: {fmt_s(t_cold)}")
    print()
    print("agreement (32x32, images where the seed loop ran fully):")
    print(f"  images compared: {n_seed_done} | ranks equal: {ranks_agree} (seed ranks {sorted(set(seed_rank))}, "
          f"manifex ranks {sorted(set(T32.rank[:n_seed_done].tolist()))})")
    print(f"  max principal angle seed vs manifex: {max(angles):.2e} rad (float32)")
    print(f"agreement (256x256, the {passes256:,} Jacobian rows the seed loop computed): max relative difference "
          f"{rel_err_256:.2e}")
    print(f"mean alignment of random Gaussian E: 32x32 {float(a32.mean()):.4f} (exact mean random_baseline {random_baseline(k, d32):.4f}; "
          f"RMS sqrt(k/d) {np.sqrt(k / d32):.4f}), 256x256 {float(a256.mean()):.5f} (exact mean {random_baseline(k, d256):.5f}; "
          f"RMS {np.sqrt(k / d256):.5f})")
    print()
    cost_reps = args.cost_repeats
    zc = torch.randn(args.cost_images, k, generator=torch.Generator().manual_seed(args.seed + 2))
    print(f"cost relative to k = {k} batched forward passes of the decoder (minimum of {cost_reps} interleaved runs; "
          f"load average now {loadavg()}):")
    for label, dec, z in (("32x32", dec32, zc), ("256x256", dec256, zc)):
        c = cost_vs_forward(dec, z, cost_reps)
        f = c["forward"]
        ratio = c["tangent_space"] / f
        print(f"  {label:8s}({z.shape[0]} images): k forward passes {fmt_s(f)} | tangent_space {fmt_s(c['tangent_space'])} = "
              f"{ratio:.2f}x (goal <= 2x: {'MET' if ratio <= 2 else 'NOT MET'}) | of which Jacobian (k JVPs) {fmt_s(c['jacobian'])} "
              f"= {c['jacobian'] / f:.2f}x, Gram reduction + basis {fmt_s(max(c['tangent_space'] - c['jacobian'], 0.0))} "
              f"| a batched SVD of the same Jacobians alone: {fmt_s(c['svd'])} = {c['svd'] / f:.2f}x")
    print(f"load average at end (1/5/15 min): {loadavg()}")


if __name__ == "__main__":
    main()
