// rmoe_eval: evaluates a saved model, a checkpoint or an export on a prepared dataset's
// validation split (as rmoe_train's evaluation does) or on raw text, and optionally dumps
// per-position predictions.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>
#include <absl/strings/str_join.h>
#include <torch/torch.h>

#include "distributed/inference_model.h"
#include "rmoe/data/dataset.h"
#include "rmoe/data/sampler.h"
#include "rmoe/data/subprocess_tokenizer.h"
#include "rmoe/model/layers.h"
#include "rmoe/train/parallel.h"
#include "rmoe/train/trainer.h"
#include "rmoe/util/cli.h"
#include "rmoe/util/files.h"
#include "rmoe/util/json.h"

namespace {

constexpr char kUsage[] = R"(Usage: rmoe_eval --model PATH [--dataset DIR | --text FILE] [options]

Evaluates a model that rmoe_train saved (<output_dir>/model), the weights of a checkpoint,
or an export (rmoe_ckpt export), in the precision it trained in (runtime.precision).
Prints the loss (nats/token), perplexity, bits per token and bits per byte.

On a prepared dataset (the default): the mean next-token loss over the validation split's
windows that rmoe_train's evaluation reads; with the defaults it reproduces the run's last
logged val_loss. Bits per byte use the dataset's average bytes per token.

On raw text (--text): every non-blank line is a document, preceded by the document
separator as in training data, tokenized with the model's tokenizer; the tokens are cut
into consecutive windows of --seq-len predicted tokens (the last may be shorter) and every
token but the first is predicted once. The loss is the mean over those tokens; bits per
byte divide by the text's exact bytes (each separator counts as its newline).

