"""W4A4 prefill (large-M, compute-bound) kernel families for Hopper (sm_90a): 4-bit weights, 8-bit tensor cores.

Hopper has no INT4 tensor cores, so both families keep the weights packed int4 in memory (layout ``sm90_prefill``,
below) and widen them to 8 bits in registers, right before a register-sourced wgmma (CUTLASS 3's mixed-input
mainloop). The layout is CUTLASS's offline reordering for mixed-input wgmma: each thread's A fragment is contiguous,
one 64-bit shared-memory load a wgmma instead of 16-bit ones (N % 16 == 0). The GEMM is run transposed,
``Y^T[N, M] = W[N, K] . X[M, K]^T``, because wgmma can read only its A operand from registers: CUTLASS's M is our
N, its N is our M. A ``KernelConfig`` keeps apex4gen's names: ``tile_m`` is the token tile (CUTLASS's N),
``tile_n`` the output-channel tile. Both are CUTLASS's warp-specialized cooperative kernel: one producer
warpgroup (TMA) and two consumer warpgroups that split ``tile_n``; ``warps_m x warps_n = 1 x 8`` names the eight
consumer warps.

``sm90_prefill_channel`` (per-channel, path int8): int4 -> int8 in registers, s8 x s8 wgmma with int32
accumulators, and an EVT epilogue ``y = (P * sw[n]) * sx[m] + bias[n]``. Activations: ``s8``, holding 4-bit
values or (``act_bits`` 8, W4A8) 8-bit ones: the same kernel, the quantizer (runtime/quantize.cu) sets the range.
Exact: 4-bit, |P| <= 64 K < 2**24 for K <= 2**18, so the int32 -> fp32 conversion is exact too; 8-bit,
|P| <= 1024 K < 2**28 stays exact in int32 and its conversion to fp32 rounds once (relative 2**-24) for K > 2**14,
one of the few fp32 roundings the tolerance allows (reference.gemm_tolerance).

Which families cannot take 8-bit activations: ``sm90_prefill_group`` computes on e4m3, which holds integers
exactly only up to +-16, so -128..127 would not survive the conversion (splitting each value into two exact e4m3
halves would double the wgmma work: not built); the sm_80/86/89 families compute on s4 ``mma.sync`` (8-bit
activations would need INT8 ``mma.sync`` at half the INT4 rate; the cost model prices that, no family exists, so
plans for those GPUs stay 4-bit).

``sm90_prefill_group`` (g128, path fp8): int4 -> e4m3 in registers, e4m3 x e4m3 wgmma into fp32 partials, one
128-long group per K tile. Hopper's fp8 wgmma accumulates with reduced precision, but a group's partial
(|P| <= 8192, integers) is exact; each group is promoted on the CUDA cores, ``acc += P * (sw[n,g] sx[m,g])``
(DeepGEMM's scheme), while the other consumer warpgroup keeps the tensor cores busy. An auxiliary producer warp
copies each K tile's scales into shared memory with cp.async, next to the TMA-loaded operands. Activations:
``e4m3``. Weight scales transposed, [K/g, N] (layout ``sm90_prefill``), so that one K tile's scales are contiguous
for 16-byte copies. Token tiles of 64, 128 or 256: a wgmma covers at most 128 tokens, and a 256-token tile runs
its two blocks one after the other through one fp32 partial buffer, so that each widened weight fragment serves 256
tokens (the widening is the promotion's main overhead; the GEMM ran 10-15% faster than with 128-token tiles at
M = 1024 and 4096). With one block, the next K tile's weights are widened while the current tile's wgmmas run (two
register buffers). Its scheduler is stream-K (CUTLASS's
heuristic decomposition, deterministic reduction through the workspace): grids of fewer tiles than whole waves
(qkv/o/down at M <= 256) keep every SM busy.

Shared memory per block is CUTLASS's ``GemmKernel::SharedStorage`` as computed below; each template
static_asserts that it equals the value it is given, so legality against a GPU's limit is exact.
"""
from __future__ import annotations


from . import cpp_names, layouts
from .config import KernelConfig
from .families import Family, TileShape, register

ARCHS = ("sm_90a",)
GROUP = 128                  # the group family's only group size: one group per K tile
TILE_K = 128                 # K elements per pipeline stage (one group)
CONSUMER_WARPS = (1, 8)      # two consumer warpgroups (warps_m, warps_n), see the module docstring
ALIGN_K = 128                # K: whole K tiles (also keeps every TMA row a multiple of 16 bytes)
ALIGN_N = 8                  # N: the transposed output is stored 16 bytes (8 values) at a time
WEIGHT_ALIGN_N = 16          # N: also whole 16-row atoms of the reordered weights (layout sm90_prefill)
MAX_CHANNEL_K = 1 << 18      # per-channel partials stay exact in int32 and in fp32 up to here

