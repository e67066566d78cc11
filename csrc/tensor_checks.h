// Argument checks shared by the compiled ops' entry points (CPU kernels and the CUDA glue).
//
// The Python wrappers validate everything first; these checks make a direct
// torch.ops.attrefine_fast.<op> call with bad input raise a ValueError / TypeError naming the
// argument instead of reading out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <initializer_list>
#include <string>
#include <tuple>

namespace attrefine_fast {

inline std::string shape_of(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + ")";
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be ", layout, " (", dim, " dimensions), got shape ", shape_of(t));
}

inline void check_dtype_in(const at::Tensor& t, const char* name, std::initializer_list<at::ScalarType> dtypes) {
  for (auto d : dtypes)
    if (t.scalar_type() == d) return;
  std::string names;
  for (auto d : dtypes) names += std::string(names.empty() ? "" : ", ") + c10::toString(d);
  TORCH_CHECK_TYPE(false, name, " must have dtype in (", names, "), got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& reference, const char* ref_name, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device() == reference.device(), "all tensors must be on the same device: ", ref_name, " is on ",
                    reference.device(), " but ", name, " is on ", t.device());
}

inline void check_device_type(const at::Tensor& t, const char* name, at::DeviceType type) {
  TORCH_CHECK_VALUE(t.device().type() == type, name, " must be a ", c10::DeviceTypeName(type, true), " tensor, got one on ",
                    t.device());
}

// Whether every element of a floating-point tensor is finite. A sum is several times cheaper than
// isfinite(t).all() and is finite only if every element is (a NaN or an infinity makes it NaN or
// infinite); a non-finite sum, from such an element or from overflow, is settled exactly.
inline bool all_finite(const at::Tensor& t) {
  if (t.numel() == 0 || std::isfinite(t.sum().item<double>())) return true;
  return at::isfinite(t).all().item<bool>();
}

// Image dtypes every image op accepts (the uint8 images LIME users pass straight from numpy).
constexpr std::initializer_list<at::ScalarType> kImageDtypes = {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble, at::kByte};
constexpr std::initializer_list<at::ScalarType> kFloatDtypes = {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble};

// segments (B, H, W) integer matching images (B, C, H, W).
inline void check_segments_shape(const at::Tensor& images, const at::Tensor& segments) {
  check_dim(images, "images", 4, "(B, C, H, W)");
  check_dim(segments, "segments", 3, "(B, H, W)");
  check_dtype_in(segments, "segments", {at::kLong, at::kInt});
  TORCH_CHECK_VALUE(segments.size(0) == images.size(0) && segments.size(1) == images.size(2) &&
                        segments.size(2) == images.size(3),
                    "segments must have shape (B, H, W) = (", images.size(0), ", ", images.size(2), ", ", images.size(3),
                    ") to match images, got ", shape_of(segments));
  check_same_device(images, "images", segments, "segments");
}

// Every label must index a segment: an id outside [0, num_segments) would read or write out of
// bounds in the kernels. One reduction over the labels, on whatever device they live.
inline void check_segment_ids(const at::Tensor& segments, int64_t num_segments) {
  TORCH_CHECK_VALUE(num_segments >= 1, "num_segments must be at least 1, got ", num_segments);
  if (segments.numel() == 0) return;
  const auto extremes = at::aminmax(segments);
  const auto range = at::stack({std::get<0>(extremes), std::get<1>(extremes)}).to(at::kCPU, at::kLong);  // one copy
  const int64_t lo_v = range[0].item<int64_t>(), hi_v = range[1].item<int64_t>();
  TORCH_CHECK_VALUE(lo_v >= 0 && hi_v < num_segments, "segment ids must lie in [0, ", num_segments, "), got ids in [",
                    lo_v, ", ", hi_v, "]");
}

}  // namespace attrefine_fast
