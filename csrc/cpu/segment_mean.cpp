// segment_mean on the CPU: per image, per segment, per channel mean colour (LIME's hide colour).
//
//   images (B, C, H, W) float16 / bfloat16 / float32 / float64 / uint8, any strides
//   segments (B, H, W) int64 / int32, ids in [0, num_segments)
//   -> (B, num_segments, C) in the images' dtype (float64 for uint8)
//
// Sums are accumulated in float64 in pixel order, as the reference's scatter_add does, so the
// result equals attrefine_fast.ops.segment_mean_ref bit for bit.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../op_args.h"

namespace attrefine_fast {
namespace {

// One task per (image, channel): each reads one contiguous plane, so B*C tasks keep both cores
// busy even for a single RGB image.
template <typename scalar_t, typename index_t>
void segment_sums(const scalar_t* images, const index_t* segments, int64_t batch, int64_t channels, int64_t pixels,
                  int64_t num_segments, double* sums /* (B, C, M) */, double* counts /* (B, M) */) {
  // At least ~256 Ki pixels per thread: a smaller split costs more to start than it saves.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(pixels, 1));
  at::parallel_for(0, batch * (channels + 1), grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (channels + 1), c = task % (channels + 1);
      const index_t* seg = segments + b * pixels;
      if (c == channels) {  // the extra task per image counts its pixels per segment
        double* cnt = counts + b * num_segments;
        for (int64_t p = 0; p < pixels; ++p) cnt[seg[p]] += 1.0;
        continue;
      }
      const scalar_t* plane = images + (b * channels + c) * pixels;
      double* out = sums + (b * channels + c) * num_segments;
      for (int64_t p = 0; p < pixels; ++p) out[seg[p]] += static_cast<double>(plane[p]);
    }
  });
}

at::Tensor segment_mean_cpu(const at::Tensor& images, const at::Tensor& segments, int64_t num_segments) {
  check_segment_mean_args(images, segments, num_segments, at::kCPU);

  const int64_t b = images.size(0), c = images.size(1), pixels = images.size(2) * images.size(3);
  const auto img = images.contiguous();
  const auto seg = segments.contiguous();
  auto sums = at::zeros({b, c, num_segments}, images.options().dtype(at::kDouble));
  auto counts = at::zeros({b, num_segments}, images.options().dtype(at::kDouble));
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, img.scalar_type(), "segment_mean_cpu", [&] {
    if (seg.scalar_type() == at::kLong)
      segment_sums(img.data_ptr<scalar_t>(), seg.data_ptr<int64_t>(), b, c, pixels, num_segments,
                   sums.data_ptr<double>(), counts.data_ptr<double>());
    else
      segment_sums(img.data_ptr<scalar_t>(), seg.data_ptr<int32_t>(), b, c, pixels, num_segments,
                   sums.data_ptr<double>(), counts.data_ptr<double>());
  });
  // The same float64 division and final cast as the reference.
  auto means = sums / counts.clamp_min(1).unsqueeze(1);
  const auto out_dtype = images.is_floating_point() ? images.scalar_type() : at::kDouble;
  return means.transpose(1, 2).contiguous().to(out_dtype);
}

}  // namespace
}  // namespace attrefine_fast

TORCH_LIBRARY_IMPL(attrefine_fast, CPU, m) {
  m.impl("segment_mean", &attrefine_fast::segment_mean_cpu);
}
