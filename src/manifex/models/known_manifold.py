"""Datasets with a known manifold: images sampled from a VAE decoder, so T_x is exact.

It lives with the models (not in ``alignment``) because it trains a labeler and several systems use it
(alignment scores against it, counterfactuals measure the off-manifold part of a change with it).

Recipe (Bordt et al. 2023, MNIST32): train a VAE on real digits; train a labeler on the VAE's
*reconstructions*; sample z ~ N(0, I), x = decoder(z), p = softmax(labeler(x)); accept with probability
max(p)², label = argmax p. The dataset stores X, Y and Z; tangent spaces follow exactly from
(decoder, Z) and are recomputed on demand (storing them at 256×256 would take gigabytes).
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.base import ImageDataset
from ..errors import DataError, InputError, param
from ..geometry import TangentSpace, tangent_space
from .cache import ModelCache, cache_key, state_fingerprint
from .generative import GenerativeModel
from .training import GenerativeTrainConfig, TrainConfig, accuracy
from .zoo import get_classifier, get_generative
from ..runs import atomic_write_bytes

__all__ = ["KnownManifoldConfig", "KnownManifold", "make_known_manifold", "upsampled_decoder", "check_known_manifold",
           "KNOWN_PREFIX", "KnownData", "known_base", "known_data", "known_check"]

#: How a dataset spec asks for the known manifold of its data: ``known:<data>``.
KNOWN_PREFIX = "known:"


@dataclass(frozen=True)
class KnownManifoldConfig:
    """How many images to sample, and the labeler's training."""

    n_train: int = 60000
    n_test: int = 10000
    labeler_arch: str = "lenet"
    labeler_epochs: int = 3
    batch_size: int = 512
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def upsampled_decoder(decoder: Callable[[torch.Tensor], torch.Tensor], size: int = 256) -> Callable[[torch.Tensor], torch.Tensor]:
    """The decoder followed by bilinear upsampling to ``size`` × ``size`` (the MNIST256 variant)."""

    def decode(z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(decoder(z), size=(size, size), mode="bilinear", align_corners=False)

    return decode


@dataclass
class KnownManifold:
    """A generated dataset with its generator: ``train``/``test`` (x, y, z) and ``generative`` (decode: z → x)."""

    train: ImageDataset
    test: ImageDataset
    generative: GenerativeModel
    labeler_accuracy: float
    acceptance_rate: float
    size: int | None = None  # None: the decoder's own resolution; else bilinear upsampling to size×size
    checks: list[str] = field(default_factory=list)  # what was verified about the generated dataset
    warnings: list[str] = field(default_factory=list)  # failed checks (only with allow_degenerate=True)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, k) → images (N, C, H, W) of this dataset (upsampled when ``size`` is set)."""
        x = self.generative.decode(z)
        if self.size is not None:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x

    def upsampled(self, size: int = 256) -> "KnownManifold":
        """The MNIST256 variant: the same latent codes and labels, images and decoder upsampled bilinearly.

        Images are materialised (N·size² floats each split); tangent spaces are recomputed on demand by
        :meth:`tangent_space` rather than stored (10 × 65,536 floats per image at 256×256).
        """
        if size < 1:
            raise InputError(f"size must be positive, got {size}.")
        up = lambda t: F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)  # noqa: E731
        with torch.no_grad():
            train = replace(self.train, x=up(self.train.x), name=f"{self.train.name}-{size}")
            test = replace(self.test, x=up(self.test.x), name=f"{self.test.name}-{size}")
        return replace(self, train=train, test=test, size=size)

    def save(self, path: str | Path) -> Path:
        """Write ``x_train, y_train, z_train, x_test, y_test, z_test`` to an ``.npz`` (no pickles), atomically.

        As ``np.savez_compressed``, ``.npz`` is appended to a path without it; returns the path written."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        arrays = {}
        for split, data in (("train", self.train), ("test", self.test)):
            arrays[f"x_{split}"] = data.x.cpu().numpy()
            arrays[f"y_{split}"] = data.y.cpu().numpy()
            arrays[f"z_{split}"] = data.z.cpu().numpy()
        buf = io.BytesIO()  # the archive is built in memory, then written by the one atomic helper
        np.savez_compressed(buf, **arrays)
        return atomic_write_bytes(path, buf.getvalue())

    @property
    def latent_dim(self) -> int:
        assert self.train.z is not None
        return self.train.z.shape[1]

    def tangent_space(self, data: ImageDataset, **kwargs) -> TangentSpace:
        """Exact tangent spaces of every image of ``data`` (from its stored latent codes)."""
        if data.z is None:
            raise InputError(f"dataset {data.name!r} stores no latent codes z; tangent spaces need a generated dataset.")
        dev = next(self.generative.parameters()).device
        return tangent_space(self.decode, data.z.to(dev), **kwargs)


@torch.no_grad()
def _sample(generative: GenerativeModel, labeler: torch.nn.Module, n: int, batch: int, g: torch.Generator, progress: bool, desc: str):
    xs, ys, zs, drawn = [], [], [], 0
    bar = tqdm(total=n, desc=desc, leave=False, disable=not progress, unit="img")
    dev = next(generative.parameters()).device
    have = 0
    while have < n:
        z = torch.randn(batch, generative.latent_dim, generator=g).to(dev)
        x = generative.decode(z)
        p = F.softmax(labeler(x), dim=1)
        conf, label = p.max(1)
        keep = torch.rand(batch, generator=g).to(dev) < conf**2
        drawn += batch
        xs.append(x[keep].cpu()); ys.append(label[keep].cpu()); zs.append(z[keep].cpu())
        bar.update(min(int(keep.sum()), n - have))  # the last batch may overshoot n; the bar must not
        have += int(keep.sum())
    bar.close()
    x, y, z = torch.cat(xs)[:n], torch.cat(ys)[:n], torch.cat(zs)[:n]
    return x, y, z, n / drawn


def make_known_manifold(
    real: ImageDataset,
    generative: GenerativeModel,
    config: KnownManifoldConfig = KnownManifoldConfig(),
    *,
    cache: ModelCache | None = None,
    progress: bool = True,
    allow_degenerate: bool = False,
) -> KnownManifold:
    """Sample a labelled dataset from ``generative``'s decoder (cached by generator weights and config).

    The result is checked (``check_known_manifold``): a labeler near chance, classes that (almost) never
    occur, or an acceptance rate of a near-uniform labeler make the labels meaningless. Such a dataset raises
    :class:`DataError` (the labeler is checked before sampling, so this fails early) unless
    ``allow_degenerate``, which returns it with the problems in ``warnings``.
    """
    key = cache_key(config.to_dict(), state_fingerprint(generative), real.fingerprint())
    generative.eval()
    dev = next(generative.parameters()).device
    hit = cache.load("known-manifold", key) if cache is not None else None
    if hit is None:
        with torch.no_grad():
            recon = ImageDataset(torch.cat([generative.reconstruct(real.x[i : i + 512].to(dev)).cpu() for i in range(0, len(real), 512)]),
                                 real.y, name=f"{real.name}-reconstructions", classes=real.classes)
        fit, val = recon.split(0.1, seed=config.seed)
        labeler, _ = get_classifier(fit, config.labeler_arch, TrainConfig(epochs=config.labeler_epochs, seed=config.seed),
                                    cache=cache, device=dev, progress=progress)
        acc = accuracy(labeler, val)
        if not allow_degenerate:  # fail before sampling: at chance, sampling accepts ~1/K² of the draws and takes long
            _raise_if(_labeler_problems(acc, len(real.classes)), real, config)
        g = torch.Generator().manual_seed(config.seed)
        x, y, z, rate = _sample(generative, labeler, config.n_train + config.n_test, config.batch_size, g, progress, "sampling known-manifold data")
        hit = {"x": x, "y": y, "z": z, "labeler_accuracy": acc, "acceptance_rate": rate}
        if cache is not None:
            cache.save("known-manifold", key, hit)
    x, y, z = hit["x"], hit["y"], hit["z"]
    nt = config.n_train
    name = f"known-{real.name}"
    train = ImageDataset(x[:nt], y[:nt], name=f"{name}-train", classes=real.classes, z=z[:nt])
    test = ImageDataset(x[nt:], y[nt:], name=f"{name}-test", classes=real.classes, z=z[nt:])
    km = KnownManifold(train, test, generative, float(hit["labeler_accuracy"]), float(hit["acceptance_rate"]))
    km.checks, problems = check_known_manifold(km, len(real.classes))
    if problems and not allow_degenerate:
        _raise_if(problems, real, config)
    km.warnings = problems
    return km


def _labeler_problems(acc: float, num_classes: int) -> list[str]:
    chance = 1.0 / num_classes
    if acc < max(2 * chance, 0.5):
        return [f"the labeler that assigns the generated images' labels has accuracy {acc:.1%} on held-out "
                f"reconstructions, near chance ({chance:.1%}): the labels are noise"]
    return []


def check_known_manifold(km: KnownManifold, num_classes: int) -> tuple[list[str], list[str]]:
    """What was verified about a generated dataset, and the problems found: ``(checks, problems)``.

    Problems: labeler accuracy below max(2 × chance, 50%); an effective number of classes exp(entropy of the
    class fractions) below K/2 (e.g. every image in one class); an acceptance rate below 2/K², which is what a
    labeler with near-uniform outputs gives under the max(p)² acceptance rule.
    """
    y = torch.cat([km.train.y, km.test.y])
    n, k = len(y), num_classes
    frac = torch.bincount(y, minlength=k).double() / max(n, 1)
    nz = frac[frac > 0]
    effective = float(torch.exp(-(nz * nz.log()).sum())) if n else 0.0
    missing = [str(c) for c in range(k) if frac[c] == 0]
    chance = 1.0 / k
    problems = _labeler_problems(km.labeler_accuracy, k)
    if effective < k / 2:
        top = int(frac.argmax())
        problems.append(f"the generated classes are unbalanced: effective number of classes {effective:.1f} of {k} "
                        f"(class {top} holds {float(frac[top]):.0%} of the {n:,} images)")
    if km.acceptance_rate < 2 * chance**2:
        problems.append(f"acceptance rate {km.acceptance_rate:.1%} (≈ 1/K² = {chance**2:.1%}, what a labeler with "
                        "near-uniform outputs gives): the labeler is not confident on the decoder's images")
    failed = lambda ok: "" if ok else "FAILED: "  # noqa: E731 - the report marks these
    checks = [
        f"{failed(km.labeler_accuracy >= max(2 * chance, 0.5))}known-manifold labeler: accuracy {km.labeler_accuracy:.1%} "
        f"on held-out reconstructions (chance {chance:.1%}; needs ≥ {max(2 * chance, 0.5):.0%})",
        f"{failed(effective >= k / 2)}generated classes: effective number {effective:.1f} of {k} (needs ≥ {k / 2:g}); "
        f"smallest {float(frac.min()):.1%}, largest {float(frac.max()):.1%}"
        + (f"; no image of class {', '.join(missing)}" if missing else ""),
        f"{failed(km.acceptance_rate >= 2 * chance**2)}acceptance rate {km.acceptance_rate:.1%} of decoder samples "
        f"(needs ≥ {2 * chance**2:.1%})",
    ]
    return checks, problems


def _raise_if(problems: list[str], real: ImageDataset, config: KnownManifoldConfig) -> None:
    if problems:
        raise DataError(
            f"the known-manifold dataset generated from {real.name} is degenerate: {'; '.join(problems)}. Train the VAE "
            "longer (--vae-epochs), use more data, or pass --allow-degenerate (allow_degenerate=True) to write a "
            "report flagged as unreliable."
        )


# ----------------------------------------------------------------------------------------------------------------
# "the known manifold of known:<data>": one definition for every command
# ----------------------------------------------------------------------------------------------------------------
def known_base(dataset: str | None) -> str | None:
    """``<data>`` of a ``known:<data>`` spec; None for any other dataset. ``known:`` alone (or ``known:known:…``) is
    refused in one line, before anything is loaded."""
    if not isinstance(dataset, str) or not dataset.startswith(KNOWN_PREFIX):
        return None
    base = dataset[len(KNOWN_PREFIX):].strip()
    if not base or base.startswith(KNOWN_PREFIX):
        raise InputError(f"{param('dataset', dataset)}: 'known:' takes the data the VAE is trained on, e.g. known:mnist5k "
                         "or known:digits8.")
    return base


@dataclass(frozen=True)
class KnownData:
    """How the known manifold of ``known:<data>`` is built: a VAE (latent ``latent_dim``, ``vae_epochs`` epochs,
    ``seed``) trained on the whole of ``<data>``, then ``n_train`` + ``n_test`` images sampled from its decoder and
    labelled (:func:`make_known_manifold`). The defaults are ``manifex align``'s, so every command that takes
    ``known:<data>`` with them shares align's cached VAE, dataset and classifiers. ``allow_degenerate`` keeps a
    dataset that fails its checks (with the problems in ``warnings``); it does not change the data."""

    vae_epochs: int = 20
    latent_dim: int = 10
    n_train: int = 6000
    n_test: int = 1000
    seed: int = 0
    allow_degenerate: bool = False

    def to_dict(self) -> dict:
        """The settings that decide the data (what a run claims)."""
        return {k: v for k, v in asdict(self).items() if k != "allow_degenerate"}


def known_data(real: ImageDataset, settings: KnownData = KnownData(), *, cache: ModelCache | None = None,
               device: str | torch.device = "cpu", progress: bool = True) -> tuple[KnownManifold, dict]:
    """The known manifold of ``known:<data>`` from the loaded base data ``real``: ``(KnownManifold, the VAE's training
    record)``. The VAE and the dataset come from ``cache`` when they are there (keyed by the data, the VAE's and the
    sampling's settings: the same entries ``manifex align`` has always used)."""
    vae, info = get_generative(real, "vae", settings.latent_dim,
                               GenerativeTrainConfig(epochs=settings.vae_epochs, seed=settings.seed),
                               cache=cache, device=device, progress=progress)
    km = make_known_manifold(real, vae, KnownManifoldConfig(n_train=settings.n_train, n_test=settings.n_test,
                                                            seed=settings.seed),
                             cache=cache, progress=progress, allow_degenerate=settings.allow_degenerate)
    return km, info


def known_check(km: KnownManifold, settings: KnownData | None = None) -> str:
    """The checks line that says the data's manifold is known (and how well its labels hold)."""
    how = f"latent {km.latent_dim}" + (f", VAE {settings.vae_epochs} epochs" if settings is not None else "")
    return (f"known manifold: {len(km.train):,} + {len(km.test):,} images sampled from a VAE decoder ({how}; dimension "
            f"k = {km.latent_dim} exactly, tangent spaces exact); labeler accuracy {km.labeler_accuracy:.1%}, acceptance "
            f"{km.acceptance_rate:.1%}")
