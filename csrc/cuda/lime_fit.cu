// lime_fit on CUDA: one block per image fits every label (formulas: csrc/cpu/lime_fit.cpp).
//
//   masks (B, N, M) bool, targets (B, N, L) float32 / float64, weights (B, N) or nullptr,
//   num_segments (B,) int64  ->  coef (B, L, M), intercept, score, local_pred (B, L)
//
// Phases, all inside the block, float64 throughout:
//   1. kernel weights (a float64 scratch row) and their sum;
//   2. weighted means, one warp per column (segment or label), the warp's lanes splitting the samples;
//   3. the centred Gram matrix and right-hand sides as one product A^T W A of the augmented sample
//      matrix A = [Z - z̄ | Y - ȳ], restricted to the columns of Z: each thread accumulates a 4x4 block
//      of it in registers over all samples, which are staged in shared memory a tile at a time;
//   4. a left-looking Cholesky of gram + alpha I: per column, the pivot by one warp, then the rows
//      below it by four threads each;
//   5. forward and backward substitution for all labels at once, one barrier per row;
//   6. intercept and local_pred per label; the weighted R² in one pass over the samples for up to
//      eight labels at a time.
// Two paths: when the Gram matrix and right-hand sides fit in shared memory beside the tile
// (M <= 64 with a few labels) they live there; otherwise in a float64 scratch area in global
// memory, same code. The Gram matrix's rows are M + 1 doubles apart, so the Cholesky's threads,
// reading one row each, do not all hit the same shared-memory bank. A failed factorization (a
// singular system, alpha = 0) writes NaN and sets bit 0 of status[b]; the glue re-solves those
// images by least squares. Bit 1 says that the image's targets hold a NaN or an infinity.
#include <cmath>
#include <cstdint>

#include "block_reduce.cuh"
#include "launchers.h"

namespace attrefine_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// The default per-block shared-memory limit on every architecture; no opt-in attribute needed.
constexpr int64_t kSharedBytes = 48 * 1024;
// The kernel's static shared variables (the reduction buffer and flags, ~76 B) count against the
// same 48 KiB as the dynamic part: without this margin some (M, L) fail to launch.
constexpr int64_t kStaticSharedBytes = 128;
constexpr int64_t kMaxTile = 16;
// Labels whose residuals one thread carries at once in phase 6.
constexpr int kLabelChunk = 8;

// Doubles of the Gram matrix (rows of M + 1) and right-hand sides for up to M segments, L labels.
__host__ __device__ inline int64_t system_doubles(int64_t segments, int64_t labels) {
  return segments * (segments + 1) + segments * labels;
}

