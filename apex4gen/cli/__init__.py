"""The ``apex4gen`` command. Each stage's command lives in its own module and is added here."""
from __future__ import annotations

import sys

import click

from .. import __version__
from ..errors import Apex4genError


class _Group(click.Group):
    """Turns every :class:`Apex4genError` into one line on stderr and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Apex4genError as err:
            click.echo(f"apex4gen: error: {err}", err=True)
            sys.exit(err.exit_code)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="apex4gen")
def cli() -> None:
    """Compile W4A4 GEMM kernels for a GPU and a model: specs -> plan -> emit -> build -> load."""


def _add_commands() -> None:
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for command in getattr(module, "COMMANDS", ()):
            cli.add_command(command)


_add_commands()


def main() -> None:
    cli(prog_name="apex4gen")
