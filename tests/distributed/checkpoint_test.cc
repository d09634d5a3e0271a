// Sharded checkpoints (distributed/checkpoint.h) and the rmoe_ckpt tool, under mpirun with 1,
// 2 and 4 ranks: round trips of every dtype, expert tensors saved on one layout and loaded on
// another, the commit protocol (coverage, a failing rank, uncommitted directories, keep_last),
// corruption of shards and manifests, and the tool's inspect / verify / export.
#include "distributed/checkpoint.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <torch/torch.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "rmoe/util/crc32c.h"
#include "rmoe/util/ownership.h"
#include "tests/distributed/mpi_test_env.h"

namespace rmoe::distributed {
namespace {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------
// CRC-32C

TEST(Crc32cTest, KnownValues) {
  EXPECT_EQ(Crc32c("123456789"), 0xE3069283u);
  EXPECT_EQ(Crc32cExtendPortable(0, "123456789", 9), 0xE3069283u);
  EXPECT_EQ(Crc32c(""), 0u);
  // RFC 3720 (iSCSI), appendix B.4.
  std::string zeros(32, '\0'), ones(32, '\xff'), up(32, '\0'), down(32, '\0');
  for (int i = 0; i < 32; ++i) {
    up[i] = static_cast<char>(i);
    down[i] = static_cast<char>(31 - i);
  }
  EXPECT_EQ(Crc32c(zeros), 0x8A9136AAu);
  EXPECT_EQ(Crc32c(ones), 0x62A8AB43u);
  EXPECT_EQ(Crc32c(up), 0x46DD794Eu);
  EXPECT_EQ(Crc32c(down), 0x113FDB5Cu);
  for (const auto& s : {zeros, ones, up, down}) {
    EXPECT_EQ(Crc32cExtendPortable(0, s.data(), s.size()), Crc32c(s));
  }
}

TEST(Crc32cTest, PortableAndAcceleratedAgreeAtEveryLengthAndAlignment) {
  std::mt19937 rng(7);
  std::vector<unsigned char> data(4096 + 16);
  for (auto& b : data) b = static_cast<unsigned char>(rng());
  for (size_t start = 0; start < 9; ++start) {
    for (size_t n : {0, 1, 3, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1000, 4096}) {
      const uint32_t fast = Crc32c(data.data() + start, n);
      ASSERT_EQ(fast, Crc32cExtendPortable(0, data.data() + start, n)) << start << " " << n;
      // Streaming in two parts gives the one-shot value.
      const size_t half = n / 3;
      EXPECT_EQ(
          Crc32cExtend(Crc32c(data.data() + start, half), data.data() + start + half, n - half),
          fast);
    }
  }
  std::printf("[ info     ] CRC-32C uses %s\n",
              Crc32cIsHardwareAccelerated() ? "the SSE4.2 instruction" : "slicing-by-8 tables");
}

// ---------------------------------------------------------------------------------------------
// helpers

Communicator& World() { return MpiRuntime::Get().World(); }

std::string BroadcastString(Communicator& world, std::string s) {
  torch::Tensor length = torch::tensor({static_cast<int64_t>(s.size())}, torch::kLong);
  world.Broadcast(length, 0);
  s.resize(static_cast<size_t>(length.item<int64_t>()));
  torch::Tensor bytes =
      torch::from_blob(s.data(), {static_cast<int64_t>(s.size())}, torch::kUInt8).clone();
  world.Broadcast(bytes, 0);
  std::memcpy(s.data(), bytes.data_ptr(), s.size());
  return s;
}

// Deterministic contents of tensor `name` (the same on every rank, and at save and load).
torch::Tensor Pattern(const std::string& name, std::vector<int64_t> shape,
                      torch::ScalarType dtype) {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  const double seed = static_cast<double>(std::hash<std::string>()(name) % 97);
  torch::Tensor i = torch::arange(numel, torch::kDouble);
  torch::Tensor t;
  switch (dtype) {
    case torch::kLong:
      t = (torch::arange(numel, torch::kLong) * 1000000007 +
           (int64_t{1} << 40) * static_cast<int64_t>(seed)) -
          5;
      break;
    case torch::kInt:
      t = (i * 7 - 100 + seed).to(torch::kInt);
      break;
    case torch::kBool:
      t = torch::fmod(i + seed, 3) == 0;
      break;
    case torch::kUInt8:
      t = torch::fmod(i * 13 + seed, 256).to(torch::kUInt8);
      break;
    case torch::kBFloat16:
    case torch::kHalf:
      t = (torch::fmod(i + seed, 64) * 0.25 - 3).to(dtype);
      break;
    default:
      t = (i * 0.37 + seed - 11.5).sin().to(dtype) * 100;
      break;
  }
  return t.reshape(shape);
}

// Rows [begin, end) of a pattern tensor (dim 0), contiguous.
torch::Tensor Rows(const torch::Tensor& full, int64_t begin, int64_t end) {
  return full.slice(0, begin, end).contiguous();
}

ShardedTensor Held(const std::string& name, std::vector<int64_t> global, torch::ScalarType dtype,
                   int64_t begin, int64_t end, bool write) {
  ShardedTensor t;
  t.name = name;
  t.global_shape = global;
  t.row_start = global.empty() ? 0 : begin;
  t.local = global.empty() ? Pattern(name, global, dtype)
                           : Rows(Pattern(name, global, dtype), begin, end);
  t.write = write;
  return t;
}

// An empty tensor to load rows [begin, end) of `name` into.
ShardedTensor Slot(const std::string& name, std::vector<int64_t> global, torch::ScalarType dtype,
                   int64_t begin, int64_t end) {
  ShardedTensor t;
  t.name = name;
  t.global_shape = global;
  t.row_start = global.empty() ? 0 : begin;
  std::vector<int64_t> local = global;
  if (!local.empty()) local[0] = end - begin;
  t.local = torch::zeros(local, dtype);
  return t;
}

void ExpectHolds(const ShardedTensor& t, torch::ScalarType dtype) {
  const torch::Tensor full = Pattern(t.name, t.global_shape, dtype);
  const torch::Tensor want =
      t.global_shape.empty() ? full : Rows(full, t.row_start, t.row_start + t.local.size(0));
  EXPECT_TRUE(torch::equal(t.local, want)) << t.name << " rows from " << t.row_start;
}

CheckpointState State(int64_t step, const std::string& job_name = "ckpt-test") {
  CheckpointState state;
  state.job.set_name(job_name);
  state.job.mutable_model()->set_d_model(64);
  state.step = step;
  state.consumed_samples = step * 32;
  state.expert_parallel_size = 1;
  return state;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
}

void FlipByte(const std::string& path, int64_t offset) {
  std::fstream f(path, std::ios::binary | std::ios::in | std::ios::out);
  f.seekg(offset);
  char c = 0;
  f.read(&c, 1);
  c = static_cast<char>(c ^ 0x5A);
  f.seekp(offset);
  f.write(&c, 1);
}

// The manifest frame, written independently of checkpoint.cc (docs/checkpoints.md).
std::string Frame(uint32_t version, const std::string& payload) {
  std::string out = "RMOECKPT";
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((version >> (8 * i)) & 0xFF));
  const uint64_t n = payload.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xFF));
  out += payload;
  const uint32_t crc = Crc32c(payload);
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((crc >> (8 * i)) & 0xFF));
  return out;
}

// Every rank gets the same directory, fresh for each test.
class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string dir;
    if (world().rank() == 0) {
      std::string tmpl = (fs::temp_directory_path() / "rmoe_ckpt_test_XXXXXX").string();
      ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
      dir = tmpl;
    }
    root_ = BroadcastString(world(), dir) + "/ckpts";
  }
  void TearDown() override {
    world().Barrier();
    if (world().rank() == 0) fs::remove_all(fs::path(root_).parent_path());
  }

  Communicator& world() { return World(); }
  int rank() { return world().rank(); }
  int size() { return world().size(); }

  std::string root_;
};

