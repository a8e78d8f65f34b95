"""Bring your own classifier: load it from a Python file or module, a state dict, ``torch.export`` or TorchScript,
wrap it so it takes pixels in [0, 1], and check it once on one batch before any work.

Every entry point of manifex takes any ``nn.Module`` that maps images (N, C, H, W) in [0, 1] to logits (N, K);
this module is what the CLI's ``--model``/``--weights``/``--normalize`` use to get one:

>>> model = load_model("my_nets.py:SmallNet", weights="small.pt")          # doctest: +SKIP
>>> model = Normalize(model, mean=(0.1307,), std=(0.3081,))                 # doctest: +SKIP
>>> check_classifier(model, x[:8], num_classes=10)                          # doctest: +SKIP

Nothing here unpickles arbitrary objects: weights load with ``torch.load(weights_only=True)``, exported
programs with ``torch.export.load`` and TorchScript with ``torch.jit.load`` (no Python code is run).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
import zipfile
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..attribution.core import check_output_selector, select_output
from ..errors import DataError, InputError, ModelError, param
from ..runs import ship_by_value

__all__ = ["Normalize", "SelectOutput", "load_model", "load_weights", "check_classifier", "parse_normalize", "parse_output"]

PathLike = str | os.PathLike
_MODEL_FILE_SUFFIXES = (".pt2", ".pt", ".pth", ".ts", ".jit", ".zip")


class SelectOutput(nn.Module):
    """``model(x)`` reduced to its logits by ``output`` (an index of a tuple/list output, a key of a dict or an
    attribute name): a model that returns a dict or a tuple becomes a plain logits model for every command.

    The selector is an int or a str (not a callable), so the wrapper pickles (Ray workers, ``torch.save``).
    Layer names stay those of the inner model (``"layer4"``, not ``"model.layer4"``): see
    :func:`manifex.attribution.layer.resolve_layer`."""

    transparent = True  # layer names resolve inside self.model

    def __init__(self, model: nn.Module, output: int | str) -> None:
        super().__init__()
        output = check_output_selector(output)
        if output is None or callable(output):
            raise InputError(f"SelectOutput needs an index (int) or a key/attribute (str), got {output!r}.")
        self.model = model
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return select_output(self.model(x), self.output)

    def extra_repr(self) -> str:
        return f"output={self.output!r}"


def parse_output(text: str) -> int | str:
    """``--output`` text: digits (optionally signed) are a tuple index, anything else a dict key or attribute."""
    text = str(text).strip()
    if not text:
        raise InputError(f"{param('output')} needs an index (0) or a key/attribute name (logits).")
    return int(text) if text.lstrip("-").isdigit() else text


class Normalize(nn.Module):
    """``model((x - mean) / std)`` with per-channel ``mean``/``std``: the wrapped model takes pixels in [0, 1].

    Budgets, clipping to the pixel box and figures then stay in pixel units while the inner model sees the
    normalised input it was trained on. ``mean``/``std`` are buffers of shape (1, C, 1, 1) (one value is
    broadcast to every channel); the inner model is ``self.model``, whose layer names stay valid as they are.
    """

    transparent = True  # layer names resolve inside self.model

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean, std = [float(v) for v in mean], [float(v) for v in std]
        if len(mean) != len(std) or not mean:
            raise InputError(f"mean and std need the same number of channels, got {len(mean)} and {len(std)}.")
        if any(s <= 0 for s in std):
            raise InputError(f"every std must be > 0, got {std}.")
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.mean.shape[1]
        if c != 1 and x.shape[1] != c:
            raise InputError(f"Normalize has {c} channel values but the images have {x.shape[1]} channels.")
        return self.model((x - self.mean) / self.std)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def parse_normalize(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``'0.1307,0.3081'`` or ``'0.485,0.456,0.406,0.229,0.224,0.225'`` (means then stds) → (mean, std).

    Also accepts ``'MEANS/STDS'`` with comma-separated channels on each side.
    """
    try:
        if "/" in text:
            m, s = text.split("/", 1)
            mean = tuple(float(v) for v in m.split(","))
            std = tuple(float(v) for v in s.split(","))
        else:
            vals = [float(v) for v in text.split(",")]
            if len(vals) % 2:
                raise ValueError
            mean, std = tuple(vals[: len(vals) // 2]), tuple(vals[len(vals) // 2 :])
    except ValueError:
        raise InputError(
            f"expected MEAN,STD per channel (e.g. 0.1307,0.3081 or 0.485,0.456,0.406,0.229,0.224,0.225), got {text!r}"
        ) from None
    if not mean or len(mean) != len(std):
        raise InputError(f"expected as many means as stds, got {text!r}")
    if any(not (v == v) or abs(v) == float("inf") for v in mean + std) or any(s <= 0 for s in std):
        raise InputError(f"every std must be a finite number > 0 and every mean finite, got {text!r}")
    return mean, std


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError):
        return []


def _load_file_model(path: Path) -> nn.Module:
    """A ``torch.export`` program (.pt2) or a TorchScript archive → nn.Module; anything else: a clear error."""
    names = _zip_names(path)
    if path.suffix.lower() == ".pt2" or any(n.split("/", 1)[-1].startswith("models/") for n in names):
        try:
            module = torch.export.load(str(path)).module()
        except Exception as e:  # noqa: BLE001 - torch raises many types for a bad archive
            raise DataError(f"{path}: not a loadable torch.export program ({type(e).__name__}: {e}); "
                            "re-create it with torch.export.save(torch.export.export(model, (x,)), path).") from e
        # An exported graph has its train/eval behaviour baked in, and its .train()/.eval() raise; manifex (and
        # every explainer) toggles the flag, which is harmless here, so give it back the plain nn.Module methods.
        for sub in module.modules():
            sub.train = types.MethodType(nn.Module.train, sub)
            sub.eval = types.MethodType(nn.Module.eval, sub)
        return module
    if any("/code/" in n or n.startswith("code/") for n in names):
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: not a loadable TorchScript archive ({type(e).__name__}: {e}); "
                            "re-create it with torch.jit.script(model).save(path).") from e
    # Neither: a state dict or a pickled module. Say which, and what to do instead.
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001
        obj = None
    if isinstance(obj, dict):
        raise InputError(f"{param('model', str(path))}: this file is a state dict (weights only); pass it as {param('weights', str(path))} "
                         f"together with {param('model', 'path/to/file.py:FACTORY')} that builds the network.")
    raise InputError(f"{param('model', str(path))}: not a torch.export program (.pt2) or TorchScript archive, and a pickled "
                     "module cannot be loaded safely; save the weights with torch.save(model.state_dict(), 'w.pt') and "
                     f"pass {param('model', 'path/to/file.py:FACTORY')} {param('weights', 'w.pt')} (or export the model with torch.export).")


