"""Counterfactual metrics (issue 20): each against a direct computation on a tiny case, in float64."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from manifex.counterfactuals import CounterfactualResult, counterfactual
from manifex.counterfactuals.evaluate import (DEFAULT_L0_TOL, ClassAutoencoders, Judges, evaluate, example_metrics,
                                              frechet_distance, penultimate_features, summarize)
from manifex.errors import InputError


def _result(x, x_cf, target, original, prediction, success=None, seconds=0.5) -> CounterfactualResult:
    n = x.shape[0]
    success = torch.ones(n, dtype=torch.bool) if success is None else success
    return CounterfactualResult(
        x=x, x_cf=x_cf, success=success, steps=torch.ones(n, dtype=torch.long), p_target=torch.full((n,), 0.995),
        already=torch.zeros(n, dtype=torch.bool), target=target, space="pixel", lr=1e-3,
        info={"box": [0.0, 1.0], "seconds": seconds * n, "seconds_per_counterfactual": seconds},
        original=original, prediction=prediction)


def test_l0_sparsity_norms_validity_seconds_against_direct():
    """2 images of 2 channels × 2 × 3: L0 counts pixels whose largest channel change exceeds the tolerance."""
    x = torch.full((2, 2, 2, 3), 0.5, dtype=torch.float64)
    x_cf = x.clone()
    x_cf[0, 0, 0, 0] += 0.1                       # pixel (0, 0) changed in channel 0
    x_cf[0, 1, 0, 0] -= 0.2                       # ... and in channel 1: still one pixel
    x_cf[0, 1, 1, 2] += DEFAULT_L0_TOL * 0.9      # below the tolerance: unchanged for L0, counted by L1/L2/L∞
    x_cf[1, 0, 1, 1] += DEFAULT_L0_TOL * 1.1      # just above it
    x_cf[1, 1, 0, 2] -= 0.3
    r = _result(x, x_cf, torch.tensor([9, 9]), torch.tensor([4, 4]), torch.tensor([9, 3]), seconds=0.25)
    rows = example_metrics(r)
    d = (x_cf - x).reshape(2, -1)
    for i, (l0, valid) in enumerate([(1, 1.0), (2, 0.0)]):
        assert rows[i]["l0"] == l0
        assert rows[i]["sparsity"] == pytest.approx(1 - l0 / 6, abs=1e-15)
        assert rows[i]["l1"] == pytest.approx(float(d[i].abs().sum()), rel=1e-15)
        assert rows[i]["l2"] == pytest.approx(float(d[i].norm()), rel=1e-15)
        assert rows[i]["linf"] == pytest.approx(float(d[i].abs().max()), rel=1e-15)
        assert rows[i]["validity"] == valid
        assert rows[i]["seconds"] == 0.25
    # a stated tolerance of zero counts every moved pixel
    assert [m["l0"] for m in example_metrics(r, l0_tol=0.0)] == [2, 2]
    with pytest.raises(InputError, match="l0_tol"):
        example_metrics(r, l0_tol=-1.0)


def _tiny_data(n_per_class=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3 * n_per_class, 1, 2, 2, generator=g, dtype=torch.float64)
    y = torch.arange(3).repeat_interleave(n_per_class)
    x = (x + y.double()[:, None, None, None]) / 3  # three clusters
    return x, y


def test_ynn_against_brute_force_neighbours():
    """yNN = share of the k nearest training images (Euclidean, brute force) that the classifier labels as the target."""
    x, y = _tiny_data()
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    judges = Judges.fit(x, y, k=4, svm_max=100, classifier=clf)
    q = torch.rand(5, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 1, 0])
    got = judges(q, t)["ynn"]
    pred = clf(x).argmax(1)
    dist = torch.cdist(q.reshape(5, -1), x.reshape(len(x), -1))
    nn_idx = dist.argsort(1)[:, :4]
    want = (pred[nn_idx] == t[:, None]).double().mean(1)
    assert np.allclose(got, want.numpy(), atol=0, rtol=0)
    # the classifier's labels, not the true ones (knn_fraction): they differ for this untrained classifier
    assert not np.array_equal(got, judges(q, t)["knn_fraction"])
    assert clf.training  # the judge put the model in eval mode for the predictions and restored it


class _Affine(nn.Module):
    """A stand-in autoencoder: x ↦ a·x + b."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(torch.tensor(a, dtype=torch.float64)), b

    def forward(self, x):
        return self.a * x + self.b


