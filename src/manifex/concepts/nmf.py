"""Non-negative matrix factorisation X ≈ W H for one matrix or a batch of matrices (one per class).

The reference is scikit-learn's ``NMF`` with its defaults (NNDSVDa initialisation, coordinate descent,
Frobenius loss, ``max_iter=200``, ``tol=1e-4``), which the concept research used per class. manifex's
``"hals"`` solver is that same algorithm written batched in torch: scikit-learn's coordinate descent updates
one column of W (then of Hᵀ) at a time with the closed-form step ``w_t ← max(0, w_t − ∇_t / (HHᵀ)_tt)``,
which is exactly hierarchical ALS; we run it for every matrix of the batch at once (CPU or CUDA), with the
same update order, the same projected-gradient stopping rule (per matrix: violation / first violation ≤ tol)
and the same NNDSVDa start: the singular vectors come from scikit-learn's own ``randomized_svd`` with
``random_state=seed`` (per matrix, on its real rows, on the CPU, in scikit-learn's dtype: float32 stays float32,
anything else float64), exactly as ``NMF(random_state=seed)`` starts. An exact SVD would agree only where the
spectrum has gaps: on a matrix without one (uniform noise) the randomized vectors beyond the first are a
different basis of nearly equal singular values, and the two starts end in different factorizations (matched
cosine 0.71). So it reaches scikit-learn's error and components on every matrix, up to round-off (tested in
float64 on uniform noise and on structured matrices, batched and single). ``"ahals"`` is accelerated HALS:
the same start — scikit-learn's randomized SVD with the same ``random_state``, but computed for the whole batch
at once in torch on X's device (:func:`_svd_top_batched`, equal to it up to round-off) — and the same
coordinate steps, with both factors extrapolated between iterations by Ang & Gillis' rule
(2019, "Accelerating nonnegative matrix factorization algorithms using extrapolation"); it leaves
scikit-learn's iterates and reaches scikit-learn's error in about a third of the iterations (stopping rule:
scikit-learn's and a settled error, see :func:`_ahals`). ``"mu"`` is
batched multiplicative updates (Lee & Seung), ``"sklearn"`` loops scikit-learn.

Why written by hand: scikit-learn factorises one matrix per call on the CPU; the batched torch solver
factorises every class in one loop, on the model's device.
"""
from __future__ import annotations

import math
import numbers
from typing import Literal, Sequence

import numpy as np
import torch

from ..errors import InputError

__all__ = ["nmf", "nmf_error", "NMF_SOLVERS", "matched_cosine", "nmf_transform"]

Solver = Literal["auto", "hals", "ahals", "mu", "sklearn"]
#: The solvers :func:`nmf` takes: "hals" (batched coordinate descent on the model's device, as scikit-learn's NMF
#: updates), "ahals" (the same steps extrapolated between iterations: scikit-learn's error, not its iterates, in
#: about a third of the iterations), "mu" (batched multiplicative updates), "sklearn" (scikit-learn, one matrix per
#: call) or "auto" (= "hals").
NMF_SOLVERS = ("auto", "hals", "ahals", "mu", "sklearn")

# "auto" = "hals" everywhere. Measured (benchmarks/bench_concepts.py, 10 classes × 3,840 rows × 64 channels,
# k = 6, float32, 2 CPU cores shared with other jobs): hals reaches scikit-learn's error in the same number
# of iterations, batched; mu needs ~10× more iterations for the same error; looping scikit-learn is slower
# than one batched hals run. On CUDA the batched solver is the only one on the device. "ahals" is faster at
# equal error — 2.67–3.58× scikit-learn on one thread over nine runs, 3.11× the middle one (0.185–0.272 s against
# 0.643–0.725 s for the whole call, start included) and 11.1–13.1× on two, quiet machine, best of 9–15 repeats
# (the guide's Concepts → Speed) —
# but not the default, for nmf either: "hals" gives scikit-learn's own W and H (tested to 1e-9), which
# class_concepts' documented equality with the research loop rests on and which every caller passing "auto"
# (class_concepts, contrastive concepts, stability, the CLI) gets; "ahals" promises only scikit-learn's error,
# an empirical bound (≤ × (1 + 1e-4), tested) that a slightly looser stop already breaks on uniform noise and
# that extrapolation itself misses on some matrices (k = 10: one class in three of four families measured ended
# in a worse local minimum, 1.3e-4 to 1.9e-2 above), and it ends in other factors where the spectrum has no
# gap. A faster default that changes results is the user's call.
_AUTO = "hals"