def _import_target(module: str) -> object:
    p = Path(module).expanduser()
    if module.endswith(".py") or os.sep in module or "/" in module:
        if not p.is_file():
            raise InputError(f"{param('model')}: no such Python file {p}; give MODULE:FACTORY with an importable module or "
                             "an existing path/to/file.py.")
        name = f"manifex_user_model_{abs(hash(str(p.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, p)
        if spec is None or spec.loader is None:
            raise InputError(f"{param('model')}: cannot import {p} as a Python module.")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses/pickling inside the user's file need the module registered
        folder = str(p.resolve().parent)
        if folder not in sys.path:  # so the file can import its neighbours, as when run from its folder
            sys.path.append(folder)
        try:
            spec.loader.exec_module(mod)
        except Exception as e:
            sys.modules.pop(name, None)
            raise ModelError(f"{param('model')}: importing {p} failed ({type(e).__name__}: {e}); fix the file.") from e
        ship_by_value(mod)  # Ray workers cannot import the private module name: its classes travel by value
        return mod
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise InputError(f"{param('model')}: cannot import module {module!r} ({e}); give an importable module name or "
                         "a path/to/file.py.") from e


def load_model(spec: str, weights: PathLike | None = None) -> nn.Module:
    """The classifier named by ``spec``, in eval mode on the CPU.

    ``spec`` is ``MODULE:FACTORY`` (an importable module or a ``path/to/file.py``, and a function or class in it,
    dotted names allowed, called without arguments, returning an ``nn.Module``), or a path to a ``torch.export``
    program (``.pt2``) or a TorchScript archive. ``weights``: a state dict file for the module, loaded with
    ``torch.load(weights_only=True)`` (also ``{"state_dict": ...}`` or ``{"model": ...}``), strictly.
    """
    spec = str(spec).strip()
    path = Path(spec).expanduser()
    module_part, sep, factory = spec.rpartition(":")
    if path.suffix.lower() in _MODEL_FILE_SUFFIXES or (path.is_file() and path.suffix.lower() != ".py"):
        if not path.is_file():
            raise InputError(f"{param('model')}: no such file {path}.")
        if weights is not None:
            raise InputError(f"{param('weights')} is only for {param('model', 'MODULE:FACTORY')}; an exported or TorchScript model holds its weights.")
        model = _load_file_model(path)
    else:
        if not sep or not module_part or not factory:
            raise InputError(f"{param('model')}: expected MODULE:FACTORY (e.g. my_nets.py:SmallNet or mypkg.models:build), "
                             f"a .pt2 file or a TorchScript file, got {spec!r}.")
        obj = _import_target(module_part)
        for part in factory.split("."):
            if not hasattr(obj, part):
                names = sorted(n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None)))
                raise InputError(f"{param('model')}: {module_part} has no {factory!r}; callables there: {', '.join(names[:12]) or 'none'}.")
            obj = getattr(obj, part)
        if not callable(obj):
            raise InputError(f"{param('model')}: {module_part}:{factory} is not a function or class.")
        try:
            model = obj()
        except Exception as e:
            raise ModelError(f"{param('model')}: calling {module_part}:{factory}() failed ({type(e).__name__}: {e}); the factory "
                             "must build the network without arguments.") from e
        if not isinstance(model, nn.Module):
            raise ModelError(f"{param('model')}: {module_part}:{factory}() returned a {type(model).__name__}, not a torch.nn.Module.")
        if weights is not None:
            load_weights(model, weights)
    return model.cpu().eval()


