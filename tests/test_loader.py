"""The runtime side without a GPU: it never imports the compiler, the manifest record round-trips and refuses
a malformed file, and the Build API answers from the manifest record."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apex4gen import manifest as manifest_file
from apex4gen.errors import LoadError, ShapeError
from apex4gen.loader import Build
from apex4gen.manifest import CompileCommand, KernelEntry, Manifest, Route

REPO = Path(__file__).resolve().parent.parent
COMPILER = ("jinja2", "apex4gen.emit", "apex4gen.build", "apex4gen.planner", "apex4gen.costmodel",
            "apex4gen.ninjabuild", "apex4gen.toolchain")


def test_the_runtime_never_imports_the_compiler():
    code = ("import sys, apex4gen, apex4gen.loader; apex4gen.load; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('apex4gen', 'jinja2')))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    imported = set(out.stdout.split())
    assert "apex4gen.loader.ops" in imported and "apex4gen.manifest" in imported  # the check sees the runtime
    assert not imported & set(COMPILER)


def _manifest(plan_sha: str = "0" * 64) -> Manifest:
    kernels = (KernelEntry(0, "apex4gen_a", {"tile_m": 16}, "s4", 4, "canonical", "src/apex4gen_a.cu"),
               KernelEntry(1, "apex4gen_b", {"tile_m": 128}, "raw", 8, "sm90_channel", "src/apex4gen_b.cu"))
    routes = (Route(8192, 8192, 128, "f16", 16, 0), Route(8192, 8192, 128, "f16", 2**31 - 1, 1),
              Route(1024, 8192, 8192, "bf16", 2**31 - 1, 0), Route(1024, 8192, 8192, "bf16", 2**31 - 1, 1, 8))
    return Manifest("0.1.0", "4.0.0", "13.0.48", "h100-sxm", "sm_90a", 90, False, "llama2-70b", "f16", plan_sha,
                    "h100", 1, "lib/libapex4gen_h100.so", "lib/libapex4gen_h100.a", "include/apex4gen_h100.h",
                    kernels, routes,
                    (CompileCommand("src/apex4gen_a.cu", "obj/apex4gen_a-0123456789abcdef.o", ("nvcc", "-c")),))


def test_manifest_round_trips_through_json():
    m = _manifest()
    assert Manifest.from_dict(json.loads(m.to_json())) == m
    assert json.loads(m.to_json())["routes"][0] == {"n": 8192, "k": 8192, "group": 128, "dtype": "f16",
                                                      "m_max": 16, "kernel": 0, "act_bits": 4}


def _write_build(tmp_path: Path, data: dict) -> None:
    (tmp_path / "plan.yaml").write_text("plan\n")
    (tmp_path / manifest_file.NAME).write_text(json.dumps(data))


def test_read_gives_the_record_of_a_whole_manifest(tmp_path):
    m = _manifest(manifest_file.plan_sha256("plan\n"))
    _write_build(tmp_path, json.loads(m.to_json()))
    assert manifest_file.read(tmp_path) == m


@pytest.mark.parametrize("damage", [
    lambda d: d["kernels"][0].pop("weight_layout"),
    lambda d: d["routes"][0].update(extra=1),
    lambda d: d.update(kernels=3),
    lambda d: d.update(when="today"),
])
def test_read_refuses_a_malformed_manifest_in_one_line(tmp_path, damage):
    data = json.loads(_manifest(manifest_file.plan_sha256("plan\n")).to_json())
    damage(data)
    _write_build(tmp_path, data)
    with pytest.raises(LoadError, match="malformed") as err:
        manifest_file.read(tmp_path)
    assert "apex4gen build --gpu " in str(err.value) and "--plan" in str(err.value) and "\n" not in str(err.value)


class _Library:
    """The one ABI call Build makes without a GPU: kernel selection, answered from the routes."""

    def __init__(self, routes):
        self.routes = routes

    def apex4gen_select_kernel(self, m, n, k, group, act_bits, dtype):
        names = {0: "f16", 1: "bf16"}
        for r in self.routes:
            if (r.n, r.k, r.group, r.act_bits, r.dtype) == (n, k, group, act_bits, names[dtype]) and m <= r.m_max:
                return r.kernel
        return -1


def test_build_api_answers_from_the_manifest_record(tmp_path):
    m = _manifest()
    build = Build(tmp_path, m, _Library(m.routes), handle=0)
    assert build.select(16, 8192, 8192, 128, torch.float16).name == "apex4gen_a"
    assert build.select(17, 8192, 8192, 128, torch.float16) == m.kernels[1]
    assert build.layouts_for(8192, 8192, 128, torch.float16) == ("canonical", "sm90_channel")
    assert build.problems() == "N=1024 K=8192 g=8192 bf16, N=1024 K=8192 g=8192 a8 bf16, N=8192 K=8192 g=128 f16"
    # a problem's act_bits pick its route: the 8-bit route of the bf16 problem runs kernel 1, the 4-bit one kernel 0
    assert build.select(1, 1024, 8192, 8192, torch.bfloat16).index == 0
    assert build.select(1, 1024, 8192, 8192, torch.bfloat16, act_bits=8).index == 1
    assert build.act_bits_of(1024, 8192, 8192, torch.bfloat16) == (4, 8)
    with pytest.raises(ShapeError, match="no kernel for M=1 N=8192 K=8192 group=128 8-bit activations f16"):
        build.select(1, 8192, 8192, 128, torch.float16, act_bits=8)
    with pytest.raises(ShapeError, match="no kernel for M=1 N=8 K=64 group=64 4-bit activations bf16; planned "
                                         "problems: N=1024"):
        build.layouts_for(8, 64, 64, torch.bfloat16)
    assert "h100-sxm" in repr(build) and dataclasses.is_dataclass(build.manifest)
