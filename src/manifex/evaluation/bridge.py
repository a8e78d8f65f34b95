"""Quantus inside manifex and manifex inside Quantus.

``explain_func`` is a Quantus ``explain_func``: any manifex method, batched on the model's device, NumPy out in
Quantus's shapes. ``evaluate`` scores attributions with Quantus's metrics (by class name or snake_case, Quantus's
own keyword names), with manifex's batched pixel-flipping and the manifold-aware metrics beside them.
Quantus is an optional extra (``pip install "manifex[eval]"``), imported only when a metric needs it.
"""
from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..attribution.core import (
    call_model,
    check_model_input,
    model_device,
    preserve_model_state,
    selected_output,
    warn_if_training,
)
from ..attribution.registry import canonical_method, make_explainer
from ..errors import InputError

__all__ = ["import_quantus", "explain_func", "evaluate", "metric_info", "MetricInfo", "MANIFEX_METRICS", "to_numpy"]

QUANTUS_HINT = 'pip install "manifex[eval]"'


def import_quantus():
    """The ``quantus`` module, or a one-line InputError with the install command (checked before any work).

    Quantus 0.6's area-under-curve helper calls ``np.trapz``, which NumPy 2.4 removed, so PixelFlipping with
    ``return_auc_per_sample``, IROF, RegionPerturbation and Selectivity fail there with an AttributeError. Where NumPy
    lacks ``trapz``, the helper is replaced once by the same composite trapezoidal rule under its new name
    ``np.trapezoid`` (Quantus itself is left untouched on NumPy versions that still have ``trapz``).
    """
    try:
        import quantus
    except ImportError as e:
        raise InputError(f"this needs Quantus 0.6 (not importable here: {e}); install it with {QUANTUS_HINT}.") from None
    _mend_quantus_auc()
    return quantus


def _mend_quantus_auc() -> None:
    from quantus.helpers import utils

    if hasattr(np, "trapz") or getattr(utils.calculate_auc, "_manifex", False):
        return

    def calculate_auc(values, dx: int = 1, batched: bool = False):
        """Quantus's ``calculate_auc`` with NumPy 2's ``np.trapezoid`` (the removed ``np.trapz`` under its new name)."""
        return np.trapezoid(np.array(values), dx=dx, axis=1 if batched else -1)

    calculate_auc._manifex = True  # type: ignore[attr-defined]
    utils.calculate_auc = calculate_auc


def to_numpy(a: Any) -> np.ndarray:
    """A tensor (any device, detached) or array-like as a NumPy array."""
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _model_dtype(model: object) -> torch.dtype:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.get_default_dtype()


def _channel_first(x: torch.Tensor, channel_first: bool | None) -> bool:
    """Quantus's convention: given, or inferred from the shape (images: the smaller of axis 1 and the last axis
    holds the channels; equal sizes are ambiguous and must be stated)."""
    if channel_first is not None:
        return bool(channel_first)
    if x.dim() <= 3:
        return True
    if x.shape[1] == x.shape[-1]:
        raise InputError(f"inputs of shape {tuple(x.shape)}: axis 1 and the last axis have the same size, so the channel "
                         "axis is ambiguous; pass channel_first=True or False.")
    return bool(x.shape[1] < x.shape[-1])


