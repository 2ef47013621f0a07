// loadgen: drives a Strata coordinator (or one worker directly) with an open-loop workload over
// gRPC and reports latency and throughput.
//
//   loadgen --target HOST:PORT [--api serving|worker] [--model NAME]
//       [--workload random|shared-prefix|multi-turn] [--requests N] [--rate R]
//       [--prompt_tokens N|MIN:MAX] [--output_tokens N|MIN:MAX]
//       [--shared_prefix_tokens N] [--shared_fraction F] [--shared_prefixes K]
//       [--turns T] [--turn_tokens N|MIN:MAX] [--think_time_ms MS] [--replies_in_history]
//       [--cache_salt S] [--api_key KEY] [--tenant T] [--seed S] [--label L] [--json]
//       [--json_out FILE] [--start_at_unix_ms T]
//
// Arrivals are open-loop: requests (for multi-turn, conversations) start at Poisson times at --rate
// per second whatever the system's latency; a conversation's next turn is sent after the previous
// one ends plus an exponential think time, and resends the history with the model's replies in it
// (as a chat client does; --noreplies_in_history leaves them out). Each request generates exactly
// its output length (ignore_eos). Reported per request: TTFT (send to first token), TPOT (first
// token to last, per token after the first), end-to-end latency, at p50 / p90 / p99, and over all
// tokens the inter-token latency (ITL: each gap between streamed chunks, per token of the later
// one), whose tail shows decode stalls that per-request TPOT averages away; throughput in
// requests and output tokens per second over the run; and the prefix-cache hit rate (cached prompt
// tokens / prompt tokens, from each response's usage).
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "bench/workload.h"
#include "common/init.h"
#include "common/json.h"
#include "common/log.h"
#include "common/secrets.h"
#include "common/tcp.h"
#include "common/tls.h"
#include "common/tls_flags.h"
#include "common/tls_stream.h"
#include "grpcpp/grpcpp.h"
#include "proto/strata/v1/serving.grpc.pb.h"
#include "proto/strata/v1/worker.grpc.pb.h"

ABSL_FLAG(std::string, target, "127.0.0.1:50051", "Coordinator (or, with --api worker, worker).");
ABSL_FLAG(std::string, api, "serving",
          "serving (a coordinator's Generate), worker (Submit), or openai (a coordinator's "
          "OpenAI-compatible HTTP API, --target its --http_listen address: streamed "
          "/v1/completions; HTTPS with --tls_ca, a connection and handshake a request).");
ABSL_FLAG(std::string, model, "strata-tiny", "Model name.");
ABSL_FLAG(std::string, workload, "random", "random, shared-prefix or multi-turn.");
ABSL_FLAG(int64_t, requests, 100, "Requests in all (multi-turn: conversations x turns).");
ABSL_FLAG(double, rate, 4, "Arrivals per second (multi-turn: of conversations).");
ABSL_FLAG(std::string, prompt_tokens, "128", "Prompt length (own tokens), N or MIN:MAX.");
ABSL_FLAG(std::string, output_tokens, "32", "Output length, N or MIN:MAX.");
ABSL_FLAG(int64_t, shared_prefix_tokens, 1000, "shared-prefix: length of each shared prefix.");
ABSL_FLAG(double, shared_fraction, 0.9, "shared-prefix: fraction of requests with a prefix.");
ABSL_FLAG(int, shared_prefixes, 1, "shared-prefix: number of distinct prefixes.");
ABSL_FLAG(int, turns, 4, "multi-turn: turns per conversation.");
ABSL_FLAG(std::string, turn_tokens, "40", "multi-turn: new tokens per turn, N or MIN:MAX.");
ABSL_FLAG(double, think_time_ms, 200, "multi-turn: mean think time between turns.");
ABSL_FLAG(bool, replies_in_history, true,
          "multi-turn: each turn's prompt has the model's earlier replies in it, as a chat client "
          "sends it.");
