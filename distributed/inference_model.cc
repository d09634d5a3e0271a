#include "distributed/inference_model.h"

#include <filesystem>
#include <vector>

#include <absl/strings/str_cat.h>
#include <torch/torch.h>

#include "distributed/checkpoint.h"
#include "rmoe/data/dataset.h"
#include "rmoe/train/model_export.h"

namespace rmoe::distributed {

namespace fs = std::filesystem;

namespace {

// A saved model directory has job.pbtxt, an export config.json and model.safetensors;
// anything else that is a directory is taken for a checkpoint (a missing path gets
// LoadModel's message).
bool IsCheckpointPath(const std::string& path) {
  std::error_code ec;
  return fs::is_directory(path, ec) && !fs::exists(fs::path(path) / "job.pbtxt", ec) &&
         !fs::exists(fs::path(path) / "model.pt", ec) && !IsExportDirectory(path);
}

absl::StatusOr<InferenceModel> LoadCheckpointModel(const std::string& path) {
  auto dir = ResolveCheckpoint(path);
  if (!dir.ok()) {
    if (!absl::IsNotFound(dir.status())) return dir.status();
    return absl::NotFoundError(absl::StrCat(path, " is neither a saved model directory (job.pbtxt, "
                                            "model.pt) nor a checkpoint: ", dir.status().message()));
  }
  auto manifest = ReadManifest(*dir);
  if (!manifest.ok()) return manifest.status();
  InferenceModel result;
  result.checkpoint_dir = *dir;
  result.checkpoint_step = manifest->step();
  LoadedModel& loaded = result.loaded;
  loaded.spec = manifest->job();
  if (loaded.spec.model().vocab_size() <= 0) {
    return absl::DataLossError(absl::StrCat("the job spec in ", *dir,
                                            "/manifest.pb has no resolved model.vocab_size"));
  }
  loaded.model = Transformer(loaded.spec.model());
  loaded.model->eval();
  std::vector<ShardedTensor> tensors;
  for (auto& item : loaded.model->named_parameters()) {
    ShardedTensor t;
    t.name = "model/" + item.key();
    t.local = item.value().detach();
    t.global_shape = item.value().sizes().vec();
    tensors.push_back(std::move(t));
  }
  {
    torch::NoGradGuard no_grad;
    if (auto status = LoadTensors(*dir, *manifest, tensors); !status.ok()) return status;
  }
  // Checkpoints hold copies of the dataset's meta.pbtxt (and tokenizer.model for BPE);
  // older ones do not: then the dataset the job was trained on.
  result.tokenizer_dir =
      fs::exists(fs::path(*dir) / "meta.pbtxt") ? *dir : loaded.spec.data().dataset_dir();
  auto meta = ReadDatasetMeta(result.tokenizer_dir);
  if (!meta.ok()) {
    return absl::Status(meta.status().code(),
                        absl::StrCat(meta.status().message(), " (the checkpoint ", *dir,
                                     " has no copy of the dataset's meta.pbtxt, so the tokenizer "
                                     "is looked for in its job's data.dataset_dir)"));
  }
  loaded.dataset_meta = *std::move(meta);
  return result;
}

}  // namespace

absl::StatusOr<InferenceModel> LoadModelForInference(const std::string& path) {
  if (IsCheckpointPath(path)) return LoadCheckpointModel(path);
  auto loaded = IsExportDirectory(path) ? LoadExportedModel(path) : LoadModel(path);
  if (!loaded.ok()) return loaded.status();
  InferenceModel result;
  result.loaded = *std::move(loaded);
  result.tokenizer_dir = path;
  return result;
}

}  // namespace rmoe::distributed
