"""The contrast campaign and its report (issue 16): a layer with negative activations gives a report (pure shift,
no contrastive concepts, said so) instead of failing in the NMF after every pair; no random-direction control
is reported as such (never nan% or inf); the table's "swaps at t" is the first t where the prediction swaps,
not the largest t; the contrastive-concept figure's labels are readable at 1280 px."""
from __future__ import annotations

import dataclasses
import json
import sys
import warnings

import matplotlib.text
import pytest
import torch

from manifex.concepts.contrast.report import FIGURE_DPI, REPORT_WIDTH_PX, crops_figure
from manifex.concepts.contrast.experiment import ContrastConfig, run_contrast, summarize, write_contrast_report
from manifex.concepts.contrast.shift import T_GRID, ShiftResult, first_swap
from manifex.data import load_digits8
from _tiny_models import tiny_resnet


@pytest.fixture(scope="module")
def digits():
    d = load_digits8()
    return d.x[d.y < 4][:300]


def _cfg(**kw):
    return ContrastConfig(**{"layer": "blocks.1", "images_per_class": 8, "n_samples": 2, "n_random": 2, "n_components": 2,
                             "epochs": 20, "top_k": 3, **kw})


def _no_nan_inf(text: str) -> bool:
    """metrics.json holds no NaN/Infinity token and no value NaN, ±inf or "inf" (prose such as "no NaN/inf" is fine)."""
    import math

    def values(v):
        if isinstance(v, dict):
            for x in v.values():
                yield from values(x)
        elif isinstance(v, list):
            for x in v:
                yield from values(x)
        else:
            yield v

    bad = [v for v in values(json.loads(text)) if (isinstance(v, float) and not math.isfinite(v))
           or (isinstance(v, str) and v.strip().lower() in ("nan", "inf", "-inf", "infinity"))]
    return not bad and "NaN" not in text.replace("NaN/inf", "") and "Infinity" not in text


# ------------------------------------------------------------------------------------------------ negative layers
def test_negative_layer_runs_with_the_pure_shift_and_says_so(tmp_path, digits):
    run = run_contrast(tiny_resnet(), digits, [(0, 1), (2, 3)], tmp_path, config=_cfg(layer="blocks.1.bn2"), progress=False)
    assert run.concepts is None and [r["shift"] for r in run.records] == ["linear", "linear"]
    assert any("has negative activations (min -" in w and "contrastive concepts are skipped" in w for w in run.warnings)
    report = write_contrast_report(run)
    html = report.read_text()
    assert "negative activations" in html and "rather than" not in html and "a + t·w" in html
    assert not (tmp_path / "contrastive_concepts.png").exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["concepts"] is None


def test_post_relu_layer_keeps_the_relu_shift(tmp_path, digits):
    run = run_contrast(tiny_resnet(), digits, [(0, 1)], tmp_path, config=_cfg(), progress=False)
    assert run.records[0]["shift"] == "relu" and run.concepts is not None and not run.warnings
    assert any("non-negative on every image the tests use" in c for c in run.checks)


# ------------------------------------------------------------------------------------------------ no control
def test_no_random_directions_is_reported_as_no_control(tmp_path, digits):
    run = run_contrast(tiny_resnet(), digits, [(0, 1), (2, 3)], tmp_path, config=_cfg(n_random=0), progress=False)
    s = run.summary
    assert s["n_control"] == 0 and s["control_swap_rate"] is None and s["swap_ratio"] is None
    assert all(r["control_swap_rate"] is None for r in run.records)
    html = write_contrast_report(run).read_text()
    metrics = (tmp_path / "metrics.json").read_text()
    assert _no_nan_inf(metrics) and "nan%" not in html and "∞" not in html and "inf×" not in html
    assert "no random-direction control" in html and "no control" in html
    assert any("no random-direction control" in w for w in run.warnings)


