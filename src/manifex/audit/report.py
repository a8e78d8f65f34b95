"""The audit's one page: the scorecard, the recommendation, one short section per stage (linking its own report)
and the checks box (``reports/templates/audit.html.j2``, on the shared base template)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..reports import render
from .summary import STAGE_TITLES, stage_numbers

__all__ = ["write_audit_report"]

QUESTIONS = ("aligned?", "faithful?", "sanity?", "robust?", "manipulable?")

_WHAT = {
    "model": "The classifier on the held-out 20% of the data: accuracy against chance, calibration (expected "
             "calibration error over 15 confidence bins, with a reliability diagram) and the checks (class balance, "
             "constant or degenerate predictions, non-finite outputs).",
    "manifold": "The generators the other stages use (the evaluate stage's VAE, the counterfactual stage's flow), "
                "reused from the same cache: held-out quality with its reference and the dimension estimated from the "
                "decoder Jacobian's singular values.",
    "evaluate": "Each method's explanations of the same test images: alignment with the tangent space of a generator's "
                "manifold (1 = a random direction) and deletion curves with the removed pixels set to black, ROAD-imputed "
                "and in-filled from the generator (AUC of the target probability; lower = more faithful).",
    "attack": "Adversarial explanation manipulation: a perturbation within L∞ 8/255 that keeps the prediction and moves "
              "the explanation toward another image's.",
    "smooth": "The same attack against the β-smoothed model (ReLU → softplus(β)), with its accuracy and curvature.",
    "counterfactual": "Counterfactuals searched in the generator's latent space and, as the baseline, in pixel space: "
                      "success, the judges (SVM, k-NN, a second network) and the part of the change in the tangent space.",
    "concepts": "Concepts by NMF of a layer's relevance-weighted activations, and the prediction-from-components test "
                "against random crops.",
    "contrast": "Class contrasting: a hyperplane separating A from B in the layer, and the shifting test against random "
                "directions of the same norm.",
}


def write_audit_report(out: Path, metrics: dict[str, Any], *, command: str | None = None) -> Path:
    """Render ``out/report.html`` from the audit's ``metrics`` (what :func:`manifex.audit.audit` writes)."""
    stages = []
    for name, s in metrics["stages"].items():
        stages.append({"name": name, "title": STAGE_TITLES[name], "status": s["status"], "reason": s.get("reason"),
                       "report": s.get("report"), "seconds": s.get("seconds"), "earlier": s.get("earlier", False),
                       "what": _WHAT[name],
                       "numbers": stage_numbers(name, s.get("headline", {})) if s["status"] == "done" else []})
    model = {k: _shown(v) for k, v in (metrics.get("model") or {}).items() if k != "checks" and v is not None}
    cfg = metrics["config"]
    failed = [c[len("FAILED: "):] for c in metrics["checks"] if c.startswith("FAILED: ") and "skipped" not in c]
    return render("audit.html.j2", Path(out) / "report.html", title="manifex · audit",
                  headline="Can I trust this model's explanations, and which ones?",
                  subtitle=f"{model.get('name', cfg['classifier'])} on {cfg['dataset']} · budget {cfg['budget']} · "
                           f"{sum(s['status'] == 'done' for s in stages)} of {len(stages)} stages run"
                           + (f" ({sum(s['earlier'] for s in stages)} from an earlier call)" if any(s["earlier"] for s in stages)
                              else ""),
                  findings=[metrics["recommendation"]] if metrics["recommendation"] else [], questions=QUESTIONS,
                  scorecard=metrics["scorecard"], recommendation=metrics["recommendation"] or "none (no stage measured it)",
                  stages=stages, checks=metrics["checks"], warnings=failed, options={k: _shown(v) for k, v in cfg.items()},
                  model=model, command=command)


def _shown(v: Any) -> Any:
    """A settings value as a reader wants it: lists joined, floats to 4 significant digits."""
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v))
    return f"{v:.4g}" if isinstance(v, float) else v
