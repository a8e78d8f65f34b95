"""Tangent spaces of a generated data manifold: T_x = span of the decoder Jacobian's columns at z.

The Jacobian J = ∂decoder/∂z (d × k per sample) is built from k forward-mode Jacobian-vector products
(one per latent direction), batched over samples and latent directions — never d backward passes.
Its singular values, numerical rank and an orthonormal basis of its column space follow from the small
k × k Gram matrix JᵀJ, accumulated in float64 (see :func:`_reduce_gram`); float64 Jacobians use a full SVD.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..errors import InputError, ModelError, RankDeficientWarning, check_finite, check_tensor

__all__ = ["TangentSpace", "tangent_space", "decoder_jacobian", "default_rtol"]

Decoder = Callable[[torch.Tensor], torch.Tensor]


def default_rtol(d: int, k: int, dtype: torch.dtype) -> float:
    """Relative rank tolerance: max(d, k) · machine epsilon of ``dtype`` (NumPy's ``matrix_rank`` rule)."""
    return max(d, k) * torch.finfo(dtype).eps


@dataclass
class TangentSpace:
    """Orthonormal tangent bases of a batch.

    ``basis`` ``(N, r, *x_shape)``: rows ``basis[i, :rank[i]]`` are orthonormal and span T_x of sample i,
    ordered by decreasing singular value; r = max(rank). Rows at positions ≥ ``rank[i]`` are exactly zero
    (only when ranks differ within the batch) — they add nothing to projections, and ``rank`` says how many
    are real. ``singular_values`` (N, k) are those of the Jacobian, largest first.
    """

    basis: torch.Tensor
    rank: torch.Tensor
    singular_values: torch.Tensor
    rtol: float

    @property
    def x_shape(self) -> tuple[int, ...]:
        return tuple(self.basis.shape[2:])

    @property
    def dim(self) -> int:
        """Ambient dimension d (pixels × channels)."""
        return math.prod(self.x_shape)

    @property
    def latent_dim(self) -> int:
        return self.singular_values.shape[1]

    def __len__(self) -> int:
        return self.basis.shape[0]

    def flat(self) -> torch.Tensor:
        """Basis as (N, r, d)."""
        return self.basis.reshape(self.basis.shape[0], self.basis.shape[1], -1)

    def to(self, *args, **kwargs) -> "TangentSpace":
        """Move the basis and singular values (e.g. ``.to("cuda")`` or ``.to(torch.float64)``)."""
        basis = self.basis.to(*args, **kwargs)
        return TangentSpace(basis, self.rank.to(basis.device), self.singular_values.to(*args, **kwargs), self.rtol)

    def __getitem__(self, index) -> "TangentSpace":
        return TangentSpace(self.basis[index], self.rank[index], self.singular_values[index], self.rtol)


def _plan(n: int, k: int, max_rows: int) -> tuple[int, int]:
    """(samples per chunk, latent directions per chunk) so that one forward pass has ≤ max_rows rows."""
    if k <= max_rows:
        return max(1, max_rows // k), k
    return 1, max_rows


def _jvp_rows(decoder: Decoder, zb: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Directional derivatives of ``decoder`` at ``zb`` (nb, k) along ``dirs`` (m, k): (nb, m, *x_shape).

    First choice: ``vmap`` over the m directions, so the decoder's primal forward runs once per sample
    (about 2× faster than repeating z). Decoders that vmap cannot trace fall back to stacking the
    (sample, direction) pairs along the batch axis, which any batch-independent decoder supports.
    """
    nb, m = zb.shape[0], dirs.shape[0]
    try:
        jv = torch.func.vmap(lambda t: torch.func.jvp(decoder, (zb,), (t,))[1])(dirs[:, None, :].expand(m, nb, -1))
        jv = jv.transpose(0, 1)
    except Exception:
        try:
            x, flat = torch.func.jvp(decoder, (zb.repeat_interleave(m, dim=0),), (dirs.repeat(nb, 1),))
        except Exception as e:  # the decoder is arbitrary user code: translate into a clear error
            raise ModelError(
                f"forward-mode differentiation of the decoder failed ({type(e).__name__}: {e}); the decoder must be "
                "a differentiable torch function of z (no NumPy, no in-place ops on inputs, no .item())."
            ) from e
        if not isinstance(flat, torch.Tensor) or flat.shape[0] != nb * m:
            raise ModelError("the decoder must map z (N, k) to a batch-first tensor (N, ...).")
        jv = flat.reshape(nb, m, *flat.shape[1:])
    if jv.dim() < 2 or jv.shape[0] != nb:
        raise ModelError("the decoder must map z (N, k) to a batch-first tensor (N, ...).")
    return jv.detach()


def _jacobian_groups(
    decoder: Decoder, z: torch.Tensor, max_rows: int, progress: bool, desc: str = "tangent spaces"
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yields (first sample b0, Jacobian rows (nb, k, *x_shape)) for consecutive groups of samples.

    A group is one forward-mode pass when all k directions fit in ``max_rows`` (the rows are then the pass's
    own output, possibly a non-contiguous view — no copy); otherwise the directions of one sample are
    computed in several passes and assembled.
    """
    check_tensor(z, "z", ndim=2)
    check_finite(z, "z")
    n, k = z.shape
    if n == 0 or k == 0:
        raise InputError(f"z must have shape (N, k) with N, k > 0, got {tuple(z.shape)}.")
    per_batch, per_dir = _plan(n, k, max_rows)
    eye = torch.eye(k, dtype=z.dtype, device=z.device)
    chunks = [(b, j) for b in range(0, n, per_batch) for j in range(0, k, per_dir)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(chunks), desc=desc, unit="chunk", leave=False)
    try:
        for b0 in range(0, n, per_batch):
            zb = z[b0 : b0 + per_batch].detach()
            if per_dir == k:
                group = _jvp_rows(decoder, zb, eye)
            else:  # k > max_rows: one sample, its directions in several passes
                group = None
                for j0 in range(0, k, per_dir):
                    jv = _jvp_rows(decoder, zb, eye[j0 : j0 + per_dir])
                    if group is None:
                        group = torch.empty((zb.shape[0], k, *jv.shape[2:]), dtype=jv.dtype, device=jv.device)
                    group[:, j0 : j0 + jv.shape[1]] = jv
                    if bar is not None and j0 + per_dir < k:
                        bar.update(1)
            if bar is not None:
                bar.update(1)
            yield b0, group
    finally:
        if bar is not None:
            bar.close()


def decoder_jacobian(decoder: Decoder, z: torch.Tensor, *, max_rows: int = 256, progress: bool = False) -> torch.Tensor:
    """Jacobian rows ``J[i, j] = ∂decoder(z_i)/∂z_ij`` as a tensor ``(N, k, *x_shape)``, by forward-mode AD.

    Each pass pushes one-hot tangents through ``torch.func.jvp`` for a chunk of (sample, direction) pairs;
    ``max_rows`` bounds the pairs per pass, hence the memory of a pass.
    The decoder must treat batch rows independently (e.g. BatchNorm in eval mode).
    """
    n = z.shape[0] if isinstance(z, torch.Tensor) and z.dim() == 2 else 0
    out: torch.Tensor | None = None
    for b0, group in _jacobian_groups(decoder, z, max_rows, progress):
        if out is None:
            if group.shape[0] == n:
                return group.contiguous()
            out = torch.empty((n, *group.shape[1:]), dtype=group.dtype, device=group.device)
        out[b0 : b0 + group.shape[0]] = group
    assert out is not None
    return out


def _gram64(rows: torch.Tensor, block_bytes: int = 1 << 23) -> torch.Tensor:
    """J Jᵀ in float64 for rows (nb, k, d) of any float dtype: (nb, k, k).

    Float32 products are exact in float64, so only the float64 summation rounds: the Gram matrix is accurate
    to ~eps64 · ‖J‖², enough to resolve singular values down to ~1e-7 · s_max, and it cannot overflow or
    underflow for float32 entries. Converted in column blocks of about ``block_bytes`` so no float64 copy of J
    is ever held.
    """
    nb, k, d = rows.shape
    step = max(1, block_bytes // (8 * nb * k))
    if step >= d:
        r64 = rows.to(torch.float64)
        return torch.bmm(r64, r64.transpose(1, 2))
    G = torch.zeros((nb, k, k), dtype=torch.float64, device=rows.device)
    # one reused block buffer: fresh memory per block would cost a page fault per 4 KiB, more than the copy
    buf = torch.empty((nb, k, step), dtype=torch.float64, device=rows.device)
    for j in range(0, d, step):
        blk = buf[:, :, : min(step, d - j)]
        blk.copy_(rows[:, :, j : j + step])
        G.baddbmm_(blk, blk.transpose(1, 2))
    return G


def _reduce_gram(rows: torch.Tensor, tol: float, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (nb, k) and ranks (nb,) of rows (nb, k, d); writes the basis rows into ``out`` (nb, k, d).

    With JJᵀ = V Λ Vᵀ (eigh, float64), the rows of diag(1/√λ) Vᵀ J are J's right singular vectors — the
    orthonormal tangent directions — ordered by decreasing singular value √λ. Rows at or beyond the rank are
    written as exact zeros. One pass over J for the Gram matrix and one for the basis, instead of a d × k SVD
    with its copies (an SVD costs several times more on wide Jacobians, see benchmarks/bench_tangent.py). In
    float32 the subspaces and singular values are closer to the exact ones than a float32 SVD's (tests:
    ~10× smaller principal angles), the ranks the same; the rows are orthonormal to ~eps32 · s_max/s_i
    (2.5e-5 at the largest condition number the float32 rank rule keeps at d = 1,024; an SVD: ~1e-6).
    """
    G = _gram64(rows)
    if not bool(torch.isfinite(G).all()):  # any NaN/inf in J reaches the diagonal of JJᵀ
        raise ModelError("the decoder Jacobian contains NaN/inf; check the decoder at these latent codes.")
    lam, V = torch.linalg.eigh(G)  # ascending
    lam, V = lam.flip(-1), V.flip(-1)
    s = lam.clamp_min(0).sqrt()
    rank = _rank(s, tol)
    keep = torch.arange(s.shape[1], device=s.device)[None, :] < rank[:, None]
    scale = torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))
    factor = (V.transpose(1, 2) * scale[:, :, None]).to(rows.dtype)
    torch.bmm(factor, rows, out=out)
    return s.to(rows.dtype), rank


def _reduce_svd(rows: torch.Tensor, tol: float, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`_reduce_gram` by a full SVD (float64 Jacobians: exact to ~eps64 · s_max, like LAPACK)."""
    if not bool(torch.isfinite(rows).all()):
        raise ModelError("the decoder Jacobian contains NaN/inf; check the decoder at these latent codes.")
    # Rows of Vh span the row space of J^T, i.e. the column space of J (the tangent space).
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    rank = _rank(s, tol)
    keep = torch.arange(s.shape[1], device=s.device)[None, :] < rank[:, None]
    torch.mul(vh, keep[:, :, None].to(vh.dtype), out=out)
    return s, rank


def _rank(s: torch.Tensor, tol: float) -> torch.Tensor:
    s_max = s[:, :1]
    rank = (s > tol * s_max).sum(1)
    return torch.where(s_max[:, 0] > 0, rank, torch.zeros_like(rank))


def tangent_space(
    decoder: Decoder,
    z: torch.Tensor,
    *,
    rtol: float | None = None,
    max_rows: int = 256,
    progress: bool = False,
) -> TangentSpace:
    """Tangent spaces of the manifold ``decoder(z)`` at a batch of latent codes ``z`` (N, k).

    The numerical rank of sample i counts singular values ``s > rtol · s_max``; ``rtol`` defaults to
    :func:`default_rtol` (max(d, k) · eps of the Jacobian's dtype). A sample whose Jacobian vanishes
    (rank 0: the decoder ignores z or is not differentiable) raises :class:`ModelError`; a rank below k
    emits a :class:`RankDeficientWarning`. ``max_rows`` bounds the (sample, direction) rows of one
    forward-mode pass; the whole Jacobian is never held, only one group of samples at a time.
    """
    n = z.shape[0] if isinstance(z, torch.Tensor) and z.dim() == 2 else 0
    basis: torch.Tensor | None = None
    svals, ranks = [], []
    tol = float(rtol) if rtol is not None else math.nan
    for b0, group in _jacobian_groups(decoder, z, max_rows, progress):
        nb, k = group.shape[:2]
        x_shape = tuple(group.shape[2:])
        d = math.prod(x_shape)
        rows = group.reshape(nb, k, d)
        if basis is None:
            basis = torch.empty((n, k, d), dtype=rows.dtype, device=rows.device)
            if rtol is None:
                tol = default_rtol(d, k, rows.dtype)
        # float64 Jacobians keep LAPACK's full accuracy; MPS has no float64 for the Gram matrix
        reduce = _reduce_svd if rows.dtype == torch.float64 or rows.device.type == "mps" else _reduce_gram
        s, rank = reduce(rows, tol, basis[b0 : b0 + nb])
        svals.append(s)
        ranks.append(rank)
    assert basis is not None
    s, rank = torch.cat(svals), torch.cat(ranks)
    if bool((rank == 0).any()):
        bad = (rank == 0).nonzero().flatten().tolist()
        raise ModelError(
            f"the decoder Jacobian is zero at samples {bad[:10]}: the decoder ignores z there or is not "
            "differentiable (e.g. uses .detach(), rounding or argmax)."
        )
    if bool((rank < k).any()):
        warnings.warn(
            f"tangent space rank below the latent dimension k={k} for {int((rank < k).sum())} of {n} samples "
            f"(ranks {sorted(set(rank.tolist()))}, rtol={tol:.2e}); the basis keeps only the numerically "
            "independent directions, see TangentSpace.rank.",
            RankDeficientWarning,
            stacklevel=2,
        )
    r = int(rank.max())
    if r < k:  # rows beyond every sample's rank are zero: drop them (a copy, only for rank-deficient batches)
        basis = basis[:, :r].contiguous()
    return TangentSpace(basis.reshape(n, r, *x_shape), rank, s, tol)
