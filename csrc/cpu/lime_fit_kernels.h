// The float64 kernels of the CPU lime_fit, included by csrc/cpu/lime_fit.cpp only: the workspace
// of one image's system, the cross products Sᵀ S and the residual sums in vector-register tiles,
// the blocked Cholesky factorization and solve, and the run-time choice between their x86-64
// baseline and AVX2+FMA compilations (see lime_fit.cpp's header for the method).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_features.h"

#if ATTREFINE_X86_KERNELS
#define ATTREFINE_TARGET_AVX2 __attribute__((target("avx2,fma")))
#endif
// The kernels' bodies are inlined into one entry point per instruction set, which compiles them
// for that set.
#define ATTREFINE_INLINE __attribute__((always_inline)) inline

namespace attrefine_fast {
namespace {

// S is packed in panels of kPanel columns. A tile of cross products is kTileRows x kTileCols sums
// (one row panel by two column panels), computed as 4 x 2 vectors of accumulators per pass over
// the samples: one pass with AVX2 (4-lane vectors), two with SSE2. Eight independent chains hide
// the multiply-add latency, and the operands still fit in the 16 vector registers.
constexpr int64_t kPanel = 4;
constexpr int64_t kTileRows = 4;
constexpr int64_t kTileCols = 8;
// Samples summed in registers before their sum is added to a tile's total: a two-level sum, whose
// rounding error grows with kSumSamples + N / kSumSamples terms instead of N. At N=1000, M=64 its
// coefficients are 5x closer to a QR least-squares solution than one running sum's (2x closer than
// the reference's), for 3% more time.
constexpr int64_t kSumSamples = 32;
// Samples the tiles go through together, so that the panels they read stay in cache (256 samples
// of S are 0.5 MiB at M=256): N=5000, M=256 takes 10.7 ms instead of 14.6 (one thread; 128 and 512
// within 3%). A multiple of kSumSamples, so the sums keep their order.
constexpr int64_t kCacheSamples = 256;
static_assert(kCacheSamples % kSumSamples == 0, "a cache block is whole sum blocks");
// Samples packed per block: each panel then gets 512 contiguous bytes per block instead of 32-byte
// writes cycling through every panel (the whole fit at N=1000, M=256: 2.54 ms instead of 2.84).
constexpr int64_t kPackSamples = 16;

// float64 vectors (GCC / clang vector extension), written out because the auto-vectorizer
// vectorizes the tile loops over the samples instead, through memory.
typedef double f64x2 __attribute__((vector_size(16)));
typedef double f64x4 __attribute__((vector_size(32)));
template <typename Vec>
constexpr int64_t kLanes = sizeof(Vec) / sizeof(double);
template <typename Vec>
inline void load(Vec& v, const double* p) { std::memcpy(&v, p, sizeof v); }
template <typename Vec>
inline void store(double* p, const Vec& v) { std::memcpy(p, &v, sizeof v); }

inline int64_t round_up(int64_t x, int64_t k) { return (x + k - 1) / k * k; }

// One image's system, reused across the images a thread fits.
//
// S = √W [Zc | yc] (padded_n x cols) is packed in panels of kPanel columns, sample-major inside a
// panel: entry (i, c) lives at (c / kPanel) * padded_n * kPanel + i * kPanel + c % kPanel, so a
// tile streams its operands contiguously. Columns [0, m) are segments and [seg_cols, seg_cols + nl)
// labels; the other columns, and the samples past n (weight 0), are zeros, which add nothing to
// any sum and make every tile whole. cross = Sᵀ S restricted to segment rows: its columns [0, m)
// are the Gram matrix (lower triangle computed), those from seg_cols the right-hand sides.
struct Workspace {
  int64_t n = 0, padded_n = 0, m = 0, nl = 0, seg_cols = 0, label_cols = 0, cols = 0;
  std::vector<double> w;          // (n) sample weights
  std::vector<double> s;          // (padded_n, cols) packed S
  std::vector<double> cross;      // (seg_cols, cols) row-major
  std::vector<double> mean;       // (cols) x̄ then ȳ, zero in the padding
  std::vector<double> kernel;     // (m + 1) LIME's weight for each count of ones
  std::vector<double> chol;       // (m, m) ridge matrix, then its Cholesky factor (lower triangles)
  std::vector<double> chol_cols;  // (kPanel, m) Cholesky scratch
  std::vector<double> beta;       // (seg_cols, label_cols) right-hand sides, then β; zero padded
  std::vector<double> rss, tss;   // (label_cols)
  std::vector<int64_t> tiles;     // row panel * (cols / kTileCols) + column tile, for each tile needed

