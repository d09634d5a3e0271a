// Sweep results: results.csv, results.md and the gnuplot charts.
#include "tools/sweep/report.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>

#include <absl/strings/ascii.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>
#include <absl/strings/str_join.h>
#include <absl/strings/str_replace.h>
#include <absl/strings/str_split.h>
#include "rmoe/data/subprocess.h"
#include "rmoe/util/files.h"

namespace rmoe::sweep {
namespace {

namespace fs = std::filesystem;

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
// How the series-th curve of a chart is drawn. gnuplot's default colours repeat after 8, so
// each further round of 8 gets another dash type and point shape: no two of the first 32
// curves look alike.
std::string SeriesStyle(int series) {
  static constexpr int kPointTypes[] = {7, 5, 9, 11};
  const int round = series / 8;
  return absl::StrFormat("lc %d dt %d pt %d", series % 8 + 1, round % 4 + 1, kPointTypes[round % 4]);
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

constexpr char kPngTerminal[] =
    "if (strstrt(GPVAL_TERMINALS, \"pngcairo\") > 0) {\n"
    "  set terminal pngcairo size %d,%d noenhanced font \",10\"\n"
    "} else {\n"
    "  set terminal png size %d,%d noenhanced\n"
    "}\n";

}  // namespace

namespace {

const char* const kMetricColumns[] = {
    "status", "steps", "final_train_loss", "final_val_loss", "best_val_loss", "tokens_per_s",
    "step_s", "comm_s", "compute_s", "compute_share", "params_total", "params_active",
    "params_experts", "router_entropy", "expert_load_cv", "dropped_fraction", "router_share",
    "val_load_cv", "layer_mutual_information", "layer_predictability", "layer_effective_pairs"};

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
                           Num(r.layer_predictability), Num(r.layer_effective_pairs, "%.2f")});
    for (auto& field : row) field = CsvField(field);
    out += absl::StrJoin(row, ",") + "\n";
  }
  return out;
}

namespace {

std::string MarkdownRow(const std::vector<std::string>& cells) {
  std::vector<std::string> shown;
  for (const auto& c : cells) shown.push_back(MdCell(c));
  return "| " + absl::StrJoin(shown, " | ") + " |\n";
}

std::string MarkdownRule(size_t columns) {
  std::string line = "|";
  for (size_t i = 0; i < columns; ++i) line += "---|";
  return line + "\n";
}

// One row per point: its axis values, status and measurements.
std::string PointsTable(const Sweep& sweep, const std::vector<PointResult>& results) {
  const auto axis_columns = AxisColumns(sweep);
  std::string out;
  std::vector<std::string> head = {"#"};
  for (const auto& [a, name] : axis_columns) head.push_back(name);
  head.insert(head.end(), {"seed", "ranks", "status", "final val", "best val", "tokens/s",
                           "step s", "comm %", "router %", "params (active)", "router entropy",
                           "val load CV", "layer MI", "predictability", "expert pairs", "dropped %"});
  out += "## Points\n\n" + MarkdownRow(head) + MarkdownRule(head.size());
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
                  Num(r.layer_effective_pairs, "%.1f"), Num(100 * r.dropped_fraction, "%.2f")});
    out += MarkdownRow(cells);
  }

  return out;
}

// The points of one configuration (they differ only by seed).
struct ConfigurationGroup {
  const Point* first;            // its first point: config_key and axis values
  std::vector<size_t> finished;  // indices of its finished points
};

// The configurations in the order of their first points, each listed once even when none
// of its points has finished.
std::vector<ConfigurationGroup> GroupConfigurations(const Sweep& sweep,
                                                    const std::vector<PointResult>& results) {
  std::vector<ConfigurationGroup> groups;
  std::map<std::string, size_t> index_of;
  for (size_t i = 0; i < sweep.points.size(); ++i) {
    const Point& point = sweep.points[i];
    const auto [it, added] = index_of.emplace(point.config_key, groups.size());
    if (added) groups.push_back({&point, {}});
    if (results[i].status == "done") groups[it->second].finished.push_back(i);
  }
  return groups;
}

std::vector<double> FinalValLosses(const ConfigurationGroup& group, const std::vector<PointResult>& results) {
  std::vector<double> losses;
  for (size_t i : group.finished) losses.push_back(results[i].final_val_loss);
  return losses;
}

