"""Your own model: a network defined in a user's file, with its weights, through `attack` and `smooth` from the
CLI and through the Python API (the same campaign gives the same numbers both ways)."""
from __future__ import annotations

import importlib.util
import json
import textwrap

import pytest
import torch
from click.testing import CliRunner

import manifex
import manifex.models.zoo as zoo
from manifex.cli import main
from manifex.data import load_digits8
from manifex.errors import InputError, ModelError
from manifex.manipulation import pairs_from_dataset, research_gamma, run_campaign
from manifex.models.user import Normalize, check_classifier, load_model

USER_FILE = textwrap.dedent('''
    import torch
    from torch import nn

    class SmallNet(nn.Module):
        """The user's classifier: 8x8 digits (normalised with mean 0.3, std 0.4) -> 10 logits."""

        def __init__(self, hidden=32):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

        def forward(self, x):
            return self.body(x)

    def build():
        return SmallNet(hidden=32)
''')
MEAN, STD = 0.3, 0.4


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    """A model file and its weights, trained briefly on normalised digits8 (as a user would have done)."""
    root = tmp_path_factory.mktemp("user")
    (root / "my_nets.py").write_text(USER_FILE)
    spec = importlib.util.spec_from_file_location("my_nets_for_test", root / "my_nets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    net = mod.build()
    data = load_digits8()
    x, y = (data.x - MEAN) / STD, data.y
    opt = torch.optim.Adam(net.parameters(), lr=3e-2)
    for _ in range(40):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    torch.save(net.state_dict(), root / "small.pt")
    return root, mod


def _cli(root, command, out, *extra):
    args = [command, "--dataset", "digits8", "--model", f"{root / 'my_nets.py'}:build", "--weights", str(root / "small.pt"),
            "--normalize", f"{MEAN},{STD}", "--pairs", "2", "--iterations", "3", "--quiet", "--out", str(out),
            "--cache-dir", str(root / "cache"), *extra]
    return CliRunner().invoke(main, args)


@pytest.fixture
def no_training(monkeypatch):
    monkeypatch.setattr(zoo, "fit_classifier", lambda *a, **k: pytest.fail("trained a built-in classifier"))


@pytest.mark.slow
def test_attack_cli_runs_the_users_model_and_matches_the_python_api(user_model, tmp_path, no_training):
    root, mod = user_model
    res = _cli(root, "attack", tmp_path / "cli")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert m["model"]["source"] == "your model (--model)" and m["model"]["test accuracy"] > 0.8
    assert m["model"]["normalize"] == {"mean": [MEAN], "std": [STD]} and m["warnings"] == []
    assert any("logits of shape (8, 10)" in c for c in m["checks"])
    html = (tmp_path / "cli" / "report.html").read_text()
    assert 'class="checks"' in html and "my_nets.py:build" in html

    # The same campaign through the Python API: the user's class, its weights, the normalisation wrapper.
    net = mod.SmallNet()
    net.load_state_dict(torch.load(root / "small.pt", weights_only=True))
    model = Normalize(net, mean=[MEAN], std=[STD]).eval()
    _, test = load_digits8().split(0.2, seed=0)
    summary = run_campaign(model, "gradient", pairs_from_dataset(test, 2, seed=0), tmp_path / "api", iterations=3,
                           lr=1e-3, gamma=research_gamma(64, 10), beta_growth=(10.0, 100.0), figures=False)
    cli_records = [json.loads(line) for line in (tmp_path / "cli" / "results.jsonl").read_text().splitlines()]
    assert [r["pair_id"] for r in summary.records] == [r["pair_id"] for r in cli_records]
    for api, cli in zip(summary.records, cli_records):
        for key in ("pcc_orig_target", "pcc_manip_target", "max_dp", "linf"):
            assert api[key] == pytest.approx(cli[key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_smooth_cli_runs_the_users_model(user_model, tmp_path, no_training):
    root, _ = user_model
    res = _cli(root, "smooth", tmp_path / "o", "--betas", "10")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert [r["beta"] for r in m["sweep"]] == ["β=10", "ReLU"]
    assert m["accuracy"]["ReLU"] > 0.8 and m["model"]["classifier"].endswith("my_nets.py:build")
    assert m["budget_linf"] == pytest.approx(32 / 255)
    assert not (root / "cache").exists() or not list((root / "cache").glob("*.pt"))


def test_python_api_takes_the_users_model_directly(user_model):
    root, mod = user_model
    net = load_model(f"{root / 'my_nets.py'}:SmallNet", weights=root / "small.pt")
    assert isinstance(net, torch.nn.Module) and not net.training
    model = Normalize(net, mean=[MEAN], std=[STD])
    x = load_digits8().x[:4]
    torch.testing.assert_close(model(x), net((x - MEAN) / STD))  # the wrapper is exactly the normalisation
    E = manifex.explain(model, x, target=0, method="gradient")
    assert E.shape == x.shape and torch.isfinite(E).all()
    assert check_classifier(model, x, 10).shape == (4, 10)


def test_wrong_models_are_refused_with_the_reason(user_model):
    root, _ = user_model
    x = load_digits8().x[:4]
    with pytest.raises(ModelError, match="10 outputs but the data has 3 classes"):
        check_classifier(load_model(f"{root / 'my_nets.py'}:build"), x, 3)
    with pytest.raises(ModelError, match=r"returns shape \(4, 1, 8, 8\)"):
        check_classifier(torch.nn.Identity(), x, 10)
    with pytest.raises(ModelError, match="NaN/inf"):
        check_classifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10), torch.nn.Softmax(1),
                                             torch.nn.Threshold(2.0, float("nan"))), x, 10)
    with pytest.raises(InputError, match="callables there: SmallNet, build"):
        load_model(f"{root / 'my_nets.py'}:Nope")
    with pytest.raises(InputError, match="state dict .* weights="):
        load_model(str(root / "small.pt"))
    with pytest.raises(ModelError, match="does not fit the model"):
        torch.save({"body.1.weight": torch.zeros(5, 5)}, root / "bad.pt")
        load_model(f"{root / 'my_nets.py'}:build", weights=root / "bad.pt")


