// perturb on the CPU: LIME's perturbed images for samples [offset, offset + count) of every image.
//
//   images, fudge (B, C, H, W) float16 / bfloat16 / float32 / float64 / uint8 (same dtype)
//   segments (B, H, W) int64 / int32, ids in [0, M);  masks (B, N, M) bool
//   mean, std: optional (C,) float;  out_dtype: optional;  channels_last: output memory format
//   -> (B * count, C, H, W), row b * count + i is sample offset + i of image b
//
// Normalization and the dtype cast act on each pixel independently of the choice between image
// and fudge, so they are applied once to the image and once to the fudge (2 images per call,
// with the reference's own ATen expressions, hence bit-identical results) instead of to every
// sample. Each sample is then a pure per-pixel choice between two prepared images, made one of
// two ways per image:
//   runs:   superpixels are spatially coherent, so the labels in raster order form runs (a
//           224x224 quickshift segmentation with 33 segments has ~2,300 runs of ~22 pixels);
//           each run is copied whole from the image or the fudge (memcpy, one source read).
//   select: for fragmented labels (more than one run per kMinRunPixels pixels) a branch-free
//           out = fudge ^ ((image ^ fudge) & keep) on the raw bits, vectorized for every element size.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "../op_args.h"

namespace attrefine_fast {
namespace {

// Pixels per inner block: the block's keep masks (BLOCK * C elements) stay in L1.
constexpr int64_t kPixelBlock = 1024;

// The runs path pays off when runs average at least this many pixels: below it, per-run copy
// overhead exceeds the select path's per-pixel cost.
constexpr int64_t kMinRunPixels = 8;

struct Run {
  int64_t start, length;
  int32_t segment;
};

// Maximal runs of equal labels in raster order, per image; empty for an image whose labels are
// too fragmented for the runs path.
std::vector<std::vector<Run>> label_runs(const int32_t* segments, int64_t batch, int64_t pixels) {
  std::vector<std::vector<Run>> runs(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const int32_t* seg = segments + b * pixels;
    auto& r = runs[b];
    for (int64_t p = 0; p < pixels;) {
      int64_t q = p + 1;
      while (q < pixels && seg[q] == seg[p]) ++q;
      r.push_back({p, q - p, seg[p]});
      if (static_cast<int64_t>(r.size()) * kMinRunPixels > pixels) break;
      p = q;
    }
    if (static_cast<int64_t>(r.size()) * kMinRunPixels > pixels) r.clear();
  }
  return runs;
}

// Outputs of at least this many bytes per call are written with streaming (non-temporal) stores:
// they are far larger than the caches, so a cached store would first read every destination line
// from memory only to overwrite it. Smaller outputs stay cached for the model that reads them next.
constexpr int64_t kStreamingBytes = int64_t(64) << 20;
// Bytes of a sample assembled in an L1/L2-resident staging buffer before they are streamed out.
constexpr int64_t kStageBytes = int64_t(32) << 10;

// Appends byte ranges to one output sample in increasing order. Streaming, the bytes are gathered
// in a staging buffer and copied out in 16-byte non-temporal stores (the caller fences); otherwise
// they are copied straight to the output.
class SampleWriter {
 public:
  SampleWriter(char* out, bool streaming, std::vector<char>& stage) : out_(out), streaming_(streaming), stage_(stage) {}
  ~SampleWriter() { flush(); }

  void append(const char* src, int64_t len) {
    if (!streaming_) {
      std::memcpy(out_ + written_, src, len);
      written_ += len;
      return;
    }
    while (len > 0) {
      const int64_t n = std::min(len, kStageBytes - filled_);
      std::memcpy(stage_.data() + filled_, src, n);
      filled_ += n, src += n, len -= n;
      if (filled_ == kStageBytes) flush();
    }
  }

 private:
  void flush() {
    if (filled_ == 0) return;
    char* dst = out_ + written_;
    const char* src = stage_.data();
    int64_t n = filled_;
#if defined(__SSE2__)
    const int64_t head = std::min<int64_t>(n, (16 - reinterpret_cast<uintptr_t>(dst) % 16) % 16);
    std::memcpy(dst, src, head);
    int64_t e = head;
    for (; e + 16 <= n; e += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + e), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + e)));
    std::memcpy(dst + e, src + e, n - e);
#else
    std::memcpy(dst, src, n);
#endif
    written_ += n;
    filled_ = 0;
  }

  char* out_;
  bool streaming_;
  std::vector<char>& stage_;
  int64_t written_ = 0, filled_ = 0;
};

