// masked_pgd_step on the CPU: one PGD update with a per-pixel weight, in place on x_adv.
//
//   x_adv, x, grad (B, C, H, W) float16 / bfloat16 / float32 / float64 (same dtype and shape),
//   contiguous or channels-last;  weight: optional (B, H, W) in [0, 1], broadcast over channels
//   L-inf:  x_adv = clamp(x + clamp(x_adv + step * weight * sign(grad) - x, -eps, eps), lo, hi)
//   L2:     g = weight * grad;  δ = x_adv + step * (g / (‖g‖ + 1e-10)) - x;  δ *= min(1, eps / ‖δ‖)
//           (2^-24 for 1e-10 in float16, where 1e-10 rounds to 0;
//           the factor is 1 for eps = ‖δ‖ = 0)
//           x_adv = clamp(x + δ, lo, hi)
//
// Every intermediate is rounded to the tensor's dtype in the reference's order
// (attrefine_fast.ops.masked_pgd_step_ref), so L-inf matches it exactly in every dtype. float16 and
// bfloat16 run in float: where the CPU has AVX2 and F16C, eight elements at a time with the
// conversions in registers (half_step_avx2.h; 2-7x faster in float16, up to 2.3x in bfloat16);
// elsewhere, and for the last n % 8 elements of a chunk, converted a tile at a time and rounded
// there (half_float.h). Both give the same bits.
// L-inf is one pass over memory. L2 needs the per-sample norms ‖g‖ and ‖δ‖ before any element can
// be written, so it takes two passes: the first accumulates Σg², Σa·g and Σa² (a = x_adv - x) in
// float64, from which ‖δ‖² = Σa² + 2c Σa·g + c² Σg² (c = step / (‖g‖ + 1e-10)) follows without
// materializing δ; the second writes. float64 accumulation keeps that expansion's cancellation far
// below the reference's own float32 rounding.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "../op_args.h"
#include "half_float.h"
#include "half_step_avx2.h"