// The mixed set of tensors most tests save: every dtype, a 0-d tensor, empty tensors, and
// replicated tensors written by different ranks (so every shard file holds something).
struct Spec {
  std::string name;
  std::vector<int64_t> shape;
  torch::ScalarType dtype;
};
const std::vector<Spec>& MixedSpecs() {
  static const std::vector<Spec> specs = {
      {"model/embed.weight", {10, 7}, torch::kFloat},
      {"model/layers.0.attn.qkv", {3, 2, 2}, torch::kDouble},
      {"model/layers.0.norm.bf16", {5, 4}, torch::kBFloat16},
      {"model/half", {2, 3}, torch::kHalf},
      {"model/mask", {9}, torch::kBool},
      {"model/bytes", {4, 4}, torch::kUInt8},
      {"model/ints", {6}, torch::kInt},
      {"model/empty_rows", {0, 3}, torch::kFloat},
      {"model/zero_width", {4, 0}, torch::kFloat},
      {"optimizer/embed.weight/step", {}, torch::kLong},
      {"optimizer/embed.weight/exp_avg", {10, 7}, torch::kFloat},
      {"optimizer/counts", {6}, torch::kLong},
  };
  return specs;
}

std::vector<ShardedTensor> MixedTensors(int rank, int size) {
  std::vector<ShardedTensor> out;
  int i = 0;
  for (const auto& s : MixedSpecs()) {
    const int64_t rows = s.shape.empty() ? 1 : s.shape[0];
    out.push_back(Held(s.name, s.shape, s.dtype, 0, rows, /*write=*/(i++ % size) == rank));
  }
  return out;
}

std::vector<ShardedTensor> MixedSlots() {
  std::vector<ShardedTensor> out;
  for (const auto& s : MixedSpecs()) {
    out.push_back(Slot(s.name, s.shape, s.dtype, 0, s.shape.empty() ? 1 : s.shape[0]));
  }
  return out;
}

void ExpectMixed(const std::vector<ShardedTensor>& slots) {
  for (size_t i = 0; i < slots.size(); ++i) ExpectHolds(slots[i], MixedSpecs()[i].dtype);
}

// ---------------------------------------------------------------------------------------------
// round trips

TEST_F(CheckpointTest, RoundTripOfEveryDtype) {
  torch::manual_seed(1000 + rank());
  (void)torch::rand({3});
  const torch::Tensor rng = at::detail::getDefaultCPUGenerator().get_state();
  CheckpointState state = State(7, "roundtrip");
  state.expert_parallel_size = size();
  state.scalars = {{"best_val_loss", 1.5}, {"tokens", 1e9}};
  auto dir = SaveCheckpoint(root_, state, MixedTensors(rank(), size()), world(), 3);
  ASSERT_TRUE(dir.ok()) << dir.status();
  EXPECT_EQ(*dir, root_ + "/step_00000007");
  EXPECT_TRUE(fs::exists(*dir + "/COMMITTED"));
  EXPECT_EQ(ReadFile(root_ + "/latest"), "step_00000007\n");
  EXPECT_EQ(ListCheckpoints(root_), std::vector<std::string>{*dir});
  auto resolved = ResolveCheckpoint(root_);
  ASSERT_TRUE(resolved.ok()) << resolved.status();
  EXPECT_EQ(*resolved, *dir);

  auto manifest = ReadManifest(*dir);
  ASSERT_TRUE(manifest.ok()) << manifest.status();
  EXPECT_EQ(manifest->format_version(), kCheckpointFormatVersion);
  EXPECT_EQ(manifest->job().name(), "roundtrip");
  EXPECT_EQ(manifest->job().model().d_model(), 64);
  EXPECT_EQ(manifest->step(), 7);
  EXPECT_EQ(manifest->consumed_samples(), 7 * 32);
  EXPECT_EQ(manifest->world_size(), size());
  EXPECT_EQ(manifest->expert_parallel_size(), size());
  EXPECT_EQ(manifest->scalars().at("best_val_loss"), 1.5);
  EXPECT_EQ(manifest->scalars().at("tokens"), 1e9);
  ASSERT_EQ(manifest->tensors_size(), static_cast<int>(MixedSpecs().size()));
  for (int i = 0; i < manifest->tensors_size(); ++i) {
    const auto& t = manifest->tensors(i);
    const auto& s = MixedSpecs()[i];
    EXPECT_EQ(t.name(), s.name);
    EXPECT_EQ(std::vector<int64_t>(t.shape().begin(), t.shape().end()), s.shape);
    const int64_t rows = s.shape.empty() ? 1 : s.shape[0];
    EXPECT_EQ(t.pieces_size(), rows == 0 ? 0 : 1) << s.name;
    if (t.pieces_size() == 1) {
      char file[32];
      std::snprintf(file, sizeof(file), "shard_%05d.bin", i % size());
      EXPECT_EQ(t.pieces(0).file(), file) << s.name;
    }
  }
  EXPECT_EQ(manifest->tensors(0).dtype(), "float32");
  EXPECT_EQ(manifest->tensors(1).dtype(), "float64");
  EXPECT_EQ(manifest->tensors(2).dtype(), "bfloat16");
  EXPECT_EQ(manifest->tensors(9).dtype(), "int64");
  // Every rank's generator state, by rank.
  ASSERT_EQ(manifest->rng_states_size(), size());
  const std::string& mine = manifest->rng_states(rank());
  ASSERT_EQ(static_cast<int64_t>(mine.size()), rng.numel());
  EXPECT_EQ(std::memcmp(mine.data(), rng.data_ptr(), mine.size()), 0);
  // A device generator's state per rank too: none for tensors on the CPU.
  ASSERT_EQ(manifest->device_rng_states_size(), size());
  EXPECT_TRUE(manifest->device_rng_states(rank()).empty());

  auto slots = MixedSlots();
  ASSERT_TRUE(LoadTensors(*dir, *manifest, slots).ok());
  ExpectMixed(slots);
  EXPECT_TRUE(VerifyCheckpoint(*dir).ok());
}

// An expert tensor [8, 3, 5]: split over expert-parallel ranks with data-parallel replicas
// (one replica writes), and a second one split over every rank; loaded back on every other
// layout: 1, 2, 4 and 8 parts, and uneven ranges.
TEST_F(CheckpointTest, ExpertsSavedOnOneLayoutLoadOnAnother) {
  const int ep = size() == 4 ? 2 : size();
  const int ep_rank = rank() % ep, dp_rank = rank() / ep;
  const std::vector<int64_t> shape = {8, 3, 5};
  std::vector<ShardedTensor> tensors;
  const int64_t per_ep = 8 / ep, per_rank = 8 / size();
  tensors.push_back(Held("model/experts.w1", shape, torch::kFloat, ep_rank * per_ep,
                         (ep_rank + 1) * per_ep, dp_rank == 0));
  tensors.push_back(Held("optimizer/experts.w1/exp_avg", shape, torch::kBFloat16, ep_rank * per_ep,
                         (ep_rank + 1) * per_ep, dp_rank == 0));
  tensors.push_back(Held("model/experts.w2", shape, torch::kDouble, rank() * per_rank,
                         (rank() + 1) * per_rank, true));
  tensors.push_back(Held("model/router.bias", {8}, torch::kLong, rank() * per_rank,
                         (rank() + 1) * per_rank, true));
  CheckpointState state = State(40);
  state.expert_parallel_size = ep;
  auto dir = SaveCheckpoint(root_, state, tensors, world(), 1);
  ASSERT_TRUE(dir.ok()) << dir.status();
  auto manifest = ReadManifest(*dir);
  ASSERT_TRUE(manifest.ok()) << manifest.status();
  EXPECT_EQ(manifest->world_size(), size());
  EXPECT_EQ(manifest->expert_parallel_size(), ep);
  EXPECT_EQ(manifest->tensors(0).pieces_size(), ep);
  EXPECT_EQ(manifest->tensors(2).pieces_size(), size());

  const std::vector<std::pair<int64_t, int64_t>> ranges = {{0, 8}, {0, 4}, {4, 8}, {0, 2},
                                                           {2, 4}, {4, 6}, {6, 8}, {3, 4},
                                                           {1, 6}, {5, 5}, {7, 8}, {1, 8}};
  for (auto [begin, end] : ranges) {
    std::vector<ShardedTensor> slots = {
        Slot("model/experts.w1", shape, torch::kFloat, begin, end),
        Slot("optimizer/experts.w1/exp_avg", shape, torch::kBFloat16, begin, end),
        Slot("model/experts.w2", shape, torch::kDouble, begin, end),
        Slot("model/router.bias", {8}, torch::kLong, begin, end)};
    ASSERT_TRUE(LoadTensors(*dir, *manifest, slots).ok()) << begin << ".." << end;
    ExpectHolds(slots[0], torch::kFloat);
    ExpectHolds(slots[1], torch::kBFloat16);
    ExpectHolds(slots[2], torch::kDouble);
    ExpectHolds(slots[3], torch::kLong);
  }
}

