"""Tests of manifex.geometry: tangent spaces (forward-mode JVP + SVD) and the projection / alignment layer.

The reference for exactness is the research seed's method: one ``torch.autograd.grad`` per output pixel
for a single image, then ``scipy.linalg.orth`` — run here in float64 on a few latent codes.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F

from manifex.errors import InputError, ModelError, RankDeficientWarning
from manifex.geometry import (
    TangentSpace,
    alignment,
    decoder_jacobian,
    decompose,
    estimate_dimension,
    project,
    random_baseline,
    tangent_coefficients,
    tangent_mass,
    tangent_space,
)

# torch's first forward-mode call jit-scripts its JVP decompositions (torch/_decomp/decompositions_for_jvp.py),
# which warns in torch ≥ 2.10; that is torch-internal and harmless.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

K = 10
SIDE = 32
D = SIDE * SIDE


class VAEDecoder(nn.Module):
    """The seed's VAE decoder: k → 256 → 256 → 512 → (32, 4, 4) → 3 ConvTranspose2d (4→8→16→32) → sigmoid.

    ``upsample`` (e.g. 256) appends a bilinear ``F.interpolate`` to that side length.
    """

    def __init__(self, k: int = K, upsample: int | None = None):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(k, 256), nn.ReLU(),
            nn.Linear(256, 256), nn.ReLU(),
            nn.Linear(256, 512), nn.ReLU(),
        )
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(32, 1, 4, stride=2, padding=1),
        )
        self.upsample = upsample

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = torch.sigmoid(self.deconv(self.fc(z).view(-1, 32, 4, 4)))
        if self.upsample is not None:
            x = F.interpolate(x, size=self.upsample, mode="bilinear", align_corners=False)
        return x


def make_decoder(k: int = K, seed: int = 0, upsample: int | None = None) -> VAEDecoder:
    torch.manual_seed(seed)
    return VAEDecoder(k, upsample).eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)  # every test starts from the same global RNG state


@pytest.fixture(scope="module")
def decoder() -> VAEDecoder:
    return make_decoder()


@pytest.fixture(scope="module")
def codes() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, K, generator=g)


@pytest.fixture(scope="module")
def tangent(decoder, codes) -> TangentSpace:
    with warnings.catch_warnings():
        warnings.simplefilter("error", RankDeficientWarning)
        return tangent_space(decoder, codes)


def seed_reference_jacobian(decoder, z1: torch.Tensor) -> np.ndarray:
    """The seed's method: one backward pass per output pixel of a single image → J (d, k)."""
    z = z1.detach().clone().unsqueeze(0).requires_grad_(True)
    x_flat = decoder(z).reshape(-1)
    J = np.zeros((x_flat.numel(), z.shape[1]), dtype=np.float64)
    for i in range(x_flat.numel()):
        (g,) = torch.autograd.grad(x_flat[i], z, retain_graph=True)
        J[i] = g[0].detach().cpu().numpy()
    return J


def as_columns(basis_rows: torch.Tensor, rank: int) -> np.ndarray:
    """Basis rows (r, *x_shape) of one sample → (d, rank) columns as float64 NumPy."""
    return basis_rows[:rank].reshape(rank, -1).T.detach().cpu().double().numpy()


def max_angle(A: np.ndarray, B: np.ndarray) -> float:
    return float(np.max(scipy.linalg.subspace_angles(A, B)))


# --------------------------------------------------------------------------------------------------------
# tangent_space: exactness against the slow per-pixel reference
# --------------------------------------------------------------------------------------------------------


