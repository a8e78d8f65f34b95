"""manifex.evaluation: explain_func inside Quantus, Quantus's metrics through evaluate, the batched pixel-flipping,
the manifold-aware metrics, and `manifex evaluate` end to end (tiny models on digits8-size data)."""
from __future__ import annotations

import json
import math
import re
import sys
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from _tiny_models import tiny_resnet
from manifex.data import load_digits8
from manifex.errors import InputError
from manifex.evaluation import (
    ManifoldDeletion,
    TangentAlignment,
    deletion_curves,
    evaluate,
    explain_func,
    manifold_distance,
    manifold_infill,
    metric_name,
    pixel_flipping,
    road_impute,
    tangent_alignment,
)
from manifex.geometry import random_baseline

EPS32 = float(torch.finfo(torch.float32).eps)


@pytest.fixture(scope="module")
def batch():
    """16 held-out digits 0–3 (the tiny model trained on the first 600) as float32 NumPy, and their labels."""
    d = load_digits8()
    keep = (d.y < 4).nonzero().flatten()[600:616]
    return d.x[keep].numpy(), d.y[keep].numpy()


def _state(model: nn.Module):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()))


class LinearGenerator(nn.Module):
    """x = W z + b with orthonormal W (64 × k): its manifold is a k-plane, tangent space col(W) everywhere."""

    def __init__(self, k: int = 3, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(64, k, generator=g))
        self.W = nn.Parameter(q, requires_grad=False)
        self.b = nn.Parameter(torch.full((64,), 0.5), requires_grad=False)

    def decode(self, z):
        return (z @ self.W.T + self.b).reshape(-1, 1, 8, 8)

    def encode(self, x):
        return (x.reshape(x.shape[0], -1) - self.b) @ self.W


# ------------------------------------------------------------------------------------------------------------
# explain_func
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quantus_method, method, options, factor", [
    ("Saliency", "saliency", {}, 1.0),
    ("InputXGradient", "input_x_gradient", {}, 1.0),
    # Quantus runs Captum's IG with n_steps=10, riemann_trapezoid, whose weights sum to (n-1)/n (see
    # manifex.attribution.IntegratedGradients); manifex's exact trapezoid rule times 9/10 is Captum's
    ("IntegratedGradients", "integrated_gradients", {"steps": 10, "integration": "riemann_trapezoid"}, 0.9),
])
def test_explain_func_equals_quantus_explain(batch, quantus_method, method, options, factor):
    quantus = pytest.importorskip("quantus")
    x, y = batch
    model = tiny_resnet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = quantus.explain(model, x, y, method=quantus_method)
    got = explain_func(model, x, y, method=method, **options) * factor
    assert got.shape == ref.shape == (16, 1, 8, 8)
    # the same float32 gradients, summed in another order over at most 10 nodes: within 16 ulp of the largest entry
    assert np.abs(got - ref).max() <= 16 * EPS32 * np.abs(ref).max()


def test_explain_func_shapes_dtypes_and_channel_last(batch):
    x, y = batch
    model = tiny_resnet()
    a = explain_func(model, torch.from_numpy(x), torch.from_numpy(y), method="gradient", reduce_axes=())
    assert isinstance(a, np.ndarray) and a.shape == x.shape
    # float64 inputs (Quantus's perturbations) are converted to the model's dtype, as quantus.explain does
    np.testing.assert_array_equal(explain_func(model, x.astype(np.float64), y, method="gradient", reduce_axes=()), a)
    # channel-last: transposed for the model and back
    last = explain_func(model, np.moveaxis(x, 1, -1)[..., :], y, method="gradient", channel_first=False, reduce_axes=())
    np.testing.assert_array_equal(np.moveaxis(last, -1, 1), a)
    # one class for all, Captum's option names
    one = explain_func(model, x, 2, method="ig", n_steps=4)
    assert one.shape == (16, 1, 8, 8)
    with pytest.raises(InputError, match="method="):
        explain_func(model, x, y, method="gradient", xai_lib="captum")
    with pytest.raises(InputError, match="unknown method"):
        explain_func(model, x, y, method="not_a_method")


