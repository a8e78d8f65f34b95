"""One interface for every generator a user brings: ``encode(x) → z``, ``decode(z) → x``.

Directions, once and precisely (every adapter below translates into these):

* **manifex** — ``encode`` maps data x (N, *x_shape) to latent codes z; ``decode`` maps z back to data.
  z is a batch-first tensor of any shape, or a list of batch-first tensors (multi-scale flows).
* **normflows** — ``NormalizingFlow.forward`` / ``forward_and_log_det`` and ``MultiscaleFlow.forward_and_log_det``
  map z → x (generation); ``inverse`` / ``inverse_and_log_det`` map x → z. (``MultiscaleFlow.forward(x)`` is the
  negative log-likelihood, not a transformation.) So encode = ``inverse_and_log_det``, decode = ``forward_and_log_det``.
* **FrEIA** — ``inn(x)`` maps x → z and returns ``(z, log|det ∂z/∂x|)``; ``inn(z, rev=True)`` maps z → x.
  So encode = ``inn(x)``, decode = ``inn(z, rev=True)``.

A :class:`Generator` is *exact* when decode ∘ encode is the identity (a bijection: flows). VAEs, autoencoders and
GANs are approximate: their reconstruction decode(encode(x)) differs from x, which :meth:`Generator.round_trip`
measures and :meth:`Generator.check_round_trip` reports with an :class:`ApproximateGeneratorWarning`.

A decoder-only generator (a GAN) is encoded by :func:`invert_generator` — the research setting: Adam (lr 0.1) on z,
MSE(clip(G(z)), x) per example until it falls below 1e-3 or 3000 steps pass; batched, each example stops on its own.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

import torch
from torch import nn

from ..errors import InputError, ModelError, check_finite, check_tensor

__all__ = [
    "Latent",
    "Generator",
    "GENERATOR_KINDS",
    "ApproximateGeneratorWarning",
    "Inversion",
    "as_generator",
    "invert_generator",
    "flatten_latent",
    "unflatten_latent",
    "latent_rows",
]

Latent = Union[torch.Tensor, list]
GENERATOR_KINDS = ("flow", "vae", "autoencoder", "gan", "custom")


class ApproximateGeneratorWarning(UserWarning):
    """decode(encode(x)) differs from x by more than the tolerance: the generator is approximate here."""


# ----------------------------------------------------------------------------------------------------------------
# Latents: a tensor or a list of tensors, all batch-first.
# ----------------------------------------------------------------------------------------------------------------


def _parts(z: Latent) -> list[torch.Tensor]:
    if isinstance(z, torch.Tensor):
        return [z]
    if isinstance(z, (list, tuple)) and len(z) > 0 and all(isinstance(t, torch.Tensor) for t in z):
        return list(z)
    raise InputError(
        f"a latent code must be a batch-first tensor or a non-empty list of batch-first tensors, got {type(z).__name__}."
    )


def flatten_latent(z: Latent) -> torch.Tensor:
    """A latent (tensor, or list of multi-scale tensors) as one (N, k) tensor, parts concatenated in order."""
    parts = _parts(z)
    n = parts[0].shape[0]
    if any(p.shape[0] != n for p in parts):
        raise InputError(f"the parts of a multi-scale latent disagree on the batch size: {[tuple(p.shape) for p in parts]}.")
    return torch.cat([p.reshape(n, -1) for p in parts], dim=1)


def unflatten_latent(v: torch.Tensor, like: Latent) -> Latent:
    """Inverse of :func:`flatten_latent`: (N, k) → the structure of ``like`` (its shapes after the batch axis)."""
    parts = _parts(like)
    sizes = [math.prod(p.shape[1:]) for p in parts]
    if v.dim() != 2 or v.shape[1] != sum(sizes):
        raise InputError(f"flat latent must have shape (N, {sum(sizes)}), got {tuple(v.shape)}.")
    out = [c.reshape(v.shape[0], *p.shape[1:]) for c, p in zip(v.split(sizes, dim=1), parts)]
    return out[0] if isinstance(like, torch.Tensor) else out


def latent_rows(z: Latent, index: Any) -> Latent:
    """Rows ``index`` of every part of a latent (same structure)."""
    if isinstance(z, torch.Tensor):
        return z[index]
    return [p[index] for p in z]


def _detach(z: Latent) -> Latent:
    return z.detach() if isinstance(z, torch.Tensor) else [p.detach() for p in z]


def _check_finite_latent(z: Latent, what: str) -> None:
    for i, p in enumerate(_parts(z)):
        if not bool(torch.isfinite(p.detach()).all()):
            bad = (~torch.isfinite(p.detach())).reshape(p.shape[0], -1).any(1).nonzero().flatten().tolist()
            part = f" (part {i} of the multi-scale latent)" if not isinstance(z, torch.Tensor) else ""
            raise ModelError(
                f"{what} produced non-finite values{part} for examples {bad[:10]}; the generator is not invertible "
                "there — check that x lies in the range the generator was trained on (e.g. pixels in [0, 1]) and "
                "that the flow's weights are finite."
            )


# ----------------------------------------------------------------------------------------------------------------
# The interface
# ----------------------------------------------------------------------------------------------------------------


class Generator:
    """A generative model seen as ``encode(x) → z`` and ``decode(z) → x`` (see the module docstring for directions).

    ``exact``: True when decode ∘ encode is the identity (bijections). ``kind``: one of
    ``"flow" | "vae" | "autoencoder" | "gan" | "custom"``. ``log_prob(x)`` (flows): natural-log density of x,
    shape (N,). ``module``: the wrapped ``nn.Module`` (or None); ``device`` follows its parameters.
    ``encode`` checks that z is finite and raises :class:`ModelError` otherwise.
    """

    def __init__(
        self,
        encode: Callable[[torch.Tensor], Latent],
        decode: Callable[[Latent], torch.Tensor],
        *,
        exact: bool = False,
        kind: str = "custom",
        log_prob: Callable[[torch.Tensor], torch.Tensor] | None = None,
        module: nn.Module | None = None,
        device: torch.device | str | None = None,
        name: str | None = None,
    ) -> None:
        if not callable(encode) or not callable(decode):
            raise InputError("Generator needs callable encode and decode.")
        if kind not in GENERATOR_KINDS:
            raise InputError(f"kind must be one of {GENERATOR_KINDS}, got {kind!r}.")
        self._encode, self._decode, self._log_prob = encode, decode, log_prob
        self.exact, self.kind, self.module = bool(exact), kind, module
        self._device = torch.device(device) if device is not None else None
        self.name = name or (type(module).__name__ if module is not None else kind)

    def __repr__(self) -> str:
        return f"Generator({self.name}, kind={self.kind!r}, exact={self.exact})"

    @property
    def device(self) -> torch.device:
        if self._device is not None:
            return self._device
        if self.module is not None:
            for p in self.module.parameters():
                return p.device
            for b in self.module.buffers():
                return b.device
        return torch.device("cpu")

    @property
    def has_log_prob(self) -> bool:
        return self._log_prob is not None

    def encode(self, x: torch.Tensor) -> Latent:
        """x ``(N, *x_shape)`` → z (tensor or list of tensors, batch-first). Raises ModelError on non-finite z."""
        z = self._encode(x)
        _parts(z)
        _check_finite_latent(z, "encode")
        return z

    def decode(self, z: Latent) -> torch.Tensor:
        """z → x ``(N, *x_shape)``."""
        return self._decode(z)

    def __call__(self, z: Latent) -> torch.Tensor:
        return self.decode(z)

    def log_prob(self, x: torch.Tensor, *, strict: bool = True) -> torch.Tensor:
        """Natural-log density of x under the generator, (N,); flows only.

        Raises ModelError if a value is non-finite; with ``strict=False`` such values come back as −inf instead
        (an image so far outside the flow's support that its log-det overflows, e.g. an adversarial one: for
        evaluation, where that is a finding, not an error)."""
        if self._log_prob is None:
            raise ModelError(
                f"{self.name} ({self.kind}) has no likelihood; log_prob / bits_per_dim need a normalizing flow."
            )
        lp = self._log_prob(x)
        if not strict:
            return torch.where(torch.isfinite(lp), lp, torch.full_like(lp, float("-inf")))
        if not bool(torch.isfinite(lp.detach()).all()):
            bad = (~torch.isfinite(lp.detach())).nonzero().flatten().tolist()
            raise ModelError(
                f"log_prob is non-finite (a non-finite log-det) for examples {bad[:10]}; x is probably outside "
                "the flow's support (pixels must lie in [0, 1]) or the flow diverged."
            )
        return lp

    def bits_per_dim(self, x: torch.Tensor, levels: int | None = 256, *, strict: bool = True) -> torch.Tensor:
        """Negative log-likelihood in bits per dimension, (N,).

        With ``levels`` (256 for 8-bit images scaled to [0, 1]) the density on [0, 1]^d is turned into the
        discrete likelihood of the quantised data: bpd = −log p(x) / (d ln 2) + log2(levels). ``levels=None``
        gives the plain continuous −log p(x) / (d ln 2). ``strict=False``: +inf where the log-density overflows
        (see :meth:`log_prob`) instead of an error.
        """
        d = math.prod(x.shape[1:])
        bpd = -self.log_prob(x, strict=strict) / (d * math.log(2.0))
        return bpd + math.log2(levels) if levels else bpd

    def round_trip(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(decode(encode(x)), per-example max |decode(encode(x)) − x|)``, both detached."""
        with torch.no_grad():
            xr = self.decode(self.encode(x))
        err = (xr - x).reshape(x.shape[0], -1).abs().amax(1)
        return xr.detach(), err

    def check_round_trip(self, x: torch.Tensor, tol: float = 1e-3) -> torch.Tensor:
        """Per-example round-trip error; warns :class:`ApproximateGeneratorWarning` (message starts
        "approximate") when any example's error exceeds ``tol``. Returns the (N,) errors."""
        _, err = self.round_trip(x)
        bad = err > tol
        if bool(bad.any()):
            warnings.warn(
                f"approximate generator: decode(encode(x)) differs from x by up to {float(err.max()):.3g} "
                f"(> {tol:g}) for {int(bad.sum())} of {len(err)} examples ({self.name}, kind={self.kind}); latent "
                "results are about the reconstruction, not x itself.",
                ApproximateGeneratorWarning,
                stacklevel=2,
            )
        return err

    def flat_decoder(self, like: Latent) -> Callable[[torch.Tensor], torch.Tensor]:
        """decode as a function of a flat (N, k) latent laid out like ``like`` (for geometry on multi-scale latents)."""
        if isinstance(like, torch.Tensor) and like.dim() == 2:
            return self.decode
        return lambda v: self.decode(unflatten_latent(v, like))

    def eval(self) -> "Generator":
        if self.module is not None:
            self.module.eval()
        return self


