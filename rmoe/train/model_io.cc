#include "rmoe/train/model_io.h"

#include <fcntl.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <sstream>
#include <vector>

#include <absl/strings/numbers.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>
#include <absl/strings/str_split.h>

#include "rmoe/config/job_spec.h"
#include "rmoe/data/dataset.h"
#include "rmoe/util/crc32c.h"
#include "rmoe/util/files.h"
#include "rmoe/util/ownership.h"

namespace rmoe {
namespace fs = std::filesystem;
namespace {

constexpr char kChecksumsName[] = "checksums";
constexpr size_t kReadChunk = size_t{8} << 20;

struct FileChecksum {
  std::string name;
  uint32_t crc = 0;
  int64_t size = 0;
};

std::string ChecksumsText(const std::vector<FileChecksum>& files) {
  std::string text =
      "# CRC-32C and size in bytes of each file of this model, checked when it is loaded.\n";
  for (const auto& f : files) absl::StrAppendFormat(&text, "%08x %d %s\n", f.crc, f.size, f.name);
  return text;
}

absl::Status WriteChecked(const std::string& dir, const std::string& name, absl::string_view bytes,
                          std::vector<FileChecksum>* checksums) {
  if (auto status = WriteFileAtomically(dir + "/" + name, bytes); !status.ok()) return status;
  checksums->push_back({name, Crc32c(bytes.data(), bytes.size()), static_cast<int64_t>(bytes.size())});
  return absl::OkStatus();
}

// model.pt, streamed from the archive into the file (fsynced) while its checksum runs.
absl::Status WriteParameters(const std::string& dir, Transformer& model,
                             std::vector<FileChecksum>* checksums) {
  const std::string path = dir + "/model.pt";
  torch::serialize::OutputArchive archive;
  for (const auto& item : model->named_parameters()) {
    archive.write(item.key(), item.value().detach().to(torch::kCPU));
  }
  auto writer = AtomicFileWriter::Open(path);
  if (!writer.ok()) return writer.status();
  FileChecksum sum{"model.pt"};
  absl::Status status;
  try {
    archive.save_to([&](const void* data, size_t size) -> size_t {
      if (!status.ok()) return 0;
      status = writer->Append(absl::string_view(static_cast<const char*>(data), size));
      sum.crc = Crc32cExtend(sum.crc, data, size);
      sum.size += static_cast<int64_t>(size);
      return status.ok() ? size : 0;
    });
  } catch (const c10::Error& e) {
    if (status.ok()) {
      status = absl::InternalError(absl::StrCat("cannot write ", path, ": ", e.what_without_backtrace()));
    }
  }
  if (status.ok()) status = writer->Commit();
  if (status.ok()) checksums->push_back(sum);
  return status;
}

absl::Status WriteModelFiles(const std::string& dir, const JobSpec& spec, Transformer& model) {
  std::vector<FileChecksum> checksums;
  if (auto status = WriteChecked(dir, "job.pbtxt", JobSpecToText(spec), &checksums); !status.ok()) {
    return status;
  }
  if (auto status = WriteParameters(dir, model, &checksums); !status.ok()) return status;
  const fs::path dataset(spec.data().dataset_dir());
  for (const char* name : {"meta.pbtxt", "tokenizer.model"}) {
    const std::string source = (dataset / name).string();
    std::error_code ec;
    if (!fs::exists(source, ec)) continue;
    auto bytes = ReadFile(source, "dataset file");
    if (!bytes.ok()) return bytes.status();
    if (auto status = WriteChecked(dir, name, *bytes, &checksums); !status.ok()) return status;
  }
  return WriteFileAtomically(dir + "/" + kChecksumsName, ChecksumsText(checksums));
}

// The CRC-32C and size of the file at `path`, read in chunks.
absl::StatusOr<FileChecksum> ChecksumOf(const std::string& path) {
  FileDescriptor fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.ok()) return ErrnoStatus(errno, "cannot read model file", path);
  std::vector<char> buffer(kReadChunk);
  FileChecksum sum;
  for (;;) {
    size_t got = 0;
    if (auto status = PreadAll(fd.get(), buffer.data(), buffer.size(), sum.size, path, &got);
        !status.ok()) {
      return status;
    }
    sum.crc = Crc32cExtend(sum.crc, buffer.data(), got);
    sum.size += static_cast<int64_t>(got);
    if (got < buffer.size()) return sum;
  }
}

}  // namespace

absl::Status SaveModel(const std::string& dir, const JobSpec& spec, Transformer& model) {
  return WriteOwnedDirectory(dir, kModelKind, [&](const std::string& staging) {
    return WriteModelFiles(staging, spec, model);
  });
}

absl::Status VerifyModelFiles(const std::string& dir) {
  const std::string list = dir + "/" + kChecksumsName;
  auto text = ReadFile(list, "model checksums");
  if (!text.ok()) {
    if (!absl::IsNotFound(text.status())) return text.status();
    return absl::DataLossError(absl::StrCat(
        "model directory ", dir, " has no ", kChecksumsName,
        " file, so its files cannot be checked: it is incomplete, or was saved by an rmoe "
        "without checksums (rmoe_generate --model can read the run's checkpoint instead)"));
  }
  std::vector<std::string> listed;
  for (absl::string_view line : absl::StrSplit(*text, '\n', absl::SkipEmpty())) {
    if (line[0] == '#') continue;
    const std::vector<std::string> fields = absl::StrSplit(line, ' ');
    FileChecksum expected;
    if (fields.size() != 3 || !absl::SimpleHexAtoi(fields[0], &expected.crc) ||
        !absl::SimpleAtoi(fields[1], &expected.size) || fields[2].find('/') != std::string::npos) {
      return absl::DataLossError(absl::StrCat(list, " is damaged: cannot read the line \"", line, "\""));
    }
    const std::string path = dir + "/" + fields[2];
    auto actual = ChecksumOf(path);
    if (!actual.ok()) return actual.status();
    if (actual->size != expected.size || actual->crc != expected.crc) {
      return absl::DataLossError(absl::StrFormat(
          "%s is damaged: %d bytes with CRC-32C %08x, but it was saved as %d bytes with CRC-32C "
          "%08x (restore it, or save the model again)",
          path, actual->size, actual->crc, expected.size, expected.crc));
    }
    listed.push_back(fields[2]);
  }
  for (const char* required : {"job.pbtxt", "model.pt", "meta.pbtxt"}) {
    if (std::find(listed.begin(), listed.end(), required) == listed.end()) {
      return absl::DataLossError(absl::StrCat(list, " does not list ", required,
                                              ": the model directory is incomplete"));
    }
  }
  return absl::OkStatus();
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
  if (auto status = VerifyModelFiles(dir); !status.ok()) return status;
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
