#include "rmoe/util/json.h"

#include <cmath>
#include <cstdint>

#include <absl/strings/ascii.h>
#include <absl/strings/numbers.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>
#include <absl/strings/str_join.h>

namespace rmoe {

std::string JsonNumber(double value) {
  return std::isfinite(value) ? absl::StrFormat("%.17g", value) : "null";
}

std::string IndentJson(absl::string_view compact) {
  std::string out;
  int depth = 0, array_depth = 0;
  bool in_string = false, escaped = false;
  auto new_line = [&] { out += "\n" + std::string(2 * depth, ' '); };
  for (char c : compact) {
    if (in_string) {
      out += c;
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') in_string = true;
    if (array_depth > 0) {
      if (c == '[') ++array_depth;
      if (c == ']') --array_depth;
      out += c == ',' ? ", " : std::string(1, c);
      continue;
    }
    if (c == '{') {
      out += c;
      ++depth;
      new_line();
    } else if (c == '}') {
      --depth;
      new_line();
      out += c;
    } else if (c == ',') {
      out += c;
      new_line();
    } else if (c == ':') {
      out += ": ";
    } else {
      if (c == '[') array_depth = 1;
      out += c;
    }
  }
  return out;
}

namespace {

// The length of the valid UTF-8 sequence at the start of `text`, or 0 when it is not one
// (a stray continuation byte, a truncated or overlong sequence, a surrogate, > U+10FFFF).
size_t Utf8SequenceLength(absl::string_view text) {
  const auto byte = [&](size_t i) { return static_cast<unsigned char>(text[i]); };
  const unsigned char lead = byte(0);
  size_t length = lead < 0x80 ? 1 : lead >= 0xC2 && lead <= 0xDF ? 2 : lead >= 0xE0 && lead <= 0xEF ? 3
                                   : lead >= 0xF0 && lead <= 0xF4 ? 4 : 0;
  if (length == 0 || length > text.size()) return 0;
  for (size_t i = 1; i < length; ++i) {
    if ((byte(i) & 0xC0) != 0x80) return 0;
  }
  if (length == 3 && ((lead == 0xE0 && byte(1) < 0xA0) || (lead == 0xED && byte(1) >= 0xA0))) return 0;
  if (length == 4 && ((lead == 0xF0 && byte(1) < 0x90) || (lead == 0xF4 && byte(1) >= 0x90))) return 0;
  return length;
}

}  // namespace

std::string JsonString(absl::string_view value) {
  std::string out = "\"";
  for (size_t i = 0; i < value.size();) {
    const char c = value[i];
    const size_t length = Utf8SequenceLength(value.substr(i));
    if (length == 0) {
      // JSON text is UTF-8: a byte that is no part of a character (one byte of a multi-byte
      // character, as a byte-level token is) becomes U+FFFD, as a lenient decoder shows it.
      out += "\\ufffd";
      ++i;
      continue;
    }
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) < 0x20) {
      out += absl::StrFormat("\\u%04x", c);
    } else {
      out.append(value.data() + i, length);
    }
    i += length;
  }
  return out + "\"";
}

void JsonObject::Key(const std::string& key) {
  if (!body_.empty()) body_ += ",";
  body_ += JsonString(key) + ":";
}
JsonObject& JsonObject::Add(const std::string& key, double value) {
  Key(key);
  body_ += JsonNumber(value);
  return *this;
}
JsonObject& JsonObject::Add(const std::string& key, const std::vector<std::string>& values) {
  Key(key);
  std::vector<std::string> quoted;
  for (const auto& value : values) quoted.push_back(JsonString(value));
  body_ += "[" + absl::StrJoin(quoted, ",") + "]";
  return *this;
}
JsonObject& JsonObject::Add(const std::string& key, int64_t value) {
  Key(key);
  body_ += absl::StrCat(value);
  return *this;
}
JsonObject& JsonObject::Add(const std::string& key, const std::string& value) {
  Key(key);
  body_ += JsonString(value);
  return *this;
}
JsonObject& JsonObject::Add(const std::string& key, const std::vector<int64_t>& values) {
  Key(key);
  body_ += "[" + absl::StrJoin(values, ",") + "]";
  return *this;
}
JsonObject& JsonObject::Add(const std::string& key, const std::vector<double>& values) {
  Key(key);
  body_ += "[" + absl::StrJoin(values, ",", [](std::string* out, double v) { out->append(JsonNumber(v)); }) + "]";
  return *this;
}
JsonObject& JsonObject::AddRaw(const std::string& key, const std::string& json) {
  Key(key);
  body_ += json;
  return *this;
}

std::string JsonArray(const std::vector<JsonObject>& items) {
  std::string out = "[";
  for (size_t i = 0; i < items.size(); ++i) out += (i ? "," : "") + items[i].str();
  return out + "]";
}

const JsonValue* JsonValue::Get(absl::string_view key) const {
  for (const auto& [k, v] : object) {
    if (k == key) return &v;
  }
  return nullptr;
}

double JsonValue::Number(absl::string_view key) const {
  const JsonValue* v = Get(key);
  return v != nullptr && v->type == kNumber ? v->number : std::numeric_limits<double>::quiet_NaN();
}

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

class JsonParser {
 public:
  explicit JsonParser(absl::string_view text) : s_(text) {}

