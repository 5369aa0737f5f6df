// CUDA kernel for mor::dense_gate (see csrc/registration.cpp): one thread per routing row.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"

namespace mor {
namespace {

__global__ void dense_gate_kernel(const int32_t* __restrict__ idx, const float* __restrict__ gate,
                                  float* __restrict__ out, int64_t rows, int64_t k, int64_t num_shared,
                                  int64_t num_ranks) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  float* o = out + row * num_ranks;
  for (int64_t r = 0; r < num_ranks; ++r) o[r] = r < num_shared ? 1.f : 0.f;
  const int64_t num_routed = num_ranks - num_shared;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t slot = idx[row * k + j];
    if (slot >= 0 && slot < num_routed) o[num_shared + slot] += gate[row * k + j];  // else: zero slot
  }
}

}  // namespace

at::Tensor dense_gate_cuda(const at::Tensor& idx, const at::Tensor& gate, int64_t num_shared, int64_t num_ranks) {
  check_dense_gate_args(idx, gate, num_shared, num_ranks);
  const c10::cuda::CUDAGuard guard(idx.device());
  auto idx_c = idx.contiguous();
  auto gate_c = gate.contiguous();
  auto out = at::empty(dense_gate_shape(idx, num_ranks), gate.options());
  const int64_t k = idx.size(-1);
  const int64_t rows = k ? idx.numel() / k : out.numel() / num_ranks;
  if (rows == 0) return out;
  constexpr int threads = 128;
  const auto blocks = static_cast<unsigned int>((rows + threads - 1) / threads);
  dense_gate_kernel<<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      idx_c.data_ptr<int32_t>(), gate_c.data_ptr<float>(), out.data_ptr<float>(), rows, k, num_shared, num_ranks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(mor, CUDA, m) { m.impl("dense_gate", &dense_gate_cuda); }

}  // namespace mor
