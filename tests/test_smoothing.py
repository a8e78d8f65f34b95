"""β-smoothing of every piecewise-linear activation (``manifex.attribution.smoothing``; the ReLU-only tests
live in test_modified.py).

Each activation of the table, as a module and as a function: the smoothed output equals the written-out
softplus analogue, has a nonzero input second derivative (zero before), and tends to the original as
β → ∞. Smooth activations are left alone; non-smoothable ones raise (naming the module), warn or are
ignored as asked; the model is left as found, also after those errors; the deep-copy form agrees.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from manifex.attribution import Gradient
from manifex.attribution.smoothing import (
    SmoothActivation,
    SmoothedExplainer,
    SmoothReLU,
    beta_smooth,
    beta_smoothed,
    count_smoothed,
    set_smooth_beta,
)
from manifex.errors import InputError, ModelError

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-12)
HOOK_ATTRS = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_forward_hooks_always_called", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
)


def sp(z: torch.Tensor, beta: float) -> torch.Tensor:
    """softplus_β written out (independent of F.softplus): log(1 + exp(βz)) / β."""
    return torch.logaddexp(torch.zeros_like(z), beta * z) / beta


PRELU_SLOPES = torch.tensor([0.1, 0.3, -0.2], dtype=F64)


def prelu_module() -> nn.PReLU:
    m = nn.PReLU(3).to(F64)
    with torch.no_grad():
        m.weight.copy_(PRELU_SLOPES)
    return m


def channel_slopes(z: torch.Tensor) -> torch.Tensor:
    return PRELU_SLOPES.view(1, 3, 1)


# name: (module factory, functional form, smoothed analogue f(z, β)); inputs are (N, 3, L)
CASES = {
    "relu": (nn.ReLU, F.relu, lambda z, b: sp(z, b)),
    "leaky_relu": (lambda: nn.LeakyReLU(0.2), lambda z: F.leaky_relu(z, 0.2), lambda z, b: 0.2 * z + 0.8 * sp(z, b)),
    "prelu": (prelu_module, lambda z: F.prelu(z, PRELU_SLOPES),
              lambda z, b: channel_slopes(z) * z + (1 - channel_slopes(z)) * sp(z, b)),
    "rrelu_eval": (lambda: nn.RReLU(0.1, 0.3).eval(), lambda z: F.rrelu(z, 0.1, 0.3, training=False),
                   lambda z, b: 0.2 * z + 0.8 * sp(z, b)),
    "hardtanh": (lambda: nn.Hardtanh(-2.0, 3.0), lambda z: F.hardtanh(z, -2.0, 3.0),
                 lambda z, b: -2.0 + sp(z + 2.0, b) - sp(z - 3.0, b)),
    "relu6": (nn.ReLU6, F.relu6, lambda z, b: sp(z, b) - sp(z - 6.0, b)),
    "hardsigmoid": (nn.Hardsigmoid, F.hardsigmoid, lambda z, b: (sp(z + 3.0, b) - sp(z - 3.0, b)) / 6),
    "hardswish": (nn.Hardswish, F.hardswish, lambda z, b: z * (sp(z + 3.0, b) - sp(z - 3.0, b)) / 6),
}
# in-place spellings of the functional forms (all must be swapped, as ReLU's are)
INPLACE_CALLS = {
    "leaky_relu_": (lambda z: F.leaky_relu_(z, 0.2), "leaky_relu"),
    "leaky_relu(inplace)": (lambda z: F.leaky_relu(z, negative_slope=0.2, inplace=True), "leaky_relu"),
    "hardtanh_": (lambda z: F.hardtanh_(z, -2.0, 3.0), "hardtanh"),
    "relu6(inplace)": (lambda z: F.relu6(z, inplace=True), "relu6"),
    "hardswish(inplace)": (lambda z: F.hardswish(z, inplace=True), "hardswish"),
}


class Call(nn.Module):
    """A module whose forward calls ``fn`` (an activation used as a function)."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, z):
        return self.fn(z * 1.0)  # * 1.0: in-place calls never write into the caller's tensor


def grid() -> torch.Tensor:
    """(2, 3, 161) points on [-8, 8], avoiding the kinks themselves."""
    return (torch.linspace(-8, 8, 161, dtype=F64) + 1e-3)[None, None].repeat(2, 3, 1)


