// Weight packing on the GPU: the canonical int4 form (apex4gen/reference.py) into each kernel's layout
// (pack.cuh; apex4gen/kernels/layouts.py documents them), and prepared weights (every layout a build reads for
// one problem, in one caller-owned buffer). One thread a byte (or a scale) in a grid-stride loop: packing runs
// once per weight, at load, and reads the canonical bytes it gathers from L2.
#include "apex4gen.h"
#include "pack.cuh"

// From the build's dispatch.cu: what its kernels read.
extern "C" unsigned apex4gen_weight_layouts(int n, int k, int group, apex4gen_dtype out_dtype);
extern "C" int apex4gen_kernel_weight_layout(int index);

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;

struct Sm90Decode {
  __device__ static uint8_t byte(const uint8_t* qw, int64_t, int64_t k, int64_t out) {
    return apex4gen_pack::sm90_decode_byte(qw, k, out);
  }
  __device__ static int64_t scale_source(int64_t, int64_t groups, int64_t out) {
    return apex4gen_pack::sm90_decode_scale_source(groups, out);
  }
};

struct Sm90Prefill {
  __device__ static uint8_t byte(const uint8_t* qw, int64_t n, int64_t k, int64_t out) {
    return apex4gen_pack::sm90_prefill_byte(qw, n, k, out);
  }
  __device__ static int64_t scale_source(int64_t n, int64_t groups, int64_t out) {
    return apex4gen_pack::sm90_prefill_scale_source(n, groups, out);
  }
};

template <typename Layout>
__global__ void pack_values_kernel(const uint8_t* __restrict__ qw, int64_t n, int64_t k, uint8_t* __restrict__ out) {
  const int64_t total = n * k / 2;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += stride) {
    out[i] = Layout::byte(qw, n, k, i);
  }
}

template <typename Layout>
__global__ void pack_scales_kernel(const uint16_t* __restrict__ sw, int64_t n, int64_t groups,
                                   uint16_t* __restrict__ out) {
  const int64_t total = n * groups;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += stride) {
    out[i] = sw[Layout::scale_source(n, groups, i)];
  }
}

unsigned blocks_for(int64_t items) {
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

template <typename Layout>
int launch(const void* qw, const void* sw, int64_t n, int64_t k, int64_t groups, void* qw_out, void* sw_out,
           cudaStream_t stream) {
  pack_values_kernel<Layout><<<blocks_for(n * k / 2), kThreads, 0, stream>>>(
      static_cast<const uint8_t*>(qw), n, k, static_cast<uint8_t*>(qw_out));
  pack_scales_kernel<Layout><<<blocks_for(n * groups), kThreads, 0, stream>>>(
      static_cast<const uint16_t*>(sw), n, groups, static_cast<uint16_t*>(sw_out));
  return cudaGetLastError() == cudaSuccess ? APEX4GEN_OK : APEX4GEN_CUDA_ERROR;
}

int copy(const void* qw, const void* sw, size_t value_bytes, size_t scale_bytes, void* qw_out, void* sw_out,
         cudaStream_t stream) {
  if (cudaMemcpyAsync(qw_out, qw, value_bytes, cudaMemcpyDeviceToDevice, stream) != cudaSuccess ||
      cudaMemcpyAsync(sw_out, sw, scale_bytes, cudaMemcpyDeviceToDevice, stream) != cudaSuccess) {
    return APEX4GEN_CUDA_ERROR;
  }
  return APEX4GEN_OK;
}

// The problem itself: K even (two values a byte), groups dividing K.
bool valid_problem(int n, int k, int group) { return n > 0 && k > 0 && k % 2 == 0 && group > 0 && k % group == 0; }

int check_layout_shape(int layout, int n, int k) {
  switch (layout) {
    case APEX4GEN_LAYOUT_CANONICAL: return APEX4GEN_OK;
    case APEX4GEN_LAYOUT_SM90_DECODE: return n % 16 == 0 && k % 64 == 0 ? APEX4GEN_OK : APEX4GEN_BAD_SHAPE;
    case APEX4GEN_LAYOUT_SM90_PREFILL: return n % 16 == 0 && k % 32 == 0 ? APEX4GEN_OK : APEX4GEN_BAD_SHAPE;
    default: return APEX4GEN_BAD_ARGUMENT;
  }
}

size_t value_bytes(int n, int k) { return static_cast<size_t>(n) * static_cast<size_t>(k / 2); }
size_t scale_bytes(int n, int k, int group) { return static_cast<size_t>(n) * static_cast<size_t>(k / group) * 2; }
size_t align_up(size_t bytes) {
  return (bytes + APEX4GEN_PREPARED_ALIGN - 1) / APEX4GEN_PREPARED_ALIGN * APEX4GEN_PREPARED_ALIGN;
}
size_t part_bytes(int n, int k, int group) {
  return align_up(value_bytes(n, k)) + align_up(scale_bytes(n, k, group));
}

bool overlap(const void* a, size_t a_bytes, const void* b, size_t b_bytes) {
  const auto lo_a = reinterpret_cast<uintptr_t>(a), lo_b = reinterpret_cast<uintptr_t>(b);
  return lo_a < lo_b + b_bytes && lo_b < lo_a + a_bytes;
}

// Where a layout's part starts in a prepared weight holding `layouts` (parts in layout order).
size_t part_offset(unsigned layouts, int layout, int n, int k, int group) {
  return static_cast<size_t>(__builtin_popcount(layouts & ((1u << layout) - 1u))) * part_bytes(n, k, group);
}

}  // namespace

