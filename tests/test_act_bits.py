"""Per-layer activation precision (4 or 8 bits): the contract's 8-bit quantizer, the plan's act_bits, legality
(no plan asks a GPU for a precision none of its kernel families takes), the cost model's price of 8 bits per arch
and the budget that gives 8 bits to the kinds whose measured sensitivity needs them."""
from __future__ import annotations

import pytest
import torch
import yaml

from apex4gen import reference as ref
from apex4gen.budget import parse_budget
from apex4gen.costmodel import w4a4_bytes, w4a4_time
from apex4gen.errors import SpecError
from apex4gen.granularity import CHANNEL, G128, Granularity
from apex4gen.kernels import FAMILIES
from apex4gen.kernels.config import KernelConfig
from apex4gen.kernels.families import act_bits_served
from apex4gen.kernels.legality import legal_configs, violations
from apex4gen.plan import PLAN_VERSION, Plan
from apex4gen.planner import make_plan
from apex4gen.specs import load_gpu

G64 = Granularity(64)


# ---------------------------------------------------------------------------------------------- numerics

def test_8bit_values_by_hand():
    # absmax 127 * 0.5: s = 0.5; 1.25 / 0.5 = 2.5 rounds half to even (2), -0.75 / 0.5 = -1.5 -> -2
    x = torch.tensor([[63.5, 1.25, -0.75, 0.2, -63.5, 30.0, 0.0, 0.26]])
    q = ref.quantize_activation(x, 8, bits=8)
    assert q.scales.tolist() == [[0.5]]
    assert q.q.tolist() == [[127, 2, -2, 0, -127, 60, 0, 1]]
    four = ref.quantize_activation(x, 8)  # the same row at 4 bits: s = 63.5 / 7
    assert int(four.q.abs().max()) == 7 and four.q.tolist() == [[7, 0, 0, 0, -7, 3, 0, 0]]


def test_8bit_clamps_at_minus_128_and_zero_scale_gives_zero():
    # a hand-made scale below absmax / 127 (what a clipped activation meets): values clamp to -128..127
    s = torch.tensor([[1.0]])
    q = ref._round_clamp(torch.tensor([[-300.0, -128.4, 127.6, 500.0]]), s, *ref.act_range(8))
    assert q.tolist() == [[-128, -128, 127, 127]]
    zero = ref.quantize_activation(torch.zeros(2, 16), 8, bits=8)
    assert torch.equal(zero.q, torch.zeros(2, 16, dtype=torch.int8)) and not zero.scales.any()
    with pytest.raises(ValueError, match="4 or 8-bit"):
        ref.quantize_activation(torch.ones(1, 8), 8, bits=6)


def test_8bit_partials_are_exact_at_the_bound():
    """|P| <= 128 * 8 * group: every activation -128 and weight -8 over a 4096-wide group, summed exactly."""
    k = 4096
    x = ref.QuantizedTensor(torch.full((1, k), -128, dtype=torch.int8), torch.ones(1, 1), k)
    w = ref.QuantizedTensor(torch.full((2, k), -8, dtype=torch.int8), torch.ones(2, 1, dtype=torch.float16), k)
    assert ref.group_partials(x.q, w.q, k).tolist() == [[[1024 * k], [1024 * k]]]


def test_8bit_error_is_smaller(gen=torch.Generator().manual_seed(0)):
    x = torch.randn(16, 256, generator=gen)
    err = {bits: float((ref.dequantize(ref.quantize_activation(x, 64, bits)) - x).abs().max()) for bits in (4, 8)}
    assert err[8] < err[4] / 10


# ---------------------------------------------------------------------------------------------- kernels

def test_families_declare_their_activation_precisions():
    eight = sorted(name for name, f in FAMILIES.items() if 8 in f.act_bits)
    assert eight == ["sm90_decode", "sm90_decode_channel", "sm90_prefill_channel"]
    assert act_bits_served("sm_90a") == (4, 8) and act_bits_served("sm_80") == (4,)
    assert FAMILIES["sm90_prefill_group"].configs("sm_90a", G128, "f16", act_bits=8) == []


def test_legality_refuses_8bit_where_the_family_takes_4():
    h100 = load_gpu("h100-sxm")
    cfg = FAMILIES["sm90_prefill_group"].configs("sm_90a", G128, "f16")[0]
    a8 = KernelConfig(**{**cfg.__dict__, "act_bits": 8})
    assert any("takes 4-bit activations, not 8-bit" in r for r in violations(a8, h100, 8192, 8192))
    assert not violations(cfg, h100, 8192, 8192)
    assert legal_configs(h100, "fp8", G128, 8192, 8192, "f16", act_bits=8) == []
    assert legal_configs(h100, "int8", CHANNEL, 8192, 8192, "f16", act_bits=8)
    assert a8.procedural_name() == cfg.procedural_name().replace("_f16", "_a8_f16")


