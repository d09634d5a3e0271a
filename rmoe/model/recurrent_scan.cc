#include "rmoe/model/recurrent_scan.h"

#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include <c10/util/Exception.h>

namespace rmoe {
namespace {

template <typename T>
T Sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// Pointers into one step's rows: element (b, j) of a [B, T, W] tensor at step t.
template <typename T>
struct StepView {
  T* data;
  int64_t steps, width;
  T& at(int64_t b, int64_t t, int64_t j) const { return data[(b * steps + t) * width + j]; }
};

class ScanFunction : public torch::autograd::Function<ScanFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx,
                               const torch::Tensor& input_gates, const torch::Tensor& h0,
                               const torch::Tensor& w_hh, const torch::Tensor& b_hh,
                               int64_t cell) {
    const bool gru = cell == RouterSpec::GRU;
    const auto gi = input_gates.contiguous();
    const int64_t batch = gi.size(0), steps = gi.size(1), hidden = w_hh.size(1);
    const int64_t gates = gru ? 3 : 1;
    auto states = torch::empty({batch, steps, hidden}, gi.options());
    // What the backward needs per step: GRU r, z, n and the hidden part of n's gate.
    auto saved = torch::empty({batch, steps, gru ? 4 * hidden : 0}, gi.options());
    auto hidden_gates = torch::empty({batch, gates * hidden}, gi.options());
    const auto w_t = w_hh.t();
    const auto start = h0.contiguous();
    AT_DISPATCH_FLOATING_TYPES(gi.scalar_type(), "RecurrentScan", [&] {
      const StepView<scalar_t> in{gi.data_ptr<scalar_t>(), steps, gates * hidden};
      const StepView<scalar_t> out{states.data_ptr<scalar_t>(), steps, hidden};
      const StepView<scalar_t> keep{saved.data_ptr<scalar_t>(), steps, 4 * hidden};
      const scalar_t* hg = hidden_gates.data_ptr<scalar_t>();
      const scalar_t* first = start.data_ptr<scalar_t>();
      for (int64_t t = 0; t < steps; ++t) {
        const auto h = t == 0 ? start : states.select(1, t - 1);
        torch::addmm_out(hidden_gates, b_hh, h, w_t);
        for (int64_t b = 0; b < batch; ++b) {
          const scalar_t* hg_b = hg + b * gates * hidden;
          for (int64_t j = 0; j < hidden; ++j) {
            if (!gru) {
              out.at(b, t, j) = std::tanh(in.at(b, t, j) + hg_b[j]);
              continue;
            }
            const scalar_t prev = t == 0 ? first[b * hidden + j] : out.at(b, t - 1, j);
            const scalar_t r = Sigmoid(in.at(b, t, j) + hg_b[j]);
            const scalar_t z = Sigmoid(in.at(b, t, hidden + j) + hg_b[hidden + j]);
            const scalar_t hn = hg_b[2 * hidden + j];
            const scalar_t n = std::tanh(in.at(b, t, 2 * hidden + j) + r * hn);
            out.at(b, t, j) = (1 - z) * n + z * prev;
            keep.at(b, t, j) = r;
            keep.at(b, t, hidden + j) = z;
            keep.at(b, t, 2 * hidden + j) = n;
            keep.at(b, t, 3 * hidden + j) = hn;
          }
        }
      }
    });
    ctx->save_for_backward({start, w_hh, states, saved});
    ctx->saved_data["cell"] = cell;
    return states;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto vars = ctx->get_saved_variables();
    const auto &h0 = vars[0], &w_hh = vars[1], &states = vars[2], &saved = vars[3];
    const bool gru = ctx->saved_data["cell"].toInt() == RouterSpec::GRU;
    const auto grad_states = grads[0].contiguous();
    const int64_t batch = states.size(0), steps = states.size(1), hidden = states.size(2);
    const int64_t gates = gru ? 3 : 1;
    auto grad_input = torch::empty({batch, steps, gates * hidden}, states.options());
    auto grad_hidden_gates = torch::empty_like(grad_input);  // d(W_hh h + b_hh) per step
    auto grad_h = torch::zeros({batch, hidden}, states.options());  // dL/dh_{t-1} carried
    AT_DISPATCH_FLOATING_TYPES(states.scalar_type(), "RecurrentScanBackward", [&] {
      const StepView<scalar_t> out{states.data_ptr<scalar_t>(), steps, hidden};
      const StepView<scalar_t> keep{saved.data_ptr<scalar_t>(), steps, 4 * hidden};
      const StepView<scalar_t> go{grad_states.data_ptr<scalar_t>(), steps, hidden};
      const StepView<scalar_t> gin{grad_input.data_ptr<scalar_t>(), steps, gates * hidden};
      const StepView<scalar_t> ghg{grad_hidden_gates.data_ptr<scalar_t>(), steps, gates * hidden};
      scalar_t* dh = grad_h.data_ptr<scalar_t>();
      const scalar_t* first = h0.data_ptr<scalar_t>();
      for (int64_t t = steps - 1; t >= 0; --t) {
        for (int64_t b = 0; b < batch; ++b) {
          for (int64_t j = 0; j < hidden; ++j) {
            const scalar_t d = go.at(b, t, j) + dh[b * hidden + j];
            if (!gru) {
              const scalar_t h = out.at(b, t, j);
              const scalar_t pre = d * (1 - h * h);
              gin.at(b, t, j) = pre;
              ghg.at(b, t, j) = pre;
              dh[b * hidden + j] = 0;
              continue;
            }
            const scalar_t prev = t == 0 ? first[b * hidden + j] : out.at(b, t - 1, j);
            const scalar_t r = keep.at(b, t, j), z = keep.at(b, t, hidden + j);
            const scalar_t n = keep.at(b, t, 2 * hidden + j), hn = keep.at(b, t, 3 * hidden + j);
            const scalar_t pre_n = d * (1 - z) * (1 - n * n);
            const scalar_t pre_z = d * (prev - n) * z * (1 - z);
            const scalar_t pre_r = pre_n * hn * r * (1 - r);
            gin.at(b, t, j) = pre_r;
            gin.at(b, t, hidden + j) = pre_z;
            gin.at(b, t, 2 * hidden + j) = pre_n;
            ghg.at(b, t, j) = pre_r;
            ghg.at(b, t, hidden + j) = pre_z;
            ghg.at(b, t, 2 * hidden + j) = pre_n * r;
            dh[b * hidden + j] = d * z;  // through h' = ... + z h
          }
        }
        grad_h.addmm_(grad_hidden_gates.select(1, t), w_hh);  // through W_hh h
      }
    });
    // h_{t-1} for every step, then the recurrent weights' gradient in one product.
    auto previous = torch::cat({h0.unsqueeze(1), states.narrow(1, 0, steps - 1)}, 1);
    auto flat_grad = grad_hidden_gates.reshape({batch * steps, gates * hidden});
    auto grad_w_hh = flat_grad.t().mm(previous.reshape({batch * steps, hidden}));
    auto grad_b_hh = flat_grad.sum(0);
    return {grad_input, grad_h, grad_w_hh, grad_b_hh, torch::Tensor()};
  }
};

