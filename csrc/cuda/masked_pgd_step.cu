// masked_pgd_step on CUDA, in place on x_adv (formulas: csrc/cpu/masked_pgd_step.cpp).
//
//   x_adv, x, grad (B, C, H, W) dense in one layout (NCHW, or NHWC when channels_last)
//   weight (B, H, W) or nullptr;  float16 / bfloat16 / float32 / float64
//
// Intermediates are rounded to the tensor's dtype in the reference's order, as on the CPU.
// L-inf: one elementwise pass. L2: a reduction pass (Σg², Σa·g, Σa² per sample, a = x_adv - x,
// block-reduced then one float64 atomic per block and quantity) and a writing pass that derives
// ‖g‖ and ‖δ‖² = Σa² + 2c Σa·g + c² Σg² from those sums: the norms must be known before any
// element is written, and the expansion saves materializing δ.
//
// Non-finite input is caught on the device, before anything is written and without a round trip
// to the host between the kernels: L-inf runs a finiteness pass over grad first; L2 needs none,
// since a NaN or an infinity in grad (or in x_adv - x) makes its sample's Σg² (or Σa², Σa·g)
// non-finite. Either way a flag is set, the writing pass then writes nothing, and the glue reads
// the flag once, after the launches, to raise the error.
//
// Grids: x over a sample's tiles, y over the samples, looping past the y limit (grid_rows.cuh).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "block_reduce.cuh"
#include "flag_pass.cuh"
#include "grid_rows.cuh"
#include "launchers.h"

namespace attrefine_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kElemsPerThread = 4;
// The L2 sums kernel ends every block with three block reductions and three float64 atomics: on
// samples of many tiles each thread first sums kSumElemsPerThread elements, so that tail is paid
// once per 4096 elements instead of once per 1024 (small samples keep 4, and more blocks).
constexpr int kSumElemsPerThread = 16;
constexpr int64_t kManyTiles = 8;

template <typename T> struct Op { using type = float; };
template <> struct Op<double> { using type = double; };

__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ double load(const double* p) { return *p; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }

// v rounded to T and back: the reference materializes every intermediate in T.
template <typename T>
__device__ __forceinline__ typename Op<T>::type rnd(typename Op<T>::type v) {
  T t;
  store(&t, v);
  return load(&t);
}

// Products that nvcc must not contract into an FMA with a following add: the reference rounds the
// product first, and an FMA differs from it in the last bit (seen on an H200: 1-ulp mismatches).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

template <typename T>
struct Step {
  T* x_adv;
  const T *x, *grad, *weight;
  int64_t batch, channels, pixels, per_sample;
  bool channels_last;
};

// The weight's pixel for element e of a sample. 32-bit arithmetic (the glue checks that a sample
// has fewer than 2^31 elements): 64-bit division costs dozens of instructions per element.
template <typename T>
__device__ __forceinline__ int64_t pixel_of(const Step<T>& s, int64_t e) {
  const uint32_t i = static_cast<uint32_t>(e);
  return s.channels_last ? i / static_cast<uint32_t>(s.channels) : i % static_cast<uint32_t>(s.pixels);
}

template <typename T>
__device__ __forceinline__ typename Op<T>::type masked_grad(const Step<T>& s, int64_t b, int64_t e) {
  using op_t = typename Op<T>::type;
  const op_t g = load(s.grad + b * s.per_sample + e);
  if (s.weight == nullptr) return g;
  return rnd<T>(mul_rn(g, load(s.weight + b * s.pixels + pixel_of(s, e))));
}

__device__ __forceinline__ bool finite(float v) { return isfinite(v); }
__device__ __forceinline__ bool finite(double v) { return isfinite(v); }

// A NaN or an infinity: the predicate of L-inf's flag pass over grad.
struct NonFinite {
  template <typename T>
  __device__ bool operator()(T v) const {
    return !finite(load(&v));
  }
};

// One block: flag = 1 if some sample's Σg² is not finite, | 2 if its Σa² or Σa·g is not.
__global__ void sums_flag_kernel(const double* __restrict__ sums, int64_t batch, int* __restrict__ flag) {
  int bad = 0;
  for (int64_t b = threadIdx.x; b < batch; b += blockDim.x)
    bad |= (isfinite(sums[3 * b]) ? 0 : 1) | (isfinite(sums[3 * b + 1]) && isfinite(sums[3 * b + 2]) ? 0 : 2);
  const int grad_bad = __syncthreads_or(bad & 1) ? 1 : 0;
  const int delta_bad = __syncthreads_or(bad & 2) ? 2 : 0;
  if (threadIdx.x == 0) *flag = grad_bad | delta_bad;
}

