"""`manifex concepts` end to end on the 8×8 digits (small settings): files, report, resume, and one-line errors."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from manifex.cli import main
from manifex.runs import read_jsonl

SMALL = ["--dataset", "digits8", "--epochs", "1", "--layer", "blocks.1", "--pool", "2", "--classes", "0,1",
         "--components", "3", "--images-per-class", "8", "--noise-samples", "2", "--controls", "3", "--top-k", "4", "--quiet"]


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
    assert s["classes"] == [0, 1] and set(s["include"]["concepts"]) == {"mean_p", "std_p", "argmax_rate", "p_gt_0.1", "p_gt_0.2", "p_gt_0.5",
                                                                     "n", "argmax_count", "argmax_ci_low", "argmax_ci_high"}
    assert 0 < s["nmf"]["mean_relative_error"] < 1
    assert any("layer blocks.1" in c for c in metrics["checks"])
    records = read_jsonl(out / "results.jsonl")
    assert [r["class"] for r in records] == [0, 1] and len(records[0]["vectors"]) == 3
    html = (out / "report.html").read_text()
    assert "Prediction from components" in html and "ResNet50 layer4.2" in html and "units/class000/figure.png" in html
    figure = out / "units" / "class001" / "figure.png"
    recorded = json.loads((out / "experiment.json").read_text())
    assert recorded["command"] == "concepts" and recorded["settings"]["components"] == 3
    assert recorded["model"]["source"] == "built-in" and len(recorded["model"]["fingerprint"]) == 16
    assert recorded["data"]["spec"] == "digits8" and recorded["manifex"]
    stamp = figure.stat().st_mtime_ns
    again = CliRunner().invoke(main, ["concepts", *SMALL, "--cache-dir", cache, "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert len(read_jsonl(out / "results.jsonl")) == 2 and figure.stat().st_mtime_ns == stamp  # resumed, not redone
    # other settings, or another model, on the same --out are refused in one line (they were silently mixed:
    # --components 2 resumed the records of 3 vectors), before any model is trained or relevance computed
    for changed, named in ((["--components", "2"], "settings.components: 3 -> 2"), (["--epochs", "2"], "settings.epochs: 1 -> 2")):
        res = CliRunner().invoke(main, ["concepts", *SMALL, *changed, "--cache-dir", cache, "--out", str(out)])
        assert res.exit_code == 2 and "holds a concepts run made with other settings" in res.output, res.output
        assert named in res.output and "--overwrite" in res.output
    assert len(read_jsonl(out / "results.jsonl")) == 2 and figure.stat().st_mtime_ns == stamp


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--layer", "blocks.9"], "unknown layer 'blocks.9'"),
    (["--layer", "blocks.1.conv1"], "negative activations"),
    (["--classes", "0,12"], "out of range"),
    (["--classifier", "lenet", "--layer", "features.3"], "layout='canvas'"),
    (["--classes", "1,1"], "--classes lists 1 more than once"),
    (["--layer", "blocks.2", "--pool", "3"], "pool 3 is larger than the 2×2 grid of --layer blocks.2"),
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


@pytest.mark.slow
def test_concepts_cli_duplicate_classes_refused_before_training(tmp_path):
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    res = CliRunner().invoke(main, ["concepts", *SMALL[:-1], "--classes", "2,3,2", "--cache-dir", str(cache),
                                    "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--classes lists 2 more than once" in res.output and "Traceback" not in res.output
    assert not any(cache.iterdir())  # nothing trained


def _without(args, *flags):
    out = list(args)
    for flag in flags:
        i = out.index(flag)
        del out[i : i + 2]
    return out


@pytest.mark.slow
def test_concepts_cli_digits8_defaults(tmp_path, cache):
    """The default layer (blocks.2, a 2×2 grid on 8×8 digits) and --pool auto (1 here) run end to end; the
    component test is reported as k/n with a 95% Wilson interval, over 5 strips per class by default."""
    out = tmp_path / "run"
    args = _without(SMALL, "--layer", "--pool")
    res = CliRunner().invoke(main, ["concepts", *args, "--cache-dir", cache, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output and "95% CI" in res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["options"]["pool"] == 1 and metrics["options"]["strips"] == 5
    assert any("crop grid 2x2 (layer grid 2x2, pool 1)" in c for c in metrics["checks"])
    s = metrics["summary"]["include"]
    assert s["concepts"]["n"] == 2 * 5 and s["concepts_top1"]["n"] == 2 and s["control"]["n"] == 2 * 3
    assert 0 <= s["concepts"]["argmax_ci_low"] <= s["concepts"]["argmax_rate"] <= s["concepts"]["argmax_ci_high"] <= 1
    assert not metrics["summary"]["whole_image_crops"]
    html = (out / "report.html").read_text()
    assert "95% CI (Wilson)" in html and f"{s['concepts']['argmax_count']}/10" in html and "top-1 strips only" in html


@pytest.mark.slow
def test_concepts_cli_layer_after_global_pooling_warns(tmp_path, cache):
    """head.1 follows global pooling: every crop is the whole image, which the report and checks say."""
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["concepts", *_without(SMALL, "--layer", "--pool"), "--layer", "head.1",
                                    "--cache-dir", cache, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "every crop is the whole image" in res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["summary"]["whole_image_crops"]
    assert any("every crop is the whole image" in w for w in metrics["warnings"])
    assert any(c.startswith("FAILED: ") and "1x1" in c for c in metrics["checks"])
    assert "does not test concepts" in (out / "report.html").read_text()


@pytest.mark.slow
def test_each_class_is_committed_as_it_finishes(tmp_path, cache, monkeypatch):
    """A run that dies on its second class keeps the first (a concepts campaign committed nothing until every
    class was done); the re-run computes only the missing class."""
    import manifex.concepts.report as report

    real = report.class_concepts
    calls = []

    def dies_on_class_1(*args, classes, **kwargs):
        calls.append(list(classes))
        if 1 in classes:
            raise RuntimeError("killed")
        return real(*args, classes=classes, **kwargs)

    monkeypatch.setattr(report, "class_concepts", dies_on_class_1)
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["concepts", *SMALL, "--cache-dir", cache, "--out", str(out)])
    assert res.exit_code != 0 and calls == [[0], [1]]
    assert [r["class"] for r in read_jsonl(out / "results.jsonl")] == [0]
    monkeypatch.setattr(report, "class_concepts", lambda *a, classes, **k: calls.append(list(classes)) or real(*a, classes=classes, **k))
    res = CliRunner().invoke(main, ["concepts", *SMALL, "--cache-dir", cache, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert calls[2:] == [[1]] and [r["class"] for r in read_jsonl(out / "results.jsonl")] == [0, 1]
