"""Tests of β-smoothing (``manifex.attribution.smoothing``) and of Guided Backprop / Grad-CAM
(``manifex.attribution.modified``).

Smoothing: the hooked output is softplus(β), nothing is left behind (also after exceptions), β changes in
place, the smoothed copy leaves the original untouched, β → ∞ recovers the ReLU network, the smoothed
network has the second derivative a ReLU network lacks (checked against finite differences), functional
ReLUs are swapped / detected / refused, and the logistic-noise identity of one ReLU layer holds.
Modified explainers: equal to Captum 0.9 (float64), second order, errors; their contract (batched =
per-example, per-example targets, model state unchanged after success and after errors) is generated in
test_contract.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from manifex.attribution import Gradient
from manifex.attribution.modified import GradCAM, GuidedBackprop, last_conv_layer
from manifex.attribution.smoothing import (
    BetaSmoothing,
    SmoothedExplainer,
    SmoothReLU,
    beta_smooth,
    beta_smoothed,
    count_relus,
    functional_relu_calls,
    set_smooth_beta,
)
from manifex.errors import InputError, ModelError

try:  # Captum is a test extra; the reference comparisons are skipped without it.
    import captum.attr as captum_attr
except ImportError:  # pragma: no cover
    captum_attr = None

needs_captum = pytest.mark.skipif(captum_attr is None, reason="captum is not installed")
quiet_captum = pytest.mark.filterwarnings("ignore::UserWarning")

F64 = torch.float64
N = 4
TIGHT = dict(rtol=1e-10, atol=1e-12)
CAPTUM = dict(rtol=1e-5, atol=1e-7)
HOOK_ATTRS = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_forward_hooks_always_called", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
)


# --------------------------------------------------------------------------------------------------------
# models and data


def make_cnn(inplace: bool = False, dtype: torch.dtype = F64, seed: int = 0) -> nn.Sequential:
    """conv-relu-conv-relu-maxpool-flatten-linear on (2, 8, 8) inputs, 10 classes; layer "2" is the last conv."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(inplace=inplace),
            nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(inplace=inplace),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 4 * 4, 10),
        )
    return net.to(dtype).eval()


