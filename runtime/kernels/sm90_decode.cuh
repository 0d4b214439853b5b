// Decode (small M) W4A4 GEMM for sm_90a, activations quantized by the launcher (act format RAW).
//
// Memory-bound design: the int4 weights stream from DRAM once, as 16-byte loads in the order of the
// m16n8k32 int8 mma fragments (layout: apex4gen.kernels.layouts.pack_sm90_decode), P chunks in flight per
// thread: in registers, or (SMEM variants) as asynchronous copies into the thread's own shared-memory slots,
// whose depth costs no registers. Swap AB: weights are the 16-row A operand, tokens the n8 B operand.
//
// The launcher runs two kernels on the caller's stream:
// 1. quantize_x_kernel (one block a token) quantizes x once, with the reference numerics, into the workspace:
//    int4 (or, kActBits 8, int8) in the mma B-fragment order + fp32 scales. It lets the GEMM start at once (programmatic dependent
//    launch), so the GEMM's first weight loads overlap the quantization.
// 2. decode_kernel: K is split over the S blocks of a thread-block cluster; each block copies its weight
//    scales (group-wise), issues its first weight loads, waits for the quantization grid
//    (griddepcontrol.wait), copies its K-slice of the quantized x to shared memory and streams its weights;
//    the cluster reduces its partial sums through distributed shared memory in a fixed order (deterministic),
//    adds the bias and rounds once.
//
// The launcher holds one GEMM instantiation per token-tile count and K class (variants() in
// apex4gen/kernels/sm90_decode.py) and picks by M and K.
//
// The int4 weights are unpacked to int8 by masking nibbles into the high half of each byte (value * 16); 4-bit
// activations likewise, so every int32 partial is 256 * P exactly and >> 8 recovers P; 8-bit activations are
// int8 as they are, the partial is 16 * P and >> 4 recovers P. The int32 headroom is the same: 256 * 8 * 8 =
// 16 * 8 * 128 = 2^14 per product.
// Config (a rendered templates/sm90_decode.cu.jinja; values from apex4gen/kernels/sm90_decode.py render):
//   Out; kGroup (0: per-channel), kActBits (4 or 8: activation precision), kMaxM, kQuantIters, kAlignN, kAlignK, kLargeK; Variants, a std::tuple of
//   TokenTiles<MT, Variant<...> for K < kLargeK, Variant<...> for K >= kLargeK> in increasing MT.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

#include "apex4gen.h"

namespace apex4gen::kernels::sm90_decode {

namespace cg = cooperative_groups;

// One instantiation of the GEMM: MT token tiles of 8, WARPS warps, RT 16-row tiles a warp, P chunks in flight
// a row tile, the weight stream in registers or (SMEM) in shared memory.
template <int MT, int WARPS, int RT, int P, bool SMEM>
struct Variant {};

// The variants serving up to MT token tiles: Small for K below the family's large-K class, Large above.
template <int MT, class Small, class Large>
struct TokenTiles {};

// Device code of one configuration: the quantizer's body and the GEMM's helpers (the __global__ entry points
// quantize_x_kernel and decode_kernel follow the struct).
template <class Config>
struct Kernels {
  using Out = typename Config::Out;

  static constexpr int kGroup = Config::kGroup;          // 0: per-channel (one group spanning K)
  static constexpr int kGroupDiv = kGroup ? kGroup : 1;  // divisor in group-only code (compiled for both kinds)
  static constexpr int kActBits = Config::kActBits;      // 4 or 8 (reference.py: quantize_activation's bits)
  static_assert(kActBits == 4 || kActBits == 8, "activations are 4- or 8-bit");
  static constexpr int kQmax = kActBits == 8 ? 127 : 7;  // values -kQmax - 1 .. kQmax
  static constexpr int kShift = kActBits == 8 ? 4 : 8;   // partial = P << kShift (see the head of the file)
  static constexpr int kLaneBytes = 2 * kActBits;        // x bytes a lane holds per 64-wide chunk: 8 or 16
  static constexpr int kMaxM = Config::kMaxM;
  static constexpr int kChunk = 64;                   // K elements one 16-byte weight load covers (two mma k-steps)
  static constexpr int kMaxSplit = 8;                 // portable cluster size
  static constexpr int kQuantThreads = 512;           // quantize_x_kernel: one block a token
  static constexpr int kQuantIters = Config::kQuantIters;  // 8-value units a quantizing thread holds in registers
  static constexpr int kMaxK = kQuantThreads * 8 * kQuantIters;  // a token's row fits the quantizing block at once
  // int32 headroom of the per-channel sum: 2^14 * K < 2^31 (either precision, above); P = sum >> kShift converts
  // exactly below 2^24 for 4-bit x (|P| <= 64 K) and rounds once, within the tolerance, for 8-bit K > 2^14
  static_assert(kMaxK <= 131072, "per-channel int32 partial sums would overflow");
  // group partials go to float through exact_float: |P| <= (kQmax + 1) * 8 * group < 2^22
  static_assert(kGroup == 0 || (kQmax + 1) * 8 * kGroup < (1 << 22), "group partials too large for exact_float");

  struct Params {
    const uint8_t* qx;  // workspace: quantized x in B-fragment order [K/64][MT][32 lanes] x kLaneBytes (int4: 8
                        // bytes, word = k32 step; int8: 16 bytes {step 0 b0, b1, step 1 b0, b1})
    const float* sx;    // workspace: activation scales [K/group][MT*8] (per-channel: [1][MT*8])
    const uint4* w;     // pack_sm90_decode layout: [N/16][K/64][32 lanes] x 16 bytes
    const Out* sw;      // weight scales [N/16][K/group][16 rows] (per-channel: [N])
    const Out* bias;    // [N] or nullptr
    Out* y;             // [M, N]
    int m, n, k;
    int kslice;         // K elements per cluster rank
  };

