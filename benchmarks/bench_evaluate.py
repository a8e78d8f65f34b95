"""The metrics manifex computes itself, against Quantus 0.6 on the same model, data and attributions, at batch 64.

Today one: PixelFlipping (black baseline), which manifex runs batched over the steps
(``manifex.evaluation.pixel_flipping``; ``evaluate(metrics=["PixelFlipping"])`` uses it). For each setting it
prints Quantus's time, manifex's time, the ratio, the largest difference of the curves (the test holds it to
1e-5), and the floor: the forward passes the metric needs (every perturbed image once, in the same passes,
with the perturbed images built beforehand), i.e. the cost of the model alone.

Settings: LeNet on 8×8 digits (64 features, 64 steps), on 32×32 images (1024 features: 64 steps with
``features_in_step=16``) and 16×16 (256 features, 64 steps with 4), random weights (speed does not depend on training), float32.
Times are the median of ``--repeats`` warm calls, Quantus and manifex interleaved; noisy on a shared CPU.

    PYTHONPATH=src python benchmarks/bench_evaluate.py [--repeats 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import numpy as np
import torch

try:
    import manifex  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from manifex.evaluation import explain_func, import_quantus, pixel_flipping
from manifex.evaluation.manifold import PIXEL_BUDGET
from manifex.models.classifiers import ClassifierConfig, build_classifier


def _floor(model, x, a, step: int) -> float:
    """The forward passes alone: every perturbed image of the curve, built beforehand, in the same passes as
    manifex's (as many steps per pass as fit ``PIXEL_BUDGET`` input values)."""
    n, d = x.shape[0], int(np.prod(x.shape[1:]))
    order = np.argsort(-a.reshape(n, -1), axis=1)
    rank = np.empty_like(order)
    rank[np.arange(n)[:, None], order] = np.arange(d)[None]
    k = torch.from_numpy(rank // step).reshape(x.shape)
    steps = d // step
    xt = torch.from_numpy(x)
    mins = xt.reshape(n, -1).amin(1).view(n, 1, 1, 1)
    per = max(1, PIXEL_BUDGET // (n * d))
    batches = [torch.where(k.unsqueeze(0) <= torch.arange(s, min(steps, s + per)).view(-1, 1, 1, 1, 1), mins, xt)
               .reshape(-1, *x.shape[1:]) for s in range(0, steps, per)]
    t = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            torch.softmax(model(b), 1)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    quantus = import_quantus()
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, quantus {quantus.__version__}, {args.threads} thread(s), batch 64, float32")
    print(f"{'setting':38s} {'quantus s':>10s} {'manifex s':>10s} {'ratio':>7s} {'floor s':>8s} {'×floor':>7s} {'max |Δ|':>9s}")
    for size, step in ((8, 1), (16, 4), (32, 16)):
        torch.manual_seed(0)
        model = build_classifier(ClassifierConfig("lenet", (1, size, size), 10)).eval()
        x = torch.rand(64, 1, size, size).numpy()
        y = np.arange(64) % 10
        a = explain_func(model, x, y, method="gradient")
        metric = quantus.PixelFlipping(features_in_step=step, disable_warnings=True)
        run_q = lambda: metric(model=model, x_batch=x, y_batch=y, a_batch=a, channel_first=True)  # noqa: E731
        run_m = lambda: pixel_flipping(model, x, y, a, features_in_step=step)  # noqa: E731
        ref, ours = run_q(), run_m()  # warm-up
        # interleaved, so that a load that changes during the run weighs on both alike
        times: dict[str, list[float]] = {"q": [], "m": [], "f": []}
        for _ in range(args.repeats):
            for key, fn in (("q", run_q), ("m", run_m)):
                t = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t)
            times["f"].append(_floor(model, x, a, step))
        tq, tm, floor = (statistics.median(times[k]) for k in ("q", "m", "f"))
        diff = float(np.abs(np.asarray(ref) - ours.numpy()).max())
        name = f"PixelFlipping LeNet {size}x{size}, step {step} ({size * size // step} steps)"
        print(f"{name:38s} {tq:10.3f} {tm:10.3f} {tq / tm:6.1f}× {floor:8.3f} {tm / floor:6.2f}× {diff:9.1e}")


if __name__ == "__main__":
    main()
