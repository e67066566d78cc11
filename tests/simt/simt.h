// A SIMT emulator for testing the CUDA kernels (csrc/cuda/*.cu) on a machine without a GPU.
//
// The kernel source is compiled by a host C++ compiler with this header forced in first (see
// tests/simt_build.py, which also turns `kernel<<<grid, block, bytes, stream>>>(args)` into
// `simt::launch(kernel, grid, block, bytes, stream)(args)` and `extern __shared__ T name[];` into
// a pointer to the block's dynamic shared memory). Each CUDA thread of a block runs as a fiber
// (ucontext) on one OS thread; the blocks of a grid run one after another. A fiber runs until it
// reaches a barrier (__syncthreads, a warp shuffle), so the emulation is deterministic.
//
// What it checks: barrier discipline (a __syncthreads some threads of the block never reach, or a
// full-warp shuffle some lanes never reach, is reported as a deadlock instead of hanging), missing
// barriers that make a result depend on the order of the threads (schedule(): forward, reversed
// or shuffled), dynamic shared memory overruns (a canary after the buffer), reads of dynamic
// shared memory never written (the buffer starts filled with 0xff bytes: NaN as float64/float32),
// the launch limits (block size, grid size, the 48 KiB default dynamic shared memory unless the
// kernel opted in to more); built with AddressSanitizer (tests/simt_build.py), every access.
// What it cannot check: races that need two threads interleaved between barriers (a fiber is
// never preempted there, so an unprotected read-modify-write is never torn), the memory model,
// warp-synchronous code without a barrier, and speed.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda_runtime.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

