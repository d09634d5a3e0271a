// rmoe_plan: per-rank memory and predicted step time of a job on N devices for every
// expert-parallel x data-parallel layout (rmoe/plan/plan.h), and calibration of hardware
// profiles from rmoe_bench's JSON outputs. Torch-free.
#include <cstdio>
#include <string>
#include <vector>

#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>
#include <absl/strings/str_join.h>

#include "rmoe/config/job_spec.h"
#include "rmoe/config/resources.h"
#include "rmoe/plan/plan.h"
#include "rmoe/util/cli.h"
#include "rmoe/util/files.h"
#include "rmoe/util/json.h"

namespace {

using rmoe::FormatBytes;
using rmoe::HardwareProfile;
using rmoe::JobSpec;
using rmoe::RuntimeSpec;
namespace plan = rmoe::plan;

constexpr char kUsage[] = R"(Usage: rmoe_plan --job SPEC.pbtxt [--set FIELD=VALUE]... --gpus N --hardware PROFILE.pbtxt
                 [--metrics metrics.jsonl] [--ranks-per-node R] [--spec-only] [--json OUT]
       rmoe_plan --calibrate BENCH.json [BENCH.json...] --out PROFILE.pbtxt [--hardware BASE.pbtxt]
       rmoe_plan --collectives --gpus N --hardware PROFILE.pbtxt [--ranks-per-node R]
                 [--sizes BYTES,...] [--json OUT]

Plans a training job on N devices before running it. For every layout of N ranks (EP =
parallel.expert_parallel_size dividing model.moe.num_experts and N, DP = N / EP; EP groups
of ranks taken node by node, as rmoe_train makes them), and for the spec's own options first and,
unless --spec-only, every other combination of activation recomputation (runtime.recompute
NONE, MOE, FULL) and ZeRO-1 (parallel.shard_optimizer_state): the memory one rank needs (the estimate
rmoe_train checks before it starts: parameters, gradients, AdamW moments, bf16 weight
copies, activations of one micro-batch, backward workspace, all-to-all and collective
buffers, plus the profile's runtime overhead), whether it fits the device, and the
predicted step time split into computation, all-to-all, gradient all-reduce, ZeRO-1
broadcasts and waiting in collectives (ranks drifting apart), with tokens/s over all ranks. The recommended layout is the fastest that fits.
These are predictions of a model (docs/scaling.md: its assumptions and how well it
matched measurements): nothing overlaps, the busiest rank sets the pace, collectives are
alpha-beta.

Hardware profiles (rmoe.HardwareProfile, proto/hardware.proto) are protobuf text:
configs/hardware/h100_sxm.pbtxt, h200_sxm.pbtxt, this_cpu.pbtxt (calibrated here).

Options:
  --job PATH            the job spec (required); the dataset need not exist. A vocab_size
                        of 0 becomes the tokenizer's (256 bytes, or the BPE vocab_size)
  --set FIELD=VALUE     override a spec field (repeatable), as rmoe_train
  --gpus N              ranks (devices) of the job (required)
  --hardware PATH       the hardware profile (required to plan)
  --ranks-per-node R    ranks on one node (default: the profile's devices_per_node); more
                        than the profile's devices on CPU cores means they share cores
  --metrics PATH        an rmoe_train metrics.jsonl: the per-layer tokens per expert (or
                        load CV) of its training records make the busiest rank of each
                        layout do more expert work and receive more rows than the mean
  --spec-only           only the spec's own recompute / ZeRO-1 options
  --compact             one row per layout: its fastest option that fits (the one needing
                        the least memory when none does)
  --json PATH           also write every row as JSON
  --collectives         instead of a plan: the all-reduce and all-to-all of each --sizes
                        buffer (bytes per rank, default 8,1024,65536,1048576,4194304,
                        16777216) over N ranks as the step's model charges them (one
                        bucket; even all-to-all splits), with nccl-tests' algbw and busbw:
                        what `rmoe_bench collectives` measures (docs/multinode.md)
  --calibrate FILE      rmoe_bench --json outputs (matmul, alltoall, step; the flag may be
                        repeated, or further files follow it) to fit a profile of this
                        machine: tools/plan_validate.sh runs them. The "peak_rss_bytes"
                        of step outputs gives the runtime overhead
  --out PATH            where --calibrate writes the profile
  --help                this text

Exit status: 0 done, 2 bad arguments or input (impossible layout, unreadable or malformed
profile), 1 other failures.
)";

int Fail(int status, const std::string& message) {
  std::fprintf(stderr, "rmoe_plan: %s\n", message.c_str());
  return status;
}

const char* RecomputeName(RuntimeSpec::Recompute r) {
  return r == RuntimeSpec::MOE ? "MOE" : r == RuntimeSpec::FULL ? "FULL" : "NONE";
}

std::string Gib(double bytes) { return absl::StrFormat("%.2f", bytes / (1 << 30)); }
std::string Ms(double seconds) {
  return seconds >= 10 ? absl::StrFormat("%.0f", seconds * 1e3)
                       : seconds >= 0.1 ? absl::StrFormat("%.1f", seconds * 1e3)
                                        : absl::StrFormat("%.2f", seconds * 1e3);
}
std::string Human(double v) {
  if (v >= 1e9) return absl::StrFormat("%.2fG", v / 1e9);
  if (v >= 1e6) return absl::StrFormat("%.2fM", v / 1e6);
  if (v >= 1e3) return absl::StrFormat("%.1fk", v / 1e3);
  return absl::StrFormat("%.1f", v);
}

void PrintTable(const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> width;
  for (const auto& row : rows) {
    width.resize(std::max(width.size(), row.size()), 0);
    for (size_t c = 0; c < row.size(); ++c) width[c] = std::max(width[c], row[c].size());
  }
  for (size_t r = 0; r < rows.size(); ++r) {
    std::string line;
    for (size_t c = 0; c < rows[r].size(); ++c) {
      if (c) line += "  ";
      line += c == 0 ? absl::StrFormat("%-*s", width[c], rows[r][c])
                     : absl::StrFormat("%*s", width[c], rows[r][c]);
    }
    std::printf("%s\n", line.c_str());
    if (r == 0) {
      size_t total = 0;
      for (size_t w : width) total += w + 2;
      std::printf("%s\n", std::string(total - 2, '-').c_str());
    }
  }
}

int RunCalibrate(const rmoe::cli::Args& args) {
  std::vector<std::string> files = args.All("--calibrate");
  for (const auto& p : args.positional()) files.push_back(p);
  if (!args.Has("--out")) return Fail(2, "--calibrate needs --out PROFILE.pbtxt");
  HardwareProfile base;
  if (args.Has("--hardware")) {
    auto loaded = plan::LoadHardwareProfile(args.Get("--hardware"));
    if (!loaded.ok()) return Fail(2, std::string(loaded.status().message()));
    base = *loaded;
  }
  auto profile = plan::Calibrate(files, base);
  if (!profile.ok()) return Fail(2, std::string(profile.status().message()));
  std::string header = absl::StrCat(
      "# Written by rmoe_plan --calibrate from ", absl::StrJoin(files, ", "),
      ".\n# Per device = one CPU core; the node's cores and memory are shared by its ranks.\n"
      "# peak_flops_*: the best rmoe_bench matmul product per thread (measured); intra_node:\n"
      "# alpha-beta of MPI_Alltoallv (rmoe_bench alltoall raw-tokens medians); inter_node: a\n"
      "# copy (no second node here); matmul_efficiency, memory_bandwidth_bytes_per_s and\n"
      "# op_overhead_s: least squares of one-rank rmoe_bench step computation times;\n"
      "# thread_scaling: one-rank runs on all cores against one thread;\n"
      "# compute_factor_*: several ranks' computation against one rank's;\n"
      "# collective_wait_fraction, collective_sync_*: least squares of the communication\n"
      "# time beyond alpha-beta of the step runs of several ranks;\n"
      "# runtime_overhead_bytes: peak RSS minus the predicted tensors of those runs.\n");
  const std::string text = header + plan::HardwareProfileToText(*profile);
  if (auto s = rmoe::WriteFileAtomically(args.Get("--out"), text); !s.ok()) {
    return Fail(1, std::string(s.message()));
  }
  std::printf("%s", text.c_str());
  std::printf("profile written to %s\n", args.Get("--out").c_str());
  return 0;
}

// The collectives alone, for comparison with `rmoe_bench collectives` on a real network.
int RunCollectives(const rmoe::cli::Args& args) {
  if (!args.Has("--gpus")) return Fail(2, "--collectives needs --gpus N (see --help)");
  if (!args.Has("--hardware")) return Fail(2, "--collectives needs --hardware PROFILE.pbtxt (see --help)");
  auto ranks = args.Int("--gpus", 1, 1, 1 << 24);
  if (!ranks.ok()) return Fail(2, std::string(ranks.status().message()));
  auto hw = plan::LoadHardwareProfile(args.Get("--hardware"));
  if (!hw.ok()) return Fail(2, std::string(hw.status().message()));
  auto per_node = args.Int("--ranks-per-node", hw->devices_per_node(), 1, 1 << 20);
  if (!per_node.ok()) return Fail(2, std::string(per_node.status().message()));
  auto sizes = args.IntList("--sizes", {8, 1024, 65536, 1048576, 4194304, 16777216}, 1);
  if (!sizes.ok()) return Fail(2, std::string(sizes.status().message()));
  const int p = static_cast<int>(*ranks), rpn = static_cast<int>(*per_node);
  std::vector<std::vector<std::string>> table = {
      {"op", "bytes", "predicted us", "algbw MB/s", "busbw MB/s"}};
  std::vector<rmoe::JsonObject> items;
  for (const char* op : {"allreduce", "alltoall"}) {
    const bool allreduce = std::string(op) == "allreduce";
    for (int64_t bytes : *sizes) {
      const double b = static_cast<double>(bytes);
      const double seconds =
          plan::AgreementSeconds(*hw, p, rpn) +
          (allreduce ? plan::AllReduceSeconds(b, p, rpn, hw->intra_node(), hw->inter_node(), b)
                     : plan::AllToAllSeconds(b, p, rpn, hw->intra_node(), hw->inter_node()));
      const double algbw = seconds > 0 ? b / seconds : 0;
      const double busbw = algbw * plan::BusBandwidthFactor(allreduce, p);
      table.push_back({op, absl::StrCat(bytes), absl::StrFormat("%.1f", seconds * 1e6),
                       absl::StrFormat("%.2f", algbw / 1e6), absl::StrFormat("%.2f", busbw / 1e6)});
      items.push_back(rmoe::JsonObject()
                          .Add("op", std::string(op))
                          .Add("bytes", bytes)
                          .Add("predicted_s", seconds)
                          .Add("algbw_bytes_per_s", algbw)
                          .Add("busbw_bytes_per_s", busbw));
    }
  }
  std::printf("%d ranks, %d per node, %s\n", p, rpn, args.Get("--hardware").c_str());
  PrintTable(table);
  if (args.Has("--json")) {
    rmoe::JsonObject out;
    out.Add("hardware", args.Get("--hardware"))
        .Add("ranks", static_cast<int64_t>(p))
        .Add("ranks_per_node", static_cast<int64_t>(rpn))
        .AddRaw("results", rmoe::JsonArray(items));
    if (auto s = rmoe::WriteFileAtomically(args.Get("--json"), rmoe::IndentJson(out.str()) + "\n"); !s.ok()) {
      return Fail(1, std::string(s.message()));
    }
  }
  return 0;
}

int RunPlan(const rmoe::cli::Args& args) {
  if (!args.Has("--job")) return Fail(2, "--job SPEC.pbtxt is required (see --help)");
  if (!args.Has("--gpus")) return Fail(2, "--gpus N is required (see --help)");
  if (!args.Has("--hardware")) return Fail(2, "--hardware PROFILE.pbtxt is required (see --help)");
  auto gpus = args.Int("--gpus", 1, 1, 1 << 24);
  if (!gpus.ok()) return Fail(2, std::string(gpus.status().message()));
  auto ranks_per_node = args.Int("--ranks-per-node", 0, 1, 1 << 20);
  if (!ranks_per_node.ok()) return Fail(2, std::string(ranks_per_node.status().message()));
  rmoe::ValidationOptions validation;
  validation.check_data_files = false;
  auto loaded = rmoe::LoadJobSpecWithOverrides(args.Get("--job"), args.All("--set"), validation);
  if (!loaded.ok()) return Fail(2, std::string(loaded.status().message()));
  JobSpec spec = *std::move(loaded);
  if (spec.model().vocab_size() <= 0) {
    const auto& tokenizer = spec.data().tokenizer();
    spec.mutable_model()->set_vocab_size(
        tokenizer.kind() == rmoe::TokenizerSpec::BPE ? tokenizer.vocab_size() : 256);
  }
  auto hw = plan::LoadHardwareProfile(args.Get("--hardware"));
  if (!hw.ok()) return Fail(2, std::string(hw.status().message()));
  std::optional<plan::RoutingLoads> routing;
  if (args.Has("--metrics")) {
    auto loads = plan::ReadRoutingLoads(args.Get("--metrics"));
    if (!loads.ok()) return Fail(2, std::string(loads.status().message()));
    routing = *std::move(loads);
  }
  plan::PlanOptions options;
  options.world = static_cast<int>(*gpus);
  options.ranks_per_node = static_cast<int>(*ranks_per_node);
  options.routing = routing ? &*routing : nullptr;
  options.variants = !args.Has("--spec-only");
  auto rows = plan::Plan(spec, *hw, options);
  if (!rows.ok()) return Fail(2, std::string(rows.status().message()));
  if (args.Has("--compact")) {
    // Per layout (rows of one layout are adjacent): the fastest that fits, else the smallest.
    std::vector<plan::PlanRow> kept;
    for (size_t i = 0; i < rows->size();) {
      size_t end = i, pick = i;
      while (end < rows->size() && (*rows)[end].layout.ep == (*rows)[i].layout.ep) ++end;
      for (size_t j = i; j < end; ++j) {
        const plan::PlanRow &a = (*rows)[j], &b = (*rows)[pick];
        const bool better = a.fits != b.fits ? a.fits
                            : a.fits         ? a.step.step_s < b.step.step_s
                                             : a.memory_per_rank < b.memory_per_rank;
        if (better) pick = j;
      }
      kept.push_back((*rows)[pick]);
      i = end;
    }
    *rows = std::move(kept);
  }

  const auto& m = spec.model();
  const rmoe::SpecParameterCounts counts = rmoe::CountSpecParameters(m);
  const double tokens_per_rank = static_cast<double>(spec.schedule().micro_batch_size()) *
                                 spec.schedule().seq_len() * spec.schedule().grad_accum_steps();
  std::printf("rmoe_plan: %s (%s) on %lld ranks of %s — PREDICTIONS of a model, not measurements\n",
              spec.name().c_str(), args.Get("--job").c_str(), static_cast<long long>(*gpus),
              hw->name().c_str());
  std::printf("model: d_model %d, %d layers, %d experts top-%d (hidden %d)%s, vocab %d, %s | "
              "%s parameters, %s active per token, %s in routed experts\n",
              m.d_model(), m.num_layers(), m.moe().num_experts(), m.moe().top_k(),
              m.moe().expert_hidden_dim(), m.moe().shared_expert() ? " + shared expert" : "",
              m.vocab_size(), RuntimeSpec::Precision_Name(spec.runtime().precision()).c_str(),
              Human(counts.total).c_str(), Human(counts.active).c_str(), Human(counts.expert).c_str());
  std::printf("batch: %d x %d tokens x %d accum per rank = %s tokens per rank per step, %s per step\n",
              spec.schedule().micro_batch_size(), spec.schedule().seq_len(),
              spec.schedule().grad_accum_steps(), Human(tokens_per_rank).c_str(),
              Human(tokens_per_rank * *gpus).c_str());
  const auto& first = rows->front();
  std::printf("device: %s memory per rank, %d ranks per node, %d node%s%s\n\n",
              FormatBytes(first.memory_available).c_str(), first.layout.ranks_per_node,
              first.layout.nodes, first.layout.nodes == 1 ? "" : "s",
              routing ? absl::StrFormat(" | routing skew from %s (%d records)",
                                        args.Get("--metrics"), routing->records).c_str()
                      : " | balanced routing assumed (no --metrics)");

  const int best = plan::Recommend(*rows);
  std::vector<std::vector<std::string>> table = {
      {"EP x DP", "recompute", "ZeRO-1", "mem GiB", "weights+grads+Adam", "activations", "other",
       "fits", "compute ms", "a2a ms", "allreduce ms", "bcast ms", "wait ms", "step ms", "tokens/s",
       ""}};
  for (size_t i = 0; i < rows->size(); ++i) {
    const plan::PlanRow& r = (*rows)[i];
    const auto& mem = r.memory;
    table.push_back(
        {absl::StrFormat("%d x %d", r.layout.ep, r.layout.dp), RecomputeName(r.recompute),
         r.zero1 ? "yes" : "no", Gib(r.memory_per_rank),
         Gib(mem.parameters + mem.gradients + mem.optimizer + mem.weight_copies),
         Gib(mem.activations + mem.workspace),
         Gib(mem.alltoall_buffers + mem.communication_buffers + hw->runtime_overhead_bytes()),
         r.fits ? "yes" : "NO", Ms(r.step.compute_s), Ms(r.step.alltoall_s), Ms(r.step.allreduce_s),
         Ms(r.step.broadcast_s), Ms(r.step.wait_s), Ms(r.step.step_s), Human(r.step.tokens_per_s),
         static_cast<int>(i) == best ? "<- recommended" : ""});
  }
  PrintTable(table);
  std::printf("\nmem GiB = weights+grads+Adam (fp32 parameters, gradients, AdamW moments, bf16 copies) + "
              "activations (one micro-batch, with the backward workspace) + other (all-to-all and "
              "collective buffers, %s runtime overhead)\n",
              FormatBytes(hw->runtime_overhead_bytes()).c_str());
  if (best < 0) {
    std::printf("\nno layout fits %s per rank: more devices, a smaller micro-batch or seq_len, "
                "recompute, or ZeRO-1. RMoE splits a model by expert parallelism only (with data "
                "parallelism and ZeRO-1's optimizer-state sharding): it has no tensor, pipeline or "
                "context parallelism and no ZeRO-2/3 yet, so every rank holds every non-expert "
                "parameter and gradient\n",
                FormatBytes(first.memory_available).c_str());
  } else {
    const plan::PlanRow& r = (*rows)[best];
    std::printf("\nrecommended: --set parallel.expert_parallel_size=%d%s%s (EP %d x DP %d): %s ms "
                "per step, %s tokens/s\n",
                r.layout.ep, r.zero1 ? " --set parallel.shard_optimizer_state=true" : "",
                r.recompute != RuntimeSpec::NONE
                    ? absl::StrCat(" --set runtime.recompute=", RecomputeName(r.recompute)).c_str()
                    : "",
                r.layout.ep, r.layout.dp, Ms(r.step.step_s).c_str(), Human(r.step.tokens_per_s).c_str());
    std::printf("  memory per rank %s: %s, runtime overhead %s\n", FormatBytes(r.memory_per_rank).c_str(),
                r.memory.Breakdown().c_str(), FormatBytes(hw->runtime_overhead_bytes()).c_str());
    std::vector<std::string> parts;
    for (const auto& [name, bytes] : r.memory.activation_parts) {
      parts.push_back(absl::StrCat(name, " ", FormatBytes(bytes)));
    }
    std::printf("  activations: %s\n", absl::StrJoin(parts, ", ").c_str());
    parts.clear();
    for (const auto& [name, flops] : r.step.flops_parts) {
      if (flops > 0) parts.push_back(absl::StrCat(name, " ", Human(flops)));
    }
    std::printf("  FLOPs per rank per step (with backward%s): %s\n",
                r.recompute != RuntimeSpec::NONE ? " and recomputation" : "", absl::StrJoin(parts, ", ").c_str());
    std::printf("  compute %s ms = products %s + element-wise %s + operator overhead %s | routing "
                "skew %.2f\n",
                Ms(r.step.compute_s).c_str(), Ms(r.step.compute_matmul_s).c_str(),
                Ms(r.step.compute_memory_s).c_str(), Ms(r.step.compute_overhead_s).c_str(), r.skew);
  }

  if (args.Has("--json")) {
    std::vector<rmoe::JsonObject> items;
    for (size_t i = 0; i < rows->size(); ++i) {
      const plan::PlanRow& r = (*rows)[i];
      rmoe::JsonObject parts;
      for (const auto& [name, bytes] : r.memory.activation_parts) parts.Add(name, bytes);
      items.push_back(rmoe::JsonObject()
                          .Add("expert_parallel_size", static_cast<int64_t>(r.layout.ep))
                          .Add("data_parallel_size", static_cast<int64_t>(r.layout.dp))
                          .Add("recompute", std::string(RecomputeName(r.recompute)))
                          .Add("shard_optimizer_state", static_cast<int64_t>(r.zero1))
                          .Add("routing_skew", r.skew)
                          .Add("memory_per_rank_bytes", r.memory_per_rank)
                          .Add("memory_available_bytes", r.memory_available)
                          .Add("fits", static_cast<int64_t>(r.fits))
                          .Add("parameters_bytes", r.memory.parameters)
                          .Add("gradients_bytes", r.memory.gradients)
                          .Add("optimizer_bytes", r.memory.optimizer)
                          .Add("weight_copies_bytes", r.memory.weight_copies)
                          .Add("activations_bytes", r.memory.activations)
                          .AddRaw("activation_parts_bytes", parts.str())
                          .Add("workspace_bytes", r.memory.workspace)
                          .Add("alltoall_buffers_bytes", r.memory.alltoall_buffers)
                          .Add("communication_buffers_bytes", r.memory.communication_buffers)
                          .Add("runtime_overhead_bytes", hw->runtime_overhead_bytes())
                          .Add("matmul_flops", r.step.matmul_flops)
                          .Add("compute_s", r.step.compute_s)
                          .Add("compute_matmul_s", r.step.compute_matmul_s)
                          .Add("compute_memory_s", r.step.compute_memory_s)
                          .Add("compute_overhead_s", r.step.compute_overhead_s)
                          .Add("alltoall_s", r.step.alltoall_s)
                          .Add("allreduce_s", r.step.allreduce_s)
                          .Add("broadcast_s", r.step.broadcast_s)
                          .Add("wait_s", r.step.wait_s)
                          .Add("collectives", r.step.collectives)
                          .Add("step_s", r.step.step_s)
                          .Add("tokens_per_s", r.step.tokens_per_s)
                          .Add("recommended", static_cast<int64_t>(static_cast<int>(i) == best)));
    }
    rmoe::JsonObject out;
    out.Add("job", args.Get("--job"))
        .Add("overrides", args.All("--set"))
        .Add("hardware", args.Get("--hardware"))
        .Add("ranks", static_cast<int64_t>(*gpus))
        .Add("parameters_total", counts.total)
        .Add("parameters_active", counts.active)
        .AddRaw("rows", rmoe::JsonArray(items));
    if (auto s = rmoe::WriteFileAtomically(args.Get("--json"), rmoe::IndentJson(out.str()) + "\n"); !s.ok()) {
      return Fail(1, std::string(s.message()));
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  rmoe::cli::Parser parser("rmoe_plan");
  parser.Value("--job", "a job spec path")
      .Repeated("--set", "FIELD=VALUE")
      .Value("--gpus", "a number of ranks")
      .Value("--hardware", "a hardware profile path")
      .Value("--metrics", "an rmoe_train metrics.jsonl")
      .Value("--ranks-per-node", "a number of ranks")
      .Switch("--spec-only")
      .Switch("--compact")
      .Value("--json", "an output path")
      .Repeated("--calibrate", "an rmoe_bench JSON path")
      .Value("--out", "a profile path")
      .Switch("--collectives")
      .Value("--sizes", "a list of byte counts")
      .Positionals(1 << 16);
  auto args = parser.Parse(rmoe::cli::Arguments(argc, argv));
  if (!args.ok()) return Fail(2, std::string(args.status().message()));
  if (args->help()) return rmoe::cli::PrintUsage(kUsage);
  try {
    if (args->Has("--calibrate")) return RunCalibrate(*args);
    if (args->Has("--collectives")) return RunCollectives(*args);
    if (!args->positional().empty()) {
      return Fail(2, absl::StrCat("unexpected argument \"", args->positional()[0], "\" (see --help)"));
    }
    return RunPlan(*args);
  } catch (const std::exception& e) {
    return Fail(1, e.what());
  }
}
