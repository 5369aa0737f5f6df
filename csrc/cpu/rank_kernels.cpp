// The AVX-512 and AVX2 rank kernels of the BLAS CPU path (see rank_kernels.h for what they compute and why).
//
// Register-blocked loops in the style of a GEMM micro-kernel (BLIS's idea: keep a block of the output in registers
// and stream the two operands past it once per block), sized for a small rank dimension:
//   - rank_update_rows keeps a 4 x 64 block of `out` in 16 zmm registers; per rank i it loads 64 columns of
//     rows[i] (4 vectors) and broadcasts 4 coefficients: 16 FMAs for 8 loads; it prefetches c and out a few
//     blocks ahead (cold weights stream from memory).
//   - rank_down keeps 4 tokens x 4 ranks of dot products in 16 registers, 16 features per step: 16 FMAs for 8
//     loads, each sum reduced across its lanes at the end.
//   - rank_up gathers 16 weighted columns of lora_b into registers per 16 output columns, then streams 8 tokens
//     at a time past them.
//   - rank_coef: one vector gather of a lora_b row's active entries per row.
// Columns past a multiple of 16 use masked loads and stores, so nothing outside a row is read or written.
#include "rank_kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MOR_RANK_AVX512 1
#define MOR_AVX512_FN __attribute__((target("avx512f")))
#define MOR_RANK_AVX2 1
#define MOR_AVX2_FN __attribute__((target("avx2,fma")))
// unrolled before GCC decides where the accumulator arrays live, so they stay in registers (else it spills them
// to the stack every iteration)
#define MOR_UNROLL _Pragma("GCC unroll 16")
#endif

namespace mor {
namespace {

std::atomic<bool> g_enabled{true};

bool cpu_has_avx512f() {
#ifdef MOR_RANK_AVX512
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
#else
  return false;
#endif
}

// Rows per parallel chunk: at least ~64k multiply-adds, so a thread's share outweighs its start.
int64_t grain(int64_t work_per_row) {
  return std::max<int64_t>(4, (int64_t{1} << 16) / std::max<int64_t>(work_per_row, 1));
}

#ifdef MOR_RANK_AVX512

MOR_AVX512_FN inline __mmask16 tail_mask(int64_t w) {
  return w >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << w) - 1u);
}

// How far ahead (floats) the merge prefetches c and out: 4 of its 64-column blocks. Prefetches never fault, so
// addresses past a row (or the tensor) are harmless.
constexpr int64_t kMergeAhead = 256;

// out[r + rr, c0 + 16 v + :16] for rr < RB, v < NV; the last vector masked by `last`.
template <int RB, int NV>
MOR_AVX512_FN inline void update_block(const float* c, int64_t ldc, float* out, int64_t ldo, int64_t r, int64_t c0,
                                       const float* coef, int64_t ldcoef, int64_t n, const float* const* rows,
                                       __mmask16 last) {
  __mmask16 mk[NV];
  MOR_UNROLL
  for (int v = 0; v < NV; ++v) mk[v] = v == NV - 1 ? last : static_cast<__mmask16>(0xFFFF);
  __m512 acc[RB * NV];
  MOR_UNROLL
  for (int rr = 0; rr < RB; ++rr) {
    MOR_UNROLL
    for (int v = 0; v < NV; ++v) acc[rr * NV + v] = _mm512_maskz_loadu_ps(mk[v], c + (r + rr) * ldc + c0 + 16 * v);
  }
  // c and out stream from and to memory when the weight is cold (a model's layers): their lines kMergeAhead floats
  // ahead are asked for now, so the misses overlap the FMAs (the hardware prefetcher alone kept one row block's
  // eight streams at ~10 GB/s; with this ~20 GB/s, merges of large weights ~2x faster: benchmarks/README.md)
  MOR_UNROLL
  for (int rr = 0; rr < RB; ++rr) {
    MOR_UNROLL
    for (int v = 0; v < NV; ++v) {
      _mm_prefetch(reinterpret_cast<const char*>(c + (r + rr) * ldc + c0 + kMergeAhead + 16 * v), _MM_HINT_T0);
      __builtin_prefetch(out + (r + rr) * ldo + c0 + kMergeAhead + 16 * v, /*rw=*/1, /*locality=*/3);
    }
  }
  const float* cf = coef + r * ldcoef;
  for (int64_t i = 0; i < n; ++i) {
    const float* src = rows[i] + c0;
    __m512 b[NV];
    MOR_UNROLL
    for (int v = 0; v < NV; ++v) b[v] = _mm512_maskz_loadu_ps(mk[v], src + 16 * v);
    MOR_UNROLL
    for (int rr = 0; rr < RB; ++rr) {
      const __m512 s = _mm512_set1_ps(cf[rr * ldcoef + i]);
      MOR_UNROLL
      for (int v = 0; v < NV; ++v) acc[rr * NV + v] = _mm512_fmadd_ps(s, b[v], acc[rr * NV + v]);
    }
  }
  MOR_UNROLL
  for (int rr = 0; rr < RB; ++rr) {
    MOR_UNROLL
    for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(out + (r + rr) * ldo + c0 + 16 * v, mk[v], acc[rr * NV + v]);
  }
}

