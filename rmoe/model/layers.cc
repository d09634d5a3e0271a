#include "rmoe/model/layers.h"

#include <cmath>

#include "rmoe/model/fused_ops.h"

namespace rmoe {

torch::ScalarType FullPrecisionType(torch::ScalarType activation_dtype) {
  return activation_dtype == torch::kDouble ? torch::kDouble : torch::kFloat;
}

InitScales InitScales::FromSpec(const ModelSpec& model) {
  InitScales scales;
  scales.std = model.init_std();
  scales.residual_std = model.init_std() / std::sqrt(2.0 * model.num_layers());
  return scales;
}

RMSNormImpl::RMSNormImpl(int64_t dim, double eps) : eps_(eps) {
  weight_ = register_parameter("weight", torch::ones({dim}));
}

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) {
  return FusedRmsNorm(x, weight_, eps_);
}

namespace {
thread_local std::optional<torch::ScalarType> matmul_dtype;

// y = x W^T in the low-precision dtype when a guard is active.
torch::Tensor Project(const torch::nn::Linear& linear, const torch::Tensor& x) {
  return torch::nn::functional::linear(ToMatmulDtype(x), ToMatmulDtype(linear->weight));
}

torch::nn::Linear MakeLinear(int64_t in, int64_t out, double std) {
  torch::nn::Linear linear(torch::nn::LinearOptions(in, out).bias(false));
  torch::NoGradGuard no_grad;
  linear->weight.normal_(0.0, std);
  return linear;
}
}  // namespace

LowPrecisionMatmulGuard::LowPrecisionMatmulGuard(std::optional<torch::ScalarType> dtype)
    : previous_(matmul_dtype) {
  matmul_dtype = dtype;
}
LowPrecisionMatmulGuard::~LowPrecisionMatmulGuard() { matmul_dtype = previous_; }
std::optional<torch::ScalarType> LowPrecisionMatmulDtype() { return matmul_dtype; }

torch::Tensor ToMatmulDtype(const torch::Tensor& t) {
  if (!matmul_dtype || !t.is_floating_point() || t.scalar_type() == *matmul_dtype) return t;
  return t.to(*matmul_dtype);
}

SwiGLUImpl::SwiGLUImpl(int64_t d_model, int64_t hidden_dim, const InitScales& init) {
  w1 = register_module("w1", MakeLinear(d_model, hidden_dim, init.std));
  w3 = register_module("w3", MakeLinear(d_model, hidden_dim, init.std));
  w2 = register_module("w2", MakeLinear(hidden_dim, d_model, init.residual_std));
}

torch::Tensor SwiGLUImpl::forward(const torch::Tensor& x) {
  return Project(w2, torch::silu(Project(w1, x)) * Project(w3, x)).to(x.scalar_type());
}

torch::Tensor CausalAttention(const torch::Tensor& q, const torch::Tensor& k,
                              const torch::Tensor& v, int64_t past) {
  const int64_t t = q.size(2);
  TORCH_CHECK(k.size(2) == past + t, "attention over ", k.size(2), " keys for ", t,
              " queries after ", past, " cached positions");
  // The fused kernel's causal mask is aligned to the top left (query i sees keys 0..i), so
  // it is only this mask without a cache; a single new query sees every key.
  if (past == 0) return at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/true);
  if (t == 1) return at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/false);
  return CausalAttentionReference(q, k, v, past);
}

torch::Tensor CausalAttentionReference(const torch::Tensor& q, const torch::Tensor& k,
                                       const torch::Tensor& v, int64_t past) {
  const int64_t t = q.size(2), keys = k.size(2);
  auto query_pos = torch::arange(past, past + t, q.options().dtype(torch::kLong)).unsqueeze(1);
  auto key_pos = torch::arange(keys, q.options().dtype(torch::kLong)).unsqueeze(0);
  auto future = key_pos > query_pos;
  auto scores = torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(static_cast<double>(q.size(3)));
  scores = scores.masked_fill(future, -std::numeric_limits<double>::infinity());
  // Low-precision products still get their softmax in fp32.
  const auto softmax_dtype = q.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  return torch::matmul(torch::softmax(scores, -1, softmax_dtype).to(v.scalar_type()), v);
}

CausalSelfAttentionImpl::CausalSelfAttentionImpl(const ModelSpec& model,
                                                 const InitScales& init)
    : num_heads_(model.num_heads()), head_dim_(model.d_model() / model.num_heads()) {
  qkv_ = register_module("qkv", MakeLinear(model.d_model(), 3 * model.d_model(), init.std));
  out_ = register_module("out", MakeLinear(model.d_model(), model.d_model(), init.residual_std));

  // Rotary tables are derived from the spec, so they are buffers that are not saved.
  auto inv_freq = torch::pow(
      static_cast<double>(model.rope_theta()),
      -torch::arange(0, head_dim_, 2, torch::kDouble) / static_cast<double>(head_dim_));
  auto positions = torch::arange(model.max_seq_len(), torch::kDouble);
  auto angles = torch::outer(positions, inv_freq);
  rope_cos_ = register_buffer("rope_cos", angles.cos().to(torch::kFloat));
  rope_sin_ = register_buffer("rope_sin", angles.sin().to(torch::kFloat));
}

torch::Tensor CausalSelfAttentionImpl::forward(const torch::Tensor& x, KVCache* cache) {
  const int64_t batch = x.size(0), t = x.size(1), d_model = x.size(2);
  const int64_t past = cache ? cache->length() : 0;
  TORCH_CHECK(past + t <= rope_cos_.size(0), "sequence of ", past + t,
              " positions exceeds model.max_seq_len = ", rope_cos_.size(0));
  auto qkv = Project(qkv_, x).view({batch, t, 3, num_heads_, head_dim_});
  // Rotary embedding: each (even, odd) channel pair of q and k turns by its position's angle.
  auto [q, k, v] = SplitHeadsWithRotary(qkv, rope_cos_.narrow(0, past, t),
                                        rope_sin_.narrow(0, past, t));
  if (cache) {
    if (past > 0) {
      k = torch::cat({cache->k, k}, 2);
      v = torch::cat({cache->v, v}, 2);
    }
    cache->k = k;
    cache->v = v;
  }
  auto attended = CausalAttention(q, k, v, past);
  return Project(out_, attended.transpose(1, 2).reshape({batch, t, d_model})).to(x.scalar_type());
}

}  // namespace rmoe
