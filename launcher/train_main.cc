// rmoe_train: trains the model a job spec describes.
#include <csignal>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>
#include <google/protobuf/stubs/common.h>
#include <mpi.h>
#include <torch/version.h>

#include "distributed/checkpointer.h"
#include "distributed/mpi_communicator.h"
#if RMOE_HAVE_NCCL
#include "distributed/nccl_communicator.h"
#endif
#include "distributed/parallel_runtime.h"
#include "distributed/routing_communicator.h"
#include "rmoe/config/job_spec.h"
#include "rmoe/config/resources.h"
#include "rmoe/platform/host_report.h"
#include "rmoe/train/device.h"
#include "rmoe/train/progress.h"
#include "rmoe/train/trainer.h"
#include "rmoe/util/cli.h"
#include "rmoe/util/files.h"

namespace {

constexpr char kUsage[] = R"(Usage: [mpirun -np N] rmoe_train --job SPEC.pbtxt [--set FIELD=VALUE]... [options]

Trains an RMoE language model as the job spec (protobuf text format, see
proto/job.proto and configs/) describes, evaluates it and saves it to
<output_dir>/model, where rmoe_generate can load it.

Without mpirun it is a world of one rank. Under mpirun (or srun) every rank reads its own
data; parallel.expert_parallel_size = P splits each MoE layer's experts over groups of P
ranks taken node by node (N must be a multiple of P, num_experts too). Rank 0 alone prints
progress, the layout (which ranks on which host) and writes metrics and the model; errors
name their rank. Across nodes, launch with tools/rmoe_mpirun.sh (mpirun with the settings
that end a job which lost a node) and keep the checkpoint directory on storage every node
sees (the first save checks): docs/multinode.md.

  --job PATH          the job spec (required)
  --set FIELD=VALUE   override one spec field, e.g. --set model.moe.num_experts=16,
                      --set model.router.kind=LINEAR, --set model.moe.moe_layers=1,3
                      (repeatable; applied in order, then the spec is validated)
  --resume [PATH]     continue from a checkpoint: PATH is a checkpoint directory or a
                      checkpoint root (its latest); without PATH, the latest checkpoint
                      under checkpoint.directory (default <output_dir>/checkpoints). The
                      layout may differ from the one that saved it; the model may not.
  --overwrite         a fresh run where an earlier run left its model, metrics.jsonl or
                      checkpoints replaces them; without it (or --resume) such a run stops
                      before training and lists what is there. Only what rmoe wrote is
                      ever deleted: directories it created carry a .rmoe-owner mark, and
                      anything else in the way is refused by name
  --dry-run           print the resolved spec, parameter counts and the memory estimate
                      per rank; allocates and trains nothing. (A real run checks the same
                      estimate against the memory available before it builds the model.)
  --quiet             no progress output
  --test-pause-before-commit S, --test-delay-background-write S
                      fault-injection hooks for the checkpoint tests: rank 0 pauses S
                      seconds before committing each save; background shard writes
                      start S seconds late
  --version           the libraries this build uses (LibTorch and its CUDA, NCCL, MPI,
                      Protobuf) and whether a CUDA device is visible
  --help              this text

The dataset (data.dataset_dir) must exist: run rmoe_prepare_data --job SPEC first.
Metrics go to <output_dir>/metrics.jsonl: first a "host" record (CPU, BLAS library and
kernels, threads, torch, measured fp32/bf16 product speed; also printed as the log's
"host:" lines, with warnings such as bf16 being slower than fp32 on this CPU), then one
record per logging step. The same scalars go to TensorBoard event files in output_dir
(tensorboard --logdir <output_dir>; logging.tensorboard=false turns them off).
BLAS kernels: with an OpenBLAS-based LibTorch and OPENBLAS_CORETYPE unset, rmoe_train
picks OpenBLAS's core from the CPU's features and restarts itself with it; every start
checks fp32 products numerically and stops if they are wrong. OPENBLAS_CORETYPE set by
you is always used. MKL (PyTorch's wheels) chooses its own kernels.
GPUs: --set runtime.device=cuda trains each rank on its own GPU (its local rank modulo the
GPUs it sees; start one rank per GPU: mpirun -np 8 rmoe_train ... on an 8-GPU node), with
tensors moved over NCCL and host numbers over MPI; cuda:N picks GPU N. Where no GPU is
usable (no device or driver, CUDA_VISIBLE_DEVICES empty, a build without CUDA or NCCL) the
run stops at once and says which. The losses are read from the GPU once per logging step:
a divergence is reported at the next logging step or checkpoint, before anything is saved.
A rank that stops or hangs no longer leaves the others waiting forever: a rank still in an
MPI collective after runtime.collective_timeout_seconds (default 300, 0 = no deadline)
prints which ranks are missing and in which collective the others wait, then aborts the
job (exit status non-zero); on GPUs, NCCL collectives get the same deadline.
Checkpoints: every checkpoint.interval steps, and on SIGTERM or SIGINT, which finish the
step in hand, save a checkpoint and exit 0 (a second signal ends the process at once).
Exit status: 0 done (or stopped by a signal after saving), 2 bad arguments or job spec,
1 failure while training.
)";

// Set by SIGTERM/SIGINT; the trainer stops after the step in hand and checkpoints.
std::atomic<bool> g_stop_requested{false};

void RequestStop(int) { g_stop_requested.store(true); }

void InstallStopHandlers() {
  struct sigaction action {};
  action.sa_handler = RequestStop;
  // The second signal gets the default action: a stuck save can still be interrupted.
  action.sa_flags = SA_RESETHAND;
  sigemptyset(&action.sa_mask);
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGINT, &action, nullptr);
}

