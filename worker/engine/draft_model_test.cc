// DraftModel on the bundled strata-tiny model (drafting for itself, so its proposals can be checked
// against plain greedy decoding): proposals are the model's greedy continuation; a draft cache
// reused after the target kept part of a draft proposes what a fresh one does; long contexts catch
// up over several proposals; sequences that drafted least recently give their blocks up, and
// Forget frees them; a draft with another vocabulary is refused.
#include "worker/engine/draft_model.h"

#include <algorithm>
#include <memory>
#include <vector>

#include "gtest/gtest.h"
#include "worker/engine/tiny_model_testutil.h"
#include "worker/model/model_runner.h"
#include "worker/model/test_util.h"

namespace strata {
namespace {

class DraftModelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    TinyModel tiny;
    ASSERT_NO_FATAL_FAILURE(LoadTinyModel(&tiny));
    weights_ = std::move(tiny.weights);
    tokenizer_ = std::move(tiny.tokenizer);
  }

  std::unique_ptr<DraftModel> Make(DraftModelConfig c = {}) {
    c.compute_threads = 2;
    auto m = DraftModel::Create(weights_.get(), weights_->config.vocab_size, c);
    EXPECT_TRUE(m.ok()) << m.status();
    return m.ok() ? std::move(*m) : nullptr;
  }

  // The model's greedy continuation of `prompt`, `n` tokens: the prompt as one chunk, then a
  // token at a time (the way a draft computes it).
  std::vector<int32_t> Greedy(const std::vector<int32_t>& prompt, int n) {
    SingleRankCollectives comm;
    ModelRunner runner(weights_.get(), &comm, 2);
    const int64_t bt = 16;
    const int64_t blocks = static_cast<int64_t>(prompt.size() + n) / bt + 1;
    KvCacheStorage cache(*weights_, blocks, bt);
    std::vector<int32_t> out;
    std::vector<int32_t> tokens = prompt;
    const int64_t vocab = weights_->config.vocab_size;
    std::vector<float> logits(static_cast<size_t>(vocab));
    for (size_t done = 0; static_cast<int>(out.size()) < n; done = tokens.size() - 1) {
      TestBatch b;
      b.num_seqs = 1;
      b.max_blocks_per_seq = blocks;
      for (int64_t i = 0; i < blocks; ++i) b.block_tables.push_back(static_cast<int32_t>(i));
      for (size_t p = done; p < tokens.size(); ++p) {
        b.Add(tokens[p], 0, static_cast<int32_t>(p), bt, /*logits=*/p + 1 == tokens.size());
      }
      const absl::Status st = runner.Forward(b.View(), cache.layers(), absl::MakeSpan(logits));
      EXPECT_TRUE(st.ok()) << st;
      const int32_t best =
          static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
      out.push_back(best);
      tokens.push_back(best);
    }
    return out;
  }

  std::vector<int32_t> Propose(DraftModel& m, uint64_t seq, const std::vector<int32_t>& tokens,
                               int64_t limit, uint64_t cache_namespace = 0) {
    std::vector<int32_t> draft;
    const DraftModel::Request r{seq, tokens, limit, &draft, cache_namespace};
    const absl::Status st = m.Propose({&r, 1});
    EXPECT_TRUE(st.ok()) << st;
    return draft;
  }

  std::vector<int32_t> Prompt(absl::string_view text) { return EncodePrompt(*tokenizer_, text); }

  std::unique_ptr<ModelWeights> weights_;
  std::unique_ptr<Tokenizer> tokenizer_;
};

TEST_F(DraftModelTest, ProposesTheGreedyContinuation) {
  auto m = Make();
  const std::vector<int32_t> prompt = Prompt("import os\nimport sys\n\n\ndef main(argv):\n    ");
  EXPECT_EQ(Propose(*m, 1, prompt, 6), Greedy(prompt, 6));
  const DraftModelStats s = m->Stats();
  EXPECT_EQ(s.catch_up_tokens, static_cast<int64_t>(prompt.size()));
  EXPECT_EQ(s.draft_forward_tokens, 5);
  EXPECT_EQ(s.num_sequences, 1);
}

