// The y extent of a launch. Kernels that put images (or tasks) on the grid's y axis launch at most
// the device's limit of rows (65,535 on every GPU so far) and loop over the rest in strides of
// gridDim.y. The limit is asked of the device, not written in, so that the SIMT emulator
// (tests/simt) can lower it and run those loops on small batches.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace attrefine_fast {
namespace cuda {

// Rows of blocks for `rows` units of work on y: min(rows, the device's gridDim.y limit), >= 1.
inline unsigned grid_rows(int64_t rows) {
  int device = 0, limit = 0;
  if (cudaGetDevice(&device) != cudaSuccess || cudaDeviceGetAttribute(&limit, cudaDevAttrMaxGridDimY, device) != cudaSuccess ||
      limit < 1)
    limit = 65535;
  return static_cast<unsigned>(rows < 1 ? 1 : rows < limit ? rows : limit);
}

}  // namespace cuda
}  // namespace attrefine_fast
