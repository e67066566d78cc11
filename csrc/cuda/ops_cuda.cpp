// CUDA registrations of the attrefine_fast ops: tensor checks, the current stream, and calls to
// the launchers in csrc/cuda/*.cu. Compiled only where torch was built with CUDA (setup.py), since
// the c10/cuda headers it includes are not usable from a CPU-only torch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "../op_args.h"
#include "launchers.h"

namespace attrefine_fast {
namespace {

cuda::Elem elem_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kByte: return cuda::Elem::u8;
    case at::kHalf: return cuda::Elem::f16;
    case at::kBFloat16: return cuda::Elem::bf16;
    case at::kFloat: return cuda::Elem::f32;
    case at::kDouble: return cuda::Elem::f64;
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", t.scalar_type());
  }
}

at::Tensor segment_mean_cuda(const at::Tensor& images, const at::Tensor& segments, int64_t num_segments) {
  check_segment_mean_args(images, segments, num_segments, at::kCUDA);
  const c10::cuda::CUDAGuard guard(images.device());
  const int64_t b = images.size(0), c = images.size(1), pixels = images.size(2) * images.size(3);
  const auto img = images.contiguous();
  const auto seg = segments.to(at::kInt).contiguous();
  auto sums = at::zeros({b, c, num_segments}, images.options().dtype(at::kDouble));
  auto counts = at::zeros({b, num_segments}, images.options().dtype(at::kDouble));
  if (pixels > 0 && b > 0) {
    cuda::segment_sums(img.data_ptr(), elem_of(img), seg.data_ptr<int32_t>(), b, c, pixels, num_segments,
                       sums.data_ptr<double>(), counts.data_ptr<double>(), c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto means = sums / counts.clamp_min(1).unsqueeze(1);
  return means.transpose(1, 2).contiguous().to(images.is_floating_point() ? images.scalar_type() : at::kDouble);
}

// Writes samples [offset, offset + count) of every image into out (dense, in the layout
// channels_last names); the arguments are checked by the callers, all but the segment ids' range,
// which the kernels check on the device before writing: where one is out of range nothing is
// written, and the error is raised here after the launches, from the one flag they set.
void write_samples(const at::Tensor& images, const at::Tensor& segments, const at::Tensor& masks,
                   const at::Tensor& fudge, int64_t offset, int64_t count, const std::optional<at::Tensor>& mean,
                   const std::optional<at::Tensor>& std, bool channels_last, at::Tensor& out) {
  if (out.numel() == 0) {
    check_segment_ids(segments, masks.size(2));
    return;
  }
  const int64_t b = images.size(0), c = images.size(1), pixels = images.size(2) * images.size(3);
  const int64_t n = masks.size(1), m = masks.size(2);
  TORCH_CHECK_VALUE(c * pixels < (int64_t(1) << 31), "perturb on CUDA needs fewer than 2^31 elements per image");
  const c10::cuda::CUDAGuard guard(images.device());
  // Normalization and cast commute with the choice: applied once per source (see perturb.cu),
  // which stays NCHW: the kernel gathers an NHWC output's elements from it.
  const auto kept = perturb_source(images, mean, std, out.scalar_type(), /*channels_last=*/false);
  const auto replaced = perturb_source(fudge, mean, std, out.scalar_type(), /*channels_last=*/false);
  const auto seg = segments.contiguous();  // int64 or int32, read as they are
  const auto msk = masks.contiguous();
  auto flag = at::zeros({1}, images.options().dtype(at::kInt));
  cuda::perturb_select(kept.data_ptr(), replaced.data_ptr(), seg.data_ptr(), seg.scalar_type() == at::kLong,
                       msk.data_ptr<bool>(), out.data_ptr(), out.element_size(), b, n, m, c, pixels, offset, count,
                       channels_last, flag.data_ptr<int>(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (flag.item<int>() != 0) {  // nothing was written
    check_segment_ids(segments, m);  // raises the CPU op's error, with the ids' range
    TORCH_CHECK(false, "perturb: the kernel flagged a segment id outside [0, ", m, ") that the check did not find");
  }
}

at::Tensor perturb_cuda(const at::Tensor& images, const at::Tensor& segments, const at::Tensor& masks,
                        const at::Tensor& fudge, int64_t offset, int64_t count, const std::optional<at::Tensor>& mean,
                        const std::optional<at::Tensor>& std, std::optional<at::ScalarType> out_dtype,
                        bool channels_last) {
  const auto dtype =
      check_perturb_args(images, segments, masks, fudge, offset, count, mean, std, out_dtype, at::kCUDA, /*check_ids=*/false);
  auto out = perturb_output(images, count, dtype, channels_last);
  write_samples(images, segments, masks, fudge, offset, count, mean, std, channels_last, out);
  return out;
}

void perturb_into_cuda(const at::Tensor& images, const at::Tensor& segments, const at::Tensor& masks,
                       const at::Tensor& fudge, int64_t offset, const std::optional<at::Tensor>& mean,
                       const std::optional<at::Tensor>& std, at::Tensor& out) {
  const int64_t count =
      check_perturb_into_args(images, segments, masks, fudge, offset, mean, std, out, at::kCUDA, /*check_ids=*/false);
  write_samples(images, segments, masks, fudge, offset, count, mean, std, !out.is_contiguous(), out);
  out.unsafeGetTensorImpl()->bump_version();  // written through a raw pointer
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lime_fit_cuda(const at::Tensor& masks,
                                                                          const at::Tensor& targets,
                                                                          const at::Tensor& num_segments,
                                                                          const std::optional<at::Tensor>& weights,
                                                                          double kernel_width, double alpha) {
  // The counts' range (status bit 2) and targets' values (bit 1) are checked by the kernel and
  // settled here after it, from the same device-to-host copy that reports the failed
  // factorizations: no host round trip before the launch.
  check_lime_fit_args(masks, targets, num_segments, weights, kernel_width, alpha, at::kCUDA, /*check_targets=*/false,
                      /*check_counts=*/false);
  const int64_t b = masks.size(0), n = masks.size(1), m = masks.size(2), nl = targets.size(2);
  // The block keeps at least the means (M + L float64) in shared memory (lime_fit.cu's Layout),
  // well inside the 48 KiB every device gives a block.
  TORCH_CHECK_VALUE(m + nl <= 3000, "lime_fit on CUDA supports M + L <= 3000 (segments plus labels), got ", m + nl);
  // one block per image on grid.x
  TORCH_CHECK_VALUE(b <= std::numeric_limits<int32_t>::max(), "lime_fit on CUDA supports at most 2^31 - 1 images per call, got ", b);
  const c10::cuda::CUDAGuard guard(masks.device());
  const auto msk = masks.contiguous(), tgt = targets.contiguous(), segs = num_segments.contiguous();
  const auto wts = weights.has_value() ? weights->contiguous() : at::Tensor();
  auto coef = at::empty({b, nl, m}, targets.options());
  auto intercept = at::empty({b, nl}, targets.options());
  auto score = at::empty({b, nl}, targets.options());
  auto local_pred = at::empty({b, nl}, targets.options());
  auto status = at::empty({b}, targets.options().dtype(at::kInt));  // written by the kernel
  auto scratch = at::empty({cuda::lime_fit_scratch_doubles(b, n, m, nl)}, targets.options().dtype(at::kDouble));
  cuda::lime_fit(msk.data_ptr<bool>(), tgt.data_ptr(), wts.defined() ? wts.data_ptr() : nullptr,
                 segs.data_ptr<int64_t>(), elem_of(tgt), b, n, m, nl, kernel_width, alpha, coef.data_ptr(),
                 intercept.data_ptr(), score.data_ptr(), local_pred.data_ptr(), status.data_ptr<int32_t>(),
                 scratch.data_ptr<double>(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto host_status = status.to(at::kCPU);
  const int32_t* st = host_status.data_ptr<int32_t>();
  std::vector<int64_t> singular;
  bool bad_targets = false, bad_counts = false;
  for (int64_t i = 0; i < b; ++i) {
    bad_counts |= (st[i] & 4) != 0;
    bad_targets |= (st[i] & 2) != 0;
    if (st[i] & 1) singular.push_back(i);
  }
  if (bad_counts) fail_lime_fit_counts(m);
  TORCH_CHECK_VALUE(!bad_targets || all_finite(tgt), "targets contains NaN or infinite values");
  // Singular systems (alpha = 0 with a constant column) are rare: re-solve those images with the
  // CPU kernel's least-squares path and copy them back.
  if (!singular.empty()) {
    const auto failed = at::tensor(singular, at::kLong).to(masks.device());
    auto cpu = c10::Dispatcher::singleton()
                   .findSchemaOrThrow("attrefine_fast::lime_fit", "")
                   .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                       const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                       double, double)>()
                   .call(msk.index_select(0, failed).cpu(), tgt.index_select(0, failed).cpu(),
                         segs.index_select(0, failed).cpu(),
                         wts.defined() ? std::optional<at::Tensor>(wts.index_select(0, failed).cpu()) : std::nullopt,
                         kernel_width, alpha);
    coef.index_copy_(0, failed, std::get<0>(cpu).to(coef.device()));
    intercept.index_copy_(0, failed, std::get<1>(cpu).to(coef.device()));
    score.index_copy_(0, failed, std::get<2>(cpu).to(coef.device()));
    local_pred.index_copy_(0, failed, std::get<3>(cpu).to(coef.device()));
  }
  return {coef, intercept, score, local_pred};
}

void masked_pgd_step_cuda(at::Tensor& x_adv, const at::Tensor& x, const at::Tensor& grad,
                          const std::optional<at::Tensor>& weight, double step_size, double eps, double lo, double hi,
                          c10::string_view norm) {
  // grad's values are checked by the kernels (masked_pgd_step.cu): one host round trip, after them.
  const bool linf =
      check_masked_pgd_step_args(x_adv, x, grad, weight, step_size, eps, lo, hi, norm, at::kCUDA, /*check_grad=*/false);
  const int64_t b = x_adv.size(0), c = x_adv.size(1), h = x_adv.size(2), w = x_adv.size(3);
  const at::Tensor wt = weight.has_value() ? weight->contiguous() : at::Tensor();
  TORCH_CHECK_VALUE(c * h * w < (int64_t(1) << 31), "masked_pgd_step on CUDA needs fewer than 2^31 elements per sample");
  if (x_adv.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x_adv.device());
  const auto work = dense_work(x_adv);
  const auto xc = x.contiguous(work.format), gc = grad.contiguous(work.format);
  auto flag = at::zeros({1}, x_adv.options().dtype(at::kInt));
  auto sums = linf ? at::Tensor() : at::zeros({3 * b}, x_adv.options().dtype(at::kDouble));
  cuda::masked_pgd_step(work.tensor.data_ptr(), xc.data_ptr(), gc.data_ptr(), wt.defined() ? wt.data_ptr() : nullptr,
                        elem_of(work.tensor), b, c, h * w, work.channels_last, step_size, eps, lo, hi, linf,
                        linf ? nullptr : sums.data_ptr<double>(), flag.data_ptr<int>(),
                        c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (flag.item<int>() != 0) {  // nothing was written
    TORCH_CHECK_VALUE(all_finite(grad), "grad contains NaN or infinite values");
    TORCH_CHECK_VALUE(false, "masked_pgd_step: x_adv - x contains NaN or infinite values, or a sample's squared ",
                      "gradient norm overflows float64");
  }
  finish_in_place(x_adv, work);
}

}  // namespace
}  // namespace attrefine_fast

TORCH_LIBRARY_IMPL(attrefine_fast, CUDA, m) {
  m.impl("segment_mean", &attrefine_fast::segment_mean_cuda);
  m.impl("perturb", &attrefine_fast::perturb_cuda);
  m.impl("perturb_into", &attrefine_fast::perturb_into_cuda);
  m.impl("lime_fit", &attrefine_fast::lime_fit_cuda);
  m.impl("masked_pgd_step", &attrefine_fast::masked_pgd_step_cuda);
}
