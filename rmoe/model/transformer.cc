#include "rmoe/model/transformer.h"

#include <algorithm>
#include <optional>
#include <string>

#include "rmoe/model/recompute.h"

namespace rmoe {

BlockImpl::BlockImpl(const ModelSpec& model, const InitScales& init, bool is_moe,
                     RecurrentCell shared_router_cell)
    : dropout_(model.dropout()) {
  attn_norm_ = register_module("attn_norm", RMSNorm(model.d_model(), model.norm_eps()));
  attn_ = register_module("attn", CausalSelfAttention(model, init));
  ffn_norm_ = register_module("ffn_norm", RMSNorm(model.d_model(), model.norm_eps()));
  if (is_moe) {
    moe_ = register_module("moe", MoELayer(model, init, std::move(shared_router_cell)));
    // Only layer recurrence passes a state on (NONE starts from zeros, TOKEN scans inside).
    carries_router_state_ = model.router().kind() == RouterSpec::RECURRENT &&
                            model.router().recurrence() == RouterSpec::LAYER;
  } else {
    const int64_t hidden = model.dense_hidden_dim() > 0 ? model.dense_hidden_dim()
                                                        : model.moe().expert_hidden_dim();
    ffn_ = register_module("ffn", SwiGLU(model.d_model(), hidden, init));
  }
}

torch::Tensor BlockImpl::forward(const torch::Tensor& x, RouterCarry& carry, KVCache* kv_cache,
                                 torch::Tensor* router_token_state,
                                 std::vector<MoEOutput>* moe_outputs) {
  const bool recompute = recompute_ != RuntimeSpec::NONE && is_training() && kv_cache == nullptr &&
                         at::GradMode::is_enabled();
  if (!recompute) return ForwardPieces(x, carry, kv_cache, router_token_state, moe_outputs);
  if (recompute_ == RuntimeSpec::FULL) {
    return Recomputed(
        [this](const torch::Tensor& in, RouterCarry& c, std::vector<MoEOutput>* outs) {
          return ForwardPieces(in, c, nullptr, nullptr, outs);
        },
        x, carry, moe_outputs);
  }
  auto h = x + Dropout(attn_(attn_norm_(x), nullptr));
  if (!is_moe()) return FeedForward(h, carry, nullptr, moe_outputs);
  return Recomputed(
      [this](const torch::Tensor& in, RouterCarry& c, std::vector<MoEOutput>* outs) {
        return FeedForward(in, c, nullptr, outs);
      },
      h, carry, moe_outputs);
}

torch::Tensor BlockImpl::ForwardPieces(const torch::Tensor& x, RouterCarry& carry,
                                       KVCache* kv_cache, torch::Tensor* router_token_state,
                                       std::vector<MoEOutput>* moe_outputs) {
  return FeedForward(x + Dropout(attn_(attn_norm_(x), kv_cache)), carry, router_token_state,
                     moe_outputs);
}

torch::Tensor BlockImpl::Dropout(const torch::Tensor& t) const {
  return dropout_ > 0 && is_training() ? torch::dropout(t, dropout_, /*train=*/true) : t;
}

torch::Tensor BlockImpl::FeedForward(const torch::Tensor& h, RouterCarry& carry,
                                     torch::Tensor* router_token_state,
                                     std::vector<MoEOutput>* moe_outputs) {
  auto normed = ffn_norm_(h);
  if (moe_.is_empty()) return h + Dropout(ffn_(normed));
  auto moe_out = moe_(normed, carry, router_token_state);
  auto out = h + Dropout(moe_out.y);
  moe_outputs->push_back(std::move(moe_out));
  return out;
}

torch::Tensor BlockImpl::Recomputed(const Piece& piece, const torch::Tensor& x, RouterCarry& carry,
                                    std::vector<MoEOutput>* moe_outputs) {
  // The statistics (routing, timings) of the first run; the recomputation's are dropped.
  struct FirstRun {
    bool done = false;
    std::optional<MoEOutput> moe;
  };
  auto first = std::make_shared<FirstRun>();
  const bool carries = carries_router_state_;
  RecomputedFunction fn = [piece, carries, first](const std::vector<torch::Tensor>& in) {
    RouterCarry c;
    if (carries) c.layer_state = in[1];
    std::vector<MoEOutput> outs;
    std::vector<torch::Tensor> result = {piece(in[0], c, &outs)};
    if (carries) result.push_back(c.layer_state);
    if (!outs.empty()) {
      result.push_back(outs.front().load_balance);
      result.push_back(outs.front().z_loss);
      if (!first->done) first->moe = std::move(outs.front());
    }
    first->done = true;
    return result;
  };
  std::vector<torch::Tensor> inputs = {x};
  if (carries) inputs.push_back(carry.layer_state);
  auto outputs = RunWithRecomputation(fn, inputs);
  size_t next = 1;
  if (carries) carry.layer_state = outputs[next++];
  if (first->moe) {
    MoEOutput stats = *std::move(first->moe);
    first->moe.reset();
    stats.y = torch::Tensor();  // inside the block's output; the first run's has no gradient
    stats.load_balance = outputs[next++];
    stats.z_loss = outputs[next++];
    moe_outputs->push_back(std::move(stats));
  }
  return outputs[0];
}

TransformerImpl::TransformerImpl(const ModelSpec& model) : spec_(model) {
  TORCH_CHECK(model.vocab_size() > 0, "model.vocab_size must be resolved before building");
  const auto init = InitScales::FromSpec(model);
  embedding_ = register_module("embedding",
                               torch::nn::Embedding(model.vocab_size(), model.d_model()));
  {
    torch::NoGradGuard no_grad;
    embedding_->weight.normal_(0.0, init.std);
  }
  router_cell_ = MakeSharedRouterCell(model);
  if (!router_cell_.is_empty()) register_module("router_cell", router_cell_);
  // A ModuleList names the parameters "layers.<i>.<...>", as checkpoints expect.
  auto layers = register_module("layers", torch::nn::ModuleList());
  for (int layer = 0; layer < model.num_layers(); ++layer) {
    blocks_.emplace_back(model, init, IsMoELayer(model, layer), router_cell_);
    layers->push_back(blocks_.back());
  }
  final_norm_ = register_module("final_norm", RMSNorm(model.d_model(), model.norm_eps()));
  if (!model.tie_embeddings()) {
    lm_head_ = register_module(
        "lm_head", torch::nn::Linear(torch::nn::LinearOptions(model.d_model(), model.vocab_size()).bias(false)));
    torch::NoGradGuard no_grad;
    lm_head_->weight.normal_(0.0, init.std);
  }
}

void TransformerImpl::set_recompute(RuntimeSpec::Recompute mode) {
  for (auto& block : blocks_) block->set_recompute(mode);
}

DecodeCache TransformerImpl::NewCache() const {
  DecodeCache cache;
  cache.attention.resize(blocks_.size());
  cache.router_token_state.resize(blocks_.size());
  return cache;
}

ModelOutput TransformerImpl::forward(const torch::Tensor& tokens, DecodeCache* cache) {
  TORCH_CHECK(tokens.dim() == 2, "tokens must be [batch, time], got ", tokens.sizes());
  auto x = embedding_(tokens);
  RouterCarry carry;
  ModelOutput out;
  for (size_t layer = 0; layer < blocks_.size(); ++layer) {
    x = blocks_[layer]->forward(x, carry, cache ? &cache->attention[layer] : nullptr,
                                cache ? &cache->router_token_state[layer] : nullptr, &out.moe);
  }
  x = final_norm_(x);
  const auto& head_weight = lm_head_.is_empty() ? embedding_->weight : lm_head_->weight;
  // Logits and the loss stay in fp32 even when activations are lower precision.
  auto logits_type = FullPrecisionType(x.scalar_type());
  out.logits = torch::matmul(x, head_weight.t()).to(logits_type);

  out.router_loss = torch::zeros({}, x.options().dtype(logits_type));
  for (const auto& moe : out.moe) {
    out.router_loss = out.router_loss + spec_.moe().aux_loss_coef() * moe.load_balance +
                      spec_.moe().z_loss_coef() * moe.z_loss;
  }
  return out;
}

ParameterCounts TransformerImpl::CountParameters() const {
  ParameterCounts counts;
  for (const auto& p : parameters()) counts.total += p.numel();
  const int64_t moe_layers = std::count_if(blocks_.begin(), blocks_.end(),
                                           [](const Block& block) { return block->is_moe(); });
  const int64_t per_expert = 3LL * spec_.d_model() * spec_.moe().expert_hidden_dim();
  const int64_t experts = spec_.moe().num_experts(), top_k = spec_.moe().top_k();
  counts.expert = moe_layers * experts * per_expert;
  counts.active = counts.total - moe_layers * (experts - top_k) * per_expert;
  return counts;
}

int64_t TransformerImpl::MatmulParametersPerToken() const {
  const int64_t embedding = spec_.tie_embeddings() ? 0 : int64_t{spec_.vocab_size()} * spec_.d_model();
  return CountParameters().active - embedding;
}

double TransformerImpl::TrainingFlopsPerToken(int64_t seq_len) const {
  return 6.0 * static_cast<double>(MatmulParametersPerToken()) +
         12.0 * spec_.num_layers() * spec_.d_model() * static_cast<double>(seq_len);
}

}  // namespace rmoe
