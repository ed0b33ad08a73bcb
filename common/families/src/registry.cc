#include <algorithm>

#include "builder.h"
#include "fleet/config/text.h"
#include "registry.h"

namespace fleet::families {

const std::vector<const Family*>& AllFamilies() {
  static const std::vector<const Family*> all = {&internal::FluxFamily(), &internal::WanFamily(),
                                                 &internal::LinearFamily(),
                                                 &internal::TextEncoderFamily()};
  return all;
}

const Family* FindFamily(std::string_view name) {
  std::string n = config::AsciiLower(config::TrimSpace(name));
  if (n == "clip" || n == "t5") n = "text-encoder";
  for (const Family* f : AllFamilies()) {
    if (f->name() == n) return f;
  }
  return nullptr;
}

StatusOr<int64_t> CheckInputSize(std::string_view name, int64_t value) {
  const int64_t limit = name == "frames" ? 1 << 14 : name == "batch" ? 1 << 12 : 1 << 16;
  if (value < 0 || value > limit) {
    return InvalidArgumentError(std::string(name) + " " + std::to_string(value) +
                                " is outside 0.." + std::to_string(limit) + " (0: the default)");
  }
  return value;
}

std::string FamilyNames() {
  std::string names;
  for (const Family* f : AllFamilies())
    names += (names.empty() ? "" : ", ") + std::string(f->name());
  return names;
}

StatusOr<const Family*> ParseFamily(std::string_view name) {
  if (config::AsciiLower(config::TrimSpace(name)) == "none") return nullptr;
  if (const Family* f = FindFamily(name)) return f;
  return InvalidArgumentError("unknown family '" + std::string(name) + "' (known: none, " +
                              FamilyNames() + ", clip, t5)");
}

const Family* GuessFamily(const std::vector<std::string>& unit_names) {
  for (const Family* f : AllFamilies()) {
    if (f->RecogniseUnits(unit_names)) return f;
  }
  return nullptr;
}

}  // namespace fleet::families
