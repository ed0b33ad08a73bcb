#include "fleet/log/log.h"
#include "fleet/config/text.h"

#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <map>
#include <mutex>

namespace fleet::log {
namespace {

struct State {
  std::mutex mu;
  Sink sink;                         // guarded by mu; empty = default stderr sink
  std::string process_tag;           // guarded by mu
  std::map<std::string, int, std::less<>> verbosity;  // guarded by mu
  int default_verbosity = 0;         // guarded by mu
  std::atomic<int> min_level{static_cast<int>(Level::kInfo)};
  std::atomic<int> format{static_cast<int>(Format::kText)};
  std::atomic<bool> env_read{false};
};

State& GetState() {
  static State* state = new State();  // never destroyed: logging works during static teardown
  return *state;
}

void EnsureEnv() {
  if (!GetState().env_read.load(std::memory_order_acquire)) ConfigureFromEnv();
}

char LevelLetter(Level level) {
  switch (level) {
    case Level::kDebug: return 'D';
    case Level::kInfo: return 'I';
    case Level::kWarning: return 'W';
    case Level::kError: return 'E';
  }
  return '?';
}

const char* LevelName(Level level) {
  switch (level) {
    case Level::kDebug: return "debug";
    case Level::kInfo: return "info";
    case Level::kWarning: return "warning";
    case Level::kError: return "error";
  }
  return "unknown";
}

// Appends `text` as a JSON string literal (quotes, backslashes and control characters escaped;
// other bytes are copied, so UTF-8 stays UTF-8).
void AppendJsonString(std::string& out, std::string_view text) {
  out += '"';
  for (char ch : text) {
    const auto c = static_cast<unsigned char>(ch);
    switch (ch) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20 || c == 0x7f) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += ch;
        }
    }
  }
  out += '"';
}

}  // namespace

bool ParseLevel(std::string_view text, Level* level) {
  std::string t = config::AsciiLower(config::TrimSpace(text));
  if (t == "debug") *level = Level::kDebug;
  else if (t == "info") *level = Level::kInfo;
  else if (t == "warning" || t == "warn") *level = Level::kWarning;
  else if (t == "error") *level = Level::kError;
  else return false;
  return true;
}

void ConfigureFromEnv() {
  State& s = GetState();
  s.env_read.store(true, std::memory_order_release);
  if (const char* env = std::getenv("FLEET_LOG_LEVEL"); env && *env) {
    Level level;
    if (ParseLevel(env, &level)) {
      SetMinLevel(level);
    } else {
      std::fprintf(stderr, "W fleet: ignoring FLEET_LOG_LEVEL='%s' (use debug, info, warning or error)\n", env);
    }
  }
  if (const char* env = std::getenv("FLEET_LOG_FORMAT"); env && *env) {
    if (!SetFormatByName(env)) {
      std::fprintf(stderr, "W fleet: ignoring FLEET_LOG_FORMAT='%s' (use text or json)\n", env);
    }
  }
  if (const char* env = std::getenv("FLEET_VERBOSE"); env && *env) {
    std::string_view rest(env);
    while (!rest.empty()) {
      size_t comma = rest.find(',');
      std::string_view item = rest.substr(0, comma);
      rest = comma == std::string_view::npos ? std::string_view() : rest.substr(comma + 1);
      if (config::TrimSpace(item).empty()) continue;
      size_t eq = item.find('=');
      std::string name(config::TrimSpace(item.substr(0, eq)));
      std::string value(eq == std::string_view::npos ? "1" : config::TrimSpace(item.substr(eq + 1)));
      char* end = nullptr;
      long v = std::strtol(value.c_str(), &end, 10);
      if (name.empty() || value.empty() || *end != '\0' || v < 0 || v > 9) {
        std::fprintf(stderr,
                     "W fleet: ignoring FLEET_VERBOSE item '%.*s' (expected subsystem=0..9)\n",
                     static_cast<int>(item.size()), item.data());
        continue;
      }
      SetVerbosity(name, static_cast<int>(v));
    }
  }
}

