// CUDA kernel for mor::lora_fwd (see csrc/registration.cpp): the fused MoR low-rank path.
//
// One block per (tile of kTile tokens, sample, chunk of output columns), launched on the current stream. The block
// projects its tokens onto the active ranks (U = x A_act^T, staged through shared memory), writes U to h for the
// backward when asked (store_h; the column-chunk-0 blocks, full rows of h with zeros at the unlisted ranks, so h
// needs no separate memset), scales U by the gates, and expands it through lora_b into its columns of
// y = base + U B_act^T. Sample routing reads only the rows of lora_a / lora_b of active ranks, so zero slots save
// both loads and FLOPs. float32 inputs: SIMT float32 math. float16/bfloat16 inputs on sm_80+: the same pass on
// tensor cores (WMMA 16x16x16, float32 accumulation; tile_mma.cuh), the rank list padded to 16.
//
// Grid fill: a tile of 32 tokens per block gives cdiv(T, 32) x B blocks (2 at T = 64, batch 1); the output columns
// are split into chunks (gridDim.z) until the grid has about two blocks per SM. Each chunk recomputes the
// projection of its tokens (x tile and A_act rows, which stay in L2), as the Triton kernel's column tiles do.
//
// The base GEMM is not fused here: mor_linear runs cuBLAS for x W^T and this kernel adds the low-rank path into
// its output (one extra read of base and write of y, 2 |y| bytes, next to the GEMM's |x| + |W| + |y|). A fused
// GEMM would need a hand-written tensor-core GEMM that keeps up with cuBLAS; the Triton backend, which "auto"
// picks first on CUDA, is the fused one (x read once for x W^T and x A^T, y written once).
#include <algorithm>
#include <type_traits>

#ifndef MOR_EMULATE_CUDA
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../checks.h"
#endif
#include "tile_mma.cuh"

