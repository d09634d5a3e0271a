// Tests of the data layer: tokenizers, token files, samplers and the data tools.
//
// This binary links protobuf (DatasetMeta), so SentencePiece cannot be loaded in it: BPE is
// tested through the rmoe_tokenize program, exactly as the trainer uses it.
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <absl/strings/str_cat.h>
#include <absl/strings/str_join.h>
#include <absl/strings/str_replace.h>
#include <absl/strings/str_split.h>
#include <gtest/gtest.h>
#include "rmoe/data/byte_tokenizer.h"
#include "rmoe/data/dataset.h"
#include "rmoe/data/sampler.h"
#include "rmoe/data/subprocess.h"
#include "rmoe/data/subprocess_tokenizer.h"

namespace rmoe {
namespace {

namespace fs = std::filesystem;

// `needle` occurs in `haystack`; the failure message shows both.
::testing::AssertionResult Contains(absl::string_view haystack, absl::string_view needle) {
  if (haystack.find(needle) != absl::string_view::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "'" << haystack << "' does not contain '" << needle
                                       << "'";
}

// A fresh directory, removed with everything in it at the end of the test.
class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "rmoe_data_test.XXXXXX").string();
    path_ = mkdtemp(pattern.data());
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }
  std::string operator/(const std::string& name) const { return (fs::path(path_) / name).string(); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

void WriteText(const std::string& path, const std::string& text) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream(path, std::ios::binary) << text;
}

std::string ReadText(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  std::stringstream buffer;
  buffer << file.rdbuf();
  return buffer.str();
}

// Deterministic English-like text: enough repetition for BPE to find merges.
std::vector<std::string> SyntheticDocuments(int count) {
  const std::vector<std::string> words = {"the",   "union", "state", "congress", "people",
                                          "peace", "year",  "nation", "law",     "trade",
                                          "of",    "and",   "to",    "a",        "in"};
  std::vector<std::string> documents;
  uint64_t x = 7;
  for (int d = 0; d < count; ++d) {
    std::string document;
    for (int w = 0; w < 40; ++w) {
      x = SplitMix64(x);
      if (w > 0) document += (x % 11 == 0) ? ", " : " ";
      document += words[x % words.size()];
    }
    documents.push_back(document + ".");
  }
  return documents;
}

// Strings that must survive encode + decode: spaces, tabs, newlines, multi-byte UTF-8,
// characters the BPE corpus never had (byte fallback), and edge positions of spaces.
const std::vector<std::string>& TrickyTexts() {
  static const std::vector<std::string> texts = {
      "",        " ",          "x",  " leading", "trailing ",  "two  spaces\tand a tab",
      "line\nbreak\r\n", "héllo wörld — “quoted” ½", "日本語のテキスト", "emoji 😀🚀",
      "\x01\x7f control", "the union of the state"};
  return texts;
}

// Token file i -> i % modulus, so a window's content reveals where it starts.
TokenFile MakeCountingFile(const TempDir& dir, int64_t size) {
  std::vector<int32_t> tokens(size);
  for (int64_t i = 0; i < size; ++i) tokens[i] = static_cast<int32_t>(i % 65536);
  const std::string path = dir / "counting.bin";
  EXPECT_TRUE(WriteTokenFile(path, tokens, 2).ok());
  absl::StatusOr<TokenFile> file = TokenFile::Open(path, 2);
  EXPECT_TRUE(file.ok()) << file.status();
  return *std::move(file);
}

// ---------------------------------------------------------------------------------------
// Tokenizers

TEST(ByteTokenizer, RoundTripsEveryByteAndUtf8) {
  ByteTokenizer tokenizer;
  EXPECT_EQ(tokenizer.vocab_size(), 256);
  EXPECT_EQ(tokenizer.document_separator(), '\n');
  std::string all_bytes;
  for (int b = 0; b < 256; ++b) all_bytes.push_back(static_cast<char>(b));
  absl::StatusOr<std::vector<int32_t>> ids = tokenizer.Encode(all_bytes);
  ASSERT_TRUE(ids.ok());
  ASSERT_EQ(ids->size(), 256u);
  for (int b = 0; b < 256; ++b) EXPECT_EQ((*ids)[b], b);
  EXPECT_EQ(*tokenizer.Decode(*ids), all_bytes);
  for (const std::string& text : TrickyTexts()) {
    EXPECT_EQ(*tokenizer.Decode(*tokenizer.Encode(text)), text);
    EXPECT_EQ(tokenizer.Encode(text)->size(), text.size());
  }
}

TEST(ByteTokenizer, DecodeRejectsIdsOutsideTheVocabulary) {
  ByteTokenizer tokenizer;
  const absl::StatusOr<std::string> text = tokenizer.Decode(std::vector<int32_t>{65, 256});
  ASSERT_FALSE(text.ok());
  EXPECT_TRUE(Contains(text.status().message(), "256"));
  EXPECT_FALSE(tokenizer.Decode(std::vector<int32_t>{-1}).ok());
}

// Trains one small BPE model through rmoe_tokenize for the tests below.
class BpeTest : public ::testing::Test {
 protected:
  static constexpr int kVocab = 320;
  void SetUp() override {
    model_ = dir_ / "bpe.model";
    absl::Status trained =
        TrainBpeInSubprocess(SyntheticDocuments(200), kVocab, 1000000, model_, RMOE_TOOLS_DIR);
    ASSERT_TRUE(trained.ok()) << trained;
  }
  TempDir dir_;
  std::string model_;
};

TEST_F(BpeTest, SubprocessTokenizerRoundTripsWithTheRequestedVocabulary) {
  absl::StatusOr<std::unique_ptr<SubprocessTokenizer>> tokenizer =
      SubprocessTokenizer::Open(model_, RMOE_TOOLS_DIR);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  const SubprocessTokenizer& bpe = **tokenizer;
  EXPECT_EQ(bpe.vocab_size(), kVocab);
  EXPECT_EQ(bpe.document_separator(), 2);  // SentencePiece's </s>
  for (const std::string& text : TrickyTexts()) {
    absl::StatusOr<std::vector<int32_t>> ids = bpe.Encode(text);
    ASSERT_TRUE(ids.ok()) << ids.status();
    for (int32_t id : *ids) EXPECT_TRUE(id >= 0 && id < kVocab) << id;
    absl::StatusOr<std::string> decoded = bpe.Decode(*ids);
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    EXPECT_EQ(*decoded, text);
  }
  // Merges were learned: in-domain text takes far fewer tokens than bytes.
  const std::string sample = SyntheticDocuments(1)[0];
  EXPECT_LT(bpe.Encode(sample)->size() * 2, sample.size());
  // The separator decodes to nothing; the dummy-prefix space that starts every encoded text
  // is dropped only at the start of the decoded ids, so later documents keep it.
  std::vector<int32_t> joined = *bpe.Encode("peace");
  joined.push_back(bpe.document_separator());
  const std::vector<int32_t> second = *bpe.Encode("and trade");
  joined.insert(joined.end(), second.begin(), second.end());
  EXPECT_EQ(*bpe.Decode(joined), "peace and trade");
}

TEST_F(BpeTest, EncodeBatchEqualsEncodingTextByText) {
  absl::StatusOr<std::unique_ptr<SubprocessTokenizer>> tokenizer =
      SubprocessTokenizer::Open(model_, RMOE_TOOLS_DIR);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  const std::vector<std::string>& texts = TrickyTexts();
  absl::StatusOr<std::vector<std::vector<int32_t>>> batch = (*tokenizer)->EncodeBatch(texts);
  ASSERT_TRUE(batch.ok()) << batch.status();
  ASSERT_EQ(batch->size(), texts.size());
  for (size_t i = 0; i < texts.size(); ++i) {
    EXPECT_EQ((*batch)[i], *(*tokenizer)->Encode(texts[i])) << "text " << i;
  }
  EXPECT_FALSE((*tokenizer)->EncodeBatch({std::string("nul\0byte", 8)}).ok());
}

TEST_F(BpeTest, TrainingIsDeterministic) {
  const std::string again = dir_ / "again.model";
  ASSERT_TRUE(
      TrainBpeInSubprocess(SyntheticDocuments(200), kVocab, 1000000, again, RMOE_TOOLS_DIR).ok());
  EXPECT_EQ(ReadText(again), ReadText(model_));
}

TEST_F(BpeTest, ErrorsNameTheProblem) {
  absl::StatusOr<std::unique_ptr<SubprocessTokenizer>> no_program =
      SubprocessTokenizer::Open(model_, dir_ / "no_such_dir");
  ASSERT_FALSE(no_program.ok());
  EXPECT_TRUE(Contains(no_program.status().message(), "rmoe_tokenize"));
  EXPECT_TRUE(Contains(no_program.status().message(), "RMOE_TOOLS_DIR"));

  absl::StatusOr<std::unique_ptr<SubprocessTokenizer>> no_model =
      SubprocessTokenizer::Open(dir_ / "missing.model", RMOE_TOOLS_DIR);
  ASSERT_FALSE(no_model.ok());
  EXPECT_TRUE(Contains(no_model.status().message(), "missing.model"));

  // The program's stderr (SentencePiece's reason) reaches the caller.
  const absl::Status too_big = TrainBpeInSubprocess(SyntheticDocuments(5), 5000, 1000000,
                                                    dir_ / "big.model", RMOE_TOOLS_DIR);
  ASSERT_FALSE(too_big.ok());
  EXPECT_TRUE(Contains(too_big.message(), "Vocabulary size too high"));

  absl::StatusOr<std::unique_ptr<SubprocessTokenizer>> tokenizer =
      SubprocessTokenizer::Open(model_, RMOE_TOOLS_DIR);
  ASSERT_TRUE(tokenizer.ok());
  EXPECT_FALSE((*tokenizer)->Decode(std::vector<int32_t>{kVocab}).ok());
}

// Pieces that decode as SentencePiece's do: "\xe2\x96\x81" (the space marker) becomes a
// space, except at the start of the ids.
class PieceTokenizer : public Tokenizer {
 public:
  explicit PieceTokenizer(std::vector<std::string> pieces) : pieces_(std::move(pieces)) {}
  absl::StatusOr<std::vector<int32_t>> Encode(absl::string_view) const override {
    return absl::UnimplementedError("decoding only");
  }
  absl::StatusOr<std::string> Decode(absl::Span<const int32_t> ids) const override {
    std::string text;
    for (int32_t id : ids) text += pieces_.at(id);
    text = absl::StrReplaceAll(text, {{"\xe2\x96\x81", " "}});
    if (!text.empty() && text[0] == ' ') text.erase(0, 1);
    return text;
  }
  int vocab_size() const override { return static_cast<int>(pieces_.size()); }
  int document_separator() const override { return 0; }

