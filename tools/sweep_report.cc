// Sweep results: the metrics.jsonl reader, per-point summaries, results.csv / results.md,
// and the gnuplot charts.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>

#include <unistd.h>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/strip.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "rmoe/data/subprocess.h"
#include "tools/sweep_json.h"
#include "tools/sweep_lib.h"

namespace rmoe::sweep {
namespace {

namespace fs = std::filesystem;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Keeps records ordered by step: a record at or before the last one (a run resumed from an
// earlier checkpoint re-logs those steps) replaces everything from its step on.
template <typename Record>
void AppendByStep(std::vector<Record>* records, Record record) {
  if (!records->empty() && record.step <= records->back().step) {
    records->erase(std::remove_if(records->begin(), records->end(),
                                  [&](const Record& r) { return r.step >= record.step; }),
                   records->end());
  }
  records->push_back(std::move(record));
}

// ---------------------------------------------------------------------------------------
// Formatting.

std::string Num(double value, const char* format = "%.6g") {
  return std::isfinite(value) ? absl::StrFormat(format, value) : "";
}
std::string Count(int64_t value) { return value >= 0 ? absl::StrCat(value) : ""; }

std::string CsvField(const std::string& text) {
  if (text.find_first_of(",\"\n") == std::string::npos) return text;
  return absl::StrCat("\"", absl::StrReplaceAll(text, {{"\"", "\"\""}}), "\"");
}
std::string MdCell(const std::string& text) {
  return text.empty() ? "-" : absl::StrReplaceAll(text, {{"|", "\\|"}});
}
std::string Millions(int64_t count) {
  return count >= 0 ? absl::StrFormat("%.3fM", count / 1e6) : "";
}
std::string MeanStd(const std::vector<double>& values, const char* format) {
  auto [mean, std] = MeanAndStd(values);
  if (!std::isfinite(mean)) return "";
  std::string out = absl::StrFormat(format, mean);
  if (std::isfinite(std)) absl::StrAppend(&out, " ± ", absl::StrFormat(format, std));
  return out;
}
std::string GnuplotString(const std::string& text) {
  return absl::StrCat("\"", absl::StrReplaceAll(text, {{"\\", "\\\\"}, {"\"", "\\\""}}), "\"");
}

// Indices of the axes that set the ranks pseudo-field (directly or linked).
std::vector<bool> RanksAxes(const Sweep& sweep) {
  std::vector<bool> out;
  for (const Axis& axis : sweep.spec.axes()) {
    bool ranks = axis.field() == kRanksField;
    for (const LinkedField& linked : axis.linked()) ranks = ranks || linked.field() == kRanksField;
    out.push_back(ranks);
  }
  return out;
}

// The point's axis values except the ranks axes: the scaling chart's series.
std::string SeriesKey(const Point& point, const std::vector<bool>& ranks_axes) {
  std::vector<std::string> parts;
  for (size_t a = 0; a < point.axis_values.size(); ++a) {
    if (!ranks_axes[a]) parts.push_back(absl::StrCat(point.axis_values[a].first, "=", point.axis_values[a].second));
  }
  return parts.empty() ? "all" : absl::StrJoin(parts, ", ");
}

struct ScalingRow {
  std::string series;
  int ranks;
  double tokens_per_s, efficiency;
};

// Mean tokens/s of the finished points per (series, ranks), and the parallel efficiency
// tokens/s / (ranks / r0 * tokens/s at r0), r0 the series' smallest rank count.
std::vector<ScalingRow> Scaling(const Sweep& sweep, const std::vector<PointResult>& results) {
  const std::vector<bool> ranks_axes = RanksAxes(sweep);
  std::vector<std::string> order;
  std::map<std::string, std::map<int, std::vector<double>>> values;
  for (size_t i = 0; i < sweep.points.size(); ++i) {
    if (results[i].status != "done" || !std::isfinite(results[i].tokens_per_s)) continue;
    const std::string key = SeriesKey(sweep.points[i], ranks_axes);
    if (!values.count(key)) order.push_back(key);
    values[key][sweep.points[i].ranks].push_back(results[i].tokens_per_s);
  }
  std::vector<ScalingRow> rows;
  for (const std::string& key : order) {
    const auto& by_ranks = values[key];
    const int r0 = by_ranks.begin()->first;
    const double t0 = MeanAndStd(by_ranks.begin()->second).first;
    for (const auto& [ranks, tps] : by_ranks) {
      const double mean = MeanAndStd(tps).first;
      rows.push_back({key, ranks, mean, mean / (t0 * ranks / r0)});
    }
  }
  return rows;
}

absl::Status WriteFile(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::trunc);
  out << text;
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

std::string FindOnPath(const std::string& name) {
  const char* path = std::getenv("PATH");
  if (path == nullptr) return "";
  for (absl::string_view dir : absl::StrSplit(path, ':')) {
    if (dir.empty()) continue;
    const fs::path candidate = fs::path(std::string(dir)) / name;
    std::error_code ec;
    if (fs::is_regular_file(candidate, ec) && access(candidate.c_str(), X_OK) == 0) return candidate.string();
  }
  return "";
}

constexpr char kPngTerminal[] =
    "if (strstrt(GPVAL_TERMINALS, \"pngcairo\") > 0) {\n"
    "  set terminal pngcairo size %d,%d noenhanced font \",10\"\n"
    "} else {\n"
    "  set terminal png size %d,%d noenhanced\n"
    "}\n";

}  // namespace

PointResult::PointResult()
    : status("not run"),
      final_train_loss(kNaN), final_val_loss(kNaN), best_val_loss(kNaN), tokens_per_s(kNaN),
      step_s(kNaN), comm_s(kNaN), compute_s(kNaN), compute_share(kNaN), router_entropy(kNaN),
      expert_load_cv(kNaN), dropped_fraction(kNaN), router_share(kNaN), val_load_cv(kNaN),
      layer_mutual_information(kNaN), layer_predictability(kNaN) {}

RunMetrics ParseMetrics(absl::string_view text) {
  RunMetrics metrics;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    line = absl::StripAsciiWhitespace(line);
    if (line.empty()) continue;
    Json record;
    if (!ParseJson(line, &record) || record.type != Json::kObject) {
      ++metrics.bad_lines;
      continue;
    }
    const Json* type = record.Get("type");
    if (type == nullptr || type->type != Json::kString) continue;
    const double step = record.Number("step");
    if (!std::isfinite(step)) {
      ++metrics.bad_lines;
      continue;
    }
    if (type->string == "train") {
      TrainRecord r;
      r.step = static_cast<int64_t>(step);
      r.lr = record.Number("lr");
      r.loss = record.Number("loss");
      r.router_loss = record.Number("router_loss");
      r.grad_norm = record.Number("grad_norm");
      r.tokens_per_s = record.Number("tokens_per_s");
      r.step_s = record.Number("step_s");
      r.comm_s = record.Number("comm_s");
      r.tokens = record.Number("tokens");
      r.elapsed_s = record.Number("elapsed_s");
      r.forward_s = record.Number("forward_s");
      r.router_s = record.Number("router_s");
      if (const Json* moe = record.Get("moe"); moe != nullptr && moe->type == Json::kArray) {
        for (const Json& layer : moe->array) {
          if (layer.type != Json::kObject) continue;
          MoELayerRecord m;
          const double index = layer.Number("layer");
          m.layer = std::isfinite(index) ? static_cast<int>(index) : -1;
          if (const Json* t = layer.Get("tokens_per_expert"); t != nullptr && t->type == Json::kArray) {
            for (const Json& v : t->array) m.tokens_per_expert.push_back(v.type == Json::kNumber ? v.number : kNaN);
          }
          m.dropped = layer.Number("dropped");
          m.assignments = layer.Number("assignments");
          m.router_entropy = layer.Number("router_entropy");
          m.load_balance_loss = layer.Number("load_balance_loss");
          m.z_loss = layer.Number("z_loss");
          r.moe.push_back(std::move(m));
        }
      }
      AppendByStep(&metrics.train, std::move(r));
    } else if (type->string == "eval") {
      EvalRecord r;
      r.step = static_cast<int64_t>(step);
      r.val_loss = record.Number("val_loss");
      r.val_ppl = record.Number("val_ppl");
      if (const Json* routing = record.Get("routing"); routing != nullptr && routing->type == Json::kObject) {
        RoutingRecord rr;
        auto collect = [&](const char* list, const char* field, std::vector<double>* out) {
          const Json* items = routing->Get(list);
          if (items == nullptr || items->type != Json::kArray) return;
          for (const Json& item : items->array) {
            if (item.type == Json::kObject) out->push_back(item.Number(field));
          }
        };
        collect("layers", "load_cv", &rr.load_cv);
        collect("layers", "entropy", &rr.entropy);
        collect("transitions", "mutual_information", &rr.mutual_information);
        collect("transitions", "predictability", &rr.predictability);
        r.routing = std::move(rr);
      }
      AppendByStep(&metrics.eval, std::move(r));
    }
  }
  return metrics;
}

absl::StatusOr<RunMetrics> ReadMetricsFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("no metrics file ", path));
  std::stringstream text;
  text << in.rdbuf();
  return ParseMetrics(text.str());
}

