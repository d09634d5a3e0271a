#include "rmoe/config/job_spec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <absl/strings/ascii.h>
#include <absl/strings/escaping.h>
#include <absl/strings/match.h>
#include <absl/strings/numbers.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_join.h>
#include <absl/strings/str_replace.h>
#include <absl/strings/str_split.h>
#include <absl/strings/strip.h>
#include <google/protobuf/descriptor.h>
#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/message.h>
#include <google/protobuf/text_format.h>
#include <google/protobuf/util/message_differencer.h>
#include "rmoe/data/dataset.h"
#include "rmoe/util/files.h"

namespace rmoe {
namespace {

namespace pb = google::protobuf;

// SentencePiece BPE with byte fallback needs the 256 byte pieces plus its special tokens;
// the upper bound keeps token ids within the uint16 token files.
constexpr int kMinBpeVocab = 260;
constexpr int kMaxBpeVocab = 65536;
// Upper limits beyond which a value is a typo, not a choice: AdamW at a learning rate above
// 1 moves every weight by about 1 a step; a weight decay above 1 shrinks weights past zero
// once lr reaches 1; more threads than any machine has cores only thrash.
constexpr double kMaxLearningRate = 1.0;
constexpr double kMaxWeightDecay = 1.0;
constexpr int kMaxThreads = 1024;
constexpr int kMaxBatch = 65536;

// ---------------------------------------------------------------------------------------
// Naming fields in error messages.

std::string FieldList(const pb::Descriptor* type) {
  std::vector<std::string> names;
  for (int i = 0; i < type->field_count(); ++i) names.push_back(type->field(i)->name());
  return absl::StrJoin(names, ", ");
}

size_t EditDistance(absl::string_view a, absl::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t substitute =
          diagonal + (absl::ascii_tolower(a[i - 1]) != absl::ascii_tolower(b[j - 1]));
      diagonal = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, substitute});
    }
  }
  return row[b.size()];
}

// " (did you mean "num_experts"?)" for a near miss, else "".
std::string DidYouMean(const pb::Descriptor* type, absl::string_view wrong) {
  const pb::FieldDescriptor* best = nullptr;
  size_t best_distance = std::max<size_t>(2, wrong.size() / 4) + 1;
  for (int i = 0; i < type->field_count(); ++i) {
    const size_t distance = EditDistance(wrong, type->field(i)->name());
    if (distance < best_distance) {
      best = type->field(i);
      best_distance = distance;
    }
  }
  return best == nullptr ? "" : absl::StrCat(" (did you mean \"", best->name(), "\"?)");
}

// The protobuf parser only says a field is unknown; users also need to know what exists.
std::string ExplainParserError(const std::string& message) {
  // Message type "rmoe.ModelSpec" has no field named "d_modl".
  const std::vector<std::string> parts = absl::StrSplit(message, '"');
  if (parts.size() != 5 || parts[0] != "Message type " || parts[2] != " has no field named ") {
    return message;
  }
  const pb::Descriptor* type =
      pb::DescriptorPool::generated_pool()->FindMessageTypeByName(parts[1]);
  if (type == nullptr) return message;
  return absl::StrCat(absl::StripSuffix(message, "."), DidYouMean(type, parts[3]), ". Fields of ",
                      type->full_name(), " are: ", FieldList(type), ".");
}

// ---------------------------------------------------------------------------------------
// Reading text-format files.

class ErrorList : public pb::io::ErrorCollector {
 public:
  explicit ErrorList(absl::string_view source) : source_(source) {}

  void AddError(int line, pb::io::ColumnNumber column, const std::string& message) override {
    // The parser counts lines and columns from 0; editors count from 1.
    const std::string where =
        line < 0 ? source_ : absl::StrCat(source_, ":", line + 1, ":", column + 1);
    errors_.push_back(absl::StrCat(where, ": ", ExplainParserError(message)));
  }

  const std::vector<std::string>& errors() const { return errors_; }

 private:
  std::string source_;
  std::vector<std::string> errors_;
};