def make_mlp(inplace: bool = False, dtype: torch.dtype = F64, seed: int = 1) -> nn.Sequential:
    """flatten-linear-relu-linear-relu-linear on (2, 8, 8) inputs, 10 classes."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(
            nn.Flatten(), nn.Linear(128, 16), nn.ReLU(inplace=inplace), nn.Linear(16, 12), nn.ReLU(inplace=inplace),
            nn.Linear(12, 10),
        )
    return net.to(dtype).eval()


RELU_CALLS = {
    "F.relu": lambda z: F.relu(z),
    "torch.relu": lambda z: torch.relu(z),
    "Tensor.relu": lambda z: z.relu(),
    "relu_": lambda z: torch.relu_(z),
    "Tensor.relu_": lambda z: z.relu_(),
    "F.relu(inplace)": lambda z: F.relu(z, inplace=True),
}


class Block(nn.Module):
    """linear followed by a ReLU called as a function (one of RELU_CALLS)."""

    def __init__(self, linear: nn.Linear, call: str) -> None:
        super().__init__()
        self.linear, self.call = linear, call

    def forward(self, x):
        return RELU_CALLS[self.call](self.linear(x))


def functional_and_module_nets(call: str) -> tuple[nn.Module, nn.Module]:
    """Two nets sharing weights: blocks "1" and "2" call functional ReLUs / the same layers with ``nn.ReLU``."""
    mlp = make_mlp()
    functional = nn.Sequential(nn.Flatten(), Block(mlp[1], call), Block(mlp[3], "F.relu"), mlp[5])
    return functional, mlp


def data(n: int = N, dtype: torch.dtype = F64, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 8, 8, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def manual_softplus_forward(net: nn.Sequential, x: torch.Tensor, beta: float) -> torch.Tensor:
    """The Sequential with every nn.ReLU computed as softplus(beta), by hand."""
    for m in net:
        x = F.softplus(x, beta) if isinstance(m, nn.ReLU) else m(x)
    return x


def model_state(model: nn.Module) -> dict:
    """Everything an explainer must leave as it found it (hooks by id, tensors by value)."""
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "hooks": [{a: list(getattr(m, a, {}).keys()) for a in HOOK_ATTRS} for m in model.modules()],
        "modes": torch._C._len_torch_function_stack(),
        "types": [type(m) for m in model.modules()],
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert before["params"].keys() == after["params"].keys()
    for k in before["params"]:
        assert torch.equal(before["params"][k], after["params"][k]), k
    for key in ("requires_grad", "training", "hooks", "modes", "types"):
        assert before[key] == after[key], key


# --------------------------------------------------------------------------------------------------------
# β-smoothing


def test_hook_output_is_softplus():
    net, (x, _) = make_mlp(), data()
    with beta_smooth(net, 2.5) as s:
        assert isinstance(s, BetaSmoothing) and s.active and s.beta == 2.5
        out = net(x)
    torch.testing.assert_close(out, manual_softplus_forward(net, x, 2.5), **TIGHT)
    relu, z = nn.ReLU(), torch.linspace(-3, 3, 13, dtype=F64)
    with beta_smooth(relu, 4.0):  # the model may itself be a ReLU
        torch.testing.assert_close(relu(z), F.softplus(z, 4.0), **TIGHT)
        torch.testing.assert_close(relu(input=z), F.softplus(z, 4.0), **TIGHT)  # called with a keyword
    assert torch.equal(relu(z), z.clamp(min=0))
    inplace, z2 = nn.ReLU(inplace=True), z.clone()
    with beta_smooth(inplace, 4.0):
        torch.testing.assert_close(inplace(input=z2), F.softplus(z, 4.0), **TIGHT)


def test_inplace_relu_is_smoothed_like_out_of_place():
    x, y = data()
    ref_net, net = make_cnn(), make_cnn(inplace=True)
    with beta_smooth(ref_net, 3.0), beta_smooth(net, 3.0):
        torch.testing.assert_close(net(x), ref_net(x), **TIGHT)
        torch.testing.assert_close(Gradient(net)(x, y), Gradient(ref_net)(x, y), **TIGHT)


def test_hooks_removed_after_exit_and_after_exceptions():
    net, (x, _) = make_cnn(), data()
    before, relu_out = model_state(net), net(x)
    with beta_smooth(net, 2.0):
        assert model_state(net)["hooks"] != before["hooks"]
    assert_same_state(before, model_state(net))
    with pytest.raises(KeyError):
        with beta_smooth(net, 2.0):
            raise KeyError("body fails")
    assert_same_state(before, model_state(net))
    with pytest.raises(RuntimeError):  # the forward itself fails half-way (wrong number of channels)
        with beta_smooth(net, 2.0):
            net(torch.randn(1, 3, 8, 8, dtype=F64))
    assert_same_state(before, model_state(net))
    torch.testing.assert_close(net(x), relu_out, **TIGHT)


def test_forward_error_inside_the_block_leaves_no_mode_behind():
    net, (x, _) = make_cnn(), data()
    with beta_smooth(net, 2.0):
        with pytest.raises(RuntimeError):
            net(x[:, :1])
        assert torch._C._len_torch_function_stack() == 0  # popped by the always-called hook
        torch.testing.assert_close(net(x), manual_softplus_forward(net, x, 2.0), **TIGHT)


def test_beta_changes_in_place():
    net, (x, _) = make_mlp(), data()
    with beta_smooth(net, 1.0) as s:
        out1 = net(x)
        s.set_beta(7.0)
        out7 = net(x)
        s.beta = 3.0
        out3 = net(x)
        with pytest.raises(InputError):
            s.set_beta(0.0)
    torch.testing.assert_close(out1, manual_softplus_forward(net, x, 1.0), **TIGHT)
    torch.testing.assert_close(out7, manual_softplus_forward(net, x, 7.0), **TIGHT)
    torch.testing.assert_close(out3, manual_softplus_forward(net, x, 3.0), **TIGHT)


@pytest.mark.parametrize("beta", [0, -1.0, float("nan"), float("inf"), True, "10"])
def test_invalid_beta(beta):
    net = make_mlp()
    with pytest.raises(InputError, match="beta"):
        beta_smooth(net, beta)
    with pytest.raises(InputError, match="beta"):
        beta_smoothed(net, beta)


def test_needs_a_module_and_is_not_reentrant():
    with pytest.raises(InputError, match="nn.Module"):
        beta_smooth(lambda x: x, 1.0)
    s = beta_smooth(make_mlp(), 1.0)
    with s:
        with pytest.raises(RuntimeError, match="re-entrant"):
            s.__enter__()
    with s:  # can be used again once exited
        assert s.active
    assert not s.active


def test_smoothed_copy_leaves_original_untouched():
    net, (x, y) = make_cnn(), data()
    before, relu_out = model_state(net), net(x)
    smooth = beta_smoothed(net, 3.0)
    assert_same_state(before, model_state(net))
    assert count_relus(net) == 2 and count_relus(smooth) == 0
    assert sum(isinstance(m, SmoothReLU) for m in smooth.modules()) == 2
    with beta_smooth(net, 3.0):
        torch.testing.assert_close(smooth(x), net(x), **TIGHT)
        torch.testing.assert_close(Gradient(smooth)(x, y), Gradient(net)(x, y), **TIGHT)
    assert set_smooth_beta(smooth, 9.0) == 2
    with beta_smooth(net, 9.0):
        torch.testing.assert_close(smooth(x), net(x), **TIGHT)
    assert torch.equal(net(x), relu_out)
    assert_same_state(before, model_state(net))


def test_large_beta_approaches_relu():
    net, (x, _) = make_cnn(), data()
    relu_out = net(x)
    with beta_smooth(net, 1e3):
        assert (net(x) - relu_out).abs().max() < 1e-2
    with beta_smooth(net, 1.0):  # the test is not vacuous
        assert (net(x) - relu_out).abs().max() > 1e-2


def _second_order(model, x, y, explainer_cls=Gradient, seed=3):
    """(autograd <∂(e·v)/∂x, u>, central finite difference of <e(x + t u), v>) for random u, v."""
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(x.shape, generator=g, dtype=F64), torch.randn(x.shape, generator=g, dtype=F64)
    xg = x.clone().requires_grad_(True)
    e = explainer_cls(model)(xg, y, create_graph=True)
    (hv,) = torch.autograd.grad((e * v).sum(), xg, allow_unused=True)
    hv = torch.zeros_like(x) if hv is None else hv
    t = 1e-5
    fd = ((explainer_cls(model)(x + t * u, y) - explainer_cls(model)(x - t * u, y)) * v).sum() / (2 * t)
    return (hv * u).sum(), fd


def test_second_order_zero_for_relu_nonzero_and_exact_when_smoothed():
    net, (x, y) = make_mlp(), data()
    exact, fd = _second_order(net, x, y)
    assert exact == 0 and fd.abs() < 1e-8  # piecewise linear: the gradient is locally constant
    with beta_smooth(net, 3.0):
        exact, fd = _second_order(net, x, y)
    assert exact.abs() > 1e-3
    torch.testing.assert_close(exact, fd, rtol=1e-5, atol=1e-9)


def test_smoothed_explainer_equals_the_context_manager():
    net, (x, y) = make_cnn(), data()
    before = model_state(net)
    wrapped = SmoothedExplainer(Gradient(net), beta=4.0)
    with beta_smooth(net, 4.0):
        expected = Gradient(net)(x, y)
    torch.testing.assert_close(wrapped(x, y), expected, **TIGHT)
    assert_same_state(before, model_state(net))
    with pytest.raises(InputError, match="Explainer"):
        SmoothedExplainer(net, 4.0)


@pytest.mark.parametrize("call", list(RELU_CALLS))
def test_functional_relu_is_smoothed_detected_or_refused(call):
    functional, module_net = functional_and_module_nets(call)
    x, y = data()
    torch.testing.assert_close(functional(x), module_net(x), **TIGHT)  # same network
    assert functional_relu_calls(functional, x) == {"1": 1, "2": 1}
    assert functional_relu_calls(module_net, x) == {}
    before = model_state(functional)
    with beta_smooth(functional, 2.0), beta_smooth(module_net, 2.0):
        torch.testing.assert_close(functional(x), module_net(x), **TIGHT)
        torch.testing.assert_close(Gradient(functional)(x, y), Gradient(module_net)(x, y), **TIGHT)
    with beta_smooth(functional, 2.0, functional="ignore"):
        torch.testing.assert_close(functional(x), module_net(x), **TIGHT)  # left as ReLU
    with pytest.raises(ModelError, match=r"1 \(Block\).*nn\.ReLU module"):
        with beta_smooth(functional, 2.0, functional="error"):
            functional(x)
    with pytest.raises(ModelError, match=r"1 \(Block\), 2 \(Block\)"):
        beta_smoothed(functional, 2.0, example_input=x)
    assert_same_state(before, model_state(functional))


def test_functional_relu_outside_the_model_is_untouched():
    net, (x, _) = make_mlp(), data()
    z = torch.linspace(-2, 2, 5, dtype=F64)
    with beta_smooth(net, 2.0):
        net(x)
        assert torch.equal(F.relu(z), z.clamp(min=0))  # only the model's own forward is swapped


def test_one_relu_layer_softplus_gradient_is_relu_gradient_under_logistic_noise():
    """∇ softplus_β network = E_ε[∇ ReLU network with ε added to the pre-activations], ε ~ Logistic(0, 1/β)."""

    class OneLayer(nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(4)
            self.lin = nn.Linear(5, 6).to(F64)
            with torch.no_grad():
                self.lin.weight.copy_(torch.randn(6, 5, generator=g, dtype=F64))
                self.lin.bias.copy_(torch.randn(6, generator=g, dtype=F64) * 0.3)
            self.v = torch.randn(6, generator=g, dtype=F64)
            self.act = nn.ReLU()
            self.noise = torch.zeros(6, dtype=F64)

        def forward(self, x):
            return self.act(self.lin(x) + self.noise) @ self.v

    net, beta, k = OneLayer(), 2.0, 40000
    x = torch.randn(1, 5, generator=torch.Generator().manual_seed(5), dtype=F64)
    with beta_smooth(net, beta):
        smooth = Gradient(net)(x)[0]
    z = net.lin(x)[0].detach()
    torch.testing.assert_close(smooth, net.lin.weight.detach().T @ (torch.sigmoid(beta * z) * net.v), **TIGHT)
    u = torch.rand(k, 6, generator=torch.Generator().manual_seed(6), dtype=F64).clamp(1e-12, 1 - 1e-12)
    net.noise = torch.log(u / (1 - u)) / beta  # logistic, scale 1/β
    monte_carlo = Gradient(net)(x.expand(k, 5).clone()).mean(0)
    torch.testing.assert_close(monte_carlo, smooth, rtol=0, atol=0.05)


# --------------------------------------------------------------------------------------------------------
# Guided Backprop and Grad-CAM against Captum


@needs_captum
@quiet_captum
@pytest.mark.parametrize("make", [make_cnn, make_mlp], ids=["cnn", "mlp"])
@pytest.mark.parametrize("inplace", [False, True], ids=["relu", "inplace_relu"])
def test_guided_backprop_equals_captum(make, inplace):
    net, (x, y) = make(inplace=inplace), data()
    ours = GuidedBackprop(net)(x, y)
    reference = captum_attr.GuidedBackprop(make()).attribute(x.clone(), target=y)
    torch.testing.assert_close(ours, reference, **CAPTUM)
    assert not torch.allclose(ours, Gradient(net)(x, y))  # the rule changed something


@needs_captum
@quiet_captum
@pytest.mark.parametrize("relu", [True, False])
def test_gradcam_equals_captum(relu):
    net, (x, y) = make_cnn(), data()
    cam = GradCAM(net, "2", relu=relu)
    layer_map = cam.layer_map(x, y)
    reference = captum_attr.LayerGradCam(net, net[2]).attribute(x, target=y, relu_attributions=relu)
    assert layer_map.shape == (N, 1, 8, 8) and reference.shape == layer_map.shape
    torch.testing.assert_close(layer_map, reference, **CAPTUM)

    # at the max-pool (4 x 4, not the input size) so that upsampling matters
    reference = captum_attr.LayerGradCam(net, net[4]).attribute(x, target=y, relu_attributions=relu)
    pooled = GradCAM(net, net[4], relu=relu)
    torch.testing.assert_close(pooled.layer_map(x, y), reference, **CAPTUM)
    up = captum_attr.LayerAttribution.interpolate(reference, (8, 8), "bilinear")
    out = pooled(x, y)
    assert out.shape == x.shape
    torch.testing.assert_close(out, up.expand_as(x), **CAPTUM)
    assert torch.equal(out[:, 0], out[:, 1])  # broadcast over channels


def test_gradcam_layer_by_name_or_module_and_repr():
    net, (x, y) = make_cnn(), data()
    torch.testing.assert_close(GradCAM(net, "2")(x, y), GradCAM(net, net[2])(x, y), **TIGHT)
    # an in-place ReLU after the layer must not overwrite the activations Grad-CAM reads
    torch.testing.assert_close(GradCAM(make_cnn(inplace=True), "2")(x, y), GradCAM(net, "2")(x, y), **TIGHT)
    assert "layer='2'" in repr(GradCAM(net, net[2]))
    assert last_conv_layer(net) == "2" and GradCAM(net).layer_name == "2"  # default: the last convolutional layer
    with pytest.raises(InputError, match="no convolutional layer"):
        GradCAM(make_mlp())


class _ConvsRegisteredOutOfOrder(nn.Module):
    """``late`` is registered first but runs last: registration order is not execution order."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.late = nn.Conv2d(4, 6, 3, padding=1)
            self.early = nn.Conv2d(2, 4, 3, padding=1)
            self.fc = nn.Linear(6 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.late(torch.relu(self.early(x)))).flatten(1))


