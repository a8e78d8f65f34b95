"""Scale of the concepts pipeline: a ResNet-50-shaped network at layer4, extrapolated to 1000 classes × 50 images.

The research (Herdt & Otero Baguer; github.com/rherdt185/concept-based-explanations-and-class-contrasting,
``example_nmf_decomp_imagenet.py`` → ``core/core.py``) loops over the 1000 ImageNet classes one at a time:
a DataLoader of batch 1, Captum ``NoiseTunnel(LayerDeepLift)`` with ``nt_samples_batch_size=1`` (σ = 0.25,
baseline 1.0; 20 samples on a GPU, 5 on the CPU), the layer's activations, mean(ReLU(attribution)) ×
activation and one scikit-learn ``NMF(6)`` per class — about a GPU-day per model and layer. This script times,
in one run and on the same images:

- **research loop** (``bench_concepts.research_loop``, the same reimplementation as ``bench_concepts.py``) on
  ``--research-classes`` classes: relevance + activations + NMF per class;
- **manifex**: ``class_concepts`` for all ``--classes`` classes (relevance batched over images × noise samples,
  one batched NMF for every class), then ``concept_prototypes`` (top-8 crops of every concept over the pool of
  all the classes' images).

The network is built here (torchvision is not a dependency): ResNet-50's bottleneck layout [3, 4, 6, 3] with
expansion 4, base width ``--width`` (64 = ResNet-50: 25.6 M parameters, layer4 2048 × 7 × 7 on 224²),
random init, eval mode. Random weights are fine for timing: the work per image does not depend on them.
Images are uniform noise; each class's images are labelled as that class (labels stand in for predictions
so both sides explain the same images).

Extrapolation to 1000 classes × 50 images: per class, the research loop's time and manifex's relevance + NMF
time scale with the images per class (× 50 / ``--images``) and with the classes (× 1000); prototypes are a
forward pass over the pool plus a cosine search, extrapolated per image (× 50,000 / pool size), which holds
while the forward pass dominates — the search itself grows with pool × concepts (classes²) and is not timed
apart, so the prototypes' share of the extrapolation is a lower bound. The ratio is research / manifex per class at the measured size.

Measured (2 shared CPU cores, load average 4, one thread; docs/guide/concepts.rst): 5.1× at the
default (width 16, 112², 4 classes × 4 images), 0.8× at width 32, 128², 8 × 8 (there the convolutions, not the
per-call overhead that batching removes, are the cost, and ``batch_size=64`` took 23 s against 15 s at 8).

    PYTHONPATH=src python benchmarks/bench_concepts_scale.py                        # small CPU configuration (~15 s)
    PYTHONPATH=src python benchmarks/bench_concepts_scale.py --width 64 --size 224 --classes 8 --images 50 \\
        --samples 20 --device cuda                                                 # the full-size figure on a GPU
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_concepts import research_loop  # noqa: E402  (the same research reimplementation)

from manifex.concepts import class_concepts, concept_prototypes  # noqa: E402


class Bottleneck(nn.Module):
    """ResNet-50's bottleneck (1×1, 3×3 with the stride, 1×1 × 4) with its own ReLU modules: Captum's DeepLift
    hooks each ReLU module, so none is reused."""

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = 4 * width
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(width), nn.ReLU()
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu3 = nn.ReLU()

    def forward(self, x):
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu3(y + (x if self.down is None else self.down(x)))


class ResNet50(nn.Module):
    def __init__(self, width: int = 64, classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        cin, stages = width, []
        for i, (blocks, stride) in enumerate(zip((3, 4, 6, 3), (1, 2, 2, 2))):
            w = width * 2**i
            layer = []
            for j in range(blocks):
                layer.append(Bottleneck(cin, w, stride if j == 0 else 1))
                cin = 4 * w
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(cin, classes)

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.pool(x).flatten(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=16, help="base width (64 = ResNet-50)")
    ap.add_argument("--size", type=int, default=112, help="image side (224 = ImageNet)")
    ap.add_argument("--classes", type=int, default=4, help="classes for manifex (batched)")
    ap.add_argument("--research-classes", type=int, default=1, help="classes timed with the research loop")
    ap.add_argument("--images", type=int, default=4, help="images per class")
    ap.add_argument("--samples", type=int, default=5, help="noise samples (the research: 5 on CPU, 20 on GPU)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and BLAS threads (on a shared 2-core machine two threads thrash: 12.9 s against 1.6 s)")
    ap.add_argument("--batch-size", type=int, default=64, help="class_concepts' batch_size (its default: 64)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    import sklearn.decomposition  # noqa: F401  (loads scikit-learn's BLAS now: threadpool_limits limits only
    from threadpoolctl import threadpool_limits  # the libraries loaded when it is entered)

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    with threadpool_limits(limits=args.threads):
        run(args)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(args) -> None:
    torch.manual_seed(0)
    dev = args.device
    model = ResNet50(args.width).eval().to(dev)
    n_par = sum(p.numel() for p in model.parameters())
    C, N = args.classes, args.images
    g = torch.Generator().manual_seed(0)
    x = torch.rand(C * N, 3, args.size, args.size, generator=g).to(dev)
    labels = torch.arange(C).repeat_interleave(N).to(dev)
    with torch.no_grad():
        a = model.layer4(model.layer3(model.layer2(model.layer1(model.stem(x[:1])))))
    print(f"ResNet-50 layout, width {args.width} ({n_par / 1e6:.1f} M parameters), {args.size}² images, layer4 "
          f"{a.shape[1]}×{a.shape[2]}×{a.shape[3]}; {C} classes × {N} images, {args.samples} noise samples; "
          f"{args.threads} threads, {dev}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    sigma, baseline = 0.25, 1.0  # the research's stdevs and baselines

    R = min(args.research_classes, C)
    _sync(dev)
    t = time.perf_counter()
    for c in range(R):
        research_loop(model, model.layer4, x[labels == c], c, samples=args.samples, sigma=sigma, baseline=baseline)
    _sync(dev)
    t_ref = (time.perf_counter() - t) / R

    t = time.perf_counter()
    basis = class_concepts(model, x, "layer4", classes=list(range(C)), images_per_class=N, predictions=labels,
                           batch_size=args.batch_size,
                           relevance_options={"n_samples": args.samples, "sigma": sigma, "baseline": baseline})
    _sync(dev)
    t_basis = time.perf_counter() - t
    t = time.perf_counter()
    protos = concept_prototypes(model, x, basis, top_k=8, predictions=labels)
    _sync(dev)
    t_proto = time.perf_counter() - t
    assert protos.scores.shape[:2] == basis.vectors.shape[:2]

    per_class = t_basis / len(basis.classes)
    scale_img = 50 / N
    hours = lambda s: s / 3600  # noqa: E731
    ref_1000 = t_ref * scale_img * 1000
    mx_1000 = per_class * scale_img * 1000 + t_proto * 50_000 / (C * N)
    print(f"research loop (relevance + NMF), per class: {t_ref:.2f} s  [{R} class(es) timed]")
    print(f"manifex class_concepts, per class: {per_class:.2f} s  [{len(basis.classes)} classes batched; "
          f"skipped {len(basis.skipped)}]; concept_prototypes over {C * N} images: {t_proto:.2f} s")
    print(f"ratio research / manifex (relevance + NMF, per class): {t_ref / per_class:.1f}×")
    print(f"extrapolated to 1000 classes × 50 images: research loop {hours(ref_1000):.1f} h (relevance + NMF only), "
          f"manifex {hours(mx_1000):.1f} h (relevance + NMF + prototypes)")


if __name__ == "__main__":
    main()
