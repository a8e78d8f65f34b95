"""The counterfactual experiments on the contract (issue 17): the data loaded once per run, options refused
before anything is trained or written, run_campaign a thin call of run_experiment (your nn.Module named, its
identity guarded, its state left as found), and the helix on the contract with run_helix's numbers."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import manifex.data
import manifex.models.zoo as zoo
from manifex.cli import main
from manifex.errors import InputError, ModelError
from manifex.models import ModelCache

TINY = ["--dataset", "digits8", "--epochs", "1", "--space", "pixel", "--n", "2", "--max-steps", "3", "--quiet"]


@pytest.fixture
def count_loads(monkeypatch):
    """Every dataset load of the run, counted (resolve_data and the old prepare both go through load_dataset)."""
    calls = []
    real = manifex.data.load_dataset

    def counted(spec, *args, **kwargs):
        calls.append(spec)
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(manifex.data, "load_dataset", counted)
    return calls


def test_the_data_is_loaded_once_per_run(tmp_path, count_loads):
    """The command loaded the data for its checks and prepare() loaded it again."""
    res = CliRunner().invoke(main, ["counterfactual", *TINY, "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert count_loads == ["digits8"]
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 2


def test_known_data_is_loaded_once_and_its_classes_checked_first(tmp_path, count_loads, monkeypatch):
    """known:<data>: <data> is loaded once, for the class checks and for the known manifold's VAE (it was loaded a
    second time to build the known manifold). The run stops at the VAE's training here."""
    def stop(*args, **kwargs):
        raise ModelError("stopped at the VAE")

    monkeypatch.setattr(zoo, "fit_generative", stop)
    res = CliRunner().invoke(main, ["counterfactual", *TINY[2:], "--dataset", "known:digits8", "--out", str(tmp_path / "out"),
                                    "--cache-dir", str(tmp_path / "c")])
    assert res.exit_code == 2 and "stopped at the VAE" in res.output, res.output
    assert count_loads == ["digits8"]


@pytest.mark.parametrize("change,message", [
    ({"stop_prob": 1.0}, "stop_prob"), ({"spaces": ()}, "spaces"), ({"generator": "glow"}, "--generator"),
    ({"max_steps": 0}, "--max-steps"), ({"source": 3, "target": 3}, "same class"), ({"dataset": "helix"}, "HelixExperiment"),
])
def test_run_campaign_refuses_bad_options_before_anything(tmp_path, monkeypatch, change, message):
    from manifex.counterfactuals.experiment import CounterfactualConfig, run_campaign

    def trained(*args, **kwargs):
        raise AssertionError("a model was trained before the error")

    monkeypatch.setattr(zoo, "fit_classifier", trained)
    monkeypatch.setattr(zoo, "fit_generative", trained)
    with pytest.raises(InputError, match=message):
        run_campaign(CounterfactualConfig(**{"dataset": "digits8", **change}), tmp_path / "out",
                     cache=ModelCache(tmp_path / "c"))
    assert not (tmp_path / "out").exists()


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Dropout(0.1), nn.ReLU(), nn.Linear(32, 10))


def _trained(seed: int) -> nn.Module:
    from manifex.data import load_digits8

    net, data = _net(seed), load_digits8()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(net(data.x), data.y).backward()
        opt.step()
    return net


