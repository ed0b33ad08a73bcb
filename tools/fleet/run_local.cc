// `fleet run-local`: runs a whole model in one process. The work is done by the sibling
// executable fleet-run-local, which links libtorch; `fleet` itself stays torch-free.
#include "command.h"

namespace fleet::cli {
namespace {

int RunLocal(const std::vector<std::string>& args) { return ExecSibling("fleet-run-local", args); }

}  // namespace

[[maybe_unused]] static const bool kRunLocalRegistered = RegisterCommand(
    Command{"run-local", "Run a whole model in one process (the bit-exact reference)", RunLocal});

}  // namespace fleet::cli
