"""The β-smoothing defence against explanation manipulation (Dombrowski et al., NeurIPS 2019), measured.

Replacing every ReLU by ``softplus_β(z) = log(1 + exp(β z)) / β`` bounds the curvature of the network's
output surface; the paper's theory bounds the change of a gradient explanation by that curvature times
the distance moved, so a smaller β should make explanations harder to manipulate, at some cost in
accuracy. This module measures all three, per β:

- :func:`explanations_across_beta` — the explanation of the same inputs under softplus(β) for several β
  and under the ReLU model (the research code's plot across β = 10, 3, 1);
- :func:`accuracy_across_beta` — top-1 accuracy of the softplus(β) model per β and of the ReLU model;
- :func:`hessian_top_eigenvalue` — the curvature diagnostic: the eigenvalue of largest magnitude of the
  input Hessian ∇²ₓ f_c(x) of the class score, per example, by batched power iteration on Hessian-vector
  products (double backprop through :func:`~manifex.attribution.core.target_gradient`);
- :func:`robustness_sweep` — the same campaign (:func:`~manifex.manipulation.run_campaign`) against the
  β-smoothed model for each β, one resumable campaign directory ``out_dir/beta_<β>/`` per β, with the
  attack success, output change, accuracy cost and curvature in one record per β;
- :func:`plot_beta_curves` — those records against β (log axis).

β conventions: every ``betas`` argument is a sequence of numbers > 0; ``float("inf")`` stands for the
original ReLU model (softplus_β → ReLU as β → ∞) and is the key under which ReLU results are returned
(``include_relu=True`` adds it where missing). Smoothing uses :func:`~manifex.attribution.beta_smooth`
(hooks on ``nn.ReLU`` modules and, by default, functional ReLU calls), never a copy of the model, and
the model's state (train/eval flags, hooks, ``requires_grad``, buffers) is restored by every function.
"""
from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Literal, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from ..attribution import Explainer, beta_smooth, make_explainer, preserve_model_state
from ..attribution.core import OutputSelector, Target, check_input, selected_output, target_gradient
from ..attribution.methods import model_device
from ..attribution.smoothing import UnsupportedPolicy, _check_unsupported_policy
from ..data import ImageDataset
from ..errors import InputError
from ..models.training import accuracy
from ..runs import Executor, Unit, atomic_write_json, run_units
from .campaign import PairSet, _campaign, _check_attack_options

__all__ = [
    "RELU",
    "explanations_across_beta",
    "accuracy_across_beta",
    "HessianEigen",
    "hessian_power_iteration",
    "hessian_top_eigenvalue",
    "robustness_sweep",
    "plot_beta_curves",
    "SWEEP_FILE",
    "DEFENCE_FILE",
]

#: The β that stands for the original ReLU model (softplus_β → ReLU as β → ∞).
RELU = float("inf")
#: Written into ``out_dir`` by :func:`robustness_sweep`: all per-β records.
SWEEP_FILE = "sweep.json"
#: Written into each ``out_dir/beta_<β>/``: the per-β record, including the per-pair curvature values.
DEFENCE_FILE = "defence.json"
#: The per-pair curvature in each ``beta_<β>/`` (one JSON line per pair) and the settings it was computed with.
CURVATURE_FILE = "curvature.jsonl"
CURVATURE_SETTINGS_FILE = "curvature.json"

FunctionalPolicy = Literal["handle", "error", "ignore"]
_RELU_HESSIAN_WARNING = "create_graph=True, but the explanation does not depend differentiably"


# ------------------------------------------------------------------------------------------------------
# helpers


