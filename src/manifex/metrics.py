"""Batched metrics for explanation manipulation (Dombrowski et al. 2019): map similarity, output change,
perturbation size, and a registry that states how to read each score.

Every function takes batch-first tensors and returns one value per example, shape ``(N,)``. Inputs stay
on their device (CPU or CUDA) and gradients flow where the metric is differentiable (``mse``, ``pearson``,
``ssim``, ``output_change().max_prob_change``, ``perturbation_norms``).

Explanation maps are ``(N, H, W)`` or ``(N, C, H, W)``. The metrics compare *whatever they are given*:
they never sum channels or normalise. To compare maps the way the research code did (sum of ``|relevance|``
over channels, normalised to sum 1), pass them through :func:`normalize_map` first::

    s = ssim(normalize_map(h_adv), normalize_map(h_target))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple, Sequence

import torch

from .errors import InputError, check_finite, check_tensor

__all__ = [
    "normalize_map",
    "mse",
    "pearson",
    "ssim",
    "OutputChange",
    "output_change",
    "top1_kept_rate",
    "PerturbationNorms",
    "perturbation_norms",
    "Metric",
    "METRICS",
]

MapNorm = Literal["abs_sum", "signed", "none"]
Category = Literal["similarity", "output", "perturbation"]


# --------------------------------------------------------------------------------------------------
# input checks shared by every metric


def _check_batch(t: object, name: str, *, ndim: int | Sequence[int] | None = None, min_ndim: int | None = None) -> torch.Tensor:
    t = check_tensor(t, name, ndim=ndim, min_ndim=min_ndim)
    if t.shape[0] == 0 or t.numel() == 0:
        raise InputError(f"{name} is empty (shape {tuple(t.shape)}); metrics need at least one example with at least one entry.")
    return check_finite(t, name)


def _check_pair(
    a: object,
    b: object,
    names: tuple[str, str],
    *,
    ndim: int | Sequence[int] | None = None,
    min_ndim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate two batches that are compared entry by entry; return them in a common dtype."""
    a = _check_batch(a, names[0], ndim=ndim, min_ndim=min_ndim)
    b = _check_batch(b, names[1], ndim=ndim, min_ndim=min_ndim)
    if a.shape != b.shape:
        raise InputError(
            f"{names[0]} and {names[1]} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}; "
            "compare maps of one batch with maps of the same size (reduce channels with normalize_map if needed)."
        )
    if a.device != b.device:
        raise InputError(f"{names[0]} is on {a.device} but {names[1]} is on {b.device}; move both to one device with .to(...).")
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


# --------------------------------------------------------------------------------------------------
# map preparation


def normalize_map(h: torch.Tensor, mode: MapNorm = "abs_sum") -> torch.Tensor:
    """Reduce explanation maps to one channel and normalise them per example.

    ``h``: ``(N, H, W)`` or ``(N, C, H, W)``; returns ``(N, H, W)`` (channels, if any, are summed).

    - ``"abs_sum"`` (the research code's comparison): ``sum_c |h|``, divided by its total so that each map
      sums to 1; a heat map of where relevance is, regardless of sign.
    - ``"signed"``: ``sum_c h`` (signs kept, so opposite channels can cancel), divided by the total of its
      absolute values so that ``sum |map| = 1``.
    - ``"none"``: ``sum_c h`` without scaling (the identity for ``(N, H, W)`` input).

    An all-zero map stays all zero (no division by zero). Differentiable.
    """
    if mode not in ("abs_sum", "signed", "none"):
        raise InputError(f"mode must be 'abs_sum', 'signed' or 'none', got {mode!r}.")
    h = _check_batch(h, "h", ndim=(3, 4))
    m = h.abs() if mode == "abs_sum" else h
    if m.dim() == 4:
        m = m.sum(dim=1)
    if mode == "none":
        return m
    total = m.abs().sum(dim=(1, 2), keepdim=True)
    return m / torch.where(total > 0, total, torch.ones_like(total))