template <int RB>
MOR_AVX512_FN inline void update_row_block(const float* c, int64_t ldc, float* out, int64_t ldo, int64_t r,
                                           int64_t cols, const float* coef, int64_t ldcoef, int64_t n,
                                           const float* const* rows) {
  for (int64_t c0 = 0; c0 < cols; c0 += 64) {
    const int64_t w = std::min<int64_t>(64, cols - c0);
    const int64_t nv = (w + 15) / 16;
    const __mmask16 last = tail_mask(w - 16 * (nv - 1));
    switch (nv) {
      case 4: update_block<RB, 4>(c, ldc, out, ldo, r, c0, coef, ldcoef, n, rows, last); break;
      case 3: update_block<RB, 3>(c, ldc, out, ldo, r, c0, coef, ldcoef, n, rows, last); break;
      case 2: update_block<RB, 2>(c, ldc, out, ldo, r, c0, coef, ldcoef, n, rows, last); break;
      default: update_block<RB, 1>(c, ldc, out, ldo, r, c0, coef, ldcoef, n, rows, last); break;
    }
  }
}

// Rows [r0, r1), 4 at a time, each block across all columns: c and out stream through once, in order; the n rows
// stay in L1 or L2 (n x cols floats).
MOR_AVX512_FN void update_rows_avx512(const float* c, int64_t ldc, float* out, int64_t ldo, int64_t r0, int64_t r1,
                                      int64_t cols, const float* coef, int64_t ldcoef, int64_t n,
                                      const float* const* rows) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) update_row_block<4>(c, ldc, out, ldo, r, cols, coef, ldcoef, n, rows);
  for (; r < r1; ++r) update_row_block<1>(c, ldc, out, ldo, r, cols, coef, ldcoef, n, rows);
}

// u[t + tt, i0 + ii] = x[t + tt, :k] . rows[i0 + ii][:k] for tt < TB, ii < IB: TB x IB dot products side by side,
// 16 features per step (the last step masked), each reduced across its lanes at the end.
template <int TB, int IB>
MOR_AVX512_FN inline void down_block(const float* x, int64_t ldx, int64_t t, int64_t k, const float* const* rows,
                                     int64_t i0, float* u, int64_t ldu) {
  __m512 acc[TB * IB];
  MOR_UNROLL
  for (int q = 0; q < TB * IB; ++q) acc[q] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; kk += 16) {
    const __mmask16 mk = tail_mask(k - kk);
    __m512 xv[TB];
    MOR_UNROLL
    for (int tt = 0; tt < TB; ++tt) xv[tt] = _mm512_maskz_loadu_ps(mk, x + (t + tt) * ldx + kk);
    MOR_UNROLL
    for (int ii = 0; ii < IB; ++ii) {
      const __m512 a = _mm512_maskz_loadu_ps(mk, rows[i0 + ii] + kk);
      MOR_UNROLL
      for (int tt = 0; tt < TB; ++tt) acc[tt * IB + ii] = _mm512_fmadd_ps(xv[tt], a, acc[tt * IB + ii]);
    }
  }
  MOR_UNROLL
  for (int tt = 0; tt < TB; ++tt) {
    MOR_UNROLL
    for (int ii = 0; ii < IB; ++ii) u[(t + tt) * ldu + i0 + ii] = _mm512_reduce_add_ps(acc[tt * IB + ii]);
  }
}

