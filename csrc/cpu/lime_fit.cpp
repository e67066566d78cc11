// lime_fit on the CPU: LIME's weighted ridge regression for every image and label, fused.
//
//   masks (B, N, M) bool: binary samples, columns j >= M_b of image b are padding
//   targets (B, N, L) float32 / float64;  num_segments (B,) int64 with 1 <= M_b <= M
//   weights: optional (B, N) in targets' dtype (None: LIME's kernel of the cosine distance)
//   -> coef (B, L, M) (zeros in padded columns), intercept (B, L), score (B, L), local_pred (B, L)
//
// Per image, in one workspace: kernel weights from the masks, weighted means, the centred data
// scaled by √w, S = √W [Zc | yc], and their cross products Sᵀ S, which hold both the Gram matrix
// Zcᵀ W Zc and the right-hand sides Zcᵀ W yc of all labels; a Cholesky solve of
// (Zcᵀ W Zc + αI) β = Zcᵀ W yc (the intercept is unpenalized because the data are centred), then
// the intercept, weighted R² (from the weighted residuals √W (yc - Zc β)) and local_pred.
// Everything accumulates in float64 whatever the input dtype, so float32 results are at least as
// accurate as attrefine_fast.ops.lime_fit_ref's.
//
// The cross products are computed in register tiles: one pass over the samples updates 32
// independent sums held in vector registers, where one dot product per entry is a single chain of
// dependent adds that leaves the multipliers idle. The hot loops are compiled for x86-64's
// baseline and, where the CPU has them, for AVX2 with FMA (Kernels, picked once at run time).
//
// Two paths:
//   M <= kFastPathMaxSegments and B >= threads: images in parallel, each image's whole system in
//     its thread's workspace (Gram ≤ 512 KiB, cache resident).
//   otherwise (one or few images, or a large M): images one after another, parallel inside an
//     image big enough to share (samples while packing, tiles of the cross products, blocks of
//     labels for the residuals).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "../op_args.h"
#include "lime_fit_kernels.h"

namespace attrefine_fast {
namespace {

// 256 segments: the Gram matrix (256² float64 = 512 KiB) still fits a core's L2 beside the data.
constexpr int64_t kFastPathMaxSegments = 256;

// Below this many Gram multiply-adds (M² N) an image is fitted by one thread: waking a second
// costs more than it saves (2-core Xeon: N=256, M=64 takes 0.07 ms on one thread, 0.10 ms on two;
// N=1000, M=48 0.15 ms and 0.13 ms).
constexpr int64_t kMinParallelWork = int64_t(1) << 21;

template <typename scalar_t>
struct FitProblem {
  const bool* masks;        // (B, N, M)
  const scalar_t* targets;  // (B, N, L)
  const int64_t* num_segments;
  const scalar_t* weights;  // (B, N) or nullptr
  int64_t samples, max_segments, labels;
  double kernel_width, alpha;
  scalar_t *coef, *intercept, *score, *local_pred;

