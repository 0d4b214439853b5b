// apex4gen C ABI: the contract between generated kernels, the hand-written runtime and every caller
// (the PyTorch ops, other engines). Numerics: apex4gen/reference.py and README.md "Numerics".
//
// Every build exports these functions under its own prefix: apex4gen_<prefix>_<name>, e.g.
// apex4gen_a40_llama2_70b_select_kernel. The build's generated header (apex4gen_<prefix>.h) declares them and
// apex4gen_<prefix>_api(), a table of them (apex4gen_api) for code written once for any build. The sources
// of a build spell the plain names (apex4gen_<name>); its link step adds the prefix, so several builds link
// into one process without clashing.
//
// Conventions of every call: a status code (apex4gen_status) or a documented value comes back; memory is the
// caller's (the library allocates nothing); GPU work runs on the stream given and the host never waits for
// it; calls may come from any thread (the library keeps no mutable state).
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <cuda_runtime.h>

// Builds compile with -fvisibility=hidden; what callers may link against is marked.
#define APEX4GEN_EXPORT __attribute__((visibility("default")))

// The ABI's version: changes whenever a declaration below changes meaning. A caller compares
// apex4gen_<prefix>_abi_version() with the APEX4GEN_ABI_VERSION it was compiled against.
// 2: activation precision (act_bits) in problems, routes, kernels, quantize_act; 3: rmsnorm_quantize_act and
// silu_mul_quantize_act (the quantizer fused into the op that produces the activation)
#define APEX4GEN_ABI_VERSION 3

