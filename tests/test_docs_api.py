"""The documentation site's API reference and its checker.

- every name in every public ``__all__`` has a docstring (a class its own, a constant a ``#:`` comment);
- the reference generated from ``__all__`` (``docs/conf.py``) lists and documents every one of them, and every
  public package has its page in ``docs/api/``;
- ``docs/check_site.py`` finds a broken link, a broken anchor, a missing image, a page wider than the window and
  a network request (in headless Chromium; skipped without it).
"""
from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def conf(docs_conf):
    return docs_conf


def _own_docstring(obj) -> str:
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__") or ""
        # a dataclass without a docstring gets its signature as __doc__: that is not documentation
        return "" if doc.startswith(f"{obj.__name__}(") else doc
    return obj.__doc__ or ""


def missing_docstrings(conf) -> list[str]:
    """Public names whose documented object has no docstring of its own."""
    missing = []
    for public, home in conf.canonical_names().items():
        if public != home:
            continue  # documented at home, checked there
        package, name = home.rsplit(".", 1)
        obj = conf._public(importlib.import_module(package), name)
        if conf._kind(obj) == "data":
            if not conf._data_doc(obj, name)[1]:
                missing.append(home)
        elif not _own_docstring(obj).strip():
            missing.append(home)
    return missing


def test_every_public_name_has_a_docstring(conf):
    missing = missing_docstrings(conf)
    assert not missing, f"public names without a docstring (write one; a constant takes a '#:' comment): {missing}"


def test_a_new_undocumented_name_is_found(conf, monkeypatch):
    import manifex.geometry as geometry

    def probe(x):
        return x

    probe.__module__ = "manifex.geometry.probe"
    monkeypatch.setattr(geometry, "probe_without_docstring", probe, raising=False)
    monkeypatch.setattr(geometry, "__all__", [*geometry.__all__, "probe_without_docstring"])
    assert missing_docstrings(conf) == ["manifex.geometry.probe_without_docstring"]
    # and the generated reference lists it and documents it, with no rst file to edit
    rst = "\n".join(conf.api_rst("manifex.geometry", conf.canonical_names()))
    assert "   ~manifex.geometry.probe_without_docstring" in rst
    assert ".. autofunction:: manifex.geometry.probe_without_docstring" in rst


def _table_and_entries(rst: str, package: str) -> tuple[set[str], set[str]]:
    """The names in the summary table, and the full names of the object descriptions (written ``package.name``
    or, under ``.. currentmodule:: package``, ``name``)."""
    table = set(re.findall(r"^   ~(\S+)$", rst, re.M))
    entries = set(re.findall(r"^\.\. (?:auto|py:)(?:function|class|exception|data):: (\S+)$", rst, re.M))
    return table, {e if e.startswith("manifex.") else f"{package}.{e}" for e in entries}


def test_the_reference_lists_and_documents_every_public_name(conf):
    canonical = conf.canonical_names()
    documented_in_full = set()
    for package, names in conf.public_names().items():
        rst = "\n".join(conf.api_rst(package, canonical))
        table, entries = _table_and_entries(rst, package)
        # the table links each name to where it is documented in full
        assert table == {canonical[f"{package}.{n}"] for n in names}, package
        # every name of __all__ is an object description on its package's page (in full, or pointing there)
        assert entries == {f"{package}.{n}" for n in names}, package
        documented_in_full |= {e for e in entries if canonical[e] == e}
    assert {home for home in canonical.values()} <= documented_in_full


def test_every_public_package_has_its_page(conf):
    modules = conf.api_modules()
    assert {"manifex", "manifex.alignment", "manifex.attribution", "manifex.manipulation", "manifex.counterfactuals",
            "manifex.concepts", "manifex.evaluation", "manifex.audit", "manifex.experiment", "manifex.models",
            "manifex.geometry", "manifex.data", "manifex.runs", "manifex.reports"} <= set(modules)
    index = (DOCS / "api" / "index.rst").read_text()
    for module in modules:
        page = DOCS / "api" / f"{module}.rst"
        assert page.exists(), f"docs/api/{module}.rst is missing: a page with '.. manifex-api:: {module}'"
        assert f".. manifex-api:: {module}\n" in page.read_text()
        assert re.search(rf"^   {re.escape(module)}$", index, re.M), f"{module} is not in docs/api/index.rst's toctree"
    pages = {p.stem for p in (DOCS / "api").glob("manifex*.rst")}
    assert pages == set(modules), f"pages without a public package: {pages - set(modules)}"