def _check_model(model: object, what: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise InputError(f"{what} needs an nn.Module (it β-smooths the model's ReLUs), got {type(model).__name__}.")
    return model


def _check_betas(betas: object, *, include_relu: bool) -> list[float]:
    """``betas`` as a list of distinct floats > 0 (inf = ReLU), ReLU appended when asked and missing."""
    if isinstance(betas, numbers.Real) and not isinstance(betas, bool):
        betas = [betas]
    if not isinstance(betas, (list, tuple)) and not (isinstance(betas, Sequence) and not isinstance(betas, str)):
        raise InputError(f"betas must be a sequence of numbers > 0 (e.g. (10, 3, 1); inf = the ReLU model), got {betas!r}.")
    out: list[float] = []
    for b in betas:
        if isinstance(b, torch.Tensor) and b.numel() == 1:
            b = b.item()
        if isinstance(b, bool) or not isinstance(b, numbers.Real) or math.isnan(b) or b <= 0:
            raise InputError(f"every beta must be a number > 0 (softplus sharpness; inf = the ReLU model), got {b!r}.")
        out.append(float(b))
    if len(set(out)) != len(out):
        raise InputError(f"betas must be distinct, got {list(betas)!r}.")
    if include_relu and RELU not in out:
        out.append(RELU)
    if not out:
        raise InputError("betas is empty; pass at least one beta, e.g. (10, 3, 1).")
    return out


def _check_positive_int(name: str, value: object, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InputError(f"{name} must be an integer >= {low}, got {value!r}.")
    return value


@contextlib.contextmanager
def _smoothed(model: nn.Module, beta: float | None, functional: FunctionalPolicy,
              unsupported: UnsupportedPolicy = "raise") -> Iterator[None]:
    """softplus(β) in place of every ReLU inside the block; ``None`` or inf: the model as it is (ReLU)."""
    if beta is None or math.isinf(beta):
        yield
    else:
        with beta_smooth(model, beta, functional=functional, unsupported=unsupported):
            yield


def _resolve_explainer(model: nn.Module, method: Explainer | str, options: dict[str, Any]) -> Explainer:
    if isinstance(method, str):
        return make_explainer(model, method, **options)
    if options:
        raise InputError("explainer options only apply when the method is given by name; configure the Explainer instance instead.")
    if not isinstance(method, Explainer):
        raise InputError(f"method must be a method name (e.g. 'gradient') or a manifex Explainer, got {type(method).__name__}.")
    if method.model is not model:
        raise InputError("the explainer explains a different model; build it on the same model or pass the method name.")
    return method


def _fixed_classes(model: nn.Module, x: torch.Tensor, target: Target) -> Target:
    """Class indices resolved once on the model as it is now: ``None`` → the predicted class (for models
    with several outputs), a callable that picks indices → its indices; anything else unchanged."""
    if target is None or (callable(target) and not isinstance(target, torch.Tensor)):
        with torch.no_grad():
            out = model(x)
        if target is None:
            if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] > 1:
                return out.argmax(1)
            return None
        picked = target(out)
        if isinstance(picked, torch.Tensor) and not picked.is_floating_point():
            return picked
    return target


def _beta_key(beta: float) -> str:
    """The directory name of a β: ``beta_10``, ``beta_0.5``, ``beta_inf`` (ReLU)."""
    return f"beta_{beta:g}"


# ------------------------------------------------------------------------------------------------------
# explanations and accuracy across β


def explanations_across_beta(
    model: nn.Module,
    x: torch.Tensor,
    target: Target = None,
    method: Explainer | str = "gradient",
    betas: Sequence[float] = (10, 3, 1),
    *,
    include_relu: bool = True,
    eval_mode: bool = True,
    functional: FunctionalPolicy = "handle",
    unsupported: UnsupportedPolicy = "raise",
    output: OutputSelector = None,
    **options: Any,
) -> dict[float, torch.Tensor]:
    """The explanation of the same inputs ``x`` (N, ...) under softplus(β) for each β, and under ReLU.

    Returns ``{β: explanation}`` (each shaped like ``x``, detached), in the order of ``betas``, with the
    ReLU model's explanation under ``float("inf")`` (:data:`RELU`) when ``include_relu`` (last, unless
    ``betas`` already holds inf). ``method``: a registry name with ``options`` (e.g. ``steps=32`` for
    IG) or an Explainer built on ``model``. ``target``: as for any explainer; ``None`` (or a callable
    picking classes) is resolved **once on the ReLU model**, so every β explains the same class.
    ``eval_mode``: run the model in eval mode (restored afterwards). ``functional``: how functional ReLU
    calls are treated while smoothed; ``unsupported``: what to do with activations β-smoothing cannot smooth
    (SELU, ...: "raise", "warn" or "ignore"; see :func:`~manifex.attribution.beta_smooth`). ``output``: the
    logits of a model returning a tuple or dict (index, key or callable; default the explainer's own).

    As β grows the explanations approach the ReLU explanation (softplus_β → ReLU); small β gives
    smoother, blurrier maps (for one ReLU layer, the gradient averaged under logistic noise of scale 1/β).
    """
    model = _check_model(model, "explanations_across_beta")
    check_input(x, "x")
    beta_list = _check_betas(betas, include_relu=include_relu)
    _check_unsupported_policy(unsupported)
    explainer = _resolve_explainer(model, method, options)
    output = explainer.output if output is None else output
    dev = model_device(model)
    if dev is not None:
        x = x.to(dev)
    out: dict[float, torch.Tensor] = {}
    with preserve_model_state(model), selected_output(model, output):
        if eval_mode:
            model.eval()
        target = _fixed_classes(model, x, target)
        for beta in beta_list:
            with _smoothed(model, beta, functional, unsupported):
                out[beta] = explainer.attribute(x, target).detach()
    return out


def accuracy_across_beta(
    model: nn.Module,
    data: ImageDataset,
    betas: Sequence[float] = (10, 3, 1),
    *,
    include_relu: bool = True,
    batch_size: int = 512,
    functional: FunctionalPolicy = "handle",
    unsupported: UnsupportedPolicy = "raise",
    output: OutputSelector = None,
) -> dict[float, float]:
    """Top-1 accuracy on ``data`` of the softplus(β) model for each β (eval mode): ``{β: accuracy}``, with
    the ReLU model under ``float("inf")`` when ``include_relu`` (equal to
    :func:`manifex.models.accuracy` ``(model, data)``). The accuracy cost of β is ``acc[inf] - acc[β]``.
    ``unsupported``: activations β-smoothing cannot smooth ("raise", "warn", "ignore"); ``output``: the
    logits of a model returning a tuple or dict (index, key or callable)."""
    model = _check_model(model, "accuracy_across_beta")
    if not isinstance(data, ImageDataset):
        raise InputError(f"data must be an ImageDataset, got {type(data).__name__}.")
    if len(data) == 0:
        raise InputError("data is empty; accuracy needs at least one example.")
    batch_size = _check_positive_int("batch_size", batch_size)
    _check_unsupported_policy(unsupported)
    out: dict[float, float] = {}
    with preserve_model_state(model), selected_output(model, output):
        for beta in _check_betas(betas, include_relu=include_relu):
            with _smoothed(model, beta, functional, unsupported):
                out[beta] = accuracy(model, data, batch_size)
    return out


# ------------------------------------------------------------------------------------------------------
# curvature: top eigenvalue of the input Hessian


class HessianEigen(NamedTuple):
    """What :func:`hessian_power_iteration` returns (N examples)."""

    values: torch.Tensor
    """(N,) the eigenvalue of largest magnitude (signed Rayleigh quotient vᵀHv, ‖v‖ = 1)."""
    vectors: torch.Tensor
    """(N, ...) shaped like x: the unit eigenvector estimates."""
    iterations: torch.Tensor
    """(N,) Hessian-vector products used per example."""
    converged: torch.Tensor
    """(N,) bool: the relative change of the eigenvalue fell to ``tol`` within ``iterations``."""


def _per_example(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def _power_iteration_chunk(
    model: nn.Module, x: torch.Tensor, target: Target, v0: torch.Tensor, iterations: int, tol: float
) -> HessianEigen:
    n = x.shape[0]
    xin = x.detach().clone().requires_grad_(True)
    v = v0.expand_as(xin).clone()
    v = v / _expand(torch.linalg.vector_norm(_per_example(v), dim=1), v)
    values = x.new_zeros(n)
    iters = torch.zeros(n, dtype=torch.long)
    converged = torch.zeros(n, dtype=torch.bool)
    with warnings.catch_warnings():
        # a ReLU network: the gradient has no input derivative; its Hessian is zero (returned below)
        warnings.filterwarnings("ignore", message=_RELU_HESSIAN_WARNING, category=RuntimeWarning)
        grad, _ = target_gradient(model, xin, target, create_graph=True)
    if not grad.requires_grad:
        return HessianEigen(values, v.detach(), iters, torch.ones(n, dtype=torch.bool))
    active = torch.ones(n, dtype=torch.bool, device=x.device)
    previous = x.new_zeros(n)
    for k in range(iterations):
        # examples are independent (eval mode), so the Hessian-vector product of the summed gradient
        # with a per-example vector is each example's own product
        (hv,) = torch.autograd.grad(grad, xin, grad_outputs=v, retain_graph=k + 1 < iterations, allow_unused=True)
        hv = torch.zeros_like(xin) if hv is None else hv.detach()
        lam = (_per_example(v) * _per_example(hv)).sum(1)  # Rayleigh quotient (‖v‖ = 1)
        norm = torch.linalg.vector_norm(_per_example(hv), dim=1)
        new_v = torch.where(_expand(norm > 0, hv), hv / _expand(norm.clamp_min(torch.finfo(hv.dtype).tiny), hv), v)
        done = (norm == 0) | ((lam - previous).abs() <= tol * lam.abs()) if k > 0 else norm == 0
        # examples that converged earlier stay frozen: each follows the trajectory it would follow alone
        values = torch.where(active, lam, values)
        v = torch.where(_expand(active, v), new_v, v)
        iters[active.cpu()] += 1
        newly = active & done
        converged[newly.cpu()] = True
        active = active & ~done
        previous = lam
        if not bool(active.any()):
            break
    return HessianEigen(values.detach(), v.detach(), iters, converged)


def hessian_power_iteration(
    model: nn.Module,
    x: torch.Tensor,
    target: Target = None,
    *,
    beta: float | None = None,
    iterations: int = 20,
    tol: float = 1e-4,
    seed: int = 0,
    batch_size: int | None = None,
    eval_mode: bool = True,
    functional: FunctionalPolicy = "handle",
    unsupported: UnsupportedPolicy = "raise",
    output: OutputSelector = None,
) -> HessianEigen:
    """Power iteration on the input Hessian H_i = ∇²ₓ f_{c_i}(x_i) of the class score, every example at once.

    Each example has its own unit vector v_i; one step computes H_i v_i for the whole batch by one
    Hessian-vector product (double backprop through the engine's gradient path
    :func:`~manifex.attribution.core.target_gradient` with ``create_graph=True``), takes the Rayleigh
    quotient λ_i = v_iᵀ H_i v_i and normalises v_i ← H_i v_i / ‖H_i v_i‖ per example. An example stops
    (its λ and v are frozen) when ``|λ_k − λ_{k−1}| ≤ tol · |λ_k|``, or after ``iterations`` products,
    so a batch gives the same numbers as its examples one at a time. All examples start from one
    random unit vector drawn from ``seed`` (independent of the batch composition).

    Power iteration finds the eigenvalue of largest **magnitude** (returned signed); it converges at the
    rate ``(|λ₂|/|λ₁|)²`` in λ, slowly when the two largest magnitudes are close, and oscillates when the
    top two are ±λ of equal magnitude. Raise ``iterations`` and lower ``tol`` for precise values.

    ``target``: the class score (int, (N,) tensor or callable, see :data:`~manifex.attribution.Target`);
    ``None``: the class the model predicts — the **smoothed** model's prediction when ``beta`` is set.
    ``beta``: compute on softplus(β) in place of every ReLU (``None`` or inf: the model as it is).
    ``batch_size``: examples per chunk (memory: one retained double-backprop graph per chunk).
    ``eval_mode``: run in eval mode (needed for examples to be independent with BatchNorm/Dropout).
    ``unsupported``: activations β-smoothing cannot smooth ("raise", "warn", "ignore"; see
    :func:`~manifex.attribution.beta_smooth`); ``output``: the logits of a tuple/dict model output.

    A ReLU network is piecewise linear, so its input Hessian is zero almost everywhere (the kinks have
    measure zero): unsmoothed, the result is exactly zero (``converged`` True, λ = 0). That is the point of
    β-smoothing: softplus_β'' = β·σ(βz)(1 − σ(βz)) gives curvature ≈ β/4 at the kinks.
    """
    model = _check_model(model, "hessian_power_iteration")
    check_input(x, "x")
    if x.shape[0] == 0:
        raise InputError("x is empty; pass at least one example.")
    if beta is not None:
        beta = _check_betas([beta], include_relu=False)[0]
    iterations = _check_positive_int("iterations", iterations)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise InputError(f"tol must be a finite number >= 0, got {tol!r}.")
    if batch_size is not None:
        batch_size = _check_positive_int("batch_size", batch_size)
    _check_unsupported_policy(unsupported)
    dev = model_device(model)
    if dev is not None:
        x = x.to(dev)
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes and x.dtype not in dtypes:
        raise InputError(f"x has dtype {x.dtype} but the model's parameters are {sorted(map(str, dtypes))}; convert one of them.")
    g = torch.Generator().manual_seed(int(seed))
    v0 = torch.randn(x.shape[1:], generator=g, dtype=torch.float64).to(device=x.device, dtype=x.dtype)
    step = batch_size or x.shape[0]
    parts: list[HessianEigen] = []
    with preserve_model_state(model), selected_output(model, output):
        if eval_mode:
            model.eval()
        for p in model.parameters():  # only input derivatives: no parameter graphs
            p.requires_grad_(False)
        with _smoothed(model, beta, functional, unsupported):
            target = _fixed_classes(model, x, target)
            for start in range(0, x.shape[0], step):
                sl = slice(start, start + step)
                t = target[sl] if isinstance(target, torch.Tensor) and target.dim() == 1 else target
                parts.append(_power_iteration_chunk(model, x[sl], t, v0, iterations, float(tol)))
    if len(parts) == 1:
        return parts[0]
    return HessianEigen(*(torch.cat(fields) for fields in zip(*parts)))


def hessian_top_eigenvalue(
    model: nn.Module,
    x: torch.Tensor,
    target: Target = None,
    *,
    beta: float | None = None,
    iterations: int = 20,
    tol: float = 1e-4,
    seed: int = 0,
    batch_size: int | None = None,
    eval_mode: bool = True,
    functional: FunctionalPolicy = "handle",
    unsupported: UnsupportedPolicy = "raise",
    output: OutputSelector = None,
) -> torch.Tensor:
    """(N,) the eigenvalue of largest magnitude (signed) of the input Hessian of the class score per example
    — the curvature diagnostic of the defence; take ``.abs()`` for the curvature magnitude.

    See :func:`hessian_power_iteration` (same arguments) for the method, convergence and ``target``.
    ``beta``: evaluate the softplus(β)-smoothed model. For a ReLU network (``beta=None``) the input Hessian
    is zero almost everywhere and the result is zeros.
    """
    return hessian_power_iteration(
        model, x, target, beta=beta, iterations=iterations, tol=tol, seed=seed, batch_size=batch_size,
        eval_mode=eval_mode, functional=functional, unsupported=unsupported, output=output,
    ).values


# ------------------------------------------------------------------------------------------------------
# robustness sweep


def _from_json_beta(v: Any) -> float:
    return RELU if v == "inf" else float(v)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj, inf_as_string=True)  # β = inf (the ReLU model) is written "inf"


_SUMMARY_MEANS = ("pcc_manip_target", "pcc_orig_target", "pcc_manip_orig", "ssim_manip_target", "ssim_orig_target",
                  "mse_manip_target", "max_dp", "l2", "linf")


def robustness_sweep(
    model: nn.Module,
    explainer_name: str,
    pairs: PairSet,
    betas: Sequence[float],
    out_dir: str | os.PathLike,
    *,
    data: ImageDataset | None = None,
    explainer_options: dict[str, Any] | None = None,
    batch_size: int = 16,
    resume: bool = True,
    figures: bool = True,
    pixel_scale: float | Sequence[float] | torch.Tensor = 1.0,
    curvature_iterations: int = 20,
    curvature_tol: float = 1e-4,
    curvature_seed: int = 0,
    relu_beta_growth: tuple[float, float] | None = (10.0, 100.0),
    functional: FunctionalPolicy = "handle",
    unsupported: UnsupportedPolicy = "raise",
    progress: bool = False,
    executor: Executor | None = None,
    output: OutputSelector = None,
    **attack_options: Any,
) -> list[dict[str, Any]]:
    """Run the same manipulation campaign against the softplus(β) model for every β; one record per β.

    For each β, :func:`~manifex.manipulation.run_campaign` runs on ``model`` with every ReLU replaced by
    softplus(β) (:func:`~manifex.attribution.beta_smooth`) into ``out_dir/beta_<β>/`` (``beta_10``,
    ``beta_0.5``, …). The defended model *is* the smoothed one, so everything is computed on it: the
    target maps, the attack (its explanations and output term), the final manipulated explanation
    (``manipulate`` evaluates on "the model it was given", here the smoothed one) and the output change.
    A β of ``float("inf")`` in ``betas`` is the undefended ReLU model (``beta_inf/``); gradient-type
    explanations of a ReLU model cannot be attacked directly (zero second derivative), so that campaign
    uses the paper's β-growth ``relu_beta_growth`` (final maps on the ReLU model; ``None``: plain attack).
    ``beta_growth`` is refused in ``attack_options``: the sweep fixes β per campaign.

    Resumable per β: each campaign skips the pairs in its ``results.jsonl`` (``resume``; the attack
    settings must match), and the curvature of a β is reused from its ``defence.json`` when pairs and
    curvature settings are unchanged; it is computed per pair on the run layer (``curvature.jsonl``, resumable,
    on ``executor`` too). ``attack_options`` go to :func:`~manifex.manipulation.manipulate`;
    ``explainer_options``, ``batch_size``, ``figures``, ``pixel_scale``, ``progress``, ``executor`` (where the
    batches run: locally by default, or a :class:`manifex.runs.RayExecutor`) to the campaign.
    ``functional``/``unsupported``: β-smoothing's policies (:func:`~manifex.attribution.beta_smooth`) for every
    smoothed model call, the ReLU entry's β-growth included. ``output``: the logits of a model returning a
    tuple or dict (index, key or callable; default the explainer's), for every model call: campaigns,
    accuracy, curvature.

    Each record (also written to ``beta_<β>/defence.json`` and, all together, to ``out_dir/sweep.json``,
    where inf is written ``"inf"``) holds: ``beta``, ``out_dir``, ``n_pairs``/``n_new``/``n_skipped``; the
    campaign means ``pcc_manip_target`` (attack success), ``pcc_orig_target`` (before), ``pcc_gain`` (their
    difference: how far the budget moved the map, the manipulability; the "before" differs per β because
    each smoothed model has its own maps), ``pcc_manip_orig``,
    ``ssim_manip_target``, ``ssim_orig_target`` (None for maps under 11×11), ``mse_manip_target``,
    ``max_dp`` (mean ``max |Δp|``), ``l2``, ``linf``; ``top1_kept_rate``; ``curvature`` = mean ``|λ_max|`` of the
    input Hessian of the explained class score on the originals (same model, the class it predicts),
    ``curvature_median``; with ``data``: ``accuracy`` of the model at this β, ``accuracy_relu`` and
    ``accuracy_cost`` = accuracy_relu − accuracy (else None).
    """
    model = _check_model(model, "robustness_sweep")
    if not isinstance(pairs, PairSet):
        raise InputError(f"pairs must be a PairSet (pairs_from_csv / pairs_from_dataset), got {type(pairs).__name__}.")
    if not isinstance(explainer_name, str):
        raise InputError(f"explainer_name must be a method name such as 'gradient', got {type(explainer_name).__name__}.")
    output = make_explainer(model, explainer_name, **(explainer_options or {})).output if output is None else output
    _check_unsupported_policy(unsupported)  # the line above also fails early on a bad name or option
    if "beta_growth" in attack_options:
        raise InputError(
            "robustness_sweep fixes β for each campaign; beta_growth is not an option here "
            "(the ReLU entry, beta=inf, uses relu_beta_growth)."
        )
    _check_attack_options(attack_options)
    beta_list = _check_betas(betas, include_relu=False)
    if data is not None and not isinstance(data, ImageDataset):
        raise InputError(f"data must be an ImageDataset or None, got {type(data).__name__}.")
    curvature_iterations = _check_positive_int("curvature_iterations", curvature_iterations)
    batch_size = _check_positive_int("batch_size", batch_size)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if unsupported == "raise" and len(pairs):  # refuse an unsmoothable model before any campaign or accuracy run
        xo, _ = pairs.images([0])
        with preserve_model_state(model), selected_output(model, output), torch.no_grad():
            model.eval()
            with _smoothed(model, 10.0, functional, unsupported):  # ModelError naming the activations
                model(xo.to(device=model_device(model), dtype=dtype))
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)

    acc = accuracy_across_beta(model, data, beta_list, include_relu=True, functional=functional, unsupported=unsupported,
                               output=output) if data is not None else None
    curvature_settings = {"iterations": curvature_iterations, "tol": float(curvature_tol), "seed": int(curvature_seed),
                          "pair_ids": list(pairs.ids)}
    records: list[dict[str, Any]] = []
    for beta in beta_list:
        beta_dir = out / _beta_key(beta)
        label = "ReLU" if math.isinf(beta) else f"β={beta:g}"  # the progress bars' names
        options = sweep_attack_options(beta, attack_options, relu_beta_growth, unsupported)
        # smoothing is applied by whichever process runs a batch (here or a Ray worker), not around the call
        summary = _campaign(
            model, make_explainer(model, explainer_name, **(explainer_options or {})), pairs, beta_dir,
            batch_size=batch_size, resume=resume, figures=figures, pixel_scale=pixel_scale, progress=progress,
            executor=executor, smooth=None if math.isinf(beta) else (beta, functional, unsupported), attack_options=options,
            output=output, desc=f"attack {label}",
        )
        curv = _cached_curvature(beta_dir, curvature_settings) if resume else None
        if curv is None:  # per pair on the run layer (resumable, any executor): curvature.jsonl in beta_dir
            settings_path = beta_dir / CURVATURE_SETTINGS_FILE
            same = settings_path.is_file() and json.loads(settings_path.read_text(encoding="utf-8")) == curvature_settings
            atomic_write_json(settings_path, curvature_settings)
            context = {"model": model, "pairs": pairs, "beta": None if math.isinf(beta) else beta, "dtype": dtype,
                       "iterations": curvature_iterations, "tol": curvature_tol, "seed": curvature_seed,
                       "functional": functional, "unsupported": unsupported, "output": output}
            recs = run_units([Unit(pid, {"index": i}) for i, pid in enumerate(pairs.ids)], curvature_batch, beta_dir,
                             context=context, batch_size=batch_size, executor=executor, resume=resume and same,
                             progress=progress, results=CURVATURE_FILE, desc=f"curvature {label}")
            curv = [float(r["curvature"]) for r in recs]
        record = sweep_record(beta, summary, curv, acc, options, out_dir=str(beta_dir))
        _write_json(beta_dir / DEFENCE_FILE, {**record, "curvature_settings": curvature_settings,
                                                     "curvature_values": curv})
        records.append(record)
    _write_json(out / SWEEP_FILE, records)
    return records


