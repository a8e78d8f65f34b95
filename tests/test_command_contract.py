"""One table over the experiment commands, and the promises every one of them keeps (the start of the generated
command battery of the experiment contract): a changed result setting on resume is refused in one line and
computes nothing; an environment mistake exits 2 before anything is trained; your own --model is what the report
and metrics.json name. A new command joins by adding its row."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import manifex.models.zoo as zoo
from manifex.cli import main

#: command -> (tiny arguments on digits8, a result setting changed on resume)
COMMANDS = {
    "align": (["--dataset", "known:digits8", "--samples", "8", "--n-train", "50", "--n-test", "16", "--vae-epochs", "1",
               "--epochs", "1", "--methods", "gradient", "--allow-degenerate"], ["--samples", "9"]),
    "attack": (["--dataset", "digits8", "--epochs", "1", "--pairs", "2", "--iterations", "2"], ["--iterations", "3"]),
    "smooth": (["--dataset", "digits8", "--epochs", "1", "--pairs", "2", "--iterations", "2", "--betas", "10"],
               ["--iterations", "3"]),
    "counterfactual": (["--dataset", "digits8", "--epochs", "1", "--space", "pixel", "--n", "2", "--max-steps", "3"],
                       ["--max-steps", "4"]),
    "concepts": (["--dataset", "digits8", "--epochs", "1", "--layer", "blocks.1", "--pool", "2", "--classes", "0,1",
                  "--components", "2", "--images-per-class", "6", "--noise-samples", "1", "--controls", "2", "--top-k", "2"],
                 ["--components", "3"]),
    "contrast": (["--dataset", "digits8", "--epochs", "1", "--layer", "blocks.1", "--class-pairs", "0:1", "--images-per-class", "6",
                  "--noise-samples", "1", "--random-directions", "1", "--components", "2"], ["--random-directions", "2"]),
    # the manifold-aware metrics only: the row needs no Quantus (the optional eval extra)
    "evaluate": (["--dataset", "digits8", "--epochs", "1", "--n", "4", "--methods", "gradient", "--metrics",
                  "TangentAlignment,ManifoldDeletion", "--vae-epochs", "1", "--curve-steps", "3", "--infill-steps", "5"],
                 ["--curve-steps", "4"]),
    # the audit's fast stages only (every stage runs end to end in tests/test_audit.py); a budget change is refused
    "audit": (["--dataset", "digits8", "--epochs", "1", "--budget", "quick", "--stages", "attack"], ["--budget", "standard"]),
}
#: a mistake only the command can find, refused before anything is trained (exit 2, one line naming it)
MISTAKES = {
    "align": (["--methods", "nope"], "nope"),
    "attack": (["--method", "nope"], "nope"),
    "smooth": (["--betas", "10", "--method", "nope"], "nope"),
    "counterfactual": (["--target", "10"], "10"),
    "concepts": (["--layer", "nope"], "nope"),
    "contrast": (["--layer", "nope"], "nope"),
    "evaluate": (["--methods", "nope"], "nope"),
    "audit": (["--stages", "attack,nope"], "nope"),
}
#: the layer of the user's network below, for the commands that read one
USER_LAYER = {"concepts": ["--layer", "features.1", "--pool", "4"], "contrast": ["--layer", "features.1"]}

def run(command, tmp_path, *extra, cache=True):
    args, _ = COMMANDS[command]
    return CliRunner().invoke(main, [command, *args, *extra, "--quiet", "--out", str(tmp_path / "out"),
                                     *(["--cache-dir", str(tmp_path / "cache")] if cache else [])])


def results(folder):
    """Every results file of a run folder (smooth keeps one campaign per β)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("results.jsonl"))}


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c, (_, changed) in COMMANDS.items() if changed])
def test_changed_setting_on_resume_is_refused(tmp_path, command):
    first = run(command, tmp_path)
    assert first.exit_code == 0, first.output
    before = results(tmp_path / "out")
    assert before
    changed = run(command, tmp_path, *COMMANDS[command][1])
    assert changed.exit_code == 2 and "other settings" in changed.output, changed.output
    assert len([line for line in changed.output.splitlines() if line.strip()]) == 1
    assert results(tmp_path / "out") == before  # nothing mixed in