def test_run_campaign_with_your_module_names_it_guards_it_and_leaves_it_as_found(tmp_path):
    from manifex.counterfactuals.experiment import CounterfactualConfig, run_campaign

    cfg = CounterfactualConfig(dataset="digits8", classifier_epochs=1, spaces=("pixel",), n=2, max_steps=3)
    net = _trained(0).train()
    net[1].weight.requires_grad_(False)
    before = ([m.training for m in net.modules()], [p.requires_grad for p in net.parameters()],
              {k: v.clone() for k, v in net.state_dict().items()})
    result = run_campaign(cfg, tmp_path / "out", cache=ModelCache(tmp_path / "c"), classifier=net, classifier_name="my net",
                          progress=False)
    assert ([m.training for m in net.modules()], [p.requires_grad for p in net.parameters()]) == before[:2]
    assert all(torch.equal(v, before[2][k]) for k, v in net.state_dict().items())
    assert len(result.records) == 2 and result.n_new == 2 and result.info["classifier"]["name"] == "my net"
    assert any(c.startswith("classifier my net: test accuracy") for c in result.checks)
    recorded = json.loads((tmp_path / "out" / "experiment.json").read_text())
    assert recorded["command"] == "counterfactual" and recorded["settings"]["max_steps"] == 3
    assert not (tmp_path / "out" / "campaign.json").exists()
    again = run_campaign(cfg, tmp_path / "out", cache=ModelCache(tmp_path / "c"), classifier=net, progress=False)
    assert again.n_new == 0 and again.records == result.records
    with pytest.raises(InputError, match="other model"):  # another network's weights never resume these records
        run_campaign(cfg, tmp_path / "out", cache=ModelCache(tmp_path / "c"), classifier=_trained(1), progress=False)


def test_the_old_module_still_imports_with_a_deprecation_warning():
    import importlib
    import sys

    sys.modules.pop("manifex.counterfactuals.campaign", None)
    with pytest.warns(DeprecationWarning, match="manifex.counterfactuals.experiment"):
        campaign = importlib.import_module("manifex.counterfactuals.campaign")
    from manifex.counterfactuals import experiment

    assert campaign.run_campaign is experiment.run_campaign and campaign.CounterfactualConfig is experiment.CounterfactualConfig


# ------------------------------------------------------------------------------------------------------ helix
HELIX = {"n": 6, "max_steps": 40, "flow_epochs": 1, "classifier_steps": 60}


@pytest.mark.slow
def test_helix_experiment_has_run_helixs_numbers_and_resumes(tmp_path):
    """The helix on the contract: the same records and summary as run_helix (one batch of all points, the same
    models), experiment.json claims, a second run adds nothing, a changed setting is refused."""
    from manifex.counterfactuals.experiment import HelixConfig, HelixExperiment
    from manifex.counterfactuals.helix import run_helix
    from manifex.experiment import run_experiment

    cfg, cache = HelixConfig(**HELIX), tmp_path / "cache"
    ref = run_helix(cfg, cache=ModelCache(cache), progress=False)
    res = run_experiment(HelixExperiment(), cfg, tmp_path / "out", cache_dir=cache, progress=False)
    assert res.records["points"] == ref["records"]
    def numbers(summary):  # the timing and whether the flow came from the cache (run_helix trained it) aside
        return {k: {**v, "cached": None} if k == "flow" else v for k, v in summary.items() if k != "seconds"}

    assert numbers(res.summary) == numbers(ref["summary"]) and res.summary["flow"]["cached"]
    out = tmp_path / "out"
    for f in ("experiment.json", "results.jsonl", "metrics.json", "summary.json", "report.html", "spectrum.png",
              "helix_distances.png"):
        assert (out / f).is_file(), f
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["summary"]["n"] == 6 and metrics["model"]["name"] == "helix MLP 3-256-1"
    again = run_experiment(HelixExperiment(), cfg, out, cache_dir=cache, progress=False)
    assert again.n_new == {"points": 0} and again.records == res.records
    with pytest.raises(InputError, match="other settings"):
        run_experiment(HelixExperiment(), HelixConfig(**{**HELIX, "max_steps": 41}), out, cache_dir=cache, progress=False)


