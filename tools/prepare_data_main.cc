// rmoe_prepare_data: turns the raw text named by a job spec into a prepared dataset
// (rmoe/data/dataset.h): tokenizer, train.bin, val.bin and meta.pbtxt.
//
// This program reads the protobuf job spec, so it cannot load SentencePiece (see
// rmoe/data/tokenizer.h): BPE training and encoding run in the rmoe_tokenize program.
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <system_error>
#include <vector>

#include <absl/strings/ascii.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_join.h>
#include <absl/strings/str_split.h>
#include <absl/strings/strip.h>
#include <google/protobuf/text_format.h>
#include <google/protobuf/util/message_differencer.h>
#include "rmoe/config/job_spec.h"
#include "rmoe/data/byte_tokenizer.h"
#include "rmoe/data/dataset.h"
#include "rmoe/data/sampler.h"
#include "rmoe/data/subprocess_tokenizer.h"
#include "rmoe/util/cli.h"
#include "rmoe/util/files.h"
#include "rmoe/util/ownership.h"

namespace rmoe {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr char kUsage[] = R"(Usage: rmoe_prepare_data --job CONFIG.pbtxt [--set path.to.field=value ...] [--force]

Prepares the dataset that a job spec's `data` section describes, so rmoe_train can use it.

Reads:   data.raw_text     text files, or directories whose *.txt files are read in sorted
                           name order (not recursively). Every non-blank line is one
                           document; a trailing '\r' is dropped.
         data.val_fraction about this fraction of the documents goes to validation, chosen by
                           a hash of each document's text (so the split does not depend on
                           file order, and duplicate documents land on the same side); at
                           least one document goes to each side.
         data.tokenizer    BYTE (256 ids, one per byte) or BPE: a SentencePiece BPE model of
                           tokenizer.vocab_size pieces trained on the train documents (at most
                           tokenizer.max_training_chars bytes of them, spread over the corpus).
Writes:  data.dataset_dir/ tokenizer.model (BPE only); train.bin and val.bin: the documents'
                           tokens, with the separator token between documents (BYTE: '\n',
                           BPE: </s>), as little-endian uint16 (uint32 above 65536 ids);
                           meta.pbtxt: sizes, counts and the unigram entropy of the train
                           tokens (proto/dataset.proto).

The dataset is built in DATASET_DIR.partial and renamed into place at the end, so an
interrupted run never leaves a dataset that looks complete; a previous dataset in
DATASET_DIR is replaced. When DATASET_DIR already holds a dataset made from the same
sources (same paths, total size and document split) with the same tokenizer settings,
nothing is done.

Options:
  --job PATH          the job spec (protobuf text format; see proto/job.proto)
  --set FIELD=VALUE   override a spec field, e.g. --set data.tokenizer.kind=BPE (repeatable)
  --force             rebuild even when the dataset is up to date
  --tools-dir DIR     where rmoe_tokenize is (BPE only; default: $RMOE_TOOLS_DIR, else next
                      to this program)
  --help              show this text

Exit status: 0 on success or when up to date, 1 on an error, 2 on a usage error.
)";

struct Options {
  std::string job;
  std::vector<std::string> overrides;
  bool force = false;
  std::string tools_dir;
};

[[noreturn]] void UsageError(const std::string& message) {
  std::fprintf(stderr, "rmoe_prepare_data: %s\nRun 'rmoe_prepare_data --help' for usage.\n",
               message.c_str());
  std::exit(2);
}

Options ParseArgs(int argc, char** argv) {
  cli::Parser parser;
  parser.Value("--job", "a path")
      .Repeated("--set", "FIELD=VALUE")
      .Switch("--force")
      .Value("--tools-dir", "a directory");
  absl::StatusOr<cli::Args> args = parser.Parse(cli::Arguments(argc, argv));
  if (!args.ok()) UsageError(std::string(args.status().message()));
  if (args->help()) std::exit(cli::PrintUsage(kUsage));
  Options options;
  options.job = args->Get("--job");
  options.overrides = args->All("--set");
  options.force = args->Has("--force");
  options.tools_dir = args->Get("--tools-dir");
  if (options.job.empty()) UsageError("--job CONFIG.pbtxt is required");
  return options;
}

