"""DeepLift (Rescale) and layer attribution: equal to Captum 0.9 in float64 on CNNs with ReLU, max-pool,
BatchNorm (eval) and residual blocks; batched = per-example; completeness; the exact derivative of the
explanation (finite differences); SmoothGrad over layer attributions; routing through ``explain(layer=)``;
model state; errors."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import manifex
from manifex.attribution import SmoothGrad
from manifex.attribution.deeplift import DeepLift
from manifex.attribution.layer import (
    LayerDeepLift,
    LayerGradient,
    LayerGradientXActivation,
    LayerIntegratedGradients,
    layer_activations,
    resolve_layer,
)
from manifex.errors import InputError, ModelError
from manifex.models.classifiers import SmallResNet

captum_attr = pytest.importorskip("captum.attr")

F64 = torch.float64
CAPTUM = dict(rtol=1e-5, atol=1e-10)


def _randomise_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.6 - 0.3)
    return model.to(F64).eval()


def relu_pool_cnn() -> nn.Module:
    """conv → ReLU → max-pool (ReLU feeds the pool) → conv → BN → ReLU → dense; each ReLU module used once."""
    torch.manual_seed(0)
    return _randomise_bn(nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6),
        nn.ReLU(), nn.Flatten(), nn.Linear(96, 12), nn.ReLU(), nn.Linear(12, 5)))


def conv_pool_cnn() -> nn.Module:
    """conv → BN → ReLU → conv → max-pool (a convolution feeds the pool: Captum's max-pool rule acts)."""
    torch.manual_seed(1)
    return _randomise_bn(nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 5)))


def resnet() -> nn.Module:
    """manifex's SmallResNet (stem, two BasicBlocks with BN and residual sums, one with a projection)."""
    torch.manual_seed(2)
    return _randomise_bn(SmallResNet((2, 8, 8), 5, (4, 6)))


class FunctionalResNetBlock(nn.Module):
    """A residual block whose ReLUs are functional calls (Captum cannot see them; manifex can)."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv1, self.conv2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 2, 3, padding=1)
        self.head = nn.Linear(2 * 64, 5)
        self.functional = functional
        self.r1, self.r2 = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        act1 = F.relu if self.functional else self.r1
        act2 = torch.relu if self.functional else self.r2
        return self.head(act2(x + self.conv2(act1(self.conv1(x)))).flatten(1))


MODELS = {"relu_pool_cnn": relu_pool_cnn, "conv_pool_cnn": conv_pool_cnn, "resnet": resnet}
LAYERS = {"relu_pool_cnn": ["3", "4", "5"], "conv_pool_cnn": ["2", "3"], "resnet": ["stem", "blocks.0", "blocks.0.relu1", "blocks.1.conv2"]}


def data(n: int = 4):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 2, 8, 8, generator=g, dtype=F64), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2][:n])


def captum_per_example(make, x, y, **kwargs):
    """Captum at batch 1 (its max-pool rule takes the batch's first example's gradient where x and x̄ agree)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.cat([make().attribute(x[i : i + 1], target=int(y[i]), **kwargs) for i in range(len(x))])


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("baseline", [0.0, 0.3, "tensor"])
def test_deeplift_equals_captum(name, baseline):
    model = MODELS[name]()
    x, y = data()
    b = torch.linspace(-0.5, 0.5, 128, dtype=F64).view(2, 8, 8) if baseline == "tensor" else baseline
    ours = DeepLift(model, baseline=b)(x, y)
    ref = captum_per_example(lambda: captum_attr.DeepLift(model), x, y, baselines=b if not isinstance(b, torch.Tensor) else b[None])
    torch.testing.assert_close(ours, ref, **CAPTUM)
    assert ours.abs().max() > 1e-3


