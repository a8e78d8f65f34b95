"""The top-level names stay what the README says, whatever subpackage was imported first."""
import importlib

import torch

import manifex


def test_alignment_is_the_score_after_the_alignment_package_is_imported():
    importlib.import_module("manifex.alignment.pipeline")  # binds manifex.alignment to the package
    from manifex.geometry import alignment as score, tangent_space

    z = torch.randn(2, 2, dtype=torch.float64)
    lin = torch.randn(6, 2, dtype=torch.float64)
    T = tangent_space(lambda v: v @ lin.T, z)
    E = torch.randn(2, 6, dtype=torch.float64)
    assert torch.allclose(manifex.alignment(E, T), score(E, T))
    assert hasattr(manifex.alignment, "run_alignment")


def test_moved_known_manifold_module_still_imports_with_a_deprecation_warning():
    """manifex.alignment.known_manifold moved to manifex.models.known_manifold (several systems use it);
    the old path is an alias for one release that says where to import from."""
    import importlib
    import sys

    import pytest

    import manifex.models.known_manifold as new

    sys.modules.pop("manifex.alignment.known_manifold", None)
    with pytest.warns(DeprecationWarning, match="manifex.models.known_manifold"):
        old = importlib.import_module("manifex.alignment.known_manifold")
    assert old.make_known_manifold is new.make_known_manifold and old.KnownManifold is new.KnownManifold
