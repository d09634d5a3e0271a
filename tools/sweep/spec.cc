// Sweep specs: loading, expansion into points, validation, diffs against the base job.
#include "tools/sweep/spec.h"

#include <algorithm>
#include <filesystem>
#include <map>
#include <set>

#include <absl/strings/ascii.h>
#include <absl/strings/match.h>
#include <absl/strings/numbers.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_join.h>
#include <absl/strings/str_split.h>
#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>
#include "rmoe/util/files.h"

namespace rmoe::sweep {
namespace {

namespace fs = std::filesystem;
namespace pb = google::protobuf;

// Collects the text-format parser's errors as "SOURCE:LINE:COL: message".
class ErrorCollector : public pb::io::ErrorCollector {
 public:
  explicit ErrorCollector(absl::string_view source) : source_(source) {}
  void AddError(int line, pb::io::ColumnNumber column, const std::string& message) override {
    errors_.push_back(absl::StrCat(source_, ":", line + 1, ":", column + 1, ": ", message));
  }
  void AddWarning(int line, pb::io::ColumnNumber column, const std::string& message) override {}
  const std::vector<std::string>& errors() const { return errors_; }

 private:
  std::string source_;
  std::vector<std::string> errors_;
};

// Fields rmoe_sweep sets for every point itself.
bool IsReservedField(const std::string& field) {
  return field == "output_dir" || field == "checkpoint.directory" ||
         field == "logging.metrics_file";
}

std::string LastSegment(const std::string& path) {
  const size_t dot = path.rfind('.');
  return dot == std::string::npos ? path : path.substr(dot + 1);
}

// A relative base_job_path: from the current directory, else from the sweep file's
// directory and each of its parents.
absl::StatusOr<std::string> ResolveBasePath(const std::string& path, const std::string& spec_path) {
  std::error_code ec;
  if (fs::path(path).is_absolute() || fs::exists(path, ec)) return path;
  std::vector<std::string> tried = {path};
  if (!spec_path.empty()) {
    fs::path dir = fs::absolute(fs::path(spec_path), ec).parent_path();
    while (!dir.empty()) {
      const fs::path candidate = dir / path;
      if (fs::exists(candidate, ec)) return candidate.lexically_normal().string();
      tried.push_back(candidate.string());
      if (dir == dir.root_path()) break;
      dir = dir.parent_path();
    }
  }
  return absl::NotFoundError(absl::StrCat("base_job_path \"", path,
                                          "\" not found (looked for ", tried.front(),
                                          tried.size() > 1 ? " and next to the sweep file and its parent directories" : "",
                                          ")"));
}

// Problems per point, reported as "point I (DESC): problem"; a problem every point shares
// (more than one point) is reported once.
std::vector<std::string> ReportByPoint(
    const std::vector<std::pair<const Point*, std::vector<std::string>>>& problems,
    size_t num_points) {
  std::map<std::string, size_t> count;
  for (const auto& [point, lines] : problems) {
    std::set<std::string> unique(lines.begin(), lines.end());
    for (const auto& line : unique) ++count[line];
  }
  std::vector<std::string> out, shared;
  for (const auto& [point, lines] : problems) {
    for (const auto& line : lines) {
      if (num_points > 1 && count[line] == num_points) {
        if (std::find(shared.begin(), shared.end(), line) == shared.end()) shared.push_back(line);
        continue;
      }
      out.push_back(absl::StrCat("point ", point->index, " (", point->description, "): ", line));
    }
  }
  std::vector<std::string> all;
  for (const auto& line : shared) all.push_back(absl::StrCat("every point: ", line));
  all.insert(all.end(), out.begin(), out.end());
  return all;
}

// "path = value" for every scalar field of the message, defaults included.
void Flatten(const pb::Message& message, const std::string& prefix,
             std::map<std::string, std::string>* out) {
  const pb::Descriptor* type = message.GetDescriptor();
  const pb::Reflection* reflection = message.GetReflection();
  for (int i = 0; i < type->field_count(); ++i) {
    const pb::FieldDescriptor* field = type->field(i);
    const std::string path = prefix.empty() ? field->name() : absl::StrCat(prefix, ".", field->name());
    if (field->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE) {
      if (field->is_repeated()) continue;  // JobSpec has no repeated messages
      Flatten(reflection->GetMessage(message, field), path, out);
      continue;
    }
    std::vector<std::string> values;
    const int n = field->is_repeated() ? reflection->FieldSize(message, field) : 1;
    for (int j = 0; j < n; ++j) {
      std::string text;
      pb::TextFormat::PrintFieldValueToString(message, field, field->is_repeated() ? j : -1, &text);
      values.push_back(text);
    }
    (*out)[path] = absl::StrJoin(values, ",");
  }
}

}  // namespace

std::string SafeName(absl::string_view text) {
  std::string out;
  bool pending_dash = false;
  for (char c : text) {
    if (absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '+' || c == '-') {
      if (pending_dash && !out.empty()) out += '-';
      pending_dash = false;
      out += c;
    } else {
      pending_dash = true;
    }
  }
  // "." and ".." are not names.
  if (out.empty() || out == "." || out == "..") out = "x" + out;
  return out;
}

absl::StatusOr<SweepSpec> ParseSweepSpec(absl::string_view text, absl::string_view source_name) {
  SweepSpec spec;
  pb::TextFormat::Parser parser;
  ErrorCollector errors(source_name);
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(std::string(text), &spec)) {
    return absl::InvalidArgumentError(errors.errors().empty()
                                          ? absl::StrCat(source_name, ": cannot parse the sweep spec")
                                          : absl::StrJoin(errors.errors(), "\n"));
  }
  return spec;
}

