#include "rmoe/config/job_spec.h"
#include "rmoe/config/resources.h"
#include "rmoe/data/dataset.h"

#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <absl/strings/str_cat.h>
#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>
#include <absl/strings/str_join.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace rmoe {
namespace {

using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;

std::string ConfigPath(const std::string& name) {
  return absl::StrCat(RMOE_SOURCE_DIR, "/configs/", name);
}

// A fresh directory per call, so tests never see each other's files; all are removed when
// the test program exits.
std::string MakeTempDir() {
  struct Created {
    std::vector<std::string> dirs;
    ~Created() {
      std::error_code ignored;
      for (const std::string& dir : dirs) std::filesystem::remove_all(dir, ignored);
    }
  };
  static Created created;
  std::string pattern = (std::filesystem::path(::testing::TempDir()) / "job_spec_test_XXXXXX");
  EXPECT_NE(mkdtemp(pattern.data()), nullptr) << pattern;
  created.dirs.push_back(pattern);
  return pattern;
}

void WriteFile(const std::string& path, const std::string& contents) {
  std::ofstream out(path, std::ios::binary);
  out << contents;
  ASSERT_TRUE(out.good()) << path;
}

// A dataset directory holding only meta.pbtxt, which is all the spec code reads.
class QuietErrors : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int, int, const std::string&) override {}
} quiet_;

// A dataset directory whose meta.pbtxt is `meta_text` followed by the counts every
// readable metadata file has (unless the text sets them); malformed text stays malformed.
std::string MakeDataset(const std::string& meta_text) {
  const std::string dir = MakeTempDir();
  std::string text = meta_text;
  DatasetMeta parsed;
  google::protobuf::TextFormat::Parser parser;
  parser.RecordErrorsTo(&quiet_);  // malformed text is the point of some tests
  if (parser.ParseFromString(meta_text, &parsed)) {
    if (!parsed.has_bytes_per_token()) {
      text += absl::StrCat("\nbytes_per_token: ", parsed.vocab_size() <= 65536 ? 2 : 4);
    }
    if (!parsed.has_train_tokens()) text += "\ntrain_tokens: 1000";
    if (!parsed.has_val_tokens()) text += "\nval_tokens: 100";
  }
  WriteFile(dir + "/meta.pbtxt", text);
  return dir;
}

JobSpec WithOverrides(const std::vector<std::string>& overrides) {
  JobSpec spec;
  for (const std::string& assignment : overrides) {
    absl::Status status = ApplyOverride(&spec, assignment);
    EXPECT_TRUE(status.ok()) << assignment << ": " << status;
  }
  return spec;
}

// gMock's string matchers take std::string, not absl::string_view.
std::string Msg(const absl::Status& status) { return std::string(status.message()); }

const ValidationOptions kNoDataFiles{/*check_data_files=*/false};

// ----------------------------------------------------------------------------------------
// Parsing and loading.

TEST(ParseJobSpecTest, ParsesNestedFieldsAndKeepsDefaults) {
  absl::StatusOr<JobSpec> spec = ParseJobSpec(R"pb(
                                                name: "x"
                                                model {
                                                  d_model: 64
                                                  moe {
                                                    num_experts: 4
                                                    moe_layers: [ 1, 3 ]
                                                  }
                                                  router { kind: LINEAR }
                                                }
                                              )pb",
                                              "inline");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->name(), "x");
  EXPECT_EQ(spec->model().d_model(), 64);
  EXPECT_EQ(spec->model().moe().num_experts(), 4);
  EXPECT_THAT(spec->model().moe().moe_layers(), ElementsAre(1, 3));
  EXPECT_EQ(spec->model().router().kind(), RouterSpec::LINEAR);
  EXPECT_EQ(spec->model().num_layers(), 4);  // proto default
}

TEST(ParseJobSpecTest, SyntaxErrorReportsSourceLineAndColumn) {
  absl::StatusOr<JobSpec> spec =
      ParseJobSpec("model {\n  d_model: 12\n  num_layers 4\n}\n", "my.pbtxt");
  ASSERT_FALSE(spec.ok());
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(spec.status()), StartsWith("my.pbtxt:3:14: "));
  EXPECT_THAT(Msg(spec.status()), HasSubstr("Expected \":\""));
}

TEST(ParseJobSpecTest, UnknownFieldNamesItAndSuggestsTheRightOne) {
  absl::StatusOr<JobSpec> spec = ParseJobSpec("model {\n  d_modl: 12\n}\n", "my.pbtxt");
  ASSERT_FALSE(spec.ok());
  EXPECT_THAT(
      Msg(spec.status()),
      AllOf(StartsWith("my.pbtxt:2:"), HasSubstr("\"d_modl\""), HasSubstr("rmoe.ModelSpec"),
            HasSubstr("did you mean \"d_model\"?"), HasSubstr("vocab_size, d_model, num_layers")));
}

TEST(ParseJobSpecTest, UnknownEnumValueIsAnError) {
  absl::StatusOr<JobSpec> spec = ParseJobSpec("model { router { kind: GRUU } }", "my.pbtxt");
  ASSERT_FALSE(spec.ok());
  EXPECT_THAT(Msg(spec.status()), AllOf(StartsWith("my.pbtxt:1:"), HasSubstr("GRUU")));
}

