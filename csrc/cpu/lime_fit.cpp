// lime_fit on the CPU: LIME's weighted ridge regression for every image and label, fused.
//
//   masks (B, N, M) bool: binary samples, columns j >= M_b of image b are padding
//   targets (B, N, L) float32 / float64;  num_segments (B,) int64 with 1 <= M_b <= M
//   weights: optional (B, N) in targets' dtype (None: LIME's kernel of the cosine distance)
//   -> coef (B, L, M) (zeros in padded columns), intercept (B, L), score (B, L), local_pred (B, L)
//
// Per image, in one workspace: kernel weights from the masks, weighted means, the centred
// weighted Gram matrix and the right-hand sides of all labels, a Cholesky solve of
// (Zcᵀ W Zc + αI) β = Zcᵀ W yc (the intercept is unpenalized because the data are centred), then
// the intercept, weighted R² and local_pred. Everything accumulates in float64 whatever the input
// dtype, so float32 results are at least as accurate as attrefine_fast.ops.lime_fit_ref's.
//
// Two paths:
//   M <= kFastPathMaxSegments and B >= threads: images in parallel, each image's whole system in
//     its thread's workspace (Gram ≤ 512 KiB, cache resident).
//   otherwise (one or few images, or a large M): images one after another, parallel inside the
//     image (Gram rows, right-hand sides, residuals).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "../op_args.h"