ABSL_FLAG(int, vocab_size, 2048, "Token ids are drawn from [0, vocab_size).");
ABSL_FLAG(std::string, cache_salt, "", "Cache salt for every request (isolates runs).");
ABSL_FLAG(std::string, api_key, "",
          "API key sent with every request (--api serving: gRPC metadata authorization, openai: "
          "the Authorization header); default $STRATA_API_KEY.");
ABSL_FLAG(std::string, tenant, "", "--api worker: the tenant named in every SubmitRequest.");
ABSL_FLAG(int64_t, start_at_unix_ms, 0,
          "Start the run (its first arrival) at this wall-clock time, in ms since the Unix epoch, "
          "so that several loadgens begin together; 0: at once.");
ABSL_FLAG(std::string, cluster_secret_file, "",
          "--api worker: the cluster secret's file, for a worker started with one.");
ABSL_FLAG(uint64_t, seed, 1, "Workload seed.");
ABSL_FLAG(std::vector<std::string>, fine_tunes, {},
          "Fine-tune ids: each conversation runs on one of them, drawn by --fine_tune_zipf, or on "
          "the base with probability --base_fraction.");
ABSL_FLAG(double, fine_tune_zipf, 1.0, "The k-th fine-tune's weight is 1 / (k + 1)^this.");
ABSL_FLAG(double, base_fraction, 0, "Share of conversations on the base model with --fine_tunes.");
ABSL_FLAG(std::string, label, "", "Name of this run in the report.");
ABSL_FLAG(bool, json, false, "Print the report as JSON instead of a table.");
ABSL_FLAG(std::string, json_out, "", "Also write the JSON report to this file.");

namespace strata {
namespace {

struct Sample {
  bool ok = false;
  std::string error;
  double ttft_ms = 0;
  double tpot_ms = 0;
  double e2e_ms = 0;
  int64_t prompt_tokens = 0;
  int64_t cached_tokens = 0;
  int64_t output_tokens = 0;
  std::vector<int32_t> reply;  // the tokens generated
  // Inter-token latency: each gap between chunks that carry tokens, per token of the later chunk.
  std::vector<double> itl_ms;
  absl::Time end;
};

class Driver {
 public:
  // `https`: the OpenAI API over TLS, checked against `https_name` (not owned; null: plain HTTP).
  Driver(std::shared_ptr<grpc::Channel> channel, const std::string& api,
         TlsContextSource* https = nullptr, std::string https_name = "")
      : serving_(v1::Serving::NewStub(channel)),
        worker_(v1::Worker::NewStub(channel)),
        worker_api_(api == "worker"),
        https_(https),
        https_name_(std::move(https_name)) {
    api_key_ = absl::GetFlag(FLAGS_api_key);
    if (const char* env = std::getenv("STRATA_API_KEY"); api_key_.empty() && env != nullptr) {
      api_key_ = env;
    }
    if (const std::string path = absl::GetFlag(FLAGS_cluster_secret_file); !path.empty()) {
      absl::StatusOr<std::vector<std::string>> secrets = LoadSecretFile(path);
      CHECK(secrets.ok()) << "--cluster_secret_file: " << secrets.status();
      cluster_secret_ = secrets->front();  // the one sent
    }
  }

