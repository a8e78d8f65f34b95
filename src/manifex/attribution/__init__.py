"""Attribution engine: explainers sharing one gradient path (``target_gradient``) and a registry."""
from .core import Target, preserve_model_state, select_target, target_gradient
from .methods import Explainer, Gradient, InputXGradient, IntegratedGradients, SmoothGrad, integration_rule
from .registry import ALIASES, METHODS, canonical_method, explain, make_explainer, method_names

__all__ = [
    "Target", "preserve_model_state", "select_target", "target_gradient",
    "Explainer", "Gradient", "InputXGradient", "IntegratedGradients", "SmoothGrad", "integration_rule",
    "ALIASES", "METHODS", "canonical_method", "explain", "make_explainer", "method_names",
]
