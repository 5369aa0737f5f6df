// CPU kernels for mor::lora_fwd and mor::lora_bwd (see csrc/registration.cpp): float32 storage, float64
// accumulation.
//
// Forward, one token per iteration: u = A x at the unit's active ranks only (so zero slots save work),
// y = base + sum_a (scaling g_a u_a) B[:, r_a]. Backward: per token dyB = B^T dy at the active ranks, then
// dx, dA = sum_n dh x^T and dB = sum_n dy hg^T, each parallel over its own output elements with the token sum
// in a fixed order (double partial sums), so results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "gates.h"

namespace mor {
namespace {

// Dot product with 8 independent float64 partial sums. The CPU kernels are the exact twin of the GPU ones
// and the reference for machines without a GPU, so they accumulate in float64 (stored as float32): their error
// is one final rounding, never more than the reference path's own float32 error.
inline double dot(const float* a, const float* b, int64_t n) {
  double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += static_cast<double>(a[i + j]) * b[i + j];
  }
  for (; i < n; ++i) acc[i % 8] += static_cast<double>(a[i]) * b[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// out (rows, cols) float = sum_n p[n, row] * q[n, col] over n in [0, n_total), p (n_total, rows),
// q (n_total, cols); parallel over (row, column block), deterministic.
at::Tensor sum_outer(const float* p, const float* q, int64_t n_total, int64_t rows, int64_t cols,
                     const at::TensorOptions& opts) {
  auto out = at::zeros({rows, cols}, opts.dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (cols + kBlock - 1) / kBlock;
  at::parallel_for(0, rows * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t row = job / blocks;
      const int64_t c0 = (job % blocks) * kBlock;
      const int64_t c1 = std::min(cols, c0 + kBlock);
      double acc[kBlock] = {0.0};  // long sums over tokens: double partials, rounded once
      for (int64_t n = 0; n < n_total; ++n) {
        const double c = p[n * rows + row];
        if (c == 0.0) continue;
        const float* qn = q + n * cols;
        for (int64_t i = c0; i < c1; ++i) acc[i - c0] += c * qn[i];
      }
      for (int64_t i = c0; i < c1; ++i) op[row * cols + i] = static_cast<float>(acc[i - c0]);
    }
  });
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_fwd_cpu(const at::Tensor& x, const at::Tensor& lora_a,
                                                const at::Tensor& lora_b, const at::Tensor& idx,
                                                const at::Tensor& gate, int64_t num_shared, double scaling,
                                                const std::optional<at::Tensor>& base, bool store_h) {
  const auto s = check_lora_args("mor::lora_fwd", x, lora_a, lora_b, idx, gate, num_shared, base);
  const int64_t n_total = s.batch * s.tokens, d_in = s.d_in, d_out = s.d_out, ranks = s.ranks;
  auto xc = x.contiguous();
  auto a32 = lora_a.to(at::kFloat).contiguous();        // (R, d_in)
  auto bt32 = lora_b.to(at::kFloat).t().contiguous();   // (R, d_out)
  at::Tensor basec = base.has_value() ? base->contiguous() : at::Tensor();
  auto y = at::empty({s.batch, s.tokens, d_out}, x.options());
  // h only when a backward will run (zero at the ranks a unit does not pick)
  auto h = store_h ? at::zeros({s.batch, s.tokens, ranks}, x.options().dtype(at::kFloat))
                   : at::empty({0}, x.options().dtype(at::kFloat));
  const UnitGates ug(idx, gate, num_shared, ranks, scaling);
  const float* ap = a32.data_ptr<float>();
  const float* btp = bt32.data_ptr<float>();
  float* hp = store_h ? h.data_ptr<float>() : nullptr;
  MOR_DISPATCH_KERNEL_TYPES(x.scalar_type(), "mor_lora_fwd_cpu", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* bp = basec.defined() ? basec.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, n_total, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> xr(d_in);
      std::vector<double> acc(d_out);
      for (int64_t n = begin; n < end; ++n) {
        const int64_t unit = s.token_routing ? n : n / s.tokens;
        for (int64_t i = 0; i < d_in; ++i) xr[i] = static_cast<float>(xp[n * d_in + i]);
        for (int64_t o = 0; o < d_out; ++o) acc[o] = bp ? static_cast<double>(bp[n * d_out + o]) : 0.0;
        for (int32_t a = 0; a < ug.count[unit]; ++a) {
          const int64_t r = ug.rank[unit * ranks + a];
          const double u = dot(xr.data(), ap + r * d_in, d_in);
          if (hp) hp[n * ranks + r] = static_cast<float>(u);
          const float g = ug.coef[unit * ranks + a];
          if (g == 0.f) continue;  // MOR_SPEC 2.2: g = 0 contributes exactly zero, whatever the rank holds
          const double c = g * u;
          const float* bt = btp + r * d_out;
          for (int64_t o = 0; o < d_out; ++o) acc[o] += c * bt[o];
        }
        for (int64_t o = 0; o < d_out; ++o) yp[n * d_out + o] = static_cast<scalar_t>(static_cast<float>(acc[o]));
      }
    });
  });
  return {y, h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
    const at::Tensor& idx, const at::Tensor& gate, const at::Tensor& h, int64_t num_shared, double scaling,
    std::array<bool, 4> output_mask) {
  const auto s = check_lora_bwd_args(grad_y, x, lora_a, lora_b, idx, gate, h, num_shared);
  const int64_t n_total = s.batch * s.tokens, d_in = s.d_in, d_out = s.d_out, ranks = s.ranks, k = s.top_k;
  const auto f32 = x.options().dtype(at::kFloat);
  auto dy = grad_y.to(at::kFloat).contiguous();        // (N, d_out)
  auto a32 = lora_a.to(at::kFloat).contiguous();       // (R, d_in)
  auto bt32 = lora_b.to(at::kFloat).t().contiguous();  // (R, d_out)
  auto hc = h.contiguous();
  const UnitGates ug(idx, gate, num_shared, ranks, scaling);
  // Per token and rank (zero at inactive ranks): dh = scaling g dyB, hg = scaling g h, q = dyB h.
  auto dh = at::zeros({n_total, ranks}, f32);
  auto hg = at::zeros({n_total, ranks}, f32);
  auto q = at::zeros({n_total, ranks}, x.options().dtype(at::kDouble));
  const float* dyp = dy.data_ptr<float>();
  const float* btp = bt32.data_ptr<float>();
  const float* hp = hc.data_ptr<float>();
  float* dhp = dh.data_ptr<float>();
  float* hgp = hg.data_ptr<float>();
  double* qp = q.data_ptr<double>();
  at::parallel_for(0, n_total, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t unit = s.token_routing ? n : n / s.tokens;
      for (int32_t a = 0; a < ug.count[unit]; ++a) {
        const int64_t r = ug.rank[unit * ranks + a];
        const double c = ug.coef[unit * ranks + a];
        const double dyb = dot(dyp + n * d_out, btp + r * d_out, d_out);
        dhp[n * ranks + r] = c != 0.0 ? static_cast<float>(c * dyb) : 0.f;
        hgp[n * ranks + r] = c != 0.0 ? static_cast<float>(c * hp[n * ranks + r]) : 0.f;
        qp[n * ranks + r] = dyb * hp[n * ranks + r];
      }
    }
  });

  at::Tensor grad_x = at::empty({0}, x.options()), grad_a = at::empty({0}, x.options()),
             grad_b = at::empty({0}, x.options()), grad_gate = at::empty({0}, f32);
  if (output_mask[0]) {
    auto dx = at::empty({s.batch, s.tokens, d_in}, f32);
    float* dxp = dx.data_ptr<float>();
    const float* ap = a32.data_ptr<float>();
    at::parallel_for(0, n_total, 16, [&](int64_t begin, int64_t end) {
      std::vector<double> acc(d_in);
      for (int64_t n = begin; n < end; ++n) {
        const int64_t unit = s.token_routing ? n : n / s.tokens;
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int32_t a = 0; a < ug.count[unit]; ++a) {
          const int64_t r = ug.rank[unit * ranks + a];
          const double c = dhp[n * ranks + r];
          const float* ar = ap + r * d_in;
          for (int64_t i = 0; i < d_in; ++i) acc[i] += c * ar[i];
        }
        for (int64_t i = 0; i < d_in; ++i) dxp[n * d_in + i] = static_cast<float>(acc[i]);
      }
    });
    grad_x = dx.to(x.scalar_type());
  }
  if (output_mask[1]) {
    auto x32 = x.to(at::kFloat).contiguous();
    grad_a = sum_outer(dhp, x32.data_ptr<float>(), n_total, ranks, d_in, f32).to(x.scalar_type());
  }
  if (output_mask[2]) {
    grad_b = sum_outer(hgp, dyp, n_total, ranks, d_out, f32).t().contiguous().to(x.scalar_type());
  }
  if (output_mask[3]) {
    // d gate_j = scaling * sum over the unit's tokens of dyB[r] h[r], r = S + idx_j (0 for a zero slot, and for
    // a slot whose gate is exactly 0: the unit does not use that rank).
    grad_gate = at::empty(idx.sizes(), f32);
    auto idx_c = idx.contiguous();
    auto gate_c = gate.contiguous();
    const int32_t* ip = idx_c.data_ptr<int32_t>();
    const float* gv = gate_c.data_ptr<float>();
    float* gp = grad_gate.data_ptr<float>();
    const int64_t units = idx.numel() / k;
    const int64_t per_unit = s.token_routing ? 1 : s.tokens;
    const int64_t num_routed = ranks - num_shared;
    const float sc = static_cast<float>(scaling);
    at::parallel_for(0, units, 16, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        for (int64_t j = 0; j < k; ++j) {
          const int64_t slot = ip[u * k + j];
          double acc = 0.0;
          if (slot >= 0 && slot < num_routed && gv[u * k + j] != 0.f) {
            const int64_t r = num_shared + slot;
            for (int64_t t = 0; t < per_unit; ++t) acc += qp[(u * per_unit + t) * ranks + r];
          }
          gp[u * k + j] = sc * static_cast<float>(acc);
        }
      }
    });
  }
  return {grad_x, grad_a, grad_b, grad_gate};
}

TORCH_LIBRARY_IMPL(mor, CPU, m) {
  m.impl("lora_fwd", &lora_fwd_cpu);
  m.impl("lora_bwd", &lora_bwd_cpu);
}

}  // namespace mor
