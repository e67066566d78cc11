// perturb on CUDA: the per-pixel choice between the prepared (normalized, cast) image
// and fudge, for samples [offset, offset + count) of every image.
//
//   kept, replaced: (B, C, H, W) dense, elements of 1, 2, 4 or 8 bytes
//   segments (B, H*W) int32 or int64;  masks (B, N, M) bool  ->  out (B * count, C, H, W) NCHW or NHWC
//
// The glue applies normalization and the dtype cast to the image and the fudge once per call (they
// commute with the choice), so this kernel only moves bits: it is typed by element size, not dtype.
// The kernel is bound by the bytes it writes. Each thread owns one 16-byte run of a sample's
// elements (VEC elements; one element where the sizes or addresses do not allow 16-byte access):
// it looks up the run's segments and loads both sources once, then writes that run for
// kSamplesPerThread samples, one 16-byte store and VEC mask-byte lookups (cached) per sample.
// Consecutive threads take consecutive runs, so every warp writes 512 contiguous bytes. For an NHWC
// output the run's source elements are gathered from the NCHW sources (VEC scalar loads, once per
// kSamplesPerThread outputs) rather than the glue transposing both sources per call, two more
// kernels (run 2 on the H100: 71 us in 6 kernels against 64 us in 4 for NCHW).
// The segment ids are checked by a pass before it (an id outside [0, M) would read past a mask
// row): it sets a flag the writing kernel reads first, so bad ids write nothing, and the glue
// reads the flag once, after both launches, instead of a host round trip before them.
#include <cstdint>
#include <cstring>

#include "flag_pass.cuh"
#include "grid_rows.cuh"
#include "launchers.h"

namespace attrefine_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kSamplesPerThread = 8;

// An id outside [0, num_segments): the predicate of the id check's flag pass.
struct IdOutOfRange {
  int64_t num_segments;
  template <typename seg_t>
  __device__ bool operator()(seg_t id) const {
    return id < 0 || static_cast<int64_t>(id) >= num_segments;
  }
};

// VEC elements of bits_t moved as one unit (16 bytes when VEC * sizeof(bits_t) == 16).
template <typename bits_t, int VEC>
struct Run {
  bits_t v[VEC];
};

template <typename bits_t, int VEC>
__device__ __forceinline__ Run<bits_t, VEC> load_run(const bits_t* p) {
  Run<bits_t, VEC> r;
  if constexpr (VEC * sizeof(bits_t) == 16) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    static_assert(sizeof(Run<bits_t, VEC>) == sizeof(uint4), "a run of 16 bytes");
    memcpy(&r, &u, sizeof(u));
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) r.v[k] = p[k];
  }
  return r;
}

template <typename bits_t, int VEC>
__device__ __forceinline__ void store_run(bits_t* p, const Run<bits_t, VEC>& r) {
  if constexpr (VEC * sizeof(bits_t) == 16) {
    uint4 u;
    memcpy(&u, &r, sizeof(u));
    *reinterpret_cast<uint4*>(p) = u;
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) p[k] = r.v[k];
  }
}

// Grid: x over runs of a sample's elements, y over (image, group of kSamplesPerThread samples).
// per_sample = channels * pixels < 2^31 (checked by the glue), a multiple of VEC.
template <typename bits_t, typename seg_t, int VEC, bool CHANNELS_LAST>
__global__ void __launch_bounds__(kThreads) perturb_select_kernel(
    const bits_t* __restrict__ kept, const bits_t* __restrict__ replaced, const seg_t* __restrict__ segments,
    const bool* __restrict__ masks, bits_t* __restrict__ out, int64_t samples, int64_t num_segments, int32_t channels,
    int32_t pixels, int64_t offset, int64_t count, int64_t tasks, const int* __restrict__ flag) {
  if (*flag) return;  // a segment id out of range: nothing is written
  const int32_t per_sample = channels * pixels;
  const int32_t e0 = (static_cast<int32_t>(blockIdx.x) * kThreads + static_cast<int32_t>(threadIdx.x)) * VEC;
  if (e0 >= per_sample) return;
  const int64_t groups = (count + kSamplesPerThread - 1) / kSamplesPerThread;
  // Tasks along y, in a grid-stride loop: B * groups can exceed the y limit (grid_rows.cuh).
  for (int64_t task = blockIdx.y; task < tasks; task += gridDim.y) {
    const int64_t b = task / groups, i0 = (task % groups) * kSamplesPerThread;
    const int64_t i1 = i0 + kSamplesPerThread < count ? i0 + kSamplesPerThread : count;
    int32_t seg[VEC];
    Run<bits_t, VEC> keep_run, fudge_run;
    if constexpr (CHANNELS_LAST) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const int32_t e = e0 + k, p = e / channels, c = e - p * channels;
        seg[k] = static_cast<int32_t>(segments[b * pixels + p]);
        const int64_t at = b * per_sample + static_cast<int64_t>(c) * pixels + p;  // NCHW sources
        keep_run.v[k] = kept[at];
        fudge_run.v[k] = replaced[at];
      }
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) seg[k] = static_cast<int32_t>(segments[b * pixels + (e0 + k) % pixels]);
      keep_run = load_run<bits_t, VEC>(kept + b * per_sample + e0);
      fudge_run = load_run<bits_t, VEC>(replaced + b * per_sample + e0);
    }
    const bool* mask_row = masks + (b * samples + offset) * num_segments;
    for (int64_t i = i0; i < i1; ++i) {
      const bool* m = mask_row + i * num_segments;
      Run<bits_t, VEC> r;
#pragma unroll
      for (int k = 0; k < VEC; ++k) r.v[k] = m[seg[k]] ? keep_run.v[k] : fudge_run.v[k];
      store_run<bits_t, VEC>(out + (b * count + i) * per_sample + e0, r);
    }
  }
}

