"""A checkpoint cache keyed by (model config, training config, data fingerprint, seed).

Re-running a command with the same settings reuses the trained model; training writes a partial
checkpoint after every epoch so that an interrupted run resumes where it stopped. Everything is loaded
with ``torch.load(weights_only=True)``: a cache file can never run code.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError

__all__ = ["ModelCache", "cache_key", "default_cache_dir"]


def default_cache_dir() -> Path:
    """``$MANIFEX_CACHE`` or ``~/.cache/manifex``."""
    env = os.environ.get("MANIFEX_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "manifex"


def cache_key(*parts: Any) -> str:
    """A stable 16-hex-digit hash of JSON-serialisable parts (dataclass dicts, fingerprints, seeds)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class ModelCache:
    """Files ``<root>/<name>-<key>.pt`` (finished) and ``.partial.pt`` (resumable training state)."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()

    def path(self, name: str, key: str, partial: bool = False) -> Path:
        return self.root / f"{name}-{key}{'.partial' if partial else ''}.pt"

    def load(self, name: str, key: str, partial: bool = False) -> dict | None:
        p = self.path(name, key, partial)
        if not p.exists():
            return None
        try:
            return torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise DataError(f"cache file {p} is unreadable ({type(e).__name__}: {e}); delete it to retrain.") from e

    def save(self, name: str, key: str, payload: dict, partial: bool = False) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        p = self.path(name, key, partial)
        _atomic_save(payload, p)
        if not partial:
            self.path(name, key, partial=True).unlink(missing_ok=True)
        return p

    def save_tensors(self, name: str, key: str, tensors: dict[str, torch.Tensor]) -> Path:
        """Cache arbitrary named tensors (datasets, attributions)."""
        return self.save(name, key, {k: v.detach().cpu() for k, v in tensors.items()})
