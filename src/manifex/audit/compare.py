"""``manifex audit --compare A B``: two finished audits side by side, from their ``metrics.json`` alone.

>>> from manifex.audit import compare
>>> result = compare("runs/audit", "runs/audit-l2", "runs/audit-compare")
>>> result.findings, result.report
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, param
from .plan import STAGES
from .summary import MANIPULATION_GAIN, SMOOTH_ACCURACY_COST, STAGE_TITLES, smoothing_choice, stage_numbers

__all__ = ["CompareResult", "compare"]

QUESTIONS = ("aligned?", "faithful?", "robust?", "manipulable?")
#: Settings that make two audits' numbers comparable: a difference is warned about at the top of the report (the
#: classifier, its epochs and its training are what a comparison usually varies, so they are shown, not warned about).
_SAME = ("dataset", "budget", "seed")


@dataclass
class CompareResult:
    """What :func:`compare` returns: the comparison (also in ``compare.json``), its findings, warnings and report."""

    out_dir: Path
    metrics: dict[str, Any]
    findings: list[str]
    warnings: list[str]
    report: Path


def _finished(path: str | os.PathLike, which: str) -> tuple[Path, dict[str, Any]]:
    """The ``metrics.json`` of a finished audit in ``path``; anything else is refused in one line."""
    p = Path(path).expanduser()
    how = f"pass the --out folder of a `manifex audit` that ran to the end (its report.html and metrics.json)"
    if not p.is_dir():
        raise InputError(f"audit {which} {p} is not a folder; {how}.")
    try:
        m = json.loads((p / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise InputError(f"audit {which} {p} is not a finished audit (no readable metrics.json); {how}.") from None
    if not isinstance(m, dict) or m.get("command") != "audit" or not isinstance(m.get("stages"), dict) \
            or not isinstance(m.get("scorecard"), list):
        found = m.get("command") if isinstance(m, dict) else None
        raise InputError(f"audit {which} {p} is not a finished audit (its metrics.json is "
                         f"{'from manifex ' + str(found) if found else 'not from manifex audit'}); {how}.")
    return p, m


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _f(v: Any, digits: int = 3) -> str:
    v = _num(v)
    return "n/a" if v is None else f"{v:.{digits}f}"


def _label(path: Path, m: dict[str, Any]) -> str:
    name = (m.get("model") or {}).get("name") or (m.get("config") or {}).get("classifier", "?")
    return f"{path.name} · {name}"


def _start_probability(m: dict[str, Any], method: str) -> float | None:
    p = _num((((m["stages"].get("evaluate") or {}).get("headline") or {}).get("start_probability") or {}).get(method))
    return p if p is not None and p > 0 else None


def _scorecard(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method and question measured in either audit: each side's cell and the difference B − A of
    ``compared`` (the cell's number; for faithful? the deletion AUC divided by the no-effect AUC, the target
    probability before any deletion: the raw AUC scales with the model's confidence, so a less confident model
    would look more faithful; for manipulable? the attack's rise of the PCC, after − before)."""
    rows_a = {r["method"]: r for r in a["scorecard"] if isinstance(r, dict) and "method" in r}
    rows_b = {r["method"]: r for r in b["scorecard"] if isinstance(r, dict) and "method" in r}
    out = []
    for method in [*rows_a, *(m for m in rows_b if m not in rows_a)]:
        for q in QUESTIONS:
            ca, cb = rows_a.get(method, {}).get(q), rows_b.get(method, {}).get(q)
            if ca is None and cb is None:
                continue
            va, vb = _num((ca or {}).get("value")), _num((cb or {}).get("value"))
            row = {"method": method, "question": q, "a": ca, "b": cb, "compared": "value"}
            if q == "faithful?":
                pa, pb = _start_probability(a, method), _start_probability(b, method)
                va = None if va is None or pa is None else va / pa
                vb = None if vb is None or pb is None else vb / pb
                row.update(compared="AUC ÷ no-effect AUC", relative={"a": va, "b": vb})
            elif q == "manipulable?":  # what the attack achieved: the rise of the PCC from its reference (before)
                ra, rb = (_num((c or {}).get("reference")) for c in (ca, cb))
                va = None if va is None or ra is None else va - ra
                vb = None if vb is None or rb is None else vb - rb
                row.update(compared="rise of the PCC with the target map", relative={"a": va, "b": vb})
            row["difference"] = None if va is None or vb is None else vb - va
            out.append(row)
    return out


