#include "rmoe/train/model_export.h"

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <set>

#include <absl/strings/ascii.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>
#include <absl/strings/str_join.h>

#include "rmoe/config/job_spec.h"
#include "rmoe/train/safetensors.h"
#include "rmoe/util/files.h"
#include "rmoe/util/json.h"
#include "rmoe/util/ownership.h"

namespace rmoe {
namespace fs = std::filesystem;
namespace {

constexpr char kConfigName[] = "config.json";
constexpr char kWeightsName[] = "model.safetensors";
constexpr char kTokenizerName[] = "rmoe_tokenizer.json";
constexpr char kSentencePieceName[] = "tokenizer.model";

// The shortest decimal that reads back as the same float: a spec's 1e-5 is written "1e-05",
// not the 17 digits of its double widening.
std::string FloatJson(float value) {
  for (int digits = 6; digits <= 9; ++digits) {
    const std::string text = absl::StrFormat("%.*g", digits, value);
    if (std::strtof(text.c_str(), nullptr) == value) return text;
  }
  return JsonNumber(value);
}

std::string Bool(bool value) { return value ? "true" : "false"; }

std::string DtypeName(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat: return "float32";
    case torch::kBFloat16: return "bfloat16";
    case torch::kHalf: return "float16";
    default: return "";
  }
}

std::string TokenizerJson(const DatasetMeta& meta) {
  const bool bpe = meta.tokenizer().kind() == TokenizerSpec::BPE;
  const int64_t separator = meta.document_separator();
  return JsonObject()
      .Add("type", std::string(bpe ? "bpe" : "byte"))
      .Add("vocab_size", int64_t{meta.vocab_size()})
      .Add("document_separator", separator)
      .Add("bos_token_id", separator)
      .Add("eos_token_id", separator)
      .AddRaw("file", bpe ? JsonString(kSentencePieceName) : "null")
      .str();
}

std::string RouterJson(const ModelSpec& model) {
  const RouterSpec& router = model.router();
  if (router.kind() == RouterSpec::LINEAR) return JsonObject().Add("type", std::string("linear")).str();
  if (router.kind() == RouterSpec::MLP) {
    return JsonObject()
        .Add("type", std::string("mlp"))
        .Add("hidden_dim", int64_t{MlpRouterHiddenDim(model)})
        .Add("activation", std::string("tanh"))
        .str();
  }
  const bool gru = router.cell() == RouterSpec::GRU;
  static const char* const kRecurrence[] = {"layer", "token", "none"};
  return JsonObject()
      .Add("type", std::string("recurrent"))
      .Add("cell", std::string(gru ? "gru" : "rnn"))
      .Add("recurrence", std::string(kRecurrence[router.recurrence()]))
      .Add("hidden_dim", int64_t{router.hidden_dim()})
      .Add("gate_order", gru ? std::vector<std::string>{"r", "z", "n"} : std::vector<std::string>{"h"})
      .AddRaw("detach_state", Bool(router.detach_state()))
      .str();
}

std::string MoEJson(const ModelSpec& model) {
  const MoESpec& moe = model.moe();
  std::vector<int64_t> layers;
  for (int layer : MoELayerIndices(model)) layers.push_back(layer);
  const int64_t shared_hidden =
      moe.shared_expert_hidden_dim() > 0 ? moe.shared_expert_hidden_dim() : moe.expert_hidden_dim();
  return JsonObject()
      .Add("layers", layers)
      .Add("num_experts", int64_t{moe.num_experts()})
      .Add("top_k", int64_t{moe.top_k()})
      .Add("expert_hidden_dim", int64_t{moe.expert_hidden_dim()})
      .AddRaw("renormalize", Bool(moe.renormalize()))
      .AddRaw("capacity_factor", FloatJson(moe.capacity_factor()))
      .AddRaw("shared_expert", Bool(moe.shared_expert()))
      .Add("shared_expert_hidden_dim", shared_hidden)
      .AddRaw("moe_weight", FloatJson(moe.moe_weight()))
      .AddRaw("shared_expert_weight", FloatJson(moe.shared_expert_weight()))
      .AddRaw("aux_loss_coef", FloatJson(moe.aux_loss_coef()))
      .AddRaw("z_loss_coef", FloatJson(moe.z_loss_coef()))
      .str();
}

std::string ReadmeText(const JobSpec& spec, const ExportSource& source) {
  const ModelSpec& m = spec.model();
  return absl::StrCat(
      "# ", spec.name(), ": an RMoE model export\n\n",
      "Exported by `rmoe_ckpt export` from ", source.path,
      source.step >= 0 ? absl::StrCat(" (step ", source.step, ")") : std::string(), ".\n",
      m.num_layers(), " layers, d_model ", m.d_model(), ", ", m.num_heads(), " heads, ",
      m.moe().num_experts(), " experts (top-", m.moe().top_k(), "), ",
      absl::AsciiStrToLower(RouterSpec::Kind_Name(m.router().kind())), " router",
      ", vocabulary ", m.vocab_size(), ".\n\n",
      "- `model.safetensors`: the parameters by their RMoE names. Experts are stacked\n"
      "  `[E, in, out]` and applied as `x @ W` (no `.weight` suffix); every other matrix is\n"
      "  `[out, in]`, applied as `x @ W.T`. `attn.qkv.weight` holds q, k, v in that order,\n"
      "  each as heads x head_dim.\n"
      "- `config.json`: every size and setting, explicit (`format_version` ", kExportFormatVersion,
      "). Rotary\n"
      "  embeddings turn interleaved channel pairs (2i, 2i+1), not the half-split layout.\n"
      "- `rmoe_tokenizer.json` (and `tokenizer.model` for BPE): the tokenizer.\n\n",
      "Load it with PyTorch and the reference package in RMoE's repository:\n\n"
      "    PYTHONPATH=<rmoe>/python python -m rmoe_torch generate <this folder> --prompt-ids 10\n\n"
      "or with RMoE itself: `rmoe_eval --model <this folder>`, `rmoe_generate --model <this "
      "folder>`.\n"
      "The full description of every key and tensor is docs/export.md in RMoE's repository.\n");
}

absl::Status WriteExportFiles(const LoadedModel& model, const std::string& tokenizer_dir,
                              const ExportSource& source, torch::ScalarType dtype,
                              const std::string& dir) {
  NamedTensors tensors;
  for (const auto& item : model.model->named_parameters()) {
    tensors.emplace_back(item.key(), item.value().detach().to(torch::kCPU, dtype));
  }
  const std::map<std::string, std::string> metadata = {
      {"format", "pt"}, {"rmoe_format_version", std::to_string(kExportFormatVersion)},
      {"job", model.spec.name()}, {"step", std::to_string(source.step)}};
  if (auto s = WriteSafetensors(dir + "/" + kWeightsName, tensors, metadata); !s.ok()) return s;
  const std::string config = ExportConfigJson(model.spec, model.dataset_meta, source, dtype);
  if (auto s = WriteFileAtomically(dir + "/" + kConfigName, config); !s.ok()) return s;
  if (auto s = WriteFileAtomically(dir + "/" + kTokenizerName,
                                   IndentJson(TokenizerJson(model.dataset_meta)) + "\n");
      !s.ok()) {
    return s;
  }
  if (model.dataset_meta.tokenizer().kind() == TokenizerSpec::BPE) {
    auto bytes = ReadFile(tokenizer_dir + "/" + kSentencePieceName, "SentencePiece model");
    if (!bytes.ok()) return bytes.status();
    if (auto s = WriteFileAtomically(dir + "/" + kSentencePieceName, *bytes); !s.ok()) return s;
  }
  return WriteFileAtomically(dir + "/README.md", ReadmeText(model.spec, source));
}

// Typed access to config.json; the first problem is kept, naming the file and the key.
class ConfigReader {
 public:
  explicit ConfigReader(std::string path) : path_(std::move(path)) {}
  const absl::Status& status() const { return status_; }

