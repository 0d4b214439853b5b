// apex4gen C ABI: the contract between generated kernels, the hand-written runtime and every caller
// (the PyTorch ops, other engines). Numerics: apex4gen/reference.py and README.md "Numerics".
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <cuda_runtime.h>

// Builds compile with -fvisibility=hidden; what callers may link against is marked.
#define APEX4GEN_EXPORT __attribute__((visibility("default")))

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

// How quantized activations are stored. Values are always -8..7; only the storage differs.
typedef enum {
  APEX4GEN_ACT_S4 = 0,    // two values a byte, [M, K/2], low nibble first (canonical packing)
  APEX4GEN_ACT_S8 = 1,    // one int8 a value, [M, K]
  APEX4GEN_ACT_E4M3 = 2,  // one float8 e4m3 a value, [M, K] (-8..7 are exact in e4m3)
  APEX4GEN_ACT_RAW = 3    // not quantized yet: qx is x [M, K] in the output dtype and sx is NULL;
                          // the kernel quantizes it itself (fused), with the reference's numerics
} apex4gen_act_format;

// One GEMM: Y[M,N] = sum_g sx[m,g] * sw[n,g] * (sum_{k in g} qx[m,k] * qw[n,k]) + bias[n]
typedef struct {
  const void* qx;          // quantized activations, in the kernel family's act format
  const float* sx;         // activation scales, fp32, [M, K/group] row-major
  const void* qw;          // weights in the kernel family's layout (canonical: [N, K/2] packed int4)
  const void* sw;          // weight scales, [N, K/group] row-major, in the output dtype
  const void* bias;        // [N] in the output dtype, or NULL
  void* y;                 // [M, N] row-major, in the output dtype
  int m, n, k;
  int group;               // group size along K; K for per-channel
  void* workspace;         // split-K partials etc.; may be NULL when workspace_bytes is 0
  size_t workspace_bytes;
} apex4gen_gemm_args;

// Every generated kernel exports one launcher of this type, named by its procedural name.
typedef int (*apex4gen_gemm_fn)(const apex4gen_gemm_args* args, cudaStream_t stream);
// Workspace a launcher needs for a problem (0 if none).
typedef size_t (*apex4gen_workspace_fn)(int m, int n, int k);

// Activation quantization (runtime/quantize.cu): x [M, K] (row stride ldx elements) in f16/bf16 ->
// qx in `format` and sx [M, K/group] fp32.
APEX4GEN_EXPORT int apex4gen_quantize_act(const void* x, int ldx, apex4gen_dtype x_dtype, int m, int k, int group,
                          apex4gen_act_format format, void* qx, float* sx, cudaStream_t stream);

APEX4GEN_EXPORT const char* apex4gen_status_string(int status);

// Build-level dispatch (generated/<build>/dispatch.cu): the kernels of one build and the plan's M buckets.
APEX4GEN_EXPORT int apex4gen_num_kernels(void);
APEX4GEN_EXPORT const char* apex4gen_kernel_name(int index);
APEX4GEN_EXPORT int apex4gen_kernel_act_format(int index);
// The kernel the plan chose for this problem, or -1.
APEX4GEN_EXPORT int apex4gen_select_kernel(int m, int n, int k, int group, apex4gen_dtype out_dtype);
APEX4GEN_EXPORT size_t apex4gen_kernel_workspace(int index, int m, int n, int k);
APEX4GEN_EXPORT int apex4gen_run_kernel(int index, const apex4gen_gemm_args* args, cudaStream_t stream);
// The architecture the build was compiled for, e.g. 86 or 90.
APEX4GEN_EXPORT int apex4gen_build_arch(void);

#ifdef __cplusplus
}
#endif
