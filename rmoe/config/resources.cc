#include "rmoe/config/resources.h"

#include <sys/resource.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <string>

#include <absl/strings/numbers.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>
#include <absl/strings/str_join.h>
#include <absl/strings/strip.h>

#include "rmoe/config/job_spec.h"

namespace rmoe {
namespace {

constexpr double kFloatBytes = 4;

int CountMoELayers(const ModelSpec& model) {
  return static_cast<int>(MoELayerIndices(model).size());
}

double DenseHiddenDim(const ModelSpec& model) {
  return model.dense_hidden_dim() > 0 ? model.dense_hidden_dim() : model.moe().expert_hidden_dim();
}

double SharedExpertHiddenDim(const MoESpec& moe) {
  if (!moe.shared_expert()) return 0;
  return moe.shared_expert_hidden_dim() > 0 ? moe.shared_expert_hidden_dim()
                                            : moe.expert_hidden_dim();
}

// Weights and biases of one recurrent cell from `input` to `hidden` units.
double RecurrentCellParameters(const RouterSpec& router, double input, double hidden) {
  const double gates = (router.cell() == RouterSpec::GRU ? 3 : 1) * hidden;
  return gates * (input + hidden) + 2 * gates;
}

// The cell all MoE layers share (recurrence LAYER, and NONE, which starts it from zero in
// every layer), as MakeSharedRouterCell builds it.
double SharedRouterParameters(const ModelSpec& model) {
  const RouterSpec& router = model.router();
  if (router.kind() != RouterSpec::RECURRENT || router.recurrence() == RouterSpec::TOKEN) return 0;
  return RecurrentCellParameters(router, router.hidden_dim(), router.hidden_dim());
}

// The first number on the line of `path` that starts with `key` (e.g. "MemAvailable:").
std::optional<double> NumberAfter(const std::string& path, absl::string_view key) {
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) {
    absl::string_view rest = line;
    if (!absl::ConsumePrefix(&rest, key)) continue;
    rest = absl::StripAsciiWhitespace(rest);
    const size_t end = rest.find(' ');
    double value = 0;
    if (absl::SimpleAtod(rest.substr(0, end), &value)) return value;
  }
  return std::nullopt;
}

// A file holding one number ("max" or unreadable: nullopt).
std::optional<double> NumberIn(const std::string& path) { return NumberAfter(path, ""); }

void KeepLeast(std::optional<double>* least, std::optional<double> candidate) {
  if (candidate && (!*least || *candidate < **least)) *least = std::max(0.0, *candidate);
}

}  // namespace

SpecParameterCounts CountSpecParameters(const ModelSpec& model) {
  const MoESpec& moe = model.moe();
  const double per_expert = 3.0 * model.d_model() * moe.expert_hidden_dim();
  SpecParameterCounts counts;
  for (const SpecTensor& t : SpecParameterTensors(model)) {
    counts.total += t.numel;
    if (t.expert) counts.expert += t.numel;
  }
  counts.active = counts.total - CountMoELayers(model) * (moe.num_experts() - moe.top_k()) * per_expert;
  return counts;
}