// Saved by one mpirun, loaded by another with a different number of ranks (CTest runs
// ckpt.handoff_save_np4, then ckpt.handoff_load_np2 and _np1; without the variable: skipped).
const std::vector<int64_t> kHandoffShape = {8, 6, 4};

TEST(CheckpointHandoff, Save) {
  const char* root = std::getenv("RMOE_CKPT_HANDOFF_DIR");
  if (root == nullptr) GTEST_SKIP() << "RMOE_CKPT_HANDOFF_DIR is not set";
  Communicator& world = World();
  if (world.rank() == 0) fs::remove_all(root);
  world.Barrier();
  const int64_t per = 8 / world.size();
  std::vector<ShardedTensor> tensors = {
      Held("model/experts.w1", kHandoffShape, torch::kFloat, world.rank() * per,
           (world.rank() + 1) * per, true),
      Held("model/embed", {5, 3}, torch::kBFloat16, 0, 5, world.rank() == world.size() - 1),
      Held("optimizer/experts.w1/exp_avg", kHandoffShape, torch::kFloat, world.rank() * per,
           (world.rank() + 1) * per, true)};
  CheckpointState state = State(12, "handoff");
  state.expert_parallel_size = world.size();
  auto dir = SaveCheckpoint(root, state, tensors, world, 2);
  ASSERT_TRUE(dir.ok()) << dir.status();
}

TEST(CheckpointHandoff, Load) {
  const char* root = std::getenv("RMOE_CKPT_HANDOFF_DIR");
  if (root == nullptr) GTEST_SKIP() << "RMOE_CKPT_HANDOFF_DIR is not set";
  Communicator& world = World();
  auto dir = ResolveCheckpoint(root);
  ASSERT_TRUE(dir.ok()) << dir.status();
  auto manifest = ReadManifest(*dir);
  ASSERT_TRUE(manifest.ok()) << manifest.status();
  EXPECT_EQ(manifest->job().name(), "handoff");
  EXPECT_NE(manifest->world_size(), world.size()) << "the handoff is meant to change the layout";
  const int64_t per = 8 / world.size();
  std::vector<ShardedTensor> slots = {
      Slot("model/experts.w1", kHandoffShape, torch::kFloat, world.rank() * per,
           (world.rank() + 1) * per),
      Slot("model/embed", {5, 3}, torch::kBFloat16, 0, 5),
      Slot("optimizer/experts.w1/exp_avg", kHandoffShape, torch::kFloat, world.rank() * per,
           (world.rank() + 1) * per)};
  ASSERT_TRUE(LoadTensors(*dir, *manifest, slots).ok());
  ExpectHolds(slots[0], torch::kFloat);
  ExpectHolds(slots[1], torch::kBFloat16);
  ExpectHolds(slots[2], torch::kFloat);
  std::printf("[ info     ] rank %d loaded rows [%ld, %ld) of a checkpoint saved by %d ranks\n",
              world.rank(), static_cast<long>(world.rank() * per),
              static_cast<long>((world.rank() + 1) * per), manifest->world_size());
}

// ---------------------------------------------------------------------------------------------
// the commit protocol

void ExpectNothingCommitted(const std::string& root, int64_t step) {
  char name[32];
  std::snprintf(name, sizeof(name), "/step_%08ld", static_cast<long>(step));
  EXPECT_FALSE(fs::exists(root + name + "/COMMITTED"));
  for (const auto& d : ListCheckpoints(root)) EXPECT_EQ(d.find(name), std::string::npos) << d;
}

TEST_F(CheckpointTest, RowsWrittenByNoRankAreRefused) {
  std::vector<ShardedTensor> tensors = MixedTensors(rank(), size());
  tensors.push_back(Held("model/orphan", {6, 2}, torch::kFloat, 0, 6, /*write=*/false));
  // Rows [4, 8) of a split tensor nobody writes.
  const int64_t per = 4 / size();
  tensors.push_back(
      Held("model/half_written", {8, 2}, torch::kFloat, rank() * per, (rank() + 1) * per, true));
  auto dir = SaveCheckpoint(root_, State(3), tensors, world(), 2);
  ASSERT_FALSE(dir.ok());
  const std::string message(dir.status().message());
  EXPECT_EQ(dir.status().code(), absl::StatusCode::kInvalidArgument) << message;
  EXPECT_NE(message.find("tensor 'model/orphan' [6, 2]: rows [0, 6) are written by no rank"),
            std::string::npos)
      << message;
  EXPECT_NE(message.find("tensor 'model/half_written' [8, 2]: rows [4, 8) are written by no rank"),
            std::string::npos)
      << message;
  EXPECT_NE(message.find("failed on rank 0"), std::string::npos) << message;
  EXPECT_NE(message.find("nothing was committed"), std::string::npos) << message;
  ExpectNothingCommitted(root_, 3);
  EXPECT_FALSE(fs::exists(root_ + "/latest"));
  EXPECT_TRUE(absl::IsNotFound(ResolveCheckpoint(root_).status()));
  // The same root takes a good save afterwards.
  auto good = SaveCheckpoint(root_, State(3), MixedTensors(rank(), size()), world(), 2);
  ASSERT_TRUE(good.ok()) << good.status();
}

TEST_F(CheckpointTest, RowsWrittenTwiceOrDeclaredDifferentlyAreRefused) {
  if (size() < 2) GTEST_SKIP() << "needs two ranks";
  {
    std::vector<ShardedTensor> tensors = MixedTensors(rank(), size());
    tensors.push_back(
        Held("model/replicated", {4, 2}, torch::kFloat, 0, 4, /*write=*/true));  // by every rank
    auto dir = SaveCheckpoint(root_, State(5), tensors, world(), 2);
    ASSERT_FALSE(dir.ok());
    const std::string message(dir.status().message());
    EXPECT_NE(message.find("tensor 'model/replicated' [4, 2]: rows [0, 4) are written by more than "
                           "one rank (ranks 0 and 1"),
              std::string::npos)
        << message;
    ExpectNothingCommitted(root_, 5);
  }
  {
    std::vector<ShardedTensor> tensors = MixedTensors(rank(), size());
    const int64_t width = rank() == 1 ? 3 : 2;
    tensors.push_back(Held("model/disputed", {4, width}, torch::kFloat, 0, 4, rank() == 0));
    auto dir = SaveCheckpoint(root_, State(5), tensors, world(), 2);
    ASSERT_FALSE(dir.ok());
    const std::string message(dir.status().message());
    EXPECT_NE(message.find("tensor 'model/disputed': rank 0 declares float32 [4, 2], rank 1 "
                           "declares float32 [4, 3]"),
              std::string::npos)
        << message;
    ExpectNothingCommitted(root_, 5);
  }
}

