"""
Audit a model: every system on one classifier, and its scorecard
================================================================

"Can I trust this model's explanations, and which ones?" :func:`manifex.audit.audit` (``manifex audit``) runs every
system on one classifier — the model itself (accuracy, calibration), its data manifold (the generators' quality and
dimension), the evaluation (tangent alignment, deletion in-filled from a generator, the randomisation sanity check),
the manipulation attack on every method, the β-smoothing defence, latent against pixel counterfactuals, the concepts
and one class contrast — each as its own experiment in a subfolder, and condenses them into a scorecard per
attribution method: *aligned?* (with the data manifold, against chance), *faithful?* (on-manifold deletion against
the best method), *sanity?* (do the maps change when the weights are randomised?), *robust?* and *manipulable?*, and
a recommendation built from these numbers.

``budget="quick"`` is a smoke run (sample counts and steps from one table, :func:`manifex.audit.stage_configs`);
``standard`` gives numbers worth reading. See :doc:`/guide/evaluation`.
"""

# %%
# The audit
# ---------
# A LeNet trained for 3 epochs on scikit-learn's 8×8 digits (the built-in classifier of the audit; cached, and
# the same network as in the other digits examples). The experiment folders go to a temporary directory.
import tempfile
import textwrap

import matplotlib.pyplot as plt

from manifex.audit import AuditConfig, audit

with tempfile.TemporaryDirectory() as out:
    result = audit(AuditConfig(dataset="digits8", budget="quick"), out, progress=False)
    report_files = sorted(p.relative_to(out).as_posix() for p in result.out_dir.glob("*/report.html"))

for stage, seconds in result.seconds.items():
    print(f"stage {stage:15s} {seconds:6.1f} s")
print("skipped:", result.skipped or "none")
print("stage reports:", report_files)
print()
print(textwrap.fill(result.recommendation, 100))

# %%
# The scorecard
# -------------
# One row per attribution method, one column per question; each cell is the verdict and the number behind it
# (``result.scorecard``, also ``metrics.json`` → ``scorecard``). A question a stage did not answer is "—".
questions = [q for q in ("aligned?", "faithful?", "sanity?", "robust?", "manipulable?") if any(q in row for row in result.scorecard)]
cells = [[row[q]["verdict"] if q in row else "—" for q in questions] for row in result.scorecard]
methods = [row["method"] for row in result.scorecard]
for row in result.scorecard:
    for q in questions:
        if q in row:
            print(f"{row['method']:22s} {q:13s} {row[q]['verdict']:18s}")
            print(textwrap.indent(textwrap.fill(row[q]["text"], 90), " " * 4))

fig, ax = plt.subplots(figsize=(2.3 * len(questions) + 2, 0.5 * len(methods) + 1.2), layout="constrained")
ax.axis("off")


def colour(question, verdict):
    """Green where the answer speaks for the explanation, red where against it (being manipulable is bad)."""
    if verdict in ("—", "withheld", "not run") or verdict.startswith("rank"):
        return "#f0f0f0"
    good = verdict in ("yes", "best", "passes", "most robust") if question != "manipulable?" else verdict != "yes"
    return "#d9f0d3" if good else "#fde0dd"


colours = [[colour(q, c) for q, c in zip(questions, row)] for row in cells]
table = ax.table(cellText=cells, rowLabels=methods, colLabels=questions, cellColours=colours, loc="center",
                 cellLoc="center")
table.scale(1, 1.6)
ax.set_title("manifex audit --budget quick: scorecard", fontsize=10)
plt.show()

# %%
# What a full-size run shows
# --------------------------
# ``manifex audit --dataset mnist5k --budget standard`` runs the same stages with sample counts and steps worth
# reading (32 evaluation images, six methods each attacked for 100 steps, a flow for the counterfactuals); ``thorough``
# uses each system's research defaults. Every stage's own report (linked from the audit's ``report.html``) holds
# its details, and ``metrics.json`` has the same keys for every model, so two audits can be compared.
