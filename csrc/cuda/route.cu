// CUDA kernel for mor::route (MOR_SPEC 2.1): one warp per row of logits, launched on the current stream.
//
// Each lane owns the slots lane, lane + 32, ...; the warp reduces the max and the sum for the softmax, then
// picks the k slots one by one: pick j is the warp's best slot strictly after pick j - 1 in the order
// (probability descending, slot ascending), so ties go to the lower slot and no selection mask is needed
// (the idea of vLLM's topk_softmax: a warp owns a row, everything in registers and shuffles).
#ifndef MOR_EMULATE_CUDA
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../checks.h"
#endif
#include "tile.cuh"

namespace mor {
namespace cuda {
namespace {

constexpr int kRouteThreads = 256;
constexpr unsigned kFull = 0xffffffffu;

template <typename scalar_t>
__global__ void __launch_bounds__(kRouteThreads)
    route_kernel(const scalar_t* __restrict__ logits, int32_t* __restrict__ idx, float* __restrict__ gate,
                 float* __restrict__ probs, int32_t* __restrict__ slots, int64_t rows, int n, int k, int num_real,
                 bool renormalize) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kRouteThreads / 32) + threadIdx.x / 32;
  if (row >= rows) return;  // the whole warp leaves together
  const scalar_t* l = logits + row * n;
  float* p = probs + row * n;
  float mx = -INFINITY;
  for (int i = lane; i < n; i += 32) mx = fmaxf(mx, static_cast<float>(l[i]));
  for (int off = 16; off; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, off));
  float sum = 0.f;
  for (int i = lane; i < n; i += 32) {
    const float e = expf(static_cast<float>(l[i]) - mx);  // accurate exp, as the reference
    p[i] = e;
    sum += e;
  }
  for (int off = 16; off; off >>= 1) sum += __shfl_xor_sync(kFull, sum, off);
  for (int i = lane; i < n; i += 32) p[i] = p[i] / sum;  // each lane rereads only what it wrote

  float prev_v = INFINITY;
  int prev_i = -1;
  float total = 0.f;
  for (int j = 0; j < k; ++j) {
    float best_v = 0.f;
    int best_i = n;  // n = none yet
    for (int i = lane; i < n; i += 32) {
      const float v = p[i];
      const bool after = v < prev_v || (v == prev_v && i > prev_i);
      if (after && (best_i == n || v > best_v)) {  // ascending i: '>' keeps the lower slot on ties
        best_v = v;
        best_i = i;
      }
    }
    for (int off = 16; off; off >>= 1) {
      const float ov = __shfl_xor_sync(kFull, best_v, off);
      const int oi = __shfl_xor_sync(kFull, best_i, off);
      if (oi != n && (best_i == n || ov > best_v || (ov == best_v && oi < best_i))) {
        best_v = ov;
        best_i = oi;
      }
    }
    if (best_i == n) {  // only NaN probabilities left (non-finite logits): keep the output in range
      best_i = j;
      best_v = __int_as_float(0x7fc00000);  // NaN
    }
    total += best_v;
    if (lane == 0) {
      const int64_t o = row * k + j;
      slots[o] = best_i;
      idx[o] = best_i < num_real ? best_i : -1;
      gate[o] = best_v;
    }
    prev_v = best_v;
    prev_i = best_i;
  }
  if (renormalize) {
    __syncwarp();
    for (int j = lane; j < k; j += 32) gate[row * k + j] /= total;
  }
}

}  // namespace

#ifndef MOR_EMULATE_CUDA  // host code; tests/kernels/extension_emulation.cpp compiles the kernels above on a CPU

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> route(const at::Tensor& logits, int64_t top_k,
                                                                 int64_t num_zero, bool renormalize) {
  check_route_args(logits, top_k, num_zero);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.size(-1);
  const int64_t rows = logits.numel() / n;
  TORCH_CHECK(n <= (int64_t{1} << 30), "mor::route: at most 2^30 slots per row, got ", n);
  auto lc = logits.contiguous();
  auto sel_shape = logits.sizes().vec();
  sel_shape.back() = top_k;
  auto idx = at::empty(sel_shape, logits.options().dtype(at::kInt));
  auto slots = at::empty(sel_shape, logits.options().dtype(at::kInt));
  auto gate = at::empty(sel_shape, logits.options().dtype(at::kFloat));
  auto probs = at::empty(logits.sizes(), logits.options().dtype(at::kFloat));
  if (rows == 0) return {idx, gate, probs, slots};
  constexpr int64_t rows_per_block = kRouteThreads / 32;
  const auto blocks = static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block);
  MOR_DISPATCH_KERNEL_TYPES(logits.scalar_type(), "mor_route_cuda", [&] {
    route_kernel<scalar_t><<<blocks, kRouteThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        lc.data_ptr<scalar_t>(), idx.data_ptr<int32_t>(), gate.data_ptr<float>(), probs.data_ptr<float>(),
        slots.data_ptr<int32_t>(), rows, static_cast<int>(n), static_cast<int>(top_k), static_cast<int>(n - num_zero),
        renormalize);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {idx, gate, probs, slots};
}

#endif  // MOR_EMULATE_CUDA

}  // namespace cuda

#ifndef MOR_EMULATE_CUDA
TORCH_LIBRARY_IMPL(mor, CUDA, m) { m.impl("route", &cuda::route); }
#endif

}  // namespace mor
