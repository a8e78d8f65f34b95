"""Commands generated from configs: each system's options come from its ``Config`` fields (name, type, default,
range, help: :func:`manifex.experiment.config.setting`), the shared groups (data, model, environment, run,
executor) are declared once in :mod:`manifex.cli.common`, and one skeleton runs every command.

>>> @main.command()
... @config_options(ConceptsConfig)            # --dataset, --layer, --components, ... from the fields
... @classifier_options @run_options("runs/concepts") @environment_options @executor_options
... def concepts(**params):
...     run_command(ConceptsExperiment(), config_from_params(ConceptsConfig, params), **run_params(params))
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable

import click

from ..experiment.config import config_flags, setting_meta
from .common import _beta_pair, _betas, _csv, _fraction, _positive_floats

__all__ = ["config_options", "config_from_params", "config_flags", "run_params", "PARSE"]


def _ints(ctx, param, value):
    if value is None:
        return None
    try:
        return tuple(int(v) for v in str(value).split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 3,5,8, got {value!r}") from None


def _int_or_auto(ctx, param, value):
    if value is None or str(value).lower() == "auto":
        return "auto"
    try:
        v = int(value)
    except ValueError:
        raise click.BadParameter(f"expected a positive int or auto, got {value!r}") from None
    if v < 1:
        raise click.BadParameter(f"expected a positive int or auto, got {value!r}")
    return v


def _lr(ctx, param, value):
    if value is None or str(value).lower() in ("none", "default"):
        return None
    try:
        v = float(value)
    except ValueError:
        raise click.BadParameter(f"expected a learning rate such as 5e-2, or 'default'; got {value!r}") from None
    if not v > 0:
        raise click.BadParameter("the learning rate must be > 0")
    return v


def _class_pairs(value: str) -> tuple[tuple[int, int], ...]:
    pairs = []
    for part in str(value).split(","):
        bits = part.strip().split(":")
        if len(bits) != 2 or not all(b.strip().lstrip("-").isdigit() for b in bits):
            raise click.BadParameter(f"takes A:B class pairs separated by commas (e.g. 4:9,3:5), got {part.strip()!r}")
        pairs.append((int(bits[0]), int(bits[1])))
    return tuple(pairs)


def _pairs(ctx, param, value):
    return None if value is None else _class_pairs(value)


def _pair(ctx, param, value):
    if value is None:
        return None
    pairs = _class_pairs(value)
    if len(pairs) != 1:
        raise click.BadParameter(f"takes one A:B class pair (e.g. 4:9), got {value!r}")
    return pairs[0]


#: The CLI side of the named parsers of manifex.experiment.config.PARSERS.
PARSE: dict[str, Callable] = {"csv": _csv, "ints": _ints, "floats": _positive_floats, "fraction": _fraction,
                              "int_or_auto": _int_or_auto, "lr": _lr, "pairs": _pairs, "pair": _pair, "betas": _betas,
                              "beta_pair": _beta_pair}


_METAVAR = {"csv": "A,B,...", "ints": "I,J,...", "floats": "X,Y,...", "fraction": "X|A/B", "int_or_auto": "INT|auto",
            "lr": "LR|default", "pairs": "A:B,...", "pair": "A:B", "betas": "B,B,...", "beta_pair": "B0,B1|auto|none"}


def _base_type(tp: Any) -> Any:
    """int for ``int | None``, etc."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1 else tp


def _flag(f: dataclasses.Field, meta: dict) -> str:
    return meta["flag"] or "--" + f.name.replace("_", "-")


def _option(f: dataclasses.Field, hints: dict) -> Callable:
    """The field's option, and a hidden option per earlier flag name (read by :func:`config_from_params`)."""
    meta = setting_meta(f)
    main = _main_option(f, hints)
    olds = [_main_option(f, hints, flag=old, name=f"{f.name}__old{i}", hidden=True)
            for i, old in enumerate(meta.get("old_flags", ()))]

    def decorate(fn: Callable) -> Callable:
        for o in olds:
            fn = o(fn)
        return main(fn)

    return decorate