TEST_F(CheckpointTest, BadLocalTensorOnOneRankFailsEveryRank) {
  std::vector<ShardedTensor> tensors = MixedTensors(rank(), size());
  if (rank() == size() - 1) tensors[0].global_shape = {10, 8};  // local is [10, 7]
  auto dir = SaveCheckpoint(root_, State(2), tensors, world(), 2);
  ASSERT_FALSE(dir.ok());
  const std::string message(dir.status().message());
  EXPECT_NE(message.find("failed on rank " + std::to_string(size() - 1) + " of " +
                         std::to_string(size())),
            std::string::npos)
      << message;
  EXPECT_NE(message.find("tensor 'model/embed.weight': local shape [10, 7] at row_start 0 does not "
                         "fit global shape "
                         "[10, 8]"),
            std::string::npos)
      << message;
  ExpectNothingCommitted(root_, 2);
}

// A real write error (the file size limit, as a full disk would give) on the last rank: every
// rank returns the error naming it, the previous checkpoint stays the current one.
TEST_F(CheckpointTest, WriteErrorOnOneRankCommitsNothing) {
  auto first = SaveCheckpoint(root_, State(1), MixedTensors(rank(), size()), world(), 5);
  ASSERT_TRUE(first.ok()) << first.status();
  const int64_t per = 64 / size();
  std::vector<ShardedTensor> tensors = MixedTensors(rank(), size());
  tensors.push_back(
      Held("model/big", {64, 256}, torch::kFloat, rank() * per, (rank() + 1) * per, true));
  const bool victim = rank() == size() - 1;
  struct rlimit saved;
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &saved), 0);
  if (victim) {
    ::signal(SIGXFSZ, SIG_IGN);
    struct rlimit small = saved;
    small.rlim_cur = 1000;
    ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  }
  auto second = SaveCheckpoint(root_, State(2), tensors, world(), 5);
  if (victim) {
    ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &saved), 0);
  }
  ASSERT_FALSE(second.ok());
  const std::string message(second.status().message());
  EXPECT_NE(message.find("failed on rank " + std::to_string(size() - 1) + " of"), std::string::npos)
      << message;
  EXPECT_NE(message.find("shard_" + std::string(4, '0') + std::to_string(size() - 1) + ".bin"),
            std::string::npos)
      << message;
  EXPECT_NE(message.find("File too large"), std::string::npos) << message;
  EXPECT_EQ(second.status().code(), absl::StatusCode::kResourceExhausted) << message;
  world().Barrier();
  ExpectNothingCommitted(root_, 2);
  EXPECT_EQ(ReadFile(root_ + "/latest"), "step_00000001\n");
  auto resolved = ResolveCheckpoint(root_);
  ASSERT_TRUE(resolved.ok()) << resolved.status();
  EXPECT_EQ(*resolved, *first);
  EXPECT_TRUE(VerifyCheckpoint(*first).ok());
}

// A symbolic link planted at the name of the file that commits a save (latest.tmp) is
// refused with its path, the file it points to is left as it was, and nothing commits.
TEST_F(CheckpointTest, ASymlinkAtOneOfOurNamesIsRefusedNotFollowed) {
  auto first = SaveCheckpoint(root_, State(1), MixedTensors(rank(), size()), world(), 5);
  ASSERT_TRUE(first.ok()) << first.status();
  const std::string victim = root_ + "_victim.txt";
  if (rank() == 0) {
    std::ofstream(victim) << "not the checkpoint's\n";
    ASSERT_EQ(::symlink(victim.c_str(), (root_ + "/latest.tmp").c_str()), 0);
  }
  world().Barrier();
  auto second = SaveCheckpoint(root_, State(2), MixedTensors(rank(), size()), world(), 5);
  ASSERT_FALSE(second.ok());
  const std::string message(second.status().message());
  EXPECT_NE(message.find("latest.tmp"), std::string::npos) << message;
  EXPECT_NE(message.find("symbolic link"), std::string::npos) << message;
  world().Barrier();
  if (rank() == 0) {
    EXPECT_EQ(ReadFile(victim), "not the checkpoint's\n");
    EXPECT_EQ(ReadFile(root_ + "/latest"), "step_00000001\n");
    std::remove(victim.c_str());
  }
  world().Barrier();
}

// A hard link planted at latest.tmp (or any name a save writes) shares its content with a
// file elsewhere: the save must put a new file at the name, never write into the old one.
TEST_F(CheckpointTest, AHardLinkAtOneOfOurNamesKeepsTheLinkedFile) {
  auto first = SaveCheckpoint(root_, State(1), MixedTensors(rank(), size()), world(), 5);
  ASSERT_TRUE(first.ok()) << first.status();
  const std::string victim = root_ + "_linked.txt";
  if (rank() == 0) {
    std::ofstream(victim) << "a user's file\n";
    ASSERT_EQ(::link(victim.c_str(), (root_ + "/latest.tmp").c_str()), 0);
  }
  world().Barrier();
  auto second = SaveCheckpoint(root_, State(2), MixedTensors(rank(), size()), world(), 5);
  ASSERT_TRUE(second.ok()) << second.status();
  world().Barrier();
  if (rank() == 0) {
    EXPECT_EQ(ReadFile(victim), "a user's file\n");
    EXPECT_EQ(ReadFile(root_ + "/latest"), "step_00000002\n");
    std::remove(victim.c_str());
  }
  world().Barrier();
}

TEST_F(CheckpointTest, KeepLastPrunesOldestAndStaleUnfinishedSaves) {
  for (int64_t step = 1; step <= 4; ++step) {
    ASSERT_TRUE(SaveCheckpoint(root_, State(step), MixedTensors(rank(), size()), world(), 2).ok());
  }
  EXPECT_EQ(ListCheckpoints(root_),
            (std::vector<std::string>{root_ + "/step_00000003", root_ + "/step_00000004"}));
  if (rank() == 0) {
    // A save of this run's step 2 that died half-way, and one of step 10 (ahead: not stale).
    const std::string run_id = ReadOwnerMark(root_).value()->run_id;
    for (const char* step : {"/step_00000002", "/step_00000010"}) {
      ASSERT_TRUE(CreateOwnedDirectory(root_ + step, {kCheckpointKind, run_id}).ok());
      WriteFile(root_ + step + "/shard_00000.bin", "partial");
    }
    // What this run did not write is never pruned: a committed checkpoint copied in by hand,
    // an unfinished one of another run.
    fs::create_directories(root_ + "/step_00000001");
    WriteFile(root_ + "/step_00000001/COMMITTED", "step 1\n");
    WriteFile(root_ + "/step_00000001/notes.txt", "mine");
    ASSERT_TRUE(CreateOwnedDirectory(root_ + "/step_00000000", {kCheckpointKind, "other"}).ok());
  }
  world().Barrier();
  ASSERT_TRUE(SaveCheckpoint(root_, State(5), MixedTensors(rank(), size()), world(), 2).ok());
  EXPECT_EQ(ListCheckpoints(root_),
            (std::vector<std::string>{root_ + "/step_00000001", root_ + "/step_00000004",
                                      root_ + "/step_00000005"}));
  EXPECT_FALSE(fs::exists(root_ + "/step_00000002"));
  EXPECT_FALSE(fs::exists(root_ + "/step_00000003"));
  EXPECT_TRUE(fs::exists(root_ + "/step_00000010"));
  EXPECT_EQ(ReadFile(root_ + "/step_00000001/notes.txt"), "mine");
  EXPECT_TRUE(fs::exists(root_ + "/step_00000000"));
  world().Barrier();
  if (rank() == 0) {
    fs::remove_all(root_ + "/step_00000001");
    fs::remove_all(root_ + "/step_00000000");
  }
  EXPECT_EQ(ReadFile(root_ + "/latest"), "step_00000005\n");
  // keep_last 1 keeps only the new one; 0 keeps everything.
  ASSERT_TRUE(SaveCheckpoint(root_, State(6), MixedTensors(rank(), size()), world(), 1).ok());
  EXPECT_EQ(ListCheckpoints(root_), std::vector<std::string>{root_ + "/step_00000006"});
  ASSERT_TRUE(SaveCheckpoint(root_, State(7), MixedTensors(rank(), size()), world(), 0).ok());
  ASSERT_TRUE(SaveCheckpoint(root_, State(8), MixedTensors(rank(), size()), world(), 0).ok());
  EXPECT_EQ(ListCheckpoints(root_).size(), 3u);
}

