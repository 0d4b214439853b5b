"""The planner and the plan file: APEX4's acceptance criteria, determinism, kernels from the legal set, budgets."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from apex4gen.accuracy.sensitivity import load_sensitivity
from apex4gen.budget import DEFAULT_BUDGET, load_budget
from apex4gen.errors import SpecError
from apex4gen.granularity import Granularity
from apex4gen.kernels.families import FAMILIES
from apex4gen.kernels.legality import legal_configs, violations
from apex4gen.plan import BUCKET_BOUNDS, PLAN_VERSION, Plan
from apex4gen.planner import make_plan
from apex4gen.specs import load_gpu

from _helpers import TEST_FAMILIES, families, make_family, write_yaml

PREFILL = "prefill-heavy"


@pytest.fixture(params=["registered", "none", "test"])
def registry(request):
    """Run against whatever families the kernel modules register, against none, and against test families."""
    if request.param == "registered":
        yield request.param
        return
    with families(*(TEST_FAMILIES if request.param == "test" else ())):
        yield request.param


@pytest.mark.parametrize("gpu", ["a40", "rtx3090", "l40s"])
def test_low_rho_gpus_keep_g128_everywhere_on_prefill(registry, gpu):
    plan = make_plan(gpu, "llama2-70b", PREFILL)
    assert [lp.granularity.name for lp in plan.layers] == ["g128"] * 4
    assert {lp.path for lp in plan.layers} == {"int4"}


def test_a100_coarsens_some_layers_on_prefill(registry):
    plan = make_plan("a100-80gb", "llama2-70b", PREFILL)
    assert any(lp.granularity.name != "g128" for lp in plan.layers)
    assert all(lp.granularity in DEFAULT_BUDGET.allowed(lp.name, lp.k) for lp in plan.layers)


def test_h100_is_not_planned_on_native_int4(registry):
    plan = make_plan("h100-sxm", "llama2-70b", PREFILL)
    assert {lp.path for lp in plan.layers} <= {"int8", "fp8"}
    assert all("no native INT4" in lp.rationale for lp in plan.layers)


def test_a100_plan_predicts_at_least_1_2x_end_to_end(registry):
    """With kernels; with none registered nothing is served, so nothing is faster than FP16."""
    for workload in ("default", PREFILL):
        speedup = make_plan("a100-80gb", "llama2-70b", workload).totals.speedup
        assert speedup == 1.0 if registry == "none" else speedup >= 1.2


def test_same_inputs_give_byte_identical_plans(registry, tmp_path):
    first = make_plan("a100-80gb", "llama2-70b").save(tmp_path / "a.yaml").read_bytes()
    second = make_plan("a100-80gb", "llama2-70b").save(tmp_path / "b.yaml").read_bytes()
    assert first == second
    assert make_plan("l40s", "qwen2.5-7b", "decode").to_yaml() == make_plan("l40s", "qwen2.5-7b", "decode").to_yaml()


def test_a_plan_loads_back_equal(registry, tmp_path):
    for gpu in ("a40", "h100-sxm"):
        plan = make_plan(gpu, "llama3-8b", fused=False)
        assert Plan.load(plan.save(tmp_path / f"{gpu}.yaml")) == plan


def test_plan_structure_for_the_build_stage(registry):
    plan = make_plan("a40", "llama2-70b")
    assert (plan.version, plan.out_dtype, plan.gpu, plan.model) == (PLAN_VERSION, "f16", "a40", "llama2-70b")
    assert plan.gpu_spec_sha256 == load_gpu("a40").sha256()
    assert make_plan("a40", "llama3-8b").out_dtype == "bf16"
    for lp in plan.layers:
        gemm = plan.gemm_for(lp)
        assert (gemm.n, gemm.k, gemm.granularity, gemm.path) == (lp.n, lp.k, lp.granularity, lp.path)
        assert lp.name in gemm.layers and lp.count == 80
        assert [b.m_max for b in gemm.buckets] == list(BUCKET_BOUNDS)
        assert len(lp.predictions) == len(plan.workload.points)
    assert plan.kernels() == tuple(sorted(set(plan.kernels())))


def test_buckets_take_the_fastest_legal_kernel(registry):
    for gpu_name in ("a100-80gb", "h100-sxm", "rtx4090"):
        plan = make_plan(gpu_name, "llama2-70b")
        gpu = load_gpu(gpu_name)
        for gemm in plan.gemms:
            for bucket in gemm.buckets:
                legal = [c for path in gpu.compute_paths  # a bucket may use any path the GPU has
                         for c in legal_configs(gpu, path, gemm.granularity, gemm.n, gemm.k, gemm.out_dtype,
                                                m=bucket.m_max or 2**31 - 1)]
                if not legal:
                    assert bucket.kernel is None and "kernel: null" in bucket.rationale
                    continue
                assert bucket.kernel in legal and not violations(bucket.kernel, gpu, gemm.n, gemm.k)
                assert f"of {len(legal)} legal configs" in bucket.rationale


def test_no_registered_family_gives_null_kernels_not_a_crash():
    with families():
        plan = make_plan("a40", "llama2-7b")
    buckets = [b for g in plan.gemms for b in g.buckets]
    assert buckets and all(b.kernel is None for b in buckets) and plan.kernels() == ()
    assert all("no group-wise int4 kernel family is registered for sm_86" in b.rationale for b in buckets)


def test_decode_only_families_serve_only_small_buckets():
    with families(*TEST_FAMILIES):
        plan = make_plan("h100-sxm", "llama2-70b", "decode")
        max_m = FAMILIES["t_fp8_decode"].max_m
    for gemm in plan.gemms:
        for bucket in gemm.buckets:
            if bucket.kernel is not None and bucket.kernel.family == "t_fp8_decode":
                assert bucket.m_max is not None and bucket.m_max <= max_m
        assert gemm.buckets[-1].kernel.family != "t_fp8_decode"


def test_granularity_falls_back_to_a_finer_group_when_g128_does_not_divide_k(registry, tmp_path):
    assert DEFAULT_BUDGET.allowed("qkv_proj", 576) == (Granularity(64), Granularity(None))
    no_coarsening = write_yaml(tmp_path / "b.yaml", {"coarsest": {"default": "g128"}})
    plan = make_plan("a40", "smollm2-135m", None, no_coarsening)
    assert plan.layer("qkv_proj").k == 576 and plan.layer("qkv_proj").granularity.name == "g64"
    assert plan.layer("down_proj").granularity.name == "g128"


def test_gemms_reading_one_activation_share_granularity_and_one_kernel_serves_equal_problems(registry):
    plan = make_plan("a100-80gb", "llama2-7b", "decode", fused=False)
    qkv = [plan.layer(n) for n in ("q_proj", "k_proj", "v_proj")]
    assert len({(lp.granularity, lp.path) for lp in qkv}) == 1
    assert plan.layer("gate_proj").granularity == plan.layer("up_proj").granularity
    shared = plan.gemm_for("q_proj")
    assert {"q_proj", "k_proj", "v_proj"} <= set(shared.layers)


# ---------------------------------------------------------------------------------------------- budgets


def test_a_budget_can_forbid_coarsening(tmp_path):
    budget = write_yaml(tmp_path / "b.yaml", {"coarsest": {"default": "g128"}})
    plan = make_plan("a100-80gb", "llama2-70b", PREFILL, budget)
    assert [lp.granularity.name for lp in plan.layers] == ["g128"] * 4
    assert plan.budget == load_budget(budget)


def test_default_budget_is_documented_and_per_kind():
    assert [g.name for g in DEFAULT_BUDGET.allowed("down_proj", 28672)] == ["g128", "g256", "g512"]
    assert DEFAULT_BUDGET.allowed("qkv_proj", 8192)[-1].is_channel
    assert DEFAULT_BUDGET.min_gain == 0.05


def _sensitivity(tmp_path, model="llama2-70b", layers=None):
    return write_yaml(tmp_path / "sens.yaml", {
        "apex4gen_sensitivity": 1, "model": model, "metric": "ppl increase",
        "layers": layers if layers is not None else {"qkv_proj": {"g256": 0.1, "g512": 0.2, "channel": 0.5},
                                                      "gate_up_proj": {"g256": 0.1, "g512": 0.2},
                                                      "o_proj": {"g256": 0.1, "g512": 0.3},
                                                      "down_proj": {"g256": 0.4, "g512": 0.9}}})


def test_sensitivity_file_loads_and_bounds_coarsening(tmp_path):
    sens = load_sensitivity(_sensitivity(tmp_path))
    assert sens.increase("qkv_proj", Granularity(512)) == 0.2 and sens.increase("down_proj", Granularity(None)) is None
    budget = write_yaml(tmp_path / "b.yaml", {"sensitivity": "sens.yaml", "max_total_increase": 0.6})
    plan = make_plan("a100-80gb", "llama2-70b", PREFILL, budget)
    chosen = {lp.name: lp.granularity.name for lp in plan.layers}
    total = sum(sens.increase(name, Granularity.parse(g)) or 0.0 for name, g in chosen.items() if g != "g128")
    assert total <= 0.6 + 1e-9 and any(g != "g128" for g in chosen.values())
    assert chosen["down_proj"] != "g512"                     # 0.9 alone exceeds the budget
    assert all("ppl increase" in lp.rationale for lp in plan.layers)
    assert Plan.load(plan.save(tmp_path / "p.yaml")) == plan   # sensitivities travel inline in the plan


def test_zero_sensitivity_budget_keeps_the_reference(tmp_path):
    _sensitivity(tmp_path)
    budget = write_yaml(tmp_path / "b.yaml", {"sensitivity": "sens.yaml", "max_total_increase": 0})
    assert {lp.granularity.name for lp in make_plan("a100-80gb", "llama2-70b", PREFILL, budget).layers} == {"g128"}


def test_kinds_missing_from_the_sensitivity_file_stay_at_their_reference(tmp_path):
    _sensitivity(tmp_path, layers={"qkv_proj": {"g512": 0.0}})
    budget = write_yaml(tmp_path / "b.yaml", {"sensitivity": "sens.yaml", "max_total_increase": 1})
    chosen = {lp.name: lp.granularity.name for lp in make_plan("a100-80gb", "llama2-70b", PREFILL, budget).layers}
    assert chosen == {"qkv_proj": "g512", "o_proj": "g128", "gate_up_proj": "g128", "down_proj": "g128"}


@pytest.mark.parametrize("content, problem", [
    ({"coarsest": {"down_proj": "g64"}}, "'coarsest.down_proj': g64 is finer than finest g128"),
    ({"coarsest": {"mlp": "g64"}}, "'coarsest.mlp': unknown field"),
    ({"min_gain": 1.5}, "'min_gain': must be in [0, 1)"),
    ({"finest": {"default": "g100"}}, "'finest.default': 'g100' is not one of"),
    ({"sensitivity": "sens.yaml"}, "sensitivity and max_total_increase go together"),
    ({"max_total_increase": 1}, "sensitivity and max_total_increase go together"),
    ({"granularity": "g128"}, "'granularity': unknown field"),
])
def test_bad_budgets_name_file_and_field(tmp_path, content, problem):
    _sensitivity(tmp_path)
    budget = write_yaml(tmp_path / "b.yaml", content)
    with pytest.raises(SpecError) as err:
        make_plan("a40", "llama2-70b", None, budget)
    assert str(budget) in str(err.value) and problem in str(err.value)


def test_bad_sensitivity_files(tmp_path):
    budget = write_yaml(tmp_path / "b.yaml", {"sensitivity": "sens.yaml", "max_total_increase": 1})
    _sensitivity(tmp_path, model="llama2-7b")
    with pytest.raises(SpecError, match="sensitivity file is for model 'llama2-7b', not 'llama2-70b'"):
        make_plan("a40", "llama2-70b", None, budget)
    _sensitivity(tmp_path, layers={"down_proj": {"g256": -1}})
    with pytest.raises(SpecError, match=r"sens.yaml: field 'layers.down_proj.g256': an increase must be >= 0"):
        make_plan("a40", "llama2-70b", None, budget)


# ---------------------------------------------------------------------------------------------- plan files


def _saved(tmp_path):
    return yaml.safe_load(make_plan("a40", "llama2-7b").save(tmp_path / "p.yaml").read_text())


@pytest.mark.parametrize("mutate, problem", [
    (lambda d: d.update(version=1), f"'version': plan format 1 is not {PLAN_VERSION}"),
    (lambda d: d.pop("gemms"), "'gemms': missing"),
    (lambda d: d.update(extra=1), "'extra': unknown field"),
    (lambda d: d["layers"][0].update(granularity="g100"), "'layers[0].granularity'"),
    (lambda d: d["layers"][0].update(group=256), "'layers[0].group': unknown field"),
    (lambda d: d["gemms"][0]["buckets"][0]["kernel"].update(granularity="g0"),
     "'gemms[0].buckets[0].kernel.granularity': unknown granularity 'g0'"),
    (lambda d: d["gemms"][0]["buckets"][-1].update(m_max=4096), "'gemms[0].buckets': the last bucket"),
    (lambda d: d["gemms"][0]["buckets"][0].update(kernel={"family": "x"}),
     "'gemms[0].buckets[0].kernel.family': 'x' is not one of"),
    (lambda d: d["gemms"][0]["buckets"][0]["kernel"].update(tile_k=0), "'gemms[0].buckets[0].kernel.tile_k': must be > 0"),
    (lambda d: d["gemms"][0]["buckets"][0]["kernel"].update(tile_m="16"),
     "'gemms[0].buckets[0].kernel.tile_m': must be an integer"),
    (lambda d: d["gemms"][0]["buckets"][0]["kernel"].update(tiles=3), "'gemms[0].buckets[0].kernel.tiles': unknown"),
    (lambda d: d.update(gemms=d["gemms"][1:]), "'gemms': no GEMM entry serves layer"),
])
def test_bad_plan_files_are_spec_errors(tmp_path, mutate, problem):
    data = _saved(tmp_path)
    mutate(data)
    path = write_yaml(tmp_path / "bad.yaml", data)
    with pytest.raises(SpecError) as err:
        Plan.load(path)
    assert str(path) in str(err.value) and problem in str(err.value)


def test_buckets_may_compute_on_another_path_than_the_layer(tmp_path):
    """Hopper: an int8 decode kernel for small M, an fp8 kernel for the compute-bound buckets."""
    g128 = write_yaml(tmp_path / "b.yaml", {"coarsest": {"default": "g128"}})
    int8_decode = dataclasses.replace(make_family("t_int8_decode", ("sm_90a",), "int8", "group", max_m=64,
                                                  act_format="raw"), m_step=8)
    prefill = make_family("t_fp8", ("sm_90a",), "fp8", "group", act_format="e4m3")
    with families(int8_decode, prefill):
        plan = make_plan("h100-sxm", "llama2-70b", "decode", g128)
    for gemm in plan.gemms:
        assert gemm.buckets[-1].kernel.path == "fp8" == gemm.path
    o_proj = plan.gemm_for("o_proj")
    assert o_proj.buckets[0].kernel.path == "int8"  # at M=1 the runtime split-K decode kernel fills the GPU
    assert all(lp.path == "fp8" for lp in plan.layers)
