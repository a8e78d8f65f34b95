"""End-to-end: `manifex align` on tiny embedded data, resume from cache, and clear CLI errors."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from manifex.cli import main

TINY = [
    "--dataset", "known:digits8", "--samples", "16", "--n-train", "200", "--n-test", "32",
    "--vae-epochs", "2", "--epochs", "1", "--robust-epochs", "1", "--robust-steps", "2",
    "--methods", "gradient,smoothgrad,ig_path", "--quiet",
    "--allow-degenerate",  # 2 VAE epochs on digits8 leave the labeler at chance: the report must say so
]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    cache, out = root / "cache", root / "out"
    res = CliRunner().invoke(main, ["align", *TINY, "--out", str(out), "--cache-dir", str(cache)])
    assert res.exit_code == 0, res.output
    return root, cache, out, res


def test_align_writes_report_metrics_and_figures(first_run):
    _, _, out, res = first_run
    for name in ("report.html", "metrics.json", "density.png", "tangent_mass.png", "parts_standard.png", "parts_robust.png"):
        assert (out / name).stat().st_size > 0, name
    m = json.loads((out / "metrics.json").read_text())
    assert m["k"] == 10 and m["d"] == 64
    assert m["baseline"] == pytest.approx(0.387049873164949, rel=1e-10)  # E‖P_T e‖/‖e‖ at (k, d) = (10, 64)
    assert m["baseline_rms"] == pytest.approx((10 / 64) ** 0.5)
    html = (out / "report.html").read_text()  # the report names both: the mean (ratios) and the RMS √(k/d)
    assert f"{m['baseline']:.3f}" in html and f"√(k/d) = {m['baseline_rms']:.3f}" in html
    assert set(m["scores"]) == {"standard", "robust"}
    for per in m["scores"].values():
        assert set(per) == {"gradient", "smoothgrad", "integrated_gradients_path", "random"}
        for s in per.values():
            assert 0.0 <= s["mean"] <= 1.0 and s["n"] == 16
    for info in m["models"].values():
        assert 0.0 <= info["accuracy"] <= 1.0
    html = (out / "report.html").read_text()
    assert "smoothgrad" in html and "report: " in res.output


def test_degenerate_data_is_flagged_at_the_top_of_the_report(first_run):
    _, _, out, res = first_run
    m = json.loads((out / "metrics.json").read_text())
    assert any("near chance" in w for w in m["warnings"])
    assert any(c.startswith("FAILED: known-manifold labeler: accuracy") for c in m["checks"])  # marked in the box
    html = (out / "report.html").read_text()
    warning, first_section = html.index('class="warning"'), html.index("<section")
    assert warning < first_section and "near chance" in html[warning:first_section]
    assert "<h1>Unreliable: the inputs failed" in html and "supports no conclusion" in html
    assert 'class="checks"' in html and "warning: " in res.output
    assert m["seed_reference"] == {} and 'Seed' not in html  # the seed's MNIST numbers do not apply to digits8


def test_degenerate_data_is_refused_without_the_opt_in(first_run, tmp_path):
    _, cache, _, _ = first_run
    args = [a for a in TINY if a != "--allow-degenerate"]
    res = CliRunner().invoke(main, ["align", *args, "--out", str(tmp_path / "o"), "--cache-dir", str(cache)])
    assert res.exit_code == 2 and "degenerate" in res.output and "--allow-degenerate" in res.output
    assert not (tmp_path / "o" / "report.html").exists()


def test_rerun_resumes_from_out_and_reuses_models(first_run):
    """The attributions are units of --out (results.jsonl, units/<id>/E.pt): the same command on the same --out
    computes nothing and reports the same scores; a new --out recomputes the attributions but reuses the cached
    generator and classifiers (the old align resumed only from the model cache)."""
    root, cache, out, _ = first_run
    before = json.loads((out / "metrics.json").read_text())
    records = (out / "results.jsonl").read_bytes()
    chunks = {p: p.stat().st_mtime_ns for p in out.glob("units/*/E.pt")}
    assert len(chunks) == 2 * 3 and len(records.splitlines()) == 2 * 3  # 2 models × 3 methods × 1 chunk of 16 images
    res = CliRunner().invoke(main, ["align", *TINY, "--out", str(out), "--cache-dir", str(cache)])
    assert res.exit_code == 0, res.output
    after = json.loads((out / "metrics.json").read_text())
    assert (out / "results.jsonl").read_bytes() == records
    assert {p: p.stat().st_mtime_ns for p in out.glob("units/*/E.pt")} == chunks
    assert after["scores"] == before["scores"]
    for model, per in before["timings"]["attribution_seconds"].items():  # the chunks' seconds, read back from records
        assert {m: s for m, s in after["timings"]["attribution_seconds"][model].items() if m != "random"} == \
            {m: s for m, s in per.items() if m != "random"}
    res = CliRunner().invoke(main, ["align", *TINY, "--out", str(root / "out2"), "--cache-dir", str(cache)])
    assert res.exit_code == 0, res.output
    other = json.loads((root / "out2" / "metrics.json").read_text())
    assert other["generative"]["cached"] is True
    assert all(info["cached"] for info in other["models"].values())
    assert other["model"]["fingerprint"] == before["model"]["fingerprint"]


def test_experiment_folder_layout_and_model_named(first_run):
    _, _, out, _ = first_run
    exp = json.loads((out / "experiment.json").read_text())
    assert exp["command"] == "align" and exp["settings"]["n_samples"] == 16 and exp["data"]["spec"] == "known:digits8"
    assert exp["model"]["source"] == "built-in" and exp["model"]["architecture"] == "lenet"
    assert set(exp["explainers"]) == {"gradient", "smoothgrad", "integrated_gradients_path"}
    assert (out / "summary.json").is_file() and (out / "artefacts" / "tangent.pt").is_file()
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"]["name"] == "lenet" and m["models"]["standard"]["classifier"] == "lenet"
    ids = [json.loads(line)["id"] for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(f"{model}-{method}-000000-000016" for model in ("standard", "robust")
                                 for method in ("gradient", "smoothgrad", "integrated_gradients_path"))


def test_changed_setting_or_explainer_on_resume_is_refused(first_run, monkeypatch):
    _, cache, out, _ = first_run
    records = (out / "results.jsonl").read_bytes()
    res = CliRunner().invoke(main, ["align", *TINY, "--samples", "12", "--out", str(out), "--cache-dir", str(cache)])
    assert res.exit_code == 2 and "other settings" in res.output and "n_samples: 16 -> 12" in res.output, res.output
    from manifex.attribution.methods import Gradient

    monkeypatch.setattr(Gradient, "__repr__", lambda self: "Gradient(changed)")  # an explainer's default changed
    res = CliRunner().invoke(main, ["align", *TINY, "--out", str(out), "--cache-dir", str(cache)])
    assert res.exit_code == 2 and "other explainers" in res.output, res.output
    assert (out / "results.jsonl").read_bytes() == records


def test_interrupted_run_resumes_at_the_next_chunk(first_run, tmp_path, monkeypatch):
    """A run stopped after some chunks keeps them: the re-run computes only the rest (a kill loses at most the
    chunks in flight)."""
    import manifex.alignment.pipeline as pipeline
    from manifex.errors import ModelError

    _, cache, _, _ = first_run
    args = ["align", *TINY, "--batch-size", "8", "--out", str(tmp_path / "o"), "--cache-dir", str(cache)]
    real, calls = pipeline.make_explainer, []

    def stop_at_the_fourth(model, method, **kw):
        calls.append(method)
        if len(calls) == 4:
            raise ModelError("stopped here")
        return real(model, method, **kw)

    monkeypatch.setattr(pipeline, "make_explainer", stop_at_the_fourth)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "stopped here" in res.output, res.output
    done = (tmp_path / "o" / "results.jsonl").read_text().splitlines()
    assert len(done) == 3
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "o").glob("units/*/E.pt")}
    monkeypatch.setattr(pipeline, "make_explainer", real)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    lines = (tmp_path / "o" / "results.jsonl").read_text().splitlines()
    assert lines[:3] == done and len(lines) == 2 * 3 * 2  # 2 models × 3 methods × 2 chunks of 8, each once
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())


def test_run_alignment_keeps_its_folder_only_when_asked(first_run, tmp_path):
    """The library call is a thin call of run_experiment: with out_dir it writes (and resumes) the experiment folder,
    without it nothing is left behind; both give the scores of the CLI run."""
    from manifex.alignment import AlignConfig, run_alignment
    from manifex.models import ModelCache

    _, cache, out, _ = first_run
    cfg = AlignConfig(dataset="known:digits8", n_samples=16, n_train=200, n_test=32, generative_epochs=2,
                      classifier_epochs=1, robust_epochs=1, robust_steps=2, allow_degenerate=True,
                      methods=("gradient", "smoothgrad", "ig_path"))
    cli = json.loads((out / "metrics.json").read_text())["scores"]
    res = run_alignment(cfg, cache=ModelCache(cache), progress=False, out_dir=tmp_path / "lib")
    assert (tmp_path / "lib" / "report.html").is_file() and (tmp_path / "lib" / "results.jsonl").is_file()
    assert res.metrics["scores"] == cli
    assert set(res.scores) == {"standard", "robust"} and res.scores["standard"]["gradient"].shape == (16,)
    before = set(tmp_path.iterdir())
    again = run_alignment(cfg, cache=ModelCache(cache), progress=False)
    assert set(tmp_path.iterdir()) == before and again.metrics["scores"] == cli


def test_missing_dataset_file_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(main, ["align", "--dataset", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code == 2
    assert "error:" in res.output and "nope.npz" in res.output


class Blob(dict):
    """A picklable object that torch.load(weights_only=True) refuses."""


def test_untrusted_pickle_needs_opt_in(tmp_path):
    path = tmp_path / "mnist32.pt"
    torch.save((torch.zeros(2, 1, 32, 32), torch.zeros(2, dtype=torch.long), Blob()), path)
    res = CliRunner().invoke(main, ["align", "--dataset", str(path), "--out", str(tmp_path / "o"), "--quiet",
                                    "--cache-dir", str(tmp_path / "c")])
    assert res.exit_code == 2
    assert "--trust-pickle" in res.output


def test_unknown_method_lists_choices(tmp_path):
    res = CliRunner().invoke(main, ["align", *TINY, "--methods", "gradient,nonsense", "--out", str(tmp_path / "o"),
                                    "--cache-dir", str(tmp_path / "c")])
    assert res.exit_code == 2
    assert "nonsense" in res.output and "integrated_gradients" in res.output


def test_methods_command_lists_registry():
    res = CliRunner().invoke(main, ["methods"])
    assert res.exit_code == 0
    assert "smoothgrad" in res.output and "aliases" in res.output


def test_help_teaches():
    res = CliRunner().invoke(main, ["align", "--help"])
    assert res.exit_code == 0
    assert "tangent space" in res.output and "--trust-pickle" in res.output


def test_estimated_manifold_on_real_data(tmp_path):
    """Without 'known:', a VAE estimates the manifold and T_x is its decoder Jacobian at the encoding."""
    args = ["align", "--dataset", "digits8", "--samples", "8", "--vae-epochs", "1", "--epochs", "1", "--no-robust",
            "--latent-dim", "4", "--methods", "gradient", "--quiet", "--out", str(tmp_path / "o"),
            "--cache-dir", str(tmp_path / "c")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["k"] == 4 and m["d"] == 64 and "estimated" in m["dataset"]["manifold"]
    assert set(m["scores"]) == {"standard"}
    # random directions score about √(k/d) = 0.25 on the estimated tangent spaces too (8 samples: loose)
    assert abs(m["scores"]["standard"]["random"]["mean"] - m["baseline"]) < 0.08


def test_library_checks_your_model_before_the_vae_is_trained(tmp_path, monkeypatch):
    """run_alignment(classifier=...) checks the model on a batch of the real data before the VAE, the labeler or the
    known manifold are built (it trained the VAE first and failed afterwards)."""
    import manifex.models.zoo as zoo
    from manifex.alignment import AlignConfig, run_alignment
    from manifex.errors import ManifexError
    from manifex.models import ModelCache

    def trained(*args, **kwargs):
        raise AssertionError("a model was trained before the error")

    monkeypatch.setattr(zoo, "fit_classifier", trained)
    monkeypatch.setattr(zoo, "fit_generative", trained)
    three_classes = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    cfg = AlignConfig(dataset="known:digits8", robust=False, n_samples=8)
    with pytest.raises(ManifexError, match="has 3 outputs but the data has 10 classes"):
        run_alignment(cfg, cache=ModelCache(tmp_path / "c"), progress=False, classifier=three_classes)
