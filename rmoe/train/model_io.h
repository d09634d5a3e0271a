// A trained model on disk: a directory that holds everything generation needs, so it does
// not depend on the dataset directory it was trained from.
//   job.pbtxt        the job spec, model.vocab_size resolved
//   model.pt         the parameters by name (torch archive)
//   meta.pbtxt       the dataset's metadata (tokenizer kind, separator token)
//   tokenizer.model  the SentencePiece model (BPE only)
//   checksums        CRC-32C and size of each file above, checked before loading
//   .rmoe-owner      the mark that lets a later save replace this directory
//                    (rmoe/util/ownership.h); a directory without it is never replaced
#pragma once

#include <string>

#include <absl/status/status.h>
#include <absl/status/statusor.h>

#include "proto/dataset.pb.h"
#include "proto/job.pb.h"
#include "rmoe/model/transformer.h"

namespace rmoe {

// Writes into a temporary sibling directory (every file fsynced) and renames it into place,
// so `dir` is always either the previous complete model or the new complete model. An
// existing `dir` that rmoe did not write is refused, naming it, and left alone.
absl::Status SaveModel(const std::string& dir, const JobSpec& spec, Transformer& model);

struct LoadedModel {
  JobSpec spec;
  DatasetMeta dataset_meta;
  Transformer model{nullptr};
};

// Checks every file against `checksums` first: a damaged, truncated or missing file is a
// DataLoss error naming it. Errors name the file and, for a tensor that does not fit the
// spec, its name and shapes.
absl::StatusOr<LoadedModel> LoadModel(const std::string& dir);

// The checksum check alone (DataLoss naming the first damaged file).
absl::Status VerifyModelFiles(const std::string& dir);

// Parameters by name, read from a model.pt written by SaveModel into `model`.
absl::Status LoadParameters(const std::string& path, Transformer& model);

}  // namespace rmoe
