#include "fleet/config/options.h"
#include "fleet/config/text.h"

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <nlohmann/json.hpp>

namespace fleet::config {
namespace {

std::string FormatDuration(std::chrono::milliseconds ms) {
  auto n = ms.count();
  if (n % 1000 == 0) return std::to_string(n / 1000) + "s";
  return std::to_string(n) + "ms";
}

std::string Join(const std::vector<std::string>& items) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) out += (i ? "," : "") + items[i];
  return out;
}

}  // namespace

StatusOr<std::chrono::milliseconds> ParseDuration(std::string_view text) {
  std::string_view s = TrimSpace(text);
  auto error = [&](std::string_view why) {
    return InvalidArgumentError("invalid duration '" + std::string(text) + "': " + std::string(why));
  };
  size_t i = 0;
  while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '.')) ++i;
  if (i == 0) return error("expected a number with an optional unit (ms, s, m, h), e.g. 3s");
  std::string number(s.substr(0, i));
  char* end = nullptr;
  double v = std::strtod(number.c_str(), &end);
  if (*end != '\0' || !std::isfinite(v)) return error("malformed number");
  std::string unit = AsciiLower(TrimSpace(s.substr(i)));
  double ms;
  if (unit == "ms") ms = v;
  else if (unit.empty() || unit == "s") ms = v * 1e3;
  else if (unit == "m" || unit == "min") ms = v * 60e3;
  else if (unit == "h") ms = v * 3600e3;
  else return error("unknown unit '" + unit + "' (use ms, s, m or h)");
  if (ms > 1e15) return error("too long");
  return std::chrono::milliseconds(static_cast<int64_t>(ms));
}

EnvLookup ProcessEnv() {
  return [](const std::string& name) -> std::optional<std::string> {
    const char* v = std::getenv(name.c_str());
    if (v == nullptr) return std::nullopt;
    return std::string(v);
  };
}

OptionSet::OptionSet(std::string program, std::string summary)
    : program_(std::move(program)), summary_(std::move(summary)) {}

void OptionSet::AddOption(std::string_view name, Target target, std::string_view help) {
  FLEET_CHECK(Find(name) == nullptr);  // a name defined twice is a bug in the table
  options_.push_back(Option{std::string(name), target, std::string(help), ValueText(target)});
}

void OptionSet::Add(std::string_view n, bool* t, std::string_view h) { AddOption(n, t, h); }
void OptionSet::Add(std::string_view n, int64_t* t, std::string_view h) { AddOption(n, t, h); }
void OptionSet::Add(std::string_view n, double* t, std::string_view h) { AddOption(n, t, h); }
void OptionSet::Add(std::string_view n, std::string* t, std::string_view h) { AddOption(n, t, h); }
void OptionSet::Add(std::string_view n, Bytes* t, std::string_view h) { AddOption(n, t, h); }
void OptionSet::Add(std::string_view n, Duration* t, std::string_view h) { AddOption(n, t, h); }
void OptionSet::Add(std::string_view n, std::vector<std::string>* t, std::string_view h) {
  AddOption(n, t, h);
}

std::string OptionSet::FlagName(std::string_view name) {
  std::string out = "--";
  for (char c : name) out += c == '_' ? '-' : c;
  return out;
}

std::string_view OptionSet::Version() { return FLEET_VERSION; }

std::string OptionSet::EnvName(std::string_view name) {
  std::string out = "FLEET_";
  for (char c : name) out += static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return out;
}

OptionSet::Option* OptionSet::Find(std::string_view name) {
  for (auto& o : options_) {
    if (o.name == name) return &o;
  }
  return nullptr;
}

std::string OptionSet::ValueText(const Target& target) {
  return std::visit(
      [](auto* p) -> std::string {
        using T = std::remove_pointer_t<decltype(p)>;
        if constexpr (std::is_same_v<T, bool>) return *p ? "true" : "false";
        else if constexpr (std::is_same_v<T, int64_t>) return std::to_string(*p);
        else if constexpr (std::is_same_v<T, double>) {
          char buf[32];
          std::snprintf(buf, sizeof(buf), "%g", *p);
          return buf;
        } else if constexpr (std::is_same_v<T, std::string>) return *p;
        else if constexpr (std::is_same_v<T, Bytes>) return std::to_string(p->value);
        else if constexpr (std::is_same_v<T, Duration>) return FormatDuration(p->value);
        else return Join(*p);
      },
      target);
}

std::string OptionSet::TypeName(const Target& target) {
  static constexpr const char* kNames[] = {"bool",  "int",      "float", "string",
                                           "bytes", "duration", "list"};
  return kNames[target.index()];
}

