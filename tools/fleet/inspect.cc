// `fleet inspect FILE`: what a model file holds — format, tensors, dtypes, the detected family
// and configuration, placement units with their sizes, and the total — as a table or --json.
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>

#include "command.h"
#include "fleet/config/bytes.h"
#include "fleet/config/options.h"
#include "fleet/families/layout.h"
#include "fleet/formats/model_file.h"

namespace fleet::cli {
namespace {

int RunInspect(const std::vector<std::string>& args) {
  bool json = false;
  bool tensors = false;
  config::OptionSet set("fleet inspect FILE",
                        "Show a model file's format, tensors, detected family and placement units.");
  set.Add("json", &json, "Print JSON instead of a table");
  set.Add("tensors", &tensors, "Also list every tensor of each unit");
  int rc = 0;
  auto positional = ParseFlags("fleet inspect", set, args, &rc);
  if (!positional) return rc;
  if (positional->size() != 1) {
    std::fprintf(stderr, "fleet inspect: expected exactly one FILE (got %zu)\n", positional->size());
    return 2;
  }
  const std::string& path = (*positional)[0];
  auto file = formats::ModelFile::Open(path);
  if (!file.ok()) {
    std::fprintf(stderr, "fleet inspect: %s\n", std::string(file.status().message()).c_str());
    return 2;
  }
  const formats::ModelFile& f = **file;
  std::map<std::string, std::pair<uint64_t, uint64_t>> dtypes;  // dtype -> (count, bytes)
  for (const auto& t : f.tensors()) {
    auto& d = dtypes[t.dtype];
    d.first += 1;
    d.second += t.nbytes;
  }
  auto layout = families::DetectLayout(f);
  if (json) {
    nlohmann::ordered_json out;
    out["path"] = path;
    out["format"] = formats::FileFormatName(f.format());
    if (f.format() == formats::FileFormat::kGguf) {
      out["gguf_version"] = f.version();
      out["alignment"] = f.alignment();
    }
    out["file_bytes"] = f.file_size();
    out["tensor_count"] = f.tensors().size();
    out["total_bytes"] = f.total_tensor_bytes();
    nlohmann::ordered_json dt = nlohmann::ordered_json::object();
    for (const auto& [name, d] : dtypes) dt[name] = {{"tensors", d.first}, {"bytes", d.second}};
    out["dtypes"] = dt;
    if (f.format() == formats::FileFormat::kGguf) {
      auto arch = f.metadata().find("general.architecture");
      if (arch != f.metadata().end()) out["architecture"] = arch->second;
    }
    if (layout.ok()) {
      out["family"] = layout->family;
      out["prefix"] = layout->prefix;
      out["config"] = nlohmann::ordered_json::parse(layout->config_json);
      nlohmann::ordered_json units = nlohmann::ordered_json::array();
      for (const auto& u : layout->units) {
        nlohmann::ordered_json j = {{"name", u.name}, {"bytes", u.bytes}, {"pinned", u.pinned},
                                    {"tensors", u.tensors.size()}};
        if (tensors) j["tensor_names"] = u.tensors;
        units.push_back(std::move(j));
      }
      out["units"] = units;
    } else {
      out["family"] = nullptr;
      out["layout_error"] = std::string(layout.status().message());
    }
    std::printf("%s\n", out.dump(2).c_str());
    return layout.ok() ? 0 : 1;
  }
  std::printf("file      %s\n", path.c_str());
  std::printf("format    %s", std::string(formats::FileFormatName(f.format())).c_str());
  if (f.format() == formats::FileFormat::kGguf) {
    std::printf(" v%u (alignment %llu)", f.version(),
                static_cast<unsigned long long>(f.alignment()));
  }
  std::printf("\ntensors   %zu, %s in %s file\n", f.tensors().size(),
              config::FormatBytes(f.total_tensor_bytes()).c_str(),
              config::FormatBytes(f.file_size()).c_str());
  std::printf("dtypes   ");
  for (const auto& [name, d] : dtypes) {
    std::printf(" %s x%llu (%s)", name.c_str(), static_cast<unsigned long long>(d.first),
                config::FormatBytes(d.second).c_str());
  }
  std::printf("\n");
  if (!layout.ok()) {
    std::fprintf(stderr, "fleet inspect: %s\n", std::string(layout.status().message()).c_str());
    return 1;
  }
  std::printf("family    %s%s\n", layout->family.c_str(),
              layout->prefix.empty() ? "" : (" (prefix '" + layout->prefix + "')").c_str());
  std::printf("config    %s\n", layout->config_json.c_str());
  std::printf("\n%-20s %8s %14s  %s\n", "unit", "tensors", "bytes", "");
  for (const auto& u : layout->units) {
    std::printf("%-20s %8zu %14s  %s\n", u.name.c_str(), u.tensors.size(),
                config::FormatBytes(u.bytes).c_str(), u.pinned ? "pinned" : "");
    if (tensors) {
      for (const auto& t : u.tensors) std::printf("    %s\n", t.c_str());
    }
  }
  std::printf("%-20s %8zu %14s\n", "total", f.tensors().size(),
              config::FormatBytes(layout->total_bytes()).c_str());
  return 0;
}

}  // namespace

FLEET_REGISTER_COMMAND(inspect, "Show a model file's tensors, family and placement units",
                       RunInspect);

}  // namespace fleet::cli
