// The argument contract of each op, checked the same way by its CPU kernel (csrc/cpu) and its CUDA
// glue (csrc/cuda/ops_cuda.cpp), so a direct torch.ops.attrefine_fast.<op> call with bad input
// raises the same ValueError / TypeError on every device. Device-specific limits stay with the
// device's entry point.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "tensor_checks.h"

namespace attrefine_fast {

inline void check_segment_mean_args(const at::Tensor& images, const at::Tensor& segments, int64_t num_segments,
                                    at::DeviceType device) {
  check_segments_shape(images, segments);
  check_dtype_in(images, "images", kImageDtypes);
  check_device_type(images, "images", device);
  check_segment_ids(segments, num_segments);
}

// Checks perturb's arguments and returns the output dtype (check_output_dtype in ops/perturb.py).
// check_ids = false leaves the segment ids' range to a caller whose kernel checks them before it
// writes (the CUDA one: no host round trip before its launch).
inline at::ScalarType check_perturb_args(const at::Tensor& images, const at::Tensor& segments, const at::Tensor& masks,
                                         const at::Tensor& fudge, int64_t offset, int64_t count,
                                         const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std,
                                         std::optional<at::ScalarType> out_dtype, at::DeviceType device,
                                         bool check_ids = true) {
  check_segments_shape(images, segments);
  check_dtype_in(images, "images", kImageDtypes);
  check_device_type(images, "images", device);
  check_dim(masks, "masks", 3, "(B, N, M)");
  check_dtype_in(masks, "masks", {at::kBool});
  check_same_device(images, "images", masks, "masks");
  check_same_device(images, "images", fudge, "fudge");
  const int64_t b = images.size(0), c = images.size(1);
  TORCH_CHECK_VALUE(masks.size(0) == b && masks.size(2) >= 1, "masks must have shape (B, N, M) with B=", b, ", got ",
                    shape_of(masks));
  TORCH_CHECK_VALUE(fudge.sizes() == images.sizes() && fudge.scalar_type() == images.scalar_type(),
                    "fudge must match images in shape and dtype: ", shape_of(images), " ", images.scalar_type(),
                    ", got ", shape_of(fudge), " ", fudge.scalar_type());
  const int64_t n = masks.size(1);
  // (count <= n - offset, not offset + count <= n: the sum wraps for an offset near INT64_MAX)
  TORCH_CHECK_VALUE(offset >= 0 && count >= 1 && offset <= n && count <= n - offset,
                    "need offset >= 0, count >= 1 and offset + count <= N=",
                    n, ", got offset=", offset, ", count=", count);
  TORCH_CHECK_VALUE(mean.has_value() == std.has_value(), "give both mean and std, or neither");
  const bool normalized = mean.has_value();
  if (normalized) {
    for (const auto* t : {&*mean, &*std}) {
      const char* name = t == &*mean ? "mean" : "std";
      check_dim(*t, name, 1, "(C,)");
      check_dtype_in(*t, name, kFloatDtypes);
      check_same_device(images, "images", *t, name);
      TORCH_CHECK_VALUE(t->size(0) == c, name, " must have one value per channel (", c, "), got shape ", shape_of(*t));
    }
  }
  const auto dtype = out_dtype.has_value()                        ? *out_dtype
                     : (normalized && !images.is_floating_point()) ? at::kFloat
                                                                   : images.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble ||
                       dtype == at::kByte,
                   "out_dtype must be a float dtype or uint8, got ", dtype);
  // A uint8 output holds the images' own values; a float or normalized value outside 0..255 would wrap.
  TORCH_CHECK_TYPE(dtype != at::kByte || (!normalized && images.scalar_type() == at::kByte),
                   "a uint8 output needs uint8 images and no mean/std (values outside 0..255 would wrap), got ",
                   images.scalar_type(), " images", normalized ? " with mean/std" : "");
  if (check_ids) check_segment_ids(segments, masks.size(2));
  return dtype;
}

