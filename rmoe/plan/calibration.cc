// Hardware profiles calibrated from rmoe_bench measurements (rmoe_plan --calibrate).
#include "rmoe/plan/plan.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>
#include <absl/strings/str_join.h>
#include <absl/strings/str_split.h>
#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>

#include "rmoe/config/job_spec.h"
#include "rmoe/util/files.h"
#include "rmoe/util/json.h"

namespace rmoe::plan {

namespace {

// Least squares of y ~ X b with b >= 0, by trying every subset of columns (few columns).
std::vector<double> NonNegativeLeastSquares(const std::vector<std::vector<double>>& x,
                                            const std::vector<double>& y) {
  const size_t n = x.empty() ? 0 : x[0].size();
  std::vector<double> best(n, 0);
  double best_error = 0;
  for (double v : y) best_error += v * v;
  for (unsigned mask = 1; mask < (1u << n); ++mask) {
    std::vector<size_t> cols;
    for (size_t j = 0; j < n; ++j) {
      if (mask & (1u << j)) cols.push_back(j);
    }
    if (cols.size() > y.size()) continue;
    const size_t c = cols.size();
    // Normal equations A b = r, solved by Gaussian elimination with partial pivoting.
    std::vector<std::vector<double>> a(c, std::vector<double>(c + 1, 0));
    for (size_t i = 0; i < y.size(); ++i) {
      for (size_t p = 0; p < c; ++p) {
        for (size_t q = 0; q < c; ++q) a[p][q] += x[i][cols[p]] * x[i][cols[q]];
        a[p][c] += x[i][cols[p]] * y[i];
      }
    }
    bool singular = false;
    for (size_t p = 0; p < c && !singular; ++p) {
      size_t pivot = p;
      for (size_t q = p + 1; q < c; ++q) {
        if (std::fabs(a[q][p]) > std::fabs(a[pivot][p])) pivot = q;
      }
      std::swap(a[p], a[pivot]);
      if (std::fabs(a[p][p]) < 1e-300) {
        singular = true;
        break;
      }
      for (size_t q = 0; q < c; ++q) {
        if (q == p) continue;
        const double f = a[q][p] / a[p][p];
        for (size_t j = p; j <= c; ++j) a[q][j] -= f * a[p][j];
      }
    }
    if (singular) continue;
    std::vector<double> b(n, 0);
    bool feasible = true;
    for (size_t p = 0; p < c; ++p) {
      b[cols[p]] = a[p][c] / a[p][p];
      if (!(b[cols[p]] > 0)) feasible = false;
    }
    if (!feasible) continue;
    double error = 0;
    for (size_t i = 0; i < y.size(); ++i) {
      double fit = 0;
      for (size_t j = 0; j < n; ++j) fit += x[i][j] * b[j];
      error += (y[i] - fit) * (y[i] - fit);
    }
    if (error < best_error) {
      best_error = error;
      best = b;
    }
  }
  return best;
}

double MemTotalBytes() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  double kib = 0;
  while (in >> key >> kib) {
    if (key == "MemTotal:") return kib * 1024;
    in.ignore(1 << 10, '\n');
  }
  return 0;
}

struct StepRun {
  JobSpec spec;
  Layout layout;
  double compute_s = 0, comm_s = 0, peak_rss = 0;
  int cores_used = 1;  // threads per rank x ranks, at most the machine's cores
  std::string path;
};

}  // namespace

