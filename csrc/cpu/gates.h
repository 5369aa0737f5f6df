// Host-side expansion of compact routing (idx, gate) into per-unit active rank lists (CPU kernels).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

namespace mor {

// For each routing unit u (a sample, or a token): the active ranks (shared ranks, then the routed ranks
// picked by at least one slot, in slot order) and their scaled dense gate scaling * g_r (MOR_SPEC 2.1; a rank
// picked by two slots gets the sum of both gates). Index values outside [0, E) are zero slots, and so is a slot
// whose gate is exactly 0.
struct UnitGates {
  int64_t ranks = 0;
  std::vector<int32_t> rank;   // (units, ranks): rank[u * ranks + a], a < count[u]
  std::vector<float> coef;     // (units, ranks): scaling * g of that rank
  std::vector<int32_t> count;  // (units,)

  UnitGates(const at::Tensor& idx, const at::Tensor& gate, int64_t num_shared, int64_t num_ranks, double scaling)
      : ranks(num_ranks) {
    auto idx_c = idx.contiguous();
    auto gate_c = gate.contiguous();
    const int64_t k = idx.size(-1);
    const int64_t units = idx.numel() / k;
    rank.assign(units * ranks, 0);
    coef.assign(units * ranks, 0.f);
    count.assign(units, 0);
    const int32_t* ip = idx_c.data_ptr<int32_t>();
    const float* gp = gate_c.data_ptr<float>();
    const int64_t num_routed = num_ranks - num_shared;
    const float s = static_cast<float>(scaling);
    at::parallel_for(0, units, 256, [&](int64_t begin, int64_t end) {
      std::vector<float> dense(num_ranks);
      std::vector<uint8_t> on(num_ranks);
      for (int64_t u = begin; u < end; ++u) {
        std::fill(dense.begin(), dense.end(), 0.f);
        std::fill(on.begin(), on.end(), 0);
        int32_t* rk = rank.data() + u * ranks;
        int32_t n = 0;
        for (int64_t r = 0; r < num_shared; ++r) {
          dense[r] = 1.f;
          on[r] = 1;
          rk[n++] = static_cast<int32_t>(r);
        }
        for (int64_t j = 0; j < k; ++j) {
          const int64_t slot = ip[u * k + j];
          // a zero slot (or an out-of-range index), or a gate of exactly 0: g_r = 0 adds nothing (MOR_SPEC 2.2)
          if (slot < 0 || slot >= num_routed || gp[u * k + j] == 0.f) continue;
          const int64_t r = num_shared + slot;
          dense[r] += gp[u * k + j];
          if (!on[r]) {
            on[r] = 1;
            rk[n++] = static_cast<int32_t>(r);
          }
        }
        for (int32_t a = 0; a < n; ++a) coef[u * ranks + a] = s * dense[rk[a]];
        count[u] = n;
      }
    });
  }
};

}  // namespace mor