std::vector<SpecTensor> SpecParameterTensors(const ModelSpec& model) {
  const double d = model.d_model(), vocab = model.vocab_size();
  const MoESpec& moe = model.moe();
  const RouterSpec& router = model.router();
  const double experts = moe.num_experts(), hidden = moe.expert_hidden_dim();
  const double r = router.hidden_dim(), gates = (router.cell() == RouterSpec::GRU ? 3 : 1) * r;
  std::vector<SpecTensor> tensors;
  auto add = [&tensors](std::string name, double numel, bool expert = false, bool matmul = false) {
    tensors.push_back({std::move(name), numel, expert, matmul});
  };
  auto add_cell = [&](const std::string& prefix) {
    add(prefix + "w_ih", gates * r);
    add(prefix + "b_ih", gates);
    add(prefix + "w_hh", gates * r);
    add(prefix + "b_hh", gates);
  };
  add("embedding.weight", vocab * d);
  if (CountMoELayers(model) > 0 && SharedRouterParameters(model) > 0) add_cell("router_cell.");
  for (int layer = 0; layer < model.num_layers(); ++layer) {
    const std::string p = absl::StrCat("layers.", layer, ".");
    add(p + "attn_norm.weight", d);
    add(p + "attn.qkv.weight", 3 * d * d, false, true);
    add(p + "attn.out.weight", d * d, false, true);
    add(p + "ffn_norm.weight", d);
    if (IsMoELayer(model, layer)) {
      const std::string m = p + "moe.";
      if (router.kind() == RouterSpec::LINEAR) {
        add(m + "router.gate", experts * d);
      } else if (router.kind() == RouterSpec::MLP) {
        const double hidden_units = MlpRouterHiddenDim(model);
        add(m + "router.hidden", hidden_units * d);
        add(m + "router.hidden_bias", hidden_units);
        add(m + "router.gate", experts * hidden_units);
      } else {
        add(m + "router.proj", r * d);
        add(m + "router.gate", experts * r);
        if (router.recurrence() == RouterSpec::TOKEN) add_cell(m + "router.cell.");
      }
      for (const char* w : {"w1", "w3", "w2"}) add(m + "experts." + w, experts * d * hidden, true, true);
      if (moe.shared_expert()) {
        for (const char* w : {"w1", "w3", "w2"}) {
          add(m + "shared_expert." + w + ".weight", d * SharedExpertHiddenDim(moe), false, true);
        }
      }
    } else {
      for (const char* w : {"w1", "w3", "w2"}) {
        add(p + "ffn." + w + ".weight", d * DenseHiddenDim(model), false, true);
      }
    }
  }
  add("final_norm.weight", d);
  if (!model.tie_embeddings()) add("lm_head.weight", vocab * d);
  return tensors;
}

ActivationProfile ProfileActivations(const JobSpec& spec, double routing_skew) {
  const ModelSpec& model = spec.model();
  const MoESpec& moe = model.moe();
  const RouterSpec& router = model.router();
  // fp32 everywhere but the products' operands, which bf16 keeps in bf16.
  const double f = kFloatBytes, m = spec.runtime().precision() == RuntimeSpec::BF16 ? 2 : kFloatBytes;
  const bool bf16 = m < f;
  const double d = model.d_model(), heads = model.num_heads(), experts = moe.num_experts();
  const double k = moe.top_k(), h = moe.expert_hidden_dim(), hs = SharedExpertHiddenDim(moe);
  const double hd = DenseHiddenDim(model), vocab = model.vocab_size();
  const bool recurrent = router.kind() == RouterSpec::RECURRENT;
  const double r = recurrent ? router.hidden_dim() : 0;
  const double skew = std::max(1.0, routing_skew);

  ActivationProfile a;
  // The attention half: RMSNorm keeps its input and 1/rms; the qkv product its (normed)
  // input; the fused attention q, k, v, its output (also the out product's input) and one
  // log-sum-exp per head; the FFN's RMSNorm its input (the residual sum) and 1/rms.
  a.attention_block = f * (d + 1) + m * d + 3 * m * d + m * d + f * heads + f * (d + 1);
  // An MoE layer: the normed input (fp32, the router's); the router's logits, probabilities
  // and log-sum-exp, and a recurrent cell's input, state, gates and candidates (about 10 of
  // its width, as ATen's GRU cell keeps them) or an MLP router's tanh layer; top-k indices
  // and weights and the dispatch plan (int64 token ids, fp32 weights); per routed copy of a token its row, the two
  // pre-activations and silu(gate), and the expert's output row (kept by the weighted
  // combine); a shared expert's two projections, silu and product.
  const double mlp = router.kind() == RouterSpec::MLP ? MlpRouterHiddenDim(model) : 0;
  a.moe_layer = f * d + f * (2 * experts + 1) + (recurrent ? 10 * f * r : 0) + f * mlp + 28 * k +
                skew * k * (m * d + 3 * m * h + f * d) +
                (hs > 0 ? 4 * m * hs + (bf16 ? m * d : 0) : 0);
  a.dense_ffn = m * d + 4 * m * hd;
  // Residual dropout keeps a one-byte mask of each sublayer's output (attention's, and the
  // feed-forward or MoE layer's).
  if (model.dropout() > 0) {
    a.attention_block += d;
    a.moe_layer += d;
    a.dense_ffn += d;
  }
  const double carried = router.recurrence() == RouterSpec::LAYER ? f * r : 0;
  a.moe_input = f * d + carried;
  a.block_input = f * d + carried;
  // The final RMSNorm's input and output, the logits (held by the caller through the
  // backward pass) and the cross-entropy's log-probabilities (turned into the gradient).
  a.head = f * (d + 1) + f * d + 2 * f * vocab;
  // One layer's backward: gradients of its routed rows in and out and of the hidden
  // activations, a shared expert's, and the residual stream's gradient in and out.
  a.moe_workspace = skew * k * (2 * f * d + 3 * m * h) + (hs > 0 ? 3 * m * hs : 0) + 2 * f * d;
  a.dense_workspace = 3 * m * hd + 2 * f * d;
  return a;
}