  // Sizes the buffers for an image; a no-op for the shape it already has. beta's padding rows are
  // zero-filled here only: the fit writes just the real ones.
  void shape_for(int64_t samples, int64_t segments, int64_t labels) {
    if (samples == n && segments == m && labels == nl) return;
    n = m = nl = 0;  // no shape matches until every buffer is sized: an allocation may throw
    padded_n = round_up(samples, kTileRows);
    seg_cols = round_up(segments, kTileCols);
    label_cols = round_up(labels, kTileCols);
    cols = seg_cols + label_cols;
    w.resize(samples);
    s.resize(padded_n * cols);
    cross.resize(seg_cols * cols);
    mean.resize(cols);
    kernel.resize(segments + 1);
    chol.resize(segments * segments);
    chol_cols.resize(kPanel * segments);
    beta.assign(seg_cols * label_cols, 0.0);
    rss.resize(label_cols);
    tss.resize(label_cols);
    // The Gram tiles that reach the diagonal or below it, then each row panel's label tiles.
    tiles.clear();
    const int64_t col_tiles = cols / kTileCols;
    for (int64_t r = 0; r * kTileRows < segments; ++r) {
      for (int64_t c = 0; c < col_tiles; ++c) {
        const bool lower = c * kTileCols < (r + 1) * kTileRows;
        if (lower || c * kTileCols >= seg_cols) tiles.push_back(r * col_tiles + c);
      }
    }
    n = samples, m = segments, nl = labels;
  }

