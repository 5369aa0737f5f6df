// Argument checks of the BLAS CPU ops (mor::blas_mor_linear*, mor::blas_mor_conv2d*): every condition of
// mor_kernels/validation.py's check_mor_linear / check_mor_conv2d (sample routing), so that a call the Python
// checks would reject never runs. The messages name the argument; mor_kernels.functional re-runs its Python
// checks when one of these fires, so a user sees the documented message.
#pragma once
#include <ATen/ATen.h>

#include <cmath>

#include "../checks.h"

namespace mor {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// float64 stays float64; float32/16-bit compute in float32 (the reference's compute_dtype).
inline at::ScalarType blas_compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_same_dtype(const char* op, const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but x has ",
                   x.scalar_type(), "; they must match");
}

// The checks every BLAS op shares: x float, lora_b (d_out, R), num_shared, scaling, sample routing idx/gate (B, k),
// bias (d_out,). lora_a's and weight's shapes are the caller's (they differ between Linear and Conv2d).
inline void check_blas_common(const char* op, const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& lora_a, const at::Tensor& lora_b,
                              const at::Tensor& idx, const at::Tensor& gate, int64_t num_shared, double scaling) {
  TORCH_CHECK_TYPE(is_float_dtype(x.scalar_type()), op, ": x must have a floating dtype, got ", x.scalar_type());
  check_same_dtype(op, x, weight, "weight");
  check_same_dtype(op, x, lora_a, "lora_a");
  check_same_dtype(op, x, lora_b, "lora_b");
  check_same_device(op, x, weight, "weight");
  check_same_device(op, x, lora_a, "lora_a");
  check_same_device(op, x, lora_b, "lora_b");
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": runs on CPU tensors, got ", x.device());
  const int64_t ranks = lora_a.dim() > 0 ? lora_a.size(0) : 0;
  TORCH_CHECK_VALUE(ranks >= 1, op, ": lora_a must have at least one rank, got shape ", lora_a.sizes());
  TORCH_CHECK_VALUE(lora_b.dim() == 2 && lora_b.size(0) == weight.size(0) && lora_b.size(1) == ranks, op,
                    ": lora_b must have shape (", weight.size(0), ", ", ranks, ") (d_out, R), got ", lora_b.sizes());
  TORCH_CHECK_VALUE(num_shared >= 0 && num_shared <= ranks, op, ": num_shared must be in [0, ", ranks, "], got ",
                    num_shared);
  TORCH_CHECK_VALUE(std::isfinite(scaling), op, ": scaling must be finite, got ", scaling);
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong, op,
                   ": idx must be int32 or int64, got ", idx.scalar_type());
  TORCH_CHECK_TYPE(is_float_dtype(gate.scalar_type()), op, ": gate must have a floating dtype, got ",
                   gate.scalar_type());
  check_same_device(op, x, idx, "idx");
  check_same_device(op, x, gate, "gate");
  TORCH_CHECK_VALUE(idx.dim() == 2 && idx.size(0) == x.size(0), op, ": idx must have shape (", x.size(0),
                    ", k) for sample routing, got ", idx.sizes());
  TORCH_CHECK_VALUE(gate.sizes() == idx.sizes(), op, ": gate must have the shape of idx ", idx.sizes(), ", got ",
                    gate.sizes());
  TORCH_CHECK_VALUE(idx.size(1) >= 1, op, ": idx must select at least one slot (k >= 1), got shape ", idx.sizes());
  if (bias.has_value()) {
    const auto& b = *bias;
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == weight.size(0), op, ": bias must have shape (", weight.size(0),
                      ",), got ", b.sizes());
    check_same_dtype(op, x, b, "bias");
    check_same_device(op, x, b, "bias");
  }
}

// mor::blas_mor_linear: x (B, *tokens, d_in), weight (d_out, d_in), lora_a (R, d_in).
inline void check_blas_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& idx,
                              const at::Tensor& gate, int64_t num_shared, double scaling) {
  const char* op = "mor::blas_mor_linear";
  TORCH_CHECK_VALUE(x.dim() >= 2, op, ": x must have at least 2 dimensions, got shape ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == x.size(-1), op, ": weight must have shape (d_out, ",
                    x.size(-1), "), got ", weight.sizes());
  TORCH_CHECK_VALUE(lora_a.dim() == 2 && lora_a.size(1) == x.size(-1), op, ": lora_a must have shape (R, ",
                    x.size(-1), "), got ", lora_a.sizes());
  check_blas_common(op, x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling);
}

inline int64_t conv_out(int64_t size, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation) {
  return (size + 2 * padding - dilation * (kernel - 1) - 1) / stride + 1;
}

// mor::blas_mor_conv2d: x (B, C_in, H, W), weight (C_out, C_in, kh, kw), lora_a (R, C_in, kh, kw), groups = 1.
inline void check_blas_conv2d(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& idx,
                              const at::Tensor& gate, int64_t num_shared, double scaling, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* op = "mor::blas_mor_conv2d";
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(1) >= 1, op, ": x must have shape (B, C_in, H, W) with C_in >= 1, got ",
                    x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(1) == x.size(1), op, ": weight must have shape (C_out, ",
                    x.size(1), ", kh, kw), got ", weight.sizes());
  TORCH_CHECK_VALUE(lora_a.dim() == 4 && lora_a.size(1) == x.size(1) && lora_a.size(2) == weight.size(2) &&
                        lora_a.size(3) == weight.size(3),
                    op, ": lora_a must have shape (R, ", x.size(1), ", ", weight.size(2), ", ", weight.size(3),
                    "), got ", lora_a.sizes());
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
                    ": stride, padding and dilation must be pairs");
  TORCH_CHECK_VALUE(std::min(stride[0], stride[1]) >= 1 && std::min(dilation[0], dilation[1]) >= 1 &&
                        std::min(padding[0], padding[1]) >= 0,
                    op, ": stride and dilation must be >= 1 and padding >= 0, got stride=", stride,
                    " padding=", padding, " dilation=", dilation);
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK_VALUE(conv_out(x.size(2 + i), weight.size(2 + i), stride[i], padding[i], dilation[i]) >= 1, op, ": x ",
                      x.sizes(), " is too small for the kernel with stride=", stride, " padding=", padding,
                      " dilation=", dilation);
  }
  check_blas_common(op, x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling);
}

}  // namespace mor
