"""Diffeomorphic counterfactuals: the batched search equals the batch-1 research loop; bad input; evaluation."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import manifex
from manifex.counterfactuals import CounterfactualResult, counterfactual
from manifex.errors import InputError, ModelError
from manifex.models.generators import ApproximateGeneratorWarning


class AffineSigmoid(nn.Module):
    """An exact generator on 8×8 images: decode(z) = (sigmoid(A z + b) − ε) / (1 − 2ε), with its closed-form inverse."""

    def __init__(self, seed: int = 1, eps: float = 0.05, split: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(torch.eye(64) + 0.1 * torch.randn(64, 64, generator=g))
        self.b = nn.Parameter(0.1 * torch.randn(64, generator=g))
        self.eps, self.split = eps, split
        self.exact = True

    def decode(self, z):
        if self.split:  # a multi-scale latent: two tensors of different shapes
            z = torch.cat([z[0].reshape(z[0].shape[0], -1), z[1].reshape(z[1].shape[0], -1)], 1)
        return ((torch.sigmoid(z @ self.A.T + self.b) - self.eps) / (1 - 2 * self.eps)).reshape(-1, 1, 8, 8)

    def encode(self, x):
        u = x.reshape(x.shape[0], -1) * (1 - 2 * self.eps) + self.eps
        z = torch.linalg.solve(self.A, (torch.logit(u) - self.b).T).T
        return [z[:, :16].reshape(-1, 1, 4, 4), z[:, 16:]] if self.split else z


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
    return data, clf.eval()


def research_loop(clf, x1, target, lr, max_steps, stop_prob=0.99, gen=None):
    """The seed's batch-1 loop (torch.optim.Adam, clip via .data, stop test before the step) + the final test."""
    if gen is not None:
        z = gen.encode(x1)
        params = [p.detach().requires_grad_(True) for p in (z if isinstance(z, list) else [z])]
    else:
        params = [x1.clone().requires_grad_(True)]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=0.0)
    t = torch.tensor([target])
    for step in range(max_steps + 1):
        opt.zero_grad()
        if gen is not None:
            xp = gen.decode(params if len(params) > 1 else params[0])
        else:
            xp = params[0]
        xp.data = torch.clip(xp.data, 0.0, 1.0)
        pred = clf(xp)
        p = torch.softmax(pred, 1)[0, target]
        if p > stop_prob or step == max_steps:
            return xp.detach(), step, bool(p > stop_prob)
        F.cross_entropy(pred, t).backward()
        opt.step()


@pytest.mark.parametrize("space,split", [("latent", False), ("latent", True), ("pixel", False)])
def test_batched_equals_batch1_research_loop(digits, space, split):
    """In float64: in float32 the batch size changes the matmul kernels' rounding (~1e-7), which ~60 Adam steps
    amplify to 3e-6..6e-6 in x_cf depending on the CPU's kernel path (AVX-512, AVX2, MKL's compatible path), too
    near any tolerance; the same amplification of float64 round-off (1.1e-16) leaves 3e-16..7e-15 (measured on those
    three paths), so 1e-10 is a bound with a margin of 10⁴."""
    import copy

    data, clf = digits
    clf = copy.deepcopy(clf).double()
    gen = AffineSigmoid(split=split).double() if space == "latent" else None
    x = data.x[data.y == 4][:12].double()
    lr, steps = (5e-2, 300) if space == "latent" else (2e-2, 300)
    # batch_size 5 makes chunks of 5, 5, 2; rows stop at different steps inside each chunk
    r = counterfactual(clf, x, 9, generator=gen, space=space, lr=lr, max_steps=steps, batch_size=5)
    assert len(set(r.steps.tolist())) > 3, "rows must stop at different steps for the test to mean something"
    for i in range(len(x)):
        xr, s, ok = research_loop(clf, x[i : i + 1], 9, lr, steps, gen=gen)
        assert int(r.steps[i]) == s and bool(r.success[i]) == ok
        assert torch.allclose(r.x_cf[i : i + 1], xr, atol=1e-10, rtol=0)
    assert r.success.all() and (r.p_target > 0.99).all()
    assert (clf(r.x_cf).argmax(1) == 9).all()
    if space == "latent":
        assert r.recon_error.max() < 1e-4
        zc = r.z_cf if isinstance(r.z_cf, list) else [r.z_cf]
        assert all(p.shape[0] == len(x) for p in zc)
        assert torch.allclose(gen.decode(r.z_cf).clamp(0, 1), r.x_cf, atol=1e-6)
    else:
        assert r.z_cf is None and r.x_recon is None
    assert torch.equal(r.delta, r.x_cf - x)


