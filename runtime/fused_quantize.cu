// Activation quantization fused into the op that produces the activation: a decoder's RMSNorm (the input of
// qkv_proj and gate_up_proj) and SiLU(gate) * up (the input of down_proj). y is computed in fp32, rounded to the
// activation dtype, and quantized value by value as apex4gen_quantize_act quantizes a stored y (quantize.cuh), so
// the GEMM reads what the unfused path would give it, while y itself never goes to memory: one read of the
// producer's input, one write of qx/sx, one launch. Numerics: apex4gen/reference.py rms_norm and silu_mul.
//
// - rms_norm: S = sum of x^2 over the row, each square exact in fp32 (a 16-bit value has at most 11 significant
//   bits) and summed with a compensated (two-sum) fp32 accumulator per thread, the threads' (hi, lo) pairs then in
//   fp64: S is within ~2^-46 of exact, so ms = RN32(S / K) is the reference's (a float64 sum) but where S / K lies
//   that close to a float32 rounding boundary. Then r = RN32(1 / sqrt(RN32(ms + eps))) (__frsqrt_rn, correctly
//   rounded) and y = RN_dtype(RN32(RN32(x * r) * w)): every step IEEE, in the reference's order.
// - silu_mul: s = RN_dtype(silu(g)) with silu(g) = g / (1 + exp(-g)); y = RN_dtype(RN32(s * u)) (the engine's
//   order: F.silu rounds to the dtype, the product is rounded again). s is evaluated in fp32 (expf, within 2 ulp)
//   and kept where the interval of its error bound rounds to one dtype value. Otherwise it is evaluated in fp64,
//   rounded to fp32 and then to the dtype, as the reference rounds its float64 silu: for values near a dtype
//   rounding boundary (0.9% of the f16 values above kSiluFastFloor, 0.5% of bf16's: tests/test_fused_producers.py)
//   and for g <= kSiluFastFloor (exp(-g) nears fp32's overflow, while bf16 still holds the result).
//
// One block per row: y is staged in shared memory in the dtype (K * 2 bytes), each (row, group)'s absmax gathered
// with shuffles and a shared-memory atomicMax (absmax >= 0, so its bits order as the floats), then the row is
// quantized from shared memory. The dependent GEMM may launch at once (programmatic dependent launch, as
// quantize.cu): it waits for this grid's completion before reading qx/sx.
#include "apex4gen.h"
#include "quantize.cuh"

#include <algorithm>
#include <type_traits>

namespace {

using namespace apex4gen_quant;

constexpr int kMaxThreads = 512;
constexpr int kVectorsPerThread = 4;   // loads in flight per thread (rows of 512 vectors and up)
// |RN32(silu(g)) - silu(g)| <= 1.5 * 2^-22 |silu(g)| (expf 2 ulp, the add and the division half an ulp each):
// the margin is 10x that, relative.
constexpr float kSiluMargin = 1.0f / 262144.0f;
// Below this gate value exp(-g) nears fp32's overflow (88.7): the fp64 path takes it.
constexpr float kSiluFastFloor = -64.0f;

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// hi + lo += v exactly (Knuth's two-sum: the rounding error of hi + v goes into lo).
__device__ __forceinline__ void two_sum_add(float& hi, float& lo, float v) {
  const float sum = __fadd_rn(hi, v);
  const float v_part = __fsub_rn(sum, hi);
  const float error = __fadd_rn(__fsub_rn(hi, __fsub_rn(sum, v_part)), __fsub_rn(v, v_part));
  hi = sum;
  lo = __fadd_rn(lo, error);
}

struct SumOp {
  __device__ double operator()(double a, double b) const { return a + b; }
};

// RN_dtype(silu(g)): fp32 where its error interval rounds to one dtype value, else fp64 (see the file's head).
template <typename T>
__device__ __forceinline__ float silu_rounded(float g) {
  if (g > kSiluFastFloor) {
    const float s = __fdiv_rn(g, __fadd_rn(1.f, expf(-g)));
    const float reach = fabsf(s) * kSiluMargin;
    const T below = from_float<T>(__fsub_rn(s, reach)), above = from_float<T>(__fadd_rn(s, reach));
    if (to_float(below) == to_float(above)) return to_float(below);
  }
  const double gd = g;
  return to_float(from_float<T>(static_cast<float>(gd / (1.0 + exp(-gd)))));
}

// Lanes of a warp that hold vectors of one group and shuffle together: the largest power of two up to 32 dividing
// the group's vector count. Vector v of a row is thread v % blockDim.x's (blockDim.x a multiple of 32), so an
// aligned run of that many lanes always lies within one group.
__host__ __device__ inline int lanes_per_group(int vectors_per_group) {
  int lanes = 32;
  while (vectors_per_group % lanes) lanes /= 2;
  return lanes;
}

// Rows staged in shared memory: y (vectors of the dtype), then one absmax (as float bits) per group.
template <typename T, int kVec>
struct Staged {
  Vector<T, kVec>* y;
  unsigned* group_max;

