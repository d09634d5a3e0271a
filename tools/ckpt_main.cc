// rmoe_ckpt: looks into, checks and exports sharded checkpoints (distributed/checkpoint.h).
// No MPI: it reads the files of any layout from one process.
#include <google/protobuf/util/json_util.h>
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
#include "rmoe/config/job_spec.h"
#include "rmoe/config/resources.h"
#include "rmoe/util/cli.h"
#include "rmoe/util/files.h"
#include "rmoe/util/json.h"

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
  export PATH --out FILE.safetensors [--config FILE.json]
      Gathers every model tensor ("model/<name>") from all shards into one safetensors
      file, named <name> (without "model/"); optimizer state is left out. Checksums are
      verified on the way. --config also writes the job spec as JSON (every default
      explicit).

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


struct Dtype {
  const char* name;  // as the manifest writes it
  torch::ScalarType type;
  const char* safetensors;  // nullptr: no safetensors equivalent
};
constexpr Dtype kDtypes[] = {
    {"float32", torch::kFloat, "F32"},
    {"float64", torch::kDouble, "F64"},
    {"float16", torch::kHalf, "F16"},
    {"bfloat16", torch::kBFloat16, "BF16"},
    {"int64", torch::kLong, "I64"},
    {"int32", torch::kInt, "I32"},
    {"int16", torch::kShort, "I16"},
    {"int8", torch::kChar, "I8"},
    {"uint8", torch::kByte, "U8"},
    {"bool", torch::kBool, "BOOL"},
    {"complex64", torch::kComplexFloat, nullptr},
    {"complex128", torch::kComplexDouble, nullptr},
};

