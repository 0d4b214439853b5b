"""`apex4gen probe` on the CPU: the probe sources render deterministically and compile for sm_80, sm_89 and
sm_90a with the instructions they claim in the SASS; the spec written from (synthetic) measurements loads and
plans; the cost model reads a spec's measured section; the CLI's refusals. The GPU side: tests/test_probe_gpu.py.
"""
from __future__ import annotations

import dataclasses
import re
import subprocess

import pytest
import torch
import yaml
from click.testing import CliRunner

from apex4gen.cli import cli
from apex4gen.costmodel import DEFAULT_CONSTANTS, fp16_time, rates_of, w4a4_time
from apex4gen.errors import SpecError, ToolchainError
from apex4gen.granularity import G128
from apex4gen.planner import make_plan
from apex4gen.probe import catalog, source, spec
from apex4gen.probe.record import Device, Measurements, Rate, StreamTime
from apex4gen.specs import MeasuredRates, TensorThroughput, load_gpu, parse_gpu

from _helpers import shipped, write_yaml


# ------------------------------------------------------------------------------------------------ render
@pytest.mark.parametrize("arch", catalog.ARCHS)
def test_render_is_deterministic_and_lists_the_arch_probes(arch):
    text = source.render(arch)
    assert text == source.render(arch)
    names = re.findall(r'^    "(\w+)",$', text, re.M)
    assert names == [p.name for p in catalog.probes_for(arch)]
    assert ("wgmma.mma_async" in text) == (arch == "sm_90a")
    assert ("MmaE4M3" in text) == (arch in catalog.FP8_ARCHS)


def test_unknown_arch_is_one_line():
    with pytest.raises(Exception, match="no probe kernels for sm_75"):
        source.render("sm_75")


def test_every_path_has_a_tensor_probe_on_every_arch():
    for arch in catalog.ARCHS:
        for path in ("int4", "int8", "fp16"):
            assert catalog.tensor_probe_for(arch, path) is not None
        fp8 = catalog.tensor_probe_for(arch, "fp8")
        assert (fp8 is not None) == (arch in catalog.FP8_ARCHS)
    assert catalog.tensor_probe_for("sm_90a", "int8").name == "wgmma_int8"
    assert catalog.tensor_probe_for("sm_89", "int8").name == "mma_sync_int8"


# ------------------------------------------------------------------------------------------------ nvcc
def _toolchain_or_skip():
    from apex4gen.toolchain import nvcc_path
    from apex4gen.sass import SassUnavailable, tools
    try:
        nvcc_path()
        tools()
    except (ToolchainError, SassUnavailable) as err:
        pytest.skip(str(err))


def _check_sass(obj, arch):
    from apex4gen import sass
    report = sass.read_object(obj)
    names = sass.demangle([f.function for f in report.functions])
    for probe in catalog.probes_for(arch):
        struct = probe.kernel.split("<")[1].split(",")[0]
        (fn,) = [f for f in report.functions if f"probe::{struct}," in names[f.function]]
        for i, (opcode, text) in enumerate(probe.sass_on(arch)):
            count = sum(n for v, n in fn.variants.items() if v.startswith(opcode) and text in v)
            least = catalog.CUDA_CHAINS * catalog.CUDA_UNROLL if probe.unit == "cuda" and i == 0 else 1
            assert count >= least, (probe.name, opcode, text, fn.variants)


@pytest.mark.nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_89"])
def test_builds_through_ninja_loads_and_has_its_instructions(tmp_path, monkeypatch, arch):
    """One compile: the library loads without a GPU (cudart is static) and names the catalog's loops."""
    _toolchain_or_skip()
    from apex4gen.probe.library import ProbeLibrary
    monkeypatch.setenv("APEX4GEN_CACHE_DIR", "")
    built = source.build(arch, root=tmp_path, progress=False)
    assert built.compiled == 2 and built.library.is_file()
    ProbeLibrary(built.library, catalog.probes_for(arch))
    _check_sass(built.obj, arch)
    assert source.build(arch, root=tmp_path, progress=False).compiled == 0  # unchanged: nothing runs


