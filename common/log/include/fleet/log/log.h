// The logging facade: levels, a per-subsystem verbosity and a pluggable sink.
//
//   FLEET_LOG(INFO, "worker") << "loaded " << block << " (" << bytes << " bytes)";
//   FLEET_VLOG(2, "transport") << "frame " << n;     // only when transport verbosity >= 2
//
// Environment (read once, at the first log call, or again through ConfigureFromEnv):
//   FLEET_LOG_LEVEL=debug|info|warning|error        minimum level (default info)
//   FLEET_VERBOSE=transport=2,worker=1,*=0          per-subsystem verbosity for FLEET_VLOG
//   FLEET_LOG_FORMAT=text|json                      line format (default text); the binaries
//                                                   also take --log-format (their option tables)
//
// A text line carries level, time, process tag, subsystem and the calling function:
//   I 22:01:03.123456 worker[cuda:1] LoadBlock] loaded double_blocks.3 (679 MB)
// A json line is one object with the same fields (time in UTC, RFC 3339 with microseconds):
//   {"time":"2026-12-02T22:01:03.123456Z","level":"info","process":"worker[cuda:1]",
//    "subsystem":"worker","function":"LoadBlock","message":"loaded double_blocks.3 (679 MB)"}
// Log where an error is handled, not where it is created.
//
// Thread safety: every function here is safe to call from any thread.
#pragma once

#include <functional>
#include <sstream>
#include <string>
#include <string_view>

namespace fleet::log {

enum class Level { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };
enum class Format { kText = 0, kJson = 1 };

struct Record {
  Level level;
  std::string_view subsystem;
  std::string_view function;
  std::string_view message;
};

using Sink = std::function<void(const Record&)>;

/// Replaces the sink (default: formatted lines on stderr). Pass nullptr to restore it.
void SetSink(Sink sink);
/// A tag for this process shown on every line, e.g. "worker[cuda:1]".
void SetProcessTag(std::string tag);
void SetMinLevel(Level level);
Level MinLevel();
/// Sets the verbosity of one subsystem ("*" sets the default for all).
void SetVerbosity(std::string_view subsystem, int verbosity);
int Verbosity(std::string_view subsystem);
/// Re-reads FLEET_LOG_LEVEL and FLEET_VERBOSE. Malformed values are reported once on stderr
/// and ignored, so a typo never stops a process.
void ConfigureFromEnv();
/// Parses "debug", "info", "warning"/"warn", "error" (any case).
bool ParseLevel(std::string_view text, Level* level);
void SetFormat(Format format);
Format GetFormat();
/// Sets the format from "text" or "json" (any case); false (and nothing changed) otherwise.
bool SetFormatByName(std::string_view name);
/// Formats a record the way the default sink prints it in the current format (no newline).
std::string FormatRecord(const Record& record);

bool IsOn(Level level);

namespace internal {
class LineBuilder {
 public:
  LineBuilder(Level level, std::string_view subsystem, std::string_view function)
      : level_(level), subsystem_(subsystem), function_(function) {}
  ~LineBuilder();
  LineBuilder(const LineBuilder&) = delete;
  LineBuilder& operator=(const LineBuilder&) = delete;
  std::ostream& stream() { return stream_; }

 private:
  Level level_;
  std::string_view subsystem_;
  std::string_view function_;
  std::ostringstream stream_;
};
// Lets the macros below be used as a statement with a trailing `<<` chain.
struct Voidify {
  void operator&(std::ostream&) {}
};
}  // namespace internal

}  // namespace fleet::log

#define FLEET_LOG_LEVEL_DEBUG ::fleet::log::Level::kDebug
#define FLEET_LOG_LEVEL_INFO ::fleet::log::Level::kInfo
#define FLEET_LOG_LEVEL_WARNING ::fleet::log::Level::kWarning
#define FLEET_LOG_LEVEL_ERROR ::fleet::log::Level::kError

#define FLEET_LOG(level, subsystem)                                         \
  !::fleet::log::IsOn(FLEET_LOG_LEVEL_##level)                              \
      ? (void)0                                                             \
      : ::fleet::log::internal::Voidify() &                                 \
            ::fleet::log::internal::LineBuilder(FLEET_LOG_LEVEL_##level, subsystem, __func__) \
                .stream()

#define FLEET_VLOG(n, subsystem)                                                         \
  (::fleet::log::Verbosity(subsystem) < (n))                                             \
      ? (void)0                                                                          \
      : ::fleet::log::internal::Voidify() &                                              \
            ::fleet::log::internal::LineBuilder(::fleet::log::Level::kDebug, subsystem, __func__) \
                .stream()
