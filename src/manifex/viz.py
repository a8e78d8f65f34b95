"""Visualisation helpers shared by every report: heatmap normalisation, overlays and image grids.

Everything takes torch tensors or NumPy arrays and returns NumPy arrays or a
:class:`matplotlib.figure.Figure`. Figures are built with ``matplotlib.figure.Figure`` directly, never with
``pyplot``: no backend is selected, no global state is touched, and importing manifex leaves a user's
interactive backend alone. ``Figure.savefig`` renders PNGs with Agg on its own.

Conventions
-----------
- A *map* is (H, W) or (C, H, W). Channels are reduced before display: by **sum** for signed maps
  (positive and negative relevance in different channels may cancel, as they do for the dot product with
  the input) and by **sum of absolute values** for absolute maps.
- Normalisation uses percentile clipping: the scale is the ``clip_quantile`` quantile of ``|map|``, so a few
  extreme pixels do not wash out the rest. Signed maps go to [-1, 1] symmetrically (0 stays 0, -a ↦ -f(a))
  and are drawn with the blue-white-red colormap ``"bwr"``; absolute maps go to [0, 1].
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from matplotlib.figure import Figure

from .errors import InputError

__all__ = [
    "SIGNED_CMAP",
    "ABSOLUTE_CMAP",
    "to_numpy",
    "reduce_channels",
    "signed_heatmap",
    "absolute_heatmap",
    "as_image",
    "overlay",
    "image_grid",
    "save_figure",
]

#: Colormap of signed maps (negative blue, zero white, positive red).
SIGNED_CMAP = "bwr"
#: Colormap of absolute maps (zero black, large bright).
ABSOLUTE_CMAP = "magma"

Kind = Literal["image", "signed", "absolute"]
_KINDS = ("image", "signed", "absolute")


def to_numpy(a: Any) -> np.ndarray:
    """A float64 NumPy copy of a tensor (any device, with or without grad) or array-like."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().double().numpy()
    return np.array(a, dtype=np.float64)


def reduce_channels(a: Any, mode: Literal["sum", "abs"]) -> np.ndarray:
    """(H, W) from a map (H, W) or (C, H, W): channel sum (``"sum"``) or sum of ``|·|`` (``"abs"``)."""
    x = to_numpy(a)
    if x.ndim == 3:
        x = x.sum(axis=0) if mode == "sum" else np.abs(x).sum(axis=0)
    elif x.ndim == 2:
        x = x if mode == "sum" else np.abs(x)
    else:
        raise InputError(f"a map must have shape (H, W) or (C, H, W), got {x.shape}.")
    if not np.all(np.isfinite(x)):
        raise InputError("a map contains NaN or inf; remove them before plotting.")
    return x


def _scale(values: np.ndarray, clip_quantile: float) -> float:
    """The clipping scale: the ``clip_quantile`` quantile of |values|, else max |values|, else 1."""
    if not 0.0 < clip_quantile <= 1.0:
        raise InputError(f"clip_quantile must be in (0, 1], got {clip_quantile}.")
    mag = np.abs(values).ravel()
    if mag.size == 0:
        return 1.0
    s = float(np.quantile(mag, clip_quantile))
    if s <= 0.0:
        s = float(mag.max())
    return s if s > 0.0 else 1.0


def signed_heatmap(a: Any, clip_quantile: float = 0.995, *, scale: float | None = None) -> np.ndarray:
    """Signed map → (H, W) in [-1, 1]: channel sum, divided by the ``clip_quantile`` quantile of ``|a|``, clipped.

    Symmetric: 0 ↦ 0 and -a ↦ -f(a). Draw with ``cmap="bwr", vmin=-1, vmax=1``. An all-zero map stays zero.
    ``scale`` overrides the per-map quantile (to put several maps on one scale).
    """
    x = reduce_channels(a, "sum")
    s = _scale(x, clip_quantile) if scale is None else float(scale)
    if s <= 0:
        raise InputError(f"scale must be positive, got {scale}.")
    return np.clip(x / s, -1.0, 1.0)