namespace attrefine_fast {
namespace {

// Elements per task: 16 Ki keeps a task's four streams in L2 and gives B * C * H * W / 16 Ki
// tasks, enough to balance two to a few dozen threads even for one image.
constexpr int64_t kChunk = 1 << 14;
// Running sums per quantity in L2's norm pass (see l2_step).
constexpr int kLanes = 8;

template <typename scalar_t>
struct StepArgs {
  scalar_t* x_adv;
  const scalar_t *x, *grad, *weight;  // weight (B, H, W) or nullptr
  int64_t batch, channels, pixels;
  bool channels_last;
  double step_size, eps, lo, hi;
};

// Elements of each stream converted to float per tile in the float16/bfloat16 paths: four
// streams of 512 floats (8 KB) stay in L1.
constexpr int64_t kTile = 512;
static_assert(kTile % kLanes == 0, "a tile holds whole groups of L2's running sums");

// Added to ‖g‖ before dividing by it: torchattacks' 1e-10, or float16's smallest subnormal where
// 1e-10 rounds to 0 (attrefine_fast/ops/masked_pgd_step.py, division_guard).
template <typename scalar_t>
inline at::opmath_type<scalar_t> division_guard() {
  return static_cast<at::opmath_type<scalar_t>>(std::is_same_v<scalar_t, at::Half> ? 0x1p-24 : 1e-10);
}

// The weights of elements [begin, end) of sample b into out: each pixel's weight repeated over the
// channels, by runs (NCHW) or by counting (NHWC) rather than a division per element.
template <typename scalar_t>
void expand_weight(const StepArgs<scalar_t>& a, int64_t b, int64_t begin, int64_t end, scalar_t* out) {
  const scalar_t* w = a.weight + b * a.pixels;
  if (a.channels_last) {
    int64_t p = begin / a.channels, c = begin % a.channels;
    for (int64_t e = begin; e < end; ++e) {
      out[e - begin] = w[p];
      if (++c == a.channels) c = 0, ++p;
    }
    return;
  }
  for (int64_t e = begin, p = begin % a.pixels; e < end; p = 0) {
    const int64_t run = std::min(end - e, a.pixels - p);
    std::copy_n(w + p, run, out + (e - begin));
    e += run;
  }
}

// Runs body(b, task, begin, end, weight) over chunks of every sample in parallel, where
// weight[e - begin] is element e's weight, or weight is nullptr when there are no weights.
template <typename scalar_t, typename F>
void for_sample_chunks(const StepArgs<scalar_t>& a, F body) {
  const int64_t per_sample = a.channels * a.pixels;
  const int64_t chunks = (per_sample + kChunk - 1) / kChunk;
  // 4 chunks (64 Ki elements) per thread at least, so that small batches stay on one thread but one
  // 224x224 RGB image (10 chunks) takes two: with 16 it took one, and L2 on two cores took 0.239 ms
  // (float32) and 0.315 ms (float16) against 0.131 and 0.187 ms now (benchmarks/cpu_half_precision.py).
  at::parallel_for(0, a.batch * chunks, 4, [&](int64_t lo, int64_t hi) {
    std::vector<scalar_t> weight(a.weight != nullptr ? kChunk : 0);
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t b = t / chunks, begin = (t % chunks) * kChunk, end = std::min(per_sample, begin + kChunk);
      if (a.weight != nullptr) expand_weight(a, b, begin, end, weight.data());
      body(b, t, begin, end, a.weight != nullptr ? weight.data() : nullptr);
    }
  });
}

// Calls body(n, xa, x, g, w) on op_t copies of elements [begin, end) of sample b (weight: the
// chunk's expanded weights, or nullptr), kTile at a time where scalar_t is float16/bfloat16 and in
// one call on the tensors themselves otherwise. body may overwrite xa[0..n) with values of
// scalar_t; with write_back they are stored into x_adv (exactly: they are representable).
// In float16/bfloat16, where the CPU has AVX2 and F16C, span(n, x_adv, x, grad, weight) (a loop of
// half_step_avx2.h, on the tensors) first does all elements but the last n % 8, and body the rest.
template <typename scalar_t, typename S, typename F>
void over_tiles(const StepArgs<scalar_t>& a, int64_t b, int64_t begin, int64_t end, const scalar_t* weight,
                bool write_back, S span, F body) {
  using op_t = at::opmath_type<scalar_t>;
  scalar_t* x_adv = a.x_adv + b * a.channels * a.pixels;
  const scalar_t* x = a.x + b * a.channels * a.pixels;
  const scalar_t* grad = a.grad + b * a.channels * a.pixels;
  if constexpr (std::is_same_v<scalar_t, op_t>) {
    body(end - begin, x_adv + begin, x + begin, grad + begin, weight);
  } else {
    if (half_step_avx2::available()) {
      const int64_t done = span(end - begin, x_adv + begin, x + begin, grad + begin, weight);
      begin += done;
      if (weight != nullptr) weight += done;
    }
    alignas(64) op_t xa_t[kTile], x_t[kTile], g_t[kTile], w_t[kTile];
    const auto load = [](const scalar_t* src, op_t* dst, int64_t n) {
      for (int64_t i = 0; i < n; ++i) dst[i] = half_float::load_as_op(src[i]);
    };
    for (int64_t t = begin; t < end; t += kTile) {
      const int64_t n = std::min(kTile, end - t);
      load(x_adv + t, xa_t, n);
      load(x + t, x_t, n);
      load(grad + t, g_t, n);
      if (weight != nullptr) load(weight + (t - begin), w_t, n);
      body(n, xa_t, x_t, g_t, weight != nullptr ? w_t : nullptr);
      if (write_back)
        for (int64_t i = 0; i < n; ++i) x_adv[t + i] = half_float::store_from_op<scalar_t>(xa_t[i]);
    }
  }
}

// body(i, w[i]) for i in [0, n), or body(i, 1) when w is nullptr: a loop without a branch in
// it, so that it vectorizes. Multiplying by 1 is exact, so a missing weight changes no value.
template <typename T, typename F>
inline void for_weights(int64_t n, const T* w, F body) {
  using op_t = at::opmath_type<T>;
  if (w != nullptr)
    for (int64_t i = 0; i < n; ++i) body(i, static_cast<op_t>(w[i]));
  else
    for (int64_t i = 0; i < n; ++i) body(i, op_t(1));
}

template <typename scalar_t>
void linf_step(const StepArgs<scalar_t>& a) {
  using op_t = at::opmath_type<scalar_t>;
  const auto R = [](op_t v) { return half_float::round_as<scalar_t>(v); };
  // Clamping a value of scalar_t to a bound and rounding the result equals clamping it to the
  // rounded bound (rounding is monotone): two roundings per element fewer.
  const op_t step = static_cast<op_t>(a.step_size), eps = R(static_cast<op_t>(a.eps));
  const op_t lo = R(static_cast<op_t>(a.lo)), hi = R(static_cast<op_t>(a.hi));
  for_sample_chunks(a, [&](int64_t b, int64_t, int64_t begin, int64_t end, const scalar_t* weight) {
    const auto span = [&](int64_t n, auto* xa, auto* x, auto* g, auto* w) {
      return half_step_avx2::linf(n, xa, x, g, w, step, eps, lo, hi);
    };
    over_tiles(a, b, begin, end, weight, true, span, [&](int64_t n, auto* xa, const auto* x, const auto* g, const auto* w) {
      for_weights(n, w, [&](int64_t i, op_t wi) {
        const op_t s = static_cast<op_t>((op_t(0) < g[i]) - (g[i] < op_t(0))) * wi;  // exact: ±1 or 0 times a weight
        const op_t moved = R(static_cast<op_t>(xa[i]) + R(step * s));
        const op_t xe = static_cast<op_t>(x[i]);
        const op_t delta = std::min(std::max(R(moved - xe), -eps), eps);
        xa[i] = std::min(std::max(R(xe + delta), lo), hi);
      });
    });
  });
}

// L2's running sums of Σg², Σa·g, Σa² over a chunk: kLanes per quantity, element e into lane
// e % kLanes. One running sum is a chain of dependent additions the compiler may neither reorder
// nor vectorize; fixed lanes keep the order, and so the result, the same from run to run. The
// lanes are pairs in float64 vectors (GCC / clang vector extension), written out because GCC
// left the plain lane loop scalar here (24 sums spilled from 16 registers: L2 in float32 25%
// slower).
typedef double f64x2 __attribute__((vector_size(16)));
struct NormSums {
  f64x2 gg[kLanes / 2] = {}, ag[kLanes / 2] = {}, aa[kLanes / 2] = {};
};

// sums after adding elements [0, n) (a tile, or a whole chunk), with masked_grad(i) element i's
// weighted gradient as the reference rounds it. Tiles hold whole groups of kLanes, so lane
// e % kLanes holds element e of the chunk whether the chunk comes in tiles or at once.
template <typename T, typename G>
NormSums add_norm_sums(NormSums s, int64_t n, const T* xa, const T* x, G masked_grad) {
  const auto diff = [&](int64_t i) { return static_cast<double>(xa[i]) - static_cast<double>(x[i]); };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int v = 0; v < kLanes / 2; ++v) {
      const int64_t e = i + 2 * v;
      const f64x2 gm = {static_cast<double>(masked_grad(e)), static_cast<double>(masked_grad(e + 1))}, d = {diff(e), diff(e + 1)};
      s.gg[v] += gm * gm;
      s.ag[v] += d * gm;
      s.aa[v] += d * d;
    }
  for (int l = 0; i < n; ++i, ++l) {
    const double gm = static_cast<double>(masked_grad(i)), d = diff(i);
    s.gg[l / 2][l % 2] += gm * gm;
    s.ag[l / 2][l % 2] += d * gm;
    s.aa[l / 2][l % 2] += d * d;
  }
  return s;
}

