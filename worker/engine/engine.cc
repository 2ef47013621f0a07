#include "worker/engine/engine.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "common/status_macros.h"

namespace strata {
namespace {

bool Contains(const std::vector<int32_t>& v, int32_t x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const ModelWeights* weights,
                                                       Collectives* comm, EngineConfig config) {
  if (config.block_tokens <= 0 || config.max_batch_tokens <= 0 ||
      config.max_running_sequences <= 0) {
    return absl::InvalidArgumentError(
        "engine: block_tokens, max_batch_tokens and max_running_sequences must be positive");
  }
  const int64_t block_bytes = KvCacheStorage::BlockBytes(*weights, config.block_tokens);
  int64_t num_blocks = config.num_kv_blocks;
  if (num_blocks == 0) num_blocks = config.kv_cache_bytes / block_bytes;
  if (num_blocks <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("engine: the KV cache (", config.kv_cache_bytes,
                                                   " bytes) holds no ", block_bytes,
                                                   "-byte block"));
  }
  return std::unique_ptr<Engine>(new Engine(weights, comm, std::move(config), num_blocks));
}

Engine::Engine(const ModelWeights* weights, Collectives* comm, EngineConfig config,
               int64_t num_blocks)
    : weights_(weights),
      config_(std::move(config)),
      runner_(weights, comm),
      blocks_(num_blocks, config_.block_tokens),
      kv_(*weights, num_blocks, config_.block_tokens) {}

absl::Status Engine::AddRequest(const std::string& id, std::vector<int32_t> prompt,
                                RequestOptions o) {
  const ModelConfig& c = weights_->config;
  if (id.empty() || id.size() > 128) {
    return absl::InvalidArgumentError("request_id must be 1 to 128 bytes");
  }
  auto live = [&id](const auto& list) {
    return std::any_of(list.begin(), list.end(), [&id](const auto& s) { return s->id == id; });
  };
  if (live(waiting_) || live(running_)) {
    return absl::AlreadyExistsError(absl::StrCat("request_id ", id, " is already running"));
  }
  if (prompt.empty()) return absl::InvalidArgumentError("prompt must not be empty");
  for (const auto* list : {&prompt, &o.resume_tokens, &o.stop_token_ids}) {
    for (int32_t t : *list) {
      if (t < 0 || t >= c.vocab_size) {
        const char* field = list == &prompt            ? "prompt"
                            : list == &o.resume_tokens ? "resume_tokens"
                                                       : "stop_token_ids";
        return absl::InvalidArgumentError(absl::StrCat(
            field, " holds token id ", t, " outside the vocabulary [0, ", c.vocab_size, ")"));
      }
    }
  }
  const int64_t context = static_cast<int64_t>(prompt.size() + o.resume_tokens.size());
  if (context >= c.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("prompt has ", context,
                                                   " tokens; the model's context length is ",
                                                   c.max_position_embeddings));
  }
  if (o.max_tokens < 1 || o.max_tokens > 65536) {
    return absl::InvalidArgumentError("sampling.max_tokens must be in [1, 65536]");
  }
  if (o.min_tokens < 0 || o.min_tokens > o.max_tokens) {
    return absl::InvalidArgumentError("sampling.min_tokens must be in [0, max_tokens]");
  }
  if (static_cast<int64_t>(o.resume_tokens.size()) >= o.max_tokens) {
    return absl::InvalidArgumentError("resume_tokens already reach max_tokens");
  }
  if (o.prompt_logprobs < -1 || o.prompt_logprobs > 20) {
    return absl::InvalidArgumentError("sampling.prompt_logprobs must be in [0, 20]");
  }
  RETURN_IF_ERROR(ValidateSamplingOptions(o.sampling, c.vocab_size));

  auto s = std::make_unique<Sequence>();
  s->id = id;
  s->arrival = next_arrival_++;
  s->prompt_len = static_cast<int64_t>(prompt.size());
  s->penalties.AddPrompt(prompt);
  s->tokens = std::move(prompt);
  for (int32_t t : o.resume_tokens) {
    s->tokens.push_back(t);
    s->penalties.AddOutput(t);
  }
  s->num_generated = static_cast<int64_t>(o.resume_tokens.size());
  s->cache_namespace = CacheNamespace(config_.model_name, o.fine_tune_id, o.cache_salt);
  s->options = std::move(o);
  Enqueue(std::move(s), /*ahead_of_equals=*/false);
  return absl::OkStatus();
}