def _findings(a: dict[str, Any], b: dict[str, Any], la: str, lb: str, rows: list[dict[str, Any]]) -> list[str]:
    out = []
    aligned = [r for r in rows if r["question"] == "aligned?" and r["difference"] is not None]
    for r in sorted(aligned, key=lambda r: r["method"] != "gradient")[:1]:  # the seed's finding is about gradients
        va, vb = r["a"]["value"], r["b"]["value"]
        out.append(f"Tangent alignment of {r['method']}: {va:.2f}× chance in {la}, {vb:.2f}× in {lb} "
                   f"({'higher' if vb > va else 'not higher'} in {lb}, {vb / va:.2f}×)." if va > 0 else
                   f"Tangent alignment of {r['method']}: {va:.2f}× chance in {la}, {vb:.2f}× in {lb}.")
    for label, m in ((la, a), (lb, b)):
        s = smoothing_choice((((m["stages"].get("smooth") or {}).get("headline")) or {}).get("sweep") or [])
        if s is None:
            continue
        relu, best, costly = s
        if best is None:
            out.append(f"β-smoothing in {label}: no β of the sweep keeps the accuracy within {SMOOTH_ACCURACY_COST:.2f}.")
            continue
        cost = _num(best.get("accuracy_cost"))
        out.append(f"β-smoothing in {label}: the attack's gain in PCC {relu['pcc_gain']:.3f} → {best['pcc_gain']:.3f} "
                   f"at {best['beta']}" + ("" if cost is None else f" (accuracy {'down' if cost > 0 else 'up'} by {abs(cost):.3f})")
                   + ("" if relu["pcc_gain"] >= MANIPULATION_GAIN else
                      f"; not judged: the unsmoothed attack gained less than {MANIPULATION_GAIN:g}, no manipulation at this budget")
                   + ".")
    for r in rows:
        if r["question"] == "manipulable?" and r["a"] and r["b"]:
            v = [_num(c.get(k)) for c in (r["a"], r["b"]) for k in ("value", "reference")]
            if None in v:
                continue
            ga, gb = v[0] - v[1], v[2] - v[3]
            out.append(f"Manipulating {r['method']} maps at L∞ 8/255 raised their PCC with the target map by {ga:+.2f} in {la} "
                       f"and {gb:+.2f} in {lb}.")
    return out


def _warnings(a: dict[str, Any], b: dict[str, Any], la: str, lb: str) -> list[str]:
    out = []
    ca, cb = a.get("config") or {}, b.get("config") or {}
    for k in _SAME:
        if ca.get(k) != cb.get(k):
            out.append(f"the audits differ in {k} ({la}: {ca.get(k)}, {lb}: {cb.get(k)}): their numbers are not measured "
                       "on the same footing")
    da, db = (a.get("data") or {}).get("fingerprint"), (b.get("data") or {}).get("fingerprint")
    if da is None or db is None:
        out.append("the data of one audit is not recorded (an audit of an older manifex): check that both ran on the same data")
    elif da != db:
        out.append(f"the audits ran on different data (fingerprints {da} and {db})")
    fa, fb = (a.get("model") or {}).get("fingerprint"), (b.get("model") or {}).get("fingerprint")
    if fa is not None and fa == fb:
        out.append(f"both audits audited the same model (weights fingerprint {fa}): the differences are noise of the budget")
    for label, m in ((la, a), (lb, b)):
        failed = [c for c in m.get("checks", []) if isinstance(c, str) and c.startswith("FAILED: ")]
        if failed:
            out.append(f"{label} failed {len(failed)} check(s) (see its report): {failed[0][len('FAILED: '):]}")
    return out


