"""`manifex attack` and `manifex smooth` on the experiment contract: the identity guard covers the model and the
--pairs-csv images (not only the attack options), mistakes are refused before training, the Python API gives the
records of run_campaign, and a sweep extends with more β. Tiny runs on digits8 (8×8), 2 pairs, 2-3 steps."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

import manifex.models.zoo as zoo
from manifex.cli import main
from manifex.data import load_digits8
from manifex.experiment import run_experiment
from manifex.manipulation import (AttackConfig, AttackExperiment, SmoothConfig, SmoothExperiment, pairs_from_dataset,
                                  research_gamma, run_campaign)

ATTACK = ["attack", "--dataset", "digits8", "--epochs", "1", "--pairs", "2", "--iterations", "2", "--quiet"]
SMOOTH = ["smooth", "--dataset", "digits8", "--epochs", "1", "--pairs", "2", "--iterations", "2", "--quiet"]


def invoke(args, tmp_path, out="out"):
    return CliRunner().invoke(main, [*args, "--out", str(tmp_path / out), "--cache-dir", str(tmp_path / "cache")])


def one_line_error(res, *needles):
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture
def no_training(monkeypatch):
    monkeypatch.setattr(zoo, "fit_classifier", lambda *a, **k: pytest.fail("a classifier was trained before the error"))


@pytest.mark.parametrize("args, needles", [
    ([*ATTACK, "--lr", "0"], ["--lr", "> 0"]),
    ([*ATTACK, "--data-dir", "."], ["--data-dir", "--pairs-csv"]),
    ([*ATTACK, "--pairs-csv", "absent.csv"], ["--pairs-csv", "no such file"]),
    ([*ATTACK, "--method", "nope"], ["unknown method 'nope'"]),
    ([*ATTACK, "--gamma", "-1"], ["--gamma", ">= 0"]),
    ([*ATTACK, "--stop-pcc", "-1"], ["--stop-pcc", "(-1, 1]"]),
    ([*ATTACK, "--pairs", "100000"], ["--pairs 100000", "test split has only"]),
    ([*SMOOTH, "--betas", "10,10"], ["--betas", "more than once"]),
    ([*SMOOTH, "--betas", "10,nan"], ["--betas", "finite"]),
    ([*SMOOTH, "--lr", "-1"], ["--lr"]),
])
def test_mistakes_are_refused_before_training(tmp_path, no_training, args, needles):
    one_line_error(invoke(args, tmp_path), *needles)
    assert not list((tmp_path / "out").glob("results*.jsonl"))


@pytest.mark.slow
def test_attack_resume_refuses_another_model(tmp_path):
    """The records depend on the model: a resumed campaign of another classifier (another --epochs, other --weights)
    is refused in one line instead of reusing the first model's pairs."""
    first = invoke(ATTACK, tmp_path)
    assert first.exit_code == 0, first.output
    lines = (tmp_path / "out" / "results.jsonl").read_text()
    one_line_error(invoke([*ATTACK, "--epochs", "2"], tmp_path), "other settings", "epochs")
    assert (tmp_path / "out" / "results.jsonl").read_text() == lines

    (tmp_path / "nets.py").write_text(textwrap.dedent('''
        from torch import nn
        def build():
            return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
    '''))
    for i in (0, 1):
        torch.manual_seed(i)
        net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
        torch.save(net.state_dict(), tmp_path / f"w{i}.pt")
    user = [*ATTACK, "--model", f"{tmp_path / 'nets.py'}:build"]
    res = invoke([*user, "--weights", str(tmp_path / "w0.pt")], tmp_path, out="user")
    assert res.exit_code == 0, res.output
    one_line_error(invoke([*user, "--weights", str(tmp_path / "w1.pt")], tmp_path, out="user"), "other model", "fingerprint")


@pytest.mark.slow
def test_pairs_csv_images_are_part_of_the_identity(tmp_path):
    """Re-exported images under the same names make other pairs: a resume is refused (the CSV and the content of
    every image it names are claimed as data), an unchanged folder resumes with nothing new."""
    data = load_digits8()
    img = tmp_path / "imgs"
    img.mkdir()
    for i in range(4):
        Image.fromarray((data.x[i, 0].numpy() * 255).astype(np.uint8)).save(img / f"d{i}.png")
    (img / "pairs.csv").write_text("original,target\nd0.png,d1.png\nd2.png,d3.png\n")
    args = [*ATTACK, "--pairs-csv", str(img / "pairs.csv")]
    assert invoke(args, tmp_path).exit_code == 0
    claimed = json.loads((tmp_path / "out" / "experiment.json").read_text())["data"]["pairs_csv"]
    assert claimed["n_pairs"] == 2 and claimed["csv"] and claimed["images"]
    again = invoke(args, tmp_path)
    assert again.exit_code == 0 and json.loads((tmp_path / "out" / "metrics.json").read_text())["n_new"] == 0
    Image.fromarray((data.x[9, 0].numpy() * 255).astype(np.uint8)).save(img / "d3.png")
    one_line_error(invoke(args, tmp_path), "other data", "pairs_csv.images")