  // Image b's masks as bytes (0 / 1): the compiler vectorizes sums and conversions of uint8, not
  // of bool. The masks are random bits, so they enter arithmetic as values, never as branches.
  const uint8_t* bits(int64_t b) const { return reinterpret_cast<const uint8_t*>(masks + b * samples * max_segments); }
};

// Sample weights (ws.w) of image b: given, or LIME's kernel of d = 1 - sqrt(k / M_b) with k the
// ones among the image's own segments. The kernel takes only M_b + 1 values: tabulate them.
template <typename scalar_t>
void sample_weights(const FitProblem<scalar_t>& p, int64_t b, Workspace& ws) {
  const int64_t n = ws.n, m = ws.m, mm = p.max_segments;
  if (p.weights != nullptr) {
    for (int64_t i = 0; i < n; ++i) ws.w[i] = static_cast<double>(p.weights[b * n + i]);
    return;
  }
  const double kw2 = p.kernel_width * p.kernel_width;
  for (int64_t k = 0; k <= m; ++k) {
    const double d = 1.0 - std::sqrt(static_cast<double>(k) / static_cast<double>(m));
    ws.kernel[k] = std::sqrt(std::exp(-(d * d) / kw2));
  }
  const uint8_t* bits = p.bits(b);
  for (int64_t i = 0; i < n; ++i) {
    int32_t ones = 0;
    for (int64_t j = 0; j < m; ++j) ones += bits[i * mm + j];
    ws.w[i] = ws.kernel[ones];
  }
}

// Weighted means x̄, ȳ (ws.mean), then the packed S = √W [Z - x̄ | y - ȳ] (ws.s). A block of
// samples is first read into rows of doubles, zero-padded to whole panels, then written panel by
// panel. Padded samples (i >= n) have weight 0, so their rows are zeros.
template <typename scalar_t>
void pack_scaled(const FitProblem<scalar_t>& p, int64_t b, Workspace& ws, int64_t grain) {
  const int64_t n = ws.n, m = ws.m, nl = ws.nl, mm = p.max_segments, seg_cols = ws.seg_cols, cols = ws.cols;
  const uint8_t* bits = p.bits(b);
  const scalar_t* targets = p.targets + b * n * nl;
  const double* w = ws.w.data();
  double* mean = ws.mean.data();
  double sw = 0.0;
  std::fill(ws.mean.begin(), ws.mean.end(), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const double wi = w[i];
    sw += wi;
    for (int64_t j = 0; j < m; ++j) mean[j] += wi * static_cast<double>(bits[i * mm + j]);
    for (int64_t l = 0; l < nl; ++l) mean[seg_cols + l] += wi * static_cast<double>(targets[i * nl + l]);
  }
  for (int64_t c = 0; c < cols; ++c) mean[c] /= sw;

  const int64_t panel_size = ws.padded_n * kPanel;
  double* s = ws.s.data();
  at::parallel_for(0, ws.padded_n, grain, [&](int64_t lo, int64_t hi) {
    std::vector<double> rows(kPackSamples * cols, 0.0);
    double root_w[kPackSamples];
    for (int64_t i0 = lo; i0 < hi; i0 += kPackSamples) {
      const int64_t count = std::min(kPackSamples, hi - i0);
      for (int64_t t = 0; t < count; ++t) {
        const int64_t i = i0 + t;
        root_w[t] = i < n ? std::sqrt(w[i]) : 0.0;
        if (i >= n) continue;  // weight 0 zeroes whatever the row holds
        double* row = rows.data() + t * cols;
        for (int64_t j = 0; j < m; ++j) row[j] = static_cast<double>(bits[i * mm + j]);
        for (int64_t l = 0; l < nl; ++l) row[seg_cols + l] = static_cast<double>(targets[i * nl + l]);
      }
      for (int64_t c = 0; c < cols; c += kLanes<f64x2>) {
        f64x2 mu, v;
        load(mu, mean + c);
        double* panel = s + c / kPanel * panel_size + c % kPanel;
        for (int64_t t = 0; t < count; ++t) {
          load(v, rows.data() + t * cols + c);
          store(panel + (i0 + t) * kPanel, root_w[t] * (v - mu));
        }
      }
    }
  });
}

// The lower triangle of the ridge matrix Zcᵀ W Zc + αI (m x m, row-major) from ws.cross.
void ridge_matrix_lower(const Workspace& ws, double alpha, double* a) {
  for (int64_t j = 0; j < ws.m; ++j) {
    std::copy_n(&ws.cross[j * ws.cols], j + 1, a + j * ws.m);
    a[j * ws.m + j] += alpha;
  }
}

// β into ws.beta from the cross products: the right-hand sides, zero-padded to label_cols, are
// solved in place.
void solve_ridge(const Kernels& k, Workspace& ws, double alpha) {
  const int64_t m = ws.m, nl = ws.nl, width = ws.label_cols;
  for (int64_t j = 0; j < m; ++j) std::copy_n(&ws.cross[j * ws.cols + ws.seg_cols], width, &ws.beta[j * width]);
  ridge_matrix_lower(ws, alpha, ws.chol.data());
  if (k.cholesky_lower(ws)) {
    k.cholesky_solve(ws);
  } else {
    // Singular (alpha = 0 with a constant column): the minimum-norm least-squares solution. The
    // SVD driver (gelsd), because the default rank-revealing QR (gelsy) misjudges the rank of
    // these small exactly-singular systems (rank 2 of 3 in the tests) and drops real coefficients.
    const auto opts = at::TensorOptions().dtype(at::kDouble);
    auto gram = at::zeros({m, m}, opts);
    ridge_matrix_lower(ws, alpha, gram.data_ptr<double>());
    gram += gram.tril(-1).mT();
    auto beta = at::from_blob(ws.beta.data(), {m, nl}, {width, 1}, opts);
    if (!at::isfinite(gram).all().item<bool>() || !at::isfinite(beta).all().item<bool>()) {
      // Sums past float64's range (weights near its limit with large targets): NaN coefficients,
      // as the reference's solve gives, rather than LAPACK's reaction to non-finite input.
      beta.fill_(std::numeric_limits<double>::quiet_NaN());
      return;
    }
    beta.copy_(std::get<0>(at::linalg_lstsq(gram, beta, std::nullopt, "gelsd")));
  }
}

template <typename scalar_t>
void fit_image(const FitProblem<scalar_t>& p, const Kernels& k, int64_t b, Workspace& ws) {
  const int64_t n = p.samples, mm = p.max_segments, nl = p.labels;
  const int64_t m = p.num_segments[b];
  ws.shape_for(n, m, nl);
  // Grain sizes: the whole range (serial) unless the image is big enough to share.
  const bool inner = m * m * n >= kMinParallelWork;
  const int64_t num_tiles = static_cast<int64_t>(ws.tiles.size()), label_tiles = ws.label_cols / kTileCols;
  const int64_t grain_n = inner ? 256 : ws.padded_n, grain_tiles = inner ? 4 : num_tiles;
  const int64_t grain_l = inner ? 1 : label_tiles;

  sample_weights(p, b, ws);
  pack_scaled(p, b, ws, grain_n);
  at::parallel_for(0, num_tiles, grain_tiles, [&](int64_t lo, int64_t hi) { k.cross_tiles(ws, lo, hi); });
  solve_ridge(k, ws, p.alpha);
  at::parallel_for(0, label_tiles, grain_l, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) k.residual_sums(ws, t);
  });

