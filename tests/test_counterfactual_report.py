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
    from manifex.counterfactuals.campaign import spectrum_summary

    none = spectrum_summary(_records([None, None, 2]))
    assert none["dimension_median"] is None and "not determined" in none["dimension_note"] and none["no_gap"] == 2
    old = spectrum_summary(_records([4, 4, 4]))  # records of earlier versions store `top` for "no gap"
    assert old["dimension_median"] is None and old["dimension_counts"] == {}
    found = spectrum_summary(_records([2, 2, None]))
    assert found["dimension_median"] == 2.0 and "dimension_note" not in found


def test_approximate_generator_warning_comes_from_the_records():
    from manifex.counterfactuals.campaign import generator_warnings

    (w,) = generator_warnings(_records([2, 2], recon=[0.61, 0.2]), {"kind": "vae"})
    assert "0.61" in w and "vae" in w and "2 of 2" in w
    assert generator_warnings(_records([2, 2], recon=[1e-6, 2e-6]), {"kind": "flow"}) == []
    assert generator_warnings(_records([2, 2]), None) == []  # pixel space only: no reconstruction
