"""Several diverse counterfactuals per input (n_per_input, diversity) and a region mask (issue 20)."""
from __future__ import annotations

import copy
import json

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


def test_per_input_seeds_make_an_inputs_starts_independent_of_the_batch(digits):
    """seed= one int per input: input i's K counterfactuals are the same whether it is searched alone or beside
    others (float64: rows interact only within their group, so the batched search equals the single one to
    rounding, 1e-10), and the start noise differs between inputs with different seeds."""
    data, clf = digits
    x = data.x[data.y == 4][:3].double()
    kw = dict(space="pixel", lr=2e-2, max_steps=60, n_per_input=3, diversity=1.0, record_path=2)
    together = counterfactual(clf, x, 9, seed=[11, 12, 13], **kw)
    alone = counterfactual(clf, x[1:2], 9, seed=[12], **kw)
    assert torch.equal(together.path[3:6, 0], alone.path[:, 0])  # the starts: drawn from the input's own seed
    assert torch.allclose(together.x_cf[3:6], alone.x_cf, atol=1e-10, rtol=0)
    assert torch.equal(together.steps[3:6], alone.steps)
    # one int for the call still works, and a wrong number of seeds is refused before the search
    counterfactual(clf, x, 9, seed=5, **kw)
    with pytest.raises(InputError, match="one per input"):
        counterfactual(clf, x, 9, seed=[1, 2], **kw)


def test_diversity_and_outside_mask_against_direct_computation(digits):
    """evaluate's per-input diversity (mean pairwise L2 of the K images and latent codes) and the share of the
    change outside the mask, against a direct loop (float64)."""
    from manifex.counterfactuals.evaluate import diversity, evaluate

    data, clf = digits
    gen = AffineSigmoid().double()
    x = data.x[data.y == 4][:2].double()
    mask = torch.zeros(1, 8, 8, dtype=torch.float64)
    mask[:, 1:7, 2:6] = 1
    r = counterfactual(clf, x, 9, generator=gen, lr=5e-2, max_steps=40, n_per_input=3, mask=mask)
    d = diversity(r)
    for g in range(2):
        rows = range(3 * g, 3 * g + 3)
        pairs = [(a, b) for a in rows for b in rows if a < b]
        want_x = sum(float((r.x_cf[a] - r.x_cf[b]).norm()) for a, b in pairs) / 3
        want_z = sum(float((r.z_cf[a] - r.z_cf[b]).norm()) for a, b in pairs) / 3
        assert d["pixel"][g] == pytest.approx(want_x, rel=1e-12) and d["latent"][g] == pytest.approx(want_z, rel=1e-12)
    out = evaluate({"latent": r}, mask=mask)
    for i, row in enumerate(out["per_example"]["latent"]):
        delta = (r.x_cf[i] - r.x[i]).abs()
        assert row["outside_mask"] == pytest.approx(float((delta * (1 - mask)).sum() / delta.sum()), rel=1e-12)
    s = out["summary"]["latent"]["diversity"]
    assert s["pixel"]["n"] == 2 and s["pixel"]["mean"] == pytest.approx(float(d["pixel"].mean()), rel=1e-12)
    with pytest.raises(InputError, match="n_per_input"):
        diversity(counterfactual(clf, x, 9, generator=gen, lr=5e-2, max_steps=2))


# ------------------------------------------------------------------------------------------------ the campaign
def _campaign_config(**change):
    from manifex.counterfactuals.experiment import CounterfactualConfig

    # LeNet after 3 epochs, lr 0.05, stop at 0.9: pixel searches end within 11-25 steps on digits8 (4 → 9)
    return CounterfactualConfig(**{"dataset": "digits8", "classifier_epochs": 3, "spaces": ("pixel",), "n": 3,
                                   "max_steps": 150, "lr_pixel": 0.05, "stop_prob": 0.9, "im_epochs": 0, "svm_max": 300,
                                   "per_input": 3, **change})