// Only directories this run marked are ever deleted or replaced: a step directory in the
// way that rmoe did not write is refused by name and survives; a root that now leads to
// another run's checkpoints is refused; replacing an earlier run deletes nothing unless
// every step directory is rmoe's.
TEST_F(CheckpointTest, WhatThisRunDidNotWriteIsNeverDeleted) {
  ASSERT_TRUE(SaveCheckpoint(root_, State(1), MixedTensors(rank(), size()), world(), 1).ok());
  const std::string foreign = root_ + "/step_00000002";
  if (rank() == 0) {
    fs::create_directories(foreign);
    WriteFile(foreign + "/thesis.tex", "years of work");
  }
  world().Barrier();
  auto refused = SaveCheckpoint(root_, State(2), MixedTensors(rank(), size()), world(), 1);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(std::string(refused.status().message()).find("refusing to delete " + foreign),
            std::string::npos)
      << refused.status();
  world().Barrier();
  if (rank() == 0) {
    EXPECT_EQ(ReadFile(foreign + "/thesis.tex"), "years of work");
    EXPECT_EQ(ReadFile(root_ + "/latest"), "step_00000001\n");
    // An earlier run cannot be replaced wholesale while a foreign directory is among it.
    EXPECT_EQ(PreviousCheckpoints(root_),
              (std::vector<std::string>{root_ + "/latest", root_ + "/step_00000001", foreign}));
    const absl::Status replaced = RemovePreviousCheckpoints(root_);
    EXPECT_NE(std::string(replaced.message()).find("nothing was deleted"), std::string::npos)
        << replaced;
    EXPECT_TRUE(fs::exists(root_ + "/latest"));
    EXPECT_TRUE(fs::exists(root_ + "/step_00000001/COMMITTED"));
    fs::remove_all(foreign);
    ASSERT_TRUE(RemovePreviousCheckpoints(root_).ok());
    EXPECT_TRUE(PreviousCheckpoints(root_).empty());
    EXPECT_TRUE(RemovePreviousCheckpoints(root_ + "/none").ok()) << "no root: nothing to do";
  }
  world().Barrier();
  // A root whose mark names another run: the path leads elsewhere now.
  CheckpointWriteOptions options;
  options.run_id = "0123456789abcdef";
  auto elsewhere = SaveCheckpoint(root_, State(3), MixedTensors(rank(), size()), world(), options);
  ASSERT_FALSE(elsewhere.ok());
  EXPECT_NE(std::string(elsewhere.status().message()).find("was it replaced"), std::string::npos)
      << elsewhere.status();
  EXPECT_FALSE(fs::exists(root_ + "/step_00000003"));
  world().Barrier();
}

TEST_F(CheckpointTest, UnfinishedSaveIsRefusedAndSkippedThenRedone) {
  auto first = SaveCheckpoint(root_, State(1), MixedTensors(rank(), size()), world(), 3);
  ASSERT_TRUE(first.ok()) << first.status();
  const std::string second = root_ + "/step_00000002";
  if (rank() == 0) {
    // What a crash before the commit leaves: shards and a manifest, no COMMITTED.
    ASSERT_TRUE(
        CreateOwnedDirectory(second, {kCheckpointKind, ReadOwnerMark(root_).value()->run_id}).ok());
    fs::copy_file(*first + "/manifest.pb", second + "/manifest.pb");
    WriteFile(second + "/shard_00000.bin", "junk");
    WriteFile(second + "/leftover.tmp", "junk");
  }
  world().Barrier();
  auto resolved = ResolveCheckpoint(root_);
  ASSERT_TRUE(resolved.ok()) << resolved.status();
  EXPECT_EQ(*resolved, *first);
  EXPECT_EQ(ListCheckpoints(root_), std::vector<std::string>{*first});
  auto refused = ResolveCheckpoint(second);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  const std::string message(refused.status().message());
  EXPECT_NE(message.find(second + " is not a committed checkpoint: it has no COMMITTED marker"),
            std::string::npos)
      << message;
  EXPECT_NE(message.find("committed checkpoints in " + root_ + ": step_00000001"),
            std::string::npos)
      << message;
  world().Barrier();

  // Saving step 2 again clears the remains.
  auto redone = SaveCheckpoint(root_, State(2), MixedTensors(rank(), size()), world(), 3);
  ASSERT_TRUE(redone.ok()) << redone.status();
  EXPECT_FALSE(fs::exists(second + "/leftover.tmp"));
  EXPECT_TRUE(VerifyCheckpoint(second).ok());
  auto slots = MixedSlots();
  auto manifest = ReadManifest(second);
  ASSERT_TRUE(manifest.ok());
  ASSERT_TRUE(LoadTensors(second, *manifest, slots).ok());
  ExpectMixed(slots);

  // The current checkpoint is never overwritten.
  auto again = SaveCheckpoint(root_, State(2), MixedTensors(rank(), size()), world(), 3);
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_NE(std::string(again.status().message()).find("refusing to overwrite"), std::string::npos)
      << again.status();
  EXPECT_TRUE(VerifyCheckpoint(second).ok());
  world().Barrier();

  // A committed step that `latest` does not name (a run resumed from step 1 after step 2
  // was saved) is replaced by a new save of that step.
  if (rank() == 0) WriteFile(root_ + "/latest", "step_00000001\n");
  world().Barrier();
  auto replaced =
      SaveCheckpoint(root_, State(2, "second-timeline"), MixedTensors(rank(), size()), world(), 3);
  ASSERT_TRUE(replaced.ok()) << replaced.status();
  auto m2 = ReadManifest(second);
  ASSERT_TRUE(m2.ok());
  EXPECT_EQ(m2->job().name(), "second-timeline");
  world().Barrier();
}

