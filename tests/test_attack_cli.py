"""End-to-end: `manifex attack` on tiny embedded data, resume without duplicates, clear CSV errors."""
from __future__ import annotations

import json

from click.testing import CliRunner

from manifex.cli import main

TINY = ["attack", "--dataset", "digits8", "--pairs", "3", "--iterations", "20", "--lr", "1e-2", "--epochs", "1",
        "--batch-size", "2", "--quiet"]


def test_attack_writes_report_and_resumes(tmp_path):
    args = [*TINY, "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    out = tmp_path / "o"
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_pairs"] == 3 and m["n_new"] == 3 and m["method"] == "gradient"
    assert m["settings"]["attack"]["beta_growth"] == [10.0, 100.0]  # 'auto' for the gradient
    assert 0.0 <= m["top1_kept_rate"] <= 1.0
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3
    for rec in map(json.loads, lines):  # the one layout: a pair's files in units/<pair id>/
        assert rec["files"] == {"tensors": f"units/{rec['id']}/pair.pt", "figure": f"units/{rec['id']}/figure.png"}
        assert (out / rec["files"]["tensors"]).is_file() and (out / rec["files"]["figure"]).is_file()
    claimed = json.loads((out / "experiment.json").read_text())
    assert claimed["command"] == "attack" and claimed["settings"]["iterations"] == 20 and claimed["model"]["fingerprint"]
    assert not (out / "pairs").exists() and not (out / "campaign.json").exists()
    html = (out / "report.html").read_text()
    assert "PCC" in html and "results.jsonl" in html
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    m2 = json.loads((out / "metrics.json").read_text())
    assert m2["n_new"] == 0 and m2["n_skipped"] == 3
    assert (out / "results.jsonl").read_text().splitlines() == lines


def test_attack_csv_with_missing_column_is_a_clear_error(tmp_path):
    csv = tmp_path / "pairs.csv"
    csv.write_text("original,other\na.png,b.png\n")
    res = CliRunner().invoke(main, [*TINY, "--pairs-csv", str(csv), "--out", str(tmp_path / "o"),
                                    "--cache-dir", str(tmp_path / "c")])
    assert res.exit_code == 2
    assert "target" in res.output and "error:" in res.output


def test_attack_budget_parses_fractions(tmp_path):
    res = CliRunner().invoke(main, [*TINY, "--budget", "eight/255", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "8/255" in res.output


def test_attack_pcc_loss_is_passed_and_recorded(tmp_path):
    args = [*TINY, "--loss", "pcc", "--pairs", "1", "--iterations", "3", "--out", str(tmp_path / "o"),
            "--cache-dir", str(tmp_path / "c")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["settings"]["attack"]["map_loss"] == "pcc"
    bad = CliRunner().invoke(main, [*TINY, "--loss", "l1", "--out", str(tmp_path / "o")])
    assert bad.exit_code == 2 and "'mse'" in bad.output


def test_smooth_compares_betas_and_writes_report(tmp_path):
    args = ["smooth", "--dataset", "digits8", "--betas", "10,1", "--pairs", "2", "--iterations", "5", "--lr", "1e-2",
            "--epochs", "1", "--loss", "pcc", "--quiet", "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    out = tmp_path / "o"
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["accuracy"]) == {"β=10", "β=1", "ReLU"}
    assert [r["beta"] for r in m["sweep"]] == ["β=10", "β=1", "ReLU"]
    curv = {r["beta"]: r["curvature"] for r in m["sweep"]}
    assert curv["ReLU"] == 0.0 and curv["β=10"] > curv["β=1"] > 0  # flatter with smaller β
    for name in ("report.html", "explanations_beta.png", "beta_curves.png"):
        assert (out / name).stat().st_size > 0
    # the stages: the models (results.jsonl), then one campaign and one curvature run per model
    assert [json.loads(line)["id"] for line in (out / "results.jsonl").read_text().splitlines()] == [
        "beta_10", "beta_1", "beta_inf"]
    for b in ("beta_10", "beta_1", "beta_inf"):
        assert (out / "units" / b / "explanations.pt").stat().st_size > 0
        for stage in ("attack", "curvature"):
            records = [json.loads(line) for line in (out / f"results-{stage}-{b}.jsonl").read_text().splitlines()]
            assert len(records) == 2 and all(r["id"].startswith(f"{b}-") for r in records)
        for r in (json.loads(line) for line in (out / f"results-attack-{b}.jsonl").read_text().splitlines()):
            assert (out / r["files"]["tensors"]).parent == out / "units" / r["id"]
    assert {label: c["attack"]["map_loss"] for label, c in m["campaigns"].items()} == dict.fromkeys(["β=10", "β=1", "ReLU"], "pcc")
    assert json.loads((out / "experiment.json").read_text())["settings"]["map_loss"] == "pcc"
    assert m["sweep"][-1]["attack_beta_growth"] == [10.0, 100.0] and m["sweep"][0]["attack_beta_growth"] is None


def test_smooth_rejects_non_positive_beta(tmp_path):
    res = CliRunner().invoke(main, ["smooth", "--betas", "10,0", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "β" in res.output
