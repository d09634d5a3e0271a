#include "rmoe/model/router.h"

#include <cmath>

#include "rmoe/config/job_spec.h"  // MlpRouterHiddenDim

namespace rmoe {

namespace {

int64_t GateCount(RouterSpec::Cell cell) { return cell == RouterSpec::GRU ? 3 : 1; }

torch::Tensor LinearNoBias(const torch::Tensor& x, const torch::Tensor& weight) {
  return torch::matmul(x, weight.t());
}

torch::Tensor NormalWeight(int64_t out, int64_t in, double std) {
  return torch::randn({out, in}) * std;
}

// A recurrent router's projection or gate: RouterSpec.recurrent_init_std.
torch::Tensor RecurrentRouterWeight(const RouterSpec& router, int64_t out, int64_t in) {
  if (router.recurrent_init_std() > 0) return NormalWeight(out, in, router.recurrent_init_std());
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  return torch::empty({out, in}).uniform_(-bound, bound);
}

}  // namespace

RecurrentCellImpl::RecurrentCellImpl(RouterSpec::Cell cell, int64_t input_dim,
                                     int64_t hidden_dim)
    : cell_(cell), hidden_dim_(hidden_dim) {
  // PyTorch's RNN initialisation: U(-1/sqrt(H), 1/sqrt(H)) for every weight and bias.
  const double bound = 1.0 / std::sqrt(static_cast<double>(hidden_dim));
  const int64_t gates = GateCount(cell) * hidden_dim;
  auto uniform = [bound](std::vector<int64_t> shape) {
    return torch::empty(shape).uniform_(-bound, bound);
  };
  w_ih_ = register_parameter("w_ih", uniform({gates, input_dim}));
  b_ih_ = register_parameter("b_ih", uniform({gates}));
  w_hh_ = register_parameter("w_hh", uniform({gates, hidden_dim}));
  b_hh_ = register_parameter("b_hh", uniform({gates}));
}

torch::Tensor RecurrentCellImpl::Step(const torch::Tensor& input, const torch::Tensor& h) const {
  auto state = h.defined() ? h : torch::zeros({input.size(0), hidden_dim_}, input.options());
  // ATen's cells: one fused kernel for the gates on CUDA, plain operators on the CPU.
  if (cell_ == RouterSpec::RNN) return at::rnn_tanh_cell(input, state, w_ih_, w_hh_, b_ih_, b_hh_);
  return at::gru_cell(input, state, w_ih_, w_hh_, b_ih_, b_hh_);
}

torch::Tensor RecurrentCellImpl::Scan(const torch::Tensor& input, const torch::Tensor& h0,
                                      ScanImplementation implementation) const {
  auto start = h0.defined() ? h0 : torch::zeros({input.size(0), hidden_dim_}, input.options());
  return RecurrentScan(cell_, input, start, {w_ih_, b_ih_, w_hh_, b_hh_}, implementation);
}

namespace {

class LinearRouter : public Router {
 public:
  LinearRouter(const ModelSpec& model, const InitScales& init) {
    gate_ = register_parameter(
        "gate", NormalWeight(model.moe().num_experts(), model.d_model(), init.std));
  }
  torch::Tensor forward(const torch::Tensor& x, RouterCarry&, torch::Tensor*) override {
    auto flat = x.reshape({-1, x.size(-1)}).to(FullPrecisionType(x.scalar_type()));
    return LinearNoBias(flat, gate_);
  }

 private:
  torch::Tensor gate_;
};

// Also the paper's controls: with recurrence NONE every layer starts from a zero state (and
// passes nothing on); with detach_state the state passed on carries no gradient.
class LayerRecurrentRouter : public Router {
 public:
  LayerRecurrentRouter(const ModelSpec& model, RecurrentCell cell)
      : cell_(std::move(cell)),
        passes_state_(model.router().recurrence() == RouterSpec::LAYER),
        detach_state_(model.router().detach_state()) {
    const int64_t hidden = model.router().hidden_dim();
    proj_ = register_parameter("proj", RecurrentRouterWeight(model.router(), hidden, model.d_model()));
    gate_ = register_parameter(
        "gate", RecurrentRouterWeight(model.router(), model.moe().num_experts(), hidden));
  }
  torch::Tensor forward(const torch::Tensor& x, RouterCarry& carry, torch::Tensor*) override {
    auto flat = x.reshape({-1, x.size(-1)}).to(FullPrecisionType(x.scalar_type()));
    auto state = cell_->Step(LinearNoBias(flat, proj_),
                             passes_state_ ? carry.layer_state : torch::Tensor());
    if (passes_state_) carry.layer_state = detach_state_ ? state.detach() : state;
    return LinearNoBias(state, gate_);
  }

