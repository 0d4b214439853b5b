"""The cost model: APEX4's direction (ρ decides whether g128 pays), path-dependent dequant, one set of constants."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from apex4gen.costmodel import (DEFAULT_CONSTANTS, CostConstants, fp16_time, speedup, w4a4_bytes, w4a4_time)
from apex4gen.errors import SpecError
from apex4gen.granularity import CHANNEL, G128, Granularity
from apex4gen.kernels.config import KernelConfig
from apex4gen.kernels.families import configs_by_name
from apex4gen.specs import load_gpu

REPO = Path(__file__).resolve().parents[1]
BIG = (8192, 8192, 8192)   # compute-bound M, N, K


def test_compute_bound_g128_speedup_follows_rho():
    assert speedup(load_gpu("rtx3090"), *BIG, G128, "int4") >= 2.0
    assert speedup(load_gpu("a100-80gb"), *BIG, G128, "int4") < 1.0
    assert speedup(load_gpu("a100-80gb"), *BIG, CHANNEL, "int4") > 1.0


def test_dequant_time_scales_with_rho_over_group():
    a100 = load_gpu("a100-80gb")
    g128, g512 = (w4a4_time(a100, *BIG, g, "int4") for g in (G128, Granularity(512)))
    assert g128.bound == "dequant"
    assert g128.dequant_us == pytest.approx(4 * g512.dequant_us)
    a40 = w4a4_time(load_gpu("a40"), *BIG, G128, "int4")
    assert a40.bound == "tensor"
    assert w4a4_time(a100, *BIG, CHANNEL, "int4").dequant_us < g512.dequant_us / 4


def test_fp8_partials_skip_the_convert():
    h100 = load_gpu("h100-sxm")
    int8, fp8 = (w4a4_time(h100, *BIG, G128, p) for p in ("int8", "fp8"))
    assert fp8.dequant_us == pytest.approx(int8.dequant_us * 2 / 3)


def test_decode_is_memory_bound_and_pays_for_4_bit_weights():
    gpu = load_gpu("h100-sxm")
    est = w4a4_time(gpu, 16, 8192, 8192, G128, "fp8")
    assert est.bound == "memory"
    # 4x fewer weight bytes, less what cuBLAS streams faster than the W4A4 kernels (0.94 vs 0.754 of the stream)
    # and the launch both pay: measured 2.4-3.0x at M=16 on the H100 (bench/results/h100/study.md)
    assert 2.5 < fp16_time(gpu, 16, 8192, 8192).us / est.us < 3.3


def test_memory_traffic_counts_scales_activations_and_output():
    base = w4a4_bytes(16, 8192, 8192, G128, "int4")
    weights = 8192 * 8192 / 2 + 8192 * 64 * 2
    acts = 16 * 8192 / 2 + 16 * 64 * 4
    assert base == weights + acts + 16 * 8192 * 2
    assert w4a4_bytes(16, 8192, 8192, CHANNEL, "int4") < base           # per-channel: fewer scales
    assert w4a4_bytes(16, 8192, 8192, G128, "fp8") > base              # activations a byte each


def test_a_kernel_config_adds_tile_and_wave_effects():
    gpu = load_gpu("a100-80gb")
    cfg = KernelConfig("x", "sm_80", "int4", G128, 128, 128, 128, 2, 2, 3, 1, "f16")
    ideal = w4a4_time(gpu, 100, 8192, 8192, G128, "int4")
    tiled = w4a4_time(gpu, 100, 8192, 8192, G128, "int4", cfg)
    assert tiled.tensor_us > ideal.tensor_us     # M=100 padded to 128
    small = dataclasses.replace(cfg, tile_m=16, tile_n=64, warps_m=1)
    big_m = [w4a4_time(gpu, 4096, 8192, 8192, G128, "int4", c).tensor_us for c in (small, cfg)]
    assert big_m[0] > big_m[1]                   # a 16x64 tile reuses operands less than 128x128


def test_a_hybrid_stream_k_kernel_has_whole_waves():
    """qkv at M=256 is 160 tiles of 128x128 on 132 SMs: two waves data-parallel, ~1.2 with stream-K."""
    gpu = load_gpu("h100-sxm")
    cfg = KernelConfig("sm90_prefill_group", "sm_90a", "fp8", G128, 128, 128, 128, 1, 8, 4, 1, "f16", "hybrid")
    streamk = w4a4_time(gpu, 256, 10240, 8192, G128, "fp8", cfg)
    data_parallel = w4a4_time(gpu, 256, 10240, 8192, G128, "fp8", dataclasses.replace(cfg, scheduler="persistent"))
    assert streamk.dequant_us == pytest.approx(data_parallel.dequant_us * 160 / 264)


def _group_cfg(tile_m: int) -> KernelConfig:
    return KernelConfig("sm90_prefill_group", "sm_90a", "fp8", G128, tile_m, 128, 128, 1, 8, 4, 1, "f16", "hybrid")


def test_a_wider_wgmma_token_tile_amortises_the_widening():
    """The widening share of the slots scales with 128 / tile_m: 64 tokens pay it twice, 256 half."""
    gpu, c = load_gpu("h100-sxm"), DEFAULT_CONSTANTS
    dequant = {tm: w4a4_time(gpu, 4096, 8192, 8192, G128, "fp8", _group_cfg(tm)).dequant_us for tm in (64, 128, 256)}
    share = c.arch("sm_90a").widening_share
    assert dequant[64] / dequant[128] == pytest.approx(1 + share)
    assert dequant[256] / dequant[128] == pytest.approx(1 - share / 2)


def test_a_hybrid_grid_under_one_wave_pays_for_splitting_every_tile():
    """At M=256 (H200, 2026-12-06; bench/notes/sm90-prefill.md, "256-token tiles"): 64 tiles of 256 tokens with
    K = 8192 (o) ran slower than 128 tiles of 128 (61.8 against 55.7 us), with K = 28672 (down) faster (159.6
    against 172.5: more K iterations per fixup); gate_up (224 tiles of 256) fills whole waves and takes the
    256-token tile."""
    gpu = load_gpu("h100-sxm")
    times = {(name, tm): w4a4_time(gpu, 256, n, k, G128, "fp8", _group_cfg(tm)).us
             for name, n, k in (("o", 8192, 8192), ("down", 8192, 28672), ("gate_up", 57344, 8192))
             for tm in (128, 256)}
    assert times["o", 128] < times["o", 256]
    assert times["down", 256] < times["down", 128]
    assert times["gate_up", 256] < times["gate_up", 128]


@pytest.mark.parametrize("args, problem", [
    ((0, 64, 64, G128, "int4"), "must be > 0"),
    ((16, 64, 576, G128, "int4"), "does not divide"),
    ((16, 64, 512, Granularity(96), "int4"), "not one of"),
    ((16, 64, 512, G128, "fp8"), "no fp8 W4A4 path"),
])
def test_bad_problems_are_spec_errors(args, problem):
    with pytest.raises(SpecError, match=problem):
        w4a4_time(load_gpu("a40"), *args)


def test_constants_live_in_one_replaceable_record():
    data = DEFAULT_CONSTANTS.to_dict()
    assert CostConstants.from_dict(data) == DEFAULT_CONSTANTS
    archs = {**data["archs"], "sm_80": {**data["archs"]["sm_80"], "dequant_slots": 2.0}}
    faster = CostConstants.from_dict({**data, "archs": archs})
    a100 = load_gpu("a100-80gb")
    assert speedup(a100, *BIG, G128, "int4", faster) > speedup(a100, *BIG, G128, "int4")
    with pytest.raises(SpecError, match="'launch_us': must be > 0"):
        CostConstants.from_dict({**data, "launch_us": 0})
    with pytest.raises(SpecError, match="unknown field"):
        CostConstants.from_dict({**data, "launch": 1.0})
    with pytest.raises(SpecError, match="'mma_m': missing"):
        CostConstants.from_dict({k: v for k, v in data.items() if k != "mma_m"})
    with pytest.raises(SpecError, match="'archs.sm_90a.reuse_tile': must be > 0"):
        CostConstants.from_dict({**data, "archs": {**archs, "sm_90a": {**archs["sm_90a"], "reuse_tile": 0}}})


def test_constants_are_kept_per_kernel_arch():
    """sm_86/89 kernels are mma.sync kernels and follow the sm_80 entry; Hopper's wgmma kernels their own."""
    c = DEFAULT_CONSTANTS
    assert c.arch("sm_86") is c.arch("sm_80") is c.arch("sm_89")
    assert c.arch("sm_90a").reuse_tile > c.arch("sm_80").reuse_tile
    assert c.arch("sm_80").streamk_efficiency is None and c.arch("sm_90a").streamk_efficiency is not None


