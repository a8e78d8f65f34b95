"""Tests of the attribution engine (``manifex.attribution``).

The contract every explainer is held to (batching, targets, dtypes, model state, errors, ``output=``, option
names) is generated in ``test_contract.py``. Here: correctness against Captum 0.9, invariants (IG
completeness, x * gradient), constructor and registry errors, and second-order behaviour
(``create_graph=True``) against finite differences.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from manifex.attribution import (
    ALIASES,
    METHODS,
    Gradient,
    InputXGradient,
    IntegratedGradients,
    SmoothGrad,
    explain,
    integration_rule,
    make_explainer,
    method_names,
)
from manifex.attribution.core import TrainModeWarning, selected_output
from manifex.attribution.lrp import LRP
from manifex.errors import InputError, ModelError

try:  # Captum is a test extra; the reference comparisons are skipped without it.
    import captum.attr as captum_attr
except ImportError:  # pragma: no cover
    captum_attr = None

needs_captum = pytest.mark.skipif(captum_attr is None, reason="captum is not installed")
quiet_captum = pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")

F64 = torch.float64
N = 4
TIGHT = dict(rtol=1e-8, atol=1e-10)  # same maths, different chunking / summation order
CAPTUM = dict(rtol=1e-5, atol=1e-7)  # against the reference implementation, float64


# --------------------------------------------------------------------------------------------------------
# models and data


def make_cnn(size: int = 8, act: type[nn.Module] = nn.ReLU, dtype: torch.dtype = F64, seed: int = 0) -> nn.Module:
    """conv-act-conv-act-maxpool-flatten-linear, input (1, size, size), 10 classes."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), act(),
            nn.Conv2d(4, 6, 3, padding=1), act(),
            nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(6 * (size // 2) ** 2, 10),
        )
    return net.to(dtype).eval()


def make_mlp(act: type[nn.Module] = nn.Tanh, dtype: torch.dtype = F64, seed: int = 1, dropout: float = 0.0) -> nn.Module:
    """flatten-linear-act-linear on (1, 8, 8) inputs, 10 classes (optionally with a Dropout)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layers = [nn.Flatten(), nn.Linear(64, 16), act()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(16, 10))
        net = nn.Sequential(*layers)
    return net.to(dtype).eval()


MODELS = {
    "cnn": lambda dtype=F64: make_cnn(dtype=dtype),
    "mlp": lambda dtype=F64: make_mlp(dtype=dtype),
}


def make_x(n: int = N, size: int = 8, dtype: torch.dtype = F64, seed: int = 123) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, generator=g, dtype=F64).to(dtype)


Y = torch.tensor([3, 0, 7, 3])


# --------------------------------------------------------------------------------------------------------
# explainers whose second-order behaviour is checked against finite differences

EXPLAINERS = [
    ("gradient", lambda m: Gradient(m)),
    ("input_x_gradient", lambda m: InputXGradient(m)),
    ("ig_gausslegendre", lambda m: IntegratedGradients(m, steps=12)),
    (
        "ig_trapezoid_path_baseline_ibs7",
        lambda m: IntegratedGradients(
            m, steps=9, integration="riemann_trapezoid", baseline=0.25, multiply_by_inputs=False, internal_batch_size=7
        ),
    ),
    ("smoothgrad_ibs7", lambda m: SmoothGrad(Gradient(m), sigma=0.1, n_samples=6, internal_batch_size=7)),
    (
        "smoothgrad_sq_relative_ixg",
        lambda m: SmoothGrad(InputXGradient(m), sigma=0.05, relative=True, n_samples=5, kind="smoothgrad_sq"),
    ),
    ("vargrad_ig", lambda m: SmoothGrad(IntegratedGradients(m, steps=4), sigma=0.1, n_samples=4, kind="vargrad")),
    ("registry_ig", lambda m: make_explainer(m, "ig", steps=8)),
    ("registry_sg", lambda m: make_explainer(m, "sg", n_samples=4, sigma=0.05)),
    ("guided_backprop", lambda m: make_explainer(m, "guided_backprop")),
    ("lrp_epsilon", lambda m: make_explainer(m, "lrp-epsilon", epsilon=0.01)),
    ("lrp_epsilon_gamma_box", lambda m: make_explainer(m, "lrp_epsilon_gamma_box")),
    ("lrp_alpha1beta0", lambda m: make_explainer(m, "lrp_zplus")),
]
# smooth in x (the relative-sigma noise scale depends on x without a gradient path, by design)
SMOOTH_IN_X = [(n, f) for n, f in EXPLAINERS if "relative" not in n]


def close(a: torch.Tensor, b: torch.Tensor, **tol) -> None:
    torch.testing.assert_close(a, b, **(tol or TIGHT))


# --------------------------------------------------------------------------------------------------------
# errors


def test_other_models_without_gradient_path():
    w = nn.Parameter(torch.randn(10, dtype=F64))
    ignores_input = lambda x: w.expand(x.shape[0], 10) * 1.0  # noqa: E731
    with pytest.raises(ModelError, match="does not depend"):
        Gradient(ignores_input)(make_x(), 1)
    cnn = make_cnn()

    def no_grad_forward(x):
        with torch.no_grad():
            return cnn(x)

    with pytest.raises(ModelError, match="no gradient path"):
        IntegratedGradients(no_grad_forward, steps=4)(make_x(), Y)


def test_scalar_output_models():
    cnn = make_cnn()
    x = make_x()
    one_score = lambda inp: cnn(inp)[:, 4]  # noqa: E731  (N,)
    column = lambda inp: cnn(inp)[:, 4:5]  # noqa: E731  (N, 1)
    close(Gradient(one_score)(x), Gradient(cnn)(x, 4))
    close(Gradient(column)(x), Gradient(cnn)(x, 4))
    with pytest.raises(InputError, match="target=None"):
        Gradient(one_score)(x, 4)


def test_constructor_errors():
    cnn = make_cnn()
    with pytest.raises(InputError, match="callable"):
        Gradient("not a model")
    with pytest.raises(InputError, match="steps"):
        IntegratedGradients(cnn, steps=0)
    with pytest.raises(InputError, match="steps"):
        IntegratedGradients(cnn, steps=1, integration="riemann_trapezoid")
    with pytest.raises(InputError, match="unknown integration rule"):
        IntegratedGradients(cnn, integration="simpson")
    with pytest.raises(InputError, match="internal_batch_size"):
        IntegratedGradients(cnn, internal_batch_size=0)
    with pytest.raises(InputError, match="baseline"):
        IntegratedGradients(cnn, baseline=torch.zeros(3, 3))(make_x(), Y)
    with pytest.raises(InputError, match="wraps a manifex Explainer"):
        SmoothGrad(cnn)
    for bad in (dict(sigma=-0.1), dict(sigma=float("nan")), dict(n_samples=0), dict(kind="median")):
        with pytest.raises(InputError):
            SmoothGrad(Gradient(cnn), **bad)


# --------------------------------------------------------------------------------------------------------
# registry


def test_unknown_method_lists_the_names():
    with pytest.raises(InputError) as info:
        explain(make_cnn(), make_x(), Y, method="no_such_method")
    message = str(info.value)
    assert "no_such_method" in message
    for name in method_names():
        assert name in message
    for alias in ALIASES:
        assert alias in message


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_aliases_resolve(alias):
    cnn = make_cnn()
    x = make_x()
    canonical = ALIASES[alias]
    expl = make_explainer(cnn, alias)
    assert type(expl) is type(make_explainer(cnn, canonical))
    close(explain(cnn, x, Y, method=alias), explain(cnn, x, Y, method=canonical))


def test_alias_types_and_spelling():
    cnn = make_cnn()
    assert type(make_explainer(cnn, "ig")) is IntegratedGradients
    assert type(make_explainer(cnn, "sg")) is SmoothGrad
    assert type(make_explainer(cnn, "grad")) is Gradient
    assert type(make_explainer(cnn, "ixg")) is InputXGradient
    assert type(make_explainer(cnn, "Integrated-Gradients")) is IntegratedGradients
    assert type(make_explainer(cnn, "Input X Gradient")) is InputXGradient


@pytest.mark.parametrize("method", method_names())
def test_every_registered_method_runs(method):
    cnn = make_cnn()
    x = make_x()
    out = explain(cnn, x, Y, method=method)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()


def test_registry_defaults_and_options():
    cnn = make_cnn()
    x = make_x()
    close(explain(cnn, x, Y, method="ig", steps=8), IntegratedGradients(cnn, steps=8)(x, Y))
    close(
        explain(cnn, x, Y, method="ig_path", steps=8),
        IntegratedGradients(cnn, steps=8, multiply_by_inputs=False)(x, Y),
    )
    sg = make_explainer(cnn, "sg", base="ig", steps=3, n_samples=2)
    assert isinstance(sg.inner, IntegratedGradients) and sg.inner.steps == 3 and sg.n_samples == 2
    assert make_explainer(cnn, "vargrad").kind == "vargrad"
    assert make_explainer(cnn, "smoothgrad_sq").kind == "smoothgrad_sq"
    with pytest.raises(InputError, match="bad option"):
        make_explainer(cnn, "gradient", steps=3)
    with pytest.raises(InputError, match="bad option"):
        make_explainer(cnn, "sg", colour="red")
    assert set(METHODS) == set(method_names())


# --------------------------------------------------------------------------------------------------------
# correctness against Captum 0.9 (float64)


@needs_captum
@quiet_captum
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_gradient_matches_captum_saliency(kind):
    model = MODELS[kind]()
    x = make_x()
    ref = captum_attr.Saliency(model).attribute(x, target=Y, abs=False)
    close(Gradient(model)(x, Y), ref, **CAPTUM)
    close(explain(model, x, Y, method="gradient"), ref, **CAPTUM)
    # "saliency" means what Captum's Saliency means by default: the absolute gradient (abs=True)
    default = captum_attr.Saliency(model).attribute(x, target=Y)
    close(explain(model, x, Y, method="saliency"), default, **CAPTUM)
    close(explain(model, x, Y, method="gradient", abs=True), default, **CAPTUM)
    close(Gradient(model, absolute=True)(x, Y), default, **CAPTUM)


@needs_captum
@quiet_captum
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_input_x_gradient_matches_captum(kind):
    model = MODELS[kind]()
    x = make_x()
    ref = captum_attr.InputXGradient(model).attribute(x, target=Y)
    close(InputXGradient(model)(x, Y), ref, **CAPTUM)


@needs_captum
@pytest.mark.parametrize("internal_batch_size", [None, 7])
@pytest.mark.parametrize("multiply_by_inputs", [True, False])
@pytest.mark.parametrize(
    "method", ["gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle"]
)
def test_integrated_gradients_matches_captum(method, multiply_by_inputs, internal_batch_size):
    model = make_cnn()
    x = make_x()
    baseline = 0.3 * make_x(seed=7)  # non-zero, per example
    steps = 10
    ref = captum_attr.IntegratedGradients(model, multiply_by_inputs=multiply_by_inputs).attribute(
        x, baselines=baseline, target=Y, n_steps=steps, method=method, internal_batch_size=internal_batch_size
    )
    if method == "riemann_trapezoid":
        # Captum's trapezoid weights are [1/2n, 1/n, ..., 1/n, 1/2n]: they sum to (n-1)/n, not 1, so its
        # integral is short by that factor. manifex uses the true trapezoid rule (weights sum to 1).
        ref = ref * steps / (steps - 1)
    ours = IntegratedGradients(
        model,
        steps=steps,
        integration=method,
        baseline=baseline,
        multiply_by_inputs=multiply_by_inputs,
        **({} if internal_batch_size is None else {"internal_batch_size": internal_batch_size}),
    )(x, Y)
    close(ours, ref, **CAPTUM)


@needs_captum
def test_integrated_gradients_scalar_and_shared_baseline_match_captum():
    model = make_cnn()
    x = make_x()
    ig = captum_attr.IntegratedGradients(model)
    ref = ig.attribute(x, baselines=0.5, target=Y, n_steps=8)
    close(IntegratedGradients(model, steps=8, baseline=0.5)(x, Y), ref, **CAPTUM)
    shared = make_x(n=1, seed=9)[0]  # one baseline (1, 8, 8) for every example
    ref = ig.attribute(x, baselines=shared.expand_as(x), target=Y, n_steps=8)
    close(IntegratedGradients(model, steps=8, baseline=shared)(x, Y), ref, **CAPTUM)


class _GivenNoise(SmoothGrad):
    """SmoothGrad fed explicit noise of shape (n_samples, *x.shape) (to compare with Captum's draws)."""

    def __init__(self, explainer, noise, **kw):
        super().__init__(explainer, n_samples=noise.shape[0], **kw)
        self.given = noise

    def _noise(self, x):
        return self.given


@needs_captum
@pytest.mark.parametrize("kind", ["smoothgrad", "smoothgrad_sq", "vargrad"])
@pytest.mark.parametrize("inner", ["saliency", "input_x_gradient"])
def test_smoothgrad_matches_captum_noise_tunnel(kind, inner):
    model = make_cnn()
    x = make_x()
    n, sigma = 6, 0.2
    base = captum_attr.Saliency(model) if inner == "saliency" else captum_attr.InputXGradient(model)
    kwargs = {"abs": False} if inner == "saliency" else {}
    with torch.random.fork_rng():
        torch.manual_seed(2024)
        ref = captum_attr.NoiseTunnel(base).attribute(
            x, nt_type=kind, nt_samples=n, stdevs=sigma, target=Y, **kwargs
        )
        # Captum 0.9 draws all its noise with one torch.normal(0, float32 stdev tensor) call, example-major
        # (input.repeat_interleave(n)); reproduce exactly that draw and reorder it sample-major.
        torch.manual_seed(2024)
        std = torch.tensor(sigma).repeat((N * n, *x.shape[1:]))
        noise = torch.normal(0, std).to(F64).reshape(N, n, *x.shape[1:]).transpose(0, 1)
    ours = _GivenNoise(Gradient(model) if inner == "saliency" else InputXGradient(model), noise, kind=kind)(x, Y)
    close(ours, ref, **CAPTUM)


# --------------------------------------------------------------------------------------------------------
# SmoothGrad against a manual loop over the same noise


@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("kind", ["smoothgrad", "smoothgrad_sq", "vargrad"])
@pytest.mark.parametrize("inner", [Gradient, InputXGradient, lambda m: IntegratedGradients(m, steps=3)])
def test_smoothgrad_equals_manual_loop(inner, kind, relative):
    model = make_cnn()
    x = make_x()
    sg = SmoothGrad(inner(model), sigma=0.1, n_samples=5, relative=relative, kind=kind, seed=3, internal_batch_size=6)
    noise = sg._noise(x)
    assert noise.shape == (5, *x.shape)
    samples = torch.stack([inner(model)(x + noise[k], Y) for k in range(5)])
    expected = {
        "smoothgrad": samples.mean(0),
        "smoothgrad_sq": (samples**2).mean(0),
        "vargrad": samples.var(0, unbiased=False),
    }[kind]
    close(sg(x, Y), expected)


def test_smoothgrad_noise_and_seed():
    model = make_cnn()
    x = make_x()
    sg = SmoothGrad(Gradient(model), sigma=0.2, n_samples=7, seed=11)
    noise = sg._noise(x)
    assert noise.dtype == x.dtype
    close(noise, sg._noise(x), rtol=0, atol=0)  # reproducible
    assert abs(float(noise.std()) - 0.2) < 0.05
    # relative sigma: the same draws scaled by each example's value range
    rel = SmoothGrad(Gradient(model), sigma=0.2, n_samples=7, seed=11, relative=True)._noise(x)
    span = (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))).view(1, N, 1, 1, 1)
    close(rel, noise * span)
    # same seed same result, other seed other result, no seed: the global generator
    close(sg(x, Y), SmoothGrad(Gradient(model), sigma=0.2, n_samples=7, seed=11)(x, Y), rtol=0, atol=0)
    assert not torch.allclose(sg(x, Y), SmoothGrad(Gradient(model), sigma=0.2, n_samples=7, seed=12)(x, Y))
    unseeded = SmoothGrad(Gradient(model), sigma=0.2, n_samples=3, seed=None)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        a = unseeded(x, Y)
        torch.manual_seed(5)
        b = unseeded(x, Y)
    close(a, b, rtol=0, atol=0)


