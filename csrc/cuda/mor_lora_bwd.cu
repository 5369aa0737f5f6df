// CUDA kernels for mor::lora_bwd (see csrc/registration.cpp), deterministic: no atomics, every sum over
// tokens runs in a fixed order that depends only on the shapes.
//
//  1. rank kernel, per (token tile, sample): dyB = dy B_act (the down-projection of grad_y onto the active
//     ranks, the same tile loop as the forward), then dh = scaling g dyB, hg = scaling g h, and for the gate
//     gradient dyB * h summed over the tile (sample routing: one partial per tile) or per token;
//  2. gate kernel (sample routing): sums the per-tile partials in tile order;
//  3. dx kernel, per token tile: dx = dh A_act (the forward's expansion loop);
//  4. outer-product kernels: dA = dh^T x and dB^T = hg^T dy as fixed token splits, then an ordered sum.
#ifndef MOR_EMULATE_CUDA
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../checks.h"
#endif
#include "tile.cuh"

namespace mor {
namespace cuda {
namespace {

constexpr int kOuterRanks = 8;     // ranks per block of the outer-product kernel
constexpr int kOuterThreads = 128;  // columns per block
constexpr int64_t kOuterTokens = 256;  // tokens per split (at most kMaxSplits splits)
constexpr int64_t kMaxSplits = 64;

template <typename scalar_t, bool TOKEN>
__global__ void __launch_bounds__(kThreads)
    lora_bwd_rank_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ lora_bt,
                         const float* __restrict__ h, const int32_t* __restrict__ idx, const float* __restrict__ gate,
                         float* __restrict__ dh, float* __restrict__ hg, float* __restrict__ qpart,
                         float* __restrict__ dgate, int64_t tokens, int64_t d_out, int ranks, int num_shared, int k,
                         float scaling) {
  MOR_DYNAMIC_SMEM(smem);
  __shared__ int n_act_s;
  TileSmem sm(smem, ranks, TOKEN);
  const int64_t b = blockIdx.y;
  const int64_t tile = blockIdx.x;
  const int64_t t0 = tile * kTile;
  const int valid = static_cast<int>(min(static_cast<int64_t>(kTile), tokens - t0));
  const int64_t n0 = b * tokens + t0;
  const int n_act = block_rank_list<TOKEN>(idx, gate, b, n0, valid, k, num_shared, ranks, scaling, sm.rank, sm.coef,
                                           sm.gt, &n_act_s);
  project_tile(dy, n0, valid, d_out, lora_bt, sm.rank, n_act, sm.xs, sm.ws, sm.U);  // U = dyB
  for (int p = threadIdx.x; p < kTile * n_act; p += blockDim.x) {
    const int t = p / n_act, a = p % n_act;
    float q = 0.f;
    if (t < valid) {
      const int64_t e = (n0 + t) * ranks + sm.rank[a];
      const float g = TOKEN ? sm.gt[t * ranks + a] : sm.coef[a];
      const float hv = h[e];
      // MOR_SPEC 2.2: zero for a rank the token does not pick, whatever dy B or h hold there
      dh[e] = g != 0.f ? g * sm.U[p] : 0.f;
      hg[e] = g != 0.f ? g * hv : 0.f;
      q = sm.U[p] * hv;
    }
    sm.U[p] = q;
  }
  __syncthreads();
  if (TOKEN) {
    const int num_routed = ranks - num_shared;
    for (int e = threadIdx.x; e < valid * k; e += blockDim.x) {
      const int t = e / k;
      const int64_t o = (n0 + t) * k + e % k;
      const int slot = idx[o];
      const bool used = slot >= 0 && slot < num_routed && gate[o] != 0.f;  // a gate of 0: the rank is not used
      dgate[o] = used ? scaling * sm.U[t * ranks + num_shared + slot] : 0.f;
    }
  } else {
    const int64_t tiles = gridDim.x;
    for (int a = threadIdx.x; a < n_act; a += blockDim.x) {
      float s = 0.f;
      for (int t = 0; t < valid; ++t) s += sm.U[t * n_act + a];
      qpart[(b * tiles + tile) * ranks + sm.rank[a]] = s;
    }
  }
}

// Sample routing: dgate[b, j] = scaling * sum over tiles of qpart[b, tile, S + idx[b, j]] (0 for a zero slot and
// for a gate of exactly 0, which does not use its rank).
__global__ void lora_bwd_gate_kernel(const float* __restrict__ qpart, const int32_t* __restrict__ idx,
                                     const float* __restrict__ gate, float* __restrict__ dgate, int64_t batch, int64_t tiles, int ranks,
                                     int num_shared, int k, float scaling) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= batch * k) return;
  const int64_t b = e / k;
  const int slot = idx[e];
  float s = 0.f;
  if (slot >= 0 && slot < ranks - num_shared && gate[e] != 0.f) {
    for (int64_t tile = 0; tile < tiles; ++tile) s += qpart[(b * tiles + tile) * ranks + num_shared + slot];
  }
  dgate[e] = scaling * s;
}

