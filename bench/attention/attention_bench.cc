// One attention, chunked by the score budget (fleet::models::ScaledDotAttention) against the
// same call unchunked, in the same run: time and peak memory, as ratios. Each measurement runs
// in a child process, so its peak resident memory (VmHWM, reset through /proc/self/clear_refs
// after the inputs exist) is that attention's alone.
//
//   bench_attention [--tokens 4096] [--heads 40] [--long-tokens 32760] [--long-heads 2]
//                   [--threads 2]
#include <ATen/Parallel.h>
#include <ATen/ops/randn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#include "fleet/families/attention.h"
#include "fleet/models/attention.h"

namespace {

struct Result {
  double seconds = 0;
  double peak_mib = 0;  // resident memory the attention added at its peak
};

long StatusKib(const char* field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field, 0) == 0) return std::atol(line.c_str() + std::strlen(field));
  }
  return -1;
}

// Runs one attention of `heads` x `tokens` x 128 (float32) in a child; max_rows 0 = the budget.
Result Measure(int64_t heads, int64_t tokens, int64_t max_rows, int threads) {
  int fd[2];
  if (pipe(fd) != 0) std::exit(2);
  pid_t pid = fork();
  if (pid == 0) {
    close(fd[0]);
    at::set_num_threads(threads);
    {  // warm up: thread pools and BLAS set up outside the measurement
      at::Tensor w = at::randn({1, 2, 64, 128});
      fleet::models::ScaledDotAttention(w, w, w, max_rows);
    }
    at::Tensor q = at::randn({1, heads, tokens, 128}), k = at::randn({1, heads, tokens, 128}),
               v = at::randn({1, heads, tokens, 128});
    std::ofstream("/proc/self/clear_refs") << "5";  // VmHWM := VmRSS
    const long base = StatusKib("VmRSS:");
    auto t0 = std::chrono::steady_clock::now();
    at::Tensor out = fleet::models::ScaledDotAttention(q, k, v, max_rows);
    Result r;
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    r.peak_mib = static_cast<double>(StatusKib("VmHWM:") - base) / 1024.0;
    if (write(fd[1], &r, sizeof(r)) != sizeof(r)) _exit(3);
    _exit(out.numel() > 0 ? 0 : 4);
  }
  close(fd[1]);
  Result r;
  const bool got = read(fd[0], &r, sizeof(r)) == sizeof(r);
  close(fd[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  if (!got || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    std::fprintf(stderr, "bench_attention: the child for %lld tokens failed\n",
                 static_cast<long long>(tokens));
    std::exit(2);
  }
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t tokens = 4096, heads = 40, long_tokens = 32760, long_heads = 2;
  int threads = 2;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    const int64_t value = std::atoll(argv[i + 1]);
    if (flag == "--tokens") tokens = value;
    if (flag == "--heads") heads = value;
    if (flag == "--long-tokens") long_tokens = value;
    if (flag == "--long-heads") long_heads = value;
    if (flag == "--threads") threads = static_cast<int>(value);
  }
  const double budget = static_cast<double>(fleet::families::kAttentionBudgetBytes) / (1 << 20);
  std::printf("attention: float32, head width 128, %d threads, score budget %.0f MiB\n", threads,
              budget);
  const int64_t rows = fleet::families::AttentionChunkRows(heads, tokens, tokens);
  Result whole = Measure(heads, tokens, tokens, threads);
  Result chunked = Measure(heads, tokens, 0, threads);
  std::printf("%lld tokens x %lld heads, unchunked:            %7.2f s  peak +%8.0f MiB\n",
              static_cast<long long>(tokens), static_cast<long long>(heads), whole.seconds,
              whole.peak_mib);
  std::printf("%lld tokens x %lld heads, chunks of %4lld rows:  %7.2f s  peak +%8.0f MiB\n",
              static_cast<long long>(tokens), static_cast<long long>(heads),
              static_cast<long long>(rows), chunked.seconds, chunked.peak_mib);
  std::printf("chunked / unchunked: time %.2fx, peak memory %.3fx\n",
              chunked.seconds / whole.seconds, chunked.peak_mib / whole.peak_mib);
  const int64_t long_rows =
      fleet::families::AttentionChunkRows(long_heads, long_tokens, long_tokens);
  Result longer = Measure(long_heads, long_tokens, 0, threads);
  const double full = static_cast<double>(long_heads) * static_cast<double>(long_tokens) *
                      long_tokens * 12 / (1 << 20);
  std::printf(
      "%lld tokens x %lld heads, chunks of %4lld rows: %7.2f s  peak +%8.0f MiB (budget %.0f MiB; "
      "unchunked scores would take %.0f MiB)\n",
      static_cast<long long>(long_tokens), static_cast<long long>(long_heads),
      static_cast<long long>(long_rows), longer.seconds, longer.peak_mib, budget, full);
  return 0;
}
