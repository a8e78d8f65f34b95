"""Concepts on edge cases (issue 16): relevance <= 0, input checks like explain's, the model's state, option
validation, the crop pool against the layer's grid, 1×1 grids, the Wilson interval of the component test,
labelled figures, and held-out architectures."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from manifex.attribution.core import TrainModeWarning
from manifex.concepts import (ConceptBasis, class_concepts, concept_prototypes, pooled_activations,
                              prediction_from_components)
from manifex.concepts.components import component_statistics, wilson_interval
from manifex.concepts.prototypes import resolve_pool
from manifex.concepts.report import concept_figure, summarize
from manifex.data import load_digits8
from manifex.errors import InputError
from _tiny_models import tiny_resnet


@pytest.fixture(scope="module")
def digits():
    d = load_digits8()
    return d.x[d.y < 4][:120]


# ------------------------------------------------------------------------------------------------ relevance <= 0


class _SignedHead(nn.Module):
    """Layer "act" = the (non-negative) input itself, 2 channels; logits from the channel means m0, m1:
    class 0: 1 + m0 (relevance x0 ≥ 0, zero where x0 = 0), class 1: 1.5 − m1 (relevance −x1 ≤ 0 everywhere),
    class 2: m1 − 0.5 (relevance x1 ≥ 0). Gradient × activation is exactly these products (over h·w)."""

    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()
        self.fc = nn.Linear(2, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0], [0.0, 1.0]]))
            self.fc.bias.copy_(torch.tensor([1.0, 1.5, -0.5]))

    def forward(self, x):
        return self.fc(self.act(x).mean((2, 3)))


def _signed_data():
    """4 images of each kind: x0 ≡ 0, m1 = 0.8 → class 0 with relevance 0 everywhere (excluded); x0 = 0.5,
    m1 = 0.8 → class 0, relevance > 0; x0 ≡ 0, m1 = 0.2 → class 1 (relevance ≤ 0 everywhere); m1 = 3 → class 2
    (each up to +10% noise)."""
    g = torch.Generator().manual_seed(0)
    def kind(c0, c1):
        x = torch.zeros(4, 2, 4, 4)
        x[:, 0] = c0 * (1 + 0.1 * torch.rand(4, 4, 4, generator=g)) if c0 else 0.0
        x[:, 1] = c1 * (1 + 0.1 * torch.rand(4, 4, 4, generator=g))
        return x
    return torch.cat([kind(0, 0.8), kind(0.5, 0.8), kind(0, 0.2), kind(0, 3.0)])


def test_zero_relevance_class_is_skipped_and_images_excluded():
    model, x = _SignedHead().eval(), _signed_data()
    preds = model(x).argmax(1)
    assert preds.tolist() == [0] * 8 + [1] * 4 + [2] * 4  # the construction above
    with pytest.warns(RuntimeWarning, match=r"class 1: the relevance .* <= 0 at every position on all 4 of its images"):
        basis = class_concepts(model, x, "act", n_components=1, relevance="gradient_x_activation")
    assert basis.classes == [0, 2] and 1 in basis.skipped and "relevance is <= 0" in basis.skipped[1]
    assert basis.n_images == [4, 4] and basis.n_excluded == [4, 0]
    assert basis.image_indices[0].tolist() == [4, 5, 6, 7]  # the images with x0 ≡ 0 are left out
    assert bool((basis.vectors.flatten(1).norm(dim=1) > 0).all())
    # the skipped class never enters the component test
    with pytest.warns(RuntimeWarning, match="1×1"):  # a 4×4 grid pooled by 4: also checked below
        test = prediction_from_components(model, x, basis, layout="canvas", pool=4, n_control=2)
    assert test.classes == [0, 2] and test.p.shape == (2,)
    # every class with relevance <= 0 everywhere: one clear error
    with pytest.raises(InputError, match=r"relevance is <= 0 at every position on every image of the classes \[1\]"), \
            pytest.warns(RuntimeWarning):
        class_concepts(model, x, "act", classes=[1], n_components=1, relevance="gradient_x_activation")


def test_prototypes_refuse_all_zero_concepts():
    model, x = _SignedHead().eval(), _signed_data()
    basis = ConceptBasis(vectors=torch.zeros(1, 1, 2), classes=[1], n_images=[4], recon_error=torch.zeros(1),
                         relative_error=torch.zeros(1), layer="act")
    with pytest.raises(InputError, match=r"classes \[1\] are all zero"):
        concept_prototypes(model, x, basis, top_k=2)


# ------------------------------------------------------------------------------------------------ inputs like explain


class _DictNet(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return {"features": x.mean((1, 2, 3)), "logits": self.inner(x)}


def test_class_concepts_input_checks(digits):
    model = tiny_resnet()
    kw = dict(n_components=2, images_per_class=3, relevance_options={"n_samples": 1})
    with pytest.raises(InputError, match="dtype torch.float64 .* model.to"):
        class_concepts(model, digits.double(), "blocks.1", **kw)
    with pytest.raises(InputError, match="dtype torch.float16"):
        class_concepts(model, digits.half(), "blocks.1", **kw)
    with pytest.raises(InputError, match="dtype torch.float32 but the model's parameters are .*float64"):
        class_concepts(copy.deepcopy(model).double(), digits, "blocks.1", **kw)
    with pytest.raises(InputError, match=r"\(N, C, H, W\).*unsqueeze\(1\)"):
        class_concepts(model, digits[:, 0], "blocks.1", **kw)
    with pytest.raises(InputError, match=r"shape \(8, 3, 8, 8\)"):
        class_concepts(model, digits.expand(-1, 3, -1, -1).contiguous(), "blocks.1", **kw)
    fixed = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 4)).eval()
    with pytest.raises(InputError, match=r"shape \(8, 1, 10, 10\)"):
        class_concepts(fixed, F.pad(digits, (1, 1, 1, 1)), "1", **kw)


def test_class_concepts_dict_output(digits):
    model = tiny_resnet()
    kw = dict(n_components=2, images_per_class=4, relevance_options={"n_samples": 2})
    wrapped = _DictNet(model).eval()
    with pytest.raises(InputError, match='output="logits"'):
        class_concepts(wrapped, digits, "inner.blocks.1", **kw)
    got = class_concepts(wrapped, digits, "inner.blocks.1", output="logits", **kw)
    ref = class_concepts(model, digits, "blocks.1", **kw)
    assert got.classes == ref.classes and got.n_images == ref.n_images
    assert torch.equal(got.vectors, ref.vectors)  # the same operations in the same order: bit for bit
    assert not wrapped._forward_hooks  # the selection hook is gone
    test = prediction_from_components(wrapped, digits, got, exclude_target=True, n_control=2, output="logits")
    assert test.p.shape == (len(got.classes),)


# ------------------------------------------------------------------------------------------------ model state


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()],
            [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()])


def _assert_same_state(model, before):
    after = _state(model)
    assert after[0].keys() == before[0].keys()
    for k in before[0]:
        assert torch.equal(after[0][k], before[0][k]), k
    assert after[1:] == before[1:]


def test_train_mode_model_state_is_left_as_found(digits):
    model = copy.deepcopy(tiny_resnet()).train()
    model.stem[0].weight.requires_grad_(False)  # a mixed requires_grad state, restored as found
    before = _state(model)
    with pytest.warns(TrainModeWarning):
        class_concepts(model, digits, "blocks.1", n_components=2, images_per_class=4, relevance_options={"n_samples": 2})
    _assert_same_state(model, before)
    # also when the call fails after the model has run (n_components is checked against the layer's channels)
    with pytest.raises(InputError, match="exceeds the 12 channels"):
        class_concepts(model, digits, "blocks.1", n_components=13)
    _assert_same_state(model, before)
    pooled_activations(model, digits, "blocks.1")
    _assert_same_state(model, before)


# ------------------------------------------------------------------------------------------------ options


@pytest.mark.parametrize("opts, message", [
    ({"n_samples": -3}, r"n_samples'\] must be an int >= 0"),
    ({"n_samples": 2.5}, r"n_samples'\] must be an int"),
    ({"steps": 0}, r"steps'\] must be a positive int"),
    ({"relu": "yes"}, r"relu'\] must be True or False"),
    ({"sigma": -1.0}, r"sigma'\] must be 'auto' or a number >= 0"),
    ({"baseline": "mean"}, r"baseline'\] must be 'auto', a number or a tensor"),
    ({"baseline": float("nan")}, r"baseline'\] must be finite"),
    ({"noise": torch.zeros(3, 1, 4, 4)}, r"noise'\] has shape \(3, 1, 4, 4\); it must be \(n_samples, 1, 8, 8\)"),
    ({"samples": 3}, r"unknown relevance_options \['samples'\]"),
])
def test_relevance_options_refused_before_work(digits, opts, message):
    model = tiny_resnet()
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(InputError, match=message):
            class_concepts(model, digits, "blocks.1", relevance_options=opts)
    finally:
        handle.remove()
    assert not calls  # refused before the model ran


# ------------------------------------------------------------------------------------------------ pool and grid


def test_resolve_pool_and_pool_larger_than_grid(digits):
    assert resolve_pool("auto", (8, 8)) == 4 and resolve_pool("auto", (2, 2)) == 1 and resolve_pool("auto", (4, 4)) == 2
    assert resolve_pool("auto", (1, 1)) == 1 and resolve_pool("auto", ()) == 1 and resolve_pool(2, (2, 2)) == 2
    with pytest.raises(InputError, match=r"pool 4 is larger than the 2×2 grid of layer 'blocks.1'.*'auto' picks 1"):
        resolve_pool(4, (2, 2), "layer 'blocks.1'")
    model = tiny_resnet()  # blocks.1 of the 8×8 SmallResNet: a 4×4 grid
    with pytest.raises(InputError, match="pool 8 is larger than the 4×4 grid"):
        pooled_activations(model, digits, "blocks.1", pool=8)
    assert pooled_activations(model, digits, "blocks.1", pool="auto").shape[2:] == (2, 2)
    basis = class_concepts(model, digits, "blocks.1", n_components=2, images_per_class=4, relevance="none")
    with pytest.raises(InputError, match="pool 8 is larger"):
        concept_prototypes(model, digits, basis, pool=8)


def test_whole_image_crops_warn(digits):
    """head.1 follows global pooling: a 1×1 'grid', so every crop is the whole image."""
    model = tiny_resnet()
    basis = class_concepts(model, digits, "head.1", n_components=2, images_per_class=4, relevance="none")
    with pytest.warns(RuntimeWarning, match="every crop is the whole image"):
        test = prediction_from_components(model, digits, basis, n_control=2)
    assert test.whole_image_crops and test.crop_size == (8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a real grid: no warning
        assert not prediction_from_components(model, digits, basis_blocks(model, digits), n_control=2).whole_image_crops
    rec = {"class": 0, "skipped": False, "grid": [1, 1], "relative_error": 0.1, "recon_error": 0.1,
           **{p: {"p": [0.5], "hit": [True], "control_p": [0.1], "control_hit": [False]} for p in ("include", "exclude")}}
    assert summarize([rec])["whole_image_crops"] and not summarize([{**rec, "grid": [2, 2]}])["whole_image_crops"]


def basis_blocks(model, digits):
    return class_concepts(model, digits, "blocks.1", n_components=2, images_per_class=4, relevance="none")


# ------------------------------------------------------------------------------------------------ statistics


def test_wilson_interval():
    """Against the closed form worked by hand for 6/10 (z = 1.96: centre 0.57226, half-width 0.25956) and
    scipy's binomtest where installed; the interval stays in [0, 1] at k = 0 and k = n."""
    lo, hi = wilson_interval(6, 10)
    assert abs(lo - 0.3127) < 1e-4 and abs(hi - 0.8318) < 1e-4
    assert wilson_interval(0, 10)[0] == 0.0 and 0 < wilson_interval(0, 10)[1] < 0.31
    assert wilson_interval(10, 10)[1] == 1.0 and 0.69 < wilson_interval(10, 10)[0] < 1
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    stats = pytest.importorskip("scipy.stats")
    for k, n in ((0, 5), (3, 7), (11, 50), (24, 200), (50, 50)):
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert abs(wilson_interval(k, n)[0] - ci.low) < 1e-9 and abs(wilson_interval(k, n)[1] - ci.high) < 1e-9
    s = component_statistics(torch.tensor([0.9, 0.2, 0.6]), torch.tensor([True, False, True]))
    assert (s["n"], s["argmax_count"]) == (3, 2) and (s["argmax_ci_low"], s["argmax_ci_high"]) == wilson_interval(2, 3)


