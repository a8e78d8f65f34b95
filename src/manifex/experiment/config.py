"""Config fields that carry what the CLI and the settings guard need: one source of truth per option.

A system's ``Config`` is a frozen dataclass whose fields are declared with :func:`setting`::

    @dataclass(frozen=True)
    class ConceptsConfig:
        components: int = setting(6, "Concepts per class (NMF components).", low=1)
        pool: int | str = setting("auto", "Average-pool size ... or auto.", parse="int_or_auto")
        batch_size: int = setting(64, "Images per attribution batch.", low=1, result=False)

The CLI builds its options from these (:func:`manifex.cli.generate.config_options`: the flag is ``--<field name>``
with dashes unless ``flag`` says otherwise; the type, default, range and help come from the field), and the
settings guard of ``experiment.json`` compares every field with ``result=True`` (:func:`result_settings`).
Parsers (``parse``) are named, so the library stays free of click: ``csv`` (a comma list of strings), ``ints``,
``floats`` (finite numbers > 0), ``fraction`` (``8/255`` or ``0.03``; ``none``), ``int_or_auto``,
``lr`` (a float > 0 or ``default`` → None), ``pairs`` (class pairs ``4:9,3:5`` → ((4, 9), (3, 5))), ``pair`` (one
``A:B`` → (a, b)), ``betas`` (softplus β values > 0, e.g. ``30,10,5,3``), ``beta_pair`` (``B0,B1``, ``auto`` or ``none``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

__all__ = ["setting", "result_settings", "setting_meta", "config_flags", "PARSERS"]

#: The named parsers a field may ask for (implemented by the CLI, see manifex.cli.generate).
PARSERS = ("csv", "ints", "floats", "fraction", "int_or_auto", "lr", "pairs", "pair", "betas", "beta_pair")


def setting(default: Any, help: str, *, flag: str | None = None, parse: str | None = None,
            choices: Sequence[str] | None = None, low: float | None = None, high: float | None = None,
            result: bool = True, metavar: str | None = None, cli: bool = True, show_default: bool = True,
            old_flags: Sequence[str] = ()) -> Any:
    """A Config field with its CLI and guard metadata (see the module docstring).

    ``flag``: the option name when it is not ``--<field-name>``; ``parse``: one of ``PARSERS`` (csv, ints, floats, fraction, int_or_auto, lr, pairs, pair, betas, beta_pair);
    ``choices``: allowed values; ``low``/``high``: the numeric range (inclusive); ``result=False``: the field
    never changes a record (device, batch sizes) and is left out of the settings guard; ``cli=False``: no option
    (set in Python only); ``old_flags``: earlier names of the option, still accepted for one release with a
    deprecation warning (one meaning per flag across commands: a flag that meant something else elsewhere is renamed).
    """
    if parse is not None and parse not in PARSERS:
        raise ValueError(f"parse must be one of {PARSERS}, got {parse!r}")
    meta = {"help": help, "flag": flag, "parse": parse, "choices": tuple(choices) if choices else None, "low": low,
            "high": high, "result": result, "metavar": metavar, "cli": cli, "show_default": show_default,
            "old_flags": tuple(old_flags)}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"manifex": meta})
    return dataclasses.field(default=default, metadata={"manifex": meta})


def setting_meta(f: dataclasses.Field) -> dict[str, Any]:
    """The metadata of a field declared with :func:`setting` (a plain field counts as a result setting)."""
    return f.metadata.get("manifex", {"help": "", "flag": None, "parse": None, "choices": None, "low": None, "high": None,
                                      "result": True, "metavar": None, "cli": True, "show_default": True,
                                      "old_flags": ()})


def result_settings(config: Any) -> dict[str, Any]:
    """The fields of ``config`` that change a record (``result=True``), as a dict: what ``experiment.json`` guards."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if setting_meta(f)["result"]}


def config_flags(config_cls: type) -> dict[str, str]:
    """Field name → flag for the fields whose flag is not ``--<name-with-dashes>`` (how errors name them under the CLI)."""
    return {f.name: setting_meta(f)["flag"] for f in dataclasses.fields(config_cls) if setting_meta(f)["flag"]}
