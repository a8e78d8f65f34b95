"""Geometry of generated data manifolds: tangent spaces, projections, alignment, dimension."""
from .projection import (
    alignment,
    decompose,
    estimate_dimension,
    project,
    random_baseline,
    tangent_coefficients,
    tangent_mass,
)
from .distance import manifold_distance
from .spectrum import GeneratorSpectrum, generator_spectrum
from .tangent import TangentSpace, decoder_jacobian, default_rtol, tangent_space

__all__ = [
    "TangentSpace", "tangent_space", "decoder_jacobian", "default_rtol",
    "alignment", "random_baseline", "tangent_coefficients", "project", "decompose", "tangent_mass",
    "estimate_dimension",
    "GeneratorSpectrum", "generator_spectrum",
    "manifold_distance",
]
