// The types of the CUDA runtime API the kernels' launchers use, for the SIMT emulator (simt.h,
// which also defines the few runtime functions they call). Not the real runtime: only what
// csrc/cuda needs to compile with a host C++ compiler.
#pragma once

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaStream_t = struct simt_stream*;

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr { cudaDevAttrMaxGridDimY = 6, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
