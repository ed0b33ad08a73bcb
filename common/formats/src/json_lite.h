// A small strict JSON parser that remembers where every value starts, so that safetensors header
// errors can name the byte offset of the offending field (nlohmann::json keeps no positions).
//
// RFC 8259 grammar, UTF-8 validated, duplicate object keys rejected, nesting depth limited.
// Non-negative integers without fraction or exponent are kept exactly as uint64.
//
// Thread safety: pure functions over caller-owned data.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "fleet/status/status.h"

namespace fleet::formats::internal {

struct JsonMember;

struct JsonValue {
  enum class Kind { kNull, kBool, kNumber, kString, kArray, kObject };
  Kind kind = Kind::kNull;
  uint64_t offset = 0;       // absolute byte offset of the value's first character
  bool boolean = false;
  bool is_uint = false;      // a number that is a non-negative integer fitting uint64
  uint64_t uint_value = 0;
  std::string string;        // kString: the decoded text
  std::vector<JsonValue> items;                           // kArray
  std::vector<JsonMember> members;  // kObject, in document order

  const JsonValue* Get(std::string_view key) const;
};

struct JsonMember {
  std::string first;  // the key
  JsonValue second;
};

std::string_view JsonKindName(JsonValue::Kind kind);

/// Parses `text`, a whole JSON document optionally followed by spaces. `base_offset` is added to
/// every offset (the document's position in its file). Errors say "at byte N: what".
StatusOr<JsonValue> ParseJson(std::string_view text, uint64_t base_offset, int max_depth = 64);

}  // namespace fleet::formats::internal