# --------------------------------------------------------------------------------------------------
# map similarity


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per example, over every non-batch entry (channels included).

    ``a``, ``b``: ``(N, ...)`` of one shape; returns ``(N,)`` in squared map units. Lower is more similar.
    """
    a, b = _check_pair(a, b, ("a", "b"), min_ndim=2)
    return (a - b).square().flatten(1).mean(dim=1)


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation per example between all non-batch entries of ``a`` and ``b`` (as
    ``numpy.corrcoef`` of the flattened maps).

    ``a``, ``b``: ``(N, ...)`` of one shape; returns ``(N,)`` in ``[-1, 1]``, higher is more similar.
    Where either map is constant the correlation is undefined and the result is NaN (as in NumPy);
    gradients there are zero rather than NaN.
    """
    a, b = _check_pair(a, b, ("a", "b"), min_ndim=2)
    a = a.flatten(1)
    b = b.flatten(1)
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    na = torch.linalg.vector_norm(a, dim=1)
    nb = torch.linalg.vector_norm(b, dim=1)
    defined = (na > 0) & (nb > 0)
    denom = torch.where(defined, na * nb, torch.ones_like(na))
    r = ((a * b).sum(dim=1) / denom).clamp(-1.0, 1.0)
    return torch.where(defined, r, torch.full_like(r, math.nan))


# SSIM as defined by Wang et al. (2004) and scikit-image's
# structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False): local statistics
# under an 11x11 Gaussian window (sigma 1.5, i.e. scipy's truncate=3.5), averaged over the *valid* window
# positions only (no padding).
#
# Written by hand because no library fit. torchmetrics 1.9 (structural_similarity_index_measure) installs
# cleanly, but since its PR #2721 it averages over the full map computed on a reflect-padded input, which
# on a 28x28 map puts 59 % of the weight on border positions that see mirrored pixels; it is ~1e-2 away
# from Wang et al./scikit-image there (we need 1e-4). Its automatic data_range is also one value for the
# whole batch, so a score would depend on the other examples in the batch. scikit-image itself is NumPy
# only (no autograd, no CUDA). The maths is a few lines of separable convolutions.
_SSIM_SIGMA = 1.5
_SSIM_RADIUS = 5  # int(3.5 * sigma + 0.5): window 11 x 11
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03


def _gaussian_window(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=dtype, device=device)
    w = torch.exp(-0.5 * (x / _SSIM_SIGMA) ** 2)
    return w / w.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float | torch.Tensor | None = None) -> torch.Tensor:
    """Structural similarity per example (Wang et al. 2004; 11x11 Gaussian window, sigma 1.5, K1 0.01,
    K2 0.03; the mean over valid window positions, as scikit-image with ``gaussian_weights=True,
    use_sample_covariance=False``).

    ``a``, ``b``: ``(N, H, W)`` or ``(N, C, H, W)`` with ``H, W >= 11``. Channels are compared separately
    and the per-channel SSIMs averaged (scikit-image's ``channel_axis``). Returns ``(N,)`` in ``[-1, 1]``,
    higher is more similar; symmetric in ``a`` and ``b``; 1 for identical maps.

    ``data_range`` sets the constants ``C1 = (K1 * L)^2``, ``C2 = (K2 * L)^2``:

    - ``None`` (default): per example, ``L = max(a_i, b_i) - min(a_i, b_i)`` over both maps together, so a
      score does not depend on the rest of the batch and is invariant to rescaling both maps. It is treated
      as a constant (no gradient flows through it), so an optimiser cannot raise SSIM by stretching the
      range. If both maps are the same constant, ``L`` is set to 1 and SSIM is 1.
    - a positive float, or a tensor of shape ``(N,)`` with one positive value per example.

    Differentiable in ``a`` and ``b``.

    Beware of sign: ``ssim(h, -h)`` can be close to +1 (for maps whose local means are far from zero),
    because negating a map flips the sign of both the luminance and the structure term. Compare signed
    maps with :func:`pearson` too, or use ``ssim`` on ``normalize_map(h, "abs_sum")``.
    """
    a, b = _check_pair(a, b, ("a", "b"), ndim=(3, 4))
    if a.dim() == 3:
        a, b = a.unsqueeze(1), b.unsqueeze(1)
    n, c, height, width = a.shape
    size = 2 * _SSIM_RADIUS + 1
    if height < size or width < size:
        raise InputError(
            f"ssim needs maps of at least {size}x{size} (its Gaussian window), got {height}x{width}; "
            "upsample the maps (torch.nn.functional.interpolate) or compare them with pearson or mse."
        )
    if data_range is None:
        both = torch.cat([a.detach().flatten(1), b.detach().flatten(1)], dim=1)
        rng = both.amax(dim=1) - both.amin(dim=1)
        rng = torch.where(rng > 0, rng, torch.ones_like(rng))
    else:
        rng = torch.as_tensor(data_range, dtype=a.dtype, device=a.device)
        if rng.dim() == 0:
            rng = rng.expand(n)
        if rng.shape != (n,):
            raise InputError(f"data_range must be a number or a tensor of shape ({n},), got shape {tuple(rng.shape)}.")
        if not bool(torch.isfinite(rng).all()) or not bool((rng > 0).all()):
            raise InputError(f"data_range must be positive and finite, got {rng.tolist()[:10]}; it is the span of map values (max - min).")
    c1 = (_SSIM_K1 * rng).square().view(n, 1, 1, 1)
    c2 = (_SSIM_K2 * rng).square().view(n, 1, 1, 1)

    # Local means of x, y, x^2, y^2, xy in one separable, unpadded ("valid") convolution.
    w = _gaussian_window(a.dtype, a.device)
    stats = torch.stack([a, b, a * a, b * b, a * b], dim=0).reshape(5 * n * c, 1, height, width)
    stats = torch.nn.functional.conv2d(stats, w.view(1, 1, size, 1))
    stats = torch.nn.functional.conv2d(stats, w.view(1, 1, 1, size))
    mu_a, mu_b, e_aa, e_bb, e_ab = stats.reshape(5, n, c, height - size + 1, width - size + 1)
    var_a = e_aa - mu_a * mu_a
    var_b = e_bb - mu_b * mu_b
    cov = e_ab - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(dim=1)