def test_summary_counts_all_strips_and_top1():
    def rec(c, hits):
        return {"class": c, "skipped": False, "relative_error": 0.2, "recon_error": 1.0, "n_excluded": c,
                **{p: {"p": [0.6 if h else 0.1 for h in hits], "hit": hits, "control_p": [0.1, 0.1],
                       "control_hit": [False, True]} for p in ("include", "exclude")}}
    s = summarize([rec(0, [True, False, True]), rec(1, [False, True, True]),
                   {"class": 2, "skipped": True, "reason": "its relevance is <= 0 at every position on all 3 of its images"}])
    assert (s["include"]["concepts"]["argmax_count"], s["include"]["concepts"]["n"]) == (4, 6)
    assert (s["include"]["concepts_top1"]["argmax_count"], s["include"]["concepts_top1"]["n"]) == (1, 2)
    assert (s["include"]["control"]["argmax_count"], s["include"]["control"]["n"]) == (2, 4)
    assert s["skipped"] == [2] and "relevance" in s["skipped_reasons"]["2"] and s["excluded_images"] == {"1": 1}


def test_concept_figure_is_labelled():
    k = 3
    crops = {p: torch.rand(k, 4, 1, 4, 4) for p in ("include", "exclude")}
    strips = {p: torch.rand(1, 4 * k, 4) for p in ("include", "exclude")}
    fig = concept_figure(crops, strips, label="seven", p={"include": 0.61, "exclude": 0.2})
    assert "class seven" in fig._suptitle.get_text() and fig._suptitle.get_fontsize() >= 12
    axes = fig.get_axes()
    assert [t.get_text() for t in axes[0].get_yticklabels()] == ["concept 1", "concept 2", "concept 3"]
    assert "predicted as seven" in axes[1].get_title() and "p(seven) = 0.61" in axes[2].get_title()
    assert min(t.get_fontsize() for ax in axes for t in [ax.title, *ax.get_yticklabels()]) >= 10
    assert fig.get_size_inches()[0] * fig.dpi >= 1200  # readable when shown at a 1,280-px page width


