"""The audit's numbers: each stage's headline (read from the stage's own ``metrics.json``), the scorecard and the
recommendation that follows from them. Pure functions of plain dicts, so a resumed or copied audit re-reads them.

Scorecard rules (each verdict is shown with its number and its reference):

- aligned?  TangentAlignment: ‖P_T E‖/‖E‖ over a random direction's expected score (reference 1 = chance). "yes" when
  the lower quartile over the images exceeds 1, "partly" when only the mean does, else "no".
- faithful?  on-manifold deletion AUC of the target probability (lower = better; in-filled from the generator), against
  the best method's AUC; "best" for the lowest, else the rank.
- sanity?  Quantus' model-parameter randomisation (MPRT): rank correlation of each method's |maps| of the trained model
  and of the model with every layer randomised (reference 0: the maps depend on the weights); "passes" below
  :data:`MPRT_LIMIT`. Not run (said so) without Quantus.
- aligned? and faithful? are "withheld" (numbers kept) when the manifold stage finds the VAE they rest on
  reconstructs held-out images no better than their mean image (R² ≤ 0); kept but marked "read with care" in their
  texts and the recommendation while R² < :data:`WEAK_R2`. Neither applies to a known manifold (``known:<data>``):
  the VAE is then the images' own generator and its tangent spaces are exact.
- robust?  Quantus' max-sensitivity (where the evaluation ran it; lower = better), against the best method's.
- manipulable?  the attack at L∞ 8/255: Pearson correlation of the manipulated map with the target map against the
  original map's correlation with it (the reference); "yes" when the attack raised it by at least
  :data:`MANIPULATION_GAIN` with the prediction kept on every pair. One attack per method of the evaluate stage
  (those the attack can differentiate); β-smoothing is measured on gradient maps only.
"""
from __future__ import annotations

import math
from typing import Any

__all__ = ["headline", "stage_headline", "stage_of", "scorecard", "recommendation", "MANIPULATION_GAIN", "MPRT_LIMIT",
           "WEAK_R2", "STAGE_TITLES", "SMOOTH_ACCURACY_COST", "smoothing_choice"]

#: The least rise of the map's PCC with the target map that counts as a successful manipulation (the attack
#: literature reports rises of 0.3-0.9 at 8/255 on ImageNet; 0.1 is a deliberately low bar for a smoke budget).
MANIPULATION_GAIN = 0.1
#: The randomisation sanity check (Adebayo et al. 2018, Quantus' MPRT: Spearman rank correlation of |maps| of the
#: trained model and of the model with every layer randomised, top down) passes below this correlation: the maps
#: then share less than a quarter of their rank variance (ρ² < 0.25) with maps that no longer depend on training.
MPRT_LIMIT = 0.5

STAGE_TITLES = {"model": "The model and its data: accuracy, calibration, the checks",
                "manifold": "The data manifold: generators, their quality and dimension", "evaluate": "Explanations: faithfulness and tangent alignment", "attack": "Manipulability at L∞ 8/255",
                "smooth": "β-smoothing against manipulation", "counterfactual": "Counterfactuals: latent vs pixel",
                "concepts": "Concepts and the prediction-from-components test", "contrast": "Class contrast: one pair"}


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _failed(m: dict[str, Any]) -> list[str]:
    return [c[len("FAILED: "):] for c in m.get("checks", []) if isinstance(c, str) and c.startswith("FAILED: ")]


