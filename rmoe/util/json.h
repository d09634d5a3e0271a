// JSON without a JSON library (none is installed): an object writer for metrics records and
// reports, and a reader for the records programs read back (objects, arrays, numbers,
// strings, true/false/null; NaN and Infinity leniently), with a nesting limit.
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include <absl/strings/string_view.h>

namespace rmoe {

// `value` as a JSON string literal, quotes included.
std::string JsonString(absl::string_view value);
// `value` as a JSON number; null for NaN and infinities, which JSON cannot hold. 17
// significant digits, so a double reads back bit for bit.
std::string JsonNumber(double value);

// One JSON object, built field by field.
class JsonObject {
 public:
  JsonObject& Add(const std::string& key, double value);
  JsonObject& Add(const std::string& key, int64_t value);
  JsonObject& Add(const std::string& key, const std::string& value);
  JsonObject& Add(const std::string& key, const std::vector<int64_t>& values);
  JsonObject& Add(const std::string& key, const std::vector<double>& values);
  JsonObject& Add(const std::string& key, const std::vector<std::string>& values);
  // `json` must already be JSON text (an object built here, an array, ...).
  JsonObject& AddRaw(const std::string& key, const std::string& json);
  std::string str() const { return "{" + body_ + "}"; }

 private:
  void Key(const std::string& key);
  std::string body_;
};

// "[{...},{...}]".
std::string JsonArray(const std::vector<JsonObject>& items);

// Compact JSON text laid out for people: one object member per line, indented by two
// spaces per level; arrays stay on one line. Strings and numbers are kept as written.
std::string IndentJson(absl::string_view compact);

// A parsed JSON value.
struct JsonValue {
  enum Type { kNull, kBool, kNumber, kString, kArray, kObject } type = kNull;
  double number = 0;
  bool boolean = false;
  std::string string;
  std::vector<JsonValue> array;
  std::vector<std::pair<std::string, JsonValue>> object;  // in the text's order

  // The member `key` of an object; nullptr when missing.
  const JsonValue* Get(absl::string_view key) const;
  // A number member; NaN when missing, null or not a number.
  double Number(absl::string_view key) const;
};

// Parses text that holds exactly one JSON value (surrounding whitespace allowed); false on
// any syntax error or nesting deeper than 64.
bool ParseJson(absl::string_view text, JsonValue* out);

}  // namespace rmoe
