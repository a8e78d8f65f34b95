"""KnownManifold.save writes its .npz through the one atomic helper: same arrays back, no temporary file left."""
from __future__ import annotations

import numpy as np
import torch

from manifex.models.known_manifold import KnownManifold
from manifex.data.base import ImageDataset


def _known(n_train: int = 5, n_test: int = 3) -> KnownManifold:
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> ImageDataset:
        return ImageDataset(torch.rand(n, 1, 4, 4, generator=g), torch.randint(0, 10, (n,), generator=g),
                            classes=[str(i) for i in range(10)], z=torch.randn(n, 2, generator=g))

    return KnownManifold(split(n_train), split(n_test), None, 0.9, 0.5)


def test_save_round_trips_atomically(tmp_path):
    km = _known()
    (tmp_path / "known.npz").write_bytes(b"an older file")  # replaced whole
    path = km.save(tmp_path / "known.npz")
    assert path == tmp_path / "known.npz"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["known.npz"]  # no temporary file left
    with np.load(path, allow_pickle=False) as f:
        assert sorted(f.files) == ["x_test", "x_train", "y_test", "y_train", "z_test", "z_train"]
        for split, data in (("train", km.train), ("test", km.test)):
            np.testing.assert_array_equal(f[f"x_{split}"], data.x.numpy())
            np.testing.assert_array_equal(f[f"y_{split}"], data.y.numpy())
            np.testing.assert_array_equal(f[f"z_{split}"], data.z.numpy())


def test_save_appends_npz_like_numpy(tmp_path):
    path = _known().save(tmp_path / "known")
    assert path == tmp_path / "known.npz" and path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["known.npz"]
    with np.load(path, allow_pickle=False) as f:
        assert f["x_train"].shape == (5, 1, 4, 4)