namespace mor {
namespace cuda {
namespace {

// MOR_SPEC 2.2: the gated activation of a rank with g = 0 is exactly zero, whatever U holds (NaN weights).
__device__ inline float gated(float u, float g) { return g != 0.f ? u * g : 0.f; }

template <typename scalar_t, bool TOKEN>
__global__ void __launch_bounds__(kThreads)
    lora_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ lora_a,
                    const scalar_t* __restrict__ lora_bt, const int32_t* __restrict__ idx,
                    const float* __restrict__ gate, const scalar_t* __restrict__ base, scalar_t* __restrict__ y,
                    float* __restrict__ h, int64_t tokens, int64_t d_in, int64_t d_out, int64_t chunk, int ranks,
                    int num_shared, int k, float scaling) {
  MOR_DYNAMIC_SMEM(smem);
  __shared__ int n_act_s;
  TileSmem sm(smem, ranks, TOKEN);
  const int64_t b = blockIdx.y;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int valid = static_cast<int>(min(static_cast<int64_t>(kTile), tokens - t0));
  const int64_t n0 = b * tokens + t0;
  const int64_t c_lo = static_cast<int64_t>(blockIdx.z) * chunk, c_hi = min(d_out, c_lo + chunk);
  const int n_act = block_rank_list<TOKEN>(idx, gate, b, n0, valid, k, num_shared, ranks, scaling, sm.rank, sm.coef,
                                           sm.gt, &n_act_s);
  project_tile(x, n0, valid, d_in, lora_a, sm.rank, n_act, sm.xs, sm.ws, sm.U);
  if (h != nullptr && blockIdx.z == 0) store_h_rows(sm.U, n_act, sm.rank, n_act, ranks, n0, valid, sm.pos, h);
  for (int p = threadIdx.x; p < kTile * n_act; p += blockDim.x) {
    const int t = p / n_act, a = p % n_act;
    sm.U[p] = gated(sm.U[p], TOKEN ? sm.gt[t * ranks + a] : sm.coef[a]);
  }
  __syncthreads();
  expand_tile(sm.U, sm.rank, n_act, lora_bt, d_out, c_lo, c_hi, n0, valid, base, y);
}

// The same pass on tensor cores: MT is the MMA operand type (half / bfloat16; float in the CPU emulation). At least
// two blocks per SM: up to 128 registers a thread (ptxas otherwise settles at 64 here and spills the token-routing
// instance's fragments).
template <typename scalar_t, typename MT, bool TOKEN>
__global__ void __launch_bounds__(kThreads, 2)
    lora_fwd_mma_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ lora_a,
                        const scalar_t* __restrict__ lora_bt, const int32_t* __restrict__ idx,
                        const float* __restrict__ gate, const scalar_t* __restrict__ base, scalar_t* __restrict__ y,
                        float* __restrict__ h, int64_t tokens, int64_t d_in, int64_t d_out, int64_t chunk, int ranks,
                        int num_shared, int k, float scaling) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // bfloat16 WMMA needs sm_80; the host never launches it below
  MOR_DYNAMIC_SMEM(smem);
  __shared__ int n_act_s;
  const MmaSmem L(ranks, TOKEN, sizeof(MT));
  char* raw = reinterpret_cast<char*>(smem);
  int* rank = reinterpret_cast<int*>(raw + L.rank);
  float* coef = reinterpret_cast<float*>(raw + L.coef);
  float* gt = reinterpret_cast<float*>(raw + L.gt);
  MT* xs = reinterpret_cast<MT*>(raw + L.xs);
  MT* ws = reinterpret_cast<MT*>(raw + L.ws);
  float* U = reinterpret_cast<float*>(raw + L.u);
  MT* ug = reinterpret_cast<MT*>(raw + L.ug);
  float* cs = reinterpret_cast<float*>(raw + L.cs);
  int* pos = reinterpret_cast<int*>(raw + L.pos);
  int* bad = reinterpret_cast<int*>(raw + L.bad);
  const int64_t b = blockIdx.y;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int valid = static_cast<int>(min(static_cast<int64_t>(kTile), tokens - t0));
  const int64_t n0 = b * tokens + t0;
  const int64_t c_lo = static_cast<int64_t>(blockIdx.z) * chunk, c_hi = min(d_out, c_lo + chunk);
  const int n_act =
      block_rank_list<TOKEN>(idx, gate, b, n0, valid, k, num_shared, ranks, scaling, rank, coef, gt, &n_act_s);
  const int n_pad = pad16(n_act);
  project_tile_mma(x, n0, valid, d_in, lora_a, rank, n_act, n_pad, xs, ws, U);
  if (h != nullptr && blockIdx.z == 0) store_h_rows(U, n_pad, rank, n_act, ranks, n0, valid, pos, h);
  for (int p = threadIdx.x; p < kTile * n_pad; p += blockDim.x) {
    const int t = p / n_pad, a = p % n_pad;
    const float g = a < n_act ? gated(U[p], TOKEN ? gt[t * ranks + a] : coef[a]) : 0.f;
    ug[p] = to_mma(g, ug);
  }
  // U's region is reused for the B_act staging: expand_tile_mma starts with a barrier
  expand_tile_mma(ug, n_pad, rank, n_act, lora_bt, d_out, c_lo, c_hi, n0, valid, base, y, reinterpret_cast<MT*>(U),
                  cs, bad);
#endif
}

}  // namespace

#ifndef MOR_EMULATE_CUDA  // host code; tests/kernels/extension_emulation.cpp compiles the kernels above on a CPU

// The forward kernel for scalar_t and its shared memory: the WMMA pass for 16-bit inputs on sm_80+, else SIMT.
// (A function template, so the float instantiation never names the tensor-core kernel.)
template <typename scalar_t>
auto pick_fwd_kernel(bool token_routing, bool tensor_cores, int ranks, size_t* smem) {
  auto kernel = token_routing ? lora_fwd_kernel<scalar_t, true> : lora_fwd_kernel<scalar_t, false>;
  *smem = tile_smem_bytes(ranks, token_routing);
  if constexpr (!std::is_same_v<scalar_t, float>) {
    if (tensor_cores) {
      using MT = typename MmaType<scalar_t>::type;
      kernel = token_routing ? lora_fwd_mma_kernel<scalar_t, MT, true> : lora_fwd_mma_kernel<scalar_t, MT, false>;
      *smem = MmaSmem(ranks, token_routing, sizeof(MT)).bytes;
    }
  }
  return kernel;
}

