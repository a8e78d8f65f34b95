"""Options of the manipulation system that reach every model call (issue 10, loose ends):

- ``output=`` (the logits of a model returning a dict) in the campaign, the β sweep and the accuracy and
  curvature helpers — also where they call the model outside ``manipulate`` (the target images' classes,
  the model check, accuracy, the curvature's predicted class): the same records as the plain model, and
  without it a clear error naming the option;
- ``unsupported=`` (β-smoothing of activations it cannot smooth, e.g. SELU) through ``manipulate``'s
  β-growth, the defence functions and ``manifex attack``/``manifex smooth --unsupported``.

Models are tiny random CNNs on 8×8 digits, 2 pairs, 5 attack iterations.
"""
from __future__ import annotations

import json
import textwrap

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from manifex.cli import main
from manifex.data import load_digits8
from manifex.errors import InputError, ModelError
from manifex.manipulation import manipulate, pairs_from_dataset, research_gamma, run_campaign
from manifex.manipulation.defence import (
    accuracy_across_beta,
    explanations_across_beta,
    hessian_top_eigenvalue,
    robustness_sweep,
)

ATTACK = dict(iterations=5, lr=1e-2, gamma=research_gamma(64, 10))
KEYS = ("pcc_orig_target", "pcc_manip_target", "max_dp", "linf", "class_target_image", "explained_class")


def tiny_cnn(activation: type[nn.Module] = nn.ReLU, seed: int = 0) -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), activation(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 10),
        ).eval()


