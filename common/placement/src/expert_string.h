// Private: the tokenizer and value grammar of DisTorch2 expert strings ("cuda:0,4gb;cpu,*").
//
// Thread safety: pure functions.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "fleet/device/device.h"
#include "fleet/placement/placement.h"
#include "fleet/status/status.h"

namespace fleet::placement::internal {

/// A non-negative decimal number written digits[.digits]: value = mantissa / 10^scale.
struct Decimal {
  uint64_t mantissa = 0;
  int scale = 0;
};

/// Parses digits[.digits] or .digits (at most 18 digits; no sign, exponent, nan or inf).
/// \return the number, or InvalidArgument saying what is wrong (the caller adds where).
StatusOr<Decimal> ParseDecimal(std::string_view text);

/// floor(value * d), exact; saturates at UINT64_MAX.
uint64_t MulDecimal(uint64_t value, Decimal d);

/// floor(value * num / den), exact in 128 bits; REQUIRES den > 0.
uint64_t MulDiv(uint64_t value, uint64_t num, uint64_t den);

enum class TokenKind { kBytes, kFraction, kRatio, kWildcard };

struct Entry {
  device::DeviceId id;
  std::string device_text;  // as written (untrimmed)
  std::string value_text;   // trimmed
  TokenKind kind = TokenKind::kBytes;
  uint64_t bytes = 0;         // kBytes
  Decimal number;             // kFraction (0..1) and kRatio (percent)
  size_t index = 0;           // 1-based entry number
  size_t position = 0;        // 1-based character offset of the entry in the string
  std::string Where() const;  // "entry 2 'cpu,*' at character 12"
};

struct ExpertString {
  std::vector<Entry> entries;  // a device named twice has two entries of the same kind
  Mode mode = Mode::kBytes;
  // What DisTorch2 would have done with the same text (for Plan::deviations); empty when it
  // would have read every value the way we do.
  std::string upstream_difference;
  bool has_tb_unit = false;        // a value with a t/tb/tib unit (DisTorch2: bytes)
  std::string normalised_devices;  // "' CPU' -> cpu" list when names were trimmed/lower-cased
  std::string duplicates;          // "cuda:0 (entries 1 and 3)" when a device is named twice
  // Upstream spellings we read one way and warn about: a number next to '*', a bare number
  // read as bytes or as a percentage, a device named twice.
  std::vector<std::string> warnings;
};

/// Parses a non-empty expert string. Errors name the entry, its text and its position.
/// A plain number above 1 is bytes when another value has a byte unit, a percentage when
/// another value is one, and an error otherwise (a fraction cannot exceed 1).
StatusOr<ExpertString> ParseExpert(std::string_view text);

}  // namespace fleet::placement::internal
