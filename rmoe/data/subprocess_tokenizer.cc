#include "rmoe/data/subprocess_tokenizer.h"

#include <unistd.h>

#include <cstdlib>
#include <utility>

#include <absl/strings/str_cat.h>
#include <absl/strings/str_join.h>
#include "rmoe/data/byte_tokenizer.h"
#include "rmoe/data/subprocess.h"
#include "rmoe/data/token_text.h"

namespace rmoe {
namespace {

constexpr char kProgramName[] = "rmoe_tokenize";

bool IsExecutable(const std::string& path) { return access(path.c_str(), X_OK) == 0; }

std::string DirectoryOfRunningProgram() {
  char buffer[4096];
  const ssize_t n = readlink("/proc/self/exe", buffer, sizeof(buffer) - 1);
  if (n <= 0) return "";
  const std::string path(buffer, static_cast<size_t>(n));
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

// Records are NUL-terminated: NUL is the one byte that no text of interest contains.
absl::StatusOr<std::string> JoinRecords(absl::Span<const std::string> texts,
                                        absl::string_view what) {
  std::string joined;
  size_t total = 0;
  for (const std::string& text : texts) total += text.size() + 1;
  joined.reserve(total);
  for (size_t i = 0; i < texts.size(); ++i) {
    if (texts[i].find('\0') != std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": text ", i, " contains a NUL byte, which cannot be sent"));
    }
    joined.append(texts[i]);
    joined.push_back('\0');
  }
  return joined;
}

// Reads "key value" lines, as printed by `rmoe_tokenize info`.
absl::StatusOr<int> InfoValue(absl::string_view info, absl::string_view key) {
  const std::string prefix = absl::StrCat(key, " ");
  for (size_t start = 0; start < info.size();) {
    size_t end = info.find('\n', start);
    if (end == absl::string_view::npos) end = info.size();
    const absl::string_view line = info.substr(start, end - start);
    if (line.substr(0, prefix.size()) == prefix) {
      absl::StatusOr<std::vector<int32_t>> value = ParseIds(line.substr(prefix.size()), key);
      if (value.ok() && value->size() == 1) return (*value)[0];
    }
    start = end + 1;
  }
  return absl::InternalError(
      absl::StrCat("`rmoe_tokenize info` printed no '", key, "' line; it printed:\n", info));
}

absl::StatusOr<std::string> RunTokenizeProgram(const std::string& program,
                                               const std::vector<std::string>& args,
                                               absl::string_view input) {
  std::vector<std::string> argv = {program};
  argv.insert(argv.end(), args.begin(), args.end());
  absl::StatusOr<SubprocessResult> result = RunSubprocess(argv, input);
  if (!result.ok()) return result.status();
  if (result->exit_status != 0) {
    return absl::InternalError(absl::StrCat("`", absl::StrJoin(argv, " "), "` failed (exit status ",
                                            result->exit_status, "): ", result->stderr_data));
  }
  return std::move(result->stdout_data);
}

}  // namespace

absl::StatusOr<std::string> FindTokenizeProgram(const std::string& tools_dir) {
  std::vector<std::string> candidates;
  if (!tools_dir.empty()) {
    candidates.push_back(absl::StrCat(tools_dir, "/", kProgramName));
  } else if (const char* env = std::getenv("RMOE_TOOLS_DIR"); env != nullptr && *env != '\0') {
    candidates.push_back(absl::StrCat(env, "/", kProgramName));
  } else {
    const std::string self_dir = DirectoryOfRunningProgram();
    candidates.push_back(absl::StrCat(self_dir, "/", kProgramName));
    candidates.push_back(absl::StrCat(self_dir, "/../tools/", kProgramName));
  }
  for (const std::string& candidate : candidates) {
    if (IsExecutable(candidate)) return candidate;
  }
  return absl::NotFoundError(absl::StrCat(
      "cannot find the ", kProgramName, " program (BPE tokenization runs in it); looked for: ",
      absl::StrJoin(candidates, ", "),
      ". Build it (target rmoe_tokenize) or point RMOE_TOOLS_DIR at its directory"));
}

absl::StatusOr<std::unique_ptr<SubprocessTokenizer>> SubprocessTokenizer::Open(
    const std::string& model_path, const std::string& tools_dir) {
  absl::StatusOr<std::string> program = FindTokenizeProgram(tools_dir);
  if (!program.ok()) return program.status();
  std::unique_ptr<SubprocessTokenizer> tokenizer(
      new SubprocessTokenizer(*std::move(program), model_path));
  absl::StatusOr<std::string> info = tokenizer->Run("info", {}, "");
  if (!info.ok()) return info.status();
  absl::StatusOr<int> vocab_size = InfoValue(*info, "vocab_size");
  if (!vocab_size.ok()) return vocab_size.status();
  absl::StatusOr<int> separator = InfoValue(*info, "document_separator");
  if (!separator.ok()) return separator.status();
  tokenizer->vocab_size_ = *vocab_size;
  tokenizer->separator_ = *separator;
  return tokenizer;
}