def test_smoothgrad_with_zero_sigma_is_the_inner_explainer():
    model = make_cnn()
    x = make_x()
    for inner in (Gradient(model), InputXGradient(model), IntegratedGradients(model, steps=5)):
        close(SmoothGrad(inner, sigma=0.0, n_samples=3)(x, Y), inner(x, Y))
        close(SmoothGrad(inner, sigma=0.0, n_samples=3, kind="smoothgrad_sq")(x, Y), inner(x, Y) ** 2)
        var = SmoothGrad(inner, sigma=0.0, n_samples=3, kind="vargrad")(x, Y)
        close(var, torch.zeros_like(x), rtol=0, atol=1e-14)


# --------------------------------------------------------------------------------------------------------
# invariants


@pytest.mark.parametrize("baseline", [0.0, 0.4])
@pytest.mark.parametrize("kind", ["softplus_mlp", "relu_cnn"])
def test_integrated_gradients_completeness(kind, baseline):
    model = make_mlp(act=nn.Softplus) if kind == "softplus_mlp" else make_cnn()
    x = make_x()
    attr = IntegratedGradients(model, steps=200, baseline=baseline)(x, Y)
    with torch.no_grad():
        idx = torch.arange(N)
        gap = model(x)[idx, Y] - model(torch.full_like(x, baseline))[idx, Y]
    total = attr.reshape(N, -1).sum(1)
    if kind == "softplus_mlp":  # smooth integrand: Gauss-Legendre converges fast (far below 1e-3)
        close(total, gap, rtol=1e-8, atol=1e-10)
    else:  # ReLU/max-pool kinks make the integrand piecewise constant: O(1/steps) quadrature error
        close(total, gap, rtol=2e-2, atol=1e-3 * float(gap.abs().max()))


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_input_x_gradient_is_x_times_gradient(kind):
    model = MODELS[kind]()
    x = make_x()
    close(InputXGradient(model)(x, Y), x * Gradient(model)(x, Y), rtol=0, atol=0)


