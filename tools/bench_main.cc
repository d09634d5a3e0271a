// rmoe_bench: micro- and macro-benchmarks of the expert-parallel all-to-all, whole training
// steps, one MoE layer, the routers and the matrix-product ceiling. Subcommands live in
// tools/bench_<name>.cc; this file has the entry point and what they share (tools/bench_common.h).

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <thread>

#include <absl/strings/str_format.h>
#include <torch/torch.h>
#include <torch/version.h>

#include "rmoe/platform/host_report.h"
#include "rmoe/util/files.h"
#include "tools/bench_common.h"

namespace rmoe::bench {
namespace {

constexpr char kUsage[] = R"(Usage: [mpirun -np N] rmoe_bench SUBCOMMAND [options]

Benchmarks of RMoE's moving parts. Every subcommand prints a table on stdout (rank 0) and,
with --json PATH, writes the same numbers as JSON. Every report starts with its context:
torch version, intra-op threads per rank, MPI world size, the BLAS in use (MKL with its
version for PyTorch's wheels, or OpenBLAS's core from openblas_get_corename()) and
$OPENBLAS_CORETYPE, which pins OpenBLAS to a core's kernels (an older core than the CPU's
runs slower: compare numbers as ratios within one run). At start-up rmoe_bench chooses and
checks the BLAS kernels exactly as rmoe_train does (rmoe_train --help).

Subcommands (each has --help):
  alltoall   expert-parallel dispatch all-to-all vs raw MPI_Alltoallv of the same splits,
             and one MoE layer's forward+backward, expert-parallel vs all experts local
             (run under mpirun, np >= 2)
  collectives all-reduce and all-to-all through the training communicator over message
             sizes: latency, and bandwidth against the link (nccl-tests' algbw and busbw)
  step       training steps of a job spec's model on random tokens: step time, tokens/s,
             communication vs computation, model FLOP/s (with or without mpirun)
  matmul     fp32 (and bf16) square matrix-product GFLOP/s: the ceiling the others are a
             ratio of
  moe        one MoE layer's forward+backward (d 512, hidden 2048, 8 and 32 experts,
             4096 tokens), natural and balanced routing, split into routing, permutation,
             expert products and combine, as a fraction of the matmul ceiling
  router     each router's forward+backward time and share of its MoE layer at sequence
             lengths 256, 1024, 4096

Options every subcommand takes:
  --json PATH      also write the results as JSON (rank 0)
  --threads T      intra-op threads per rank (default: this process's cores / ranks on
                   this node, as rmoe_train; `step` defaults to the job's runtime.num_threads)

Under mpirun as root OpenMPI needs OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1,
and more ranks than cores need --oversubscribe. See docs/benchmarks.md.
Exit status: 0 done, 2 bad arguments, 1 failure.
)";

std::string ReadLoadAverage() {
  std::ifstream in("/proc/loadavg");
  double one = 0, five = 0, fifteen = 0;
  if (!(in >> one >> five >> fifteen)) return "unknown";
  return absl::StrFormat("%.2f %.2f %.2f", one, five, fifteen);
}

std::string TrimRight(std::string s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  return s;
}

}  // namespace

// ---------------------------------------------------------------- options

namespace {
// The value of a typed getter, or a UsageError with its message.
template <typename T>
T OrThrow(absl::StatusOr<T> value) {
  if (!value.ok()) throw UsageError(std::string(value.status().message()));
  return *std::move(value);
}
}  // namespace

Options::Options(const std::vector<std::string>& args, const std::vector<std::string>& known,
                 const std::vector<std::string>& repeatable) {
  cli::Parser parser;
  for (const std::string& name : known) parser.Value(name, "a value");
  for (const std::string& name : repeatable) parser.Repeated(name, "a value");
  parser.Value("--json", "a path").Value("--threads", "a number");
  args_ = OrThrow(parser.Parse(args));
}

std::string Options::String(const std::string& name, const std::string& fallback) const {
  return args_.Get(name, fallback);
}

int64_t Options::Int(const std::string& name, int64_t fallback, int64_t min_value) const {
  return OrThrow(args_.Int(name, fallback, min_value));
}

double Options::Double(const std::string& name, double fallback) const {
  return OrThrow(args_.Number(name, fallback, {0, HUGE_VAL, /*min_exclusive=*/true}));
}

std::vector<int64_t> Options::IntList(const std::string& name,
                                      const std::vector<int64_t>& fallback) const {
  return OrThrow(args_.IntList(name, fallback, 1));
}

std::vector<std::string> Options::All(const std::string& name) const { return args_.All(name); }

