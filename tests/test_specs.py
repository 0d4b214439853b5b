"""GPU, model and workload specs: shipped files validate, derived numbers are right, bad files fail clearly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from apex4gen.errors import SpecError
from apex4gen.graph import activation_groups, layer_graph, linear_layers, shared_problems
from apex4gen.specs import (list_gpus, list_models, list_workloads, load_gpu, load_model, load_workload)

from _helpers import shipped, write_yaml

REQUIRED_GPUS = {"a40", "rtx3090", "rtx4090", "l40s", "l4", "a100-40gb", "a100-80gb", "h100-sxm", "h100-pcie",
                 "h200"}
REQUIRED_MODELS = {"llama2-7b", "llama2-13b", "llama2-70b", "llama3-8b", "llama3-70b", "llama3.1-405b",
                   "mistral-7b", "qwen2.5-7b", "qwen2.5-72b", "smollm2-135m"}


def test_required_specs_are_shipped():
    assert REQUIRED_GPUS <= set(list_gpus())
    assert REQUIRED_MODELS <= set(list_models())
    assert {"default", "prefill-heavy", "decode"} <= set(list_workloads())


@pytest.mark.parametrize("name", list_gpus())
def test_every_shipped_gpu_validates_with_a_source_per_number(name):
    gpu = load_gpu(name)
    assert gpu.name == name
    assert gpu.rho > 0 and gpu.compute_paths
    sourced = {field for field, _ in gpu.sources}
    assert {"sm_count", "boost_clock_mhz", "fp32_tflops", "dram_bandwidth_gbs", "l2_mb", "smem_per_block_kb",
            "tensor_tops.int8", "tensor_tops.fp16"} <= sourced


@pytest.mark.parametrize("name", list_models())
def test_every_shipped_model_validates(name):
    model = load_model(name)
    assert model.name == name
    assert model.num_attention_heads % model.num_key_value_heads == 0


@pytest.mark.parametrize("name", list_workloads())
def test_every_shipped_workload_validates(name):
    work = load_workload(name)
    assert work.name == name
    assert abs(sum(work.normalised_weights()) - 1) < 1e-9


@pytest.mark.parametrize("name, rho", [("rtx3090", 16), ("a40", 16), ("a100-40gb", 64), ("a100-80gb", 64),
                                       ("l40s", 8), ("h100-sxm", 30)])
def test_derived_rho_matches_the_paper(name, rho):
    assert load_gpu(name).rho == pytest.approx(rho, rel=0.10)


def test_hopper_has_no_native_int4_path():
    for name in ("h100-sxm", "h100-pcie", "h200"):
        gpu = load_gpu(name)
        assert gpu.int4_tensor_cores == "emulated"
        assert "int4" not in gpu.compute_paths
        assert set(gpu.compute_paths) == {"int8", "fp8"}
    # the emulated INT4 rate is the repository's own measurement (apex4gen probe on the H100)
    rates = {r["name"]: r["value"] for r in json.loads(
        (Path(__file__).parents[1] / "bench/results/h100/probe.json").read_text())["rates"]}
    assert load_gpu("h100-sxm").tensor_tops.int4 == pytest.approx(rates["mma_sync_int4"], abs=0.05)


def test_legality_attributes():
    assert (load_gpu("a100-80gb").kernel_arch, load_gpu("a100-80gb").smem_per_block_bytes) == ("sm_80", 166912)
    assert (load_gpu("a40").kernel_arch, load_gpu("a40").smem_per_block_bytes) == ("sm_86", 101376)
    assert (load_gpu("l40s").kernel_arch, load_gpu("l40s").smem_per_block_bytes) == ("sm_89", 101376)
    assert (load_gpu("h100-sxm").kernel_arch, load_gpu("h100-sxm").smem_per_block_bytes) == ("sm_90a", 232448)


def test_a_path_is_accepted_wherever_a_name_is(tmp_path):
    mine = write_yaml(tmp_path / "my-gpu.yaml", {**shipped("gpus", "a40"), "name": "my-gpu"})
    assert load_gpu(str(mine)).name == "my-gpu"
    assert load_gpu(mine).rho == load_gpu("a40").rho
    model = write_yaml(tmp_path / "m.yaml", shipped("models", "llama2-7b"))
    assert load_model(str(model)) == load_model("llama2-7b")


@pytest.mark.parametrize("loader, name, expect", [(load_gpu, "a4o", "a40"), (load_gpu, "rtx309", "rtx3090"),
                                                  (load_model, "llama2-70", "llama2-70b"),
                                                  (load_workload, "prefil-heavy", "prefill-heavy")])
def test_misspelt_names_suggest_the_nearest(loader, name, expect):
    with pytest.raises(SpecError, match=f"did you mean {expect}"):
        loader(name)


def _broken_gpu(tmp_path, mutate):
    data = shipped("gpus", "a40")
    mutate(data)
    return write_yaml(tmp_path / "broken.yaml", data)


@pytest.mark.parametrize("mutate, field, problem", [
    (lambda d: d.update(sm_cnt=1), "sm_cnt", "unknown field"),
    (lambda d: d.pop("fp32_tflops"), "fp32_tflops", "missing"),
    (lambda d: d["tensor_tops"].pop("int4"), "tensor_tops.int4", "missing"),
    (lambda d: d.update(sm_count={"value": "84", "source": "x"}), "sm_count.value", "must be an integer"),
    (lambda d: d.update(sm_count={"value": 84.5, "source": "x"}), "sm_count.value", "must be an integer"),
    (lambda d: d.update(architecture="sm_75"), "architecture", "not one of"),
    (lambda d: d.update(int4_tensor_cores="yes"), "int4_tensor_cores", "not one of"),
    (lambda d: d["tensor_tops"].update(int4={"value": 0, "source": "x"}), "tensor_tops.int4.value", "must be > 0"),
    (lambda d: d.update(fp32_tflops={"value": -1, "source": "x"}), "fp32_tflops.value", "must be > 0"),
    (lambda d: d.update(fp32_tflops={"value": 37.4}), "fp32_tflops.source", "missing"),
    (lambda d: d.update(rho=64), "rho", "the rates give 16.01"),
    (lambda d: d.update(rho=0), "rho", "must be > 0"),
    (lambda d: d.update(architecture="sm_90"), "int4_tensor_cores", "Hopper"),
    (lambda d: d["tensor_tops"].update(fp8={"value": 1, "source": "x"}), "tensor_tops.fp8", "sm_89 or newer"),
    (lambda d: d.update(smem_per_block_kb={"value": 164, "source": "x"}), "smem_per_block_kb.value", "limit"),
    (lambda d: d.update(tensor_tops=[1, 2]), "tensor_tops", "must be a mapping"),
])
def test_bad_gpu_specs_name_file_and_field(tmp_path, mutate, field, problem):
    path = _broken_gpu(tmp_path, mutate)
    with pytest.raises(SpecError) as err:
        load_gpu(path)
    message = str(err.value)
    assert str(path) in message and f"'{field}'" in message and problem in message
    assert "\n" not in message


def test_unknown_key_suggests_the_valid_one(tmp_path):
    path = _broken_gpu(tmp_path, lambda d: d.update(sm_cont=d.pop("sm_count")))
    with pytest.raises(SpecError, match="did you mean sm_count"):
        load_gpu(path)


@pytest.mark.parametrize("mutate, field, problem", [
    (lambda d: d.update(num_attention_heads=30, num_key_value_heads=30), "num_attention_heads", "do not divide hidden_size"),
    (lambda d: d.update(num_key_value_heads=3), "num_key_value_heads", "do not divide"),
    (lambda d: d.update(hidden_size=0), "hidden_size", "must be > 0"),
    (lambda d: d.update(dtype="fp16"), "dtype", "not one of"),
    (lambda d: d.update(tie_word_embeddings="no"), "tie_word_embeddings", "true or false"),
    (lambda d: d.pop("vocab_size"), "vocab_size", "missing"),
    (lambda d: d.update(layers=80), "layers", "unknown field"),
])
def test_bad_model_specs_name_file_and_field(tmp_path, mutate, field, problem):
    data = shipped("models", "llama2-7b")
    mutate(data)
    path = write_yaml(tmp_path / "m.yaml", data)
    with pytest.raises(SpecError) as err:
        load_model(path)
    assert str(path) in str(err.value) and f"'{field}'" in str(err.value) and problem in str(err.value)


@pytest.mark.parametrize("points, field, problem", [
    ([], "points", "at least one"),
    ([{"phase": "decode", "batch": 4, "seq_len": 8, "weight": 1}], "points[0].seq_len", "decode"),
    ([{"phase": "prefill", "batch": 1, "weight": 1}], "points[0].seq_len", "missing"),
    ([{"phase": "decode", "batch": 1, "weight": 0}], "points[0].weight", "must be > 0"),
    ([{"phase": "train", "batch": 1, "weight": 1}], "points[0].phase", "not one of"),
])
def test_bad_workloads_name_file_and_field(tmp_path, points, field, problem):
    path = write_yaml(tmp_path / "w.yaml", {"name": "w", "description": "d", "points": points})
    with pytest.raises(SpecError) as err:
        load_workload(path)
    assert str(path) in str(err.value) and f"'{field}'" in str(err.value) and problem in str(err.value)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_gpu(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match=r"bad.yaml: line \d+: not valid YAML"):
        load_gpu(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(SpecError, match="must be a mapping"):
        load_model(bad)


def test_workload_point_m():
    points = load_workload("prefill-heavy").points
    assert [p.m for p in points] == [2048, 8192, 64]


def test_model_gemm_shapes_fused_and_unfused():
    m = load_model("llama2-70b")
    fused = {lin.name: (lin.n, lin.k) for lin in linear_layers(layer_graph(m, fused=True))}
    assert fused == {"qkv_proj": (10240, 8192), "o_proj": (8192, 8192), "gate_up_proj": (57344, 8192),
                     "down_proj": (8192, 28672)}
    unfused = {lin.name: (lin.n, lin.k) for lin in linear_layers(layer_graph(m, fused=False))}
    assert unfused == {"q_proj": (8192, 8192), "k_proj": (1024, 8192), "v_proj": (1024, 8192),
                       "o_proj": (8192, 8192), "gate_proj": (28672, 8192), "up_proj": (28672, 8192),
                       "down_proj": (8192, 28672)}
    assert load_model("smollm2-135m").head_dim == 64
    assert load_model("qwen2.5-7b").kv_dim == 512


def test_gemms_reading_one_activation_form_one_group():
    groups = activation_groups(layer_graph(load_model("llama3-8b"), fused=False))
    by_activation = {g.activation: [lin.name for lin in g.linears] for g in groups}
    assert by_activation == {"attn_in": ["q_proj", "k_proj", "v_proj"], "attn_out": ["o_proj"],
                             "mlp_in": ["gate_proj", "up_proj"], "mlp_act": ["down_proj"]}
    assert {g.kind_name for g in groups} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


def test_identical_problems_across_layers_are_one():
    problems = shared_problems(load_model("llama2-7b"), fused=False)
    square = next(p for p in problems if (p.n, p.k) == (4096, 4096))
    assert square.layers == ("q_proj", "k_proj", "v_proj", "o_proj") and square.count == 4 * 32
    assert len(problems) == 3
    assert [p.count for p in shared_problems(load_model("llama2-70b"))] == [80, 80, 80, 80]
