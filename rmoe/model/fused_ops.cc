#include "rmoe/model/fused_ops.h"

#include <cmath>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

namespace rmoe {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Rows per parallel task: enough work per thread to pay for waking it.
constexpr int64_t kRowGrain = 64;

class RmsNormFunction : public torch::autograd::Function<RmsNormFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& input,
                               const torch::Tensor& weight, double eps) {
    auto x = input.contiguous();
    const int64_t dim = x.size(-1), rows = x.numel() / std::max<int64_t>(dim, 1);
    auto y = torch::empty_like(x);
    const auto acc_dtype = x.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
    auto rstd = torch::empty({rows}, x.options().dtype(acc_dtype));
    auto w = weight.contiguous().to(x.scalar_type());
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm_forward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t *px = x.data_ptr<scalar_t>(), *pw = w.data_ptr<scalar_t>();
      scalar_t* py = y.data_ptr<scalar_t>();
      acc_t* pr = rstd.data_ptr<acc_t>();
      at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const scalar_t* row = px + r * dim;
          acc_t squares = 0;
          for (int64_t i = 0; i < dim; ++i) squares += acc_t(row[i]) * acc_t(row[i]);
          const acc_t inv = acc_t(1) / std::sqrt(squares / dim + acc_t(eps));
          pr[r] = inv;
          for (int64_t i = 0; i < dim; ++i) py[r * dim + i] = acc_t(row[i]) * inv * acc_t(pw[i]);
        }
      });
    });
    ctx->save_for_backward({x, w, rstd});
    ctx->saved_data["weight_dtype"] = static_cast<int64_t>(weight.scalar_type());
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &w = saved[1], &rstd = saved[2];
    auto gy = grads[0].contiguous();
    const int64_t dim = x.size(-1), rows = x.numel() / std::max<int64_t>(dim, 1);
    auto gx = torch::empty_like(x);
    // Weight gradients are summed over rows: each thread sums its rows into its own
    // partial (in the accumulation type), the partials are added at the end.
    const int threads = at::get_num_threads();
    const auto acc_dtype = x.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
    auto partial = torch::zeros({threads, dim}, x.options().dtype(acc_dtype));
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t *px = x.data_ptr<scalar_t>(), *pw = w.data_ptr<scalar_t>();
      const scalar_t* pg = gy.data_ptr<scalar_t>();
      scalar_t* pgx = gx.data_ptr<scalar_t>();
      const acc_t* pr = rstd.data_ptr<acc_t>();
      acc_t* pp = partial.data_ptr<acc_t>();
      at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
        acc_t* gw = pp + at::get_thread_num() * dim;
        for (int64_t r = begin; r < end; ++r) {
          const scalar_t *xr = px + r * dim, *gr = pg + r * dim;
          const acc_t inv = pr[r];
          acc_t dot = 0;  // sum(g * w * xhat)
          for (int64_t i = 0; i < dim; ++i) {
            const acc_t xhat = acc_t(xr[i]) * inv;
            dot += acc_t(gr[i]) * acc_t(pw[i]) * xhat;
            gw[i] += acc_t(gr[i]) * xhat;
          }
          dot /= dim;
          for (int64_t i = 0; i < dim; ++i) {
            const acc_t xhat = acc_t(xr[i]) * inv;
            pgx[r * dim + i] = inv * (acc_t(gr[i]) * acc_t(pw[i]) - xhat * dot);
          }
        }
      });
    });
    const auto weight_dtype = static_cast<torch::ScalarType>(ctx->saved_data["weight_dtype"].toInt());
    return {gx, partial.sum(0).to(weight_dtype), torch::Tensor()};
  }
};

// Rotates the pairs (a, b) = (x[2i], x[2i+1]) of one head's channels by the angle with
// cosine c and sine `sign` * s.
template <typename scalar_t>
inline void RotatePairs(const scalar_t* in, scalar_t* out, const float* cos, const float* sin,
                        int64_t half, float sign) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = 0; i < half; ++i) {
    const acc_t a = in[2 * i], b = in[2 * i + 1], c = cos[i], s = sign * sin[i];
    out[2 * i] = a * c - b * s;
    out[2 * i + 1] = a * s + b * c;
  }
}

