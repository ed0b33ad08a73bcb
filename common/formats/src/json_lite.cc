#include "json_lite.h"

#include <cstdio>
#include <cstring>
#include <unordered_set>

namespace fleet::formats::internal {
namespace {

class Parser {
 public:
  Parser(std::string_view text, uint64_t base, int max_depth)
      : text_(text), base_(base), max_depth_(max_depth) {}

  StatusOr<JsonValue> Document() {
    SkipSpace();
    JsonValue value;
    FLEET_RETURN_IF_ERROR(Value(&value, 0));
    SkipSpace();
    if (pos_ != text_.size()) return Error("unexpected text after the JSON document");
    return value;
  }

 private:
  Status Error(std::string_view what) const {
    return InvalidArgumentError("at byte " + std::to_string(base_ + pos_) + ": " +
                                std::string(what));
  }
  bool AtEnd() const { return pos_ >= text_.size(); }
  char Peek() const { return text_[pos_]; }
  void SkipSpace() {
    while (!AtEnd() && (Peek() == ' ' || Peek() == '\t' || Peek() == '\n' || Peek() == '\r')) {
      ++pos_;
    }
  }

  Status Value(JsonValue* out, int depth) {
    if (depth > max_depth_) return Error("JSON nested too deeply");
    if (AtEnd()) return Error("unexpected end of JSON");
    out->offset = base_ + pos_;
    switch (Peek()) {
      case '{':
        return Object(out, depth);
      case '[':
        return Array(out, depth);
      case '"':
        out->kind = JsonValue::Kind::kString;
        return String(&out->string);
      case 't':
        out->kind = JsonValue::Kind::kBool;
        out->boolean = true;
        return Literal("true");
      case 'f':
        out->kind = JsonValue::Kind::kBool;
        return Literal("false");
      case 'n':
        out->kind = JsonValue::Kind::kNull;
        return Literal("null");
      default:
        if (Peek() == '-' || (Peek() >= '0' && Peek() <= '9')) return Number(out);
        return Error(std::string("unexpected character '") + Printable(Peek()) + "'");
    }
  }

  static std::string Printable(char c) {
    unsigned char u = static_cast<unsigned char>(c);
    if (u >= 0x20 && u < 0x7f) return std::string(1, c);
    char buf[8];
    std::snprintf(buf, sizeof(buf), "\\x%02x", u);
    return buf;
  }

  Status Literal(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word) return Error("invalid literal");
    pos_ += word.size();
    return Status::OK();
  }

  Status Number(JsonValue* out) {
    out->kind = JsonValue::Kind::kNumber;
    size_t start = pos_;
    bool negative = false;
    if (Peek() == '-') {
      negative = true;
      ++pos_;
    }
    if (AtEnd() || !IsDigit(Peek())) return Error("invalid number");
    if (Peek() == '0') {
      ++pos_;
      if (!AtEnd() && IsDigit(Peek())) return Error("invalid number (leading zero)");
    } else {
      while (!AtEnd() && IsDigit(Peek())) ++pos_;
    }
    bool integral = true;
    if (!AtEnd() && Peek() == '.') {
      integral = false;
      ++pos_;
      if (AtEnd() || !IsDigit(Peek())) return Error("invalid number (no digits after '.')");
      while (!AtEnd() && IsDigit(Peek())) ++pos_;
    }
    if (!AtEnd() && (Peek() == 'e' || Peek() == 'E')) {
      integral = false;
      ++pos_;
      if (!AtEnd() && (Peek() == '+' || Peek() == '-')) ++pos_;
      if (AtEnd() || !IsDigit(Peek())) return Error("invalid number (bad exponent)");
      while (!AtEnd() && IsDigit(Peek())) ++pos_;
    }
    if (integral && !negative) {
      uint64_t v = 0;
      bool overflow = false;
      for (size_t i = start; i < pos_; ++i) {
        uint64_t d = static_cast<uint64_t>(text_[i] - '0');
        if (v > (UINT64_MAX - d) / 10) {
          overflow = true;
          break;
        }
        v = v * 10 + d;
      }
      out->is_uint = !overflow;
      out->uint_value = v;
    }
    return Status::OK();
  }

  static bool IsDigit(char c) { return c >= '0' && c <= '9'; }

  Status Hex4(uint32_t* out) {
    if (pos_ + 4 > text_.size()) return Error("truncated \\u escape");
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      char c = text_[pos_++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= static_cast<uint32_t>(c - '0');
      else if (c >= 'a' && c <= 'f') v |= static_cast<uint32_t>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') v |= static_cast<uint32_t>(c - 'A' + 10);
      else return Error("invalid \\u escape");
    }
    *out = v;
    return Status::OK();
  }

