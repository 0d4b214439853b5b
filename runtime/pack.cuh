// Weight layouts, element by element: where each byte of a packed weight comes from in the canonical form.
// The exact rules of apex4gen/kernels/layouts.py (its pack_* functions are the documentation and the test
// oracle); __host__ __device__ so that tests check them on the CPU too. Canonical values: [N, K/2] bytes,
// element 2i of a row in the low nibble. Scales are moved as 2-byte words (f16 or bf16 alike).
#pragma once
#include <stdint.h>

namespace apex4gen_pack {

// The 4-bit field (two's complement, as stored) of value (row, col) of a canonical [N, K/2] byte matrix.
__host__ __device__ inline uint32_t canonical_nibble(const uint8_t* qw, int64_t k, int64_t row, int64_t col) {
  return (qw[row * (k / 2) + col / 2] >> (4 * (col & 1))) & 0xFu;
}

// sm90_decode: bytes ordered [N/16 row tiles][K/64 chunks][8 gid][4 t][2 step][2 half][4 b]; the byte holds
// value (16 tile + gid, k) in its high nibble and (16 tile + gid + 8, k) in its low one, at
// k = 64 chunk + 32 step + 16 half + 4 t + b.
__host__ __device__ inline uint8_t sm90_decode_byte(const uint8_t* qw, int64_t k, int64_t out) {
  const int64_t b = out & 3, half = (out >> 2) & 1, step = (out >> 3) & 1, t = (out >> 4) & 3;
  const int64_t gid = (out >> 6) & 7;
  const int64_t tile_chunk = out >> 9;  // 512 bytes per (row tile, chunk)
  const int64_t chunks = k / 64;
  const int64_t tile = tile_chunk / chunks, chunk = tile_chunk % chunks;
  const int64_t col = 64 * chunk + 32 * step + 16 * half + 4 * t + b;
  const int64_t row = 16 * tile + gid;
  return static_cast<uint8_t>((canonical_nibble(qw, k, row, col) << 4) | canonical_nibble(qw, k, row + 8, col));
}

// sm90_decode scales [N/16][G][16] <- canonical [N][G]: the canonical index of scale `out`.
__host__ __device__ inline int64_t sm90_decode_scale_source(int64_t groups, int64_t out) {
  const int64_t row = out % 16, group = (out / 16) % groups, tile = out / (16 * groups);
  return (16 * tile + row) * groups + group;
}

// sm90_prefill: the values in atom order, packed two a byte (low nibble first). Atoms of 16 rows x 32 k tile N
// first, then K: atom (r, c) holds elements [512 (c N/16 + r), +512). Within an atom, SM90_PREFILL_ATOM maps
// (row, k) to the element offset e = 64 r0 + 4 r1 + k0 + 16 k1 + 8 k2 (row = r0 + 8 r1: (8,2):(64,4);
// k = k0 + 4 k1 + 16 k2: (4,4,2):(1,16,8)); here e is read back digit by digit.
__host__ __device__ inline uint32_t sm90_prefill_value(const uint8_t* qw, int64_t n, int64_t k, int64_t element) {
  const int64_t atom = element >> 9;
  const int e = static_cast<int>(element & 511);
  const int64_t row_tiles = n / 16;
  const int64_t tile = atom % row_tiles, chunk = atom / row_tiles;
  const int row = ((e >> 6) & 7) + 8 * ((e >> 2) & 1);
  const int col = (e & 3) + 4 * ((e >> 4) & 3) + 16 * ((e >> 3) & 1);
  return canonical_nibble(qw, k, 16 * tile + row, 32 * chunk + col);
}

__host__ __device__ inline uint8_t sm90_prefill_byte(const uint8_t* qw, int64_t n, int64_t k, int64_t out) {
  const uint32_t low = sm90_prefill_value(qw, n, k, 2 * out), high = sm90_prefill_value(qw, n, k, 2 * out + 1);
  return static_cast<uint8_t>(low | (high << 4));
}

// sm90_prefill scales [G][N] <- canonical [N][G] (transposed).
__host__ __device__ inline int64_t sm90_prefill_scale_source(int64_t n, int64_t groups, int64_t out) {
  return (out % n) * groups + out / n;
}

}  // namespace apex4gen_pack
