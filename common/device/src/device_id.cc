#include <array>
#include <cctype>

#include "fleet/device/device.h"

namespace fleet::device {
namespace {
struct KindEntry {
  Kind kind;
  std::string_view name;
  bool indexed;  // written with ":N"
};
constexpr std::array<KindEntry, 8> kKinds = {{
    {Kind::kCuda, "cuda", true},
    {Kind::kXpu, "xpu", true},
    {Kind::kNpu, "npu", true},
    {Kind::kMlu, "mlu", true},
    {Kind::kMps, "mps", false},
    {Kind::kDirectml, "directml", true},
    {Kind::kCorex, "corex", true},
    {Kind::kCpu, "cpu", false},
}};
}  // namespace

std::string_view KindName(Kind kind) {
  for (const auto& k : kKinds) {
    if (k.kind == kind) return k.name;
  }
  return "unknown";
}

StatusOr<DeviceId> DeviceId::Parse(std::string_view text) {
  size_t b = 0, e = text.size();
  while (b < e && std::isspace(static_cast<unsigned char>(text[b]))) ++b;
  while (e > b && std::isspace(static_cast<unsigned char>(text[e - 1]))) --e;
  std::string t;
  for (char c : text.substr(b, e - b)) t += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  auto bad = [&](std::string_view why) {
    return InvalidArgumentError("invalid device '" + std::string(text) + "': " + std::string(why));
  };
  if (t.empty()) return bad("empty (expected cpu, cuda:N, ...)");
  std::string_view type = t;
  std::string_view index_text;
  if (size_t colon = t.find(':'); colon != std::string::npos) {
    type = std::string_view(t).substr(0, colon);
    index_text = std::string_view(t).substr(colon + 1);
    if (index_text.empty()) return bad("missing index after ':'");
  }
  for (const auto& k : kKinds) {
    if (k.name != type) continue;
    DeviceId id{k.kind, 0};
    if (!index_text.empty()) {
      if (!k.indexed) return bad("'" + std::string(type) + "' takes no index");
      if (index_text.size() > 4) return bad("index too large");
      int v = 0;
      for (char c : index_text) {
        if (c < '0' || c > '9') return bad("index must be a non-negative integer");
        v = v * 10 + (c - '0');
      }
      id.index = v;
    }
    return id;
  }
  return bad("unknown device type '" + std::string(type) +
             "' (known: cpu, cuda:N, xpu:N, npu:N, mlu:N, mps, directml:N, corex:N)");
}

std::string DeviceId::ToString() const {
  std::string out(KindName(kind));
  for (const auto& k : kKinds) {
    if (k.kind == kind && k.indexed) out += ":" + std::to_string(index);
  }
  return out;
}

}  // namespace fleet::device
