// Dequantisation throughput: ours (runtime-dispatched AVX2, and the scalar reference) against
// ggml's own dequantize_row_* from libggml-base.so, on the same blocks (quantised by ggml), in
// the same run, single thread. Prints output GB/s (f32 bytes written) and ours/ggml ratios;
// also checks that the outputs are byte-identical.
//
//   bench_dequant [--elements N] [--reps R]      (defaults: 4M elements, 15 repetitions)
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "fleet/formats/dequant.h"
#include "fleet/formats/dtype.h"

namespace {

using fleet::formats::GgmlType;
using ToFloat = void (*)(const void*, float*, int64_t);
using QuantizeChunk = size_t (*)(int, const float*, void*, int64_t, int64_t, int64_t, const float*);
using F32ToHalfRow = void (*)(const float*, void*, int64_t);

template <typename T>
class AlignedBuffer {
 public:
  explicit AlignedBuffer(int64_t n)
      : n_(static_cast<size_t>(n)),
        p_(static_cast<T*>(std::aligned_alloc(64, (n_ * sizeof(T) + 63) / 64 * 64))) {
    std::memset(static_cast<void*>(p_), 1, n_ * sizeof(T));
  }
  ~AlignedBuffer() { std::free(p_); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  T* data() { return p_; }
  size_t size() const { return n_; }

 private:
  size_t n_;
  T* p_;
};

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

template <typename F>
double TimeSeconds(F f) {
  auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  int64_t n = 4 << 20;
  int reps = 15;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--elements") == 0) n = std::atoll(argv[i + 1]);
    if (std::strcmp(argv[i], "--reps") == 0) reps = std::atoi(argv[i + 1]);
  }
  n = std::max<int64_t>(4096, n / 4096 * 4096);  // whole rows of 4096
  const char* src_dir = std::getenv("FLEET_SOURCE_DIR");
  std::string lib = std::string(src_dir ? src_dir : FLEET_SOURCE_DIR_DEFAULT) +
                    "/node_modules/@node-llama-cpp/linux-x64/bins/linux-x64/libggml-base.so";
  void* h = dlopen(lib.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    std::fprintf(stderr, "bench_dequant: cannot load ggml (%s): %s\n", lib.c_str(), dlerror());
    return 2;
  }
  auto quantize = reinterpret_cast<QuantizeChunk>(dlsym(h, "ggml_quantize_chunk"));
  auto to_bf16 = reinterpret_cast<F32ToHalfRow>(dlsym(h, "ggml_fp32_to_bf16_row"));
  if (!quantize || !to_bf16) {
    std::fprintf(stderr, "bench_dequant: ggml symbols missing\n");
    return 2;
  }
  std::mt19937 rng(42);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> x(static_cast<size_t>(n));
  for (auto& v : x) v = normal(rng);
  // Pre-faulted outputs, reused by every run (fresh pages cost ~10 us each on this VM), 64-byte
  // aligned for both sides as at::empty allocates them (a 16-byte aligned std::vector makes
  // every other 32-byte store split a cache line).
  AlignedBuffer<float> ours(n), theirs(n);
  AlignedBuffer<uint16_t> ours16(n), theirs16(n);

