// Autoregressive sampling with the KV cache (and the token-recurrent router's cached state).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include <absl/status/statusor.h>
#include <torch/torch.h>

#include "rmoe/model/transformer.h"

namespace rmoe {

struct SamplingOptions {
  int max_new_tokens = 200;
  // 0 = greedy (argmax).
  double temperature = 1.0;
  // Keep the k most likely tokens; 0 = all.
  int top_k = 0;
  // Keep the smallest set of most likely tokens whose probability reaches top_p; 1 = all.
  double top_p = 1.0;
  uint64_t seed = 0;
};

// The distribution a token is drawn from: softmax(logits / temperature) restricted to the
// top-k and then the top-p set, renormalised. logits: [V]; returns [V] fp64 on CPU with
// zeros outside the kept set. Ties at the top-k boundary keep the lower token ids.
torch::Tensor SamplingDistribution(const torch::Tensor& logits, const SamplingOptions& options);

// Draws a token from `probs` ([V], sums to 1) by inverting its CDF at `uniform` in [0, 1).
int64_t SampleFromDistribution(const torch::Tensor& probs, double uniform);

// Continues `prompt` (non-empty) by up to max_new_tokens, stopping early when the model's
// max_seq_len is reached. `on_token` sees each new token as it is produced (for streaming).
absl::StatusOr<std::vector<int64_t>> Generate(Transformer& model, const std::vector<int64_t>& prompt,
                                              const SamplingOptions& options,
                                              const std::function<void(int64_t)>& on_token = {});

}  // namespace rmoe