TEST(LoadJobSpecTest, ReportsTheFilePathWithErrors) {
  const std::string path = MakeTempDir() + "/bad.pbtxt";
  WriteFile(path, "name: \"ok\"\nschedule { stepz: 3 }\n");
  absl::StatusOr<JobSpec> spec = LoadJobSpec(path);
  ASSERT_FALSE(spec.ok());
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(spec.status()),
              AllOf(StartsWith(path + ":2:"), HasSubstr("stepz"), HasSubstr("\"steps\"")));
}

TEST(LoadJobSpecTest, MissingFileIsNotFound) {
  const std::string path = MakeTempDir() + "/nope.pbtxt";
  absl::StatusOr<JobSpec> spec = LoadJobSpec(path);
  ASSERT_FALSE(spec.ok());
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Msg(spec.status()), HasSubstr(path));
}

TEST(LoadJobSpecTest, DirectoryIsAnError) {
  const std::string dir = MakeTempDir();
  absl::StatusOr<JobSpec> spec = LoadJobSpec(dir);
  ASSERT_FALSE(spec.ok());
  EXPECT_THAT(Msg(spec.status()), HasSubstr(dir));
}

// ----------------------------------------------------------------------------------------
// Shipped configs.

class ShippedConfigTest : public ::testing::TestWithParam<const char*> {};

TEST_P(ShippedConfigTest, LoadsAndValidates) {
  absl::StatusOr<JobSpec> spec = LoadJobSpec(ConfigPath(GetParam()));
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_TRUE(ValidateJobSpec(*spec, kNoDataFiles).ok()) << ValidateJobSpec(*spec, kNoDataFiles);
}

INSTANTIATE_TEST_SUITE_P(Configs, ShippedConfigTest,
                         ::testing::Values("quickstart.pbtxt", "rmoe_seed.pbtxt",
                                           "tiny_test.pbtxt", "paper/enwik8.pbtxt",
                                           "paper/sotu_cpu.pbtxt"));

// The paper's recipe (arXiv 2408.06793, appendix A.2) as the GPU spec states it.
TEST(ShippedConfigTest, PaperEnwik8IsThePapersSetting) {
  absl::StatusOr<JobSpec> spec = LoadJobSpec(ConfigPath("paper/enwik8.pbtxt"));
  ASSERT_TRUE(spec.ok()) << spec.status();
  const ModelSpec& m = spec->model();
  EXPECT_EQ(m.num_layers(), 8);
  EXPECT_EQ(m.d_model(), 352);
  EXPECT_EQ(m.num_heads(), 8);
  EXPECT_EQ(m.moe().num_experts(), 16);
  EXPECT_EQ(m.moe().expert_hidden_dim(), 352);
  EXPECT_EQ(m.moe().top_k(), 2);
  EXPECT_EQ(m.router().hidden_dim(), 128);
  EXPECT_FLOAT_EQ(m.dropout(), 0.1f);
  EXPECT_FLOAT_EQ(m.moe().aux_loss_coef(), 0.01f);
  EXPECT_EQ(m.moe().z_loss_coef(), 0);
  EXPECT_EQ(spec->optimizer().weight_decay(), 0);
  EXPECT_FLOAT_EQ(spec->optimizer().lr(), 7e-4f);
  EXPECT_EQ(spec->schedule().warmup_steps(), 4000);
  EXPECT_EQ(spec->schedule().lr_decay(), ScheduleSpec::CONSTANT);
  EXPECT_EQ(spec->schedule().seq_len(), 512);
  EXPECT_EQ(spec->schedule().micro_batch_size(), 48);
  EXPECT_EQ(spec->schedule().steps(), 80000);
}

TEST(ShippedConfigTest, QuickstartIsTheDocumentedCpuModel) {
  absl::StatusOr<JobSpec> spec = LoadJobSpec(ConfigPath("quickstart.pbtxt"));
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->name(), "quickstart");
  EXPECT_EQ(spec->runtime().device(), "cpu");
  EXPECT_EQ(spec->data().tokenizer().kind(), TokenizerSpec::BPE);
  EXPECT_EQ(spec->model().vocab_size(), 0);
  EXPECT_EQ(spec->model().router().kind(), RouterSpec::RECURRENT);
  EXPECT_EQ(spec->model().router().recurrence(), RouterSpec::LAYER);
}

TEST(ShippedConfigTest, SeedIsTheGpuPrototype) {
  absl::StatusOr<JobSpec> spec = LoadJobSpec(ConfigPath("rmoe_seed.pbtxt"));
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->model().vocab_size(), 32000);
  EXPECT_EQ(spec->model().d_model(), 768);
  EXPECT_TRUE(spec->model().moe().shared_expert());
  EXPECT_FLOAT_EQ(spec->model().moe().moe_weight(), 0.5f);
  EXPECT_EQ(spec->runtime().device(), "cuda");
  EXPECT_EQ(spec->schedule().seq_len(), 2048);
}

TEST(ShippedConfigTest, TinyUsesBytes) {
  absl::StatusOr<JobSpec> spec = LoadJobSpec(ConfigPath("tiny_test.pbtxt"));
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->data().tokenizer().kind(), TokenizerSpec::BYTE);
  EXPECT_EQ(spec->data().dataset_dir(), "data/sotu_byte");
  EXPECT_EQ(spec->model().d_model(), 32);
  EXPECT_EQ(spec->output_dir(), "runs/tiny");
}

// ----------------------------------------------------------------------------------------
// Overrides.

