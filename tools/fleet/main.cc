// fleet: the command-line tool. Only dispatches; every command is in its own file.
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "command.h"

namespace fleet::cli {
namespace {
std::vector<Command>& Registry() {
  static std::vector<Command> commands;
  return commands;
}

void PrintUsage(FILE* out) {
  std::fprintf(out,
               "usage: fleet <command> [args]   (fleet <command> --help for its options)\n\n"
               "Tensorfleet runs diffusion models that are too big for one GPU across every\n"
               "device of a machine or cluster.\n\ncommands:\n");
  for (const auto& c : Commands()) std::fprintf(out, "  %-12s %s\n", c.name, c.summary);
  std::fprintf(out, "\n  --version    print the version (every command and binary takes it)\n");
}
}  // namespace

int ReportError(const std::string& command, bool json, const Status& status, int exit_code) {
  const std::string message(status.message());
  if (json) std::printf("%s\n", nlohmann::ordered_json{{"error", message}}.dump(2).c_str());
  std::fprintf(stderr, "%s: %s\n", command.c_str(), message.c_str());
  return exit_code;
}

std::optional<std::vector<std::string>> ParseFlags(const std::string& command, config::OptionSet& set,
                                                   const std::vector<std::string>& args, int* exit_code,
                                                   const config::EnvLookup& env) {
  auto parsed = set.Parse(args, env);
  if (!parsed.ok()) {
    bool json = false;
    for (const auto& a : args) json |= a == "--json" || a == "--json=true";
    *exit_code = ReportError(command, json, parsed.status(), 2);
    return std::nullopt;
  }
  if (parsed->help) {
    std::fputs(set.Usage().c_str(), stdout);
    *exit_code = 0;
    return std::nullopt;
  }
  if (parsed->version) {
    std::printf("fleet %s\n", std::string(config::OptionSet::Version()).c_str());
    *exit_code = 0;
    return std::nullopt;
  }
  return std::move(parsed->positional);
}

bool RegisterCommand(Command command) {
  Registry().push_back(command);
  return true;
}

std::vector<Command> Commands() {
  std::vector<Command> out = Registry();
  std::sort(out.begin(), out.end(),
            [](const Command& a, const Command& b) { return std::strcmp(a.name, b.name) < 0; });
  return out;
}

std::string SelfDirectory() {
  char buf[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return ".";
  std::string path(buf, static_cast<size_t>(n));
  return path.substr(0, path.rfind('/'));
}

int ExecSibling(const std::string& name, const std::vector<std::string>& args) {
  std::string path = SelfDirectory() + "/" + name;
  std::vector<char*> argv;
  argv.push_back(const_cast<char*>(path.c_str()));
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  execv(path.c_str(), argv.data());
  std::fprintf(stderr, "fleet: cannot run %s: %s\n", path.c_str(), std::strerror(errno));
  return 1;
}

}  // namespace fleet::cli

int main(int argc, char** argv) {
  using namespace fleet::cli;
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0 ||
      std::strcmp(argv[1], "help") == 0) {
    PrintUsage(stdout);
    return argc < 2 ? 2 : 0;
  }
  if (std::strcmp(argv[1], "--version") == 0) {
    std::printf("fleet %s\n", std::string(fleet::config::OptionSet::Version()).c_str());
    return 0;
  }
  std::vector<std::string> args(argv + 2, argv + argc);
  for (const auto& c : Commands()) {
    if (std::strcmp(c.name, argv[1]) == 0) return c.run(args);
  }
  std::fprintf(stderr, "fleet: unknown command '%s'\n\n", argv[1]);
  PrintUsage(stderr);
  return 2;
}
