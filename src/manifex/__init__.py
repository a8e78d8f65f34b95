"""manifex — the geometry of neural-network explanations.

Shared core: :mod:`manifex.data`, :mod:`manifex.models`, :mod:`manifex.geometry`, :mod:`manifex.attribution`.
Systems on top: :mod:`manifex.alignment`, :mod:`manifex.manipulation`, :mod:`manifex.counterfactuals`,
:mod:`manifex.concepts`, :mod:`manifex.evaluation`. The CLI (``manifex``) is a thin layer over these.

>>> import manifex
>>> T = manifex.tangent_space(vae.decode, z)            # (N, k) latent codes -> tangent bases
>>> E = manifex.explain(model, x, target=y, method="smoothgrad")
>>> manifex.alignment(E, T)                              # (N,) scores in [0, 1]; compare random_baseline(k, d)
"""
from .attribution import beta_smooth, beta_smoothed, explain, make_explainer
from .errors import DataError, InputError, ManifexError, ModelError, RankDeficientWarning
from .geometry import (
    TangentSpace,
    alignment,
    decompose,
    estimate_dimension,
    project,
    random_baseline,
    tangent_mass,
    tangent_space,
)

from .counterfactuals import counterfactual
from .manipulation import manipulate
from .concepts import class_concepts
from .evaluation import evaluate
from .geometry.spectrum import GeneratorSpectrum, generator_spectrum
from .models.generators import Generator, as_generator, invert_generator

#: The installed version of manifex (``manifex --version`` prints it too).
__version__ = "0.1.0"

__all__ = [
    "explain", "make_explainer", "beta_smooth", "beta_smoothed", "manipulate", "class_concepts",
    "DataError", "InputError", "ManifexError", "ModelError", "RankDeficientWarning",
    "TangentSpace", "alignment", "decompose", "estimate_dimension", "project", "random_baseline", "tangent_mass",
    "tangent_space", "__version__",
    "Generator", "as_generator", "invert_generator", "GeneratorSpectrum", "generator_spectrum",
    "counterfactual", "evaluate",
]