def test_every_family_activation_format_has_a_traffic_model():
    from apex4gen.costmodel import ACT_TRAFFIC
    from apex4gen.kernels.families import ACT_FORMATS
    assert set(ACT_FORMATS) <= set(ACT_TRAFFIC)


def test_streamk_fills_an_underfilled_grid_and_loses_to_a_full_wave():
    """H100 per-channel prefill (bench/notes/sm90-prefill.md): 64 tiles at M=64 leave half the SMs idle, so
    stream-K wins; at M=4096 the data-parallel grid is 97% full and stream-K's fixed cost loses."""
    gpu = load_gpu("h100-sxm")

    def cfg(tile_m, scheduler):
        return KernelConfig("sm90_prefill_channel", "sm_90a", "int8", CHANNEL, tile_m, 128, 128, 1, 8, 4, 1, "f16",
                            scheduler)
    o = (8192, 8192)
    small = {s: w4a4_time(gpu, 64, *o, CHANNEL, "int8", cfg(64, s)).us for s in ("persistent", "streamk")}
    large = {s: w4a4_time(gpu, 4096, *o, CHANNEL, "int8", cfg(256, s)).us for s in ("persistent", "streamk")}
    assert small["streamk"] < small["persistent"]
    assert large["persistent"] < large["streamk"]


