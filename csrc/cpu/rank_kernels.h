// Hand-written AVX-512 and AVX2 kernels for the rank work of the BLAS CPU path (csrc/cpu/blas_mor_linear.cpp,
// blas_mor_conv2d.cpp), float32 only.
//
// Why: MoR's rank work is GEMMs with one dimension = the active ranks n (16 by default). MKL runs those skinny
// shapes far below its large-GEMM rate (benchmarks/README.md: 15-30 GFLOP/s with cold operands against ~150 for
// the base GEMM), and each call needs its operands gathered first. Small register-blocked loops do the same
// work closer to the FMA rate, reading the active ranks of lora_a and lora_b where they are (no gathered copy):
//   - rank_update_rows: out = c + coef @ rows, coef (m, n), rows n pointers to rows of length cols: the
//     per-sample merge W_b = W0 + (B_act diag(w)) A_act (rows = lora_a's active rows, read where they are; coef
//     from rank_coef), and a NCHW conv's up-projection y_s += (B_act diag(w)) u_s;
//   - rank_down: u = x A_act^T, dot products against lora_a's active rows in place;
//   - rank_up: y += u (B_act diag(w))^T, lora_b's active columns gathered into registers (no copy);
//   - rank_coef: B_act diag(w) itself, one vector gather per row.
// Each splits its rows over ATen's intra-op threads. They run in AVX-512F where the CPU has it, else in AVX2 with
// FMA (checked at run time; half-width vectors, smaller register blocks, rank_up through a packed copy of the
// weighted columns: rank_kernels.cpp). When the CPU has neither, or the kernels are switched off
// (cpu_rank_kernels(false), the tests' way to compare both paths), the callers use their ATen GEMMs as before:
// rank_kernels_on() says which.
#pragma once
#include <cstdint>
#include <optional>
#include <string>

namespace mor {

// Which instruction set the rank kernels run in now: the widest the CPU has (or the one cpu_rank_isa chose), kNone
// when it has neither or they are switched off.
enum class RankIsa : int { kNone = 0, kAvx2 = 1, kAvx512 = 2 };
RankIsa rank_isa();

// Whether the rank kernels run here: rank_isa() != kNone.
bool rank_kernels_on();

// torch.ops.mor.cpu_rank_kernels(enable=None) -> bool: whether they ran before the call; enable switches them on
// or off for the process (they still need AVX-512F or AVX2+FMA).
bool cpu_rank_kernels(std::optional<bool> enable);

// torch.ops.mor.cpu_rank_isa(str? isa=None) -> str: the instruction set the kernels run in before the call
// ("avx512", "avx2", or "none" when off or unsupported); isa = "avx512"/"avx2" picks one the CPU has (ValueError
// otherwise: the tests run both kernels on an AVX-512 CPU), "auto" the widest.
std::string cpu_rank_isa(std::optional<std::string> isa);

// out[r, :cols] = c[r, :cols] + sum_i coef[r * ldcoef + i] * rows[i][:cols], r < m. out may be c (in place).
void rank_update_rows(const float* c, int64_t ldc, float* out, int64_t ldo, int64_t m, int64_t cols,
                      const float* coef, int64_t ldcoef, int64_t n, const float* const* rows);

// u[t, i] = x[t, :k] . rows[i][:k] for t < m, i < n (rows: the active rows of lora_a, read in place).
void rank_down(const float* x, int64_t ldx, int64_t m, int64_t k, const float* const* rows, int64_t n, float* u,
               int64_t ldu);

// y[t, :cols] += sum_i u[t, i] w[i] b[:cols, rank[i]] for t < m, i < n (b: lora_b (cols, ldb), its columns
// gathered into registers, 16 rows at a time).
void rank_up(float* y, int64_t ldy, int64_t m, int64_t cols, const float* u, int64_t ldu, int64_t n, const float* b,
             int64_t ldb, const int64_t* rank, const float* w);

// out[o, i] = b[o, rank[i]] w[i] for o < m, i < n: lora_b's active columns, weighted (B_act diag(w)).
void rank_coef(const float* b, int64_t ldb, int64_t m, const int64_t* rank, const float* w, int64_t n, float* out,
               int64_t ldo);

}  // namespace mor