@pytest.mark.parametrize("name", list(MODELS))
def test_layer_attributions_equal_captum(name):
    model = MODELS[name]()
    x, y = data()
    modules = dict(model.named_modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for layer in LAYERS[name]:
            mod = modules[layer]
            ours = LayerDeepLift(model, layer, baseline=0.2)(x, y)
            ref = captum_per_example(lambda: captum_attr.LayerDeepLift(model, mod), x, y, baselines=0.2)
            torch.testing.assert_close(ours, ref, **CAPTUM)
            assert ours.shape == layer_activations(model, x, layer).shape
            torch.testing.assert_close(LayerGradientXActivation(model, layer)(x, y),
                                       captum_attr.LayerGradientXActivation(model, mod).attribute(x, target=y), **CAPTUM)
            torch.testing.assert_close(LayerGradient(model, layer)(x, y),
                                       captum_attr.LayerGradientXActivation(model, mod, multiply_by_inputs=False).attribute(x, target=y), **CAPTUM)
            torch.testing.assert_close(LayerIntegratedGradients(model, layer, steps=16, baseline=0.1)(x, y),
                                       captum_attr.LayerIntegratedGradients(model, mod).attribute(x, target=y, n_steps=16, baselines=0.1), **CAPTUM)


def test_maxpool_rules():
    """'rescale' = Captum's rule where a conv feeds the pool; where a ReLU feeds it Captum keeps the gradient
    ('captum' reproduces it, 'rescale' differs); 'rescale' keeps completeness there, the gradient does not."""
    x, y = data()
    conv_pool = conv_pool_cnn()
    ref = captum_per_example(lambda: captum_attr.DeepLift(conv_pool), x, y, baselines=0.3)
    torch.testing.assert_close(DeepLift(conv_pool, baseline=0.3, maxpool="rescale")(x, y), ref, **CAPTUM)
    relu_pool = relu_pool_cnn()
    captum_like = DeepLift(relu_pool, baseline=0.3)(x, y)
    rescale = DeepLift(relu_pool, baseline=0.3, maxpool="rescale")(x, y)
    torch.testing.assert_close(captum_like, DeepLift(relu_pool, baseline=0.3, maxpool="gradient")(x, y), **CAPTUM)
    assert (captum_like - rescale).abs().max() > 1e-4
    with torch.no_grad():
        delta = relu_pool(x).gather(1, y[:, None])[:, 0] - relu_pool(torch.full_like(x, 0.3)).gather(1, y[:, None])[:, 0]
    torch.testing.assert_close(rescale.sum((1, 2, 3)), delta, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["conv_pool_cnn", "resnet"])
def test_completeness_and_batch_equals_per_example(name):
    model = MODELS[name]()
    x, y = data(6)
    attr = DeepLift(model, baseline=0.1, maxpool="rescale")(x, y)
    with torch.no_grad():
        delta = (model(x) - model(torch.full_like(x, 0.1))).gather(1, y[:, None])[:, 0]
    torch.testing.assert_close(attr.sum((1, 2, 3)), delta, rtol=1e-9, atol=1e-12)
    single = torch.cat([DeepLift(model, baseline=0.1, maxpool="rescale")(x[i : i + 1], int(y[i])) for i in range(6)])
    torch.testing.assert_close(attr, single, rtol=1e-12, atol=1e-14)
    layer = LayerDeepLift(model, LAYERS[name][-1], baseline=0.1)
    torch.testing.assert_close(layer(x, y), torch.cat([layer(x[i : i + 1], int(y[i])) for i in range(6)]), rtol=1e-12, atol=1e-14)


def test_functional_relus_get_the_rule():
    x, y = data()
    modules, functional = FunctionalResNetBlock(False).to(F64), FunctionalResNetBlock(True).to(F64)
    ref = captum_per_example(lambda: captum_attr.DeepLift(modules), x, y, baselines=0.2)
    torch.testing.assert_close(DeepLift(functional, baseline=0.2)(x, y), ref, **CAPTUM)
    assert not torch.allclose(DeepLift(functional, baseline=0.2, functional="ignore")(x, y), ref)
    with pytest.raises(ModelError, match="functional ReLU"):
        DeepLift(functional, functional="error")(x, y)


def test_derivative_of_the_explanation_is_exact():
    """create_graph=True: d/dx Σ w ⊙ DeepLift(x) equals central finite differences (DeepLift's secant
    multipliers vary smoothly with x between sign changes), for the input and for a layer. A residual model
    without BatchNorm: preserve_model_state's buffer restore currently breaks double backprop through BN
    for every explainer (an in-place copy_ of the saved running statistics)."""
    model = FunctionalResNetBlock(True).to(F64)
    x, y = data(2)
    w = torch.randn(2, 2, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(7))
    for explainer, weight in ((DeepLift(model, baseline=0.2), w), (LayerDeepLift(model, "conv2", baseline=0.2), None)):
        xr = x.clone().requires_grad_(True)
        e = explainer(xr, y, create_graph=True)
        torch.testing.assert_close(e.detach(), explainer(x, y), rtol=1e-12, atol=1e-14)
        wt = weight if weight is not None else torch.randn(e.shape, dtype=F64, generator=torch.Generator().manual_seed(8))
        (grad,) = torch.autograd.grad((e * wt).sum(), xr)
        direction = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(9))
        h = 1e-6
        fd = ((explainer(x + h * direction, y) - explainer(x - h * direction, y)) * wt).sum() / (2 * h)
        torch.testing.assert_close((grad * direction).sum(), fd, rtol=1e-5, atol=1e-9)
        assert grad.abs().max() > 0


