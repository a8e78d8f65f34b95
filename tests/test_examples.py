"""The gallery's examples (``examples/plot_*.py``) stay in step with the code without running them.

The docs build executes every example (sphinx-gallery); that takes minutes, so the tests only check what can go
stale silently: each file compiles, has the sphinx-gallery layout (an rst-titled docstring, ``# %%`` cells, a
link to its guide page, a figure), and every ``manifex`` name it uses exists — the modules and names it imports,
the attribute chains it reads from them (``manifex.metrics.pearson``), and the keyword arguments it passes to
manifex functions and classes (an option renamed in the code fails here, not in the docs build).
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("plot_*.py"))
GUIDE_PAGES = {"alignment", "attribution", "manipulation", "counterfactuals", "concepts", "evaluation", "own_model",
               "experiment_folder", "scaling", "benchmarks", "reproduction", "architecture"}


def test_gallery_has_at_least_twelve_examples():
    assert len(EXAMPLES) >= 12, [p.name for p in EXAMPLES]


@pytest.fixture(scope="module")
def resolve(docs_conf):
    """The docs' own resolver of dotted names (``docs/conf.py``), raising where a name designates nothing."""
    def _resolve(dotted: str):
        obj = docs_conf._import_target(dotted)
        if obj is docs_conf._MISSING:
            raise LookupError(f"{dotted} designates no module or attribute")
        return obj
    return _resolve


class _ManifexNames(ast.NodeVisitor):
    """Every manifex name an example uses: ``{dotted name: line}`` and the keyword arguments of its calls."""

    def __init__(self) -> None:
        self.bound: dict[str, str] = {}  # local name -> dotted manifex name
        self.used: dict[str, int] = {}
        self.calls: list[tuple[str, list[str], int]] = []

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] == "manifex":
                self.used.setdefault(alias.name, node.lineno)
                self.bound[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else "manifex"

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module and node.module.split(".")[0] == "manifex":
            for alias in node.names:
                dotted = f"{node.module}.{alias.name}"
                self.used.setdefault(dotted, node.lineno)
                self.bound[alias.asname or alias.name] = dotted

    def _dotted(self, node: ast.AST) -> str | None:
        chain = []
        while isinstance(node, ast.Attribute):
            chain.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id in self.bound:
            return ".".join([self.bound[node.id], *reversed(chain)])
        return None

    def visit_Attribute(self, node: ast.Attribute) -> None:
        dotted = self._dotted(node)
        if dotted is not None:
            self.used.setdefault(dotted, node.lineno)
            return  # the inner attributes are prefixes of this one
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        dotted = self._dotted(node.func)
        if dotted is not None:
            self.calls.append((dotted, [k.arg for k in node.keywords if k.arg is not None], node.lineno))
        self.generic_visit(node)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_layout(path: Path):
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    compile(tree, str(path), "exec")
    doc = ast.get_docstring(tree, clean=False)
    assert doc, f"{path.name}: needs a module docstring with an rst title (sphinx-gallery)"
    lines = doc.strip("\n").splitlines()
    assert len(lines) >= 3 and lines[1] and set(lines[1]) == {"="} and len(lines[1]) >= len(lines[0]), (
        f"{path.name}: the docstring must open with a title underlined by '=' at least as long as it")
    assert "# %%" in source, f"{path.name}: no '# %%' cell"
    pages = set(re.findall(r":doc:`/guide/(\w+)`", source))
    assert pages, f"{path.name}: link the example to its guide page with :doc:`/guide/<page>`"
    assert pages <= GUIDE_PAGES, f"{path.name}: unknown guide page(s) {sorted(pages - GUIDE_PAGES)}"
    assert "plt.show()" in source, f"{path.name}: every example ends a cell with a matplotlib figure (plt.show())"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_references_are_documented(path: Path):
    """A :func:/:class: reference must name a public name (in the ``__all__`` of a package or of a top-level module):
    only those are in the API reference, and the docs build (``-W``) fails on any other. Other names are literals."""
    undocumented = []
    for role, dotted in re.findall(r":(func|class|meth|attr|mod|data|exc):`~?([\w.]+)`", path.read_text(encoding="utf-8")):
        package, _, name = dotted.rpartition(".")
        if role == "mod":
            ok = importlib.util.find_spec(dotted) is not None
        else:
            try:
                module = importlib.import_module(package)
            except ModuleNotFoundError:
                module = None
            # the reference documents the packages and the top-level modules (manifex.metrics), each by __all__
            ok = module is not None and (hasattr(module, "__path__") or package.count(".") == 1) and (
                name in getattr(module, "__all__", ()))
        if not ok:
            undocumented.append(f":{role}:`{dotted}`")
    assert not undocumented, f"{path.name}: not documented public names (write them as ``literals``): {undocumented}"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_manifex_names_exist(path: Path, resolve):
    visitor = _ManifexNames()
    visitor.visit(ast.parse(path.read_text(encoding="utf-8")))
    assert visitor.used, f"{path.name}: uses no manifex name"
    missing = []
    for dotted, line in sorted(visitor.used.items(), key=lambda kv: kv[1]):
        try:
            resolve(dotted)
        except LookupError as e:
            missing.append(f"line {line}: {dotted} ({e})")
    assert not missing, f"{path.name}: " + "; ".join(missing)
    wrong = []
    for dotted, keywords, line in visitor.calls:
        obj = resolve(dotted)
        if not callable(obj) or not keywords:
            continue
        try:
            params = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            continue
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        unknown = [k for k in keywords if k not in params]
        if unknown:
            wrong.append(f"line {line}: {dotted}() takes no {', '.join(unknown)}")
    assert not wrong, f"{path.name}: " + "; ".join(wrong)


def test_name_check_can_fail(tmp_path: Path, resolve):
    """The name check is not vacuous: a missing function, module or keyword is found."""
    bad = ("import manifex\nfrom manifex.models import get_classifier\n"
           "manifex.no_such_function(1)\nget_classifier(None, no_such_option=1)\nimport manifex.no_such_module\n")
    visitor = _ManifexNames()
    visitor.visit(ast.parse(bad))
    failures = []
    for dotted in visitor.used:
        try:
            resolve(dotted)
        except LookupError:
            failures.append(dotted)
    assert sorted(failures) == ["manifex.no_such_function", "manifex.no_such_module"]
    (dotted, keywords, _), = [c for c in visitor.calls if c[0].endswith("get_classifier")]
    assert "no_such_option" not in inspect.signature(resolve(dotted)).parameters and keywords == ["no_such_option"]