def test_explain_func_leaves_model_state_as_found_also_on_error(batch):
    x, y = batch
    model = tiny_resnet()
    model.train()
    handle = model.register_forward_hook(lambda *a: None)
    try:
        before = _state(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            explain_func(model, x, y, method="smoothgrad")
            assert _state(model) == before
            with pytest.raises(InputError):
                explain_func(model, x, np.full(16, 9), method="smoothgrad")  # target out of range, inside the explainer
        assert _state(model) == before
    finally:
        handle.remove()
        model.eval()


def test_quantus_reexplaining_metrics_run_on_lrp_and_a_beta_smoothed_model(batch):
    quantus = pytest.importorskip("quantus")
    from manifex import beta_smoothed

    x, y = batch[0][:8], batch[1][:8]
    model = tiny_resnet()
    smooth = beta_smoothed(model, 10.0).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for net, method in ((model, "lrp"), (smooth, "gradient")):
            ms = quantus.MaxSensitivity(nr_samples=3, disable_warnings=True)(
                model=net, x_batch=x, y_batch=y, a_batch=None, explain_func=explain_func,
                explain_func_kwargs={"method": method}, channel_first=True)
            assert len(ms) == 8 and np.isfinite(ms).all() and (np.asarray(ms) > 0).all()
            mprt = quantus.MPRT(disable_warnings=True, seed=0)(
                model=net, x_batch=x, y_batch=y, a_batch=None, explain_func=explain_func,
                explain_func_kwargs={"method": method}, channel_first=True)
            layers = list(mprt.values()) if isinstance(mprt, dict) else mprt
            assert len(layers) >= 3
            # randomising every layer must change the explanation (an explain_func ignoring the model would give 1)
            assert np.isfinite(layers[-1]).all() and np.mean(layers[-1]) < 0.99


# ------------------------------------------------------------------------------------------------------------
# evaluate and the batched pixel-flipping
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, {"features_in_step": 4, "softmax": False}, {"abs": True}])
def test_batched_pixel_flipping_equals_quantus(batch, options):
    quantus = pytest.importorskip("quantus")
    x, y = batch
    model = tiny_resnet()
    a = explain_func(model, x, y, method="gradient")
    call = {k: v for k, v in options.items() if k == "softmax"}
    init = {k: v for k, v in options.items() if k != "softmax"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = np.asarray(quantus.PixelFlipping(disable_warnings=True, **init)(
            model=model, x_batch=x, y_batch=y, a_batch=a, channel_first=True, **call))
    ours = evaluate(model, x, y, a, metrics=["pixel_flipping"], **options)["pixel_flipping"].numpy()
    assert ours.shape == ref.shape == (16, 64 // options.get("features_in_step", 1))
    assert np.abs(ours - ref).max() <= 1e-5
    # several steps per forward pass, the last pass shorter (the budget holds 5 steps of the 16 images)
    direct = pixel_flipping(model, x, y, np.abs(a) if options.get("abs") else a, **init if "features_in_step" in init else {},
                            softmax=options.get("softmax", True), max_values=16 * 64 * 5)
    np.testing.assert_allclose(direct.numpy(), ref, atol=1e-5, rtol=0)


def test_pixel_flipping_is_batched_only_where_the_benchmark_shows_a_gain(batch, monkeypatch):
    pytest.importorskip("quantus")
    import manifex.evaluation.manifold as manifold
    from manifex.models.classifiers import ClassifierConfig, build_classifier

    calls = []
    real = manifold.BatchedPixelFlipping

    class Spy(real):
        def __call__(self, *a, **k):
            calls.append(1)
            return super().__call__(*a, **k)

    monkeypatch.setattr(manifold, "BatchedPixelFlipping", Spy)
    x, y = batch
    evaluate(tiny_resnet(), x, y, np.ones_like(x), metrics=["PixelFlipping"])
    assert calls == [1]  # 8×8: 16 steps share a pass (3.2× Quantus's speed)
    torch.manual_seed(0)
    big = build_classifier(ClassifierConfig("lenet", (1, 16, 16), 4)).eval()
    x16 = torch.rand(64, 1, 16, 16).numpy()
    evaluate(big, x16, np.arange(64) % 4, np.random.default_rng(0).random(x16.shape), metrics=["PixelFlipping"], features_in_step=64, batch_size=64)
    assert calls == [1]  # 16×16 with 64 images a batch: 4 steps a pass, no gain (0.9×): Quantus's own
    evaluate(tiny_resnet(), x, y, np.random.default_rng(0).random(x.shape), metrics=["PixelFlipping"], perturb_baseline="mean")
    assert calls == [1]  # a baseline manifex does not reproduce: Quantus's own


def test_quantus_auc_metrics_run_on_numpy_without_trapz(batch):
    """Quantus 0.6's AUC helper calls np.trapz (gone in NumPy 2.4): through evaluate, Quantus's own PixelFlipping with
    one AUC per example and IROF run, and the AUC is the trapezoidal area of the curve Quantus returns without it."""
    quantus = pytest.importorskip("quantus")
    x, y = batch
    model = tiny_resnet()
    a = np.random.default_rng(0).random(x.shape)
    # a baseline manifex does not reproduce, so Quantus's own PixelFlipping runs, once per curve and once per AUC
    out = evaluate(model, x, y, a, metrics=["PixelFlipping", "IROF"], perturb_baseline="mean")
    curves = evaluate(model, x, y, a, metrics=["PixelFlipping"], perturb_baseline="mean")["PixelFlipping"].numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auc = np.asarray(quantus.PixelFlipping(disable_warnings=True, perturb_baseline="mean", return_auc_per_sample=True)(
            model=model, x_batch=x, y_batch=y, a_batch=a, channel_first=True))
    # the same float32 curve integrated two ways: Quantus sums its 64 steps in float32 (area ≤ 64), so the two agree
    # to the summation bound 64 steps × 2^-24 × 64 ≈ 2.4e-4
    ref = ((curves[:, 1:].astype(np.float64) + curves[:, :-1]) / 2).sum(1)
    assert auc.shape == (16,) and np.abs(auc - ref).max() <= 64 * 2.0**-24 * 64
    assert out["IROF"].shape == (16,) and torch.isfinite(out["IROF"]).all()


def test_evaluate_names_options_and_errors_before_work(batch, monkeypatch):
    pytest.importorskip("quantus")
    x, y = batch
    model = tiny_resnet()
    assert metric_name("max_sensitivity") == metric_name("MaxSensitivity") == "MaxSensitivity"
    assert metric_name("mprt") == "MPRT" and metric_name("pixel_flipping") == "PixelFlipping"
    out = evaluate(model, x, y, metrics=["Sparseness", "random_logit", "max_sensitivity"], method="saliency",
                   num_classes=4, nr_samples=2)
    assert set(out) == {"Sparseness", "random_logit", "max_sensitivity"}
    assert all(v.shape == (16,) and torch.isfinite(v).all() for v in out.values())

    import manifex.evaluation.bridge as bridge

    def no_work(*a, **k):
        raise AssertionError("explained before the error")

    monkeypatch.setattr(bridge, "explain_func", no_work)
    with pytest.raises(InputError, match="nr_sample"):
        evaluate(model, x, y, metrics=["max_sensitivity"], method="gradient", nr_sample=3)
    with pytest.raises(InputError, match="unknown metric"):
        evaluate(model, x, y, metrics=["pixel_flip"], method="gradient")
    with pytest.raises(InputError, match="re-explain"):
        evaluate(model, x, y, np.ones_like(x), metrics=["MaxSensitivity"])
    with pytest.raises(InputError, match="generator="):
        evaluate(model, x, y, metrics=["TangentAlignment"], method="gradient")
    with pytest.raises(InputError, match="more than once"):
        evaluate(model, x, y, metrics=["PixelFlipping", "pixel_flipping"], method="gradient")


def test_evaluate_leaves_model_state_as_found(batch):
    pytest.importorskip("quantus")
    x, y = batch
    model = tiny_resnet()
    model.train()
    try:
        before = _state(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            evaluate(model, x, y, metrics=["MaxSensitivity", "PixelFlipping"], method="gradient", nr_samples=2)
        assert _state(model) == before
    finally:
        model.eval()


def test_missing_quantus_is_one_line_with_the_install_command(batch, monkeypatch):
    x, y = batch
    monkeypatch.setitem(sys.modules, "quantus", None)
    for name in ("max_sensitivity", "Sufficiency"):
        with pytest.raises(InputError, match=r'pip install "manifex\[eval\]"'):
            evaluate(tiny_resnet(), x, y, metrics=[name], method="gradient")
    # the manifold-aware metrics need no Quantus
    out = evaluate(tiny_resnet(), x, y, metrics=["TangentAlignment"], method="gradient", generator=LinearGenerator(),
                   channel_first=True)
    assert out["TangentAlignment"].shape == (16,)


# ------------------------------------------------------------------------------------------------------------
# manifold-aware metrics
# ------------------------------------------------------------------------------------------------------------
def test_tangent_alignment_on_a_linear_manifold():
    g = LinearGenerator(k=3)
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    x = g.decode(z)
    inside = (torch.randn(5, 3) @ g.W.T).reshape(5, 1, 8, 8)          # in col(W): alignment 1
    normal = torch.randn(5, 64)
    normal = (normal - normal @ g.W @ g.W.T).reshape(5, 1, 8, 8)      # orthogonal to col(W): alignment 0
    r_in = tangent_alignment(inside, g, x=x)
    r_out = tangent_alignment(normal, g, z=z)
    base = random_baseline(3, 64)
    # exact up to float32 projections of unit vectors onto an orthonormal 3-frame: a few hundred ulp
    assert torch.allclose(r_in.score, torch.ones(5, dtype=torch.float64), atol=256 * EPS32)
    assert (r_out.score <= 256 * EPS32).all()
    assert torch.allclose(r_in.baseline, torch.full((5,), base, dtype=torch.float64))
    assert torch.allclose(r_in.ratio, torch.full((5,), 1 / base, dtype=torch.float64), rtol=256 * EPS32)
    assert (r_in.rank == 3).all()


def test_road_imputation_recovers_a_linear_ramp_inside():
    # a linear image satisfies "each pixel = weighted mean of its 8 neighbours" away from the border, so ROAD's
    # system (noise 0) has it as its solution: exact up to the sparse solver's float64 rounding
    yy, xx = torch.meshgrid(torch.arange(8, dtype=torch.float64), torch.arange(8, dtype=torch.float64), indexing="ij")
    ramp = (0.05 * xx + 0.03 * yy + 0.1).reshape(1, 1, 8, 8).double()
    remove = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    remove[0, 0, 2:6, 3:6] = True
    out = road_impute(ramp.clone().masked_fill(remove, 0.0), remove, noise=0.0)
    assert (out - ramp).abs().max() < 1e-12
    noisy = road_impute(ramp.clone(), remove, noise=0.01, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy[~remove.expand_as(noisy)], ramp[~remove.expand_as(ramp)])  # kept pixels untouched
    assert 0 < (noisy - ramp).abs().max() < 0.1


def test_infill_stays_on_the_manifold_black_leaves_it():
    g = LinearGenerator(k=3)
    z = 0.8 * torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    x = g.decode(z)
    keep = torch.ones(6, 1, 8, 8, dtype=torch.bool)
    keep[:, :, 2:6, 2:6] = False                                      # the 16 centre pixels removed
    filled, zf = manifold_infill(g, x, keep, steps=300)
    assert torch.equal(filled[keep.expand_as(filled)], x[keep.expand_as(x)])  # kept pixels untouched
    # x lies on the manifold and 48 kept pixels determine its 3 coordinates: the in-fill finds x again
    assert (filled - x).abs().max() < 1e-2
    black = torch.where(keep, x, x.reshape(6, -1).amin(1).view(6, 1, 1, 1))
    d_fill = manifold_distance(g, filled, [g.encode(filled)], steps=50)
    d_black = manifold_distance(g, black, [g.encode(black)], steps=50)
    assert (d_black > 10 * d_fill).all() and (d_black > 0.1).all()


def test_deletion_curves_black_equals_pixel_flipping_and_distances(batch):
    x, y = batch
    model = tiny_resnet()
    a = explain_func(model, x, y, method="gradient")
    g = LinearGenerator(k=3)
    dc = deletion_curves(model, x, y, a, generator=g, steps=4, infill_steps=20, distance_steps=20)
    pf = pixel_flipping(model, x, y, a)                            # step s removes s + 1 pixels
    for j, f in enumerate(dc.fractions.tolist()):
        k = round(f * 64)
        expected = torch.softmax(model(torch.from_numpy(x)), 1)[torch.arange(16), torch.from_numpy(y)].double() if k == 0 else pf[:, k - 1]
        assert torch.allclose(dc.prob["black"][:, j], expected.detach(), atol=1e-6)
    assert set(dc.prob) == set(dc.auc) == set(dc.distance) == {"black", "road", "manifold"}
    assert all(v.shape == (16, 4) for v in dc.prob.values())
    # the unperturbed column is the same image for every kind
    assert torch.allclose(dc.prob["black"][:, 0], dc.prob["manifold"][:, 0])
    with pytest.raises(InputError, match="generator"):
        deletion_curves(model, x, y, a, kinds=("manifold",))


def test_manifold_metrics_run_inside_quantus_evaluate(batch):
    quantus = pytest.importorskip("quantus")
    x, y = batch[0][:6], batch[1][:6]
    model = tiny_resnet()
    g = LinearGenerator(k=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = quantus.evaluate(metrics={"tangent": TangentAlignment(generator=g),
                                        "deletion": ManifoldDeletion(generator=g, steps=3, infill_steps=10, distance_steps=5)},
                               xai_methods={"gradient": explain_func}, model=model, x_batch=x, y_batch=y,
                               explain_func_kwargs={"method": "gradient"})
    t, d = res["gradient"]["tangent"], res["gradient"]["deletion"]
    assert len(t) == 6 and len(d) == 6 and np.isfinite(t).all() and np.isfinite(d).all()


# ------------------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------------------
TINY = ["--dataset", "digits8", "--epochs", "1", "--n", "4", "--methods", "gradient,lrp", "--vae-epochs", "1",
        "--curve-steps", "3", "--infill-steps", "5", "--nr-samples", "2", "--quiet"]


def test_cli_end_to_end_and_resume(tmp_path):
    pytest.importorskip("quantus")
    from manifex.cli import main

    out = tmp_path / "out"
    args = ["evaluate", *TINY, "--metrics", "pixel_flipping,max_sensitivity,TangentAlignment,ManifoldDeletion",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    cols = m["summary"]["columns"]
    assert cols == ["PixelFlipping", "MaxSensitivity", "TangentAlignment", "BlackDeletion", "ROADDeletion", "ManifoldDeletion"]
    assert m["summary"]["direction"]["TangentAlignment"] == "higher" and m["summary"]["direction"]["PixelFlipping"] == "lower"
    assert set(m["summary"]["methods"]) == {"gradient", "lrp"}
    assert "ranking_change" in m["summary"] and "reference_distance" in m["summary"]
    html = (out / "report.html").read_text()
    assert "curves.png" in html and "rank.png" in html and "Checks" in html
    before = (out / "results.jsonl").read_bytes()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and (out / "results.jsonl").read_bytes() == before  # resumed: nothing recomputed
    changed = CliRunner().invoke(main, [*args, "--curve-steps", "4"])
    assert changed.exit_code == 2 and "other settings" in changed.output
    assert (out / "results.jsonl").read_bytes() == before


def test_cli_refuses_bad_names_before_training(tmp_path, monkeypatch):
    import manifex.models.zoo as zoo
    from manifex.cli import main

    def trained(*a, **k):
        raise AssertionError("trained before the error")

    monkeypatch.setattr(zoo, "fit_classifier", trained)
    monkeypatch.setattr(zoo, "fit_generative", trained)
    for extra, needle in ((["--metrics", "pixel_flip"], "unknown metric|manifex\\[eval\\]"),
                          (["--methods", "gradient,nope"], "unknown method")):
        res = CliRunner().invoke(main, ["evaluate", *TINY, *extra, "--out", str(tmp_path / "o")])
        assert res.exit_code == 2 and re.search(needle, res.output), res.output
        assert len([line for line in res.output.splitlines() if line.strip()]) == 1


def test_run_evaluation_leaves_the_users_model_as_found(tmp_path):
    from manifex.evaluation.experiment import EvaluateConfig, run_evaluation
    from manifex.models import ModelCache

    from manifex.errors import ModelError
    from manifex.models.classifiers import SmallResNet

    with pytest.raises(ModelError, match="10"):  # 4 outputs for 10 classes: refused before the VAE is trained
        run_evaluation(EvaluateConfig(dataset="digits8"), tmp_path / "bad", classifier=tiny_resnet(),
                       cache=ModelCache(tmp_path / "nocache"), progress=False)
    assert not (tmp_path / "nocache").exists() or not any((tmp_path / "nocache").iterdir())
    torch.manual_seed(0)
    model = SmallResNet((1, 8, 8), 10, (8, 12))
    model.train()  # a user's model in train mode is explained as it is (warned), never switched
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    try:
        before = _state(model)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        cfg = EvaluateConfig(dataset="digits8", methods=("gradient",), metrics=("TangentAlignment", "ManifoldDeletion"), n=4,
                             generator_epochs=1, curve_steps=2, infill_steps=3, distance_steps=3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            summary = run_evaluation(cfg, tmp_path / "out", classifier=model, classifier_info={"classifier": "tiny"},
                                     cache=ModelCache(tmp_path / "cache"), progress=False)
        assert _state(model) == before
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())  # BatchNorm statistics too
        assert summary["methods"] == ["gradient"]
    finally:
        frozen.requires_grad_(True)


def test_a_methods_record_does_not_depend_on_numpys_global_state(batch):
    """Quantus draws from NumPy's global generator: each unit seeds it (and restores it), so a resumed run or
    another worker computes the same record."""
    pytest.importorskip("quantus")
    from manifex.evaluation.experiment import EvaluateConfig, process_methods
    from manifex.runs import Unit

    x, y = batch
    cfg = EvaluateConfig(nr_runs=5, nr_samples=2)
    context = {"config": cfg, "model": tiny_resnet(), "x": torch.from_numpy(x[:6]), "y": torch.from_numpy(y[:6]), "z": None,
               "generator": None, "metrics": ["FaithfulnessCorrelation", "MaxSensitivity"], "num_classes": 4}
    records = []
    for state in (1, 2):
        np.random.seed(state)
        before = np.random.get_state()[1].copy()
        records.append(process_methods([Unit("method-gradient", {"method": "gradient"})], context, None)[0])
        assert np.array_equal(np.random.get_state()[1], before)  # the caller's generator is left as it was
    assert records[0]["scores"] == records[1]["scores"]


def test_flip_steps_sets_pixel_flippings_step_and_its_record_says_where_time_went(batch):
    """flip_steps=S removes the fewest pixels per step that divide the image and give at most S steps; the record's
    PixelFlipping score then equals Quantus's own curve at that features_in_step (the batched path is tested equal to
    Quantus above), and metric_seconds names every metric it ran."""
    pytest.importorskip("quantus")
    from manifex.evaluation.experiment import EvaluateConfig, flip_features_in_step, process_methods
    from manifex.runs import Unit

    assert [flip_features_in_step(n, s) for n, s in ((1024, 64), (784, 64), (64, 64), (64, 16), (64, 1000))] == [16, 14, 1, 4, 1]
    x, y = batch
    model = tiny_resnet()
    xs, ys = torch.from_numpy(x[:4]), torch.from_numpy(y[:4])
    context = {"model": model, "x": xs, "y": ys, "z": None, "generator": None, "metrics": ["PixelFlipping"], "num_classes": 4}
    per_step = {}
    for steps in (None, 8):
        rec = process_methods([Unit("method-gradient", {"method": "gradient"})], {**context, "config": EvaluateConfig(flip_steps=steps)}, None)[0]
        assert set(rec["metric_seconds"]) == {"explain", "PixelFlipping"}
        per_step[steps] = rec["scores"]["PixelFlipping"]
    fis = flip_features_in_step(int(np.prod(x.shape[2:])), 8)
    a = explain_func(model, xs, ys, method="gradient", reduce_axes=()).sum(axis=1, keepdims=True)
    ref = evaluate(model, x[:4], y[:4], a, metrics=["PixelFlipping"], features_in_step=fis, return_auc_per_sample=True)
    np.testing.assert_allclose(per_step[8], np.asarray(ref["PixelFlipping"]), rtol=1e-6)
    assert per_step[8] != per_step[None]
    with pytest.raises(InputError, match="flip_steps"):
        from manifex.evaluation.experiment import EvaluateExperiment

        EvaluateExperiment().check_options(EvaluateConfig(flip_steps=0))
