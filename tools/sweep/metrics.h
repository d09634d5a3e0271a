// What one point's run logged: rmoe_train's metrics.jsonl read back, its parameter counts,
// and the numbers its row of the results is made of.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>

namespace rmoe::sweep {

struct MoELayerRecord {
  int layer = 0;
  std::vector<double> tokens_per_expert;
  double dropped = 0, assignments = 0, router_entropy = 0, load_balance_loss = 0, z_loss = 0;
};

struct TrainRecord {
  int64_t step = 0;
  double lr = 0, loss = 0, router_loss = 0, grad_norm = 0, tokens_per_s = 0, step_s = 0,
         comm_s = 0, tokens = 0, elapsed_s = 0;
  double forward_s = 0, router_s = 0;  // NaN in metrics from before they were logged
  std::vector<MoELayerRecord> moe;
};

// An evaluation's routing analytics (rmoe/model/routing_stats.h), over the validation set.
struct RoutingRecord {
  std::vector<double> load_cv, entropy;                     // per MoE layer
  std::vector<double> mutual_information, predictability;  // per consecutive MoE layer pair
  // Per consecutive MoE layer pair: e to the entropy of the joint distribution of the two
  // layers' top-1 experts (from its top1_counts), the number of equally used expert pairs
  // that would be as diverse: how many distinct routes tokens take between the two layers.
  std::vector<double> effective_pairs;
};

// e^H of the distribution given by non-negative counts (NaN when they sum to 0).
double EffectiveCount(const std::vector<double>& counts);

struct EvalRecord {
  int64_t step = 0;
  double val_loss = 0, val_ppl = 0;
  std::optional<RoutingRecord> routing;
};

struct RunMetrics {
  std::vector<TrainRecord> train;  // by step; a resumed run's repeated steps replace the old
  std::vector<EvalRecord> eval;
  int bad_lines = 0;  // lines that are not JSON objects (e.g. one cut short by a crash)
};

// Parses metrics.jsonl text. Records of other types (e.g. "checkpoint") are ignored. When a
// record's step is not after the previous record of its type (a run resumed from an earlier
// checkpoint appends to the file), the earlier records from that step on are dropped.
RunMetrics ParseMetrics(absl::string_view text);
// NotFound when the file does not exist.
absl::StatusOr<RunMetrics> ReadMetricsFile(const std::string& path);

struct ParameterCounts {
  int64_t total = -1, active = -1, expert = -1;
};
// Finds "# parameters: T total, A active per token, E in experts" in rmoe_train --dry-run's
// output.
std::optional<ParameterCounts> ParseParameterCounts(absl::string_view dry_run_output);

// One point's row of the results. NaN = not available.
struct PointResult {
  std::string status;  // "done", "failed", "incomplete", "not run"
  int64_t steps = 0;   // the last logged training step
  double final_train_loss, final_val_loss, best_val_loss;
  double tokens_per_s;  // mean over train records, the first (warm-up) one excluded
  double step_s, comm_s, compute_s, compute_share;  // means, likewise; share = compute/step
  double router_entropy;    // last record: mean over MoE layers
  double expert_load_cv;    // last record: std/mean of tokens per expert, mean over layers
  double dropped_fraction;  // last record: dropped / assignments over all layers
  // Router forward time / model forward time (means over the train records after the first).
  double router_share;
  // From the last evaluation's routing analytics (validation set), means over MoE layers or
  // consecutive MoE layer pairs: load CV, mutual information (nats) between the top-1
  // experts of consecutive MoE layers, and that information over the next layer's entropy.
  double val_load_cv, layer_mutual_information, layer_predictability;
  double layer_effective_pairs;  // mean of RoutingRecord::effective_pairs
  ParameterCounts parameters;
  PointResult();
};

// The numbers above from one run's metrics (status and parameters left to the caller).
PointResult SummarizeMetrics(const RunMetrics& metrics);

// Mean and sample standard deviation (n - 1) of the finite values; NaN where undefined.
std::pair<double, double> MeanAndStd(const std::vector<double>& values);

// Welch's unequal-variance t test of mean(a) - mean(b) over the finite values: the
// difference, t, the Welch-Satterthwaite degrees of freedom and the two-sided p-value.
// All but the difference are NaN unless both samples have two values and some spread.
struct WelchResult {
  double difference, t, dof, p_two_sided;
};
WelchResult WelchTTest(const std::vector<double>& a, const std::vector<double>& b);

// P(|T| >= |t|) for Student's t distribution with dof degrees of freedom (dof > 0).
double StudentTwoSidedP(double t, double dof);

}  // namespace rmoe::sweep