namespace simt {

constexpr unsigned kWarpSize = 32;
constexpr std::size_t kDefaultSharedBytes = 48 * 1024;
constexpr std::size_t kStackBytes = 256 * 1024;
constexpr std::size_t kCanaryBytes = 256;
constexpr unsigned char kCanary = 0xa5;

inline std::size_t& optin_shared_bytes() {
  static std::size_t bytes = 227 * 1024;  // sm_90's limit; tests may lower it
  return bytes;
}

inline unsigned& max_grid_y() {
  static unsigned rows = 65535;  // every GPU's gridDim.y limit; tests lower it to run the kernels' loops
  return rows;
}

// The order in which the fibers of a block run between two barriers: 0 by thread index, 1 the
// reverse, any other value a fresh pseudo-random order every time (seeded by the value). A missing
// barrier shows up as a result that depends on the order.
inline int& schedule() {
  static int mode = 0;
  return mode;
}

// The first error of the current emulated launch sequence ("" when none); the launch wrappers
// read and clear it.
inline std::string& error() {
  static std::string message;
  return message;
}

inline void fail(const std::string& message) {
  if (error().empty()) error() = message;
}

enum class State { run, block_barrier, warp_barrier, done };

struct Thread {
  ucontext_t context;
  dim3 idx;
  unsigned linear = 0;
  State state = State::run;
  alignas(16) unsigned char slot[16];  // a warp shuffle's or a block vote's value
};

struct Block {
  std::vector<Thread> threads;
  std::vector<std::unique_ptr<char[]>> stacks;
  ucontext_t scheduler;
  Thread* current = nullptr;
  dim3 block_idx, block_dim, grid_dim;
  std::function<void()> body;
  unsigned char* shared = nullptr;
};

inline Block*& running() {
  static Block* block = nullptr;
  return block;
}

inline Thread& this_thread() { return *running()->current; }

inline void yield(State state) {
  Thread& t = this_thread();
  t.state = state;
  swapcontext(&t.context, &running()->scheduler);
}

inline void entry() {
  Block* block = running();
  block->body();
  block->current->state = State::done;  // uc_link returns to the scheduler
}

inline std::map<const void*, std::size_t>& max_dynamic_shared() {
  static std::map<const void*, std::size_t> limits;
  return limits;
}

inline std::string where(const Thread& t) { return "thread " + std::to_string(t.linear); }

// Runs every fiber of the block to completion; false (and an error) on a deadlock.
inline bool run_block(Block& b) {
  const std::size_t n = b.threads.size();
  for (std::size_t i = 0; i < n; ++i) {
    Thread& t = b.threads[i];
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = b.stacks[i].get();
    t.context.uc_stack.ss_size = kStackBytes;
    t.context.uc_link = &b.scheduler;
    makecontext(&t.context, entry, 0);
    t.state = State::run;
  }
  std::vector<std::size_t> order(n);
  std::iota(order.begin(), order.end(), std::size_t(0));
  if (schedule() == 1) std::reverse(order.begin(), order.end());
  std::mt19937 random(static_cast<unsigned>(schedule()) * 7919u + b.block_idx.x);
  while (true) {
    if (schedule() > 1) std::shuffle(order.begin(), order.end(), random);
    for (const std::size_t i : order) {
      Thread& t = b.threads[i];
      if (t.state != State::run) continue;
      b.current = &t;
      swapcontext(&b.scheduler, &t.context);
    }
    bool released = false, any_alive = false, all_at_block = true;
    for (std::size_t w = 0; w < n; w += kWarpSize) {
      const std::size_t end = std::min(n, w + kWarpSize);
      bool whole_warp = true;
      for (std::size_t i = w; i < end; ++i) whole_warp &= b.threads[i].state == State::warp_barrier;
      if (whole_warp) {
        for (std::size_t i = w; i < end; ++i) b.threads[i].state = State::run;
        released = true;
      }
    }
    if (released) continue;
    for (auto& t : b.threads) {
      any_alive |= t.state != State::done;
      all_at_block &= t.state == State::done || t.state == State::block_barrier;
    }
    if (!any_alive) return true;
    if (all_at_block) {
      for (auto& t : b.threads)
        if (t.state == State::block_barrier) t.state = State::run;
      continue;
    }
    std::string stuck;
    for (auto& t : b.threads)
      if (t.state == State::warp_barrier) {
        stuck = where(t) + " waits at a warp shuffle some lanes of its warp never reach";
        break;
      }
    for (auto& t : b.threads)
      if (stuck.empty() && t.state == State::block_barrier) stuck = where(t) + " waits at a __syncthreads";
    fail("deadlock in block (" + std::to_string(b.block_idx.x) + ", " + std::to_string(b.block_idx.y) + ", " +
         std::to_string(b.block_idx.z) + "): " + stuck);
    return false;
  }
}

inline void run_grid(dim3 grid, dim3 block, std::size_t shared_bytes, const void* kernel, std::function<void()> body) {
  if (!error().empty()) return;  // a failed launch stops the sequence, as a sticky error would
  const std::size_t threads = std::size_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > max_grid_y() ||
      grid.z > 65535) {
    fail("invalid launch configuration: grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
         std::to_string(grid.z) + "), " + std::to_string(threads) + " threads per block");
    return;
  }
  const auto opted = max_dynamic_shared().find(kernel);
  const std::size_t limit = opted == max_dynamic_shared().end() ? kDefaultSharedBytes : opted->second;
  if (shared_bytes > limit) {
    fail("launch asks for " + std::to_string(shared_bytes) + " bytes of dynamic shared memory, the kernel may use " +
         std::to_string(limit));
    return;
  }
  Block b;
  b.threads.resize(threads);
  for (std::size_t i = 0; i < threads; ++i) {
    b.stacks.emplace_back(new char[kStackBytes]);
    Thread& t = b.threads[i];
    t.linear = static_cast<unsigned>(i);
    t.idx = dim3(static_cast<unsigned>(i % block.x), static_cast<unsigned>(i / block.x % block.y),
                 static_cast<unsigned>(i / (std::size_t(block.x) * block.y)));
  }
  std::vector<unsigned char> shared(shared_bytes + kCanaryBytes + 16);
  auto* base = reinterpret_cast<unsigned char*>((reinterpret_cast<std::uintptr_t>(shared.data()) + 15) & ~std::uintptr_t(15));
  b.shared = base;
  b.block_dim = block;
  b.grid_dim = grid;
  b.body = std::move(body);
  Block* outer = running();
  running() = &b;
  for (unsigned z = 0; z < grid.z && error().empty(); ++z)
    for (unsigned y = 0; y < grid.y && error().empty(); ++y)
      for (unsigned x = 0; x < grid.x && error().empty(); ++x) {
        b.block_idx = dim3(x, y, z);
        std::memset(base, 0xff, shared_bytes);
        std::memset(base + shared_bytes, kCanary, kCanaryBytes);
        if (!run_block(b)) break;
        for (std::size_t i = 0; i < kCanaryBytes; ++i)
          if (base[shared_bytes + i] != kCanary) {
            fail("block (" + std::to_string(x) + ", " + std::to_string(y) + ", " + std::to_string(z) +
                 ") wrote past its " + std::to_string(shared_bytes) + " bytes of dynamic shared memory");
            break;
          }
      }
  running() = outer;
}

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  std::size_t shared_bytes;
  template <typename... A>
  void operator()(A&&... args) const {
    std::tuple<P...> values(std::forward<A>(args)...);
    auto k = kernel;
    run_grid(grid, block, shared_bytes, reinterpret_cast<const void*>(k), [k, values] { std::apply(k, values); });
  }
};

template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, std::size_t shared_bytes = 0, cudaStream_t = nullptr) {
  return {kernel, grid, block, shared_bytes};
}

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(running()->shared);
}

inline void syncthreads() { yield(State::block_barrier); }

inline void syncwarp() { yield(State::warp_barrier); }