def absolute_heatmap(a: Any, clip_quantile: float = 0.995, *, scale: float | None = None) -> np.ndarray:
    """Map → (H, W) in [0, 1]: channel sum of ``|a|``, divided by its ``clip_quantile`` quantile, clipped.

    Draw with an absolute colormap such as ``"magma"``, ``vmin=0, vmax=1``. ``scale`` overrides the quantile.
    """
    x = reduce_channels(a, "abs")
    s = _scale(x, clip_quantile) if scale is None else float(scale)
    if s <= 0:
        raise InputError(f"scale must be positive, got {scale}.")
    return np.clip(x / s, 0.0, 1.0)


def as_image(image: Any) -> np.ndarray:
    """A displayable image in [0, 1]: (H, W) for grey, (H, W, 3) for colour.

    Accepts (H, W), (1, H, W), (3, H, W) or channels-last (H, W, 1|3). Values already in [0, 1] are kept;
    anything else (e.g. normalised inputs) is min-max rescaled.
    """
    x = to_numpy(image)
    if x.ndim == 3:
        if x.shape[0] in (1, 3):
            x = np.moveaxis(x, 0, -1)
        elif x.shape[-1] not in (1, 3):
            raise InputError(f"an image must have 1 or 3 channels, got shape {x.shape}.")
        if x.shape[-1] == 1:
            x = x[..., 0]
    elif x.ndim != 2:
        raise InputError(f"an image must have shape (H, W), (C, H, W) or (H, W, C), got {x.shape}.")
    lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
    if lo < 0.0 or hi > 1.0:
        x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    return np.clip(np.nan_to_num(x), 0.0, 1.0)


def _colormap(name: str):
    from matplotlib import colormaps

    return colormaps[name]


def overlay(
    image: Any,
    heatmap: Any,
    alpha: float = 0.6,
    *,
    signed: bool | None = None,
    cmap: str | None = None,
) -> np.ndarray:
    """The image with a normalised heatmap blended on top, (H, W, 3) RGB in [0, 1].

    ``heatmap`` is (H, W), already normalised: [-1, 1] from :func:`signed_heatmap` or [0, 1] from
    :func:`absolute_heatmap` (``signed`` defaults to "has negative values"). Each pixel's opacity is
    ``alpha · |h|``, so pixels without relevance show the plain image.
    """
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha}.")
    img = as_image(image)
    rgb = np.repeat(img[..., None], 3, axis=-1) if img.ndim == 2 else img
    h = to_numpy(heatmap)
    if h.ndim != 2:
        raise InputError(f"heatmap must be a normalised (H, W) map, got shape {h.shape}.")
    if h.shape != rgb.shape[:2]:
        raise InputError(f"heatmap {h.shape} and image {rgb.shape[:2]} must have the same height and width.")
    if signed is None:
        signed = bool((h < 0).any())
    h = np.clip(h, -1.0, 1.0) if signed else np.clip(h, 0.0, 1.0)
    colour = _colormap(cmap or (SIGNED_CMAP if signed else ABSOLUTE_CMAP))((h + 1.0) / 2.0 if signed else h)[..., :3]
    w = (alpha * np.abs(h))[..., None]
    return np.clip((1.0 - w) * rgb + w * colour, 0.0, 1.0)