def test_summary_without_a_random_swap_has_no_inf():
    rec = {"swapped": True, "control_swapped": [False, False], "p_b": [0.1, 0.9], "p_a": [0.8, 0.05],
           "control_p_b": [[0.1, 0.2], [0.1, 0.1]], "accuracy": 0.9, "ts": [0.0, 10.0]}
    s = summarize([rec])
    assert s["control_swap_rate"] == 0.0 and s["swap_ratio"] is None and s["swap_ratio_unbounded"]
    assert s["median_t_swap"] == 10.0


# ------------------------------------------------------------------------------------------------ the t column
def _result(p_a, p_b):
    return ShiftResult(a=0, b=1, ts=list(T_GRID), p_a=torch.tensor(p_a, dtype=torch.float64), p_b=torch.tensor(p_b, dtype=torch.float64),
                       swapped=True, t_index=int(torch.tensor(p_b).argmax()), control_p_a=torch.zeros(1, 10),
                       control_p_b=torch.zeros(1, 10), control_swapped=torch.tensor([False]), n_images=5, norm=1.0)


def test_swap_t_is_the_first_swap_not_the_largest_t():
    # p(B) crosses 0.5 (and p(A)) at t = 10 and keeps growing to t = 200, as in the default run's pairs
    p_b = [0.01, 0.02, 0.05, 0.2, 0.6, 0.8, 0.9, 0.95, 0.97, 0.99]
    p_a = [0.98, 0.97, 0.9, 0.7, 0.3, 0.15, 0.08, 0.04, 0.02, 0.01]
    rec = _result(p_a, p_b).to_record()
    assert rec["t_swap"] == 10.0 and rec["t_max_p_b"] == 200.0
    assert first_swap(p_a, p_b) == 4 and first_swap(p_a, [0.1] * 10) is None
    # p(B) > 0.5 but below p(A) is no swap yet (only possible when the mean probabilities do not sum to 1)
    assert first_swap([0.1, 0.7, 0.2], [0.1, 0.6, 0.7]) == 2


def test_report_table_shows_the_first_swap_t(tmp_path, digits):
    run = run_contrast(tiny_resnet(), digits, [(0, 1)], tmp_path, config=_cfg(n_random=1), progress=False)
    p_b = [0.01, 0.02, 0.05, 0.2, 0.3, 0.6, 0.9, 0.95, 0.97, 0.99]
    p_a = [0.98, 0.97, 0.9, 0.7, 0.6, 0.3, 0.08, 0.04, 0.02, 0.01]
    rec = {**_result(p_a, p_b).to_record(), "accuracy": 0.9, "bias": 0.0, "id": "pair-0-1"}
    fake = dataclasses.replace(run, records=[rec], summary=summarize([rec]))
    html = write_contrast_report(fake).read_text()
    row = html[html.index("<td class=\"l\">0 → 1</td>"):].split("</tr>")[0]
    cells = [c.split("</td>")[0].replace("<b>", "").replace("</b>", "") for c in row.split("<td>")[1:]]
    assert cells[2] == "15" and cells[3] == "0.990" and cells[4] == "200"  # swaps at t = 15; max p(B) at t = 200
    assert "at a median t = 15" in html
    # the real run: each swapped pair's cell holds its own first swap t
    html = write_contrast_report(run).read_text()
    r = run.records[0]
    k = next((i for i, (a, b) in enumerate(zip(r["p_a"], r["p_b"])) if b > 0.5 and b >= a), None)
    want = "—" if not r["swapped"] else f"{r['ts'][k]:g}"
    row = html[html.index("<td class=\"l\">0 → 1</td>"):].split("</tr>")[0]
    assert f"<td><b>{want}</b></td>" in row


# ------------------------------------------------------------------------------------------------ the figure
def test_contrastive_concept_labels_are_readable_at_1280px():
    g = torch.Generator().manual_seed(0)
    fig = crops_figure(torch.rand(6, 8, 1, 8, 8, generator=g), torch.rand(6, 8, generator=g))
    width_px = fig.get_size_inches()[0] * FIGURE_DPI
    # shown full width (≤ 1124 px of content at a 1280 px window), so at its own pixel size: a label of f pt is f·dpi/72 px
    assert width_px <= REPORT_WIDTH_PX
    texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_text()]
    assert len(texts) == 6 * 8 + 6
    assert min(t.get_fontsize() for t in texts) * FIGURE_DPI / 72 >= 12


