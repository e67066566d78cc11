// Block-wide reduction shared by the CUDA kernels (no torch headers: see launchers.h).
#pragma once

namespace attrefine_fast {
namespace cuda {

// Sum of v over the warp, in every lane (all 32 lanes must call it).
template <typename T>
__device__ inline T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum of v over the block (blockDim.x a multiple of 32, at most 1024): warp shuffles, then one
// value per warp through `scratch` (blockDim.x / 32 doubles of shared memory). Every thread of
// the block must call it. The total is valid in warp 0 (lane 0 at least); the closing barrier
// lets the caller reuse `scratch` for the next reduction at once.
__device__ inline double block_sum(double v, double* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / 32) ? scratch[lane] : 0.0;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  __syncthreads();
  return v;
}

}  // namespace cuda
}  // namespace attrefine_fast
