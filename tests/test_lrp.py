"""Tests of layer-wise relevance propagation (``manifex.attribution.lrp``).

Reference: Captum 0.9 ``captum.attr.LRP`` (ε, γ, α1β0; float64, 1e-5). Invariants: conservation on bias-free
ReLU networks, LRP-0 = gradient × input, z^B / flat / w² input layers conserve. Second order against central
differences. Canonizers (BatchNorm folding, residual sums), the explainer contract (batching, targets, model
state after success and failure) and the rule assignment of composites and the VGG γ schedule.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from manifex.attribution import InputXGradient
from manifex.attribution.lrp import (
    AVGPOOL_TYPES,
    CONV_TYPES,
    LINEAR_TYPES,
    LRP,
    AlphaBeta,
    BatchNormFolding,
    Composite,
    Epsilon,
    EpsilonAlpha2Beta1,
    EpsilonGammaBox,
    EpsilonPlus,
    Flat,
    Gamma,
    GammaByBlock,
    LRPEpsilon,
    LRPEpsilonGammaBox,
    LRPEpsilonPlus,
    LRPGamma,
    LRPZPlus,
    Norm,
    Pass,
    ResidualSum,
    WSquare,
    ZBox,
    ZPlus,
    vgg16_gamma_preset,
)
from manifex.errors import InputError, ModelError
from manifex.models.classifiers import SmallResNet

try:  # Captum is a test extra; the reference comparisons are skipped without it.
    import captum.attr as captum_attr
    from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule, GammaRule
except ImportError:  # pragma: no cover
    captum_attr = None

needs_captum = pytest.mark.skipif(captum_attr is None, reason="captum is not installed")

F64 = torch.float64
TIGHT = dict(rtol=1e-9, atol=1e-12)
CAPTUM = dict(rtol=1e-5, atol=1e-9)
HOOK_ATTRS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
Y = torch.tensor([0, 2, 4, 1])


def close(a, b, **tol):
    torch.testing.assert_close(a, b, **(tol or TIGHT))


def seeded(seed):
    torch.manual_seed(seed)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def total(relevance):
    return relevance.flatten(1).sum(1)


def logit(model, x, target):
    with torch.no_grad():
        return model(x).gather(1, target[:, None]).squeeze(1)


# --------------------------------------------------------------------------------------------------------
# models


class CaptumCNN(nn.Module):
    """Only leaf layers Captum's LRP supports, each used once; flattening inside forward."""

    def __init__(self, bias: bool, batchnorm: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1, bias=bias)
        self.bn1 = nn.BatchNorm2d(3) if batchnorm else None  # Captum has no rule for nn.Identity
        self.relu1, self.pool1 = nn.ReLU(), nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1, bias=bias)
        self.relu2, self.pool2 = nn.ReLU(), nn.AvgPool2d(2)
        self.fc1, self.relu3, self.fc2 = nn.Linear(16, 8, bias=bias), nn.ReLU(), nn.Linear(8, 5, bias=bias)

    def forward(self, x):
        x = self.conv1(x)
        x = self.pool1(self.relu1(self.bn1(x) if self.bn1 is not None else x))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(x.flatten(1))))


class CaptumMLP(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.fc1, self.relu1 = nn.Linear(64, 12, bias=bias), nn.ReLU()
        self.fc2, self.relu2 = nn.Linear(12, 10, bias=bias), nn.ReLU()
        self.fc3 = nn.Linear(10, 5, bias=bias)

    def forward(self, x):
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(x.flatten(1))))))


def build(cls, *args, seed=0, **kwargs):
    seeded(seed)
    return cls(*args, **kwargs).to(F64).eval()


def relu_cnn(bias: bool = False, inplace: bool = False, seed: int = 0) -> nn.Sequential:
    """conv-relu-maxpool-conv-relu-avgpool-flatten-linear-relu-linear on (1, 8, 8), 5 classes."""
    seeded(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1, bias=bias), nn.ReLU(inplace), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1, bias=bias), nn.ReLU(inplace), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(16, 8, bias=bias), nn.ReLU(inplace), nn.Linear(8, 5, bias=bias),
    ).to(F64).eval()


def relu_conv1d(bias: bool = False) -> nn.Sequential:
    """Conv1d, ConvTranspose1d and a strided Conv1d: the other linear layer types."""
    seeded(3)
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1, bias=bias), nn.ReLU(),
        nn.ConvTranspose1d(3, 4, 3, stride=2, padding=1, bias=bias), nn.ReLU(),
        nn.Conv1d(4, 2, 3, stride=2, bias=bias), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 7, 5, bias=bias),
    ).to(F64).eval()


def softplus_mlp() -> nn.Sequential:
    seeded(4)
    return nn.Sequential(
        nn.Linear(6, 10), nn.Softplus(), nn.Linear(10, 8), nn.Softplus(), nn.Linear(8, 4)
    ).to(F64).eval()


class Block(nn.Module):
    """conv-bn-act-conv-bn, plus the input, then act (the sum is a plain ``+`` or ``+=`` in forward)."""

    def __init__(self, c: int, act: type[nn.Module], bias: bool, bn: bool, inplace_add: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=bias)
        self.bn1 = nn.BatchNorm2d(c) if bn else nn.Identity()
        self.act1, self.act2 = act(), act()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=bias)
        self.bn2 = nn.BatchNorm2d(c) if bn else nn.Identity()
        self.inplace_add = inplace_add

    def forward(self, x):
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        if self.inplace_add:
            out += x
            return self.act2(out)
        return self.act2(out + x)