 private:
  RecurrentCell cell_;  // owned (registered) by the model, shared by every MoE layer
  bool passes_state_, detach_state_;
  torch::Tensor proj_, gate_;
};

class MlpRouter : public Router {
 public:
  MlpRouter(const ModelSpec& model, const InitScales& init) {
    const int64_t hidden = MlpRouterHiddenDim(model);
    hidden_ = register_parameter("hidden", NormalWeight(hidden, model.d_model(), init.std));
    hidden_bias_ = register_parameter("hidden_bias", torch::zeros({hidden}));
    gate_ = register_parameter("gate", NormalWeight(model.moe().num_experts(), hidden, init.std));
  }
  torch::Tensor forward(const torch::Tensor& x, RouterCarry&, torch::Tensor*) override {
    auto flat = x.reshape({-1, x.size(-1)}).to(FullPrecisionType(x.scalar_type()));
    return LinearNoBias(torch::tanh(LinearNoBias(flat, hidden_) + hidden_bias_), gate_);
  }

 private:
  torch::Tensor hidden_, hidden_bias_, gate_;
};

class TokenRecurrentRouter : public Router {
 public:
  TokenRecurrentRouter(const ModelSpec& model, ScanImplementation scan) : scan_(scan) {
    const int64_t hidden = model.router().hidden_dim();
    proj_ = register_parameter("proj", RecurrentRouterWeight(model.router(), hidden, model.d_model()));
    cell_ = register_module("cell", RecurrentCell(model.router().cell(), hidden, hidden));
    gate_ = register_parameter(
        "gate", RecurrentRouterWeight(model.router(), model.moe().num_experts(), hidden));
  }
  torch::Tensor forward(const torch::Tensor& x, RouterCarry&, torch::Tensor* token_state) override {
    const int64_t batch = x.size(0), steps = x.size(1);
    auto input = LinearNoBias(x.to(FullPrecisionType(x.scalar_type())), proj_);  // [B, T, H]
    auto states = cell_->Scan(input, token_state ? *token_state : torch::Tensor(), scan_);
    if (token_state) *token_state = states.select(1, steps - 1);
    auto all_states = states.reshape({batch * steps, -1});
    return LinearNoBias(all_states, gate_);
  }

 private:
  ScanImplementation scan_;
  torch::Tensor proj_, gate_;
  RecurrentCell cell_{nullptr};
};

}  // namespace

RecurrentCell MakeSharedRouterCell(const ModelSpec& model) {
  const auto& router = model.router();
  if (router.kind() != RouterSpec::RECURRENT || router.recurrence() == RouterSpec::TOKEN) {
    return RecurrentCell(nullptr);
  }
  return RecurrentCell(router.cell(), router.hidden_dim(), router.hidden_dim());
}

std::shared_ptr<Router> MakeRouter(const ModelSpec& model, const InitScales& init,
                                   RecurrentCell shared_cell, ScanImplementation token_scan) {
  if (model.router().kind() == RouterSpec::LINEAR) {
    return std::make_shared<LinearRouter>(model, init);
  }
  if (model.router().kind() == RouterSpec::MLP) return std::make_shared<MlpRouter>(model, init);
  if (model.router().recurrence() != RouterSpec::TOKEN) {
    TORCH_CHECK(!shared_cell.is_empty(), "layer-recurrent router needs the model's shared cell");
    return std::make_shared<LayerRecurrentRouter>(model, std::move(shared_cell));
  }
  return std::make_shared<TokenRecurrentRouter>(model, token_scan);
}

}  // namespace rmoe
