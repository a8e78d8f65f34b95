"""The two γ rules of LRP (``Gamma(mode="sign_aware")``, the default, and ``mode="textbook"``), side by side.

Prints, for both variants in one run:

1. the one-layer example of issue 10 (x = [1, 1], w = [1, −1.2], b = 0, γ = 0.2; logit −0.2);
2. on small residual nets (``SmallResNet((1, 8, 8), 5, widths=(4, 6))``, random init, BatchNorm with random
   running variance and scale but zero mean and shift, zero biases, float64; 16 inputs uniform in [0, 1],
   targets 0–4) explained with the ε-γ-box preset and zero stabilisers (so LRP is exactly conservative):
   Σ|R| / Σ|logit| over the batch, the worst example's Σ|R| / |logit| and the conservation error
   max |Σ R − logit|, for seeds 0–5, with LRP-0 (γ = 0) for reference;
3. the cost: LRP with γ on every Linear/Conv layer of LeNet and SmallVGG (batch 64, float32), sign-aware
   time / textbook time (median of ``--repeats`` warm calls; noisy on a shared CPU).

    PYTHONPATH=src python benchmarks/bench_gamma.py [--seeds 6] [--repeats 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

try:
    import manifex  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from manifex.attribution.lrp import (
    AVGPOOL_TYPES, LRP, BatchNormFolding, Composite, EpsilonGammaBox, Gamma, Norm, ResidualSum,
)
from manifex.models import LeNet, SmallVGG
from manifex.models.classifiers import SmallResNet

F64 = torch.float64


def example() -> None:
    layer = nn.Linear(2, 1).to(F64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1.2]], dtype=F64))
        layer.bias.zero_()
    x = torch.ones(1, 2, dtype=F64)
    print("one layer, x = [1, 1], w = [1, -1.2], b = 0, gamma = 0.2, logit", f"{layer(x).item():.4f}")
    for mode in ("textbook", "sign_aware"):
        r = LRP(layer, Composite.uniform(Gamma(0.2, mode=mode)), canonizers=())(x, 0)[0]
        print(f"  {mode:10s} R = [{r[0].item():.6g}, {r[1].item():.6g}]   sum {r.sum().item():.6g}")


def residual_net(seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = SmallResNet((1, 8, 8), 5, widths=(4, 6)).to(F64).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g, dtype=F64))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g, dtype=F64))
        model.head[-1].bias.zero_()
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return model, x, torch.arange(16) % 5


def residual() -> None:
    print("\nSmallResNet, eps-gamma-box, bias-free, zero stabilisers: sum|R| / sum|logit| (worst example) "
          "and max|sum R - logit|")
    print(f"{'seed':>4s}  {'LRP-0':>22s}  {'textbook':>26s}  {'sign_aware':>26s}")
    for seed in range(ARGS.seeds):
        model, x, target = residual_net(seed)
        with torch.no_grad():
            z = model(x).gather(1, target[:, None]).squeeze(1)
        cells = []
        for options in (dict(gamma=0.0), dict(gamma_mode="textbook"), dict()):
            composite = EpsilonGammaBox(0.0, 1.0, epsilon=0.0, stabilizer=0.0, **options)
            composite.rules.insert(0, (AVGPOOL_TYPES, Norm(0.0)))
            r = LRP(model, composite, canonizers=[BatchNormFolding(), ResidualSum(stabilizer=0.0)])(x, target)
            per = r.flatten(1)
            ratio = float(per.abs().sum() / z.abs().sum())
            worst = float((per.abs().sum(1) / z.abs()).max())
            err = float((per.sum(1) - z).abs().max())
            cells.append(f"{ratio:6.2f} ({worst:8.3g}) {err:7.1e}")
        print(f"{seed:4d}  {cells[0]:>22s}  {cells[1]:>26s}  {cells[2]:>26s}")


def median_time(fn) -> float:
    fn()
    times = []
    for _ in range(ARGS.repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cost() -> None:
    print("\nLRP with gamma on every Linear/Conv layer, batch 64, float32 (timings noisy on a shared CPU)")
    for cls in (LeNet, SmallVGG):
        torch.manual_seed(0)
        model = cls((1, 32, 32), 10).eval()
        x, y = torch.rand(64, 1, 32, 32), torch.arange(64) % 10
        t = {mode: median_time(lambda m=mode: LRP(model, Composite.uniform(Gamma(0.25, mode=m)))(x, y))
             for mode in ("textbook", "sign_aware")}
        print(f"  {cls.__name__:8s} textbook {t['textbook']:.3f} s  sign_aware {t['sign_aware']:.3f} s  "
              f"ratio {t['sign_aware'] / t['textbook']:.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ARGS = ap.parse_args()
    torch.set_num_threads(ARGS.threads)
    print(f"torch {torch.__version__} | threads {torch.get_num_threads()}")
    example()
    residual()
    cost()