class ResNetLike(nn.Module):
    def __init__(self, act: type[nn.Module] = nn.ReLU, bias: bool = False, bn: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=bias), act())
        self.block1 = Block(3, act, bias, bn, inplace_add=False)
        self.block2 = Block(3, act, bias, bn, inplace_add=True)
        self.head = nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(3 * 4 * 4, 5, bias=bias))

    def forward(self, x):
        return self.head(self.block2(self.block1(self.stem(x))))


def randomize_batchnorm(model: nn.Module, *, centred: bool = False, seed: int = 7) -> nn.Module:
    """Non-trivial running statistics and affine parameters (``centred``: zero mean and shift)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_var.copy_(0.5 + torch.rand(c, generator=g, dtype=F64))
                m.weight.copy_(0.5 + torch.rand(c, generator=g, dtype=F64))
                if not centred:
                    m.running_mean.copy_(0.3 * torch.randn(c, generator=g, dtype=F64))
                    m.bias.copy_(0.3 * torch.randn(c, generator=g, dtype=F64))
    return model


def epsilon0(**kw) -> Composite:
    """LRP-0 everywhere, average pooling included (exactly conservative on bias-free networks)."""
    return Composite([(LINEAR_TYPES + AVGPOOL_TYPES, Epsilon(0.0))], **kw)


def snapshot(model: nn.Module) -> dict:
    return dict(
        training=[m.training for m in model.modules()],
        requires_grad=[p.requires_grad for p in model.parameters()],
        hooks=[{a: list(getattr(m, a).items()) for a in HOOK_ATTRS} for m in model.modules()],
        tensors={k: (v, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()},
        grads=[p.grad for p in model.parameters()],
    )


def assert_same_state(before: dict, model: nn.Module) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["hooks"] == before["hooks"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, (obj, saved) in before["tensors"].items():
        now, _ = after["tensors"][k]
        assert now is obj, f"{k} was replaced"
        assert torch.equal(now.detach(), saved) and now.dtype == saved.dtype, f"{k} changed"
    assert all(g is None for g in after["grads"])


# --------------------------------------------------------------------------------------------------------
# against Captum


CAPTUM_RULES = {
    # name: (manifex rule, Captum rule factory, inputs); Captum's rules keep the bias and use ε = 1e-9
    "epsilon": (Epsilon(0.1), lambda: EpsilonRule(0.1) if captum_attr else None, randn),
    # Captum's GammaRule is the textbook γ rule (w + γw⁺ for every output); manifex's default is sign-aware
    "gamma": (Gamma(0.25, stabilizer=1e-9, bias="keep", mode="textbook"), lambda: GammaRule(0.25), randn),
    # Captum's α1β0 uses w⁺ on every input; manifex splits x⁺w⁺ + x⁻w⁻: equal for non-negative inputs
    "alpha1beta0": (ZPlus(stabilizer=1e-9, bias="keep"), lambda: Alpha1_Beta0_Rule(), rand),
}


def captum_lrp(model: nn.Module, rule_factory, x, target, bn_rule=False):
    ref_model = copy.deepcopy(model)  # Captum writes rules (and, during the call, weights) into the modules
    for m in ref_model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) or (bn_rule and isinstance(m, nn.BatchNorm2d)):
            m.rule = rule_factory()
    return captum_attr.LRP(ref_model).attribute(x.clone(), target=target)


@needs_captum
@pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")
@pytest.mark.parametrize("rule", sorted(CAPTUM_RULES))
@pytest.mark.parametrize("bias", [False, True], ids=["bias_free", "biased"])
@pytest.mark.parametrize("arch", ["cnn", "mlp"])
def test_equals_captum(arch, bias, rule):
    model = build(CaptumCNN if arch == "cnn" else CaptumMLP, bias)
    mine, theirs, inputs = CAPTUM_RULES[rule]
    x = inputs(4, 1, 8, 8, seed=1)
    expected = captum_lrp(model, theirs, x, Y)
    # Captum: ε (1e-9) on pooling layers; max pooling differs from ours (pure gradient) only by that ε
    composite = Composite([(LINEAR_TYPES, mine), (AVGPOOL_TYPES, Norm(1e-9))])
    got = LRP(model, composite, canonizers=())(x, Y)
    close(got, expected, **CAPTUM)
    assert got.abs().max() > 1e-4


@needs_captum
@pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")
def test_equals_captum_with_batchnorm_as_a_layer():
    """Without folding, an ε rule on an eval-mode BatchNorm treats it as a per-channel affine layer (as Captum)."""
    model = randomize_batchnorm(build(CaptumCNN, True, batchnorm=True))
    x = randn(4, 1, 8, 8, seed=2)
    expected = captum_lrp(model, lambda: EpsilonRule(0.1), x, Y, bn_rule=True)
    composite = Composite([(LINEAR_TYPES + (nn.BatchNorm2d,), Epsilon(0.1)), (AVGPOOL_TYPES, Norm(1e-9))])
    close(LRP(model, composite, canonizers=())(x, Y), expected, **CAPTUM)


# --------------------------------------------------------------------------------------------------------
# invariants


@pytest.mark.parametrize("bias", [False, True], ids=["bias_free", "biased"])
@pytest.mark.parametrize("arch", ["cnn2d", "conv1d_transpose"])
def test_lrp0_equals_gradient_times_input(arch, bias):
    """On ReLU networks LRP-0 is gradient × input, biases or not (relevance absorbed by biases on both sides)."""
    if arch == "cnn2d":
        model, x = relu_cnn(bias), randn(4, 1, 8, 8, seed=3)
    else:
        model, x = relu_conv1d(bias), randn(4, 2, 8, seed=3)
    close(LRP(model, epsilon0())(x, Y), InputXGradient(model)(x, Y))


@pytest.mark.parametrize(
    "rule", [Epsilon(0.0), Gamma(0.25, stabilizer=0.0), ZPlus(stabilizer=0.0), Gamma(1.0, stabilizer=0.0)],
    ids=["lrp0", "gamma", "zplus", "gamma1"],
)
def test_conservation_on_bias_free_relu_network(rule):
    model = relu_cnn(bias=False)
    x = rand(4, 1, 8, 8, seed=4)
    composite = Composite([(LINEAR_TYPES, rule), (AVGPOOL_TYPES, Epsilon(0.0))])
    relevance = LRP(model, composite)(x, Y)
    close(total(relevance), logit(model, x, Y))


def test_epsilon_absorbs_relevance():
    model = relu_cnn(bias=False)
    x = randn(4, 1, 8, 8, seed=4)
    r = LRP(model, Composite.uniform(Epsilon(0.5)))(x, Y)
    assert (total(r).abs() < logit(model, x, Y).abs()).all()


def test_zbox_first_layer_conserves():
    """z^B input layer with per-channel bounds; the rest γ / ε with zero stabilisers: sum R = logit."""
    seeded(5)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5, bias=False),
    ).to(F64).eval()
    low = torch.tensor([-1.0, -0.5, 0.0], dtype=F64).view(3, 1, 1)
    high = torch.tensor([1.0, 0.5, 2.0], dtype=F64).view(3, 1, 1)
    x = low + (high - low) * rand(4, 3, 8, 8, seed=5)
    x[0, :, :2] = low  # inputs at the bounds are fine too
    composite = EpsilonGammaBox(low, high, epsilon=0.0, stabilizer=0.0)
    assert isinstance(composite.assign(model)["0"], ZBox)
    relevance = LRP(model, composite)(x, Y)
    close(total(relevance), logit(model, x, Y))
    # the input layer rule matters: z^B differs from ε there
    eps_first = Composite([("0", Epsilon(0.0)), (CONV_TYPES, Gamma(0.25, stabilizer=0.0)), (nn.Linear, Epsilon(0.0))])
    assert not torch.allclose(LRP(model, eps_first)(x, Y), relevance)


@pytest.mark.parametrize("first", [Flat(stabilizer=0.0), WSquare(stabilizer=0.0)], ids=["flat", "wsquare"])
def test_flat_and_wsquare_input_layers_conserve(first):
    model = relu_cnn(bias=False)
    x = randn(4, 1, 8, 8, seed=6)
    relevance = LRP(model, epsilon0(first_layer=first))(x, Y)
    close(total(relevance), logit(model, x, Y))
    # the relevance of the input layer does not depend on the input values there, only on R at its output
    assert not torch.allclose(relevance, LRP(model, epsilon0())(x, Y))


def test_alpha_beta_is_alpha_positive_minus_beta_negative():
    model = relu_cnn(bias=True)
    x = rand(4, 1, 8, 8, seed=8)
    def first_conv(rule):
        return LRP(model, Composite([("0", rule), (LINEAR_TYPES, Epsilon(1e-6))]))(x, Y)

    plus = first_conv(AlphaBeta(1.0, 0.0))
    close(plus, first_conv(ZPlus()))
    # on one layer αβ is linear in (α, β): R(α2β1) = 2 R(α1β0) + R(α0β1), where R(α0β1) = −R⁻
    minus = first_conv(AlphaBeta(0.0, 1.0))
    close(first_conv(AlphaBeta(2.0, 1.0)), 2 * plus + minus)
    assert not torch.allclose(minus, torch.zeros_like(minus))


# --------------------------------------------------------------------------------------------------------
# the γ rule: sign-aware (default) and textbook


def linear_layer(weight, bias):
    layer = nn.Linear(weight.shape[1], weight.shape[0]).to(F64)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


def test_gamma_example_negative_logit():
    """One layer, x = [1, 1], w = [1, −1.2], b = 0, γ = 0.2: the logit is −0.2. The textbook rule's
    denominator 1.2 − 1.2 cancels (R ≈ ±2.4e5, only the stabiliser left); the sign-aware rule boosts w⁻."""
    layer = linear_layer(torch.tensor([[1.0, -1.2]], dtype=F64), torch.zeros(1, dtype=F64))
    x = torch.ones(1, 2, dtype=F64)
    textbook = LRP(layer, Composite.uniform(Gamma(0.2, mode="textbook")), canonizers=())(x, 0)
    close(textbook, torch.tensor([[-2.4e5, 2.4e5]], dtype=F64), rtol=1e-6, atol=0.0)
    sign_aware = LRP(layer, Composite.uniform(Gamma(0.2)), canonizers=())(x, 0)
    # z' = 1 − 1.2·1.2 = −0.44 (stabilised by −1e-6): R = [1, −1.44] · (−0.2) / z'
    close(sign_aware, torch.tensor([[1.0, -1.44]], dtype=F64) * -0.2 / (-0.44 - 1e-6))
    close(sign_aware, torch.tensor([[0.4545, -0.6545]], dtype=F64), rtol=0.0, atol=1e-4)
    assert Gamma(0.2) == Gamma(0.2, mode="sign_aware") != Gamma(0.2, mode="textbook")


def gamma_by_hand(x, weight, bias, r_out, gamma, stabilizer, mode):
    """R_i = Σ_j c'_ij R_j / stab(z'_j) with the boosted contributions c'_ij written out (float64)."""
    boost_p, boost_n = weight + gamma * weight.clamp(min=0), weight + gamma * weight.clamp(max=0)
    xp, xn = x.clamp(min=0)[:, :, None], x.clamp(max=0)[:, :, None]  # (N, I, 1)
    if mode == "textbook":
        c = x[:, :, None] * boost_p.T  # (N, I, J)
        d = c.sum(1) + bias + gamma * bias.clamp(min=0)
    else:
        positive = (x @ weight.T + bias >= 0)[:, None, :]
        c = torch.where(positive, xp * boost_p.T + xn * boost_n.T, xp * boost_n.T + xn * boost_p.T)
        d = c.sum(1) + torch.where(positive[:, 0], bias + gamma * bias.clamp(min=0), bias + gamma * bias.clamp(max=0))
    d = d + torch.where(d >= 0, stabilizer, -stabilizer)
    return (c * (r_out / d)[:, None, :]).sum(2)


