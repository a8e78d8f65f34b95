"""Labels users see on campaigns: the β sweep's progress bars name what they run (not three times "campaign"),
and the per-pair overview figure states L∞ in units of 1/255 like the reports.

Tiny random CNN on 8×8 digits, 2 pairs, 3 attack iterations."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import manifex.manipulation.campaign as campaign
import manifex.manipulation.defence as defence
from manifex.data import load_digits8
from manifex.manipulation import pairs_from_dataset, research_gamma, run_campaign
from manifex.manipulation.defence import robustness_sweep

ATTACK = dict(iterations=3, lr=1e-2, gamma=research_gamma(64, 10))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 10)).eval()
    _, test = load_digits8().split(0.2, seed=0)
    return net, pairs_from_dataset(test, 2, seed=0)


def _record_descs(monkeypatch) -> list[tuple[str | None, bool]]:
    """Wrap run_units where the campaign and the sweep call it; collect (desc, progress) of every call."""
    seen: list[tuple[str | None, bool]] = []
    real = campaign.run_units

    def spy(*args, **kwargs):
        seen.append((kwargs.get("desc"), kwargs.get("progress")))
        return real(*args, **kwargs)

    monkeypatch.setattr(campaign, "run_units", spy)
    monkeypatch.setattr(defence, "run_units", spy)
    return seen


def test_sweep_progress_bars_are_named_per_beta(setup, monkeypatch, tmp_path):
    net, pairs = setup
    seen = _record_descs(monkeypatch)
    robustness_sweep(net, "gradient", pairs, (10, float("inf")), tmp_path, figures=False, progress=True,
                     curvature_iterations=3, **ATTACK)
    assert seen == [("attack β=10", True), ("curvature β=10", True), ("attack ReLU", True), ("curvature ReLU", True)]


def test_run_campaign_takes_a_progress_label(setup, monkeypatch, tmp_path):
    net, pairs = setup
    seen = _record_descs(monkeypatch)
    run_campaign(net, "input_x_gradient", pairs, tmp_path / "a", figures=False, desc="my attack", **ATTACK)
    run_campaign(net, "input_x_gradient", pairs, tmp_path / "b", figures=False, **ATTACK)
    assert [d for d, _ in seen] == ["my attack", "campaign"]


def test_overview_title_states_linf_per_255(setup, monkeypatch, tmp_path):
    net, pairs = setup
    titles: list[str] = []
    import manifex.viz

    monkeypatch.setattr(manifex.viz, "image_grid", lambda *a, title=None, **k: titles.append(title))
    summary = run_campaign(net, "input_x_gradient", pairs, tmp_path, figures=True, **ATTACK)
    assert len(titles) == 2
    for title, rec in zip(titles, summary.records):
        assert f"L∞ {rec['linf'] * 255:.1f}/255" in title, title
        assert re.search(r"L∞ \d+\.\d/255,", title) and rec["pair_id"] in title
    rec = {**summary.records[0], "linf": 0.057, "pcc_orig_target": None}
    assert campaign._overview_title(rec) == (f"{rec['pair_id']}: PCC to target n/a → {rec['pcc_manip_target']:.2f}, "
                                             f"max |Δp| {rec['max_dp']:.3f}, L∞ 14.5/255, "
                                             f"top-1 {'kept' if rec['top1_kept'] else 'changed'}")
