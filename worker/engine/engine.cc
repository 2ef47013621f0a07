#include "worker/engine/engine.h"

#include <algorithm>
#include <array>
#include <bit>
#include <functional>
#include <limits>
#include <numeric>
#include <optional>
#include <thread>
#include <tuple>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "kernels/matmul.h"
#include "worker/engine/ngram_draft.h"
#include "worker/model/delta.h"

namespace strata {
namespace {

bool Contains(const std::vector<int32_t>& v, int32_t x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

// Token `t`'s bytes for a grammar (empty for special tokens and ids past the tokenizer's).
absl::string_view TokenText(const TokenTrie& vocab, int32_t t) {
  return t >= 0 && t < vocab.vocab_size() ? absl::string_view(vocab.bytes(t)) : absl::string_view();
}

// The one byte `next` holds, or -1 when it holds none or several.
int OnlyByte(const ByteSet& next) {
  const std::array<uint64_t, 4>& words = next.bits();
  int count = 0;
  for (uint64_t w : words) count += std::popcount(w);
  if (count != 1) return -1;
  int byte = 0;
  while (!((words[byte >> 6] >> (byte & 63)) & 1)) ++byte;
  return byte;
}

// Under a grammar in state `matcher`: the text it forces from here (while exactly one byte may
// follow and the text is not yet complete), as the tokens `tokenize` makes of it (those that spell
// it from its start), or without `tokenize` split greedily into the longest tokens of `vocab`;
// less the last token unless the text ends the output; up to `limit` tokens, appended to `draft`.
void ForcedDraft(const GrammarMatcher& matcher, const TokenTrie& vocab,
                 const std::function<std::vector<int32_t>(absl::string_view)>& tokenize,
                 int64_t limit, std::vector<int32_t>* draft) {
  // Most steps force nothing (free text inside a string): look before copying the matcher.
  if (matcher.IsComplete() || OnlyByte(matcher.NextBytes()) < 0) return;
  GrammarMatcher m = matcher;
  std::string forced;
  while (forced.size() < 256 && !m.IsComplete()) {
    const int byte = OnlyByte(m.NextBytes());
    if (byte < 0) break;
    const char c = static_cast<char>(byte);
    if (!m.Advance(absl::string_view(&c, 1))) break;
    forced.push_back(c);
  }
  if (forced.empty()) return;
  std::vector<int32_t> tokens;
  if (tokenize) {
    // Only the tokens that spell the forced text from its start (a tokenizer that puts a space
    // or "▁" before a text spells something else).
    size_t at = 0;
    for (int32_t t : tokenize(forced)) {
      const absl::string_view bytes = TokenText(vocab, t);
      if (bytes.empty() || absl::string_view(forced).substr(at, bytes.size()) != bytes) break;
      tokens.push_back(t);
      at += bytes.size();
    }
  } else {
    for (size_t at = 0; at < forced.size();) {
      size_t length = 0;
      const int32_t t = vocab.LongestPrefix(absl::string_view(forced).substr(at), &length);
      if (t < 0) break;
      tokens.push_back(t);
      at += length;
    }
  }
  // Unless the forced text ends the output, its last token is left out: the free text after it
  // may join it.
  if (m.CanContinue() && !tokens.empty()) tokens.pop_back();
  if (static_cast<int64_t>(tokens.size()) > limit) tokens.resize(limit);
  draft->insert(draft->end(), tokens.begin(), tokens.end());
}

}  // namespace

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const ModelWeights* weights,
                                                       Collectives* comm, EngineConfig config) {
  if (config.block_tokens <= 0 || config.max_batch_tokens <= 0 ||
      config.max_running_sequences <= 0) {
    return absl::InvalidArgumentError(
        "engine: block_tokens, max_batch_tokens and max_running_sequences must be positive");
  }
  if (comm->world_size() != weights->world_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("engine: the weights are one of ", weights->world_size,
                     " tensor-parallel shards, the group has ", comm->world_size(), " ranks"));
  }
  if (comm->rank() != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("engine: tensor-parallel rank ", comm->rank(),
                     " follows rank 0 (ModelRunner::ServeFollower)"));
  }
  if (config.num_speculative_tokens < 0 || config.num_speculative_tokens > 32) {
    return absl::InvalidArgumentError(absl::StrCat(
        "engine: num_speculative_tokens must be in [0, 32], not ", config.num_speculative_tokens));
  }
  if (config.num_speculative_tokens > 0) {
    if (config.prompt_lookup_min < 1 || config.prompt_lookup_min > 64) {
      return absl::InvalidArgumentError(absl::StrCat(
          "engine: prompt_lookup_min must be in [1, 64], not ", config.prompt_lookup_min));
    }
    if (config.prompt_lookup_max < config.prompt_lookup_min || config.prompt_lookup_max > 64) {
      return absl::InvalidArgumentError(
          absl::StrCat("engine: prompt_lookup_max must be in [prompt_lookup_min, 64] = [",
                       config.prompt_lookup_min, ", 64], not ", config.prompt_lookup_max));
    }
    if (config.speculative_max_batch < -1 || config.speculative_max_batch == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("engine: speculative_max_batch must be 1 or more (or -1: no limit), not ",
                       config.speculative_max_batch));
    }
  }
  const bool on_gpu = config.device == "gpu";
  if (!on_gpu && config.device != "cpu") {
    return absl::InvalidArgumentError(
        absl::StrCat("engine: device must be cpu or gpu, not '", config.device, "'"));
  }
  if (config.draft_weights != nullptr) {
    if (config.num_speculative_tokens <= 0) {
      return absl::InvalidArgumentError(
          "engine: a draft model needs num_speculative_tokens of 1 or more");
    }
    if (config.draft_kv_cache_bytes < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "engine: draft_kv_cache_bytes must be 0 (sized for speculative_max_batch sequences) "
          "or more, not ",
          config.draft_kv_cache_bytes));
    }
  }
  // The cache's elements: f32 on the cpu, the activation type on the gpu.
  const int64_t element_bytes = on_gpu ? DTypeBytes(config.gpu.act) : int64_t{sizeof(float)};
  const int64_t block_bytes =
      KvCacheStorage::BlockBytes(*weights, config.block_tokens, element_bytes);
  int64_t num_blocks = config.num_kv_blocks;
  if (num_blocks == 0) num_blocks = config.kv_cache_bytes / block_bytes;
  if (num_blocks <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("engine: the KV cache (", config.kv_cache_bytes,
                                                   " bytes) holds no ", block_bytes,
                                                   "-byte block"));
  }
  if (config.max_context_tokens < 0 ||
      config.max_context_tokens > weights->config.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat(
        "engine: max_context_tokens must be 0 (the model's context) to the model's context of ",
        weights->config.max_position_embeddings, " tokens, not ", config.max_context_tokens));
  }
  if (config.max_context_tokens > num_blocks * config.block_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "engine: max_context_tokens is ", config.max_context_tokens, " but the KV cache holds ",
        num_blocks * config.block_tokens, " tokens (", num_blocks, " blocks of ",
        config.block_tokens, "); a sequence must fit it whole"));
  }
  std::unique_ptr<Engine> engine(new Engine(weights, comm, std::move(config), num_blocks));
  if (on_gpu) {
    if (comm->world_size() != 1) {
      return absl::InvalidArgumentError("engine: the GPU runner serves one rank only for now");
    }
#ifdef STRATA_HAVE_CUDA
    const EngineConfig& c = engine->config_;
    GpuRunnerOptions o = c.gpu;
    o.num_blocks = num_blocks;
    o.block_tokens = c.block_tokens;
    o.max_batch_tokens = c.max_batch_tokens;
    o.max_seqs = c.max_running_sequences;
    o.max_blocks_per_seq = (engine->MaxContextTokens() + c.block_tokens - 1) / c.block_tokens + 1;
    o.delta_bytes = 0;
    if (!c.fine_tunes.empty() || c.fine_tunes_may_change) {
      // The deltas of running sequences, which DeltaCache keeps within delta_cache_bytes, plus
      // the few hundred bytes of alignment each may take more on the device (a step runs at
      // most one delta per sequence).
      const int64_t deltas = c.fine_tunes_may_change
                                 ? c.max_running_sequences
                                 : std::min<int64_t>(c.max_running_sequences,
                                                     static_cast<int64_t>(c.fine_tunes.size()));
      o.delta_bytes = c.delta_cache_bytes + 1024 * (deltas + 1);
    }
    if (c.gpu_random_weights_seed != 0) {
      ASSIGN_OR_RETURN(engine->gpu_,
                       GpuModelRunner::CreateRandom(weights->config, o, c.gpu_random_weights_seed));
    } else {
      ASSIGN_OR_RETURN(engine->gpu_, GpuModelRunner::Create(*weights, o));
    }
    // Up to 16 threads by default: every parallel pass wakes them all.
    engine->host_pool_ = std::make_unique<ThreadPool>(
        c.compute_threads > 0
            ? c.compute_threads
            : std::min(16, static_cast<int>(std::thread::hardware_concurrency())));
#else
    return absl::UnavailableError("engine: this build has no CUDA (device gpu)");
#endif
  } else {
    engine->runner_ = std::make_unique<ModelRunner>(weights, comm, engine->config_.compute_threads);
    if (comm->world_size() > 1) {
      // Every rank's cache in the group's shared memory; the followers map theirs on the first
      // step's plan.
      ASSIGN_OR_RETURN(engine->caches_,
                       GroupKvCaches(*weights, comm, num_blocks, engine->config_.block_tokens));
    } else {
      engine->kv_ =
          std::make_unique<KvCacheStorage>(*weights, num_blocks, engine->config_.block_tokens);
      engine->caches_.push_back(engine->kv_->layers());
    }
  }
  RETURN_IF_ERROR(engine->OpenTiers());
  if (engine->config_.draft_weights != nullptr) {
    DraftModelConfig dc;
    dc.kv_cache_bytes = engine->config_.draft_kv_cache_bytes;
    if (dc.kv_cache_bytes == 0) {
      // Whole blocks for what may draft at once, in the draft's cache dtype on this device.
      const ModelWeights& d = *engine->config_.draft_weights;
      const int64_t draft_block =
          KvCacheStorage::BlockBytes(d, engine->config_.block_tokens, element_bytes);
      const int64_t tokens = std::min<int64_t>(
          int64_t{engine->config_.speculative_max_batch} * kDraftKvTokensPerSequence,
          num_blocks * engine->config_.block_tokens);
      dc.kv_cache_bytes =
          (tokens + engine->config_.block_tokens - 1) / engine->config_.block_tokens * draft_block;
      engine->config_.draft_kv_cache_bytes = dc.kv_cache_bytes;
    }
    dc.block_tokens = engine->config_.block_tokens;
    dc.compute_threads = engine->config_.draft_compute_threads > 0
                             ? engine->config_.draft_compute_threads
                             : engine->config_.compute_threads;
    dc.max_catch_up_tokens = engine->config_.max_batch_tokens;
    // On the engine's device; on the gpu in its activation type, with its kernel choices.
    dc.device = engine->config_.device;
    dc.gpu = engine->config_.gpu;
    dc.max_seqs = engine->config_.max_running_sequences;
    // (No sharing on the draft where the target shares nothing either.)
    dc.prefix_caching =
        engine->config_.draft_prefix_caching && engine->config_.enable_prefix_caching;
    ASSIGN_OR_RETURN(engine->draft_, DraftModel::Create(engine->config_.draft_weights,
                                                        weights->config.vocab_size, dc));
  }
  if (weights->files != nullptr) engine->model_fingerprint_ = BaseFingerprint(*weights->files);
  const EngineConfig& ec = engine->config_;
  if (!ec.fine_tunes.empty() || ec.fine_tunes_may_change) {
    if (comm->world_size() > 1) {
      return absl::FailedPreconditionError(
          "engine: fine-tunes are served by workers of one tensor-parallel rank only");
    }
    if (weights->files == nullptr) {
      return absl::FailedPreconditionError(
          "engine: fine-tunes need a base loaded from files (random weights have no fingerprint)");
    }
    engine->deltas_ = std::make_unique<DeltaCache>(weights, BaseFingerprint(*weights->files),
                                                   ec.delta_cache_bytes);
    for (const auto& [id, path] : ec.fine_tunes) {
      RETURN_IF_ERROR(engine->deltas_->Register(id, path));
    }
  }
  return engine;
}

