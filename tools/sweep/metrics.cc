// The metrics.jsonl reader and the numbers a point's row is made of.
#include "tools/sweep/metrics.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include <absl/strings/numbers.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_split.h>
#include <absl/strings/strip.h>
#include "rmoe/util/files.h"
#include "rmoe/util/json.h"

namespace rmoe::sweep {
namespace {

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

}  // namespace

PointResult::PointResult()
    : status("not run"),
      final_train_loss(kNaN), final_val_loss(kNaN), best_val_loss(kNaN), tokens_per_s(kNaN),
      step_s(kNaN), comm_s(kNaN), compute_s(kNaN), compute_share(kNaN), router_entropy(kNaN),
      expert_load_cv(kNaN), dropped_fraction(kNaN), router_share(kNaN), val_load_cv(kNaN),
      layer_mutual_information(kNaN), layer_predictability(kNaN), layer_effective_pairs(kNaN) {}

RunMetrics ParseMetrics(absl::string_view text) {
  RunMetrics metrics;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    line = absl::StripAsciiWhitespace(line);
    if (line.empty()) continue;
    JsonValue record;
    if (!ParseJson(line, &record) || record.type != JsonValue::kObject) {
      ++metrics.bad_lines;
      continue;
    }
    const JsonValue* type = record.Get("type");
    if (type == nullptr || type->type != JsonValue::kString) continue;
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
      if (const JsonValue* moe = record.Get("moe"); moe != nullptr && moe->type == JsonValue::kArray) {
        for (const JsonValue& layer : moe->array) {
          if (layer.type != JsonValue::kObject) continue;
          MoELayerRecord m;
          const double index = layer.Number("layer");
          m.layer = std::isfinite(index) ? static_cast<int>(index) : -1;
          if (const JsonValue* t = layer.Get("tokens_per_expert"); t != nullptr && t->type == JsonValue::kArray) {
            for (const JsonValue& v : t->array) m.tokens_per_expert.push_back(v.type == JsonValue::kNumber ? v.number : kNaN);
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
      if (const JsonValue* routing = record.Get("routing"); routing != nullptr && routing->type == JsonValue::kObject) {
        RoutingRecord rr;
        auto collect = [&](const char* list, const char* field, std::vector<double>* out) {
          const JsonValue* items = routing->Get(list);
          if (items == nullptr || items->type != JsonValue::kArray) return;
          for (const JsonValue& item : items->array) {
            if (item.type == JsonValue::kObject) out->push_back(item.Number(field));
          }
        };
        collect("layers", "load_cv", &rr.load_cv);
        collect("layers", "entropy", &rr.entropy);
        collect("transitions", "mutual_information", &rr.mutual_information);
        collect("transitions", "predictability", &rr.predictability);
        if (const JsonValue* items = routing->Get("transitions"); items != nullptr && items->type == JsonValue::kArray) {
          for (const JsonValue& item : items->array) {
            const JsonValue* counts = item.type == JsonValue::kObject ? item.Get("top1_counts") : nullptr;
            if (counts == nullptr || counts->type != JsonValue::kArray) continue;
            std::vector<double> values;
            for (const JsonValue& count : counts->array) {
              values.push_back(count.type == JsonValue::kNumber ? count.number : kNaN);
            }
            rr.effective_pairs.push_back(EffectiveCount(values));
          }
        }
        r.routing = std::move(rr);
      }
      AppendByStep(&metrics.eval, std::move(r));
    }
  }
  return metrics;
}

absl::StatusOr<RunMetrics> ReadMetricsFile(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFile(path, "metrics file");
  if (!text.ok()) return text.status();
  return ParseMetrics(*text);
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

namespace {

// The continued fraction of the regularized incomplete beta function (modified Lentz), which
// converges fast for x < (a + 1) / (a + b + 2).
double IncompleteBetaFraction(double a, double b, double x) {
  constexpr double kTiny = 1e-300;
  double c = 1, d = 1 - (a + b) * x / (a + 1);
  d = 1 / (std::abs(d) < kTiny ? kTiny : d);
  double result = d;
  for (int m = 1; m <= 300; ++m) {
    for (int odd = 0; odd < 2; ++odd) {
      const double numerator = odd == 0 ? m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
                                        : -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1));
      d = 1 + numerator * d;
      d = 1 / (std::abs(d) < kTiny ? kTiny : d);
      c = 1 + numerator / c;
      if (std::abs(c) < kTiny) c = kTiny;
      result *= c * d;
      if (odd == 1 && std::abs(c * d - 1) < 1e-14) return result;
    }
  }
  return result;
}

// I_x(a, b), the regularized incomplete beta function.
double RegularizedIncompleteBeta(double a, double b, double x) {
  if (x <= 0) return 0;
  if (x >= 1) return 1;
  const double log_front =
      std::lgamma(a + b) - std::lgamma(a) - std::lgamma(b) + a * std::log(x) + b * std::log1p(-x);
  if (x < (a + 1) / (a + b + 2)) return std::exp(log_front) * IncompleteBetaFraction(a, b, x) / a;
  return 1 - std::exp(log_front) * IncompleteBetaFraction(b, a, 1 - x) / b;
}

}  // namespace

double EffectiveCount(const std::vector<double>& counts) {
  double total = 0;
  for (double c : counts) {
    if (!(c >= 0)) return kNaN;
    total += c;
  }
  if (!(total > 0)) return kNaN;
  double entropy = 0;
  for (double c : counts) {
    if (c > 0) entropy -= c / total * std::log(c / total);
  }
  return std::exp(entropy);
}

double StudentTwoSidedP(double t, double dof) {
  if (!std::isfinite(t) || !(dof > 0)) return kNaN;
  return RegularizedIncompleteBeta(dof / 2, 0.5, dof / (dof + t * t));
}

WelchResult WelchTTest(const std::vector<double>& a, const std::vector<double>& b) {
  const auto [mean_a, std_a] = MeanAndStd(a);
  const auto [mean_b, std_b] = MeanAndStd(b);
  WelchResult result{mean_a - mean_b, kNaN, kNaN, kNaN};
  const auto finite = [](const std::vector<double>& v) {
    return static_cast<double>(std::count_if(v.begin(), v.end(), [](double x) { return std::isfinite(x); }));
  };
  const double n_a = finite(a), n_b = finite(b);
  if (n_a < 2 || n_b < 2) return result;
  const double var_a = std_a * std_a / n_a, var_b = std_b * std_b / n_b;
  if (!(var_a + var_b > 0)) return result;
  result.t = result.difference / std::sqrt(var_a + var_b);
  result.dof = (var_a + var_b) * (var_a + var_b) /
               (var_a * var_a / (n_a - 1) + var_b * var_b / (n_b - 1));
  result.p_two_sided = StudentTwoSidedP(result.t, result.dof);
  return result;
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
      result.layer_effective_pairs = MeanAndStd(e->routing->effective_pairs).first;
      break;
    }
  }
  return result;
}

}  // namespace rmoe::sweep
