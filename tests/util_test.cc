// rmoe/util: files, JSON, numbers from the environment and the command line.
#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "rmoe/util/cli.h"
#include "rmoe/util/env.h"
#include "rmoe/util/files.h"
#include "rmoe/util/json.h"
#include "rmoe/util/ownership.h"

namespace rmoe {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::string Msg(const absl::Status& status) { return std::string(status.message()); }

// A fresh directory per test, removed at the end.
class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "rmoe_util_test.XXXXXX").string();
    path_ = ::mkdtemp(pattern.data());
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

void Write(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

std::string Read(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFile(path);
  EXPECT_TRUE(text.ok()) << text.status();
  return text.ok() ? *text : "";
}

// ---------------------------------------------------------------------------------------
// Files

TEST(ReadFileTest, ReadsEveryByte) {
  TempDir dir;
  const std::string bytes("a\0b\nc", 5);
  Write(dir / "f", bytes);
  EXPECT_EQ(Read(dir / "f"), bytes);
}

TEST(ReadFileTest, MissingFileIsNotFoundAndNamed) {
  TempDir dir;
  absl::StatusOr<std::string> text = ReadFile(dir / "missing.pbtxt", "job spec");
  ASSERT_FALSE(text.ok());
  EXPECT_EQ(text.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Msg(text.status()), HasSubstr("cannot read job spec " + (dir / "missing.pbtxt")));
  EXPECT_THAT(Msg(text.status()), HasSubstr("No such file"));
}

TEST(ReadFileTest, DirectoryIsAnError) {
  TempDir dir;
  absl::StatusOr<std::string> text = ReadFile(dir.path());
  ASSERT_FALSE(text.ok());
  EXPECT_THAT(Msg(text.status()), HasSubstr(dir.path()));
}

TEST(WriteFileAtomicallyTest, CreatesAndReplaces) {
  TempDir dir;
  ASSERT_TRUE(WriteFileAtomically(dir / "f", "first").ok());
  EXPECT_EQ(Read(dir / "f"), "first");
  ASSERT_TRUE(WriteFileAtomically(dir / "f", "second, longer").ok());
  EXPECT_EQ(Read(dir / "f"), "second, longer");
  EXPECT_FALSE(fs::exists(dir / "f.tmp"));
}

TEST(WriteFileAtomicallyTest, FailedWriteLeavesTheOldFile) {
  TempDir dir;
  Write(dir / "f", "old");
  // A file size limit makes write() fail part way (EFBIG), as a full disk would.
  struct rlimit saved;
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &saved), 0);
  struct sigaction ignore {}, previous {};
  ignore.sa_handler = SIG_IGN;
  sigaction(SIGXFSZ, &ignore, &previous);
  struct rlimit small = saved;
  small.rlim_cur = 16;
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &small), 0);
  const absl::Status status = WriteFileAtomically(dir / "f", std::string(4096, 'x'));
  setrlimit(RLIMIT_FSIZE, &saved);
  sigaction(SIGXFSZ, &previous, nullptr);
  ASSERT_FALSE(status.ok());
  EXPECT_THAT(Msg(status), HasSubstr(dir / "f.tmp"));
  EXPECT_EQ(Read(dir / "f"), "old");
  EXPECT_FALSE(fs::exists(dir / "f.tmp"));
}

TEST(WriteFileAtomicallyTest, RefusesASymbolicLinkAtTheTemporaryName) {
  TempDir dir;
  Write(dir / "f", "old");
  Write(dir / "elsewhere", "not ours");
  fs::create_symlink(dir / "elsewhere", dir / "f.tmp");
  const absl::Status status = WriteFileAtomically(dir / "f", "new");
  ASSERT_FALSE(status.ok());
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(Msg(status), HasSubstr("symbolic link"));
  EXPECT_EQ(Read(dir / "f"), "old");
  EXPECT_EQ(Read(dir / "elsewhere"), "not ours");
  EXPECT_TRUE(fs::is_symlink(dir / "f.tmp"));
}

TEST(WriteFileAtomicallyTest, ReplacesATemporaryFileLeftByACrash) {
  TempDir dir;
  Write(dir / "f.tmp", "half a write");
  ASSERT_TRUE(WriteFileAtomically(dir / "f", "whole").ok());
  EXPECT_EQ(Read(dir / "f"), "whole");
  EXPECT_FALSE(fs::exists(dir / "f.tmp"));
}