def test_batched_equals_batch1_through_a_multiscale_image_flow_float64(digits):
    """The zoo's Glow-style flow (normflows layers, a list of latents per level): equal to 1e-10 in float64.

    (In float32 a random-init flow is ill-conditioned for this comparison: Adam's first steps are ≈ lr·sign(g), so
    latent coordinates whose gradient is at round-off level move ±lr in either run; see the benchmark's docstring.)"""
    import copy

    from manifex.models.flows import ImageFlow

    data, clf = digits
    torch.manual_seed(0)
    flow = ImageFlow((1, 8, 8), levels=2, blocks=1, hidden=8)
    flow.initialize(data.x[:64])
    flow = flow.double().eval()
    c64 = copy.deepcopy(clf).double()
    x = data.x[data.y == 4][:3].double()
    r = counterfactual(c64, x, 9, generator=flow, lr=5e-2, max_steps=40, stop_prob=0.9, batch_size=3)
    assert isinstance(r.z_cf, list) and len(r.z_cf) == 2
    for i in range(3):
        xr, s, ok = research_loop(c64, x[i : i + 1], 9, 5e-2, 40, stop_prob=0.9, gen=flow)
        assert int(r.steps[i]) == s and bool(r.success[i]) == ok
        assert torch.allclose(r.x_cf[i : i + 1], xr, atol=1e-10, rtol=0)


def test_targets_int_tensor_list_agree_and_per_example_targets(digits):
    data, clf = digits
    x = data.x[data.y == 4][:4]
    gen = AffineSigmoid()
    a = counterfactual(clf, x, 9, generator=gen, max_steps=200, lr=5e-2)
    b = counterfactual(clf, x, torch.tensor([9] * 4), generator=gen, max_steps=200, lr=5e-2)
    c = counterfactual(clf, x, [9, 9, 9, 9], generator=gen, max_steps=200, lr=5e-2)
    assert torch.equal(a.x_cf, b.x_cf) and torch.equal(a.x_cf, c.x_cf)
    mixed = counterfactual(clf, x, [9, 7, 9, 1], generator=gen, max_steps=300, lr=5e-2)
    assert mixed.success.all()
    assert clf(mixed.x_cf).argmax(1).tolist() == [9, 7, 9, 1]
    assert torch.allclose(mixed.x_cf[[0, 2]], a.x_cf[[0, 2]], atol=1e-5, rtol=0)  # rows do not interact


