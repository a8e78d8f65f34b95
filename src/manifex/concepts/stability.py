"""Are the concepts stable? Refactorise each class's matrix with other seeds and on bootstrap halves of its images,
match the new concepts to the reference ones (Hungarian matching on the cosine, :func:`~.nmf.matched_cosine`) and
report one cosine per concept.

- seeds: the same matrix, NMF started from ``seed`` (the randomized SVD behind scikit-learn's NNDSVDa start) —
  the solver's own variability;
- bootstrap halves: NMF (reference seed) on a seeded random half of the class's images (all rows of each chosen
  image) — the variability from the data.

A concept whose cosine falls below a threshold (the report's 0.8) is marked unstable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..data.base import ImageDataset
from ..errors import InputError
from .basis import ConceptBasis, class_concepts
from .nmf import NMF_SOLVERS, matched_cosine, nmf

__all__ = ["ConceptStability", "concept_stability", "matrix_stability"]


@dataclass
class ConceptStability:
    """``seed_cosine`` (C, S, k): per class, per other seed, the matched cosine of each reference concept;
    ``bootstrap_cosine`` (C, B, k): the same for the bootstrap halves; ``seeds``, ``n_bootstrap``, ``classes``."""

    seed_cosine: torch.Tensor
    bootstrap_cosine: torch.Tensor
    seeds: list[int]
    n_bootstrap: int
    classes: list[int]

    @property
    def cosine(self) -> torch.Tensor:
        """(C, k): per concept, the smallest matched cosine over every seed and half (1 = reproduced exactly)."""
        both = torch.cat([self.seed_cosine, self.bootstrap_cosine], 1)
        if both.shape[1] == 0:
            return torch.ones(both.shape[0], both.shape[2], dtype=torch.float64)
        return both.min(1).values

    def unstable(self, threshold: float = 0.8) -> torch.Tensor:
        """(C, k) bool: concepts whose smallest matched cosine is below ``threshold``."""
        return self.cosine < threshold


def _check_ints(name: str, values: Sequence[int]) -> list[int]:
    try:
        out = [int(v) for v in values]
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a list of ints, got {values!r}.") from None
    if any(isinstance(v, bool) for v in values):
        raise InputError(f"{name} must be a list of ints, got {values!r}.")
    return out


def matrix_stability(X: torch.Tensor, reference: torch.Tensor, *, n_rows: torch.Tensor | None = None,
                     rows_per_image: int = 1, seeds: Sequence[int] = (1, 2), bootstrap: int = 2, seed: int = 0,
                     solver: str = "auto", classes: Sequence[int] | None = None) -> ConceptStability:
    """Stability of the concepts ``reference`` (C, k, c) found by NMF on the matrices ``X`` (C, R, c) (zero-padded
    to R rows with real counts ``n_rows`` (C,), ``rows_per_image`` consecutive rows per image); ``seed`` is the
    reference's NMF seed (used for the halves), ``seeds`` the other seeds, ``bootstrap`` the number of halves."""
    if not isinstance(X, torch.Tensor) or X.dim() != 3 or not isinstance(reference, torch.Tensor) or reference.dim() != 3 \
            or reference.shape[0] != X.shape[0] or reference.shape[2] != X.shape[2]:
        raise InputError("matrix_stability needs X (C, rows, channels) and reference (C, k, channels) of the same C and channels.")
    seeds = _check_ints("seeds", seeds)
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise InputError(f"bootstrap must be an int >= 0 (the number of halves), got {bootstrap!r}.")
    if isinstance(rows_per_image, bool) or not isinstance(rows_per_image, int) or rows_per_image < 1:
        raise InputError(f"rows_per_image must be a positive int, got {rows_per_image!r}.")
    if solver not in NMF_SOLVERS:
        raise InputError(f"solver must be one of {', '.join(NMF_SOLVERS)}, got {solver!r}.")
    C, R, c = X.shape
    k = reference.shape[1]
    rows = torch.full((C,), R, dtype=torch.long) if n_rows is None else torch.as_tensor(n_rows).long().cpu()
    if bool((rows % rows_per_image != 0).any()):
        raise InputError(f"the row counts {rows.tolist()} are not multiples of rows_per_image={rows_per_image}.")
    images = rows // rows_per_image
    if bootstrap and bool((images < 2).any()):
        raise InputError(f"a bootstrap half needs at least 2 images per class, got {images.tolist()}; use bootstrap=0.")
    if bootstrap and bool((images // 2 * rows_per_image < k).any()):
        raise InputError(f"a half of the smallest class has fewer rows ({int(images.min()) // 2 * rows_per_image}) than the "
                         f"{k} components; use bootstrap=0 or more images.")

    def match(H: torch.Tensor) -> torch.Tensor:
        return torch.stack([matched_cosine(reference[i], H[i]) for i in range(C)])  # (C, k)

    # every refit in one batched NMF: C matrices per other seed, then C per half (the reference's seed)
    mats, counts, run_seeds = [X] * len(seeds), [rows] * len(seeds), [s for s in seeds for _ in range(C)]
    g = torch.Generator().manual_seed(int(seed))
    for _ in range(bootstrap):
        half = (images // 2).tolist()
        Xh = X.new_zeros(C, R, c)
        for i in range(C):
            pick = torch.randperm(int(images[i]), generator=g)[: half[i]].sort().values
            idx = (pick[:, None] * rows_per_image + torch.arange(rows_per_image)).reshape(-1).to(X.device)
            Xh[i, : idx.numel()] = X[i, idx]
        mats.append(Xh)
        counts.append(torch.tensor([h * rows_per_image for h in half]))
        run_seeds += [int(seed)] * C
    seed_cos, boot_cos = [], []
    if mats:
        H = nmf(torch.cat(mats), k, solver=solver, n_rows=torch.cat(counts).to(X.device), seed=run_seeds)[1]
        cos = [match(H[r * C : (r + 1) * C]) for r in range(len(mats))]
        seed_cos, boot_cos = cos[: len(seeds)], cos[len(seeds) :]
    empty = torch.zeros(C, 0, k, dtype=torch.float64)
    return ConceptStability(seed_cosine=torch.stack(seed_cos, 1) if seed_cos else empty,
                            bootstrap_cosine=torch.stack(boot_cos, 1) if boot_cos else empty, seeds=seeds,
                            n_bootstrap=bootstrap, classes=list(range(C)) if classes is None else list(classes))


def concept_stability(model: nn.Module, x: ImageDataset | torch.Tensor | ConceptBasis, layer: str | nn.Module | None = None, *,
                      seeds: Sequence[int] = (1, 2), bootstrap: int = 2, **concept_options: Any) -> ConceptStability:
    """Stability of the concepts that :func:`class_concepts` finds at ``layer`` (``concept_options``: its keywords,
    e.g. ``classes``, ``n_components``, ``seed``): the basis is computed once with its matrices kept, then
    refactorised with every seed of ``seeds`` and on ``bootstrap`` random halves of each class's images (see
    :func:`matrix_stability`). ``x`` may also be a basis made with ``keep_matrix=True`` (then ``model`` and
    ``layer`` are not used and no relevance is recomputed)."""
    if isinstance(x, ConceptBasis):
        basis = x
    else:
        if layer is None:
            raise InputError("concept_stability needs the layer (or a basis made with keep_matrix=True).")
        basis = class_concepts(model, x, layer, keep_matrix=True, **concept_options)
    if basis.matrix is None:
        raise InputError("this basis has no matrices; make it with class_concepts(..., keep_matrix=True).")
    return matrix_stability(basis.matrix, basis.vectors, n_rows=basis.n_rows, rows_per_image=basis.rows_per_image,
                            seeds=seeds, bootstrap=bootstrap, seed=int(basis.options.get("seed", 0)),
                            solver=str(basis.options.get("solver", "auto")), classes=basis.classes)