absl::Status ParseTextProto(absl::string_view text, absl::string_view source,
                            pb::Message* message) {
  ErrorList errors(source);
  pb::TextFormat::Parser parser;
  parser.RecordErrorsTo(&errors);
  if (parser.ParseFromString(std::string(text), message)) return absl::OkStatus();
  return absl::InvalidArgumentError(
      errors.errors().empty()
          ? absl::StrCat(source, ": not a valid text-format ", message->GetTypeName())
          : absl::StrJoin(errors.errors(), "\n"));
}

std::string MetaPath(const std::string& dataset_dir) {
  return (std::filesystem::path(dataset_dir) / "meta.pbtxt").string();
}

// ---------------------------------------------------------------------------------------
// Overrides.

std::string WithArticle(absl::string_view noun) {
  const bool vowel =
      !noun.empty() && absl::string_view("aeiou").find(noun[0]) != absl::string_view::npos;
  return absl::StrCat(vowel ? "an " : "a ", noun);
}

bool LooksLikeInteger(absl::string_view text) {
  if (!absl::ConsumePrefix(&text, "-")) absl::ConsumePrefix(&text, "+");
  return !text.empty() && std::all_of(text.begin(), text.end(), absl::ascii_isdigit);
}

absl::Status NotA(absl::string_view path, absl::string_view text, absl::string_view type) {
  return absl::InvalidArgumentError(
      absl::StrCat(path, ": \"", text, "\" is not ", WithArticle(type)));
}

template <typename T>
absl::StatusOr<T> ParseInteger(absl::string_view path, absl::string_view text,
                               const pb::FieldDescriptor* field) {
  T value;
  if (absl::SimpleAtoi(text, &value)) return value;
  if (LooksLikeInteger(absl::StripAsciiWhitespace(text))) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": ", absl::StripAsciiWhitespace(text), " is out of range for ", field->type_name(),
        " [", std::numeric_limits<T>::min(), ", ", std::numeric_limits<T>::max(), "]"));
  }
  return NotA(path, text, field->type_name());
}

template <typename T>
absl::StatusOr<T> ParseFloating(absl::string_view path, absl::string_view text,
                                const pb::FieldDescriptor* field) {
  double value;
  if (!absl::SimpleAtod(text, &value)) return NotA(path, text, field->type_name());
  // SimpleAtod turns an overflow into inf; only a spelled-out "inf" should mean infinity.
  const bool overflow =
      std::isfinite(value)
          ? std::abs(value) > std::numeric_limits<T>::max()
          : std::isinf(value) && !absl::StrContains(absl::AsciiStrToLower(text), "inf");
  if (overflow) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", absl::StripAsciiWhitespace(text),
                                                   " is out of range for ", field->type_name()));
  }
  return static_cast<T>(value);
}

absl::StatusOr<bool> ParseBool(absl::string_view path, absl::string_view text) {
  const std::string lower = absl::AsciiStrToLower(absl::StripAsciiWhitespace(text));
  if (lower == "true" || lower == "1") return true;
  if (lower == "false" || lower == "0") return false;
  return absl::InvalidArgumentError(
      absl::StrCat(path, ": \"", text, "\" is not a bool (true, false, 1 or 0)"));
}

absl::StatusOr<const pb::EnumValueDescriptor*> ParseEnum(absl::string_view path,
                                                         absl::string_view text,
                                                         const pb::FieldDescriptor* field) {
  const pb::EnumDescriptor* type = field->enum_type();
  const std::string name(absl::StripAsciiWhitespace(text));
  if (const pb::EnumValueDescriptor* value = type->FindValueByName(name)) return value;
  std::vector<std::string> names;
  for (int i = 0; i < type->value_count(); ++i) names.push_back(type->value(i)->name());
  return absl::InvalidArgumentError(
      absl::StrCat(path, ": \"", text, "\" is not one of ", absl::StrJoin(names, ", ")));
}

template <typename T>
using Setter = void (pb::Reflection::*)(pb::Message*, const pb::FieldDescriptor*, T) const;

// Sets a singular field, or appends to a repeated one.
template <typename T>
absl::Status Store(pb::Message* message, const pb::FieldDescriptor* field, absl::StatusOr<T> parsed,
                   Setter<T> set, Setter<T> add) {
  if (!parsed.ok()) return parsed.status();
  const pb::Reflection* reflection = message->GetReflection();
  (reflection->*(field->is_repeated() ? add : set))(message, field, *std::move(parsed));
  return absl::OkStatus();
}

