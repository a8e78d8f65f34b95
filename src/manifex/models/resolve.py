"""One resolution of the device, the data and the classifier under test, for every experiment and command.

- :func:`resolve_device`: a ``device`` string checked against this machine (CUDA present, index in range).
- :func:`check_writable_dir`: a folder created and probed with a temporary file, before any training.
- :func:`resolve_data`: a dataset spec loaded and checked (labels with gaps, one class, pixels in [0, 1]);
  returns the dataset and the lines of what was checked.
- :func:`resolve_classifier`: the built-in architecture trained (or reused from the cache), the user's own model
  (``MODULE:FACTORY`` / file.py / ``.pt2`` / TorchScript, with weights, normalisation and an output selector), or
  an ``nn.Module`` given in Python — checked on one test batch — and its :class:`ModelInfo`: the one description
  of the model that reports, ``metrics.json`` and the experiment folder's identity guard all show.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError, param

__all__ = ["ModelInfo", "resolve_device", "check_writable_dir", "resolve_data", "resolve_classifier", "check_model_flags",
           "data_identity", "file_sha256", "builtin_layer_shape"]


@dataclass(frozen=True)
class ModelInfo:
    """What a run knows about its classifier. ``name`` is what a reader sees ("lenet", "--model nets.py:build");
    ``identity()`` is what a resumed run must match (the weights' fingerprint included)."""

    name: str
    source: str  # "built-in" (trained by manifex), "user" (--model) or "python" (an nn.Module given in Python)
    architecture: str | None = None
    spec: str | None = None
    weights: str | None = None
    normalize: dict | None = None
    output: str | None = None
    fingerprint: str | None = None
    accuracy: float | None = None
    epochs: int | None = None
    cached: bool | None = None
    checks: tuple[str, ...] = field(default=(), compare=False)

    def identity(self) -> dict[str, Any]:
        """The settings-guard view: where the model came from and its weights' fingerprint (not paths or timings)."""
        return {"source": self.source, "architecture": self.architecture, "spec": self.spec, "normalize": self.normalize,
                "output": self.output, "fingerprint": self.fingerprint}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["checks"] = list(self.checks)
        return d


def resolve_device(device: str | torch.device) -> str:
    """Validate a device ('cpu', 'cuda', 'cuda:1', 'mps', ...) against this machine; return it as a string."""
    text = str(device).strip()
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise InputError(f"{param('device', text)} is not a torch device; use cpu, cuda, cuda:N or mps.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise InputError(f"{param('device', text)}: CUDA is not available ({why}, torch {torch.__version__}); use {param('device', 'cpu')}.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"{param('device', text)}: only {torch.cuda.device_count()} CUDA device(s) (cuda:0..cuda:"
                             f"{torch.cuda.device_count() - 1}); pick one of them.")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise InputError(f"{param('device', text)}: Apple MPS is not available on this machine; use {param('device', 'cpu')}.")
    elif dev.type != "cpu":
        raise InputError(f"{param('device', text)}: manifex runs on cpu, cuda[:N] or mps, not {dev.type}.")
    return text


def check_writable_dir(path: str | os.PathLike | None, option: str, *, keep: bool = True) -> Path:
    """Create ``path`` (default: the model cache) if needed and check that a file can be written in it.

    ``keep=False``: the folders this check had to create are removed again, so a run refused later (by a data
    check, before anything is written) leaves no empty ``--out`` folder behind; its writer creates it.
    """
    from .cache import default_cache_dir

    p = Path(path).expanduser() if path is not None else default_cache_dir()
    created = [] if keep else [d for d in (p, *p.parents) if not d.exists()]
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".manifex-write-check-"):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise InputError(f"{option} {p}: cannot write there ({reason}); pass a writable folder with {option} PATH.") from None
    finally:
        for d in created:  # deepest first; a folder someone else filled meanwhile stays
            try:
                d.rmdir()
            except OSError:
                break
    return p


def resolve_data(dataset: str, *, trust_pickle: bool = False, num_classes: int | None = None, option: str = "--dataset"):
    """Load and check a classification dataset; return ``(dataset, checks)`` (checks: what was verified)."""
    from ..data import load_dataset
    from ..data.loaders import check_classification_data

    data = load_dataset(dataset, trust_pickle=trust_pickle)
    checks = check_classification_data(data, num_classes=num_classes, where=f"{option} {dataset}")
    return data, checks


def data_identity(spec: str, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, Any]:
    """The data part of an experiment's identity: its spec, size, image shape and a content hash of images and labels."""
    h = hashlib.sha256()
    for t in (x, y):
        if t is not None:
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
    return {"spec": str(spec), "n": int(len(x)), "shape": list(x.shape[1:]), "fingerprint": h.hexdigest()[:16]}


def file_sha256(path: str | os.PathLike) -> str:
    """A content hash of a file (the identity of a --weights or --model file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def check_model_flags(model_spec: str | None, *, weights=None, normalize=None, output=None) -> None:
    """weights, normalize and output describe your own model: refuse them without it (one line)."""
    given = [param(name) for name, v in (("weights", weights), ("normalize", normalize), ("output", output)) if v is not None]
    if model_spec is None and given:
        raise InputError(f"{given[0]} needs {param('model')} (your own classifier); the built-in {param('classifier')} is trained "
                         "by manifex on [0, 1] pixels and returns logits.")


def _in_model_dtype(data, net: nn.Module):
    """``data`` with its images in the model's floating dtype (a float64 user model gets float64 images, as
    :func:`~manifex.models.user.check_classifier` feeds its batch); unchanged when the model has one dtype already
    equal to the images' or several."""
    import dataclasses

    dtypes = {p.dtype for p in net.parameters() if p.is_floating_point()}
    if len(dtypes) != 1 or data.x.dtype in dtypes:
        return data
    return dataclasses.replace(data, x=data.x.to(dtypes.pop()))


