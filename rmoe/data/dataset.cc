#include "rmoe/data/dataset.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>
#include <vector>

#include <absl/strings/str_cat.h>
#include <absl/strings/str_join.h>
#include <absl/strings/str_split.h>
#include <absl/strings/strip.h>
#include <absl/strings/ascii.h>
#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>
#include "rmoe/util/files.h"

namespace rmoe {
namespace {

class CollectErrors : public google::protobuf::io::ErrorCollector {
 public:
  explicit CollectErrors(std::string path) : path_(std::move(path)) {}
  void AddError(int line, google::protobuf::io::ColumnNumber column,
                const std::string& message) override {
    errors_.push_back(absl::StrCat(path_, ":", line + 1, ":", column + 1, ": ", message));
  }
  std::string Joined() const { return absl::StrJoin(errors_, "\n"); }

 private:
  std::string path_;
  std::vector<std::string> errors_;
};

template <typename T>
void Widen(const unsigned char* data, int64_t start, int64_t count, int64_t* out) {
  const T* tokens = reinterpret_cast<const T*>(data) + start;
  for (int64_t i = 0; i < count; ++i) out[i] = tokens[i];
}

template <typename T>
int64_t Max(const unsigned char* data, int64_t size) {
  const T* tokens = reinterpret_cast<const T*>(data);
  T max = 0;
  for (int64_t i = 0; i < size; ++i) max = tokens[i] > max ? tokens[i] : max;
  return static_cast<int64_t>(max);
}

template <typename T>
std::string Pack(absl::Span<const int32_t> tokens) {
  std::string bytes(tokens.size() * sizeof(T), '\0');
  T* out = reinterpret_cast<T*>(bytes.data());
  for (size_t i = 0; i < tokens.size(); ++i) out[i] = static_cast<T>(tokens[i]);
  return bytes;
}

}  // namespace

int BytesPerTokenForVocab(int vocab_size) { return vocab_size <= 65536 ? 2 : 4; }

absl::StatusOr<TokenFile> TokenFile::Open(const std::string& path, int bytes_per_token) {
  if (bytes_per_token != 2 && bytes_per_token != 4) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": bytes_per_token ", bytes_per_token, " is not 2 (uint16) or 4 (uint32)"));
  }
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int error = errno;
    const std::string message = absl::StrCat("cannot open token file '", path, "': ",
                                             std::strerror(error));
    return error == ENOENT ? absl::NotFoundError(message) : absl::PermissionDeniedError(message);
  }
  struct stat info;
  if (fstat(fd, &info) != 0) {
    const std::string message = absl::StrCat("cannot stat '", path, "': ", std::strerror(errno));
    close(fd);
    return absl::InternalError(message);
  }
  const size_t bytes = static_cast<size_t>(info.st_size);
  if (bytes == 0 || bytes % bytes_per_token != 0) {
    close(fd);
    return absl::InvalidArgumentError(absl::StrCat(
        "token file '", path, "' has ", bytes, " bytes; expected a positive multiple of ",
        bytes_per_token, " (bytes_per_token); it is empty, truncated or not a token file"));
  }
  void* mapped = mmap(nullptr, bytes, PROT_READ, MAP_SHARED, fd, 0);
  close(fd);  // The mapping keeps the file alive.
  if (mapped == MAP_FAILED) {
    return absl::InternalError(absl::StrCat("cannot mmap '", path, "': ", std::strerror(errno)));
  }
  TokenFile file;
  file.path_ = path;
  file.data_ = static_cast<const unsigned char*>(mapped);
  file.mapped_bytes_ = bytes;
  file.size_ = static_cast<int64_t>(bytes / bytes_per_token);
  file.bytes_per_token_ = bytes_per_token;
  return file;
}

TokenFile::TokenFile(TokenFile&& other) noexcept { *this = std::move(other); }

TokenFile& TokenFile::operator=(TokenFile&& other) noexcept {
  if (this != &other) {
    Unmap();
    path_ = std::move(other.path_);
    data_ = std::exchange(other.data_, nullptr);
    mapped_bytes_ = std::exchange(other.mapped_bytes_, 0);
    size_ = std::exchange(other.size_, 0);
    bytes_per_token_ = other.bytes_per_token_;
  }
  return *this;
}

TokenFile::~TokenFile() { Unmap(); }

void TokenFile::Unmap() {
  if (data_ != nullptr) munmap(const_cast<unsigned char*>(data_), mapped_bytes_);
  data_ = nullptr;
  mapped_bytes_ = 0;
  size_ = 0;
}

void TokenFile::Read(int64_t start, int64_t count, int64_t* out) const {
  if (bytes_per_token_ == 2) {
    Widen<uint16_t>(data_, start, count, out);
  } else {
    Widen<uint32_t>(data_, start, count, out);
  }
}

int64_t TokenFile::MaxToken() const {
  return bytes_per_token_ == 2 ? Max<uint16_t>(data_, size_) : Max<uint32_t>(data_, size_);
}