  static void AppendUtf8(uint32_t cp, std::string* s) {
    if (cp < 0x80) {
      s->push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
      s->push_back(static_cast<char>(0xc0 | (cp >> 6)));
      s->push_back(static_cast<char>(0x80 | (cp & 0x3f)));
    } else if (cp < 0x10000) {
      s->push_back(static_cast<char>(0xe0 | (cp >> 12)));
      s->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
      s->push_back(static_cast<char>(0x80 | (cp & 0x3f)));
    } else {
      s->push_back(static_cast<char>(0xf0 | (cp >> 18)));
      s->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3f)));
      s->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
      s->push_back(static_cast<char>(0x80 | (cp & 0x3f)));
    }
  }

  // Validates one UTF-8 sequence starting at pos_ (a byte >= 0x80) and copies it.
  Status Utf8(std::string* out) {
    unsigned char c = static_cast<unsigned char>(Peek());
    int len;
    uint32_t cp;
    if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
      cp = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
      len = 3;
      cp = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      len = 4;
      cp = c & 0x07;
    } else {
      return Error("invalid UTF-8 in string");
    }
    if (pos_ + static_cast<size_t>(len) > text_.size()) return Error("truncated UTF-8 in string");
    for (int i = 1; i < len; ++i) {
      unsigned char k = static_cast<unsigned char>(text_[pos_ + static_cast<size_t>(i)]);
      if ((k & 0xc0) != 0x80) return Error("invalid UTF-8 in string");
      cp = (cp << 6) | (k & 0x3f);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
        (cp >= 0xd800 && cp <= 0xdfff)) {
      return Error("invalid UTF-8 in string");
    }
    out->append(text_.substr(pos_, static_cast<size_t>(len)));
    pos_ += static_cast<size_t>(len);
    return Status::OK();
  }

  Status String(std::string* out) {
    ++pos_;  // opening quote
    while (true) {
      if (AtEnd()) return Error("unterminated string");
      char c = Peek();
      if (c == '"') {
        ++pos_;
        return Status::OK();
      }
      if (static_cast<unsigned char>(c) < 0x20) return Error("control character in string");
      if (static_cast<unsigned char>(c) >= 0x80) {
        FLEET_RETURN_IF_ERROR(Utf8(out));
        continue;
      }
      if (c != '\\') {
        out->push_back(c);
        ++pos_;
        continue;
      }
      ++pos_;
      if (AtEnd()) return Error("unterminated string");
      char e = text_[pos_++];
      switch (e) {
        case '"': out->push_back('"'); break;
        case '\\': out->push_back('\\'); break;
        case '/': out->push_back('/'); break;
        case 'b': out->push_back('\b'); break;
        case 'f': out->push_back('\f'); break;
        case 'n': out->push_back('\n'); break;
        case 'r': out->push_back('\r'); break;
        case 't': out->push_back('\t'); break;
        case 'u': {
          uint32_t cp = 0;
          FLEET_RETURN_IF_ERROR(Hex4(&cp));
          if (cp >= 0xd800 && cp <= 0xdbff) {
            if (text_.substr(pos_, 2) != "\\u") return Error("unpaired surrogate in \\u escape");
            pos_ += 2;
            uint32_t lo = 0;
            FLEET_RETURN_IF_ERROR(Hex4(&lo));
            if (lo < 0xdc00 || lo > 0xdfff) return Error("unpaired surrogate in \\u escape");
            cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
          } else if (cp >= 0xdc00 && cp <= 0xdfff) {
            return Error("unpaired surrogate in \\u escape");
          }
          AppendUtf8(cp, out);
          break;
        }
        default:
          --pos_;
          return Error("invalid escape in string");
      }
    }
  }

  Status Array(JsonValue* out, int depth) {
    out->kind = JsonValue::Kind::kArray;
    ++pos_;
    SkipSpace();
    if (!AtEnd() && Peek() == ']') {
      ++pos_;
      return Status::OK();
    }
    while (true) {
      SkipSpace();
      JsonValue item;
      FLEET_RETURN_IF_ERROR(Value(&item, depth + 1));
      out->items.push_back(std::move(item));
      SkipSpace();
      if (AtEnd()) return Error("unterminated array");
      if (Peek() == ',') {
        ++pos_;
        continue;
      }
      if (Peek() == ']') {
        ++pos_;
        return Status::OK();
      }
      return Error("expected ',' or ']' in array");
    }
  }

  Status Object(JsonValue* out, int depth) {
    out->kind = JsonValue::Kind::kObject;
    std::unordered_set<std::string> seen;  // a hash set: a hostile header may hold millions of keys
    ++pos_;
    SkipSpace();
    if (!AtEnd() && Peek() == '}') {
      ++pos_;
      return Status::OK();
    }
    while (true) {
      SkipSpace();
      if (AtEnd() || Peek() != '"') return Error("expected a string key in object");
      size_t key_pos = pos_;
      std::string key;
      FLEET_RETURN_IF_ERROR(String(&key));
      if (!seen.insert(key).second) {
        pos_ = key_pos;
        return Error("duplicate key \"" + key + "\"");
      }
      SkipSpace();
      if (AtEnd() || Peek() != ':') return Error("expected ':' after object key");
      ++pos_;
      SkipSpace();
      JsonValue value;
      FLEET_RETURN_IF_ERROR(Value(&value, depth + 1));
      out->members.push_back(JsonMember{std::move(key), std::move(value)});
      SkipSpace();
      if (AtEnd()) return Error("unterminated object");
      if (Peek() == ',') {
        ++pos_;
        continue;
      }
      if (Peek() == '}') {
        ++pos_;
        return Status::OK();
      }
      return Error("expected ',' or '}' in object");
    }
  }

  std::string_view text_;
  uint64_t base_;
  int max_depth_;
  size_t pos_ = 0;
};

}  // namespace

const JsonValue* JsonValue::Get(std::string_view key) const {
  for (const auto& m : members) {
    if (m.first == key) return &m.second;
  }
  return nullptr;
}

std::string_view JsonKindName(JsonValue::Kind kind) {
  switch (kind) {
    case JsonValue::Kind::kNull: return "null";
    case JsonValue::Kind::kBool: return "a boolean";
    case JsonValue::Kind::kNumber: return "a number";
    case JsonValue::Kind::kString: return "a string";
    case JsonValue::Kind::kArray: return "an array";
    case JsonValue::Kind::kObject: return "an object";
  }
  return "?";
}

StatusOr<JsonValue> ParseJson(std::string_view text, uint64_t base_offset, int max_depth) {
  return Parser(text, base_offset, max_depth).Document();
}

}  // namespace fleet::formats::internal
