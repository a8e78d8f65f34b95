"""Training loops with progress bars, per-epoch checkpoints and a reusable cache; l2 adversarial training."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.base import ImageDataset
from ..errors import InputError, ModelError
from .cache import ModelCache, cache_key, state_fingerprint

__all__ = [
    "TrainConfig",
    "AdversarialConfig",
    "GenerativeTrainConfig",
    "GeneratorTrainConfig",
    "pgd_l2",
    "fit_classifier",
    "fit_generative",
    "fit_generator",
    "accuracy",
    "predict",
]


@dataclass(frozen=True)
class AdversarialConfig:
    """PGD-l2 adversarial training: ε drawn per example from ``epsilons``; step = ``step_factor``·ε/``steps``.

    Defaults are the seed's MNIST32 schedule (ε ∈ {1, 4, 8}, 100 steps, step 2.5ε/100, random start),
    with norms taken per example (the seed took them over the whole batch).
    """

    epsilons: tuple[float, ...] = (1.0, 4.0, 8.0)
    steps: int = 100
    step_factor: float = 2.5
    random_start: bool = True


@dataclass(frozen=True)
class TrainConfig:
    """Classifier training. Defaults follow the seed: Adam 1e-3, StepLR(10, 0.1)."""

    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    step_size: int = 10
    gamma: float = 0.1
    adversarial: AdversarialConfig | None = None
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GenerativeTrainConfig:
    """VAE / autoencoder training (seed: Adam 5e-4, batch 64)."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 5e-4
    beta: float = 1.0
    tc_beta: float | None = None
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _per_example_norm(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def pgd_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    *,
    steps: int = 100,
    step_factor: float = 2.5,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """l2 PGD adversarial examples, each within its own ball ‖δ_i‖₂ ≤ ε_i, clamped to [0, 1].

    ``eps`` is a float or a (N,) tensor; norms and steps are per example. Returns x + δ (detached).
    """
    n = x.shape[0]
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device).expand(n).reshape(-1, *([1] * (x.dim() - 1)))
    step = step_factor * eps_t / steps
    if random_start:
        d = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
        r = torch.rand((n,), generator=generator, dtype=x.dtype, device="cpu").to(x.device)
        delta = d / _per_example_norm(d) * eps_t * r.view_as(eps_t)
    else:
        delta = torch.zeros_like(x)
    delta = ((x + delta).clamp(0, 1) - x).detach()
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = delta + step * g / _per_example_norm(g)
            delta = delta * torch.clamp(eps_t / _per_example_norm(delta), max=1.0)
            delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    raise InputError(f"optimizer must be 'adam' or 'sgd', got {cfg.optimizer!r}.")


def _default_key(cfg: TrainConfig | GenerativeTrainConfig, model: nn.Module, data: ImageDataset) -> str:
    """Checkpoint key when the caller gives none: training config, architecture, initial weights and data,
    so that a partial checkpoint is only ever resumed by the same training run."""

    return cache_key(cfg.to_dict(), type(model).__name__, state_fingerprint(model), data.fingerprint())


#: Progress-bar names of what a model is, by its ``generator_kind`` (flows, GANs) or class name (VAE, autoencoder).
_KIND_LABELS = {"flow": "flow", "gan": "GAN", "VAE": "VAE", "ConvAutoencoder": "autoencoder"}


def training_label(model: nn.Module, role: str | None = None) -> str:
    """What a progress bar says is being trained: ``role`` (classifier, robust classifier) or the model's kind
    (flow, GAN, VAE, autoencoder), then its class, e.g. "classifier LeNet", "flow ImageFlow", "GAN DCGAN"."""
    name = type(model).__name__
    what = role or _KIND_LABELS.get(getattr(model, "generator_kind", None) or name, "generative model")
    return name if what == name else f"{what} {name}"


def _batches(n: int, batch_size: int, g: torch.Generator) -> list[torch.Tensor]:
    return list(torch.randperm(n, generator=g).split(batch_size))


def _run_epochs(
    model: nn.Module,
    data: ImageDataset,
    *,
    epochs: int,
    batch_size: int,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler | None,
    step_loss: Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor | None],
    seed: int,
    cache: ModelCache | None,
    name: str,
    key: str,
    progress: bool,
    desc: str,
) -> dict:
    """Shared epoch loop: resumes from a partial checkpoint, saves one after every epoch."""
    start, history = 0, []
    partial = cache.load(name, key, partial=True) if cache is not None else None
    if partial is not None:
        model.load_state_dict(partial["model"])
        opt.load_state_dict(partial["optimizer"])
        if sched is not None and "scheduler" in partial:
            sched.load_state_dict(partial["scheduler"])
        start, history = int(partial["epoch"]), list(partial["history"])
        # Restore the global RNG stream (dropout masks, VAE noise) so a resumed run matches an uninterrupted one.
        if "rng_state" in partial:
            torch.set_rng_state(partial["rng_state"])
        cuda_states = partial.get("cuda_rng_state")
        if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    dev = next(model.parameters()).device
    t0 = time.perf_counter()
    skipped, seen = int(partial.get("skipped", 0)) if partial else 0, 0
    for epoch in range(start, epochs):
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        model.train()
        total, count = 0.0, 0
        batches = _batches(len(data), batch_size, g)
        bar = tqdm(batches, desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False, disable=not progress, unit="batch")
        for idx in bar:
            xb, yb = data.x[idx].to(dev), data.y[idx].to(dev)
            loss = step_loss(xb, yb, g)
            seen += 1
            if loss is None:  # a non-finite loss the model's step_loss allows to skip
                skipped += 1
                if skipped > max(3, 0.01 * (seen + start * len(batches))):
                    raise ModelError(
                        f"{type(model).__name__} training diverged: the loss was not finite on {skipped} batches "
                        f"(epoch {epoch + 1}); lower the learning rate, or retrain with another seed (delete the "
                        "partial checkpoint in the cache)."
                    )
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            bar.set_postfix(loss=f"{total / count:.4g}")
        if sched is not None:
            sched.step()
        history.append(total / max(count, 1))
        if cache is not None and epoch + 1 < epochs:
            payload = {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1, "history": history,
                "rng_state": torch.get_rng_state(), "skipped": skipped,
            }
            if torch.cuda.is_available():
                payload["cuda_rng_state"] = torch.cuda.get_rng_state_all()
            if sched is not None:
                payload["scheduler"] = sched.state_dict()
            cache.save(name, key, payload, partial=True)
    if cache is not None:
        cache.path(name, key, partial=True).unlink(missing_ok=True)  # finished: nothing left to resume
    model.eval()
    info = {"history": history, "train_seconds": time.perf_counter() - t0}
    if skipped:
        info["skipped_batches"] = skipped
        info["batches"] = epochs * len(batches) if epochs > start else None
    return info


