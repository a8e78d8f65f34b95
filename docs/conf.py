"""Sphinx configuration of the manifex documentation site.

Build with ``make docs`` (= ``sphinx-build -W --keep-going -b html docs docs/_build/html``). The site is
offline: the theme's assets and MathJax are bundled, nothing is fetched at build or view time, and intersphinx
is off. ``docs/check_site.py`` opens the built pages in headless Chromium and checks images, links, width and
network requests.

The API reference is generated from each package's ``__all__`` by the ``manifex-api`` directive defined below,
so a new public name appears in the reference without editing an rst file (``tests/test_docs_api.py`` checks
that every name has a docstring and that every public package has its page).
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import os
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))  # document this checkout, also without an installed package
os.environ.setdefault("MPLBACKEND", "Agg")

import manifex  # noqa: E402

project = "manifex"
author = "the manifex authors"
copyright = "the manifex authors"
release = manifex.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # bundles MathJax into _static/mathjax (the package's name has hyphens)
    "sphinx_click",
    "sphinx_gallery.gen_gallery",
]

root_doc = "index"
smartquotes = False  # "--out" stays two hyphens (not an en dash) in the CLI reference and the docstrings
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []
html_static_path = ["_static"]
html_css_files = ["manifex.css"]

# -- warnings as errors: every manifex reference must resolve ------------------------------------------------
nitpicky = True
# Third-party and typing names in signatures cannot be resolved without intersphinx (off: no network at build),
# so references into those packages are ignored; any other unresolved reference (a manifex name, qualified or not,
# that the ``missing-reference`` handler below cannot map to a documented public name) stays an error.
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|numpy|np|matplotlib|scipy|sklearn|quantus|ray|click|jinja2|PIL|normflows|FrEIA|filelock|tqdm"
               r"|os|pathlib|types|re|typing|collections|dataclasses|concurrent|json|io)(\..*)?"),
    (r"py:.*", r"(dict|list|tuple|set|type|Callable|Sequence|Mapping|Iterable|Iterator)\[.*"),  # pieces of generics
]

# -- autodoc / autosummary / napoleon -------------------------------------------------------------------------
autosummary_generate = False  # the tables link to entries that the manifex-api directive writes on the page
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
autodoc_inherit_docstrings = False  # a subclass without a docstring must not repeat nn.Module's
napoleon_google_docstring = True
napoleon_numpy_docstring = False  # manifex's docstrings are prose (Google-style sections would be read); an
# underlined heading such as "Conventions\n-----" stays a heading, not a NumPy section
napoleon_use_rtype = False
python_use_unqualified_type_names = True
add_module_names = True

# -- the gallery --------------------------------------------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": str(HERE.parent / "examples"),
    "gallery_dirs": str(HERE / "auto_examples"),
    "filename_pattern": r"/plot_",
    "within_subsection_order": "FileNameSortKey",
    "write_computation_times": False,  # the computation-times page would load DataTables from a CDN
    "download_all_examples": True,
    "image_scrapers": ("matplotlib",),
    "matplotlib_animations": False,
    "remove_config_comments": True,
    "show_signature": False,
    # names of manifex in the examples' code link to the API reference (the local search index, no network)
    "doc_module": ("manifex",),
    "reference_url": {"manifex": None},
    "abort_on_example_error": False,
    "only_warn_on_example_error": False,
}

# -- HTML ---------------------------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"manifex {release}"
html_show_sourcelink = False
html_copy_source = False
html_last_updated_fmt = None
html_theme_options = {
    "icon_links": [],  # no external icons
    "navbar_align": "left",
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "show_version_warning_banner": False,  # it would fetch a version switcher's JSON
    "footer_start": ["copyright"],
    "footer_center": [],
    "footer_end": [],
    "secondary_sidebar_items": ["page-toc"],
    "header_links_before_dropdown": 7,
}
html_sidebars = {"index": [], "changelog": [], "cli": []}
html_context = {"default_mode": "light"}


# -- the API reference: one page per package, generated from its __all__ ------------------------------------
def api_modules() -> list[str]:
    """Dotted names of the public packages and top-level modules of manifex that define ``__all__``: each has its
    page in docs/api/ (the CLI is documented by docs/cli.rst, not here)."""
    root = Path(manifex.__file__).parent
    names = []
    for init in sorted(root.rglob("__init__.py")):
        rel = init.parent.relative_to(root.parent)
        name = ".".join(rel.parts)
        if name.startswith("manifex.cli") or any(p.startswith("_") for p in rel.parts[1:]):
            continue
        if hasattr(importlib.import_module(name), "__all__"):
            names.append(name)
    for path in sorted(root.glob("*.py")):
        if path.stem.startswith("_"):
            continue
        name = f"manifex.{path.stem}"
        if hasattr(importlib.import_module(name), "__all__"):
            names.append(name)
    return names


def _public(module: types.ModuleType, name: str):
    obj = getattr(module, name)
    # ``manifex.alignment`` is both the alignment system's package and the score re-exported from geometry;
    # the package is callable for that reason, and the public name is the function.
    if isinstance(obj, types.ModuleType) and module.__name__ == "manifex" and name == "alignment":
        from manifex.geometry import alignment as score

        return score
    return obj


def _kind(obj) -> str:
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    if inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.ismethod(obj):
        return "function"
    return "data"


def attribute_docs(source: str) -> dict[str, list[str]]:
    """``{name: lines}`` of the documented module-level assignments of a module's source, as autodoc reads them:
    ``#:`` comment lines right above the assignment, a ``#:`` comment on its line, or a string right after it."""
    tree = ast.parse(source)
    lines = source.splitlines()
    docs: dict[str, list[str]] = {}
    for i, node in enumerate(tree.body):
        if isinstance(node, ast.Assign):
            targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            targets = [node.target.id]
        else:
            continue
        doc: list[str] = []
        above = node.lineno - 2
        while above >= 0 and lines[above].lstrip().startswith("#:"):
            doc.insert(0, lines[above].lstrip()[2:].strip())
            above -= 1
        inline = lines[node.lineno - 1].split("#:", 1)
        if not doc and len(inline) == 2:
            doc = [inline[1].strip()]
        after = tree.body[i + 1] if i + 1 < len(tree.body) else None
        if not doc and isinstance(after, ast.Expr) and isinstance(getattr(after, "value", None), ast.Constant) \
                and isinstance(after.value.value, str):
            doc = inspect.cleandoc(after.value.value).splitlines()
        if doc:
            for name in targets:
                docs[name] = doc
    return docs