# ------------------------------------------------------------------------------------------------ architectures


class _FuncBlock(nn.Module):
    def __init__(self, cin, cout, residual=False):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.residual = residual

    def forward(self, x):
        h = F.relu(self.conv1(x))
        h = self.conv2(h)
        return F.relu(h + x) if self.residual else F.relu(h)


class _Net(nn.Module):
    def __init__(self, body, head, as_dict=False):
        super().__init__()
        self.body, self.head, self.as_dict = body, head, as_dict

    def forward(self, x):
        out = self.head(self.body(x))
        return {"logits": out, "aux": out.detach().sum(1)} if self.as_dict else out


def _head(c, softmax=False):
    layers = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 3)]
    return nn.Sequential(*layers, nn.Softmax(dim=1)) if softmax else nn.Sequential(*layers)


def _arch(name):
    torch.manual_seed(0)
    conv = lambda a, b: nn.Conv2d(a, b, 3, padding=1)  # noqa: E731
    if name == "tanh":
        return _Net(nn.Sequential(conv(1, 6), nn.Tanh(), conv(6, 6), nn.ReLU()), _head(6)), "body.3", None
    if name == "sigmoid":
        return _Net(nn.Sequential(conv(1, 6), nn.Sigmoid(), conv(6, 6), nn.Sigmoid()), _head(6)), "body.3", None
    if name == "avgpool":
        return _Net(nn.Sequential(conv(1, 6), nn.ReLU(), nn.AvgPool2d(2), conv(6, 6), nn.ReLU()), _head(6)), "body.2", None
    if name == "functional_relu":
        return _Net(nn.Sequential(_FuncBlock(1, 6), _FuncBlock(6, 6)), _head(6)), "body.0", None
    if name == "residual":
        return _Net(nn.Sequential(_FuncBlock(1, 6), _FuncBlock(6, 6, residual=True)), _head(6)), "body.1", None
    if name == "elu_leaky":
        return _Net(nn.Sequential(conv(1, 6), nn.ELU(), conv(6, 6), nn.ReLU(), conv(6, 6), nn.LeakyReLU(0.1)), _head(6)), "body.3", None
    if name == "batchnorm_train":
        net = _Net(nn.Sequential(conv(1, 6), nn.BatchNorm2d(6), nn.ReLU(), conv(6, 6), nn.ReLU()), _head(6))
        return net.train(), "body.2", None
    if name == "softmax_head":
        return _Net(nn.Sequential(conv(1, 6), nn.ReLU(), conv(6, 6), nn.ReLU()), _head(6, softmax=True)), "body.1", None
    if name == "dict_output":
        return _Net(nn.Sequential(conv(1, 6), nn.ReLU(), conv(6, 6), nn.ReLU()), _head(6), as_dict=True), "body.1", "logits"
    raise AssertionError(name)


