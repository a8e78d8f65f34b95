"""Known-manifold datasets: images are exactly decoder(z), tangent spaces for every image, 256-style upsampling."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from manifex.alignment import KnownManifoldConfig, make_known_manifold
from manifex.data import load_digits8
from manifex.errors import InputError, check_pixel_range
from manifex.models import GenerativeTrainConfig, ModelCache, get_generative


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    cache = ModelCache(tmp_path_factory.mktemp("cache"))
    real = load_digits8().subset(slice(0, 300))
    vae, _ = get_generative(real, "vae", 4, GenerativeTrainConfig(epochs=2), cache=cache, progress=False)
    km = make_known_manifold(real, vae, KnownManifoldConfig(n_train=40, n_test=12, labeler_epochs=1, batch_size=64),
                             cache=cache, progress=False)
    yield km, cache, real, vae


def test_images_are_exactly_decoded_latents(known):
    km = known[0]
    assert km.train.x.shape == (40, 1, 8, 8) and km.test.x.shape == (12, 1, 8, 8)
    assert km.train.z.shape == (40, 4)
    with torch.no_grad():
        torch.testing.assert_close(km.decode(km.train.z), km.train.x)
    assert int(km.train.y.min()) >= 0 and int(km.train.y.max()) < 10
    assert 0 < km.acceptance_rate <= 1


def test_tangent_space_for_train_and_test_images(known):
    km = known[0]
    for split in (km.train, km.test):
        T = km.tangent_space(split)
        assert T.basis.shape == (len(split), 4, 1, 8, 8)
        assert bool((T.rank == 4).all())


def test_sampling_is_cached_and_deterministic(known):
    km, cache, real, vae = known
    again = make_known_manifold(real, vae, KnownManifoldConfig(n_train=40, n_test=12, labeler_epochs=1, batch_size=64),
                                cache=cache, progress=False)
    assert torch.equal(again.train.x, km.train.x) and torch.equal(again.test.z, km.test.z)


def test_upsampled_variant_keeps_codes_and_recomputes_tangents(known):
    km = known[0]
    up = km.upsampled(32)
    assert up.train.x.shape == (40, 1, 32, 32)
    assert torch.equal(up.train.z, km.train.z) and torch.equal(up.train.y, km.train.y)
    with torch.no_grad():
        torch.testing.assert_close(up.decode(up.test.z), up.test.x)
    T = up.tangent_space(up.test.subset(slice(0, 3)))
    assert T.basis.shape == (3, 4, 1, 32, 32)
    with pytest.raises(InputError):
        km.upsampled(0)


def test_save_writes_plain_arrays(known, tmp_path):
    km = known[0]
    path = km.save(tmp_path / "known.npz")
    with np.load(path, allow_pickle=False) as f:
        assert f["x_train"].shape == (40, 1, 8, 8) and f["z_test"].shape == (12, 4)
        np.testing.assert_array_equal(f["y_test"], km.test.y.numpy())


def test_tangent_space_needs_latent_codes(known):
    km, _, real, _ = known
    with pytest.raises(InputError, match="latent codes"):
        km.tangent_space(real)


def test_pixel_range_check_names_range_and_fix():
    check_pixel_range(torch.rand(2, 1, 4, 4), "x")
    with pytest.raises(InputError, match=r"x / 255"):
        check_pixel_range(torch.rand(2, 1, 4, 4) * 255, "x")
    with pytest.raises(InputError, match=r"expects pixels in \[0, 1\]"):
        check_pixel_range(torch.rand(2, 1, 4, 4) * 2 - 1, "x")