  --model PATH        the saved model directory, a checkpoint (a step directory step_<N>,
                      or a checkpoint root: its latest), or an export folder (required)
  --dataset DIR       a dataset made by rmoe_prepare_data with the model's tokenizer
                      (default: the job's data.dataset_dir; an export has none)
  --text FILE         raw text to evaluate instead of a dataset
  --batches N         evaluation batches (default: the job's schedule.eval_batches; fewer
                      when the split has fewer windows, so each counts once)
  --micro-batch B     windows per batch (default: the job's schedule.micro_batch_size)
  --seq-len T         tokens per window (default: the job's schedule.seq_len; at most
                      model.max_seq_len)
  --json PATH         also write the results as JSON
  --dump PATH         write predictions as JSON: {"windows": [{"window", "tokens" (the
                      window's ids), "positions": [per position the input token, the next
                      token, its probability and loss, and the --top most likely tokens
                      with their probabilities and text]}]}
  --dump-windows N    windows in --dump, from the first (default 1; 0 = every window)
  --top K             predictions per position in --dump (default 5)
  --threads N         intra-op threads (default: all cores)
  --help              this text
)";

int Fail(const std::string& message) {
  std::fprintf(stderr, "rmoe_eval: %s\n", message.c_str());
  return 1;
}

struct Options {
  std::string model, dataset, text, json, dump;
  std::optional<int> batches, micro_batch, seq_len;
  int top = 5, threads = 0, dump_windows = 1;
};

absl::StatusOr<std::optional<Options>> ParseOptions(int argc, char** argv) {
  rmoe::cli::Parser parser;
  parser.Value("--model", "a path").Value("--dataset", "a directory").Value("--text", "a file");
  parser.Value("--json", "a path").Value("--dump", "a path");
  for (const char* flag :
       {"--batches", "--micro-batch", "--seq-len", "--top", "--threads", "--dump-windows"}) {
    parser.Value(flag, "a number");
  }
  auto args = parser.Parse(rmoe::cli::Arguments(argc, argv));
  if (!args.ok()) return args.status();
  if (args->help()) {
    std::fputs(kUsage, stdout);
    return std::optional<Options>();
  }
  constexpr int64_t kMaxInt = std::numeric_limits<int>::max();
  Options o;
  o.model = args->Get("--model");
  o.dataset = args->Get("--dataset");
  o.text = args->Get("--text");
  o.json = args->Get("--json");
  o.dump = args->Get("--dump");
  for (auto [flag, target] : {std::pair{"--batches", &o.batches},
                              std::pair{"--micro-batch", &o.micro_batch},
                              std::pair{"--seq-len", &o.seq_len}}) {
    if (!args->Has(flag)) continue;
    auto value = args->Int(flag, 0, 1, kMaxInt);
    if (!value.ok()) return value.status();
    *target = static_cast<int>(*value);
  }
  auto top = args->Int("--top", o.top, 1, kMaxInt);
  auto threads = args->Int("--threads", 0, 0, kMaxInt);
  auto dump_windows = args->Int("--dump-windows", o.dump_windows, 0, kMaxInt);
  for (const absl::Status& s : {top.status(), threads.status(), dump_windows.status()}) {
    if (!s.ok()) return s;
  }
  o.top = static_cast<int>(*top);
  o.threads = static_cast<int>(*threads);
  o.dump_windows = static_cast<int>(*dump_windows);
  if (o.model.empty()) return absl::InvalidArgumentError("--model PATH is required");
  if (!o.dataset.empty() && !o.text.empty()) {
    return absl::InvalidArgumentError("give --dataset DIR or --text FILE, not both");
  }
  return std::optional<Options>(std::move(o));
}

// A dataset tokenized differently from the model's training data would be scored with the
// wrong ids: refuse it. The same kind, vocabulary and separator, and for BPE the same
// SentencePiece model.
absl::Status CheckSameTokenizer(const rmoe::DatasetMeta& model, const std::string& model_dir,
                                const rmoe::DatasetMeta& data, const std::string& dataset_dir) {
  bool same = model.vocab_size() == data.vocab_size() &&
              model.tokenizer().kind() == data.tokenizer().kind() &&
              model.document_separator() == data.document_separator();
  if (same && model.tokenizer().kind() == rmoe::TokenizerSpec::BPE) {
    auto ours = rmoe::ReadFile(model_dir + "/tokenizer.model", "SentencePiece model");
    auto theirs = rmoe::ReadFile(dataset_dir + "/tokenizer.model", "SentencePiece model");
    if (!ours.ok()) return ours.status();
    if (!theirs.ok()) return theirs.status();
    same = *ours == *theirs;
  }
  if (same) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "the dataset ", dataset_dir, " was tokenized with ", data.tokenizer().ShortDebugString(),
      " (vocabulary ", data.vocab_size(), "), not with the model's tokenizer ",
      model.tokenizer().ShortDebugString(), " (vocabulary ", model.vocab_size(),
      "): prepare the text with the model's tokenizer, or evaluate it with --text"));
}

// Raw text as windows: documents each preceded by the separator, cut into windows of up to
// seq_len + 1 tokens that overlap by one, so every token but the first is predicted once.
struct TextWindows {
  std::vector<std::vector<int64_t>> windows;
  int64_t predicted_tokens = 0;
  int64_t predicted_bytes = 0;  // the documents' bytes and one per separator after the first
};

absl::StatusOr<TextWindows> ReadTextWindows(const std::string& path, const rmoe::Tokenizer& tokenizer,
                                            int seq_len) {
  std::vector<std::string> documents;
  int64_t file_bytes = 0;
  if (auto s = rmoe::ReadTextDocuments(path, &documents, &file_bytes); !s.ok()) return s;
  if (documents.empty()) return absl::InvalidArgumentError(absl::StrCat(path, " has no text"));
  auto encoded = tokenizer.EncodeBatch(documents);
  if (!encoded.ok()) return encoded.status();
  TextWindows text;
  std::vector<int64_t> tokens;
  for (size_t d = 0; d < documents.size(); ++d) {
    tokens.push_back(tokenizer.document_separator());
    tokens.insert(tokens.end(), (*encoded)[d].begin(), (*encoded)[d].end());
    text.predicted_bytes += static_cast<int64_t>(documents[d].size()) + (d > 0 ? 1 : 0);
  }
  text.predicted_tokens = static_cast<int64_t>(tokens.size()) - 1;
  for (size_t start = 0; start + 1 < tokens.size(); start += seq_len) {
    const size_t end = std::min(tokens.size(), start + seq_len + 1);
    text.windows.emplace_back(tokens.begin() + start, tokens.begin() + end);
  }
  return text;
}