TEST(WriteFileAtomicallyTest, MissingDirectoryIsNamed) {
  TempDir dir;
  const absl::Status status = WriteFileAtomically(dir / "no/such/f", "x");
  ASSERT_FALSE(status.ok());
  EXPECT_THAT(Msg(status), HasSubstr(dir / "no/such/f.tmp"));
}

TEST(AtomicFileWriterTest, OnlyACommitReplacesTheFile) {
  TempDir dir;
  Write(dir / "f", "old");
  for (const bool commit : {false, true}) {
    EXPECT_FALSE(fs::exists(dir / "f.tmp"));  // an abandoned writer removes its file
    absl::StatusOr<AtomicFileWriter> writer = AtomicFileWriter::Open(dir / "f");
    ASSERT_TRUE(writer.ok()) << writer.status();
    ASSERT_TRUE(writer->Append("new ").ok());
    ASSERT_TRUE(writer->Append("bytes").ok());
    EXPECT_TRUE(fs::exists(dir / "f.tmp"));
    EXPECT_EQ(Read(dir / "f"), "old");  // nothing shows before the commit
    if (!commit) continue;              // dropped: the temporary file must go with it
    ASSERT_TRUE(writer->Commit().ok());
    EXPECT_FALSE(writer->Append("more").ok());
  }
  EXPECT_EQ(Read(dir / "f"), "new bytes");
  EXPECT_FALSE(fs::exists(dir / "f.tmp"));
}

// ---------------------------------------------------------------------------------------
// Ownership marks

TEST(OwnershipTest, ReplacesOnlyOwnedDirectories) {
  TempDir dir;
  const std::string target = dir / "target", staged = dir / "staged";
  ASSERT_TRUE(CreateOwnedDirectory(target, {kModelKind, "run1"}).ok());
  Write(dir / "target/old_file", "old");
  ASSERT_TRUE(CreateOwnedDirectory(staged, {kModelKind, "run2"}).ok());
  Write(dir / "staged/new_file", "new");
  ASSERT_TRUE(ReplaceOwnedDirectory(staged, target, kModelKind).ok());
  EXPECT_EQ(Read(dir / "target/new_file"), "new");
  EXPECT_FALSE(fs::exists(dir / "target/old_file"));
  EXPECT_FALSE(fs::exists(dir / "staged"));
  EXPECT_FALSE(fs::exists(dir / "target.old"));
  EXPECT_TRUE(IsOwned(target, kModelKind, "run2"));
  EXPECT_FALSE(IsOwned(target, kModelKind, "run1"));
  EXPECT_FALSE(IsOwned(target, kDatasetKind));
}