std::optional<ParameterCounts> ParseParameterCounts(absl::string_view output) {
  for (absl::string_view line : absl::StrSplit(output, '\n')) {
    if (!absl::ConsumePrefix(&line, "# parameters:")) continue;
    // " T total, A active per token, E in experts"
    std::vector<absl::string_view> parts = absl::StrSplit(line, ',');
    if (parts.size() < 2) return std::nullopt;
    ParameterCounts counts;
    auto first_number = [](absl::string_view part, int64_t* value) {
      part = absl::StripAsciiWhitespace(part);
      return absl::SimpleAtoi(part.substr(0, part.find(' ')), value);
    };
    if (!first_number(parts[0], &counts.total) || !first_number(parts[1], &counts.active)) return std::nullopt;
    if (parts.size() > 2 && !first_number(parts[2], &counts.expert)) counts.expert = -1;
    return counts;
  }
  return std::nullopt;
}

std::pair<double, double> MeanAndStd(const std::vector<double>& values) {
  double sum = 0;
  int n = 0;
  for (double v : values) {
    if (std::isfinite(v)) { sum += v; ++n; }
  }
  if (n == 0) return {kNaN, kNaN};
  const double mean = sum / n;
  if (n < 2) return {mean, kNaN};
  double squares = 0;
  for (double v : values) {
    if (std::isfinite(v)) squares += (v - mean) * (v - mean);
  }
  return {mean, std::sqrt(squares / (n - 1))};
}