 private:
  std::vector<std::string> pieces_;
};

// A continuation reads as it does after its context: the space its first piece starts with
// is kept, a piece that continues a word is not separated from it.
TEST(DecodeContinuation, KeepsTheSpaceBeforeTheFirstPiece) {
  const PieceTokenizer bpe({"", "\xe2\x96\x81The", "\xe2\x96\x81Union", "\xe2\x96\x81of", "s"});
  const std::vector<int32_t> context = {1, 2};  // "The Union"
  EXPECT_EQ(*bpe.Decode(std::vector<int32_t>{3}), "of");  // decoded alone, the space is lost
  EXPECT_EQ(*DecodeContinuation(bpe, context, std::vector<int32_t>{3, 3}), " of of");
  EXPECT_EQ(*DecodeContinuation(bpe, context, std::vector<int32_t>{4}), "s");
  EXPECT_EQ(*DecodeContinuation(bpe, {}, std::vector<int32_t>{3}), "of");
  EXPECT_EQ(*DecodeContinuation(bpe, context, {}), "");
  const ByteTokenizer bytes;
  EXPECT_EQ(*DecodeContinuation(bytes, std::vector<int32_t>{'H', 'i'}, std::vector<int32_t>{' ', '!'}),
            " !");
}

TEST(OpenTokenizer, ChecksTheTokenizerAgainstTheMetadata) {
  DatasetMeta meta;
  meta.mutable_tokenizer()->set_kind(TokenizerSpec::BYTE);
  meta.set_vocab_size(256);
  meta.set_document_separator('\n');
  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer = OpenTokenizer(meta, "/unused");
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  EXPECT_EQ((*tokenizer)->vocab_size(), 256);

  meta.set_vocab_size(300);
  tokenizer = OpenTokenizer(meta, "/some/dataset");
  ASSERT_FALSE(tokenizer.ok());
  EXPECT_TRUE(Contains(tokenizer.status().message(), "/some/dataset/meta.pbtxt"));
}

TEST(Subprocess, SurvivesAProgramThatExitsWithoutReadingItsInput) {
  // 8 MB is more than a pipe buffers: our writer hits EPIPE, which must not kill us.
  absl::StatusOr<SubprocessResult> result =
      RunSubprocess({"/bin/sh", "-c", "echo out; echo err >&2; exit 3"}, std::string(8 << 20, 'x'));
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->exit_status, 3);
  EXPECT_EQ(result->stdout_data, "out\n");
  EXPECT_EQ(result->stderr_data, "err\n");
  EXPECT_FALSE(RunSubprocess({"/no/such/program"}, "").ok());
}

