#include "rmoe/util/cli.h"

#include <cstdio>

#include <absl/status/status.h>
#include <absl/strings/match.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_split.h>

namespace rmoe::cli {
namespace {

bool IsHelp(absl::string_view arg) { return arg == "--help" || arg == "-h"; }

// "-x", "--name", "--name=value"; a lone "-" (stdin, by convention) is an argument.
bool LooksLikeFlag(absl::string_view arg) { return arg.size() > 1 && arg[0] == '-'; }

absl::Status Usage(absl::string_view message) { return absl::InvalidArgumentError(message); }

// "--threads x: expected an integer >= 0" from ParseInteger's "expected ...".
absl::Status ValueError(absl::string_view flag, absl::string_view value, const absl::Status& why) {
  return Usage(absl::StrCat(flag, " ", value, ": ", why.message()));
}

}  // namespace

std::vector<std::string> Arguments(int argc, char** argv) {
  return argc > 1 ? std::vector<std::string>(argv + 1, argv + argc) : std::vector<std::string>{};
}

int PrintUsage(const char* usage) {
  std::fputs(usage, stdout);
  return 0;
}

bool AsksForHelp(const std::vector<std::string>& args) {
  for (const std::string& arg : args) {
    if (IsHelp(arg)) return true;
  }
  return false;
}

// ---------------------------------------------------------------------------------------
// Args

std::string Args::Get(absl::string_view flag, absl::string_view fallback) const {
  auto it = values_.find(flag);
  return it == values_.end() ? std::string(fallback) : it->second.back();
}

std::vector<std::string> Args::All(absl::string_view flag) const {
  auto it = values_.find(flag);
  return it == values_.end() ? std::vector<std::string>{} : it->second;
}

absl::StatusOr<int64_t> Args::Int(absl::string_view flag, int64_t fallback, int64_t min,
                                  int64_t max) const {
  if (!Has(flag)) return fallback;
  const std::string text = Get(flag);
  absl::StatusOr<int64_t> value = ParseInteger(text, min, max);
  if (!value.ok()) return ValueError(flag, text, value.status());
  return value;
}

absl::StatusOr<double> Args::Number(absl::string_view flag, double fallback,
                                    const NumberLimits& limits) const {
  if (!Has(flag)) return fallback;
  const std::string text = Get(flag);
  absl::StatusOr<double> value = ParseNumber(text, limits);
  if (!value.ok()) return ValueError(flag, text, value.status());
  return value;
}

absl::StatusOr<std::vector<int64_t>> Args::IntList(absl::string_view flag,
                                                   const std::vector<int64_t>& fallback,
                                                   int64_t min) const {
  if (!Has(flag)) return fallback;
  const std::string text = Get(flag);
  const absl::Status expected =
      Usage(absl::StrCat("expected comma-separated integers >= ", min));
  std::vector<int64_t> values;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    absl::StatusOr<int64_t> value = ParseInteger(part, min);
    if (!value.ok()) return ValueError(flag, text, expected);
    values.push_back(*value);
  }
  if (values.empty()) return ValueError(flag, text, expected);
  return values;
}

// ---------------------------------------------------------------------------------------
// Parser

Parser& Parser::Declare(const std::string& flag, Kind kind, const std::string& expects) {
  flags_[flag] = Flag{kind, expects};
  return *this;
}
Parser& Parser::Switch(const std::string& flag) { return Declare(flag, Kind::kSwitch, ""); }
Parser& Parser::Value(const std::string& flag, const std::string& expects) {
  return Declare(flag, Kind::kValue, expects);
}
Parser& Parser::Repeated(const std::string& flag, const std::string& expects) {
  return Declare(flag, Kind::kRepeated, expects);
}
Parser& Parser::OptionalValue(const std::string& flag, const std::string& implicit) {
  return Declare(flag, Kind::kOptionalValue, implicit);
}
Parser& Parser::Positionals(int count) {
  positionals_ = count;
  return *this;
}

absl::Status Parser::Take(const std::vector<std::string>& args, size_t* i, Args* out) const {
  const std::string& arg = args[*i];
  if (!LooksLikeFlag(arg)) {
    if (static_cast<int>(out->positional_.size()) >= positionals_) {
      return Usage(absl::StrCat("unexpected argument \"", arg, "\""));
    }
    out->positional_.push_back(arg);
    return absl::OkStatus();
  }
  const size_t equals = arg.find('=');
  const std::string name = arg.substr(0, equals);
  const bool inline_value = equals != std::string::npos;
  auto it = flags_.find(name);
  if (it == flags_.end()) {
    return Usage(absl::StrCat("unknown option \"", arg, "\"", scope_.empty() ? "" : " ", scope_));
  }
  const Flag& flag = it->second;
  std::string value;
  if (inline_value) {
    if (flag.kind == Kind::kSwitch) return Usage(absl::StrCat(name, " takes no value"));
    value = arg.substr(equals + 1);
  } else if (flag.kind == Kind::kOptionalValue) {
    const bool next = *i + 1 < args.size() && !absl::StartsWith(args[*i + 1], "--");
    value = next ? args[++*i] : flag.expects;
  } else if (flag.kind != Kind::kSwitch) {
    if (*i + 1 >= args.size()) return Usage(absl::StrCat(name, " needs ", flag.expects));
    value = args[++*i];
  }
  std::vector<std::string>& values = out->values_[name];
  if (!values.empty() && flag.kind != Kind::kRepeated) {
    return Usage(absl::StrCat(name, " was given twice; it is given at most once"));
  }
  values.push_back(std::move(value));
  return absl::OkStatus();
}

absl::StatusOr<Args> Parser::Parse(const std::vector<std::string>& args) const {
  Args out;
  absl::Status first_error;
  for (size_t i = 0; i < args.size(); ++i) {
    // Help wins wherever it stands, even after a mistake: the usage explains the mistake.
    if (IsHelp(args[i])) {
      out.help_ = true;
      continue;
    }
    absl::Status status = Take(args, &i, &out);
    if (first_error.ok()) first_error = status;
  }
  if (out.help_) return out;
  if (!first_error.ok()) return first_error;
  return out;
}

}  // namespace rmoe::cli