def test_contrastive_concepts_figure_is_not_squeezed_into_a_half_column(tmp_path, digits):
    run = run_contrast(tiny_resnet(), digits, [(0, 1)], tmp_path, config=_cfg(n_random=1), progress=False)
    html = write_contrast_report(run).read_text()
    assert "contrastive_concepts.png" in html and 'class="two"' not in html


# ------------------------------------------------------------------------------------------------ CLI
SMALL = ["--dataset", "digits8", "--epochs", "1", "--images-per-class", "8", "--noise-samples", "2", "--components", "2", "--quiet"]


@pytest.fixture(scope="module")
def cli_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def _cli(args, cache):
    from click.testing import CliRunner

    from manifex.cli import main

    return CliRunner().invoke(main, ["contrast", *SMALL, *args, "--cache-dir", cache])


@pytest.mark.slow
def test_cli_negative_layer_gives_a_report(tmp_path, cli_cache):
    res = _cli(["--layer", "blocks.1.bn2", "--class-pairs", "0:1", "--random-directions", "1", "--out", str(tmp_path)], cli_cache)
    assert res.exit_code == 0, res.output
    assert "warning: layer 'blocks.1.bn2' has negative activations (min -" in res.output and "report:" in res.output
    assert (tmp_path / "report.html").exists() and not (tmp_path / "contrastive_concepts.png").exists()


@pytest.mark.slow
def test_cli_zero_random_directions_reports_no_control(tmp_path, cli_cache):
    res = _cli(["--layer", "blocks.1", "--class-pairs", "0:1", "--random-directions", "0", "--out", str(tmp_path)], cli_cache)
    assert res.exit_code == 0, res.output
    assert "no random-direction control" in res.output and "nan%" not in res.output
    assert _no_nan_inf((tmp_path / "metrics.json").read_text())
    html = (tmp_path / "report.html").read_text()
    assert "nan%" not in html and "∞" not in html


USER_NET = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, channels=1, dict_out=False):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(8 * 16, 10)
        self.dict_out = dict_out

    def forward(self, x):
        z = self.fc(self.features(x).flatten(1))
        return {"logits": z} if self.dict_out else z


def double():
    return Net().double()


def rgb():
    return Net(channels=3)


def dict_net():
    return Net(dict_out=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("factory, code, message", [
    ("double", 0, "report:"),                   # a float64 model: its images are converted to its dtype
    ("rgb", 2, "fails on a batch of (8, 1, 8, 8)"),
    ("dict_net", 2, "returns a dict"),
])
def test_cli_user_models(tmp_path, cli_cache, factory, code, message):
    (tmp_path / "usernet.py").write_text(USER_NET)
    extra = []
    if factory == "double":  # a few full-batch steps, so that classes 0 and 1 are both predicted
        sys.path.insert(0, str(tmp_path))
        try:
            import usernet
        finally:
            sys.path.remove(str(tmp_path))
        d = load_digits8()
        torch.manual_seed(0)
        net = usernet.double()
        opt = torch.optim.Adam(net.parameters(), 2e-2)
        for _ in range(40):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(d.x.double()), d.y).backward()
            opt.step()
        torch.save(net.state_dict(), tmp_path / "w.pt")
        extra = ["--weights", str(tmp_path / "w.pt")]
    res = _cli(["--model", f"{tmp_path / 'usernet.py'}:{factory}", *extra, "--layer", "features.1", "--class-pairs", "0:1",
                "--random-directions", "1", "--out", str(tmp_path / "o")], cli_cache)
    assert res.exit_code == code, res.output
    assert message in res.output and "Traceback" not in res.output
    sys.modules.pop("usernet", None)