  struct QuantParams {
    const Out* x;  // [M, K] raw activations
    uint8_t* qx;   // see Params::qx
    float* sx;     // see Params::sx
    int k, mt;     // mt: token tiles of the GEMM variant (the layout's tile stride)
  };

  // Workspace of a variant with MT token tiles: quantized x, then its scales (16-byte aligned).
  static __host__ __device__ constexpr int round16(int v) { return (v + 15) / 16 * 16; }
  static __host__ __device__ inline size_t qx_bytes(int mt, int k) { return (size_t)mt * 8 * k * kActBits / 8; }
  static __host__ __device__ inline size_t workspace_bytes(int mt, int k) {
    const int groups = kGroup ? k / kGroupDiv : 1;
    return qx_bytes(mt, k) + round16(groups * mt * 8 * 4);
  }

  // Byte offsets of one block's shared memory: the weight slots, the quantized x slice, the weight scales. The
  // reduction buffer reuses them once the main loop is done (every copy has landed and been read); the
  // activation scales stay for the epilogue.
  struct SmemLayout {
    int qx, sws, red, sxs, total;
  };

  static __host__ __device__ inline SmemLayout smem_layout(int tokens, int rows, int kslice, int slot_bytes) {
    const int groups = kGroup ? kslice / kGroupDiv : 1;
    SmemLayout s{};
    s.qx = slot_bytes;
    s.sws = round16(s.qx + tokens * kslice * kActBits / 8);
    const int loop_end = s.sws + (kGroup ? groups * rows * 2 : 0);
    s.red = 0;
    const int red_end = tokens * (rows + 4) * 4;
    s.sxs = round16(loop_end > red_end ? loop_end : red_end);
    s.total = round16(s.sxs + groups * tokens * 4);
    return s;
  }

  // ---------------------------------------------------------------------------------------------------------
  // Device helpers

