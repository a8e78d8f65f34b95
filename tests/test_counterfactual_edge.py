"""counterfactual() on the edges (issue 16): GAN generators (encode = inversion), inputs of the wrong dtype or
shape, tuple/dict outputs, train-mode models, held-out architectures and the progress bar."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import manifex
from manifex.attribution.core import TrainModeWarning
from manifex.counterfactuals import counterfactual
from manifex.errors import InputError
from manifex.models.generators import ApproximateGeneratorWarning, Generator


def _decoder(seed: int = 0) -> nn.Module:
    """A decoder-only generator z (8,) → x (1, 8, 8) in (0, 1): the GAN setting (no encode; x is inverted)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 64), nn.Sigmoid(), nn.Unflatten(1, (1, 8, 8)))


def _linear_clf(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def _identity() -> Generator:
    return Generator(lambda x: x.clone(), lambda z: z, exact=True, kind="custom")


def _state(model: nn.Module) -> dict:
    """Everything counterfactual() must leave as found: modes, requires_grad, buffers, weights, hooks."""
    return {"training": [m.training for m in model.modules()],
            "requires_grad": [p.requires_grad for p in model.parameters()],
            "tensors": {k: v.clone() for k, v in model.state_dict().items()},
            "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()]}


def _same_state(a: dict, b: dict) -> bool:
    return (a["training"] == b["training"] and a["requires_grad"] == b["requires_grad"] and a["hooks"] == b["hooks"]
            and a["tensors"].keys() == b["tensors"].keys()
            and all(torch.equal(v, b["tensors"][k]) for k, v in a["tensors"].items()))


# --------------------------------------------------------------------------------------------- item 1: GANs


@pytest.mark.parametrize("no_grad", [False, True])
def test_gan_generator_encodes_by_inversion_inside_counterfactual(no_grad):
    """encode of a decoder-only generator is invert_generator (Adam on z): it must run although counterfactual()
    encodes under torch.no_grad() (it raised 'element 0 of tensors does not require grad'), also when the caller
    itself is under no_grad."""
    G, clf = _decoder(), _linear_clf()
    x = G(torch.randn(3, 8, generator=torch.Generator().manual_seed(5))).detach()
    gen = manifex.as_generator(G, latent_shape=(8,), inversion={"max_steps": 300})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ApproximateGeneratorWarning)
        with torch.no_grad() if no_grad else torch.enable_grad():
            r = manifex.counterfactual(clf, x, 3, generator=gen, max_steps=10)
    assert r.x_cf.shape == x.shape and torch.isfinite(r.x_cf).all()
    assert r.info["kind"] == "gan" and r.z_cf.shape == (3, 8)
    # the inversion moved z towards x: the reconstruction is much closer to x than a decode of a random z
    far = (G(torch.randn(3, 8, generator=torch.Generator().manual_seed(9))) - x).abs().amax().item()
    assert float(r.recon_error.max()) < far / 2
    assert all(p.requires_grad for p in G.parameters()) and all(p.grad is None for p in G.parameters())


def test_invert_generator_works_under_no_grad():
    G = _decoder()
    x = G(torch.randn(2, 8, generator=torch.Generator().manual_seed(1))).detach()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ApproximateGeneratorWarning)
        inv = manifex.invert_generator(G, x, latent_shape=(8,), max_steps=50)
    assert inv.steps.min() > 0 and not inv.z.requires_grad


# ------------------------------------------------------------------------------------ item 6: wrong inputs


@pytest.mark.parametrize("space", ["pixel", "latent"])
@pytest.mark.parametrize("x_dtype,model_dtype", [(torch.float64, torch.float32), (torch.float16, torch.float32),
                                                 (torch.float32, torch.float64)])
def test_dtype_mismatch_is_one_input_error(space, x_dtype, model_dtype):
    clf = _linear_clf().to(model_dtype)
    gen = _identity()
    x = torch.rand(2, 1, 8, 8).to(x_dtype)
    with pytest.raises(InputError, match="dtype"):
        counterfactual(clf, x, 3, generator=gen, space=space, max_steps=2)