# --------------------------------------------------------------------------------------------------
# output change


class OutputChange(NamedTuple):
    """How a manipulation changed the model's output; every field has shape ``(N,)``."""

    max_prob_change: torch.Tensor
    """``max_k |softmax(adv)_k - softmax(orig)_k|`` in probability units, in ``[0, 1]``; lower is better."""
    top1_kept: torch.Tensor
    """bool: the predicted class (argmax, first index on ties) is unchanged."""
    top1_orig: torch.Tensor
    """long: predicted class on the original input."""
    top1_adv: torch.Tensor
    """long: predicted class on the manipulated input."""


def _check_logits(logits_orig: object, logits_adv: object) -> tuple[torch.Tensor, torch.Tensor]:
    lo, la = _check_pair(logits_orig, logits_adv, ("logits_orig", "logits_adv"), ndim=2)
    if lo.shape[1] < 2:
        raise InputError(
            f"logits need at least 2 classes, got shape {tuple(lo.shape)}; for a single-logit binary model z "
            "pass torch.cat([torch.zeros_like(z), z], dim=1) (softmax of that is (1 - sigmoid(z), sigmoid(z)))."
        )
    return lo, la


def output_change(logits_orig: torch.Tensor, logits_adv: torch.Tensor) -> OutputChange:
    """Change of the model's output between original and manipulated inputs.

    ``logits_orig``, ``logits_adv``: ``(N, K)`` pre-softmax scores, ``K >= 2``. Returns an
    :class:`OutputChange` of ``(N,)`` tensors; ``max_prob_change`` is differentiable.
    """
    lo, la = _check_logits(logits_orig, logits_adv)
    dp = (torch.softmax(la, dim=1) - torch.softmax(lo, dim=1)).abs().amax(dim=1)
    top_o = lo.argmax(dim=1)
    top_a = la.argmax(dim=1)
    return OutputChange(max_prob_change=dp, top1_kept=top_o == top_a, top1_orig=top_o, top1_adv=top_a)