TEST_F(CheckpointTest, ResolveCheckpointErrors) {
  if (rank() == 0) {
    auto missing = ResolveCheckpoint(root_ + "/nowhere");
    EXPECT_TRUE(absl::IsNotFound(missing.status()));
    EXPECT_NE(std::string(missing.status().message()).find("nowhere: it does not exist"),
              std::string::npos);
    fs::create_directories(root_);
    auto empty = ResolveCheckpoint(root_);
    EXPECT_TRUE(absl::IsNotFound(empty.status()));
    EXPECT_NE(std::string(empty.status().message()).find("no committed checkpoint in " + root_),
              std::string::npos);
  }
  world().Barrier();
  auto a = SaveCheckpoint(root_, State(1), MixedTensors(rank(), size()), world(), 0);
  auto b = SaveCheckpoint(root_, State(2), MixedTensors(rank(), size()), world(), 0);
  ASSERT_TRUE(a.ok() && b.ok());
  if (rank() == 0) {
    // Without `latest`: the newest committed one.
    fs::remove(root_ + "/latest");
    EXPECT_EQ(*ResolveCheckpoint(root_), *b);
    // `latest` naming something that is not a committed checkpoint.
    WriteFile(root_ + "/latest", "step_00000009\n");
    auto broken = ResolveCheckpoint(root_);
    ASSERT_FALSE(broken.ok());
    const std::string message(broken.status().message());
    EXPECT_NE(message.find("latest names \"step_00000009\", which is not a committed checkpoint"),
              std::string::npos)
        << message;
    EXPECT_NE(message.find("step_00000001, step_00000002"), std::string::npos) << message;
    WriteFile(root_ + "/latest", "step_00000001\n");
    EXPECT_EQ(*ResolveCheckpoint(root_), *a);
    EXPECT_EQ(*ResolveCheckpoint(*b), *b);
    EXPECT_EQ(*ResolveCheckpoint(*b + "/"), *b + "/");
  }
}

TEST_F(CheckpointTest, PauseHookHoldsTheCommit) {
  CheckpointWriteOptions options;
  options.keep_last = 2;
  options.pause_before_commit_seconds = 0.6;
  std::atomic<int> seen{-1};
  std::thread watcher;
  if (rank() == 0) {
    watcher = std::thread([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      const std::string dir = root_ + "/step_00000009";
      seen = fs::exists(dir + "/manifest.pb") && !fs::exists(dir + "/COMMITTED") ? 1 : 0;
    });
  }
  const auto start = std::chrono::steady_clock::now();
  auto dir = SaveCheckpoint(root_, State(9), MixedTensors(rank(), size()), world(), options);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (watcher.joinable()) watcher.join();
  ASSERT_TRUE(dir.ok()) << dir.status();
  EXPECT_GE(seconds, 0.6);
  if (rank() == 0) {
    EXPECT_EQ(seen.load(), 1) << "during the pause: manifest written, not committed";
  }
  EXPECT_TRUE(fs::exists(*dir + "/COMMITTED"));
}

// The background write's delay keeps the save in flight after BeginCheckpoint returns; the
// tensors may change meanwhile (the write holds a copy), and the commit writes what was passed.
TEST_F(CheckpointTest, DelayedBackgroundWriteStaysInFlight) {
  CheckpointWriteOptions options;
  options.keep_last = 2;
  options.background = true;
  options.delay_background_write_seconds = 0.5;
  std::vector<ShardedTensor> tensors = MixedTensors(rank(), size());
  auto pending = BeginCheckpoint(root_, State(3), tensors, world(), options);
  ASSERT_TRUE(pending.ok()) << pending.status();
  EXPECT_FALSE((*pending)->WriteDone()) << "the write should still be held back";
  for (auto& t : tensors) t.local.zero_();  // the caller goes on changing its tensors
  auto dir = FinishCheckpoint(**pending, world());
  ASSERT_TRUE(dir.ok()) << dir.status();
  EXPECT_TRUE((*pending)->WriteDone());
  auto manifest = ReadManifest(*dir);
  ASSERT_TRUE(manifest.ok()) << manifest.status();
  auto slots = MixedSlots();
  ASSERT_TRUE(LoadTensors(*dir, *manifest, slots).ok());
  ExpectMixed(slots);
}

// ---------------------------------------------------------------------------------------------
// corruption (rank 0 damages and checks; the others wait)

TEST_F(CheckpointTest, FlippedByteInAnyPieceIsNamed) {
  auto dir = SaveCheckpoint(root_, State(4), MixedTensors(rank(), size()), world(), 2);
  ASSERT_TRUE(dir.ok()) << dir.status();
  if (rank() == 0) {
    [&] {
      auto manifest = ReadManifest(*dir);
      ASSERT_TRUE(manifest.ok()) << manifest.status();
      int flipped = 0;
      for (const auto& t : manifest->tensors()) {
        for (const auto& p : t.pieces()) {
          if (p.length() == 0) continue;
          for (int64_t at : {int64_t{0}, p.length() / 2, p.length() - 1}) {
            const std::string file = *dir + "/" + p.file();
            FlipByte(file, p.offset() + at);
            auto slots = MixedSlots();
            const absl::Status load = LoadTensors(*dir, *manifest, slots);
            const absl::Status verify = VerifyCheckpoint(*dir);
            FlipByte(file, p.offset() + at);
            ++flipped;
            for (const absl::Status& s : {load, verify}) {
              ASSERT_EQ(s.code(), absl::StatusCode::kDataLoss) << t.name() << " " << s;
              const std::string message(s.message());
              EXPECT_NE(message.find("checksum mismatch in shard file " + file), std::string::npos)
                  << message;
              EXPECT_NE(message.find("tensor '" + t.name() + "'"), std::string::npos) << message;
            }
          }
        }
      }
      EXPECT_GT(flipped, 20);
      EXPECT_TRUE(VerifyCheckpoint(*dir).ok());
    }();
  }
  world().Barrier();
}

TEST_F(CheckpointTest, PartialLoadStillChecksTheWholePiece) {
  const int64_t per = 8 / size();
  std::vector<ShardedTensor> tensors = {
      Held("model/experts", {8, 16}, torch::kFloat, rank() * per, (rank() + 1) * per, true)};
  auto dir = SaveCheckpoint(root_, State(4), tensors, world(), 2);
  ASSERT_TRUE(dir.ok()) << dir.status();
  if (rank() == 0) {
    [&] {
      auto manifest = ReadManifest(*dir);
      ASSERT_TRUE(manifest.ok());
      const auto& p = manifest->tensors(0).pieces(size() - 1);       // the rows at the end
      FlipByte(*dir + "/" + p.file(), p.offset() + p.length() - 1);  // the last row
      // Load only the piece's first row: the flipped byte is not copied but is still found.
      std::vector<ShardedTensor> slots = {
          Slot("model/experts", {8, 16}, torch::kFloat, p.row_start(), p.row_start() + 1)};
      const absl::Status s = LoadTensors(*dir, *manifest, slots);
      EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
      EXPECT_NE(std::string(s.message()).find(p.file()), std::string::npos) << s;
      // Rows of other pieces are fine.
      if (size() > 1) {
        std::vector<ShardedTensor> other = {Slot("model/experts", {8, 16}, torch::kFloat, 0, per)};
        EXPECT_TRUE(LoadTensors(*dir, *manifest, other).ok());
        ExpectHolds(other[0], torch::kFloat);
      }
    }();
  }
  world().Barrier();
}

TEST_F(CheckpointTest, MissingOrTruncatedShardIsNamed) {
  auto dir = SaveCheckpoint(root_, State(4), MixedTensors(rank(), size()), world(), 2);
  ASSERT_TRUE(dir.ok()) << dir.status();
  if (rank() == 0) {
    [&] {
      auto manifest = ReadManifest(*dir);
      ASSERT_TRUE(manifest.ok());
      const std::string last = *dir + "/shard_0000" + std::to_string(size() - 1) + ".bin";
      fs::rename(last, last + ".away");
      auto slots = MixedSlots();
      for (const absl::Status& s : {LoadTensors(*dir, *manifest, slots), VerifyCheckpoint(*dir)}) {
        EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
        const std::string message(s.message());
        EXPECT_NE(message.find("shard file " + last + " is missing"), std::string::npos) << message;
        EXPECT_NE(message.find("of tensor '"), std::string::npos) << message;
      }
      fs::rename(last + ".away", last);
      EXPECT_TRUE(VerifyCheckpoint(*dir).ok());
      const auto size_before = fs::file_size(last);
      fs::resize_file(last, size_before - 1);
      for (const absl::Status& s : {LoadTensors(*dir, *manifest, slots), VerifyCheckpoint(*dir)}) {
        EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
        EXPECT_NE(std::string(s.message()).find("is truncated"), std::string::npos) << s;
        EXPECT_NE(std::string(s.message()).find(last), std::string::npos) << s;
      }
    }();
  }
  world().Barrier();
}