  // One streamed /v1/completions call (the OpenAI-compatible API). The stream carries text, not
  // token ids: the reply stays empty, and the counts come from the usage event.
  Sample SendHttp(const std::vector<int32_t>& prompt, int64_t output_tokens, uint64_t seed,
                  const std::string& fine_tune_id) {
    Sample s;
    const absl::Time sent = absl::Now();
    const std::string body = absl::StrCat(
        "{\"model\":", JsonQuote(absl::GetFlag(FLAGS_model)), ",\"prompt\":[",
        absl::StrJoin(prompt, ","), "],\"max_tokens\":", output_tokens, ",\"seed\":", seed,
        ",\"ignore_eos\":true,\"stream\":true,\"stream_options\":{\"include_usage\":true},"
        "\"cache_salt\":",
        JsonQuote(absl::GetFlag(FLAGS_cache_salt)), ",\"fine_tune_id\":", JsonQuote(fine_tune_id),
        "}");
    const std::string request = absl::StrCat(
        "POST /v1/completions HTTP/1.1\r\nHost: loadgen\r\nConnection: close\r\n",
        api_key_.empty() ? "" : absl::StrCat("Authorization: Bearer ", api_key_, "\r\n"),
        "Content-Type: application/json\r\nContent-Length: ", body.size(), "\r\n\r\n", body);
    UniqueFd conn = ConnectTcp(absl::GetFlag(FLAGS_target));
    if (!conn.valid()) {
      s.error = "cannot connect";
      return s;
    }
    int fd = conn.get();
    // The gRPC path's limit: a stalled server fails the request instead of hanging the run.
    const absl::Time deadline = sent + absl::Minutes(10);
    // HTTPS: the request and the stream through a TLS bridge (the handshake counts in TTFT, as
    // a client without a pooled connection pays it).
    std::unique_ptr<TlsBridge> bridge;
    if (https_ != nullptr) {
      absl::StatusOr<std::unique_ptr<TlsBridge>> b =
          TlsConnect(*https_, std::move(conn), https_name_, sent + absl::Seconds(10));
      if (!b.ok()) {
        s.error = std::string(b.status().message());
        return s;
      }
      bridge = *std::move(b);
      fd = bridge->fd();
    }
    if (!WriteAll(fd, request, /*wake_fd=*/-1, deadline)) {
      s.error = "cannot send the request";
      return s;
    }
    std::string data;
    size_t parsed = 0;  // bytes of `data` consumed as events
    bool head_done = false, have_first = false, done = false;
    int status = 0;
    absl::Time first, last;
    while (!done && RecvSome(fd, &data, /*wake_fd=*/-1, deadline)) {
      if (!head_done) {
        const size_t end = data.find("\r\n\r\n");
        if (end == std::string::npos) continue;
        const std::vector<std::string> line =
            absl::StrSplit(data.substr(0, data.find("\r\n")), ' ');
        if (line.size() < 2 || !absl::SimpleAtoi(line[1], &status)) status = 0;
        head_done = true;
        parsed = end + 4;
        if (status != 200) continue;  // read the error body to the end
      }
      if (status != 200) continue;
      size_t next;
      while ((next = data.find("\n\n", parsed)) != std::string::npos) {
        absl::string_view event = absl::string_view(data).substr(parsed, next - parsed);
        parsed = next + 2;
        if (!absl::ConsumePrefix(&event, "data: ")) continue;
        if (event == "[DONE]") {
          done = true;
          break;
        }
        absl::StatusOr<JsonDocument> d = JsonDocument::Parse(event, "event");
        if (!d.ok()) continue;
        if (std::optional<JsonValue> e = d->root().FindField("error")) {
          s.error = absl::StrCat("stream: ", e->StringFieldOr("message", "?").value_or("?"));
          continue;
        }
        if (std::optional<JsonValue> u = d->root().FindField("usage")) {
          s.prompt_tokens = u->IntFieldOr("prompt_tokens", 0).value_or(0);
          s.output_tokens = u->IntFieldOr("completion_tokens", 0).value_or(0);
          if (std::optional<JsonValue> details = u->FindField("prompt_tokens_details")) {
            s.cached_tokens = details->IntFieldOr("cached_tokens", 0).value_or(0);
          }
          continue;
        }
        const absl::Time now = absl::Now();
        if (!have_first) {
          first = now;
          have_first = true;
        } else {
          s.itl_ms.push_back(absl::ToDoubleMilliseconds(now - last));
        }
        last = now;
      }
    }
    s.end = absl::Now();
    if (status != 200 || !done || !s.error.empty()) {
      if (s.error.empty()) {
        s.error = absl::StrCat(
            "HTTP ", status, ": ",
            head_done ? data.substr(std::min(parsed, data.size()), 200) : "no response");
      }
      return s;
    }
    s.ok = true;
    s.e2e_ms = absl::ToDoubleMilliseconds(s.end - sent);
    s.ttft_ms = have_first ? absl::ToDoubleMilliseconds(first - sent) : s.e2e_ms;
    s.tpot_ms = have_first && s.output_tokens > 1
                    ? absl::ToDoubleMilliseconds(s.end - first) / (s.output_tokens - 1)
                    : 0;
    return s;
  }

