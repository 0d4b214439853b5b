"""`apex4gen inspect`: the plan summary, routes and kernels of a build, and one kernel's source, compile command,
resources and SASS instruction mix, read on the CPU from real builds (an sm_86 group kernel; an sm_90a prefill
kernel), from copied and incomplete folders, and refused for bad input with one line."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from apex4gen import build as build_stage
from apex4gen import inspection
from apex4gen import planner, sass, specs
from apex4gen.cli import cli
from apex4gen.granularity import Granularity
from apex4gen.kernels import KernelConfig

from _helpers import needs_nvcc


CONFIG_FIELDS = {f.name for f in dataclasses.fields(KernelConfig)}
G128 = Granularity(128)


def one_gemm_plan(gpu: str, model: str, granularity: Granularity):
    """A real plan cut to its first GEMM of ``granularity`` (and the layers it serves), with the kernel of its
    last M bucket serving every M: one kernel to compile."""
    plan = planner.make_plan(gpu, model)
    gemm = next(g for g in plan.gemms if g.granularity == granularity)
    last = dataclasses.replace(gemm.buckets[-1], m_max=None)
    return dataclasses.replace(plan, gemms=(dataclasses.replace(gemm, buckets=(last,)),),
                               layers=tuple(lp for lp in plan.layers if lp.name in gemm.layers))


def _build(tmp_path_factory, gpu: str, model: str, granularity: Granularity) -> Path:
    out = tmp_path_factory.mktemp(f"{gpu}-build")
    build_stage.build(one_gemm_plan(gpu, model, granularity), specs.load_gpu(gpu), out, progress=False, force=True)
    return out


@pytest.fixture(scope="module")
def a40_build(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "a40", "llama2-7b", G128)


def _run(*args: str):
    return CliRunner().invoke(cli, ["inspect", *args])


def _one_line_error(result) -> str:
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("apex4gen: error: "), result.output
    return lines[0]


# ---------------------------------------------------------------------------------------------- sm_86 build


@needs_nvcc
@pytest.mark.nvcc
def test_summary_json_has_layers_routes_and_every_config_field(a40_build):
    result = _run(str(a40_build), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (data["gpu"], data["arch"], data["model"]) == ("a40", "sm_86", "llama2-7b")
    assert data["speedup"] > 0 and data["points"] and data["unserved"] is None
    (layer,) = data["layers"]
    assert layer["name"] == "o_proj" and (layer["n"], layer["k"]) == (4096, 4096)
    assert layer["granularity"] == "g128" and layer["path"] == "int4" and layer["speedup"] > 1
    assert layer["act_bits"] == 4
    assert [p["phase"] for p in layer["points"]] == [p["phase"] for p in data["points"]]
    (route,) = data["routes"]
    (kernel,) = data["kernels"]
    assert route == {"n": 4096, "k": 4096, "group": 128, "dtype": "f16", "m_min": 1, "m_max": None, "kernel": 0,
                     "kernel_name": kernel["name"], "layers": ["o_proj"], "act_bits": 4}
    assert set(kernel["config"]) == CONFIG_FIELDS and kernel["config"]["family"] == "sm80_group"
    assert kernel["routes"] == 1 and kernel["act_format"] == "s4"
    assert (a40_build / kernel["source"]).is_file() and (a40_build / kernel["object"]).is_file()


@needs_nvcc
@pytest.mark.nvcc
def test_summary_text_shows_plan_routes_and_kernels(a40_build):
    result = _run(str(a40_build))
    assert result.exit_code == 0, result.output
    name = json.loads(_run(str(a40_build), "--json").output)["kernels"][0]["name"]
    for text in ("o_proj", "4096 x 4096", "g128", "1+", f"0: {name}", "sm80_group", "64x128x128", "persistent"):
        assert text in result.output, text
    assert "…" not in result.output  # no cell cut short


@needs_nvcc
@pytest.mark.nvcc
def test_sm86_group_kernel_computes_on_int4_tensor_cores_without_spills(a40_build):
    report = inspection.kernel_report(a40_build, "sm80_group")
    assert report.unavailable is None
    assert report.mix["IMMA"] > 0 and report.evidence.ok
    assert report.evidence.found and all(".S4.S4" in variant for variant in report.evidence.found)
    assert report.mix["HGMMA"] == report.mix["QGMMA"] == report.mix["IGMMA"] == 0
    assert report.mix["LDL"] == report.mix["STL"] == 0 and report.spills.none
    assert report.mix["LDGSTS"] > 0  # the sm_80 mainloop's cp.async
    (kernel_fn,) = report.sass.resources
    assert 0 < kernel_fn.registers <= 255 and kernel_fn.local == 0
    assert report.dynamic_shared_bytes > 0
    assert report.compile_command[-1] == report.kernel.object and "-c" in report.compile_command


@needs_nvcc
@pytest.mark.nvcc
def test_kernel_view_json_schema(a40_build):
    result = _run(str(a40_build), "0", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert set(data) == {"kernel", "routes", "source_text", "headers", "compile_command", "dynamic_shared_bytes",
                         "sass", "demangled", "mix", "evidence", "spills", "unavailable"}
    assert set(data["mix"]) == set(sass.MIX_OPCODES) and data["mix"]["IMMA"] > 0
    assert data["spills"] == {"local_bytes": 0, "stores": 0, "loads": 0, "none": True}
    assert data["evidence"]["ok"] and data["evidence"]["path"] == "int4"
    (function,) = data["sass"]["functions"]
    assert function["opcodes"]["IMMA"] == data["mix"]["IMMA"]
    assert function["instructions"] == sum(function["opcodes"].values()) == sum(function["variants"].values())
    assert set(data["sass"]["resources"][0]) == {"function", "registers", "shared_static", "local", "stack",
                                                 "constant"}
    assert data["source_text"].startswith("// Generated by apex4gen.")
    assert "runtime/kernels/sm80_group.cuh" in data["headers"]  # the kernel body the source includes
    assert data["unavailable"] is None


@needs_nvcc
@pytest.mark.nvcc
def test_kernel_view_text(a40_build):
    result = _run(str(a40_build), "apex4gen_sm80_group", "--no-pager")
    assert result.exit_code == 0, result.output
    for text in ("IMMA", "IMMA.16864.S4.S4", "the int4 path its name claims", "spills: none", "registers",
                 "compile command", " -c src/", "source: src/", "#include \"apex4gen.h\""):
        assert text in result.output, text


@needs_nvcc
@pytest.mark.nvcc
def test_kernel_by_name_prefix_or_index_and_raw_source(a40_build):
    name = inspection.summarize(a40_build).kernels[0].name
    for wanted in (name, name[:30], name[len("apex4gen_"):40], "0"):
        assert inspection.kernel_report(a40_build, wanted).kernel.name == name
    raw = _run(str(a40_build), "0", "--raw")
    assert raw.exit_code == 0 and raw.output == (a40_build / "src" / f"{name}.cu").read_text()


@needs_nvcc
@pytest.mark.nvcc
def test_a_copied_build_inspects_the_same_and_a_missing_object_is_one_line(a40_build, tmp_path):
    copy = tmp_path / "elsewhere"
    shutil.copytree(a40_build, copy)
    original = inspection.kernel_report(a40_build, "0")
    moved = inspection.kernel_report(copy, "0")
    assert moved.mix == original.mix and moved.sass.resources == original.sass.resources
    shutil.rmtree(copy / "obj")
    result = _run(str(copy), "0", "--no-pager")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("no resources or SASS")]
    assert len(lines) == 1 and "no object file" in lines[0] and "apex4gen build" in lines[0]
    data = json.loads(_run(str(copy), "0", "--json").output)
    assert data["sass"] is None and data["mix"] == {} and "no object file" in data["unavailable"]


@needs_nvcc
@pytest.mark.nvcc
def test_missing_cuobjdump_is_one_line(a40_build, monkeypatch):
    monkeypatch.setenv("PATH", "")
    monkeypatch.setenv("APEX4GEN_NVCC", "/nonexistent/nvcc")
    monkeypatch.setattr(sass, "_wheel_binary", lambda distribution, name: None)
    sass.tools.cache_clear()
    try:
        report = inspection.kernel_report(a40_build, "0")
    finally:
        sass.tools.cache_clear()
    assert report.sass is None
    assert report.unavailable.startswith("cuobjdump and nvdisasm not found: pip install nvidia-cuda-cuobjdump")


@needs_nvcc
@pytest.mark.nvcc
def test_a_partial_build_shows_its_unserved_buckets_and_where_routes_start(tmp_path):
    plan = one_gemm_plan("a40", "llama2-7b", G128)
    gemm = plan.gemms[0]
    unserved = dataclasses.replace(gemm.buckets[0], m_max=16, kernel=None, rationale="kernel: null: test rule")
    plan = dataclasses.replace(plan, gemms=(dataclasses.replace(gemm, buckets=(unserved, gemm.buckets[0])),))
    build_stage.build(plan, specs.load_gpu("a40"), tmp_path, progress=False, allow_partial=True)
    summary = inspection.summarize(tmp_path)
    (route,) = summary.routes
    assert (route.m_min, route.m_max) == (17, None)
    assert "o_proj" in summary.unserved and "M <= 16" in summary.unserved and "test rule" in summary.unserved
    result = _run(str(tmp_path))
    assert "17+" in result.output and "without a kernel (the library refuses these): o_proj" in result.output


# ---------------------------------------------------------------------------------------------- sm_90a build


@needs_nvcc
@pytest.mark.nvcc
@pytest.mark.slow
def test_sm90a_prefill_kernel_computes_on_fp8_wgmma_without_spills(tmp_path_factory):
    build = _build(tmp_path_factory, "h100-sxm", "llama2-7b", G128)
    (kernel,) = inspection.summarize(build).kernels
    assert kernel.config["family"] == "sm90_prefill_group"
    report = inspection.kernel_report(build, "0")
    assert report.unavailable is None
    assert report.mix["QGMMA"] > 0 and report.evidence.ok
    assert all(".E4M3" in variant for variant in report.evidence.found)
    assert report.mix["UTMALDG"] > 0   # TMA loads
    assert report.mix["IMMA"] == report.mix["HMMA"] == 0
    assert report.spills.none, report.spills


# ---------------------------------------------------------------------------------------------- bad input


def test_a_folder_that_is_not_a_build_is_one_line(tmp_path):
    assert "is not a folder" in _one_line_error(_run(str(tmp_path / "missing")))
    assert "not a finished apex4gen build (no manifest.json)" in _one_line_error(_run(str(tmp_path)))
    (tmp_path / "manifest.json").write_text("{not json")
    assert "unreadable" in _one_line_error(_run(str(tmp_path), "0"))
    (tmp_path / "manifest.json").write_text(json.dumps({"gpu": "a40"}))
    assert "lacks" in _one_line_error(_run(str(tmp_path), "--json"))


def test_an_emitted_but_unbuilt_folder_is_one_line(tmp_path):
    build_stage.build(one_gemm_plan("a40", "llama2-7b", G128), specs.load_gpu("a40"), tmp_path, emit_only=True)
    assert "not a finished apex4gen build" in _one_line_error(_run(str(tmp_path)))


@needs_nvcc
@pytest.mark.nvcc
def test_unknown_kernel_or_a_plan_not_of_the_build_is_one_line(a40_build, tmp_path):
    assert "no kernel of this build is named 'sm90_decode'" in _one_line_error(_run(str(a40_build), "sm90_decode"))
    assert "index 7 is out of range" in _one_line_error(_run(str(a40_build), "7"))
    copy = tmp_path / "copy"
    shutil.copytree(a40_build, copy)
    plan = copy / "plan.yaml"
    plan.write_text(plan.read_text().replace("fused: true", "fused: false"))
    assert "not built from the plan.yaml beside it" in _one_line_error(_run(str(copy)))
    result = _run(str(a40_build), "--raw")
    assert result.exit_code != 0 and "give KERNEL" in result.output


def _row(index: int, name: str) -> inspection.KernelRow:
    return inspection.KernelRow(index, name, {}, "s4", "canonical", f"src/{name}.cu", None, 1)


def test_kernel_lookup_by_name_prefix_and_index():
    rows = (_row(0, "apex4gen_sm90_decode_a"), _row(1, "apex4gen_sm90_decode_b"), _row(2, "apex4gen_sm90_prefill"))
    assert inspection.find_kernel(rows, "apex4gen_sm90_decode_b").index == 1
    assert inspection.find_kernel(rows, "sm90_pre").index == 2
    assert inspection.find_kernel(rows, "2").index == 2
    with pytest.raises(inspection.KernelNotFound, match="matches 2 kernels"):
        inspection.find_kernel(rows, "sm90_decode")
    with pytest.raises(inspection.KernelNotFound, match="out of range"):
        inspection.find_kernel(rows, "3")
    with pytest.raises(inspection.KernelNotFound, match="no kernel"):
        inspection.find_kernel(rows, "sm80")


# ---------------------------------------------------------------------------------------------- parsing

SASS_TEXT = """
\tcode for sm_90a
\t\tFunction : _Z6kernelv
\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                            /* 0x00000a00ff017b82 */
        /*0010*/              @!P2 QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR4], R24 ;  /* 0x0000000000007919 */
        /*0020*/              @UP0 QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR8], R24 ;  /* 0x0000000000007919 */
        /*0030*/                   STL [R1], R2 ;                                     /* 0x0000000000007919 */
        /*0040*/               @PT I2FP.F32.S32 R3, R4 ;                              /* 0x0000000000007919 */
