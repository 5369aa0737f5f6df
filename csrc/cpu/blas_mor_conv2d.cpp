// mor::blas_mor_conv2d: the sample-routed MoR Conv2d on the CPU in one call (the twin of blas_mor_linear.cpp:
// host rank lists in C++, the convolutions in ATen/oneDNN, the float32 merge and up-projection in rank_kernels.h's
// AVX-512 or AVX2 kernels where the CPU has them, else ATen GEMMs on the gathered ranks).
//
//   - merged (inference, when the caller's cost model says so): W_b = W0 + B_act diag(g) A_act (the 1x1 x kxk
//     composition, one small GEMM), then one base convolution per distinct routing;
//   - low-rank: y = conv(x, W0) + b; u = conv(x, A_act) (n output channels, same stride/padding/dilation);
//     y += B_act diag(g) u over the pixels, in place (PEFT's Conv2d LoRA: a kxk down, a 1x1 up).
// Backward (blas_mor_conv2d_bwd): the base convolution's backward, du = B_act^T dy per pixel, one
// convolution_backward of du against A_act diag(w) for dx and dA, dB = sum_pixels dy u^T; the gate's gradient is
// a per-sample sum of du * u. NCHW and channels_last inputs keep their layout throughout.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <limits>

#include "blas_checks.h"
#include "rank_lists.h"

