// Checks csrc/cpu/half_float.h against c10's conversions on every input: round_as on all 2^32
// floats (float16 and bfloat16), half_to_float on all 2^16 float16 values, and float_to_half on
// their float values (NaNs: any NaN back). Prints the mismatches and exits nonzero on any.
#include "cpu/half_float.h"

#include <cstdio>

using namespace attrefine_fast::half_float;

int main() {
  unsigned long long bad_half = 0, bad_bf16 = 0, bad_load = 0, bad_store = 0;
#pragma omp parallel for reduction(+ : bad_half, bad_bf16)
  for (int64_t i = 0; i < (int64_t(1) << 32); ++i) {
    const float v = float_of(static_cast<uint32_t>(i));
    const float half = static_cast<float>(c10::Half(v)), mine_half = round_as<c10::Half>(v);
    const float bf16 = static_cast<float>(c10::BFloat16(v)), mine_bf16 = round_as<c10::BFloat16>(v);
    if (v != v) {
      bad_half += mine_half == mine_half;
      bad_bf16 += mine_bf16 == mine_bf16;
    } else {
      bad_half += bits_of(half) != bits_of(mine_half);
      bad_bf16 += bits_of(bf16) != bits_of(mine_bf16);
    }
  }
  for (uint32_t b = 0; b < 65536; ++b) {
    const float ref = static_cast<float>(c10::Half(static_cast<uint16_t>(b), c10::Half::from_bits()));
    const float mine = half_to_float(static_cast<uint16_t>(b));
    const uint16_t back = float_to_half(ref);
    if (ref != ref) {
      bad_load += mine == mine;
      bad_store += (back & 0x7C00u) != 0x7C00u || (back & 0x3FFu) == 0;
    } else {
      bad_load += bits_of(ref) != bits_of(mine);
      bad_store += back != b;
    }
  }
  std::printf("mismatches: round_as float16 %llu, bfloat16 %llu (of 2^32); half_to_float %llu, float_to_half %llu (of 2^16)\n",
              bad_half, bad_bf16, bad_load, bad_store);
  return bad_half || bad_bf16 || bad_load || bad_store ? 1 : 0;
}
