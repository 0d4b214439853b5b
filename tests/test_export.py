"""apex4gen export: the CMake package, its relocatability, the C++ example and two builds in one program.

CPU (nvcc, CMake): two one-kernel builds (a40: sm_86; h100-sxm: sm_90a) are exported, the example configures
and builds against each, the exported trees name no path of this machine, and both builds link into one
program (shared and static) where each answers for itself. GPU (marked gpu): the example runs and passes on
the builds of APEX4GEN_TEST_BUILDS.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from apex4gen import build as build_stage
from apex4gen import export as export_stage
from apex4gen import manifest as manifest_file
from apex4gen import planner, specs, toolchain
from apex4gen.cli import cli
from apex4gen.errors import Apex4genError
from apex4gen.library import LibraryFiles, abi_version

from test_build import needs_nvcc, one_kernel_plan
from test_kernels_gpu import _build_dirs

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cpp"
needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake (pip install cmake)")


def _build(root: Path, gpu: str) -> Path:
    plan = one_kernel_plan(planner.make_plan(gpu, "llama2-7b"))
    out = root / f"{gpu}-test"
    build_stage.build(plan, specs.load_gpu(gpu), out, progress=False)
    return out


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, Path]:
    """One-kernel builds for the A40 (sm_86) and the H100 (sm_90a): prefixes a40_test and h100_sxm_test."""
    root = tmp_path_factory.mktemp("builds")
    return {gpu: _build(root, gpu) for gpu in ("a40", "h100-sxm")}


def _cmake(source: Path, binary: Path, package: Path, *definitions: str) -> subprocess.CompletedProcess:
    configure = subprocess.run(["cmake", "-S", str(source), "-B", str(binary), f"-DCMAKE_PREFIX_PATH={package}",
                                *definitions], capture_output=True, text=True)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    return subprocess.run(["cmake", "--build", str(binary)], capture_output=True, text=True)


def _needed(binary: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True, check=True).stdout
    return [line.split("[")[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]


def test_export_refuses_what_is_not_a_finished_build(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["export", str(tmp_path / "nothing"), "-o", str(tmp_path / "pkg")])
    assert result.exit_code != 0 and "not a finished apex4gen build" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "pkg").exists()


def test_export_refuses_a_folder_of_other_files(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mine.txt").write_text("mine")
    with pytest.raises(Apex4genError, match="not an apex4gen export"):
        export_stage.check_out_dir(tmp_path / "pkg")


@needs_nvcc
@pytest.mark.nvcc
def test_exported_tree_is_complete_and_relocatable(builds, tmp_path):
    machine_paths = {str(p) for p in (tmp_path, *builds.values(), Path.home(), Path(sys.prefix),
                                      toolchain.cutlass_root(), Path(toolchain.nvcc_path()).resolve().parent.parent,
                                      Path.cwd())}
    for gpu, build_dir in builds.items():
        out = tmp_path / f"pkg-{gpu}"
        result = export_stage.export(build_dir, out)
        files = LibraryFiles(result.prefix)
        for path in result.files:
            assert (out / path).exists(), path
        assert (out / "lib" / files.soname).resolve() == (out / files.shared).resolve()
        soname = subprocess.run(["readelf", "-d", str(out / files.shared)], capture_output=True, text=True).stdout
        assert f"Library soname: [{files.soname}]" in soname
        for path in sorted(out.rglob("*")):
            if path.is_symlink():
                assert not os.path.isabs(os.readlink(path)), path
            elif path.is_file():
                data = path.read_bytes()
                found = [p for p in machine_paths if p.encode() in data]
                assert not found, f"{path.relative_to(out)} names {found}"


@needs_nvcc
@needs_cmake
@pytest.mark.nvcc
def test_example_builds_against_each_export(builds, tmp_path):
    for gpu, build_dir in builds.items():
        out = tmp_path / f"pkg-{gpu}"
        files = LibraryFiles(manifest_file.read(build_dir).prefix)
        exported = CliRunner().invoke(cli, ["export", str(build_dir), "-o", str(out)])
        assert exported.exit_code == 0 and f"apex4gen::{files.prefix}" in exported.output, exported.output
        shared = _cmake(EXAMPLE, tmp_path / f"example-{gpu}", out)
        assert shared.returncode == 0, shared.stdout + shared.stderr
        assert files.soname in _needed(tmp_path / f"example-{gpu}" / "apex4gen_example")
        static = _cmake(EXAMPLE, tmp_path / f"example-{gpu}-static", out, "-DAPEX4GEN_EXAMPLE_STATIC=ON")
        assert static.returncode == 0, static.stdout + static.stderr
        assert files.soname not in _needed(tmp_path / f"example-{gpu}-static" / "apex4gen_example")


TWO_BUILDS_CMAKE = """cmake_minimum_required(VERSION 3.17)
project(two_builds LANGUAGES CXX)
find_package(apex4gen CONFIG REQUIRED COMPONENTS a40_test h100_sxm_test)
add_executable(two_shared main.cpp)
target_link_libraries(two_shared PRIVATE apex4gen::a40_test apex4gen::h100_sxm_test)
add_executable(two_static main.cpp)
target_link_libraries(two_static PRIVATE apex4gen::a40_test_static apex4gen::h100_sxm_test_static)
"""

# Each build answers for itself: no symbol of one resolves to the other (no GPU needed for these calls).
TWO_BUILDS_MAIN = """#include <cstdio>
#include "apex4gen_a40_test.h"
#include "apex4gen_h100_sxm_test.h"
int main() {
  const apex4gen_api a = apex4gen_a40_test_api(), h = apex4gen_h100_sxm_test_api();
  std::printf("%d %d %s %s\\n", a.build_arch(), h.build_arch(), a.kernel_name(0), h.kernel_name(0));
  return 0;
}
"""


@needs_nvcc
@needs_cmake
@pytest.mark.nvcc
def test_two_builds_link_into_one_program(builds, tmp_path):
    package = tmp_path / "pkg"
    for build_dir in builds.values():
        export_stage.export(build_dir, package)  # one package, two builds
    project = tmp_path / "project"
    project.mkdir()
    (project / "CMakeLists.txt").write_text(TWO_BUILDS_CMAKE)
    (project / "main.cpp").write_text(TWO_BUILDS_MAIN)
    done = _cmake(project, tmp_path / "bin", package)
    assert done.returncode == 0, done.stdout + done.stderr
    kernels = [manifest_file.read(b).kernels[0].name for b in (builds["a40"], builds["h100-sxm"])]
    for program in ("two_shared", "two_static"):
        run = subprocess.run([str(tmp_path / "bin" / program)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == ["86", "90", *kernels]


@needs_cmake
def test_a_missing_component_fails_configuration(tmp_path):
    (tmp_path / "pkg").mkdir()
    record = SimpleNamespace(gpu="a40", arch="sm_86", model="m", kernels=())  # what the targets file names
    export_stage._write_cmake(tmp_path / "pkg", LibraryFiles("only"), record)
    project = tmp_path / "project"
    project.mkdir()
    (project / "CMakeLists.txt").write_text("cmake_minimum_required(VERSION 3.17)\nproject(p LANGUAGES NONE)\n"
                                            "find_package(apex4gen CONFIG REQUIRED COMPONENTS other)\n")
    done = subprocess.run(["cmake", "-S", str(project), "-B", str(tmp_path / "bin"),
                           f"-DCMAKE_PREFIX_PATH={tmp_path / 'pkg'}"], capture_output=True, text=True)
    assert done.returncode != 0 and "no apex4gen build other" in done.stdout + done.stderr


@pytest.mark.gpu
@needs_cmake
@pytest.mark.skipif(not torch.cuda.is_available() or not _build_dirs(), reason="needs a CUDA GPU and "
                    "APEX4GEN_TEST_BUILDS")
@pytest.mark.parametrize("build_dir", _build_dirs() or [None], ids=lambda p: p.name if p else "none")
def test_example_runs_and_passes(build_dir, tmp_path):
    package = tmp_path / "pkg"
    export_stage.export(build_dir, package)
    done = _cmake(EXAMPLE, tmp_path / "example", package)
    assert done.returncode == 0, done.stdout + done.stderr
    run = subprocess.run([str(tmp_path / "example" / "apex4gen_example")], capture_output=True, text=True)
    print(run.stdout)
    unserved = _unserved_points(build_dir, run.stdout)
    assert run.returncode == (1 if unserved else 0), run.stdout + run.stderr
    assert run.stdout.rstrip().endswith(f" {len(unserved)} failed"), run.stdout + run.stderr


def _unserved_points(build_dir: Path, stdout: str) -> list[str]:
    """The example's lines that found no kernel, each checked to be a (problem, M) the plan leaves without one (a
    build made with --allow-partial); every other line must pass."""
    from apex4gen.plan import Plan

    plan = Plan.load(build_dir / "plan.yaml")
    failed = [line for line in stdout.splitlines() if line.endswith("FAIL (no kernel selected)")]
    for line in failed:
        f = dict(field.split("=", 1) for field in line.split() if "=" in field)
        n, k, group, m = (int(f[key]) for key in ("N", "K", "g", "M"))
        gemm = next(g for g in plan.gemms if (g.n, g.k, g.granularity.size(g.k)) == (n, k, group))
        assert gemm.bucket_for(m).kernel is None, f"{line}: the plan routes M={m} to a kernel"
    return failed


C_PROGRAM = """#include "apex4gen_a40_test.h"
#include <stdio.h>
int main(void) {
  apex4gen_api api = apex4gen_a40_test_api();
  printf("%d %d %d\\n", api.abi_version(), apex4gen_a40_test_abi_version(), APEX4GEN_ABI_VERSION);
  return 0;
}
"""


@needs_nvcc
@needs_cmake
@pytest.mark.nvcc
def test_headers_are_c(builds, tmp_path):
    """The ABI is C: a C99 project finds the package, includes the build's header, links and calls it."""
    out = tmp_path / "pkg"
    export_stage.export(builds["a40"], out)
    project = tmp_path / "project"
    project.mkdir()
    (project / "main.c").write_text(C_PROGRAM)
    (project / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.17)\nproject(c_program LANGUAGES C)\nset(CMAKE_C_STANDARD 99)\n"
        "find_package(apex4gen CONFIG REQUIRED)\nadd_executable(main main.c)\n"
        "target_compile_options(main PRIVATE -Wall -Werror)\n"
        "target_link_libraries(main PRIVATE apex4gen::apex4gen)\n")
    done = _cmake(project, tmp_path / "bin", out)
    assert done.returncode == 0, done.stdout + done.stderr
    run = subprocess.run([str(tmp_path / "bin" / "main")], capture_output=True, text=True, check=True)
    assert run.stdout.split() == [str(abi_version())] * 3