TEST(ApplyOverrideTest, SetsEveryScalarType) {
  JobSpec spec = WithOverrides({
      "model.d_model=512",                               // int32
      "data.tokenizer.max_training_chars=123456789012",  // int64
      "seed=18446744073709551615",                       // uint64
      "optimizer.lr=1e-4",                               // float
      "model.moe.shared_expert=true",                    // bool
      "model.tie_embeddings=0",                          // bool as a digit
      "output_dir=runs/my run",                          // string, verbatim
      "model.router.kind=LINEAR",                        // enum
      "model.router.cell=RNN",                           // enum
  });
  EXPECT_EQ(spec.model().d_model(), 512);
  EXPECT_EQ(spec.data().tokenizer().max_training_chars(), 123456789012);
  EXPECT_EQ(spec.seed(), 18446744073709551615ull);
  EXPECT_FLOAT_EQ(spec.optimizer().lr(), 1e-4f);
  EXPECT_TRUE(spec.model().moe().shared_expert());
  EXPECT_FALSE(spec.model().tie_embeddings());
  EXPECT_EQ(spec.output_dir(), "runs/my run");
  EXPECT_EQ(spec.model().router().kind(), RouterSpec::LINEAR);
  EXPECT_EQ(spec.model().router().cell(), RouterSpec::RNN);
}

TEST(ApplyOverrideTest, LaterOverrideWinsAndValueMayContainEquals) {
  JobSpec spec = WithOverrides(
      {"name=a", "name=b=c", "model.moe.shared_expert=1", "model.moe.shared_expert=false"});
  EXPECT_EQ(spec.name(), "b=c");
  EXPECT_FALSE(spec.model().moe().shared_expert());
}

TEST(ApplyOverrideTest, RepeatedFieldsTakeAListThatReplacesTheOldOne) {
  JobSpec spec = WithOverrides({"model.moe.moe_layers=0,2", "model.moe.moe_layers=1, 3"});
  EXPECT_THAT(spec.model().moe().moe_layers(), ElementsAre(1, 3));
  ASSERT_TRUE(ApplyOverride(&spec, "model.moe.moe_layers=").ok());
  EXPECT_EQ(spec.model().moe().moe_layers_size(), 0);
  ASSERT_TRUE(ApplyOverride(&spec, "data.raw_text=a.txt,dir/b").ok());
  EXPECT_THAT(spec.data().raw_text(), ElementsAre("a.txt", "dir/b"));
}

TEST(ApplyOverrideTest, NestedPathCreatesTheSubMessage) {
  JobSpec spec;
  ASSERT_FALSE(spec.has_model());
  ASSERT_TRUE(ApplyOverride(&spec, "model.router.hidden_dim=32").ok());
  EXPECT_TRUE(spec.model().has_router());
  EXPECT_EQ(spec.model().router().hidden_dim(), 32);
}

struct OverrideErrorCase {
  std::string assignment;
  std::vector<std::string> expected;
};

void PrintTo(const OverrideErrorCase& c, std::ostream* os) { *os << c.assignment; }

class OverrideErrorTest : public ::testing::TestWithParam<OverrideErrorCase> {};

TEST_P(OverrideErrorTest, NamesThePathAndWhatWouldBeRight) {
  JobSpec spec;
  absl::Status status = ApplyOverride(&spec, GetParam().assignment);
  ASSERT_FALSE(status.ok()) << GetParam().assignment;
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  for (const std::string& expected : GetParam().expected) {
    EXPECT_THAT(Msg(status), HasSubstr(expected));
  }
  // A failed override leaves no trace, not even the sub-messages on its path.
  EXPECT_EQ(spec.ByteSizeLong(), 0u);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, OverrideErrorTest,
    ::testing::Values(
        OverrideErrorCase{
            "model.moe.num_expert=16",
            {"model.moe.num_expert: unknown field \"num_expert\" in rmoe.MoESpec",
             "did you mean \"num_experts\"?", "fields are: num_experts, top_k, expert_hidden_dim"}},
        OverrideErrorCase{"modle.d_model=1",
                          {"unknown field \"modle\" in rmoe.JobSpec", "\"model\""}},
        OverrideErrorCase{
            "model.d_model.x=1",
            {"model.d_model.x: \"d_model\" is an int32 field, not a message", "\".x\""}},
        OverrideErrorCase{"data.raw_text.x=1", {"\"raw_text\" is a repeated string field"}},
        OverrideErrorCase{"model.moe=3",
                          {"model.moe: is a message (rmoe.MoESpec)", "model.moe.num_experts="}},
        OverrideErrorCase{"model..d_model=1", {"empty field name", "model..d_model"}},
        OverrideErrorCase{"model.d_model", {"must look like path.to.field=value"}},
        OverrideErrorCase{"model.moe.top_k=two", {"model.moe.top_k: \"two\" is not an int32"}},
        OverrideErrorCase{"model.moe.top_k=", {"model.moe.top_k: \"\" is not an int32"}},
        OverrideErrorCase{"model.moe.top_k=1.5", {"\"1.5\" is not an int32"}},
        OverrideErrorCase{"model.d_model=3000000000",
                          {"model.d_model: 3000000000 is out of range for int32 "
                           "[-2147483648, 2147483647]"}},
        OverrideErrorCase{"seed=-1", {"seed: -1 is out of range for uint64 [0, "}},
        OverrideErrorCase{"data.tokenizer.max_training_chars=1e9", {"\"1e9\" is not an int64"}},
        OverrideErrorCase{"optimizer.lr=fast", {"optimizer.lr: \"fast\" is not a float"}},
        OverrideErrorCase{"optimizer.lr=1e40", {"optimizer.lr: 1e40 is out of range for float"}},
        OverrideErrorCase{"model.moe.shared_expert=yes",
                          {"model.moe.shared_expert: \"yes\" is not a bool (true, false, 1 or 0)"}},
        OverrideErrorCase{"model.router.kind=GRUU",
                          {"model.router.kind: \"GRUU\" is not one of LINEAR, RECURRENT"}},
        OverrideErrorCase{"data.tokenizer.kind=bpe", {"\"bpe\" is not one of BYTE, BPE"}},
        OverrideErrorCase{
            "model.moe.moe_layers=1,x",
            {"model.moe.moe_layers: \"x\" is not an int32", "element 2 of the list \"1,x\""}}));