def test_dtype_mismatch_with_the_generator_is_named_before_encoding():
    clf, G = _linear_clf().double(), _decoder()  # float64 classifier and x, float32 generator
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(InputError, match="dtype"):
        counterfactual(clf, x, 3, generator=manifex.as_generator(G, latent_shape=(8,)), max_steps=2)


class _Conv(nn.Module):
    """A 1-channel 8×8 convolutional classifier."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("space", ["pixel", "latent"])
@pytest.mark.parametrize("shape,message", [((2, 8, 8), "shape \\(2, 8, 8\\)"), ((1, 8, 8), "shape \\(1, 8, 8\\)"),
                                           ((2, 1, 10, 10), "shape \\(2, 1, 10, 10\\)"), ((2, 3, 8, 8), "shape \\(2, 3, 8, 8\\)")])
def test_wrong_image_shape_or_channels_is_one_input_error(space, shape, message):
    with pytest.raises(InputError, match=message):
        counterfactual(_Conv(), torch.rand(*shape), 3, generator=_identity(), space=space, max_steps=2)


def test_images_shaped_unlike_the_generator_are_refused_before_encoding():
    """A zoo generator declares image_shape: a mismatch is named before the (possibly long) inversion."""
    G = manifex.models.DCGAN((1, 8, 8), latent_dim=8, channels=4).eval()
    clf = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16, 10))
    with pytest.raises(InputError, match="generator was built for \\(1, 8, 8\\)"):
        counterfactual(clf, torch.rand(2, 1, 12, 12), 3, generator=G, max_steps=2)


class _DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _linear_clf()

    def forward(self, x):
        logits = self.net(x)
        return {"features": x.flatten(1), "logits": logits}


class _TupleOut(_DictOut):
    def forward(self, x):
        return tuple(super().forward(x).values())


@pytest.mark.parametrize("space", ["pixel", "latent"])
def test_tuple_and_dict_outputs_with_output_selector(space):
    x = torch.rand(2, 1, 8, 8)
    plain = counterfactual(_linear_clf(), x, 3, generator=_identity(), space=space, max_steps=5)
    for model, output in ((_DictOut(), "logits"), (_TupleOut(), 1), (_DictOut(), lambda out: out["logits"])):
        with pytest.raises(InputError, match="output="):
            counterfactual(model, x, 3, generator=_identity(), space=space, max_steps=5)
        before = _state(model)
        r = counterfactual(model, x, 3, generator=_identity(), space=space, max_steps=5, output=output)
        assert torch.equal(r.x_cf, plain.x_cf) and torch.equal(r.steps, plain.steps)
        assert _same_state(before, _state(model))  # the selection hook is gone
    with pytest.raises(InputError, match="output must be"):
        counterfactual(_DictOut(), x, 3, space="pixel", output=2.5)


def test_plain_callable_classifier_with_output_selector():
    net = _linear_clf()
    r = counterfactual(lambda v: (net(v), None), torch.rand(2, 1, 8, 8), 3, space="pixel", max_steps=3, output=0)
    assert r.steps.max() <= 3


# ------------------------------------------------------------------------------------ item 7: model state


class _BN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(self.drop(F.relu(self.bn(self.conv(x)))).flatten(1))


@pytest.mark.parametrize("space", ["pixel", "latent"])
def test_train_mode_model_warns_and_is_left_exactly_as_found(space):
    model = _BN().double().train()  # float64: batch-of-3 and batch-of-1 kernels agree to ~1e-15, compared below
    model.fc.weight.requires_grad_(False)
    model.bn.running_mean.add_(0.3)  # buffers that eval mode would keep but train mode would update
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    before = _state(model)
    with pytest.warns(TrainModeWarning, match="BatchNorm2d"):
        r = counterfactual(model, x, 3, generator=_identity(), space=space, max_steps=5)
    assert _same_state(before, _state(model))
    assert all(p.grad is None for p in model.parameters())
    # eval mode during the call: the search is deterministic and independent of the batch (dropout and BN off)
    r1 = counterfactual(model, x[:1], 3, generator=_identity(), space=space, max_steps=5)
    assert torch.allclose(r.x_cf[:1], r1.x_cf, rtol=0, atol=1e-12)
    # also after an exception raised mid-call (after the models were switched to eval mode)
    with pytest.raises(InputError, match="target classes"):
        counterfactual(model, x, 12, generator=_identity(), space=space, max_steps=5)
    assert _same_state(before, _state(model))


# ------------------------------------------------------------------------------- held-out architectures


class _TanhSigmoidAvgPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                                 nn.Sigmoid(), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)


class _FunctionalReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.b(F.relu(self.a(x.flatten(1))))


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.c1, self.c2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * 64, 10)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(h + self.c2(F.relu(self.c1(h))))
        return self.head(h.flatten(1))


class _EluLeaky(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ELU(), nn.Linear(32, 32), nn.LeakyReLU(0.1), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)


class _SoftmaxHead(_EluLeaky):
    def forward(self, x):
        return torch.softmax(super().forward(x), dim=1)


ARCHITECTURES = {
    "tanh-sigmoid-avgpool": (_TanhSigmoidAvgPool, {}),
    "functional-relu": (_FunctionalReLU, {}),
    "residual": (_Residual, {}),
    "elu-leakyrelu": (_EluLeaky, {}),
    "batchnorm-train": (_BN, {}),
    "softmax-head": (_SoftmaxHead, {}),
    "dict-output": (_DictOut, {"output": "logits"}),
}


@pytest.mark.parametrize("space", ["pixel", "latent-identity", "latent-decoder"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_held_out_architectures_run_without_a_traceback(arch, space):
    cls, kwargs = ARCHITECTURES[arch]
    torch.manual_seed(4)
    model = cls()
    if arch == "batchnorm-train":
        model.train()
    else:
        model.eval()
    G = _decoder()
    x = G(torch.randn(3, 8, generator=torch.Generator().manual_seed(6))).detach()
    gen = {"pixel": None, "latent-identity": _identity(),
           "latent-decoder": manifex.as_generator(G, encode=lambda v: torch.zeros(v.shape[0], 8), kind="autoencoder")}[space]
    before = _state(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = counterfactual(model, x, 7, generator=gen, space="pixel" if gen is None else "latent", max_steps=8, **kwargs)
    assert r.x_cf.shape == x.shape and torch.isfinite(r.x_cf).all() and torch.isfinite(r.p_target).all()
    assert (r.steps > 0).any()  # the search moved
    assert _same_state(before, _state(model))
    kinds = {type(w.message) for w in caught}
    assert (TrainModeWarning in kinds) == (arch == "batchnorm-train")
    said_probabilities = any("returns probabilities" in str(w.message) for w in caught)
    assert said_probabilities == (arch == "softmax-head")


# ------------------------------------------------------------------------------------------ progress bar


def test_progress_bar_advances_per_finished_example(monkeypatch):
    """The bar counts examples as they finish (not one jump at the end) and shows the step while searching."""
    import tqdm.auto

    bars = []

    class Recorder:
        def __init__(self, *args, total=None, **kwargs):
            self.total, self.updates, self.postfix = total, [], []
            bars.append(self)

        def update(self, n=1):
            self.updates.append(n)

        def set_postfix(self, **kwargs):
            self.postfix.append(kwargs)

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    # the mean pixel rises by about lr a step (Adam), so rows with thresholds 0.3 .. 0.9 finish at different steps
    r = counterfactual(None, torch.full((4, 1, 8, 8), 0.1), objective=lambda v: v.flatten(1).mean(1),
                       stop_value=torch.tensor([0.3, 0.5, 0.7, 0.9]), space="pixel", lr=0.05, max_steps=300, progress=True)
    assert bool(r.success.all())
    (bar,) = bars
    assert bar.total == 4 and sum(bar.updates) == 4
    finishing = sorted(set(int(s) for s in r.steps))
    assert len([u for u in bar.updates if u > 0]) == len(finishing) >= 2  # one advance per distinct finishing step
    assert max(p["step"] for p in bar.postfix) == int(r.steps.max())