MOR_AVX512_FN void down_avx512(const float* x, int64_t ldx, int64_t t0, int64_t t1, int64_t k,
                               const float* const* rows, int64_t n, float* u, int64_t ldu) {
  int64_t t = t0;
  for (; t + 4 <= t1; t += 4) {  // 4 tokens' rows of x stay in L1 across the ranks
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) down_block<4, 4>(x, ldx, t, k, rows, i, u, ldu);
    for (; i < n; ++i) down_block<4, 1>(x, ldx, t, k, rows, i, u, ldu);
  }
  for (; t < t1; ++t) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) down_block<1, 4>(x, ldx, t, k, rows, i, u, ldu);
    for (; i < n; ++i) down_block<1, 1>(x, ldx, t, k, rows, i, u, ldu);
  }
}

// Column offsets j * ldb of 16 consecutive rows of a (.., ldb) matrix, as gather indices.
MOR_AVX512_FN inline __m512i row_offsets(int64_t ldb) {
  return _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                            _mm512_set1_epi32(static_cast<int32_t>(ldb)));
}

// y[t, c0 + :16] += sum_{i < NN} u[t, i] w[i] b[c0 + :16, rank[i]] for t in [t0, t1): the NN columns of b, weighted,
// gathered into registers once (16 rows each), then 8 tokens at a time.
template <int NN>
MOR_AVX512_FN void up_chunk(float* y, int64_t ldy, int64_t t0, int64_t t1, int64_t c0, __mmask16 mk, const float* u,
                            int64_t ldu, const float* b, int64_t ldb, const int64_t* rank, const float* w) {
  const __m512i offsets = row_offsets(ldb);
  __m512 bv[NN];
  MOR_UNROLL
  for (int i = 0; i < NN; ++i) {
    const __m512 col = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mk, offsets, b + c0 * ldb + rank[i], 4);
    bv[i] = _mm512_mul_ps(col, _mm512_set1_ps(w[i]));
  }
  int64_t t = t0;
  for (; t + 8 <= t1; t += 8) {
    __m512 acc[8];
    MOR_UNROLL
    for (int tt = 0; tt < 8; ++tt) acc[tt] = _mm512_maskz_loadu_ps(mk, y + (t + tt) * ldy + c0);
    MOR_UNROLL
    for (int i = 0; i < NN; ++i) {
      MOR_UNROLL
      for (int tt = 0; tt < 8; ++tt) acc[tt] = _mm512_fmadd_ps(_mm512_set1_ps(u[(t + tt) * ldu + i]), bv[i], acc[tt]);
    }
    MOR_UNROLL
    for (int tt = 0; tt < 8; ++tt) _mm512_mask_storeu_ps(y + (t + tt) * ldy + c0, mk, acc[tt]);
  }
  for (; t < t1; ++t) {
    __m512 acc = _mm512_maskz_loadu_ps(mk, y + t * ldy + c0);
    MOR_UNROLL
    for (int i = 0; i < NN; ++i) acc = _mm512_fmadd_ps(_mm512_set1_ps(u[t * ldu + i]), bv[i], acc);
    _mm512_mask_storeu_ps(y + t * ldy + c0, mk, acc);
  }
}

using UpChunk = void (*)(float*, int64_t, int64_t, int64_t, int64_t, __mmask16, const float*, int64_t, const float*,
                         int64_t, const int64_t*, const float*);

template <int... N>
constexpr std::array<UpChunk, sizeof...(N)> up_chunks(std::integer_sequence<int, N...>) {
  return {&up_chunk<N + 1>...};
}

// Ranks in groups of 16 (16 gathered columns in registers), each group a pass over y.
MOR_AVX512_FN void up_avx512(float* y, int64_t ldy, int64_t t0, int64_t t1, int64_t cols, const float* u, int64_t ldu,
                             int64_t n, const float* b, int64_t ldb, const int64_t* rank, const float* w) {
  static constexpr auto chunks = up_chunks(std::make_integer_sequence<int, 16>{});
  for (int64_t g = 0; g < n; g += 16) {
    const UpChunk chunk = chunks[std::min<int64_t>(16, n - g) - 1];
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      chunk(y, ldy, t0, t1, c0, tail_mask(cols - c0), u + g, ldu, b, ldb, rank + g, w + g);
    }
  }
}

