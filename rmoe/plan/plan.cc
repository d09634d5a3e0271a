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

constexpr double kBucketBytes = 16.0 * (1 << 20);  // DistributedRuntime's bucket
constexpr double kFloat = 4;

class CollectErrors : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, google::protobuf::io::ColumnNumber column,
                const std::string& message) override {
    errors.push_back(absl::StrFormat("line %d column %d: %s", line + 1, column + 1, message));
  }
  std::vector<std::string> errors;
};

double DenseHidden(const ModelSpec& m) {
  return m.dense_hidden_dim() > 0 ? m.dense_hidden_dim() : m.moe().expert_hidden_dim();
}
double SharedHidden(const MoESpec& moe) {
  if (!moe.shared_expert()) return 0;
  return moe.shared_expert_hidden_dim() > 0 ? moe.shared_expert_hidden_dim() : moe.expert_hidden_dim();
}

}  // namespace

// ------------------------------------------------------------------ hardware profiles

absl::Status ValidateHardwareProfile(const HardwareProfile& p) {
  std::vector<std::string> problems;
  auto positive = [&](const char* field, bool has, double value) {
    if (!has) {
      problems.push_back(absl::StrCat(field, " is required"));
    } else if (!(value > 0) || !std::isfinite(value)) {
      problems.push_back(absl::StrCat(field, " = ", value, " must be > 0"));
    }
  };
  positive("peak_flops_fp32", p.has_peak_flops_fp32(), p.peak_flops_fp32());
  if (p.has_peak_flops_bf16()) positive("peak_flops_bf16", true, p.peak_flops_bf16());
  positive("memory_bandwidth_bytes_per_s", p.has_memory_bandwidth_bytes_per_s(),
           p.memory_bandwidth_bytes_per_s());
  positive("memory_bytes", p.has_memory_bytes(), p.memory_bytes());
  if (!(p.matmul_efficiency() > 0 && p.matmul_efficiency() <= 1)) {
    problems.push_back(absl::StrCat("matmul_efficiency = ", p.matmul_efficiency(), " must be in (0, 1]"));
  }
  if (p.devices_per_node() < 1) {
    problems.push_back(absl::StrCat("devices_per_node = ", p.devices_per_node(), " must be >= 1"));
  }
  if (!(p.runtime_overhead_bytes() >= 0)) problems.push_back("runtime_overhead_bytes must be >= 0");
  if (!(p.op_overhead_s() >= 0)) problems.push_back("op_overhead_s must be >= 0");
  if (!(p.collective_wait_fraction() >= 0)) problems.push_back("collective_wait_fraction must be >= 0");
  if (!(p.collective_sync_s() >= 0)) problems.push_back("collective_sync_s must be >= 0");
  if (!(p.collective_sync_oversubscribed_s() >= 0)) {
    problems.push_back("collective_sync_oversubscribed_s must be >= 0");
  }
  if (!(p.compute_factor_shared() > 0) || !(p.compute_factor_oversubscribed() > 0)) {
    problems.push_back("compute_factor_shared and compute_factor_oversubscribed must be > 0");
  }
  if (!(p.thread_scaling() > 0 && p.thread_scaling() <= 1)) {
    problems.push_back(absl::StrCat("thread_scaling = ", p.thread_scaling(), " must be in (0, 1]"));
  }
  for (const auto& [name, link] : {std::pair<const char*, const LinkSpec*>{"intra_node", &p.intra_node()},
                                   {"inter_node", &p.inter_node()}}) {
    const bool has = name[1] == 'n' ? p.has_intra_node() : p.has_inter_node();
    if (!has) {
      problems.push_back(absl::StrCat(name, " { bandwidth_bytes_per_s latency_s } is required"));
      continue;
    }
    positive(absl::StrCat(name, ".bandwidth_bytes_per_s").c_str(), link->has_bandwidth_bytes_per_s(),
             link->bandwidth_bytes_per_s());
    if (!(link->latency_s() >= 0)) problems.push_back(absl::StrCat(name, ".latency_s must be >= 0"));
  }
  if (problems.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("hardware profile: ", absl::StrJoin(problems, "; ")));
}