template <typename T>
__global__ void linf_kernel(Step<T> s, const int* __restrict__ flag, double step_size, double eps, double lo,
                            double hi) {
  using op_t = typename Op<T>::type;
  if (*flag) return;  // non-finite grad: nothing is written
  const int64_t e0 = static_cast<int64_t>(blockIdx.x) * blockDim.x * kElemsPerThread + threadIdx.x;
  const op_t step = static_cast<op_t>(step_size), ep = static_cast<op_t>(eps);
  for (int64_t b = blockIdx.y; b < s.batch; b += gridDim.y) {
#pragma unroll
    for (int u = 0; u < kElemsPerThread; ++u) {
      const int64_t e = e0 + static_cast<int64_t>(u) * blockDim.x;
      if (e >= s.per_sample) break;
      const int64_t i = b * s.per_sample + e;
      const op_t g = load(s.grad + i);
      op_t sg = static_cast<op_t>((op_t(0) < g) - (g < op_t(0)));
      if (s.weight != nullptr) {
        sg = rnd<T>(mul_rn(sg, load(s.weight + b * s.pixels + pixel_of(s, e))));
      }
      const op_t moved = rnd<T>(load(s.x_adv + i) + rnd<T>(mul_rn(step, sg)));
      const op_t xe = load(s.x + i);
      const op_t delta = fmin(fmax(rnd<T>(moved - xe), -ep), ep);
      const op_t out = rnd<T>(xe + rnd<T>(delta));  // the reference clamps in T: delta is rounded to T
      store(s.x_adv + i, fmin(fmax(out, static_cast<op_t>(lo)), static_cast<op_t>(hi)));
    }
  }
}

template <typename T, int ELEMS>
__global__ void l2_sums_kernel(Step<T> s, double* __restrict__ sums) {
  __shared__ double partial[kThreads / 32];
  const int64_t e0 = static_cast<int64_t>(blockIdx.x) * blockDim.x * ELEMS + threadIdx.x;
  for (int64_t b = blockIdx.y; b < s.batch; b += gridDim.y) {
    double gg = 0.0, ag = 0.0, aa = 0.0;
#pragma unroll
    for (int u = 0; u < ELEMS; ++u) {
      const int64_t e = e0 + static_cast<int64_t>(u) * blockDim.x;
      if (e >= s.per_sample) break;
      const int64_t i = b * s.per_sample + e;
      const double g = static_cast<double>(masked_grad(s, b, e));
      const double a = static_cast<double>(load(s.x_adv + i)) - static_cast<double>(load(s.x + i));
      gg += g * g, ag += a * g, aa += a * a;
    }
    gg = block_sum(gg, partial);
    ag = block_sum(ag, partial);
    aa = block_sum(aa, partial);
    if (threadIdx.x == 0) {
      atomicAdd(&sums[3 * b], gg);
      atomicAdd(&sums[3 * b + 1], ag);
      atomicAdd(&sums[3 * b + 2], aa);
    }
  }
}

