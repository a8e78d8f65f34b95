"""Explanation manipulation (Dombrowski et al., NeurIPS 2019), batched: :func:`manipulate`.

Find ``x_adv`` near ``x`` whose explanation looks like a chosen target map while the model's output stays
the same, by minimising per example

    L_i = w · mean_pixels((h(x_adv_i) − hᵗ_i)²) + γ·w · mean_classes((g(x_adv_i) − g(x_i))²)

with Adam on the input, then clamping to the valid pixel box (and projecting onto an optional norm ball)
after each step. ``h`` is the explanation map reduced to (H, W) and normalised, ``g`` the softmax output.

Batching without interaction
-----------------------------
The batch loss is the *sum* of the per-example losses, so example i's gradient only involves ``x_adv_i``;
Adam keeps its moments per entry, so every example follows exactly the trajectory it would follow alone
(tested: batched == one at a time). The model runs in eval mode during the attack (``eval_mode``), so
BatchNorm/Dropout do not couple the examples either.

Defaults = the research settings (RESEARCH.md §2): |relevance| summed over channels and normalised to sum 1,
w = 1e11 and γ = 1e-5 (the seed's 1e11 · MSE(map) + 1e6 · MSE(softmax)), Adam lr 2e-4, 1500 iterations,
start at x, clamp to the pixel box, no norm budget. They were tuned for 224×224 maps and 1000 classes. A
map that sums to 1 over d pixels makes the map term scale like 1/d² and the output term scales like 1/K, so
on other sizes the seed's balance is γ = 1e-5 · (K / 1000) · (224² / d)² (:func:`research_gamma`: 0.06 for
8×8 maps and 10 classes, 2.4e-4 for 32×32); with the raw 1e-5 a small model's prediction is barely
protected. Small images also need a larger ``lr`` than 2e-4 (the tests use 1e-2 on 8×8 digits).

Gradient-type explanations of a ReLU network are piecewise constant in x (their input gradient is zero),
so the attack cannot move them: use ``beta_growth=(10, 100)``, which replaces every ReLU by softplus(β)
during the attack with β growing geometrically, β_i = β0·(β1/β0)^(i/N). The *final* explanations are
always evaluated on the original (ReLU) model.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, NamedTuple, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..attribution import Explainer, beta_smooth, make_explainer, preserve_model_state
from ..attribution.core import OutputSelector, check_output_selector, selected_output, target_gradient
from ..attribution.methods import Gradient, InputXGradient, model_device
from ..attribution.smoothing import UnsupportedPolicy, _check_unsupported_policy
from ..errors import InputError, ModelError, check_finite, check_tensor
from ..metrics import normalize_map, pearson

__all__ = [
    "manipulate",
    "ManipulationResult",
    "AttackStep",
    "ExplanationGradientWarning",
    "normalized_box",
    "prepare_maps",
    "DEFAULT_MAP_WEIGHT",
    "DEFAULT_GAMMA",
    "research_gamma",
    "map_term",
]

#: Weight of the map term (the seed's prefactor of MSE(explanation)).
DEFAULT_MAP_WEIGHT = 1e11
#: Output weight / map weight (the seed's 1e6 / 1e11).
DEFAULT_GAMMA = 1e-5

Box = tuple[float | torch.Tensor, float | torch.Tensor]
Norm = Literal["linf", "l2"]
MapLoss = Literal["mse", "pcc"]


def research_gamma(map_pixels: int, num_classes: int) -> float:
    """γ that gives the seed's balance of map and output terms (γ = 1e-5 at 224² map pixels, 1000 classes)
    for maps of ``map_pixels`` = H·W pixels and ``num_classes`` outputs: 1e-5 · (K/1000) · (224²/d)²."""
    _check_number("map_pixels", map_pixels, low=1, inclusive=True, integer=True)
    _check_number("num_classes", num_classes, low=2, inclusive=True, integer=True)
    return DEFAULT_GAMMA * (num_classes / 1000) * (224 * 224 / map_pixels) ** 2


class ExplanationGradientWarning(UserWarning):
    """The explanation does not change with the input (zero input-gradient): the attack cannot move it."""


class AttackStep(NamedTuple):
    """What a ``callback`` sees after each Adam step (all per-example tensors have shape (N,))."""

    iteration: int
    """Steps done so far (1 after the first step)."""
    beta: float | None
    """Softplus β used in this step (None without β-growth)."""
    loss: torch.Tensor
    """Total loss of this step (NaN for examples that had already stopped)."""
    map_loss: torch.Tensor
    output_loss: torch.Tensor
    active: torch.Tensor
    """bool: examples still being optimised after this step."""
    x_adv: torch.Tensor
    """The current manipulated inputs (N, C, H, W), detached. Do not modify."""


@dataclass
class ManipulationResult:
    """What :func:`manipulate` returns. Shapes: N examples, inputs (N, C, H, W), maps (N, H, W), K classes.

    - ``x``, ``x_adv``: original and manipulated inputs (in the model's input space).
    - ``target``: (N,) the class whose explanation was manipulated (fixed during the attack).
    - ``original_map``, ``target_map``, ``manipulated_map``: the reduced maps the loss compares (abs-sum
      normalised to sum 1, or signed channel sums with the target rescaled in ``signed`` mode);
      ``original_map`` and ``manipulated_map`` are evaluated on the original (ReLU) model.
    - ``original_explanation``, ``manipulated_explanation``: raw explanations (N, C, H, W), ReLU model.
    - ``logits``, ``logits_adv``: (N, K) model outputs at ``x`` and ``x_adv`` (ReLU model, eval mode).
    - ``history``: per-example loss curves ``{"loss", "map", "output"}``, each (N, T), recorded at the
      iterations ``history_steps`` (T,) (every ``history_every``-th step and the last); NaN after an
      example stopped.
    - ``iterations``: (N,) Adam steps taken per example; ``stopped``: (N,) bool, reached ``stop_pcc``.
    - ``settings``: the options used (JSON-serialisable), for records.
    """

    x: torch.Tensor
    x_adv: torch.Tensor
    target: torch.Tensor
    original_map: torch.Tensor
    target_map: torch.Tensor
    manipulated_map: torch.Tensor
    original_explanation: torch.Tensor
    manipulated_explanation: torch.Tensor
    logits: torch.Tensor
    logits_adv: torch.Tensor
    history: dict[str, torch.Tensor]
    history_steps: torch.Tensor
    iterations: torch.Tensor
    stopped: torch.Tensor
    settings: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.x.shape[0]

    def pcc(self) -> dict[str, torch.Tensor]:
        """Pearson correlations (N,) of the maps: ``before`` (original vs target), ``after`` (manipulated
        vs target) and ``kept`` (manipulated vs original)."""
        return {
            "before": pearson(self.original_map, self.target_map),
            "after": pearson(self.manipulated_map, self.target_map),
            "kept": pearson(self.manipulated_map, self.original_map),
        }


# ------------------------------------------------------------------------------------------------------
# validation


def normalized_box(mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixel box [0, 1] in the space of a model that reads ``(p − mean) / std``: ``(low, high)``, each
    of shape (C, 1, 1), for ``manipulate(..., box=normalized_box(mean, std))``."""
    mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
    if mean.shape != std.shape or not bool((std > 0).all()):
        raise InputError(f"mean and std must have one value per channel and std > 0, got {mean.flatten().tolist()} and {std.flatten().tolist()}.")
    return (0.0 - mean) / std, (1.0 - mean) / std


def _check_box(box: Box | None, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    if box is None:
        return None
    if not isinstance(box, (tuple, list)) or len(box) != 2:
        raise InputError(f"box must be a pair (low, high) of numbers or tensors broadcastable to one input {tuple(x.shape[1:])}, got {box!r}.")
    bounds = []
    for name, b in zip(("low", "high"), box):
        t = torch.as_tensor(b, dtype=x.dtype, device=x.device)
        try:
            ok = torch.broadcast_shapes(t.shape, x.shape[1:]) == x.shape[1:]
        except RuntimeError:
            ok = False
        if not ok:
            raise InputError(
                f"box {name} has shape {tuple(t.shape)}, which does not broadcast to one input {tuple(x.shape[1:])}; "
                "use a number or a (C, 1, 1) tensor (one bound per channel)."
            )
        bounds.append(t)
    low, high = bounds
    if not bool((low < high).all()):
        raise InputError("box low must be smaller than high everywhere.")
    return low, high


def _check_in_box(x: torch.Tensor, box: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    if box is None:
        return
    low, high = box
    tol = 1e-5 * float((high - low).max())
    below = (x < low - tol).flatten(1).any(1)
    above = (x > high + tol).flatten(1).any(1)
    bad = (below | above).nonzero().flatten().tolist()
    if bad:
        lo, hi = float(x.min()), float(x.max())
        raise InputError(
            f"x has values outside the pixel box (examples {bad[:10]}{'...' if len(bad) > 10 else ''}; values in "
            f"[{lo:.3g}, {hi:.3g}], box [{float(low.min()):.3g}, {float(high.max()):.3g}]). Pass images in [0, 1], or for a "
            "model with input normalisation the box in its normalised space: box=normalized_box(mean, std); "
            "box=None disables clamping."
        )


def _resolve_explainer(model: nn.Module, explainer: Explainer | str, options: dict[str, Any] | None) -> Explainer:
    if isinstance(explainer, str):
        return make_explainer(model, explainer, **(options or {}))
    if options:
        raise InputError("explainer_options only apply when the explainer is given by name; configure the Explainer instance instead.")
    if not isinstance(explainer, Explainer):
        raise InputError(f"explainer must be a manifex Explainer or a method name (e.g. 'gradient'), got {type(explainer).__name__}.")
    if explainer.model is not model:
        raise InputError(
            "the explainer explains a different model than the one attacked; build it on the same model, "
            "e.g. manipulate(model, Gradient(model), ...) or pass the method name."
        )
    return explainer


def _check_target_map(target_map: object, x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    shapes = list(dict.fromkeys([(n, h, w), (n, 1, h, w), (n, c, h, w)]))
    accepted = ", ".join(map(str, shapes[:-1])) + f" or {shapes[-1]}"
    t = check_tensor(target_map, "target_map")
    if tuple(t.shape) not in shapes:
        raise InputError(
            f"target_map has shape {tuple(t.shape)}; accepted shapes are {accepted} (one map per example: reduced "
            "over channels, or a raw explanation shaped like x)."
        )
    check_finite(t, "target_map")
    return t.to(device=x.device, dtype=x.dtype)


def _check_number(name: str, value: object, *, low: float, inclusive: bool = False, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or (value < low if inclusive else value <= low):
        raise InputError(f"{name} must be a finite {'integer' if integer else 'number'} {'>=' if inclusive else '>'} {low}, got {value!r}.")


# ------------------------------------------------------------------------------------------------------
# maps


def prepare_maps(explanation: torch.Tensor, *, signed: bool = False) -> torch.Tensor:
    """The map an explanation (N, H, W) or (N, C, H, W) is compared by: ``signed=False`` ``Σ_c |e|`` normalised
    to sum 1 per example (the research comparison); ``signed=True`` the signed channel sum Σ_c e, unscaled."""
    return normalize_map(explanation, "none" if signed else "abs_sum")


def _rescale_relevance(target: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """The fork's relevance preservation: scale each target map to the original map's total relevance."""
    t_sum = target.flatten(1).sum(1)
    o_sum = original.flatten(1).sum(1)
    scale = target.abs().flatten(1).sum(1)
    # A sum of n terms in floating point is off by at most n·eps·Σ|t| (the rounding bound of recursive
    # summation): a total inside that bound is indistinguishable from 0 and its sign and size are noise.
    # (A fixed 1e-9 missed mean-centred float32 maps, whose sums round to 3e-9 .. 4e-8 of Σ|t|.)
    n = target[0].numel()
    tiny = t_sum.abs() <= n * torch.finfo(target.dtype).eps * scale
    if bool(tiny.any()):
        bad = tiny.nonzero().flatten().tolist()
        raise InputError(
            f"signed mode rescales each target map to the original's total relevance, but the target maps of "
            f"examples {bad[:10]} sum to ~0; use signed=False or preserve_relevance=False."
        )
    return target * (o_sum / t_sum).view(-1, 1, 1)


def map_term(maps: torch.Tensor, target_maps: torch.Tensor, kind: MapLoss = "mse") -> torch.Tensor:
    """The map term of the attack loss per example (N,), before ``map_weight``.

    ``"mse"`` (the research loss): mean over pixels of (h − hᵗ)². ``"pcc"``: 2·var(hᵗ)·(1 − PCC(h, hᵗ)),
    the MSE that two maps with the target's mean and variance have at that correlation, so ``map_weight``
    and γ keep their meaning. It drops the MSE's push to match the map's *scale*, which the reported
    similarity (Pearson) ignores, and spends the budget on the *pattern* only (on the default LeNet at
    8/255: PCC 0.40 with ``"mse"``, 0.44 with ``"pcc"``). A constant map counts as PCC 0."""
    return _map_term_fn(kind)(maps, target_maps)


def _mse_term(maps: torch.Tensor, target_maps: torch.Tensor) -> torch.Tensor:
    return (maps - target_maps).square().flatten(1).mean(1)


def _pcc_term(maps: torch.Tensor, target_maps: torch.Tensor) -> torch.Tensor:
    variance = target_maps.flatten(1).var(1, unbiased=False)
    return 2 * variance * (1 - pearson(maps, target_maps).nan_to_num(0.0))


_MAP_TERMS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"mse": _mse_term, "pcc": _pcc_term}


def _map_term_fn(kind: object) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The map term for ``kind``, validated once (the attack loop looks it up before its first step)."""
    if kind not in _MAP_TERMS:
        raise InputError(f"map_loss must be 'mse' (the research loss) or 'pcc' (1 − Pearson correlation), got {kind!r}.")
    return _MAP_TERMS[kind]


# ------------------------------------------------------------------------------------------------------
# the attack


@contextlib.contextmanager
def _relu_model(smoothing: Any) -> Iterator[None]:
    """Temporarily lift the β-smoothing (evaluate on the original ReLU model), then reinstall it."""
    if smoothing is None:
        yield
        return
    beta = smoothing.beta
    smoothing.remove()
    try:
        yield
    finally:
        smoothing.__enter__()
        smoothing.set_beta(beta)


def _explain(explainer: Explainer, x: torch.Tensor, target: torch.Tensor, create_graph: bool) -> torch.Tensor:
    try:
        e = explainer.attribute(x, target, create_graph=create_graph)
    except TypeError as err:
        raise ModelError(f"the explainer {explainer!r} cannot be called with create_graph ({err}); it cannot be attacked.") from None
    if e.shape != x.shape:
        raise ModelError(f"the explainer {explainer!r} returned shape {tuple(e.shape)} for inputs {tuple(x.shape)}; manipulate needs maps shaped like x.")
    return e


def _explain_with_logits(explainer: Explainer, model: nn.Module, xa: torch.Tensor,
                         target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The explanation of ``xa`` (with ``create_graph``) and the model's logits at ``xa``, for one step.

    For :class:`Gradient` and :class:`InputXGradient` (exactly those classes) the explanation's own forward
    pass is the model's forward at ``xa``, so its logits are reused for the output term, as the research
    loop did: one forward (and its backward) less per step, the same values and gradients. Other explainers
    may run the model on other points (IG paths) or with modified rules (LRP), so the model is evaluated
    separately for them.
    """
    kind = type(explainer)
    if kind is Gradient or kind is InputXGradient:
        captured: list[torch.Tensor] = []

        def forward(inp: torch.Tensor) -> torch.Tensor:
            out = model(inp)
            captured.append(out)
            return out

        grad, _ = target_gradient(forward, xa, target, create_graph=True)
        h = (grad.abs() if explainer.absolute else grad) if kind is Gradient else xa * grad
        return h, captured[0]
    return _explain(explainer, xa, target, True), model(xa)


def _project(x_adv: torch.Tensor, x: torch.Tensor, epsilon: float | None, norm: Norm,
             box: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """In place: onto the per-example norm ball around x, then into the box (which keeps the ball: x is inside)."""
    if epsilon is not None:
        delta = x_adv - x
        if norm == "linf":
            delta = delta.clamp(-epsilon, epsilon)
        else:
            n = torch.linalg.vector_norm(delta.flatten(1), dim=1).view(-1, *([1] * (x.dim() - 1)))
            delta = delta * torch.clamp(epsilon / n.clamp_min(1e-30), max=1.0)
        x_adv.copy_(x + delta)
    if box is not None:
        x_adv.copy_(torch.maximum(torch.minimum(x_adv, box[1]), box[0]))


def manipulate(
    model: nn.Module,
    explainer: Explainer | str,
    x: torch.Tensor,
    target_map: torch.Tensor,
    *,
    target: int | torch.Tensor | None = None,
    explainer_options: dict[str, Any] | None = None,
    gamma: float = DEFAULT_GAMMA,
    map_weight: float = DEFAULT_MAP_WEIGHT,
    map_loss: MapLoss = "mse",
    lr: float = 2e-4,
    iterations: int = 1500,
    box: Box | None = (0.0, 1.0),
    epsilon: float | None = None,
    norm: Norm = "linf",
    signed: bool = False,
    preserve_relevance: bool = True,
    beta_growth: tuple[float, float] | None = None,
    stop_pcc: float | None = None,
    check_every: int = 10,
    eval_mode: bool = True,
    history_every: int | None = None,
    callback: Callable[[AttackStep], bool | None] | None = None,
    progress: bool = False,
    output: OutputSelector = None,
    unsupported: UnsupportedPolicy = "raise",
) -> ManipulationResult:
    """Manipulate the explanations of a batch ``x`` (N, C, H, W) towards ``target_map``; returns a
    :class:`ManipulationResult`.

    ``explainer``: an :class:`~manifex.attribution.Explainer` built on ``model`` or a registry name (with
    ``explainer_options``); it must support ``create_graph=True``. ``target_map``: (N, H, W), (N, 1, H, W)
    or (N, C, H, W) (e.g. the raw explanation of another image); it is reduced like the explanations.
    ``target``: the class explained (int or (N,)); default the model's prediction at ``x``, kept fixed.

    Loss weights: ``map_weight`` · MSE(map) + ``gamma`` · ``map_weight`` · MSE(softmax), means per example
    (see :func:`research_gamma` for images smaller than 224²); ``map_loss="pcc"`` replaces the map MSE by
    a correlation term of the same scale (:func:`map_term`). ``lr``, ``iterations``: Adam.
    ``box``: the valid input range (low, high), numbers or tensors broadcastable to one input; ``x`` must
    lie in it; ``None`` disables clamping. For a model that reads normalised inputs ``(p − mean) / std``
    pass the [0, 1] pixel box in that space: ``box=normalized_box(mean, std)``.
    ``epsilon``/``norm``: optional per-example budget ‖x_adv − x‖ ≤ ε (``"linf"`` or ``"l2"``, in the
    units of x), projected after each step. ``signed``: compare signed channel sums instead of normalised
    ``|relevance|``; with ``preserve_relevance`` each target is rescaled to the original explanation's total
    relevance (the fork's setting). ``beta_growth=(β0, β1)``: softplus(β) instead of ReLU during the attack,
    β growing geometrically from β0 to β1 (the reference output g(x) is then taken at the current β, so the
    output term measures the change caused by the perturbation, not by the smoothing). ``stop_pcc``: an example stops (its x_adv is frozen) once the
    Pearson correlation of its ReLU-model map with the target reaches it, checked every ``check_every``
    steps. ``eval_mode``: run the model in eval mode (restored afterwards). ``callback(step)`` is called
    after every step with an :class:`AttackStep`; returning True stops all examples. ``progress``: tqdm bar.
    ``output``: for a model returning a tuple or dict, which part holds the logits (index, key or callable;
    default the explainer's own ``output``); every model call of the attack then sees only the logits.
    ``unsupported``: with ``beta_growth``, what β-smoothing does with activations it cannot smooth (SELU,
    ELU with α ≠ 1, ...): "raise" (default, ModelError naming them), "warn" or "ignore" (left as they are;
    see :func:`~manifex.attribution.beta_smooth`).

    The model's state (mode, hooks, ``requires_grad``, buffers) is restored, also on error or interrupt.
    Warns :class:`ExplanationGradientWarning` if the explanation has zero input-gradient at the start.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be an nn.Module, got {type(model).__name__}.")
    check_tensor(x, "x", ndim=4)
    check_finite(x, "x")
    if x.shape[0] == 0:
        raise InputError("x is empty; pass at least one example.")
    _check_number("lr", lr, low=0.0)
    _check_number("iterations", iterations, low=1, inclusive=True, integer=True)
    _check_number("gamma", gamma, low=0.0, inclusive=True)
    _check_number("map_weight", map_weight, low=0.0)
    _check_number("check_every", check_every, low=1, inclusive=True, integer=True)
    if epsilon is not None:
        _check_number("epsilon", epsilon, low=0.0)
    _map_term_fn(map_loss)
    if norm not in ("linf", "l2"):
        raise InputError(f"norm must be 'linf' or 'l2', got {norm!r}.")
    if stop_pcc is not None:
        _check_number("stop_pcc", stop_pcc, low=-1.0)
        if stop_pcc > 1:
            raise InputError(f"stop_pcc is a Pearson correlation in (-1, 1], got {stop_pcc}.")
    if beta_growth is not None:
        if not isinstance(beta_growth, (tuple, list)) or len(beta_growth) != 2:
            raise InputError(f"beta_growth must be a pair (beta0, beta1), e.g. (10, 100), got {beta_growth!r}.")
        for b in beta_growth:
            _check_number("beta_growth values", b, low=0.0)
    _check_unsupported_policy(unsupported)
    history_every = max(1, iterations // 100) if history_every is None else history_every
    _check_number("history_every", history_every, low=1, inclusive=True, integer=True)

    explainer = _resolve_explainer(model, explainer, explainer_options)
    output = check_output_selector(explainer.output if output is None else output)
    dev = model_device(model)
    if dev is not None:
        x = x.to(dev)
    x = x.detach()
    n = x.shape[0]
    tmap_raw = _check_target_map(target_map, x)
    bounds = _check_box(box, x)
    _check_in_box(x, bounds)

    settings = {
        "explainer": repr(explainer), "gamma": gamma, "map_weight": map_weight, "map_loss": map_loss, "lr": lr, "iterations": iterations,
        "box": None if box is None else [b.tolist() if isinstance(b, torch.Tensor) else b for b in box],
        "epsilon": epsilon, "norm": norm, "signed": signed, "preserve_relevance": preserve_relevance,
        "beta_growth": None if beta_growth is None else list(beta_growth), "stop_pcc": stop_pcc,
        "check_every": check_every, "eval_mode": eval_mode, "unsupported": unsupported,
    }

    with preserve_model_state(model), selected_output(model, output):
        if eval_mode:
            model.eval()
        for p in model.parameters():  # only the input is optimised: no parameter graphs
            p.requires_grad_(False)

        with torch.no_grad():
            logits = model(x)
        if logits.dim() != 2 or logits.shape[1] < 2:
            raise ModelError(f"manipulate needs a classifier returning (N, K) logits with K >= 2, got shape {tuple(logits.shape)}.")
        if target is None:
            target_idx = logits.argmax(1)
        else:
            target_idx = torch.as_tensor(target, device=x.device)
            if target_idx.is_floating_point() or target_idx.dim() > 1:
                raise InputError(f"target must be a class index or a (N,) tensor of indices, got {target!r}.")
            target_idx = target_idx.long().expand(n).clone()
            if bool(((target_idx < 0) | (target_idx >= logits.shape[1])).any()):
                raise InputError(f"target classes must lie in [0, {logits.shape[1] - 1}].")

        original_expl = _explain(explainer, x, target_idx, False)
        original_map = prepare_maps(original_expl, signed=signed)
        tmap = prepare_maps(tmap_raw, signed=signed)
        if signed and preserve_relevance:
            tmap = _rescale_relevance(tmap, original_map)
        tmap = tmap.detach()

        x_adv, iters, stopped, history, steps = _optimise(
            model, explainer, x, target_idx, tmap, logits,
            gamma=gamma, map_weight=map_weight, map_loss_kind=map_loss, lr=lr, iterations=iterations, bounds=bounds, epsilon=epsilon,
            norm=norm, signed=signed, beta_growth=beta_growth, stop_pcc=stop_pcc, check_every=check_every,
            history_every=history_every, callback=callback, progress=progress, unsupported=unsupported,
        )

        manipulated_expl = _explain(explainer, x_adv, target_idx, False)
        with torch.no_grad():
            logits_adv = model(x_adv)
    return ManipulationResult(
        x=x, x_adv=x_adv, target=target_idx,
        original_map=original_map.detach(), target_map=tmap,
        manipulated_map=prepare_maps(manipulated_expl, signed=signed).detach(),
        original_explanation=original_expl.detach(), manipulated_explanation=manipulated_expl.detach(),
        logits=logits.detach(), logits_adv=logits_adv.detach(),
        history=history, history_steps=steps, iterations=iters, stopped=stopped, settings=settings,
    )


def _optimise(
    model: nn.Module,
    explainer: Explainer,
    x: torch.Tensor,
    target: torch.Tensor,
    tmap: torch.Tensor,
    logits: torch.Tensor,
    *,
    gamma: float,
    map_weight: float,
    map_loss_kind: MapLoss,
    lr: float,
    iterations: int,
    bounds: tuple[torch.Tensor, torch.Tensor] | None,
    epsilon: float | None,
    norm: Norm,
    signed: bool,
    beta_growth: tuple[float, float] | None,
    stop_pcc: float | None,
    check_every: int,
    history_every: int,
    callback: Callable[[AttackStep], bool | None] | None,
    progress: bool,
    unsupported: UnsupportedPolicy = "raise",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """The Adam loop; returns x_adv, iterations (N,), stopped (N,), history, history steps."""
    n = x.shape[0]
    x_adv = x.clone().requires_grad_(True)
    opt = torch.optim.Adam([x_adv], lr=lr)
    active = torch.ones(n, dtype=torch.bool, device=x.device)
    stopped = torch.zeros(n, dtype=torch.bool, device=x.device)
    iters = torch.full((n,), iterations, dtype=torch.long)
    probs0 = torch.softmax(logits, dim=1)
    nan = torch.full((n,), math.nan, dtype=x.dtype, device=x.device)
    records: dict[str, list[torch.Tensor]] = {"loss": [], "map": [], "output": []}
    steps: list[int] = []
    smoothing = beta_smooth(model, beta_growth[0], unsupported=unsupported) if beta_growth is not None else None
    bar = tqdm(total=iterations, disable=not progress, desc="manipulate", leave=False)

    term = _map_term_fn(map_loss_kind)
    all_rows = torch.arange(n, device=x.device)
    n_active = n
    with smoothing if smoothing is not None else contextlib.nullcontext(), bar:
        for i in range(iterations):
            beta = None
            if smoothing is not None:
                b0, b1 = beta_growth
                beta = b0 * (b1 / b0) ** (i / iterations)
                smoothing.set_beta(beta)
            all_active = n_active == n
            idx = all_rows if all_active else active.nonzero().flatten()
            sel = slice(None) if all_active else idx  # the active examples' rows (a view while all are active)

            h, out = _explain_with_logits(explainer, model, x_adv[sel], target[sel])
            if not h.requires_grad:
                raise ModelError(
                    f"the explanation of {explainer!r} does not depend differentiably on the input (no graph with "
                    "create_graph=True), so it cannot be manipulated by gradient descent; use a gradient-based method."
                )
            if not bool(torch.isfinite(h).all()):
                raise ModelError(f"the explanation became NaN/inf at iteration {i}; lower lr or use a smoother model (beta_growth).")
            hm = prepare_maps(h, signed=signed)
            map_loss = map_weight * term(hm, tmap[sel])
            if smoothing is not None:  # the output change caused by the perturbation, at the current β
                with torch.no_grad():
                    p0 = torch.softmax(model(x[sel]), dim=1)
            else:
                p0 = probs0[sel]
            out_loss = gamma * map_weight * (torch.softmax(out, dim=1) - p0).square().mean(1)
            loss = map_loss + out_loss
            if i == 0:
                _warn_if_flat(map_loss, x_adv, idx)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            frozen = None if all_active else x_adv.detach()[~active].clone()
            opt.step()
            with torch.no_grad():
                _project(x_adv, x, epsilon, norm, bounds)
                if frozen is not None:  # Adam's momentum would still move finished examples
                    x_adv[~active] = frozen

            done_now = i + 1
            if stop_pcc is not None and (done_now % check_every == 0 or done_now == iterations):
                with _relu_model(smoothing), torch.no_grad():
                    e = _explain(explainer, x_adv.detach()[sel], target[sel], False)
                    reached = pearson(prepare_maps(e, signed=signed), tmap[sel]) >= stop_pcc
                hit = idx[reached]
                stopped[hit] = True
                active[hit] = False
                iters[hit.cpu()] = done_now
                n_active -= len(hit)
            record = done_now % history_every == 0 or done_now == iterations or n_active == 0
            if record or callback is not None:  # per-example values, NaN for examples stopped before this step
                total, ml, ol = nan.clone(), nan.clone(), nan.clone()
                total[idx], ml[idx], ol[idx] = loss.detach(), map_loss.detach(), out_loss.detach()
            if record:
                steps.append(done_now)
                records["loss"].append(total)
                records["map"].append(ml)
                records["output"].append(ol)
            bar.update(1)
            if progress and done_now % 10 == 0:
                bar.set_postfix(loss=f"{float(loss.detach().mean()):.3g}", active=n_active)
            stop_all = False
            if callback is not None:
                stop_all = bool(callback(AttackStep(done_now, beta, total, ml, ol, active.clone(), x_adv.detach())))
            if stop_all:
                iters[active.cpu()] = done_now
                break
            if n_active == 0:
                break
    history = {k: torch.stack(v, dim=1) if v else x.new_empty(n, 0) for k, v in records.items()}
    return x_adv.detach(), iters, stopped.cpu(), history, torch.tensor(steps, dtype=torch.long)


def _warn_if_flat(map_loss: torch.Tensor, x_adv: torch.Tensor, idx: torch.Tensor) -> None:
    """Warn when the map term has zero input-gradient for examples whose map still differs from the target."""
    (g,) = torch.autograd.grad(map_loss.sum(), x_adv, retain_graph=True, allow_unused=True)
    if g is None:
        flat = torch.ones(len(idx), dtype=torch.bool, device=x_adv.device)
    else:
        flat = g[idx].flatten(1).abs().amax(1) == 0
    flat &= map_loss.detach() > 0
    if bool(flat.any()):
        bad = idx[flat].tolist()
        warnings.warn(
            f"explanation has zero input-gradient for {len(bad)} of {len(idx)} examples ({bad[:10]}"
            f"{'...' if len(bad) > 10 else ''}): the attack cannot change their explanation, only the output term "
            "acts. A ReLU network's gradient-type explanation (gradient, guided backprop) is piecewise constant; "
            "use beta_growth=(10, 100) (softplus during the attack) or a smooth model.",
            ExplanationGradientWarning,
            stacklevel=3,
        )
