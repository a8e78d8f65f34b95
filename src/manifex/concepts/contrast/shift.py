"""The shifting test and the patch test: do the class hyperplanes and concepts *cause* the prediction?

Shifting test (Herdt & Otero Baguer): replace a layer's output a by ReLU(a + t·w_AB) at every position (a
temporary forward hook) for the images the model predicts as A, along the A→B normal w_AB, for
t ∈ {0, 0.5, 1, 2, 10, 15, 20, 35, 50, 200}; record the mean softmax p(B)(t) and p(A)(t) over the images.
A *swap* = max_t p(B)(t) > 0.5 and p(B) ≥ p(A) at that same t (the research code read p(A) one step early;
fixed here); the first t where p(B) > 0.5 and p(B) ≥ p(A) is where the prediction swaps. The control repeats
the test along random directions of the same norm as w_AB.

The ReLU keeps a post-ReLU layer in its range and is the identity at t = 0 only there. On a layer with negative
activations (a convolution or BatchNorm before its ReLU, Tanh, ELU, LeakyReLU) ``relu=False`` shifts purely,
a + t·w (the research code's ``use_relu=False``); :func:`shifting_test` picks that by default for such a layer.

Patch test (the research's Malamute/Husky experiment, generalised): paste a patch (a concept's prototype crop,
or any image region) into images of class B at a position; compare p(A), p(B) with a mean-colour patch of the
same size at the same place.

All shifted copies (every t × every direction × every image) run as one stream of batches through the model;
the hook adds each row's own t·direction.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ...attribution.core import (
    OutputSelector,
    call_model,
    check_model_input,
    check_output_selector,
    preserve_model_state,
    selected_output,
    warn_if_training,
)
from ...attribution.layer import check_layer_shape, resolve_layer
from ...attribution.methods import model_device
from ...errors import InputError, ModelError
from .hyperplanes import check_pair, negative_layer_message

__all__ = ["T_GRID", "ShiftResult", "shifted_layer", "shift_probabilities", "shifting_test", "random_directions",
           "swap", "first_swap", "swap_t", "PatchResult", "patch_test", "paste"]

#: The research's shift sizes t.
T_GRID: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 10.0, 15.0, 20.0, 35.0, 50.0, 200.0)


@contextlib.contextmanager
def shifted_layer(model: nn.Module, layer: str | nn.Module, shift: torch.Tensor | None, *, relu: bool = True) -> Iterator[dict]:
    """Within the block, ``layer``'s output a becomes ReLU(a + shift) (a + shift with ``relu=False``; ``shift``
    broadcast over positions: (channels,) or (N, channels) for per-row shifts, set or replaced through the
    yielded dict's "shift" key).

    The hook is removed and the model's state restored when the block ends, also on an exception.
    """
    module, name = resolve_layer(model, layer)
    state: dict[str, Any] = {"shift": shift, "calls": 0}

    def hook(mod, args, out):
        if not isinstance(out, torch.Tensor):
            raise ModelError(f"layer {name!r} returns {type(out).__name__}, not a tensor; choose a layer with one tensor output.")
        state["calls"] += 1
        s = state["shift"]
        if s is None:
            return None
        s = s.to(out)
        if state.get("repeat", 1) > 1:  # every image once per shift: rows [shift 0: images..., shift 1: images..., ...]
            out = out.repeat(state["repeat"], *([1] * (out.dim() - 1)))
        if s.dim() == 1:
            s = s[None]
        if out.dim() == 4:
            s = s[:, :, None, None]
        return torch.relu(out + s) if relu else out + s

    with preserve_model_state(model):
        handle = module.register_forward_hook(hook)
        try:
            yield state
        finally:
            handle.remove()


def swap(p_a: torch.Tensor, p_b: torch.Tensor, threshold: float = 0.5) -> tuple[bool, int]:
    """(swapped, index of t): the t with the largest p(B); a swap when p(B) there > ``threshold`` and ≥ p(A) at the same t."""
    k = int(p_b.argmax())
    return bool(p_b[k] > threshold and p_b[k] >= p_a[k]), k


def first_swap(p_a: Sequence[float] | torch.Tensor, p_b: Sequence[float] | torch.Tensor, threshold: float = 0.5) -> int | None:
    """Index of the first t where p(B) > ``threshold`` and p(B) ≥ p(A): where the prediction swaps to B
    (``None`` if it never does). A pair that :func:`swap` calls swapped always has one, at or before the argmax."""
    for k, (pa, pb) in enumerate(zip(torch.as_tensor(p_a).tolist(), torch.as_tensor(p_b).tolist())):
        if pb > threshold and pb >= pa:
            return k
    return None


def random_directions(w: torch.Tensor, n: int, *, seed: int = 0) -> torch.Tensor:
    """(n, channels): Gaussian directions scaled to ‖w‖ (seeded, drawn on the CPU in float64 for reproducibility)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, w.shape[-1], generator=g, dtype=torch.float64)
    r = r / r.norm(dim=1, keepdim=True) * float(w.double().norm())
    return r.to(dtype=w.dtype, device=w.device)


