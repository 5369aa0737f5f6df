// Argument checks shared by the CPU and CUDA kernels; messages name the argument like the Python ones, and a
// wrong dtype raises TypeError, a wrong shape, range or device ValueError in Python (as mor_kernels.validation).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <string>

// The kernel dtypes (float32, float16, bfloat16; float64 stays on the reference path).
#define MOR_DISPATCH_KERNEL_TYPES(TYPE, NAME, ...)                               \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)       \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                \
                             AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace mor {

inline void check_dense_gate_args(const at::Tensor& idx, const at::Tensor& gate, int64_t num_shared,
                                  int64_t num_ranks) {
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kInt, "mor::dense_gate: idx must be int32, got ", idx.scalar_type());
  TORCH_CHECK_TYPE(gate.scalar_type() == at::kFloat, "mor::dense_gate: gate must be float32, got ", gate.scalar_type());
  TORCH_CHECK_VALUE(idx.dim() >= 1, "mor::dense_gate: idx must have at least one dimension, got shape ", idx.sizes());
  TORCH_CHECK_VALUE(idx.sizes() == gate.sizes(), "mor::dense_gate: gate must have the shape of idx ", idx.sizes(),
              ", got ", gate.sizes());
  TORCH_CHECK_VALUE(idx.device() == gate.device(), "mor::dense_gate: idx is on ", idx.device(), " but gate is on ",
              gate.device());
  TORCH_CHECK_VALUE(num_ranks >= 1, "mor::dense_gate: num_ranks must be >= 1, got ", num_ranks);
  TORCH_CHECK_VALUE(num_shared >= 0 && num_shared <= num_ranks, "mor::dense_gate: num_shared must be in [0, ",
              num_ranks, "], got ", num_shared);
}

inline std::vector<int64_t> dense_gate_shape(const at::Tensor& idx, int64_t num_ranks) {
  auto shape = idx.sizes().vec();
  shape.back() = num_ranks;
  return shape;
}

inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_same_device(const char* op, const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
              "; all tensors must share a device");
}

// mor::route(logits (..., N), top_k, num_zero, renormalize).
inline void check_route_args(const at::Tensor& logits, int64_t top_k, int64_t num_zero) {
  const char* op = "mor::route";
  TORCH_CHECK_VALUE(logits.dim() >= 1, op, ": logits must have at least one dimension, got shape ", logits.sizes());
  TORCH_CHECK_TYPE(is_kernel_dtype(logits.scalar_type()), op,
              ": logits must be float32, float16 or bfloat16, got ", logits.scalar_type());
  const int64_t n = logits.size(-1);
  TORCH_CHECK_VALUE(n >= 1, op, ": logits must have at least one slot in its last dimension, got shape ", logits.sizes());
  TORCH_CHECK_VALUE(num_zero >= 0 && num_zero <= n - 1, op, ": num_zero must be in [0, ", n - 1, "], got ", num_zero);
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= n, op, ": top_k must be in [1, ", n, "], got ", top_k);
}

// What the lora ops learned about their arguments.
struct LoraShape {
  int64_t batch, tokens, d_in, d_out, ranks, num_shared, top_k;
  bool token_routing;
};

// Routing arguments: idx int32 (B, k) (sample routing) or (B, T, k) (token routing), gate float32 alike.
// Index values outside [0, E) other than -1 are not rejected here (that needs a host sync on CUDA):
// every kernel treats them as zero slots, so they can never cause an out-of-bounds read.
inline void check_routing_args(const char* op, const at::Tensor& x, const at::Tensor& idx, const at::Tensor& gate,
                               int64_t batch, int64_t tokens, bool allow_token) {
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kInt, op, ": idx must be int32, got ", idx.scalar_type());
  TORCH_CHECK_TYPE(gate.scalar_type() == at::kFloat, op, ": gate must be float32, got ", gate.scalar_type());
  TORCH_CHECK_VALUE(gate.sizes() == idx.sizes(), op, ": gate must have the shape of idx ", idx.sizes(), ", got ",
              gate.sizes());
  check_same_device(op, x, idx, "idx");
  check_same_device(op, x, gate, "gate");
  const bool sample = idx.dim() == 2 && idx.size(0) == batch;
  const bool token = allow_token && idx.dim() == 3 && idx.size(0) == batch && idx.size(1) == tokens;
  TORCH_CHECK_VALUE(sample || token, op, ": idx must have shape (", batch, ", k) for sample routing",
              allow_token ? " or (" + std::to_string(batch) + ", " + std::to_string(tokens) + ", k) for token routing"
                          : std::string(),
              ", got ", idx.sizes());
  TORCH_CHECK_VALUE(idx.size(-1) >= 1, op, ": idx must select at least one slot (last dimension k >= 1), got shape ",
              idx.sizes());
}

