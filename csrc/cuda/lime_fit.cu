// lime_fit on CUDA: one block per image fits every label (formulas: csrc/cpu/lime_fit.cpp).
//
//   masks (B, N, M) bool, targets (B, N, L) float32 / float64, weights (B, N) or nullptr,
//   num_segments (B,) int64  ->  coef (B, L, M), intercept, score, local_pred (B, L)
//
// Phases, all inside the block: kernel weights (kept in a float64 scratch row), weighted means,
// the centred Gram matrix and right-hand sides accumulated over tiles of samples staged in shared
// memory, a left-looking Cholesky (one column per step, rows in parallel), one triangular solve
// per label, then intercept, local_pred and the weighted R² by block reductions. float64 throughout.
// Two paths: when the Gram matrix and right-hand sides fit in shared memory beside the tile
// (M <= 64 with a few labels: 32 KiB for the Gram matrix) they live there; otherwise in a float64
// scratch area in global memory, same code. A failed factorization (a singular system, alpha = 0)
// sets status[b] and writes NaN; the glue re-solves those images by least squares.
#include <cmath>
#include <cstdint>

#include "block_reduce.cuh"
#include "launchers.h"

namespace attrefine_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// The default per-block shared-memory limit on every architecture; no opt-in attribute needed.
constexpr int64_t kSharedBytes = 48 * 1024;
// The kernel's static shared variables (the reduction buffer and flags, ~76 B) count against the
// same 48 KiB as the dynamic part: without this margin some (M, L) fail to launch.
constexpr int64_t kStaticSharedBytes = 128;
constexpr int64_t kMaxTile = 16;

// Row j and column k (k <= j) of lower-triangle entry number p.
__device__ __forceinline__ void lower_entry(int64_t p, int64_t& j, int64_t& k) {
  j = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(p) + 1.0) - 1.0) / 2.0);
  while (j * (j + 1) / 2 > p) --j;
  while ((j + 1) * (j + 2) / 2 <= p) ++j;
  k = p - j * (j + 1) / 2;
}