// One row per configuration: means and sample standard deviations over its finished seeds.
std::string ConfigurationTable(const Sweep& sweep, const std::vector<PointResult>& results) {
  std::string out;
  std::vector<std::string> summary_head = {"configuration", "runs", "final val", "best val",
                                           "tokens/s", "step s", "comm %", "router %",
                                           "params (active)", "router entropy", "val load CV",
                                           "layer MI", "predictability", "expert pairs", "dropped %"};
  out += "\n## Per configuration (mean ± sample std over seeds, finished points)\n\n" +
         MarkdownRow(summary_head) + MarkdownRule(summary_head.size());
  for (const ConfigurationGroup& group : GroupConfigurations(sweep, results)) {
    std::vector<double> fv, bv, tps, step, comm, router, ent, cv, mi, pred, pairs, drop;
    ParameterCounts params;
    for (size_t i : group.finished) {
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
      pairs.push_back(r.layer_effective_pairs);
      drop.push_back(100 * r.dropped_fraction);
      if (r.parameters.total >= 0) params = r.parameters;
    }
    const std::string& key = group.first->config_key;
    out += MarkdownRow({key.empty() ? "(base)" : key, absl::StrCat(group.finished.size()),
                     MeanStd(fv, "%.4f"), MeanStd(bv, "%.4f"), MeanStd(tps, "%.0f"),
                     MeanStd(step, "%.4f"), MeanStd(comm, "%.1f"), MeanStd(router, "%.1f"),
                     params.total >= 0 ? absl::StrCat(Millions(params.total), " (", Millions(params.active), ")") : "",
                     MeanStd(ent, "%.4f"), MeanStd(cv, "%.4f"), MeanStd(mi, "%.4f"),
                     MeanStd(pred, "%.4f"), MeanStd(pairs, "%.1f"), MeanStd(drop, "%.2f")});
  }

  return out;
}

// Every configuration against its baseline: the one with the first value of the first axis
// that is not the ranks pseudo-field and the same values on every other axis. The final
// validation losses of their finished seeds are compared by Welch's t test, and the
// difference is set against the seed spread (the larger sample std of the two).
std::string ComparisonTable(const Sweep& sweep, const std::vector<PointResult>& results) {
  const std::vector<bool> ranks_axes = RanksAxes(sweep);
  size_t axis = 0;
  while (axis < ranks_axes.size() && ranks_axes[axis]) ++axis;
  if (sweep.spec.repeats() < 2 || axis == ranks_axes.size() || sweep.spec.axes(axis).values_size() < 2) return "";
  const auto value_of = [&](const Point& p) { return p.axis_values[axis].second; };
  const std::string baseline_value = value_of(sweep.points.front());
  // The other axes' values identify the baseline a configuration is compared with.
  const auto context_of = [&](const Point& p) {
    std::vector<std::string> parts;
    for (size_t a = 0; a < p.axis_values.size(); ++a) {
      if (a != axis) parts.push_back(absl::StrCat(p.axis_values[a].first, "=", p.axis_values[a].second));
    }
    return absl::StrJoin(parts, ", ");
  };
  const std::vector<ConfigurationGroup> groups = GroupConfigurations(sweep, results);
  std::map<std::string, const ConfigurationGroup*> baseline_of;
  for (const ConfigurationGroup& group : groups) {
    if (value_of(*group.first) == baseline_value) baseline_of[context_of(*group.first)] = &group;
  }
  std::string out = absl::StrCat(
      "\n## Against ", sweep.axis_labels[axis], "=", baseline_value,
      " (final validation loss; difference of the means, negative = lower loss than the "
      "baseline; spread = the larger seed std of the two; Welch's t test, two-sided p)\n\n");
  const std::vector<std::string> head = {"configuration", "baseline", "difference", "spread",
                                         "|difference| > 2 spread", "t", "dof", "p"};
  out += MarkdownRow(head) + MarkdownRule(head.size());
  for (const ConfigurationGroup& group : groups) {
    if (value_of(*group.first) == baseline_value) continue;
    const auto base = baseline_of.find(context_of(*group.first));
    if (base == baseline_of.end()) continue;
    const std::vector<double> a = FinalValLosses(group, results);
    const std::vector<double> b = FinalValLosses(*base->second, results);
    const WelchResult welch = WelchTTest(a, b);
    const double spread = std::fmax(MeanAndStd(a).second, MeanAndStd(b).second);  // NaN-ignoring
    const std::string beyond =
        std::isfinite(spread) && std::isfinite(welch.difference) ? (std::abs(welch.difference) > 2 * spread ? "yes" : "no") : "";
    out += MarkdownRow({group.first->config_key, base->second->first->config_key,
                        Num(welch.difference, "%+.4f"), Num(spread, "%.4f"), beyond, Num(welch.t, "%.2f"),
                        Num(welch.dof, "%.1f"), Num(welch.p_two_sided, "%.3f")});
  }
  return out;
}

