// What both Hopper prefill families (sm90_prefill_channel.cuh, sm90_prefill_group.cuh) share: CUTLASS 3.x's
// mixed-input mainloop re-instantiated with the plan's stage count, the device's SM count for the persistent
// grid, and the checked launch of a GemmUniversalAdapter.
#pragma once

#include <cutlass/cutlass.h>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/kernel_hardware_info.h>

#include "kernels/common.cuh"

namespace apex4gen::kernels {

// The builder sizes mixed-input pipelines only from a byte carveout; the plan names a stage count, so the built
// mainloop is re-instantiated with it (everything else as the builder chose).
template <int Stages, class Collective> struct WithStages;
template <int Stages, int BuiltStages, class Cluster, class Schedule, class... Rest>
struct WithStages<Stages, cutlass::gemm::collective::CollectiveMma<
    cutlass::gemm::MainloopSm90TmaGmmaRmemAWarpSpecializedMixedInput<BuiltStages, Cluster, Schedule>, Rest...>> {
  using Policy = cutlass::gemm::MainloopSm90TmaGmmaRmemAWarpSpecializedMixedInput<Stages, Cluster, Schedule>;
  using type = cutlass::gemm::collective::CollectiveMma<Policy, Rest...>;
};

// The device's SM count sizes the persistent grid; read per call (cheap, no sync) so multi-GPU hosts work.
inline cutlass::KernelHardwareInfo hardware_info() {
  cutlass::KernelHardwareInfo hw;
  cudaGetDevice(&hw.device_id);
  hw.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(hw.device_id);
  return hw;
}

// Runs `arguments` (made from `args`) on the caller's stream and workspace, as apex4gen_gemm_fn returns it.
template <class Gemm>
int run_adapter(const typename Gemm::Arguments& arguments, const apex4gen_gemm_args& args, cudaStream_t stream,
                bool launch_with_pdl) {
  if (args.workspace_bytes < Gemm::get_workspace_size(arguments)) return APEX4GEN_WORKSPACE;
  Gemm gemm;
  if (gemm.can_implement(arguments) != cutlass::Status::kSuccess) return APEX4GEN_BAD_SHAPE;
  if (gemm.initialize(arguments, args.workspace, stream) != cutlass::Status::kSuccess ||
      gemm.run(stream, nullptr, launch_with_pdl) != cutlass::Status::kSuccess) {
    return APEX4GEN_CUDA_ERROR;
  }
  return cudaPeekAtLastError() == cudaSuccess ? APEX4GEN_OK : APEX4GEN_CUDA_ERROR;
}

}  // namespace apex4gen::kernels
