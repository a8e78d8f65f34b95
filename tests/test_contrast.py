"""Class contrasting: batched hyperplanes against the research's per-pair loop, their orientation, the
per-class activation data, contrastive concepts (sign of the mask, seed_compat), the shifting test (t = 0 is
the identity, the swap rule, hooks and state restored) and the patch test, and every bad input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from manifex.concepts import nmf
from manifex.concepts.basis import predict_classes
from manifex.concepts.contrast.hyperplanes import (
    check_pair,
    class_activation_data,
    contrastive_concepts,
    fit_ood_filter,
    hyperplane_init,
    hyperplane_loop,
    train_hyperplanes,
)
from manifex.concepts.contrast.shift import T_GRID, patch_test, paste, random_directions, shift_probabilities, shifted_layer, shifting_test, swap
from manifex.data import load_digits8
from manifex.errors import InputError, ModelError
from _tiny_models import tiny_resnet

@pytest.fixture(scope="module")
def digits():
    d = load_digits8()
    return d.x[d.y < 4][:300]


@pytest.fixture(scope="module")
def hyperplanes(digits):
    model = tiny_resnet()
    data = class_activation_data(model, digits, "blocks.1", images_per_class=20, relevance_options={"n_samples": 2})
    return data, train_hyperplanes(data)


def blobs(C=4, c=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(C, c, generator=g, dtype=dtype)
    return [centres[k] + 0.8 * torch.randn(20 + 5 * k, c, generator=g, dtype=dtype) for k in range(C)]


# ------------------------------------------------------------------------------------------------ hyperplanes
def test_batched_hyperplanes_equal_per_pair_loop():
    vecs = blobs()
    batched = train_hyperplanes(vecs, epochs=40)
    loop = hyperplane_loop(vecs, epochs=40)
    assert batched.trained.sum() == 12 and not batched.trained.diagonal().any()
    torch.testing.assert_close(batched.normals, loop.normals, atol=1e-6, rtol=0)
    torch.testing.assert_close(batched.biases, loop.biases, atol=1e-6, rtol=0)
    torch.testing.assert_close(batched.accuracy, loop.accuracy, atol=1e-12, rtol=0, equal_nan=True)
    # a subset of pairs trains only those pairs, with the same result
    sub = train_hyperplanes(vecs, epochs=40, pairs=[(2, 0), (1, 3)])
    assert sub.trained.sum() == 2
    torch.testing.assert_close(sub.normals[2, 0], loop.normals[2, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sub.normals[1, 3], loop.normals[1, 3], atol=1e-6, rtol=0)
    assert sub.normals[0, 1].abs().sum() == 0 and torch.isnan(sub.accuracy[0, 1])


def test_hyperplane_orientation_and_accuracy():
    """normals[i, j] points from i toward j: j's rows lie on the positive side; separable blobs → accuracy 1."""
    g = torch.Generator().manual_seed(1)
    vecs = [torch.randn(30, 5, generator=g, dtype=torch.float64) * 0.1 + shift for shift in (0.0, 3.0, -3.0)]
    vecs[1][:, 0] += 3.0
    h = train_hyperplanes(vecs, epochs=300, lr=0.1)
    for i in range(3):
        for j in range(3):
            if i == j:
                continue
            w, b = h.pair(i, j)
            assert float((vecs[j] @ w + b).mean()) > 0 > float((vecs[i] @ w + b).mean())
            assert h.accuracy[i, j] == 1.0
    assert h.mean_accuracy() == 1.0


def test_hyperplane_init_is_nn_linear_range_and_seeded():
    W, b = hyperplane_init(3, 16, seed=5)
    assert W.abs().max() <= 0.25 and b.abs().max() <= 0.25
    torch.testing.assert_close(hyperplane_init(3, 16, seed=5)[0], W)
    assert not torch.equal(hyperplane_init(3, 16, seed=6)[0], W)