absl::StatusOr<SweepSpec> LoadSweepSpec(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFile(path, "sweep spec");
  if (!text.ok()) return text.status();
  return ParseSweepSpec(*text, path);
}

absl::StatusOr<Sweep> ExpandSweep(const SweepSpec& spec, const std::string& spec_path,
                                  const ExpandOptions& options) {
  Sweep sweep;
  sweep.spec = spec;
  sweep.spec_path = spec_path;
  std::vector<std::string> problems;

  // --- The spec's own structure. ---
  if (spec.repeats() < 1) problems.push_back(absl::StrCat("repeats = ", spec.repeats(), " must be >= 1"));
  std::map<std::string, int> label_uses, field_uses;
  for (const Axis& axis : spec.axes()) ++label_uses[axis.has_label() ? axis.label() : LastSegment(axis.field())];
  for (int a = 0; a < spec.axes_size(); ++a) {
    const Axis& axis = spec.axes(a);
    const std::string where = absl::StrCat("axes[", a, "]");
    std::string label = axis.has_label() ? axis.label() : LastSegment(axis.field());
    if (!axis.has_label() && label_uses[label] > 1) label = axis.field();
    sweep.axis_labels.push_back(label);
    if (axis.field().empty()) problems.push_back(absl::StrCat(where, ".field must be set"));
    if (axis.values_size() == 0) {
      problems.push_back(absl::StrCat(where, " (", axis.field(), ") has no values"));
    }
    if (axis.value_names_size() != 0 && axis.value_names_size() != axis.values_size()) {
      problems.push_back(absl::StrCat(where, " (", axis.field(), ") has ", axis.value_names_size(),
                                      " value_names for ", axis.values_size(), " values"));
    }
    std::vector<std::pair<std::string, const pb::RepeatedPtrField<std::string>*>> fields = {
        {axis.field(), &axis.values()}};
    for (const LinkedField& linked : axis.linked()) {
      fields.emplace_back(linked.field(), &linked.values());
      if (linked.values_size() != axis.values_size()) {
        problems.push_back(absl::StrCat(where, ".linked ", linked.field(), " has ", linked.values_size(),
                                        " values; it must have one per value of ", axis.field(),
                                        " (", axis.values_size(), ")"));
      }
    }
    for (const auto& [field, values] : fields) {
      if (field.empty()) continue;
      if (++field_uses[field] == 2) {
        problems.push_back(absl::StrCat(field, " is set by more than one axis"));
      }
      if (IsReservedField(field)) {
        problems.push_back(absl::StrCat(where, ": ", field,
                                        " is set by rmoe_sweep for every point (inside output_dir) "
                                        "and cannot be an axis"));
      }
      if (field == kRanksField) {
        sweep.ranks_is_axis = true;
        for (const std::string& value : *values) {
          int ranks = 0;
          if (!absl::SimpleAtoi(value, &ranks) || ranks < 1) {
            problems.push_back(absl::StrCat(where, ": ranks = \"", value, "\" must be an integer >= 1"));
          }
        }
      }
    }
  }
  for (const auto& [label, uses] : label_uses) {
    if (uses > 1 && std::count(sweep.axis_labels.begin(), sweep.axis_labels.end(), label) > 1) {
      problems.push_back(absl::StrCat("axis label \"", label, "\" is used by more than one axis"));
    }
  }
  if (spec.combination() == SweepSpec::ZIP) {
    for (const Axis& axis : spec.axes()) {
      if (axis.values_size() != spec.axes(0).values_size()) {
        problems.push_back(absl::StrCat(
            "combination ZIP needs axes of equal length: ", spec.axes(0).field(), " has ",
            spec.axes(0).values_size(), " values, ", axis.field(), " has ", axis.values_size()));
      }
    }
  }

  // --- The base job. ---
  if (spec.has_base_job()) {
    sweep.base = spec.base_job();
    sweep.base_source = "<inline base_job>";
  } else if (spec.has_base_job_path()) {
    auto path = ResolveBasePath(spec.base_job_path(), spec_path);
    if (!path.ok()) return path.status();
    auto loaded = LoadJobSpec(*path);
    if (!loaded.ok()) return loaded.status();
    sweep.base = *std::move(loaded);
    sweep.base_source = *path;
  } else {
    problems.push_back("the sweep needs a base job: set base_job { ... } or base_job_path");
  }
  for (const std::string& o : spec.base_overrides()) {
    if (auto s = ApplyOverride(&sweep.base, o); !s.ok()) {
      problems.push_back(absl::StrCat("base_overrides \"", o, "\": ", s.message()));
    }
  }
  for (const std::string& o : options.overrides) {
    if (auto s = ApplyOverride(&sweep.base, o); !s.ok()) {
      problems.push_back(absl::StrCat("--set ", o, ": ", s.message()));
    }
  }
  if (!problems.empty()) return absl::InvalidArgumentError(absl::StrJoin(problems, "\n"));

  sweep.output_dir = !options.output_dir.empty() ? options.output_dir
                     : spec.has_output_dir()     ? spec.output_dir()
                                                 : "runs/sweeps/" + SafeName(spec.name());

  // --- Combinations: each is one value index per axis. ---
  std::vector<std::vector<int>> combos;
  if (spec.axes_size() == 0) {
    combos.push_back({});
  } else if (spec.combination() == SweepSpec::ZIP) {
    for (int i = 0; i < spec.axes(0).values_size(); ++i) combos.push_back(std::vector<int>(spec.axes_size(), i));
  } else {
    combos.push_back({});
    for (const Axis& axis : spec.axes()) {
      std::vector<std::vector<int>> next;
      for (const auto& prefix : combos) {
        for (int v = 0; v < axis.values_size(); ++v) {
          next.push_back(prefix);
          next.back().push_back(v);
        }
      }
      combos = std::move(next);
    }
  }

  // --- Points. ---
  std::vector<std::pair<const Point*, std::vector<std::string>>> point_problems;
  std::set<std::string> names;
  sweep.points.reserve(combos.size() * spec.repeats());
  for (int r = 0; r < spec.repeats(); ++r) {
    for (const auto& combo : combos) {
      Point point;
      point.index = static_cast<int>(sweep.points.size()) + 1;
      point.repeat = r;
      point.job = sweep.base;
      std::vector<std::string> errors, name_parts, description_parts;
      for (int a = 0; a < spec.axes_size(); ++a) {
        const Axis& axis = spec.axes(a);
        const int v = combo[a];
        const std::string shown = axis.value_names_size() ? axis.value_names(v) : axis.values(v);
        point.axis_values.emplace_back(sweep.axis_labels[a], shown);
        name_parts.push_back(absl::StrCat(SafeName(sweep.axis_labels[a]), "-", SafeName(shown)));
        description_parts.push_back(absl::StrCat(sweep.axis_labels[a], "=", shown));
        std::vector<std::pair<std::string, std::string>> sets = {{axis.field(), axis.values(v)}};
        for (const LinkedField& linked : axis.linked()) sets.emplace_back(linked.field(), linked.values(v));
        for (const auto& [field, value] : sets) {
          if (field == kRanksField) {
            (void)absl::SimpleAtoi(value, &point.ranks);
            continue;
          }
          const std::string assignment = absl::StrCat(field, "=", value);
          point.overrides.push_back(assignment);
          if (auto s = ApplyOverride(&point.job, assignment); !s.ok()) errors.push_back(std::string(s.message()));
        }
      }
      point.config_key = absl::StrJoin(description_parts, ", ");
      point.seed = point.job.seed() + static_cast<uint64_t>(r);
      point.job.set_seed(point.seed);
      name_parts.push_back(absl::StrCat("seed-", point.seed));
      description_parts.push_back(absl::StrCat("seed=", point.seed));
      point.name = absl::StrJoin(name_parts, "_");
      if (!names.insert(point.name).second) {
        point.name = absl::StrCat(point.name, "_", point.index);
        names.insert(point.name);
      }
      point.description = absl::StrJoin(description_parts, ", ");
      point.dir = (fs::path(sweep.output_dir) / point.name).string();
      point.job.set_name(absl::StrCat(spec.name(), "/", point.name));
      point.job.set_output_dir(point.dir);
      point.job.mutable_checkpoint()->clear_directory();
      point.job.mutable_logging()->clear_metrics_file();
      if (!point.job.checkpoint().has_interval()) {
        // So that an interrupted point resumes: about ten checkpoints per run.
        const int steps = std::max(1, point.job.schedule().steps());
        point.job.mutable_checkpoint()->set_interval(std::max(1, (steps + 9) / 10));
      }
      sweep.points.push_back(std::move(point));  // capacity reserved: pointers stay valid
      if (!errors.empty()) point_problems.emplace_back(&sweep.points.back(), std::move(errors));
    }
  }
  if (!point_problems.empty()) {
    return absl::InvalidArgumentError(
        absl::StrJoin(ReportByPoint(point_problems, sweep.points.size()), "\n"));
  }
  return sweep;
}

