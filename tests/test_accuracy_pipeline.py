"""The method pipeline, calibration to the planner's sensitivity format, texts and the CLI, on a tiny model."""
import pytest
import torch
from click.testing import CliRunner

from apex4gen.accuracy import PLAN_KINDS, QuantConfig, quantize_model
from apex4gen.accuracy.data import DataError, join_paragraphs, load_text
from apex4gen.accuracy.calibrate import kind_errors, kind_in_features, layer_errors, sensitivity, write_sensitivity
from apex4gen.accuracy.sensitivity import load_sensitivity
from apex4gen.checkpoint import quantized_layers
from apex4gen.cli import cli
from apex4gen.granularity import Granularity
from tiny_llama import token_batch, tiny_llama


@torch.no_grad()
@pytest.mark.parametrize("cfg", [
    QuantConfig.uniform(Granularity.parse("g16")),
    QuantConfig.uniform(Granularity.parse("channel"), rotate=True),
    QuantConfig.uniform(Granularity.parse("g16"), rotate=True, gptq=True, clip_weights=True, clip_acts=True),
    QuantConfig.uniform(Granularity.parse("g32"), gptq=True, act_order=True),
], ids=lambda c: c.describe())
def test_every_linear_becomes_w4a4_and_stays_close(cfg):
    model = tiny_llama(seed=7)
    ids = token_batch(2, 32, seed=8)
    ref_logits = model(input_ids=ids).logits
    quantize_model(model, cfg, token_batch(4, 32, seed=9))
    layers = quantized_layers(model)
    assert len(layers) == 7 * len(model.model.layers)
    logits = model(input_ids=ids).logits
    rel = float((logits - ref_logits).norm() / ref_logits.norm())
    assert 0 < rel < 0.5


def test_gptq_needs_calibration_tokens():
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(tiny_llama(), QuantConfig.uniform(Granularity.parse("g16"), gptq=True))


@torch.no_grad()
def test_calibration_writes_what_the_planner_reads(tmp_path):
    model = tiny_llama(seed=10, hidden=192, ffn=256)
    errors = kind_errors(layer_errors(model, token_batch(2, 32, seed=11)))
    assert set(errors) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    names = {kind: {f"{g.name}/a{bits}": e for (g, bits), e in errs.items()} for kind, errs in errors.items()}
    # K=192: g128 and coarser groups do not divide it; each granularity with 4- and 8-bit activations
    assert set(names["qkv_proj"]) == {"g64/a4", "channel/a4", "g64/a8", "channel/a8"}
    assert {n.split("/")[0] for n in names["down_proj"]} == {"g64", "g128", "g256", "channel"}  # K=256
    assert names["down_proj"]["g64/a4"] < names["down_proj"]["channel/a4"]
    for kind in names:  # 8-bit activations always help at the same granularity
        assert all(names[kind][f"{g}/a8"] < names[kind][f"{g}/a4"] for g in ("g64", "channel"))
    sens = sensitivity(errors, kind_in_features(model), "smollm2-135m")
    # the reference of qkv_proj is g64 (g128 does not divide 192): channel is its only coarser option
    assert [g.name for g, _ in dict(sens.layers)["qkv_proj"]] == ["channel"]
    assert [g.name for g, _ in dict(sens.layers)["down_proj"]] == ["g256", "channel"]
    # 8 bits at every granularity, against the 4-bit reference: a decrease at the reference itself
    act8 = dict(dict(sens.act8)["qkv_proj"])
    assert [g.name for g in act8] == ["g64", "channel"] and act8[Granularity(64)] < 0
    assert act8[Granularity(64)] == round(errors["qkv_proj"][Granularity(64), 8] - errors["qkv_proj"][Granularity(64), 4], 6)
    path = write_sensitivity(sens, tmp_path / "sens.yaml", errors)
    assert load_sensitivity(path) == sens


def test_paragraph_lines_are_joined():
    assert join_paragraphs(["It is a truth", "universally acknowledged.", "", "", "Chapter 2", ""]) == \
        "It is a truth universally acknowledged.\n\nChapter 2"


def test_unknown_text_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match="unknown text"):
        load_text(str(tmp_path / "missing.txt"))
    result = CliRunner().invoke(cli, ["eval", "ppl", "--text", str(tmp_path / "missing.txt"),
                                      "--model-path", str(tmp_path / "nope")])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "does not exist" in result.output


def test_act_order_without_gptq_is_refused(tmp_path):
    """One rule, named by the option that broke it, for the flags and for `eval table --methods`."""
    flags = CliRunner().invoke(cli, ["quantize", "--act-order", "-o", str(tmp_path / "out")])
    methods = CliRunner().invoke(cli, ["eval", "table", "--methods", "rotation+act-order"])
    for result, where in ((flags, "--act-order"), (methods, "--methods 'rotation+act-order'")):
        assert result.exit_code == 2 and result.output.count("\n") == 1
        assert f"{where}: act-order is a GPTQ option: add gptq" in result.output