  const JsonValue& Object(const JsonValue& parent, const std::string& key) {
    const JsonValue* v = Find(parent, key, JsonValue::kObject, "an object");
    return v ? *v : empty_;
  }
  std::string String(const JsonValue& parent, const std::string& key) {
    const JsonValue* v = Find(parent, key, JsonValue::kString, "a string");
    return v ? v->string : "";
  }
  bool Bool(const JsonValue& parent, const std::string& key) {
    const JsonValue* v = Find(parent, key, JsonValue::kBool, "true or false");
    return v && v->boolean;
  }
  double Number(const JsonValue& parent, const std::string& key) {
    const JsonValue* v = Find(parent, key, JsonValue::kNumber, "a number");
    return v ? v->number : 0;
  }
  int Int(const JsonValue& parent, const std::string& key) {
    const double value = Number(parent, key);
    if (status_.ok() && (value != std::floor(value) || std::fabs(value) > 2e9)) {
      Fail(key, "must be an integer", JsonNumber(value));
    }
    return static_cast<int>(value);
  }
  std::vector<int> Ints(const JsonValue& parent, const std::string& key) {
    std::vector<int> out;
    const JsonValue* v = Find(parent, key, JsonValue::kArray, "an array of integers");
    if (!v) return out;
    for (const JsonValue& item : v->array) {
      if (item.type != JsonValue::kNumber || item.number != std::floor(item.number)) {
        Fail(key, "must be an array of integers", "a non-integer item");
        return out;
      }
      out.push_back(static_cast<int>(item.number));
    }
    return out;
  }
  // `key` must hold one of `allowed`; returns its index.
  int Choice(const JsonValue& parent, const std::string& key, const std::vector<std::string>& allowed) {
    const std::string value = String(parent, key);
    for (size_t i = 0; i < allowed.size(); ++i) {
      if (value == allowed[i]) return static_cast<int>(i);
    }
    if (status_.ok()) Fail(key, "must be one of \"" + absl::StrJoin(allowed, "\", \"") + "\"", JsonString(value));
    return 0;
  }
  void Fail(const std::string& key, const std::string& rule, const std::string& value) {
    if (!status_.ok()) return;
    status_ = absl::DataLossError(absl::StrCat(path_, ": \"", key, "\" ", rule, ", not ", value));
  }

