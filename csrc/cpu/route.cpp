// CPU kernel for mor::route (MOR_SPEC 2.1): softmax in float32, top-k (descending, ties to the lower slot),
// renormalisation over all selected slots (zero slots included), zero slots -> -1.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../checks.h"

namespace mor {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_cpu(const at::Tensor& logits, int64_t top_k,
                                                                     int64_t num_zero, bool renormalize) {
  check_route_args(logits, top_k, num_zero);
  const int64_t n = logits.size(-1);
  const int64_t rows = logits.numel() / n;
  const int64_t num_real = n - num_zero;
  auto lc = logits.contiguous();
  auto sel_shape = logits.sizes().vec();
  sel_shape.back() = top_k;
  auto idx = at::empty(sel_shape, logits.options().dtype(at::kInt));
  auto slots = at::empty(sel_shape, logits.options().dtype(at::kInt));
  auto gate = at::empty(sel_shape, logits.options().dtype(at::kFloat));
  auto probs = at::empty(logits.sizes(), logits.options().dtype(at::kFloat));
  int32_t* ip = idx.data_ptr<int32_t>();
  int32_t* sp = slots.data_ptr<int32_t>();
  float* gp = gate.data_ptr<float>();
  float* pp = probs.data_ptr<float>();
  MOR_DISPATCH_KERNEL_TYPES(logits.scalar_type(), "mor_route_cpu", [&] {
    const scalar_t* lp = lc.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<uint8_t> taken(n);
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* l = lp + row * n;
        float* p = pp + row * n;
        float mx = -INFINITY;
        for (int64_t i = 0; i < n; ++i) mx = std::max(mx, static_cast<float>(l[i]));
        float sum = 0.f;
        for (int64_t i = 0; i < n; ++i) {
          p[i] = std::exp(static_cast<float>(l[i]) - mx);
          sum += p[i];
        }
        for (int64_t i = 0; i < n; ++i) p[i] /= sum;
        std::fill(taken.begin(), taken.end(), 0);
        float total = 0.f;
        for (int64_t j = 0; j < top_k; ++j) {
          int64_t best = -1;
          for (int64_t i = 0; i < n; ++i) {  // strict '>' keeps the lower slot on ties
            if (!taken[i] && (best < 0 || p[i] > p[best])) best = i;
          }
          taken[best] = 1;
          sp[row * top_k + j] = static_cast<int32_t>(best);
          ip[row * top_k + j] = best < num_real ? static_cast<int32_t>(best) : -1;
          gp[row * top_k + j] = p[best];
          total += p[best];
        }
        if (renormalize) {
          for (int64_t j = 0; j < top_k; ++j) gp[row * top_k + j] /= total;
        }
      }
    });
  });
  return {idx, gate, probs, slots};
}

TORCH_LIBRARY_IMPL(mor, CPU, m) { m.impl("route", &route_cpu); }

}  // namespace mor