namespace mor {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor cast(const at::Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

// channels_last when x is laid out so (and not also plain contiguous), else NCHW.
at::MemoryFormat layout_of(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast) ? at::MemoryFormat::ChannelsLast
                                                                                : at::MemoryFormat::Contiguous;
}

// t (S, C, H, W), contiguous in channels_last, as the matrix (S H W, C).
at::Tensor pixel_rows(const at::Tensor& t) {
  return t.permute({0, 2, 3, 1}).reshape({t.size(0) * t.size(2) * t.size(3), t.size(1)});
}

// y (S, C_out, H, W) += m (C_out, n) applied to u (S, n, H, W) at every pixel, both contiguous in `fmt`, with m =
// B_act diag(w) of list l; with `fast` (float32) in the rank kernel, else one ATen GEMM per sample (NCHW) or in all.
void add_pixel_mm(at::Tensor y, const at::Tensor& u, const at::Tensor& b, const SampleLists& lists, int64_t l,
                  at::MemoryFormat fmt, bool fast) {
  const int64_t c_out = y.size(1), n = u.size(1), pixels = y.size(2) * y.size(3);
  if (fast && fmt == at::MemoryFormat::ChannelsLast) {  // pixel rows: y (S P, C_out) += u (S P, n) m^T
    const auto w = rank_weights(lists, l);
    rank_up(y.data_ptr<float>(), c_out, y.size(0) * pixels, c_out, u.data_ptr<float>(), n, n, b.data_ptr<float>(),
            b.size(1), lists.rank.data() + l * lists.width, w.data());
    return;
  }
  if (fast) {  // per sample: y_s (C_out, P) += m u_s, u_s's n rows read in place
    const auto m = rank_coef(b, lists, l);
    std::vector<const float*> rows(n);
    for (int64_t s = 0; s < y.size(0); ++s) {
      for (int64_t i = 0; i < n; ++i) rows[i] = u.data_ptr<float>() + (s * n + i) * pixels;
      float* ys = y.data_ptr<float>() + s * c_out * pixels;
      rank_update_rows(ys, pixels, ys, pixels, c_out, pixels, m.data_ptr<float>(), n, n, rows.data());
    }
    return;
  }
  const auto m = gather_cols(b, lists, l, true);
  if (fmt == at::MemoryFormat::ChannelsLast) {
    y.permute({0, 2, 3, 1}).view({-1, y.size(1)}).addmm_(pixel_rows(u), m.t());
    return;
  }
  for (int64_t s = 0; s < y.size(0); ++s) y[s].view({y.size(1), pixels}).addmm_(m, u[s].reshape({u.size(1), pixels}));
}

bool merges(int64_t pixels, int64_t c_in, int64_t c_out, int64_t taps, double merge_above) {
  const double rho = static_cast<double>(pixels) * static_cast<double>(c_in + c_out) /
                     static_cast<double>(std::max<int64_t>(c_in * taps * c_out, 1));
  return rho > merge_above;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> blas_mor_conv2d_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& idx, const at::Tensor& gate, int64_t num_shared, double scaling,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, double merge_above, bool check_indices,
    bool store_u) {
  check_blas_conv2d(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, stride, padding, dilation);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ops below are this kernel's internals
  const auto ct = blas_compute_dtype(x.scalar_type());
  const auto fmt = layout_of(x);
  const int64_t batch = x.size(0), c_out = weight.size(0), kh = weight.size(2), kw = weight.size(3);
  const int64_t h_out = conv_out(x.size(2), kh, stride[0], padding[0], dilation[0]);
  const int64_t w_out = conv_out(x.size(3), kw, stride[1], padding[1], dilation[1]);
  const auto lists = sample_lists(idx, gate, num_shared, lora_a.size(0), scaling, check_indices);
  const auto xc = cast(x, ct);
  const auto w0 = cast(weight, ct);
  const std::optional<at::Tensor> b0 = bias.has_value() ? std::optional<at::Tensor>(cast(*bias, ct)) : std::nullopt;
  const auto a = cast(lora_a, ct).reshape({lora_a.size(0), -1}).contiguous();  // (R, C_in kh kw)
  const auto b = cast(lora_b, ct).contiguous();
  const auto a_shape = lora_a.sizes();
  auto rank_filters = [&](int64_t l, bool with_weight) {
    return gather_rows(a, lists, l, with_weight).view({lists.count[l], a_shape[1], a_shape[2], a_shape[3]});
  };
  at::Tensor u = at::empty({0}, xc.options());
  const bool fast = ct == at::kFloat && rank_kernels_on();  // the rank kernels (rank_kernels.h)
  at::Tensor y;
  if (!store_u && merges(h_out * w_out, x.size(1), c_out, kh * kw, merge_above) && lists.lists > 0) {
    std::vector<at::Tensor> parts;
    for (int64_t l = 0; l < lists.lists; ++l) {
      at::Tensor wl = w0;  // W0 + B_act diag(g) A_act (W0 alone when the list is empty)
      if (lists.count[l] > 0) {
        wl = merged_weight(w0.reshape({c_out, -1}), a, b, lists, l, fast).view(w0.sizes());
      }
      parts.push_back(at::conv2d(xc.narrow(0, lists.first(l), lists.size(l)), wl, b0, stride, padding, dilation));
    }
    y = parts.size() == 1 ? parts[0] : at::cat(parts, 0);
  } else {
    y = at::conv2d(xc, w0, b0, stride, padding, dilation).contiguous(fmt);
    const bool whole = lists.lists == 1 && lists.count[0] == lists.width;  // u is the one rank conv's output
    if (store_u && !whole) u = at::empty({batch, lists.width, h_out, w_out}, xc.options().memory_format(fmt));
    for (int64_t l = 0; l < lists.lists; ++l) {
      const int64_t n = lists.count[l], s0 = lists.first(l), samples = lists.size(l);
      if (store_u && n < lists.width) u.narrow(0, s0, samples).narrow(1, n, lists.width - n).zero_();
      if (n == 0) continue;
      auto ul = at::conv2d(xc.narrow(0, s0, samples), rank_filters(l, false), std::nullopt, stride, padding, dilation)
                    .contiguous(fmt);
      add_pixel_mm(y.narrow(0, s0, samples), ul, b, lists, l, fmt, fast);
      if (store_u) {
        if (whole) {
          u = ul;
        } else {
          u.narrow(0, s0, samples).narrow(1, 0, n).copy_(ul);
        }
      }
    }
  }
  return {cast(y, x.scalar_type()), u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> blas_mor_conv2d_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& idx, const at::Tensor& gate, const at::Tensor& u, int64_t num_shared,
    double scaling, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    std::array<bool, 6> mask) {
  check_blas_conv2d(x, weight, std::nullopt, lora_a, lora_b, idx, gate, num_shared, scaling, stride, padding,
                    dilation);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const char* op = "mor::blas_mor_conv2d_bwd";
  const auto ct = blas_compute_dtype(x.scalar_type());
  const auto fmt = layout_of(x);
  const int64_t batch = x.size(0), c_out = weight.size(0), ranks = lora_a.size(0), k = idx.size(1);
  const int64_t h_out = conv_out(x.size(2), weight.size(2), stride[0], padding[0], dilation[0]);
  const int64_t w_out = conv_out(x.size(3), weight.size(3), stride[1], padding[1], dilation[1]);
  TORCH_CHECK_VALUE(grad_y.dim() == 4 && grad_y.size(0) == batch && grad_y.size(1) == c_out &&
                        grad_y.size(2) == h_out && grad_y.size(3) == w_out,
                    op, ": grad_y must have shape (", batch, ", ", c_out, ", ", h_out, ", ", w_out, "), got ",
                    grad_y.sizes());
  TORCH_CHECK_VALUE(u.dim() == 4 && u.size(0) == batch && u.size(1) == num_shared + k && u.size(2) == h_out &&
                        u.size(3) == w_out,
                    op, ": u (the rank activations saved by blas_mor_conv2d_fwd) must have shape (", batch, ", ",
                    num_shared + k, ", ", h_out, ", ", w_out, "), got ", u.sizes());
  const auto lists = sample_lists(idx, gate, num_shared, ranks, scaling, false);
  const auto opts = x.options().dtype(ct);
  const auto none = [&] { return at::empty({0}, x.options()); };  // a fresh one per output (no aliasing)
  const auto xc = cast(x, ct);
  const auto dy = cast(grad_y, ct).contiguous(fmt);
  const auto uc = cast(u, ct).contiguous(fmt);
  const auto a = cast(lora_a, ct).reshape({ranks, -1}).contiguous();
  const auto b = cast(lora_b, ct).contiguous();
  at::Tensor dx = none(), dw = none(), dbias = none();
  if (mask[0] || mask[1] || mask[2]) {
    const auto bias_sizes = mask[2] ? at::OptionalIntArrayRef(at::IntArrayRef{c_out}) : std::nullopt;
    std::tie(dx, dw, dbias) = at::convolution_backward(dy, xc, cast(weight, ct), bias_sizes, stride, padding, dilation,
                                                       false, {0, 0}, 1, {mask[0], mask[1], mask[2]});
  }
  at::Tensor da = mask[3] ? at::zeros({ranks, a.size(1)}, opts) : none();
  at::Tensor db = mask[4] ? at::zeros({c_out, ranks}, opts) : none();
  std::vector<double> dgate(mask[5] ? batch * k : 0, 0.0);
  const int64_t pixels = h_out * w_out;
  for (int64_t l = 0; l < lists.lists; ++l) {
    const int64_t n = lists.count[l], s0 = lists.first(l), samples = lists.size(l);
    if (n == 0) continue;
    const auto dyl = dy.narrow(0, s0, samples);
    const auto ul = uc.narrow(0, s0, samples).narrow(1, 0, n);
    if (mask[0] || mask[3] || mask[5]) {
      const auto bsel = gather_cols(b, lists, l, false);  // (C_out, n)
      at::Tensor du;                                      // (samples, n, H, W) = B_act^T dy per pixel, in fmt
      if (fmt == at::MemoryFormat::ChannelsLast) {
        du = at::mm(pixel_rows(dyl), bsel).view({samples, h_out, w_out, n}).permute({0, 3, 1, 2});
      } else {
        du = at::empty({samples, n, h_out, w_out}, opts);
        for (int64_t s = 0; s < samples; ++s) {
          auto out = du[s].view({n, pixels});
          at::mm_out(out, bsel.t(), dyl[s].view({c_out, pixels}));
        }
      }
      if (mask[0] || mask[3]) {
        const auto a4 = gather_rows(a, lists, l, true).view({n, x.size(1), weight.size(2), weight.size(3)});
        auto [dxr, daw, unused] = at::convolution_backward(du, xc.narrow(0, s0, samples), a4, std::nullopt, stride,
                                                           padding, dilation, false, {0, 0}, 1, {mask[0], mask[3], false});
        if (mask[0]) dx.narrow(0, s0, samples).add_(dxr);
        if (mask[3]) scatter_add_rows(da, daw.reshape({n, -1}), lists, l, true);  // the filters saw A diag(w)
      }
      if (mask[5]) {
        const auto dots = (du * ul).sum({2, 3}).to(at::kDouble).contiguous();  // (samples, n)
        const double* dp = dots.data_ptr<double>();
        for (int64_t s = 0; s < samples; ++s) {
          for (int64_t i = 0; i < n; ++i) {
            const int64_t j = lists.slot[l * lists.width + i];
            if (j >= 0) dgate[(s0 + s) * k + j] += scaling * dp[s * n + i];
          }
        }
      }
    }
    if (mask[4]) {  // (sum over pixels dy u^T) diag(w)
      at::Tensor dbw;
      if (fmt == at::MemoryFormat::ChannelsLast) {
        dbw = at::mm(pixel_rows(dyl).t(), pixel_rows(ul));
      } else {
        dbw = at::zeros({c_out, n}, opts);
        for (int64_t s = 0; s < samples; ++s) dbw.addmm_(dyl[s].view({c_out, pixels}), ul[s].reshape({n, pixels}).t());
      }
      scatter_add_cols(db, dbw, lists, l);
    }
  }
  at::Tensor dgate_t = none();
  if (mask[5]) {
    dgate_t = at::from_blob(dgate.data(), {batch, k}, at::TensorOptions().dtype(at::kDouble))
                  .to(gate.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  }
  const auto xt = x.scalar_type();
  return {mask[0] ? cast(dx, xt) : none(),
          mask[1] ? cast(dw, xt) : none(),
          mask[2] ? cast(dbias, xt) : none(),
          mask[3] ? cast(da, xt).view(lora_a.sizes()) : none(),
          mask[4] ? cast(db, xt) : none(),
          dgate_t};
}

namespace {

std::tuple<at::Tensor, at::Tensor> call_fwd(const at::Tensor& x, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                            const at::Tensor& lora_b, const at::Tensor& idx, const at::Tensor& gate,
                                            int64_t num_shared, double scaling, at::IntArrayRef stride,
                                            at::IntArrayRef padding, at::IntArrayRef dilation, double merge_above,
                                            bool check_indices, bool store_u) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mor::blas_mor_conv2d_fwd", "")
                       .typed<decltype(blas_mor_conv2d_fwd_cpu)>();
  // the _fwd op has no autograd kernel and records nothing: dispatched below autograd (through the autograd
  // fallback this cost ~9 us per call)
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, stride, padding, dilation,
                 merge_above, check_indices, store_u);
}

struct BlasMorConv2d : public torch::autograd::Function<BlasMorConv2d> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_a, const at::Tensor& lora_b,
                            const at::Tensor& idx, const at::Tensor& gate, int64_t num_shared, double scaling,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                            bool check_indices) {
    auto [y, u] = call_fwd(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, stride, padding, dilation,
                           std::numeric_limits<double>::infinity(), check_indices, true);
    ctx->save_for_backward({x, weight, lora_a, lora_b, idx, gate, u});
    ctx->saved_data["num_shared"] = num_shared;
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "mor::blas_mor_conv2d: double backward is not supported by the 'blas' backend; use "
                "backend='reference'");
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const size_t off = has_bias ? 1 : 0;  // edges: x, weight, [bias], lora_a, lora_b, idx, gate
    std::array<bool, 6> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                has_bias && ctx->needs_input_grad(2), ctx->needs_input_grad(2 + off),
                                ctx->needs_input_grad(3 + off), ctx->needs_input_grad(5 + off)};
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mor::blas_mor_conv2d_bwd", "")
                         .typed<decltype(blas_mor_conv2d_bwd_cpu)>();
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    auto [dx, dw, dbias, da, db, dgate] =
        op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6],
                ctx->saved_data["num_shared"].toInt(), ctx->saved_data["scaling"].toDouble(), stride, padding,
                dilation, mask);
    auto keep = [](bool on, const at::Tensor& t) { return on ? t : at::Tensor(); };
    return {keep(mask[0], dx), keep(mask[1], dw), keep(mask[2], dbias), keep(mask[3], da), keep(mask[4], db),
            at::Tensor(),      keep(mask[5], dgate), at::Tensor(),      at::Tensor(),      at::Tensor(),
            at::Tensor(),      at::Tensor(),        at::Tensor()};
  }
};

bool requires_grad(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined() && t->requires_grad(); }

}  // namespace

// The public op (CompositeImplicitAutograd), as blas_mor_linear.
at::Tensor blas_mor_conv2d(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& idx,
                           const at::Tensor& gate, int64_t num_shared, double scaling, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, double merge_above, bool check_indices) {
  const bool grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || weight.requires_grad() || requires_grad(bias) || lora_a.requires_grad() ||
                     lora_b.requires_grad() || gate.requires_grad());
  if (grad) {
    return BlasMorConv2d::apply(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, stride, padding,
                                dilation, check_indices);
  }
  return std::get<0>(call_fwd(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, stride, padding,
                              dilation, merge_above, check_indices, false));
}

TORCH_LIBRARY_IMPL(mor, CPU, m) {
  m.impl("blas_mor_conv2d_fwd", &blas_mor_conv2d_fwd_cpu);
  m.impl("blas_mor_conv2d_bwd", &blas_mor_conv2d_bwd_cpu);
}

TORCH_LIBRARY_IMPL(mor, CompositeImplicitAutograd, m) { m.impl("blas_mor_conv2d", &blas_mor_conv2d); }

}  // namespace mor