absl::Status Engine::OpenTiers() {
  const bool lower_tiers = config_.tiers.host_bytes != 0 || config_.tiers.disk_bytes != 0;
  if (lower_tiers && !config_.enable_prefix_caching) {
    return absl::InvalidArgumentError("engine: host and disk KV tiers need prefix caching");
  }
  // The device cache as a tier: for the lower tiers' copies, and for copies of cached blocks to
  // and from other workers (ExportKvBlocks, ImportKvBlocks).
  if (!config_.enable_prefix_caching) return absl::OkStatus();
  const ModelWeights& w = *weights_;
  DeviceTierConfig dc;
  dc.layout = KvBlockLayout{2 * w.config.num_layers, config_.block_tokens, w.num_kv_heads,
                            w.config.head_dim};
  dc.num_slots = blocks_.num_blocks();
  if (gpu_ != nullptr) {
    // The GPU cache in its activation type; tier copies run between steps, which end
    // synchronized (GpuModelRunner::KvSegments).
    dc.layout.dtype = config_.gpu.act;
    dc.segments = gpu_->KvSegments();
  } else {
    // Under tensor parallelism a block is every rank's share of it: rank by rank, each with
    // its KV heads.
    dc.layout.num_segments *= static_cast<int64_t>(caches_.size());
    for (const KvCacheLayers& cache : caches_) {
      for (int64_t l = 0; l < w.config.num_layers; ++l) {
        dc.segments.push_back(cache.k[l]);
        dc.segments.push_back(cache.v[l]);
      }
    }
  }
  const KvBlockLayout layout = dc.layout;
  transfer_layout_ = layout;
  ASSIGN_OR_RETURN(device_tier_, DeviceTier::Create(std::move(dc)));
  if (!lower_tiers) return absl::OkStatus();
  KvStoreConfig tiers = config_.tiers;
  tiers.fair_eviction = config_.fair_cache_eviction;  // every tier evicts by the same rule
  ASSIGN_OR_RETURN(store_, KvStore::Create(std::move(tiers), layout, device_tier_.get()));
  // A cached block about to be reused goes down to the host tier first.
  blocks_.SetEvictionHook([this](int32_t block, BlockKey key, int32_t owner) {
    PutDown(block, key, /*to_disk=*/false, owner);
  });
  return absl::OkStatus();
}

Engine::Engine(const ModelWeights* weights, Collectives* comm, EngineConfig config,
               int64_t num_blocks)
    : weights_(weights), config_(std::move(config)), blocks_(num_blocks, config_.block_tokens) {
  (void)comm;
  blocks_.SetFairEviction(config_.fair_cache_eviction);
  if (config_.speculative_max_batch < 0) {
    config_.speculative_max_batch =
        config_.device == "gpu" ? kGpuSpeculativeMaxBatch : kCpuSpeculativeMaxBatch;
  }
  if (config_.vocabulary != nullptr) {
    masker_ = std::make_unique<TokenMasker>(config_.vocabulary, config_.grammar_mask_cache_bytes);
    if (config_.grammar_warm_walks < 0)
      config_.grammar_warm_walks = config_.device == "gpu" ? 8 : 0;
    if (config_.grammar_warm_walks > 0) warm_thread_ = std::thread([this] { WarmLoop(); });
  }
}

Engine::~Engine() {
  {
    std::lock_guard<std::mutex> lock(warm_mu_);
    warm_stop_ = true;
  }
  warm_cancel_ = true;
  warm_cv_.notify_all();
  if (warm_thread_.joinable()) warm_thread_.join();
}

void Engine::WarmGrammar(const std::shared_ptr<const Grammar>& grammar) {
  if (!warm_thread_.joinable() || !warmed_.insert(grammar.get()).second) return;
  if (warmed_.size() > 100000) warmed_.clear();  // addresses of grammars long gone
  {
    std::lock_guard<std::mutex> lock(warm_mu_);
    // A burst of one-off grammars: warming is a help, not owed; the rest wait for their masks.
    if (warm_queue_.size() >= 16) return;
    warm_queue_.push_back(grammar);
  }
  warm_cv_.notify_one();
}

void Engine::WarmLoop() {
  uint64_t seed = 1;
  while (true) {
    std::shared_ptr<const Grammar> grammar;
    {
      std::unique_lock<std::mutex> lock(warm_mu_);
      warm_cv_.wait(lock, [this] { return warm_stop_ || !warm_queue_.empty(); });
      if (warm_stop_) return;
      grammar = std::move(warm_queue_.front());
      warm_queue_.pop_front();
    }
    masker_->Warm(grammar, config_.grammar_warm_walks, seed++, &warm_cancel_);
  }
}

absl::Status Engine::AddRequest(const std::string& id, std::vector<int32_t> prompt,
                                RequestOptions o) {
  const ModelConfig& c = weights_->config;
  if (id.empty() || id.size() > 128) {
    return absl::InvalidArgumentError("request_id must be 1 to 128 bytes");
  }
  if (live_ids_.contains(id)) {
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
  // A sequence must fit the KV cache whole to run (alone, if need be): one longer would prefill
  // until the cache filled, preempt itself and start over, for ever.
  if (context >= CacheTokens()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt has ", context, " tokens; this worker's KV cache holds ", CacheTokens(),
        " (a larger --kv_cache_mb, or tensor parallelism, holds more)"));
  }
  if (config_.max_context_tokens > 0 && context >= config_.max_context_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt has ", context, " tokens; this worker serves a context of ",
                     config_.max_context_tokens, " (--max_context_tokens)"));
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
  RETURN_IF_ERROR(ValidateSamplingKnobs(o.sampling, c.vocab_size));
  if (o.tenant.size() > 128) return absl::InvalidArgumentError("tenant must be at most 128 bytes");
  if (!(o.tenant_weight > 0 && o.tenant_weight <= 1000)) {
    return absl::InvalidArgumentError(
        absl::StrCat("tenant_weight must be in (0, 1000], not ", o.tenant_weight));
  }
  if (o.grammar != nullptr && config_.vocabulary == nullptr) {
    return absl::FailedPreconditionError(
        "structured output needs the model's tokenizer, which this worker has not loaded");
  }
  std::optional<GrammarMatcher> matcher;
  if (o.grammar != nullptr) {
    matcher.emplace(o.grammar);
    if (!matcher->Advance(o.grammar_prefix)) {
      return absl::InvalidArgumentError(
          "sampling.structured_output.prefix does not follow the request's grammar");
    }
    if (matcher->Overloaded()) {
      return absl::InvalidArgumentError("the structured output is too ambiguous to follow");
    }
    for (int32_t t : o.resume_tokens) {
      if (!matcher->Advance(TokenText(*config_.vocabulary, t))) {
        return absl::InvalidArgumentError(absl::StrCat(
            "resume_tokens do not follow the request's structured output (token ", t, ")"));
      }
    }
  }
  if (!o.fine_tune_id.empty()) {
    if (deltas_ == nullptr || !deltas_->Has(o.fine_tune_id)) {
      return absl::NotFoundError(
          absl::StrCat("fine_tune_id \"", o.fine_tune_id, "\" is not served by this worker"));
    }
    deltas_->Prefetch(o.fine_tune_id);
  }

  auto s = std::make_unique<Sequence>();
  s->id = id;
  s->arrival = next_arrival_++;
  s->share = ShareFor(o);
  if (s->share->live++ == 0) live_by_service_.insert({s->share->service, s->share});
  s->prompt_len = static_cast<int64_t>(prompt.size());
  s->penalties.AddPrompt(prompt);
  s->tokens = std::move(prompt);
  for (int32_t t : o.resume_tokens) {
    s->tokens.push_back(t);
    s->penalties.AddOutput(t);
  }
  s->num_generated = static_cast<int64_t>(o.resume_tokens.size());
  // A delta's revision joins its id in the namespace: a delta file replaced under the same id
  // (after a restart, with the disk tier kept) must not reuse the old one's KV.
  if (!o.fine_tune_id.empty()) s->fine_tune_revision = deltas_->Revision(o.fine_tune_id);
  s->cache_namespace = CacheNamespace(
      config_.model_name, FineTuneNamespaceId(o.fine_tune_id, s->fine_tune_revision), o.cache_salt);
  s->options = std::move(o);
  s->matcher = std::move(matcher);
  if (s->options.grammar != nullptr) WarmGrammar(s->options.grammar);
  if (config_.enable_prefix_caching && s->options.prompt_logprobs < 0) LookUpAndPrefetch(s.get());
  s->live_ids = &live_ids_;
  live_ids_.emplace(s->id, s.get());
  s->queued_at = absl::Now();
  Enqueue(std::move(s), /*ahead_of_equals=*/false);
  return absl::OkStatus();
}

int32_t Engine::TenantId(const std::string& name) {
  if (auto it = tenant_ids_.find(name); it != tenant_ids_.end()) return it->second;
  if (tenant_ids_.size() >= tenant_ids_prune_at_) {
    // Names that churn without end: forget those that hold no KV block in any tier and are not
    // in tenants_ (their blocks would otherwise count under an id nobody has any more). The next
    // pass waits for as many new names again as survived, so that passes that free little do
    // not come at every new name.
    absl::erase_if(tenant_ids_, [this](const auto& e) {
      if (tenants_.contains(e.first) || blocks_.num_published_by(e.second) > 0) return false;
      return store_ == nullptr || (store_->BlocksOf(Tier::kHost, e.second) == 0 &&
                                   store_->BlocksOf(Tier::kDisk, e.second) == 0);
    });
    tenant_ids_prune_at_ = std::max(kMaxTenantIds, 2 * tenant_ids_.size());
  }
  const int32_t id = next_tenant_id_++;
  tenant_ids_[name] = id;
  return id;
}

Engine::TenantShare* Engine::ShareFor(const RequestOptions& o) {
  auto it = tenants_.find(o.tenant);
  if (it == tenants_.end()) {
    // Names come from the coordinator's keys; should they churn without end, the idle ones go
    // (what they were served is forgotten, as is any idle tenant's credit).
    // (Likewise spaced out: past 4096, or twice those with sequences at the last pass.)
    if (tenants_.size() >= tenants_prune_at_) {
      absl::erase_if(tenants_, [](const auto& t) { return t.second.live == 0; });
      tenants_prune_at_ = std::max(kMaxTenants, 2 * tenants_.size());
    }
    it = tenants_.try_emplace(o.tenant).first;
    it->second.name = o.tenant;
    it->second.id = TenantId(o.tenant);
    it->second.engine = this;
  }
  TenantShare& t = it->second;
  t.weight = o.tenant_weight;
  if (t.live == 0) {
    // No credit banked while idle: start level with the least served tenant at work, or, when
    // none is, with the most served of all (an idle engine forgets who was served more: work
    // done alone took nothing from anyone).
    t.service = std::max(
        t.service, live_by_service_.empty() ? most_service_ : live_by_service_.begin()->first);
  }
  return &t;
}

