// The GPU sampler (SampleCuda, kernels/cuda/ops.h) against the CPU sampler (Sample, sampler.h):
// on fresh random logits (with ties and -inf) over a 2048- and a 128256-token vocabulary, with
// greedy, temperature, top-k, top-p, min-p, repetition / presence / frequency penalties and banned
// tokens, the GPU draws the same token for the same (seed, position), computes the same processed
// logits bit for bit, and the same log-probability (to 1e-5: its sums run in parallel); draws by
// the exponential race (no rank truncation) and by the sorted walk alike, in one batch and with
// the sort skipped.
// Needs a GPU: tagged "gpu"; skipped where there is none.
#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "worker/engine/sampler.h"

#ifdef STRATA_HAVE_CUDA
#include "kernels/cuda/ops.h"
#include "kernels/cuda/runtime.h"
#endif

namespace strata {
namespace {

#ifdef STRATA_HAVE_CUDA

struct Row {
  SamplingOptions options;
  std::vector<int32_t> prompt, output, banned;
  int64_t position = 0;
};

class SamplerGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<int> devices = CudaDeviceCount();
    if (!devices.ok()) GTEST_SKIP() << "no usable GPU: " << devices.status();
  }
};

template <typename T>
DeviceBuffer Upload(const std::vector<T>& v) {
  absl::StatusOr<DeviceBuffer> b =
      DeviceBuffer::Allocate(std::max<size_t>(16, v.size() * sizeof(T)));
  EXPECT_TRUE(b.ok()) << b.status();
  if (!v.empty()) {
    EXPECT_TRUE(b->CopyFromHost(v.data(), v.size() * sizeof(T)).ok());
  }
  return *std::move(b);
}