def test_attribute_docs_reads_what_autodoc_reads(conf):
    source = '''
#: first line
#: second line
A = 1
B: int = 2  #: inline
C = 3
"""after"""
D = 4
# a plain comment
E = 5
'''
    docs = conf.attribute_docs(source)
    assert docs == {"A": ["first line", "second line"], "B": ["inline"], "C": ["after"]}


# -- check_site.py -------------------------------------------------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"


def _write_site(root: Path) -> None:
    import matplotlib.image

    root.mkdir()
    matplotlib.image.imsave(root / "pic.png", [[0.0, 1.0], [1.0, 0.0]])
    page = "<!doctype html><html><head><meta charset='utf-8'></head><body style='margin:0'>{}</body></html>"
    (root / "index.html").write_text(page.format(
        "<a href='good.html'>ok</a> <a href='good.html#here'>ok anchor</a> <a href='#top'>self</a>"
        "<a href='good.html#nowhere'>bad anchor</a> <a href='missing.html'>bad link</a>"
        "<a href='https://example.org/'>outside</a>"
        "<img src='pic.png'> <img src='absent.png'> <p id='top'>top</p>"))
    (root / "good.html").write_text(page.format("<h1 id='here'>here</h1><img src='pic.png'>"))
    (root / "wide.html").write_text(page.format("<div style='width:2000px'>wide</div>"))
    (root / "net.html").write_text(page.format("<script src='http://192.0.2.1/x.js'></script>"))
    (root / "_static").mkdir()
    (root / "_static" / "ignored.html").write_text(page.format("<a href='nothing.html'>not a page</a>"))


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)")
def test_check_site_finds_each_kind_of_problem(tmp_path):
    site = tmp_path / "html"
    _write_site(site)
    run = subprocess.run([sys.executable, str(DOCS / "check_site.py"), str(site)], capture_output=True, text=True,
                         timeout=120)
    lines = run.stdout.strip().splitlines()
    assert run.returncode == 1, run.stdout + run.stderr
    problems = sorted(lines[:-1])
    assert problems == sorted([
        "index.html: broken link to good.html#nowhere (no anchor #nowhere)",
        "index.html: broken link to missing.html (no such file)",
        "index.html: image absent.png does not load (file absent)",
        "net.html: requests the network: http://192.0.2.1/x.js",
        "wide.html: wider than the window (2000 px > 1280 px)",
    ]), run.stdout
    assert lines[-1].startswith("check_site: FAILED: 4 pages, 3 images, ")
    assert " 5 problems " in lines[-1]


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)")
def test_check_site_passes_a_sound_site(tmp_path):
    site = tmp_path / "html"
    _write_site(site)
    for bad in ("wide.html", "net.html"):
        (site / bad).unlink()
    (site / "index.html").write_text((site / "good.html").read_text().replace(
        "<img", "<a href='good.html#here'>x</a><img"))
    run = subprocess.run([sys.executable, str(DOCS / "check_site.py"), str(site)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("check_site: ok: 2 pages, 2 images, ")


def test_check_site_refuses_a_missing_site_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(DOCS / "check_site.py"), str(tmp_path / "nothing")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "build the site first" in run.stderr


# -- the CLI reference ---------------------------------------------------------------------------------------------
# sphinx-click (6.2) reads env.app, which Sphinx 9 deprecates: its warning, not ours
@pytest.mark.filterwarnings("ignore:'sphinx.environment.BuildEnvironment.app' is deprecated")
def test_the_cli_reference_lists_every_command_and_option(tmp_path):
    """docs/cli.rst, built by sphinx-click alone, shows every command of ``manifex --help`` and every option."""
    pytest.importorskip("sphinx_click")
    from sphinx.cmd.build import build_main

    from manifex.cli import main

    src = tmp_path / "src"
    src.mkdir()
    (src / "conf.py").write_text('extensions = ["sphinx_click"]\nsmartquotes = False\n')
    (src / "index.rst").write_text((DOCS / "cli.rst").read_text())
    out = tmp_path / "html"
    assert build_main(["-q", "-b", "html", str(src), str(out)]) == 0
    page = (out / "index.html").read_text()
    assert main.commands, "the manifex group has no commands"
    for name, command in main.commands.items():
        assert f'id="manifex-{name}"' in page, f"manifex {name} is missing from docs/cli.rst's reference"
        for param in command.params:
            for flag in getattr(param, "opts", []) + getattr(param, "secondary_opts", []):
                if flag.startswith("-"):
                    assert flag in page, f"manifex {name} {flag} is missing from the CLI reference"
