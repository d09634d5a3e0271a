// Model export (rmoe/train/model_export.h) and the safetensors format under it: an export
// reads back to the same model, its config.json states every fact explicitly, and damaged
// or foreign files are refused by name.
#include <filesystem>
#include <fstream>
#include <string>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "rmoe/config/job_spec.h"
#include "rmoe/train/model_export.h"
#include "rmoe/train/safetensors.h"
#include "rmoe/util/files.h"
#include "rmoe/util/json.h"
#include "tests/test_util.h"

namespace rmoe {
namespace {
namespace fs = std::filesystem;
using testing::TempDir;

DatasetMeta ByteMeta() {
  DatasetMeta meta;
  meta.mutable_tokenizer()->set_kind(TokenizerSpec::BYTE);
  meta.set_vocab_size(37);
  meta.set_document_separator(10);
  return meta;
}

LoadedModel MakeModel(const ModelSpec& model_spec) {
  LoadedModel loaded;
  loaded.spec.set_name("export-test");
  *loaded.spec.mutable_model() = model_spec;
  loaded.spec.mutable_schedule()->set_seq_len(16);
  loaded.dataset_meta = ByteMeta();
  loaded.model = Transformer(model_spec);
  return loaded;
}

// `spec` with its defaults spelled out as an export states them ("0 = expert_hidden_dim",
// the MLP router's size) and without the router settings a linear or MLP router does not use.
JobSpec Resolved(JobSpec spec) {
  ModelSpec* m = spec.mutable_model();
  if (m->dense_hidden_dim() == 0) m->set_dense_hidden_dim(m->moe().expert_hidden_dim());
  if (m->moe().shared_expert_hidden_dim() == 0) {
    m->mutable_moe()->set_shared_expert_hidden_dim(m->moe().expert_hidden_dim());
  }
  if (m->router().kind() == RouterSpec::LINEAR) {
    m->clear_router();
    m->mutable_router()->set_kind(RouterSpec::LINEAR);
  }
  if (m->router().kind() == RouterSpec::MLP) {
    const int hidden = MlpRouterHiddenDim(*m);
    m->clear_router();
    m->mutable_router()->set_kind(RouterSpec::MLP);
    m->mutable_router()->set_mlp_hidden_dim(hidden);
  }
  return spec;
}

void ExpectSameModel(LoadedModel& original, LoadedModel& imported) {
  const absl::Status same = CheckResumable(Resolved(original.spec), Resolved(imported.spec));
  EXPECT_TRUE(same.ok()) << same;
  auto theirs = imported.model->named_parameters();
  for (const auto& item : original.model->named_parameters()) {
    ASSERT_TRUE(theirs.contains(item.key())) << item.key();
    EXPECT_TRUE(torch::equal(item.value(), theirs[item.key()])) << item.key();
  }
  auto tokens = torch::randint(37, {2, 11});
  torch::NoGradGuard no_grad;
  original.model->eval();
  EXPECT_TRUE(torch::equal(original.model->forward(tokens).logits,
                           imported.model->forward(tokens).logits));
}

// Every router, with dense layers, a shared expert, untied embeddings and capacity limits
// spread over the cases: the export reads back to the same spec, parameters and logits.
TEST(ModelExport, EveryRouterRoundTripsToTheSameModel) {
  int variant = 0;
  for (const auto& router : testing::AllRouters()) {
    SCOPED_TRACE(router.name);
    torch::manual_seed(11 + variant);
    ModelSpec spec = testing::TinyModel(router);
    if (variant % 2 == 0) spec.mutable_moe()->add_moe_layers(1);  // layers 0 and 2 dense
    if (variant % 2 == 1) spec.mutable_moe()->set_shared_expert(true);
    if (variant == 1) spec.set_tie_embeddings(false);
    if (variant == 2) spec.mutable_moe()->set_capacity_factor(1.25f);
    if (variant == 3) spec.set_dense_hidden_dim(24);
    ++variant;
    LoadedModel original = MakeModel(spec);
    const auto dir = TempDir("export_" + router.name);
    ASSERT_TRUE(ExportModel(original, "", {"a run", 7}, torch::kFloat, (dir / "out").string()).ok());
    EXPECT_FALSE(fs::exists(dir / "out.tmp"));
    EXPECT_TRUE(IsExportDirectory((dir / "out").string()));
    auto imported = LoadExportedModel((dir / "out").string());
    ASSERT_TRUE(imported.ok()) << imported.status();
    ExpectSameModel(original, *imported);
    EXPECT_EQ(imported->dataset_meta.document_separator(), 10);
    EXPECT_EQ(imported->spec.schedule().seq_len(), 16);
    fs::remove_all(dir);
  }
}

// config.json spells out what the job spec leaves implicit: every MoE layer listed, the head
// size, the rotary layout, the router's gate order, numbers as numbers.
TEST(ModelExport, ConfigStatesEveryFactExplicitly) {
  ModelSpec spec = testing::TinyModel();  // moe_layers empty: every layer
  const std::string text = ExportConfigJson(MakeModel(spec).spec, ByteMeta(), {"x", 3}, torch::kFloat);
  JsonValue config;
  ASSERT_TRUE(ParseJson(text, &config)) << text;
  EXPECT_EQ(config.Get("format")->string, "rmoe");
  EXPECT_EQ(config.Number("format_version"), kExportFormatVersion);
  EXPECT_EQ(config.Number("head_dim"), 8);
  EXPECT_EQ(config.Get("rotary")->Get("layout")->string, "interleaved_pairs");
  const auto& layers = config.Get("moe")->Get("layers")->array;
  ASSERT_EQ(layers.size(), 3u);
  EXPECT_EQ(layers[2].number, 2);
  const auto& gates = config.Get("router")->Get("gate_order")->array;
  ASSERT_EQ(gates.size(), 3u);
  EXPECT_EQ(gates[0].string, "r");
  EXPECT_EQ(config.Get("source")->Get("step")->type, JsonValue::kNumber);
  EXPECT_EQ(config.Get("tokenizer")->Number("eos_token_id"), 10);
  EXPECT_NE(text.find("\"eps\": 1e-05"), std::string::npos) << text;
}

TEST(ModelExport, Bfloat16ExportHoldsTheRoundedWeights) {
  torch::manual_seed(5);
  LoadedModel original = MakeModel(testing::TinyModel());
  const auto dir = TempDir("export_bf16");
  ASSERT_TRUE(ExportModel(original, "", {"a run", -1}, torch::kBFloat16, (dir / "out").string()).ok());
  auto file = ReadSafetensors((dir / "out" / "model.safetensors").string());
  ASSERT_TRUE(file.ok()) << file.status();
  for (const auto& [name, tensor] : file->tensors) EXPECT_EQ(tensor.scalar_type(), torch::kBFloat16) << name;
  auto imported = LoadExportedModel((dir / "out").string());
  ASSERT_TRUE(imported.ok()) << imported.status();
  auto theirs = imported->model->named_parameters();
  for (const auto& item : original.model->named_parameters()) {
    EXPECT_TRUE(torch::equal(item.value().to(torch::kBFloat16).to(torch::kFloat), theirs[item.key()]))
        << item.key();
  }
  fs::remove_all(dir);
}

TEST(ModelExport, AnUnknownVersionOrAMismatchedTensorIsRefusedByName) {
  torch::manual_seed(6);
  LoadedModel original = MakeModel(testing::TinyModel());
  const auto dir = TempDir("export_bad");
  const std::string out = (dir / "out").string();
  ASSERT_TRUE(ExportModel(original, "", {"a run", -1}, torch::kFloat, out).ok());
  const std::string config = ReadFile(out + "/config.json").value();

  auto rewrite_config = [&](const std::string& from, const std::string& to) {
    std::string changed = config;
    changed.replace(changed.find(from), from.size(), to);
    ASSERT_TRUE(WriteFileAtomically(out + "/config.json", changed).ok());
  };
  rewrite_config("\"format_version\": 1", "\"format_version\": 2");
  auto newer = LoadExportedModel(out);
  ASSERT_FALSE(newer.ok());
  EXPECT_NE(newer.status().message().find("format_version 2"), std::string::npos) << newer.status();
  rewrite_config("\"num_heads\": 2", "\"num_heads\": \"2\"");
  auto mistyped = LoadExportedModel(out);
  ASSERT_FALSE(mistyped.ok());
  EXPECT_NE(mistyped.status().message().find("\"num_heads\" must be a number"), std::string::npos)
      << mistyped.status();
  rewrite_config("\"d_model\": 16", "\"d_model\": 32");
  auto misshapen = LoadExportedModel(out);
  ASSERT_FALSE(misshapen.ok());
  EXPECT_NE(misshapen.status().message().find("head_dim 8 x num_heads 2 must equal d_model 32"),
            std::string::npos)
      << misshapen.status();
  ASSERT_TRUE(WriteFileAtomically(out + "/config.json", config).ok());

  // A tensor missing, and one too many.
  auto file = ReadSafetensors(out + "/model.safetensors").value();
  NamedTensors fewer(file.tensors.begin() + 1, file.tensors.end());
  ASSERT_TRUE(WriteSafetensors(out + "/model.safetensors", fewer).ok());
  auto missing = LoadExportedModel(out);
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("has no tensor \"" + file.tensors[0].first + "\""),
            std::string::npos)
      << missing.status();
  NamedTensors more = file.tensors;
  more.emplace_back("extra.weight", torch::zeros({2}));
  ASSERT_TRUE(WriteSafetensors(out + "/model.safetensors", more).ok());
  auto extra = LoadExportedModel(out);
  ASSERT_FALSE(extra.ok());
  EXPECT_NE(extra.status().message().find("\"extra.weight\""), std::string::npos) << extra.status();
  fs::remove_all(dir);
}

TEST(ModelExport, AFolderThatIsNoExportIsNeverReplaced) {
  LoadedModel original = MakeModel(testing::TinyModel());
  const auto dir = TempDir("export_foreign");
  fs::create_directories(dir / "mine");
  std::ofstream(dir / "mine" / "notes.txt") << "keep me";
  const absl::Status status =
      ExportModel(original, "", {"a run", -1}, torch::kFloat, (dir / "mine").string());
  ASSERT_FALSE(status.ok());
  EXPECT_NE(status.message().find("is not an earlier export"), std::string::npos) << status;
  EXPECT_TRUE(fs::exists(dir / "mine" / "notes.txt"));
  EXPECT_FALSE(fs::exists(dir / "mine" / "config.json"));
  // An earlier export is replaced.
  ASSERT_TRUE(ExportModel(original, "", {"a run", -1}, torch::kFloat, (dir / "out").string()).ok());
  ASSERT_TRUE(ExportModel(original, "", {"a run", 9}, torch::kFloat, (dir / "out").string()).ok());
  EXPECT_NE(ReadFile((dir / "out" / "config.json").string())->find("\"step\": 9"), std::string::npos);
  fs::remove_all(dir);
}

TEST(Safetensors, EveryDtypeReadsBackBitForBit) {
  const auto dir = TempDir("safetensors");
  const std::string path = (dir / "t.safetensors").string();
  NamedTensors tensors = {
      {"f32", torch::randn({3, 4})},
      {"bf16", torch::randn({5}).to(torch::kBFloat16)},
      {"f64", torch::randn({2, 2}, torch::kDouble)},
      {"i64", torch::arange(7)},
      {"u8", torch::arange(3).to(torch::kByte)},
      {"scalar", torch::tensor(2.5f)},
      {"empty", torch::zeros({0, 3})},
  };
  ASSERT_TRUE(WriteSafetensors(path, tensors, {{"step", "4"}}).ok());
  auto file = ReadSafetensors(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->metadata.at("step"), "4");
  ASSERT_EQ(file->tensors.size(), tensors.size());
  for (const auto& [name, want] : tensors) {
    auto found = std::find_if(file->tensors.begin(), file->tensors.end(),
                              [&](const auto& t) { return t.first == name; });
    ASSERT_NE(found, file->tensors.end()) << name;
    EXPECT_EQ(found->second.scalar_type(), want.scalar_type()) << name;
    EXPECT_TRUE(torch::equal(found->second, want)) << name;
  }
  // Largest elements first: every tensor starts aligned to its element size.
  EXPECT_EQ(file->tensors.front().second.element_size(), 8);

  EXPECT_FALSE(WriteSafetensors(path, {{"a", torch::zeros({1})}, {"a", torch::zeros({1})}}).ok());
  EXPECT_FALSE(WriteSafetensors(path, {{"c", torch::zeros({1}, torch::kComplexFloat)}}).ok());
  fs::remove_all(dir);
}

TEST(Safetensors, ADamagedFileIsRefusedNamingTheProblem) {
  const auto dir = TempDir("safetensors_bad");
  const std::string path = (dir / "t.safetensors").string();
  ASSERT_TRUE(WriteSafetensors(path, {{"w", torch::randn({4, 4})}}).ok());
  const std::string bytes = ReadFile(path).value();

  auto expect_damaged = [&](const std::string& content, const std::string& says) {
    ASSERT_TRUE(WriteFileAtomically(path, content).ok());
    auto file = ReadSafetensors(path);
    ASSERT_FALSE(file.ok()) << says;
    EXPECT_EQ(file.status().code(), absl::StatusCode::kDataLoss) << file.status();
    EXPECT_NE(file.status().message().find(says), std::string::npos) << file.status();
  };
  expect_damaged(bytes.substr(0, bytes.size() - 4), "\"w\"");       // truncated data
  expect_damaged(bytes + "xxxx", "cover 64 of its 68 bytes");       // bytes after the data
  expect_damaged(bytes.substr(0, 5), "only 5 bytes");
  std::string bad_header = bytes;
  bad_header[8] = '[';
  expect_damaged(bad_header, "not a JSON object");
  std::string bad_dtype = bytes;
  bad_dtype.replace(bad_dtype.find("F32"), 3, "Q32");
  expect_damaged(bad_dtype, "dtype \"Q32\"");
  fs::remove_all(dir);
}

}  // namespace
}  // namespace rmoe
