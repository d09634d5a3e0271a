// rmoe_ckpt: looks into and checks sharded checkpoints (distributed/checkpoint.h), and
// exports them or saved models (rmoe/train/model_export.h). No MPI: it reads the files of
// any layout from one process.
#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "distributed/checkpoint.h"
#include "distributed/inference_model.h"
#include "rmoe/config/resources.h"
#include "rmoe/train/model_export.h"
#include "rmoe/util/cli.h"
#include "rmoe/util/files.h"

namespace {

using rmoe::CheckpointManifest;
using rmoe::TensorRecord;

constexpr char kUsage[] = R"(Usage: rmoe_ckpt COMMAND PATH [options]

Looks into, checks and exports the sharded checkpoints rmoe_train writes
(<output_dir>/checkpoints/step_<N>/). PATH is a step directory, or the checkpoint root:
then the checkpoint that `latest` names (the newest committed one when there is no
`latest`). A directory without a COMMITTED marker (a save that did not finish) is refused.

Commands:
  inspect PATH [--tensors]
      Step, consumed samples, the layout it was saved with (world size, expert-parallel
      size), the job name, scalars, the number and total size of model and optimizer
      tensors, and the largest tensors (name, dtype, shape, pieces, bytes). A step
      directory named explicitly is shown even when it is not committed (with a warning).
      --tensors    list every tensor instead of the largest ones
  verify PATH
      Reads every piece of every tensor and checks its CRC-32C, and the manifest's framing.
      Exit status 0 when everything matches, 1 otherwise (the message names the shard file
      and the tensor).
  export PATH --out DIR [--dtype float32|bfloat16|float16]
      Writes the model as a folder any PyTorch code can load: model.safetensors (every
      parameter by name, float32 unless --dtype), config.json (every architectural fact,
      explicit), rmoe_tokenizer.json (+ tokenizer.model for BPE) and README.md; see
      docs/export.md. PATH may also be a saved model (<output_dir>/model). The model's
      tensors are gathered from all shards (checksums verified); optimizer state is left
      out. DIR is replaced only if an earlier export wrote it. python/rmoe_torch loads the
      folder; rmoe_eval and rmoe_generate read it back.

Exit status: 0 success, 1 failure (bad or missing checkpoint, I/O error), 2 usage error.
  --help       this text
)";

int Usage(const std::string& message) {
  std::fprintf(stderr, "rmoe_ckpt: %s (see rmoe_ckpt --help)\n", message.c_str());
  return 2;
}

int Fail(const std::string& message) {
  std::fprintf(stderr, "rmoe_ckpt: %s\n", message.c_str());
  return 1;
}


int64_t TensorBytes(const TensorRecord& t) {
  int64_t bytes = 0;
  for (const auto& p : t.pieces()) bytes += p.length();
  return bytes;
}

std::string ShapeString(const TensorRecord& t) {
  std::string out = "[";
  for (int i = 0; i < t.shape_size(); ++i) out += (i ? ", " : "") + std::to_string(t.shape(i));
  return out + "]";
}

bool StartsWith(const std::string& s, const char* prefix) { return s.rfind(prefix, 0) == 0; }

std::set<std::string> ShardFiles(const CheckpointManifest& m) {
  std::set<std::string> files;
  for (const auto& t : m.tensors()) {
    for (const auto& p : t.pieces()) files.insert(p.file());
  }
  return files;
}

struct Loaded {
  std::string dir;
  CheckpointManifest manifest;
};

// Resolves PATH and reads its manifest; prints the error and returns false on failure.
bool Load(const std::string& path, Loaded* out) {
  auto dir = rmoe::distributed::ResolveCheckpoint(path);
  if (!dir.ok()) {
    Fail(std::string(dir.status().message()));
    return false;
  }
  auto manifest = rmoe::distributed::ReadManifest(*dir);
  if (!manifest.ok()) {
    Fail(std::string(manifest.status().message()));
    return false;
  }
  out->dir = *dir;
  out->manifest = std::move(*manifest);
  return true;
}

void PrintLine(const char* label, const std::string& value) {
  std::printf("%-18s%s\n", label, value.c_str());
}

