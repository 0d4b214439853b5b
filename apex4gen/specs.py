"""GPU, model and workload specs: frozen records loaded from YAML with strict validation.

Shipped specs live in ``specs/{gpus,models,workloads}/NAME.yaml`` (see :func:`apex4gen.paths.specs_dir`).
Wherever a shipped name is accepted, a path to the user's own YAML file is accepted too.

GPU file: every number is ``{value: X, source: "where it comes from"}``; rates are dense (no sparsity).
``tensor_tops.fp16`` is FP16 inputs with FP32 accumulation, which is what PyTorch's FP16 GEMMs run (half the
FP16-accumulate rate on GeForce cards). ``rho`` may be stated; it must agree with the rates within 5%.

rho: for a GPU with native INT4 tensor cores, dense INT4 tensor TOPS / FP32 CUDA-core TFLOPS (APEX4's ρ).
Where INT4 is emulated or absent (Hopper), W4A4 computes on INT8/FP8 tensor cores, so the ρ the planner uses
is that path's rate over FP32 (H100 SXM: 1979 / 67 ≈ 30); :meth:`GpuSpec.rho_of` gives it per path.

A GPU file may add a ``measured:`` section, what ``apex4gen probe`` measured on that GPU (each number
``{value, source}``): ``tensor_tops`` per type (the microbenchmark peak of the instruction the kernels issue:
wgmma on Hopper, mma.sync elsewhere), ``fp32_tflops`` (FFMA), ``stream_gbs`` (a kernel that only reads 4-bit
weights and scales) and ``dequant_ops_int`` / ``dequant_ops_float`` (one group partial's promotion, in FP32
instructions: the FFMA rate over the promotion loop's). The cost model divides by these instead of the datasheet
figures above (apex4gen/costmodel.py); the top-level figures stay what the spec says of the GPU.

Workload file: ``points`` of ``{phase: prefill, batch: B, seq_len: L, weight: W}`` (M = B*L tokens) or
``{phase: decode, batch: B, weight: W}`` (M = B). A weight is the share of FP16 linear-layer time spent at that
point (normalised to sum to 1), so the end-to-end speedup is the weighted harmonic mean of per-point speedups.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import SpecError
from .paths import specs_dir
from .schema import Fields, did_you_mean, read_yaml

ARCHITECTURES = ("sm_80", "sm_86", "sm_89", "sm_90")
# Our Hopper kernels use wgmma, which exists only in the arch-specific sm_90a target.
_KERNEL_ARCH = {"sm_80": "sm_80", "sm_86": "sm_86", "sm_89": "sm_89", "sm_90": "sm_90a"}
# CUDA C++ Programming Guide, "Technical Specifications per Compute Capability": opt-in max per block.
SMEM_LIMIT_KB = {"sm_80": 163, "sm_86": 99, "sm_89": 99, "sm_90": 227}
INT4_MODES = ("native", "emulated", "absent")
TENSOR_TYPES = ("int4", "int8", "fp8", "fp16")
WIDE_PATHS = ("int8", "fp8")
RHO_TOLERANCE = 0.05
MODEL_DTYPES = {"float16": "f16", "bfloat16": "bf16"}
MODEL_ARCHITECTURES = ("llama", "mistral", "qwen2")
PHASES = ("prefill", "decode")


def _canonical_sha256(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class TensorThroughput:
    """Dense tensor-core rates in TOPS/TFLOPS; ``None`` where the GPU has no such tensor cores."""

    int8: float
    fp16: float
    int4: float | None = None
    fp8: float | None = None


@dataclass(frozen=True)
class MeasuredRates:
    """A GPU's ``measured:`` section (``apex4gen probe``): microbenchmark peaks the cost model uses."""

    tensor_tops: TensorThroughput
    fp32_tflops: float
    stream_gbs: float
    dequant_ops_int: float
    dequant_ops_float: float

    def tops(self, path: str) -> float | None:
        return getattr(self.tensor_tops, path)


