"""The ``apex4gen`` command. Each stage's command lives in its own module, listed here by name."""
from __future__ import annotations

import sys

import click

from .. import __version__
from ..errors import Apex4genError
from . import bench, build, calibrate, eval, export, generate, inspect, plan, probe, quantize, specs, study

# every command module; each names its click commands in COMMANDS
_COMMAND_MODULES = (bench, build, calibrate, eval, export, generate, inspect, plan, probe, quantize, specs, study)


class _Group(click.Group):
    """Turns every :class:`Apex4genError`, and click's own usage errors (a missing option, a value out of range, a
    file where a folder is expected), into one line on stderr and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Apex4genError as err:
            click.echo(f"apex4gen: error: {err}", err=True)
            sys.exit(err.exit_code)
        except click.UsageError as err:
            command = err.ctx.command_path if err.ctx is not None else ctx.command_path
            click.echo(f"apex4gen: error: {err.format_message().rstrip('.')}; see `{command} --help`", err=True)
            sys.exit(err.exit_code)


@click.group("apex4gen", cls=_Group)
@click.version_option(__version__, prog_name="apex4gen")
def cli() -> None:
    """Compile W4A4 GEMM kernels for a GPU and a model: specs -> plan -> emit -> build -> load."""


def _add_commands() -> None:
    for module in _COMMAND_MODULES:
        for command in module.COMMANDS:
            cli.add_command(command)


_add_commands()


def main() -> None:
    cli(prog_name="apex4gen")