// ---------------------------------------------------------------- context

int SetThreads(int requested, int local_size) {
  const int threads = requested > 0 ? requested : std::max(1, UsableCores() / std::max(1, local_size));
  torch::set_num_threads(threads);
  return threads;
}

Context GatherContext(const distributed::MpiRuntime& mpi, distributed::MpiCommunicator& world) {
  Context c;
  c.torch_version = TORCH_VERSION;
  c.threads = torch::get_num_threads();
  c.world_size = world.size();
  c.local_size = mpi.LocalSize();
  c.cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  c.usable_cores = UsableCores();
  c.load_average = ReadLoadAverage();
  c.cpu_model = DetectCpu().model_name;
  c.mkldnn = at::hasMKLDNN();
  const BlasInfo blas = DetectBlas();
  c.blas_core = blas.library == BlasLibrary::kOpenBlas ? blas.core : blas.name + " (own CPU dispatch)";
  c.blas_config = blas.library == BlasLibrary::kOpenBlas
                      ? blas.config
                      : "ATen CPU capability " + AtenCpuCapability();
  const char* coretype = std::getenv("OPENBLAS_CORETYPE");
  c.openblas_coretype_env = coretype ? coretype : "(unset)";
  return c;
}

void PrintContext(const Context& c) {
  std::printf("torch %s | %d intra-op thread%s per rank | MPI world %d (%d on this node) | %d "
              "cores (%d usable by rank 0) | %s | load average %s\n",
              c.torch_version.c_str(), c.threads, c.threads == 1 ? "" : "s", c.world_size,
              c.local_size, c.cores, c.usable_cores, c.cpu_model.c_str(), c.load_average.c_str());
  std::printf("BLAS core: %s | OPENBLAS_CORETYPE=%s | oneDNN: %s%s%s\n", c.blas_core.c_str(),
              c.openblas_coretype_env.c_str(), c.mkldnn ? "yes" : "no",
              c.blas_config.empty() ? "" : " | ", c.blas_config.c_str());
  if (c.local_size * c.threads > c.cores) {
    std::printf("note: %d ranks x %d threads on %d cores: oversubscribed, ranks time-share the "
                "cores\n",
                c.local_size, c.threads, c.cores);
  }
  std::printf("\n");
}

JsonObject ContextJson(const Context& c) {
  JsonObject o;
  o.Add("torch_version", c.torch_version)
      .Add("threads_per_rank", static_cast<int64_t>(c.threads))
      .Add("world_size", static_cast<int64_t>(c.world_size))
      .Add("local_size", static_cast<int64_t>(c.local_size))
      .Add("cores", static_cast<int64_t>(c.cores))
      .Add("usable_cores_rank0", static_cast<int64_t>(c.usable_cores))
      .Add("load_average", c.load_average)
      .Add("cpu_model", c.cpu_model)
      .Add("blas_core", c.blas_core)
      .Add("blas_config", c.blas_config)
      .Add("openblas_coretype_env", c.openblas_coretype_env)
      .Add("mkldnn", std::string(c.mkldnn ? "yes" : "no"));
  return o;
}

// ---------------------------------------------------------------- statistics

namespace {
std::vector<double> Reduce(distributed::MpiCommunicator& comm, std::vector<double> values,
                           MPI_Op op) {
  if (comm.size() > 1 && !values.empty()) {
    const int rc = MPI_Allreduce(MPI_IN_PLACE, values.data(), static_cast<int>(values.size()),
                                 MPI_DOUBLE, op, comm.comm());
    if (rc != MPI_SUCCESS) throw std::runtime_error("MPI_Allreduce of benchmark timings failed");
  }
  return values;
}
}  // namespace

std::vector<double> MaxOverRanks(distributed::MpiCommunicator& comm, std::vector<double> values) {
  return Reduce(comm, std::move(values), MPI_MAX);
}
std::vector<double> SumOverRanks(distributed::MpiCommunicator& comm, std::vector<double> values) {
  return Reduce(comm, std::move(values), MPI_SUM);
}

std::vector<double> MeanOverRanks(distributed::MpiCommunicator& comm, std::vector<double> values) {
  values = SumOverRanks(comm, std::move(values));
  for (double& v : values) v /= comm.size();
  return values;
}

double Mean(const std::vector<double>& values) {
  if (values.empty()) return 0;
  double sum = 0;
  for (double v : values) sum += v;
  return sum / values.size();
}

double Min(const std::vector<double>& values) {
  return values.empty() ? 0 : *std::min_element(values.begin(), values.end());
}

double Median(std::vector<double> values) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

