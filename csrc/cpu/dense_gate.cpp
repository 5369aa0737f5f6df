// CPU kernel for mor::dense_gate (see csrc/registration.cpp).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"

namespace mor {

at::Tensor dense_gate_cpu(const at::Tensor& idx, const at::Tensor& gate, int64_t num_shared, int64_t num_ranks) {
  check_dense_gate_args(idx, gate, num_shared, num_ranks);
  auto idx_c = idx.contiguous();
  auto gate_c = gate.contiguous();
  auto out = at::empty(dense_gate_shape(idx, num_ranks), gate.options());
  const int64_t k = idx.size(-1);
  const int64_t rows = k ? idx.numel() / k : out.numel() / num_ranks;
  const int64_t num_routed = num_ranks - num_shared;
  const int32_t* ip = idx_c.data_ptr<int32_t>();
  const float* gp = gate_c.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      float* o = op + row * num_ranks;
      for (int64_t r = 0; r < num_ranks; ++r) o[r] = r < num_shared ? 1.f : 0.f;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t slot = ip[row * k + j];
        if (slot >= 0 && slot < num_routed) o[num_shared + slot] += gp[row * k + j];  // else: zero slot
      }
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(mor, CPU, m) { m.impl("dense_gate", &dense_gate_cpu); }

}  // namespace mor
