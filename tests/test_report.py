"""Tests of manifex.viz (heatmap normalisation, grids) and the alignment report (figures, metrics.json, HTML)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from manifex.alignment.report import alignment_figures, write_report
from manifex.alignment.result import SEED_REFERENCE, AlignmentResult
from manifex.errors import InputError
from manifex.viz import absolute_heatmap, image_grid, overlay, save_figure, signed_heatmap

M, C, H, W = 3, 1, 8, 8
K, D = 4, C * H * W
N = 50
MODELS = ("standard", "robust")
METHODS = ("gradient", "smoothgrad", "random")


def _synthetic_result() -> AlignmentResult:
    g = torch.Generator().manual_seed(0)
    baseline = math.sqrt(K / D)
    centre = {"standard": {"gradient": 0.3, "smoothgrad": 0.45}, "robust": {"gradient": 0.65, "smoothgrad": 0.7}}
    scores: dict[str, dict[str, torch.Tensor]] = {}
    parts: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for model in MODELS:
        scores[model] = {}
        parts[model] = {}
        for method in METHODS:
            if method == "random" and model == "standard":
                s = torch.full((N,), baseline)  # constant: exercises the histogram fallback
            elif method == "random":
                s = baseline + 0.02 * torch.randn(N, generator=g)
            else:
                s = centre[model][method] + 0.1 * torch.randn(N, generator=g)
            scores[model][method] = s.clamp(0, 1)
            parts[model][method] = (torch.randn(M, C, H, W, generator=g), torch.randn(M, C, H, W, generator=g))
    U, _ = torch.linalg.qr(torch.randn(D, K, generator=g, dtype=torch.float64))
    mass = (U**2).sum(dim=1).reshape(1, C, H, W).repeat(M, 1, 1, 1).float()
    metrics = {
        "k": K,
        "d": D,
        "baseline": baseline,
        "dataset": {"name": "synthetic <8x8>", "n_train": 100, "n_test": N, "image_shape": [C, H, W]},
        "tangent_rank": {"min": K - 1, "max": K, "mean": K - 0.1},
        "generative": {"arch": "vae", "latent_dim": K, "train_seconds": None, "cached": True},
        "models": {"standard": {"accuracy": 0.991, "train_seconds": 12.5, "cached": False, "epochs": 3},
                   "robust": {"accuracy": 0.978, "train_seconds": None, "cached": True, "epochs": 3}},
        "scores": {
            model: {
                method: {"mean": float(s.mean()), "median": float(s.median()), "std": float(s.std()), "n": N}
                for method, s in per.items()
            }
            for model, per in scores.items()
        },
        "seed_reference": SEED_REFERENCE,
        "timings": {"tangent_seconds": 1.25, "tangent_seconds_per_image": 0.025,
                    "attribution_seconds": {m: {meth: 0.5 for meth in METHODS} for m in MODELS}, "total_seconds": 130.0},
        "findings": ["Robust gradients are more aligned.", "SmoothGrad beats the gradient <b>here</b>."],
        "config": {"command": "manifex align --dataset synthetic", "seed": 0},
    }
    return AlignmentResult(scores=scores, images=torch.rand(M, C, H, W, generator=g), labels=torch.tensor([3, 1, 4]),
                           parts=parts, tangent_mass=mass, metrics=metrics)


@pytest.fixture(scope="module")
def result() -> AlignmentResult:
    return _synthetic_result()


@pytest.fixture(scope="module")
def report(tmp_path_factory, result) -> Path:
    return write_report(result, tmp_path_factory.mktemp("report"))


# --------------------------------------------------------------------------------------------- viz
def test_signed_heatmap_range_zero_and_symmetry():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 16, 16))
    a[:, 0, 0] = 0.0
    h = signed_heatmap(a)
    assert h.shape == (16, 16)
    assert h.min() >= -1.0 and h.max() <= 1.0
    assert h[0, 0] == 0.0
    np.testing.assert_allclose(signed_heatmap(-a), -h)
    assert np.isclose(np.abs(h).max(), 1.0)  # the top 0.5% are clipped to ±1
    # channels are summed; tensors are accepted
    np.testing.assert_allclose(signed_heatmap(torch.from_numpy(a)), signed_heatmap(a.sum(0)))
    assert np.all(signed_heatmap(np.zeros((4, 4))) == 0.0)


def test_absolute_heatmap_range_and_channel_abs_sum():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(2, 10, 10))
    h = absolute_heatmap(a, 0.99)
    assert h.shape == (10, 10)
    assert h.min() >= 0.0 and h.max() <= 1.0 and np.isclose(h.max(), 1.0)
    np.testing.assert_allclose(h, absolute_heatmap(np.abs(a).sum(0), 0.99))
    with pytest.raises(InputError):
        absolute_heatmap(a, clip_quantile=0.0)
    with pytest.raises(InputError):
        signed_heatmap(np.zeros((2, 2, 3, 3)))


def test_overlay_is_rgb_in_unit_range():
    rng = np.random.default_rng(2)
    img = rng.random((1, 8, 8))
    h = signed_heatmap(rng.normal(size=(8, 8)))
    out = overlay(img, h, alpha=0.5)
    assert out.shape == (8, 8, 3) and out.min() >= 0 and out.max() <= 1
    # zero relevance leaves the (grey) image untouched
    z = overlay(img, np.zeros((8, 8)), alpha=0.9)
    np.testing.assert_allclose(z, np.repeat(img[0][..., None], 3, axis=-1))
    with pytest.raises(InputError):
        overlay(img, np.zeros((4, 4)))


def test_image_grid_shared_scale(tmp_path):
    rng = np.random.default_rng(3)
    rows = [[rng.random((1, 8, 8)), rng.normal(size=(1, 8, 8)) * s, np.abs(rng.normal(size=(8, 8))) * s] for s in (1.0, 10.0)]
    path = tmp_path / "grid.png"
    fig = image_grid(rows, kinds=["image", "signed", "absolute"], col_titles=["x", "E", "|E|"],
                     row_titles=["a", "b"], shared_scale=True, path=path)
    assert isinstance(fig, Figure)
    assert path.stat().st_size > 0 and mpimg.imread(path).ndim == 3
    # one colour scale per heatmap column: both rows' images share the limits, symmetric for signed
    axes = [ax for ax in fig.axes if ax.images]
    signed_lims = {axes[i * 3 + 1].images[0].get_clim() for i in range(2)}
    abs_lims = {axes[i * 3 + 2].images[0].get_clim() for i in range(2)}
    assert len(signed_lims) == 1 and len(abs_lims) == 1
    lo, hi = signed_lims.pop()
    assert hi == -lo > 0
    assert abs_lims.pop()[0] == 0.0
    # without sharing each map gets its own scale
    fig2 = image_grid(rows, kinds=["image", "signed", "absolute"], shared_scale=False)
    axes2 = [ax for ax in fig2.axes if ax.images]
    assert axes2[1].images[0].get_clim() != axes2[4].images[0].get_clim()
    with pytest.raises(InputError):
        image_grid(rows, kinds=["image", "signed"])
    save_figure(fig2, tmp_path / "sub" / "grid2.png")
    assert (tmp_path / "sub" / "grid2.png").stat().st_size > 0


# --------------------------------------------------------------------------------------------- report
def test_figures_written_and_loadable(report):
    out = report.parent
    for name in ("density.png", "summary.png", "tangent_mass.png", "parts_standard.png", "parts_robust.png"):
        p = out / name
        assert p.exists() and p.stat().st_size > 0, name
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50


def test_alignment_figures_returns_paths(tmp_path, result):
    paths = alignment_figures(result, tmp_path)
    assert set(paths) == {"density", "summary", "tangent_mass", "parts_standard", "parts_robust"}
    assert all(p.exists() and p.parent == tmp_path for p in paths.values())


def test_html_content(report, result):
    html = report.read_text(encoding="utf-8")
    for method in METHODS:
        assert method in html
    assert f"{result.baseline:.3f}" in html
    assert "more aligned than the standard model" in html  # the one-line finding
    assert "Robust gradients are more aligned." in html
    # everything is escaped
    assert "<b>here</b>" not in html and "&lt;b&gt;here&lt;/b&gt;" in html
    assert "synthetic &lt;8x8&gt;" in html
    assert "manifex align --dataset synthetic" in html
    assert "http://" not in html and "https://" not in html  # works offline


def test_html_references_existing_files_only(report):
    html = report.read_text(encoding="utf-8")
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs, "the report should show figures"
    assert {"summary.png", "density.png", "tangent_mass.png", "parts_standard.png", "parts_robust.png"} <= set(refs)
    for ref in refs:
        assert "/" not in ref and (report.parent / ref).exists(), ref


def test_metrics_json_round_trip(report, result):
    with open(report.parent / "metrics.json", encoding="utf-8") as f:
        assert json.load(f) == result.metrics


def test_smooth_figure_one_quantity_per_panel(tmp_path):
    """The β sweep figure: PCC, accuracy and curvature in separate panels (no two curves on shared twin axes),
    the ReLU model last and without a curvature point; sweep.json's string β values are accepted."""
    from manifex.manipulation.report import smooth_figure

    sweep = [{"beta": b, "pcc_orig_target": 0.3, "pcc_manip_target": 0.3 + g, "pcc_gain": g, "accuracy": a, "curvature": c}
             for b, g, a, c in (("inf", 0.3, 0.95, 0.0), (3.0, 0.1, 0.7, 0.5), ("β=10", 0.2, 0.9, 1.1))]
    fig = smooth_figure(sweep, tmp_path / "curves.png")
    axes = fig.get_axes()
    assert len(axes) == 3 and (tmp_path / "curves.png").stat().st_size > 0
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["β = 3", "β = 10", "ReLU"]
    (curv_line,) = axes[2].get_lines()
    assert list(curv_line.get_xdata()) == [0, 1] and axes[2].get_yscale() == "log"
    assert [len(ax.get_lines()) for ax in axes[:2]] == [2, 1]