// ---------------------------------------------------------------------------------------
// Token files and datasets

TEST(TokenFile, ReadsBackWhatWasWrittenInBothWidths) {
  TempDir dir;
  const std::vector<int32_t> narrow = {0, 1, 10, 65535, 42};
  const std::vector<int32_t> wide = {0, 65536, 70000, 2000000000};
  ASSERT_TRUE(WriteTokenFile(dir / "narrow.bin", narrow, 2).ok());
  ASSERT_TRUE(WriteTokenFile(dir / "wide.bin", wide, 4).ok());
  EXPECT_EQ(fs::file_size(dir / "narrow.bin"), narrow.size() * 2);
  for (const auto& [path, width, expected] :
       {std::make_tuple(dir / "narrow.bin", 2, narrow), std::make_tuple(dir / "wide.bin", 4, wide)}) {
    absl::StatusOr<TokenFile> opened = TokenFile::Open(path, width);
    ASSERT_TRUE(opened.ok()) << opened.status();
    TokenFile file = *std::move(opened);  // Move-only; the mapping moves with it.
    ASSERT_EQ(file.size(), static_cast<int64_t>(expected.size()));
    for (size_t i = 0; i < expected.size(); ++i) {
      EXPECT_EQ(file[i], expected[i]);
      EXPECT_EQ(file.Get(i), expected[i]);
    }
    std::vector<int64_t> widened(expected.size() - 1);
    file.Read(1, widened.size(), widened.data());
    EXPECT_EQ(widened, std::vector<int64_t>(expected.begin() + 1, expected.end()));
    EXPECT_EQ(file.MaxToken(), *std::max_element(expected.begin(), expected.end()));
  }
  // Little-endian on disk, whatever the API says.
  EXPECT_EQ(ReadText(dir / "narrow.bin").substr(6, 2), std::string("\xff\xff", 2));
  EXPECT_EQ(ReadText(dir / "narrow.bin").substr(4, 2), std::string("\x0a\x00", 2));
}