  // Column c of S from sample 0, kPanel apart: a tile operand.
  const double* column(int64_t c) const { return s.data() + c / kPanel * padded_n * kPanel + c % kPanel; }
};

// out[r][0, 2 * lanes) += Σ a_i[r] (b0_i, b1_i) over the samples i in [i0, i1): one pass of a tile,
// 4 rows by 2 vectors. Per sample, 8 vector multiply-adds into 8 accumulators, which sum
// kSumSamples samples in order before they are added to out.
template <typename Vec>
ATTREFINE_INLINE void add_tile_pass(const double* a, const double* b0, const double* b1, int64_t i0, int64_t i1,
                                    double* out, int64_t ld) {
  constexpr int64_t lanes = kLanes<Vec>;
  for (int64_t k0 = i0; k0 < i1; k0 += kSumSamples) {
    Vec acc[kTileRows][2] = {};
    for (int64_t i = k0; i < std::min(k0 + kSumSamples, i1); ++i) {
      Vec x0, x1;
      load(x0, b0 + i * kPanel);
      load(x1, b1 + i * kPanel);
      for (int64_t r = 0; r < kTileRows; ++r) {
        acc[r][0] += a[i * kPanel + r] * x0;
        acc[r][1] += a[i * kPanel + r] * x1;
      }
    }
    for (int64_t r = 0; r < kTileRows; ++r) {
      for (int64_t h = 0; h < 2; ++h) {
        Vec total;
        load(total, out + r * ld + h * lanes);
        store(out + r * ld + h * lanes, total + acc[r][h]);
      }
    }
  }
}

// cross[tile] = Sᵀ S for ws.tiles[lo, hi), in passes of 2 vectors' worth of columns, kCacheSamples
// samples at a time for all the tiles, so that the panels they read stay in cache.
template <typename Vec>
ATTREFINE_INLINE void cross_tiles(Workspace& ws, int64_t lo, int64_t hi) {
  constexpr int64_t lanes = kLanes<Vec>;
  const int64_t cols = ws.cols, col_tiles = cols / kTileCols;
  for (int64_t t = lo; t < hi; ++t) {
    const int64_t row0 = ws.tiles[t] / col_tiles * kTileRows, col0 = ws.tiles[t] % col_tiles * kTileCols;
    for (int64_t r = 0; r < kTileRows; ++r) std::fill_n(&ws.cross[(row0 + r) * cols + col0], kTileCols, 0.0);
  }
  for (int64_t i0 = 0; i0 < ws.padded_n; i0 += kCacheSamples) {
    const int64_t i1 = std::min(i0 + kCacheSamples, ws.padded_n);
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t row0 = ws.tiles[t] / col_tiles * kTileRows, col0 = ws.tiles[t] % col_tiles * kTileCols;
      for (int64_t c = col0; c < col0 + kTileCols; c += 2 * lanes) {
        double* out = &ws.cross[row0 * cols + c];
        add_tile_pass<Vec>(ws.column(row0), ws.column(c), ws.column(c + lanes), i0, i1, out, cols);
      }
    }
  }
}

// Sums of squares, over the samples in order, of the weighted residuals √w (yc - Zc β) (rss) and
// of √w yc (tss) for the kTileCols labels of label tile `tile`, in passes of 2 vectors' worth of
// labels. The residuals of 4 samples x 2 vectors of labels are updated segment by segment.
template <typename Vec>
ATTREFINE_INLINE void residual_sums(Workspace& ws, int64_t tile) {
  constexpr int64_t lanes = kLanes<Vec>;
  const int64_t padded_n = ws.padded_n, m = ws.m, width = ws.label_cols;
  for (int64_t l0 = tile * kTileCols; l0 < (tile + 1) * kTileCols; l0 += 2 * lanes) {
    const double *y0 = ws.column(ws.seg_cols + l0), *y1 = ws.column(ws.seg_cols + l0 + lanes);
    const double* beta = ws.beta.data() + l0;
    Vec rs[2] = {}, ts[2] = {};
    for (int64_t i = 0; i < padded_n; i += kTileRows) {
      Vec r[kTileRows][2];
      for (int64_t t = 0; t < kTileRows; ++t) {
        Vec v0, v1;  // loaded outside the array, which would otherwise stay in memory
        load(v0, y0 + (i + t) * kPanel);
        load(v1, y1 + (i + t) * kPanel);
        r[t][0] = v0;
        r[t][1] = v1;
        ts[0] += v0 * v0;
        ts[1] += v1 * v1;
      }
      for (int64_t j = 0; j < m; ++j) {
        const double* z = ws.column(j) + i * kPanel;
        Vec b0, b1;
        load(b0, beta + j * width);
        load(b1, beta + j * width + lanes);
        for (int64_t t = 0; t < kTileRows; ++t) {
          r[t][0] -= z[t * kPanel] * b0;
          r[t][1] -= z[t * kPanel] * b1;
        }
      }
      for (int64_t t = 0; t < kTileRows; ++t) {
        rs[0] += r[t][0] * r[t][0];
        rs[1] += r[t][1] * r[t][1];
      }
    }
    for (int64_t h = 0; h < 2; ++h) {
      store(ws.rss.data() + l0 + h * lanes, rs[h]);
      store(ws.tss.data() + l0 + h * lanes, ts[h]);
    }
  }
}

// In-place lower Cholesky of ws.chol (m x m row-major, lower triangle only); false if it is not
// positive definite. Right-looking, kPanel columns at a time: the panel's columns are copied into
// chol_cols (contiguous, where chol's columns are strided) and factored there, then each trailing
// row is updated by the whole panel in one vectorized pass, so an entry is loaded and stored once
// per panel rather than once per column. Every entry still gets its subtractions in column order,
// as in the textbook column-by-column algorithm.
ATTREFINE_INLINE bool cholesky_lower(Workspace& ws) {
  const int64_t m = ws.m;
  double *a = ws.chol.data(), *l = ws.chol_cols.data();
  for (int64_t j0 = 0; j0 < m; j0 += kPanel) {
    const int64_t width = std::min(kPanel, m - j0), j1 = j0 + width;
    std::fill(l + width * m, l + kPanel * m, 0.0);  // a narrower last panel: zero columns
    for (int64_t i = j0; i < m; ++i) {
      for (int64_t q = 0; q < width && j0 + q <= i; ++q) l[q * m + i] = a[i * m + j0 + q];
    }
    for (int64_t q = 0; q < width; ++q) {
      const int64_t j = j0 + q;
      double* lj = l + q * m;
      const double d2 = lj[j];
      if (!(d2 > 0.0) || !std::isfinite(d2)) return false;
      const double d = std::sqrt(d2);
      lj[j] = d;
      for (int64_t i = j + 1; i < m; ++i) lj[i] /= d;
      for (int64_t q2 = q + 1; q2 < width; ++q2) {  // the panel's later columns
        double* lk = l + q2 * m;
        const double lkj = lj[j0 + q2];
        for (int64_t i = j0 + q2; i < m; ++i) lk[i] -= lj[i] * lkj;
      }
    }
    for (int64_t i = j0; i < m; ++i) {
      for (int64_t q = 0; q < width && j0 + q <= i; ++q) a[i * m + j0 + q] = l[q * m + i];
    }
    const double *l0 = l, *l1 = l + m, *l2 = l + 2 * m, *l3 = l + 3 * m;
    for (int64_t i = j1; i < m; ++i) {
      double* row = a + i * m;
      const double li0 = l0[i], li1 = l1[i], li2 = l2[i], li3 = l3[i];
#pragma omp simd
      for (int64_t k = j1; k <= i; ++k) row[k] = row[k] - li0 * l0[k] - li1 * l1[k] - li2 * l2[k] - li3 * l3[k];
    }
  }
  return true;
}

// Solves (L Lᵀ) β = rhs in place in ws.beta (m x label_cols), all labels at once: each step
// subtracts a multiple of one row from another, whole vectors at a time, and no sum waits on the
// previous one.
ATTREFINE_INLINE void cholesky_solve(Workspace& ws) {
  const int64_t m = ws.m, width = ws.label_cols;
  const double* chol = ws.chol.data();
  double* b = ws.beta.data();
  for (int64_t k = 0; k < m; ++k) {  // L Y = B
    double* bk = b + k * width;
    for (int64_t l = 0; l < width; ++l) bk[l] /= chol[k * m + k];
    for (int64_t i = k + 1; i < m; ++i) {
      const double lik = chol[i * m + k];
#pragma omp simd
      for (int64_t l = 0; l < width; ++l) b[i * width + l] -= lik * bk[l];
    }
  }
  for (int64_t i = m - 1; i >= 0; --i) {  // Lᵀ X = Y
    double* bi = b + i * width;
    for (int64_t l = 0; l < width; ++l) bi[l] /= chol[i * m + i];
    for (int64_t k = 0; k < i; ++k) {
      const double lik = chol[i * m + k];
#pragma omp simd
      for (int64_t l = 0; l < width; ++l) b[k * width + l] -= lik * bi[l];
    }
  }
}

// The hot loops compiled for one instruction set.
struct Kernels {
  void (*cross_tiles)(Workspace&, int64_t lo, int64_t hi);
  void (*residual_sums)(Workspace&, int64_t tile);
  bool (*cholesky_lower)(Workspace&);
  void (*cholesky_solve)(Workspace&);
};

void cross_tiles_base(Workspace& ws, int64_t lo, int64_t hi) { cross_tiles<f64x2>(ws, lo, hi); }
void residual_sums_base(Workspace& ws, int64_t tile) { residual_sums<f64x2>(ws, tile); }
bool cholesky_lower_base(Workspace& ws) { return cholesky_lower(ws); }
void cholesky_solve_base(Workspace& ws) { cholesky_solve(ws); }
#if ATTREFINE_X86_KERNELS
ATTREFINE_TARGET_AVX2 void cross_tiles_avx2(Workspace& ws, int64_t lo, int64_t hi) { cross_tiles<f64x4>(ws, lo, hi); }
ATTREFINE_TARGET_AVX2 void residual_sums_avx2(Workspace& ws, int64_t tile) { residual_sums<f64x4>(ws, tile); }
ATTREFINE_TARGET_AVX2 bool cholesky_lower_avx2(Workspace& ws) { return cholesky_lower(ws); }
ATTREFINE_TARGET_AVX2 void cholesky_solve_avx2(Workspace& ws) { cholesky_solve(ws); }
#endif

// AVX2 with FMA where the CPU has them: the whole fit is 2.4x faster than with the SSE2 kernels at
// N=1000, M=256 (Xeon, one thread). Sums keep their order either way; FMA adds each product
// unrounded (IEEE fusedMultiplyAdd), so results differ from the baseline's in the last bits only.
const Kernels& kernels() {
  static const Kernels picked = [] {
#if ATTREFINE_X86_KERNELS
    if (cpu_runs_avx2_fma()) return Kernels{cross_tiles_avx2, residual_sums_avx2, cholesky_lower_avx2, cholesky_solve_avx2};
#endif
    return Kernels{cross_tiles_base, residual_sums_base, cholesky_lower_base, cholesky_solve_base};
  }();
  return picked;
}

}  // namespace
}  // namespace attrefine_fast