@pytest.mark.slow
def test_python_api_gives_the_records_of_run_campaign(tmp_path):
    """run_experiment(AttackExperiment(), ...) with an nn.Module attacks the same pairs with the same batch function as
    run_campaign: identical records (the same function on the same inputs in the same batches, in one process, so
    the same floating-point operations in the same order), and the model's parameters, requires_grad flags, buffers
    and hooks as they were."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10)).eval()
    net[1].register_forward_hook(lambda *a: None)
    net[0].bias.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = AttackConfig(dataset="digits8", n_pairs=3, iterations=3, lr=1e-2, batch_size=2, method="input_x_gradient")
    result = run_experiment(AttackExperiment(), cfg, tmp_path / "exp", model=net, progress=False,
                            cache_dir=tmp_path / "cache")
    _, test = load_digits8().split(0.2, seed=0)
    pairs = pairs_from_dataset(test, 3, seed=0)
    ref = run_campaign(net, "input_x_gradient", pairs, tmp_path / "ref", batch_size=2, iterations=3, lr=1e-2,
                       gamma=research_gamma(64, 10), map_loss="mse", epsilon=None, norm="linf", beta_growth=None,
                       stop_pcc=None)
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in result.records["pairs"]] == \
           [{k: v for k, v in r.items() if k not in drop} for r in ref.records]
    assert {k: v for k, v in result.summary["means"].items() if k != "seconds"} == \
           {k: v for k, v in ref.means.items() if k != "seconds"} and result.summary["n_pairs"] == ref.n_pairs == 3
    assert result.model_info.source == "python" and "Sequential" in json.loads((tmp_path / "exp" / "metrics.json").read_text())["model"]["classifier"]
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not net[0].bias.requires_grad and net[0].weight.requires_grad
    assert len(net[1]._forward_hooks) == 1 and not net[0]._forward_hooks and not net[0]._backward_hooks


@pytest.mark.slow
def test_smooth_extends_with_more_betas(tmp_path):
    """Every record is keyed by its β: a re-run with one more β computes only that model's units."""
    res = invoke([*SMOOTH, "--betas", "10"], tmp_path)
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    first = {p.name: p.read_text() for p in out.glob("results*.jsonl")}
    assert sorted(first) == ["results-attack-beta_10.jsonl", "results-attack-beta_inf.jsonl",
                             "results-curvature-beta_10.jsonl", "results-curvature-beta_inf.jsonl", "results.jsonl"]
    res = invoke([*SMOOTH, "--betas", "10,3"], tmp_path)
    assert res.exit_code == 0, res.output
    for name, text in first.items():
        assert (out / name).read_text().startswith(text)  # kept, and only the models stage gains a line (β=3)
    m = json.loads((out / "metrics.json").read_text())
    assert [(r["beta"], r["n_new"]) for r in m["sweep"]] == [("β=10", 0), ("β=3", 2), ("ReLU", 0)]
    assert m["model"]["classifier"] == "lenet" and m["model_info"]["fingerprint"] == m["model"]["fingerprint"]
    assert "β=3" in res.output and res.output.strip().splitlines()[-1] == f"report: {out / 'report.html'}"


def test_unbounded_numbers_are_plain_options_in_help():
    res = CliRunner().invoke(main, ["attack", "--help"])
    assert res.exit_code == 0 and "None" not in res.output, res.output
    assert "--lr FLOAT" in res.output and "--gamma FLOAT" in res.output


def test_configs_are_exported_and_frozen():
    import dataclasses

    assert SmoothConfig().betas == (30, 10, 5, 3) and SmoothConfig().budget == pytest.approx(32 / 255)
    with pytest.raises(dataclasses.FrozenInstanceError):
        AttackConfig().iterations = 3  # type: ignore[misc]
    assert isinstance(SmoothExperiment(), SmoothExperiment) and SmoothExperiment.command == "smooth"


def test_run_campaign_refusal_names_the_python_way_out(tmp_path):
    """run_campaign is called from Python: a changed setting on resume names resume=False and out_dir, not CLI flags."""
    from manifex.errors import InputError

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(128, 10)).eval()
    pairs = pairs_from_dataset(load_digits8(), 1, seed=0)
    opts = dict(figures=False, lr=1e-2, beta_growth=(10.0, 100.0))
    run_campaign(net, "gradient", pairs, tmp_path, iterations=1, **opts)
    with pytest.raises(InputError, match="other settings") as e:
        run_campaign(net, "gradient", pairs, tmp_path, iterations=2, **opts)
    assert "resume=False" in str(e.value) and "out_dir" in str(e.value) and "--" not in str(e.value)
    assert run_campaign(net, "gradient", pairs, tmp_path, iterations=2, resume=False, **opts).n_new == 1
