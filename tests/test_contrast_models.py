"""Class contrasting on models other than the built-in ones (issue 16): held-out architectures through
``class_activation_data`` → ``train_hyperplanes`` → ``shifting_test``, the model left exactly as found (a
train-mode BatchNorm model included, with the explainers' TrainModeWarning), dtype / shape / channel / output
checks before any work, and layers with negative activations."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from manifex.attribution.core import TrainModeWarning
from manifex.concepts.basis import predict_classes
from manifex.concepts.contrast.hyperplanes import class_activation_data, contrastive_concepts, train_hyperplanes
from manifex.concepts.contrast.shift import patch_test, shifting_test
from manifex.data import load_digits8
from manifex.errors import InputError
from _tiny_models import tiny_resnet


@pytest.fixture(scope="module")
def digits():
    d = load_digits8()
    keep = (d.y < 4).nonzero().flatten()[:320]
    return d.x[keep], d.y[keep]


# ------------------------------------------------------------------------------------------------ held-out nets
class FunctionalReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.conv1, self.relu1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)
        self.out = nn.ReLU()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        s = self.stem(x)
        h = self.out(s + self.conv2(self.relu1(self.conv1(s))))  # the skip around conv1 refuses the prefix reuse
        return self.fc(h.mean((2, 3)))


class DictOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(8 * 16, 4)

    def forward(self, x):
        f = self.features(x)
        return {"features": f, "logits": self.fc(f.flatten(1))}


def _head(c, n=16):
    return [nn.Flatten(), nn.Linear(c * n, 4)]


# name: (factory, layer, output selector, train mode)
NETS = {
    "tanh": (lambda: nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 8, 3, padding=1), nn.Tanh(),
                                   nn.AvgPool2d(2), *_head(8)), "3", None, False),
    "sigmoid": (lambda: nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Sigmoid(), nn.AvgPool2d(2), *_head(8)), "2", None, False),
    "avgpool": (lambda: nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), *_head(8)), "2", None, False),
    "functional_relu": (FunctionalReLU, "conv2", None, False),
    "residual": (Residual, "conv1", None, False),
    "elu": (lambda: nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ELU(), nn.AvgPool2d(2), *_head(8)), "1", None, False),
    "leaky_relu": (lambda: nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.LeakyReLU(0.1), nn.MaxPool2d(2), *_head(8)), "1", None, False),
    "batchnorm_train": (lambda: nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                              *_head(8)), "2", None, True),
    "softmax_head": (lambda: nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), *_head(8), nn.Softmax(1)),
                     "1", None, False),
    "dict_output": (DictOutput, "features.1", "logits", False),
}


def _trained(name, x, y):
    factory, layer, output, train_mode = NETS[name]
    torch.manual_seed(0)
    model = factory()
    opt = torch.optim.Adam(model.parameters(), 2e-2)
    for _ in range(60):  # full batch: a few seconds at most for these nets
        opt.zero_grad()
        out = model(x)
        out = out["logits"] if isinstance(out, dict) else out
        loss = F.nll_loss(out.clamp_min(1e-12).log(), y) if name == "softmax_head" else F.cross_entropy(out, y)
        loss.backward()
        opt.step()
    return model.train(train_mode), layer, output


def _state(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()],
            [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()])


def _assert_state(model, before):
    sd, flags, req, hooks = _state(model)
    assert sd.keys() == before[0].keys() and all(torch.equal(sd[k], before[0][k]) for k in sd)  # buffers included
    assert flags == before[1] and req == before[2] and hooks == before[3]


@pytest.mark.parametrize("name", list(NETS))
def test_held_out_architectures_run_through(digits, name):
    x, y = digits
    model, layer, output, train_mode = *_trained(name, x, y), NETS[name][3]
    before = _state(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), _eval_copy_of(model) as m:
            out = m(x)
            preds = (out["logits"] if isinstance(out, dict) else out).argmax(1)
        a, b = (int(c) for c in torch.bincount(preds, minlength=4).argsort(descending=True)[:2])
        data = class_activation_data(model, x, layer, classes=[a, b], images_per_class=12, predictions=preds,
                                     relevance_options={"n_samples": 2}, output=output)
        hp = train_hyperplanes(data, epochs=30)
        w, _ = hp.pair(a, b)
        x_a = x[preds == a][:12]
        res = shifting_test(model, x_a, layer, w, a, b, n_random=2, output=output)
    assert any(issubclass(c.category, TrainModeWarning) for c in caught) == train_mode
    _assert_state(model, before)
    assert torch.isfinite(hp.normals).all() and hp.trained.sum() == 2
    assert res.p_a.shape == res.p_b.shape == (10,) and res.control_p_b.shape == (2, 10)
    for p in (res.p_a, res.p_b, res.control_p_b):
        assert bool(((p >= 0) & (p <= 1)).all())
    if not train_mode:  # t = 0 leaves the layer's output unchanged (ReLU on a non-negative layer, else the pure shift)
        with torch.no_grad():
            out = model(x_a)
            out = out["logits"] if isinstance(out, dict) else out
        p0 = out.double() if name == "softmax_head" else torch.softmax(out.double(), 1)  # a softmax head is not re-softmaxed
        # float32 forward: probabilities agree to a few float32 ulps of values ≤ 1 (the sum order differs by batch)
        torch.testing.assert_close(res.p_a[0], p0[:, a].mean(), atol=1e-6, rtol=0)
        torch.testing.assert_close(res.p_b[0], p0[:, b].mean(), atol=1e-6, rtol=0)
    assert res.probabilities == (name == "softmax_head")
    with torch.no_grad():
        acts = _layer_output(model, layer, x_a, output)
    assert res.relu == bool((acts >= 0).all())  # Tanh, ELU, LeakyReLU, pre-ReLU convolutions: the pure shift a + t·w


class _eval_copy_of:
    """A deep copy in eval mode (the test's own predictions must not touch the model under test)."""

    def __init__(self, model):
        import copy

        self.m = copy.deepcopy(model).eval()

    def __enter__(self):
        return self.m

    def __exit__(self, *exc):
        return False


def _layer_output(model, layer, x, output):
    import copy

    m = copy.deepcopy(model)
    got = []
    dict(m.named_modules())[layer].register_forward_hook(lambda mod, i, o: got.append(o))
    m(x)
    return got[0]


# ------------------------------------------------------------------------------------------------ model checks
def test_train_mode_model_left_as_found_also_after_an_error(digits):
    x, y = digits
    model, layer, _ = _trained("batchnorm_train", x, y)
    before = _state(model)
    preds = predict_classes(_eval_copy_of(model).m, x)
    with pytest.warns(TrainModeWarning):
        data = class_activation_data(model, x, layer, classes=[0, 1], images_per_class=8, relevance_options={"n_samples": 2})
    _assert_state(model, before)
    hp = train_hyperplanes(data, epochs=5)
    hp.layer = layer
    w, _ = hp.pair(0, 1)
    shifting_test(model, x[preds == 0][:8], layer, w, 0, 1, n_random=1)
    contrastive_concepts(model, x, hp, 0, 1, n_components=2, images_per_class=8, predictions=preds)
    patch_test(model, x[preds == 1][:8], x[0, :, :3, :3], 0, 1)
    _assert_state(model, before)
    # errors found after the model has run a first batch (which moves train-mode BatchNorm statistics)
    with pytest.raises(InputError, match="relevance must be"):
        class_activation_data(model, x, layer, relevance="bogus")
    with pytest.raises(InputError, match="out of range"):
        shifting_test(model, x[:8], layer, w, 0, 7)
    with pytest.raises(InputError, match="out of range"):
        contrastive_concepts(model, x, hp, 0, 7)
    with pytest.raises(InputError, match="out of range"):
        patch_test(model, x[:8], x[0, :, :3, :3], 0, 7)
    _assert_state(model, before)


class _ThreeChannel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("case", ["dtype", "channels", "dict_without_output", "bad_output"])
def test_model_input_errors_are_one_line_input_errors(digits, case):
    x = digits[0][:16]
    model, layer, output = tiny_resnet(), "blocks.1", None
    if case == "dtype":
        x, match = x.double(), "dtype torch.float64 but the model's parameters are"
    elif case == "channels":
        model, layer, match = _ThreeChannel().eval(), "conv", r"cannot run on inputs of shape \(\d+, 1, 8, 8\)"
    elif case == "dict_without_output":
        model, layer, match = DictOutput().eval(), "features.1", 'output="logits"'
    else:
        model, layer, output, match = DictOutput().eval(), "features.1", 3.5, "output must be an index"
    channels = 4 if case == "channels" else 8 if model.__class__ is DictOutput else 12
    w = torch.ones(channels)
    hooks = [len(m._forward_hooks) for m in model.modules()]
    calls = []
    model.register_forward_pre_hook(lambda m, i: calls.append(1))
    n_hooks = [len(m._forward_hooks) for m in model.modules()]
    with pytest.raises(InputError, match=match):
        shifting_test(model, x, layer, w, 0, 1, output=output)
    with pytest.raises(InputError, match=match):
        class_activation_data(model, x, layer, output=output)
    with pytest.raises(InputError, match=match):
        patch_test(model, x, x[0, :, :3, :3], 0, 1, output=output)
    assert len(calls) <= 3  # refused on the first batch, before any relevance or shifted copies
    assert [len(m._forward_hooks) for m in model.modules()] == n_hooks and n_hooks == hooks


def test_dict_output_with_output_selector_equals_its_logits(digits):
    """output="logits" on a dict model gives exactly the numbers of the same network returning its logits."""
    x = digits[0][:64]
    torch.manual_seed(1)
    net = DictOutput().eval()

    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = net

        def forward(self, x):
            return self.inner(x)["logits"]

    plain = Logits().eval()
    preds = predict_classes(plain, x)
    a, b = (int(c) for c in torch.bincount(preds, minlength=4).argsort(descending=True)[:2])
    w = torch.linspace(-1, 1, 8)
    r1 = shifting_test(net, x[preds == a][:10], "features.1", w, a, b, n_random=2, output="logits")
    r2 = shifting_test(plain, x[preds == a][:10], "inner.features.1", w, a, b, n_random=2)
    torch.testing.assert_close(r1.p_b, r2.p_b, atol=0, rtol=0)
    torch.testing.assert_close(r1.control_p_a, r2.control_p_a, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ negative layers
def test_negative_layer_shift_is_pure_and_relu_is_refused(digits):
    x = digits[0]
    model = tiny_resnet()
    preds = predict_classes(model, x)
    x0 = x[preds == 0][:10]
    w = torch.randn(12, generator=torch.Generator().manual_seed(0))
    with pytest.raises(InputError, match=r"layer 'blocks.1.bn2' has negative activations \(min -[0-9.]+\).*relu=False"):
        shifting_test(model, x0, "blocks.1.bn2", w, 0, 2, relu=True)
    res = shifting_test(model, x0, "blocks.1.bn2", w, 0, 2, n_random=1)
    assert not res.relu and res.to_record()["shift"] == "linear"
    with torch.no_grad():
        p = torch.softmax(model(x0).double(), 1).mean(0)
    torch.testing.assert_close(res.p_a[0], p[0], atol=1e-6, rtol=0)  # t = 0 is the identity: a + 0·w
    # the pure shift is a + t·w: the same numbers as a plain hook adding t·w
    layer = dict(model.named_modules())["blocks.1.bn2"]
    h = layer.register_forward_hook(lambda m, i, o: o + 20.0 * w[None, :, None, None])
    with torch.no_grad():
        p20 = torch.softmax(model(x0).double(), 1).mean(0)
    h.remove()
    torch.testing.assert_close(res.p_b[res.ts.index(20.0)], p20[2], atol=1e-6, rtol=0)
    assert shifting_test(model, x0, "blocks.1", w, 0, 2, n_random=0).relu  # post-ReLU block: ReLU(a + t·w)


def test_contrastive_concepts_refuse_a_negative_layer_before_any_work(digits):
    x = digits[0]
    model = tiny_resnet()
    data = class_activation_data(model, x, "blocks.1.bn2", classes=[0, 2], images_per_class=8, relevance_options={"n_samples": 2})
    hp = train_hyperplanes(data, epochs=5)
    calls = []
    h = model.register_forward_pre_hook(lambda m, i: calls.append(1))
    try:
        with pytest.raises(InputError, match=r"^layer 'blocks.1.bn2' has negative activations \(min -[0-9.]+\).*after a ReLU"):
            contrastive_concepts(model, x, hp, 0, 2, n_components=2)
    finally:
        h.remove()
    assert len(calls) <= 2  # the first batch only: no predictions, no activations of A's images, no NMF
