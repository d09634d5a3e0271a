// Helpers shared by the torch tests: small specs, a finite-difference gradient check and
// a recurrent scan with its gradients, to compare implementations and devices.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "proto/job.pb.h"
#include "rmoe/model/router.h"

namespace rmoe::testing {

// A fresh, empty directory for one test, named after it and this process.
inline std::filesystem::path TempDir(const std::string& name) {
  auto dir = std::filesystem::temp_directory_path() /
             ("rmoe_train_test_" + name + "_" + std::to_string(getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

struct RouterCase {
  std::string name;
  RouterSpec::Kind kind;
  RouterSpec::Cell cell;
  RouterSpec::Recurrence recurrence;
  bool detach_state = false;
};

// gtest prints a parameter with this instead of its bytes.
inline void PrintTo(const RouterCase& router, std::ostream* os) { *os << router.name; }

// Every router the framework offers (the first five in this order: tests index them), and
// the RMoE paper's controls.
inline std::vector<RouterCase> AllRouters() {
  return {{"Linear", RouterSpec::LINEAR, RouterSpec::GRU, RouterSpec::LAYER},
          {"GruLayer", RouterSpec::RECURRENT, RouterSpec::GRU, RouterSpec::LAYER},
          {"RnnLayer", RouterSpec::RECURRENT, RouterSpec::RNN, RouterSpec::LAYER},
          {"GruToken", RouterSpec::RECURRENT, RouterSpec::GRU, RouterSpec::TOKEN},
          {"RnnToken", RouterSpec::RECURRENT, RouterSpec::RNN, RouterSpec::TOKEN},
          {"Mlp", RouterSpec::MLP, RouterSpec::GRU, RouterSpec::LAYER},
          {"GruNoState", RouterSpec::RECURRENT, RouterSpec::GRU, RouterSpec::NONE},
          {"GruDetached", RouterSpec::RECURRENT, RouterSpec::GRU, RouterSpec::LAYER, true}};
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
  r->set_detach_state(router.detach_state);
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

// What a recurrent scan produced, by name, on the CPU in fp64 whatever it ran on.
using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

struct ScanCase {
  RouterSpec::Cell cell;
  int64_t batch, steps;
  bool given_h0;  // false: the cell starts from its default, zeros
};

inline void PrintTo(const ScanCase& c, std::ostream* os) {
  *os << RouterSpec::Cell_Name(c.cell) << " B=" << c.batch << " T=" << c.steps
      << (c.given_h0 ? " with h0" : " from zeros");
}

// Every case the scan tests cover: both cells, a given and a default initial state, one
// step and several, batch 1 and more.
inline std::vector<ScanCase> AllScanCases() {
  std::vector<ScanCase> cases;
  for (auto cell : {RouterSpec::GRU, RouterSpec::RNN}) {
    for (bool given_h0 : {true, false}) {
      for (auto [batch, steps] : {std::pair<int64_t, int64_t>{3, 1}, {3, 9}, {1, 5}}) {
        cases.push_back({cell, batch, steps, given_h0});
      }
    }
  }
  return cases;
}

// The states of a scan by a RecurrentCell with 5 inputs and 4 hidden units and the
// gradients of sum(states * probe) with respect to the input, h0 (when given) and every
// parameter, for `implementation` on `device` in `dtype`. The cell, the inputs and the
// probe depend only on the case (drawn in fp64 on the CPU, then converted), so two calls
// that differ in implementation, device or dtype compute the same function.
inline NamedTensors ScanWithGradients(const ScanCase& c, ScanImplementation implementation,
                                      torch::Device device = torch::kCPU,
                                      torch::ScalarType dtype = torch::kDouble) {
  constexpr int64_t kInputs = 5, kHidden = 4;
  torch::manual_seed(11);
  RecurrentCell cell(c.cell, kInputs, kHidden);
  cell->to(torch::kDouble);
  auto input = torch::randn({c.batch, c.steps, kInputs}, torch::kDouble);
  auto h0 = torch::randn({c.batch, kHidden}, torch::kDouble);
  auto probe = torch::randn({c.batch, c.steps, kHidden}, torch::kDouble);
  cell->to(device, dtype);
  input = input.to(device, dtype).requires_grad_();
  h0 = h0.to(device, dtype).requires_grad_();
  auto states = cell->Scan(input, c.given_h0 ? h0 : torch::Tensor(), implementation);
  (states.to(torch::kCPU, torch::kDouble) * probe).sum().backward();
  auto host = [](const torch::Tensor& t) { return t.to(torch::kCPU, torch::kDouble); };
  NamedTensors out = {{"states", host(states)}, {"grad input", host(input.grad())}};
  if (c.given_h0) out.push_back({"grad h0", host(h0.grad())});
  for (const auto& p : cell->named_parameters()) {
    out.push_back({"grad " + p.key(), host(p.value().grad())});
  }
  return out;
}

// Each of `actual` equals its namesake in `expected` within `tolerance` of the larger of 1
// and the expected values' largest magnitude.
inline void ExpectAllClose(const NamedTensors& actual, const NamedTensors& expected,
                           double tolerance) {
  ASSERT_EQ(actual.size(), expected.size());
  for (size_t i = 0; i < actual.size(); ++i) {
    const auto& [name, a] = actual[i];
    const auto& b = expected[i].second;
    ASSERT_EQ(name, expected[i].first);
    ASSERT_TRUE(a.defined() && b.defined()) << name << " is missing";
    ASSERT_EQ(a.sizes(), b.sizes()) << name;
    const double scale = std::max(1.0, b.abs().max().item<double>());
    EXPECT_LE((a - b).abs().max().item<double>(), tolerance * scale) << name;
  }
}

}  // namespace rmoe::testing