  // The whole text must be one value (surrounding whitespace allowed).
  bool ParseDocument(JsonValue* out) {
    if (!Parse(out, 0)) return false;
    SkipSpace();
    return i_ == s_.size();
  }

 private:
  void SkipSpace() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\r' || s_[i_] == '\n')) ++i_;
  }
  bool Consume(absl::string_view word) {
    if (s_.substr(i_, word.size()) != word) return false;
    i_ += word.size();
    return true;
  }

  bool Parse(JsonValue* out, int depth) {
    if (depth > 64) return false;
    SkipSpace();
    if (i_ >= s_.size()) return false;
    const char c = s_[i_];
    if (c == '{') return ParseObject(out, depth);
    if (c == '[') return ParseArray(out, depth);
    if (c == '"') {
      out->type = JsonValue::kString;
      return ParseString(&out->string);
    }
    if (Consume("true")) { out->type = JsonValue::kBool; out->boolean = true; return true; }
    if (Consume("false")) { out->type = JsonValue::kBool; out->boolean = false; return true; }
    if (Consume("null")) { out->type = JsonValue::kNull; return true; }
    return ParseNumber(out);
  }

  bool ParseNumber(JsonValue* out) {
    out->type = JsonValue::kNumber;
    if (Consume("NaN")) { out->number = kNaN; return true; }
    if (Consume("Infinity")) { out->number = HUGE_VAL; return true; }
    if (Consume("-Infinity")) { out->number = -HUGE_VAL; return true; }
    const size_t start = i_;
    while (i_ < s_.size() && (absl::ascii_isdigit(static_cast<unsigned char>(s_[i_])) || s_[i_] == '-' ||
                              s_[i_] == '+' || s_[i_] == '.' || s_[i_] == 'e' || s_[i_] == 'E')) {
      ++i_;
    }
    return i_ > start && absl::SimpleAtod(s_.substr(start, i_ - start), &out->number);
  }

  static void AppendUtf8(uint32_t code, std::string* out) {
    if (code < 0x80) {
      *out += static_cast<char>(code);
    } else if (code < 0x800) {
      *out += static_cast<char>(0xC0 | (code >> 6));
      *out += static_cast<char>(0x80 | (code & 0x3F));
    } else if (code < 0x10000) {
      *out += static_cast<char>(0xE0 | (code >> 12));
      *out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      *out += static_cast<char>(0x80 | (code & 0x3F));
    } else {
      *out += static_cast<char>(0xF0 | (code >> 18));
      *out += static_cast<char>(0x80 | ((code >> 12) & 0x3F));
      *out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      *out += static_cast<char>(0x80 | (code & 0x3F));
    }
  }

  bool ParseHex4(uint32_t* code) {
    if (i_ + 4 > s_.size()) return false;
    *code = 0;
    for (int k = 0; k < 4; ++k) {
      const char h = s_[i_++];
      *code <<= 4;
      if (h >= '0' && h <= '9') *code |= h - '0';
      else if (h >= 'a' && h <= 'f') *code |= h - 'a' + 10;
      else if (h >= 'A' && h <= 'F') *code |= h - 'A' + 10;
      else return false;
    }
    return true;
  }

  bool ParseString(std::string* out) {
    ++i_;  // the opening quote
    while (i_ < s_.size()) {
      const char c = s_[i_++];
      if (c == '"') return true;
      if (c != '\\') {
        *out += c;
        continue;
      }
      if (i_ >= s_.size()) return false;
      const char e = s_[i_++];
      switch (e) {
        case '"': case '\\': case '/': *out += e; break;
        case 'b': *out += '\b'; break;
        case 'f': *out += '\f'; break;
        case 'n': *out += '\n'; break;
        case 'r': *out += '\r'; break;
        case 't': *out += '\t'; break;
        case 'u': {
          uint32_t code;
          if (!ParseHex4(&code)) return false;
          if (code >= 0xD800 && code < 0xDC00 && Consume("\\u")) {
            uint32_t low;
            if (!ParseHex4(&low)) return false;
            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
          }
          AppendUtf8(code, out);
          break;
        }
        default: return false;
      }
    }
    return false;
  }

  bool ParseArray(JsonValue* out, int depth) {
    out->type = JsonValue::kArray;
    ++i_;
    SkipSpace();
    if (Consume("]")) return true;
    while (true) {
      out->array.emplace_back();
      if (!Parse(&out->array.back(), depth + 1)) return false;
      SkipSpace();
      if (Consume("]")) return true;
      if (!Consume(",")) return false;
    }
  }

  bool ParseObject(JsonValue* out, int depth) {
    out->type = JsonValue::kObject;
    ++i_;
    SkipSpace();
    if (Consume("}")) return true;
    while (true) {
      SkipSpace();
      if (i_ >= s_.size() || s_[i_] != '"') return false;
      std::string key;
      if (!ParseString(&key)) return false;
      SkipSpace();
      if (!Consume(":")) return false;
      out->object.emplace_back(std::move(key), JsonValue());
      if (!Parse(&out->object.back().second, depth + 1)) return false;
      SkipSpace();
      if (Consume("}")) return true;
      if (!Consume(",")) return false;
    }
  }

  absl::string_view s_;
  size_t i_ = 0;
};

}  // namespace

bool ParseJson(absl::string_view text, JsonValue* out) {
  return JsonParser(text).ParseDocument(out);
}

}  // namespace rmoe