@dataclass(frozen=True)
class GpuSpec:
    name: str
    full_name: str
    architecture: str
    int4_tensor_cores: str
    sm_count: int
    boost_clock_mhz: float
    tensor_tops: TensorThroughput
    fp32_tflops: float
    dram_bandwidth_gbs: float
    l2_mb: float
    smem_per_block_kb: int
    sources: tuple[tuple[str, str], ...]
    measured: MeasuredRates | None = None

    @property
    def kernel_arch(self) -> str:
        return _KERNEL_ARCH[self.architecture]

    @property
    def smem_per_block_bytes(self) -> int:
        return self.smem_per_block_kb * 1024

    @property
    def compute_paths(self) -> tuple[str, ...]:
        """Tensor-core types a W4A4 kernel may compute on here: native INT4, else the wider types present."""
        if self.int4_tensor_cores == "native":
            return ("int4",)
        return tuple(p for p in WIDE_PATHS if getattr(self.tensor_tops, p) is not None)

    def tops(self, path: str) -> float:
        rate = getattr(self.tensor_tops, path)
        if rate is None:
            raise SpecError(f"GPU {self.name} has no {path} tensor-core rate")
        return rate

    def rho_of(self, path: str) -> float:
        return self.tops(path) / self.fp32_tflops

    @property
    def rho(self) -> float:
        return max(self.rho_of(p) for p in self.compute_paths)

    def to_dict(self) -> dict:
        """Without ``measured`` when the spec has none, so a datasheet spec's hash stays what it was."""
        data = asdict(self)
        if self.measured is None:
            del data["measured"]
        return data

    def sha256(self) -> str:
        return _canonical_sha256(self.to_dict())


@dataclass(frozen=True)
class ModelSpec:
    name: str
    full_name: str
    source: str
    architecture: str
    dtype: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_layers: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def out_dtype(self) -> str:
        return MODEL_DTYPES[self.dtype]

    def to_dict(self) -> dict:
        return asdict(self)

    def sha256(self) -> str:
        return _canonical_sha256(self.to_dict())


@dataclass(frozen=True, order=True)
class WorkloadPoint:
    phase: str
    batch: int
    seq_len: int          # 1 for decode
    weight: float

    @property
    def m(self) -> int:
        return self.batch * self.seq_len

    @property
    def label(self) -> str:
        return f"{self.phase} M={self.m}"


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    description: str
    points: tuple[WorkloadPoint, ...]

    def normalised_weights(self) -> tuple[float, ...]:
        total = sum(p.weight for p in self.points)
        return tuple(p.weight / total for p in self.points)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- resolving


def _is_path(ref: str | Path) -> bool:
    text = str(ref)
    return isinstance(ref, Path) or "/" in text or text.endswith((".yaml", ".yml"))


def list_specs(kind: str) -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in (specs_dir() / kind).glob("*.yaml")))


def list_gpus() -> tuple[str, ...]:
    return list_specs("gpus")


def list_models() -> tuple[str, ...]:
    return list_specs("models")


def list_workloads() -> tuple[str, ...]:
    return list_specs("workloads")


def spec_file(kind: str, ref: str | Path) -> Path:
    """The YAML file behind a shipped name or a user's path; unknown names list the nearest ones."""
    noun = kind[:-1]
    if _is_path(ref):
        path = Path(ref).expanduser()
        if not path.is_file():
            raise SpecError(f"{noun} spec file {path} does not exist")
        return path
    names = list_specs(kind)
    if ref not in names:
        raise SpecError(f"unknown {noun.upper() if noun == 'gpu' else noun} {ref!r}{did_you_mean(str(ref), names)}"
                        f" (known: {', '.join(names)}; or give a path to a YAML file)")
    return specs_dir() / kind / f"{ref}.yaml"


# Keys that only one kind of spec file has: they tell a file's kind before any schema is applied.
_KIND_KEYS = {
    "gpus": ("int4_tensor_cores", "tensor_tops", "rho", "sm_count", "boost_clock_mhz", "fp32_tflops",
             "dram_bandwidth_gbs", "l2_mb", "smem_per_block_kb", "measured"),
    "models": ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_layers",
               "vocab_size", "head_dim", "tie_word_embeddings", "attention_bias", "dtype", "source"),
    "workloads": ("points", "description"),
}


def spec_kind(data: object, path: str | Path) -> str:
    """Which kind of spec a parsed YAML file is ("gpus", "models" or "workloads"), from the keys only one kind has,
    so that a typo in one field is reported against the file's own schema rather than another kind's."""
    keys = set(data) if isinstance(data, dict) else set()
    votes = {kind: len(keys.intersection(own)) for kind, own in _KIND_KEYS.items()}
    best = max(votes.values())
    winners = [kind for kind, n in votes.items() if n == best]
    if best == 0 or len(winners) > 1:
        raise SpecError(f"{path}: cannot tell whether this is a GPU, model or workload spec (no keys of one kind: "
                        f"a GPU has tensor_tops, a model hidden_size, a workload points); compare it with a file "
                        f"under `apex4gen specs list`")
    return winners[0]