def test_exported_and_torchscript_models_load(user_model, tmp_path):
    root, _ = user_model
    net = load_model(f"{root / 'my_nets.py'}:build", weights=root / "small.pt")
    x = load_digits8().x[:5]
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(net, (x[:2],), dynamic_shapes=({0: batch},)), tmp_path / "net.pt2")
    torch.jit.trace(net, x[:2]).save(str(tmp_path / "net.ts"))
    for path in ("net.pt2", "net.ts"):
        loaded = load_model(str(tmp_path / path))
        loaded.eval()  # an exported program's own .eval() raises; the loaded one must not
        torch.testing.assert_close(check_classifier(loaded, x, 10), net(x))


@pytest.mark.slow
def test_align_cli_scores_the_users_model(user_model, tmp_path):
    root, _ = user_model
    args = ["align", "--dataset", "known:digits8", "--model", f"{root / 'my_nets.py'}:build", "--weights",
            str(root / "small.pt"), "--normalize", f"{MEAN},{STD}", "--samples", "8", "--n-train", "50", "--n-test", "16",
            "--vae-epochs", "1", "--methods", "gradient", "--allow-degenerate", "--quiet", "--out", str(tmp_path / "o"),
            "--cache-dir", str(tmp_path / "c")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "scoring your model only" in res.output  # the l2-robust fine-tune needs a built-in architecture
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert set(m["scores"]) == {"your model"} and set(m["scores"]["your model"]) == {"gradient", "random"}
    assert m["seed_reference"] == {} and any("logits of shape (8, 10)" in c for c in m["checks"])
    assert (tmp_path / "o" / "parts_your_model.png").stat().st_size > 0


DICT_FILE = textwrap.dedent('''
    import torch
    from torch import nn

    class DictNet(nn.Module):
        """A user's conv net whose forward returns a dict, as many research models do."""

        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10))

        def forward(self, x):
            h = self.features(x)
            return {"logits": self.head(h), "features": h}

    def build():
        torch.manual_seed(0)
        return DictNet()
''')


@pytest.fixture(scope="module")
def dict_model(tmp_path_factory):
    """The dict-returning net, trained briefly on digits8 so that it predicts every class, and its weights."""
    root = tmp_path_factory.mktemp("dict_user")
    (root / "dict_nets.py").write_text(DICT_FILE)
    spec = f"{root / 'dict_nets.py'}:build"
    net, data = load_model(spec), load_digits8()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(data.x)["logits"], data.y).backward()
        opt.step()
    torch.save(net.state_dict(), root / "dict.pt")
    return spec, str(root / "cache"), str(root / "dict.pt")


