"""manifex audit: every system on one model, each stage its own experiment; one report and one metrics.json."""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from manifex.audit import STAGES, AuditConfig, audit, find_concept_layer
from manifex.audit.stages import (ECE_BINS, ManifoldConfig, ManifoldExperiment, ModelConfig, ModelExperiment,
                                  attackable_methods, calibration, model_checks)
from manifex.audit.summary import (MANIPULATION_GAIN, MPRT_LIMIT, WEAK_R2, recommendation, scorecard, stage_headline,
                                   stage_of)
from manifex.cli import main
from manifex.errors import InputError

QUICK = ["audit", "--dataset", "digits8", "--budget", "quick", "--epochs", "1", "--quiet"]

def _results(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("results*.jsonl"))}


@pytest.mark.slow
def test_quick_audit_runs_every_stage_and_a_rerun_adds_nothing(tmp_path):
    out = tmp_path / "audit"
    res = CliRunner().invoke(main, [*QUICK, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert f"report: {out / 'report.html'}" in res.output
    for stage in STAGES:
        assert (out / stage / "experiment.json").is_file(), stage
        assert (out / stage / "report.html").is_file(), stage
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["stages"]) == set(STAGES)
    assert all(s["status"] == "done" and s["headline"] for s in metrics["stages"].values())
    html = (out / "report.html").read_text()
    for stage in STAGES:
        assert f'href="{stage}/report.html"' in html
    # every verdict carries its number and its reference
    row = next(r for r in metrics["scorecard"] if r["method"] == "gradient")
    for q in ("aligned?", "faithful?", "manipulable?"):
        assert isinstance(row[q]["value"], float) and isinstance(row[q]["reference"], float) and row[q]["text"], q
    assert metrics["recommendation"] and metrics["recommendation"] in res.output
    # one model audited by every stage (the manifold stage has no classifier)
    prints = {json.loads((out / s / "experiment.json").read_text())["model"]["fingerprint"] for s in STAGES
              if s != "manifold"}
    assert len(prints) == 1
    # the quick budget ends without a FAILED check that is an artefact of the budget (the counterfactuals' flow is
    # exact; the VAE reconstructs better than the mean image)
    assert not [c for c in metrics["checks"] if c.startswith("FAILED")], metrics["checks"]
    # the model stage: accuracy against chance, ECE over 15 bins, the reliability diagram in its report
    model = metrics["stages"]["model"]["headline"]
    assert model["accuracy"] > model["chance"] and 0 <= model["ece"] <= 1 and model["ece_bins"] == 15
    assert 'src="reliability.png"' in (out / "model" / "report.html").read_text() and (out / "model" / "reliability.png").is_file()
    # the manifold stage measured the very generators the evaluate and counterfactual stages used (no second training)
    gens = json.loads((out / "manifold" / "metrics.json").read_text())["generators"]
    evaluate_claims = json.loads((out / "evaluate" / "experiment.json").read_text())
    assert gens["vae"]["fingerprint"] == evaluate_claims["generator"]["fingerprint"]
    cf_gen = json.loads((out / "counterfactual" / "metrics.json").read_text())["info"]["generator"]
    assert cf_gen["kind"] == "flow" and cf_gen["cached"] and cf_gen["train_seconds"] == gens["flow"]["train_seconds"]
    # the counterfactual section says what success (p(target) above the stop probability) and validity (argmax) mean
    assert metrics["stages"]["counterfactual"]["headline"]["stop_prob"] == 0.99
    assert "p(target) &gt; 0.99" in html and "validity (argmax = target)" in html
    assert gens["flow"]["round_trip_max"] < 1e-3 and gens["flow"]["bits_per_dim"] < gens["flow"]["uniform_bits_per_dim"]
    assert 0 < gens["vae"]["r2"] < 1 and gens["vae"]["recon_mse"] < gens["vae"]["mean_image_mse"]
    # every method of the evaluate stage attacked, each in its own folder, each with its number and reference
    attacked = metrics["stages"]["attack"]["headline"]["methods"]
    assert set(attacked) == {"gradient", "smoothgrad", "integrated_gradients"}
    assert all((out / f"attack-{m}" / "report.html").is_file() for m in ("smoothgrad", "integrated_gradients"))
    for r in metrics["scorecard"]:
        m = r["manipulable?"]
        assert m["value"] == attacked[r["method"]]["pcc_manip_target"] and m["reference"] == attacked[r["method"]]["pcc_orig_target"]
        assert r["sanity?"]["verdict"] in ("passes", "fails") and -1 <= r["sanity?"]["value"] <= 1
    before = _results(out)
    again = audit(AuditConfig(dataset="digits8", budget="quick", epochs=1), out, progress=False)
    assert all(sum(r.n_new.values()) == 0 for r in again.stages.values())
    assert _results(out) == before
    # other epochs: refused by the audit's own experiment.json in one line naming the key and the ways out, untrained
    refused = CliRunner().invoke(main, [*QUICK[:6], "2", "--quiet", "--out", str(out)])
    assert refused.exit_code == 2 and "settings.epochs" in refused.output and "--overwrite" in refused.output
    assert _results(out) == before


@pytest.mark.slow
def test_quick_audit_of_known_data_reports_the_known_manifold_and_audits_one_model(tmp_path):
    """known:digits8: every stage runs on the known manifold (built once, the shared cache's align default), audits
    the built-in classifier trained on its images (one fingerprint everywhere), the evaluate stage's VAE is the
    generating VAE (20 epochs whatever the budget), the manifold stage states the known dimension instead of estimating
    it, and no R² withholding or caution applies (the tangent spaces are exact)."""
    from manifex.data import load_dataset
    from manifex.models import ModelCache, state_fingerprint
    from manifex.models.known_manifold import KnownData, known_data
    from manifex.models.resolve import resolve_classifier

    out = tmp_path / "audit"
    res = CliRunner().invoke(main, [*QUICK[:2], "known:digits8", *QUICK[3:], "--out", str(out)])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["stages"]) == set(STAGES)
    assert all(s["status"] == "done" and s["headline"] for s in metrics["stages"].values())
    km, _ = known_data(load_dataset("digits8"), KnownData(), cache=ModelCache(), progress=False)  # a cache hit
    _, info = resolve_classifier(km.train, km.test, classifier="lenet", epochs=1, seed=0, progress=False)
    prints = {json.loads((out / s / "experiment.json").read_text())["model"]["fingerprint"] for s in STAGES
              if s != "manifold"}
    assert prints == {info.fingerprint} == {metrics["model"]["fingerprint"]}
    assert f"every stage audited the same model (weights fingerprint {info.fingerprint})" in metrics["checks"]
    assert any(c.startswith("known manifold: 6,000 + 1,000 images") for c in metrics["checks"]), metrics["checks"]
    vae = metrics["stages"]["manifold"]["headline"]["generators"]["vae"]
    assert vae["known"] is True and vae["dimension"] == 10 == vae["tangent_rank_min"] == vae["tangent_rank_max"]
    assert vae["r2"] is None and vae["epochs"] == 20
    gens = json.loads((out / "manifold" / "metrics.json").read_text())["generators"]
    generating = state_fingerprint(km.generative)
    assert gens["vae"]["fingerprint"] == generating
    assert json.loads((out / "evaluate" / "experiment.json").read_text())["generator"]["fingerprint"] == generating
    manifold_checks = json.loads((out / "manifold" / "metrics.json").read_text())["checks"]
    assert any(c.startswith("known manifold: dimension k = 10 exactly") for c in manifold_checks), manifold_checks
    assert "known manifold" in (out / "report.html").read_text()
    texts = [metrics["recommendation"], *(r["aligned?"]["text"] for r in metrics["scorecard"] if "aligned?" in r)]
    assert not any("read with care" in t or "withheld" in t for t in texts), texts
    assert all(r["aligned?"]["verdict"] != "withheld" for r in metrics["scorecard"] if "aligned?" in r)
    # the counterfactual stage measures distances to the known manifold
    assert any("distances to it are measured" in c for c in json.loads((out / "counterfactual" / "metrics.json").read_text())["checks"])


