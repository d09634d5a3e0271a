// A trained model as a folder any PyTorch code can load (docs/export.md):
//   model.safetensors    the parameters by their RMoE names
//   config.json          every architectural fact, explicit, with a format version
//   rmoe_tokenizer.json  the tokenizer's kind, vocabulary and special ids
//   tokenizer.model      the SentencePiece model (BPE only)
//   README.md            the layout in short
// and the way back: RMoE's programs load such a folder as a model.
#pragma once

#include <cstdint>
#include <string>

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <torch/torch.h>

#include "rmoe/train/model_io.h"

namespace rmoe {

inline constexpr int kExportFormatVersion = 1;

struct ExportSource {
  std::string path;   // the saved model or checkpoint exported
  int64_t step = -1;  // the checkpoint's step; -1 for a saved model
};

// config.json of `model` trained with `spec` on data described by `meta`.
std::string ExportConfigJson(const JobSpec& spec, const DatasetMeta& meta,
                             const ExportSource& source, torch::ScalarType dtype);

// Writes the folder `out_dir` with the parameters in `dtype` (float32, bfloat16 or float16).
// It is staged beside `out_dir` and renamed into place, so `out_dir` is the previous export
// or the new one, never a mix; an existing `out_dir` that is not an earlier export is refused
// and left alone. `tokenizer_dir` holds the tokenizer.model of a BPE model.
absl::Status ExportModel(const LoadedModel& model, const std::string& tokenizer_dir,
                         const ExportSource& source, torch::ScalarType dtype,
                         const std::string& out_dir);

// Whether `dir` looks like an export (config.json and model.safetensors).
bool IsExportDirectory(const std::string& dir);

// Reads an export back: the job spec (model settings, the sequence length and precision it
// trained with), the tokenizer's metadata and the parameters in float32. Errors name the
// file and key or tensor: an unknown format version, a missing or mistyped key, a missing,
// extra or misshapen tensor.
absl::StatusOr<LoadedModel> LoadExportedModel(const std::string& dir);

}  // namespace rmoe