TEST(OwnershipTest, AForeignDirectoryInTheWaySurvives) {
  TempDir dir;
  const std::string target = dir / "model", staged = dir / "staged";
  fs::create_directories(target);
  Write(dir / "model/thesis.tex", "years of work");
  ASSERT_TRUE(CreateOwnedDirectory(staged, {kModelKind, "run"}).ok());
  const absl::Status replaced = ReplaceOwnedDirectory(staged, target, kModelKind);
  EXPECT_EQ(replaced.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(replaced.message(), HasSubstr(target));
  EXPECT_THAT(replaced.message(), HasSubstr("rmoe did not create it"));
  EXPECT_EQ(Read(dir / "model/thesis.tex"), "years of work");
  EXPECT_TRUE(fs::exists(dir / "staged"));
  // Another kind's mark is not ours either.
  ASSERT_TRUE(CreateOwnedDirectory(dir / "data", {kDatasetKind, "r"}).ok());
  EXPECT_FALSE(RemoveOwnedDirectory(dir / "data", kModelKind).ok());
  EXPECT_TRUE(fs::exists(dir / "data"));
  // Nor is another run's.
  EXPECT_FALSE(RemoveOwnedDirectory(dir / "data", kDatasetKind, "other").ok());
  EXPECT_TRUE(RemoveOwnedDirectory(dir / "data", kDatasetKind, "r").ok());
  EXPECT_FALSE(fs::exists(dir / "data"));
  EXPECT_TRUE(RemoveOwnedDirectory(dir / "data", kDatasetKind).ok());  // gone: fine
}

TEST(OwnershipTest, NeverFollowsSymbolicLinks) {
  TempDir dir;
  const std::string victim = dir / "victim";
  ASSERT_TRUE(CreateOwnedDirectory(victim, {kModelKind, "run"}).ok());
  Write(dir / "victim/precious", "keep");
  // A link to an owned directory is not that directory.
  fs::create_directory_symlink(victim, dir / "link");
  EXPECT_FALSE(IsOwned(dir / "link", kModelKind));
  const absl::Status removed = RemoveOwnedDirectory(dir / "link", kModelKind);
  EXPECT_THAT(removed.message(), HasSubstr("symbolic link"));
  // A linked mark is refused too.
  fs::create_directories(dir / "other");
  fs::create_symlink(dir / ("victim/" + std::string(kOwnerMarkName)),
                   dir / ("other/" + std::string(kOwnerMarkName)));
  EXPECT_FALSE(IsOwned(dir / "other", kModelKind));
  EXPECT_FALSE(RemoveOwnedDirectory(dir / "other", kModelKind).ok());
  // Links inside an owned directory are removed, their targets kept.
  ASSERT_TRUE(CreateOwnedDirectory(dir / "owned", {kModelKind, "run"}).ok());
  fs::create_directory_symlink(victim, dir / "owned/inner");
  ASSERT_TRUE(RemoveOwnedDirectory(dir / "owned", kModelKind).ok());
  EXPECT_EQ(Read(dir / "victim/precious"), "keep");
}

// A crash inside CreateOwnedDirectory leaves a directory holding only the mark's temporary
// file (or nothing): such remains are removed; one more file makes the directory foreign.
TEST(OwnershipTest, TheRemainsOfAnInterruptedCreationAreRemoved) {
  TempDir dir;
  const std::string remains = dir / "step";
  fs::create_directories(remains);
  Write(remains + "/" + kOwnerMarkName + ".tmp", "rmoe chec");
  EXPECT_TRUE(RemoveOwnedDirectory(remains, kCheckpointKind, "run").ok());
  EXPECT_FALSE(fs::exists(remains));
  fs::create_directories(remains);
  EXPECT_TRUE(RemoveOwnedDirectory(remains, kCheckpointKind, "run").ok()) << "empty";
  fs::create_directories(remains);
  Write(remains + "/" + kOwnerMarkName + ".tmp", "x");
  Write(remains + "/data", "mine");
  EXPECT_FALSE(RemoveOwnedDirectory(remains, kCheckpointKind, "run").ok());
  EXPECT_EQ(Read(remains + "/data"), "mine");
  // Replacing over such remains works.
  ASSERT_TRUE(CreateOwnedDirectory(dir / "staged", {kModelKind, "r"}).ok());
  fs::create_directories(dir / "model");
  ASSERT_TRUE(ReplaceOwnedDirectory(dir / "staged", dir / "model", kModelKind).ok());
  EXPECT_TRUE(IsOwned(dir / "model", kModelKind, "r"));
}

TEST(OwnershipTest, MarksReadBack) {
  TempDir dir;
  EXPECT_FALSE(ReadOwnerMark(dir.path()).value().has_value());
  ASSERT_TRUE(WriteOwnerMark(dir.path(), {kCheckpointRootKind, NewRunId()}).ok());
  auto mark = ReadOwnerMark(dir.path());
  ASSERT_TRUE(mark.ok() && mark->has_value());
  EXPECT_EQ((*mark)->kind, kCheckpointRootKind);
  EXPECT_EQ((*mark)->run_id.size(), 16u);
  EXPECT_NE(NewRunId(), NewRunId());
  Write(dir / kOwnerMarkName, "garbage");
  EXPECT_THAT(ReadOwnerMark(dir.path()).status().message(), HasSubstr("was not written by rmoe"));
  EXPECT_EQ(CreateOwnedDirectory(dir.path(), {kModelKind, "r"}).code(),
            absl::StatusCode::kAlreadyExists);
}

TEST(FindExecutableTest, SearchesThePath) {
  EXPECT_EQ(FindExecutable("./x/y"), "./x/y");
  EXPECT_THAT(FindExecutable("sh"), HasSubstr("/sh"));
  EXPECT_EQ(FindExecutable("rmoe-no-such-program"), "");
}

// ---------------------------------------------------------------------------------------
// JSON

TEST(JsonTest, ObjectRoundTrips) {
  const std::string text = "quote \" backslash \\ newline \n tab \t bell \x07 é";
  JsonObject inner;
  inner.Add("n", int64_t{3});
  JsonObject object;
  object.Add("int", int64_t{-1234567890123})
      .Add("double", 0.1)
      .Add("nan", std::nan(""))
      .Add("text", text)
      .Add("ints", std::vector<int64_t>{1, 2})
      .Add("doubles", std::vector<double>{1.5, INFINITY})
      .Add("strings", std::vector<std::string>{"a", "b\"c"})
      .AddRaw("inner", inner.str());

  JsonValue parsed;
  ASSERT_TRUE(ParseJson(object.str(), &parsed)) << object.str();
  ASSERT_EQ(parsed.type, JsonValue::kObject);
  EXPECT_EQ(parsed.Number("int"), -1234567890123.0);
  EXPECT_EQ(parsed.Number("double"), 0.1);  // 17 digits: exact
  EXPECT_EQ(parsed.Get("nan")->type, JsonValue::kNull);
  EXPECT_TRUE(std::isnan(parsed.Number("nan")));
  EXPECT_EQ(parsed.Get("text")->string, text);
  ASSERT_EQ(parsed.Get("ints")->array.size(), 2u);
  EXPECT_EQ(parsed.Get("ints")->array[1].number, 2);
  EXPECT_EQ(parsed.Get("doubles")->array[1].type, JsonValue::kNull);
  EXPECT_EQ(parsed.Get("strings")->array[1].string, "b\"c");
  EXPECT_EQ(parsed.Get("inner")->Number("n"), 3);
  EXPECT_EQ(parsed.Get("missing"), nullptr);
  EXPECT_EQ(JsonArray({inner, inner}), "[{\"n\":3},{\"n\":3}]");
}

TEST(JsonTest, ReadsEscapesAndLenientNumbers) {
  JsonValue v;
  ASSERT_TRUE(ParseJson(R"( {"s": "\u00e9\ud83d\ude00\/", "a": [NaN, -Infinity, true, null]} )", &v));
  EXPECT_EQ(v.Get("s")->string, "\xc3\xa9\xf0\x9f\x98\x80/");
  EXPECT_TRUE(std::isnan(v.Get("a")->array[0].number));
  EXPECT_EQ(v.Get("a")->array[1].number, -INFINITY);
  EXPECT_TRUE(v.Get("a")->array[2].boolean);
}

TEST(JsonTest, IndentKeepsValuesAndArraysAsWritten) {
  const std::string compact =
      R"({"a":1e-05,"b":{"c":[1,2,{"d":3}],"s":"x,{y}:\"z\""},"e":true})";
  EXPECT_EQ(IndentJson(compact),
            "{\n  \"a\": 1e-05,\n  \"b\": {\n    \"c\": [1, 2, {\"d\":3}],\n"
            "    \"s\": \"x,{y}:\\\"z\\\"\"\n  },\n  \"e\": true\n}");
  JsonValue parsed;
  ASSERT_TRUE(ParseJson(IndentJson(compact), &parsed));
  EXPECT_EQ(parsed.Get("b")->Get("s")->string, "x,{y}:\"z\"");
}