  __device__ static Staged of(unsigned char* smem, int k) {
    return {reinterpret_cast<Vector<T, kVec>*>(smem), reinterpret_cast<unsigned*>(smem + k * sizeof(T))};
  }
};

// Zero the per-group absmax slots (the caller syncs before the first atomicMax).
template <typename T, int kVec>
__device__ __forceinline__ void clear_groups(const Staged<T, kVec>& staged, int groups) {
  for (int g = threadIdx.x; g < groups; g += blockDim.x) staged.group_max[g] = 0u;
}

// Stage the vector y of one thread at vector index v (valid) and fold its absmax into its group's: every thread
// of the block calls this the same number of times (shuffles need whole warps).
template <typename T, int kVec>
__device__ __forceinline__ void stage(const Staged<T, kVec>& staged, int v, bool valid, const Vector<T, kVec>& y,
                                      int vectors_per_group, int lanes) {
  float absmax = 0.f;
  if (valid) {
    staged.y[v] = y;
    absmax = fold_absmax(absmax, y);
  }
  for (int offset = lanes / 2; offset > 0; offset /= 2) absmax = fmaxf(absmax, __shfl_xor_sync(0xFFFFFFFFu, absmax, offset));
  if (valid && (threadIdx.x & (lanes - 1)) == 0) atomicMax(staged.group_max + v / vectors_per_group, __float_as_uint(absmax));
}

// The staged row quantized: scales first (one per group, written to sx and kept in the group's slot as float bits),
// then every vector against its group's scale.
template <typename T, int kVec, apex4gen_act_format kFormat>
__device__ void quantize_staged(const Staged<T, kVec>& staged, int64_t row, int k, int group, Levels lv, void* qx,
                                float* sx) {
  const int groups = k / group, vectors = k / kVec, vectors_per_group = group / kVec;
  __syncthreads();  // every absmax is in
  for (int g = threadIdx.x; g < groups; g += blockDim.x) {
    const float scale = scale_of(__uint_as_float(staged.group_max[g]), lv);
    staged.group_max[g] = __float_as_uint(scale);
    sx[row * groups + g] = scale;
  }
  __syncthreads();
  for (int v = threadIdx.x; v < vectors; v += blockDim.x) {
    const float scale = __uint_as_float(staged.group_max[v / vectors_per_group]);
    store_quantized<kFormat, kVec>(qx, row, k, v * kVec, quantize_vector(staged.y[v], scale, inverse_scale(scale),
                                                                          lv));
  }
}

template <typename T, int kVec, apex4gen_act_format kFormat>
__global__ void __launch_bounds__(kMaxThreads)
rmsnorm_quantize_kernel(const T* __restrict__ x, int ldx, const T* __restrict__ weight, float eps, int k, int group,
                        Levels lv, void* __restrict__ qx, float* __restrict__ sx) {
  allow_dependents();
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ double partial[kMaxThreads / 32];
  using Vec = Vector<T, kVec>;
  const auto staged = Staged<T, kVec>::of(smem, k);
  const int64_t row = blockIdx.x;
  const T* in = x + row * ldx;
  const int vectors = k / kVec, vectors_per_group = group / kVec, lanes = lanes_per_group(vectors_per_group);
  clear_groups(staged, k / group);

  float hi = 0.f, lo = 0.f;  // x is staged in y's place until r is known
  for (int v = threadIdx.x; v < vectors; v += blockDim.x) {
    const Vec xv = *reinterpret_cast<const Vec*>(in + v * kVec);
    staged.y[v] = xv;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const float f = to_float(xv.v[i]);
      two_sum_add(hi, lo, __fmul_rn(f, f));  // exact square
    }
  }
  // fp64 over the block (syncs it)
  const double sum = block_reduce(static_cast<double>(hi) + static_cast<double>(lo), partial, SumOp{});
  const float ms = static_cast<float>(sum / k);
  const float r = __frsqrt_rn(__fadd_rn(ms, eps));

  for (int base = 0; base < vectors; base += blockDim.x) {
    const int v = base + threadIdx.x;
    const bool valid = v < vectors;
    Vec y;
    if (valid) {
      const Vec xv = staged.y[v];
      const Vec wv = *reinterpret_cast<const Vec*>(weight + v * kVec);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        y.v[i] = from_float<T>(__fmul_rn(__fmul_rn(to_float(xv.v[i]), r), to_float(wv.v[i])));
      }
    }
    stage(staged, v, valid, y, vectors_per_group, lanes);
  }
  quantize_staged<T, kVec, kFormat>(staged, row, k, group, lv, qx, sx);
}