// perturb_into's out: (B * count, C, H, W) for `count` samples of each of the B images, dense in
// the contiguous or the channels-last layout, on the images' device and sharing no memory with the
// inputs. Returns count; out's dtype is the output dtype and its layout the output layout.
inline int64_t check_perturb_out(const at::Tensor& images, const at::Tensor& segments, const at::Tensor& masks,
                                 const at::Tensor& fudge, const std::optional<at::Tensor>& mean,
                                 const std::optional<at::Tensor>& std, const at::Tensor& out) {
  check_dim(images, "images", 4, "(B, C, H, W)");
  check_dim(out, "out", 4, "(B * count, C, H, W)");
  check_same_device(images, "images", out, "out");
  const int64_t b = images.size(0);
  TORCH_CHECK_VALUE(b >= 1 && out.size(0) >= b && out.size(0) % b == 0 && out.size(1) == images.size(1) &&
                        out.size(2) == images.size(2) && out.size(3) == images.size(3),
                    "out must have shape (B * count, C, H, W) with images of shape (B, C, H, W) = ", shape_of(images),
                    ", B >= 1 and count >= 1, got ", shape_of(out));
  TORCH_CHECK_VALUE(out.is_contiguous() || out.is_contiguous(at::MemoryFormat::ChannelsLast),
                    "out must be contiguous or channels-last, got strides ", out.strides());
  // (mean and std as well: a kernel reads them while it writes out)
  const std::pair<const at::Tensor*, const char*> inputs[] = {
      {&images, "images"}, {&segments, "segments"}, {&masks, "masks"}, {&fudge, "fudge"},
      {mean.has_value() ? &*mean : nullptr, "mean"}, {std.has_value() ? &*std : nullptr, "std"}};
  for (const auto& input : inputs) {
    const auto* t = input.first;
    const char* name = input.second;
    if (t == nullptr) continue;
    const auto overlap = at::get_overlap_status(out, *t);
    TORCH_CHECK_VALUE(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial,
                      "out shares memory with ", name);
  }
  return out.size(0) / b;
}

// perturb_into's whole contract (out's, then perturb's with out's dtype); returns the count.
inline int64_t check_perturb_into_args(const at::Tensor& images, const at::Tensor& segments, const at::Tensor& masks,
                                       const at::Tensor& fudge, int64_t offset, const std::optional<at::Tensor>& mean,
                                       const std::optional<at::Tensor>& std, const at::Tensor& out,
                                       at::DeviceType device, bool check_ids = true) {
  const int64_t count = check_perturb_out(images, segments, masks, fudge, mean, std, out);
  check_perturb_args(images, segments, masks, fudge, offset, count, mean, std, out.scalar_type(), device, check_ids);
  return count;
}

