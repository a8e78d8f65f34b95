"""
Quantus metrics through manifex: which explanation to trust?
============================================================

`Quantus <https://github.com/understandable-machine-intelligence-lab/Quantus>`_ collects the field's metrics of
explanation quality: faithfulness (PixelFlipping), robustness (MaxSensitivity), complexity (Sparseness,
Complexity), randomisation (RandomLogit). :func:`manifex.evaluate` runs any of them on any manifex method —
batched, on the model's device, the model left as found — and adds two metrics that need a generator:
``TangentAlignment`` (‖P_T E‖/‖E‖ over a random direction's expected score, 1 = chance) and ``ManifoldDeletion``
(the deletion curve with the removed pixels *in-filled from the generator*, so the images stay on the manifold).
:func:`manifex.evaluation.explain_func` is the bridge in the other direction: a Quantus ``explain_func`` that runs
any manifex method.

Quantus is an optional extra (``pip install "manifex[eval]"``); without it this example runs only the two
manifold metrics and says so. See :doc:`/guide/evaluation`.
"""

# %%
# Model, generator and images
# ---------------------------
# The LeNet (3 epochs) and the VAE (30 epochs) on scikit-learn's 8×8 digits, both cached; 8 test images.
import importlib.util

import matplotlib.pyplot as plt
import numpy as np
import torch

import manifex
from manifex.data import load_digits8
from manifex.evaluation import metric_info
from manifex.models import GenerativeTrainConfig, ModelCache, TrainConfig, get_classifier, get_generative

torch.manual_seed(0)
cache = ModelCache()
data = load_digits8()
train, test = data.split(0.2, seed=0)
model, _ = get_classifier(train, "lenet", TrainConfig(epochs=3), cache=cache, progress=False)
vae, _ = get_generative(data, "vae", 10, GenerativeTrainConfig(epochs=30), cache=cache, progress=False)
x, y = test.x[:8], test.y[:8]

metrics = ["TangentAlignment", "ManifoldDeletion"]
if importlib.util.find_spec("quantus") is not None:
    metrics = ["PixelFlipping", "MaxSensitivity", "Sparseness", "Complexity"] + metrics
else:
    print("Quantus is not installed: only manifex's own manifold metrics run (pip install 'manifex[eval]').")

# %%
# Five methods, six metrics
# -------------------------
# One call per method; each metric's metadata says which direction is better. A deletion curve (N, steps) is
# summarised by its mean (the area under it, per step). Options go to the metrics that take them by Quantus's
# own names: ``nr_samples=10`` noisy re-explanations for MaxSensitivity (Quantus's default is 200).
methods = ["gradient", "smoothgrad", "integrated_gradients", "input_x_gradient", "lrp"]
table = {}
for method in methods:
    options = {"nr_samples": 10} if "MaxSensitivity" in metrics else {}
    scores = manifex.evaluate(model, x, y, metrics=metrics, method=method, generator=vae, **options)
    table[method] = {name: float(np.nanmean(s.float().numpy())) for name, s in scores.items()}
names = list(table[methods[0]])
better = {name: metric_info(name).higher_is_better for name in names}
print(f"{'method':22s}" + "".join(f"{n[:16]:>17s}" for n in names))
print(f"{'(better)':22s}" + "".join(f"{'higher' if better[n] else 'lower':>17s}" for n in names))
for method in methods:
    print(f"{method:22s}" + "".join(f"{table[method][n]:17.3f}" for n in names))

# %%
# Ranks per metric
# ----------------
# Rank 1 is the best method for that metric. When the rankings of the columns disagree, the metrics ask
# different questions — which is the point of looking at several.
values = np.array([[table[m][n] for n in names] for m in methods])
ranks = np.empty_like(values)
for j, n in enumerate(names):
    order = np.argsort(-values[:, j] if better[n] else values[:, j])
    ranks[order, j] = np.arange(1, len(methods) + 1)
fig, ax = plt.subplots(figsize=(1.5 * len(names) + 2.5, 3.8), layout="constrained")
ax.imshow(ranks, cmap="viridis", aspect="auto")  # rank 1 (best) darkest
for i in range(len(methods)):
    for j in range(len(names)):
        ax.text(j, i, f"{values[i, j]:.3g}", ha="center", va="center", fontsize=8,
                color="white" if ranks[i, j] <= len(methods) / 2 else "black")
ax.set_xticks(range(len(names)), [f"{n} {'↑' if better[n] else '↓'}" for n in names], fontsize=8, rotation=20,
              ha="right")
ax.set_yticks(range(len(methods)), methods, fontsize=8)
ax.set_title("score per method and metric (colour: rank, dark = best)", fontsize=9)
plt.show()

# %%
# What a full-size run shows
# --------------------------
# ``manifex evaluate`` (LeNet 10 epochs on ``known:digits8``, 64 images, seven methods, ten metrics) finds in the
# README that the ranking by deletion depends on how pixels are removed: best by black deletion is
# Input×Gradient, by ROAD IG, by the in-filled deletion LRP (Kendall τ black vs in-filled −0.33), and only the
# in-filled images stay as close to the manifold as real digits.