TEST_F(CheckpointTest, DamagedManifestsAreRefused) {
  auto dir = SaveCheckpoint(root_, State(4), MixedTensors(rank(), size()), world(), 2);
  ASSERT_TRUE(dir.ok()) << dir.status();
  if (rank() == 0) {
    [&] {
      const std::string path = *dir + "/manifest.pb";
      const std::string good = ReadFile(path);
      ASSERT_GT(good.size(), 24u);
      // The frame as documented.
      ASSERT_EQ(good.substr(0, 8), "RMOECKPT");
      CheckpointManifest parsed;
      ASSERT_TRUE(parsed.ParseFromString(good.substr(20, good.size() - 24)));
      EXPECT_EQ(Frame(1, good.substr(20, good.size() - 24)), good);

      auto expect_error = [&](const std::string& bytes, absl::StatusCode code,
                              const std::string& text) {
        WriteFile(path, bytes);
        auto m = ReadManifest(*dir);
        ASSERT_FALSE(m.ok()) << text;
        EXPECT_EQ(m.status().code(), code) << m.status();
        const std::string message(m.status().message());
        EXPECT_NE(message.find(path), std::string::npos) << message;
        EXPECT_NE(message.find(text), std::string::npos) << message;
        const absl::Status v = VerifyCheckpoint(*dir);
        EXPECT_NE(std::string(v.message()).find(text), std::string::npos) << v;
      };
      for (size_t n : {size_t{0}, size_t{4}, size_t{8}, size_t{12}, size_t{19}, size_t{20},
                       size_t{21}, good.size() / 2, good.size() - 4, good.size() - 1}) {
        expect_error(good.substr(0, n), absl::StatusCode::kDataLoss, "is truncated");
      }
      expect_error(good + "x", absl::StatusCode::kDataLoss,
                   "1 unexpected bytes after the manifest");
      std::string flipped = good;
      flipped[good.size() / 2] ^= 0x10;
      expect_error(flipped, absl::StatusCode::kDataLoss, "is corrupt: CRC-32C of the manifest is");
      flipped = good;
      flipped[good.size() - 2] ^= 0x01;  // in the stored CRC
      expect_error(flipped, absl::StatusCode::kDataLoss, "is corrupt");
      std::mt19937 rng(3);
      std::string garbage(300, '\0');
      for (auto& c : garbage) c = static_cast<char>(rng());
      expect_error(garbage, absl::StatusCode::kDataLoss, "is not an RMoE checkpoint manifest");
      expect_error("step: 4\nworld_size: 1\n", absl::StatusCode::kDataLoss,
                   "is not an RMoE checkpoint manifest");
      // A checksummed payload that is not a manifest.
      expect_error(Frame(1, std::string("\xff\xff\xff", 3)), absl::StatusCode::kDataLoss,
                   "does not parse");
      // From the future: in the frame, or in the manifest itself.
      expect_error(Frame(2, good.substr(20, good.size() - 24)),
                   absl::StatusCode::kFailedPrecondition,
                   "was written by a newer RMoE (format 2, this build reads up to 1)");
      CheckpointManifest future = parsed;
      future.set_format_version(7);
      expect_error(Frame(1, future.SerializeAsString()), absl::StatusCode::kFailedPrecondition,
                   "was written by a newer RMoE (format 7, this build reads up to 1)");
      // Checksummed, parses, but describes pieces that cannot be right.
      CheckpointManifest holes = parsed;
      holes.mutable_tensors(0)->mutable_pieces(0)->set_rows(3);
      expect_error(Frame(1, holes.SerializeAsString()), absl::StatusCode::kDataLoss,
                   "tensor 'model/embed.weight'");
      CheckpointManifest escape = parsed;
      escape.mutable_tensors(0)->mutable_pieces(0)->set_file("../../etc/passwd");
      expect_error(Frame(1, escape.SerializeAsString()), absl::StatusCode::kDataLoss,
                   "must be a plain file name");
      fs::remove(path);
      auto missing = ReadManifest(*dir);
      EXPECT_TRUE(absl::IsNotFound(missing.status()));
      EXPECT_NE(std::string(missing.status().message()).find(path + " does not exist"),
                std::string::npos);
      WriteFile(path, good);
      EXPECT_TRUE(VerifyCheckpoint(*dir).ok());
    }();
  }
  world().Barrier();
}

TEST_F(CheckpointTest, LoadRefusesWhatDoesNotMatch) {
  auto dir = SaveCheckpoint(root_, State(4), MixedTensors(rank(), size()), world(), 2);
  ASSERT_TRUE(dir.ok()) << dir.status();
  auto manifest = ReadManifest(*dir);
  ASSERT_TRUE(manifest.ok());
  auto check = [&](ShardedTensor slot, absl::StatusCode code, const std::string& text) {
    std::vector<ShardedTensor> slots = {slot};
    const absl::Status s = LoadTensors(*dir, *manifest, slots);
    EXPECT_EQ(s.code(), code) << s;
    EXPECT_NE(std::string(s.message()).find(text), std::string::npos) << s;
  };
  check(Slot("model/nope", {10, 7}, torch::kFloat, 0, 10), absl::StatusCode::kNotFound,
        "has no tensor 'model/nope'");
  check(Slot("model/embed.weight", {10, 7}, torch::kDouble, 0, 10),
        absl::StatusCode::kInvalidArgument,
        "tensor 'model/embed.weight' in " + *dir +
            " was saved as float32 [10, 7], expected float64 [10, 7]");
  check(Slot("model/embed.weight", {12, 7}, torch::kFloat, 0, 12),
        absl::StatusCode::kInvalidArgument,
        "was saved as float32 [10, 7], expected float32 [12, 7]");
  ShardedTensor beyond = Slot("model/embed.weight", {10, 7}, torch::kFloat, 8, 12);
  check(beyond, absl::StatusCode::kInvalidArgument, "exceed [0, 10)");
}

// A tensor LoadTensors cannot fill in place (a strided view here, a GPU tensor in training)
// is filled through a host copy, with the same values.
TEST_F(CheckpointTest, LoadFillsStridedTensorsThroughAHostCopy) {
  auto dir = SaveCheckpoint(root_, State(4), MixedTensors(rank(), size()), world(), 2);
  ASSERT_TRUE(dir.ok()) << dir.status();
  auto manifest = ReadManifest(*dir);
  ASSERT_TRUE(manifest.ok());
  std::vector<ShardedTensor> slots = {Slot("model/embed.weight", {10, 7}, torch::kFloat, 0, 10),
                                      Slot("model/embed.weight", {10, 7}, torch::kFloat, 0, 10)};
  slots[1].local = torch::zeros({7, 10}).t();
  ASSERT_FALSE(slots[1].local.is_contiguous());
  ASSERT_TRUE(LoadTensors(*dir, *manifest, slots).ok());
  EXPECT_GT(slots[0].local.abs().sum().item<double>(), 0);
  EXPECT_TRUE(torch::equal(slots[1].local, slots[0].local));
}

// ---------------------------------------------------------------------------------------------
// timings (a few MB; printed, not asserted)