double Seconds(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

struct Corpus {
  std::vector<std::string> files;
  int64_t source_bytes = 0;
  std::vector<std::string> documents;
  std::vector<bool> is_val;
  int64_t num_val = 0;
};

// Every file that data.raw_text names, in order.
absl::StatusOr<std::vector<std::string>> ListSourceFiles(const DataSpec& data) {
  if (data.raw_text().empty()) {
    return absl::InvalidArgumentError(
        "data.raw_text is empty: name the text files or directories to prepare the dataset from");
  }
  std::vector<std::string> files;
  for (int i = 0; i < data.raw_text_size(); ++i) {
    const std::string& source = data.raw_text(i);
    const std::string field = absl::StrCat("data.raw_text[", i, "] = '", source, "'");
    std::error_code error;
    const fs::file_status status = fs::status(source, error);
    if (!fs::exists(status)) {
      return absl::NotFoundError(absl::StrCat(
          field, " does not exist (relative paths are taken from the current directory, ",
          fs::current_path(error).string(), "); for the State of the Union corpus run "
          "tools/fetch_corpus.sh"));
    }
    if (fs::is_regular_file(status)) {
      files.push_back(source);
      continue;
    }
    if (!fs::is_directory(status)) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, " is neither a regular file nor a directory"));
    }
    std::vector<std::string> found;
    for (const fs::directory_entry& entry : fs::directory_iterator(source, error)) {
      if (entry.is_regular_file() && entry.path().extension() == ".txt") {
        found.push_back(entry.path().string());
      }
    }
    if (error) {
      return absl::PermissionDeniedError(
          absl::StrCat(field, ": cannot list the directory: ", error.message()));
    }
    if (found.empty()) {
      return absl::NotFoundError(absl::StrCat(field, " is a directory without *.txt files"));
    }
    std::sort(found.begin(), found.end());
    files.insert(files.end(), found.begin(), found.end());
  }
  return files;
}

// FNV-1a, then a mixer so that the top bits (which decide the split) depend on every byte.
uint64_t DocumentHash(const std::string& text) {
  uint64_t hash = 0xcbf29ce484222325ULL;
  for (unsigned char c : text) hash = (hash ^ c) * 0x100000001b3ULL;
  return SplitMix64(hash);
}

absl::Status ReadDocuments(Corpus* corpus) {
  for (const std::string& path : corpus->files) {
    if (auto status = ReadTextDocuments(path, &corpus->documents, &corpus->source_bytes);
        !status.ok()) {
      return status;
    }
  }
  if (corpus->documents.size() < 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "data.raw_text holds ", corpus->documents.size(), " document(s) in ",
        corpus->files.size(), " file(s); at least 2 non-blank lines are needed (one for "
        "training, one for validation)"));
  }
  return absl::OkStatus();
}

// A document is held out when its hash, as a fraction of 2^64, is below val_fraction.
void SplitDocuments(double val_fraction, Corpus* corpus) {
  const size_t n = corpus->documents.size();
  std::vector<uint64_t> hashes(n);
  corpus->is_val.assign(n, false);
  corpus->num_val = 0;
  const double threshold = val_fraction * 18446744073709551616.0;  // 2^64
  for (size_t i = 0; i < n; ++i) {
    hashes[i] = DocumentHash(corpus->documents[i]);
    corpus->is_val[i] = static_cast<double>(hashes[i]) < threshold;
    corpus->num_val += corpus->is_val[i];
  }
  // Small corpora can miss a side entirely; move the document nearest the threshold.
  if (corpus->num_val == 0 || corpus->num_val == static_cast<int64_t>(n)) {
    const bool to_val = corpus->num_val == 0;
    const auto pick = to_val ? std::min_element(hashes.begin(), hashes.end())
                             : std::max_element(hashes.begin(), hashes.end());
    corpus->is_val[pick - hashes.begin()] = to_val;
    corpus->num_val += to_val ? 1 : -1;
  }
}

