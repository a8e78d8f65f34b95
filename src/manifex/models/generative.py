"""Generative models behind a single interface with unambiguous directions.

``encode(x) -> z``: image batch (N, C, H, W) in [0, 1] → latent codes (N, k) (the deterministic code: the
posterior mean for a VAE). ``decode(z) -> x``: latent codes (N, k) → images (N, C, H, W) in [0, 1].
Spatial latents are flattened to (N, k) at this interface, so every geometry function sees a plain
vector z. Flows and GANs implement the same two methods.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

__all__ = ["GenerativeModel", "VAE", "ConvAutoencoder", "GenerativeConfig", "build_generative"]


class GenerativeModel(nn.Module):
    """Interface: ``encode`` (x → z, (N, k)), ``decode`` (z → x), ``latent_dim`` k, ``image_shape``."""

    latent_dim: int
    image_shape: tuple[int, int, int]

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draws from the prior N(0, I), shape (n, k)."""
        dev = next(self.parameters()).device
        return torch.randn(n, self.latent_dim, generator=generator, device="cpu").to(dev)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x)


def _stages(image_shape: tuple[int, int, int]) -> int:
    """Number of stride-2 stages that take an H×W image down to 4×4."""
    _, h, w = image_shape
    n = int(round(math.log2(h))) - 2 if h > 0 else -1
    if h != w or n < 1 or 4 * 2**n != h:
        raise InputError(
            f"the convolutional VAE/autoencoder needs square images of side 8, 16, 32, 64, ... (4·2^n), got {h}×{w}; "
            "pad or resize the data (e.g. MNIST 28×28 → 32×32, which load_mnist5k does by default)."
        )
    return n


class VAE(GenerativeModel):
    """β-VAE (optionally β-TCVAE) with the seed's 32×32 architecture, generalised to 4·2^n pixels a side.

    Encoder: n × [conv 32ch, kernel 4, stride 2, ReLU] → 256 → 256 → 2k (mean, log-variance).
    Decoder: k → 256 → 256 → 512 → 32×4×4 → n × [transposed conv, kernel 4, stride 2] → sigmoid.
    Bernoulli likelihood (binary cross-entropy), ReLU inside.
    """

    def __init__(self, image_shape: tuple[int, int, int] = (1, 32, 32), latent_dim: int = 10, channels: int = 32) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)  # type: ignore[assignment]
        self.latent_dim = latent_dim
        n = _stages(self.image_shape)
        c = image_shape[0]
        enc: list[nn.Module] = []
        cin = c
        for _ in range(n):
            enc += [nn.Conv2d(cin, channels, 4, 2, 1), nn.ReLU()]
            cin = channels
        self.encoder = nn.Sequential(
            *enc, nn.Flatten(), nn.Linear(channels * 16, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2 * latent_dim)
        )
        dec: list[nn.Module] = [
            nn.Linear(latent_dim, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 512), nn.ReLU(),
            nn.Unflatten(1, (32, 4, 4)),
        ]
        cin = 32
        for i in range(n):
            last = i == n - 1
            dec.append(nn.ConvTranspose2d(cin, c if last else channels, 4, 2, 1))
            if not last:
                dec.append(nn.ReLU())
            cin = channels
        dec.append(nn.Sigmoid())
        self.decoder = nn.Sequential(*dec)

    def encode_distribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance, each (N, k)."""
        h = self.encoder(x)
        return h[:, : self.latent_dim], h[:, self.latent_dim :].clamp(-12.0, 8.0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_distribution(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder output before the final sigmoid (for a numerically stable Bernoulli likelihood)."""
        return self.decoder[:-1](z)

    def loss(self, x: torch.Tensor, *, beta: float = 1.0, tc_beta: float | None = None, dataset_size: int = 60000) -> torch.Tensor:
        """Negative ELBO per example (mean over the batch).

        With ``tc_beta`` set, the KL term is split as in β-TCVAE (minibatch-weighted sampling):
        index-code MI + ``tc_beta`` · total correlation + ``beta`` · dimension-wise KL.
        """
        mu, logvar = self.encode_distribution(x)
        std = torch.exp(0.5 * logvar)
        z = mu + std * torch.randn_like(std)
        rec = F.binary_cross_entropy_with_logits(self.decode_logits(z), x, reduction="sum") / x.shape[0]
        if tc_beta is None:
            kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1).mean()
            return rec + beta * kl
        n = x.shape[0]
        log2pi = math.log(2 * math.pi)
        # log q(z_i | x_j) for all pairs, per dimension: (n, n, k)
        lq = -0.5 * (log2pi + logvar[None] + (z[:, None] - mu[None]).pow(2) / logvar.exp()[None])
        log_qz_x = lq.diagonal(dim1=0, dim2=1).T.sum(1)
        norm = math.log(n * dataset_size)
        log_qz = torch.logsumexp(lq.sum(2), dim=1) - norm
        log_prod_qz = (torch.logsumexp(lq, dim=1) - norm).sum(1)
        log_pz = (-0.5 * (log2pi + z.pow(2))).sum(1)
        mi = (log_qz_x - log_qz).mean()
        tc = (log_qz - log_prod_qz).mean()
        dwkl = (log_prod_qz - log_pz).mean()
        return rec + mi + tc_beta * tc + beta * dwkl