TEST(ApplyOverrideTest, FailedOverrideKeepsEarlierValues) {
  JobSpec spec = WithOverrides({"model.moe.moe_layers=0,1"});
  EXPECT_FALSE(ApplyOverride(&spec, "model.moe.moe_layers=2,oops").ok());
  EXPECT_THAT(spec.model().moe().moe_layers(), ElementsAre(0, 1));
}

// ----------------------------------------------------------------------------------------
// Validation.

TEST(ValidateJobSpecTest, DefaultsAreValid) {
  absl::Status status = ValidateJobSpec(JobSpec(), kNoDataFiles);
  EXPECT_TRUE(status.ok()) << status;
}

struct ValidationCase {
  std::vector<std::string> overrides;
  std::string expected;
};

void PrintTo(const ValidationCase& c, std::ostream* os) {
  *os << "{" << absl::StrJoin(c.overrides, " ") << "}";
}

class ValidationRuleTest : public ::testing::TestWithParam<ValidationCase> {};

TEST_P(ValidationRuleTest, ReportsPathValueAndAllowedRange) {
  absl::Status status = ValidateJobSpec(WithOverrides(GetParam().overrides), kNoDataFiles);
  ASSERT_FALSE(status.ok());
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(status), HasSubstr(GetParam().expected));
}

INSTANTIATE_TEST_SUITE_P(
    Model, ValidationRuleTest,
    ::testing::Values(
        ValidationCase{{"model.d_model=0"}, "model.d_model = 0 must be > 0"},
        ValidationCase{{"model.num_layers=0"}, "model.num_layers = 0 must be > 0"},
        ValidationCase{{"model.num_heads=-2"}, "model.num_heads = -2 must be > 0"},
        ValidationCase{{"model.num_heads=3"},
                       "model.d_model = 256 must be divisible by model.num_heads = 3"},
        ValidationCase{{"model.d_model=96", "model.num_heads=32"},
                       "model.d_model / model.num_heads = 96 / 32 = 3 (the head dimension) "
                       "must be even"},
        ValidationCase{{"model.max_seq_len=0"}, "model.max_seq_len = 0 must be > 0"},
        ValidationCase{{"model.vocab_size=-1"}, "model.vocab_size = -1 must be >= 0"},
        ValidationCase{{"model.dense_hidden_dim=-1"}, "model.dense_hidden_dim = -1 must be >= 0"},
        ValidationCase{{"model.norm_eps=0"}, "model.norm_eps = 0 must be > 0"},
        ValidationCase{{"model.rope_theta=-1"}, "model.rope_theta = -1 must be > 0"},
        ValidationCase{{"model.init_std=nan"}, "model.init_std = nan must be finite and > 0"}));

INSTANTIATE_TEST_SUITE_P(
    MoE, ValidationRuleTest,
    ::testing::Values(
        ValidationCase{{"model.moe.num_experts=0"}, "model.moe.num_experts = 0 must be >= 1"},
        ValidationCase{{"model.moe.top_k=9"},
                       "model.moe.top_k = 9 must be in [1, model.moe.num_experts = 8]"},
        ValidationCase{{"model.moe.top_k=0"},
                       "model.moe.top_k = 0 must be in [1, model.moe.num_experts = 8]"},
        ValidationCase{{"model.moe.expert_hidden_dim=0"},
                       "model.moe.expert_hidden_dim = 0 must be > 0"},
        ValidationCase{{"model.moe.shared_expert_hidden_dim=-4"},
                       "model.moe.shared_expert_hidden_dim = -4 must be >= 0"},
        ValidationCase{{"model.moe.capacity_factor=-1"},
                       "model.moe.capacity_factor = -1 must be >= 0 (0 = dropless)"},
        ValidationCase{{"model.moe.capacity_factor=inf"},
                       "model.moe.capacity_factor = inf must be finite and >= 0"},
        ValidationCase{{"model.moe.aux_loss_coef=-0.5"},
                       "model.moe.aux_loss_coef = -0.5 must be >= 0"},
        ValidationCase{{"model.moe.z_loss_coef=-1"}, "model.moe.z_loss_coef = -1 must be >= 0"},
        ValidationCase{{"model.moe.moe_weight=nan"}, "model.moe.moe_weight = nan must be finite"},
        ValidationCase{{"model.moe.shared_expert_weight=-inf"},
                       "model.moe.shared_expert_weight = -inf must be finite"},
        ValidationCase{{"model.moe.moe_layers=0,4"},
                       "model.moe.moe_layers[1] = 4 must be in [0, model.num_layers = 4)"},
        ValidationCase{{"model.moe.moe_layers=-1"},
                       "model.moe.moe_layers[0] = -1 must be in [0, model.num_layers = 4)"},
        ValidationCase{{"model.moe.moe_layers=1,2,1"},
                       "model.moe.moe_layers[2] = 1 repeats model.moe.moe_layers[0]"},
        ValidationCase{{"model.router.recurrent_init_std=-0.5"},
                       "model.router.recurrent_init_std = -0.5 must be >= 0 (0 = fan-in uniform)"},
        ValidationCase{{"model.router.hidden_dim=0"},
                       "model.router.hidden_dim = 0 must be > 0 when model.router.kind = "
                       "RECURRENT"},
        ValidationCase{{"model.router.mlp_hidden_dim=-1"},
                       "model.router.mlp_hidden_dim = -1 must be >= 0"},
        ValidationCase{{"model.router.kind=LINEAR", "model.router.detach_state=true"},
                       "model.router.detach_state = true needs model.router.kind = RECURRENT "
                       "and model.router.recurrence = LAYER"},
        ValidationCase{{"model.router.recurrence=TOKEN", "model.router.detach_state=true"},
                       "model.router.detach_state = true needs"},
        ValidationCase{{"parallel.expert_parallel_size=0"},
                       "parallel.expert_parallel_size = 0 must be >= 1"},
        ValidationCase{{"parallel.expert_parallel_size=3"},
                       "parallel.expert_parallel_size = 3 must divide model.moe.num_experts = 8"}));