void Engine::TenantIdle(TenantShare* t) { live_by_service_.erase({t->service, t}); }

void Engine::Charge(const Sequence& s, int64_t computed, int64_t generated) {
  TenantShare& t = *s.share;
  t.computed_tokens += computed;
  t.generated_tokens += generated;
  if (computed + generated == 0) return;
  // Its places by service move with it (a charged tenant is live).
  for (const auto& [priority, order] : t.heads) {
    tenant_heads_.erase({priority, t.service, order, &t});
  }
  live_by_service_.erase({t.service, &t});
  t.service += static_cast<double>(computed + generated) / t.weight;
  most_service_ = std::max(most_service_, t.service);
  live_by_service_.insert({t.service, &t});
  for (const auto& [priority, order] : t.heads) {
    tenant_heads_.insert({priority, t.service, order, &t});
  }
}

void Engine::UpdateHead(TenantShare* t, int32_t priority) {
  auto first = waiting_by_tenant_.lower_bound({priority, t, std::numeric_limits<int64_t>::min()});
  const bool any =
      first != waiting_by_tenant_.end() && first->priority == priority && first->share == t;
  auto h = std::find_if(t->heads.begin(), t->heads.end(),
                        [priority](const auto& e) { return e.first == priority; });
  if (h != t->heads.end()) {
    if (any && h->second == first->order) return;
    tenant_heads_.erase({priority, t->service, h->second, t});
    if (!any) {
      t->heads.erase(h);
      return;
    }
    h->second = first->order;
  } else {
    if (!any) return;
    t->heads.emplace_back(priority, first->order);
  }
  tenant_heads_.insert({priority, t->service, first->order, t});
}

void Engine::ReleaseDelta(Sequence* s) {
  if (s->delta != nullptr) {
    deltas_->Release(s->delta);
    s->delta = nullptr;
  }
}

absl::Status Engine::RegisterFineTune(const std::string& id, const std::string& path,
                                      bool replace) {
  if (deltas_ == nullptr) {
    return absl::FailedPreconditionError("engine: this engine serves no fine-tunes");
  }
  return replace ? deltas_->Replace(id, path) : deltas_->Register(id, path);
}

absl::Status Engine::UnregisterFineTune(const std::string& id) {
  if (deltas_ == nullptr) {
    return absl::FailedPreconditionError("engine: this engine serves no fine-tunes");
  }
  return deltas_->Unregister(id);
}

bool Engine::Cancel(const std::string& id) {
  auto live = live_ids_.find(id);
  if (live == live_ids_.end()) return false;
  Sequence* s = live->second;
  std::unique_ptr<Sequence> owned;
  if (auto w = waiting_.find(s->wait_key); w != waiting_.end() && w->second.get() == s) {
    owned = Dequeue(*s);
  } else {
    auto r =
        std::find_if(running_.begin(), running_.end(), [s](const auto& p) { return p.get() == s; });
    CHECK(r != running_.end()) << "request " << id << " is live but neither waiting nor running";
    owned = std::move(*r);
    running_.erase(r);
  }
  live_ids_.erase(live);  // the id may be used again at once
  ReleaseBlocks(s);
  ReleaseDelta(s);
  cancelled_.push_back(std::move(owned));
  return true;
}

bool Engine::EnsureBlocks(Sequence* s, int64_t num_tokens, bool free_only) {
  const int64_t want = (num_tokens + config_.block_tokens - 1) / config_.block_tokens;
  const int64_t need = want - static_cast<int64_t>(s->block_table.size());
  if (need <= 0) return true;
  if (need > (free_only ? blocks_.num_free() : blocks_.num_available())) return false;
  for (int64_t i = 0; i < need; ++i) s->block_table.push_back(*blocks_.Allocate(free_only));
  return true;
}

void Engine::ReleaseBlocks(Sequence* s) {
  // Last block first: a chain's tail becomes least recently used and is evicted before its head
  // (a head without its tail is still a prefix hit; a tail without its head is useless).
  for (auto it = s->block_table.rbegin(); it != s->block_table.rend(); ++it) blocks_.Release(*it);
  s->block_table.clear();
  s->hashes.clear();
  s->planned_hashes.clear();
  s->num_computed = 0;
}

int64_t Engine::PendingPrefill(const Sequence& s) const {
  // It will compute only what the prefix cache does not hold.
  const int64_t len = static_cast<int64_t>(s.tokens.size());
  int64_t cached = 0;
  if (config_.enable_prefix_caching && s.options.prompt_logprobs < 0) {
    cached =
        std::min<int64_t>(blocks_.MatchPrefix(WaitingHashes(s)), (len - 1) / config_.block_tokens) *
        config_.block_tokens;
  }
  return len - cached;
}

void Engine::RefreshPendingPrefill(Sequence* s) {
  waiting_prefill_tokens_ -= s->pending_prefill;
  s->pending_prefill = PendingPrefill(*s);
  waiting_prefill_tokens_ += s->pending_prefill;
}

void Engine::Enqueue(std::unique_ptr<Sequence> s, bool ahead_of_equals) {
  s->pending_prefill = 0;
  RefreshPendingPrefill(s.get());
  s->wait_key = {s->options.priority, ahead_of_equals ? next_ahead_order_-- : next_wait_order_++};
  waiting_by_tenant_.insert({s->wait_key.priority, s->share, s->wait_key.order});
  UpdateHead(s->share, s->wait_key.priority);
  const WaitKey key = s->wait_key;
  waiting_.emplace(key, std::move(s));
}

std::unique_ptr<Engine::Sequence> Engine::Dequeue(const Sequence& s) {
  auto it = waiting_.find(s.wait_key);
  CHECK(it != waiting_.end() && it->second.get() == &s) << "request " << s.id << " is not waiting";
  std::unique_ptr<Sequence> owned = std::move(it->second);
  waiting_.erase(it);
  waiting_by_tenant_.erase({s.wait_key.priority, s.share, s.wait_key.order});
  UpdateHead(s.share, s.wait_key.priority);
  waiting_prefill_tokens_ -= s.pending_prefill;
  return owned;
}

void Engine::PauseDelta(Sequence* s) {
  // One whose fine-tune was replaced or removed since it began keeps its delta: the registry no
  // longer has it, and the sequence must finish on it.
  if (s->delta != nullptr && deltas_->Revision(s->options.fine_tune_id) != s->fine_tune_revision) {
    return;
  }
  ReleaseDelta(s);
}