template <typename T, bool SHARED>
__global__ void __launch_bounds__(kThreads) lime_fit_kernel(
    const bool* __restrict__ masks, const T* __restrict__ targets, const T* __restrict__ weights,
    const int64_t* __restrict__ num_segments, int64_t samples, int64_t max_segments, int64_t labels, double kernel_width,
    double alpha, int64_t tile, T* __restrict__ coef, T* __restrict__ intercept, T* __restrict__ score,
    T* __restrict__ local_pred, int32_t* __restrict__ status, double* __restrict__ scratch) {
  extern __shared__ double smem[];
  __shared__ double red[kThreads / 32];
  __shared__ double bcast;
  __shared__ int failed;
  const int64_t b = blockIdx.x, n = samples, mm = max_segments, nl = labels;
  const int64_t m = num_segments[b];
  const bool* z = masks + b * n * mm;
  const T* y = targets + b * n * nl;

  // Scratch per image: w (N), then the Gram matrix and right-hand sides unless they are shared.
  const int64_t per_image = n + (SHARED ? 0 : mm * mm + mm * nl);
  double* w = scratch + b * per_image;
  double* gram = SHARED ? smem : w + n;          // (m, m), lower triangle used
  double* rhs = gram + m * m;                    // (m, nl), becomes beta
  double* xbar = SHARED ? rhs + m * nl : smem;   // (m)
  double* ybar = xbar + m;                       // (nl)
  double* ztile = ybar + nl;                     // (tile, m): centred samples
  double* ytile = ztile + tile * m;              // (tile, nl): centred targets
  double* wtile = ytile + tile * nl;             // (tile)

  // 1. kernel weights and their sum
  const double kw2 = kernel_width * kernel_width;
  double part = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    double wi;
    if (weights != nullptr) {
      wi = static_cast<double>(weights[b * n + i]);
    } else {
      int64_t ones = 0;
      for (int64_t j = 0; j < m; ++j) ones += z[i * mm + j];
      const double d = 1.0 - sqrt(static_cast<double>(ones) / static_cast<double>(m));
      wi = sqrt(exp(-(d * d) / kw2));
    }
    w[i] = wi;
    part += wi;
  }
  part = block_sum(part, red);
  if (threadIdx.x == 0) bcast = part, failed = 0;
  __syncthreads();
  const double sw = bcast;

  // 2. weighted means: one column (segment or label) per thread
  for (int64_t c = threadIdx.x; c < m + nl; c += blockDim.x) {
    double acc = 0.0;
    if (c < m) {
      int64_t ones = 0;
      for (int64_t i = 0; i < n; ++i) acc += z[i * mm + c] ? (++ones, w[i]) : 0.0;
      // A constant column gets its exact mean, so it centres to exactly zero and alpha = 0 is
      // detected as singular: sw comes from a tree reduction, acc from a sequential sum, and their
      // ratio can miss 1 by an ulp, which leaves a tiny positive pivot and a meaningless coefficient.
      xbar[c] = ones == n ? 1.0 : ones == 0 ? 0.0 : acc / sw;
    } else {
      for (int64_t i = 0; i < n; ++i) acc += w[i] * static_cast<double>(y[i * nl + (c - m)]);
      xbar[c] = acc / sw;  // xbar and ybar are adjacent
    }
  }
  const int64_t gram_entries = m * (m + 1) / 2, entries = gram_entries + m * nl;
  for (int64_t p = threadIdx.x; p < entries; p += blockDim.x) {
    if (p < gram_entries) {
      int64_t j, k;
      lower_entry(p, j, k);
      gram[j * m + k] = 0.0;
    } else {
      rhs[p - gram_entries] = 0.0;
    }
  }
  __syncthreads();

  // 3. Gram matrix and right-hand sides, a tile of samples at a time
  for (int64_t t0 = 0; t0 < n; t0 += tile) {
    const int64_t len = min(tile, n - t0);
    for (int64_t q = threadIdx.x; q < len * (m + nl + 1); q += blockDim.x) {
      const int64_t t = q / (m + nl + 1), c = q % (m + nl + 1), i = t0 + t;
      if (c < m)
        ztile[t * m + c] = (z[i * mm + c] ? 1.0 : 0.0) - xbar[c];
      else if (c < m + nl)
        ytile[t * nl + (c - m)] = static_cast<double>(y[i * nl + (c - m)]) - ybar[c - m];
      else
        wtile[t] = w[i];
    }
    __syncthreads();
    for (int64_t p = threadIdx.x; p < entries; p += blockDim.x) {
      double acc = 0.0;
      if (p < gram_entries) {
        int64_t j, k;
        lower_entry(p, j, k);
        for (int64_t t = 0; t < len; ++t) acc += wtile[t] * ztile[t * m + j] * ztile[t * m + k];
        gram[j * m + k] += acc;
      } else {
        const int64_t j = (p - gram_entries) / nl, l = (p - gram_entries) % nl;
        for (int64_t t = 0; t < len; ++t) acc += wtile[t] * ztile[t * m + j] * ytile[t * nl + l];
        rhs[j * nl + l] += acc;
      }
    }
    __syncthreads();
  }

  // 4. Cholesky of gram + alpha I (lower, in place): column j's pivot, then its rows in parallel
  for (int64_t j = 0; j < m; ++j) {
    double s = 0.0;
    for (int64_t k = threadIdx.x; k < j; k += blockDim.x) s += gram[j * m + k] * gram[j * m + k];
    s = block_sum(s, red);
    if (threadIdx.x == 0) {
      const double d = gram[j * m + j] + alpha - s;
      if (!(d > 0.0) || !isfinite(d)) failed = 1;
      gram[j * m + j] = sqrt(d);
    }
    __syncthreads();
    if (failed) break;
    const double pivot = gram[j * m + j];
    for (int64_t i = j + 1 + threadIdx.x; i < m; i += blockDim.x) {
      double acc = gram[i * m + j];
      for (int64_t k = 0; k < j; ++k) acc -= gram[i * m + k] * gram[j * m + k];
      gram[i * m + j] = acc / pivot;
    }
    __syncthreads();
  }
  if (failed) {
    const T nan = static_cast<T>(NAN);
    for (int64_t q = threadIdx.x; q < nl * mm; q += blockDim.x) coef[b * nl * mm + q] = nan;
    for (int64_t l = threadIdx.x; l < nl; l += blockDim.x)
      intercept[b * nl + l] = score[b * nl + l] = local_pred[b * nl + l] = nan;
    if (threadIdx.x == 0) status[b] = 1;
    return;
  }

  // 5. triangular solves, one label per thread; then intercept, local_pred and coef
  for (int64_t l = threadIdx.x; l < nl; l += blockDim.x) {
    for (int64_t i = 0; i < m; ++i) {
      double s = rhs[i * nl + l];
      for (int64_t k = 0; k < i; ++k) s -= gram[i * m + k] * rhs[k * nl + l];
      rhs[i * nl + l] = s / gram[i * m + i];
    }
    for (int64_t i = m - 1; i >= 0; --i) {
      double s = rhs[i * nl + l];
      for (int64_t k = i + 1; k < m; ++k) s -= gram[k * m + i] * rhs[k * nl + l];
      rhs[i * nl + l] = s / gram[i * m + i];
    }
    double icpt = ybar[l], total = 0.0;
    for (int64_t j = 0; j < m; ++j) icpt -= xbar[j] * rhs[j * nl + l], total += rhs[j * nl + l];
    intercept[b * nl + l] = static_cast<T>(icpt);
    local_pred[b * nl + l] = static_cast<T>(icpt + total);
  }
  __syncthreads();
  for (int64_t q = threadIdx.x; q < nl * mm; q += blockDim.x) {
    const int64_t l = q / mm, j = q % mm;
    coef[b * nl * mm + q] = j < m ? static_cast<T>(rhs[j * nl + l]) : T(0);
  }

  // 6. weighted R² per label: residuals yc - zc·beta over the samples
  for (int64_t l = 0; l < nl; ++l) {
    double rss = 0.0, tss = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const double yc = static_cast<double>(y[i * nl + l]) - ybar[l];
      double r = yc;
      for (int64_t j = 0; j < m; ++j) r -= ((z[i * mm + j] ? 1.0 : 0.0) - xbar[j]) * rhs[j * nl + l];
      rss += w[i] * r * r;
      tss += w[i] * yc * yc;
    }
    rss = block_sum(rss, red);
    tss = block_sum(tss, red);
    if (threadIdx.x == 0)  // scikit-learn's r2_score with force_finite
      score[b * nl + l] = static_cast<T>(tss == 0.0 ? (rss == 0.0 ? 1.0 : 0.0) : 1.0 - rss / tss);
  }
}