def load_any(path: str | Path) -> "GpuSpec | ModelSpec | WorkloadSpec":
    """A user's spec file of any kind, validated against the schema of the kind its keys name."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise SpecError(f"spec file {file} does not exist")
    data = read_yaml(file)
    parse = {"gpus": parse_gpu, "models": parse_model, "workloads": parse_workload}[spec_kind(data, file)]
    return parse(data, file)


def load_gpu(ref: str | Path | GpuSpec) -> GpuSpec:
    if isinstance(ref, GpuSpec):
        return ref
    path = spec_file("gpus", ref)
    return parse_gpu(read_yaml(path), path)


def load_model(ref: str | Path | ModelSpec) -> ModelSpec:
    if isinstance(ref, ModelSpec):
        return ref
    path = spec_file("models", ref)
    return parse_model(read_yaml(path), path)


def load_workload(ref: str | Path | WorkloadSpec) -> WorkloadSpec:
    if isinstance(ref, WorkloadSpec):
        return ref
    path = spec_file("workloads", ref)
    return parse_workload(read_yaml(path), path)


# ---------------------------------------------------------------------------------------------- GPU files

_GPU_NUMBERS = ("sm_count", "boost_clock_mhz", "fp32_tflops", "dram_bandwidth_gbs", "l2_mb", "smem_per_block_kb")
_GPU_KEYS = ("name", "full_name", "architecture", "int4_tensor_cores", "tensor_tops", "rho", "measured") + _GPU_NUMBERS
_MEASURED_NUMBERS = ("fp32_tflops", "stream_gbs", "dequant_ops_int", "dequant_ops_float")
_INT_NUMBERS = ("sm_count", "smem_per_block_kb")


def _sourced(fields: Fields, key: str, kind: type, sources: dict, default: object = ...):
    """A ``{value, source}`` number: positive, and its source recorded under its dotted name."""
    if default is not ... and not fields.has(key):
        return default
    sub = fields.sub(key, ("value", "source"))
    value = sub.positive("value", kind)
    source = sub.take("source", str)
    if not source.strip():
        raise sub.error("source", "must say where the number comes from")
    sources[sub.prefix] = source
    return value


def _tensor_rates(fields: Fields, arch: str, sources: dict) -> dict:
    sub = fields.sub("tensor_tops", TENSOR_TYPES)
    rates = {t: _sourced(sub, t, float, sources, None) for t in TENSOR_TYPES}
    for needed in ("int8", "fp16"):
        if rates[needed] is None:
            raise sub.error(needed, "missing")
    if rates["fp8"] is not None and arch not in ("sm_89", "sm_90"):
        raise sub.error("fp8", f"FP8 tensor cores need sm_89 or newer, this GPU is {arch}")
    return rates


def _tensor_tops(fields: Fields, arch: str, int4_mode: str, sources: dict) -> TensorThroughput:
    rates = _tensor_rates(fields, arch, sources)
    sub = fields.sub("tensor_tops", TENSOR_TYPES)
    if int4_mode == "native" and rates["int4"] is None:
        raise sub.error("int4", "missing (int4_tensor_cores is native)")
    if int4_mode == "absent" and rates["int4"] is not None:
        raise sub.error("int4", "given, but int4_tensor_cores is absent")
    return TensorThroughput(**rates)


def _measured(fields: Fields, arch: str, sources: dict) -> MeasuredRates | None:
    """The optional ``measured:`` section: every number sourced, int8 and fp16 tensor rates at least."""
    sub = fields.sub("measured", ("tensor_tops",) + _MEASURED_NUMBERS, None)
    if sub is None:
        return None
    numbers = {k: _sourced(sub, k, float, sources) for k in _MEASURED_NUMBERS}
    return MeasuredRates(TensorThroughput(**_tensor_rates(sub, arch, sources)), **numbers)


def _check_int4_mode(fields: Fields, arch: str, mode: str) -> None:
    if arch == "sm_90" and mode == "native":
        raise fields.error("int4_tensor_cores", "Hopper (sm_90) has no INT4 tensor cores: use emulated")


def _check_stated_rho(fields: Fields, gpu: GpuSpec) -> None:
    stated = fields.positive("rho", float, None)
    if stated is not None and abs(stated - gpu.rho) > RHO_TOLERANCE * gpu.rho:
        raise fields.error("rho", f"states {stated:g} but the rates give {gpu.rho:.2f}"
                           f" ({'/'.join(gpu.compute_paths)} tensor TOPS / FP32 TFLOPS); set rho to "
                           f"{gpu.rho:.2f} or delete the rho line (it is computed from the rates)")


def _check_smem(fields: Fields, arch: str, kb: int) -> None:
    if kb > SMEM_LIMIT_KB[arch]:
        raise fields.error("smem_per_block_kb.value", f"{kb} KB exceeds the {arch} limit of {SMEM_LIMIT_KB[arch]} KB")


def parse_gpu(data: object, file: str | Path) -> GpuSpec:
    fields = Fields(data, file, "", _GPU_KEYS)
    arch = fields.choice("architecture", ARCHITECTURES)
    mode = fields.choice("int4_tensor_cores", INT4_MODES)
    _check_int4_mode(fields, arch, mode)
    sources: dict[str, str] = {}
    numbers = {k: _sourced(fields, k, int if k in _INT_NUMBERS else float, sources) for k in _GPU_NUMBERS}
    _check_smem(fields, arch, numbers["smem_per_block_kb"])
    tensor_tops = _tensor_tops(fields, arch, mode, sources)
    measured = _measured(fields, arch, sources)
    gpu = GpuSpec(name=fields.take("name", str), full_name=fields.take("full_name", str), architecture=arch,
                  int4_tensor_cores=mode, tensor_tops=tensor_tops, sources=tuple(sorted(sources.items())),
                  measured=measured, **numbers)
    if not gpu.compute_paths:
        raise fields.error("tensor_tops", "no tensor-core type a W4A4 kernel can compute on")
    _check_stated_rho(fields, gpu)
    return gpu


# ---------------------------------------------------------------------------------------------- model files

_MODEL_INTS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_layers",
               "vocab_size")
_MODEL_KEYS = ("name", "full_name", "source", "architecture", "dtype", "head_dim", "tie_word_embeddings",
               "attention_bias") + _MODEL_INTS


def _head_dim(fields: Fields, hidden: int, heads: int) -> int:
    """Stated head_dim wins (some models decouple it); otherwise the heads must split hidden evenly."""
    stated = fields.positive("head_dim", int, None)
    if stated is not None:
        return stated
    if hidden % heads:
        raise fields.error("num_attention_heads", f"{heads} heads do not divide hidden_size {hidden}")
    return hidden // heads


def parse_model(data: object, file: str | Path) -> ModelSpec:
    fields = Fields(data, file, "", _MODEL_KEYS)
    ints = {k: fields.positive(k, int) for k in _MODEL_INTS}
    heads, kv_heads = ints["num_attention_heads"], ints["num_key_value_heads"]
    if heads % kv_heads:
        raise fields.error("num_key_value_heads", f"{kv_heads} KV heads do not divide {heads} attention heads")
    return ModelSpec(
        name=fields.take("name", str), full_name=fields.take("full_name", str), source=fields.take("source", str),
        architecture=fields.choice("architecture", MODEL_ARCHITECTURES),
        dtype=fields.choice("dtype", tuple(MODEL_DTYPES)),
        head_dim=_head_dim(fields, ints["hidden_size"], heads),
        tie_word_embeddings=fields.take("tie_word_embeddings", bool),
        attention_bias=fields.take("attention_bias", bool), **ints)


# ---------------------------------------------------------------------------------------------- workloads


def _point(data: object, file: str | Path, index: int) -> WorkloadPoint:
    fields = Fields(data, file, f"points[{index}]", ("phase", "batch", "seq_len", "weight"))
    phase = fields.choice("phase", PHASES)
    batch = fields.positive("batch", int)
    weight = fields.positive("weight", float)
    if phase == "decode":
        if fields.has("seq_len"):
            raise fields.error("seq_len", "a decode step computes one token a sequence; remove seq_len")
        return WorkloadPoint(phase, batch, 1, weight)
    return WorkloadPoint(phase, batch, fields.positive("seq_len", int), weight)


def parse_workload(data: object, file: str | Path) -> WorkloadSpec:
    fields = Fields(data, file, "", ("name", "description", "points"))
    raw = fields.items("points")
    if not raw:
        raise fields.error("points", "needs at least one point")
    points = tuple(_point(p, file, i) for i, p in enumerate(raw))
    return WorkloadSpec(fields.take("name", str), fields.take("description", str), points)
