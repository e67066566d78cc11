// Checks csrc/cpu/half_float.h against c10's conversions on every input: round_as on all 2^32
// floats (float16: any NaN for a NaN; bfloat16: the same bits, NaNs included), half_to_float on
// all 2^16 float16 values, and float_to_half on their float values (NaNs: any NaN back). Where the
// CPU has AVX2 and F16C, also half_step_avx2.h's eight-lane rounding, loads and stores against
// round_as. Prints the mismatches and exits nonzero on any.
#include "cpu/half_float.h"
#include "cpu/half_step_avx2.h"

#include <cstdio>

using namespace attrefine_fast::half_float;

#if ATTREFINE_X86_KERNELS
namespace vec = attrefine_fast::half_step_avx2;

// round8 against round_as on every float, eight at a time, and load8(store8(r)) == r for the
// rounded values (NaNs: NaN).
template <typename T>
__attribute__((target("avx2,f16c"))) unsigned long long check_lanes(int64_t first) {
  unsigned long long bad = 0;
  alignas(32) float in[8], out[8];
  alignas(16) T stored[8];
  for (int k = 0; k < 8; ++k) in[k] = float_of(static_cast<uint32_t>(first + k));
  const __m256 r = vec::round8<T>(_mm256_load_ps(in));
  _mm256_store_ps(out, r);
  vec::store8(stored, r);
  _mm256_store_ps(in + 0, vec::load8(stored));  // in: the round trip
  for (int k = 0; k < 8; ++k) {
    const float want = round_as<T>(float_of(static_cast<uint32_t>(first + k)));
    if (want != want)
      bad += (out[k] == out[k]) + (in[k] == in[k]);
    else
      bad += (bits_of(out[k]) != bits_of(want)) + (bits_of(in[k]) != bits_of(want));
  }
  return bad;
}

unsigned long long check_vector_rounding() {
  unsigned long long bad = 0;
#pragma omp parallel for reduction(+ : bad)
  for (int64_t i = 0; i < (int64_t(1) << 32); i += 8) bad += check_lanes<c10::Half>(i) + check_lanes<c10::BFloat16>(i);
  return bad;
}
#endif

int main() {
  unsigned long long bad_half = 0, bad_bf16 = 0, bad_load = 0, bad_store = 0;
#pragma omp parallel for reduction(+ : bad_half, bad_bf16)
  for (int64_t i = 0; i < (int64_t(1) << 32); ++i) {
    const float v = float_of(static_cast<uint32_t>(i));
    const float half = static_cast<float>(c10::Half(v)), mine_half = round_as<c10::Half>(v);
    const float bf16 = static_cast<float>(c10::BFloat16(v)), mine_bf16 = round_as<c10::BFloat16>(v);
    bad_bf16 += bits_of(bf16) != bits_of(mine_bf16);  // NaNs included
    if (v != v) {
      bad_half += mine_half == mine_half;
    } else {
      bad_half += bits_of(half) != bits_of(mine_half);
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
  unsigned long long bad_vec = 0;
  const bool vec = attrefine_fast::half_step_avx2::available();
#if ATTREFINE_X86_KERNELS
  if (vec) bad_vec = check_vector_rounding();
#endif
  std::printf("eight-lane (AVX2+F16C) rounding and conversions: %s %llu\n", vec ? "checked, mismatches" : "not run here,", bad_vec);
  std::printf("mismatches: round_as float16 %llu, bfloat16 %llu (of 2^32); half_to_float %llu, float_to_half %llu (of 2^16)\n",
              bad_half, bad_bf16, bad_load, bad_store);
  return bad_half || bad_bf16 || bad_load || bad_store || bad_vec ? 1 : 0;
}