template <typename scalar_t>
void l2_step(const StepArgs<scalar_t>& a) {
  using op_t = at::opmath_type<scalar_t>;
  const int64_t per_sample = a.channels * a.pixels;
  const int64_t chunks = (per_sample + kChunk - 1) / kChunk;
  // Pass 1: per chunk Σg², Σa·g, Σa², summed per sample in a fixed order (deterministic).
  std::vector<double> partial(a.batch * chunks * 3, 0.0);
  const auto R = [](op_t v) { return half_float::round_as<scalar_t>(v); };
  for_sample_chunks(a, [&](int64_t b, int64_t task, int64_t begin, int64_t end, const scalar_t* weight) {
    NormSums sums;
    // (a quantity's eight lanes lie in order in its vector pairs)
    const auto span = [&](int64_t n, auto* xa, auto* x, auto* g, auto* w) {
      return half_step_avx2::l2_norm_sums(n, xa, x, g, w, reinterpret_cast<double*>(sums.gg),
                                          reinterpret_cast<double*>(sums.ag), reinterpret_cast<double*>(sums.aa));
    };
    over_tiles(a, b, begin, end, weight, false, span, [&](int64_t n, const auto* xa, const auto* x, const auto* g, const auto* w) {
      if constexpr (std::is_same_v<scalar_t, op_t>) {  // float32, float64: no rounding to add
        sums = w != nullptr ? add_norm_sums(sums, n, xa, x, [g, w](int64_t i) { return g[i] * w[i]; })
                            : add_norm_sums(sums, n, xa, x, [g](int64_t i) { return g[i]; });
      } else {  // the tile's rounded masked gradient first, in a loop that vectorizes
        alignas(64) op_t masked[kTile];
        for_weights(n, w, [&](int64_t i, op_t wi) { masked[i] = R(static_cast<op_t>(g[i]) * wi); });
        sums = add_norm_sums(sums, n, xa, x, [&masked](int64_t i) { return masked[i]; });
      }
    });
    double gg = sums.gg[0][0], ag = sums.ag[0][0], aa = sums.aa[0][0];
    for (int l = 1; l < kLanes; ++l) gg += sums.gg[l / 2][l % 2], ag += sums.ag[l / 2][l % 2], aa += sums.aa[l / 2][l % 2];
    partial[task * 3] = gg, partial[task * 3 + 1] = ag, partial[task * 3 + 2] = aa;
  });
  std::vector<op_t> g_norm(a.batch), factor(a.batch);
  for (int64_t b = 0; b < a.batch; ++b) {
    double gg = 0.0, ag = 0.0, aa = 0.0;
    for (int64_t t = b * chunks; t < (b + 1) * chunks; ++t) gg += partial[t * 3], ag += partial[t * 3 + 1], aa += partial[t * 3 + 2];
    TORCH_CHECK_VALUE(std::isfinite(gg) && std::isfinite(aa), "masked_pgd_step: grad or x_adv - x of sample ", b,
                      " contains NaN or infinite values");
    const op_t gn = R(R(static_cast<op_t>(std::sqrt(gg))) + division_guard<scalar_t>());
    g_norm[b] = gn;
    const double c = a.step_size / static_cast<double>(gn);
    const double d_norm = std::sqrt(std::max(0.0, aa + 2.0 * c * ag + c * c * gg));
    const op_t ratio = R(static_cast<op_t>(a.eps) / R(static_cast<op_t>(d_norm)));
    // eps = ‖δ‖ = 0 gives 0 / 0: δ is zero then, and a factor of 1 keeps it zero.
    factor[b] = std::isnan(ratio) ? op_t(1) : std::min(ratio, op_t(1));
  }
  // Pass 2: δ in the reference's rounding order, scaled, clamped, written.
  // (the bounds rounded, as in linf_step)
  const op_t step = static_cast<op_t>(a.step_size), lo = R(static_cast<op_t>(a.lo)), hi = R(static_cast<op_t>(a.hi));
  for_sample_chunks(a, [&](int64_t b, int64_t, int64_t begin, int64_t end, const scalar_t* weight) {
    const op_t f = factor[b], gn = g_norm[b];
    const auto span = [&](int64_t n, auto* xa, auto* x, auto* g, auto* w) {
      return half_step_avx2::l2_write(n, xa, x, g, w, step, gn, f, lo, hi);
    };
    over_tiles(a, b, begin, end, weight, true, span, [&](int64_t n, auto* xa, const auto* x, const auto* g, const auto* w) {
      for_weights(n, w, [&](int64_t i, op_t wi) {
        const op_t gm = R(static_cast<op_t>(g[i]) * wi);
        const op_t moved = R(static_cast<op_t>(xa[i]) + R(step * R(gm / gn)));
        const op_t xe = static_cast<op_t>(x[i]);
        const op_t delta = R(R(moved - xe) * f);
        xa[i] = std::min(std::max(R(xe + delta), lo), hi);
      });
    });
  });
}