# (tile_m tokens, tile_n channels). The group kernel holds an fp32 sum (64 x tile_m a warpgroup) and one group's
# partials for one wgmma block of at most GROUP_WGMMA_TOKENS tokens per consumer thread: at tile_m = 256, sum +
# partials + one widened weight fragment are 128 + 64 + 16 of a consumer's 232 registers (a second fragment
# spilled: 74 bytes, and measured 5-8% slower, bench/notes/sm90-prefill.md, "256-token tiles").
GROUP_WGMMA_TOKENS = 128
GROUP_TILES = tuple(TileShape(tm, 128, TILE_K, *CONSUMER_WARPS) for tm in (64, 128, 256))
CHANNEL_TILES = tuple(TileShape(tm, 128, TILE_K, *CONSUMER_WARPS) for tm in (64, 128, 256))

# Group: 4 for every tile (the 256-token tile: 184 of 227 KB; it fits at most 5). The cost model has no stage
# term, so the planner always took the fewest of the (4, 6) offered before: 6 went unused.
GROUP_STAGES = (4,)
# Channel: 5, the most that every tile fits (256x128: 217 KB). The cost model has no stage term (equal
# estimates would fall to the fewest stages), so the family offers one count: measured against 4 on the H100,
# end to end, 5 is 3-13% faster at M=64 (down 3% slower), within 3.5% at M=256..4096 (bench/notes/sm90-prefill.md).
CHANNEL_STAGES = (5,)

# CTAs a thread-block cluster holds along N (CUTLASS's M): the two CTAs of a cluster compute neighbouring channel
# tiles of the same token tile, so TMA multicasts that X tile to both (half its L2 reads). Channel: 2, measured
# against 1 on the H100 in one run each of two machines, M = 4096: the GEMM 2-4% faster on all four llama2-70b
# GEMMs (clusters 1x2 and 2x2 were slower; bench/notes/sm90-prefill.md, "Clusters"). Group: 1, because its
# auxiliary scale producer copies with per-CTA cp.async and its results were wrong with a cluster of two.
CHANNEL_CLUSTER_N = 2
GROUP_CLUSTER_N = 1


# CUTLASS's kernel SharedStorage, as nvcc lays it out (tests pin values read off the compiler; each template
# static_asserts its own): {mainloop tensors, epilogue tensors}, each padded to 1024 bytes, then the barriers.
_ALIGN = 1024
_EPILOGUE_TENSOR_BYTES = 17 * 1024      # TMA-store staging (2 x 128 x 32 16-bit) padded; broadcasts fit in it
_MAINLOOP_BARRIER_BYTES = 16            # one full + one empty mbarrier per mainloop stage
_EMPTY_SCALE_ARRAYS_BYTES = 16          # the mixed-input storage's unused scale/zero arrays (tail, 16-aligned)


