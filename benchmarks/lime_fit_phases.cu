// Where the CUDA lime_fit kernel spends its time, phase by phase (csrc/cuda/lime_fit.cu).
//
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr -arch=native benchmarks/lime_fit_phases.cu -o lime_fit_phases
//   ./lime_fit_phases [B=256] [N=1000] [M=64] [L=5] [f64|f32] [reps=20]
//
// Builds the kernel with ATTREFINE_LIME_FIT_PHASE_CLOCKS, so thread 0 of every block records
// clock64() at the start and after each phase; prints the median time of a whole launch (CUDA
// events) and, per phase, the median and the largest cycles over the blocks of the last launch,
// in microseconds at the device's clock rate. Random masks (half the segments on; the first
// sample all on), uniform targets, LIME's kernel weights, alpha = 1. No torch needed.
#define ATTREFINE_LIME_FIT_PHASE_CLOCKS
#include "../csrc/cuda/lime_fit.cu"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

template <typename T>
int run(int64_t b, int64_t n, int64_t m, int64_t l, int reps) {
  namespace ac = attrefine_fast::cuda;
  std::mt19937 gen(0);
  std::bernoulli_distribution half(0.5);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  std::vector<char> masks(b * n * m);
  for (int64_t i = 0; i < b * n * m; ++i) masks[i] = (i / m) % n == 0 || half(gen);
  std::vector<T> targets(b * n * l);
  for (auto& t : targets) t = static_cast<T>(uniform(gen));
  std::vector<int64_t> counts(b, m);

  bool* d_masks;
  T *d_targets, *d_out;
  int64_t* d_counts;
  int32_t* d_status;
  double* d_scratch;
  long long* d_clocks;
  const int64_t scratch = ac::lime_fit_scratch_doubles(b, n, m, l);
  check(cudaMalloc(&d_masks, masks.size()), "cudaMalloc");
  check(cudaMalloc(&d_targets, targets.size() * sizeof(T)), "cudaMalloc");
  check(cudaMalloc(&d_counts, b * sizeof(int64_t)), "cudaMalloc");
  check(cudaMalloc(&d_out, (b * l * m + 3 * b * l) * sizeof(T)), "cudaMalloc");
  check(cudaMalloc(&d_status, b * sizeof(int32_t)), "cudaMalloc");
  check(cudaMalloc(&d_scratch, (scratch > 0 ? scratch : 1) * sizeof(double)), "cudaMalloc");
  check(cudaMalloc(&d_clocks, b * ac::kPhaseMarks * sizeof(long long)), "cudaMalloc");
  check(cudaMemcpy(d_masks, masks.data(), masks.size(), cudaMemcpyHostToDevice), "copy");
  check(cudaMemcpy(d_targets, targets.data(), targets.size() * sizeof(T), cudaMemcpyHostToDevice), "copy");
  check(cudaMemcpy(d_counts, counts.data(), b * sizeof(int64_t), cudaMemcpyHostToDevice), "copy");
  check(cudaMemcpyToSymbol(ac::phase_clocks, &d_clocks, sizeof(d_clocks)), "cudaMemcpyToSymbol");

  T *coef = d_out, *intercept = coef + b * l * m, *score = intercept + b * l, *local_pred = score + b * l;
  const auto launch = [&] {
    ac::lime_fit(d_masks, d_targets, nullptr, d_counts, sizeof(T) == 8 ? ac::Elem::f64 : ac::Elem::f32, b, n, m, l,
                 0.25, 1.0, coef, intercept, score, local_pred, d_status, d_scratch, nullptr);
  };
  for (int i = 0; i < 3; ++i) launch();
  check(cudaDeviceSynchronize(), "warm-up");
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  std::vector<double> times;
  for (int i = 0; i < reps; ++i) {
    cudaEventRecord(start);
    launch();
    cudaEventRecord(stop);
    check(cudaEventSynchronize(stop), "launch");
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    times.push_back(ms * 1e3);
  }
  std::vector<int32_t> status(b);
  std::vector<long long> clocks(b * ac::kPhaseMarks);
  check(cudaMemcpy(status.data(), d_status, b * sizeof(int32_t), cudaMemcpyDeviceToHost), "copy");
  check(cudaMemcpy(clocks.data(), d_clocks, clocks.size() * sizeof(long long), cudaMemcpyDeviceToHost), "copy");
  int device = 0, khz = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, device);
  cudaDeviceProp props;
  cudaGetDeviceProperties(&props, device);

  std::printf("%s  lime_fit B=%lld N=%lld M=%lld L=%lld %s: %.1f us per launch (median of %d), status %s\n",
              props.name, static_cast<long long>(b), static_cast<long long>(n), static_cast<long long>(m),
              static_cast<long long>(l), sizeof(T) == 8 ? "float64" : "float32", median(times), reps,
              std::all_of(status.begin(), status.end(), [](int32_t s) { return s == 0; }) ? "ok" : "NOT ok");
  const char* names[] = {"0 masks to bits", "1 kernel weights", "2 weighted means", "3 Gram and rhs",
                         "4 Cholesky", "5 substitution", "6 coef and R2"};
  const double us_per_cycle = 1e3 / khz;
  std::printf("%-20s %12s %12s   (per block, over the %lld blocks; clock %d MHz)\n", "phase", "median us", "max us",
              static_cast<long long>(b), khz / 1000);
  for (int k = 1; k < ac::kPhaseMarks; ++k) {
    std::vector<double> cycles;
    for (int64_t i = 0; i < b; ++i)
      cycles.push_back(static_cast<double>(clocks[i * ac::kPhaseMarks + k] - clocks[i * ac::kPhaseMarks + k - 1]));
    std::printf("%-20s %12.1f %12.1f\n", names[k - 1], median(cycles) * us_per_cycle,
                *std::max_element(cycles.begin(), cycles.end()) * us_per_cycle);
  }
  return std::all_of(status.begin(), status.end(), [](int32_t s) { return s == 0; }) ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const auto arg = [&](int i, long long fallback) { return argc > i ? std::atoll(argv[i]) : fallback; };
  const int64_t b = arg(1, 256), n = arg(2, 1000), m = arg(3, 64), l = arg(4, 5);
  const bool f32 = argc > 5 && std::string(argv[5]) == "f32";
  const int reps = static_cast<int>(arg(6, 20));
  return f32 ? run<float>(b, n, m, l, reps) : run<double>(b, n, m, l, reps);
}