class RotaryHeadsFunction : public torch::autograd::Function<RotaryHeadsFunction> {
 public:
  // Moves every (b, t, part, h) row between the [B, T, 3, H, hd] projection layout and the
  // three [B, H, T, hd] head layouts, rotating q and k rows. `to_heads` = forward; the
  // backward runs the same loop the other way with the opposite angle.
  static void Move(const torch::Tensor& packed, const std::array<torch::Tensor, 3>& heads,
                   const torch::Tensor& cos, const torch::Tensor& sin, bool to_heads) {
    const int64_t batch = packed.size(0), t = packed.size(1), num_heads = packed.size(3),
                  hd = packed.size(4), half = hd / 2;
    const float *pc = cos.data_ptr<float>(), *ps = sin.data_ptr<float>();
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, packed.scalar_type(), "rotary_heads", [&] {
      scalar_t* pk = packed.data_ptr<scalar_t>();
      scalar_t* ph[3] = {heads[0].data_ptr<scalar_t>(), heads[1].data_ptr<scalar_t>(),
                         heads[2].data_ptr<scalar_t>()};
      at::parallel_for(0, batch * t, 16, [&](int64_t begin, int64_t end) {
        for (int64_t bt = begin; bt < end; ++bt) {
          const int64_t b = bt / t, pos = bt % t;
          for (int part = 0; part < 3; ++part) {
            for (int64_t h = 0; h < num_heads; ++h) {
              scalar_t* row_packed = pk + ((bt * 3 + part) * num_heads + h) * hd;
              scalar_t* row_head = ph[part] + ((b * num_heads + h) * t + pos) * hd;
              const scalar_t* src = to_heads ? row_packed : row_head;
              scalar_t* dst = to_heads ? row_head : row_packed;
              if (part == 2) {
                std::copy(src, src + hd, dst);
              } else {
                RotatePairs(src, dst, pc + pos * half, ps + pos * half, half,
                            to_heads ? 1.0f : -1.0f);
              }
            }
          }
        }
      });
    });
  }

  static variable_list forward(AutogradContext* ctx, const torch::Tensor& qkv,
                               const torch::Tensor& cos, const torch::Tensor& sin) {
    auto packed = qkv.contiguous();
    const int64_t batch = packed.size(0), t = packed.size(1), num_heads = packed.size(3),
                  hd = packed.size(4);
    std::array<torch::Tensor, 3> heads;
    for (auto& h : heads) h = torch::empty({batch, num_heads, t, hd}, packed.options());
    Move(packed, heads, cos, sin, /*to_heads=*/true);
    ctx->save_for_backward({cos, sin});
    return {heads[0], heads[1], heads[2]};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor* any = nullptr;
    for (const auto& g : grads) {
      if (g.defined()) any = &g;
    }
    if (any == nullptr) return {torch::Tensor(), torch::Tensor(), torch::Tensor()};
    std::array<torch::Tensor, 3> heads;
    for (size_t i = 0; i < 3; ++i) {
      heads[i] = grads[i].defined() ? grads[i].contiguous() : torch::zeros_like(*any);
    }
    const int64_t batch = any->size(0), num_heads = any->size(1), t = any->size(2),
                  hd = any->size(3);
    auto packed = torch::empty({batch, t, 3, num_heads, hd}, any->options());
    Move(packed, heads, saved[0], saved[1], /*to_heads=*/false);
    return {packed, torch::Tensor(), torch::Tensor()};
  }
};

class CrossEntropyFunction : public torch::autograd::Function<CrossEntropyFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& logits,
                               const torch::Tensor& targets) {
    auto log_probs = at::_log_softmax(logits, 1, /*half_to_float=*/false);
    auto picked = log_probs.gather(1, targets.unsqueeze(1));
    ctx->save_for_backward({log_probs, targets});
    ctx->saved_data["consumed"] = false;
    return -picked.mean();
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!ctx->saved_data["consumed"].toBool(),
                "FusedCrossEntropy's backward reuses its saved log-probabilities and runs once "
                "(no retain_graph)");
    ctx->saved_data["consumed"] = true;
    const auto saved = ctx->get_saved_variables();
    auto grad = saved[0];  // log-probabilities, turned in place into the gradient
    const auto& targets = saved[1];
    const int64_t rows = grad.size(0);
    // d(mean_i -log p_i[t_i]) / d logits_ij = (p_ij - [j == t_i]) / N.
    grad.exp_();
    grad.scatter_add_(1, targets.unsqueeze(1),
                      torch::full({rows, 1}, -1.0, grad.options()));
    grad.mul_(grads[0].to(grad.scalar_type()) / static_cast<double>(rows));
    return {grad, torch::Tensor()};
  }
};