TEST_F(DraftModelTest, ACacheReusedAfterAPartlyKeptDraftProposesWhatAFreshOneDoes) {
  auto m = Make();
  std::vector<int32_t> tokens = Prompt("class Parser:\n    def __init__(self, text):\n        ");
  const std::vector<int32_t> first = Propose(*m, 7, tokens, 5);
  ASSERT_EQ(first.size(), 5u);
  // The target keeps two draft tokens, then draws another token than the third.
  tokens.push_back(first[0]);
  tokens.push_back(first[1]);
  tokens.push_back(first[2] == 10 ? 11 : 10);
  const int64_t caught_up = m->Stats().catch_up_tokens;
  const std::vector<int32_t> second = Propose(*m, 7, tokens, 5);
  // Only the two kept tokens' K/V were reused... and the new token computed: 1 token of catch-up
  // beyond the kept draft (the last token's row is always computed again).
  EXPECT_EQ(m->Stats().catch_up_tokens - caught_up, 1);
  auto fresh = Make();
  EXPECT_EQ(second, Propose(*fresh, 1, tokens, 5));
  EXPECT_EQ(second, Greedy(tokens, 5));
}

TEST_F(DraftModelTest, AFullyKeptDraftCatchesUpTwoTokens) {
  auto m = Make();
  std::vector<int32_t> tokens = Prompt("for i in range(10):\n    print(i)\n");
  const std::vector<int32_t> d = Propose(*m, 3, tokens, 4);
  ASSERT_EQ(d.size(), 4u);
  tokens.insert(tokens.end(), d.begin(), d.end());
  tokens.push_back(Greedy(tokens, 1)[0]);  // the token drawn after the whole draft
  const int64_t before = m->Stats().catch_up_tokens;
  EXPECT_EQ(Propose(*m, 3, tokens, 4), Greedy(tokens, 4));
  // The last draft token (never fed back) and the token drawn after it.
  EXPECT_EQ(m->Stats().catch_up_tokens - before, 2);
}

TEST_F(DraftModelTest, ALongContextCatchesUpOverSeveralProposals) {
  DraftModelConfig c;
  c.max_catch_up_tokens = 16;
  auto m = Make(c);
  const std::vector<int32_t> prompt = Prompt(
      "def parse(text):\n    out = []\n    for line in text.splitlines():\n"
      "        out.append(line.strip())\n    return out\n\n\ndef main():\n    ");
  ASSERT_GT(prompt.size(), 32u);
  ASSERT_LE(prompt.size(), 48u);
  EXPECT_TRUE(Propose(*m, 5, prompt, 4).empty());
  EXPECT_TRUE(Propose(*m, 5, prompt, 4).empty());
  EXPECT_EQ(Propose(*m, 5, prompt, 4), Greedy(prompt, 4));
  EXPECT_EQ(m->Stats().catch_up_tokens, static_cast<int64_t>(prompt.size()));
}

