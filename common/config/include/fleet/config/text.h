// Small text helpers shared by every parser of user input (flags, byte sizes, allocation
// strings, device ids, key files): ASCII-only, locale-independent.
//
// Thread safety: pure functions.
#pragma once

#include <cctype>
#include <string>
#include <string_view>

namespace fleet::config {

/// `s` without leading and trailing whitespace (a view into `s`).
inline std::string_view TrimSpace(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

/// `s` with ASCII letters lower-cased.
inline std::string AsciiLower(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) out += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

}  // namespace fleet::config