#ifdef __cplusplus
extern "C" {
#endif

// Return codes. A caller turns them into one line with apex4gen_status_string().
typedef enum {
  APEX4GEN_OK = 0,
  APEX4GEN_BAD_SHAPE = 1,      // M/N/K/group that this kernel cannot take (alignment, divisibility)
  APEX4GEN_BAD_ARGUMENT = 2,   // null pointer, unknown format or dtype
  APEX4GEN_CUDA_ERROR = 3,     // a launch failed; cudaGetLastError() has the detail
  APEX4GEN_NO_KERNEL = 4,      // no kernel in this build serves the problem
  APEX4GEN_WORKSPACE = 5       // workspace too small (see workspace_bytes)
} apex4gen_status;

typedef enum { APEX4GEN_F16 = 0, APEX4GEN_BF16 = 1 } apex4gen_dtype;

// How quantized activations are stored. Values are -8..7 (4-bit activations, the default) or -128..127 (8-bit:
// a plan's per-layer W4A8, act_bits 8); only S8 and RAW carry 8-bit values.
typedef enum {
  APEX4GEN_ACT_S4 = 0,    // two values a byte, [M, K/2], low nibble first (canonical packing); 4-bit only
  APEX4GEN_ACT_S8 = 1,    // one int8 a value, [M, K]; 4- or 8-bit values
  APEX4GEN_ACT_E4M3 = 2,  // one float8 e4m3 a value, [M, K] (-8..7 are exact in e4m3); 4-bit only
  APEX4GEN_ACT_RAW = 3    // not quantized yet: qx is x [M, K] in the output dtype and sx is NULL;
                          // the kernel quantizes it itself (fused), with the reference's numerics, to its act_bits
} apex4gen_act_format;

// How a kernel reads the weights (apex4gen/kernels/layouts.py documents each). Every layout has the canonical
// sizes: N*K/2 bytes of values and N*(K/group) scales of 2 bytes (f16/bf16).
typedef enum {
  APEX4GEN_LAYOUT_CANONICAL = 0,    // values [N, K/2] packed int4 (reference.pack_int4), scales [N, K/group]
  APEX4GEN_LAYOUT_SM90_DECODE = 1,  // m16n8k32 mma fragment order; scales [N/16][K/group][16]; N%16, K%64
  APEX4GEN_LAYOUT_SM90_PREFILL = 2  // CUTLASS's wgmma reordering of 16x32 atoms; scales [K/group, N]; N%16, K%32
} apex4gen_weight_layout;
#define APEX4GEN_NUM_WEIGHT_LAYOUTS 3
// A prepared weight holds each layout the build reads for its problem, values then scales, each part starting
// at a multiple of this many bytes from the start (which must itself be aligned so: cudaMalloc's is).
#define APEX4GEN_PREPARED_ALIGN 256

// One GEMM: Y[M,N] = sum_g sx[m,g] * sw[n,g] * (sum_{k in g} qx[m,k] * qw[n,k]) + bias[n]
typedef struct {
  const void* qx;          // quantized activations, in the kernel family's act format
  const float* sx;         // activation scales, fp32, [M, K/group] row-major
  const void* qw;          // weights in the kernel's layout (apex4gen_prepared_operands finds them)
  const void* sw;          // weight scales in the kernel's layout, in the output dtype
  const void* bias;        // [N] in the output dtype, or NULL
  void* y;                 // [M, N] row-major, in the output dtype
  int m, n, k;
  int group;               // group size along K; K for per-channel
  void* workspace;         // split-K partials etc.; may be NULL when workspace_bytes is 0
  size_t workspace_bytes;
} apex4gen_gemm_args;

// Every generated kernel has one launcher of this type, named by its procedural name.
typedef int (*apex4gen_gemm_fn)(const apex4gen_gemm_args* args, cudaStream_t stream);
// Workspace a launcher needs for a problem (0 if none).
typedef size_t (*apex4gen_workspace_fn)(int m, int n, int k);

// The functions of a build, as X(return type, name, parameters), in ABI order (apex4gen_api's field order).
//
// Versions:  abi_version() (== APEX4GEN_ABI_VERSION of the header the build was made with), version() (the
//            apex4gen release that made the build), build_arch() (e.g. 86 or 90).
// Problems:  num_problems() / problem(): the GEMM problems (N, K, group, act_bits, output dtype) the build
//            serves; act_bits is the activation precision (4 or 8) the plan chose for the layers of a problem.
// Weights:   once per weight, from the canonical form (reference.py: values [N, K/2], scales [N, K/group]):
//            prepared_weight_bytes() -> allocate -> prepare_weight() on a stream. prepared_operands() then gives
//            the qw/sw a kernel reads. Lower level: weight_layouts() (the layouts a problem's kernels read, a
//            bit set of 1 << apex4gen_weight_layout), kernel_weight_layout(), pack_weight() (one layout).
//            A weight is prepared once for its (N, K, group, dtype), whatever the activation precision.
// Kernels:   select_kernel() (the plan's kernel for M and act_bits; -1: none), kernel_act_format(),
//            kernel_act_bits(), kernel_workspace(), run_kernel(). quantize_act() quantizes activations to
//            act_bits in a kernel's act format (not for RAW).
// Producers: the op that makes an activation, with quantize_act's output (same qx, sx, formats and numerics,
//            quantizing the op's result rounded to the dtype) instead of the activation itself:
//            rmsnorm_quantize_act(): y = rms_norm(x [M, K], weight [K], eps), the input of qkv/gate_up;
//            silu_mul_quantize_act(): y = silu(gate) * up from gate_up [M, 2K] (gate: the first K values of a row,
//            up: the next K; row stride ld), the input of down_proj. Numerics: reference.py rms_norm, silu_mul.
#define APEX4GEN_FUNCTIONS(X)                                                                                   \
  X(int, abi_version, (void))                                                                                   \
  X(const char*, version, (void))                                                                               \
  X(int, build_arch, (void))                                                                                    \
  X(const char*, status_string, (int status))                                                                   \
  X(int, num_problems, (void))                                                                                  \
  X(int, problem, (int index, int* n, int* k, int* group, int* act_bits, apex4gen_dtype* out_dtype))           \
  X(int, num_kernels, (void))                                                                                   \
  X(const char*, kernel_name, (int index))                                                                      \
  X(int, kernel_act_format, (int index))                                                                        \
  X(int, kernel_act_bits, (int index))                                                                          \
  X(int, kernel_weight_layout, (int index))                                                                     \
  X(unsigned, weight_layouts, (int n, int k, int group, apex4gen_dtype out_dtype))                              \
  X(int, pack_weight, (apex4gen_weight_layout layout, const void* qw, const void* sw, int n, int k, int group,   \
                       void* qw_out, void* sw_out, cudaStream_t stream))                                        \
  X(size_t, prepared_weight_bytes, (int n, int k, int group, apex4gen_dtype out_dtype))                         \
  X(int, prepare_weight, (const void* qw, const void* sw, int n, int k, int group, apex4gen_dtype out_dtype,     \
                          void* prepared, size_t prepared_bytes, cudaStream_t stream))                          \
  X(int, prepared_operands, (int kernel, const void* prepared, int n, int k, int group,                         \
                             apex4gen_dtype out_dtype, const void** qw, const void** sw))                       \
  X(int, quantize_act, (const void* x, int ldx, apex4gen_dtype x_dtype, int m, int k, int group, int act_bits,  \
                        apex4gen_act_format format, void* qx, float* sx, cudaStream_t stream))                  \
  X(int, rmsnorm_quantize_act, (const void* x, int ldx, const void* weight, float eps, apex4gen_dtype x_dtype,   \
                                int m, int k, int group, int act_bits, apex4gen_act_format format, void* qx,    \
                                float* sx, cudaStream_t stream))                                                \
  X(int, silu_mul_quantize_act, (const void* gate_up, int ld, apex4gen_dtype dtype, int m, int k, int group,     \
                                 int act_bits, apex4gen_act_format format, void* qx, float* sx,                 \
                                 cudaStream_t stream))                                                          \
  X(int, select_kernel, (int m, int n, int k, int group, int act_bits, apex4gen_dtype out_dtype))               \
  X(size_t, kernel_workspace, (int index, int m, int n, int k))                                                 \
  X(int, run_kernel, (int index, const apex4gen_gemm_args* args, cudaStream_t stream))

// A build's functions as a table: what code written for any build calls (apex4gen_<prefix>_api() fills it).
typedef struct {
#define APEX4GEN_API_FIELD_(ret, name, params) ret(*name) params;
  APEX4GEN_FUNCTIONS(APEX4GEN_API_FIELD_)
#undef APEX4GEN_API_FIELD_
} apex4gen_api;

// What a build's generated header expands: declarations of apex4gen_<prefix>_<name> and the table.
#define APEX4GEN_DECLARE_(prefix, ret, name, params) ret apex4gen_##prefix##_##name params;
#define APEX4GEN_TABLE_ENTRY_(prefix, ret, name, params) apex4gen_##prefix##_##name,

#ifdef __cplusplus
}
#endif
