"""Attribution engine: explainers sharing one gradient path (``target_gradient``) and a registry."""
from .core import (
    OutputSelector,
    Target,
    TrainModeWarning,
    preserve_model_state,
    select_output,
    select_target,
    selected_output,
    target_gradient,
)
from .methods import Explainer, Gradient, InputXGradient, IntegratedGradients, SmoothGrad, integration_rule
from .lrp import (
    LRP,
    BatchNormFolding,
    Composite,
    EpsilonAlpha2Beta1,
    EpsilonGammaBox,
    EpsilonPlus,
    LRPEpsilon,
    LRPEpsilonGammaBox,
    LRPEpsilonPlus,
    LRPGamma,
    LRPZPlus,
    ResidualSum,
    vgg16_gamma_preset,
)
from .modified import GradCAM, GuidedBackprop, last_conv_layer
from .deeplift import DeepLift, DeepLiftRules
from .layer import (
    LayerDeepLift,
    LayerExplainer,
    LayerGradient,
    LayerGradientXActivation,
    LayerIntegratedGradients,
    layer_activations,
    resolve_layer,
)
from .smoothing import (
    BetaSmoothing,
    SmoothActivation,
    SmoothedExplainer,
    SmoothReLU,
    beta_smooth,
    beta_smoothed,
    count_relus,
    count_smoothed,
    functional_relu_calls,
    set_smooth_beta,
)
from .registry import ALIASES, METHODS, OPTION_ALIASES, canonical_method, explain, make_explainer, method_names

__all__ = [
    "Target", "preserve_model_state", "select_target", "target_gradient",
    "OutputSelector", "TrainModeWarning", "select_output", "selected_output",
    "Explainer", "Gradient", "InputXGradient", "IntegratedGradients", "SmoothGrad", "integration_rule",
    "LRP", "BatchNormFolding", "Composite", "EpsilonAlpha2Beta1", "EpsilonGammaBox", "EpsilonPlus", "LRPEpsilon",
    "LRPEpsilonGammaBox", "LRPEpsilonPlus", "LRPGamma", "LRPZPlus", "ResidualSum", "vgg16_gamma_preset",
    "GradCAM", "GuidedBackprop", "last_conv_layer",
    "DeepLift", "DeepLiftRules", "LayerDeepLift", "LayerExplainer", "LayerGradient", "LayerGradientXActivation",
    "LayerIntegratedGradients", "layer_activations", "resolve_layer",
    "BetaSmoothing", "SmoothedExplainer", "SmoothReLU", "beta_smooth", "beta_smoothed", "count_relus",
    "functional_relu_calls", "set_smooth_beta", "SmoothActivation", "count_smoothed",
    "ALIASES", "METHODS", "OPTION_ALIASES", "canonical_method", "explain", "make_explainer", "method_names",
]
