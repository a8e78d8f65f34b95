"""Tangent spaces of a generated data manifold: T_x = span of the decoder Jacobian's columns at z.

The Jacobian J = ∂decoder/∂z (d × k per sample) is built from k forward-mode Jacobian-vector products
(one per latent direction), batched over samples and latent directions — never d backward passes.
An SVD of J gives an orthonormal basis of its column space, the singular values and the numerical rank.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

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

    ``basis`` (N, r, *x_shape): rows ``basis[i, :rank[i]]`` are orthonormal and span T_x of sample i,
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


def decoder_jacobian(decoder: Decoder, z: torch.Tensor, *, max_rows: int = 256, progress: bool = False) -> torch.Tensor:
    """Jacobian rows ``J[i, j] = ∂decoder(z_i)/∂z_ij`` as a tensor (N, k, *x_shape), by forward-mode AD.

    Each pass pushes one-hot tangents through ``torch.func.jvp`` for a chunk of (sample, direction) pairs;
    ``max_rows`` bounds the pairs per pass, hence the memory of a pass.
    The decoder must treat batch rows independently (e.g. BatchNorm in eval mode).
    """
    check_tensor(z, "z", ndim=2)
    check_finite(z, "z")
    n, k = z.shape
    if n == 0 or k == 0:
        raise InputError(f"z must have shape (N, k) with N, k > 0, got {tuple(z.shape)}.")
    per_batch, per_dir = _plan(n, k, max_rows)
    eye = torch.eye(k, dtype=z.dtype, device=z.device)
    out: torch.Tensor | None = None
    chunks = [(b, j) for b in range(0, n, per_batch) for j in range(0, k, per_dir)]
    it = chunks
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(chunks, desc="tangent spaces", unit="chunk", leave=False)
    for b0, j0 in it:
        zb = z[b0 : b0 + per_batch].detach()
        dirs = eye[j0 : j0 + per_dir]
        nb, m = zb.shape[0], dirs.shape[0]
        jv = _jvp_rows(decoder, zb, dirs)
        if out is None:
            out = torch.empty((n, k, *jv.shape[2:]), dtype=jv.dtype, device=jv.device)
        out[b0 : b0 + nb, j0 : j0 + m] = jv
    assert out is not None
    return out


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
    emits a :class:`RankDeficientWarning`.
    """
    J = decoder_jacobian(decoder, z, max_rows=max_rows, progress=progress)
    n, k = J.shape[:2]
    x_shape = tuple(J.shape[2:])
    d = math.prod(x_shape)
    rows = J.reshape(n, k, d)
    if not bool(torch.isfinite(rows).all()):
        raise ModelError("the decoder Jacobian contains NaN/inf; check the decoder at these latent codes.")
    # Rows of Vh span the row space of J^T, i.e. the column space of J (the tangent space).
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    tol = default_rtol(d, k, rows.dtype) if rtol is None else float(rtol)
    s_max = s[:, :1]
    rank = (s > tol * s_max).sum(1)
    rank = torch.where(s_max[:, 0] > 0, rank, torch.zeros_like(rank))
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
    basis = vh[:, :r].clone()
    keep = torch.arange(r, device=basis.device)[None, :] < rank[:, None]
    basis = basis * keep[:, :, None].to(basis.dtype)
    return TangentSpace(basis.reshape(n, r, *x_shape), rank, s, tol)