absl::Status StoreScalar(pb::Message* m, const pb::FieldDescriptor* f, absl::string_view path,
                         absl::string_view text) {
  using R = pb::Reflection;
  switch (f->cpp_type()) {
    case pb::FieldDescriptor::CPPTYPE_INT32:
      return Store<int32_t>(m, f, ParseInteger<int32_t>(path, text, f), &R::SetInt32, &R::AddInt32);
    case pb::FieldDescriptor::CPPTYPE_INT64:
      return Store<int64_t>(m, f, ParseInteger<int64_t>(path, text, f), &R::SetInt64, &R::AddInt64);
    case pb::FieldDescriptor::CPPTYPE_UINT32:
      return Store<uint32_t>(m, f, ParseInteger<uint32_t>(path, text, f), &R::SetUInt32,
                             &R::AddUInt32);
    case pb::FieldDescriptor::CPPTYPE_UINT64:
      return Store<uint64_t>(m, f, ParseInteger<uint64_t>(path, text, f), &R::SetUInt64,
                             &R::AddUInt64);
    case pb::FieldDescriptor::CPPTYPE_FLOAT:
      return Store<float>(m, f, ParseFloating<float>(path, text, f), &R::SetFloat, &R::AddFloat);
    case pb::FieldDescriptor::CPPTYPE_DOUBLE:
      return Store<double>(m, f, ParseFloating<double>(path, text, f), &R::SetDouble,
                           &R::AddDouble);
    case pb::FieldDescriptor::CPPTYPE_BOOL:
      return Store<bool>(m, f, ParseBool(path, text), &R::SetBool, &R::AddBool);
    case pb::FieldDescriptor::CPPTYPE_ENUM:
      return Store<const pb::EnumValueDescriptor*>(m, f, ParseEnum(path, text, f), &R::SetEnum,
                                                   &R::AddEnum);
    case pb::FieldDescriptor::CPPTYPE_STRING:
      return Store<std::string>(m, f, std::string(text), &R::SetString, &R::AddString);
    case pb::FieldDescriptor::CPPTYPE_MESSAGE:
      break;
  }
  return absl::InternalError(absl::StrCat(path, ": cannot set a ", f->type_name(), " field"));
}