absl::StatusOr<HardwareProfile> ParseHardwareProfile(const std::string& text, const std::string& name) {
  HardwareProfile profile;
  google::protobuf::TextFormat::Parser parser;
  CollectErrors errors;
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(text, &profile)) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, " is not a valid hardware profile (rmoe.HardwareProfile, proto/hardware.proto): ",
        absl::StrJoin(errors.errors, "; ")));
  }
  if (auto status = ValidateHardwareProfile(profile); !status.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": ", status.message()));
  }
  return profile;
}

absl::StatusOr<HardwareProfile> LoadHardwareProfile(const std::string& path) {
  auto text = ReadFile(path, "hardware profile");
  if (!text.ok()) return text.status();
  return ParseHardwareProfile(*text, path);
}

std::string HardwareProfileToText(const HardwareProfile& profile) {
  std::string text;
  google::protobuf::TextFormat::Printer printer;
  printer.PrintToString(profile, &text);
  return text;
}

// ------------------------------------------------------------------ layouts

absl::StatusOr<std::vector<Layout>> EnumerateLayouts(int num_experts, int world, int ranks_per_node) {
  if (world < 1) return absl::InvalidArgumentError(absl::StrCat("--gpus ", world, " must be >= 1"));
  if (ranks_per_node < 1) {
    return absl::InvalidArgumentError(absl::StrCat("ranks per node ", ranks_per_node, " must be >= 1"));
  }
  if (world > ranks_per_node && world % ranks_per_node != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%d ranks do not fill whole nodes of %d: use a multiple of %d (or at most %d)", world,
        ranks_per_node, ranks_per_node, ranks_per_node));
  }
  std::vector<Layout> layouts;
  const int per_node = std::min(world, ranks_per_node);
  for (int ep = 1; ep <= world; ++ep) {
    if (world % ep != 0 || num_experts % ep != 0) continue;
    Layout l;
    l.world = world;
    l.ep = ep;
    l.dp = world / ep;
    l.ranks_per_node = per_node;
    l.nodes = (world + per_node - 1) / per_node;
    l.ep_spans_nodes = ep > per_node;
    l.world_spans_nodes = world > per_node;
    layouts.push_back(l);
  }
  return layouts;
}

// ------------------------------------------------------------------ collectives

double AllReduceBusBandwidth(int p, int ranks_per_node, const LinkSpec& intra, const LinkSpec& inter) {
  const int in_node = std::min(p, ranks_per_node);
  if (p <= in_node) return intra.bandwidth_bytes_per_s();
  // Across nodes the reduction runs as several rings (NCCL's channels), each leaving the node
  // through another device's network link: the node's links together carry it.
  return std::min(intra.bandwidth_bytes_per_s(), in_node * inter.bandwidth_bytes_per_s());
}

double RingAllReduceSeconds(double bytes, int p, int ranks_per_node, const LinkSpec& intra,
                            const LinkSpec& inter, double bucket_bytes) {
  if (p <= 1 || bytes <= 0) return 0;
  const bool spans = p > ranks_per_node;
  const int nodes = spans ? (p + ranks_per_node - 1) / ranks_per_node : 1;
  const int in_node = std::min(p, ranks_per_node);
  const double latency = 2.0 * (in_node - 1) * intra.latency_s() + 2.0 * (nodes - 1) * inter.latency_s();
  const double buckets = std::max(1.0, std::ceil(bytes / bucket_bytes));
  return buckets * latency +
         2.0 * (p - 1) / p * bytes / AllReduceBusBandwidth(p, ranks_per_node, intra, inter);
}

