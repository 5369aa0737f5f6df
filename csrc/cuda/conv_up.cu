// CUDA kernel for mor::conv_up (see csrc/registration.cpp): y = base + B (scaling g z_rank), the gate, the 1x1
// up-projection over each sample's active ranks and the add, in one pass over the base convolution's output
// base = conv(x, W0) + bias and the rank channels z_rank = conv(x, A) (two convolutions: no [W0; A] weight).
//
// One block per (tile of kPixels pixels, chunk of kChannels output channels, sample), kThreads threads: a warp's
// lanes are consecutive pixels (coalesced loads of base and stores of y along the pixels) and the eight warps
// share the chunk's channels. The active rank activations of the tile (gated) and the chunk's slice of lora_b
// are staged in shared memory first. The grid grows with the channels too: a 64-channel chunk per block instead
// of one thread walking every output channel.
//
// base and z_rank are read through their (batch, channel, pixel) strides, so NCHW and channels_last inputs (what
// cuDNN gives a channels_last model) are read in place, with no contiguous copy. y is NCHW: that is mor::conv_up's
// contract, shared with its CPU kernel and its fake (returning base's layout would change all three). For
// channels_last inputs the lanes' reads of base are then strided by C_out, but the block reads a 32-pixel x
// 64-channel patch whose 128-byte channel runs its eight warps use whole (L1/L2), so the HBM bytes are those of
// the NCHW case, where the former copies read and wrote base and z_rank once more each.
#ifndef MOR_EMULATE_CUDA
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../checks.h"
#endif
#include "tile.cuh"

