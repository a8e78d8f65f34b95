"""Small trained models shared by several test files (trained once per test session)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from manifex.data import load_digits8
from manifex.models.classifiers import SmallResNet

_TINY: dict[str, nn.Module] = {}


def tiny_resnet() -> nn.Module:
    """A SmallResNet (8×8, widths 8 and 12, 4 classes) trained for two quick epochs on 600 digits 0–3."""
    if "model" not in _TINY:
        d = load_digits8()
        keep = (d.y < 4).nonzero().flatten()[:600]
        x, y = d.x[keep], d.y[keep]
        torch.manual_seed(0)
        model = SmallResNet((1, 8, 8), 4, (8, 12))
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        for epoch in range(2):
            perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
            for s in range(0, len(x), 50):
                i = perm[s : s + 50]
                opt.zero_grad()
                F.cross_entropy(model(x[i]), y[i]).backward()
                opt.step()
        _TINY["model"] = model.eval()
    return _TINY["model"]