def test_default_lr_follows_generator_kind(digits):
    data, clf = digits
    x = data.x[:2]
    vae = manifex.models.VAE((1, 8, 8), latent_dim=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert counterfactual(clf, x, 3, generator=vae, max_steps=1).lr == 5e-3
    assert counterfactual(clf, x, 3, space="pixel", max_steps=1).lr == 5e-4
    assert manifex.counterfactuals.default_lr("flow") == 5e-2
    # a generator that declares its own lr (the zoo's image flow, from a measured sweep) gets it
    flow = manifex.models.flows.ImageFlow((1, 8, 8), levels=2, blocks=1, hidden=4).eval()
    assert manifex.counterfactuals.default_lr("flow", flow) == flow.counterfactual_lr == 1e-2
    x8 = data.x[:2].clamp(0.02, 0.98)
    assert counterfactual(clf, x8, 3, generator=flow, max_steps=1).lr == 1e-2
    assert counterfactual(clf, x8, 3, generator=flow, max_steps=1, lr=5e-2).lr == 5e-2


def test_vae_warns_approximate_and_starts_from_reconstruction(digits):
    data, clf = digits
    torch.manual_seed(0)
    vae = manifex.models.VAE((1, 8, 8), latent_dim=4).eval()
    x = data.x[data.y == 4][:3]
    with pytest.warns(ApproximateGeneratorWarning, match="approximate"):
        r = counterfactual(clf, x, 9, generator=vae, max_steps=5, record_path=3)
    assert torch.allclose(r.x_recon, vae.decode(vae.encode(x)))
    assert torch.allclose(r.recon_error, (r.x_recon - x).flatten(1).abs().amax(1))
    # the first path frame is the clipped reconstruction, the last is x_cf
    assert torch.allclose(r.path[:, 0], r.x_recon.clamp(0, 1))
    assert torch.equal(r.path[:, -1], r.x_cf)
    assert (r.path_steps[:, 0] == 0).all() and torch.equal(r.path_steps[:, -1], r.steps.cpu())


def test_path_frames_are_on_the_trajectory(digits):
    # float64: a batch of 3 against a batch of 1 after 16 Adam steps; in float32 they differ by 5e-7..1.3e-6 (by CPU
    # kernel path), the size of the tolerance; in float64 by ~1e-15
    import copy

    data, clf = digits
    clf = copy.deepcopy(clf).double()
    gen = AffineSigmoid().double()
    x = data.x[data.y == 4][:3].double()
    r = counterfactual(clf, x, 9, generator=gen, lr=5e-2, max_steps=300, record_path=4)
    assert r.path.shape == (3, 4, 1, 8, 8)
    for i in range(3):
        s = r.path_steps[i].tolist()
        assert s == sorted(s) and s[0] == 0 and s[-1] == int(r.steps[i])
        # frame at step s equals the state of a search stopped after s steps
        mid = counterfactual(clf, x[i : i + 1], 9, generator=gen, lr=5e-2, max_steps=max(s[1], 1), stop_prob=0.999999)
        assert torch.allclose(mid.x_cf[0], r.path[i, 1], atol=1e-10, rtol=0)


def test_path_of_a_row_that_stops_early_keeps_its_frames(digits):
    """A row that stops early keeps K distinct frames although another row of its batch runs much longer."""
    data, _ = digits
    x = data.x[data.y == 4][:2] * 0.5
    total = x.flatten(1).sum(1)
    stop = torch.stack([total[0] + 20.0, torch.tensor(1e9)])  # row 0 stops after a few dozen steps, row 1 never
    r = counterfactual(None, x, None, space="pixel", lr=1e-2, max_steps=400, objective=lambda v: v.flatten(1).sum(1),
                       stop_value=stop, record_path=6)
    assert bool(r.success[0]) and 12 <= int(r.steps[0]) < 400 and int(r.steps[1]) == 400
    for i in range(2):
        s = r.path_steps[i].tolist()
        assert s[0] == 0 and s[-1] == int(r.steps[i]) and all(a < b for a, b in zip(s, s[1:])), s
        assert torch.equal(r.path[i, -1], r.x_cf[i])


def test_regression_objective_with_per_row_direction():
    # float64: the batch of 6 is compared with a batch of 1 after 25 Adam steps (float32 gap 0..7e-8 by CPU kernel path,
    # within 14× of atol 1e-6, with exact step counts; float64 leaves 1e-16)
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1), nn.Sigmoid())
    with torch.no_grad():
        f[0].weight.mul_(3)
        f[2].weight.copy_(3 * torch.sign(f[2].weight))
    f.double()
    x = torch.randn(6, 3).double()
    with torch.no_grad():
        start = f(x)[:, 0]
    direction = ["max" if v < 0.5 else "min" for v in start.tolist()]
    stop = torch.tensor([0.9 if d == "max" else 0.1 for d in direction])
    r = counterfactual(f, x, objective="output", stop_value=stop, direction=direction, space="pixel", box=None,
                       lr=3e-2, max_steps=1000)
    assert r.success.all()
    v = f(r.x_cf)[:, 0]
    assert torch.allclose(v, r.p_target)
    assert all((vi > 0.9) if d == "max" else (vi < 0.1) for vi, d in zip(v.tolist(), direction))
    one = counterfactual(f, x[:1], objective=lambda t: f(t)[:, 0], stop_value=stop[:1], direction=direction[0],
                         space="pixel", box=None, lr=3e-2, max_steps=1000)
    assert torch.allclose(one.x_cf, r.x_cf[:1], atol=1e-10, rtol=0) and one.steps[0] == r.steps[0]


