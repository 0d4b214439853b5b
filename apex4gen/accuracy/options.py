"""What the accuracy commands (``quantize``, ``eval``, ``calibrate``) ask for, as library functions: a
:class:`QuantConfig` from a plan or one granularity and the method flags, calibration tokens, a quantized model."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import SpecError
from ..granularity import Granularity
from .pipeline import KIND_OF, PLAN_KINDS, QuantConfig

METHOD_FLAGS = {"rotation": "rotate", "group-rotation": "group_rotation", "gptq": "gptq", "act-order": "act_order",
                "clip-weights": "clip_weights", "clip-acts": "clip_acts"}


def check_methods(methods: dict, where: str | None = None) -> None:
    """The rules for the flags (``where``: the option that set them, e.g. ``--methods``; None: each rule is named
    by its own flag): act-order orders GPTQ's columns, group-rotation chooses the rotation's matrix."""
    if methods.get("act_order") and not methods.get("gptq"):
        raise SpecError(f"{where or '--act-order'}: act-order is a GPTQ option: add gptq")
    if methods.get("group_rotation") and not methods.get("rotate"):
        raise SpecError(f"{where or '--group-rotation'}: group-rotation is a rotation option: add rotation "
                        "(--rotate)")


def parse_method(text: str) -> dict[str, bool]:
    """'rotation+gptq+clip-acts' -> the method options; 'rtn' is none of them."""
    names = [] if text == "rtn" else text.split("+")
    unknown = [n for n in names if n not in METHOD_FLAGS]
    if unknown:
        raise SpecError(f"--methods: unknown method {unknown[0]!r} in {text!r}: use 'rtn' or a '+'-joined "
                        f"subset of {', '.join(METHOD_FLAGS)}")
    flags = dict.fromkeys(METHOD_FLAGS.values(), False)
    flags.update(dict.fromkeys((METHOD_FLAGS[n] for n in names), True))
    check_methods(flags, f"--methods {text!r}")
    return flags


def build_config(plan_path: Path | None, granularity: Granularity, act8: str = "", **methods) -> QuantConfig:
    """``methods``: the method options by name (rotate, group_rotation, gptq, act_order, clip_weights,
    clip_acts, seed);
    ``act8``: the ``--act8`` option (comma-separated kinds or 'all' with 8-bit activations; not with a plan,
    which says per layer)."""
    check_methods(methods)
    if plan_path is None:
        return QuantConfig.uniform(granularity, act_bits=parse_act8(act8), **methods)
    if act8:
        raise SpecError(f"--act8 {act8}: a plan sets each layer's activation precision; drop --act8 or --plan")
    from ..plan import Plan

    plan = Plan.load(plan_path)
    return QuantConfig(granularity=granularities_of(plan, str(plan_path)), act_bits=act_bits_of(plan), **methods)


def parse_act8(text: str) -> dict[str, int]:
    """'qkv_proj,gate_up_proj' or 'all' -> {kind: 8}; '' -> {} (every activation 4-bit)."""
    kinds = PLAN_KINDS if text == "all" else tuple(k for k in text.split(",") if k)
    unknown = [k for k in kinds if k not in PLAN_KINDS]
    if unknown:
        raise SpecError(f"--act8 {text}: unknown layer kind {unknown[0]!r}: use 'all' or a comma-separated subset "
                        f"of {', '.join(PLAN_KINDS)}")
    return dict.fromkeys(kinds, 8)


def act_bits_of(plan) -> dict[str, int]:
    """Per layer kind (fused plans) or projection (unfused plans) the plan's activation precision."""
    return {lp.name: lp.act_bits for lp in plan.layers}


def granularities_of(plan, where: str) -> dict[str, Granularity]:
    grans = {lp.name: lp.granularity for lp in plan.layers}
    unknown = sorted(set(grans) - set(PLAN_KINDS) - set(KIND_OF))
    if unknown:
        raise SpecError(f"{where}: layers {', '.join(unknown)} are not LLaMA projections")
    missing = [p for p in KIND_OF if p not in grans and KIND_OF[p] not in grans]
    if missing:
        raise SpecError(f"{where}: no granularity for {', '.join(missing)}")
    return grans


def column_granularities(column: str, model_spec: str, budget: str | None = None) -> dict[str, Granularity]:
    """'g128' / 'channel' -> that granularity everywhere; 'plan:<gpu>' -> the planner's per-layer choice for
    ``model_spec`` on that GPU (default workload; ``budget``, else the default budget)."""
    return column_settings(column, model_spec, budget)[0]


def column_settings(column: str, model_spec: str,
                    budget: str | None = None) -> tuple[dict[str, Granularity], dict[str, int]]:
    """A table column's granularities and activation precisions (a granularity column: 4-bit everywhere)."""
    from ..planner import make_plan

    if column.startswith("plan:"):
        gpu = column.removeprefix("plan:")
        plan = make_plan(gpu, model_spec, budget=budget)
        return granularities_of(plan, f"plan for {gpu}"), act_bits_of(plan)
    return QuantConfig.uniform(Granularity.parse(column)).granularity, {}


def plan_granularities(plan_path: Path) -> dict[str, Granularity]:
    """Per layer kind (fused plans) or projection (unfused plans) the plan's granularity."""
    from ..plan import Plan

    return granularities_of(Plan.load(plan_path), str(plan_path))


def calibration_ids(tokenizer, text: str, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """[samples, seq_len]: windows of ``text`` drawn by ``seed`` (the run's one seed: it also signs the
    rotation's Hadamards), so calibration seeds can be compared and one seed repeats its run."""
    from .data import load_text
    from .evaluation import sample_windows, tokenize

    try:
        return sample_windows(tokenize(tokenizer, load_text(text)), samples, seq_len, seed)
    except ValueError as err:
        raise SpecError(f"calibration text {text!r}: {err}") from None


def quantize_loaded(model, tokenizer, cfg: QuantConfig, calib_text: str, calib_samples: int,
                    calib_seq_len: int):
    from .pipeline import quantize_model

    calib = calibration_ids(tokenizer, calib_text, calib_samples, calib_seq_len, cfg.seed) \
        if cfg.needs_calibration else None
    return quantize_model(model, cfg, calib)