// ---------------------------------------------------------------- output

void Table::Print() const {
  std::vector<size_t> width(header_.size(), 0);
  auto measure = [&](const std::vector<std::string>& row) {
    for (size_t i = 0; i < row.size() && i < width.size(); ++i) width[i] = std::max(width[i], row[i].size());
  };
  measure(header_);
  for (const auto& row : rows_) measure(row);
  auto print = [&](const std::vector<std::string>& row) {
    std::string line;
    for (size_t i = 0; i < width.size(); ++i) {
      const std::string cell = i < row.size() ? row[i] : "";
      const std::string pad(width[i] - cell.size(), ' ');
      line += i == 0 ? cell + pad : "  " + pad + cell;
    }
    std::printf("%s\n", TrimRight(line).c_str());
  };
  print(header_);
  size_t total = 0;
  for (size_t w : width) total += w + 2;
  std::printf("%s\n", std::string(total - 2, '-').c_str());
  for (const auto& row : rows_) print(row);
}

void WriteJson(const std::string& path, const std::string& benchmark, const Context& context,
               const JsonObject& result) {
  if (path.empty()) return;
  JsonObject record;
  record.Add("benchmark", benchmark)
      .AddRaw("context", ContextJson(context).str())
      .AddRaw("result", result.str());
  if (auto s = WriteFileAtomically(path, record.str() + "\n"); !s.ok()) {
    throw std::runtime_error("cannot write --json " + path + ": " + std::string(s.message()));
  }
  std::printf("JSON written to %s\n", path.c_str());
}

std::string Human(double value) {
  const double a = std::fabs(value);
  if (a >= 1e9) return absl::StrFormat("%.2fG", value / 1e9);
  if (a >= 1e6) return absl::StrFormat("%.2fM", value / 1e6);
  if (a >= 1e3) return absl::StrFormat("%.2fk", value / 1e3);
  return absl::StrFormat("%.2f", value);
}

}  // namespace rmoe::bench

int main(int argc, char** argv) {
  using namespace rmoe::bench;
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    std::fputs(kUsage, args.empty() ? stderr : stdout);
    return args.empty() ? 2 : 0;
  }
  const std::string sub = args[0];
  args.erase(args.begin());
  struct Subcommand {
    const char* name;
    int (*run)(const std::vector<std::string>&, rmoe::distributed::MpiRuntime&);
    const char* usage;
  };
  const Subcommand subcommands[] = {{"alltoall", RunAllToAll, kAllToAllUsage},
                                    {"collectives", RunCollectives, kCollectivesUsage},
                                    {"step", RunStep, kStepUsage},
                                    {"matmul", RunMatmul, kMatmulUsage},
                                    {"moe", RunMoe, kMoeUsage},
                                    {"router", RunRouter, kRouterUsage}};
  const Subcommand* chosen = nullptr;
  for (const Subcommand& s : subcommands) {
    if (sub == s.name) chosen = &s;
  }
  if (chosen == nullptr) {
    std::fprintf(stderr, "rmoe_bench: unknown subcommand \"%s\" (alltoall, collectives, step, matmul, moe, router; see --help)\n",
                 sub.c_str());
    return 2;
  }
  if (rmoe::cli::AsksForHelp(args)) return rmoe::cli::PrintUsage(chosen->usage);

  // As rmoe_train: BLAS kernels for this CPU (unless OPENBLAS_CORETYPE is set), checked.
  rmoe::SelectBlasKernels(argv);
  if (auto blas = rmoe::VerifyBlasOrFallBack(argv); !blas.ok()) {
    std::fprintf(stderr, "rmoe_bench: %s\n", std::string(blas.message()).c_str());
    return 1;
  }
  rmoe::distributed::MpiRuntime mpi(&argc, &argv);
  auto& world = mpi.World();
  const std::string where = world.size() > 1 ? absl::StrFormat("rank %d: ", world.rank()) : "";
  try {
    const int rc = chosen->run(args, mpi);
    std::fflush(stdout);
    return rc;
  } catch (const UsageError& e) {
    // Every rank parsed the same arguments and throws the same error: no abort needed.
    if (world.rank() == 0) std::fprintf(stderr, "rmoe_bench %s: %s\n", sub.c_str(), e.what());
    return 2;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "rmoe_bench %s: %s%s\n", sub.c_str(), where.c_str(), e.what_without_backtrace());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rmoe_bench %s: %s%s\n", sub.c_str(), where.c_str(), e.what());
  }
  std::fflush(stdout);
  if (world.size() > 1) mpi.Abort(1);
  return 1;
}