def _check_input(X: torch.Tensor, n_components: int, n_rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    if not isinstance(X, torch.Tensor):
        raise InputError(f"X must be a torch.Tensor (rows × features, or a batch of them), got {type(X).__name__}.")
    if X.dim() not in (2, 3):
        raise InputError(f"X must be a matrix (R, c) or a batch of matrices (B, R, c), got shape {tuple(X.shape)}.")
    if not X.is_floating_point():
        raise InputError(f"X must be floating point, got {X.dtype}; use X.float().")
    batched = X.dim() == 3
    Xb = X if batched else X.unsqueeze(0)
    B, R, c = Xb.shape
    # one pass for the common case (finite, nothing negative); the masks below only when it finds something
    lo, hi = torch.aminmax(Xb) if Xb.numel() else (Xb.new_zeros(()), Xb.new_zeros(()))
    finite, nonneg = bool(torch.isfinite(lo) & torch.isfinite(hi)), bool(lo >= 0)  # NaN: lo = hi = NaN
    bad = ~torch.isfinite(Xb) if not finite else None
    if bad is not None and bool(bad.any()):
        raise InputError(f"X contains {int(bad.sum())} NaN/inf values (matrices {bad.flatten(1).any(1).nonzero().flatten().tolist()[:10]}); "
                         "NMF needs finite input — check the activations or relevances that built it.")
    if n_rows is None:
        rows = torch.full((B,), R, dtype=torch.long, device=X.device)
    else:
        rows = torch.as_tensor(n_rows, dtype=torch.long, device=X.device).reshape(-1)
        if rows.shape[0] != B or bool((rows < 0).any()) or bool((rows > R).any()):
            raise InputError(f"n_rows must hold {B} row counts in [0, {R}], got {rows.tolist()}.")
    if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1:
        raise InputError(f"n_components must be a positive int, got {n_components!r}.")
    smallest = min(int(rows.min()), c)
    if n_components > smallest:
        what = "features (channels)" if c <= int(rows.min()) else "rows"
        raise InputError(f"n_components={n_components} exceeds the number of {what} ({smallest}); NMF needs "
                         f"n_components ≤ min(rows, channels): use at most {smallest} components or more data.")
    valid = torch.arange(R, device=X.device)[None, :] < rows[:, None]  # (B, R)
    neg = (Xb < 0) & valid[:, :, None] if not nonneg else None
    if neg is not None and bool(neg.any()):
        raise InputError(
            f"NMF needs non-negative input, but X has {int(neg.sum())} negative entries (min {float(Xb[neg].min()):.3g}). "
            "For layer activations choose a layer after a ReLU (a block output such as 'blocks.2', not a convolution "
            "or BatchNorm output), or keep only positive relevance (ReLU of the attribution) before weighting."
        )
    if n_rows is None or bool((rows == R).all()):
        return Xb, rows, batched  # no padding: nothing to zero (and no copy of X)
    return Xb * valid[:, :, None], rows, batched


def _svd_top(X: torch.Tensor, rows: torch.Tensor, k: int, seed: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k singular triplets of each matrix (B, R, c), U zero on padding rows, in float64: scikit-learn's
    ``randomized_svd(X_b, k, random_state=seed)`` on the real rows of each matrix, as ``_initialize_nmf`` calls
    it (its n_iter "auto", 10 oversamples, LU power iterations, sign flip), in the dtype scikit-learn's NMF
    would compute in. One small CPU call per matrix (3,840 × 64: about 12 ms on one thread)."""
    from sklearn.utils.extmath import randomized_svd
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    B, R, c = X.shape
    dtype = torch.float32 if X.dtype == torch.float32 else torch.float64  # NMF's check_array: float32 or float64
    U = torch.zeros(B, R, k, dtype=torch.float64)
    S = torch.zeros(B, k, dtype=torch.float64)
    Vh = torch.zeros(B, k, c, dtype=torch.float64)
    Xc = X.detach().to("cpu", dtype)
    # numpy's BLAS gets torch's thread count: its default (every core) made these thin products 100× slower
    # on a loaded machine (1.5 s instead of 12 ms for 3,840 × 64); threads change results by round-off at most
    with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
        for b in range(B):
            r = int(rows[b])
            u, sv, vh = randomized_svd(Xc[b, :r].numpy(), k, random_state=seed[b])
            U[b, :r], S[b], Vh[b] = torch.from_numpy(u).double(), torch.from_numpy(sv).double(), torch.from_numpy(vh).double()
    return U.to(X.device), S.to(X.device), Vh.to(X.device)


def _svd_top_batched(X: torch.Tensor, rows: torch.Tensor, k: int, seed: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The result of :func:`_svd_top` — scikit-learn's ``randomized_svd(X_b, k, random_state=seed)`` — computed
    for the whole batch at once in torch, on X's device: the same Gaussian test matrix Ω (numpy's
    ``RandomState(seed).normal``, in scikit-learn's dtype), the same number of power iterations q and
    10 oversamples, hence the same subspace range(X (XᵀX)^q Ω) and the same Rayleigh–Ritz triplets up to
    round-off (the basis inside the subspace, which scikit-learn normalises by LU and we by QR, does not
    change them). Where the c × c Gram costs fewer multiply-adds than the 2(q + 1) products with X
    (c ≤ 2(q + 1)(k + 10): 256 channels at k = 6), the power iterations run on XᵀX (they only find the
    subspace: scikit-learn's own products carry the same eps·σ₁² round-off). The Rayleigh–Ritz step reads X
    itself, as scikit-learn's does — Y = X Z, then the p × p YᵀY diagonalised in float64 instead of a QR of the
    tall Y — so small singular values are resolved to eps·σ₁ as there, not to the Gram's eps·σ₁². Needs every
    matrix to have at least as many rows as channels (scikit-learn transposes the others); float64 out."""
    B, R, c = X.shape
    p = k + 10
    q = 7 if k < 0.1 * c else 4  # randomized_svd's n_iter="auto" (min(rows, c) = c here)
    dt = torch.float32 if X.dtype == torch.float32 else torch.float64  # scikit-learn's dtype, as _svd_top
    Xc = X.detach().to(dt)
    npdt = np.float32 if dt == torch.float32 else np.float64  # Ω in scikit-learn's dtype
    draws = {s: np.random.RandomState(s).normal(size=(c, p)).astype(npdt) for s in set(seed)}  # one per distinct seed
    omega = np.stack([draws[s] for s in seed])
    Z = torch.from_numpy(omega).to(X.device, torch.float64)
    if c <= 2 * (q + 1) * p:
        gram = (Xc.transpose(1, 2) @ Xc).double()
        apply = lambda Z: gram @ Z  # noqa: E731  (XᵀX Z)
    else:
        apply = lambda Z: (Xc.transpose(1, 2) @ (Xc @ Z.to(dt))).double()  # noqa: E731
    for _ in range(q):
        Z = torch.linalg.qr(apply(Z)).Q
    Y = Xc @ Z.to(dt)  # (B, R, p): the sample of X's range that scikit-learn orthonormalises (QR) into Q
    Yd = Y.double()
    lam, E = torch.linalg.eigh(Yd.transpose(1, 2) @ Yd)  # YᵀY = E Λ Eᵀ: Q = Y E Λ^-½ is orthonormal
    # directions below X's round-off (σ ≤ eps·c·σ₁, e.g. a rank below k + 10) are dropped: their singular values
    # come out 0, where scikit-learn's are round-off, and NNDSVD zeroes both alike
    keep = lam > lam[:, -1:] * (torch.finfo(dt).eps * c) ** 2
    E = E * torch.where(keep, lam.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), torch.zeros_like(lam))[:, None, :]
    Uh, S, Vh = torch.linalg.svd(E.transpose(1, 2) @ (Y.transpose(1, 2) @ Xc).double(), full_matrices=False)  # Qᵀ X
    U = Yd @ (E @ Uh[:, :, :k])  # Q Uh; padding rows of X give zero rows
    return U, S[:, :k], Vh[:, :k]


def _nndsvd(X: torch.Tensor, rows: torch.Tensor, k: int, variant: str, seed: list[int],
            eps: float = 1e-6, batched_svd: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """NNDSVD (Boutsidis & Gallopoulos) as scikit-learn's ``_initialize_nmf``, from the same randomized SVD
    (:func:`_svd_top`, or with ``batched_svd`` :func:`_svd_top_batched` where every matrix has at least as
    many rows as channels); ``"nndsvda"`` fills zeros with the matrix mean."""
    batched_svd = batched_svd and int(rows.min()) >= X.shape[2]
    U, S, Vh = (_svd_top_batched if batched_svd else _svd_top)(X, rows, k, seed)
    V = Vh.transpose(1, 2)  # (B, c, k)
    up, un = U.clamp(min=0), (-U).clamp(min=0)
    vp, vn = V.clamp(min=0), (-V).clamp(min=0)
    upn, unn = up.norm(dim=1), un.norm(dim=1)  # (B, k)
    vpn, vnn = vp.norm(dim=1), vn.norm(dim=1)
    mp, mn = upn * vpn, unn * vnn
    pos = (mp > mn)[:, None, :]
    u = torch.where(pos, up / upn.clamp_min(1e-300)[:, None, :], un / unn.clamp_min(1e-300)[:, None, :])
    v = torch.where(pos, vp / vpn.clamp_min(1e-300)[:, None, :], vn / vnn.clamp_min(1e-300)[:, None, :])
    lam = torch.sqrt(S * torch.where(pos[:, 0, :], mp, mn))
    W = u * lam[:, None, :]
    H = (v * lam[:, None, :]).transpose(1, 2)
    # the leading triplet of a non-negative matrix is non-negative: |u_0|, |v_0| as is
    W[:, :, 0] = torch.sqrt(S[:, 0])[:, None] * U[:, :, 0].abs()
    H[:, 0, :] = torch.sqrt(S[:, 0])[:, None] * V[:, :, 0].abs()
    W = torch.where(W < eps, torch.zeros_like(W), W)
    H = torch.where(H < eps, torch.zeros_like(H), H)
    if variant == "nndsvda":
        # mean over the real rows, summed in X's dtype as numpy's X.mean() (a float64 sum would copy X to float64),
        # at least in float32: a float16 sum overflows (65,504) on any activation matrix of realistic size
        acc = torch.promote_types(X.dtype, torch.float32)
        avg = X.sum((1, 2), dtype=acc).double() / (rows.double() * X.shape[2]).clamp_min(1)
        W = torch.where(W == 0, avg[:, None, None].expand_as(W), W)
        H = torch.where(H == 0, avg[:, None, None].expand_as(H), H)
    valid = torch.arange(X.shape[1], device=X.device)[None, :] < rows[:, None]
    W = W * valid[:, :, None]  # padding rows stay exactly zero (their updates are then zero too)
    return W.to(X.dtype), H.to(X.dtype)


def _cd_sweep(A: torch.Tensor, gram: torch.Tensor, neg_proj: torch.Tensor) -> torch.Tensor:
    """One pass of scikit-learn's coordinate descent over the k rows of the factor ``A`` (B, k, n), in place, with
    the Gram matrix ``gram`` (B, k, k) and the negated projection ``neg_proj`` (B, k, n) of X fixed for the pass
    (for W: A = Wᵀ, gram = HHᵀ, neg_proj = −HXᵀ; for H: A = H, gram = WᵀW, neg_proj = −WᵀX), so X is never read
    inside the pass. Row t takes scikit-learn's step a_t ← max(0, a_t − g_t / gram_tt) with the gradient
    g_t = gram_t· A − proj_t from the rows updated so far (no step where gram_tt = 0). Returns the
    projected-gradient violation (B,): Σ |g| where a > 0 before its step, Σ |min(0, g)| where a = 0, summed once
    after the pass over the stored gradients (each row is stepped once, so its zeros at the start of the pass
    are its zeros before its step)."""
    hess = torch.diagonal(gram, dim1=1, dim2=2)  # (B, k)
    # g / inf = 0: no step where the Hessian is zero, as scikit-learn skips the update
    hess = torch.where(hess != 0, hess, torch.full_like(hess, math.inf)).unsqueeze(-1).unsqueeze(-1)  # (B, k, 1, 1)
    positive = A.sign()  # 1 where a > 0, 0 where a = 0 (A ≥ 0)
    grads = []
    for t in range(A.shape[1]):
        g = torch.baddbmm(neg_proj[:, t : t + 1], gram[:, t : t + 1], A)  # (B, 1, n) = gram_t· A − proj_t
        A[:, t : t + 1].addcdiv_(g, hess[:, t], value=-1).clamp_(min=0)
        grads.append(g)
    G = torch.cat(grads, 1)
    # |pg| = max(|g|·[a > 0], −g): |g| where a > 0, max(0, −g) = |min(0, g)| where a = 0, exact per entry
    # (float arithmetic instead of a boolean mask and torch.where, which cost 5× more on the CPU)
    return torch.maximum(G.abs().mul_(positive), G.neg_()).sum((1, 2))


def _hals(X, W, H, max_iter: int, tol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's coordinate descent (W then H each iteration, stopping per matrix when the violation falls
    to ``tol`` × the first), batched. The factors are kept as rows (Wᵀ (B, k, R), H (B, k, c)) so that each
    coordinate step reads and writes contiguous memory; X enters only through the projections HXᵀ and WᵀX, one
    batched product per half-iteration. Converged matrices leave the batch: their factors are written back and
    the remaining ones are compacted once, not gathered every iteration."""
    B = X.shape[0]
    Wt_out = W.transpose(1, 2).contiguous()
    H_out = H.contiguous().clone()
    n_iter = torch.zeros(B, dtype=torch.long, device=X.device)
    idx = torch.arange(B, device=X.device)
    Xa, Xta = X.contiguous(), X.transpose(1, 2).contiguous()
    Wt, Ha = Wt_out.clone(), H_out
    first = None
    for it in range(1, max_iter + 1):
        v = _cd_sweep(Wt, Ha @ Ha.transpose(1, 2), torch.neg(Ha) @ Xta)
        v = v + _cd_sweep(Ha, Wt @ Wt.transpose(1, 2), torch.neg(Wt) @ Xa)
        if first is None:
            first = v
        stop = (first == 0) | (v / first.clamp_min(torch.finfo(X.dtype).tiny) <= tol)
        if it == max_iter or bool(stop.any()):
            done = stop if it < max_iter else torch.ones_like(stop)
            d = idx[done]
            Wt_out[d], H_out[d], n_iter[d] = Wt[done], Ha[done], it
            keep = ~done
            if not bool(keep.any()):
                break
            idx, Xa, Xta, Wt, Ha, first = idx[keep], Xa[keep], Xta[keep], Wt[keep], Ha[keep], first[keep]
    return Wt_out.transpose(1, 2), H_out, n_iter


def _cd_passes(A: torch.Tensor, gram: torch.Tensor, proj: torch.Tensor, passes: int) -> torch.Tensor:
    """``passes`` coordinate passes over the rows of ``A`` (B, k, n), in place: the steps of :func:`_cd_sweep`
    (a_t ← max(0, a_t − (gram_t· A − proj_t) / gram_tt), no step where gram_tt = 0) without the violation.
    The Gram form: only the k × k Gram and the k × n projection are read, so passes after the first cost no
    product with X. Each step is one product and one clamp: a_t ← max(0, proj_t / gram_tt + D_t· A) with
    D_t = −gram_t / gram_tt and D_tt = 0 (a_t cancels from its own step), or D_t = e_t where gram_tt = 0."""
    hess = torch.diagonal(gram, dim1=1, dim2=2)
    inv = torch.where(hess > 0, 1 / hess, torch.zeros_like(hess))  # (B, k); 0: no step
    D = gram * inv.neg().unsqueeze(-1)
    torch.diagonal(D, dim1=1, dim2=2).copy_(inv == 0)
    sproj = proj * inv.unsqueeze(-1)
    for _ in range(passes):
        for t in range(A.shape[1]):
            torch.clamp(torch.baddbmm(sproj[:, t : t + 1], D[:, t : t + 1], A), min=0, out=A[:, t : t + 1])
    return A


def _violation(A: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """scikit-learn's projected-gradient violation of a factor A ≥ 0 (B, k, n) with gradient ``grad``, per
    matrix: Σ |g| where a > 0, Σ max(0, −g) where a = 0."""
    return torch.maximum(grad * A.sign(), grad.neg()).sum((1, 2))


# Extrapolation parameters of _ahals (Ang & Gillis' β₀, η, γ, γ̄), the coordinate passes over H per
# iteration and the iterations between error checks. Chosen on the benchmark matrices (bench_concepts.py:
# 10 classes × 3,840 × 64, k = 6) among β₀ ∈ {0.5, 0.8}, γ ∈ {1.05, 1.1}, 1–10 passes over H (the Gram form
# makes them cheap: Gillis & Glineur), 1–2 over W. More passes saved ~10% of the iterations there but stalled
# a near-degenerate float32 matrix (rank 2 + noise, k = 4: 3 passes stayed 2.5% above scikit-learn's error
# after 200 iterations, 1 pass ends below it); two passes over W stopped one class 1e-4 above it.
_BETA0, _ETA, _GAMMA, _GAMMA_BAR, _H_PASSES, _WINDOW = 0.5, 1.5, 1.05, 1.01, 1, 10


def _ahals(X, W, H, max_iter: int, tol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accelerated HALS, batched: per iteration the products H̃Xᵀ and WᵀX (the only reads of X), one
    coordinate pass over W and ``_H_PASSES`` over H in the Gram form (:func:`_cd_passes`), then both factors
    extrapolated, W̃ = max(0, W + β (W − W_prev)) and likewise H̃, for the next iteration. Per matrix, β follows
    Ang & Gillis' rule on the error ‖X − W H̃‖ (from k × k and k × c products: ‖X − W H̃‖² − ‖X‖² =
    ⟨WᵀW, H̃H̃ᵀ⟩ − 2⟨WᵀX, H̃⟩, no residual and no ‖X‖², which the comparisons do not need): grows by γ up to
    β̄ while the error falls; when it rises, that iteration is not extrapolated and β shrinks by η (β̄ := the
    old β). Stops per matrix when two tests hold, or at ``max_iter``: scikit-learn's — the projected-gradient
    violation of the iterate (W, H) at most ``tol`` × the violation of the start — and the error ‖X − W H‖
    fell by at most ``tol`` (relative) over the last ``_WINDOW`` iterations (measured every ``_WINDOW``
    iterations from the residual itself: the Gram form ‖X‖² − 2⟨W, XHᵀ⟩ + ⟨WᵀW, HHᵀ⟩ cancels to noise in
    float32 when X is fitted closely). The violation alone stopped too early on slowly converging matrices (rank 2 +
    noise, k = 4: 2.9% above scikit-learn's error, which is itself still falling there), because
    extrapolation shrinks the gradient faster than the error. The extrapolated points are never returned.
    The errors of the restart rule are summed in float64 (summed in float32 they changed enough decisions to
    cost 12% more iterations); the residual's norm every ``_WINDOW`` iterations is summed in X's dtype
    (pairwise: ~1e-7 relative in float32, far below ``tol``). X is kept once, transposed (B, c, R): H̃Xᵀ reads
    it as stored and WᵀX transposed, which measured faster than keeping both layouts (half the memory). A
    matrix that stops leaves the batch: the last live matrix moves into its slot (one matrix copied; compacting
    the whole batch with a mask copied every live matrix: 4% of the iterations' time) and the batch is cut to its
    live prefix."""
    B = X.shape[0]
    dt, dev = X.dtype, X.device
    # (B, c, R): H Xᵀ reads it as it is, Wᵀ X transposed; always a copy (a stopped matrix's slot is overwritten, and
    # X may be the caller's tensor, whose transpose may already be contiguous)
    Xta = X.transpose(1, 2).clone(memory_format=torch.contiguous_format)
    Wt, Hc = W.transpose(1, 2).contiguous(), H.contiguous()
    Wt_out, H_out = Wt.clone(), Hc.clone()
    n_iter = torch.zeros(B, dtype=torch.long, device=dev)
    slot, n = list(range(B)), B  # slot j of the live batch holds matrix slot[j]; the first n slots are live
    beta = torch.full((B, 1, 1), _BETA0, dtype=dt, device=dev)
    beta_max = torch.ones(B, 1, 1, dtype=dt, device=dev)
    prev = torch.full((B,), math.inf, dtype=torch.float64, device=dev)
    last = torch.full((B,), math.inf, dtype=torch.float64, device=dev)  # the error at the last check
    settled = torch.zeros(B, dtype=torch.bool, device=dev)
    # the start's violation, scikit-learn's reference (its first sweep measures it at about the start)
    G, P = Hc @ Hc.transpose(1, 2), Hc @ Xta
    G2, P2 = Wt @ Wt.transpose(1, 2), Wt @ Xta.transpose(1, 2)
    first = _violation(Wt, torch.baddbmm(P, G, Wt, beta=-1)) + _violation(Hc, torch.baddbmm(P2, G2, Hc, beta=-1))
    Wx, Hx = Wt.clone(), Hc.clone()  # the extrapolated points the next iteration starts from
    # the two X-sized results reuse one buffer each (cut to the live prefix) instead of a fresh 10 MB residual and a
    # fresh H̃Xᵀ every time (measured faster, within this machine's noise; the cause was not isolated)
    res_buf, P_buf = torch.empty_like(Xta), torch.empty_like(P)
    for it in range(1, max_iter + 1):
        if it > 1:
            G, P = Hx @ Hx.transpose(1, 2), torch.bmm(Hx, Xta, out=P_buf[:n])
        Wn = _cd_passes(Wx, G, P, 1)
        G2, P2 = Wn @ Wn.transpose(1, 2), Wn @ Xta.transpose(1, 2)
        # ‖X − W H̃‖² − ‖X‖² = ⟨WᵀW, H̃H̃ᵀ⟩ − 2⟨WᵀX, H̃⟩, from k × k and k × c products (before H̃ is stepped)
        err = (G2 * G).sum((1, 2), dtype=torch.float64) - 2 * (P2 * Hx).sum((1, 2), dtype=torch.float64)
        Hn = _cd_passes(Hx, G2, P2, _H_PASSES)
        if it % _WINDOW == 0:
            residual = torch.baddbmm(Xta, Hn.transpose(1, 2), Wn, alpha=-1, out=res_buf[:n])  # X − W H
            now = torch.linalg.vector_norm(residual.flatten(1), dim=1).double()
            settled, last = last - now <= tol * now, now  # inf − e > tol · e: not at the first check
        stop = first == 0
        if bool(settled.any()):  # the violation only matters once the error has settled
            v = _violation(Wn, torch.baddbmm(P, G, Wn, beta=-1)) + _violation(Hn, torch.baddbmm(P2, G2, Hn, beta=-1))
            stop = stop | ((v <= tol * first) & settled)
        fell = (err <= prev)[:, None, None]
        step = 1 + beta * fell  # no extrapolation after a rise
        Wx = torch.lerp(Wt, Wn, step).clamp_(min=0)  # W + β (W − W_prev)
        Hx = torch.lerp(Hc, Hn, step).clamp_(min=0)
        beta_max = torch.where(fell, (beta_max * _GAMMA_BAR).clamp_(max=1), beta)
        beta = torch.where(fell, torch.minimum(beta_max, beta * _GAMMA), beta / _ETA)
        prev = torch.where(fell[:, 0, 0], err, prev)
        Wt, Hc = Wn, Hn
        if it == max_iter or bool(stop.any()):
            # a finished matrix leaves the batch: the last live one moves into its slot (one matrix copied, not the
            # whole batch compacted) and every state is cut to the live prefix, a view
            done = stop.tolist() if it < max_iter else [True] * n
            for j in reversed(range(n)):  # from the end: a slot moved into j was decided already
                if not done[j]:
                    continue
                o = slot[j]
                Wt_out[o], H_out[o], n_iter[o] = Wt[j], Hc[j], it
                n -= 1
                if j != n:
                    for state in (Xta, Wt, Hc, Wx, Hx, beta, beta_max, first, prev, last, settled):
                        state[j] = state[n]
                    slot[j] = slot[n]
            if n == 0:
                break
            Xta, Wt, Hc, Wx, Hx, beta, beta_max = Xta[:n], Wt[:n], Hc[:n], Wx[:n], Hx[:n], beta[:n], beta_max[:n]
            first, prev, last, settled = first[:n], prev[:n], last[:n], settled[:n]
    return Wt_out.transpose(1, 2), H_out, n_iter


def _mu(X, W, H, max_iter: int, tol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lee–Seung multiplicative updates (Frobenius); stops per matrix as scikit-learn's ``mu`` solver (every
    10 iterations, relative decrease of the error since the start ≤ tol)."""
    tiny = torch.finfo(X.dtype).eps
    B = X.shape[0]
    n_iter = torch.zeros(B, dtype=torch.long, device=X.device)
    active = torch.ones(B, dtype=torch.bool, device=X.device)
    e0 = nmf_error(X, W, H)
    prev = e0.clone()
    for it in range(1, max_iter + 1):
        a = active[:, None, None]
        W = torch.where(a, W * (X @ H.transpose(1, 2)) / (W @ (H @ H.transpose(1, 2))).clamp_min(tiny), W)
        H = torch.where(a, H * (W.transpose(1, 2) @ X) / ((W.transpose(1, 2) @ W) @ H).clamp_min(tiny), H)
        n_iter[active] = it
        if it % 10 == 0:
            e = nmf_error(X, W, H)
            stop = (prev - e) / e0.clamp_min(tiny) < tol
            active &= ~stop
            prev = e
            if not bool(active.any()):
                break
    return W, H, n_iter


def _sklearn(X, rows, k, init, max_iter, tol, seed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.decomposition import NMF

    Ws, Hs, its = [], [], []
    Xn = X.detach().cpu().numpy()
    for b in range(X.shape[0]):
        r = int(rows[b])
        model = NMF(n_components=k, init=init, max_iter=max_iter, tol=tol, random_state=seed[b])
        w = np.zeros((X.shape[1], k), dtype=Xn.dtype)
        w[:r] = model.fit_transform(Xn[b, :r])
        Ws.append(w)
        Hs.append(model.components_)
        its.append(model.n_iter_)
    t = lambda a: torch.as_tensor(np.stack(a), device=X.device)  # noqa: E731
    return t(Ws).to(X.dtype), t(Hs).to(X.dtype), t(its)


def nmf(
    X: torch.Tensor,
    n_components: int,
    *,
    solver: Solver = "auto",
    init: Literal["nndsvda", "nndsvd"] = "nndsvda",
    max_iter: int = 200,
    tol: float = 1e-4,
    n_rows: torch.Tensor | None = None,
    seed: int | Sequence[int] = 0,
    return_n_iter: bool = False,
):
    """Factorise ``X`` (R, c) — or a batch (B, R, c), one matrix per class — as ``X ≈ W H``, W, H ≥ 0.

    Returns ``(W, H)``: W (R, k) or (B, R, k), H (k, c) or (B, k, c) (the rows of H are the components,
    scikit-learn's ``components_``); with ``return_n_iter`` also the iterations run (B,). Matrices of a batch
    with fewer real rows are zero-padded at the end and give their row counts in ``n_rows`` (B,); padded rows
    of W are zero. ``solver``: "auto" (= "hals"), "hals", "ahals" (accelerated: scikit-learn's error, not its
    iterates, in fewer products), "mu" or "sklearn" (see the module docstring);
    ``init``, ``max_iter`` and ``tol`` as scikit-learn's (its defaults). ``seed`` is scikit-learn's
    ``random_state`` (of the randomized SVD behind the NNDSVD start): every solver starts as
    ``sklearn.decomposition.NMF(random_state=seed)`` does, so "hals" ends where it ends; any int is taken
    modulo 2**32 (numpy's seed range), so a negative CLI ``--seed`` works too; a sequence gives each matrix of
    the batch its own seed (several restarts of one matrix in one batched run). Raises InputError for
    negative or non-finite entries and for ``n_components`` above the number of rows or channels.
    """
    if solver not in NMF_SOLVERS:
        raise InputError(f"solver must be one of {', '.join(NMF_SOLVERS)}, got {solver!r}.")
    if init not in ("nndsvda", "nndsvd"):
        raise InputError(f"init must be 'nndsvda' (scikit-learn's default) or 'nndsvd', got {init!r}.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise InputError(f"max_iter must be a positive int, got {max_iter!r}.")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise InputError(f"tol must be a finite number >= 0, got {tol!r}.")
    several = isinstance(seed, (list, tuple, range)) or isinstance(seed, (torch.Tensor, np.ndarray)) and seed.ndim > 0
    seeds = list(seed) if several else [seed.item() if isinstance(seed, (torch.Tensor, np.ndarray)) else seed]
    if not seeds or any(isinstance(s, bool) or not isinstance(s, (numbers.Integral, np.integer)) and
                        not (isinstance(s, torch.Tensor) and not s.is_floating_point()) for s in seeds):
        raise InputError(f"seed must be an int (scikit-learn's random_state) or one int per matrix, got {seed!r}.")
    Xb, rows, batched = _check_input(X, n_components, n_rows)
    if len(seeds) == 1:
        seeds = seeds * Xb.shape[0]
    if len(seeds) != Xb.shape[0]:
        raise InputError(f"seed holds {len(seeds)} seeds for {Xb.shape[0]} matrices; give one int, or one per matrix.")
    seeds = [int(s) % 2**32 for s in seeds]  # numpy seeds are in [0, 2**32)
    Xb = Xb.detach()
    solver = _AUTO if solver == "auto" else solver
    if solver == "sklearn":
        W, H, n_iter = _sklearn(Xb, rows, n_components, init, max_iter, tol, seeds)
    else:
        # no autograd state for the hundreds of small ops (6% of "ahals"' time); the clones made outside are
        # ordinary tensors again (an inference tensor refuses in-place updates outside inference mode)
        with torch.inference_mode():
            W, H = _nndsvd(Xb, rows, n_components, init, seeds, batched_svd=solver == "ahals")
            W, H, n_iter = {"hals": _hals, "ahals": _ahals, "mu": _mu}[solver](Xb, W, H, max_iter, tol)
        W, H, n_iter = W.clone(), H.clone(), n_iter.clone()
    if not batched:
        W, H = W[0], H[0]
    return (W, H, n_iter) if return_n_iter else (W, H)


def nmf_error(X: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """The Frobenius reconstruction error ‖X − W H‖_F (scikit-learn's ``reconstruction_err_``): a scalar for
    one matrix, (B,) for a batch. Computed as ‖X‖² − 2⟨X, WH⟩ + ⟨WᵀW, HHᵀ⟩ without forming W H."""
    Xd, Wd, Hd = X.double(), W.double(), H.double()
    xx = (Xd * Xd).sum((-2, -1))
    cross = ((Xd @ Hd.transpose(-1, -2)) * Wd).sum((-2, -1))
    gram = ((Wd.transpose(-1, -2) @ Wd) * (Hd @ Hd.transpose(-1, -2))).sum((-2, -1))
    return (xx - 2 * cross + gram).clamp_min(0).sqrt().to(X.dtype)


def matched_cosine(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the rows of A (k, c) to their best one-to-one partners in B (k, c) (Hungarian
    matching on the cosine, scipy's ``linear_sum_assignment``); (k,) in A's row order."""
    from scipy.optimize import linear_sum_assignment

    a = torch.nn.functional.normalize(A.detach().double().cpu(), dim=-1)
    b = torch.nn.functional.normalize(B.detach().double().cpu(), dim=-1)
    cos = a @ b.T
    r, c = linear_sum_assignment(-cos.numpy())
    out = torch.empty(A.shape[0], dtype=torch.float64)
    out[torch.as_tensor(r)] = cos[torch.as_tensor(r), torch.as_tensor(c)]
    return out


def nmf_transform(X: torch.Tensor, H: torch.Tensor, *, max_iter: int = 200, tol: float = 1e-4) -> torch.Tensor:
    """The coefficients W ≥ 0 of the rows of ``X`` on fixed components ``H``: argmin_W ‖X − W H‖_F
    (scikit-learn's ``NMF.transform``: coordinate descent on W alone, from W = √(mean(x)/k)).

    ``X`` (..., R, c) ≥ 0 and ``H`` (..., k, c) with the same leading (batch) shape, or one ``H`` (k, c) for
    every matrix; returns W (..., R, k) in X's dtype and device. The problem is separable by rows, so each row
    starts from its own mean and stops on its own projected-gradient violation (≤ ``tol`` × its first), where
    scikit-learn stops on the whole matrix's: a row's coefficients do not depend on the other rows of the batch.
    """
    if not isinstance(X, torch.Tensor) or not isinstance(H, torch.Tensor) or X.dim() < 2 or H.dim() < 2:
        raise InputError("nmf_transform needs tensors X (..., R, c) and H (..., k, c).")
    if X.shape[-1] != H.shape[-1]:
        raise InputError(f"X has {X.shape[-1]} features but H has {H.shape[-1]}; they must match.")
    if not X.is_floating_point() or bool((X < 0).any()) or not bool(torch.isfinite(X).all()):
        raise InputError("nmf_transform needs finite, non-negative floating-point X (activations after a ReLU).")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise InputError(f"max_iter must be a positive int, got {max_iter!r}.")
    H = H.to(X)
    k = H.shape[-2]
    HHt = H @ H.transpose(-1, -2)  # (..., k, k)
    XHt = X @ H.transpose(-1, -2)  # (..., R, k)
    W = (X.mean(-1, keepdim=True) / k).sqrt().expand(*XHt.shape).clone()
    active = torch.ones(XHt.shape[:-1], dtype=torch.bool, device=X.device)
    first = torch.zeros(XHt.shape[:-1], dtype=X.dtype, device=X.device)
    for it in range(max_iter):
        violation = torch.zeros_like(first)
        for t in range(k):
            grad = (W * HHt[..., t, :].unsqueeze(-2)).sum(-1) - XHt[..., t]  # (..., R)
            w = W[..., t]
            pg = torch.where(w == 0, grad.clamp(max=0), grad)
            violation += pg.abs()
            hess = HHt[..., t, t].unsqueeze(-1)
            step = torch.where(hess != 0, grad / torch.where(hess != 0, hess, torch.ones_like(hess)), torch.zeros_like(grad))
            W[..., t] = torch.where(active, (w - step).clamp(min=0), w)
        if it == 0:
            first = violation
        active &= ~((first == 0) | (violation <= tol * first))
        if not bool(active.any()):
            break
    return W
