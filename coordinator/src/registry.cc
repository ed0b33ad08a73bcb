#include "fleet/coordinator/registry.h"

#include <algorithm>
#include <cstdio>

#include "fleet/log/log.h"
#include "fleet/protocol/protocol.h"

namespace fleet::coordinator {

using Clock = std::chrono::steady_clock;

namespace {

std::string Str(const flatbuffers::String* s) { return s ? s->str() : std::string(); }

void FillStats(const wire::StatsResponse* stats, WorkerRecord* r) {
  if (stats == nullptr) return;
  if (stats->device() && !stats->device()->str().empty()) r->device = stats->device()->str();
  if (stats->backing() && !stats->backing()->str().empty()) r->backing = stats->backing()->str();
  r->capacity_bytes = stats->capacity_bytes();
  r->total_bytes = stats->total_bytes();
  r->resident_bytes = stats->resident_bytes();
  r->activation_bytes = stats->activation_bytes();
  r->models.clear();
  if (stats->models()) {
    for (const auto* m : *stats->models()) {
      ModelResidency mr{Str(m->model()), {}, m->resident_bytes()};
      if (m->blocks()) {
        for (const auto* b : *m->blocks()) mr.blocks.push_back(b->str());
      }
      r->models.push_back(std::move(mr));
    }
  }
}

std::string Seconds(Clock::duration d) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f s", std::chrono::duration<double>(d).count());
  return buf;
}

}  // namespace

WorkerRegistry::WorkerRegistry(const RegistryOptions& options, StatsProbe probe, Listener listener)
    : options_(options), probe_(std::move(probe)), listener_(std::move(listener)) {}

StatusOr<std::unique_ptr<WorkerRegistry>> WorkerRegistry::Start(const RegistryOptions& options,
                                                                StatsProbe probe,
                                                                Listener listener) {
  std::unique_ptr<WorkerRegistry> r(new WorkerRegistry(options, std::move(probe), std::move(listener)));
  if (!options.register_listen.empty()) {
    r->socket_ = std::make_unique<zmq::socket_t>(transport::Context(), zmq::socket_type::router);
    transport::SocketOptions so;
    so.max_message_bytes = 1 << 20;  // events are small; anything bigger is hostile
    so.curve = options.curve;
    so.server = true;
    FLEET_RETURN_IF_ERROR(transport::ConfigureSocket(*r->socket_, so));
    FLEET_ASSIGN_OR_RETURN(r->register_endpoint_, transport::Bind(*r->socket_, options.register_listen));
  }
  // Static workers are known from the start (down until their first answer).
  for (const auto& endpoint : options.static_workers) {
    WorkerRecord rec;
    rec.endpoint = endpoint;
    rec.device = "?" + endpoint;  // replaced by the device id once it answers
    r->workers_[rec.device] = rec;
  }
  r->thread_ = std::thread([p = r.get()] { p->Loop(); });
  if (r->probe_) {
    for (const auto& endpoint : options.static_workers) {
      r->probe_threads_.emplace_back([p = r.get(), endpoint] { p->ProbeLoop(endpoint); });
    }
  }
  return r;
}

WorkerRegistry::~WorkerRegistry() { Stop(); }

void WorkerRegistry::Stop() {
  if (stop_.exchange(true)) return;
  if (thread_.joinable()) thread_.join();
  for (auto& t : probe_threads_) t.join();
  probe_threads_.clear();
  socket_.reset();
}

