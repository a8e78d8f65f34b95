"""Tests of the β-smoothing defence (``manifex.manipulation.defence``): explanations and accuracy across β,
the Hessian curvature diagnostic and the robustness sweep.

The model is a small CNN trained for a few seconds on scikit-learn's 8×8 digits (accuracy ≈ 0.97), the
Hessian reference a tiny float64 softplus MLP, attacks a few iterations long. Everything runs on one thread.
"""
from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from torch import nn

from manifex.attribution import explain
from manifex.data import ImageDataset, load_digits8
from manifex.errors import InputError
from manifex.manipulation import pairs_from_dataset, read_results, research_gamma
from manifex.manipulation.defence import (
    RELU,
    accuracy_across_beta,
    explanations_across_beta,
    hessian_power_iteration,
    hessian_top_eigenvalue,
    plot_beta_curves,
    robustness_sweep,
)
from manifex.models import accuracy

HOOK_ATTRS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
ATTACK = dict(iterations=3, lr=1e-2, gamma=research_gamma(64, 10))


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    return load_digits8()


@pytest.fixture(scope="module")
def cnn(digits) -> nn.Module:
    """conv-ReLU-conv-ReLU-maxpool-fc-ReLU-fc trained 6 epochs on the digits (accuracy ≈ 0.97), in float64, then
    rounded to float32: float32 training gives weights that differ by up to 1.4e-2 (relative) between CPU kernel
    paths (AVX-512, AVX2, MKL's compatible path), float64 training by < 5e-6, so the thresholds below hold for
    nearly the same model on every CPU."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
        ).double()
        x = digits.x.double()
        opt = torch.optim.Adam(model.parameters(), 3e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(6):
            for b in torch.randperm(len(digits), generator=g).split(64):
                loss = nn.functional.cross_entropy(model(x[b]), digits.y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return model.float().eval()


def state_of(model: nn.Module) -> tuple:
    """Everything the defence must leave as found: modes, hooks, requires_grad, parameter values."""
    return (
        [m.training for m in model.modules()],
        [len(getattr(m, a)) for m in model.modules() for a in HOOK_ATTRS],
        [p.requires_grad for p in model.parameters()],
        [p.detach().clone() for p in model.parameters()],
    )


def assert_same_state(model: nn.Module, before: tuple) -> None:
    after = state_of(model)
    assert after[:3] == before[:3]
    assert all(torch.equal(a, b) for a, b in zip(after[3], before[3]))


def mlp(activation: nn.Module, seed: int = 0, d: int = 6, hidden: int = 5, classes: int = 3) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), activation, nn.Linear(hidden, classes)).double().eval()


# --------------------------------------------------------------------------------------------------------
# explanations and accuracy across β


def test_explanations_approach_relu_as_beta_grows(cnn, digits):
    x = digits.x[:16]
    before = state_of(cnn)
    out = explanations_across_beta(cnn, x, None, "gradient", betas=(1, 3, 10, 30, 100))
    assert list(out) == [1.0, 3.0, 10.0, 30.0, 100.0, RELU]
    assert all(e.shape == x.shape and not e.requires_grad for e in out.values())
    relu = out[RELU]
    # None is resolved once on the ReLU model: the ReLU entry is the plain gradient of the predicted class
    torch.testing.assert_close(relu, explain(cnn, x, cnn(x).argmax(1), method="gradient"))
    dist = [float((out[b] - relu).norm() / relu.norm()) for b in (1.0, 3.0, 10.0, 30.0, 100.0)]
    assert all(a > b for a, b in zip(dist, dist[1:])), dist
    assert dist[0] > 0.2 and dist[-1] < 0.05, dist  # they differ, and approach ReLU
    assert_same_state(cnn, before)

    # default βs (the research plot), another method with options, an explicit class; train mode is kept
    cnn.train()
    try:
        before = state_of(cnn)
        ig = explanations_across_beta(cnn, x[:4], 3, "ig", steps=8)
        assert list(ig) == [10.0, 3.0, 1.0, RELU]
        assert not torch.allclose(ig[10.0], ig[1.0])
        assert_same_state(cnn, before)
    finally:
        cnn.eval()
    no_relu = explanations_across_beta(cnn, x[:2], None, betas=(5,), include_relu=False)
    assert list(no_relu) == [5.0]


def test_accuracy_across_beta(cnn, digits):
    before = state_of(cnn)
    acc = accuracy_across_beta(cnn, digits, (30, 3, 1))
    assert list(acc) == [30.0, 3.0, 1.0, RELU]
    assert acc[RELU] == accuracy(cnn, digits) and acc[RELU] > 0.9
    assert abs(acc[30.0] - acc[RELU]) < 0.02  # β = 30 is nearly ReLU
    assert acc[1.0] < acc[RELU] - 0.1  # very smooth models lose accuracy
    assert_same_state(cnn, before)


def test_bad_betas(cnn, digits):
    x = digits.x[:2]
    for bad in ((), (0,), (-1,), (float("nan"),), (3, 3), ("10",), (True,)):
        with pytest.raises(InputError):
            explanations_across_beta(cnn, x, None, betas=bad, include_relu=False)
    with pytest.raises(InputError, match="nn.Module"):
        accuracy_across_beta(lambda t: t, digits, (1,))
    with pytest.raises(InputError, match="ImageDataset"):
        accuracy_across_beta(cnn, digits.x, (1,))


# --------------------------------------------------------------------------------------------------------
# curvature


def test_power_iteration_matches_exact_hessian():
    """Top-|λ| of ∇²ₓ f_c on a float64 softplus MLP against torch.autograd.functional.hessian."""
    model = mlp(nn.Softplus(beta=2.0))
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 0, 1])
    res = hessian_power_iteration(model, x, target, iterations=3000, tol=1e-13)
    assert bool(res.converged.all())
    for i in range(5):
        h = torch.autograd.functional.hessian(lambda xi: model(xi[None])[0, target[i]], x[i])
        ev = torch.linalg.eigvalsh(h)
        top = ev[ev.abs().argmax()]
        assert float(res.values[i]) == pytest.approx(float(top), rel=1e-4)
        v = res.vectors[i]  # a unit eigenvector
        assert float(v.norm()) == pytest.approx(1.0)
        torch.testing.assert_close(h @ v, top * v, atol=1e-4 * float(top.abs()), rtol=0)

    # a ReLU MLP smoothed by beta=2 is the softplus(2) MLP
    relu_model = mlp(nn.ReLU())
    smoothed = hessian_top_eigenvalue(relu_model, x, target, beta=2.0, iterations=3000, tol=1e-13)
    torch.testing.assert_close(smoothed, res.values, rtol=1e-9, atol=0)
    # the default class is the prediction
    torch.testing.assert_close(hessian_top_eigenvalue(model, x, iterations=50),
                               hessian_top_eigenvalue(model, x, model(x).argmax(1), iterations=50))


def test_relu_network_has_zero_hessian(cnn, digits):
    before = state_of(cnn)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning about the missing second derivative
        res = hessian_power_iteration(cnn, digits.x[:6])
    assert torch.equal(res.values, torch.zeros(6)) and bool(res.converged.all())
    x = torch.randn(4, 6, dtype=torch.float64)
    assert torch.equal(hessian_top_eigenvalue(mlp(nn.ReLU()), x, 1), torch.zeros(4, dtype=torch.float64))
    assert torch.equal(hessian_top_eigenvalue(mlp(nn.ReLU()), x, 1, beta=RELU), torch.zeros(4, dtype=torch.float64))
    assert_same_state(cnn, before)


def test_batched_equals_per_example(cnn, digits):
    """In float64: in float32 the batch size changes the kernels' rounding, which 15 unconverged power iterations
    amplify to 3e-7..1e-4 (relative) depending on the CPU's kernel path; in float64 the same leaves < 1e-12."""
    model = copy.deepcopy(cnn).double()
    x = digits.x[20:26].double()
    before = state_of(model)
    batched = hessian_power_iteration(model, x, beta=10.0, iterations=15)
    chunked = hessian_power_iteration(model, x, beta=10.0, iterations=15, batch_size=4)
    single = [hessian_power_iteration(model, x[i:i + 1], beta=10.0, iterations=15) for i in range(6)]
    values = torch.cat([s.values for s in single])
    torch.testing.assert_close(batched.values, values, rtol=1e-9, atol=0)
    torch.testing.assert_close(chunked.values, values, rtol=1e-9, atol=0)
    assert torch.equal(batched.iterations, torch.cat([s.iterations for s in single]))
    assert bool((batched.values.abs() > 0).all())
    assert_same_state(model, before)
    x = x.float()
    with pytest.raises(InputError):
        hessian_top_eigenvalue(cnn, x, beta=0)
    with pytest.raises(InputError, match="dtype"):
        hessian_top_eigenvalue(cnn, x.double())