class ConvAutoencoder(GenerativeModel):
    """Convolutional autoencoder with a spatial latent (latent_channels × H/4 × W/4), flattened at the interface.

    Used for real data, where the tangent space is the decoder Jacobian at the encoding (k can be thousands).
    """

    def __init__(self, image_shape: tuple[int, int, int] = (1, 32, 32), latent_channels: int = 4, channels: int = 32) -> None:
        super().__init__()
        c, h, w = image_shape
        if h % 4 or w % 4:
            raise InputError(f"ConvAutoencoder needs height and width divisible by 4, got {h}×{w}.")
        self.image_shape = tuple(image_shape)  # type: ignore[assignment]
        self.latent_shape = (latent_channels, h // 4, w // 4)
        self.latent_dim = latent_channels * (h // 4) * (w // 4)
        self.encoder = nn.Sequential(
            nn.Conv2d(c, channels, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(channels, channels, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(channels, channels, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(channels, latent_channels, 3, 1, 1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, channels, 3, 1, 1), nn.ReLU(),
            nn.ConvTranspose2d(channels, channels, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(channels, channels, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(channels, c, 3, 1, 1), nn.Sigmoid(),
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x).flatten(1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z.reshape(z.shape[0], *self.latent_shape))

    def loss(self, x: torch.Tensor, **_: object) -> torch.Tensor:
        return F.binary_cross_entropy(self.reconstruct(x), x, reduction="sum") / x.shape[0]


@dataclass(frozen=True)
class GenerativeConfig:
    """Architecture of a generative model (part of the cache key)."""

    arch: str = "vae"
    image_shape: tuple[int, int, int] = (1, 32, 32)
    latent_dim: int = 10  # VAE: k; autoencoder: latent channels

    def to_dict(self) -> dict:
        return asdict(self)


def build_generative(config: GenerativeConfig) -> GenerativeModel:
    """An untrained generative model: a :class:`VAE` or a :class:`ConvAutoencoder` (``config.arch``) for images of
    ``config.image_shape`` (C, H, W) with ``config.latent_dim`` latent dimensions (the VAE's k, the autoencoder's
    latent channels)."""
    if config.arch == "vae":
        return VAE(tuple(config.image_shape), config.latent_dim)
    if config.arch == "autoencoder":
        return ConvAutoencoder(tuple(config.image_shape), config.latent_dim)
    raise InputError(f"unknown generative model {config.arch!r}; choose 'vae' or 'autoencoder'.")
