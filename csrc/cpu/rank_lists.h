// Sample routing read on the host, for the BLAS CPU path (csrc/cpu/blas_mor_linear.cpp, blas_mor_conv2d.cpp).
//
// With sample routing every token of a sample uses the same ranks: the S shared ranks, then the routed ranks
// its k slots picked (slot order; a zero slot, idx = -1 or any index outside [0, E), picks nothing; a rank
// picked by two slots appears twice, each with its own gate, so their contributions add up as in every
// backend). A list holds those ranks and their weights scaling * g. The BLAS path reads the list's rows of
// lora_a and columns of lora_b (in place in the rank kernels, rank_kernels.h; else gathered for ordinary GEMMs):
// the work follows the active ranks, and a rank no list holds is never read, so a NaN or inf in it cannot reach
// an output or a gradient (MOR_SPEC 2.2). Reading idx on the host is free for CPU tensors; this is the C++ twin
// of mor_kernels/reference/rank_lists.py (Punica/S-LoRA's segment idea, one segment per sample), without its
// tensor ops.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cstring>
#include <limits>
#include <vector>

#include "rank_kernels.h"

namespace mor {

struct SampleLists {
  int64_t batch = 0;  // samples
  int64_t lists = 0;  // 1 when every sample routes alike (one sample, or identical rows of idx and gate), else batch
  int64_t width = 0;  // S + k: the most a list holds (the width of the saved rank activations)
  std::vector<int64_t> count;  // (lists,): S + the routed picks
  std::vector<int64_t> rank;   // (lists, width): the rank of each entry
  std::vector<int64_t> slot;   // (lists, width): the slot j of a routed pick, -1 for a shared rank
  std::vector<double> weight;  // (lists, width): scaling * gate (scaling for a shared rank)