absl::Status WriteTokenFile(const std::string& path, absl::Span<const int32_t> tokens,
                            int bytes_per_token) {
  if (bytes_per_token != 2 && bytes_per_token != 4) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": bytes_per_token ", bytes_per_token, " is not 2 or 4"));
  }
  const int64_t limit = bytes_per_token == 2 ? 65536 : int64_t{1} << 32;
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= limit) {
      return absl::InvalidArgumentError(absl::StrCat("writing '", path, "': token ", i, " = ",
                                                     tokens[i], " does not fit ",
                                                     bytes_per_token, " bytes"));
    }
  }
  const std::string bytes =
      bytes_per_token == 2 ? Pack<uint16_t>(tokens) : Pack<uint32_t>(tokens);
  return WriteFileAtomically(path, bytes);
}

absl::StatusOr<DatasetMeta> ReadDatasetMeta(const std::string& dataset_dir) {
  const std::string path = absl::StrCat(dataset_dir, "/meta.pbtxt");
  absl::StatusOr<std::string> text = ReadFile(path, "dataset metadata");
  if (absl::IsNotFound(text.status())) {
    return absl::NotFoundError(absl::StrCat(
        "cannot read '", path, "': no prepared dataset there; run rmoe_prepare_data first"));
  }
  if (!text.ok()) return text.status();
  DatasetMeta meta;
  CollectErrors errors(path);
  google::protobuf::TextFormat::Parser parser;
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(*text, &meta)) {
    return absl::InvalidArgumentError(errors.Joined());
  }
  if (meta.format_version() != kDatasetFormatVersion) {
    return absl::FailedPreconditionError(absl::StrCat(
        path, ": format_version ", meta.format_version(), " is not supported (this build reads ",
        kDatasetFormatVersion, "); rebuild the dataset with this build's rmoe_prepare_data"));
  }
  std::vector<std::string> problems;
  if (meta.vocab_size() <= 0) {
    problems.push_back(absl::StrCat("vocab_size = ", meta.vocab_size(), " must be > 0"));
  }
  // Wider than needed is allowed; narrower would truncate ids.
  if (meta.bytes_per_token() != 4 &&
      meta.bytes_per_token() != BytesPerTokenForVocab(meta.vocab_size())) {
    problems.push_back(absl::StrCat("bytes_per_token = ", meta.bytes_per_token(), " must be ",
                                    BytesPerTokenForVocab(meta.vocab_size()),
                                    " for vocab_size = ", meta.vocab_size()));
  }
  if (meta.document_separator() < 0 || meta.document_separator() >= meta.vocab_size()) {
    problems.push_back(absl::StrCat("document_separator = ", meta.document_separator(),
                                    " must be in [0, vocab_size = ", meta.vocab_size(), ")"));
  }
  if (meta.train_tokens() <= 0 || meta.val_tokens() <= 0) {
    problems.push_back(absl::StrCat("train_tokens = ", meta.train_tokens(), " and val_tokens = ",
                                    meta.val_tokens(), " must both be > 0"));
  }
  if (!problems.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": ", absl::StrJoin(problems, "; ")));
  }
  return meta;
}

absl::StatusOr<Dataset> Dataset::Open(const std::string& dataset_dir) {
  absl::StatusOr<DatasetMeta> meta = ReadDatasetMeta(dataset_dir);
  if (!meta.ok()) return meta.status();
  Dataset dataset;
  dataset.dir_ = dataset_dir;
  dataset.meta_ = *std::move(meta);
  const DatasetMeta& m = dataset.meta_;
  struct Split {
    const char* name;
    int64_t expected;
    TokenFile* file;
  };
  for (const Split& split : {Split{"train", m.train_tokens(), &dataset.train_},
                             Split{"val", m.val_tokens(), &dataset.val_}}) {
    const std::string path = absl::StrCat(dataset_dir, "/", split.name, ".bin");
    absl::StatusOr<TokenFile> file = TokenFile::Open(path, m.bytes_per_token());
    if (!file.ok()) return file.status();
    if (file->size() != split.expected) {
      return absl::FailedPreconditionError(absl::StrCat(
          path, " holds ", file->size(), " tokens but meta.pbtxt says ", split.name, "_tokens = ",
          split.expected, "; the dataset is inconsistent: rebuild it with rmoe_prepare_data "
          "--force"));
    }
    // An out-of-range id would only surface later as an embedding lookup failure (or a
    // device-side assert on CUDA); checking here costs one pass over the file.
    const int64_t max_token = file->MaxToken();
    if (max_token >= m.vocab_size()) {
      return absl::FailedPreconditionError(
          absl::StrCat(path, " contains token id ", max_token,
                       ", outside vocab_size = ", m.vocab_size(), " in meta.pbtxt"));
    }
    *split.file = *std::move(file);
  }
  return dataset;
}

absl::Status ReadTextDocuments(const std::string& path, std::vector<std::string>* documents,
                               int64_t* bytes) {
  absl::StatusOr<std::string> read = ReadFile(path, "raw text");
  if (!read.ok()) return read.status();
  *bytes += static_cast<int64_t>(read->size());
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(*read, '\n')) {
    ++line_number;
    absl::ConsumeSuffix(&line, "\r");
    if (absl::StripAsciiWhitespace(line).empty()) continue;
    if (line.find('\0') != absl::string_view::npos) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ":", line_number, ": contains a NUL byte; raw text must be text files"));
    }
    documents->emplace_back(line);
  }
  return absl::OkStatus();
}

}  // namespace rmoe