template <typename T, int kVec, apex4gen_act_format kFormat>
__global__ void __launch_bounds__(kMaxThreads)
silu_mul_quantize_kernel(const T* __restrict__ gate_up, int ld, int k, int group, Levels lv, void* __restrict__ qx,
                         float* __restrict__ sx) {
  allow_dependents();
  extern __shared__ __align__(16) unsigned char smem[];
  using Vec = Vector<T, kVec>;
  const auto staged = Staged<T, kVec>::of(smem, k);
  const int64_t row = blockIdx.x;
  const T* gate = gate_up + row * ld;
  const T* up = gate + k;
  const int vectors = k / kVec, vectors_per_group = group / kVec, lanes = lanes_per_group(vectors_per_group);
  clear_groups(staged, k / group);
  __syncthreads();

  for (int base = 0; base < vectors; base += blockDim.x) {
    const int v = base + threadIdx.x;
    const bool valid = v < vectors;
    Vec y;
    if (valid) {
      const Vec gv = *reinterpret_cast<const Vec*>(gate + v * kVec);
      const Vec uv = *reinterpret_cast<const Vec*>(up + v * kVec);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        y.v[i] = from_float<T>(__fmul_rn(silu_rounded<T>(to_float(gv.v[i])), to_float(uv.v[i])));
      }
    }
    stage(staged, v, valid, y, vectors_per_group, lanes);
  }
  quantize_staged<T, kVec, kFormat>(staged, row, k, group, lv, qx, sx);
}

// What one fused launch needs besides its kernel: a row of K values is one block.
struct RowLaunch {
  int m, k, group;
  Levels lv;
  void* qx;
  float* sx;
  cudaStream_t stream;
};

// Threads: a multiple of 32 giving ~kVectorsPerThread vectors each, at most kMaxThreads.
int threads_for(int vectors) {
  const int per = (vectors + kVectorsPerThread - 1) / kVectorsPerThread;
  return std::min(kMaxThreads, std::max(32, (per + 31) / 32 * 32));
}

// Shared memory of a row: y in the dtype, then a float per group.
template <typename T>
size_t staged_bytes(const RowLaunch& l) {
  return static_cast<size_t>(l.k) * sizeof(T) + sizeof(unsigned) * (l.k / l.group);
}

// The kernel's dynamic shared memory; BAD_SHAPE where the device cannot give that much.
template <typename Kernel>
int prepare_smem(Kernel kernel, size_t bytes) {
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    return APEX4GEN_CUDA_ERROR;
  }
  if (bytes > static_cast<size_t>(optin)) return APEX4GEN_BAD_SHAPE;  // a row too long to stage on this GPU
  if (bytes > 48 * 1024 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)) != cudaSuccess) {
    return APEX4GEN_CUDA_ERROR;
  }
  return APEX4GEN_OK;
}

// One block a row of `kernel` (vectors of kVec values), with the row's staged shared memory.
template <typename T, int kVec, typename Kernel, typename... Args>
int launch_rows(Kernel kernel, const RowLaunch& l, Args... args) {
  const size_t smem = staged_bytes<T>(l);
  const int status = prepare_smem(kernel, smem);
  if (status != APEX4GEN_OK) return status;
  kernel<<<static_cast<unsigned>(l.m), threads_for(l.k / kVec), smem, l.stream>>>(args...);
  return cudaGetLastError() == cudaSuccess ? APEX4GEN_OK : APEX4GEN_CUDA_ERROR;
}

// One launch of each producer, the kernel instantiation given as template arguments by dispatch().
struct RmsNormLaunch {
  const void* x;
  int ldx;
  const void* weight;
  float eps;
  RowLaunch l;

  template <typename T, int kVec, apex4gen_act_format kFormat>
  int run() const {
    return launch_rows<T, kVec>(rmsnorm_quantize_kernel<T, kVec, kFormat>, l, static_cast<const T*>(x), ldx,
                                static_cast<const T*>(weight), eps, l.k, l.group, l.lv, l.qx, l.sx);
  }
};

struct SiluMulLaunch {
  const void* gate_up;
  int ld;
  RowLaunch l;

  template <typename T, int kVec, apex4gen_act_format kFormat>
  int run() const {
    return launch_rows<T, kVec>(silu_mul_quantize_kernel<T, kVec, kFormat>, l, static_cast<const T*>(gate_up), ld,
                                l.k, l.group, l.lv, l.qx, l.sx);
  }
};