// Per-position log-probabilities of each next token of `window` ([T] fp64) and the full
// log-softmax ([T, V] fp64).
std::pair<torch::Tensor, torch::Tensor> WindowLogProbs(rmoe::Transformer& model,
                                                       const std::vector<int64_t>& window) {
  const int64_t t = static_cast<int64_t>(window.size()) - 1;
  auto ids = torch::tensor(window, torch::kLong).unsqueeze(0);
  auto logits = model->forward(ids.narrow(1, 0, t)).logits.reshape({t, -1});
  auto log_probs = torch::log_softmax(logits.to(torch::kDouble), -1);
  auto targets = ids.narrow(1, 1, t).reshape({t, 1});
  return {log_probs.gather(1, targets).reshape({t}), log_probs};
}

// The summed loss of every window, in batches of equally long windows.
double TextLossSum(rmoe::Transformer& model, const TextWindows& text, int micro_batch) {
  torch::NoGradGuard no_grad;
  model->eval();
  double total = 0;
  for (size_t first = 0; first < text.windows.size();) {
    size_t last = first;
    while (last < text.windows.size() && last - first < static_cast<size_t>(micro_batch) &&
           text.windows[last].size() == text.windows[first].size()) {
      ++last;
    }
    const int64_t rows = static_cast<int64_t>(last - first);
    const int64_t length = static_cast<int64_t>(text.windows[first].size());
    auto batch = torch::empty({rows, length}, torch::kLong);
    for (int64_t r = 0; r < rows; ++r) {
      std::copy(text.windows[first + r].begin(), text.windows[first + r].end(),
                batch.data_ptr<int64_t>() + r * length);
    }
    auto logits = model->forward(batch.narrow(1, 0, length - 1)).logits;
    auto losses = torch::cross_entropy_loss(logits.reshape({-1, logits.size(-1)}).to(torch::kDouble),
                                            batch.narrow(1, 1, length - 1).reshape({-1}),
                                            {}, at::Reduction::Sum);
    total += losses.item<double>();
    first = last;
  }
  return total;
}

// Every position of `windows`: the next token, its probability and loss, the `top` most
// likely tokens.
std::string DumpWindows(rmoe::Transformer& model, const std::vector<std::vector<int64_t>>& windows,
                        int top, rmoe::Tokenizer& tokenizer) {
  torch::NoGradGuard no_grad;
  model->eval();
  auto text = [&](int64_t id) {
    auto decoded = tokenizer.Decode(std::vector<int32_t>{static_cast<int32_t>(id)});
    return decoded.ok() ? *decoded : std::string("?");
  };
  std::vector<std::string> records;
  for (size_t w = 0; w < windows.size(); ++w) {
    const auto& window = windows[w];
    auto [next_log_probs, log_probs] = WindowLogProbs(model, window);
    auto [top_log_probs, top_ids] = log_probs.topk(std::min<int64_t>(top, log_probs.size(1)), -1);
    std::vector<std::string> positions;
    for (int64_t t = 0; t + 1 < static_cast<int64_t>(window.size()); ++t) {
      std::vector<std::string> top_json;
      for (int64_t k = 0; k < top_ids.size(1); ++k) {
        const int64_t id = top_ids[t][k].item<int64_t>();
        top_json.push_back(rmoe::JsonObject()
                               .Add("token", id)
                               .Add("text", text(id))
                               .Add("prob", std::exp(top_log_probs[t][k].item<double>()))
                               .str());
      }
      const double log_p = next_log_probs[t].item<double>();
      positions.push_back(rmoe::JsonObject()
                              .Add("position", t)
                              .Add("token", window[t])
                              .Add("next", window[t + 1])
                              .Add("next_text", text(window[t + 1]))
                              .Add("next_prob", std::exp(log_p))
                              .Add("loss", -log_p)
                              .AddRaw("top", "[" + absl::StrJoin(top_json, ",") + "]")
                              .str());
    }
    records.push_back(rmoe::JsonObject()
                          .Add("window", static_cast<int64_t>(w))
                          .Add("tokens", window)
                          .AddRaw("positions", "[" + absl::StrJoin(positions, ",\n") + "]")
                          .str());
  }
  return rmoe::JsonObject().AddRaw("windows", "[" + absl::StrJoin(records, ",\n") + "]").str();
}