def test_model_state_preserved_also_on_error(digits):
    data, clf = digits
    gen = AffineSigmoid()
    clf.zero_grad(set_to_none=True)  # the research loop of other tests leaves gradients on the weights; we must not
    clf.train()
    clf[1].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    counterfactual(clf, data.x[:2], 9, generator=gen, lr=5e-2, max_steps=20)
    assert clf.training and gen.training
    assert not clf[1].weight.requires_grad and clf[3].weight.requires_grad
    assert all(p.grad is None for p in list(clf.parameters()) + list(gen.parameters()))
    assert all(torch.equal(v, clf.state_dict()[k]) for k, v in before.items())
    with pytest.raises(InputError):
        counterfactual(clf, data.x[:2], 10, generator=gen)
    assert clf.training and not clf[1].weight.requires_grad
    clf[1].weight.requires_grad_(True)
    clf.eval()


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_options(digits):
    data, clf = digits
    x = data.x[:2]
    for kwargs, match in [
        (dict(lr=0.0), "lr"), (dict(lr=-1e-3), "lr"), (dict(max_steps=0), "max_steps"),
        (dict(stop_prob=1.0), "stop_prob"), (dict(stop_prob=0.0), "stop_prob"), (dict(stop_prob=1.5), "stop_prob"),
        (dict(space="z"), "space"), (dict(batch_size=0), "batch_size"), (dict(record_path=1), "record_path"),
    ]:
        with pytest.raises(InputError, match=match):
            counterfactual(clf, x, 9, space=kwargs.pop("space", "pixel"), **kwargs)
    with pytest.raises(InputError, match="generator"):
        counterfactual(clf, x, 9, space="latent")


def test_x_outside_box_and_nonfinite(digits):
    data, clf = digits
    with pytest.raises(InputError, match="outside the box"):
        counterfactual(clf, data.x[:2] * 2, 9, space="pixel")
    with pytest.raises(InputError, match="outside the box"):
        counterfactual(clf, data.x[:2] - 0.5, 9, space="pixel")
    bad = data.x[:2].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        counterfactual(clf, bad, 9, space="pixel")


def test_target_out_of_range_or_malformed(digits):
    data, clf = digits
    for target in (10, -1, [9, 11]):
        with pytest.raises(InputError, match="target"):
            counterfactual(clf, data.x[:2], target, space="pixel")
    with pytest.raises(InputError, match="shape"):
        counterfactual(clf, data.x[:2], torch.tensor([1, 2, 3]), space="pixel")
    with pytest.raises(InputError, match="integer"):
        counterfactual(clf, data.x[:2], torch.tensor([1.0, 2.0]), space="pixel")


def test_target_already_predicted_takes_zero_steps_and_is_flagged(digits):
    data, clf = digits
    x = torch.cat([data.x[data.y == 9][:2], data.x[data.y == 4][:1]])
    with pytest.warns(RuntimeWarning, match="already"):
        r = counterfactual(clf, x, 9, space="pixel", max_steps=400, lr=5e-3)
    assert r.already.tolist() == [True, True, False]
    assert r.steps[:2].tolist() == [0, 0] and r.steps[2] > 0
    assert torch.equal(r.x_cf[:2], x[:2])
    p = torch.softmax(clf(x[:2]), 1)[:, 9]
    assert torch.allclose(r.p_target[:2], p) and torch.equal(r.success[:2], p > 0.99)


def test_zero_gradient_through_decode_is_an_error(digits):
    data, clf = digits

    class Detached(AffineSigmoid):
        def decode(self, z):
            return super().decode(z).detach()

    class Ignores(AffineSigmoid):
        def decode(self, z):
            return super().decode(torch.zeros_like(z)) + 0 * z.sum()

    with pytest.raises(ModelError, match="differentiabl"):
        counterfactual(clf, data.x[:2], 9, generator=Detached(), max_steps=3)
    with pytest.raises(ModelError, match="zero"):
        counterfactual(clf, data.x[:2], 9, generator=Ignores(), max_steps=3)


