// Argument checks shared by the CPU and CUDA kernels; messages name the argument like the Python ones.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

namespace mor {

inline void check_dense_gate_args(const at::Tensor& idx, const at::Tensor& gate, int64_t num_shared,
                                  int64_t num_ranks) {
  TORCH_CHECK(idx.scalar_type() == at::kInt, "mor::dense_gate: idx must be int32, got ", idx.scalar_type());
  TORCH_CHECK(gate.scalar_type() == at::kFloat, "mor::dense_gate: gate must be float32, got ", gate.scalar_type());
  TORCH_CHECK(idx.dim() >= 1, "mor::dense_gate: idx must have at least one dimension, got shape ", idx.sizes());
  TORCH_CHECK(idx.sizes() == gate.sizes(), "mor::dense_gate: gate must have the shape of idx ", idx.sizes(),
              ", got ", gate.sizes());
  TORCH_CHECK(idx.device() == gate.device(), "mor::dense_gate: idx is on ", idx.device(), " but gate is on ",
              gate.device());
  TORCH_CHECK(num_ranks >= 1, "mor::dense_gate: num_ranks must be >= 1, got ", num_ranks);
  TORCH_CHECK(num_shared >= 0 && num_shared <= num_ranks, "mor::dense_gate: num_shared must be in [0, ",
              num_ranks, "], got ", num_shared);
}

inline std::vector<int64_t> dense_gate_shape(const at::Tensor& idx, int64_t num_ranks) {
  auto shape = idx.sizes().vec();
  shape.back() = num_ranks;
  return shape;
}

}  // namespace mor