# ---------------------------------------------------------------------------------------------- cost model

def test_8bit_is_priced_per_arch():
    a100, h100 = load_gpu("a100-80gb"), load_gpu("h100-sxm")
    # sm_80: INT8 mma at half the INT4 rate (compute-bound M) and a byte an activation (memory-bound M)
    four, eight = (w4a4_time(a100, 4096, 8192, 8192, G128, "int4", act_bits=b) for b in (4, 8))
    assert eight.tensor_us == pytest.approx(2 * four.tensor_us)
    assert w4a4_bytes(16, 8192, 8192, G128, "int4", act_bits=8) - w4a4_bytes(16, 8192, 8192, G128, "int4") == \
        16 * 8192 * 0.5
    # sm_90: the int8/fp8 kernels read a byte (or raw 16 bits) already: 8 bits are free
    for m, gran in ((1, G128), (16, CHANNEL), (4096, CHANNEL)):
        legal = legal_configs(h100, "int8", gran, 8192, 8192, "f16", m=m)
        cfg = legal[0]
        a8 = KernelConfig(**{**cfg.__dict__, "act_bits": 8})
        assert w4a4_time(h100, m, 8192, 8192, gran, "int8", a8).us == w4a4_time(h100, m, 8192, 8192, gran, "int8",
                                                                                  cfg).us


# ---------------------------------------------------------------------------------------------- plan and budget

def _sensitivity() -> dict:
    """qkv_proj: per-channel costs 0.02 at 4 bits, 8 bits buy it back and more (-0.03); at g128 8 bits would be
    better still (-0.05), but Hopper has no 8-bit g128 prefill kernel. gate_up_proj: a little of both."""
    return {"apex4gen_sensitivity": 2, "model": "llama2-7b", "metric": "test",
            "layers": {"qkv_proj": {"channel": 0.02, "act8": {"g128": -0.05, "channel": -0.03}},
                       "gate_up_proj": {"channel": 0.01, "act8": {"channel": -0.002}}}}


def _budget(limit: float):
    return parse_budget({"sensitivity": _sensitivity(), "max_total_increase": limit}, "budget.yaml")


def _choices(plan) -> dict[str, tuple[str, int]]:
    return {lp.name: (lp.granularity.name, lp.act_bits) for lp in plan.layers}


def test_the_limit_decides_which_kinds_get_8_bits_and_4_bits_win_ties():
    # per-channel is the cheaper granularity for qkv and gate_up on the H100 (g128 promotion); 8 bits cost nothing
    # there, so at equal cost the plan with fewer 8-bit kinds wins
    assert _choices(make_plan("h100-sxm", "llama2-7b", budget=_budget(0.03))) == {
        "qkv_proj": ("channel", 4), "o_proj": ("g128", 4), "gate_up_proj": ("channel", 4), "down_proj": ("g128", 4)}
    # within 0: qkv's per-channel error has to be bought back with 8 bits (the most sensitive kind), gate_up's not
    tight = make_plan("h100-sxm", "llama2-7b", budget=_budget(0.0))
    assert _choices(tight)["qkv_proj"] == ("channel", 8) and _choices(tight)["gate_up_proj"] == ("channel", 4)
    assert "8-bit activations: 1.000x the time of 4-bit" in tight.layer("qkv_proj").rationale
    # more than qkv alone gives: both
    both = _choices(make_plan("h100-sxm", "llama2-7b", budget=_budget(-0.031)))
    assert both["qkv_proj"] == ("channel", 8) and both["gate_up_proj"] == ("channel", 8)


def test_8bit_layers_run_8bit_kernels_and_no_option_lacking_kernels_is_picked():
    plan = make_plan("h100-sxm", "llama2-7b", budget=_budget(-0.1))  # unreachable: the least inaccurate plan
    qkv = plan.layer("qkv_proj")
    # g128 at 8 bits (-0.05) would be more accurate, but its prefill buckets have no kernel on Hopper
    assert (qkv.granularity, qkv.act_bits) == (CHANNEL, 8)
    gemm = plan.gemm_for(qkv)
    assert gemm.act_bits == 8 and all(b.kernel is not None and b.kernel.act_bits == 8 for b in gemm.buckets)
    assert {b.kernel.family for b in gemm.buckets} == {"sm90_decode_channel", "sm90_prefill_channel"}
    assert not plan.unserved()