def test_smoothgrad_over_layer_deeplift_with_fixed_noise():
    model = resnet()
    x, y = data(3)
    noise = torch.randn(5, 2, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(4)) * 0.25
    inner = LayerDeepLift(model, "blocks.1", baseline=1.0)
    sg = SmoothGrad(inner, noise=noise, internal_batch_size=4)  # 4 rows per pass: chunks of samples
    expected = torch.stack([inner(x + noise[i], y) for i in range(5)]).mean(0)
    torch.testing.assert_close(sg(x, y), expected, rtol=1e-12, atol=1e-14)
    with pytest.raises(InputError, match="n_samples"):
        SmoothGrad(inner, noise=noise[:, :1])(x, y)


def test_explain_routes_layer_and_state_is_preserved():
    model = resnet()
    x, y = data(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    torch.testing.assert_close(manifex.explain(model, x, y, method="deeplift", layer="blocks.1", baseline=0.5),
                               LayerDeepLift(model, "blocks.1", baseline=0.5)(x, y))
    torch.testing.assert_close(manifex.explain(model, x, y, method="dl", baseline=0.5), DeepLift(model, baseline=0.5)(x, y))
    torch.testing.assert_close(manifex.explain(model, x, y, method="ixg", layer="stem"), LayerGradientXActivation(model, "stem")(x, y))
    torch.testing.assert_close(manifex.explain(model, x, y, method="ig", layer="blocks.0", steps=8),
                               LayerIntegratedGradients(model, "blocks.0", steps=8)(x, y))
    sg = manifex.explain(model, x, y, method="smoothgrad", base="deeplift", layer="blocks.1", sigma=0.1, n_samples=3)
    assert sg.shape == (3, 6, 4, 4)
    torch.testing.assert_close(manifex.explain(model, x, y, method="gradient", layer=None), manifex.explain(model, x, y))
    with pytest.raises(InputError, match="target"):  # raised after the hooked forward: hooks are removed
        DeepLift(model)(x, 99)
    with pytest.raises(InputError, match="target"):
        LayerDeepLift(model, "blocks.0")(x, 99)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_layer_errors():
    model = resnet()
    x, y = data(2)
    with pytest.raises(InputError, match="unknown layer 'blocks.7'.*blocks.0"):
        manifex.explain(model, x, y, method="deeplift", layer="blocks.7")
    with pytest.raises(InputError, match="no layer attribution.*deeplift"):
        manifex.explain(model, x, y, method="guided_backprop", layer="blocks.0")
    with pytest.raises(InputError, match="not a submodule"):
        resolve_layer(model, nn.ReLU())
    model.unused = nn.ReLU()
    with pytest.raises(ModelError, match="not used"):
        LayerDeepLift(model, "unused")(x, y)
    with pytest.raises(InputError, match="maxpool"):
        DeepLift(model, maxpool="max")
    with pytest.raises(InputError, match="baseline"):
        DeepLift(model, baseline=torch.zeros(3))(x, y)
    twice = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    shared = twice[0]
    twice.append(shared)
    with pytest.raises(ModelError, match="runs 2 times"):
        LayerGradient(twice, "0")(torch.randn(2, 4), 0)


# --- softmax rule (issue 16): Captum's rule on nn.Softmax, per example -------------------------------------

def softmax_mlp() -> nn.Module:
    """dense → ReLU → dense → Softmax: a classifier that outputs probabilities."""
    torch.manual_seed(11)
    return nn.Sequential(nn.Flatten(), nn.Linear(128, 16), nn.ReLU(), nn.Linear(16, 5), nn.Softmax(dim=1)).to(F64).eval()


def softmax_cnn() -> nn.Module:
    """conv → BN → ReLU → max-pool → dense → Softmax(dim=-1) (the pool after a ReLU: Captum keeps its gradient)."""
    torch.manual_seed(12)
    return _randomise_bn(nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 5), nn.Softmax(dim=-1)))


def softmax_inside() -> nn.Module:
    """a softmax gate in the middle (followed only by linear layers): dense → Softmax → dense → ReLU → dense."""
    torch.manual_seed(13)
    return nn.Sequential(nn.Flatten(), nn.Linear(128, 10), nn.Softmax(dim=1), nn.Linear(10, 8), nn.ReLU(),
                         nn.Linear(8, 5)).to(F64).eval()