struct Result {
  std::string source;  // what was evaluated, for the report
  double loss = 0;
  double bytes_per_token = 0;  // 0: unknown
  bool exact_bytes = false;    // raw text: the bytes are counted, not averaged
  std::vector<std::vector<int64_t>> dump_windows;
  rmoe::JsonObject json;
};

absl::StatusOr<Result> EvaluateDataset(const Options& o, rmoe::distributed::InferenceModel& inference) {
  rmoe::LoadedModel& loaded = inference.loaded;
  const rmoe::JobSpec& spec = loaded.spec;
  const std::string dataset_dir = o.dataset.empty() ? spec.data().dataset_dir() : o.dataset;
  if (dataset_dir.empty()) {
    return absl::InvalidArgumentError(
        "this model comes without a dataset (an export): give --dataset DIR or --text FILE");
  }
  auto dataset = rmoe::Dataset::Open(dataset_dir);
  if (!dataset.ok()) return dataset.status();
  if (auto s = CheckSameTokenizer(loaded.dataset_meta, inference.tokenizer_dir, dataset->meta(),
                                  dataset_dir);
      !s.ok()) {
    return s;
  }
  const int seq_len = o.seq_len.value_or(spec.schedule().seq_len());
  const int micro_batch = o.micro_batch.value_or(spec.schedule().micro_batch_size());
  auto sampler = rmoe::EvalSampler::Create(dataset->val(), seq_len);
  if (!sampler.ok()) return sampler.status();
  const int batches =
      rmoe::EvalBatches(o.batches.value_or(spec.schedule().eval_batches()), micro_batch, *sampler);
  rmoe::ParallelRuntime one_process;
  Result r;
  r.loss = rmoe::Evaluate(loaded.model, *sampler, micro_batch, seq_len, batches, one_process);
  const auto& meta = dataset->meta();
  const int64_t tokens = meta.train_tokens() + meta.val_tokens();
  r.bytes_per_token =
      meta.source_bytes() > 0 && tokens > 0 ? static_cast<double>(meta.source_bytes()) / tokens : 0;
  r.source = absl::StrCat(dataset_dir, ": ", batches, " batches x ", micro_batch, " windows x ",
                          seq_len, " tokens of the validation split");
  r.json.Add("dataset", dataset_dir)
      .Add("batches", static_cast<int64_t>(batches))
      .Add("micro_batch_size", static_cast<int64_t>(micro_batch))
      .Add("seq_len", static_cast<int64_t>(seq_len));
  const int windows = o.dump_windows == 0 ? batches * micro_batch : o.dump_windows;
  for (int w = 0; w < std::min(windows, sampler->num_windows()); ++w) {
    std::vector<int64_t> window(seq_len + 1);
    sampler->FillBatch(w, 1, window.data());
    r.dump_windows.push_back(std::move(window));
  }
  return r;
}

absl::StatusOr<Result> EvaluateText(const Options& o, rmoe::distributed::InferenceModel& inference,
                                    rmoe::Tokenizer& tokenizer) {
  const rmoe::JobSpec& spec = inference.loaded.spec;
  const int seq_len = o.seq_len.value_or(spec.schedule().seq_len());
  auto text = ReadTextWindows(o.text, tokenizer, seq_len);
  if (!text.ok()) return text.status();
  Result r;
  const int micro_batch = o.micro_batch.value_or(spec.schedule().micro_batch_size());
  r.loss = TextLossSum(inference.loaded.model, *text, micro_batch) / text->predicted_tokens;
  r.bytes_per_token = static_cast<double>(text->predicted_bytes) / text->predicted_tokens;
  r.exact_bytes = true;
  r.source = absl::StrCat("text ", o.text, ": ", text->predicted_tokens, " tokens (",
                          text->predicted_bytes, " bytes) in ", text->windows.size(),
                          " windows of up to ", seq_len);
  r.json.Add("text", o.text)
      .Add("windows", static_cast<int64_t>(text->windows.size()))
      .Add("seq_len", static_cast<int64_t>(seq_len))
      .Add("tokens", text->predicted_tokens)
      .Add("bytes", text->predicted_bytes);
  const size_t windows = o.dump_windows == 0 ? text->windows.size() : o.dump_windows;
  for (size_t w = 0; w < std::min(windows, text->windows.size()); ++w) {
    r.dump_windows.push_back(text->windows[w]);
  }
  return r;
}

}  // namespace