void Engine::Preempt(Sequence* s) {
  ++num_preemptions_;
  ReleaseBlocks(s);
  PauseDelta(s);
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

void Engine::LookUpAndPrefetch(Sequence* s) {
  const std::vector<BlockHash>& hashes = WaitingHashes(*s);
  const int64_t limit = (static_cast<int64_t>(s->tokens.size()) - 1) / config_.block_tokens;
  const int64_t on_device = std::min<int64_t>(blocks_.MatchPrefix(hashes), limit);
  s->arrival_tiers.assign(on_device, Tier::kDevice);
  if (store_ == nullptr) return;
  int64_t end = on_device;
  for (; end < limit; ++end) {
    const KvStore::Where where = store_->Find(hashes[end]);
    if (where == KvStore::Where::kNone) break;
    s->arrival_tiers.push_back(where == KvStore::Where::kHost ? Tier::kHost : Tier::kDisk);
  }
  if (end == on_device) return;
  // Disk blocks start loading into host memory now, while the request queues.
  store_->Prefetch(absl::MakeConstSpan(hashes).subspan(on_device, end - on_device));
  // Host blocks go on into device blocks that hold nothing (evicting nothing), as cached blocks
  // that admission will find there.
  const std::vector<int32_t> promoted =
      RestoreRun(*s, hashes, on_device, end, /*free_only=*/true, /*speculative=*/true);
  for (auto it = promoted.rbegin(); it != promoted.rend(); ++it) blocks_.Release(*it);
}

std::vector<int32_t> Engine::RestoreRun(const Sequence& s, absl::Span<const BlockHash> hashes,
                                        int64_t from, int64_t to, bool free_only,
                                        bool speculative) {
  int64_t pinned = from;
  while (pinned < to && store_->Pin(hashes[pinned])) ++pinned;
  std::vector<int32_t> out;
  for (int64_t i = from; i < pinned; ++i) {
    std::optional<int32_t> b = blocks_.Allocate(free_only);
    if (!b.has_value()) break;
    if (!store_->Restore(hashes[i], *b, speculative).ok()) {
      blocks_.Release(*b);
      break;
    }
    blocks_.Publish(*b, hashes[i], s.cache_namespace, s.share->id);
    out.push_back(*b);
  }
  for (int64_t i = from; i < pinned; ++i) store_->Unpin(hashes[i]);
  return out;
}

bool Engine::WaitForLoads(Sequence* s, absl::Span<const BlockHash> hashes, int64_t on_device,
                          int64_t in_host_end, int64_t limit) {
  const absl::Time now = absl::Now();
  if (s->io_wait_since == absl::InfiniteFuture()) s->io_wait_since = now;
  if (now - s->io_wait_since >= config_.max_io_wait) return false;
  std::vector<int32_t> held = blocks_.AcquirePrefix(hashes, on_device, /*count_hits=*/false);
  const std::vector<int32_t> arrived =
      RestoreRun(*s, hashes, on_device, in_host_end, /*free_only=*/false, /*speculative=*/true);
  held.insert(held.end(), arrived.begin(), arrived.end());
  for (auto it = held.rbegin(); it != held.rend(); ++it) blocks_.Release(*it);
  store_->Prefetch(hashes.subspan(in_host_end, limit - in_host_end));
  return true;
}

Engine::PromptBlocks Engine::LookUpPrompt(absl::Span<const int32_t> prompt,
                                          const RequestOptions& o) const {
  PromptBlocks out;
  if (device_tier_ == nullptr || o.prompt_logprobs >= 0) return out;
  std::string revision;
  if (!o.fine_tune_id.empty()) {
    if (deltas_ == nullptr || !deltas_->Has(o.fine_tune_id)) return out;
    revision = deltas_->Revision(o.fine_tune_id);
  }
  out.cache_namespace = CacheNamespace(config_.model_name,
                                       FineTuneNamespaceId(o.fine_tune_id, revision), o.cache_salt);
  std::vector<int32_t> tokens(prompt.begin(), prompt.end());
  tokens.insert(tokens.end(), o.resume_tokens.begin(), o.resume_tokens.end());
  if (tokens.empty()) return out;
  out.hashes = PrefixBlockHashes(out.cache_namespace, tokens, config_.block_tokens);
  // The block of the last token is computed whatever is cached (its logits are needed).
  const size_t limit = (tokens.size() - 1) / static_cast<size_t>(config_.block_tokens);
  if (out.hashes.size() > limit) out.hashes.resize(limit);
  out.held = HeldPrefix(out.hashes);
  return out;
}

int64_t Engine::HeldPrefix(absl::Span<const BlockHash> hashes) const {
  // What admission takes (Admit): the device's run, the lower tiers' run after it, and the device's
  // run after that (copies stored after a prefix held in host memory, ImportKvBlocks).
  int64_t held = blocks_.MatchPrefix(hashes);
  if (store_ == nullptr) return held;
  const int64_t n = static_cast<int64_t>(hashes.size());
  while (held < n && store_->Find(hashes[static_cast<size_t>(held)]) != KvStore::Where::kNone) {
    ++held;
  }
  return held + blocks_.MatchPrefix(hashes.subspan(static_cast<size_t>(held)));
}

std::vector<Engine::KvBlockCopy> Engine::ExportKvBlocks(absl::Span<const BlockHash> hashes,
                                                        int64_t max_bytes) {
  std::vector<KvBlockCopy> out;
  if (device_tier_ == nullptr || hashes.empty()) return out;
  const int64_t block_bytes = std::max<int64_t>(1, transfer_layout_.block_bytes());
  const size_t most = static_cast<size_t>(
      std::clamp<int64_t>(max_bytes / block_bytes, 1, static_cast<int64_t>(hashes.size())));
  // Reserved, so that the payloads the device reads fill stay where they are until the Flush.
  out.reserve(most);
  std::vector<absl::Status> read(most, absl::OkStatus());
  std::vector<int32_t> held;  // the device blocks being read
  for (size_t i = 0; i < most; ++i) {
    // Block by block: a chain's blocks need not be on the device first and in host memory after
    // (a block restored from host, or computed again, sits after ones that went down).
    KvBlockCopy copy;
    copy.payload.resize(static_cast<size_t>(block_bytes));
    if (const std::optional<int32_t> on_device = blocks_.Hold(hashes[i])) {
      const int32_t b = *on_device;
      held.push_back(b);
      copy.key = blocks_.key(b);
      out.push_back(std::move(copy));
      KvBlockCopy& c = out.back();
      device_tier_->Bind(b, c.key);
      read[i] = absl::InternalError("device tier callback did not run");
      device_tier_->Read(b, c.key, c.bytes(),
                         [&read, i](absl::Status s) { read[i] = std::move(s); });
      continue;
    }
    if (store_ == nullptr) break;
    absl::StatusOr<BlockKey> key = store_->ReadHost(hashes[i], copy.bytes());
    if (!key.ok()) break;
    copy.key = *key;
    out.push_back(std::move(copy));
  }
  // The device reads' results, checked once (each read has finished when Read returns, on a GPU
  // too: the device tier waits for its copy stream per block).
  if (!held.empty()) device_tier_->Flush();
  for (size_t i = 0; i < out.size(); ++i) {
    if (read[i].ok()) continue;
    LOG(WARNING) << "engine: copying a KV block out failed: " << read[i];
    out.resize(i);
    break;
  }
  // Released in reverse, so that the chain's first blocks are evicted last.
  for (auto it = held.rbegin(); it != held.rend(); ++it) blocks_.Release(*it);
  num_exported_kv_blocks_ += static_cast<int64_t>(out.size());
  return out;
}

bool Engine::PrefetchForExport(absl::Span<const BlockHash> hashes) {
  if (store_ == nullptr || !store_->has_disk() || hashes.empty()) return false;
  store_->Prefetch(hashes);
  // A block still being written to disk (its host copy already given up, as when a burst goes
  // through a small host tier) is not loaded yet, but will be on a later call.
  return store_->Find(hashes[0]) != KvStore::Where::kNone;
}

void Engine::PollIo() {
  if (store_ != nullptr) store_->Poll();
}

int64_t Engine::ImportKvBlocks(const PromptBlocks& expected, const std::string& tenant,
                               absl::Span<const KvBlockCopy> blocks) {
  ImportLease lease;
  const int64_t stored = ImportKvBlocks(expected, tenant, blocks, &lease);
  EndImport(&lease);
  return stored;
}

int64_t Engine::ImportKvBlocks(const PromptBlocks& expected, const std::string& tenant,
                               absl::Span<const KvBlockCopy> blocks, ImportLease* lease) {
  if (device_tier_ == nullptr) return 0;
  const absl::Span<const BlockHash> hashes(expected.hashes);
  // Blocks on the device are held (so that making room evicts only other blocks, and none of the
  // prompt's leaves before the request takes it); the ones in host memory are pinned there (the
  // device blocks evicted for room go down to it).
  auto hold_if_on_device = [&](size_t at) {
    const std::optional<int32_t> b = blocks_.Hold(hashes[at]);
    if (b.has_value()) lease->held.push_back(*b);
    return b.has_value();
  };
  if (!lease->started) {
    // The copies follow the prompt's blocks held here when they were asked for: should some of
    // those have left every tier meanwhile, the copies could not be used (a prompt's cache is a
    // prefix).
    if (HeldPrefix(hashes) < expected.held) {
      LOG(WARNING) << "engine: the prompt's first " << expected.held
                   << " KV blocks are no longer all cached here; the copied blocks after them are "
                      "dropped";
      return 0;
    }
    lease->started = true;
    for (size_t at = 0; at < static_cast<size_t>(expected.held) && at < hashes.size(); ++at) {
      if (!hold_if_on_device(at) && store_ != nullptr && store_->Pin(hashes[at])) {
        lease->pinned.push_back(hashes[at]);
      }
    }
    lease->covered = expected.held;
  } else if (expected.held != lease->covered) {
    LOG(WARNING) << "engine: KV blocks copied for the prompt's block " << expected.held
                 << " follow an import that stopped at block " << lease->covered << "; dropped";
    return 0;
  }
  const int32_t owner = TenantId(tenant);
  int64_t stored = 0;
  for (size_t i = 0; i < blocks.size(); ++i) {
    const size_t at = static_cast<size_t>(expected.held) + i;
    if (at >= hashes.size()) break;
    const KvBlockCopy& copy = blocks[i];
    if (copy.key.hash != hashes[at] || copy.key.cache_namespace != expected.cache_namespace ||
        copy.payload.size() != static_cast<size_t>(transfer_layout_.block_bytes())) {
      LOG(WARNING) << "engine: a KV block copied from another worker is not the prompt's block "
                   << at << "; dropped with the rest";
      break;
    }
    if (hold_if_on_device(at)) {  // on the device already
      lease->covered = static_cast<int64_t>(at) + 1;
      continue;
    }
    std::optional<int32_t> b = blocks_.Allocate();
    if (!b.has_value()) break;
    absl::Status st = absl::InternalError("device tier callback did not run");
    device_tier_->Write(*b, copy.key, copy.bytes(), [&st](absl::Status s) { st = std::move(s); });
    device_tier_->Flush();
    if (!st.ok()) {
      LOG(WARNING) << "engine: storing a KV block copied from another worker failed: " << st;
      blocks_.Release(*b);
      break;
    }
    blocks_.Publish(*b, copy.key.hash, copy.key.cache_namespace, owner);
    lease->held.push_back(*b);
    lease->covered = static_cast<int64_t>(at) + 1;
    ++stored;
  }
  num_imported_kv_blocks_ += stored;
  return stored;
}

void Engine::EndImport(ImportLease* lease) {
  // Released in reverse, so that the chain's first blocks are evicted last.
  for (auto it = lease->held.rbegin(); it != lease->held.rend(); ++it) blocks_.Release(*it);
  for (const BlockHash h : lease->pinned) store_->Unpin(h);
  lease->held.clear();
  lease->pinned.clear();
}

void Engine::PutDown(int32_t block, BlockKey key, bool to_disk, int32_t owner) {
  device_tier_->Bind(block, key);
  store_->Put(block, key, to_disk, owner);
}

int64_t Engine::PersistKv(absl::Time deadline, const std::atomic<bool>* cancel) {
  if (store_ == nullptr || !store_->has_disk()) return 0;
  // The host tier's own blocks first, so that its slots are clean (free to evict) when the device
  // blocks come down.
  int64_t written = store_->Persist(deadline, cancel);
  // Then the device's, least recently used first, through the host tier: whenever as many have
  // come down as the host tier holds, they are written out before more come (a dirty block
  // evicted from a full host tier could otherwise be lost). A disk that fills drops its least
  // recently written blocks first, so the most recent survive.
  const int64_t batch = std::max<int64_t>(1, store_->stats().host.num_slots);
  int64_t pending = 0;
  for (const int32_t b : blocks_.CachedBlocks()) {
    if (absl::Now() >= deadline || (cancel != nullptr && cancel->load())) break;
    const BlockKey key = blocks_.key(b);
    if (store_->Find(key.hash) != KvStore::Where::kNone) continue;
    PutDown(b, key, /*to_disk=*/false, blocks_.owner(b));
    if (++pending == batch) {
      written += store_->Persist(deadline, cancel);
      pending = 0;
    }
  }
  return written + store_->Persist(deadline, cancel);
}

void Engine::KeepWarm(const Sequence& s) {
  // Tail first, so that the head is the host tier's most recently used.
  for (size_t i = s.hashes.size(); i-- > 0;) {
    const int32_t b = s.block_table[i];
    const BlockKey key = blocks_.key(b);
    if (key.hash != s.hashes[i]) continue;  // a private duplicate of a published block
    PutDown(b, key, /*to_disk=*/config_.write_through_hot_blocks, blocks_.owner(b));
  }
}

Engine::AdmitResult Engine::Admit(Sequence* s, int64_t budget, std::vector<Chunk>* plan) {
  const int64_t bt = config_.block_tokens;
  const int64_t len = static_cast<int64_t>(s->tokens.size());
  int64_t on_device = 0;
  if (config_.enable_prefix_caching && s->options.prompt_logprobs < 0) {
    WaitingHashes(*s);  // computes them if the sequence grew since
    std::vector<BlockHash> hashes = std::move(s->waiting_hashes);
    s->waiting_hashes.clear();
    // At least one token must be computed to produce logits.
    const int64_t limit = (len - 1) / bt;
    on_device = std::min<int64_t>(blocks_.MatchPrefix(hashes), limit);
    // The chain goes on in the host tier; blocks still on disk are worth waiting for.
    int64_t in_host_end = on_device;
    bool loading = false;
    if (store_ != nullptr) {
      for (; in_host_end < limit; ++in_host_end) {
        const KvStore::Where where = store_->Find(hashes[in_host_end]);
        if (where == KvStore::Where::kHost) continue;
        loading = where == KvStore::Where::kDisk || where == KvStore::Where::kLoading;
        break;
      }
    }
    if (loading && WaitForLoads(s, hashes, on_device, in_host_end, limit)) {
      s->waiting_hashes = std::move(hashes);
      return AdmitResult::kWaitingForIo;
    }
    s->io_wait_since = absl::InfiniteFuture();  // a later disk wait gets its whole time
    // The chain goes on in blocks that a sequence planned in this step is computing: they will be
    // published at the end of the step (a prefill chunk shorter than the budget is its prompt's
    // last), so wait one step for them rather than compute them twice, when they are worth it.
    int64_t inflight_end = in_host_end;
    while (!loading && inflight_end < limit && inflight_.contains(hashes[inflight_end])) {
      ++inflight_end;
    }
    if (inflight_end > in_host_end &&
        ((inflight_end - in_host_end) * bt >= config_.inflight_prefill_min_tokens ||
         inflight_end == limit)) {
      if (!s->waited_for_prefix) {
        s->waited_for_prefix = true;
        s->cached_before_wait = in_host_end;
        ++num_inflight_prefix_waits_;
      }
      s->waiting_hashes = std::move(hashes);
      return AdmitResult::kWaitingForPrefix;
    }
    s->block_table = blocks_.AcquirePrefix(hashes, on_device);
    if (store_ != nullptr && config_.write_through_hot_blocks) {
      for (int32_t b : s->block_table) {
        if (blocks_.hit_count(b) == 2) {
          PutDown(b, blocks_.key(b), /*to_disk=*/true, blocks_.owner(b));
        }
      }
    }
    if (store_ != nullptr) {
      // Device blocks may go on after the host run (blocks copied from another worker after a
      // prefix held here in host memory, ImportKvBlocks): they are held while the host blocks are
      // restored, and taken when those are all restored.
      std::vector<int32_t> after;
      if (in_host_end > on_device && in_host_end < limit) {
        const absl::Span<const BlockHash> rest = absl::MakeConstSpan(hashes).subspan(in_host_end);
        after = blocks_.AcquirePrefix(
            rest, std::min<int64_t>(blocks_.MatchPrefix(rest), limit - in_host_end));
      }
      const std::vector<int32_t> restored = RestoreRun(*s, hashes, on_device, in_host_end,
                                                       /*free_only=*/false, /*speculative=*/false);
      s->block_table.insert(s->block_table.end(), restored.begin(), restored.end());
      if (static_cast<int64_t>(restored.size()) == in_host_end - on_device) {
        s->block_table.insert(s->block_table.end(), after.begin(), after.end());
      } else {
        for (auto it = after.rbegin(); it != after.rend(); ++it) blocks_.Release(*it);
      }
    }
    const int64_t cached = static_cast<int64_t>(s->block_table.size());
    s->hashes.assign(hashes.begin(), hashes.begin() + cached);
    s->num_computed = cached * bt;
    // The whole chain while it is computed, for sequences that may wait for its blocks.
    if (config_.inflight_prefill_min_tokens > 0) s->planned_hashes = std::move(hashes);
  }
  const int64_t n = std::min(len - s->num_computed, budget);
  if (!EnsureBlocks(s, s->num_computed + n)) {
    ReleaseBlocks(s);
    return AdmitResult::kNoRoom;
  }
  // What waiting for a prefix in flight saved: counted on the admission after the wait, not again.
  if (s->waited_for_prefix && !s->prefix_wait_counted) {
    s->prefix_wait_counted = true;
    num_inflight_prefix_tokens_ +=
        std::max<int64_t>(0, std::min(s->num_computed, s->prompt_len) - s->cached_before_wait * bt);
  }
  // Usage by tier (on the first admission only: a preempted sequence recomputes its own blocks)
  // and prefetch coverage.
  const int64_t cached_blocks = static_cast<int64_t>(s->hashes.size());
  if (s->num_generated == static_cast<int64_t>(s->options.resume_tokens.size())) {
    s->num_cached_prompt = std::min(s->num_computed, s->prompt_len);
    s->num_cached_by_tier = {};
    for (int64_t i = 0; i < cached_blocks; ++i) {
      const Tier t =
          i < static_cast<int64_t>(s->arrival_tiers.size()) ? s->arrival_tiers[i] : Tier::kDevice;
      const int64_t tokens = std::min(bt, std::max<int64_t>(0, s->prompt_len - i * bt));
      s->num_cached_by_tier[static_cast<int>(t)] += tokens;
    }
  }
  if (store_ != nullptr) {
    for (int64_t i = 0; i < cached_blocks && i < static_cast<int64_t>(s->arrival_tiers.size());
         ++i) {
      if (s->arrival_tiers[i] != Tier::kDevice) {
        store_->RecordLowerTierHit(s->hashes[i], /*covered=*/i < on_device);
      }
    }
    s->arrival_tiers.clear();  // counted once
  }
  plan->push_back({s, s->num_computed, n});
  return AdmitResult::kAdmitted;
}

int64_t Engine::DraftLimit(const Sequence& s, int64_t limit) const {
  const int64_t len = static_cast<int64_t>(s.tokens.size());
  // The blocks the last token needs are the sequence's already (the step is planned); the draft's
  // K/V goes in the rest of them and in free blocks only, never a cached one (Step gives them
  // back after it).
  const int64_t bt = config_.block_tokens;
  const int64_t room = static_cast<int64_t>(s.block_table.size()) * bt - (s.num_computed + 1) +
                       blocks_.num_free() * bt;
  // All of the draft kept and one token drawn after it must fit in max_tokens and the context.
  return std::min<int64_t>(
      {limit, s.draft_limit >= 0 ? s.draft_limit : config_.num_speculative_tokens,
       s.options.max_tokens - s.num_generated - 1, MaxContextTokens() - 1 - len, room});
}

void Engine::ProposeDraft(int64_t limit, Chunk* ch, const std::vector<int32_t>* proposed) {
  Sequence* s = ch->seq;
  limit = DraftLimit(*s, limit);
  if (limit <= 0) return;
  // Under a grammar, the text it forces (a JSON key, the punctuation around it) comes first;
  // else the draft model's proposal, or what followed the sequence's last tokens earlier on. (With
  // a draft model, `proposed` is already the forced text where there is any.)
  std::vector<int32_t> draft;
  if (s->matcher.has_value() && proposed == nullptr) {
    ForcedDraft(*s->matcher, *config_.vocabulary, config_.tokenize, limit, &draft);
  }
  if (draft.empty() && proposed != nullptr) {
    draft.assign(proposed->begin(), proposed->begin() + std::min<int64_t>(limit, proposed->size()));
  }
  if (draft.empty() && (proposed != nullptr ||
                        s->ngram_index.Draft(s->tokens, config_.prompt_lookup_min,
                                             config_.prompt_lookup_max, limit, &draft) == 0)) {
    return;
  }
  // An end (EOS, a stop token) is never a draft token: the row before it draws it or not. Nor is a
  // token the grammar does not allow there (or a special token, which has no text for it), which
  // the row before could not draw.
  std::vector<GrammarMatcher> matchers;
  size_t keep = 0;
  for (; keep < draft.size(); ++keep) {
    const int32_t t = draft[keep];
    if (EndOf(*s, t) != FinishReason::kNone) break;
    if (s->matcher.has_value()) {
      const absl::string_view text = TokenText(*config_.vocabulary, t);
      GrammarMatcher m = matchers.empty() ? *s->matcher : matchers.back();
      if (text.empty() || !m.Advance(text)) break;
      matchers.push_back(std::move(m));
    }
  }
  if (keep == 0) return;
  draft.resize(keep);
  if (s->matcher.has_value()) matchers.erase(matchers.begin() + keep, matchers.end());
  if (!EnsureBlocks(s, s->num_computed + 1 + static_cast<int64_t>(keep), /*free_only=*/true)) {
    return;  // (cannot happen: keep fits the free blocks)
  }
  const SamplingOptions& o = s->options.sampling;
  if (o.repetition_penalty != 1.0f || o.presence_penalty != 0.0f || o.frequency_penalty != 0.0f) {
    for (int32_t t : draft) {
      ch->draft_penalties.push_back(ch->draft_penalties.empty() ? s->penalties
                                                                : ch->draft_penalties.back());
      ch->draft_penalties.back().AddOutput(t);
    }
  }
  num_draft_tokens_ += static_cast<int64_t>(keep);
  ch->count = 1 + static_cast<int64_t>(keep);
  ch->draft = std::move(draft);
  ch->draft_matchers = std::move(matchers);
}

void Engine::AddInflight(const Sequence& s) {
  for (size_t i = s.hashes.size(); i < s.planned_hashes.size(); ++i) {
    inflight_.insert(s.planned_hashes[i]);
  }
}

void Engine::PublishFullBlocks(Sequence* s) {
  if (!config_.enable_prefix_caching) return;
  const int64_t bt = config_.block_tokens;
  const absl::Span<const int32_t> tokens(s->tokens);
  while (static_cast<int64_t>(s->hashes.size() + 1) * bt <= s->num_computed) {
    const int64_t i = static_cast<int64_t>(s->hashes.size());
    const BlockHash parent = i == 0 ? kRootBlockHash : s->hashes.back();
    const BlockHash h = ChainBlockHash(parent, s->cache_namespace, tokens.subspan(i * bt, bt));
    blocks_.Publish(s->block_table[i], h, s->cache_namespace, s->share->id);
    s->hashes.push_back(h);
  }
  if (s->hashes.size() >= s->planned_hashes.size()) s->planned_hashes.clear();
}

void Engine::AppendBanned(const Sequence& s, int64_t num_generated,
                          std::vector<int32_t>* out) const {
  if (num_generated >= s.options.min_tokens) return;
  const std::vector<int32_t>& eos = weights_->config.eos_token_ids;
  out->insert(out->end(), eos.begin(), eos.end());
  out->insert(out->end(), s.options.stop_token_ids.begin(), s.options.stop_token_ids.end());
}

absl::Status Engine::ComputeMask(const GrammarMatcher& matcher,
                                 std::vector<uint8_t>* allowed) const {
  if (matcher.Overloaded()) {
    return absl::InvalidArgumentError(
        "the structured output is too ambiguous to follow here (more than 256 readings at once)");
  }
  allowed->resize(masker_->vocabulary().vocab_size());
  const absl::Time start = absl::Now();
  masker_->Allowed(matcher, absl::MakeSpan(*allowed));
  grammar_mask_ns_.fetch_add(absl::ToInt64Nanoseconds(absl::Now() - start),
                             std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::Status Engine::ApplyMask(const Sequence& s, const GrammarMatcher& matcher,
                               int64_t num_generated, absl::Span<const uint8_t> allowed,
                               absl::Span<float> row, std::vector<int32_t>* banned) const {
  const int32_t V = static_cast<int32_t>(row.size());
  // The ends (EOS unless ignore_eos, and stop tokens) keep their logits where the text is
  // complete; they have no bytes, so the grammar never allows them itself.
  std::vector<std::pair<int32_t, float>> ends;
  if (matcher.IsComplete()) {
    if (!s.options.ignore_eos) {
      for (int32_t t : weights_->config.eos_token_ids) {
        if (t >= 0 && t < V) ends.emplace_back(t, row[t]);
      }
    }
    for (int32_t t : s.options.stop_token_ids) {
      if (t >= 0 && t < V) ends.emplace_back(t, row[t]);
    }
  }
  const int32_t masked = std::min<int32_t>(V, static_cast<int32_t>(allowed.size()));
  int64_t text_tokens = 0;  // allowed tokens of the row, ends aside
  for (int32_t t = 0; t < masked; ++t) {
    if (allowed[t]) {
      ++text_tokens;
    } else {
      row[t] = -std::numeric_limits<float>::infinity();
    }
  }
  for (int32_t t = masked; t < V; ++t) row[t] = -std::numeric_limits<float>::infinity();
  for (const auto& [t, v] : ends) row[t] = v;
  // min_tokens holds the ends back only while some text may come instead (a stop token that is
  // an ordinary token of the text counts as an end here).
  std::vector<int32_t> held;
  AppendBanned(s, num_generated, &held);
  std::sort(held.begin(), held.end());
  held.erase(std::unique(held.begin(), held.end()), held.end());
  int64_t left = text_tokens;
  for (int32_t t : held) {
    if (t >= 0 && t < masked && allowed[t]) --left;
  }
  if (left > 0) {
    banned->insert(banned->end(), held.begin(), held.end());
  } else if (text_tokens == 0 && ends.empty()) {
    return absl::InvalidArgumentError(
        "no token of the vocabulary continues the structured output here");
  }
  return absl::OkStatus();
}

FinishReason Engine::EndOf(const Sequence& s, int32_t token) const {
  if (!s.options.ignore_eos && Contains(weights_->config.eos_token_ids, token)) {
    return FinishReason::kEos;
  }
  if (Contains(s.options.stop_token_ids, token)) return FinishReason::kStopToken;
  return FinishReason::kNone;
}

FinishReason Engine::CheckStop(const Sequence& s, int32_t token) const {
  if (const FinishReason end = EndOf(s, token); end != FinishReason::kNone) return end;
  if (s.num_generated >= s.options.max_tokens) return FinishReason::kLength;
  // (A longer sequence could not run: see CacheTokens.)
  if (static_cast<int64_t>(s.tokens.size()) >= MaxContextTokens()) {
    return FinishReason::kContextLength;
  }
  return FinishReason::kNone;
}

absl::StatusOr<std::vector<RequestOutput>> Engine::Step() {
  std::vector<RequestOutput> outputs;
  waiting_for_io_ = false;
  if (store_ != nullptr) store_->Poll();
  for (auto& s : cancelled_) {
    if (draft_ != nullptr) draft_->Forget(static_cast<uint64_t>(s->arrival));
    RequestOutput out;
    out.request_id = s->id;
    out.finish = FinishReason::kCancelled;
    out.num_prompt_tokens = s->prompt_len;
    out.num_cached_prompt_tokens = s->num_cached_prompt;
    out.num_cached_prompt_tokens_by_tier = s->num_cached_by_tier;
    out.num_generated_tokens = s->num_generated;
    outputs.push_back(std::move(out));
  }
  cancelled_.clear();

  // Plan: running sequences first (in admission order), then admissions.
  std::vector<Chunk> plan;
  int64_t budget = config_.max_batch_tokens;
  // Speculative decoding, while few sequences decode.
  bool speculate = config_.num_speculative_tokens > 0;
  if (speculate) {
    int64_t decoding = 0;
    for (const auto& s : running_) {
      if (static_cast<int64_t>(s->tokens.size()) - s->num_computed == 1) ++decoding;
    }
    speculate = decoding <= config_.speculative_max_batch;
  }
  for (size_t i = 0; i < running_.size() && budget > 0;) {
    Sequence* s = running_[i].get();
    const int64_t n =
        std::min<int64_t>(static_cast<int64_t>(s->tokens.size()) - s->num_computed, budget);
    bool preempted_self = false;
    while (!EnsureBlocks(s, s->num_computed + n)) {
      // Only sequences not yet planned this step (index >= i) may be preempted; among them the
      // lowest priority, then (fair sharing) the most served tenant's, most recently admitted.
      Sequence* victim = running_.back().get();
      for (size_t j = running_.size(); j-- > i;) {
        const Sequence* r = running_[j].get();
        if (r->options.priority < victim->options.priority ||
            (config_.fair_share && r->options.priority == victim->options.priority &&
             r->share->service > victim->share->service)) {
          victim = running_[j].get();
        }
      }
      Preempt(victim);
      if (victim == s) {
        preempted_self = true;
        break;
      }
    }
    if (preempted_self) break;
    plan.emplace_back(s, s->num_computed, n);
    Charge(*s, n, 0);
    budget -= n;
    ++i;
  }
  // Admissions in queue order; a sequence waiting for disk loads or for a prefix in flight lets
  // the ones behind it go first.
  inflight_.clear();
  const bool dedupe = config_.enable_prefix_caching && config_.inflight_prefill_min_tokens > 0;
  if (dedupe) {
    for (const Chunk& ch : plan) AddInflight(*ch.seq);
  }
  bool io_wait = false;
  const auto room = [&] {
    return budget > 0 && static_cast<int64_t>(running_.size()) < config_.max_running_sequences;
  };
  // Tries to admit waiting `w`: kNoRoom ends admissions; kTaken: admitted (or failed) and out of
  // the queue; kLeft: it waits on (for its fine-tune or KV blocks loading, or a prefix in flight),
  // and the ones behind it go first.
  enum class Tried { kNoRoom, kTaken, kLeft };
  const auto try_admit = [&](Sequence* w) {
    if (!w->options.fine_tune_id.empty() && w->delta == nullptr) {
      absl::StatusOr<const DeltaWeights*> d =
          deltas_->Acquire(w->options.fine_tune_id, &w->fine_tune_revision);
      if (!d.ok()) {
        // The delta could not be loaded, or the fine-tune was replaced or removed while the
        // request waited: the request fails (ABORTED: the coordinator may retry it, on another
        // worker or, replaced, here).
        RequestOutput out;
        out.request_id = w->id;
        out.finish = FinishReason::kError;
        out.error = d.status();
        if (!deltas_->Has(w->options.fine_tune_id)) {
          out.error = absl::AbortedError(absl::StrCat("fine-tune ", w->options.fine_tune_id,
                                                      " was removed from this worker while the "
                                                      "request waited"));
        }
        out.num_prompt_tokens = w->prompt_len;
        out.num_generated_tokens = w->num_generated;
        outputs.push_back(std::move(out));
        if (draft_ != nullptr) draft_->Forget(static_cast<uint64_t>(w->arrival));
        ReleaseBlocks(w);
        Dequeue(*w);  // (destroyed)
        return Tried::kTaken;
      }
      if (*d == nullptr) {  // still loading: the ones behind it go first
        io_wait = true;
        return Tried::kLeft;
      }
      w->delta = *d;
    }
    const AdmitResult r = Admit(w, budget, &plan);
    // A sequence holds its delta only while it runs: one that waits here must not keep another
    // fine-tune's load from getting room.
    if (r != AdmitResult::kAdmitted) {
      PauseDelta(w);
      RefreshPendingPrefill(w);  // what it found cached now
    }
    if (r == AdmitResult::kNoRoom) {
      return Tried::kNoRoom;
    }
    if (r == AdmitResult::kWaitingForIo || r == AdmitResult::kWaitingForPrefix) {
      io_wait = io_wait || r == AdmitResult::kWaitingForIo;
      return Tried::kLeft;
    }
    if (dedupe) AddInflight(*w);
    budget -= plan.back().count;
    Charge(*w, plan.back().count, 0);
    if (w->queued_at.has_value()) {
      const double wait = absl::ToDoubleSeconds(absl::Now() - *w->queued_at);
      // (Bounded: the worker drains it every step.)
      if (queue_waits_.size() < 65536) queue_waits_.push_back(wait);
      ++w->share->admissions;
      w->share->queue_wait_seconds += wait;
      w->queued_at.reset();
    }
    running_.push_back(Dequeue(*w));
    return Tried::kTaken;
  };
  // waiting_ is in priority order. With one tenant at work (or fair sharing off), that order is
  // the admission order: walked until admissions end. Otherwise, within one priority, each
  // tenant's sequences form a queue (a run of waiting_by_tenant_) and the next candidate heads
  // the least served tenant's: a heap of the queues' heads, built from the runs (a step costs
  // O(log waiting) a tenant at the top priority, and O(log tenants) a candidate).
  if (!config_.fair_share || live_by_service_.size() <= 1) {
    for (auto it = waiting_.begin(); it != waiting_.end() && room();) {
      const WaitKey key = it->first;
      if (try_admit(it->second.get()) == Tried::kNoRoom) break;
      it = waiting_.upper_bound(key);  // (the call may have taken it out)
    }
  } else {
    // tenant_heads_ orders each priority's tenants' queues by their heads (least served, then
    // oldest), kept as sequences come and go and services change. A head that is left waiting
    // (for its fine-tune, its KV blocks, a prefix in flight) lets the rest of its tenant's queue
    // go first: this step takes that queue's candidates from `later` instead, a heap of the same
    // order. A candidate admitted from tenant_heads_ moves its tenant's entry to a later place
    // (its service grows and its next sequence is younger), so the walk goes on from the place
    // it took (`at`).
    using Later = std::tuple<double, int64_t, TenantShare*>;  // service, order, tenant
    std::vector<Later> later;
    absl::flat_hash_set<const TenantShare*> passed;  // their heads are left waiting this step
    const auto queue_after = [&](TenantShare* t, int32_t priority, int64_t order) {
      auto next = waiting_by_tenant_.upper_bound({priority, t, order});
      if (next != waiting_by_tenant_.end() && next->priority == priority && next->share == t) {
        later.emplace_back(t->service, next->order, t);
        std::push_heap(later.begin(), later.end(), std::greater<Later>());
      }
    };
    bool no_room = false;
    for (auto level = waiting_.begin(); level != waiting_.end() && !no_room && room();) {
      const int32_t priority = level->first.priority;
      later.clear();
      passed.clear();
      TenantHead at{priority, -std::numeric_limits<double>::infinity(),
                    std::numeric_limits<int64_t>::min(), nullptr};
      while (room()) {
        auto head = tenant_heads_.lower_bound(at);
        while (head != tenant_heads_.end() && head->priority == priority &&
               passed.contains(head->share)) {
          ++head;
        }
        const bool have_head = head != tenant_heads_.end() && head->priority == priority;
        if (!have_head && later.empty()) break;
        const bool from_head =
            have_head && (later.empty() || std::make_pair(head->service, head->order) <
                                               std::make_pair(std::get<0>(later.front()),
                                                              std::get<1>(later.front())));
        TenantShare* t;
        int64_t order;
        if (from_head) {
          at = *head;
          t = head->share;
          order = head->order;
        } else {
          std::pop_heap(later.begin(), later.end(), std::greater<Later>());
          t = std::get<2>(later.back());
          order = std::get<1>(later.back());
          later.pop_back();
        }
        const Tried tried = try_admit(waiting_.find({priority, order})->second.get());
        if (tried == Tried::kNoRoom) {
          no_room = true;
          break;
        }
        if (tried == Tried::kLeft) {
          if (from_head) passed.insert(t);
          queue_after(t, priority, order);
        } else if (!from_head) {
          queue_after(t, priority, order);  // (its head, still waiting, is passed)
        }
      }
      level = waiting_.upper_bound({priority, std::numeric_limits<int64_t>::max()});
    }
  }
  // The pending prefill of waiting sequences admission did not try (those behind one that found
  // no room) would go stale as the cache changes: a few more are estimated again each step, in
  // turn.
  if (config_.enable_prefix_caching && !waiting_.empty()) {
    auto it = waiting_.upper_bound(refresh_after_);
    for (size_t n = std::min<size_t>(kRefreshPerStep, waiting_.size()); n > 0; --n, ++it) {
      if (it == waiting_.end()) it = waiting_.begin();
      RefreshPendingPrefill(it->second.get());
      refresh_after_ = it->first;
    }
  }
  // Drafts last, from what the plan leaves: its token budget and free blocks (so a draft never
  // preempts a sequence, keeps one out, or evicts a cached block). On the CPU a step of up to
  // kMatMulCpuGemvMaxRows tokens stays one (more rows go to the BLAS, which costs several times a
  // GEMV step and sums in another order); on the GPU, no more rows than its sampler takes. The
  // room is shared out evenly, what one sequence leaves going to the next.
  if (speculate && budget > 0 && !plan.empty()) {
    std::vector<Chunk*> drafting;
    const int64_t planned = config_.max_batch_tokens - budget;
    for (Chunk& ch : plan) {
      if (ch.count == 1 && ch.start == static_cast<int64_t>(ch.seq->tokens.size()) - 1) {
        drafting.push_back(&ch);
      }
    }
    int64_t room = budget;
    if (gpu_ != nullptr) {
      room = std::min<int64_t>(room, GpuSampledRows() - static_cast<int64_t>(plan.size()));
    } else if (planned <= kMatMulCpuGemvMaxRows) {
      room = std::min<int64_t>(room, kMatMulCpuGemvMaxRows - planned);
    }
    // A draft model proposes for every drafting sequence in one batch, each its share of the
    // room (as if all of it were taken; a proposal cut short leaves its rest unused).
    std::vector<std::vector<int32_t>> proposals;
    if (draft_ != nullptr && room > 0) {
      proposals.resize(drafting.size());
      std::vector<DraftModel::Request> requests;
      for (size_t i = 0, r = static_cast<size_t>(room); i < drafting.size() && r > 0; ++i) {
        const Sequence& s = *drafting[i]->seq;
        const size_t left = drafting.size() - i;
        const int64_t limit = DraftLimit(s, static_cast<int64_t>((r + left - 1) / left));
        if (limit <= 0) continue;
        r -= static_cast<size_t>(limit);
        // Under a grammar, the text it forces comes first (ProposeDraft takes it from here).
        if (s.matcher.has_value()) {
          ForcedDraft(*s.matcher, *config_.vocabulary, config_.tokenize, limit, &proposals[i]);
          if (!proposals[i].empty()) continue;
        }
        requests.push_back(
            {static_cast<uint64_t>(s.arrival), s.tokens, limit, &proposals[i], s.cache_namespace});
      }
      if (absl::Status st = draft_->Propose(requests); !st.ok()) {
        if (absl::Now() - draft_error_logged_ > absl::Minutes(1)) {
          draft_error_logged_ = absl::Now();
          LOG(WARNING) << "draft model: " << st << " (the step drafts nothing)";
        }
        for (auto& p : proposals) p.clear();
      }
    }
    for (size_t i = 0; i < drafting.size() && room > 0; ++i) {
      const int64_t left = static_cast<int64_t>(drafting.size() - i);
      ProposeDraft((room + left - 1) / left, drafting[i],
                   proposals.empty() ? nullptr : &proposals[i]);
      Charge(*drafting[i]->seq, drafting[i]->count - 1, 0);
      room -= drafting[i]->count - 1;
      budget -= drafting[i]->count - 1;
    }
  }
  if (plan.empty()) {
    waiting_for_io_ = io_wait;
    if (!io_wait && !waiting_.empty() && running_.empty()) {
      // Not even one sequence fits, though each does alone (AddRequest refuses prompts as long as
      // the cache, CheckStop ends sequences there): blocks held outside any sequence (a KV
      // fetch's import leases) keep it out. It waits for them, the caller sleeping as for I/O.
      waiting_for_io_ = true;
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
    // For a row that samples: how many draft tokens come before the token it draws.
    int32_t draft;
  };
  std::vector<LogitUse> uses;
  for (size_t ci = 0; ci < plan.size(); ++ci) {
    const Chunk& ch = plan[ci];
    Sequence* s = ch.seq;
    std::copy(s->block_table.begin(), s->block_table.end(), tables.begin() + ci * max_blocks);
    const int64_t end = ch.start + ch.count;
    const int64_t len = static_cast<int64_t>(s->tokens.size());
    const bool wants_prompt_lp = s->options.prompt_logprobs >= 0 && !s->prompt_logprobs_sent;
    for (int64_t p = ch.start; p < end; ++p) {
      // The last token's row draws the next token, and so does each draft token's.
      const bool samples = p >= len - 1;
      if (samples || (wants_prompt_lp && p + 1 < s->prompt_len)) {
        logit_tokens.push_back(static_cast<int32_t>(tokens.size()));
        uses.push_back({ci, p, samples ? static_cast<int32_t>(p - (len - 1)) : 0});
      }
      tokens.push_back(p < len ? s->tokens[p] : ch.draft[p - len]);
      positions.push_back(static_cast<int32_t>(p));
      token_seq.push_back(static_cast<int32_t>(ci));
      slots.push_back(int64_t{s->block_table[p / bt]} * bt + p % bt);
    }
  }
  const int64_t V = weights_->config.vocab_size;
  ForwardBatch batch;
  batch.tokens = tokens;
  batch.positions = positions;
  batch.token_seq = token_seq;
  batch.slots = slots;
  batch.block_tables = tables;
  batch.num_seqs = static_cast<int64_t>(plan.size());
  batch.max_blocks_per_seq = max_blocks;
  batch.logit_tokens = logit_tokens;
  // Only a step with a fine-tune in it carries seq_deltas: the runners' base-only paths (the GPU's
  // decode graphs among them) take the others.
  std::vector<const DeltaWeights*> seq_deltas;
  if (std::any_of(plan.begin(), plan.end(),
                  [](const Chunk& ch) { return ch.seq->delta != nullptr; })) {
    for (const Chunk& ch : plan) seq_deltas.push_back(ch.seq->delta);
    batch.seq_deltas = seq_deltas;
  }
  // The state each sampled row draws in: its sequence's, or with the draft tokens before it taken.
  auto row_generated = [&](size_t u) {
    return plan[uses[u].chunk].seq->num_generated + uses[u].draft;
  };
  auto row_penalties = [&](size_t u) -> const PenaltyState& {
    const Chunk& ch = plan[uses[u].chunk];
    return uses[u].draft == 0 || ch.draft_penalties.empty() ? ch.seq->penalties
                                                            : ch.draft_penalties[uses[u].draft - 1];
  };
  auto row_matcher = [&](size_t u) -> const GrammarMatcher& {
    const Chunk& ch = plan[uses[u].chunk];
    return uses[u].draft == 0 ? *ch.seq->matcher : ch.draft_matchers[uses[u].draft - 1];
  };
  // On the GPU, when every logit row is a token to sample, sampling runs there too. The logits
  // of rows that report log-probabilities come to the host and are sampled there (the same draw);
  // the others never leave the GPU. The GPU sampler takes up to max_running_sequences rows
  // (GpuRunnerOptions::max_seqs): a step with more (drafts' rows) samples on the host. Prompt
  // log-probabilities send the whole step to the host.
  bool sampled_on_gpu =
      gpu_ != nullptr && !uses.empty() && static_cast<int64_t>(uses.size()) <= GpuSampledRows();
  for (size_t u = 0; sampled_on_gpu && u < uses.size(); ++u) {
    const Sequence* s = plan[uses[u].chunk].seq;
    sampled_on_gpu = uses[u].position + 1 >= s->prompt_len &&
                     (s->options.prompt_logprobs < 0 || s->prompt_logprobs_sent);
  }
  // Per logit row, its row in logits_ when it is sampled on the host (-1: on the GPU).
  std::vector<int32_t> host_row(uses.size(), -1);
  std::vector<int32_t> host_rows;
  if (sampled_on_gpu) {
    for (size_t u = 0; u < uses.size(); ++u) {
      // Log-probabilities, and logit biases and grammars (which the GPU sampler does not take),
      // on the host.
      const Sequence* s = plan[uses[u].chunk].seq;
      const SamplingOptions& so = s->options.sampling;
      if (so.logprobs >= 0 || !so.logit_bias.empty() || s->matcher.has_value()) {
        host_row[u] = static_cast<int32_t>(host_rows.size());
        host_rows.push_back(static_cast<int32_t>(u));
      }
    }
    // Every row on the host: no GPU sampling to do.
    if (host_rows.size() == uses.size()) sampled_on_gpu = false;
  }
  if (!sampled_on_gpu) {
    std::iota(host_row.begin(), host_row.end(), 0);
  }
  // Constrained rows' token masks depend only on their matchers, which this step does not move: on
  // the GPU engine they are worked out on the host threads while the GPU runs the step. (The CPU
  // engine's threads run the model; it masks after.)
  // (Sized only in a step with such rows: most steps have none.)
  std::vector<size_t> constrained;
  for (size_t u = 0; masker_ != nullptr && u < uses.size(); ++u) {
    const Sequence* s = plan[uses[u].chunk].seq;
    if (s->matcher.has_value() && uses[u].position + 1 >= s->prompt_len) constrained.push_back(u);
  }
  const size_t row_slots = constrained.empty() ? 0 : uses.size();
  std::vector<std::vector<uint8_t>> masks(row_slots);
  std::vector<absl::Status> mask_errors(row_slots);
  std::vector<char> mask_ready(row_slots, 0);
  std::thread mask_thread;
  if (gpu_ != nullptr && !constrained.empty()) {
    for (size_t u : constrained) mask_ready[u] = 1;
    // `constrained` is not touched again until the thread is joined.
    mask_thread = std::thread([&] {
      auto work = [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const size_t u = constrained[i];
          mask_errors[u] = ComputeMask(row_matcher(u), &masks[u]);
        }
      };
      const int64_t n = static_cast<int64_t>(constrained.size());
      if (host_pool_ != nullptr && n > 1) {
        host_pool_->ParallelFor(n, 1, work);
      } else {
        work(0, n);
      }
    });
  }
  // Joined before the step goes on past the model, or returns early.
  struct JoinOnExit {
    std::thread* t;
    ~JoinOnExit() {
      if (t->joinable()) t->join();
    }
  } join_masks{&mask_thread};
  std::vector<int32_t> gpu_tokens;
  std::vector<float> gpu_logprobs;
  if (sampled_on_gpu) {
    std::vector<gpu::SampleRow> rows;
    std::vector<int32_t> pen_offsets = {0}, pen_tokens, pen_counts, ban_offsets = {0}, ban_tokens;
    for (size_t u = 0; u < uses.size(); ++u) {
      const Sequence* s = plan[uses[u].chunk].seq;
      const SamplingOptions& o = s->options.sampling;
      rows.push_back(SampleRowOf(o, row_generated(u)));
      // The lists PenaltyState keeps current: every token seen with its output count (repetition),
      // or only the output's tokens (presence and frequency).
      const PenaltyState& ps = row_penalties(u);
      const bool repetition = o.repetition_penalty != 1.0f;
      if (repetition || o.presence_penalty != 0.0f || o.frequency_penalty != 0.0f) {
        const std::vector<int32_t>& t = repetition ? ps.seen_tokens() : ps.output_tokens();
        const std::vector<int32_t>& c = repetition ? ps.seen_counts() : ps.output_token_counts();
        pen_tokens.insert(pen_tokens.end(), t.begin(), t.end());
        pen_counts.insert(pen_counts.end(), c.begin(), c.end());
      }
      pen_offsets.push_back(static_cast<int32_t>(pen_tokens.size()));
      AppendBanned(*s, row_generated(u), &ban_tokens);
      ban_offsets.push_back(static_cast<int32_t>(ban_tokens.size()));
    }
    gpu_tokens.resize(uses.size());
    gpu_logprobs.resize(uses.size());
    GpuModelRunner::Sampling sampling;
    sampling.rows = rows;
    sampling.pen_offsets = pen_offsets;
    sampling.pen_tokens = pen_tokens;
    sampling.pen_counts = pen_counts;
    sampling.ban_offsets = ban_offsets;
    sampling.ban_tokens = ban_tokens;
    logits_.resize(host_rows.size() * V);
    sampling.host_rows = host_rows;
    sampling.host_logits = absl::MakeSpan(logits_);
    RETURN_IF_ERROR(gpu_->ForwardSample(batch, sampling, absl::MakeSpan(gpu_tokens),
                                        absl::MakeSpan(gpu_logprobs)));
  } else if (gpu_ != nullptr) {
    logits_.resize(logit_tokens.size() * V);
    RETURN_IF_ERROR(gpu_->Forward(batch, absl::MakeSpan(logits_)));
  } else {
    logits_.resize(logit_tokens.size() * V);
    RETURN_IF_ERROR(runner_->Forward(batch, caches_[0], absl::MakeSpan(logits_)));
  }

  if (mask_thread.joinable()) mask_thread.join();
  // A draft's tokens count as computed once kept (below).
  for (const Chunk& ch : plan) {
    ch.seq->num_computed += ch.count - static_cast<int64_t>(ch.draft.size());
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
  // The host's work on the rows first, across its threads: prompt log-probabilities (a long prompt
  // scored for an evaluation brings one row per token) and the tokens sampled here. Each row is
  // independent: a pure function of its logits and its row's state (a draft's rows have theirs
  // in the chunk); the sequences' states change only in the in-order pass below.
  std::vector<size_t> host_uses;
  for (size_t u = 0; u < uses.size(); ++u) {
    if (host_row[u] >= 0) host_uses.push_back(u);
  }
  std::vector<SampledToken> host_result(uses.size());
  std::vector<absl::Status> host_error(row_slots);  // for constrained rows
  auto host_work = [&](int64_t begin, int64_t end) {
    thread_local std::vector<std::pair<float, int32_t>> scratch;  // kept across steps
    for (int64_t i = begin; i < end; ++i) {
      const size_t u = host_uses[i];
      const Sequence* s = plan[uses[u].chunk].seq;
      const int64_t p = uses[u].position;
      const absl::Span<float> row(logits_.data() + host_row[u] * V, V);
      if (p + 1 < s->prompt_len) {
        host_result[u] = LogprobsOf(row, s->tokens[p + 1], s->options.prompt_logprobs);
        continue;
      }
      std::vector<int32_t> banned;
      if (s->matcher.has_value()) {
        thread_local std::vector<uint8_t> local;
        absl::Status st = mask_ready[u] ? mask_errors[u] : ComputeMask(row_matcher(u), &local);
        if (st.ok()) {
          st = ApplyMask(*s, row_matcher(u), row_generated(u), mask_ready[u] ? masks[u] : local,
                         row, &banned);
        }
        if (!st.ok()) {
          host_result[u].token = -1;  // the request fails below
          host_error[u] = std::move(st);
          continue;
        }
      } else {
        AppendBanned(*s, row_generated(u), &banned);
      }
      host_result[u] =
          Sample(row, s->options.sampling, row_penalties(u), row_generated(u), banned, &scratch);
    }
  };
  const int64_t num_host = static_cast<int64_t>(host_uses.size());
  if (ThreadPool* pool = HostPool(); pool != nullptr && num_host > 1) {
    pool->ParallelFor(num_host, 1, host_work);
  } else {
    host_work(0, num_host);
  }
  // A draft's rows in order: each token drawn is the sequence's next; the rows go on while it is
  // the draft's token there (which was then computed right). Rows past where the draft went wrong,
  // or past the end, are left unread.
  std::vector<int64_t> kept(plan.size(), 0);  // draft tokens kept, per chunk
  std::vector<char> settled(plan.size(), 0);
  for (size_t u = 0; u < uses.size(); ++u) {
    const size_t c = uses[u].chunk;
    Sequence* s = plan[c].seq;
    const int64_t p = uses[u].position;
    RequestOutput& out = output_of(s);
    if (p + 1 < s->prompt_len) {
      s->prompt_logprobs.push_back(std::move(host_result[u]));
      continue;
    }
    if (settled[c]) continue;
    settled[c] = 1;  // unless the draft goes on below
    if (s->options.prompt_logprobs >= 0 && !s->prompt_logprobs_sent) {
      out.prompt_logprobs = std::move(s->prompt_logprobs);
      s->prompt_logprobs_sent = true;
    }
    SampledToken t;
    if (host_row[u] < 0) {
      t.token = gpu_tokens[u];
      t.logprob = gpu_logprobs[u];
    } else {
      t = std::move(host_result[u]);
    }
    const std::vector<int32_t>& draft = plan[c].draft;
    const int32_t j = uses[u].draft;
    const bool draft_token = j < static_cast<int32_t>(draft.size()) && t.token == draft[j];
    // An end (EOS, a stop token) is outside the text, and leaves the grammar where it was. A kept
    // draft token (never an end) takes the grammar's state after it from the draft's planning.
    const bool end = EndOf(*s, t.token) != FinishReason::kNone;
    bool follows = t.token >= 0;
    if (follows && s->matcher.has_value() && !end) {
      if (draft_token && static_cast<size_t>(j) < plan[c].draft_matchers.size()) {
        *s->matcher = std::move(plan[c].draft_matchers[j]);
      } else {
        follows = s->matcher->Advance(TokenText(*config_.vocabulary, t.token));
      }
    }
    if (!follows) {
      out.finish = FinishReason::kError;
      out.error = !host_error[u].ok()
                      ? host_error[u]
                      : absl::InternalError("the sampled token leaves the structured output");
      finished.push_back(s);
      continue;
    }
    s->tokens.push_back(t.token);
    s->penalties.AddOutput(t.token);
    ++s->num_generated;
    Charge(*s, 0, 1);
    if (s->matcher.has_value()) ++num_structured_tokens_;
    out.finish = CheckStop(*s, t.token);
    if (out.finish == FinishReason::kNone && s->matcher.has_value() && s->matcher->IsComplete() &&
        !s->matcher->CanContinue()) {
      out.finish = FinishReason::kGrammarEnd;
    }
    out.tokens.push_back(std::move(t));
    if (draft_token) ++kept[c];  // its K/V is computed (even if it ends the sequence)
    if (out.finish != FinishReason::kNone) {
      finished.push_back(s);
      continue;
    }
    if (draft_token) settled[c] = 0;
  }
  for (size_t c = 0; c < plan.size(); ++c) {
    if (plan[c].draft.empty()) continue;
    num_accepted_draft_tokens_ += kept[c];
    // Half a draft kept or more: the next may be full length; less: one more than was kept.
    const int64_t drafted = static_cast<int64_t>(plan[c].draft.size());
    plan[c].seq->draft_limit =
        2 * kept[c] >= drafted ? config_.num_speculative_tokens : kept[c] + 1;
    Sequence* s = plan[c].seq;
    s->num_computed += kept[c];
    PublishFullBlocks(s);
    // Blocks the draft took past what the sequence now needs go back (never published: free).
    const int64_t need = (static_cast<int64_t>(s->tokens.size()) + bt - 1) / bt;
    while (static_cast<int64_t>(s->block_table.size()) > need) {
      blocks_.Release(s->block_table.back());
      s->block_table.pop_back();
    }
  }
  for (auto& [s, out] : produced) {
    if (out.tokens.empty() && out.finish == FinishReason::kNone) continue;  // mid-prefill
    out.request_id = s->id;
    out.num_prompt_tokens = s->prompt_len;
    out.num_cached_prompt_tokens = s->num_cached_prompt;
    out.num_cached_prompt_tokens_by_tier = s->num_cached_by_tier;
    out.num_generated_tokens = s->num_generated;
    outputs.push_back(std::move(out));
  }
  for (Sequence* s : finished) {
    if (draft_ != nullptr) draft_->Forget(static_cast<uint64_t>(s->arrival));
    if (store_ != nullptr && config_.keep_finished_warm) KeepWarm(*s);
    ReleaseBlocks(s);
    ReleaseDelta(s);
    running_.erase(std::find_if(running_.begin(), running_.end(),
                                [s](const auto& p) { return p.get() == s; }));
  }
  return outputs;
}

EngineStats Engine::Stats(bool with_tenants) const {
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
  st.num_pending_prefill_tokens += waiting_prefill_tokens_;
  st.num_free_blocks = blocks_.num_available();
  st.num_total_blocks = blocks_.num_blocks();
  st.num_preemptions = num_preemptions_;
  st.num_inflight_prefix_waits = num_inflight_prefix_waits_;
  st.num_inflight_prefix_tokens = num_inflight_prefix_tokens_;
  if (store_ != nullptr) st.tiers = store_->stats();
  if (deltas_ != nullptr) st.deltas = deltas_->GetStats();
  if (deltas_ != nullptr && gpu_ != nullptr) st.gpu_deltas = gpu_->delta_stats();
  st.num_structured_tokens = num_structured_tokens_;
  st.num_draft_tokens = num_draft_tokens_;
  st.num_exported_kv_blocks = num_exported_kv_blocks_;
  st.num_imported_kv_blocks = num_imported_kv_blocks_;
  st.num_accepted_draft_tokens = num_accepted_draft_tokens_;
  if (draft_ != nullptr) {
    st.has_draft_model = true;
    st.draft_model = draft_->Stats();
  }
  st.grammar_mask_seconds = static_cast<double>(grammar_mask_ns_.load()) * 1e-9;
  if (masker_ != nullptr) st.grammar_masks = masker_->stats();
  if (!with_tenants) return st;
  absl::flat_hash_map<const TenantShare*, EngineStats::Tenant*> of;
  st.tenants.reserve(tenants_.size());
  for (const auto& [name, t] : tenants_) {
    st.tenants.push_back({t, 0, 0, {}});
    EngineStats::Tenant& e = st.tenants.back();
    e.kv_blocks[static_cast<int>(Tier::kDevice)] = blocks_.num_published_by(t.id);
    if (store_ != nullptr) {
      for (const Tier tier : {Tier::kHost, Tier::kDisk}) {
        e.kv_blocks[static_cast<int>(tier)] = store_->BlocksOf(tier, t.id);
      }
    }
    of[&t] = &e;
  }
  for (const auto& s : running_) ++of[s->share]->running;
  for (const auto& [key, s] : waiting_) ++of[s->share]->waiting;
  std::sort(st.tenants.begin(), st.tenants.end(),
            [](const auto& a, const auto& b) { return a.name < b.name; });
  return st;
}

std::vector<double> Engine::DrainQueueWaits() { return std::exchange(queue_waits_, {}); }

std::vector<BlockEvent> Engine::DrainBlockEvents() {
  std::vector<BlockEvent> events = blocks_.DrainEvents();
  if (store_ != nullptr) {
    for (const TierEvent& e : store_->DrainEvents()) {
      events.push_back(
          {e.stored ? BlockEvent::Kind::kStored : BlockEvent::Kind::kRemoved, e.hash, e.tier});
    }
  }
  return events;
}

std::vector<BlockEvent> Engine::BlockInventory() const {
  std::vector<BlockEvent> out;
  for (BlockHash h : blocks_.PublishedHashes()) {
    out.push_back({BlockEvent::Kind::kStored, h, Tier::kDevice});
  }
  if (store_ != nullptr) {
    for (const TierEvent& e : store_->Inventory()) {
      out.push_back({BlockEvent::Kind::kStored, e.hash, e.tier});
    }
  }
  return out;
}

}  // namespace strata
