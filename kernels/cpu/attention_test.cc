// PagedAttentionCpu against a dense float64 reference: random sequences of several lengths
// scattered over shuffled cache blocks, GQA, a sliding window, prefill and decode tokens mixed in
// one call.
#include "kernels/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace strata {
namespace {

struct Case {
  int64_t num_heads, num_kv_heads, head_dim, block_tokens, sliding_window;
};

TEST(PagedAttentionCpuTest, MatchesDenseReference) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist;
  for (const Case c :
       {Case{4, 4, 16, 4, 0}, Case{8, 2, 32, 16, 0}, Case{6, 3, 8, 3, 5}, Case{2, 1, 64, 8, 0}}) {
    SCOPED_TRACE(::testing::Message()
                 << "heads " << c.num_heads << "/" << c.num_kv_heads << " d " << c.head_dim
                 << " block " << c.block_tokens << " window " << c.sliding_window);
    const std::vector<int64_t> lens = {1, 5, 17, 40};
    const int64_t max_blocks = (40 + c.block_tokens - 1) / c.block_tokens;
    const int64_t num_blocks = max_blocks * static_cast<int64_t>(lens.size()) + 3;
    const int64_t row = c.num_kv_heads * c.head_dim;
    std::vector<float> kc(num_blocks * c.block_tokens * row), vc(kc.size());
    for (float& v : kc) v = dist(rng);
    for (float& v : vc) v = dist(rng);
    std::vector<int32_t> free_blocks(num_blocks);
    std::iota(free_blocks.begin(), free_blocks.end(), 0);
    std::shuffle(free_blocks.begin(), free_blocks.end(), rng);
    std::vector<int32_t> tables(lens.size() * max_blocks, -1);
    size_t next = 0;
    for (size_t s = 0; s < lens.size(); ++s) {
      for (int64_t b = 0; b * c.block_tokens < lens[s]; ++b)
        tables[s * max_blocks + b] = free_blocks[next++];
    }
    // Queries: the last 3 positions of each sequence (prefill-like) or just the last (decode-like).
    std::vector<int32_t> token_seq, token_pos;
    for (size_t s = 0; s < lens.size(); ++s) {
      const int64_t n_q = s % 2 == 0 ? std::min<int64_t>(3, lens[s]) : 1;
      for (int64_t p = lens[s] - n_q; p < lens[s]; ++p) {
        token_seq.push_back(static_cast<int32_t>(s));
        token_pos.push_back(static_cast<int32_t>(p));
      }
    }
    const int64_t nt = static_cast<int64_t>(token_seq.size());
    std::vector<float> q(nt * c.num_heads * c.head_dim),
        out(q.size(), std::numeric_limits<float>::quiet_NaN());
    for (float& v : q) v = dist(rng);
    PagedAttentionParams p;
    p.num_tokens = nt;
    p.num_heads = c.num_heads;
    p.num_kv_heads = c.num_kv_heads;
    p.head_dim = c.head_dim;
    p.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    p.sliding_window = c.sliding_window;
    p.q = q.data();
    p.k_cache = kc.data();
    p.v_cache = vc.data();
    p.block_tokens = c.block_tokens;
    p.num_blocks = num_blocks;
    p.token_seq = token_seq.data();
    p.token_pos = token_pos.data();
    p.block_tables = tables.data();
    p.num_seqs = static_cast<int64_t>(lens.size());
    p.max_blocks_per_seq = max_blocks;
    p.out = out.data();
    // Split the work in two calls, as a thread pool would.
    const int64_t total = nt * c.num_heads;
    p.work_end = total / 3;
    ASSERT_TRUE(PagedAttentionCpu(p).ok());
    p.work_begin = total / 3;
    p.work_end = total;
    ASSERT_TRUE(PagedAttentionCpu(p).ok());
    // The queries that share keys go over them together; each one's result is still exactly what
    // it is computed alone (a batch's make-up never changes a sequence's output).
    {
      std::vector<float> alone(out.size(), std::numeric_limits<float>::quiet_NaN());
      PagedAttentionParams one = p;
      one.out = alone.data();
      for (int64_t w = 0; w < total; ++w) {
        one.work_begin = w;
        one.work_end = w + 1;
        ASSERT_TRUE(PagedAttentionCpu(one).ok());
      }
      ASSERT_EQ(std::memcmp(alone.data(), out.data(), out.size() * sizeof(float)), 0);
    }

    const int64_t group = c.num_heads / c.num_kv_heads;
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t s = token_seq[t], pos = token_pos[t];
      const int64_t first = c.sliding_window ? std::max<int64_t>(0, pos - c.sliding_window + 1) : 0;
      for (int64_t h = 0; h < c.num_heads; ++h) {
        const int64_t kvh = h / group;
        std::vector<double> scores;
        for (int64_t j = first; j <= pos; ++j) {
          const int64_t slot =
              tables[s * max_blocks + j / c.block_tokens] * c.block_tokens + j % c.block_tokens;
          double dot = 0;
          for (int64_t i = 0; i < c.head_dim; ++i) {
            dot += double(q[(t * c.num_heads + h) * c.head_dim + i]) *
                   kc[slot * row + kvh * c.head_dim + i];
          }
          scores.push_back(dot / std::sqrt(double(c.head_dim)));
        }
        const double mx = *std::max_element(scores.begin(), scores.end());
        double denom = 0;
        for (double& sc : scores) denom += (sc = std::exp(sc - mx));
        for (int64_t i = 0; i < c.head_dim; ++i) {
          double want = 0;
          for (int64_t j = first; j <= pos; ++j) {
            const int64_t slot =
                tables[s * max_blocks + j / c.block_tokens] * c.block_tokens + j % c.block_tokens;
            want += scores[j - first] / denom * vc[slot * row + kvh * c.head_dim + i];
          }
          ASSERT_NEAR(out[(t * c.num_heads + h) * c.head_dim + i], want, 1e-4)
              << t << " " << h << " " << i;
        }
      }
    }
  }
}