template <typename T, bool SHARED>
__global__ void __launch_bounds__(kThreads, 2) lime_fit_kernel(
    const bool* __restrict__ masks, const T* __restrict__ targets, const T* __restrict__ weights,
    const int64_t* __restrict__ num_segments, int64_t samples, int64_t max_segments, int64_t labels, double kernel_width,
    double alpha, int64_t tile, T* __restrict__ coef, T* __restrict__ intercept, T* __restrict__ score,
    T* __restrict__ local_pred, int32_t* __restrict__ status, double* __restrict__ scratch) {
  extern __shared__ double smem[];
  __shared__ double red[kWarps];
  __shared__ double bcast;
  __shared__ int failed, bad_targets;
  const int64_t b = blockIdx.x, n = samples, mm = max_segments;
  const int m = static_cast<int>(num_segments[b]), nl = static_cast<int>(labels), cols = m + nl, ld = m + 1;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool* z = masks + b * n * mm;
  const T* y = targets + b * n * nl;

  // Scratch per image: w (N), then the Gram matrix and right-hand sides unless they are shared.
  const int64_t per_image = n + (SHARED ? 0 : system_doubles(mm, nl));
  double* w = scratch + b * per_image;
  double* gram = SHARED ? smem : w + n;          // (m, ld), lower triangle used
  double* rhs = gram + m * ld;                   // (m, nl), becomes beta
  double* xbar = SHARED ? rhs + m * nl : smem;   // (cols): segment means, then label means
  double* ybar = xbar + m;                       // (nl)
  double* atile = xbar + cols;                   // (tile, cols): centred samples and targets
  double* wtile = atile + tile * cols;           // (tile)

  // 1. kernel weights and their sum
  const double kw2 = kernel_width * kernel_width;
  double part = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    double wi;
    if (weights != nullptr) {
      wi = static_cast<double>(weights[b * n + i]);
    } else {
      int ones = 0;
      for (int j = 0; j < m; ++j) ones += z[i * mm + j];
      const double d = 1.0 - sqrt(static_cast<double>(ones) / static_cast<double>(m));
      wi = sqrt(exp(-(d * d) / kw2));
    }
    w[i] = wi;
    part += wi;
  }
  part = block_sum(part, red);
  if (threadIdx.x == 0) bcast = part, failed = 0, bad_targets = 0;
  __syncthreads();
  const double sw = bcast;

  // 2. weighted means: one warp per column
  for (int c = warp; c < cols; c += kWarps) {
    double acc = 0.0;
    int ones = 0;
    if (c < m) {
#pragma unroll 4
      for (int64_t i = lane; i < n; i += 32)
        if (z[i * mm + c]) acc += w[i], ++ones;
    } else {
#pragma unroll 4
      for (int64_t i = lane; i < n; i += 32) acc += w[i] * static_cast<double>(y[i * nl + (c - m)]);
    }
    acc = warp_sum(acc);
    ones = warp_sum(ones);
    // A NaN or an infinity among the targets makes their weighted sum non-finite (0 * inf is NaN
    // too); a finite sum that overflows is settled exactly by the glue.
    if (c >= m && lane == 0 && !isfinite(acc)) bad_targets = 1;
    // A constant column gets its exact mean, so it centres to exactly zero and alpha = 0 is
    // detected as singular: sw and acc are sums in different orders, and their ratio can miss 1
    // by an ulp, which leaves a tiny positive pivot and a meaningless coefficient.
    if (lane == 0) xbar[c] = c >= m ? acc / sw : ones == n ? 1.0 : ones == 0 ? 0.0 : acc / sw;
  }
  __syncthreads();

  // 3. A^T W A for the 4x4 blocks (bj, bk) with bk <= bj and bk inside Z's columns: rows j < m
  // give the Gram matrix's lower triangle, rows j >= m the right-hand sides. Thread q of a round
  // owns pair q; a round restages the samples (one round up to M + L of about 90).
  const int nb = (cols + 3) / 4, nbz = (m + 3) / 4;
  const int pairs = nbz * nb - nbz * (nbz - 1) / 2;  // sum over bk < nbz of (nb - bk)
  for (int first = 0; first < pairs; first += kThreads) {
    const int q = first + static_cast<int>(threadIdx.x);
    const bool active = q < pairs;
    int bj = 0, bk = 0;
    if (active) {
      int r = q;
      while (r >= nb - bk) r -= nb - bk, ++bk;
      bj = bk + r;
    }
    double acc[4][4] = {};
    for (int64_t t0 = 0; t0 < n; t0 += tile) {
      const int len = static_cast<int>(min(tile, n - t0));
#pragma unroll 2
      for (int e = threadIdx.x; e < len * (cols + 1); e += kThreads) {
        const int t = e / (cols + 1), c = e - t * (cols + 1);
        const int64_t i = t0 + t;
        if (c < m)
          atile[t * cols + c] = (z[i * mm + c] ? 1.0 : 0.0) - xbar[c];
        else if (c < cols)
          atile[t * cols + c] = static_cast<double>(y[i * nl + (c - m)]) - ybar[c - m];
        else
          wtile[t] = w[i];
      }
      __syncthreads();
      if (active) {
        for (int t = 0; t < len; ++t) {
          const double* row = atile + t * cols;
          const double wt = wtile[t];
          double aj[4], ak[4];
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            aj[u] = 4 * bj + u < cols ? row[4 * bj + u] : 0.0;
            ak[u] = 4 * bk + u < cols ? wt * row[4 * bk + u] : 0.0;
          }
#pragma unroll
          for (int u = 0; u < 4; ++u)
#pragma unroll
            for (int v = 0; v < 4; ++v) acc[u][v] += aj[u] * ak[v];
        }
      }
      __syncthreads();
    }
    if (active) {
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          const int j = 4 * bj + u, k = 4 * bk + v;
          if (k >= m || j >= cols) continue;
          if (j < m) {
            if (k <= j) gram[j * ld + k] = acc[u][v];
          } else {
            rhs[k * nl + (j - m)] = acc[u][v];
          }
        }
    }
  }
  __syncthreads();

  // 4. Cholesky of gram + alpha I (lower, in place)
  for (int j = 0; j < m; ++j) {
    if (warp == 0) {
      double s = 0.0;
      for (int k = lane; k < j; k += 32) s += gram[j * ld + k] * gram[j * ld + k];
      s = warp_sum(s);
      if (lane == 0) {
        const double d = gram[j * ld + j] + alpha - s;
        if (!(d > 0.0) || !isfinite(d)) failed = 1;
        gram[j * ld + j] = sqrt(d);
      }
    }
    __syncthreads();
    if (failed) break;
    const double pivot = gram[j * ld + j];
    const int rows = m - j - 1, g = threadIdx.x % 4;
    for (int r0 = 0; r0 < rows; r0 += kThreads / 4) {  // the same trip count in every thread
      const int r = r0 + static_cast<int>(threadIdx.x) / 4, i = j + 1 + r;
      double acc = 0.0;
      if (r < rows)
        for (int k = g; k < j; k += 4) acc += gram[i * ld + k] * gram[j * ld + k];
      acc += __shfl_xor_sync(0xffffffffu, acc, 1);
      acc += __shfl_xor_sync(0xffffffffu, acc, 2);
      if (r < rows && g == 0) gram[i * ld + j] = (gram[i * ld + j] - acc) / pivot;
    }
    __syncthreads();
  }
  if (failed) {
    const T nan = static_cast<T>(NAN);
    for (int64_t q = threadIdx.x; q < nl * mm; q += kThreads) coef[b * nl * mm + q] = nan;
    for (int l = threadIdx.x; l < nl; l += kThreads)
      intercept[b * nl + l] = score[b * nl + l] = local_pred[b * nl + l] = nan;
    if (threadIdx.x == 0) status[b] = 1 | (bad_targets ? 2 : 0);
    return;
  }

  // 5. L u = rhs, then L^T beta = u, column by column: step i subtracts row i's (unscaled) value
  // times L's column i from the rows it still affects, so one barrier per row; the divisions by
  // the diagonal are applied to all rows at the end of each sweep.
  for (int i = 0; i < m; ++i) {
    const double lii = gram[i * ld + i];
    for (int p = threadIdx.x; p < (m - i - 1) * nl; p += kThreads) {
      const int k = i + 1 + p / nl, l = p % nl;
      rhs[k * nl + l] -= gram[k * ld + i] * (rhs[i * nl + l] / lii);
    }
    __syncthreads();
  }
  for (int p = threadIdx.x; p < m * nl; p += kThreads) rhs[p] /= gram[(p / nl) * ld + p / nl];
  __syncthreads();
  for (int i = m - 1; i >= 0; --i) {
    const double lii = gram[i * ld + i];
    for (int p = threadIdx.x; p < i * nl; p += kThreads) {
      const int k = p / nl, l = p % nl;
      rhs[k * nl + l] -= gram[i * ld + k] * (rhs[i * nl + l] / lii);
    }
    __syncthreads();
  }
  for (int p = threadIdx.x; p < m * nl; p += kThreads) rhs[p] /= gram[(p / nl) * ld + p / nl];
  __syncthreads();

  // 6. intercept, local_pred and coef; then the weighted R² per label from the residuals
  for (int l = threadIdx.x; l < nl; l += kThreads) {
    double icpt = ybar[l], total = 0.0;
    for (int j = 0; j < m; ++j) icpt -= xbar[j] * rhs[j * nl + l], total += rhs[j * nl + l];
    intercept[b * nl + l] = static_cast<T>(icpt);
    local_pred[b * nl + l] = static_cast<T>(icpt + total);
  }
  for (int64_t q = threadIdx.x; q < nl * mm; q += kThreads) {
    const int64_t l = q / mm, j = q % mm;
    coef[b * nl * mm + q] = j < m ? static_cast<T>(rhs[j * nl + l]) : T(0);
  }
  for (int l0 = 0; l0 < nl; l0 += kLabelChunk) {
    const int chunk = min(kLabelChunk, nl - l0);
    double rss[kLabelChunk] = {}, tss[kLabelChunk] = {};
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      double r[kLabelChunk];
#pragma unroll
      for (int u = 0; u < kLabelChunk; ++u) r[u] = u < chunk ? static_cast<double>(y[i * nl + l0 + u]) - ybar[l0 + u] : 0.0;
#pragma unroll
      for (int u = 0; u < kLabelChunk; ++u) tss[u] += w[i] * r[u] * r[u];
#pragma unroll 4
      for (int j = 0; j < m; ++j) {
        const double zc = (z[i * mm + j] ? 1.0 : 0.0) - xbar[j];
#pragma unroll
        for (int u = 0; u < kLabelChunk; ++u)
          if (u < chunk) r[u] -= zc * rhs[j * nl + l0 + u];
      }
#pragma unroll
      for (int u = 0; u < kLabelChunk; ++u) rss[u] += w[i] * r[u] * r[u];
    }
    for (int u = 0; u < chunk; ++u) {
      const double rs = block_sum(rss[u], red), ts = block_sum(tss[u], red);
      if (threadIdx.x == 0)  // scikit-learn's r2_score with force_finite
        score[b * nl + l0 + u] = static_cast<T>(ts == 0.0 ? (rs == 0.0 ? 1.0 : 0.0) : 1.0 - rs / ts);
    }
  }
  if (threadIdx.x == 0) status[b] = bad_targets ? 2 : 0;
}

int64_t tile_for(int64_t segments, int64_t labels) {
  const int64_t cap = (kSharedBytes / 2) / (8 * (segments + labels + 1));
  return cap < 1 ? 1 : (cap < kMaxTile ? cap : kMaxTile);
}

bool fits_shared(int64_t segments, int64_t labels, int64_t tile) {
  const int64_t doubles = system_doubles(segments, labels) + segments + labels + tile * (segments + labels + 1);
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
    const size_t bytes = 8 * (system_doubles(segments, labels) + segments + labels + tile * (segments + labels + 1));
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
  return batch * (samples + (shared ? 0 : system_doubles(segments, labels)));
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
