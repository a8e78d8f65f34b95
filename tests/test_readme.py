"""The documentation's examples run: every Python block of README.md and of every ``docs/**/*.rst`` page is
executed, every ``manifex <command> --flag`` and ``make <target>`` of a shell block exists.

Each Python block is preceded by a marker naming a fixture below: ``<!-- readme-test: NAME -->`` in README.md,
the reST comment ``.. docs-test: NAME`` before a ``.. code-block:: python`` in the docs. The fixture prepares the
names the block assumes but does not define (``model``, ``x``, ``y``, ...) with tiny stand-ins: untrained or
seconds-trained networks on 8×8 digits or a few MNIST-5k images; several blocks may share one fixture. A block's
imports are never supplied: a renamed or missing import fails here. Only the sizes that would make a block slow are
shrunk, by the textual replacements in ``SHRINK`` (each must match exactly one block of its fixture, so they cannot
go stale silently). A block without a marker, with an unknown marker, a fixture no block uses, a code block in a
language this test does not run, or a reST literal block (``::``, which would hide code from this test) fails the
suite: no block is skipped. Pages that Sphinx generates (``_build``, ``auto_examples``, autosummary's
``generated``) are not sources and are left out.
"""
from __future__ import annotations

import importlib
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
#: Folders under docs/ that Sphinx writes (git-ignored): their pages are build output, not sources.
GENERATED = {"_build", "auto_examples", "generated", "_autosummary"}
MD_MARKER = re.compile(r"<!--\s*readme-test:\s*([\w-]+)\s*-->")
RST_MARKER = re.compile(r"\.\.\s+docs-test:\s*([\w-]+)\s*")
RST_CODE = re.compile(r"^(\s*)\.\.\s+(code-block|code|sourcecode)::\s*(\S*)\s*$")
#: reST constructs that hold code this test would not run: write ``.. code-block:: python`` (with a marker) instead.
RST_UNRUN = re.compile(r"^\s*(\.\.\s+(doctest|testcode|testsetup|ipython|jupyter-execute|literalinclude)::|>>> )")
MAX_README_LINES = 200


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def parse_markdown(text: str, name: str = "README.md") -> list[dict]:
    """Every fenced block of markdown ``text``: file, language, code, first line (1-based), the marker before it."""
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
            raise AssertionError(f"{name}:{i + 1}: code block never closed")
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = MD_MARKER.fullmatch(lines[k].strip()) if k >= 0 else None
        blocks.append({"file": name, "lang": fence.group(1), "code": "\n".join(lines[i + 1 : j]) + "\n", "line": i + 1,
                       "marker": marker.group(1) if marker else None})
        i = j + 1
    return blocks