void masked_pgd_step_cpu(at::Tensor& x_adv, const at::Tensor& x, const at::Tensor& grad,
                         const std::optional<at::Tensor>& weight, double step_size, double eps, double lo, double hi,
                         c10::string_view norm) {
  const bool linf = check_masked_pgd_step_args(x_adv, x, grad, weight, step_size, eps, lo, hi, norm, at::kCPU);
  const int64_t b = x_adv.size(0), c = x_adv.size(1), h = x_adv.size(2), w = x_adv.size(3);
  const at::Tensor wt = weight.has_value() ? weight->contiguous() : at::Tensor();
  if (x_adv.numel() == 0) return;

  const auto work = dense_work(x_adv);
  const auto xc = x.contiguous(work.format);
  const auto gc = grad.contiguous(work.format);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_adv.scalar_type(), "masked_pgd_step_cpu", [&] {
    StepArgs<scalar_t> args{work.tensor.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(),
                            wt.defined() ? wt.data_ptr<scalar_t>() : nullptr, b, c, h * w, work.channels_last,
                            step_size, eps, lo, hi};
    if (linf)
      linf_step(args);
    else
      l2_step(args);
  });
  finish_in_place(x_adv, work);
}

}  // namespace
}  // namespace attrefine_fast

TORCH_LIBRARY_IMPL(attrefine_fast, CPU, m) {
  m.impl("masked_pgd_step", &attrefine_fast::masked_pgd_step_cpu);
}