// Runs path for one sample: whole runs copied from the kept or the replaced image, in output order.
void copy_runs(const std::vector<Run>& runs, const bool* mask_row, const char* kept, const char* replaced,
               SampleWriter& out, int64_t channels, int64_t pixels, int64_t elem, bool channels_last) {
  if (channels_last) {
    const int64_t px = channels * elem;
    for (const Run& r : runs) out.append((mask_row[r.segment] ? kept : replaced) + r.start * px, r.length * px);
    return;
  }
  for (int64_t c = 0; c < channels; ++c) {
    const int64_t plane = c * pixels * elem;
    for (const Run& r : runs)
      out.append((mask_row[r.segment] ? kept : replaced) + plane + r.start * elem, r.length * elem);
  }
}

// One task per output sample, on its image's path (runs or select). kept_bits / fudge_bits /
// diff_bits: (B, C, H, W) or (B, H, W, C) raw bits; diff_bits is filled for select-path images only.
template <typename bits_t>
void produce_samples(const bits_t* kept_bits, const bits_t* fudge_bits, const bits_t* diff_bits,
                    const std::vector<std::vector<Run>>& runs, const int32_t* segments, const bool* masks,
                    bits_t* out, int64_t batch, int64_t samples, int64_t num_masks, int64_t num_segments,
                    int64_t channels, int64_t pixels, int64_t offset, int64_t count, bool channels_last) {
  // Spawning threads costs more than copying a few small samples (and, on a busy machine, a
  // static split waits for the slowest thread): keep at least ~1 MiB of output per task chunk.
  const int64_t sample_bytes = channels * pixels * static_cast<int64_t>(sizeof(bits_t));
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 20) / sample_bytes);
  const bool streaming = batch * count * sample_bytes >= kStreamingBytes;
  at::parallel_for(0, batch * count, grain, [&](int64_t begin, int64_t end) {
    std::vector<bits_t> lut(num_segments);
    std::vector<bits_t> keep(kPixelBlock * channels);
    std::vector<char> stage(streaming ? kStageBytes : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / count, i = task % count;
      const bool* mask_row = masks + (b * samples + offset + i) * num_masks;
      if (!runs[b].empty()) {
        SampleWriter writer(reinterpret_cast<char*>(out + task * channels * pixels), streaming, stage);
        copy_runs(runs[b], mask_row, reinterpret_cast<const char*>(kept_bits + b * channels * pixels),
                  reinterpret_cast<const char*>(fudge_bits + b * channels * pixels), writer, channels, pixels,
                  sizeof(bits_t), channels_last);
        continue;
      }
      for (int64_t j = 0; j < num_segments; ++j) lut[j] = mask_row[j] ? static_cast<bits_t>(~bits_t(0)) : bits_t(0);
      const int32_t* seg = segments + b * pixels;
      const bits_t* f_img = fudge_bits + b * channels * pixels;
      const bits_t* d_img = diff_bits + b * channels * pixels;
      bits_t* o_img = out + task * channels * pixels;
      for (int64_t p0 = 0; p0 < pixels; p0 += kPixelBlock) {
        const int64_t len = std::min(kPixelBlock, pixels - p0);
        if (channels_last) {
          for (int64_t p = 0; p < len; ++p) {
            const bits_t k = lut[seg[p0 + p]];
            for (int64_t c = 0; c < channels; ++c) keep[p * channels + c] = k;
          }
          const int64_t base = p0 * channels, n = len * channels;
          const bits_t* f = f_img + base;
          const bits_t* d = d_img + base;
          bits_t* o = o_img + base;
#pragma omp simd
          for (int64_t e = 0; e < n; ++e) o[e] = f[e] ^ (d[e] & keep[e]);
        } else {
          for (int64_t p = 0; p < len; ++p) keep[p] = lut[seg[p0 + p]];
          for (int64_t c = 0; c < channels; ++c) {
            const bits_t* f = f_img + c * pixels + p0;
            const bits_t* d = d_img + c * pixels + p0;
            bits_t* o = o_img + c * pixels + p0;
#pragma omp simd
            for (int64_t p = 0; p < len; ++p) o[p] = f[p] ^ (d[p] & keep[p]);
          }
        }
      }
    }
#if defined(__SSE2__)
    if (streaming) _mm_sfence();  // the streamed stores are visible before the task ends
#endif
  });
}