@pytest.mark.parametrize("mode", ["sign_aware", "textbook"])
def test_gamma_equals_the_formula(mode):
    """Mixed-sign inputs, weights, biases and outputs: the rule's relevance equals the written-out formula."""
    x, weight, bias, r_out = randn(6, 7, seed=40), randn(5, 7, seed=41), randn(5, seed=42), randn(6, 5, seed=43)
    assert ((x @ weight.T + bias) < 0).any() and ((x @ weight.T + bias) > 0).any()
    rule = Gamma(0.3, stabilizer=1e-3, mode=mode)
    got = rule.relevance(torch.nn.functional.linear, x, r_out, weight, bias)
    close(got, gamma_by_hand(x, weight, bias, r_out, 0.3, 1e-3, mode))
    # the variants agree where inputs are non-negative and outputs positive
    x_pos = x.abs()
    w_pos = weight.abs()
    close(Gamma(0.3, mode="textbook").relevance(torch.nn.functional.linear, x_pos, r_out, w_pos, bias.abs()),
          Gamma(0.3).relevance(torch.nn.functional.linear, x_pos, r_out, w_pos, bias.abs()))


def test_gamma_variants_agree_on_conv_relu_networks_with_epsilon_on_dense_layers():
    """A negative pre-activation followed by a ReLU receives no relevance, so only positive outputs matter."""
    model, x = relu_cnn(bias=True), rand(4, 1, 8, 8, seed=44)
    sign_aware = LRP(model, EpsilonGammaBox(0.0, 1.0))(x, Y)
    close(sign_aware, LRP(model, EpsilonGammaBox(0.0, 1.0, gamma_mode="textbook"))(x, Y))
    assert sign_aware.abs().max() > 1e-3