def test_integrated_gradients_path_times_delta():
    model = make_cnn()
    x = make_x()
    b = 0.2 * make_x(seed=4)
    path = IntegratedGradients(model, steps=7, baseline=b, multiply_by_inputs=False)(x, Y)
    full = IntegratedGradients(model, steps=7, baseline=b)(x, Y)
    close(full, path * (x - b))
    # one step of the left Riemann rule is the gradient at the baseline
    left1 = IntegratedGradients(model, steps=1, integration="riemann_left", baseline=b, multiply_by_inputs=False)
    close(left1(x, Y), Gradient(model)(b, Y))


@pytest.mark.parametrize(
    "method", ["gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle"]
)
def test_integration_rules(method):
    for steps in (2, 5, 16):
        alphas, weights = integration_rule(steps, method)
        assert len(alphas) == len(weights) == steps
        assert all(0.0 <= a <= 1.0 for a in alphas)
        assert math.isclose(sum(weights), 1.0, rel_tol=1e-12)
        # integral of t over [0, 1]: exact for every rule except the one-sided Riemann sums
        approx = sum(a * w for a, w in zip(alphas, weights))
        if method in ("gausslegendre", "riemann_trapezoid", "riemann_middle"):
            assert math.isclose(approx, 0.5, rel_tol=1e-12)
    alphas, weights = integration_rule(6, "gausslegendre")  # exact for degree 2n - 1 = 11
    assert math.isclose(sum(a**11 * w for a, w in zip(alphas, weights)), 1 / 12, rel_tol=1e-12)


