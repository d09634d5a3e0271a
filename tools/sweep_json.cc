// The JSON reader of tools/sweep_json.h.
#include "tools/sweep_json.h"

#include <cmath>
#include <cstdint>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"

namespace rmoe::sweep {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

class JsonParser {
 public:
  explicit JsonParser(absl::string_view text) : s_(text) {}

  // The whole text must be one value (surrounding whitespace allowed).
  bool ParseDocument(Json* out) {
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

  bool Parse(Json* out, int depth) {
    if (depth > 64) return false;
    SkipSpace();
    if (i_ >= s_.size()) return false;
    const char c = s_[i_];
    if (c == '{') return ParseObject(out, depth);
    if (c == '[') return ParseArray(out, depth);
    if (c == '"') {
      out->type = Json::kString;
      return ParseString(&out->string);
    }
    if (Consume("true")) { out->type = Json::kBool; out->boolean = true; return true; }
    if (Consume("false")) { out->type = Json::kBool; out->boolean = false; return true; }
    if (Consume("null")) { out->type = Json::kNull; return true; }
    return ParseNumber(out);
  }

  bool ParseNumber(Json* out) {
    out->type = Json::kNumber;
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

  bool ParseArray(Json* out, int depth) {
    out->type = Json::kArray;
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

  bool ParseObject(Json* out, int depth) {
    out->type = Json::kObject;
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
      out->object.emplace_back(std::move(key), Json());
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

bool ParseJson(absl::string_view text, Json* out) { return JsonParser(text).ParseDocument(out); }

}  // namespace rmoe::sweep