 private:
  const JsonValue* Find(const JsonValue& parent, const std::string& key, JsonValue::Type type,
                        const char* what) {
    if (!status_.ok()) return nullptr;
    const JsonValue* v = parent.Get(key);
    if (v == nullptr) {
      status_ = absl::DataLossError(absl::StrCat(path_, ": the key \"", key, "\" is missing"));
      return nullptr;
    }
    if (v->type != type) {
      status_ = absl::DataLossError(absl::StrCat(path_, ": \"", key, "\" must be ", what));
      return nullptr;
    }
    return v;
  }

  std::string path_;
  absl::Status status_;
  JsonValue empty_;
};

// The job spec and tokenizer metadata that config.json describes.
absl::Status ParseExportConfig(const std::string& path, const JsonValue& root, JobSpec* spec,
                               DatasetMeta* meta) {
  ConfigReader r(path);
  if (r.String(root, "format") != "rmoe" && r.status().ok()) {
    r.Fail("format", "must be \"rmoe\"", JsonString(r.String(root, "format")));
  }
  const int version = r.Int(root, "format_version");
  if (r.status().ok() && (version < 1 || version > kExportFormatVersion)) {
    return absl::FailedPreconditionError(absl::StrCat(
        path, " has format_version ", version, "; this build of RMoE reads versions 1 to ",
        kExportFormatVersion, " (a newer RMoE wrote it?)"));
  }
  ModelSpec* m = spec->mutable_model();
  m->set_vocab_size(r.Int(root, "vocab_size"));
  m->set_d_model(r.Int(root, "d_model"));
  m->set_num_layers(r.Int(root, "num_layers"));
  m->set_num_heads(r.Int(root, "num_heads"));
  m->set_max_seq_len(r.Int(root, "max_seq_len"));
  m->set_tie_embeddings(r.Bool(root, "tie_embeddings"));
  m->set_norm_eps(static_cast<float>(r.Number(r.Object(root, "norm"), "eps")));
  const JsonValue& rotary = r.Object(root, "rotary");
  m->set_rope_theta(static_cast<float>(r.Number(rotary, "theta")));
  r.Choice(rotary, "layout", {"interleaved_pairs"});
  m->set_dense_hidden_dim(r.Int(r.Object(root, "dense_ffn"), "hidden_dim"));
  const JsonValue& moe_json = r.Object(root, "moe");
  MoESpec* moe = m->mutable_moe();
  moe->set_num_experts(r.Int(moe_json, "num_experts"));
  moe->set_top_k(r.Int(moe_json, "top_k"));
  moe->set_expert_hidden_dim(r.Int(moe_json, "expert_hidden_dim"));
  moe->set_renormalize(r.Bool(moe_json, "renormalize"));
  moe->set_capacity_factor(static_cast<float>(r.Number(moe_json, "capacity_factor")));
  moe->set_shared_expert(r.Bool(moe_json, "shared_expert"));
  moe->set_shared_expert_hidden_dim(r.Int(moe_json, "shared_expert_hidden_dim"));
  moe->set_moe_weight(static_cast<float>(r.Number(moe_json, "moe_weight")));
  moe->set_shared_expert_weight(static_cast<float>(r.Number(moe_json, "shared_expert_weight")));
  moe->set_aux_loss_coef(static_cast<float>(r.Number(moe_json, "aux_loss_coef")));
  moe->set_z_loss_coef(static_cast<float>(r.Number(moe_json, "z_loss_coef")));
  const std::vector<int> layers = r.Ints(moe_json, "layers");
  if (static_cast<int>(layers.size()) != m->num_layers()) {
    for (int layer : layers) moe->add_moe_layers(layer);
  }
  const JsonValue& router_json = r.Object(root, "router");
  RouterSpec* router = m->mutable_router();
  const int type = r.Choice(router_json, "type", {"linear", "recurrent", "mlp"});
  if (type == 0) {
    router->set_kind(RouterSpec::LINEAR);
  } else if (type == 2) {
    router->set_kind(RouterSpec::MLP);
    router->set_mlp_hidden_dim(r.Int(router_json, "hidden_dim"));
    r.Choice(router_json, "activation", {"tanh"});
  } else {
    router->set_kind(RouterSpec::RECURRENT);
    router->set_cell(r.Choice(router_json, "cell", {"gru", "rnn"}) == 0 ? RouterSpec::GRU : RouterSpec::RNN);
    router->set_recurrence(static_cast<RouterSpec::Recurrence>(
        r.Choice(router_json, "recurrence", {"layer", "token", "none"})));
    router->set_hidden_dim(r.Int(router_json, "hidden_dim"));
    router->set_detach_state(r.Bool(router_json, "detach_state"));
  }
  const JsonValue& tokenizer = r.Object(root, "tokenizer");
  const bool bpe = r.Choice(tokenizer, "type", {"byte", "bpe"}) == 1;
  meta->mutable_tokenizer()->set_kind(bpe ? TokenizerSpec::BPE : TokenizerSpec::BYTE);
  meta->set_vocab_size(r.Int(tokenizer, "vocab_size"));
  if (bpe) meta->mutable_tokenizer()->set_vocab_size(meta->vocab_size());
  meta->set_document_separator(r.Int(tokenizer, "document_separator"));
  const JsonValue& source = r.Object(root, "source");
  spec->set_name(r.String(source, "job"));
  spec->mutable_runtime()->set_precision(
      r.Choice(source, "precision", {"fp32", "bf16"}) == 1 ? RuntimeSpec::BF16 : RuntimeSpec::FP32);
  // What rmoe_eval's defaults reproduce: the evaluation of the run.
  spec->mutable_schedule()->set_seq_len(std::min(r.Int(source, "seq_len"), m->max_seq_len()));
  spec->mutable_schedule()->set_micro_batch_size(r.Int(source, "micro_batch_size"));
  spec->mutable_schedule()->set_eval_batches(r.Int(source, "eval_batches"));
  // No dataset comes with an export: evaluation names one.
  spec->mutable_data()->set_dataset_dir("");
  const int head_dim = r.Int(root, "head_dim");
  if (!r.status().ok()) return r.status();
  if (m->num_heads() <= 0 || head_dim * m->num_heads() != m->d_model()) {
    return absl::DataLossError(absl::StrCat(path, ": head_dim ", head_dim, " x num_heads ",
                                            m->num_heads(), " must equal d_model ", m->d_model()));
  }
  ValidationOptions options;
  options.check_data_files = false;
  // The model, schedule and runtime are checked; the missing dataset is by design.
  JobSpec checked = *spec;
  checked.mutable_data()->set_dataset_dir("(none: an export)");
  if (auto status = ValidateJobSpec(checked, options); !status.ok()) {
    return absl::DataLossError(absl::StrCat(path, " describes an impossible model: ", status.message()));
  }
  return absl::OkStatus();
}

// Copies every tensor of `file` into the parameter of the same name, all of them exactly.
absl::Status LoadExportedParameters(const std::string& path, SafetensorsFile file,
                                    Transformer& model) {
  std::map<std::string, torch::Tensor> stored;
  for (auto& [name, tensor] : file.tensors) stored[name] = std::move(tensor);
  torch::NoGradGuard no_grad;
  for (auto& item : model->named_parameters()) {
    auto found = stored.find(item.key());
    if (found == stored.end()) {
      return absl::DataLossError(absl::StrCat(path, " has no tensor \"", item.key(),
                                              "\", which the model of config.json needs"));
    }
    if (found->second.sizes() != item.value().sizes()) {
      return absl::DataLossError(absl::StrCat(
          path, ": tensor \"", item.key(), "\" has shape [", absl::StrJoin(found->second.sizes(), ", "),
          "]; config.json's model needs [", absl::StrJoin(item.value().sizes(), ", "), "]"));
    }
    if (!found->second.is_floating_point()) {
      return absl::DataLossError(absl::StrCat(path, ": tensor \"", item.key(), "\" is not floating point"));
    }
    item.value().copy_(found->second);
    stored.erase(found);
  }
  if (!stored.empty()) {
    return absl::DataLossError(absl::StrCat(path, " has tensors the model of config.json does not: \"",
                                            stored.begin()->first, "\"",
                                            stored.size() > 1 ? absl::StrCat(" and ", stored.size() - 1, " more") : ""));
  }
  return absl::OkStatus();
}

}  // namespace