@pytest.mark.slow
def test_users_model_runs_through_the_audit(tmp_path, user_model):
    spec, weights = user_model
    out = tmp_path / "audit"
    res = CliRunner().invoke(main, [*QUICK, "--model", spec, "--weights", weights, "--out", str(out),
                                    "--stages", "evaluate,attack,concepts,contrast"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert "user_nets.py:build" in json.dumps(metrics["model"])
    assert "user_nets.py:build" in (out / "report.html").read_text()
    assert any("layer head.0" in c for c in metrics["checks"])  # found on the user's network
    for stage in ("evaluate", "attack", "concepts", "contrast"):
        record = json.loads((out / stage / "experiment.json").read_text())
        assert "user_nets.py:build" in json.dumps(record["model"]), stage
    assert not (out / "smooth").exists() and set(metrics["stages"]) == {"evaluate", "attack", "concepts", "contrast"}


def test_a_stage_that_cannot_run_is_skipped_with_its_reason(tmp_path):
    r = audit(AuditConfig(dataset="digits8", classifier="mlp", stages=("concepts", "contrast")), tmp_path / "a",
              progress=False)
    assert set(r.skipped) == {"concepts", "contrast"}
    assert all("2x2" in why for why in r.skipped.values())
    assert sum(c.startswith("FAILED: stage concepts skipped") for c in r.checks) == 1
    assert r.metrics["stages"]["contrast"] == {"status": "skipped", "reason": r.skipped["contrast"]}
    assert not (tmp_path / "a" / "concepts").exists()
    assert "Skipped: no layer" in r.report.read_text()


def test_unknown_stage_is_refused_before_any_data_or_training(tmp_path, monkeypatch):
    import manifex.models.resolve as resolve

    def boom(*a, **k):
        raise AssertionError("loaded data before checking the options")

    monkeypatch.setattr(resolve, "resolve_data", boom)
    res = CliRunner().invoke(main, [*QUICK, "--stages", "evaluate,nope", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--stages" in res.output and "nope" in res.output, res.output
    with pytest.raises(InputError, match="stages"):
        audit(AuditConfig(stages=("nope",)), tmp_path / "p")


def test_concept_layer_is_the_last_nonnegative_grid_and_model_state_is_kept():
    from manifex.models.classifiers import ClassifierConfig, build_classifier

    net = build_classifier(ClassifierConfig("resnet", (1, 8, 8), 10)).train()
    flags = [m.training for m in net.modules()]
    name, why = find_concept_layer(net, torch.rand(2, 1, 8, 8))
    assert name == "blocks.2" and "2, 2" in why  # the block, not the container blocks nor its last ReLU
    assert [m.training for m in net.modules()] == flags
    assert not any(m._forward_hooks for m in net.modules())
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    assert find_concept_layer(mlp, torch.rand(2, 1, 8, 8))[0] is None


def test_scorecard_verdicts_follow_their_stated_rules():
    ev = {"methods": {"a": {"TangentAlignment": 1.5, "ManifoldDeletion": 0.2, "MaxSensitivity": 0.3},
                      "b": {"TangentAlignment": 0.9, "ManifoldDeletion": 0.1, "MaxSensitivity": 0.5}},
          "alignment_q1": {"a": 1.1, "b": 0.7}, "start_probability": {"a": 0.9, "b": 0.9}}
    at = {"method": "a", "pcc_orig_target": 0.3, "pcc_manip_target": 0.3 + MANIPULATION_GAIN + 0.01,
          "top1_kept_rate": 1.0, "budget_linf": 8 / 255, "n_pairs": 4}
    stages = {"evaluate": {"headline": ev}, "attack": {"headline": at}}
    rows = {r["method"]: r for r in scorecard(stages)}
    assert rows["a"]["aligned?"]["verdict"] == "yes" and rows["b"]["aligned?"]["verdict"] == "no"
    assert rows["b"]["faithful?"]["verdict"] == "best" and rows["a"]["faithful?"]["verdict"] == "rank 2 of 2"
    assert rows["a"]["manipulable?"]["verdict"] == "yes" and rows["a"]["manipulable?"]["reference"] == 0.3
    assert rows["a"]["robust?"]["verdict"] == "most robust" and rows["b"]["robust?"]["reference"] == 0.3
    text = recommendation(list(rows.values()), stages)
    assert "b is the most faithful" in text and "a the most aligned" in text and "can be manipulated" in text
    at["pcc_manip_target"] = 0.3 + MANIPULATION_GAIN - 0.01
    assert {r["method"]: r for r in scorecard(stages)}["a"]["manipulable?"]["verdict"] == "not at this budget"
    ev["failed_checks"] = ["degenerate"]
    assert "withheld" in recommendation(scorecard(stages), stages)


@pytest.mark.slow
def test_a_module_given_in_python_is_left_as_found(tmp_path, user_model):
    from manifex.models.user import load_model

    net = load_model(*user_model).train()
    net.features[0].weight.requires_grad_(False)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    r = audit(AuditConfig(dataset="digits8", budget="quick", stages=("concepts", "attack")), tmp_path / "m", model=net,
              progress=False)
    assert set(r.metrics["stages"]) == {"attack", "concepts"} and not r.skipped
    assert all(m.training for m in net.modules())
    assert [p.requires_grad for p in net.parameters()] == [False, True, True, True]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())


def test_concept_layer_probe_follows_the_models_dtype_and_names_a_shape_mismatch():
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10)).double()
    assert find_concept_layer(conv, torch.rand(2, 1, 8, 8))[0] == "1"  # float32 data, float64 model
    with pytest.raises(InputError, match=r"\(2, 3, 8, 8\)"):
        find_concept_layer(conv, torch.rand(2, 3, 8, 8))
    assert not any(m._forward_hooks for m in conv.modules())


def test_budget_table_maps_every_stage_and_drops_quantus_metrics_when_it_is_missing(monkeypatch):
    import manifex.audit.plan as plan

    quick = plan.stage_configs(AuditConfig(budget="quick"), num_classes=10, layer="features", layout="canvas")
    assert list(dict.fromkeys(stage_of(k) for k in quick)) == list(STAGES)
    assert quick["counterfactual"].source == 4 and quick["contrast"].pairs == ((4, 9),)
    # one attack per evaluated method; the manifold stage measures the evaluate stage's VAE and the counterfactual's flow
    assert [quick[k].method for k in quick if stage_of(k) == "attack"] == ["gradient", "smoothgrad", "integrated_gradients"]
    assert quick["manifold"].vae_epochs == quick["evaluate"].generator_epochs
    assert quick["counterfactual"].generator == "flow" and quick["manifold"].flow_epochs == quick["counterfactual"].generator_epochs
    for budget in ("quick", "standard", "thorough"):  # every budget asks for the randomisation sanity check
        assert "MPRT" in plan.stage_configs(AuditConfig(budget=budget), num_classes=10, layer=None, layout="canvas")["evaluate"].metrics
    assert quick["attack"].budget == quick["smooth"].budget == 8 / 255
    standard = plan.stage_configs(AuditConfig(budget="standard"), num_classes=2, layer=None, layout="canvas")
    assert "concepts" not in standard and standard["counterfactual"].target == 1
    assert standard["evaluate"].n > quick["evaluate"].n and standard["attack"].n_pairs > quick["attack"].n_pairs
    monkeypatch.setattr(plan, "_has_quantus", lambda: False)
    notes: list[str] = []
    no_q = plan.stage_configs(AuditConfig(budget="standard"), num_classes=10, layer=None, layout="canvas", notes=notes)
    assert no_q["evaluate"].metrics == ("TangentAlignment", "ManifoldDeletion") and "Quantus" in notes[0]
    # a method the attack cannot differentiate is left out of the attack stage, with its reason in the notes
    notes = []
    some = plan.stage_configs(AuditConfig(budget="quick", stages=("attack",)), num_classes=10, layer=None, layout="canvas",
                              notes=notes, attackable=lambda ms: ([m for m in ms if m != "smoothgrad"], {"smoothgrad": "why"}))
    assert list(some) == ["attack", "attack-integrated_gradients"] and notes == ["attack: smoothgrad left out: why"]


# -- the model stage ---------------------------------------------------------------------------------------------------
def _ece_direct(conf, correct, bins):
    """ECE written out from its definition: bins (lo, hi], each weighted by its share of the examples."""
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i, c in enumerate(conf) if (lo < c <= hi) or (b == 0 and c == 0)]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            mean_conf = sum(conf[i] for i in members) / len(members)
            total += len(members) / len(conf) * abs(acc - mean_conf)
    return total