@pytest.mark.parametrize("command", list(COMMANDS))
def test_environment_mistakes_exit_2_before_training(tmp_path, command, monkeypatch):
    def trained(*args, **kwargs):
        raise AssertionError("a model was trained before the error")

    monkeypatch.setattr(zoo, "fit_classifier", trained)
    monkeypatch.setattr(zoo, "fit_generative", trained)
    (tmp_path / "file").write_text("")
    for extra, needle in ((["--device", "cuda:7"], "--device"), (["--cache-dir", str(tmp_path / "file")], "--cache-dir")):
        res = run(command, tmp_path, *extra, cache=False)
        assert res.exit_code == 2 and needle in res.output, (extra, res.output)
    res = CliRunner().invoke(main, [command, *COMMANDS[command][0], "--quiet", "--out", str(tmp_path / "file")])
    assert res.exit_code == 2 and "--out" in res.output, res.output


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS))
def test_the_users_model_is_named_in_the_report_and_metrics(tmp_path, command, user_model):
    spec, weights = user_model
    res = run(command, tmp_path, "--model", spec, "--weights", weights, *USER_LAYER.get(command, []))
    assert res.exit_code == 0, res.output
    assert "user_nets.py:build" in (tmp_path / "out" / "report.html").read_text()
    assert "user_nets.py:build" in (tmp_path / "out" / "metrics.json").read_text()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_preflight_mistakes_exit_2_before_training(tmp_path, command, monkeypatch):
    def trained(*args, **kwargs):
        raise AssertionError("a model was trained before the error")

    monkeypatch.setattr(zoo, "fit_classifier", trained)
    monkeypatch.setattr(zoo, "fit_generative", trained)
    extra, needle = MISTAKES[command]
    args = list(COMMANDS[command][0])
    for flag in extra[::2]:  # the mistake replaces the row's own value of that option
        if flag in args:
            i = args.index(flag)
            del args[i : i + 2]
    res = CliRunner().invoke(main, [command, *args, *extra, "--quiet", "--out", str(tmp_path / "out"),
                                    "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output, res.output
    assert len([line for line in res.output.splitlines() if line.strip()]) == 1, res.output
    assert not any((tmp_path / "cache").rglob("*.pt"))  # nothing trained, nothing cached


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS))
def test_experiment_folder_identity_safe_loads_and_overwrite(tmp_path, command):
    """experiment.json records the command, the settings, the model's fingerprint, the data and the version;
    every .pt file left in --out replaced by a pickle that would write a marker file when unpickled is never run
    on resume (weights_only loads: the file is rebuilt or refused in one line); --overwrite moves the old folder
    aside (never deletes it) and starts over."""
    first = run(command, tmp_path)
    assert first.exit_code == 0, first.output
    out = tmp_path / "out"
    recorded = json.loads((out / "experiment.json").read_text())
    assert recorded["command"] == command and recorded["manifex"]
    assert set(recorded) >= {"settings", "model", "data"}
    assert len(recorded["model"]["fingerprint"]) == 16 and recorded["data"]["fingerprint"]
    assert json.loads((out / "metrics.json").read_text())  # strict JSON (NaN is written as null)
    before = results(out)
    marker = tmp_path / "pwned"
    for f in sorted(out.rglob("*.pt")):
        torch.save(_Crafted(str(marker)), f)
    resumed = run(command, tmp_path)
    assert not marker.exists()
    assert resumed.exit_code in (0, 2) and "Traceback" not in resumed.output, resumed.output
    again = run(command, tmp_path, "--overwrite")
    assert again.exit_code == 0, again.output
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("out.replaced-")]
    assert len(moved) == 1 and results(moved[0]) == before and (moved[0] / "experiment.json").is_file()
    assert results(out)  # the new run's records


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_changed_model_on_resume_is_refused(tmp_path, command, user_model):
    """The same --model file with other weights is another model: refused on resume, nothing mixed in."""
    spec, weights = user_model
    first = run(command, tmp_path, "--model", spec, "--weights", weights, *USER_LAYER.get(command, []))
    assert first.exit_code == 0, first.output
    before = results(tmp_path / "out")
    state = torch.load(weights)
    state = {k: v + 0.01 for k, v in state.items()}
    other = tmp_path / "other.pt"
    torch.save(state, other)
    res = run(command, tmp_path, "--model", spec, "--weights", str(other), *USER_LAYER.get(command, []))
    assert res.exit_code == 2 and "model.fingerprint" in res.output, res.output
    assert results(tmp_path / "out") == before


def _records(folder):
    """The records of every results file, by id, without wall-clock fields."""
    from manifex.runs import read_jsonl

    def strip(v):
        if isinstance(v, dict):
            return {k: strip(w) for k, w in v.items() if "second" not in k and k != "time"}
        return [strip(w) for w in v] if isinstance(v, list) else v

    return {f.name: {r["id"]: strip(r) for r in read_jsonl(f)} for f in sorted(folder.glob("results*.jsonl"))}


#: commands whose units run on Ray workers in the battery (align's chunks too, but its tiny run has one chunk)
RAY = ("attack", "counterfactual", "concepts", "contrast", "evaluate")


@pytest.mark.slow
@pytest.mark.parametrize("command", RAY)
def test_users_model_file_on_ray_workers_equals_local(tmp_path, command, user_model):
    """--model path/to/file.py:FACTORY --weights W --workers 2 gives the local run's records exactly (the local
    run at one torch thread, like each of the two workers on this 2-core budget, so the float32 kernels match)."""
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'manifex[ray]'")
    spec, weights = user_model
    mine = ["--model", spec, "--weights", weights, *USER_LAYER.get(command, [])]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = CliRunner().invoke(main, [command, *COMMANDS[command][0], *mine, "--quiet", "--out", str(tmp_path / "local"),
                                          "--cache-dir", str(tmp_path / "cache")])
    finally:
        torch.set_num_threads(threads)
    assert local.exit_code == 0, local.output
    remote = CliRunner().invoke(main, [command, *COMMANDS[command][0], *mine, "--workers", "2", "--quiet",
                                       "--out", str(tmp_path / "ray"), "--cache-dir", str(tmp_path / "cache")])
    assert remote.exit_code == 0, remote.output
    assert _records(tmp_path / "ray") == _records(tmp_path / "local")


class _Crafted:
    """Unpickling this calls open(path, "w"): a stand-in for arbitrary code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _kill_after_first_unit(args, out, env):
    """Run the command in a subprocess; SIGKILL it as soon as its first unit is committed (or it ends)."""
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "manifex", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if any(p.stat().st_size > 0 for p in out.rglob("results*.jsonl")):
            proc.kill()
            break
        time.sleep(0.05)
    proc.wait()
    return proc.returncode


#: commands whose tiny run has several units (a kill can fall between two)
KILLABLE = {"concepts": [], "counterfactual": ["--batch-size", "1"], "attack": ["--batch-size", "1"],
            "contrast": ["--class-pairs", "0:1,2:3"], "evaluate": ["--methods", "gradient,input_x_gradient"],
            "audit": ["--stages", "attack,smooth"]}


@pytest.mark.slow
@pytest.mark.parametrize("command", list(KILLABLE))
def test_sigkill_mid_run_then_rerun_loses_and_duplicates_nothing(tmp_path, command):
    import os

    from manifex.runs import read_jsonl

    env = {**os.environ, "MANIFEX_CACHE": str(tmp_path / "cache")}
    args, _ = COMMANDS[command]
    extra = KILLABLE[command]
    for flag in extra[::2]:
        if flag in args:
            i = args.index(flag)
            args = args[:i] + args[i + 2:]
    full = [command, *args, *extra, "--quiet", "--cache-dir", str(tmp_path / "cache")]
    clean = CliRunner().invoke(main, [*full, "--out", str(tmp_path / "clean")])
    assert clean.exit_code == 0, clean.output
    out = tmp_path / "killed"
    _kill_after_first_unit([*full, "--out", str(out)], out, env)
    again = CliRunner().invoke(main, [*full, "--out", str(out)])
    assert again.exit_code == 0, again.output
    clean_files = sorted((tmp_path / "clean").rglob("results*.jsonl"))  # the audit keeps them in its stage folders
    assert clean_files
    for f in clean_files:
        name = f.relative_to(tmp_path / "clean")
        ids = [r["id"] for r in read_jsonl(out / name)]
        assert len(ids) == len(set(ids)), f"duplicated units in {f.name}: {ids}"
        assert sorted(ids) == sorted(r["id"] for r in read_jsonl(f))


def _with_dataset(command, dataset):
    """The row's tiny arguments with --dataset replaced by ``dataset``."""
    args = list(COMMANDS[command][0])
    i = args.index("--dataset")
    args[i + 1] = dataset
    return args


@pytest.mark.parametrize("spec, needle", [("known:", "known:mnist5k"), ("known:nosuch", "nosuch")])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_bad_known_spec_is_refused_in_one_line_before_training(tmp_path, command, spec, needle, monkeypatch):
    """'known:' without its data, or with data that does not exist, is refused by every command in one line (exit 2)
    before anything is trained or cached."""
    def trained(*args, **kwargs):
        raise AssertionError("a model was trained before the error")

    monkeypatch.setattr(zoo, "fit_classifier", trained)
    monkeypatch.setattr(zoo, "fit_generative", trained)
    res = CliRunner().invoke(main, [command, *_with_dataset(command, spec), "--quiet", "--out", str(tmp_path / "out"),
                                    "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output, res.output
    assert len([line for line in res.output.splitlines() if line.strip()]) == 1, res.output
    assert not any((tmp_path / "cache").rglob("*.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("command", ["attack", "smooth", "concepts", "contrast"])
def test_known_data_runs_through_the_contracts_default_data_hooks(tmp_path, command):
    """attack, smooth, concepts and contrast take known:digits8 through the contract's default load_data/derive_data:
    the base data is claimed (digits8's fingerprint + the spec, as align claims it), the known manifold's settings
    are align's defaults (the same cached images as align's default run) and the checks say the manifold is known."""
    from manifex.data import load_dataset
    from manifex.models.known_manifold import KnownData
    from manifex.models.resolve import data_identity

    res = CliRunner().invoke(main, [command, *_with_dataset(command, "known:digits8"), "--quiet",
                                    "--out", str(tmp_path / "out")])  # the shared cache: align's known manifold
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "out" / "experiment.json").read_text())
    base = load_dataset("digits8")
    assert record["data"] == json.loads(json.dumps(data_identity("known:digits8", base.x, base.y)))
    assert record["known_manifold"] == KnownData().to_dict()
    checks = json.loads((tmp_path / "out" / "metrics.json").read_text())["checks"]
    assert any(c.startswith("known manifold: 6,000 + 1,000 images sampled from a VAE decoder") for c in checks), checks
    if command == "attack":  # the pairs come from the sampled test images, not from digits8's split
        assert any("from known-digits8-test" in c for c in checks), checks


@pytest.mark.parametrize("command", ["attack", "smooth"])
def test_pairs_beyond_the_known_test_images_are_refused_before_the_known_manifold_is_built(tmp_path, command, monkeypatch):
    """known:<data>'s test images are sampled after the claims; --pairs is still checked before anything is trained,
    against the number that will be sampled (align's 1,000)."""
    def trained(*args, **kwargs):
        raise AssertionError("a model was trained before the error")

    monkeypatch.setattr(zoo, "fit_classifier", trained)
    monkeypatch.setattr(zoo, "fit_generative", trained)
    args = _with_dataset(command, "known:digits8")
    args[args.index("--pairs") + 1] = "1001"
    res = CliRunner().invoke(main, [command, *args, "--quiet", "--out", str(tmp_path / "out"),
                                    "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 2 and "--pairs 1001" in res.output and "1000" in res.output, res.output
    assert len([line for line in res.output.splitlines() if line.strip()]) == 1, res.output
    assert not any((tmp_path / "cache").rglob("*.pt"))