absl::Status SetFromText(pb::Message* message, const pb::FieldDescriptor* field,
                         absl::string_view path, absl::string_view text) {
  if (!field->is_repeated()) return StoreScalar(message, field, path, text);
  message->GetReflection()->ClearField(message, field);
  if (text.empty()) return absl::OkStatus();
  const std::vector<absl::string_view> elements = absl::StrSplit(text, ',');
  for (size_t i = 0; i < elements.size(); ++i) {
    absl::Status status =
        StoreScalar(message, field, path, absl::StripAsciiWhitespace(elements[i]));
    if (!status.ok()) {
      return absl::Status(status.code(), absl::StrCat(status.message(), " (element ", i + 1,
                                                      " of the list \"", text, "\")"));
    }
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------
// Validation.

template <typename T>
bool IsFinite(T value) {
  if constexpr (std::is_floating_point_v<T>) {
    return std::isfinite(value);
  } else {
    return true;
  }
}

std::string Show(const std::string& value) {
  return absl::StrCat("\"", absl::CEscape(value), "\"");
}
template <typename T>
std::string Show(T value) {
  return absl::StrCat(value);
}

class Problems {
 public:
  // Adds "PATH = VALUE must be REQUIREMENT" unless ok. Non-finite floats always fail, since
  // a NaN slips through every comparison-based requirement.
  template <typename T>
  void Require(bool ok, absl::string_view path, T value, absl::string_view requirement) {
    if (ok && IsFinite(value)) return;
    std::string what(requirement);
    if (!IsFinite(value)) what = what.empty() ? "finite" : absl::StrCat("finite and ", what);
    list_.push_back(absl::StrCat(path, " = ", Show(value), " must be ", what));
  }
  template <typename T>
  void RequireFinite(absl::string_view path, T value) {
    Require(true, path, value, "");
  }
  void Add(std::string problem) { list_.push_back(std::move(problem)); }

  absl::Status ToStatus() const {
    if (list_.empty()) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrJoin(list_, "\n"));
  }

 private:
  std::vector<std::string> list_;
};

void ValidateModel(const ModelSpec& m, Problems& p) {
  p.Require(m.d_model() > 0, "model.d_model", m.d_model(), "> 0");
  p.Require(m.num_layers() > 0, "model.num_layers", m.num_layers(), "> 0");
  p.Require(m.num_heads() > 0, "model.num_heads", m.num_heads(), "> 0");
  if (m.d_model() > 0 && m.num_heads() > 0) {
    if (m.d_model() % m.num_heads() != 0) {
      p.Add(absl::StrCat("model.d_model = ", m.d_model(),
                         " must be divisible by model.num_heads = ", m.num_heads()));
    } else if ((m.d_model() / m.num_heads()) % 2 != 0) {
      p.Add(absl::StrCat("model.d_model / model.num_heads = ", m.d_model(), " / ", m.num_heads(),
                         " = ", m.d_model() / m.num_heads(),
                         " (the head dimension) must be even: rotary embeddings rotate pairs"));
    }
  }
  p.Require(m.max_seq_len() > 0, "model.max_seq_len", m.max_seq_len(), "> 0");
  p.Require(m.vocab_size() >= 0, "model.vocab_size", m.vocab_size(),
            ">= 0 (0 = take it from the dataset)");
  p.Require(m.dense_hidden_dim() >= 0, "model.dense_hidden_dim", m.dense_hidden_dim(),
            ">= 0 (0 = model.moe.expert_hidden_dim)");
  p.Require(m.norm_eps() > 0, "model.norm_eps", m.norm_eps(), "> 0");
  p.Require(m.rope_theta() > 0, "model.rope_theta", m.rope_theta(), "> 0");
  p.Require(m.init_std() > 0, "model.init_std", m.init_std(), "> 0");

  const MoESpec& moe = m.moe();
  p.Require(moe.num_experts() >= 1, "model.moe.num_experts", moe.num_experts(), ">= 1");
  p.Require(moe.top_k() >= 1 && moe.top_k() <= moe.num_experts(), "model.moe.top_k", moe.top_k(),
            absl::StrCat("in [1, model.moe.num_experts = ", moe.num_experts(), "]"));
  p.Require(moe.expert_hidden_dim() > 0, "model.moe.expert_hidden_dim", moe.expert_hidden_dim(),
            "> 0");
  p.Require(moe.shared_expert_hidden_dim() >= 0, "model.moe.shared_expert_hidden_dim",
            moe.shared_expert_hidden_dim(), ">= 0 (0 = model.moe.expert_hidden_dim)");
  p.Require(moe.capacity_factor() >= 0, "model.moe.capacity_factor", moe.capacity_factor(),
            ">= 0 (0 = dropless)");
  p.Require(moe.aux_loss_coef() >= 0, "model.moe.aux_loss_coef", moe.aux_loss_coef(), ">= 0");
  p.Require(moe.z_loss_coef() >= 0, "model.moe.z_loss_coef", moe.z_loss_coef(), ">= 0");
  p.RequireFinite("model.moe.moe_weight", moe.moe_weight());
  p.RequireFinite("model.moe.shared_expert_weight", moe.shared_expert_weight());
  std::map<int32_t, int> first_index;
  for (int i = 0; i < moe.moe_layers_size(); ++i) {
    const int32_t layer = moe.moe_layers(i);
    const std::string path = absl::StrCat("model.moe.moe_layers[", i, "]");
    p.Require(layer >= 0 && layer < m.num_layers(), path, layer,
              absl::StrCat("in [0, model.num_layers = ", m.num_layers(), ")"));
    const auto [it, inserted] = first_index.emplace(layer, i);
    if (!inserted) {
      p.Add(absl::StrCat(path, " = ", layer, " repeats model.moe.moe_layers[", it->second,
                         "]; list each layer once"));
    }
  }

  const RouterSpec& router = m.router();
  if (router.kind() != RouterSpec::LINEAR) {
    p.Require(router.hidden_dim() > 0, "model.router.hidden_dim", router.hidden_dim(),
              "> 0 when model.router.kind = RECURRENT or MLP (MLP sizes itself from it)");
  }
  p.Require(m.dropout() >= 0 && m.dropout() < 1, "model.dropout", m.dropout(), "in [0, 1)");
  p.Require(router.mlp_hidden_dim() >= 0, "model.router.mlp_hidden_dim", router.mlp_hidden_dim(),
            ">= 0 (0 = match the GRU layer router's parameters)");
  if (router.detach_state() &&
      (router.kind() != RouterSpec::RECURRENT || router.recurrence() != RouterSpec::LAYER)) {
    p.Add("model.router.detach_state = true needs model.router.kind = RECURRENT and "
          "model.router.recurrence = LAYER (only that router passes a state between layers)");
  }
  if (router.kind() == RouterSpec::RECURRENT) {
    p.Require(std::isfinite(router.recurrent_init_std()) && router.recurrent_init_std() >= 0,
              "model.router.recurrent_init_std", router.recurrent_init_std(),
              ">= 0 (0 = fan-in uniform)");
  }
}

void ValidateTraining(const JobSpec& spec, Problems& p) {
  const int num_experts = spec.model().moe().num_experts();
  const int ep = spec.parallel().expert_parallel_size();
  p.Require(ep >= 1, "parallel.expert_parallel_size", ep, ">= 1");
  if (ep >= 1 && num_experts >= 1 && num_experts % ep != 0) {
    p.Add(absl::StrCat("parallel.expert_parallel_size = ", ep,
                       " must divide model.moe.num_experts = ", num_experts,
                       " (every rank holds the same number of experts)"));
  }

  const OptimizerSpec& o = spec.optimizer();
  p.Require(o.lr() > 0 && o.lr() <= kMaxLearningRate, "optimizer.lr", o.lr(),
            absl::StrCat("in (0, ", kMaxLearningRate, "]"));
  p.Require(o.beta1() >= 0 && o.beta1() < 1, "optimizer.beta1", o.beta1(), "in [0, 1)");
  p.Require(o.beta2() >= 0 && o.beta2() < 1, "optimizer.beta2", o.beta2(), "in [0, 1)");
  p.Require(o.eps() > 0, "optimizer.eps", o.eps(), "> 0");
  p.Require(o.weight_decay() >= 0 && o.weight_decay() <= kMaxWeightDecay, "optimizer.weight_decay",
            o.weight_decay(),
            absl::StrCat("in [0, ", kMaxWeightDecay, "] (AdamW shrinks weights by lr x weight_decay a step)"));
  p.Require(o.grad_clip() >= 0, "optimizer.grad_clip", o.grad_clip(), ">= 0 (0 = no clipping)");

  const ScheduleSpec& s = spec.schedule();
  p.Require(s.steps() > 0, "schedule.steps", s.steps(), "> 0");
  p.Require(s.warmup_steps() >= 0 && s.warmup_steps() <= s.steps(), "schedule.warmup_steps",
            s.warmup_steps(), absl::StrCat("in [0, schedule.steps = ", s.steps(), "]"));
  p.Require(s.min_lr_ratio() >= 0 && s.min_lr_ratio() <= 1, "schedule.min_lr_ratio",
            s.min_lr_ratio(), "in [0, 1]");
  p.Require(s.micro_batch_size() > 0 && s.micro_batch_size() <= kMaxBatch,
            "schedule.micro_batch_size", s.micro_batch_size(), absl::StrCat("in [1, ", kMaxBatch, "]"));
  p.Require(s.grad_accum_steps() > 0 && s.grad_accum_steps() <= kMaxBatch,
            "schedule.grad_accum_steps", s.grad_accum_steps(), absl::StrCat("in [1, ", kMaxBatch, "]"));
  const int max_seq_len = spec.model().max_seq_len();
  p.Require(s.seq_len() > 0 && s.seq_len() <= max_seq_len, "schedule.seq_len", s.seq_len(),
            absl::StrCat("in [1, model.max_seq_len = ", max_seq_len, "]"));
  p.Require(s.eval_interval() >= 0, "schedule.eval_interval", s.eval_interval(),
            ">= 0 (0 = only at the end)");
  p.Require(s.eval_batches() > 0 && s.eval_batches() <= kMaxBatch, "schedule.eval_batches",
            s.eval_batches(), absl::StrCat("in [1, ", kMaxBatch, "]"));
}

void ValidateData(const DataSpec& d, Problems& p) {
  p.Require(!d.dataset_dir().empty(), "data.dataset_dir", d.dataset_dir(), "non-empty");
  p.Require(d.val_fraction() > 0 && d.val_fraction() <= 0.5f, "data.val_fraction", d.val_fraction(),
            "in (0, 0.5]");
  const TokenizerSpec& t = d.tokenizer();
  if (t.kind() == TokenizerSpec::BPE) {
    p.Require(t.vocab_size() >= kMinBpeVocab && t.vocab_size() <= kMaxBpeVocab,
              "data.tokenizer.vocab_size", t.vocab_size(),
              absl::StrCat("in [", kMinBpeVocab, ", ", kMaxBpeVocab, "] for BPE"));
    p.Require(t.max_training_chars() > 0, "data.tokenizer.max_training_chars",
              t.max_training_chars(), "> 0 for BPE");
  }
}

void ValidateOutputs(const JobSpec& spec, Problems& p) {
  p.Require(spec.checkpoint().interval() >= 0, "checkpoint.interval", spec.checkpoint().interval(),
            ">= 0 (0 = never)");
  p.Require(spec.checkpoint().keep_last() >= 1, "checkpoint.keep_last",
            spec.checkpoint().keep_last(), ">= 1");
  p.Require(spec.logging().interval() > 0, "logging.interval", spec.logging().interval(), "> 0");
  p.Require(spec.runtime().num_threads() >= 0 && spec.runtime().num_threads() <= kMaxThreads,
            "runtime.num_threads", spec.runtime().num_threads(),
            absl::StrCat("in [0, ", kMaxThreads, "] (0 = every core)"));
  const std::string device_name = absl::AsciiStrToLower(spec.runtime().device());
  absl::string_view device = device_name;
  const bool cuda_index = absl::ConsumePrefix(&device, "cuda:") && !device.empty() &&
                          std::all_of(device.begin(), device.end(), absl::ascii_isdigit);
  p.Require(device_name == "cpu" || device_name == "cuda" || cuda_index, "runtime.device",
            spec.runtime().device(), "\"cpu\", \"cuda\" or \"cuda:N\" (either case)");
  const double collective_timeout = spec.runtime().collective_timeout_seconds();
  p.Require(collective_timeout >= 0 && collective_timeout <= 86400,
            "runtime.collective_timeout_seconds", collective_timeout,
            "in [0, 86400] seconds (0 = no deadline)");
  p.Require(!spec.output_dir().empty(), "output_dir", spec.output_dir(), "non-empty");
}

// The prepared dataset must exist and match the spec, or training would fail late or,
// worse, silently train on tokens from a different tokenizer.
void ValidateDataFiles(const JobSpec& spec, Problems& p) {
  const std::string& dir = spec.data().dataset_dir();
  if (dir.empty()) return;
  const std::string rerun = "run rmoe_prepare_data --job <this spec> first";
  absl::StatusOr<DatasetMeta> meta = ReadDatasetMeta(dir);
  if (!meta.ok()) {
    p.Add(absl::StrCat("data.dataset_dir = ", Show(dir), " is not a prepared dataset (",
                       absl::StrReplaceAll(meta.status().message(), {{"\n", "; "}}), "); ", rerun));
    return;
  }
  const int model_vocab = spec.model().vocab_size();
  if (model_vocab > 0 && model_vocab < meta->vocab_size()) {
    p.Add(absl::StrCat("model.vocab_size = ", model_vocab, " must be 0 (use the dataset's) or >= ",
                       "the dataset's vocab_size = ", meta->vocab_size(), " (", MetaPath(dir),
                       ")"));
  }
  if (!meta->has_tokenizer()) return;
  const TokenizerSpec& want = spec.data().tokenizer();
  const TokenizerSpec& have = meta->tokenizer();
  if (want.kind() != have.kind()) {
    p.Add(absl::StrCat("data.tokenizer.kind = ", TokenizerSpec::Kind_Name(want.kind()),
                       " but the dataset in ", Show(dir), " was prepared with ",
                       TokenizerSpec::Kind_Name(have.kind()), "; ", rerun,
                       " or change data.dataset_dir"));
  } else if (want.kind() == TokenizerSpec::BPE && want.vocab_size() != have.vocab_size()) {
    p.Add(absl::StrCat("data.tokenizer.vocab_size = ", want.vocab_size(), " but the dataset in ",
                       Show(dir), " was prepared with a BPE vocabulary of ", have.vocab_size(),
                       "; ", rerun, " or change data.dataset_dir"));
  }
}

// Writes out every unset field that has a default; see JobSpecToText.
void MakeDefaultsExplicit(pb::Message* message) {
  const pb::Descriptor* type = message->GetDescriptor();
  const pb::Reflection* r = message->GetReflection();
  for (int i = 0; i < type->field_count(); ++i) {
    const pb::FieldDescriptor* f = type->field(i);
    if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE) {
      if (f->is_repeated()) {
        for (int j = 0; j < r->FieldSize(*message, f); ++j) {
          MakeDefaultsExplicit(r->MutableRepeatedMessage(message, f, j));
        }
      } else if (f->containing_oneof() == nullptr) {
        MakeDefaultsExplicit(r->MutableMessage(message, f));
      }
      continue;
    }
    // Setting a oneof member would select it; an unset string without a declared default
    // means "derive it from something else", which an explicit "" would change.
    if (f->is_repeated() || f->containing_oneof() != nullptr || r->HasField(*message, f) ||
        (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_STRING && !f->has_default_value())) {
      continue;
    }
    // Reading an unset field yields its default; writing that text back sets it.
    std::string value;
    pb::TextFormat::PrintFieldValueToString(*message, f, -1, &value);
    pb::TextFormat::ParseFieldValueFromString(value, f, message);
  }
}

}  // namespace

