"""Explainers by name: a declared table of methods, aliases and defaults, and ``explain``.

Options have one canonical (manifex) name each; ``OPTION_ALIASES`` lists the Captum names accepted for the
same meaning (``n_steps`` for ``steps``, ``baselines`` for ``baseline``, ...). Giving both raises InputError.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import InputError
from .core import Target
from .methods import Explainer, Gradient, InputXGradient, IntegratedGradients, SmoothGrad
from .lrp import LRP, LRPEpsilon, LRPEpsilonGammaBox, LRPEpsilonPlus, LRPGamma, LRPZPlus
from .modified import GradCAM, GuidedBackprop
from .deeplift import DeepLift
from .layer import LAYER_METHODS

__all__ = ["METHODS", "ALIASES", "OPTION_ALIASES", "make_explainer", "explain", "method_names", "canonical_method"]


@dataclass(frozen=True)
class MethodSpec:
    """How to build one named method: a factory taking (model, **options), its defaults, a description."""

    factory: Callable[..., Explainer]
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)


def _smoothgrad(model, *, base: str = "gradient", **options) -> Explainer:
    inner_keys = {"steps", "integration", "baseline", "multiply_by_inputs", "absolute", "layer", "eps", "functional", "maxpool"}
    inner_opts = {k: options.pop(k) for k in list(options) if k in inner_keys}
    return SmoothGrad(make_explainer(model, base, **inner_opts), **options)


#: The attribution methods by registry name: ``{name: MethodSpec(factory, description, default options)}``.
#: :func:`explain` and :func:`make_explainer` take these names (or an alias of :data:`ALIASES`); ``manifex methods``
#: prints the table.
METHODS: dict[str, MethodSpec] = {
    "deeplift": MethodSpec(DeepLift, "DeepLift (Rescale), baseline 0 (Captum DeepLift; with layer= LayerDeepLift)"),
    "gradient": MethodSpec(Gradient, "signed gradient of the target logit"),
    "saliency": MethodSpec(Gradient, "absolute gradient |∂score/∂x| (Captum's Saliency default, abs=True)", {"absolute": True}),
    "input_x_gradient": MethodSpec(InputXGradient, "input times gradient"),
    "integrated_gradients": MethodSpec(IntegratedGradients, "Integrated Gradients, zero baseline", {"steps": 50}),
    "integrated_gradients_path": MethodSpec(
        IntegratedGradients, "path-averaged gradient (IG without multiplying by the input, as the seed)",
        {"steps": 50, "multiply_by_inputs": False},
    ),
    "smoothgrad": MethodSpec(_smoothgrad, "SmoothGrad over the gradient (sigma absolute)", {"sigma": 0.02, "n_samples": 25}),
    "smoothgrad_sq": MethodSpec(_smoothgrad, "SmoothGrad² (mean of squared gradients)", {"sigma": 0.02, "n_samples": 25, "kind": "smoothgrad_sq"}),
    "vargrad": MethodSpec(_smoothgrad, "VarGrad (variance of noisy gradients)", {"sigma": 0.02, "n_samples": 25, "kind": "vargrad"}),
    "guided_backprop": MethodSpec(GuidedBackprop, "Guided Backprop: only positive gradients pass each ReLU backward"),
    "gradcam": MethodSpec(GradCAM, "Grad-CAM at a conv layer (layer=name or module; default the last conv), upsampled"),
    "lrp": MethodSpec(LRP, "LRP, EpsilonPlus composite (z+ on conv, ε on dense); BatchNorm folded, residual sums split"),
    "lrp_epsilon": MethodSpec(LRPEpsilon, "LRP-ε on every Linear/Conv layer", {"epsilon": 1e-6}),
    "lrp_gamma": MethodSpec(
        LRPGamma, "LRP-γ on every Linear/Conv layer; gamma_mode='sign_aware' (default: boosts the contributions "
        "of each output's sign, stable on negative outputs) or 'textbook' (w + γw⁺ for every output, as Captum)",
        {"gamma": 0.25, "gamma_mode": "sign_aware"},
    ),
    "lrp_alpha1beta0": MethodSpec(LRPZPlus, "LRP-α1β0 (z+) on every Linear/Conv layer"),
    "lrp_epsilon_gamma_box": MethodSpec(
        LRPEpsilonGammaBox, "LRP: z^B first layer (pixels in [low, high]), γ on conv (gamma_mode='sign_aware' "
        "default, or 'textbook'), ε on dense",
        {"low": 0.0, "high": 1.0, "epsilon": 1e-6, "gamma": 0.25, "gamma_mode": "sign_aware"},
    ),
    "lrp_epsilon_plus": MethodSpec(LRPEpsilonPlus, "LRP: z+ on conv, ε on dense layers", {"epsilon": 1e-6}),
}

#: Other names of the methods: ``{alias: registry name of METHODS}`` (short forms such as ``ig`` and ``sg``, and
#: Captum's class names such as ``noisetunnel``), lower-case.
ALIASES: dict[str, str] = {
    "lrp_zplus": "lrp_alpha1beta0",
    "lrp_z_plus": "lrp_alpha1beta0",
    "lrp_egb": "lrp_epsilon_gamma_box",
    "gbp": "guided_backprop",
    "guidedbackprop": "guided_backprop",
    "grad_cam": "gradcam",
    "grad": "gradient",
    "ixg": "input_x_gradient",
    "gxi": "input_x_gradient",
    "inputxgradient": "input_x_gradient",
    "ig": "integrated_gradients",
    "ig_path": "integrated_gradients_path",
    "sg": "smoothgrad",
    "deep_lift": "deeplift",
    "dl": "deeplift",
    # Captum's class names
    "integratedgradients": "integrated_gradients",
    "noisetunnel": "smoothgrad",
    "noise_tunnel": "smoothgrad",
    "layergradcam": "gradcam",
}

#: Captum's argument names accepted as aliases: {Captum name: manifex name}. The manifex name is the
#: documented one; the meaning is the same (Captum's IG ``method`` is ``integration`` here, because
#: ``method`` names the explainer in ``explain``/``make_explainer``).
OPTION_ALIASES: dict[str, str] = {
    "n_steps": "steps",
    "baselines": "baseline",
    "nt_samples": "n_samples",
    "stdevs": "sigma",
    "nt_type": "kind",
    "abs": "absolute",
    "relu_attributions": "relu",
    "interpolate_mode": "upsample_mode",
}


def _canonical_options(options: dict[str, Any]) -> dict[str, Any]:
    """Options with Captum's names replaced by manifex's; both names of one option given is an error."""
    out = dict(options)
    for alias, name in OPTION_ALIASES.items():
        if alias in out:
            if name in out:
                raise InputError(f"give {name}= or its Captum alias {alias}=, not both.")
            out[name] = out.pop(alias)
    return out


def method_names() -> list[str]:
    """The registry names of every attribution method (the keys of :data:`METHODS`), sorted; aliases excluded."""
    return sorted(METHODS)


def canonical_method(name: str) -> str:
    """The registry name for a method name or alias (raises InputError listing the choices)."""
    return _canonical(name)


def _canonical(name: str) -> str:
    key = name.lower().replace("-", "_").replace(" ", "_")
    key = ALIASES.get(key, key)
    if key not in METHODS:
        raise InputError(f"unknown method {name!r}; choose one of {', '.join(method_names())} (aliases: {', '.join(sorted(ALIASES))}).")
    return key


#: Methods that take ``layer=`` themselves: Grad-CAM's own layer; SmoothGrad passes it to its base method.
_OWN_LAYER = {"gradcam", "smoothgrad", "smoothgrad_sq", "vargrad"}


def _layer_spec(key: str, options: dict[str, Any]) -> MethodSpec:
    """The method's spec, or its layer version (``attribution.layer``) when ``layer=`` is given."""
    spec = METHODS[key]
    if key in _OWN_LAYER or "layer" not in options:
        return spec
    if options["layer"] is None:
        options.pop("layer")
        return spec
    if key not in LAYER_METHODS:
        raise InputError(f"method {key!r} has no layer attribution; with layer= use one of "
                         f"{', '.join(sorted(LAYER_METHODS))} (or smoothgrad over them, or gradcam).")
    return MethodSpec(LAYER_METHODS[key], spec.description, spec.defaults)


