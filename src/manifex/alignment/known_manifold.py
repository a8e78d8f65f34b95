"""Moved to :mod:`manifex.models.known_manifold` (several systems use it); this alias goes in the next release."""
import warnings

from ..models.known_manifold import *  # noqa: F401,F403
from ..models.known_manifold import __all__  # noqa: F401

warnings.warn("manifex.alignment.known_manifold moved to manifex.models.known_manifold; import it from there.",
              DeprecationWarning, stacklevel=2)