TEST(TokenFile, ReportsMissingTruncatedAndEmptyFiles) {
  TempDir dir;
  absl::StatusOr<TokenFile> missing = TokenFile::Open(dir / "missing.bin", 2);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(Contains(missing.status().message(), "missing.bin"));

  WriteText(dir / "odd.bin", "abc");
  absl::StatusOr<TokenFile> odd = TokenFile::Open(dir / "odd.bin", 2);
  EXPECT_EQ(odd.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(odd.status().message(), "multiple of 2"));
  WriteText(dir / "six.bin", "abcdef");
  EXPECT_FALSE(TokenFile::Open(dir / "six.bin", 4).ok());
  EXPECT_TRUE(TokenFile::Open(dir / "six.bin", 2).ok());

  WriteText(dir / "empty.bin", "");
  EXPECT_FALSE(TokenFile::Open(dir / "empty.bin", 2).ok());
  EXPECT_FALSE(TokenFile::Open(dir / "six.bin", 3).ok());
  EXPECT_FALSE(WriteTokenFile(dir / "x.bin", std::vector<int32_t>{65536}, 2).ok());
}

// Writes a small, valid dataset by hand; tests then break one thing at a time.
DatasetMeta WriteSmallDataset(const std::string& dir) {
  DatasetMeta meta;
  meta.set_format_version(kDatasetFormatVersion);
  meta.mutable_tokenizer()->set_kind(TokenizerSpec::BYTE);
  meta.set_vocab_size(256);
  meta.set_bytes_per_token(2);
  meta.set_document_separator('\n');
  meta.set_train_tokens(20);
  meta.set_val_tokens(10);
  EXPECT_TRUE(WriteTokenFile(dir + "/train.bin", std::vector<int32_t>(20, 'a'), 2).ok());
  EXPECT_TRUE(WriteTokenFile(dir + "/val.bin", std::vector<int32_t>(10, 'b'), 2).ok());
  WriteText(dir + "/meta.pbtxt", meta.DebugString());
  return meta;
}