void CheckScanArguments(RouterSpec::Cell cell, const torch::Tensor& input,
                        const torch::Tensor& h0, const RecurrentCellWeights& w) {
  TORCH_CHECK(cell == RouterSpec::GRU || cell == RouterSpec::RNN,
              "RecurrentScan: cell must be GRU or RNN, got ", RouterSpec::Cell_Name(cell));
  const int64_t gates = cell == RouterSpec::GRU ? 3 : 1, hidden = w.w_hh.size(-1);
  TORCH_CHECK(input.dim() == 3 && h0.dim() == 2 && h0.size(0) == input.size(0) &&
                  h0.size(1) == hidden,
              "RecurrentScan: input must be [B, T, I] and h0 [B, H = ", hidden, "], got ",
              input.sizes(), " and ", h0.sizes());
  TORCH_CHECK(w.w_ih.sizes() == torch::IntArrayRef({gates * hidden, input.size(2)}) &&
                  w.w_hh.sizes() == torch::IntArrayRef({gates * hidden, hidden}) &&
                  w.b_ih.sizes() == torch::IntArrayRef({gates * hidden}) &&
                  w.b_hh.sizes() == w.b_ih.sizes(),
              "RecurrentScan: a ", RouterSpec::Cell_Name(cell), " of ", gates, " gates of ", hidden,
              " over inputs of width ", input.size(2), " needs w_ih [", gates * hidden, ", ",
              input.size(2), "], w_hh [", gates * hidden, ", ", hidden, "] and biases [",
              gates * hidden, "], got ", w.w_ih.sizes(), ", ", w.w_hh.sizes(), ", ",
              w.b_ih.sizes(), " and ", w.b_hh.sizes());
  for (const auto* t : {&h0, &w.w_ih, &w.b_ih, &w.w_hh, &w.b_hh}) {
    TORCH_CHECK(t->device() == input.device() && t->scalar_type() == input.scalar_type(),
                "RecurrentScan: every tensor must have the input's device and dtype (",
                input.device(), ", ", input.scalar_type(), "), got one on ", t->device(), " in ",
                t->scalar_type());
  }
}