def _round_up(x: int, to: int) -> int:
    return -(-x // to) * to


def _operand_bytes(cfg: KernelConfig) -> int:
    """All stages of packed int4 weights (tile_n x tile_k / 2) and one-byte activations (tile_m x tile_k)."""
    return cfg.stages * (cfg.tile_n * cfg.tile_k // 2 + cfg.tile_m * cfg.tile_k)


def _barrier_bytes(cfg: KernelConfig) -> int:
    """Mainloop stages, the epilogue's pipeline (one stage per 32-token subtile, at most 4) and the kernel's."""
    return cfg.stages * _MAINLOOP_BARRIER_BYTES + 16 + 16 * min(cfg.tile_m // 32, 4)


def _kernel_smem_bytes(cfg: KernelConfig, mainloop_bytes: int) -> int:
    return _round_up(_round_up(mainloop_bytes, _ALIGN) + _EPILOGUE_TENSOR_BYTES + _barrier_bytes(cfg), _ALIGN)


def channel_smem_bytes(cfg: KernelConfig) -> int:
    """The operand stages (the epilogue's token-scale row fits in its padded storage)."""
    return _kernel_smem_bytes(cfg, _operand_bytes(cfg) + 1)


def group_smem_bytes(cfg: KernelConfig) -> int:
    """The operand stages plus, per stage, one fp32 token scale per token and one 16-bit channel scale per
    channel (copied by the auxiliary producer warp, placed in the base storage's tail padding)."""
    scales = cfg.stages * (cfg.tile_m * 4 + cfg.tile_n * 2)
    return _kernel_smem_bytes(cfg, _operand_bytes(cfg) + _EMPTY_SCALE_ARRAYS_BYTES + scales)


def _common_values(cfg: KernelConfig) -> dict:
    if cfg.split_k != 1:
        raise ValueError(f"{cfg.family} has no split-K (stream-K instead); got split_k={cfg.split_k}")
    if (cfg.warps_m, cfg.warps_n) != CONSUMER_WARPS or cfg.tile_k != TILE_K:
        raise ValueError(f"{cfg.family}: warps must be {CONSUMER_WARPS} and tile_k {TILE_K}")
    return {
        "element_out": cpp_names.ELEMENT_OUT[cfg.out_dtype],
        "element_weight": cpp_names.ELEMENT_OPERAND["int4"],
        "element_act": cpp_names.ELEMENT_OPERAND[cfg.path],
        "element_accumulator": cpp_names.ELEMENT_ACCUMULATOR[cfg.path],
        "element_compute": cpp_names.ELEMENT_COMPUTE[cfg.path],
        "arch_tag": cpp_names.ARCH_TAG["sm_90a"],
        "tile_m": cfg.tile_m, "tile_n": cfg.tile_n, "tile_k": cfg.tile_k,
        "stages": cfg.stages,
        "align_k": ALIGN_K, "align_n": ALIGN_N,
        "weight_atom": cpp_names.cute_static_layout(*layouts.SM90_PREFILL_ATOM),
    }


def _channel_schedule(cfg: KernelConfig) -> dict:
    """persistent: CUTLASS's data-parallel persistent scheduler, launched with programmatic dependent launch (its
    prologue overlaps the activation quantizer's tail). streamk: CUTLASS's stream-K scheduler forced to stream-K
    decomposition (its heuristic keeps data-parallel when the tiles fill more than half a wave): each SM takes an
    equal share of all tiles' K iterations, a tile cut across SMs is summed in int32 through the workspace. No
    dependent launch there: CUTLASS zeroes the workspace's locks with a memset between the quantizer and the
    GEMM, and CUTLASS 4.2's stream-K scheduler does not compile with its griddepcontrol hooks enabled."""
    return {"scheduler": cpp_names.TILE_SCHEDULER[cfg.scheduler],
            "decomposition": cpp_names.STREAMK_DECOMPOSITION.get(cfg.scheduler, ""),
            "pdl": cfg.scheduler == "persistent"}


def render_channel(cfg: KernelConfig) -> dict:
    if not cfg.granularity.is_channel:
        raise ValueError(f"sm90_prefill_channel is per-channel; got {cfg.granularity.name}")
    return {**_common_values(cfg), **_channel_schedule(cfg), "max_k": MAX_CHANNEL_K,
            "smem_bytes": channel_smem_bytes(cfg), "cluster_n": CHANNEL_CLUSTER_N}


def render_group(cfg: KernelConfig) -> dict:
    if cfg.granularity.group != GROUP:
        raise ValueError(f"sm90_prefill_group serves group={GROUP} only; got {cfg.granularity.name}")
    return {**_common_values(cfg), "group": GROUP, "smem_bytes": group_smem_bytes(cfg),
            "cluster_n": GROUP_CLUSTER_N,
            "wgmma_tokens": min(cfg.tile_m, GROUP_WGMMA_TOKENS),
            # a second widened-weight buffer fits beside a sum of at most one wgmma block (64 x 128 registers)
            "widen_ahead": cfg.tile_m <= GROUP_WGMMA_TOKENS,
            "scheduler": cpp_names.TILE_SCHEDULER[cfg.scheduler]}


SM90_PREFILL_CHANNEL = register(Family(
    name="sm90_prefill_channel",
    archs=ARCHS,
    path="int8",
    granularity="channel",
    template="sm90_prefill_channel.cu.jinja",
    act_format="s8",
    weight_layout="sm90_prefill",
    align_k=ALIGN_K,
    align_n=WEIGHT_ALIGN_N,
    tiles=CHANNEL_TILES,
    stages=CHANNEL_STAGES,
    split_k=(1,),
    smem_bytes=channel_smem_bytes,
    render=render_channel,
    schedulers=("persistent", "streamk"),
    act_bits=(4, 8),
))

SM90_PREFILL_GROUP = register(Family(
    name="sm90_prefill_group",
    archs=ARCHS,
    path="fp8",
    granularity="group",
    template="sm90_prefill_group.cu.jinja",
    act_format="e4m3",
    weight_layout="sm90_prefill",
    align_k=ALIGN_K,
    align_n=WEIGHT_ALIGN_N,
    tiles=GROUP_TILES,
    stages=GROUP_STAGES,
    split_k=(1,),
    smem_bytes=group_smem_bytes,
    render=render_group,
    groups=(GROUP,),
    schedulers=("hybrid",),
))
