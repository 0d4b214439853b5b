"""What the engine needs to know of a loaded build: its output dtype and its plan's granularity per layer kind
(read from the plan.yaml beside the library, without the planner)."""
from __future__ import annotations

import torch
import yaml

from ..errors import SpecError
from ..granularity import CHANNEL_NAME, Granularity
from .config import DTYPES
from .weights import KINDS


def build_dtype(build) -> torch.dtype:
    return DTYPES[build.manifest.out_dtype]


def _plan(build) -> dict:
    return yaml.safe_load((build.build_dir / "plan.yaml").read_text())


def plan_groups(build) -> dict[str, int]:
    """Elements a scale covers per fused layer kind (K for per-channel); refuses an unfused plan (the engine runs q/k/v and
    gate/up as one GEMM each)."""
    plan = _plan(build)
    if not plan["fused"]:
        raise SpecError(f"{build.build_dir} was planned unfused (separate q/k/v, gate/up GEMMs); the engine runs "
                        "fused GEMMs: plan and build without --unfused")
    groups = {lp["name"]: Granularity.parse(lp["granularity"]).size(lp["k"]) for lp in plan["layers"]}
    missing = [kind for kind in KINDS if kind not in groups]
    if missing:
        raise SpecError(f"{build.build_dir}'s plan has no {', '.join(missing)}: not a LLaMA decoder plan")
    return groups


def plan_act_bits(build) -> dict[str, int]:
    """Activation precision per fused layer kind (the plan's act_bits; 4 where a plan has none)."""
    return {lp["name"]: lp.get("act_bits", 4) for lp in _plan(build)["layers"]}


def is_per_channel(build) -> bool:
    return all(lp["granularity"] == CHANNEL_NAME for lp in _plan(build)["layers"])


def check_model(build, model_name: str) -> None:
    if build.manifest.model != model_name:
        raise SpecError(f"{build.build_dir} was built for {build.manifest.model}, not {model_name}; give a build "
                        f"of {model_name} (apex4gen build --gpu <gpu> --model {model_name})")