def parse_rst(text: str, name: str) -> list[dict]:
    """Every ``.. code-block:: LANG`` (or ``code``/``sourcecode``) of reST ``text``, as :func:`parse_markdown` gives
    them; a literal block (a paragraph ending in ``::``) or a doctest-style block is returned with language
    ``"literal"``/``"unrun"`` so that the inventory test can refuse it."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        m = RST_CODE.match(line)
        if m is None:
            if RST_UNRUN.match(line):
                blocks.append({"file": name, "lang": "unrun", "code": line + "\n", "line": i + 1, "marker": None})
            elif line.rstrip().endswith("::") and not line.lstrip().startswith(".. "):
                blocks.append({"file": name, "lang": "literal", "code": line + "\n", "line": i + 1, "marker": None})
            i += 1
            continue
        indent = len(m.group(1))
        j = i + 1
        while j < len(lines) and re.match(r"^\s+:[\w-]+:", lines[j]) and len(lines[j]) - len(lines[j].lstrip()) > indent:
            j += 1  # directive options (:linenos:, :caption: ...)
        body = []
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
            body.append(lines[j])
            j += 1
        while body and not body[-1].strip():
            body.pop()
        while body and not body[0].strip():
            body.pop(0)
        cut = min((len(b) - len(b.lstrip()) for b in body if b.strip()), default=0)
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = RST_MARKER.fullmatch(lines[k].strip()) if k >= 0 else None
        blocks.append({"file": name, "lang": m.group(3) or "default", "code": "\n".join(b[cut:] for b in body) + "\n",
                       "line": i + 1, "marker": marker.group(1) if marker else None})
        i = j
    return blocks


def doc_sources() -> list[Path]:
    """README.md and every reST page under docs/ that is a source (not written by the build)."""
    pages = sorted(p for p in DOCS.rglob("*.rst") if not GENERATED & set(p.relative_to(DOCS).parts)) if DOCS.is_dir() else []
    return [README, *pages]


def parse_all() -> list[dict]:
    blocks = []
    for path in doc_sources():
        text = path.read_text(encoding="utf-8")
        blocks += parse_markdown(text, _rel(path)) if path.suffix == ".md" else parse_rst(text, _rel(path))
    return blocks


BLOCKS = parse_all()
PYTHON = [b for b in BLOCKS if b["lang"] == "python"]
SHELL_LANGS = ("bash", "sh", "shell", "console", "")
#: Languages shown but not run: trees, file layouts, reports (no commands are checked in them).
TEXT_LANGS = ("text",)


def block_by_marker(name: str) -> str:
    found = [b["code"] for b in PYTHON if b["marker"] == name]
    assert len(found) == 1, f"expected one block marked {name!r}, found {len(found)}"
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


def fx_mnist4(tmp_path, monkeypatch):
    """Four MNIST-5k images, their labels and the untrained narrow LeNet (the LRP and manipulation blocks)."""
    x, y = _mnist(4)
    return {"model": _lenet32(), "x": x, "y": y}


def fx_evaluation(tmp_path, monkeypatch):
    """Four images decoded from known codes of an untrained VAE (exact tangent spaces) and the narrow LeNet."""
    from manifex.models import VAE

    torch.manual_seed(0)
    vae = VAE(image_shape=(1, 32, 32), latent_dim=10).eval()
    z = torch.randn(4, 10)
    with torch.no_grad():
        x = vae.decode(z)
    return {"model": _lenet32(), "vae": vae, "z": z, "x": x, "y": torch.arange(4)}


def fx_standalone(tmp_path, monkeypatch):
    """Nothing: the getting-started block (also the README's) defines everything it uses."""
    return {}


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
    "mnist4": [("iterations=500)", "iterations=3)")],
    "evaluation": [("steps=10)", "steps=2, infill_steps=2, distance_steps=2)")],
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


def _check_standalone(ns):
    import manifex

    assert ns["E"].shape == ns["x"].shape == (16, 1, 32, 32) and ns["T"].basis.shape == (16, 10, 1, 32, 32)
    scores = manifex.geometry.alignment(ns["E"], ns["T"])
    assert scores.shape == (16,) and bool(((scores >= 0) & (scores <= 1 + 1e-6)).all())


def _check_evaluation(ns):
    assert ns["ta"].score.shape == (4,) and bool((ns["ta"].ratio > 0).all())
    assert set(ns["curves"].auc) == {"black", "road", "manifold"} and ns["flips"].shape == (4, 64)


def _check_my_nets(ns):
    assert ns["SmallNet"]()(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


def _check_user_model(ns):
    assert ns["E"].shape == (8, 1, 32, 32) and ns["summary"] is not None


def _check_concepts(ns):
    assert ns["W"].shape == (3, 200, 6) and ns["H"].shape == (3, 6, 16)


def _check_contrast(ns):
    assert ns["w"].shape == (16,) and ns["cc"].basis is not None


CHECKS = {name[7:]: f for name, f in list(globals().items()) if name.startswith("_check_")}


def _where(b: dict) -> str:
    return f"{b['file']}:{b['line']}"


def test_every_python_block_has_a_fixture():
    """A new block needs a marker naming a fixture (or a new fixture); every fixture is used; nothing escapes."""
    assert any(b["file"].startswith("docs/") for b in BLOCKS), "no docs/**/*.rst page with code blocks was found"
    hidden = [f"{_where(b)} ({b['code'].strip()})" for b in BLOCKS if b["lang"] in ("literal", "unrun")]
    assert not hidden, f"reST blocks this test cannot run (use '.. code-block:: python' or 'bash'): {hidden}"
    other = [f"{_where(b)} ({b['lang']})" for b in BLOCKS if b["lang"] not in ("python", *SHELL_LANGS, *TEXT_LANGS)]
    assert not other, f"code blocks in a language this test does not run (use python, bash or text): {other}"
    missing = [_where(b) for b in PYTHON if b["marker"] is None]
    assert not missing, ("python blocks without a marker before them (<!-- readme-test: NAME --> in README.md, "
                         f".. docs-test: NAME in reST): {missing}")
    unknown = [f"{_where(b)} ({b['marker']})" for b in PYTHON if b["marker"] not in FIXTURES]
    assert not unknown, f"markers without a fixture in tests/test_readme.py: {unknown}"
    used = {b["marker"] for b in PYTHON}
    assert set(FIXTURES) == used, f"fixtures no block uses: {sorted(set(FIXTURES) - used)}"
    assert set(SHRINK) <= used and set(CHECKS) <= used
    for marker, pairs in SHRINK.items():
        codes = [b["code"] for b in PYTHON if b["marker"] == marker]
        for old, _ in pairs:
            hits = sum(c.count(old) for c in codes)
            assert hits == 1, f"the shrink {old!r} of {marker!r} matches {hits} places of its blocks, not one"


@pytest.mark.parametrize("block", PYTHON, ids=[f"{b['file']}:L{b['line']}-{b['marker']}" for b in PYTHON])
def test_python_block_runs(block, tmp_path, monkeypatch):
    assert block["marker"] in FIXTURES, f"{_where(block)}: no fixture (see test_every_python_block_has_a_fixture)"
    monkeypatch.chdir(tmp_path)  # blocks write runs/..., small.pt
    namespace = {"__name__": f"docs_block_{block['marker']}", **FIXTURES[block["marker"]](tmp_path, monkeypatch)}
    code = block["code"]
    for old, new in SHRINK.get(block["marker"], []):
        assert code.count(old) <= 1, f"{_where(block)}: the shrink {old!r} matches more than once"
        code = code.replace(old, new)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TrainModeWarning-free stand-ins; ConvergenceWarning of tiny fits
        exec(compile(code, _where(block), "exec"), namespace)
    if block["marker"] in CHECKS:
        CHECKS[block["marker"]](namespace)
    sys.modules.pop("my_nets", None)


# ------------------------------------------------------------------------------------------ shell blocks

def _cli_lines(blocks: list[dict] | None = None) -> list[tuple[str, str]]:
    """(file:line, command) of every ``manifex ...`` and ``make ...`` line of a shell block (bash, sh, shell,
    console, or a bare markdown block listing commands), without the trailing comment."""
    out = []
    for b in BLOCKS if blocks is None else blocks:
        if b["lang"] not in SHELL_LANGS:
            continue
        for k, line in enumerate(b["code"].splitlines()):
            cmd = line.split(" #")[0].strip().removeprefix("$ ")
            if cmd.startswith(("manifex ", "make ")):
                out.append((f"{b['file']}:{b['line'] + 1 + k}", cmd))
    return out


def test_shell_blocks_use_existing_commands_and_flags():
    from manifex.cli import main

    lines = _cli_lines()
    assert len(lines) >= 20, "the documentation's CLI examples were not found"
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    bad = []
    for n, cmd in lines:
        words = cmd.split()
        if words[0] == "make":
            bad += [f"{n}: make target {t!r} not in Makefile" for t in words[1:]
                    if not re.search(rf"^{re.escape(t)}\s*:", makefile, re.M)]
            continue
        name = words[1]
        command = main.commands.get(name)
        if command is None:
            bad.append(f"{n}: no command 'manifex {name}' (commands: {', '.join(sorted(main.commands))})")
            continue
        known = {"--help", "-h"}
        for p in command.params:
            known.update(o for o in (*p.opts, *p.secondary_opts) if o.startswith("-"))
        bad += [f"{n}: 'manifex {name}' has no option {flag}"
                for flag in re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", cmd) if flag not in known]
    assert not bad, "\n".join(bad)


def test_shell_check_catches_a_renamed_flag(monkeypatch):
    """The check above can fail: a line with a flag that does not exist is reported, in README.md or a page."""
    for name in ("README.md", "docs/guide/x.rst"):
        fake = {"file": name, "lang": "bash", "code": "manifex attack --no-such-flag 1\n" * 20, "line": 0, "marker": None}
        monkeypatch.setattr(sys.modules[__name__], "BLOCKS", BLOCKS + [fake])
        with pytest.raises(AssertionError, match=re.escape(name) + r":\d+: 'manifex attack' has no option --no-such-flag"):
            test_shell_blocks_use_existing_commands_and_flags()


# ------------------------------------------------------------------------------------------ the pages themselves

def test_rst_parser_finds_markers_options_and_hidden_code():
    """The reST parser reads what the pages use: a marker, directive options, nesting in a list item; it reports
    literal and doctest blocks, which would otherwise be code that never runs."""
    text = "\n".join([
        "Intro::", "", "   x = 1", "",
        ".. docs-test: api", "", ".. code-block:: python", "   :caption: c", "", "   a = 1", "", "   b = 2", "", "After.",
        "", "- item", "", "  .. code-block:: bash", "", "     manifex methods", "", ">>> 1 + 1", ""])
    blocks = parse_rst(text, "t.rst")
    assert [(b["lang"], b["line"], b["marker"]) for b in blocks] == [
        ("literal", 1, None), ("python", 7, "api"), ("bash", 18, None), ("unrun", 22, None)]
    assert blocks[1]["code"] == "a = 1\n\nb = 2\n" and blocks[2]["code"] == "manifex methods\n"


def test_readme_is_the_front_page():
    """README.md stays a front page (≤ 200 lines) that points into the site."""
    text = README.read_text(encoding="utf-8")
    n = len(text.splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move detail into docs/ (at most {MAX_README_LINES})"
    assert "make docs" in text and "docs/guide/" in text and "make test" in text and "make demo" in text
    links = re.findall(r"\]\(([^)#\s]+)\)", text)
    assert links, "README.md links to no page of the site"
    broken = [t for t in links if "://" not in t and not (ROOT / t).is_file()]
    assert not broken, f"README.md links to files that do not exist: {broken}"


ROLE = re.compile(r":(func|class|exc|data|meth|attr|mod|obj):`~?([^`<]*?)(?:\s*<~?([^>]+)>)?`")


def _public(target: str) -> str | None:
    """None when ``target`` (a dotted path) names a module, or a name listed in the ``__all__`` of the module it
    is written under (attributes: the class must be public); else why not."""
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        rest = parts[cut:]
        if not rest:
            return None
        if rest[0] not in getattr(module, "__all__", ()):
            return f"{rest[0]!r} is not in {module_name}.__all__"
        obj = module
        for name in rest:
            if not hasattr(obj, name):
                return f"{'.'.join(parts[:parts.index(name) + 1])} does not exist"
            obj = getattr(obj, name)
        return None
    return f"no module of {target!r} imports"


def _bad_references(paths: list[Path]) -> list[str]:
    bad = []
    for path in paths:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in ROLE.finditer(line):
                target = (m.group(3) or m.group(2)).strip()
                why = _public(target) if target.startswith("manifex") else f"{target!r} is not a full dotted manifex path"
                if why:
                    bad.append(f"{_rel(path) if path.is_relative_to(ROOT) else path}:{n}: :{m.group(1)}:`{target}`: {why}")
    return bad


def test_cross_references_name_public_objects():
    """Every :func:/:class:/... of a page names, by its full dotted path, a module or a name in a package's
    ``__all__`` — the names the API reference documents, so the link resolves."""
    pages = [p for p in doc_sources() if p.suffix == ".rst"]
    assert not (bad := _bad_references(pages)), "\n".join(bad)


def test_cross_reference_check_can_fail(tmp_path):
    page = tmp_path / "p.rst"
    page.write_text(":func:`manifex.explain` :func:`manifex.no_such_name` :class:`Generator`\n", encoding="utf-8")
    bad = _bad_references([page])
    assert len(bad) == 2 and "no_such_name" in bad[0] and "not a full dotted manifex path" in bad[1]


BENCH = re.compile(r"python3? (benchmarks/\w+\.py)([^`]*)")


def _bad_benchmark_commands(texts: dict[str, str]) -> list[str]:
    """Each ``python benchmarks/NAME.py --flag ...`` quoted for a figure names a script that exists and takes
    those flags (each flag must be declared in the script as ``"--flag"``)."""
    bad = []
    for name, text in texts.items():
        for m in BENCH.finditer(re.sub(r"\s+", " ", text)):
            script = ROOT / m.group(1)
            if not script.is_file():
                bad.append(f"{name}: {m.group(1)} does not exist")
                continue
            source = script.read_text(encoding="utf-8")
            bad += [f"{name}: {m.group(1)} has no option {flag}"
                    for flag in re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", m.group(2)) if f'"{flag}"' not in source]
    return bad


def test_benchmark_commands_exist():
    """The command printed beside each measured figure still runs: script and flags exist."""
    texts = {_rel(p): p.read_text(encoding="utf-8") for p in doc_sources()}
    assert sum(len(BENCH.findall(t)) for t in texts.values()) >= 10, "the benchmark commands were not found"
    assert not (bad := _bad_benchmark_commands(texts)), "\n".join(bad)


def test_benchmark_check_can_fail():
    bad = _bad_benchmark_commands({"p.rst": "``python benchmarks/bench_tangent.py --no-such`` ``python benchmarks/nope.py``"})
    assert bad == ["p.rst: benchmarks/bench_tangent.py has no option --no-such", "p.rst: benchmarks/nope.py does not exist"]