bool Engine::Cancel(const std::string& id) {
  for (auto it = running_.begin(); it != running_.end(); ++it) {
    if ((*it)->id == id) {
      ReleaseBlocks(it->get());
      cancelled_.push_back(std::move(*it));
      running_.erase(it);
      return true;
    }
  }
  for (auto it = waiting_.begin(); it != waiting_.end(); ++it) {
    if ((*it)->id == id) {
      ReleaseBlocks(it->get());
      cancelled_.push_back(std::move(*it));
      waiting_.erase(it);
      return true;
    }
  }
  return false;
}

bool Engine::EnsureBlocks(Sequence* s, int64_t num_tokens) {
  const int64_t want = (num_tokens + config_.block_tokens - 1) / config_.block_tokens;
  const int64_t need = want - static_cast<int64_t>(s->block_table.size());
  if (need <= 0) return true;
  if (need > blocks_.num_available()) return false;
  for (int64_t i = 0; i < need; ++i) s->block_table.push_back(*blocks_.Allocate());
  return true;
}

void Engine::ReleaseBlocks(Sequence* s) {
  for (int32_t b : s->block_table) blocks_.Release(b);
  s->block_table.clear();
  s->hashes.clear();
  s->num_computed = 0;
}

void Engine::Enqueue(std::unique_ptr<Sequence> s, bool ahead_of_equals) {
  const int32_t p = s->options.priority;
  auto it = waiting_.begin();
  while (it != waiting_.end() &&
         ((*it)->options.priority > p || (!ahead_of_equals && (*it)->options.priority == p))) {
    ++it;
  }
  waiting_.insert(it, std::move(s));
}

void Engine::Preempt(Sequence* s) {
  ++num_preemptions_;
  ReleaseBlocks(s);
  for (auto it = running_.begin(); it != running_.end(); ++it) {
    if (it->get() == s) {
      std::unique_ptr<Sequence> owned = std::move(*it);
      running_.erase(it);
      Enqueue(std::move(owned), /*ahead_of_equals=*/true);
      return;
    }
  }
}

const std::vector<BlockHash>& Engine::WaitingHashes(const Sequence& s) const {
  const size_t full = s.tokens.size() / static_cast<size_t>(config_.block_tokens);
  if (s.waiting_hashes.size() != full) {
    s.waiting_hashes = PrefixBlockHashes(s.cache_namespace, s.tokens, config_.block_tokens);
  }
  return s.waiting_hashes;
}

bool Engine::Admit(Sequence* s, int64_t budget, std::vector<Chunk>* plan) {
  const int64_t bt = config_.block_tokens;
  const int64_t len = static_cast<int64_t>(s->tokens.size());
  if (config_.enable_prefix_caching && s->options.prompt_logprobs < 0) {
    WaitingHashes(*s);  // computes them if the sequence grew since
    std::vector<BlockHash> hashes = std::move(s->waiting_hashes);
    s->waiting_hashes.clear();
    // At least one token must be computed to produce logits.
    const int64_t usable = std::min<int64_t>(blocks_.MatchPrefix(hashes), (len - 1) / bt);
    s->block_table = blocks_.AcquirePrefix(hashes, usable);
    hashes.resize(usable);
    s->hashes = std::move(hashes);
    s->num_computed = usable * bt;
    if (s->num_generated == static_cast<int64_t>(s->options.resume_tokens.size())) {
      s->num_cached_prompt = std::min(s->num_computed, s->prompt_len);
    }
  }
  const int64_t n = std::min(len - s->num_computed, budget);
  if (!EnsureBlocks(s, s->num_computed + n)) {
    ReleaseBlocks(s);
    return false;
  }
  plan->push_back({s, s->num_computed, n});
  return true;
}

void Engine::PublishFullBlocks(Sequence* s) {
  if (!config_.enable_prefix_caching) return;
  const int64_t bt = config_.block_tokens;
  const absl::Span<const int32_t> tokens(s->tokens);
  while (static_cast<int64_t>(s->hashes.size() + 1) * bt <= s->num_computed) {
    const int64_t i = static_cast<int64_t>(s->hashes.size());
    const BlockHash parent = i == 0 ? kRootBlockHash : s->hashes.back();
    const BlockHash h = ChainBlockHash(parent, s->cache_namespace, tokens.subspan(i * bt, bt));
    blocks_.Publish(s->block_table[i], h);
    s->hashes.push_back(h);
  }
}

