#include "fleet/config/bytes.h"
#include "fleet/config/text.h"

#include <array>
#include <cctype>
#include <cstdio>

namespace fleet::config {
namespace {

struct Number {
  unsigned __int128 mantissa = 0;  // all digits, integer and fraction, as one integer
  int fraction_digits = 0;
  size_t length = 0;               // characters consumed
};

// Parses digits ['.' digits] | '.' digits at the start of `s`. Returns false if none, or if the
// number has more digits than we can represent exactly (38).
bool ParseNumber(std::string_view s, Number* out, std::string* why) {
  Number n;
  size_t i = 0;
  int digits = 0;
  bool seen_dot = false;
  for (; i < s.size(); ++i) {
    char c = s[i];
    if (c >= '0' && c <= '9') {
      if (++digits > 30) {
        *why = "too many digits";
        return false;
      }
      n.mantissa = n.mantissa * 10 + static_cast<unsigned>(c - '0');
      if (seen_dot) ++n.fraction_digits;
    } else if (c == '.' && !seen_dot) {
      seen_dot = true;
    } else {
      break;
    }
  }
  if (digits == 0) {
    *why = "expected a number";
    return false;
  }
  n.length = i;
  *out = n;
  return true;
}

}  // namespace

bool IsPlainNumber(std::string_view text) {
  text = TrimSpace(text);
  Number n;
  std::string why;
  return ParseNumber(text, &n, &why) && n.length == text.size();
}

StatusOr<uint64_t> ParseBytes(std::string_view text) {
  std::string_view s = TrimSpace(text);
  auto error = [&](std::string_view why) {
    return InvalidArgumentError("invalid size '" + std::string(text) + "': " + std::string(why));
  };
  if (s.empty()) return error("empty (expected a number with an optional unit, e.g. 4gb)");
  if (s.front() == '-') return error("negative sizes are not allowed");
  if (s.front() == '+') return error("a sign is not allowed");
  Number n;
  std::string why;
  if (!ParseNumber(s, &n, &why)) return error(why + " (e.g. 4gb, 512 MiB, 1.5t)");
  std::string unit;
  for (char c : TrimSpace(s.substr(n.length))) {
    unit += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  }
  int shift;
  if (unit.empty() || unit == "b") shift = 0;
  else if (unit == "k" || unit == "kb" || unit == "kib") shift = 10;
  else if (unit == "m" || unit == "mb" || unit == "mib") shift = 20;
  else if (unit == "g" || unit == "gb" || unit == "gib") shift = 30;
  else if (unit == "t" || unit == "tb" || unit == "tib") shift = 40;
  else {
    return error("unknown unit '" + unit +
                 "' (use b, k, kb, kib, m, mb, mib, g, gb, gib, t, tb or tib; all binary)");
  }
  // value = mantissa * 2^shift / 10^fraction_digits, rounded down; exact in 128 bits because
  // the mantissa has at most 30 digits (< 2^100) and we reject results of 2^63 and above.
  unsigned __int128 pow10 = 1;
  for (int i = 0; i < n.fraction_digits; ++i) pow10 *= 10;
  unsigned __int128 whole = n.mantissa / pow10;
  unsigned __int128 frac = n.mantissa % pow10;
  constexpr unsigned __int128 kMax = static_cast<unsigned __int128>(1) << 63;
  if (whole > (kMax >> shift)) return error("must be below 8 EiB");
  unsigned __int128 value = (whole << shift) + ((frac << shift) / pow10);
  if (value >= kMax) return error("must be below 8 EiB");
  return static_cast<uint64_t>(value);
}

std::string FormatBytes(uint64_t bytes) {
  static constexpr std::array<const char*, 6> kUnits = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  if (bytes < 1024) return std::to_string(bytes) + " B";
  double v = static_cast<double>(bytes);
  size_t u = 0;
  while (v >= 1024.0 && u + 1 < kUnits.size()) {
    v /= 1024.0;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.2f %s", v, kUnits[u]);
  return buf;
}

}  // namespace fleet::config