@pytest.mark.nvcc
def test_sm90a_has_wgmma_unserialised_and_no_spills(tmp_path):
    """The compile unit's own command with ptxas' report: no serialised wgmma (C7511/C7514), no spills."""
    _toolchain_or_skip()
    unit = source.compile_unit(tmp_path, "sm_90a")
    (tmp_path / "obj").mkdir()
    done = subprocess.run([*unit.command, "-Xptxas", "-v"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "serialized" not in done.stderr and "C751" not in done.stderr, done.stderr
    assert all(m == ("0", "0") for m in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", done.stderr))
    _check_sass(tmp_path / unit.obj, "sm_90a")


# ------------------------------------------------------------------------------------------------ records
def synthetic(arch: str = "sm_90a", architecture: str = "sm_90", smem: int = 232448) -> Measurements:
    """Made-up rates of the H100's order of magnitude: for the writer and the cost model, not a result."""
    values = {"mma_sync_int4": 45.0, "mma_sync_int8": 1280.0, "mma_sync_fp16": 640.0, "mma_sync_fp8": 600.0,
              "wgmma_int8": 1900.0, "wgmma_fp8": 1900.0, "wgmma_fp16": 950.0, "ffma": 33.0, "i2f": 16.0,
              "magic_convert": 16.5, "promote_int": 11.0, "promote_float": 16.5}
    rates = tuple(Rate(p.name, p.unit, p.path, p.instruction, values[p.name], (values[p.name],) * 5, 264, p.threads,
                       1000) for p in catalog.probes_for(arch))
    device = Device("NVIDIA Test GPU 80GB", architecture, arch, 132, 1980.0, 50 * 2**20, smem, "13.0", "2.11")
    stream = (StreamTime("2 x 256 a SM, contiguous", 264, 256, False, 242221056, 80.0),)
    return Measurements(device, "2026-12-09", "0.0.0", rates, 3000.0, catalog.STREAM_SHAPE, stream)


def test_measurements_round_trip_through_json():
    m = synthetic()
    assert Measurements.from_dict(yaml.safe_load(m.to_json())) == m
    with pytest.raises(SpecError, match="not an `apex4gen probe --json` file"):
        Measurements.from_dict({"format": 1, "rates": []})


def test_derived_quantities():
    m = synthetic()
    assert m.fp32_tflops == 66.0
    assert m.tensor_rate("int8").name == "wgmma_int8"
    assert m.dequant_ops("promote_int") == pytest.approx(3.0)
    assert m.rho(m.rate("wgmma_int8")) == pytest.approx((1900 / 66, 1900 / 16))
    assert m.stream_gbs == pytest.approx(242221056 / 80e-6 / 1e9)


@pytest.mark.parametrize("arch,architecture,smem", [("sm_90a", "sm_90", 232448), ("sm_86", "sm_86", 101376),
                                                    ("sm_89", "sm_89", 101376)])
def test_written_spec_loads_and_plans(tmp_path, arch, architecture, smem):
    m = synthetic(arch, architecture, smem)
    text, gpu = spec.spec_text(m)
    path = tmp_path / "gpu.yaml"
    path.write_text(text)
    assert load_gpu(path) == gpu and gpu.name == "nvidia-test-gpu-80gb"
    assert gpu.int4_tensor_cores == ("emulated" if architecture == "sm_90" else "native")
    assert gpu.smem_per_block_kb == smem // 1024 and gpu.l2_mb == 50
    assert "*id" not in text and "&id" not in text  # no YAML aliases between the two sections
    for key, source_text in gpu.sources:
        assert "NVIDIA Test GPU 80GB" in source_text and ("2026-12-09" in source_text), key
    assert gpu.measured.tops("int8") == m.tensor_rate("int8").value
    assert set(dict(rates_of(gpu).sources).values()) == {"probe"}
    plan = make_plan(path, "llama2-70b")
    assert plan.gpu == gpu.name and plan.gemms


def test_written_sm86_spec_refuses_more_shared_memory_than_the_arch_has():
    with pytest.raises(SpecError, match="exceeds the sm_86 limit"):
        spec.spec_text(synthetic("sm_86", "sm_86", smem=232448))


# ------------------------------------------------------------------------------------------------ cost model
def _with_measured(gpu, **overrides):
    c = DEFAULT_CONSTANTS
    t = gpu.tensor_tops
    reach = {p: getattr(t, p) * c.datasheet_tensor_reach if getattr(t, p) else None for p in ("int4", "int8", "fp8",
                                                                                              "fp16")}
    measured = MeasuredRates(TensorThroughput(**reach), gpu.fp32_tflops * c.datasheet_fp32_reach,
                             gpu.dram_bandwidth_gbs * c.datasheet_stream_reach, c.dequant_ops_int, c.dequant_ops_float)
    return dataclasses.replace(gpu, measured=dataclasses.replace(measured, **overrides))


@pytest.mark.parametrize("gpu_name", ["h100-sxm", "a40"])
def test_measured_peaks_equal_to_datasheet_times_reach_change_nothing(gpu_name):
    gpu = load_gpu(gpu_name)
    probed = _with_measured(gpu)
    path = gpu.compute_paths[0]
    for m in (1, 16, 256, 4096):
        assert w4a4_time(probed, m, 8192, 8192, G128, path).us == pytest.approx(
            w4a4_time(gpu, m, 8192, 8192, G128, path).us, rel=1e-12)
        assert fp16_time(probed, m, 8192, 8192).us == pytest.approx(fp16_time(gpu, m, 8192, 8192).us, rel=1e-12)


def test_each_measured_peak_drives_its_part():
    gpu = load_gpu("h100-sxm")
    base = w4a4_time(_with_measured(gpu), 4096, 8192, 8192, G128, "fp8")
    half_stream = gpu.dram_bandwidth_gbs * DEFAULT_CONSTANTS.datasheet_stream_reach / 2
    slow_stream = w4a4_time(_with_measured(gpu, stream_gbs=half_stream), 4096, 8192, 8192, G128, "fp8")
    assert slow_stream.memory_us == pytest.approx(2 * base.memory_us)
    costly = w4a4_time(_with_measured(gpu, dequant_ops_float=4.0), 4096, 8192, 8192, G128, "fp8")
    assert costly.dequant_us == pytest.approx(2 * base.dequant_us)
    half = dataclasses.replace(gpu.tensor_tops, fp8=gpu.tensor_tops.fp8 / 2)
    slow_tc = w4a4_time(_with_measured(gpu, tensor_tops=half), 4096, 8192, 8192, G128, "fp8")
    assert slow_tc.tensor_us == pytest.approx(2 * base.tensor_us)


def test_datasheet_spec_hash_is_unchanged_by_the_optional_section():
    gpu = load_gpu("h100-sxm")
    assert "measured" not in gpu.to_dict()
    assert _with_measured(gpu).sha256() != gpu.sha256()


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["fp32_tflops"].pop("source"), "measured.fp32_tflops.source"),
    (lambda m: m["tensor_tops"].pop("int8"), "measured.tensor_tops.int8"),
    (lambda m: m.update(peak=1), "unknown field"),
])
def test_measured_section_is_validated(tmp_path, edit, message):
    data = shipped("gpus", "h100-sxm")
    measured = yaml.safe_load(spec.spec_text(synthetic())[0])["measured"]
    edit(measured)
    data["measured"] = measured
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_gpu(yaml.safe_load(write_yaml(tmp_path / "g.yaml", data).read_text()), tmp_path / "g.yaml")


