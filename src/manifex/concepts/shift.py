"""Moved to :mod:`manifex.concepts.contrast.shift` (class contrasting has its own folder); this module re-exports
it for one release."""
import warnings

from .contrast.shift import *  # noqa: F401,F403
from .contrast.shift import __all__  # noqa: F401

warnings.warn("manifex.concepts.shift moved to manifex.concepts.contrast.shift; import it from there.", DeprecationWarning,
              stacklevel=2)