class DictOut(nn.Module):
    """A Hugging Face style output: ``{"aux": ..., "logits": ...}``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return {"aux": x.flatten(1).mean(1), "logits": self.net(x)}


@pytest.fixture(scope="module")
def data():
    _, test = load_digits8().split(0.2, seed=0)
    return test


@pytest.fixture(scope="module")
def pairs(data):
    return pairs_from_dataset(data, 2, seed=0)


def _same_records(a: list[dict], b: list[dict]) -> None:
    assert [r["id"] for r in a] == [r["id"] for r in b]
    for ra, rb in zip(a, b):
        for k in KEYS:
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), k


def test_campaign_takes_the_output_selector(pairs, tmp_path):
    net = tiny_cnn()
    ref = run_campaign(net, "gradient", pairs, tmp_path / "plain", figures=False, beta_growth=(10.0, 100.0), **ATTACK)
    wrapped = DictOut(net)
    with pytest.raises(InputError, match='output="logits"'):
        run_campaign(wrapped, "gradient", pairs, tmp_path / "none", figures=False, beta_growth=(10.0, 100.0), **ATTACK)
    got = run_campaign(wrapped, "gradient", pairs, tmp_path / "dict", figures=False, output="logits",
                       beta_growth=(10.0, 100.0), **ATTACK)
    _same_records(got.records, ref.records)
    assert json.loads((tmp_path / "dict" / "experiment.json").read_text())["settings"]["output"] == "logits"
    assert "output" not in json.loads((tmp_path / "plain" / "experiment.json").read_text())["settings"]
    # an explainer built with output= carries it into the campaign
    again = run_campaign(wrapped, "gradient", pairs, tmp_path / "expl", figures=False, explainer_options={"output": "logits"},
                         beta_growth=(10.0, 100.0), **ATTACK)
    _same_records(again.records, ref.records)


def _same_sweep(a: list[dict], b: list[dict]) -> None:
    assert [r["beta"] for r in a] == [r["beta"] for r in b]
    for ra, rb in zip(a, b):
        for k in ("pcc_orig_target", "pcc_manip_target", "max_dp", "accuracy", "accuracy_relu", "curvature"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), k


@pytest.mark.slow
def test_sweep_and_defence_helpers_take_the_output_selector(data, pairs, tmp_path):
    net = tiny_cnn()
    wrapped = DictOut(net)
    opts = dict(data=data, figures=False, curvature_iterations=5, **ATTACK)
    ref = robustness_sweep(net, "gradient", pairs, [10.0, float("inf")], tmp_path / "plain", **opts)
    with pytest.raises(InputError, match='output="logits"'):
        robustness_sweep(wrapped, "gradient", pairs, [10.0, float("inf")], tmp_path / "none", **opts)
    got = robustness_sweep(wrapped, "gradient", pairs, [10.0, float("inf")], tmp_path / "dict", output="logits", **opts)
    _same_sweep(got, ref)
    x = data.x[:3]
    assert accuracy_across_beta(wrapped, data, [10.0], output="logits") == accuracy_across_beta(net, data, [10.0])
    torch.testing.assert_close(hessian_top_eigenvalue(wrapped, x, beta=10.0, iterations=5, output="logits"),
                               hessian_top_eigenvalue(net, x, beta=10.0, iterations=5))
    maps = explanations_across_beta(wrapped, x, betas=[10.0], output="logits")
    for beta, m in explanations_across_beta(net, x, betas=[10.0]).items():
        torch.testing.assert_close(maps[beta], m)
    for call in (lambda: accuracy_across_beta(wrapped, data, [10.0]), lambda: hessian_top_eigenvalue(wrapped, x, beta=10.0),
                 lambda: explanations_across_beta(wrapped, x, betas=[10.0])):
        with pytest.raises(InputError, match='output="logits"'):
            call()


def test_unsupported_activation_policy_reaches_attack_and_defence(data, pairs, tmp_path):
    """SELU has a kink at 0 that softplus cannot smooth: refused by default (ModelError naming the option),
    left as it is with "ignore" (then a SELU-only model is the same at every β) and warned about with "warn"."""
    net = tiny_cnn(nn.SELU)
    x = data.x[:2]
    tmap = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0))
    attack = dict(beta_growth=(10.0, 100.0), iterations=2, lr=1e-2)
    with pytest.raises(ModelError, match=r"SELU.*unsupported="):
        manipulate(net, "gradient", x, tmap, **attack)
    manipulate(net, "gradient", x, tmap, unsupported="ignore", **attack)
    with pytest.warns(UserWarning, match="SELU"):
        manipulate(net, "gradient", x, tmap, unsupported="warn", **attack)
    with pytest.raises(InputError, match="'raise', 'warn' or 'ignore'"):
        manipulate(net, "gradient", x, tmap, unsupported="skip", **attack)

    for call in (lambda **k: accuracy_across_beta(net, data, [3.0], **k),
                 lambda **k: hessian_top_eigenvalue(net, x, beta=3.0, iterations=3, **k),
                 lambda **k: explanations_across_beta(net, x, betas=[3.0], **k)):
        with pytest.raises(ModelError, match="SELU"):
            call()
    acc = accuracy_across_beta(net, data, [3.0], unsupported="ignore")
    assert acc[3.0] == acc[float("inf")]  # nothing was smoothed
    maps = explanations_across_beta(net, x, betas=[3.0], unsupported="ignore")
    torch.testing.assert_close(maps[3.0], maps[float("inf")])

    sweep = dict(figures=False, curvature_iterations=3, iterations=2, lr=1e-2)
    with pytest.raises(ModelError, match="SELU"):
        robustness_sweep(net, "gradient", pairs, [3.0], tmp_path / "raise", **sweep)
    assert not (tmp_path / "raise").exists(), "refused before any file was written"
    records = robustness_sweep(net, "gradient", pairs, [3.0, float("inf")], tmp_path / "ignore", unsupported="ignore", **sweep)
    assert [r["beta"] for r in records] == [3.0, float("inf")]
    settings = json.loads((tmp_path / "ignore" / "beta_inf" / "experiment.json").read_text())["settings"]
    assert settings["attack"]["unsupported"] == "ignore" and settings["attack"]["beta_growth"] == [10.0, 100.0]


SELU_FILE = textwrap.dedent('''
    from torch import nn

    def build():
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.SELU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 10))
''')


@pytest.mark.slow
@pytest.mark.parametrize("command", ["attack", "smooth"])
def test_cli_unsupported_option(command, tmp_path, monkeypatch):
    """A model with SELU: refused before any work with a one-line error naming --unsupported (exit 2); runs
    with --unsupported ignore."""
    import manifex.models.zoo as zoo

    monkeypatch.setattr(zoo, "fit_classifier", lambda *a, **k: pytest.fail("trained a built-in classifier"))
    (tmp_path / "selu_net.py").write_text(SELU_FILE)
    args = [command, "--dataset", "digits8", "--model", f"{tmp_path / 'selu_net.py'}:build", "--quiet",
            "--cache-dir", str(tmp_path / "cache"), "--iterations", "2",
            *(["--pairs", "1"] if command == "attack" else ["--pairs", "1", "--betas", "10"])]
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "refused")])
    assert res.exit_code == 2, (res.output, res.exception)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.output, res.output
    assert "SELU" in lines[0] and "--unsupported ignore" in lines[0], lines[0]
    refused = tmp_path / "refused"
    assert not list(refused.glob("results*.jsonl")) and not (refused / "units").exists()  # refused before any unit

    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "ok"), "--unsupported", "ignore"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert (tmp_path / "ok" / "report.html").is_file()
    if command == "attack":
        settings = json.loads((tmp_path / "ok" / "metrics.json").read_text())["settings"]
        assert settings["attack"]["unsupported"] == "ignore"
    assert json.loads((tmp_path / "ok" / "experiment.json").read_text())["settings"]["unsupported"] == "ignore"
