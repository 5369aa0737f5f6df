// mor::blas_mor_linear: the sample-routed MoR Linear on the CPU in one call, host rank lists and gathers in C++,
// the GEMMs in ATen's BLAS (see csrc/registration.cpp for the schemas).
//
// Why: on a CPU a MoR layer is the base GEMM plus a few small GEMMs; what a Python implementation adds is a
// dozen torch ops and their Python around them, each issued after the base GEMM has evicted the caches (10-40 us
// apiece on the 2-core Xeon of benchmarks/README.md, as much as the adapter's FLOPs at small T). Here a call is
// one dispatcher hop: the lists are read from idx on the host (rank_lists.h), then
//   - merged (inference, when the caller's cost model says so): W_b = W0 + B_act diag(g) A_act, then one base
//     GEMM with W_b per distinct routing;
//   - low-rank: y = x W0^T + b (one GEMM), u = x A_act^T, y += u (B_act diag(g))^T (in place).
// In float32 on a CPU with AVX-512F or AVX2+FMA the rank work (the merge, u, the update of y) runs in rank_kernels.h's
// kernels, which read the active rows of lora_a and columns of lora_b where they are; otherwise the active ranks
// are gathered (gates folded in) and the same steps are ATen GEMMs: the calls of a dense LoRA of the same rank.
// The backward (blas_mor_linear_bwd) makes the GEMMs a dense LoRA's backward makes (dx = dy W0 + du A_w,
// dA = du^T x, dB = dy^T u, with du = dy B_act), no full-R work and no extra pass over the activations; the
// gate's gradient is a per-sample reduction of du * u (n columns).
//
// blas_mor_linear itself is CompositeImplicitAutograd: without a gradient it calls blas_mor_linear_fwd, with
// one it goes through BlasMorLinear (a C++ autograd Function saving u), so under fake tensors (torch.compile,
// opcheck) everything runs on the fakes of the _fwd/_bwd ops registered in mor_kernels/_extension.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <limits>

#include "blas_checks.h"
#include "rank_kernels.h"
#include "rank_lists.h"

