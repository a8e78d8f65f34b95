"""Exceptions and input checks shared by every layer.

Every public function validates its inputs through these helpers so that a user sees one kind of
message: what was wrong, and how to fix it.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = [
    "ManifexError",
    "InputError",
    "ModelError",
    "DataError",
    "RankDeficientWarning",
    "check_tensor",
    "check_finite",
    "check_pixel_range",
]


class ManifexError(Exception):
    """Base class of every error manifex raises on purpose."""


class InputError(ManifexError, ValueError):
    """A tensor argument has the wrong shape, dtype, range or contains NaN/inf."""


class ModelError(ManifexError, RuntimeError):
    """A model cannot be used by the requested method (not differentiable, ignores its input, ...)."""


class DataError(ManifexError, OSError):
    """A dataset file is missing, malformed or untrusted."""


class RankDeficientWarning(UserWarning):
    """A tangent space has fewer directions than the latent dimension."""


def check_tensor(
    t: object,
    name: str,
    *,
    ndim: int | Sequence[int] | None = None,
    min_ndim: int | None = None,
    floating: bool = True,
) -> torch.Tensor:
    """Check that ``t`` is a tensor with the expected number of dimensions; return it."""
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}; convert with torch.as_tensor(...).")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise InputError(
                f"{name} must have {' or '.join(map(str, allowed))} dimensions (batch first), "
                f"got shape {tuple(t.shape)}; add a batch dimension with .unsqueeze(0) for a single example."
            )
    if min_ndim is not None and t.dim() < min_ndim:
        raise InputError(
            f"{name} must have at least {min_ndim} dimensions (batch first), got shape {tuple(t.shape)}; "
            "add a batch dimension with .unsqueeze(0) for a single example."
        )
    if floating and not t.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor, got dtype {t.dtype}; use {name}.float().")
    return t


def check_finite(t: torch.Tensor, name: str) -> torch.Tensor:
    """Raise if ``t`` holds NaN or inf, naming how many entries and in which examples."""
    bad = ~torch.isfinite(t.detach())
    if bool(bad.any()):
        rows = bad.reshape(bad.shape[0], -1).any(dim=1).nonzero().flatten().tolist() if t.dim() else []
        raise InputError(
            f"{name} contains {int(bad.sum())} NaN/inf values (examples {rows[:10]}{'...' if len(rows) > 10 else ''}); "
            "clean the input (torch.nan_to_num) or find where the non-finite values come from."
        )
    return t


def check_pixel_range(x: torch.Tensor, name: str, low: float = 0.0, high: float = 1.0, atol: float = 1e-4) -> torch.Tensor:
    """Raise if the values of ``x`` leave ``[low, high]`` (the range a model was trained on)."""
    lo, hi = float(x.detach().min()), float(x.detach().max())
    if lo < low - atol or hi > high + atol:
        raise InputError(
            f"{name} has values in [{lo:.3g}, {hi:.3g}] but the model expects pixels in [{low:g}, {high:g}]; "
            f"rescale the images (e.g. x / 255 for 8-bit data) or pass the matching pixel_range."
        )
    return x


# ----------------------------------------------------------------------------------------------------------------
# Errors speak in parameter names; the CLI maps them to flags in one place (manifex.cli sets the mapping).
# ----------------------------------------------------------------------------------------------------------------
import contextlib as _contextlib
from contextvars import ContextVar as _ContextVar

_FLAGS: _ContextVar[dict | None] = _ContextVar("manifex_flags", default=None)
_UNSET = object()


def param(name: str, value: object = _UNSET) -> str:
    """How an error message names a parameter (and optionally its value): ``layer`` / ``layer='nope'`` in Python,
    ``--layer`` / ``--layer nope`` under the command line (booleans: ``overwrite=True`` / ``--overwrite``,
    ``resume=False`` / ``--no-resume``). The CLI sets the name → flag mapping with :func:`speaking_flags`."""
    flags = _FLAGS.get()
    if flags is None:
        return name if value is _UNSET else f"{name}={value!r}"
    flag = flags.get(name) or "--" + name.replace("_", "-")
    if value is _UNSET or value is True:
        return flag
    if value is False:
        return "--no-" + flag[2:]
    return f"{flag} {value}"


@_contextlib.contextmanager
def speaking_flags(mapping: dict[str, str] | None = None):
    """Within this block :func:`param` names command-line flags (``mapping``: parameter name → flag where the flag
    is not ``--<name-with-dashes>``)."""
    token = _FLAGS.set({**(_FLAGS.get() or {}), **(mapping or {})})
    try:
        yield
    finally:
        _FLAGS.reset(token)
