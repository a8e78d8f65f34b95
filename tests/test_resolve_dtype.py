"""resolve_classifier with a user model in another float dtype than the data: the model is checked on a batch in its
own dtype (check_classifier) and its accuracy is measured the same way — it crashed with a dtype RuntimeError in the
accuracy pass (manifex's loaders give float32 images)."""
from __future__ import annotations

import torch
from torch import nn

from manifex.data import load_digits8
from manifex.models.resolve import resolve_classifier


def test_a_float64_model_gets_its_accuracy_measured_in_float64():
    data = load_digits8()
    train, test = data.split(0.2, seed=0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double()
    model, info = resolve_classifier(train, test, model=net)
    assert test.x.dtype == torch.float32  # the data is left as it is
    with torch.no_grad():
        want = float((net(test.x.double()).argmax(1) == test.y).float().mean())
    assert info.accuracy == want and model is net