// Tokens/s and efficiency against the smallest rank count, when ranks is an axis.
std::string ScalingTable(const Sweep& sweep, const std::vector<PointResult>& results) {
  std::string out;
  if (sweep.ranks_is_axis) {
    out += "\n## Scaling (mean tokens/s over seeds; efficiency = tokens/s / (ranks / r0 x "
           "tokens/s at the smallest rank count r0))\n\n";
    out += MarkdownRow({"series", "ranks", "tokens/s", "efficiency"}) + MarkdownRule(4);
    for (const ScalingRow& row : Scaling(sweep, results)) {
      out += MarkdownRow({row.series, absl::StrCat(row.ranks), Num(row.tokens_per_s, "%.0f"),
                       Num(row.efficiency, "%.3f")});
    }
  }
  return out;
}

}  // namespace

std::string ResultsMarkdown(const Sweep& sweep, const std::vector<PointResult>& results) {
  std::string out = absl::StrCat("# Sweep ", sweep.spec.name(), "\n\nBase job: `", sweep.base_source,
                                 "`; ", sweep.points.size(), " points (",
                                 sweep.spec.combination() == SweepSpec::ZIP ? "zip" : "grid", " of ",
                                 sweep.spec.axes_size(), " axes x ", sweep.spec.repeats(),
                                 " seeds). Losses in nats/token; tokens/s and step times are means "
                                 "over the logged records after the first; router entropy and dropped "
                                 "% are the last training record's; router % is the routers' share of "
                                 "the forward pass; val load CV, layer MI (nats) and predictability "
                                 "(MI / entropy of the next layer's top-1 expert) and expert pairs (e to the "
                                 "entropy of consecutive layers' joint top-1 experts: the effective "
                                 "number of routes between them) come from the last "
                                 "evaluation's routing of the validation set, averaged over MoE "
                                 "layers or consecutive layer pairs.\n\n");
  return out + PointsTable(sweep, results) + ConfigurationTable(sweep, results) +
         ComparisonTable(sweep, results) + ScalingTable(sweep, results);
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
    const std::string style = SeriesStyle(static_cast<int>(i));
    if (!metrics[i].train.empty()) {
      absl::StrAppend(&dat, "# point ", p.index, " (", p.description, "): train loss\n");
      for (const TrainRecord& r : metrics[i].train) absl::StrAppend(&dat, r.step, " ", Num(r.loss, "%.6g"), "\n");
      dat += "\n\n";
      clauses.push_back(absl::StrFormat("\"loss_curves.dat\" index %d using 1:2 with lines lw 2 %s title %s",
                                        index++, style, GnuplotString(p.description)));
    }
    if (!metrics[i].eval.empty()) {
      absl::StrAppend(&dat, "# point ", p.index, " (", p.description, "): validation loss\n");
      for (const EvalRecord& r : metrics[i].eval) absl::StrAppend(&dat, r.step, " ", Num(r.val_loss, "%.6g"), "\n");
      dat += "\n\n";
      clauses.push_back(absl::StrFormat(
          "\"loss_curves.dat\" index %d using 1:2 with points ps 1.3 %s notitle", index++, style));
    }
  }
  if (!clauses.empty()) {
    std::string gp = absl::StrCat(
        "# rmoe_sweep: training loss (lines) and validation loss (dots) of every point.\n",
        absl::StrFormat(kPngTerminal, 1400, 800, 1400, 800), "set output \"loss_curves.png\"\n",
        "set title ", GnuplotString(absl::StrCat("sweep ", sweep.spec.name(), ": loss (lines: train, dots: validation)")), "\n",
        "set xlabel \"step\"\nset ylabel \"loss (nats/token)\"\nset grid\nset key outside right top\n",
        "plot ", absl::StrJoin(clauses, ", \\\n     "), "\n");
    if (WriteFileAtomically((fs::path(dir) / "loss_curves.dat").string(), dat).ok() &&
        WriteFileAtomically((fs::path(dir) / "loss_curves.gp").string(), gp).ok()) {
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
          "\"val_curves.dat\" index %d using ($1+%d):2:3 with yerrorlines lw 2 %s title %s",
          c, static_cast<int>(c) * 2, SeriesStyle(static_cast<int>(c)),
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
      if (WriteFileAtomically((fs::path(dir) / "val_curves.dat").string(), vdat).ok() &&
          WriteFileAtomically((fs::path(dir) / "val_curves.gp").string(), gp).ok()) {
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
      if (WriteFileAtomically((fs::path(dir) / "scaling.dat").string(), sdat).ok() &&
          WriteFileAtomically((fs::path(dir) / "scaling.gp").string(), gp).ok()) {
        scripts.push_back("scaling");
      }
    }
  }

  std::vector<std::string> drawn;
  if (scripts.empty()) return drawn;
  const std::string gnuplot = FindExecutable("gnuplot");
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
