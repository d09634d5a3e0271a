// rmoe_bench moe and rmoe_bench router: one MoE layer's forward+backward at realistic sizes,
// split into its phases, as a fraction of the matrix-product ceiling measured in the same
// run; and each router's cost as a share of the MoE layer it routes for.
#include <chrono>
#include <cstdio>
#include <functional>
#include <map>
#include <string>

#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>
#include <absl/strings/str_split.h>
#include <torch/torch.h>

#include "rmoe/model/experts.h"
#include "rmoe/model/moe_layer.h"
#include "rmoe/model/router.h"
#include "rmoe/train/trainer.h"
#include "tools/bench_common.h"

namespace rmoe::bench {

const char kMoeUsage[] = R"(Usage: rmoe_bench moe [options]

One MoE layer (router, top-k, dropless dispatch, SwiGLU experts, weighted combine), forward
and backward, on random activations. Each configuration runs twice: with the routing its
randomly initialised linear router chooses ("natural", somewhat uneven) and with routing
forced to be perfectly balanced (token i to experts i, i+1, ... mod E; the combine weights
still come from the router, so its backward runs). Reported per configuration:
  layer ms       median forward+backward time of the whole layer
  tokens/s       tokens / layer time
  GFLOP/s        expert FLOPs / layer time; expert FLOPs = 18 d_model hidden tokens top_k
                 (3 products of 2 d h FLOPs per assignment forward, x3 with backward)
  % ceiling      GFLOP/s over the fp32 ceiling: the fastest of square n=1024 and the
                 expert-shaped product ([tokens k / E, d] x [d, h]), measured in this run
  phases         the same work run phase by phase (each phase's forward and backward
                 timed on its own): routing (router, softmax, top-k), permutation (plan,
                 gather into expert order), experts (the grouped SwiGLU products), combine
                 (weighting, scatter-add back to tokens); their sum is shown beside the
                 whole layer's time

The allocator is set up as rmoe_train sets it by default (runtime.keep_freed_memory: freed
buffers stay in glibc's heap for the next pass); --system-malloc 1 leaves glibc's defaults.

Options:
  --d-model D        model width (default 512)
  --hidden H         expert hidden width (default 2048)
  --experts LIST     expert counts (default 8,32)
  --top-k K          (default 2)
  --tokens N         tokens per layer call (default 4096, as 16 sequences of 256)
  --dtype fp32|bf16  expert and activation dtype (default fp32; router math stays fp32)
  --system-malloc 0|1  1: glibc's default allocator settings (default 0)
  --repeats R        timed repeats; the median is reported (default 5)
  --threads T        intra-op threads (default: every core of this process)
  --json PATH        also write the results as JSON
)";

const char kRouterUsage[] = R"(Usage: rmoe_bench router [options]

Each router's forward+backward time, alone and as a share of the MoE layer it routes for
(the layer timed whole, router included, as in rmoe_bench moe), at several sequence lengths
with the same number of tokens (batch = tokens / seq_len):
  linear       logits = W x
  gru-layer    the RMoE router: a GRU cell whose state comes from the previous MoE layer
  rnn-layer    the same with an Elman RNN cell
  gru-token    a GRU scanned along the sequence (the seed prototype): seq_len sequential
  rnn-token    steps; per-token and per-step costs are reported
The layer-recurrent routers are timed with an incoming state (an MoE layer after the
first), so the cell's full cost is in.

Options:
  --seq-lens LIST    sequence lengths (default 256,1024,4096)
  --tokens N         tokens per call (default 4096)
  --d-model D        (default 512)   --hidden H      expert hidden (default 2048)
  --experts E        (default 8)     --top-k K       (default 2)
  --router-hidden R  recurrent state width (default 64)
  --scan S           how the token routers scan: auto (the host loop on the CPU),
                     host-loop or device-ops (ATen's multi-step RNN, forced here)
  --repeats R        timed repeats, median reported (default 5)
  --threads T        intra-op threads (default: every core of this process)
  --json PATH        also write the results as JSON
)";

namespace {


// Median seconds of `repeats` calls of `f` after one untimed call.
double MedianSeconds(int repeats, const std::function<void()>& f) {
  f();
  std::vector<double> times;
  for (int r = 0; r < repeats; ++r) {
    const auto start = Clock::now();
    f();
    times.push_back(SecondsSince(start));
  }
  return Median(times);
}

ModelSpec LayerSpec(int64_t d_model, int64_t hidden, int64_t experts, int64_t top_k) {
  ModelSpec model;
  model.set_d_model(d_model);
  model.set_num_layers(1);
  model.set_num_heads(1);
  auto* moe = model.mutable_moe();
  moe->set_num_experts(experts);
  moe->set_top_k(top_k);
  moe->set_expert_hidden_dim(hidden);
  moe->set_capacity_factor(0);  // dropless: every assignment is computed
  model.mutable_router()->set_kind(RouterSpec::LINEAR);
  return model;
}

// The fastest of `repeats` products [m, k] x [k, n] in GFLOP/s.
double MatmulGflops(int64_t m, int64_t k, int64_t n, torch::ScalarType dtype, int repeats) {
  auto a = torch::randn({m, k}).to(dtype), b = torch::randn({k, n}).to(dtype);
  auto c = torch::mm(a, b);
  double best = 1e30;
  for (int r = 0; r < std::max(3, repeats * 2); ++r) {
    const auto start = Clock::now();
    torch::mm_out(c, a, b);
    best = std::min(best, SecondsSince(start));
  }
  return 2.0 * m * k * n / best / 1e9;
}

// Round-robin routing: token i to experts i, i+1, ..., i+k-1 (mod E): every expert gets
// exactly N k / E assignments.
torch::Tensor BalancedIndex(int64_t tokens, int64_t experts, int64_t top_k) {
  auto base = torch::arange(tokens, torch::kLong).unsqueeze(1);
  return (base + torch::arange(top_k, torch::kLong).unsqueeze(0)).remainder(experts);
}

struct Phases {
  double routing = 0, permutation = 0, experts = 0, combine = 0;
  double sum() const { return routing + permutation + experts + combine; }
};

// One MoE layer's pieces, with routing either the router's or forced balanced.
struct LayerUnderTest {
  MoELayer layer{nullptr};
  torch::Tensor x, grad_y;  // [B, T, D] input (requires grad), upstream gradient
  bool balanced = false;
  int64_t top_k = 2, experts = 8;

