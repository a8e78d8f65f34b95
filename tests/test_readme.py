"""README.md's examples run: every ```python block is executed, every `manifex <command> --flag` of a shell
block exists.

Each Python block is preceded in README.md by ``<!-- readme-test: NAME -->``; NAME picks a fixture below that
prepares the names the block assumes but does not define (``model``, ``x``, ``y``, ...) with tiny stand-ins:
untrained or seconds-trained networks on 8×8 digits or a few MNIST-5k images. A block's imports are never
supplied: a renamed or missing import fails here. Only the sizes that would make a block slow are shrunk, by
the textual replacements in ``SHRINK`` (each must still match the README, so they cannot go stale silently).
A block without a marker, with an unknown marker, or a fixture no block uses fails the suite: no block is
skipped.
"""
from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = re.compile(r"<!--\s*readme-test:\s*([\w-]+)\s*-->")


def parse_blocks(text: str) -> list[dict]:
    """Every fenced block of ``text``: language, code, first line number (1-based) and the marker before it."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        if j == len(lines):
            raise AssertionError(f"README.md:{i + 1}: code block never closed")
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = MARKER.fullmatch(lines[k].strip()) if k >= 0 else None
        blocks.append({"lang": fence.group(1), "code": "\n".join(lines[i + 1 : j]) + "\n", "line": i + 1,
                       "marker": marker.group(1) if marker else None})
        i = j + 1
    return blocks


BLOCKS = parse_blocks(README.read_text(encoding="utf-8"))
PYTHON = [b for b in BLOCKS if b["lang"] == "python"]


def block_by_marker(name: str) -> str:
    found = [b["code"] for b in PYTHON if b["marker"] == name]
    assert len(found) == 1, f"expected one README block marked {name!r}, found {len(found)}"
    return found[0]


# ------------------------------------------------------------------------------------------ tiny stand-ins

_CACHE: dict = {}


def _digits(n: int = 256):
    """``n`` 8×8 digits (scikit-learn's) as an ImageDataset."""
    from manifex.data import ImageDataset, load_digits8

    d = load_digits8()
    return ImageDataset(d.x[:n].clone(), d.y[:n].clone(), name="digits8-subset")


def _lenet32() -> nn.Module:
    """An untrained narrow LeNet on 1×32×32 (``features.0`` is its first convolution, as the LRP block needs)."""
    from manifex.models.classifiers import LeNet

    torch.manual_seed(0)
    return LeNet((1, 32, 32), 10, width=4).eval()


def _mnist(n: int):
    from manifex.data import load_mnist5k

    if "mnist" not in _CACHE:  # the file is sorted by class: a seeded shuffle
        d = load_mnist5k()
        perm = torch.randperm(len(d), generator=torch.Generator().manual_seed(0))
        _CACHE["mnist"] = (d.x[perm], d.y[perm])
    x, y = _CACHE["mnist"]
    return x[:n], y[:n]


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 1e-2) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr)
    model.train()
    for s in range(steps):
        i = torch.arange(s * 64, s * 64 + 64) % len(x)
        opt.zero_grad()
        F.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def _digits16(n: int = 1797):
    """Digits upsampled to 16×16, so that blocks.2 of a SmallResNet has a 4×4 grid (the concepts block's pool=4)."""
    from manifex.data import ImageDataset

    d = _digits(n)
    return ImageDataset(F.interpolate(d.x, scale_factor=2, mode="nearest"), d.y, name="digits16")


def _resnet16() -> nn.Module:
    """A narrow SmallResNet on 16×16 digits, trained for seconds so that it predicts every class (the contrast
    block uses classes 4 and 9, the concepts block images not predicted as the class)."""
    if "resnet16" not in _CACHE:
        from manifex.models.classifiers import SmallResNet

        d = _digits16(1500)
        torch.manual_seed(0)
        _CACHE["resnet16"] = _train(SmallResNet((1, 16, 16), 10, (8, 12, 16)), d.x, d.y, steps=100)
    return _CACHE["resnet16"]


def _flow(cache_dir: Path):
    """The zoo's image flow trained for one epoch on 256 digits (the generators block's shrunk call)."""
    from manifex.models import ModelCache, get_generator

    gen, _ = get_generator(_digits(), "flow", cache=ModelCache(cache_dir), epochs=1, progress=False)
    return gen