// x (B, T, d_in), lora_a (R, d_in), lora_b (d_out, R), routing, optional base (B, T, d_out).
inline LoraShape check_lora_args(const char* op, const at::Tensor& x, const at::Tensor& lora_a,
                                 const at::Tensor& lora_b, const at::Tensor& idx, const at::Tensor& gate,
                                 int64_t num_shared, const std::optional<at::Tensor>& base) {
  TORCH_CHECK_VALUE(x.dim() == 3, op, ": x must have shape (B, T, d_in), got ", x.sizes());
  TORCH_CHECK_TYPE(is_kernel_dtype(x.scalar_type()), op, ": x must be float32, float16 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK_VALUE(lora_a.dim() == 2 && lora_a.size(1) == x.size(2) && lora_a.size(0) >= 1, op,
              ": lora_a must have shape (R, ", x.size(2), ") with R >= 1 to match x ", x.sizes(), ", got ",
              lora_a.sizes());
  const int64_t ranks = lora_a.size(0);
  TORCH_CHECK_VALUE(lora_b.dim() == 2 && lora_b.size(1) == ranks, op, ": lora_b must have shape (d_out, ", ranks,
              ") to match lora_a ", lora_a.sizes(), ", got ", lora_b.sizes());
  TORCH_CHECK_TYPE(lora_a.scalar_type() == x.scalar_type() && lora_b.scalar_type() == x.scalar_type(), op,
              ": lora_a and lora_b must have the dtype of x (", x.scalar_type(), "), got ", lora_a.scalar_type(),
              " and ", lora_b.scalar_type());
  check_same_device(op, x, lora_a, "lora_a");
  check_same_device(op, x, lora_b, "lora_b");
  TORCH_CHECK_VALUE(num_shared >= 0 && num_shared <= ranks, op, ": num_shared must be in [0, ", ranks, "], got ",
              num_shared);
  check_routing_args(op, x, idx, gate, x.size(0), x.size(1), true);
  const int64_t d_out = lora_b.size(0);
  if (base.has_value()) {
    const auto& b = *base;
    TORCH_CHECK_VALUE(b.dim() == 3 && b.size(0) == x.size(0) && b.size(1) == x.size(1) && b.size(2) == d_out, op,
                ": base must have shape (", x.size(0), ", ", x.size(1), ", ", d_out, "), got ", b.sizes());
    TORCH_CHECK_TYPE(b.scalar_type() == x.scalar_type(), op, ": base has dtype ", b.scalar_type(), " but x has ",
                x.scalar_type(), "; they must match");
    check_same_device(op, x, b, "base");
  }
  return {x.size(0), x.size(1), x.size(2), d_out, ranks, num_shared, idx.size(-1), idx.dim() == 3};
}

// mor::lora_bwd: grad_y (B, T, d_out) and h (B, T, R) float32 besides the forward's arguments.
inline LoraShape check_lora_bwd_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& lora_a,
                                     const at::Tensor& lora_b, const at::Tensor& idx, const at::Tensor& gate,
                                     const at::Tensor& h, int64_t num_shared) {
  const char* op = "mor::lora_bwd";
  auto s = check_lora_args(op, x, lora_a, lora_b, idx, gate, num_shared, std::nullopt);
  TORCH_CHECK_VALUE(grad_y.dim() == 3 && grad_y.size(0) == s.batch && grad_y.size(1) == s.tokens &&
                  grad_y.size(2) == s.d_out,
              op, ": grad_y must have shape (", s.batch, ", ", s.tokens, ", ", s.d_out, "), got ", grad_y.sizes());
  TORCH_CHECK_TYPE(grad_y.scalar_type() == x.scalar_type(), op, ": grad_y has dtype ", grad_y.scalar_type(),
              " but x has ", x.scalar_type(), "; they must match");
  check_same_device(op, x, grad_y, "grad_y");
  TORCH_CHECK_VALUE(h.dim() == 3 && h.size(0) == s.batch && h.size(1) == s.tokens && h.size(2) == s.ranks, op,
              ": h (the rank activations saved by mor::lora_fwd) must have shape (", s.batch, ", ", s.tokens, ", ",
              s.ranks, "), got ", h.sizes());
  TORCH_CHECK_TYPE(h.scalar_type() == at::kFloat, op, ": h must be float32, got ", h.scalar_type());
  check_same_device(op, x, h, "h");
  return s;
}

// mor::conv_up: base (B, C_out, H, W) = conv(x, W0) (+ bias), z_rank (B, R, H, W) = conv(x, A), lora_b (C_out, R),
// idx/gate (B, k).
inline LoraShape check_conv_up_args(const at::Tensor& base, const at::Tensor& z_rank, const at::Tensor& lora_b,
                                    const at::Tensor& idx, const at::Tensor& gate, int64_t num_shared) {
  const char* op = "mor::conv_up";
  TORCH_CHECK_VALUE(base.dim() == 4, op, ": base must have shape (B, C_out, H, W), got ", base.sizes());
  TORCH_CHECK_TYPE(is_kernel_dtype(base.scalar_type()), op, ": base must be float32, float16 or bfloat16, got ",
              base.scalar_type());
  TORCH_CHECK_VALUE(lora_b.dim() == 2 && lora_b.size(1) >= 1 && lora_b.size(0) == base.size(1), op,
              ": lora_b must have shape (", base.size(1), ", R) with R >= 1 (C_out from base), got ", lora_b.sizes());
  const int64_t ranks = lora_b.size(1);
  TORCH_CHECK_VALUE(z_rank.dim() == 4 && z_rank.size(0) == base.size(0) && z_rank.size(1) == ranks &&
                  z_rank.size(2) == base.size(2) && z_rank.size(3) == base.size(3),
              op, ": z_rank must have shape (", base.size(0), ", ", ranks, ", ", base.size(2), ", ", base.size(3),
              "), got ", z_rank.sizes());
  TORCH_CHECK_TYPE(lora_b.scalar_type() == base.scalar_type() && z_rank.scalar_type() == base.scalar_type(), op,
              ": lora_b and z_rank must have the dtype of base (", base.scalar_type(), "), got ", lora_b.scalar_type(),
              " and ", z_rank.scalar_type());
  check_same_device(op, base, lora_b, "lora_b");
  check_same_device(op, base, z_rank, "z_rank");
  TORCH_CHECK_VALUE(num_shared >= 0 && num_shared <= ranks, op, ": num_shared must be in [0, ", ranks, "], got ",
              num_shared);
  check_routing_args(op, base, idx, gate, base.size(0), 0, false);
  return {base.size(0), base.size(2) * base.size(3), ranks, lora_b.size(0), ranks, num_shared, idx.size(-1), false};
}

}  // namespace mor
