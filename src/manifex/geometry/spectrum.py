"""The singular spectrum of a generator's Jacobian J = ∂decode/∂z: manifold dimension and tangent directions.

J (d × k per example) = U Σ Vᵀ. The number of large singular values estimates the dimension of the data manifold
near decode(z) (for a flow, k = d and the spectrum shows how many directions the data really uses); the leading
left singular vectors U (in data space) span its tangent space. A latent step is a data step preconditioned by
J Jᵀ = U Σ² Uᵀ to first order (diffeomorphic counterfactuals): decode(z + λ Jᵀ g) − decode(z) = λ J Jᵀ g + O(λ²).

Two algorithms, both batched over examples:

* exact — the full Jacobian by forward-mode products (:func:`manifex.geometry.decoder_jacobian`, k JVPs per
  example) and an SVD; for small latents.
* randomised — the top singular triplets from Jacobian-vector (JVP) and vector-Jacobian (VJP) products only, never
  the full Jacobian: a randomised range finder with power (subspace) iteration (Halko, Martinsson & Tropp 2011,
  Alg. 4.4 + 5.1), (2q + 2)·(top + oversample) products instead of k. Written here because no library offers a
  batched, matrix-free SVD for torch function Jacobians (``torch.svd_lowrank`` needs the matrix, or a dense/sparse
  tensor, not a linear operator).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch

from ..errors import InputError, ModelError, check_finite
from .projection import estimate_dimension
from .tangent import TangentSpace, decoder_jacobian, default_rtol

__all__ = ["GeneratorSpectrum", "generator_spectrum", "jacobian_products"]


@dataclass
class GeneratorSpectrum:
    """Spectrum of ∂decode/∂z for a batch.

    ``singular_values`` (N, r), largest first (r = k for the exact method, ``top`` for the randomised one);
    ``vectors`` ``(N, r, *x_shape)``: left singular vectors, orthonormal rows (data space); ``right_vectors`` (N, r, k):
    right singular vectors (flat latent space); ``dimension`` (N,) from :func:`estimate_dimension` on the returned
    values; ``method``: "exact" or "randomized".
    """

    singular_values: torch.Tensor
    vectors: torch.Tensor
    right_vectors: torch.Tensor
    dimension: torch.Tensor
    method: str

    def __len__(self) -> int:
        return self.singular_values.shape[0]

    @property
    def x_shape(self) -> tuple[int, ...]:
        return tuple(self.vectors.shape[2:])

    def tangent_space(self, dim: int | torch.Tensor | None = None) -> TangentSpace:
        """The span of the leading ``dim`` left singular vectors as a :class:`TangentSpace` (usable with
        ``manifex.alignment``/``decompose``). ``dim``: an int, a per-example (N,) tensor, or None for the
        estimated ``dimension``. Rows beyond an example's own dim are zero, as in TangentSpace."""
        n, r = self.singular_values.shape
        if dim is None:
            dims = self.dimension.to(torch.long)
        elif isinstance(dim, torch.Tensor):
            dims = dim.to(torch.long).reshape(-1)
            if dims.shape[0] != n:
                raise InputError(f"dim must have one entry per example ({n}), got shape {tuple(dim.shape)}.")
        else:
            dims = torch.full((n,), int(dim), dtype=torch.long)
        dims = dims.to(self.vectors.device)
        if bool((dims < 1).any()) or bool((dims > r).any()):
            raise InputError(f"tangent dimension must be in [1, {r}] (the computed singular vectors), got {dims.tolist()[:10]}.")
        m = int(dims.max())
        keep = (torch.arange(m, device=dims.device)[None, :] < dims[:, None]).to(self.vectors.dtype)
        basis = self.vectors[:, :m] * keep.reshape(n, m, *([1] * len(self.x_shape)))
        d = math.prod(self.x_shape)
        return TangentSpace(basis.clone(), dims, self.singular_values, default_rtol(d, r, self.singular_values.dtype))


Decoder = Callable[[torch.Tensor], torch.Tensor]


