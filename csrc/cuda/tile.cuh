// Device helpers shared by the MoR CUDA kernels: per-block routing tables and the two SIMT tile loops
// (down-projection onto the active ranks, expansion back to a wide output). float32 accumulation. Their
// tensor-core versions for 16-bit inputs are in tile_mma.cuh.
//
// A block owns kTile consecutive tokens of one sample. With sample routing the block first gathers the
// sample's active ranks (shared, then the routed ranks picked by a slot; zero slots and out-of-range indices
// add nothing), so only those rows of lora_a / lora_b are ever read. With token routing every rank is
// listed and a (kTile, R) table holds each token's scaled dense gate.
#pragma once
#include <cstddef>
#include <cstdint>
#ifndef MOR_EMULATE_CUDA
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#endif

#ifndef MOR_DYNAMIC_SMEM
// The kernels' dynamic shared memory as `float name[]`, declared the one way every kernel uses it, 32-byte
// aligned for WMMA's 256-bit fragment loads (tests/kernels/extension_emulation.cpp redefines it).
#define MOR_DYNAMIC_SMEM(name) extern __shared__ __align__(32) float name[]
#endif

namespace mor {
namespace cuda {

constexpr int kThreads = 256;  // threads per block of the tile kernels
constexpr int kTile = 32;      // tokens per block
constexpr int kChunk = 32;     // reduction chunk staged in shared memory
constexpr int kPad = kChunk + 1;
constexpr int64_t kMaxRanks = 256;

// Sample routing: the unit's active ranks into rank[0..count) with coef = scaling * g (a rank picked by two
// slots gets both gates). One thread builds it (R and k are small); the caller syncs.
__device__ inline void build_active(const int32_t* __restrict__ idx_row, const float* __restrict__ gate_row, int k,
                                    int num_shared, int ranks, float scaling, int* rank, float* coef, int* count) {
  int n = 0;
  for (int r = 0; r < num_shared; ++r) {
    rank[n] = r;
    coef[n++] = scaling;
  }
  const int num_routed = ranks - num_shared;
  for (int j = 0; j < k; ++j) {
    const int slot = idx_row[j];
    // a zero slot, an index outside [0, E) or a gate of exactly 0 (g_r = 0: the rank is not used, MOR_SPEC 2.2)
    if (slot < 0 || slot >= num_routed || gate_row[j] == 0.f) continue;
    const int r = num_shared + slot;
    int a = num_shared;
    while (a < n && rank[a] != r) ++a;
    if (a == n) {
      rank[n] = r;
      coef[n++] = 0.f;
    }
    coef[a] += scaling * gate_row[j];
  }
  *count = n;
}

// Token routing: rank[a] = a for all ranks and gt[t * R + r] = scaling * g_r of token n0 + t.
__device__ inline void build_token_gates(const int32_t* __restrict__ idx, const float* __restrict__ gate, int64_t n0,
                                         int valid, int k, int num_shared, int ranks, float scaling, int* rank,
                                         float* gt) {
  for (int r = threadIdx.x; r < ranks; r += blockDim.x) rank[r] = r;
  for (int e = threadIdx.x; e < kTile * ranks; e += blockDim.x) {
    gt[e] = (e % ranks) < num_shared && (e / ranks) < valid ? scaling : 0.f;
  }
  __syncthreads();
  const int num_routed = ranks - num_shared;
  for (int t = threadIdx.x; t < valid; t += blockDim.x) {  // one thread per token row: no races
    for (int j = 0; j < k; ++j) {
      const int64_t e = (n0 + t) * k + j;
      const int slot = idx[e];
      if (slot >= 0 && slot < num_routed) gt[t * ranks + num_shared + slot] += scaling * gate[e];
    }
  }
  __syncthreads();
}

// The block's rank list (rank[0..n) and coef with sample routing; the token gate table gt with token
// routing, where n = R) from the routing of sample b / tokens n0..n0+valid; returns n. Ends with a barrier.
template <bool TOKEN>
__device__ inline int block_rank_list(const int32_t* __restrict__ idx, const float* __restrict__ gate, int64_t b,
                                      int64_t n0, int valid, int k, int num_shared, int ranks, float scaling,
                                      int* rank, float* coef, float* gt, int* n_act_s) {
  if (TOKEN) {
    build_token_gates(idx, gate, n0, valid, k, num_shared, ranks, scaling, rank, gt);
    return ranks;
  }
  if (threadIdx.x == 0) build_active(idx + b * k, gate + b * k, k, num_shared, ranks, scaling, rank, coef, n_act_s);
  __syncthreads();
  return *n_act_s;
}

// h[(n0 + t) * ranks + r] for t < valid and every rank r: U[t * n_stride + a] where rank[a] = r, 0 for the ranks
// not listed (one coalesced pass over the block's rows of h; pos: `ranks` ints of shared memory). Ends with
// a barrier.
__device__ inline void store_h_rows(const float* U, int n_stride, const int* rank, int n_act, int ranks, int64_t n0,
                                    int valid, int* pos, float* __restrict__ h) {
  for (int r = threadIdx.x; r < ranks; r += blockDim.x) pos[r] = -1;
  __syncthreads();
  for (int a = threadIdx.x; a < n_act; a += blockDim.x) pos[rank[a]] = a;  // a rank listed twice: no (distinct)
  __syncthreads();
  for (int e = threadIdx.x; e < valid * ranks; e += blockDim.x) {
    const int t = e / ranks, a = pos[e % ranks];
    h[(n0 + t) * ranks + e % ranks] = a >= 0 ? U[t * n_stride + a] : 0.f;
  }
  __syncthreads();
}

// U[t * n_act + a] = sum_i src[(n0 + t) * dim + i] * w[rank[a] * dim + i] for t < valid (0 for the other rows).
// xs: kTile * kPad floats, ws: n_act * kPad floats of shared memory. Ends with a barrier.
template <typename TS, typename TW>
__device__ void project_tile(const TS* __restrict__ src, int64_t n0, int valid, int64_t dim, const TW* __restrict__ w,
                             const int* rank, int n_act, float* xs, float* ws, float* U) {
  const int total = kTile * n_act;
  for (int p = threadIdx.x; p < total; p += blockDim.x) U[p] = 0.f;
  for (int64_t k0 = 0; k0 < dim; k0 += kChunk) {
    __syncthreads();  // the previous chunk has been consumed
    for (int e = threadIdx.x; e < kTile * kChunk; e += blockDim.x) {
      const int t = e / kChunk, kk = e % kChunk;
      xs[t * kPad + kk] = (t < valid && k0 + kk < dim) ? static_cast<float>(src[(n0 + t) * dim + k0 + kk]) : 0.f;
    }
    for (int e = threadIdx.x; e < n_act * kChunk; e += blockDim.x) {
      const int a = e / kChunk, kk = e % kChunk;
      ws[a * kPad + kk] = k0 + kk < dim ? static_cast<float>(w[static_cast<int64_t>(rank[a]) * dim + k0 + kk]) : 0.f;
    }
    __syncthreads();
    for (int p = threadIdx.x; p < total; p += blockDim.x) {
      const float* xr = xs + (p / n_act) * kPad;
      const float* wr = ws + (p % n_act) * kPad;
      float s = U[p];
#pragma unroll 8
      for (int kk = 0; kk < kChunk; ++kk) s += xr[kk] * wr[kk];
      U[p] = s;
    }
  }
  __syncthreads();
}

// out[(n0 + t) * dim + c] = base[...] (or 0) + sum_a C[t * n_act + a] * w[rank[a] * dim + c] for t < valid and
// the columns c in [c_lo, c_hi). One thread per output column, kTile accumulators in registers. A zero of C
// contributes exactly zero whatever w holds (MOR_SPEC 2.2: a rank a token does not pick, NaN weights or not).
template <typename TO, typename TW>
__device__ void expand_tile(const float* C, const int* rank, int n_act, const TW* __restrict__ w, int64_t dim,
                            int64_t c_lo, int64_t c_hi, int64_t n0, int valid, const TO* __restrict__ base,
                            TO* __restrict__ out) {
  for (int64_t c = c_lo + threadIdx.x; c < c_hi; c += blockDim.x) {
    float acc[kTile];
#pragma unroll
    for (int t = 0; t < kTile; ++t) acc[t] = (base != nullptr && t < valid) ? static_cast<float>(base[(n0 + t) * dim + c]) : 0.f;
    for (int a = 0; a < n_act; ++a) {
      const float wv = static_cast<float>(w[static_cast<int64_t>(rank[a]) * dim + c]);
      if (isfinite(wv)) {
#pragma unroll
        for (int t = 0; t < kTile; ++t) acc[t] += C[t * n_act + a] * wv;
      } else {  // rare: only the tokens that use this rank see its non-finite weight
#pragma unroll
        for (int t = 0; t < kTile; ++t) {
          if (C[t * n_act + a] != 0.f) acc[t] += C[t * n_act + a] * wv;
        }
      }
    }
#pragma unroll
    for (int t = 0; t < kTile; ++t) {
      if (t < valid) out[(n0 + t) * dim + c] = static_cast<TO>(acc[t]);
    }
  }
}

// Shared memory of the tile kernels: rank list, coefficients / token gate table, x and w chunks, U.
inline size_t tile_smem_bytes(int64_t ranks, bool token_routing) {
  const int64_t floats = ranks /*rank*/ + ranks /*coef*/ + (token_routing ? kTile * ranks : 0) + kTile * kPad +
                         ranks * kPad + kTile * ranks + ranks /*pos*/;
  return static_cast<size_t>(floats) * sizeof(float);
}

#ifndef MOR_EMULATE_CUDA
template <typename Kernel>
inline void allow_smem(Kernel kernel, size_t bytes) {
  // the device properties torch caches (no driver query per launch)
  const int optin = static_cast<int>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  TORCH_CHECK(bytes <= static_cast<size_t>(optin), "this MoR shape needs ", bytes,
              " bytes of shared memory per block, more than this GPU allows (", optin,
              "); use fewer ranks (token routing keeps a gate table of 32 tokens x R), or backend='triton'");
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

#endif

// Carves the dynamic shared memory of a tile kernel (layout of tile_smem_bytes).
struct TileSmem {
  int* rank;
  float* coef;
  float* gt;
  float* xs;
  float* ws;
  float* U;
  int* pos;
  __device__ TileSmem(float* smem, int ranks, bool token_routing) {
    rank = reinterpret_cast<int*>(smem);
    coef = smem + ranks;
    gt = coef + ranks;
    xs = gt + (token_routing ? kTile * ranks : 0);
    ws = xs + kTile * kPad;
    U = ws + ranks * kPad;
    pos = reinterpret_cast<int*>(U + kTile * ranks);
  }
};

#ifndef MOR_EMULATE_CUDA
inline void check_cuda_limits(const char* op, int64_t batch, int64_t ranks) {
  TORCH_CHECK(ranks <= kMaxRanks, op, ": the CUDA kernels support up to ", kMaxRanks, " ranks, got R = ", ranks);
  TORCH_CHECK(batch <= 65535, op, ": the CUDA kernels support a batch of up to 65535, got ", batch);
}
#endif

}  // namespace cuda
}  // namespace mor
