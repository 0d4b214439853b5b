// Per-value activation quantization, shared by every runtime kernel that writes quantized activations
// (quantize.cu: from a stored x; fused_quantize.cu: inside the op that produces x), so that all of them give the
// numerics of apex4gen/reference.py quantize_activation bit for bit: fp32 absmax, s = absmax / qmax (IEEE
// division), q = clamp(rint(x / s), -qmax - 1, qmax), s == 0 -> q = 0; qmax = 7 for 4-bit activations, 127 for
// 8-bit ones. Must be compiled without fast-math; the divisions are spelled __fdiv_rn so that a stray
// -use_fast_math cannot change them.
// A value is quantized with one multiply by RN(1/s) and rounded with FP32 adds (quantize_value) instead of an
// IEEE division and int <-> float conversions (quarter-rate pipes); the division runs only for values near a
// rounding boundary.
#pragma once
#include "apex4gen.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <stdint.h>

namespace apex4gen_quant {

// Programmatic dependent launch: let the next grid in the stream (the GEMM) start its prologue now.
__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// kVec consecutive values of one row, loaded in one access (16 bytes for kVec = 8, 4 bytes for kVec = 2).
template <typename T, int kVec>
struct alignas(kVec * sizeof(T)) Vector {
  T v[kVec];
};

template <int kVec>
struct QuantizedVector {
  int q[kVec];
};

// Adding 1.5 * 2^23 rounds |y| < 2^22 to an integer (round to nearest even, as rint) held in the low
// mantissa bits: t's bits are kRoundBits + rint(y).
constexpr float kRoundMagic = 12582912.0f;
constexpr int kRoundBits = 0x4B400000;
// 4-bit: y = x * RN(1/s) is within |x/s| * 2^-23 (1 + 2^-25) <= 8.4e-7 of x / s (|x / s| <= 7 / (1 - 2^-24)), and
// RN(x / s) within 4.2e-7 of it: where y is more than 2^-19 (1.9e-6) from every half-integer, RN(x / s) lies
// on the same side of every rounding boundary, so rint(y) == rint(RN(x / s)). The margin below is 8x that.
// 8-bit: |x / s| <= 127 / (1 - 2^-24): y within 1.52e-5 of x / s, RN(x / s) within 3.9e-6 (half an ulp below
// 128), together under 2^-15.7; kFastMargin8 is 12x that (tests/test_quantize_fast_path.py checks these distances
// and the fast path on boundary values, for both).
constexpr float kFastMargin = 1.0f / 65536.0f;
constexpr float kFastMargin8 = 1.0f / 4096.0f;

// The integer range of one activation precision: qmax = 7 or 127, values -qmax - 1 .. qmax.
struct Levels {
  int qmax;
  float margin;  // the fast path's distance from a rounding boundary (above)
};

__host__ __device__ inline Levels levels_of(int act_bits) {
  return act_bits == 8 ? Levels{127, kFastMargin8} : Levels{7, kFastMargin};
}

__device__ __forceinline__ int quantize_value(float x, float scale, float inv_scale, Levels lv) {
  if (scale == 0.f) return 0;
  // _rn intrinsics: no multiply-add contraction, y and t are the rounded values the bound is about
  const float y = __fmul_rn(x, inv_scale);
  const float t = __fadd_rn(y, kRoundMagic);
  int q;
  if (fabsf(__fsub_rn(y, __fsub_rn(t, kRoundMagic))) <= 0.5f - lv.margin) {  // false for a non-finite y
    q = __float_as_int(t) - kRoundBits;
  } else {
    q = __float2int_rn(__fdiv_rn(x, scale));  // the reference's division, for values near a boundary
  }
  return min(max(q, -lv.qmax - 1), lv.qmax);
}

// The block's reduction of every thread's value by op (warp shuffles, then one warp over the per-warp results;
// every thread gets it). partial: shared, one value per warp. Lanes past the block's warps contribute zero: the
// identity of both reductions here (a sum, and a maximum of absolute values).
template <typename V, typename Op>
__device__ __forceinline__ V block_reduce(V value, V* partial, Op op) {
  for (int offset = 16; offset > 0; offset /= 2) value = op(value, __shfl_xor_sync(0xFFFFFFFFu, value, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  value = lane < warps ? partial[lane] : V(0);
  for (int offset = 16; offset > 0; offset /= 2) value = op(value, __shfl_xor_sync(0xFFFFFFFFu, value, offset));
  return value;
}

struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// absmax with one vector's values folded in. The vector comes by value, already loaded: a reference into global or
// shared memory made ptxas split its 16-byte loads into 2-byte ones.
template <typename T, int kVec>
__device__ __forceinline__ float fold_absmax(float absmax, const Vector<T, kVec> v) {
#pragma unroll
  for (int i = 0; i < kVec; ++i) absmax = fmaxf(absmax, fabsf(to_float(v.v[i])));
  return absmax;
}

// absmax / qmax, the reference's IEEE division.
__device__ __forceinline__ float scale_of(float absmax, Levels lv) {
  return __fdiv_rn(absmax, static_cast<float>(lv.qmax));
}

// RN(1/s), the multiplier quantize_value's error bound assumes (inf for s == 0, never used: quantize_value returns
// 0 first).
__device__ __forceinline__ float inverse_scale(float scale) { return __frcp_rn(scale); }

// One vector quantized against its group's scale (by value, as fold_absmax).
template <typename T, int kVec>
__device__ __forceinline__ QuantizedVector<kVec> quantize_vector(const Vector<T, kVec> v, float scale, float inv_scale,
                                                                 Levels lv) {
  QuantizedVector<kVec> q;
#pragma unroll
  for (int i = 0; i < kVec; ++i) q.q[i] = quantize_value(to_float(v.v[i]), scale, inv_scale, lv);
  return q;
}

// -8..7 as float with an integer add and an FP32 add (no int -> float conversion).
__device__ __forceinline__ float small_int_to_float(int q) { return __int_as_float(q + kRoundBits) - kRoundMagic; }

template <int kVec>
__device__ __forceinline__ void store_s4(uint8_t* row, int k, const QuantizedVector<kVec>& q) {
  uint32_t packed = 0;
#pragma unroll
  for (int i = 0; i < kVec; ++i) packed |= static_cast<uint32_t>(q.q[i] & 0xF) << (4 * i);
  if constexpr (kVec == 8) {
    *reinterpret_cast<uint32_t*>(row + k / 2) = packed;
  } else {
    row[k / 2] = static_cast<uint8_t>(packed);
  }
}

template <typename Byte, int kVec>
__device__ __forceinline__ void store_bytes(Byte* row, int k, const Byte (&bytes)[kVec]) {
  struct alignas(kVec * sizeof(Byte)) Bytes { Byte b[kVec]; } out;
#pragma unroll
  for (int i = 0; i < kVec; ++i) out.b[i] = bytes[i];
  *reinterpret_cast<Bytes*>(row + k) = out;
}

template <apex4gen_act_format kFormat, int kVec>
__device__ __forceinline__ void store_quantized(void* qx, int64_t row_index, int k_total, int k,
                                                const QuantizedVector<kVec>& q) {
  if constexpr (kFormat == APEX4GEN_ACT_S4) {
    store_s4<kVec>(static_cast<uint8_t*>(qx) + row_index * (k_total / 2), k, q);
  } else if constexpr (kFormat == APEX4GEN_ACT_S8) {
    int8_t bytes[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) bytes[i] = static_cast<int8_t>(q.q[i]);
    store_bytes<int8_t, kVec>(static_cast<int8_t*>(qx) + row_index * k_total, k, bytes);
  } else {
    // -8..7 are exact in e4m3; converted two at a time (one instruction a pair)
    static_assert(kVec % 2 == 0, "e4m3 values are converted in pairs");
    __nv_fp8x2_storage_t pairs[kVec / 2];
#pragma unroll
    for (int i = 0; i < kVec / 2; ++i) {
      const float2 v = make_float2(small_int_to_float(q.q[2 * i]), small_int_to_float(q.q[2 * i + 1]));
      pairs[i] = __nv_cvt_float2_to_fp8x2(v, __NV_SATFINITE, __NV_E4M3);
    }
    store_bytes<__nv_fp8x2_storage_t, kVec / 2>(
        reinterpret_cast<__nv_fp8x2_storage_t*>(static_cast<__nv_fp8_storage_t*>(qx) + row_index * k_total), k / 2,
        pairs);
  }
}

}  // namespace apex4gen_quant