def _main_option(f: dataclasses.Field, hints: dict, *, flag: str | None = None, name: str | None = None,
                 hidden: bool = False) -> Callable:
    meta = setting_meta(f)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    flag = flag or _flag(f, meta)
    if hidden:  # an earlier name: no default of its own (None = not given), not listed in --help
        default = None
    kw: dict[str, Any] = {"help": meta["help"], "show_default": meta["show_default"] and default is not None,
                          "hidden": hidden}
    if meta["metavar"]:
        kw["metavar"] = meta["metavar"]
    tp = _base_type(hints.get(f.name, type(default)))
    if meta["parse"]:
        kw["callback"] = PARSE[meta["parse"]]
        kw.setdefault("metavar", _METAVAR.get(meta["parse"]))
        shown = default
        if isinstance(default, tuple):
            shown = ",".join(map(str, default))
        kw["default"] = None if default is None else str(shown)
        return click.option(flag, name or f.name, **kw)
    if tp is bool:
        bname = flag[2:]
        if default:
            return click.option(f"--{bname}/--no-{bname}", name or f.name, default=True, **kw)
        kw["show_default"] = False
        return click.option(flag, name or f.name, is_flag=True, default=False, **kw)
    if meta["choices"]:
        kw["type"] = click.Choice(list(meta["choices"]))
    elif tp is int:
        bounded = meta["low"] is not None or meta["high"] is not None  # an unbounded range shows "x<=None" in --help
        kw["type"] = click.IntRange(None if meta["low"] is None else int(meta["low"]),
                                    None if meta["high"] is None else int(meta["high"])) if bounded else int
    elif tp is float:
        bounded = meta["low"] is not None or meta["high"] is not None
        kw["type"] = click.FloatRange(meta["low"], meta["high"]) if bounded else float
    else:
        kw["type"] = str
    return click.option(flag, name or f.name, default=default, **kw)


def config_options(config_cls: type, *, exclude: tuple[str, ...] = ()) -> Callable:
    """A decorator adding one click option per field of ``config_cls`` (fields with ``cli=False`` or in
    ``exclude`` are skipped), in field order."""
    hints = typing.get_type_hints(config_cls)
    fields = [f for f in dataclasses.fields(config_cls) if setting_meta(f)["cli"] and f.name not in exclude]

    def decorate(fn: Callable) -> Callable:
        for f in reversed(fields):
            fn = _option(f, hints)(fn)
        return fn

    return decorate


def config_from_params(config_cls: type, params: dict[str, Any], **overrides: Any):
    """The Config from the parsed options: every field found in ``params`` (read, not removed: a shared option such
    as --seed or --trust-pickle may feed both the Config and the run), then ``overrides``."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    values = {k: params[k] for k in params if k in names}
    for f in dataclasses.fields(config_cls):
        for i, old in enumerate(setting_meta(f).get("old_flags", ())):
            given = params.pop(f"{f.name}__old{i}", None)
            if given is None:
                continue
            new = _flag(f, setting_meta(f))
            ctx = click.get_current_context(silent=True)
            if ctx is not None and ctx.get_parameter_source(f.name) is click.core.ParameterSource.COMMANDLINE:
                raise click.UsageError(f"{old} is the old name of {new}; give {new} only.")
            click.secho(f"warning: {old} is renamed {new} (one meaning per flag across commands); {old} goes in the "
                        "next release.", fg="yellow", err=True)
            values[f.name] = given
    values.update(overrides)
    return config_cls(**values)


#: The shared parameters run_command takes, from the shared option groups.
_RUN = ("out_dir", "resume", "overwrite", "workers", "ray_address", "gpus_per_worker", "cache_dir", "trust_pickle",
        "num_classes", "quiet")


def run_params(params: dict[str, Any]) -> dict[str, Any]:
    """Pop the shared groups' parameters (run, executor, environment, the user's model) for ``run_command``."""
    from .common import user_model

    out = {k: params.pop(k) for k in _RUN if k in params}
    out["model"] = user_model(params.pop("model_spec", None), params.pop("weights", None), params.pop("normalize", None),
                              params.pop("output", None))
    return out
