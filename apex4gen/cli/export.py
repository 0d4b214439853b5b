"""`apex4gen export`: a build as a CMake package for other engines (apex4gen/export.py)."""
from __future__ import annotations

from pathlib import Path

import click

from .. import export as export_stage


@click.command("export")
@click.argument("build_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Package folder (new, empty, or an earlier export: several builds may share one).")
def export_command(build_dir: Path, out: Path) -> None:
    """Copy BUILD_DIR's libraries and headers into OUT with a CMake config package (find_package(apex4gen))."""
    result = export_stage.export(build_dir, out)
    click.echo(f"exported build {result.prefix} to {result.out}:")
    for path in result.files:
        click.echo(f"  {path}")
    # absolute: the engine's CMake runs in its own folder, where a path relative to here means nothing
    package = (result.out / export_stage.CMAKE_DIR).absolute()
    click.echo(f"CMake: find_package(apex4gen CONFIG REQUIRED) with apex4gen_DIR={package}, then link "
               f"apex4gen::{result.prefix} (or apex4gen::apex4gen when it is the only build)")


COMMANDS = (export_command,)