def test_gamma_on_a_residual_net_is_bounded_and_conserves():
    """SmallResNet (BatchNorm folded, residual sums) with the ε-γ-box preset, bias-free and zero stabilisers:
    the sign-aware default conserves (Σ R = logit) and its total |R| stays below LRP-0's; the textbook rule
    also conserves but its denominators nearly cancel on negative pre-activations (15× the logits here)."""
    seeded(2)
    model = randomize_batchnorm(SmallResNet((1, 8, 8), 5, widths=(4, 6)).to(F64).eval(), centred=True, seed=2)
    with torch.no_grad():
        model.head[-1].bias.zero_()
    x, target = rand(16, 1, 8, 8, seed=2), torch.arange(16) % 5
    z = logit(model, x, target)
    canonizers = [BatchNormFolding(), ResidualSum(stabilizer=0.0)]

    def relevance(**options):
        composite = EpsilonGammaBox(0.0, 1.0, epsilon=0.0, stabilizer=0.0, **options)
        composite.rules.insert(0, (AVGPOOL_TYPES, Norm(0.0)))  # no ε on the global average pool either
        return LRP(model, composite, canonizers=canonizers)(x, target)

    def amplification(r):
        return float(r.abs().sum() / z.abs().sum())

    assert EpsilonGammaBox().rules[0][1] == Gamma(0.25)  # the preset's rule is the sign-aware default
    sign_aware, textbook, lrp0 = relevance(), relevance(gamma_mode="textbook"), relevance(gamma=0.0)
    close(total(sign_aware), z)
    close(total(textbook), z)
    assert amplification(sign_aware) <= amplification(lrp0) < 1.5
    assert amplification(textbook) > 10.0
    assert (sign_aware.flatten(1).abs().sum(1) / z.abs()).max() < 5.0 < (textbook.flatten(1).abs().sum(1) / z.abs()).max()


# --------------------------------------------------------------------------------------------------------
# second order


T3 = torch.tensor([0, 2, 3])  # targets for the 4-class Softplus MLP


def assert_second_order_matches_central_differences(explainer, x, target, n_directions=4, h=1e-5):
    """d/dx Σ R(x)·v from create_graph=True against Richardson-extrapolated central differences (O(h⁴))."""
    v = randn(*x.shape, seed=11)
    xr = x.clone().requires_grad_(True)
    relevance = explainer.attribute(xr, target, create_graph=True)
    assert relevance.requires_grad
    (grad,) = torch.autograd.grad((relevance * v).sum(), xr)
    assert grad.abs().max() > 0
    for k in range(n_directions):
        u = randn(*x.shape, seed=20 + k)
        def central(step):
            return ((explainer(x + step * u, target) - explainer(x - step * u, target)) * v).sum() / (2 * step)

        close((grad * u).sum(), (4 * central(h / 2) - central(h)) / 3, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "composite",
    [
        Composite.uniform(Epsilon(0.05)),
        Composite.uniform(Gamma(0.25)),
        Composite.uniform(AlphaBeta(2.0, 1.0)),
        Composite.uniform(ZPlus()),
        Composite([(nn.Linear, Epsilon(0.01))], first_layer=ZBox(-3.0, 3.0)),
        Composite([(nn.Linear, Epsilon(0.01))], first_layer=Flat()),
    ],
    ids=["epsilon", "gamma", "alpha2beta1", "zplus", "zbox_first", "flat_first"],
)
def test_second_order_matches_finite_differences_softplus_mlp(composite):
    assert_second_order_matches_central_differences(LRP(softplus_mlp(), composite), randn(3, 6, seed=9), T3)