void SetFormat(Format format) {
  GetState().format.store(static_cast<int>(format), std::memory_order_relaxed);
}

Format GetFormat() {
  EnsureEnv();
  return static_cast<Format>(GetState().format.load(std::memory_order_relaxed));
}

bool SetFormatByName(std::string_view name) {
  std::string t = config::AsciiLower(config::TrimSpace(name));
  if (t == "text") SetFormat(Format::kText);
  else if (t == "json") SetFormat(Format::kJson);
  else return false;
  return true;
}

void SetSink(Sink sink) {
  State& s = GetState();
  std::lock_guard lock(s.mu);
  s.sink = std::move(sink);
}

void SetProcessTag(std::string tag) {
  State& s = GetState();
  std::lock_guard lock(s.mu);
  s.process_tag = std::move(tag);
}

void SetMinLevel(Level level) {
  GetState().min_level.store(static_cast<int>(level), std::memory_order_relaxed);
}

Level MinLevel() {
  EnsureEnv();
  return static_cast<Level>(GetState().min_level.load(std::memory_order_relaxed));
}

bool IsOn(Level level) { return static_cast<int>(level) >= static_cast<int>(MinLevel()); }

void SetVerbosity(std::string_view subsystem, int verbosity) {
  State& s = GetState();
  std::lock_guard lock(s.mu);
  if (subsystem == "*") {
    s.default_verbosity = verbosity;
  } else {
    s.verbosity[std::string(subsystem)] = verbosity;
  }
}

int Verbosity(std::string_view subsystem) {
  EnsureEnv();
  State& s = GetState();
  std::lock_guard lock(s.mu);
  auto it = s.verbosity.find(subsystem);
  return it == s.verbosity.end() ? s.default_verbosity : it->second;
}

std::string FormatRecord(const Record& r) {
  using namespace std::chrono;
  auto now = system_clock::now();
  std::time_t secs = system_clock::to_time_t(now);
  auto micros = duration_cast<microseconds>(now.time_since_epoch()).count() % 1000000;
  std::string tag;
  {
    State& s = GetState();
    std::lock_guard lock(s.mu);
    tag = s.process_tag;
  }
  std::tm tm{};
  char stamp[48];
  std::string out;
  if (GetFormat() == Format::kJson) {
    gmtime_r(&secs, &tm);
    std::snprintf(stamp, sizeof(stamp), "%04d-%02d-%02dT%02d:%02d:%02d.%06lldZ", tm.tm_year + 1900,
                  tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                  static_cast<long long>(micros));
    out += "{\"time\":\"";
    out += stamp;
    out += "\",\"level\":\"";
    out += LevelName(r.level);
    out += "\",\"process\":";
    AppendJsonString(out, tag);
    out += ",\"subsystem\":";
    AppendJsonString(out, r.subsystem);
    out += ",\"function\":";
    AppendJsonString(out, r.function);
    out += ",\"message\":";
    AppendJsonString(out, r.message);
    out += '}';
    return out;
  }
  localtime_r(&secs, &tm);
  std::snprintf(stamp, sizeof(stamp), "%02d:%02d:%02d.%06lld", tm.tm_hour, tm.tm_min, tm.tm_sec,
                static_cast<long long>(micros));
  out += LevelLetter(r.level);
  out += ' ';
  out += stamp;
  out += ' ';
  if (!tag.empty()) {
    out += tag;
    out += ' ';
  }
  out += r.subsystem;
  out += ' ';
  out += r.function;
  out += "] ";
  out += r.message;
  return out;
}

namespace internal {
LineBuilder::~LineBuilder() {
  std::string message = stream_.str();
  Record record{level_, subsystem_, function_, message};
  State& s = GetState();
  Sink sink;
  {
    std::lock_guard lock(s.mu);
    sink = s.sink;
  }
  if (sink) {
    sink(record);
    return;
  }
  std::string line = FormatRecord(record);
  line += '\n';
  std::fwrite(line.data(), 1, line.size(), stderr);  // one write per line: lines never interleave
}
}  // namespace internal

}  // namespace fleet::log
