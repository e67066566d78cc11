// lime_fit on CUDA: one block per image fits every label (formulas: csrc/cpu/lime_fit.cpp).
//
//   masks (B, N, M) bool, targets (B, N, L) float32 / float64, weights (B, N) or nullptr,
//   num_segments (B,) int64  ->  coef (B, L, M), intercept, score, local_pred (B, L)
//
// Phases, all inside the block, float64 throughout:
//   0. the image's masks packed to bits, one 32-bit word per 32 segments of a sample (N x M bytes
//      read once, coalesced; every later phase reads the bits);
//   1. kernel weights and their sum;
//   2. weighted means, one warp per column (segment or label), the warp's lanes splitting the
//      samples;
//   3. the centred Gram matrix and right-hand sides as one product A^T W A of the augmented sample
//      matrix A = [Z - z̄ | Y - ȳ], restricted to the columns of Z: each thread accumulates a 4x4 block
//      of it in registers over all samples, straight from the bits and the weights (no barrier);
//   4. a left-looking Cholesky of gram + alpha I: per column, the pivot by one warp, then the rows
//      below it by four threads each;
//   5. forward and backward substitution, one warp per label (warp barriers only);
//   6. intercept and local_pred per label; the weighted R² in one pass over the samples for up to
//      eight labels at a time.
// Where things live: the bits and the weights ("samples") and the Gram matrix with the right-hand
// sides ("system") are in shared memory when they fit the device's per-block limit (opted in
// beyond the default 48 KiB), otherwise in a float64 scratch area in global memory; same code
// (Layout below). The Gram matrix's rows are M + 1 doubles apart, so the Cholesky's threads,
// reading one row each, do not all hit the same shared-memory bank. A failed factorization (a
// singular system, alpha = 0) writes NaN and sets bit 0 of status[b]; the glue re-solves those
// images by least squares. Bit 1 says that the image's targets hold a NaN or an infinity; bit 2
// that num_segments[b] is outside 1..M (the image is not fitted: NaN), which the glue reports.
#include <cmath>
#include <cstdint>

#include "block_reduce.cuh"
#include "launchers.h"

namespace attrefine_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// The per-block shared memory every architecture allows without opting in.
constexpr int64_t kDefaultSharedBytes = 48 * 1024;
// The kernel's static shared variables (the reduction buffer and flags, ~76 B) count against the
// same limit as the dynamic part.
constexpr int64_t kStaticSharedBytes = 128;
// Labels whose residuals one thread carries at once in phase 6.
constexpr int kLabelChunk = 8;

// benchmarks/lime_fit_phases.cu builds this file with ATTREFINE_LIME_FIT_PHASE_CLOCKS to time the
// phases on a GPU: thread 0 of block b writes clock64() to phase_clocks[b * kPhaseMarks + k] at
// the start (k = 0) and after each phase's closing barrier (k = 1 .. 7).
#ifdef ATTREFINE_LIME_FIT_PHASE_CLOCKS
constexpr int kPhaseMarks = 8;
__device__ long long* phase_clocks;
#define PHASE_MARK(k) \
  if (threadIdx.x == 0) phase_clocks[blockIdx.x * kPhaseMarks + (k)] = clock64()
#else
#define PHASE_MARK(k)
#endif

// Doubles of the Gram matrix (rows of M + 1) and right-hand sides for up to M segments, L labels.
__host__ __device__ inline int64_t system_doubles(int64_t segments, int64_t labels) {
  return segments * (segments + 1) + segments * labels;
}

// 32-bit words of one sample's packed mask, and doubles of an image's weights and packed masks.
__host__ __device__ inline int64_t mask_words(int64_t segments) { return (segments + 31) / 32; }
__host__ __device__ inline int64_t samples_doubles(int64_t samples, int64_t segments) {
  return samples + (samples * mask_words(segments) + 1) / 2;
}

// Bit u of the result is whether byte u of the 16 is non-zero.
__device__ inline uint32_t pack16(uint4 v) {
  const uint32_t parts[4] = {v.x, v.y, v.z, v.w};
  uint32_t r = 0;
#pragma unroll
  for (int p = 0; p < 4; ++p)
#pragma unroll
    for (int k = 0; k < 4; ++k) r |= static_cast<uint32_t>(((parts[p] >> (8 * k)) & 0xffu) != 0) << (4 * p + k);
  return r;
}

// Which of the segments' mean-centred values (1 - mean or -mean) a set or clear bit stands for;
// zero for the padding columns (>= m).
struct Centred {
  double one[4], zero[4];
  __device__ Centred(const double* xbar, int first, int m) {
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const bool valid = first + u < m;
      one[u] = valid ? 1.0 - xbar[first + u] : 0.0;
      zero[u] = valid ? 0.0 - xbar[first + u] : 0.0;
    }
  }
};

