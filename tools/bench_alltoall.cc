// rmoe_bench alltoall: what expert parallelism's token exchange costs, against the floor
// raw MPI gives for the same bytes, and what it does to one MoE layer's forward+backward.
#include <chrono>
#include <cstdio>
#include <functional>
#include <limits>

#include <absl/strings/str_format.h>
#include <torch/torch.h>

#include "distributed/expert_parallel.h"
#include "distributed/timed_communicator.h"
#include "rmoe/model/moe_layer.h"
#include "tools/bench_common.h"

namespace rmoe::bench {

const char kAllToAllUsage[] = R"(Usage: mpirun -np P rmoe_bench alltoall [options]

Part 1, the exchange. Every rank routes --tokens random tokens (d_model --d-model, fp32) to
--top-k distinct experts drawn uniformly from --experts, plans the dispatch with
PlanDispatch (dropless) and derives the per-rank splits exactly as
ExpertParallelDispatcher does (the EP group is the whole world: P ranks, E/P experts each).
Then it times these variants of one forward round trip, interleaved (the order rotating
every iteration), with a barrier before each timed call and each iteration's time taken
as the slowest rank's:
  raw-tokens    two MPI_Alltoallv (MPI_BYTE) of the token rows to the experts' ranks and
                back, into preallocated buffers, on MpiCommunicator::comm()
  raw           MPI_Alltoall of the per-expert counts + raw-tokens: the floor
  raw+alloc     raw, receiving into freshly allocated tensors (as the communicator does)
  raw+checks    raw with an MPI_Allgather of 6 int64 per rank before each MPI_Alltoallv
                (the communicator's argument agreement)
  communicator  MpiCommunicator::AllToAllCounts + two MpiCommunicator::AllToAll
  dispatcher    the communication of one ExpertParallelDispatcher::Dispatch forward:
                AllToAllCounts(tokens_per_expert), the host loop that turns counts into
                receive splits, AllToAllWithGrad of the N*k token rows to the experts'
                ranks and AllToAllWithGrad of the same rows back (an identity expert: the
                expert computation, the regrouping by local expert and the combine are
                not timed here; part 2 has them)
The round trip is checked to return every row unchanged. Reported: min, median and mean
time per round trip (on a shared machine the min is the cost without interference), and
from the median: tokens/s (tokens routed per second over all ranks), GB/s (bytes sent +
received per rank, both directions, including the rows a rank keeps for itself; remote =
excluding them); and every variant's ratio to raw, of medians and of minima.

Part 2, one MoE layer (linear router, SwiGLU experts of --hidden) forward + backward on
the same --tokens per rank: ExpertParallelDispatcher (this rank holds E/P experts; its EP
group is wrapped in a TimedCommunicator) vs LocalDispatcher (every rank holds all E
experts and runs its own tokens). Each iteration starts and ends with a barrier; reported
are the best (min) time and medians over iterations of: time (wall time from the first barrier to the end of the
second, slowest rank: with more ranks than cores, ranks that do not run at once still all
count), and, averaged over ranks, compute (the rank's own work outside the communicator),
comm (time inside the communicator, including waiting for other ranks) and idle (waiting
at the closing barrier for the slowest rank); tokens/s = P x tokens / time.

Options:
  --tokens N      tokens per rank (default 2048: configs/quickstart's 16 x 128)
  --d-model D     row width in fp32 elements (default 128)
  --experts E     experts, divisible by P (default 8)
  --top-k K       experts per token (default 2)
  --hidden H      expert hidden size for part 2 (default 256)
  --iters I       timed iterations (default 100 for part 1, a fifth of it for part 2)
  --warmup W      untimed iterations first (default 3)
  --layer on|off  run part 2 (default on)
  --seed S        routing and data seed (default 1)
  --threads T     intra-op threads per rank (default: cores / ranks on this node)
  --json PATH     also write the results as JSON
)";

namespace {


// recv_counts[s * L + e]: tokens rank s sends to local expert e here -> rows from each rank.
std::vector<int64_t> ReceiveSplits(const std::vector<int64_t>& recv_counts, int ranks,
                                   int64_t local_experts) {
  std::vector<int64_t> splits(ranks, 0);
  for (int s = 0; s < ranks; ++s) {
    for (int64_t e = 0; e < local_experts; ++e) splits[s] += recv_counts[s * local_experts + e];
  }
  return splits;
}

void CheckMpi(int rc, const char* what) {
  if (rc != MPI_SUCCESS) throw std::runtime_error(std::string(what) + " failed");
}

std::vector<int> ToBytes(const std::vector<int64_t>& rows, int64_t row_bytes) {
  std::vector<int> out;
  for (int64_t r : rows) {
    const int64_t bytes = r * row_bytes;
    if (bytes > std::numeric_limits<int>::max()) {
      // Not a UsageError: only the ranks with such a message see it, so the job must abort.
      throw std::runtime_error("a message of more than 2 GiB for one raw MPI_Alltoallv: lower "
                               "--tokens or --d-model");
    }
    out.push_back(static_cast<int>(bytes));
  }
  return out;
}

std::vector<int> Displacements(const std::vector<int>& counts) {
  std::vector<int> out(counts.size(), 0);
  for (size_t i = 1; i < counts.size(); ++i) out[i] = out[i - 1] + counts[i - 1];
  return out;
}

}  // namespace

int RunAllToAll(const std::vector<std::string>& args, distributed::MpiRuntime& mpi) {
  const Options o(args, {"--tokens", "--d-model", "--experts", "--top-k", "--hidden", "--iters",
                         "--warmup", "--layer", "--seed"});
  const int64_t tokens = o.Int("--tokens", 2048), d_model = o.Int("--d-model", 128);
  const int64_t experts = o.Int("--experts", 8), top_k = o.Int("--top-k", 2);
  const int64_t hidden = o.Int("--hidden", 256);
  const int iters = static_cast<int>(o.Int("--iters", 100));
  const int warmup = static_cast<int>(o.Int("--warmup", 3, 0));
  const int64_t seed = o.Int("--seed", 1, 0);
  const std::string layer_flag = o.String("--layer", "on");
  if (layer_flag != "on" && layer_flag != "off") throw UsageError("--layer takes on or off");
  auto& world = mpi.World();
  const int ranks = world.size(), rank = world.rank();
  if (experts % ranks != 0) {
    throw UsageError(absl::StrFormat("--experts %d cannot be split over %d ranks", experts, ranks));
  }
  if (top_k > experts) throw UsageError("--top-k must be at most --experts");
  const int64_t local_experts = experts / ranks;
  SetThreads(static_cast<int>(o.Int("--threads", 0)), mpi.LocalSize());
  const Context context = GatherContext(mpi, world);
  const bool is_main = rank == 0;
  if (is_main) {
    PrintContext(context);
    std::printf("alltoall: %d ranks (EP group = world, %lld experts each), %lld tokens/rank, "
                "d_model %lld fp32, %lld experts top-%lld (uniform random), %d iterations "
                "after %d warm-up\n\n",
                ranks, static_cast<long long>(local_experts), static_cast<long long>(tokens),
                static_cast<long long>(d_model), static_cast<long long>(experts),
                static_cast<long long>(top_k), iters, warmup);
  }

  // ---- The splits the dispatcher would produce for this rank's tokens.
  torch::manual_seed(seed * 1000 + rank);
  auto expert_index = std::get<1>(torch::rand({tokens, experts}).topk(top_k, -1));
  const RoutingDecision decision{expert_index, torch::full({tokens, top_k}, 1.0 / top_k)};
  const DispatchPlan plan = PlanDispatch(decision, experts, /*capacity=*/0);
  std::vector<int64_t> send_splits(ranks, 0);
  for (int64_t e = 0; e < experts; ++e) send_splits[e / local_experts] += plan.tokens_per_expert[e];
  const std::vector<int64_t> recv_splits =
      ReceiveSplits(world.AllToAllCounts(plan.tokens_per_expert), ranks, local_experts);
  const auto send = torch::randn({tokens, d_model}).index_select(0, plan.token).contiguous();
  const int64_t sent_rows = send.size(0);
  int64_t received_rows = 0;
  for (int64_t r : recv_splits) received_rows += r;

  // ---- The variants, each one forward round trip.
  MPI_Comm comm = world.comm();
  const int64_t row_bytes = d_model * static_cast<int64_t>(sizeof(float));
  const auto send_bytes = ToBytes(send_splits, row_bytes), recv_bytes = ToBytes(recv_splits, row_bytes);
  const auto send_displs = Displacements(send_bytes), recv_displs = Displacements(recv_bytes);
  auto raw_received = torch::empty({received_rows, d_model});
  auto raw_returned = torch::empty({sent_rows, d_model});
  std::vector<int64_t> raw_counts(experts);
  auto raw_tokens = [&] {
    CheckMpi(MPI_Alltoallv(send.data_ptr(), send_bytes.data(), send_displs.data(), MPI_BYTE,
                           raw_received.data_ptr(), recv_bytes.data(), recv_displs.data(),
                           MPI_BYTE, comm),
             "MPI_Alltoallv");
    CheckMpi(MPI_Alltoallv(raw_received.data_ptr(), recv_bytes.data(), recv_displs.data(), MPI_BYTE,
                           raw_returned.data_ptr(), send_bytes.data(), send_displs.data(),
                           MPI_BYTE, comm),
             "MPI_Alltoallv");
  };
  auto raw = [&] {
    CheckMpi(MPI_Alltoall(plan.tokens_per_expert.data(), static_cast<int>(local_experts),
                          MPI_INT64_T, raw_counts.data(), static_cast<int>(local_experts),
                          MPI_INT64_T, comm),
             "MPI_Alltoall");
    raw_tokens();
  };
  // The communicator's two extras over raw MPI, one at a time: a fresh output tensor per
  // call, and the MPI_Allgather of argument checks before each MPI_Alltoallv.
  torch::Tensor returned;
  auto raw_alloc = [&] {
    CheckMpi(MPI_Alltoall(plan.tokens_per_expert.data(), static_cast<int>(local_experts),
                          MPI_INT64_T, raw_counts.data(), static_cast<int>(local_experts),
                          MPI_INT64_T, comm),
             "MPI_Alltoall");
    auto received = torch::empty({received_rows, d_model});
    CheckMpi(MPI_Alltoallv(send.data_ptr(), send_bytes.data(), send_displs.data(), MPI_BYTE,
                           received.data_ptr(), recv_bytes.data(), recv_displs.data(), MPI_BYTE,
                           comm),
             "MPI_Alltoallv");
    returned = torch::empty({sent_rows, d_model});
    CheckMpi(MPI_Alltoallv(received.data_ptr(), recv_bytes.data(), recv_displs.data(), MPI_BYTE,
                           returned.data_ptr(), send_bytes.data(), send_displs.data(), MPI_BYTE,
                           comm),
             "MPI_Alltoallv");
  };
  constexpr int kCheckFields = 6;  // the size of MpiCommunicator's argument record
  std::vector<int64_t> check_out(kCheckFields, 0), check_in(kCheckFields * ranks);
  auto check = [&] {
    CheckMpi(MPI_Allgather(check_out.data(), kCheckFields, MPI_INT64_T, check_in.data(),
                           kCheckFields, MPI_INT64_T, comm),
             "MPI_Allgather");
  };
  auto raw_checks = [&] {
    CheckMpi(MPI_Alltoall(plan.tokens_per_expert.data(), static_cast<int>(local_experts),
                          MPI_INT64_T, raw_counts.data(), static_cast<int>(local_experts),
                          MPI_INT64_T, comm),
             "MPI_Alltoall");
    check();
    CheckMpi(MPI_Alltoallv(send.data_ptr(), send_bytes.data(), send_displs.data(), MPI_BYTE,
                           raw_received.data_ptr(), recv_bytes.data(), recv_displs.data(),
                           MPI_BYTE, comm),
             "MPI_Alltoallv");
    check();
    CheckMpi(MPI_Alltoallv(raw_received.data_ptr(), recv_bytes.data(), recv_displs.data(), MPI_BYTE,
                           raw_returned.data_ptr(), send_bytes.data(), send_displs.data(),
                           MPI_BYTE, comm),
             "MPI_Alltoallv");
  };
  auto communicator = [&] {
    const auto splits = ReceiveSplits(world.AllToAllCounts(plan.tokens_per_expert), ranks,
                                      local_experts);
    auto received = world.AllToAll(send, send_splits, splits);
    returned = world.AllToAll(received, splits, send_splits);
  };
  auto dispatcher = [&] {
    const auto splits = ReceiveSplits(world.AllToAllCounts(plan.tokens_per_expert), ranks,
                                      local_experts);
    auto received = distributed::AllToAllWithGrad(world, send, send_splits, splits);
    returned = distributed::AllToAllWithGrad(world, received, splits, send_splits);
  };
  struct Variant {
    const char* name;
    std::function<void()> run;
    std::vector<double> seconds;
  };
  std::vector<Variant> variants = {{"raw-tokens", raw_tokens, {}},   {"raw", raw, {}},
                                   {"raw+alloc", raw_alloc, {}},     {"raw+checks", raw_checks, {}},
                                   {"communicator", communicator, {}}, {"dispatcher", dispatcher, {}}};
  dispatcher();
  raw();
  TORCH_CHECK(torch::equal(returned, send) && torch::equal(raw_returned, send),
              "the all-to-all round trip did not return the rows it sent");
  const size_t count = variants.size();
  for (int it = 0; it < warmup + iters; ++it) {
    // The order rotates every iteration, so that no variant always follows the same one.
    for (size_t j = 0; j < count; ++j) {
      auto& v = variants[(j + it) % count];
      CheckMpi(MPI_Barrier(comm), "MPI_Barrier");
      const auto start = Clock::now();
      v.run();
      const double seconds = SecondsSince(start);
      if (it >= warmup) v.seconds.push_back(seconds);
    }
  }

  // Bytes per rank, both directions: send N*k rows and receive R rows, then the reverse.
  const double bytes = 2.0 * (sent_rows + received_rows) * row_bytes;
  const double remote_bytes =
      2.0 * (sent_rows - send_splits[rank] + received_rows - recv_splits[rank]) * row_bytes;
  const auto totals = SumOverRanks(world, {bytes, remote_bytes});
  const double mean_bytes = totals[0] / ranks, mean_remote = totals[1] / ranks;

  Table table({"variant", "min ms", "median ms", "mean ms", "tokens/s", "GB/s", "remote GB/s",
               "x raw", "x raw (min)"});
  std::vector<JsonObject> rows;
  double raw_median = 0, raw_min = 0, dispatcher_median = 0, dispatcher_min = 0;
  for (auto& v : variants) {
    v.seconds = MaxOverRanks(world, v.seconds);
    if (std::string(v.name) == "raw") raw_median = Median(v.seconds), raw_min = Min(v.seconds);
    if (std::string(v.name) == "dispatcher") {
      dispatcher_median = Median(v.seconds);
      dispatcher_min = Min(v.seconds);
    }
  }
  for (const auto& v : variants) {
    const double median = Median(v.seconds), mean = Mean(v.seconds), min = Min(v.seconds);
    const double tokens_per_s = tokens * ranks / median;
    table.Add({v.name, absl::StrFormat("%.3f", min * 1e3), absl::StrFormat("%.3f", median * 1e3),
               absl::StrFormat("%.3f", mean * 1e3), Human(tokens_per_s),
               absl::StrFormat("%.2f", mean_bytes / median / 1e9),
               absl::StrFormat("%.2f", mean_remote / median / 1e9),
               absl::StrFormat("%.2f", median / raw_median), absl::StrFormat("%.2f", min / raw_min)});
    rows.push_back(JsonObject()
                       .Add("variant", std::string(v.name))
                       .Add("min_s", min)
                       .Add("median_s", median)
                       .Add("mean_s", mean)
                       .Add("tokens_per_s", tokens_per_s)
                       .Add("gb_per_s", mean_bytes / median / 1e9)
                       .Add("remote_gb_per_s", mean_remote / median / 1e9)
                       .Add("ratio_to_raw", median / raw_median)
                       .Add("min_ratio_to_raw", min / raw_min)
                       .Add("seconds", v.seconds));
  }
  if (is_main) {
    std::printf("exchange: one dispatch round trip (%.2f MB sent+received per rank, %.0f%% of it "
                "to/from other ranks); tokens/s and GB/s from the median\n",
                mean_bytes / 1e6, 100.0 * mean_remote / mean_bytes);
    table.Print();
    std::printf("dispatcher / raw = %.2f (median), %.2f (min)\n\n", dispatcher_median / raw_median,
                dispatcher_min / raw_min);
  }
  JsonObject result;
  result.Add("tokens_per_rank", tokens)
      .Add("d_model", d_model)
      .Add("experts", experts)
      .Add("top_k", top_k)
      .Add("iters", static_cast<int64_t>(iters))
      .Add("warmup", static_cast<int64_t>(warmup))
      .Add("bytes_per_rank", mean_bytes)
      .Add("remote_bytes_per_rank", mean_remote)
      .Add("dispatcher_over_raw", dispatcher_median / raw_median)
      .Add("dispatcher_over_raw_min", dispatcher_min / raw_min)
      .AddRaw("exchange", JsonArray(rows));

  if (layer_flag == "on") {
    ModelSpec model;
    model.set_d_model(static_cast<int>(d_model));
    model.set_num_layers(1);
    model.mutable_moe()->set_num_experts(static_cast<int>(experts));
    model.mutable_moe()->set_top_k(static_cast<int>(top_k));
    model.mutable_moe()->set_expert_hidden_dim(static_cast<int>(hidden));
    model.mutable_router()->set_kind(RouterSpec::LINEAR);
    const auto init = InitScales::FromSpec(model);
    // Same seed: the two layers have the same router and experts, so they route alike.
    torch::manual_seed(seed);
    MoELayer local_layer(model, init, RecurrentCell{nullptr});
    torch::manual_seed(seed);
    MoELayer ep_layer(model, init, RecurrentCell{nullptr});
    auto timer = std::make_shared<distributed::TimedCommunicator>(
        std::shared_ptr<distributed::Communicator>(&world, [](distributed::Communicator*) {}));
    ep_layer->experts()->KeepExperts(rank * local_experts, local_experts);
    ep_layer->set_dispatcher(std::make_shared<distributed::ExpertParallelDispatcher>(timer, experts));
    torch::manual_seed(seed * 1000 + 500 + rank);
    const auto input = torch::randn({1, tokens, d_model});
    const auto probe = torch::randn({1, tokens, d_model});

    struct LayerVariant {
      const char* name;
      MoELayer* layer;
      std::vector<double> wall, comm, compute, idle;
    };
    std::vector<LayerVariant> layers = {{"local (all experts)", &local_layer, {}, {}, {}, {}},
                                        {"expert-parallel", &ep_layer, {}, {}, {}, {}}};
    const int layer_iters = std::max(3, iters / 5);
    for (int it = 0; it < warmup + layer_iters; ++it) {
      for (size_t j = 0; j < layers.size(); ++j) {
        auto& v = layers[(j + it) % layers.size()];
        (*v.layer)->zero_grad();
        auto x = input.clone().requires_grad_(true);
        CheckMpi(MPI_Barrier(comm), "MPI_Barrier");
        timer->TakeSeconds();
        const auto start = Clock::now();
        RouterCarry carry;
        auto out = (*v.layer)->forward(x, carry, nullptr);
        ((out.y * probe).sum() + 0.01 * out.load_balance).backward();
        const double own = SecondsSince(start);
        const double comm_seconds = timer->TakeSeconds();
        // The closing barrier makes the wall time cover every rank's work even when ranks
        // do not run at the same time (more ranks than cores).
        CheckMpi(MPI_Barrier(comm), "MPI_Barrier");
        const double wall = SecondsSince(start);
        if (it >= warmup) {
          v.wall.push_back(wall);
          v.comm.push_back(comm_seconds);
          v.compute.push_back(own - comm_seconds);
          v.idle.push_back(wall - own);
        }
      }
    }
    Table layer_table({"dispatcher", "best ms", "time ms", "tokens/s", "compute ms", "comm ms",
                       "idle ms", "comm %"});
    std::vector<JsonObject> layer_rows;
    for (auto& v : layers) {
      // Per iteration: the slowest rank's wall time, the mean over ranks of the parts; then
      // the median over iterations.
      const auto wall = MaxOverRanks(world, v.wall);
      const auto mean_comm = MeanOverRanks(world, v.comm);
      const auto mean_compute = MeanOverRanks(world, v.compute);
      const auto mean_idle = MeanOverRanks(world, v.idle);
      const double wall_s = Median(wall), comm_s = Median(mean_comm);
      const double compute_s = Median(mean_compute), idle_s = Median(mean_idle);
      const double tokens_per_s = tokens * ranks / wall_s;
      layer_table.Add({v.name, absl::StrFormat("%.2f", Min(wall) * 1e3),
                       absl::StrFormat("%.2f", wall_s * 1e3), Human(tokens_per_s),
                       absl::StrFormat("%.2f", compute_s * 1e3), absl::StrFormat("%.2f", comm_s * 1e3),
                       absl::StrFormat("%.2f", idle_s * 1e3),
                       absl::StrFormat("%.0f%%", 100 * comm_s / wall_s)});
      layer_rows.push_back(JsonObject()
                               .Add("dispatcher", std::string(v.name))
                               .Add("median_s", wall_s)
                               .Add("best_s", Min(wall))
                               .Add("tokens_per_s", tokens_per_s)
                               .Add("compute_s", compute_s)
                               .Add("comm_s", comm_s)
                               .Add("idle_s", idle_s)
                               .Add("wall_seconds", wall)
                               .Add("rank_mean_comm_seconds", mean_comm)
                               .Add("rank_mean_compute_seconds", mean_compute));
    }
    if (is_main) {
      std::printf("one MoE layer, forward + backward: linear router, %lld experts of hidden %lld, "
                  "top-%lld, %lld tokens/rank, %d iterations\n",
                  static_cast<long long>(experts), static_cast<long long>(hidden),
                  static_cast<long long>(top_k), static_cast<long long>(tokens), layer_iters);
      layer_table.Print();
      std::printf("\n");
    }
    result.Add("hidden", hidden).AddRaw("moe_layer", JsonArray(layer_rows));
  }
  if (is_main) WriteJson(o.String("--json", ""), "alltoall", context, result);
  return 0;
}

}  // namespace rmoe::bench