  // Weights are read once: keep them out of L1. volatile: the compiler must not sink the prologue's loads below
  // griddepcontrol.wait (they are what overlaps the quantization), nor the loop's below the mma that follow.
  static __device__ __forceinline__ uint4 load_stream(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 { %0,%1,%2,%3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
  }

  // 16-byte copies global -> shared that bypass L1 (.cg): the weight scales, and the SMEM variants' weights (one
  // commit group a chunk). volatile: kept in program order with griddepcontrol.wait and with the mma that read a
  // slot before its refill.
  static __device__ __forceinline__ void copy_async16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;"
        ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(dst))), "l"(src) : "memory");
  }
  static __device__ __forceinline__ void copy_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
  template <int PENDING>
  static __device__ __forceinline__ void copy_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(PENDING) : "memory");
  }

  // Cluster barrier halves. arrive.release + wait.acquire order the partial sums written to shared memory before
  // the other ranks read them; the last barrier only keeps every block alive until the others have read its
  // shared memory (those reads have returned their values), so it arrives relaxed: no fence on the y stores.
  static __device__ __forceinline__ void cluster_sync_release_acquire() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
  }
  static __device__ __forceinline__ void cluster_sync_relaxed() {
    asm volatile("barrier.cluster.arrive.relaxed.aligned;\n\tbarrier.cluster.wait.aligned;" ::: "memory");
  }

  // Programmatic dependent launch (sm_90): the quantization grid lets the GEMM grid start, and the GEMM waits
  // for the quantization grid's completion (and its memory) before reading the workspace. Without the launch
  // attribute both are no-ops.
  static __device__ __forceinline__ void allow_dependents() {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  }
  static __device__ __forceinline__ void wait_prerequisites() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

  // 8 nibbles -> two int8x4 words holding value * 16: high nibbles in place, low nibbles shifted up.
  static __device__ __forceinline__ uint32_t nibbles_hi(uint32_t w) { return w & 0xF0F0F0F0u; }
  static __device__ __forceinline__ uint32_t nibbles_lo(uint32_t w) { return (w << 4) & 0xF0F0F0F0u; }

  static __device__ __forceinline__ void mma_s8(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 { %0,%1,%2,%3}, { %4,%5,%6,%7}, { %8,%9}, "
        "{ %0,%1,%2,%3};"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }

  static __device__ __forceinline__ void to_float8(const uint4& raw, float (&v)[8]) {
    const Out* h = reinterpret_cast<const Out*>(&raw);
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = static_cast<float>(h[e]);
  }

  static __device__ __forceinline__ float absmax8(const uint4& raw) {
    float v[8];
    to_float8(raw, v);
    float a = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) a = fmaxf(a, fabsf(v[e]));
    return a;
  }

  // The reference's rounding: q = clamp(rint(x / s), -kQmax - 1, kQmax) with IEEE division; s == 0 gives 0.
  static __device__ __forceinline__ int quantize_value(float v, float s) {
    if (s == 0.0f) return 0;
    const int q = __float2int_rn(__fdiv_rn(v, s));
    return q < -kQmax - 1 ? -kQmax - 1 : (q > kQmax ? kQmax : q);
  }

  // Bytes q[first .. first+3] as one int8x4 word (8-bit x).
  static __device__ __forceinline__ uint32_t pack_bytes(const int (&q)[8], int first) {
    uint32_t w = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b) w |= (uint32_t)(q[first + b] & 0xFF) << (8 * b);
    return w;
  }

  // Nibbles q[first .. first+3] spread into bytes: the high nibble of each byte (hi) or the low one.
  static __device__ __forceinline__ uint32_t spread_nibbles(const int (&q)[8], int first, bool hi) {
    uint32_t w = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b) w |= (uint32_t)(q[first + b] & 0xF) << (8 * b + (hi ? 4 : 0));
    return w;
  }

  static __device__ __forceinline__ float warp_max(float a, int lanes) {
    for (int off = 1; off < lanes; off <<= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, off));
    return a;
  }

  // ---------------------------------------------------------------------------------------------------------
  // Activation quantization, once per call: block = token. Thread t holds the 8-value units u = t + i*512 of
  // the row in registers (one read of x). Scales per (token, group) = absmax / kQmax (IEEE), written as
  // sx[g][tok]; values written in B-fragment order: for each 64-wide chunk c and n8 token tile j, lane
  // (gid = token % 8, t) owns kLaneBytes bytes. int4: word `step` holds k = c*64 + step*32 + 4t + b in the high
  // nibble of byte b and k + 16 in the low one. int8: word 2 * step holds k = c*64 + step*32 + 4t + b in byte b,
  // word 2 * step + 1 holds k + 16. Tokens past M are never written: the GEMM reads them as zeros.

  // Group scales of the units this thread holds. Groups < 256 lie inside a warp (a butterfly over group/8
  // lanes); larger groups and per-channel go through shared memory: per-window (256 values) maxima, then one
  // warp a group.
  static __device__ void row_scales(const QuantParams& p, const float (&umax)[kQuantIters], float (&s)[kQuantIters]) {
    constexpr int kWarps = kQuantThreads / 32;
    __shared__ float wmax[kQuantIters * kWarps];
    __shared__ float gscale[kMaxK / 256];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, tok = blockIdx.x, units = p.k / 8;
    const int ld = p.mt * 8;
    if constexpr (kGroup != 0 && kGroup < 256) {
#pragma unroll
      for (int i = 0; i < kQuantIters; ++i) {
        const int u = tid + i * kQuantThreads;
        if (u >= units) break;  // warp-uniform: units is a multiple of 32
        s[i] = __fdiv_rn(warp_max(umax[i], kGroup / 8), static_cast<float>(kQmax));
        if (u % (kGroup / 8) == 0) p.sx[(size_t)(u * 8 / kGroup) * ld + tok] = s[i];
      }
    } else {
      const int group = kGroup ? kGroup : p.k, windows = group / 256, groups = p.k / group;
#pragma unroll
      for (int i = 0; i < kQuantIters; ++i) {
        if (tid + i * kQuantThreads >= units) break;
        const float a = warp_max(umax[i], 32);
        if (lane == 0) wmax[i * kWarps + warp] = a;  // window index = u / 32
      }
      __syncthreads();
      for (int g = warp; g < groups; g += kWarps) {
        float a = 0.0f;
        for (int w = lane; w < windows; w += 32) a = fmaxf(a, wmax[g * windows + w]);
        a = warp_max(a, 32);
        if (lane == 0) {
          gscale[g] = __fdiv_rn(a, static_cast<float>(kQmax));
          p.sx[(size_t)g * ld + tok] = gscale[g];
        }
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kQuantIters; ++i) {
        const int u = tid + i * kQuantThreads;
        if (u < units) s[i] = gscale[u * 8 / group];
      }
    }
  }

  static __device__ __forceinline__ void quantize_x(const QuantParams& p) {
    allow_dependents();  // the GEMM's weight stream does not depend on this grid
    const int tid = threadIdx.x, tok = blockIdx.x, units = p.k / 8;
    const uint4* row = reinterpret_cast<const uint4*>(p.x + (size_t)tok * p.k);
    uint4 raw[kQuantIters];
    float umax[kQuantIters], s[kQuantIters];
#pragma unroll
    for (int i = 0; i < kQuantIters; ++i) {
      const int u = tid + i * kQuantThreads;
      if (u < units) raw[i] = __ldg(row + u);
    }
#pragma unroll
    for (int i = 0; i < kQuantIters; ++i) umax[i] = tid + i * kQuantThreads < units ? absmax8(raw[i]) : 0.0f;
    row_scales(p, umax, s);

    // this unit's place in the fragment layout: k = step*32 + quarter*8 .. +7 of its chunk
    const int step = (tid >> 2) & 1, quarter = tid & 3;
    const bool high_half = quarter < 2;  // k % 32 < 16: high nibbles (int4), the b0 word (int8)
#pragma unroll
    for (int i = 0; i < kQuantIters; ++i) {
      const int u = tid + i * kQuantThreads;
      if (u >= units) break;  // warp-uniform
      float v[8];
      to_float8(raw[i], v);
      int q[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) q[e] = quantize_value(v[e], s[i]);
      const int chunk = u / 8;
      if constexpr (kActBits == 8) {
        // values 4tt .. 4tt+3 are the b0 (k % 32 < 16) or b1 word of lane t = 2 * (quarter % 2) + tt
#pragma unroll
        for (int tt = 0; tt < 2; ++tt) {
          const int frag_lane = (tok % 8) * 4 + 2 * (quarter & 1) + tt;
          const size_t off = (((size_t)chunk * p.mt + tok / 8) * 32 + frag_lane) * kLaneBytes +
                             (2 * step + (high_half ? 0 : 1)) * 4;
          *reinterpret_cast<uint32_t*>(p.qx + off) = pack_bytes(q, 4 * tt);
        }
        continue;
      }
#pragma unroll
      for (int tt = 0; tt < 2; ++tt) {
        const uint32_t mine = spread_nibbles(q, 4 * tt, high_half);
        const uint32_t other = __shfl_xor_sync(0xffffffffu, mine, 2);
        if (high_half) {
          const int frag_lane = (tok % 8) * 4 + 2 * quarter + tt;
          const size_t off = (((size_t)chunk * p.mt + tok / 8) * 32 + frag_lane) * 8 + step * 4;
          *reinterpret_cast<uint32_t*>(p.qx + off) = mine | other;
        }
      }
    }
  }

  // ---------------------------------------------------------------------------------------------------------
  // The GEMM. Block (bx, rank): rows [bx*ROWS, +ROWS) and K-slice `rank` of the cluster; warp w owns RT
  // consecutive 16-row tiles over the whole slice, keeping P 64-wide chunks of each in flight.

  template <int MT, int WARPS, int RT, int P, bool SMEM>
  struct Tile {
    static constexpr int kThreads = WARPS * 32;
    static constexpr int kTok = MT * 8;
    static constexpr int kRows = WARPS * RT * 16;
    static constexpr int kBlocksPerSm = 512 / kThreads;  // several blocks a SM overlap start-up and reduction
    static constexpr int kSlotBytes = SMEM ? P * RT * kThreads * 16 : 0;  // [P][RT][thread] x 16 B: conflict-free
    // one block's shared memory for a K-slice: the kernel's offsets, the launcher's size (.total)
    static __host__ __device__ SmemLayout smem(int kslice) { return smem_layout(kTok, kRows, kslice, kSlotBytes); }
  };

  // One thread's weight stream: chunks of its RT row tiles, P ahead of the one being read. start() issues the
  // first P (before griddepcontrol.wait: they overlap the quantization), take(c, s, i) returns chunk c of tile i
  // (held in slot s = c % P), done(c, s) is called once chunk c's mma have been issued. Chunks past the slice and
  // tiles past N are never loaded; tiles past N read as zeros.
  template <int RT, int P, int THREADS, bool SMEM>
  struct WeightStream;

  // In registers: chunk c + P's load goes out as soon as chunk c leaves its register (slot s must be a constant).
  template <int RT, int P, int THREADS>
  struct WeightStream<RT, P, THREADS, false> {
    const uint4* wp[RT];
    bool valid[RT];
    int chunks;
    uint4 held[P][RT];

    __device__ __forceinline__ void start() {
#pragma unroll
      for (int s = 0; s < P; ++s)
#pragma unroll
        for (int i = 0; i < RT; ++i)
          held[s][i] = valid[i] && s < chunks ? load_stream(wp[i] + s * 32) : make_uint4(0, 0, 0, 0);
    }
    __device__ __forceinline__ uint4 take(int c, int s, int i) {
      const uint4 w = held[s][i];
      if (c + P < chunks && valid[i]) held[s][i] = load_stream(wp[i] + (c + P) * 32);
      return w;
    }
    __device__ __forceinline__ void done(int, int) {}
  };

  // In the thread's own shared-memory slots ([P][RT][thread] x 16 bytes: conflict-free), one commit group a chunk;
  // a slot is refilled once the mma that read it have been issued (in order: their operands have arrived).
  template <int RT, int P, int THREADS>
  struct WeightStream<RT, P, THREADS, true> {
    const uint4* wp[RT];
    bool valid[RT];
    int chunks;
    uint4* slots;

    __device__ __forceinline__ uint4* slot(int s, int i) const { return slots + (s * RT + i) * THREADS + threadIdx.x; }
    __device__ __forceinline__ void issue(int c, int s) {
#pragma unroll
      for (int i = 0; i < RT; ++i)
        if (c < chunks && valid[i]) copy_async16(slot(s, i), wp[i] + c * 32);
      copy_commit();  // empty past the slice: take()'s wait counts groups
    }
    __device__ __forceinline__ void start() {
#pragma unroll
      for (int s = 0; s < P; ++s) issue(s, s);
    }
    __device__ __forceinline__ uint4 take(int, int s, int i) {
      if (i == 0) copy_wait<P - 1>();  // chunk c's group is the oldest of the P in flight
      return valid[i] ? *slot(s, i) : make_uint4(0, 0, 0, 0);
    }
    __device__ __forceinline__ void done(int c, int s) { issue(c + P, s); }
  };

  // Weight scales of the block's rows and slice -> shared memory [group][row], as asynchronous 16-byte copies
  // (8 rows of one row tile and group each) in their own commit group, issued before the weight stream: nothing
  // waits for them until the block's barrier before the main loop, and they are not queued behind the weights.
  // Row tiles past N are zero-filled.
  template <int WARPS, int RT>
  static __device__ void copy_weight_scales(const Params& p, int k0, Out* sws) {
    constexpr int kTiles = WARPS * RT, kRows = kTiles * 16, kThreads = WARPS * 32;
    const int groups = p.kslice / kGroupDiv, ldg = p.k / kGroupDiv, g0 = k0 / kGroupDiv;
    const int tile0 = blockIdx.x * kTiles;
    for (int idx = threadIdx.x; idx < kTiles * groups * 2; idx += kThreads) {
      const int half = idx & 1, g = (idx >> 1) % groups, tile = (idx >> 1) / groups;  // consecutive in global
      Out* dst = sws + g * kRows + tile * 16 + half * 8;
      if (tile0 + tile < p.n / 16)
        copy_async16(dst, p.sw + ((size_t)(tile0 + tile) * ldg + g0 + g) * 16 + half * 8);
      else
        *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    }
    copy_commit();
  }

  // The block's K-slice of the quantized x and its scales, workspace -> shared memory. Loads bypass L1 (.cg):
  // the workspace was written by the other grid. Tokens past M read as zeros.
  template <int MT, int THREADS>
  static __device__ void stage_activations(const Params& p, int k0, uint8_t* qx, float* sxs) {
    constexpr int kTok = MT * 8;
    constexpr int kLanesPerQuad = 16 / kLaneBytes;  // 16-byte pieces: two lanes (int4) or one (int8) of a token row
    const int quads = kTok * p.kslice * kActBits / 8 / 16;
    const uint4* src = reinterpret_cast<const uint4*>(p.qx + (size_t)(k0 / kChunk) * MT * 32 * kLaneBytes);
    for (int idx = threadIdx.x; idx < quads; idx += THREADS) {
      const int lane = (kLanesPerQuad * idx) % 32, tile = (kLanesPerQuad * idx / 32) % MT, tok = tile * 8 + lane / 4;
      *reinterpret_cast<uint4*>(qx + idx * 16) = tok < p.m ? __ldcg(src + idx) : make_uint4(0, 0, 0, 0);
    }
    const int groups = kGroup ? p.kslice / kGroupDiv : 1, g0 = kGroup ? k0 / kGroupDiv : 0;
    for (int idx = threadIdx.x; idx < groups * kTok; idx += THREADS)
      sxs[idx] = idx % kTok < p.m ? __ldcg(p.sx + (size_t)g0 * kTok + idx) : 0.0f;
  }

  // int -> float for |v| < 2^22 (|P| <= (kQmax + 1) * 8 * group) as IADD + FADD: I2F runs at a quarter of the
  // FP32 rate.
  static __device__ __forceinline__ float exact_float(int v) { return __int_as_float(v + 0x4B400000) - 12582912.0f; }

  // Fold the finished group's int32 partials into the fp32 sums: acc += float(P) * sx[m,g] * sw[n,g].
  template <int MT, int WARPS, int RT>
  static __device__ __forceinline__ void promote_group(int g, int (&acc_i)[RT][MT][4], float (&acc_f)[RT][MT][4],
                                                       const float* sxs, const Out* sws) {
    constexpr int kTok = MT * 8, kRows = WARPS * RT * 16;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, t = lane & 3;
    float sx[MT][2];
#pragma unroll
    for (int j = 0; j < MT; ++j) {
      const float2 v = *reinterpret_cast<const float2*>(sxs + g * kTok + j * 8 + 2 * t);
      sx[j][0] = v.x;
      sx[j][1] = v.y;
    }
#pragma unroll
    for (int i = 0; i < RT; ++i) {
      const int r = (warp * RT + i) * 16 + gid;
      const float sw[2] = {static_cast<float>(sws[g * kRows + r]), static_cast<float>(sws[g * kRows + r + 8])};
#pragma unroll
      for (int j = 0; j < MT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float pf = exact_float(acc_i[i][j][e] >> kShift);
          acc_f[i][j][e] = fmaf(pf * sx[j][e & 1], sw[e >> 1], acc_f[i][j][e]);
          acc_i[i][j][e] = 0;
        }
      }
    }
  }
};

