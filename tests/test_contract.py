"""The generated contract suite: every explainer is held to the same rules (after Captum's
``tests/attr/test_targets.py`` and ``test_hook_removal.py``).

``CONFIGS`` is one table: every method of the registry (``METHODS``, so a newly registered method is covered
without editing this file; ``FAST`` only makes some cheaper) plus class-built variants that the registry
does not reach. For each row a test class ``TestContract_<name>`` is generated from :class:`_Contract`:

- batched result = per-example results, for a (N,) tensor, a list and an int target;
- per-example targets: tensor = loop over ints = list of ints = a callable picking indices; float-score
  callables; target and input errors;
- the model's state (mode, ``requires_grad``, buffers, hooks) is left as found, also when the call raises
  (bad target, a failing forward, a forward that mutates the model), and no hook is left behind;
- ``output=`` (index, key, callable) on tuple/dict models equals the plain model — set on the explainer, as
  the registry's option and as a constructor argument (class rows with ``takes_options``); without it a clear
  error names the option (issue 10, item 7);
- a train-mode model with Dropout/BatchNorm warns once, naming ``model.eval()``; LRP still refuses a
  train-mode BatchNorm (item 8);
- Captum's option names behave exactly like manifex's (both accepted and equal, or both refused), both
  names at once is an error, and ``integration=`` reaches IG wherever IG is inside (items 5, 6);
- float32 and float64; ``create_graph=True`` on an input without grad; no gradient path → ModelError.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
from torch import nn

from manifex.attribution import (
    METHODS,
    OPTION_ALIASES,
    Explainer,
    GradCAM,
    Gradient,
    InputXGradient,
    IntegratedGradients,
    SmoothGrad,
    explain,
    make_explainer,
)
from manifex.attribution.core import TrainModeWarning, preserve_model_state
from manifex.attribution.lrp import LRP, Composite, Epsilon, EpsilonGammaBox, Gamma, LRPGamma
from manifex.attribution.smoothing import SmoothedExplainer
from manifex.errors import InputError, ModelError
from manifex.manipulation import manipulate

F64 = torch.float64
N = 4
Y = torch.tensor([3, 0, 7, 3])
TIGHT = dict(rtol=1e-8, atol=1e-10)
HOOK_ATTRS = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
)


# --------------------------------------------------------------------------------------------------------
# the model and inputs every row is explained on


def make_model(dtype: torch.dtype = F64, seed: int = 0, inplace: bool = False) -> nn.Sequential:
    """conv-BN-ReLU-conv-ReLU-maxpool-flatten-dropout-linear on (1, 8, 8) inputs, 10 classes, eval mode.
    BatchNorm has non-trivial running statistics; Dropout is the identity in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=inplace),
            nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(inplace=inplace),
            nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.3), nn.Linear(6 * 4 * 4, 10),
        )
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 1.5)
        net[1].weight.data.uniform_(0.5, 1.5)
        net[1].bias.data.uniform_(-0.1, 0.1)
    return net.to(dtype).eval()


def make_x(n: int = N, dtype: torch.dtype = F64, seed: int = 123) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=F64).to(dtype)