@pytest.mark.slow
def test_campaign_writes_k_per_image_more_diverse_than_independent_runs_and_resumes(tmp_path):
    """--per-input 3 in the campaign: every record holds 3 counterfactuals (metrics and tensors), the summary the
    per-image diversity, larger than that of 3 independent searches (diversity 0, the same starts) for every image;
    the report shows them; a resumed run keeps them, and an image recomputed alone starts from the same points."""
    from manifex.counterfactuals.experiment import run_campaign
    from manifex.counterfactuals.report import write_report
    from manifex.models import ModelCache
    from manifex.runs import safe_torch_load

    cache = ModelCache(tmp_path / "c")
    res = run_campaign(_campaign_config(batch_size=3), tmp_path / "out", cache=cache, progress=False)
    indep = run_campaign(_campaign_config(batch_size=3, diversity=0.0), tmp_path / "indep", cache=cache, progress=False)
    assert [r["index"] for r in res.records] == [r["index"] for r in indep.records]
    for rec, other in zip(res.records, indep.records):
        assert isinstance(rec["pixel"], list) and len(rec["pixel"]) == 3
        t = safe_torch_load(tmp_path / "out" / rec["files"]["tensors"])
        assert t["x_cf_pixel"].shape == (3, 1, 8, 8) and t["path_pixel"].shape[:2] == (3, 8)
        assert all(m["success"] for m in rec["pixel"] + other["pixel"])
        assert rec["diversity"]["pixel"]["pixel"] > other["diversity"]["pixel"]["pixel"]
        assert rec["diversity"]["pixel"]["latent"] is None  # pixel space has no latent code
    s = res.summary["pixel"]
    assert s["n"] == 9 and s["diversity"]["pixel"]["n"] == 3 and s["diversity"]["latent"] is None
    assert s["diversity"]["pixel"]["mean"] > indep.summary["pixel"]["diversity"]["pixel"]["mean"]
    write_report(res)
    html = (tmp_path / "out" / "report.html").read_text()
    assert (tmp_path / "out" / "diverse.png").is_file() and "Several counterfactuals per image" in html
    assert "diversity: images" in html and "× 3 counterfactuals" in html

    # resume: nothing new and the same records; an image dropped from results.jsonl is recomputed alone (batch
    # size 1) from the same starts (seeded by its index, not by its batch)
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    again = run_campaign(_campaign_config(batch_size=3), tmp_path / "out", cache=cache, progress=False)
    assert again.n_new == 0 and (tmp_path / "out" / "results.jsonl").read_text().splitlines() == lines
    dropped = json.loads(lines[1])
    before = safe_torch_load(tmp_path / "out" / dropped["files"]["tensors"])
    (tmp_path / "out" / "results.jsonl").write_text("\n".join([lines[0], lines[2]]) + "\n")
    resumed = run_campaign(_campaign_config(batch_size=1), tmp_path / "out", cache=cache, progress=False)
    assert resumed.n_new == 1 and [r["index"] for r in resumed.records] == [r["index"] for r in res.records]
    rec = next(r for r in resumed.records if r["id"] == dropped["id"])
    assert len(rec["pixel"]) == 3
    after = safe_torch_load(tmp_path / "out" / rec["files"]["tensors"])
    assert torch.equal(after["path_pixel"][:, 0], before["path_pixel"][:, 0])


@pytest.mark.slow
def test_campaign_mask_confines_the_change(tmp_path):
    """--mask 1:7,2:6 in pixel space: nothing outside changes (the share of the change outside is 0 for every
    counterfactual), the summary and the report give that share, and the box is recorded in the settings."""
    from manifex.counterfactuals.experiment import run_campaign
    from manifex.counterfactuals.report import write_report
    from manifex.models import ModelCache
    from manifex.runs import safe_torch_load

    res = run_campaign(_campaign_config(per_input=2, mask="1:7,2:6"), tmp_path / "out", cache=ModelCache(tmp_path / "c"),
                       progress=False)
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[1:7, 2:6] = True
    for rec in res.records:
        t = safe_torch_load(tmp_path / "out" / rec["files"]["tensors"])
        delta = t["x_cf_pixel"] - t["x"]
        assert torch.equal(delta[:, :, ~inside], torch.zeros_like(delta[:, :, ~inside]))
        assert (delta.abs().amax(dim=(1, 2, 3)) > 0).all()
        assert all(m["outside_mask"] == 0.0 for m in rec["pixel"])
    assert res.summary["pixel"]["all"]["outside_mask"]["mean"] == 0.0
    write_report(res)
    assert "change outside the mask" in (tmp_path / "out" / "report.html").read_text()
    assert json.loads((tmp_path / "out" / "experiment.json").read_text())["settings"]["mask"] == "box 1:7,2:6"


