// A trained model for inference from either place rmoe_train leaves one: a saved model
// directory (<output_dir>/model) or a checkpoint (a step directory, or a checkpoint root
// meaning its latest), whatever layout saved it; or from an export (rmoe_ckpt export).
// Used by rmoe_generate, rmoe_eval and rmoe_ckpt export. Not collective: no MPI.
#pragma once

#include <cstdint>
#include <string>

#include <absl/status/statusor.h>

#include "rmoe/train/model_io.h"

namespace rmoe::distributed {

struct InferenceModel {
  LoadedModel loaded;          // spec (vocab_size resolved), tokenizer metadata, model (eval)
  std::string tokenizer_dir;   // where meta.pbtxt (and tokenizer.model for BPE) are
  std::string checkpoint_dir;  // the step directory, when loaded from a checkpoint
  int64_t checkpoint_step = -1;
};

// A directory with job.pbtxt or model.pt is a saved model (LoadModel: checksums verified);
// one with config.json and model.safetensors an export (LoadExportedModel: its job spec has
// no dataset); any other directory is a checkpoint: the job spec of its manifest, every "model/..."
// tensor read in full (checksums verified), and the tokenizer's metadata from the copies in
// the step directory, or else from the job's data.dataset_dir.
absl::StatusOr<InferenceModel> LoadModelForInference(const std::string& path);

}  // namespace rmoe::distributed