// out[o, :n] = b[o, rank[:n]] * w[:n] for o in [o0, o1): one gather per row and 16 ranks.
MOR_AVX512_FN void coef_avx512(const float* b, int64_t ldb, int64_t o0, int64_t o1, const int64_t* rank,
                               const float* w, int64_t n, float* out, int64_t ldo) {
  for (int64_t g = 0; g < n; g += 16) {
    const __mmask16 mk = tail_mask(n - g);
    alignas(64) int32_t idx[16] = {};
    for (int64_t i = g; i < std::min<int64_t>(n, g + 16); ++i) idx[i - g] = static_cast<int32_t>(rank[i]);
    const __m512i vi = _mm512_load_si512(idx);
    const __m512 wv = _mm512_maskz_loadu_ps(mk, w + g);
    for (int64_t o = o0; o < o1; ++o) {
      const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mk, vi, b + o * ldb, 4);
      _mm512_mask_storeu_ps(out + o * ldo + g, mk, _mm512_mul_ps(v, wv));
    }
  }
}

#endif  // MOR_RANK_AVX512

#ifdef MOR_RANK_AVX2

// ---- AVX2 + FMA: 8 floats per vector, 16 registers (CPUs without AVX-512F: AMD Zen 2/3, Intel client cores).
// The same loops with half-width vectors and smaller register blocks; full vectors load and store plainly, only a
// row's last partial vector is masked (AVX2's masked stores are slow on some cores). rank_up packs the active
// columns of lora_b, weighted, into a (n, cols) buffer first (AVX2's gathers are slow and 16 gathered 8-wide
// columns would not fit the 16 registers) and is then rank_update_rows on y in place.