def _data_doc(obj, name: str) -> tuple[str | None, list[str]]:
    """(defining module, docstring lines) of a module-level constant, searched in manifex's modules."""
    for modname, module in sorted(sys.modules.items()):
        if not modname.startswith("manifex") or module is None or getattr(module, name, _MISSING) is not obj:
            continue
        path = getattr(module, "__file__", None)
        if not path or not path.endswith(".py"):
            continue
        doc = attribute_docs(Path(path).read_text(encoding="utf-8")).get(name)
        if doc:
            return modname, doc
    return None, []


_MISSING = object()


def _import_target(dotted: str):
    """The object a dotted name designates (a module, or attributes and submodules below one), or ``_MISSING``.
    The one resolver of dotted names: ``tests/test_examples.py`` checks the gallery's names with it too."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for j, attr in enumerate(parts[i:], start=i):
            if not hasattr(obj, attr):  # a submodule its package's __init__ does not import
                try:
                    obj = importlib.import_module(".".join(parts[: j + 1]))
                    continue
                except ImportError:
                    return _MISSING
            obj = getattr(obj, attr)
        return obj
    return _MISSING


def public_names() -> dict[str, list[str]]:
    """``{package: [names of its __all__]}`` for every documented package."""
    return {m: list(importlib.import_module(m).__all__) for m in api_modules()}


def canonical_names() -> dict[str, str]:
    """``{public dotted name: dotted name where it is documented in full}``.

    An object exported by several packages is documented once, in the exporting package that contains the module
    defining it (the deepest one); elsewhere it is listed and gets a short entry that points there.
    """
    exporters: dict[tuple, list[str]] = {}
    objects: dict[tuple, object] = {}
    names = public_names()
    for pkg, all_ in names.items():
        module = importlib.import_module(pkg)
        for name in all_:
            obj = _public(module, name)
            # a constant is the same public object only under the same name (equal small values may be one object)
            key = (id(obj), None if _kind(obj) != "data" else name)
            exporters.setdefault(key, []).append(f"{pkg}.{name}")
            objects[key] = obj
    result = {}
    for key, full_names in exporters.items():
        obj = objects[key]
        if _kind(obj) == "data":
            home = _data_doc(obj, full_names[0].rsplit(".", 1)[1])[0] or ""
        else:
            home = getattr(obj, "__module__", "") or ""
        inside = [n for n in full_names if home == n.rsplit(".", 1)[0] or home.startswith(n.rsplit(".", 1)[0] + ".")]
        best = max(inside, key=lambda n: n.count(".")) if inside else full_names[0]
        for n in full_names:
            result[n] = best
    return result


def api_rst(package: str, canonical: dict[str, str]) -> list[str]:
    """The reStructuredText of one package's reference: a summary table of its ``__all__``, then each name."""
    module = importlib.import_module(package)
    names = list(module.__all__)
    # the table names every entry by its full dotted name, so it is read outside the package (autosummary refuses
    # a name of the current module written in full)
    lines = [".. currentmodule:: None", "", ".. autosummary::", "   :nosignatures:", ""]
    for name in names:
        lines.append(f"   ~{canonical[f'{package}.{name}']}")
    lines += ["", f".. currentmodule:: {package}", ""]
    own = [n for n in names if canonical[f"{package}.{n}"] == f"{package}.{n}"]
    others = [n for n in names if n not in own]
    for name in own:
        obj = _public(module, name)
        kind = _kind(obj)
        full = f"{package}.{name}"
        if kind == "class":
            lines += [f".. autoclass:: {full}", "   :members:", ""]
        elif kind == "exception":
            lines += [f".. autoexception:: {full}", ""]
        elif kind == "function":
            lines += [f".. autofunction:: {full}", ""]
        else:
            _, doc = _data_doc(obj, name)
            lines += [f".. py:data:: {name}", ""]
            lines += [f"   {line}" if line else "" for line in doc]
            lines.append("")
    if others:
        lines += [".. rubric:: Also exported here", ""]
        role = {"class": "class", "exception": "exc", "function": "func", "data": "data"}
        for name in others:
            obj = _public(module, name)
            kind = _kind(obj)
            target = canonical[f"{package}.{name}"]
            directive = {"class": "class", "exception": "exception", "function": "function", "data": "data"}[kind]
            if importlib.util.find_spec(f"{package}.{name}") is not None:
                # ``manifex.alignment``: the score, and a package of the same name (callable for that reason);
                # the package keeps the name as a cross-reference target
                lines += [f".. py:{directive}:: {name}", "   :no-index:", "",
                          f"   Documented as :{role[kind]}:`{target}`. The package :mod:`{package}.{name}` of the "
                          "same name is callable with the same arguments.", ""]
                continue
            lines += [f".. py:{directive}:: {name}", "   :no-index-entry:", "",
                      f"   Documented as :{role[kind]}:`{target}`.", ""]
    return lines