double AllReduceSeconds(double bytes, int p, int ranks_per_node, const LinkSpec& intra,
                        const LinkSpec& inter, double bucket_bytes) {
  if (p <= 1 || bytes <= 0) return 0;
  const double ring = RingAllReduceSeconds(bytes, p, ranks_per_node, intra, inter, bucket_bytes);
  const LinkSpec& slow = p > ranks_per_node ? inter : intra;
  const double buckets = std::max(1.0, std::ceil(bytes / bucket_bytes));
  const double tree = buckets * 2 * std::ceil(std::log2(static_cast<double>(p))) * slow.latency_s() +
                      2.0 * (p - 1) / p * bytes / AllReduceBusBandwidth(p, ranks_per_node, intra, inter);
  return std::min(ring, tree);
}

double AllToAllSeconds(double bytes, int p, int ranks_per_node, const LinkSpec& intra,
                       const LinkSpec& inter) {
  if (p <= 1 || bytes <= 0) return 0;
  const int in_node = std::min(p, ranks_per_node);
  const double intra_bytes = bytes * (in_node - 1) / p, inter_bytes = bytes * (p - in_node) / p;
  const double latency = (p - 1) * (p > in_node ? inter.latency_s() : intra.latency_s());
  return latency + std::max(intra_bytes / intra.bandwidth_bytes_per_s(),
                            inter_bytes / inter.bandwidth_bytes_per_s());
}

double BusBandwidthFactor(bool all_reduce, int p) {
  if (p <= 1) return 1;
  return (all_reduce ? 2.0 : 1.0) * (p - 1) / p;
}

double AgreementSeconds(const HardwareProfile& hw, int p, int ranks_per_node) {
  if (!hw.collectives_agree_arguments() || p <= 1) return 0;
  const LinkSpec& slow = p > ranks_per_node ? hw.inter_node() : hw.intra_node();
  return std::ceil(std::log2(static_cast<double>(p))) * slow.latency_s();
}

double BroadcastSeconds(double bytes, int p, const LinkSpec& link) {
  if (p <= 1 || bytes <= 0) return 0;
  return std::ceil(std::log2(static_cast<double>(p))) * link.latency_s() +
         bytes / link.bandwidth_bytes_per_s();
}

// ------------------------------------------------------------------ routing statistics

absl::StatusOr<RoutingLoads> ReadRoutingLoads(const std::string& metrics_path) {
  auto text = ReadFile(metrics_path, "metrics file");
  if (!text.ok()) return text.status();
  RoutingLoads loads;
  std::vector<std::vector<double>> sums;
  std::vector<double> cv_sums;
  int line_number = 0, counted_records = 0;
  for (absl::string_view line : absl::StrSplit(*text, '\n')) {
    ++line_number;
    if (absl::StripAsciiWhitespace(line).empty()) continue;
    JsonValue record;
    if (!ParseJson(line, &record)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s:%d is not a JSON record", metrics_path, line_number));
    }
    const JsonValue* moe = record.Get("moe");
    if (!moe || moe->type != JsonValue::kArray || moe->array.empty()) continue;
    if (sums.empty()) {
      sums.resize(moe->array.size());
      cv_sums.assign(moe->array.size(), 0);
    }
    if (moe->array.size() != sums.size()) continue;
    for (size_t l = 0; l < moe->array.size(); ++l) {
      const JsonValue& layer = moe->array[l];
      cv_sums[l] += std::isfinite(layer.Number("load_cv")) ? layer.Number("load_cv") : 0;
      const JsonValue* counts = layer.Get("tokens_per_expert");
      if (!counts || counts->type != JsonValue::kArray) continue;
      if (sums[l].empty()) sums[l].assign(counts->array.size(), 0);
      if (counts->array.size() != sums[l].size()) continue;
      for (size_t e = 0; e < counts->array.size(); ++e) sums[l][e] += counts->array[e].number;
    }
    ++counted_records;
  }
  if (counted_records == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        metrics_path, " has no training record with per-layer routing (\"moe\": [...]); give "
                      "the metrics.jsonl of an rmoe_train run of an MoE model"));
  }
  loads.records = counted_records;
  for (size_t l = 0; l < sums.size(); ++l) {
    loads.load_cv.push_back(cv_sums[l] / counted_records);
    if (!sums[l].empty()) {
      for (double& v : sums[l]) v /= counted_records;
      loads.tokens_per_expert.push_back(sums[l]);
    }
  }
  return loads;
}