absl::StatusOr<JobSpec> ParseJobSpec(absl::string_view text, absl::string_view source_name) {
  JobSpec spec;
  absl::Status status = ParseTextProto(text, source_name, &spec);
  if (!status.ok()) return status;
  return spec;
}

absl::StatusOr<JobSpec> LoadJobSpec(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFile(path, "job spec");
  if (!text.ok()) return text.status();
  return ParseJobSpec(*text, path);
}

absl::Status ApplyOverride(JobSpec* spec, absl::string_view assignment) {
  const size_t equals = assignment.find('=');
  if (equals == absl::string_view::npos) {
    return absl::InvalidArgumentError(absl::StrCat("override \"", assignment,
                                                   "\" must look like path.to.field=value, e.g. "
                                                   "model.moe.num_experts=16"));
  }
  const absl::string_view path = absl::StripAsciiWhitespace(assignment.substr(0, equals));
  const absl::string_view value = assignment.substr(equals + 1);
  const std::vector<absl::string_view> segments = absl::StrSplit(path, '.');

  // Work on a copy: walking the path creates sub-messages, which a failed override must not
  // leave behind.
  JobSpec updated = *spec;
  pb::Message* message = &updated;
  for (size_t i = 0; i < segments.size(); ++i) {
    const absl::string_view segment = segments[i];
    const pb::Descriptor* type = message->GetDescriptor();
    if (segment.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "override \"", assignment, "\": empty field name in the path \"", path, "\""));
    }
    const pb::FieldDescriptor* field = type->FindFieldByName(std::string(segment));
    if (field == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": unknown field \"", segment, "\" in ",
                                                     type->full_name(), DidYouMean(type, segment),
                                                     "; fields are: ", FieldList(type)));
    }
    const bool is_message = field->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE;
    if (i + 1 < segments.size()) {
      if (!is_message || field->is_repeated()) {
        return absl::InvalidArgumentError(absl::StrCat(
            path, ": \"", segment, "\" is ",
            WithArticle(absl::StrCat(field->is_repeated() ? "repeated " : "", field->type_name())),
            " field, not a message, so it cannot be followed by \".", segments[i + 1], "\""));
      }
      message = message->GetReflection()->MutableMessage(message, field);
      continue;
    }
    if (is_message) {
      const pb::Descriptor* sub = field->message_type();
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": is a message (", sub->full_name(), "); set one of its fields instead, e.g. ",
          path, ".", sub->field_count() > 0 ? sub->field(0)->name() : "", "=..."));
    }
    absl::Status status = SetFromText(message, field, path, value);
    if (!status.ok()) return status;
  }
  *spec = std::move(updated);
  return absl::OkStatus();
}