  std::printf("dequant: %lld elements per run, median of %d, single thread, AVX2 path %s\n",
              static_cast<long long>(n), reps, fleet::formats::DequantUsesAvx2() ? "on" : "off");
  std::printf("%-6s %12s %12s %12s %8s %8s %14s %8s %s\n", "type", "ggml GB/s", "ours GB/s",
              "scalar GB/s", "ratio", "scalar", "bf16 ours/ggml", "", "identical");
  struct Row {
    GgmlType type;
    const char* ggml_fn;
  };
  const Row rows[] = {{GgmlType::kF16, "ggml_fp16_to_fp32_row"},
                      {GgmlType::kBF16, "ggml_bf16_to_fp32_row"},
                      {GgmlType::kQ8_0, "dequantize_row_q8_0"},
                      {GgmlType::kQ4_0, "dequantize_row_q4_0"},
                      {GgmlType::kQ4_1, "dequantize_row_q4_1"},
                      {GgmlType::kQ5_0, "dequantize_row_q5_0"},
                      {GgmlType::kQ5_1, "dequantize_row_q5_1"},
                      {GgmlType::kQ2_K, "dequantize_row_q2_K"},
                      {GgmlType::kQ3_K, "dequantize_row_q3_K"},
                      {GgmlType::kQ4_K, "dequantize_row_q4_K"},
                      {GgmlType::kQ5_K, "dequantize_row_q5_K"},
                      {GgmlType::kQ6_K, "dequantize_row_q6_K"},
                      {GgmlType::kIQ4_NL, "dequantize_row_iq4_nl"},
                      {GgmlType::kIQ4_XS, "dequantize_row_iq4_xs"},
                      {GgmlType::kIQ3_S, "dequantize_row_iq3_s"},
                      {GgmlType::kIQ3_XXS, "dequantize_row_iq3_xxs"},
                      {GgmlType::kIQ2_XXS, "dequantize_row_iq2_xxs"},
                      {GgmlType::kIQ2_XS, "dequantize_row_iq2_xs"},
                      {GgmlType::kIQ2_S, "dequantize_row_iq2_s"},
                      {GgmlType::kIQ1_S, "dequantize_row_iq1_s"},
                      {GgmlType::kIQ1_M, "dequantize_row_iq1_m"},
                      {GgmlType::kTQ1_0, "dequantize_row_tq1_0"},
                      {GgmlType::kTQ2_0, "dequantize_row_tq2_0"},
                      {GgmlType::kMXFP4, "dequantize_row_mxfp4"},
                      {GgmlType::kNVFP4, "dequantize_row_nvfp4"},
                      {GgmlType::kQ1_0, "dequantize_row_q1_0"},
                      {GgmlType::kQ2_0, "dequantize_row_q2_0"}};
  // The IQ types need an importance matrix to quantise (ggml refuses some without one, and IQ2_S
  // and IQ1_M crash without); the same synthetic one for all: each column's mean square.
  std::vector<float> imatrix(4096, 0.f);
  for (int64_t i = 0; i < n; ++i)
    imatrix[static_cast<size_t>(i % 4096)] += x[static_cast<size_t>(i)] * x[static_cast<size_t>(i)];
  for (auto& v : imatrix) v = v / static_cast<float>(n / 4096) + 1e-6f;
  double worst = 1e9;
  bool all_identical = true;
  for (const Row& r : rows) {
    auto traits = *fleet::formats::GgmlTypeInfo(static_cast<uint32_t>(r.type));
    auto fn = reinterpret_cast<ToFloat>(dlsym(h, r.ggml_fn));
    if (!fn) {
      std::fprintf(stderr, "bench_dequant: %s missing\n", r.ggml_fn);
      return 2;
    }
    std::vector<uint8_t> q(static_cast<size_t>(n / traits.block_size * traits.type_size));
    if (r.type == GgmlType::kF16 || r.type == GgmlType::kBF16) {
      for (int64_t i = 0; i < n; ++i) {
        uint16_t v = r.type == GgmlType::kF16
                         ? fleet::formats::Fp32ToFp16(x[static_cast<size_t>(i)])
                         : fleet::formats::Fp32ToBf16(x[static_cast<size_t>(i)]);
        std::memcpy(q.data() + 2 * i, &v, 2);
      }
    } else {
      quantize(static_cast<int>(r.type), x.data(), q.data(), 0, n / 4096, 4096, imatrix.data());
    }
    std::vector<double> tg, to, ts, tob, tgb;
    for (int k = 0; k < reps; ++k) {
      tg.push_back(TimeSeconds([&] { fn(q.data(), theirs.data(), n); }));
      // Every f32 run writes the same buffer, so no side finds its output warmer in cache.
      to.push_back(TimeSeconds([&] {
        (void)fleet::formats::Dequantize(r.type, q, n, fleet::formats::OutType::kF32,
                                         theirs.data());
      }));
      ts.push_back(TimeSeconds([&] {
        (void)fleet::formats::DequantizeReference(r.type, q, n, fleet::formats::OutType::kF32,
                                                  theirs.data());
      }));
      // bf16 output: ggml needs dequantize + ggml_fp32_to_bf16_row; ours fuses the two.
      tgb.push_back(TimeSeconds([&] {
        fn(q.data(), theirs.data(), n);
        to_bf16(theirs.data(), theirs16.data(), n);
      }));
      tob.push_back(TimeSeconds([&] {
        (void)fleet::formats::Dequantize(r.type, q, n, fleet::formats::OutType::kBF16,
                                         ours16.data());
      }));
    }
    fn(q.data(), theirs.data(), n);
    to_bf16(theirs.data(), theirs16.data(), n);
    (void)fleet::formats::Dequantize(r.type, q, n, fleet::formats::OutType::kF32, ours.data());
    const bool identical = std::memcmp(ours.data(), theirs.data(), ours.size() * 4) == 0 &&
                           std::memcmp(ours16.data(), theirs16.data(), ours16.size() * 2) == 0;
    all_identical &= identical;
    const double bytes = static_cast<double>(n) * 4;
    const double g = bytes / Median(tg) / 1e9, o = bytes / Median(to) / 1e9,
                 s = bytes / Median(ts) / 1e9;
    const double bf = Median(tgb) / Median(tob);
    worst = std::min(worst, o / g);
    std::printf("%-6s %12.2f %12.2f %12.2f %7.2fx %7.2fx %13.2fx %8s %s\n",
                std::string(traits.name).c_str(), g, o, s, o / g, s / g, bf, "",
                identical ? "yes" : "NO");
  }
  std::printf("worst ours/ggml ratio (f32 output): %.2fx; outputs identical: %s\n", worst,
              all_identical ? "yes" : "NO");
  return all_identical ? 0 : 1;
}