MOR_AVX2_FN inline __m256i lane_mask8(int64_t w) {  // lanes < w (w in 1..8)
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(std::min<int64_t>(w, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

template <bool Full>
MOR_AVX2_FN inline __m256 load8(const float* p, __m256i mk) {
  if constexpr (Full) {
    return _mm256_loadu_ps(p);
  } else {
    return _mm256_maskload_ps(p, mk);
  }
}

template <bool Full>
MOR_AVX2_FN inline void store8(float* p, __m256i mk, __m256 v) {
  if constexpr (Full) {
    _mm256_storeu_ps(p, v);
  } else {
    _mm256_maskstore_ps(p, mk, v);
  }
}

MOR_AVX2_FN inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// out[r + rr, c0 + 8 v + :8] for rr < RB, v < NV: RB x NV accumulators (8 at most), NV rank vectors and one
// broadcast in the 16 registers; the last vector is masked by `last` unless LastFull.
template <int RB, int NV, bool LastFull>
MOR_AVX2_FN inline void update_block8(const float* c, int64_t ldc, float* out, int64_t ldo, int64_t r, int64_t c0,
                                      const float* coef, int64_t ldcoef, int64_t n, const float* const* rows,
                                      __m256i last) {
  __m256 acc[RB * NV];
  MOR_UNROLL
  for (int rr = 0; rr < RB; ++rr) {
    const float* src = c + (r + rr) * ldc + c0;
    MOR_UNROLL
    for (int v = 0; v < NV - 1; ++v) acc[rr * NV + v] = _mm256_loadu_ps(src + 8 * v);
    acc[rr * NV + NV - 1] = load8<LastFull>(src + 8 * (NV - 1), last);
    // cold weights stream from memory: ask for the lines kMergeAhead floats ahead now (see update_block)
    _mm_prefetch(reinterpret_cast<const char*>(src + kMergeAhead), _MM_HINT_T0);
    __builtin_prefetch(out + (r + rr) * ldo + c0 + kMergeAhead, /*rw=*/1, /*locality=*/3);
  }
  const float* cf = coef + r * ldcoef;
  for (int64_t i = 0; i < n; ++i) {
    const float* src = rows[i] + c0;
    __m256 b[NV];
    MOR_UNROLL
    for (int v = 0; v < NV - 1; ++v) b[v] = _mm256_loadu_ps(src + 8 * v);
    b[NV - 1] = load8<LastFull>(src + 8 * (NV - 1), last);
    MOR_UNROLL
    for (int rr = 0; rr < RB; ++rr) {
      const __m256 s = _mm256_broadcast_ss(cf + rr * ldcoef + i);
      MOR_UNROLL
      for (int v = 0; v < NV; ++v) acc[rr * NV + v] = _mm256_fmadd_ps(s, b[v], acc[rr * NV + v]);
    }
  }
  MOR_UNROLL
  for (int rr = 0; rr < RB; ++rr) {
    float* dst = out + (r + rr) * ldo + c0;
    MOR_UNROLL
    for (int v = 0; v < NV - 1; ++v) _mm256_storeu_ps(dst + 8 * v, acc[rr * NV + v]);
    store8<LastFull>(dst + 8 * (NV - 1), last, acc[rr * NV + NV - 1]);
  }
}

// Rows [r0, r1), RB at a time (then one), across all columns 16 at a time: as update_rows_avx512.
template <int RB>
MOR_AVX2_FN void update_row_block8(const float* c, int64_t ldc, float* out, int64_t ldo, int64_t r, int64_t cols,
                                   const float* coef, int64_t ldcoef, int64_t n, const float* const* rows) {
  const __m256i none = _mm256_setzero_si256();
  int64_t c0 = 0;
  for (; c0 + 16 <= cols; c0 += 16) update_block8<RB, 2, true>(c, ldc, out, ldo, r, c0, coef, ldcoef, n, rows, none);
  const int64_t w = cols - c0;
  if (w == 8) {
    update_block8<RB, 1, true>(c, ldc, out, ldo, r, c0, coef, ldcoef, n, rows, none);
  } else if (w > 8) {
    update_block8<RB, 2, false>(c, ldc, out, ldo, r, c0, coef, ldcoef, n, rows, lane_mask8(w - 8));
  } else if (w > 0) {
    update_block8<RB, 1, false>(c, ldc, out, ldo, r, c0, coef, ldcoef, n, rows, lane_mask8(w));
  }
}

MOR_AVX2_FN void update_rows_avx2(const float* c, int64_t ldc, float* out, int64_t ldo, int64_t r0, int64_t r1,
                                  int64_t cols, const float* coef, int64_t ldcoef, int64_t n,
                                  const float* const* rows) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) update_row_block8<4>(c, ldc, out, ldo, r, cols, coef, ldcoef, n, rows);
  for (; r < r1; ++r) update_row_block8<1>(c, ldc, out, ldo, r, cols, coef, ldcoef, n, rows);
}

// One step of down_block8: features [kk, kk + 8) of TB tokens against IB ranks.
template <int TB, int IB, bool Full>
MOR_AVX2_FN __attribute__((always_inline)) inline void down_step8(const float* x, int64_t ldx, int64_t t, int64_t kk,
                                                                 const float* const* rows, int64_t i0, __m256i mk,
                                                                 __m256 (&acc)[TB * IB]) {
  __m256 xv[TB];
  MOR_UNROLL
  for (int tt = 0; tt < TB; ++tt) xv[tt] = load8<Full>(x + (t + tt) * ldx + kk, mk);
  MOR_UNROLL
  for (int ii = 0; ii < IB; ++ii) {
    const __m256 a = load8<Full>(rows[i0 + ii] + kk, mk);
    MOR_UNROLL
    for (int tt = 0; tt < TB; ++tt) acc[tt * IB + ii] = _mm256_fmadd_ps(xv[tt], a, acc[tt * IB + ii]);
  }
}

// u[t + tt, i0 + ii] for tt < TB, ii < IB: TB x IB dot products (8 accumulators at most), 8 features per step, the
// last partial step masked.
template <int TB, int IB>
MOR_AVX2_FN inline void down_block8(const float* x, int64_t ldx, int64_t t, int64_t k, const float* const* rows,
                                    int64_t i0, float* u, int64_t ldu) {
  __m256 acc[TB * IB];
  MOR_UNROLL
  for (int q = 0; q < TB * IB; ++q) acc[q] = _mm256_setzero_ps();
  int64_t kk = 0;
  for (; kk + 8 <= k; kk += 8) down_step8<TB, IB, true>(x, ldx, t, kk, rows, i0, _mm256_setzero_si256(), acc);
  if (kk < k) down_step8<TB, IB, false>(x, ldx, t, kk, rows, i0, lane_mask8(k - kk), acc);
  MOR_UNROLL
  for (int tt = 0; tt < TB; ++tt) {
    MOR_UNROLL
    for (int ii = 0; ii < IB; ++ii) u[(t + tt) * ldu + i0 + ii] = hsum8(acc[tt * IB + ii]);
  }
}

MOR_AVX2_FN void down_avx2(const float* x, int64_t ldx, int64_t t0, int64_t t1, int64_t k, const float* const* rows,
                           int64_t n, float* u, int64_t ldu) {
  int64_t t = t0;
  for (; t + 4 <= t1; t += 4) {  // 4 tokens' rows of x stay in L1 across the ranks
    int64_t i = 0;
    for (; i + 2 <= n; i += 2) down_block8<4, 2>(x, ldx, t, k, rows, i, u, ldu);
    for (; i < n; ++i) down_block8<4, 1>(x, ldx, t, k, rows, i, u, ldu);
  }
  for (; t < t1; ++t) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) down_block8<1, 4>(x, ldx, t, k, rows, i, u, ldu);
    for (; i < n; ++i) down_block8<1, 1>(x, ldx, t, k, rows, i, u, ldu);
  }
}