std::string ExportConfigJson(const JobSpec& spec, const DatasetMeta& meta,
                             const ExportSource& source, torch::ScalarType dtype) {
  const ModelSpec& m = spec.model();
  const int64_t dense_hidden = m.dense_hidden_dim() > 0 ? m.dense_hidden_dim() : m.moe().expert_hidden_dim();
  const std::string precision = spec.runtime().precision() == RuntimeSpec::BF16 ? "bf16" : "fp32";
  const std::string json =
      JsonObject()
          .Add("format", std::string("rmoe"))
          .Add("format_version", int64_t{kExportFormatVersion})
          .Add("architecture", std::string("RMoETransformer"))
          .Add("torch_dtype", DtypeName(dtype))
          .Add("vocab_size", int64_t{m.vocab_size()})
          .Add("d_model", int64_t{m.d_model()})
          .Add("num_layers", int64_t{m.num_layers()})
          .Add("num_heads", int64_t{m.num_heads()})
          .Add("head_dim", int64_t{m.d_model() / m.num_heads()})
          .Add("max_seq_len", int64_t{m.max_seq_len()})
          .AddRaw("tie_embeddings", Bool(m.tie_embeddings()))
          .AddRaw("norm", JsonObject().Add("type", std::string("rmsnorm")).AddRaw("eps", FloatJson(m.norm_eps())).str())
          .AddRaw("rotary", JsonObject()
                                .AddRaw("theta", FloatJson(m.rope_theta()))
                                .Add("layout", std::string("interleaved_pairs"))
                                .str())
          .AddRaw("attention", JsonObject()
                                   .Add("qkv", std::string("fused"))
                                   .AddRaw("bias", "false")
                                   .AddRaw("causal", "true")
                                   .str())
          .AddRaw("dense_ffn", JsonObject().Add("type", std::string("swiglu")).Add("hidden_dim", dense_hidden).str())
          .AddRaw("moe", MoEJson(m))
          .AddRaw("router", RouterJson(m))
          .AddRaw("tokenizer", TokenizerJson(meta))
          .AddRaw("source", JsonObject()
                                .Add("job", spec.name())
                                .Add("step", source.step)
                                .Add("path", source.path)
                                .Add("precision", precision)
                                .Add("seq_len", int64_t{spec.schedule().seq_len()})
                                .Add("micro_batch_size", int64_t{spec.schedule().micro_batch_size()})
                                .Add("eval_batches", int64_t{spec.schedule().eval_batches()})
                                .str())
          .str();
  return IndentJson(json) + "\n";
}

