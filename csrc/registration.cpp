// Operator schemas of the `mor` namespace (one place for all of them) and the module init.
//
// Kernels register per device in csrc/cpu/<op>.cpp (CPU) and csrc/cuda/<op>.cu (CUDA) with
// TORCH_LIBRARY_IMPL, so they appear as torch.ops.mor.<op>. Fake (meta) implementations for
// torch.compile live in Python, next to the backend module that uses the op.
#include <Python.h>
#include <torch/library.h>

#include "cpu/rank_kernels.h"

extern "C" {
// `import mor_kernels._C` only has to run the static registrations below; no Python bindings.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(mor, m) {
  // Dense per-rank gate g (..., R) from compact routing (idx, gate) (..., k), MOR_SPEC 2.1:
  // 1 for the shared ranks, the summed gates of the slots that picked each routed rank.
  m.def("dense_gate(Tensor idx, Tensor gate, int num_shared, int num_ranks) -> Tensor");

  // Routing, MOR_SPEC 2.1: logits (..., E+Z) -> idx int32 (..., k) (-1 = zero slot), gate float32 (..., k),
  // probs float32 (..., E+Z) and slots int32 (..., k), the selected slot numbers (zero slots included),
  // which the backward needs.
  m.def("route(Tensor logits, int top_k, int num_zero, bool renormalize) -> (Tensor idx, Tensor gate, "
        "Tensor probs, Tensor slots)");

  // MoR low-rank path, MOR_SPEC 2.2: y = base + scaling * B (g * (A x)) for x (B, T, d_in), lora_a (R, d_in),
  // lora_b (d_out, R), idx int32 / gate float32 (B, k) (sample routing) or (B, T, k) (token routing).
  // Returns y (B, T, d_out) in x's dtype and h (B, T, R) float32 = A x at the unit's active ranks (shared and
  // selected), which lora_bwd needs; h is zero at inactive ranks with sample routing. With store_h false (no
  // backward will run) h is not written: an empty (0,) tensor.
  m.def("lora_fwd(Tensor x, Tensor lora_a, Tensor lora_b, Tensor idx, Tensor gate, int num_shared, "
        "float scaling, Tensor? base, bool store_h=True) -> (Tensor y, Tensor h)");

  // Backward of lora_fwd. output_mask = which of (grad_x, grad_lora_a, grad_lora_b, grad_gate) to compute;
  // a gradient not asked for comes back as an empty (0,) tensor. Deterministic (no atomics).
  m.def("lora_bwd(Tensor grad_y, Tensor x, Tensor lora_a, Tensor lora_b, Tensor idx, Tensor gate, Tensor h, "
        "int num_shared, float scaling, bool[4] output_mask) -> (Tensor grad_x, Tensor grad_lora_a, "
        "Tensor grad_lora_b, Tensor grad_gate)");

  // MoR convolution epilogue: base (B, C_out, H, W) = conv(x, weight) (+ bias), z_rank (B, R, H, W) =
  // conv(x, lora_a); returns base + scaling * B (g * z_rank) (B, C_out, H, W), contiguous. Sample routing: idx
  // int32 / gate float32 (B, k).
  m.def("conv_up(Tensor base, Tensor z_rank, Tensor lora_b, Tensor idx, Tensor gate, int num_shared, "
        "float scaling) -> Tensor");

  // The BLAS CPU path (csrc/cpu/blas_mor_linear.cpp, blas_mor_conv2d.cpp; backend "blas"): sample routing,
  // idx int32/int64 / gate float (B, k), read on the host; x, weight, bias, lora_a, lora_b of one float dtype
  // (16-bit computed in float32). The public ops are CompositeImplicitAutograd: without a gradient they run the
  // _fwd op (per-sample merged weights when rho = T (C_in + C_out) / (C_in kh kw C_out) > merge_above: inf never,
  // -1 always), with one a C++ autograd Function over _fwd (store_u: u = A_act x, (B, T, S + k) for a Linear,
  // (B, S + k, H_out, W_out) for a conv, zero past each sample's active ranks) and _bwd (output_mask: grads of
  // x, weight, bias, lora_a, lora_b, gate; one not asked for is an empty (0,) tensor). check_indices: idx values
  // outside [-1, E) raise ValueError (else they are zero slots).
  m.def("blas_mor_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor idx, "
        "Tensor gate, int num_shared, float scaling, float merge_above, bool check_indices) -> Tensor");
  m.def("blas_mor_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor idx, "
        "Tensor gate, int num_shared, float scaling, float merge_above, bool check_indices, bool store_u) -> "
        "(Tensor y, Tensor u)");
  m.def("blas_mor_linear_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor idx, "
        "Tensor gate, Tensor u, int num_shared, float scaling, bool[6] output_mask) -> (Tensor grad_x, "
        "Tensor grad_weight, Tensor grad_bias, Tensor grad_lora_a, Tensor grad_lora_b, Tensor grad_gate)");
  m.def("blas_mor_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor idx, "
        "Tensor gate, int num_shared, float scaling, int[2] stride, int[2] padding, int[2] dilation, "
        "float merge_above, bool check_indices) -> Tensor");
  m.def("blas_mor_conv2d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor idx, "
        "Tensor gate, int num_shared, float scaling, int[2] stride, int[2] padding, int[2] dilation, "
        "float merge_above, bool check_indices, bool store_u) -> (Tensor y, Tensor u)");
  m.def("blas_mor_conv2d_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor idx, "
        "Tensor gate, Tensor u, int num_shared, float scaling, int[2] stride, int[2] padding, int[2] dilation, "
        "bool[6] output_mask) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_lora_a, "
        "Tensor grad_lora_b, Tensor grad_gate)");
  // W0 + scaling B_act diag(g) A_act per distinct routing of idx/gate (B, k) on the host: (D, *weight.shape), D = 1
  // when every sample routes alike, else B; Linear or conv weights; in float32 for 16-bit inputs. The per-image
  // merged weights of mor_model.inference (csrc/cpu/blas_mor_linear.cpp).
  m.def("blas_merged_weights(Tensor weight, Tensor lora_a, Tensor lora_b, Tensor idx, Tensor gate, int num_shared, "
        "float scaling) -> Tensor");
  // Whether the BLAS path's float32 rank work runs in the rank kernels (csrc/cpu/rank_kernels.h: AVX-512F or
  // AVX2+FMA) before this call; enable=True/False switches them on/off for the process (the tests compare both paths).
  m.def("cpu_rank_kernels(bool? enable=None) -> bool", &mor::cpu_rank_kernels);
  // The instruction set the rank kernels run in before this call ("avx512", "avx2", "none"); isa="avx512"/"avx2"
  // picks one the CPU has, "auto" the widest (the tests run both where the CPU has AVX-512F).
  m.def("cpu_rank_isa(str? isa=None) -> str", &mor::cpu_rank_isa);
}
