"""Manifold-aware attribution metrics (torch functions and Quantus-compatible callables).

- :func:`tangent_alignment`: the fraction ‖P_T E‖/‖E‖ of an attribution in the tangent space T of the data
  manifold at x (T from any generator: the decoder's Jacobian at the latent code of x), with the exact expected
  score of a random direction (:func:`manifex.geometry.random_baseline`).
- :func:`deletion_curves`: the target probability as the most relevant pixels are removed, three ways side by
  side: set to black (pixel-flipping), ROAD's noisy linear imputation, and **in-filled from the generator**
  (the latent z minimising the error on the kept pixels, batched; so the perturbed image stays a generated
  image), each with the distance of the perturbed images to the manifold.
- :func:`pixel_flipping`: Quantus's PixelFlipping (black baseline) with all steps of a batch in few forward
  passes; equal to ``quantus.PixelFlipping`` (the test checks 1e-5).

The in-fill starts at the prior's mode z = 0, not at the code of x: started at x's code, the optimiser would
carry the removed pixels back in (the code remembers them), and the curve would not fall.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..attribution.core import call_model, check_model_input, preserve_model_state, select_target
from ..errors import InputError
from ..geometry import alignment, random_baseline, tangent_space
from ..geometry import manifold_distance as geometry_distance
from ..models.generators import as_generator, flatten_latent

__all__ = ["tangent_alignment", "TangentAlignmentResult", "deletion_curves", "DeletionCurves", "pixel_flipping",
           "manifold_infill", "manifold_distance", "road_impute", "TangentAlignment", "ManifoldDeletion", "BatchedPixelFlipping",
           "PERTURBATIONS"]

#: What a deleted pixel becomes in the deletion curves: "black" (0), "road" (ROAD's noisy linear imputation from
#: its neighbours) or "manifold" (in-filled by the generative model, so the image stays on the data manifold).
PERTURBATIONS = ("black", "road", "manifold")

#: the trapezoid rule (NumPy 2 renamed np.trapz to np.trapezoid and NumPy 2.4 removed the old name)
_trapezoid = getattr(np, "trapezoid", None) or getattr(np, "trapz")


def _tensor(a: Any, dtype: torch.dtype | None = None, device: Any = None) -> torch.Tensor:
    t = a.detach() if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    return t.to(device=device, dtype=dtype if dtype is not None else t.dtype)


def _generator(generator: Any):
    if generator is None:
        raise InputError("the manifold-aware metrics need generator= (an object with encode/decode, e.g. the VAE of a "
                         "known manifold, a flow, or manifex.as_generator(...)).")
    return as_generator(generator)


def _codes(g, x: torch.Tensor, z: Any) -> torch.Tensor:
    """Flat latent codes (N, k) of x: the given ``z`` (a known manifold's) or ``g.encode(x)``."""
    if z is not None:
        zf = flatten_latent(_tensor(z, device=g.device) if not isinstance(z, (list, tuple)) else z)
        if zf.shape[0] != x.shape[0]:
            raise InputError(f"z has {zf.shape[0]} codes for {x.shape[0]} inputs.")
        return zf.to(device=g.device)
    with torch.no_grad():
        return flatten_latent(g.encode(x.to(g.device)))


# ------------------------------------------------------------------------------------------------------------
# tangent alignment
# ------------------------------------------------------------------------------------------------------------
@dataclass
class TangentAlignmentResult:
    """``score`` (N,) = ‖P_T E‖/‖E‖ in [0, 1]; ``baseline`` (N,) its expectation for a random direction (depends on
    the rank k_i of T and the dimension d); ``ratio`` = score / baseline (1 = chance); ``rank`` (N,)."""

    score: torch.Tensor
    baseline: torch.Tensor
    ratio: torch.Tensor
    rank: torch.Tensor


def tangent_alignment(attributions: Any, generator: Any, *, x: Any = None, z: Any = None,
                      batch_size: int = 64) -> TangentAlignmentResult:
    """Alignment of attributions (N, C, H, W) with the tangent space of ``generator``'s manifold at the latent code
    of each input: ``z`` (N, k) when known (a known manifold: exact), else ``generator.encode(x)``. An attribution
    summed over channels ((N, 1, H, W) for C > 1 images) is refused: T lives in the full pixel space."""
    g = _generator(generator)
    E = _tensor(attributions)
    if x is None and z is None:
        raise InputError("tangent_alignment needs the inputs x or their latent codes z.")
    xs = _tensor(x) if x is not None else None
    if xs is not None and tuple(E.shape) != tuple(xs.shape):
        raise InputError(f"attributions {tuple(E.shape)} must have the inputs' shape {tuple(xs.shape)} (T lives in the full "
                         "pixel space; explain with reduce_axes=() for multi-channel images).")
    scores, bases, ranks = [], [], []
    with preserve_model_state(g.module):
        for s in range(0, E.shape[0], batch_size):
            zb = _codes(g, xs[s : s + batch_size] if xs is not None else E[s : s + batch_size],
                        None if z is None else _tensor(z)[s : s + batch_size])
            T = tangent_space(g.flat_decoder(zb), zb)
            e = E[s : s + batch_size].to(T.basis)
            if tuple(e.shape[1:]) != T.x_shape:
                raise InputError(f"attributions {tuple(E.shape)} do not match the generator's images {T.x_shape}.")
            scores.append(alignment(e, T).cpu())
            d = math.prod(T.x_shape)
            ranks.append(T.rank.cpu())
            bases.append(torch.tensor([random_baseline(int(k), d) for k in T.rank.tolist()], dtype=torch.float64))
    score, base, rank = torch.cat(scores).double(), torch.cat(bases), torch.cat(ranks)
    return TangentAlignmentResult(score, base, score / base, rank)


# ------------------------------------------------------------------------------------------------------------
# perturbations
# ------------------------------------------------------------------------------------------------------------
def manifold_distance(generator: Any, x: torch.Tensor, z_init: Sequence[torch.Tensor] | torch.Tensor, *,
                      steps: int = 100, lr: float = 0.05) -> torch.Tensor:
    """min over z of ‖decode(z) − x‖₂ per row (N,), by Adam on the flat code from each of ``z_init``; the smallest
    found wins (a local search: an upper bound on the true distance). Rows do not interact (summed losses)."""
    g = _generator(generator)
    inits = [z_init] if isinstance(z_init, torch.Tensor) else list(z_init)
    xf = x.detach().to(g.device)
    # each start its own flat decoder (a flow's code has several parts), the search itself geometry's
    found = [geometry_distance(g.flat_decoder(z0), xf, z0, steps=steps, lr=lr)[0] for z0 in inits]
    return torch.stack(found).amin(0).cpu()


def manifold_infill(generator: Any, x: torch.Tensor, keep: torch.Tensor, *, steps: int = 100, lr: float = 0.05,
                    z_init: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The removed pixels (``keep`` False; (N, 1 or C, H, W)) of x in-filled from the generator: ``z*`` minimises
    ‖keep ⊙ (decode(z) − x)‖² (Adam, ``steps``, from ``z_init``, default the prior's mode 0: no removed pixel
    leaks in), and the result is x on the kept pixels, ``decode(z*)`` elsewhere. Returns ``(images, z*)``."""
    g = _generator(generator)
    x = x.detach().to(g.device)
    keep = keep.to(device=x.device, dtype=x.dtype).expand_as(x)
    with torch.no_grad():
        like = g.encode(x[:1])
    k = flatten_latent(like).shape[1]
    decode = g.flat_decoder(like if isinstance(like, torch.Tensor) else [p.expand(x.shape[0], *p.shape[1:]) for p in like])
    z = (torch.zeros(x.shape[0], k, device=x.device, dtype=x.dtype) if z_init is None else z_init.detach().clone().to(x)).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    for _ in range(steps):
        with torch.enable_grad():
            loss = ((decode(z) - x) * keep).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        fill = decode(z).reshape(x.shape)
    return torch.where(keep > 0, x, fill), z.detach()


def _neighbour_system(h: int, w: int):
    """ROAD's linear imputation weights: each removed pixel = weighted mean of its 8 neighbours (sides 1/6,
    diagonals 1/12, renormalised at the border)."""
    offs = [(-1, 0, 1 / 6), (1, 0, 1 / 6), (0, -1, 1 / 6), (0, 1, 1 / 6),
            (-1, -1, 1 / 12), (-1, 1, 1 / 12), (1, -1, 1 / 12), (1, 1, 1 / 12)]
    return offs


def road_impute(x: torch.Tensor, remove: torch.Tensor, *, noise: float = 0.01, generator: torch.Generator | None = None) -> torch.Tensor:
    """ROAD's noisy linear imputation (Rong et al., 2022): the removed pixels (``remove`` True, (N, 1, H, W)) solve
    the linear system "each equals the weighted mean of its 8 neighbours" (sides 1/6, diagonals 1/12), kept pixels
    fixed, one sparse solve per image and channel; then Gaussian noise of std ``noise`` on the imputed pixels."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    n, c, h, w = x.shape
    out = x.detach().cpu().double().clone()
    rem = remove.detach().cpu().expand(n, 1, h, w)[:, 0]
    offs = _neighbour_system(h, w)
    for i in range(n):
        idx = rem[i].reshape(-1).nonzero().flatten().numpy()
        if len(idx) == 0:
            continue
        pos = -np.ones(h * w, dtype=np.int64)
        pos[idx] = np.arange(len(idx))
        rows, cols, vals = [], [], []
        rhs = np.zeros((len(idx), c))
        img = out[i].reshape(c, -1).numpy()
        for r, p in enumerate(idx):
            py, px = divmod(int(p), w)
            nb = [(py + dy, px + dx, wt) for dy, dx, wt in offs if 0 <= py + dy < h and 0 <= px + dx < w]
            total = sum(wt for _, _, wt in nb)
            rows.append(r); cols.append(r); vals.append(1.0)
            for qy, qx, wt in nb:
                q = qy * w + qx
                if pos[q] >= 0:
                    rows.append(r); cols.append(int(pos[q])); vals.append(-wt / total)
                else:
                    rhs[r] += wt / total * img[:, q]
        A = coo_matrix((vals, (rows, cols)), shape=(len(idx), len(idx))).tocsc()
        sol = spsolve(A, rhs)
        sol = sol.reshape(len(idx), c)
        img[:, idx] = sol.T
        out[i] = torch.from_numpy(img.reshape(c, h, w))
    if noise > 0:
        eps = torch.randn(out.shape, generator=generator, dtype=out.dtype) * noise
        out = torch.where(rem[:, None].expand_as(out), out + eps, out)
    return out.to(x.dtype).to(x.device)


# ------------------------------------------------------------------------------------------------------------
# curves
# ------------------------------------------------------------------------------------------------------------
def _probabilities(model: Callable, x: torch.Tensor, y: torch.Tensor, batch_size: int, softmax: bool = True) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            logits = call_model(model, x[s : s + batch_size])
            scores = F.softmax(logits, dim=1) if softmax else logits
            outs.append(select_target(scores, y[s : s + batch_size]))
    return torch.cat(outs)


def _rank_pixels(a: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
    """Position of each pixel (H·W) in the order "most relevant first" (relevance summed over channels); ties in
    the order of np.argsort (as Quantus)."""
    n = a.shape[0]
    rel = a.reshape(n, a.shape[1] if a.dim() == 4 else 1, -1).sum(1).double().cpu().numpy()
    order = np.argsort(-rel, axis=1)
    rank = np.empty_like(order)
    rank[np.arange(n)[:, None], order] = np.arange(order.shape[1])[None]
    return torch.from_numpy(rank)


@dataclass
class DeletionCurves:
    """``fractions`` (K,) of pixels removed; ``prob[kind]`` (N, K) the target probability; ``auc[kind]`` (N,) its
    area (trapezoid over the fractions); ``distance[kind]`` (N, K) the distance of the perturbed images to the
    manifold (only with a generator; fraction 0 is the unperturbed image's own distance: the reference)."""

    fractions: torch.Tensor
    prob: dict[str, torch.Tensor] = field(default_factory=dict)
    auc: dict[str, torch.Tensor] = field(default_factory=dict)
    distance: dict[str, torch.Tensor] = field(default_factory=dict)


def _check_curve_inputs(model, x, y, attributions):
    x = check_model_input(model, _tensor(x) if not isinstance(x, torch.Tensor) else x)
    y = _tensor(y, torch.long, x.device)
    a = _tensor(attributions, torch.float64)
    if x.dim() != 4:
        raise InputError(f"deletion curves need images (N, C, H, W), got inputs of shape {tuple(x.shape)}.")
    if a.shape[0] != x.shape[0] or tuple(a.shape[2:]) != tuple(x.shape[2:]) or a.shape[1] not in (1, x.shape[1]):
        raise InputError(f"attributions {tuple(a.shape)} must be shaped like the inputs {tuple(x.shape)} (or summed over "
                         "channels, (N, 1, H, W)).")
    if y.shape != (x.shape[0],):
        raise InputError(f"y must hold one class per input ({x.shape[0]},), got {tuple(y.shape)}.")
    return x, y, a


def deletion_curves(model: nn.Module, x: Any, y: Any, attributions: Any, *, generator: Any = None, z: Any = None,
                    kinds: Sequence[str] = PERTURBATIONS, steps: int = 10, infill_steps: int = 100,
                    distance_steps: int = 100, road_noise: float = 0.01, seed: int = 0, batch_size: int = 256,
                    softmax: bool = True) -> DeletionCurves:
    """Deletion curves of the most relevant pixels: at fractions 0, 1/steps, …, (steps−1)/steps of the pixels removed
    (relevance summed over channels, most relevant first), the model's probability of class y (``softmax=False``:
    the logit), with the removed pixels set to each image's minimum ("black", Quantus's pixel-flipping baseline),
    imputed as in ROAD ("road") or in-filled from ``generator`` ("manifold", :func:`manifold_infill`).

    With a generator, ``distance[kind]`` holds each perturbed image's distance to the manifold
    (:func:`manifold_distance` from the image's own code and, for "manifold", from the in-fill's code); ``z``: the
    latent codes of x where known. The model's and the generator's state are left as found.
    """
    bad = [k for k in kinds if k not in PERTURBATIONS]
    if bad or not kinds:
        raise InputError(f"kinds must be among {', '.join(PERTURBATIONS)}, got {list(kinds)}.")
    if "manifold" in kinds and generator is None:
        raise InputError("the 'manifold' deletion curve in-fills from a generator: pass generator= (or drop 'manifold').")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be an integer >= 1, got {steps!r}.")
    x, y, a = _check_curve_inputs(model, x, y, attributions)
    g = _generator(generator) if generator is not None else None
    n, c, h, w = x.shape
    fractions = torch.arange(steps, dtype=torch.float64) / steps
    rank = _rank_pixels(a, tuple(x.shape)).to(x.device)  # (N, H*W)
    counts = [int(round(float(f) * h * w)) for f in fractions]
    # (K, N, 1, H, W): pixels removed at each step
    remove = torch.stack([(rank < k).reshape(n, 1, h, w) for k in counts])
    rng = torch.Generator().manual_seed(seed)
    out = DeletionCurves(fractions)
    mins = x.reshape(n, -1).amin(1).view(n, 1, 1, 1)
    codes = _codes(g, x, z) if g is not None else None
    with preserve_model_state(model), preserve_model_state(g.module if g is not None else None):
        for kind in kinds:
            flat_rm = remove.reshape(steps * n, 1, h, w)
            xr = x.unsqueeze(0).expand(steps, *x.shape).reshape(steps * n, c, h, w)
            zfill = None
            if kind == "black":
                pert = torch.where(flat_rm, mins.repeat(steps, 1, 1, 1), xr)
            elif kind == "road":
                pert = road_impute(xr, flat_rm, noise=road_noise, generator=rng)
            else:
                pert, zfill = manifold_infill(g, xr, ~flat_rm, steps=infill_steps)
                pert = pert.to(x)
            p = _probabilities(model, pert, y.repeat(steps), batch_size, softmax).reshape(steps, n).T.double().cpu()
            out.prob[kind] = p
            out.auc[kind] = torch.from_numpy(_trapezoid(p.numpy(), x=fractions.numpy(), axis=1)) if steps > 1 else p[:, 0].clone()
            if g is not None:
                with torch.no_grad():
                    inits = [flatten_latent(g.encode(pert.to(g.device)))]
                if zfill is not None:
                    inits.append(zfill)
                d = manifold_distance(g, pert, inits, steps=distance_steps)
                out.distance[kind] = d.reshape(steps, n).T.double()
    return out


#: input values per forward pass of the batched pixel-flipping (2^16: 1024 images of 8×8, 64 of 32×32). Larger
#: passes were slower per image at 32×32 on CPU (256 images: 0.8× Quantus's 64-image steps, bench_evaluate.py)
PIXEL_BUDGET = 1 << 16


def pixel_flipping(model: nn.Module, x: Any, y: Any, attributions: Any, *, features_in_step: int = 1,
                   softmax: bool = True, max_values: int = PIXEL_BUDGET) -> torch.Tensor:
    """Quantus's PixelFlipping (black baseline: each image's minimum; features in the order np.argsort(−a), a
    broadcast to x's shape), the D / features_in_step steps of the whole batch through the model in few forward
    passes: as many steps per pass as keep the pass within ``max_values`` input values (at least one step, i.e. the
    batch, as Quantus), with the perturbed images built by one comparison instead of NumPy copies per step.
    Returns (N, steps) target probabilities (``softmax=False``: the logits' entries), in float64."""
    x, y, a = _check_curve_inputs(model, x, y, attributions)
    if isinstance(features_in_step, bool) or not isinstance(features_in_step, int) or features_in_step < 1:
        raise InputError(f"features_in_step must be an integer >= 1, got {features_in_step!r}.")
    n = x.shape[0]
    d = math.prod(x.shape[1:])
    if d % features_in_step:
        raise InputError(f"features_in_step={features_in_step} must divide the {d} features of an input (as Quantus asks).")
    a = a.expand(x.shape) if a.shape != x.shape else a
    order = np.argsort(-a.reshape(n, -1).cpu().numpy(), axis=1)
    rank = np.empty_like(order)
    rank[np.arange(n)[:, None], order] = np.arange(d)[None]
    step_of = torch.from_numpy(rank // features_in_step).to(x.device).reshape(x.shape)  # step at which a feature goes
    steps = d // features_in_step
    mins = x.reshape(n, -1).amin(1).view(n, *([1] * (x.dim() - 1)))
    per = max(1, int(max_values) // (n * d))
    out = []
    with preserve_model_state(model), torch.no_grad():
        for s0 in range(0, steps, per):
            ks = torch.arange(s0, min(steps, s0 + per), device=x.device).view(-1, 1, *([1] * (x.dim() - 1)))
            pert = torch.where(step_of.unsqueeze(0) <= ks, mins.unsqueeze(0), x.unsqueeze(0)).reshape(-1, *x.shape[1:])
            p = _probabilities(model, pert, y.repeat(len(ks)), pert.shape[0], softmax)
            out.append(p.reshape(len(ks), n).T)
    return torch.cat(out, 1).double().cpu()


# ------------------------------------------------------------------------------------------------------------
# Quantus-compatible callables
# ------------------------------------------------------------------------------------------------------------
class BatchedPixelFlipping:
    """``quantus.PixelFlipping`` (black baseline) computed by :func:`pixel_flipping`: the same curves (equal to 1e-5;
    tested) from batched forward passes. Options as Quantus's: ``features_in_step``, ``abs``, ``softmax`` (on call,
    default True as Quantus's), ``return_auc_per_sample`` (area by the trapezoid rule with unit steps, as Quantus)."""

    score_direction = "lower"
    evaluation_category = "faithfulness"
    #: the Quantus options this class reproduces; evaluate() hands any other PixelFlipping option to Quantus
    OPTIONS = frozenset({"features_in_step", "abs", "normalise", "return_auc_per_sample", "perturb_baseline",
                         "disable_warnings", "display_progressbar", "softmax", "batch_size", "channel_first", "device"})

    def __init__(self, features_in_step: int = 1, abs: bool = False, normalise: bool = True, perturb_baseline: str = "black",
                 return_auc_per_sample: bool = False, disable_warnings: bool = False, display_progressbar: bool = False) -> None:
        if perturb_baseline != "black":
            raise InputError(f"BatchedPixelFlipping reproduces the black baseline only, got {perturb_baseline!r}; use quantus.PixelFlipping.")
        self.features_in_step, self.abs, self.return_auc_per_sample = features_in_step, bool(abs), bool(return_auc_per_sample)

    def __call__(self, model: Any, x_batch: Any, y_batch: Any, a_batch: Any = None, s_batch: Any = None, *,
                 explain_func: Callable | None = None, explain_func_kwargs: dict | None = None, softmax: bool = True,
                 channel_first: bool | None = None, batch_size: int = 64, device: Any = None, **kwargs: Any) -> list:
        a = _tensor(_quantus_attributions(model, x_batch, y_batch, a_batch, explain_func, explain_func_kwargs), torch.float64)
        x = _tensor(x_batch)
        if isinstance(model, nn.Module):
            x = x.to(next(model.parameters()).dtype)
        a = a.abs() if self.abs else a
        y = _tensor(y_batch)
        # in chunks of batch_size images, as Quantus (its steps then see the same batches)
        curves = torch.cat([pixel_flipping(model, x[s : s + batch_size], y[s : s + batch_size], a[s : s + batch_size],
                                           features_in_step=self.features_in_step, softmax=softmax)
                            for s in range(0, x.shape[0], batch_size)])
        if self.return_auc_per_sample:
            return _trapezoid(curves.numpy(), dx=1, axis=1).tolist()
        return curves.tolist()


def _quantus_attributions(model, x_batch, y_batch, a_batch, explain_func, explain_func_kwargs):
    if a_batch is None:
        if explain_func is None:
            raise InputError("give a_batch, or explain_func (e.g. manifex.evaluation.explain_func) with explain_func_kwargs.")
        a_batch = explain_func(model=model, inputs=x_batch, targets=y_batch, **(explain_func_kwargs or {}))
    return a_batch


class TangentAlignment:
    """Quantus-style metric: per example ‖P_T E‖/‖E‖ divided by the random direction's expected score (1 = chance,
    higher = the explanation lies more in the data manifold's tangent space). ``generator``: any generator
    (encode/decode); ``z_batch`` on call: the inputs' latent codes where known (a known manifold).

    >>> quantus.evaluate(metrics={"tangent": TangentAlignment(generator=g)}, xai_methods=..., model=..., ...)
    """

    score_direction = "higher"
    evaluation_category = "manifold"

    def __init__(self, generator: Any = None, *, ratio: bool = True, abs: bool = False) -> None:
        self.generator = _generator(generator)
        self.ratio, self.abs = bool(ratio), bool(abs)
        self.last: TangentAlignmentResult | None = None

    def __call__(self, model: Any, x_batch: Any, y_batch: Any, a_batch: Any = None, s_batch: Any = None, *,
                 z_batch: Any = None, explain_func: Callable | None = None, explain_func_kwargs: dict | None = None,
                 channel_first: bool | None = None, batch_size: int = 64, device: Any = None, **kwargs: Any) -> list[float]:
        a = _quantus_attributions(model, x_batch, y_batch, a_batch, explain_func, explain_func_kwargs)
        a = _tensor(a, torch.float64)
        x = _tensor(x_batch)
        if a.shape != x.shape and a.shape[1] == 1:
            a = a.expand(x.shape) if x.shape[1] == 1 else a
        if self.abs:
            a = a.abs()
        self.last = tangent_alignment(a, self.generator, x=x, z=z_batch, batch_size=batch_size)
        return (self.last.ratio if self.ratio else self.last.score).tolist()


class ManifoldDeletion:
    """Quantus-style metric: the area under the target probability as the most relevant pixels are removed
    (lower = more faithful), removal by ``perturbation`` = "manifold" (in-filled from ``generator``, default),
    "black" or "road". ``self.last`` holds the curves and the perturbed images' distances to the manifold."""

    score_direction = "lower"
    evaluation_category = "manifold"

    def __init__(self, generator: Any = None, *, perturbation: str = "manifold", steps: int = 10, infill_steps: int = 100,
                 distance_steps: int = 100, seed: int = 0, softmax: bool = True) -> None:
        if perturbation not in PERTURBATIONS:
            raise InputError(f"perturbation must be one of {', '.join(PERTURBATIONS)}, got {perturbation!r}.")
        self.generator = _generator(generator) if (generator is not None or perturbation == "manifold") else None
        self.perturbation, self.steps, self.infill_steps = perturbation, steps, infill_steps
        self.distance_steps, self.seed, self.softmax = distance_steps, seed, softmax
        self.last: DeletionCurves | None = None

    def __call__(self, model: Any, x_batch: Any, y_batch: Any, a_batch: Any = None, s_batch: Any = None, *,
                 z_batch: Any = None, explain_func: Callable | None = None, explain_func_kwargs: dict | None = None,
                 channel_first: bool | None = None, batch_size: int = 256, device: Any = None, **kwargs: Any) -> list[float]:
        a = _quantus_attributions(model, x_batch, y_batch, a_batch, explain_func, explain_func_kwargs)
        x = _tensor(x_batch)
        if isinstance(model, nn.Module):
            x = x.to(next(model.parameters()).dtype)
        self.last = deletion_curves(model, x, y_batch, a, generator=self.generator, z=z_batch, kinds=(self.perturbation,),
                                    steps=self.steps, infill_steps=self.infill_steps, distance_steps=self.distance_steps,
                                    seed=self.seed, batch_size=batch_size, softmax=self.softmax)
        return self.last.auc[self.perturbation].tolist()
