"""Tests of explanation manipulation (``manifex.manipulation``): the batched attack and resumable campaigns.

Models are tiny (a CNN trained for a few seconds on scikit-learn's 8×8 digits; a random CNN on 12×12
images for campaigns) and attacks short. The research settings (Adam lr 2e-4, 1500 iterations, γ = 1e-5)
are tuned for 224×224 images; here the attacks use lr 1e-2 for a few hundred steps and γ = 0.06, the
seed's balance of map and output terms transferred to 64-pixel maps and 10 classes
(γ · (K/1000) · (224²/d)²). Everything runs on one thread.
"""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from manifex.attribution import Explainer, GuidedBackprop, InputXGradient, explain, make_explainer
from manifex.attribution.lrp import LRPEpsilonPlus
from manifex.data import ImageDataset, load_digits8
from manifex.errors import DataError, InputError, ModelError
from manifex.manipulation import (
    ExplanationGradientWarning,
    manipulate,
    map_term,
    normalized_box,
    pairs_from_csv,
    pairs_from_dataset,
    prepare_maps,
    read_results,
    research_gamma,
    run_campaign,
)
from manifex.metrics import mse, output_change, pearson, perturbation_norms

GAMMA = research_gamma(64, 10)  # 0.061, see the module docstring
FAST = dict(lr=1e-2, gamma=GAMMA)
HOOK_ATTRS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


# --------------------------------------------------------------------------------------------------------
# fixtures


