"""The one place where a kernel configuration is checked against a GPU and a GEMM problem.

Shared memory per block comes from the GPU spec; alignment and divisibility from the family and the problem.
"""
from __future__ import annotations

from ..errors import ShapeError
from ..granularity import Granularity
from .config import KernelConfig
from .families import FAMILIES, family_of


def violations(cfg: KernelConfig, gpu, n: int | None = None, k: int | None = None) -> list[str]:
    """Reasons ``cfg`` cannot run on ``gpu`` (and, if given, on an N x K weight); empty when legal."""
    fam = family_of(cfg)
    out: list[str] = []
    if cfg.arch not in fam.archs:
        out.append(f"{fam.name} is not built for {cfg.arch}")
    if cfg.arch != gpu.kernel_arch:
        out.append(f"{cfg.arch} code does not target {gpu.name} ({gpu.kernel_arch})")
    if cfg.path != fam.path:
        out.append(f"{fam.name} computes on {fam.path} tensor cores, not {cfg.path}")
    if cfg.split_k not in fam.split_k:
        out.append(f"{fam.name} is instantiated with split-K {fam.split_k}, not {cfg.split_k}")
    if cfg.scheduler not in fam.schedulers:
        out.append(f"{fam.name} has no {cfg.scheduler} scheduler (it has {', '.join(fam.schedulers)})")
    if cfg.act_bits not in fam.act_bits:
        out.append(f"{fam.name} takes {'/'.join(map(str, fam.act_bits))}-bit activations, not {cfg.act_bits}-bit")
    if not fam.serves(cfg.granularity):
        served = "per-channel" if fam.granularity == "channel" else f"group sizes {fam.groups or 'any'}"
        out.append(f"{fam.name} serves {served}, not {cfg.granularity.name}")
    smem = fam.smem_bytes(cfg)
    if smem > gpu.smem_per_block_bytes:
        out.append(f"needs {smem} B shared memory per block, {gpu.name} allows {gpu.smem_per_block_bytes} B")
    group = cfg.granularity.group
    if group and group % cfg.tile_k and cfg.tile_k % group:
        out.append(f"tile_k={cfg.tile_k} and group={group} must divide one another")
    if k is not None:
        out += _k_violations(cfg, fam.align_k, k)
        reason = fam.k_rule(cfg, k, gpu.smem_per_block_bytes) if fam.k_rule else None
        out += [reason] if reason else []
    if n is not None and n % fam.align_n:
        out.append(f"N={n} is not a multiple of {fam.align_n}")
    return out


def _k_violations(cfg: KernelConfig, align_k: int, k: int) -> list[str]:
    out = []
    if k % align_k:
        out.append(f"K={k} is not a multiple of {align_k}")
    if not cfg.granularity.fits(k):
        out.append(f"K={k} is not a multiple of the group size {cfg.granularity.group}")
    if k % (cfg.tile_k * cfg.split_k):
        out.append(f"K={k} is not a multiple of tile_k*split_k={cfg.tile_k * cfg.split_k}")
    return out


def check(cfg: KernelConfig, gpu, gemm) -> None:
    """``cfg`` runs ``gemm`` (a plan's GemmPlan: shape, granularity, output dtype; its buckets may compute on another
    tensor-core path, e.g. an int8 decode kernel under an fp8 GEMM) on ``gpu``."""
    reasons = violations(cfg, gpu, gemm.n, gemm.k)
    for field in ("granularity", "out_dtype", "act_bits"):
        if getattr(cfg, field) != getattr(gemm, field):
            reasons.append(f"the GEMM's {field} is {getattr(gemm, field)}, the kernel's {getattr(cfg, field)}")
    if reasons:
        raise ShapeError(f"kernel {cfg.procedural_name()} cannot run N={gemm.n} K={gemm.k} on {gpu.name}: "
                         + "; ".join(reasons))


def legal_configs(gpu, path: str, granularity: Granularity, n: int, k: int, out_dtype: str,
                  m: int | None = None, act_bits: int = 4) -> list[KernelConfig]:
    """All legal instances for one GEMM (``act_bits``-bit activations) on one GPU, sorted (deterministic)."""
    found = []
    for fam in FAMILIES.values():
        if fam.path != path or gpu.kernel_arch not in fam.archs:
            continue
        if m is not None and fam.max_m is not None and m > fam.max_m:
            continue
        found += [c for c in fam.configs(gpu.kernel_arch, granularity, out_dtype, act_bits)
                  if not violations(c, gpu, n, k)]
    return sorted(found)
