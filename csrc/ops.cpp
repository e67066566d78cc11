// Schemas of the attrefine_fast ops: each op is defined once here; the CPU (csrc/cpu), CUDA
// (csrc/cuda) and Triton (kernels/) implementations register against these names.
// Shapes and semantics are documented on the pure-PyTorch references in attrefine_fast/ops/.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/cpu_features.h"

extern "C" {
// Importing attrefine_fast._C loads this library and runs the static registrations below; the
// module itself is empty (no pybind11).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {

// The instruction sets the CPU kernels with more than one compilation run with in this process
// (cpu_features.h), for `python -m attrefine_fast.info`.
std::string cpu_kernels() {
  const std::string base = ATTREFINE_X86_KERNELS ? "x86-64 baseline" : "portable";
  return "lime_fit: " + (attrefine_fast::cpu_runs_avx2_fma() ? std::string("AVX2+FMA") : base) +
         "; masked_pgd_step in float16/bfloat16: " + (attrefine_fast::cpu_runs_avx2_f16c() ? std::string("AVX2+F16C") : base);
}

}  // namespace

TORCH_LIBRARY(attrefine_fast, m) {
  // images (B,C,H,W), segments (B,H,W) int64 in [0, num_segments) -> (B, num_segments, C)
  m.def("segment_mean(Tensor images, Tensor segments, SymInt num_segments) -> Tensor");
  // samples [offset, offset+count) of every image -> (B*count, C, H, W), optionally normalized,
  // cast and channels-last
  m.def(
      "perturb(Tensor images, Tensor segments, Tensor masks, Tensor fudge, SymInt offset, SymInt count, "
      "Tensor? mean, Tensor? std, ScalarType? out_dtype, bool channels_last) -> Tensor");
  // perturb written into out (B*count, C, H, W): count, dtype and layout (contiguous or
  // channels-last) are out's
  m.def(
      "perturb_into(Tensor images, Tensor segments, Tensor masks, Tensor fudge, SymInt offset, Tensor? mean, "
      "Tensor? std, Tensor(a!) out) -> ()");
  // masks (B,N,M), targets (B,N,L) -> coef (B,L,M), intercept (B,L), score (B,L), local_pred (B,L)
  m.def(
      "lime_fit(Tensor masks, Tensor targets, Tensor num_segments, Tensor? weights, float kernel_width, "
      "float alpha) -> (Tensor, Tensor, Tensor, Tensor)");
  // in place on x_adv (B,C,H,W); weight (B,H,W) broadcast over channels; norm "linf" or "l2"
  m.def(
      "masked_pgd_step(Tensor(a!) x_adv, Tensor x, Tensor grad, Tensor? weight, float step_size, "
      "float eps, float lo, float hi, str norm) -> ()");
  // no tensors: which compilation of the CPU kernels runs here (see cpu_kernels above)
  m.def("cpu_kernels() -> str", &cpu_kernels);
}