Status OptionSet::Set(Option& option, std::string_view value, bool append,
                      std::string_view source) {
  auto bad = [&](std::string_view why) {
    return InvalidArgumentError(std::string(source) + ": " + std::string(why));
  };
  return std::visit(
      [&](auto* p) -> Status {
        using T = std::remove_pointer_t<decltype(p)>;
        std::string v(TrimSpace(value));
        if constexpr (std::is_same_v<T, bool>) {
          std::string l = AsciiLower(v);
          if (l == "true" || l == "1" || l == "yes" || l == "on") *p = true;
          else if (l == "false" || l == "0" || l == "no" || l == "off") *p = false;
          else return bad("expected true or false, got '" + v + "'");
        } else if constexpr (std::is_same_v<T, int64_t>) {
          errno = 0;
          char* end = nullptr;
          long long x = std::strtoll(v.c_str(), &end, 10);
          if (v.empty() || *end != '\0' || errno == ERANGE) return bad("expected an integer, got '" + v + "'");
          *p = x;
        } else if constexpr (std::is_same_v<T, double>) {
          char* end = nullptr;
          double x = std::strtod(v.c_str(), &end);
          if (v.empty() || *end != '\0' || !std::isfinite(x)) return bad("expected a number, got '" + v + "'");
          *p = x;
        } else if constexpr (std::is_same_v<T, std::string>) {
          *p = std::string(value);
        } else if constexpr (std::is_same_v<T, Bytes>) {
          auto parsed = ParseBytes(v);
          if (!parsed.ok()) return bad(parsed.status().message());
          p->value = *parsed;
        } else if constexpr (std::is_same_v<T, Duration>) {
          auto parsed = ParseDuration(v);
          if (!parsed.ok()) return bad(parsed.status().message());
          p->value = *parsed;
        } else {
          if (!append) p->clear();
          std::string_view rest = value;
          while (true) {
            size_t comma = rest.find(',');
            std::string_view item = TrimSpace(rest.substr(0, comma));
            if (!item.empty()) p->emplace_back(item);
            if (comma == std::string_view::npos) break;
            rest = rest.substr(comma + 1);
          }
        }
        return Status();
      },
      option.target);
}

StatusOr<OptionSet::Result> OptionSet::Parse(const std::vector<std::string>& args,
                                             const EnvLookup& env) {
  for (auto& o : options_) {
    std::string var = EnvName(o.name);
    if (auto v = env(var)) FLEET_RETURN_IF_ERROR(Set(o, *v, false, var + "='" + *v + "'"));
  }
  Result result;
  std::vector<std::string> seen_lists;  // a list flag given on the command line replaces the env value
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg == "--") {
      result.positional.insert(result.positional.end(), args.begin() + i + 1, args.end());
      break;
    }
    if (arg == "-h") {
      result.help = true;
      continue;
    }
    if (arg.size() < 3 || arg.compare(0, 2, "--") != 0) {
      result.positional.push_back(arg);
      continue;
    }
    std::string body = arg.substr(2);
    std::optional<std::string> value;
    if (size_t eq = body.find('='); eq != std::string::npos) {
      value = body.substr(eq + 1);
      body = body.substr(0, eq);
    }
    if (body == "help") {
      result.help = true;
      continue;
    }
    if (body == "version") {
      result.version = true;
      continue;
    }
    if (body == "dump-config") {
      result.dump = value.value_or("env");
      if (*result.dump != "env" && *result.dump != "json" && *result.dump != "table") {
        return InvalidArgumentError("--dump-config takes env, json or table, got '" + *result.dump + "'");
      }
      continue;
    }
    std::string name;
    for (char c : body) name += c == '-' ? '_' : c;
    Option* o = Find(name);
    if (o == nullptr) {
      return InvalidArgumentError("unknown flag '" + arg + "' (see " + program_ + " --help)");
    }
    bool is_bool = std::holds_alternative<bool*>(o->target);
    if (!value) {
      if (is_bool) {
        value = "true";
      } else if (i + 1 < args.size()) {
        value = args[++i];
      } else {
        return InvalidArgumentError("flag " + FlagName(name) + " needs a value");
      }
    }
    bool append = false;
    if (std::holds_alternative<std::vector<std::string>*>(o->target)) {
      append = std::find(seen_lists.begin(), seen_lists.end(), name) != seen_lists.end();
      seen_lists.push_back(name);
    }
    FLEET_RETURN_IF_ERROR(Set(*o, *value, append, FlagName(name) + "='" + *value + "'"));
  }
  return result;
}

std::vector<std::string> OptionSet::ParseOrExit(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  auto result = Parse(args);
  if (!result.ok()) {
    std::fprintf(stderr, "%s: %s\n", program_.c_str(), std::string(result.status().message()).c_str());
    std::exit(2);
  }
  if (result->help) {
    std::cout << Usage();
    std::exit(0);
  }
  if (result->version) {
    std::cout << program_ << " " << Version() << "\n";
    std::exit(0);
  }
  if (result->dump) {
    if (*result->dump == "json") std::cout << DumpJson() << "\n";
    else if (*result->dump == "table") std::cout << DescribeJson() << "\n";
    else std::cout << DumpEnv();
    std::exit(0);
  }
  return result->positional;
}

std::string OptionSet::Usage() const {
  std::string out = "usage: " + program_ + " [options]\n" + summary_ + "\n\noptions:\n";
  for (const auto& o : options_) {
    out += "  " + FlagName(o.name) + " <" + TypeName(o.target) + ">   (env " + EnvName(o.name) +
           ", default '" + o.default_text + "')\n      " + o.help + "\n";
  }
  out += "  --dump-config[=env|json|table]\n      Print the effective configuration and exit.\n";
  out += "  --version\n      Print the version and exit.\n";
  out += "  --help, -h\n      Print this text and exit.\n";
  return out;
}

std::string OptionSet::DumpEnv() const {
  std::string out;
  for (const auto& o : options_) out += EnvName(o.name) + "=" + ValueText(o.target) + "\n";
  return out;
}

std::string OptionSet::DumpJson() const {
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  for (const auto& o : options_) j[o.name] = ValueText(o.target);
  return j.dump(2);
}

std::string OptionSet::DescribeJson() const {
  nlohmann::ordered_json j = nlohmann::ordered_json::array();
  for (const auto& o : options_) {
    j.push_back({{"name", o.name},
                 {"flag", FlagName(o.name)},
                 {"env", EnvName(o.name)},
                 {"type", TypeName(o.target)},
                 {"default", o.default_text},
                 {"help", o.help}});
  }
  return j.dump(2);
}

}  // namespace fleet::config