PointResult SummarizeMetrics(const RunMetrics& metrics) {
  PointResult result;
  if (!metrics.train.empty()) {
    const TrainRecord& last = metrics.train.back();
    result.steps = last.step;
    result.final_train_loss = last.loss;
    // The first record includes start-up (allocation, first-touch); leave it out when
    // there is anything else.
    const size_t first = metrics.train.size() > 1 ? 1 : 0;
    std::vector<double> tps, step, comm, forward, router;
    for (size_t i = first; i < metrics.train.size(); ++i) {
      tps.push_back(metrics.train[i].tokens_per_s);
      step.push_back(metrics.train[i].step_s);
      comm.push_back(metrics.train[i].comm_s);
      forward.push_back(metrics.train[i].forward_s);
      router.push_back(metrics.train[i].router_s);
    }
    const double forward_s = MeanAndStd(forward).first;
    result.router_share = forward_s > 0 ? MeanAndStd(router).first / forward_s : kNaN;
    result.tokens_per_s = MeanAndStd(tps).first;
    result.step_s = MeanAndStd(step).first;
    result.comm_s = MeanAndStd(comm).first;
    result.compute_s = result.step_s - result.comm_s;
    result.compute_share = result.step_s > 0 ? result.compute_s / result.step_s : kNaN;

    std::vector<double> entropy, cv;
    double dropped = 0, assignments = 0;
    for (const MoELayerRecord& layer : last.moe) {
      entropy.push_back(layer.router_entropy);
      // Population std over the experts (they are all of them), over their mean.
      const auto& t = layer.tokens_per_expert;
      if (!t.empty()) {
        double mean = 0;
        for (double v : t) mean += v;
        mean /= t.size();
        double var = 0;
        for (double v : t) var += (v - mean) * (v - mean);
        var /= t.size();
        cv.push_back(mean > 0 ? std::sqrt(var) / mean : kNaN);
      }
      if (std::isfinite(layer.dropped)) dropped += layer.dropped;
      if (std::isfinite(layer.assignments)) assignments += layer.assignments;
    }
    result.router_entropy = MeanAndStd(entropy).first;
    result.expert_load_cv = MeanAndStd(cv).first;
    result.dropped_fraction = assignments > 0 ? dropped / assignments : kNaN;
  }
  if (!metrics.eval.empty()) {
    result.final_val_loss = metrics.eval.back().val_loss;
    for (const EvalRecord& e : metrics.eval) {
      if (std::isfinite(e.val_loss) && !(e.val_loss >= result.best_val_loss)) result.best_val_loss = e.val_loss;
    }
    for (auto e = metrics.eval.rbegin(); e != metrics.eval.rend(); ++e) {
      if (!e->routing) continue;
      result.val_load_cv = MeanAndStd(e->routing->load_cv).first;
      result.layer_mutual_information = MeanAndStd(e->routing->mutual_information).first;
      result.layer_predictability = MeanAndStd(e->routing->predictability).first;
      break;
    }
  }
  return result;
}