# --------------------------------------------------------------------------------------------------------
# second order (create_graph=True)


def test_relu_network_second_derivative_is_zero():
    model = make_cnn()
    for p in list(model.parameters())[:2]:  # also with some frozen parameters
        p.requires_grad_(False)
    x = make_x().requires_grad_(True)
    v = make_x(seed=5)
    g = explain(model, x, Y, method="gradient", create_graph=True)
    assert g.requires_grad
    close(g.detach(), Gradient(model)(x.detach(), Y), rtol=0, atol=0)
    (hv,) = torch.autograd.grad((g * v).sum(), x, allow_unused=True)
    assert hv is None or torch.count_nonzero(hv) == 0
    assert x.grad is None and all(p.grad is None for p in model.parameters())


def test_softplus_hessian_vector_product_matches_finite_differences():
    model = make_mlp(act=nn.Softplus)
    x0 = make_x()
    v = make_x(seed=5)
    x = x0.clone().requires_grad_(True)
    g = Gradient(model)(x, Y, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), x)
    assert hv.abs().max() > 1e-3, "a Softplus network has a non-zero Hessian"
    h = 1e-5
    fd = (Gradient(model)(x0 + h * v, Y) - Gradient(model)(x0 - h * v, Y)) / (2 * h)  # H v (H symmetric)
    close(hv, fd, rtol=1e-5, atol=1e-5 * float(fd.abs().max()))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name,factory", SMOOTH_IN_X, ids=[n for n, _ in SMOOTH_IN_X])