\t\tFunction : _Z4prepv
        /*0000*/                   FFMA R1, R2, R3, R4 ;                              /* 0x0000000000007919 */
        /*0010*/                   EXIT ;                                             /* 0x0000000000007919 */
"""

RESOURCE_TEXT = """
Resource usage:
 Common:
  GLOBAL:9 CONSTANT[4]:72
 Function _Z6kernelv:
  REG:168 STACK:16 SHARED:1024 LOCAL:8 CONSTANT[0]:416 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_sass_counts_opcodes_per_function_with_predicates():
    kernel, prep = sass.parse_sass(SASS_TEXT)
    assert kernel.function == "_Z6kernelv" and kernel.instructions == 5
    assert kernel.opcodes == {"I2FP": 1, "LDC": 1, "QGMMA": 2, "STL": 1}
    assert kernel.variants["QGMMA.64x128x32.F32.E4M3.E4M3"] == 2
    assert prep.opcodes == {"EXIT": 1, "FFMA": 1}
    report = sass.ObjectReport("x.o", sass.parse_resources(RESOURCE_TEXT), (kernel, prep))
    assert report.mix()["QGMMA"] == 2 and report.mix()["FFMA"] == 1 and report.mix()["STL"] == 1
    assert report.evidence("fp8").ok and not report.evidence("int8").ok and not report.evidence("int4").ok
    assert report.resources == (sass.Resources("_Z6kernelv", 168, 1024, 8, 16, 416),)