# ----------------------------------------------------------------------------------------------------------------
# Adapters
# ----------------------------------------------------------------------------------------------------------------


def _standard_normal_log_prob(z: Latent) -> torch.Tensor:
    v = flatten_latent(z)
    return -0.5 * (v * v).sum(1) - 0.5 * v.shape[1] * math.log(2 * math.pi)


def _normflows_adapter(obj: nn.Module, kind: str | None, exact: bool | None) -> Generator | None:
    try:
        import normflows as nf
    except ImportError:  # pragma: no cover - normflows is a dependency
        return None
    if isinstance(obj, nf.MultiscaleFlow):
        # MultiscaleFlow.forward(x) is the NLL, not a map; use the explicit transformations.
        def log_prob(x: torch.Tensor) -> torch.Tensor:
            if obj.class_cond:
                raise ModelError("this normflows MultiscaleFlow is class-conditional; log_prob needs labels — build it with class_cond=False.")
            return obj.log_prob(x, None)

        return Generator(
            lambda x: obj.inverse_and_log_det(x)[0],
            lambda z: obj.forward_and_log_det(list(z) if not isinstance(z, torch.Tensor) else [z])[0],
            exact=True if exact is None else exact, kind=kind or "flow", log_prob=log_prob, module=obj,
            name="normflows.MultiscaleFlow",
        )
    if isinstance(obj, nf.NormalizingFlow):
        return Generator(
            obj.inverse, obj.forward, exact=True if exact is None else exact, kind=kind or "flow",
            log_prob=obj.log_prob, module=obj, name="normflows.NormalizingFlow",
        )
    return None


