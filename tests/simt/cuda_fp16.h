// float16 for the SIMT emulator (simt.h): the storage type and the conversions the kernels use,
// rounding to nearest even as the device does. Done on the bits, so that any C++17 compiler
// builds it (no _Float16 needed).
#pragma once

#include <cmath>
#include <cstdint>

#include "bit_cast.h"

struct __half {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1fu, mantissa = h.bits & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float v = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -v : v;
  }
  return simt_bit_cast<float>(exponent == 31 ? sign | 0x7f800000u | (mantissa << 13)  // infinity or NaN
                                              : sign | ((exponent + 112) << 23) | (mantissa << 13));
}

inline __half __float2half_rn(float v) {
  const uint32_t u = simt_bit_cast<uint32_t>(v);
  const uint32_t sign = (u >> 16) & 0x8000u, magnitude = u & 0x7fffffffu;
  uint32_t bits;
  if (magnitude > 0x7f800000u) {
    bits = 0x7e00u;  // NaN
  } else if (magnitude >= 0x477ff000u) {
    bits = 0x7c00u;  // 65520 and beyond round to infinity
  } else if (magnitude < 0x38800000u) {  // below 2^-14: a subnormal (or zero) of float16
    const float scaled = simt_bit_cast<float>(magnitude);
    bits = static_cast<uint32_t>(std::nearbyint(std::ldexp(scaled, 24)));  // 1024 is 2^-14, normal
  } else {  // rebias the exponent (127 -> 15), then round the 13 dropped bits to nearest even
    const uint32_t rebased = magnitude - 0x38000000u;
    bits = (rebased + 0xfffu + ((rebased >> 13) & 1u)) >> 13;
  }
  __half h;
  h.bits = static_cast<uint16_t>(sign | bits);
  return h;
}