// The softmax weights against std::exp over the range attention meets (scores at or below their
// running max), within 4 ulp; far below, 0 or denormal.
TEST(PagedAttentionCpuTest, SoftmaxWeightsAreExpToAFewUlp) {
  std::vector<float> s;
  for (float x = -87.0f; x <= 0.0f; x += 0.00137f) s.push_back(x + 3.5f);
  for (const float x : {0.0f, -1e-8f, -0.3465736f, -0.6931472f, -1.0f, -10.0f, -50.5f}) {
    s.push_back(x + 3.5f);
  }
  std::vector<float> got(s.size());
  SoftmaxWeightsCpu(s.data(), 3.5f, got.data(), static_cast<int64_t>(s.size()));
  float worst = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    const float want = std::exp(s[i] - 3.5f);
    const float ulp = std::nextafter(want, 2 * want + 1) - want;
    worst = std::max(worst, std::abs(got[i] - want) / ulp);
    ASSERT_LE(std::abs(got[i] - want), 4 * ulp) << "exp(" << s[i] - 3.5f << ")";
  }
  EXPECT_EQ(got[s.size() - 7], 1.0f);  // exp(0)
  std::vector<float> far = {-100.0f, -1000.0f, -std::numeric_limits<float>::max()};
  std::vector<float> zero(3, -1.0f);
  SoftmaxWeightsCpu(far.data(), 0.0f, zero.data(), 3);
  for (const float z : zero) EXPECT_LT(z, 1e-37f);
}

TEST(PagedAttentionCpuTest, WriteKvPlacesTokensInSlots) {
  std::vector<float> k = {1, 2, 3, 4}, v = {5, 6, 7, 8};  // 2 tokens, 1 head, dim 2
  std::vector<float> kc(3 * 2 * 2, 0), vc(kc.size(), 0);
  const std::vector<int64_t> slots = {5, 0};
  WriteKvParams p;
  p.num_tokens = 2;
  p.num_kv_heads = 1;
  p.head_dim = 2;
  p.block_tokens = 2;
  p.num_blocks = 3;
  p.k = k.data();
  p.v = v.data();
  p.slots = slots.data();
  p.k_cache = kc.data();
  p.v_cache = vc.data();
  ASSERT_TRUE(WriteKvCacheCpu(p).ok());
  EXPECT_EQ(kc[10], 1);
  EXPECT_EQ(kc[11], 2);
  EXPECT_EQ(kc[0], 3);
  EXPECT_EQ(vc[1], 8);
  const std::vector<int64_t> bad = {6, 0};
  p.slots = bad.data();
  EXPECT_EQ(WriteKvCacheCpu(p).code(), absl::StatusCode::kInvalidArgument);
}

TEST(PagedAttentionCpuTest, BadBlockTableIsAnErrorNotACrash) {
  std::vector<float> q(4), out(4), kc(8), vc(8);
  const std::vector<int32_t> seq = {0}, pos = {1}, table = {7};
  PagedAttentionParams p;
  p.num_tokens = 1;
  p.num_heads = 1;
  p.num_kv_heads = 1;
  p.head_dim = 4;
  p.q = q.data();
  p.k_cache = kc.data();
  p.v_cache = vc.data();
  p.block_tokens = 2;
  p.num_blocks = 1;
  p.token_seq = seq.data();
  p.token_pos = pos.data();
  p.block_tables = table.data();
  p.num_seqs = 1;
  p.max_blocks_per_seq = 1;
  p.out = out.data();
  EXPECT_EQ(PagedAttentionCpu(p).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace strata
