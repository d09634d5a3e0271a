// rmoe_bench step: whole training steps of a job's model on random tokens, wired like
// rmoe_train (DistributedRuntime over a TimedCommunicator), split into communication and
// computation, with the model's FLOPs per token and the FLOP rate achieved.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>

#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>
#include <absl/strings/str_join.h>
#include <ATen/DeviceAccelerator.h>
#include <torch/torch.h>

#include "distributed/parallel_runtime.h"
#include "distributed/routing_communicator.h"
#include "distributed/timed_communicator.h"
#include "rmoe/config/job_spec.h"
#include "rmoe/model/transformer.h"
#include "rmoe/platform/host_report.h"
#include "rmoe/train/device.h"
#include "rmoe/train/trainer.h"
#include "tools/bench_common.h"

namespace rmoe::bench {

const char kStepUsage[] = R"(Usage: [mpirun -np N] rmoe_bench step --job SPEC.pbtxt [--set FIELD=VALUE]... [options]

Runs training steps of the job's model exactly as rmoe_train does (same DistributedRuntime:
expert sharding over parallel.expert_parallel_size, bucketed gradient all-reduce, global
norm clipping, AdamW; every collective through one TimedCommunicator), on uniformly random
tokens instead of the dataset (none is needed). The vocabulary is model.vocab_size, or 2048
when that is 0 (set --set model.vocab_size=N to match a dataset). Each rank draws its own
micro-batches of schedule.micro_batch_size x schedule.seq_len, grad_accum_steps per step.

Reported (means over the timed steps, then over ranks; "median" and "best" are the median
and the minimum over steps of the rank-mean step time): step time, communication time (time
inside the communicator: all-to-alls, gradient all-reduce, loss averaging, the clipping
norm; it includes waiting for slower ranks) and computation (the rest), tokens/s over all
ranks, and the model FLOPs:
  FLOPs/token = 6 * N + 12 * num_layers * d_model * seq_len
where N is the parameters one token uses in matrix products: the active parameters
(ParameterCounts::active: every parameter except the E - k routed experts a token skips in
each MoE layer), minus the input embedding table when it is not tied to the LM head (a
lookup, not a product). 6 N is forward (2 N) + backward (4 N); the second term is the
attention scores and weighted values (2 * 2 * seq_len * d_model per layer forward, times 3),
without discounting the causal mask (the PaLM convention). GFLOP/s = FLOPs/token x tokens/s.

Mixed precision: --set runtime.precision=BF16 runs the products of attention, SwiGLU and
the experts in bf16, as rmoe_train does (compare the tokens/s of both in one session).

