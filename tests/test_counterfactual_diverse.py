"""Several diverse counterfactuals per input (n_per_input, diversity) and a region mask (issue 20)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import manifex
from manifex.counterfactuals import counterfactual
from manifex.errors import InputError

from test_counterfactual import AffineSigmoid


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    data = manifex.data.load_digits8()
    clf = manifex.models.MLP((1, 8, 8), 10, hidden=(32,))
    opt = torch.optim.Adam(clf.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(clf(data.x[:1000]), data.y[:1000]).backward()
        opt.step()
    clf.zero_grad(set_to_none=True)
    return data, copy.deepcopy(clf).double().eval()


def _spread(z: torch.Tensor, k: int) -> torch.Tensor:
    """Mean pairwise L2 distance within each group of k consecutive rows, (groups,)."""
    v = z.reshape(-1, k, z[0].numel())
    i, j = torch.triu_indices(k, k, 1)
    return (v[:, i] - v[:, j]).norm(dim=-1).mean(1)


@pytest.mark.parametrize("space", ["latent", "pixel"])
def test_diverse_counterfactuals_are_farther_apart_than_independent_runs(digits, space):
    """K = 4 per input with the diversity term against K independent searches (diversity 0) from the same start
    perturbations (same seed): farther apart for every input, in the search variable and in the images."""
    data, clf = digits
    gen = AffineSigmoid().double() if space == "latent" else None
    x = data.x[data.y == 4][:3].double()
    lr = 5e-2 if space == "latent" else 2e-2
    kw = dict(generator=gen, space=space, lr=lr, max_steps=300, n_per_input=4, seed=3, stop_prob=0.9)
    indep = counterfactual(clf, x, 9, diversity=0.0, **kw)
    diverse = counterfactual(clf, x, 9, diversity=1.0, **kw)
    assert len(diverse) == 12 and torch.equal(diverse.group, torch.arange(3).repeat_interleave(4))
    assert diverse.success.all() and indep.success.all()
    var = (lambda r: r.z_cf) if space == "latent" else (lambda r: r.x_cf)
    assert (_spread(var(diverse), 4) > _spread(var(indep), 4)).all()
    assert (_spread(diverse.x_cf, 4) > _spread(indep.x_cf, 4)).all()
    assert torch.equal(diverse.x, x.repeat_interleave(4, 0))


def test_independent_rows_equal_separate_calls(digits):
    """diversity 0: row 0 of each group is the plain search from x, row k the search from its perturbed start; in
    float64 (rows do not interact) each equals a call with batch size 1."""
    data, clf = digits
    x = data.x[data.y == 4][:2].double()
    r = counterfactual(clf, x, 9, space="pixel", lr=2e-2, max_steps=200, n_per_input=3, diversity=0.0, seed=1)
    plain = counterfactual(clf, x, 9, space="pixel", lr=2e-2, max_steps=200)
    assert torch.allclose(r.x_cf[::3], plain.x_cf, atol=1e-10, rtol=0)
    assert torch.equal(r.steps[::3], plain.steps)
    # the other rows started elsewhere: different counterfactuals
    assert (r.x_cf[1::3] - plain.x_cf).abs().amax() > 1e-3


def test_pixel_mask_keeps_pixels_outside_unchanged(digits):
    data, clf = digits
    x = data.x[data.y == 4][:4].double()
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:6, 2:6] = True
    r = counterfactual(clf, x, 9, space="pixel", lr=2e-2, max_steps=400, mask=mask, n_per_input=2, spread=0.2, stop_prob=0.9)
    outside = ~mask.expand_as(r.x_cf)
    assert torch.equal(r.x_cf[outside], r.x[outside])
    assert (r.delta.abs().reshape(len(r), -1).amax(1) > 0).all()  # it did change, inside
    assert r.success.any()


def test_latent_mask_penalty_shrinks_the_change_outside(digits):
    data, clf = digits
    gen = AffineSigmoid().double()
    x = data.x[data.y == 4][:4].double()
    mask = torch.zeros(1, 8, 8, dtype=torch.float64)
    mask[:, 2:6, 2:6] = 1
    free = counterfactual(clf, x, 9, generator=gen, lr=5e-2, max_steps=400)
    held = counterfactual(clf, x, 9, generator=gen, lr=5e-2, max_steps=400, mask=mask, mask_weight=10.0)
    out = lambda r: (r.delta * (1 - mask)).reshape(len(r), -1).norm(dim=1)  # noqa: E731
    assert (out(held) < out(free)).all()


def test_bad_options_are_refused_before_the_search(digits):
    data, clf = digits
    x = data.x[:2].double()
    for kw, msg in [({"n_per_input": 0}, "n_per_input"), ({"n_per_input": 2.0}, "n_per_input"),
                    ({"diversity": -1.0}, "diversity"), ({"spread": float("nan")}, "spread"),
                    ({"mask": torch.zeros(8, 8)}, "zero everywhere"), ({"mask": torch.ones(3, 3)}, "does not broadcast"),
                    ({"mask": torch.full((8, 8), 2.0)}, r"\[0, 1\]"), ({"mask": [[1]]}, "must be a tensor")]:
        with pytest.raises(InputError, match=msg):
            counterfactual(clf, x, 9, space="pixel", **kw)
    # per-input targets are repeated with the K rows
    r = counterfactual(clf, x, [9, 3], space="pixel", lr=2e-2, max_steps=2, n_per_input=2)
    assert r.target.tolist() == [9, 9, 3, 3]