// An image without a fit: NaN in its coef (size values) and its per-label outputs.
template <typename T>
__device__ void write_nan(T* coef, int64_t size, T* intercept, T* score, T* local_pred, int64_t labels) {
  const T nan = static_cast<T>(NAN);
  for (int64_t q = threadIdx.x; q < size; q += kThreads) coef[q] = nan;
  for (int64_t l = threadIdx.x; l < labels; l += kThreads) intercept[l] = score[l] = local_pred[l] = nan;
}

template <typename T, bool SYSTEM_SHARED, bool SAMPLES_SHARED>
__global__ void __launch_bounds__(kThreads, 2) lime_fit_kernel(
    const bool* __restrict__ masks, const T* __restrict__ targets, const T* __restrict__ weights,
    const int64_t* __restrict__ num_segments, int64_t samples, int64_t max_segments, int64_t labels, double kernel_width,
    double alpha, T* __restrict__ coef, T* __restrict__ intercept, T* __restrict__ score, T* __restrict__ local_pred,
    int32_t* __restrict__ status, double* __restrict__ scratch) {
  extern __shared__ double smem[];
  __shared__ double red[kWarps];
  __shared__ double bcast;
  __shared__ int failed, bad_targets;
  const int64_t b = blockIdx.x, n = samples, mm = max_segments;
  if (num_segments[b] < 1 || num_segments[b] > mm) {  // the whole block leaves, before any barrier
    write_nan(coef + b * labels * mm, labels * mm, intercept + b * labels, score + b * labels,
              local_pred + b * labels, labels);
    if (threadIdx.x == 0) status[b] = 4;
    return;
  }
  const int m = static_cast<int>(num_segments[b]), nl = static_cast<int>(labels), cols = m + nl, ld = m + 1;
  const int nw = static_cast<int>(mask_words(mm));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool* z = masks + b * n * mm;
  const T* y = targets + b * n * nl;

  // Shared: [system] [means (mm + nl)] [samples]; scratch per image: [system] [samples], each
  // part only where it is not shared.
  const int64_t per_image = (SYSTEM_SHARED ? 0 : system_doubles(mm, nl)) + (SAMPLES_SHARED ? 0 : samples_doubles(n, mm));
  double* global = scratch + b * per_image;
  double* gram = SYSTEM_SHARED ? smem : global;  // (m, ld), lower triangle used
  double* rhs = gram + m * ld;                   // (m, nl), becomes beta
  double* xbar = SYSTEM_SHARED ? smem + system_doubles(mm, nl) : smem;  // (cols): segment means, then label means
  double* ybar = xbar + m;                                               // (nl)
  double* w = SAMPLES_SHARED ? xbar + mm + nl : global + (SYSTEM_SHARED ? 0 : system_doubles(mm, nl));  // (n)
  uint32_t* bits = reinterpret_cast<uint32_t*>(w + n);  // (n, nw): bit j of word q is segment 32 q + j

  PHASE_MARK(0);

  // 0. the masks as bits; 16-byte loads where every sample is whole words of aligned bytes
  if (mm % 32 == 0 && reinterpret_cast<uintptr_t>(z) % 16 == 0) {
    const uint4* v = reinterpret_cast<const uint4*>(z);
    for (int64_t q = threadIdx.x; q < n * nw; q += kThreads) bits[q] = pack16(v[2 * q]) | pack16(v[2 * q + 1]) << 16;
  } else {
    for (int64_t q = threadIdx.x; q < n * nw; q += kThreads) {
      const int64_t i = q / nw, first = (q % nw) * 32;
      const int len = static_cast<int>(min(int64_t(32), mm - first));
      uint32_t word = 0;
      const auto* bytes = reinterpret_cast<const unsigned char*>(z + i * mm + first);
      for (int k = 0; k < len; ++k) word |= static_cast<uint32_t>(bytes[k] != 0) << k;
      bits[q] = word;
    }
  }
  __syncthreads();
  PHASE_MARK(1);

  // 1. kernel weights and their sum, counting the segments of the image (m of the mm columns)
  const double kw2 = kernel_width * kernel_width;
  double part = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    double wi;
    if (weights != nullptr) {
      wi = static_cast<double>(weights[b * n + i]);
    } else {
      int ones = 0;
      for (int q = 0; q < nw; ++q) {
        const int left = m - 32 * q;
        const uint32_t valid = left >= 32 ? 0xffffffffu : left <= 0 ? 0u : (1u << left) - 1u;
        ones += __popc(bits[i * nw + q] & valid);
      }
      const double d = 1.0 - sqrt(static_cast<double>(ones) / static_cast<double>(m));
      wi = sqrt(exp(-(d * d) / kw2));
    }
    w[i] = wi;
    part += wi;
  }
  part = block_sum(part, red);
  if (threadIdx.x == 0) bcast = part, failed = 0, bad_targets = 0;
  __syncthreads();
  PHASE_MARK(2);
  const double sw = bcast;

  // 2. weighted means: one warp per column
  for (int c = warp; c < cols; c += kWarps) {
    double acc = 0.0;
    int ones = 0;
    if (c < m) {
#pragma unroll 4
      for (int64_t i = lane; i < n; i += 32)
        if ((bits[i * nw + c / 32] >> (c % 32)) & 1u) acc += w[i], ++ones;
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
  PHASE_MARK(3);

  // 3. A^T W A for the 4x4 blocks (bj, bk) with bk <= bj and bk inside Z's columns. Z's columns
  // are padded to nbz blocks, Y's follow: blocks bj < nbz give the Gram matrix's lower triangle
  // (pairs 0 .. nbz (nbz + 1) / 2 - 1), blocks bj >= nbz the right-hand sides (the pairs after
  // them, so that the threads reading targets share as few warps as possible with the others).
  // Thread q of a round owns pair q and reads every sample.
  const int nbz = (m + 3) / 4, nby = (nl + 3) / 4, gram_pairs = nbz * (nbz + 1) / 2;
  const int pairs = gram_pairs + nbz * nby;
  for (int first = 0; first < pairs; first += kThreads) {
    const int q = first + static_cast<int>(threadIdx.x);
    if (q >= pairs) break;
    int bj = 0, bk = 0;
    if (q < gram_pairs) {
      while ((bj + 1) * (bj + 2) / 2 <= q) ++bj;
      bk = q - bj * (bj + 1) / 2;
    } else {
      bj = nbz + (q - gram_pairs) / nbz;
      bk = (q - gram_pairs) % nbz;
    }
    const bool label_rows = bj >= nbz;
    const Centred ck(xbar, 4 * bk, m), cj(xbar, label_rows ? 0 : 4 * bj, label_rows ? 0 : m);
    int label[4];
    double ym[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int l = 4 * (bj - nbz) + u;
      label[u] = label_rows && l < nl ? l : -1;
      ym[u] = label[u] >= 0 ? ybar[l] : 0.0;
    }
    const int wj = label_rows ? 0 : bj / 8, sj = label_rows ? 0 : 4 * (bj % 8), wk = bk / 8, sk = 4 * (bk % 8);
    double acc[4][4] = {};
#pragma unroll 2
    for (int64_t t = 0; t < n; ++t) {
      const uint32_t* row = bits + t * nw;
      const uint32_t nk = row[wk] >> sk, nj = row[wj] >> sj;
      const double wt = w[t];
      double aj[4], ak[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        ak[u] = wt * ((nk >> u) & 1u ? ck.one[u] : ck.zero[u]);
        if (label_rows)
          aj[u] = label[u] >= 0 ? static_cast<double>(y[t * nl + label[u]]) - ym[u] : 0.0;
        else
          aj[u] = (nj >> u) & 1u ? cj.one[u] : cj.zero[u];
      }
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[u][v] += aj[u] * ak[v];
    }
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const int k = 4 * bk + v;
        if (k >= m) continue;
        if (!label_rows) {
          const int j = 4 * bj + u;
          if (j < m && k <= j) gram[j * ld + k] = acc[u][v];
        } else if (label[u] >= 0) {
          rhs[k * nl + label[u]] = acc[u][v];
        }
      }
  }
  __syncthreads();
  PHASE_MARK(4);

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
    write_nan(coef + b * nl * mm, nl * mm, intercept + b * nl, score + b * nl, local_pred + b * nl, nl);
    if (threadIdx.x == 0) status[b] = 1 | (bad_targets ? 2 : 0);
    return;
  }
  PHASE_MARK(5);

  // 5. L u = rhs, then L^T beta = u, one warp per label: step i scales row i by the reciprocal of
  // the diagonal and subtracts it, times L's column i, from the rows it still affects (lanes split
  // the rows). The reciprocals are kept in the Gram matrix's padding column (column m of ld).
  for (int i = threadIdx.x; i < m; i += kThreads) gram[i * ld + m] = 1.0 / gram[i * ld + i];
  __syncthreads();
  for (int l = warp; l < nl; l += kWarps) {
    for (int i = 0; i < m; ++i) {
      const double ui = rhs[i * nl + l] * gram[i * ld + m];
      __syncwarp();
      if (lane == 0) rhs[i * nl + l] = ui;
      for (int k = i + 1 + lane; k < m; k += 32) rhs[k * nl + l] -= gram[k * ld + i] * ui;
      __syncwarp();
    }
    for (int i = m - 1; i >= 0; --i) {
      const double bi = rhs[i * nl + l] * gram[i * ld + m];
      __syncwarp();
      if (lane == 0) rhs[i * nl + l] = bi;
      for (int k = lane; k < i; k += 32) rhs[k * nl + l] -= gram[i * ld + k] * bi;
      __syncwarp();
    }
  }
  __syncthreads();
  PHASE_MARK(6);

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
      const uint32_t* row = bits + i * nw;