def test_ece_equals_its_direct_computation_over_15_equal_width_bins():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(500, 10, generator=g, dtype=torch.float64), 1)
    y = torch.randint(0, 10, (500,), generator=g)
    conf, pred = probs.max(1)
    cal = calibration(probs, y)
    # float64 throughout, and both sums run over the same 500 terms of size <= 1: agreement to 1e-12 is far above
    # the rounding error (~500 · 2^-52)
    assert cal["ece"] == pytest.approx(_ece_direct(conf.tolist(), (pred == y).tolist(), ECE_BINS), abs=1e-12)
    assert len(cal["bins"]) == ECE_BINS and sum(b["n"] for b in cal["bins"]) == 500
    # an exactly representable confidence on a bin edge belongs to the bin it closes: 0.5 with 4 bins → (0.25, 0.5]
    edge = calibration(torch.tensor([[0.5, 0.5, 0.0], [0.75, 0.25, 0.0]], dtype=torch.float64), torch.tensor([0, 1]), 4)
    assert [b["n"] for b in edge["bins"]] == [0, 1, 1, 0]
    assert edge["ece"] == pytest.approx(0.5 * 0.5 + 0.5 * 0.75)
    # a perfectly calibrated toy: confidence 0.8 and 80% correct
    p = torch.tensor([[0.8, 0.2]] * 10, dtype=torch.float64)
    assert calibration(p, torch.tensor([0] * 8 + [1] * 2))["ece"] == pytest.approx(0.0, abs=1e-15)


