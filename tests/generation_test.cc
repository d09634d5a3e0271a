// Generation: the KV cache (and the token-recurrent router's cached state) reproduces full
// recomputation, the sampling filters keep exactly the right tokens, and a seed fixes the text.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "rmoe/model/generation.h"
#include "rmoe/model/transformer.h"
#include "tests/test_util.h"

namespace rmoe {
namespace {

using testing::AllRouters;
using testing::RouterCase;
using testing::TinyModel;

class CachedDecoding : public ::testing::TestWithParam<RouterCase> {};

TEST_P(CachedDecoding, EqualsFullRecomputation) {
  torch::manual_seed(11);
  Transformer model(TinyModel(GetParam()));
  model->eval();
  torch::NoGradGuard no_grad;
  auto tokens = torch::randint(37, {2, 14});
  auto full = model->forward(tokens).logits;

  // Prefill 5 tokens, then 3, then one at a time.
  auto cache = model->NewCache();
  std::vector<torch::Tensor> pieces;
  int64_t position = 0;
  for (int64_t chunk : {5, 3, 1, 1, 1, 1, 1, 1}) {
    pieces.push_back(model->forward(tokens.narrow(1, position, chunk), &cache).logits);
    position += chunk;
  }
  ASSERT_EQ(position, 14);
  EXPECT_EQ(cache.length(), 14);
  auto incremental = torch::cat(pieces, 1);
  EXPECT_TRUE(torch::allclose(incremental, full, 1e-4, 1e-5))
      << "max difference " << (incremental - full).abs().max().item<double>();
}

INSTANTIATE_TEST_SUITE_P(AllRouters, CachedDecoding, ::testing::ValuesIn(AllRouters()),
                         [](const auto& info) { return info.param.name; });

std::vector<int64_t> Kept(const torch::Tensor& probs) {
  std::vector<int64_t> kept;
  for (int64_t i = 0; i < probs.numel(); ++i) {
    if (probs[i].item<double>() > 0) kept.push_back(i);
  }
  return kept;
}

TEST(Sampling, TopKKeepsExactlyTheKMostLikely) {
  auto logits = torch::tensor({0.1, 3.0, -1.0, 2.0, 2.5, 0.0});
  SamplingOptions options;
  options.top_k = 3;
  auto probs = SamplingDistribution(logits, options);
  EXPECT_EQ(Kept(probs), (std::vector<int64_t>{1, 3, 4}));
  EXPECT_NEAR(probs.sum().item<double>(), 1.0, 1e-12);
  // Renormalised softmax over the kept three.
  auto expected = torch::softmax(torch::tensor({3.0, 2.0, 2.5}, torch::kDouble), 0);
  EXPECT_NEAR(probs[1].item<double>(), expected[0].item<double>(), 1e-12);
}

TEST(Sampling, TopPKeepsTheSmallestSetReachingP) {
  // Probabilities 0.5, 0.25, 0.125, 0.125 (log-space logits).
  auto logits = torch::log(torch::tensor({0.125, 0.5, 0.125, 0.25}, torch::kDouble));
  SamplingOptions options;
  options.top_p = 0.7;  // 0.5 < 0.7 <= 0.75: tokens 1 and 3
  EXPECT_EQ(Kept(SamplingDistribution(logits, options)), (std::vector<int64_t>{1, 3}));
  options.top_p = 0.75;  // exactly reached by tokens 1 and 3
  EXPECT_EQ(Kept(SamplingDistribution(logits, options)), (std::vector<int64_t>{1, 3}));
  options.top_p = 0.3;  // the most likely token alone already reaches it
  EXPECT_EQ(Kept(SamplingDistribution(logits, options)), (std::vector<int64_t>{1}));
  options.top_p = 0.76;  // needs a third token: of the two tied at 0.125, the lower id
  EXPECT_EQ(Kept(SamplingDistribution(logits, options)), (std::vector<int64_t>{0, 1, 3}));
  options.top_p = 0.9;
  EXPECT_EQ(Kept(SamplingDistribution(logits, options)).size(), 4u);
  // top-k then top-p.
  options.top_p = 0.9;
  options.top_k = 2;
  EXPECT_EQ(Kept(SamplingDistribution(logits, options)), (std::vector<int64_t>{1, 3}));
}

TEST(Sampling, TemperatureZeroIsGreedyAndTemperatureSharpens) {
  auto logits = torch::tensor({0.0, 1.0, 0.5});
  SamplingOptions options;
  options.temperature = 0;
  EXPECT_EQ(Kept(SamplingDistribution(logits, options)), (std::vector<int64_t>{1}));
  options.temperature = 0.5;
  auto cold = SamplingDistribution(logits, options);
  options.temperature = 2.0;
  auto hot = SamplingDistribution(logits, options);
  EXPECT_GT(cold[1].item<double>(), hot[1].item<double>());
}

TEST(Sampling, InverseCdfDrawsFromTheDistribution) {
  auto probs = torch::tensor({0.0, 0.25, 0.0, 0.75}, torch::kDouble);
  EXPECT_EQ(SampleFromDistribution(probs, 0.0), 1);
  EXPECT_EQ(SampleFromDistribution(probs, 0.2499), 1);
  EXPECT_EQ(SampleFromDistribution(probs, 0.25), 3);
  EXPECT_EQ(SampleFromDistribution(probs, 0.99999999), 3);
}

TEST(Generate, SameSeedSameTextAndDifferentSeedDifferentText) {
  torch::manual_seed(12);
  Transformer model(TinyModel(AllRouters()[3]));
  SamplingOptions options;
  options.max_new_tokens = 20;
  options.temperature = 1.5;
  options.seed = 42;
  auto a = Generate(model, {1, 2, 3}, options);
  auto b = Generate(model, {1, 2, 3}, options);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(*a, *b);
  EXPECT_EQ(a->size(), 20u);
  options.seed = 43;
  auto c = Generate(model, {1, 2, 3}, options);
  ASSERT_TRUE(c.ok());
  EXPECT_NE(*a, *c);
}

TEST(Generate, GreedyDecodingFollowsTheArgmaxOfFullRecomputation) {
  torch::manual_seed(13);
  Transformer model(TinyModel(AllRouters()[1]));
  SamplingOptions options;
  options.max_new_tokens = 6;
  options.temperature = 0;
  std::vector<int64_t> prompt{4, 5, 6};
  auto generated = Generate(model, prompt, options);
  ASSERT_TRUE(generated.ok());
  std::vector<int64_t> sequence = prompt;
  torch::NoGradGuard no_grad;
  for (int64_t token : *generated) {
    auto logits = model->forward(torch::tensor(sequence).unsqueeze(0)).logits;
    EXPECT_EQ(logits[0][-1].argmax().item<int64_t>(), token);
    sequence.push_back(token);
  }
}

TEST(Generate, StopsAtMaxSeqLenAndRejectsBadPrompts) {
  Transformer model(TinyModel());  // max_seq_len 32
  SamplingOptions options;
  options.max_new_tokens = 100;
  auto generated = Generate(model, std::vector<int64_t>(30, 1), options);
  ASSERT_TRUE(generated.ok());
  EXPECT_EQ(generated->size(), 2u);
  EXPECT_FALSE(Generate(model, {}, options).ok());
  auto too_long = Generate(model, std::vector<int64_t>(32, 1), options);
  ASSERT_FALSE(too_long.ok());
  EXPECT_NE(too_long.status().message().find("max_seq_len"), std::string::npos);
}

}  // namespace
}  // namespace rmoe