bool aligned(const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// The kernel instantiation for (dtype, vector width, format): launch.run<T, kVec, kFormat>(), so both producers
// share the dispatch.
template <typename Launch>
int dispatch(apex4gen_dtype dtype, bool wide, apex4gen_act_format format, const Launch& launch) {
  const auto by_format = [&](auto type_tag, auto vec_tag) -> int {
    using T = decltype(type_tag);
    constexpr int kVec = decltype(vec_tag)::value;
    switch (format) {
      case APEX4GEN_ACT_S4: return launch.template run<T, kVec, APEX4GEN_ACT_S4>();
      case APEX4GEN_ACT_S8: return launch.template run<T, kVec, APEX4GEN_ACT_S8>();
      case APEX4GEN_ACT_E4M3: return launch.template run<T, kVec, APEX4GEN_ACT_E4M3>();
      default: return APEX4GEN_BAD_ARGUMENT;  // RAW is quantized inside the GEMM, not here
    }
  };
  using Wide = std::integral_constant<int, 8>;
  using Narrow = std::integral_constant<int, 2>;
  if (dtype == APEX4GEN_F16) return wide ? by_format(__half{}, Wide{}) : by_format(__half{}, Narrow{});
  return wide ? by_format(__nv_bfloat16{}, Wide{}) : by_format(__nv_bfloat16{}, Narrow{});
}

// The checks both producers share: as apex4gen_quantize_act's, for a row of k quantized values.
int check_quantized_output(apex4gen_dtype dtype, int m, int k, int group, int act_bits, apex4gen_act_format format,
                           const void* qx, const float* sx) {
  if (!qx || !sx) return APEX4GEN_BAD_ARGUMENT;
  if (dtype != APEX4GEN_F16 && dtype != APEX4GEN_BF16) return APEX4GEN_BAD_ARGUMENT;
  if (act_bits != 4 && !(act_bits == 8 && format == APEX4GEN_ACT_S8)) return APEX4GEN_BAD_ARGUMENT;
  if (m < 0 || k <= 0 || group <= 0 || group % 2 || k % group) return APEX4GEN_BAD_SHAPE;
  if (!aligned(sx, 4) || !aligned(qx, 2)) return APEX4GEN_BAD_ARGUMENT;
  return APEX4GEN_OK;
}

// 16-byte vectors where every group, row and pointer allows them (and the s4 stores fall on 4-byte boundaries).
bool wide_vectors(int group, int ld, const void* a, const void* b, const void* qx) {
  return group % 8 == 0 && ld % 8 == 0 && aligned(a, 16) && aligned(b, 16) && aligned(qx, 8);
}

}  // namespace

extern "C" APEX4GEN_EXPORT int apex4gen_rmsnorm_quantize_act(const void* x, int ldx, const void* weight, float eps,
                                                             apex4gen_dtype x_dtype, int m, int k, int group,
                                                             int act_bits, apex4gen_act_format format, void* qx,
                                                             float* sx, cudaStream_t stream) {
  const int status = check_quantized_output(x_dtype, m, k, group, act_bits, format, qx, sx);
  if (status != APEX4GEN_OK) return status;
  if (!x || !weight || !(eps >= 0.f) || !aligned(x, 4) || !aligned(weight, 4)) return APEX4GEN_BAD_ARGUMENT;
  if (ldx < k || ldx % 2) return APEX4GEN_BAD_SHAPE;
  if (m == 0) return APEX4GEN_OK;
  const RowLaunch l{m, k, group, levels_of(act_bits), qx, sx, stream};
  const bool wide = wide_vectors(group, ldx, x, weight, qx);
  return dispatch(x_dtype, wide, format, RmsNormLaunch{x, ldx, weight, eps, l});
}

extern "C" APEX4GEN_EXPORT int apex4gen_silu_mul_quantize_act(const void* gate_up, int ld, apex4gen_dtype dtype,
                                                              int m, int k, int group, int act_bits,
                                                              apex4gen_act_format format, void* qx, float* sx,
                                                              cudaStream_t stream) {
  const int status = check_quantized_output(dtype, m, k, group, act_bits, format, qx, sx);
  if (status != APEX4GEN_OK) return status;
  if (!gate_up || !aligned(gate_up, 4)) return APEX4GEN_BAD_ARGUMENT;
  if (ld < 2 * static_cast<int64_t>(k) || ld % 2) return APEX4GEN_BAD_SHAPE;
  if (m == 0) return APEX4GEN_OK;
  const RowLaunch l{m, k, group, levels_of(act_bits), qx, sx, stream};
  // up starts k values after gate: 16-byte aligned with it when k is a multiple of 8 (group % 8 == 0 implies it)
  const bool wide = wide_vectors(group, ld, gate_up, gate_up, qx);
  return dispatch(dtype, wide, format, SiluMulLaunch{gate_up, ld, l});
}