extern "C" APEX4GEN_EXPORT int apex4gen_pack_weight(apex4gen_weight_layout layout, const void* qw, const void* sw,
                                                    int n, int k, int group, void* qw_out, void* sw_out,
                                                    cudaStream_t stream) {
  if (!qw || !sw || !qw_out || !sw_out) return APEX4GEN_BAD_ARGUMENT;
  if (!valid_problem(n, k, group)) return APEX4GEN_BAD_SHAPE;
  const int shape = check_layout_shape(layout, n, k);
  if (shape != APEX4GEN_OK) return shape;
  const size_t values = value_bytes(n, k), scales = scale_bytes(n, k, group);
  // the packing gathers: an output may not overlap what it reads, nor the other output
  if (overlap(qw_out, values, qw, values) || overlap(qw_out, values, sw, scales) ||
      overlap(sw_out, scales, qw, values) || overlap(sw_out, scales, sw, scales) ||
      overlap(qw_out, values, sw_out, scales)) {
    return APEX4GEN_BAD_ARGUMENT;
  }
  if (reinterpret_cast<uintptr_t>(sw) % 2 || reinterpret_cast<uintptr_t>(sw_out) % 2) return APEX4GEN_BAD_ARGUMENT;
  const int64_t groups = k / group;
  switch (layout) {
    case APEX4GEN_LAYOUT_SM90_DECODE: return launch<Sm90Decode>(qw, sw, n, k, groups, qw_out, sw_out, stream);
    case APEX4GEN_LAYOUT_SM90_PREFILL: return launch<Sm90Prefill>(qw, sw, n, k, groups, qw_out, sw_out, stream);
    default: return copy(qw, sw, values, scales, qw_out, sw_out, stream);
  }
}

extern "C" APEX4GEN_EXPORT size_t apex4gen_prepared_weight_bytes(int n, int k, int group, apex4gen_dtype out_dtype) {
  if (!valid_problem(n, k, group)) return 0;
  const unsigned layouts = apex4gen_weight_layouts(n, k, group, out_dtype);
  return static_cast<size_t>(__builtin_popcount(layouts)) * part_bytes(n, k, group);
}

extern "C" APEX4GEN_EXPORT int apex4gen_prepare_weight(const void* qw, const void* sw, int n, int k, int group,
                                                       apex4gen_dtype out_dtype, void* prepared,
                                                       size_t prepared_bytes, cudaStream_t stream) {
  if (!qw || !sw || !prepared || reinterpret_cast<uintptr_t>(prepared) % APEX4GEN_PREPARED_ALIGN) {
    return APEX4GEN_BAD_ARGUMENT;
  }
  if (!valid_problem(n, k, group)) return APEX4GEN_BAD_SHAPE;
  const unsigned layouts = apex4gen_weight_layouts(n, k, group, out_dtype);
  if (layouts == 0) return APEX4GEN_NO_KERNEL;
  if (prepared_bytes < apex4gen_prepared_weight_bytes(n, k, group, out_dtype)) return APEX4GEN_BAD_ARGUMENT;
  for (int layout = 0; layout < APEX4GEN_NUM_WEIGHT_LAYOUTS; ++layout) {
    if (!(layouts & (1u << layout))) continue;
    uint8_t* part = static_cast<uint8_t*>(prepared) + part_offset(layouts, layout, n, k, group);
    const int status = apex4gen_pack_weight(static_cast<apex4gen_weight_layout>(layout), qw, sw, n, k, group, part,
                                            part + align_up(value_bytes(n, k)), stream);
    if (status != APEX4GEN_OK) return status;
  }
  return APEX4GEN_OK;
}

extern "C" APEX4GEN_EXPORT int apex4gen_prepared_operands(int kernel, const void* prepared, int n, int k, int group,
                                                          apex4gen_dtype out_dtype, const void** qw,
                                                          const void** sw) {
  if (!prepared || !qw || !sw) return APEX4GEN_BAD_ARGUMENT;
  if (!valid_problem(n, k, group)) return APEX4GEN_BAD_SHAPE;
  const int layout = apex4gen_kernel_weight_layout(kernel);
  const unsigned layouts = apex4gen_weight_layouts(n, k, group, out_dtype);
  if (layout < 0 || !(layouts & (1u << layout))) return APEX4GEN_NO_KERNEL;
  const uint8_t* part = static_cast<const uint8_t*>(prepared) + part_offset(layouts, layout, n, k, group);
  *qw = part;
  *sw = part + align_up(value_bytes(n, k));
  return APEX4GEN_OK;
}