double RoutingSkew(const RoutingLoads& loads, int num_experts, int ep) {
  if (ep <= 1) return 1;
  double total = 0;
  int layers = 0;
  for (const auto& counts : loads.tokens_per_expert) {
    if (static_cast<int>(counts.size()) != num_experts || num_experts % ep != 0) continue;
    const int per_rank = num_experts / ep;
    double busiest = 0, sum = 0;
    for (int rank = 0; rank < ep; ++rank) {
      double load = 0;
      for (int e = rank * per_rank; e < (rank + 1) * per_rank; ++e) load += counts[e];
      busiest = std::max(busiest, load);
      sum += load;
    }
    if (sum <= 0) continue;
    total += busiest / (sum / ep);
    ++layers;
  }
  if (layers > 0) return total / layers;
  if (loads.load_cv.empty()) return 1;
  double cv = 0;
  for (double c : loads.load_cv) cv += c;
  cv /= loads.load_cv.size();
  const double rank_cv = cv / std::sqrt(static_cast<double>(num_experts) / ep);
  return 1 + rank_cv * std::sqrt(2 * std::log(static_cast<double>(ep)));
}

// ------------------------------------------------------------------ the step

StepEstimate EstimateStep(const JobSpec& spec, const Layout& layout, const HardwareProfile& hw,
                          double routing_skew) {
  const ModelSpec& m = spec.model();
  const MoESpec& moe = m.moe();
  const RouterSpec& router = m.router();
  const double skew = std::max(1.0, routing_skew);
  const double d = m.d_model(), vocab = m.vocab_size(), T = spec.schedule().seq_len();
  const double tokens = static_cast<double>(spec.schedule().micro_batch_size()) * T;
  const double accum = spec.schedule().grad_accum_steps();
  const double k = moe.top_k(), h = moe.expert_hidden_dim(), E = moe.num_experts();
  const double hs = SharedHidden(moe), hd = DenseHidden(m);
  const int moe_layers = static_cast<int>(MoELayerIndices(m).size());
  const int dense_layers = m.num_layers() - moe_layers;
  const int L = m.num_layers();
  const bool recurrent = router.kind() == RouterSpec::RECURRENT;
  const double r = router.hidden_dim(), gates = (router.cell() == RouterSpec::GRU ? 3 : 1) * r;
  const bool bf16 = spec.runtime().precision() == RuntimeSpec::BF16;
  const RuntimeSpec::Recompute recompute = spec.runtime().recompute();

  // Forward FLOPs per token of each component; attention products over the causal half.
  const double attn_proj = L * 8 * d * d;
  const double attn_products = L * 4 * d * (T + 1) / 2;
  const double experts = moe_layers * k * 6 * d * h * skew;
  const double shared = moe_layers * 6 * d * hs;
  const double dense = dense_layers * 6 * d * hd;
  const double mlp = router.kind() == RouterSpec::MLP ? MlpRouterHiddenDim(m) : 0;
  const double router_flops =
      moe_layers * (recurrent ? 2 * d * r + 2 * 2 * gates * r + 2 * r * E
                              : mlp > 0 ? 2 * d * mlp + 2 * mlp * E : 2 * d * E);
  const double head = 2 * d * vocab;
  // Backward = 2 x forward; recomputation runs the recomputed part's forward once more.
  auto passes = [&](bool in_moe, bool in_block) {
    double p = 3;
    if (recompute == RuntimeSpec::MOE && in_moe) p += 1;
    if (recompute == RuntimeSpec::FULL && in_block) p += 1;
    return p * tokens * accum;
  };
  StepEstimate s;
  s.flops_parts = {{"attention projections", attn_proj * passes(false, true)},
                   {"attention products", attn_products * passes(false, true)},
                   {"experts", experts * passes(true, true)},
                   {"shared expert", shared * passes(true, true)},
                   {"dense FFN", dense * passes(false, true)},
                   {"router", router_flops * passes(true, true)},
                   {"LM head", head * passes(false, false)}};
  // Products in bf16 under BF16 (attention, SwiGLU, experts); routers and the head in fp32.
  double low = 0, full = 0;
  for (const auto& [name, flops] : s.flops_parts) {
    s.matmul_flops += flops;
    ((bf16 && name != "router" && name != "LM head") ? low : full) += flops;
  }

  // Element-wise traffic: each activation byte kept is written in the forward, read in the
  // backward and its gradient written and read (4 x); recomputed parts once more; the
  // optimizer reads parameter, gradient and two moments and writes three (28 bytes per
  // parameter it updates) and clipping reads and scales every gradient (8).
  const ActivationProfile a = ProfileActivations(spec, skew);
  const double kept = L * a.attention_block + moe_layers * a.moe_layer + dense_layers * a.dense_ffn + a.head;
  double recomputed = 0;
  if (recompute == RuntimeSpec::MOE) recomputed = moe_layers * a.moe_layer;
  if (recompute == RuntimeSpec::FULL) recomputed = kept - a.head;
  double local = 0, tensors = 0;
  for (const SpecTensor& t : SpecParameterTensors(m)) {
    local += t.expert ? t.numel / layout.ep : t.numel;
    ++tensors;
  }
  const bool zero1 = spec.parallel().shard_optimizer_state() && layout.world > 1;
  const MemoryEstimate memory = EstimateTrainingMemory(spec, {layout.world, skew});
  const double updated = memory.optimizer / (2 * kFloat);
  s.elementwise_bytes = tokens * accum * (4 * kept + recomputed) + 28 * updated + 8 * local;

  // Operators: per block and micro-batch forward (attention 8, a dense FFN 7, an MoE layer
  // about 35 plus 8 per local expert and 12 for a recurrent cell, 10 more to dispatch over
  // expert parallelism), the backward about 1.5 times as many; the optimizer about 8 per
  // tensor.
  const double local_experts = E / layout.ep;
  const double moe_ops = 35 + 8 * local_experts + (recurrent ? 12 : 0) + (hs > 0 ? 6 : 0) +
                         (layout.ep > 1 ? 10 : 0);
  double forward_ops = 10 + L * 8 + dense_layers * 7 + moe_layers * moe_ops;
  double recompute_ops = 0;
  if (recompute == RuntimeSpec::MOE) recompute_ops = moe_layers * moe_ops;
  if (recompute == RuntimeSpec::FULL) recompute_ops = forward_ops - 10;
  s.ops = accum * (2.5 * forward_ops + recompute_ops) + 8 * tensors;

  // Per rank: a device, or the node's cores split over its ranks (threads of one rank on
  // c cores: 1 + (c - 1) x thread_scaling cores' worth; ranks sharing a core: its share).
  const double cores = hw.ranks_share_node()
                           ? static_cast<double>(hw.devices_per_node()) / layout.ranks_per_node
                           : 1.0;
  const double share = cores >= 1 ? 1 + (cores - 1) * hw.thread_scaling() : cores;
  const bool oversubscribed = cores < 1;
  const double eff = hw.matmul_efficiency();
  const double peak_low = hw.has_peak_flops_bf16() ? hw.peak_flops_bf16() : hw.peak_flops_fp32();
  s.compute_matmul_s = (full / hw.peak_flops_fp32() + low / peak_low) / (eff * share);
  s.compute_memory_s = s.elementwise_bytes / (hw.memory_bandwidth_bytes_per_s() * share);
  s.compute_overhead_s = s.ops * hw.op_overhead_s() * std::max(1.0, 1 / cores);
  if (hw.ranks_share_node() && layout.ranks_per_node > 1) {
    const double factor = oversubscribed ? hw.compute_factor_oversubscribed() : hw.compute_factor_shared();
    s.compute_matmul_s *= factor;
    s.compute_memory_s *= factor;
    s.compute_overhead_s *= factor;
  }
  s.compute_s = s.compute_matmul_s + s.compute_memory_s + s.compute_overhead_s;

  // All-to-all: per MoE layer and micro-batch, dispatch and combine forward and backward
  // (and again in a recomputed forward), each a count exchange plus N k rows of d fp32 per
  // rank, the busiest receiving skew times that.
  if (layout.ep > 1 && moe_layers > 0) {
    const double per_layer = recompute == RuntimeSpec::NONE ? 4 : 6;
    const double rows_bytes = tokens * k * d * kFloat * skew;
    const double one = AllToAllSeconds(rows_bytes, layout.ep, layout.ranks_per_node, hw.intra_node(),
                                       hw.inter_node());
    const double counts = AllToAllSeconds(8.0 * E, layout.ep, layout.ranks_per_node, hw.intra_node(),
                                          hw.inter_node());
    s.alltoall_s = accum * moe_layers *
                   (per_layer * one + (per_layer / 2) * counts +
                    1.5 * per_layer * AgreementSeconds(hw, layout.ep, layout.ranks_per_node));
  }

  // Gradients: replicated ones averaged over the world, each expert slice's over its dp
  // replicas (ranks ep apart: they cross nodes when the world does); then the small
  // all-reduces of the losses and the clipping norm.
  double replicated = 0, expert_local = 0;
  for (const SpecTensor& t : SpecParameterTensors(m)) {
    (t.expert ? expert_local : replicated) += t.expert ? t.numel / layout.ep : t.numel;
  }
  // Expert replicas are ranks ep apart: where the world spans nodes, a node holds
  // ranks_per_node / ep of each replica group.
  const int replicas_per_node =
      layout.world_spans_nodes ? std::max(1, layout.ranks_per_node / layout.ep) : layout.dp;
  const auto buckets_of = [](double bytes) { return std::max(1.0, std::ceil(bytes / kBucketBytes)); };
  const double replicated_buckets = buckets_of(replicated * kFloat);
  const double expert_buckets = layout.dp > 1 ? buckets_of(expert_local * kFloat) : 0;
  s.allreduce_s =
      AllReduceSeconds(replicated * kFloat, layout.world, layout.ranks_per_node, hw.intra_node(),
                           hw.inter_node(), kBucketBytes) +
      AllReduceSeconds(expert_local * kFloat, layout.dp, replicas_per_node, hw.intra_node(),
                           hw.inter_node(), kBucketBytes) +
      3 * AllReduceSeconds(kFloat, layout.world, layout.ranks_per_node, hw.intra_node(),
                               hw.inter_node(), kBucketBytes);

  // Summing the received halves: the reduce-scatter reads two and writes one of (p - 1) / p
  // of the bytes, at the memory bandwidth.
  auto reduction = [&](double bytes, int p) {
    return p > 1 ? 3.0 * bytes * (p - 1) / p / (hw.memory_bandwidth_bytes_per_s() * share) : 0.0;
  };
  s.allreduce_s += reduction(replicated * kFloat, layout.world) + reduction(expert_local * kFloat, layout.dp);
  s.allreduce_s += (replicated_buckets + 3) * AgreementSeconds(hw, layout.world, layout.ranks_per_node) +
                   expert_buckets * AgreementSeconds(hw, layout.dp, replicas_per_node);

  // ZeRO-1: every parameter broadcast from its owner after the step, the replicated ones
  // to the world (one broadcast series per owning rank), each expert slice to its replicas.
  if (zero1) {
    const LinkSpec& world_link = layout.world_spans_nodes ? hw.inter_node() : hw.intra_node();
    const int roots = std::min<int>(layout.world, static_cast<int>(tensors));
    s.broadcast_s = roots * std::ceil(std::log2(static_cast<double>(layout.world))) * world_link.latency_s() +
                    replicated * kFloat / world_link.bandwidth_bytes_per_s();
    if (layout.dp > 1) {
      const int expert_roots = std::min(layout.dp, 3 * moe_layers);
      s.broadcast_s += expert_roots * std::ceil(std::log2(static_cast<double>(layout.dp))) *
                           world_link.latency_s() +
                       expert_local * kFloat / world_link.bandwidth_bytes_per_s();
    }
  }
  // Blocking collectives: per MoE layer and micro-batch a count exchange and two row
  // all-to-alls each way (three more with recomputation); the gradient buckets; the loss
  // averaging and clipping norm; ZeRO-1's broadcasts (one series per owning rank).
  if (layout.world > 1) {
    s.collectives = 3 + replicated_buckets + expert_buckets;
    if (layout.ep > 1) {
      s.collectives += accum * moe_layers * (recompute == RuntimeSpec::NONE ? 5 : 8);
    }
    if (zero1) s.collectives += std::min<double>(layout.world, tensors) + (layout.dp > 1 ? layout.dp : 0);
    s.wait_s = hw.collective_wait_fraction() * s.compute_s +
               s.collectives * (oversubscribed ? hw.collective_sync_oversubscribed_s() : hw.collective_sync_s());
  }
  s.step_s = s.compute_s + s.alltoall_s + s.allreduce_s + s.broadcast_s + s.wait_s;
  s.tokens_per_s = layout.world * accum * tokens / s.step_s;
  return s;
}

