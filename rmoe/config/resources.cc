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

// The router of one MoE layer, and what all MoE layers share (the layer-recurrent cell).
double RouterParametersPerLayer(const ModelSpec& model) {
  const RouterSpec& router = model.router();
  const double d = model.d_model(), experts = model.moe().num_experts();
  if (router.kind() == RouterSpec::LINEAR) return experts * d;
  const double hidden = router.hidden_dim();
  double own = hidden * d + experts * hidden;  // projection in, gate out
  if (router.recurrence() == RouterSpec::TOKEN) own += RecurrentCellParameters(router, hidden, hidden);
  return own;
}

double SharedRouterParameters(const ModelSpec& model) {
  const RouterSpec& router = model.router();
  if (router.kind() != RouterSpec::RECURRENT || router.recurrence() != RouterSpec::LAYER) return 0;
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
  const double d = model.d_model(), vocab = model.vocab_size();
  const MoESpec& moe = model.moe();
  const int moe_layers = CountMoELayers(model);
  const int dense_layers = model.num_layers() - moe_layers;
  const double per_expert = 3 * d * moe.expert_hidden_dim();

  SpecParameterCounts counts;
  const double attention_and_norms = 4 * d * d + 2 * d;
  counts.total = vocab * d * (model.tie_embeddings() ? 1 : 2) + d  // embeddings, final norm
                 + model.num_layers() * attention_and_norms +
                 dense_layers * 3 * d * DenseHiddenDim(model) +
                 moe_layers * (moe.num_experts() * per_expert + 3 * d * SharedExpertHiddenDim(moe) +
                               RouterParametersPerLayer(model)) +
                 (moe_layers > 0 ? SharedRouterParameters(model) : 0);
  counts.expert = moe_layers * moe.num_experts() * per_expert;
  counts.active = counts.total - moe_layers * (moe.num_experts() - moe.top_k()) * per_expert;
  return counts;
}

MemoryEstimate EstimateTrainingMemory(const JobSpec& spec) {
  const ModelSpec& model = spec.model();
  const MoESpec& moe = model.moe();
  const SpecParameterCounts counts = CountSpecParameters(model);
  const double ep = std::max(1, spec.parallel().expert_parallel_size());
  const double local = counts.total - counts.expert + counts.expert / ep;

  MemoryEstimate estimate;
  estimate.parameters = local * kFloatBytes;
  estimate.gradients = local * kFloatBytes;
  estimate.optimizer = 2 * local * kFloatBytes;
  if (spec.runtime().precision() == RuntimeSpec::BF16) estimate.weight_copies = local * 2;

  // What autograd keeps per token of a micro-batch, in floats: each layer's norms, q/k/v,
  // attention output and residuals (about 12 d), every routed copy of a token through its
  // expert (input, both SwiGLU projections, the gated product and the output: 4 h + 3 d per
  // copy with the dispatch and combine copies), the shared expert or dense FFN likewise;
  // then the logits and their gradient.
  const double d = model.d_model(), tokens = static_cast<double>(spec.schedule().micro_batch_size()) *
                                               spec.schedule().seq_len();
  const int moe_layers = CountMoELayers(model);
  const double dense_layers = model.num_layers() - moe_layers;
  const double routed = moe.top_k() * (4.0 * moe.expert_hidden_dim() + 3 * d);
  const double shared = moe.shared_expert() ? 4 * SharedExpertHiddenDim(moe) + d : 0;
  const double per_token = model.num_layers() * 12 * d + moe_layers * (routed + shared) +
                           dense_layers * (4 * DenseHiddenDim(model) + d) + 2.0 * model.vocab_size();
  estimate.activations = tokens * per_token * kFloatBytes;
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
                                 std::optional<double> available) {
  if (!available) return absl::OkStatus();
  const MemoryEstimate estimate = EstimateTrainingMemory(spec);
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