INSTANTIATE_TEST_SUITE_P(
    Training, ValidationRuleTest,
    ::testing::Values(
        ValidationCase{{"optimizer.lr=0"}, "optimizer.lr = 0 must be in (0, 1]"},
        ValidationCase{{"optimizer.lr=1e38"}, "optimizer.lr = 1e+38 must be in (0, 1]"},
        ValidationCase{{"optimizer.beta1=1"}, "optimizer.beta1 = 1 must be in [0, 1)"},
        ValidationCase{{"optimizer.beta2=-0.1"}, "optimizer.beta2 = -0.1 must be in [0, 1)"},
        ValidationCase{{"optimizer.eps=0"}, "optimizer.eps = 0 must be > 0"},
        ValidationCase{{"optimizer.weight_decay=-0.1"},
                       "optimizer.weight_decay = -0.1 must be in [0, 1]"},
        ValidationCase{{"optimizer.weight_decay=65537"},
                       "optimizer.weight_decay = 65537 must be in [0, 1]"},
        ValidationCase{{"optimizer.grad_clip=-1"}, "optimizer.grad_clip = -1 must be >= 0"},
        ValidationCase{{"schedule.steps=0"}, "schedule.steps = 0 must be > 0"},
        ValidationCase{{"schedule.warmup_steps=2000"},
                       "schedule.warmup_steps = 2000 must be in [0, schedule.steps = 1000]"},
        ValidationCase{{"schedule.warmup_steps=-1"},
                       "schedule.warmup_steps = -1 must be in [0, schedule.steps = 1000]"},
        ValidationCase{{"schedule.min_lr_ratio=1.5"},
                       "schedule.min_lr_ratio = 1.5 must be in [0, 1]"},
        ValidationCase{{"schedule.micro_batch_size=0"},
                       "schedule.micro_batch_size = 0 must be in [1, 65536]"},
        ValidationCase{{"schedule.micro_batch_size=100000"},
                       "schedule.micro_batch_size = 100000 must be in [1, 65536]"},
        ValidationCase{{"schedule.grad_accum_steps=0"},
                       "schedule.grad_accum_steps = 0 must be in [1, 65536]"},
        ValidationCase{{"schedule.seq_len=512"},
                       "schedule.seq_len = 512 must be in [1, model.max_seq_len = 256]"},
        ValidationCase{{"schedule.seq_len=0"},
                       "schedule.seq_len = 0 must be in [1, model.max_seq_len = 256]"},
        ValidationCase{{"schedule.eval_interval=-1"}, "schedule.eval_interval = -1 must be >= 0"},
        ValidationCase{{"schedule.eval_batches=0"},
                       "schedule.eval_batches = 0 must be in [1, 65536]"}));

INSTANTIATE_TEST_SUITE_P(
    DataAndOutputs, ValidationRuleTest,
    ::testing::Values(
        ValidationCase{{"data.val_fraction=0"}, "data.val_fraction = 0 must be in (0, 0.5]"},
        ValidationCase{{"data.val_fraction=0.6"}, "data.val_fraction = 0.6 must be in (0, 0.5]"},
        ValidationCase{{"data.dataset_dir="}, "data.dataset_dir = \"\" must be non-empty"},
        ValidationCase{{"data.tokenizer.kind=BPE", "data.tokenizer.vocab_size=100"},
                       "data.tokenizer.vocab_size = 100 must be in [260, 65536] for BPE"},
        ValidationCase{{"data.tokenizer.kind=BPE", "data.tokenizer.vocab_size=70000"},
                       "data.tokenizer.vocab_size = 70000 must be in [260, 65536] for BPE"},
        ValidationCase{{"data.tokenizer.kind=BPE", "data.tokenizer.max_training_chars=0"},
                       "data.tokenizer.max_training_chars = 0 must be > 0 for BPE"},
        ValidationCase{{"checkpoint.interval=-1"}, "checkpoint.interval = -1 must be >= 0"},
        ValidationCase{{"checkpoint.keep_last=0"}, "checkpoint.keep_last = 0 must be >= 1"},
        ValidationCase{{"logging.interval=0"}, "logging.interval = 0 must be > 0"},
        ValidationCase{{"runtime.num_threads=-1"}, "runtime.num_threads = -1 must be in [0, 1024]"},
        ValidationCase{{"runtime.num_threads=100000"},
                       "runtime.num_threads = 100000 must be in [0, 1024]"},
        ValidationCase{{"runtime.device=gpu"},
                       "runtime.device = \"gpu\" must be \"cpu\", \"cuda\" or \"cuda:N\""},
        ValidationCase{{"runtime.device=cuda:"}, "runtime.device = \"cuda:\" must be"},
        ValidationCase{{"runtime.device=cuda:x"}, "runtime.device = \"cuda:x\" must be"},
        ValidationCase{{"runtime.collective_timeout_seconds=-1"},
                       "runtime.collective_timeout_seconds = -1 must be in [0, 86400] seconds"},
        ValidationCase{{"runtime.collective_timeout_seconds=86401"},
                       "runtime.collective_timeout_seconds = 86401 must be in [0, 86400]"},
        ValidationCase{{"runtime.collective_timeout_seconds=nan"},
                       "runtime.collective_timeout_seconds = nan must be finite and in [0, 86400]"},
        ValidationCase{{"output_dir="}, "output_dir = \"\" must be non-empty"}));