// The dtype the fused loops accumulate in: fp32 for bf16, the input's own otherwise.
torch::ScalarType AccumulationType(const torch::Tensor& x) {
  return x.scalar_type() == torch::kBFloat16 ? torch::kFloat : x.scalar_type();
}

void CheckRmsNormArguments(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "RMSNorm weight of shape ",
              weight.sizes(), " for inputs of shape ", x.sizes(), ": it must be [",
              x.size(-1), "]");
}

void CheckRotaryArguments(const torch::Tensor& qkv, const torch::Tensor& cos,
                          const torch::Tensor& sin) {
  TORCH_CHECK(qkv.dim() == 5 && qkv.size(2) == 3 && qkv.size(4) % 2 == 0,
              "qkv must be [B, T, 3, H, even head_dim], got ", qkv.sizes());
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == qkv.size(1) && cos.size(1) == qkv.size(4) / 2 &&
                  sin.sizes() == cos.sizes(),
              "rotary tables must be [T, head_dim / 2] = [", qkv.size(1), ", ", qkv.size(4) / 2,
              "], got ", cos.sizes(), " and ", sin.sizes());
}

}  // namespace

torch::Tensor FusedRmsNorm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  CheckRmsNormArguments(x, weight);
  if (!x.device().is_cpu()) return RmsNormFromOperators(x, weight, eps);
  return RmsNormFunction::apply(x, weight, eps);
}

torch::Tensor RmsNormFromOperators(const torch::Tensor& x, const torch::Tensor& weight,
                                   double eps) {
  CheckRmsNormArguments(x, weight);
  // As the fused loop: the weight in x's dtype, the arithmetic in the accumulation type.
  const auto wide = x.to(AccumulationType(x));
  auto y = wide * torch::rsqrt(wide.square().mean(-1, /*keepdim=*/true) + eps) *
           weight.to(x.scalar_type()).to(wide.scalar_type());
  return y.to(x.scalar_type());
}

std::array<torch::Tensor, 3> SplitHeadsWithRotary(const torch::Tensor& qkv,
                                                  const torch::Tensor& cos,
                                                  const torch::Tensor& sin) {
  CheckRotaryArguments(qkv, cos, sin);
  if (!qkv.device().is_cpu()) return SplitHeadsWithRotaryFromOperators(qkv, cos, sin);
  // The tables are fp32 values (a model moved to fp64 holds them widened, exactly).
  auto out = RotaryHeadsFunction::apply(qkv, cos.to(torch::kFloat).contiguous(),
                                        sin.to(torch::kFloat).contiguous());
  return {out[0], out[1], out[2]};
}

std::array<torch::Tensor, 3> SplitHeadsWithRotaryFromOperators(const torch::Tensor& qkv,
                                                               const torch::Tensor& cos,
                                                               const torch::Tensor& sin) {
  CheckRotaryArguments(qkv, cos, sin);
  const auto parts = qkv.permute({2, 0, 3, 1, 4});  // [3, B, H, T, hd]
  // Pairs (x[2i], x[2i+1]) turned by the angle of their position and i, in the fused loop's
  // precision; the tables are read as fp32 values, as there.
  auto rotate = [&](const torch::Tensor& x) {
    const auto wide = x.to(AccumulationType(x));
    const auto pairs = wide.unflatten(-1, {x.size(-1) / 2, 2});
    const auto even = pairs.select(-1, 0), odd = pairs.select(-1, 1);
    const auto c = cos.to(torch::kFloat).to(wide.scalar_type());
    const auto s = sin.to(torch::kFloat).to(wide.scalar_type());
    auto turned = torch::stack({even * c - odd * s, even * s + odd * c}, -1).flatten(-2);
    return turned.to(x.scalar_type()).contiguous();
  };
  return {rotate(parts[0]), rotate(parts[1]), parts[2].contiguous()};
}

torch::Tensor FusedCrossEntropy(const torch::Tensor& logits, const torch::Tensor& targets) {
  TORCH_CHECK(logits.dim() == 2 && targets.dim() == 1 && targets.size(0) == logits.size(0),
              "cross-entropy of logits ", logits.sizes(), " against targets ", targets.sizes());
  return CrossEntropyFunction::apply(logits, targets);
}

}  // namespace rmoe