def test_nonfinite_latent_or_log_det_is_an_error(digits):
    data, clf = digits

    class NaNCode(AffineSigmoid):
        def encode(self, x):
            z = super().encode(x)
            z[0, 0] = float("nan")
            return z

    class NaNDensity(AffineSigmoid):
        def log_prob(self, x):
            return torch.full((x.shape[0],), float("nan"))

    with pytest.raises(ModelError, match="non-finite"):
        counterfactual(clf, data.x[:2], 9, generator=NaNCode(), max_steps=3)
    with pytest.raises(ModelError, match="log"):
        counterfactual(clf, data.x[:2], 9, generator=NaNDensity(), max_steps=3)


def test_regression_needs_stop_value(digits):
    data, clf = digits
    with pytest.raises(InputError, match="stop_value"):
        counterfactual(clf, data.x[:2], objective=lambda x: clf(x)[:, 9], space="pixel")
    with pytest.raises(InputError, match="direction"):
        counterfactual(clf, data.x[:2], objective=lambda x: clf(x)[:, 9], stop_value=3.0, direction="up", space="pixel")


def test_budget_exhausted_is_a_failure_not_an_error(digits):
    data, clf = digits
    x = data.x[data.y == 4][:2]
    r = counterfactual(clf, x, 9, space="pixel", max_steps=3, lr=1e-4)
    assert not r.success.any() and r.steps.tolist() == [3, 3]
    assert isinstance(r, CounterfactualResult) and r.success_rate == 0.0
    assert (r.x_cf >= 0).all() and (r.x_cf <= 1).all()


# ---------------------------------------------------------------------------------------------- evaluation


def test_manifold_distance_of_a_linear_decoder_is_the_orthogonal_residual():
    from manifex.counterfactuals.evaluate import manifold_distance

    torch.manual_seed(0)
    A = torch.linalg.qr(torch.randn(20, 3, dtype=torch.float64))[0]
    decode = lambda z: z @ A.T  # noqa: E731 - the plane spanned by A's columns
    x = torch.randn(5, 20, dtype=torch.float64)
    exact = (x - (x @ A) @ A.T).norm(dim=1)
    with torch.no_grad():  # works under no_grad too (the evaluation calls it so)
        dist, z = manifold_distance(decode, x, torch.zeros(5, 3, dtype=torch.float64), steps=400, lr=0.05)
    assert torch.allclose(dist, exact, atol=1e-4)
    on = decode(torch.randn(5, 3, dtype=torch.float64))
    assert manifold_distance(decode, on, torch.zeros(5, 3, dtype=torch.float64), steps=400, lr=0.05)[0].max() < 1e-4