TEST(Dataset, OpensAConsistentDatasetAndExplainsInconsistentOnes) {
  TempDir dir;
  DatasetMeta meta = WriteSmallDataset(dir.path());
  absl::StatusOr<Dataset> dataset = Dataset::Open(dir.path());
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  EXPECT_EQ(dataset->train().size(), 20);
  EXPECT_EQ(dataset->val()[3], 'b');

  DatasetMeta wrong_count = meta;
  wrong_count.set_train_tokens(21);
  WriteText(dir / "meta.pbtxt", wrong_count.DebugString());
  dataset = Dataset::Open(dir.path());
  ASSERT_FALSE(dataset.ok());
  EXPECT_TRUE(Contains(dataset.status().message(), "train_tokens = 21"));

  DatasetMeta future = meta;
  future.set_format_version(kDatasetFormatVersion + 1);
  WriteText(dir / "meta.pbtxt", future.DebugString());
  dataset = Dataset::Open(dir.path());
  ASSERT_FALSE(dataset.ok());
  EXPECT_TRUE(Contains(dataset.status().message(), "format_version"));

  DatasetMeta small_vocab = meta;
  small_vocab.set_vocab_size(50);  // 'a' = 97 is out of range
  WriteText(dir / "meta.pbtxt", small_vocab.DebugString());
  EXPECT_FALSE(Dataset::Open(dir.path()).ok());

  WriteText(dir / "meta.pbtxt", "vocab_size: 256 no_such_field: 1");
  dataset = Dataset::Open(dir.path());
  ASSERT_FALSE(dataset.ok());
  EXPECT_TRUE(Contains(dataset.status().message(), "meta.pbtxt:1:"));

  EXPECT_EQ(Dataset::Open(dir / "nowhere").status().code(), absl::StatusCode::kNotFound);
}

// ---------------------------------------------------------------------------------------
// Samplers

TEST(TrainSampler, IsAPureFunctionOfSeedAndIndex) {
  TempDir dir;
  const TokenFile file = MakeCountingFile(dir, 5000);
  const int seq_len = 16, row = seq_len + 1;
  const TrainSampler sampler(file, seq_len, /*seed=*/42);
  std::vector<int64_t> first(8 * row), again(8 * row), resumed(4 * row), other_seed(8 * row);
  sampler.FillBatch(0, 8, first.data());
  sampler.FillBatch(0, 8, again.data());
  EXPECT_EQ(first, again);
  // Resuming at sample 4 (a fresh sampler, as after a restart) continues the same stream.
  TrainSampler(file, seq_len, 42).FillBatch(4, 4, resumed.data());
  EXPECT_TRUE(std::equal(resumed.begin(), resumed.end(), first.begin() + 4 * row));
  TrainSampler(file, seq_len, 43).FillBatch(0, 8, other_seed.data());
  EXPECT_NE(first, other_seed);
}

TEST(TrainSampler, WindowsAreContiguousAndCoverEveryStart) {
  TempDir dir;
  const int seq_len = 8, row = seq_len + 1;
  const TokenFile file = MakeCountingFile(dir, seq_len + 4);  // 4 possible starts: 0..3
  const TrainSampler sampler(file, seq_len, 7);
  std::vector<int64_t> batch(400 * row);
  sampler.FillBatch(1000, 400, batch.data());
  std::map<int64_t, int> starts;
  for (int b = 0; b < 400; ++b) {
    const int64_t start = batch[b * row];
    EXPECT_EQ(start, sampler.WindowStart(sampler.GlobalIndex(1000 + b)));
    for (int t = 0; t < row; ++t) EXPECT_EQ(batch[b * row + t], start + t);
    ++starts[start];
  }
  ASSERT_EQ(starts.size(), 4u);  // Never past the end, and the last start is reachable.
  EXPECT_EQ(starts.begin()->first, 0);
  EXPECT_EQ(starts.rbegin()->first, 3);
  for (const auto& [start, count] : starts) EXPECT_GT(count, 60) << "start " << start;
}