namespace attrefine_fast {
namespace {

// 256 segments: the Gram matrix (256² float64 = 512 KiB) still fits a core's L2 beside the data.
constexpr int64_t kFastPathMaxSegments = 256;

template <typename scalar_t>
struct FitProblem {
  const bool* masks;        // (B, N, M)
  const scalar_t* targets;  // (B, N, L)
  const int64_t* num_segments;
  const scalar_t* weights;  // (B, N) or nullptr
  int64_t samples, max_segments, labels;
  double kernel_width, alpha;
  scalar_t *coef, *intercept, *score, *local_pred;
};

// Buffers of one image's system, reused across the images a thread fits.
struct Workspace {
  std::vector<double> w, zc, wzc, yc, xbar, ybar, gram, chol, rhs, beta, resid;
  void size_for(int64_t n, int64_t m, int64_t l) {
    w.resize(n);
    zc.resize(m * n);
    wzc.resize(m * n);
    yc.resize(l * n);
    xbar.resize(m);
    ybar.resize(l);
    gram.resize(m * m);
    chol.resize(m * m);
    rhs.resize(m * l);
    beta.resize(m * l);
    resid.resize(n);
  }
};

inline double dot(const double* a, const double* b, int64_t n) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// In-place lower Cholesky of the m x m row-major matrix a; false if it is not positive definite.
bool cholesky_lower(double* a, int64_t m) {
  for (int64_t j = 0; j < m; ++j) {
    double d = a[j * m + j] - dot(a + j * m, a + j * m, j);
    if (!(d > 0.0) || !std::isfinite(d)) return false;
    d = std::sqrt(d);
    a[j * m + j] = d;
    for (int64_t i = j + 1; i < m; ++i) a[i * m + j] = (a[i * m + j] - dot(a + i * m, a + j * m, j)) / d;
  }
  return true;
}

// Solves (L Lᵀ) x = b for each of the `labels` columns of b (m x labels, row-major), in place.
void cholesky_solve(const double* chol, double* b, int64_t m, int64_t labels) {
  for (int64_t l = 0; l < labels; ++l) {
    for (int64_t i = 0; i < m; ++i) {
      double s = b[i * labels + l];
      for (int64_t k = 0; k < i; ++k) s -= chol[i * m + k] * b[k * labels + l];
      b[i * labels + l] = s / chol[i * m + i];
    }
    for (int64_t i = m - 1; i >= 0; --i) {
      double s = b[i * labels + l];
      for (int64_t k = i + 1; k < m; ++k) s -= chol[k * m + i] * b[k * labels + l];
      b[i * labels + l] = s / chol[i * m + i];
    }
  }
}

// Below this many Gram multiply-adds (M² N) an image is fitted by one thread: waking a second
// costs more than it saves (0.6 ms for M=33, N=1000 on one thread; 20+ ms with two threads
// on a busy 2-core machine, where the split waits for the slower one).
constexpr int64_t kMinParallelWork = int64_t(1) << 23;

template <typename scalar_t>
void fit_image(const FitProblem<scalar_t>& p, int64_t b, Workspace& ws) {
  const int64_t n = p.samples, mm = p.max_segments, nl = p.labels;
  const int64_t m = p.num_segments[b];
  // Grain sizes: the whole range (serial) unless the image is big enough to share.
  const bool inner = m * m * n >= kMinParallelWork;
  const int64_t grain_n = inner ? 256 : n, grain_m = inner ? 4 : m, grain_l = inner ? 1 : nl;
  ws.size_for(n, m, nl);
  const bool* masks = p.masks + b * n * mm;
  const scalar_t* targets = p.targets + b * n * nl;
  double* w = ws.w.data();

  // Kernel weights: d = 1 - sqrt(k / M_b) with k the ones among the image's own segments.
  const double kw2 = p.kernel_width * p.kernel_width;
  for (int64_t i = 0; i < n; ++i) {
    if (p.weights != nullptr) {
      w[i] = static_cast<double>(p.weights[b * n + i]);
      continue;
    }
    int64_t ones = 0;
    for (int64_t j = 0; j < m; ++j) ones += masks[i * mm + j];
    const double d = 1.0 - std::sqrt(static_cast<double>(ones) / static_cast<double>(m));
    w[i] = std::sqrt(std::exp(-(d * d) / kw2));
  }
  double sw = 0.0;
  std::fill(ws.xbar.begin(), ws.xbar.end(), 0.0);
  std::fill(ws.ybar.begin(), ws.ybar.end(), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    sw += w[i];
    for (int64_t j = 0; j < m; ++j) ws.xbar[j] += masks[i * mm + j] ? w[i] : 0.0;
    for (int64_t l = 0; l < nl; ++l) ws.ybar[l] += w[i] * static_cast<double>(targets[i * nl + l]);
  }
  for (auto& v : ws.xbar) v /= sw;
  for (auto& v : ws.ybar) v /= sw;

  // Centred data, transposed so that every Gram entry is a contiguous dot product over samples.
  double *zc = ws.zc.data(), *wzc = ws.wzc.data(), *yc = ws.yc.data();
  at::parallel_for(0, n, grain_n, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      for (int64_t j = 0; j < m; ++j) {
        const double v = (masks[i * mm + j] ? 1.0 : 0.0) - ws.xbar[j];
        zc[j * n + i] = v;
        wzc[j * n + i] = w[i] * v;
      }
      for (int64_t l = 0; l < nl; ++l) yc[l * n + i] = static_cast<double>(targets[i * nl + l]) - ws.ybar[l];
    }
  });
  double *gram = ws.gram.data(), *rhs = ws.rhs.data(), *beta = ws.beta.data();
  at::parallel_for(0, m, grain_m, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      for (int64_t k = 0; k <= j; ++k) gram[j * m + k] = gram[k * m + j] = dot(wzc + j * n, zc + k * n, n);
      gram[j * m + j] += p.alpha;
      for (int64_t l = 0; l < nl; ++l) rhs[j * nl + l] = dot(wzc + j * n, yc + l * n, n);
    }
  });

  std::copy(ws.gram.begin(), ws.gram.end(), ws.chol.begin());
  std::copy(ws.rhs.begin(), ws.rhs.end(), ws.beta.begin());
  if (cholesky_lower(ws.chol.data(), m)) {
    cholesky_solve(ws.chol.data(), beta, m, nl);
  } else {
    // Singular (alpha = 0 with a constant column): the minimum-norm least-squares solution. The
    // SVD driver (gelsd), because the default rank-revealing QR (gelsy) misjudges the rank of
    // these small exactly-singular systems (rank 2 of 3 in the tests) and drops real coefficients.
    const auto opts = at::TensorOptions().dtype(at::kDouble);
    auto sol = at::linalg_lstsq(at::from_blob(gram, {m, m}, opts), at::from_blob(rhs, {m, nl}, opts), std::nullopt,
                                "gelsd");
    auto solution = std::get<0>(sol).contiguous();
    std::copy(solution.data_ptr<double>(), solution.data_ptr<double>() + m * nl, beta);
  }

  // Residuals y - ŷ = yc - Zc β, label by label, for the weighted R².
  at::parallel_for(0, nl, grain_l, [&](int64_t lo, int64_t hi) {
    std::vector<double> resid(n);
    for (int64_t l = lo; l < hi; ++l) {
      const double* y = yc + l * n;
      std::copy(y, y + n, resid.begin());
      double icpt = ws.ybar[l], total = 0.0;
      for (int64_t j = 0; j < m; ++j) {
        const double bj = beta[j * nl + l];
        const double* z = zc + j * n;
        double* r = resid.data();
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) r[i] -= z[i] * bj;
        icpt -= ws.xbar[j] * bj;
        total += bj;
      }
      double rss = 0.0, tss = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        rss += w[i] * resid[i] * resid[i];
        tss += w[i] * y[i] * y[i];
      }
      // scikit-learn's r2_score with force_finite: a constant target scores 1 if fitted exactly.
      const double score = tss == 0.0 ? (rss == 0.0 ? 1.0 : 0.0) : 1.0 - rss / tss;
      p.intercept[b * nl + l] = static_cast<scalar_t>(icpt);
      p.score[b * nl + l] = static_cast<scalar_t>(score);
      p.local_pred[b * nl + l] = static_cast<scalar_t>(icpt + total);
      scalar_t* coef = p.coef + (b * nl + l) * mm;
      for (int64_t j = 0; j < mm; ++j) coef[j] = j < m ? static_cast<scalar_t>(beta[j * nl + l]) : scalar_t(0);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lime_fit_cpu(const at::Tensor& masks,
                                                                         const at::Tensor& targets,
                                                                         const at::Tensor& num_segments,
                                                                         const std::optional<at::Tensor>& weights,
                                                                         double kernel_width, double alpha) {
  check_lime_fit_args(masks, targets, num_segments, weights, kernel_width, alpha, at::kCPU);
  const int64_t b = masks.size(0), n = masks.size(1), m = masks.size(2), nl = targets.size(2);

  const auto msk = masks.contiguous();
  const auto tgt = targets.contiguous();
  const auto segs = num_segments.contiguous();
  const auto wts = weights.has_value() ? weights->contiguous() : at::Tensor();
  auto coef = at::empty({b, nl, m}, targets.options());
  auto intercept = at::empty({b, nl}, targets.options());
  auto score = at::empty({b, nl}, targets.options());
  auto local_pred = at::empty({b, nl}, targets.options());

  AT_DISPATCH_FLOATING_TYPES(targets.scalar_type(), "lime_fit_cpu", [&] {
    FitProblem<scalar_t> p{msk.data_ptr<bool>(),
                           tgt.data_ptr<scalar_t>(),
                           segs.data_ptr<int64_t>(),
                           wts.defined() ? wts.data_ptr<scalar_t>() : nullptr,
                           n,
                           m,
                           nl,
                           kernel_width,
                           alpha,
                           coef.data_ptr<scalar_t>(),
                           intercept.data_ptr<scalar_t>(),
                           score.data_ptr<scalar_t>(),
                           local_pred.data_ptr<scalar_t>()};
    if (m <= kFastPathMaxSegments && b >= at::get_num_threads()) {
      // Nested parallel_for calls inside fit_image run inline here: one image per thread at a time.
      at::parallel_for(0, b, 1, [&](int64_t lo, int64_t hi) {
        Workspace ws;
        for (int64_t i = lo; i < hi; ++i) fit_image(p, i, ws);
      });
    } else {
      Workspace ws;
      for (int64_t i = 0; i < b; ++i) fit_image(p, i, ws);
    }
  });
  return {coef, intercept, score, local_pred};
}

}  // namespace
}  // namespace attrefine_fast

TORCH_LIBRARY_IMPL(attrefine_fast, CPU, m) {
  m.impl("lime_fit", &attrefine_fast::lime_fit_cpu);
}