@pytest.mark.slow
@pytest.mark.parametrize("command, extra", [
    ("attack", ["--pairs", "2", "--iterations", "2"]),
    ("concepts", ["--layer", "features.3", "--classes", "0,1", "--components", "2", "--images-per-class", "4",
                  "--noise-samples", "1", "--controls", "2", "--top-k", "2", "--pool", "4"]),
    ("contrast", ["--layer", "features.3", "--class-pairs", "0:1", "--images-per-class", "4", "--noise-samples", "1",
                  "--random-directions", "1"]),
    ("counterfactual", ["--space", "pixel", "--n", "2", "--max-steps", "3", "--source", "4", "--target", "9"]),
])
def test_dict_output_model_runs_with_output_and_keeps_its_layer_names(dict_model, tmp_path, command, extra, request):
    """--output KEY makes a dict-returning --model a logits model for every command; --layer uses the model's own
    names (features.3, not model.features.3); without --output the refusal names the keys and the option."""
    if command != "counterfactual":  # counterfactual trains its judges (a second network), not the model under test
        request.getfixturevalue("no_training")
    spec, cache, weights = dict_model
    base = [command, "--dataset", "digits8", "--model", spec, "--weights", weights, "--quiet", "--cache-dir", cache, *extra]
    res = CliRunner().invoke(main, [*base, "--output", "logits", "--out", str(tmp_path / "ok")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ok" / "report.html").is_file()
    res = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "no")])
    assert res.exit_code == 2 and "returns a dict with keys ['logits', 'features']" in res.output
    assert "--output KEY" in res.output


def test_output_needs_model_and_select_output_wraps_transparently(dict_model):
    spec, _, _ = dict_model
    res = CliRunner().invoke(main, ["attack", "--dataset", "digits8", "--output", "logits", "--pairs", "1"])
    assert res.exit_code == 2 and "--output needs --model" in res.output
    from manifex.attribution.layer import resolve_layer
    from manifex.models.user import SelectOutput
    net = load_model(spec)
    wrapped = Normalize(SelectOutput(net, "logits"), (0.5,), (0.5,))
    x = load_digits8().x[:3]
    assert torch.equal(wrapped(x), net((x - 0.5) / 0.5)["logits"])
    assert resolve_layer(wrapped, "features.3") == (net.features[3], "model.model.features.3")
    with pytest.raises(InputError, match="unknown layer 'features.9'"):
        resolve_layer(wrapped, "features.9")
    import pickle
    assert torch.equal(pickle.loads(pickle.dumps(wrapped))(x), wrapped(x))  # Ray workers pickle the model


@pytest.mark.slow
def test_counterfactual_names_the_users_model_and_never_resumes_another_models_records(user_model, tmp_path):
    """counterfactual --model: the checks, the subtitle and metrics.json name the user's model (they said
    'classifier lenet'); on an --out of the built-in classifier's run it is refused instead of resuming its records."""
    root, _ = user_model
    out, cache = tmp_path / "cf", str(tmp_path / "cache")
    base = ["counterfactual", "--dataset", "digits8", "--space", "pixel", "--n", "2", "--max-steps", "3", "--epochs", "1",
            "--quiet", "--cache-dir", cache, "--out", str(out)]
    mine = ["--model", f"{root / 'my_nets.py'}:build", "--weights", str(root / "small.pt"), "--normalize", f"{MEAN},{STD}"]
    res = CliRunner().invoke(main, base)
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, [*base, *mine])
    assert res.exit_code == 2 and "other model" in res.output and "model.fingerprint" in res.output, res.output
    res = CliRunner().invoke(main, [*base, *mine, "--no-resume"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    name = f"--model {root / 'my_nets.py'}:build"
    assert metrics["config"]["classifier"] == name and metrics["info"]["classifier"]["source"] == "user"
    assert any(c.startswith(f"classifier {name}:") for c in metrics["checks"]) and metrics["n_new"] == 2
    assert f"classifier {name}" in (out / "report.html").read_text()


@pytest.mark.slow
def test_model_from_a_file_runs_on_ray_workers(user_model, tmp_path, no_training):
    """--model path/to/file.py:FACTORY --workers 2: the workers cannot import the file's private module name, so
    its classes travel by value (they died with ModuleNotFoundError); the records equal the local run's."""
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'manifex[ray]'")
    root, _ = user_model
    local = _cli(root, "attack", tmp_path / "local")
    assert local.exit_code == 0, local.output
    ray_run = _cli(root, "attack", tmp_path / "ray", "--workers", "2")
    assert ray_run.exit_code == 0, ray_run.output
    records = {}
    for name in ("local", "ray"):
        lines = (tmp_path / name / "results.jsonl").read_text().splitlines()
        records[name] = sorted((json.loads(line) for line in lines), key=lambda r: r["pair_id"])
    assert [r["pair_id"] for r in records["ray"]] == [r["pair_id"] for r in records["local"]]
    for a, b in zip(records["local"], records["ray"]):
        for key in ("pcc_orig_target", "pcc_manip_target", "max_dp", "linf"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key  # same CPU; float32 thread counts may differ