def test_second_order_through_batchnorm_folding_and_residual_sums():
    """Softplus ResNet-like model with BatchNorm: folded conv rules, ε sums and Pass, all differentiated.

    (Stabilisers of 0.01: with 1e-6 some sums come so close to 0 that the relevance is steep enough to need
    much smaller finite-difference steps; the derivative is still right, the check just gets ill-conditioned.)
    """
    model = randomize_batchnorm(build(ResNetLike, nn.Softplus, True, True, seed=10))
    lrp = LRP(model, EpsilonGammaBox(-4.0, 4.0, epsilon=0.01, gamma=0.25, stabilizer=0.01),
              canonizers=[BatchNormFolding(), ResidualSum(stabilizer=0.01)])
    assert_second_order_matches_central_differences(lrp, randn(2, 1, 8, 8, seed=10), Y[:2], n_directions=3)


def test_second_order_of_lrp0_equals_that_of_gradient_times_input():
    model = relu_cnn(bias=True)
    x = randn(4, 1, 8, 8, seed=12).requires_grad_(True)
    v = randn(4, 1, 8, 8, seed=13)
    (ours,) = torch.autograd.grad((LRP(model, epsilon0())(x, Y, create_graph=True) * v).sum(), x)
    (reference,) = torch.autograd.grad((InputXGradient(model)(x, Y, create_graph=True) * v).sum(), x)
    close(ours, reference)


def test_active_flag_governs_later_backward_passes():
    """Differentiating the relevance while the rules are still active gives a different (wrong) derivative."""
    model = softplus_mlp()
    lrp = LRP(model, Composite.uniform(Gamma(0.5)))
    x = randn(3, 6, seed=14).requires_grad_(True)
    v = randn(3, 6, seed=15)
    (right,) = torch.autograd.grad((lrp(x, T3, create_graph=True) * v).sum(), x)
    with lrp.context() as session:
        assert session.active
        score = model(x).gather(1, T3[:, None]).sum()
        (relevance,) = torch.autograd.grad(score, x, create_graph=True)
        (wrong,) = torch.autograd.grad((relevance * v).sum(), x, retain_graph=True)
        session.active = False
        (again,) = torch.autograd.grad((relevance * v).sum(), x)
    assert not session.active
    assert not torch.allclose(wrong, right)
    close(again, right)


# --------------------------------------------------------------------------------------------------------
# canonizers


def bn_model() -> nn.Module:
    """BatchNorm after Conv2d (inside a Sequential), after Conv2d (attribute style, in blocks) and after Linear."""
    model = ResNetLike(bias=True, bn=True)
    model.head = nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(48, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 5))
    model.stem = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())
    return randomize_batchnorm(model.to(F64).eval())


def fold_by_hand(model: nn.Module) -> nn.Module:
    """A copy with every (Conv/Linear, BatchNorm) pair merged into the layer and the BatchNorm an Identity."""
    folded = copy.deepcopy(model)

    def merge(layer, bn):
        with torch.no_grad():
            std = (bn.running_var + bn.eps).sqrt()
            w = layer.weight * (bn.weight / std).view(-1, *([1] * (layer.weight.dim() - 1)))
            b = (layer.bias - bn.running_mean) * bn.weight / std + bn.bias
            layer.weight.copy_(w)
            layer.bias.copy_(b)

    merge(folded.stem[0], folded.stem[1])
    folded.stem[1] = nn.Identity()
    for block in (folded.block1, folded.block2):
        merge(block.conv1, block.bn1)
        merge(block.conv2, block.bn2)
        block.bn1, block.bn2 = nn.Identity(), nn.Identity()
    merge(folded.head[2], folded.head[3])
    folded.head[3] = nn.Identity()
    return folded


def test_batchnorm_folding_keeps_the_output_and_restores_everything():
    model = bn_model()
    x = randn(4, 1, 8, 8, seed=16)
    expected = model(x)
    before = snapshot(model)
    lrp = LRP(model, EpsilonPlus())
    with lrp.context():
        during = model(x)
    close(during, expected, rtol=1e-12, atol=1e-13)
    lrp(x, Y)
    assert_same_state(before, model)
    with pytest.raises(InputError, match="target indices"):
        lrp(x, 7)
    assert_same_state(before, model)
    with pytest.raises(KeyError):
        with lrp.context():
            model(x)
            raise KeyError("boom")
    assert_same_state(before, model)
    close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("composite", [EpsilonPlus(), Composite.uniform(Epsilon(0.0)), EpsilonGammaBox(-3, 3)],
                         ids=["epsilon_plus", "lrp0", "epsilon_gamma_box"])
def test_lrp_on_batchnorm_model_equals_lrp_on_folded_model(composite):
    model = bn_model()
    x = randn(4, 1, 8, 8, seed=17)
    close(LRP(model, composite)(x, Y), LRP(fold_by_hand(model), composite)(x, Y), rtol=1e-8, atol=1e-12)


def test_batchnorm_errors():
    x = randn(2, 1, 8, 8)
    seeded(0)
    first = nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 3)).to(F64).eval()
    with pytest.raises(ModelError, match=r"cannot fold BatchNorm '0'.*Composite\(rules=\[\('0', Epsilon\(\)\)"):
        LRP(first)(x, 0)
    # with a rule of its own it is explained as an affine layer
    assert torch.isfinite(LRP(first, Composite([(nn.BatchNorm2d, Epsilon()), (LINEAR_TYPES, Epsilon())]))(x, 0)).all()
    # without the canonizer it is an uncovered layer with parameters
    with pytest.raises(ModelError, match=r"no rule for the layer\(s\) '0' \(BatchNorm2d\)"):
        LRP(first, canonizers=())
    training = bn_model().train()
    with pytest.raises(ModelError, match="eval mode"):
        LRP(training)(x, 0)