namespace {

const char* const kMetricColumns[] = {
    "status", "steps", "final_train_loss", "final_val_loss", "best_val_loss", "tokens_per_s",
    "step_s", "comm_s", "compute_s", "compute_share", "params_total", "params_active",
    "params_experts", "router_entropy", "expert_load_cv", "dropped_fraction", "router_share",
    "val_load_cv", "layer_mutual_information", "layer_predictability"};

// Axis columns: the label of every axis but those of the ranks pseudo-field (the ranks
// column shows it); a label that clashes with a fixed column gets "_axis" appended.
std::vector<std::pair<size_t, std::string>> AxisColumns(const Sweep& sweep) {
  const std::vector<bool> ranks_axes = RanksAxes(sweep);
  std::vector<std::pair<size_t, std::string>> out;
  for (size_t a = 0; a < sweep.axis_labels.size(); ++a) {
    if (ranks_axes[a] && sweep.spec.axes(a).field() == kRanksField && sweep.spec.axes(a).value_names_size() == 0) continue;
    std::string name = sweep.axis_labels[a];
    bool clash = name == "point" || name == "name" || name == "seed" || name == "ranks";
    for (const char* c : kMetricColumns) clash = clash || name == c;
    out.emplace_back(a, clash ? name + "_axis" : name);
  }
  return out;
}

}  // namespace

std::vector<std::string> ResultColumns(const Sweep& sweep) {
  std::vector<std::string> columns = {"point", "name"};
  for (const auto& [a, name] : AxisColumns(sweep)) columns.push_back(name);
  columns.push_back("seed");
  columns.push_back("ranks");
  for (const char* c : kMetricColumns) columns.push_back(c);
  return columns;
}

std::string ResultsCsv(const Sweep& sweep, const std::vector<PointResult>& results) {
  std::vector<std::string> header;
  for (const auto& c : ResultColumns(sweep)) header.push_back(CsvField(c));
  std::string out = absl::StrJoin(header, ",") + "\n";
  const auto axis_columns = AxisColumns(sweep);
  for (size_t i = 0; i < sweep.points.size(); ++i) {
    const Point& p = sweep.points[i];
    const PointResult& r = results[i];
    std::vector<std::string> row = {absl::StrCat(p.index), p.name};
    for (const auto& [a, name] : axis_columns) row.push_back(p.axis_values[a].second);
    row.push_back(absl::StrCat(p.seed));
    row.push_back(absl::StrCat(p.ranks));
    row.insert(row.end(), {r.status, absl::StrCat(r.steps), Num(r.final_train_loss),
                           Num(r.final_val_loss), Num(r.best_val_loss), Num(r.tokens_per_s, "%.1f"),
                           Num(r.step_s), Num(r.comm_s), Num(r.compute_s), Num(r.compute_share, "%.4f"),
                           Count(r.parameters.total), Count(r.parameters.active),
                           Count(r.parameters.expert), Num(r.router_entropy),
                           Num(r.expert_load_cv), Num(r.dropped_fraction), Num(r.router_share, "%.4f"),
                           Num(r.val_load_cv), Num(r.layer_mutual_information),
                           Num(r.layer_predictability)});
    for (auto& field : row) field = CsvField(field);
    out += absl::StrJoin(row, ",") + "\n";
  }
  return out;
}