TEST(TrainSampler, DataParallelRanksPartitionTheSingleRankStream) {
  TempDir dir;
  const TokenFile file = MakeCountingFile(dir, 60000);
  const int seq_len = 4, row = seq_len + 1, ranks = 3, micro_batch = 4, accum = 2, steps = 5;
  const TrainSampler single(file, seq_len, 99);
  for (int step = 0; step < steps; ++step) {
    // One rank with a `ranks` times larger micro-batch...
    std::multiset<int64_t> expected;
    std::vector<int64_t> rows(ranks * micro_batch * row);
    for (int m = 0; m < accum; ++m) {
      single.FillBatch(static_cast<uint64_t>((step * accum + m) * ranks * micro_batch),
                       ranks * micro_batch, rows.data());
      for (int b = 0; b < ranks * micro_batch; ++b) expected.insert(rows[b * row]);
    }
    // ...reads exactly the samples that the ranks read together, none of them twice.
    std::multiset<int64_t> together;
    std::set<uint64_t> global_indices;
    for (int r = 0; r < ranks; ++r) {
      const TrainSampler rank(file, seq_len, 99, r, ranks);
      for (int m = 0; m < accum; ++m) {
        const uint64_t first = static_cast<uint64_t>((step * accum + m) * micro_batch);
        rank.FillBatch(first, micro_batch, rows.data());
        for (int b = 0; b < micro_batch; ++b) {
          together.insert(rows[b * row]);
          EXPECT_TRUE(global_indices.insert(rank.GlobalIndex(first + b)).second);
        }
      }
    }
    EXPECT_EQ(together, expected) << "step " << step;
  }
}

TEST(TrainSampler, ResumingAtTheConsumedSamplesContinuesTheStream) {
  TempDir dir;
  const TokenFile file = MakeCountingFile(dir, 60000);
  const int seq_len = 4, row = seq_len + 1;
  const uint64_t consumed = 48;  // e.g. 6 steps of 8 samples
  const TrainSampler uninterrupted(file, seq_len, 7);
  std::vector<int64_t> expected(16 * row), got(8 * row);
  uninterrupted.FillBatch(consumed, 16, expected.data());
  // Same layout: bit-identical continuation.
  const TrainSampler resumed(file, seq_len, 7, 0, 1, consumed);
  resumed.FillBatch(0, 8, got.data());
  EXPECT_TRUE(std::equal(got.begin(), got.end(), expected.begin()));
  // Two ranks after the resume read the same 16 samples between them.
  std::multiset<int64_t> want, have;
  for (int b = 0; b < 16; ++b) want.insert(expected[b * row]);
  for (int r = 0; r < 2; ++r) {
    const TrainSampler rank(file, seq_len, 7, r, 2, consumed);
    rank.FillBatch(0, 8, got.data());
    for (int b = 0; b < 8; ++b) have.insert(got[b * row]);
    EXPECT_EQ(rank.GlobalIndex(0), consumed + r);
  }
  EXPECT_EQ(have, want);
}

TEST(TrainSampler, CreateRejectsBadArguments) {
  TempDir dir;
  const TokenFile file = MakeCountingFile(dir, 10);
  EXPECT_TRUE(TrainSampler::Create(file, 9, 1).ok());
  const absl::StatusOr<TrainSampler> too_long = TrainSampler::Create(file, 10, 1);
  ASSERT_FALSE(too_long.ok());
  EXPECT_TRUE(Contains(too_long.status().message(), "seq_len"));
  EXPECT_FALSE(TrainSampler::Create(file, 0, 1).ok());
  EXPECT_FALSE(TrainSampler::Create(file, 4, 1, /*rank=*/2, /*size=*/2).ok());
  EXPECT_FALSE(EvalSampler::Create(file, 10).ok());
}

