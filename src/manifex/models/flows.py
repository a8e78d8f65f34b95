"""Normalizing flows behind the generator interface, built from normflows' layers.

Directions (manifex's, see :mod:`manifex.models.generators`): ``encode`` x → z, ``decode`` z → x; normflows' own
``forward`` is z → x and ``inverse`` x → z, so encode runs the normflows layers' ``inverse`` in reverse order and
decode runs their ``forward``. ``log_prob(x)`` = log N(z; 0, I) + log|det ∂z/∂x| (natural log, per example).

* :class:`ImageFlow` — a Glow-style multi-scale flow for images in [0, 1] (normflows' ``GlowBlock``: affine coupling
  with a conv net, invertible 1×1 convolution, ActNorm; ``Squeeze``/``Merge`` between levels; logit pre-processing
  x → logit(0.05 + 0.9 x) by normflows' ``Logit``). Its latent is a list of one tensor per level (coarsest first).
  Training dequantises 8-bit data: x̃ = (255 x + u) / 256, u ~ U(0, 1).
  The coupling scale is bounded in the decode direction (``scale_map="sigmoid_inv"``: x₂ = σ(s + 2)·z₂ + t, so
  decode never expands a coordinate). Glow's own map (normflows' ``"sigmoid"``) contracts in the encode direction
  and so divides by σ(s + 2) in decode: off the data, where the coupling nets output s ≪ 0, that factor is
  exp(−s − 2) and overflows float32. Measured on the 10-epoch MNIST-5k flow: latent ascent at lr 5e-2 drove s to
  −1.4e9 in the finest level within 3 steps and 15 of 16 searches ended in NaN; the bounded map removes the
  overflow by construction (decode is a composition of contractions, linear maps and a sigmoid).
* :class:`VectorFlow` — RealNVP for low-dimensional vectors (the research's helix flow: masked affine couplings,
  normflows' ``MaskedAffineFlow``, with s-nets ending in tanh and t-nets linear).

normflows' layers are used as they are; only the log-det accumulation is ours, because normflows'
``NormalizingFlow`` accumulates it in float32 whatever the input dtype (the float64 log-det test would fail).
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
from torch import nn

from ..errors import InputError

__all__ = ["ImageFlow", "VectorFlow", "HELIX_MASKS", "dequantize"]

# The research's helix masks (1 = kept, 0 = transformed), used twice: 12 couplings.
HELIX_MASKS: tuple[tuple[int, ...], ...] = ((0, 1, 1), (1, 0, 1), (1, 1, 0), (0, 0, 1), (1, 0, 0), (0, 1, 0))


def _std_normal_log_prob(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    out = 0.0
    for p in parts:
        v = p.reshape(p.shape[0], -1)
        out = out - 0.5 * (v * v).sum(1) - 0.5 * v.shape[1] * math.log(2 * math.pi)
    return out  # type: ignore[return-value]


def dequantize(x: torch.Tensor, generator: torch.Generator | None = None, levels: int = 256) -> torch.Tensor:
    """Uniform dequantisation of data on the grid k / (levels − 1): (x·(levels − 1) + u) / levels, u ~ U(0, 1)."""
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
    return (x * (levels - 1) + u) / levels


class ImageFlow(nn.Module):
    """Glow-style multi-scale flow on images (C, H, W) in [0, 1], H and W divisible by 2^levels.

    ``levels`` scales, ``blocks`` GlowBlocks per scale with ``hidden`` channels in the coupling nets (3×3, 1×1, 3×3
    convolutions). Latent: a list of ``levels`` tensors, coarsest first, e.g. for (1, 32, 32) and 3 levels
    [(16, 4, 4), (4, 8, 8), (2, 16, 16)] — 1,024 numbers in all, as many as pixels. Base: standard normal.
    ``scale_map``: the coupling scale, ``"sigmoid_inv"`` (default: decode multiplies by σ(s + 2) ∈ (0, 1), finite
    for any finite z), ``"sigmoid"`` (Glow's: decode divides by it, unbounded) or ``"exp"`` (RealNVP's).
    """

    generator_kind = "flow"
    exact = True
    #: Adam lr of a latent counterfactual search through this flow (``manifex.counterfactual(lr=None)``). Not the
    #: research's 5e-2, which was set for its own RealNVP: with this flow, 5e-2 overshoots. The search stops at the
    #: first step past p > 0.99, so the step size sets how far past the boundary it lands. Sweep, 32 images 4 → 9,
    #: Adam, LeNet (lr: median steps; L2 of the change; off-manifold fraction on known:mnist5k; RBF-SVM agreement on
    #: MNIST-5k): known:mnist5k 5e-2: 14, 3.57, 0.514; 1e-2: 44, 2.63, 0.481; 3e-3: 238, 2.31, 0.472. MNIST-5k
    #: 5e-2: 114 steps, SVM 77%, 10-NN 90%; 1e-2: 493 steps, SVM 91%, 10-NN 94%. 1e-2 is within 2% of the small-step
    #: limit at a fifth of 3e-3's steps.
    counterfactual_lr = 1e-2

    def __init__(
        self,
        image_shape: Sequence[int] = (1, 32, 32),
        levels: int = 3,
        blocks: int = 4,
        hidden: int = 32,
        alpha: float = 0.05,
        scale_map: str = "sigmoid_inv",
    ) -> None:
        import normflows as nf

        super().__init__()
        c, h, w = (int(v) for v in image_shape)
        if scale_map not in ("sigmoid_inv", "sigmoid", "exp"):
            raise InputError(f"ImageFlow scale_map must be 'sigmoid_inv' (bounded decode), 'sigmoid' (Glow) or 'exp', got {scale_map!r}.")
        if levels < 1 or blocks < 1 or hidden < 1:
            raise InputError(f"ImageFlow needs levels, blocks, hidden ≥ 1, got {levels}, {blocks}, {hidden}.")
        if h % 2**levels or w % 2**levels:
            raise InputError(
                f"ImageFlow with {levels} levels needs height and width divisible by {2 ** levels}, got {h}×{w}; "
                "use fewer levels or pad the images."
            )
        self.image_shape = (c, h, w)
        self.levels, self.blocks, self.hidden, self.alpha, self.scale_map = levels, blocks, hidden, alpha, scale_map
        flows, merges, shapes = [], [], []
        # Level i (decode order, coarsest first) works at resolution H / 2^(L−i) with c·2^(L+1−i) channels
        # (after merging this level's latent), exactly as normflows' multi-scale Glow example.
        for i in range(levels):
            ch = c * 2 ** (levels + 1 - i)
            with warnings.catch_warnings():  # normflows' LU 1×1 convolution calls the deprecated torch.lu
                warnings.filterwarnings("ignore", message=".*torch.lu is deprecated.*")
                level = [nf.flows.GlowBlock(ch, hidden, split_mode="channel", scale=True, scale_map=scale_map) for _ in range(blocks)]
            level.append(nf.flows.Squeeze())
            flows.append(level)
            if i == 0:
                shapes.append((c * 2 ** (levels + 1), h // 2**levels, w // 2**levels))
            else:
                merges.append(nf.flows.Merge())
                shapes.append((c * 2 ** (levels - i), h // 2 ** (levels - i), w // 2 ** (levels - i)))
        from ._frozen_lu import FrozenLUConv

        for level in flows:
            for block in level:
                for m in block.modules():
                    if type(m) is nf.flows.Invertible1x1Conv and m.use_lu:
                        m.__class__ = FrozenLUConv  # same parameters and state dict; see manifex.models._frozen_lu
        self.latent_shapes = [tuple(s) for s in shapes]
        self.flows = nn.ModuleList([nn.ModuleList(level) for level in flows])
        self.merges = nn.ModuleList(merges)
        self.logit = nf.transforms.Logit(alpha=alpha)

    @property
    def latent_dim(self) -> int:
        return sum(math.prod(s) for s in self.latent_shapes)

    def decode_and_log_det(self, z: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """z (list of levels, coarsest first) → (x (N, C, H, W), log|det ∂x/∂z| (N,))."""
        z = [z] if isinstance(z, torch.Tensor) else list(z)
        if len(z) != self.levels:
            raise InputError(f"ImageFlow latent must be a list of {self.levels} tensors {self.latent_shapes}, got {len(z)}.")
        log_det = torch.zeros(z[0].shape[0], dtype=z[0].dtype, device=z[0].device)
        h = z[0]
        for i in range(self.levels):
            if i > 0:
                h, ld = self.merges[i - 1]([h, z[i]])
                log_det = log_det + ld
            for f in self.flows[i]:
                h, ld = f(h)
                log_det = log_det + ld
        x, ld = self.logit(h)
        return x, log_det + ld

    def encode_and_log_det(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x (N, C, H, W) in [0, 1] → (z list, log|det ∂z/∂x| (N,))."""
        h, log_det = self.logit.inverse(x)
        z: list[torch.Tensor] = [None] * self.levels  # type: ignore[list-item]
        for i in range(self.levels - 1, -1, -1):
            for f in reversed(self.flows[i]):
                h, ld = f.inverse(h)
                log_det = log_det + ld
            if i == 0:
                z[0] = h
            else:
                (h, z[i]), ld = self.merges[i - 1].inverse(h)
                log_det = log_det + ld
        return z, log_det

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.encode_and_log_det(x)[0]

    def decode(self, z: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.decode_and_log_det(z)[0]

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) in nats, (N,): density on the continuous pixel cube (see ``bits_per_dim``)."""
        z, log_det = self.encode_and_log_det(x)
        return _std_normal_log_prob(z) + log_det

    def bits_per_dim(self, x: torch.Tensor, levels: int = 256) -> torch.Tensor:
        """−log p(x) / (d ln 2) + log2(levels): bits per dimension of 8-bit data (x dequantised), (N,)."""
        d = math.prod(x.shape[1:])
        return -self.log_prob(x) / (d * math.log(2.0)) + math.log2(levels)

    def sample_latent(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> list[torch.Tensor]:
        dev = next(self.parameters()).device
        return [temperature * torch.randn((n, *s), generator=generator).to(dev) for s in self.latent_shapes]

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None, **_: object) -> torch.Tensor:
        """Training loss: mean bits per dimension of the dequantised batch."""
        return self.bits_per_dim(dequantize(x, generator)).mean()

    def initialize(self, x: torch.Tensor) -> None:
        """Data-dependent ActNorm initialisation from a batch (normflows does it on the first call)."""
        with torch.no_grad():
            self.encode_and_log_det(dequantize(x))


def _mlp(d: int, hidden: int, tanh: bool) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(d, hidden), nn.LeakyReLU(), nn.Linear(hidden, hidden), nn.LeakyReLU(), nn.Linear(hidden, d)]
    if tanh:
        layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class VectorFlow(nn.Module):
    """RealNVP for vectors (N, d): masked affine couplings x = b·z + (1 − b)·(z·exp(s(b·z)) + t(b·z)).

    ``masks`` (m, d) of 0/1 (1 = passed through); default: the research's helix masks (d = 3, 12 couplings).
    s- and t-nets are d-``hidden``-``hidden``-d MLPs with LeakyReLU; s ends in tanh. Latent: (N, d).
    """

    generator_kind = "flow"
    exact = True

    def __init__(self, dim: int = 3, hidden: int = 256, masks: Sequence[Sequence[int]] | None = None) -> None:
        import normflows as nf

        super().__init__()
        if masks is None:
            if dim != 3:
                raise InputError(f"VectorFlow: give masks for dim={dim} (the default masks are the helix's, dim=3).")
            masks = list(HELIX_MASKS) * 2
        m = torch.tensor([list(r) for r in masks], dtype=torch.float32)
        if m.dim() != 2 or m.shape[1] != dim or not bool(((m == 0) | (m == 1)).all()):
            raise InputError(f"VectorFlow masks must be 0/1 rows of length {dim}, got shape {tuple(m.shape)}.")
        self.dim, self.hidden = dim, hidden
        self.couplings = nn.ModuleList(
            [nf.flows.MaskedAffineFlow(b, t=_mlp(dim, hidden, tanh=False), s=_mlp(dim, hidden, tanh=True)) for b in m]
        )

    @property
    def latent_dim(self) -> int:
        return self.dim

    def decode_and_log_det(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (N, d) → (x (N, d), log|det ∂x/∂z| (N,))."""
        log_det = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        for f in self.couplings:
            z, ld = f(z)
            log_det = log_det + ld
        return z, log_det

    def encode_and_log_det(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, d) → (z (N, d), log|det ∂z/∂x| (N,))."""
        log_det = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for f in reversed(self.couplings):
            x, ld = f.inverse(x)
            log_det = log_det + ld
        return x, log_det

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_and_log_det(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode_and_log_det(z)[0]

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        z, log_det = self.encode_and_log_det(x)
        return _std_normal_log_prob([z]) + log_det

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        dev = next(self.parameters()).device
        return torch.randn((n, self.dim), generator=generator).to(dev)

    def loss(self, x: torch.Tensor, **_: object) -> torch.Tensor:
        """Training loss: mean negative log-likelihood in nats."""
        return -self.log_prob(x).mean()