def test_gradcam_default_layer_is_the_last_executed_conv():
    net = _ConvsRegisteredOutOfOrder().double()
    x, y = data()
    assert last_conv_layer(net) == "early"  # registration order would pick the wrong one
    cam = GradCAM(net)
    out = cam(x, y)
    assert cam.layer_name == "late" and cam.layer is net.late
    torch.testing.assert_close(out, GradCAM(net, "late")(x, y), **TIGHT)
    assert not torch.allclose(out, GradCAM(net, "early")(x, y))


def test_guided_backprop_handles_functional_relus():
    x, y = data()
    for call in ("F.relu", "relu_", "F.relu(inplace)"):
        functional, module_net = functional_and_module_nets(call)
        torch.testing.assert_close(GuidedBackprop(functional)(x, y), GuidedBackprop(module_net)(x, y), **TIGHT)
    functional, module_net = functional_and_module_nets("F.relu")
    torch.testing.assert_close(GuidedBackprop(functional, functional="ignore")(x, y), Gradient(module_net)(x, y), **TIGHT)
    before = model_state(functional)
    with pytest.raises(ModelError, match=r"1 \(Block\)"):
        GuidedBackprop(functional, functional="error")(x, y)
    assert_same_state(before, model_state(functional))


def test_guided_backprop_second_order():
    """Zero on a ReLU network (like the gradient); under β-smoothing the rule σ(βz)·max(g, 0) is used and
    its derivative matches finite differences (away from sign changes of upstream gradients)."""
    net, (x, y) = make_mlp(), data()
    exact, fd = _second_order(net, x, y, GuidedBackprop)
    assert exact == 0 and fd.abs() < 1e-8
    with beta_smooth(net, 3.0):
        exact, fd = _second_order(net, x, y, GuidedBackprop)
        smoothed_gbp = GuidedBackprop(net)(x, y)
    assert exact.abs() > 1e-3
    torch.testing.assert_close(exact, fd, rtol=1e-5, atol=1e-9)
    # the same on a smoothed copy, and on a functional-ReLU network (nested torch-function modes)
    torch.testing.assert_close(GuidedBackprop(beta_smoothed(net, 3.0))(x, y), smoothed_gbp, **TIGHT)
    functional, module_net = functional_and_module_nets("F.relu")
    with beta_smooth(functional, 3.0), beta_smooth(module_net, 3.0):
        torch.testing.assert_close(GuidedBackprop(functional)(x, y), GuidedBackprop(module_net)(x, y), **TIGHT)
    assert torch._C._len_torch_function_stack() == 0


