"""Evaluation of counterfactuals, latent against pixel space side by side.

Per example (:func:`example_metrics`) and summarised per space (:func:`summarize`); :func:`evaluate` does both.

* search: success, steps, p(target);
* size of the change δ = x′ − x: L1, L2, L∞ (pixels in [0, 1]);
* independent judges (:class:`Judges`), each asked whether x′ is of the target class: an RBF-SVM trained on the
  pixels (scikit-learn), the k = 10 nearest training images (fraction carrying the target label, and their
  majority vote), and a second classifier of another architecture;
* geometry: the tangent fraction ‖P_T δ‖/‖δ‖ of the change made by the search (δ from the search's start:
  decode(encode(x)) in latent space, x in pixel space) in the generator's tangent space at encode(x), and,
  where the data manifold is known (datasets sampled from a decoder), the distance of x′ to it
  (:func:`manifold_distance`) and the off-manifold fraction distance / ‖x′ − x‖;
* likelihood under a flow: bits per dimension of x and of x′.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..attribution.core import preserve_model_state
from ..errors import InputError
from ..geometry import TangentSpace, alignment
from .ascent import CounterfactualResult

__all__ = ["Judges", "manifold_distance", "example_metrics", "summarize", "evaluate", "JUDGE_KEYS"]

#: Per-example judge fields (1 = agrees with the target class).
JUDGE_KEYS = ("svm", "knn_vote", "knn_fraction", "second")


@dataclass
class Judges:
    """Independent judges of a counterfactual's class, fitted on training images.

    ``svm``: scikit-learn ``SVC(kernel="rbf")`` on flattened pixels; ``knn``: scikit-learn ``NearestNeighbors``
    (Euclidean) over the training pixels with labels ``y_train``; ``second``: another classifier (an
    ``nn.Module`` returning logits) or ``None``.
    """

    svm: Any
    knn: Any
    y_train: np.ndarray
    k: int = 10
    second: nn.Module | None = None
    second_name: str = ""
    svm_accuracy: float | None = None

    @classmethod
    def fit(
        cls,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        *,
        second: nn.Module | None = None,
        second_name: str = "",
        k: int = 10,
        svm_max: int = 3000,
        svm_C: float = 10.0,
        seed: int = 0,
        x_val: torch.Tensor | None = None,
        y_val: torch.Tensor | None = None,
    ) -> "Judges":
        """Fit the SVM (on at most ``svm_max`` seeded-random training images) and the neighbour index.

        ``x_val``/``y_val`` (optional) give the SVM's held-out accuracy, reported with the judges.
        """
        from sklearn.neighbors import NearestNeighbors
        from sklearn.svm import SVC

        if k < 1:
            raise InputError(f"k must be >= 1, got {k}.")
        X = x_train.detach().reshape(x_train.shape[0], -1).cpu().double().numpy()
        y = y_train.detach().cpu().numpy()
        if len(np.unique(y)) < 2:
            raise InputError("the judges need training images of at least two classes.")
        pick = np.random.default_rng(seed).permutation(len(X))[:svm_max]
        svm = SVC(kernel="rbf", C=svm_C, gamma="scale").fit(X[pick], y[pick])
        knn = NearestNeighbors(n_neighbors=min(k, len(X))).fit(X)
        acc = None
        if x_val is not None and y_val is not None:
            acc = float((svm.predict(x_val.reshape(x_val.shape[0], -1).cpu().double().numpy()) == y_val.cpu().numpy()).mean())
        return cls(svm, knn, y, min(k, len(X)), second, second_name, acc)

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> dict[str, np.ndarray]:
        """Per example (N,): ``svm`` / ``knn_vote`` / ``second`` (1.0 if the judge's class is the target, else 0.0),
        ``knn_fraction`` (share of the k nearest training images with the target label)."""
        X = x.detach().reshape(x.shape[0], -1).cpu().double().numpy()
        t = target.detach().cpu().numpy()
        out = {"svm": (self.svm.predict(X) == t).astype(float)}
        _, idx = self.knn.kneighbors(X, n_neighbors=self.k)
        labels = self.y_train[idx]
        out["knn_fraction"] = (labels == t[:, None]).mean(1)
        n_classes = int(max(self.y_train.max(), t.max())) + 1
        votes = np.stack([np.bincount(row, minlength=n_classes) for row in labels])
        out["knn_vote"] = (votes.argmax(1) == t).astype(float)
        if self.second is not None:
            with preserve_model_state(self.second), torch.no_grad():
                self.second.eval()
                dev = next(self.second.parameters()).device
                pred = self.second(x.detach().to(dev)).argmax(1).cpu().numpy()
            out["second"] = (pred == t).astype(float)
        return out


def manifold_distance(
    decode: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    z_init: torch.Tensor | Sequence[torch.Tensor],
    *,
    steps: int = 300,
    lr: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance of each x (N, ...) to the manifold {decode(z)}: min over z of ‖decode(z) − x‖₂, and the best z.

    Adam on z (summed per-row squared errors, so rows do not interact) from each of the starting codes in
    ``z_init`` (a (N, k) tensor or a list of them, e.g. the code of the original image and an encoder's guess);
    the smallest distance found wins. An upper bound on the true distance (a local search).
    """
    inits = [z_init] if isinstance(z_init, torch.Tensor) else list(z_init)
    xf = x.detach().reshape(x.shape[0], -1)
    best = torch.full((x.shape[0],), float("inf"), dtype=x.dtype, device=x.device)
    best_z = inits[0].detach().clone()
    for z0 in inits:
        z = z0.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=lr)
        for i in range(steps + 1):
            with torch.enable_grad():  # callers may hold torch.no_grad()
                d2 = (decode(z).reshape(x.shape[0], -1) - xf).pow(2).sum(1)
                loss = d2.sum()
            dist = d2.detach().sqrt()
            better = dist < best
            best = torch.where(better, dist, best)
            best_z[better] = z.detach()[better]
            if i == steps:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
    return best, best_z