def _record(**over):
    r = {"num_classes": 3, "train_counts": [40, 40, 40], "test_counts": [10, 10, 10], "n_test": 30, "n_nonfinite": 0,
         "predicted_counts": [10, 10, 10], "logit_sd": 1.0, "accuracy": 0.9, "chance": 1 / 3}
    return {**r, **over}


def test_model_checks_name_imbalance_constant_degenerate_and_nonfinite_outputs():
    failed = lambda r: [c for c in model_checks(r) if c.startswith("FAILED")]  # noqa: E731
    assert failed(_record()) == []
    assert "class balance" in failed(_record(train_counts=[200, 40, 10]))[0] and "20.0×" in failed(_record(train_counts=[200, 40, 10]))[0]
    assert not failed(_record(train_counts=[100, 40, 10]))  # 10× is the limit itself
    assert "constant predictions" in failed(_record(predicted_counts=[30, 0, 0], accuracy=1 / 3))[0]
    assert any("classes [2] are never predicted" in c for c in failed(_record(predicted_counts=[15, 15, 0])))
    assert any("non-finite" in c and "3 of 30" in c for c in failed(_record(n_nonfinite=3)))
    assert any("held-out accuracy 40.0%" in c for c in failed(_record(accuracy=0.4)))  # chance 33% + a fifth of the way: 46.7%
    nothing = failed(_record(n_nonfinite=30, predicted_counts=[0, 0, 0], accuracy=None, logit_sd=None))
    assert len(nothing) == 1 and "30 of 30" in nothing[0]  # no finite output: said once, nothing else judged


class _Constant(nn.Module):
    """A classifier whose logits ignore the image (with ``nan``: NaN on every 50th image of a batch larger than the
    8 images of the pre-flight check, as a model that overflows on a few images only)."""

    def __init__(self, nan: bool):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([2.0] + [0.0] * 9))
        self.nan = nan

    def forward(self, x):
        out = self.bias.expand(len(x), 10).clone()
        if self.nan and len(x) > 8:
            out[::50] = float("nan")
        return out


def test_model_stage_flags_a_constant_model_and_leaves_it_as_found(tmp_path):
    from manifex.experiment import run_experiment

    net = _Constant(nan=False).train()
    net.bias.requires_grad_(False)
    r = run_experiment(ModelExperiment(), ModelConfig(dataset="digits8"), tmp_path / "m", model=net, progress=False)
    assert any(c.startswith("FAILED: constant predictions") for c in r.checks)
    # one bin holds every image: ECE = |accuracy − confidence| with confidence softmax([2, 0, …, 0])₀ = e²/(e² + 9)
    n, share = r.summary["n_test"], r.summary["test_counts"][0] / r.summary["n_test"]
    assert r.summary["predicted_counts"][0] == n
    assert r.summary["calibration"]["ece"] == pytest.approx(math.exp(2) / (math.exp(2) + 9) - share, abs=1e-6)
    assert net.training and not net.bias.requires_grad and not net._forward_hooks
    html = (tmp_path / "m" / "report.html").read_text()
    assert "Read with care" in html and "reliability.png" in html
    again = run_experiment(ModelExperiment(), ModelConfig(dataset="digits8"), tmp_path / "m", model=net, progress=False)
    assert again.n_new == {"model": 0} and again.summary == r.summary  # resumed: the record is re-read
    nan = run_experiment(ModelExperiment(), ModelConfig(dataset="digits8"), tmp_path / "n", model=_Constant(nan=True),
                         progress=False)
    n_bad = nan.summary["n_nonfinite"]
    assert n_bad > 0 and any(c.startswith("FAILED: non-finite outputs") and f"{n_bad} of" in c for c in nan.checks)
    assert sum(b["n"] for b in nan.summary["calibration"]["bins"]) == nan.summary["n_test"] - n_bad