int Inspect(const std::string& path, bool all_tensors) {
  Loaded c;
  bool committed = true;
  auto resolved = rmoe::distributed::ResolveCheckpoint(path);
  if (!resolved.ok() && absl::IsFailedPrecondition(resolved.status()) &&
      rmoe::distributed::ReadManifest(path).ok()) {
    // An unfinished save named explicitly: show what its manifest says, marked as such.
    std::fprintf(stderr, "rmoe_ckpt: warning: %s\n",
                 std::string(resolved.status().message()).c_str());
    committed = false;
    c.dir = path;
    c.manifest = *rmoe::distributed::ReadManifest(path);
  } else if (!Load(path, &c)) {
    return 1;
  }
  const CheckpointManifest& m = c.manifest;
  PrintLine("checkpoint",
            c.dir + (committed ? " (committed)" : " (NOT committed: the save did not finish)"));
  PrintLine("job", m.job().name());
  PrintLine("step", std::to_string(m.step()));
  PrintLine("consumed samples", std::to_string(m.consumed_samples()));
  PrintLine("layout", "saved by " + std::to_string(m.world_size()) +
                          (m.world_size() == 1 ? " rank" : " ranks") + ", expert-parallel size " +
                          std::to_string(m.expert_parallel_size()));
  if (!m.scalars().empty()) {
    std::map<std::string, double> sorted(m.scalars().begin(), m.scalars().end());
    std::string text;
    for (const auto& [key, value] : sorted) {
      char number[64];
      std::snprintf(number, sizeof(number), "%.10g", value);
      text += (text.empty() ? "" : ", ") + key + "=" + number;
    }
    PrintLine("scalars", text);
  }
  struct Group {
    int count = 0;
    int64_t bytes = 0;
  } model, optimizer, other;
  for (const auto& t : m.tensors()) {
    Group& g = StartsWith(t.name(), "model/")       ? model
               : StartsWith(t.name(), "optimizer/") ? optimizer
                                                    : other;
    ++g.count;
    g.bytes += TensorBytes(t);
  }
  auto group = [](const Group& g) {
    std::string text = std::to_string(g.count) + ", " + rmoe::FormatBytes(g.bytes);
    if (g.bytes >= 1024) text += " (" + std::to_string(g.bytes) + " bytes)";
    return text;
  };
  PrintLine("model tensors", group(model));
  PrintLine("optimizer tensors", group(optimizer));
  if (other.count > 0) PrintLine("other tensors", group(other));
  const auto files = ShardFiles(m);
  PrintLine("shard files", std::to_string(files.size()));
  PrintLine("rng states", std::to_string(m.rng_states_size()));
  PrintLine("format", std::to_string(m.format_version()));

  std::vector<const TensorRecord*> shown;
  for (const auto& t : m.tensors()) shown.push_back(&t);
  const size_t total = shown.size();
  constexpr size_t kSummary = 10;
  if (!all_tensors && shown.size() > kSummary) {
    std::stable_sort(shown.begin(), shown.end(), [](const TensorRecord* a, const TensorRecord* b) {
      return TensorBytes(*a) > TensorBytes(*b);
    });
    shown.resize(kSummary);
  }
  size_t width = 4;
  for (const auto* t : shown) width = std::max(width, t->name().size());
  std::printf("\n%s\n", all_tensors || total <= kSummary
                            ? "tensors:"
                            : ("the " + std::to_string(kSummary) + " largest of " +
                               std::to_string(total) + " tensors (--tensors lists all):")
                                  .c_str());
  std::printf("  %-*s  %-8s  %-16s  %6s  %s\n", static_cast<int>(width), "name", "dtype", "shape",
              "pieces", "bytes");
  for (const auto* t : shown) {
    std::printf("  %-*s  %-8s  %-16s  %6d  %lld\n", static_cast<int>(width), t->name().c_str(),
                t->dtype().c_str(), ShapeString(*t).c_str(), t->pieces_size(),
                static_cast<long long>(TensorBytes(*t)));
  }
  return 0;
}