def test_no_8_bits_where_no_family_takes_them():
    plan = make_plan("a100-80gb", "llama2-7b", budget=_budget(-0.1))
    assert {lp.act_bits for lp in plan.layers} == {4}
    assert all(b.kernel is None or b.kernel.act_bits == 4 for g in plan.gemms for b in g.buckets)


def test_plan_round_trip_with_act_bits_and_older_formats_asked_to_replan(tmp_path):
    plan = make_plan("h100-sxm", "llama2-7b", budget=_budget(0.0))
    path = plan.save(tmp_path / "p.yaml")
    assert Plan.load(path) == plan
    data = yaml.safe_load(path.read_text())
    assert data["version"] == PLAN_VERSION and [lp["act_bits"] for lp in data["layers"]] == [8, 4, 4, 4]
    assert [g["act_bits"] for g in data["gemms"] if "qkv_proj" in g["layers"]] == [8]
    (tmp_path / "v3.yaml").write_text(yaml.safe_dump({**data, "version": 3}, sort_keys=False))
    with pytest.raises(SpecError, match=f"'version': plan format 3 is not {PLAN_VERSION}; re-run `apex4gen plan`"):
        Plan.load(tmp_path / "v3.yaml")
    data["layers"][0]["act_bits"] = 6
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(SpecError, match="'layers\\[0\\].act_bits': 6 is not one of 4, 8"):
        Plan.load(tmp_path / "bad.yaml")


def test_budget_refuses_a_negative_limit_without_8bit_evidence():
    sens = _sensitivity()
    for entry in sens["layers"].values():
        entry.pop("act8")
    with pytest.raises(SpecError, match="no act8 entries"):
        parse_budget({"sensitivity": sens, "max_total_increase": -0.01}, "budget.yaml")
    sens["layers"]["qkv_proj"]["channel"] = -0.01
    with pytest.raises(SpecError, match="only act8 entries may be negative"):
        parse_budget({"sensitivity": sens, "max_total_increase": 0.01}, "budget.yaml")


def test_version_1_sensitivity_still_reads():
    sens = {"apex4gen_sensitivity": 1, "model": "llama2-7b", "metric": "m", "layers": {"qkv_proj": {"channel": 0.1}}}
    budget = parse_budget({"sensitivity": sens, "max_total_increase": 0.2}, "budget.yaml")
    assert budget.act_bits("qkv_proj", G128) == (4,) and budget.sensitivity.act8 == ()


def test_shipped_w4a8_budget_plans_smollm2_on_hopper_only():
    h100 = make_plan("h100-sxm", "smollm2-135m", budget="specs/budgets/budget-smollm2-w4a8.yaml")
    pure = make_plan("h100-sxm", "smollm2-135m")
    assert _choices(h100) == {"qkv_proj": ("g64", 8), "o_proj": ("g64", 8), "gate_up_proj": ("g64", 8),
                              "down_proj": ("channel", 8)}
    assert h100.totals.speedup >= pure.totals.speedup / 1.05  # predicted time within 5% of pure W4A4's
    a100 = make_plan("a100-80gb", "smollm2-135m", budget="specs/budgets/budget-smollm2-w4a8.yaml")
    assert {lp.act_bits for lp in a100.layers} == {4}


def test_a_budget_may_fix_8_bits_per_kind_where_a_family_takes_them():
    budget = "specs/budgets/budget-act8-kernels.yaml"
    h100 = make_plan("h100-sxm", "llama3-8b", budget=budget)
    assert _choices(h100) == {"qkv_proj": ("channel", 8), "o_proj": ("g128", 8), "gate_up_proj": ("channel", 8),
                              "down_proj": ("g128", 4)}
    families = {g.layers[0]: {b.kernel.family for b in g.buckets if b.kernel} for g in h100.gemms}
    assert families["qkv_proj"] == {"sm90_decode_channel", "sm90_prefill_channel"}
    assert families["o_proj"] == {"sm90_decode"}  # an 8-bit g128 layer: decode kernels only on Hopper
    assert [m for g, ms in h100.unserved() for m in ms] and "4-bit only" in h100.unserved_summary()
    a100 = make_plan("a100-80gb", "llama3-8b", budget=budget)
    assert {lp.act_bits for lp in a100.layers} == {4}
    assert "no kernel family for sm_80 takes them" in a100.layer("o_proj").rationale
    with pytest.raises(SpecError, match="'act_bits.qkv_proj': 6 is not one of 4, 8"):
        parse_budget({"act_bits": {"qkv_proj": 6}}, "budget.yaml")