int Run(int argc, char** argv) {
  auto parsed = ParseOptions(argc, argv);
  if (!parsed.ok()) return Fail(absl::StrCat(parsed.status().message(), " (see --help)"));
  if (!parsed->has_value()) return 0;  // --help
  const Options& o = **parsed;
  if (o.threads > 0) torch::set_num_threads(o.threads);

  auto inference = rmoe::distributed::LoadModelForInference(o.model);
  if (!inference.ok()) return Fail(std::string(inference.status().message()));
  rmoe::LoadedModel& loaded = inference->loaded;
  const int seq_len = o.seq_len.value_or(loaded.spec.schedule().seq_len());
  if (seq_len > loaded.spec.model().max_seq_len()) {
    return Fail(absl::StrCat("--seq-len ", seq_len, " exceeds the model's max_seq_len ",
                             loaded.spec.model().max_seq_len()));
  }
  std::unique_ptr<rmoe::Tokenizer> tokenizer;
  if (!o.text.empty() || !o.dump.empty()) {
    auto opened = rmoe::OpenTokenizer(loaded.dataset_meta, inference->tokenizer_dir);
    if (!opened.ok()) return Fail(std::string(opened.status().message()));
    tokenizer = *std::move(opened);
  }
  const rmoe::LowPrecisionMatmulGuard precision(rmoe::MatmulDtype(loaded.spec));
  auto result = o.text.empty() ? EvaluateDataset(o, *inference) : EvaluateText(o, *inference, *tokenizer);
  if (!result.ok()) return Fail(std::string(result.status().message()));
  const double loss = result->loss;
  const double bits_per_token = loss / std::log(2.0);
  const double bits_per_byte =
      result->bytes_per_token > 0 ? bits_per_token / result->bytes_per_token : 0;
  std::printf("rmoe_eval: %s on %s\n", o.model.c_str(), result->source.c_str());
  std::printf("%s %.6f nats/token | ppl %.4f | %.4f bits/token",
              o.text.empty() ? "val loss" : "loss", loss, std::exp(loss), bits_per_token);
  if (result->bytes_per_token > 0) {
    std::printf(" | %.4f bits/byte (%.3f bytes/token%s)", bits_per_byte, result->bytes_per_token,
                result->exact_bytes ? "" : ", the dataset's average");
  }
  std::printf("\n");

  if (!o.json.empty()) {
    rmoe::JsonObject& json = result->json;
    json.Add("model", o.model)
        .Add(o.text.empty() ? "val_loss" : "loss", loss)
        .Add(o.text.empty() ? "val_ppl" : "ppl", std::exp(loss))
        .Add("bits_per_token", bits_per_token)
        .Add("bytes_per_token", result->bytes_per_token)
        .Add("bits_per_byte", bits_per_byte);
    if (inference->checkpoint_step >= 0) json.Add("checkpoint_step", inference->checkpoint_step);
    if (auto s = rmoe::WriteFileAtomically(o.json, json.str() + "\n"); !s.ok()) {
      return Fail(std::string(s.message()));
    }
  }
  if (!o.dump.empty()) {
    const std::string dump = DumpWindows(loaded.model, result->dump_windows, o.top, *tokenizer);
    if (auto s = rmoe::WriteFileAtomically(o.dump, dump + "\n"); !s.ok()) {
      return Fail(std::string(s.message()));
    }
  }
  return 0;
}

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "rmoe_eval: %s\n", e.what_without_backtrace());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rmoe_eval: %s\n", e.what());
  }
  return 1;
}