TEST(ValidateJobSpecTest, AcceptsBoundaryAndConditionalValues) {
  for (const std::vector<std::string>& overrides : std::vector<std::vector<std::string>>{
           {"model.router.kind=LINEAR", "model.router.hidden_dim=0"},
           {"data.tokenizer.kind=BYTE", "data.tokenizer.vocab_size=10"},
           {"runtime.device=cuda"},
           {"runtime.device=cuda:1"},
           {"runtime.device=CUDA"},
           {"runtime.device=CPU"},
           {"runtime.collective_timeout_seconds=0"},
           {"runtime.collective_timeout_seconds=86400"},
           {"model.moe.top_k=8", "model.moe.capacity_factor=0", "schedule.seq_len=256"},
           {"schedule.warmup_steps=1000", "schedule.min_lr_ratio=1", "data.val_fraction=0.5"},
           {"model.moe.moe_layers=3,0", "parallel.expert_parallel_size=4"},
       }) {
    absl::Status status = ValidateJobSpec(WithOverrides(overrides), kNoDataFiles);
    EXPECT_TRUE(status.ok()) << absl::StrJoin(overrides, " ") << ": " << status;
  }
}

TEST(ValidateJobSpecTest, ListsEveryProblemOnItsOwnLine) {
  absl::Status status = ValidateJobSpec(
      WithOverrides({"model.d_model=0", "optimizer.lr=-1", "output_dir="}), kNoDataFiles);
  ASSERT_FALSE(status.ok());
  EXPECT_EQ(status.message(),
            "model.d_model = 0 must be > 0\noptimizer.lr = -1 must be in (0, 1]\n"
            "output_dir = \"\" must be non-empty");
}

TEST(ValidateJobSpecTest, MissingDatasetSaysHowToPrepareIt) {
  JobSpec spec = WithOverrides({"data.dataset_dir=" + MakeTempDir() + "/none"});
  absl::Status status = ValidateJobSpec(spec);
  ASSERT_FALSE(status.ok());
  EXPECT_THAT(Msg(status),
              AllOf(HasSubstr("data.dataset_dir = \"" + spec.data().dataset_dir() + "\""),
                    HasSubstr("meta.pbtxt"), HasSubstr("rmoe_prepare_data --job")));
  EXPECT_TRUE(ValidateJobSpec(spec, kNoDataFiles).ok());
}

TEST(ValidateJobSpecTest, UnparsableDatasetMetaIsReported) {
  const std::string dir = MakeDataset("vocab_size: [oops\n");
  absl::Status status = ValidateJobSpec(WithOverrides({"data.dataset_dir=" + dir}));
  ASSERT_FALSE(status.ok());
  EXPECT_THAT(Msg(status), HasSubstr(dir + "/meta.pbtxt:1:"));
}

TEST(ValidateJobSpecTest, ModelVocabMustCoverTheDataset) {
  const std::string dir = MakeDataset("vocab_size: 256 tokenizer { kind: BYTE }");
  EXPECT_TRUE(ValidateJobSpec(WithOverrides({"data.dataset_dir=" + dir})).ok());
  EXPECT_TRUE(
      ValidateJobSpec(WithOverrides({"data.dataset_dir=" + dir, "model.vocab_size=300"})).ok());
  absl::Status status =
      ValidateJobSpec(WithOverrides({"data.dataset_dir=" + dir, "model.vocab_size=200"}));
  ASSERT_FALSE(status.ok());
  EXPECT_THAT(Msg(status),
              HasSubstr("model.vocab_size = 200 must be 0 (use the dataset's) or >= the "
                        "dataset's vocab_size = 256"));
}

TEST(ValidateJobSpecTest, DatasetFromAnotherTokenizerIsRejected) {
  const std::string dir = MakeDataset("vocab_size: 2048 tokenizer { kind: BPE vocab_size: 2048 }");
  absl::Status byte = ValidateJobSpec(WithOverrides({"data.dataset_dir=" + dir}));
  ASSERT_FALSE(byte.ok());
  EXPECT_THAT(Msg(byte), HasSubstr("data.tokenizer.kind = BYTE but the dataset in"));
  absl::Status bpe = ValidateJobSpec(WithOverrides(
      {"data.dataset_dir=" + dir, "data.tokenizer.kind=BPE", "data.tokenizer.vocab_size=4096"}));
  ASSERT_FALSE(bpe.ok());
  EXPECT_THAT(Msg(bpe), HasSubstr("data.tokenizer.vocab_size = 4096 but the dataset in"));
  EXPECT_TRUE(ValidateJobSpec(WithOverrides({"data.dataset_dir=" + dir, "data.tokenizer.kind=BPE",
                                             "data.tokenizer.vocab_size=2048"}))
                  .ok());
}