namespace mor {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor cast(const at::Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

// x (B, *tokens, d_in) -> tokens per sample.
int64_t tokens_of(const at::Tensor& x) {
  int64_t t = 1;
  for (int64_t d = 1; d + 1 < x.dim(); ++d) t *= x.size(d);
  return t;
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t d_out) {
  auto shape = x.sizes().vec();
  shape.back() = d_out;
  return shape;
}

// rho = T (d_in + d_out) / (d_in d_out): the low-rank path's activation traffic over a merge's weight traffic
// (mor_kernels.dispatch.merge_plan, same formula).
bool merges(int64_t tokens, int64_t d_in, int64_t d_out, double merge_above) {
  const double rho = static_cast<double>(tokens) * static_cast<double>(d_in + d_out) /
                     static_cast<double>(std::max<int64_t>(d_in * d_out, 1));
  return rho > merge_above;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> blas_mor_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& bias,
                                                           const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                           const at::Tensor& idx, const at::Tensor& gate,
                                                           int64_t num_shared, double scaling, double merge_above,
                                                           bool check_indices, bool store_u) {
  check_blas_linear(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ops below are this kernel's internals
  const auto ct = blas_compute_dtype(x.scalar_type());
  const int64_t batch = x.size(0), tokens = tokens_of(x), d_in = x.size(-1), d_out = weight.size(0);
  const auto lists = sample_lists(idx, gate, num_shared, lora_a.size(0), scaling, check_indices);
  const auto x2 = cast(x, ct).reshape({batch * tokens, d_in});
  const auto w0 = cast(weight, ct);
  const std::optional<at::Tensor> b0 = bias.has_value() ? std::optional<at::Tensor>(cast(*bias, ct)) : std::nullopt;
  const auto a = cast(lora_a, ct).contiguous();
  const auto b = cast(lora_b, ct).contiguous();
  at::Tensor u = store_u ? at::empty({batch, tokens, lists.width}, x2.options()) : at::empty({0}, x2.options());
  // float32 with row-contiguous operands: the rank kernels where the CPU runs them (rank_kernels.h)
  const bool fast = ct == at::kFloat && rank_kernels_on() && x2.stride(1) == 1 && w0.stride(1) == 1;
  at::Tensor y;
  if (!store_u && merges(tokens, d_in, d_out, merge_above)) {
    y = at::empty({batch * tokens, d_out}, x2.options());
    for (int64_t l = 0; l < lists.lists; ++l) {
      const int64_t rows = lists.size(l) * tokens, r0 = lists.first(l) * tokens;
      auto yl = y.narrow(0, r0, rows);
      const auto xl = x2.narrow(0, r0, rows);
      at::Tensor wl = w0;  // W0 + B_act diag(g) A_act (W0 alone when the list is empty)
      if (lists.count[l] > 0) wl = merged_weight(w0, a, b, lists, l, fast);
      if (b0.has_value()) {
        at::addmm_out(yl, *b0, xl, wl.t());
      } else {
        at::mm_out(yl, xl, wl.t());
      }
    }
  } else {
    y = b0.has_value() ? at::addmm(*b0, x2, w0.t()) : at::mm(x2, w0.t());
    auto u2 = store_u ? u.view({batch * tokens, lists.width}) : u;
    for (int64_t l = 0; l < lists.lists; ++l) {
      const int64_t n = lists.count[l], rows = lists.size(l) * tokens, r0 = lists.first(l) * tokens;
      if (store_u && n < lists.width) u2.narrow(0, r0, rows).narrow(1, n, lists.width - n).zero_();
      if (n == 0 || rows == 0) continue;
      const auto xl = x2.narrow(0, r0, rows);
      auto ul = store_u ? u2.narrow(0, r0, rows).narrow(1, 0, n) : at::empty({rows, n}, x2.options());
      if (fast) {  // u = x A_act^T, y += u (B_act diag(w))^T in the rank kernels, lora_a and lora_b read in place
        const auto a_rows = rank_row_ptrs(a, lists, l);
        const auto w = rank_weights(lists, l);
        rank_down(xl.data_ptr<float>(), xl.stride(0), rows, d_in, a_rows.data(), n, ul.data_ptr<float>(), ul.stride(0));
        rank_up(y.data_ptr<float>() + r0 * d_out, d_out, rows, d_out, ul.data_ptr<float>(), ul.stride(0), n,
                b.data_ptr<float>(), b.size(1), lists.rank.data() + l * lists.width, w.data());
        continue;
      }
      at::mm_out(ul, xl, gather_rows(a, lists, l, false).t());
      y.narrow(0, r0, rows).addmm_(ul, gather_cols(b, lists, l, true).t());
    }
  }
  return {cast(y, x.scalar_type()).view(out_shape(x, d_out)), u};
}

// W0 + B_act diag(g) A_act per distinct routing, (D, *weight.shape) with D = 1 when every sample routes alike
// (else one per sample), in the compute dtype: the per-image merged weights of mor_model.inference, made by the
// rank kernel where it runs (one pass over W0, lora_a's rows read in place). Works for a Linear (weight (d_out,
// d_in), lora_a (R, d_in)) and a conv (weight (C_out, C_in, kh, kw), lora_a (R, C_in, kh, kw)) alike.
at::Tensor blas_merged_weights_cpu(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                   const at::Tensor& idx, const at::Tensor& gate, int64_t num_shared, double scaling) {
  TORCH_CHECK_VALUE(weight.dim() >= 2 && lora_a.dim() == weight.dim() && lora_b.dim() == 2 &&
                        lora_b.size(0) == weight.size(0) && lora_b.size(1) == lora_a.size(0) &&
                        lora_a.sizes().slice(1) == weight.sizes().slice(1),
                    "mor::blas_merged_weights: weight (d_out, ...), lora_a (R, ...) with weight's trailing sizes and "
                    "lora_b (d_out, R) expected, got weight ", weight.sizes(), ", lora_a ", lora_a.sizes(), ", lora_b ",
                    lora_b.sizes());
  TORCH_CHECK_VALUE(idx.dim() == 2 && gate.sizes() == idx.sizes() &&
                        (idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong) &&
                        at::isFloatingType(gate.scalar_type()),
                    "mor::blas_merged_weights: idx (B, k) int32/int64 and a float gate of the same shape expected, "
                    "got idx ", idx.sizes(), " ", idx.scalar_type(), ", gate ", gate.sizes(), " ", gate.scalar_type());
  TORCH_CHECK_VALUE(num_shared >= 0 && num_shared <= lora_a.size(0),
                    "mor::blas_merged_weights: num_shared must be in [0, ", lora_a.size(0), "], got ", num_shared);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto ct = blas_compute_dtype(weight.scalar_type());
  const auto lists = sample_lists(idx, gate, num_shared, lora_a.size(0), scaling, false);
  const int64_t d_out = weight.size(0);
  const auto w0 = cast(weight, ct).reshape({d_out, -1});
  const auto a = cast(lora_a, ct).reshape({lora_a.size(0), -1}).contiguous();
  const auto b = cast(lora_b, ct).contiguous();
  const bool fast = ct == at::kFloat && rank_kernels_on() && w0.stride(1) == 1;
  auto shape = weight.sizes().vec();
  shape.insert(shape.begin(), lists.lists);
  auto out = at::empty(shape, w0.options());
  for (int64_t l = 0; l < lists.lists; ++l) {
    auto ol = out[l].view({d_out, -1});
    merged_weight_out(ol, w0, a, b, lists, l, fast);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> blas_mor_linear_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& idx, const at::Tensor& gate, const at::Tensor& u, int64_t num_shared,
    double scaling, std::array<bool, 6> mask) {
  check_blas_linear(x, weight, std::nullopt, lora_a, lora_b, idx, gate, num_shared, scaling);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto ct = blas_compute_dtype(x.scalar_type());
  const int64_t batch = x.size(0), tokens = tokens_of(x), d_in = x.size(-1), d_out = weight.size(0);
  const int64_t ranks = lora_a.size(0), k = idx.size(1);
  TORCH_CHECK_VALUE(grad_y.numel() == batch * tokens * d_out, "mor::blas_mor_linear_bwd: grad_y must have ",
                    batch * tokens * d_out, " elements (x's tokens times d_out), got shape ", grad_y.sizes());
  TORCH_CHECK_VALUE(u.dim() == 3 && u.size(0) == batch && u.size(1) == tokens && u.size(2) == num_shared + k,
                    "mor::blas_mor_linear_bwd: u (the rank activations saved by blas_mor_linear_fwd) must have shape (",
                    batch, ", ", tokens, ", ", num_shared + k, "), got ", u.sizes());
  const auto lists = sample_lists(idx, gate, num_shared, ranks, scaling, false);
  const auto opts = x.options().dtype(ct);
  const auto dy = cast(grad_y, ct).reshape({batch * tokens, d_out});
  const auto x2 = cast(x, ct).reshape({batch * tokens, d_in});
  const auto a = cast(lora_a, ct).contiguous();
  const auto b = cast(lora_b, ct).contiguous();
  const auto u2 = cast(u, ct).view({batch * tokens, lists.width});
  const auto none = [&] { return at::empty({0}, x.options()); };  // a fresh one per output (no aliasing)
  at::Tensor dx = mask[0] ? at::mm(dy, cast(weight, ct)) : none();
  at::Tensor dw = mask[1] ? at::mm(dy.t(), x2) : none();
  at::Tensor dbias = mask[2] ? dy.sum(0) : none();
  at::Tensor da = mask[3] ? at::zeros({ranks, d_in}, opts) : none();
  at::Tensor db = mask[4] ? at::zeros({d_out, ranks}, opts) : none();
  std::vector<double> dgate(mask[5] ? batch * k : 0, 0.0);
  const bool need_du = mask[0] || mask[3] || mask[5];
  for (int64_t l = 0; l < lists.lists; ++l) {
    const int64_t n = lists.count[l], rows = lists.size(l) * tokens, r0 = lists.first(l) * tokens;
    if (n == 0 || rows == 0) continue;
    const auto dyl = dy.narrow(0, r0, rows);
    const auto ul = u2.narrow(0, r0, rows).narrow(1, 0, n);
    if (need_du) {
      const auto du = at::mm(dyl, gather_cols(b, lists, l, false));  // (rows, n): dy B_act
      const auto xl = x2.narrow(0, r0, rows);
      if (mask[0]) dx.narrow(0, r0, rows).addmm_(du, gather_rows(a, lists, l, true));  // du diag(w) A_act
      if (mask[3]) scatter_add_rows(da, at::mm(du.t(), xl), lists, l, true);          // diag(w) du^T x
      if (mask[5]) {  // d gate_j = scaling * sum over the sample's tokens of du[:, i] u[:, i], entry i = slot j
        const auto duc = du.contiguous(), uc = ul.contiguous();
        AT_DISPATCH_FLOATING_TYPES(ct, "mor_blas_linear_dgate", [&] {
          const scalar_t* dp = duc.data_ptr<scalar_t>();
          const scalar_t* up = uc.data_ptr<scalar_t>();
          for (int64_t s = 0; s < lists.size(l); ++s) {
            const int64_t sample = lists.first(l) + s;
            for (int64_t i = 0; i < n; ++i) {
              const int64_t j = lists.slot[l * lists.width + i];
              if (j < 0) continue;  // a shared rank: no gate
              double acc = 0.0;
              for (int64_t t = s * tokens; t < (s + 1) * tokens; ++t) acc += double(dp[t * n + i]) * up[t * n + i];
              dgate[sample * k + j] += scaling * acc;
            }
          }
        });
      }
    }
    if (mask[4]) scatter_add_cols(db, at::mm(dyl.t(), ul), lists, l);  // (dy^T u) diag(w)
  }
  at::Tensor dgate_t = none();
  if (mask[5]) {
    dgate_t = at::from_blob(dgate.data(), {batch, k}, at::TensorOptions().dtype(at::kDouble))
                  .to(gate.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  }
  const auto xt = x.scalar_type();
  return {mask[0] ? cast(dx, xt).view(x.sizes()) : none(), mask[1] ? cast(dw, xt) : none(), mask[2] ? cast(dbias, xt) : none(),
          mask[3] ? cast(da, xt) : none(), mask[4] ? cast(db, xt) : none(), dgate_t};
}

namespace {

std::tuple<at::Tensor, at::Tensor> call_fwd(const at::Tensor& x, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                            const at::Tensor& lora_b, const at::Tensor& idx, const at::Tensor& gate,
                                            int64_t num_shared, double scaling, double merge_above, bool check_indices,
                                            bool store_u) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mor::blas_mor_linear_fwd", "")
                       .typed<decltype(blas_mor_linear_fwd_cpu)>();
  // the _fwd op has no autograd kernel and records nothing: dispatched below autograd (through the autograd
  // fallback this cost ~9 us per call)
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, merge_above, check_indices, store_u);
}

struct BlasMorLinear : public torch::autograd::Function<BlasMorLinear> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_a, const at::Tensor& lora_b,
                            const at::Tensor& idx, const at::Tensor& gate, int64_t num_shared, double scaling,
                            bool check_indices) {
    auto [y, u] = call_fwd(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling,
                           std::numeric_limits<double>::infinity(), check_indices, true);
    ctx->save_for_backward({x, weight, lora_a, lora_b, idx, gate, u});
    ctx->saved_data["num_shared"] = num_shared;
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "mor::blas_mor_linear: double backward is not supported by the 'blas' backend; use "
                "backend='reference'");
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // edges: x, weight, [bias], lora_a, lora_b, idx, gate
    const size_t off = has_bias ? 1 : 0;
    std::array<bool, 6> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                has_bias && ctx->needs_input_grad(2), ctx->needs_input_grad(2 + off),
                                ctx->needs_input_grad(3 + off), ctx->needs_input_grad(5 + off)};
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mor::blas_mor_linear_bwd", "")
                         .typed<decltype(blas_mor_linear_bwd_cpu)>();
    auto [dx, dw, dbias, da, db, dgate] = op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5],
                                                  saved[6], ctx->saved_data["num_shared"].toInt(),
                                                  ctx->saved_data["scaling"].toDouble(), mask);
    auto keep = [](bool on, const at::Tensor& t) { return on ? t : at::Tensor(); };
    return {keep(mask[0], dx), keep(mask[1], dw), keep(mask[2], dbias), keep(mask[3], da), keep(mask[4], db),
            at::Tensor(), keep(mask[5], dgate), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

bool requires_grad(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined() && t->requires_grad(); }

}  // namespace

// The public op (CompositeImplicitAutograd): inference through blas_mor_linear_fwd (merging when rho >
// merge_above), training through BlasMorLinear (never merged).
at::Tensor blas_mor_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& idx,
                           const at::Tensor& gate, int64_t num_shared, double scaling, double merge_above,
                           bool check_indices) {
  const bool grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || weight.requires_grad() || requires_grad(bias) || lora_a.requires_grad() ||
                     lora_b.requires_grad() || gate.requires_grad());
  if (grad) return BlasMorLinear::apply(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, check_indices);
  return std::get<0>(
      call_fwd(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, merge_above, check_indices, false));
}

TORCH_LIBRARY_IMPL(mor, CPU, m) {
  m.impl("blas_mor_linear_fwd", &blas_mor_linear_fwd_cpu);
  m.impl("blas_mor_linear_bwd", &blas_mor_linear_bwd_cpu);
  m.impl("blas_merged_weights", &blas_merged_weights_cpu);
}

TORCH_LIBRARY_IMPL(mor, CompositeImplicitAutograd, m) { m.impl("blas_mor_linear", &blas_mor_linear); }

}  // namespace mor