absl::Status ValidateJobSpec(const JobSpec& spec, const ValidationOptions& options) {
  Problems problems;
  ValidateModel(spec.model(), problems);
  ValidateTraining(spec, problems);
  ValidateData(spec.data(), problems);
  ValidateOutputs(spec, problems);
  if (options.check_data_files) ValidateDataFiles(spec, problems);
  return problems.ToStatus();
}

absl::StatusOr<JobSpec> LoadJobSpecWithOverrides(const std::string& path,
                                                 const std::vector<std::string>& overrides,
                                                 const ValidationOptions& options) {
  absl::StatusOr<JobSpec> spec = LoadJobSpec(path);
  if (!spec.ok()) return spec.status();
  std::vector<std::string> errors;
  for (const std::string& assignment : overrides) {
    absl::Status status = ApplyOverride(&*spec, assignment);
    if (!status.ok()) errors.push_back(absl::StrCat("--set ", assignment, ": ", status.message()));
  }
  if (!errors.empty()) return absl::InvalidArgumentError(absl::StrJoin(errors, "\n"));
  absl::Status status = ValidateJobSpec(*spec, options);
  if (!status.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid job spec ", path, overrides.empty() ? "" : " (with --set overrides)",
                     ":\n", status.message()));
  }
  return spec;
}

