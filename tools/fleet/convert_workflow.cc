// `fleet convert-workflow IN.json OUT.json`: rewrites a ComfyUI workflow from ComfyUI-MultiGPU's
// DisTorch2 loaders to Tensorfleet's. The conversion is written once, in Python inside the node
// package (comfyui/tensorfleet_client/workflow_convert.py, standard library only; ComfyUI serves
// the same code to its editor); this command finds that file and execs python3 on it.
//
// Where the node package is looked for, first match wins:
//   1. $FLEET_COMFYUI_DIR                          (explicit)
//   2. <dir of fleet>/../share/tensorfleet/comfyui (installed layout: bin/ next to share/)
//   3. the source tree `fleet` was built from      (build tree; compiled in)
// The interpreter is $FLEET_PYTHON, else `python3` from PATH.
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "command.h"

#ifndef FLEET_COMFYUI_SOURCE_DIR
#define FLEET_COMFYUI_SOURCE_DIR ""
#endif

namespace fleet::cli {
namespace {

constexpr const char* kScript = "tensorfleet_client/workflow_convert.py";

bool IsFile(const std::string& path) { return access(path.c_str(), R_OK) == 0; }

int ConvertWorkflow(const std::vector<std::string>& args) {
  for (const auto& a : args) {
    if (a == "--version") {  // answered here: the converter is a script with no version of its own
      std::printf("fleet %s\n", FLEET_VERSION);
      return 0;
    }
  }
  std::vector<std::string> tried;
  std::string script;
  const char* env = std::getenv("FLEET_COMFYUI_DIR");
  std::vector<std::string> candidates;
  if (env != nullptr && *env != '\0') {
    candidates.push_back(env);
  } else {
    candidates.push_back(SelfDirectory() + "/../share/tensorfleet/comfyui");
    if (*FLEET_COMFYUI_SOURCE_DIR != '\0') candidates.push_back(FLEET_COMFYUI_SOURCE_DIR);
  }
  for (const auto& dir : candidates) {
    std::string path = dir + "/" + kScript;
    if (IsFile(path)) {
      script = path;
      break;
    }
    tried.push_back(path);
  }
  if (script.empty()) {
    std::string list;
    for (const auto& t : tried) list += "\n  " + t;
    std::fprintf(stderr,
                 "fleet convert-workflow: cannot find the ComfyUI node package's %s; looked at:%s\n"
                 "set FLEET_COMFYUI_DIR to the comfyui/ folder of Tensorfleet (or of an unpacked "
                 "comfyui-tensorfleet archive)\n",
                 kScript, list.c_str());
    return 2;
  }
  const char* py = std::getenv("FLEET_PYTHON");
  std::string python = (py != nullptr && *py != '\0') ? py : "python3";
  std::vector<std::string> argv_s = {python, script};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  execvp(python.c_str(), argv.data());
  std::fprintf(stderr,
               "fleet convert-workflow: cannot run %s (set FLEET_PYTHON to a python3): %s\n",
               python.c_str(), std::strerror(errno));
  return 1;
}

}  // namespace

// Registered by hand: FLEET_REGISTER_COMMAND takes an identifier, and this name has a dash.
[[maybe_unused]] static const bool kConvertWorkflowRegistered = RegisterCommand(
    Command{"convert-workflow",
            "Rewrite a ComfyUI workflow from DisTorch2 loaders to Tensorfleet's", ConvertWorkflow});

}  // namespace fleet::cli