def _norms(delta: torch.Tensor) -> dict[str, np.ndarray]:
    d = delta.detach().reshape(delta.shape[0], -1).double()
    return {"l1": d.abs().sum(1).cpu().numpy(), "l2": d.norm(dim=1).cpu().numpy(), "linf": d.abs().amax(1).cpu().numpy()}


def example_metrics(
    result: CounterfactualResult,
    *,
    judges: Judges | None = None,
    tangent: TangentSpace | torch.Tensor | None = None,
    manifold: Callable[[torch.Tensor], torch.Tensor] | None = None,
    bits_per_dim: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[dict]:
    """One dict of numbers per example of ``result`` (see the module docstring).

    ``tangent``: tangent spaces at the originals (a :class:`TangentSpace` or an orthonormal basis (N, r, *x_shape)).
    ``manifold``: x (N, ...) → (N,) distances to the known data manifold. ``bits_per_dim``: x → (N,) bits per
    dimension under a flow (e.g. ``Generator.bits_per_dim``).
    """
    n = len(result)
    cols: dict[str, Any] = {
        "success": result.success.cpu().numpy(), "steps": result.steps.cpu().numpy(),
        "already": result.already.cpu().numpy(), "p_target": result.p_target.detach().cpu().numpy(),
        **_norms(result.delta),
    }
    if result.recon_error is not None:
        cols["recon_error"] = result.recon_error.cpu().numpy()
    if judges is not None and result.target is not None:
        cols.update(judges(result.x_cf, result.target))
    if tangent is not None:
        start = result.x if result.x_recon is None else result.x_recon.clamp(*result.info["box"]) if result.info.get("box") else result.x_recon
        change = (result.x_cf - start).to(tangent.basis.dtype if isinstance(tangent, TangentSpace) else tangent.dtype)
        moved = change.reshape(n, -1).abs().amax(1) > 0
        frac = torch.full((n,), float("nan"), dtype=torch.float64)
        if bool(moved.any()):
            idx = moved.nonzero().flatten()
            sub = tangent[idx] if isinstance(tangent, TangentSpace) else tangent[idx]
            frac[idx.cpu()] = alignment(change[idx], sub).double().cpu()
        cols["tangent_fraction"] = frac.numpy()
    with torch.no_grad():
        if manifold is not None:
            dist = manifold(result.x_cf).double().cpu()
            cols["manifold_distance"] = dist.numpy()
            l2 = torch.as_tensor(cols["l2"])
            cols["off_manifold_fraction"] = torch.where(l2 > 0, dist / l2.clamp_min(1e-12), torch.full_like(dist, float("nan"))).numpy()
        if bits_per_dim is not None:
            for key, images in (("bpd_before", result.x), ("bpd_after", result.x_cf)):
                bpd = bits_per_dim(images).double().cpu()
                # non-finite: the log-density overflowed (an image far outside the flow's support); kept as a
                # flag, since JSON has no inf, and counted in the summary rather than silently dropped
                over = ~torch.isfinite(bpd)
                cols[key] = torch.where(over, torch.full_like(bpd, float("nan")), bpd).numpy()
                if bool(over.any()):
                    cols[f"{key}_overflow"] = over.numpy()
    rows = []
    for i in range(n):
        row = {}
        for k, v in cols.items():
            val = v[i].item() if hasattr(v[i], "item") else v[i]
            if k.endswith("_overflow") and not val:
                continue
            row[k] = bool(val) if k in ("success", "already") or k.endswith("_overflow") else val
            if isinstance(row[k], float) and math.isnan(row[k]):
                row[k] = None
        rows.append(row)
    return rows


def _stats(values: list[float]) -> dict | None:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0:
        return None
    return {"mean": float(v.mean()), "median": float(np.median(v)), "n": int(v.size)}


#: Fields summarised over the successful, non-trivial counterfactuals of a space.
SUMMARY_FIELDS = ("steps", "p_target", "l1", "l2", "linf", "svm", "knn_vote", "knn_fraction", "second", "tangent_fraction",
                  "manifold_distance", "off_manifold_fraction", "bpd_before", "bpd_after", "recon_error")


def summarize(per_space: Mapping[str, Sequence[dict]]) -> dict:
    """Per space: ``n``, ``success_rate`` (over examples that did not already have the target), mean/median of
    every per-example field over the successful ones, and under ``"all"`` over every searched example; plus
    latent/pixel ratios of medians (``*_all``: over every searched example) when both spaces are present."""
    out: dict[str, Any] = {}
    for space, rows in per_space.items():
        live = [r for r in rows if not r.get("already")]
        ok = [r for r in live if r.get("success")]
        s: dict[str, Any] = {"n": len(rows), "n_already": len(rows) - len(live), "n_success": len(ok),
                             "success_rate": len(ok) / len(live) if live else None}
        for f in SUMMARY_FIELDS:
            st = _stats([r.get(f) for r in ok if f in r])
            if st is not None:
                s[f] = st
        # the same over every searched example, successful or not (what the budget reached)
        s["all"] = {f: st for f in SUMMARY_FIELDS if (st := _stats([r.get(f) for r in live if f in r])) is not None}
        for f in ("bpd_before", "bpd_after"):  # log-densities that overflowed: +inf bits/dim, not in the means
            for where, group in ((s, ok), (s["all"], live)):
                k = sum(1 for r in group if r.get(f"{f}_overflow"))
                if k:
                    where[f"{f}_overflow"] = k
        out[space] = s
    if "latent" in out and "pixel" in out:
        ratios: dict[str, Any] = {}
        for f in ("manifold_distance", "off_manifold_fraction", "l2", "linf", "steps"):
            a, b = out["latent"].get(f), out["pixel"].get(f)
            if a and b and b["median"] > 0:
                ratios[f"{f}_median"] = a["median"] / b["median"]
            a, b = out["latent"]["all"].get(f), out["pixel"]["all"].get(f)
            if a and b and b["median"] > 0:
                ratios[f"{f}_median_all"] = a["median"] / b["median"]
        out["latent_vs_pixel"] = ratios
        # paired: the images where both searches succeeded (rows align: one list entry per image in each space).
        # Success rates differ a lot (pixel search often runs out of steps), so per-space means compare different
        # image sets; the paired numbers compare the two kinds of change on the same images.
        lat, pix = per_space["latent"], per_space["pixel"]
        if len(lat) == len(pix):
            both = [i for i in range(len(lat)) if lat[i].get("success") and pix[i].get("success")
                    and not lat[i].get("already") and not pix[i].get("already")]
            paired: dict[str, Any] = {"n": len(both)}
            for f in JUDGE_KEYS + ("l2", "tangent_fraction", "off_manifold_fraction"):
                a = _stats([lat[i].get(f) for i in both if f in lat[i]])
                b = _stats([pix[i].get(f) for i in both if f in pix[i]])
                if a and b:
                    paired[f] = {"latent": a["mean"], "pixel": b["mean"]}
            out["paired"] = paired
    return out


def evaluate(results: Mapping[str, CounterfactualResult], **kwargs: Any) -> dict:
    """``{"per_example": {space: [dict per example]}, "summary": summarize(...)}`` for results keyed by space
    (e.g. ``{"latent": counterfactual(..., space="latent"), "pixel": counterfactual(..., space="pixel")}``);
    ``kwargs`` go to :func:`example_metrics` (judges, tangent, manifold, bits_per_dim)."""
    if not results:
        raise InputError("evaluate needs at least one CounterfactualResult, keyed by space name.")
    per = {space: example_metrics(r, **kwargs) for space, r in results.items()}
    return {"per_example": per, "summary": summarize(per)}
