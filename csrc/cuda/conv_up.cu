// CUDA kernel for mor::conv_up (see csrc/registration.cpp): gate, 1x1 up-projection and add in one pass
// over the output of conv(x, [weight; lora_a]). One block per (tile of kPixels pixels, sample); the active
// rank channels of the tile are staged in shared memory, each thread owns one pixel and walks the output
// channels (coalesced loads and stores along the pixels).
#ifndef MOR_EMULATE_CUDA
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../checks.h"
#endif
#include "tile.cuh"

namespace mor {
namespace cuda {
namespace {

constexpr int kPixels = 64;

template <typename scalar_t>
__global__ void __launch_bounds__(kPixels)
    conv_up_kernel(const scalar_t* __restrict__ out, const scalar_t* __restrict__ lora_b,
                   const int32_t* __restrict__ idx, const float* __restrict__ gate, scalar_t* __restrict__ y,
                   int64_t pixels, int64_t c_out, int ranks, int num_shared, int k, float scaling) {
  MOR_DYNAMIC_SMEM(smem);
  __shared__ int n_act_s;
  int* rank = reinterpret_cast<int*>(smem);
  float* coef = smem + ranks;
  float* hs = coef + ranks;  // (n_act, kPixels)
  const int64_t b = blockIdx.y;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kPixels + threadIdx.x;
  const int64_t channels = c_out + ranks;
  if (threadIdx.x == 0) build_active(idx + b * k, gate + b * k, k, num_shared, ranks, scaling, rank, coef, &n_act_s);
  __syncthreads();
  const int n_act = n_act_s;
  const scalar_t* ob = out + b * channels * pixels;
  for (int a = 0; a < n_act; ++a) {
    hs[a * kPixels + threadIdx.x] = p < pixels ? coef[a] * static_cast<float>(ob[(c_out + rank[a]) * pixels + p]) : 0.f;
  }
  if (p >= pixels) return;  // no barrier below: each thread reads only its own column of hs
  scalar_t* yb = y + b * c_out * pixels;
  for (int64_t o = 0; o < c_out; ++o) {
    float acc = static_cast<float>(ob[o * pixels + p]);
    const scalar_t* bo = lora_b + o * ranks;
    for (int a = 0; a < n_act; ++a) acc += static_cast<float>(bo[rank[a]]) * hs[a * kPixels + threadIdx.x];
    yb[o * pixels + p] = static_cast<scalar_t>(acc);
  }
}

}  // namespace

#ifndef MOR_EMULATE_CUDA  // host code; tests/kernels/extension_emulation.cpp compiles the kernels above on a CPU

at::Tensor conv_up(const at::Tensor& out, const at::Tensor& lora_b, const at::Tensor& idx, const at::Tensor& gate,
                   int64_t num_shared, double scaling) {
  const auto s = check_conv_up_args(out, lora_b, idx, gate, num_shared);
  check_cuda_limits("mor::conv_up", s.batch, s.ranks);
  const c10::cuda::CUDAGuard guard(out.device());
  auto oc = out.contiguous();
  auto bc = lora_b.contiguous();
  auto idx_c = idx.contiguous();
  auto gate_c = gate.contiguous();
  auto y = at::empty({s.batch, s.d_out, out.size(2), out.size(3)}, out.options());
  if (y.numel() == 0) return y;
  const dim3 grid(static_cast<unsigned>((s.tokens + kPixels - 1) / kPixels), static_cast<unsigned>(s.batch));
  const size_t smem = static_cast<size_t>(2 * s.ranks + s.ranks * kPixels) * sizeof(float);
  MOR_DISPATCH_KERNEL_TYPES(out.scalar_type(), "mor_conv_up_cuda", [&] {
    auto kernel = conv_up_kernel<scalar_t>;
    allow_smem(kernel, smem);
    kernel<<<grid, kPixels, smem, at::cuda::getCurrentCUDAStream()>>>(
        oc.data_ptr<scalar_t>(), bc.data_ptr<scalar_t>(), idx_c.data_ptr<int32_t>(), gate_c.data_ptr<float>(),
        y.data_ptr<scalar_t>(), s.tokens, s.d_out, static_cast<int>(s.ranks), static_cast<int>(num_shared),
        static_cast<int>(s.top_k), static_cast<float>(scaling));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

#endif  // MOR_EMULATE_CUDA

}  // namespace cuda

#ifndef MOR_EMULATE_CUDA
TORCH_LIBRARY_IMPL(mor, CUDA, m) { m.impl("conv_up", &cuda::conv_up); }
#endif

}  // namespace mor
