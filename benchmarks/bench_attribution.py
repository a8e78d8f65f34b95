"""Benchmark: manifex explainers against Captum 0.9 on the same model and batch, in one run.

Models: the seed's LeNet (1×32×32, 10 classes) and a VGG-style net (SmallVGG, 3×32×32), random init,
eval mode, float32, batch 64. Methods: Gradient (Captum Saliency, abs=False), Integrated Gradients (50
Gauss-Legendre steps), SmoothGrad (25 samples over the gradient), and LRP with an ε-γ composite
(γ = 0.25 on conv, ε on linear layers, the same rules in Captum). Each timing is the median of
``--repeats`` warm calls; the ratio is manifex time / Captum time (≤ 1.0: manifex is no slower).
The results are also checked to agree (max abs difference printed).

    PYTHONPATH=src python benchmarks/bench_attribution.py [--repeats 5] [--batch 64] [--threads N]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

try:
    import manifex  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import warnings

from captum import attr as cattr

from manifex.attribution import Gradient, IntegratedGradients, SmoothGrad
from manifex.models import LeNet, SmallVGG


def median_time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


class _FlattenInForward(torch.nn.Module):
    """The same network with the flatten done in forward: Captum's LRP cannot hook an nn.Flatten module."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.features = net.features
        self.head = torch.nn.Sequential(*list(net.classifier)[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _captum_compatible(net: torch.nn.Module) -> torch.nn.Module:
    return _FlattenInForward(net).eval()


def cases(model, x, y, internal: int):
    """(name, manifex callable, captum callable) triples on the same model and batch."""

    def sg_manifex():
        sg = SmoothGrad(Gradient(model), sigma=0.1, n_samples=25, internal_batch_size=internal)
        return sg(x, y)

    def sg_captum():
        nt = cattr.NoiseTunnel(cattr.Saliency(model))
        return nt.attribute(x, nt_type="smoothgrad", nt_samples=25, stdevs=0.1, target=y, abs=False,
                            nt_samples_batch_size=max(1, internal // len(x)))

    yield ("gradient", lambda: Gradient(model)(x, y), lambda: cattr.Saliency(model).attribute(x, target=y, abs=False), True)
    yield ("integrated_gradients-50",
           lambda: IntegratedGradients(model, steps=50, internal_batch_size=internal)(x, y),
           lambda: cattr.IntegratedGradients(model).attribute(x, target=y, n_steps=50, internal_batch_size=internal), True)
    yield ("smoothgrad-25", sg_manifex, sg_captum, False)  # different noise draws: compare timings only
    # LRP with the same rules in both libraries: textbook γ = 0.25 on conv layers (bias kept, Captum's convention),
    # ε = 1e-6 on linear layers; the relevance maps are compared too.
    from captum.attr._utils.lrp_rules import EpsilonRule, GammaRule

    from manifex.attribution import LRP, Composite
    from manifex.attribution.lrp import Epsilon, Gamma

    textbook_gamma = Gamma(0.25, bias="keep", mode="textbook")
    composite = Composite([(torch.nn.Conv2d, textbook_gamma), (torch.nn.Linear, Epsilon(1e-6))])
    lrp = LRP(model, composite, canonizers=())
    ref = _captum_compatible(copy.deepcopy(model))  # Captum's LRP sets attributes on the modules it explains
    for m in ref.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.rule = GammaRule(gamma=0.25)
        elif isinstance(m, torch.nn.Linear):
            m.rule = EpsilonRule(epsilon=1e-6)
    # Captum applies ε to max-pooling outputs, manifex passes the gradient (winner takes all): maps differ
    yield ("lrp-epsilon-gamma", lambda: lrp(x, y), lambda: cattr.LRP(ref).attribute(x, target=y), False)


def main() -> None:
    warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--internal-batch", type=int, default=640, help="rows per forward for IG / SmoothGrad (both libraries)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__} | threads {torch.get_num_threads()} | device {args.device} | batch {args.batch}")
    print(f"{'model':8s} {'method':26s} {'manifex':>10s} {'captum':>10s} {'ratio':>7s} {'max|diff|':>10s}")
    g = torch.Generator().manual_seed(0)
    for name, model, shape in (("lenet", LeNet((1, 32, 32)), (1, 32, 32)), ("vgg", SmallVGG((3, 32, 32)), (3, 32, 32))):
        torch.manual_seed(0)
        model = model.to(args.device).eval()
        x = torch.rand((args.batch, *shape), generator=g).to(args.device)
        y = torch.randint(0, 10, (args.batch,), generator=g).to(args.device)
        for method, ours, theirs, comparable in cases(model, x, y, args.internal_batch):
            t_ours, a = median_time(ours, args.repeats)
            t_theirs, b = median_time(theirs, args.repeats)
            diff = f"{float((a - b).abs().max()):.1e}" if comparable else "n/a"
            print(f"{name:8s} {method:26s} {t_ours * 1e3:8.1f}ms {t_theirs * 1e3:8.1f}ms {t_ours / t_theirs:7.2f} {diff:>10s}")


if __name__ == "__main__":
    main()