def test_judges_and_example_metrics(digits):
    from manifex.counterfactuals.evaluate import Judges, evaluate

    data, clf = digits
    train, test = data.split(0.2, seed=0)
    second = manifex.models.MLP((1, 8, 8), 10, hidden=(16,))
    judges = Judges.fit(train.x, train.y, second=second, svm_max=500, x_val=test.x, y_val=test.y)
    assert judges.svm_accuracy > 0.9
    j = judges(test.x[:50], test.y[:50])
    assert j["svm"].mean() > 0.9 and j["knn_vote"].mean() > 0.9
    assert ((j["knn_fraction"] >= 0) & (j["knn_fraction"] <= 1)).all()
    # a training image's nearest neighbour is itself: 10-NN fraction counts it
    jt = judges(train.x[:5], train.y[:5])
    assert (jt["knn_fraction"] >= 0.1).all()

    gen = AffineSigmoid()
    x = test.x[test.y == 4][:4]
    lat = counterfactual(clf, x, 9, generator=gen, lr=5e-2, max_steps=300)
    pix = counterfactual(clf, x, 9, space="pixel", lr=2e-2, max_steps=300)
    z0 = gen.encode(x)
    T = manifex.tangent_space(gen.decode, z0)  # full rank: every change is tangent
    ev = evaluate({"latent": lat, "pixel": pix}, judges=judges, tangent=T,
                  manifold=lambda v: torch.zeros(v.shape[0]), bits_per_dim=lambda v: v.flatten(1).sum(1))
    rows = ev["per_example"]["latent"]
    assert len(rows) == 4 and all(r["success"] for r in rows)
    d = (lat.x_cf - x).flatten(1).double()
    assert rows[0]["l2"] == pytest.approx(float(d[0].norm()), rel=1e-6)
    assert rows[0]["linf"] == pytest.approx(float(d[0].abs().max()), rel=1e-6)
    assert rows[0]["l1"] == pytest.approx(float(d[0].abs().sum()), rel=1e-6)
    assert all(r["tangent_fraction"] == pytest.approx(1.0, abs=1e-4) for r in rows)
    assert rows[0]["bpd_after"] == pytest.approx(float(lat.x_cf[0].sum()), rel=1e-5)
    s = ev["summary"]
    assert s["latent"]["success_rate"] == 1.0 and s["latent"]["n"] == 4
    assert s["latent"]["l2"]["mean"] == pytest.approx(float(d.norm(dim=1).mean()), rel=1e-6)
    assert set(s["latent"]) >= {"svm", "knn_vote", "knn_fraction", "second", "tangent_fraction", "off_manifold_fraction"}
    assert "l2_median" in s["latent_vs_pixel"]


def test_normflows_flow_works_as_generator(digits):
    normflows = pytest.importorskip("normflows")
    data, clf = digits
    torch.manual_seed(0)
    flows = []
    for i in range(4):
        mask = torch.tensor([(j + i) % 2 for j in range(64)], dtype=torch.float32)
        flows.append(normflows.flows.MaskedAffineFlow(mask, normflows.nets.MLP([64, 32, 64], init_zeros=True),
                                                       normflows.nets.MLP([64, 32, 64], init_zeros=True)))
    base = normflows.distributions.DiagGaussian(64)

    class Flat(nn.Module):  # normflows flows act on vectors: wrap reshape around it
        def __init__(self):
            super().__init__()
            self.nf = normflows.NormalizingFlow(base, flows)
            self.exact = True

        def encode(self, x):
            return self.nf.inverse(x.reshape(x.shape[0], -1))

        def decode(self, z):
            return self.nf.forward(z).reshape(-1, 1, 8, 8)

    x = data.x[data.y == 4][:3]
    r = counterfactual(clf, x, 9, generator=Flat(), lr=5e-2, max_steps=300)
    assert r.success.all() and r.recon_error.max() < 1e-5
    g = manifex.as_generator(Flat().nf)  # the adapter: encode = inverse, decode = forward
    assert g.kind == "flow" and g.exact


def test_a_diverging_decoder_stops_the_row_as_a_failure(digits):
    data, clf = digits

    class Diverging(AffineSigmoid):
        """NaN images once z leaves the ball of radius 0.3 around the start (row 0 only: its z sums highest)."""

        def decode(self, z):
            out = super().decode(z)
            far = ((z - self.z0[: z.shape[0]]).norm(dim=1) > 0.3) & (self.z0[: z.shape[0]].sum(1) >= self.top)
            return torch.where(far[:, None, None, None], torch.full_like(out, float("nan")), out)

    gen = Diverging()
    x = data.x[data.y == 4][:1]
    gen.z0 = gen.encode(x).detach()
    gen.top = float(gen.z0.sum(1).max())
    with pytest.warns(RuntimeWarning, match="diverged"):
        r = counterfactual(clf, x, 9, generator=gen, lr=5e-2, max_steps=200)
    assert r.info["diverged"] == [0] and not r.success[0] and r.steps[0] > 0
    assert torch.isfinite(r.x_cf).all()