// JSON text is UTF-8: characters pass through, a lone byte of a multi-byte character (a
// byte-level token's text) becomes U+FFFD instead of making the whole file unreadable.
TEST(JsonTest, StringsAreAlwaysValidUtf8) {
  EXPECT_EQ(JsonString("caf\xc3\xa9 \xe2\x82\xac"), "\"caf\xc3\xa9 \xe2\x82\xac\"");
  EXPECT_EQ(JsonString("a\xc3"), "\"a\\ufffd\"");
  EXPECT_EQ(JsonString("\xa9" "b"), "\"\\ufffdb\"");
  EXPECT_EQ(JsonString("\xed\xa0\x80"), "\"\\ufffd\\ufffd\\ufffd\"");  // a surrogate
  EXPECT_EQ(JsonString("\xc0\xaf"), "\"\\ufffd\\ufffd\"");              // overlong '/'
  JsonValue parsed;
  ASSERT_TRUE(ParseJson(JsonString("x\xffy"), &parsed));
  EXPECT_EQ(parsed.string, "x\xef\xbf\xbdy");
}

TEST(JsonTest, RejectsMalformedText) {
  JsonValue v;
  for (const char* bad : {"", "{", "{\"a\":1,}", "[1 2]", "{\"a\" 1}", "\"open", "1 2", "tru",
                          "{\"a\":\"\\x\"}"}) {
    EXPECT_FALSE(ParseJson(bad, &v)) << bad;
  }
  EXPECT_TRUE(ParseJson(std::string(64, '[') + std::string(64, ']'), &v));
  EXPECT_FALSE(ParseJson(std::string(66, '[') + std::string(66, ']'), &v));
}