def headline(stage: str, m: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one stage from its ``metrics.json`` (one schema per stage; missing numbers are None)."""
    h: dict[str, Any] = {"failed_checks": _failed(m)}
    if stage == "model":
        cal = m.get("calibration") or {}
        h.update(accuracy=m.get("accuracy"), chance=m.get("chance"), balanced_accuracy=m.get("balanced_accuracy"),
                 ece=cal.get("ece"), ece_bins=len(cal.get("bins") or []) or None, mean_confidence=cal.get("mean_confidence"),
                 n_test=m.get("n_test"), n_nonfinite=m.get("n_nonfinite"),
                 never_predicted=[c for c, n in enumerate(m.get("predicted_counts") or []) if n == 0])
    elif stage == "manifold":
        h["generators"] = {kind: {**{k: g.get(k) for k in ("name", "exact", "epochs", "latent_dim", "n", "bits_per_dim",
                                                            "train_bits_per_dim", "uniform_bits_per_dim", "recon_mse",
                                                            "mean_image_mse", "r2", "round_trip_max", "known",
                                                            "dimension", "labeler_accuracy", "acceptance_rate",
                                                            "tangent_rank_min", "tangent_rank_max")},
                                  **{k: _get(g, "spectrum", k) for k in ("dimension_median", "gap_found_fraction", "top",
                                                                         "dimension_note", "dimension_energy_median")}}
                           for kind, g in (m.get("generators") or {}).items()}
        h["pixels"] = m.get("pixels")
    elif stage == "evaluate":
        s = m.get("summary", {})
        table = s.get("table", {})
        h["methods"] = {meth: {col: _get(table, col, meth, "mean") for col in s.get("columns", [])}
                        for meth in s.get("methods", [])}
        h["alignment_q1"] = {meth: _get(table, "TangentAlignment", meth, "q1") for meth in s.get("methods", [])}
        h["start_probability"] = {meth: (v[0] if v else None) for meth, v in (_get(s, "curves", "manifold") or {}).items()}
        h["direction"] = s.get("direction", {})
        h["ranking_changes"] = _get(s, "ranking_change", "changes")
    elif stage == "attack":
        means = m.get("means", {})
        h.update(method=m.get("method"), budget_linf=_get(m, "config", "budget"), n_pairs=m.get("n_pairs"),
                 pcc_manip_target=means.get("pcc_manip_target"), pcc_orig_target=means.get("pcc_orig_target"),
                 pcc_manip_orig=means.get("pcc_manip_orig"), top1_kept_rate=m.get("top1_kept_rate"),
                 max_dp=means.get("max_dp"))
    elif stage == "smooth":
        h.update(method=m.get("method"), budget_linf=m.get("budget_linf"),
                 sweep=[{k: r.get(k) for k in ("beta", "pcc_manip_target", "pcc_orig_target", "pcc_gain", "accuracy",
                                                "accuracy_cost", "curvature", "top1_kept_rate", "n_pairs")}
                        for r in m.get("sweep", [])])
    elif stage == "counterfactual":
        s = m.get("summary", {})
        for space in ("latent", "pixel"):
            if space in s:
                a = s[space].get("all", {})
                h[space] = {"n": s[space].get("n"), "success_rate": s[space].get("success_rate"),
                            **{k: _get(a, k, "mean") for k in ("validity", "svm", "knn_vote", "second", "tangent_fraction",
                                                               "l2", "linf")}}
        h["source"], h["target"] = _get(m, "config", "source"), _get(m, "config", "target")
        h["stop_prob"] = _get(m, "config", "stop_prob")
    elif stage == "concepts":
        s = m.get("summary", {})
        h.update(classes=s.get("classes"), layer=_get(m, "options", "layer"),
                 concepts={k: _get(s, "include", "concepts", k) for k in ("argmax_rate", "argmax_ci_low", "argmax_ci_high", "n",
                                                                          "mean_p")},
                 control={k: _get(s, "include", "control", k) for k in ("argmax_rate", "argmax_ci_low", "argmax_ci_high", "n",
                                                                         "mean_p")})
    elif stage == "contrast":
        s = m.get("summary", {})
        h.update(pairs=m.get("pairs"), **{k: s.get(k) for k in ("swap_rate", "n_swapped", "control_swap_rate", "n_control",
                                                                 "hyperplane_accuracy", "median_t_swap")})
    return h


def stage_of(key: str) -> str:
    """The stage a folder of the audit belongs to: ``attack-lrp`` (the attack on LRP maps) → ``attack``."""
    return key.split("-", 1)[0]


def stage_headline(stage: str, metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The headline of ``stage`` from every folder's ``metrics.json`` (``metrics``: folder → metrics). The attack
    stage's adds ``methods``: one attack headline per method (gradient from ``attack``, the others from
    ``attack-<method>``), and its failed checks are every method's."""
    h = headline(stage, metrics.get(stage, {}))
    if stage == "attack":
        per = [headline("attack", m) for key, m in metrics.items() if stage_of(key) == "attack"]
        h["methods"] = {p["method"]: p for p in per if p.get("method")}
        h["failed_checks"] = [f"{p['method']}: {c}" if p.get("method") != h.get("method") else c
                              for p in per for c in p["failed_checks"]]
    return h


def _f(v: Any, digits: int = 2) -> str:
    v = _num(v)
    return "n/a" if v is None else f"{v:.{digits}f}"


def scorecard(stages: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per explanation method: aligned?, faithful?, robust?, manipulable? — each ``{"verdict", "value", "reference",
    "text"}`` or absent where no stage measured it."""
    rows: dict[str, dict[str, Any]] = {}
    ev = _get(stages, "evaluate", "headline") or {}
    methods = ev.get("methods", {})
    deletion = {k: _num(v.get("ManifoldDeletion")) for k, v in methods.items()}
    ranked = sorted((v, k) for k, v in deletion.items() if v is not None)
    for meth, cols in methods.items():
        row = rows.setdefault(meth, {"method": meth})
        ratio, q1 = _num(cols.get("TangentAlignment")), _num(ev.get("alignment_q1", {}).get(meth))
        if ratio is not None:
            verdict = "yes" if q1 is not None and q1 > 1 else "partly" if ratio > 1 else "no"
            row["aligned?"] = {"verdict": verdict, "value": ratio, "reference": 1.0,
                               "text": f"{ratio:.2f}× chance (lower quartile {_f(q1)}; chance = 1)"}
        auc = deletion.get(meth)
        if auc is not None and ranked:
            rank = [k for _, k in ranked].index(meth) + 1
            best_v, best_k = ranked[0]
            p0 = _num(ev.get("start_probability", {}).get(meth))
            row["faithful?"] = {"verdict": "best" if rank == 1 else f"rank {rank} of {len(ranked)}", "value": auc,
                                "reference": best_v,
                                "text": f"on-manifold deletion AUC {auc:.3f} (best: {best_k} {best_v:.3f}; "
                                        f"no effect ≈ {_f(p0, 3)}; lower = more faithful)"}
    why, weak = generator_withheld(stages), generator_weak(stages)
    if why:  # the alignment and the in-filled deletion rest on the VAE: their verdicts are withheld, numbers kept
        for row in rows.values():
            for q in ("aligned?", "faithful?"):
                if q in row:
                    row[q] = {**row[q], "verdict": "withheld", "text": f"{row[q]['text']}; {why}"}
    elif weak:  # kept, but the text says what they rest on
        for row in rows.values():
            for q in ("aligned?", "faithful?"):
                if q in row:
                    row[q] = {**row[q], "text": f"{row[q]['text']}; {weak}"}
    sens = sorted((_num(v.get("MaxSensitivity")), k) for k, v in methods.items() if _num(v.get("MaxSensitivity")) is not None)
    for rank, (v, meth) in enumerate(sens, 1):
        rows[meth]["robust?"] = {"verdict": "most robust" if rank == 1 else f"rank {rank} of {len(sens)}", "value": v,
                                 "reference": sens[0][0], "text": f"max-sensitivity {v:.3f} (best: {sens[0][1]} "
                                                                  f"{sens[0][0]:.3f}; lower = more robust)"}
    for meth, v in methods.items():
        rho = _num(v.get("MPRT"))
        if rho is not None:
            rows[meth]["sanity?"] = {
                "verdict": "passes" if abs(rho) < MPRT_LIMIT else "fails", "value": rho, "reference": 0.0,
                "text": f"rank correlation {rho:.2f} of the maps of the trained and the fully randomised model (0 = maps "
                        f"depend on the weights; 1 = unchanged; passes below {MPRT_LIMIT})"}
    if methods and not any(_num(v.get("MPRT")) is not None for v in methods.values()):
        for row in rows.values():
            row["sanity?"] = {"verdict": "not run", "value": None, "reference": None,
                                            "text": "the evaluate stage did not score MPRT, the model-parameter randomisation check "
                                      "(it needs Quantus: pip install \"manifex[eval]\")"}
    at = _get(stages, "attack", "headline") or {}
    for meth, a in (at.get("methods") or ({at["method"]: at} if at.get("method") else {})).items():
        row = rows.setdefault(meth, {"method": meth})
        after, before, kept = _num(a.get("pcc_manip_target")), _num(a.get("pcc_orig_target")), _num(a.get("top1_kept_rate"))
        if after is not None and before is not None:
            gain = after - before
            yes = gain >= MANIPULATION_GAIN and kept == 1.0
            row["manipulable?"] = {"verdict": "yes" if yes else "not at this budget", "value": after, "reference": before,
                                   "text": f"PCC with the target map {before:.2f} → {after:.2f} at L∞ "
                                           f"{_f((a.get('budget_linf') or 0) * 255, 0)}/255 over {a.get('n_pairs')} pairs "
                                           f"(prediction kept: {_f(kept)}; counts from a rise ≥ {MANIPULATION_GAIN})"}
    return list(rows.values())


def _known_manifold(stages: dict[str, dict[str, Any]]) -> bool:
    """The data's manifold is known (``known:<data>``): the VAE is the images' generator, its tangent spaces exact, so
    no reconstruction quality applies to the verdicts that rest on it."""
    return bool(_get(stages, "manifold", "headline", "generators", "vae", "known"))


def generator_withheld(stages: dict[str, dict[str, Any]]) -> str | None:
    """Why the verdicts that rest on the evaluate stage's VAE (alignment, in-filled deletion) are withheld: the
    manifold stage found it reconstructs held-out images no better than their mean image (R² ≤ 0); else None."""
    r2 = _num(_get(stages, "manifold", "headline", "generators", "vae", "r2"))
    if r2 is None or r2 > 0 or _known_manifold(stages):
        return None
    return f"withheld: the VAE it rests on reconstructs held-out images no better than their mean image (R² {r2:.2f})"


#: Below this R² (of the VAE's held-out reconstructions against their mean image) the alignment and in-filled deletion
#: verdicts are kept but flagged: the manifold estimate they rest on explains less than half of the images' variance.
WEAK_R2 = 0.5


def generator_weak(stages: dict[str, dict[str, Any]]) -> str | None:
    """A caution for verdicts that rest on a VAE that learnt something but little (0 < R² < ``WEAK_R2``); else None."""
    r2 = _num(_get(stages, "manifold", "headline", "generators", "vae", "r2"))
    if r2 is None or r2 <= 0 or r2 >= WEAK_R2 or _known_manifold(stages):
        return None
    return f"read with care: the VAE it rests on explains only {r2:.0%} of the held-out images' variance around their mean"


def _model_sentence(stages: dict[str, dict[str, Any]]) -> str | None:
    m = _get(stages, "model", "headline") or {}
    acc, chance, ece, conf = (_num(m.get(k)) for k in ("accuracy", "chance", "ece", "mean_confidence"))
    if acc is None or chance is None:
        return None
    text = f"The model's held-out accuracy is {acc:.3f} (chance {chance:.3f})"
    if ece is not None and conf is not None:
        side = "over" if conf > acc else "under"
        text += f"; its calibration error is {ece:.3f} ({side}confident: mean confidence {conf:.3f})"
    failed = m.get("failed_checks") or []
    return text + (f"; it failed {len(failed)} check(s), so every finding below is about a flawed model: "
                   f"{failed[0]}." if failed else ".")


def recommendation(rows: list[dict[str, Any]], stages: dict[str, dict[str, Any]]) -> str:
    """One or two sentences that follow from the scorecard's numbers (and say what is withheld or missing)."""
    parts: list[str] = [s for s in (_model_sentence(stages),) if s]
    ev_failed = (_get(stages, "evaluate", "headline") or {}).get("failed_checks")
    why = generator_withheld(stages)
    if ev_failed:
        parts.append(f"The explanation scores are withheld: the evaluation failed {len(ev_failed)} check(s) (see its report).")
    elif why:
        parts.append(f"Alignment and on-manifold faithfulness are {why}.")
    else:
        if generator_weak(stages):
            r2 = _num(_get(stages, "manifold", "headline", "generators", "vae", "r2"))
            parts.append(f"Read alignment and on-manifold faithfulness with care: the VAE they rest on explains only "
                         f"{r2:.0%} of the held-out images' variance around their mean (R² {r2:.2f}, manifold stage).")
        faithful = [r for r in rows if _get(r, "faithful?", "verdict") == "best"]
        aligned = sorted((r for r in rows if "aligned?" in r), key=lambda r: -r["aligned?"]["value"])
        if faithful and aligned:
            f, a = faithful[0], aligned[0]
            fa = f"on-manifold deletion AUC {f['faithful?']['value']:.3f}, lower = more faithful"
            al = f"{a['aligned?']['value']:.2f}× the alignment of a random direction"
            if f["method"] == a["method"]:
                parts.append(f"For this model, {f['method']} is the most faithful and the most aligned method ({fa}; {al}).")
            else:
                parts.append(f"For this model, {f['method']} is the most faithful method ({fa}) and {a['method']} the "
                             f"most aligned with the data manifold ({al}).")
            if a["aligned?"]["verdict"] == "no":
                parts.append("No method's explanations lie in the data manifold's tangent space more than a random direction.")
        elif "evaluate" in stages:
            parts.append("The evaluation gave no comparable faithfulness or alignment numbers.")
        else:
            parts.append("The explanations were not evaluated (stage evaluate not run).")
    man = [r for r in rows if "manipulable?" in r]
    at_failed = (_get(stages, "attack", "headline") or {}).get("failed_checks")
    if man and not at_failed:
        def say(rs: list[dict[str, Any]]) -> str:
            return ", ".join(f"{r['method']} ({r['manipulable?']['reference']:.2f} → {r['manipulable?']['value']:.2f})"
                             for r in rs)

        can = [r for r in man if r["manipulable?"]["verdict"] == "yes"]
        cannot = [r for r in man if r["manipulable?"]["verdict"] != "yes"]
        if can:
            parts.append(f"Maps that can be manipulated at L∞ 8/255 (PCC with the target map before → after): {say(can)}.")
        if cannot:
            parts.append(f"Maps that could not be manipulated at L∞ 8/255: {say(cannot)}.")
    insane = [r["method"] for r in rows if _get(r, "sanity?", "verdict") == "fails"]
    if insane and not ev_failed:
        parts.append(f"The randomisation sanity check fails for {', '.join(insane)}: "  # a sentence never opens with a method's name
                     f"{'its' if len(insane) == 1 else 'their'} maps barely change when the model's weights are randomised.")
    sm = _get(stages, "smooth", "headline") or {}
    choice = smoothing_choice(sm.get("sweep", []))
    if choice is not None and not sm.get("failed_checks"):
        relu, s, costly = choice
        if s is None:
            parts.append(f"No β of the sweep keeps the accuracy within {SMOOTH_ACCURACY_COST:.2f} of the ReLU model's "
                         f"({', '.join(str(c['beta']) + ' costs ' + format(c['accuracy_cost'], '.3f') for c in costly)}), so β-smoothing "
                         "was not judged.")
        else:
            cost = _num(s.get("accuracy_cost"))
            acc = ("" if cost is None else f", accuracy {'down' if cost > 0 else 'up'} by {abs(cost):.3f}")
            which = (f"{s['beta']}, on gradient maps: of the βs that keep the accuracy within {SMOOTH_ACCURACY_COST:.2f}, "
                     "the one with the smallest gain")
            if relu["pcc_gain"] < MANIPULATION_GAIN:  # nothing to defend: the change is within the attack's noise
                parts.append(f"β-smoothing is not judged at this budget: the attack on the ReLU model's gradient maps gained "
                             f"only {relu['pcc_gain']:.3f} in PCC (a manipulation counts from {MANIPULATION_GAIN:g}), and "
                             f"{s['pcc_gain']:.3f} with {s['beta']}{acc}.")
            else:
                parts.append(f"β-smoothing ({which}) {'reduces' if s['pcc_gain'] < relu['pcc_gain'] else 'does not reduce'} "
                             f"the attack's gain in PCC ({relu['pcc_gain']:.3f} → {s['pcc_gain']:.3f}{acc}).")
    return " ".join(parts)


#: β-smoothing is judged at an accuracy-preserving β: a smoothed model more than this below the ReLU model's held-out
#: accuracy is not a defence worth recommending (β = 3 cost 0.30 on MNIST-5k's LeNet, β = 10 about 0.01)
SMOOTH_ACCURACY_COST = 0.02


def smoothing_choice(sweep: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any] | None, list[dict[str, Any]]] | None:
    """From a smooth stage's sweep: ``(the ReLU row, the accuracy-preserving smoothed row with the smallest attack
    gain or None, the smoothed rows that cost more accuracy than SMOOTH_ACCURACY_COST)``; None without a ReLU row or
    a smoothed row with a gain."""
    relu = next((r for r in sweep if r.get("beta") == "ReLU" and _num(r.get("pcc_gain")) is not None), None)
    smoothed = [r for r in sweep if r.get("beta") != "ReLU" and _num(r.get("pcc_gain")) is not None]
    if relu is None or not smoothed:
        return None
    costly = [r for r in smoothed if (_num(r.get("accuracy_cost")) or 0.0) > SMOOTH_ACCURACY_COST]
    kept = [r for r in smoothed if r not in costly]
    return relu, (min(kept, key=lambda r: r["pcc_gain"]) if kept else None), costly


def stage_numbers(stage: str, h: dict[str, Any]) -> list[tuple[str, str]]:
    """The few numbers a stage's section of the audit report shows (label, value with its reference)."""
    if stage == "model":
        return [("held-out accuracy", f"{_f(h.get('accuracy'), 3)} (chance, the largest class's share: {_f(h.get('chance'), 3)}; "
                 f"balanced {_f(h.get('balanced_accuracy'), 3)}; n = {h.get('n_test')})"),
                (f"expected calibration error ({h.get('ece_bins')} bins)", f"{_f(h.get('ece'), 3)} (0 = calibrated; mean "
                 f"confidence {_f(h.get('mean_confidence'), 3)} against accuracy {_f(h.get('accuracy'), 3)})")]
    if stage == "manifold":
        out = []
        for kind, g in (h.get("generators") or {}).items():
            if g.get("known"):
                out.append((f"known manifold ({g.get('name')}, {g.get('epochs')} epochs)",
                            f"dimension k = {g.get('dimension')} exactly, images sampled from a VAE decoder (labeler "
                            f"accuracy {_f(g.get('labeler_accuracy'), 3)}, acceptance {_f(g.get('acceptance_rate'), 3)}); "
                            f"tangent spaces exact (∂decode/∂z rank {g.get('tangent_rank_min')}–{g.get('tangent_rank_max')}; "
                            f"{h.get('pixels')} pixels)"))
                continue
            quality = (f"held-out {_f(g.get('bits_per_dim'))} bits/dim (training {_f(g.get('train_bits_per_dim'))}; uniform "
                       f"{_f(g.get('uniform_bits_per_dim'), 0)}; lower = better)" if kind == "flow" else
                       f"held-out reconstruction MSE {_f(g.get('recon_mse'), 4)} (mean image: {_f(g.get('mean_image_mse'), 4)}; "
                       f"R² {_f(g.get('r2'))})")
            dim = (f"{_f(g.get('dimension_median'), 0)} of {g.get('latent_dim')} latent dimensions" if g.get("dimension_median")
                   is not None else f"no gap σᵢ/σᵢ₊₁ ≥ 10 in the top {g.get('top')} of {g.get('latent_dim')}")
            dim += f"; 99% of Σσ² in {_f(g.get('dimension_energy_median'), 0)} of the top {g.get('top')}"
            ep = g.get("epochs")
            epochs = "the zoo's default epochs" if not ep else f"{ep} epoch{'' if ep == 1 else 's'}"
            out.append((f"{kind} ({g.get('name')}, {epochs})",
                        f"{quality}; spectrum dimension: {dim} ({h.get('pixels')} pixels)"))
        return out
    if stage == "evaluate":
        short = {"TangentAlignment": "tangent alignment", "BlackDeletion": "deletion AUC black",
                 "ROADDeletion": "ROAD", "ManifoldDeletion": "in-filled"}
        return [(m, " · ".join(f"{short.get(c, c)} {_f(v, 3)}" for c, v in cols.items()))
                for m, cols in h.get("methods", {}).items()]
    if stage == "attack":
        per = h.get("methods") or ({h["method"]: h} if h.get("method") else {})
        return [(f"{m}: PCC with the target map (before → after)",
                 f"{_f(a.get('pcc_orig_target'))} → {_f(a.get('pcc_manip_target'))} (manipulated ↔ original map "
                 f"{_f(a.get('pcc_manip_orig'))}; prediction kept {_f(a.get('top1_kept_rate'))}; {a.get('n_pairs')} pairs; "
                 f"report: {'attack' if m == h.get('method') else f'attack-{m}'}/report.html)") for m, a in per.items()]
    if stage == "smooth":
        return [(f"{s['beta']}: PCC gain of the attack on {h.get('method') or 'gradient'} maps", f"{_f(s.get('pcc_gain'), 3)} (accuracy {_f(s.get('accuracy'))}, "
                 f"curvature {_f(s.get('curvature'), 3)})") for s in h.get("sweep", [])]
    if stage == "counterfactual":
        out = []
        for space in ("latent", "pixel"):
            if space in h:
                d = h[space]
                out.append((f"{space}: success (p(target) > {_f(h.get('stop_prob'), 2)} within the steps) / validity "
                            f"(argmax = target) / SVM judge says target / tangent part of the change",
                            f"{_f(d.get('success_rate'))} / {_f(d.get('validity'))} / {_f(d.get('svm'))} / "
                            f"{_f(d.get('tangent_fraction'))} (n = {d.get('n')})"))
        return out
    if stage == "concepts":
        c, r = h.get("concepts", {}), h.get("control", {})
        return [("argmax = A from the concepts' crops",
                 f"{_f(c.get('argmax_rate'))} [{_f(c.get('argmax_ci_low'))}, {_f(c.get('argmax_ci_high'))}] (n = {c.get('n')})"),
                ("argmax = A from random crops (control)",
                 f"{_f(r.get('argmax_rate'))} [{_f(r.get('argmax_ci_low'))}, {_f(r.get('argmax_ci_high'))}] (n = {r.get('n')})"),
                ("layer", str(h.get("layer")))]
    if stage == "contrast":
        return [("pairs swapped by the shift along w_AB", f"{_f(h.get('swap_rate'))} (random directions: "
                 f"{_f(h.get('control_swap_rate'))})"), ("hyperplane accuracy", _f(h.get("hyperplane_accuracy"))),
                ("pairs", str(h.get("pairs")))]
    return []
