// Operator schemas of the `mor` namespace (one place for all of them) and the module init.
//
// Kernels register per device in csrc/cpu/<op>.cpp (CPU) and csrc/cuda/<op>.cu (CUDA) with
// TORCH_LIBRARY_IMPL, so they appear as torch.ops.mor.<op>. Fake (meta) implementations for
// torch.compile live in Python, next to the backend module that uses the op.
#include <Python.h>
#include <torch/library.h>

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
}
