// Launchers of the CUDA kernels (csrc/cuda/*.cu): plain pointers, sizes and a cudaStream_t, no
// torch types, so that the .cu files compile with nvcc alone (a CPU-only torch ships no usable
// CUDA headers). ops_cuda.cpp checks the tensors and calls these on the current stream.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace attrefine_fast {
namespace cuda {

// Element types the launchers accept, named by the glue from the tensors' dtypes.
enum class Elem : int { u8, f16, bf16, f32, f64 };

// segment_mean: per (image, channel, segment) float64 sums and per (image, segment) pixel counts,
// accumulated into zeroed buffers. images (B, C, H*W) dense, segments (B, H*W) int32.
void segment_sums(const void* images, Elem images_type, const int32_t* segments, int64_t batch, int64_t channels,
                  int64_t pixels, int64_t num_segments, double* sums, double* counts, cudaStream_t stream);

// perturb: out[b * count + i] = per pixel (kept or replaced)[b] by masks[b, offset + i, segments[b, p]].
// kept / replaced: (B, C, H, W) or (B, H, W, C) dense, elements of elem_bytes (1, 2, 4 or 8) bytes,
// already normalized and cast; out has the same layout per sample; C * H * W < 2^31. segments
// (B, H*W) dense, int64 where segments_int64, else int32. flag: one zeroed int; the segment ids
// are checked on the device first, and where one lies outside [0, num_segments) the flag is set
// to 1 and nothing is written.
void perturb_select(const void* kept, const void* replaced, const void* segments, bool segments_int64,
                    const bool* masks, void* out, int64_t elem_bytes, int64_t batch, int64_t samples,
                    int64_t num_segments, int64_t channels, int64_t pixels, int64_t offset, int64_t count,
                    bool channels_last, int* flag, cudaStream_t stream);

// lime_fit: one block per image. masks (B, N, M) bool, targets (B, N, L), weights (B, N) or
// nullptr, num_segments (B,) int64, all dense, targets/weights/outputs float32 (f32) or float64
// (f64). status[b] is written for every image: bit 0 where the Cholesky factorization failed (a
// singular system: the glue re-solves those images by least squares), bit 1 where the targets
// may hold a NaN or an infinity (their weighted sum is not finite), bit 2 where num_segments[b]
// is outside 1..M (nothing fitted). scratch:
// lime_fit_scratch_doubles(...) doubles.
int64_t lime_fit_scratch_doubles(int64_t batch, int64_t samples, int64_t segments, int64_t labels);
void lime_fit(const bool* masks, const void* targets, const void* weights, const int64_t* num_segments, Elem type,
              int64_t batch, int64_t samples, int64_t segments, int64_t labels, double kernel_width, double alpha,
              void* coef, void* intercept, void* score, void* local_pred, int32_t* status, double* scratch,
              cudaStream_t stream);

// masked_pgd_step, in place on x_adv; all (B, C, H, W) dense in the same layout (channels_last
// selects NHWC), weight (B, H, W) or nullptr. sums: 3 * batch zeroed doubles (L2 only); flag: one
// zeroed int, set to non-zero when grad (bit 0) or, for L2, x_adv - x (bit 1) is not finite, in
// which case nothing is written.
void masked_pgd_step(void* x_adv, const void* x, const void* grad, const void* weight, Elem type, int64_t batch,
                     int64_t channels, int64_t pixels, bool channels_last, double step_size, double eps, double lo,
                     double hi, bool linf, double* sums, int* flag, cudaStream_t stream);

}  // namespace cuda
}  // namespace attrefine_fast