template <class Kernel>
__global__ void __launch_bounds__(Kernel::kQuantThreads) quantize_x_kernel(const typename Kernel::QuantParams p) {
  Kernel::quantize_x(p);
}

// The GEMM of one variant (see Tile and WeightStream above).
template <class Kernel, int MT, int WARPS, int RT, int P, bool SMEM>
__global__ void __launch_bounds__(WARPS * 32, (Kernel::template Tile<MT, WARPS, RT, P, SMEM>::kBlocksPerSm))
    decode_kernel(const typename Kernel::Params p) {
  using T = typename Kernel::template Tile<MT, WARPS, RT, P, SMEM>;
  using Out = typename Kernel::Out;
  constexpr int kGroup = Kernel::kGroup, kChunk = Kernel::kChunk, kRows = T::kRows;
  extern __shared__ __align__(16) uint8_t smem[];
  cg::cluster_group cluster = cg::this_cluster();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, t = lane & 3;
  const int rank = blockIdx.y, ranks = gridDim.y;  // the cluster spans grid.y
  const int k0 = rank * p.kslice, row0 = blockIdx.x * kRows;
  const typename Kernel::SmemLayout L = T::smem(p.kslice);
  uint8_t* qx = smem + L.qx;
  Out* sws = reinterpret_cast<Out*>(smem + L.sws);
  float* sxs = reinterpret_cast<float*>(smem + L.sxs);

  // 1. Copy the weight scales and start the weight stream: neither depends on the quantization grid, which
  //    may still be running.
  if constexpr (kGroup != 0) Kernel::template copy_weight_scales<WARPS, RT>(p, k0, sws);
  typename Kernel::template WeightStream<RT, P, T::kThreads, SMEM> stream;
  stream.chunks = p.kslice / kChunk;
#pragma unroll
  for (int i = 0; i < RT; ++i) {
    const int tile = (blockIdx.x * WARPS + warp) * RT + i;
    stream.valid[i] = tile < p.n / 16;
    stream.wp[i] = p.w + ((size_t)tile * (p.k / kChunk) + k0 / kChunk) * 32 + lane;
  }
  if constexpr (SMEM) stream.slots = reinterpret_cast<uint4*>(smem);
  stream.start();

  // 2. The quantized x of the slice, once the quantization grid is done.
  Kernel::wait_prerequisites();
  Kernel::template stage_activations<MT, T::kThreads>(p, k0, qx, sxs);
  // the weight scales' group is complete (the P weight groups of the SMEM stream may still be in flight)
  if constexpr (kGroup != 0) Kernel::template copy_wait<SMEM ? P : 0>();
  __syncthreads();

  // 3. Main loop over the slice's 64-wide chunks, P of them in flight per row tile.
  int acc_i[RT][MT][4] = {};
  float acc_f[RT][MT][4] = {};
  constexpr int kChunksPerGroup = kGroup ? kGroup / kChunk : 1;  // per-channel: no promotion in the loop
  // Chunk c, held in slot s = c % P: every row tile's A fragments, then one token tile's B fragments at a time
  // (fewer registers live than holding all of B); then the group's promotion once its last chunk is in.
  auto step = [&](int c, int s) {
    uint32_t a[RT][8];
#pragma unroll
    for (int i = 0; i < RT; ++i) {
      const uint4 w = stream.take(c, s, i);
      a[i][0] = Kernel::nibbles_hi(w.x); a[i][1] = Kernel::nibbles_lo(w.x);
      a[i][2] = Kernel::nibbles_hi(w.y); a[i][3] = Kernel::nibbles_lo(w.y);
      a[i][4] = Kernel::nibbles_hi(w.z); a[i][5] = Kernel::nibbles_lo(w.z);
      a[i][6] = Kernel::nibbles_hi(w.w); a[i][7] = Kernel::nibbles_lo(w.w);
    }
#pragma unroll
    for (int j = 0; j < MT; ++j) {
      uint32_t b[4];  // {step 0 b0, b1, step 1 b0, b1}
      if constexpr (Kernel::kActBits == 8) {
        const uint4 v = *reinterpret_cast<const uint4*>(qx + ((c * MT + j) * 32 + lane) * 16);
        b[0] = v.x; b[1] = v.y; b[2] = v.z; b[3] = v.w;
      } else {
        const uint2 v = *reinterpret_cast<const uint2*>(qx + ((c * MT + j) * 32 + lane) * 8);
        b[0] = Kernel::nibbles_hi(v.x); b[1] = Kernel::nibbles_lo(v.x);
        b[2] = Kernel::nibbles_hi(v.y); b[3] = Kernel::nibbles_lo(v.y);
      }
#pragma unroll
      for (int i = 0; i < RT; ++i) {
        Kernel::mma_s8(acc_i[i][j], a[i][0], a[i][1], a[i][2], a[i][3], b[0], b[1]);
        Kernel::mma_s8(acc_i[i][j], a[i][4], a[i][5], a[i][6], a[i][7], b[2], b[3]);
      }
    }
    stream.done(c, s);
    // s + 1 when a group spans whole slots (P and the group's chunks are powers of two): a constant in the
    // register stream's unrolled loop, so the test folds away
    if constexpr (kGroup != 0) {
      if ((kChunksPerGroup <= P ? s + 1 : c + 1) % kChunksPerGroup == 0)
        Kernel::template promote_group<MT, WARPS, RT>(c / kChunksPerGroup, acc_i, acc_f, sxs, sws);
    }
  };
  const int chunks = stream.chunks;
  if constexpr (SMEM) {
    // rolled (by two: a g128 group): the slot index need not be a constant, and eight unrolled copies spill
#pragma unroll 2
    for (int c = 0; c < chunks; ++c) step(c, c % P);
  } else {
    // unrolled by P: registers are indexed by constants; whole rounds of P chunks, then the slice's last chunks
    const int whole = chunks / P * P;
    for (int c0 = 0; c0 < whole; c0 += P)
#pragma unroll
      for (int s = 0; s < P; ++s) step(c0 + s, s);
#pragma unroll
    for (int s = 0; s < P; ++s)
      if (whole + s < chunks) step(whole + s, s);
  }

  // 4. Partial sums to shared memory ([token][row], rows padded by 4 words: conflict-free), then the cluster
  //    reduces: rank r sums rows [r*ROWS/S, +ROWS/S) over every rank in a fixed order and writes y.
  if constexpr (SMEM) Kernel::template copy_wait<0>();  // only empty groups are left; the buffer below reuses the slots
  __syncthreads();  // the buffer reuses qx, which other warps may still be reading
  constexpr int kStride = kRows + 4;
  uint32_t* red = reinterpret_cast<uint32_t*>(smem + L.red);
#pragma unroll
  for (int i = 0; i < RT; ++i)
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int tok = j * 8 + 2 * t + (e & 1), r = (warp * RT + i) * 16 + gid + 8 * (e >> 1);
        red[tok * kStride + r] = kGroup ? __float_as_uint(acc_f[i][j][e]) : (uint32_t)acc_i[i][j][e];
      }
  Kernel::cluster_sync_release_acquire();

  // whole 16-byte quads per rank (ROWS/S need not be a multiple of 4, e.g. S = 7 for K = 28672)
  const int quads = (kRows / 4 + ranks - 1) / ranks;
  for (int idx = threadIdx.x; idx < p.m * quads; idx += T::kThreads) {
    const int tok = idx / quads, r = (rank * quads + idx % quads) * 4, n = row0 + r;
    if (r >= kRows || n >= p.n) continue;
    float out[4];
    if constexpr (kGroup != 0) {
      float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int q = 0; q < ranks; ++q) {
        const float4 v = *reinterpret_cast<const float4*>(cluster.map_shared_rank(red, q) + tok * kStride + r);
        sum.x += v.x; sum.y += v.y; sum.z += v.z; sum.w += v.w;
      }
      out[0] = sum.x; out[1] = sum.y; out[2] = sum.z; out[3] = sum.w;
    } else {
      int4 sum = make_int4(0, 0, 0, 0);
      for (int q = 0; q < ranks; ++q) {
        const int4 v = *reinterpret_cast<const int4*>(cluster.map_shared_rank(red, q) + tok * kStride + r);
        sum.x += v.x; sum.y += v.y; sum.z += v.z; sum.w += v.w;
      }
      const int isum[4] = {sum.x, sum.y, sum.z, sum.w};
      const float sx = sxs[tok];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float sw = static_cast<float>(p.sw[n + e]);  // per-channel: sw is [N, 1]
        out[e] = static_cast<float>(isum[e] >> Kernel::kShift) * sx * sw;
      }
    }
    alignas(8) Out o[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float bias = p.bias ? static_cast<float>(p.bias[n + e]) : 0.0f;
      o[e] = static_cast<Out>(out[e] + bias);
    }
    *reinterpret_cast<uint2*>(p.y + (size_t)tok * p.n + n) = *reinterpret_cast<const uint2*>(o);
  }
  Kernel::cluster_sync_relaxed();  // no block leaves while another still reads its shared memory
}