def residual_conservation_gap(model, x, canonizers):
    relevance = LRP(model, epsilon0(), canonizers=canonizers)(x, Y)
    return (total(relevance) - logit(model, x, Y)).abs().max()


def test_residual_sum_conserves_relevance():
    """``out + x`` and ``out += x`` in forward: with ResidualSum relevance is conserved; without it the
    gradient of ``+`` gives both summands the full relevance."""
    model = build(ResNetLike, seed=18)
    x = rand(4, 1, 8, 8, seed=18)
    assert residual_conservation_gap(model, x, [ResidualSum(stabilizer=0.0)]) < 1e-12
    assert residual_conservation_gap(model, x, []) > 1e-3
    # restricted to one block type, the other block's sum is left as it is
    only_block1 = ResidualSum(lambda name, m: name == "block1", stabilizer=0.0)
    assert residual_conservation_gap(model, x, [only_block1]) > 1e-3


def test_project_resnet_with_both_canonizers_conserves():
    """SmallResNet (BatchNorm + residual sums): centred BatchNorm and no biases make it exactly conservative."""
    seeded(19)
    model = randomize_batchnorm(SmallResNet((1, 8, 8), 5, widths=(2, 3)).to(F64).eval(), centred=True)
    with torch.no_grad():
        model.head[-1].bias.zero_()
    x = rand(4, 1, 8, 8, seed=19)
    before = snapshot(model)
    relevance = LRP(model, epsilon0(), canonizers=[BatchNormFolding(), ResidualSum(stabilizer=0.0)])(x, Y)
    close(total(relevance), logit(model, x, Y))
    assert_same_state(before, model)
    # the defaults (stabiliser 1e-6 on sums) run on it too
    assert torch.isfinite(LRP(model)(x, Y)).all()


class _Reused(nn.Module):
    """One Softplus module applied twice (the hooks fire once per call)."""

    def __init__(self, shared: bool) -> None:
        super().__init__()
        seeded(30)
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 4)
        self.act1 = nn.Softplus()
        self.act2 = self.act1 if shared else nn.Softplus()

    def forward(self, x):
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))


def test_reused_modules_and_a_single_layer_model():
    x = randn(3, 6, seed=31)
    composite = Composite.uniform(Epsilon(0.01))
    close(LRP(_Reused(True).to(F64), composite)(x, T3), LRP(_Reused(False).to(F64), composite)(x, T3))
    seeded(32)
    linear = nn.Linear(6, 4, bias=False).to(F64)
    relevance = LRP(linear, Composite.uniform(Epsilon(0.0)))(x, T3)
    close(relevance, x * linear.weight[T3])


def test_inplace_activations_equal_out_of_place():
    x = randn(4, 1, 8, 8, seed=21)
    for composite in (EpsilonPlus(), epsilon0()):
        close(LRP(relu_cnn(inplace=True), composite)(x, Y), LRP(relu_cnn(), composite)(x, Y))


# --------------------------------------------------------------------------------------------------------
# the explainer contract


EXPLAINERS = [
    ("epsilon_plus", lambda m: LRP(m)),
    ("epsilon", lambda m: LRPEpsilon(m, epsilon=0.01)),
    ("gamma", lambda m: LRPGamma(m)),
    ("zplus", lambda m: LRPZPlus(m)),
    ("alpha2beta1", lambda m: LRP(m, EpsilonAlpha2Beta1())),
    ("epsilon_gamma_box", lambda m: LRPEpsilonGammaBox(m, low=-3.0, high=3.0)),
]
IDS = [n for n, _ in EXPLAINERS]


@pytest.mark.parametrize("name,factory", EXPLAINERS, ids=IDS)
def test_batched_equals_per_example_and_targets(name, factory):
    model = bn_model()
    x = randn(4, 1, 8, 8, seed=22)
    x0 = x.clone()
    lrp = factory(model)
    batched = lrp(x, Y)
    assert batched.shape == x.shape and batched.dtype == x.dtype and torch.isfinite(batched).all()
    close(batched, torch.cat([lrp(x[i : i + 1], Y[i : i + 1]) for i in range(4)]))
    close(batched, torch.cat([lrp(x[i : i + 1], int(Y[i])) for i in range(4)]))
    close(lrp(x, 3), torch.cat([lrp(x[i : i + 1], 3) for i in range(4)]))
    close(lrp(x, lambda out: out.argmax(1)), lrp(x, model(x).argmax(1)))
    assert torch.equal(x, x0)


def _stateful_model():
    """Train mode with Dropout, frozen parameters and user hooks of three kinds."""
    seeded(23)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.Tanh(), nn.Dropout(0.5), nn.Linear(12, 5)).to(F64).train()
    model[1].bias.requires_grad_(False)
    model[-1].weight.requires_grad_(False)
    calls = []
    model[1].register_forward_hook(lambda mod, inp, out: calls.append(1))
    model[1].register_forward_pre_hook(lambda mod, inp: None)
    model[-1].register_full_backward_hook(lambda mod, gin, gout: None)
    return model, calls


