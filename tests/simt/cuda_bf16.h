// bfloat16 for the SIMT emulator (simt.h): the storage type and the conversions the kernels use,
// rounding to nearest even as the device does.
#pragma once

#include <cstdint>

#include "bit_cast.h"

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) { return simt_bit_cast<float>(static_cast<uint32_t>(h.bits) << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  const uint32_t u = simt_bit_cast<uint32_t>(v);
  __nv_bfloat16 h;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    h.bits = static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN stays a (quiet) NaN
  } else {
    h.bits = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  return h;
}
