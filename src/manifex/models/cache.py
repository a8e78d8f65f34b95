"""A checkpoint cache keyed by (model config, training config, data fingerprint, seed).

Re-running a command with the same settings reuses the trained model; training writes a partial
checkpoint after every epoch so that an interrupted run resumes where it stopped. Every file is written
atomically (:func:`manifex.runs.atomic_torch_save`: unique temporary file, fsync, ``os.replace``), so a
reader never sees a partial file, and :meth:`ModelCache.lock` guards one entry across processes, so two
runs that need the same model train it once (the second waits, then loads). Everything is loaded
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
from ..runs import atomic_torch_save, file_lock

__all__ = ["ModelCache", "cache_key", "default_cache_dir", "state_fingerprint"]


def default_cache_dir() -> Path:
    """``$MANIFEX_CACHE`` or ``~/.cache/manifex``."""
    env = os.environ.get("MANIFEX_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "manifex"


def cache_key(*parts: Any) -> str:
    """A stable 16-hex-digit hash of JSON-serialisable parts (dataclass dicts, fingerprints, seeds)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


#: Keys every entry must hold, by entry-name prefix (a valid archive with other content — a file copied
#: over, another version's format — is refused with the file to delete instead of a KeyError later).
_REQUIRED = {"classifier": ("state_dict", "info"), "generative": ("state_dict", "info"), "attribution": ("E",),
             "known-manifold": ("x", "y", "z", "labeler_accuracy", "acceptance_rate")}
_REQUIRED_PARTIAL = ("model", "optimizer", "epoch", "history")


def _check_content(hit: Any, name: str, partial: bool, path: Path) -> None:
    need = _REQUIRED_PARTIAL if partial else next((v for k, v in _REQUIRED.items() if name.startswith(k)), ())
    found = sorted(map(str, hit)) if isinstance(hit, dict) else None
    missing = [k for k in need if found is None or k not in hit]
    if found is None or missing:
        what = f"keys {found[:6]}" if found is not None else f"a {type(hit).__name__}"
        raise DataError(f"cache file {path} holds {what}, not a {name} {'training checkpoint' if partial else 'entry'} "
                        f"(missing {missing}); delete it to retrain.")


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
            hit = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise DataError(f"cache file {p} is unreadable ({type(e).__name__}: {e}); delete it to retrain.") from e
        _check_content(hit, name, partial, p)
        return hit

    def save(self, name: str, key: str, payload: dict, partial: bool = False) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        p = self.path(name, key, partial)
        atomic_torch_save(payload, p)
        if not partial:
            self.path(name, key, partial=True).unlink(missing_ok=True)
        return p

    def lock(self, name: str, key: str, *, timeout: float = -1):
        """An inter-process lock on the entry ``(name, key)`` (file ``<name>-<key>.pt.lock``): hold it while
        checking for, training and saving the entry. ``timeout`` seconds (-1: wait for ever)."""
        return file_lock(self.path(name, key), timeout=timeout)

    def save_tensors(self, name: str, key: str, tensors: dict[str, torch.Tensor]) -> Path:
        """Cache arbitrary named tensors (datasets, attributions)."""
        return self.save(name, key, {k: v.detach().cpu() for k, v in tensors.items()})


def state_fingerprint(model: torch.nn.Module) -> str:
    """A content hash of a model's weights (keys a model trained from another one's weights)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