@pytest.mark.parametrize("name,factory", EXPLAINERS, ids=IDS)
def test_model_state_unchanged_after_success_and_failure(name, factory):
    model, calls = _stateful_model()
    before = snapshot(model)
    x = randn(4, 1, 8, 8, seed=24).requires_grad_(True)
    out = factory(model)(x, Y)
    assert calls and not out.requires_grad and x.grad is None
    assert_same_state(before, model)
    assert model.training
    with pytest.raises(InputError, match="target indices"):
        factory(model)(x, 5)
    assert_same_state(before, model)


class _Failing(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = relu_cnn()

    def forward(self, x):
        self.net(x)
        raise RuntimeError("forward failed")


def test_hooks_removed_when_the_forward_raises():
    model = _Failing()
    before = snapshot(model)
    lrp = LRP(model)
    with pytest.raises(RuntimeError, match="forward failed"):
        lrp(randn(2, 1, 8, 8), 0)
    assert_same_state(before, model)
    with pytest.raises(RuntimeError, match="forward failed"):
        with lrp:
            model(randn(2, 1, 8, 8))
    assert_same_state(before, model)


def test_context_gives_relevance_by_hand():
    model = bn_model()
    lrp = LRP(model, EpsilonPlus())
    x = randn(4, 1, 8, 8, seed=25).requires_grad_(True)
    with lrp.context() as session:
        assert set(session.rules) >= {"stem.0", "block1.conv1", "head.5", "stem.2"}
        assert isinstance(session.rules["stem.2"], Pass) and isinstance(session.rules["head.5"], Epsilon)
        (by_hand,) = torch.autograd.grad(model(x).gather(1, Y[:, None]).sum(), x)
    close(by_hand, lrp(x.detach(), Y))
    with lrp as session:  # the explainer itself is a context manager too
        (again,) = torch.autograd.grad(model(x).gather(1, Y[:, None]).sum(), x)
    close(again, by_hand)
    assert all(not getattr(m, a) for m in model.modules() for a in HOOK_ATTRS)


class _WithBilinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 4)
        self.bil = nn.Bilinear(4, 4, 5)

    def forward(self, x):
        h = self.fc(x.flatten(1))
        return self.bil(h, h)


class _Scale(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return x * self.scale


def test_uncovered_layers_raise_model_error_naming_them():
    with pytest.raises(ModelError, match=r"'bil' \(Bilinear\).*Composite\(rules=\[\('bil', Epsilon\(\)\)"):
        LRP(_WithBilinear().to(F64))
    with pytest.raises(ModelError, match="one tensor"):  # a rule cannot serve a two-input layer
        LRP(_WithBilinear().to(F64), Composite([(nn.Bilinear, Epsilon()), (nn.Linear, Epsilon())]))(randn(2, 1, 8, 8), 0)
    seeded(26)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.ReLU(), _Scale(6), nn.Linear(6, 3)).to(F64).eval()
    with pytest.raises(ModelError, match=r"'3' \(_Scale\)"):
        LRP(model)
    # the ε rule serves any single-input layer: here a diagonal linear map
    relevance = LRP(model, Composite([("3", Epsilon(0.0)), (nn.Linear, Epsilon(0.0))]))(randn(2, 1, 8, 8), 1)
    assert torch.isfinite(relevance).all()
    with pytest.raises(ModelError, match=r"modifies layer parameters.*'3' \(_Scale\)"):
        LRP(model, Composite([(_Scale, Gamma()), (nn.Linear, Epsilon())]))(randn(2, 1, 8, 8), 1)
    with pytest.raises(ModelError, match="nn.Module"):
        LRP(lambda x: x)


def test_float32():
    model = relu_cnn(bias=True).float()
    x = randn(4, 1, 8, 8, seed=27)
    r32 = LRP(model, EpsilonPlus())(x.float(), Y)
    r64 = LRP(model.double(), EpsilonPlus())(x, Y)
    assert r32.dtype == torch.float32
    close(r32.double(), r64, rtol=1e-3, atol=1e-3 * float(r64.abs().max()))


def test_convenience_classes_equal_their_composites():
    model = relu_cnn(bias=True)
    x = randn(4, 1, 8, 8, seed=28)
    pairs = [
        (LRPEpsilon(model, epsilon=0.1), Composite.uniform(Epsilon(0.1)), "lrp_epsilon"),
        (LRPGamma(model, gamma=0.5), Composite.uniform(Gamma(0.5)), "lrp_gamma"),
        (LRPZPlus(model), Composite.uniform(ZPlus()), "lrp_alpha1beta0"),
        (LRPEpsilonGammaBox(model, low=-3.0, high=3.0), EpsilonGammaBox(-3.0, 3.0), "lrp_epsilon_gamma_box"),
        (LRPEpsilonPlus(model), EpsilonPlus(), "lrp_epsilon_plus"),
    ]
    for explainer, composite, name in pairs:
        assert explainer.name == name and isinstance(explainer, LRP)
        close(explainer(x, Y), LRP(model, composite)(x, Y))
    assert LRP.name == "lrp"
    # repr states every option (the alignment pipeline keys its attribution cache on it)
    assert repr(LRPEpsilon(model, epsilon=0.1)) != repr(LRPEpsilon(model, epsilon=0.2))
    assert repr(LRPEpsilonGammaBox(model, low=-1.0)) != repr(LRPEpsilonGammaBox(model, low=-2.0))
    assert repr(LRP(model, canonizers=())) != repr(LRP(model))
    assert repr(GammaByBlock((0.5, 0.1))) != repr(GammaByBlock((0.5, 0.2)))
    assert repr(LRPGamma(model)) != repr(LRPGamma(model, gamma_mode="textbook"))
    assert repr(LRPEpsilonGammaBox(model)) != repr(LRPEpsilonGammaBox(model, gamma_mode="textbook"))
    assert repr(vgg16_gamma_preset()) != repr(vgg16_gamma_preset(gamma_mode="textbook"))
    close(LRPGamma(model, gamma_mode="textbook")(x, Y), LRP(model, Composite.uniform(Gamma(mode="textbook")))(x, Y))


