// Host emulation of the MoR CUDA tile kernels (csrc/cuda/*.cu) for machines without a GPU.
//
// Every kernel is written so that each thread loops over its share of the work with stride blockDim.x between
// __syncthreads() barriers. Run with blockDim.x = 1 and threadIdx.x = 0, one block after the other, a kernel
// does all of its block's work in program order and the barriers are no-ops, so compiling the kernel bodies as
// plain C++ checks their index arithmetic, shared-memory layout, routing tables and reductions against the CPU
// kernels. With emu_set_block_threads(256) every CUDA thread of a block is a host thread and __syncthreads() a
// real barrier; mor::route's warps run as 32 host threads that meet at every shuffle.
// Built by tests/kernels/test_extension_emulation.py with the host C++ compiler, called through ctypes.
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

#define MOR_EMULATE_CUDA 1
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define MOR_DYNAMIC_SMEM(name) float* name = ::mor::cuda::emu_smem
#define __restrict__
#define __launch_bounds__(...)
#define __noinline__

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};
static EmuDim3 blockIdx, blockDim{1, 1, 1}, gridDim{1, 1, 1};
static thread_local EmuDim3 threadIdx;

// Block emulation: with emu_block_threads > 1 every thread of a block is a host thread and __syncthreads() is a
// barrier; with 1 the block runs as one thread and the barriers are no-ops.
static int emu_block_threads = 1;
static std::barrier<>* emu_block_barrier = nullptr;
static void __syncthreads() {
  if (emu_block_barrier) emu_block_barrier->arrive_and_wait();
}

// Warp emulation for mor::route: 32 host threads in lock step at every shuffle / __syncwarp.
static std::barrier<>* emu_warp_barrier = nullptr;
static float emu_lane_f[32];
static int emu_lane_i[32];
static void __syncwarp() {
  if (emu_warp_barrier) emu_warp_barrier->arrive_and_wait();
}
static float __shfl_xor_sync(unsigned, float v, int off) {
  const int lane = threadIdx.x % 32;
  emu_lane_f[lane] = v;
  emu_warp_barrier->arrive_and_wait();
  const float r = emu_lane_f[lane ^ off];
  emu_warp_barrier->arrive_and_wait();
  return r;
}
static int __shfl_xor_sync(unsigned, int v, int off) {
  const int lane = threadIdx.x % 32;
  emu_lane_i[lane] = v;
  emu_warp_barrier->arrive_and_wait();
  const int r = emu_lane_i[lane ^ off];
  emu_warp_barrier->arrive_and_wait();
  return r;
}
static float __int_as_float(int v) {
  float f;
  std::memcpy(&f, &v, sizeof f);
  return f;
}
template <typename T>
static T __ldg(const T* p) {
  return *p;
}
using std::fmaf;
using std::isfinite;
using std::max;
using std::min;

namespace mor {
namespace cuda {
float emu_smem[1 << 21];  // the kernels' dynamic shared memory
}  // namespace cuda
}  // namespace mor

// Host stand-in for the nvcuda::wmma calls of csrc/cuda/tile_mma.cuh: a fragment holds its whole 16x16 tile
// and lane 0 of each warp does the warp's fragment work (the other lanes' fragments are unused), so the
// emulation checks the tiling, padding and shared-memory layout without data races.
namespace emu_wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  float v[16 * 16];  // element (r, c) at v[r * 16 + c]
};
static bool lane0() { return threadIdx.x % 32 == 0; }
template <typename Use, typename T, typename Layout>
static void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  if (!lane0()) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.v[r * 16 + c] = static_cast<float>(std::is_same_v<Layout, col_major> ? p[c * ldm + r] : p[r * ldm + c]);
}
static void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm, layout_t l) {
  if (!lane0()) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r * 16 + c] = l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}
static void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t l) {
  if (!lane0()) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) (l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.v[r * 16 + c];
}
static void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float value) {
  for (float& e : f.v) e = value;
}
template <typename T, typename LA, typename LB>
static void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  if (!lane0()) return;
  float out[16 * 16];
  for (int r = 0; r < 16; ++r)
    for (int col = 0; col < 16; ++col) {
      float s = c.v[r * 16 + col];
      for (int kk = 0; kk < 16; ++kk) s += a.v[r * 16 + kk] * b.v[kk * 16 + col];
      out[r * 16 + col] = s;
    }
  std::memcpy(d.v, out, sizeof out);
}
}  // namespace emu_wmma

#include "../../csrc/cuda/conv_up.cu"
#include "../../csrc/cuda/mor_lora.cu"
#include "../../csrc/cuda/mor_lora_bwd.cu"
#include "../../csrc/cuda/route.cu"

using namespace mor::cuda;

template <typename F>
static void launch(unsigned gx, unsigned gy, unsigned gz, F kernel) {
  gridDim = {gx, gy, gz};
  for (unsigned z = 0; z < gz; ++z)
    for (unsigned y = 0; y < gy; ++y)
      for (unsigned x = 0; x < gx; ++x) {
        blockIdx = {x, y, z};
        kernel();
      }
}