# ------------------------------------------------------------------------------------------------ the Python API on the contract
def test_run_contrast_leaves_the_model_as_found_also_after_an_error(tmp_path, digits):
    """run_contrast goes through run_experiment with your module as it is: not switched to eval, not moved; train
    flags, requires_grad and hooks are as found afterwards, also when a pair is refused after the model is known."""
    from manifex.attribution.core import TrainModeWarning
    from manifex.errors import InputError

    import copy

    model = copy.deepcopy(tiny_resnet()).train()  # a copy: the tiny model is shared by the tests
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    flags = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]

    def hooks():
        return [(list(m._forward_hooks), list(m._forward_pre_hooks), list(m._backward_hooks)) for m in model.modules()]

    found = hooks()
    with pytest.warns(TrainModeWarning):
        run = run_contrast(model, digits, [(0, 1)], tmp_path / "a", config=_cfg(n_random=1), progress=False)
    assert run.model_info.source == "python" and run.model_info.name == f"your {type(model).__name__}"
    assert [m.training for m in model.modules()] == flags and [p.requires_grad for p in model.parameters()] == grads
    assert hooks() == found
    with pytest.raises(InputError, match="out of range"), warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainModeWarning)
        run_contrast(model, digits, [(0, 12)], tmp_path / "b", config=_cfg(n_random=1), progress=False)
    assert [m.training for m in model.modules()] == flags and [p.requires_grad for p in model.parameters()] == grads
    assert hooks() == found


def test_hyperplane_artefact_is_reused_for_its_key_and_rebuilt_when_it_changes(tmp_path, digits):
    from manifex.errors import InputError
    from manifex.runs import safe_torch_load

    model = tiny_resnet()
    first = run_contrast(model, digits, [(0, 1)], tmp_path, config=_cfg(n_random=1), progress=False)
    hp = tmp_path / "artefacts" / "hyperplanes.pt"
    stamp = hp.stat().st_mtime_ns
    again = run_contrast(model, digits, [(0, 1)], tmp_path, config=_cfg(n_random=1), progress=False)
    assert hp.stat().st_mtime_ns == stamp and again.records == first.records
    torch.testing.assert_close(again.hyperplanes.normals, first.hyperplanes.normals, rtol=0, atol=0)
    # another hyperplane setting on resume is refused (the pair records were made with the old hyperplanes) ...
    with pytest.raises(InputError, match=r"other settings \(settings.epochs: 20 -> 21\)"):
        run_contrast(model, digits, [(0, 1)], tmp_path, config=_cfg(n_random=1, epochs=21), progress=False)
    assert hp.stat().st_mtime_ns == stamp
    # ... and with resume=False (recompute here) the artefact's key no longer matches: rebuilt, never reused
    fresh = run_contrast(model, digits, [(0, 1)], tmp_path, config=_cfg(n_random=1, epochs=21), progress=False, resume=False)
    key = json.loads(safe_torch_load(hp)["__key__"])
    assert key["epochs"] == 21 and key["classes"] == [0, 1]
    assert fresh.hyperplanes.options["epochs"] == 21 and not torch.equal(fresh.hyperplanes.normals, first.hyperplanes.normals)


def test_config_is_frozen_and_takes_plain_pairs():
    cfg = ContrastConfig(pairs=[[0, 1], "3:5"], concepts_pair="3:5")
    assert cfg.pairs == ((0, 1), (3, 5)) and cfg.concepts_pair == (3, 5) and ContrastConfig(pairs="4:9,3:5").pairs == ((4, 9), (3, 5))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.layer = "blocks.1"
    assert cfg.to_dict()["pairs"] == [[0, 1], [3, 5]] and json.dumps(cfg.to_dict())


@pytest.mark.parametrize("old, new", [("manifex.concepts.shift", "manifex.concepts.contrast.shift"),
                                      ("manifex.concepts.contrast_run", "manifex.concepts.contrast.experiment")])
def test_old_module_paths_re_export_with_a_deprecation_warning(old, new):
    import importlib

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.rsplit(".", 1)[0]):
        mod = importlib.import_module(old)
    target = importlib.import_module(new)
    for name in ("shifting_test", "T_GRID") if old.endswith("shift") else ("run_contrast", "ContrastConfig", "summarize"):
        assert getattr(mod, name) is getattr(target, name)
    import manifex.concepts.contrast as package

    assert package.train_hyperplanes is importlib.import_module("manifex.concepts.contrast.hyperplanes").train_hyperplanes
