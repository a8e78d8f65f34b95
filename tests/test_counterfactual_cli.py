"""`manifex counterfactual`: help, errors before any training, and an end-to-end run on tiny data that resumes."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from manifex.cli import main


def _run(args, tmp_path):
    return CliRunner().invoke(main, ["counterfactual", "--cache-dir", str(tmp_path / "cache"), "--quiet", *args])


def test_help_teaches_with_examples():
    r = CliRunner().invoke(main, ["counterfactual", "--help"])
    assert r.exit_code == 0
    for text in ("Examples:", "--dataset known:mnist5k", "--dataset helix", "--space", "--generator", "resume",
                 "--per-input 3 --mask"):
        assert text in r.output


@pytest.mark.parametrize("args,message", [
    (["--space", "latent,z"], "--space"),
    (["--source", "4", "--target", "4"], "same class"),
    (["--target", "12"], "not a class"),
    (["--lr-latent", "-1"], "lr"),
    (["--dataset", "no-such-data"], "unknown dataset"),
    (["--per-input", "0"], "--per-input"),
    (["--diversity", "-1"], "--diversity"),
    (["--mask", "2:2,0:8"], "--mask 2:2,0:8 is an empty box"),
    (["--mask", "0:9,0:8"], "--mask 0:9,0:8 reaches beyond the 8x8 images"),
    (["--mask", "no/such/mask.npy"], "--mask no/such/mask.npy: no such file"),
])
def test_bad_options_fail_before_training(tmp_path, args, message):
    r = _run(["--dataset", "digits8", "--out", str(tmp_path / "out"), *args], tmp_path)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert not list((tmp_path / "cache").glob("*.pt"))  # nothing was trained


@pytest.mark.slow
def test_end_to_end_on_digits_resumes(tmp_path):
    out = tmp_path / "out"
    args = ["--dataset", "digits8", "--generator", "vae", "--generator-epochs", "1", "--epochs", "1", "--n", "3",
            "--max-steps", "5", "--path-frames", "3", "--out", str(out)]
    r = _run(args, tmp_path)
    assert r.exit_code == 0, r.output
    for f in ("report.html", "metrics.json", "summary.json", "results.jsonl", "grid.png", "paths.png", "spectrum.png",
              "experiment.json"):
        assert (out / f).is_file(), f
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3
    rec = json.loads(lines[0])
    assert {"latent", "pixel", "dimension", "singular_values", "files"} <= set(rec)
    assert rec["latent"]["steps"] <= 5 and "svm" in rec["pixel"] and "tangent_fraction" in rec["latent"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["summary"]["latent"]["n"] == 3 and metrics["n_new"] == 3
    html = (out / "report.html").read_text()
    assert "research grid" in html and "Checks" in html
    # a second run resumes: nothing new, the same records
    r2 = _run(args, tmp_path)
    assert r2.exit_code == 0, r2.output
    assert (out / "results.jsonl").read_text().splitlines() == lines
    assert json.loads((out / "metrics.json").read_text())["n_new"] == 0
    # other settings on the same --out are refused
    r3 = _run([*args[:-2], "--max-steps", "7", "--out", str(out)], tmp_path)
    assert r3.exit_code == 2 and "other settings" in r3.output


@pytest.mark.slow
def test_per_input_and_mask_flags_end_to_end(tmp_path):
    """--per-input 2 --diversity 2 --mask FILE.npy: K counterfactuals per record, none changing a pixel outside the
    mask, the diversity in the summary and the K side by side in the report; the settings guard holds the mask's
    content (an edited file on resume is refused)."""
    import numpy as np

    mask = np.zeros((8, 8), dtype=np.float32)
    mask[2:6, 1:7] = 1
    np.save(tmp_path / "m.npy", mask)
    out = tmp_path / "out"
    args = ["--dataset", "digits8", "--epochs", "3", "--space", "pixel", "--n", "2", "--max-steps", "40", "--lr-pixel",
            "0.05", "--stop-prob", "0.9", "--im-epochs", "0", "--per-input", "2", "--diversity", "2", "--mask",
            str(tmp_path / "m.npy"), "--out", str(out)]
    r = _run(args, tmp_path)
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(len(rec["pixel"]) == 2 for rec in recs)
    assert all(m["outside_mask"] == 0.0 for rec in recs for m in rec["pixel"] if m.get("outside_mask") is not None)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pixel"]["diversity"]["pixel"]["n"] == 2 and summary["pixel"]["n"] == 4
    assert (out / "diverse.png").is_file() and "Several counterfactuals per image" in (out / "report.html").read_text()
    mask[0, 0] = 1
    np.save(tmp_path / "m.npy", mask)
    r2 = _run(args, tmp_path)
    assert r2.exit_code == 2 and "other settings" in r2.output, r2.output


@pytest.mark.parametrize("args,named", [
    (["--model", "no/such/file.py"], "--model"),
    (["--target", "3"], "--target"),
    (["--space", "pixel"], "--space"),
    (["--generator", "gan"], "--generator"),
    (["--lr-latent", "1e-2", "--workers", "2"], "--lr-latent, --workers"),
    (["--device", "cuda"], "--device"),
])
def test_helix_refuses_the_options_it_does_not_use(tmp_path, args, named):
    """The helix is a fixed toy experiment: an option it would silently ignore (even a missing --model file) is
    refused in one line, exit 2, before anything is trained or written."""
    r = _run(["--dataset", "helix", "--out", str(tmp_path / "out"), *args], tmp_path)
    assert r.exit_code == 2, r.output
    assert f"--dataset helix does not use {named}" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_helix_takes_n_max_steps_generator_epochs_and_seed(tmp_path, monkeypatch):
    import manifex.cli.counterfactual as cli
    from manifex.counterfactuals.experiment import HelixConfig, HelixExperiment

    seen = []

    def fake_run_command(experiment, config, **kwargs):
        seen.append((type(experiment), config, kwargs["resume"], kwargs["overwrite"]))

    monkeypatch.setattr(cli, "run_command", fake_run_command)
    r = _run(["--dataset", "helix", "--out", str(tmp_path / "out"), "--n", "5", "--max-steps", "7",
              "--generator-epochs", "1", "--seed", "3", "--device", "cpu", "--no-resume", "--overwrite"], tmp_path)
    assert r.exit_code == 0, r.output
    assert seen == [(HelixExperiment, HelixConfig(n=5, max_steps=7, flow_epochs=1, seed=3), False, True)]
    _run(["--dataset", "helix", "--out", str(tmp_path / "out")], tmp_path)
    assert seen[-1][1] == HelixConfig()  # the research defaults, not the image campaign's --n 32 / --max-steps 2000


@pytest.mark.slow
def test_gan_end_to_end_on_digits(tmp_path):
    """--generator gan trains a DCGAN and encodes each image by inversion (it ended in a traceback); the report has
    one checks box, at the top, with the approximate-generator warning, which metrics.json lists under warnings."""
    out = tmp_path / "out"
    r = _run(["--dataset", "digits8", "--generator", "gan", "--generator-epochs", "1", "--epochs", "1", "--n", "2",
              "--max-steps", "5", "--path-frames", "2", "--out", str(out)], tmp_path)
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["info"]["generator"]["kind"] == "gan" and metrics["summary"]["latent"]["n"] == 2
    (warning,) = metrics["warnings"]
    assert warning.startswith("approximate generator (gan)") and f"FAILED: {warning}" in metrics["checks"]
    html = (out / "report.html").read_text()
    assert html.count("<h2>Checks</h2>") == 1
    assert html.index("<h2>Checks</h2>") < html.index("How to read this") < html.index("research grid")
    assert 'class="warn">approximate generator (gan)' in html
    spectrum = metrics["summary"]["spectrum"]
    # the page and metrics.json agree on the dimension: a number on both, or "not determined" and null + reason
    if spectrum["dimension_median"] is None:
        assert "not determined" in spectrum["dimension_note"] and "dimension is not determined" in html
    else:
        assert f"estimated dimension {spectrum['dimension_median']:g}" in html