GPUs: --set runtime.device=cuda runs the steps on each rank's GPU, wired as rmoe_train
(NCCL for tensors, MPI for host numbers). Each step ends with a device synchronisation so
that its time is the GPU's; the ceiling is then the GPU's own product speed (8192^3 in the
spec's precision, measured in the same run), the peak allocated device memory of the timed
steps is reported, and --peak-tflops T adds the model FLOP utilisation against a datasheet
peak (989 for an H100/H200's dense bf16).

Options:
  --job PATH          the job spec (required); not checked against a dataset
  --set FIELD=VALUE   override a spec field (repeatable), as rmoe_train
  --steps N           timed steps (default 10)
  --warmup W          untimed steps first (default 2)
  --profile TRACE     profile the timed steps with PyTorch's CPU profiler: print the
                      operators by self time per step (time outside the operators they call;
                      autograd's backward nodes appear as "autograd::engine::evaluate_function:
                      ...") and write a Chrome trace to TRACE (open in Perfetto). The profiler
                      slows small operators: take step times from a run without it
  --profile-top N     operators in that table (default 30)
  --threads T         intra-op threads per rank (default: runtime.num_threads, or the
                      cores divided among the ranks of this node, as rmoe_train)
  --json PATH         also write the results as JSON
  --peak-tflops T     the device's datasheet peak, for the utilisation column (default: none)
)";

int RunStep(const std::vector<std::string>& args, distributed::MpiRuntime& mpi) {
  const Options o(args, {"--job", "--set", "--steps", "--warmup", "--profile", "--profile-top",
                         "--peak-tflops"},
                  {"--set"});
  if (!o.Has("--job")) throw UsageError("--job SPEC.pbtxt is required (see --help)");
  const int steps = static_cast<int>(o.Int("--steps", 10));
  const int warmup = static_cast<int>(o.Int("--warmup", 2, 0));
  ValidationOptions validation;
  validation.check_data_files = false;
  auto loaded = LoadJobSpecWithOverrides(o.String("--job", ""), o.All("--set"), validation);
  if (!loaded.ok()) throw UsageError(std::string(loaded.status().message()));
  JobSpec spec = *std::move(loaded);
  if (spec.model().vocab_size() <= 0) spec.mutable_model()->set_vocab_size(2048);

  auto& world = mpi.World();
  auto resolved = ResolveDevice(spec.runtime().device(), mpi.LocalRank());
  if (!resolved.ok()) throw std::runtime_error(std::string(resolved.status().message()));
  const torch::Device device = *resolved;
  auto communicator = distributed::MakeTrainingCommunicator(
      mpi, device, spec.runtime().collective_timeout_seconds());
  if (!communicator.ok()) throw std::runtime_error(std::string(communicator.status().message()));
  // As rmoe_train: every collective goes through the timer.
  auto timer = std::make_shared<distributed::TimedCommunicator>(*std::move(communicator));
  auto groups = distributed::ProcessGroups::Create(timer, spec.parallel().expert_parallel_size(),
                                                   spec.model().moe().num_experts(), mpi.Nodes());
  if (!groups.ok()) throw UsageError(std::string(groups.status().message()));
  distributed::DistributedRuntime runtime(*std::move(groups), mpi.LocalRank(), mpi.LocalSize(), timer);
  const int threads = static_cast<int>(o.Int("--threads", spec.runtime().num_threads() > 0
                                                              ? spec.runtime().num_threads()
                                                              : 0));
  SetThreads(threads, mpi.LocalSize());
  const Context context = GatherContext(mpi, world);
  // The in-run ceiling: this process's fp32 product speed at a size the step's largest
  // products approach, measured before and after the steps (same threads; the better of the
  // two, since a shared machine's speed drifts) so that "% of ceiling" is a ratio within one
  // run.
  const auto ceiling_dtype = device.is_cpu() ? torch::kFloat : MatmulDtype(spec).value_or(torch::kFloat);
  auto probe_ceiling = [&] {
    return device.is_cpu() ? ProbeMatmulGflops(torch::kFloat, 512, 0.3)
                           : ProbeMatmulGflops(ceiling_dtype, 8192, 0.5, device);
  };
  double ceiling_gflops = probe_ceiling();
  const bool is_main = world.rank() == 0;

  torch::manual_seed(spec.seed());  // every rank builds the same model
  const LowPrecisionMatmulGuard precision(MatmulDtype(spec));  // runtime.precision
  if (spec.runtime().keep_freed_memory() && device.is_cpu()) KeepFreedMemoryForReuse();
  Transformer model(spec.model());
  model->train();
  model->set_recompute(spec.runtime().recompute());
  const ParameterCounts counts = model->CountParameters();
  runtime.ShardExperts(model);
  model->to(device);
  auto optimizer = MakeOptimizer(
      spec, model, runtime.OptimizerParameters(model, spec.parallel().shard_optimizer_state()));

  const auto& m = spec.model();
  const int64_t batch = spec.schedule().micro_batch_size(), seq_len = spec.schedule().seq_len();
  const int accum = spec.schedule().grad_accum_steps();
  const int ranks = world.size(), ep = spec.parallel().expert_parallel_size();
  const int64_t tokens_per_step = batch * seq_len * accum * ranks;
  const int64_t matmul_params = model->MatmulParametersPerToken();
  const double flops_per_token = model->TrainingFlopsPerToken(seq_len);
  if (is_main) {
    PrintContext(context);
    std::printf("step: %s (%s) | d_model %d, %d layers, %d experts top-%d (hidden %d), router %s, "
                "vocab %d\n",
                spec.name().c_str(), o.String("--job", "").c_str(), m.d_model(), m.num_layers(),
                m.moe().num_experts(), m.moe().top_k(), m.moe().expert_hidden_dim(),
                RouterSpec::Kind_Name(m.router().kind()).c_str(), m.vocab_size());
    std::printf("      %.2fM parameters, %.2fM active per token | %d ranks = DP %d x EP %d | "
                "%lld x %lld tokens x %d accum per rank = %lld tokens/step | %d steps after %d "
                "warm-up\n\n",
                counts.total / 1e6, counts.active / 1e6, ranks, ranks / ep, ep,
                static_cast<long long>(batch), static_cast<long long>(seq_len), accum,
                static_cast<long long>(tokens_per_step), steps, warmup);
  }

  torch::manual_seed(spec.seed() * 7919 + 17 + world.rank());  // this rank's random tokens
  std::vector<double> step_seconds, comm_seconds;
  const bool profile = o.Has("--profile");
  for (int step = 0; step < warmup + steps; ++step) {
    if (profile && step == warmup) StartOpProfile();
    if (!device.is_cpu() && step == warmup) at::accelerator::resetPeakStats(device.index());
    std::vector<torch::Tensor> windows;
    for (int micro = 0; micro < accum; ++micro) {
      windows.push_back(
          torch::randint(0, m.vocab_size(), {batch, seq_len + 1}, torch::kLong).to(device));
    }
    if (!device.is_cpu()) at::accelerator::synchronizeDevice(device.index());
    runtime.TakeCommunicationSeconds();
    const auto start = Clock::now();
    model->zero_grad(/*set_to_none=*/true);  // every gradient, as rmoe_train
    for (const auto& window : windows) {
      auto inputs = window.narrow(1, 0, seq_len), targets = window.narrow(1, 1, seq_len);
      auto output = model->forward(inputs);
      auto lm_loss = LanguageModelLoss(output.logits, targets);
      ((lm_loss + output.router_loss) / accum).backward();
    }
    runtime.SynchronizeGradients(model);
    runtime.ClipGradients(model, spec.optimizer().grad_clip());
    optimizer->step();
    runtime.ShareUpdatedParameters(model);
    // The step's time is the device's, not the time to queue it.
    if (!device.is_cpu()) at::accelerator::synchronizeDevice(device.index());
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    const double comm = runtime.TakeCommunicationSeconds();
    if (step >= warmup) {
      step_seconds.push_back(seconds);
      comm_seconds.push_back(comm);
    }
  }

  std::vector<OpTime> ops;
  if (profile) ops = StopOpProfile(is_main ? o.String("--profile", "") : "");
  ceiling_gflops = std::max(ceiling_gflops, probe_ceiling());
  const double peak_device_bytes =
      device.is_cpu() ? 0
                      : static_cast<double>(
                            at::accelerator::getDeviceStats(device.index()).allocated_bytes[0].peak);
  const double peak_tflops = o.Double("--peak-tflops", 0);

  const double my_step = Mean(step_seconds), my_comm = Mean(comm_seconds);
  const auto sums = SumOverRanks(world, {my_step, my_comm});
  // The process's high-water mark (model, optimizer, activations, buffers, libraries): what
  // a memory plan for this machine must fit, the largest of any rank.
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  const double my_peak_rss = static_cast<double>(usage.ru_maxrss) * 1024;
  const auto maxima = MaxOverRanks(world, {my_step, my_comm, -my_comm, my_peak_rss});
  const double peak_rss_bytes = maxima[3];
  const double step_s = sums[0] / ranks, comm_s = sums[1] / ranks, compute_s = step_s - comm_s;
  const double tokens_per_s = tokens_per_step / step_s;
  const double gflops = flops_per_token * tokens_per_s / 1e9;
  const auto rank_mean_steps = MeanOverRanks(world, step_seconds);
  const double median_step = Median(rank_mean_steps), best_step = Min(rank_mean_steps);

  Table table({"ranks", "DP x EP", "step ms", "median ms", "best ms", "comm ms", "compute ms", "comm %",
               "comm ms min..max", "tokens/s", "GFLOP/s", "GFLOP/s/rank", "% of ceiling"});
  table.Add({absl::StrCat(ranks), absl::StrFormat("%d x %d", ranks / ep, ep),
             absl::StrFormat("%.1f", step_s * 1e3), absl::StrFormat("%.1f", median_step * 1e3),
             absl::StrFormat("%.1f", best_step * 1e3),
             absl::StrFormat("%.1f", comm_s * 1e3), absl::StrFormat("%.1f", compute_s * 1e3),
             absl::StrFormat("%.0f%%", 100 * comm_s / step_s),
             absl::StrFormat("%.1f..%.1f", -maxima[2] * 1e3, maxima[1] * 1e3),
             Human(tokens_per_s), absl::StrFormat("%.2f", gflops),
             absl::StrFormat("%.2f", gflops / ranks),
             absl::StrFormat("%.0f%%", 100 * gflops / ranks / ceiling_gflops)});
  if (is_main) {
    std::printf("FLOPs/token = 6 x %lld + 12 x %d x %d x %lld = %s\n",
                static_cast<long long>(matmul_params), m.num_layers(), m.d_model(),
                static_cast<long long>(seq_len), Human(flops_per_token).c_str());
    table.Print();
    if (device.is_cpu()) {
      std::printf("ceiling: fp32 512^3 products at %.1f GFLOP/s on %d thread%s of rank 0, the "
                  "better of a probe before and one after the steps | peak resident memory "
                  "%.1f MiB (the largest rank)\n",
                  ceiling_gflops, context.threads, context.threads == 1 ? "" : "s",
                  peak_rss_bytes / (1 << 20));
    } else {
      std::printf("ceiling: %s 8192^3 products on %s at %.1f TFLOP/s, the better of a probe "
                  "before and one after the steps | peak device memory %.2f GiB\n",
                  c10::toString(ceiling_dtype), device.str().c_str(), ceiling_gflops / 1e3,
                  peak_device_bytes / (1 << 30));
    }
    if (peak_tflops > 0) {
      std::printf("model FLOP utilisation: %.1f%% of the %.0f TFLOP/s datasheet peak per rank\n",
                  100 * gflops / ranks / (peak_tflops * 1e3), peak_tflops);
    }
    std::printf("\n");
    if (profile) PrintOpProfile(ops, steps, step_s, static_cast<int>(o.Int("--profile-top", 30)));
  }
  JsonObject result;
  result.Add("job", o.String("--job", ""))
      .Add("overrides", absl::StrJoin(o.All("--set"), " "))
      .Add("name", spec.name())
      .Add("ranks", static_cast<int64_t>(ranks))
      .Add("expert_parallel_size", static_cast<int64_t>(ep))
      .Add("data_parallel_size", static_cast<int64_t>(ranks / ep))
      .Add("vocab_size", static_cast<int64_t>(m.vocab_size()))
      .Add("parameters_total", counts.total)
      .Add("parameters_active", counts.active)
      .Add("matmul_parameters_per_token", matmul_params)
      .Add("tokens_per_step", tokens_per_step)
      .Add("steps", static_cast<int64_t>(steps))
      .Add("warmup", static_cast<int64_t>(warmup))
      .Add("step_s", step_s)
      .Add("median_step_s", median_step)
      .Add("best_step_s", best_step)
      .Add("comm_s", comm_s)
      .Add("comm_s_min", -maxima[2])
      .Add("comm_s_max", maxima[1])
      .Add("compute_s", compute_s)
      .Add("tokens_per_s", tokens_per_s)
      .Add("flops_per_token", flops_per_token)
      .Add("gflops_per_s", gflops)
      .Add("gflops_per_s_per_rank", gflops / ranks)
      .Add("ceiling_gflops_per_s", ceiling_gflops)
      .Add("device", device.str())
      .Add("peak_device_memory_bytes", peak_device_bytes)
      .Add("peak_rss_bytes", peak_rss_bytes)
      .Add("peak_tflops", peak_tflops)
      .Add("model_flop_utilisation", peak_tflops > 0 ? gflops / ranks / (peak_tflops * 1e3) : 0.0)
      .Add("rank0_step_seconds", step_seconds)
      .Add("rank0_comm_seconds", comm_seconds);
  if (is_main) WriteJson(o.String("--json", ""), "step", context, result);
  return 0;
}

}  // namespace rmoe::bench
