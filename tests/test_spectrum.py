"""generator_spectrum: exact against the brute-force Jacobian SVD, randomised top-k against exact, the tangent space
it gives, and the first-order theory of latent steps (decode(z + λ∇_z) − x = λ J Jᵀ ∇_x f + O(λ²))."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import manifex
from manifex.errors import InputError, ModelError
from manifex.geometry import estimate_dimension, generator_spectrum
from manifex.models.flows import ImageFlow
from manifex.models.generators import as_generator, flatten_latent


def _decaying_decoder(k: int = 120, d: int = 200, seed: int = 0, decay: float = 6.0):
    """x = tanh(W z) with W's singular values exp(−i/decay): a smooth map with a decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn((d, k), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn((k, k), generator=g, dtype=torch.float64))
    W = U * torch.exp(-torch.arange(k, dtype=torch.float64) / decay) @ V.T
    return lambda z: torch.tanh(z @ W.T.to(z.dtype)).reshape(z.shape[0], 1, 10, d // 10)


def test_exact_spectrum_matches_brute_force_svd():
    dec = _decaying_decoder(k=12, d=30)
    z = torch.randn(3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sp = generator_spectrum(dec, z)
    assert sp.method == "exact" and sp.singular_values.shape == (3, 12) and sp.vectors.shape == (3, 12, 1, 10, 3)
    for i in range(3):
        J = torch.autograd.functional.jacobian(lambda v: dec(v[None])[0].reshape(-1), z[i])  # (d, k)
        U, s, Vh = torch.linalg.svd(J, full_matrices=False)
        torch.testing.assert_close(sp.singular_values[i], s)
        # Singular vectors up to sign: J = Σ s_j u_j v_jᵀ is sign-free.
        u = sp.vectors[i].reshape(12, -1)
        torch.testing.assert_close((u.T * sp.singular_values[i]) @ sp.right_vectors[i], J)
        torch.testing.assert_close(u @ u.T, torch.eye(12, dtype=torch.float64))
    torch.testing.assert_close(sp.dimension, estimate_dimension(sp.singular_values))


def test_randomized_top_k_matches_exact_within_one_percent():
    dec = _decaying_decoder(k=120, d=200)
    z = 0.3 * torch.randn(4, 120, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    exact = generator_spectrum(dec, z)
    fast = generator_spectrum(dec, z, top=8)
    assert fast.method == "randomized" and fast.singular_values.shape == (4, 8)
    rel = (fast.singular_values - exact.singular_values[:, :8]).abs() / exact.singular_values[:, :8]
    assert float(rel.max()) < 0.01
    # The leading subspaces agree: the cosines of the principal angles between the top-5 spans are ≈ 1.
    a = fast.vectors[:, :5].reshape(4, 5, -1)
    b = exact.vectors[:, :5].reshape(4, 5, -1)
    cos = torch.linalg.svdvals(a @ b.transpose(1, 2))
    assert float(cos.min()) > 0.999
    # method="auto" without top stays exact; an explicit randomized call without top is an error.
    assert generator_spectrum(dec, z[:1]).method == "exact"
    with pytest.raises(InputError, match="top"):
        generator_spectrum(dec, z, method="randomized")


def test_dimension_of_a_low_rank_decoder_and_tangent_space_for_alignment():
    """A decoder that only uses 3 of its 16 latent directions: the gap estimate says 3, and the tangent space of the
    leading vectors contains the decoder's directional derivatives (alignment 1) and excludes orthogonal vectors."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn((48, 3), generator=g, dtype=torch.float64)
    P = torch.randn((3, 16), generator=g, dtype=torch.float64)
    B = torch.randn((16, 48), generator=g, dtype=torch.float64)
    dec = lambda z: (torch.sin(z @ P.T @ A.T) + 1e-6 * z @ B).reshape(-1, 1, 6, 8)  # noqa: E731
    z = torch.randn((5, 16), generator=g, dtype=torch.float64)
    sp = generator_spectrum(dec, z)
    assert sp.dimension.tolist() == [3] * 5
    T = sp.tangent_space()
    assert T.basis.shape == (5, 3, 1, 6, 8) and T.rank.tolist() == [3] * 5
    _, jv = torch.func.jvp(dec, (z,), (torch.randn((5, 16), generator=g, dtype=torch.float64),))
    torch.testing.assert_close(manifex.alignment(jv, T), torch.ones(5, dtype=torch.float64), atol=1e-6, rtol=0)
    ortho = torch.randn((5, 1, 6, 8), generator=g, dtype=torch.float64)
    ortho = ortho - manifex.project(ortho, T)
    assert float(manifex.alignment(ortho, T).max()) < 1e-8
    assert sp.tangent_space(2).rank.tolist() == [2] * 5
    with pytest.raises(InputError, match="tangent dimension"):
        sp.tangent_space(17)


def test_first_order_theory_latent_step_is_preconditioned_pixel_step():
    """decode(z + λ ∇_z f(decode(z))) − x = λ J Jᵀ ∇_x f + O(λ²): the residual's log-log slope in λ is 2, and
    J Jᵀ ∇_x f computed from the spectrum (U Σ² Uᵀ) equals the JVP of the latent gradient."""
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 20), nn.Sigmoid()).double()
    f = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    z = torch.randn(3, 6, dtype=torch.float64)
    x = dec(z).detach()
    xr = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(f(xr).sum(), xr)  # ∇_x f
    zr = z.clone().requires_grad_(True)
    (gz,) = torch.autograd.grad(f(dec(zr)).sum(), zr)  # ∇_z f(decode(z)) = Jᵀ ∇_x f
    sp = generator_spectrum(dec, z)
    U = sp.vectors.reshape(3, 6, 20)
    jjt_g = torch.einsum("nrd,nr,nre,ne->nd", U, sp.singular_values**2, U, gx)
    _, jgz = torch.func.jvp(dec, (z,), (gz,))
    torch.testing.assert_close(jjt_g, jgz.detach())
    lams = torch.logspace(-4, -1, 7, dtype=torch.float64)
    res = torch.stack([(dec(z + lam * gz).detach() - x - lam * jjt_g).norm(dim=1) for lam in lams])  # (7, 3)
    slope = torch.stack([torch.linalg.lstsq(torch.stack([lams.log(), torch.ones(7, dtype=torch.float64)], 1),
                                            res[:, i].log()[:, None]).solution[0, 0] for i in range(3)])
    assert bool(((slope - 2).abs() < 0.05).all()), slope


def test_multiscale_latent_and_generator_input():
    torch.manual_seed(0)
    flow = ImageFlow((1, 8, 8), levels=2, blocks=1, hidden=4).double()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 0.9 + 0.05
    flow.initialize(x)
    gen = as_generator(flow)
    z = gen.encode(x)
    sp = generator_spectrum(gen, z)
    assert sp.singular_values.shape == (2, 64) and sp.vectors.shape == (2, 64, 1, 8, 8)
    # A flow is a bijection: the absolute determinant of J is the product of its singular values.
    _, log_det_inv = flow.encode_and_log_det(x)
    torch.testing.assert_close(sp.singular_values.log().sum(1), -log_det_inv.detach())
    fast = generator_spectrum(gen, z, top=4, method="randomized", power_iters=4)
    assert float(((fast.singular_values - sp.singular_values[:, :4]).abs() / sp.singular_values[:, :4]).max()) < 0.05
    assert sp.right_vectors.shape == (2, 64, flatten_latent(z).shape[1])


def test_bad_input():
    dec = _decaying_decoder(k=12, d=30)
    z = torch.randn(2, 12, dtype=torch.float64)
    with pytest.raises(InputError, match="top"):
        generator_spectrum(dec, z, top=13)
    with pytest.raises(InputError, match="NaN"):
        generator_spectrum(dec, torch.full((1, 12), math.nan, dtype=torch.float64))
    with pytest.raises(ModelError, match="zero"):
        generator_spectrum(lambda v: torch.zeros(v.shape[0], 5, dtype=v.dtype) + 0 * v.sum(1, keepdim=True), z)
    with pytest.raises(InputError, match="method"):
        generator_spectrum(dec, z, method="lanczos")


def test_decoders_that_vmap_cannot_trace_use_the_stacked_fallback():
    """Data-dependent Python control flow breaks vmap; the batch-stacking fallback gives the same spectrum."""
    plain = _decaying_decoder(k=40, d=60)

    def branchy(z):
        if float(z.detach().abs().max()) > 1e6:  # .item() on a batched tensor: vmap cannot trace this
            raise AssertionError
        return plain(z)

    z = 0.3 * torch.randn(3, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for kw in ({}, {"top": 4, "method": "randomized"}):
        a, b = generator_spectrum(plain, z, **kw), generator_spectrum(branchy, z, **kw)
        torch.testing.assert_close(a.singular_values, b.singular_values)
