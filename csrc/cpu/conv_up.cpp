// CPU kernel for mor::conv_up (see csrc/registration.cpp): the gated 1x1 up-projection of the rank channels
// z_rank = conv(x, lora_a) added to base = conv(x, weight) (+ bias), float64 accumulation (float32 storage).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "gates.h"

namespace mor {

at::Tensor conv_up_cpu(const at::Tensor& base, const at::Tensor& z_rank, const at::Tensor& lora_b,
                       const at::Tensor& idx, const at::Tensor& gate, int64_t num_shared, double scaling) {
  const auto s = check_conv_up_args(base, z_rank, lora_b, idx, gate, num_shared);
  const int64_t c_out = s.d_out, ranks = s.ranks, pixels = s.tokens;
  auto bc = base.contiguous();
  auto zc = z_rank.contiguous();
  auto b32 = lora_b.to(at::kFloat).contiguous();  // (C_out, R)
  auto y = at::empty(base.sizes(), base.options());
  const UnitGates ug(idx, gate, num_shared, ranks, scaling);
  const float* bp = b32.data_ptr<float>();
  MOR_DISPATCH_KERNEL_TYPES(base.scalar_type(), "mor_conv_up_cpu", [&] {
    const scalar_t* basep = bc.data_ptr<scalar_t>();
    const scalar_t* zp = zc.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, s.batch * c_out, 4, [&](int64_t begin, int64_t end) {
      std::vector<double> acc(pixels);
      for (int64_t job = begin; job < end; ++job) {
        const int64_t b = job / c_out, o = job % c_out;
        const scalar_t* bo = basep + (b * c_out + o) * pixels;
        for (int64_t p = 0; p < pixels; ++p) acc[p] = static_cast<double>(bo[p]);
        for (int32_t a = 0; a < ug.count[b]; ++a) {
          const int64_t r = ug.rank[b * ranks + a];
          const float g = ug.coef[b * ranks + a];
          if (g == 0.f) continue;  // MOR_SPEC 2.2: g = 0 contributes exactly zero, whatever lora_b holds
          const double c = static_cast<double>(g) * bp[o * ranks + r];
          const scalar_t* hr = zp + (b * ranks + r) * pixels;
          for (int64_t p = 0; p < pixels; ++p) acc[p] += c * static_cast<float>(hr[p]);
        }
        scalar_t* yr = yp + (b * c_out + o) * pixels;
        for (int64_t p = 0; p < pixels; ++p) yr[p] = static_cast<scalar_t>(static_cast<float>(acc[p]));
      }
    });
  });
  return y;
}

TORCH_LIBRARY_IMPL(mor, CPU, m) { m.impl("conv_up", &conv_up_cpu); }

}  // namespace mor
