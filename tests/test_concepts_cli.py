"""`manifex concepts` end to end on the 8×8 digits (small settings): files, report, resume, and one-line errors."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from manifex.cli import main
from manifex.runs import read_jsonl

SMALL = ["--dataset", "digits8", "--epochs", "1", "--layer", "blocks.1", "--pool", "2", "--classes", "0,1",
         "--components", "3", "--images-per-class", "8", "--samples", "2", "--controls", "3", "--top-k", "4", "--quiet"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.mark.slow
def test_concepts_cli_end_to_end_and_resume(tmp_path, cache):
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["concepts", *SMALL, "--cache-dir", cache, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "include target: argmax = A" in res.output and "report:" in res.output
    metrics = json.loads((out / "metrics.json").read_text())
    s = metrics["summary"]
    assert s["classes"] == [0, 1] and set(s["include"]["concepts"]) == {"mean_p", "std_p", "argmax_rate", "p_gt_0.1", "p_gt_0.2", "p_gt_0.5"}
    assert 0 < s["nmf"]["mean_relative_error"] < 1
    assert any("layer blocks.1" in c for c in metrics["checks"])
    records = read_jsonl(out / "results.jsonl")
    assert [r["class"] for r in records] == [0, 1] and len(records[0]["vectors"]) == 3
    html = (out / "report.html").read_text()
    assert "Prediction from components" in html and "ResNet50 layer4.2" in html and "classes/class_000.png" in html
    figure = out / "classes" / "class_001.png"
    stamp = figure.stat().st_mtime_ns
    again = CliRunner().invoke(main, ["concepts", *SMALL, "--cache-dir", cache, "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert len(read_jsonl(out / "results.jsonl")) == 2 and figure.stat().st_mtime_ns == stamp  # resumed, not redone


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--layer", "blocks.9"], "unknown layer 'blocks.9'"),
    (["--layer", "blocks.1.conv1"], "negative activations"),
    (["--classes", "0,12"], "out of range"),
    (["--classifier", "lenet", "--layer", "features.3"], "layout='canvas'"),
])
def test_concepts_cli_errors(tmp_path, cache, args, message):
    base = [a for a in SMALL]
    for flag in ("--layer", "--classes"):
        if flag in args:
            i = base.index(flag)
            del base[i : i + 2]
    res = CliRunner().invoke(main, ["concepts", *base, *args, "--cache-dir", cache, "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