torch::Tensor HostLoopScan(RouterSpec::Cell cell, const torch::Tensor& input,
                           const torch::Tensor& h0, const RecurrentCellWeights& w) {
  TORCH_CHECK(input.device().is_cpu(),
              "RecurrentScan: the host loop reads the tensors' memory on the host and needs CPU "
              "tensors, got them on ", input.device(), "; use ScanImplementation::kDeviceOps "
              "(or kAuto) there");
  // Everything that does not depend on h is one product over all tokens up front.
  auto input_gates = torch::nn::functional::linear(input, w.w_ih, w.b_ih);
  return ScanFunction::apply(input_gates, h0, w.w_hh, w.b_hh, static_cast<int64_t>(cell));
}

// cuDNN takes an RNN's weights as views into one buffer of its own layout (what
// nn.GRU's flatten_parameters arranges) and otherwise copies them into such a buffer on
// every call, warning each time. For a router cell the copy is 3H(I + H) + 6H numbers,
// nothing next to the scan itself, so the cell keeps plain parameters (one layout on every
// device, in checkpoints too) and this warning alone is dropped while the scan runs.
class DropWeightCompactionWarning : public c10::WarningHandler {
 public:
  void process(const c10::Warning& warning) override {
    if (warning.msg().find("not part of single contiguous chunk") != std::string::npos) return;
    next_->process(warning);
  }

 private:
  c10::WarningHandler* next_ = c10::WarningUtils::get_warning_handler();
};

torch::Tensor DeviceOpsScan(RouterSpec::Cell cell, const torch::Tensor& input,
                            const torch::Tensor& h0, const RecurrentCellWeights& w) {
  const std::vector<torch::Tensor> params = {w.w_ih, w.w_hh, w.b_ih, w.b_hh};
  // [layers, B, H]; cuDNN refuses a strided initial state, and a state carried from an
  // earlier call is a slice of that call's states.
  const auto hx = h0.contiguous().unsqueeze(0);
  // cuDNN keeps what its backward needs only when told it will train.
  const bool train = torch::GradMode::is_enabled();
  DropWeightCompactionWarning drop_compaction_warning;
  c10::WarningUtils::WarningHandlerGuard warnings(&drop_compaction_warning);
  using MultiStepRnn = std::tuple<torch::Tensor, torch::Tensor> (*)(
      const torch::Tensor&, const torch::Tensor&, torch::TensorList, bool, int64_t, double, bool,
      bool, bool);
  const auto run = cell == RouterSpec::GRU ? MultiStepRnn(&at::gru) : MultiStepRnn(&at::rnn_tanh);
  return std::get<0>(run(input, hx, params, /*has_biases=*/true, /*num_layers=*/1,
                         /*dropout=*/0.0, train, /*bidirectional=*/false,
                         /*batch_first=*/true));
}

}  // namespace

ScanImplementation ResolveScanImplementation(ScanImplementation requested,
                                             const torch::Device& device) {
  if (requested != ScanImplementation::kAuto) return requested;
  return device.is_cpu() ? ScanImplementation::kHostLoop : ScanImplementation::kDeviceOps;
}

torch::Tensor RecurrentScan(RouterSpec::Cell cell, const torch::Tensor& input,
                            const torch::Tensor& h0, const RecurrentCellWeights& weights,
                            ScanImplementation implementation) {
  CheckScanArguments(cell, input, h0, weights);
  if (ResolveScanImplementation(implementation, input.device()) == ScanImplementation::kHostLoop) {
    return HostLoopScan(cell, input, h0, weights);
  }
  return DeviceOpsScan(cell, input, h0, weights);
}

}  // namespace rmoe
