// Tensor-core (WMMA, 16x16x16) versions of the two tile loops of tile.cuh, for 16-bit inputs on sm_80+:
// the down-projection U = X A_act^T and the expansion Y = base + (g U) B_act, float32 accumulation.
//
// A block still owns kTile tokens of one sample and its rank list (shared + picked ranks with sample routing,
// all ranks with token routing); the rank dimension is padded to n_pad = a multiple of 16 with zero rows, so
// with sample routing the MMA work shrinks in steps of 16 ranks when slots pick zero experts. Operands are
// staged in shared memory in the MMA type (half / bfloat16), U in float32; the gated U is rounded to the MMA
// type before the expansion (as the Triton kernels and the reference's 16-bit path do).
//
// tests/kernels/extension_emulation.cpp runs these loops on the CPU with float operands and a host stand-in
// for the nvcuda::wmma calls (lane 0 of each warp does a warp's fragment work), which checks the tiling,
// padding and shared-memory layout; the tensor-core arithmetic itself is checked by the GPU tests.
#pragma once
#include "tile.cuh"

#ifndef MOR_EMULATE_CUDA
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

namespace mor {
namespace cuda {

#ifndef MOR_EMULATE_CUDA
namespace wmma = nvcuda::wmma;
#else
namespace wmma = ::emu_wmma;
#endif

constexpr int kMma = 16;       // WMMA tile edge
constexpr int kChunkN = 64;    // output columns per expansion step
constexpr int kChunkK = 64;    // reduction step of the projection: 128-byte rows of 16-bit x and rank filters
constexpr int kWarps = kThreads / 32;
#ifdef MOR_EMULATE_CUDA
constexpr int kMaxWarpTiles = (kTile / kMma) * (kMaxRanks / kMma);  // a one-thread block does every tile
#else
constexpr int kMaxWarpTiles = (kTile / kMma) * (kMaxRanks / kMma) / kWarps;
#endif

__host__ __device__ inline int pad16(int n) { return (n + kMma - 1) / kMma * kMma; }

// The MMA operand type of a kernel scalar type, and the conversion from float.
template <typename T>
struct MmaType {
  using type = float;  // the emulation's float operands
};
#ifndef MOR_EMULATE_CUDA
template <>
struct MmaType<c10::Half> {
  using type = __half;
};
template <>
struct MmaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};
__device__ inline __half to_mma(float v, __half*) { return __float2half_rn(v); }
__device__ inline __nv_bfloat16 to_mma(float v, __nv_bfloat16*) { return __float2bfloat16_rn(v); }
__device__ inline float from_mma(__half v) { return __half2float(v); }
__device__ inline float from_mma(__nv_bfloat16 v) { return __bfloat162float(v); }
#endif
__device__ inline float to_mma(float v, float*) { return v; }
__device__ inline float from_mma(float v) { return v; }

// Byte offsets of the MMA kernels' dynamic shared memory (32-byte aligned regions, as WMMA loads need):
// rank list, coefficients, token gate table, X and A_act staging, U (float32; reused for the B_act staging),
// the gated U in the MMA type, a float32 tile of the output, the rank positions for h and the non-finite flags
// of the staged B_act rows.
struct MmaSmem {
  size_t rank, coef, gt, xs, ws, u, ug, cs, pos, bad, bytes;
  __host__ __device__ MmaSmem(int ranks, bool token_routing, size_t mma_bytes) {
    const size_t n_pad = static_cast<size_t>(pad16(ranks));
    size_t at = 0;
    auto take = [&](size_t n) {
      const size_t start = at;
      at = (at + n + 31) / 32 * 32;
      return start;
    };
    rank = take(ranks * sizeof(int));
    coef = take(ranks * sizeof(float));
    gt = take(token_routing ? kTile * ranks * sizeof(float) : 0);
    xs = take(kTile * kChunkK * mma_bytes);
    ws = take(n_pad * kChunkK * mma_bytes);
    const size_t u_bytes = kTile * n_pad * sizeof(float), b_bytes = n_pad * kChunkN * mma_bytes;
    u = take(u_bytes > b_bytes ? u_bytes : b_bytes);
    ug = take(kTile * n_pad * mma_bytes);
    cs = take(kTile * kChunkN * sizeof(float));
    pos = take(ranks * sizeof(int));
    bad = take((n_pad + 1) * sizeof(int));
    bytes = at;
  }
};

__device__ inline int warp_id() { return static_cast<int>(threadIdx.x) / 32; }
__device__ inline int warp_count() { return blockDim.x >= 32 ? static_cast<int>(blockDim.x) / 32 : 1; }

// U[t * n_pad + a] = sum_i src[(n0 + t) * dim + i] * w[rank[a] * dim + i] (zero for t >= valid or a >= n_act).
// xs: kTile x kChunkK, ws: n_pad x kChunkK (MT); U: kTile x n_pad floats. Each warp stages 64-element (128-byte
// for 16-bit) runs of a row of x or of an active rank's filter. Ends with a barrier.
template <typename MT, typename TS, typename TW>
__device__ void project_tile_mma(const TS* __restrict__ src, int64_t n0, int valid, int64_t dim,
                                 const TW* __restrict__ w, const int* rank, int n_act, int n_pad, MT* xs, MT* ws,
                                 float* U) {
  const int tiles_n = n_pad / kMma, tiles = (kTile / kMma) * tiles_n;
  const int warp = warp_id(), warps = warp_count();
  wmma::fragment<wmma::accumulator, kMma, kMma, kMma, float> acc[kMaxWarpTiles];
  for (int i = 0; i < kMaxWarpTiles; ++i) wmma::fill_fragment(acc[i], 0.f);
  for (int64_t k0 = 0; k0 < dim; k0 += kChunkK) {
    __syncthreads();  // the previous chunk has been consumed
    for (int e = threadIdx.x; e < kTile * kChunkK; e += blockDim.x) {
      const int t = e / kChunkK, kk = e % kChunkK;
      const float v = (t < valid && k0 + kk < dim) ? static_cast<float>(src[(n0 + t) * dim + k0 + kk]) : 0.f;
      xs[e] = to_mma(v, xs);
    }
    for (int e = threadIdx.x; e < n_pad * kChunkK; e += blockDim.x) {
      const int a = e / kChunkK, kk = e % kChunkK;
      const float v =
          (a < n_act && k0 + kk < dim) ? static_cast<float>(w[static_cast<int64_t>(rank[a]) * dim + k0 + kk]) : 0.f;
      ws[e] = to_mma(v, ws);
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kMaxWarpTiles; ++i) {  // static fragment indices: acc stays in registers
      const int tile = warp + i * warps, tm = tile / tiles_n, tn = tile % tiles_n;
      if (tile >= tiles) continue;
#pragma unroll
      for (int kk = 0; kk < kChunkK; kk += kMma) {
        wmma::fragment<wmma::matrix_a, kMma, kMma, kMma, MT, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, kMma, kMma, kMma, MT, wmma::col_major> fb;  // A_act^T: ranks x K rows
        wmma::load_matrix_sync(fa, xs + tm * kMma * kChunkK + kk, kChunkK);
        wmma::load_matrix_sync(fb, ws + tn * kMma * kChunkK + kk, kChunkK);
        wmma::mma_sync(acc[i], fa, fb, acc[i]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kMaxWarpTiles; ++i) {
    const int tile = warp + i * warps, tm = tile / tiles_n, tn = tile % tiles_n;
    if (tile >= tiles) continue;
    wmma::store_matrix_sync(U + tm * kMma * n_pad + tn * kMma, acc[i], n_pad, wmma::mem_row_major);
  }
  __syncthreads();
}

// NaN in the output tile rows (cs: kTile x kChunkN) of the tokens whose ug is nonzero on a rank flagged in bad. Kept
// out of line: the rare path must not cost the common one registers.
template <typename MT>
__device__ __noinline__ void poison_users(const MT* ug, int n_pad, int n_act, const int* bad, float* cs) {
  for (int t = threadIdx.x; t < kTile; t += blockDim.x) {
    bool uses = false;
    for (int a = 0; a < n_act; ++a) uses = uses || (bad[a] && from_mma(ug[t * n_pad + a]) != 0.f);
    if (uses) {
      for (int cc = 0; cc < kChunkN; ++cc) cs[t * kChunkN + cc] = __int_as_float(0x7fc00000);  // NaN
    }
  }
}

// out[(n0 + t) * dim + c] = base[...] (or 0) + sum_a ug[t * n_pad + a] * w[rank[a] * dim + c] for t < valid and the
// columns c in [c_lo, c_hi). bs: n_pad x kChunkN (MT), cs: kTile x kChunkN floats, bad: n_pad + 1 ints. Starts with
// a barrier; ends after the stores.
// MOR_SPEC 2.2: a zero of ug (a rank the token does not pick) must contribute exactly zero, but an MMA multiplies
// every pair. Staging zeroes the non-finite values of B_act and flags their rows (bad[a]; bad[n_pad]: any); a
// chunk with a flag then gives NaN to the outputs of the tokens whose ug is nonzero on a flagged rank. A finite
// chunk, the normal case, costs one isfinite per staged value.
template <typename MT, typename TO, typename TW>
__device__ void expand_tile_mma(const MT* ug, int n_pad, const int* rank, int n_act, const TW* __restrict__ w,
                                int64_t dim, int64_t c_lo, int64_t c_hi, int64_t n0, int valid,
                                const TO* __restrict__ base, TO* __restrict__ out, MT* bs, float* cs, int* bad) {
  constexpr int tiles_n = kChunkN / kMma, tiles = (kTile / kMma) * tiles_n;
  const int warp = warp_id(), warps = warp_count();
  for (int64_t c0 = c_lo; c0 < c_hi; c0 += kChunkN) {
    __syncthreads();  // ug is complete / the previous chunk's output has been written
    for (int a = threadIdx.x; a <= n_pad; a += blockDim.x) bad[a] = 0;
    __syncthreads();
    for (int e = threadIdx.x; e < n_pad * kChunkN; e += blockDim.x) {
      const int a = e / kChunkN, cc = e % kChunkN;
      float v = (a < n_act && c0 + cc < c_hi) ? static_cast<float>(w[static_cast<int64_t>(rank[a]) * dim + c0 + cc])
                                              : 0.f;
      if (!isfinite(v)) {
        v = 0.f;
        bad[a] = 1;  // racing writes of the same value
        bad[n_pad] = 1;
      }
      bs[e] = to_mma(v, bs);
    }
    for (int e = threadIdx.x; e < kTile * kChunkN; e += blockDim.x) {
      const int t = e / kChunkN, cc = e % kChunkN;
      cs[e] = (base != nullptr && t < valid && c0 + cc < c_hi) ? static_cast<float>(base[(n0 + t) * dim + c0 + cc])
                                                                : 0.f;
    }
    __syncthreads();
    for (int tile = warp; tile < tiles; tile += warps) {
      const int tm = tile / tiles_n, tn = tile % tiles_n;
      float* c_tile = cs + tm * kMma * kChunkN + tn * kMma;
      wmma::fragment<wmma::accumulator, kMma, kMma, kMma, float> acc;
      wmma::load_matrix_sync(acc, c_tile, kChunkN, wmma::mem_row_major);
      for (int kk = 0; kk < n_pad; kk += kMma) {
        wmma::fragment<wmma::matrix_a, kMma, kMma, kMma, MT, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, kMma, kMma, kMma, MT, wmma::row_major> fb;
        wmma::load_matrix_sync(fa, ug + tm * kMma * n_pad + kk, n_pad);
        wmma::load_matrix_sync(fb, bs + kk * kChunkN + tn * kMma, kChunkN);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(c_tile, acc, kChunkN, wmma::mem_row_major);
    }
    __syncthreads();
    if (bad[n_pad] != 0) {  // block-uniform, rare: a non-finite value in this chunk of B_act
      poison_users(ug, n_pad, n_act, bad, cs);
      __syncthreads();
    }
    for (int e = threadIdx.x; e < kTile * kChunkN; e += blockDim.x) {
      const int t = e / kChunkN, cc = e % kChunkN;
      if (t < valid && c0 + cc < c_hi) out[(n0 + t) * dim + c0 + cc] = static_cast<TO>(cs[e]);
    }
  }
}

}  // namespace cuda
}  // namespace mor