// ---------------------------------------------------------------------------------------
// Environment variables

TEST(EnvTest, UnsetOrEmptyGivesTheDefault) {
  ::unsetenv("RMOE_UTIL_TEST");
  EXPECT_EQ(*IntFromEnv("RMOE_UTIL_TEST", 7), 7);
  ::setenv("RMOE_UTIL_TEST", "", 1);
  EXPECT_EQ(*NumberFromEnv("RMOE_UTIL_TEST", 2.5), 2.5);
}

TEST(EnvTest, ReadsValues) {
  ::setenv("RMOE_UTIL_TEST", "-12", 1);
  EXPECT_EQ(*IntFromEnv("RMOE_UTIL_TEST", 0), -12);
  ::setenv("RMOE_UTIL_TEST", "0.25", 1);
  EXPECT_EQ(*NumberFromEnv("RMOE_UTIL_TEST", 0, {0, 1, true}), 0.25);
  ::unsetenv("RMOE_UTIL_TEST");
}

TEST(EnvTest, MalformedValuesNameTheVariableAndTheRange) {
  ::setenv("RMOE_UTIL_TEST", "12s", 1);
  absl::StatusOr<double> seconds = NumberFromEnv("RMOE_UTIL_TEST", 600, {0});
  ASSERT_FALSE(seconds.ok());
  EXPECT_EQ(seconds.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Msg(seconds.status()),
            "environment variable RMOE_UTIL_TEST=\"12s\": expected a number >= 0, or unset");
  ::setenv("RMOE_UTIL_TEST", "9", 1);
  EXPECT_THAT(Msg(IntFromEnv("RMOE_UTIL_TEST", 0, 0, 7).status()),
              HasSubstr("expected an integer in [0, 7]"));
  for (const char* bad : {"1.5", " 3", "3 ", "0x10", "99999999999999999999"}) {
    ::setenv("RMOE_UTIL_TEST", bad, 1);
    EXPECT_FALSE(IntFromEnv("RMOE_UTIL_TEST", 0).ok()) << bad;
  }
  for (const char* bad : {"nan", "inf", "0"}) {
    ::setenv("RMOE_UTIL_TEST", bad, 1);
    EXPECT_FALSE(NumberFromEnv("RMOE_UTIL_TEST", 1, {0, 1, true}).ok()) << bad;
  }
  EXPECT_THAT(Msg(NumberFromEnv("RMOE_UTIL_TEST", 1, {0, 1, true}).status()),
              HasSubstr("expected a number in (0, 1]"));
  ::unsetenv("RMOE_UTIL_TEST");
}

// ---------------------------------------------------------------------------------------
// Command line

cli::Parser TrainLike() {
  cli::Parser parser;
  parser.Value("--job", "a path")
      .Repeated("--set", "FIELD=VALUE")
      .OptionalValue("--resume", "<latest>")
      .Switch("--dry-run")
      .Switch("--quiet");
  return parser;
}

absl::StatusOr<cli::Args> Parse(const cli::Parser& parser, std::vector<std::string> args) {
  return parser.Parse(args);
}

TEST(CliTest, ValuesSwitchesAndRepeats) {
  auto args = Parse(TrainLike(), {"--job", "a.pbtxt", "--set", "x=1", "--set=y=-2", "--quiet"});
  ASSERT_TRUE(args.ok()) << args.status();
  EXPECT_FALSE(args->help());
  EXPECT_EQ(args->Get("--job"), "a.pbtxt");
  EXPECT_THAT(args->All("--set"), ElementsAre("x=1", "y=-2"));
  EXPECT_TRUE(args->Has("--quiet"));
  EXPECT_FALSE(args->Has("--dry-run"));
  EXPECT_EQ(args->Get("--resume", "none"), "none");
  EXPECT_TRUE(args->All("--resume").empty());
}

