"""System 3: diffeomorphic counterfactuals — latent-space ascent through flows, VAEs and GANs, the pixel-space
baseline, their evaluation, campaigns and reports."""
from .ascent import DEFAULT_LR, ApproximateGeneratorWarning, CounterfactualResult, counterfactual, default_lr

__all__ = ["counterfactual", "CounterfactualResult", "ApproximateGeneratorWarning", "DEFAULT_LR", "default_lr"]
