#include "rmoe/model/routing_stats.h"

#include <cmath>

#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>
#include <absl/strings/str_join.h>

namespace rmoe {

double CoefficientOfVariation(const std::vector<double>& values) {
  if (values.empty()) return 0;
  double mean = 0;
  for (double v : values) mean += v;
  mean /= values.size();
  if (mean == 0) return 0;
  double var = 0;
  for (double v : values) var += (v - mean) * (v - mean);
  return std::sqrt(var / values.size()) / mean;
}

RoutingStatistics::RoutingStatistics(std::vector<int> moe_layers, int64_t num_experts)
    : moe_layers_(std::move(moe_layers)), num_experts_(num_experts) {
  const int64_t layers = static_cast<int64_t>(moe_layers_.size());
  auto zeros = [](std::vector<int64_t> shape) { return torch::zeros(shape, torch::kDouble); };
  assignments_ = zeros({layers, num_experts});
  entropy_sum_ = zeros({layers});
  tokens_ = zeros({layers});
  top1_joint_ = zeros({std::max<int64_t>(layers - 1, 0), num_experts, num_experts});
}

void RoutingStatistics::Add(const std::vector<MoEOutput>& moe) {
  TORCH_CHECK(moe.size() == moe_layers_.size(), "RoutingStatistics expects ", moe_layers_.size(),
              " MoE layers, got ", moe.size());
  torch::NoGradGuard no_grad;
  const int64_t e = num_experts_;
  std::vector<torch::Tensor> indices;
  for (const auto& layer : moe) indices.push_back(layer.expert_index.to(torch::kCPU));
  for (size_t l = 0; l < moe.size(); ++l) {
    const auto& index = indices[l];
    const int64_t tokens = index.size(0);
    assignments_[l] += torch::bincount(index.reshape({-1}), {}, e).to(torch::kDouble);
    entropy_sum_[l] += moe[l].router_entropy.to(torch::kCPU).to(torch::kDouble) * tokens;
    tokens_[l] += tokens;
    if (l + 1 < moe.size()) {
      // Column 0 of topk's indices is each token's most probable expert; the flattened
      // token order is the same at every layer.
      const auto from = index.select(1, 0);
      const auto to = indices[l + 1].select(1, 0);
      top1_joint_[l] += torch::bincount(from * e + to, {}, e * e).view({e, e}).to(torch::kDouble);
    }
  }
}

torch::Tensor RoutingStatistics::Flatten() const {
  return torch::cat({assignments_.reshape({-1}), entropy_sum_, tokens_, top1_joint_.reshape({-1})});
}

void RoutingStatistics::Unflatten(const torch::Tensor& flat) {
  TORCH_CHECK(flat.numel() == Flatten().numel(), "RoutingStatistics::Unflatten: ", flat.numel(),
              " values for ", Flatten().numel(), " counts");
  auto values = flat.to(torch::kCPU).to(torch::kDouble);
  int64_t offset = 0;
  for (torch::Tensor* t : {&assignments_, &entropy_sum_, &tokens_, &top1_joint_}) {
    t->copy_(values.narrow(0, offset, t->numel()).view(t->sizes()));
    offset += t->numel();
  }
}

int64_t RoutingStatistics::tokens() const {
  return tokens_.numel() ? static_cast<int64_t>(tokens_[0].item<double>()) : 0;
}

std::vector<LayerRouting> RoutingStatistics::Layers() const {
  std::vector<LayerRouting> layers;
  for (size_t l = 0; l < moe_layers_.size(); ++l) {
    LayerRouting layer;
    layer.layer = moe_layers_[l];
    const auto counts = assignments_[l].contiguous();
    const double total = counts.sum().item<double>();
    const double* c = counts.data_ptr<double>();
    for (int64_t e = 0; e < num_experts_; ++e) layer.load.push_back(total > 0 ? c[e] / total : 0);
    layer.load_cv = CoefficientOfVariation(layer.load);
    const double tokens = tokens_[l].item<double>();
    layer.entropy = tokens > 0 ? entropy_sum_[l].item<double>() / tokens : 0;
    layers.push_back(std::move(layer));
  }
  return layers;
}

std::vector<LayerTransition> RoutingStatistics::Transitions() const {
  std::vector<LayerTransition> transitions;
  const int64_t e = num_experts_;
  for (int64_t l = 0; l < top1_joint_.size(0); ++l) {
    LayerTransition t;
    t.from_layer = moe_layers_[l];
    t.to_layer = moe_layers_[l + 1];
    const auto joint = top1_joint_[l].contiguous();
    const double* n = joint.data_ptr<double>();
    double total = 0;
    std::vector<double> rows(e, 0), cols(e, 0);
    for (int64_t a = 0; a < e; ++a) {
      for (int64_t b = 0; b < e; ++b) {
        rows[a] += n[a * e + b];
        cols[b] += n[a * e + b];
        total += n[a * e + b];
        t.top1_counts.push_back(static_cast<int64_t>(n[a * e + b]));
      }
    }
    if (total > 0) {
      double mi = 0, h_to = 0;
      for (int64_t a = 0; a < e; ++a) {
        for (int64_t b = 0; b < e; ++b) {
          const double p = n[a * e + b] / total;
          if (p > 0) mi += p * std::log(p * total * total / (rows[a] * cols[b]));
        }
      }
      for (int64_t b = 0; b < e; ++b) {
        const double p = cols[b] / total;
        if (p > 0) h_to -= p * std::log(p);
      }
      t.mutual_information = std::max(0.0, mi);  // rounding can leave -1e-17
      t.predictability = h_to > 0 ? t.mutual_information / h_to : 0;
    }
    transitions.push_back(std::move(t));
  }
  return transitions;
}

std::string RoutingStatistics::ToJson() const {
  std::vector<std::string> layers, transitions;
  for (const auto& l : Layers()) {
    std::vector<std::string> load;
    for (double v : l.load) load.push_back(absl::StrFormat("%.17g", v));
    layers.push_back(absl::StrFormat(
        "{\"layer\":%d,\"load\":[%s],\"load_cv\":%.17g,\"entropy\":%.17g}", l.layer,
        absl::StrJoin(load, ","), l.load_cv, l.entropy));
  }
  for (const auto& t : Transitions()) {
    transitions.push_back(absl::StrFormat(
        "{\"from_layer\":%d,\"to_layer\":%d,\"mutual_information\":%.17g,"
        "\"predictability\":%.17g,\"top1_counts\":[%s]}",
        t.from_layer, t.to_layer, t.mutual_information, t.predictability,
        absl::StrJoin(t.top1_counts, ",")));
  }
  return absl::StrCat("{\"tokens\":", tokens(), ",\"layers\":[", absl::StrJoin(layers, ","),
                      "],\"transitions\":[", absl::StrJoin(transitions, ","), "]}");
}

}  // namespace rmoe