def value_and_second_derivative(model: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(model(z), diagonal of d²(Σ model(z))/dz²) — elementwise activations: the input second derivative."""
    z = z.clone().requires_grad_(True)
    y = model(z)
    (g,) = torch.autograd.grad(y.sum(), z, create_graph=True)
    if not g.requires_grad:  # piecewise linear: the gradient does not depend on z
        return y.detach(), torch.zeros_like(z)
    (h,) = torch.autograd.grad(g.sum(), z, allow_unused=True)
    return y.detach(), torch.zeros_like(z) if h is None else h


def hooks(model: nn.Module) -> list:
    return [{a: list(getattr(m, a, {}).keys()) for a in HOOK_ATTRS} for m in model.modules()]


def forms(name: str) -> list[tuple[str, nn.Module]]:
    factory, functional, _ = CASES[name]
    return [("module", factory()), ("functional", Call(functional))]


# --------------------------------------------------------------------------------------------------------
# the table


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_activation_is_smoothed_as_the_table_says(name):
    """Module and functional forms: the analogue written out, a nonzero second derivative, → original as β → ∞."""
    z = grid()
    analogue = CASES[name][2]
    for form, model in forms(name):
        original = model(z)
        # piecewise linear: zero input second derivative before smoothing (Hardswish is piecewise quadratic;
        # torch has no double backward for Hardsigmoid)
        if name not in ("hardswish", "hardsigmoid"):
            assert value_and_second_derivative(model, z)[1].abs().max() == 0, form
        before = hooks(model)
        with beta_smooth(model, 1.5):  # β·z < 20 on the grid: F.softplus's linear switch does not kick in
            y, h = value_and_second_derivative(model, z)
        torch.testing.assert_close(y, analogue(z, 1.5), **TIGHT, msg=f"{name} {form}")
        assert h.abs().max() > 1e-2, f"{name} {form}: second derivative still zero"
        with beta_smooth(model, 1e3):
            gap = (model(z) - original).abs().max()
        assert gap < 2 * math.log(2) / 1e3, f"{name} {form}: {gap}"
        with beta_smooth(model, 1.0):
            assert (model(z) - original).abs().max() > 0.05  # not vacuous
        assert hooks(model) == before
        torch.testing.assert_close(model(z), original, rtol=0, atol=0)


@pytest.mark.parametrize("call", sorted(INPLACE_CALLS))
def test_inplace_functional_forms_are_smoothed(call):
    fn, name = INPLACE_CALLS[call]
    z = grid()
    model = Call(fn)
    with beta_smooth(model, 1.5):
        y, h = value_and_second_derivative(model, z)
    torch.testing.assert_close(y, CASES[name][2](z, 1.5), **TIGHT)
    assert h.abs().max() > 1e-2


def test_prelu_slopes_stay_learnable_and_per_channel():
    model, z = prelu_module(), grid()
    with beta_smooth(model, 1.5):
        y = model(z)
        (gw,) = torch.autograd.grad(y.sum(), model.weight)
    # d/dα [αz + (1 − α) s(z)] summed over the batch and positions of each channel
    torch.testing.assert_close(gw, (z - sp(z, 1.5)).sum((0, 2)), **TIGHT)
    one = nn.PReLU().to(F64)  # one shared slope (0.25)
    with beta_smooth(one, 1.5):
        torch.testing.assert_close(one(z), 0.25 * z + 0.75 * sp(z, 1.5), **TIGHT)


@pytest.mark.parametrize("module", [nn.GELU(), nn.SiLU(), nn.Mish(), nn.Softplus(), nn.Tanh(), nn.Sigmoid(),
                                    nn.ELU(alpha=1.0), nn.CELU(0.5), nn.Softsign(), nn.LogSigmoid()],
                         ids=lambda m: type(m).__name__)
def test_smooth_activations_are_left_alone(module):
    z = grid()
    wrapped = nn.Sequential(module, Call(lambda t: F.elu(t, alpha=1.0)))  # F.elu with α = 1 is smooth too
    expected = wrapped(z)
    with beta_smooth(wrapped, 2.0) as s:
        torch.testing.assert_close(wrapped(z), expected, rtol=0, atol=0)
    assert count_smoothed(wrapped) == 0 and "activations=0" in repr(s)


# --------------------------------------------------------------------------------------------------------
# what cannot be smoothed


UNSUPPORTED = {
    "ELU(alpha=0.5)": lambda: nn.ELU(alpha=0.5),
    "SELU": nn.SELU,
    "Threshold": lambda: nn.Threshold(0.1, 0.0),
    "Hardshrink": nn.Hardshrink,
    "Softshrink": nn.Softshrink,
    "RReLU(train)": lambda: nn.RReLU().train(),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_modules_raise_naming_them_warn_or_are_ignored(name):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), UNSUPPORTED[name]()).to(F64)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    before, out = hooks(model), model(x) if name != "RReLU(train)" else None
    with pytest.raises(ModelError, match=rf"'?3'? \({type(model[3]).__name__}\).*unsupported='warn'"):
        with beta_smooth(model, 2.0):
            pass
    assert hooks(model) == before and torch._C._len_torch_function_stack() == 0
    with pytest.raises(ModelError, match=type(model[3]).__name__):
        beta_smoothed(model, 2.0)
    with pytest.raises(ModelError, match=type(model[3]).__name__):
        SmoothedExplainer(Gradient(model), 2.0)  # refused when built, before any call
    with pytest.warns(UserWarning, match=type(model[3]).__name__):
        with beta_smooth(model, 2.0, unsupported="warn"):
            pass
    with beta_smooth(model, 2.0, unsupported="ignore"):
        if out is not None:  # the ReLU is smoothed, the unsupported activation left as it is
            smoothed = model[3](model[2](F.softplus(model[0](x), 2.0)))
            torch.testing.assert_close(model(x), smoothed, **TIGHT)
    assert hooks(model) == before
    with pytest.raises(InputError, match="unsupported"):
        beta_smooth(model, 2.0, unsupported="skip")


@pytest.mark.parametrize("fn", [F.selu, lambda z: F.elu(z, alpha=0.5), lambda z: F.threshold(z, 0.1, 0.0),
                                F.hardshrink, F.softshrink, lambda z: F.rrelu(z, training=True)],
                         ids=["selu", "elu0.5", "threshold", "hardshrink", "softshrink", "rrelu_train"])
def test_unsupported_functional_calls_raise_at_the_call_and_leave_the_model_as_found(fn):
    model = nn.Sequential(nn.Linear(4, 4), Call(fn)).to(F64)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    before = hooks(model)
    with pytest.raises(ModelError, match=r"1 \(Call\)"):
        with beta_smooth(model, 2.0):
            model(x)
    assert hooks(model) == before and torch._C._len_torch_function_stack() == 0
    with pytest.warns(UserWarning, match=r"1 \(Call\)"):
        with beta_smooth(model, 2.0, unsupported="warn"):
            model(x)
    with beta_smooth(model, 2.0, unsupported="ignore"):
        model(x)
    with pytest.raises(ModelError, match=r"1 \(Call\)"):
        beta_smoothed(model, 2.0, example_input=x)
    assert hooks(model) == before


def test_functional_error_policy_names_the_module_to_use():
    model = nn.Sequential(nn.Linear(4, 4), Call(lambda z: F.leaky_relu(z, 0.1))).to(F64)
    x = torch.randn(3, 4, dtype=F64)
    with pytest.raises(ModelError, match=r"1 \(Call\).*leaky_relu.*nn\.LeakyReLU"):
        with beta_smooth(model, 2.0, functional="error"):
            model(x)
    with beta_smooth(model, 2.0, functional="ignore"):  # left as it is
        torch.testing.assert_close(model(x), F.leaky_relu(model[0](x), 0.1), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------
# a network, and the deep-copy form


def mixed_cnn(seed: int = 3) -> nn.Sequential:
    """Conv → LeakyReLU → conv → ReLU6 → conv → PReLU → max pool → linear → Hardswish → linear, (2, 8, 8) inputs."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.LeakyReLU(0.1), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU6(),
            nn.Conv2d(4, 3, 3, padding=1), nn.PReLU(3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(48, 8),
            nn.Hardswish(), nn.Linear(8, 5),
        )
    return net.to(F64).eval()


def explanation_derivative(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(<∂(e·v)/∂x, u> by double backpropagation, the same by central finite differences) for fixed u, v."""
    g = torch.Generator().manual_seed(9)
    u, v = torch.randn(x.shape, generator=g, dtype=F64), torch.randn(x.shape, generator=g, dtype=F64)
    xg = x.clone().requires_grad_(True)
    (hv,) = torch.autograd.grad((Gradient(model)(xg, y, create_graph=True) * v).sum(), xg, allow_unused=True)
    exact = torch.zeros(()) if hv is None else (hv * u).sum()
    t = 1e-5
    fd = ((Gradient(model)(x + t * u, y) - Gradient(model)(x - t * u, y)) * v).sum() / (2 * t)
    return exact, fd


def test_network_of_mixed_activations_gets_a_second_derivative():
    """Without Hardswish the network is piecewise linear: the gradient map's derivative is zero; smoothed,
    it is nonzero and equals finite differences. The deep copy computes the same as the context manager."""
    net = mixed_cnn()
    x = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(4), dtype=F64)
    y = torch.tensor([0, 1, 2, 3])
    piecewise = nn.Sequential(*[m for m in net if not isinstance(m, nn.Hardswish)])
    exact, fd = explanation_derivative(piecewise, x, y)
    assert exact == 0 and fd.abs() < 1e-8
    assert count_smoothed(net) == 4
    with beta_smooth(piecewise, 3.0):
        exact, fd = explanation_derivative(piecewise, x, y)
    assert exact.abs() > 1e-3
    torch.testing.assert_close(exact, fd, rtol=1e-5, atol=1e-9)

    copy = beta_smoothed(net, 3.0)
    assert count_smoothed(copy) == 0 and sum(isinstance(m, SmoothActivation) for m in copy.modules()) == 4
    with beta_smooth(net, 3.0):
        torch.testing.assert_close(copy(x), net(x), **TIGHT)
        torch.testing.assert_close(Gradient(copy)(x, y), Gradient(net)(x, y), **TIGHT)
    assert set_smooth_beta(copy, 7.0) == 4
    with beta_smooth(net, 7.0):
        torch.testing.assert_close(copy(x), net(x), **TIGHT)
    assert not any(isinstance(m, (SmoothActivation, SmoothReLU)) for m in net.modules())  # original untouched
    with pytest.raises(InputError, match="SmoothActivation"):
        SmoothActivation(nn.GELU())