// Tile kernels (kThreads per block on the GPU): one host thread per block, or all of them with real barriers
// (`threads` > 0 forces that many, for kernels written for a full block).
template <typename F>
static void launch_tile(unsigned gx, unsigned gy, F kernel, unsigned gz = 1, int threads = 0) {
  const int n = threads > 0 ? threads : emu_block_threads;
  if (n <= 1) {
    blockDim = {1, 1, 1};
    launch(gx, gy, gz, kernel);
    return;
  }
  blockDim = {static_cast<unsigned>(n), 1, 1};
  std::barrier<> bar(n);
  emu_block_barrier = &bar;
  launch(gx, gy, gz, [&] {
    std::vector<std::thread> threads;
    for (int t = 0; t < n; ++t) {
      threads.emplace_back([&, t] {
        threadIdx.x = static_cast<unsigned>(t);
        kernel();
      });
    }
    for (auto& th : threads) th.join();
  });
  emu_block_barrier = nullptr;
  blockDim = {1, 1, 1};
}

static unsigned cdiv(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

extern "C" {

// 1: blocks run as one thread (deterministic program order); kThreads: real threads and barriers per block.
void emu_set_block_threads(int n) { emu_block_threads = n; }

// lora_bt is lora_b transposed (R, d_out), as the host launcher passes it. h: null when the forward stores no h
// (store_h false), else written whole. chunk: output columns per block (gridDim.z = cdiv(d_out, chunk)).
void emu_lora_fwd(const float* x, const float* lora_a, const float* lora_bt, const int32_t* idx, const float* gate,
                  const float* base, float* y, float* h, int64_t batch, int64_t tokens, int64_t d_in, int64_t d_out,
                  int64_t chunk, int ranks, int num_shared, int k, float scaling, int token) {
  launch_tile(cdiv(tokens, kTile), static_cast<unsigned>(batch), [&] {
    if (token)
      lora_fwd_kernel<float, true>(x, lora_a, lora_bt, idx, gate, base, y, h, tokens, d_in, d_out, chunk, ranks,
                                   num_shared, k, scaling);
    else
      lora_fwd_kernel<float, false>(x, lora_a, lora_bt, idx, gate, base, y, h, tokens, d_in, d_out, chunk, ranks,
                                    num_shared, k, scaling);
  }, std::max<unsigned>(1, cdiv(d_out, chunk)));
}

// The tensor-core forward (lora_fwd_mma_kernel) with float operands and the wmma stand-in above.
void emu_lora_fwd_mma(const float* x, const float* lora_a, const float* lora_bt, const int32_t* idx,
                      const float* gate, const float* base, float* y, float* h, int64_t batch, int64_t tokens,
                      int64_t d_in, int64_t d_out, int64_t chunk, int ranks, int num_shared, int k, float scaling,
                      int token) {
  launch_tile(cdiv(tokens, kTile), static_cast<unsigned>(batch), [&] {
    if (token)
      lora_fwd_mma_kernel<float, float, true>(x, lora_a, lora_bt, idx, gate, base, y, h, tokens, d_in, d_out, chunk,
                                              ranks, num_shared, k, scaling);
    else
      lora_fwd_mma_kernel<float, float, false>(x, lora_a, lora_bt, idx, gate, base, y, h, tokens, d_in, d_out, chunk,
                                               ranks, num_shared, k, scaling);
  }, std::max<unsigned>(1, cdiv(d_out, chunk)));
}

// split_sum_kernel alone: out[i] = sum over splits of partial[split * numel + i], in split order.
void emu_split_sum(const float* partial, float* out, int64_t numel, int64_t splits) {
  blockDim = {256, 1, 1};
  launch(cdiv(numel, 256), 1, 1, [&] {
    for (unsigned t = 0; t < 256; ++t) {
      threadIdx.x = t;
      split_sum_kernel<float>(partial, out, numel, splits);
    }
  });
  threadIdx.x = 0;
  blockDim = {1, 1, 1};
}

// The whole of mor::lora_bwd's CUDA path: rank kernel, gate reduction, dx, and the split outer products.
void emu_lora_bwd(const float* dy, const float* x, const float* lora_a, const float* lora_bt, const int32_t* idx,
                  const float* gate, const float* h, float* grad_x, float* grad_a, float* grad_bt, float* grad_gate,
                  int64_t batch, int64_t tokens, int64_t d_in, int64_t d_out, int ranks, int num_shared, int k,
                  float scaling, int token) {
  const int64_t n_total = batch * tokens;
  const int64_t tiles = (tokens + kTile - 1) / kTile;
  std::vector<float> dh(n_total * ranks, 0.f), hg(n_total * ranks, 0.f), qpart(token ? 1 : batch * tiles * ranks, 0.f);
  launch_tile(static_cast<unsigned>(tiles), static_cast<unsigned>(batch), [&] {
    if (token)
      lora_bwd_rank_kernel<float, true>(dy, lora_bt, h, idx, gate, dh.data(), hg.data(), qpart.data(), grad_gate,
                                        tokens, d_out, ranks, num_shared, k, scaling);
    else
      lora_bwd_rank_kernel<float, false>(dy, lora_bt, h, idx, gate, dh.data(), hg.data(), qpart.data(), grad_gate,
                                         tokens, d_out, ranks, num_shared, k, scaling);
  });
  if (!token) {
    // 128 threads per block on the GPU: emulate thread by thread (no barriers in this kernel)
    blockDim = {128, 1, 1};
    launch(cdiv(batch * k, 128), 1, 1, [&] {
      for (unsigned t = 0; t < 128; ++t) {
        threadIdx.x = t;
        lora_bwd_gate_kernel(qpart.data(), idx, gate, grad_gate, batch, tiles, ranks, num_shared, k, scaling);
      }
      threadIdx.x = 0;
    });
    blockDim = {1, 1, 1};
  }
  launch_tile(static_cast<unsigned>(tiles), static_cast<unsigned>(batch), [&] {
    if (token)
      lora_bwd_dx_kernel<float, true>(dh.data(), lora_a, idx, gate, grad_x, tokens, d_in, ranks, num_shared, k);
    else
      lora_bwd_dx_kernel<float, false>(dh.data(), lora_a, idx, gate, grad_x, tokens, d_in, ranks, num_shared, k);
  });
  // sum_outer, as in the host code: fixed splits, then an ordered sum
  auto outer = [&](const float* p, const float* q, int64_t cols, float* out) {
    const int64_t splits = std::min(kMaxSplits, (n_total + kOuterTokens - 1) / kOuterTokens);
    const int64_t per_split = (n_total + splits - 1) / splits;
    std::vector<float> partial(splits * ranks * cols);
    blockDim = {kOuterThreads, 1, 1};
    launch(cdiv(cols, kOuterThreads), cdiv(ranks, kOuterRanks), static_cast<unsigned>(splits), [&] {
      for (unsigned t = 0; t < kOuterThreads; ++t) {
        threadIdx.x = t;
        outer_partial_kernel<float>(p, q, partial.data(), n_total, ranks, cols, per_split);
      }
    });
    const int64_t numel = ranks * cols;
    blockDim = {256, 1, 1};
    launch(cdiv(numel, 256), 1, 1, [&] {
      for (unsigned t = 0; t < 256; ++t) {
        threadIdx.x = t;
        split_sum_kernel<float>(partial.data(), out, numel, splits);
      }
    });
    threadIdx.x = 0;
    blockDim = {1, 1, 1};
  };
  if (n_total > 0) {
    outer(dh.data(), x, d_in, grad_a);
    outer(hg.data(), dy, d_out, grad_bt);
  }
}

// mor::route's kernel: each warp of each block as 32 host threads.
void emu_route(const float* logits, int32_t* idx, float* gate, float* probs, int32_t* slots, int64_t rows, int n, int k,
               int num_real, int renormalize) {
  constexpr int warps = kRouteThreads / 32;
  blockDim = {kRouteThreads, 1, 1};
  std::barrier<> bar(32);
  emu_warp_barrier = &bar;
  launch(cdiv(rows, warps), 1, 1, [&] {
    for (int w = 0; w < warps; ++w) {
      std::vector<std::thread> lanes;
      for (int lane = 0; lane < 32; ++lane) {
        lanes.emplace_back([&, w, lane] {
          threadIdx.x = static_cast<unsigned>(w * 32 + lane);
          route_kernel<float>(logits, idx, gate, probs, slots, rows, n, k, num_real, renormalize != 0);
        });
      }
      for (auto& t : lanes) t.join();
    }
  });
  emu_warp_barrier = nullptr;
  blockDim = {1, 1, 1};
}

// mor::conv_up's kernel, written for full 256-thread blocks: always run with 256 host threads and real barriers.
// base and z_rank are read through their (batch, channel, pixel) strides (NCHW or channels_last); y is NCHW.
void emu_conv_up(const float* base, const float* z_rank, const float* lora_b, const int32_t* idx, const float* gate,
                 float* y, const int64_t* base_strides, const int64_t* z_strides, int64_t batch, int64_t pixels,
                 int64_t c_out, int ranks, int num_shared, int k, float scaling) {
  const PixelStrides sb{base_strides[0], base_strides[1], base_strides[2]};
  const PixelStrides sz{z_strides[0], z_strides[1], z_strides[2]};
  const PixelStrides sy{c_out * pixels, pixels, 1};
  launch_tile(cdiv(pixels, 32), cdiv(c_out, 64), [&] {
    conv_up_kernel<float>(base, z_rank, lora_b, idx, gate, y, sb, sz, sy, pixels, c_out, ranks, num_shared, k,
                          scaling);
  }, static_cast<unsigned>(batch), kThreads);
}
}