int Verify(const std::string& path) {
  Loaded c;
  auto dir = rmoe::distributed::ResolveCheckpoint(path);
  if (!dir.ok()) return Fail(std::string(dir.status().message()));
  const absl::Status status = rmoe::distributed::VerifyCheckpoint(*dir);
  if (!status.ok()) {
    std::fprintf(stderr, "FAILED: %s\n", std::string(status.message()).c_str());
    return 1;
  }
  if (!Load(*dir, &c)) return 1;
  int64_t pieces = 0, bytes = 0;
  for (const auto& t : c.manifest.tensors()) {
    pieces += t.pieces_size();
    bytes += TensorBytes(t);
  }
  std::printf("OK: %s (step %lld): %d tensors, %lld pieces in %zu shard files, %s checked\n",
              c.dir.c_str(), static_cast<long long>(c.manifest.step()), c.manifest.tensors_size(),
              static_cast<long long>(pieces), ShardFiles(c.manifest).size(),
              rmoe::FormatBytes(bytes).c_str());
  return 0;
}

int Export(const std::string& path, const std::string& out, const std::string& dtype_name) {
  static const std::map<std::string, torch::ScalarType> kDtypes = {
      {"float32", torch::kFloat}, {"bfloat16", torch::kBFloat16}, {"float16", torch::kHalf}};
  const auto dtype = kDtypes.find(dtype_name);
  if (dtype == kDtypes.end()) {
    return Usage("--dtype " + dtype_name + " is not float32, bfloat16 or float16");
  }
  if (out.size() >= 12 && out.compare(out.size() - 12, 12, ".safetensors") == 0) {
    return Usage("--out names the folder to write (model.safetensors, config.json, the "
                 "tokenizer, README.md), not a file: e.g. --out " +
                 out.substr(0, out.size() - 12));
  }
  auto inference = rmoe::distributed::LoadModelForInference(path);
  if (!inference.ok()) return Fail(std::string(inference.status().message()));
  rmoe::ExportSource source;
  source.path = inference->checkpoint_dir.empty() ? path : inference->checkpoint_dir;
  source.step = inference->checkpoint_step;
  const absl::Status status = rmoe::ExportModel(inference->loaded, inference->tokenizer_dir,
                                                source, dtype->second, out);
  if (!status.ok()) return Fail(std::string(status.message()));
  const auto counts = inference->loaded.model->CountParameters();
  std::printf("exported %s%s (%lld parameters, %s) to %s\n", source.path.c_str(),
              source.step >= 0 ? (", step " + std::to_string(source.step)).c_str() : "",
              static_cast<long long>(counts.total), dtype_name.c_str(), out.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  rmoe::ReportFileSizeLimitAsErrors();
  const std::vector<std::string> args = rmoe::cli::Arguments(argc, argv);
  if (rmoe::cli::AsksForHelp(args)) return rmoe::cli::PrintUsage(kUsage);
  if (args.empty()) return Usage("no command given");
  const std::string command = args[0];
  if (command != "inspect" && command != "verify" && command != "export") {
    return Usage("unknown command \"" + command +
                 "\"; the commands are inspect, verify and export");
  }
  rmoe::cli::Parser parser("for " + command);
  parser.Positionals(1);
  if (command == "inspect") parser.Switch("--tensors");
  if (command == "export") parser.Value("--out", "a folder").Value("--dtype", "a dtype name");
  const auto flags = parser.Parse(std::vector<std::string>(args.begin() + 1, args.end()));
  if (!flags.ok()) return Usage(std::string(flags.status().message()));
  if (flags->positional().empty()) return Usage(command + " needs a checkpoint PATH");
  const std::string& path = flags->positional()[0];
  try {
    if (command == "inspect") return Inspect(path, flags->Has("--tensors"));
    if (command == "verify") return Verify(path);
    if (!flags->Has("--out")) return Usage("export needs --out DIR");
    return Export(path, flags->Get("--out"),
                  flags->Has("--dtype") ? flags->Get("--dtype") : std::string("float32"));
  } catch (const std::exception& e) {
    return Fail(e.what());
  }
}