// perturb's output for `count` samples of every image: (B * count, C, H, W) on the images' device.
inline at::Tensor perturb_output(const at::Tensor& images, int64_t count, at::ScalarType dtype, bool channels_last) {
  return at::empty({images.size(0) * count, images.size(1), images.size(2), images.size(3)},
                   images.options().dtype(dtype),
                   channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

// One source image of perturb (the image or its fudge) normalized and cast exactly as the reference
// does, once per image rather than once per sample: the per-sample choice then only copies.
// channels_last returns the (B, H, W, C) permutation, contiguous.
inline at::Tensor perturb_source(const at::Tensor& src, const std::optional<at::Tensor>& mean,
                                 const std::optional<at::Tensor>& std, at::ScalarType dtype, bool channels_last) {
  at::Tensor v = src;
  if (mean.has_value()) {
    const auto compute = src.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const int64_t c = src.size(1);
    v = (v.to(compute) - mean->to(compute).view({1, c, 1, 1})) / std->to(compute).view({1, c, 1, 1});
  }
  v = v.to(dtype);
  return channels_last ? v.permute({0, 2, 3, 1}).contiguous() : v.contiguous();
}

[[noreturn]] inline void fail_lime_fit_counts(int64_t max_segments) {
  TORCH_CHECK_VALUE(false, "num_segments must hold counts in 1..", max_segments);
  std::abort();  // not reached: TORCH_CHECK_VALUE(false, ...) throws
}

// check_targets = false leaves the finiteness of targets, check_counts = false the range of
// num_segments, to a caller that checks them after its kernel, without a host round trip before
// it (lime_fit writes only its own outputs, so a late error loses nothing).
inline void check_lime_fit_args(const at::Tensor& masks, const at::Tensor& targets, const at::Tensor& num_segments,
                                const std::optional<at::Tensor>& weights, double kernel_width, double alpha,
                                at::DeviceType device, bool check_targets = true, bool check_counts = true) {
  check_dim(masks, "masks", 3, "(B, N, M)");
  check_dtype_in(masks, "masks", {at::kBool});
  check_device_type(masks, "masks", device);
  check_dim(targets, "targets", 3, "(B, N, L)");
  check_dtype_in(targets, "targets", {at::kFloat, at::kDouble});
  check_same_device(masks, "masks", targets, "targets");
  check_dim(num_segments, "num_segments", 1, "(B,)");
  check_dtype_in(num_segments, "num_segments", {at::kLong});
  check_same_device(masks, "masks", num_segments, "num_segments");
  const int64_t b = masks.size(0), n = masks.size(1), m = masks.size(2), nl = targets.size(2);
  TORCH_CHECK_VALUE(b >= 1 && n >= 1 && m >= 1 && nl >= 1, "masks (B, N, M) and targets (B, N, L) must be non-empty, got ",
                    shape_of(masks), " and ", shape_of(targets));
  TORCH_CHECK_VALUE(targets.size(0) == b && targets.size(1) == n, "targets must have shape (B, N, L) = (", b, ", ", n,
                    ", L) to match masks, got ", shape_of(targets));
  TORCH_CHECK_VALUE(num_segments.size(0) == b, "num_segments must hold B=", b, " counts, got shape ",
                    shape_of(num_segments));
  if (check_counts) {
    const auto counts = num_segments.to(at::kCPU);  // B counts: one copy, no kernel
    const auto extremes = at::aminmax(counts);
    const int64_t fewest = std::get<0>(extremes).item<int64_t>(), most = std::get<1>(extremes).item<int64_t>();
    if (fewest < 1 || most > m) fail_lime_fit_counts(m);
  }
  TORCH_CHECK_VALUE(kernel_width > 0 && std::isfinite(kernel_width), "kernel_width must be positive and finite, got ",
                    kernel_width);
  TORCH_CHECK_VALUE(alpha >= 0 && std::isfinite(alpha), "alpha must be non-negative and finite, got ", alpha);
  TORCH_CHECK_VALUE(!check_targets || all_finite(targets), "targets contains NaN or infinite values");
  if (weights.has_value()) {
    check_dim(*weights, "weights", 2, "(B, N)");
    TORCH_CHECK_TYPE(weights->scalar_type() == targets.scalar_type(), "weights must have the targets' dtype ",
                     targets.scalar_type(), ", got ", weights->scalar_type());
    check_same_device(masks, "masks", *weights, "weights");
    TORCH_CHECK_VALUE(weights->size(0) == b && weights->size(1) == n, "weights must have shape (B, N) = (", b, ", ", n,
                      "), got ", shape_of(*weights));
    TORCH_CHECK_VALUE(all_finite(*weights), "weights contains NaN or infinite values");
    TORCH_CHECK_VALUE(!(*weights < 0).any().item<bool>() && !(weights->sum(1) <= 0).any().item<bool>(),
                      "weights must be non-negative with a positive sum per image");
  }
}

// x_adv is written in place while t is read: t may be x_adv itself (each element is read before it
// is written) but not share only some of its memory (another thread would read what was written).
inline void check_not_partly_shared(const at::Tensor& x_adv, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(at::get_overlap_status(x_adv, t) != at::MemOverlapStatus::Partial, "x_adv shares some of its memory with ",
                    name, ": it is written in place while ", name, " is read; pass ", name, ".clone()");
}

// Checks masked_pgd_step's arguments, including a finite gradient (a NaN would silently poison
// x_adv), before anything is written. Returns true for L-inf, false for L2. check_grad = false
// leaves grad's values to a caller that checks them on the device before it writes.
inline bool check_masked_pgd_step_args(const at::Tensor& x_adv, const at::Tensor& x, const at::Tensor& grad,
                                       const std::optional<at::Tensor>& weight, double step_size, double eps,
                                       double lo, double hi, c10::string_view norm, at::DeviceType device,
                                       bool check_grad = true) {
  check_dim(x_adv, "x_adv", 4, "(B, C, H, W)");
  check_dtype_in(x_adv, "x_adv", kFloatDtypes);
  check_device_type(x_adv, "x_adv", device);
  // written in place: an element that shares its memory with another (a stride 0) would be written twice
  for (int64_t d = 0; d < 4; ++d)
    TORCH_CHECK_VALUE(x_adv.stride(d) != 0 || x_adv.size(d) <= 1, "x_adv has overlapping elements (strides ",
                      x_adv.strides(), "): the step writes it in place");
  for (const auto* t : {&x, &grad}) {
    const char* name = t == &x ? "x" : "grad";
    check_same_device(x_adv, "x_adv", *t, name);
    TORCH_CHECK_TYPE(t->scalar_type() == x_adv.scalar_type(), name, " must have x_adv's dtype ", x_adv.scalar_type(),
                     ", got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->sizes() == x_adv.sizes(), name, " must have the shape of x_adv ", shape_of(x_adv), ", got ",
                      shape_of(*t));
    check_not_partly_shared(x_adv, *t, name);
  }
  const bool linf = norm == "linf";
  TORCH_CHECK_VALUE(linf || norm == "l2", "norm must be 'linf' or 'l2', got '", std::string(norm), "'");
  TORCH_CHECK_VALUE(step_size >= 0 && eps >= 0 && lo <= hi, "need step_size >= 0, eps >= 0 and lo <= hi, got ",
                    step_size, ", ", eps, ", ", lo, ", ", hi);
  if (weight.has_value()) {
    const int64_t b = x_adv.size(0), h = x_adv.size(2), w = x_adv.size(3);
    check_dim(*weight, "weight", 3, "(B, H, W)");
    TORCH_CHECK_TYPE(weight->scalar_type() == x_adv.scalar_type(), "weight must have x_adv's dtype ",
                     x_adv.scalar_type(), ", got ", weight->scalar_type());
    check_same_device(x_adv, "x_adv", *weight, "weight");
    TORCH_CHECK_VALUE(weight->size(0) == b && weight->size(1) == h && weight->size(2) == w,
                      "weight must have shape (B, H, W) = (", b, ", ", h, ", ", w, "), got ", shape_of(*weight));
    check_not_partly_shared(x_adv, *weight, "weight");
  }
  TORCH_CHECK_VALUE(!check_grad || all_finite(grad), "grad contains NaN or infinite values");
  return linf;
}

// masked_pgd_step updates x_adv in place through a raw pointer. It works in x_adv's own layout
// when that is NCHW- or NHWC-dense, otherwise on a dense copy that finish_in_place writes back.
struct InPlaceWork {
  at::Tensor tensor;  // x_adv itself, or its dense copy
  at::MemoryFormat format;
  bool channels_last;
};

inline InPlaceWork dense_work(const at::Tensor& x_adv) {
  const bool channels_last = !x_adv.is_contiguous() && x_adv.is_contiguous(at::MemoryFormat::ChannelsLast);
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  return {x_adv.is_contiguous(format) ? x_adv : x_adv.contiguous(format), format, channels_last};
}

inline void finish_in_place(at::Tensor& x_adv, const InPlaceWork& work) {
  if (work.tensor.is_same(x_adv)) {
    // Written through a raw pointer: tell autograd x_adv changed, as an in-place torch op would.
    x_adv.unsafeGetTensorImpl()->bump_version();
  } else {
    x_adv.copy_(work.tensor);
  }
}

}  // namespace attrefine_fast