#pragma unroll 4
      for (int j = 0; j < m; ++j) {
        const double zc = ((row[j / 32] >> (j % 32)) & 1u ? 1.0 : 0.0) - xbar[j];
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
  PHASE_MARK(7);
}

// Which parts of an image's working set live in shared memory, how many bytes of it the block
// takes, and how many doubles of scratch each image needs for the rest. The samples (phases 0-3
// and 6 read them N times over) go to shared memory first, then the system.
struct Layout {
  bool system_shared, samples_shared;
  int64_t shared_bytes, scratch_per_image;
};

Layout layout_for(int64_t samples, int64_t segments, int64_t labels, int64_t shared_limit) {
  const int64_t means = segments + labels, system = system_doubles(segments, labels);
  const int64_t sample_part = samples_doubles(samples, segments);
  for (const auto& choice : {Layout{true, true}, Layout{false, true}, Layout{true, false}, Layout{false, false}}) {
    const int64_t shared = means + (choice.system_shared ? system : 0) + (choice.samples_shared ? sample_part : 0);
    if (8 * shared <= shared_limit || (!choice.system_shared && !choice.samples_shared))
      return {choice.system_shared, choice.samples_shared, 8 * shared,
              (choice.system_shared ? 0 : system) + (choice.samples_shared ? 0 : sample_part)};
  }
  return {};  // not reached: the last choice always returns
}