def _setup_api(app) -> None:
    from docutils.parsers.rst import directives
    from docutils.statemachine import StringList
    from sphinx.util.docutils import SphinxDirective
    from sphinx.util.nodes import nested_parse_with_titles

    state = {}

    def canonical():
        if "names" not in state:
            state["names"] = canonical_names()
        return state["names"]

    class ManifexAPI(SphinxDirective):
        """``.. manifex-api:: manifex.geometry``: the reference of one package, generated from its ``__all__``."""

        required_arguments = 1
        has_content = False
        option_spec = {"noindex": directives.flag}

        def run(self):
            from docutils import nodes

            package = self.arguments[0]
            if package not in public_names():
                raise self.error(f"{package} is not a documented manifex package (one with an __all__)")
            node = nodes.container()
            node.document = self.state.document
            source = StringList(api_rst(package, canonical()), source=f"<{package}.__all__>")
            nested_parse_with_titles(self.state, source, node)
            return node.children

    app.add_directive("manifex-api", ManifexAPI)

    def homes():
        """``{id(object): the public name where it is documented in full}`` for classes and functions."""
        if "homes" not in state:
            state["homes"] = {}
            for public, home in canonical().items():
                package, name = home.rsplit(".", 1)
                obj = _public(importlib.import_module(package), name)
                if public == home and _kind(obj) != "data":
                    state["homes"][id(obj)] = home
        return state["homes"]

    def public_reference(app, env, node, contnode):
        """Resolve a reference to a public object by another of its names: its defining module's
        (``manifex.geometry.tangent.TangentSpace``, as type hints name it), a name relative to the docstring's module
        or one of its parents (``core.target_gradient``), or its bare name when one public object has it
        (``class_concepts`` in a docstring of :mod:`manifex.concepts.contrast`). What stays unresolved is a warning,
        an error under ``-W``."""
        if node.get("refdomain") != "py":
            return None
        target = node.get("reftarget", "").lstrip(".~")
        home = None
        if target.startswith("manifex."):
            home = _home_of(_import_target(target), target)
        else:
            module = node.get("py:module") or ""
            parts = module.split(".") if module.startswith("manifex") else []
            for i in range(len(parts), 0, -1):
                home = _home_of(_import_target(".".join(parts[:i]) + "." + target), target)
                if home:
                    break
            if home is None:  # a bare public name, or ``Class.member`` of a public class
                head, _, rest = target.partition(".")
                named = {h for p, h in canonical().items() if p.endswith("." + head)}
                if len(named) == 1:
                    home = named.pop() + (f".{rest}" if rest else "")
        if home is None:
            return None
        return env.get_domain("py").resolve_xref(env, node["refdoc"], app.builder, "obj", home, node, contnode)

    def _home_of(obj, target: str) -> str | None:
        """The documented name of a public object, or of a method of a public class (``Class.method``)."""
        if obj is _MISSING:
            return None
        if not isinstance(obj, types.ModuleType) and id(obj) in homes():
            return homes()[id(obj)]
        owner, _, attr = target.rpartition(".")
        parent = _import_target(owner) if owner else _MISSING
        if inspect.isclass(parent) and id(parent) in homes():
            return f"{homes()[id(parent)]}.{attr}"
        return None

    app.connect("missing-reference", public_reference)

    def data_docstring(app, what, name, obj, options, lines):
        """A constant's docstring is the ``#:`` comment at its definition (autosummary would show its type's)."""
        if what in ("data", "attribute") and name.startswith("manifex.") and name in canonical():
            lines[:] = _data_doc(obj, name.rsplit(".", 1)[1])[1]

    app.connect("autodoc-process-docstring", data_docstring)

    prose: dict[str, list[str]] = {}

    def keep_attribute_prose(app, what, name, obj, options, lines):
        """An attribute's or a property's docstring is prose: napoleon would read ``(N, k) float: the scores`` as a type ``(N, k)
        float`` and a description. Its lines are kept before napoleon runs (priority 100 < 500) and put back after
        it (priority 900)."""
        if what in ("attribute", "property"):
            prose[name] = list(lines)

    def restore_attribute_prose(app, what, name, obj, options, lines):
        if what in ("attribute", "property") and name in prose:
            lines[:] = prose.pop(name)

    app.connect("autodoc-process-docstring", keep_attribute_prose, priority=100)
    app.connect("autodoc-process-docstring", restore_attribute_prose, priority=900)

    def config_settings(app, what, name, obj, options, lines):
        """A system's Config lists its settings (declared with :func:`manifex.experiment.setting`): the default, the
        command-line flag and the help that ``--help`` prints, from the same declaration."""
        if what != "class" or not dataclasses.is_dataclass(obj):
            return
        fields = [f for f in dataclasses.fields(obj) if "manifex" in f.metadata]
        if not fields:
            return
        lines += ["", ".. rubric:: Settings", ""]
        for f in fields:
            meta = f.metadata["manifex"]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            where = "Python only" if not meta["cli"] else f"``{meta['flag'] or '--' + f.name.replace('_', '-')}``"
            note = "" if meta["result"] else "; does not change the results"
            help_text = " ".join(meta["help"].split())
            lines.append(f"- ``{f.name}`` = ``{default!r}`` ({where}{note}): {help_text}")
        lines.append("")

    app.connect("autodoc-process-docstring", config_settings)


def setup(app):
    _setup_api(app)