def _plain(ax) -> None:
    """No ticks, no frame, but keep the y label (``axis('off')`` would hide row titles)."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def image_grid(
    rows: Sequence[Sequence[Any]],
    *,
    kinds: Sequence[Kind],
    col_titles: Sequence[str] | None = None,
    row_titles: Sequence[str] | None = None,
    shared_scale: bool = False,
    clip_quantile: float = 0.995,
    title: str | None = None,
    colorbar: bool | None = None,
    cell_size: float = 1.5,
    path: str | Path | None = None,
) -> Figure:
    """A grid of images and maps; ``rows[i][j]`` is drawn as ``kinds[j]`` (``None`` leaves a blank cell).

    - ``"image"``: via :func:`as_image`, grey or RGB.
    - ``"signed"``: channel sum, ``bwr`` on a symmetric scale; ``"absolute"``: channel sum of ``|·|``, ``magma``.
    - Scales are the ``clip_quantile`` quantile of ``|map|``: per cell, or per column when ``shared_scale``
      (then maps in a column are comparable, and a colorbar in the maps' own units is drawn under it;
      ``colorbar`` overrides that).

    Returns the :class:`~matplotlib.figure.Figure`; saves a PNG when ``path`` is given.
    """
    n_rows = len(rows)
    n_cols = len(kinds)
    if n_rows == 0 or n_cols == 0:
        raise InputError("image_grid needs at least one row and one column.")
    for kind in kinds:
        if kind not in _KINDS:
            raise InputError(f"unknown kind {kind!r}; use one of {_KINDS}.")
    for i, row in enumerate(rows):
        if len(row) != n_cols:
            raise InputError(f"row {i} has {len(row)} cells but kinds names {n_cols} columns.")
    if col_titles is not None and len(col_titles) != n_cols:
        raise InputError(f"col_titles has {len(col_titles)} entries for {n_cols} columns.")
    if row_titles is not None and len(row_titles) != n_rows:
        raise InputError(f"row_titles has {len(row_titles)} entries for {n_rows} rows.")
    colorbar = shared_scale if colorbar is None else colorbar

    # Reduce every map once; compute one scale per column when shared.
    cells: list[list[np.ndarray | None]] = []
    for row in rows:
        out: list[np.ndarray | None] = []
        for kind, cell in zip(kinds, row):
            if cell is None:
                out.append(None)
            elif kind == "image":
                out.append(as_image(cell))
            else:
                out.append(reduce_channels(cell, "sum" if kind == "signed" else "abs"))
        cells.append(out)
    col_scale: list[float | None] = [None] * n_cols
    if shared_scale:
        for j, kind in enumerate(kinds):
            maps = [cells[i][j] for i in range(n_rows) if cells[i][j] is not None]
            if kind != "image" and maps:
                col_scale[j] = _scale(np.concatenate([m.ravel() for m in maps]), clip_quantile)

    fig = Figure(figsize=(cell_size * n_cols + 0.6, cell_size * n_rows + (0.9 if colorbar else 0.3) + (0.3 if title else 0.0)),
                 layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    last_im: list[Any] = [None] * n_cols
    for i in range(n_rows):
        for j, kind in enumerate(kinds):
            ax = axes[i][j]
            _plain(ax)
            x = cells[i][j]
            if x is not None:
                if kind == "image":
                    last_im[j] = ax.imshow(x, cmap="gray" if x.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
                else:
                    s = col_scale[j] if col_scale[j] is not None else _scale(x, clip_quantile)
                    lo = -s if kind == "signed" else 0.0
                    cmap = SIGNED_CMAP if kind == "signed" else ABSOLUTE_CMAP
                    last_im[j] = ax.imshow(x, cmap=cmap, vmin=lo, vmax=s, interpolation="nearest")
            if i == 0 and col_titles is not None:
                ax.set_title(col_titles[j], fontsize=9)
            if j == 0 and row_titles is not None:
                ax.set_ylabel(row_titles[i], fontsize=9)
    if colorbar:
        for j, kind in enumerate(kinds):
            if kind != "image" and last_im[j] is not None:
                cb = fig.colorbar(last_im[j], ax=[axes[i][j] for i in range(n_rows)], location="bottom",
                                  shrink=0.9, aspect=12, pad=0.02)
                cb.ax.tick_params(labelsize=7)
                cb.ax.xaxis.get_offset_text().set_fontsize(7)
    if title:
        fig.suptitle(title, fontsize=11)
    if path is not None:
        save_figure(fig, path)
    return fig


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 110) -> Path:
    """Save ``fig`` as a PNG (or the format ``path``'s suffix names) with a tight box; creates parent folders.
    Written atomically (:func:`manifex.runs.atomic_savefig`): a reader never sees a half-written image."""
    from .runs import atomic_savefig

    return atomic_savefig(fig, Path(path), dpi=dpi, bbox_inches="tight", facecolor="white")