absl::StatusOr<HardwareProfile> Calibrate(const std::vector<std::string>& json_paths,
                                          const HardwareProfile& base) {
  HardwareProfile hw = base;
  double best_fp32 = 0, best_bf16 = 0;
  int cores = 0;
  std::vector<std::pair<double, double>> exchanges;  // (remote bytes sent per rank, seconds) per all-to-all
  int exchange_ranks = 2;
  std::vector<StepRun> steps;
  for (const std::string& path : json_paths) {
    auto text = ReadFile(path, "rmoe_bench JSON");
    if (!text.ok()) return text.status();
    JsonValue root;
    if (!ParseJson(*text, &root) || root.type != JsonValue::kObject) {
      return absl::InvalidArgumentError(absl::StrCat(path, " is not JSON (rmoe_bench --json output)"));
    }
    const JsonValue* bench = root.Get("benchmark");
    const JsonValue* context = root.Get("context");
    const JsonValue* result = root.Get("result");
    if (!bench || bench->type != JsonValue::kString || !context || !result) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, " lacks \"benchmark\", \"context\" or \"result\": not an rmoe_bench --json output"));
    }
    const double threads = std::max(1.0, context->Number("threads_per_rank"));
    cores = std::max(cores, static_cast<int>(context->Number("cores")));
    if (bench->string == "matmul") {
      const JsonValue* rows = result->Get("matmul");
      if (!rows || rows->type != JsonValue::kArray) return absl::InvalidArgumentError(path + ": no \"matmul\" rows");
      for (const JsonValue& row : rows->array) {
        const JsonValue* dtype = row.Get("dtype");
        const double gflops = row.Number("gflops_per_s");
        if (!dtype || !std::isfinite(gflops)) continue;
        double& best = dtype->string == "bf16" ? best_bf16 : best_fp32;
        best = std::max(best, gflops * 1e9 / threads);
      }
    } else if (bench->string == "alltoall") {
      const JsonValue* variants = result->Get("exchange");
      const double remote = result->Number("remote_bytes_per_rank");
      exchange_ranks = static_cast<int>(context->Number("world_size"));
      if (!variants || variants->type != JsonValue::kArray || !std::isfinite(remote)) {
        return absl::InvalidArgumentError(path + ": no \"exchange\" variants");
      }
      for (const JsonValue& v : variants->array) {
        const JsonValue* name = v.Get("variant");
        // A round trip: two all-to-alls, each sending a quarter of the remote bytes
        // counted (sent and received, there and back).
        if (name && name->string == "raw-tokens") exchanges.push_back({remote / 4, v.Number("median_s") / 2});
      }
    } else if (bench->string == "step") {
      StepRun run;
      run.path = path;
      const JsonValue* job = result->Get("job");
      const JsonValue* overrides = result->Get("overrides");
      if (!job || job->type != JsonValue::kString) return absl::InvalidArgumentError(path + ": no \"job\"");
      std::vector<std::string> sets;
      if (overrides && !overrides->string.empty()) sets = absl::StrSplit(overrides->string, ' ', absl::SkipEmpty());
      ValidationOptions validation;
      validation.check_data_files = false;
      auto spec = LoadJobSpecWithOverrides(job->string, sets, validation);
      if (!spec.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(path, ": its job spec: ", spec.status().message()));
      }
      run.spec = *spec;
      run.spec.mutable_model()->set_vocab_size(static_cast<int>(result->Number("vocab_size")));
      const int ranks = static_cast<int>(result->Number("ranks"));
      const int ep = static_cast<int>(result->Number("expert_parallel_size"));
      run.spec.mutable_parallel()->set_expert_parallel_size(ep);
      run.layout.world = ranks;
      run.layout.ep = ep;
      run.layout.dp = ranks / std::max(1, ep);
      run.layout.ranks_per_node = static_cast<int>(context->Number("local_size"));
      run.cores_used = static_cast<int>(threads) * std::max(1, run.layout.ranks_per_node);
      if (context->Number("cores") > 0) {
        run.cores_used = std::min(run.cores_used, static_cast<int>(context->Number("cores")));
      }
      run.compute_s = result->Number("compute_s");
      run.comm_s = result->Number("comm_s");
      run.peak_rss = result->Number("peak_rss_bytes");
      steps.push_back(std::move(run));
    } else {
      return absl::InvalidArgumentError(absl::StrCat(path, ": benchmark \"", bench->string,
                                                     "\" is not used for calibration (matmul, alltoall, step)"));
    }
  }
  if (best_fp32 <= 0) {
    return absl::InvalidArgumentError("calibration needs an `rmoe_bench matmul --json` output (fp32 rows)");
  }
  hw.set_peak_flops_fp32(best_fp32);
  hw.set_peak_flops_bf16(best_bf16 > 0 ? best_bf16 : best_fp32);
  hw.set_ranks_share_node(true);
  if (cores > 0) hw.set_devices_per_node(cores);
  if (!hw.has_memory_bytes() && cores > 0) hw.set_memory_bytes(MemTotalBytes() / cores);
  if (!hw.has_name()) hw.set_name("calibrated CPU");

  if (!exchanges.empty()) {
    const int p = std::max(2, exchange_ranks);
    double alpha = 0, inverse_bw = 0;
    if (exchanges.size() >= 2) {
      double sx = 0, sy = 0, sxx = 0, sxy = 0;
      for (const auto& [x, y] : exchanges) {
        sx += x;
        sy += y;
        sxx += x * x;
        sxy += x * y;
      }
      const double n = exchanges.size(), det = n * sxx - sx * sx;
      if (det > 0) {
        inverse_bw = (n * sxy - sx * sy) / det;
        alpha = (sy - inverse_bw * sx) / n / (p - 1);
      }
    }
    if (!(inverse_bw > 0)) {  // one size, or a fit that makes no sense: latency from the base
      const auto& [x, y] = *std::max_element(exchanges.begin(), exchanges.end());
      alpha = base.intra_node().latency_s();
      inverse_bw = std::max(1e-15, (y - (p - 1) * alpha) / x);
    }
    alpha = std::max(0.0, alpha);
    hw.mutable_intra_node()->set_bandwidth_bytes_per_s(1 / inverse_bw);
    hw.mutable_intra_node()->set_latency_s(alpha);
    if (!base.has_inter_node()) *hw.mutable_inter_node() = hw.intra_node();
  }
  if (!hw.has_intra_node() || !hw.has_inter_node()) {
    return absl::InvalidArgumentError(
        "calibration needs an `rmoe_bench alltoall --json` output (or a base profile with "
        "intra_node and inter_node links)");
  }

  // A run's own machine: the cores its ranks used.
  auto run_profile = [&](const StepRun& run, HardwareProfile profile) {
    profile.set_devices_per_node(std::max(1, std::min(cores > 0 ? cores : run.cores_used, run.cores_used)));
    return profile;
  };
  // 1. Step runs of one rank on one thread: compute_s = matmul_s / efficiency + bytes /
  // bandwidth + ops x overhead, the three terms from a unit profile.
  std::vector<std::vector<double>> x;
  std::vector<double> y;
  HardwareProfile unit = hw;
  unit.set_matmul_efficiency(1);
  unit.set_memory_bandwidth_bytes_per_s(1);
  unit.set_op_overhead_s(1);
  unit.set_thread_scaling(1);
  double rss_excess = 0;
  int rss_runs = 0;
  for (const StepRun& run : steps) {
    if (run.layout.world != 1 || run.cores_used != 1 || !std::isfinite(run.compute_s)) continue;
    const StepEstimate e = EstimateStep(run.spec, run.layout, run_profile(run, unit), 1);
    x.push_back({e.compute_matmul_s, e.compute_memory_s, e.compute_overhead_s});
    y.push_back(run.compute_s);
  }
  for (const StepRun& run : steps) {
    if (run.layout.world == 1 && std::isfinite(run.peak_rss) && run.peak_rss > 0) {
      rss_excess += run.peak_rss - EstimateTrainingMemory(run.spec, {1, 1}).total();
      ++rss_runs;
    }
  }
  if (y.size() < 2) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "calibration needs at least two `rmoe_bench step --threads 1 --json` outputs of one rank "
        "(got %d), of different shapes, to fit the matmul efficiency, memory bandwidth and "
        "operator overhead",
        static_cast<int>(y.size())));
  }
  const std::vector<double> b = NonNegativeLeastSquares(x, y);
  hw.set_matmul_efficiency(b[0] > 0 ? std::min(1.0, 1 / b[0]) : 1.0);
  hw.set_memory_bandwidth_bytes_per_s(b[1] > 0 ? 1 / b[1] : 1e12);
  hw.set_op_overhead_s(b[2]);
  if (rss_runs > 0) hw.set_runtime_overhead_bytes(std::max(0.0, rss_excess / rss_runs));

  // 2. One rank on several threads: the speed-up over one thread per further core.
  double scaling_sum = 0;
  int scaling_runs = 0;
  HardwareProfile linear = hw;
  linear.set_thread_scaling(1);
  for (const StepRun& run : steps) {
    if (run.layout.world != 1 || run.cores_used < 2 || !std::isfinite(run.compute_s)) continue;
    HardwareProfile one_core = run_profile(run, linear);
    one_core.set_devices_per_node(1);
    // Threads speed up the products and element-wise work, not the operator overhead.
    const StepEstimate single = EstimateStep(run.spec, run.layout, one_core, 1);
    const double parallel_part = single.compute_matmul_s + single.compute_memory_s;
    const double speedup = parallel_part / std::max(1e-12, run.compute_s - single.compute_overhead_s);
    scaling_sum += (speedup - 1) / (run.cores_used - 1);
    ++scaling_runs;
  }
  if (scaling_runs > 0) hw.set_thread_scaling(std::clamp(scaling_sum / scaling_runs, 0.01, 1.0));

  // 3. Step runs of several ranks: their computation against one rank's, on cores of
  // their own and sharing cores.
  for (bool oversubscribed : {false, true}) {
    double ratio = 0;
    int runs = 0;
    for (const StepRun& run : steps) {
      if (run.layout.world < 2 || !std::isfinite(run.compute_s)) continue;
      const HardwareProfile own = run_profile(run, hw);
      if ((run.layout.ranks_per_node > own.devices_per_node()) != oversubscribed) continue;
      HardwareProfile plain = own;
      plain.set_compute_factor_shared(1);
      plain.set_compute_factor_oversubscribed(1);
      Layout layout = run.layout;
      layout.nodes = 1;
      ratio += run.compute_s / EstimateStep(run.spec, layout, plain, 1).compute_s;
      ++runs;
    }
    if (runs == 0) continue;
    if (oversubscribed) {
      hw.set_compute_factor_oversubscribed(ratio / runs);
    } else {
      hw.set_compute_factor_shared(ratio / runs);
    }
  }

  // 4. Step runs of several ranks: their communication time beyond alpha-beta, against
  // their computation time and their collectives (on cores of their own, or shared).
  std::vector<std::vector<double>> wx;
  std::vector<double> wy;
  HardwareProfile no_wait = hw;
  no_wait.set_collective_wait_fraction(0);
  no_wait.set_collective_sync_s(0);
  no_wait.set_collective_sync_oversubscribed_s(0);
  for (const StepRun& run : steps) {
    if (run.layout.world < 2 || !std::isfinite(run.comm_s)) continue;
    Layout layout = run.layout;
    layout.nodes = 1;
    const HardwareProfile own = run_profile(run, no_wait);
    const StepEstimate e = EstimateStep(run.spec, layout, own, 1);
    const bool shared = layout.ranks_per_node > own.devices_per_node();
    wx.push_back({run.compute_s, shared ? 0 : e.collectives, shared ? e.collectives : 0});
    wy.push_back(run.comm_s - (e.alltoall_s + e.allreduce_s + e.broadcast_s));
  }
  if (!wy.empty()) {
    const std::vector<double> w = NonNegativeLeastSquares(wx, wy);
    hw.set_collective_wait_fraction(w[0]);
    hw.set_collective_sync_s(w[1]);
    hw.set_collective_sync_oversubscribed_s(w[2]);
  }
  if (auto status = ValidateHardwareProfile(hw); !status.ok()) return status;
  return hw;
}

}  // namespace rmoe::plan