def top1_kept_rate(logits_orig: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """Fraction of the batch whose predicted class is unchanged: a 0-dim float tensor in ``[0, 1]``
    (a batch summary, unlike the per-example metrics). Inputs as in :func:`output_change`."""
    return _top1_kept(logits_orig, logits_adv).mean()


# --------------------------------------------------------------------------------------------------
# perturbation size


class PerturbationNorms(NamedTuple):
    """Size of ``x_adv - x`` in pixel units of ``[0, 1]``; both fields have shape ``(N,)``."""

    l2: torch.Tensor
    """Euclidean norm over all channels and pixels."""
    linf: torch.Tensor
    """Largest absolute change of any channel of any pixel."""


def _pixel_scale(pixel_scale: float | Sequence[float] | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(pixel_scale, dtype=x.dtype, device=x.device)
    if s.dim() == 1 and x.dim() >= 2 and s.shape[0] == x.shape[1] and s.shape[0] != 1:
        s = s.view(1, -1, *([1] * (x.dim() - 2)))  # one value per channel (dim 1)
    try:
        fits = torch.broadcast_shapes(s.shape, x.shape) == x.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise InputError(
            f"pixel_scale must be a number, one value per channel ({x.shape[1]}) or a tensor broadcastable to "
            f"{tuple(x.shape)}, got shape {tuple(s.shape)}."
        )
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise InputError("pixel_scale must be positive and finite: it is the std sigma of the model's input normalisation.")
    return s


def perturbation_norms(
    x: torch.Tensor, x_adv: torch.Tensor, pixel_scale: float | Sequence[float] | torch.Tensor = 1.0
) -> PerturbationNorms:
    """L2 and L-infinity size of the manipulation ``x_adv - x``, per example, in pixel units of ``[0, 1]``.

    ``x``, ``x_adv``: ``(N, ...)`` of one shape (e.g. ``(N, C, H, W)``), in the space the model reads.
    ``pixel_scale`` converts that space back to ``[0, 1]`` pixels: if the model reads ``(p - mu) / sigma``
    for pixels ``p`` in ``[0, 1]``, pass ``sigma`` (a number, one value per channel for dim 1 such as
    ImageNet's ``(0.229, 0.224, 0.225)``, or a tensor broadcastable to ``x``); ``mu`` cancels in the
    difference. Leave it at 1 for inputs already in ``[0, 1]``; for 8-bit pixels in ``[0, 255]`` pass
    ``1 / 255``. Differentiable (the L2 subgradient at zero is zero).
    """
    x, x_adv = _check_pair(x, x_adv, ("x", "x_adv"), min_ndim=2)
    d = ((x_adv - x) * _pixel_scale(pixel_scale, x)).flatten(1)
    return PerturbationNorms(
        l2=torch.linalg.vector_norm(d, ord=2, dim=1),
        linf=torch.linalg.vector_norm(d, ord=math.inf, dim=1),
    )


# --------------------------------------------------------------------------------------------------
# metric metadata (after Quantus): how to read a score, for reports and tables


@dataclass(frozen=True)
class Metric:
    """A per-example metric and how to read it.

    ``fn(first, second, **kwargs) -> (N,)``; what the two arguments are follows from ``category``:
    ``"similarity"``: two batches of explanation maps; ``"output"``: original and manipulated logits
    ``(N, K)``; ``"perturbation"``: original and manipulated inputs. ``higher_is_better`` is the score
    direction (for a manipulation: how well the manipulated map matches its target, how little the output
    and the input changed); ``bounds`` the range of possible values.
    """

    fn: Callable[..., torch.Tensor]
    higher_is_better: bool
    category: Category
    bounds: tuple[float, float] = (-math.inf, math.inf)
    description: str = ""

    def __call__(self, first: torch.Tensor, second: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.fn(first, second, **kwargs)


def _max_prob_change(logits_orig: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    return output_change(logits_orig, logits_adv).max_prob_change


def _top1_kept(logits_orig: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    change = output_change(logits_orig, logits_adv)
    return change.top1_kept.to(change.max_prob_change.dtype)


def _l2(x: torch.Tensor, x_adv: torch.Tensor, pixel_scale: float | Sequence[float] | torch.Tensor = 1.0) -> torch.Tensor:
    return perturbation_norms(x, x_adv, pixel_scale).l2


def _linf(x: torch.Tensor, x_adv: torch.Tensor, pixel_scale: float | Sequence[float] | torch.Tensor = 1.0) -> torch.Tensor:
    return perturbation_norms(x, x_adv, pixel_scale).linf


#: The metrics by name: ``{name: Metric(function, higher_is_better, category, bounds, description)}``, in three
#: categories: similarity of two maps, change of the output, size of the input change.
METRICS: dict[str, Metric] = {
    "mse": Metric(mse, higher_is_better=False, category="similarity", bounds=(0.0, math.inf),
                  description="mean squared difference of the maps"),
    "pearson": Metric(pearson, higher_is_better=True, category="similarity", bounds=(-1.0, 1.0),
                      description="Pearson correlation of the maps"),
    "ssim": Metric(ssim, higher_is_better=True, category="similarity", bounds=(-1.0, 1.0),
                   description="structural similarity of the maps (11x11 Gaussian window)"),
    "max_prob_change": Metric(_max_prob_change, higher_is_better=False, category="output", bounds=(0.0, 1.0),
                              description="largest change of a class probability"),
    "top1_kept": Metric(_top1_kept, higher_is_better=True, category="output", bounds=(0.0, 1.0),
                        description="1 if the predicted class is unchanged, else 0 (its mean is the kept rate)"),
    "l2": Metric(_l2, higher_is_better=False, category="perturbation", bounds=(0.0, math.inf),
                 description="L2 norm of the input change, pixels in [0, 1]"),
    "linf": Metric(_linf, higher_is_better=False, category="perturbation", bounds=(0.0, math.inf),
                   description="largest change of one pixel channel, pixels in [0, 1]"),
}