void WorkerRegistry::Loop() {
  while (!stop_.load()) {
    if (socket_) {
      zmq::pollitem_t item{socket_->handle(), 0, ZMQ_POLLIN, 0};
      try {
        zmq::poll(&item, 1, std::chrono::milliseconds(100));
      } catch (const zmq::error_t& e) {
        FLEET_LOG(WARNING, "registry") << "poll failed: " << e.what();
      }
      if (item.revents & ZMQ_POLLIN) {
        auto frames = transport::RecvFrames(*socket_, std::chrono::milliseconds(0));
        if (frames.ok() && frames->size() >= 2) {
          std::string identity(static_cast<const char*>((*frames)[0].data()), (*frames)[0].size());
          frames->erase(frames->begin());
          HandleEvent(identity, *frames);
        }
      }
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    CheckTimeouts();
  }
}

void WorkerRegistry::HandleEvent(const std::string& identity, transport::Frames& frames) {
  protocol::Limits limits;
  limits.max_header_bytes = 1 << 20;
  transport::AlignFrame(frames[0]);
  auto event = protocol::VerifyWorkerEvent(transport::FrameBytes(frames[0]), limits);
  if (!event.ok()) {
    FLEET_LOG(WARNING, "registry") << "dropped a malformed worker event: " << event.status();
    return;
  }
  const wire::WorkerEvent* e = *event;
  if (const auto* reg = e->body_as_Register()) {
    if (reg->hello() == nullptr) {
      FLEET_LOG(WARNING, "registry") << "Register without Hello dropped";
      return;
    }
    protocol::HelloInfo theirs = protocol::ReadHello(*reg->hello());
    if (theirs.major != protocol::kMajor) {
      FLEET_LOG(ERROR, "registry") << "worker " << Str(reg->device()) << " at " << Str(reg->listen())
                                   << " speaks protocol " << theirs.major << "." << theirs.minor
                                   << ", this coordinator " << protocol::kMajor << "."
                                   << protocol::kMinor << ": refused";
      return;
    }
    WorkerRecord rec;
    rec.device = Str(reg->device());
    rec.endpoint = Str(reg->listen());
    rec.backing = Str(reg->backing());
    rec.total_bytes = reg->total_bytes();
    rec.capacity_bytes = reg->capacity_bytes();
    rec.device_name = Str(reg->device_name());
    rec.metrics = Str(reg->metrics());
    rec.instance = theirs.instance;
    rec.registered = true;
    if (rec.device.empty() || rec.endpoint.empty()) {
      FLEET_LOG(WARNING, "registry") << "Register without device or endpoint dropped";
      return;
    }
    Upsert(std::move(rec), identity);
    return;
  }
  if (const auto* hb = e->body_as_Heartbeat()) {
    std::unique_lock lock(mu_);
    auto it = identity_device_.find(identity);
    if (it == identity_device_.end()) return;  // unknown sender: it re-registers periodically
    auto w = workers_.find(it->second);
    if (w == workers_.end()) return;
    bool was_up = w->second.up;
    FillStats(hb->stats(), &w->second);
    w->second.last_seen = Clock::now();
    w->second.up = true;
    WorkerRecord copy = w->second;
    lock.unlock();
    changed_.notify_all();
    if (!was_up) {
      FLEET_LOG(INFO, "registry") << "worker " << copy.device << " at " << copy.endpoint << " is up again";
      if (listener_) listener_(copy);
    }
  }
}

void WorkerRegistry::Upsert(WorkerRecord rec, const std::string& identity) {
  std::unique_lock lock(mu_);
  auto it = workers_.find(rec.device);
  bool is_new = it == workers_.end();
  bool restarted = false;
  if (!is_new) {
    if (!rec.instance.empty() && !it->second.instance.empty()) {
      // The process's own id says it: a new connection of the same process is a reconnect.
      restarted = rec.instance != it->second.instance;
    } else {
      // A peer without instance ids: another connection or endpoint means another process.
      auto old = identity_device_.find(identity);
      restarted = old == identity_device_.end() || it->second.endpoint != rec.endpoint;
    }
    // Another process claims a device id that is up, heard from within the heartbeat timeout,
    // at another endpoint: two live workers with one id (two nodes' cuda:0). Taking over would
    // fail every model on the first; refuse until the first goes quiet (a worker that really
    // restarted on a new port is accepted at its next re-register, once the old one timed out).
    if (restarted && it->second.up && it->second.endpoint != rec.endpoint &&
        Clock::now() - it->second.last_seen < options_.heartbeat_timeout) {
      const uint64_t n = ++conflicts_[rec.device];
      const WorkerRecord held = it->second;
      lock.unlock();
      FLEET_LOG(ERROR, "registry")
          << "refused a Register for device " << rec.device << " from " << rec.endpoint
          << " (instance " << rec.instance << "): " << rec.device << " is up at " << held.endpoint
          << " (instance " << held.instance
          << "). Device ids must be unique in a cluster; give the workers of each node their "
             "own ids ("
          << n << " refused so far)";
      return;
    }
    if (!restarted && it->second.up) {
      // A periodic re-register of a live worker, maybe on a new connection: its heartbeats
      // come from this identity now.
      for (auto i = identity_device_.begin(); i != identity_device_.end();) {
        i = i->second == rec.device ? identity_device_.erase(i) : std::next(i);
      }
      identity_device_[identity] = rec.device;
      it->second.last_seen = Clock::now();
      return;
    }
    rec.generation = restarted ? next_generation_++ : it->second.generation;
    rec.models = it->second.models;
  } else {
    rec.generation = next_generation_++;
  }
  for (auto i = identity_device_.begin(); i != identity_device_.end();) {
    i = i->second == rec.device ? identity_device_.erase(i) : std::next(i);
  }
  identity_device_[identity] = rec.device;
  rec.up = true;
  rec.last_seen = Clock::now();
  workers_[rec.device] = rec;
  lock.unlock();
  changed_.notify_all();
  FLEET_LOG(INFO, "registry") << "worker " << rec.device << " (" << rec.backing << ", capacity "
                              << rec.capacity_bytes << " bytes) registered from " << rec.endpoint
                              << (restarted ? " after a restart" : "");
  if (listener_) listener_(rec);
}

// Each static worker is probed on a thread of its own, so neither a dead one (whose probe waits
// out its timeout) nor a slow one delays the others' answers or the register endpoint's
// heartbeats: either would make healthy workers look down.
void WorkerRegistry::ProbeLoop(const std::string& endpoint) {
  while (!stop_.load()) {
    const auto next = Clock::now() + options_.poll_interval;
    FileProbe(endpoint, probe_(endpoint));
    while (!stop_.load() && Clock::now() < next) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
}

void WorkerRegistry::FileProbe(const std::string& endpoint, StatusOr<WorkerRecord> answer) {
  if (!answer.ok()) return;  // the timeout check marks it down
  std::unique_lock lock(mu_);
  auto it = std::find_if(workers_.begin(), workers_.end(), [&](const auto& entry) {
    return !entry.second.registered && entry.second.endpoint == endpoint;
  });
  if (it == workers_.end()) return;
  WorkerRecord rec = *answer;
  rec.endpoint = endpoint;
  rec.registered = false;
  rec.last_seen = Clock::now();
  bool came_up = !it->second.up;
  const bool restarted = !it->second.instance.empty() && rec.instance != it->second.instance;
  rec.generation = it->second.generation && !restarted ? it->second.generation : next_generation_++;
  rec.up = true;
  if (rec.device != it->first) {  // first answer: file it under its real device id
    workers_.erase(it);
  }
  workers_[rec.device] = rec;
  lock.unlock();
  changed_.notify_all();
  if (came_up || restarted) {
    FLEET_LOG(INFO, "registry") << "static worker " << rec.device << " at " << endpoint << " is up"
                                << (restarted ? " after a restart" : "");
    if (listener_) listener_(rec);
  }
}

std::map<std::string, uint64_t> WorkerRegistry::RegisterConflicts() const {
  std::lock_guard lock(mu_);
  return conflicts_;
}

void WorkerRegistry::CheckTimeouts() {
  std::vector<WorkerRecord> went_down;
  {
    std::lock_guard lock(mu_);
    auto now = Clock::now();
    for (auto& [device, w] : workers_) {
      if (w.up && now - w.last_seen > options_.heartbeat_timeout) {
        w.up = false;
        went_down.push_back(w);
      }
    }
  }
  for (const auto& w : went_down) {
    FLEET_LOG(WARNING, "registry") << "worker " << w.device << " at " << w.endpoint
                                   << " is down: no heartbeat for more than "
                                   << Seconds(options_.heartbeat_timeout);
    if (listener_) listener_(w);
  }
  if (!went_down.empty()) changed_.notify_all();
}

std::vector<WorkerRecord> WorkerRegistry::Snapshot() const {
  std::lock_guard lock(mu_);
  std::vector<WorkerRecord> out;
  for (const auto& [device, w] : workers_) out.push_back(w);
  return out;
}

StatusOr<WorkerRecord> WorkerRegistry::Get(const std::string& device) const {
  std::lock_guard lock(mu_);
  auto it = workers_.find(device);
  if (it == workers_.end()) return NotFoundError("no worker serves device '" + device + "'");
  if (!it->second.up) {
    return UnavailableError("worker " + device + " at " + it->second.endpoint + " is down (silent for " +
                            Seconds(Clock::now() - it->second.last_seen) + ")");
  }
  return it->second;
}

void WorkerRegistry::MarkDown(const std::string& device, const std::string& why) {
  WorkerRecord copy;
  {
    std::lock_guard lock(mu_);
    auto it = workers_.find(device);
    if (it == workers_.end() || !it->second.up) return;
    it->second.up = false;
    copy = it->second;
  }
  FLEET_LOG(WARNING, "registry") << "worker " << device << " marked down: " << why;
  changed_.notify_all();
  if (listener_) listener_(copy);
}

bool WorkerRegistry::WaitForWorkers(size_t count, std::chrono::milliseconds timeout) const {
  std::unique_lock lock(mu_);
  return changed_.wait_for(lock, timeout, [&] {
    size_t up = 0;
    for (const auto& [d, w] : workers_) up += w.up ? 1 : 0;
    return up >= count;
  });
}

}  // namespace fleet::coordinator
