// kv_compression_bench: what storing KV blocks quantized in the host and disk tiers costs in
// accuracy, on the bundled trained model and its held-out text.
//
//   bazel run -c opt //bench:kv_compression_bench -- [--window=512] [--prefix=256]
//       [--windows=8] [--json_out=FILE]
//
// For each held-out file and each of `windows` windows of `window` tokens: the model computes the
// KV of the first `prefix` tokens; every block of that KV goes through the tier codec (raw, INT8 or
// FP8 E4M3 with per-head scales: encode, decode, as a block restored from a lower tier would); then
// the rest of the window is computed on top and scored. Reported per codec: the perplexity of the
// continuation and its change against raw KV, the relative RMS error of the round-tripped KV, and
// the bytes a block takes in a slot.
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/init.h"
#include "common/log.h"
#include "memtier/device_tier.h"
#include "memtier/host_tier.h"
#include "memtier/kv_codec.h"
#include "tokenizer/tokenizer.h"
#include "worker/comm/collectives.h"
#include "worker/model/config.h"
#include "worker/model/model_runner.h"
#include "worker/model/weights.h"

ABSL_FLAG(std::string, model_dir, "models/strata-tiny/base", "Model directory.");
ABSL_FLAG(std::string, heldout,
          "models/strata-tiny/heldout/python.txt,models/strata-tiny/heldout/c_headers.txt,"
          "models/strata-tiny/heldout/man.txt",
          "Held-out text files.");
ABSL_FLAG(int, window, 512, "Tokens per window.");
ABSL_FLAG(int, prefix, 256, "Leading tokens of a window whose KV goes through the codec.");
ABSL_FLAG(int, windows, 8, "Windows per file (spread over the file).");
ABSL_FLAG(int, threads, 0, "Compute threads (0: all cores).");
ABSL_FLAG(std::string, json_out, "", "Also write the results as JSON lines here.");