absl::Status CheckResumable(const JobSpec& saved, const JobSpec& current) {
  pb::util::MessageDifferencer differencer;
  // An unset field means its default, so "unset" and "set to the default" are the same model.
  differencer.set_message_field_comparison(pb::util::MessageDifferencer::EQUIVALENT);
  // Only initialisation depends on it, and the checkpoint replaces the initial values.
  differencer.IgnoreField(ModelSpec::descriptor()->FindFieldByName("init_std"));
  std::string differences;
  differencer.ReportDifferencesToString(&differences);
  if (differencer.Compare(saved.model(), current.model())) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "the job's model differs from the checkpoint's, and a model's shape cannot change on "
      "resume (optimizer, schedule, parallel layout and data may); differences "
      "(checkpoint -> job), under model.:\n",
      differences));
}

absl::StatusOr<int> ResolveVocabSize(const JobSpec& spec) {
  if (spec.model().vocab_size() > 0) return spec.model().vocab_size();
  absl::StatusOr<DatasetMeta> meta = ReadDatasetMeta(spec.data().dataset_dir());
  if (!meta.ok()) {
    return absl::Status(meta.status().code(),
                        absl::StrCat("model.vocab_size = 0 asks for the dataset's vocabulary "
                                     "size, but: ",
                                     meta.status().message()));
  }
  if (meta->vocab_size() <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(MetaPath(spec.data().dataset_dir()), ": vocab_size = ", meta->vocab_size(),
                     " must be > 0; set model.vocab_size or prepare the dataset again"));
  }
  return meta->vocab_size();
}

