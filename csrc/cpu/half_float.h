// float16 and bfloat16 arithmetic carried out in float, in loops that vectorize.
//
// A kernel that must round every intermediate to float16 / bfloat16, as PyTorch does between two
// operations, loads the values into float (load_as_op), rounds each result with round_as and
// stores the last one back (store_from_op). c10's conversions give the same values, but GCC keeps
// branches in them (it may not compute a floating-point expression that a branch skips, for fear
// of its exceptions), so a loop of them runs one element at a time: here every choice is a
// select written with integer operations. These are the baseline x86-64 (SSE2) loops; where the
// CPU has AVX2 and F16C, half_step_avx2.h does the same eight elements at a time.
// Each function equals its c10 counterpart on every input (for round_as, all 2^32 floats;
// tests/half_float_check.cpp), except that a float16 NaN may have another sign or payload than
// c10's (bfloat16 rounding makes every NaN c10's 0x7FC0).
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace attrefine_fast {
namespace half_float {

inline uint32_t bits_of(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}

inline float float_of(uint32_t u) {
  float v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

// All ones where cond holds, else zero; pick(m, a, b) = m ? a : b without a branch.
inline uint32_t mask_if(bool cond) { return 0u - static_cast<uint32_t>(cond); }
inline uint32_t pick(uint32_t m, uint32_t a, uint32_t b) { return (a & m) | (b & ~m); }

// A magnitude (sign bit clear) compared as a signed integer: SSE2 has no unsigned compare.
inline bool below(uint32_t magnitude, uint32_t bound) {
  return static_cast<int32_t>(magnitude) < static_cast<int32_t>(bound);
}

// float16 bits -> float (every float16 value, infinities and NaNs included).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, em = h & 0x7FFFu;
  const uint32_t normal = (em << 13) + (112u << 23);  // rebias the exponent: 127 - 15
  const uint32_t special = (em << 13) | 0x7F800000u;  // exponent 31: infinity or NaN
  const uint32_t subnormal = bits_of(static_cast<float>(static_cast<int32_t>(em)) * 0x1p-24f);
  uint32_t r = pick(mask_if(below(em, 0x400u)), subnormal, normal);
  r = pick(mask_if(!below(em, 0x7C00u)), special, r);
  return float_of(sign | r);
}

// A float holding a float16 value (round_as<at::Half>'s result) -> its bits. Exact: no rounding.
inline uint16_t float_to_half(float v) {
  const uint32_t u = bits_of(v), sign = (u >> 16) & 0x8000u, mag = u & 0x7FFFFFFFu;
  const uint32_t is_subnormal = mask_if(below(mag, 0x38800000u));  // below 2^-14
  const uint32_t normal = (mag >> 13) - (112u << 10);
  // (a normal magnitude is zeroed first: a float-to-int conversion out of range is undefined)
  const uint32_t subnormal = static_cast<uint32_t>(static_cast<int32_t>(float_of(mag & is_subnormal) * 0x1p24f));
  uint32_t r = pick(is_subnormal, subnormal, normal);
  const uint32_t special = 0x7C00u | (mask_if(!below(mag, 0x7F800001u)) & 0x200u);  // inf, or a quiet NaN
  r = pick(mask_if(!below(mag, 0x47800000u)), special, r);
  return static_cast<uint16_t>(sign | r);
}

// v rounded to the nearest value of scalar_t (ties to even), kept in op_t: exactly
// static_cast<op_t>(static_cast<scalar_t>(v)) but for NaNs. float32 and float64 compute in their
// own type.
template <typename scalar_t>
inline at::opmath_type<scalar_t> round_as(at::opmath_type<scalar_t> v) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    // keep the top 16 bits; a carry out of the mantissa moves up the exponent (to inf past the max)
    const uint32_t u = bits_of(v);
    const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    return float_of(pick(mask_if(!below(u & 0x7FFFFFFFu, 0x7F800001u)), 0x7FC00000u, r));  // a NaN: c10's
  } else if constexpr (std::is_same_v<scalar_t, at::Half>) {
    // From 2^-13 up, keep 10 of the 23 mantissa bits. Below it float16 values lie 2^-24 apart, as
    // floats in [0.5, 1) do, so adding and removing 0.5 rounds there (subnormals included).
    // Magnitudes from 65520 round past float16's largest value, 65504, to infinity.
    const uint32_t u = bits_of(v), sign = u & 0x80000000u, mag = u ^ sign;
    const uint32_t normal = (mag + 0xFFFu + ((mag >> 13) & 1u)) & 0xFFFFE000u;
    const uint32_t small = bits_of((float_of(mag) + 0.5f) - 0.5f);
    uint32_t r = pick(mask_if(below(mag, 0x39000000u)), small, normal);
    r = pick(mask_if(!below(r, 0x477FE001u)), 0x7F800000u, r);
    r = pick(mask_if(!below(mag, 0x7F800001u)), mag, r);  // NaN stays NaN
    return float_of(sign | r);
  } else {
    return v;
  }
}

template <typename scalar_t>
inline at::opmath_type<scalar_t> load_as_op(scalar_t v) {
  if constexpr (std::is_same_v<scalar_t, at::Half>)
    return half_to_float(v.x);
  else
    return static_cast<at::opmath_type<scalar_t>>(v);
}

// v must hold a value of scalar_t (round_as's result): the store is then exact.
template <typename scalar_t>
inline scalar_t store_from_op(at::opmath_type<scalar_t> v) {
  if constexpr (std::is_same_v<scalar_t, at::Half>)
    return scalar_t(float_to_half(v), scalar_t::from_bits());
  else
    return static_cast<scalar_t>(v);
}

}  // namespace half_float
}  // namespace attrefine_fast
