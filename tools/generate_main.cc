// rmoe_generate: samples text from a model saved by rmoe_train, a checkpoint or an export.
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <absl/strings/str_cat.h>
#include <torch/torch.h>

#include "distributed/inference_model.h"
#include "rmoe/data/dataset.h"
#include "rmoe/data/subprocess_tokenizer.h"
#include "rmoe/model/generation.h"
#include "rmoe/train/model_io.h"
#include "rmoe/util/cli.h"
#include "rmoe/util/files.h"
#include "rmoe/util/json.h"

namespace {

constexpr char kUsage[] = R"(Usage: rmoe_generate --model PATH [--prompt TEXT] [options]

Continues a prompt with a model that rmoe_train saved (<output_dir>/model), the weights
of a checkpoint, or an export (rmoe_ckpt export), using the KV cache (and the
token-recurrent router's cached state).

  --model PATH           the saved model directory, a checkpoint (a step directory
                         step_<N>, or a checkpoint root: its latest), whatever layout
                         saved it, or an export folder (required)
  --prompt TEXT          text to continue (default: start a new document)
  --max-new-tokens N     tokens to generate (default 200; stops at model.max_seq_len)
  --temperature T        softmax temperature; 0 = greedy (default 0.8)
  --top-k K              sample among the K most likely tokens; 0 = all (default 0)
  --top-p P              nucleus sampling: the smallest set with probability >= P (default 0.95)
  --seed S               the same seed gives the same text (default 0)
  --threads N            intra-op threads (default: all cores)
  --json PATH            also write {"prompt_ids", "generated_ids", "continuation"} as JSON
                         (the ids the model saw and produced, for comparing implementations)
  --help                 this text
)";

int Fail(const std::string& message) {
  std::fprintf(stderr, "rmoe_generate: %s\n", message.c_str());
  return 1;
}

struct Options {
  std::string model_dir;  // a model directory or a checkpoint
  std::string prompt;
  std::string json;
  rmoe::SamplingOptions sampling;
  int threads = 0;
};

// The options, or a usage error. --help prints the usage here and yields no options.
absl::StatusOr<std::optional<Options>> ParseOptions(int argc, char** argv) {
  rmoe::cli::Parser parser;
  parser.Value("--model", "a path").Value("--prompt", "a text").Value("--json", "a path");
  for (const char* flag : {"--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed",
                           "--threads"}) {
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
  o.model_dir = args->Get("--model");
  o.prompt = args->Get("--prompt");
  o.json = args->Get("--json");
  auto max_new = args->Int("--max-new-tokens", o.sampling.max_new_tokens, 0, kMaxInt);
  auto temperature = args->Number("--temperature", 0.8, {0});
  auto top_k = args->Int("--top-k", o.sampling.top_k, 0, kMaxInt);
  auto top_p = args->Number("--top-p", 0.95, {0, 1, /*min_exclusive=*/true});
  auto seed = args->Int("--seed", static_cast<int64_t>(o.sampling.seed), 0);
  auto threads = args->Int("--threads", 0, 0, kMaxInt);
  for (const absl::Status& s : {max_new.status(), temperature.status(), top_k.status(),
                                top_p.status(), seed.status(), threads.status()}) {
    if (!s.ok()) return s;
  }
  o.sampling.max_new_tokens = static_cast<int>(*max_new);
  o.sampling.temperature = *temperature;
  o.sampling.top_k = static_cast<int>(*top_k);
  o.sampling.top_p = *top_p;
  o.sampling.seed = static_cast<uint64_t>(*seed);
  o.threads = static_cast<int>(*threads);
  if (o.model_dir.empty()) return absl::InvalidArgumentError("--model PATH is required");
  return std::optional<Options>(std::move(o));
}

}  // namespace

int Run(int argc, char** argv) {
  auto parsed = ParseOptions(argc, argv);
  if (!parsed.ok()) return Fail(absl::StrCat(parsed.status().message(), " (see --help)"));
  if (!parsed->has_value()) return 0;  // --help
  const Options& o = **parsed;
  const std::string& model_dir = o.model_dir;
  const std::string& prompt = o.prompt;
  if (o.threads > 0) torch::set_num_threads(o.threads);

  auto inference = rmoe::distributed::LoadModelForInference(model_dir);
  if (!inference.ok()) return Fail(std::string(inference.status().message()));
  if (inference->checkpoint_step >= 0) {
    std::fprintf(stderr, "rmoe_generate: the weights of checkpoint %s (step %lld)\n",
                 inference->checkpoint_dir.c_str(),
                 static_cast<long long>(inference->checkpoint_step));
  }
  rmoe::LoadedModel* loaded = &inference->loaded;
  auto tokenizer = rmoe::OpenTokenizer(loaded->dataset_meta, inference->tokenizer_dir);
  if (!tokenizer.ok()) return Fail(std::string(tokenizer.status().message()));

  std::vector<int64_t> prompt_ids;
  if (!prompt.empty()) {
    auto ids = (*tokenizer)->Encode(prompt);
    if (!ids.ok()) return Fail(std::string(ids.status().message()));
    prompt_ids.assign(ids->begin(), ids->end());
  } else {
    prompt_ids.push_back((*tokenizer)->document_separator());  // the start of a document
  }
  auto generated = rmoe::Generate(loaded->model, prompt_ids, o.sampling);
  if (!generated.ok()) return Fail(std::string(generated.status().message()));
  // Without a prompt the separator that starts the document is no text of the user's.
  std::vector<int32_t> context;
  if (!prompt.empty()) context.assign(prompt_ids.begin(), prompt_ids.end());
  auto continuation = rmoe::DecodeContinuation(
      **tokenizer, context, std::vector<int32_t>(generated->begin(), generated->end()));
  if (!continuation.ok()) return Fail(std::string(continuation.status().message()));
  std::printf("%s%s\n", prompt.c_str(), continuation->c_str());
  if (!o.json.empty()) {
    const std::string json = rmoe::JsonObject()
                                 .Add("prompt_ids", prompt_ids)
                                 .Add("generated_ids", *generated)
                                 .Add("continuation", *continuation)
                                 .str();
    if (auto s = rmoe::WriteFileAtomically(o.json, json + "\n"); !s.ok()) {
      return Fail(std::string(s.message()));
    }
  }
  return 0;
}

int main(int argc, char** argv) {
  // Torch reports shape and runtime errors as exceptions; turn them into a message and a
  // non-zero exit instead of an abort with a stack dump.
  try {
    return Run(argc, argv);
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "rmoe_generate: %s\n", e.what_without_backtrace());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rmoe_generate: %s\n", e.what());
  }
  return 1;
}
