// rmoe_bench collectives: the all-reduce and all-to-all that training issues, through the
// same communicator, over message sizes from a few bytes to megabytes: latency for small
// messages, bandwidth for large ones, in nccl-tests' terms so that numbers compare.
#include <algorithm>
#include <cstdio>

#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>
#include <torch/torch.h>

#include "distributed/node_layout.h"
#include "rmoe/plan/plan.h"
#include "tools/bench_common.h"

namespace rmoe::bench {

const char kCollectivesUsage[] = R"(Usage: mpirun -np P rmoe_bench collectives [options]

Times MpiCommunicator::AllReduce (sum, in place) and AllToAll (even splits: each rank sends
1/P of its buffer to every rank, its own share included) of fp32 buffers of each size, as
rmoe_train issues them (through the collective watchdog's wait loop). A sample is a barrier,
then a run of back-to-back operations (as many as take about a fifth of --seconds), timed
by the slowest rank and divided by their number: the ranks leave a barrier up to one
message latency apart, which would otherwise count in every operation. Reported per
operation and size, over the samples: min and median time per operation, and from the
median, as nccl-tests reports them:
  algbw  size / time (size: the buffer each rank holds)
  busbw  algbw x 2 (P - 1) / P for all-reduce, x (P - 1) / P for all-to-all: the bytes each
         rank moves over its link per second, comparable with the link rate whatever P is
The ranks' nodes (MPI_Comm_split_type) are printed: across nodes, compare busbw with the
network's rate (docs/multinode.md).

Options:
  --sizes LIST    buffer bytes per rank, comma-separated (default
                  8,1024,65536,1048576,4194304,16777216); rounded down to whole fp32 elements
  --ops LIST      allreduce,alltoall (default both)
  --samples N     timed samples per size (default 5)
  --seconds S     about how long the samples of one size take together (default 1)
  --warmup W      untimed operations first (default 2)
  --json PATH     also write the results as JSON
)";

namespace {

struct Measured {
  std::string op;
  int64_t bytes = 0;
  int iters = 0;
  double min_s = 0, median_s = 0;
  double algbw = 0, busbw = 0;
};

}  // namespace

int RunCollectives(const std::vector<std::string>& args, distributed::MpiRuntime& mpi) {
  const Options o(args, {"--sizes", "--ops", "--samples", "--seconds", "--warmup"});
  const std::vector<int64_t> sizes =
      o.IntList("--sizes", {8, 1024, 65536, 1048576, 4194304, 16777216});
  const std::string ops_flag = o.String("--ops", "allreduce,alltoall");
  std::vector<std::string> ops;
  for (const char* op : {"allreduce", "alltoall"}) {
    if (ops_flag.find(op) != std::string::npos) ops.push_back(op);
  }
  if (ops.empty()) throw UsageError("--ops takes allreduce, alltoall or both");
  const double target_seconds = o.Double("--seconds", 1);
  const int warmup = static_cast<int>(o.Int("--warmup", 2, 0));
  auto& world = mpi.World();
  const int ranks = world.size();
  const bool is_main = world.rank() == 0;
  SetThreads(o.Has("--threads") ? static_cast<int>(o.Int("--threads", 1)) : 1, mpi.LocalSize());
  const Context context = GatherContext(mpi, world);
  if (is_main) {
    PrintContext(context);
    for (const auto& line : distributed::DescribeLayout(mpi.Nodes(), 1)) std::printf("%s\n", line.c_str());
  }

  std::vector<Measured> results;
  for (const std::string& op : ops) {
    for (int64_t requested : sizes) {
      // All-to-all buffers are whole rows for every rank.
      const int64_t unit = op == "alltoall" ? ranks : 1;
      const int64_t elements = std::max<int64_t>(unit, requested / 4 / unit * unit);
      auto buffer = torch::ones({elements}, torch::kFloat32);
      const std::vector<int64_t> splits(ranks, elements / ranks);
      auto run = [&](int count) {
        world.Barrier();
        const auto start = Clock::now();
        for (int i = 0; i < count; ++i) {
          if (op == "allreduce") {
            world.AllReduce(buffer, distributed::ReduceOp::kSum);
          } else {
            auto received = world.AllToAll(buffer, splits, splits);
          }
        }
        const double seconds = SecondsSince(start) / count;
        if (op == "allreduce") buffer.fill_(1);  // sums of sums would overflow
        return seconds;
      };
      if (warmup > 0) run(warmup);
      // Operations per sample: from one timed operation, agreed by every rank.
      const double probe = MaxOverRanks(world, {run(1)})[0];
      const int samples = static_cast<int>(o.Int("--samples", 5));
      const int per_sample = static_cast<int>(
          std::clamp(target_seconds / samples / std::max(probe, 1e-6), 1.0, 1000.0));
      std::vector<double> times;
      for (int i = 0; i < samples; ++i) times.push_back(run(per_sample));
      times = MaxOverRanks(world, times);
      const int iters = samples * per_sample;
      Measured m;
      m.op = op;
      m.bytes = elements * 4;
      m.iters = iters;
      m.min_s = Min(times);
      m.median_s = Median(times);
      m.algbw = m.bytes / m.median_s;
      m.busbw = m.algbw * plan::BusBandwidthFactor(op == "allreduce", ranks);
      results.push_back(m);
    }
  }

  if (!is_main) return 0;
  Table table({"op", "bytes", "iters", "min us", "median us", "algbw MB/s", "busbw MB/s",
               "busbw Mbit/s"});
  std::vector<JsonObject> rows;
  for (const Measured& m : results) {
    table.Add({m.op, absl::StrCat(m.bytes), absl::StrCat(m.iters), absl::StrFormat("%.1f", m.min_s * 1e6),
               absl::StrFormat("%.1f", m.median_s * 1e6), absl::StrFormat("%.2f", m.algbw / 1e6),
               absl::StrFormat("%.2f", m.busbw / 1e6), absl::StrFormat("%.1f", m.busbw * 8 / 1e6)});
    rows.push_back(JsonObject()
                       .Add("op", m.op)
                       .Add("bytes", m.bytes)
                       .Add("iters", static_cast<int64_t>(m.iters))
                       .Add("min_s", m.min_s)
                       .Add("median_s", m.median_s)
                       .Add("algbw_bytes_per_s", m.algbw)
                       .Add("busbw_bytes_per_s", m.busbw));
  }
  table.Print();
  const auto& nodes = mpi.Nodes();
  JsonObject result;
  result.Add("ranks", static_cast<int64_t>(ranks))
      .Add("nodes", static_cast<int64_t>(nodes.nodes()))
      .AddRaw("results", JsonArray(rows));
  WriteJson(o.String("--json", ""), "collectives", context, result);
  return 0;
}

}  // namespace rmoe::bench