absl::StatusOr<std::string> SubprocessTokenizer::Run(const std::string& command,
                                                     const std::vector<std::string>& extra_args,
                                                     absl::string_view input) const {
  std::vector<std::string> args = {command, "--model", model_path_};
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  return RunTokenizeProgram(program_, args, input);
}

absl::StatusOr<std::vector<int32_t>> SubprocessTokenizer::Encode(absl::string_view text) const {
  absl::StatusOr<std::string> output = Run("encode", {}, text);
  if (!output.ok()) return output.status();
  absl::StatusOr<std::vector<std::vector<int32_t>>> lines =
      ParseIdLines(*output, "rmoe_tokenize encode output");
  if (!lines.ok()) return lines.status();
  if (lines->size() != 1) {
    return absl::InternalError(absl::StrCat("rmoe_tokenize encode printed ", lines->size(),
                                            " lines for one text; expected 1"));
  }
  return std::move(lines->front());
}

absl::StatusOr<std::vector<std::vector<int32_t>>> SubprocessTokenizer::EncodeBatch(
    absl::Span<const std::string> texts) const {
  if (texts.empty()) return std::vector<std::vector<int32_t>>();
  absl::StatusOr<std::string> input = JoinRecords(texts, "SubprocessTokenizer::EncodeBatch");
  if (!input.ok()) return input.status();
  absl::StatusOr<std::string> output = Run("encode", {"--nul"}, *input);
  if (!output.ok()) return output.status();
  absl::StatusOr<std::vector<std::vector<int32_t>>> lines =
      ParseIdLines(*output, "rmoe_tokenize encode --nul output");
  if (!lines.ok()) return lines.status();
  if (lines->size() != texts.size()) {
    return absl::InternalError(absl::StrCat("rmoe_tokenize encode --nul printed ",
                                            lines->size(), " lines for ", texts.size(),
                                            " texts"));
  }
  return lines;
}

absl::StatusOr<std::string> SubprocessTokenizer::Decode(absl::Span<const int32_t> ids) const {
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab_size_) {
      return absl::InvalidArgumentError(absl::StrCat("BPE decode: id ", ids[i], " at position ",
                                                     i, " is outside the vocabulary [0, ",
                                                     vocab_size_, ") of '", model_path_, "'"));
    }
  }
  return Run("decode", {}, FormatIds(ids));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> OpenTokenizer(const DatasetMeta& meta,
                                                         const std::string& dataset_dir,
                                                         const std::string& tools_dir) {
  std::unique_ptr<Tokenizer> tokenizer;
  switch (meta.tokenizer().kind()) {
    case TokenizerSpec::BYTE:
      tokenizer = std::make_unique<ByteTokenizer>();
      break;
    case TokenizerSpec::BPE: {
      absl::StatusOr<std::unique_ptr<SubprocessTokenizer>> bpe =
          SubprocessTokenizer::Open(absl::StrCat(dataset_dir, "/tokenizer.model"), tools_dir);
      if (!bpe.ok()) return bpe.status();
      tokenizer = *std::move(bpe);
      break;
    }
    default:
      return absl::InvalidArgumentError(absl::StrCat(dataset_dir, "/meta.pbtxt: tokenizer.kind ",
                                                     meta.tokenizer().kind(), " is not known"));
  }
  if (tokenizer->vocab_size() != meta.vocab_size() ||
      tokenizer->document_separator() != meta.document_separator()) {
    return absl::FailedPreconditionError(absl::StrCat(
        dataset_dir, "/meta.pbtxt says vocab_size ", meta.vocab_size(), " and document_separator ",
        meta.document_separator(), " but the tokenizer has ", tokenizer->vocab_size(), " and ",
        tokenizer->document_separator(),
        "; the dataset is inconsistent: rebuild it with rmoe_prepare_data --force"));
  }
  return tokenizer;
}

absl::Status TrainBpeInSubprocess(absl::Span<const std::string> documents, int vocab_size,
                                  int64_t max_training_chars, const std::string& model_path,
                                  const std::string& tools_dir) {
  absl::StatusOr<std::string> program = FindTokenizeProgram(tools_dir);
  if (!program.ok()) return program.status();
  absl::StatusOr<std::string> input = JoinRecords(documents, "BPE training");
  if (!input.ok()) return input.status();
  return RunTokenizeProgram(*program,
                            {"train", "--model", model_path, "--vocab-size",
                             absl::StrCat(vocab_size), "--max-training-chars",
                             absl::StrCat(max_training_chars), "--nul"},
                            *input)
      .status();
}

}  // namespace rmoe