def test_second_order_matches_finite_differences(name, factory):
    """d/dx <E(x), v> along a direction u equals the central difference of <E(x), v> (Softplus model)."""
    model = make_mlp(act=nn.Softplus)
    expl = factory(model)
    x0, v, u = make_x(), make_x(seed=5), make_x(seed=6)
    x = x0.clone().requires_grad_(True)
    attr = expl(x, Y, create_graph=True)
    close(attr.detach(), expl(x0, Y))
    (dx,) = torch.autograd.grad((attr * v).sum(), x)
    h = 1e-5
    f = lambda z: float((expl(z, Y) * v).sum())  # noqa: E731
    fd = (f(x0 + h * u) - f(x0 - h * u)) / (2 * h)
    assert math.isclose(float((dx * u).sum()), fd, rel_tol=1e-5, abs_tol=1e-8)
    assert all(p.grad is None for p in model.parameters())


def test_create_graph_on_a_path_without_second_derivative_warns():
    """An explanation that cannot depend on x (affine model, frozen weights) says so instead of silently
    returning a constant that an optimiser would differentiate to zero."""
    model = nn.Linear(4, 3).double().requires_grad_(False)
    x = torch.randn(2, 4, dtype=F64, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="does not depend differentiably"):
        g = Gradient(model)(x, 1, create_graph=True)
    torch.testing.assert_close(g, model.weight[1].expand(2, 4))