// ------------------------------------------------------------------ the plan

absl::StatusOr<std::vector<PlanRow>> Plan(const JobSpec& spec, const HardwareProfile& hw,
                                          const PlanOptions& options) {
  const int rpn = options.ranks_per_node > 0 ? options.ranks_per_node : hw.devices_per_node();
  auto layouts = EnumerateLayouts(spec.model().moe().num_experts(), options.world, rpn);
  if (!layouts.ok()) return layouts.status();
  struct Variant {
    RuntimeSpec::Recompute recompute;
    bool zero1;
  };
  const bool zero_given = spec.parallel().shard_optimizer_state();
  std::vector<Variant> variants = {{spec.runtime().recompute(), zero_given}};
  if (options.variants) {
    for (auto recompute : {RuntimeSpec::NONE, RuntimeSpec::MOE, RuntimeSpec::FULL}) {
      for (bool zero1 : {false, true}) variants.push_back({recompute, zero1});
    }
  }
  std::vector<PlanRow> rows;
  for (const Layout& layout : *layouts) {
    std::set<std::pair<int, bool>> seen;
    for (const Variant& v : variants) {
      const bool zero1 = v.zero1 && layout.world > 1;
      if (!seen.insert({v.recompute, zero1}).second) continue;
      JobSpec s = spec;
      s.mutable_parallel()->set_expert_parallel_size(layout.ep);
      s.mutable_parallel()->set_shard_optimizer_state(zero1);
      s.mutable_runtime()->set_recompute(v.recompute);
      PlanRow row;
      row.layout = layout;
      row.recompute = v.recompute;
      row.zero1 = zero1;
      row.skew = options.routing ? RoutingSkew(*options.routing, spec.model().moe().num_experts(), layout.ep) : 1;
      row.memory = EstimateTrainingMemory(s, {layout.world, row.skew});
      row.memory_per_rank = row.memory.total() + hw.runtime_overhead_bytes();
      row.memory_available = hw.ranks_share_node()
                                 ? hw.memory_bytes() * hw.devices_per_node() / layout.ranks_per_node
                                 : hw.memory_bytes();
      row.fits = row.memory_per_rank <= row.memory_available;
      row.step = EstimateStep(s, layout, hw, row.skew);
      rows.push_back(std::move(row));
    }
  }
  return rows;
}

int Recommend(const std::vector<PlanRow>& rows) {
  int best = -1;
  for (size_t i = 0; i < rows.size(); ++i) {
    if (!rows[i].fits) continue;
    if (best < 0 || rows[i].step.step_s < rows[best].step.step_s) best = static_cast<int>(i);
  }
  return best;
}

}  // namespace rmoe::plan