def explain_func(model: Callable[[torch.Tensor], Any], inputs: Any, targets: Any, *, method: str = "gradient",
                 batch_size: int = 64, device: str | torch.device | None = None, channel_first: bool | None = None,
                 reduce_axes: Sequence[int] | None = (1,), keepdims: bool = True, output: Any = None,
                 **options: Any) -> np.ndarray:
    """A Quantus-compatible ``explain_func``: the manifex ``method`` (any registry name or alias, or a Quantus/
    Captum class name such as ``"IntegratedGradients"``) for ``inputs`` (N, C, ...) and ``targets`` (N,) or one
    class, as a NumPy array.

    ``inputs``: NumPy or a tensor, in any float dtype: Quantus hands float64 perturbations to ``explain_func``, so
    the batch is converted to the model's parameter dtype (as ``quantus.explain`` does) and moved to the model's
    device. ``channel_first``: Quantus's convention (inferred from the shape when None; channel-last inputs are
    transposed for the model and the attribution is transposed back). ``reduce_axes``/``keepdims``: as in
    ``quantus.explain``, which sums the attribution over the channel axis by default ((N, 1, H, W)); pass
    ``reduce_axes=()`` for the full (N, C, H, W). ``batch_size``: examples explained per call. ``output``: the
    logits of a model returning a tuple or dict (as in ``explain``). Other ``options`` go to the method (manifex or
    Captum names, e.g. ``steps``/``n_steps``). Quantus's own keys that describe its explainer (``xai_lib``,
    ``softmax``, ...) are refused: this function explains the logits with the manifex method.

    The model's train/eval flags, ``requires_grad``, buffers and hooks are left as found (also on an error).
    """
    for key in ("xai_lib", "xai_lib_kwargs", "attributor", "composite", "canonizer"):
        if key in options:
            raise InputError(f"explain_func runs manifex methods; {key}= is quantus.explain's option: pick the method "
                             "with method= (e.g. method='lrp_epsilon_plus').")
    if options.pop("softmax", None):
        raise InputError("explain_func explains the logits; softmax=True is not supported (the model is explained as it is).")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    key = _quantus_method(method)
    explainer = make_explainer(model, key, output=output, **options) if output is not None else make_explainer(model, key, **options)
    x = torch.as_tensor(to_numpy(inputs) if not isinstance(inputs, torch.Tensor) else inputs)
    if not x.is_floating_point():
        raise InputError(f"inputs must be floating-point images, got dtype {x.dtype}.")
    x = x.detach().to(_model_dtype(model))
    first = _channel_first(x, channel_first)
    if not first:
        x = x.movedim(-1, 1)
    dev = torch.device(device) if device is not None else model_device(model)
    if dev is not None:
        x = x.to(dev)
    x = check_model_input(model, x)
    y = torch.as_tensor(to_numpy(targets) if not isinstance(targets, torch.Tensor) else targets)
    if y.dim() == 0:
        y = y.expand(x.shape[0])
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point() and not bool((y == y.round()).all()):
        raise InputError(f"targets must be one class index per input ({x.shape[0]},), got shape {tuple(y.shape)}.")
    y = y.long().to(x.device)
    parts = [explainer.attribute(x[s : s + batch_size], y[s : s + batch_size]) for s in range(0, x.shape[0], batch_size)]
    a = torch.cat(parts) if parts else torch.zeros_like(x)
    if not first:
        a = a.movedim(1, -1)
    out = a.detach().cpu().numpy()
    axes = tuple(reduce_axes or ())
    if axes and out.ndim >= 3:
        if 0 in axes:
            raise InputError("reduce_axes must not include 0 (the batch axis).")
        out = out.sum(axis=axes, keepdims=keepdims)
    return out


#: Quantus's (Captum's) method names that manifex has under another name.
_QUANTUS_METHODS = {"saliency": "saliency", "gradient": "gradient", "inputxgradient": "input_x_gradient",
                    "integratedgradients": "integrated_gradients", "deeplift": "deeplift", "layergradcam": "gradcam",
                    "guidedbackprop": "guided_backprop", "lrp": "lrp", "noisetunnel": "smoothgrad"}


def _quantus_method(method: str) -> str:
    if not isinstance(method, str):
        raise InputError(f"method must be a method name such as 'gradient' or 'IntegratedGradients', got {type(method).__name__}.")
    return canonical_method(_QUANTUS_METHODS.get(method.lower().replace("_", ""), method))


# ------------------------------------------------------------------------------------------------------------
# Metric names
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricInfo:
    """A metric's identity: its Quantus class name (or manifex's), category, direction of "better", whether it
    re-explains inputs (needs a method, not only attributions), and what it measures."""

    name: str
    category: str
    higher_is_better: bool
    reexplains: bool
    description: str
    source: str = "quantus"


#: manifex's own metrics (computed in torch; Quantus-compatible callables in ``manifex.evaluation.manifold``).
MANIFEX_METRICS: dict[str, MetricInfo] = {
    "TangentAlignment": MetricInfo("TangentAlignment", "manifold", True, False,
                                   "‖P_T E‖/‖E‖ of the attribution in the data manifold's tangent space, over the random "
                                   "direction's expected score (1 = chance)", "manifex"),
    "ManifoldDeletion": MetricInfo("ManifoldDeletion", "manifold", False, False,
                                   "area under the target probability as the most relevant pixels are removed and in-filled "
                                   "from the generator (kept pixels fixed): deletion that stays on the data manifold",
                                   "manifex"),
}

