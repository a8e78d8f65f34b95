"""Evaluation of counterfactuals, latent against pixel space side by side.

Per example (:func:`example_metrics`) and summarised per space (:func:`summarize`); :func:`evaluate` does both.

* search: success (p(target) > stop_prob), steps, p(target), validity (the classifier's argmax at x′ is the
  target; summarised over every searched example), seconds (the search's wall time per counterfactual);
* size of the change δ = x′ − x: L0 (pixels changed by more than ``l0_tol``, 0.5/255 by default: half an 8-bit
  grey level, so a change that survives 8-bit quantisation), sparsity 1 − L0 / pixels, L1, L2, L∞ (pixels in [0, 1]);
* plausibility: yNN (CARLA: share of the k nearest training images of x′ that the classifier under test labels as
  the target), IM1 and IM2 (Van Looveren & Klaise 2021, :class:`ClassAutoencoders`), and per space the Fréchet
  distance between the counterfactuals and real training images of the target class in the penultimate-layer
  features of the second-network judge (:meth:`Judges.fid`, :func:`frechet_distance`);
* independent judges (:class:`Judges`), each asked whether x′ is of the target class: an RBF-SVM trained on the
  pixels (scikit-learn), the k = 10 nearest training images (fraction carrying the target label, and their
  majority vote), and a second classifier of another architecture;
* geometry: the tangent fraction ‖P_T δ‖/‖δ‖ of the change made by the search (δ from the search's start:
  decode(encode(x)) in latent space, x in pixel space) in the generator's tangent space at encode(x), and,
  where the data manifold is known (datasets sampled from a decoder), the distance of x′ to it
  (:func:`manifold_distance`) and the off-manifold fraction distance / ‖x′ − x‖;
* likelihood under a flow: bits per dimension of x and of x′;
* a region (``mask``): the fraction of the change outside it, Σ|δ|·(1 − mask) / Σ|δ|;
* several counterfactuals per input (``n_per_input=K``, :func:`diversity`): per input, the mean pairwise L2
  distance among its K counterfactuals, of the images (pixel) and of the latent codes (latent space only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..attribution.core import call_model, check_model_input, preserve_model_state
from ..errors import InputError
from ..geometry import TangentSpace, alignment, manifold_distance
from .ascent import CounterfactualResult

__all__ = ["Judges", "ClassAutoencoders", "manifold_distance", "frechet_distance", "example_metrics", "summarize",
           "evaluate", "diversity", "JUDGE_KEYS", "METRIC_DIRECTIONS", "DEFAULT_L0_TOL"]

#: Per-example judge fields (1 = agrees with the target class).
JUDGE_KEYS = ("svm", "knn_vote", "knn_fraction", "second")

#: A pixel counts as changed (L0) when some channel moved by more than this: half an 8-bit grey level.
DEFAULT_L0_TOL = 0.5 / 255

#: Which way is better for each counterfactual metric ("higher" / "lower").
METRIC_DIRECTIONS = {"validity": "higher", "l0": "lower", "l1": "lower", "l2": "lower", "linf": "lower",
                     "sparsity": "higher", "ynn": "higher", "im1": "lower", "im2": "lower", "seconds": "lower",
                     "fid": "lower", "outside_mask": "lower", "diversity": "higher"}


def _last_linear(model: nn.Module) -> nn.Linear:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise InputError(f"the Fréchet distance uses the input of the judge's last nn.Linear (its penultimate features); "
                         f"{type(model).__name__} has no nn.Linear.")
    return last


def penultimate_features(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(N, D) inputs of ``model``'s last ``nn.Linear`` for x (N, ...), in eval mode; the model's state is restored."""
    layer = _last_linear(model)
    got: list[torch.Tensor] = []
    dev = next(model.parameters()).device
    with preserve_model_state(model), torch.no_grad():
        model.eval()
        handle = layer.register_forward_pre_hook(lambda mod, inp: got.append(inp[0].detach().flatten(1).cpu()))
        try:
            for i in range(0, x.shape[0], batch_size):
                model(x[i : i + batch_size].detach().to(dev))
        finally:
            handle.remove()
    return torch.cat(got).double()


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (n, d) and b (m, d) (n, m ≥ 2; covariances with
    n − 1): ‖μa − μb‖² + tr Σa + tr Σb − 2 tr (Σa^½ Σb Σa^½)^½ (the eigen form of tr (Σa Σb)^½, float64; the same
    as FID's scipy.linalg.sqrtm form, without its complex round-off). Biased upwards for small n, like FID: compare
    values at equal n only."""
    a = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    b = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise InputError(f"frechet_distance needs two (n ≥ 2, d) feature sets of equal d, got {a.shape} and {b.shape}.")
    ca, cb = np.cov(a, rowvar=False).reshape(a.shape[1], -1), np.cov(b, rowvar=False).reshape(b.shape[1], -1)
    ra = _sqrt_psd(ca)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(ra @ cb @ ra), 0, None)).sum()
    d = float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * cross)
    return max(d, 0.0)


def _reconstruct(ae: nn.Module, x: torch.Tensor) -> torch.Tensor:
    dev = next(ae.parameters()).device
    with preserve_model_state(ae), torch.no_grad():
        ae.eval()
        out = ae.reconstruct(x.to(dev)) if hasattr(ae, "reconstruct") else ae(x.to(dev))
    return out.to(x.device, x.dtype)


@dataclass
class ClassAutoencoders:
    """Autoencoders for IM1/IM2 (Van Looveren & Klaise, "Interpretable counterfactual explanations guided by
    prototypes", 2021): ``per_class[c]`` trained on the images of class c only, ``all`` on every class. Each maps
    x (N, ...) to its reconstruction (``reconstruct(x)`` or ``forward``).

    IM1 = ‖x′ − AE_t(x′)‖² / (‖x′ − AE_o(x′)‖² + ε), t the target, o the classifier's class at x: below 1 when the
    target's autoencoder reconstructs x′ better than the original class's (lower is better). IM2 = ‖AE_t(x′) −
    AE(x′)‖² / (‖x′‖₁ + ε): how far the target's reconstruction is from the all-class one (lower is better).
    ε = 1e-8; squared L2 over every pixel.
    """

    per_class: Mapping[int, nn.Module]
    all: nn.Module
    eps: float = 1e-8

    def __call__(self, x_cf: torch.Tensor, target: torch.Tensor, original: torch.Tensor) -> dict[str, np.ndarray]:
        """``im1``, ``im2`` (N,) float64; NaN where the target's (or for IM1 the original class's) autoencoder is missing."""
        n = x_cf.shape[0]
        x = x_cf.detach().double()
        t, o = target.detach().cpu().long(), original.detach().cpu().long()
        rec = {c: torch.full_like(x, float("nan")) for c in ("t", "o")}
        for key, cls in (("t", t), ("o", o)):
            for c in cls.unique().tolist():
                if int(c) in self.per_class:
                    rows = (cls == c).nonzero().flatten().to(x.device)
                    rec[key][rows] = _reconstruct(self.per_class[int(c)], x_cf[rows]).double()
        full = _reconstruct(self.all, x_cf).double()
        sq = lambda d: d.reshape(n, -1).pow(2).sum(1)  # noqa: E731
        im1 = sq(x - rec["t"]) / (sq(x - rec["o"]) + self.eps)
        im2 = sq(rec["t"] - full) / (x.reshape(n, -1).abs().sum(1) + self.eps)
        return {"im1": im1.cpu().numpy(), "im2": im2.cpu().numpy()}


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
    y_pred: np.ndarray | None = None
    x_train: torch.Tensor | None = None

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
        classifier: nn.Module | None = None,
    ) -> "Judges":
        """Fit the SVM (on at most ``svm_max`` seeded-random training images) and the neighbour index.

        ``x_val``/``y_val`` (optional) give the SVM's held-out accuracy, reported with the judges. ``classifier``
        (optional, the model under test): its labels of the training images, for yNN.
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
        y_pred = None
        if classifier is not None:
            with preserve_model_state(classifier), torch.no_grad():
                classifier.eval()
                xt = check_model_input(classifier, x_train.detach(), "x_train")
                y_pred = torch.cat([call_model(classifier, xt[i : i + 512]).argmax(1).cpu()
                                    for i in range(0, len(xt), 512)]).numpy()
        return cls(svm, knn, y, min(k, len(X)), second, second_name, acc, y_pred, x_train.detach().cpu())

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
        if self.y_pred is not None:  # CARLA's yNN: the neighbours' labels by the classifier under test
            out["ynn"] = (self.y_pred[idx] == t[:, None]).mean(1)
        if self.second is not None:
            with preserve_model_state(self.second), torch.no_grad():
                self.second.eval()
                dev = next(self.second.parameters()).device
                pred = self.second(x.detach().to(dev)).argmax(1).cpu().numpy()
            out["second"] = (pred == t).astype(float)
        return out

    def fid(self, x_cf: torch.Tensor, target: torch.Tensor) -> dict | None:
        """Fréchet distance between ``x_cf`` and the training images of its target class, in the penultimate
        features of the second-network judge: per target class with at least two counterfactuals, averaged weighted
        by their counts. ``{"value", "n", "n_reference"}``, or None without a second judge or two counterfactuals."""
        if self.second is None or self.x_train is None:
            return None
        t = target.detach().cpu()
        if not hasattr(self, "_ref"):
            self._ref: dict[int, torch.Tensor] = {}
        total, n, n_ref = 0.0, 0, 0
        for c in t.unique().tolist():
            rows = (t == c).nonzero().flatten()
            real = torch.as_tensor(self.y_train) == c
            if len(rows) < 2 or int(real.sum()) < 2:
                continue
            if c not in self._ref:
                self._ref[c] = penultimate_features(self.second, self.x_train[real])
            total += len(rows) * frechet_distance(penultimate_features(self.second, x_cf[rows.to(x_cf.device)]), self._ref[c])
            n += len(rows)
            n_ref += len(self._ref[c])
        return {"value": total / n, "n": n, "n_reference": n_ref} if n else None


def _norms(delta: torch.Tensor) -> dict[str, np.ndarray]:
    d = delta.detach().reshape(delta.shape[0], -1).double()
    return {"l1": d.abs().sum(1).cpu().numpy(), "l2": d.norm(dim=1).cpu().numpy(), "linf": d.abs().amax(1).cpu().numpy()}


def _l0(delta: torch.Tensor, tol: float) -> dict[str, np.ndarray]:
    """Pixels changed by more than ``tol`` (images (N, C, H, W): a pixel whose largest channel change exceeds it;
    other shapes: entries), and sparsity = 1 − L0 / their number."""
    d = delta.detach().abs()
    d = d.amax(1) if d.dim() == 4 else d
    changed = (d.reshape(d.shape[0], -1) > tol).sum(1).double()
    size = d[0].numel()
    return {"l0": changed.cpu().numpy(), "sparsity": (1 - changed / size).cpu().numpy()}


def _pairwise(v: torch.Tensor, k: int) -> np.ndarray:
    """(G·K, ...) rows in consecutive groups of K → (G,) mean L2 distance over each group's K(K − 1)/2 pairs."""
    g = v.detach().double().reshape(-1, k, v[0].numel())
    i, j = torch.triu_indices(k, k, 1)
    return (g[:, i] - g[:, j]).norm(dim=-1).mean(1).cpu().numpy()


def diversity(result: CounterfactualResult) -> dict[str, np.ndarray | None]:
    """Per input of a search with ``n_per_input=K`` > 1 (``result.group``): the mean pairwise L2 distance among its K
    counterfactuals, ``"pixel"`` between the images x′ and ``"latent"`` between the latent codes z′ (``None`` in
    pixel space), each (N_inputs,). Every one of the K counts, successful or not."""
    if result.group is None:
        raise InputError("diversity needs several counterfactuals per input: search with n_per_input=K > 1.")
    k = len(result) // (int(result.group.max()) + 1)
    latent = None
    if result.z_cf is not None:
        parts = result.z_cf if isinstance(result.z_cf, (list, tuple)) else [result.z_cf]
        latent = _pairwise(torch.cat([p.reshape(p.shape[0], -1) for p in parts], 1), k)
    return {"pixel": _pairwise(result.x_cf, k), "latent": latent}


def _outside(delta: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """Σ|δ|·(1 − mask) / Σ|δ| per row (NaN where δ = 0)."""
    d = delta.detach().abs().double()
    m = torch.broadcast_to(mask.to(device=d.device, dtype=d.dtype), d.shape)
    total = d.reshape(d.shape[0], -1).sum(1)
    out = (d * (1 - m)).reshape(d.shape[0], -1).sum(1)
    return torch.where(total > 0, out / total.clamp_min(1e-300), torch.full_like(total, float("nan"))).cpu().numpy()


def example_metrics(
    result: CounterfactualResult,
    *,
    judges: Judges | None = None,
    tangent: TangentSpace | torch.Tensor | None = None,
    manifold: Callable[[torch.Tensor], torch.Tensor] | None = None,
    bits_per_dim: Callable[[torch.Tensor], torch.Tensor] | None = None,
    autoencoders: ClassAutoencoders | None = None,
    l0_tol: float = DEFAULT_L0_TOL,
    mask: torch.Tensor | None = None,
) -> list[dict]:
    """One dict of numbers per example of ``result`` (see the module docstring).

    ``judges`` give svm/knn/second and, fitted with the classifier, yNN; ``autoencoders`` give IM1/IM2 (needs
    ``result.original``: classification). ``l0_tol``: the change that counts a pixel as changed (L0, sparsity).
    ``tangent``: tangent spaces at the originals (a :class:`TangentSpace` or an orthonormal basis (N, r, *x_shape)).
    ``manifold``: x (N, ...) → (N,) distances to the known data manifold. ``bits_per_dim``: x → (N,) bits per
    dimension under a flow (e.g. ``Generator.bits_per_dim``). ``mask`` (broadcastable to x, 1 = may change, as given to
    :func:`counterfactual`): ``outside_mask``, the fraction Σ|δ|·(1 − mask) / Σ|δ| of the change outside the region.
    """
    n = len(result)
    cols: dict[str, Any] = {
        "success": result.success.cpu().numpy(), "steps": result.steps.cpu().numpy(),
        "already": result.already.cpu().numpy(), "p_target": result.p_target.detach().cpu().numpy(),
        **_norms(result.delta),
    }
    if not (math.isfinite(l0_tol) and l0_tol >= 0):
        raise InputError(f"l0_tol must be a finite number >= 0, got {l0_tol!r}.")
    cols.update(_l0(result.delta, float(l0_tol)))
    if result.prediction is not None and result.target is not None:
        cols["validity"] = (result.prediction == result.target).double().cpu().numpy()
    if result.info.get("seconds_per_counterfactual") is not None:
        cols["seconds"] = np.full(n, float(result.info["seconds_per_counterfactual"]))
    if autoencoders is not None and result.target is not None and result.original is not None:
        cols.update(autoencoders(result.x_cf, result.target, result.original))
    if result.recon_error is not None:
        cols["recon_error"] = result.recon_error.cpu().numpy()
    if mask is not None:
        cols["outside_mask"] = _outside(result.delta, mask)
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
SUMMARY_FIELDS = ("steps", "p_target", "l0", "sparsity", "l1", "l2", "linf", "ynn", "im1", "im2", "seconds", "svm", "knn_vote", "knn_fraction", "second", "tangent_fraction",
                  "manifold_distance", "off_manifold_fraction", "bpd_before", "bpd_after", "recon_error", "outside_mask")


def summarize(per_space: Mapping[str, Sequence[dict]], fid: Mapping[str, dict | None] | None = None,
              diversity: Mapping[str, Mapping[str, Sequence[float] | None]] | None = None) -> dict:
    """Per space: ``n``, ``success_rate`` (over examples that did not already have the target), mean/median of
    every per-example field over the successful ones, and under ``"all"`` over every searched example; ``validity``
    over every searched example (over the successful ones it is 1 whenever stop_prob ≥ 0.5); ``fid`` from
    ``fid[space]`` (:meth:`Judges.fid`); ``diversity`` from ``diversity[space]`` (per input, ``"pixel"`` and
    ``"latent"`` mean pairwise distances, see :func:`diversity`: their mean/median over the inputs); plus latent/pixel
    ratios of medians (``*_all``: over every searched example) when both spaces are present."""
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
        if (st := _stats([r.get("validity") for r in live if "validity" in r])) is not None:
            s["validity"] = s["all"]["validity"] = st
        if fid is not None and fid.get(space) is not None:
            s["fid"] = fid[space]
        if diversity is not None and diversity.get(space) is not None:
            s["diversity"] = {kind: _stats(list(v)) if v is not None else None for kind, v in diversity[space].items()}
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
    ``kwargs`` go to :func:`example_metrics` (judges, tangent, manifold, bits_per_dim, autoencoders, l0_tol, mask).
    With judges that hold a second classifier, the summary's ``fid`` is the Fréchet distance of each space's successful
    counterfactuals (not already of the target) to the training images of their target class (:meth:`Judges.fid`).
    Results with K counterfactuals per input (``n_per_input``) also get the summary's ``diversity`` (:func:`diversity`)."""
    if not results:
        raise InputError("evaluate needs at least one CounterfactualResult, keyed by space name.")
    per = {space: example_metrics(r, **kwargs) for space, r in results.items()}
    judges = kwargs.get("judges")
    fid = None
    if judges is not None:
        fid = {}
        for space, r in results.items():
            ok = (r.success & ~r.already).nonzero().flatten()
            fid[space] = judges.fid(r.x_cf[ok], r.target[ok]) if r.target is not None else None
    spread = {space: {k: None if v is None else v.tolist() for k, v in diversity(r).items()}
              for space, r in results.items() if r.group is not None}
    return {"per_example": per, "summary": summarize(per, fid, spread or None)}
