"""Tests of ``manifex.metrics``.

Every registered metric is held to one generated contract (a table parametrised over ``METRICS``, as in
``test_attribution.py``): ``(N,)`` output, batched result = per-example results, gradients where declared,
the same input errors. Then each metric against a reference: NumPy for MSE and Pearson, an independent
direct-window SSIM in NumPy and scikit-image (a test extra) for SSIM, crafted inputs for output change and
perturbation size.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from manifex.errors import InputError
from manifex.metrics import (
    METRICS,
    Metric,
    OutputChange,
    PerturbationNorms,
    mse,
    normalize_map,
    output_change,
    pearson,
    perturbation_norms,
    ssim,
    top1_kept_rate,
)

try:  # scikit-image is a test extra; its comparison is skipped without it.
    from skimage.metrics import structural_similarity as skimage_ssim
except ImportError:  # pragma: no cover
    skimage_ssim = None

F64 = torch.float64
N = 5
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pair(category: str, n: int = N, seed: int = 0, dtype=F64) -> tuple[torch.Tensor, torch.Tensor]:
    """Two related batches of the kind a metric of ``category`` compares."""
    g = _gen(seed)
    if category == "similarity":
        a = torch.rand(n, 2, 16, 16, generator=g, dtype=dtype)
        return a, a + 0.3 * torch.randn(a.shape, generator=g, dtype=dtype)
    if category == "output":
        a = torch.randn(n, 4, generator=g, dtype=dtype)
        return a, a + 1.5 * torch.randn(a.shape, generator=g, dtype=dtype)
    a = torch.rand(n, 3, 6, 6, generator=g, dtype=dtype)
    return a, (a + 0.1 * torch.randn(a.shape, generator=g, dtype=dtype)).clamp(0, 1)


DIFFERENTIABLE = {"mse", "pearson", "ssim", "max_prob_change", "l2", "linf"}


# --------------------------------------------------------------------------------------------------
# generated contract


@pytest.mark.parametrize("name", sorted(METRICS))
class TestContract:
    def test_metadata(self, name):
        m = METRICS[name]
        assert isinstance(m, Metric)
        assert m.category in ("similarity", "output", "perturbation")
        assert isinstance(m.higher_is_better, bool)
        lo, hi = m.bounds
        assert lo < hi
        assert m.description

    def test_shape_dtype_and_bounds(self, name):
        m = METRICS[name]
        a, b = _pair(m.category)
        out = m(a, b)
        assert out.shape == (N,)
        assert out.dtype == F64
        assert bool(((out >= m.bounds[0] - 1e-12) & (out <= m.bounds[1] + 1e-12)).all())

    def test_batched_equals_per_example(self, name):
        m = METRICS[name]
        a, b = _pair(m.category)
        batched = m(a, b)
        single = torch.cat([m(a[i : i + 1], b[i : i + 1]) for i in range(N)])
        torch.testing.assert_close(batched, single, rtol=1e-12, atol=1e-12)

    def test_float32_and_mixed_dtype(self, name):
        m = METRICS[name]
        a, b = _pair(m.category)
        out32 = m(a.float(), b.float())
        assert out32.dtype == torch.float32
        torch.testing.assert_close(out32.double(), m(a, b), rtol=1e-4, atol=1e-5)
        assert m(a.float(), b).dtype == F64  # promoted, not an error

    def test_gradient(self, name):
        if name not in DIFFERENTIABLE:
            pytest.skip("not differentiable")
        m = METRICS[name]
        a, b = _pair(m.category)
        b = b.clone().requires_grad_(True)
        m(a, b).sum().backward()
        assert b.grad is not None and bool(torch.isfinite(b.grad).all()) and bool(b.grad.abs().sum() > 0)

    @pytest.mark.parametrize("device", DEVICES)
    def test_device(self, name, device):
        m = METRICS[name]
        a, b = _pair(m.category)
        out = m(a.to(device), b.to(device))
        assert out.device.type == device
        torch.testing.assert_close(out.cpu(), m(a, b))

    def test_errors(self, name):
        m = METRICS[name]
        a, b = _pair(m.category)
        with pytest.raises(InputError, match="same shape"):
            m(a, b[:-1])
        with pytest.raises(InputError, match="same shape"):
            m(a, b[..., :-1])
        for bad in (math.nan, math.inf):
            b2 = b.clone()
            b2.view(-1)[3] = bad
            with pytest.raises(InputError, match="NaN/inf"):
                m(a, b2)
        with pytest.raises(InputError, match="empty"):
            m(a[:0], b[:0])
        with pytest.raises(InputError, match="dimensions"):
            m(a[0].flatten(), b[0].flatten())  # no batch dimension
        with pytest.raises(InputError, match="torch.Tensor"):
            m(a.numpy(), b)
        with pytest.raises(InputError, match="floating-point"):
            m(a.long(), b.long())


# --------------------------------------------------------------------------------------------------
# map similarity


def test_normalize_map_abs_sum_matches_research_definition():
    h = torch.randn(3, 3, 8, 8, generator=_gen(1), dtype=F64)
    m = normalize_map(h)
    assert m.shape == (3, 8, 8)
    expected = h.abs().sum(1)
    expected = expected / expected.sum(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(m, expected)
    torch.testing.assert_close(m.sum(dim=(1, 2)), torch.ones(3, dtype=F64))


def test_normalize_map_signed_and_none():
    h = torch.randn(2, 3, 8, 8, generator=_gen(2), dtype=F64)
    s = normalize_map(h, "signed")
    torch.testing.assert_close(s.abs().sum(dim=(1, 2)), torch.ones(2, dtype=F64))
    torch.testing.assert_close(s, h.sum(1) / h.sum(1).abs().sum(dim=(1, 2), keepdim=True))
    torch.testing.assert_close(normalize_map(h, "none"), h.sum(1))
    torch.testing.assert_close(normalize_map(h[:, 0], "none"), h[:, 0])  # identity on (N, H, W)


def test_normalize_map_zero_map_and_errors():
    h = torch.zeros(2, 8, 8)
    h[1, 0, 0] = -2.0
    m = normalize_map(h)
    assert bool((m[0] == 0).all()) and float(m[1, 0, 0]) == 1.0
    with pytest.raises(InputError, match="mode"):
        normalize_map(h, "l2")
    with pytest.raises(InputError, match="dimensions"):
        normalize_map(h.flatten(1))


def test_mse_equals_manual():
    a, b = _pair("similarity")
    expected = torch.stack([((a[i] - b[i]) ** 2).sum() / a[i].numel() for i in range(N)])
    torch.testing.assert_close(mse(a, b), expected)
    assert bool((mse(a, a) == 0).all())


def test_pearson_equals_numpy_corrcoef():
    a, b = _pair("similarity")
    r = pearson(a, b)
    expected = [np.corrcoef(a[i].flatten().numpy(), b[i].flatten().numpy())[0, 1] for i in range(N)]
    np.testing.assert_allclose(r.numpy(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pearson(a, a), torch.ones(N, dtype=F64))
    torch.testing.assert_close(pearson(a, -3 * a + 1), -torch.ones(N, dtype=F64))
    torch.testing.assert_close(pearson(a, 7 * b - 2), r)  # invariant to affine rescaling


def test_pearson_constant_map_is_nan_with_zero_gradient():
    a, b = _pair("similarity", n=2)
    b = b.clone()
    b[0] = 0.25
    b.requires_grad_(True)
    r = pearson(a, b)
    assert math.isnan(float(r[0].detach())) and math.isfinite(float(r[1].detach()))
    r.nansum().backward()
    assert bool(torch.isfinite(b.grad).all()) and bool((b.grad[0] == 0).all()) and bool(b.grad[1].abs().sum() > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        assert np.isnan(np.corrcoef(a[0].flatten().numpy(), b[0].detach().flatten().numpy())[0, 1])


def _ssim_reference(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """SSIM by the textbook formula: every 11x11 window position in full, weights exp(-r^2 / 2 sigma^2),
    statistics as weighted sums, mean over all positions where the window fits (Wang et al. 2004)."""
    t = np.arange(-5, 6)
    w = np.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2 * 1.5**2))
    w /= w.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    wx = np.lib.stride_tricks.sliding_window_view(x, (11, 11))
    wy = np.lib.stride_tricks.sliding_window_view(y, (11, 11))
    mx, my = (wx * w).sum((-1, -2)), (wy * w).sum((-1, -2))
    vx = (w * (wx - mx[..., None, None]) ** 2).sum((-1, -2))
    vy = (w * (wy - my[..., None, None]) ** 2).sum((-1, -2))
    cxy = (w * (wx - mx[..., None, None]) * (wy - my[..., None, None])).sum((-1, -2))
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def _noisy_maps(n=6, size=28, noise=0.3, seed=3, dtype=F64):
    g = _gen(seed)
    a = torch.rand(n, size, size, generator=g, dtype=dtype)
    return a, a + noise * torch.randn(a.shape, generator=g, dtype=dtype)


def test_ssim_matches_independent_formula():
    a, b = _noisy_maps()
    s = ssim(a, b)
    for i in range(a.shape[0]):
        rng = float(torch.maximum(a[i].max(), b[i].max()) - torch.minimum(a[i].min(), b[i].min()))
        assert abs(float(s[i]) - _ssim_reference(a[i].numpy(), b[i].numpy(), rng)) < 1e-4
    # an explicit data_range, also per example
    assert abs(float(ssim(a[:1], b[:1], data_range=2.0)[0]) - _ssim_reference(a[0].numpy(), b[0].numpy(), 2.0)) < 1e-4
    per = torch.linspace(1.0, 3.0, a.shape[0], dtype=F64)
    ref = [_ssim_reference(a[i].numpy(), b[i].numpy(), float(per[i])) for i in range(a.shape[0])]
    np.testing.assert_allclose(ssim(a, b, data_range=per).numpy(), ref, atol=1e-4)


@pytest.mark.skipif(skimage_ssim is None, reason="scikit-image is not installed")
@pytest.mark.parametrize("channels", [None, 3])
def test_ssim_matches_scikit_image(channels):
    g = _gen(4)
    shape = (4, 28, 28) if channels is None else (4, channels, 28, 28)
    a = torch.rand(shape, generator=g, dtype=F64)
    b = a + 0.4 * torch.randn(shape, generator=g, dtype=F64)
    s = ssim(a, b)
    s32 = ssim(a.float(), b.float())
    for i in range(shape[0]):
        rng = float(torch.maximum(a[i].max(), b[i].max()) - torch.minimum(a[i].min(), b[i].min()))
        ref = skimage_ssim(a[i].numpy(), b[i].numpy(), data_range=rng, gaussian_weights=True, sigma=1.5,
                           use_sample_covariance=False, channel_axis=None if channels is None else 0)
        assert abs(float(s[i]) - ref) < 1e-4
        assert abs(float(s32[i]) - ref) < 1e-4


def test_ssim_identity_symmetry_range_and_noise_order():
    a, _ = _noisy_maps()
    torch.testing.assert_close(ssim(a, a), torch.ones(a.shape[0], dtype=F64))
    scores = []
    for k, noise in enumerate((0.05, 0.2, 0.5, 1.0)):
        b = a + noise * torch.randn(a.shape, generator=_gen(10 + k), dtype=F64)
        s = ssim(a, b)
        torch.testing.assert_close(s, ssim(b, a))
        assert bool(((s >= -1) & (s <= 1)).all())
        scores.append(s)
    for lower, higher in zip(scores[1:], scores[:-1]):
        assert bool((lower < higher).all())
    assert float(ssim(a, 1 - a).max()) < 0  # inverted structure, similar mean: below zero
    # the formula's quirk (documented): negating a map flips both the luminance and the structure term
    assert float(ssim(a, -a).min()) > 0.9


def test_ssim_on_normalised_maps_float32():
    """Normalised maps hold tiny values (~1/784); float32 must still agree with float64."""
    h = torch.randn(3, 3, 28, 28, generator=_gen(5), dtype=F64)
    h_adv = h + 0.5 * torch.randn(h.shape, generator=_gen(6), dtype=F64)
    a, b = normalize_map(h), normalize_map(h_adv)
    torch.testing.assert_close(ssim(a.float(), b.float()).double(), ssim(a, b), rtol=0, atol=1e-5)
    # the default data_range is per example, so SSIM does not change when both maps are rescaled
    torch.testing.assert_close(ssim(1e3 * a, 1e3 * b), ssim(a, b))


def test_ssim_constant_and_channel_handling():
    c = torch.full((2, 12, 12), 0.3, dtype=F64)
    torch.testing.assert_close(ssim(c, c), torch.ones(2, dtype=F64))
    a, b = _pair("similarity")
    per_channel = torch.stack([ssim(a[:, k], b[:, k], data_range=1.0) for k in range(a.shape[1])], 1).mean(1)
    torch.testing.assert_close(ssim(a, b, data_range=1.0), per_channel)


def test_ssim_gradcheck():
    g = _gen(7)
    a = torch.rand(2, 12, 13, generator=g, dtype=F64)
    b = (a + 0.2 * torch.randn(a.shape, generator=g, dtype=F64)).requires_grad_(True)
    rng = torch.tensor([1.0, 2.0], dtype=F64)
    assert torch.autograd.gradcheck(lambda y: ssim(a, y, data_range=rng), (b,), fast_mode=True)


def test_ssim_errors():
    a, b = _noisy_maps(n=2)
    with pytest.raises(InputError, match="at least 11x11"):
        ssim(a[:, :10], b[:, :10])
    with pytest.raises(InputError, match="dimensions"):
        ssim(a.flatten(1), b.flatten(1))
    with pytest.raises(InputError, match="dimensions"):
        ssim(a[:, None, None], b[:, None, None])
    for bad in (0.0, -1.0, math.nan, torch.tensor([1.0, 0.0])):
        with pytest.raises(InputError, match="data_range"):
            ssim(a, b, data_range=bad)
    with pytest.raises(InputError, match="data_range"):
        ssim(a, b, data_range=torch.ones(3))


# --------------------------------------------------------------------------------------------------
# output change


def test_output_change_crafted_logits():
    lo = torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=F64)
    la = torch.tensor([[0.0, math.log(3.0)], [2.0, 0.0]], dtype=F64)
    ch = output_change(lo, la)
    assert isinstance(ch, OutputChange)
    # (0.5, 0.5) -> (0.25, 0.75): every probability moves by 0.25; argmax 0 (first on ties) -> 1
    torch.testing.assert_close(ch.max_prob_change, torch.tensor([0.25, 0.0], dtype=F64))
    assert ch.top1_kept.dtype == torch.bool and ch.top1_kept.tolist() == [False, True]
    assert ch.top1_orig.tolist() == [0, 0] and ch.top1_adv.tolist() == [1, 0]

    lo3 = torch.log(torch.tensor([[0.7, 0.2, 0.1]], dtype=F64))
    la3 = torch.log(torch.tensor([[0.6, 0.05, 0.35]], dtype=F64)) + 5.0  # logits are shift-invariant
    ch3 = output_change(lo3, la3)
    torch.testing.assert_close(ch3.max_prob_change, torch.tensor([0.25], dtype=F64))
    assert ch3.top1_kept.tolist() == [True]


def test_top1_kept_rate():
    lo = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 2.0]])
    la = torch.tensor([[0.0, 1.0], [0.0, 1.0], [3.0, 1.0], [5.0, 2.0]])
    rate = top1_kept_rate(lo, la)
    assert rate.dim() == 0 and float(rate) == 0.5
    assert float(METRICS["top1_kept"](lo, la).mean()) == 0.5


def test_output_change_errors():
    with pytest.raises(InputError, match="at least 2 classes"):
        output_change(torch.zeros(3, 1), torch.zeros(3, 1))
    with pytest.raises(InputError, match="dimensions"):
        output_change(torch.zeros(3, 2, 1), torch.zeros(3, 2, 1))


# --------------------------------------------------------------------------------------------------
# perturbation size


def test_perturbation_norms_crafted():
    x = torch.zeros(2, 3, 2, 2, dtype=F64)
    x_adv = x.clone()
    x_adv[0, 0, 0, 0] = 0.5
    x_adv[0, 2, 1, 1] = -0.25
    x_adv[1] = 0.1
    p = perturbation_norms(x, x_adv)
    assert isinstance(p, PerturbationNorms)
    torch.testing.assert_close(p.l2, torch.tensor([math.sqrt(0.25 + 0.0625), math.sqrt(12 * 0.01)], dtype=F64))
    torch.testing.assert_close(p.linf, torch.tensor([0.5, 0.1], dtype=F64))

    # model space (p - mu) / sigma: sizes come back in [0, 1] pixel units
    half = perturbation_norms(x, x_adv, pixel_scale=0.5)
    torch.testing.assert_close(half.l2, p.l2 / 2)
    torch.testing.assert_close(half.linf, p.linf / 2)
    sigma = (0.229, 0.224, 0.225)
    per = perturbation_norms(x, x_adv, pixel_scale=sigma)
    torch.testing.assert_close(per.l2[0], torch.tensor(math.sqrt((0.5 * 0.229) ** 2 + (0.25 * 0.225) ** 2), dtype=F64))
    torch.testing.assert_close(per.linf, torch.tensor([0.5 * 0.229, 0.1 * 0.229], dtype=F64))
    torch.testing.assert_close(perturbation_norms(x, x_adv, pixel_scale=torch.tensor(sigma).view(1, 3, 1, 1)).l2, per.l2)


def test_perturbation_norms_round_trip_through_normalisation():
    """Pixels in [0, 1] normalised by (p - mu) / sigma: the reported size equals the size in pixel space."""
    g = _gen(8)
    p = torch.rand(3, 3, 8, 8, generator=g, dtype=F64)
    p_adv = (p + 0.05 * torch.randn(p.shape, generator=g, dtype=F64)).clamp(0, 1)
    mu = torch.tensor([0.485, 0.456, 0.406], dtype=F64).view(1, 3, 1, 1)
    sigma = torch.tensor([0.229, 0.224, 0.225], dtype=F64)
    model_space = perturbation_norms((p - mu) / sigma.view(1, 3, 1, 1), (p_adv - mu) / sigma.view(1, 3, 1, 1), sigma)
    pixel_space = perturbation_norms(p, p_adv)
    torch.testing.assert_close(model_space.l2, pixel_space.l2)
    torch.testing.assert_close(model_space.linf, pixel_space.linf)


def test_perturbation_norms_zero_change_has_zero_gradient():
    x = torch.rand(2, 4, dtype=F64)
    x_adv = x.clone().requires_grad_(True)
    perturbation_norms(x, x_adv).l2.sum().backward()
    assert bool((x_adv.grad == 0).all())


def test_perturbation_norms_errors():
    x = torch.zeros(2, 3, 4, 4)
    for bad in (0.0, -0.5, (0.2, 0.2), (0.2, -0.1, 0.2), math.inf):
        with pytest.raises(InputError, match="pixel_scale"):
            perturbation_norms(x, x, pixel_scale=bad)
