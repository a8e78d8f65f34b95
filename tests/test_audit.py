"""manifex audit: every system on one model, each stage its own experiment; one report and one metrics.json."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from manifex.audit import STAGES, AuditConfig, audit, find_concept_layer
from manifex.audit.summary import MANIPULATION_GAIN, recommendation, scorecard
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
    # one model audited by every stage
    prints = {json.loads((out / s / "experiment.json").read_text())["model"]["fingerprint"] for s in STAGES}
    assert len(prints) == 1
    before = _results(out)
    again = audit(AuditConfig(dataset="digits8", budget="quick", epochs=1), out, progress=False)
    assert all(sum(r.n_new.values()) == 0 for r in again.stages.values())
    assert _results(out) == before
    # other epochs change every stage's settings: refused in one line naming the stage and the ways out, untrained
    refused = CliRunner().invoke(main, [*QUICK[:6], "2", "--quiet", "--out", str(out)])
    assert refused.exit_code == 2 and "audit stage evaluate" in refused.output and "--overwrite" in refused.output
    assert _results(out) == before


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
    assert list(quick) == list(STAGES) and quick["counterfactual"].source == 4 and quick["contrast"].pairs == ((4, 9),)
    assert quick["attack"].budget == quick["smooth"].budget == 8 / 255
    standard = plan.stage_configs(AuditConfig(budget="standard"), num_classes=2, layer=None, layout="canvas")
    assert "concepts" not in standard and standard["counterfactual"].target == 1
    assert standard["evaluate"].n > quick["evaluate"].n and standard["attack"].n_pairs > quick["attack"].n_pairs
    monkeypatch.setattr(plan, "_has_quantus", lambda: False)
    notes: list[str] = []
    no_q = plan.stage_configs(AuditConfig(budget="standard"), num_classes=10, layer=None, layout="canvas", notes=notes)
    assert no_q["evaluate"].metrics == ("TangentAlignment", "ManifoldDeletion") and "Quantus" in notes[0]
