"""Training progress bars name what they train (issue 16: the bars did not say flow, VAE or GAN)."""
from __future__ import annotations

import pytest

import manifex
from manifex.models import training as training_mod
from manifex.models.training import (GenerativeTrainConfig, GeneratorTrainConfig, TrainConfig, fit_classifier,
                                     fit_generative, fit_generator)


@pytest.fixture
def bar_names(monkeypatch):
    names = []
    real = training_mod.tqdm

    def recording_tqdm(*args, desc=None, **kwargs):
        names.append(desc)
        return real(*args, desc=desc, **kwargs)

    monkeypatch.setattr(training_mod, "tqdm", recording_tqdm)
    return names


@pytest.fixture(scope="module")
def tiny():
    return manifex.data.load_digits8().subset(slice(0, 64))


def test_each_training_bar_says_what_it_trains(tiny, bar_names):
    from manifex.models.gan import DCGAN
    from manifex.models.generative import VAE

    fit_classifier(manifex.models.MLP((1, 8, 8), 10, hidden=(8,)), tiny, TrainConfig(epochs=1, batch_size=32), progress=False)
    fit_generative(VAE((1, 8, 8), latent_dim=2, channels=4), tiny, GenerativeTrainConfig(epochs=1, batch_size=32), progress=False)
    fit_generator(DCGAN((1, 8, 8), latent_dim=4, channels=4), tiny, GeneratorTrainConfig(epochs=1, batch_size=32), progress=False)
    assert bar_names == ["classifier MLP epoch 1/1", "VAE epoch 1/1", "GAN DCGAN epoch 1/1"]


def test_flow_robust_classifier_and_autoencoder_labels():
    from manifex.models.flows import ImageFlow, VectorFlow
    from manifex.models.generative import ConvAutoencoder
    from manifex.models.training import training_label

    assert training_label(ImageFlow((1, 8, 8), levels=1, blocks=1, hidden=4)) == "flow ImageFlow"
    assert training_label(VectorFlow(hidden=4)) == "flow VectorFlow"
    assert training_label(manifex.models.MLP((1, 8, 8), 10, hidden=(8,)), "robust classifier") == "robust classifier MLP"
    assert training_label(ConvAutoencoder((1, 8, 8))) == "autoencoder ConvAutoencoder"