  int64_t list_of(int64_t sample) const { return lists == 1 ? 0 : sample; }
  // Samples [first, first + size) that use list l.
  int64_t first(int64_t l) const { return lists == 1 ? 0 : l; }
  int64_t size(int64_t l) const { return lists == 1 ? batch : 1; }
};

namespace detail {

template <typename I>
void read_idx(const at::Tensor& idx, std::vector<int64_t>& out) {
  const I* p = idx.data_ptr<I>();
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<int64_t>(p[i]);
}

}  // namespace detail

// The lists of idx (B, k) int32/int64 and gate (B, k) float of any float dtype (both on the CPU). With
// check_indices, an index outside [-1, E) raises the ValueError of mor_kernels.validation (same message).
inline SampleLists sample_lists(const at::Tensor& idx, const at::Tensor& gate, int64_t num_shared, int64_t num_ranks,
                                double scaling, bool check_indices) {
  SampleLists s;
  s.batch = idx.size(0);
  const int64_t k = idx.size(1);
  const int64_t num_routed = num_ranks - num_shared;
  s.width = num_shared + k;
  std::vector<int64_t> iv(s.batch * k);
  std::vector<double> gv(s.batch * k);
  const auto idx_c = idx.contiguous();
  if (idx_c.scalar_type() == at::kLong) {
    detail::read_idx<int64_t>(idx_c, iv);
  } else {
    detail::read_idx<int32_t>(idx_c, iv);
  }
  const auto gate_c = gate.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate_c.scalar_type(), "mor_sample_lists", [&] {
    const scalar_t* p = gate_c.data_ptr<scalar_t>();
    for (size_t i = 0; i < gv.size(); ++i) gv[i] = static_cast<double>(p[i]);
  });
  if (check_indices && !iv.empty()) {
    int64_t lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
    for (const int64_t v : iv) {
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    TORCH_CHECK_VALUE(lo >= -1 && hi < num_routed, "idx values must be in [-1, ", num_routed,
                      ") (-1 = zero slot, 0..E-1 = routed rank with E = lora ranks ", num_ranks, " - num_shared ",
                      num_shared, "), got values in [", lo, ", ", hi, "]");
  }
  bool alike = true;  // every row of idx and gate equal to the first
  for (int64_t b = 1; b < s.batch && alike; ++b) {
    alike = std::memcmp(iv.data(), iv.data() + b * k, k * sizeof(int64_t)) == 0 &&
            std::memcmp(gv.data(), gv.data() + b * k, k * sizeof(double)) == 0;
  }
  s.lists = s.batch == 0 ? 0 : (alike ? 1 : s.batch);
  s.count.assign(s.lists, 0);
  s.rank.assign(s.lists * s.width, 0);
  s.slot.assign(s.lists * s.width, -1);
  s.weight.assign(s.lists * s.width, 0.0);
  for (int64_t l = 0; l < s.lists; ++l) {
    int64_t n = 0;
    int64_t* rk = s.rank.data() + l * s.width;
    int64_t* sl = s.slot.data() + l * s.width;
    double* w = s.weight.data() + l * s.width;
    for (int64_t r = 0; r < num_shared; ++r, ++n) {
      rk[n] = r;
      w[n] = scaling;
    }
    for (int64_t j = 0; j < k; ++j) {
      const int64_t v = iv[l * k + j];
      // a zero slot (or, unchecked, an index outside [0, E)), or a gate of exactly 0: g_r = 0, the sample does not
      // use the rank (MOR_SPEC 2.2), whatever its weights hold, and the slot's gate gets no gradient
      if (v < 0 || v >= num_routed || gv[l * k + j] == 0.0) continue;
      rk[n] = num_shared + v;
      sl[n] = j;
      w[n++] = scaling * gv[l * k + j];
    }
    s.count[l] = n;
  }
  return s;
}

// rows (n, K) of src (R, K), contiguous, in src's dtype: the list's ranks; with_weight multiplies row i by
// weight[i].
inline at::Tensor gather_rows(const at::Tensor& src, const SampleLists& s, int64_t l, bool with_weight) {
  const int64_t n = s.count[l], cols = src.size(1);
  auto out = at::empty({n, cols}, src.options());
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "mor_gather_rows", [&] {
    const scalar_t* sp = src.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t* row = sp + s.rank[l * s.width + i] * cols;
      scalar_t* dst = op + i * cols;
      if (!with_weight) {
        std::memcpy(dst, row, cols * sizeof(scalar_t));
        continue;
      }
      const auto w = static_cast<scalar_t>(s.weight[l * s.width + i]);
      for (int64_t c = 0; c < cols; ++c) dst[c] = row[c] * w;
    }
  });
  return out;
}

// columns (d_out, n) of src (d_out, R), contiguous, in src's dtype: the list's ranks; with_weight multiplies
// column i by weight[i].
inline at::Tensor gather_cols(const at::Tensor& src, const SampleLists& s, int64_t l, bool with_weight) {
  const int64_t n = s.count[l], rows = src.size(0), ranks = src.size(1);
  auto out = at::empty({rows, n}, src.options());
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "mor_gather_cols", [&] {
    const scalar_t* sp = src.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t* rk = s.rank.data() + l * s.width;
    std::vector<scalar_t> w(n, scalar_t(1));
    if (with_weight) {
      for (int64_t i = 0; i < n; ++i) w[i] = static_cast<scalar_t>(s.weight[l * s.width + i]);
    }
    for (int64_t o = 0; o < rows; ++o) {
      const scalar_t* row = sp + o * ranks;
      scalar_t* dst = op + o * n;
      for (int64_t i = 0; i < n; ++i) dst[i] = row[rk[i]] * w[i];
    }
  });
  return out;
}

// float32 operands of the rank kernels (rank_kernels.h) for list l: the list's rows of src (R, K),
// contiguous, where they are (no copy), and its weights as float.
inline std::vector<const float*> rank_row_ptrs(const at::Tensor& src, const SampleLists& s, int64_t l) {
  std::vector<const float*> out(s.count[l]);
  const float* sp = src.data_ptr<float>();
  for (int64_t i = 0; i < s.count[l]; ++i) out[i] = sp + s.rank[l * s.width + i] * src.size(1);
  return out;
}

inline std::vector<float> rank_weights(const SampleLists& s, int64_t l) {
  return std::vector<float>(s.weight.begin() + l * s.width, s.weight.begin() + l * s.width + s.count[l]);
}