MemoryEstimate EstimateTrainingMemory(const JobSpec& spec, const MemoryLayout& layout) {
  const ModelSpec& model = spec.model();
  const MoESpec& moe = model.moe();
  const int ep = std::max(1, spec.parallel().expert_parallel_size());
  const int world = std::max(ep, layout.world_size > 0 ? layout.world_size : ep);
  const int dp = std::max(1, world / ep);
  const std::vector<SpecTensor> tensors = SpecParameterTensors(model);

  double local = 0, matmul = 0;
  for (const SpecTensor& t : tensors) {
    const double n = t.expert ? t.numel / ep : t.numel;
    local += n;
    if (t.matmul) matmul += n;
  }
  MemoryEstimate estimate;
  estimate.parameters = local * kFloatBytes;
  estimate.gradients = local * kFloatBytes;
  if (spec.parallel().shard_optimizer_state() && world > 1) {
    // ZeRO-1: each tensor's moments on the least loaded of the ranks holding it, in the
    // model's order (replicated tensors over the world, each expert slice over its dp
    // replicas); the busiest rank counts.
    std::vector<double> replicated(world, 0), expert(dp, 0);
    for (const SpecTensor& t : tensors) {
      std::vector<double>& held = t.expert ? expert : replicated;
      *std::min_element(held.begin(), held.end()) += t.expert ? t.numel / ep : t.numel;
    }
    double busiest = 0;
    for (int rank = 0; rank < world; ++rank) {
      busiest = std::max(busiest, replicated[rank] + expert[rank / ep]);
    }
    estimate.optimizer = 2 * busiest * kFloatBytes;
  } else {
    estimate.optimizer = 2 * local * kFloatBytes;
  }
  if (spec.runtime().precision() == RuntimeSpec::BF16) estimate.weight_copies = matmul * 2;

  const double skew = std::max(1.0, layout.routing_skew);
  const ActivationProfile a = ProfileActivations(spec, skew);
  const double tokens =
      static_cast<double>(spec.schedule().micro_batch_size()) * spec.schedule().seq_len();
  const int moe_layers = CountMoELayers(model);
  const int dense_layers = model.num_layers() - moe_layers;
  double workspace = std::max(moe_layers > 0 ? a.moe_workspace : 0.0,
                              dense_layers > 0 ? a.dense_workspace : 0.0);
  auto part = [&](const std::string& name, double per_token) {
    if (per_token > 0) estimate.activation_parts.push_back({name, tokens * per_token});
    estimate.activations += tokens * per_token;
  };
  switch (spec.runtime().recompute()) {
    case RuntimeSpec::MOE:
      part("attention", model.num_layers() * a.attention_block);
      part("MoE layer inputs", moe_layers * a.moe_input);
      part("dense FFN", dense_layers * a.dense_ffn);
      if (moe_layers > 0) workspace += a.moe_layer;  // the one MoE layer recomputed
      break;
    case RuntimeSpec::FULL:
      part("block inputs", model.num_layers() * a.block_input);
      workspace += a.attention_block +
                   std::max(moe_layers > 0 ? a.moe_layer : 0.0, dense_layers > 0 ? a.dense_ffn : 0.0);
      break;
    default:
      part("attention", model.num_layers() * a.attention_block);
      part("MoE layers", moe_layers * a.moe_layer);
      part("dense FFN", dense_layers * a.dense_ffn);
      break;
  }
  part("LM head", a.head);
  estimate.workspace = tokens * workspace;
  if (ep > 1 && moe_layers > 0) {
    // The rows sent (N k) and received (N k, times the skew on the busiest rank), fp32.
    estimate.alltoall_buffers = tokens * moe.top_k() * model.d_model() * kFloatBytes * (1 + skew);
  }
  if (world > 1) {
    // One flat bucket (16 MiB, as DistributedRuntime) and MPI's or NCCL's copy of it.
    estimate.communication_buffers = 2 * std::min(16.0 * (1 << 20), local * kFloatBytes);
  }
  return estimate;
}