#: Quantus metrics that call the explanation method again (on perturbed inputs or randomised models).
_REEXPLAINS = {"MaxSensitivity", "AvgSensitivity", "LocalLipschitzEstimate", "MPRT", "SmoothMPRT", "EfficientMPRT",
               "ModelParameterRandomisation", "RandomLogit", "Continuity", "Consistency", "RelativeInputStability",
               "RelativeOutputStability", "RelativeRepresentationStability", "InputInvariance"}

_DESCRIPTIONS = {
    "PixelFlipping": "target probability as the most relevant pixels are set to black, one step at a time (area under it)",
    "RegionPerturbation": "as pixel-flipping with patches",
    "ROAD": "accuracy as the most relevant pixels are removed by noisy linear imputation",
    "FaithfulnessCorrelation": "correlation of the relevance of random pixel subsets with the output drop when they are removed",
    "Infidelity": "squared error between the relevance-weighted perturbation and the output change",
    "MaxSensitivity": "largest change of the explanation under small input noise",
    "AvgSensitivity": "mean change of the explanation under small input noise",
    "LocalLipschitzEstimate": "largest explanation change per input change in a neighbourhood",
    "MPRT": "similarity of the explanation after randomising the model's layers (a sanity check)",
    "RandomLogit": "similarity of the explanation of the target and of a random other class (a sanity check)",
    "Sparseness": "Gini index of the relevance (concentrated on few pixels)",
    "Complexity": "entropy of the relevance (spread over many pixels)",
}


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def _quantus_classes() -> dict[str, type]:
    quantus = import_quantus()
    return {n: c for n in dir(quantus) if inspect.isclass(c := getattr(quantus, n)) and issubclass(c, quantus.Metric)
            and n not in ("Metric", "BatchedMetric")}


def _known_names() -> dict[str, str]:
    """{lookup key: class name} for manifex's metrics (no Quantus needed) and, when importable, Quantus's."""
    names = list(MANIFEX_METRICS)
    try:
        names += list(_quantus_classes())
    except InputError:
        pass
    out: dict[str, str] = {}
    for n in names:
        out[n.lower()] = n
        out[_snake(n)] = n
        out[_snake(n).replace("_", "")] = n
    out["mprt"] = "MPRT" if "MPRT" in names else out.get("mprt", "MPRT")
    return out


def metric_name(name: str) -> str:
    """The class name of a metric given as a Quantus class name or snake_case (``"max_sensitivity"``)."""
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"a metric is named by a string such as 'PixelFlipping' or 'pixel_flipping', got {name!r}.")
    known = _known_names()
    key = name.strip()
    found = known.get(key.lower()) or known.get(_snake(key)) or known.get(key.lower().replace("-", "_"))
    if found is None:
        try:
            import_quantus()
        except InputError:
            raise InputError(f"metric {name!r} is not one of manifex's ({', '.join(MANIFEX_METRICS)}); Quantus's metrics "
                             f"need Quantus 0.6, which is not importable here: install it with {QUANTUS_HINT}.") from None
        close = sorted({v for k, v in known.items() if k[:4] == _snake(key)[:4]})
        raise InputError(f"unknown metric {name!r}; use a Quantus class name or its snake_case (e.g. pixel_flipping, "
                         f"max_sensitivity) or {', '.join(MANIFEX_METRICS)}" + (f"; close: {', '.join(close)}" if close else "") + ".")
    return found