def sweep_attack_options(beta: float, attack_options: dict[str, Any], relu_beta_growth: tuple[float, float] | None,
                         unsupported: UnsupportedPolicy) -> dict[str, Any]:
    """The attack options of the sweep's campaign at ``beta``: the ReLU model (inf) is attacked with β-growth
    ``relu_beta_growth`` (its gradient-type maps have no input derivative), with ``unsupported`` recorded only when
    not the default; a softplus(β) model is attacked as it is."""
    options = dict(attack_options)
    if math.isinf(beta) and relu_beta_growth is not None:
        options["beta_growth"] = tuple(relu_beta_growth)
        if unsupported != "raise":  # the attack's own smoothing (recorded only when not the default)
            options["unsupported"] = unsupported
    return options


def sweep_record(beta: float, summary: Any, curvature: Sequence[float], accuracy: dict[float, float] | None,
                 attack_options: dict[str, Any], **where: Any) -> dict[str, Any]:
    """The sweep's record of one β (see :func:`robustness_sweep`) from its campaign's :class:`CampaignSummary`, the
    per-pair curvature values, the accuracy per β (``None``: not measured) and the attack options of its campaign;
    ``where`` (``out_dir=...`` or ``results=...``) says where its pairs are."""
    record: dict[str, Any] = {
        "beta": beta,
        "model": "relu" if math.isinf(beta) else f"softplus({beta:g})",
        **where,
        "n_pairs": summary.n_pairs, "n_new": summary.n_new, "n_skipped": summary.n_skipped,
    }
    for key in _SUMMARY_MEANS:
        record[key] = summary.means.get(key)
    before, after = record.get("pcc_orig_target"), record.get("pcc_manip_target")
    record["pcc_gain"] = None if before is None or after is None else after - before
    record["top1_kept_rate"] = summary.top1_kept_rate
    record["curvature"] = float(np.mean(curvature)) if len(curvature) else None
    record["curvature_median"] = float(np.median(curvature)) if len(curvature) else None
    record["accuracy"] = None if accuracy is None else accuracy[beta]
    record["accuracy_relu"] = None if accuracy is None else accuracy[RELU]
    record["accuracy_cost"] = None if accuracy is None else accuracy[RELU] - accuracy[beta]
    record["attack_beta_growth"] = list(attack_options["beta_growth"]) if "beta_growth" in attack_options else None
    return record