def test_model_stage_refuses_too_few_bins_before_any_data(tmp_path, monkeypatch):
    import manifex.experiment.contract as contract

    monkeypatch.setattr(contract, "resolve_data", lambda *a, **k: (_ for _ in ()).throw(AssertionError("data loaded")))
    from manifex.experiment import run_experiment

    with pytest.raises(InputError, match="bins"):
        run_experiment(ModelExperiment(), ModelConfig(bins=1), tmp_path / "b", progress=False)


# -- the manifold stage ------------------------------------------------------------------------------------------------
def test_manifold_stage_measures_the_vae_and_refuses_unknown_generators(tmp_path):
    from manifex.experiment import run_experiment

    with pytest.raises(InputError, match="generators"):
        run_experiment(ManifoldExperiment(), ManifoldConfig(generators=("gan",)), tmp_path / "g", progress=False)
    cfg = ManifoldConfig(dataset="digits8", generators=("vae",), vae_epochs=10, n=64, spectrum_n=3)
    r = run_experiment(ManifoldExperiment(), cfg, tmp_path / "m", progress=False)
    vae = r.summary["generators"]["vae"]
    assert vae["latent_dim"] == 10 and vae["n"] == 64 and not vae["exact"]
    # R² is 1 - MSE / the mean image's MSE, on the same held-out images
    assert vae["r2"] == pytest.approx(1 - vae["recon_mse"] / vae["mean_image_mse"])
    assert len(vae["singular_values_median"]) == 10 and vae["spectrum"]["method"] == "exact"
    assert 1 <= vae["spectrum"]["dimension_energy_median"] <= 10
    assert r.model_info is None and "VAE: held-out reconstruction MSE" in (tmp_path / "m" / "report.html").read_text()


# -- attackable methods, the scorecard's new rows -------------------------------------------------------------------------
def test_attackable_methods_leave_out_gradcam_without_a_conv_layer_and_keep_the_model_as_found():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).train()
    ok, why = attackable_methods(mlp, torch.rand(2, 1, 8, 8), ("gradient", "smoothgrad", "gradcam"))
    assert ok == ["gradient", "smoothgrad"] and set(why) == {"gradcam"}
    assert all(m.training for m in mlp.modules()) and not any(m._forward_hooks for m in mlp.modules())
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10)).double()
    assert attackable_methods(conv, torch.rand(2, 1, 8, 8), ("gradient", "gradcam"))[0] == ["gradient", "gradcam"]


def test_scorecard_has_a_sanity_row_and_a_manipulable_row_per_method():
    ev = {"methods": {"a": {"TangentAlignment": 1.5, "ManifoldDeletion": 0.2, "MPRT": MPRT_LIMIT - 0.01},
                      "b": {"TangentAlignment": 0.9, "ManifoldDeletion": 0.1, "MPRT": MPRT_LIMIT + 0.01}},
          "alignment_q1": {"a": 1.1, "b": 0.7}, "start_probability": {"a": 0.9, "b": 0.9}}
    per = {"attack": {"method": "a", "pcc_orig_target": 0.2, "pcc_manip_target": 0.2 + MANIPULATION_GAIN,
                      "top1_kept_rate": 1.0, "budget_linf": 8 / 255, "n_pairs": 2},
           "attack-b": {"method": "b", "pcc_orig_target": 0.3, "pcc_manip_target": 0.3, "top1_kept_rate": 1.0,
                        "budget_linf": 8 / 255, "n_pairs": 2}}
    metrics = {k: {"method": v["method"], "n_pairs": 2, "means": {"pcc_orig_target": v["pcc_orig_target"],
                                                                   "pcc_manip_target": v["pcc_manip_target"]},
                   "top1_kept_rate": 1.0, "config": {"budget": 8 / 255}} for k, v in per.items()}
    metrics["attack-b"]["checks"] = ["FAILED: something"]
    at = stage_headline("attack", metrics)
    assert set(at["methods"]) == {"a", "b"} and at["failed_checks"] == ["b: something"]
    at["failed_checks"] = []
    stages = {"evaluate": {"headline": ev}, "attack": {"headline": at}}
    rows = {r["method"]: r for r in scorecard(stages)}
    assert rows["a"]["sanity?"]["verdict"] == "passes" and rows["b"]["sanity?"]["verdict"] == "fails"
    assert rows["a"]["sanity?"]["reference"] == 0.0 and f"{MPRT_LIMIT}" in rows["a"]["sanity?"]["text"]
    assert rows["a"]["manipulable?"]["verdict"] == "yes" and rows["b"]["manipulable?"]["verdict"] == "not at this budget"
    assert rows["b"]["manipulable?"]["reference"] == 0.3
    text = recommendation(list(rows.values()), stages)
    assert "can be manipulated at L∞ 8/255" in text and "a (0.20 → 0.30)" in text and "could not" in text and "b (0.30" in text
    assert "The randomisation sanity check fails for b: its maps" in text
    del ev["methods"]["a"]["MPRT"], ev["methods"]["b"]["MPRT"]
    assert {r["sanity?"]["verdict"] for r in scorecard(stages)} == {"not run"}
    assert stage_of("attack-integrated_gradients") == "attack" and stage_of("model") == "model"


