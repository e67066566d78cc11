// masked_pgd_step's float16 / bfloat16 element loops compiled for AVX2 and F16C, included by
// csrc/cpu/masked_pgd_step.cpp only, which runs them where the CPU has both (cpu_features.h).
//
// Eight elements at a time, the arithmetic of the baseline loops in the same order with the same
// roundings, so the results are the same bit for bit: each intermediate rounded to float16 by
// F16C's conversion (round to nearest even, as c10's and half_float.h's) or to bfloat16 by
// half_float.h's integer rounding in eight lanes; clamps written as the std::min / std::max of
// the baseline loops (the bound first: vminps / vmaxps return their second operand when the
// comparison fails); L2's norm sums in float64 in the baseline's eight lanes (element e into lane
// e % 8). The target leaves out FMA, so no product is contracted into an addition. (NaNs aside,
// which only a direct call of the op with a NaN in x_adv or x produces: where two NaNs meet in
// an operation, which one's sign survives depends on how the compiler ordered the operands.)
//
// Each function takes n elements of one sample from a chunk's start (x_adv, x, grad, and the
// chunk's expanded weights or nullptr), handles the first n - n % 8 and returns how many it did;
// the caller's baseline loop does the rest.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "cpu_features.h"

#if ATTREFINE_X86_KERNELS
#include <immintrin.h>
#define ATTREFINE_TARGET_F16C __attribute__((target("avx2,f16c")))
#else
#define ATTREFINE_TARGET_F16C
#endif

namespace attrefine_fast {
namespace {
namespace half_step_avx2 {

inline bool available() { return cpu_runs_avx2_f16c(); }

#if ATTREFINE_X86_KERNELS

template <typename T>
ATTREFINE_TARGET_F16C inline __m256 load8(const T* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (std::is_same_v<T, c10::Half>)
    return _mm256_cvtph_ps(raw);
  else  // bfloat16: the top half of a float
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

// v must hold values of T (round8's results): the store is exact. A float16 NaN is stored as
// half_float::float_to_half stores it, 0x7E00 with its sign (F16C would keep its payload).
template <typename T>
ATTREFINE_TARGET_F16C inline void store8(T* p, __m256 v) {
  __m128i raw;
  if constexpr (std::is_same_v<T, c10::Half>) {
    const __m256 sign = _mm256_and_ps(v, _mm256_set1_ps(-0.0f));
    const __m256 quiet = _mm256_or_ps(sign, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)));
    v = _mm256_blendv_ps(v, quiet, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    raw = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {
    const __m256i top = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
    raw = _mm_packus_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
  }
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), raw);
}

// half_float::round_as<T> on eight floats.
template <typename T>
ATTREFINE_TARGET_F16C inline __m256 round8(__m256 v) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_and_si256(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd),
                                       _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)), _mm256_set1_epi32(0x7F800000));
    return _mm256_castsi256_ps(_mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC00000), nan));  // a NaN: c10's
  }
}

// std::min(std::max(v, lo), hi)
ATTREFINE_TARGET_F16C inline __m256 clamp8(__m256 v, __m256 lo, __m256 hi) {
  return _mm256_min_ps(hi, _mm256_max_ps(lo, v));
}

template <typename T>
ATTREFINE_TARGET_F16C inline __m256 weight8(const T* w, int64_t i) {
  return w != nullptr ? load8(w + i) : _mm256_set1_ps(1.0f);
}

// Lanes 0-3 and 4-7 in float64.
ATTREFINE_TARGET_F16C inline __m256d low(__m256 v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
ATTREFINE_TARGET_F16C inline __m256d high(__m256 v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }

// L-inf: x_adv = clamp(x + clamp(R(x_adv + R(step * sign(g) * w)) - x, -eps, eps), lo, hi), each
// difference and sum rounded (R); eps, lo and hi already rounded.
template <typename T>
ATTREFINE_TARGET_F16C int64_t linf(int64_t n, T* xa, const T* x, const T* g, const T* w, float step, float eps, float lo,
                                   float hi) {
  const __m256 vstep = _mm256_set1_ps(step), veps = _mm256_set1_ps(eps), vneg = _mm256_set1_ps(-eps);
  const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi), zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = load8(g + i);
    const __m256 sign = _mm256_sub_ps(_mm256_and_ps(_mm256_cmp_ps(zero, gv, _CMP_LT_OQ), one),
                                      _mm256_and_ps(_mm256_cmp_ps(gv, zero, _CMP_LT_OQ), one));
    const __m256 s = _mm256_mul_ps(sign, weight8(w, i));
    const __m256 moved = round8<T>(_mm256_add_ps(load8(xa + i), round8<T>(_mm256_mul_ps(vstep, s))));
    const __m256 xe = load8(x + i);
    const __m256 delta = clamp8(round8<T>(_mm256_sub_ps(moved, xe)), vneg, veps);
    store8(xa + i, clamp8(round8<T>(_mm256_add_ps(xe, delta)), vlo, vhi));
  }
  return i;
}