// Host side of one configuration: the C ABI's run and workspace, and the split and shared-memory queries.
template <class Config>
struct Gemm {
  using Kernel = Kernels<Config>;
  using Out = typename Kernel::Out;
  using Params = typename Kernel::Params;
  using QuantParams = typename Kernel::QuantParams;
  static constexpr int kGroup = Kernel::kGroup, kGroupDiv = Kernel::kGroupDiv, kChunk = Kernel::kChunk;
  static constexpr int kMaxM = Kernel::kMaxM, kMaxK = Kernel::kMaxK, kMaxSplit = Kernel::kMaxSplit;
  static constexpr int kQuantThreads = Kernel::kQuantThreads;
  static size_t qx_bytes(int mt, int k) { return Kernel::qx_bytes(mt, k); }
  static size_t workspace_bytes(int mt, int k) { return Kernel::workspace_bytes(mt, k); }

  // ---------------------------------------------------------------------------------------------------------
  // Host side: pick the split S (cluster size) that fills the GPU best; launch the quantization, then the GEMM
  // as a cluster kernel that may start before the quantization ends.

  static bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

  struct Device {
    int id, optin_smem;
  };

  static cudaError_t current_device(Device& d) {
    cudaError_t err = cudaGetDevice(&d.id);
    if (err != cudaSuccess) return err;
    return cudaDeviceGetAttribute(&d.optin_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, d.id);
  }

