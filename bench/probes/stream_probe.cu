// What a pure weight stream reaches on this GPU at the decode GEMMs' sizes, timed as `apex4gen bench` times
// (one CUDA-graph replay of 20 launches over buffers rotated past L2, median of 15 samples / 20).
// It bounds the M <= 16 decode kernels: each launch only reads `bytes` with 16-byte non-caching loads
// (the decode kernel's load), folds them with XOR and writes one word per block.
//
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a bench/probes/stream_probe.cu -o stream_probe
//   ./stream_probe            # one line per (bytes, geometry): µs, TB/s, fraction of the D2D copy bandwidth
//
// Geometries: `tile` gives each block one contiguous range (the decode kernel's partition: N/rows row blocks
// times the K split); `stride` spreads the blocks over the buffer in 16 KB steps (grid-stride).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdint>
#include <vector>

#define CHECK(x)                                                                          \
  do {                                                                                    \
    cudaError_t e_ = (x);                                                                 \
    if (e_ != cudaSuccess) {                                                              \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 { %0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Each thread keeps D loads in flight: the oldest is consumed and replaced by the next one (the decode
// kernel's rolling pipeline). `vecs` 16-byte vectors per block, contiguous (tile) or interleaved (stride).
template <int D, bool kStride>
__global__ void stream_kernel(const uint4* __restrict__ src, size_t vecs_total, size_t vecs_per_block,
                              uint32_t* sink) {
  const int T = blockDim.x;
  // vector index of this thread's i-th load
  auto index = [&](size_t i) -> size_t {
    if (kStride) {
      const size_t step = 1024;  // 16 KB pieces
      const size_t piece = i * T / step, within = (i * T) % step + threadIdx.x;
      return (piece * gridDim.x + blockIdx.x) * step + within;
    }
    return blockIdx.x * vecs_per_block + i * T + threadIdx.x;
  };
  const size_t iters = vecs_per_block / T;
  uint4 buf[D];
#pragma unroll
  for (int d = 0; d < D; ++d) {
    const size_t v = index(d);
    buf[d] = d < iters && v < vecs_total ? load_stream(src + v) : make_uint4(0, 0, 0, 0);
  }
  uint32_t acc = 0;
  for (size_t i0 = 0; i0 < iters; i0 += D) {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      const uint4 v = buf[d];
      const size_t next = i0 + d + D, vi = index(next);
      if (next < iters && vi < vecs_total) buf[d] = load_stream(src + vi);
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
  }
  if (acc == 0x12345678u) sink[blockIdx.x] = acc;  // keeps the loads; practically never stores
}

__global__ void empty_kernel(uint32_t* sink) {
  if (threadIdx.x == 1000000) sink[0] = 0;
}

struct Geometry {
  int threads, depth, blocks;  // blocks 0: one block per SM slot (blocks_per_sm * SMs)
  bool stride;
  const char* note;
};

template <int D, bool S>
void launch(const Geometry& g, const uint4* src, size_t vecs, size_t per_block, uint32_t* sink, cudaStream_t st) {
  stream_kernel<D, S><<<g.blocks, g.threads, 0, st>>>(src, vecs, per_block, sink);
}

void launch_any(const Geometry& g, const uint4* src, size_t vecs, size_t per_block, uint32_t* sink,
                cudaStream_t st) {
  switch (g.depth * 2 + g.stride) {
    case 8: launch<4, false>(g, src, vecs, per_block, sink, st); break;
    case 9: launch<4, true>(g, src, vecs, per_block, sink, st); break;
    case 16: launch<8, false>(g, src, vecs, per_block, sink, st); break;
    case 17: launch<8, true>(g, src, vecs, per_block, sink, st); break;
    case 32: launch<16, false>(g, src, vecs, per_block, sink, st); break;
    case 33: launch<16, true>(g, src, vecs, per_block, sink, st); break;
    default: std::fprintf(stderr, "depth %d not built\n", g.depth); std::exit(1);
  }
}

template <class F>
float time_graph_us(F&& fn, int reps = 20, int samples = 15) {
  cudaStream_t st;
  CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  for (int i = 0; i < 3; ++i) fn(i, st);
  CHECK(cudaStreamSynchronize(st));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
  for (int i = 0; i < reps; ++i) fn(i, st);
  CHECK(cudaStreamEndCapture(st, &graph));
  CHECK(cudaGraphInstantiate(&exec, graph, 0));
  CHECK(cudaGraphLaunch(exec, st));
  CHECK(cudaStreamSynchronize(st));
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  std::vector<float> t;
  for (int s = 0; s < samples; ++s) {
    CHECK(cudaEventRecord(a, st));
    CHECK(cudaGraphLaunch(exec, st));
    CHECK(cudaEventRecord(b, st));
    CHECK(cudaEventSynchronize(b));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms * 1000.0f / reps);
  }
  std::sort(t.begin(), t.end());
  CHECK(cudaGraphExecDestroy(exec));
  CHECK(cudaGraphDestroy(graph));
  CHECK(cudaStreamDestroy(st));
  return t[t.size() / 2];
}

double copy_bandwidth() {  // as apex4gen.bench.copy_bandwidth: eager D2D copy of 1 GiB, read + written bytes
  const size_t n = size_t(1) << 30;
  void *a, *b;
  CHECK(cudaMalloc(&a, n));
  CHECK(cudaMalloc(&b, n));
  CHECK(cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice));
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  std::vector<float> t;
  for (int i = 0; i < 9; ++i) {
    CHECK(cudaEventRecord(e0));
    CHECK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice));
    CHECK(cudaEventRecord(e1));
    CHECK(cudaEventSynchronize(e1));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, e0, e1));
    t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  CHECK(cudaFree(a));
  CHECK(cudaFree(b));
  return 2.0 * n / (t[4] * 1e-3);
}