def make_explainer(model: Callable[[torch.Tensor], torch.Tensor], method: str, **options: Any) -> Explainer:
    """Build the explainer registered as ``method`` (name or alias), defaults overridden by ``options``.

    ``options`` take manifex's names or Captum's (``OPTION_ALIASES``), e.g. ``steps``/``n_steps``; IG's
    integration rule is ``integration=``. ``output=`` (index, key or callable) picks the logits of a model
    that returns a tuple or dict, for every method.
    """
    spec = _layer_spec(_canonical(method), options)
    options = _canonical_options(options)
    output = options.pop("output", None)
    try:
        explainer = spec.factory(model, **{**spec.defaults, **options})
    except TypeError as e:
        raise InputError(f"bad option for method {method!r}: {e}") from None
    if output is not None:
        explainer.output = output
    return explainer


def explain(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    target: Target = None,
    *,
    method: str = "gradient",
    create_graph: bool = False,
    **options: Any,
) -> torch.Tensor:
    """Attribution of ``target`` for ``x`` (N, ...) by the named ``method``; same shape as ``x``.

    >>> explain(model, x, target=y, method="ig", steps=32, integration="riemann_trapezoid")
    >>> explain(model, x, target=[3, 1], method="saliency", output="logits")  # a model returning a dict
    """
    return make_explainer(model, method, **options).attribute(x, target, create_graph=create_graph)