// Column chunks of the output (a multiple of kChunkN) so that the grid has about two blocks per SM.
inline int64_t column_chunk(int64_t blocks, int64_t d_out) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t most = std::max<int64_t>(1, (d_out + kChunkN - 1) / kChunkN);
  const int64_t chunks = std::min(most, std::max<int64_t>(1, (2 * sms + blocks - 1) / std::max<int64_t>(blocks, 1)));
  const int64_t per = (d_out + chunks - 1) / chunks;
  return std::max<int64_t>(kChunkN, (per + kChunkN - 1) / kChunkN * kChunkN);
}

std::tuple<at::Tensor, at::Tensor> lora_fwd(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                            const at::Tensor& idx, const at::Tensor& gate, int64_t num_shared,
                                            double scaling, const std::optional<at::Tensor>& base, bool store_h) {
  const auto s = check_lora_args("mor::lora_fwd", x, lora_a, lora_b, idx, gate, num_shared, base);
  check_cuda_limits("mor::lora_fwd", s.batch, s.ranks);
  const c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  auto ac = lora_a.contiguous();
  auto btc = lora_b.t().contiguous();  // (R, d_out): coalesced rows for the expansion
  auto idx_c = idx.contiguous();
  auto gate_c = gate.contiguous();
  at::Tensor basec = base.has_value() ? base->contiguous() : at::Tensor();
  auto y = at::empty({s.batch, s.tokens, s.d_out}, x.options());
  // h: written whole by the kernel (zeros at the ranks a unit does not list), only when a backward will run
  auto h = store_h ? at::empty({s.batch, s.tokens, s.ranks}, x.options().dtype(at::kFloat))
                   : at::empty({0}, x.options().dtype(at::kFloat));
  if (s.batch * s.tokens == 0) return {y, h.zero_()};
  const int64_t tiles = (s.tokens + kTile - 1) / kTile;
  const int64_t chunk = column_chunk(tiles * s.batch, s.d_out);
  const int64_t chunks = std::max<int64_t>(1, (s.d_out + chunk - 1) / chunk);
  TORCH_CHECK(chunks <= 65535, "mor::lora_fwd: too many output columns for one launch (", s.d_out, ")");
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(s.batch), static_cast<unsigned>(chunks));
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool tensor_cores = at::cuda::getCurrentDeviceProperties()->major >= 8;
  MOR_DISPATCH_KERNEL_TYPES(x.scalar_type(), "mor_lora_fwd_cuda", [&] {
    size_t smem = 0;
    auto kernel = pick_fwd_kernel<scalar_t>(s.token_routing, tensor_cores, static_cast<int>(s.ranks), &smem);
    allow_smem(kernel, smem);
    kernel<<<grid, kThreads, smem, stream>>>(
        xc.data_ptr<scalar_t>(), ac.data_ptr<scalar_t>(), btc.data_ptr<scalar_t>(), idx_c.data_ptr<int32_t>(),
        gate_c.data_ptr<float>(), basec.defined() ? basec.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
        store_h ? h.data_ptr<float>() : nullptr, s.tokens, s.d_in, s.d_out, chunk, static_cast<int>(s.ranks),
        static_cast<int>(num_shared), static_cast<int>(s.top_k), static_cast<float>(scaling));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, h};
}

#endif  // MOR_EMULATE_CUDA

}  // namespace cuda

#ifndef MOR_EMULATE_CUDA
TORCH_LIBRARY_IMPL(mor, CUDA, m) { m.impl("lora_fwd", &cuda::lora_fwd); }
#endif

}  // namespace mor