def _freia_adapter(obj: nn.Module, kind: str | None, exact: bool | None) -> Generator | None:
    try:
        import FrEIA.framework as Ff
    except ImportError:
        return None
    if not isinstance(obj, (Ff.SequenceINN, Ff.GraphINN)):
        return None

    def encode(x: torch.Tensor) -> Latent:
        z = obj(x, jac=False)[0]
        return list(z) if isinstance(z, tuple) else z

    def decode(z: Latent) -> torch.Tensor:
        if isinstance(obj, Ff.SequenceINN) and not isinstance(z, torch.Tensor):
            (z,) = z
        x = obj(z if isinstance(z, torch.Tensor) else list(z), rev=True, jac=False)[0]
        return x[0] if isinstance(x, tuple) else x

    def log_prob(x: torch.Tensor) -> torch.Tensor:
        z, log_jac = obj(x, jac=True)
        z = list(z) if isinstance(z, tuple) else z
        return _standard_normal_log_prob(z) + log_jac

    return Generator(encode, decode, exact=True if exact is None else exact, kind=kind or "flow",
                     log_prob=log_prob, module=obj, name=type(obj).__name__)


def _default_kind(obj: Any) -> str:
    k = getattr(obj, "generator_kind", None)
    if k in GENERATOR_KINDS:
        return k
    from .generative import VAE, ConvAutoencoder

    if isinstance(obj, VAE):
        return "vae"
    if isinstance(obj, ConvAutoencoder):
        return "autoencoder"
    return "custom"