// L2's first pass: adds Σg², Σa·g, Σa² (g the rounded weighted gradient, a = x_adv - x, in
// float64) into the eight lanes of each of gg, ag, aa.
template <typename T>
ATTREFINE_TARGET_F16C int64_t l2_norm_sums(int64_t n, const T* xa, const T* x, const T* g, const T* w, double* gg,
                                           double* ag, double* aa) {
  __m256d gg0 = _mm256_loadu_pd(gg), gg1 = _mm256_loadu_pd(gg + 4), ag0 = _mm256_loadu_pd(ag), ag1 = _mm256_loadu_pd(ag + 4);
  __m256d aa0 = _mm256_loadu_pd(aa), aa1 = _mm256_loadu_pd(aa + 4);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gm = round8<T>(_mm256_mul_ps(load8(g + i), weight8(w, i)));
    const __m256 a = load8(xa + i), b = load8(x + i);
    const __m256d g0 = low(gm), g1 = high(gm);
    const __m256d d0 = _mm256_sub_pd(low(a), low(b)), d1 = _mm256_sub_pd(high(a), high(b));
    gg0 = _mm256_add_pd(gg0, _mm256_mul_pd(g0, g0)), gg1 = _mm256_add_pd(gg1, _mm256_mul_pd(g1, g1));
    ag0 = _mm256_add_pd(ag0, _mm256_mul_pd(d0, g0)), ag1 = _mm256_add_pd(ag1, _mm256_mul_pd(d1, g1));
    aa0 = _mm256_add_pd(aa0, _mm256_mul_pd(d0, d0)), aa1 = _mm256_add_pd(aa1, _mm256_mul_pd(d1, d1));
  }
  _mm256_storeu_pd(gg, gg0), _mm256_storeu_pd(gg + 4, gg1), _mm256_storeu_pd(ag, ag0), _mm256_storeu_pd(ag + 4, ag1);
  _mm256_storeu_pd(aa, aa0), _mm256_storeu_pd(aa + 4, aa1);
  return i;
}

// L2's second pass: g = R(grad * w); x_adv = clamp(R(x + R(R(R(x_adv + R(step * R(g / gn))) - x) * f)),
// lo, hi), with gn the sample's rounded ‖g‖ + guard and f its projection factor.
template <typename T>
ATTREFINE_TARGET_F16C int64_t l2_write(int64_t n, T* xa, const T* x, const T* g, const T* w, float step, float gn, float f,
                                       float lo, float hi) {
  const __m256 vstep = _mm256_set1_ps(step), vgn = _mm256_set1_ps(gn), vf = _mm256_set1_ps(f);
  const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gm = round8<T>(_mm256_mul_ps(load8(g + i), weight8(w, i)));
    const __m256 moved = round8<T>(_mm256_add_ps(load8(xa + i), round8<T>(_mm256_mul_ps(vstep, round8<T>(_mm256_div_ps(gm, vgn))))));
    const __m256 xe = load8(x + i);
    const __m256 delta = round8<T>(_mm256_mul_ps(round8<T>(_mm256_sub_ps(moved, xe)), vf));
    store8(xa + i, clamp8(round8<T>(_mm256_add_ps(xe, delta)), vlo, vhi));
  }
  return i;
}

#else  // not x86-64: available() is false and nothing is done here

template <typename T>
int64_t linf(int64_t, T*, const T*, const T*, const T*, float, float, float, float) { return 0; }
template <typename T>
int64_t l2_norm_sums(int64_t, const T*, const T*, const T*, const T*, double*, double*, double*) { return 0; }
template <typename T>
int64_t l2_write(int64_t, T*, const T*, const T*, const T*, float, float, float, float, float) { return 0; }

#endif

}  // namespace half_step_avx2
}  // namespace
}  // namespace attrefine_fast