// The tokenizer settings as recorded in meta.pbtxt: BYTE has none beyond its kind.
TokenizerSpec RecordedTokenizer(const TokenizerSpec& spec) {
  TokenizerSpec recorded;
  recorded.set_kind(spec.kind());
  if (spec.kind() == TokenizerSpec::BPE) {
    recorded.set_vocab_size(spec.vocab_size());
    recorded.set_max_training_chars(spec.max_training_chars());
  }
  return recorded;
}

// Empty when the dataset in dataset_dir was made from this corpus with these settings;
// otherwise why it must be built.
std::string WhyBuild(const DataSpec& data, const Corpus& corpus) {
  const std::string& dir = data.dataset_dir();
  if (!fs::exists(fs::path(dir) / "meta.pbtxt")) return "there is no dataset there yet";
  absl::StatusOr<Dataset> dataset = Dataset::Open(dir);
  if (!dataset.ok()) return absl::StrCat("the existing dataset is unusable (",
                                         dataset.status().message(), ")");
  const DatasetMeta& meta = dataset->meta();
  if (!std::equal(meta.sources().begin(), meta.sources().end(), data.raw_text().begin(),
                  data.raw_text().end())) {
    return "data.raw_text changed";
  }
  if (!google::protobuf::util::MessageDifferencer::Equals(
          meta.tokenizer(), RecordedTokenizer(data.tokenizer()))) {
    return "data.tokenizer changed";
  }
  if (meta.source_bytes() != corpus.source_bytes) return "the raw text changed";
  if (meta.val_documents() != corpus.num_val ||
      meta.train_documents() != static_cast<int64_t>(corpus.documents.size()) - corpus.num_val) {
    return "the documents or data.val_fraction changed";
  }
  if (meta.tokenizer().kind() == TokenizerSpec::BPE &&
      !fs::exists(fs::path(dir) / "tokenizer.model")) {
    return "tokenizer.model is missing";
  }
  return "";
}

// Shannon entropy (nats) of the distribution of ids in `tokens`.
double UnigramEntropy(const std::vector<int32_t>& tokens, int vocab_size) {
  std::vector<int64_t> counts(vocab_size, 0);
  for (int32_t token : tokens) ++counts[token];
  double entropy = 0;
  const double total = static_cast<double>(tokens.size());
  for (int64_t count : counts) {
    if (count > 0) entropy -= (count / total) * std::log(count / total);
  }
  return entropy;
}

absl::Status WriteMeta(const std::string& dir, const DatasetMeta& meta) {
  std::string text;
  google::protobuf::TextFormat::PrintToString(meta, &text);
  return WriteFileAtomically(
      (fs::path(dir) / "meta.pbtxt").string(),
      "# Written by rmoe_prepare_data; the fields are described in proto/dataset.proto.\n" + text);
}

// BYTE, or BPE trained on the train documents into work_dir/tokenizer.model.
absl::StatusOr<std::unique_ptr<Tokenizer>> MakeTokenizer(const TokenizerSpec& spec,
                                                         const Corpus& corpus,
                                                         const fs::path& work_dir,
                                                         const Options& options) {
  if (spec.kind() != TokenizerSpec::BPE) return std::make_unique<ByteTokenizer>();
  std::vector<std::string> train_documents;
  for (size_t i = 0; i < corpus.documents.size(); ++i) {
    if (!corpus.is_val[i]) train_documents.push_back(corpus.documents[i]);
  }
  const std::string model = (work_dir / "tokenizer.model").string();
  const absl::Status trained =
      TrainBpeInSubprocess(train_documents, spec.vocab_size(), spec.max_training_chars(), model,
                           options.tools_dir);
  if (!trained.ok()) {
    return absl::Status(trained.code(), absl::StrCat("training the BPE tokenizer "
                                                     "(data.tokenizer): ", trained.message()));
  }
  absl::StatusOr<std::unique_ptr<SubprocessTokenizer>> bpe =
      SubprocessTokenizer::Open(model, options.tools_dir);
  if (!bpe.ok()) return bpe.status();
  return std::unique_ptr<Tokenizer>(*std::move(bpe));
}

