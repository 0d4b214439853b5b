// Throughput of the INT4 tensor-core instruction, mma.sync.m16n8k64.s32.s4.s4.s32, on the GPU it runs on.
// Hopper has no INT4 tensor cores: for sm_90a ptxas emulates the instruction with a subroutine that widens the
// nibbles to bytes (LOP3/SHF/IMAD) and runs INT8 IMMA.16832 on them, so the figure is far below the INT8 rate.
// It is the `tensor_tops.int4` of specs/gpus/h100-sxm.yaml, which keeps the planner off INT4 on Hopper.
//
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a bench/probes/int4_mma_probe.cu -o int4_mma_probe
//   ./int4_mma_probe           # one line: dense TOPS (2 x 16 x 8 x 64 ops an instruction)
//   cuobjdump -sass int4_mma_probe | grep IMMA        # on sm_90a: IMMA.16832.S8.S8 only, no INT4 IMMA
//
// Each warp keeps kChains independent accumulators so that the issue rate, not one chain's latency, is timed;
// every SM gets kWarpsPerBlock x kBlocksPerSm warps.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#define CHECK(x)                                                                              \
  do {                                                                                        \
    cudaError_t e_ = (x);                                                                     \
    if (e_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

constexpr int kChains = 4;
constexpr int kIters = 4096;
constexpr int kWarpsPerBlock = 8;
constexpr int kBlocksPerSm = 4;
constexpr double kOpsPerMma = 2.0 * 16 * 8 * 64;

__device__ __forceinline__ void mma_s4(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Operands come from `seed` so the compiler cannot fold the products; the sums are written so it cannot drop them.
__global__ void mma_loop(uint32_t seed, int* sink) {
  const uint32_t v = seed ^ threadIdx.x;
  const uint32_t a[4] = {v, v * 3u, v * 5u, v * 7u};
  const uint32_t b[2] = {v * 11u, v * 13u};
  int acc[kChains][4] = {};
  for (int i = 0; i < kIters; ++i) {
#pragma unroll
    for (int c = 0; c < kChains; ++c) mma_s4(acc[c], a, b);
  }
  int sum = 0;
#pragma unroll
  for (int c = 0; c < kChains; ++c) sum += acc[c][0] + acc[c][1] + acc[c][2] + acc[c][3];
  sink[blockIdx.x * blockDim.x + threadIdx.x] = sum;
}

// Milliseconds of one launch over the whole GPU, after one warm-up launch.
float time_launch(int blocks, int threads, int* sink) {
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  mma_loop<<<blocks, threads>>>(1u, sink);
  CHECK(cudaEventRecord(start));
  mma_loop<<<blocks, threads>>>(2u, sink);
  CHECK(cudaEventRecord(stop));
  CHECK(cudaEventSynchronize(stop));
  CHECK(cudaGetLastError());
  float ms = 0.f;
  CHECK(cudaEventElapsedTime(&ms, start, stop));
  CHECK(cudaEventDestroy(start));
  CHECK(cudaEventDestroy(stop));
  return ms;
}

int main() {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int blocks = prop.multiProcessorCount * kBlocksPerSm;
  const int threads = kWarpsPerBlock * 32;
  int* sink = nullptr;
  CHECK(cudaMalloc(&sink, sizeof(int) * blocks * threads));
  const float ms = time_launch(blocks, threads, sink);
  const double mmas = double(blocks) * kWarpsPerBlock * kIters * kChains;
  std::printf("device %s (sm_%d%d, %d SMs): mma.sync m16n8k64 s4 %.1f TOPS dense (%.3f ms)\n", prop.name,
              prop.major, prop.minor, prop.multiProcessorCount, mmas * kOpsPerMma / (ms * 1e-3) / 1e12, ms);
  CHECK(cudaFree(sink));
  return 0;
}
