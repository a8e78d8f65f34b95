"""HTML reports: one Jinja2 environment and base template (``base.html.j2``) shared by every system's report."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..runs import atomic_write_json, atomic_write_text

__all__ = ["environment", "render", "write_json", "json_default"]


def environment():
    """The Jinja2 environment over ``manifex/reports/templates`` (autoescaping on)."""
    import jinja2

    try:
        loader: jinja2.BaseLoader = jinja2.PackageLoader("manifex", "reports/templates")
    except (ValueError, ImportError):  # unusual installs (zip, namespace package): fall back to the file system
        loader = jinja2.FileSystemLoader(str(Path(__file__).parent / "templates"))
    return jinja2.Environment(loader=loader, autoescape=True, trim_blocks=True, lstrip_blocks=True)


def render(template: str, path: Path, **context: Any) -> Path:
    """Render ``template`` with ``context`` into ``path``; returns the path."""
    return atomic_write_text(Path(path), environment().get_template(template).render(**context))


def json_default(o: Any) -> Any:
    """JSON for NumPy/torch values and paths (a ``json.dumps`` default; manifex itself writes through
    :func:`write_json`)."""
    if hasattr(o, "tolist"):  # numpy arrays/scalars, torch tensors
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def write_json(obj: Any, path: Path) -> Path:
    """``obj`` as indented JSON at ``path``, written atomically by the run layer's one encoder
    (:func:`manifex.runs.to_jsonable`: NumPy/torch values and paths converted, NaN and ±inf as null, so every
    ``metrics.json`` is valid JSON; the old encoder wrote ``NaN``, which strict JSON readers reject)."""
    return atomic_write_json(Path(path), obj)