def make_cnn(size: int = 8, seed: int = 0) -> nn.Module:
    """conv-ReLU-conv-ReLU-maxpool-fc-ReLU-fc on (1, size, size), 10 classes, nn.ReLU modules."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * (size // 2) ** 2, 32), nn.ReLU(), nn.Linear(32, 10),
        )
    return net.eval()


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    return load_digits8()


@pytest.fixture(scope="module")
def cnn(digits) -> nn.Module:
    """The small CNN trained for 6 epochs on the digits (train accuracy ≈ 0.97), in float64, then rounded to float32.

    Trained in float32, its weights differ by up to 1.4e-2 (relative) between CPU kernel paths (AVX-512, AVX2,
    MKL's compatible path: 174 Adam steps amplify the ~1e-7 rounding of each op), and so do the attacks' results
    below; trained in float64 they differ by < 5e-6, so every CPU attacks nearly the same float32 model."""
    model = make_cnn().double()
    x = digits.x.double()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(6):
        for b in torch.randperm(len(digits), generator=g).split(64):
            loss = nn.functional.cross_entropy(model(x[b]), digits.y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.float().eval()
    with torch.no_grad():
        acc = float((model(digits.x).argmax(1) == digits.y).float().mean())
    assert acc > 0.9
    return model


@pytest.fixture(scope="module")
def batch(digits, cnn) -> tuple[torch.Tensor, torch.Tensor]:
    """Six originals and six target images of other classes (seeded)."""
    pairs = pairs_from_dataset(digits, 6, seed=0)
    return pairs.images(range(6))


def target_maps(model: nn.Module, method: str, xt: torch.Tensor, **options) -> torch.Tensor:
    """The research's target: the explanation of the target image for its predicted class."""
    with torch.no_grad():
        cls = model(xt).argmax(1)
    return explain(model, xt, cls, method=method, **options)


def hooks_of(model: nn.Module) -> list[int]:
    return [len(getattr(m, a)) for m in model.modules() for a in HOOK_ATTRS]


# --------------------------------------------------------------------------------------------------------
# the attack


def test_batched_equals_per_example(cnn, batch):
    """Adam is per entry and the batch loss a sum: one batch of 3 == 3 runs of 1 (float64, β-growth)."""
    model = copy.deepcopy(cnn).double()
    x, xt = (t[:3].double() for t in batch)
    tmap = target_maps(model, "gradient", xt)
    kw = dict(FAST, iterations=25, beta_growth=(10.0, 100.0), history_every=5)
    together = manipulate(model, "gradient", x, tmap, **kw)
    alone = [manipulate(model, "gradient", x[i:i + 1], tmap[i:i + 1], **kw) for i in range(3)]
    assert (together.x_adv - x).abs().max() > 1e-2  # it moved
    torch.testing.assert_close(together.x_adv, torch.cat([r.x_adv for r in alone]), rtol=0, atol=1e-7)
    torch.testing.assert_close(together.manipulated_map, torch.cat([r.manipulated_map for r in alone]), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(together.history["loss"], torch.cat([r.history["loss"] for r in alone]), rtol=1e-6, atol=0)
    assert together.history_steps.tolist() == [5, 10, 15, 20, 25]


@pytest.mark.parametrize("method, beta_growth, min_gain", [
    ("input_x_gradient", None, 0.3),
    ("gradient", (10.0, 100.0), 0.15),
])
def test_attack_moves_map_to_target_and_keeps_class(cnn, batch, method, beta_growth, min_gain):
    x, xt = batch
    res = manipulate(cnn, method, x, target_maps(cnn, method, xt), iterations=200, beta_growth=beta_growth, **FAST)
    pcc = res.pcc()
    before, after = float(pcc["before"].mean()), float(pcc["after"].mean())
    change = output_change(res.logits, res.logits_adv)
    linf = perturbation_norms(res.x, res.x_adv).linf
    print(f"{method}: PCC to target {before:.3f} -> {after:.3f}, max |dp| {float(change.max_prob_change.max()):.4f}, "
          f"top-1 kept {float(change.top1_kept.float().mean()):.2f}, L-inf mean {float(linf.mean()):.3f}")
    assert after > before + min_gain
    assert bool(change.top1_kept.all())
    assert float(change.max_prob_change.max()) < 0.15
    # the result's maps are the ReLU model's explanations
    relu_map = prepare_maps(explain(cnn, res.x_adv, res.target, method=method))
    torch.testing.assert_close(res.manipulated_map, relu_map)
    assert res.iterations.tolist() == [200] * 6 and not bool(res.stopped.any())


@pytest.mark.parametrize("name", ["integrated_gradients", "guided_backprop", "lrp_epsilon_plus"])
def test_every_kind_of_explainer_can_be_attacked(cnn, batch, name):
    x, xt = (t[:3] for t in batch)
    beta_growth = None
    if name == "integrated_gradients":
        explainer = make_explainer(cnn, name, steps=3)
    elif name == "guided_backprop":
        explainer, beta_growth = GuidedBackprop(cnn), (10.0, 100.0)
    else:
        explainer = LRPEpsilonPlus(cnn)
    with torch.no_grad():
        tmap = explainer.attribute(xt, cnn(xt).argmax(1))
    res = manipulate(cnn, explainer, x, tmap, iterations=60, beta_growth=beta_growth, **FAST)
    before, after = (float(mse(m, res.target_map).mean()) for m in (res.original_map, res.manipulated_map))
    pcc = {k: float(v.mean()) for k, v in res.pcc().items()}
    print(f"{name}: MSE to target {before:.3g} -> {after:.3g}, PCC {pcc['before']:.3f} -> {pcc['after']:.3f}")
    assert after < 0.9 * before
    assert pcc["after"] > pcc["before"] + 0.05


def test_box_is_kept(cnn, batch):
    x, xt = batch
    tmap = target_maps(cnn, "input_x_gradient", xt)
    res = manipulate(cnn, "input_x_gradient", x, tmap, lr=0.3, iterations=5)
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    assert float(((res.x_adv == 0) | (res.x_adv == 1)).float().mean()) > 0.1  # the clamp was active
    # a box given per channel (as for a normalised model), as tensors
    low, high = torch.full((1, 1, 1), 0.1), torch.full((1, 1, 1), 0.8)
    xb = x.clamp(0.1, 0.8)
    res = manipulate(cnn, "input_x_gradient", xb, tmap, lr=0.3, iterations=5, box=(low, high))
    assert float(res.x_adv.min()) >= 0.1 - 1e-7 and float(res.x_adv.max()) <= 0.8 + 1e-7
    low, high = normalized_box([0.5], [0.25])
    assert torch.allclose(low, torch.tensor(-2.0)) and torch.allclose(high, torch.tensor(2.0))


@pytest.mark.parametrize("norm, epsilon", [("linf", 0.05), ("l2", 0.3)])
def test_norm_budget_is_respected(cnn, batch, norm, epsilon):
    x, xt = batch
    res = manipulate(cnn, "input_x_gradient", x, target_maps(cnn, "input_x_gradient", xt),
                     iterations=20, epsilon=epsilon, norm=norm, lr=0.05, gamma=GAMMA)
    sizes = perturbation_norms(res.x, res.x_adv)
    size = sizes.linf if norm == "linf" else sizes.l2
    assert float(size.max()) <= epsilon + 1e-6
    assert float(size.max()) > 0.9 * epsilon  # the budget was binding
    assert float(res.x_adv.min()) >= 0 and float(res.x_adv.max()) <= 1


def test_beta_growth_leaves_model_unchanged(cnn, batch):
    model = copy.deepcopy(cnn).train()  # train mode must survive the attack (which runs in eval mode)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, xt = (t[:2] for t in batch)
    betas: list[float] = []
    res = manipulate(model, "gradient", x, target_maps(cnn, "gradient", xt), iterations=10,
                     beta_growth=(10.0, 100.0), callback=lambda s: betas.append(s.beta), **FAST)
    assert betas[0] == pytest.approx(10.0) and betas[-1] == pytest.approx(10.0 * 10 ** 0.9)
    assert all(b1 > b0 for b0, b1 in zip(betas, betas[1:]))
    assert model.training and all(m.training for m in model.modules())
    assert sum(hooks_of(model)) == 0
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    # the final maps come from the ReLU model
    torch.testing.assert_close(res.manipulated_map, prepare_maps(explain(cnn, res.x_adv, res.target)))

    def interrupt(step):
        if step.iteration == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        manipulate(model, "gradient", x, target_maps(cnn, "gradient", xt), iterations=10,
                   beta_growth=(10.0, 100.0), callback=interrupt, **FAST)
    assert sum(hooks_of(model)) == 0 and model.training
    assert all(p.requires_grad for p in model.parameters())
    # early-stop checks lift the smoothing (ReLU maps) and reinstall it at the same β
    betas.clear()
    manipulate(model, "gradient", x, target_maps(cnn, "gradient", xt), iterations=10, beta_growth=(10.0, 100.0),
               stop_pcc=0.999, check_every=3, callback=lambda s: betas.append(s.beta), **FAST)
    assert betas == pytest.approx([10.0 * 10 ** (i / 10) for i in range(10)])
    assert sum(hooks_of(model)) == 0 and model.training


def test_signed_mode_preserves_relevance(cnn, batch):
    x, xt = batch
    tmap = target_maps(cnn, "input_x_gradient", xt)
    res = manipulate(cnn, "input_x_gradient", x, tmap, signed=True, iterations=3, **FAST)
    original_total = res.original_explanation.sum(dim=(1, 2, 3))
    torch.testing.assert_close(res.target_map.sum(dim=(1, 2)), original_total, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res.original_map, res.original_explanation.sum(1))  # signed channel sum, unscaled
    scale = original_total / tmap.sum(dim=(1, 2, 3))
    torch.testing.assert_close(res.target_map, tmap.sum(1) * scale.view(-1, 1, 1))  # a pure rescaling
    unscaled = manipulate(cnn, "input_x_gradient", x, tmap, signed=True, preserve_relevance=False, iterations=1, **FAST)
    torch.testing.assert_close(unscaled.target_map, tmap.sum(1))
    with pytest.raises(InputError, match="sum to ~0"):
        manipulate(cnn, "input_x_gradient", x, tmap - tmap.mean(dim=(1, 2, 3), keepdim=True), signed=True, iterations=1)


def test_early_stop_freezes_finished_examples(cnn, batch):
    x, xt = batch
    res = manipulate(cnn, "input_x_gradient", x, target_maps(cnn, "input_x_gradient", xt),
                     iterations=150, stop_pcc=0.5, check_every=5, history_every=1, **FAST)
    stopped = res.stopped
    # an example may also reach stop_pcc at the last check (iteration 150): stopped, with 150 iterations
    assert bool((stopped & (res.iterations < 150)).any())
    assert all(int(n) <= 150 and int(n) % 5 == 0 for n in res.iterations[stopped])
    assert all(int(n) == 150 for n in res.iterations[~stopped]) or bool(stopped.all())
    assert bool((pearson(res.manipulated_map, res.target_map)[stopped] >= 0.5).all())
    for i in stopped.nonzero().flatten().tolist():
        n = int(res.iterations[i])
        assert not bool(torch.isnan(res.history["loss"][i, :n]).any())
        assert bool(torch.isnan(res.history["loss"][i, n:]).all())  # frozen afterwards
    # a callback that returns True stops every example
    res = manipulate(cnn, "input_x_gradient", x, target_maps(cnn, "input_x_gradient", xt), iterations=50,
                     callback=lambda step: step.iteration == 3, **FAST)
    assert res.iterations.tolist() == [3] * 6 and not bool(res.stopped.any())


def test_zero_input_gradient_warns(cnn, batch):
    x, xt = batch
    with pytest.warns(ExplanationGradientWarning, match="zero input-gradient.*beta_growth"):
        manipulate(cnn, "gradient", x, target_maps(cnn, "gradient", xt), iterations=2, **FAST)


def test_research_gamma_transfers_the_seed_balance():
    assert research_gamma(224 * 224, 1000) == pytest.approx(1e-5)
    assert research_gamma(64, 10) == pytest.approx(1e-7 * (224 * 224 / 64) ** 2)
    with pytest.raises(InputError):
        research_gamma(0, 10)


class Detached(Explainer):
    """An explainer whose maps are cut from the graph: it cannot be attacked."""

    def _attribute(self, x, target, create_graph):
        return InputXGradient(self.model)._attribute(x, target, False).detach()


def test_pcc_map_term_is_the_mse_of_maps_with_the_targets_moments():
    """2·var(t)·(1 − r) equals the MSE of a map with t's mean and variance at correlation r (exact)."""
    g = torch.Generator().manual_seed(0)
    t = torch.rand(3, 7, 9, generator=g, dtype=torch.float64)
    t = t / t.sum((1, 2), keepdim=True)
    tc = t.flatten(1) - t.flatten(1).mean(1, keepdim=True)
    u = torch.randn(3, 63, generator=g, dtype=torch.float64)
    u = u - u.mean(1, keepdim=True)
    u = u - (u * tc).sum(1, keepdim=True) / tc.square().sum(1, keepdim=True) * tc  # ⟂ tc, mean 0
    u = u * tc.norm(dim=1, keepdim=True) / u.norm(dim=1, keepdim=True)
    r = torch.tensor([0.9, 0.2, -0.5], dtype=torch.float64).view(3, 1)
    h = (t.flatten(1).mean(1, keepdim=True) + r * tc + (1 - r ** 2).sqrt() * u).view_as(t)
    torch.testing.assert_close(pearson(h, t), r.flatten())
    torch.testing.assert_close(map_term(h, t, "pcc"), map_term(h, t, "mse"), rtol=1e-10, atol=0)
    # the pcc term ignores the scale (and offset) of the map; the mse term does not
    torch.testing.assert_close(map_term(3 * h + 1, t, "pcc"), map_term(h, t, "pcc"), rtol=1e-10, atol=0)
    assert bool((map_term(3 * h + 1, t, "mse") > map_term(h, t, "mse")).all())
    # a constant map counts as uncorrelated (finite loss and gradient)
    flat = torch.ones_like(t, requires_grad=True)
    loss = map_term(flat, t, "pcc")
    loss.sum().backward()
    torch.testing.assert_close(loss, 2 * t.flatten(1).var(1, unbiased=False))
    assert bool(torch.isfinite(flat.grad).all())
    with pytest.raises(InputError, match="map_loss must be 'mse'"):
        map_term(h, t, "ssim")


def test_pcc_loss_attack(cnn, batch):
    """map_loss='pcc' moves the map to the target (0.20 -> 0.77 in 100 steps; 'mse' reaches 0.67), batched ==
    per example, and the setting is recorded."""
    x, xt = batch
    tmap = target_maps(cnn, "input_x_gradient", xt)
    kw = dict(FAST, iterations=100, map_loss="pcc")
    res = manipulate(cnn, "input_x_gradient", x, tmap, **kw)
    pcc = res.pcc()
    assert float(pcc["after"].mean()) > float(pcc["before"].mean()) + 0.45
    assert res.settings["map_loss"] == "pcc"
    # batched == per example, in float64: in float32 the batch size changes the conv kernels' rounding
    # (~1e-7), which 100 steps of a sign-sensitive ascent amplify to 7e-3 on some CPUs; in float64 the same
    # amplification leaves < 1e-9.
    cnn64 = copy.deepcopy(cnn).double()
    res64 = manipulate(cnn64, "input_x_gradient", x.double(), tmap.double(), **kw)
    one = manipulate(cnn64, "input_x_gradient", x[2:3].double(), tmap[2:3].double(), **kw)
    torch.testing.assert_close(one.x_adv, res64.x_adv[2:3], rtol=0, atol=1e-9)
    with pytest.raises(InputError, match="map_loss must be 'mse'"):
        manipulate(cnn, "input_x_gradient", x, tmap, map_loss="l1")


def test_errors(cnn, batch):
    x, xt = batch
    tmap = target_maps(cnn, "input_x_gradient", xt)
    with pytest.raises(InputError, match=r"accepted shapes are \(6, 8, 8\) or \(6, 1, 8, 8\)"):
        manipulate(cnn, "input_x_gradient", x, tmap[:, :, :4], iterations=1)
    with pytest.raises(InputError, match="accepted shapes"):
        manipulate(cnn, "input_x_gradient", x, tmap[:3], iterations=1)
    bad = tmap.clone()
    bad[1, 0, 2, 2] = math.nan
    with pytest.raises(InputError, match="NaN"):
        manipulate(cnn, "input_x_gradient", x, bad, iterations=1)
    with pytest.raises(InputError, match="outside the pixel box"):
        manipulate(cnn, "input_x_gradient", x * 2 - 0.5, tmap, iterations=1)
    with pytest.raises(ModelError, match="does not depend differentiably"):
        manipulate(cnn, Detached(cnn), x, tmap, iterations=1)
    with pytest.raises(InputError, match="different model"):
        manipulate(cnn, InputXGradient(make_cnn()), x, tmap, iterations=1)
    with pytest.raises(InputError, match="lr"):
        manipulate(cnn, "input_x_gradient", x, tmap, lr=0)
    with pytest.raises(InputError, match="unknown method"):
        manipulate(cnn, "no_such_method", x, tmap)
    # accepted map shapes: reduced (N, H, W) and (N, 1, H, W) give the same attack as the raw map
    reduced = manipulate(cnn, "input_x_gradient", x, tmap.abs().sum(1), iterations=2, **FAST)
    raw = manipulate(cnn, "input_x_gradient", x, tmap, iterations=2, **FAST)
    torch.testing.assert_close(reduced.x_adv, raw.x_adv)


# --------------------------------------------------------------------------------------------------------
# campaigns


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, digits):
    """Eight 12×12 grey PNGs (upsampled digits) and a pairs CSV of five pairs."""
    root = tmp_path_factory.mktemp("images")
    up = nn.functional.interpolate(digits.x[:8], size=(12, 12), mode="bilinear", align_corners=False)
    for i, img in enumerate(up):
        Image.fromarray((img[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8), mode="L").save(root / f"img{i}.png")
    lines = ["original,target,note"] + [f"img{i}.png,img{i + 3}.png,x" for i in range(5)]
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    return root


CAMPAIGN = dict(batch_size=2, iterations=6, lr=1e-2, gamma=GAMMA)


def test_campaign_resumes_without_loss_or_duplicates(image_dir, tmp_path):
    model = make_cnn(size=12, seed=3)
    pairs = pairs_from_csv(image_dir / "pairs.csv", image_shape=(1, 12, 12))
    assert len(pairs) == 5 and pairs.ids[0] == "00000_img0_img3"
    out = tmp_path / "run"
    calls = []

    def interrupt_second_batch(step):
        calls.append(step.iteration)
        if len(calls) > CAMPAIGN["iterations"]:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_campaign(model, "input_x_gradient", pairs, out, callback=interrupt_second_batch, **CAMPAIGN)
    first = (out / "results.jsonl").read_text().splitlines()
    assert len(first) == 2 and sum(hooks_of(model)) == 0

    summary = run_campaign(model, "input_x_gradient", pairs, out, **CAMPAIGN)
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 5 and lines[:2] == first
    records = [json.loads(line) for line in lines]
    assert sorted(r["pair_id"] for r in records) == sorted(pairs.ids)
    assert (summary.n_new, summary.n_skipped, summary.n_pairs) == (3, 2, 5)
    rec = records[0]
    assert (rec["original"], rec["target"]) == ("img0.png", "img3.png")
    for key in ("pcc_manip_target", "ssim_manip_target", "mse_manip_target", "pcc_manip_orig", "ssim_orig_target",
                "max_dp", "l2", "linf"):
        assert isinstance(rec[key], float), key
    assert rec["iterations"] == 6 and isinstance(rec["top1_kept"], bool)
    assert summary.top1_kept_rate == pytest.approx(np.mean([r["top1_kept"] for r in records]))
    assert summary.means["pcc_manip_target"] == pytest.approx(np.mean([r["pcc_manip_target"] for r in records]))
    saved = torch.load(out / rec["files"]["tensors"], weights_only=True)
    assert {"x", "x_adv", "original_map", "target_map", "manipulated_map", "target_explanation"} <= set(saved)
    assert saved["x"].shape == (1, 12, 12) and saved["manipulated_map"].shape == (12, 12)
    assert (out / rec["files"]["figure"]).stat().st_size > 1000
    assert json.loads((out / "summary.json").read_text())["n_pairs"] == 5

    # an interrupted write leaves half a line: it is dropped and that pair recomputed, once
    text = (out / "results.jsonl").read_text()
    (out / "results.jsonl").write_text(text[: len(text) - len(lines[-1]) // 2 - 1])
    with pytest.warns(UserWarning, match="incomplete last line"):
        again = run_campaign(model, "input_x_gradient", pairs, out, **CAMPAIGN)
    lines2 = (out / "results.jsonl").read_text().splitlines()
    assert again.n_new == 1 and len(lines2) == 5 and lines2[:4] == lines[:4]
    assert len({json.loads(line)["pair_id"] for line in lines2}) == 5
    assert run_campaign(model, "input_x_gradient", pairs, out, **CAMPAIGN).n_new == 0
    assert len(read_results(out / "results.jsonl")) == 5

    with pytest.raises(InputError, match="other settings"):
        run_campaign(model, "input_x_gradient", pairs, out, **{**CAMPAIGN, "iterations": 7})
    fresh = run_campaign(model, "input_x_gradient", pairs, out, resume=False, **{**CAMPAIGN, "batch_size": 5})
    assert fresh.n_new == 5 and len((out / "results.jsonl").read_text().splitlines()) == 5


def test_pairs_from_dataset(digits):
    pairs = pairs_from_dataset(digits, 20, seed=4)
    assert len(pairs) == 20 and len(set(pairs.originals)) == 20
    assert all(lo != lt for lo, lt in pairs.labels)
    assert all(int(digits.y[int(o)]) != int(digits.y[int(t)]) for o, t in zip(pairs.originals, pairs.targets))
    assert pairs_from_dataset(digits, 5, seed=4).ids == pairs.ids[:5]  # a larger campaign extends a smaller one
    assert pairs_from_dataset(digits, 5, seed=5).ids != pairs.ids[:5]
    xo, xt = pairs.images([0, 1])
    assert xo.shape == (2, 1, 8, 8) and torch.equal(xo[0], digits.x[int(pairs.originals[0])])


def test_campaign_csv_errors(image_dir, tmp_path):
    with pytest.raises(DataError, match="no such file"):
        pairs_from_csv(tmp_path / "absent.csv")
    (tmp_path / "cols.csv").write_text("original,tgt\nimg0.png,img1.png\n")
    with pytest.raises(DataError, match="missing column.*target.*found: original, tgt"):
        pairs_from_csv(tmp_path / "cols.csv", image_dir)
    (tmp_path / "gone.csv").write_text("original,target\nimg0.png,nope1.png\nnope2.png,img1.png\nimg2.png,img3.png\n")
    with pytest.raises(DataError, match="2 image file.*missing.*nope1.png, nope2.png"):
        pairs_from_csv(tmp_path / "gone.csv", image_dir)
    with pytest.raises(DataError, match=r"do not match the model input 8×8.*img0.png \(12×12\)"):
        pairs_from_csv(image_dir / "pairs.csv", image_shape=(1, 8, 8))
    Image.new("L", (10, 12)).save(image_dir / "odd.png")
    (tmp_path / "odd.csv").write_text("original,target\nimg0.png,odd.png\n")
    with pytest.raises(DataError, match=r"odd.png \(12×10\)"):
        pairs_from_csv(tmp_path / "odd.csv", image_dir)
    # the model must accept the images
    pairs = pairs_from_csv(image_dir / "pairs.csv")
    with pytest.raises(InputError, match=r"does not accept the pair images of shape \(1, 12, 12\)"):
        run_campaign(make_cnn(size=8), "gradient", pairs, tmp_path / "bad", iterations=1)
    with pytest.raises(InputError, match="unknown attack option"):
        run_campaign(make_cnn(size=12), "gradient", pairs, tmp_path / "bad", iteration=1)
