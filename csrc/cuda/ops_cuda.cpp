// CUDA registrations of the attrefine_fast ops: tensor checks, the current stream, and calls to
// the launchers in csrc/cuda/*.cu. Compiled only where torch was built with CUDA (setup.py), since
// the c10/cuda headers it includes are not usable from a CPU-only torch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../cpu/tensor_checks.h"
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
  check_segments_shape(images, segments);
  check_dtype_in(images, "images", kImageDtypes);
  check_device_type(images, "images", at::kCUDA);
  check_segment_ids(segments, num_segments);
  const c10::cuda::CUDAGuard guard(images.device());
  const int64_t b = images.size(0), c = images.size(1), pixels = images.size(2) * images.size(3);
  const auto img = images.contiguous();
  const auto seg = segments.to(at::kInt).contiguous();
  auto sums = at::zeros({b, c, num_segments}, images.options().dtype(at::kDouble));
  auto counts = at::zeros({b, num_segments}, images.options().dtype(at::kDouble));
  if (pixels > 0) {
    cuda::segment_sums(img.data_ptr(), elem_of(img), seg.data_ptr<int32_t>(), b, c, pixels, num_segments,
                       sums.data_ptr<double>(), counts.data_ptr<double>(), c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto means = sums / counts.clamp_min(1).unsqueeze(1);
  return means.transpose(1, 2).contiguous().to(images.is_floating_point() ? images.scalar_type() : at::kDouble);
}

at::Tensor perturb_cuda(const at::Tensor& images, const at::Tensor& segments, const at::Tensor& masks,
                        const at::Tensor& fudge, int64_t offset, int64_t count, const std::optional<at::Tensor>& mean,
                        const std::optional<at::Tensor>& std, std::optional<at::ScalarType> out_dtype,
                        bool channels_last) {
  check_segments_shape(images, segments);
  check_dtype_in(images, "images", kImageDtypes);
  check_device_type(images, "images", at::kCUDA);
  check_dim(masks, "masks", 3, "(B, N, M)");
  check_dtype_in(masks, "masks", {at::kBool});
  check_same_device(images, "images", masks, "masks");
  check_same_device(images, "images", fudge, "fudge");
  const int64_t b = images.size(0), c = images.size(1), h = images.size(2), w = images.size(3);
  TORCH_CHECK_VALUE(masks.size(0) == b && masks.size(2) >= 1, "masks must have shape (B, N, M) with B=", b, ", got ",
                    shape_of(masks));
  TORCH_CHECK_VALUE(fudge.sizes() == images.sizes() && fudge.scalar_type() == images.scalar_type(),
                    "fudge must match images in shape and dtype");
  const int64_t n = masks.size(1), m = masks.size(2);
  TORCH_CHECK_VALUE(offset >= 0 && count >= 1 && offset + count <= n, "samples [offset, offset+count) = [", offset,
                    ", ", offset + count, ") are outside 0..", n);
  TORCH_CHECK_VALUE(mean.has_value() == std.has_value(), "give both mean and std, or neither");
  const bool normalized = mean.has_value();
  if (normalized) {
    for (const auto* t : {&*mean, &*std}) {
      const char* name = t == &*mean ? "mean" : "std";
      check_dim(*t, name, 1, "(C,)");
      check_dtype_in(*t, name, kFloatDtypes);
      check_same_device(images, "images", *t, name);
      TORCH_CHECK_VALUE(t->size(0) == c, name, " must have one value per channel (", c, ")");
    }
  }
  const auto dtype = out_dtype.has_value()                        ? *out_dtype
                     : (normalized && !images.is_floating_point()) ? at::kFloat
                                                                   : images.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble ||
                       dtype == at::kByte,
                   "out_dtype must be a float dtype or uint8, got ", dtype);
  check_segment_ids(segments, m);
  const c10::cuda::CUDAGuard guard(images.device());
  // Normalization and cast commute with the choice: applied once per source (see perturb.cu).
  const auto prepare = [&](const at::Tensor& src) {
    at::Tensor v = src;
    if (normalized) {
      const auto compute = images.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
      v = (v.to(compute) - mean->to(compute).view({1, c, 1, 1})) / std->to(compute).view({1, c, 1, 1});
    }
    v = v.to(dtype);
    return channels_last ? v.permute({0, 2, 3, 1}).contiguous() : v.contiguous();
  };
  const auto kept = prepare(images), replaced = prepare(fudge);
  const auto seg = segments.to(at::kInt).contiguous();
  const auto msk = masks.contiguous();
  auto out = at::empty({b * count, c, h, w}, images.options().dtype(dtype),
                       channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (out.numel() > 0) {
    cuda::perturb_select(kept.data_ptr(), replaced.data_ptr(), seg.data_ptr<int32_t>(), msk.data_ptr<bool>(),
                         out.data_ptr(), out.element_size(), b, n, m, c, h * w, offset, count, channels_last,
                         c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lime_fit_cuda(const at::Tensor& masks,
                                                                          const at::Tensor& targets,
                                                                          const at::Tensor& num_segments,
                                                                          const std::optional<at::Tensor>& weights,
                                                                          double kernel_width, double alpha) {
  check_dim(masks, "masks", 3, "(B, N, M)");
  check_dtype_in(masks, "masks", {at::kBool});
  check_device_type(masks, "masks", at::kCUDA);
  check_dim(targets, "targets", 3, "(B, N, L)");
  check_dtype_in(targets, "targets", {at::kFloat, at::kDouble});
  check_same_device(masks, "masks", targets, "targets");
  check_dim(num_segments, "num_segments", 1, "(B,)");
  check_dtype_in(num_segments, "num_segments", {at::kLong});
  check_same_device(masks, "masks", num_segments, "num_segments");
  const int64_t b = masks.size(0), n = masks.size(1), m = masks.size(2), nl = targets.size(2);
  TORCH_CHECK_VALUE(b >= 1 && n >= 1 && m >= 1 && nl >= 1, "masks and targets must be non-empty");
  TORCH_CHECK_VALUE(targets.size(0) == b && targets.size(1) == n, "targets must have shape (B, N, L) = (", b, ", ", n,
                    ", L) to match masks, got ", shape_of(targets));
  TORCH_CHECK_VALUE(num_segments.size(0) == b, "num_segments must hold B=", b, " counts");
  TORCH_CHECK_VALUE(num_segments.min().item<int64_t>() >= 1 && num_segments.max().item<int64_t>() <= m,
                    "num_segments must hold counts in 1..", m);
  // The block keeps the means and a tile of samples (>= 1 row of M + L + 1 float64) in 48 KiB of
  // shared memory.
  TORCH_CHECK_VALUE(m + nl <= 3000, "lime_fit on CUDA supports M + L <= 3000 (segments plus labels), got ", m + nl);
  TORCH_CHECK_VALUE(kernel_width > 0, "kernel_width must be positive, got ", kernel_width);
  TORCH_CHECK_VALUE(alpha >= 0, "alpha must be non-negative, got ", alpha);
  TORCH_CHECK_VALUE(at::isfinite(targets).all().item<bool>(), "targets contains NaN or infinite values");
  if (weights.has_value()) {
    check_dim(*weights, "weights", 2, "(B, N)");
    TORCH_CHECK_TYPE(weights->scalar_type() == targets.scalar_type(), "weights must have the targets' dtype");
    check_same_device(masks, "masks", *weights, "weights");
    TORCH_CHECK_VALUE(weights->size(0) == b && weights->size(1) == n, "weights must have shape (B, N)");
    TORCH_CHECK_VALUE(at::isfinite(*weights).all().item<bool>(), "weights contains NaN or infinite values");
    TORCH_CHECK_VALUE(!(*weights < 0).any().item<bool>() && !(weights->sum(1) <= 0).any().item<bool>(),
                      "weights must be non-negative with a positive sum per image");
  }
  const c10::cuda::CUDAGuard guard(masks.device());
  const auto msk = masks.contiguous(), tgt = targets.contiguous(), segs = num_segments.contiguous();
  const auto wts = weights.has_value() ? weights->contiguous() : at::Tensor();
  auto coef = at::empty({b, nl, m}, targets.options());
  auto intercept = at::empty({b, nl}, targets.options());
  auto score = at::empty({b, nl}, targets.options());
  auto local_pred = at::empty({b, nl}, targets.options());
  auto status = at::zeros({b}, targets.options().dtype(at::kInt));
  auto scratch = at::empty({cuda::lime_fit_scratch_doubles(b, n, m, nl)}, targets.options().dtype(at::kDouble));
  cuda::lime_fit(msk.data_ptr<bool>(), tgt.data_ptr(), wts.defined() ? wts.data_ptr() : nullptr,
                 segs.data_ptr<int64_t>(), elem_of(tgt), b, n, m, nl, kernel_width, alpha, coef.data_ptr(),
                 intercept.data_ptr(), score.data_ptr(), local_pred.data_ptr(), status.data_ptr<int32_t>(),
                 scratch.data_ptr<double>(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Singular systems (alpha = 0 with a constant column) are rare: re-solve those images with the
  // CPU kernel's least-squares path and copy them back.
  const auto failed = status.nonzero().flatten();
  if (failed.numel() > 0) {
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
  check_dim(x_adv, "x_adv", 4, "(B, C, H, W)");
  check_dtype_in(x_adv, "x_adv", kFloatDtypes);
  check_device_type(x_adv, "x_adv", at::kCUDA);
  for (const auto* t : {&x, &grad}) {
    const char* name = t == &x ? "x" : "grad";
    check_same_device(x_adv, "x_adv", *t, name);
    TORCH_CHECK_TYPE(t->scalar_type() == x_adv.scalar_type(), name, " must have x_adv's dtype");
    TORCH_CHECK_VALUE(t->sizes() == x_adv.sizes(), name, " must have the shape of x_adv ", shape_of(x_adv));
  }
  const bool linf = norm == "linf";
  TORCH_CHECK_VALUE(linf || norm == "l2", "norm must be 'linf' or 'l2', got '", std::string(norm), "'");
  TORCH_CHECK_VALUE(step_size >= 0 && eps >= 0 && lo <= hi, "need step_size >= 0, eps >= 0 and lo <= hi");
  const int64_t b = x_adv.size(0), c = x_adv.size(1), h = x_adv.size(2), w = x_adv.size(3);
  at::Tensor wt;
  if (weight.has_value()) {
    check_dim(*weight, "weight", 3, "(B, H, W)");
    TORCH_CHECK_TYPE(weight->scalar_type() == x_adv.scalar_type(), "weight must have x_adv's dtype");
    check_same_device(x_adv, "x_adv", *weight, "weight");
    TORCH_CHECK_VALUE(weight->size(0) == b && weight->size(1) == h && weight->size(2) == w,
                      "weight must have shape (B, H, W)");
    wt = weight->contiguous();
  }
  TORCH_CHECK_VALUE(at::isfinite(grad).all().item<bool>(), "grad contains NaN or infinite values");
  TORCH_CHECK_VALUE(c * h * w < (int64_t(1) << 31), "masked_pgd_step on CUDA needs fewer than 2^31 elements per sample");
  if (x_adv.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x_adv.device());
  const bool channels_last = !x_adv.is_contiguous() && x_adv.is_contiguous(at::MemoryFormat::ChannelsLast);
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor work = x_adv.is_contiguous(format) ? x_adv : x_adv.contiguous(format);
  const auto xc = x.contiguous(format), gc = grad.contiguous(format);
  auto sums = at::zeros({3 * b}, x_adv.options().dtype(at::kDouble));
  cuda::masked_pgd_step(work.data_ptr(), xc.data_ptr(), gc.data_ptr(), wt.defined() ? wt.data_ptr() : nullptr,
                        elem_of(work), b, c, h * w, channels_last, step_size, eps, lo, hi, linf,
                        sums.data_ptr<double>(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!work.is_same(x_adv)) x_adv.copy_(work);
}

}  // namespace
}  // namespace attrefine_fast

TORCH_LIBRARY_IMPL(attrefine_fast, CUDA, m) {
  m.impl("segment_mean", &attrefine_fast::segment_mean_cuda);
  m.impl("perturb", &attrefine_fast::perturb_cuda);
  m.impl("lime_fit", &attrefine_fast::lime_fit_cuda);
  m.impl("masked_pgd_step", &attrefine_fast::masked_pgd_step_cuda);
}