  Sample Send(const std::vector<int32_t>& prompt, int64_t output_tokens, uint64_t seed,
              const std::string& fine_tune_id) {
    Sample s;
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Minutes(10)));
    const absl::Time sent = absl::Now();
    absl::Time first, last;
    bool have_first = false;
    grpc::Status status;
    v1::Usage usage;
    auto on_tokens = [&](const google::protobuf::RepeatedField<int32_t>& ids) {
      if (!ids.empty()) {
        const absl::Time now = absl::Now();
        if (!have_first) {
          first = now;
          have_first = true;
        } else {
          for (int i = 0; i < ids.size(); ++i) {
            s.itl_ms.push_back(absl::ToDoubleMilliseconds(now - last) / ids.size());
          }
        }
        last = now;
      }
      s.output_tokens += ids.size();
      s.reply.insert(s.reply.end(), ids.begin(), ids.end());
    };
    v1::SamplingParams sampling;
    sampling.set_max_tokens(static_cast<uint32_t>(output_tokens));
    sampling.set_ignore_eos(true);
    sampling.set_seed(seed);
    if (worker_api_) {
      v1::SubmitRequest req;
      req.set_request_id(absl::StrCat("loadgen-", next_id_.fetch_add(1)));
      req.set_model(absl::GetFlag(FLAGS_model));
      req.mutable_prompt_token_ids()->Add(prompt.begin(), prompt.end());
      *req.mutable_sampling() = sampling;
      req.set_cache_salt(absl::GetFlag(FLAGS_cache_salt));
      req.set_fine_tune_id(fine_tune_id);
      req.set_tenant(absl::GetFlag(FLAGS_tenant));
      if (!cluster_secret_.empty()) ctx.AddMetadata(kClusterSecretMetadata, cluster_secret_);
      auto reader = worker_->Submit(&ctx, req);
      v1::SubmitResponse chunk;
      while (reader->Read(&chunk)) {
        on_tokens(chunk.token_ids());
        if (chunk.has_usage()) usage = chunk.usage();
      }
      status = reader->Finish();
    } else {
      v1::GenerateRequest req;
      req.set_model(absl::GetFlag(FLAGS_model));
      req.mutable_token_ids()->mutable_ids()->Add(prompt.begin(), prompt.end());
      *req.mutable_sampling() = sampling;
      req.set_cache_salt(absl::GetFlag(FLAGS_cache_salt));
      req.set_fine_tune_id(fine_tune_id);
      if (!api_key_.empty()) ctx.AddMetadata("authorization", absl::StrCat("Bearer ", api_key_));
      auto reader = serving_->Generate(&ctx, req);
      v1::GenerateResponse chunk;
      while (reader->Read(&chunk)) {
        on_tokens(chunk.token_ids());
        if (chunk.has_usage()) usage = chunk.usage();
      }
      status = reader->Finish();
    }
    s.end = absl::Now();
    if (!status.ok()) {
      s.error = absl::StrCat(status.error_code(), ": ", status.error_message());
      return s;
    }
    s.ok = true;
    s.prompt_tokens = static_cast<int64_t>(prompt.size());
    s.cached_tokens = usage.cached().num_device_tokens() + usage.cached().num_host_tokens() +
                      usage.cached().num_disk_tokens();
    s.e2e_ms = absl::ToDoubleMilliseconds(s.end - sent);
    s.ttft_ms = have_first ? absl::ToDoubleMilliseconds(first - sent) : s.e2e_ms;
    s.tpot_ms =
        s.output_tokens > 1 ? absl::ToDoubleMilliseconds(s.end - first) / (s.output_tokens - 1) : 0;
    return s;
  }

