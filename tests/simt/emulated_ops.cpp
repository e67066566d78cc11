// C entry points to the CUDA launchers (csrc/cuda/launchers.h) compiled for the SIMT emulator,
// called from tests/test_cuda_emulated.py through ctypes with host pointers. Each returns 0, or
// -1 with simt_error() saying what the emulator caught.
#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launchers.h"

namespace ac = attrefine_fast::cuda;

namespace {
thread_local std::string last_error;

int finish() {
  last_error = simt::error();
  simt::error().clear();
  return last_error.empty() ? 0 : -1;
}
}  // namespace

extern "C" {

const char* simt_error() { return last_error.c_str(); }

// The emulator's float16 and bfloat16 conversions, checked against torch's by the tests.
uint16_t simt_float_to_half(float v) { return __float2half_rn(v).bits; }
float simt_half_to_float(uint16_t h) { return __half2float(__half{h}); }
uint16_t simt_float_to_bfloat16(float v) { return __float2bfloat16_rn(v).bits; }
float simt_bfloat16_to_float(uint16_t h) { return __bfloat162float(__nv_bfloat16{h}); }

void simt_set_schedule(int mode) { simt::schedule() = mode; }

void simt_set_optin_shared_bytes(int64_t bytes) { simt::optin_shared_bytes() = static_cast<std::size_t>(bytes); }

void simt_set_max_grid_y(int64_t rows) { simt::max_grid_y() = static_cast<unsigned>(rows); }

int64_t simt_lime_fit_scratch_doubles(int64_t batch, int64_t samples, int64_t segments, int64_t labels) {
  return ac::lime_fit_scratch_doubles(batch, samples, segments, labels);
}

int simt_lime_fit(const bool* masks, const void* targets, const void* weights, const int64_t* num_segments,
                  int elem, int64_t batch, int64_t samples, int64_t segments, int64_t labels, double kernel_width,
                  double alpha, void* coef, void* intercept, void* score, void* local_pred, int32_t* status,
                  double* scratch) {
  ac::lime_fit(masks, targets, weights, num_segments, static_cast<ac::Elem>(elem), batch, samples, segments, labels,
               kernel_width, alpha, coef, intercept, score, local_pred, status, scratch, nullptr);
  return finish();
}

int simt_segment_sums(const void* images, int elem, const int32_t* segments, int64_t batch, int64_t channels,
                      int64_t pixels, int64_t num_segments, double* sums, double* counts) {
  ac::segment_sums(images, static_cast<ac::Elem>(elem), segments, batch, channels, pixels, num_segments, sums, counts,
                   nullptr);
  return finish();
}

int simt_perturb_select(const void* kept, const void* replaced, const void* segments, int segments_int64,
                        const bool* masks, void* out, int64_t elem_bytes, int64_t batch, int64_t samples,
                        int64_t num_segments, int64_t channels, int64_t pixels, int64_t offset, int64_t count,
                        int channels_last, int* flag) {
  ac::perturb_select(kept, replaced, segments, segments_int64 != 0, masks, out, elem_bytes, batch, samples,
                     num_segments, channels, pixels, offset, count, channels_last != 0, flag, nullptr);
  return finish();
}

int simt_masked_pgd_step(void* x_adv, const void* x, const void* grad, const void* weight, int elem, int64_t batch,
                         int64_t channels, int64_t pixels, int channels_last, double step_size, double eps, double lo,
                         double hi, int linf, double* sums, int* flag) {
  ac::masked_pgd_step(x_adv, x, grad, weight, static_cast<ac::Elem>(elem), batch, channels, pixels, channels_last != 0,
                      step_size, eps, lo, hi, linf != 0, sums, flag, nullptr);
  return finish();
}

}  // extern "C"