constexpr char kResumeLatest[] = "<latest>";

// "rank 3: " when there are several ranks, so every error says where it happened.
std::string RankPrefix() {
  if (!rmoe::distributed::MpiRuntime::Exists()) return "";
  auto& world = rmoe::distributed::MpiRuntime::Get().World();
  return world.size() > 1 ? absl::StrFormat("rank %d: ", world.rank()) : "";
}

int Fail(int code, const std::string& message) {
  std::fprintf(stderr, "rmoe_train: %s%s\n", RankPrefix().c_str(), message.c_str());
  return code;
}

struct Arguments {
  std::string job_path;
  std::vector<std::string> overrides;
  std::string resume;
  bool dry_run = false, quiet = false, overwrite = false;
  rmoe::distributed::CheckpointTestHooks checkpoint_hooks;
};

// Which ranks run on which host and where the expert-parallel groups are (several ranks
// only; the dry run prints it as comments), and a warning when a group spans nodes.
void PrintLayout(const rmoe::distributed::NodeLayout& nodes, int expert_parallel_size, bool quiet,
                 const char* prefix = "") {
  const std::string warning = rmoe::distributed::ExpertGroupsSpanNodesWarning(nodes, expert_parallel_size);
  if (!warning.empty()) std::fprintf(stderr, "warning: %s\n", warning.c_str());
  if (quiet || nodes.ranks() < 2) return;
  for (const auto& line : rmoe::distributed::DescribeLayout(nodes, expert_parallel_size)) {
    std::printf("%s%s\n", prefix, line.c_str());
  }
  std::fflush(stdout);
}

// --dry-run: the resolved spec, parameter counts and memory estimate, from the spec alone.
int DryRun(rmoe::distributed::MpiRuntime& mpi, rmoe::JobSpec spec) {
  std::shared_ptr<rmoe::distributed::Communicator> world(
      &mpi.World(), [](rmoe::distributed::Communicator*) {});
  // The layout is checked as a real run would check it.
  auto groups = rmoe::distributed::ProcessGroups::Create(
      world, spec.parallel().expert_parallel_size(), spec.model().moe().num_experts(), mpi.Nodes());
  if (!groups.ok()) return Fail(2, std::string(groups.status().message()));
  if (world->rank() != 0) return 0;
  PrintLayout(groups->nodes, spec.parallel().expert_parallel_size(), /*quiet=*/false, "# ");
  auto vocab = rmoe::ResolveVocabSize(spec);
  if (!vocab.ok()) return Fail(2, std::string(vocab.status().message()));
  spec.mutable_model()->set_vocab_size(*vocab);
  // From the spec alone: a dry run allocates nothing, whatever the model's size.
  const rmoe::SpecParameterCounts counts = rmoe::CountSpecParameters(spec.model());
  std::printf("%s", rmoe::JobSpecToText(spec).c_str());
  std::printf("# parameters: %.0f total, %.0f active per token, %.0f in experts\n",
              counts.total, counts.active, counts.expert);
  const auto available = rmoe::AvailableMemoryBytes();
  rmoe::MemoryLayout layout;
  layout.world_size = world->size();
  std::printf("# memory per rank: about %s; available here: %s\n",
              rmoe::EstimateTrainingMemory(spec, layout).Describe().c_str(),
              available ? rmoe::FormatBytes(*available).c_str() : "unknown");
  return 0;
}