FinishReason Engine::CheckStop(const Sequence& s, int32_t token) const {
  const ModelConfig& c = weights_->config;
  if (!s.options.ignore_eos && Contains(c.eos_token_ids, token)) return FinishReason::kEos;
  if (Contains(s.options.stop_token_ids, token)) return FinishReason::kStopToken;
  if (s.num_generated >= s.options.max_tokens) return FinishReason::kLength;
  if (static_cast<int64_t>(s.tokens.size()) >= c.max_position_embeddings) {
    return FinishReason::kContextLength;
  }
  return FinishReason::kNone;
}

absl::StatusOr<std::vector<RequestOutput>> Engine::Step() {
  std::vector<RequestOutput> outputs;
  for (auto& s : cancelled_) {
    RequestOutput out;
    out.request_id = s->id;
    out.finish = FinishReason::kCancelled;
    out.num_prompt_tokens = s->prompt_len;
    out.num_cached_prompt_tokens = s->num_cached_prompt;
    out.num_generated_tokens = s->num_generated;
    outputs.push_back(std::move(out));
  }
  cancelled_.clear();

  // Plan: running sequences first (in admission order), then admissions.
  std::vector<Chunk> plan;
  int64_t budget = config_.max_batch_tokens;
  for (size_t i = 0; i < running_.size() && budget > 0;) {
    Sequence* s = running_[i].get();
    const int64_t n =
        std::min<int64_t>(static_cast<int64_t>(s->tokens.size()) - s->num_computed, budget);
    bool preempted_self = false;
    while (!EnsureBlocks(s, s->num_computed + n)) {
      // Only sequences not yet planned this step (index >= i) may be preempted; among them the
      // lowest priority, most recently admitted.
      Sequence* victim = running_.back().get();
      for (size_t j = running_.size(); j-- > i;) {
        if (running_[j]->options.priority < victim->options.priority) victim = running_[j].get();
      }
      Preempt(victim);
      if (victim == s) {
        preempted_self = true;
        break;
      }
    }
    if (preempted_self) break;
    plan.push_back({s, s->num_computed, n});
    budget -= n;
    ++i;
  }
  while (budget > 0 && !waiting_.empty() &&
         static_cast<int64_t>(running_.size()) < config_.max_running_sequences) {
    Sequence* s = waiting_.front().get();
    if (!Admit(s, budget, &plan)) break;
    budget -= plan.back().count;
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
  }
  if (plan.empty()) {
    if (!waiting_.empty() && running_.empty()) {
      // Not even one sequence fits: the cache is smaller than its prompt.
      auto s = std::move(waiting_.front());
      waiting_.pop_front();
      LOG(ERROR) << "request " << s->id << " needs more KV blocks than the cache has";
      RequestOutput out;
      out.request_id = s->id;
      out.finish = FinishReason::kContextLength;
      out.num_prompt_tokens = s->prompt_len;
      outputs.push_back(std::move(out));
    }
    return outputs;
  }

  // Build the batch.
  const int64_t bt = config_.block_tokens;
  int64_t max_blocks = 1;
  for (const Chunk& ch : plan) {
    max_blocks = std::max<int64_t>(max_blocks, static_cast<int64_t>(ch.seq->block_table.size()));
  }
  std::vector<int32_t> tokens, positions, token_seq, logit_tokens;
  std::vector<int64_t> slots;
  std::vector<int32_t> tables(plan.size() * max_blocks, -1);
  struct LogitUse {
    size_t chunk;
    int64_t position;  // position of the token whose logits these are
  };
  std::vector<LogitUse> uses;
  for (size_t ci = 0; ci < plan.size(); ++ci) {
    const Chunk& ch = plan[ci];
    Sequence* s = ch.seq;
    std::copy(s->block_table.begin(), s->block_table.end(), tables.begin() + ci * max_blocks);
    const int64_t end = ch.start + ch.count;
    const bool wants_prompt_lp = s->options.prompt_logprobs >= 0 && !s->prompt_logprobs_sent;
    for (int64_t p = ch.start; p < end; ++p) {
      const bool last = p == static_cast<int64_t>(s->tokens.size()) - 1;
      if (last || (wants_prompt_lp && p + 1 < s->prompt_len)) {
        logit_tokens.push_back(static_cast<int32_t>(tokens.size()));
        uses.push_back({ci, p});
      }
      tokens.push_back(s->tokens[p]);
      positions.push_back(static_cast<int32_t>(p));
      token_seq.push_back(static_cast<int32_t>(ci));
      slots.push_back(int64_t{s->block_table[p / bt]} * bt + p % bt);
    }
  }
  const int64_t V = weights_->config.vocab_size;
  logits_.resize(logit_tokens.size() * V);
  ForwardBatch batch;
  batch.tokens = tokens;
  batch.positions = positions;
  batch.token_seq = token_seq;
  batch.slots = slots;
  batch.block_tables = tables;
  batch.num_seqs = static_cast<int64_t>(plan.size());
  batch.max_blocks_per_seq = max_blocks;
  batch.logit_tokens = logit_tokens;
  RETURN_IF_ERROR(runner_.Forward(batch, kv_.layers(), absl::MakeSpan(logits_)));

  for (const Chunk& ch : plan) {
    ch.seq->num_computed += ch.count;
    PublishFullBlocks(ch.seq);
  }
  // Outputs in plan order.
  std::vector<std::pair<Sequence*, RequestOutput>> produced;
  auto output_of = [&produced](Sequence* s) -> RequestOutput& {
    for (auto& [seq, out] : produced) {
      if (seq == s) return out;
    }
    produced.emplace_back(s, RequestOutput{});
    return produced.back().second;
  };
  std::vector<Sequence*> finished;
  for (size_t u = 0; u < uses.size(); ++u) {
    Sequence* s = plan[uses[u].chunk].seq;
    const absl::Span<float> row(logits_.data() + u * V, V);
    const int64_t p = uses[u].position;
    RequestOutput& out = output_of(s);
    if (p + 1 < s->prompt_len) {
      s->prompt_logprobs.push_back(LogprobsOf(row, s->tokens[p + 1], s->options.prompt_logprobs));
      continue;
    }
    if (s->options.prompt_logprobs >= 0 && !s->prompt_logprobs_sent) {
      out.prompt_logprobs = std::move(s->prompt_logprobs);
      s->prompt_logprobs_sent = true;
    }
    std::vector<int32_t> banned;
    if (s->num_generated < s->options.min_tokens) {
      banned = weights_->config.eos_token_ids;
      banned.insert(banned.end(), s->options.stop_token_ids.begin(),
                    s->options.stop_token_ids.end());
    }
    SampledToken t =
        Sample(row, s->options.sampling, s->penalties, s->num_generated, banned, &scratch_);
    s->tokens.push_back(t.token);
    s->penalties.AddOutput(t.token);
    ++s->num_generated;
    out.finish = CheckStop(*s, t.token);
    out.tokens.push_back(std::move(t));
    if (out.finish != FinishReason::kNone) finished.push_back(s);
  }
  for (auto& [s, out] : produced) {
    if (out.tokens.empty() && out.finish == FinishReason::kNone) continue;  // mid-prefill
    out.request_id = s->id;
    out.num_prompt_tokens = s->prompt_len;
    out.num_cached_prompt_tokens = s->num_cached_prompt;
    out.num_generated_tokens = s->num_generated;
    outputs.push_back(std::move(out));
  }
  for (Sequence* s : finished) {
    ReleaseBlocks(s);
    running_.erase(std::find_if(running_.begin(), running_.end(),
                                [s](const auto& p) { return p.get() == s; }));
  }
  return outputs;
}

EngineStats Engine::Stats() const {
  EngineStats st;
  st.num_running = static_cast<int64_t>(running_.size());
  st.num_waiting = static_cast<int64_t>(waiting_.size());
  for (const auto& s : running_) {
    if (s->num_computed >= s->prompt_len) {
      ++st.num_decode;
    } else {
      st.num_pending_prefill_tokens += s->prompt_len - s->num_computed;
    }
  }
  // A waiting sequence will compute only what the prefix cache does not hold.
  for (const auto& s : waiting_) {
    const int64_t len = static_cast<int64_t>(s->tokens.size());
    int64_t cached = 0;
    if (config_.enable_prefix_caching && s->options.prompt_logprobs < 0) {
      cached = std::min<int64_t>(blocks_.MatchPrefix(WaitingHashes(*s)),
                                 (len - 1) / config_.block_tokens) *
               config_.block_tokens;
    }
    st.num_pending_prefill_tokens += len - cached;
  }
  st.num_free_blocks = blocks_.num_available();
  st.num_total_blocks = blocks_.num_blocks();
  st.num_preemptions = num_preemptions_;
  return st;
}

}  // namespace strata