// dx = dh A over the unit's active ranks (all ranks with token routing), per token tile.
template <typename scalar_t, bool TOKEN>
__global__ void __launch_bounds__(kThreads)
    lora_bwd_dx_kernel(const float* __restrict__ dh, const scalar_t* __restrict__ lora_a,
                       const int32_t* __restrict__ idx, const float* __restrict__ gate, scalar_t* __restrict__ dx,
                       int64_t tokens, int64_t d_in, int ranks, int num_shared, int k) {
  MOR_DYNAMIC_SMEM(smem);
  __shared__ int n_act_s;
  int* rank = reinterpret_cast<int*>(smem);
  float* coef = smem + ranks;  // unused values; build_active needs the room
  float* C = coef + ranks;     // (kTile, n_act)
  const int64_t b = blockIdx.y;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int valid = static_cast<int>(min(static_cast<int64_t>(kTile), tokens - t0));
  const int64_t n0 = b * tokens + t0;
  if (TOKEN) {
    for (int r = threadIdx.x; r < ranks; r += blockDim.x) rank[r] = r;
    if (threadIdx.x == 0) n_act_s = ranks;
  } else if (threadIdx.x == 0) {
    build_active(idx + b * k, gate + b * k, k, num_shared, ranks, 1.f, rank, coef, &n_act_s);
  }
  __syncthreads();
  const int n_act = n_act_s;
  for (int p = threadIdx.x; p < kTile * n_act; p += blockDim.x) {
    const int t = p / n_act;
    C[p] = t < valid ? dh[(n0 + t) * ranks + rank[p % n_act]] : 0.f;
  }
  __syncthreads();
  expand_tile(C, rank, n_act, lora_a, d_in, 0, d_in, n0, valid, static_cast<const scalar_t*>(nullptr), dx);
}

// partial[split, r, c] = sum over the split's tokens n of p[n, r] * q[n, c].
template <typename scalar_t>
__global__ void __launch_bounds__(kOuterThreads)
    outer_partial_kernel(const float* __restrict__ p, const scalar_t* __restrict__ q, float* __restrict__ partial,
                         int64_t n_total, int ranks, int64_t cols, int64_t per_split) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int r0 = blockIdx.y * kOuterRanks;
  const int64_t split = blockIdx.z;
  if (c >= cols) return;
  const int64_t begin = split * per_split;
  const int64_t end = min(n_total, begin + per_split);
  float acc[kOuterRanks] = {0.f};
  for (int64_t n = begin; n < end; ++n) {
    const float qv = static_cast<float>(q[n * cols + c]);
    const float* pn = p + n * ranks + r0;
#pragma unroll
    for (int j = 0; j < kOuterRanks; ++j) {
      if (r0 + j < ranks) acc[j] += __ldg(pn + j) * qv;
    }
  }
#pragma unroll
  for (int j = 0; j < kOuterRanks; ++j) {
    if (r0 + j < ranks) partial[(split * ranks + r0 + j) * cols + c] = acc[j];
  }
}

// out[i] = sum over splits of partial[split, i] in split order, cast to the output dtype.
template <typename scalar_t>
__global__ void split_sum_kernel(const float* __restrict__ partial, scalar_t* __restrict__ out, int64_t numel,
                                 int64_t splits) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= numel) return;
  float s = 0.f;
  for (int64_t sp = 0; sp < splits; ++sp) s += partial[sp * numel + i];
  out[i] = static_cast<scalar_t>(s);
}

