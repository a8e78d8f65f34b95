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

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..attribution.core import preserve_model_state
from ..data.toy import distance_to_helix, helix
from ..errors import InputError
from ..experiment.config import setting
from ..geometry.spectrum import generator_spectrum
from ..models import ModelCache, cache_key
from .ascent import counterfactual

__all__ = ["HelixConfig", "run_helix", "helix_classifier", "helix_points", "helix_summary", "check_helix_config"]


@dataclass(frozen=True)
class HelixConfig:
    """The helix experiment's settings (defaults: the research's, except the flow schedule, see flow_epochs). The CLI
    sets n, max_steps, flow_epochs (``--generator-epochs``) and seed through ``manifex counterfactual --dataset helix``."""

    n: int = setting(100, "Test points on the helix.", cli=False)
    lr: float = setting(3e-2, "Adam lr of both searches (research: 3e-2).", cli=False)
    max_steps: int = setting(1000, "Step budget per point.", cli=False)
    high: float = setting(0.9, "Push f above this when it starts below 0.5.", cli=False)
    low: float = setting(0.1, "Push f below this when it starts at or above 0.5.", cli=False)
    flow_epochs: int | None = setting(None, "Flow epochs (None: the zoo's documented schedule, get_helix_flow).", cli=False)
    classifier_steps: int = setting(3000, "Training batches of the MLP (500 fresh points each).", cli=False)
    seed: int = setting(0, "Seed of the points, the flow and the classifier.", cli=False)

    def to_dict(self) -> dict:
        return asdict(self)