def test_internal_batch_size_bounds_every_model_call():
    """A batch larger than internal_batch_size is explained in chunks of examples: no model call sees more
    than the bound, and the result equals the unbounded one (per-example baselines and targets sliced)."""
    model = make_cnn()
    x = make_x()
    n = x.shape[0]
    sizes: list[int] = []

    def counted(inp: torch.Tensor) -> torch.Tensor:
        sizes.append(inp.shape[0])
        return model(inp)

    target = torch.arange(n) % 10
    baseline = 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=x.dtype)
    small = 2
    assert n > small
    for make in (lambda m, b: IntegratedGradients(m, steps=5, baseline=baseline, internal_batch_size=b),
                 lambda m, b: SmoothGrad(Gradient(m), sigma=0.1, n_samples=3, internal_batch_size=b)):
        sizes.clear()
        bounded = make(counted, small)(x, target)
        assert sizes and max(sizes) <= small
        torch.testing.assert_close(bounded, make(model, 512)(x, target), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------------
# issue 10, items 5-8: the integration rule by name, Captum's names, tuple/dict outputs, train mode


def test_integration_rule_reachable_from_every_entry_point():
    """``integration=`` sets IG's rule through make_explainer/explain/SmoothGrad (``method=`` collided)."""
    cnn = make_cnn()
    x = make_x()
    direct = IntegratedGradients(cnn, steps=9, integration="riemann_trapezoid")(x, Y)
    close(make_explainer(cnn, "ig", integration="riemann_trapezoid", steps=9)(x, Y), direct)
    close(explain(cnn, x, Y, method="integrated_gradients", integration="riemann_trapezoid", steps=9), direct)
    assert not torch.allclose(direct, IntegratedGradients(cnn, steps=9)(x, Y))  # the rule was not ignored
    sg = make_explainer(cnn, "sg", base="ig", integration="riemann_left", steps=3, n_samples=2)
    assert sg.inner.integration == "riemann_left"
    path = make_explainer(cnn, "ig_path", integration="riemann_middle", steps=5)
    assert path.integration == "riemann_middle" and not path.multiply_by_inputs
    # the class's old keyword still works, deprecated; both at once is an error
    with pytest.warns(DeprecationWarning, match="integration="):
        old = IntegratedGradients(cnn, steps=9, method="riemann_trapezoid")
    assert old.integration == old.method == "riemann_trapezoid"
    close(old(x, Y), direct)
    with pytest.raises(InputError, match="once"):
        IntegratedGradients(cnn, integration="riemann_left", method="riemann_left")
    with pytest.raises(InputError, match="bad option"):
        make_explainer(cnn, "gradient", integration="riemann_left")


def test_captum_argument_names_are_aliases():
    cnn = make_cnn()
    x = make_x()
    close(explain(cnn, x, Y, method="ig", n_steps=6, baselines=0.3, internal_batch_size=7),
          explain(cnn, x, Y, method="ig", steps=6, baseline=0.3, internal_batch_size=7))
    close(explain(cnn, x, Y, method="sg", nt_samples=3, stdevs=0.1, nt_type="vargrad"),
          explain(cnn, x, Y, method="sg", n_samples=3, sigma=0.1, kind="vargrad"))
    close(explain(cnn, x, Y, method="gradient", abs=True), Gradient(cnn)(x, Y).abs())
    close(explain(cnn, x, Y, method="saliency", abs=False), Gradient(cnn)(x, Y))
    for both in (dict(n_steps=4, steps=4), dict(baselines=0.0, baseline=0.0)):
        with pytest.raises(InputError, match="not both"):
            make_explainer(cnn, "ig", **both)
    with pytest.raises(InputError, match="not both"):
        make_explainer(cnn, "sg", stdevs=0.1, sigma=0.1)


def test_target_as_a_list_of_ints():
    cnn = make_cnn()
    x = make_x()
    for expl in (Gradient(cnn), IntegratedGradients(cnn, steps=4), make_explainer(cnn, "lrp")):
        close(expl(x, Y.tolist()), expl(x, Y))
        with pytest.raises(InputError, match="tuple is one multi-dimensional output index in Captum"):
            expl(x, tuple(Y.tolist()))  # Captum's meaning of a tuple differs: refused, not reinterpreted
    with pytest.raises(InputError, match="integer class indices"):
        Gradient(cnn)(x, [0.5, 1, 2, 3])
    with pytest.raises(InputError, match="shape"):
        Gradient(cnn)(x, [1, 2])


@needs_captum
def test_captum_trapezoid_weights_sum_to_n_minus_one_over_n():
    """The claim in IntegratedGradients' docstring, checked on Captum's own rule."""
    from captum.attr._utils.approximation_methods import approximation_parameters

    step_sizes, alphas = approximation_parameters("riemann_trapezoid")
    for n in (2, 5, 50):
        assert math.isclose(sum(step_sizes(n)), (n - 1) / n, rel_tol=1e-12)
        ours_alphas, ours_weights = integration_rule(n, "riemann_trapezoid")
        torch.testing.assert_close(torch.tensor(ours_alphas, dtype=F64), torch.tensor(alphas(n), dtype=F64))
        assert math.isclose(sum(ours_weights), 1.0, rel_tol=1e-12)


class _TupleOut(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x), x.flatten(1).mean(1)


class _DictOut(_TupleOut):
    def forward(self, x):
        return {"aux": x.flatten(1).mean(1), "logits": self.net(x)}


def test_tuple_and_dict_outputs_need_and_take_an_output_selector():
    cnn = make_cnn()
    x = make_x()
    ref = Gradient(cnn)(x, Y)
    for wrapped, good, hint in ((_TupleOut(cnn), 0, "output=0"), (_DictOut(cnn), "logits", 'output="logits"')):
        with pytest.raises(InputError, match=hint):
            Gradient(wrapped)(x, Y)
        close(Gradient(wrapped, output=good)(x, Y), ref)
        close(explain(wrapped, x, Y, method="gradient", output=good), ref)
        pick = (lambda out: out[0]) if isinstance(good, int) else (lambda out: out["logits"])
        close(Gradient(wrapped, output=pick)(x, Y), ref)
        close(Gradient(lambda t, w=wrapped: w(t), output=good)(x, Y), ref)  # a plain callable model
    with pytest.raises(InputError, match="out of range"):
        Gradient(_TupleOut(cnn), output=5)(x, Y)
    with pytest.raises(InputError, match="not a key.*aux"):
        Gradient(_DictOut(cnn), output="scores")(x, Y)
    with pytest.raises(InputError, match="one tensor"):
        Gradient(cnn, output=0)(x, Y)
    with pytest.raises(InputError, match="index"):
        Gradient(cnn, output=1.5)
    # the selection is one forward hook for the duration of the call, nested selections use the innermost
    wrapped = _TupleOut(cnn)
    with selected_output(wrapped, 0):
        with selected_output(wrapped, None):
            assert isinstance(wrapped(x), torch.Tensor)
        assert len(wrapped._forward_hooks) == 1
    assert len(wrapped._forward_hooks) == 0 and isinstance(wrapped(x), tuple)


def test_lrp_and_smoothgrad_take_the_output_selector():
    cnn = make_cnn()
    x = make_x()
    lrp = make_explainer(_DictOut(cnn), "lrp_epsilon", output="logits")
    close(lrp(x, Y), make_explainer(cnn, "lrp_epsilon")(x, Y))
    with pytest.raises(InputError, match='output="logits"'):
        LRP(_DictOut(cnn))(x, Y)
    sg = SmoothGrad(Gradient(_TupleOut(cnn), output=0), sigma=0.1, n_samples=3)
    assert sg.output == 0  # the inner explainer's
    close(sg(x, Y), SmoothGrad(Gradient(cnn), sigma=0.1, n_samples=3)(x, Y))


def _dropout_bn_cnn() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(3)
        net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                            nn.Dropout(0.5), nn.Linear(3 * 64, 10))
    return net.double()


