"""Shared test settings."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread for the whole suite: the tensors are small, so one thread is as fast, results are
    bit-reproducible (resume tests compare weights bitwise), and the suite stays fast when other processes
    share the CPU (oversubscribed OpenMP threads slow small-op loops down by 10× or more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: the user's own network file of the command tests: a small conv net with a non-negative 2×2-pooled layer
USER_FILE = """
import torch
from torch import nn


class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x):
        return self.head(self.features(x))


def build():
    return UserNet()
"""


@pytest.fixture(scope="session")
def user_model(tmp_path_factory):
    """``(spec, weights)`` of the user's file and its weights, trained for a second on digits8 so that it predicts
    every class (the command battery and the audit run it as ``--model spec --weights weights``)."""
    import importlib.util

    from manifex.data import load_digits8

    root = tmp_path_factory.mktemp("user_model")
    (root / "user_nets.py").write_text(USER_FILE)
    spec = importlib.util.spec_from_file_location("user_nets_for_tests", root / "user_nets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    net, data = mod.build(), load_digits8()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(data.x), data.y).backward()
        opt.step()
    torch.save(net.state_dict(), root / "w.pt")
    return f"{root / 'user_nets.py'}:build", str(root / "w.pt")


@pytest.fixture(scope="session")
def docs_conf():
    """``docs/conf.py`` loaded as a module (it needs no Sphinx to import): the API reference's name lists and the one
    resolver of dotted names, for the docs tests."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("manifex_docs_conf", Path(__file__).resolve().parents[1] / "docs" / "conf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