def _as_flat(decode: object, z: object) -> tuple[Decoder, torch.Tensor]:
    """(decoder of a flat (N, k) latent, flat z). Accepts a Generator or any callable; z a tensor or a list."""
    from ..models.generators import flatten_latent, unflatten_latent  # models sits beside geometry in the core

    fn = getattr(decode, "decode", decode)
    if not callable(fn):
        raise InputError(f"decode must be a callable z -> x or a generator with .decode, got {type(decode).__name__}.")
    if isinstance(z, torch.Tensor) and z.dim() == 2:
        return fn, z.detach()
    if isinstance(z, torch.Tensor) or isinstance(z, (list, tuple)):
        like = z if isinstance(z, torch.Tensor) else list(z)
        flat = flatten_latent(like).detach()
        return (lambda v: fn(unflatten_latent(v, like))), flat
    raise InputError(f"z must be a tensor (N, ...) or a list of tensors, got {type(z).__name__}.")


def jacobian_products(decoder: Decoder, z: torch.Tensor) -> tuple[Callable, Callable, tuple[int, ...]]:
    """(jvp, vjp, x_shape) for per-example Jacobians of ``decoder`` at flat ``z`` (N, k).

    ``jvp(V)``: V (N, m, k) → J V (N, m, d); ``vjp(U)``: U (N, m, d) → Jᵀ U (N, m, k). vmap over the m directions
    (one primal pass per call); decoders vmap cannot trace fall back to stacking (example, direction) pairs along
    the batch axis, which any row-independent decoder supports.
    """
    z = z.detach()
    n = z.shape[0]
    with torch.no_grad():
        x0 = decoder(z)
    if not isinstance(x0, torch.Tensor) or x0.shape[0] != n:
        raise ModelError("decode must map z (N, ...) to a batch-first tensor (N, ...).")
    x_shape = tuple(x0.shape[1:])
    d = math.prod(x_shape)

    def jvp(V: torch.Tensor) -> torch.Tensor:
        m = V.shape[1]
        try:
            out = torch.func.vmap(lambda v: torch.func.jvp(decoder, (z,), (v,))[1], in_dims=1, out_dims=1)(V)
        except Exception:
            zz = z.repeat_interleave(m, dim=0)
            _, out = torch.func.jvp(decoder, (zz,), (V.reshape(n * m, -1),))
        return out.reshape(n, m, d).detach()

    def vjp(U: torch.Tensor) -> torch.Tensor:
        m = U.shape[1]
        try:
            _, fn = torch.func.vjp(decoder, z)
            out = torch.func.vmap(lambda u: fn(u.reshape(n, *x_shape))[0], in_dims=1, out_dims=1)(U)
        except Exception:
            zz = z.repeat_interleave(m, dim=0).requires_grad_(True)
            with torch.enable_grad():
                xx = decoder(zz)
                (out,) = torch.autograd.grad(xx, zz, grad_outputs=U.reshape(n * m, *x_shape))
        return out.reshape(n, m, -1).detach()

    return jvp, vjp, x_shape


