"""The counterfactual campaign's records and report (issue 16): the approximate-generator warning, the
dimension when the spectrum has no gap (null with a reason, as the page says), p(target) labels."""
from __future__ import annotations

import torch


def test_p_label_never_rounds_a_failure_up_to_the_threshold():
    from manifex.counterfactuals.report import p_label

    assert p_label(0.9885) == "0.988" and p_label(0.98999999) == "0.989" and p_label(0.9951) == "0.995"
    assert p_label(0.99949, stop_prob=0.999) == "0.9994" and p_label(None) == "n/a"
    for p in torch.linspace(0.95, 0.99, 401, dtype=torch.float64)[:-1].tolist():
        assert float(p_label(p)) < 0.99


def _records(dims, top=4, recon=None):
    recs = []
    for i, d in enumerate(dims):
        rec = {"id": f"img{i}", "dimension": d, "singular_values": [1.0, 0.5, 0.2, 0.1][:top], "latent": {"success": True}}
        if recon is not None:
            rec["latent"]["recon_error"] = recon[i]
        recs.append(rec)
    return recs


def test_spectrum_summary_says_null_with_a_reason_when_no_gap():
    from manifex.counterfactuals.experiment import spectrum_summary

    none = spectrum_summary(_records([None, None, 2]))
    assert none["dimension_median"] is None and "not determined" in none["dimension_note"] and none["no_gap"] == 2
    old = spectrum_summary(_records([4, 4, 4]))  # records of earlier versions store `top` for "no gap"
    assert old["dimension_median"] is None and old["dimension_counts"] == {}
    found = spectrum_summary(_records([2, 2, None]))
    assert found["dimension_median"] == 2.0 and "dimension_note" not in found


def test_approximate_generator_warning_comes_from_the_records():
    from manifex.counterfactuals.experiment import generator_warnings

    (w,) = generator_warnings(_records([2, 2], recon=[0.61, 0.2]), {"kind": "vae"})
    assert "0.61" in w and "vae" in w and "2 of 2" in w
    assert generator_warnings(_records([2, 2], recon=[1e-6, 2e-6]), {"kind": "flow"}) == []
    assert generator_warnings(_records([2, 2]), None) == []  # pixel space only: no reconstruction


def _helix_result(n: int = 4) -> dict:
    """What run_helix returns (records and summary), with made-up numbers (the report's layout is under test, not
    the experiment)."""
    space = {"success_rate": 1.0, "distance_median": 0.02, "distance_mean": 0.03, "steps_median": 40.0}
    summary = {"n": n, "classifier_accuracy": 0.99, "distance_ratio_median": 0.01,
               "latent": space, "pixel": {**space, "distance_median": 2.0},
               "spectrum": {"ratio_s1_s2_median": 120.0, "dimension_is_1_fraction": 1.0},
               "flow": {"epochs": 1, "steps_per_epoch": 391, "nll_history": [1.5]}}
    point = {"success": True, "already": False, "steps": 40, "value": 0.95, "x_cf": [0.0, 1.0, 0.5]}
    records = [{"id": f"helix{i:04d}", "latent": {**point, "distance": 0.02}, "pixel": {**point, "distance": 2.0},
                "singular_values": [3.0, 0.02, 0.01], "dimension": 1} for i in range(n)]
    return {"summary": summary, "records": records, "config": {"n": n}}


def test_helix_report_explains_the_helix_and_has_one_checks_box_at_the_top(tmp_path):
    from manifex.counterfactuals.report import write_helix_report

    html = write_helix_report(_helix_result(), tmp_path).read_text()
    assert (tmp_path / "helix_distances.png").is_file() and (tmp_path / "spectrum.png").is_file()
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 4  # run_helix's records, written standalone
    assert html.count("<h2>Checks</h2>") == 1
    assert html.index("<h2>Checks</h2>") < html.index("How to read this") < html.index("Distance to the data manifold")
    howto = html[html.index("How to read this"):html.index("</section>", html.index("How to read this"))]
    assert "helix" in howto and "judges" not in howto and "pixels" not in howto  # not the image experiment's text


def test_campaign_report_one_checks_box_at_the_top_with_the_warning_and_metrics_agree(tmp_path):
    import json

    from manifex.counterfactuals.experiment import CampaignResult, CounterfactualConfig, generator_warnings, spectrum_summary
    from manifex.counterfactuals.report import write_report

    records = _records([None, None, None], recon=[0.61, 0.3, 0.2])
    for r in records:
        r["files"] = {"tensors": f"units/{r['id']}/cf.pt"}  # not written: no figures, the page's boxes are under test
    warnings = generator_warnings(records, {"kind": "vae"})
    summary = {"latent": {"n": 3, "n_success": 0, "success_rate": 0.0, "all": {}}, "spectrum": spectrum_summary(records)}
    cfg = CounterfactualConfig(dataset="digits8", generator="vae", spaces=("latent",))
    result = CampaignResult(records, summary, {"generator": {"kind": "vae", "name": "VAE"}}, cfg, tmp_path,
                            checks=["pixels in [0, 1]"] + [f"FAILED: {w}" for w in warnings], warnings=warnings)
    html = write_report(result).read_text()
    assert html.count("<h2>Checks</h2>") == 1
    assert html.index("<h2>Checks</h2>") < html.index('class="cards"') < html.index("How to read this")
    assert '<li class="warn">approximate generator (vae)' in html and "dimension is not determined" in html
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["warnings"] == warnings
    assert metrics["summary"]["spectrum"]["dimension_median"] is None and metrics["summary"]["spectrum"]["dimension_note"]