struct Splits {
  std::vector<int32_t> tokens[2];  // [0] train, [1] val: documents joined by the separator
  int64_t text_bytes = 0;          // of all documents, for bytes per token
  int64_t text_tokens = 0;         // the same, without separators
};

absl::StatusOr<Splits> Encode(const Tokenizer& tokenizer, const Corpus& corpus) {
  absl::StatusOr<std::vector<std::vector<int32_t>>> encoded =
      tokenizer.EncodeBatch(corpus.documents);
  if (!encoded.ok()) return encoded.status();
  Splits splits;
  int64_t documents[2] = {0, 0};
  for (size_t i = 0; i < corpus.documents.size(); ++i) {
    const int split = corpus.is_val[i] ? 1 : 0;
    std::vector<int32_t>& tokens = splits.tokens[split];
    if (documents[split]++ > 0) tokens.push_back(tokenizer.document_separator());
    tokens.insert(tokens.end(), (*encoded)[i].begin(), (*encoded)[i].end());
    splits.text_bytes += static_cast<int64_t>(corpus.documents[i].size());
    splits.text_tokens += static_cast<int64_t>((*encoded)[i].size());
  }
  return splits;
}

DatasetMeta MakeMeta(const DataSpec& data, const Corpus& corpus, const Tokenizer& tokenizer,
                     const Splits& splits) {
  DatasetMeta meta;
  meta.set_format_version(kDatasetFormatVersion);
  *meta.mutable_tokenizer() = RecordedTokenizer(data.tokenizer());
  meta.set_vocab_size(tokenizer.vocab_size());
  meta.set_bytes_per_token(BytesPerTokenForVocab(tokenizer.vocab_size()));
  meta.set_document_separator(tokenizer.document_separator());
  meta.set_train_tokens(static_cast<int64_t>(splits.tokens[0].size()));
  meta.set_val_tokens(static_cast<int64_t>(splits.tokens[1].size()));
  meta.set_train_documents(static_cast<int64_t>(corpus.documents.size()) - corpus.num_val);
  meta.set_val_documents(corpus.num_val);
  for (const std::string& source : data.raw_text()) meta.add_sources(source);
  meta.set_source_bytes(corpus.source_bytes);
  meta.set_unigram_entropy_nats(UnigramEntropy(splits.tokens[0], tokenizer.vocab_size()));
  return meta;
}

// Builds the whole dataset in work_dir; returns its metadata.
absl::StatusOr<DatasetMeta> BuildIn(const fs::path& work_dir, const DataSpec& data,
                                    const Corpus& corpus, const Options& options,
                                    double* tokenizer_seconds, Splits* splits) {
  const Clock::time_point start = Clock::now();
  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer =
      MakeTokenizer(data.tokenizer(), corpus, work_dir, options);
  if (!tokenizer.ok()) return tokenizer.status();
  *tokenizer_seconds = Seconds(start);
  absl::StatusOr<Splits> encoded = Encode(**tokenizer, corpus);
  if (!encoded.ok()) return encoded.status();
  *splits = *std::move(encoded);
  const DatasetMeta meta = MakeMeta(data, corpus, **tokenizer, *splits);
  for (int split = 0; split < 2; ++split) {
    const std::string path = (work_dir / (split == 0 ? "train.bin" : "val.bin")).string();
    absl::Status written = WriteTokenFile(path, splits->tokens[split], meta.bytes_per_token());
    if (!written.ok()) return written;
  }
  // meta.pbtxt last: its presence is what marks a dataset as complete.
  absl::Status written = WriteMeta(work_dir.string(), meta);
  if (!written.ok()) return written;
  absl::StatusOr<Dataset> check = Dataset::Open(work_dir.string());
  if (!check.ok()) {
    return absl::InternalError(absl::StrCat("the dataset just written does not read back: ",
                                            check.status().message()));
  }
  return meta;
}

