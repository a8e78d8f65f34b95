"""Command-line interface: thin wrappers over the library API.

One module per system registers its commands on :data:`main`; shared option parsers and helpers live in
:mod:`manifex.cli.common`.
"""
from __future__ import annotations

import sys

import click

from ..errors import ManifexError, speaking_flags

#: Parameter names whose command-line flag is not ``--<name-with-dashes>`` (errors speak in parameter names, see
#: :func:`manifex.errors.param`; this is the one place they become flags). Generated options add their own.
FLAGS = {"out_dir": "--out", "model_spec": "--model", "n_samples": "--samples", "classifier_epochs": "--epochs",
         "spaces": "--space", "robust_epsilons": "--robust-eps", "generative_epochs": "--vae-epochs"}


class _Group(click.Group):
    """Turn user and environment errors into a one-line message and exit status 2 instead of a traceback:
    manifex's own errors, bad option values (click's usage errors) and file-system errors."""

    def invoke(self, ctx: click.Context):
        try:
            with speaking_flags(FLAGS):
                return super().invoke(ctx)
        except ManifexError as e:
            _fail(str(e))
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "manifex"
            _fail(f"{e.format_message()} (see '{where} --help')")
        except OSError as e:  # a path that cannot be read or written, a full disk, ...
            what = f"{e.filename}: " if getattr(e, "filename", None) else ""
            _fail(f"{what}{e.strerror or e} ({type(e).__name__}); check the path and its permissions.")


def _fail(message: str) -> None:
    click.secho(f"error: {' '.join(message.split())}", fg="red", err=True)
    sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="manifex")
def main() -> None:
    """manifex — the geometry of neural-network explanations.

    \b
    Start with the one-command demo (trains small models on embedded MNIST
    digits, caches them, writes an HTML report):
        manifex align --out runs/align
    Then open runs/align/report.html.
    """


@main.command()
def methods() -> None:
    """List the attribution methods and their aliases."""
    from ..attribution import ALIASES, METHODS

    for name, spec in sorted(METHODS.items()):
        aliases = ", ".join(a for a, t in sorted(ALIASES.items()) if t == name)
        click.echo(f"{name:28s} {spec.description}" + (f"  (aliases: {aliases})" if aliases else ""))


# Register the commands of every system (each module decorates functions with @main.command()).
from . import align as _align, audit as _audit, concepts as _concepts, contrast as _contrast, counterfactual as _counterfactual, evaluate as _evaluate, manipulation as _manipulation  # noqa: E402,F401

if __name__ == "__main__":  # pragma: no cover
    main()
