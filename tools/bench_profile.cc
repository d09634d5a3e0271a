// rmoe_bench step --profile: PyTorch's (Kineto) CPU profiler around the timed steps, reduced
// to a table of operators by self time, the time an operator spends outside the operators it
// calls. That is where a step's time goes that is not matrix products (element-wise kernels,
// copies, allocation), which a table of inclusive times hides under the module calls.
#include <algorithm>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include <torch/csrc/autograd/profiler_kineto.h>
#include <absl/strings/str_format.h>
#include <torch/torch.h>

#include "tools/bench_common.h"

namespace rmoe::bench {
namespace {

namespace profiler = torch::autograd::profiler;
namespace profiler_impl = torch::profiler::impl;

struct Interval {
  uint64_t start_ns = 0, end_ns = 0;
  std::string name;
};

}  // namespace

void StartOpProfile() {
  const profiler_impl::ProfilerConfig config(profiler_impl::ProfilerState::KINETO);
  profiler::prepareProfiler(config, {profiler_impl::ActivityType::CPU});
  profiler::enableProfiler(config, {profiler_impl::ActivityType::CPU});
}

std::vector<OpTime> StopOpProfile(const std::string& trace_path) {
  auto result = profiler::disableProfiler();
  std::map<uint64_t, std::vector<Interval>> by_thread;
  for (const auto& event : result->events()) {
    by_thread[event.startThreadId()].push_back({event.startNs(), event.endNs(), event.name()});
  }
  std::map<std::string, OpTime> by_name;
  for (auto& [thread, intervals] : by_thread) {
    // Parents first: earlier start, and of two equal starts the longer one.
    std::sort(intervals.begin(), intervals.end(), [](const Interval& a, const Interval& b) {
      return a.start_ns != b.start_ns ? a.start_ns < b.start_ns : a.end_ns > b.end_ns;
    });
    struct Open {
      const Interval* interval;
      double children_ms;
    };
    std::vector<Open> stack;
    const auto close = [&] {
      const Open open = stack.back();
      stack.pop_back();
      const double ms = (open.interval->end_ns - open.interval->start_ns) * 1e-6;
      OpTime& op = by_name[open.interval->name];
      op.name = open.interval->name;
      op.total_ms += ms;
      op.self_ms += ms - open.children_ms;
      op.calls += 1;
      if (!stack.empty()) stack.back().children_ms += ms;
    };
    for (const auto& interval : intervals) {
      while (!stack.empty() && stack.back().interval->end_ns <= interval.start_ns) close();
      stack.push_back({&interval, 0.0});
    }
    while (!stack.empty()) close();
  }
  std::vector<OpTime> ops;
  for (auto& [name, op] : by_name) ops.push_back(op);
  std::sort(ops.begin(), ops.end(),
            [](const OpTime& a, const OpTime& b) { return a.self_ms > b.self_ms; });
  if (!trace_path.empty()) result->save(trace_path);
  return ops;
}

void PrintOpProfile(const std::vector<OpTime>& ops, int steps, double step_seconds, int top) {
  double self_sum_ms = 0;
  for (const auto& op : ops) self_sum_ms += op.self_ms;
  const double step_ms = step_seconds * 1e3;
  std::printf("operators by self time, per step (%d profiled steps; %.1f of the %.1f ms step are "
              "inside operators)\n",
              steps, self_sum_ms / steps, step_ms);
  Table table({"operator", "self ms", "% of step", "total ms", "calls"});
  for (int i = 0; i < top && i < static_cast<int>(ops.size()); ++i) {
    const OpTime& op = ops[i];
    table.Add({op.name.size() > 72 ? op.name.substr(0, 69) + "..." : op.name,
               absl::StrFormat("%.2f", op.self_ms / steps),
               absl::StrFormat("%.1f%%", 100 * op.self_ms / steps / step_ms),
               absl::StrFormat("%.2f", op.total_ms / steps),
               absl::StrFormat("%.0f", static_cast<double>(op.calls) / steps)});
  }
  table.Print();
  std::printf("\n");
}

}  // namespace rmoe::bench