  for (int64_t l = 0; l < nl; ++l) {
    double icpt = ws.mean[ws.seg_cols + l], total = 0.0;
    for (int64_t j = 0; j < m; ++j) {
      const double bj = ws.beta[j * ws.label_cols + l];
      icpt -= ws.mean[j] * bj;
      total += bj;
    }
    const double rss = ws.rss[l], tss = ws.tss[l];
    // scikit-learn's r2_score with force_finite: a constant target scores 1 if fitted exactly.
    const double score = tss == 0.0 ? (rss == 0.0 ? 1.0 : 0.0) : 1.0 - rss / tss;
    p.intercept[b * nl + l] = static_cast<scalar_t>(icpt);
    p.score[b * nl + l] = static_cast<scalar_t>(score);
    p.local_pred[b * nl + l] = static_cast<scalar_t>(icpt + total);
    scalar_t* coef = p.coef + (b * nl + l) * mm;
    for (int64_t j = 0; j < mm; ++j) {
      coef[j] = j < m ? static_cast<scalar_t>(ws.beta[j * ws.label_cols + l]) : scalar_t(0);
    }
  }
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

  const Kernels& k = kernels();
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
        for (int64_t i = lo; i < hi; ++i) fit_image(p, k, i, ws);
      });
    } else {
      Workspace ws;
      for (int64_t i = 0; i < b; ++i) fit_image(p, k, i, ws);
    }
  });
  return {coef, intercept, score, local_pred};
}

}  // namespace
}  // namespace attrefine_fast

TORCH_LIBRARY_IMPL(attrefine_fast, CPU, m) {
  m.impl("lime_fit", &attrefine_fast::lime_fit_cpu);
}
