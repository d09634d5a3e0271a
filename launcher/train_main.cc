// rmoe_train: trains the model a job spec describes.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <absl/strings/str_format.h>

#include "launcher/job_spec.h"
#include "rmoe/train/progress.h"
#include "rmoe/train/trainer.h"

namespace {

constexpr char kUsage[] = R"(Usage: rmoe_train --job SPEC.pbtxt [--set FIELD=VALUE]... [options]

Trains an RMoE language model as the job spec (protobuf text format, see
proto/job.proto and configs/) describes, evaluates it and saves it to
<output_dir>/model, where rmoe_generate can load it.

  --job PATH          the job spec (required)
  --set FIELD=VALUE   override one spec field, e.g. --set model.moe.num_experts=16,
                      --set model.router.kind=LINEAR, --set model.moe.moe_layers=1,3
                      (repeatable; applied in order, then the spec is validated)
  --dry-run           print the resolved spec and parameter counts, train nothing
  --quiet             no progress output
  --help              this text

The dataset (data.dataset_dir) must exist: run rmoe_prepare_data --job SPEC first.
Metrics go to <output_dir>/metrics.jsonl (one JSON record per logging step).
Exit status: 0 done, 2 bad arguments or job spec, 1 failure while training.
)";

int Fail(int code, const std::string& message) {
  std::fprintf(stderr, "rmoe_train: %s\n", message.c_str());
  return code;
}

}  // namespace

int Run(int argc, char** argv) {
  std::string job_path;
  std::vector<std::string> overrides;
  bool dry_run = false, quiet = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
    if (arg == "--help" || arg == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    } else if (arg == "--job") {
      const char* v = value();
      if (!v) return Fail(2, "--job needs a path");
      job_path = v;
    } else if (arg == "--set") {
      const char* v = value();
      if (!v) return Fail(2, "--set needs FIELD=VALUE");
      overrides.push_back(v);
    } else if (arg == "--dry-run") {
      dry_run = true;
    } else if (arg == "--quiet") {
      quiet = true;
    } else {
      return Fail(2, "unknown argument \"" + arg + "\" (see --help)");
    }
  }
  if (job_path.empty()) return Fail(2, "--job SPEC.pbtxt is required (see --help)");

  auto spec = rmoe::LoadJobSpecWithOverrides(job_path, overrides);
  if (!spec.ok()) return Fail(2, std::string(spec.status().message()));

  if (dry_run) {
    auto vocab = rmoe::ResolveVocabSize(*spec);
    if (!vocab.ok()) return Fail(2, std::string(vocab.status().message()));
    spec->mutable_model()->set_vocab_size(*vocab);
    rmoe::Transformer model(spec->model());
    const auto counts = model->CountParameters();
    std::printf("%s", rmoe::JobSpecToText(*spec).c_str());
    std::printf("# parameters: %lld total, %lld active per token, %lld in experts\n",
                static_cast<long long>(counts.total), static_cast<long long>(counts.active),
                static_cast<long long>(counts.expert));
    return 0;
  }

  rmoe::TrainOptions options;
  options.quiet = quiet;
  auto summary = rmoe::Train(*spec, options);
  if (!summary.ok()) return Fail(1, std::string(summary.status().message()));
  std::printf(
      "done: %d steps in %s, %.0f tokens/s on %d threads; final val loss %.4f nats/token "
      "(ppl %.2f), best %.4f\nmodel saved to %s\n",
      summary->steps, rmoe::FormatDuration(summary->wall_seconds).c_str(),
      summary->tokens_per_second, summary->threads, summary->final_val_loss,
      std::exp(summary->final_val_loss), summary->best_val_loss, summary->model_dir.c_str());
  return 0;
}

int main(int argc, char** argv) {
  // Torch reports shape and runtime errors as exceptions; turn them into a message and a
  // non-zero exit instead of an abort with a stack dump.
  try {
    return Run(argc, argv);
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "rmoe_train: %s\n", e.what_without_backtrace());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rmoe_train: %s\n", e.what());
  }
  return 1;
}