#ifndef MOR_EMULATE_CUDA
// (ranks, cols) = p^T q for p (n_total, ranks) float32 and q (n_total, cols), deterministic.
at::Tensor sum_outer(const at::Tensor& p, const at::Tensor& q, int64_t n_total, int64_t ranks, int64_t cols,
                     cudaStream_t stream) {
  auto out = at::empty({ranks, cols}, q.options());
  if (out.numel() == 0) return out;
  if (n_total == 0) return out.zero_();
  const int64_t splits = std::min(kMaxSplits, (n_total + kOuterTokens - 1) / kOuterTokens);
  const int64_t per_split = (n_total + splits - 1) / splits;
  auto partial = at::empty({splits, ranks, cols}, p.options());
  const dim3 grid(static_cast<unsigned>((cols + kOuterThreads - 1) / kOuterThreads),
                  static_cast<unsigned>((ranks + kOuterRanks - 1) / kOuterRanks), static_cast<unsigned>(splits));
  MOR_DISPATCH_KERNEL_TYPES(q.scalar_type(), "mor_outer_cuda", [&] {
    outer_partial_kernel<scalar_t><<<grid, kOuterThreads, 0, stream>>>(
        p.data_ptr<float>(), q.data_ptr<scalar_t>(), partial.data_ptr<float>(), n_total, static_cast<int>(ranks),
        cols, per_split);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t numel = ranks * cols;
    split_sum_kernel<scalar_t><<<static_cast<unsigned>((numel + 255) / 256), 256, 0, stream>>>(
        partial.data_ptr<float>(), out.data_ptr<scalar_t>(), numel, splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

#endif  // MOR_EMULATE_CUDA

}  // namespace

#ifndef MOR_EMULATE_CUDA  // host code; tests/kernels/extension_emulation.cpp compiles the kernels above on a CPU

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
    const at::Tensor& idx, const at::Tensor& gate, const at::Tensor& h, int64_t num_shared, double scaling,
    std::array<bool, 4> output_mask) {
  const auto s = check_lora_bwd_args(grad_y, x, lora_a, lora_b, idx, gate, h, num_shared);
  check_cuda_limits("mor::lora_bwd", s.batch, s.ranks);
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t n_total = s.batch * s.tokens, ranks = s.ranks, k = s.top_k;
  const auto f32 = x.options().dtype(at::kFloat);
  auto dy = grad_y.contiguous();
  auto xc = x.contiguous();
  auto ac = lora_a.contiguous();
  auto btc = lora_b.t().contiguous();
  auto hc = h.contiguous();
  auto idx_c = idx.contiguous();
  auto gate_c = gate.contiguous();
  const int64_t tiles = (s.tokens + kTile - 1) / kTile;
  auto dh = at::zeros({n_total, ranks}, f32);
  auto hg = at::zeros({n_total, ranks}, f32);
  auto grad_gate = at::empty(idx.sizes(), f32);
  auto qpart = s.token_routing ? at::empty({0}, f32) : at::zeros({s.batch, tiles, ranks}, f32);
  const float sc = static_cast<float>(scaling);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(s.batch));
  if (n_total > 0) {
    const size_t smem = tile_smem_bytes(ranks, s.token_routing);
    MOR_DISPATCH_KERNEL_TYPES(x.scalar_type(), "mor_lora_bwd_rank_cuda", [&] {
      auto kernel = s.token_routing ? lora_bwd_rank_kernel<scalar_t, true> : lora_bwd_rank_kernel<scalar_t, false>;
      allow_smem(kernel, smem);
      kernel<<<grid, kThreads, smem, stream>>>(dy.data_ptr<scalar_t>(), btc.data_ptr<scalar_t>(), hc.data_ptr<float>(),
                                               idx_c.data_ptr<int32_t>(), gate_c.data_ptr<float>(), dh.data_ptr<float>(),
                                               hg.data_ptr<float>(), qpart.data_ptr<float>(),
                                               grad_gate.data_ptr<float>(), s.tokens, s.d_out, static_cast<int>(ranks),
                                               static_cast<int>(num_shared), static_cast<int>(k), sc);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor grad_x = at::empty({0}, x.options()), grad_a = at::empty({0}, x.options()),
             grad_b = at::empty({0}, x.options());
  if (output_mask[3] && !s.token_routing) {
    if (n_total == 0) {
      grad_gate.zero_();
    } else {
      const int64_t units = s.batch * k;
      lora_bwd_gate_kernel<<<static_cast<unsigned>((units + 127) / 128), 128, 0, stream>>>(
          qpart.data_ptr<float>(), idx_c.data_ptr<int32_t>(), gate_c.data_ptr<float>(), grad_gate.data_ptr<float>(),
          s.batch, tiles,
          static_cast<int>(ranks), static_cast<int>(num_shared), static_cast<int>(k), sc);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  if (!output_mask[3]) grad_gate = at::empty({0}, f32);
  if (output_mask[0]) {
    grad_x = at::empty({s.batch, s.tokens, s.d_in}, x.options());
    if (n_total > 0) {
      const size_t smem = static_cast<size_t>(2 * ranks + kTile * ranks) * sizeof(float);
      MOR_DISPATCH_KERNEL_TYPES(x.scalar_type(), "mor_lora_bwd_dx_cuda", [&] {
        auto kernel = s.token_routing ? lora_bwd_dx_kernel<scalar_t, true> : lora_bwd_dx_kernel<scalar_t, false>;
        allow_smem(kernel, smem);
        kernel<<<grid, kThreads, smem, stream>>>(dh.data_ptr<float>(), ac.data_ptr<scalar_t>(),
                                                 idx_c.data_ptr<int32_t>(), gate_c.data_ptr<float>(),
                                                 grad_x.data_ptr<scalar_t>(), s.tokens, s.d_in,
                                                 static_cast<int>(ranks), static_cast<int>(num_shared),
                                                 static_cast<int>(k));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  }
  if (output_mask[1]) grad_a = sum_outer(dh, xc.view({n_total, s.d_in}), n_total, ranks, s.d_in, stream);
  if (output_mask[2]) grad_b = sum_outer(hg, dy.view({n_total, s.d_out}), n_total, ranks, s.d_out, stream).t().contiguous();
  return {grad_x, grad_a, grad_b, grad_gate};
}

#endif  // MOR_EMULATE_CUDA

}  // namespace cuda

#ifndef MOR_EMULATE_CUDA
TORCH_LIBRARY_IMPL(mor, CUDA, m) { m.impl("lora_bwd", &cuda::lora_bwd); }
#endif

}  // namespace mor
