#include "cli/cluster.h"

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/time/clock.h"
#include "common/grpc_status.h"
#include "common/json.h"
#include "common/status_macros.h"
#include "common/tls.h"
#include "google/protobuf/util/json_util.h"
#include "grpcpp/grpcpp.h"
#include "proto/strata/v1/admin.grpc.pb.h"
#include "proto/strata/v1/serving.grpc.pb.h"

namespace strata {
namespace {

// The flag's value, else the environment variable's, else "".
std::string FlagOrEnv(const Args& args, const char* flag, const char* env) {
  if (std::optional<std::string> v = args.Get(flag)) return *v;
  const char* e = std::getenv(env);
  return e != nullptr ? std::string(e) : std::string();
}

std::string CoordinatorName(const Args& args);

absl::StatusOr<std::shared_ptr<grpc::Channel>> Connect(const Args& args) {
  return CoordinatorChannel(args, CoordinatorName(args));
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::Channel>> CoordinatorChannel(const Args& args,
                                                                  const std::string& target) {
  TlsOptions tls;
  tls.ca_file = FlagOrEnv(args, "tls-ca", "STRATA_TLS_CA");
  tls.cert_file = FlagOrEnv(args, "tls-cert", "STRATA_TLS_CERT");
  tls.key_file = FlagOrEnv(args, "tls-key", "STRATA_TLS_KEY");
  tls.server_name = FlagOrEnv(args, "tls-server-name", "STRATA_TLS_SERVER_NAME");
  // TLS verified by the system's CA certificates: a coordinator with a public certificate.
  if (tls.ca_file == "system") {
    tls.ca_file.clear();
    tls.system_ca = true;
  }
  absl::StatusOr<GrpcCredentials> credentials = GrpcCredentials::Load(tls);
  if (!credentials.ok()) {
    // The library names the servers' flags (--tls_ca); ours are spelt with dashes.
    return absl::Status(
        credentials.status().code(),
        absl::StrReplaceAll(credentials.status().message(), {{"--tls_", "--tls-"}}));
  }
  return credentials->NewChannel(target);
}

namespace {

std::string CoordinatorName(const Args& args) {
  if (std::optional<std::string> flag = args.Get("coordinator")) return *flag;
  if (const char* env = std::getenv("STRATA_COORDINATOR"); env != nullptr && *env != '\0') {
    return env;
  }
  return "127.0.0.1:50051";
}

// The error to show for a failed call; "unreachable" only when the channel could not connect.
absl::Status RpcError(const grpc::Status& s, const Args& args, grpc::Channel* channel) {
  absl::Status status = FromGrpcStatus(s);
  if (s.error_code() == grpc::StatusCode::UNAVAILABLE &&
      channel->GetState(/*try_to_connect=*/false) != GRPC_CHANNEL_READY) {
    // A plaintext call to a TLS port fails as a closed socket: say what may be missing.
    const bool tls = !FlagOrEnv(args, "tls-ca", "STRATA_TLS_CA").empty() ||
                     !FlagOrEnv(args, "tls-cert", "STRATA_TLS_CERT").empty();
    return absl::UnavailableError(
        absl::StrCat("coordinator ", CoordinatorName(args), " is unreachable: ", s.error_message(),
                     tls ? "" : " (if it serves TLS, give --tls-ca FILE or $STRATA_TLS_CA)"));
  }
  return status;
}

// Every call's deadline, and its API key.
void SetDeadline(grpc::ClientContext* ctx, absl::Duration d) {
  ctx->set_deadline(absl::ToChronoTime(absl::Now() + d));
  AddApiKey(ctx);
}

std::string ToJson(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions o;
  o.preserve_proto_field_names = true;
  const auto status = google::protobuf::util::MessageToJsonString(m, &out, o);
  if (!status.ok()) return absl::StrCat("{\"error\":", JsonQuote(status.ToString()), "}");
  return out;
}

const char* StateName(v1::WorkerState s) {
  switch (s) {
    case v1::WORKER_STATE_SERVING:
      return "serving";
    case v1::WORKER_STATE_DRAINING:
      return "draining";
    case v1::WORKER_STATE_UNAVAILABLE:
      return "unavailable";
    default:
      return "unknown";
  }
}

const char* FinishName(v1::FinishReason r) {
  switch (r) {
    case v1::FINISH_REASON_LENGTH:
      return "length";
    case v1::FINISH_REASON_EOS:
      return "eos";
    case v1::FINISH_REASON_STOP_TOKEN:
      return "stop_token";
    case v1::FINISH_REASON_STOP_STRING:
      return "stop_string";
    case v1::FINISH_REASON_CONTEXT_LENGTH:
      return "context_length";
    case v1::FINISH_REASON_CANCELLED:
      return "cancelled";
    case v1::FINISH_REASON_GRAMMAR_END:
      return "grammar_end";
    default:
      return "none";
  }
}

// Prints rows as columns padded to their widest cell.
void PrintTable(std::FILE* out, const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> width;
  for (const auto& row : rows) {
    if (width.size() < row.size()) width.resize(row.size(), 0);
    for (size_t i = 0; i < row.size(); ++i) width[i] = std::max(width[i], row[i].size());
  }
  for (const auto& row : rows) {
    std::string line;
    for (size_t i = 0; i < row.size(); ++i) {
      line += row[i];
      if (i + 1 < row.size()) line += std::string(width[i] - row[i].size() + 2, ' ');
    }
    std::fprintf(out, "%s\n", line.c_str());
  }
}

}  // namespace

void AddApiKey(grpc::ClientContext* ctx) {
  if (const char* key = std::getenv("STRATA_API_KEY"); key != nullptr && *key != '\0') {
    ctx->AddMetadata("authorization", absl::StrCat("Bearer ", key));
  }
}

absl::Status GenerateCommand(const Args& args, std::FILE* out) {
  ASSIGN_OR_RETURN(const std::shared_ptr<grpc::Channel> channel, Connect(args));
  auto serving = v1::Serving::NewStub(channel);
  const bool json = args.Has("json");
  v1::GenerateRequest req;
  if (std::optional<std::string> model = args.Get("model")) {
    req.set_model(*model);
  } else {
    // The cluster's only model, when it has one.
    grpc::ClientContext ctx;
    SetDeadline(&ctx, absl::Seconds(10));
    v1::ListModelsResponse models;
    if (grpc::Status s = serving->ListModels(&ctx, v1::ListModelsRequest(), &models); !s.ok()) {
      return RpcError(s, args, channel.get());
    }
    if (models.models_size() != 1) {
      return absl::InvalidArgumentError(absl::StrCat("--model is required: the cluster serves ",
                                                     models.models_size(), " models"));
    }
    req.set_model(models.models(0).name());
  }
  std::optional<std::string> text = args.Get("prompt");
  ASSIGN_OR_RETURN(std::vector<int32_t> ids, args.GetIntList("prompt-ids"));
  if (text.has_value() == !ids.empty()) {
    return absl::InvalidArgumentError("give exactly one of --prompt and --prompt-ids");
  }
  if (text) {
    req.set_text(*text);
  } else {
    req.mutable_token_ids()->mutable_ids()->Add(ids.begin(), ids.end());
  }
  v1::SamplingParams* p = req.mutable_sampling();
  ASSIGN_OR_RETURN(int64_t max_tokens, args.GetInt("max-tokens", 64));
  if (max_tokens < 1) return absl::InvalidArgumentError("--max-tokens must be positive");
  p->set_max_tokens(static_cast<uint32_t>(max_tokens));
  if (args.Has("temperature")) {
    ASSIGN_OR_RETURN(double t, args.GetDouble("temperature", 1));
    p->set_temperature(static_cast<float>(t));
  }
  if (args.Has("top-p")) {
    ASSIGN_OR_RETURN(double v, args.GetDouble("top-p", 1));
    p->set_top_p(static_cast<float>(v));
  }
  ASSIGN_OR_RETURN(int64_t top_k, args.GetInt("top-k", 0));
  if (top_k < 0) return absl::InvalidArgumentError("--top-k must be >= 0");
  p->set_top_k(static_cast<uint32_t>(top_k));
  ASSIGN_OR_RETURN(double min_p, args.GetDouble("min-p", 0));
  p->set_min_p(static_cast<float>(min_p));
  if (args.Has("seed")) {
    ASSIGN_OR_RETURN(int64_t seed, args.GetInt("seed", 0));
    p->set_seed(static_cast<uint64_t>(seed));
  }
  for (const std::string& s : args.GetAll("stop")) p->add_stop(s);
  p->set_ignore_eos(args.Has("ignore-eos"));
  if (args.Has("logprobs")) {
    ASSIGN_OR_RETURN(int64_t k, args.GetInt("logprobs", 0));
    if (k < 0) return absl::InvalidArgumentError("--logprobs must be >= 0");
    p->set_logprobs(static_cast<uint32_t>(k));
  }
  // Structured output: at most one of them; a schema or grammar given as @FILE is read from it.
  auto text_or_file = [](const std::string& v) -> absl::StatusOr<std::string> {
    if (v.empty() || v[0] != '@') return v;
    std::ifstream in(v.substr(1), std::ios::binary);
    if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", v.substr(1)));
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  };
  v1::StructuredOutput* so = p->mutable_structured_output();
  int constraints = 0;
  if (std::optional<std::string> v = args.Get("json-schema")) {
    ASSIGN_OR_RETURN(*so->mutable_json_schema(), text_or_file(*v));
    ++constraints;
  }
  if (args.Has("json-object")) {
    so->set_json_object(true);
    ++constraints;
  }
  if (std::optional<std::string> v = args.Get("regex")) {
    so->set_regex(*v);
    ++constraints;
  }
  if (std::optional<std::string> v = args.Get("grammar")) {
    ASSIGN_OR_RETURN(*so->mutable_grammar(), text_or_file(*v));
    ++constraints;
  }
  if (const std::vector<std::string> choices = args.GetAll("choice"); !choices.empty()) {
    for (const std::string& c : choices) so->mutable_choice()->add_texts(c);
    ++constraints;
  }
  if (args.Has("compact-json")) so->set_compact_json(true);
  if (constraints > 1) {
    return absl::InvalidArgumentError(
        "give at most one of --json-schema, --json-object, --regex, --grammar and --choice");
  }
  if (std::optional<std::string> salt = args.Get("cache-salt")) req.set_cache_salt(*salt);
  if (std::optional<std::string> ft = args.Get("fine-tune")) req.set_fine_tune_id(*ft);
  ASSIGN_OR_RETURN(double timeout_s, args.GetDouble("timeout-s", 300));

  grpc::ClientContext ctx;
  SetDeadline(&ctx, absl::Seconds(timeout_s));
  auto reader = serving->Generate(&ctx, req);
  v1::GenerateResponse chunk;
  std::vector<int32_t> tokens;
  std::string all_text;
  std::vector<std::string> logprobs;
  v1::GenerateResponse last;
  uint64_t seed = 0;
  std::string request_id;
  bool first = true;
  while (reader->Read(&chunk)) {
    if (first) {
      seed = chunk.seed();
      request_id = chunk.request_id();
      first = false;
    }
    tokens.insert(tokens.end(), chunk.token_ids().begin(), chunk.token_ids().end());
    all_text += chunk.text();
    for (const auto& lp : chunk.logprobs()) logprobs.push_back(ToJson(lp));
    if (!json) {
      std::fputs(chunk.text().c_str(), out);
      std::fflush(out);
    }
    if (chunk.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) last = chunk;
  }
  const grpc::Status status = reader->Finish();
  if (!json && !first) std::fputs("\n", out);
  if (!status.ok()) return RpcError(status, args, channel.get());
  if (json) {
    std::fprintf(out,
                 "{\"request_id\":%s,\"model\":%s,\"seed\":%llu,\"token_ids\":[%s],\"text\":%s,"
                 "\"finish_reason\":\"%s\",\"matched_stop\":%s,\"usage\":%s,\"logprobs\":[%s]}\n",
                 JsonQuote(request_id).c_str(), JsonQuote(req.model()).c_str(),
                 static_cast<unsigned long long>(seed), absl::StrJoin(tokens, ",").c_str(),
                 JsonQuote(all_text).c_str(), FinishName(last.finish_reason()),
                 JsonQuote(last.matched_stop()).c_str(), ToJson(last.usage()).c_str(),
                 absl::StrJoin(logprobs, ",").c_str());
  }
  return absl::OkStatus();
}

absl::Status StatusCommand(const Args& args, std::FILE* out) {
  ASSIGN_OR_RETURN(const std::shared_ptr<grpc::Channel> channel, Connect(args));
  auto admin = v1::Admin::NewStub(channel);
  auto serving = v1::Serving::NewStub(channel);
  v1::ClusterStatus cs;
  {
    grpc::ClientContext ctx;
    SetDeadline(&ctx, absl::Seconds(10));
    if (grpc::Status s = admin->GetClusterStatus(&ctx, v1::GetClusterStatusRequest(), &cs);
        !s.ok()) {
      return RpcError(s, args, channel.get());
    }
  }
  v1::ListModelsResponse models;
  {
    grpc::ClientContext ctx;
    SetDeadline(&ctx, absl::Seconds(10));
    if (grpc::Status s = serving->ListModels(&ctx, v1::ListModelsRequest(), &models); !s.ok()) {
      return RpcError(s, args, channel.get());
    }
  }
  if (args.Has("json")) {
    std::fprintf(out, "{\"coordinator\":%s,\"cluster\":%s,\"models\":%s}\n",
                 JsonQuote(CoordinatorName(args)).c_str(), ToJson(cs).c_str(),
                 ToJson(models).c_str());
    return absl::OkStatus();
  }
  std::fprintf(out,
               "coordinator %s  version %s  up %s  in flight %u  completed %llu  failed over "
               "%llu\n\n",
               CoordinatorName(args).c_str(), cs.version().c_str(),
               absl::FormatDuration(absl::Milliseconds(cs.uptime_ms())).c_str(),
               cs.num_inflight_requests(),
               static_cast<unsigned long long>(cs.num_completed_requests()),
               static_cast<unsigned long long>(cs.num_failed_over_requests()));
  std::vector<std::vector<std::string>> mrows = {
      {"MODEL", "WORKERS", "CONTEXT", "VOCAB", "FINE-TUNES"}};
  for (const auto& m : models.models()) {
    // Contexts that differ between its workers: the shortest to the longest.
    mrows.push_back({m.name(), absl::StrCat(m.num_workers()),
                     m.min_context_tokens() != 0 && m.min_context_tokens() < m.max_context_tokens()
                         ? absl::StrCat(m.min_context_tokens(), "-", m.max_context_tokens())
                         : absl::StrCat(m.max_context_tokens()),
                     absl::StrCat(m.vocab_size()),
                     m.fine_tune_ids().empty() ? "-" : absl::StrJoin(m.fine_tune_ids(), ",")});
  }
  PrintTable(out, mrows);
  std::fputs("\n", out);
  std::vector<std::vector<std::string>> rows = {
      {"WORKER", "ADDRESS", "STATE", "MODEL", "ROLE", "KV COPIES", "TP", "CONTEXT", "RUNNING",
       "WAITING", "ROUTED", "KV FREE/TOTAL", "INDEXED DEV/HOST/DISK", "STEP MS"}};
  for (const auto& w : cs.workers()) {
    uint64_t free_blocks = 0, total_blocks = 0;
    for (const auto& t : w.load().tiers()) {
      if (t.tier() == v1::TIER_DEVICE) {
        free_blocks = t.num_free_blocks();
        total_blocks = t.num_total_blocks();
      }
    }
    uint64_t indexed[4] = {0, 0, 0, 0};
    for (const auto& t : w.indexed()) {
      if (t.tier() >= 1 && t.tier() <= 3) indexed[t.tier()] = t.num_total_blocks();
    }
    rows.push_back(
        {w.info().worker_id().empty() ? "-" : w.info().worker_id(), w.address(),
         StateName(w.state()), w.info().model().empty() ? "-" : w.info().model(),
         w.info().model().empty()                     ? "-"
         : w.info().role() == v1::WORKER_ROLE_PREFILL ? "prefill"
         : w.info().role() == v1::WORKER_ROLE_DECODE  ? "decode"
                                                      : "mixed",
         // Which way it copies KV blocks with other workers: it sends its own (it keeps a
         // prefix cache) and takes theirs (--kv_fetch); and the TCP port it sends them on
         // besides gRPC (--kv_transfer_listen), "tls:" when that speaks TLS.
         !w.info().has_kv_layout()
             ? "-"
             : absl::StrCat(w.info().kv_fetch() ? "in+out" : "out",
                            w.info().kv_transfer_port() != 0
                                ? absl::StrCat(w.info().tls() ? "/tls:" : "/tcp:",
                                               w.info().kv_transfer_port())
                                : ""),
         w.info().tensor_parallel_size() == 0 ? "-" : absl::StrCat(w.info().tensor_parallel_size()),
         w.info().max_context_tokens() == 0 ? "-" : absl::StrCat(w.info().max_context_tokens()),
         absl::StrCat(w.load().num_running_sequences()),
         absl::StrCat(w.load().num_waiting_sequences()), absl::StrCat(w.num_routed_requests()),
         absl::StrCat(free_blocks, "/", total_blocks),
         absl::StrCat(indexed[1], "/", indexed[2], "/", indexed[3]),
         absl::StrFormat("%.1f", w.load().mean_step_time_ms())});
  }
  PrintTable(out, rows);
  // Tenants (API keys): their limits and use now.
  if (cs.tenants_size() > 0) {
    std::fputs("\n", out);
    std::vector<std::vector<std::string>> nrows = {{"TENANT", "RUNNING", "REQ/MIN", "REQ LEFT",
                                                    "TOKENS/MIN", "TOKENS LEFT", "WEIGHT",
                                                    "MAX PRIO", "MODELS"}};
    auto limit = [](uint64_t n) { return n == 0 ? std::string("-") : absl::StrCat(n); };
    for (const auto& t : cs.tenants()) {
      // Running here, and through the other coordinators (--peers) when any.
      std::string running = absl::StrCat(t.running_requests());
      if (t.peer_running_requests() > 0) {
        absl::StrAppend(&running, " (+", t.peer_running_requests(), " peers)");
      }
      const std::string requests_left =
          t.requests_per_minute() == 0 ? "-" : absl::StrFormat("%.1f", t.requests_available());
      const std::string tokens_left =
          t.tokens_per_minute() == 0
              ? "-"
              : absl::StrCat(static_cast<int64_t>(std::llround(t.tokens_available())));
      const std::string models =
          t.all_models() ? "(all)"
                         : (t.models().empty() ? "(none)" : absl::StrJoin(t.models(), ","));
      nrows.push_back({t.name() + (t.admin() ? " (admin)" : ""),
                       absl::StrCat(running, "/", limit(t.max_concurrent_requests())),
                       limit(t.requests_per_minute()), requests_left, limit(t.tokens_per_minute()),
                       tokens_left, absl::StrFormat("%g", t.scheduling_weight()),
                       absl::StrCat(t.max_priority()), models});
    }
    PrintTable(out, nrows);
  }
  // Lower KV tiers, for the workers that have them.
  std::vector<std::vector<std::string>> trows = {{"WORKER", "HOST FREE/TOTAL", "DISK FREE/TOTAL",
                                                  "WRITE-BACKS", "LOADS", "PREFETCH ACC",
                                                  "COVERAGE", "CORRUPT", "IO ERRORS"}};
  auto ratio = [](uint64_t a, uint64_t b) {
    return b == 0 ? std::string("-") : absl::StrFormat("%.2f", static_cast<double>(a) / b);
  };
  for (const auto& w : cs.workers()) {
    if (!w.load().has_kv_tiers()) continue;
    std::string host = "-", disk = "-";
    for (const auto& t : w.load().tiers()) {
      const std::string ft = absl::StrCat(t.num_free_blocks(), "/", t.num_total_blocks());
      if (t.tier() == v1::TIER_HOST) host = ft;
      if (t.tier() == v1::TIER_DISK) disk = ft;
    }
    const v1::KvTierStats& k = w.load().kv_tiers();
    if (!k.disk_enabled() && disk != "-") disk += " (off)";
    trows.push_back({w.info().worker_id().empty() ? w.address() : w.info().worker_id(), host, disk,
                     absl::StrCat(k.write_backs()), absl::StrCat(k.loads()),
                     ratio(k.prefetch_used(), k.prefetch_promoted()),
                     ratio(k.lower_tier_hits_covered(), k.lower_tier_hits()),
                     absl::StrCat(k.corrupt_blocks()), absl::StrCat(k.io_errors())});
  }
  if (trows.size() > 1) {
    std::fputs("\n", out);
    PrintTable(out, trows);
  }
  return absl::OkStatus();
}

absl::Status DrainCommand(const Args& args, std::FILE* out) {
  if (args.positional().size() != 1) {
    return absl::InvalidArgumentError("usage: stratactl drain WORKER (its address or worker id)");
  }
  ASSIGN_OR_RETURN(const std::shared_ptr<grpc::Channel> channel, Connect(args));
  auto admin = v1::Admin::NewStub(channel);
  v1::DrainWorkerRequest req;
  req.set_worker(args.positional()[0]);
  req.set_resume(args.Has("resume"));
  req.set_wait(args.Has("wait"));
  ASSIGN_OR_RETURN(double timeout_s, args.GetDouble("timeout-s", 60));
  req.set_timeout_ms(static_cast<uint32_t>(timeout_s * 1000));
  grpc::ClientContext ctx;
  SetDeadline(&ctx, absl::Seconds(timeout_s + 10));
  v1::DrainWorkerResponse resp;
  if (grpc::Status s = admin->DrainWorker(&ctx, req, &resp); !s.ok())
    return RpcError(s, args, channel.get());
  if (args.Has("json")) {
    std::fprintf(out, "%s\n", ToJson(resp).c_str());
  } else {
    std::fprintf(out, "worker %s (%s) is %s\n", resp.status().info().worker_id().c_str(),
                 resp.status().address().c_str(), StateName(resp.status().state()));
  }
  return absl::OkStatus();
}

}  // namespace strata
