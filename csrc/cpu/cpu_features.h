// Which CPU kernels compiled beyond x86-64's baseline instruction set may run: the extension is
// built for the baseline, and a kernel with an AVX2 compilation (lime_fit's cross products,
// masked_pgd_step's float16/bfloat16 loops) picks it at run time where the CPU has the
// instructions.
//
// ATTREFINE_FAST_CPU_KERNELS=baseline (read once, at the first call) keeps every kernel on its
// baseline compilation, so that the tests run both compilations on a CPU that has AVX2.
#pragma once

#include <cstdlib>
#include <cstring>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define ATTREFINE_X86_KERNELS 1
#include <cpuid.h>
#else
#define ATTREFINE_X86_KERNELS 0
#endif

namespace attrefine_fast {

inline bool baseline_kernels_forced() {
  static const bool forced = [] {
    const char* v = std::getenv("ATTREFINE_FAST_CPU_KERNELS");
    return v != nullptr && std::strcmp(v, "baseline") == 0;
  }();
  return forced;
}

// AVX2 and FMA (lime_fit's kernels).
inline bool cpu_runs_avx2_fma() {
#if ATTREFINE_X86_KERNELS
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has && !baseline_kernels_forced();
#else
  return false;
#endif
}

// AVX2 and F16C, float16 <-> float conversion of eight values at once (masked_pgd_step's kernels).
inline bool cpu_runs_avx2_f16c() {
#if ATTREFINE_X86_KERNELS
  static const bool has = [] {
    unsigned eax, ebx, ecx, edx;
    return __builtin_cpu_supports("avx2") && __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
  }();
  return has && !baseline_kernels_forced();
#else
  return false;
#endif
}

}  // namespace attrefine_fast