TEST(CliTest, OptionalValue) {
  EXPECT_EQ(Parse(TrainLike(), {"--resume"})->Get("--resume"), "<latest>");
  EXPECT_EQ(Parse(TrainLike(), {"--resume", "--quiet"})->Get("--resume"), "<latest>");
  EXPECT_EQ(Parse(TrainLike(), {"--resume", "ckpt/step_4"})->Get("--resume"), "ckpt/step_4");
  EXPECT_EQ(Parse(TrainLike(), {"--resume=ckpt"})->Get("--resume"), "ckpt");
}

TEST(CliTest, ErrorsNameTheFlagAndWhatItExpects) {
  EXPECT_EQ(Msg(Parse(TrainLike(), {"--job"}).status()), "--job needs a path");
  EXPECT_EQ(Msg(Parse(TrainLike(), {"--set"}).status()), "--set needs FIELD=VALUE");
  EXPECT_EQ(Msg(Parse(TrainLike(), {"--jobs", "x"}).status()), "unknown option \"--jobs\"");
  EXPECT_EQ(Msg(Parse(TrainLike(), {"--quiet=yes"}).status()), "--quiet takes no value");
  EXPECT_EQ(Msg(Parse(TrainLike(), {"stray"}).status()), "unexpected argument \"stray\"");
  EXPECT_THAT(Msg(Parse(TrainLike(), {"--job", "a", "--job", "b"}).status()),
              HasSubstr("--job was given twice"));
  EXPECT_EQ(Parse(TrainLike(), {"--job"}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Msg(cli::Parser("for encode").Parse({"--vocab-size", "8"}).status()),
            "unknown option \"--vocab-size\" for encode");
}

TEST(CliTest, HelpWinsAnywhere) {
  EXPECT_TRUE(Parse(TrainLike(), {"--bogus", "--help"})->help());
  EXPECT_TRUE(Parse(TrainLike(), {"-h", "--job"})->help());
  // A value that happens to read "-h" is a value.
  auto args = Parse(TrainLike(), {"--job", "-h"});
  ASSERT_TRUE(args.ok());
  EXPECT_FALSE(args->help());
  EXPECT_EQ(args->Get("--job"), "-h");
  EXPECT_TRUE(cli::AsksForHelp({"inspect", "x", "--help"}));
  EXPECT_FALSE(cli::AsksForHelp({"inspect", "x"}));
}

TEST(CliTest, Positionals) {
  cli::Parser parser;
  parser.Positionals(2).Switch("--tensors");
  auto args = Parse(parser, {"inspect", "--tensors", "-"});
  ASSERT_TRUE(args.ok()) << args.status();
  EXPECT_THAT(args->positional(), ElementsAre("inspect", "-"));
  EXPECT_EQ(Msg(Parse(parser, {"a", "b", "c"}).status()), "unexpected argument \"c\"");
  EXPECT_THAT(cli::Arguments(0, nullptr), ElementsAre());
}

TEST(CliTest, TypedValues) {
  cli::Parser parser;
  parser.Value("--n", "N").Value("--p", "P").Value("--list", "N,N,...");
  auto args = Parse(parser, {"--n", "12", "--p=0.5", "--list", "4,8"});
  ASSERT_TRUE(args.ok()) << args.status();
  EXPECT_EQ(*args->Int("--n", 0, 0), 12);
  EXPECT_EQ(*args->Int("--missing", 3), 3);
  EXPECT_EQ(*args->Number("--p", 1, {0, 1, true}), 0.5);
  EXPECT_THAT(*args->IntList("--list", {}), ElementsAre(4, 8));
  EXPECT_THAT(*args->IntList("--missing", {2}), ElementsAre(2));
  EXPECT_EQ(Msg(args->Int("--n", 0, 0, 7).status()), "--n 12: expected an integer in [0, 7]");

  auto bad = Parse(parser, {"--n", "1.5", "--p", "0", "--list", "4,x"});
  ASSERT_TRUE(bad.ok());
  EXPECT_EQ(Msg(bad->Int("--n", 0, 0).status()), "--n 1.5: expected an integer >= 0");
  EXPECT_EQ(Msg(bad->Number("--p", 1, {0, 1, true}).status()),
            "--p 0: expected a number in (0, 1]");
  EXPECT_EQ(Msg(bad->IntList("--list", {}).status()),
            "--list 4,x: expected comma-separated integers >= 1");
  EXPECT_FALSE(Parse(parser, {"--list", ","})->IntList("--list", {}).ok());
}

}  // namespace
}  // namespace rmoe