def test_gradcam_create_graph_under_smoothing():
    net, (x, y) = make_cnn(), data()
    xg = x.clone().requires_grad_(True)
    with beta_smooth(net, 3.0):
        cam = GradCAM(net, "2")(xg, y, create_graph=True)
        (g,) = torch.autograd.grad(cam.sum(), xg)
    assert cam.requires_grad and torch.isfinite(g).all() and g.abs().max() > 0
    assert not GradCAM(net, "2")(xg, y).requires_grad  # detached without create_graph


# --------------------------------------------------------------------------------------------------------
# the contract (batched = per example, targets, model state, output=, ...) is generated for both
# explainers, with plain and in-place ReLUs, in test_contract.py


def test_contract_names():
    assert GuidedBackprop.name == "guided_backprop" and GradCAM.name == "gradcam"


# --------------------------------------------------------------------------------------------------------
# errors


def test_gradcam_errors():
    net, (x, y) = make_cnn(), data()
    with pytest.raises(InputError, match=r"unknown layer 'conv9'.*2 \(Conv2d\), 0 \(Conv2d\)"):
        GradCAM(net, "conv9")
    with pytest.raises(InputError, match="not a submodule"):
        GradCAM(net, nn.Conv2d(2, 2, 1))
    with pytest.raises(InputError, match="nn.Module"):
        GradCAM(lambda t: t, "0")
    with pytest.raises(InputError, match="upsample_mode"):
        GradCAM(net, "2", upsample_mode="cubic")
    before = model_state(net)
    with pytest.raises(ModelError, match=r"convolutional layer.*'6' \(Linear\).*\(4, 10\).*2 \(Conv2d\)"):
        GradCAM(net, "6")(x, y)
    assert_same_state(before, model_state(net))
    with pytest.raises(InputError, match=r"\(N, C, H, W\).*layer_map"):
        GradCAM(make_mlp(), "1")(x.flatten(1), y)

    shared = nn.Conv2d(2, 2, 3, padding=1).to(F64)
    twice = nn.Sequential(shared, nn.ReLU(), shared, nn.Flatten(), nn.Linear(128, 10).to(F64))
    with pytest.raises(ModelError, match="runs 2 times"):
        GradCAM(twice, "0")(x, y)
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.spare = make_cnn(), nn.Conv2d(6, 6, 1).to(F64)

        def forward(self, t):
            return self.net(t)

    with pytest.raises(ModelError, match="not used"):
        GradCAM(WithSpare(), "spare")(x, y)


def test_guided_backprop_errors():
    with pytest.raises(InputError, match="nn.Module"):
        GuidedBackprop(lambda t: t)
    with pytest.raises(InputError, match="functional"):
        GuidedBackprop(make_mlp(), functional="swap")
    net, (x, y) = make_mlp(), data()
    with pytest.raises(InputError, match="dtype"):
        GuidedBackprop(net)(x.float(), y)