def test_verdicts_resting_on_a_vae_that_learnt_nothing_are_withheld_and_the_model_is_described_first():
    ev = {"methods": {"a": {"TangentAlignment": 1.5, "ManifoldDeletion": 0.2}}, "alignment_q1": {"a": 1.2}}
    model = {"accuracy": 0.9, "chance": 0.1, "ece": 0.05, "mean_confidence": 0.95, "failed_checks": []}
    good = {"evaluate": {"headline": ev}, "model": {"headline": model},
            "manifold": {"headline": {"generators": {"vae": {"r2": 0.15}}}}}
    row = scorecard(good)[0]
    assert row["aligned?"]["verdict"] == "yes" and row["faithful?"]["verdict"] == "best"
    text = recommendation([row], good)
    assert text.startswith("The model's held-out accuracy is 0.900 (chance 0.100); its calibration error is 0.050 "
                           "(overconfident: mean confidence 0.950).")
    # a VAE that learnt little (R² 0.15 < WEAK_R2): the verdicts stay, their texts and the recommendation say so
    assert "explains only 15%" in row["aligned?"]["text"] and "explains only 15%" in row["faithful?"]["text"]
    assert "Read alignment and on-manifold faithfulness with care: the VAE they rest on explains only 15%" in text
    assert "most faithful" in text
    fine = {**good, "manifold": {"headline": {"generators": {"vae": {"r2": WEAK_R2 + 0.1}}}}}
    fine_row = scorecard(fine)[0]
    assert "read with care" not in fine_row["aligned?"]["text"] and "with care" not in recommendation([fine_row], fine)
    bad = {**good, "manifold": {"headline": {"generators": {"vae": {"r2": -0.16}}}}}
    row = scorecard(bad)[0]
    assert row["aligned?"]["verdict"] == row["faithful?"]["verdict"] == "withheld"
    assert row["aligned?"]["value"] == 1.5 and "R² -0.16" in row["aligned?"]["text"]
    text = recommendation([row], bad)
    assert "Alignment and on-manifold faithfulness are withheld" in text and "most faithful" not in text
    model["failed_checks"] = ["constant predictions: ..."]
    assert "failed 1 check(s), so every finding below is about a flawed model: constant predictions" in recommendation([row], bad)


def _trained(*args, **kwargs):
    raise AssertionError("a model was trained")