 private:
  std::unique_ptr<v1::Serving::Stub> serving_;
  std::unique_ptr<v1::Worker::Stub> worker_;
  const bool worker_api_;
  TlsContextSource* const https_;
  const std::string https_name_;
  std::string api_key_;
  std::string cluster_secret_;
  std::atomic<uint64_t> next_id_{0};
};

std::string Stats(const std::vector<double>& v, bool json) {
  const double p50 = Percentile(v, 50), p90 = Percentile(v, 90), p99 = Percentile(v, 99);
  double mean = 0;
  for (double x : v) mean += x;
  mean = v.empty() ? 0 : mean / v.size();
  if (json)
    return absl::StrFormat("{\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"mean\":%.3f}", p50, p90, p99,
                           mean);
  return absl::StrFormat("%9.1f %9.1f %9.1f %9.1f", p50, p90, p99, mean);
}

int Main() {
  WorkloadOptions o;
  o.kind = absl::GetFlag(FLAGS_workload);
  o.num_requests = absl::GetFlag(FLAGS_requests);
  o.rate_per_s = absl::GetFlag(FLAGS_rate);
  o.shared_prefix_tokens = absl::GetFlag(FLAGS_shared_prefix_tokens);
  o.shared_fraction = absl::GetFlag(FLAGS_shared_fraction);
  o.num_shared_prefixes = absl::GetFlag(FLAGS_shared_prefixes);
  o.turns = absl::GetFlag(FLAGS_turns);
  o.think_time_ms = absl::GetFlag(FLAGS_think_time_ms);
  o.replies_in_history = absl::GetFlag(FLAGS_replies_in_history);
  o.vocab_size = absl::GetFlag(FLAGS_vocab_size);
  o.seed = absl::GetFlag(FLAGS_seed);
  const std::vector<std::string> fine_tunes = absl::GetFlag(FLAGS_fine_tunes);
  o.fine_tunes = static_cast<int>(fine_tunes.size());
  o.fine_tune_zipf = absl::GetFlag(FLAGS_fine_tune_zipf);
  o.base_fraction = absl::GetFlag(FLAGS_base_fraction);
  for (auto [flag, out] : {std::pair{&FLAGS_prompt_tokens, &o.prompt_tokens},
                           std::pair{&FLAGS_output_tokens, &o.output_tokens},
                           std::pair{&FLAGS_turn_tokens, &o.turn_tokens}}) {
    absl::StatusOr<LengthRange> r = ParseLengthRange(absl::GetFlag(*flag));
    if (!r.ok()) {
      std::fprintf(stderr, "loadgen: %s\n", std::string(r.status().message()).c_str());
      return 2;
    }
    *out = *r;
  }
  const std::string api = absl::GetFlag(FLAGS_api);
  if (api != "serving" && api != "worker" && api != "openai") {
    std::fprintf(stderr, "loadgen: --api must be serving, worker or openai\n");
    return 2;
  }
  if (api == "openai" && o.kind == "multi-turn" && o.replies_in_history) {
    // The HTTP stream carries text, not token ids: there is no reply to put back.
    std::fprintf(stderr, "loadgen: --api=openai sends multi-turn histories without replies\n");
    o.replies_in_history = false;
  }
  absl::StatusOr<std::vector<Conversation>> workload = MakeWorkload(o);
  if (!workload.ok()) {
    std::fprintf(stderr, "loadgen: %s\n", std::string(workload.status().message()).c_str());
    return 2;
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  // --tls_ca (and --tls_cert, --tls_key for a coordinator that asks for client certificates).
  absl::StatusOr<strata::TlsOptions> tls =
      strata::TlsOptionsFromFlags(strata::TlsClientAuth::kNone);
  absl::StatusOr<strata::GrpcCredentials> credentials =
      tls.ok() ? strata::GrpcCredentials::Load(*tls) : tls.status();
  if (!credentials.ok()) {
    std::fprintf(stderr, "loadgen: %s\n", std::string(credentials.status().message()).c_str());
    return 2;
  }
  auto channel = credentials->NewChannel(absl::GetFlag(FLAGS_target), args);
  if (api == "openai") {
    if (!ConnectTcp(absl::GetFlag(FLAGS_target)).valid()) {
      std::fprintf(stderr, "loadgen: cannot reach %s\n", absl::GetFlag(FLAGS_target).c_str());
      return 1;
    }
  } else if (!channel->WaitForConnected(absl::ToChronoTime(absl::Now() + absl::Seconds(10)))) {
    std::fprintf(stderr, "loadgen: cannot reach %s\n", absl::GetFlag(FLAGS_target).c_str());
    return 1;
  }
  // --api=openai with TLS flags: HTTPS.
  std::unique_ptr<TlsContextSource> https;
  std::string https_name;
  if (api == "openai" && tls->enabled()) {
    absl::StatusOr<std::unique_ptr<TlsContextSource>> client =
        TlsContextSource::Create(*tls, TlsRole::kClient);
    if (!client.ok()) {
      std::fprintf(stderr, "loadgen: %s\n", std::string(client.status().message()).c_str());
      return 2;
    }
    https = *std::move(client);
    const std::string target = absl::GetFlag(FLAGS_target);
    https_name = !tls->server_name.empty() ? tls->server_name : target.substr(0, target.rfind(':'));
  }
  Driver driver(channel, api, https.get(), https_name);
  if (const int64_t at = absl::GetFlag(FLAGS_start_at_unix_ms); at > 0) {
    absl::SleepFor(absl::FromUnixMillis(at) - absl::Now());
  }

  absl::Mutex mu;
  std::vector<Sample> samples;
  std::vector<std::thread> threads;
  const absl::Time start = absl::Now();
  uint64_t request_seed = o.seed * 1000003;
  for (const Conversation& c : *workload) {
    absl::SleepFor(start + c.start - absl::Now());
    const uint64_t seed = request_seed++;
    threads.emplace_back([&, seed, conv = &c] {
      ChatHistory chat(o.replies_in_history);
      for (const Turn& t : conv->turns) {
        if (t.think_time > absl::ZeroDuration()) absl::SleepFor(t.think_time);
        const std::string ft = conv->fine_tune < 0 ? "" : fine_tunes[conv->fine_tune];
        Sample s = api == "openai" ? driver.SendHttp(chat.Prompt(t), t.output_tokens, seed, ft)
                                   : driver.Send(chat.Prompt(t), t.output_tokens, seed, ft);
        chat.Reply(s.reply);
        std::vector<int32_t>().swap(s.reply);
        absl::MutexLock lock(&mu);
        samples.push_back(std::move(s));
      }
    });
  }
  for (std::thread& t : threads) t.join();
  absl::Time last_end = start;
  std::vector<double> ttft, tpot, e2e, itl;
  int64_t ok = 0, output_tokens = 0, prompt_tokens = 0, cached_tokens = 0;
  std::map<std::string, int> errors;
  for (const Sample& s : samples) {
    if (!s.ok) {
      ++errors[s.error.substr(0, 120)];
      continue;
    }
    ++ok;
    ttft.push_back(s.ttft_ms);
    if (s.output_tokens > 1) tpot.push_back(s.tpot_ms);
    itl.insert(itl.end(), s.itl_ms.begin(), s.itl_ms.end());
    e2e.push_back(s.e2e_ms);
    output_tokens += s.output_tokens;
    prompt_tokens += s.prompt_tokens;
    cached_tokens += s.cached_tokens;
    last_end = std::max(last_end, s.end);
  }
  const double seconds = std::max(1e-9, absl::ToDoubleSeconds(last_end - start));
  const double hit_rate =
      prompt_tokens == 0 ? 0 : static_cast<double>(cached_tokens) / prompt_tokens;
  const int64_t failed = static_cast<int64_t>(samples.size()) - ok;
  std::string label = absl::GetFlag(FLAGS_label);
  if (label.empty()) label = absl::StrCat(o.kind, "@", absl::GetFlag(FLAGS_target));

  std::string errors_json;
  for (const auto& [e, n] : errors) {
    absl::StrAppend(&errors_json, errors_json.empty() ? "" : ",", "{\"error\":", JsonQuote(e),
                    ",\"count\":", n, "}");
  }
  const std::string json = absl::StrFormat(
      "{\"label\":%s,\"target\":%s,\"api\":\"%s\",\"workload\":\"%s\",\"rate_per_s\":%g,"
      "\"requests\":%d,\"ok\":%d,\"failed\":%d,\"duration_s\":%.3f,\"throughput_rps\":%.3f,"
      "\"output_tokens_per_s\":%.3f,\"prompt_tokens\":%d,\"cached_prompt_tokens\":%d,"
      "\"cache_hit_rate\":%.4f,\"ttft_ms\":%s,\"tpot_ms\":%s,\"itl_ms\":%s,\"e2e_ms\":%s,"
      "\"errors\":[%s]}",
      JsonQuote(label), JsonQuote(absl::GetFlag(FLAGS_target)), api, o.kind, o.rate_per_s,
      samples.size(), ok, failed, seconds, ok / seconds, output_tokens / seconds, prompt_tokens,
      cached_tokens, hit_rate, Stats(ttft, true), Stats(tpot, true), Stats(itl, true),
      Stats(e2e, true), errors_json);
  if (const std::string path = absl::GetFlag(FLAGS_json_out); !path.empty()) {
    std::FILE* f = std::fopen(path.c_str(), "w");
    if (f == nullptr) {
      std::fprintf(stderr, "loadgen: cannot write %s\n", path.c_str());
      return 1;
    }
    std::fprintf(f, "%s\n", json.c_str());
    std::fclose(f);
  }
  if (absl::GetFlag(FLAGS_json)) {
    std::printf("%s\n", json.c_str());
  } else {
    std::printf("%s: %s workload, %zu requests at %g/s (%lld ok, %lld failed) in %.1f s\n",
                label.c_str(), o.kind.c_str(), samples.size(), o.rate_per_s,
                static_cast<long long>(ok), static_cast<long long>(failed), seconds);
    std::printf("            %9s %9s %9s %9s\n", "p50", "p90", "p99", "mean");
    std::printf("TTFT ms     %s\n", Stats(ttft, false).c_str());
    std::printf("TPOT ms     %s\n", Stats(tpot, false).c_str());
    std::printf("ITL ms      %s\n", Stats(itl, false).c_str());
    std::printf("E2E ms      %s\n", Stats(e2e, false).c_str());
    std::printf("throughput  %.2f req/s, %.1f output tok/s; prefix-cache hit rate %.3f\n",
                ok / seconds, output_tokens / seconds, hit_rate);
    for (const auto& [e, n] : errors) std::printf("error x%d: %s\n", n, e.c_str());
  }
  return failed == 0 ? 0 : 1;
}

}  // namespace
}  // namespace strata

int main(int argc, char** argv) {
  strata::InitProgram(argc, argv,
                      "loadgen --target HOST:PORT [--workload ...]: see bench/loadgen.cc");
  return strata::Main();
}