class _DictOutput(nn.Module):
    """A Hugging Face style model: forward returns a dict with the logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return {"logits": self.model(x)}


def _process(units, context, out_dir):
    """A picklable unit process for the scaling block: one record per unit."""
    return [{"id": u.id, "mean": float(context["data"][u.payload["i"]].mean())} for u in units]


def fx_my_nets(tmp_path, monkeypatch):
    return {}


def fx_user_model(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(block_by_marker("my_nets"), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_nets", raising=False)
    from my_nets import SmallNet

    torch.manual_seed(0)
    torch.save(SmallNet().state_dict(), tmp_path / "small.pt")
    return {}


def fx_api(tmp_path, monkeypatch):
    return {"model": _lenet32(), "y": torch.arange(64) % 10}


def fx_lrp(tmp_path, monkeypatch):
    x, y = _mnist(4)
    return {"model": _lenet32(), "x": x, "y": y}


def fx_options(tmp_path, monkeypatch):
    x, y = _mnist(3)
    model = _lenet32()
    return {"model": model, "hf_model": _DictOutput(model).eval(), "x": x, "y": y}


def fx_counterfactual(tmp_path, monkeypatch):
    import manifex
    from manifex.models import MLP

    data = _digits()
    clf = _train(MLP((1, 8, 8), 10, hidden=(32,)), data.x, data.y, steps=60)
    torch.manual_seed(1)
    mlp = _train(MLP((1, 8, 8), 10, hidden=(16,)), data.x, data.y, steps=30)
    flow = _flow(tmp_path / "cache")
    x = data.x[data.y == 4][:3]
    train = data.x.flatten(1)
    return {"clf": clf, "x": x, "flow": flow, "flow_gen": flow, "x_train": data.x, "y_train": data.y, "mlp": mlp,
            "spectrum": manifex.generator_spectrum(flow, flow.encode(x), top=4),
            # stand-in for a distance to the known manifold: the distance to the nearest training image
            "distance_fn": lambda v: torch.cdist(v.flatten(1).float(), train).min(1).values}


def fx_generators(tmp_path, monkeypatch):
    from manifex.models import VAE

    monkeypatch.setenv("MANIFEX_CACHE", str(tmp_path / "cache"))  # ModelCache() of the block
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(32, 64), nn.Sigmoid(), nn.Unflatten(1, (1, 8, 8)))
    return {"x": _digits(4).x, "module": VAE(image_shape=(1, 8, 8), latent_dim=4).eval(), "G": G.eval(),
            "tiny_digits": _digits}


def fx_concepts(tmp_path, monkeypatch):
    from manifex.data import ImageDataset

    d = _digits16()
    g = torch.Generator().manual_seed(0)
    return {"model": _resnet16(), "data": ImageDataset(d.x[1500:1560], d.y[1500:1560]),
            "X": torch.rand(3, 200, 16, generator=g), "x": d.x[1500:1502], "y": d.y[1500:1502]}


def fx_contrast(tmp_path, monkeypatch):
    model = _resnet16()
    x = _digits16().x[1500:]
    with torch.no_grad():
        pred = model(x).argmax(1)
    assert int((pred == 4).sum()) >= 2 and int((pred == 9).sum()) >= 2, "the stand-in model must predict 4 and 9"
    return {"model": model, "x": x, "x_4": x[pred == 4][:8]}


class _LocalStandIn:
    """Stand-in for RayExecutor (Ray is tested in test_runs.py): the same call, run by the local executor."""

    def __new__(cls, *args, **kwargs):
        from manifex.runs import LocalExecutor
        from manifex.runs.ray_executor import RayExecutor

        RayExecutor(*args, **kwargs)  # the block's arguments are valid for the real class (starts nothing)
        return LocalExecutor()


def fx_experiment(tmp_path, monkeypatch):
    return {}


def fx_scaling(tmp_path, monkeypatch):
    import manifex.runs
    from manifex.data import ImageDataset
    from manifex.manipulation import pairs_from_dataset

    monkeypatch.setattr(manifex.runs, "RayExecutor", _LocalStandIn)
    x, y = _mnist(40)
    return {"model": _lenet32(), "pairs": pairs_from_dataset(ImageDataset(x, y), 2), "n": 3, "process": _process,
            "data": x}


FIXTURES = {name[3:]: f for name, f in list(globals().items()) if name.startswith("fx_")}

#: (old, new) replacements that shrink a block's work to seconds; each ``old`` must occur in the block.
SHRINK: dict[str, list[tuple[str, str]]] = {
    "user_model": [("pairs_from_dataset(test, 16)", "pairs_from_dataset(test, 2)"), ("iterations=500", "iterations=2")],
    "counterfactual": [("record_path=8)", "record_path=8, max_steps=20)"), ('space="pixel")', 'space="pixel", max_steps=20)')],
    "generators": [('get_generator(load_mnist5k(), "flow", cache=ModelCache())',
                    'get_generator(tiny_digits(), "flow", cache=ModelCache(), epochs=1, progress=False)')],
    "concepts": [('class_concepts(model, data, "blocks.2")',
                  'class_concepts(model, data, "blocks.2", images_per_class=8, relevance_options={"n_samples": 2})')],
    "contrast": [('class_activation_data(model, x, "blocks.2")',
                  'class_activation_data(model, x, "blocks.2", relevance_options={"n_samples": 2})')],
    "experiment": [("components=3)", "components=3, epochs=1, samples=1, images_per_class=6, controls=2)")],
    "scaling": [('"runs/big", executor=', '"runs/big", iterations=2, executor=')],
}


def _check_api(ns):
    import manifex

    assert ns["scores"].shape == (64,)
    assert round(float(manifex.random_baseline(10, 1024)), 4) == 0.0964  # the values the block's comments quote
    assert round(float(manifex.random_baseline(10, 1024, rms=True)), 4) == 0.0988


def _check_counterfactual(ns):
    assert set(ns["ev"]["per_example"]) == {"latent", "pixel"}


def _check_experiment(ns):
    result = ns["result"]
    assert result.report.is_file() and len(result.records["classes"]) == 2 and len(result.model_info.fingerprint) == 16


def _check_scaling(ns):
    assert len(ns["records"]) == 3 and ns["summary"] is not None


def _check_my_nets(ns):
    assert ns["SmallNet"]()(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


def _check_user_model(ns):
    assert ns["E"].shape == (8, 1, 32, 32) and ns["summary"] is not None


def _check_concepts(ns):
    assert ns["W"].shape == (3, 200, 6) and ns["H"].shape == (3, 6, 16)


def _check_contrast(ns):
    assert ns["w"].shape == (16,) and ns["cc"].basis is not None


CHECKS = {name[7:]: f for name, f in list(globals().items()) if name.startswith("_check_")}


def test_every_python_block_has_a_fixture():
    """A new block needs a marker naming a fixture (or a new fixture); every fixture is used."""
    other = [f"README.md:{b['line']} ({b['lang']})" for b in BLOCKS if b["lang"] not in ("python", "bash", "")]
    assert not other, f"code blocks in a language this test does not run (use python or bash): {other}"
    missing = [f"README.md:{b['line']}" for b in PYTHON if b["marker"] is None]
    assert not missing, f"python blocks without <!-- readme-test: NAME --> before them: {missing}"
    unknown = [f"README.md:{b['line']} ({b['marker']})" for b in PYTHON if b["marker"] not in FIXTURES]
    assert not unknown, f"markers without a fixture in tests/test_readme.py: {unknown}"
    used = {b["marker"] for b in PYTHON}
    assert set(FIXTURES) == used, f"fixtures no README block uses: {sorted(set(FIXTURES) - used)}"
    assert set(SHRINK) <= used and set(CHECKS) <= used


@pytest.mark.parametrize("block", PYTHON, ids=[f"L{b['line']}-{b['marker']}" for b in PYTHON])
def test_python_block_runs(block, tmp_path, monkeypatch):
    assert block["marker"] in FIXTURES, f"README.md:{block['line']}: no fixture (see test_every_python_block_has_a_fixture)"
    monkeypatch.chdir(tmp_path)  # blocks write runs/..., small.pt
    namespace = {"__name__": f"readme_block_{block['marker']}", **FIXTURES[block["marker"]](tmp_path, monkeypatch)}
    code = block["code"]
    for old, new in SHRINK.get(block["marker"], []):
        assert code.count(old) == 1, f"README.md:{block['line']}: the shrink {old!r} no longer matches the block"
        code = code.replace(old, new)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TrainModeWarning-free stand-ins; ConvergenceWarning of tiny fits
        exec(compile(code, f"README.md:{block['line']}", "exec"), namespace)
    if block["marker"] in CHECKS:
        CHECKS[block["marker"]](namespace)
    sys.modules.pop("my_nets", None)


# ------------------------------------------------------------------------------------------ shell blocks

def _cli_lines() -> list[tuple[int, str]]:
    """(line, command) of every ``manifex ...`` and ``make ...`` line of a shell block (```bash, or a bare
    ``` block listing commands), without the trailing comment."""
    out = []
    for b in BLOCKS:
        if b["lang"] not in ("bash", "sh", "shell", ""):
            continue
        for k, line in enumerate(b["code"].splitlines()):
            cmd = line.split(" #")[0].strip()
            if cmd.startswith(("manifex ", "make ")):
                out.append((b["line"] + 1 + k, cmd))
    return out


def test_shell_blocks_use_existing_commands_and_flags():
    from manifex.cli import main

    lines = _cli_lines()
    assert len(lines) >= 20, "the README's CLI examples were not found"
    makefile = (README.parent / "Makefile").read_text(encoding="utf-8")
    bad = []
    for n, cmd in lines:
        words = cmd.split()
        if words[0] == "make":
            bad += [f"README.md:{n}: make target {t!r} not in Makefile" for t in words[1:]
                    if not re.search(rf"^{re.escape(t)}\s*:", makefile, re.M)]
            continue
        name = words[1]
        command = main.commands.get(name)
        if command is None:
            bad.append(f"README.md:{n}: no command 'manifex {name}' (commands: {', '.join(sorted(main.commands))})")
            continue
        known = {"--help", "-h"}
        for p in command.params:
            known.update(o for o in (*p.opts, *p.secondary_opts) if o.startswith("-"))
        bad += [f"README.md:{n}: 'manifex {name}' has no option {flag}"
                for flag in re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", cmd) if flag not in known]
    assert not bad, "\n".join(bad)


def test_shell_check_catches_a_renamed_flag(monkeypatch):
    """The check above can fail: a README line with a flag that does not exist is reported."""
    monkeypatch.setattr(sys.modules[__name__], "BLOCKS",
                        BLOCKS + [{"lang": "bash", "code": "manifex attack --no-such-flag 1\n" * 20, "line": 0, "marker": None}])
    with pytest.raises(AssertionError, match="no option --no-such-flag"):
        test_shell_blocks_use_existing_commands_and_flags()