namespace mor {
namespace cuda {
namespace {

constexpr int kPixels = 32;    // pixels per block (a warp's lanes)
constexpr int kChannels = 64;  // output channels per block

}  // namespace

// Element strides of a (B, C, H, W) tensor whose H and W flatten into one pixel index.
struct PixelStrides {
  int64_t batch, channel, pixel;
};

namespace {

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    conv_up_kernel(const scalar_t* __restrict__ base, const scalar_t* __restrict__ z_rank,
                   const scalar_t* __restrict__ lora_b, const int32_t* __restrict__ idx, const float* __restrict__ gate,
                   scalar_t* __restrict__ y, PixelStrides sb, PixelStrides sz, PixelStrides sy, int64_t pixels,
                   int64_t c_out, int ranks, int num_shared, int k, float scaling) {
  MOR_DYNAMIC_SMEM(smem);
  __shared__ int n_act_s;
  int* rank = reinterpret_cast<int*>(smem);
  float* coef = smem + ranks;
  float* hs = coef + ranks;          // (n_act, kPixels): the gated rank activations of the tile
  float* bs = hs + ranks * kPixels;  // (kChannels, n_act): lora_b at the chunk's channels and the active ranks
  const int64_t b = blockIdx.z;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kPixels;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kChannels;
  if (threadIdx.x == 0) build_active(idx + b * k, gate + b * k, k, num_shared, ranks, scaling, rank, coef, &n_act_s);
  __syncthreads();
  const int n_act = n_act_s;
  const scalar_t* zb = z_rank + b * sz.batch;
  for (int e = threadIdx.x; e < n_act * kPixels; e += blockDim.x) {
    const int a = e / kPixels, p = e % kPixels;
    const float v = p0 + p < pixels ? static_cast<float>(zb[rank[a] * sz.channel + (p0 + p) * sz.pixel]) : 0.f;
    hs[e] = coef[a] != 0.f ? coef[a] * v : 0.f;  // MOR_SPEC 2.2: g = 0 gives exactly zero
  }
  for (int e = threadIdx.x; e < kChannels * n_act; e += blockDim.x) {
    const int cc = e / n_act, a = e % n_act;
    bs[e] = c0 + cc < c_out ? static_cast<float>(lora_b[(c0 + cc) * ranks + rank[a]]) : 0.f;
  }
  __syncthreads();
  const int p = threadIdx.x % kPixels;
  const int64_t pix = p0 + p;
  if (pix >= pixels) return;  // no barrier below
  const scalar_t* base_b = base + b * sb.batch + pix * sb.pixel;
  scalar_t* yb = y + b * sy.batch + pix * sy.pixel;
  for (int cc = threadIdx.x / kPixels; cc < kChannels && c0 + cc < c_out; cc += blockDim.x / kPixels) {
    const int64_t c = c0 + cc;
    float acc = static_cast<float>(base_b[c * sb.channel]);
    for (int a = 0; a < n_act; ++a) {
      const float hv = hs[a * kPixels + p];
      acc = hv != 0.f ? fmaf(bs[cc * n_act + a], hv, acc) : acc;
    }
    yb[c * sy.channel] = static_cast<scalar_t>(acc);
  }
}

}  // namespace

inline size_t conv_up_smem_bytes(int64_t ranks) {
  return static_cast<size_t>(2 * ranks + ranks * kPixels + kChannels * ranks) * sizeof(float);
}

#ifndef MOR_EMULATE_CUDA  // host code; tests/kernels/extension_emulation.cpp compiles the kernels above on a CPU

// t itself when its H and W flatten into one pixel index (NCHW, channels_last, a batch slice of either), else a
// contiguous copy.
static at::Tensor flat_pixels(const at::Tensor& t) {
  const bool flat = t.size(2) == 1 || t.size(3) == 1 || t.stride(2) == t.stride(3) * t.size(3);
  return flat ? t : t.contiguous();
}

// The (batch, channel, pixel) strides of a tensor that flat_pixels returned.
static PixelStrides pixel_strides(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.size(3) == 1 ? t.stride(2) : t.stride(3)};
}

at::Tensor conv_up(const at::Tensor& base, const at::Tensor& z_rank, const at::Tensor& lora_b, const at::Tensor& idx,
                   const at::Tensor& gate, int64_t num_shared, double scaling) {
  const auto s = check_conv_up_args(base, z_rank, lora_b, idx, gate, num_shared);
  check_cuda_limits("mor::conv_up", s.batch, s.ranks);
  const c10::cuda::CUDAGuard guard(base.device());
  const auto bc = flat_pixels(base);  // read in place: no copy of an NCHW or channels_last input
  const auto zc = flat_pixels(z_rank);
  const PixelStrides sb = pixel_strides(bc), sz = pixel_strides(zc);
  auto lbc = lora_b.contiguous();
  auto idx_c = idx.contiguous();
  auto gate_c = gate.contiguous();
  auto y = at::empty(base.sizes(), base.options());  // NCHW (see the top of this file)
  if (y.numel() == 0) return y;
  const PixelStrides sy = pixel_strides(y);
  const dim3 grid(static_cast<unsigned>((s.tokens + kPixels - 1) / kPixels),
                  static_cast<unsigned>((s.d_out + kChannels - 1) / kChannels), static_cast<unsigned>(s.batch));
  const size_t smem = conv_up_smem_bytes(s.ranks);
  MOR_DISPATCH_KERNEL_TYPES(base.scalar_type(), "mor_conv_up_cuda", [&] {
    auto kernel = conv_up_kernel<scalar_t>;
    allow_smem(kernel, smem);
    kernel<<<grid, kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
        bc.data_ptr<scalar_t>(), zc.data_ptr<scalar_t>(), lbc.data_ptr<scalar_t>(), idx_c.data_ptr<int32_t>(),
        gate_c.data_ptr<float>(), y.data_ptr<scalar_t>(), sb, sz, sy, s.tokens, s.d_out, static_cast<int>(s.ranks),
        static_cast<int>(num_shared), static_cast<int>(s.top_k), static_cast<float>(scaling));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

#endif  // MOR_EMULATE_CUDA

}  // namespace cuda

#ifndef MOR_EMULATE_CUDA
TORCH_LIBRARY_IMPL(mor, CUDA, m) { m.impl("conv_up", &cuda::conv_up); }
#endif

}  // namespace mor