TEST(EvalSampler, FixedWindowsCoverTheFileOnceAndWrapAround) {
  TempDir dir;
  const int seq_len = 10, row = seq_len + 1;
  const TokenFile file = MakeCountingFile(dir, 1005);
  const EvalSampler sampler(file, seq_len);  // No seed: the windows are the file's own.
  ASSERT_EQ(sampler.num_windows(), 100);     // (1005 - 1) / 10
  std::vector<int64_t> all(sampler.num_windows() * row);
  sampler.FillBatch(0, sampler.num_windows(), all.data());
  std::set<int64_t> starts;
  for (int w = 0; w < sampler.num_windows(); ++w) {
    const int64_t start = all[w * row];
    EXPECT_EQ(start % seq_len, 0);
    for (int t = 0; t < row; ++t) EXPECT_EQ(all[w * row + t], start + t);
    starts.insert(start);
  }
  EXPECT_EQ(starts.size(), 100u);  // Every window exactly once.
  // The first few windows are already spread over the file.
  EXPECT_GT(*std::max_element(all.begin(), all.begin() + 4 * row), 500);
  // Wrapping: window num_windows + 2 is window 2; a second sampler agrees.
  std::vector<int64_t> wrapped(row), again(row);
  sampler.FillBatch(sampler.num_windows() + 2, 1, wrapped.data());
  EvalSampler(file, seq_len).FillBatch(2, 1, again.data());
  EXPECT_TRUE(std::equal(again.begin(), again.end(), all.begin() + 2 * row));
  EXPECT_EQ(wrapped, again);
}

// ---------------------------------------------------------------------------------------
// rmoe_prepare_data, run as a program

struct ToolRun {
  int exit_status;
  std::string out;
  std::string err;
};

ToolRun PrepareData(const std::string& job, const std::vector<std::string>& extra = {}) {
  std::vector<std::string> argv = {std::string(RMOE_TOOLS_DIR) + "/rmoe_prepare_data", "--job",
                                   job};
  argv.insert(argv.end(), extra.begin(), extra.end());
  absl::StatusOr<SubprocessResult> result = RunSubprocess(argv, "");
  EXPECT_TRUE(result.ok()) << result.status();
  if (!result.ok()) return {-1, "", ""};
  return {result->exit_status, result->stdout_data, result->stderr_data};
}

class PrepareDataTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // Two .txt files (read in name order), a file of another type that must be ignored,
    // blank lines and a CRLF line.
    std::vector<std::string> documents = SyntheticDocuments(60);
    documents.push_back("Ünïcödé document ½ with “quotes”");
    for (size_t i = 0; i < documents.size(); ++i) {
      (i % 2 ? second_ : first_) += documents[i] + (i % 7 == 0 ? "\r\n\n   \n" : "\n");
      documents_.insert(documents[i]);
    }
    WriteText(dir_ / "corpus/b.txt", second_);
    WriteText(dir_ / "corpus/a.txt", first_);
    WriteText(dir_ / "corpus/notes.md", "not a document\n");
  }

  std::string WriteJob(const std::string& tokenizer) {
    const std::string job = dir_ / "job.pbtxt";
    WriteText(job, absl::StrCat("data { dataset_dir: '", dir_ / "dataset", "' raw_text: '",
                                dir_ / "corpus", "' tokenizer { ", tokenizer,
                                " } val_fraction: 0.1 }\n"));
    return job;
  }

  // Decodes one split and checks it is some of the documents joined by the separator.
  void ExpectSplitIsDocuments(const Tokenizer& tokenizer, const TokenFile& file,
                              int64_t expected_documents) {
    std::vector<int32_t> tokens(file.size());
    for (int64_t i = 0; i < file.size(); ++i) tokens[i] = file[i];
    std::vector<std::vector<int32_t>> pieces(1);
    for (int32_t t : tokens) {
      if (t == tokenizer.document_separator()) {
        pieces.emplace_back();
      } else {
        pieces.back().push_back(t);
      }
    }
    EXPECT_EQ(static_cast<int64_t>(pieces.size()), expected_documents);
    for (const std::vector<int32_t>& piece : pieces) {
      absl::StatusOr<std::string> text = tokenizer.Decode(piece);
      ASSERT_TRUE(text.ok());
      EXPECT_TRUE(documents_.count(*text)) << "not a document: '" << *text << "'";
    }
  }

  TempDir dir_;
  std::string first_, second_;
  std::set<std::string> documents_;
};