def test_many_methods_are_split_over_readable_example_grids(tmp_path):
    """More than METHODS_PER_GRID methods: the example grids are split, every figure is linked in the report."""
    from manifex.alignment.report import METHODS_PER_GRID

    res = _synthetic_result()
    for extra in ("integrated_gradients_path", "input_x_gradient"):
        for model in MODELS:
            res.parts[model][extra] = res.parts[model]["gradient"]
    assert len(res.parts["standard"]) > METHODS_PER_GRID
    html = write_report(res, tmp_path).read_text()
    for name in ("parts_standard.png", "parts_standard_2.png", "parts_robust_2.png"):
        assert (tmp_path / name).stat().st_size > 0 and f'src="{name}"' in html
    assert not (tmp_path / "parts_standard_3.png").exists()


def test_every_report_puts_its_one_checks_box_first():
    """The report skeleton (base.html.j2) shows what was checked once, before any number it qualifies; no
    system's page draws a checks box of its own (the counterfactual page had two, at the bottom)."""
    from pathlib import Path

    import manifex.reports as reports
    from manifex.reports import environment

    page = environment().from_string('{% extends "base.html.j2" %}{% block main %}<h2>Result</h2>{% endblock %}')
    html = page.render(checks=["the data: 10 classes", "FAILED: something odd"], title="t", headline="h")
    assert html.count("<h2>Checks</h2>") == 1 and html.index("<h2>Checks</h2>") < html.index("<h2>Result</h2>")
    assert '<li class="warn">something odd</li>' in html
    templates = Path(reports.__file__).parent / "templates"
    own = [t.name for t in templates.glob("*.html.j2") if t.name != "base.html.j2" and 'class="checks"' in t.read_text()]
    assert own == []


def test_metrics_json_is_strict_json_with_nan_as_null(tmp_path):
    """Every report's metrics.json goes through the run layer's one encoder: NaN/inf become null (the reports'
    own encoder wrote NaN, which strict JSON readers such as JavaScript's JSON.parse reject)."""
    import json
    import math

    import numpy as np

    from manifex.reports import write_json

    path = write_json({"a": math.nan, "b": np.float32("inf"), "c": torch.tensor([1.0, math.nan]), "d": (1, 2)},
                      tmp_path / "metrics.json")
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}")) == {
        "a": None, "b": None, "c": [1.0, None], "d": [1, 2]}