// B_act diag(w) (d_out, n) of float32 lora_b (d_out, R), contiguous, by the rank kernel (gather_cols' twin).
inline at::Tensor rank_coef(const at::Tensor& b, const SampleLists& s, int64_t l) {
  const int64_t n = s.count[l];
  auto out = at::empty({b.size(0), n}, b.options());
  const auto w = rank_weights(s, l);
  rank_coef(b.data_ptr<float>(), b.size(1), b.size(0), s.rank.data() + l * s.width, w.data(), n, out.data_ptr<float>(),
            n);
  return out;
}

// out (d_out, K), contiguous = W0 (d_out, K) + B_act diag(w) A_act for list l of lora_a (R, K) and lora_b (d_out, R):
// with `fast` in one pass of the rank kernel over W0 (lora_a's rows read in place), else one ATen addmm on the
// gathered factors. An empty list gives W0.
inline void merged_weight_out(at::Tensor& out, const at::Tensor& w0, const at::Tensor& a, const at::Tensor& b,
                              const SampleLists& lists, int64_t l, bool fast) {
  const int64_t n = lists.count[l], d_out = w0.size(0), d_in = w0.size(1);
  if (n == 0) {
    out.copy_(w0);
  } else if (!fast) {
    at::addmm_out(out, w0, gather_cols(b, lists, l, true), gather_rows(a, lists, l, false));
  } else {
    const auto coef = rank_coef(b, lists, l);
    const auto rows = rank_row_ptrs(a, lists, l);
    rank_update_rows(w0.data_ptr<float>(), w0.stride(0), out.data_ptr<float>(), d_in, d_out, d_in,
                     coef.data_ptr<float>(), n, n, rows.data());
  }
}

inline at::Tensor merged_weight(const at::Tensor& w0, const at::Tensor& a, const at::Tensor& b,
                                const SampleLists& lists, int64_t l, bool fast) {
  auto out = at::empty({w0.size(0), w0.size(1)}, w0.options());
  merged_weight_out(out, w0, a, b, lists, l, fast);
  return out;
}

// dst (R, K) += rows (n, K) scaled by the list's weights, row i into row rank[i] (the gradient of gather_rows).
inline void scatter_add_rows(at::Tensor& dst, const at::Tensor& rows, const SampleLists& s, int64_t l,
                             bool with_weight) {
  const int64_t n = s.count[l], cols = dst.size(1);
  const auto src = rows.contiguous();
  AT_DISPATCH_FLOATING_TYPES(dst.scalar_type(), "mor_scatter_rows", [&] {
    const scalar_t* sp = src.data_ptr<scalar_t>();
    scalar_t* dp = dst.data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {
      const auto w = with_weight ? static_cast<scalar_t>(s.weight[l * s.width + i]) : scalar_t(1);
      scalar_t* out = dp + s.rank[l * s.width + i] * cols;
      const scalar_t* in = sp + i * cols;
      for (int64_t c = 0; c < cols; ++c) out[c] += in[c] * w;
    }
  });
}

// dst (d_out, R) += cols (d_out, n) scaled by the list's weights, column i into column rank[i].
inline void scatter_add_cols(at::Tensor& dst, const at::Tensor& cols, const SampleLists& s, int64_t l) {
  const int64_t n = s.count[l], rows = dst.size(0), ranks = dst.size(1);
  const auto src = cols.contiguous();
  AT_DISPATCH_FLOATING_TYPES(dst.scalar_type(), "mor_scatter_cols", [&] {
    const scalar_t* sp = src.data_ptr<scalar_t>();
    scalar_t* dp = dst.data_ptr<scalar_t>();
    const int64_t* rk = s.rank.data() + l * s.width;
    for (int64_t o = 0; o < rows; ++o) {
      for (int64_t i = 0; i < n; ++i) {
        dp[o * ranks + rk[i]] += sp[o * n + i] * static_cast<scalar_t>(s.weight[l * s.width + i]);
      }
    }
  });
}

}  // namespace mor