TEST_F(SamplerGpuTest, DrawsTheCpuSamplersTokens) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  absl::StatusOr<CudaStream> stream = CudaStream::Create();
  ASSERT_TRUE(stream.ok());
  for (int64_t vocab : {int64_t{2048}, int64_t{128256}}) {
    // Option sets, each repeated over several rows with fresh logits, seeds and positions.
    std::vector<SamplingOptions> sets;
    auto add = [&](float temp, int top_k, float top_p, float min_p, float rep, float pres,
                   float freq) {
      SamplingOptions o;
      o.temperature = temp;
      o.top_k = top_k;
      o.top_p = top_p;
      o.min_p = min_p;
      o.repetition_penalty = rep;
      o.presence_penalty = pres;
      o.frequency_penalty = freq;
      sets.push_back(o);
    };
    add(0, 0, 1, 0, 1, 0, 0);                               // greedy
    add(0, 0, 1, 0, 1.3f, 0.5f, 0.2f);                      // greedy with penalties
    add(1, 0, 1, 0, 1, 0, 0);                               // the whole vocabulary: a race
    add(0.8f, 0, 1, 0.02f, 1.1f, 0, 0.1f);                  // min-p alone: a race
    add(1.2f, static_cast<int>(vocab), 1, 0, 1, 0.3f, 0);   // top-k of the whole vocabulary
    add(1.0f, static_cast<int>(vocab - 1), 1, 0, 1, 0, 0);  // one short of it: sorted
    add(0.7f, 40, 1, 0, 1, 0, 0);
    add(1.0f, 0, 0.9f, 0, 1, 0, 0);
    add(1.3f, 0, 0.95f, 0.05f, 1, 0, 0);
    add(0.9f, 50, 0.8f, 0.02f, 1.2f, 0.4f, 0.3f);
    add(2.0f, 1, 1, 0, 0.8f, -0.5f, -0.2f);
    // Every set in one batch (sorted draws, races and greedy rows side by side: rows that do not
    // sort have empty segments), then the races and greedy rows alone, which skip the sort.
    for (const bool no_sort : {false, true}) {
      std::vector<SamplingOptions> use;
      for (const SamplingOptions& o : sets) {
        if (!no_sort || o.temperature == 0 || gpu::DrawsByRace(o.top_p, o.top_k, vocab)) {
          use.push_back(o);
        }
      }
      std::vector<Row> rows;
      for (const SamplingOptions& o : use) {
        for (int rep = 0; rep < 6; ++rep) {
          Row r;
          r.options = o;
          r.options.seed = rng();
          r.position = rng() % 5000;
          for (int i = 0; i < 40; ++i) r.prompt.push_back(static_cast<int32_t>(rng() % vocab));
          for (int i = 0; i < 30; ++i) r.output.push_back(static_cast<int32_t>(rng() % 200));
          r.banned = {static_cast<int32_t>(vocab - 1), static_cast<int32_t>(rng() % vocab)};
          rows.push_back(r);
        }
      }
      const int64_t R = static_cast<int64_t>(rows.size());
      std::vector<float> logits(R * vocab);
      for (float& v : logits) v = normal(rng);
      for (int64_t r = 0; r < R; ++r) {
        float* row = logits.data() + r * vocab;
        row[rng() % vocab] = row[rng() % vocab];  // a tie somewhere
        const int64_t top = std::max_element(row, row + vocab) - row;
        row[(top + 17) % vocab] = row[top];  // a tie for the top
        // And one 24576 logits on (another 8192-logit chunk of a split row, where there are
        // several: split rows take the first maximum across chunks).
        row[(top + 24576) % vocab] = row[top];
        row[rng() % vocab] = -INFINITY;
      }
      // CPU.
      std::vector<float> cpu_logits = logits;
      std::vector<SampledToken> want(R);
      std::vector<std::pair<float, int32_t>> scratch;
      // GPU inputs: penalized tokens (prompt or output, once each, with their output count), bans.
      std::vector<gpu::SampleRow> params(R);
      std::vector<int32_t> pen_offsets = {0}, pen_tokens, pen_counts, ban_offsets = {0}, ban_tokens;
      for (int64_t r = 0; r < R; ++r) {
        const Row& row = rows[r];
        PenaltyState pen;
        pen.AddPrompt(row.prompt);
        std::map<int32_t, int32_t> counts;
        for (int32_t t : row.prompt) counts.emplace(t, 0);
        for (int32_t t : row.output) {
          pen.AddOutput(t);
          ++counts[t];
        }
        want[r] = Sample(absl::MakeSpan(cpu_logits.data() + r * vocab, vocab), row.options, pen,
                         row.position, row.banned, &scratch);
        for (const auto& [t, c] : counts) {
          pen_tokens.push_back(t);
          pen_counts.push_back(c);
        }
        pen_offsets.push_back(static_cast<int32_t>(pen_tokens.size()));
        ban_tokens.insert(ban_tokens.end(), row.banned.begin(), row.banned.end());
        ban_offsets.push_back(static_cast<int32_t>(ban_tokens.size()));
        params[r] = SampleRowOf(row.options, row.position);
      }
      // One block a row, then each row split over blocks (SampleArgs::split_rows).
      for (const bool split : {false, true}) {
        DeviceBuffer d_logits = Upload(logits), d_params = Upload(params),
                     d_po = Upload(pen_offsets), d_pt = Upload(pen_tokens),
                     d_pc = Upload(pen_counts), d_bo = Upload(ban_offsets),
                     d_bt = Upload(ban_tokens);
        absl::StatusOr<DeviceBuffer> d_token = DeviceBuffer::Allocate(4 * R),
                                     d_lp = DeviceBuffer::Allocate(4 * R),
                                     ws = DeviceBuffer::Allocate(
                                         gpu::SampleWorkspaceBytes(R, vocab, !no_sort));
        ASSERT_TRUE(d_token.ok() && d_lp.ok() && ws.ok());
        ASSERT_TRUE(d_token->Fill(0xff).ok());
        gpu::SampleArgs a;
        a.rows = R;
        a.vocab = vocab;
        a.logits = d_logits.as<float>();
        a.params = d_params.as<gpu::SampleRow>();
        a.pen_offsets = d_po.as<int32_t>();
        a.pen_tokens = d_pt.as<int32_t>();
        a.pen_counts = d_pc.as<int32_t>();
        a.ban_offsets = d_bo.as<int32_t>();
        a.ban_tokens = d_bt.as<int32_t>();
        a.token = d_token->as<int32_t>();
        a.logprob = d_lp->as<float>();
        a.workspace = ws->data();
        a.sorted_draws = !no_sort;
        a.split_rows = split;
        ASSERT_TRUE(SampleCuda(a, stream->handle()).ok());
        ASSERT_TRUE(stream->Synchronize().ok());
        std::vector<int32_t> got(R);
        std::vector<float> got_lp(R), got_logits(R * vocab);
        ASSERT_TRUE(d_token->CopyToHost(got.data(), 4 * R).ok());
        ASSERT_TRUE(d_lp->CopyToHost(got_lp.data(), 4 * R).ok());
        ASSERT_TRUE(d_logits.CopyToHost(got_logits.data(), 4 * R * vocab).ok());
        for (int64_t r = 0; r < R; ++r) {
          const SamplingOptions& o = rows[r].options;
          SCOPED_TRACE(::testing::Message()
                       << "vocab " << vocab << " no sort " << no_sort << " split " << split
                       << " row " << r << " temperature " << o.temperature << " top_k " << o.top_k
                       << " top_p " << o.top_p << " min_p " << o.min_p << " penalties "
                       << o.repetition_penalty << "/" << o.presence_penalty << "/"
                       << o.frequency_penalty);
          EXPECT_EQ(got[r], want[r].token);
          EXPECT_NEAR(got_lp[r], want[r].logprob, 1e-5);
          EXPECT_TRUE(std::equal(
              got_logits.begin() + r * vocab, got_logits.begin() + (r + 1) * vocab,
              cpu_logits.begin() + r * vocab,
              [](float x, float y) { return x == y || (std::isnan(x) && std::isnan(y)); }))
              << "processed logits differ";
        }
      }
    }
  }
}

#else

TEST(SamplerGpuTest, NeedsCudaBuild) { GTEST_SKIP() << "built without CUDA"; }

#endif

}  // namespace
}  // namespace strata