TEST_F(CheckpointTest, TimingOfAFewMegabytes) {
  constexpr int kTensors = 4;
  const std::vector<int64_t> shape = {64, 16384};  // 4 MiB of float32 each
  const int64_t per = 64 / size();
  std::vector<ShardedTensor> tensors;
  for (int i = 0; i < kTensors; ++i) {
    tensors.push_back(Held("model/w" + std::to_string(i), shape, torch::kFloat, rank() * per,
                           (rank() + 1) * per, true));
  }
  const double mib = kTensors * 64 * 16384 * 4 / 1048576.0;
  auto now = [] { return std::chrono::steady_clock::now(); };
  auto secs = [](auto a, auto b) { return std::chrono::duration<double>(b - a).count(); };
  world().Barrier();
  auto t0 = now();
  auto dir = SaveCheckpoint(root_, State(1), tensors, world(), 1);
  auto t1 = now();
  ASSERT_TRUE(dir.ok()) << dir.status();
  auto manifest = ReadManifest(*dir);
  ASSERT_TRUE(manifest.ok());
  std::vector<ShardedTensor> same, all;
  for (int i = 0; i < kTensors; ++i) {
    same.push_back(Slot("model/w" + std::to_string(i), shape, torch::kFloat, rank() * per,
                        (rank() + 1) * per));
    all.push_back(Slot("model/w" + std::to_string(i), shape, torch::kFloat, 0, 64));
  }
  world().Barrier();
  auto t2 = now();
  ASSERT_TRUE(LoadTensors(*dir, *manifest, same).ok());
  world().Barrier();
  auto t3 = now();
  ASSERT_TRUE(LoadTensors(*dir, *manifest, all).ok());
  world().Barrier();
  auto t4 = now();
  double verify = 0;
  if (rank() == 0) {
    auto v0 = now();
    EXPECT_TRUE(VerifyCheckpoint(*dir).ok());
    verify = secs(v0, now());
  }
  for (auto& t : all) ExpectHolds(t, torch::kFloat);
  if (rank() == 0) {
    std::printf(
        "[ timing   ] np %d, %.0f MiB of float32: save %.1f ms; load own rows %.1f ms; every rank "
        "loads "
        "everything %.1f ms; verify (rank 0) %.1f ms\n",
        size(), mib, 1e3 * secs(t0, t1), 1e3 * secs(t2, t3), 1e3 * secs(t3, t4), 1e3 * verify);
  }
}

// ---------------------------------------------------------------------------------------------
// rmoe_ckpt (rank 0 runs it on the checkpoint every rank saved)

struct ToolRun {
  int status = -1;
  std::string output;
};

ToolRun RunTool(const std::string& args) {
  ToolRun run;
  const std::string command = std::string(RMOE_CKPT_TOOL) + " " + args + " 2>&1";
  FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) return run;
  char buffer[4096];
  size_t n;
  while ((n = std::fread(buffer, 1, sizeof(buffer), pipe)) > 0) run.output.append(buffer, n);
  const int status = ::pclose(pipe);
  run.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return run;
}

// Expert tensors split over every rank, replicated ones, and optimizer state.
std::vector<ShardedTensor> ToolTensors(int rank, int size) {
  const int64_t per = 8 / size;
  return {
      Held("model/tok_embed.weight", {11, 6}, torch::kFloat, 0, 11, rank == 0),
      Held("model/layers.0.moe.experts.w1", {8, 6, 4}, torch::kBFloat16, rank * per,
           (rank + 1) * per, true),
      Held("model/layers.0.moe.experts.w2", {8, 4, 6}, torch::kFloat, rank * per, (rank + 1) * per,
           true),
      Held("model/layers.0.router.gate", {3, 5}, torch::kDouble, 0, 3, rank == size - 1),
      Held("model/positions", {7}, torch::kLong, 0, 7, rank == 0),
      Held("model/empty", {0, 4}, torch::kFloat, 0, 0, rank == 0),
      Held("model/scale", {}, torch::kFloat, 0, 1, rank == 0),
      Held("optimizer/tok_embed.weight/exp_avg", {11, 6}, torch::kFloat, 0, 11, rank == 0),
      Held("optimizer/layers.0.moe.experts.w1/exp_avg", {8, 6, 4}, torch::kFloat, rank * per,
           (rank + 1) * per, true),
      Held("optimizer/tok_embed.weight/step", {}, torch::kLong, 0, 1, rank == 0),
  };
}

TEST_F(CheckpointTest, ToolInspectVerifyExport) {
  CheckpointState state = State(17, "tool-job");
  state.expert_parallel_size = size();
  state.scalars["best_val_loss"] = 2.25;
  auto dir = SaveCheckpoint(root_, state, ToolTensors(rank(), size()), world(), 2);
  ASSERT_TRUE(dir.ok()) << dir.status();
  if (rank() == 0) {
    [&] {
      auto manifest = ReadManifest(*dir);
      ASSERT_TRUE(manifest.ok());
      ToolRun inspect = RunTool("inspect " + root_);
      EXPECT_EQ(inspect.status, 0) << inspect.output;
      for (const std::string& text :
           {std::string("step_00000017"), std::string("tool-job"),
            std::string("step              17"), std::string("consumed samples  544"),
            "saved by " + std::to_string(size()) + " rank" + (size() > 1 ? "s" : "") +
                ", expert-parallel size " + std::to_string(size()),
            std::string("model tensors     7"), std::string("optimizer tensors 3"),
            std::string("best_val_loss")}) {
        EXPECT_NE(inspect.output.find(text), std::string::npos) << text << "\n" << inspect.output;
      }
      ToolRun listing = RunTool("inspect " + *dir + " --tensors");
      EXPECT_EQ(listing.status, 0) << listing.output;
      for (const auto& t : manifest->tensors()) {
        EXPECT_NE(listing.output.find(t.name()), std::string::npos) << t.name() << "\n"
                                                                    << listing.output;
      }
      EXPECT_NE(listing.output.find("bfloat16  [8, 6, 4]"), std::string::npos) << listing.output;

      ToolRun verify = RunTool("verify " + root_);
      EXPECT_EQ(verify.status, 0) << verify.output;
      EXPECT_NE(verify.output.find("OK"), std::string::npos) << verify.output;
      const auto& piece = manifest->tensors(2).pieces(0);
      FlipByte(*dir + "/" + piece.file(), piece.offset() + 3);
      ToolRun bad = RunTool("verify " + root_);
      FlipByte(*dir + "/" + piece.file(), piece.offset() + 3);
      EXPECT_EQ(bad.status, 1) << bad.output;
      EXPECT_NE(bad.output.find(piece.file()), std::string::npos) << bad.output;
      EXPECT_NE(bad.output.find("model/layers.0.moe.experts.w2"), std::string::npos) << bad.output;
      EXPECT_NE(bad.output.find("FAILED"), std::string::npos) << bad.output;

      // These tensors are no model that the job spec describes: the export names why and
      // writes nothing (exports of real models: tests/export_test.cc, export.* in CTest).
      const std::string out = fs::path(root_).parent_path().string() + "/export";
      ToolRun exported = RunTool("export " + root_ + " --out " + out);
      EXPECT_EQ(exported.status, 1) << exported.output;
      EXPECT_NE(exported.output.find("vocab_size"), std::string::npos) << exported.output;
      EXPECT_FALSE(fs::exists(out));

      // Usage and path errors.
      ToolRun no_out = RunTool("export " + root_);
      EXPECT_EQ(no_out.status, 2) << no_out.output;
      EXPECT_NE(no_out.output.find("--out"), std::string::npos) << no_out.output;
      ToolRun nowhere = RunTool("verify " + root_ + "/nowhere");
      EXPECT_EQ(nowhere.status, 1) << nowhere.output;
      EXPECT_NE(nowhere.output.find("does not exist"), std::string::npos) << nowhere.output;
      ToolRun unknown = RunTool("frobnicate " + root_);
      EXPECT_EQ(unknown.status, 2) << unknown.output;
    }();
  }
  world().Barrier();
}

}  // namespace
}  // namespace rmoe::distributed