void PrintSummary(const rmoe::TrainSummary& summary, int ranks) {
  if (summary.stopped_early) {
    std::printf("stopped by a signal after step %d; checkpoint %s\nresume with --resume\n",
                summary.steps, summary.last_checkpoint.c_str());
    return;
  }
  const double gflops_per_rank = summary.gflops_per_second / ranks;
  std::printf(
      "done: %d steps in %s, %.0f tokens/s on %d ranks x %d threads (%.1f model GFLOP/s per "
      "rank%s); final val loss %.4f nats/token (ppl %.2f), best %.4f\nmodel saved to %s\n",
      summary.steps, rmoe::FormatDuration(summary.wall_seconds).c_str(),
      summary.tokens_per_second, ranks, summary.threads, gflops_per_rank,
      summary.fp32_probe_gflops > 0
          ? absl::StrFormat(", %.0f%% of the fp32 probe", 100 * gflops_per_rank / summary.fp32_probe_gflops).c_str()
          : "",
      summary.final_val_loss,
      std::exp(summary.final_val_loss), summary.best_val_loss, summary.model_dir.c_str());
}

// Everything after argument parsing, on every rank.
int TrainOnRanks(rmoe::distributed::MpiRuntime& mpi, const Arguments& args) {
  // Every rank reads the same spec, so every rank reaches the same verdict on it.
  auto spec = rmoe::LoadJobSpecWithOverrides(args.job_path, args.overrides);
  if (!spec.ok()) return Fail(2, std::string(spec.status().message()));
  // Before the groups are split off, so that their communicators inherit the deadline.
  const double timeout = spec->runtime().collective_timeout_seconds();
  mpi.World().set_collective_timeout_seconds(timeout);
  if (args.dry_run) return DryRun(mpi, *std::move(spec));

  // A GPU that is not there is reported now, before NCCL or the data are touched.
  auto device = rmoe::ResolveDevice(spec->runtime().device(), mpi.LocalRank());
  if (!device.ok()) return Fail(1, std::string(device.status().message()));
  auto communicator = rmoe::distributed::MakeTrainingCommunicator(mpi, *device, timeout);
  if (!communicator.ok()) {
    Fail(1, std::string(communicator.status().message()));
    if (mpi.World().size() > 1) {  // the others may wait in NCCL's start-up
      rmoe::distributed::AbortDeviceCommunicators(std::string(communicator.status().message()));
      mpi.Abort(1);
    }
    return 1;
  }
  // Every collective goes through the timer, which splits step time into compute and
  // communication in the metrics.
  auto timer = std::make_shared<rmoe::distributed::TimedCommunicator>(*std::move(communicator));
  std::shared_ptr<rmoe::distributed::Communicator> world = timer;
  auto groups = rmoe::distributed::ProcessGroups::Create(
      world, spec->parallel().expert_parallel_size(), spec->model().moe().num_experts(), mpi.Nodes());
  if (!groups.ok()) return Fail(2, std::string(groups.status().message()));
  if (world->rank() == 0) PrintLayout(groups->nodes, spec->parallel().expert_parallel_size(), args.quiet);

  rmoe::distributed::ShardedCheckpointer checkpointer(*groups, args.checkpoint_hooks);
  rmoe::distributed::DistributedRuntime runtime(*std::move(groups), mpi.LocalRank(), mpi.LocalSize(), timer);
  rmoe::TrainOptions options;
  options.quiet = args.quiet;
  options.resume = args.resume == kResumeLatest ? rmoe::CheckpointRoot(*spec) : args.resume;
  options.overwrite = args.overwrite;
  options.stop_requested = &g_stop_requested;
  InstallStopHandlers();
  absl::StatusOr<rmoe::TrainSummary> summary;
  try {
    summary = rmoe::Train(*spec, options, &runtime, &checkpointer);
  } catch (const c10::Error& e) {
    summary = absl::InternalError(e.what_without_backtrace());
  } catch (const std::exception& e) {
    summary = absl::InternalError(e.what());
  }
  if (!summary.ok()) {
    Fail(1, std::string(summary.status().message()));
    // Other ranks may be waiting in a collective for this one: end the whole job now, while
    // the communicators still exist (unwinding an NCCL communicator would wait for them).
    if (world->size() > 1) {
      rmoe::distributed::AbortDeviceCommunicators(std::string(summary.status().message()));
      mpi.Abort(1);
    }
    return 1;
  }
  if (world->rank() == 0) PrintSummary(*summary, world->size());
  return 0;
}