template <typename bits_t, typename seg_t, int VEC>
void launch_runs(const bits_t* kept, const bits_t* replaced, const seg_t* segments, const bool* masks, bits_t* out,
                 int64_t batch, int64_t samples, int64_t num_segments, int64_t channels, int64_t pixels, int64_t offset,
                 int64_t count, bool channels_last, const int* flag, cudaStream_t stream) {
  const int64_t runs = channels * pixels / VEC;
  const int64_t tasks = batch * ((count + kSamplesPerThread - 1) / kSamplesPerThread);
  const dim3 grid(static_cast<unsigned>((runs + kThreads - 1) / kThreads), grid_rows(tasks));
  const auto c = static_cast<int32_t>(channels), p = static_cast<int32_t>(pixels);
  if (channels_last)
    perturb_select_kernel<bits_t, seg_t, VEC, true><<<grid, kThreads, 0, stream>>>(
        kept, replaced, segments, masks, out, samples, num_segments, c, p, offset, count, tasks, flag);
  else
    perturb_select_kernel<bits_t, seg_t, VEC, false><<<grid, kThreads, 0, stream>>>(
        kept, replaced, segments, masks, out, samples, num_segments, c, p, offset, count, tasks, flag);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename bits_t, typename seg_t>
void launch(const void* kept, const void* replaced, const seg_t* segments, const bool* masks, void* out, int64_t batch,
            int64_t samples, int64_t num_segments, int64_t channels, int64_t pixels, int64_t offset, int64_t count,
            bool channels_last, const int* flag, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(bits_t);
  const auto* k = static_cast<const bits_t*>(kept);
  const auto* r = static_cast<const bits_t*>(replaced);
  auto* o = static_cast<bits_t*>(out);
  // 16-byte runs need every sample to start on a 16-byte boundary in all three buffers.
  if ((channels * pixels) % kVec == 0 && aligned16(kept) && aligned16(replaced) && aligned16(out))
    launch_runs<bits_t, seg_t, kVec>(k, r, segments, masks, o, batch, samples, num_segments, channels, pixels, offset,
                                     count, channels_last, flag, stream);
  else
    launch_runs<bits_t, seg_t, 1>(k, r, segments, masks, o, batch, samples, num_segments, channels, pixels, offset,
                                  count, channels_last, flag, stream);
}

template <typename seg_t>
void launch_bits(const void* kept, const void* replaced, const seg_t* segments, const bool* masks, void* out,
                 int64_t elem_bytes, int64_t batch, int64_t samples, int64_t num_segments, int64_t channels,
                 int64_t pixels, int64_t offset, int64_t count, bool channels_last, int* flag, cudaStream_t stream) {
  const int64_t ids = batch * pixels;
  if (ids > 0)
    flag_pass_kernel<seg_t, IdOutOfRange><<<flag_pass_blocks(ids), kFlagThreads, 0, stream>>>(
        segments, ids, IdOutOfRange{num_segments}, flag);
  switch (elem_bytes) {
    case 1: launch<uint8_t>(kept, replaced, segments, masks, out, batch, samples, num_segments, channels, pixels, offset, count, channels_last, flag, stream); break;
    case 2: launch<uint16_t>(kept, replaced, segments, masks, out, batch, samples, num_segments, channels, pixels, offset, count, channels_last, flag, stream); break;
    case 4: launch<uint32_t>(kept, replaced, segments, masks, out, batch, samples, num_segments, channels, pixels, offset, count, channels_last, flag, stream); break;
    default: launch<uint64_t>(kept, replaced, segments, masks, out, batch, samples, num_segments, channels, pixels, offset, count, channels_last, flag, stream); break;
  }
}

}  // namespace

void perturb_select(const void* kept, const void* replaced, const void* segments, bool segments_int64,
                    const bool* masks, void* out, int64_t elem_bytes, int64_t batch, int64_t samples,
                    int64_t num_segments, int64_t channels, int64_t pixels, int64_t offset, int64_t count,
                    bool channels_last, int* flag, cudaStream_t stream) {
  if (segments_int64)
    launch_bits(kept, replaced, static_cast<const int64_t*>(segments), masks, out, elem_bytes, batch, samples,
                num_segments, channels, pixels, offset, count, channels_last, flag, stream);
  else
    launch_bits(kept, replaced, static_cast<const int32_t*>(segments), masks, out, elem_bytes, batch, samples,
                num_segments, channels, pixels, offset, count, channels_last, flag, stream);
}

}  // namespace cuda
}  // namespace attrefine_fast
