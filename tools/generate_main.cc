// rmoe_generate: samples text from a model saved by rmoe_train, or from a checkpoint.
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include <absl/strings/str_cat.h>
#include <torch/torch.h>

#include "distributed/checkpoint.h"
#include "rmoe/data/dataset.h"
#include "rmoe/data/subprocess_tokenizer.h"
#include "rmoe/model/generation.h"
#include "rmoe/train/model_io.h"

namespace {
namespace fs = std::filesystem;

constexpr char kUsage[] = R"(Usage: rmoe_generate --model PATH [--prompt TEXT] [options]

Continues a prompt with a model that rmoe_train saved (<output_dir>/model), or with the
weights of a checkpoint, using the KV cache (and the token-recurrent router's cached state).

  --model PATH           the saved model directory, or a checkpoint: a step directory
                         (step_<N>) or a checkpoint root (its latest), whatever layout
                         saved it (required)
  --prompt TEXT          text to continue (default: start a new document)
  --max-new-tokens N     tokens to generate (default 200; stops at model.max_seq_len)
  --temperature T        softmax temperature; 0 = greedy (default 0.8)
  --top-k K              sample among the K most likely tokens; 0 = all (default 0)
  --top-p P              nucleus sampling: the smallest set with probability >= P (default 0.95)
  --seed S               the same seed gives the same text (default 0)
  --threads N            intra-op threads (default: all cores)
  --help                 this text
)";

int Fail(const std::string& message) {
  std::fprintf(stderr, "rmoe_generate: %s\n", message.c_str());
  return 1;
}

// The model of a checkpoint: built from the job spec in its manifest (model.vocab_size is
// resolved there), every "model/..." tensor read in full (checksums verified), and the
// tokenizer's metadata from the copies in the step directory, or else from the job's
// data.dataset_dir. Not collective: no MPI.
absl::StatusOr<rmoe::LoadedModel> LoadCheckpointModel(const std::string& path,
                                                      std::string* tokenizer_dir) {
  auto dir = rmoe::distributed::ResolveCheckpoint(path);
  if (!dir.ok()) {
    if (!absl::IsNotFound(dir.status())) return dir.status();
    return absl::NotFoundError(absl::StrCat(path, " is neither a saved model directory (job.pbtxt, "
                                            "model.pt) nor a checkpoint: ", dir.status().message()));
  }
  auto manifest = rmoe::distributed::ReadManifest(*dir);
  if (!manifest.ok()) return manifest.status();
  rmoe::LoadedModel loaded;
  loaded.spec = manifest->job();
  if (loaded.spec.model().vocab_size() <= 0) {
    return absl::DataLossError(absl::StrCat("the job spec in ", *dir,
                                            "/manifest.pb has no resolved model.vocab_size"));
  }
  loaded.model = rmoe::Transformer(loaded.spec.model());
  loaded.model->eval();
  std::vector<rmoe::distributed::ShardedTensor> tensors;
  for (auto& item : loaded.model->named_parameters()) {
    rmoe::distributed::ShardedTensor t;
    t.name = "model/" + item.key();
    t.local = item.value().detach();
    t.global_shape = item.value().sizes().vec();
    tensors.push_back(std::move(t));
  }
  {
    torch::NoGradGuard no_grad;
    if (auto status = rmoe::distributed::LoadTensors(*dir, *manifest, tensors); !status.ok())
      return status;
  }
  // Checkpoints hold copies of the dataset's meta.pbtxt (and tokenizer.model for BPE);
  // older ones do not: then the dataset the job was trained on.
  *tokenizer_dir = fs::exists(fs::path(*dir) / "meta.pbtxt") ? *dir : loaded.spec.data().dataset_dir();
  auto meta = rmoe::ReadDatasetMeta(*tokenizer_dir);
  if (!meta.ok()) {
    return absl::Status(meta.status().code(),
                        absl::StrCat(meta.status().message(), " (the checkpoint ", *dir,
                                     " has no copy of the dataset's meta.pbtxt, so the tokenizer "
                                     "is looked for in its job's data.dataset_dir)"));
  }
  loaded.dataset_meta = *std::move(meta);
  std::fprintf(stderr, "rmoe_generate: the weights of checkpoint %s (step %lld)\n", dir->c_str(),
               static_cast<long long>(manifest->step()));
  return loaded;
}

// A saved model directory has job.pbtxt; anything else that is a directory is taken for a
// checkpoint (a missing path gets LoadModel's message).
bool IsCheckpointPath(const std::string& path) {
  std::error_code ec;
  return fs::is_directory(path, ec) && !fs::exists(fs::path(path) / "job.pbtxt", ec) &&
         !fs::exists(fs::path(path) / "model.pt", ec);
}

bool ParseNumber(const char* text, double* out) {
  char* end = nullptr;
  *out = std::strtod(text, &end);
  return end != text && *end == '\0';
}

}  // namespace