def test_table_rows_are_method_sets_and_plan_columns_are_the_planners():
    from apex4gen.accuracy.pipeline import KIND_OF, PLAN_KINDS
    from apex4gen.accuracy.options import column_granularities, parse_method
    from apex4gen.errors import SpecError
    from apex4gen.planner import make_plan

    assert not any(parse_method("rtn").values())
    on = {flag for flag, value in parse_method("rotation+gptq+act-order").items() if value}
    assert on == {"rotate", "gptq", "act_order"}
    for bad in ("gptq+sparsity", "rotation+act-order"):
        with pytest.raises(SpecError, match="--methods"):
            parse_method(bad)
    assert column_granularities("channel", "smollm2-135m") == dict.fromkeys(PLAN_KINDS, Granularity(None))
    grans = column_granularities("plan:rtx3090", "smollm2-135m")
    assert grans == {lp.name: lp.granularity for lp in make_plan("rtx3090", "smollm2-135m").layers}
    assert all(kind in grans or KIND_OF[kind] in grans for kind in KIND_OF)


def test_a_calibrated_budget_keeps_the_sensitive_kinds_fine():
    """specs/budgets/budget-smollm2-calibrated.yaml allows 0.01 of summed relative output error: channel for qkv_proj
    alone costs 0.017 (measured by `apex4gen calibrate`), so every plan keeps it at the reference group."""
    from pathlib import Path

    from apex4gen.cli.eval import column_granularities

    budget = str(Path(__file__).parents[1] / "specs" / "budgets" / "budget-smollm2-calibrated.yaml")
    for gpu in ("a100-80gb", "rtx3090", "h100-sxm"):
        grans = column_granularities(f"plan:{gpu}", "smollm2-135m", budget)
        assert grans["qkv_proj"] == grans["o_proj"] == grans["gate_up_proj"] == Granularity(64), (gpu, grans)
        assert grans["down_proj"].name in ("g128", "g256", "g512"), (gpu, grans)


@torch.no_grad()
def test_keep_activations_fp_switches_only_the_named_kinds():
    from apex4gen.accuracy.pipeline import keep_activations_fp
    from apex4gen.nn import W4A4Linear

    model = quantize_model(tiny_llama(seed=7), QuantConfig.uniform(Granularity.parse("g16"), rotate=True))
    ids = token_batch(2, 32, seed=8)
    before = model(input_ids=ids).logits
    assert keep_activations_fp(model, ("down_proj",)) == len(model.model.layers)
    fp_inputs = {n.rpartition(".")[2] for n, m in model.named_modules()
                 if isinstance(m, W4A4Linear) and not m.quantize_input}
    assert fp_inputs == {"down_proj"}
    assert not torch.equal(model(input_ids=ids).logits, before)
    with pytest.raises(ValueError, match="unknown layer kinds"):
        keep_activations_fp(model, ("mlp",))


@torch.no_grad()
def test_keep_weights_fp_with_fp_activations_is_the_rotated_fp_model():
    """Both diagnostics together leave nothing quantized: the model must compute the FP model's function
    (rotation is exact), which checks that every layer got its own rotated full-precision weight."""
    import copy

    from apex4gen.accuracy.pipeline import keep_activations_fp, keep_weights_fp
    from apex4gen.accuracy.rotation import rotate_model

    fp = tiny_llama(seed=9)
    ids = token_batch(2, 32, seed=10)
    expected = fp(input_ids=ids).logits
    quant = quantize_model(copy.deepcopy(fp), QuantConfig.uniform(Granularity.parse("g16"), rotate=True, seed=3))
    w4a4 = quant(input_ids=ids).logits
    rotate_model(fp, seed=3)
    assert keep_weights_fp(quant, fp) == 7 * len(quant.model.layers)
    w16a4 = quant(input_ids=ids).logits
    keep_activations_fp(quant, PLAN_KINDS)
    torch.testing.assert_close(quant(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(w16a4, expected, rtol=1e-4, atol=1e-4) and not torch.equal(w16a4, w4a4)


def test_fp_weights_with_a_checkpoint_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(cli, ["eval", "ppl", "--fp-weights", "--checkpoint", str(tmp_path)])
    assert result.exit_code == 2 and "--fp-weights needs the full-precision model" in result.output


def test_unknown_fp_acts_kind_is_a_usage_error():
    result = CliRunner().invoke(cli, ["eval", "ppl", "--fp-acts", "down_proj,mlp"])
    assert result.exit_code == 2 and "--fp-acts down_proj,mlp: known kinds are" in result.output
