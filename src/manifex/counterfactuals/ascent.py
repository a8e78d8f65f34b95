"""Diffeomorphic counterfactuals (Dombrowski, Gerken, Müller, Kessel, TPAMI 2023), batched: :func:`counterfactual`.

"What would x have to look like to be classified as the target class?" Gradient descent on the
cross-entropy of the target, either in the latent space of a generator (``space="latent"``: z = encode(x),
x′ = decode(z); the change follows the data manifold) or on the pixels themselves (``space="pixel"``: the
adversarial baseline).

The research loop, per example (RESEARCH.md §4)::

    z = encode(x).detach()                 # every tensor of a multi-scale list is optimised
    Adam(z, lr, weight_decay=0)
    for step in range(max_steps):
        x′ = decode(z); x′ ← clip(x′) outside the graph
        if p(target | x′) > stop_prob: success, stop      # checked BEFORE the step
        loss = cross_entropy(f(x′), target); step

Clipping "outside the graph" (the seed assigns ``x.data = clip(x.data)``) means the classifier sees the
clipped image while the gradient flows back through ``decode`` as if nothing was clipped (a
straight-through clip). In pixel space the parameter itself is projected onto the box before each forward.
One deliberate difference: after the last of ``max_steps`` steps the stop test runs once more, so an example
that crosses the threshold on the very last step counts as a success (the seed drops it).

Batching without interaction
----------------------------
The batch loss is the *sum* of the per-example losses (not the mean), so example i's gradient involves only
its own z_i; Adam's moments are per entry and kept per row here (finished rows are dropped from the batch
together with their Adam state), so every example follows exactly its batch-1 trajectory (tested against
the batch-1 loop with ``torch.optim.Adam``). Models run in eval mode during the call, so BatchNorm and
Dropout do not couple rows either; their state is restored afterwards, also on error.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..attribution.core import (OutputSelector, call_model, check_model_input, check_output_selector, preserve_model_state,
                               selected_output, warn_if_training)
from ..attribution.methods import model_device
from ..errors import InputError, ModelError, check_finite, check_tensor
from ..models.generators import ApproximateGeneratorWarning, as_generator

__all__ = ["counterfactual", "CounterfactualResult", "ApproximateGeneratorWarning", "DEFAULT_LR", "default_lr",
           "DEFAULT_RECON_TOL"]

Latent = Union[torch.Tensor, list]

#: The research learning rates by generator kind (RESEARCH.md §4); ``None`` is the pixel-space baseline.
DEFAULT_LR: dict[str | None, float] = {"flow": 5e-2, "vae": 5e-3, "gan": 5e-3, "autoencoder": 5e-3, None: 5e-4}

#: max |decode(encode(x)) − x| above which a generator counts as approximate (warned, and flagged in reports).
DEFAULT_RECON_TOL = 1e-3


def default_lr(kind: str | None, generator: Any = None) -> float:
    """Default Adam learning rate: the ``counterfactual_lr`` a generator's module declares (the zoo's image flow
    does, from a measured sweep), else the research value for its kind ("flow", "vae", "gan"; ``None``: pixel
    space)."""
    module = getattr(generator, "module", generator)
    declared = getattr(module, "counterfactual_lr", None)
    if declared is not None:
        return float(declared)
    return DEFAULT_LR.get(kind, DEFAULT_LR["vae"])


@dataclass
class CounterfactualResult:
    """Counterfactuals of a batch of N examples.

    ``x_cf`` ``(N, *x_shape)``: the counterfactual, clipped to the box, at the step the search stopped.
    ``success`` (N,) bool: the stop criterion was met within ``max_steps``. ``steps`` (N,) long: optimiser
    steps taken (0 when the start already met the criterion). ``p_target`` (N,): p(target | x_cf), or the
    objective at x_cf for regression. ``already`` (N,) bool: the model already predicted the target at x
    (argmax; regression: the objective was already past ``stop_value``) — such rows take zero steps.
    ``z_cf``: latent code(s) at x_cf (a tensor or a list for multi-scale latents; ``None`` in pixel space).
    ``x_recon`` = decode(encode(x)) and ``recon_error`` (N,) = ``max |x_recon − x|`` (``None`` in pixel space).
    ``delta`` = x_cf − x. ``path`` ``(N, K, *x_shape)`` and ``path_steps`` (N, K): K frames from the start to
    x_cf (``record_path=K``), else ``None``. Classification only (else ``None``): ``original`` (N,) the classifier's
    class at x (argmax), ``prediction`` (N,) its class at x_cf. ``group`` (N,): the input each row belongs to
    (``n_per_input=K``: rows i·K … i·K + K − 1 are input i's K counterfactuals; ``None`` for K = 1).
    ``info["seconds"]``: wall time of the call (``info["seconds_per_counterfactual"]``: divided by the rows).
    """

    x: torch.Tensor
    x_cf: torch.Tensor
    success: torch.Tensor
    steps: torch.Tensor
    p_target: torch.Tensor
    already: torch.Tensor
    target: torch.Tensor | None
    space: str
    lr: float
    z_cf: Latent | None = None
    x_recon: torch.Tensor | None = None
    recon_error: torch.Tensor | None = None
    path: torch.Tensor | None = None
    path_steps: torch.Tensor | None = None
    info: dict = field(default_factory=dict)
    original: torch.Tensor | None = None
    prediction: torch.Tensor | None = None
    group: torch.Tensor | None = None

    @property
    def delta(self) -> torch.Tensor:
        """x_cf − x, shaped like x."""
        return self.x_cf - self.x

    @property
    def success_rate(self) -> float:
        return float(self.success.float().mean()) if len(self) else float("nan")

    def __len__(self) -> int:
        return self.x.shape[0]


class _StraightThroughClip(torch.autograd.Function):
    """Forward: clamp to [low, high]; backward: the identity (the seed's ``x.data = clip(x.data)``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, low: float, high: float) -> torch.Tensor:  # type: ignore[override]
        return x.clamp(low, high)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None, None


class _RowAdam:
    """Adam (weight decay 0, no amsgrad) over batch-first tensors whose rows can be dropped.

    The update is torch.optim.Adam's single-tensor formula, entry by entry; written out so that the moments
    of finished rows leave the batch with them (``keep``), which torch.optim.Adam's per-parameter state
    cannot do.
    """

    def __init__(self, params: list[torch.Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    def keep(self, rows: torch.Tensor) -> None:
        self.m = [m[rows] for m in self.m]
        self.v = [v[rows] for v in self.v]

    @torch.no_grad()
    def step(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        self.t += 1
        bc1 = 1 - self.beta1**self.t
        bc2_sqrt = (1 - self.beta2**self.t) ** 0.5
        for p, g, m, v in zip(params, grads, self.m, self.v):
            m.lerp_(g, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            p.addcdiv_(m, (v.sqrt() / bc2_sqrt).add_(self.eps), value=-self.lr / bc1)


# ------------------------------------------------------------------------------------------------------
# inputs


def _latents(z: Latent) -> list[torch.Tensor]:
    return list(z) if isinstance(z, (list, tuple)) else [z]


def _pack(parts: list[torch.Tensor], multi: bool) -> Latent:
    return list(parts) if multi else parts[0]


def _targets(target: Any, n: int, device: torch.device) -> torch.Tensor:
    if isinstance(target, bool) or target is None:
        raise InputError("target must be a class index, a (N,) tensor of indices or a list of N indices.")
    if isinstance(target, numbers.Integral):
        return torch.full((n,), int(target), dtype=torch.long, device=device)
    if isinstance(target, (list, tuple)):
        target = torch.as_tensor(list(target))
    if not isinstance(target, torch.Tensor):
        raise InputError(f"target must be an int, a tensor or a list of ints, got {type(target).__name__}.")
    if target.is_floating_point():
        raise InputError(f"target must hold integer class indices, got dtype {target.dtype}.")
    if target.dim() == 0:
        target = target.expand(n)
    if target.shape != (n,):
        raise InputError(f"target must have shape ({n},) (one class per example), got {tuple(target.shape)}.")
    return target.to(device=device, dtype=torch.long)


def _per_row(value: Any, n: int, name: str, device, dtype) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.dim() == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise InputError(f"{name} must be a number or a ({n},) tensor, got shape {tuple(t.shape)}.")
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{name} must be finite.")
    return t


def _directions(direction: Any, n: int, device, dtype) -> torch.Tensor:
    """+1 (maximise) or −1 (minimise) per row from "max"/"min", a list of those, or a (N,) sign/bool tensor."""
    if isinstance(direction, str):
        direction = [direction] * n
    if isinstance(direction, (list, tuple)) and direction and isinstance(direction[0], str):
        bad = sorted({d for d in direction if d not in ("max", "min")})
        if bad:
            raise InputError(f"direction must be 'max' or 'min', got {bad}.")
        direction = [1.0 if d == "max" else -1.0 for d in direction]
    t = torch.as_tensor(direction, device=device)
    t = t.to(dtype) * 2 - 1 if t.dtype == torch.bool else t.to(dtype)
    t = t.expand(n) if t.dim() == 0 else t
    if t.shape != (n,) or not bool(((t == 1) | (t == -1)).all()):
        raise InputError(f"direction must be 'max', 'min', or ({n},) values in {{+1, -1}} / booleans (True = max).")
    return t


def _check_options(space: str, lr: float | None, max_steps: int, stop_prob: float, box, batch_size: int, record_path: int) -> None:
    if space not in ("latent", "pixel"):
        raise InputError(f"space must be 'latent' (through a generator) or 'pixel' (the adversarial baseline), got {space!r}.")
    if lr is not None and not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0):
        raise InputError(f"lr must be a positive number, got {lr!r}; leave it None for the research default.")
    if isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral) or max_steps < 1:
        raise InputError(f"max_steps must be an integer >= 1, got {max_steps!r}.")
    if not (isinstance(stop_prob, numbers.Real) and 0.0 < float(stop_prob) < 1.0):
        raise InputError(f"stop_prob must lie strictly between 0 and 1, got {stop_prob!r} (the research stops at 0.99).")
    if box is not None:
        if len(box) != 2 or not float(box[0]) < float(box[1]):
            raise InputError(f"box must be (low, high) with low < high, or None for no clipping; got {box!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    if isinstance(record_path, bool) or not isinstance(record_path, numbers.Integral) or record_path < 0 or record_path == 1:
        raise InputError(f"record_path must be 0 (no path) or the number of frames K >= 2, got {record_path!r}.")


# ------------------------------------------------------------------------------------------------------
# the search


class _Scorer:
    """Per-row values, losses and stop tests: classification (p(target), cross-entropy) or regression."""

    def __init__(self, classifier, objective, target, stop_prob, stop_value, sign) -> None:
        self.classifier, self.objective = classifier, objective
        self.target, self.stop_prob, self.stop_value, self.sign = target, stop_prob, stop_value, sign

    def __call__(self, x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(value, reached, loss) per row for the batch ``x`` holding rows ``rows`` of the chunk."""
        if self.objective is None:
            logits = call_model(self.classifier, x)
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
                raise ModelError("the classifier must return logits of shape (N, classes); for one score per example "
                                 "use objective='output' with stop_value.")
            t = self.target[rows]
            value = F.softmax(logits, dim=1).gather(1, t[:, None])[:, 0]
            loss = F.cross_entropy(logits, t, reduction="none")
            return value, value > self.stop_prob, loss
        value = self.objective(x)
        if not isinstance(value, torch.Tensor) or value.shape != (x.shape[0],):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ModelError(f"the objective must map x (N, ...) to a ({x.shape[0]},) tensor, got {got}.")
        sign, stop = self.sign[rows], self.stop_value[rows]
        reached = torch.where(sign > 0, value > stop, value < stop)
        return value, reached, -sign * value


def _search_chunk(
    x: torch.Tensor,
    start: list[torch.Tensor],
    multi: bool,
    decode: Callable | None,
    scorer: _Scorer,
    chunk_rows: torch.Tensor,
    *,
    lr: float,
    max_steps: int,
    box,
    record_path: int,
    bar,
    per_input: int = 1,
    diversity: float = 0.0,
    mask: torch.Tensor | None = None,
    mask_weight: float = 0.0,
    x_start: torch.Tensor | None = None,
) -> dict:
    """The batched research loop over one chunk; returns per-row results (chunk order).

    ``per_input`` = K > 1: the chunk's rows are consecutive groups of K counterfactuals of one input, and
    ``diversity`` > 0 adds −diversity × the mean pairwise L2 distance of each group's search variables (a finished
    row stays in its group's term at its final position). ``mask`` (rows, *x_shape) in [0, 1]: pixel space multiplies
    the gradient by it (entries with mask 0 never move); latent space adds mask_weight × ‖(1 − mask) ⊙ (x′ − x_start)‖²
    to each row's loss (a penalty: the decoded change outside the mask shrinks but is not exactly zero)."""
    n = x.shape[0]
    latent = decode is not None
    params = [t.detach().clone() for t in start]
    adam = _RowAdam(params, lr)
    active = torch.arange(n, device=x.device)
    x_cf = torch.empty_like(x)
    z_cf = [torch.empty_like(t) for t in start] if latent else None
    steps = torch.zeros(n, dtype=torch.long, device=x.device)
    success = torch.zeros(n, dtype=torch.bool, device=x.device)
    value_out = torch.empty(n, dtype=x.dtype, device=x.device)
    frames: list[tuple[int, torch.Tensor]] = []
    if record_path:
        path_out = torch.empty((n, record_path, *x.shape[1:]), dtype=x.dtype, device=x.device)
        path_steps_out = torch.empty((n, record_path), dtype=torch.long)
    stride = 1
    diverged = torch.zeros(n, dtype=torch.bool, device=x.device)
    prev: torch.Tensor | None = None
    # every row's search variable at its latest position (finished rows: final), for the diversity term
    anchor = [t.detach().clone() for t in start] if per_input > 1 and diversity > 0 else None
    for step in range(max_steps + 1):
        leaves = [p.requires_grad_(True) for p in params]
        with torch.enable_grad():
            if latent:
                xp = decode(_pack(leaves, multi))
                if not isinstance(xp, torch.Tensor) or xp.shape != (len(active), *x.shape[1:]):
                    got = tuple(xp.shape) if isinstance(xp, torch.Tensor) else type(xp).__name__
                    raise ModelError(f"decode(z) must return images shaped like x, ({len(active)}, {', '.join(map(str, x.shape[1:]))}); got {got}.")
                if not xp.requires_grad:
                    raise ModelError("decode(z) does not depend differentiably on z (no gradient path); remove "
                                     "torch.no_grad()/.detach() from decode, or use space='pixel'.")
                if box is not None:
                    xp = _StraightThroughClip.apply(xp, float(box[0]), float(box[1]))
            else:
                xp = leaves[0]
            value, reached, loss = scorer(xp, chunk_rows[active])
            if mask is not None and latent and mask_weight > 0:
                outside = (1 - mask[active]) * (xp - x_start[active])
                loss = loss + mask_weight * outside.pow(2).reshape(len(active), -1).sum(1)
            extra = None
            if anchor is not None:
                full = torch.cat([a.index_put((active,), leaf).reshape(n, -1) for a, leaf in zip(anchor, leaves)], 1)
                extra = -diversity * _mean_pairwise_distance(full.reshape(n // per_input, per_input, -1)).sum()
        if record_path:
            if step % stride == 0:
                frame = torch.full_like(x, float("nan"))
                frame[active] = xp.detach()
                frames.append((step, frame))
                if len(frames) > 2 * record_path:
                    stride *= 2
                    frames = [f for f in frames if f[0] % stride == 0]
        # A row whose image or score turned NaN/inf (a diverging decoder) stops as a failure at its last finite image.
        bad = ~torch.isfinite(xp.detach().reshape(len(active), -1)).all(1) | ~torch.isfinite(value.detach())
        if bool(bad.any()):
            xp = torch.where(bad.reshape(-1, *([1] * (xp.dim() - 1))), prev if prev is not None else x[active], xp)
            reached = reached & ~bad
            diverged[active[bad]] = True
        prev = xp.detach()
        done = reached.detach() | bad | (step == max_steps)
        if bool(done.any()):
            rows = active[done]
            x_cf[rows] = xp.detach()[done]
            if latent:
                for buf, p in zip(z_cf, params):
                    buf[rows] = p.detach()[done]
            steps[rows] = step
            success[rows] = reached.detach()[done]
            value_out[rows] = value.detach()[done]
            if record_path:
                # choose a finished row's frames now: later thinning of `frames` (for rows still running) would
                # otherwise leave a row that stopped early with only its first frame
                for r in rows.tolist():
                    path_out[r], path_steps_out[r] = _select_frames(frames, r, x_cf[r], step, record_path)
        keep = ~done
        if bar is not None:  # per finished example; update(0) still redraws the step count every mininterval
            bar.set_postfix(step=step, searching=int(keep.sum()), refresh=False)
            bar.update(int(done.sum()))
        if not bool(keep.any()):
            break
        with torch.enable_grad():  # the caller may be under torch.no_grad(): indexing `loss` must stay on the graph
            total = loss[keep].sum() if extra is None else loss[keep].sum() + extra
            grads = torch.autograd.grad(total, leaves, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        grads = [g[keep] for g in grads]
        if mask is not None and not latent:
            grads = [grads[0] * mask[active[keep]]]
        if step == 0:
            flat = torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)
            zero = (flat == 0).all(dim=1)
            if bool(zero.any()):
                bad = chunk_rows[active[keep][zero]].tolist()
                where = ("through decode (check that decode(z) depends on z) or through the classifier" if latent else
                         "of the classifier" + (" inside the mask" if mask is not None else ""))
                raise ModelError(
                    f"the loss gradient is exactly zero at examples {bad[:10]}: no signal {where}; the search "
                    "cannot move. A saturated or piecewise-constant model (rounding, argmax) has no usable gradient."
                )
            if not bool(torch.isfinite(flat).all()):
                raise ModelError("the loss gradient holds NaN/inf at the start; check the models at these inputs.")
        active = active[keep]
        prev = prev[keep]
        params = [p.detach()[keep] for p in params]
        adam.keep(keep)
        adam.step(params, grads)
        if not latent and box is not None:
            params[0].clamp_(float(box[0]), float(box[1]))  # the seed projects the pixels before each forward
        if anchor is not None:
            for a, p in zip(anchor, params):
                a[active] = p
    out = {"x_cf": x_cf, "z_cf": z_cf, "steps": steps, "success": success, "value": value_out, "diverged": diverged}
    if record_path:
        out["path"], out["path_steps"] = path_out, path_steps_out
    return out


def _mean_pairwise_distance(v: torch.Tensor) -> torch.Tensor:
    """(G, K, D) → (G,): mean L2 distance over the K(K − 1)/2 pairs of each group (differentiable at coinciding
    points: the square root gets 1e-12 added, so its gradient there is 0, not NaN)."""
    k = v.shape[1]
    d2 = (v[:, :, None] - v[:, None]).pow(2).sum(-1)
    i, j = torch.triu_indices(k, k, 1, device=v.device)
    return (d2[:, i, j] + 1e-12).sqrt().mean(1)


def _warn_if_probabilities(logits: torch.Tensor, stop_prob: float) -> None:
    """Warn when the classifier's outputs look like probabilities (rows non-negative, summing to 1): the search
    takes them as logits, so p(target) = softmax(output) can never exceed e / (e + K − 1)."""
    k = logits.shape[1]
    # summing K values in [0, 1] rounds by at most K·eps (float32: 1.2e-7 each); 10× that as the margin
    tol = 10 * k * torch.finfo(logits.dtype).eps
    if k < 2 or not bool(((logits >= 0) & (logits <= 1)).all()) or not bool(((logits.sum(1) - 1).abs() <= tol).all()):
        return
    ceiling = math.e / (math.e + k - 1)
    warnings.warn(f"the classifier returns probabilities (each row in [0, 1], summing to 1), but counterfactual() "
                  f"treats its outputs as logits: p(target) = softmax(output) stays below {ceiling:.3f}"
                  f"{' < stop_prob, so no search can succeed' if ceiling <= stop_prob else ''}; pass the model "
                  "without its final softmax (or output= a callable returning logits).", RuntimeWarning, stacklevel=3)


def _select_frames(frames, row: int, x_final: torch.Tensor, step: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K frames of one row that finished at ``step``, evenly spaced over its recorded trajectory; the last is x_cf."""
    rec = [(s, f[row]) for s, f in frames if s < step]
    rec.append((step, x_final))
    pick = torch.linspace(0, len(rec) - 1, k).round().long().tolist()
    return torch.stack([rec[p][1] for p in pick]), torch.tensor([rec[p][0] for p in pick], dtype=torch.long)


def counterfactual(
    classifier: Callable[[torch.Tensor], torch.Tensor] | None,
    x: torch.Tensor,
    target: int | torch.Tensor | Sequence[int] | None = None,
    *,
    generator: Any = None,
    space: Literal["latent", "pixel"] = "latent",
    lr: float | None = None,
    max_steps: int = 2000,
    stop_prob: float = 0.99,
    objective: Callable[[torch.Tensor], torch.Tensor] | Literal["output"] | None = None,
    stop_value: float | torch.Tensor | None = None,
    direction: Literal["max", "min"] | Sequence[str] | torch.Tensor = "max",
    box: tuple[float, float] | None = (0.0, 1.0),
    batch_size: int = 64,
    record_path: int = 0,
    recon_tol: float = DEFAULT_RECON_TOL,
    progress: bool = False,
    tf32: bool = False,
    output: OutputSelector = None,
    n_per_input: int = 1,
    diversity: float = 1.0,
    spread: float = 0.1,
    seed: int | Sequence[int] = 0,
    mask: torch.Tensor | None = None,
    mask_weight: float = 10.0,
) -> CounterfactualResult:
    """Counterfactuals of ``x`` (N, ...) for ``target`` by gradient descent in a generator's latent space or on pixels.

    Classification: ``classifier(x)`` returns logits (N, classes); ``target`` is an int, a (N,) tensor or a list
    of N class indices; the search stops once p(target | x′) > ``stop_prob``. Regression: ``objective`` maps x to
    (N,) scores (``"output"``: the classifier's single output per example); the loss is ∓ the objective
    (``direction`` "max"/"min" per batch or per row) and the search stops once it passes ``stop_value``.

    ``generator``: any object with ``encode(x) → z`` and ``decode(z) → x`` (z a tensor or a list of multi-scale
    tensors, all optimised), e.g. a flow or VAE of :mod:`manifex.models` or your own ``nn.Module``; needed for
    ``space="latent"``. ``lr=None`` takes the generator's declared ``counterfactual_lr`` (the zoo's image flow:
    1e-2, see :class:`manifex.models.flows.ImageFlow`), else the research default for its kind (flow 5e-2, VAE/GAN
    5e-3, pixel space 5e-4). ``box``: the valid input range x′ is clipped to (``None``: no clipping).
    ``batch_size`` rows are searched together; each follows exactly its batch-1 trajectory. ``record_path=K``
    keeps K frames from the start to x′ per example. ``tf32`` (CUDA only): allow TensorFloat-32 convolutions and
    matrix products during the call. PyTorch enables them for cuDNN convolutions by default, and they make an
    exact flow approximate: measured on the zoo's image flow on an H100, round trip 2.4e-3 with TF32 against
    1.2e-6 without (CPU: 1.3e-6). The default turns them off for the call and restores the settings after.
    ``output``: for a classifier that returns a tuple/dict, which part holds the logits (an index, a key or a
    callable), as in :func:`manifex.explain`. ``progress``: a bar that advances as examples finish.

    Several counterfactuals per input: ``n_per_input=K`` searches K per input in one batch (result rows i·K …
    i·K + K − 1 belong to input i; ``result.group``). The first of the K starts at encode(x) (pixel space: x), the
    others at that start plus Gaussian noise of standard deviation ``spread`` × the start's RMS (pixel space: inside
    the mask only, then clipped to the box), drawn from ``seed`` (an int for the call, or N ints, one per input: input
    i's starts then depend on its seed alone, not on the other inputs of the batch); ``diversity`` (≥ 0) weighs a term
    −diversity × the mean pairwise L2 distance between the K search variables (z, or the pixels) added to the summed
    losses, so the K push apart while each keeps its own stop test (``diversity=0``: K independent searches). K = 1 is
    the plain search.

    A region: ``mask`` (broadcastable to x, values in [0, 1], 1 = may change). Pixel space: the gradient is
    multiplied by the mask, so entries with mask 0 keep their value exactly (Adam's update of a zero gradient is
    zero). Latent space cannot confine a decoder exactly: the loss gets mask_weight × ‖(1 − mask) ⊙ (x′ − x₀)‖² per
    row (x₀ the clipped decode(encode(x)), the search's start), which shrinks the change outside the mask without
    zeroing it; measure it from ``result.delta``.

    The models run in eval mode during the call (a model found in train mode with Dropout/BatchNorm gets the
    explainers' :class:`~manifex.attribution.core.TrainModeWarning`); their mode, ``requires_grad``, buffers and
    hooks are restored afterwards, also on error.

    Raises :class:`~manifex.errors.InputError` / :class:`~manifex.errors.ModelError` before the search for bad
    options, x outside the box or non-finite, targets out of range, a non-finite encoding or log-density, and a
    zero gradient at the start; warns (:class:`ApproximateGeneratorWarning`) when decode(encode(x)) differs from x
    by more than ``recon_tol``, and when the target is already predicted (those rows take zero steps, flagged in
    ``result.already``).
    """
    t_begin = time.perf_counter()
    _check_options(space, lr, max_steps, stop_prob, box, batch_size, record_path)
    per_input = _check_diverse(n_per_input, diversity, spread, seed, mask_weight)
    output = check_output_selector(output)
    check_tensor(x, "x", min_ndim=2)
    check_finite(x, "x")
    if x.shape[0] == 0:
        raise InputError("x is empty; pass at least one example.")
    if not isinstance(seed, numbers.Integral) and len(seed) != x.shape[0]:
        raise InputError(f"seed holds {len(seed)} values for {x.shape[0]} inputs; pass one int, or one per input.")
    if objective is None and classifier is None:
        raise InputError("pass a classifier (and a target), or an objective for regression.")
    if output is not None and classifier is None:
        raise InputError("output= selects the logits from the classifier's output; pass the classifier.")
    if objective is not None:
        if stop_value is None:
            raise InputError("a regression objective needs stop_value (the value at which the search stops), "
                             "e.g. stop_value=0.9 with direction='max'.")
        if target is not None:
            raise InputError("pass either target (classification) or objective (regression), not both.")
    elif stop_value is not None:
        raise InputError("stop_value applies to regression objectives; for classification use stop_prob.")
    if space == "latent" and generator is None:
        raise InputError("space='latent' needs a generator with encode/decode; pass generator=... or use space='pixel'.")
    if box is not None:
        lo, hi = float(x.detach().min()), float(x.detach().max())
        if lo < box[0] - 1e-6 or hi > box[1] + 1e-6:
            raise InputError(f"x has values in [{lo:.4g}, {hi:.4g}] outside the box [{box[0]:g}, {box[1]:g}]; rescale the "
                             "input (e.g. x / 255) or pass the model's range as box=(low, high) (None: no clipping).")

    device = model_device(classifier) or model_device(generator) or x.device
    x = x.detach().to(device)
    n = x.shape[0]
    gen = as_generator(generator) if space == "latent" else None
    # dtype (and device) against every model the images go through, before any of them runs
    if classifier is not None:
        x = check_model_input(classifier, x, "x")
    if gen is not None:
        gen_module = gen.module if isinstance(gen.module, nn.Module) else generator
        x = check_model_input(gen_module, x, "x")
        declared = getattr(gen_module, "image_shape", None)
        if declared is not None and tuple(x.shape[1:]) != tuple(int(v) for v in declared):
            raise InputError(f"x holds images of shape {tuple(x.shape[1:])} but the generator was built for "
                             f"{tuple(int(v) for v in declared)}; pass x as (N, {', '.join(str(int(v)) for v in declared)}).")
    kind = gen.kind if gen is not None else None
    lr = float(lr) if lr is not None else default_lr(kind, gen) if space == "latent" else default_lr(None)
    mask_t = _check_mask(mask, x) if mask is not None else None
    group = None
    if per_input > 1:  # K rows per input, consecutive; per-input options repeated with them
        if objective is None:
            target = _targets(target, n, device).repeat_interleave(per_input)
        else:
            stop_value = _per_row(stop_value, n, "stop_value", device, x.dtype).repeat_interleave(per_input)
            direction = _directions(direction, n, device, x.dtype).repeat_interleave(per_input)
        group = torch.arange(n, device=device).repeat_interleave(per_input)
        x = x.repeat_interleave(per_input, 0)
        mask_t = mask_t.repeat_interleave(per_input, 0) if mask_t is not None else None
        n = x.shape[0]

    if objective == "output":
        if classifier is None:
            raise InputError("objective='output' uses the classifier's output; pass the classifier.")
        model = classifier

        def objective(v: torch.Tensor) -> torch.Tensor:  # noqa: F811 - the model's single score per example
            return call_model(model, v).reshape(v.shape[0], -1)[:, 0]

    elif objective is not None and not callable(objective):
        raise InputError("objective must be a callable x -> (N,) scores or 'output'.")

    models = [m for m in (classifier, getattr(gen, "module", None), generator) if isinstance(m, nn.Module)]
    for m in dict.fromkeys(models):
        warn_if_training(m)
    selection = selected_output(classifier, output) if classifier is not None else contextlib.nullcontext()
    with _preserved(models), selection, (contextlib.nullcontext() if tf32 or device.type != "cuda" else _no_tf32()):
        for m in models:
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)  # gradients w.r.t. z or x only; the user's weights stay untouched
        with torch.no_grad():
            if objective is None:
                logits = torch.cat([call_model(classifier, x[i : i + batch_size]) for i in range(0, n, batch_size)])
                if x.dim() == 3 and (logits.dim() != 2 or logits.shape[0] != n):
                    raise InputError(f"x has shape {tuple(x.shape)} and the classifier maps it to {tuple(logits.shape)}, "
                                     f"not ({n}, classes); pass images as (N, C, H, W), e.g. x.unsqueeze(1).")
                if logits.dim() != 2 or logits.shape[0] != n:
                    raise ModelError(f"the classifier must return logits ({n}, classes) for x {tuple(x.shape)}, got shape "
                                     f"{tuple(logits.shape)}.")
                _warn_if_probabilities(logits, float(stop_prob))
                t = _targets(target, n, device)
                k = logits.shape[1]
                if bool(((t < 0) | (t >= k)).any()):
                    raise InputError(f"target classes must lie in [0, {k - 1}] (the classifier has {k} outputs), "
                                     f"got values in [{int(t.min())}, {int(t.max())}].")
                original = logits.argmax(1)
                already = original == t
                sign = stop = None
            else:
                t = original = None
                values = torch.cat([objective(x[i : i + batch_size]) for i in range(0, n, batch_size)])
                if values.shape != (n,):
                    raise ModelError(f"the objective must return one score per example, shape ({n},), got {tuple(values.shape)}.")
                sign = _directions(direction, n, device, x.dtype)
                stop = _per_row(stop_value, n, "stop_value", device, x.dtype)
                already = torch.where(sign > 0, values > stop, values < stop)
            if bool(already.any()):
                rows = already.nonzero().flatten().tolist()
                warnings.warn(f"{len(rows)} of {n} examples already meet the target (examples {rows[:10]}); they take "
                              "zero steps and are flagged in result.already.", RuntimeWarning, stacklevel=2)
            z0, x_recon, recon_error, multi = None, None, None, False
            if gen is not None:
                z_chunks = [gen.encode(x[i : i + batch_size]) for i in range(0, n, batch_size)]
                multi = isinstance(z_chunks[0], (list, tuple))
                parts = [torch.cat([_latents(c)[j] for c in z_chunks]) for j in range(len(_latents(z_chunks[0])))]
                for j, p in enumerate(parts):
                    if not bool(torch.isfinite(p).all()):
                        rows = (~torch.isfinite(p.reshape(n, -1))).any(1).nonzero().flatten().tolist()
                        raise ModelError(f"encode(x) returned NaN/inf{f' in latent {j}' if multi else ''} for examples "
                                         f"{rows[:10]}; check the generator (a flow's logit pre-processing needs x inside "
                                         "the box, not on its edge).")
                z0 = parts
                _check_log_density(gen, x, batch_size)
                x_recon = torch.cat([gen.decode(_pack([p[i : i + batch_size] for p in parts], multi)) for i in range(0, n, batch_size)])
                if x_recon.shape != x.shape:
                    if x_recon.shape[0] == n and x_recon[0].numel() == x[0].numel():
                        raise InputError(f"x has shape {tuple(x.shape)} but the generator makes images of shape "
                                         f"{tuple(x_recon.shape[1:])}; pass x as (N, {', '.join(map(str, x_recon.shape[1:]))}).")
                    raise ModelError(f"decode(encode(x)) has shape {tuple(x_recon.shape)}, expected {tuple(x.shape)}.")
                recon_error = (x_recon - x).reshape(n, -1).abs().amax(1)
                worst = float(recon_error.max())
                if worst > recon_tol:
                    warnings.warn(
                        f"approximate inverse: decode(encode(x)) differs from x by up to {worst:.3g} (max |·|, "
                        f"tolerance {recon_tol:g}; generator kind {kind or 'unknown'}); each counterfactual starts from the "
                        "reconstruction, so compare x_cf with result.x_recon as well as with x.",
                        ApproximateGeneratorWarning, stacklevel=2)

        scorer = _Scorer(classifier, objective, t, float(stop_prob), stop, sign)
        todo = (~already).nonzero().flatten()
        x_cf = x.clone()
        steps = torch.zeros(n, dtype=torch.long, device=device)
        success = torch.zeros(n, dtype=torch.bool, device=device)
        value = torch.empty(n, dtype=x.dtype, device=device)
        z_cf = [p.clone() for p in z0] if z0 is not None else None
        diverged = torch.zeros(n, dtype=torch.bool, device=device)
        path = path_steps = None
        if record_path:
            path = x[:, None].repeat(1, record_path, *([1] * (x.dim() - 1)))
            path_steps = torch.zeros(n, record_path, dtype=torch.long)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"counterfactuals ({space})", unit="example", leave=False)
        begin = _spread_starts(z0 if z0 is not None else [x], todo, per_input, float(spread),
                               int(seed) if isinstance(seed, numbers.Integral) else [int(v) for v in seed],
                               mask_t if z0 is None else None, box if z0 is None else None)
        x_start = None
        if mask_t is not None and gen is not None:
            x_start = x_recon.clamp(float(box[0]), float(box[1])) if box is not None else x_recon
        # a chunk holds whole groups of K rows (every group is searched or already there as a whole)
        chunk = max(1, int(batch_size) // per_input) * per_input
        try:
            for c in range(0, len(todo), chunk):
                rows = todo[c : c + chunk]
                start = [p[rows] for p in begin]
                decode = gen.decode if gen is not None else None
                res = _search_chunk(x[rows], start, multi, decode, scorer, rows, lr=lr, max_steps=int(max_steps), box=box,
                                    record_path=int(record_path), bar=bar, per_input=per_input, diversity=float(diversity),
                                    mask=mask_t[rows] if mask_t is not None else None, mask_weight=float(mask_weight),
                                    x_start=x_start[rows] if x_start is not None else None)
                x_cf[rows], steps[rows], success[rows], value[rows] = res["x_cf"], res["steps"], res["success"], res["value"]
                diverged[rows] = res["diverged"]
                if z_cf is not None:
                    for buf, part in zip(z_cf, res["z_cf"]):
                        buf[rows] = part
                if record_path:
                    path[rows], path_steps[rows.cpu()] = res["path"], res["path_steps"]
        finally:
            if bar is not None:
                bar.close()
        if bool(already.any()):
            rows = already.nonzero().flatten()
            with torch.no_grad():
                start = x[rows]
                if gen is not None:
                    start = gen.decode(_pack([p[rows] for p in z0], multi))
                    if box is not None:
                        start = start.clamp(float(box[0]), float(box[1]))
                v, reached, _ = scorer(start, rows)
            x_cf[rows], value[rows], success[rows] = start, v, reached
            if record_path:
                path[rows] = start[:, None].expand_as(path[rows])
        prediction = None
        if objective is None:
            with torch.no_grad():
                prediction = torch.cat([call_model(classifier, x_cf[i : i + batch_size]).argmax(1)
                                        for i in range(0, n, batch_size)])
    if bool(diverged.any()):
        rows = diverged.nonzero().flatten().tolist()
        warnings.warn(f"the search diverged (NaN/inf image or score) for {len(rows)} of {n} examples {rows[:10]}; they "
                      "stopped as failures at their last finite image (result.info['diverged']). Lower lr.",
                      RuntimeWarning, stacklevel=2)
    info = {"kind": kind, "max_steps": int(max_steps), "diverged": diverged.nonzero().flatten().tolist(), "stop_prob": float(stop_prob) if objective is None else None,
            "box": None if box is None else [float(box[0]), float(box[1])], "exact": getattr(gen, "exact", None),
            "n_per_input": per_input}
    info["seconds"] = time.perf_counter() - t_begin
    info["seconds_per_counterfactual"] = info["seconds"] / n
    return CounterfactualResult(
        x=x, x_cf=x_cf.detach(), success=success, steps=steps, p_target=value.detach(), already=already, target=t,
        space=space, lr=lr, z_cf=_pack(z_cf, multi) if z_cf is not None else None, x_recon=x_recon,
        recon_error=recon_error, path=path, path_steps=path_steps, info=info, original=original, prediction=prediction,
        group=group)


def _check_diverse(n_per_input: Any, diversity: Any, spread: Any, seed: Any, mask_weight: Any) -> int:
    if isinstance(n_per_input, bool) or not isinstance(n_per_input, numbers.Integral) or n_per_input < 1:
        raise InputError(f"n_per_input must be an integer >= 1 (counterfactuals per input), got {n_per_input!r}.")
    for name, v in (("diversity", diversity), ("spread", spread), ("mask_weight", mask_weight)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
            raise InputError(f"{name} must be a finite number >= 0, got {v!r}.")
    seeds = [seed] if isinstance(seed, numbers.Integral) or not isinstance(seed, (Sequence, torch.Tensor)) else list(seed)
    if not seeds or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in seeds):
        raise InputError(f"seed must be an integer or a sequence of integers (one per input), got {seed!r}.")
    return int(n_per_input)


def _check_mask(mask: Any, x: torch.Tensor) -> torch.Tensor:
    """The region mask as a float tensor shaped like x (N, ...), values in [0, 1], every row free somewhere."""
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"mask must be a tensor broadcastable to x {tuple(x.shape)} (1 = may change), got {type(mask).__name__}.")
    try:
        m = torch.broadcast_to(mask.to(device=x.device, dtype=x.dtype), x.shape)
    except RuntimeError:
        raise InputError(f"mask of shape {tuple(mask.shape)} does not broadcast to x {tuple(x.shape)}; pass (*x_shape), "
                         f"(N, *x_shape) or (H, W).") from None
    if not bool(torch.isfinite(m).all()) or bool(((m < 0) | (m > 1)).any()):
        raise InputError("mask values must lie in [0, 1] (1 = may change, 0 = keep); got values outside.")
    empty = (m.reshape(x.shape[0], -1) == 0).all(1)
    if bool(empty.any()):
        raise InputError(f"the mask is zero everywhere for examples {empty.nonzero().flatten().tolist()[:10]}: nothing "
                         "may change there; free some pixels (mask 1) or leave those examples out.")
    return m.contiguous()


def _spread_starts(parts: list[torch.Tensor], todo: torch.Tensor, k: int, spread: float, seed: int | list[int],
                   mask: torch.Tensor | None, box) -> list[torch.Tensor]:
    """The search's starts: ``parts`` (z, or [x]) with rows 2..K of each searched group moved by Gaussian noise of
    std ``spread`` × the row's RMS (pixel space: times the mask, then clipped to the box). ``seed``: one for the call,
    or one per input (group i's noise drawn from its own generator, so it does not depend on the other groups)."""
    if k == 1 or spread == 0 or len(todo) == 0:
        return parts
    rows = todo[(todo % k) != 0]
    if len(rows) == 0:
        return parts
    out = [p.clone() for p in parts]
    rms = torch.cat([p[rows].reshape(len(rows), -1) for p in parts], 1).pow(2).mean(1).sqrt()
    if isinstance(seed, int):
        g = torch.Generator().manual_seed(seed)
        draws = [torch.randn(p[rows].shape, generator=g, dtype=p.dtype) for p in out]
    else:  # per input: the K − 1 perturbed rows of group i from generator seed[i], latent parts in order
        groups = (rows // k).tolist()
        per_group = {i: torch.Generator().manual_seed(seed[i]) for i in dict.fromkeys(groups)}
        draws = [torch.stack([torch.randn(p.shape[1:], generator=per_group[i], dtype=p.dtype) for i in groups])
                 for p in out]
    for p, noise in zip(out, draws):
        noise = noise.to(p.device) * (spread * rms).reshape(-1, *([1] * (p.dim() - 1)))
        if mask is not None:
            noise = noise * mask[rows]
        p[rows] = p[rows] + noise
        if box is not None:
            p[rows] = p[rows].clamp(float(box[0]), float(box[1]))
    return out


def _check_log_density(gen: Any, x: torch.Tensor, batch_size: int) -> None:
    """For exact generators with a density (flows): log p(x) must be finite (a NaN log-det breaks the geometry)."""
    if gen.exact and gen.has_log_prob:
        for i in range(0, x.shape[0], batch_size):
            gen.log_prob(x[i : i + batch_size])  # raises ModelError naming the examples with a non-finite log-det


@contextlib.contextmanager
def _no_tf32():
    """Full float32 on CUDA for the duration (cuDNN convolutions and matmuls), restoring the global flags."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


def _preserved(models: list[nn.Module]) -> contextlib.ExitStack:
    """preserve_model_state for several models at once (each restored once, also on error)."""
    stack = contextlib.ExitStack()
    seen: list[nn.Module] = []
    for m in models:
        if all(m is not s for s in seen):
            seen.append(m)
            stack.enter_context(preserve_model_state(m))
    return stack