// Writes samples [offset, offset + count) of every image into out, in out's dtype; channels_last
// gives out's layout. Arguments are checked by the callers.
void write_samples(const at::Tensor& images, const at::Tensor& segments, const at::Tensor& masks,
                   const at::Tensor& fudge, int64_t offset, int64_t count, const std::optional<at::Tensor>& mean,
                   const std::optional<at::Tensor>& std, bool channels_last, at::Tensor& out) {
  if (out.numel() == 0) return;
  const int64_t b = images.size(0), c = images.size(1), pixels = images.size(2) * images.size(3);
  const int64_t n = masks.size(1), m = masks.size(2);
  // The reference's normalization and cast, per source image (see the header).
  const auto kept = perturb_source(images, mean, std, out.scalar_type(), channels_last);
  const auto replaced = perturb_source(fudge, mean, std, out.scalar_type(), channels_last);
  const auto seg = segments.to(at::kInt).contiguous();
  const auto msk = masks.contiguous();
  const auto runs = label_runs(seg.data_ptr<int32_t>(), b, pixels);

  const auto run = [&](auto zero_bits) {
    using bits_t = decltype(zero_bits);
    const auto* f = reinterpret_cast<const bits_t*>(replaced.data_ptr());
    const auto* k = reinterpret_cast<const bits_t*>(kept.data_ptr());
    const int64_t per_image = c * pixels;
    // diff = kept ^ replaced, needed only by the images on the select path.
    std::vector<bits_t> diff;
    for (int64_t i = 0; i < b; ++i) {
      if (!runs[i].empty()) continue;
      if (diff.empty()) diff.resize(replaced.numel());
      for (int64_t e = i * per_image; e < (i + 1) * per_image; ++e) diff[e] = k[e] ^ f[e];
    }
    produce_samples<bits_t>(k, f, diff.data(), runs, seg.data_ptr<int32_t>(), msk.data_ptr<bool>(),
                           reinterpret_cast<bits_t*>(out.data_ptr()), b, n, m, m, c, pixels, offset, count,
                           channels_last);
  };
  switch (out.element_size()) {
    case 1: run(uint8_t{0}); break;
    case 2: run(uint16_t{0}); break;
    case 4: run(uint32_t{0}); break;
    case 8: run(uint64_t{0}); break;
    default: TORCH_CHECK(false, "perturb: unsupported element size ", out.element_size());
  }
}

at::Tensor perturb_cpu(const at::Tensor& images, const at::Tensor& segments, const at::Tensor& masks,
                       const at::Tensor& fudge, int64_t offset, int64_t count, const std::optional<at::Tensor>& mean,
                       const std::optional<at::Tensor>& std, std::optional<at::ScalarType> out_dtype,
                       bool channels_last) {
  const auto dtype = check_perturb_args(images, segments, masks, fudge, offset, count, mean, std, out_dtype, at::kCPU);
  auto out = perturb_output(images, count, dtype, channels_last);
  write_samples(images, segments, masks, fudge, offset, count, mean, std, channels_last, out);
  return out;
}

// perturb into a caller's buffer: a model fed chunk after chunk reuses one buffer instead of
// faulting in fresh pages for every chunk (large allocations come straight from the OS).
void perturb_into_cpu(const at::Tensor& images, const at::Tensor& segments, const at::Tensor& masks,
                      const at::Tensor& fudge, int64_t offset, const std::optional<at::Tensor>& mean,
                      const std::optional<at::Tensor>& std, at::Tensor& out) {
  const int64_t count = check_perturb_into_args(images, segments, masks, fudge, offset, mean, std, out, at::kCPU);
  write_samples(images, segments, masks, fudge, offset, count, mean, std, !out.is_contiguous(), out);
  out.unsafeGetTensorImpl()->bump_version();  // written through a raw pointer
}

}  // namespace
}  // namespace attrefine_fast

TORCH_LIBRARY_IMPL(attrefine_fast, CPU, m) {
  m.impl("perturb", &attrefine_fast::perturb_cpu);
  m.impl("perturb_into", &attrefine_fast::perturb_into_cpu);
}