absl::Status ValidatePoints(const Sweep& sweep, const ValidationOptions& options) {
  std::vector<std::pair<const Point*, std::vector<std::string>>> problems;
  bool data_problem = false;
  for (const Point& point : sweep.points) {
    std::vector<std::string> lines;
    if (absl::Status s = ValidateJobSpec(point.job, options); !s.ok()) {
      for (absl::string_view line : absl::StrSplit(s.message(), '\n')) {
        if (!line.empty()) lines.emplace_back(line);
        if (absl::StrContains(line, "rmoe_prepare_data")) data_problem = true;
      }
    }
    const int ep = point.job.parallel().expert_parallel_size();
    if (ep >= 1 && point.ranks % ep != 0) {
      lines.push_back(absl::StrCat("ranks = ", point.ranks,
                                   " must be a multiple of parallel.expert_parallel_size = ", ep,
                                   " (link the two in one axis to change them together)"));
    }
    if (!lines.empty()) problems.emplace_back(&point, std::move(lines));
  }
  if (problems.empty()) return absl::OkStatus();
  std::vector<std::string> report = ReportByPoint(problems, sweep.points.size());
  if (data_problem) {
    report.push_back(absl::StrCat(
        "hint: prepare the dataset once for the whole sweep: rmoe_prepare_data --job ",
        sweep.base_source, " (with the same --set overrides of data.* fields)"));
  }
  return absl::InvalidArgumentError(absl::StrJoin(report, "\n"));
}

std::vector<std::string> JobDiff(const JobSpec& base, const JobSpec& job) {
  std::map<std::string, std::string> a, b;
  Flatten(base, "", &a);
  Flatten(job, "", &b);
  std::vector<std::string> out;
  for (const auto& [path, value] : b) {
    auto it = a.find(path);
    if (it == a.end() || it->second != value) out.push_back(absl::StrCat(path, ": ", value));
  }
  return out;
}

}  // namespace rmoe::sweep