def as_generator(
    obj: Any,
    *,
    kind: str | None = None,
    exact: bool | None = None,
    encode: Callable[[torch.Tensor], Latent] | None = None,
    log_prob: Callable[[torch.Tensor], torch.Tensor] | None = None,
    latent_shape: Sequence[int] | None = None,
    inversion: dict | None = None,
) -> Generator:
    """Wrap anything that generates data as a :class:`Generator`.

    Accepts: a :class:`Generator` (returned, with ``kind``/``exact`` overridden if given); any object with
    ``encode``/``decode`` methods (manifex's VAE — encode = posterior mean μ —, ConvAutoencoder, flows and DCGAN,
    or your own module; ``exact`` is read from its ``exact`` attribute, else False; a ``log_prob`` method is used
    if present); a normflows ``NormalizingFlow``/``MultiscaleFlow``; a FrEIA ``SequenceINN``/``GraphINN``; or a
    decoder-only callable z → x (a GAN generator) with either ``encode=`` or ``latent_shape=`` — then x is
    encoded by :func:`invert_generator` (research settings, overridable by ``inversion={...}``).
    """
    if kind is not None and kind not in GENERATOR_KINDS:
        raise InputError(f"kind must be one of {GENERATOR_KINDS}, got {kind!r}.")
    if isinstance(obj, Generator):
        if kind is None and exact is None:
            return obj
        return Generator(obj._encode, obj._decode, exact=obj.exact if exact is None else exact, kind=kind or obj.kind,
                         log_prob=obj._log_prob, module=obj.module, device=obj._device, name=obj.name)
    if isinstance(obj, nn.Module):
        for adapter in (_normflows_adapter, _freia_adapter):
            g = adapter(obj, kind, exact)
            if g is not None:
                return g
    has_enc, has_dec = callable(getattr(obj, "encode", None)), callable(getattr(obj, "decode", None))
    if has_dec and (has_enc or encode is not None):
        lp = log_prob or (getattr(obj, "log_prob", None) if callable(getattr(obj, "log_prob", None)) else None)
        return Generator(
            encode or obj.encode, obj.decode, exact=bool(getattr(obj, "exact", False)) if exact is None else exact,
            kind=kind or _default_kind(obj), log_prob=lp, module=obj if isinstance(obj, nn.Module) else None,
        )
    decode = obj.decode if has_dec else obj if callable(obj) else None
    if decode is None:
        raise InputError(
            f"cannot use a {type(obj).__name__} as a generator: it has no encode/decode methods and is not callable. "
            "Pass a module with encode(x) -> z and decode(z) -> x, a normflows or FrEIA flow, or a decoder callable "
            "z -> x with encode=... or latent_shape=... (then x is encoded by manifex.invert_generator)."
        )
    module = obj if isinstance(obj, nn.Module) else getattr(decode, "__self__", None)
    module = module if isinstance(module, nn.Module) else None
    if encode is None:
        if latent_shape is None:
            raise InputError(
                f"{type(obj).__name__} has no encode method: give encode=callable(x) -> z, or latent_shape=(k,) so that "
                "x is encoded by manifex.invert_generator (Adam on z, research settings)."
            )
        opts = dict(inversion or {})
        shape = tuple(latent_shape)

        def encode(x: torch.Tensor) -> torch.Tensor:
            return invert_generator(decode, x, latent_shape=shape, **opts).z

    return Generator(encode, decode, exact=bool(exact) if exact is not None else False, kind=kind or "gan",
                     log_prob=log_prob, module=module)


# ----------------------------------------------------------------------------------------------------------------
# Inversion of a decoder-only generator
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Inversion:
    """Result of :func:`invert_generator`: ``z`` (latent, structure of z_init), ``mse`` (N,) final
    MSE(clip(decode(z)), x), ``steps`` (N,) Adam steps taken, ``converged`` (N,) mse < tol."""

    z: Latent
    mse: torch.Tensor
    steps: torch.Tensor
    converged: torch.Tensor