def test_im1_im2_against_the_formulas():
    """IM1 = ‖x′ − AE_t(x′)‖² / (‖x′ − AE_o(x′)‖² + ε), IM2 = ‖AE_t(x′) − AE(x′)‖² / (‖x′‖₁ + ε)."""
    aes = ClassAutoencoders({0: _Affine(0.9, 0.01), 1: _Affine(1.1, -0.02), 2: _Affine(0.5, 0.2)}, _Affine(0.8, 0.05))
    x_cf = torch.rand(4, 1, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t, o = torch.tensor([1, 1, 2, 0]), torch.tensor([0, 2, 0, 1])
    r = _result(x_cf.clone(), x_cf, t, o, t)
    rows = example_metrics(r, autoencoders=aes)
    for i in range(4):
        ae = lambda c, v: aes.per_class[c].a.item() * v + aes.per_class[c].b  # noqa: E731
        xi = x_cf[i]
        im1 = ((xi - ae(int(t[i]), xi)) ** 2).sum() / (((xi - ae(int(o[i]), xi)) ** 2).sum() + 1e-8)
        im2 = ((ae(int(t[i]), xi) - (0.8 * xi + 0.05)) ** 2).sum() / (xi.abs().sum() + 1e-8)
        assert rows[i]["im1"] == pytest.approx(float(im1), rel=1e-12)
        assert rows[i]["im2"] == pytest.approx(float(im2), rel=1e-12)
    # a class without an autoencoder gives no number (None in the record), not a wrong one
    partial = ClassAutoencoders({1: aes.per_class[1]}, aes.all)
    rows = example_metrics(r, autoencoders=partial)
    assert rows[0]["im1"] is None and rows[0]["im2"] is not None and rows[2]["im2"] is None


def test_frechet_distance_against_scipy_sqrtm():
    """The eigen form equals FID's scipy.linalg.sqrtm form; 0 for identical sets; the mean term alone for a shift."""
    g = np.random.default_rng(0)
    a = g.normal(size=(40, 5))
    b = g.normal(size=(30, 5)) @ g.normal(size=(5, 5)) + 0.7
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    want = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb) - 2 * np.trace(scipy.linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, a + 2.0) == pytest.approx(5 * 4.0, rel=1e-9)
    # fewer samples than dimensions: rank-deficient covariances still give a finite, non-negative number
    assert math.isfinite(frechet_distance(a[:3], b[:2])) and frechet_distance(a[:3], b[:2]) >= 0
    with pytest.raises(InputError, match="n ≥ 2"):
        frechet_distance(a[:1], b)


def test_judges_fid_uses_the_second_judges_penultimate_features():
    x, y = _tiny_data(n_per_class=8)
    torch.manual_seed(0)
    second = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    judges = Judges.fit(x, y, k=3, svm_max=100, second=second)
    x_cf = torch.rand(5, 1, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = torch.tensor([2, 2, 2, 1, 1])
    got = judges.fid(x_cf, t)
    feats = lambda v: second[:3](v).detach()  # noqa: E731 - the input of the last Linear
    second.train()
    assert torch.allclose(penultimate_features(second, x_cf), feats(x_cf), atol=0, rtol=0)
    assert second.training and not second[3]._forward_pre_hooks  # left as found: train mode, no hook
    with pytest.raises(RuntimeError):  # a failing forward: the hook is still removed
        penultimate_features(second, torch.zeros(2, 1, 3, 3, dtype=torch.float64))
    assert second.training and not second[3]._forward_pre_hooks
    with pytest.raises(InputError, match="no nn.Linear"):
        penultimate_features(nn.Sequential(nn.Flatten()), x_cf)
    per = [(3, frechet_distance(feats(x_cf[:3]), feats(x[y == 2]))), (2, frechet_distance(feats(x_cf[3:]), feats(x[y == 1])))]
    assert got["value"] == pytest.approx(sum(k * v for k, v in per) / 5, rel=1e-12)
    assert got["n"] == 5 and got["n_reference"] == 16
    assert judges.fid(x_cf[:1], t[:1]) is None  # one counterfactual: no covariance
    assert Judges.fit(x, y, k=3, svm_max=100).fid(x_cf, t) is None  # no second judge


def test_summary_validity_over_every_searched_example_and_fid(monkeypatch):
    x = torch.zeros(4, 1, 2, 2, dtype=torch.float64)
    x_cf = x + 0.1
    success = torch.tensor([True, True, False, False])
    r = _result(x, x_cf, torch.tensor([1, 1, 1, 1]), torch.tensor([0, 0, 0, 0]), torch.tensor([1, 1, 1, 0]), success=success)
    s = summarize({"pixel": example_metrics(r)}, fid={"pixel": {"value": 1.5, "n": 2, "n_reference": 10}})["pixel"]
    assert s["validity"]["mean"] == 0.75 and s["validity"]["n"] == 4  # not only over the 2 successes
    assert s["fid"]["value"] == 1.5
    for key in ("l0", "sparsity", "l1", "l2", "linf", "seconds"):
        assert key in s and key in s["all"]


def test_counterfactual_returns_classes_and_time_and_evaluate_has_every_key():
    """End to end on a tiny linear model: original/prediction are the classifier's argmax; evaluate's summary has
    every metric key of the issue."""
    x, y = _tiny_data(n_per_class=10)
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    opt = torch.optim.Adam(clf.parameters(), 5e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(clf(x), y).backward()
        opt.step()
    clf.eval()
    src = x[(y == 0) & (clf(x).argmax(1) == 0)][:4]
    r = counterfactual(clf, src, 2, space="pixel", lr=5e-2, max_steps=300, stop_prob=0.9)
    assert torch.equal(r.original, clf(src).argmax(1)) and torch.equal(r.prediction, clf(r.x_cf).argmax(1))
    assert r.info["seconds"] > 0 and r.info["seconds_per_counterfactual"] == pytest.approx(r.info["seconds"] / 4)
    second = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    judges = Judges.fit(x, y, k=3, svm_max=100, second=second, classifier=clf)
    aes = ClassAutoencoders({c: _Affine(0.9, 0.0) for c in range(3)}, _Affine(1.0, 0.0))
    out = evaluate({"pixel": r}, judges=judges, autoencoders=aes)
    s = out["summary"]["pixel"]
    assert r.success.sum() >= 2, "the test needs two successes for the Fréchet distance"
    for key in ("validity", "l0", "l1", "l2", "linf", "sparsity", "ynn", "im1", "im2", "seconds", "fid"):
        assert key in s, key
