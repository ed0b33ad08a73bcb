#include "expert_string.h"

#include <cctype>
#include <limits>

#include "fleet/config/bytes.h"
#include "fleet/config/text.h"

namespace fleet::placement::internal {
namespace {

bool IsZero(Decimal d) { return d.mantissa == 0; }

}  // namespace

StatusOr<Decimal> ParseDecimal(std::string_view text) {
  std::string_view s = config::TrimSpace(text);
  if (s.empty()) return InvalidArgumentError("empty number");
  if (s.front() == '-') return InvalidArgumentError("negative values are not allowed");
  if (s.front() == '+') return InvalidArgumentError("a sign is not allowed");
  Decimal d;
  int digits = 0;
  bool dot = false;
  for (char c : s) {
    if (c >= '0' && c <= '9') {
      if (++digits > 18) return InvalidArgumentError("too many digits (at most 18)");
      d.mantissa = d.mantissa * 10 + static_cast<uint64_t>(c - '0');
      if (dot) ++d.scale;
    } else if (c == '.' && !dot) {
      dot = true;
    } else {
      return InvalidArgumentError("not a plain decimal number (expected digits[.digits])");
    }
  }
  if (digits == 0) return InvalidArgumentError("not a number");
  return d;
}

uint64_t MulDecimal(uint64_t value, Decimal d) {
  unsigned __int128 pow10 = 1;
  for (int i = 0; i < d.scale; ++i) pow10 *= 10;
  unsigned __int128 r = static_cast<unsigned __int128>(value) * d.mantissa / pow10;
  return r > std::numeric_limits<uint64_t>::max() ? std::numeric_limits<uint64_t>::max()
                                                  : static_cast<uint64_t>(r);
}

uint64_t MulDiv(uint64_t value, uint64_t num, uint64_t den) {
  unsigned __int128 r = static_cast<unsigned __int128>(value) * num / den;
  return r > std::numeric_limits<uint64_t>::max() ? std::numeric_limits<uint64_t>::max()
                                                  : static_cast<uint64_t>(r);
}

std::string Entry::Where() const {
  return "entry " + std::to_string(index) + " '" + device_text + "," + value_text +
         "' at character " + std::to_string(position);
}

StatusOr<ExpertString> ParseExpert(std::string_view text) {
  auto fail = [](std::string_view message) {
    return InvalidArgumentError("expert_mode_allocations: " + std::string(message));
  };
  if (size_t hash = text.find('#'); hash != std::string_view::npos) {
    return fail("'#' at character " + std::to_string(hash + 1) +
                " is not allowed: give only the device,value;... part (compute_device, "
                "virtual_vram_gb and donor_device are separate inputs)");
  }
  ExpertString out;
  size_t start = 0;
  size_t index = 0;
  while (start <= text.size()) {
    size_t end = text.find(';', start);
    if (end == std::string_view::npos) end = text.size();
    std::string_view segment = text.substr(start, end - start);
    size_t position = start + 1;
    start = end + 1;
    if (config::TrimSpace(segment).empty()) continue;  // empty and trailing segments, as DisTorch2
    ++index;
    size_t comma = segment.find(',');
    if (comma == std::string_view::npos) {
      return fail("entry " + std::to_string(index) + " '" + std::string(segment) +
                  "' at character " + std::to_string(position) +
                  " has no ',' (expected device,value such as cuda:0,4gb)");
    }
    Entry e;
    e.index = index;
    e.position = position;
    e.device_text = std::string(segment.substr(0, comma));
    std::string_view value = config::TrimSpace(segment.substr(comma + 1));
    e.value_text = std::string(value);
    if (value.find(',') != std::string_view::npos) {
      return fail(e.Where() + " has more than one ',' (one device,value per ';'-separated entry)");
    }
    auto id = device::DeviceId::Parse(e.device_text);
    if (!id.ok()) return fail(e.Where() + ": " + std::string(id.status().message()));
    e.id = *id;
    if (e.id.ToString() != e.device_text) {
      if (!out.normalised_devices.empty()) out.normalised_devices += ", ";
      out.normalised_devices += "'" + e.device_text + "' as " + e.id.ToString();
    }
    if (value.empty()) {
      return fail(e.Where() + " has an empty value (expected e.g. 4gb, 25%, 0.5 or *)");
    }
    if (value == "*") {
      e.kind = TokenKind::kWildcard;
    } else if (value.find('*') != std::string_view::npos) {
      // DisTorch2 makes any value holding a '*' the wildcard and ignores the rest. We accept
      // one '*' before or after a value that is itself valid ("5gb*", "*5gb"), and warn.
      size_t star = value.find('*');
      std::string_view rest;
      if (star == 0 && value.find('*', 1) == std::string_view::npos) {
        rest = config::TrimSpace(value.substr(1));
      } else if (star == value.size() - 1) {
        rest = config::TrimSpace(value.substr(0, star));
      } else {
        return fail(e.Where() + ": a wildcard is '*', optionally with one number before or " +
                    "after it (which is ignored), e.g. cpu,* or cpu,5gb*");
      }
      Status valid = Status::OK();
      if (!rest.empty() && rest.back() == '%') {
        valid = ParseDecimal(rest.substr(0, rest.size() - 1)).status();
      } else if (!config::IsPlainNumber(rest)) {
        valid = config::ParseBytes(rest).status();
      }
      if (!valid.ok()) {
        return fail(e.Where() + ": the text next to '*' is not a value (" +
                    std::string(valid.message()) + ")");
      }
      e.kind = TokenKind::kWildcard;
      out.warnings.push_back("expert_mode_allocations: " + e.Where() + ": '" + e.value_text +
                             "' makes " + e.id.ToString() +
                             " the wildcard (it takes the rest of the model); the number " +
                             std::string(rest) + " is ignored, as in DisTorch2 (write " +
                             e.id.ToString() + ",* to say so)");
    } else if (value.back() == '%') {
      e.kind = TokenKind::kRatio;
      auto d = ParseDecimal(value.substr(0, value.size() - 1));
      if (!d.ok()) return fail(e.Where() + ": invalid ratio: " + std::string(d.status().message()));
      e.number = *d;
    } else if (config::IsPlainNumber(value)) {
      e.kind = TokenKind::kFraction;  // above 1: bytes or a percentage, decided below
      auto d = ParseDecimal(value);
      if (!d.ok()) {
        return fail(e.Where() + ": invalid fraction: " + std::string(d.status().message()));
      }
      e.number = *d;
    } else {
      auto bytes = config::ParseBytes(value);
      if (!bytes.ok()) return fail(e.Where() + ": " + std::string(bytes.status().message()));
      e.kind = TokenKind::kBytes;
      e.bytes = *bytes;
      if (config::AsciiLower(value).find('t') != std::string::npos) out.has_tb_unit = true;
    }
    out.entries.push_back(std::move(e));
  }
  if (out.entries.empty()) {
    return fail("no device,value entry in '" + std::string(text) + "'");
  }

  // A plain number above 1 cannot be a fraction of a device's memory: next to byte values it
  // is a byte count, next to percentages a percentage (DisTorch2's '%' is optional).
  bool unit_bytes = false, percentages = false;
  for (const auto& e : out.entries) {
    unit_bytes |= e.kind == TokenKind::kBytes;
    percentages |= e.kind == TokenKind::kRatio;
  }
  for (auto& e : out.entries) {
    if (e.kind != TokenKind::kFraction) continue;
    uint64_t one = 1;
    for (int i = 0; i < e.number.scale; ++i) one *= 10;
    if (e.number.mantissa <= one) continue;
    if (percentages) {
      e.kind = TokenKind::kRatio;
      out.warnings.push_back("expert_mode_allocations: " + e.Where() + ": " + e.value_text +
                             " without '%' among percentages is read as " + e.value_text +
                             "% (write " + e.value_text + "% to say so)");
    } else if (unit_bytes) {
      auto bytes = config::ParseBytes(e.value_text);
      if (!bytes.ok()) return fail(e.Where() + ": " + std::string(bytes.status().message()));
      e.kind = TokenKind::kBytes;
      e.bytes = *bytes;
      out.warnings.push_back("expert_mode_allocations: " + e.Where() + ": " + e.value_text +
                             " without a unit among byte values is read as bytes (" +
                             config::FormatBytes(e.bytes) + "; write " + e.value_text +
                             "b to say so)");
    } else {
      return fail(e.Where() + ": fraction " + e.value_text +
                  " is above 1 (a fraction of the device's total memory; for bytes write " +
                  e.value_text + "b)");
    }
  }

  // A device named twice: its values are added, if they are of the same kind.
  auto kind_name = [](TokenKind k) -> std::string {
    switch (k) {
      case TokenKind::kBytes:
        return "bytes";
      case TokenKind::kFraction:
        return "a fraction";
      case TokenKind::kRatio:
        return "a percentage";
      case TokenKind::kWildcard:
        return "the wildcard";
    }
    return "?";
  };
  for (size_t i = 0; i < out.entries.size(); ++i) {
    const Entry& e = out.entries[i];
    for (size_t j = 0; j < i; ++j) {
      const Entry& prev = out.entries[j];
      if (prev.id != e.id) continue;
      if (prev.kind != e.kind) {
        return fail(e.Where() + " names " + e.id.ToString() + " again (first in " + prev.Where() +
                    ") with " + kind_name(e.kind) + " instead of " + kind_name(prev.kind) +
                    ": the values of a device named twice are added, so they must be of one "
                    "kind");
      }
      if (!out.duplicates.empty()) out.duplicates += ", ";
      out.duplicates += e.id.ToString() + " (entries " + std::to_string(prev.index) + " and " +
                        std::to_string(e.index) + ")";
      out.warnings.push_back("expert_mode_allocations: " + e.Where() + " names " +
                             e.id.ToString() + " again (first in " + prev.Where() + "); " +
                             (e.kind == TokenKind::kWildcard
                                  ? std::string("it is the wildcard once")
                                  : "its values are added") +
                             " (name each device once to avoid this warning)");
      break;
    }
  }

  bool any_bytes = false, any_fraction = false, any_ratio = false, any_wildcard = false;
  for (const auto& e : out.entries) {
    any_bytes |= e.kind == TokenKind::kBytes;
    any_fraction |= e.kind == TokenKind::kFraction;
    any_ratio |= e.kind == TokenKind::kRatio;
    any_wildcard |= e.kind == TokenKind::kWildcard;
  }
  if (any_ratio && (any_bytes || any_fraction)) {
    const Entry* other = nullptr;
    for (const auto& e : out.entries) {
      if (e.kind == TokenKind::kBytes || e.kind == TokenKind::kFraction) {
        other = &e;
        break;
      }
    }
    return fail(other->Where() + " is not a ratio, but other entries are: write every value " +
                "as a percentage (e.g. " + other->id.ToString() + ",50%) or use '*'");
  }
  if (any_ratio)
    out.mode = Mode::kRatio;
  else if (any_bytes)
    out.mode = Mode::kBytes;
  else if (any_fraction)
    out.mode = Mode::kFraction;
  else
    out.mode = Mode::kWildcardOnly;

  // DisTorch2 picks the mode from letters anywhere in the string: g/m/k/b -> bytes, else % ->
  // ratio, else fraction; its ratio and fraction parsers cannot read '*'.
  std::string lower = config::AsciiLower(text);
  bool upstream_bytes = lower.find_first_of("gmkb") != std::string::npos;
  bool upstream_ratio = !upstream_bytes && lower.find('%') != std::string::npos;
  if (upstream_bytes) {
    for (const auto& e : out.entries) {
      if ((e.kind == TokenKind::kFraction || e.kind == TokenKind::kRatio) && !IsZero(e.number)) {
        out.upstream_difference =
            "DisTorch2 picks the mode from letters anywhere in the string "
            "(a g, m, k or b, here in '" +
            std::string(text) + "'), so it would have read " + e.Where() + " as " + e.value_text +
            " bytes; we read each value by itself";
        break;
      }
    }
  } else if (any_wildcard) {
    out.upstream_difference = std::string(
                                  "DisTorch2 would have failed: with no unit letter in "
                                  "the string it uses its ") +
                              (upstream_ratio ? "ratio" : "fraction") +
                              " parser, which cannot read '*'; we read each value by itself";
  }
  return out;
}

}  // namespace fleet::placement::internal
