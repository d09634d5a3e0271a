// rmoe_bench matmul: square matrix-product GFLOP/s, the ceiling every other number of
// rmoe_bench is a ratio of.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <algorithm>
#include <map>

#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>
#include <absl/strings/str_split.h>
#include <torch/torch.h>

#include "tools/bench_common.h"

namespace rmoe::bench {

const char kMatmulUsage[] = R"(Usage: [mpirun -np N] rmoe_bench matmul [--sizes 256,512,1024,2048] [options]

Times torch::mm of two random n x n matrices for each size: fp32 (MKL's sgemm in
PyTorch's wheels, OpenBLAS's in other builds), and bf16 when this build can multiply bf16 on the CPU (oneDNN, or
ATen's generic fallback: the context line says whether oneDNN is in). Every product of
--repeats rounds of at least --min-time seconds is timed on its own; GFLOP/s = 2 n^3 / the
fastest product (the ceiling: other work on shared cores only slows products down), and
median GFLOP/s from the median product. A size whose single product takes longer than 5 s
ends that dtype's list. Under mpirun every rank runs at once (they
share the cores): the table shows rank 0 and the sum over ranks.

Options:
  --sizes LIST      matrix sizes (default 256,512,1024,2048)
  --dtypes LIST     fp32,bf16 (default both)
  --min-time S      seconds per timed round (default 0.3)
  --repeats R       timed rounds per size (default 3)
  --threads T       intra-op threads per rank (default: cores / ranks on this node)
  --json PATH       also write the results as JSON
)";

int RunMatmul(const std::vector<std::string>& args, distributed::MpiRuntime& mpi) {
  const Options o(args, {"--sizes", "--dtypes", "--min-time", "--repeats"});
  const auto sizes = o.IntList("--sizes", {256, 512, 1024, 2048});
  const double min_time = o.Double("--min-time", 0.3);
  const int repeats = static_cast<int>(o.Int("--repeats", 3));
  std::vector<std::string> dtypes;
  for (absl::string_view d : absl::StrSplit(o.String("--dtypes", "fp32,bf16"), ',', absl::SkipEmpty())) {
    if (d != "fp32" && d != "bf16") throw UsageError("--dtypes takes fp32 and/or bf16");
    dtypes.emplace_back(d);
  }
  auto& world = mpi.World();
  SetThreads(static_cast<int>(o.Int("--threads", 0)), mpi.LocalSize());
  const Context context = GatherContext(mpi, world);
  const bool is_main = world.rank() == 0;
  if (is_main) PrintContext(context);

  Table table({"dtype", "n", "best ms", "GFLOP/s", "median GFLOP/s", "GFLOP/s all ranks",
               "x fp32"});
  std::vector<JsonObject> rows;
  std::map<int64_t, double> fp32_gflops;
  for (const auto& name : dtypes) {
    const auto dtype = name == "fp32" ? torch::kFloat : torch::kBFloat16;
    std::string unsupported;
    try {
      auto a = torch::randn({8, 8}).to(dtype);
      torch::mm(a, a);
    } catch (const c10::Error& e) {
      unsupported = e.what_without_backtrace();
    }
    // Every rank must agree, since the results are reduced over ranks.
    const bool supported =
        MaxOverRanks(world, {unsupported.empty() ? 0.0 : 1.0})[0] == 0.0;
    if (!supported) {
      table.Add({name, "-", "unsupported", "", "", "", ""});
      rows.push_back(JsonObject().Add("dtype", name).Add("error", unsupported));
      continue;
    }
    for (int64_t n : sizes) {
      torch::manual_seed(n);
      auto a = torch::randn({n, n}).to(dtype), b = torch::randn({n, n}).to(dtype);
      auto start = Clock::now();
      auto c = torch::mm(a, b);  // warm-up; also tells how many products fill min_time
      const double once = MaxOverRanks(world, {SecondsSince(start)})[0];
      const int reps = std::max(1, static_cast<int>(std::ceil(min_time / std::max(once, 1e-6))));
      // Each product timed on its own: on a shared machine the fastest one is the ceiling,
      // and the median says how much the other work on the cores costs.
      std::vector<double> times;
      for (int r = 0; r < repeats && once <= 5.0; ++r) {
        for (int i = 0; i < reps; ++i) {
          start = Clock::now();
          torch::mm_out(c, a, b);
          times.push_back(SecondsSince(start));
        }
      }
      if (times.empty()) times.push_back(once);  // too slow to repeat
      const double best = *std::min_element(times.begin(), times.end());
      const double median = Median(times);
      const double gflops = 2.0 * n * n * n / best / 1e9;
      const double median_gflops = 2.0 * n * n * n / median / 1e9;
      const double all = SumOverRanks(world, {gflops})[0];
      if (name == "fp32") fp32_gflops[n] = gflops;
      const std::string ratio = name != "fp32" && fp32_gflops.count(n)
                                    ? absl::StrFormat("%.2f", gflops / fp32_gflops[n])
                                    : "";
      table.Add({name, absl::StrCat(n), absl::StrFormat("%.3f", best * 1e3),
                 absl::StrFormat("%.1f", gflops), absl::StrFormat("%.1f", median_gflops),
                 absl::StrFormat("%.1f", all), ratio});
      rows.push_back(JsonObject()
                         .Add("dtype", name)
                         .Add("n", n)
                         .Add("seconds_per_product", best)
                         .Add("median_seconds_per_product", median)
                         .Add("gflops_per_s", gflops)
                         .Add("median_gflops_per_s", median_gflops)
                         .Add("gflops_per_s_all_ranks", all)
                         .Add("products_timed", static_cast<int64_t>(times.size())));
      if (once > 5.0) {
        table.Add({name, ">", "skipped: the last size took over 5 s per product", "", "", "", ""});
        break;
      }
    }
  }
  if (is_main) {
    std::printf("matmul: C = A B, square; GFLOP/s = 2 n^3 / fastest product, median GFLOP/s from "
                "the median product (%d rounds of >= %.2f s, each product timed)\n",
                repeats, min_time);
    table.Print();
    std::printf("\n");
  }
  JsonObject result;
  result.AddRaw("matmul", JsonArray(rows));
  if (is_main) WriteJson(o.String("--json", ""), "matmul", context, result);
  return 0;
}

}  // namespace rmoe::bench