def load_weights(model: nn.Module, path: PathLike) -> nn.Module:
    """Load a state dict from ``path`` into ``model`` (strict; ``torch.load(weights_only=True)``)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"{param('weights')}: no such file {p}.")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{param('weights', str(p))}: cannot be loaded safely as a state dict ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); save it with torch.save(model.state_dict(), path).") from e
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(f"{param('weights', str(p))}: holds a {type(obj).__name__}, not a state dict of tensors; "
                        "save it with torch.save(model.state_dict(), path).")
    try:
        result = model.load_state_dict(obj, strict=False)
    except RuntimeError as e:  # shape mismatches
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)
        raise ModelError(f"{param('weights', str(p))} does not fit the model: {first.strip()}") from None
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {', '.join(result.missing_keys[:4])}{' ...' if len(result.missing_keys) > 4 else ''}")
        if result.unexpected_keys:
            parts.append(f"unexpected {', '.join(result.unexpected_keys[:4])}{' ...' if len(result.unexpected_keys) > 4 else ''}")
        raise ModelError(f"{param('weights', str(p))} does not fit the model ({'; '.join(parts)}); check that {param('model')} builds the "
                         "network these weights were saved from.")
    return model


def check_classifier(model: nn.Module, x: torch.Tensor, num_classes: int | None = None, *, name: str = "the model") -> torch.Tensor:
    """Run ``model`` once on the batch ``x`` (N, C, H, W) and check its output; return the logits (N, K).

    Raises :class:`ModelError` naming what is wrong: the forward fails, the output is not a tensor of shape
    (N, num_classes), or it holds NaN/inf. The model's train/eval flags are restored afterwards.
    """
    modules = list(model.modules())
    flags = [m.training for m in modules]
    try:
        model.eval()
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        with torch.no_grad():
            try:
                out = model(x.to(device=dev, dtype=dtype))
            except Exception as e:  # noqa: BLE001 - any failure of the user's forward
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ModelError(f"{name} fails on a batch of {tuple(x.shape)} images in [0, 1] ({type(e).__name__}: {msg}); "
                                 "it must take (N, C, H, W) images of the data's size.") from e
    finally:
        for m, t in zip(modules, flags):
            m.training = t
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        raise ModelError(f"{name} returns a {type(out).__name__} of {len(out)}; say which entry holds the logits "
                         "(N, classes) with --output INDEX (e.g. --output 0), or output=INDEX in Python.")
    if isinstance(out, dict):
        raise ModelError(f"{name} returns a dict with keys {list(out)[:8]}; say which one holds the logits (N, classes) "
                         "with --output KEY (e.g. --output logits), or output=KEY in Python.")
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"{name} returns a {type(out).__name__}, not a tensor of logits (N, classes); if the logits "
                         "are an attribute of it, name it with --output NAME.")
    n = x.shape[0]
    if out.dim() != 2 or out.shape[0] != n:
        raise ModelError(f"{name} returns shape {tuple(out.shape)} for {n} images; it must return logits of shape ({n}, classes).")
    if num_classes is not None and out.shape[1] != num_classes:
        raise ModelError(f"{name} has {out.shape[1]} outputs but the data has {num_classes} classes; use a model with "
                         f"{num_classes} outputs (or the dataset it was trained for).")
    if not torch.isfinite(out).all():
        raise ModelError(f"{name} returns NaN/inf logits on a batch of test images; check its weights "
                         "(and --normalize, if the model expects normalised input).")
    return out