// ----------------------------------------------------------------------------------------
// Load + overrides + validate.

TEST(LoadJobSpecWithOverridesTest, AppliesOverridesInOrderThenValidates) {
  absl::StatusOr<JobSpec> spec = LoadJobSpecWithOverrides(
      ConfigPath("tiny_test.pbtxt"),
      {"schedule.steps=7", "schedule.warmup_steps=2", "schedule.steps=9"}, kNoDataFiles);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->schedule().steps(), 9);
  EXPECT_EQ(spec->schedule().warmup_steps(), 2);
  EXPECT_EQ(spec->model().d_model(), 32);  // from the file
}

TEST(LoadJobSpecWithOverridesTest, ReportsEveryBadOverride) {
  absl::StatusOr<JobSpec> spec = LoadJobSpecWithOverrides(
      ConfigPath("tiny_test.pbtxt"), {"schedule.stepz=1", "model.d_model=big"}, kNoDataFiles);
  ASSERT_FALSE(spec.ok());
  EXPECT_THAT(Msg(spec.status()),
              AllOf(HasSubstr("--set schedule.stepz=1: schedule.stepz: unknown field"),
                    HasSubstr("\n--set model.d_model=big: model.d_model: \"big\" is not")));
}

TEST(LoadJobSpecWithOverridesTest, ValidationErrorNamesTheFile) {
  const std::string path = ConfigPath("tiny_test.pbtxt");
  absl::StatusOr<JobSpec> spec =
      LoadJobSpecWithOverrides(path, {"schedule.seq_len=100"}, kNoDataFiles);
  ASSERT_FALSE(spec.ok());
  EXPECT_THAT(Msg(spec.status()),
              AllOf(HasSubstr(path), HasSubstr("--set"),
                    HasSubstr("\nschedule.seq_len = 100 must be in [1, model.max_seq_len = 64]")));
}

TEST(LoadJobSpecWithOverridesTest, MissingFileIsNotFound) {
  absl::StatusOr<JobSpec> spec = LoadJobSpecWithOverrides("/nonexistent/spec.pbtxt", {});
  ASSERT_FALSE(spec.ok());
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kNotFound);
}

// ----------------------------------------------------------------------------------------
// Dataset metadata and vocabulary.

TEST(ReadDatasetMetaTest, ReadsMetaFromTheDirectory) {
  const std::string dir = MakeDataset(R"pb(
    vocab_size: 2048
    bytes_per_token: 2
    train_tokens: 1000
    val_tokens: 10
    tokenizer { kind: BPE vocab_size: 2048 }
    sources: "data/raw/sotu"
    unigram_entropy_nats: 6.5
  )pb");
  absl::StatusOr<DatasetMeta> meta = ReadDatasetMeta(dir);
  ASSERT_TRUE(meta.ok()) << meta.status();
  EXPECT_EQ(meta->vocab_size(), 2048);
  EXPECT_EQ(meta->bytes_per_token(), 2);
  EXPECT_EQ(meta->train_tokens(), 1000);
  EXPECT_EQ(meta->tokenizer().kind(), TokenizerSpec::BPE);
  EXPECT_THAT(meta->sources(), ElementsAre("data/raw/sotu"));
  EXPECT_DOUBLE_EQ(meta->unigram_entropy_nats(), 6.5);
}

TEST(ReadDatasetMetaTest, MissingMetaIsNotFoundWithPath) {
  const std::string dir = MakeTempDir();
  absl::StatusOr<DatasetMeta> meta = ReadDatasetMeta(dir);
  ASSERT_FALSE(meta.ok());
  EXPECT_EQ(meta.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Msg(meta.status()), HasSubstr(dir + "/meta.pbtxt"));
}

TEST(ReadDatasetMetaTest, BadMetaIsInvalidArgumentWithPosition) {
  const std::string dir = MakeDataset("vocab_size: 12\nvocab: 3\n");
  absl::StatusOr<DatasetMeta> meta = ReadDatasetMeta(dir);
  ASSERT_FALSE(meta.ok());
  EXPECT_EQ(meta.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(meta.status()), StartsWith(dir + "/meta.pbtxt:2:"));
}

TEST(ResolveVocabSizeTest, PrefersTheModelsOwnSize) {
  // No dataset exists: an explicit size must not need one.
  EXPECT_EQ(
      *ResolveVocabSize(WithOverrides({"model.vocab_size=300", "data.dataset_dir=/nonexistent"})),
      300);
}

TEST(ResolveVocabSizeTest, FallsBackToTheDataset) {
  const std::string dir = MakeDataset("vocab_size: 2048");
  absl::StatusOr<int> vocab = ResolveVocabSize(WithOverrides({"data.dataset_dir=" + dir}));
  ASSERT_TRUE(vocab.ok()) << vocab.status();
  EXPECT_EQ(*vocab, 2048);
}