@pytest.mark.slow
def test_audit_folder_claims_its_settings_gathers_earlier_stages_and_overwrites_once(tmp_path, monkeypatch):
    """out/experiment.json is the audit's identity (settings, data, model) claimed before any stage trains; --stages is
    not a setting: a later call with other stages adds them and the report keeps the earlier ones; a changed setting
    is refused in one line before anything is trained; --overwrite moves the whole audit folder aside once."""
    import manifex.models.zoo as zoo

    out, cache = tmp_path / "audit", ["--cache-dir", str(tmp_path / "cache")]
    first = CliRunner().invoke(main, [*QUICK, "--stages", "attack", "--out", str(out), *cache])
    assert first.exit_code == 0, first.output
    record = json.loads((out / "experiment.json").read_text())
    assert record["command"] == "audit" and set(record) >= {"settings", "data", "model"}
    assert record["settings"]["budget"] == "quick" and "stages" not in record["settings"]
    assert record["model"]["fingerprint"] == json.loads((out / "attack" / "experiment.json").read_text())["model"]["fingerprint"]
    before = _results(out)
    monkeypatch.setattr(zoo, "fit_classifier", _trained)
    monkeypatch.setattr(zoo, "fit_generative", _trained)
    for changed, key in ((["--budget", "standard"], "settings.budget"), (["--training", "l2"], "settings.training")):
        res = CliRunner().invoke(main, [*QUICK, "--stages", "attack", *changed, "--out", str(out), *cache])
        assert res.exit_code == 2 and key in res.output and "--overwrite" in res.output and "--out" in res.output, res.output
        assert len([line for line in res.output.splitlines() if line.strip()]) == 1
    assert _results(out) == before
    monkeypatch.undo()
    second = CliRunner().invoke(main, [*QUICK, "--stages", "smooth", "--out", str(out), *cache])
    assert second.exit_code == 0, second.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["stages"]) == ["attack", "smooth"] and metrics["config"]["stages"] == ["attack", "smooth"]
    assert metrics["stages"]["attack"]["earlier"] is True and metrics["stages"]["smooth"]["earlier"] is False
    assert metrics["stages"]["attack"]["headline"]["pcc_manip_target"] is not None
    assert any("earlier call" in c and "attack" in c for c in metrics["checks"])
    assert "from an earlier call" in (out / "report.html").read_text()
    assert {k: v for k, v in _results(out).items() if k.startswith("attack")} == before  # attack was not touched
    # a stage folder made with other stage settings is left out of the report, with the reason
    rec = json.loads((out / "attack" / "experiment.json").read_text())
    rec["settings"]["iterations"] += 1
    (out / "attack" / "experiment.json").write_text(json.dumps(rec))
    third = audit(AuditConfig(dataset="digits8", budget="quick", epochs=1, stages=("smooth",)), out, progress=False,
                  cache_dir=tmp_path / "cache")
    assert list(third.metrics["stages"]) == ["smooth"]
    assert any("stage attack" in c and "other stage settings" in c for c in third.checks)
    # --no-resume recomputes the selected stages in place (the audit's own claims are written afresh)
    fresh = audit(AuditConfig(dataset="digits8", budget="quick", epochs=1, stages=("smooth",)), out, progress=False,
                  cache_dir=tmp_path / "cache", resume=False)
    assert fresh.stages["smooth"].n_new and sum(fresh.stages["smooth"].n_new.values()) > 0
    assert json.loads((out / "experiment.json").read_text())["settings"] == record["settings"]
    again = CliRunner().invoke(main, [*QUICK, "--stages", "attack", "--overwrite", "--out", str(out), *cache])
    assert again.exit_code == 0, again.output
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("audit.replaced-")]
    assert len(moved) == 1 and not any(p.name.count(".replaced-") for p in moved[0].rglob("*") if p.is_dir())
    assert (moved[0] / "smooth" / "results.jsonl").is_file() and not (out / "smooth").exists()
    assert list(json.loads((out / "metrics.json").read_text())["stages"]) == ["attack"]


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["digits8", "known:digits8"])
def test_training_l2_audits_exactly_the_robust_model_that_align_records(tmp_path, dataset):
    """--training l2 resolves to the l2-robust fine-tune `manifex align` trains and caches for the same data, classifier
    and epochs: the audited weights fingerprint is the one align records for its robust model, in every stage. On
    known:<data> the audit trains on the known manifold align samples with its defaults (the shared cache holds it)."""
    known = dataset.startswith("known:")
    # digits8: a fresh cache and a one-epoch VAE (align's manifold does not matter to its classifiers); known:digits8:
    # align's default known manifold (VAE 20 epochs, 6,000 + 1,000 images), as the audit builds it
    cache = [] if known else ["--cache-dir", str(tmp_path / "cache")]
    aligned = CliRunner().invoke(main, ["align", "--dataset", dataset, "--epochs", "1", "--samples", "4",
                                        *([] if known else ["--vae-epochs", "1"]), "--methods", "gradient", "--quiet",
                                        "--out", str(tmp_path / "align"), *cache])
    assert aligned.exit_code == 0, aligned.output
    models = json.loads((tmp_path / "align" / "metrics.json").read_text())["models"]
    out = tmp_path / "audit"
    res = CliRunner().invoke(main, [*QUICK[:2], dataset, *QUICK[3:], "--training", "l2", "--stages", "attack,smooth",
                                    "--out", str(out), *cache])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"]["fingerprint"] == models["robust"]["fingerprint"] != models["standard"]["fingerprint"]
    assert "l2-robust" in metrics["model"]["name"] and metrics["config"]["training"] == "l2"
    for stage in ("attack", "smooth"):
        record = json.loads((out / stage / "experiment.json").read_text())
        assert record["model"]["fingerprint"] == models["robust"]["fingerprint"], stage
        # each stage's own report and metrics name the audited model as the audit does, not "your LeNet"
        page = (out / stage / "report.html").read_text()
        assert "your LeNet" not in page and metrics["model"]["name"] in page, stage
    assert json.loads((out / "experiment.json").read_text())["model"]["fingerprint"] == models["robust"]["fingerprint"]
    assert "l2-robust" in (out / "report.html").read_text()
    if known:  # the data claimed is the base data with the spec, as align claims it
        assert (json.loads((out / "experiment.json").read_text())["data"]
                == json.loads((tmp_path / "align" / "experiment.json").read_text())["data"])


