// Subcommands of the `fleet` CLI. Each lives in its own file and registers itself:
//
//   int RunPlan(const std::vector<std::string>& args);
//   FLEET_REGISTER_COMMAND(plan, "Plan a model's placement over devices", RunPlan);
//
// A command returns the process exit status: 0 success, 1 failure of the work, 2 bad input
// (one clear line on stderr). Every command parses its flags with ParseFlags, so --help/-h,
// --version and flag errors behave the same everywhere. Thread safety: commands run on the
// main thread only.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "fleet/config/options.h"
#include "fleet/status/status.h"

namespace fleet::cli {

using CommandFn = int (*)(const std::vector<std::string>& args);

struct Command {
  const char* name;
  const char* summary;
  CommandFn run;
};

/// Parses a command's flags into `set` (environment FLEET_* first, then `args`). Returns the
/// positional arguments, or nullopt when the command should return `*exit_code` at once: 0
/// after printing the usage (--help, -h) or "fleet <version>" (--version), 2 after reporting a
/// bad flag with ReportError. `command` is "fleet plan" style, for messages.
std::optional<std::vector<std::string>> ParseFlags(const std::string& command, config::OptionSet& set,
                                                   const std::vector<std::string>& args, int* exit_code,
                                                   const config::EnvLookup& env = config::ProcessEnv());

/// Prints "<command>: <message>" on stderr (and {"error": message} on stdout when `json`);
/// returns `exit_code`.
int ReportError(const std::string& command, bool json, const Status& status, int exit_code);

/// Registers a command at static-initialisation time; returns true.
bool RegisterCommand(Command command);

/// All registered commands sorted by name.
std::vector<Command> Commands();

/// Replaces this process with the executable `name` from the directory of the running `fleet`
/// binary, passing `args`. Returns only on failure (with an exit status and a message printed).
int ExecSibling(const std::string& name, const std::vector<std::string>& args);

/// Directory of the running executable (from /proc/self/exe).
std::string SelfDirectory();

}  // namespace fleet::cli

#define FLEET_REGISTER_COMMAND(name, summary, fn) \
  [[maybe_unused]] static const bool fleet_command_registered_##name = \
      ::fleet::cli::RegisterCommand(::fleet::cli::Command{#name, summary, fn})
