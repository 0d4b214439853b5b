"""`apex4gen study` on the GPU: a tiny study (llama2-7b's o_proj, g128 and per-channel, M in {1, 17}, two
candidates a point) builds, times and writes its JSON and PNG; every kernel it timed by index computes the
reference's result; a rerun compiles nothing. Written for Hopper (the shipped sm_90 specs)."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from apex4gen import reference as ref
from apex4gen import study
from apex4gen.cli import cli
from test_kernels_gpu import assert_matches_reference

pytestmark = pytest.mark.gpu
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _spec_of_this_gpu() -> str | None:
    """The shipped spec of this Hopper GPU (the study refuses a spec of another arch)."""
    if torch.cuda.get_device_capability() != (9, 0):
        return None
    name = torch.cuda.get_device_name()
    return "h200" if "H200" in name else "h100-pcie" if "PCIe" in name else "h100-sxm"


def _args(spec: str, out) -> list[str]:
    return ["study", "--gpu", spec, "--model", "llama2-7b", "--gemms", "o_proj", "--granularities", "g128,channel",
            "--ms", "1,17", "--max-candidates", "2", "--out", str(out / "builds"), "--json", str(out / "s.json"),
            "--plot", str(out / "s.png"), "--markdown", str(out / "s.md")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    spec = _spec_of_this_gpu()
    if spec is None:
        pytest.skip(f"the tiny study uses a shipped Hopper spec; this GPU is {torch.cuda.get_device_name()}")
    out = tmp_path_factory.mktemp("study")
    result = CliRunner().invoke(cli, _args(spec, out))
    assert result.exit_code == 0, result.output
    return spec, out, result.output


def test_tiny_study_writes_json_and_png(tiny):
    _, out, output = tiny
    data = json.loads((out / "s.json").read_text())
    recorded = study.from_json(data, "s.json")
    assert sorted((p.granularity, p.m) for p in recorded.points) == [("channel", 1), ("channel", 17), ("g128", 1),
                                                                     ("g128", 17)]
    for p in recorded.points:
        assert p.gemm == "o_proj" and (p.n, p.k) == (4096, 4096)
        assert 1 <= len(p.candidates) <= 2 and p.chosen.kernel == p.kernel
        assert all(c.measured_us > 0 and c.predicted_us > 0 for c in p.candidates) and p.fp16_measured_us > 0
    assert data["summary"] == study.summarize(recorded.points)
    assert (out / "s.png").read_bytes().startswith(PNG_MAGIC)
    assert "| o_proj |" in (out / "s.md").read_text()
    assert "planner's choice within 10%" in output


def test_every_timed_kernel_matches_the_reference(tiny):
    """The unrouted candidates run by index (Build.linear(kernel=)): their results are the reference's."""
    from apex4gen.loader import load

    _, out, _ = tiny
    recorded = study.from_json(json.loads((out / "s.json").read_text()), "s.json")
    gen = torch.Generator(device="cuda").manual_seed(1)
    for build_dir in sorted((out / "builds").iterdir()):
        build = load(build_dir)
        for p in (p for p in recorded.points if build_dir.name.endswith(f"-{p.granularity}")):
            group = 4096 if p.granularity == "channel" else 128
            x = torch.randn(p.m, p.k, device="cuda", dtype=torch.float16, generator=gen)
            wq = ref.quantize_weight(torch.randn(p.n, p.k, device="cuda", dtype=torch.float16, generator=gen) * 0.05,
                                     group)
            entries = {e.name: e for e in build.kernels}
            kernels = [entries[c.kernel] for c in p.candidates]
            packed = build.pack(wq, layouts=tuple(sorted({e.weight_layout for e in kernels})))
            for entry in kernels:
                y = build.linear(x, packed, kernel=entry)
                assert_matches_reference(y, ref.quantize_activation(x, group), wq, None)


def test_a_rerun_compiles_nothing(tiny):
    spec, out, _ = tiny
    result = CliRunner().invoke(cli, [*_args(spec, out), "--force"])
    assert result.exit_code == 0, result.output
    assert result.output.count("up to date") == 2, result.output
