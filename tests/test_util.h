// Helpers shared by the torch tests: small specs and a finite-difference gradient check.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "proto/job.pb.h"

namespace rmoe::testing {

struct RouterCase {
  std::string name;
  RouterSpec::Kind kind;
  RouterSpec::Cell cell;
  RouterSpec::Recurrence recurrence;
};

// gtest prints a parameter with this instead of its bytes.
inline void PrintTo(const RouterCase& router, std::ostream* os) { *os << router.name; }

// Every router the framework offers.
inline std::vector<RouterCase> AllRouters() {
  return {{"Linear", RouterSpec::LINEAR, RouterSpec::GRU, RouterSpec::LAYER},
          {"GruLayer", RouterSpec::RECURRENT, RouterSpec::GRU, RouterSpec::LAYER},
          {"RnnLayer", RouterSpec::RECURRENT, RouterSpec::RNN, RouterSpec::LAYER},
          {"GruToken", RouterSpec::RECURRENT, RouterSpec::GRU, RouterSpec::TOKEN},
          {"RnnToken", RouterSpec::RECURRENT, RouterSpec::RNN, RouterSpec::TOKEN}};
}

// A model small enough for exhaustive checks in double precision.
inline ModelSpec TinyModel(const RouterCase& router = AllRouters()[1]) {
  ModelSpec model;
  model.set_vocab_size(37);
  model.set_d_model(16);
  model.set_num_layers(3);
  model.set_num_heads(2);
  model.set_max_seq_len(32);
  model.set_init_std(0.2);  // large enough that routing is far from uniform
  auto* moe = model.mutable_moe();
  moe->set_num_experts(4);
  moe->set_top_k(2);
  moe->set_expert_hidden_dim(8);
  auto* r = model.mutable_router();
  r->set_kind(router.kind);
  r->set_cell(router.cell);
  r->set_recurrence(router.recurrence);
  r->set_hidden_dim(8);
  return model;
}

// Compares the autograd gradient of sum(f() * probe) with respect to `inputs` against
// central finite differences, on `samples` random entries of each input. Run in double.
inline void ExpectGradientsMatchFiniteDifferences(
    const std::function<torch::Tensor()>& f, const std::vector<torch::Tensor>& inputs,
    int samples = 12, double eps = 1e-6, double tolerance = 1e-6) {
  auto probe = torch::randn_like(f().detach());
  auto objective = [&] { return (f() * probe).sum(); };
  for (auto input : inputs) {
    if (input.grad().defined()) input.mutable_grad().zero_();
  }
  objective().backward();
  for (size_t i = 0; i < inputs.size(); ++i) {
    auto input = inputs[i];
    ASSERT_TRUE(input.grad().defined()) << "input " << i << " received no gradient";
    auto grad = input.grad().reshape({-1}).clone();
    auto flat = input.detach().view({-1});
    for (int s = 0; s < samples; ++s) {
      const int64_t index = torch::randint(flat.numel(), {1}).item<int64_t>();
      const double original = flat[index].item<double>();
      double plus, minus;
      {
        torch::NoGradGuard no_grad;
        flat[index] = original + eps;
        plus = objective().item<double>();
        flat[index] = original - eps;
        minus = objective().item<double>();
        flat[index] = original;
      }
      const double numeric = (plus - minus) / (2 * eps);
      const double analytic = grad[index].item<double>();
      EXPECT_NEAR(analytic, numeric, tolerance * std::max(1.0, std::abs(numeric)))
          << "input " << i << " entry " << index;
    }
  }
}

}  // namespace rmoe::testing