def resolve_classifier(train, test, *, model: str | nn.Module | None = None, weights: str | os.PathLike | None = None,
                       normalize: tuple | None = None, output: str | None = None, classifier: str = "lenet",
                       epochs: int = 3, seed: int = 0, device: str = "cpu", cache_dir: str | os.PathLike | None = None,
                       progress: bool = True, measure_accuracy: bool = True,
                       name: str | None = None) -> tuple[nn.Module, ModelInfo]:
    """The classifier under test, checked once on one test batch; returns ``(model, ModelInfo)``.

    ``model``: None for the built-in ``classifier`` (trained on ``train`` for ``epochs``, or reused from the cache),
    a spec string for the user's own model (:func:`manifex.models.user.load_model`; ``weights`` a state dict,
    ``output`` which part of a tuple/dict output holds the logits, ``normalize`` = (mean, std) applied inside a
    wrapper so pixels stay in [0, 1]), or an ``nn.Module`` (named ``name`` in reports, default "your <class name>").
    A user model is checked BEFORE any work; the built-in one after its training. ``ModelInfo.checks`` lists what was verified, for the report's checks box.
    """
    from .cache import ModelCache, state_fingerprint
    from .training import TrainConfig, accuracy
    from .user import Normalize, SelectOutput, check_classifier, load_model, parse_output
    from .zoo import get_classifier

    spec = model if isinstance(model, (str, os.PathLike)) else None
    check_model_flags(None if model is None else "given", weights=weights, normalize=normalize, output=output)
    batch = test.x[: min(8, len(test))]
    c = test.image_shape[0]
    if normalize is not None and len(normalize[0]) not in (1, c):
        raise InputError(f"{param('normalize')} has {len(normalize[0])} channel values but the images have {c} channel(s).")
    cached = None
    if model is None:
        net, info = get_classifier(train, classifier, TrainConfig(epochs=epochs, seed=seed), cache=ModelCache(cache_dir),
                                   device=device, progress=progress)
        cached = info.get("cached")
        name, shown, source = classifier, f"the built-in {classifier}", "built-in"
    else:
        if spec is not None:
            net = load_model(os.fspath(spec), weights)
            name = shown = f"--model {os.fspath(spec)}"
            source = "user"
        elif isinstance(model, nn.Module):
            if weights is not None:
                raise InputError("weights go with a model spec (MODULE:FACTORY); load them into your nn.Module yourself.")
            net, source = model, "python"
            name = shown = str(name) if name is not None else f"your {type(model).__name__}"
        else:
            raise InputError(f"model must be None (the built-in classifier), a spec such as nets.py:build, or an nn.Module; "
                             f"got {type(model).__name__}.")
        if output is not None:
            net = SelectOutput(net, parse_output(output))
        if normalize is not None:
            net = Normalize(net, *normalize)
        # the user's own file is loaded on the CPU: move it; an nn.Module given in Python stays where it is (the
        # device follows the model) and is only switched to eval (run_experiment restores its flags afterwards)
        net = net.to(device).eval() if spec is not None or normalize is not None else net.eval()
    logits = check_classifier(net, batch, test.num_classes, name=shown)
    checks = (f"model ({shown}): logits of shape {tuple(logits.shape)} on a test batch, finite; "
              f"{logits.shape[1]} outputs = the data's {test.num_classes} classes",)
    acc = float(accuracy(net, _in_model_dtype(test, net))) if measure_accuracy else None
    info = ModelInfo(
        name=name, source=source, architecture=classifier if model is None else None,
        spec=os.fspath(spec) if spec is not None else (type(model).__name__ if isinstance(model, nn.Module) else None),
        weights=os.fspath(weights) if weights is not None else None,
        normalize={"mean": list(normalize[0]), "std": list(normalize[1])} if normalize is not None else None,
        output=None if output is None else str(output), fingerprint=state_fingerprint(net), accuracy=acc,
        epochs=epochs if model is None else None, cached=cached, checks=checks)
    return net, info


def builtin_layer_shape(classifier: str, data, layer: str, *, what: str) -> tuple[int, ...]:
    """A built-in classifier's layer is known before it is trained: its output shape per image on two images of
    ``data``, from the untrained network (the caller's RNG untouched). An unknown name lists the layers; a shape
    the command cannot use is refused (``what`` names the command) — both before any training."""
    from ..attribution.layer import check_layer_shape, layer_activations, resolve_layer
    from .classifiers import ClassifierConfig, build_classifier

    with torch.random.fork_rng():  # building the network draws its initial weights
        net = build_classifier(ClassifierConfig(classifier, tuple(data.image_shape), data.num_classes)).eval()
    resolve_layer(net, layer)
    with torch.no_grad():
        probe = layer_activations(net, data.x[:2], layer)
    check_layer_shape(tuple(probe.shape), layer, what=what)
    return tuple(probe.shape[1:])