std::string JobSpecToText(const JobSpec& spec) {
  JobSpec explicit_spec = spec;
  MakeDefaultsExplicit(&explicit_spec);
  std::string text;
  pb::TextFormat::PrintToString(explicit_spec, &text);
  return text;
}

bool IsMoELayer(const ModelSpec& model, int layer) {
  const auto& layers = model.moe().moe_layers();
  return layers.empty() || std::find(layers.begin(), layers.end(), layer) != layers.end();
}

std::vector<int> MoELayerIndices(const ModelSpec& model) {
  std::vector<int> layers;
  for (int layer = 0; layer < model.num_layers(); ++layer) {
    if (IsMoELayer(model, layer)) layers.push_back(layer);
  }
  return layers;
}

int MlpRouterHiddenDim(const ModelSpec& model) {
  if (model.router().mlp_hidden_dim() > 0) return model.router().mlp_hidden_dim();
  const double r = model.router().hidden_dim(), d = model.d_model(), e = model.moe().num_experts();
  const double layers = std::max<size_t>(MoELayerIndices(model).size(), 1);
  const double gru = r * d + e * r + (6 * r * r + 6 * r) / layers;
  return std::max(1, static_cast<int>(std::lround(gru / (d + 1 + e))));
}

}  // namespace rmoe
