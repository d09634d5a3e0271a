#include "rmoe/train/model_io.h"

#include <filesystem>
#include <sstream>

#include <absl/strings/str_cat.h>

#include "rmoe/config/job_spec.h"
#include "rmoe/data/dataset.h"
#include "rmoe/util/files.h"

namespace rmoe {
namespace fs = std::filesystem;

absl::Status SaveModel(const std::string& dir, const JobSpec& spec, Transformer& model) {
  const fs::path target(dir);
  const fs::path staging = target.string() + ".tmp";
  std::error_code ec;
  fs::remove_all(staging, ec);
  fs::create_directories(staging, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", staging.string(), ": ", ec.message()));

  if (auto status = WriteFileAtomically((staging / "job.pbtxt").string(), JobSpecToText(spec));
      !status.ok()) {
    return status;
  }
  torch::serialize::OutputArchive archive;
  for (const auto& item : model->named_parameters()) {
    archive.write(item.key(), item.value().detach().to(torch::kCPU));
  }
  try {
    archive.save_to((staging / "model.pt").string());
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("cannot write ", (staging / "model.pt").string(), ": ",
                                            e.what_without_backtrace()));
  }
  const fs::path dataset(spec.data().dataset_dir());
  for (const char* name : {"meta.pbtxt", "tokenizer.model"}) {
    if (!fs::exists(dataset / name)) continue;
    fs::copy_file(dataset / name, staging / name, fs::copy_options::overwrite_existing, ec);
    if (ec) return absl::InternalError(absl::StrCat("cannot copy ", (dataset / name).string(), ": ", ec.message()));
  }
  // The old directory is removed only once the new one is in place.
  return ReplaceDirectory(staging.string(), target.string());
}

absl::Status LoadParameters(const std::string& path, Transformer& model) {
  torch::serialize::InputArchive archive;
  try {
    archive.load_from(path);
  } catch (const c10::Error& e) {
    return absl::DataLossError(absl::StrCat("cannot read model parameters from ", path, ": ",
                                            e.what_without_backtrace()));
  }
  torch::NoGradGuard no_grad;
  for (auto& item : model->named_parameters()) {
    torch::Tensor stored;
    if (!archive.try_read(item.key(), stored)) {
      return absl::DataLossError(absl::StrCat(path, " has no tensor \"", item.key(),
                                              "\": it was saved from a different model"));
    }
    if (stored.sizes() != item.value().sizes()) {
      std::ostringstream message;
      message << path << ": tensor \"" << item.key() << "\" has shape " << stored.sizes()
              << " but the model spec needs " << item.value().sizes();
      return absl::DataLossError(message.str());
    }
    item.value().copy_(stored);
  }
  return absl::OkStatus();
}

absl::StatusOr<LoadedModel> LoadModel(const std::string& dir) {
  const fs::path root(dir);
  if (!fs::is_directory(root)) {
    return absl::NotFoundError(absl::StrCat("model directory ", dir,
                                            " does not exist (rmoe_train writes <output_dir>/model)"));
  }
  LoadedModel loaded;
  auto spec = LoadJobSpec((root / "job.pbtxt").string());
  if (!spec.ok()) return spec.status();
  loaded.spec = *std::move(spec);
  if (loaded.spec.model().vocab_size() <= 0) {
    return absl::DataLossError(absl::StrCat((root / "job.pbtxt").string(),
                                            ": model.vocab_size is not resolved"));
  }
  auto meta = ReadDatasetMeta(dir);
  if (!meta.ok()) return meta.status();
  loaded.dataset_meta = *std::move(meta);
  loaded.model = Transformer(loaded.spec.model());
  if (auto status = LoadParameters((root / "model.pt").string(), loaded.model); !status.ok()) {
    return status;
  }
  return loaded;
}

}  // namespace rmoe