absl::Status Build(const DataSpec& data, const Options& options, const Corpus& corpus) {
  const Clock::time_point start = Clock::now();
  fs::path target = fs::path(data.dataset_dir()).lexically_normal();
  if (target.filename().empty()) target = target.parent_path();  // "dir/" -> "dir"
  const fs::path work(target.string() + ".partial");
  std::error_code error;
  if (target.has_parent_path()) fs::create_directories(target.parent_path(), error);
  // The remains of an interrupted build are ours to replace; anything else there is not.
  absl::Status created = RemoveOwnedDirectory(work.string(), kDatasetKind);
  if (created.ok()) created = CreateOwnedDirectory(work.string(), {kDatasetKind, NewRunId()});
  if (!created.ok()) {
    return absl::Status(created.code(),
                        absl::StrCat("data.dataset_dir: ", created.message()));
  }
  double tokenizer_seconds = 0;
  Splits splits;
  absl::StatusOr<DatasetMeta> meta =
      BuildIn(work, data, corpus, options, &tokenizer_seconds, &splits);
  absl::Status status =
      meta.ok() ? ReplaceOwnedDirectory(work.string(), target.string(), kDatasetKind)
                : meta.status();
  if (!status.ok()) {
    (void)RemoveOwnedDirectory(work.string(), kDatasetKind);
    return status;
  }

  const bool bpe = data.tokenizer().kind() == TokenizerSpec::BPE;
  std::printf("rmoe_prepare_data: wrote %s\n", target.string().c_str());
  std::printf("  sources    %zu file(s), %.2f MB\n", corpus.files.size(),
              corpus.source_bytes / 1e6);
  std::printf("  documents  %lld train, %lld val\n",
              static_cast<long long>(meta->train_documents()),
              static_cast<long long>(meta->val_documents()));
  std::printf("  tokenizer  %s, vocabulary %d, separator %d", bpe ? "BPE" : "BYTE",
              meta->vocab_size(), meta->document_separator());
  if (bpe) std::printf(" (trained in %.1f s)", tokenizer_seconds);
  std::printf("\n  tokens     %lld train, %lld val; %.2f bytes of text per token\n",
              static_cast<long long>(meta->train_tokens()),
              static_cast<long long>(meta->val_tokens()),
              splits.text_tokens > 0 ? static_cast<double>(splits.text_bytes) / splits.text_tokens
                                     : 0.0);
  std::printf("  entropy    %.3f nats (%.3f bits) per train token, unigram\n",
              meta->unigram_entropy_nats(), meta->unigram_entropy_nats() / std::log(2.0));
  std::printf("  time       %.1f s\n", Seconds(start));
  return absl::OkStatus();
}

absl::Status Run(const Options& options) {
  ValidationOptions validation;
  validation.check_data_files = false;  // This program is what creates them.
  absl::StatusOr<JobSpec> spec =
      LoadJobSpecWithOverrides(options.job, options.overrides, validation);
  if (!spec.ok()) return spec.status();
  const DataSpec& data = spec->data();

  Corpus corpus;
  absl::StatusOr<std::vector<std::string>> files = ListSourceFiles(data);
  if (!files.ok()) return files.status();
  corpus.files = *std::move(files);
  absl::Status status = ReadDocuments(&corpus);
  if (!status.ok()) return status;
  SplitDocuments(data.val_fraction(), &corpus);

  const std::string why = WhyBuild(data, corpus);
  if (why.empty() && !options.force) {
    std::printf("rmoe_prepare_data: %s is up to date (%zu documents from %s); --force "
                "rebuilds it\n",
                data.dataset_dir().c_str(), corpus.documents.size(),
                absl::StrJoin(data.raw_text(), ", ").c_str());
    return absl::OkStatus();
  }
  std::printf("rmoe_prepare_data: building %s (%s)\n", data.dataset_dir().c_str(),
              why.empty() ? "--force" : why.c_str());
  std::fflush(stdout);
  return Build(data, options, corpus);
}

}  // namespace
}  // namespace rmoe

int main(int argc, char** argv) {
  rmoe::ReportFileSizeLimitAsErrors();
  const rmoe::Options options = rmoe::ParseArgs(argc, argv);
  const absl::Status status = rmoe::Run(options);
  if (!status.ok()) {
    std::fprintf(stderr, "rmoe_prepare_data: error: %s\n", std::string(status.message()).c_str());
    return 1;
  }
  return 0;
}
