"""
Your own nn.Module through three systems (a model that returns a dict)
======================================================================

Every function of manifex takes any ``nn.Module`` that maps images (N, C, H, W) in [0, 1] to logits. Many models
return more than logits — a tuple of features and logits, or a Hugging Face style dict. ``output=`` says where the
logits are (an index, a key or attribute name, or a callable), for every explainer, :func:`manifex.manipulate`,
:func:`manifex.counterfactual`, :func:`manifex.class_concepts` and the rest; without it, the first call stops with
a one-line error that names the option. The model's weights, train/eval flags, ``requires_grad``, buffers and
hooks are left as found.

From the command line the same model is ``--model my_nets.py:DictNet --weights dict.pt --output logits``:
see :doc:`/guide/own_model`.
"""

# %%
# A model of your own, trained in a few seconds
# ---------------------------------------------
# Two convolutions and a linear head on scikit-learn's 8×8 digits; ``forward`` returns a dict.
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

import manifex
from manifex.data import load_digits8
from manifex.metrics import pearson
from manifex.models import ModelCache, get_generator, state_fingerprint
from manifex.viz import signed_heatmap


class DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                      nn.ReLU())
        self.head = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10))

    def forward(self, x):
        features = self.features(x)
        return {"features": features, "logits": self.head(features)}


torch.manual_seed(0)
train, test = load_digits8().split(0.2, seed=0)
net = DictNet()
optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
for step in range(300):
    batch = torch.randint(len(train), (64,))
    optimizer.zero_grad()
    F.cross_entropy(net(train.x[batch])["logits"], train.y[batch]).backward()
    optimizer.step()
net.eval()
with torch.no_grad():
    print(f"test accuracy {float((net(test.x)['logits'].argmax(1) == test.y).float().mean()):.1%}")
fingerprint = state_fingerprint(net)

# %%
# Without ``output=``
# -------------------
# The explainer cannot know which part of the dict to explain, and says so before any work.
x, y = test.x[:4], test.y[:4]
try:
    manifex.explain(net, x, y, method="gradient")
except manifex.InputError as error:
    print(f"InputError: {error}")

# %%
# 1. Attribution and manipulation (``manifex.manipulate``)
# --------------------------------------------------------
E = manifex.explain(net, x, y, method="integrated_gradients", output="logits")
others = (test.y != y[0]).nonzero().flatten()[:4]
target_map = manifex.explain(net, test.x[others], test.y[others], method="gradient", output="logits")
attack = manifex.manipulate(net, "gradient", x, target_map, beta_growth=(10.0, 100.0), iterations=100, lr=1e-3,
                            output="logits")
print(f"manipulate: PCC with the target map {float(pearson(attack.original_map, attack.target_map).mean()):.2f} -> "
      f"{float(pearson(attack.manipulated_map, attack.target_map).mean()):.2f}; classes kept "
      f"{float((attack.logits.argmax(1) == attack.logits_adv.argmax(1)).float().mean()):.0%}")

# %%
# 2. Counterfactuals through a flow (``manifex.counterfactual``)
# ---------------------------------------------------------------
# The zoo's image flow of :ref:`sphx_glr_auto_examples_plot_06_counterfactuals_latent_pixel.py` (cached); target
# class 9.
flow, _ = get_generator(train, "flow", cache=ModelCache(), epochs=2, progress=False)
cf = manifex.counterfactual(net, x, 9, generator=flow, max_steps=200, output="logits")
print(f"counterfactual: p(9) reached {[round(float(p), 3) for p in cf.p_target]} in {cf.steps.tolist()} steps")

# %%
# 3. Concepts (``manifex.class_concepts``)
# ----------------------------------------
# The layer is named as in your model: ``features.3`` is the second ReLU, 32 channels on the 8×8 grid.
basis = manifex.class_concepts(net, test, "features.3", classes=[0, 1], n_components=3, images_per_class=20,
                               relevance_options={"n_samples": 2}, output="logits")
print(f"class_concepts: {tuple(basis.vectors.shape)}, NMF relative errors "
      f"{[round(e, 3) for e in basis.relative_error.tolist()]}")
print(f"weights unchanged after all calls: {state_fingerprint(net) == fingerprint}; eval mode kept: {not net.training}")

# %%
# The results on one figure
# -------------------------
fig, axes = plt.subplots(2, 4, figsize=(9, 4.6), layout="constrained")
titles = ["image", "IG (output='logits')", "manipulated map", "target map"]
panels = [x[0, 0], signed_heatmap(E[0]), attack.manipulated_map[0], attack.target_map[0]]
for ax, title, panel in zip(axes[0], titles, panels):
    if "IG" in title:  # a signed map in [-1, 1], white at 0
        ax.imshow(panel, cmap="bwr", vmin=-1, vmax=1)
    else:
        ax.imshow(panel, cmap="gray" if title == "image" else "magma")
    ax.set_title(title, fontsize=9)
for k, ax in enumerate(axes[1]):
    ax.imshow(cf.x_cf[k, 0], cmap="gray", vmin=0, vmax=1)
    ax.set_title(f"counterfactual → 9, p = {float(cf.p_target[k]):.2f}", fontsize=8)
for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
plt.show()