TEST_F(DraftModelTest, TheLeastRecentlyDraftingSequenceGivesItsBlocksUp) {
  DraftModelConfig c;
  c.kv_cache_bytes = 4 * KvCacheStorage::BlockBytes(*weights_, c.block_tokens);
  auto m = Make(c);
  // One block each, with their drafts.
  const std::vector<int32_t> a = Prompt("import json\nimport os\n");
  const std::vector<int32_t> b = Prompt("while True:\n    x = ");
  ASSERT_LE(a.size() + 3, 16u);
  ASSERT_LE(b.size() + 3, 16u);
  EXPECT_EQ(Propose(*m, 1, a, 4), Greedy(a, 4));
  EXPECT_EQ(Propose(*m, 2, b, 4), Greedy(b, 4));
  EXPECT_EQ(m->Stats().evictions, 0);
  EXPECT_EQ(m->Stats().num_free_blocks, 2);
  // A third sequence of three blocks (40 tokens and 3 fed back) takes sequence 1's, the least
  // recent.
  std::vector<int32_t> c3 = Prompt("def f(a, b, c):\n    return a * b + c\n\n\ndef g(a):\n    ");
  while (c3.size() < 40) c3.push_back(c3[c3.size() % 8 + 1]);
  c3.resize(40);
  EXPECT_EQ(Propose(*m, 3, c3, 4), Greedy(c3, 4));
  EXPECT_EQ(m->Stats().evictions, 1);
  // Sequence 1 was the one evicted: it starts over (its whole prompt computed again), taking
  // sequence 2's block, and still proposes right.
  int64_t before = m->Stats().catch_up_tokens;
  EXPECT_EQ(Propose(*m, 1, a, 4), Greedy(a, 4));
  EXPECT_EQ(m->Stats().catch_up_tokens - before, static_cast<int64_t>(a.size()));
  EXPECT_EQ(m->Stats().evictions, 2);
  // Sequence 3 kept its blocks: one token computed again.
  before = m->Stats().catch_up_tokens;
  EXPECT_EQ(Propose(*m, 3, c3, 4), Greedy(c3, 4));
  EXPECT_EQ(m->Stats().catch_up_tokens - before, 1);
  // Prompts of the same length sharing no block with c3 or each other (prefix caching aside).
  const auto variant = [&](int32_t t) {
    std::vector<int32_t> v = c3;
    EXPECT_NE(v[1], t);
    v[1] = t;
    return v;
  };
  const std::vector<int32_t> x = variant(1000), y = variant(1001), z = variant(1002),
                             w = variant(1003);
  // Two requests in one proposal: the first takes every block (sequence 1's, the least recent,
  // then sequence 3's); the second would need the first's, which it never takes, so it drafts
  // nothing.
  std::vector<int32_t> d1, d2;
  const DraftModel::Request both[] = {{10, x, 4, &d1}, {11, y, 4, &d2}};
  ASSERT_TRUE(m->Propose(both).ok());
  EXPECT_EQ(d1, Greedy(x, 4));
  EXPECT_TRUE(d2.empty());
  EXPECT_EQ(m->Stats().evictions, 4);
  for (uint64_t s : {1, 2, 3, 10, 11}) m->Forget(s);
  EXPECT_EQ(m->Stats().num_free_blocks, 4);
  EXPECT_EQ(m->Stats().num_sequences, 0);
  // A request that would not have enough even with every other sequence's blocks takes none:
  // sequence 20 (one block) outlives a proposal whose second request needs three.
  EXPECT_EQ(Propose(*m, 20, a, 4), Greedy(a, 4));
  std::vector<int32_t> e1, e2;
  const DraftModel::Request two[] = {{21, z, 4, &e1}, {22, w, 4, &e2}};
  ASSERT_TRUE(m->Propose(two).ok());
  EXPECT_FALSE(e1.empty());
  EXPECT_TRUE(e2.empty());
  EXPECT_EQ(m->Stats().evictions, 4);
  before = m->Stats().catch_up_tokens;
  EXPECT_EQ(Propose(*m, 20, a, 4), Greedy(a, 4));
  EXPECT_EQ(m->Stats().catch_up_tokens - before, 1);
}

// Prefix caching: the full blocks of a sequence's own tokens stay cached after it ends; a new
// sequence whose prompt starts with them (a conversation's next turn) takes them instead of
// computing them, proposes what computing them gives, and never writes into them; another cache
// namespace (another tenant) does not see them; cached blocks no sequence holds are the first to
// be reused when blocks run out.
TEST_F(DraftModelTest, CachedPrefixBlocksServeTheNextTurn) {
  DraftModelConfig c;
  c.kv_cache_bytes = 6 * KvCacheStorage::BlockBytes(*weights_, c.block_tokens);
  auto m = Make(c);
  const auto propose = [&](uint64_t seq, const std::vector<int32_t>& tokens, uint64_t ns) {
    return Propose(*m, seq, tokens, 4, ns);
  };
  std::vector<int32_t> turn1 =
      Prompt("def parse(text):\n    out = []\n    for line in text.splitlines():\n");
  while (turn1.size() < 48) turn1.push_back(turn1[turn1.size() % 7 + 1]);
  turn1.resize(48);  // three full blocks
  EXPECT_EQ(propose(1, turn1, 7), Greedy(turn1, 4));
  m->Forget(1);
  // Its three full blocks of its own tokens stay cached, held by no one.
  EXPECT_EQ(m->Stats().num_cached_blocks, 3);
  EXPECT_EQ(m->Stats().num_free_blocks, 6);
  std::vector<int32_t> turn2 = turn1;
  for (int32_t t : Prompt("        out.append(line)\n")) turn2.push_back(t);
  const int64_t before = m->Stats().catch_up_tokens;
  EXPECT_EQ(propose(2, turn2, 7), Greedy(turn2, 4));
  EXPECT_EQ(m->Stats().prefix_hit_tokens, 48);
  EXPECT_EQ(m->Stats().catch_up_tokens - before, static_cast<int64_t>(turn2.size()) - 48);
  // The same prompt again: its last token's block is cached but holds that token, so that block is
  // computed afresh in a private block (16 tokens), the two before it taken.
  const int64_t before3 = m->Stats().catch_up_tokens;
  EXPECT_EQ(propose(3, turn1, 7), Greedy(turn1, 4));
  EXPECT_EQ(m->Stats().catch_up_tokens - before3, 16);
  EXPECT_EQ(m->Stats().prefix_hit_tokens, 48 + 32);
  // Another namespace: nothing shared.
  const int64_t hits = m->Stats().prefix_hit_tokens;
  EXPECT_EQ(propose(4, turn2, 8), Greedy(turn2, 4));
  EXPECT_EQ(m->Stats().prefix_hit_tokens, hits);
  for (uint64_t s : {2, 3, 4}) m->Forget(s);
  EXPECT_EQ(m->Stats().num_free_blocks, 6);
  // A new sequence needing every block takes the cached ones without evicting a sequence.
  std::vector<int32_t> big = Prompt("class A:\n    pass\n");
  while (big.size() < 90) big.push_back(big[big.size() % 5 + 1]);
  const int64_t evictions = m->Stats().evictions;
  EXPECT_EQ(propose(5, big, 7), Greedy(big, 4));
  EXPECT_EQ(m->Stats().evictions, evictions);
  EXPECT_LT(m->Stats().num_cached_blocks, 6);
}