def invert_generator(
    decode: Callable[[Latent], torch.Tensor],
    x: torch.Tensor,
    *,
    lr: float = 0.1,
    max_steps: int = 3000,
    tol: float = 1e-3,
    z_init: Latent | None = None,
    latent_shape: Sequence[int] | None = None,
    box: tuple[float, float] | None = (0.0, 1.0),
    seed: int = 0,
    progress: bool = False,
) -> Inversion:
    """Find z with decode(z) ≈ x by Adam on z (the research's GAN inversion), batched.

    Per example i: loss_i = mean over pixels of (clip(decode(z_i), box) − x_i)², clip inside the graph as in the
    research. Each step first evaluates loss_i; examples with loss_i < ``tol`` stop (frozen from then on), the others
    take one Adam step. The summed loss gives each row exactly its batch-1 gradient, and Adam is elementwise, so
    every row follows its batch-1 trajectory. ``z_init`` defaults to N(0, I) of shape ``(N, *latent_shape)`` drawn with
    ``seed``. Warns :class:`ApproximateGeneratorWarning` for rows that did not reach ``tol``.
    """
    check_tensor(x, "x", min_ndim=2)
    check_finite(x, "x")
    if not lr > 0:
        raise InputError(f"lr must be > 0, got {lr}.")
    if int(max_steps) < 1:
        raise InputError(f"max_steps must be ≥ 1, got {max_steps}.")
    if not tol > 0:
        raise InputError(f"tol must be > 0, got {tol}.")
    n = x.shape[0]
    if z_init is None:
        if latent_shape is None:
            raise InputError("invert_generator needs z_init or latent_shape (the shape of one latent code, e.g. (100,)).")
        g = torch.Generator().manual_seed(seed)
        z_init = torch.randn((n, *tuple(latent_shape)), generator=g, dtype=x.dtype).to(x.device)
    parts = [p.detach().clone() for p in _parts(z_init)]
    if any(p.shape[0] != n for p in parts):
        raise InputError(f"z_init must have batch size {n} (one code per image), got {[tuple(p.shape) for p in parts]}.")
    single = isinstance(z_init, torch.Tensor)
    for p in parts:
        p.requires_grad_(True)
    opt = torch.optim.Adam(parts, lr=lr)
    steps = torch.zeros(n, dtype=torch.long, device=x.device)
    mse = torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
    active = torch.ones(n, dtype=torch.bool, device=x.device)
    xf = x.detach().reshape(n, -1)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=int(max_steps), desc="inverting generator", unit="step", leave=False)
    # The inversion is gradient descent on z: it needs autograd whatever the caller's grad mode (a GAN's encode is
    # this function, and callers encode under torch.no_grad()).
    with torch.enable_grad():
        for step in range(int(max_steps) + 1):
            idx = active.nonzero().flatten()
            zi = [p[idx] for p in parts]
            out = decode(zi[0] if single else zi)
            if box is not None:
                out = out.clamp(box[0], box[1])
            loss_rows = (out.reshape(len(idx), -1) - xf[idx]).pow(2).mean(1)
            if not bool(torch.isfinite(loss_rows.detach()).all()):
                raise ModelError("decode produced non-finite values during inversion; check the generator and x.")
            mse[idx] = loss_rows.detach()
            done = loss_rows.detach() < tol
            if step == int(max_steps) or bool(done.all()):
                active[idx[done]] = False
                break
            if bool(done.any()):
                active[idx[done]] = False
            frozen = [p.detach()[~active].clone() for p in parts]
            opt.zero_grad(set_to_none=True)
            # Rows that stopped now must not move: their loss is left out, and their values are restored after the step.
            loss_rows[~done].sum().backward()
            opt.step()
            with torch.no_grad():
                for p, f in zip(parts, frozen):
                    p[~active] = f
            steps[active] += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(active=int(active.sum()), mse=f"{float(mse.max()):.2e}")
    if bar is not None:
        bar.close()
    converged = mse < tol
    if not bool(converged.all()):
        warnings.warn(
            f"approximate inversion: {int((~converged).sum())} of {n} examples did not reach MSE < {tol:g} in "
            f"{max_steps} steps (worst {float(mse.max()):.3g}); decode(z) only approximates x there.",
            ApproximateGeneratorWarning,
            stacklevel=2,
        )
    z = [p.detach() for p in parts]
    return Inversion(z[0] if single else z, mse, steps, converged)
