// rmoe_eval: evaluates a saved model or a checkpoint on a prepared dataset's validation
// split, as rmoe_train's evaluation does, and optionally dumps per-position predictions.
#include <cmath>
#include <cstdio>
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

constexpr char kUsage[] = R"(Usage: rmoe_eval --model PATH [--dataset DIR] [options]

Evaluates a model that rmoe_train saved (<output_dir>/model), or the weights of a
checkpoint, on the validation split of a prepared dataset: the mean next-token loss over
the same windows rmoe_train's evaluation reads, in the precision it trained in
(runtime.precision). With the defaults it reproduces the run's last logged val_loss.
Prints the loss (nats/token), perplexity, bits per token and bits per byte (at the
dataset's average bytes per token).

  --model PATH        the saved model directory, or a checkpoint: a step directory
                      (step_<N>) or a checkpoint root (its latest) (required)
  --dataset DIR       a dataset made by rmoe_prepare_data with the model's tokenizer
                      (default: the job's data.dataset_dir)
  --batches N         evaluation batches (default: the job's schedule.eval_batches; fewer
                      when the split has fewer windows, so each counts once)
  --micro-batch B     windows per batch (default: the job's schedule.micro_batch_size)
  --seq-len T         tokens per window (default: the job's schedule.seq_len; at most
                      model.max_seq_len)
  --json PATH         also write the results as JSON
  --dump PATH         write the first window's predictions as JSON: per position the
                      next token, its probability and loss, and the --top most likely
                      tokens with their probabilities and text
  --top K             predictions per position in --dump (default 5)
  --threads N         intra-op threads (default: all cores)
  --help              this text
)";

int Fail(const std::string& message) {
  std::fprintf(stderr, "rmoe_eval: %s\n", message.c_str());
  return 1;
}

struct Options {
  std::string model, dataset, json, dump;
  std::optional<int> batches, micro_batch, seq_len;
  int top = 5, threads = 0;
};

absl::StatusOr<std::optional<Options>> ParseOptions(int argc, char** argv) {
  rmoe::cli::Parser parser;
  parser.Value("--model", "a path").Value("--dataset", "a directory");
  parser.Value("--json", "a path").Value("--dump", "a path");
  for (const char* flag : {"--batches", "--micro-batch", "--seq-len", "--top", "--threads"}) {
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
  if (!top.ok()) return top.status();
  if (!threads.ok()) return threads.status();
  o.top = static_cast<int>(*top);
  o.threads = static_cast<int>(*threads);
  if (o.model.empty()) return absl::InvalidArgumentError("--model PATH is required");
  return std::optional<Options>(std::move(o));
}

// A dataset tokenized differently from the model's training data would be scored with the
// wrong ids: refuse it.
absl::Status CheckSameTokenizer(const rmoe::DatasetMeta& model, const rmoe::DatasetMeta& data,
                                const std::string& dataset_dir) {
  if (model.vocab_size() == data.vocab_size() &&
      model.tokenizer().SerializeAsString() == data.tokenizer().SerializeAsString() &&
      model.document_separator() == data.document_separator()) {
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "the dataset ", dataset_dir, " was tokenized with ", data.tokenizer().ShortDebugString(),
      " (vocabulary ", data.vocab_size(), "), the model's training data with ",
      model.tokenizer().ShortDebugString(), " (vocabulary ", model.vocab_size(),
      "): prepare the text with the model's tokenizer (rmoe_prepare_data --job <its job.pbtxt>)"));
}

// The first window's predictions, position by position.
std::string DumpFirstWindow(rmoe::Transformer& model, const rmoe::EvalSampler& sampler,
                            int top, rmoe::Tokenizer& tokenizer) {
  torch::NoGradGuard no_grad;
  model->eval();
  auto window = torch::empty({1, sampler.seq_len() + 1}, torch::kLong);
  sampler.FillBatch(0, 1, window.data_ptr<int64_t>());
  auto inputs = window.narrow(1, 0, sampler.seq_len());
  auto targets = window.narrow(1, 1, sampler.seq_len()).reshape({-1});
  auto log_probs =
      torch::log_softmax(model->forward(inputs).logits.reshape({sampler.seq_len(), -1}).to(torch::kDouble), -1);
  auto [top_log_probs, top_ids] = log_probs.topk(std::min<int64_t>(top, log_probs.size(1)), -1);
  auto text = [&](int64_t id) {
    auto decoded = tokenizer.Decode(std::vector<int32_t>{static_cast<int32_t>(id)});
    return decoded.ok() ? *decoded : std::string("?");
  };
  std::string positions = "[";
  for (int64_t t = 0; t < sampler.seq_len(); ++t) {
    const int64_t next = targets[t].item<int64_t>();
    const double log_p = log_probs[t][next].item<double>();
    std::vector<std::string> top_json;
    for (int64_t k = 0; k < top_ids.size(1); ++k) {
      const int64_t id = top_ids[t][k].item<int64_t>();
      top_json.push_back(rmoe::JsonObject()
                             .Add("token", id)
                             .Add("text", text(id))
                             .Add("prob", std::exp(top_log_probs[t][k].item<double>()))
                             .str());
    }
    rmoe::JsonObject position;
    position.Add("position", t)
        .Add("token", inputs[0][t].item<int64_t>())
        .Add("next", next)
        .Add("next_text", text(next))
        .Add("next_prob", std::exp(log_p))
        .Add("loss", -log_p)
        .AddRaw("top", "[" + absl::StrJoin(top_json, ",") + "]");
    if (positions.size() > 1) positions += ",";
    positions += position.str();
  }
  return rmoe::JsonObject()
      .Add("window", int64_t{0})
      .Add("first_token", sampler.WindowStart(0))
      .AddRaw("positions", positions + "]")
      .str();
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
  const rmoe::JobSpec& spec = loaded.spec;
  const std::string dataset_dir = o.dataset.empty() ? spec.data().dataset_dir() : o.dataset;
  auto dataset = rmoe::Dataset::Open(dataset_dir);
  if (!dataset.ok()) return Fail(std::string(dataset.status().message()));
  if (auto s = CheckSameTokenizer(loaded.dataset_meta, dataset->meta(), dataset_dir); !s.ok()) {
    return Fail(std::string(s.message()));
  }
  const int seq_len = o.seq_len.value_or(spec.schedule().seq_len());
  if (seq_len > spec.model().max_seq_len()) {
    return Fail(absl::StrCat("--seq-len ", seq_len, " exceeds the model's max_seq_len ",
                             spec.model().max_seq_len()));
  }
  const int micro_batch = o.micro_batch.value_or(spec.schedule().micro_batch_size());
  auto sampler = rmoe::EvalSampler::Create(dataset->val(), seq_len);
  if (!sampler.ok()) return Fail(std::string(sampler.status().message()));
  const int batches =
      rmoe::EvalBatches(o.batches.value_or(spec.schedule().eval_batches()), micro_batch, *sampler);

  const rmoe::LowPrecisionMatmulGuard precision(rmoe::MatmulDtype(spec));
  rmoe::ParallelRuntime one_process;
  const double loss = rmoe::Evaluate(loaded.model, *sampler, micro_batch, seq_len, batches,
                                     one_process);
  const auto& meta = dataset->meta();
  const int64_t tokens = meta.train_tokens() + meta.val_tokens();
  const double bytes_per_token =
      meta.source_bytes() > 0 && tokens > 0 ? static_cast<double>(meta.source_bytes()) / tokens : 0;
  const double bits_per_token = loss / std::log(2.0);
  const double bits_per_byte = bytes_per_token > 0 ? bits_per_token / bytes_per_token : 0;
  std::printf("rmoe_eval: %s on %s: %d batches x %d windows x %d tokens of the validation split\n",
              o.model.c_str(), dataset_dir.c_str(), batches, micro_batch, seq_len);
  std::printf("val loss %.6f nats/token | ppl %.4f | %.4f bits/token", loss, std::exp(loss),
              bits_per_token);
  if (bytes_per_token > 0) {
    std::printf(" | %.4f bits/byte (%.3f bytes/token, the dataset's average)", bits_per_byte,
                bytes_per_token);
  }
  std::printf("\n");

  if (!o.json.empty()) {
    rmoe::JsonObject result;
    result.Add("model", o.model)
        .Add("dataset", dataset_dir)
        .Add("batches", static_cast<int64_t>(batches))
        .Add("micro_batch_size", static_cast<int64_t>(micro_batch))
        .Add("seq_len", static_cast<int64_t>(seq_len))
        .Add("val_loss", loss)
        .Add("val_ppl", std::exp(loss))
        .Add("bits_per_token", bits_per_token)
        .Add("bytes_per_token", bytes_per_token)
        .Add("bits_per_byte", bits_per_byte);
    if (inference->checkpoint_step >= 0) result.Add("checkpoint_step", inference->checkpoint_step);
    if (auto s = rmoe::WriteFileAtomically(o.json, result.str() + "\n"); !s.ok()) {
      return Fail(std::string(s.message()));
    }
  }
  if (!o.dump.empty()) {
    auto tokenizer = rmoe::OpenTokenizer(loaded.dataset_meta, inference->tokenizer_dir);
    if (!tokenizer.ok()) return Fail(std::string(tokenizer.status().message()));
    const std::string dump = DumpFirstWindow(loaded.model, *sampler, o.top, **tokenizer);
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
