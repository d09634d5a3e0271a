#include "rmoe/model/generation.h"

#include <algorithm>
#include <random>

#include <absl/strings/str_cat.h>

namespace rmoe {

torch::Tensor SamplingDistribution(const torch::Tensor& logits, const SamplingOptions& options) {
  auto scores = logits.detach().to(torch::kCPU, torch::kDouble).reshape({-1});
  const int64_t vocab = scores.size(0);
  if (options.temperature <= 0) {
    auto probs = torch::zeros({vocab}, torch::kDouble);
    probs[scores.argmax().item<int64_t>()] = 1.0;
    return probs;
  }
  auto probs = torch::softmax(scores / options.temperature, 0);
  // A stable descending sort makes the kept set deterministic when probabilities tie.
  auto [sorted, order] = torch::sort(probs, /*stable=*/std::optional<bool>(true), /*dim=*/0, /*descending=*/true);
  auto keep = torch::ones({vocab}, torch::kBool);
  if (options.top_k > 0 && options.top_k < vocab) {
    keep.narrow(0, options.top_k, vocab - options.top_k).fill_(false);
  }
  if (options.top_p < 1.0) {
    // Keep a token if the mass strictly before it is below top_p: the smallest prefix that
    // reaches top_p, which always includes the most likely token.
    auto mass_before = torch::cumsum(sorted * keep, 0) - sorted * keep;
    keep = keep & (mass_before < options.top_p);
  }
  auto kept = torch::zeros({vocab}, torch::kDouble);
  kept.index_put_({order}, sorted * keep);
  return kept / kept.sum();
}

int64_t SampleFromDistribution(const torch::Tensor& probs, double uniform) {
  auto p = probs.contiguous();
  const double* data = p.data_ptr<double>();
  const int64_t vocab = p.numel();
  double cumulative = 0;
  int64_t last_nonzero = 0;
  for (int64_t i = 0; i < vocab; ++i) {
    if (data[i] <= 0) continue;
    cumulative += data[i];
    last_nonzero = i;
    if (uniform < cumulative) return i;
  }
  return last_nonzero;  // rounding left `uniform` just above the total mass
}

absl::StatusOr<std::vector<int64_t>> Generate(Transformer& model, const std::vector<int64_t>& prompt,
                                              const SamplingOptions& options,
                                              const std::function<void(int64_t)>& on_token) {
  const int64_t max_len = model->spec().max_seq_len();
  if (prompt.empty()) return absl::InvalidArgumentError("the prompt must have at least one token");
  if (static_cast<int64_t>(prompt.size()) >= max_len) {
    return absl::InvalidArgumentError(absl::StrCat("the prompt has ", prompt.size(),
                                                   " tokens; the model's max_seq_len is ", max_len,
                                                   ": shorten the prompt"));
  }
  torch::NoGradGuard no_grad;
  model->eval();
  const auto device = model->parameters().front().device();
  std::mt19937_64 rng(options.seed);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);

  DecodeCache cache = model->NewCache();
  auto input = torch::tensor(prompt, torch::kLong).unsqueeze(0).to(device);
  std::vector<int64_t> generated;
  // The whole sequence, prompt included, stays within the positions the model knows.
  const int64_t budget = std::min<int64_t>(options.max_new_tokens, max_len - prompt.size());
  for (int64_t step = 0; step < budget; ++step) {
    auto logits = model->forward(input, &cache).logits;
    auto probs = SamplingDistribution(logits[0][-1], options);
    const int64_t token = SampleFromDistribution(probs, uniform(rng));
    generated.push_back(token);
    if (on_token) on_token(token);
    input = torch::full({1, 1}, token, torch::TensorOptions(torch::kLong).device(device));
  }
  return generated;
}

}  // namespace rmoe