def test_overflowing_likelihood_is_counted_not_raised():
    """An x′ whose log-density overflows (far off a flow's support) is +inf bits/dim: flagged and counted, no error."""
    from manifex.counterfactuals.evaluate import example_metrics, summarize

    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    r = CounterfactualResult(x=x, x_cf=x + 0.3, target=torch.tensor([9, 9, 9]), success=torch.tensor([True, True, False]),
                             steps=torch.tensor([3, 4, 9]), p_target=torch.tensor([0.995, 0.995, 0.5]),
                             already=torch.zeros(3, dtype=torch.bool), space="latent", lr=0.05)

    def bpd(v):  # finite for the originals, overflowing for the first and last counterfactual
        out = v.flatten(1).mean(1).double()
        return torch.where(v.flatten(1).amax(1) > 0.55, torch.tensor(float("inf"), dtype=torch.float64), out) \
            if v is r.x_cf else out

    r.x_cf[1] = x[1]  # the second one did not move: finite
    rows = example_metrics(r, bits_per_dim=bpd)
    assert rows[0]["bpd_after"] is None and rows[0]["bpd_after_overflow"] is True
    assert rows[1]["bpd_after"] is not None and "bpd_after_overflow" not in rows[1]
    s = summarize({"latent": rows})["latent"]
    assert s["bpd_after_overflow"] == 1 and s["all"]["bpd_after_overflow"] == 2 and s["bpd_after"]["n"] == 1


def test_report_says_when_the_spectrum_has_no_gap():
    """A smoothly decaying spectrum (estimate_dimension returns k) is reported as 'not determined', never as k."""
    import numpy as np

    from manifex.counterfactuals.report import findings, spectrum_figure
    from manifex.geometry import estimate_dimension

    smooth = torch.logspace(0.5, -0.5, 8, dtype=torch.float64).repeat(3, 1)
    gapped = torch.cat([torch.ones(3, 2), 1e-3 * torch.ones(3, 6)], 1).double()
    assert estimate_dimension(smooth).tolist() == [8, 8, 8] and estimate_dimension(gapped).tolist() == [2, 2, 2]
    base = {"top": 8, "sigma_first_median": 3.2, "sigma_last_median": 0.3}
    none = findings({"spectrum": {**base, "gap_found_fraction": 0.0, "dimension_median_where_gap": None}}, ["latent"])
    assert any("not determined" in f for f in none) and not any("estimated dimension" in f for f in none)
    found = findings({"spectrum": {**base, "gap_found_fraction": 1.0, "dimension_median_where_gap": 2.0}}, ["latent"])
    assert any("estimated dimension 2" in f for f in found)
    for s in (smooth, gapped):
        fig = spectrum_figure(s.numpy(), estimate_dimension(s).numpy())
        labels = fig.axes[0].get_legend_handles_labels()[1]
        assert any(("not determined" in l) == (s is smooth) for l in labels)
        assert np.isfinite(fig.axes[0].get_ylim()).all()


def test_paired_summary_uses_only_images_where_both_searches_succeeded():
    from manifex.counterfactuals.evaluate import summarize

    lat = [{"success": True, "svm": 1.0, "knn_vote": 1.0}, {"success": True, "svm": 0.0, "knn_vote": 1.0},
           {"success": True, "svm": 1.0, "knn_vote": 0.0}]
    pix = [{"success": True, "svm": 1.0, "knn_vote": 0.0}, {"success": False, "svm": 1.0, "knn_vote": 1.0},
           {"success": True, "svm": 0.0, "knn_vote": 0.0}]
    s = summarize({"latent": lat, "pixel": pix})
    assert s["paired"]["n"] == 2
    assert s["paired"]["svm"] == {"latent": 1.0, "pixel": 0.5} and s["paired"]["knn_vote"] == {"latent": 0.5, "pixel": 0.0}
    # the per-space means use each space's own successes (three latent, two pixel)
    assert s["latent"]["svm"]["n"] == 3 and s["pixel"]["svm"]["n"] == 2


def test_tf32_switch_restores_the_global_flags_also_on_error():
    """counterfactual() turns TensorFloat-32 off on CUDA for the call; the flags come back as found, even on error."""
    from manifex.counterfactuals.ascent import _no_tf32

    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, True
        with pytest.raises(RuntimeError, match="boom"):
            with _no_tf32():
                assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
                raise RuntimeError("boom")
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
