"""Train-or-reuse: build a model from its config and load it from the cache, or train and cache it."""
from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from ..data.base import ImageDataset
from .cache import ModelCache, cache_key
from .classifiers import ClassifierConfig, build_classifier
from .generative import GenerativeConfig, GenerativeModel, build_generative
from .training import GenerativeTrainConfig, TrainConfig, fit_classifier, fit_generative

__all__ = ["get_classifier", "get_generative", "state_fingerprint"]


def state_fingerprint(model: nn.Module) -> str:
    """A content hash of a model's weights (keys a model trained from another one's weights)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _restore_or_train(model: nn.Module, cache: ModelCache | None, name: str, key: str, train: Any) -> dict:
    hit = cache.load(name, key) if cache is not None else None
    if hit is not None:
        model.load_state_dict(hit["state_dict"])
        info = dict(hit["info"])
        info["cached"] = True
        return info
    info = train()
    if cache is not None:
        cache.save(name, key, {"state_dict": model.state_dict(), "info": info})
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
    info = _restore_or_train(model, cache, name, key, lambda: fit_classifier(model, data, train, cache=cache, name=name, key=key, progress=progress))
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
    info = _restore_or_train(model, cache, name, key, lambda: fit_generative(model, data, train, cache=cache, name=name, key=key, progress=progress))
    info["key"] = key
    return model.eval(), info

