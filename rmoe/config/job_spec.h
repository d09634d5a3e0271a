// Loading, overriding and validating the JobSpec (proto/job.proto).
//
// Every RMoE program takes its whole configuration from one JobSpec, so the errors here are
// what a user sees first when a config is wrong: each names the file position or the full
// field path, the offending value and what would have been accepted. Torch-free on purpose,
// so the data tools can use it too.
#pragma once

#include <string>
#include <vector>

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>
#include "proto/dataset.pb.h"
#include "proto/job.pb.h"

namespace rmoe {

// Parses a JobSpec from protobuf text format. Syntax errors and unknown fields give
// InvalidArgument "PATH:LINE:COL: <parser message>" (every error the parser reports, one per
// line). A missing file gives NotFound naming the path.
absl::StatusOr<JobSpec> LoadJobSpec(const std::string& path);
// As LoadJobSpec, for text already in memory; source_name stands in for PATH in errors.
absl::StatusOr<JobSpec> ParseJobSpec(absl::string_view text, absl::string_view source_name);

// Applies one command-line override "path.to.field=value", e.g. "model.moe.num_experts=16".
// The path is walked by field name through nested messages; the value is parsed by the
// field's type: integers, floats, bools (true/false/1/0), strings (taken verbatim) and enums
// (by value name, e.g. "model.router.kind=RECURRENT"). A repeated scalar field takes a
// comma-separated list that replaces its contents ("model.moe.moe_layers=1,3"; an empty value
// clears it). On error the spec is left unchanged and the message names the path, the bad
// segment or value, and what would be accepted.
absl::Status ApplyOverride(JobSpec* spec, absl::string_view assignment);

struct ValidationOptions {
  // Also require the prepared dataset's meta.pbtxt to exist and agree with the spec. Off for
  // programs that run before the data exists (rmoe_prepare_data) and for config-only tests.
  bool check_data_files = true;
};

// Semantic validation. Collects every problem and returns one InvalidArgument listing them,
// one per line, each naming the full field path, the bad value and the allowed values, e.g.
// "model.moe.top_k = 9 must be in [1, model.moe.num_experts = 8]".
absl::Status ValidateJobSpec(const JobSpec& spec, const ValidationOptions& options = {});

// LoadJobSpec, then every override in order, then ValidateJobSpec. All override errors are
// reported together; validation runs only when every override applied.
absl::StatusOr<JobSpec> LoadJobSpecWithOverrides(const std::string& path,
                                                 const std::vector<std::string>& overrides,
                                                 const ValidationOptions& options = {});

// spec.model().vocab_size() when it is > 0, else the prepared dataset's vocab_size (an error
// when its metadata cannot be read or has none).
absl::StatusOr<int> ResolveVocabSize(const JobSpec& spec);

// Whether a run of `current` may continue from a checkpoint of `saved`: the model must be the
// same (its parameters' shapes and meaning); everything else (optimizer, schedule, layout,
// data, logging) may change. The error lists every model field that differs, both values.
absl::Status CheckResumable(const JobSpec& saved, const JobSpec& current);

// Text-format rendering in which every field that has a default is written out explicitly,
// so a spec saved next to a model still describes it if a default in job.proto changes.
// Optional strings without a declared default (e.g. checkpoint.directory, meaning "derive it")
// stay unset. ParseJobSpec reads the result back.
std::string JobSpecToText(const JobSpec& spec);

// True if layer `layer` is an MoE layer under this spec (empty moe_layers = all).
bool IsMoELayer(const ModelSpec& model, int layer);
// The indices of the MoE layers, in order.
std::vector<int> MoELayerIndices(const ModelSpec& model);
// The MLP router's hidden size: router.mlp_hidden_dim, or when that is 0 the size whose
// parameters per MoE layer, H (d_model + 1 + E), come nearest the GRU layer-recurrent
// router's at router.hidden_dim R: R d_model + E R + (6 R^2 + 6 R) / (MoE layers). At least 1.
int MlpRouterHiddenDim(const ModelSpec& model);

}  // namespace rmoe