def test_exact_vs_per_pixel_backward_reference_float64():
    dec64 = make_decoder(seed=3).double()
    z = torch.randn(2, K, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    T = tangent_space(dec64, z)
    assert T.basis.dtype == torch.float64 and T.singular_values.dtype == torch.float64
    assert T.basis.shape == (2, K, 1, SIDE, SIDE)
    for i in range(2):
        J = seed_reference_jacobian(dec64, z[i])
        U_ref = scipy.linalg.orth(J)
        assert U_ref.shape == (D, K)
        assert int(T.rank[i]) == K
        assert max_angle(U_ref, as_columns(T.basis[i], K)) < 1e-4
        s_ref = np.linalg.svd(J, compute_uv=False)
        np.testing.assert_allclose(T.singular_values[i].numpy(), s_ref, rtol=1e-10, atol=1e-14)
        # The Jacobian itself, too (decoder_jacobian rows are J's columns).
        J_fwd = decoder_jacobian(dec64, z[i : i + 1])[0].reshape(K, -1).T.numpy()
        np.testing.assert_allclose(J_fwd, J, rtol=1e-9, atol=1e-13)


# --------------------------------------------------------------------------------------------------------
# tangent_space: basis properties, chunking, arbitrary callables
# --------------------------------------------------------------------------------------------------------


def test_basis_shape_orthonormal_and_full_rank(tangent, codes):
    n = codes.shape[0]
    assert isinstance(tangent, TangentSpace)
    assert tangent.basis.shape == (n, K, 1, SIDE, SIDE)
    assert tangent.basis.dtype == torch.float32
    assert tangent.rank.tolist() == [K] * n
    assert tangent.singular_values.shape == (n, K)
    s = tangent.singular_values
    assert bool((s[:, :-1] >= s[:, 1:]).all()) and bool((s > 0).all())
    assert tangent.x_shape == (1, SIDE, SIDE) and tangent.dim == D and tangent.latent_dim == K and len(tangent) == n
    U = tangent.flat()
    assert U.shape == (n, K, D)
    gram = U @ U.transpose(1, 2)
    torch.testing.assert_close(gram, torch.eye(K).expand(n, K, K), atol=1e-5, rtol=0)
    # indexing keeps everything consistent
    sub = tangent[2:5]
    assert len(sub) == 3 and torch.equal(sub.basis, tangent.basis[2:5]) and sub.rank.tolist() == [K] * 3
    assert tangent.to(torch.float64).basis.dtype == torch.float64


def test_chunking_invariance(decoder, codes, tangent):
    z = codes[:6]
    small = tangent_space(decoder, z, max_rows=3)  # splits the 10 latent directions into chunks 3,3,3,1
    large = tangent_space(decoder, z, max_rows=1000)  # all 60 (sample, direction) rows in one pass
    assert small.rank.tolist() == large.rank.tolist() == [K] * 6
    torch.testing.assert_close(small.singular_values, large.singular_values, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(small.singular_values, tangent.singular_values[:6], rtol=1e-4, atol=1e-7)
    for i in range(6):
        assert max_angle(as_columns(small.basis[i], K), as_columns(large.basis[i], K)) < 1e-3
    # the Jacobians themselves agree
    J3 = decoder_jacobian(decoder, z, max_rows=3)
    J1000 = decoder_jacobian(decoder, z, max_rows=1000)
    assert J3.shape == (6, K, 1, SIDE, SIDE)
    torch.testing.assert_close(J3, J1000, rtol=1e-4, atol=1e-7)
    # the progress bar changes nothing
    with_bar = tangent_space(decoder, z[:2], progress=True)
    for i in range(2):
        assert max_angle(as_columns(with_bar.basis[i], K), as_columns(large.basis[i], K)) < 1e-3


def test_any_callable_linear_map_gives_column_space_exactly():
    g = torch.Generator().manual_seed(5)
    M = torch.randn(D, K, generator=g, dtype=torch.float64)
    b = torch.randn(D, generator=g, dtype=torch.float64)
    fn = lambda z: (z @ M.T + b).reshape(-1, 1, SIDE, SIDE)  # noqa: E731
    z = torch.randn(4, K, generator=g, dtype=torch.float64)
    T = tangent_space(fn, z)
    assert T.rank.tolist() == [K] * 4
    U_ref = scipy.linalg.orth(M.numpy())
    s_ref = np.linalg.svd(M.numpy(), compute_uv=False)
    for i in range(4):
        assert max_angle(U_ref, as_columns(T.basis[i], K)) < 1e-10
        np.testing.assert_allclose(T.singular_values[i].numpy(), s_ref, rtol=1e-12)
    # float32 version of the same map
    M32, b32 = M.float(), b.float()
    T32 = tangent_space(lambda z: (z @ M32.T + b32).reshape(-1, 1, SIDE, SIDE), z.float())
    for i in range(4):
        assert max_angle(U_ref, as_columns(T32.basis[i], K)) < 1e-4


def test_float32_gram_path_matches_per_pixel_reference_in_float64(decoder):
    """float32 tangent spaces (Gram-matrix path) against the seed's per-pixel loop on a float64 copy of the decoder."""
    z = torch.randn(3, K, generator=torch.Generator().manual_seed(31))
    T = tangent_space(decoder, z)
    assert T.basis.dtype == torch.float32 and T.rank.tolist() == [K] * 3
    J = seed_reference_jacobian(make_decoder().double(), z[1].double())  # same weights (same seed) in float64
    s_ref = np.linalg.svd(J, compute_uv=False)
    # float32 rounding of J bounds the agreement: angles ~1e-6 rad, singular values ~1e-7 relative
    assert max_angle(scipy.linalg.orth(J), as_columns(T.basis[1], K)) < 1e-5
    np.testing.assert_allclose(T.singular_values[1].double().numpy(), s_ref, rtol=1e-5)


@pytest.mark.parametrize(
    "spectrum, rank",
    [
        (torch.logspace(0, -3, K, dtype=torch.float64), K),  # condition number 1e3
        (torch.cat([torch.logspace(0, -2, 7, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)]), 7),
        # around the float32 rank threshold max(d, k)·eps = 1.2e-4: 3e-4 is kept, 1e-6 dropped
        (torch.tensor([1, 0.5, 0.2, 0.1, 5e-2, 1e-2, 5e-3, 1e-3, 3e-4, 1e-6], dtype=torch.float64), 9),
    ],
    ids=["graded", "rank7", "threshold"],
)
def test_float32_ranks_subspaces_match_svd_on_hard_spectra(spectrum, rank):
    """The Gram path (float32 Jacobian) gives the ranks of an SVD and subspaces at least as close to the exact ones.

    The Jacobian of z ↦ M z is exactly M (stored in float32), so the float64 SVD of that M is the truth; the
    former method — a float32 SVD of the Jacobian — is the yardstick.
    """
    g = torch.Generator().manual_seed(32)
    U = torch.linalg.qr(torch.randn(D, K, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(K, K, generator=g, dtype=torch.float64))[0]
    M = ((U * spectrum) @ V.T).float()
    z = torch.randn(3, K, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankDeficientWarning)
        T = tangent_space(lambda z: (z @ M.T).reshape(-1, 1, SIDE, SIDE), z)
    u_true, s_true, _ = np.linalg.svd(M.double().numpy(), full_matrices=False)
    _, s_svd, vh_svd = torch.linalg.svd(M.T.contiguous(), full_matrices=False)  # float32, as before
    assert T.rank.tolist() == [rank] * 3
    assert int((s_true > T.rtol * s_true[0]).sum()) == int((s_svd > T.rtol * s_svd[0]).sum()) == rank
    angle_svd = max_angle(u_true[:, :rank], vh_svd[:rank].T.double().numpy())
    for i in range(3):
        angle = max_angle(u_true[:, :rank], as_columns(T.basis[i], rank))
        assert angle <= max(angle_svd, 1e-6)
        s = T.singular_values[i].double().numpy()
        assert np.abs(s - s_true).max() <= np.abs(s_svd.double().numpy() - s_true).max() + 1e-9
        B = T.flat()[i, :rank].double()
        assert float((B @ B.T - torch.eye(rank, dtype=torch.float64)).abs().max()) < 1e-4
        assert torch.count_nonzero(T.flat()[i, rank:]) == 0


def test_gram64_blocks_equal_one_product():
    from manifex.geometry.tangent import _gram64

    rows = torch.randn(3, 4, 1000, generator=torch.Generator().manual_seed(33))
    full = _gram64(rows)
    r64 = rows.double()
    torch.testing.assert_close(full, r64 @ r64.transpose(1, 2), rtol=1e-14, atol=1e-12)
    torch.testing.assert_close(_gram64(rows, block_bytes=8 * 3 * 4 * 7), full, rtol=1e-14, atol=1e-12)  # 7 columns a block
    torch.testing.assert_close(_gram64(rows.transpose(1, 2).contiguous().transpose(1, 2), block_bytes=1000), full,
                               rtol=1e-14, atol=1e-12)  # strided rows


# --------------------------------------------------------------------------------------------------------
# tangent_space: rank deficiency and errors
# --------------------------------------------------------------------------------------------------------


def test_decoder_using_three_of_five_latents_is_rank_three():
    inner = make_decoder(k=3, seed=6)
    z = torch.randn(4, 5, generator=torch.Generator().manual_seed(7))
    with pytest.warns(RankDeficientWarning):
        T = tangent_space(lambda z: inner(z[:, :3]), z)
    assert T.rank.tolist() == [3] * 4
    assert T.basis.shape == (4, 3, 1, SIDE, SIDE)
    assert T.singular_values.shape == (4, 5)
    assert bool((T.singular_values[:, 3:] <= T.rtol * T.singular_values[:, :1]).all())
    U = T.flat()
    torch.testing.assert_close(U @ U.transpose(1, 2), torch.eye(3).expand(4, 3, 3), atol=1e-5, rtol=0)
    # the same subspace as the 3-latent decoder's own tangent space
    T3 = tangent_space(inner, z[:, :3])
    for i in range(4):
        assert max_angle(as_columns(T.basis[i], 3), as_columns(T3.basis[i], 3)) < 1e-3


def test_ranks_differing_within_batch_zero_rows_beyond_rank():
    g = torch.Generator().manual_seed(8)
    A = torch.randn(5, D, generator=g)
    fn = lambda z: (torch.relu(z) @ A).reshape(-1, 1, SIDE, SIDE)  # noqa: E731
    # rank of sample i = number of positive latent coordinates
    z = torch.tensor(
        [[1.0, 2.0, 0.5, 1.5, 0.7], [1.0, -1.0, 2.0, -3.0, -0.5], [-1.0, -2.0, 0.3, -0.1, -4.0]]
    )
    with pytest.warns(RankDeficientWarning):
        T = tangent_space(fn, z)
    assert T.rank.tolist() == [5, 2, 1]
    assert T.basis.shape == (3, 5, 1, SIDE, SIDE)
    U = T.flat()
    for i, r in enumerate(T.rank.tolist()):
        assert torch.count_nonzero(U[i, r:]) == 0  # exactly zero rows
        torch.testing.assert_close(U[i, :r] @ U[i, :r].T, torch.eye(r), atol=1e-5, rtol=0)
        active = (z[i] > 0).nonzero().flatten()
        ref = scipy.linalg.orth(A[active].T.double().numpy())
        assert max_angle(ref, as_columns(T.basis[i], r)) < 1e-4
    # projections ignore the zero rows
    E = torch.randn(3, 1, SIDE, SIDE, generator=g)
    p = project(E, T)
    for i, r in enumerate(T.rank.tolist()):
        torch.testing.assert_close(p[i].reshape(-1), U[i, :r].T @ (U[i, :r] @ E[i].reshape(-1)), atol=1e-5, rtol=1e-5)
    mass = tangent_mass(T)
    torch.testing.assert_close(mass.reshape(3, -1).sum(1), T.rank.float(), atol=1e-4, rtol=0)


def test_decoder_ignoring_z_raises_model_error():
    const = torch.rand(1, 1, SIDE, SIDE)
    fn = lambda z: const.expand(z.shape[0], -1, -1, -1) + 0 * z.sum(1).view(-1, 1, 1, 1)  # noqa: E731
    with pytest.raises(ModelError):
        tangent_space(fn, torch.randn(2, K))


def test_decoder_with_detach_raises_model_error(decoder):
    with pytest.raises(ModelError):
        tangent_space(lambda z: decoder(z).detach(), torch.randn(2, K))
    with pytest.raises(ModelError):
        tangent_space(lambda z: decoder(z.detach()), torch.randn(2, K))


def test_decoder_not_batch_first_raises_model_error(decoder):
    with pytest.raises(ModelError):
        tangent_space(lambda z: decoder(z).sum(0), torch.randn(2, K))


@pytest.mark.parametrize(
    "z",
    [
        torch.ones(K),  # missing batch dimension
        torch.ones(2, K, 1),  # too many dimensions
        torch.zeros(0, K),  # empty batch
        torch.ones(2, K, dtype=torch.long),  # not floating point
    ],
)
def test_bad_z_shape_or_dtype_raises_input_error(decoder, z):
    with pytest.raises(InputError):
        tangent_space(decoder, z)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_z_raises_input_error(decoder, bad):
    z = torch.randn(3, K)
    z[1, 4] = bad
    with pytest.raises(InputError):
        tangent_space(decoder, z)


def test_non_finite_jacobian_raises_model_error():
    fn = lambda z: torch.sqrt(z.sum(1)).view(-1, 1, 1, 1) * torch.ones(1, 1, 4, 4)  # noqa: E731
    with pytest.raises(ModelError):
        tangent_space(fn, torch.zeros(2, 3))  # d sqrt(x)/dx = inf at 0


# --------------------------------------------------------------------------------------------------------
# alignment
# --------------------------------------------------------------------------------------------------------


def test_alignment_in_tangent_space_is_one_and_orthogonal_is_zero(tangent):
    n = len(tangent)
    g = torch.Generator().manual_seed(9)
    U = tangent.flat()
    coef = torch.randn(n, K, generator=g)
    E_in = torch.einsum("nrd,nr->nd", U, coef).reshape(n, 1, SIDE, SIDE)
    torch.testing.assert_close(alignment(E_in, tangent), torch.ones(n), atol=1e-5, rtol=0)
    R = torch.randn(n, D, generator=g)
    E_out = R - torch.einsum("nrd,nr->nd", U, torch.einsum("nrd,nd->nr", U, R))
    E_out = E_out - torch.einsum("nrd,nr->nd", U, torch.einsum("nrd,nd->nr", U, E_out))  # re-orthogonalise
    a = alignment(E_out.reshape(n, 1, SIDE, SIDE), tangent)
    assert a.shape == (n,)
    assert float(a.abs().max()) < 1e-4
    # mixtures: alignment = cos of the angle to the tangent space
    mix = E_in / E_in.reshape(n, -1).norm(dim=1).view(-1, 1, 1, 1) * 3.0 + E_out.reshape(n, 1, SIDE, SIDE) / E_out.norm(dim=1).view(-1, 1, 1, 1) * 4.0
    torch.testing.assert_close(alignment(mix, tangent), torch.full((n,), 0.6), atol=1e-5, rtol=0)


def test_alignment_of_random_vectors_matches_random_baseline_fixed_basis():
    n = 2000
    g = torch.Generator().manual_seed(10)
    Q, _ = torch.linalg.qr(torch.randn(D, K, generator=g, dtype=torch.float64))
    basis = Q.T.float().reshape(1, K, 1, SIDE, SIDE).expand(n, -1, -1, -1, -1)
    E = torch.randn(n, 1, SIDE, SIDE, generator=g)
    a = alignment(E, basis)
    base = random_baseline(K, D)
    assert abs(float(a.mean()) - base) / base < 0.05  # acceptance criterion: within 5 %
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_alignment_of_random_vectors_matches_random_baseline_decoder(tangent):
    n_t = len(tangent)
    reps = 125  # 16 × 125 = 2000 random attributions, each against one decoder tangent space
    idx = torch.arange(n_t).repeat(reps)
    basis = tangent.basis[idx]
    E = torch.randn(len(idx), 1, SIDE, SIDE, generator=torch.Generator().manual_seed(11))
    a = alignment(E, basis)
    base = random_baseline(K, D)
    assert abs(float(a.mean()) - base) / base < 0.05


def test_alignment_accepts_plain_tensors_and_basis_tensor(tangent):
    n = len(tangent)
    g = torch.Generator().manual_seed(12)
    E = torch.randn(n, 1, SIDE, SIDE, generator=g)  # what Captum's attribute() returns for (N, 1, 32, 32) inputs
    a_ts = alignment(E, tangent)
    a_basis = alignment(E, tangent.basis)
    torch.testing.assert_close(a_ts, a_basis)
    # flattened attributions (N, d) are reshaped
    torch.testing.assert_close(alignment(E.reshape(n, -1), tangent), a_ts)
    # float64 attributions work against a float32 basis
    torch.testing.assert_close(alignment(E.double(), tangent).float(), a_ts, atol=1e-6, rtol=1e-5)
    # reference formula
    U = tangent.flat()
    ref = torch.einsum("nrd,nd->nr", U, E.reshape(n, -1)).norm(dim=1) / E.reshape(n, -1).norm(dim=1)
    torch.testing.assert_close(a_ts, ref, atol=1e-6, rtol=1e-5)
    # scale invariance
    torch.testing.assert_close(alignment(-7.5 * E, tangent), a_ts, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "shape",
    # (N, H, W, 1) is channels-last: same size, other layout, so it must be refused, not reshaped
    [(16, 1, 16, 16), (15, 1, SIDE, SIDE), (16, 3, SIDE, SIDE), (16,), (16, SIDE, SIDE, 1)],
)
def test_alignment_wrong_shape_raises_input_error(tangent, shape):
    with pytest.raises(InputError):
        alignment(torch.randn(*shape), tangent)


def test_alignment_non_finite_or_non_tensor_raises_input_error(tangent):
    E = torch.randn(len(tangent), 1, SIDE, SIDE)
    E[3, 0, 5, 5] = float("nan")
    with pytest.raises(InputError):
        alignment(E, tangent)
    E[3, 0, 5, 5] = float("inf")
    with pytest.raises(InputError):
        alignment(E, tangent)
    with pytest.raises(InputError):
        alignment(np.zeros((len(tangent), 1, SIDE, SIDE)), tangent)
    with pytest.raises(InputError):
        alignment(torch.randn(len(tangent), 1, SIDE, SIDE), torch.randn(len(tangent), K))  # basis needs ≥ 3 dims


def test_alignment_zero_attribution_is_nan_with_warning(tangent):
    E = torch.randn(len(tangent), 1, SIDE, SIDE)
    E[2] = 0.0
    with pytest.warns(RuntimeWarning):
        a = alignment(E, tangent)
    assert math.isnan(float(a[2]))
    assert bool(torch.isfinite(a[torch.arange(len(tangent)) != 2]).all())


@pytest.mark.parametrize(
    "dtype, scales",
    [
        # float32: ‖1e20·e‖² overflows and ‖1e-22·e‖² underflows; 1e-40 is subnormal
        (torch.float32, [1e20, 1e-22, 1e-40, 3e35]),
        # float64: the same failure modes further out
        (torch.float64, [1e160, 1e-170, 1e300, 1e-310]),
    ],
)
def test_alignment_is_scale_invariant_at_extreme_scales(dtype, scales):
    n = 6
    g = torch.Generator().manual_seed(21)
    Q, _ = torch.linalg.qr(torch.randn(D, K, generator=g, dtype=torch.float64))
    basis = Q.T.to(dtype).reshape(1, K, 1, SIDE, SIDE).expand(n, -1, -1, -1, -1)
    E_tan = torch.einsum("rd,nr->nd", Q.T, torch.randn(n, K, generator=g, dtype=torch.float64)).to(dtype)
    E_tan = E_tan.reshape(n, 1, SIDE, SIDE)
    E_rand = torch.randn(n, 1, SIDE, SIDE, generator=g, dtype=dtype)
    a_rand = alignment(E_rand, basis)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for scale in scales:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "exactly zero" warning: these attributions are not zero
            a_tan = alignment(E_tan * scale, basis)
            a_r = alignment(E_rand * scale, basis)
        torch.testing.assert_close(a_tan, torch.ones(n, dtype=dtype), atol=tol, rtol=0)
        # subnormal entries carry fewer mantissa bits: same score to their precision
        sub = abs(scale) < 1e-37 if dtype == torch.float32 else abs(scale) < 1e-300
        torch.testing.assert_close(a_r, a_rand, atol=1e-4 if sub else tol, rtol=0)
        assert float(a_r.min()) > 0.01  # not 0.0
        # projections scale linearly and stay finite
        par, perp = decompose(E_rand * scale, basis)
        assert bool(torch.isfinite(par).all()) and bool(torch.isfinite(perp).all())
        if not sub and scale < 1e30:
            torch.testing.assert_close(par / scale, project(E_rand, basis), atol=tol, rtol=tol)
            torch.testing.assert_close(tangent_coefficients(E_rand * scale, basis) / scale,
                                       tangent_coefficients(E_rand, basis), atol=tol, rtol=tol)


def test_float64_attribution_beyond_float32_range_against_float32_basis(tangent):
    n = len(tangent)
    E = torch.randn(n, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    ref = alignment(E, tangent)
    for scale in (1e60, 1e-60):  # outside float32's range: casting first would give inf or 0
        torch.testing.assert_close(alignment(E * scale, tangent), ref, atol=1e-6, rtol=0)
        p = project(E * scale, tangent)
        assert p.dtype == torch.float64 and bool(torch.isfinite(p).all())
        torch.testing.assert_close(p / scale, project(E, tangent), atol=1e-6, rtol=1e-5)


def test_alignment_only_exact_zero_is_nan():
    basis = torch.eye(D)[:K].reshape(1, K, 1, SIDE, SIDE).expand(3, -1, -1, -1, -1)
    E = torch.zeros(3, 1, SIDE, SIDE)
    E[1, 0, 0, 0] = 1e-45  # the smallest float32 subnormal: tiny, not zero, and in the tangent space
    E[2, 0, 31, 31] = torch.finfo(torch.float32).max  # the largest float32, orthogonal to it
    with pytest.warns(RuntimeWarning, match="1 attributions are exactly zero"):
        a = alignment(E, basis)
    assert math.isnan(float(a[0])) and float(a[1]) == 1.0 and float(a[2]) == 0.0


# --------------------------------------------------------------------------------------------------------
# decompose, project, tangent_mass
# --------------------------------------------------------------------------------------------------------


def test_decompose_sums_orthogonal_idempotent(tangent):
    n = len(tangent)
    E = torch.randn(n, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(13))
    par, perp = decompose(E, tangent)
    assert par.shape == perp.shape == E.shape
    torch.testing.assert_close(par + perp, E, atol=1e-6, rtol=0)
    inner = (par.reshape(n, -1) * perp.reshape(n, -1)).sum(1)
    assert float(inner.abs().max()) < 1e-4 * float(E.reshape(n, -1).norm(dim=1).max() ** 2)
    torch.testing.assert_close(project(par, tangent), par, atol=1e-5, rtol=1e-4)
    assert float(project(perp, tangent).abs().max()) < 1e-5
    torch.testing.assert_close(project(E, tangent), par)
    # coefficients reproduce the tangent part and its norm
    c = tangent_coefficients(E, tangent)
    assert c.shape == (n, K)
    torch.testing.assert_close(c.norm(dim=1), par.reshape(n, -1).norm(dim=1), atol=1e-5, rtol=1e-4)
    # alignment² + (‖perp‖/‖E‖)² = 1
    a = alignment(E, tangent)
    rest = perp.reshape(n, -1).norm(dim=1) / E.reshape(n, -1).norm(dim=1)
    torch.testing.assert_close(a**2 + rest**2, torch.ones(n), atol=1e-5, rtol=0)


def test_tangent_mass_sums_to_rank_and_in_unit_interval(tangent):
    mass = tangent_mass(tangent)
    assert mass.shape == (len(tangent), 1, SIDE, SIDE)
    torch.testing.assert_close(mass.reshape(len(tangent), -1).sum(1), tangent.rank.float(), atol=1e-4, rtol=0)
    assert float(mass.min()) >= 0.0
    assert float(mass.max()) <= 1.0 + 1e-5
    torch.testing.assert_close(tangent_mass(tangent.basis), mass)


# --------------------------------------------------------------------------------------------------------
# estimate_dimension, random_baseline
# --------------------------------------------------------------------------------------------------------


def test_estimate_dimension_synthetic_spectrum():
    s = torch.tensor([[10.0, 9.0, 8.0, 1e-3, 1e-4], [5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 1e-6, 1e-7, 1e-8, 1e-9]])
    assert estimate_dimension(s, "gap").tolist() == [3, 5, 1]  # flat spectrum → k
    assert estimate_dimension(s).tolist() == [3, 5, 1]  # "gap" is the default
    # energy: smallest m with Σ_{i<m} s_i² ≥ 0.99 Σ s_i²
    assert estimate_dimension(s, "energy").tolist() == [3, 5, 1]
    assert estimate_dimension(s, "energy", energy=0.5).tolist() == [2, 2, 1]  # 100+81 ≥ 122.5; 25+16 ≥ 27.5
    assert estimate_dimension(s, "energy", energy=1.0)[1].item() == 5
    assert estimate_dimension(torch.tensor([[3.0]])).tolist() == [1]
    with pytest.raises(InputError):
        estimate_dimension(s, "bogus")
    with pytest.raises(InputError):
        estimate_dimension(s, "energy", energy=0.0)
    with pytest.raises(InputError):
        estimate_dimension(s[0])  # needs (N, k)


def test_estimate_dimension_on_tangent_space(tangent):
    dims = estimate_dimension(tangent)
    assert dims.shape == (len(tangent),)
    assert bool(((dims >= 1) & (dims <= K)).all())
    e = estimate_dimension(tangent, "energy")
    assert bool(((e >= 1) & (e <= K)).all())


def test_upsampled_256_decoder_rank(capsys):
    dec = make_decoder(seed=0, upsample=256)
    z = torch.randn(2, K, generator=torch.Generator().manual_seed(14))
    T = tangent_space(dec, z)
    assert T.basis.shape[0] == 2 and T.basis.shape[2:] == (1, 256, 256)
    # Bilinear upsampling is injective on 32×32 images, so the generic rank k survives it.
    assert T.rank.tolist() == [K, K]
    U = T.flat()
    torch.testing.assert_close(U @ U.transpose(1, 2), torch.eye(K).expand(2, K, K), atol=1e-5, rtol=0)
    gap, energy = estimate_dimension(T, "gap"), estimate_dimension(T, "energy")
    assert bool(((gap >= 1) & (gap <= K)).all()) and bool(((energy >= 1) & (energy <= K)).all())
    with capsys.disabled():
        print(f"\n[256x256 upsampled decoder] rank={T.rank.tolist()} gap-dim={gap.tolist()} energy-dim={energy.tolist()}")


def test_random_baseline_is_the_exact_expectation():
    # exact values (mpmath, 50 digits) of Γ((k+1)/2)Γ(d/2) / (Γ(k/2)Γ((d+1)/2))
    assert random_baseline(10, 1024) == pytest.approx(0.09640877691611996, rel=1e-10)
    assert random_baseline(1, 16) == pytest.approx(0.20261030206819078, rel=1e-12)
    assert random_baseline(10, 1024) / math.sqrt(10 / 1024) == pytest.approx(0.976, abs=5e-4)
    assert random_baseline(1, 16) / math.sqrt(1 / 16) == pytest.approx(0.81, abs=5e-4)
    assert random_baseline(1, 2) == pytest.approx(2 / math.pi, rel=1e-14)  # E|cos θ| on the circle
    assert random_baseline(2, 3) == pytest.approx(math.pi / 4, rel=1e-14)
    assert random_baseline(3, 5) == pytest.approx(0.75, rel=1e-14)
    assert random_baseline(5, 5) == 1.0 and random_baseline(1, 1) == 1.0
    # large d: finite, below the RMS, tends to it as k grows
    assert random_baseline(1, 10**8) == pytest.approx(math.sqrt(2 / math.pi) * 1e-4, rel=1e-6)
    assert random_baseline(10**6, 10**8) == pytest.approx(0.1, rel=1e-6)
    for k, d in [(1, 16), (10, 1024), (10, 65536), (1023, 1024)]:
        assert random_baseline(k, d) < random_baseline(k, d, rms=True)


def test_random_baseline_rms():
    assert random_baseline(10, 1024, rms=True) == pytest.approx(0.0988, abs=1e-4)
    assert random_baseline(10, 1024, rms=True) == math.sqrt(10 / 1024)
    assert random_baseline(5, 5, rms=True) == 1.0


def test_random_baseline_matches_monte_carlo():
    g = torch.Generator().manual_seed(23)
    for k, d, n in [(1, 16, 200_000), (10, 1024, 20_000)]:
        e = torch.randn(n, d, generator=g, dtype=torch.float64)
        r = e[:, :k].norm(dim=1) / e.norm(dim=1)  # a fixed k-subspace; e is rotation invariant
        se = float(r.std()) / math.sqrt(n)
        assert abs(float(r.mean()) - random_baseline(k, d)) < 4 * se
        assert abs(float((r**2).mean().sqrt()) - random_baseline(k, d, rms=True)) < 4 * se
        # the two definitions are told apart at this sample size where they differ by > 8 standard errors
        if random_baseline(k, d, rms=True) - random_baseline(k, d) > 8 * se:
            assert abs(float(r.mean()) - random_baseline(k, d, rms=True)) > 4 * se


def test_random_baseline_bad_input():
    for k, d in [(0, 1024), (-1, 1024), (1025, 1024), (1, 0), (1.5, 16), ("1", 16), (True, 16)]:
        with pytest.raises(InputError):
            random_baseline(k, d)