@pytest.mark.parametrize("change,message", [
    ({"per_input": 0}, "per_input"), ({"diversity": -1.0}, "diversity"), ({"mask": "0:0,0:8"}, "empty box"),
    ({"mask": "0:9,0:8"}, "beyond the 8x8"), ({"mask": "rows 2-6"}, "neither a box"), ({"mask": "nope.npy"}, "no such file"),
    ({"mask": "ZEROS"}, "zero everywhere"), ({"mask": "WRONG"}, "shape"), ({"mask": "HALF2"}, r"\[0, 1\]"),
])
def test_campaign_refuses_bad_diversity_and_mask_options_before_training(tmp_path, monkeypatch, change, message):
    import numpy as np

    import manifex.models.zoo as zoo
    from manifex.counterfactuals.experiment import run_campaign
    from manifex.models import ModelCache

    def trained(*args, **kwargs):
        raise AssertionError("a model was trained before the error")

    monkeypatch.setattr(zoo, "fit_classifier", trained)
    monkeypatch.setattr(zoo, "fit_generative", trained)
    arrays = {"ZEROS": np.zeros((8, 8)), "WRONG": np.ones((7, 8)), "HALF2": np.full((8, 8), 2.0)}
    if change.get("mask") in arrays:
        path = tmp_path / f"{change['mask']}.npy"
        np.save(path, arrays[change["mask"]])
        change = {"mask": str(path)}
    with pytest.raises(InputError, match=message):
        run_campaign(_campaign_config(**change), tmp_path / "out", cache=ModelCache(tmp_path / "c"))
    # nothing written (a mask checked against the images' shape is refused after the folder's writability check)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_options_that_change_nothing_stay_out_of_the_settings_guard():
    """One counterfactual per image, no mask: the guarded settings are those of the plain search (a folder made before
    these options existed still resumes); with them, they are guarded (the mask as its content)."""
    from manifex.counterfactuals.experiment import CounterfactualConfig

    new = {"per_input", "diversity", "spread", "mask", "mask_weight"}
    assert not new & set(CounterfactualConfig(diversity=3.0, mask_weight=1.0).results_settings())
    d = CounterfactualConfig(per_input=2, mask="0:4,0:4").results_settings()
    assert d["per_input"] == 2 and d["diversity"] == 1.0 and d["mask"] == "box 0:4,0:4" and d["mask_weight"] == 10.0


def test_findings_count_counterfactuals_not_images_with_k_per_image():
    """With K per image the success rates and the paired numbers count counterfactuals (the summary's n is N·K):
    the findings say so instead of "of images"."""
    from manifex.counterfactuals.report import findings

    s = {"latent": {"success_rate": 0.25}, "pixel": {"success_rate": 1.0},
         "paired": {"n": 3, "svm": {"latent": 0.0, "pixel": 1.0}, "knn_vote": {"latent": 0.5, "pixel": 1.0}}}
    plain, k3 = findings(s, ["latent", "pixel"]), findings(s, ["latent", "pixel"], per_input=3)
    assert plain[0].endswith("25% of images, pixel ones for 100%.") and "On the 3 images where" in plain[1]
    assert k3[0].endswith("25%, pixel ones for 100% (3 per image, each counted).") and "of images" not in k3[0]
    assert "3 counterfactual pairs (image, k)" in k3[1]


@pytest.mark.slow
def test_campaign_latent_space_k_per_image_with_a_mask(tmp_path):
    """Latent space (a VAE, 1 epoch) with K = 2 and a mask: each of an image's counterfactuals gets every latent
    metric (tangent fraction at its image's tangent space, the share outside the mask), the image its latent and
    pixel diversity; the generator's spectrum stays one per image."""
    from manifex.counterfactuals.experiment import run_campaign
    from manifex.models import ModelCache

    res = run_campaign(_campaign_config(spaces=("latent",), generator="vae", generator_epochs=1, per_input=2, max_steps=5,
                                        n=2, mask="0:8,0:4"), tmp_path / "out", cache=ModelCache(tmp_path / "c"),
                       progress=False)
    for rec in res.records:
        assert len(rec["latent"]) == 2 and len(rec["singular_values"]) > 0
        for m in rec["latent"]:
            assert {"tangent_fraction", "outside_mask", "recon_error", "svm"} <= set(m)
            assert 0 <= m["outside_mask"] <= 1
        d = rec["diversity"]["latent"]
        assert d["latent"] > 0 and d["pixel"] > 0
    s = res.summary["latent"]
    assert s["n"] == 4 and s["diversity"]["latent"]["n"] == 2 and "outside_mask" in s["all"]