def fit_classifier(
    model: nn.Module,
    data: ImageDataset,
    cfg: TrainConfig = TrainConfig(),
    *,
    cache: ModelCache | None = None,
    name: str = "classifier",
    key: str | None = None,
    progress: bool = True,
) -> dict:
    """Train ``model`` on ``data`` in place (standard or PGD-l2 adversarial); return training info.

    With a ``cache``, training resumes from the last finished epoch after an interruption.
    """
    torch.manual_seed(cfg.seed)
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.StepLR(opt, cfg.step_size, cfg.gamma)
    adv = cfg.adversarial
    eps_choices = torch.tensor(adv.epsilons) if adv else None

    def step_loss(xb: torch.Tensor, yb: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if adv is not None:
            eps = eps_choices[torch.randint(len(eps_choices), (len(yb),), generator=g)].to(xb)
            model.eval()
            xb = pgd_l2(model, xb, yb, eps, steps=adv.steps, step_factor=adv.step_factor, random_start=adv.random_start, generator=g)
            model.train()
        return F.cross_entropy(model(xb), yb)

    return _run_epochs(
        model, data, epochs=cfg.epochs, batch_size=cfg.batch_size, opt=opt, sched=sched, step_loss=step_loss,
        seed=cfg.seed, cache=cache, name=name, key=key or _default_key(cfg, model, data), progress=progress,
        desc=training_label(model, "robust classifier" if adv else "classifier"),
    )


def fit_generative(
    model: nn.Module,
    data: ImageDataset,
    cfg: GenerativeTrainConfig = GenerativeTrainConfig(),
    *,
    cache: ModelCache | None = None,
    name: str = "generative",
    key: str | None = None,
    progress: bool = True,
) -> dict:
    """Train a VAE / autoencoder (its ``loss`` method) on ``data`` in place; return training info."""
    torch.manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    n = len(data)

    def step_loss(xb: torch.Tensor, yb: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return model.loss(xb, beta=cfg.beta, tc_beta=cfg.tc_beta, dataset_size=n)

    return _run_epochs(
        model, data, epochs=cfg.epochs, batch_size=cfg.batch_size, opt=opt, sched=None, step_loss=step_loss,
        seed=cfg.seed, cache=cache, name=name, key=key or _default_key(cfg, model, data), progress=progress, desc=training_label(model),
    )


@dataclass(frozen=True)
class GeneratorTrainConfig:
    """Flow / GAN training by the model's own ``loss(x, generator=g)``: Adam(``lr``, ``betas``) for a fixed
    number of epochs (no early stopping, so a cached model is a function of this config). The zoo's defaults
    per model are in ``manifex/models/generator_zoo.py``."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def fit_generator(
    model: nn.Module,
    data: ImageDataset,
    cfg: GeneratorTrainConfig = GeneratorTrainConfig(),
    *,
    cache: ModelCache | None = None,
    name: str = "generator",
    key: str | None = None,
    progress: bool = True,
) -> dict:
    """Train a flow or GAN in place by its ``loss(x, generator=g)`` (``g`` seeds per-batch noise: dequantisation,
    GAN latents); per-epoch checkpoints and resume as for the other models. ``data`` needs ``x``, ``y``,
    ``len`` and ``fingerprint()`` (an :class:`ImageDataset`, or vectors for the vector flow)."""
    torch.manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))

    def step_loss(xb: torch.Tensor, yb: torch.Tensor, g: torch.Generator) -> torch.Tensor | None:
        loss = model.loss(xb, generator=g)
        # A coupling flow's encode divides by its scale, so one unusual batch can overflow early in training while
        # the model is sound (the zoo image flow at seed 1: 3 of 1,575 batches, final 1.63 bits/dim): such a batch
        # is skipped (no update) and counted. Past the budget of _run_epochs training has really diverged.
        return loss if bool(torch.isfinite(loss.detach())) else None

    return _run_epochs(
        model, data, epochs=cfg.epochs, batch_size=cfg.batch_size, opt=opt, sched=None, step_loss=step_loss,
        seed=cfg.seed, cache=cache, name=name, key=key or _default_key(cfg, model, data), progress=progress,
        desc=training_label(model),
    )


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits for ``x`` in eval mode (mode restored afterwards), computed in batches."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    try:
        return torch.cat([model(x[i : i + batch_size].to(dev)).cpu() for i in range(0, len(x), batch_size)])
    finally:
        model.train(was)


def accuracy(model: nn.Module, data: ImageDataset, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``data``."""
    return float((predict(model, data.x, batch_size).argmax(1) == data.y).float().mean())