def _orth(a: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of a (N, d, l) (reduced QR)."""
    return torch.linalg.qr(a, mode="reduced")[0]


def generator_spectrum(
    decode: object,
    z: torch.Tensor | Sequence[torch.Tensor],
    top: int | None = None,
    *,
    method: Literal["auto", "exact", "randomized"] = "auto",
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
    batch_size: int = 16,
    max_rows: int = 256,
    dimension_method: Literal["gap", "energy"] = "gap",
) -> GeneratorSpectrum:
    """Singular values and left singular vectors of J = ∂decode/∂z at each example of ``z``.

    ``decode``: a callable z → x or a :class:`~manifex.models.generators.Generator`; ``z``: (N, k), any batch-first
    tensor, or a list of multi-scale latents (flattened in order for the right vectors). ``top``: how many leading
    triplets (None: all k). ``method="auto"`` uses the randomised algorithm when ``top`` is given and it needs fewer
    products than the k of the exact Jacobian ((2·power_iters + 2)·(top + oversample) < k), else the exact one.
    Without ``top`` all min(k, d) singular values are returned.
    The randomised values are accurate to ~1% for the leading ones when the spectrum decays (more ``power_iters``
    when it does not). Examples are processed ``batch_size`` at a time.
    """
    dec, zf = _as_flat(decode, z)
    check_finite(zf, "z")
    n, k = zf.shape
    if n == 0 or k == 0:
        raise InputError(f"z must have N, k > 0, got {tuple(zf.shape)}.")
    with torch.no_grad():
        probe = dec(zf[:1])
    if not isinstance(probe, torch.Tensor) or probe.dim() < 2 or probe.shape[0] != 1:
        raise ModelError("decode must map z (N, ...) to a batch-first tensor (N, ...).")
    rmax = min(k, math.prod(probe.shape[1:]))  # J is d × k: at most min(d, k) singular values
    if top is not None and not 1 <= int(top) <= rmax:
        raise InputError(f"top must be in [1, min(k, d) = {rmax}], got {top}.")
    if method not in ("auto", "exact", "randomized"):
        raise InputError(f"method must be 'auto', 'exact' or 'randomized', got {method!r}.")
    if oversample < 0 or power_iters < 0 or batch_size < 1:
        raise InputError("oversample and power_iters must be ≥ 0 and batch_size ≥ 1.")
    r = rmax if top is None else int(top)
    if method == "auto":
        method = "randomized" if top is not None and (2 * power_iters + 2) * (r + oversample) < k else "exact"
    if method == "randomized" and top is None:
        raise InputError("the randomized method needs top (how many leading singular values).")
    s_all, u_all, v_all = [], [], []
    gen = torch.Generator().manual_seed(seed)
    for b0 in range(0, n, batch_size):
        zb = zf[b0 : b0 + batch_size]
        if method == "exact":
            J = decoder_jacobian(dec, zb, max_rows=max_rows)  # (nb, k, *x_shape) = rows of Jᵀ
            nb = J.shape[0]
            x_shape = tuple(J.shape[2:])
            rows = J.reshape(nb, k, -1)
            if not bool(torch.isfinite(rows).all()):
                raise ModelError("the decoder Jacobian contains NaN/inf at these latent codes.")
            w, s, vh = torch.linalg.svd(rows, full_matrices=False)  # Jᵀ = W S Vh → J = Vhᵀ S Wᵀ
            s_all.append(s[:, :r])
            u_all.append(vh[:, :r].reshape(nb, r, *x_shape))
            v_all.append(w[:, :, :r].transpose(1, 2))
        else:
            jvp, vjp, x_shape = jacobian_products(dec, zb)
            nb, l = zb.shape[0], min(rmax, r + oversample)
            omega = torch.randn((k, l), generator=gen, dtype=torch.float64).to(zb.dtype).to(zb.device)
            Y = jvp(omega.T[None].expand(nb, l, k))  # (nb, l, d) = (J Ω)ᵀ
            Q = _orth(Y.transpose(1, 2))  # (nb, d, l)
            for _ in range(power_iters):
                Zt = _orth(vjp(Q.transpose(1, 2)).transpose(1, 2))  # (nb, k, l): orth(Jᵀ Q)
                Q = _orth(jvp(Zt.transpose(1, 2)).transpose(1, 2))  # orth(J Z)
            Bt = vjp(Q.transpose(1, 2))  # (nb, l, k) = (Qᵀ J) as rows
            ub, s, vh = torch.linalg.svd(Bt, full_matrices=False)  # Qᵀ J = Ub S Vh
            U = Q @ ub  # (nb, d, l)
            if not bool(torch.isfinite(s).all()):
                raise ModelError("the decoder's Jacobian products contain NaN/inf at these latent codes.")
            s_all.append(s[:, :r])
            u_all.append(U[:, :, :r].transpose(1, 2).reshape(nb, r, *x_shape))
            v_all.append(vh[:, :r])
    s = torch.cat(s_all)
    if bool((s[:, 0] == 0).any()):
        bad = (s[:, 0] == 0).nonzero().flatten().tolist()
        raise ModelError(
            f"the decoder Jacobian is zero at examples {bad[:10]}: decode ignores z there or is not differentiable "
            "(.detach(), rounding, argmax)."
        )
    dim = estimate_dimension(s, dimension_method)
    return GeneratorSpectrum(s, torch.cat(u_all), torch.cat(v_all), dim, method)