@torch.no_grad()
def shift_probabilities(model: nn.Module, x: torch.Tensor, layer: str | nn.Module, directions: torch.Tensor,
                        ts: Sequence[float] = T_GRID, *, batch_size: int = 256, reuse_prefix: bool = True,
                        max_rows: int = 4096, relu: bool = True, output: OutputSelector = None,
                        softmax: bool = True) -> torch.Tensor:
    """Mean softmax over the images ``x`` when ``layer``'s output a is replaced by ReLU(a + t·d) (a + t·d with
    ``relu=False``): (D, T, classes) for ``directions`` (D, channels) and the shift sizes ``ts`` (T,).
    ``output``: which part of a tuple/dict model output holds the logits (as in ``explain``); ``softmax=False``
    for a model that already returns probabilities (they are averaged as they are).

    ``reuse_prefix``: run the model up to the layer once per image and let the hook hand every shifted copy
    (up to ``max_rows`` rows per call) to the rest of the network, which is exact when the layers after
    ``layer`` treat the batch rows independently (any feed-forward net in eval mode). When the rest does not
    accept the larger batch (a skip connection around the layer, a reshape by the input's batch size) it
    falls back to running every shifted copy through the whole model (``batch_size`` rows per call).
    """
    if directions.dim() == 1:
        directions = directions[None]
    ts_t = torch.as_tensor([float(t) for t in ts], dtype=directions.dtype, device=directions.device)
    D, T, N = directions.shape[0], ts_t.shape[0], x.shape[0]
    K = D * T
    shifts = (ts_t[None, :, None] * directions[:, None, :]).reshape(K, -1)  # (D·T, channels)
    dev = model_device(model)
    sums = None
    with shifted_layer(model, layer, None, relu=relu) as state, selected_output(model, output):
        if reuse_prefix and K > 1:
            m = max(1, max_rows // K)
            try:
                for s in range(0, N, m):
                    xb = x[s : s + m]
                    xb = xb.to(dev) if dev is not None else xb
                    state["repeat"], state["shift"] = K, shifts.repeat_interleave(xb.shape[0], 0)
                    out = model(xb)
                    if not isinstance(out, torch.Tensor) or out.shape[0] != K * xb.shape[0]:
                        raise RuntimeError("the rows of the output do not follow the shifted rows")
                    p = (torch.softmax(out.double(), dim=1) if softmax else out.double()).reshape(K, xb.shape[0], -1).sum(1)
                    sums = p if sums is None else sums + p
                return (sums / N).reshape(D, T, -1)
            except RuntimeError:
                sums = None  # the rest of the model mixes rows with tensors from before the layer: no reuse
            finally:
                state["repeat"] = 1
        total = K * N
        for s in range(0, total, batch_size):
            k = torch.arange(s, min(s + batch_size, total))
            combo, img = k // N, k % N                                 # row k: shift combo, image img
            xb = x[img.to(x.device)]
            xb = xb.to(dev) if dev is not None else xb
            state["shift"] = shifts[combo.to(shifts.device)]
            out = call_model(model, xb).double()
            p = torch.softmax(out, dim=1) if softmax else out
            if sums is None:
                sums = torch.zeros(K, p.shape[1], dtype=torch.float64, device=p.device)
            sums.index_add_(0, combo.to(p.device), p)
    return (sums / N).reshape(D, T, -1)


@dataclass
class ShiftResult:
    """One pair's shifting test: ``p_a``, ``p_b`` (T,) along w_AB; ``control_p_a``, ``control_p_b``
    (R, T) along R random directions of the same norm; ``swapped`` / ``control_swapped`` (R,);
    ``t_index``: the t of the largest p(B); ``first_swap``: the first t where the prediction swaps to B;
    ``relu``: whether the shift was ReLU(a + t·w) (else a + t·w); ``probabilities``: the model returns
    probabilities (a softmax head), used as they are instead of a softmax of its outputs."""

    a: int
    b: int
    ts: list[float]
    p_a: torch.Tensor
    p_b: torch.Tensor
    swapped: bool
    t_index: int
    control_p_a: torch.Tensor
    control_p_b: torch.Tensor
    control_swapped: torch.Tensor
    n_images: int
    norm: float
    extra: dict[str, Any] = field(default_factory=dict)
    relu: bool = True
    threshold: float = 0.5
    probabilities: bool = False

    @property
    def control_swap_rate(self) -> float:
        """Share of the random directions that swapped; NaN without any (``n_random=0``: no control)."""
        return float(self.control_swapped.float().mean()) if self.control_swapped.numel() else float("nan")

    @property
    def first_swap(self) -> int | None:
        """Index of the first t where p(B) > threshold and p(B) ≥ p(A) (``None`` if the pair did not swap)."""
        return first_swap(self.p_a, self.p_b, self.threshold) if self.swapped else None

    def to_record(self) -> dict[str, Any]:
        """A JSON record: ``t_swap`` is the first t where the prediction swaps (null without a swap),
        ``t_max_p_b`` the t of the largest p(B); ``control_swap_rate`` is null without random directions."""
        k = self.first_swap
        return {"a": self.a, "b": self.b, "ts": list(self.ts), "p_a": self.p_a.tolist(), "p_b": self.p_b.tolist(),
                "swapped": self.swapped, "t_swap": None if k is None else self.ts[k], "t_max_p_b": self.ts[self.t_index],
                "control_p_a": self.control_p_a.tolist(), "control_p_b": self.control_p_b.tolist(),
                "control_swapped": self.control_swapped.tolist(),
                "control_swap_rate": self.control_swap_rate if self.control_swapped.numel() else None,
                "n_images": self.n_images, "norm": self.norm, "shift": "relu" if self.relu else "linear",
                "outputs": "probabilities" if self.probabilities else "logits", **self.extra}


def _check_images(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise InputError(f"{name} must be a float tensor of images (N, C, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}.")
    if x.shape[0] == 0:
        raise InputError(f"{name} holds no images.")
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"{name} contains NaN/inf pixel values; clean the images first.")
    return x


#: Rows of a softmax head sum to 1 up to float32 rounding, at most ~classes · 2⁻²⁴ ≪ 1e-4 for any practical
#: number of classes; logits summing to 1 within 1e-4 on every image of A (and all ≥ 0) do not happen by chance.
_PROB_TOL = 1e-4


def shifting_test(model: nn.Module, x_a: torch.Tensor, layer: str | nn.Module, direction: torch.Tensor, a: int, b: int, *,
                  ts: Sequence[float] = T_GRID, n_random: int = 10, seed: int = 0, threshold: float = 0.5,
                  batch_size: int = 256, relu: bool | None = None, output: OutputSelector = None) -> ShiftResult:
    """Shift ``layer``'s output of the images ``x_a`` (those predicted A) along ``direction`` (w_AB, (channels,))
    and along ``n_random`` random directions of the same norm; p(A), p(B) per t and the swap of each.

    ``relu``: shift to ReLU(a + t·w) (the research's default, for a post-ReLU layer) or to a + t·w (``False``,
    the research's ``use_relu=False``); ``None`` picks ReLU when the layer's output on ``x_a`` is non-negative,
    else the pure shift — either way t = 0 leaves the output unchanged. ``relu=True`` on a layer with negative
    activations is refused. ``output``: which part of a tuple/dict model output holds the logits (as in
    ``explain``). The model's train/eval flags, ``requires_grad``, buffers and hooks are left as found (a model
    in train mode gets the explainers' TrainModeWarning).

    Checks before the work: A ≠ B and both in range, the images' dtype equal to the model's and their shape
    accepted by the model, the layer's output (N, C, H, W) or (N, C) with as many channels as ``direction``,
    finite direction and images, ``ts`` finite.
    """
    output = check_output_selector(output)
    x_a = _check_images(x_a, "x_a")
    module, name = resolve_layer(model, layer)
    x_a = check_model_input(model, x_a, "x_a")
    if relu is not None and not isinstance(relu, bool):
        raise InputError(f"relu must be True, False or None (pick from the layer's sign), got {relu!r}.")
    ts = [float(t) for t in ts]
    if not ts or not all(math.isfinite(t) for t in ts):
        raise InputError(f"ts must be a non-empty sequence of finite shift sizes, got {ts}.")
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 0:
        raise InputError(f"n_random must be an int >= 0, got {n_random!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}.")
    warn_if_training(model)
    with preserve_model_state(model), selected_output(model, output):
        # one pass over A's images (a small fraction of the test's D·T passes): the logits, the layer's shape and sign
        captured: list[torch.Tensor] = []
        logits: list[torch.Tensor] = []
        h = module.register_forward_hook(lambda m, i, o: captured.append(o.detach() if isinstance(o, torch.Tensor) else o))
        try:
            with torch.no_grad():
                for s in range(0, x_a.shape[0], batch_size):
                    n_before = len(captured)
                    logits.append(call_model(model, x_a[s : s + batch_size]))
                    if len(captured) - n_before != 1:
                        raise ModelError(f"layer {name!r} runs {len(captured) - n_before} times per forward; the shifting test "
                                         "needs a layer that runs once.")
        finally:
            h.remove()
        out = logits[0]
        if out.dim() != 2:
            raise ModelError(f"the shifting test needs a model that returns logits (N, classes), got {tuple(out.shape)}.")
        # a softmax head: its outputs are probabilities already (a second softmax would squash p(B) below 0.5)
        outs = torch.cat(logits).double()
        probabilities = bool((outs >= 0).all()) and bool(((outs.sum(1) - 1).abs() <= _PROB_TOL).all())
        if not isinstance(captured[0], torch.Tensor):
            raise ModelError(f"layer {name!r} returns {type(captured[0]).__name__}, not a tensor; choose a layer with one tensor output.")
        check_layer_shape(tuple(captured[0].shape), name, what="the shifting test")
        a, b = check_pair(a, b, out.shape[1])
        channels = captured[0].shape[1]
        if not isinstance(direction, torch.Tensor) or direction.dim() != 1 or direction.shape[0] != channels:
            raise InputError(f"direction must be a (channels,) = ({channels},) tensor for layer {name!r}, got "
                             f"{tuple(direction.shape) if isinstance(direction, torch.Tensor) else type(direction).__name__}.")
        if not direction.is_floating_point() or not bool(torch.isfinite(direction).all()):
            raise InputError("direction must be a float tensor without NaN/inf values; check the hyperplanes.")
        minimum = min(float(c.min()) for c in captured)
        if relu is None:
            relu = minimum >= 0
        elif relu and minimum < 0:
            raise InputError(negative_layer_message(name, minimum, "the shift ReLU(a + t·w) (the identity at t = 0 only "
                                                    "then)") + " Or pass relu=False for the pure shift a + t·w.")
        w = direction.detach().to(device=x_a.device, dtype=captured[0].dtype)
        dirs = torch.cat([w[None], random_directions(w, n_random, seed=seed)]) if n_random else w[None]
        P = shift_probabilities(model, x_a, module, dirs, ts, batch_size=batch_size, relu=relu, softmax=not probabilities).cpu()
    p_a, p_b = P[:, :, a], P[:, :, b]
    swaps = [swap(p_a[d], p_b[d], threshold) for d in range(P.shape[0])]
    return ShiftResult(a=a, b=b, ts=ts, p_a=p_a[0], p_b=p_b[0], swapped=swaps[0][0], t_index=swaps[0][1],
                       control_p_a=p_a[1:], control_p_b=p_b[1:], control_swapped=torch.tensor([s for s, _ in swaps[1:]], dtype=torch.bool),
                       n_images=int(x_a.shape[0]), norm=float(w.norm()), relu=bool(relu), threshold=float(threshold),
                       probabilities=probabilities)


# ------------------------------------------------------------------------------------------------ patch test
def paste(x: torch.Tensor, patch: torch.Tensor, position: tuple[int, int] | str = "bottom-right") -> torch.Tensor:
    """Copies of ``x`` (N, C, H, W) with ``patch`` (C, h, w) pasted with its top-left corner at ``position``
    = (top, left), or "bottom-right" / "top-left" / "center"."""
    C, h, w = patch.shape
    H, W = x.shape[2:]
    if C != x.shape[1] or h > H or w > W:
        raise InputError(f"the patch {tuple(patch.shape)} does not fit images {tuple(x.shape[1:])} (same channels, at most the image size).")
    if isinstance(position, str):
        named = {"bottom-right": (H - h, W - w), "top-left": (0, 0), "center": ((H - h) // 2, (W - w) // 2)}
        if position not in named:
            raise InputError(f"position must be (top, left) or one of {', '.join(named)}, got {position!r}.")
        position = named[position]
    top, left = (int(v) for v in position)
    if not (0 <= top <= H - h and 0 <= left <= W - w):
        raise InputError(f"position {(top, left)} puts the {h}×{w} patch outside the {H}×{W} image; use 0 ≤ top ≤ {H - h}, 0 ≤ left ≤ {W - w}.")
    out = x.clone()
    out[:, :, top : top + h, left : left + w] = patch.to(x)
    return out


@dataclass
class PatchResult:
    """Mean p(A), p(B) over the images of B with the patch (``p_a``, ``p_b``) and with a mean-colour patch of
    the same size and place (``control_p_a``, ``control_p_b``); ``flipped``: share of images whose argmax became A."""

    a: int
    b: int
    p_a: float
    p_b: float
    control_p_a: float
    control_p_b: float
    flipped: float
    control_flipped: float
    position: tuple[int, int]
    n_images: int

    def to_record(self) -> dict[str, Any]:
        return dict(self.__dict__, position=list(self.position))


@torch.no_grad()
def patch_test(model: nn.Module, x_b: torch.Tensor, patch: torch.Tensor, a: int, b: int, *,
               position: tuple[int, int] | str = "bottom-right", control_colour: torch.Tensor | None = None,
               batch_size: int = 256, output: OutputSelector = None) -> PatchResult:
    """Paste ``patch`` (C, h, w) into the images ``x_b`` (of class B) at ``position``; mean p(A), p(B) against a
    patch filled with ``control_colour`` (C,) (default: the images' mean colour, per channel). ``output``: which
    part of a tuple/dict model output holds the logits (as in ``explain``)."""
    output = check_output_selector(output)
    x_b = _check_images(x_b, "x_b")
    x_b = check_model_input(model, x_b, "x_b")
    if not isinstance(patch, torch.Tensor) or patch.dim() != 3 or not bool(torch.isfinite(patch).all()):
        raise InputError(f"patch must be a finite (C, h, w) tensor, got {tuple(patch.shape) if isinstance(patch, torch.Tensor) else type(patch).__name__}.")
    dev = model_device(model)
    warn_if_training(model)
    with preserve_model_state(model), selected_output(model, output):
        out = call_model(model, x_b[:1])
        if out.dim() != 2:
            raise ModelError(f"the patch test needs a model that returns logits (N, classes), got {getattr(out, 'shape', type(out))}.")
        a, b = check_pair(a, b, out.shape[1])
        colour = x_b.mean((0, 2, 3)) if control_colour is None else torch.as_tensor(control_colour, dtype=x_b.dtype).reshape(-1)
        if colour.shape[0] != patch.shape[0]:
            raise InputError(f"control_colour needs {patch.shape[0]} channel values, got {colour.shape[0]}.")
        plain = colour[:, None, None].expand_as(patch)
        probs = []
        for p in (patch, plain):
            xs = paste(x_b, p, position)
            chunks = [torch.softmax(call_model(model, xs[s : s + batch_size].to(dev) if dev is not None else xs[s : s + batch_size]).double(), 1).cpu()
                      for s in range(0, xs.shape[0], batch_size)]
            probs.append(torch.cat(chunks))
    H, W = x_b.shape[2:]
    pos = position if not isinstance(position, str) else {"bottom-right": (H - patch.shape[1], W - patch.shape[2]), "top-left": (0, 0),
                                                          "center": ((H - patch.shape[1]) // 2, (W - patch.shape[2]) // 2)}[position]
    (pp, pc) = probs
    return PatchResult(a=a, b=b, p_a=float(pp[:, a].mean()), p_b=float(pp[:, b].mean()), control_p_a=float(pc[:, a].mean()),
                       control_p_b=float(pc[:, b].mean()), flipped=float((pp.argmax(1) == a).double().mean()),
                       control_flipped=float((pc.argmax(1) == a).double().mean()), position=tuple(int(v) for v in pos),
                       n_images=int(x_b.shape[0]))


def swap_t(record: dict) -> float | None:
    """The first t where the pair's prediction swaps to B (``None`` without a swap), from its curves: also right
    for records of older runs, whose ``t_swap`` held the t of the largest p(B)."""
    if not record["swapped"]:
        return None
    k = first_swap(record["p_a"], record["p_b"], record.get("threshold", 0.5))
    return None if k is None else float(record["ts"][k])
