"""Known-manifold datasets: images are exactly decoder(z), tangent spaces for every image, 256-style upsampling."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from manifex.alignment import KnownManifoldConfig, make_known_manifold
from manifex.models.known_manifold import KnownManifold, check_known_manifold
from manifex.data.base import ImageDataset
from manifex.data import load_digits8
from manifex.errors import DataError, InputError, check_pixel_range
from manifex.models import GenerativeTrainConfig, ModelCache, get_generative


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    cache = ModelCache(tmp_path_factory.mktemp("cache"))
    real = load_digits8().subset(slice(0, 300))
    vae, _ = get_generative(real, "vae", 4, GenerativeTrainConfig(epochs=2), cache=cache, progress=False)
    km = make_known_manifold(real, vae, KnownManifoldConfig(n_train=40, n_test=12, labeler_epochs=1, batch_size=64),
                             cache=cache, progress=False, allow_degenerate=True)  # a 1-epoch labeler: near chance
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
                                cache=cache, progress=False, allow_degenerate=True)
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


def _generated(labels: list[int], labeler_accuracy: float, acceptance: float) -> KnownManifold:
    y = torch.tensor(labels)
    ds = ImageDataset(torch.zeros(len(y), 1, 2, 2), y, classes=[str(i) for i in range(10)], z=torch.zeros(len(y), 1))
    return KnownManifold(ds, ds.subset(slice(0, 0)), None, labeler_accuracy, acceptance)


def test_checks_pass_a_healthy_generated_dataset():
    checks, problems = check_known_manifold(_generated(list(range(10)) * 5, 0.95, 0.6), 10)
    assert problems == []
    assert "accuracy 95.0%" in checks[0] and "effective number 10.0 of 10" in checks[1] and "60.0%" in checks[2]


@pytest.mark.parametrize("labels, acc, rate, needle", [
    (list(range(10)) * 5, 0.098, 0.6, "near chance"),                 # labeler at chance (the --vae-epochs 1 case)
    ([1] * 45 + [2] * 5, 0.95, 0.6, "effective number of classes 1.4"),  # one class dominates
    (list(range(10)) * 5, 0.95, 0.011, "acceptance rate 1.1%"),       # near-uniform labeler outputs
])
def test_checks_flag_a_degenerate_generated_dataset(labels, acc, rate, needle):
    _, problems = check_known_manifold(_generated(labels, acc, rate), 10)
    assert len(problems) == 1 and needle in problems[0]


def test_degenerate_dataset_is_refused_by_default(known):
    km, cache, real, vae = known
    assert km.warnings and "near chance" in km.warnings[0]  # kept, flagged, with the opt-in
    with pytest.raises(DataError, match="degenerate.*allow-degenerate"):
        make_known_manifold(real, vae, KnownManifoldConfig(n_train=40, n_test=12, labeler_epochs=1, batch_size=64),
                            cache=cache, progress=False)