def check_helix_config(cfg: HelixConfig) -> None:
    """Refuse impossible settings (one line each) before anything is trained."""
    for name in ("n", "max_steps", "classifier_steps"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            raise InputError(f"HelixConfig.{name} must be an integer >= 1, got {getattr(cfg, name)!r}.")
    if cfg.flow_epochs is not None and (not isinstance(cfg.flow_epochs, int) or cfg.flow_epochs < 1):
        raise InputError(f"HelixConfig.flow_epochs must be None or an integer >= 1, got {cfg.flow_epochs!r}.")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise InputError(f"HelixConfig.lr must be a finite number > 0, got {cfg.lr!r}.")
    if not 0 < cfg.low < 0.5 <= cfg.high < 1:
        raise InputError(f"HelixConfig needs 0 < low < 0.5 <= high < 1 (the classifier's output is a probability), got "
                         f"low={cfg.low!r}, high={cfg.high!r}.")


def helix_points(cfg: HelixConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The experiment's test points x (n, 3) and labels y (n,): seeded by ``cfg.seed``."""
    return helix(cfg.n, seed=cfg.seed + 12345)


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


def helix_models(cfg: HelixConfig, *, cache: ModelCache | None = None, progress: bool = True):
    """(generator, flow_info): the zoo's helix flow (trained or reused from the cache) as a generator."""
    from ..models.generator_zoo import HELIX_FLOW_EPOCHS, get_helix_flow
    from ..models.generators import as_generator

    flow, flow_info = get_helix_flow(epochs=cfg.flow_epochs or HELIX_FLOW_EPOCHS, seed=cfg.seed, cache=cache, progress=progress)
    return as_generator(flow), flow_info


def helix_directions(clf: nn.Module, x: torch.Tensor, cfg: HelixConfig) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """(p, direction, stop): the classifier's output f(x), "max" where f < 0.5 (push past ``high``) else "min"
    (push below ``low``), and the stop value of each point. The model is left as found."""
    with torch.no_grad(), preserve_model_state(clf):
        p = clf.eval()(x)[:, 0]
    direction = ["max" if v < 0.5 else "min" for v in p.tolist()]
    stop = torch.tensor([cfg.high if d == "max" else cfg.low for d in direction])
    return p, direction, stop


def helix_search(clf: nn.Module, gen, x: torch.Tensor, direction: list[str], stop: torch.Tensor, cfg: HelixConfig, *,
                 progress: bool = True) -> tuple[dict, dict, Any]:
    """Both searches on the points ``x`` (one batch) and the flow's spectrum at them: (results per space, exact
    distances to the helix per space, the spectrum)."""
    results, dists = {}, {}
    for space in ("latent", "pixel"):
        r = counterfactual(clf, x, objective="output", stop_value=stop, direction=direction, space=space,
                           generator=gen if space == "latent" else None, box=None, lr=cfg.lr, max_steps=cfg.max_steps,
                           progress=progress)
        results[space], dists[space] = r, distance_to_helix(r.x_cf)
    spec = generator_spectrum(gen, gen.encode(x))
    return results, dists, spec


def helix_records(ids: list[str], x: torch.Tensor, y: torch.Tensor, p: torch.Tensor, direction: list[str], results: dict,
                  dists: dict, spec) -> list[dict]:
    """One JSON record per point: its label, f(x), the direction, each space's outcome and x′, and the spectrum."""
    s = spec.singular_values.double()
    records = []
    for i, uid in enumerate(ids):
        rec = {"id": uid, "x": x[i].tolist(), "label": int(y[i]), "p": float(p[i]), "direction": direction[i]}
        for space, r in results.items():
            rec[space] = {"success": bool(r.success[i]), "already": bool(r.already[i]), "steps": int(r.steps[i]),
                          "value": float(r.p_target[i]), "x_cf": r.x_cf[i].tolist(), "distance": float(dists[space][i])}
        rec["singular_values"] = s[i].tolist()
        rec["dimension"] = int(spec.dimension[i])
        records.append(rec)
    return records


def process_points(units: list, ctx: dict, out_dir) -> list[dict]:
    """The helix points of one batch (run_units' process): both searches, the spectrum, one record per point."""
    index = torch.tensor([u.payload["index"] for u in units])
    x, y, p = ctx["x"][index], ctx["y"][index], ctx["p"][index]
    direction = [ctx["direction"][int(i)] for i in index]
    results, dists, spec = helix_search(ctx["classifier"], ctx["generator"], x, direction, ctx["stop"][index], ctx["config"],
                                        progress=bool(ctx.get("progress")))
    return helix_records([u.id for u in units], x, y, p, direction, results, dists, spec)


def helix_summary(records: list[dict], cfg: HelixConfig, accuracy: float, flow_info: dict) -> dict:
    """The experiment's summary from its records: success, distances to the helix and steps per space (over the
    points that needed a search and reached their stop value), the spectrum, the flow's schedule."""
    from ..models.generator_zoo import HELIX_FLOW_EPOCHS, HELIX_TRAIN_POINTS

    summary: dict = {"classifier_accuracy": accuracy, "n": len(records)}
    for space in ("latent", "pixel"):
        rs = [r[space] for r in records]
        ok = [r["success"] and not r["already"] for r in rs]
        # the recorded values in the search's dtypes (distances float64, distance_to_helix's), reduced as run_helix
        # always did: the same numbers from the records as from the tensors
        d = torch.tensor([r["distance"] for r, good in zip(rs, ok) if good], dtype=torch.float64)
        steps = torch.tensor([r["steps"] for r, good in zip(rs, ok) if good], dtype=torch.float32)
        summary[space] = {
            "success_rate": float(torch.tensor(ok, dtype=torch.float32).sum() / max(1, sum(not r["already"] for r in rs))),
            "distance_median": float(d.median()) if d.numel() else None,
            "distance_mean": float(d.mean()) if d.numel() else None,
            "steps_median": float(steps.median()) if steps.numel() else None,
        }
    lat, pix = summary["latent"]["distance_median"], summary["pixel"]["distance_median"]
    summary["distance_ratio_median"] = lat / pix if lat is not None and pix else None
    s = np.array([r["singular_values"] for r in records], dtype=np.float64)
    dims = np.array([r["dimension"] for r in records])
    summary["spectrum"] = {
        "singular_values_median": np.median(s, axis=0).tolist(),
        "ratio_s1_s2_median": float(torch.from_numpy(s[:, 0] / s[:, 1]).median()),
        "dimension_is_1_fraction": float(torch.from_numpy(dims == 1).float().mean()),
        "dimension_counts": {int(k): int(v) for k, v in zip(*np.unique(dims, return_counts=True))},
    }
    summary["flow"] = {"epochs": cfg.flow_epochs or HELIX_FLOW_EPOCHS, "steps_per_epoch": -(-HELIX_TRAIN_POINTS // 128),
                       "nll_history": flow_info.get("history"), "cached": flow_info.get("cached"),
                       "train_seconds": flow_info.get("train_seconds")}
    return summary


def run_helix(cfg: HelixConfig = HelixConfig(), *, cache: ModelCache | None = None, progress: bool = True) -> dict:
    """Run the helix experiment in memory; returns per-point records, a summary and the tensors for the figures.
    (``manifex counterfactual --dataset helix`` runs it as :class:`~manifex.counterfactuals.experiment.HelixExperiment`
    in an experiment folder, with the same numbers.)"""
    check_helix_config(cfg)
    t_start = time.perf_counter()
    gen, flow_info = helix_models(cfg, cache=cache, progress=progress)
    clf = helix_classifier(cfg.classifier_steps, cfg.seed, cache=cache)
    x, y = helix_points(cfg)
    p, direction, stop = helix_directions(clf, x, cfg)
    accuracy = float(((p > 0.5).long() == y).float().mean())
    results, dists, spec = helix_search(clf, gen, x, direction, stop, cfg, progress=progress)
    records = helix_records([f"helix{i:04d}" for i in range(cfg.n)], x, y, p, direction, results, dists, spec)
    summary = helix_summary(records, cfg, accuracy, flow_info)
    summary["seconds"] = time.perf_counter() - t_start
    return {"records": records, "summary": summary, "config": cfg.to_dict(), "results": results, "distances": dists,
            "spectrum": spec, "x": x, "y": y}