@needs_nvcc
@pytest.mark.nvcc
def test_export_never_replaces_another_build_of_the_same_name(builds, tmp_path):
    """Two build folders of one name (one prefix) made from different plans: the second export into the package
    of the first is refused in one line, and the first build's files stay as they were."""
    package = tmp_path / "pkg"
    assert CliRunner().invoke(cli, ["export", str(builds["a40"]), "-o", str(package)]).exit_code == 0
    other = tmp_path / "other" / builds["a40"].name
    shutil.copytree(builds["a40"], other, symlinks=True)
    header = other / LibraryFiles(builds["a40"].name.replace("-", "_")).header
    header.write_text(header.read_text() + "// another plan\n")
    before = {p: p.read_bytes() for p in package.rglob("*") if p.is_file()}
    result = CliRunner().invoke(cli, ["export", str(other), "-o", str(package)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "already holds another build named a40_test" in lines[0], result.output
    assert {p: p.read_bytes() for p in package.rglob("*") if p.is_file()} == before


@needs_nvcc
@pytest.mark.nvcc
def test_an_export_stopped_half_way_is_no_package(builds, tmp_path, monkeypatch):
    """Ctrl-C while the CMake files are written: no apex4genConfig.cmake (find_package finds nothing), and the
    same export run again completes the package."""
    package = tmp_path / "pkg"
    render = export_stage._render

    def interrupted(template, context):
        if template == "apex4gen-targets.cmake.jinja":
            raise KeyboardInterrupt
        return render(template, context)

    monkeypatch.setattr(export_stage, "_render", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_stage.export(builds["a40"], package)
    assert not (package / export_stage.CMAKE_DIR / "apex4genConfig.cmake").exists()
    monkeypatch.setattr(export_stage, "_render", render)
    result = CliRunner().invoke(cli, ["export", str(builds["a40"]), "-o", str(package)])
    assert result.exit_code == 0, result.output
    assert (package / export_stage.CMAKE_DIR / "apex4genConfig.cmake").is_file()


@needs_nvcc
@pytest.mark.nvcc
def test_export_prints_a_package_path_cmake_can_use_from_anywhere(builds, tmp_path, monkeypatch):
    """-o given relative to the shell's folder: the apex4gen_DIR printed is absolute (the engine's CMake runs in
    its own folder)."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["export", str(builds["a40"]), "-o", "pkg"])
    assert result.exit_code == 0, result.output
    printed = result.output.split("apex4gen_DIR=")[1].split(",")[0]
    assert Path(printed).is_absolute() and Path(printed) == (tmp_path / "pkg" / export_stage.CMAKE_DIR)