def test_training_l2_with_your_own_model_is_refused_before_any_data(tmp_path, monkeypatch):
    import manifex.models.resolve as resolve

    def boom(*a, **k):
        raise AssertionError("loaded data before checking the options")

    monkeypatch.setattr(resolve, "resolve_data", boom)
    res = CliRunner().invoke(main, [*QUICK, "--training", "l2", "--model", "nets.py:build", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--training l2" in res.output and "--model" in res.output, res.output
    with pytest.raises(InputError, match="training"):
        audit(AuditConfig(training="l3"), tmp_path / "p")


@pytest.mark.slow
def test_compare_puts_two_finished_audits_side_by_side_and_refuses_anything_else(tmp_path):
    import shutil

    from manifex.audit import compare

    cache = ["--cache-dir", str(tmp_path / "cache")]
    for name, epochs in (("a", "1"), ("b", "2")):
        res = CliRunner().invoke(main, [*QUICK[:6], epochs, "--quiet", "--stages", "attack,smooth",
                                        "--out", str(tmp_path / name), *cache])
        assert res.exit_code == 0, res.output
    ma, mb = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in "ab")
    res = CliRunner().invoke(main, ["audit", "--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out",
                                    str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    assert f"report: {tmp_path / 'cmp' / 'report.html'}" in res.output
    c = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert c["a"]["model"]["fingerprint"] == ma["model"]["fingerprint"] != c["b"]["model"]["fingerprint"]
    assert c["warnings"] == []  # same data, budget and seed
    row = next(r for r in c["scorecard"] if r["method"] == "gradient" and r["question"] == "manipulable?")
    ca, cb = ma["scorecard"][0]["manipulable?"], mb["scorecard"][0]["manipulable?"]
    assert (row["a"], row["b"]) == (ca, cb)  # each audit's cell as it wrote it; the difference is of the attack's rise
    rise_a, rise_b = ca["value"] - ca["reference"], cb["value"] - cb["reference"]
    assert row["relative"] == {"a": rise_a, "b": rise_b} and row["difference"] == rise_b - rise_a
    assert set(c["stages"]) == {"attack", "smooth"} and c["stages"]["smooth"]["b"] == mb["stages"]["smooth"]["headline"]
    assert any(f.startswith("β-smoothing in a ") for f in c["findings"]) and any(" in b " in f for f in c["findings"])
    html = (tmp_path / "cmp" / "report.html").read_text()
    assert 'href="../a/report.html"' in html and 'href="../b/report.html"' in html
    assert ma["model"]["fingerprint"] in html and mb["model"]["fingerprint"] in html
    # other data or budget: said at the top
    shutil.copytree(tmp_path / "b", tmp_path / "b2")
    mb["config"]["budget"], mb["data"]["fingerprint"] = "standard", "0" * 16
    (tmp_path / "b2" / "metrics.json").write_text(json.dumps(mb))
    warned = compare(tmp_path / "a", tmp_path / "b2", tmp_path / "cmp2").warnings
    assert any("budget" in w for w in warned) and any("different data" in w for w in warned)
    # anything but a finished audit is refused in one line, before anything is written
    (tmp_path / "unfinished").mkdir()
    for bad, needle in ((tmp_path / "a" / "attack", "from manifex attack"), (tmp_path / "nope", "not a folder"),
                        (tmp_path / "unfinished", "no readable metrics.json")):
        res = CliRunner().invoke(main, ["audit", "--compare", str(tmp_path / "a"), str(bad), "--out", str(tmp_path / "c3")])
        assert res.exit_code == 2 and needle in res.output and "audit B" in res.output, res.output
        assert len([line for line in res.output.splitlines() if line.strip()]) == 1
    assert not (tmp_path / "c3").exists()
    res = CliRunner().invoke(main, ["audit", "--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "a")])
    assert res.exit_code == 2 and "is audit A itself" in res.output, res.output
    res = CliRunner().invoke(main, ["audit", "--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--budget", "standard"])
    assert res.exit_code == 2 and "--budget" in res.output and "--compare" in res.output, res.output


def test_compare_scorecard_difference_of_faithfulness_is_relative_to_the_no_effect_auc():
    """Two models of different confidence: the raw deletion AUCs are not comparable, their ratios to the no-effect AUC
    (the target probability before deletion) are; the other questions compare the cell's number."""
    from manifex.audit.compare import _scorecard

    def audit_metrics(auc, p0, ratio):
        cells = {"faithful?": {"verdict": "best", "value": auc, "reference": auc, "text": ""},
                 "aligned?": {"verdict": "yes", "value": ratio, "reference": 1.0, "text": ""}}
        return {"scorecard": [{"method": "gradient", **cells}],
                "stages": {"evaluate": {"status": "done", "headline": {"start_probability": {"gradient": p0}}}}}

    rows = {r["question"]: r for r in _scorecard(audit_metrics(0.4, 0.8, 1.5), audit_metrics(0.15, 0.2, 2.0))}
    assert rows["faithful?"]["compared"] == "AUC ÷ no-effect AUC"
    assert rows["faithful?"]["relative"] == {"a": 0.4 / 0.8, "b": 0.15 / 0.2}
    assert rows["faithful?"]["difference"] == 0.15 / 0.2 - 0.4 / 0.8 > 0  # B is less faithful, though its raw AUC is lower
    assert rows["aligned?"]["difference"] == 2.0 - 1.5 and rows["aligned?"]["compared"] == "value"
    no_p0 = audit_metrics(0.15, 0.2, 2.0)
    del no_p0["stages"]["evaluate"]
    assert {r["question"]: r for r in _scorecard(audit_metrics(0.4, 0.8, 1.5), no_p0)}["faithful?"]["difference"] is None


def test_beta_smoothing_is_judged_at_an_accuracy_preserving_beta():
    """The recommendation and --compare judge β-smoothing at the β of the sweep with the smallest attack gain among
    those within SMOOTH_ACCURACY_COST of the ReLU model's accuracy (known:mnist5k's standard audit: β = 3 had the
    smaller gain but cost 0.31 accuracy); with none within it, β-smoothing is not judged."""
    from manifex.audit.summary import SMOOTH_ACCURACY_COST, recommendation, smoothing_choice

    relu = {"beta": "ReLU", "pcc_gain": 0.159, "accuracy_cost": 0.0}
    b10 = {"beta": "β=10", "pcc_gain": 0.164, "accuracy_cost": 0.008}
    b3 = {"beta": "β=3", "pcc_gain": 0.056, "accuracy_cost": 0.31}
    assert smoothing_choice([b10, b3, relu]) == (relu, b10, [b3])
    assert smoothing_choice([b3, relu]) == (relu, None, [b3])
    assert smoothing_choice([relu]) is None and smoothing_choice([b10]) is None
    say = lambda sweep: recommendation([], {"smooth": {"status": "done", "headline": {"sweep": sweep, "failed_checks": []}}})
    assert "β=10" in say([b10, b3, relu]) and "does not reduce" in say([b10, b3, relu]) and "0.159 → 0.164" in say([b10, b3, relu])
    assert "reduces" in say([{**b10, "pcc_gain": 0.03}, b3, relu])
    text = say([b3, relu])
    assert "not judged" in text and "β=3 costs 0.310" in text and f"{SMOOTH_ACCURACY_COST:.2f}" in text
    # an attack that manipulated nothing (gain below MANIPULATION_GAIN) leaves nothing to defend: no verdict either way
    weak = say([{**b10, "pcc_gain": 0.028}, {**relu, "pcc_gain": 0.046}])
    assert "not judged at this budget" in weak and "0.046" in weak and "0.028" in weak and "reduces" not in weak