#endif  // MOR_RANK_AVX2

// out[o, i] = b[o, rank[i]] w[i] for o in [o0, o1) (a scalar gather: the compiler's loop is as fast as AVX2's
// gathers here).
void coef_scalar(const float* b, int64_t ldb, int64_t o0, int64_t o1, const int64_t* rank, const float* w, int64_t n,
                 float* out, int64_t ldo) {
  for (int64_t o = o0; o < o1; ++o) {
    const float* row = b + o * ldb;
    for (int64_t i = 0; i < n; ++i) out[o * ldo + i] = row[rank[i]] * w[i];
  }
}

bool cpu_has_avx2_fma() {
#ifdef MOR_RANK_AVX2
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

bool supported(RankIsa isa) {
  switch (isa) {
    case RankIsa::kAvx512: return cpu_has_avx512f();
    case RankIsa::kAvx2: return cpu_has_avx2_fma();
    default: return true;
  }
}

// The widest the CPU has; g_isa names another one after cpu_rank_isa(...) asked for it.
RankIsa best_isa() {
  if (cpu_has_avx512f()) return RankIsa::kAvx512;
  return cpu_has_avx2_fma() ? RankIsa::kAvx2 : RankIsa::kNone;
}

std::atomic<int> g_isa{-1};  // -1: best_isa()

const char* isa_name(RankIsa isa) {
  switch (isa) {
    case RankIsa::kAvx512: return "avx512";
    case RankIsa::kAvx2: return "avx2";
    default: return "none";
  }
}

// The ISA the kernels run in now; fails when there is none (callers check rank_kernels_on() first).
RankIsa running(const char* what) {
  const RankIsa isa = rank_isa();
  TORCH_CHECK(isa != RankIsa::kNone, "mor: ", what, " needs AVX-512F or AVX2+FMA and the rank kernels on (callers ",
              "check rank_kernels_on())");
  return isa;
}

}  // namespace

RankIsa rank_isa() {
  if (!g_enabled.load(std::memory_order_relaxed)) return RankIsa::kNone;
  const int chosen = g_isa.load(std::memory_order_relaxed);
  return chosen < 0 ? best_isa() : static_cast<RankIsa>(chosen);
}

bool rank_kernels_on() { return rank_isa() != RankIsa::kNone; }

bool cpu_rank_kernels(std::optional<bool> enable) {
  const bool before = rank_kernels_on();
  if (enable.has_value()) g_enabled.store(*enable, std::memory_order_relaxed);
  return before;
}

