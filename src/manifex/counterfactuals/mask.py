"""The region of a counterfactual campaign's ``--mask``: a box or a .npy file, read and checked in one place (the
experiment checks it before training, the settings guard records its content, the report outlines it)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, param

__all__ = ["load_mask", "mask_identity"]


def load_mask(spec: str, image_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """The region of ``--mask`` as a float tensor, 1 = may change: a box ``"r0:r1,c0:c1"`` ((H, W) with ones on rows
    r0..r1−1 and columns c0..c1−1, as Python slices without steps or negative indices) or a ``.npy`` file (H, W) or
    (C, H, W), values in [0, 1]. Refused in one line: another format, an empty box or a mask that is zero everywhere,
    values outside [0, 1], and, with ``image_shape`` (C, H, W), a box beyond the image or an array of another shape."""
    flag = param("mask", spec)
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"{param('mask')} takes a box 'r0:r1,c0:c1' or a .npy file, got {spec!r}.")
    spec = spec.strip()
    if spec.lower().endswith(".npy"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise InputError(f"{flag}: no such file.")
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(f"{flag} is not a readable .npy array ({type(e).__name__}: {str(e)[:120]}).") from None
        if arr.dtype == bool:
            arr = arr.astype(np.float32)
        if arr.ndim not in (2, 3) or not np.issubdtype(arr.dtype, np.number):
            raise InputError(f"{flag} must hold a numeric array (H, W) or (C, H, W), got {arr.dtype} of shape {arr.shape}.")
        mask = torch.as_tensor(arr.astype(np.float64))
        if not bool(torch.isfinite(mask).all()) or bool(((mask < 0) | (mask > 1)).any()):
            raise InputError(f"{flag} must hold values in [0, 1] (1 = may change, 0 = keep).")
        if not bool((mask > 0).any()):
            raise InputError(f"{flag} is zero everywhere: nothing may change; set the region that may change to 1.")
        if image_shape is not None:
            c, h, w = image_shape
            if tuple(mask.shape) not in ((h, w), (c, h, w)):
                raise InputError(f"{flag} has shape {tuple(mask.shape)}; the images are {c}x{h}x{w}: pass ({h}, {w}) or "
                                 f"({c}, {h}, {w}).")
        return mask.float()
    parts = spec.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        (r0, r1), (c0, c1) = ([int(v) for v in part.split(":")] for part in parts)
    except ValueError:
        raise InputError(f"{flag} is neither a box 'r0:r1,c0:c1' (e.g. 2:6,0:8) nor a .npy file.") from None
    if min(r0, r1, c0, c1) < 0:
        raise InputError(f"{flag}: box bounds must be >= 0 (rows r0:r1, columns c0:c1).")
    if r1 <= r0 or c1 <= c0:
        raise InputError(f"{flag} is an empty box: it needs r0 < r1 and c0 < c1 (rows r0..r1-1, columns c0..c1-1).")
    h, w = (r1, c1) if image_shape is None else image_shape[1:]
    if r1 > h or c1 > w:
        raise InputError(f"{flag} reaches beyond the {h}x{w} images: rows must end at <= {h}, columns at <= {w}.")
    mask = torch.zeros(h, w)
    mask[r0:r1, c0:c1] = 1
    return mask


def mask_identity(spec: str) -> str:
    """What the settings guard records of ``--mask``: the box as given, or a .npy file's content digest."""
    if spec.strip().lower().endswith(".npy"):
        mask = load_mask(spec)
        return f"npy {tuple(mask.shape)} sha256:{hashlib.sha256(mask.double().numpy().tobytes()).hexdigest()[:16]}"
    return f"box {spec.strip()}"