// What this binary was built with and runs on. Needs no GPU and does not start MPI.
void PrintVersion() {
  std::printf("rmoe_train\nLibTorch %s, %s\n", TORCH_VERSION,
              torch::cuda::is_available()
                  ? absl::StrFormat("CUDA available: %d device(s)", torch::cuda::device_count()).c_str()
                  : "CUDA unavailable (no device or driver): trains on the CPU");
#if RMOE_HAVE_NCCL
  std::printf("NCCL communicator: built; %s\n", rmoe::distributed::NcclBuildInfo().c_str());
#else
  std::printf("NCCL communicator: not built (CPU-only LibTorch or no NCCL at build time)\n");
#endif
  char mpi_library[MPI_MAX_LIBRARY_VERSION_STRING];
  int length = 0;
  MPI_Get_library_version(mpi_library, &length);
  const std::string mpi(mpi_library, length);
  std::printf("MPI: %s\nProtobuf %s\n", mpi.substr(0, mpi.find_first_of(",\n")).c_str(),
              google::protobuf::internal::VersionString(GOOGLE_PROTOBUF_VERSION).c_str());
}

int Run(int argc, char** argv) {
  rmoe::cli::Parser parser;
  parser.Value("--job", "a path")
      .Repeated("--set", "FIELD=VALUE")
      .OptionalValue("--resume", kResumeLatest)
      .Switch("--dry-run")
      .Switch("--overwrite")
      .Switch("--quiet")
      .Switch("--version")
      .Value("--test-pause-before-commit", "SECONDS")
      .Value("--test-delay-background-write", "SECONDS");
  const auto parsed = parser.Parse(rmoe::cli::Arguments(argc, argv));
  if (!parsed.ok()) return Fail(2, absl::StrCat(parsed.status().message(), " (see --help)"));
  if (parsed->help()) return rmoe::cli::PrintUsage(kUsage);
  if (parsed->Has("--version")) {
    PrintVersion();
    return 0;
  }
  Arguments args;
  args.job_path = parsed->Get("--job");
  if (args.job_path.empty()) return Fail(2, "--job SPEC.pbtxt is required (see --help)");
  args.overrides = parsed->All("--set");
  args.resume = parsed->Get("--resume");
  args.dry_run = parsed->Has("--dry-run");
  args.overwrite = parsed->Has("--overwrite");
  if (args.overwrite && !args.resume.empty()) {
    return Fail(2, "--overwrite and --resume contradict each other: a resumed run continues "
                   "the earlier one, --overwrite replaces it");
  }
  args.quiet = parsed->Has("--quiet");
  auto pause = parsed->Number("--test-pause-before-commit", 0, {0});
  auto delay = parsed->Number("--test-delay-background-write", 0, {0});
  if (!pause.ok()) return Fail(2, std::string(pause.status().message()));
  if (!delay.ok()) return Fail(2, std::string(delay.status().message()));
  args.checkpoint_hooks.pause_before_commit_seconds = *pause;
  args.checkpoint_hooks.delay_background_write_seconds = *delay;

  // Before MPI starts: either may re-execute this program with other BLAS kernels.
  rmoe::SelectBlasKernels(argv);
  if (auto blas = rmoe::VerifyBlasOrFallBack(argv); !blas.ok()) {
    return Fail(1, std::string(blas.message()));
  }
  rmoe::distributed::MpiRuntime mpi(&argc, &argv);
  // Exceptions are reported here, while MPI still knows this process's rank.
  try {
    return TrainOnRanks(mpi, args);
  } catch (const c10::Error& e) {
    Fail(1, e.what_without_backtrace());
  } catch (const std::exception& e) {
    Fail(1, e.what());
  }
  if (mpi.World().size() > 1) mpi.Abort(1);
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  rmoe::ReportFileSizeLimitAsErrors();
  try {
    return Run(argc, argv);
  } catch (const std::exception& e) {  // before MPI started: argument handling only
    return Fail(1, e.what());
  }
}