def _stages(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name in STAGES:
        sa, sb = a["stages"].get(name), b["stages"].get(name)
        if sa is None and sb is None:
            continue
        na = dict(stage_numbers(name, sa.get("headline", {}))) if sa and sa.get("status") == "done" else {}
        nb = dict(stage_numbers(name, sb.get("headline", {}))) if sb and sb.get("status") == "done" else {}
        labels = [*na, *(k for k in nb if k not in na)]
        out.append({"name": name, "title": STAGE_TITLES.get(name, name),
                    "status": {"a": (sa or {}).get("status", "not run"), "b": (sb or {}).get("status", "not run")},
                    "reason": {"a": (sa or {}).get("reason"), "b": (sb or {}).get("reason")},
                    "numbers": [[k, na.get(k, "–"), nb.get(k, "–")] for k in labels]})
    return out


def compare(a: str | os.PathLike, b: str | os.PathLike, out_dir: str | os.PathLike = "runs/audit-compare", *,
            command: str | None = None) -> CompareResult:
    """Compare two finished audits (their ``--out`` folders) side by side: the two models' identities, the scorecard
    rows next to each other with the difference B − A, each stage's headline numbers, and a warning where the data,
    the budget or the seed differ. Writes ``out_dir/report.html`` and ``out_dir/compare.json``; reads nothing but
    the two ``metrics.json`` files (nothing is trained). A folder that is not a finished audit is refused in one line."""
    from ..models.resolve import check_writable_dir
    from ..reports import render
    from ..runs import atomic_write_json, to_jsonable

    pa, ma = _finished(a, "A")
    pb, mb = _finished(b, "B")
    target = Path(out_dir).expanduser()
    for p, which in ((pa, "A"), (pb, "B")):
        if target.resolve() == p.resolve():
            raise InputError(f"{param('out_dir')} {target} is audit {which} itself (its report would be replaced); "
                             "write the comparison to another folder.")
    out = check_writable_dir(target, param("out_dir"))
    la, lb = _label(pa, ma), _label(pb, mb)
    if la == lb:
        la, lb = f"A: {la}", f"B: {lb}"
    rows = _scorecard(ma, mb)
    findings = _findings(ma, mb, la, lb, rows)
    warnings = _warnings(ma, mb, la, lb)
    stages = _stages(ma, mb)
    side = {k: {"path": str(p), "label": lab, "model": m.get("model"), "config": m.get("config"), "data": m.get("data"),
                "recommendation": m.get("recommendation")} for k, p, lab, m in (("a", pa, la, ma), ("b", pb, lb, mb))}
    metrics = {"command": "audit-compare", "schema": 1, **side, "warnings": warnings, "findings": findings,
               "scorecard": rows, "stages": {s["name"]: {"a": (ma["stages"].get(s["name"]) or {}).get("headline"),
                                                          "b": (mb["stages"].get(s["name"]) or {}).get("headline")}
                                              for s in stages}}
    atomic_write_json(out / "compare.json", to_jsonable(metrics))
    keys = ("name", "source", "architecture", "spec", "weights", "fingerprint", "accuracy")
    models = [[k, *(_cell((m.get("model") or {}).get(k)) for m in (ma, mb))] for k in keys
              if any((m.get("model") or {}).get(k) is not None for m in (ma, mb))]
    cfg_keys = [k for k in ("dataset", "budget", "training", "epochs", "seed", "stages")
                if any(k in (m.get("config") or {}) for m in (ma, mb))]
    models += [[k, *(_cell((m.get("config") or {}).get(k)) for m in (ma, mb))] for k in cfg_keys]
    models.append(["data fingerprint", *(_cell((m.get("data") or {}).get("fingerprint")) for m in (ma, mb))])
    links = [os.path.relpath(p / "report.html", out) for p in (pa, pb)]
    report = render("audit_compare.html.j2", out / "report.html", title="manifex · audit comparison",
                    headline=f"{la} vs {lb}", subtitle=f"two audits side by side; differences are {lb} − {la}",
                    findings=findings, warnings=warnings, checks=[], la=la, lb=lb, links=links, models=models,
                    rows=rows, stages=stages, recommendations=[ma.get("recommendation"), mb.get("recommendation")],
                    fmt=_f, command=command)
    return CompareResult(out_dir=out, metrics=metrics, findings=findings, warnings=warnings, report=report)


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v))
    return str(v)
