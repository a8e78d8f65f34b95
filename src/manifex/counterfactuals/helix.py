"""The research's toy experiment: counterfactuals on a helix, where the data manifold is known exactly.

Data x = (sin t, cos t, t), t ~ U(−4, 4), label [x₃ > 0] (:mod:`manifex.data.toy`). A RealNVP vector flow
(:func:`manifex.models.generator_zoo.get_helix_flow`, the zoo's fixed documented schedule) models the data; an MLP
3-256-1 with a sigmoid output classifies it (research: Adam 1e-4, 3000 steps of 500 fresh helix points, BCE).
For each of 100 test points the output is pushed past 0.9 (if it was < 0.5) or below 0.1 (otherwise), by Adam
with lr 3e-2 for ≤ 1000 steps, once in the flow's latent space and once in data space; the metric is the
exact distance of the result to the helix. The loss is ∓ f (the research's regression loss); the notebook
used (f − τ)², whose gradient differs only by the positive factor 2|f − τ| that Adam largely normalises away.

The flow's Jacobian J = ∂decode/∂z (3 × 3) at the data has one large singular value (along the curve) and
two small ones: :func:`run_helix` reports the spectrum and how often the gap estimate of the dimension is 1.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ..attribution.core import preserve_model_state
from ..data.toy import distance_to_helix, helix
from ..geometry.spectrum import generator_spectrum
from ..models import ModelCache, cache_key
from .ascent import counterfactual

__all__ = ["HelixConfig", "run_helix", "helix_classifier"]


@dataclass(frozen=True)
class HelixConfig:
    """The helix experiment's settings (defaults: the research's, except the flow schedule, see flow_epochs)."""

    n: int = 100
    lr: float = 3e-2
    max_steps: int = 1000
    high: float = 0.9
    low: float = 0.1
    flow_epochs: int | None = None  # None: the zoo's documented schedule (get_helix_flow)
    classifier_steps: int = 3000
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def helix_classifier(steps: int = 3000, seed: int = 0, *, cache: ModelCache | None = None) -> nn.Module:
    """The research's helix classifier: MLP 3-256-1 with a sigmoid, Adam 1e-4, ``steps`` batches of 500 fresh points."""
    key = cache_key({"arch": "helix-mlp-3-256-1", "steps": steps, "seed": seed})
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 256), nn.ReLU(), nn.Linear(256, 1), nn.Sigmoid())
    hit = cache.load("classifier-helix", key) if cache is not None else None
    if hit is not None:
        model.load_state_dict(hit["state_dict"])
        return model.eval()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    for i in range(steps):
        x, y = helix(500, seed=seed * 1_000_003 + i + 1)
        opt.zero_grad()
        nn.functional.binary_cross_entropy(model(x)[:, 0], y.float()).backward()
        opt.step()
    if cache is not None:
        cache.save("classifier-helix", key, {"state_dict": model.state_dict(), "info": {"steps": steps}})
    return model.eval()


def run_helix(cfg: HelixConfig = HelixConfig(), *, cache: ModelCache | None = None, progress: bool = True) -> dict:
    """Run the helix experiment; returns per-point records, a summary and the tensors for the figures."""
    from ..models.generator_zoo import HELIX_FLOW_EPOCHS, HELIX_TRAIN_POINTS, get_helix_flow
    from ..models.generators import as_generator

    t_start = time.perf_counter()
    flow, flow_info = get_helix_flow(epochs=cfg.flow_epochs or HELIX_FLOW_EPOCHS, seed=cfg.seed, cache=cache, progress=progress)
    gen = as_generator(flow)
    clf = helix_classifier(cfg.classifier_steps, cfg.seed, cache=cache)
    x, y = helix(cfg.n, seed=cfg.seed + 12345)
    with torch.no_grad(), preserve_model_state(clf):
        p = clf.eval()(x)[:, 0]
    accuracy = float(((p > 0.5).long() == y).float().mean())
    direction = ["max" if v < 0.5 else "min" for v in p.tolist()]
    stop = torch.tensor([cfg.high if d == "max" else cfg.low for d in direction])
    results, dists = {}, {}
    for space in ("latent", "pixel"):
        r = counterfactual(clf, x, objective="output", stop_value=stop, direction=direction, space=space,
                           generator=gen if space == "latent" else None, box=None, lr=cfg.lr, max_steps=cfg.max_steps,
                           progress=progress)
        results[space], dists[space] = r, distance_to_helix(r.x_cf)
    spec = generator_spectrum(gen, gen.encode(x))
    s = spec.singular_values.double()
    summary: dict = {"classifier_accuracy": accuracy, "n": cfg.n}
    for space, r in results.items():
        ok = r.success & ~r.already
        d = dists[space][ok.cpu()]
        summary[space] = {
            "success_rate": float(ok.float().sum() / max(1, int((~r.already).sum()))),
            "distance_median": float(d.median()) if d.numel() else None,
            "distance_mean": float(d.mean()) if d.numel() else None,
            "steps_median": float(r.steps[ok].float().median()) if bool(ok.any()) else None,
        }
    lat, pix = summary["latent"]["distance_median"], summary["pixel"]["distance_median"]
    summary["distance_ratio_median"] = lat / pix if lat is not None and pix else None
    summary["spectrum"] = {
        "singular_values_median": np.median(s.numpy(), axis=0).tolist(),
        "ratio_s1_s2_median": float((s[:, 0] / s[:, 1]).median()),
        "dimension_is_1_fraction": float((spec.dimension == 1).float().mean()),
        "dimension_counts": {int(k): int(v) for k, v in zip(*np.unique(spec.dimension.numpy(), return_counts=True))},
    }
    summary["flow"] = {"epochs": cfg.flow_epochs or HELIX_FLOW_EPOCHS, "steps_per_epoch": -(-HELIX_TRAIN_POINTS // 128),
                       "nll_history": flow_info.get("history"), "cached": flow_info.get("cached"),
                       "train_seconds": flow_info.get("train_seconds")}
    summary["seconds"] = time.perf_counter() - t_start
    records = []
    for i in range(cfg.n):
        rec = {"id": f"helix{i:04d}", "x": x[i].tolist(), "label": int(y[i]), "p": float(p[i]), "direction": direction[i]}
        for space, r in results.items():
            rec[space] = {"success": bool(r.success[i]), "already": bool(r.already[i]), "steps": int(r.steps[i]),
                          "value": float(r.p_target[i]), "x_cf": r.x_cf[i].tolist(), "distance": float(dists[space][i])}
        rec["singular_values"] = s[i].tolist()
        rec["dimension"] = int(spec.dimension[i])
        records.append(rec)
    return {"records": records, "summary": summary, "config": cfg.to_dict(), "results": results, "distances": dists,
            "spectrum": spec, "x": x, "y": y}
