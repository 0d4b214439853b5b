// Helpers every kernel family's launcher uses: argument checks of the C ABI (runtime/apex4gen.h).
#pragma once

#include <cstddef>
#include <cstdint>

#include "apex4gen.h"

namespace apex4gen::kernels {

inline bool aligned(const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// The pointers a GEMM of quantized activations cannot run without (bias may be null).
inline bool has_operands(const apex4gen_gemm_args* args) {
  return args && args->qx && args->sx && args->qw && args->sw && args->y;
}

}  // namespace apex4gen::kernels