std::string ResultsMarkdown(const Sweep& sweep, const std::vector<PointResult>& results) {
  const auto axis_columns = AxisColumns(sweep);
  std::string out = absl::StrCat("# Sweep ", sweep.spec.name(), "\n\nBase job: `", sweep.base_source,
                                 "`; ", sweep.points.size(), " points (",
                                 sweep.spec.combination() == SweepSpec::ZIP ? "zip" : "grid", " of ",
                                 sweep.spec.axes_size(), " axes x ", sweep.spec.repeats(),
                                 " seeds). Losses in nats/token; tokens/s and step times are means "
                                 "over the logged records after the first; router entropy and dropped "
                                 "% are the last training record's; router % is the routers' share of "
                                 "the forward pass; val load CV, layer MI (nats) and predictability "
                                 "(MI / entropy of the next layer's top-1 expert) come from the last "
                                 "evaluation's routing of the validation set, averaged over MoE "
                                 "layers or consecutive layer pairs.\n\n");
  // Per point.
  std::vector<std::string> head = {"#"};
  for (const auto& [a, name] : axis_columns) head.push_back(name);
  head.insert(head.end(), {"seed", "ranks", "status", "final val", "best val", "tokens/s",
                           "step s", "comm %", "router %", "params (active)", "router entropy",
                           "val load CV", "layer MI", "predictability", "dropped %"});
  auto row_line = [](const std::vector<std::string>& cells) {
    std::vector<std::string> shown;
    for (const auto& c : cells) shown.push_back(MdCell(c));
    return "| " + absl::StrJoin(shown, " | ") + " |\n";
  };
  auto rule = [](size_t n) {
    std::string line = "|";
    for (size_t i = 0; i < n; ++i) line += "---|";
    return line + "\n";
  };
  out += "## Points\n\n" + row_line(head) + rule(head.size());
  for (size_t i = 0; i < sweep.points.size(); ++i) {
    const Point& p = sweep.points[i];
    const PointResult& r = results[i];
    std::vector<std::string> cells = {absl::StrCat(p.index)};
    for (const auto& [a, name] : axis_columns) cells.push_back(p.axis_values[a].second);
    const std::string params =
        r.parameters.total >= 0
            ? absl::StrCat(Millions(r.parameters.total), " (", Millions(r.parameters.active), ")")
            : "";
    cells.insert(cells.end(),
                 {absl::StrCat(p.seed), absl::StrCat(p.ranks), r.status, Num(r.final_val_loss, "%.4f"),
                  Num(r.best_val_loss, "%.4f"), Num(r.tokens_per_s, "%.0f"), Num(r.step_s, "%.4f"),
                  Num(100 * (1 - r.compute_share), "%.1f"), Num(100 * r.router_share, "%.1f"), params,
                  Num(r.router_entropy, "%.4f"), Num(r.val_load_cv, "%.4f"),
                  Num(r.layer_mutual_information, "%.4f"), Num(r.layer_predictability, "%.4f"),
                  Num(100 * r.dropped_fraction, "%.2f")});
    out += row_line(cells);
  }

  // Per configuration, over seeds (finished points only).
  std::vector<std::string> order;
  std::map<std::string, std::vector<size_t>> groups;
  for (size_t i = 0; i < sweep.points.size(); ++i) {
    const std::string& key = sweep.points[i].config_key;
    if (!groups.count(key)) order.push_back(key);
    if (results[i].status == "done") groups[key].push_back(i);
  }
  std::vector<std::string> summary_head = {"configuration", "runs", "final val", "best val",
                                           "tokens/s", "step s", "comm %", "router %",
                                           "params (active)", "router entropy", "val load CV",
                                           "layer MI", "predictability", "dropped %"};
  out += "\n## Per configuration (mean ± sample std over seeds, finished points)\n\n" +
         row_line(summary_head) + rule(summary_head.size());
  for (const std::string& key : order) {
    std::vector<double> fv, bv, tps, step, comm, router, ent, cv, mi, pred, drop;
    ParameterCounts params;
    for (size_t i : groups[key]) {
      const PointResult& r = results[i];
      fv.push_back(r.final_val_loss);
      bv.push_back(r.best_val_loss);
      tps.push_back(r.tokens_per_s);
      step.push_back(r.step_s);
      comm.push_back(100 * (1 - r.compute_share));
      router.push_back(100 * r.router_share);
      ent.push_back(r.router_entropy);
      cv.push_back(r.val_load_cv);
      mi.push_back(r.layer_mutual_information);
      pred.push_back(r.layer_predictability);
      drop.push_back(100 * r.dropped_fraction);
      if (r.parameters.total >= 0) params = r.parameters;
    }
    out += row_line({key.empty() ? "(base)" : key, absl::StrCat(groups[key].size()),
                     MeanStd(fv, "%.4f"), MeanStd(bv, "%.4f"), MeanStd(tps, "%.0f"),
                     MeanStd(step, "%.4f"), MeanStd(comm, "%.1f"), MeanStd(router, "%.1f"),
                     params.total >= 0 ? absl::StrCat(Millions(params.total), " (", Millions(params.active), ")") : "",
                     MeanStd(ent, "%.4f"), MeanStd(cv, "%.4f"), MeanStd(mi, "%.4f"),
                     MeanStd(pred, "%.4f"), MeanStd(drop, "%.2f")});
  }

  if (sweep.ranks_is_axis) {
    out += "\n## Scaling (mean tokens/s over seeds; efficiency = tokens/s / (ranks / r0 x "
           "tokens/s at the smallest rank count r0))\n\n";
    out += row_line({"series", "ranks", "tokens/s", "efficiency"}) + rule(4);
    for (const ScalingRow& row : Scaling(sweep, results)) {
      out += row_line({row.series, absl::StrCat(row.ranks), Num(row.tokens_per_s, "%.0f"),
                       Num(row.efficiency, "%.3f")});
    }
  }
  return out;
}