def curvature_batch(units: list[Unit], ctx: dict[str, Any], out_dir: Path) -> list[dict]:
    """Run-layer process of the sweep's curvature: |λ_max| of the input Hessian per original image."""
    xo, _ = ctx["pairs"].images([int(u.payload["index"]) for u in units])
    dev = model_device(ctx["model"])
    lam = hessian_top_eigenvalue(ctx["model"], xo.to(device=dev, dtype=ctx["dtype"]), None, beta=ctx["beta"],
                                 iterations=ctx["iterations"], tol=ctx["tol"], seed=ctx["seed"], functional=ctx["functional"],
                                 unsupported=ctx.get("unsupported", "raise"), output=ctx.get("output"))
    return [{"id": u.id, "curvature": float(v)} for u, v in zip(units, lam.abs().cpu().tolist())]


def _cached_curvature(beta_dir: Path, settings: dict[str, Any]) -> list[float] | None:
    path = beta_dir / DEFENCE_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    values = saved.get("curvature_values")
    if saved.get("curvature_settings") != settings or not isinstance(values, list) or len(values) != len(settings["pair_ids"]):
        return None
    return [float(v) for v in values]


# ------------------------------------------------------------------------------------------------------
# plot


def _value(record: dict[str, Any], key: str) -> float:
    v = record.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def plot_beta_curves(sweep_results: Sequence[dict[str, Any]], path: str | os.PathLike | None = None):
    """Attack success and its cost against β: a :class:`matplotlib.figure.Figure` (saved as PNG at ``path``).

    Left panel: PCC of the manipulated map to the target (attack success; the PCC before the attack
    dotted) and mean ``max |Δp|`` (output change, twin axis) against β on a log axis. Right panel: the
    accuracy of the softplus(β) model and the curvature (mean ``|λ_max|`` of the input Hessian, twin log axis)
    against β. The ReLU model (β = inf) is drawn at the right end, labelled "ReLU"; it has no curvature
    point: its Hessian is zero almost everywhere (the curvature sits in the kinks, the β → ∞ limit), which
    the panel notes instead of plotting a misleading 0. Legends sit below the panels. ``sweep_results``:
    the records of :func:`robustness_sweep` (or of ``sweep.json``); missing values are skipped.
    """
    from matplotlib.figure import Figure

    from ..viz import save_figure

    if not isinstance(sweep_results, (list, tuple)) or not sweep_results:
        raise InputError("sweep_results must be a non-empty list of robustness_sweep records.")
    if not all(isinstance(r, dict) and "beta" in r for r in sweep_results):
        raise InputError("every sweep record must be a dict with a 'beta' entry (as robustness_sweep returns).")
    rows = sorted(sweep_results, key=lambda r: _from_json_beta(r["beta"]))
    betas = [_from_json_beta(r["beta"]) for r in rows]
    finite = [b for b in betas if math.isfinite(b)]
    relu_x = (max(finite) * 4.0 if finite else 100.0)
    xs = [b if math.isfinite(b) else relu_x for b in betas]
    labels = [f"{b:g}" if math.isfinite(b) else "ReLU" for b in betas]

    fig = Figure(figsize=(10.5, 4.4))
    ax1, ax3 = fig.subplots(1, 2)

    def axis(ax) -> None:
        ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels(labels)
        ax.minorticks_off()
        ax.set_xlabel("softplus β (smaller = smoother)")
        ax.grid(True, alpha=0.3)

    lines = ax1.plot(xs, [_value(r, "pcc_manip_target") for r in rows], "o-", color="C3", label="PCC manipulated→target")
    lines += ax1.plot(xs, [_value(r, "pcc_orig_target") for r in rows], "o:", color="C7", label="PCC original→target (before)")
    ax1.set_ylabel("Pearson correlation with target map")
    ax2 = ax1.twinx()
    lines += ax2.plot(xs, [_value(r, "max_dp") for r in rows], "s--", color="C0", label="mean max |Δp|")
    ax2.set_ylabel("output change (max |Δp|)", color="C0")
    axis(ax1)
    ax1.set_title("attack success and output change")
    ax1.legend(lines, [ln.get_label() for ln in lines], fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2,
               frameon=False)

    acc = [_value(r, "accuracy") for r in rows]
    lines = ax3.plot(xs, acc, "o-", color="C2", label="accuracy")
    ax3.set_ylabel("accuracy", color="C2")
    ax4 = ax3.twinx()
    curv = [_value(r, "curvature") if math.isfinite(b) else math.nan for r, b in zip(rows, betas)]
    lines += ax4.plot(xs, curv, "^--", color="C1", label="curvature: mean |λ_max(∇²f)|")
    if not all(math.isfinite(b) for b in betas):
        ax4.annotate("ReLU: ∇²f = 0\nalmost everywhere", xy=(relu_x, 0.3), xycoords=("data", "axes fraction"),
                     ha="center", va="center", fontsize=7, color="C1")
    ax4.set_ylabel("curvature", color="C1")
    if any(c > 0 for c in curv if math.isfinite(c)) and all(c > 0 for c in curv if math.isfinite(c)):
        ax4.set_yscale("log")
    axis(ax3)
    ax3.set_title("accuracy and curvature")
    ax3.legend(lines, [ln.get_label() for ln in lines], fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2,
               frameon=False)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig
