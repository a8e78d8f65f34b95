"""The experiment contract's own parts: the folder's identity guard, --overwrite, artefacts loaded safely, the one
metrics encoder, errors that speak parameter names or flags, generated options, and run_experiment's corridor
(order of the hooks, checks before training, the Python API equal to the command)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import click
import pytest
import torch
from click.testing import CliRunner

from manifex.errors import DataError, InputError, param, speaking_flags
from manifex.experiment import Experiment, ExperimentFolder, Stage, run_experiment, setting, write_metrics
from manifex.runs import Unit, read_jsonl


def test_claim_refuses_any_changed_key_on_resume_and_names_it(tmp_path):
    f = ExperimentFolder(tmp_path / "o", command="demo")
    f.claim("settings", {"a": 1, "nested": {"b": 2}})
    (f.path / "results.jsonl").write_text('{"id": "u0"}\n')
    ExperimentFolder(tmp_path / "o", command="demo").claim("settings", {"a": 1, "nested": {"b": 2}})  # same: resumes
    with pytest.raises(InputError) as e:
        ExperimentFolder(tmp_path / "o", command="demo").claim("settings", {"a": 1, "nested": {"b": 3}, "c": 0})
    text = str(e.value)
    assert "settings.nested.b: 2 -> 3" in text and "settings.c: (not set) -> 0" in text and "overwrite" in text
    assert "settings.a" not in text
    with pytest.raises(InputError, match="holds a demo run, not other"):
        ExperimentFolder(tmp_path / "o", command="other").claim("settings", {"a": 1, "nested": {"b": 2}})
    # resume=False starts over in place: the records and their identity go
    g = ExperimentFolder(tmp_path / "o", command="demo", resume=False)
    assert not (g.path / "results.jsonl").exists()
    g.claim("settings", {"a": 5})
    assert json.loads(g.file.read_text())["settings"] == {"a": 5}


def test_a_folder_without_identity_or_with_a_corrupt_one_is_refused(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "results.jsonl").write_text('{"id": "u0"}\n')
    with pytest.raises(InputError, match="no experiment.json"):
        ExperimentFolder(out, command="demo").claim("settings", {})
    (out / "experiment.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable"):
        ExperimentFolder(out, command="demo").claim("settings", {})
    # without results any folder takes any settings (nothing to mix with)
    ExperimentFolder(tmp_path / "fresh", command="demo").claim("settings", {"x": 1})


def test_overwrite_moves_the_old_folder_aside(tmp_path):
    f = ExperimentFolder(tmp_path / "o", command="demo")
    f.claim("settings", {"a": 1})
    (f.path / "results.jsonl").write_text('{"id": "u0"}\n')
    g = ExperimentFolder(tmp_path / "o", command="demo", overwrite=True)
    assert g.moved_to is not None and g.moved_to.name.startswith("o.replaced-")
    assert (g.moved_to / "results.jsonl").read_text() == '{"id": "u0"}\n'
    assert not any(g.path.iterdir())
    g.claim("settings", {"a": 2})  # a fresh folder takes the new settings
    h = ExperimentFolder(tmp_path / "o", command="demo", overwrite=True)  # any non-empty folder is moved, each to its own name
    assert h.moved_to is not None and h.moved_to != g.moved_to


class _Crafted:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_artefacts_are_keyed_rebuilt_and_never_unpickled(tmp_path):
    f = ExperimentFolder(tmp_path / "o", command="demo")
    calls = []

    def build():
        calls.append(1)
        return {"w": torch.arange(3.0), "n": 3}

    a = f.artefact("planes", {"k": 1}, build)
    b = f.artefact("planes", {"k": 1}, build)
    assert len(calls) == 1 and torch.equal(a["w"], b["w"]) and b["n"] == 3
    f.artefact("planes", {"k": 2}, build)  # another key: rebuilt, never silently reused
    assert len(calls) == 2
    marker = tmp_path / "pwned"
    torch.save(_Crafted(str(marker)), f.path / "artefacts" / "planes.pt")
    c = f.artefact("planes", {"k": 2}, build)
    assert not marker.exists() and len(calls) == 3 and torch.equal(c["w"], a["w"])
    (f.path / "artefacts" / "planes.pt").write_bytes(b"truncated")
    f.artefact("planes", {"k": 2}, build)
    assert len(calls) == 4


def test_write_metrics_is_strict_json_and_flags_nonfinite(tmp_path):
    p = write_metrics(tmp_path / "metrics.json", {"a": 1.0, "b": {"c": float("nan"), "d": [1.0, float("inf")]}, "t": torch.tensor(2.0)})
    data = json.loads(p.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert data["b"]["c"] is None and data["b"]["d"] == [1.0, None] and data["t"] == 2.0
    assert data["nonfinite"] == ["b.c", "b.d[1]"]
    assert "nonfinite" not in json.loads(write_metrics(tmp_path / "m2.json", {"a": 1.0}).read_text())
    assert math.isfinite(data["a"])


def test_errors_speak_parameter_names_in_python_and_flags_under_the_cli():
    assert param("layer") == "layer" and param("layer", "x") == "layer='x'" and param("overwrite", True) == "overwrite=True"
    with speaking_flags({"out_dir": "--out"}):
        assert param("layer", "x") == "--layer x" and param("out_dir") == "--out"
        assert param("overwrite", True) == "--overwrite" and param("resume", False) == "--no-resume"
        assert param("num_classes", 58) == "--num-classes 58"
    assert param("out_dir") == "out_dir"  # the mapping ends with the block


# ------------------------------------------------------------------------------------------------------------------
# run_experiment's corridor, with a tiny experiment that records the order of its hooks
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TinyConfig:
    dataset: str = setting("digits8", "data")
    classifier: str = setting("mlp", "net", choices=("mlp", "lenet"))
    epochs: int = setting(1, "epochs", low=1)
    units: int = setting(3, "how many units", low=1)
    scale: float = setting(1.0, "a result setting", low=0.0)
    batch: int = setting(2, "units per batch", low=1, result=False)
    flag: bool = setting(False, "a flag")
    items: tuple[int, ...] | None = setting(None, "a list", parse="ints")
    seed: int = setting(0, "seed", cli=False)
    device: str = setting("cpu", "device", result=False, cli=False)


def _process(units, ctx, out):
    return [{"id": u.id, "value": ctx["scale"] * u.payload["i"]} for u in units]


class Tiny(Experiment):
    command = "tiny"

    def __init__(self, fail_in_check=False):
        self.calls = []
        self.fail_in_check = fail_in_check

    def check_data(self, run):
        self.calls.append("check_data")
        if self.fail_in_check:
            raise InputError(f"{param('units', run.config.units)} is too many")

    def resolve_model(self, run):
        self.calls.append("resolve_model")
        super().resolve_model(run)

    def prepare(self, run):
        self.calls.append("prepare")
        return {"scale": run.config.scale}

    def plan(self, run, context):
        yield Stage("main", [Unit(f"u{i}", {"i": i}) for i in range(run.config.units)], _process, context,
                    batch_size=run.config.batch)
        yield Stage("second", [Unit("total", {"i": len(run.records["main"])})], _process, context)

    def summarize(self, run, context):
        return {"total": sum(r["value"] for r in run.records["main"])}

    def findings(self, run, summary):
        return [f"total {summary['total']}"]


def test_run_experiment_walks_the_corridor_and_resumes(tmp_path):
    cache = tmp_path / "cache"
    exp = Tiny()
    res = run_experiment(exp, TinyConfig(), tmp_path / "o", cache_dir=cache, progress=False)
    assert exp.calls == ["check_data", "resolve_model", "prepare"]
    assert res.summary == {"total": 3.0} and res.findings == ["total 3.0"] and res.n_new == {"main": 3, "second": 1}
    assert [r["id"] for r in read_jsonl(tmp_path / "o" / "results.jsonl")] == ["u0", "u1", "u2"]
    assert [r["value"] for r in read_jsonl(tmp_path / "o" / "results-second.jsonl")] == [3.0]
    recorded = json.loads((tmp_path / "o" / "experiment.json").read_text())
    assert recorded["settings"] == {"dataset": "digits8", "classifier": "mlp", "epochs": 1, "units": 3, "scale": 1.0,
                                    "flag": False, "items": None, "seed": 0}  # batch and device never change a record
    assert recorded["model"]["source"] == "built-in" and res.model_info.accuracy > 0.5
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["model"]["name"] == "mlp" and metrics["total"] == 3.0
    # resume: nothing new; a run field may change; a result setting may not (refused before the model is resolved)
    exp2 = Tiny()
    again = run_experiment(exp2, TinyConfig(batch=1), tmp_path / "o", cache_dir=cache, progress=False)
    assert again.n_new == {"main": 0, "second": 0}
    exp3 = Tiny()
    with pytest.raises(InputError, match=r"settings.scale: 1.0 -> 2.0"):
        run_experiment(exp3, TinyConfig(scale=2.0), tmp_path / "o", cache_dir=cache, progress=False)
    assert exp3.calls == ["check_data"]


def test_checks_come_before_the_folder_and_the_model(tmp_path):
    exp = Tiny(fail_in_check=True)
    with pytest.raises(InputError, match="units=3 is too many"):
        run_experiment(exp, TinyConfig(), tmp_path / "o", cache_dir=tmp_path / "cache", progress=False)
    assert exp.calls == ["check_data"] and not (tmp_path / "o").exists()  # not even an empty --out folder
    assert not any((tmp_path / "cache").rglob("*.pt"))
    # the same with a nested --out: every folder the write check made goes again; an existing one stays
    with pytest.raises(InputError):
        run_experiment(Tiny(fail_in_check=True), TinyConfig(), tmp_path / "a" / "b", cache_dir=tmp_path / "cache",
                       progress=False)
    assert not (tmp_path / "a").exists() and (tmp_path / "cache").is_dir()


def test_generated_options_follow_the_config_fields(tmp_path):
    from manifex.cli import main as group
    from manifex.cli.common import run_options
    from manifex.cli.generate import config_from_params, config_options, run_params

    seen = {}

    @click.command()
    @config_options(TinyConfig)
    @run_options("runs/tiny")
    def tiny(**params):
        seen["config"] = config_from_params(TinyConfig, params)
        seen["run"] = run_params(params)

    names = {p.name: p for p in tiny.params}
    assert "seed" not in names and "device" not in names  # cli=False: shared environment options
    assert list(names["classifier"].type.choices) == ["mlp", "lenet"] and names["epochs"].type.min == 1
    assert names["flag"].is_flag and "a list" in names["items"].help
    res = CliRunner().invoke(tiny, ["--units", "5", "--items", "1,2", "--flag", "--classifier", "lenet", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert seen["config"] == TinyConfig(units=5, items=(1, 2), flag=True, classifier="lenet")
    assert seen["run"]["overwrite"] is True and seen["run"]["model"] is None
    bad = CliRunner().invoke(tiny, ["--units", "0"])
    assert bad.exit_code == 2 and "--units" in bad.output
    bad = CliRunner().invoke(tiny, ["--items", "a,b"])
    assert bad.exit_code == 2 and "comma-separated integers" in bad.output
    assert group is not None


@pytest.mark.slow
def test_concepts_python_api_equals_the_command(tmp_path):
    """run_experiment(ConceptsExperiment(), ConceptsConfig(...)) writes the records the command writes."""
    from manifex.cli import main
    from manifex.concepts.experiment import ConceptsConfig, ConceptsExperiment

    cache = tmp_path / "cache"
    args = ["--dataset", "digits8", "--epochs", "1", "--layer", "blocks.1", "--pool", "2", "--classes", "0,1",
            "--components", "2", "--images-per-class", "6", "--noise-samples", "1", "--controls", "2", "--top-k", "2"]
    res = CliRunner().invoke(main, ["concepts", *args, "--quiet", "--cache-dir", str(cache), "--out", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    cfg = ConceptsConfig(dataset="digits8", epochs=1, layer="blocks.1", pool=2, classes=(0, 1), components=2,
                         images_per_class=6, samples=1, controls=2, top_k=2)
    result = run_experiment(ConceptsExperiment(), cfg, tmp_path / "api", cache_dir=cache, progress=False)
    assert result.report is not None and result.report.is_file()
    assert read_jsonl(tmp_path / "api" / "results.jsonl") == read_jsonl(tmp_path / "cli" / "results.jsonl")


def test_a_python_model_is_left_as_found_and_keeps_its_device(tmp_path):
    """run_experiment with an nn.Module: train flags, requires_grad and hooks restored, also after an error."""
    from manifex.models.classifiers import MLP

    torch.manual_seed(0)
    net = MLP((1, 8, 8), 10).train()
    net.requires_grad_(False)
    hooks = dict(net._forward_hooks)
    res = run_experiment(Tiny(), TinyConfig(units=1), tmp_path / "o", model=net, cache_dir=tmp_path / "cache", progress=False)
    assert res.model_info.source == "python" and net.training and not any(p.requires_grad for p in net.parameters())
    assert dict(net._forward_hooks) == hooks

    class Boom(Tiny):
        def prepare(self, run):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_experiment(Boom(), TinyConfig(units=1), tmp_path / "p", model=net, cache_dir=tmp_path / "cache", progress=False)
    assert net.training


def test_a_renamed_flag_still_works_for_one_release_with_a_warning():
    """One meaning per flag across commands: concepts' --samples (noise samples; align's --samples counts images)
    is now --noise-samples, contrast's --pairs (class pairs; attack's --pairs counts image pairs) --class-pairs.
    The old names still work, with a warning, and are no longer listed in --help; both names at once are refused."""
    from manifex.cli.generate import config_from_params, config_options

    @dataclass(frozen=True)
    class Renamed:
        noise: int = setting(20, "noise samples", low=0, flag="--noise-samples", old_flags=("--samples",))

    seen = {}

    @click.command()
    @config_options(Renamed)
    def cmd(**params):
        seen["config"] = config_from_params(Renamed, params)

    res = CliRunner().invoke(cmd, ["--samples", "3"])
    assert res.exit_code == 0 and seen["config"].noise == 3, res.output
    assert "--samples is renamed --noise-samples" in res.output
    res = CliRunner().invoke(cmd, ["--noise-samples", "4"])
    assert res.exit_code == 0 and seen["config"].noise == 4 and "renamed" not in res.output
    res = CliRunner().invoke(cmd, ["--noise-samples", "4", "--samples", "3"])
    assert res.exit_code == 2 and "give --noise-samples only" in res.output
    help_text = CliRunner().invoke(cmd, ["--help"]).output
    assert "--noise-samples" in help_text and "--samples" not in help_text.replace("--noise-samples", "")
    from manifex.cli import main

    for command, new, old in (("concepts", "--noise-samples", "--samples"), ("contrast", "--class-pairs", "--pairs")):
        text = CliRunner().invoke(main, [command, "--help"]).output
        assert new in text and old + " " not in text