const Dtype* FindDtype(const std::string& name) {
  for (const auto& d : kDtypes) {
    if (name == d.name) return &d;
  }
  return nullptr;
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

// A model tensor of the checkpoint as safetensors lays it out.
struct ExportItem {
  const TensorRecord* record;
  const Dtype* dtype;
  std::string name;
  int64_t bytes;
  uint64_t begin = 0;
};

// The safetensors JSON header for `items` (setting each one's offset), padded to 8 bytes;
// `end` receives the end of the data.
std::string SafetensorsHeader(const CheckpointManifest& m, std::vector<ExportItem>& items,
                              uint64_t* end) {
  uint64_t at = 0;
  std::string header =
      "{\"__metadata__\":{\"format\":\"pt\",\"step\":" +
      rmoe::JsonString(std::to_string(m.step())) +
      ",\"consumed_samples\":" + rmoe::JsonString(std::to_string(m.consumed_samples())) +
      ",\"job\":" + rmoe::JsonString(m.job().name()) + "}";
  for (auto& item : items) {
    item.begin = at;
    at += static_cast<uint64_t>(item.bytes);
    std::string shape;
    for (int i = 0; i < item.record->shape_size(); ++i)
      shape += (i ? "," : "") + std::to_string(item.record->shape(i));
    header += "," + rmoe::JsonString(item.name) + ":{\"dtype\":\"" + item.dtype->safetensors +
              "\",\"shape\":[" + shape + "],\"data_offsets\":[" + std::to_string(item.begin) + "," +
              std::to_string(at) + "]}";
  }
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');
  *end = at;
  return header;
}

// The checkpoint's job spec as JSON (protobuf's field names), for tools outside RMoE.
int WriteJobSpecJson(const CheckpointManifest& m, const std::string& config) {
  auto spec = rmoe::ParseJobSpec(rmoe::JobSpecToText(m.job()), "the checkpoint's job spec");
  if (!spec.ok()) return Fail(std::string(spec.status().message()));
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.preserve_proto_field_names = true;
  std::string json;
  const auto status = google::protobuf::util::MessageToJsonString(*spec, &json, options);
  if (!status.ok()) return Fail("cannot convert the job spec to JSON: " + status.ToString());
  if (auto s = rmoe::WriteFileAtomically(config, json); !s.ok()) {
    return Fail(std::string(s.message()));
  }
  std::printf("job spec written to %s\n", config.c_str());
  return 0;
}

int Export(const std::string& path, const std::string& out, const std::string& config) {
  for (const std::string& file : {out, config}) {
    std::error_code ec;
    if (!file.empty() && std::filesystem::is_directory(file, ec)) {
      return Fail(file + " is a directory: give the name of the file to write, e.g. " + file +
                  "/model.safetensors");
    }
  }
  Loaded c;
  if (!Load(path, &c)) return 1;
  const CheckpointManifest& m = c.manifest;

  std::vector<ExportItem> items;
  for (const auto& t : m.tensors()) {
    if (!StartsWith(t.name(), "model/")) continue;
    const Dtype* d = FindDtype(t.dtype());
    if (d == nullptr || d->safetensors == nullptr) {
      return Fail("tensor '" + t.name() + "' has dtype " + t.dtype() +
                  ", which safetensors cannot hold");
    }
    const std::string name = t.name().substr(6);
    if (name.empty() || name == "__metadata__")
      return Fail("tensor '" + t.name() + "' has no usable name");
    int64_t elements = 1;
    for (int64_t dim : t.shape()) elements *= dim;
    items.push_back({&t, d, name, elements * static_cast<int64_t>(c10::elementSize(d->type))});
  }
  if (items.empty()) return Fail(c.dir + " holds no model tensors (\"model/...\")");
  // Largest elements first, so every tensor starts at a multiple of its element size (the
  // header is padded to 8 bytes), as the reference writer does for zero-copy readers.
  std::stable_sort(items.begin(), items.end(), [](const ExportItem& a, const ExportItem& b) {
    return c10::elementSize(a.dtype->type) > c10::elementSize(b.dtype->type);
  });
  uint64_t at = 0;
  const std::string header = SafetensorsHeader(m, items, &at);

  auto file = rmoe::AtomicFileWriter::Open(out);
  if (!file.ok()) return Fail(std::string(file.status().message()));
  std::string size_bytes(8, '\0');
  for (int i = 0; i < 8; ++i) size_bytes[i] = static_cast<char>((header.size() >> (8 * i)) & 0xFF);
  if (auto s = file->Append(size_bytes); !s.ok()) return Fail(std::string(s.message()));
  if (auto s = file->Append(header); !s.ok()) return Fail(std::string(s.message()));
  for (const auto& item : items) {
    rmoe::distributed::ShardedTensor t;
    t.name = item.record->name();
    t.global_shape.assign(item.record->shape().begin(), item.record->shape().end());
    t.local = torch::empty(t.global_shape, torch::TensorOptions().dtype(item.dtype->type));
    std::vector<rmoe::distributed::ShardedTensor> one = {t};
    const absl::Status status = rmoe::distributed::LoadTensors(c.dir, m, one);
    if (!status.ok()) return Fail(std::string(status.message()));
    const absl::string_view bytes(static_cast<const char*>(one[0].local.data_ptr()),
                                  static_cast<size_t>(item.bytes));
    if (auto s = file->Append(bytes); !s.ok()) return Fail(std::string(s.message()));
  }
  if (auto s = file->Commit(); !s.ok()) return Fail(std::string(s.message()));
  std::printf("exported %zu model tensors (%s) of %s, step %lld, to %s\n", items.size(),
              rmoe::FormatBytes(static_cast<int64_t>(at)).c_str(), c.dir.c_str(),
              static_cast<long long>(m.step()), out.c_str());

  return config.empty() ? 0 : WriteJobSpecJson(m, config);
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
  if (command == "export") parser.Value("--out", "a file name").Value("--config", "a file name");
  const auto flags = parser.Parse(std::vector<std::string>(args.begin() + 1, args.end()));
  if (!flags.ok()) return Usage(std::string(flags.status().message()));
  if (flags->positional().empty()) return Usage(command + " needs a checkpoint PATH");
  const std::string& path = flags->positional()[0];
  try {
    if (command == "inspect") return Inspect(path, flags->Has("--tensors"));
    if (command == "verify") return Verify(path);
    if (!flags->Has("--out")) return Usage("export needs --out FILE.safetensors");
    return Export(path, flags->Get("--out"), flags->Get("--config"));
  } catch (const std::exception& e) {
    return Fail(e.what());
  }
}
