// perturb on CUDA: the per-pixel choice between the prepared (normalized, cast, laid out) image
// and fudge, for samples [offset, offset + count) of every image.
//
//   kept, replaced: (B, C, H, W) or (B, H, W, C) dense, elements of 1, 2, 4 or 8 bytes
//   segments (B, H*W) int32;  masks (B, N, M) bool  ->  out (B * count, <same layout>)
//
// The glue applies normalization and the dtype cast to the image and the fudge once per call (they
// commute with the choice), so this kernel only moves bits: it is typed by element size, not dtype.
// One thread per pixel: it looks the pixel's segment up once, picks the source image, and copies
// the pixel's C elements, so no per-element index division and one source read per element.
// Consecutive threads take consecutive pixels: NCHW writes are coalesced per channel plane, NHWC
// writes cover one contiguous run of 32 * C elements per warp.
#include <cstdint>

#include "launchers.h"

namespace attrefine_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename bits_t, bool CHANNELS_LAST>
__global__ void perturb_select_kernel(const bits_t* __restrict__ kept, const bits_t* __restrict__ replaced,
                                      const int32_t* __restrict__ segments, const bool* __restrict__ masks,
                                      bits_t* __restrict__ out, int64_t samples, int64_t num_segments,
                                      int64_t channels, int64_t pixels, int64_t offset, int64_t count,
                                      int64_t tasks) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= pixels) return;
  const int64_t per_sample = channels * pixels;
  // Samples along y, in a grid-stride loop: B * count can exceed the 65535 limit of gridDim.y.
  for (int64_t task = blockIdx.y; task < tasks; task += gridDim.y) {
    const int64_t b = task / count, i = task % count;
    const bool keep = masks[(b * samples + offset + i) * num_segments + segments[b * pixels + p]];
    const bits_t* src = (keep ? kept : replaced) + b * per_sample;
    bits_t* o = out + task * per_sample;
    if (CHANNELS_LAST) {
      for (int64_t c = 0; c < channels; ++c) o[p * channels + c] = src[p * channels + c];
    } else {
      for (int64_t c = 0; c < channels; ++c) o[c * pixels + p] = src[c * pixels + p];
    }
  }
}

template <typename bits_t>
void launch(const void* kept, const void* replaced, const int32_t* segments, const bool* masks, void* out,
            int64_t batch, int64_t samples, int64_t num_segments, int64_t channels, int64_t pixels, int64_t offset,
            int64_t count, bool channels_last, cudaStream_t stream) {
  const int64_t tasks = batch * count;
  const dim3 grid(static_cast<unsigned>((pixels + kThreads - 1) / kThreads), static_cast<unsigned>(tasks < 65535 ? tasks : 65535));
  const auto* k = static_cast<const bits_t*>(kept);
  const auto* r = static_cast<const bits_t*>(replaced);
  auto* o = static_cast<bits_t*>(out);
  if (channels_last)
    perturb_select_kernel<bits_t, true><<<grid, kThreads, 0, stream>>>(k, r, segments, masks, o, samples, num_segments,
                                                                       channels, pixels, offset, count, tasks);
  else
    perturb_select_kernel<bits_t, false><<<grid, kThreads, 0, stream>>>(k, r, segments, masks, o, samples, num_segments,
                                                                        channels, pixels, offset, count, tasks);
}

}  // namespace

void perturb_select(const void* kept, const void* replaced, const int32_t* segments, const bool* masks, void* out,
                    int64_t elem_bytes, int64_t batch, int64_t samples, int64_t num_segments, int64_t channels,
                    int64_t pixels, int64_t offset, int64_t count, bool channels_last, cudaStream_t stream) {
  switch (elem_bytes) {
    case 1: launch<uint8_t>(kept, replaced, segments, masks, out, batch, samples, num_segments, channels, pixels, offset, count, channels_last, stream); break;
    case 2: launch<uint16_t>(kept, replaced, segments, masks, out, batch, samples, num_segments, channels, pixels, offset, count, channels_last, stream); break;
    case 4: launch<uint32_t>(kept, replaced, segments, masks, out, batch, samples, num_segments, channels, pixels, offset, count, channels_last, stream); break;
    default: launch<uint64_t>(kept, replaced, segments, masks, out, batch, samples, num_segments, channels, pixels, offset, count, channels_last, stream); break;
  }
}

}  // namespace cuda
}  // namespace attrefine_fast