# ------------------------------------------------------------------------------------------------ CLI
def _invoke(*args):
    return CliRunner().invoke(cli, ["probe", *args])


def test_cli_writes_the_spec_from_recorded_measurements(tmp_path):
    recorded = tmp_path / "probe.json"
    recorded.write_text(synthetic().to_json())
    out = tmp_path / "my-gpu.yaml"
    result = _invoke("--from-json", str(recorded), "-o", str(out), "--name", "my-gpu")
    assert result.exit_code == 0, result.output
    assert "wgmma_int8" in result.output and "rho" in result.output
    assert load_gpu(out).name == "my-gpu"
    before = out.read_text()
    refused = _invoke("--from-json", str(recorded), "-o", str(out), "--name", "other")
    assert refused.exit_code == 2 and "exists; pass --force" in refused.output
    assert len(refused.output.strip().splitlines()) == 1 and out.read_text() == before
    assert _invoke("--from-json", str(recorded), "-o", str(out), "--name", "other", "--force").exit_code == 0
    assert load_gpu(out).name == "other"


def test_cli_refuses_a_file_that_is_not_probe_json(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    result = _invoke("--from-json", str(bad), "-o", str(tmp_path / "s.yaml"))
    assert result.exit_code == 2 and not (tmp_path / "s.yaml").exists()
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cli_without_a_gpu_is_one_line_and_exit_2(tmp_path):
    result = _invoke("-o", str(tmp_path / "s.yaml"), "--json", str(tmp_path / "p.json"))
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert "no CUDA GPU" in result.output
    assert not list(tmp_path.iterdir())