// A system prompt's cached blocks held by several sequences count as room: evicting all their
// holders frees them (an earlier version counted only blocks with one holder and refused).
// And a sequence proposing twice on a prompt of whole blocks computes its last block afresh
// rather than write into the published one.
TEST_F(DraftModelTest, SharedBlocksCountAsRoomAndAreNeverWritten) {
  DraftModelConfig c;
  c.kv_cache_bytes = 4 * KvCacheStorage::BlockBytes(*weights_, c.block_tokens);
  auto m = Make(c);
  const auto propose = [&](uint64_t seq, const std::vector<int32_t>& tokens, int64_t limit) {
    return Propose(*m, seq, tokens, limit, 7);
  };
  std::vector<int32_t> system = Prompt("You are a helpful assistant. Answer in Python.\n");
  while (system.size() < 32) system.push_back(system[system.size() % 5 + 1]);
  system.resize(32);  // two whole blocks
  std::vector<int32_t> x = system, y = system;
  x.push_back(100);
  y.push_back(101);
  EXPECT_EQ(propose(1, x, 4), Greedy(x, 4));  // three blocks, the first two published
  EXPECT_EQ(propose(2, y, 4), Greedy(y, 4));  // takes those two, and the last free block
  EXPECT_EQ(m->Stats().prefix_hit_tokens, 32);
  EXPECT_EQ(m->Stats().num_free_blocks, 0);
  std::vector<int32_t> b = Prompt("import re\nimport sys\n");
  while (b.size() < 40) b.push_back(b[b.size() % 5 + 1]);
  b.resize(40);  // three blocks, held by no one
  EXPECT_EQ(propose(3, b, 1), Greedy(b, 1));
  EXPECT_EQ(m->Stats().evictions, 2);
  // Proposing again on the same 48 tokens (three whole blocks, all published by then): the
  // last token's block is computed again in a block of its own, 16 tokens.
  m->Forget(3);
  std::vector<int32_t> t48 = b;
  while (t48.size() < 48) t48.push_back(t48[t48.size() % 5 + 1]);
  EXPECT_EQ(propose(4, t48, 1), Greedy(t48, 1));
  const int64_t before = m->Stats().catch_up_tokens;
  EXPECT_EQ(propose(4, t48, 1), Greedy(t48, 1));
  EXPECT_EQ(m->Stats().catch_up_tokens - before, 16);
}