TEST_F(PrepareDataTest, BuildsAByteDatasetAndThenReportsItUpToDate) {
  const std::string job = WriteJob("kind: BYTE");
  ToolRun run = PrepareData(job);
  ASSERT_EQ(run.exit_status, 0) << run.err;
  EXPECT_TRUE(Contains(run.out, "documents"));

  absl::StatusOr<Dataset> dataset = Dataset::Open(dir_ / "dataset");
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  const DatasetMeta& meta = dataset->meta();
  EXPECT_EQ(meta.vocab_size(), 256);
  EXPECT_EQ(meta.bytes_per_token(), 2);
  EXPECT_EQ(meta.document_separator(), '\n');
  EXPECT_EQ(meta.train_documents() + meta.val_documents(), 61);
  EXPECT_GE(meta.val_documents(), 1);
  EXPECT_EQ(meta.source_bytes(), static_cast<int64_t>(first_.size() + second_.size()));
  ASSERT_EQ(meta.sources_size(), 1);
  EXPECT_EQ(meta.sources(0), dir_ / "corpus");
  ByteTokenizer bytes;
  ExpectSplitIsDocuments(bytes, dataset->train(), meta.train_documents());
  ExpectSplitIsDocuments(bytes, dataset->val(), meta.val_documents());

  // The recorded entropy is that of train.bin's ids.
  std::map<int32_t, double> counts;
  for (int64_t i = 0; i < dataset->train().size(); ++i) ++counts[dataset->train()[i]];
  double entropy = 0;
  for (const auto& [id, count] : counts) {
    const double p = count / dataset->train().size();
    entropy -= p * std::log(p);
  }
  EXPECT_NEAR(meta.unigram_entropy_nats(), entropy, 1e-9);
  EXPECT_FALSE(fs::exists(dir_ / "dataset.partial"));

  run = PrepareData(job);
  ASSERT_EQ(run.exit_status, 0) << run.err;
  EXPECT_TRUE(Contains(run.out, "up to date"));
  run = PrepareData(job, {"--force"});
  ASSERT_EQ(run.exit_status, 0) << run.err;
  EXPECT_TRUE(Contains(run.out, "building"));
  // A changed setting rebuilds, and the val split is a pure function of the documents.
  run = PrepareData(job, {"--set", "data.val_fraction=0.3"});
  ASSERT_EQ(run.exit_status, 0) << run.err;
  EXPECT_TRUE(Contains(run.out, "building"));
  absl::StatusOr<Dataset> resplit = Dataset::Open(dir_ / "dataset");
  ASSERT_TRUE(resplit.ok());
  EXPECT_GT(resplit->meta().val_documents(), meta.val_documents());
}

TEST_F(PrepareDataTest, BuildsABpeDataset) {
  const std::string job = WriteJob("kind: BPE vocab_size: 300");
  const ToolRun run = PrepareData(job);
  ASSERT_EQ(run.exit_status, 0) << run.err;
  absl::StatusOr<Dataset> dataset = Dataset::Open(dir_ / "dataset");
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  const DatasetMeta& meta = dataset->meta();
  EXPECT_EQ(meta.vocab_size(), 300);
  EXPECT_EQ(meta.tokenizer().kind(), TokenizerSpec::BPE);
  EXPECT_EQ(meta.tokenizer().vocab_size(), 300);
  EXPECT_LT(meta.train_tokens(), meta.source_bytes() * 2 / 3);  // Merges were learned.
  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer =
      OpenTokenizer(meta, dir_ / "dataset", RMOE_TOOLS_DIR);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  ExpectSplitIsDocuments(**tokenizer, dataset->train(), meta.train_documents());
  ExpectSplitIsDocuments(**tokenizer, dataset->val(), meta.val_documents());
  EXPECT_TRUE(Contains(PrepareData(job).out, "up to date"));
}

TEST_F(PrepareDataTest, ExplainsMissingOrEmptyRawText) {
  const std::string job = WriteJob("kind: BYTE");
  ToolRun run = PrepareData(job, {"--set", "data.raw_text=" + (dir_ / "nothing_here")});
  EXPECT_EQ(run.exit_status, 1);
  EXPECT_TRUE(Contains(run.err, "data.raw_text[0]"));
  EXPECT_TRUE(Contains(run.err, "nothing_here"));

  WriteText(dir_ / "blank.txt", "\n  \n");
  run = PrepareData(job, {"--set", "data.raw_text=" + (dir_ / "blank.txt")});
  EXPECT_EQ(run.exit_status, 1);
  EXPECT_TRUE(Contains(run.err, "0 document(s)"));
  EXPECT_FALSE(fs::exists(dir_ / "dataset"));

  EXPECT_EQ(PrepareData(dir_ / "no_job.pbtxt").exit_status, 1);
  EXPECT_EQ(PrepareData(job, {"--bogus"}).exit_status, 2);
}

}  // namespace
}  // namespace rmoe