def metric_info(name: str) -> MetricInfo:
    """Category, direction and description of a metric (Quantus's or manifex's)."""
    n = metric_name(name)
    if n in MANIFEX_METRICS:
        return MANIFEX_METRICS[n]
    cls = _quantus_classes()[n]
    direction = getattr(cls, "score_direction", None)
    category = getattr(cls, "evaluation_category", None)
    return MetricInfo(n, str(getattr(category, "value", category) or "other").lower(), str(getattr(direction, "value", direction)).lower() == "higher",
                      n in _REEXPLAINS, _DESCRIPTIONS.get(n, (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else n))


# ------------------------------------------------------------------------------------------------------------
# evaluate
# ------------------------------------------------------------------------------------------------------------
def _parameters(fn: Callable) -> set[str]:
    return {p.name for p in inspect.signature(fn).parameters.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


_CALL_MANAGED = {"model", "x_batch", "y_batch", "a_batch", "s_batch", "explain_func", "explain_func_kwargs", "kwargs"}


def _as_scores(value: Any) -> torch.Tensor:
    """Quantus's per-example scores (a list of floats, of curves, or a dict of them per layer) as a tensor:
    (N,), (N, steps) or, for a dict, (layers, N)."""
    if isinstance(value, Mapping):
        return torch.stack([_as_scores(v) for v in value.values()])
    arr = np.asarray(value, dtype=np.float64)
    return torch.from_numpy(arr)


#: steps of pixel-flipping that must share one forward pass for manifex's batched version to be used: measured
#: (benchmarks/bench_evaluate.py, LeNet, batch 64, 1 CPU thread) 3.2× Quantus's speed at 8×8 (16 steps a pass),
#: 0.9× at 16×16 (4 steps a pass: larger passes are slower per image) and 1.0× at 32×32 (1 step, as Quantus)
MIN_STEPS_PER_PASS = 8


def _batched_pixel_flipping_pays(init: dict, call: dict, shape: tuple, batch_size: int) -> bool:
    """Whether evaluate computes PixelFlipping itself: only Quantus's options it reproduces, the black baseline,
    and inputs small enough that several steps of a batch share a forward pass (where the benchmark shows a gain)."""
    from .manifold import PIXEL_BUDGET, BatchedPixelFlipping

    if not set(init) | set(call) <= BatchedPixelFlipping.OPTIONS or init.get("perturb_baseline", "black") != "black":
        return False
    n, d = min(batch_size, shape[0]), math.prod(shape[1:])
    return PIXEL_BUDGET // max(1, n * d) >= MIN_STEPS_PER_PASS


def evaluate(model: nn.Module, x: Any, y: Any, attributions: Any = None, *, metrics: str | Sequence[str] | Mapping[str, Any],
             method: str | None = None, explain_func_kwargs: Mapping[str, Any] | None = None, batch_size: int = 64,
             channel_first: bool | None = None, generator: Any = None, z: Any = None, device: str | None = None,
             **options: Any) -> dict[str, torch.Tensor]:
    """Score attributions of ``model`` on ``x`` (N, C, H, W), classes ``y`` (N,), by each of ``metrics``.

    ``metrics``: names (Quantus class names such as ``"PixelFlipping"`` or snake_case ``"max_sensitivity"``, or
    manifex's ``"TangentAlignment"``/``"ManifoldDeletion"``), or ``{name: metric instance}`` for metrics built by
    hand. ``attributions`` (N, ...) are scored as given; without them they are computed with ``method`` (any manifex
    method, through :func:`explain_func`, options in ``explain_func_kwargs``), which every re-explaining metric
    (MaxSensitivity, MPRT, RandomLogit, ...) needs too. ``options``: Quantus's own keyword names, each given to
    every metric whose constructor or call takes it (``nr_samples=10``, ``features_in_step=4``,
    ``perturb_baseline="black"``, ``softmax=False``, ...); one that no metric takes is an error.
    ``generator`` (and optionally the latent codes ``z`` of ``x``): for the manifold-aware metrics.

    Returns ``{name: scores}``: per-example scores (N,), curves (N, steps), or (layers, N) for a metric that
    reports per layer (MPRT). The model's state (modes, ``requires_grad``, buffers, hooks) is left as found.
    Every name, option and the need for a method is checked before any metric runs.
    """
    from . import manifold

    if isinstance(metrics, str):
        metrics = [metrics]
    if isinstance(metrics, Mapping):
        built = dict(metrics)
        names = list(built)
    else:
        names = list(metrics)
        built = {}
        if not names:
            raise InputError("metrics is empty; name at least one metric, e.g. metrics=['pixel_flipping'].")
    resolved = {n: (n if n in built else metric_name(n)) for n in names}
    if len(set(resolved.values())) != len(resolved):
        dup = sorted({v for v in resolved.values() if list(resolved.values()).count(v) > 1})
        raise InputError(f"metric(s) {', '.join(dup)} named more than once.")
    if attributions is None and method is None:
        raise InputError("give attributions= (N, ...) to score, or method= to compute them (e.g. method='gradient').")
    needs_method = [n for n, r in resolved.items() if n not in built and r in _REEXPLAINS]
    if needs_method and method is None:
        raise InputError(f"{', '.join(needs_method)} re-explain perturbed inputs: pass method= (e.g. method='gradient') "
                         "besides the attributions.")
    if method is not None:
        _quantus_method(method)
    needs_generator = [n for n, r in resolved.items() if n not in built and r in MANIFEX_METRICS
                       and not (r == "ManifoldDeletion" and options.get("perturbation", "manifold") != "manifold")]
    if needs_generator and generator is None:
        raise InputError(f"{', '.join(needs_generator)} need generator= (an object with encode/decode: the VAE of a known "
                         "manifold, a flow, or manifex.as_generator(...)).")
    quantus_needed = any(r not in MANIFEX_METRICS for n, r in resolved.items() if n not in built)
    classes = _quantus_classes() if quantus_needed else {}
    # options: each to the metrics that take it; the leftovers are an error, before any work
    inits: dict[str, dict] = {}
    calls: dict[str, dict] = {}
    used: set[str] = set()
    for n, r in resolved.items():
        if n in built:
            inits[n], calls[n] = {}, {}
            call_params = _parameters(type(built[n]).__call__) if not inspect.isfunction(built[n]) else _parameters(built[n])
        elif r in MANIFEX_METRICS:
            cls = getattr(manifold, r)
            init_params, call_params = _parameters(cls.__init__), _parameters(cls.__call__)
            inits[n] = {k: v for k, v in options.items() if k in init_params and k != "self"}
        else:
            cls = classes[r]
            init_params, call_params = _parameters(cls.__init__), _parameters(cls.__call__)
            inits[n] = {k: v for k, v in options.items() if k in init_params and k != "self"}
        calls[n] = {k: v for k, v in options.items() if k in call_params and k not in _CALL_MANAGED and k not in inits[n]}
        used |= set(inits[n]) | set(calls[n])
    unused = sorted(set(options) - used)
    if unused:
        raise InputError(f"option(s) {', '.join(unused)} are taken by none of the metrics {', '.join(resolved.values())}; "
                         "use Quantus's keyword names (see each metric's documentation).")
    if isinstance(model, nn.Module) and device is None:
        dev = model_device(model)
        device = None if dev is None else str(dev)
    # the model's dtype, as Quantus's model wrapper feeds it (torch.Tensor(x): float32 for float32 models)
    xs = to_numpy(x).astype(torch.empty(0, dtype=_model_dtype(model)).numpy().dtype, copy=False)
    ys = to_numpy(y).astype(np.int64)
    if xs.ndim < 2 or ys.shape != (xs.shape[0],):
        raise InputError(f"x must be a batch (N, ...) and y one class per example (N,), got {xs.shape} and {ys.shape}.")
    ef_kwargs = {"method": method, "batch_size": batch_size, **(explain_func_kwargs or {})} if method is not None else {}
    warn_if_training(model)
    results: dict[str, torch.Tensor] = {}
    with preserve_model_state(model):
        if attributions is None:
            a = explain_func(model, xs, ys, channel_first=channel_first, device=device, **ef_kwargs)
        else:
            a = to_numpy(attributions).astype(xs.dtype, copy=False)
            if a.shape[0] != xs.shape[0]:
                raise InputError(f"attributions have {a.shape[0]} rows for {xs.shape[0]} inputs.")
        for n, r in resolved.items():
            if n in built:
                metric = built[n]
            elif r == "PixelFlipping" and _batched_pixel_flipping_pays(inits[n], calls[n], xs.shape, batch_size):
                # batched: equal to Quantus's to 1e-5 (tests/test_evaluation.py), faster on small images
                metric = manifold.BatchedPixelFlipping(**inits[n])
            elif r in MANIFEX_METRICS:
                metric = getattr(manifold, r)(**{"generator": generator, **inits[n]})
            else:
                # per-example scores unless asked otherwise (some Quantus metrics aggregate by default)
                defaults = {"disable_warnings": True, "return_aggregate": False}
                metric = classes[r](**{**{k: v for k, v in defaults.items() if k in _parameters(classes[r].__init__)}, **inits[n]})
            call = dict(calls[n])
            if r in MANIFEX_METRICS and z is not None:
                call["z_batch"] = z
            scores = metric(model=model, x_batch=xs, y_batch=ys, a_batch=a, s_batch=None,
                            explain_func=explain_func if method is not None else None,
                            explain_func_kwargs=ef_kwargs if method is not None else None,
                            **{"channel_first": channel_first, "device": device, "batch_size": batch_size, **call})
            results[n] = _as_scores(scores)
    return results
