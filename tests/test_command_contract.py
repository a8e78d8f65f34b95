"""One table over the experiment commands, and the promises every one of them keeps (the start of the generated
command battery of the experiment contract): a changed result setting on resume is refused in one line and
computes nothing; an environment mistake exits 2 before anything is trained; your own --model is what the report
and metrics.json name. A new command joins by adding its row."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch
from click.testing import CliRunner

import manifex.models.zoo as zoo
from manifex.cli import main
from manifex.data import load_digits8

#: command -> (tiny arguments on digits8, a result setting changed on resume, or None where the command resumes
#: from the model cache by key: align's changed settings are new cache entries, never mixed with old ones)
COMMANDS = {
    "align": (["--dataset", "known:digits8", "--samples", "8", "--n-train", "50", "--n-test", "16", "--vae-epochs", "1",
               "--epochs", "1", "--methods", "gradient", "--allow-degenerate"], None),
    "attack": (["--dataset", "digits8", "--epochs", "1", "--pairs", "2", "--iterations", "2"], ["--iterations", "3"]),
    "smooth": (["--dataset", "digits8", "--epochs", "1", "--pairs", "2", "--iterations", "2", "--betas", "10"],
               ["--iterations", "3"]),
    "counterfactual": (["--dataset", "digits8", "--epochs", "1", "--space", "pixel", "--n", "2", "--max-steps", "3"],
                       ["--max-steps", "4"]),
    "concepts": (["--dataset", "digits8", "--epochs", "1", "--layer", "blocks.1", "--pool", "2", "--classes", "0,1",
                  "--components", "2", "--images-per-class", "6", "--samples", "1", "--controls", "2", "--top-k", "2"],
                 ["--components", "3"]),
    "contrast": (["--dataset", "digits8", "--epochs", "1", "--layer", "blocks.1", "--pairs", "0:1", "--images-per-class", "6",
                  "--noise-samples", "1", "--random-directions", "1", "--components", "2"], ["--random-directions", "2"]),
    # the manifold-aware metrics only: the row needs no Quantus (the optional eval extra)
    "evaluate": (["--dataset", "digits8", "--epochs", "1", "--n", "4", "--methods", "gradient", "--metrics",
                  "TangentAlignment,ManifoldDeletion", "--vae-epochs", "1", "--curve-steps", "3", "--infill-steps", "5"],
                 ["--curve-steps", "4"]),
}
#: the layer of the user's network below, for the commands that read one
USER_LAYER = {"concepts": ["--layer", "features.1", "--pool", "4"], "contrast": ["--layer", "features.1"]}

USER_FILE = textwrap.dedent('''
    import torch
    from torch import nn

    class UserNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10))

        def forward(self, x):
            return self.head(self.features(x))

    def build():
        return UserNet()
''')


def run(command, tmp_path, *extra, cache=True):
    args, _ = COMMANDS[command]
    return CliRunner().invoke(main, [command, *args, *extra, "--quiet", "--out", str(tmp_path / "out"),
                                     *(["--cache-dir", str(tmp_path / "cache")] if cache else [])])


def results(folder):
    """Every results file of a run folder (smooth keeps one campaign per β)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("results.jsonl"))}


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    """The user's file and its weights, trained for a second on digits8 so that it predicts every class."""
    import importlib.util

    root = tmp_path_factory.mktemp("contract_user")
    (root / "user_nets.py").write_text(USER_FILE)
    spec = importlib.util.spec_from_file_location("user_nets_for_contract", root / "user_nets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    net, data = mod.build(), load_digits8()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(data.x), data.y).backward()
        opt.step()
    torch.save(net.state_dict(), root / "w.pt")
    return f"{root / 'user_nets.py'}:build", str(root / "w.pt")


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