TEST(ResolveVocabSizeTest, FailsWithoutUsableMetadata) {
  const std::string missing = MakeTempDir();
  absl::StatusOr<int> vocab = ResolveVocabSize(WithOverrides({"data.dataset_dir=" + missing}));
  ASSERT_FALSE(vocab.ok());
  EXPECT_EQ(vocab.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Msg(vocab.status()), HasSubstr(missing + "/meta.pbtxt"));

  const std::string empty = MakeDataset("train_tokens: 5");
  vocab = ResolveVocabSize(WithOverrides({"data.dataset_dir=" + empty}));
  ASSERT_FALSE(vocab.ok());
  EXPECT_THAT(Msg(vocab.status()), HasSubstr("vocab_size = 0 must be > 0"));
}

// ----------------------------------------------------------------------------------------
// Rendering.

TEST(JobSpecToTextTest, WritesDefaultsExplicitlyAndRoundTrips) {
  JobSpec spec = WithOverrides({"name=rt", "model.moe.moe_layers=1,3", "optimizer.lr=0.0006"});
  const std::string text = JobSpecToText(spec);
  EXPECT_THAT(text, AllOf(HasSubstr("name: \"rt\""), HasSubstr("d_model: 256"),
                          HasSubstr("kind: RECURRENT"), HasSubstr("moe_layers: 1"),
                          HasSubstr("lr: 0.0006"), HasSubstr("device: \"cpu\"")));
  // Strings without a declared default mean "derive it"; writing "" would change that.
  EXPECT_THAT(text, AllOf(Not(HasSubstr("directory:")), Not(HasSubstr("metrics_file:"))));

  absl::StatusOr<JobSpec> parsed = ParseJobSpec(text, "rendered");
  ASSERT_TRUE(parsed.ok()) << parsed.status() << "\n" << text;
  EXPECT_EQ(JobSpecToText(*parsed), text);
  EXPECT_THAT(parsed->model().moe().moe_layers(), ElementsAre(1, 3));
  EXPECT_TRUE(parsed->model().has_d_model());
}


// ---------------------------------------------------------------------------------------
// Resources: the memory estimate and its check, from the spec alone.

// With ZeRO-1 the check counts this job's share of the AdamW moments: its world size
// decides how many ranks share them (without one, the least the spec allows: world = EP).
TEST(ResourcesTest, TheCheckCountsTheWorldsShareOfShardedOptimizerState) {
  JobSpec spec = WithOverrides({"model.vocab_size=256", "parallel.shard_optimizer_state=true"});
  MemoryLayout alone, four;
  four.world_size = 4;
  const MemoryEstimate one_rank = EstimateTrainingMemory(spec, alone);
  const MemoryEstimate of_four = EstimateTrainingMemory(spec, four);
  ASSERT_LT(of_four.optimizer, 0.5 * one_rank.optimizer);
  const double between = 0.5 * (one_rank.total() + of_four.total());
  EXPECT_EQ(CheckTrainingMemory(spec, 1, between).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(CheckTrainingMemory(spec, 1, between, 4).ok());
}

TEST(ResourcesTest, AModelTooLargeForTheMemoryIsRefusedWithTheNumbers) {
  JobSpec spec = WithOverrides({"model.vocab_size=256", "model.moe.num_experts=4096",
                                "model.moe.expert_hidden_dim=8192", "model.d_model=1024"});
  const MemoryEstimate estimate = EstimateTrainingMemory(spec);
  // 16 bytes per parameter (fp32 weights, gradients, two AdamW moments) for ~1e11 of them.
  EXPECT_GT(estimate.parameters + estimate.gradients + estimate.optimizer, 16 * 1e11);
  const absl::Status refused = CheckTrainingMemory(spec, 1, 2.0 * (1 << 30));
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(Msg(refused), HasSubstr("needs about"));
  EXPECT_THAT(Msg(refused), HasSubstr("2.0 GiB is available"));
  EXPECT_THAT(Msg(refused), HasSubstr("AdamW moments"));
  EXPECT_THAT(Msg(refused), HasSubstr("model.moe.num_experts"));
  // Unknown availability never refuses; a small model fits.
  EXPECT_TRUE(CheckTrainingMemory(spec, 1, std::nullopt).ok());
  JobSpec small = WithOverrides({"model.vocab_size=256"});
  EXPECT_TRUE(CheckTrainingMemory(small, 1, 2.0 * (1 << 30)).ok());
  // Ranks on one machine share it; expert parallelism splits the experts.
  const double one = EstimateTrainingMemory(small).total();
  EXPECT_FALSE(CheckTrainingMemory(small, 4, 3 * one).ok());
  JobSpec split = spec;
  split.mutable_parallel()->set_expert_parallel_size(8);
  EXPECT_LT(EstimateTrainingMemory(split).parameters, estimate.parameters / 7);
}

TEST(ResourcesTest, ActivationsGrowWithTheMicroBatch) {
  JobSpec spec = WithOverrides({"model.vocab_size=256"});
  const double base = EstimateTrainingMemory(spec).activations;
  spec.mutable_schedule()->set_micro_batch_size(spec.schedule().micro_batch_size() * 4);
  EXPECT_NEAR(EstimateTrainingMemory(spec).activations, 4 * base, 1e-6 * base);
}

TEST(ResourcesTest, AvailableMemoryIsKnownOnLinuxAndFormatted) {
  const std::optional<double> available = AvailableMemoryBytes();
  ASSERT_TRUE(available.has_value());
  EXPECT_GT(*available, 0);
  EXPECT_EQ(FormatBytes(17), "17 B");
  EXPECT_EQ(FormatBytes(1536), "1.5 KiB");
  EXPECT_EQ(FormatBytes(3.0 * (1 << 30)), "3.0 GiB");
}

}  // namespace
}  // namespace rmoe
