// bench_transfer: how fast a tensor moves from one worker process to another.
//
// For each transport (shm: the same-host shared-memory channel; ipc and tcp: ZeroMQ data
// frames) two fleet-worker processes are started; worker A holds a tensor in a job, and the
// bench asks A to SendTensors it to worker B. A transfer counts as done when A's reply
// arrives, i.e. when B has the tensor in its tensor table and could compute on it. Each size
// runs `--reps` times (B's copy is dropped in between, outside the timing); the median is
// compared with a single-thread memcpy of the same size between pre-faulted buffers, measured
// in the same run right before.
//
//   bench_transfer [--sizes 1,4,16,64,256] [--reps 7] [--transports shm,ipc,tcp]
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "fleet/config/options.h"
#include "fleet/worker/client.h"
#include "fleet/worker/process.h"

namespace {

using Clock = std::chrono::steady_clock;
using fleet::worker::HostTensor;
using fleet::worker::WorkerClient;
using fleet::worker::WorkerProcess;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// One timed single-thread memcpy between pre-faulted buffers.
double MemcpyOnce(std::vector<uint8_t>& dst, std::vector<uint8_t>& src, int i) {
  src[i % src.size()] = static_cast<uint8_t>(i);
  const auto t0 = Clock::now();
  std::memcpy(dst.data(), src.data(), src.size());
  const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
  if (dst[i % dst.size()] != static_cast<uint8_t>(i)) std::abort();  // keep the copy observable
  return dt;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> sizes_mib = {"1", "4", "16", "64", "256"};
  std::vector<std::string> transports = {"shm", "ipc", "tcp"};
  int64_t reps = 7;
  int64_t copy_threads = 2;
  fleet::config::OptionSet set("bench_transfer", "Tensor throughput between two worker processes");
  set.Add("sizes", &sizes_mib, "Tensor sizes in MiB");
  set.Add("transports", &transports, "shm, ipc, tcp");
  set.Add("reps", &reps, "Transfers per size (median reported)");
  set.Add("shm_copy_threads", &copy_threads,
          "Threads a worker uses for one copy into a peer's arena");
  set.ParseOrExit(argc, argv);
  uint64_t largest = 0;
  for (const auto& s : sizes_mib) largest = std::max<uint64_t>(largest, std::stoull(s) << 20);
  const std::string bin =
      std::filesystem::read_symlink("/proc/self/exe").parent_path() / "fleet-worker";
  const std::string staging = std::to_string(largest + (64 << 20));

  // "A->B GB/s" is the sender's own view (SendTensors reply: copy + B's acknowledgement, without
  // the bench's request round trip).
  std::printf("%-6s %10s %12s %12s %8s %14s\n", "link", "size", "GB/s", "memcpy GB/s", "ratio",
              "A->B GB/s");
  bool shm_target_met = true;
  for (const auto& transport : transports) {
    const bool shm = transport == "shm";
    auto args = [&](const char* id, const std::string& listen) {
      std::vector<std::string> a = {"--id",
                                    id,
                                    "--capacity",
                                    "64mb",
                                    "--listen",
                                    listen,
                                    "--metrics-listen",
                                    "",
                                    "--shm-staging-bytes",
                                    staging,
                                    "--threads",
                                    "2",
                                    "--compute-threads",
                                    "1",
                                    "--shm-copy-threads",
                                    std::to_string(copy_threads)};
      if (!shm) a.push_back("--shm=false");
      return a;
    };
    const std::string base = "/tmp/fleet-bench-" + std::to_string(getpid());
    auto listen = [&](const char* tag) {
      return transport == "ipc" ? "ipc://" + base + "-" + tag + ".ipc"
                                : std::string("tcp://127.0.0.1:*");
    };
    auto a = WorkerProcess::Start(bin, args("cuda:0", listen("a")));
    auto b = WorkerProcess::Start(bin, args("cuda:1", listen("b")));
    if (!a.ok() || !b.ok()) {
      std::fprintf(stderr, "cannot start workers: %s\n",
                   (a.ok() ? b.status() : a.status()).ToString().c_str());
      return 1;
    }
    auto ca = WorkerClient::Connect((*a)->endpoint(), {});
    auto cb = WorkerClient::Connect((*b)->endpoint(), {});
    if (!ca.ok() || !cb.ok()) {
      std::fprintf(stderr, "cannot connect: %s\n",
                   (ca.ok() ? cb.status() : ca.status()).ToString().c_str());
      return 1;
    }
    for (const auto& s : sizes_mib) {
      const uint64_t bytes = std::stoull(s) << 20;
      std::vector<uint8_t> data(bytes);
      for (uint64_t i = 0; i < bytes; i += 4096) data[i] = static_cast<uint8_t>(i >> 12);
      fleet::Status put = (*ca)->PutTensors(
          "src", {HostTensor::Own("t", fleet::wire::DType::U8, {static_cast<int64_t>(bytes)},
                                  std::move(data))});
      if (!put.ok()) {
        std::fprintf(stderr, "PutTensors: %s\n", put.ToString().c_str());
        return 1;
      }
      // The baseline runs interleaved with the transfers so both see the same machine load.
      std::vector<uint8_t> src(bytes, 1), dst(bytes, 0);
      std::vector<double> t, tm, worker_side;
      for (int i = -1; i < reps; ++i) {  // one warm-up round
        const double m = MemcpyOnce(dst, src, i + 1);
        if (i >= 0) tm.push_back(m);
        const auto t0 = Clock::now();
        auto sent = (*ca)->SendTensors("src", {"t"}, (*b)->endpoint(), "dst");
        const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
        if (!sent.ok() || sent->transport != (shm ? "shm" : "frames")) {
          std::fprintf(stderr, "SendTensors over %s: %s\n", transport.c_str(),
                       sent.ok() ? sent->transport.c_str() : sent.status().ToString().c_str());
          return 1;
        }
        if (i >= 0) t.push_back(dt);
        if (i >= 0) worker_side.push_back(sent->seconds);
        (void)(*cb)->DropJob("dst");
      }
      const double gbps = bytes / Median(t) / 1e9, memcpy_gbps = bytes / Median(tm) / 1e9;
      const double ratio = gbps / memcpy_gbps;
      std::printf("%-6s %7s MiB %12.2f %12.2f %7.2fx %14.2f\n", transport.c_str(), s.c_str(), gbps,
                  memcpy_gbps, ratio, bytes / Median(worker_side) / 1e9);
      std::fflush(stdout);
      if (shm && bytes >= (16u << 20) && ratio < 0.8) shm_target_met = false;
    }
    (void)(*ca)->DropJob("src");
  }
  std::printf("target (shm >= 0.8x memcpy from 16 MiB): %s\n", shm_target_met ? "met" : "NOT met");
  return 0;
}
