// rmoe_tokenize: SentencePiece BPE as a program.
//
// libsentencepiece cannot share a process with libprotobuf or libtorch (it bundles its own
// protobuf), so the trainer, the generator and rmoe_prepare_data run this program to train,
// encode and decode (rmoe/data/subprocess_tokenizer.h). It links neither protobuf nor torch.
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include <absl/strings/str_cat.h>
#include "rmoe/data/bpe_tokenizer.h"
#include "rmoe/data/token_text.h"
#include "rmoe/util/cli.h"

namespace rmoe {
namespace {

constexpr char kUsage[] = R"(Usage: rmoe_tokenize COMMAND --model PATH [options]

SentencePiece BPE for RMoE, reading stdin and writing stdout. Other RMoE programs run it
because SentencePiece cannot be loaded next to libtorch or protobuf.

Commands:
  encode   Encode stdin (all of it, as one text) and print its token ids, separated by
           spaces, on one line.
           --nul  stdin holds NUL-terminated texts instead; print one line of ids per text.
  decode   Read token ids separated by whitespace and print their text (exactly, with no
           newline added).
  info     Print "vocab_size N" and "document_separator ID" (the </s> id), one per line.
  train    Train a BPE model on stdin and write it to --model.
           --vocab-size N            pieces in the model, including <unk>, <s>, </s> and the
                                     256 byte pieces (required)
           --max-training-chars N    bytes of text given to the trainer, spread over the
                                     input (default 20000000)
           --threads N               trainer threads (default 2)
           --nul                     stdin holds NUL-terminated documents (default: one
                                     document per line)

Examples:
  echo -n "Hello world" | rmoe_tokenize encode --model data/prepared/tokenizer.model
  echo "1034 295 9" | rmoe_tokenize decode --model data/prepared/tokenizer.model

Exit status: 0 on success, 1 on a runtime error, 2 on a usage error (message on stderr).
)";

struct Args {
  std::string command;
  std::string model;
  bool nul = false;
  int vocab_size = 0;
  int64_t max_training_chars = 20000000;
  int threads = 2;
};

[[noreturn]] void UsageError(const std::string& message) {
  std::fprintf(stderr, "rmoe_tokenize: %s\nRun 'rmoe_tokenize --help' for usage.\n",
               message.c_str());
  std::exit(2);
}

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "rmoe_tokenize: %s\n", std::string(status.message()).c_str());
  return 1;
}

// The flag's value, a positive integer, or the default when it was not given.
int64_t PositiveInt(const cli::Args& args, const std::string& flag, int64_t fallback,
                    int64_t max = std::numeric_limits<int>::max()) {
  absl::StatusOr<int64_t> value = args.Int(flag, fallback, 1, max);
  if (!value.ok()) UsageError(std::string(value.status().message()));
  return *value;
}

Args ParseArgs(int argc, char** argv) {
  const std::vector<std::string> words = cli::Arguments(argc, argv);
  if (cli::AsksForHelp(words)) std::exit(cli::PrintUsage(kUsage));
  if (words.empty()) UsageError("missing COMMAND (encode, decode, info or train)");
  Args args;
  args.command = words[0];
  if (args.command != "encode" && args.command != "decode" && args.command != "info" &&
      args.command != "train") {
    UsageError(absl::StrCat("unknown command '", args.command,
                            "'; expected encode, decode, info or train"));
  }
  cli::Parser parser("for " + args.command);
  parser.Value("--model", "a path").Switch("--nul");
  if (args.command == "train") {
    parser.Value("--vocab-size", "a positive integer")
        .Value("--max-training-chars", "a positive integer")
        .Value("--threads", "a positive integer");
  }
  absl::StatusOr<cli::Args> flags =
      parser.Parse(std::vector<std::string>(words.begin() + 1, words.end()));
  if (!flags.ok()) UsageError(std::string(flags.status().message()));
  args.model = flags->Get("--model");
  args.nul = flags->Has("--nul");
  args.vocab_size = static_cast<int>(PositiveInt(*flags, "--vocab-size", 0));
  args.max_training_chars = PositiveInt(*flags, "--max-training-chars", args.max_training_chars,
                                        std::numeric_limits<int64_t>::max());
  args.threads = static_cast<int>(PositiveInt(*flags, "--threads", args.threads));
  if (args.model.empty()) UsageError("--model PATH is required");
  if (args.command == "train" && args.vocab_size == 0) UsageError("train needs --vocab-size N");
  return args;
}

std::string ReadAllStdin() {
  std::string data;
  char buffer[1 << 16];
  size_t n;
  while ((n = std::fread(buffer, 1, sizeof(buffer), stdin)) > 0) data.append(buffer, n);
  return data;
}

bool WriteStdout(const std::string& data) {
  return std::fwrite(data.data(), 1, data.size(), stdout) == data.size() &&
         std::fflush(stdout) == 0;
}

// Texts separated by `separator`; a final text need not be terminated. With '\n', empty
// lines are dropped (a blank line is not a document); with NUL every record counts.
std::vector<std::string> SplitRecords(const std::string& data, char separator) {
  std::vector<std::string> records;
  size_t start = 0;
  while (start < data.size()) {
    size_t end = data.find(separator, start);
    if (end == std::string::npos) end = data.size();
    if (separator == '\0' || end > start) records.push_back(data.substr(start, end - start));
    start = end + 1;
  }
  return records;
}

int Train(const Args& args) {
  const std::vector<std::string> documents = SplitRecords(ReadAllStdin(), args.nul ? '\0' : '\n');
  BpeTrainOptions options;
  options.vocab_size = args.vocab_size;
  options.max_training_chars = args.max_training_chars;
  options.num_threads = args.threads;
  const absl::Status status = BpeTokenizer::Train(documents, options, args.model);
  return status.ok() ? 0 : Fail(status);
}

int Run(const Args& args) {
  if (args.command == "train") return Train(args);
  absl::StatusOr<std::unique_ptr<BpeTokenizer>> tokenizer = BpeTokenizer::Load(args.model);
  if (!tokenizer.ok()) return Fail(tokenizer.status());
  std::string output;
  if (args.command == "info") {
    output = absl::StrCat("vocab_size ", (*tokenizer)->vocab_size(), "\ndocument_separator ",
                          (*tokenizer)->document_separator(), "\n");
  } else if (args.command == "encode") {
    const std::string input = ReadAllStdin();
    const std::vector<std::string> texts =
        args.nul ? SplitRecords(input, '\0') : std::vector<std::string>{input};
    for (const std::string& text : texts) {
      absl::StatusOr<std::vector<int32_t>> ids = (*tokenizer)->Encode(text);
      if (!ids.ok()) return Fail(ids.status());
      absl::StrAppend(&output, FormatIds(*ids), "\n");
    }
  } else {  // decode
    absl::StatusOr<std::vector<int32_t>> ids = ParseIds(ReadAllStdin(), "stdin");
    if (!ids.ok()) return Fail(ids.status());
    absl::StatusOr<std::string> text = (*tokenizer)->Decode(*ids);
    if (!text.ok()) return Fail(text.status());
    output = *std::move(text);
  }
  if (!WriteStdout(output)) return Fail(absl::InternalError("cannot write to stdout"));
  return 0;
}

}  // namespace
}  // namespace rmoe

int main(int argc, char** argv) { return rmoe::Run(rmoe::ParseArgs(argc, argv)); }