class TupleOut(nn.Module):
    """``(logits, aux)``: an auxiliary output next to the logits."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x), x.flatten(1).mean(1)


class DictOut(TupleOut):
    """``{"aux": ..., "logits": ...}`` (Hugging Face style)."""

    def forward(self, x):
        return {"aux": x.flatten(1).mean(1), "logits": self.net(x)}


class Failing(nn.Module):
    """A forward that flips train/eval, freezes a parameter and registers hooks, then (optionally) raises."""

    def __init__(self, net: nn.Module, fail: bool) -> None:
        super().__init__()
        self.net, self.fail = net, fail

    def forward(self, x):
        self.eval()
        self.net[-1].weight.requires_grad_(False)
        self.net[0].register_forward_hook(lambda *args: None)
        self.register_forward_pre_hook(lambda *args: None)
        if self.fail:
            raise RuntimeError("forward failed")
        return self.net(x)


class Detaching(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.detach())


def snapshot(model: nn.Module) -> dict:
    """Everything an explanation must leave as it found it (hooks by id, tensors by value)."""
    return dict(
        training=[m.training for m in model.modules()],
        requires_grad=[p.requires_grad for p in model.parameters()],
        hooks=[{a: list(getattr(m, a, {}).keys()) for a in HOOK_ATTRS} for m in model.modules()],
        state={k: v.detach().clone() for k, v in model.state_dict().items()},
        grads=[p.grad for p in model.parameters()],
        modes=torch._C._len_torch_function_stack(),
    )


def assert_same_state(before: dict, after: dict) -> None:
    for key in ("training", "requires_grad", "hooks", "modes"):
        assert after[key] == before[key], key
    assert after["state"].keys() == before["state"].keys()
    for k in before["state"]:
        assert torch.equal(after["state"][k], before["state"][k]), k
    assert all(g is None for g in after["grads"]), "an explanation accumulated .grad on parameters"


def close(a: torch.Tensor, b: torch.Tensor, **tol) -> None:
    torch.testing.assert_close(a, b, **(tol or TIGHT))


# --------------------------------------------------------------------------------------------------------
# the table


@dataclass(frozen=True)
class Config:
    """One explainer: by registry ``method`` and ``options``, or by a ``build(model)`` of classes."""

    name: str
    method: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    build: Callable[..., Explainer] | None = None
    noisy: bool = False  # random draws depend on the dtype: float32/float64 compare only dtypes and shapes
    inplace: bool = False  # the model's ReLUs work in place
    takes_options: bool = False  # ``build(model, **options)`` passes options (output=) to the constructor

    def make(self, model: Any, **extra: Any) -> Explainer:
        if self.method is not None:
            return make_explainer(model, self.method, **{**self.options, **extra})
        assert not extra or self.takes_options
        return self.build(model, **extra)


#: Cheaper options for some registry methods (the contract does not depend on them).
FAST: dict[str, dict[str, Any]] = {
    "integrated_gradients": {"steps": 8},
    "integrated_gradients_path": {"steps": 8},
    "smoothgrad": {"n_samples": 4, "sigma": 0.1},
    "smoothgrad_sq": {"n_samples": 4, "sigma": 0.1},
    "vargrad": {"n_samples": 4, "sigma": 0.1},
}
NOISY = {"smoothgrad", "smoothgrad_sq", "vargrad"}


def _last_conv(model: Any) -> nn.Module | None:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1] if isinstance(model, nn.Module) else None


def _first_conv(model: Any) -> nn.Module | None:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d)) if isinstance(model, nn.Module) else None


CONFIGS: list[Config] = [
    *(Config(name, name, FAST.get(name, {}), noisy=name in NOISY) for name in sorted(METHODS)),
    Config("ig_trapezoid_path_baseline_ibs7", build=lambda m: IntegratedGradients(
        m, steps=9, integration="riemann_trapezoid", baseline=0.25, multiply_by_inputs=False, internal_batch_size=7)),
    Config("sg_over_ig_left_ibs7", "smoothgrad",
           {"base": "ig", "integration": "riemann_left", "steps": 3, "n_samples": 3, "sigma": 0.1, "internal_batch_size": 7},
           noisy=True),
    Config("sg_sq_relative_ixg", build=lambda m: SmoothGrad(InputXGradient(m), sigma=0.05, relative=True, n_samples=3,
                                                            kind="smoothgrad_sq"), noisy=True),
    Config("beta_smoothed_gradient", build=lambda m: SmoothedExplainer(Gradient(m), beta=5.0)),
    Config("gradcam_first_conv_signed", build=lambda m: GradCAM(m, _first_conv(m), relu=False, upsample_mode="nearest")),
    Config("gradcam_last_conv_by_module", build=lambda m: GradCAM(m, _last_conv(m))),
    Config("gradient_inplace_relu", "gradient", inplace=True),
    Config("guided_backprop_inplace_relu", "guided_backprop", inplace=True),
    Config("gradcam_inplace_relu", "gradcam", inplace=True),
    Config("deeplift_inplace_relu", "deeplift", inplace=True),
    Config("lrp_inplace_relu", "lrp_epsilon_plus", inplace=True),
    Config("lrp_custom_composite", build=lambda m: LRP(m, Composite([(nn.Conv2d, Gamma(0.1)), (nn.Linear, Epsilon(0.01))]))),
    # the γ rule's two modes through the registry (sign_aware is the registry rows' default)
    Config("lrp_gamma_textbook", "lrp_gamma", {"gamma_mode": "textbook"}),
    Config("lrp_epsilon_gamma_box_textbook", "lrp_epsilon_gamma_box", {"gamma_mode": "textbook"}),
    # LRP classes built with output= in the constructor, like every other explainer
    Config("lrp_class_composite_output", build=lambda m, **o: LRP(m, EpsilonGammaBox(-4.0, 4.0), **o), takes_options=True),
    Config("lrp_gamma_class_textbook_output", build=lambda m, **o: LRPGamma(m, gamma=0.1, gamma_mode="textbook", **o),
           takes_options=True),
]
_BY_NAME = {c.name: c for c in CONFIGS}
assert len(_BY_NAME) == len(CONFIGS), "config names must be unique"

#: One value per Captum option name, to compare ``alias=value`` with ``canonical=value``.
ALIAS_VALUES: dict[str, Any] = {
    "n_steps": 5, "baselines": 0.1, "nt_samples": 3, "stdevs": 0.05, "nt_type": "smoothgrad_sq", "abs": True,
    "relu_attributions": False, "interpolate_mode": "nearest",
}


def _inner_ig(explainer: Explainer) -> IntegratedGradients | None:
    while explainer is not None:
        if isinstance(explainer, IntegratedGradients):
            return explainer
        explainer = getattr(explainer, "inner", None)
    return None


# --------------------------------------------------------------------------------------------------------
# the contract


class _Contract:
    config: Config

    def net(self, dtype: torch.dtype = F64) -> nn.Sequential:
        return make_model(dtype, inplace=self.config.inplace)

    def explainer(self, model: Any = None, **extra: Any) -> Explainer:
        return self.config.make(self.net() if model is None else model, **extra)

    def _accepts_plain_callables(self) -> bool:
        try:
            self.config.make(lambda t: t)
        except (InputError, ModelError):
            return False
        return True

    # -- batches and targets

    def test_batched_equals_per_example(self):
        x = make_x()
        x0 = x.clone()
        expl = self.explainer()
        batched = expl(x, Y)
        assert batched.shape == x.shape and batched.dtype == x.dtype and torch.isfinite(batched).all()
        assert not batched.requires_grad
        close(batched, torch.cat([expl(x[i : i + 1], Y[i : i + 1]) for i in range(N)]))
        close(expl(x, 5), torch.cat([expl(x[i : i + 1], 5) for i in range(N)]))
        assert torch.equal(x, x0), "the explainer modified its input"

    def test_per_example_targets(self):
        x = make_x()
        expl = self.explainer()
        by_tensor = expl(x, Y)
        close(torch.cat([expl(x[i : i + 1], int(Y[i])) for i in range(N)]), by_tensor)
        close(expl(x, Y.tolist()), by_tensor)  # a list of ints, as Captum accepts
        close(expl(x, Y.to(torch.int32)), by_tensor)
        close(expl(x, torch.tensor(7)), expl(x, 7))
        const = lambda out: torch.full((out.shape[0],), 6, dtype=torch.int32)  # noqa: E731
        close(expl(x, const), expl(x, [6] * N))

    def test_callable_float_score_target(self):
        if not self._accepts_plain_callables():
            pytest.skip("hooks the model's modules: a plain callable wrapping the model is not supported")
        model = self.net()
        x = make_x()
        picked = self.explainer(model)(x, lambda out: out.log_softmax(1)[:, 2])
        wrapped = self.config.make(lambda inp: model(inp).log_softmax(1))(x, 2)
        assert torch.isfinite(picked).all()
        close(picked, wrapped)

    def test_target_errors(self):
        expl = self.explainer()
        x = make_x()
        for bad in (10, -1, torch.tensor([0, 1, 10, 2]), [0, -1, 2, 2]):
            with pytest.raises(InputError, match=r"\[0, 9\]"):
                expl(x, bad)
        for bad in (torch.zeros(N + 1, dtype=torch.long), [1, 2]):
            with pytest.raises(InputError, match="shape"):
                expl(x, bad)
        for bad in (torch.zeros(N), [0.5] * N):
            with pytest.raises(InputError, match="integer class indices"):
                expl(x, bad)
        with pytest.raises(InputError, match="target"):
            expl(x, None)
        with pytest.raises(InputError, match="int, a tensor or a callable"):
            expl(x, "3")

    def test_input_errors(self):
        expl = self.explainer()
        x = make_x()
        with pytest.raises(InputError, match="floating-point"):
            expl(x.long(), Y)
        bad = x.clone()
        bad[2, 0, 3, 3] = float("nan")
        with pytest.raises(InputError, match=r"NaN/inf.*examples \[2\]"):
            expl(bad, Y)
        with pytest.raises(InputError, match="torch.Tensor"):
            expl(x.numpy(), Y)

    def test_float32_and_float64(self):
        out = {}
        for dtype in (torch.float32, F64):
            x = make_x(dtype=dtype)
            out[dtype] = self.explainer(self.net(dtype))(x, Y)
            assert out[dtype].dtype == dtype and out[dtype].shape == x.shape and torch.isfinite(out[dtype]).all()
        if not self.config.noisy:
            scale = float(out[F64].abs().max())
            close(out[torch.float32].double(), out[F64], rtol=1e-3, atol=1e-3 * scale)

    def test_create_graph_without_input_grad(self):
        model = self.net()
        x = make_x()
        close(self.explainer(model)(x, Y, create_graph=True).detach(), self.explainer(model)(x, Y))
        assert all(p.grad is None for p in model.parameters())

    # -- model state and hooks

    def test_state_and_hooks_left_as_found(self):
        model = self.net()
        model[0].bias.requires_grad_(False)
        calls = []
        model[0].register_forward_hook(lambda mod, inp, out: calls.append(1))
        model[3].register_forward_pre_hook(lambda mod, inp: None)
        model[-1].register_full_backward_hook(lambda mod, gin, gout: None)
        before = snapshot(model)
        expl = self.explainer(model)
        expl(make_x(), Y)
        assert calls, "user hooks stay active during the explanation"
        assert_same_state(before, snapshot(model))
        with pytest.raises(InputError, match="target indices"):
            expl(make_x(), 10)  # raises after the hooks are installed
        assert_same_state(before, snapshot(model))

    @pytest.mark.parametrize("fail", [False, True], ids=["mutating", "raising"])
    def test_state_restored_after_a_mutating_or_failing_forward(self, fail):
        model = Failing(self.net(), fail)
        before = snapshot(model)
        if fail:
            with pytest.raises(RuntimeError, match="forward failed"):
                self.explainer(model)(make_x(), Y)
        else:
            self.explainer(model)(make_x(), Y)
        assert_same_state(before, snapshot(model))

    def test_input_requiring_grad_is_left_alone(self):
        model = self.net()
        x = make_x().requires_grad_(True)
        out = self.explainer(model)(x, Y)
        assert x.grad is None and not out.requires_grad
        close(out, self.explainer(model)(x.detach(), Y))

    def test_model_without_gradient_path_raises(self):
        model = Detaching(self.net())
        if isinstance(self.explainer(model), GradCAM):
            pytest.skip("Grad-CAM differentiates at an inner layer: detaching the input does not cut its path")
        before = snapshot(model)
        with pytest.raises(ModelError):
            self.explainer(model)(make_x(), Y)
        assert_same_state(before, snapshot(model))

    # -- output= (tuple and dict outputs)

    @pytest.mark.parametrize("kind", ["tuple", "dict"])
    def test_output_selector(self, kind):
        net = self.net()
        x = make_x()
        ref = self.explainer(net)(x, Y)
        wrapped = TupleOut(net) if kind == "tuple" else DictOut(net)
        key, hint = (0, "output=0") if kind == "tuple" else ("logits", 'output="logits"')
        before = snapshot(wrapped)
        with pytest.raises(InputError, match=hint):
            self.explainer(wrapped)(x, Y)
        assert_same_state(before, snapshot(wrapped))
        pick = (lambda out: out[0]) if kind == "tuple" else (lambda out: out["logits"])
        for selector in (key, pick):
            expl = self.explainer(wrapped)
            expl.output = selector
            close(expl(x, Y), ref)
            if self.config.method is not None or self.config.takes_options:  # the registry's/constructor's output=
                close(self.explainer(wrapped, output=selector)(x, Y), ref)
        if kind == "tuple":
            expl = self.explainer(wrapped)
            expl.output = -2
            close(expl(x, Y), ref)
        assert_same_state(before, snapshot(wrapped))

    def test_output_selector_on_a_tensor_model_is_an_error(self):
        expl = self.explainer()
        expl.output = 0
        with pytest.raises(InputError, match="one tensor"):
            expl(make_x(), Y)

    # -- train mode

    def test_train_mode_warns_once(self):
        x = make_x()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.explainer()(x, Y)
        assert not [w for w in caught if issubclass(w.category, TrainModeWarning)], "eval mode: no warning"
        model = self.net().train()
        expl = self.explainer(model)
        refuses = isinstance(expl, LRP) or isinstance(getattr(expl, "inner", None), LRP)
        with pytest.warns(TrainModeWarning, match=r"BatchNorm2d, Dropout.*model\.eval\(\)"):
            if refuses:  # LRP folds BatchNorm and refuses a train-mode one
                with pytest.raises(ModelError, match="eval mode"):
                    expl(x, Y)
            else:
                expl(x, Y)
        assert model.training and all(m.training for m in model.modules()), "the mode is left as found"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                expl(x, Y)
            except ModelError:
                assert refuses
        assert not [w for w in caught if issubclass(w.category, TrainModeWarning)], "warned once per model"

    # -- option names (registry rows)

    def _registry_only(self) -> None:
        if self.config.method is None:
            pytest.skip("built from classes: options are the constructor's, checked in test_attribution.py")

    @pytest.mark.parametrize("alias", sorted(OPTION_ALIASES))
    def test_captum_alias_behaves_like_the_canonical_name(self, alias):
        self._registry_only()
        canonical = OPTION_ALIASES[alias]
        base = {k: v for k, v in self.config.options.items() if k != canonical}
        model, x, value = self.net(), make_x(), ALIAS_VALUES[alias]
        results = []
        for name in (alias, canonical):
            try:
                results.append(make_explainer(model, self.config.method, **base, **{name: value})(x, Y))
            except InputError as e:
                assert "bad option" in str(e)
                results.append(None)
        if results[0] is None or results[1] is None:
            assert results[0] is None and results[1] is None, f"{alias}= and {canonical}= must be accepted alike"
        else:
            close(results[0], results[1])
        with pytest.raises(InputError, match="not both"):
            make_explainer(model, self.config.method, **base, **{alias: value, canonical: value})

    def test_integration_rule_reaches_integrated_gradients(self):
        self._registry_only()
        model, x = self.net(), make_x()
        default = self.explainer(model)
        ig = _inner_ig(default)
        if ig is None:
            with pytest.raises(InputError, match="bad option"):
                self.explainer(model, integration="riemann_trapezoid")
            return
        rule = "riemann_middle" if ig.integration == "riemann_trapezoid" else "riemann_trapezoid"
        expl = self.explainer(model, integration=rule)
        assert _inner_ig(expl).integration == rule
        assert not torch.allclose(expl(x, Y), default(x, Y)), "the rule was ignored"


def _generate() -> None:
    for config in CONFIGS:
        name = "TestContract_" + config.name
        globals()[name] = type(name, (_Contract,), {"config": config, "__doc__": f"The contract for {config.name}."})


_generate()


@pytest.mark.filterwarnings("ignore:explanation has zero input-gradient")
@pytest.mark.parametrize("method", ["gradient", "saliency", "integrated_gradients", "lrp_epsilon"])
def test_manipulate_takes_the_output_selector(method):
    """manipulate on a dict-output model with output="logits" is manipulate on the plain model (and, on this
    BatchNorm model, create_graph explanations survive the model-state restore inside each step)."""
    net = make_model()
    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, 1, 8, 8, generator=g, dtype=F64)
    target_map = torch.rand(2, 8, 8, generator=g, dtype=F64)
    opts = dict(explainer_options={"steps": 4} if method == "integrated_gradients" else None, iterations=3, lr=1e-2)
    ref = manipulate(net, method, x, target_map, **opts)
    wrapped = DictOut(net)
    before = snapshot(wrapped)
    with pytest.raises(InputError, match='output="logits"'):
        manipulate(wrapped, method, x, target_map, **opts)
    got = manipulate(wrapped, method, x, target_map, output="logits", **opts)
    close(got.x_adv, ref.x_adv)
    close(got.logits_adv, ref.logits_adv)
    assert_same_state(before, snapshot(wrapped))
    explainer = make_explainer(wrapped, method, output="logits", **(opts["explainer_options"] or {}))
    close(manipulate(wrapped, explainer, x, target_map, iterations=3, lr=1e-2).x_adv, ref.x_adv)  # the explainer's


def test_preserve_model_state_on_plain_callable_and_exception():
    with preserve_model_state(lambda x: x):  # not a module: nothing to do
        pass
    model = make_model().train()
    before = snapshot(model)
    with pytest.raises(KeyError):
        with preserve_model_state(model):
            model.eval()
            model[0].weight.requires_grad_(False)
            model[0].register_forward_hook(lambda *a: None)
            raise KeyError("boom")
    assert_same_state(before, snapshot(model))


def test_table_covers_every_registered_method():
    assert {c.method for c in CONFIGS if c.method is not None and c.name == c.method} == set(METHODS)


GAMMA_METHODS = sorted(m for m, spec in METHODS.items() if "gamma_mode" in spec.defaults)


def test_gamma_methods_declare_their_mode():
    """The γ methods show gamma_mode as a registry default (so `manifex methods` and make_explainer agree)."""
    assert GAMMA_METHODS == ["lrp_epsilon_gamma_box", "lrp_gamma"]
    for m in GAMMA_METHODS:
        assert METHODS[m].defaults["gamma_mode"] == "sign_aware" and "gamma_mode" in METHODS[m].description


@pytest.mark.parametrize("method", GAMMA_METHODS)
def test_gamma_mode_through_explain(method):
    """Both γ modes run through ``explain``: batched = per example, the default is "sign_aware", and the modes
    differ where a γ layer's negative outputs carry relevance (here: the second conv with its ReLU removed;
    behind a ReLU they carry none and the modes agree); a bad mode is an InputError naming the choices."""
    model, x = make_model(), make_x()
    model[4] = nn.Identity()
    maps = {}
    for mode in ("sign_aware", "textbook"):
        maps[mode] = explain(model, x, Y, method=method, gamma_mode=mode)
        assert torch.isfinite(maps[mode]).all()
        close(maps[mode], torch.cat([explain(model, x[i : i + 1], Y[i : i + 1], method=method, gamma_mode=mode)
                                     for i in range(N)]))
    close(explain(model, x, Y, method=method), maps["sign_aware"])
    assert not torch.allclose(maps["sign_aware"], maps["textbook"]), "gamma_mode was ignored"
    with pytest.raises(InputError, match="'sign_aware'.*'textbook'"):
        explain(model, x, Y, method=method, gamma_mode="zennit")