template <typename T>
__global__ void l2_write_kernel(Step<T> s, const double* __restrict__ sums, const int* __restrict__ flag,
                                double step_size, double eps, double lo, double hi) {
  using op_t = typename Op<T>::type;
  if (*flag) return;  // some sample's sums are not finite: nothing is written
  // 1e-10 rounds to 0 in float16: its smallest subnormal there (ops/masked_pgd_step.py).
  const op_t guard = std::is_same<T, __half>::value ? static_cast<op_t>(5.9604644775390625e-08) : static_cast<op_t>(1e-10);
  const op_t step = static_cast<op_t>(step_size);
  const int64_t e0 = static_cast<int64_t>(blockIdx.x) * blockDim.x * kElemsPerThread + threadIdx.x;
  for (int64_t b = blockIdx.y; b < s.batch; b += gridDim.y) {
    const double gg = sums[3 * b], ag = sums[3 * b + 1], aa = sums[3 * b + 2];
    const op_t gn = rnd<T>(rnd<T>(static_cast<op_t>(sqrt(gg))) + guard);
    const double c = step_size / static_cast<double>(gn);
    const double d_norm = sqrt(fmax(0.0, aa + 2.0 * c * ag + c * c * gg));
    const op_t ratio = rnd<T>(static_cast<op_t>(eps) / rnd<T>(static_cast<op_t>(d_norm)));
    const op_t factor = isnan(ratio) ? op_t(1) : fmin(ratio, op_t(1));  // 0 / 0: δ = 0 stays 0
#pragma unroll
    for (int u = 0; u < kElemsPerThread; ++u) {
      const int64_t e = e0 + static_cast<int64_t>(u) * blockDim.x;
      if (e >= s.per_sample) break;
      const int64_t i = b * s.per_sample + e;
      const op_t scaled = rnd<T>(mul_rn(step, rnd<T>(masked_grad(s, b, e) / gn)));
      const op_t moved = rnd<T>(load(s.x_adv + i) + scaled);
      const op_t xe = load(s.x + i);
      const op_t delta = rnd<T>(mul_rn(rnd<T>(moved - xe), factor));
      const op_t out = rnd<T>(xe + delta);
      store(s.x_adv + i, fmin(fmax(out, static_cast<op_t>(lo)), static_cast<op_t>(hi)));
    }
  }
}

template <typename T>
void launch(void* x_adv, const void* x, const void* grad, const void* weight, int64_t batch, int64_t channels,
            int64_t pixels, bool channels_last, double step_size, double eps, double lo, double hi, bool linf,
            double* sums, int* flag, cudaStream_t stream) {
  Step<T> s{static_cast<T*>(x_adv), static_cast<const T*>(x), static_cast<const T*>(grad),
            static_cast<const T*>(weight), batch, channels, pixels, channels * pixels, channels_last};
  const int64_t tile = kThreads * kElemsPerThread;
  const dim3 grid(static_cast<unsigned>((s.per_sample + tile - 1) / tile), grid_rows(batch));
  if (linf) {
    const int64_t numel = batch * s.per_sample;
    flag_pass_kernel<T, NonFinite><<<flag_pass_blocks(numel), kFlagThreads, 0, stream>>>(s.grad, numel, NonFinite{}, flag);
    linf_kernel<T><<<grid, kThreads, 0, stream>>>(s, flag, step_size, eps, lo, hi);
    return;
  }
  const int64_t sum_tile = kThreads * kSumElemsPerThread;
  if (s.per_sample >= kManyTiles * sum_tile) {
    const dim3 sum_grid(static_cast<unsigned>((s.per_sample + sum_tile - 1) / sum_tile), grid_rows(batch));
    l2_sums_kernel<T, kSumElemsPerThread><<<sum_grid, kThreads, 0, stream>>>(s, sums);
  } else {
    l2_sums_kernel<T, kElemsPerThread><<<grid, kThreads, 0, stream>>>(s, sums);
  }
  sums_flag_kernel<<<1, kThreads, 0, stream>>>(sums, batch, flag);
  l2_write_kernel<T><<<grid, kThreads, 0, stream>>>(s, sums, flag, step_size, eps, lo, hi);
}

}  // namespace

void masked_pgd_step(void* x_adv, const void* x, const void* grad, const void* weight, Elem type, int64_t batch,
                     int64_t channels, int64_t pixels, bool channels_last, double step_size, double eps, double lo,
                     double hi, bool linf, double* sums, int* flag, cudaStream_t stream) {
  switch (type) {
    case Elem::f16: launch<__half>(x_adv, x, grad, weight, batch, channels, pixels, channels_last, step_size, eps, lo, hi, linf, sums, flag, stream); break;
    case Elem::bf16: launch<__nv_bfloat16>(x_adv, x, grad, weight, batch, channels, pixels, channels_last, step_size, eps, lo, hi, linf, sums, flag, stream); break;
    case Elem::f32: launch<float>(x_adv, x, grad, weight, batch, channels, pixels, channels_last, step_size, eps, lo, hi, linf, sums, flag, stream); break;
    case Elem::f64: launch<double>(x_adv, x, grad, weight, batch, channels, pixels, channels_last, step_size, eps, lo, hi, linf, sums, flag, stream); break;
    default: break;  // the glue accepts float types only
  }
}

}  // namespace cuda
}  // namespace attrefine_fast