def test_train_mode_warns_once_per_model_naming_eval():
    x = make_x()
    model = _dropout_bn_cnn().train()
    with pytest.warns(TrainModeWarning, match=r"BatchNorm2d, Dropout.*model\.eval\(\)"):
        Gradient(model)(x, Y)
    assert model.training, "the mode is left as found"
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Gradient(model)(x, Y)  # the same model again: no second warning
        explain(make_cnn().train(), x, Y)  # train mode without Dropout/BatchNorm changes nothing: no warning
        Gradient(_dropout_bn_cnn().eval())(x, Y)
    assert not [w for w in caught if issubclass(w.category, TrainModeWarning)]
    # LRP's refusal of a train-mode BatchNorm stays
    with pytest.warns(TrainModeWarning), pytest.raises(ModelError, match="eval mode"):
        make_explainer(_dropout_bn_cnn().train(), "lrp")(x, Y)


def test_trapezoid_completeness_error_falls_as_one_over_n_squared():
    """The exact trapezoid weights (Captum's sum to (n-1)/n, whose error falls only as 1/n)."""
    model = make_mlp(act=nn.Softplus)
    x = make_x()
    with torch.no_grad():
        gap = (model(x) - model(torch.zeros_like(x)))[torch.arange(N), Y]
    err = [float((IntegratedGradients(model, steps=n, integration="riemann_trapezoid")(x, Y).flatten(1).sum(1) - gap)
                 .abs().max()) for n in (10, 20)]
    assert 3.5 < err[0] / err[1] < 4.5


@pytest.mark.parametrize("method", ["gradient", "lrp_epsilon", "deeplift", "ig"])
def test_wrong_shape_channels_and_dtype_name_the_input(method):
    """A batch the model cannot take is one InputError naming its shape and dtype, for every kind of method
    (plain gradient, hook-based LRP and DeepLift, path methods that batch copies of the input)."""
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    for bad in (torch.rand(2, 3, 8, 8), torch.rand(2, 8, 8), torch.rand(2, 1, 9, 9)):
        with pytest.raises(InputError, match=r"the model cannot run on inputs of shape .*channels, image size"):
            explain(net, bad, 0, method=method)
    with pytest.raises(InputError, match=r"dtype torch.float64 .*float32"):
        explain(net, torch.rand(2, 1, 8, 8, dtype=torch.float64), 0, method=method)
    assert explain(net, torch.rand(2, 1, 8, 8), 0, method=method).shape == (2, 1, 8, 8)