int64_t tile_for(int64_t segments, int64_t labels) {
  const int64_t cap = (kSharedBytes / 2) / (8 * (segments + labels + 1));
  return cap < 1 ? 1 : (cap < kMaxTile ? cap : kMaxTile);
}

bool fits_shared(int64_t segments, int64_t labels, int64_t tile) {
  const int64_t doubles = segments * segments + segments * labels + segments + labels + tile * (segments + labels + 1);
  return doubles * 8 <= kSharedBytes - kStaticSharedBytes;
}

template <typename T>
void launch(const bool* masks, const void* targets, const void* weights, const int64_t* num_segments, int64_t batch,
            int64_t samples, int64_t segments, int64_t labels, double kernel_width, double alpha, void* coef,
            void* intercept, void* score, void* local_pred, int32_t* status, double* scratch, cudaStream_t stream) {
  const int64_t tile = tile_for(segments, labels);
  const auto* y = static_cast<const T*>(targets);
  const auto* wt = static_cast<const T*>(weights);
  auto *c = static_cast<T*>(coef), *i = static_cast<T*>(intercept), *s = static_cast<T*>(score),
       *lp = static_cast<T*>(local_pred);
  if (fits_shared(segments, labels, tile)) {
    const size_t bytes = 8 * (segments * segments + segments * labels + segments + labels + tile * (segments + labels + 1));
    lime_fit_kernel<T, true><<<static_cast<unsigned>(batch), kThreads, bytes, stream>>>(
        masks, y, wt, num_segments, samples, segments, labels, kernel_width, alpha, tile, c, i, s, lp, status, scratch);
  } else {
    const size_t bytes = 8 * (segments + labels + tile * (segments + labels + 1));
    lime_fit_kernel<T, false><<<static_cast<unsigned>(batch), kThreads, bytes, stream>>>(
        masks, y, wt, num_segments, samples, segments, labels, kernel_width, alpha, tile, c, i, s, lp, status, scratch);
  }
}

}  // namespace

int64_t lime_fit_scratch_doubles(int64_t batch, int64_t samples, int64_t segments, int64_t labels) {
  const bool shared = fits_shared(segments, labels, tile_for(segments, labels));
  return batch * (samples + (shared ? 0 : segments * segments + segments * labels));
}

void lime_fit(const bool* masks, const void* targets, const void* weights, const int64_t* num_segments, Elem type,
              int64_t batch, int64_t samples, int64_t segments, int64_t labels, double kernel_width, double alpha,
              void* coef, void* intercept, void* score, void* local_pred, int32_t* status, double* scratch,
              cudaStream_t stream) {
  if (type == Elem::f64)
    launch<double>(masks, targets, weights, num_segments, batch, samples, segments, labels, kernel_width, alpha, coef,
                   intercept, score, local_pred, status, scratch, stream);
  else
    launch<float>(masks, targets, weights, num_segments, batch, samples, segments, labels, kernel_width, alpha, coef,
                  intercept, score, local_pred, status, scratch, stream);
}

}  // namespace cuda
}  // namespace attrefine_fast
