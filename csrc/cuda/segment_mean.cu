// segment_mean on CUDA: float64 per-segment sums and pixel counts (the glue divides and casts).
//
//   images (B, C, H*W) dense, uint8 / float16 / bfloat16 / float32 / float64
//   segments (B, H*W) int32 ids in [0, M)  ->  sums (B, C, M), counts (B, M), float64, pre-zeroed
//
// Each block takes a tile of one image's pixels and accumulates into a shared-memory histogram
// when the image's M * (C + 1) sums fit, flushing with one global atomic per bin; otherwise it
// adds straight to global memory. Images on the grid's y axis, looping past its limit
// (grid_rows.cuh). float64 atomics: sums do not depend on the summation order
// beyond float64 rounding (the reference also sums in float64).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "grid_rows.cuh"
#include "launchers.h"

namespace attrefine_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// 4 pixels per thread per tile: 1024-pixel tiles, so a 224x224 image spreads over 49 blocks.
constexpr int kPixelsPerBlock = 1024;
// Shared histogram bins (doubles): 48 KiB, the default shared-memory limit of every arch.
constexpr int64_t kSharedBins = 6144;

__device__ __forceinline__ double to_double(uint8_t v) { return static_cast<double>(v); }
__device__ __forceinline__ double to_double(__half v) { return static_cast<double>(__half2float(v)); }
__device__ __forceinline__ double to_double(__nv_bfloat16 v) { return static_cast<double>(__bfloat162float(v)); }
__device__ __forceinline__ double to_double(float v) { return static_cast<double>(v); }
__device__ __forceinline__ double to_double(double v) { return v; }

template <typename T, bool SHARED>
__global__ void segment_sums_kernel(const T* __restrict__ images, const int32_t* __restrict__ segments, int64_t batch,
                                    int64_t channels, int64_t pixels, int64_t num_segments,
                                    double* __restrict__ sums, double* __restrict__ counts) {
  extern __shared__ double bins[];  // (C + 1) * M: C channel sums then the count
  const int64_t nbins = (channels + 1) * num_segments;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kPixelsPerBlock;
  const int64_t p1 = min(pixels, p0 + kPixelsPerBlock);
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    if (SHARED) {
      for (int64_t k = threadIdx.x; k < nbins; k += blockDim.x) bins[k] = 0.0;
      __syncthreads();
    }
    const int32_t* seg = segments + b * pixels;
    for (int64_t p = p0 + threadIdx.x; p < p1; p += blockDim.x) {
      const int64_t s = seg[p];
      for (int64_t c = 0; c < channels; ++c) {
        const double v = to_double(images[(b * channels + c) * pixels + p]);
        if (SHARED)
          atomicAdd(&bins[c * num_segments + s], v);
        else
          atomicAdd(&sums[(b * channels + c) * num_segments + s], v);
      }
      if (SHARED)
        atomicAdd(&bins[channels * num_segments + s], 1.0);
      else
        atomicAdd(&counts[b * num_segments + s], 1.0);
    }
    if (SHARED) {
      __syncthreads();
      for (int64_t k = threadIdx.x; k < nbins; k += blockDim.x) {
        const double v = bins[k];
        if (v == 0.0) continue;
        const int64_t c = k / num_segments, s = k % num_segments;
        if (c < channels)
          atomicAdd(&sums[(b * channels + c) * num_segments + s], v);
        else
          atomicAdd(&counts[b * num_segments + s], v);
      }
      __syncthreads();  // the next image zeroes the bins this one's flush reads
    }
  }
}

template <typename T>
void launch(const void* images, const int32_t* segments, int64_t batch, int64_t channels, int64_t pixels,
            int64_t num_segments, double* sums, double* counts, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((pixels + kPixelsPerBlock - 1) / kPixelsPerBlock), grid_rows(batch));
  const int64_t nbins = (channels + 1) * num_segments;
  const T* img = static_cast<const T*>(images);
  if (nbins <= kSharedBins)
    segment_sums_kernel<T, true><<<grid, kThreads, nbins * sizeof(double), stream>>>(img, segments, batch, channels,
                                                                                    pixels, num_segments, sums, counts);
  else
    segment_sums_kernel<T, false><<<grid, kThreads, 0, stream>>>(img, segments, batch, channels, pixels, num_segments,
                                                                 sums, counts);
}

}  // namespace

void segment_sums(const void* images, Elem images_type, const int32_t* segments, int64_t batch, int64_t channels,
                  int64_t pixels, int64_t num_segments, double* sums, double* counts, cudaStream_t stream) {
  switch (images_type) {
    case Elem::u8: launch<uint8_t>(images, segments, batch, channels, pixels, num_segments, sums, counts, stream); break;
    case Elem::f16: launch<__half>(images, segments, batch, channels, pixels, num_segments, sums, counts, stream); break;
    case Elem::bf16: launch<__nv_bfloat16>(images, segments, batch, channels, pixels, num_segments, sums, counts, stream); break;
    case Elem::f32: launch<float>(images, segments, batch, channels, pixels, num_segments, sums, counts, stream); break;
    case Elem::f64: launch<double>(images, segments, batch, channels, pixels, num_segments, sums, counts, stream); break;
  }
}

}  // namespace cuda
}  // namespace attrefine_fast
