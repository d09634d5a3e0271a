// Shared pieces of rmoe_bench (tools/bench_main.cc): option parsing, the run context every
// report carries (torch, threads, MPI world, BLAS core), statistics over ranks, tables and
// JSON output. Each subcommand lives in its own tools/bench_<subcommand>.cc.
#pragma once

#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "distributed/mpi_communicator.h"
#include "rmoe/util/cli.h"
#include "rmoe/util/json.h"

namespace rmoe::bench {

using Clock = std::chrono::steady_clock;
inline double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Thrown for bad command-line arguments: main prints it and exits with status 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// --name value options of one subcommand (rmoe/util/cli.h). Every option takes a value;
// `repeatable` ones (--set) may be given several times. Unknown options, and values that do
// not parse, throw UsageError.
class Options {
 public:
  Options(const std::vector<std::string>& args, const std::vector<std::string>& known,
          const std::vector<std::string>& repeatable = {});
  bool Has(const std::string& name) const { return args_.Has(name); }
  std::string String(const std::string& name, const std::string& fallback) const;
  int64_t Int(const std::string& name, int64_t fallback, int64_t min_value = 1) const;
  double Double(const std::string& name, double fallback) const;
  std::vector<int64_t> IntList(const std::string& name, const std::vector<int64_t>& fallback) const;
  std::vector<std::string> All(const std::string& name) const;

 private:
  cli::Args args_;
};

// What the numbers were measured on. Numbers are only comparable within one context.
struct Context {
  std::string torch_version;   // TORCH_VERSION
  int threads = 0;             // torch intra-op threads (per rank)
  int world_size = 1;          // MPI ranks
  int local_size = 1;          // ranks on this node
  int cores = 0;               // online CPUs of the machine
  int usable_cores = 0;        // of which this process may run on (affinity: mpirun binds)
  std::string load_average;    // /proc/loadavg at start: other work sharing the cores
  std::string cpu_model;       // /proc/cpuinfo "model name"
  std::string blas_core;       // openblas_get_corename(), "MKL <version>", or why unknown
  std::string blas_config;     // openblas_get_config(), or ATen's CPU capability with MKL
  std::string openblas_coretype_env;  // $OPENBLAS_CORETYPE or "(unset)"
  bool mkldnn = false;         // torch built with oneDNN (bf16 matmul kernels)
};

// Intra-op threads: `requested` if > 0, else the cores of this process divided among the
// ranks of this node (what rmoe_train does). Sets torch's thread count.
int SetThreads(int requested, int local_size);
Context GatherContext(const distributed::MpiRuntime& mpi, distributed::MpiCommunicator& world);
void PrintContext(const Context& context);
JsonObject ContextJson(const Context& context);

// Element-wise max / sum over the ranks of `comm` (every rank must call with equal sizes).
std::vector<double> MaxOverRanks(distributed::MpiCommunicator& comm, std::vector<double> values);
std::vector<double> SumOverRanks(distributed::MpiCommunicator& comm, std::vector<double> values);
std::vector<double> MeanOverRanks(distributed::MpiCommunicator& comm, std::vector<double> values);
double Mean(const std::vector<double>& values);
double Median(std::vector<double> values);
double Min(const std::vector<double>& values);

// A plain-text table with right-aligned numeric columns.
class Table {
 public:
  explicit Table(std::vector<std::string> header) : header_(std::move(header)) {}
  void Add(std::vector<std::string> row) { rows_.push_back(std::move(row)); }
  void Print() const;

 private:
  std::vector<std::string> header_;
  std::vector<std::vector<std::string>> rows_;
};

// Writes {"benchmark": name, "context": {...}, <fields of `result`>} to `path` (rank 0).
void WriteJson(const std::string& path, const std::string& benchmark, const Context& context,
               const JsonObject& result);

// 1234567 -> "1.23M", 2345 -> "2.35k".
std::string Human(double value);

// Operator time under PyTorch's CPU profiler, summed over every call and thread.
struct OpTime {
  std::string name;
  double self_ms = 0;   // outside the operators it called
  double total_ms = 0;  // inclusive
  int64_t calls = 0;
};
// Starts the profiler on this thread; StopOpProfile returns the operators by descending self
// time and, when `trace_path` is not empty, writes a Chrome trace (chrome://tracing, Perfetto).
void StartOpProfile();
std::vector<OpTime> StopOpProfile(const std::string& trace_path);
// The `top` first of `ops` (from StopOpProfile over `steps` steps) as times per step and
// shares of `step_seconds`.
void PrintOpProfile(const std::vector<OpTime>& ops, int steps, double step_seconds, int top);

// Subcommands: return the process exit status (rank 0 prints, every rank runs).
int RunAllToAll(const std::vector<std::string>& args, distributed::MpiRuntime& mpi);
int RunCollectives(const std::vector<std::string>& args, distributed::MpiRuntime& mpi);
int RunStep(const std::vector<std::string>& args, distributed::MpiRuntime& mpi);
int RunMatmul(const std::vector<std::string>& args, distributed::MpiRuntime& mpi);
int RunMoe(const std::vector<std::string>& args, distributed::MpiRuntime& mpi);
int RunRouter(const std::vector<std::string>& args, distributed::MpiRuntime& mpi);

extern const char kAllToAllUsage[];
extern const char kCollectivesUsage[];
extern const char kStepUsage[];
extern const char kMatmulUsage[];
extern const char kMoeUsage[];
extern const char kRouterUsage[];

}  // namespace rmoe::bench