std::string cpu_rank_isa(std::optional<std::string> isa) {
  const std::string before = isa_name(rank_isa());
  if (!isa.has_value()) return before;
  if (*isa == "auto") {
    g_isa.store(-1, std::memory_order_relaxed);
    return before;
  }
  const RankIsa want = *isa == "avx512" ? RankIsa::kAvx512 : *isa == "avx2" ? RankIsa::kAvx2 : RankIsa::kNone;
  TORCH_CHECK_VALUE(want != RankIsa::kNone, "mor::cpu_rank_isa: isa must be 'auto', 'avx512' or 'avx2', got '", *isa,
                    "'");
  TORCH_CHECK_VALUE(supported(want), "mor::cpu_rank_isa: this CPU cannot run isa='", *isa, "' (",
                    want == RankIsa::kAvx512 ? "no AVX-512F" : "no AVX2 with FMA", ")");
  g_isa.store(static_cast<int>(want), std::memory_order_relaxed);
  return before;
}

void rank_update_rows(const float* c, int64_t ldc, float* out, int64_t ldo, int64_t m, int64_t cols,
                      const float* coef, int64_t ldcoef, int64_t n, const float* const* rows) {
  const RankIsa isa = running("rank_update_rows");
  at::parallel_for(0, m, grain(cols * n), [&](int64_t r0, int64_t r1) {
#if defined(MOR_RANK_AVX512) && defined(MOR_RANK_AVX2)
    if (isa == RankIsa::kAvx512) {
      update_rows_avx512(c, ldc, out, ldo, r0, r1, cols, coef, ldcoef, n, rows);
    } else {
      update_rows_avx2(c, ldc, out, ldo, r0, r1, cols, coef, ldcoef, n, rows);
    }
#endif
  });
}

void rank_down(const float* x, int64_t ldx, int64_t m, int64_t k, const float* const* rows, int64_t n, float* u,
               int64_t ldu) {
  const RankIsa isa = running("rank_down");
  at::parallel_for(0, m, grain(k * n), [&](int64_t t0, int64_t t1) {
#if defined(MOR_RANK_AVX512) && defined(MOR_RANK_AVX2)
    if (isa == RankIsa::kAvx512) {
      down_avx512(x, ldx, t0, t1, k, rows, n, u, ldu);
    } else {
      down_avx2(x, ldx, t0, t1, k, rows, n, u, ldu);
    }
#endif
  });
}

void rank_up(float* y, int64_t ldy, int64_t m, int64_t cols, const float* u, int64_t ldu, int64_t n, const float* b,
             int64_t ldb, const int64_t* rank, const float* w) {
  const RankIsa isa = running("rank_up");
#ifdef MOR_RANK_AVX512
  if (isa == RankIsa::kAvx512) {
    at::parallel_for(0, m, grain(cols * n), [&](int64_t t0, int64_t t1) {
      up_avx512(y, ldy, t0, t1, cols, u, ldu, n, b, ldb, rank, w);
    });
    return;
  }
#endif
  // AVX2: B_act diag(w) transposed into an (n, cols) buffer (its rows are the update's `rows`), then y += u that
  std::unique_ptr<float[]> packed(new float[n * cols]);
  float* p = packed.get();
  at::parallel_for(0, cols, grain(4 * n), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const float* row = b + c * ldb;
      for (int64_t i = 0; i < n; ++i) p[i * cols + c] = row[rank[i]] * w[i];
    }
  });
  std::vector<const float*> rows(n);
  for (int64_t i = 0; i < n; ++i) rows[i] = p + i * cols;
  rank_update_rows(y, ldy, y, ldy, m, cols, u, ldu, n, rows.data());
}

void rank_coef(const float* b, int64_t ldb, int64_t m, const int64_t* rank, const float* w, int64_t n, float* out,
               int64_t ldo) {
  const RankIsa isa = running("rank_coef");
  at::parallel_for(0, m, grain(4 * n), [&](int64_t o0, int64_t o1) {
#ifdef MOR_RANK_AVX512
    if (isa == RankIsa::kAvx512) {
      coef_avx512(b, ldb, o0, o1, rank, w, n, out, ldo);
      return;
    }
#endif
    coef_scalar(b, ldb, o0, o1, rank, w, n, out, ldo);
  });
}

}  // namespace mor