  RoutingDecision Route(const torch::Tensor& logits, torch::Tensor* probs) const {
    auto routing = RouteTopK(logits, top_k, /*renormalize=*/false);
    if (probs) *probs = routing.probs;
    if (!balanced) return routing.decision;
    RoutingDecision forced;
    forced.expert_index = BalancedIndex(logits.size(0), experts, top_k);
    forced.weight = routing.probs.gather(1, forced.expert_index);
    return forced;
  }

  // The whole layer, forward and backward, as MoELayer::forward computes it.
  void Full() {
    x.mutable_grad() = torch::Tensor();
    RouterCarry carry;
    torch::Tensor y;
    if (!balanced) {
      y = layer->forward(x, carry, nullptr).y;
    } else {
      auto logits = layer->router().forward(x, carry, nullptr);
      auto decision = Route(logits, nullptr);
      LocalDispatcher dispatcher;
      auto flat = x.reshape({-1, x.size(-1)});
      y = RunExperts(dispatcher, flat, PlanDispatch(decision, experts, 0), layer->experts())
              .view_as(x);
    }
    y.backward(grad_y);
  }

  // The same work phase by phase; each phase's inputs are fresh leaves.
  Phases Split(int repeats) {
    Phases p;
    Router& router = layer->router();
    auto flat = x.detach().reshape({-1, x.size(-1)});
    RoutingDecision decision;
    p.routing = MedianSeconds(repeats, [&] {
      auto input = x.detach().requires_grad_();
      RouterCarry carry;
      torch::Tensor probs;
      decision = Route(router.forward(input, carry, nullptr), &probs);
      // What reaches the router in training: the combine weights' gradient.
      decision.weight.backward(torch::ones_like(decision.weight));
    });
    decision.weight = decision.weight.detach();
    DispatchPlan plan;
    torch::Tensor permuted;
    p.permutation = MedianSeconds(repeats, [&] {
      auto input = flat.detach().requires_grad_();
      plan = PlanDispatch(decision, experts, 0);
      permuted = input.index_select(0, plan.token);
      permuted.backward(torch::ones_like(permuted));
    });
    permuted = permuted.detach();
    torch::Tensor expert_out;
    p.experts = MedianSeconds(repeats, [&] {
      auto input = permuted.detach().requires_grad_();
      expert_out = layer->experts()->forward(input, plan.tokens_per_expert);
      expert_out.backward(torch::ones_like(expert_out));
    });
    expert_out = expert_out.detach();
    p.combine = MedianSeconds(repeats, [&] {
      auto out = expert_out.detach().requires_grad_();
      auto weight = plan.weight.detach().requires_grad_();
      auto weighted = out * weight.unsqueeze(1).to(out.scalar_type());
      auto y = torch::zeros_like(flat).index_add(0, plan.token, weighted);
      y.backward(torch::ones_like(y));
    });
    layer->zero_grad();
    return p;
  }
};

std::string Ms(double seconds) { return absl::StrFormat("%.1f", seconds * 1e3); }

}  // namespace

int RunMoe(const std::vector<std::string>& args, distributed::MpiRuntime& mpi) {
  const Options o(args, {"--d-model", "--hidden", "--experts", "--top-k", "--tokens", "--dtype",
                         "--repeats", "--system-malloc"});
  const bool system_malloc = o.Int("--system-malloc", 0, 0) != 0;
  if (!system_malloc) KeepFreedMemoryForReuse();
  const int64_t d = o.Int("--d-model", 512), h = o.Int("--hidden", 2048);
  const int64_t top_k = o.Int("--top-k", 2), tokens = o.Int("--tokens", 4096);
  const auto expert_counts = o.IntList("--experts", {8, 32});
  const int repeats = static_cast<int>(o.Int("--repeats", 5));
  const std::string dtype_name = o.String("--dtype", "fp32");
  if (dtype_name != "fp32" && dtype_name != "bf16") throw UsageError("--dtype takes fp32 or bf16");
  const auto dtype = dtype_name == "fp32" ? torch::kFloat : torch::kBFloat16;
  for (int64_t e : expert_counts) {
    if (top_k > e) throw UsageError(absl::StrFormat("--top-k %d exceeds --experts %d", top_k, e));
  }
  auto& world = mpi.World();
  SetThreads(static_cast<int>(o.Int("--threads", 0)), mpi.LocalSize());
  const Context context = GatherContext(mpi, world);
  const bool is_main = world.rank() == 0;
  if (is_main) PrintContext(context);

  const int64_t seq = std::min<int64_t>(256, tokens);
  if (tokens % seq != 0) throw UsageError("--tokens must be a multiple of 256 (or below it)");
  const double square = MatmulGflops(1024, 1024, 1024, torch::kFloat, repeats);
  Table table({"experts", "routing", "layer ms", "tokens/s", "GFLOP/s", "% ceiling", "routing ms",
               "permute ms", "experts ms", "combine ms", "sum ms", "max/mean load"});
  std::vector<JsonObject> rows;
  std::string ceilings;
  for (int64_t e : expert_counts) {
    const int64_t rows_per_expert = std::max<int64_t>(1, tokens * top_k / e);
    const double shaped = MatmulGflops(rows_per_expert, d, h, torch::kFloat, repeats);
    const double ceiling = std::max(square, shaped);
    absl::StrAppend(&ceilings, absl::StrFormat(
        "  E=%d: fp32 [%d, %d] x [%d, %d] %.1f GFLOP/s, square 1024 %.1f: ceiling %.1f\n", e,
        rows_per_expert, d, d, h, shaped, square, ceiling));
    for (bool balanced : {false, true}) {
      torch::manual_seed(5);
      LayerUnderTest t;
      t.layer = MoELayer(LayerSpec(d, h, e, top_k), InitScales{0.02, 0.02}, RecurrentCell(nullptr));
      t.layer->experts()->to(dtype);
      t.x = torch::randn({tokens / seq, seq, d}).to(dtype).requires_grad_();
      t.grad_y = torch::randn({tokens / seq, seq, d}).to(dtype);
      t.balanced = balanced;
      t.top_k = top_k;
      t.experts = e;
      const double full = MedianSeconds(repeats, [&] { t.Full(); });
      const Phases p = t.Split(repeats);
      // Load skew of the routing actually used.
      torch::Tensor load;
      {
        torch::NoGradGuard no_grad;
        RouterCarry carry;
        auto logits = t.layer->router().forward(t.x, carry, nullptr);
        load = torch::bincount(t.Route(logits, nullptr).expert_index.reshape({-1}), {}, e).to(torch::kDouble);
      }
      const double skew = (load.max() / load.mean()).item<double>();
      const double flops = 18.0 * d * h * tokens * top_k;
      const double gflops = flops / full / 1e9;
      const std::string routing = balanced ? "balanced" : "natural";
      table.Add({absl::StrCat(e), routing, Ms(full), Human(tokens / full),
                 absl::StrFormat("%.1f", gflops), absl::StrFormat("%.0f%%", 100 * gflops / ceiling),
                 Ms(p.routing), Ms(p.permutation), Ms(p.experts), Ms(p.combine), Ms(p.sum()),
                 absl::StrFormat("%.2f", skew)});
      rows.push_back(JsonObject()
                         .Add("experts", e)
                         .Add("routing", routing)
                         .Add("layer_seconds", full)
                         .Add("tokens_per_s", tokens / full)
                         .Add("gflops_per_s", gflops)
                         .Add("ceiling_gflops_per_s", ceiling)
                         .Add("fraction_of_ceiling", gflops / ceiling)
                         .Add("routing_seconds", p.routing)
                         .Add("permutation_seconds", p.permutation)
                         .Add("experts_seconds", p.experts)
                         .Add("combine_seconds", p.combine)
                         .Add("max_over_mean_load", skew));
    }
  }
  if (is_main) {
    absl::PrintF("moe: d_model %d, hidden %d, top-%d, %d tokens, %s experts, dropless; medians of "
                "%d forward+backward passes; allocator: %s\nceilings (fastest fp32 product, this run):\n%s",
                d, h, top_k, tokens, dtype_name, repeats,
                system_malloc ? "glibc defaults" : "freed memory kept for reuse", ceilings);
    table.Print();
    std::printf("\n");
  }
  JsonObject result;
  result.Add("d_model", d).Add("hidden", h).Add("top_k", top_k).Add("tokens", tokens)
      .Add("dtype", dtype_name).AddRaw("keep_freed_memory", system_malloc ? "false" : "true")
      .AddRaw("moe", JsonArray(rows));
  if (is_main) WriteJson(o.String("--json", ""), "moe", context, result);
  return 0;
}

int RunRouter(const std::vector<std::string>& args, distributed::MpiRuntime& mpi) {
  const Options o(args, {"--seq-lens", "--tokens", "--d-model", "--hidden", "--experts", "--top-k",
                         "--router-hidden", "--scan", "--repeats"});
  const auto seq_lens = o.IntList("--seq-lens", {256, 1024, 4096});
  const int64_t tokens = o.Int("--tokens", 4096), d = o.Int("--d-model", 512);
  const int64_t h = o.Int("--hidden", 2048), e = o.Int("--experts", 8), top_k = o.Int("--top-k", 2);
  const int64_t router_hidden = o.Int("--router-hidden", 64);
  const int repeats = static_cast<int>(o.Int("--repeats", 5));
  if (top_k > e) throw UsageError("--top-k exceeds --experts");
  const std::string scan_name = o.String("--scan", "auto");
  const std::map<std::string, ScanImplementation> scans = {
      {"auto", ScanImplementation::kAuto},
      {"host-loop", ScanImplementation::kHostLoop},
      {"device-ops", ScanImplementation::kDeviceOps}};
  if (!scans.count(scan_name)) {
    throw UsageError("--scan " + scan_name + " is not one of auto, host-loop, device-ops");
  }
  const ScanImplementation scan = scans.at(scan_name);
  KeepFreedMemoryForReuse();  // as rmoe_train
  for (int64_t t : seq_lens) {
    if (tokens % t != 0) throw UsageError(absl::StrFormat("--tokens %d is not a multiple of seq len %d", tokens, t));
  }
  auto& world = mpi.World();
  SetThreads(static_cast<int>(o.Int("--threads", 0)), mpi.LocalSize());
  const Context context = GatherContext(mpi, world);
  const bool is_main = world.rank() == 0;
  if (is_main) PrintContext(context);

  struct Kind {
    const char* name;
    RouterSpec::Kind kind;
    RouterSpec::Cell cell;
    RouterSpec::Recurrence recurrence;
  };
  const std::vector<Kind> kinds = {
      {"linear", RouterSpec::LINEAR, RouterSpec::GRU, RouterSpec::LAYER},
      {"gru-layer", RouterSpec::RECURRENT, RouterSpec::GRU, RouterSpec::LAYER},
      {"rnn-layer", RouterSpec::RECURRENT, RouterSpec::RNN, RouterSpec::LAYER},
      {"gru-token", RouterSpec::RECURRENT, RouterSpec::GRU, RouterSpec::TOKEN},
      {"rnn-token", RouterSpec::RECURRENT, RouterSpec::RNN, RouterSpec::TOKEN}};
  Table table({"seq len", "router", "router ms", "layer ms", "router share", "vs linear layer",
               "us/token", "us/step"});
  std::vector<JsonObject> rows;
  for (int64_t seq : seq_lens) {
    double linear_layer = 0;
    for (const Kind& k : kinds) {
      ModelSpec spec = LayerSpec(d, h, e, top_k);
      spec.mutable_router()->set_kind(k.kind);
      spec.mutable_router()->set_cell(k.cell);
      spec.mutable_router()->set_recurrence(k.recurrence);
      spec.mutable_router()->set_hidden_dim(router_hidden);
      torch::manual_seed(9);
      RecurrentCell cell = MakeSharedRouterCell(spec);
      MoELayer layer(spec, InitScales{0.02, 0.02}, cell, scan);
      Router& router = layer->router();
      auto x = torch::randn({tokens / seq, seq, d}).requires_grad_();
      auto grad_y = torch::randn({tokens / seq, seq, d});
      const bool layer_recurrent = !cell.is_empty();
      // The state an earlier MoE layer left (a leaf, so backward reaches it and stops).
      auto incoming = torch::randn({tokens, router_hidden}).requires_grad_();
      auto carry_in = [&] {
        RouterCarry carry;
        if (layer_recurrent) carry.layer_state = incoming;
        return carry;
      };
      const double router_s = MedianSeconds(repeats, [&] {
        RouterCarry carry = carry_in();
        auto logits = router.forward(x, carry, nullptr);
        logits.backward(torch::ones_like(logits));
      });
      const double layer_s = MedianSeconds(repeats, [&] {
        RouterCarry carry = carry_in();
        auto y = layer->forward(x, carry, nullptr).y;
        y.backward(grad_y);
      });
      if (k.kind == RouterSpec::LINEAR) linear_layer = layer_s;
      const bool scanned = k.kind == RouterSpec::RECURRENT && k.recurrence == RouterSpec::TOKEN;
      table.Add({absl::StrCat(seq), k.name, Ms(router_s), Ms(layer_s),
                 absl::StrFormat("%.1f%%", 100 * router_s / layer_s),
                 absl::StrFormat("%+.1f%%", 100 * (layer_s / linear_layer - 1)),
                 absl::StrFormat("%.2f", router_s / tokens * 1e6),
                 scanned ? absl::StrFormat("%.1f", router_s / seq * 1e6) : std::string("-")});
      rows.push_back(JsonObject()
                         .Add("seq_len", seq)
                         .Add("router", std::string(k.name))
                         .Add("router_seconds", router_s)
                         .Add("layer_seconds", layer_s)
                         .Add("router_share", router_s / layer_s)
                         .Add("layer_vs_linear", layer_s / linear_layer)
                         .Add("router_seconds_per_token", router_s / tokens));
    }
  }
  if (is_main) {
    absl::PrintF("router: forward+backward, %d tokens per call (batch = tokens / seq len), d_model "
                "%d, %d experts of hidden %d, top-%d, router state %d, token scan %s; medians "
                "of %d\n",
                tokens, d, e, h, top_k, router_hidden, scan_name, repeats);
    table.Print();
    std::printf("\n");
  }
  JsonObject result;
  result.Add("tokens", tokens).Add("d_model", d).Add("router_hidden", router_hidden)
      .Add("scan", scan_name)
      .AddRaw("router", JsonArray(rows));
  if (is_main) WriteJson(o.String("--json", ""), "router", context, result);
  return 0;
}

}  // namespace rmoe::bench