int Run(int argc, char** argv) {
  std::string model_dir, prompt;  // model_dir: a model directory or a checkpoint
  bool has_prompt = false;
  rmoe::SamplingOptions options;
  options.temperature = 0.8;
  options.top_p = 0.95;
  int threads = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (i + 1 >= argc) return Fail("unknown or incomplete argument \"" + arg + "\" (see --help)");
    const char* value = argv[++i];
    double number = 0;
    const bool numeric = ParseNumber(value, &number);
    if (arg == "--model") {
      model_dir = value;
    } else if (arg == "--prompt") {
      prompt = value;
      has_prompt = true;
    } else if (!numeric) {
      return Fail(arg + " needs a number, got \"" + value + "\" (see --help)");
    } else if (arg == "--max-new-tokens" && number >= 0) {
      options.max_new_tokens = static_cast<int>(number);
    } else if (arg == "--temperature" && number >= 0) {
      options.temperature = number;
    } else if (arg == "--top-k" && number >= 0) {
      options.top_k = static_cast<int>(number);
    } else if (arg == "--top-p" && number > 0 && number <= 1) {
      options.top_p = number;
    } else if (arg == "--seed" && number >= 0) {
      options.seed = static_cast<uint64_t>(number);
    } else if (arg == "--threads" && number >= 0) {
      threads = static_cast<int>(number);
    } else {
      return Fail("bad value " + std::string(value) + " for " + arg +
                  " (see --help for arguments and their ranges)");
    }
  }
  if (model_dir.empty()) return Fail("--model PATH is required (see --help)");
  if (threads > 0) torch::set_num_threads(threads);

  std::string tokenizer_dir = model_dir;
  absl::StatusOr<rmoe::LoadedModel> loaded =
      IsCheckpointPath(model_dir) ? LoadCheckpointModel(model_dir, &tokenizer_dir)
                                  : rmoe::LoadModel(model_dir);
  if (!loaded.ok()) return Fail(std::string(loaded.status().message()));
  auto tokenizer = rmoe::OpenTokenizer(loaded->dataset_meta, tokenizer_dir);
  if (!tokenizer.ok()) return Fail(std::string(tokenizer.status().message()));

  std::vector<int64_t> prompt_ids;
  if (has_prompt && !prompt.empty()) {
    auto ids = (*tokenizer)->Encode(prompt);
    if (!ids.ok()) return Fail(std::string(ids.status().message()));
    prompt_ids.assign(ids->begin(), ids->end());
  } else {
    prompt_ids.push_back((*tokenizer)->document_separator());  // the start of a document
  }
  auto generated = rmoe::Generate(loaded->model, prompt_ids, options);
  if (!generated.ok()) return Fail(std::string(generated.status().message()));
  std::vector<int32_t> output_ids(generated->begin(), generated->end());
  auto text = (*tokenizer)->Decode(output_ids);
  if (!text.ok()) return Fail(std::string(text.status().message()));
  std::printf("%s%s\n", prompt.c_str(), text->c_str());
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
