// Process options defined once, in one table, from which come the command-line flags, the
// FLEET_* environment overrides and the config dump (docs, ConfigMaps and tests share it).
//
// A binary lists its options in an X-macro file (worker/options.def, ...):
//
//   FLEET_OPTION(std::string, listen, "tcp://127.0.0.1:0", "Endpoint to bind the control socket")
//   FLEET_OPTION(fleet::config::Bytes, capacity, {4ull << 30}, "Budget for model weights")
//
// and expands it twice, into a plain struct and into OptionSet::Add calls:
//
//   struct WorkerOptions {
//   #define FLEET_OPTION FLEET_OPTION_FIELD
//   #include "fleet/worker/options.def"
//   #undef FLEET_OPTION
//   };
//
// Names are snake_case in the table, --kebab-case on the command line and FLEET_UPPER_CASE in
// the environment: `model_root` is --model-root and FLEET_MODEL_ROOT. Precedence: default <
// environment < flag. A list option takes repeated flags or one comma-separated value.
//
// Thread safety: an OptionSet is used by one thread during start-up.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "fleet/config/bytes.h"
#include "fleet/status/status.h"

#define FLEET_OPTION_FIELD(type, name, default_value, help) type name = default_value;
#define FLEET_OPTION_ADD(type, name, default_value, help) set->Add(#name, &options->name, help);

namespace fleet::config {

/// A duration option: "3s", "500ms", "2m", "1h"; a bare number means seconds.
struct Duration {
  std::chrono::milliseconds value{0};
  friend bool operator==(Duration, Duration) = default;
};

/// Parses the duration grammar above.
StatusOr<std::chrono::milliseconds> ParseDuration(std::string_view text);

using EnvLookup = std::function<std::optional<std::string>(const std::string& name)>;

/// The process environment (getenv).
EnvLookup ProcessEnv();

class OptionSet {
 public:
  /// \param program the binary's name, for usage text ("fleet-worker").
  /// \param summary one line on what the binary does.
  OptionSet(std::string program, std::string summary);

  void Add(std::string_view name, bool* target, std::string_view help);
  void Add(std::string_view name, int64_t* target, std::string_view help);
  void Add(std::string_view name, double* target, std::string_view help);
  void Add(std::string_view name, std::string* target, std::string_view help);
  void Add(std::string_view name, Bytes* target, std::string_view help);
  void Add(std::string_view name, Duration* target, std::string_view help);
  void Add(std::string_view name, std::vector<std::string>* target, std::string_view help);

  struct Result {
    std::vector<std::string> positional;  // arguments that are not flags, in order
    bool help = false;                    // --help or -h was given
    bool version = false;                 // --version was given
    std::optional<std::string> dump;      // --dump-config[=env|json] was given
  };
  /// Applies environment overrides, then `args` (without argv[0]). Unknown flags, missing or
  /// malformed values are InvalidArgument errors naming the flag (or variable) and the value.
  StatusOr<Result> Parse(const std::vector<std::string>& args, const EnvLookup& env = ProcessEnv());

  /// Parse for a main(): prints usage on --help/-h, "<program> <version>" on --version and the
  /// dump on --dump-config (exit 0), or one line on stderr and exit 2 on a bad option. Returns
  /// the positional arguments.
  std::vector<std::string> ParseOrExit(int argc, char** argv);

  /// Usage text: one paragraph per option with its flag, variable, default and help.
  std::string Usage() const;
  /// The current values as FLEET_NAME=value lines (an env file / ConfigMap data).
  std::string DumpEnv() const;
  /// The current values as a JSON object {name: value}.
  std::string DumpJson() const;
  /// The option table as JSON: [{name, flag, env, type, default, help}].
  std::string DescribeJson() const;

  static std::string FlagName(std::string_view name);  // model_root -> --model-root
  static std::string EnvName(std::string_view name);   // model_root -> FLEET_MODEL_ROOT
  /// The FLEET_VERSION the binaries were built with ("0.1.0").
  static std::string_view Version();

 private:
  using Target = std::variant<bool*, int64_t*, double*, std::string*, Bytes*, Duration*,
                              std::vector<std::string>*>;
  struct Option {
    std::string name;
    Target target;
    std::string help;
    std::string default_text;
  };
  void AddOption(std::string_view name, Target target, std::string_view help);
  Status Set(Option& option, std::string_view value, bool append, std::string_view source);
  static std::string ValueText(const Target& target);
  static std::string TypeName(const Target& target);
  Option* Find(std::string_view name);

  std::string program_;
  std::string summary_;
  std::vector<Option> options_;
};

}  // namespace fleet::config