// The dynamic shared memory a block of the current device may use (opting in beyond 48 KiB).
int64_t shared_limit() {
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess)
    optin = 0;
  return (optin > kDefaultSharedBytes ? optin : kDefaultSharedBytes) - kStaticSharedBytes;
}

template <typename T, bool SYSTEM_SHARED, bool SAMPLES_SHARED>
void launch_kernel(const Layout& layout, int64_t batch, cudaStream_t stream, const bool* masks, const T* y,
                   const T* wt, const int64_t* num_segments, int64_t samples, int64_t segments, int64_t labels,
                   double kernel_width, double alpha, T* c, T* i, T* s, T* lp, int32_t* status, double* scratch) {
  auto kernel = lime_fit_kernel<T, SYSTEM_SHARED, SAMPLES_SHARED>;
  if (layout.shared_bytes > kDefaultSharedBytes - kStaticSharedBytes)
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(layout.shared_bytes));
  kernel<<<static_cast<unsigned>(batch), kThreads, static_cast<size_t>(layout.shared_bytes), stream>>>(
      masks, y, wt, num_segments, samples, segments, labels, kernel_width, alpha, c, i, s, lp, status, scratch);
}

template <typename T>
void launch(const bool* masks, const void* targets, const void* weights, const int64_t* num_segments, int64_t batch,
            int64_t samples, int64_t segments, int64_t labels, double kernel_width, double alpha, void* coef,
            void* intercept, void* score, void* local_pred, int32_t* status, double* scratch, cudaStream_t stream) {
  const Layout layout = layout_for(samples, segments, labels, shared_limit());
  const auto* y = static_cast<const T*>(targets);
  const auto* wt = static_cast<const T*>(weights);
  auto *c = static_cast<T*>(coef), *i = static_cast<T*>(intercept), *s = static_cast<T*>(score),
       *lp = static_cast<T*>(local_pred);
  const auto go = [&](auto launcher) {
    launcher(layout, batch, stream, masks, y, wt, num_segments, samples, segments, labels, kernel_width, alpha, c, i, s,
             lp, status, scratch);
  };
  if (layout.system_shared && layout.samples_shared)
    go(launch_kernel<T, true, true>);
  else if (layout.samples_shared)
    go(launch_kernel<T, false, true>);
  else if (layout.system_shared)
    go(launch_kernel<T, true, false>);
  else
    go(launch_kernel<T, false, false>);
}

}  // namespace

int64_t lime_fit_scratch_doubles(int64_t batch, int64_t samples, int64_t segments, int64_t labels) {
  return batch * layout_for(samples, segments, labels, shared_limit()).scratch_per_image;
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
