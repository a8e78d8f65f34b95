"""Train-or-reuse: build a model from its config and load it from the cache, or train and cache it."""
from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from ..data.base import ImageDataset
from .cache import ModelCache, cache_key, state_fingerprint
from .classifiers import ClassifierConfig, build_classifier
from .generative import GenerativeConfig, GenerativeModel, build_generative
from .training import GenerativeTrainConfig, TrainConfig, fit_classifier, fit_generative

__all__ = ["get_classifier", "get_generative", "state_fingerprint"]


def _restore(model: nn.Module, hit: dict) -> dict:
    model.load_state_dict(hit["state_dict"])
    info = dict(hit["info"])
    info["cached"] = True
    return info


def _restore_or_train(model: nn.Module, cache: ModelCache | None, name: str, key: str, train: Any,
                      progress: bool = False) -> dict:
    """Load the entry, or train and save it. Training holds the entry's lock, so concurrent processes that
    need the same model train it once: the others wait and then load it (a finished entry is read without
    the lock: cache files are replaced atomically, never written in place)."""
    if cache is None:
        info = train()
        info["cached"] = False
        return info
    hit = cache.load(name, key)
    if hit is not None:
        return _restore(model, hit)
    from filelock import Timeout

    lock = cache.lock(name, key)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if progress:
            print(f"manifex: another process is training {name} ({key}); waiting for it to finish ...", file=sys.stderr)
        lock.acquire()
    try:
        hit = cache.load(name, key)
        if hit is not None:  # trained by the process we waited for
            return _restore(model, hit)
        info = train()
        cache.save(name, key, {"state_dict": model.state_dict(), "info": info})
    finally:
        lock.release()
    info["cached"] = False
    return info


def get_classifier(
    data: ImageDataset,
    arch: str = "lenet",
    train: TrainConfig = TrainConfig(),
    *,
    cache: ModelCache | None = None,
    init: nn.Module | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[nn.Module, dict]:
    """A classifier trained on ``data`` (reused from ``cache`` when the same config/data/seed was trained).

    ``init`` starts training from another model's weights (e.g. adversarial fine-tuning of a standard model).
    Returns the model in eval mode on ``device`` and an info dict (history, train_seconds, cached, key).
    """
    config = ClassifierConfig(arch, tuple(data.image_shape), data.num_classes)
    init_key = state_fingerprint(init) if init is not None else None
    key = cache_key(config.to_dict(), train.to_dict(), data.fingerprint(), init_key)
    torch.manual_seed(train.seed)
    model = build_classifier(config).to(device)
    if init is not None:
        model.load_state_dict(init.state_dict())
    name = f"classifier-{arch}{'-robust' if train.adversarial else ''}"
    info = _restore_or_train(model, cache, name, key, lambda: fit_classifier(model, data, train, cache=cache, name=name, key=key, progress=progress),
                             progress)
    info["key"] = key
    return model.eval(), info


def get_generative(
    data: ImageDataset,
    arch: str = "vae",
    latent_dim: int = 10,
    train: GenerativeTrainConfig = GenerativeTrainConfig(),
    *,
    cache: ModelCache | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[GenerativeModel, dict]:
    """A VAE or autoencoder trained on ``data`` (reused from ``cache`` when possible); eval mode."""
    config = GenerativeConfig(arch, tuple(data.image_shape), latent_dim)
    key = cache_key(config.to_dict(), train.to_dict(), data.fingerprint())
    torch.manual_seed(train.seed)
    model = build_generative(config).to(device)
    name = f"generative-{arch}"
    info = _restore_or_train(model, cache, name, key, lambda: fit_generative(model, data, train, cache=cache, name=name, key=key, progress=progress),
                             progress)
    info["key"] = key
    return model.eval(), info