def test_run_campaign_with_a_prepared_context_trains_nothing_more(tmp_path, monkeypatch):
    from manifex.counterfactuals.experiment import CounterfactualConfig, prepare, run_campaign

    cfg = CounterfactualConfig(dataset="digits8", classifier_epochs=1, spaces=("pixel",), n=2, max_steps=3)
    prep = prepare(cfg, cache=ModelCache(tmp_path / "c"), progress=False)

    def trained(*args, **kwargs):
        raise AssertionError("a model was trained although the context was prepared")

    monkeypatch.setattr(zoo, "fit_classifier", trained)
    monkeypatch.setattr(zoo, "fit_generative", trained)
    result = run_campaign(cfg, tmp_path / "out", cache=ModelCache(tmp_path / "empty"), prepared=prep, progress=False)
    assert [r["index"] for r in result.records] == prep["chosen"].tolist()
    assert result.info["classifier"]["name"] == "lenet" and result.n_new == 2


# ------------------------------------------------------------------------------------------------------ metrics
NEW_FIELDS = {"validity", "l0", "sparsity", "ynn", "im1", "im2", "seconds"}


def test_campaign_has_every_metric_in_summary_metrics_and_report_and_leaves_the_old_fields_alone(tmp_path):
    """The metrics of issue 20 in the summary per space, metrics.json and the report's table; the class autoencoders
    (trained inside the run, under a forked RNG) change no existing field of any record: a run without them
    (--im-epochs 0) has the same records but for the new fields."""
    from manifex.counterfactuals.experiment import CounterfactualConfig, run_campaign
    from manifex.counterfactuals.report import write_report

    # LeNet after 3 epochs (1 leaves it at p(9) ≈ 0.17 for every step), lr 0.05: p(9) > 0.9 in 11-13 steps
    cfg = CounterfactualConfig(dataset="digits8", classifier_epochs=3, spaces=("pixel",), n=3, max_steps=150,
                               lr_pixel=0.05, stop_prob=0.9, im_epochs=2)
    cache = ModelCache(tmp_path / "c")
    res = run_campaign(cfg, tmp_path / "out", cache=cache, progress=False)
    s = res.summary["pixel"]
    assert s["n_success"] >= 2, "the Fréchet distance needs two successes"
    for key in ("validity", "l0", "l1", "l2", "linf", "sparsity", "ynn", "im1", "im2", "seconds", "fid"):
        assert key in s, key
    assert s["fid"]["n"] == s["n_success"] and s["fid"]["value"] >= 0
    assert res.info["autoencoders"]["classes"] == [4, 9] and any(c.startswith("IM1/IM2:") for c in res.checks)
    write_report(res)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(metrics["summary"]["pixel"]) >= {"validity", "l0", "ynn", "im1", "im2", "seconds", "fid"}
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Counterfactual metrics" in html and "IM1" in html and "yNN" in html and "Fréchet" in html

    without = run_campaign(CounterfactualConfig(**{**cfg.to_dict(), "spaces": ("pixel",), "im_epochs": 0}), tmp_path / "out0",
                           cache=cache, progress=False)
    assert "im1" not in without.summary["pixel"] and without.info["autoencoders"] == {"enabled": False}
    for a, b in zip(res.records, without.records):
        old = lambda r: {k: v for k, v in r["pixel"].items() if k not in NEW_FIELDS}  # noqa: E731
        assert old(a) == old(b)
        assert NEW_FIELDS - set(a["pixel"]) == set() and {"im1", "im2"} & set(b["pixel"]) == set()


@pytest.mark.parametrize("change,message", [({"im_epochs": -1}, "--im-epochs"), ({"l0_tol": float("nan")}, "l0_tol")])
def test_metric_options_are_refused_before_anything(tmp_path, change, message):
    from manifex.counterfactuals.experiment import CounterfactualConfig, run_campaign

    with pytest.raises(InputError, match=message):
        run_campaign(CounterfactualConfig(**{"dataset": "digits8", **change}), tmp_path / "out",
                     cache=ModelCache(tmp_path / "c"), progress=False)
    assert not (tmp_path / "c").exists() and not (tmp_path / "out").exists()