def test_kernel_view_names_functions_shortly_and_joins_adjacent_buckets():
    from apex4gen.cli.inspect import _routes_by_problem, _short

    assert _short("void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<int, (int)1>>(T1::Params)") \
        == "void cutlass::device_kernel<…>"
    assert _short("(anonymous namespace)::gemm_kernel((anonymous namespace)::Problem)") == "gemm_kernel"

    def route(n, m_min, m_max):
        return inspection.RouteRow(n, 4096, 128, "f16", m_min, m_max, 2, "k", ("o_proj",))

    joined = _routes_by_problem((route(4096, 17, 64), route(4096, 65, 256), route(4096, 1025, None),
                                 route(8192, 257, None)))
    assert [(r.m_min, r.m_max) for r in joined["4096 x 4096 g128 f16"]] == [(17, 256), (1025, None)]
    assert [(r.m_min, r.m_max) for r in joined["8192 x 4096 g128 f16"]] == [(257, None)]


def test_a_mangled_function_name_is_cut_to_the_table():
    from apex4gen.cli.inspect import _short
    mangled = "_ZN7cutlass13device_kernelINS_4gemm6kernel13GemmUniversalIN4cute5tupleIJiiiiEEE" + "x" * 900
    assert len(_short(mangled)) == 60 and _short(mangled).endswith("…")
    assert _short("void cutlass::device_kernel<Foo<int>>(Foo<int>::Params)") == "void cutlass::device_kernel<…>"