  // A slice is any whole number of chunks (and of groups): the streams take a last partial round of P chunks.
  static bool split_fits(int k, int s) {
    if (k % s) return false;
    const int kslice = k / s;
    if (kslice % kChunk) return false;
    return kGroup == 0 || kslice % kGroupDiv == 0;
  }

  // Clusters of `split` blocks of one variant that can be resident at once (cached: the query is slow).
  template <int MT, int WARPS, int RT, int P, bool SMEM>
  static int resident_clusters(int device, int split, int smem) {
    static std::mutex mu;
    static std::map<std::tuple<int, int, int>, int> cache;
    const auto key = std::make_tuple(device, split, smem);
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(1, split, 1);
    cfg.blockDim = dim3(WARPS * 32, 1, 1);
    cfg.dynamicSmemBytes = smem;
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = 1;
    attr.val.clusterDim.y = split;
    attr.val.clusterDim.z = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, decode_kernel<Kernel, MT, WARPS, RT, P, SMEM>, &cfg) != cudaSuccess) {
      cudaGetLastError();  // a refused size is "does not fit", not a sticky error
      clusters = 0;
    }
    cache.emplace(key, clusters);
    return clusters;
  }

  // Lets a variant take the device's opt-in shared memory, once per device.
  template <int MT, int WARPS, int RT, int P, bool SMEM>
  static cudaError_t allow_large_smem(const Device& dev) {
    static std::mutex mu;
    static std::map<int, cudaError_t> done;
    std::lock_guard<std::mutex> lock(mu);
    auto it = done.find(dev.id);
    if (it != done.end()) return it->second;
    const cudaError_t err = cudaFuncSetAttribute(decode_kernel<Kernel, MT, WARPS, RT, P, SMEM>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, dev.optin_smem);
    done.emplace(dev.id, err);
    return err;
  }

  // The cluster split S of K: fullest GPU first (resident slots used), then fewer waves, then the smaller S
  // (less reduction work). 0 when no split fits.
  template <int MT, int WARPS, int RT, int P, bool SMEM>
  static int choose_split(int n, int k, const Device& dev) {
    using T = typename Kernel::template Tile<MT, WARPS, RT, P, SMEM>;
    const int blocks_n = (n + T::kRows - 1) / T::kRows;
    int best_split = 0, best_waves = 0;
    double best_fill = -1.0;
    for (int s = 1; s <= kMaxSplit; ++s) {
      if (!split_fits(k, s)) continue;
      const int smem = T::smem(k / s).total;
      if (smem > dev.optin_smem) continue;
      const int resident = resident_clusters<MT, WARPS, RT, P, SMEM>(dev.id, s, smem);
      if (resident <= 0) continue;
      const int waves = (blocks_n + resident - 1) / resident;
      const double fill = (double)blocks_n / ((double)waves * resident);
      if (fill > best_fill + 1e-9 || (fill > best_fill - 1e-9 && waves < best_waves)) {
        best_split = s;
        best_fill = fill;
        best_waves = waves;
      }
    }
    return best_split;
  }

  // One quantizing block a token; it writes the workspace in the layout of the variant's MT.
  static cudaError_t launch_quantize(const apex4gen_gemm_args* a, int mt, cudaStream_t stream) {
    QuantParams q;
    q.x = static_cast<const Out*>(a->qx);
    q.qx = static_cast<uint8_t*>(a->workspace);
    q.sx = reinterpret_cast<float*>(q.qx + qx_bytes(mt, a->k));
    q.k = a->k;
    q.mt = mt;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(a->m, 1, 1);
    cfg.blockDim = dim3(kQuantThreads, 1, 1);
    cfg.stream = stream;
    return cudaLaunchKernelEx(&cfg, quantize_x_kernel<Kernel>, q);
  }

  template <int MT, int WARPS, int RT, int P, bool SMEM>
  static int launch_variant(Variant<MT, WARPS, RT, P, SMEM>, const apex4gen_gemm_args* a, cudaStream_t stream) {
    using T = typename Kernel::template Tile<MT, WARPS, RT, P, SMEM>;
    Device dev{};
    if (current_device(dev) != cudaSuccess) return APEX4GEN_CUDA_ERROR;
    if (allow_large_smem<MT, WARPS, RT, P, SMEM>(dev) != cudaSuccess) return APEX4GEN_CUDA_ERROR;
    const int split = choose_split<MT, WARPS, RT, P, SMEM>(a->n, a->k, dev);
    if (!split) return APEX4GEN_BAD_SHAPE;
    if (!a->workspace || a->workspace_bytes < workspace_bytes(MT, a->k) || !aligned16(a->workspace))
      return APEX4GEN_WORKSPACE;
    if (launch_quantize(a, MT, stream) != cudaSuccess) return APEX4GEN_CUDA_ERROR;

    Params p;
    p.qx = static_cast<const uint8_t*>(a->workspace);
    p.sx = reinterpret_cast<const float*>(p.qx + qx_bytes(MT, a->k));
    p.w = static_cast<const uint4*>(a->qw);
    p.sw = static_cast<const Out*>(a->sw);
    p.bias = static_cast<const Out*>(a->bias);
    p.y = static_cast<Out*>(a->y);
    p.m = a->m;
    p.n = a->n;
    p.k = a->k;
    p.kslice = a->k / split;

    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((a->n + T::kRows - 1) / T::kRows, split, 1);
    cfg.blockDim = dim3(T::kThreads, 1, 1);
    cfg.dynamicSmemBytes = T::smem(p.kslice).total;
    cfg.stream = stream;
    cudaLaunchAttribute attrs[2];
    attrs[0].id = cudaLaunchAttributeClusterDimension;
    attrs[0].val.clusterDim.x = 1;
    attrs[0].val.clusterDim.y = split;
    attrs[0].val.clusterDim.z = 1;
    attrs[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;  // overlap with the quantization
    attrs[1].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attrs;
    cfg.numAttrs = 2;
    return cudaLaunchKernelEx(&cfg, decode_kernel<Kernel, MT, WARPS, RT, P, SMEM>, p) == cudaSuccess ? APEX4GEN_OK
                                                                                     : APEX4GEN_CUDA_ERROR;
  }

  template <int MT, int WARPS, int RT, int P, bool SMEM>
  static int split_of_variant(Variant<MT, WARPS, RT, P, SMEM>, int n, int k) {
    Device dev{};
    if (current_device(dev) != cudaSuccess) return -1;
    return choose_split<MT, WARPS, RT, P, SMEM>(n, k, dev);
  }

  template <int MT, int WARPS, int RT, int P, bool SMEM>
  static size_t smem_of_variant(Variant<MT, WARPS, RT, P, SMEM>, int kslice) {
    return Kernel::template Tile<MT, WARPS, RT, P, SMEM>::smem(kslice).total;
  }

  // f(variant, MT) for the variant that serves `tiles` token tiles in the K class; `none` past the table.
  template <class R, class F>
  static R for_tokens(int tiles, bool large_k, R none, F f) {
    return pick(tiles, large_k, none, f, typename Config::Variants{});
  }
  template <class R, class F>
  static R pick(int, bool, R none, F, std::tuple<>) { return none; }
  template <class R, class F, int MT, class Small, class Large, class... Rest>
  static R pick(int tiles, bool large_k, R none, F f, std::tuple<TokenTiles<MT, Small, Large>, Rest...>) {
    if (tiles <= MT) return large_k ? f(Large{}, MT) : f(Small{}, MT);
    return pick(tiles, large_k, none, f, std::tuple<Rest...>{});
  }

  static int run(const apex4gen_gemm_args* args, cudaStream_t stream) {
    if (!args || !args->qx || !args->qw || !args->sw || !args->y) return APEX4GEN_BAD_ARGUMENT;
    // 16-byte loads of x and the weights, 8-byte stores of y
    if (!aligned16(args->qx) || !aligned16(args->qw) || (reinterpret_cast<uintptr_t>(args->y) & 7))
      return APEX4GEN_BAD_ARGUMENT;
    if (kGroup && !aligned16(args->sw)) return APEX4GEN_BAD_ARGUMENT;  // group-wise scales: 16-byte copies
    const int m = args->m, n = args->n, k = args->k;
    if (m < 1 || m > kMaxM || n < 16 || n % Config::kAlignN || k < Config::kAlignK || k % Config::kAlignK ||
        k > kMaxK)
      return APEX4GEN_BAD_SHAPE;
    if (kGroup ? args->group != kGroup : args->group != k) return APEX4GEN_BAD_SHAPE;
    // the instantiation is picked per token tiles and K class
    return for_tokens((m + 7) / 8, k >= Config::kLargeK, int(APEX4GEN_BAD_SHAPE),
                      [&](auto variant, int) { return launch_variant(variant, args, stream); });
  }

  // Quantized x and its scales, in the layout of the variant that serves M.
  static size_t workspace(int m, int, int k) {
    if (m < 1 || m > kMaxM || k < 1) return 0;
    return for_tokens((m + 7) / 8, false, size_t(0), [&](auto, int mt) { return workspace_bytes(mt, k); });
  }

  // The cluster split of K the launcher uses for a problem on the current device (benchmarks, cost model).
  static int split(int m, int n, int k) {
    if (m < 1 || m > kMaxM) return 0;
    return for_tokens((m + 7) / 8, k >= Config::kLargeK, 0,
                      [&](auto variant, int) { return split_of_variant(variant, n, k); });
  }

  // Dynamic shared memory of a block of the variant serving M for a slice of K / split (tests: the planner's
  // mirror).
  static size_t smem(int m, int k, int split) {
    if (m < 1 || m > kMaxM || split < 1 || k % split) return 0;
    return for_tokens((m + 7) / 8, k >= Config::kLargeK, size_t(0),
                      [&](auto variant, int) { return smem_of_variant(variant, k / split); });
  }
};

}  // namespace apex4gen::kernels::sm90_decode