def test_curvature_grows_with_beta(cnn, digits):
    """softplus_β'' peaks at β/4: sharper models curve more. Medians over 32 digits, β an order apart."""
    x = digits.x[100:132]
    med = [float(hessian_top_eigenvalue(cnn, x, beta=b, iterations=30).abs().median()) for b in (0.5, 3.0, 30.0)]
    assert med[0] * 1.5 < med[1] and med[1] * 1.5 < med[2], med


# --------------------------------------------------------------------------------------------------------
# robustness sweep and plot


def test_robustness_sweep_resumes_per_beta(cnn, digits, tmp_path):
    pairs = pairs_from_dataset(digits, 3, seed=0)
    out = tmp_path / "sweep"
    before = state_of(cnn)
    first = robustness_sweep(cnn, "gradient", pairs, (10,), out, data=digits, figures=False, batch_size=2, **ATTACK)
    assert [r["beta"] for r in first] == [10.0] and first[0]["n_new"] == 3

    records = robustness_sweep(cnn, "gradient", pairs, (10, 1, RELU), out, data=digits, figures=False, batch_size=2, **ATTACK)
    assert_same_state(cnn, before)
    assert [r["beta"] for r in records] == [10.0, 1.0, RELU]
    assert [(r["n_new"], r["n_skipped"], r["n_pairs"]) for r in records] == [(0, 3, 3), (3, 0, 3), (3, 0, 3)]
    for r, name in zip(records, ("beta_10", "beta_1", "beta_inf")):
        assert (out / name / "results.jsonl").is_file() and len(read_results(out / name / "results.jsonl")) == 3
        assert r["out_dir"] == str(out / name)
        for key in ("pcc_manip_target", "pcc_orig_target", "max_dp", "top1_kept_rate", "curvature", "accuracy", "accuracy_cost"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), key
        assert r["ssim_manip_target"] is None  # 8×8 maps are below SSIM's 11×11 window
    assert records[0]["curvature"] > records[1]["curvature"] > 0 and records[2]["curvature"] == 0
    acc = accuracy_across_beta(cnn, digits, (10, 1))
    assert [r["accuracy"] for r in records] == [acc[10.0], acc[1.0], acc[RELU]]
    assert records[1]["accuracy_cost"] == pytest.approx(acc[RELU] - acc[1.0])
    assert records[0]["curvature"] == first[0]["curvature"]
    assert records[2]["attack_beta_growth"] == [10.0, 100.0] and records[0]["attack_beta_growth"] is None
    # the manipulated map is evaluated on the smoothed model: the pair's saved explanation is its gradient
    rec = read_results(out / "beta_1" / "results.jsonl")[0]
    saved = torch.load(out / "beta_1" / rec["files"]["tensors"], weights_only=True)
    smooth = explanations_across_beta(cnn, saved["x_adv"][None], saved["target"][None], betas=(1,), include_relu=False)[1.0]
    torch.testing.assert_close(saved["manipulated_explanation"], smooth[0], rtol=1e-4, atol=1e-6)

    # a re-run computes nothing new and duplicates nothing
    lines = {b: (out / b / "results.jsonl").read_text() for b in ("beta_10", "beta_1", "beta_inf")}
    again = robustness_sweep(cnn, "gradient", pairs, (10, 1, RELU), out, data=digits, figures=False, batch_size=2, **ATTACK)
    assert [r["n_new"] for r in again] == [0, 0, 0]
    assert {b: (out / b / "results.jsonl").read_text() for b in lines} == lines
    assert [r["curvature"] for r in again] == [r["curvature"] for r in records]
    saved_sweep = json.loads((out / "sweep.json").read_text())
    assert [r["beta"] for r in saved_sweep] == [10.0, 1.0, "inf"]
    defence = json.loads((out / "beta_1" / "defence.json").read_text())
    assert len(defence["curvature_values"]) == 3 and defence["curvature"] == records[1]["curvature"]

    with pytest.raises(InputError, match="beta_growth"):
        robustness_sweep(cnn, "gradient", pairs, (10,), out, beta_growth=(10, 100), **ATTACK)
    with pytest.raises(InputError, match="other settings"):
        robustness_sweep(cnn, "gradient", pairs, (10,), out, figures=False, **{**ATTACK, "iterations": 4})
    with pytest.raises(InputError, match="unknown method"):
        robustness_sweep(cnn, "no_such_method", pairs, (10,), out)
    assert_same_state(cnn, before)

    fig = plot_beta_curves(records, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 5000 and len(fig.axes) == 4
    plot_beta_curves(saved_sweep, tmp_path / "from_json.png")  # records read back from sweep.json ("inf")
    assert (tmp_path / "from_json.png").stat().st_size > 5000
    with pytest.raises(InputError):
        plot_beta_curves([], tmp_path / "empty.png")


def test_manipulability_falls_with_beta(cnn, digits, tmp_path):
    """The paper's defence on the digits CNN: under the same budget and attack, smaller β lets the map move
    less (PCC gain 0.06 at β = 0.5, 0.09 at 1, 0.16 at 10, 0.18 for ReLU with β-growth; 24 pairs, L∞ 0.2)."""
    pairs = pairs_from_dataset(digits, 24, seed=0)
    records = robustness_sweep(cnn, "gradient", pairs, (0.5, 1, 10, RELU), tmp_path, figures=False, batch_size=24,
                               iterations=100, lr=1e-2, epsilon=0.2, gamma=research_gamma(64, 10))
    gain = {r["beta"]: r["pcc_gain"] for r in records}
    for r in records:
        assert r["pcc_gain"] == pytest.approx(r["pcc_manip_target"] - r["pcc_orig_target"])
        assert r["top1_kept_rate"] == 1.0
    print("PCC gain per beta:", gain)
    assert gain[0.5] < gain[1.0] < gain[10.0] < gain[RELU]
    assert gain[1.0] < 0.6 * gain[RELU]