namespace strata {
namespace {

constexpr int64_t kBlockTokens = 16;

struct Totals {
  double nll = 0;
  int64_t tokens = 0;
  double err_sq = 0;
  double ref_sq = 0;
};

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  CHECK(in.good()) << "cannot read " << path;
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Runs tokens[start, end) at their positions into the cache of one sequence; logits for each
// position when `logits` is not null.
void Forward(ModelRunner& runner, const KvCacheStorage& kv, const std::vector<int32_t>& tokens,
             int64_t start, int64_t end, int64_t num_blocks, std::vector<float>* logits) {
  std::vector<int32_t> toks(tokens.begin() + start, tokens.begin() + end), pos, seq, want;
  std::vector<int64_t> slots;
  std::vector<int32_t> table(num_blocks);
  for (int64_t b = 0; b < num_blocks; ++b) table[b] = static_cast<int32_t>(b);
  for (int64_t p = start; p < end; ++p) {
    pos.push_back(static_cast<int32_t>(p));
    seq.push_back(0);
    slots.push_back(p);
    if (logits != nullptr) want.push_back(static_cast<int32_t>(p - start));
  }
  if (want.empty()) want.push_back(static_cast<int32_t>(end - start - 1));
  ForwardBatch batch;
  batch.tokens = toks;
  batch.positions = pos;
  batch.token_seq = seq;
  batch.slots = slots;
  batch.block_tables = table;
  batch.num_seqs = 1;
  batch.max_blocks_per_seq = num_blocks;
  batch.logit_tokens = want;
  std::vector<float> out(want.size() * runner.weights().config.vocab_size);
  CHECK_OK(runner.Forward(batch, kv.layers(), absl::MakeSpan(out)));
  if (logits != nullptr) *logits = std::move(out);
}

void Run() {
  const std::string dir = absl::GetFlag(FLAGS_model_dir);
  auto config = LoadModelConfig(dir);
  CHECK_OK(config.status());
  auto weights = LoadModelWeights(dir, *config, 0, 1);
  CHECK_OK(weights.status());
  const ModelWeights& w = **weights;
  auto tokenizer = Tokenizer::FromModelDir(dir);
  CHECK_OK(tokenizer.status());
  SingleRankCollectives comm;
  ModelRunner runner(&w, &comm, absl::GetFlag(FLAGS_threads));
  const int64_t window = absl::GetFlag(FLAGS_window), prefix = absl::GetFlag(FLAGS_prefix);
  CHECK(prefix % kBlockTokens == 0 && prefix < window && window <= config->max_position_embeddings)
      << "need prefix a multiple of 16, below window, window within the context";
  const int64_t num_blocks = (window + kBlockTokens - 1) / kBlockTokens;
  const KvBlockLayout layout{2 * config->num_layers, kBlockTokens, w.num_kv_heads,
                             config->head_dim};
  const int64_t V = config->vocab_size;

  const std::vector<KvCompression> codecs = {KvCompression::kNone, KvCompression::kInt8,
                                             KvCompression::kFp8E4M3};
  // Per file, then per codec.
  std::vector<std::string> files;
  std::vector<std::vector<Totals>> per_file;
  int64_t num_windows = 0;
  for (absl::string_view file : absl::StrSplit(absl::GetFlag(FLAGS_heldout), ',')) {
    files.emplace_back(file);
    per_file.emplace_back(codecs.size());
    std::vector<Totals>& totals = per_file.back();
    auto ids = (*tokenizer)->Encode(ReadFile(std::string(file)));
    CHECK_OK(ids.status());
    const int64_t n = static_cast<int64_t>(ids->size());
    const int count = absl::GetFlag(FLAGS_windows);
    for (int wi = 0; wi < count; ++wi) {
      const int64_t start = (n - window) * wi / std::max(1, count - 1);
      if (start < 0) break;
      const std::vector<int32_t> tokens(ids->begin() + start, ids->begin() + start + window);
      ++num_windows;
      for (size_t ci = 0; ci < codecs.size(); ++ci) {
        KvCacheStorage kv(w, num_blocks, kBlockTokens);
        Forward(runner, kv, tokens, 0, prefix, num_blocks, nullptr);
        // The prefix's blocks go down a tier and back.
        DeviceTierConfig dc;
        dc.layout = layout;
        dc.num_slots = num_blocks;
        for (int64_t l = 0; l < config->num_layers; ++l) {
          dc.segments.push_back(kv.layers().k[l]);
          dc.segments.push_back(kv.layers().v[l]);
        }
        auto device = DeviceTier::Create(dc);
        CHECK_OK(device.status());
        const KvCodec codec(layout, codecs[ci]);
        std::vector<uint8_t> raw(layout.block_bytes()), back(layout.block_bytes()),
            enc(codec.encoded_bytes());
        for (int64_t b = 0; b < prefix / kBlockTokens; ++b) {
          const BlockKey key{static_cast<uint64_t>(b + 1), 0};
          (*device)->Bind(b, key);
          (*device)->Read(b, key, absl::MakeSpan(raw), [](absl::Status s) { CHECK_OK(s); });
          (*device)->Flush();
          codec.Encode(raw, absl::MakeSpan(enc));
          codec.Decode(enc, absl::MakeSpan(back));
          const float* x = reinterpret_cast<const float*>(raw.data());
          const float* y = reinterpret_cast<const float*>(back.data());
          for (size_t i = 0; i < raw.size() / sizeof(float); ++i) {
            totals[ci].err_sq += (x[i] - y[i]) * static_cast<double>(x[i] - y[i]);
            totals[ci].ref_sq += x[i] * static_cast<double>(x[i]);
          }
          (*device)->Write(b, key, back, [](absl::Status s) { CHECK_OK(s); });
          (*device)->Flush();
        }
        // The continuation, scored token by token.
        std::vector<float> logits;
        Forward(runner, kv, tokens, prefix, window, num_blocks, &logits);
        for (int64_t p = prefix; p + 1 < window; ++p) {
          const float* row = logits.data() + (p - prefix) * V;
          float m = row[0];
          for (int64_t v = 1; v < V; ++v) m = std::max(m, row[v]);
          double z = 0;
          for (int64_t v = 0; v < V; ++v) z += std::exp(static_cast<double>(row[v] - m));
          totals[ci].nll += std::log(z) + m - row[tokens[p + 1]];
          ++totals[ci].tokens;
        }
      }
    }
  }
  std::printf("model %s, %lld windows of %lld tokens, KV of the first %lld through the codec\n",
              dir.c_str(), static_cast<long long>(num_windows), static_cast<long long>(window),
              static_cast<long long>(prefix));
  std::printf("%-28s %-6s %10s %12s %11s %14s %8s\n", "text", "codec", "slot_bytes", "ppl",
              "ppl_change", "kv_rel_rms_err", "scored");
  FILE* json = absl::GetFlag(FLAGS_json_out).empty()
                   ? nullptr
                   : std::fopen(absl::GetFlag(FLAGS_json_out).c_str(), "w");
  for (size_t fi = 0; fi < files.size(); ++fi) {
    const std::vector<Totals>& totals = per_file[fi];
    const double base_ppl = std::exp(totals[0].nll / totals[0].tokens);
    const std::string text = files[fi].substr(files[fi].rfind('/') + 1);
    for (size_t ci = 0; ci < codecs.size(); ++ci) {
      const KvCodec codec(layout, codecs[ci]);
      const double ppl = std::exp(totals[ci].nll / totals[ci].tokens);
      const double rel = std::sqrt(totals[ci].err_sq / std::max(1e-30, totals[ci].ref_sq));
      const std::string name(KvCompressionName(codecs[ci]));
      std::printf("%-28s %-6s %10lld %12.4f %+10.3f%% %14.5f %8lld\n", text.c_str(), name.c_str(),
                  static_cast<long long>(HostTier::SlotBytesFor(codec)), ppl,
                  100.0 * (ppl / base_ppl - 1.0), rel, static_cast<long long>(totals[ci].tokens));
      if (json != nullptr) {
        std::fprintf(json,
                     "{\"text\":\"%s\",\"codec\":\"%s\",\"raw_bytes\":%lld,\"slot_bytes\":%lld,"
                     "\"ppl\":%.6f,\"ppl_change\":%.6f,\"kv_rel_rms_err\":%.6f,\"tokens\":%lld}\n",
                     text.c_str(), name.c_str(), static_cast<long long>(codec.raw_bytes()),
                     static_cast<long long>(HostTier::SlotBytesFor(codec)), ppl,
                     ppl / base_ppl - 1.0, rel, static_cast<long long>(totals[ci].tokens));
      }
    }
  }
  if (json != nullptr) std::fclose(json);
}

}  // namespace
}  // namespace strata

int main(int argc, char** argv) {
  strata::InitProgram(argc, argv, "KV tier compression: round-trip error and perplexity change");
  strata::Run();
  return 0;
}