absl::Status ExportModel(const LoadedModel& model, const std::string& tokenizer_dir,
                         const ExportSource& source, torch::ScalarType dtype,
                         const std::string& out_dir) {
  if (DtypeName(dtype).empty()) {
    return absl::InvalidArgumentError(absl::StrCat("cannot export in ", c10::toString(dtype),
                                                   ": the choices are float32, bfloat16, float16"));
  }
  const std::string target = fs::path(out_dir).lexically_normal().string();
  std::error_code ec;
  // A checkpoint root or step prunes (checkpoint.keep_last) or replaces whatever is inside
  // it: an export there would be deleted with the step. Refused before anything is written.
  for (fs::path dir = fs::absolute(target, ec).lexically_normal().parent_path();
       !dir.empty(); dir = dir.parent_path()) {
    if (IsOwned(dir.string(), kCheckpointRootKind) || IsOwned(dir.string(), kCheckpointKind)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "refusing to export into ", target, ": it is inside the checkpoint directory ",
          dir.string(), ", whose pruning (checkpoint.keep_last) or replacement would delete it; "
          "choose a folder outside it"));
    }
    if (dir == dir.root_path()) break;
  }
  // Said before anything is written, in words for this command.
  if (fs::exists(target, ec) && !IsOwned(target, kExportKind)) {
    return absl::FailedPreconditionError(absl::StrCat(
        target, " exists and is not an earlier export: choose a new folder, or remove it"));
  }
  return WriteOwnedDirectory(target, kExportKind, [&](const std::string& staging) {
    return WriteExportFiles(model, tokenizer_dir, source, dtype, staging);
  });
}

