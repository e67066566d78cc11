// Argument checks on the device: one grid-stride pass over an array that sets *flag when some
// element fails a predicate. The kernel that writes reads the flag first and writes nothing if it
// is set, and the glue reads it once, after the launches, to raise the op's error: no host round
// trip sits between the check and the work (no torch headers: see launchers.h).
#pragma once

#include <cstdint>

namespace attrefine_fast {
namespace cuda {

constexpr int kFlagThreads = 256;

// flag |= 1 where bad(data[i]) for some i < numel (flag zeroed by the caller).
template <typename T, typename Bad>
__global__ void __launch_bounds__(kFlagThreads) flag_pass_kernel(const T* __restrict__ data, int64_t numel, Bad bad,
                                                                 int* __restrict__ flag) {
  bool any = false;
#pragma unroll 4
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    any |= bad(data[i]);
  if (__syncthreads_or(any) && threadIdx.x == 0) atomicOr(flag, 1);
}

// Blocks of kFlagThreads for a pass over numel elements: about 8 elements per thread, at most
// 4096 blocks (the grid-stride loop takes the rest).
inline unsigned flag_pass_blocks(int64_t numel) {
  const int64_t blocks = (numel + kFlagThreads * 8 - 1) / (kFlagThreads * 8);
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks < 4096 ? blocks : 4096);
}

}  // namespace cuda
}  // namespace attrefine_fast
