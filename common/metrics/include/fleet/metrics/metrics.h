// Every Prometheus metric family of Tensorfleet, declared in one place (docs/metrics.md lists
// them; dashboards and alert rules in monitoring/ depend on the names: renaming one is a
// breaking change). A process creates one Registry, the families it serves (WorkerMetrics or
// CoordinatorMetrics) and optionally a MetricsServer that exposes /metrics over HTTP.
//
// Labels are low-cardinality (model, block, device, src, dst, kind, type, outcome): never
// request or job ids.
//
// Thread safety: prometheus-cpp families and metrics are thread-safe; Family::Add may be called
// from any thread. MetricsServer is created and destroyed by one thread.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "fleet/status/status.h"

namespace fleet::metrics {

/// Buckets (seconds) of every duration histogram unless noted: 0.5 ms ... 300 s.
const prometheus::Histogram::BucketBoundaries& DurationBuckets();
/// Buckets of model load durations: 0.1 s ... 1800 s.
const prometheus::Histogram::BucketBoundaries& LoadBuckets();

/// The families of fleet-worker (docs/metrics.md, "Worker").
struct WorkerMetrics {
  explicit WorkerMetrics(prometheus::Registry& registry);

  prometheus::Family<prometheus::Gauge>& info;                        // device, backing, version
  prometheus::Family<prometheus::Gauge>& capacity_bytes;              // device
  prometheus::Family<prometheus::Gauge>& total_bytes;                 // device
  prometheus::Family<prometheus::Gauge>& resident_bytes;              // device, model
  prometheus::Family<prometheus::Gauge>& blocks_resident;             // device, model
  prometheus::Family<prometheus::Gauge>& activation_bytes;            // device
  prometheus::Family<prometheus::Gauge>& patched_bytes;               // device, model
  prometheus::Family<prometheus::Gauge>& shm_arena_bytes;             // device
  prometheus::Family<prometheus::Gauge>& connections;                 // device
  prometheus::Family<prometheus::Counter>& transfer_bytes;            // src, dst, kind
  prometheus::Family<prometheus::Histogram>& transfer_duration;       // src, dst, kind
  prometheus::Family<prometheus::Histogram>& block_compute_duration;  // device, model, block
  prometheus::Family<prometheus::Counter>& prefetch_stall;            // device, model
  prometheus::Family<prometheus::Counter>& block_loads;               // device, outcome
  prometheus::Family<prometheus::Counter>& load_bytes;                // device, source
  prometheus::Family<prometheus::Counter>& requests;                  // device, type, outcome

  /// {name, "gauge"|"counter"|"histogram"} of every family above.
  std::vector<std::pair<std::string, std::string>> Describe() const;
  /// Removes every series labelled model=`model` (when no block of it is held any more).
  void RemoveModel(const std::string& model);
};

/// The families of fleet-coordinator (docs/metrics.md, "Coordinator").
struct CoordinatorMetrics {
  explicit CoordinatorMetrics(prometheus::Registry& registry);

  prometheus::Family<prometheus::Gauge>& info;       // version
  prometheus::Family<prometheus::Gauge>& worker_up;  // worker, device
  prometheus::Family<prometheus::Gauge>& workers;
  prometheus::Family<prometheus::Counter>& register_conflicts;  // device
  prometheus::Family<prometheus::Gauge>& queue_depth;
  prometheus::Family<prometheus::Gauge>& queue_capacity;
  prometheus::Family<prometheus::Counter>& jobs;                   // type, outcome
  prometheus::Family<prometheus::Histogram>& step_duration;        // model, mode
  prometheus::Family<prometheus::Counter>& prefetch_stall;         // model
  prometheus::Family<prometheus::Counter>& step_transfer_bytes;    // model, kind
  prometheus::Family<prometheus::Histogram>& model_load_duration;  // model
  prometheus::Family<prometheus::Gauge>& model_loaded;             // model
  prometheus::Family<prometheus::Gauge>& model_bytes;              // model, device
  prometheus::Family<prometheus::Counter>& plan_decisions;         // model, mode
  prometheus::Family<prometheus::Gauge>& expected_bandwidth;       // src, dst
  prometheus::Family<prometheus::Counter>& forwards;               // model, outcome
  prometheus::Family<prometheus::Histogram>& queue_wait;           // type

  /// {name, "gauge"|"counter"|"histogram"} of every family above.
  std::vector<std::pair<std::string, std::string>> Describe() const;
  /// Removes every series labelled model=`model` (at unload: dashboards and alerts stop seeing
  /// the model instead of seeing zeros).
  void RemoveModel(const std::string& model);
};

/// Removes from `family` every series whose label `label` equals `value`.
template <typename T>
void RemoveSeries(prometheus::Family<T>& family, const std::string& label, const std::string& value);

/// The version string put in the *_info metrics.
const std::string& Version();

/// Serves a registry's text exposition at http://<listen>/metrics (HTTP/1.0, one thread; not
/// prometheus-cpp's CivetWeb Exposer, which cannot start in processes that load libtorch).
class MetricsServer {
 public:
  /// \param listen "127.0.0.1:0" style (port 0 picks a free port).
  static StatusOr<std::unique_ptr<MetricsServer>> Start(
      const std::string& listen, std::shared_ptr<prometheus::Registry> registry);
  ~MetricsServer();
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  /// "127.0.0.1:39001": the bound address.
  const std::string& address() const { return address_; }

  struct Impl;
  explicit MetricsServer(std::unique_ptr<Impl> impl, std::string address);

 private:
  std::unique_ptr<Impl> impl_;
  std::string address_;
};

/// The text exposition of `registry` (what /metrics returns), for tests and dumps.
std::string Serialize(prometheus::Registry& registry);

}  // namespace fleet::metrics