def softmax_resnet() -> nn.Module:
    """manifex's SmallResNet (BN, residual sums) with a softmax head."""
    return nn.Sequential(resnet(), nn.Softmax(dim=1)).to(F64).eval()


SOFTMAX_MODELS = {"mlp": softmax_mlp, "cnn": softmax_cnn, "inside": softmax_inside, "resnet": softmax_resnet}


@pytest.mark.parametrize("name", list(SOFTMAX_MODELS))
@pytest.mark.parametrize("baseline", [0.0, 0.3])
def test_softmax_rule_equals_captum(name, baseline):
    """Captum's softmax rule (per-example: Captum called at batch 1; see the batching test below). Before the
    rule, manifex differed from Captum by up to 6e-2 here; float64 to rtol 1e-9 (a handful of float64
    operations, each exact to 1e-16 relative)."""
    model = SOFTMAX_MODELS[name]()
    x, y = data(5)
    ours = DeepLift(model, baseline=baseline)(x, y)
    ref = captum_per_example(lambda: captum_attr.DeepLift(model), x, y, baselines=baseline)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-13)
    assert ours.abs().max() > 1e-4


def test_softmax_rule_layer_attribution_equals_captum():
    model = softmax_cnn()
    x, y = data(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for layer in ("2", "6"):
            mod = dict(model.named_modules())[layer]
            ours = LayerDeepLift(model, layer, baseline=0.2)(x, y)
            ref = captum_per_example(lambda: captum_attr.LayerDeepLift(model, mod), x, y, baselines=0.2)
            torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-13)


def test_softmax_rule_sum_is_the_stated_one():
    """A softmax head (rule-carrying layers before it keep completeness to each logit's change Δz_j): the
    attributions sum to Δy_t − m̄·ΣΔz with m̄ = (Δy_t/Δz_t)/C, the docstring's formula, not to Δy_t."""
    model = softmax_mlp()
    x, y = data(4)
    attr = DeepLift(model, baseline=0.2)(x, y)
    with torch.no_grad():
        ref = torch.full_like(x, 0.2)
        dz = model[:-1](x) - model[:-1](ref)
        dy = (model(x) - model(ref)).gather(1, y[:, None])[:, 0]
    m_bar = dy / dz.gather(1, y[:, None])[:, 0] / dz.shape[1]
    torch.testing.assert_close(attr.sum((1, 2, 3)), dy - m_bar * dz.sum(1), rtol=1e-9, atol=1e-13)
    assert (attr.sum((1, 2, 3)) - dy).abs().max() > 1e-3


def test_softmax_rule_is_per_example_where_captum_mixes_the_batch():
    """Captum subtracts the mean over its whole [x; x̄] tensor, so its batched result depends on the other
    examples; manifex's equals the per-example one (and Captum's at batch 1)."""
    model = softmax_mlp()
    x, y = data(4)
    batched = DeepLift(model, baseline=0.1)(x, y)
    single = torch.cat([DeepLift(model, baseline=0.1)(x[i : i + 1], int(y[i])) for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=1e-12, atol=1e-15)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captum_batched = captum_attr.DeepLift(model).attribute(x, target=y, baselines=0.1)
    assert (captum_batched - single).abs().max() > 1e-6


def test_softmax_rule_derivative_and_errors():
    """create_graph=True differentiates the rule exactly (finite differences); a softmax over the batch
    dimension is refused in one line, and the model is left without hooks."""
    model = softmax_mlp()
    x, y = data(2)
    xr = x.clone().requires_grad_(True)
    e = DeepLift(model, baseline=0.2)(xr, y, create_graph=True)
    w = torch.randn(e.shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    (grad,) = torch.autograd.grad((e * w).sum(), xr)
    d = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(4))
    h = 1e-6
    fd = ((DeepLift(model, baseline=0.2)(x + h * d, y) - DeepLift(model, baseline=0.2)(x - h * d, y)) * w).sum() / (2 * h)
    torch.testing.assert_close((grad * d).sum(), fd, rtol=1e-5, atol=1e-9)
    bad = nn.Sequential(nn.Flatten(), nn.Linear(128, 5), nn.Softmax(dim=0)).to(F64)
    with pytest.raises(InputError, match="dimension 0.*batch"):
        DeepLift(bad)(x, y)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in bad.modules())