def test_hyperplane_errors():
    vecs = blobs(C=3)
    with pytest.raises(InputError, match="itself"):
        train_hyperplanes(vecs, pairs=[(1, 1)])
    with pytest.raises(InputError, match="class 7"):
        train_hyperplanes(vecs, pairs=[(0, 7)])
    with pytest.raises(InputError, match="at least 2"):
        train_hyperplanes(vecs[:1])
    bad = [v.clone() for v in vecs]
    bad[1][0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        train_hyperplanes(bad)
    with pytest.raises(InputError, match="no rows"):
        train_hyperplanes([vecs[0], vecs[1][:0]])
    # classes in different dtypes are refused with the conversion to make (not silently cast to the first's)
    with pytest.raises(InputError, match=r"class data 1 is torch.float32 .* convert them to one dtype"):
        train_hyperplanes([vecs[0], vecs[1].float(), vecs[2]])
    with pytest.raises(InputError, match="channels|like the others"):
        train_hyperplanes([vecs[0], vecs[1][:, :3], vecs[2]])
    for init, msg in ((torch.zeros(3, 3, 6), "pair of tensors"), ((torch.zeros(3, 3, 5), torch.zeros(3, 3)), r"init must be \(W"),
                      ((torch.full((3, 3, 6), float("nan")), torch.zeros(3, 3)), "finite")):
        with pytest.raises(InputError, match=msg):
            train_hyperplanes(vecs, init=init)
    h = train_hyperplanes(vecs, pairs=[(0, 1)], epochs=2)
    with pytest.raises(InputError, match="not trained"):
        h.pair(1, 0)
    with pytest.raises(InputError, match="itself"):
        h.pair(2, 2)
    with pytest.raises(InputError, match="class 9"):
        h.pair(0, 9)


# ------------------------------------------------------------------------------------------------ activation data
def test_class_activation_data_keeps_high_relevance_positions(digits):
    """relevance="none": kept rows are exactly the positions whose channel-mean activation > 0.25 × the image's max."""
    model = tiny_resnet()
    data = class_activation_data(model, digits, "blocks.1", classes=[1, 2], images_per_class=5, relevance="none")
    assert data.classes == [1, 2] and data.channels == 12
    preds = predict_classes(model, digits)
    for k, cls in enumerate(data.classes):
        idx = data.image_indices[k]
        assert (preds[idx] == cls).all() and len(idx) == 5
        with torch.no_grad():
            a = model.blocks[1](model.blocks[0](model.stem(digits[idx])))
        r = a.mean(1).flatten(1)
        keep = r > 0.25 * r.max(1, keepdim=True).values
        expect = a.permute(0, 2, 3, 1).reshape(5, -1, 12)[keep]
        torch.testing.assert_close(data.vectors[k], expect)
    X, counts = data.padded()
    assert X.shape == (2, int(counts.max()), 12)


def test_class_activation_data_negative_relevance_falls_back_to_the_range(digits):
    """An image whose relevance is ≤ 0 everywhere (the research cut τ·max keeps nothing) is cut at
    min + τ·(max − min); gradient × activation with negative head weights makes every relevance ≤ 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        model[4].weight.copy_(torch.tensor([[-1.0, -0.5, -2.0], [-3.0, -3.0, -3.0]]))
        model[4].bias.copy_(torch.tensor([1.0, 0.0]))  # every image predicted 0
    x = digits[:6]
    data = class_activation_data(model, x, "1", classes=[0], images_per_class=6, relevance="gradient_x_activation")
    assert data.fallback == [6]
    with torch.no_grad():
        a = model[1](model[0](x))
    r = (a * model[4].weight[0][None, :, None, None] / 64).mean(1).flatten(1)
    lo, hi = r.min(1, keepdim=True).values, r.max(1, keepdim=True).values
    keep = r > lo + 0.25 * (hi - lo)
    torch.testing.assert_close(data.vectors[0], a.permute(0, 2, 3, 1).reshape(6, -1, 3)[keep])


class _Inf(nn.Module):
    def forward(self, x):
        return x * float("inf")


def test_nan_inf_activations_are_refused(digits):
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), _Inf(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)).eval()
    h = train_hyperplanes(blobs(C=2, c=3), epochs=1)
    h.layer = "2"
    with pytest.raises(ModelError, match="NaN/inf activations"):
        class_activation_data(model, digits[:8], "2")
    with pytest.raises(ModelError, match="NaN/inf activations"):
        contrastive_concepts(model, digits[:8], h, 0, 1)


def test_class_activation_data_errors(digits):
    model = tiny_resnet()
    with pytest.raises(InputError, match="unknown layer"):
        class_activation_data(model, digits, "blocks.7")
    with pytest.raises(InputError, match="threshold"):
        class_activation_data(model, digits, "blocks.1", threshold=1.5)
    with pytest.raises(InputError, match=r"\[0, 3\]"):
        class_activation_data(model, digits, "blocks.1", classes=[4])
    bad = digits.clone()
    bad[3, 0, 2, 2] = float("inf")
    with pytest.raises(InputError, match="NaN/inf"):
        class_activation_data(model, bad, "blocks.1")


# ------------------------------------------------------------------------------------------------ contrastive concepts
def _acts_rows(model, x):
    with torch.no_grad():
        a = model.blocks[1](model.blocks[0](model.stem(x)))
    return a.permute(0, 2, 3, 1).reshape(-1, a.shape[1])


@pytest.mark.parametrize("seed_compat", [False, True])
def test_contrastive_concepts_mask_toward_a(digits, hyperplanes, seed_compat):
    model = tiny_resnet()
    _, h = hyperplanes
    cc = contrastive_concepts(model, digits, h, 0, 2, n_components=3, images_per_class=10, seed_compat=seed_compat)
    R = _acts_rows(model, digits[cc.basis.image_indices[0]])
    w, b = h.pair(0, 2)
    m = torch.relu(R @ -w + (b if seed_compat else -b))  # toward A: both negated (the seed negated only w)
    X = R * m[:, None]
    _, H = nmf(X, 3)
    torch.testing.assert_close(cc.vectors, H)
    assert cc.basis.classes == [0] and cc.basis.options["contrast"] == [0, 2]
    assert cc.mask_fraction == pytest.approx(float((m > 0).float().mean()))


def test_contrastive_concepts_errors_and_ood(digits, hyperplanes):
    model = tiny_resnet()
    data, h = hyperplanes
    with pytest.raises(InputError, match="itself"):
        contrastive_concepts(model, digits, h, 1, 1)
    with pytest.raises(InputError, match="out of range"):
        contrastive_concepts(model, digits, h, 0, 4)
    with pytest.raises(InputError, match="out of range"):
        contrastive_concepts(model, digits, h, -1, 2)
    ood = fit_ood_filter(data, n_components=2, classes=[0])
    keep_all = contrastive_concepts(model, digits, h, 0, 2, n_components=3, images_per_class=10,
                                    ood=type(ood)(ood.mixtures, threshold=-float("inf")))
    plain = contrastive_concepts(model, digits, h, 0, 2, n_components=3, images_per_class=10)
    assert keep_all.ood_kept == 1.0
    torch.testing.assert_close(keep_all.vectors, plain.vectors)
    strict = contrastive_concepts(model, digits, h, 0, 2, n_components=3, images_per_class=10, ood=ood)
    assert 0 < strict.ood_kept < 1


def test_check_pair():
    assert check_pair(1, 2, 3) == (1, 2)
    for a, b, msg in ((1, 1, "itself"), (0, 3, "out of range"), (-1, 0, "out of range"), (True, 1, "int class")):
        with pytest.raises(InputError, match=msg):
            check_pair(a, b, 3)


# ------------------------------------------------------------------------------------------------ shifting test
def test_shift_at_t0_leaves_output_unchanged_and_state_restored(digits):
    model = tiny_resnet()
    x = digits[:16]
    with torch.no_grad():
        ref = model(x)
    before = {n: dict(m._forward_hooks) for n, m in model.named_modules()}
    w = torch.randn(12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), shifted_layer(model, "blocks.1", 0.0 * w):
        out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)  # blocks.1 ends in a ReLU, so ReLU(a + 0) = a
    P = shift_probabilities(model, x, "blocks.1", torch.stack([w, -w]), [0.0, 0.0], batch_size=7)
    torch.testing.assert_close(P[:, :, :].float(), torch.softmax(ref, 1).mean(0).expand(2, 2, 4), atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), shifted_layer(model, "blocks.1", w):
        raise RuntimeError("boom")
    assert {n: dict(m._forward_hooks) for n, m in model.named_modules()} == before
    assert not model.training


@pytest.mark.parametrize("layer", ["blocks.1", "blocks.1.conv1"])  # conv1: the block's skip connection refuses reuse
@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_shift_probabilities_equal_a_plain_hook(digits, layer, reuse_prefix):
    """Batched over directions × t × images (prefix reused or not) = one plain hook per (direction, t)."""
    model = tiny_resnet()
    x = digits[:10]
    dirs = random_directions(torch.ones(12), 2, seed=3)
    ts = [0.5, 2.0, 20.0]
    P = shift_probabilities(model, x, layer, dirs, ts, batch_size=8, reuse_prefix=reuse_prefix)
    module = dict(model.named_modules())[layer]
    for d in range(2):
        for k, t in enumerate(ts):
            h = module.register_forward_hook(lambda m, i, o: torch.relu(o + t * dirs[d][None, :, None, None]))
            with torch.no_grad():
                p = torch.softmax(model(x).double(), 1).mean(0)
            h.remove()
            torch.testing.assert_close(P[d, k], p, atol=1e-6, rtol=0)


def test_random_directions_have_the_norm():
    w = torch.arange(1.0, 9.0)
    r = random_directions(w, 5, seed=0)
    torch.testing.assert_close(r.norm(dim=1), w.norm().expand(5))
    torch.testing.assert_close(random_directions(w, 5, seed=0), r)


def test_swap_rule_reads_p_a_at_the_same_t():
    p_b = torch.tensor([0.1, 0.3, 0.6, 0.55])
    # p(A) one step early (0.7) would refuse this swap; at the same t it is 0.2 → a swap
    assert swap(torch.tensor([0.9, 0.7, 0.2, 0.4]), p_b) == (True, 2)
    assert swap(torch.tensor([0.9, 0.7, 0.65, 0.4]), p_b) == (False, 2)   # p(A) ≥ p(B) at the argmax
    assert swap(torch.tensor([0.9, 0.7, 0.2, 0.4]), p_b * 0.5) == (False, 2)  # max p(B) ≤ 0.5


def test_shifting_test_along_w_ab_vs_random(digits, hyperplanes):
    model = tiny_resnet()
    _, h = hyperplanes
    preds = predict_classes(model, digits)
    x0 = digits[preds == 0][:20]
    w, _ = h.pair(0, 2)
    r = shifting_test(model, x0, "blocks.1", w, 0, 2, n_random=6, seed=1)
    assert r.ts == list(T_GRID) and r.p_a.shape == (10,) and r.control_p_b.shape == (6, 10)
    torch.testing.assert_close(r.p_a[0].float(), torch.softmax(model(x0), 1)[:, 0].mean().detach(), atol=1e-6, rtol=0)
    assert r.swapped and float(r.p_b[-1]) > 0.9  # w_AB moves A's images to B
    assert r.norm == pytest.approx(float(w.norm()), rel=1e-6)
    rec = r.to_record()
    assert rec["swapped"] and len(rec["control_swapped"]) == 6


def test_shifting_test_errors(digits, hyperplanes):
    model = tiny_resnet()
    w, _ = hyperplanes[1].pair(0, 2)
    x = digits[:4]
    with pytest.raises(InputError, match="itself"):
        shifting_test(model, x, "blocks.1", w, 2, 2)
    with pytest.raises(InputError, match="out of range"):
        shifting_test(model, x, "blocks.1", w, 0, 10)
    with pytest.raises(InputError, match="unknown layer"):
        shifting_test(model, x, "block.1", w, 0, 2)
    with pytest.raises(InputError, match=r"\(channels,\)"):
        shifting_test(model, x, "blocks.0", w, 0, 2)
    with pytest.raises(InputError, match="NaN"):
        shifting_test(model, x, "blocks.1", w * float("nan"), 0, 2)
    with pytest.raises(InputError, match="finite"):
        shifting_test(model, x, "blocks.1", w, 0, 2, ts=[0.0, float("inf")])
    with pytest.raises(InputError, match="NaN/inf"):
        shifting_test(model, x * float("nan"), "blocks.1", w, 0, 2)
    assert all(not m._forward_hooks for m in model.modules())


# ------------------------------------------------------------------------------------------------ patch test
def test_patch_test_against_mean_colour(digits):
    model = tiny_resnet()
    preds = predict_classes(model, digits)
    x1, x0 = digits[preds == 1][:12], digits[preds == 0]
    patch = x0[0, :, 2:8, 1:7]
    res = patch_test(model, x1, patch, 0, 1, position=(2, 1))
    pasted = x1.clone()
    pasted[:, :, 2:8, 1:7] = patch
    with torch.no_grad():
        p = torch.softmax(model(pasted).double(), 1)
    assert res.p_a == pytest.approx(float(p[:, 0].mean()), abs=1e-9)
    assert res.position == (2, 1) and res.n_images == 12
    # a patch of the mean colour itself equals the control
    same = patch_test(model, x1, x1.mean((0, 2, 3))[:, None, None].expand(1, 3, 3).clone(), 0, 1)
    assert same.p_a == pytest.approx(same.control_p_a) and same.p_b == pytest.approx(same.control_p_b)
    assert same.position == (5, 5)
    with pytest.raises(InputError, match="outside"):
        paste(x1, patch, (4, 4))
    with pytest.raises(InputError, match="itself"):
        patch_test(model, x1, patch, 1, 1)
    with pytest.raises(InputError, match="out of range"):
        patch_test(model, x1, patch, 0, 5)


# ------------------------------------------------------------------------------------------------ CLI
SMALL = ["--dataset", "digits8", "--epochs", "1", "--layer", "blocks.1", "--images-per-class", "8", "--noise-samples", "2",
         "--random-directions", "3", "--components", "2", "--quiet"]


@pytest.fixture(scope="module")
def cli_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.mark.slow
def test_contrast_cli_end_to_end_and_resume(tmp_path, cli_cache):
    import json

    from click.testing import CliRunner

    from manifex.cli import main
    from manifex.runs import read_jsonl, safe_torch_load

    out = tmp_path / "run"
    args = ["contrast", *SMALL, "--class-pairs", "0:1,3:8", "--cache-dir", cli_cache, "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "swaps the prediction" in res.output and res.output.strip().splitlines()[-1].startswith("report:")
    metrics = json.loads((out / "metrics.json").read_text())
    s = metrics["summary"]
    assert s["n_pairs"] == 2 and s["n_control"] == 6 and 0 <= s["swap_rate"] <= 1 and len(s["mean_p_b"]) == len(T_GRID)
    assert metrics["concepts"]["a"] == 0 and metrics["concepts"]["b"] == 1
    assert metrics["model"]["source"] == "built-in" and metrics["model"]["fingerprint"]
    patches = metrics["concepts"]["patches"]
    assert [p["concept"] for p in patches] == [1, 2] and all(0 <= p["p_a"] <= 1 and 0 <= p["control_p_a"] <= 1 for p in patches)
    assert any("t = 0 leaves the output unchanged" in c for c in metrics["checks"])
    records = read_jsonl(out / "results.jsonl")
    assert [(r["a"], r["b"]) for r in records] == [(0, 1), (3, 8)]
    # the one layout: experiment.json claims, the hyperplanes artefact, the concepts unit with its tensors and figure
    experiment = json.loads((out / "experiment.json").read_text())
    assert experiment["command"] == "contrast" and experiment["settings"]["n_random"] == 3
    assert experiment["classes"] == {"contrasted": [0, 1, 3, 8]} and experiment["model"]["fingerprint"]
    assert [r["id"] for r in read_jsonl(out / "results-concepts.jsonl")] == ["concepts-0-1-c2-top8"]
    unit = out / "units" / "concepts-0-1-c2-top8"
    assert safe_torch_load(unit / "contrastive_concepts.pt")["vectors"].shape[0] == 2
    assert (unit / "contrastive_concepts.png").is_file() and not (out / "hyperplanes.pt").exists()
    assert not (out / "settings.json").exists()
    html = (out / "report.html").read_text()
    assert "shift.png" in html and "Why 0 rather than 1" in html and "hyperplane_accuracy.png" in html and "Patch test" in html
    assert "units/concepts-0-1-c2-top8/contrastive_concepts.png" in html
    hp = out / "artefacts" / "hyperplanes.pt"
    stamp = hp.stat().st_mtime_ns
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert len(read_jsonl(out / "results.jsonl")) == 2 and hp.stat().st_mtime_ns == stamp  # resumed
    # other settings on the same --out are refused before any work (the old pair records, made with 3 control
    # directions, would be kept under a config that says 5)
    res = CliRunner().invoke(main, [*args, "--random-directions", "5"])
    assert res.exit_code == 2 and "settings.n_random: 3 -> 5" in res.output, res.output
    assert hp.stat().st_mtime_ns == stamp
    # a pair with a new class is refused: every pair's hyperplane depends on the classes trained together
    res = CliRunner().invoke(main, [*args[:-6], "--class-pairs", "0:1,3:8,1:2", *args[-4:]])
    assert res.exit_code == 2 and "classes.contrasted: [0, 1, 3, 8] -> [0, 1, 2, 3, 8]" in res.output, res.output
    assert hp.stat().st_mtime_ns == stamp and len(read_jsonl(out / "results.jsonl")) == 2
    # a new pair of the same classes resumes: the two finished pairs are kept, one is added
    res = CliRunner().invoke(main, [*args[:-6], "--class-pairs", "0:1,3:8,1:0", *args[-4:]])
    assert res.exit_code == 0, res.output
    assert [(r["a"], r["b"]) for r in read_jsonl(out / "results.jsonl")] == [(0, 1), (3, 8), (1, 0)]
    assert hp.stat().st_mtime_ns == stamp
    # the contrastive concepts' settings name their unit: another value adds a unit, the pair records stay
    pairs = (out / "results.jsonl").read_bytes()
    i = args.index("--components")
    res = CliRunner().invoke(main, [*args[: i + 1], "3", *args[i + 2 :], "--concepts-pair", "3:8"])
    assert res.exit_code == 0, res.output
    assert [r["id"] for r in read_jsonl(out / "results-concepts.jsonl")] == ["concepts-0-1-c2-top8", "concepts-3-8-c3-top8"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["concepts"]["a"], metrics["concepts"]["b"], len(metrics["concepts"]["patches"])) == (3, 8, 3)
    assert "units/concepts-3-8-c3-top8/contrastive_concepts.png" in (out / "report.html").read_text()
    assert (out / "results.jsonl").read_bytes() == pairs and hp.stat().st_mtime_ns == stamp


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--class-pairs", "3:3"], "with itself"),
    (["--class-pairs", "0:12"], "out of range"),
    (["--pairs", "0-1"], "A:B class pairs"),
    (["--class-pairs", "0:1", "--random-pairs", "3"], "not both"),
    (["--class-pairs", "0:1", "--layer", "blocks.9"], "unknown layer 'blocks.9'"),
    (["--class-pairs", "0:1", "--components", "999"], "exceeds the"),
    (["--class-pairs", "0:1", "--concepts-pair", "2:2"], "with itself"),
    (["--class-pairs", "0:1", "--concepts-pair", "0:1,2:3"], "one A:B class pair"),
    (["--class-pairs", "0:1,0:1"], "pairs repeat"),
])
def test_contrast_cli_errors_come_before_training(tmp_path, args, message, monkeypatch):
    """Every mistake knowable from the options, the data and the untrained built-in network ends in one line, exit
    2, before any classifier is trained (the fit is patched to fail; the cache stays empty)."""
    from click.testing import CliRunner

    import manifex.models.zoo as zoo
    from manifex.cli import main

    def trained(*a, **k):
        raise AssertionError("a model was trained before the error")

    monkeypatch.setattr(zoo, "fit_classifier", trained)
    base = [a for a in SMALL]
    if "--layer" in args:
        i = base.index("--layer")
        del base[i : i + 2]
    if "--components" in args:
        i = base.index("--components")
        del base[i : i + 2]
    cache = tmp_path / "cache"
    res = CliRunner().invoke(main, ["contrast", *base, *args, "--cache-dir", str(cache), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert len([line for line in res.output.splitlines() if line.strip()]) <= 3  # click's usage lines + one message
    assert not any(p.suffix == ".pt" for p in cache.rglob("*"))


@pytest.mark.slow
def test_crafted_or_truncated_hyperplane_file_never_runs_code(tmp_path, cli_cache):
    """--out/artefacts/hyperplanes.pt is read back with weights_only=True: a pickle that would run code is never run,
    a truncated file neither; both are rebuilt (the artefact's key is checked), and the records are kept."""
    import pickle

    from click.testing import CliRunner

    from manifex.cli import main
    from manifex.runs import read_jsonl, safe_torch_load

    class Boom:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('ran')" % str(tmp_path / "pwned"),))

    out = tmp_path / "run"
    args = ["contrast", *SMALL, "--class-pairs", "0:1", "--cache-dir", cli_cache, "--out", str(out)]
    assert CliRunner().invoke(main, args).exit_code == 0
    hp = out / "artefacts" / "hyperplanes.pt"
    good = safe_torch_load(hp)
    records = (out / "results.jsonl").read_bytes()
    torch.save({"__key__": Boom(), "hyperplanes": Boom()}, hp, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "pwned").exists()
    rebuilt = safe_torch_load(hp)  # rebuilt, safe to load, the same hyperplanes (same seed, same data)
    torch.testing.assert_close(rebuilt["hyperplanes"]["normals"], good["hyperplanes"]["normals"])
    hp.write_bytes(hp.read_bytes()[: hp.stat().st_size // 2])
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    torch.testing.assert_close(safe_torch_load(hp)["hyperplanes"]["normals"], good["hyperplanes"]["normals"])
    assert (out / "results.jsonl").read_bytes() == records and len(read_jsonl(out / "results.jsonl")) == 1
