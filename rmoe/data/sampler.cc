#include "rmoe/data/sampler.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>

#include <absl/strings/str_cat.h>

namespace rmoe {
namespace {

absl::Status CheckWindow(const TokenFile& tokens, int seq_len, absl::string_view user) {
  if (seq_len < 1) {
    return absl::InvalidArgumentError(absl::StrCat(user, ": seq_len = ", seq_len, " must be >= 1"));
  }
  if (tokens.size() < static_cast<int64_t>(seq_len) + 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        user, ": '", tokens.path(), "' has ", tokens.size(), " tokens, fewer than seq_len + 1 = ",
        seq_len + 1, "; lower schedule.seq_len or prepare more data"));
  }
  return absl::OkStatus();
}

absl::Status CheckTrain(const TokenFile& tokens, int seq_len, int rank, int size) {
  if (size < 1 || rank < 0 || rank >= size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "TrainSampler: data-parallel rank ", rank, " must be in [0, size = ", size, ")"));
  }
  return CheckWindow(tokens, seq_len, "TrainSampler");
}

void DieUnlessOk(const absl::Status& status) {
  if (status.ok()) return;
  std::fprintf(stderr, "fatal: %s\n", status.ToString().c_str());
  std::abort();
}

}  // namespace

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

absl::StatusOr<TrainSampler> TrainSampler::Create(const TokenFile& tokens, int seq_len,
                                                  uint64_t seed, int data_parallel_rank,
                                                  int data_parallel_size,
                                                  uint64_t first_global_sample) {
  absl::Status status = CheckTrain(tokens, seq_len, data_parallel_rank, data_parallel_size);
  if (!status.ok()) return status;
  return TrainSampler(tokens, seq_len, seed, data_parallel_rank, data_parallel_size,
                      first_global_sample);
}

TrainSampler::TrainSampler(const TokenFile& tokens, int seq_len, uint64_t seed,
                           int data_parallel_rank, int data_parallel_size,
                           uint64_t first_global_sample)
    : tokens_(&tokens),
      seq_len_(seq_len),
      // Hashing the seed first keeps nearby seeds (1, 2, 3) from giving related streams.
      key_(SplitMix64(seed ^ 0x5851f42d4c957f2dULL)),
      rank_(data_parallel_rank),
      size_(data_parallel_size),
      first_(first_global_sample) {
  DieUnlessOk(CheckTrain(tokens, seq_len, data_parallel_rank, data_parallel_size));
}

int64_t TrainSampler::WindowStart(uint64_t global_index) const {
  const uint64_t hash = SplitMix64(key_ ^ SplitMix64(global_index));
  const uint64_t num_starts = static_cast<uint64_t>(tokens_->size() - seq_len_);
  // Lemire's multiply-shift maps the hash onto [0, num_starts) without modulo bias to speak of.
  return static_cast<int64_t>((static_cast<unsigned __int128>(hash) * num_starts) >> 64);
}

void TrainSampler::FillBatch(uint64_t first_sample_index, int batch_size, int64_t* out) const {
  const int64_t row = seq_len_ + 1;
  for (int b = 0; b < batch_size; ++b) {
    tokens_->Read(WindowStart(GlobalIndex(first_sample_index + b)), row, out + b * row);
  }
}

absl::StatusOr<EvalSampler> EvalSampler::Create(const TokenFile& tokens, int seq_len) {
  absl::Status status = CheckWindow(tokens, seq_len, "EvalSampler");
  if (!status.ok()) return status;
  return EvalSampler(tokens, seq_len);
}

EvalSampler::EvalSampler(const TokenFile& tokens, int seq_len)
    : tokens_(&tokens), seq_len_(seq_len), num_windows_(0), stride_(1) {
  DieUnlessOk(CheckWindow(tokens, seq_len, "EvalSampler"));
  num_windows_ = static_cast<int>(std::min<int64_t>((tokens.size() - 1) / seq_len, INT_MAX));
  const double inverse_golden_ratio = 0.6180339887498949;
  stride_ = std::max<int64_t>(1, std::llround(num_windows_ * inverse_golden_ratio));
  while (std::gcd(stride_, static_cast<int64_t>(num_windows_)) != 1) ++stride_;
}

int64_t EvalSampler::WindowStart(int64_t window) const {
  const int64_t n = num_windows_;
  const int64_t w = ((window % n) + n) % n;
  const int64_t slot = static_cast<int64_t>(
      (static_cast<unsigned __int128>(w) * static_cast<uint64_t>(stride_)) % n);
  return slot * seq_len_;
}

void EvalSampler::FillBatch(int first_window, int batch_size, int64_t* out) const {
  const int64_t row = seq_len_ + 1;
  for (int b = 0; b < batch_size; ++b) {
    tokens_->Read(WindowStart(static_cast<int64_t>(first_window) + b), row, out + b * row);
  }
}

}  // namespace rmoe