std::string MemoryEstimate::Describe() const {
  return absl::StrCat(FormatBytes(total()), " (", Breakdown(), ")");
}

std::string MemoryEstimate::Breakdown() const {
  std::vector<std::string> parts = {absl::StrCat("parameters ", FormatBytes(parameters)),
                                    absl::StrCat("gradients ", FormatBytes(gradients)),
                                    absl::StrCat("AdamW moments ", FormatBytes(optimizer))};
  if (weight_copies > 0) parts.push_back(absl::StrCat("bf16 weight copies ", FormatBytes(weight_copies)));
  parts.push_back(absl::StrCat("activations of one micro-batch ", FormatBytes(activations)));
  if (workspace > 0) parts.push_back(absl::StrCat("backward workspace ", FormatBytes(workspace)));
  if (alltoall_buffers > 0) parts.push_back(absl::StrCat("all-to-all buffers ", FormatBytes(alltoall_buffers)));
  if (communication_buffers > 0) {
    parts.push_back(absl::StrCat("collective buffers ", FormatBytes(communication_buffers)));
  }
  return absl::StrJoin(parts, ", ");
}

std::optional<double> AvailableMemoryBytes() {
  std::optional<double> least;
  if (auto kib = NumberAfter("/proc/meminfo", "MemAvailable:")) KeepLeast(&least, *kib * 1024);
  // cgroup v2, then v1 (a v1 "no limit" is a huge number, harmless here).
  if (auto limit = NumberIn("/sys/fs/cgroup/memory.max")) {
    KeepLeast(&least, *limit - NumberIn("/sys/fs/cgroup/memory.current").value_or(0));
  } else if (auto v1 = NumberIn("/sys/fs/cgroup/memory/memory.limit_in_bytes")) {
    KeepLeast(&least, *v1 - NumberIn("/sys/fs/cgroup/memory/memory.usage_in_bytes").value_or(0));
  }
  struct rlimit limit;
  if (::getrlimit(RLIMIT_AS, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY) {
    const double in_use_kib = NumberAfter("/proc/self/status", "VmSize:").value_or(0);
    KeepLeast(&least, static_cast<double>(limit.rlim_cur) - in_use_kib * 1024);
  }
  return least;
}

absl::Status CheckTrainingMemory(const JobSpec& spec, int ranks_on_machine,
                                 std::optional<double> available, int world_size) {
  if (!available) return absl::OkStatus();
  MemoryLayout layout;
  layout.world_size = world_size;
  const MemoryEstimate estimate = EstimateTrainingMemory(spec, layout);
  const double needed = estimate.total() * std::max(1, ranks_on_machine);
  if (needed <= *available) return absl::OkStatus();
  const SpecParameterCounts counts = CountSpecParameters(spec.model());
  return absl::ResourceExhaustedError(absl::StrFormat(
      "this job needs about %s of memory per rank (%s)%s, and %s is available here: refusing "
      "to start. The model has %.4g parameters; make it smaller (model.d_model, model.num_layers, "
      "model.moe.num_experts, model.moe.expert_hidden_dim), lower schedule.micro_batch_size "
      "or schedule.seq_len for the activations, or spread the experts over more ranks "
      "(parallel.expert_parallel_size)",
      FormatBytes(estimate.total()), estimate.Breakdown(),
      ranks_on_machine > 1 ? absl::StrFormat(", %d ranks on this machine", ranks_on_machine) : "",
      FormatBytes(*available), counts.total));
}

std::string FormatBytes(double bytes) {
  constexpr const char* kUnits[] = {"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  if (bytes < 1024) return absl::StrFormat("%.0f B", bytes);
  int unit = -1;
  while (bytes >= 1024 && unit < 5) {
    bytes /= 1024;
    ++unit;
  }
  return absl::StrFormat("%.1f %s", bytes, kUnits[unit]);
}

}  // namespace rmoe