absl::StatusOr<LoadedModel> LoadExportedModel(const std::string& dir) {
  const std::string config_path = (fs::path(dir) / kConfigName).string();
  auto text = ReadFile(config_path, "export config");
  if (!text.ok()) return text.status();
  JsonValue root;
  if (!ParseJson(*text, &root) || root.type != JsonValue::kObject) {
    return absl::DataLossError(absl::StrCat(config_path, " is not a JSON object"));
  }
  LoadedModel loaded;
  if (auto s = ParseExportConfig(config_path, root, &loaded.spec, &loaded.dataset_meta); !s.ok()) {
    return s;
  }
  const std::string weights_path = (fs::path(dir) / kWeightsName).string();
  auto weights = ReadSafetensors(weights_path);
  if (!weights.ok()) return weights.status();
  loaded.model = Transformer(loaded.spec.model());
  if (auto s = LoadExportedParameters(weights_path, *std::move(weights), loaded.model); !s.ok()) {
    return s;
  }
  loaded.model->eval();
  return loaded;
}

bool IsExportDirectory(const std::string& dir) {
  std::error_code ec;
  return fs::is_regular_file(fs::path(dir) / kConfigName, ec) &&
         fs::is_regular_file(fs::path(dir) / kWeightsName, ec);
}

}  // namespace rmoe