std::vector<std::string> WritePlots(const Sweep& sweep, const std::vector<PointResult>& results,
                                    const std::vector<RunMetrics>& metrics, const std::string& dir,
                                    FILE* log) {
  std::vector<std::string> scripts;
  // Loss curves: one block of train losses and one of validation losses per point.
  std::string dat = "# rmoe_sweep loss curves: blocks (gnuplot index) of step and loss\n";
  std::vector<std::string> clauses;
  int index = 0;
  for (size_t i = 0; i < sweep.points.size() && i < metrics.size(); ++i) {
    const Point& p = sweep.points[i];
    const int color = static_cast<int>(i) + 1;
    if (!metrics[i].train.empty()) {
      absl::StrAppend(&dat, "# point ", p.index, " (", p.description, "): train loss\n");
      for (const TrainRecord& r : metrics[i].train) absl::StrAppend(&dat, r.step, " ", Num(r.loss, "%.6g"), "\n");
      dat += "\n\n";
      clauses.push_back(absl::StrFormat("\"loss_curves.dat\" index %d using 1:2 with lines lw 2 lc %d title %s",
                                        index++, color, GnuplotString(p.description)));
    }
    if (!metrics[i].eval.empty()) {
      absl::StrAppend(&dat, "# point ", p.index, " (", p.description, "): validation loss\n");
      for (const EvalRecord& r : metrics[i].eval) absl::StrAppend(&dat, r.step, " ", Num(r.val_loss, "%.6g"), "\n");
      dat += "\n\n";
      clauses.push_back(absl::StrFormat(
          "\"loss_curves.dat\" index %d using 1:2 with points pt 7 ps 1.3 lc %d notitle", index++, color));
    }
  }
  if (!clauses.empty()) {
    std::string gp = absl::StrCat(
        "# rmoe_sweep: training loss (lines) and validation loss (dots) of every point.\n",
        absl::StrFormat(kPngTerminal, 1400, 800, 1400, 800), "set output \"loss_curves.png\"\n",
        "set title ", GnuplotString(absl::StrCat("sweep ", sweep.spec.name(), ": loss (lines: train, dots: validation)")), "\n",
        "set xlabel \"step\"\nset ylabel \"loss (nats/token)\"\nset grid\nset key outside right top\n",
        "plot ", absl::StrJoin(clauses, ", \\\n     "), "\n");
    if (WriteFile((fs::path(dir) / "loss_curves.dat").string(), dat).ok() &&
        WriteFile((fs::path(dir) / "loss_curves.gp").string(), gp).ok()) {
      scripts.push_back("loss_curves");
    }
  }

  // Validation loss per configuration: mean over its seeds at each evaluation, with the
  // sample std as error bars; the chart that answers "which configuration is better".
  {
    std::vector<std::string> order;
    std::map<std::string, std::map<int64_t, std::vector<double>>> by_config;
    for (size_t i = 0; i < sweep.points.size() && i < metrics.size(); ++i) {
      const std::string& key = sweep.points[i].config_key;
      if (metrics[i].eval.empty()) continue;
      if (!by_config.count(key)) order.push_back(key);
      for (const EvalRecord& e : metrics[i].eval) by_config[key][e.step].push_back(e.val_loss);
    }
    std::string vdat = "# rmoe_sweep validation loss per configuration: step, mean, std, runs\n";
    std::vector<std::string> vclauses;
    int64_t last_step = 0;
    for (const auto& [key, steps] : by_config) last_step = std::max(last_step, steps.rbegin()->first);
    for (size_t c = 0; c < order.size(); ++c) {
      absl::StrAppend(&vdat, "# ", order[c].empty() ? "(base)" : order[c], "\n");
      for (const auto& [step, losses] : by_config[order[c]]) {
        const auto [mean, std] = MeanAndStd(losses);
        absl::StrAppend(&vdat, step, " ", Num(mean, "%.6g"), " ", std::isfinite(std) ? Num(std, "%.6g") : "0",
                        " ", losses.size(), "\n");
      }
      vdat += "\n\n";
      vclauses.push_back(absl::StrFormat(
          "\"val_curves.dat\" index %d using ($1+%d):2:3 with yerrorlines lw 2 pt 7 lc %d title %s",
          c, static_cast<int>(c) * 2, static_cast<int>(c) + 1,
          GnuplotString(order[c].empty() ? "(base)" : order[c])));
    }
    if (!vclauses.empty()) {
      std::string gp = absl::StrCat(
          "# rmoe_sweep: validation loss per configuration, mean and sample std over seeds (x\n"
          "# offset by 2 steps per configuration so the error bars do not overlap); the right\n"
          "# panel zooms on the second half, where configurations usually separate.\n",
          absl::StrFormat(kPngTerminal, 1500, 650, 1500, 650), "set output \"val_curves.png\"\n",
          "set multiplot layout 1,2 title ", GnuplotString(absl::StrCat("sweep ", sweep.spec.name(), ": validation loss, mean ± std over seeds")), "\n",
          "set xlabel \"step\"\nset ylabel \"validation loss (nats/token)\"\nset grid\nset key top right\n",
          absl::StrFormat("set title \"all evaluations\"\nset xrange [*:%d]\n",
                          last_step + 2 * static_cast<int>(order.size()) + 10),
          "plot ", absl::StrJoin(vclauses, ", \\\n     "), "\n",
          absl::StrFormat("set title \"second half (zoomed)\"\nset xrange [%d:%d]\n", last_step / 2 - 10,
                          last_step + 2 * static_cast<int>(order.size()) + 10),
          "plot ", absl::StrJoin(vclauses, ", \\\n     "), "\nunset multiplot\n");
      if (WriteFile((fs::path(dir) / "val_curves.dat").string(), vdat).ok() &&
          WriteFile((fs::path(dir) / "val_curves.gp").string(), gp).ok()) {
        scripts.push_back("val_curves");
      }
    }
  }

  // Scaling: tokens/s and efficiency against ranks, a line per series.
  if (sweep.ranks_is_axis) {
    const std::vector<ScalingRow> rows = Scaling(sweep, results);
    if (!rows.empty()) {
      std::string sdat = "# rmoe_sweep scaling: blocks (gnuplot index) of ranks, tokens/s, efficiency\n";
      std::vector<std::string> tps_clauses, eff_clauses;
      int block = -1;
      std::string series;
      for (const ScalingRow& row : rows) {
        if (block < 0 || row.series != series) {
          if (block >= 0) sdat += "\n\n";
          series = row.series;
          ++block;
          absl::StrAppend(&sdat, "# ", series, "\n");
          tps_clauses.push_back(absl::StrFormat(
              "\"scaling.dat\" index %d using 1:2 with linespoints lw 2 pt 7 lc %d title %s", block,
              block + 1, GnuplotString(series)));
          eff_clauses.push_back(absl::StrFormat(
              "\"scaling.dat\" index %d using 1:3 with linespoints lw 2 pt 7 lc %d title %s", block,
              block + 1, GnuplotString(series)));
        }
        absl::StrAppend(&sdat, row.ranks, " ", Num(row.tokens_per_s, "%.6g"), " ", Num(row.efficiency, "%.6g"), "\n");
      }
      int min_ranks = rows.front().ranks, max_ranks = rows.front().ranks;
      for (const ScalingRow& row : rows) {
        min_ranks = std::min(min_ranks, row.ranks);
        max_ranks = std::max(max_ranks, row.ranks);
      }
      std::string gp = absl::StrCat(
          "# rmoe_sweep: throughput and parallel efficiency against the number of ranks.\n",
          absl::StrFormat(kPngTerminal, 1400, 600, 1400, 600), "set output \"scaling.png\"\n",
          "set multiplot layout 1,2 title ", GnuplotString(absl::StrCat("sweep ", sweep.spec.name(), ": scaling")), "\n",
          "set grid\nset key top right\nset xlabel \"ranks\"\nset xtics 1\n",
          absl::StrFormat("set xrange [%g:%g]\n", min_ranks - 0.5, max_ranks + 0.5),
          "set ylabel \"tokens/s\"\nset yrange [0:*]\nplot ", absl::StrJoin(tps_clauses, ", \\\n     "), "\n",
          "set ylabel \"efficiency (tokens/s / (ranks/r0 x tokens/s at r0))\"\nset yrange [0:1.2]\n",
          "plot ", absl::StrJoin(eff_clauses, ", \\\n     "), ", 1 with lines dt 2 lc rgb \"gray\" title \"ideal\"\n",
          "unset multiplot\n");
      if (WriteFile((fs::path(dir) / "scaling.dat").string(), sdat).ok() &&
          WriteFile((fs::path(dir) / "scaling.gp").string(), gp).ok()) {
        scripts.push_back("scaling");
      }
    }
  }

  std::vector<std::string> drawn;
  if (scripts.empty()) return drawn;
  const std::string gnuplot = FindOnPath("gnuplot");
  if (gnuplot.empty()) {
    std::fprintf(log,
                 "rmoe_sweep: warning: gnuplot not found, no PNG charts (install gnuplot-nox, "
                 "then rmoe_sweep --report); the .gp scripts and .dat files are in %s\n",
                 dir.c_str());
    return drawn;
  }
  const std::string absolute_dir = fs::absolute(dir).string();
  for (const std::string& name : scripts) {
    auto run = RunSubprocess({gnuplot, "-e", absl::StrCat("cd ", GnuplotString(absolute_dir)), name + ".gp"}, "");
    const std::string png = (fs::path(dir) / (name + ".png")).string();
    if (!run.ok() || run->exit_status != 0) {
      std::fprintf(log, "rmoe_sweep: warning: gnuplot failed on %s.gp: %s\n", name.c_str(),
                   run.ok() ? run->stderr_data.c_str() : std::string(run.status().message()).c_str());
      continue;
    }
    drawn.push_back(png);
  }
  return drawn;
}

}  // namespace rmoe::sweep