def test_wgmma_bandwidth_derating_only_for_half_empty_tiles():
    """M <= 16 in 64-row tiles: 0.65 (the g128 prefill kernel in the H100 study); full tiles stream at full rate
    from M = 32 on a 64-row tile (the per-channel kernel at M = 64, bench/results/h100/)."""
    sm90, sm80 = DEFAULT_CONSTANTS.arch("sm_90a"), DEFAULT_CONSTANTS.arch("sm_80")
    assert sm90.bandwidth(16, 64) == sm90.partial_tile_bandwidth == 0.65
    assert sm90.bandwidth(32, 64) == sm90.bandwidth(64, 64) == 1.0
    assert sm80.bandwidth(16, 64) == 1.0


def _measured_points(results: str):
    """(table, point, kernel config) of every point of a GPU's committed tables: each point names its kernel."""
    configs = configs_by_name("sm_90a", ("g128", "channel"))
    for table in sorted((REPO / "bench" / "results" / results).glob("llama2-70b-*.json")):
        for p in json.loads(table.read_text())["points"]:
            yield table.name, p, configs[p["kernel"]]


@pytest.mark.parametrize("results, spec, count", [("h100", "h100-sxm", 68), ("h200", "h200", 28)])
def test_predictions_within_25_percent_of_the_hopper_tables(results, spec, count):
    """Every point of the committed tables (llama2-70b's four GEMMs, M = 1..4096; H100: g128, per-channel and the
    g128 fused-producer run; H200: g128) predicted within ±25% of its measured time: the GEMM alone where the table
    has it (the prediction does not count a separate quantizer), else the op (the decode kernels quantize inside
    the call)."""
    gpu, misses, points = load_gpu(spec), [], 0
    for table, p, cfg in _measured_points(results):
        measured = p["gemm_us"] or p["w4a4_us"]
        predicted = w4a4_time(gpu, p["m"], p["n"], p["k"], cfg.granularity, cfg.path, cfg).us
        points += 1
        if abs(predicted / measured - 1) > 0.25:
            misses.append(f"{table} {p['gemm']} M={p['m']}: {predicted:.1f} vs {measured:.1f} us")
    assert points == count and not misses, misses
