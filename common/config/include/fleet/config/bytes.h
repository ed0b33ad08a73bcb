// The byte-size grammar used everywhere a size is written (flags, allocation strings, plans):
//
//   size  := ws number ws unit? ws
//   number:= digits ['.' digits] | '.' digits          (no sign, no exponent, no nan/inf)
//   unit  := b | k | kb | kib | m | mb | mib | g | gb | gib | t | tb | tib   (any case)
//
// All units are binary (k = 2^10, ... t = 2^40): "4gb" == "4 GiB" == "4g" == 4294967296.
// No unit means bytes. Fractions are exact decimal arithmetic, rounded down to whole bytes
// ("0.1gb" == 107374182). Unlike DisTorch2 (which read "4tb" as 4 bytes and "1e3gb" as 1 byte),
// anything else is an error that names the text and what is wrong with it.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "fleet/status/status.h"

namespace fleet::config {

/// Parses `text` with the grammar above.
/// \return the size in bytes, or InvalidArgument naming the text.
StatusOr<uint64_t> ParseBytes(std::string_view text);

/// True when `text` (trimmed) is a plain decimal number with no unit: "0.5", "12".
bool IsPlainNumber(std::string_view text);

/// Human-readable binary size with up to 2 decimals: 1536 -> "1.50 KiB", 5 -> "5 B".
std::string FormatBytes(uint64_t bytes);

/// A size option value (parsed with ParseBytes from flags and the environment).
struct Bytes {
  uint64_t value = 0;
  friend bool operator==(Bytes, Bytes) = default;
};

}  // namespace fleet::config