inline void check_full_mask(unsigned mask) {
  if (mask != 0xffffffffu) fail("warp intrinsics with a partial mask are not emulated");
}

template <typename T>
T shuffle(unsigned mask, T value, int source_of_lane(int lane, int arg), int arg) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable<T>::value, "shuffled values are small and trivial");
  check_full_mask(mask);
  Thread& t = this_thread();
  std::memcpy(t.slot, &value, sizeof(T));
  syncwarp();
  const int lane = static_cast<int>(t.linear % kWarpSize);
  const int src = source_of_lane(lane, arg);
  const std::size_t first = t.linear - lane, n = running()->threads.size();
  T out = value;
  if (src >= 0 && src < static_cast<int>(kWarpSize) && first + src < n)
    std::memcpy(&out, running()->threads[first + src].slot, sizeof(T));
  syncwarp();  // nobody overwrites its slot before every lane has read
  return out;
}

inline int xor_lane(int lane, int mask) { return lane ^ mask; }
inline int down_lane(int lane, int delta) { return lane + delta; }
inline int up_lane(int lane, int delta) { return lane - delta; }
inline int index_lane(int, int src) { return src; }

// A block-wide vote: every thread's predicate, combined after a barrier.
template <typename Combine>
int block_vote(int predicate, Combine combine, int start) {
  Thread& t = this_thread();
  std::memcpy(t.slot, &predicate, sizeof(int));
  syncthreads();
  int result = start;
  for (auto& other : running()->threads)
    if (other.state != State::done) {
      int p;
      std::memcpy(&p, other.slot, sizeof(int));
      result = combine(result, p != 0);
    }
  syncthreads();
  return result;
}

}  // namespace simt

// CUDA's built-in variables and the intrinsics the kernels use.
#define threadIdx (::simt::this_thread().idx)
#define blockIdx (::simt::running()->block_idx)
#define blockDim (::simt::running()->block_dim)
#define gridDim (::simt::running()->grid_dim)

inline void __syncthreads() { simt::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  simt::check_full_mask(mask);
  simt::syncwarp();
}
inline int __syncthreads_or(int p) { return simt::block_vote(p, [](int a, bool b) { return a | int(b); }, 0); }
inline int __syncthreads_and(int p) { return simt::block_vote(p, [](int a, bool b) { return a & int(b); }, 1); }
inline int __syncthreads_count(int p) { return simt::block_vote(p, [](int a, bool b) { return a + int(b); }, 0); }
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int = 32) { return simt::shuffle(mask, v, simt::xor_lane, lane_mask); }
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int = 32) {
  return simt::shuffle(mask, v, simt::down_lane, static_cast<int>(delta));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int = 32) {
  return simt::shuffle(mask, v, simt::up_lane, static_cast<int>(delta));
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int = 32) { return simt::shuffle(mask, v, simt::index_lane, src); }

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  simt::check_full_mask(mask);
  simt::Thread& t = simt::this_thread();
  std::memcpy(t.slot, &predicate, sizeof(int));
  simt::syncwarp();
  const unsigned lane = t.linear % simt::kWarpSize;
  const std::size_t first = t.linear - lane, n = simt::running()->threads.size();
  unsigned bits = 0;
  for (unsigned i = 0; i < simt::kWarpSize && first + i < n; ++i) {
    int p;
    std::memcpy(&p, simt::running()->threads[first + i].slot, sizeof(int));
    bits |= unsigned(p != 0) << i;
  }
  simt::syncwarp();
  return bits;
}

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
template <typename T>
T __ldg(const T* p) { return *p; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }

// Fibers are never preempted between barriers, so plain read-modify-writes are atomic here.
template <typename T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
T atomicOr(T* p, T v) {
  const T old = *p;
  *p = old | v;
  return old;
}
template <typename T>
T atomicMax(T* p, T v) {
  const T old = *p;
  *p = old < v ? v : old;
  return old;
}

// CUDA's min / max take mixed integer types; the common type, as CUDA's overloads give.
template <typename A, typename B>
inline typename std::common_type<A, B>::type min(A a, B b) {
  using C = typename std::common_type<A, B>::type;
  return C(a) < C(b) ? C(a) : C(b);
}
template <typename A, typename B>
inline typename std::common_type<A, B>::type max(A a, B b) {
  using C = typename std::common_type<A, B>::type;
  return C(a) < C(b) ? C(b) : C(a);
}
using std::isfinite;
using std::isnan;

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMaxGridDimY: *value = static_cast<int>(simt::max_grid_y()); return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(simt::optin_shared_bytes()); return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<std::size_t>(value) > simt::optin_shared_bytes())
    return cudaErrorInvalidValue;
  simt::max_dynamic_shared()[reinterpret_cast<const void*>(kernel)] = static_cast<std::size_t>(value);
  return cudaSuccess;
}