int main() {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  const double copy = copy_bandwidth();
  std::printf("device %s, %d SMs, L2 %d MB, D2D copy %.3f TB/s\n", prop.name, sms, prop.l2CacheSize >> 20,
              copy / 1e12);
  uint32_t* sink;
  CHECK(cudaMalloc(&sink, 1 << 20));
  const float empty = time_graph_us([&](int, cudaStream_t st) { empty_kernel<<<sms, 128, 0, st>>>(sink); });
  std::printf("empty kernel (%d blocks) in a graph: %.2f us a launch\n", sms, empty);

  // llama2-70b's GEMMs (N x K): int4 weights + fp16 g128 scales, N*K/2 + N*K/64 bytes
  struct Size { const char* name; size_t n, k; };
  const Size sizes[] = {{"o", 8192, 8192}, {"qkv", 10240, 8192}, {"down", 8192, 28672}, {"gate_up", 57344, 8192}};
  const Geometry geos[] = {
      {128, 8, 256, false, "decode o: 64 row blocks x split 4, 128 B in flight a thread"},
      {128, 16, 256, false, "same grid, 256 B in flight"},
      {128, 8, 512, false, "split 8: 512 blocks"},
      {128, 8, 4 * 132, false, "4 blocks a SM, contiguous"},
      {256, 8, 2 * 132, false, "2 x 256 a SM, contiguous"},
      {256, 16, 2 * 132, false, "2 x 256 a SM, 256 B in flight"},
      {512, 8, 132, false, "1 x 512 a SM"},
      {256, 8, 2 * 132, true, "2 x 256 a SM, grid-stride 16 KB"},
      {256, 16, 2 * 132, true, "2 x 256 a SM, grid-stride, 256 B"},
      {512, 8, 2 * 132, true, "2 x 512 a SM, grid-stride"},
      {256, 8, 8 * 132, true, "8 x 256 a SM (2 waves), grid-stride"},
      {128, 4, 1024, false, "1024 x 128, 64 B in flight"},
  };
  for (const Size& sz : sizes) {
    const size_t want = sz.n * sz.k / 2 + sz.n * sz.k / 64;
    const int copies = std::max(4, int((4.0 * prop.l2CacheSize) / want) + 1);
    // each block streams whole 16 KB pieces: a geometry reads `want` rounded up to blocks x 16 KB
    auto rounded = [&](const Geometry& g) {
      const size_t granule = size_t(g.blocks) * 16384;
      return (want + granule - 1) / granule * granule;
    };
    size_t largest = 0;
    for (const Geometry& g : geos) largest = std::max(largest, rounded(g));
    std::vector<uint4*> bufs(copies);
    for (auto& b : bufs) {
      CHECK(cudaMalloc(&b, largest));
      CHECK(cudaMemset(b, 1, largest));
    }
    for (const Geometry& g : geos) {
      const size_t bytes = rounded(g), vecs = bytes / 16, per_block = vecs / g.blocks;
      const float us = time_graph_us([&](int i, cudaStream_t st) {
        launch_any(g, bufs[i % copies], vecs, per_block, sink, st);
      });
      const double bw = bytes / (us * 1e-6);
      std::printf("%-8s %7.1f MB  %-48s %4d x %3d D%-2d %s  %7.2f us  %.3f TB/s  %5.1f%% of copy\n", sz.name,
                  bytes / 1e6, g.note, g.blocks, g.threads, g.depth, g.stride ? "stride" : "tile  ", us, bw / 1e12,
                  100.0 * bw / copy);
    }
    for (auto& b : bufs) CHECK(cudaFree(b));
  }
  CHECK(cudaGetLastError());
  return 0;
}