// Two sequences with the same prompt in one proposal each compute its blocks; the second's copy
// stays private, and is published once the first's has been reused for something else.
TEST_F(DraftModelTest, APrivateDuplicateIsOfferedWhenThePublishedCopyIsGone) {
  DraftModelConfig c;
  c.kv_cache_bytes = 7 * KvCacheStorage::BlockBytes(*weights_, c.block_tokens);
  auto m = Make(c);
  std::vector<int32_t> p = Prompt("import itertools\nimport functools\n\n\ndef pairs(xs):\n");
  while (p.size() < 33) p.push_back(p[p.size() % 5 + 1]);
  p.resize(33);  // two whole blocks and one token
  std::vector<int32_t> d1, d2;
  const DraftModel::Request both[] = {{1, p, 2, &d1, 7}, {2, p, 2, &d2, 7}};
  ASSERT_TRUE(m->Propose(both).ok());
  EXPECT_EQ(d1, d2);
  EXPECT_EQ(m->Stats().num_cached_blocks, 2);  // sequence 1's copies
  m->Forget(1);
  // A sequence of four blocks takes every block no one holds (the unused one, sequence 1's
  // last, then its two published ones), leaving sequence 2 be.
  std::vector<int32_t> big = Prompt("class B:\n    pass\n");
  while (big.size() < 62) big.push_back(big[big.size() % 5 + 1]);
  big.resize(62);
  EXPECT_EQ(Propose(*m, 3, big, 2, 7), Greedy(big, 2));
  EXPECT_EQ(m->Stats().evictions, 0);
  EXPECT_EQ(m->Stats().num_cached_blocks, 3);  // big's own whole blocks, no copy of p's
  m->Forget(3);
  m->Forget(2);  // its copies of p's blocks are offered now
  const int64_t hits = m->Stats().prefix_hit_tokens;
  EXPECT_EQ(Propose(*m, 4, p, 2, 7), Greedy(p, 2));
  EXPECT_EQ(m->Stats().prefix_hit_tokens - hits, 32);
}

// Sequences that outgrow the cache together: each proposal still drafts for one of them (an
// earlier version had each keep its blocks and wait for the other's, and neither drafted again),
// and one longer than the whole cache never drafts and holds nothing.
TEST_F(DraftModelTest, SequencesOutgrowingTheCacheTogetherStillDraft) {
  DraftModelConfig c;
  c.kv_cache_bytes = 4 * KvCacheStorage::BlockBytes(*weights_, c.block_tokens);  // 64 tokens
  auto m = Make(c);
  std::vector<int32_t> a = Prompt("import json\nimport os\n");
  std::vector<int32_t> b = Prompt("while True:\n    x = ");
  int64_t rounds_without_draft = 0;
  while (a.size() + 3 <= 64) {
    std::vector<int32_t> da, db;
    const DraftModel::Request both[] = {{1, a, 4, &da}, {2, b, 4, &db}};
    ASSERT_TRUE(m->Propose(both).ok());
    if (da.empty() && db.empty()) ++rounds_without_draft;
    // Each draft kept whole, and a token drawn after it (or one drawn without a draft).
    for (auto [tokens, d] : {std::pair{&a, &da}, std::pair{&b, &db}}) {
      tokens->insert(tokens->end(), d->begin(), d->end());
      tokens->push_back(d->empty() ? 10 : d->front());
    }
  }
  EXPECT_EQ(rounds_without_draft, 0);
  EXPECT_GT(m->Stats().evictions, 0);
  // Longer than the cache: nothing drafted, nothing held.
  while (a.size() <= 64) a.push_back(10);
  EXPECT_TRUE(Propose(*m, 1, a, 4).empty());
  m->Forget(2);
  EXPECT_EQ(m->Stats().num_free_blocks, 4);
  EXPECT_EQ(m->Stats().num_sequences, 0);
}

TEST_F(DraftModelTest, TheContextEndLimitsTheDraft) {
  std::vector<int32_t> tokens = Prompt("x = 1\n");
  const int64_t max_pos = weights_->config.max_position_embeddings;
  while (static_cast<int64_t>(tokens.size()) < max_pos - 1) tokens.push_back(tokens[1]);
  // Positions up to max_pos - 1 can be fed: a draft of two tokens at most.
  DraftModelConfig c;
  c.max_catch_up_tokens = max_pos;
  auto big = Make(c);
  EXPECT_EQ(Propose(*big, 1, tokens, 8).size(), 2u);
  tokens.push_back(tokens[1]);
  tokens.push_back(tokens[1]);
  EXPECT_TRUE(Propose(*big, 1, tokens, 8).empty());  // past the draft's context
}

TEST_F(DraftModelTest, AnotherVocabularyIsRefused) {
  auto m = DraftModel::Create(weights_.get(), weights_->config.vocab_size + 1, {});
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(m.status().message().find("tokenizer"), std::string::npos) << m.status();
  DraftModelConfig c;
  c.kv_cache_bytes = 100;
  auto tiny = DraftModel::Create(weights_.get(), weights_->config.vocab_size, c);
  ASSERT_FALSE(tiny.ok());
  EXPECT_NE(tiny.status().message().find("holds no block"), std::string::npos) << tiny.status();
}

}  // namespace
}  // namespace strata
