"""A small DCGAN (Radford et al. 2016) for square images of side 8, 16, 32, 64, ... behind the generator interface.

``decode(z)``: z (N, k) → images (N, C, H, W) in [0, 1] (sigmoid output; the research's DCGAN used tanh and then
clipped to [0, 1]). ``encode(x)``: there is no encoder — x is inverted by :func:`manifex.invert_generator` with the
research settings (Adam lr 0.1 on z from N(0, I), MSE(clip(G(z)), x) until < 1e-3 or 3000 steps), so the
generator is approximate (``exact = False``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .generators import invert_generator

__all__ = ["DCGAN"]


def _stages(image_shape: tuple[int, int, int]) -> int:
    _, h, w = image_shape
    n = int(round(math.log2(h))) - 2 if h > 0 else -1
    if h != w or n < 1 or 4 * 2**n != h:
        raise InputError(f"DCGAN needs square images of side 8, 16, 32, 64, ... (4·2^n), got {h}×{w}.")
    return n


class DCGAN(nn.Module):
    """Generator: k → (4·ngf·... ) 4×4 → n × [transposed conv 4, stride 2, BatchNorm, ReLU] → sigmoid.
    Discriminator: n × [conv 4, stride 2, LeakyReLU 0.2] → linear → 1 logit (no BatchNorm, so the generator's
    loss can use the discriminator with detached weights in the same backward pass, see :meth:`loss`)."""

    generator_kind = "gan"
    exact = False

    def __init__(self, image_shape: tuple[int, int, int] = (1, 32, 32), latent_dim: int = 32, channels: int = 32) -> None:
        super().__init__()
        c = image_shape[0]
        n = _stages(tuple(image_shape))
        self.image_shape = tuple(image_shape)
        self.latent_dim = latent_dim
        widths = [channels * 2 ** (n - 1 - i) for i in range(n)]  # channels entering each up-sampling stage
        self.project = nn.Sequential(nn.Linear(latent_dim, widths[0] * 16), nn.BatchNorm1d(widths[0] * 16), nn.ReLU())
        up: list[nn.Module] = [nn.Unflatten(1, (widths[0], 4, 4))]
        for i in range(n):
            last = i == n - 1
            cout = c if last else widths[i + 1]
            up.append(nn.ConvTranspose2d(widths[i], cout, 4, 2, 1, bias=last))
            up += [nn.Sigmoid()] if last else [nn.BatchNorm2d(cout), nn.ReLU()]
        self.generator = nn.Sequential(*up)
        down: list[nn.Module] = []
        cin = c
        for w in reversed(widths):
            down += [nn.Conv2d(cin, w, 4, 2, 1), nn.LeakyReLU(0.2)]
            cin = w
        self.discriminator = nn.Sequential(*down, nn.Flatten(), nn.Linear(cin * 16, 1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, k) → x (N, C, H, W) in [0, 1]."""
        return self.generator(self.project(z))

    def encode(self, x: torch.Tensor, **inversion: object) -> torch.Tensor:
        """x → z by :func:`manifex.invert_generator` (research settings unless overridden)."""
        return invert_generator(self.decode, x, latent_shape=(self.latent_dim,), **inversion).z  # type: ignore[arg-type]

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        dev = next(self.parameters()).device
        return torch.randn((n, self.latent_dim), generator=generator).to(dev)

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None, **_: object) -> torch.Tensor:
        """Discriminator loss + non-saturating generator loss, arranged so one backward pass gives each network
        only its own gradient: the discriminator sees the fakes detached, the generator's loss goes through the
        discriminator with detached weights (``torch.func.functional_call``). One optimizer then updates both
        (simultaneous gradient steps)."""
        z = self.sample_latent(x.shape[0], generator).to(x.dtype)
        fake = self.decode(z)
        real_logit = self.discriminator(x)
        fake_logit = self.discriminator(fake.detach())
        d_loss = F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit)) + \
            F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit))
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        g_logit = torch.func.functional_call(self.discriminator, frozen, (fake,))
        g_loss = F.binary_cross_entropy_with_logits(g_logit, torch.ones_like(g_logit))
        return d_loss + g_loss
