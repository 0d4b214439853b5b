"""`apex4gen study` without a GPU: plans and candidates, builds with unrouted kernels, summaries, the plot from a
recorded JSON, one-line errors. The measurement itself: tests/test_study_gpu.py."""
from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from _helpers import needs_nvcc
from apex4gen import build as build_stage
from apex4gen import specs, study, studyplot
from apex4gen.cli import cli
from apex4gen.costmodel import DEFAULT_CONSTANTS, fp16_time
from apex4gen.errors import BuildError, SpecError
from apex4gen.granularity import CHANNEL, G128, GRANULARITIES
from apex4gen.kernels.config import KernelConfig
from apex4gen.kernels.families import configs_by_name

REPO = Path(__file__).resolve().parents[1]
RECORDED = sorted(REPO.glob("bench/results/*/study.json"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def h100():
    return specs.load_gpu("h100-sxm")


@pytest.fixture(scope="module")
def setup_70b(h100, tmp_path_factory):
    return study.prepare(h100, specs.load_model("llama2-70b"), tmp_path_factory.mktemp("study"))


# ---------------------------------------------------------------------------------------------- plans, candidates


def test_forced_plans_put_every_layer_at_the_granularity(h100):
    plan = study.forced_plan(h100, specs.load_model("llama2-70b"), CHANNEL)
    assert {lp.granularity for lp in plan.layers} == {CHANNEL}


def test_candidates_are_the_legal_set_the_planner_ranked(setup_70b):
    """Each bucket's rationale says how many legal configs the planner ranked: the study times that many (under
    the cap), the planner's choice among them."""
    for c in setup_70b.cases:
        build = next(b for b in setup_70b.builds if b.granularity == c.granularity)
        bucket = build.plan.gemm_for(c.gemm).bucket_for(c.m)
        ranked = int(re.match(r"fastest of (\d+) legal configs", bucket.rationale).group(1))
        assert len(c.candidates) == min(ranked, setup_70b.max_candidates)
        assert c.chosen == bucket.kernel and c.chosen in c.candidates


def test_the_cap_keeps_the_best_predicted_and_the_planners_choice(h100, tmp_path):
    capped = study.prepare(h100, specs.load_model("llama2-70b"), tmp_path, (CHANNEL,), (64,), ("gate_up_proj",), 2)
    (case,) = capped.cases
    assert len(case.candidates) == 2 and case.chosen in case.candidates


def test_h100_llama2_70b_study_size(setup_70b):
    """The budget of one device command: every granularity, 128 points, one compile wave on 16 cores."""
    assert [g.name for g in setup_70b.granularities] == [g.name for g in GRANULARITIES]
    assert len(setup_70b.cases) == 4 * (2 * 8 + 4 * 4)  # g128 and channel at every M, the decode-only ones at M <= 64
    assert setup_70b.distinct_kernels() <= 16
    assert study.expected_seconds(setup_70b) < 120
    unrouted = {b.granularity: b.extra_kernels for b in setup_70b.builds}
    assert all(not extra for g, extra in unrouted.items() if g != CHANNEL) and unrouted[CHANNEL]
    assert ("o_proj", "g64", 256) in setup_70b.unserved


def test_timing_shrinks_with_the_predicted_time():
    assert study.timing_for(10.0) == (20, 15)
    assert study.timing_for(250.0) == (20, 15)
    assert study.timing_for(2000.0) == (2, 7)
    assert study.timing_for(20000.0) == (2, 7)


# ---------------------------------------------------------------------------------------------- builds


def test_extra_kernels_are_rendered_into_the_build_without_a_route(setup_70b, h100):
    b = next(b for b in setup_70b.builds if b.granularity == CHANNEL)
    result = build_stage.build(b.plan, h100, b.build_dir, emit_only=True, allow_partial=True,
                               extra_kernels=b.extra_kernels)
    names = {cfg.procedural_name() for cfg in b.kernels}
    assert set(result.kernels) == names
    dispatch = (b.build_dir / "src" / "dispatch.cu").read_text()
    for cfg in b.extra_kernels:
        assert (b.build_dir / "src" / f"{cfg.procedural_name()}.cu").is_file()
        assert f'{{"{cfg.procedural_name()}"' in dispatch
    routed = {r.kernel for r in build_stage.routes_of(b.plan, sorted(b.kernels))}
    extra_index = [i for i, cfg in enumerate(sorted(b.kernels)) if cfg in b.extra_kernels]
    assert extra_index and not routed & set(extra_index)


def test_an_illegal_extra_kernel_is_refused(setup_70b, h100, tmp_path):
    b = setup_70b.builds[0]
    sm80 = KernelConfig("sm80_group", "sm_80", "int4", G128, 64, 128, 128, 2, 2, 3, 1, "f16")
    with pytest.raises(BuildError, match="cannot run on h100-sxm"):
        build_stage.build(b.plan, h100, tmp_path / "b", emit_only=True, allow_partial=True, extra_kernels=(sm80,))


def test_every_study_kernel_renders(setup_70b, h100):
    from apex4gen.emit import render_kernel
    for cfg in {cfg for b in setup_70b.builds for cfg in b.kernels}:
        assert f"{cfg.procedural_name()}_workspace" in render_kernel(cfg)


@needs_nvcc
@pytest.mark.nvcc
@pytest.mark.slow
def test_an_unrouted_study_kernel_compiles_with_its_builds_command(setup_70b, h100):
    """The one sm_90a compile: a candidate only the study builds, with the build's own nvcc command."""
    b = next(b for b in setup_70b.builds if b.granularity == CHANNEL)
    build_stage.build(b.plan, h100, b.build_dir, emit_only=True, allow_partial=True, extra_kernels=b.extra_kernels)
    cfg = next(c for c in b.extra_kernels if c.scheduler == "streamk")
    unit = next(u for u in build_stage.compile_units(b.build_dir, list(b.kernels), "sm_90a")
                if u.label == cfg.procedural_name())
    (b.build_dir / "obj").mkdir(exist_ok=True)
    done = subprocess.run(unit.command, cwd=b.build_dir, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (b.build_dir / unit.obj).stat().st_size > 0


# ---------------------------------------------------------------------------------------------- summaries


def _kt(kernel, measured, predicted, bound):
    return {"kernel": kernel, "measured_us": measured, "predicted_us": predicted, "bound": bound}


def _point(gemm, gran, m, kernel, fp16, candidates):
    chosen = next(c for c in candidates if c["kernel"] == kernel)
    return {"gemm": gemm, "n": 8192, "k": 8192, "m": m, "granularity": gran, "kernel": kernel,
            "measured_us": chosen["measured_us"], "predicted_us": chosen["predicted_us"],
            "fp16_measured_us": fp16[0], "fp16_predicted_us": fp16[1], "fp16_bound": fp16[2],
            "candidates": candidates}


HAND_MADE = {
    "format": study.FORMAT,
    "meta": {"model": "hand-made", "device": "none"},
    "points": [
        _point("a", "g128", 1, "k1", (30, 33, "memory"), [_kt("k1", 10, 12, "memory"), _kt("k2", 9, 15, "memory")]),
        _point("a", "g128", 4096, "k3", (200, 180, "tensor"),
               [_kt("k3", 100, 70, "tensor"), _kt("k4", 105, 90, "tensor")]),
        _point("b", "channel", 1, "k5", (40, 60, "memory"), [_kt("k5", 20, 24, "memory")]),
        _point("b", "channel", 4096, "k6", (100, 100, "tensor"),
               [_kt("k6", 50, 50, "dequant"), _kt("k7", 46, 60, "tensor")]),
    ],
}


def _gstd(ratios):
    logs = [math.log(r) for r in ratios]
    mean = sum(logs) / len(logs)
    return round(math.exp(math.sqrt(sum((v - mean) ** 2 for v in logs) / len(logs))) - 1, 4)


def test_summaries_of_a_hand_made_study():
    s = study.summarize(study.from_json(HAND_MADE, "hand-made").points)
    pred = s["prediction"]
    # 12 vs 10 and 24 vs 20 (+20%) and 50 vs 50 are within 25%; 70 vs 100 (-30%) is not
    assert (pred["points"], pred["within"], pred["share"], pred["met"]) == (4, 3, 0.75, False)
    # k2 15 vs 9, k3 70 vs 100 and k7 60 vs 46 are off by more than 25%
    assert pred["all_candidates"] == {"runs": 7, "within": 4, "share": 0.5714}
    assert pred["fp16"] == {"points": 4, "within": 3, "share": 0.75}  # 60 vs 40
    assert [(w["gemm"], w["m"], w["ratio"]) for w in pred["worst"]] == [("a", 4096, 0.7), ("a", 1, 1.2),
                                                                       ("b", 1, 1.2), ("b", 4096, 1.0)]
    choice = s["planner"]
    # a@1: 10 vs 9 (1.111, out); a@4096: the fastest; b@4096: 50 vs 46 (1.087, in); b@1: one candidate
    assert (choice["points"], choice["within"], choice["share"], choice["single_candidate"], choice["met"]) == \
        (3, 2, 0.6667, 1, False)
    assert [(w["gemm"], w["m"], w["ratio"], w["fastest"]) for w in choice["worst"]] == \
        [("a", 1, 1.1111, "k2"), ("b", 4096, 1.087, "k7"), ("a", 4096, 1.0, "k3")]
    regimes = {r["regime"]: r for r in s["regimes"]}
    assert list(regimes) == ["W4A4 dequant-bound", "W4A4 memory-bound", "W4A4 tensor-bound", "FP16 memory-bound",
                             "FP16 tensor-bound"]
    assert regimes["W4A4 dequant-bound"]["geomean_ratio"] == 1.0 and regimes["W4A4 dequant-bound"]["spread"] == 0.0
    memory = regimes["W4A4 memory-bound"]
    assert (memory["runs"], memory["within"], memory["geomean_ratio"]) == (3, 2, round(2.4 ** (1 / 3), 4))
    assert memory["spread"] == _gstd([1.2, 15 / 9, 1.2])
    tensor = regimes["W4A4 tensor-bound"]
    assert tensor["geomean_ratio"] == round((0.7 * 90 / 105 * 60 / 46) ** (1 / 3), 4)
    assert regimes["FP16 memory-bound"]["geomean_ratio"] == round(math.sqrt(1.1 * 1.5), 4)
    assert regimes["FP16 tensor-bound"]["share"] == 1.0
    assert "fp16_tensor_efficiency" in regimes["FP16 tensor-bound"]["constants"]


def test_summary_lines_say_met_and_not_met():
    lines = study.summary_lines(study.summarize(study.from_json(HAND_MADE, "hand-made").points))
    assert "3 of 4 points (75%; target >= 80%: NOT met)" in lines[0]
    assert "2 of 3 points with a choice (67%; target >= 90%: NOT met); 1 points had one candidate" in lines[1]


def test_json_round_trip_keeps_every_point():
    result = study.from_json(HAND_MADE, "hand-made")
    again = study.from_json(json.loads(json.dumps(study.to_json(result))), "again")
    assert again.points == result.points


def test_a_json_that_is_not_a_study_is_refused():
    with pytest.raises(study.SpecError, match="not an apex4gen study JSON"):
        study.from_json({"points": []}, "x.json")
    broken = json.loads(json.dumps(HAND_MADE))
    broken["points"][0]["kernel"] = "absent"
    with pytest.raises(study.SpecError, match="a point is malformed"):
        study.from_json(broken, "x.json")


# ---------------------------------------------------------------------------------------------- plot


def synthetic_study(setup: study.Setup) -> dict:
    """A study JSON made from the cost model: measured = predicted (x 1.1 for the non-chosen candidates)."""
    points = []
    for c in setup.cases:
        fp16 = fp16_time(setup.gpu, c.m, c.n, c.k, setup.constants)
        times = []
        for cfg in c.candidates:
            est = study.predict(setup.gpu, setup.constants, c.m, c.n, c.k, cfg)
            times.append(study.KernelTime(cfg.procedural_name(), est.us * (1.0 if cfg == c.chosen else 1.1),
                                          est.us, est.bound))
        chosen = next(t for t in times if t.kernel == c.chosen.procedural_name())
        points.append(study.StudyPoint(c.gemm, c.n, c.k, c.m, c.granularity.name, chosen.kernel, chosen.measured_us,
                                       chosen.predicted_us, fp16.us, fp16.us, fp16.bound, tuple(times)))
    meta = {"model": setup.model.name, "device": "cost model", "gpu": setup.gpu.name}
    return study.to_json(study.StudyResult(meta, tuple(points), setup.unserved))


def test_plot_and_table_from_a_recorded_json(setup_70b, tmp_path):
    recorded = tmp_path / "study.json"
    recorded.write_text(json.dumps(synthetic_study(setup_70b)))
    png, md = tmp_path / "study.png", tmp_path / "study.md"
    result = CliRunner().invoke(cli, ["study", "--from-json", str(recorded), "--plot", str(png), "--markdown", str(md)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 20_000
    assert "128 of 128 points (100%; target >= 80%: met)" in result.output
    assert "64 of 64 points with a choice (100%" in result.output
    text = md.read_text()
    assert text.count("\n| gate_up_proj |") == 32 and "choice/fastest" in text


@pytest.mark.parametrize("recorded", RECORDED, ids=lambda p: p.parent.name)
def test_recorded_study_replots(recorded, tmp_path):
    result = study.from_json(json.loads(recorded.read_text()), str(recorded))
    assert result.points
    assert studyplot.render_png(result.points, result.meta).startswith(PNG_MAGIC)


@pytest.mark.parametrize("recorded", RECORDED, ids=lambda p: p.parent.name)
def test_a_recorded_study_is_repredicted_by_this_cost_model(recorded):
    """Every candidate and FP16 predicted again from its kernel's configuration; the measurements as recorded."""
    result = study.from_json(json.loads(recorded.read_text()), str(recorded))
    gpu = specs.load_gpu(result.meta["gpu"])
    again = study.repredict(result, gpu)
    configs = configs_by_name(gpu.kernel_arch, {p.granularity for p in result.points})
    for old, new in zip(result.points, again.points):
        assert [t.measured_us for t in new.candidates] == [t.measured_us for t in old.candidates]
        assert new.fp16_predicted_us == fp16_time(gpu, new.m, new.n, new.k).us
        for t in new.candidates:
            assert t.predicted_us == study.predict(gpu, DEFAULT_CONSTANTS, new.m, new.n, new.k, configs[t.kernel]).us
        assert new.predicted_us == new.chosen.predicted_us
    assert again.meta["cost_constants"] == DEFAULT_CONSTANTS.to_dict() and again.meta["time"] == result.meta["time"]
    assert "Predictions re-made by apex4gen" in study.markdown(again)


def test_repredicting_a_kernel_no_family_offers_is_one_clear_error(tmp_path):
    data = json.loads(RECORDED[0].read_text())
    data["points"][0]["candidates"][0]["kernel"] = data["points"][0]["kernel"] = "apex4gen_sm90_gone_kernel"
    with pytest.raises(SpecError, match="apex4gen_sm90_gone_kernel .* is no configuration of this version's kernel"):
        study.repredict(study.from_json(data, "x.json"), specs.load_gpu(data["meta"]["gpu"]))
    recorded = tmp_path / "recorded.json"
    recorded.write_text(json.dumps(data))
    _one_line_error(["--from-json", str(recorded), "--repredict"], "is no configuration of this version's kernel")
    _one_line_error(["--gpu", "h100-sxm", "--model", "llama2-70b", "--repredict"], "give --from-json FILE")


# ---------------------------------------------------------------------------------------------- CLI errors


def _one_line_error(args, text):
    result = CliRunner().invoke(cli, ["study", *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("apex4gen: error:") and text in lines[0], result.output


def test_unknown_gpu_and_model():
    _one_line_error(["--gpu", "no-such-gpu", "--model", "llama2-70b"], "no-such-gpu")
    _one_line_error(["--gpu", "h100-sxm", "--model", "no-such-model"], "no-such-model")


def test_granularity_that_does_not_divide_k_or_is_unknown():
    _one_line_error(["--gpu", "h100-sxm", "--model", "smollm2-135m", "--granularities", "g128"],
                    "g128 does not divide K=576")
    _one_line_error(["--gpu", "h100-sxm", "--model", "llama2-70b", "--granularities", "g96"], "unknown g96")
    _one_line_error(["--gpu", "h100-sxm", "--model", "llama2-70b", "--gemms", "lm_head"], "no GEMM lm_head")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_no_cuda():
    _one_line_error(["--gpu", "h100-sxm", "--model", "llama2-70b"], "no CUDA GPU here")


def test_existing_output_is_kept_without_force(tmp_path):
    existing = tmp_path / "study.json"
    existing.write_text("keep")
    _one_line_error(["--gpu", "h100-sxm", "--model", "llama2-70b", "--json", str(existing)], "exists; pass --force")
    assert existing.read_text() == "keep"
    png = tmp_path / "study.png"
    png.write_text("keep")
    recorded = tmp_path / "recorded.json"
    recorded.write_text(json.dumps(HAND_MADE))
    _one_line_error(["--from-json", str(recorded), "--plot", str(png)], "exists; pass --force")
    assert png.read_text() == "keep"


def test_from_json_refuses_measurement_options_and_other_files(tmp_path):
    recorded = tmp_path / "recorded.json"
    recorded.write_text(json.dumps(HAND_MADE))
    _one_line_error(["--from-json", str(recorded), "--gpu", "h100-sxm"], "drop --gpu")
    other = tmp_path / "other.json"
    other.write_text("{}")
    _one_line_error(["--from-json", str(other)], "not an apex4gen study JSON")
    _one_line_error(["--model", "llama2-70b"], "--gpu and --model are required")