# --------------------------------------------------------------------------------------------------------
# composites


def test_composite_selectors_first_match_wins():
    model = relu_cnn()
    composite = Composite([
        ("3", Gamma(0.1)),  # exact name
        (lambda name, m: isinstance(m, nn.Linear) and m.out_features == 5, Epsilon(0.2)),  # callable
        (re.compile(r"[07]"), ZPlus()),  # regex on the whole name
        (nn.Conv2d, Gamma(0.9)),  # shadowed by the entries above for every conv
        ((nn.ReLU, nn.Linear), Flat()),  # tuple of types: ahead of the default Pass for activations
    ])
    rules = composite.assign(model)
    assert rules["3"] == Gamma(0.1) and rules["9"] == Epsilon(0.2)
    assert rules["0"] == ZPlus() and rules["7"] == ZPlus()
    assert rules["1"] == Flat() and rules["8"] == Flat()
    assert isinstance(rules["5"], Norm)  # a default
    assert "2" not in rules and "6" not in rules  # max pooling and flatten: plain gradient
    # plain names are exact ("block1.conv1" does not match "block1_conv1"); regex syntax makes a pattern
    by_name = nn.Module()
    by_name.add_module("block1_conv1", nn.Linear(2, 2))
    by_name.add_module("block2", nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    assert Composite([("block1.conv1", Flat()), ("block2.0", Gamma())], defaults=False).assign(by_name) == {"block2.0": Gamma()}
    assert Composite([(r"block2\.\d", Gamma())], defaults=False).assign(by_name).keys() == {"block2.0", "block2.1"}
    defaults = Composite([(nn.Conv2d, Gamma())]).assign(model)
    assert defaults["1"] == Pass() and isinstance(defaults["5"], Norm) and "7" not in defaults
    assert Composite([(nn.Conv2d, Gamma())], defaults=False).assign(model).keys() == {"0", "3"}
    # a rule on a container covers its children
    nested = nn.Sequential(relu_cnn(), nn.ReLU())
    assert Composite([("0", Epsilon())]).assign(nested) == {"0": Epsilon(), "1": Pass()}
    for bad in ([(3, Epsilon())], [(nn.Linear, "epsilon")], [nn.Linear]):
        with pytest.raises(InputError):
            Composite(bad)
    for bad_rule in (lambda: Epsilon(-1.0), lambda: Gamma(-0.1), lambda: AlphaBeta(2.0, -1.0), lambda: ZBox(1.0, 0.0),
                     lambda: Gamma(bias="drop"), lambda: Gamma(mode="generalised"),
                     lambda: GammaByBlock(gamma_mode="zennit"), lambda: EpsilonGammaBox(gamma_mode="")):
        with pytest.raises(InputError):
            bad_rule()
    with pytest.raises(InputError, match="Composite"):
        LRP(model, composite=Epsilon())


def small_vgg(with_features: bool = True) -> nn.Module:
    """Five pooling blocks: 2, 1, 2, 1, 2 convolutions; classifier of two Linear layers; (1, 32, 32) inputs."""
    seeded(29)
    convs = [2, 1, 2, 1, 2]
    layers, c = [], 1
    for n in convs:
        for _ in range(n):
            layers += [nn.Conv2d(c, 3, 3, padding=1), nn.ReLU()]
            c = 3
        layers.append(nn.MaxPool2d(2))
    classifier = [nn.Flatten(), nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 4)]
    if not with_features:
        return nn.Sequential(*layers, *classifier).to(F64).eval()
    model = nn.Module()
    model.features = nn.Sequential(*layers)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(*classifier)
    model.forward = lambda x: model.classifier(model.avgpool(model.features(x)))
    return model.to(F64).eval()


def test_vgg16_gamma_preset_assigns_gamma_by_block():
    expected_blocks = {"features.0": 1, "features.2": 1, "features.5": 2, "features.8": 3, "features.10": 3,
                       "features.13": 4, "features.16": 5, "features.18": 5, "classifier.1": 0, "classifier.3": 0}
    gamma_of_block = {1: 0.5, 2: 0.5, 3: 0.25, 4: 0.1, 5: 0.0, 0: 0.0}
    model = small_vgg()
    preset = vgg16_gamma_preset()
    assert preset.blocks(model) == expected_blocks
    rules = preset.assign(model)
    for name, block in expected_blocks.items():
        assert rules[name] == Gamma(gamma_of_block[block]), name
    assert isinstance(rules["features.1"], Pass) and isinstance(rules["avgpool"], Norm)
    # the same schedule on one flat Sequential (no ``features``): names are then the indices
    flat = small_vgg(with_features=False)
    flat_rules = preset.assign(flat)
    for name, block in expected_blocks.items():
        index = name.split(".")[1] if name.startswith("features") else str(21 + int(name.split(".")[1]))
        assert flat_rules[index] == Gamma(gamma_of_block[block]), name
    # explicit rules and a first-layer rule take precedence over the schedule
    zbox = ZBox(0.0, 1.0)
    custom = GammaByBlock(rules=[("classifier.3", Epsilon(0.1))], first_layer=zbox).assign(model)
    assert custom["features.0"] is zbox and custom["classifier.3"] == Epsilon(0.1)
    assert custom["features.2"] == Gamma(0.5)
    relevance = LRP(model, preset)(rand(2, 1, 32, 32), torch.tensor([1, 3]))
    assert relevance.shape == (2, 1, 32, 32) and torch.isfinite(relevance).all()