ARCHS = ["tanh", "sigmoid", "avgpool", "functional_relu", "residual", "elu_leaky", "batchnorm_train", "softmax_head",
         "dict_output"]


@pytest.mark.parametrize("name", ARCHS)
def test_held_out_architectures(digits, name):
    model, layer, output = _arch(name)
    model = model if name == "batchnorm_train" else model.eval()
    before = _state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainModeWarning)
        warnings.simplefilter("ignore", RuntimeWarning)  # a random net may leave a class without predicted images
        basis = class_concepts(model, digits, layer, n_components=2, images_per_class=5,
                               relevance_options={"n_samples": 2}, output=output)
        test = prediction_from_components(model, digits, basis, n_control=2, output=output)
    assert bool(torch.isfinite(basis.vectors).all()) and bool((basis.vectors >= 0).all()) and basis.classes
    assert bool((basis.relative_error < 1).all())
    assert test.p.shape == (len(basis.classes),) and bool(((test.p >= 0) & (test.p <= 1)).all())
    _assert_same_state(model, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_class_concepts_cuda_model_cpu_data(digits):
    """CPU images, CUDA model: every batch is moved to the model's device; same classes and image picks as on the
    CPU (float64 on both, so the concepts agree to far below float32 round-off; no noise tunnel, whose seeded
    draws differ between CPU and CUDA generators)."""
    cpu = copy.deepcopy(tiny_resnet()).double()
    gpu = copy.deepcopy(cpu).cuda()
    kw = dict(n_components=2, images_per_class=4, relevance_options={"n_samples": 0})
    ref = class_concepts(cpu, digits.double(), "blocks.1", **kw)
    got = class_concepts(gpu, digits.double(), "blocks.1", **kw)
    assert got.classes == ref.classes and all(torch.equal(a, b) for a, b in zip(got.image_indices, ref.image_indices))
    assert got.vectors.is_cuda and bool(torch.isfinite(got.vectors).all())
    torch.testing.assert_close(got.vectors.cpu(), ref.vectors, rtol=1e-6, atol=1e-8)
