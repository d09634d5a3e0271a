// Command-line parsing for every RMoE program: flags `--name value` and `--name=value`,
// switches, repeatable flags (--set), optional values (--resume [PATH]), positional
// arguments, --help/-h anywhere. A program declares its flags on a Parser, parses, and reads
// the values (typed, with range checks) from the Args; each error names the flag and what
// it expects, for the program to print with its own prefix and exit status.
#pragma once

#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>

#include "rmoe/util/numbers.h"

namespace rmoe::cli {

// argv[1..argc-1].
std::vector<std::string> Arguments(int argc, char** argv);

// Prints a program's usage text on stdout; returns 0, the exit status of --help.
int PrintUsage(const char* usage);

// Whether `args` holds --help or -h: programs with subcommands look before choosing one.
bool AsksForHelp(const std::vector<std::string>& args);

// What Parser::Parse found.
class Args {
 public:
  // --help or -h was given: the program prints its usage (nothing else was checked).
  bool help() const { return help_; }
  bool Has(absl::string_view flag) const { return values_.count(flag) > 0; }
  // The flag's (last) value, or `fallback` when it was not given.
  std::string Get(absl::string_view flag, absl::string_view fallback = "") const;
  // Every value of a repeated flag, in order.
  std::vector<std::string> All(absl::string_view flag) const;
  const std::vector<std::string>& positional() const { return positional_; }

  // The flag's value as an integer in [min, max], or `fallback` when it was not given.
  // Errors read "--threads x: expected an integer >= 0".
  absl::StatusOr<int64_t> Int(absl::string_view flag, int64_t fallback,
                              int64_t min = std::numeric_limits<int64_t>::min(),
                              int64_t max = std::numeric_limits<int64_t>::max()) const;
  // The same for a finite real number within `limits`.
  absl::StatusOr<double> Number(absl::string_view flag, double fallback,
                                const NumberLimits& limits = {}) const;
  // Comma-separated integers, each >= min ("--experts 4,8,16"); at least one.
  absl::StatusOr<std::vector<int64_t>> IntList(absl::string_view flag,
                                               const std::vector<int64_t>& fallback,
                                               int64_t min = 1) const;

 private:
  friend class Parser;
  bool help_ = false;
  std::map<std::string, std::vector<std::string>, std::less<>> values_;
  std::vector<std::string> positional_;
};

class Parser {
 public:
  // `scope` ends the message about an unknown option: "unknown option \"--x\" for encode".
  explicit Parser(std::string scope = "") : scope_(std::move(scope)) {}

  // A flag without a value (--dry-run).
  Parser& Switch(const std::string& flag);
  // A flag with one value, given at most once; `expects` completes "--job needs ...".
  Parser& Value(const std::string& flag, const std::string& expects);
  // A flag with a value that may be given several times (--set FIELD=VALUE).
  Parser& Repeated(const std::string& flag, const std::string& expects);
  // A flag whose value may be left out (--resume [PATH]): the next argument is its value
  // unless it starts with "--"; without one the flag's value is `implicit`.
  Parser& OptionalValue(const std::string& flag, const std::string& implicit);
  // Up to `count` arguments that are not flags (none unless called).
  Parser& Positionals(int count);

  absl::StatusOr<Args> Parse(const std::vector<std::string>& args) const;

 private:
  enum class Kind { kSwitch, kValue, kRepeated, kOptionalValue };
  struct Flag {
    Kind kind;
    std::string expects;  // kValue, kRepeated: for "needs ..."; kOptionalValue: implicit value
  };
  Parser& Declare(const std::string& flag, Kind kind, const std::string& expects);
  // Consumes args[*i] (and its value); the first problem only, later ones are not looked at.
  absl::Status Take(const std::vector<std::string>& args, size_t* i, Args* out) const;

  std::string scope_;
  std::map<std::string, Flag, std::less<>> flags_;
  int positionals_ = 0;
};

}  // namespace rmoe::cli
