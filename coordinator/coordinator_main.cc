// strata-coordinator: the cluster's front door. Serves strata.v1.Serving and strata.v1.Admin,
// routes requests to workers by where their prompt's KV blocks live, and fails requests over when a
// worker dies. On SIGINT or SIGTERM it stops taking calls, lets in-flight ones finish for up to
// --shutdown_grace_s, and exits.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/random/random.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/grpc_server.h"
#include "common/init.h"
#include "common/log.h"
#include "common/mapped_file.h"
#include "common/metrics.h"
#include "common/metrics_http.h"
#include "common/process.h"
#include "common/secrets.h"
#include "common/tls.h"
#include "common/tls_flags.h"
#include "common/tls_monitor.h"
#include "common/version.h"
#include "coordinator/coordinator_service.h"
#include "coordinator/discovery.h"
#include "coordinator/openai_gateway.h"
#include "coordinator/peer_sync.h"
#include "coordinator/tool_calls.h"
#include "coordinator/worker_pool.h"

ABSL_FLAG(std::vector<std::string>, model, {},
          "Models to serve, as NAME=DIR (DIR holds the tokenizer.json), comma-separated. NAME "
          "must match the workers' --model_name.");
ABSL_FLAG(std::string, workers, "",
          "Workers: host:port,host:port,... or dns:NAME:PORT (every address NAME resolves to, "
          "re-resolved every --resolve_interval_s: a Kubernetes headless Service).");
ABSL_FLAG(std::string, listen, "127.0.0.1:50051", "host:port to serve on; port 0 picks one.");
ABSL_FLAG(std::string, health_listen, "",
          "host:port of a second, plaintext gRPC port that serves the health service alone (for "
          "probes that cannot speak TLS, such as a kubelet's); empty: none.");
ABSL_FLAG(std::string, port_file, "", "Once serving, write the bound port to this file.");
ABSL_FLAG(std::string, metrics_listen, "",
          "host:port to serve Prometheus metrics on (GET /metrics), e.g. [::]:9090; empty: none.");
ABSL_FLAG(bool, metrics_tls, false,
          "Serve --metrics_listen over TLS (HTTPS) with --tls_cert; no client certificate is "
          "asked for. Off by default: Prometheus' annotation-based scrape configs speak HTTP.");
ABSL_FLAG(bool, http_tls, true,
          "With --tls_cert, serve --http_listen over TLS too (HTTPS, the same certificate); "
          "false: plaintext, for TLS ended at an ingress or proxy in front.");
ABSL_FLAG(std::string, http_listen, "",
          "host:port to serve the OpenAI-compatible HTTP API on (POST /v1/completions and "
          "/v1/chat/completions, GET /v1/models and /v1/models/{model}), e.g. [::]:8000; empty: "
          "none.");
ABSL_FLAG(std::string, cluster_secret_file, "",
          "A file holding the cluster secret, sent with every call to a worker (workers started "
          "with the same --cluster_secret_file answer nothing else). Empty: none. One secret a "
          "line: the first is sent (see --cluster_secret_reload_s).");
ABSL_FLAG(double, cluster_secret_reload_s, 5,
          "Read --cluster_secret_file again this often, so that the secret rotates without a "
          "restart (common/secrets.h); 0: at start only.");
ABSL_FLAG(std::string, access_log, "",
          "Append a JSON line for each Generate call and each HTTP request to this file (opened "
          "again when moved away, as by logrotate), or \"-\" for standard output; empty: none. "
          "Sizes and timings only, never prompts or outputs (coordinator/access_log.h).");
ABSL_FLAG(
    std::string, tenant_header, "",
    "Without --api_keys_file: the HTTP header (and gRPC metadata) in which a trusted proxy in "
    "front names each request's tenant (1 to 128 of [A-Za-z0-9._-]), for fair sharing on "
    "the workers (a tenant is a team or customer, not an end user: each one seen gets its own "
    "series in the workers' metrics); empty: none.");
ABSL_FLAG(std::string, api_keys_file, "",
          "JSON file of tenants and their API keys (coordinator/api_keys.h): the HTTP API then "
          "wants \"Authorization: Bearer KEY\" (gRPC: that \"authorization\" metadata) and "
          "keeps each tenant to its models, its concurrent requests and (by default) its own "
          "prefix cache; the Admin service wants an admin tenant. Empty: no keys asked.");
ABSL_FLAG(double, api_keys_reload_s, 5,
          "How often to read --api_keys_file again (keys added, rotated or revoked take effect "
          "then; a file that does not parse leaves the keys before it); 0: never.");
ABSL_FLAG(int, http_max_connections, strata::OpenAiGatewayOptions{}.max_connections,
          "HTTP connections open at once; when full, a connection idle between requests is "
          "closed for a new one, else the new one is refused (503).");
ABSL_FLAG(std::string, chat_format, "auto",
          "How /v1/chat/completions writes out a conversation: auto (each model's own Jinja chat "
          "template from tokenizer_config.json or chat_template.jinja; one beyond Strata's Jinja "
          "subset falls back to the llama3 or chatml format its markers name), or llama3, chatml "
          "or none for every model.");
ABSL_FLAG(std::string, tool_call_format, "auto",
          "How the models write tool calls, for the chat API's \"tools\": auto (each model's "
          "own, from the markers its chat template writes), or hermes, llama3_json, mistral, "
          "mistral_args, pythonic, qwen3_coder, deepseek, deepseek_v31, minimax, phi4_mini, "
          "internlm2 or none for every model.");
ABSL_FLAG(std::string, reasoning_format, "auto",
          "Whether the chat API answers the models' reasoning apart from their answers "
          "(reasoning_content): auto (think for a model whose chat template writes </think>), or "
          "think or none for every model.");
ABSL_FLAG(double, resolve_interval_s, 5, "How often to re-resolve workers and refresh their info.");
ABSL_FLAG(int64_t, max_inflight_requests, 1024,
          "Generate calls accepted at once; beyond it Generate fails RESOURCE_EXHAUSTED.");
ABSL_FLAG(int, max_attempts, 4, "Workers tried per request (failover), counting the first.");
ABSL_FLAG(std::string, routing, "kv", "kv (prefix-cache-aware cost) or round_robin (baseline).");
ABSL_FLAG(double, decode_weight, 1.0, "Routing cost of one decoding sequence, in prefill blocks.");
ABSL_FLAG(double, cold_fine_tune_blocks, 4.0,
          "Routing cost, in prefill blocks, of sending a fine-tune's request to a worker that does "
          "not hold its delta. Raise it where loading a delta takes long (large models on GPUs): "
          "`stratactl simulate --fine-tunes N --cold-fine-tune-blocks B` shows the effect.");
ABSL_FLAG(double, kv_fetch_weight, 0.9,
          "Routing credit, per block, for a prompt's KV blocks that a worker can copy from another "
          "worker holding them (its device or host tier; its disk tier's at the disk hit's "
          "weight) instead of computing them: the request "
          "then names that worker (SubmitRequest.kv_source_address). 1 counts a copied block as "
          "one in the worker's own device cache; 0 turns copies off.");
ABSL_FLAG(int64_t, kv_fetch_min_blocks, 2, "Fewest blocks worth copying from another worker.");
ABSL_FLAG(int64_t, disaggregate_min_uncached_tokens, 512,
          "Disaggregated serving (a model with workers of --role=prefill and of --role=decode or "
          "mixed): a new request whose prompt has at least this many tokens that the decode worker "
          "it would go to neither holds nor can copy is computed on a prefill worker, with its "
          "first token, and continued on a decode worker that copies the prompt's KV blocks; "
          "shorter or mostly cached prompts go straight to a decode worker.");
ABSL_FLAG(int64_t, disaggregate_max_prefill_queue_tokens, 0,
          "Disaggregated serving: a prompt goes to a decode worker whole instead when the prefill "
          "worker it would go to has more than this many prompt tokens queued (its load report's "
          "and this coordinator's own count), so that a backed-up prefill pool does not hold "
          "first tokens while decode workers could compute them. 0: no limit.");
ABSL_FLAG(double, shutdown_grace_s, 10, "On SIGTERM, how long in-flight requests may finish.");
ABSL_FLAG(int64_t, shutdown_delay_s, 0,
          "On SIGTERM, how long to keep accepting calls while reporting NOT_SERVING before "
          "closing the listener (time for load balancers to drop this replica).");
ABSL_FLAG(std::string, peers, "",
          "The other coordinators of the cluster, for tenants' limits across all of them (with "
          "--api_keys_file and --cluster_secret_file): host:port,host:port,... or dns:NAME:PORT "
          "(a headless Service of the coordinators; this one is skipped when it is among them). "
          "Empty: each coordinator holds tenants to their limits alone.");
ABSL_FLAG(double, peer_sync_interval_s, 0.5,
          "How often to ask each --peers coordinator for its tenants' use. Between two answers a "
          "tenant can go past a limit by what it starts in that time through other coordinators.");
ABSL_FLAG(std::string, instance_id, "",
          "Prefix of worker-side request ids; default: coord-<random hex> (must differ between "
          "coordinator replicas sharing workers).");

namespace strata {
namespace {

// A flag that names one format for every model, or "auto" (*out left empty: each model's own).
// False, logged with the names `from_name` takes, for any other value.
template <typename T>
bool NamedOrAuto(const char* flag, const std::string& value,
                 absl::StatusOr<T> (*from_name)(absl::string_view), std::optional<T>* out) {
  if (value == "auto") return true;
  absl::StatusOr<T> named = from_name(value);
  if (!named.ok()) {
    LOG(ERROR) << "--" << flag << ": " << named.status().message() << " (or auto)";
    return false;
  }
  *out = *named;
  return true;
}

int Main() {
  absl::StatusOr<std::unique_ptr<ModelRegistry>> models =
      ModelRegistry::Load(absl::GetFlag(FLAGS_model));
  if (!models.ok()) {
    LOG(ERROR) << models.status();
    return 2;
  }
  absl::StatusOr<WorkerTargets> targets = ParseWorkerTargets(absl::GetFlag(FLAGS_workers));
  if (!targets.ok()) {
    LOG(ERROR) << targets.status();
    return 2;
  }
  if (absl::GetFlag(FLAGS_max_inflight_requests) < 1 || absl::GetFlag(FLAGS_max_attempts) < 1) {
    LOG(ERROR) << "--max_inflight_requests and --max_attempts must be at least 1";
    return 2;
  }
  if (!(absl::GetFlag(FLAGS_resolve_interval_s) > 0)) {
    LOG(ERROR) << "--resolve_interval_s must be positive";
    return 2;
  }
  absl::StatusOr<TlsOptions> tls = TlsOptionsFromFlags(TlsClientAuth::kNone);
  absl::StatusOr<GrpcCredentials> credentials =
      tls.ok() ? GrpcCredentials::Load(*tls) : tls.status();
  if (!credentials.ok()) {
    LOG(ERROR) << credentials.status().message();
    return 2;
  }
  if (credentials->tls() && tls->cert_file.empty()) {
    if (tls->client_auth != TlsClientAuth::kNone) {
      LOG(ERROR) << "--tls_client_auth needs --tls_cert: without a certificate the API is served "
                    "in plaintext";
      return 2;
    }
    LOG(INFO) << "TLS to workers and peers (verified by --tls_ca " << tls->ca_file
              << ", without a client certificate: workers must not require one); the API is "
                 "served in plaintext without --tls_cert";
  }
  WorkerPoolOptions po;
  po.targets = *targets;
  po.credentials = *credentials;
  po.resolve_interval = absl::Seconds(absl::GetFlag(FLAGS_resolve_interval_s));
  // Declared before the servers that read it, so that it outlives them.
  absl::StatusOr<std::unique_ptr<ClusterSecret>> cluster_secret = OpenClusterSecretFlag(
      absl::GetFlag(FLAGS_cluster_secret_file), absl::GetFlag(FLAGS_cluster_secret_reload_s));
  if (!cluster_secret.ok()) {
    LOG(ERROR) << cluster_secret.status();
    return 2;
  }
  po.cluster_secret = cluster_secret->get();
  po.router.decode_weight = absl::GetFlag(FLAGS_decode_weight);
  po.router.cold_fine_tune_blocks = absl::GetFlag(FLAGS_cold_fine_tune_blocks);
  po.router.fetch_weight = absl::GetFlag(FLAGS_kv_fetch_weight);
  po.router.fetch_min_blocks = absl::GetFlag(FLAGS_kv_fetch_min_blocks);
  if (po.router.fetch_weight > 1 || po.router.fetch_min_blocks < 1) {
    LOG(ERROR) << "--kv_fetch_weight must be in [0, 1] and --kv_fetch_min_blocks positive";
    return 2;
  }
  po.disaggregate_min_uncached_tokens = absl::GetFlag(FLAGS_disaggregate_min_uncached_tokens);
  po.disaggregate_max_prefill_queue_tokens =
      absl::GetFlag(FLAGS_disaggregate_max_prefill_queue_tokens);
  if (po.disaggregate_max_prefill_queue_tokens < 0) {
    LOG(ERROR) << "--disaggregate_max_prefill_queue_tokens must be 0 or more";
    return 2;
  }
  if (po.disaggregate_min_uncached_tokens < 0) {
    LOG(ERROR) << "--disaggregate_min_uncached_tokens must be 0 or more, not "
               << po.disaggregate_min_uncached_tokens;
    return 2;
  }
  // A negative cost would send requests toward the workers that must load a delta or that are
  // busiest.
  for (const auto& [name, v] :
       {std::pair<const char*, double>{"decode_weight", po.router.decode_weight},
        {"cold_fine_tune_blocks", po.router.cold_fine_tune_blocks},
        {"kv_fetch_weight", po.router.fetch_weight}}) {
    if (!(v >= 0) || !std::isfinite(v)) {
      LOG(ERROR) << "--" << name << " must be a finite number, 0 or more, not " << v;
      return 2;
    }
  }
  // Every model's chat, tool-call and reasoning format when named (else each model's own, found
  // below).
  std::optional<ChatFormat> chat_format;
  std::optional<ToolCallFormat> tool_call_format;
  std::optional<ReasoningFormat> reasoning_format;
  if (!NamedOrAuto("chat_format", absl::GetFlag(FLAGS_chat_format), ChatFormatFromName,
                   &chat_format) ||
      !NamedOrAuto("tool_call_format", absl::GetFlag(FLAGS_tool_call_format),
                   ToolCallFormatFromName, &tool_call_format) ||
      !NamedOrAuto("reasoning_format", absl::GetFlag(FLAGS_reasoning_format),
                   ReasoningFormatFromName, &reasoning_format)) {
    return 2;
  }
  const std::string routing = absl::GetFlag(FLAGS_routing);
  if (routing == "round_robin") {
    po.router.round_robin = true;
  } else if (routing != "kv") {
    LOG(ERROR) << "--routing must be kv or round_robin, not " << routing;
    return 2;
  }
  WorkerPool pool(po);
  pool.Start();

  if (absl::GetFlag(FLAGS_shutdown_delay_s) < 0) {
    LOG(ERROR) << "--shutdown_delay_s must be 0 or more, not "
               << absl::GetFlag(FLAGS_shutdown_delay_s);
    return 1;
  }
  CoordinatorOptions co;
  co.max_inflight_requests = absl::GetFlag(FLAGS_max_inflight_requests);
  co.max_attempts = absl::GetFlag(FLAGS_max_attempts);

  co.instance_id = absl::GetFlag(FLAGS_instance_id);
  if (co.instance_id.empty()) {
    absl::BitGen gen;
    co.instance_id = absl::StrFormat("coord-%08x", absl::Uniform<uint32_t>(gen));
  }
  if (std::string header = absl::AsciiStrToLower(absl::GetFlag(FLAGS_tenant_header));
      !header.empty()) {
    if (!absl::GetFlag(FLAGS_api_keys_file).empty()) {
      LOG(ERROR) << "--tenant_header with --api_keys_file: the keys name the tenants";
      return 2;
    }
    // Not a name that HTTP, gRPC or Strata itself uses (gRPC sets some of these on every call,
    // which would then name a tenant, or fail every call).
    bool valid =
        header.find_first_not_of("abcdefghijklmnopqrstuvwxyz0123456789-_.") == std::string::npos &&
        !absl::StartsWith(header, "grpc-") && !absl::StartsWith(header, "x-strata-") &&
        !absl::EndsWith(header, "-bin") && !absl::StartsWith(header, ":");
    for (const char* reserved :
         {"authorization", "host", "content-type", "content-length", "te", "user-agent",
          "transfer-encoding", "connection", "keep-alive", "expect", "upgrade", "proxy-connection",
          "cookie", "accept", "accept-encoding"}) {
      valid = valid && header != reserved;
    }
    if (!valid) {
      LOG(ERROR) << "--tenant_header must be a header name of [a-z0-9-_.] that HTTP, gRPC and "
                    "Strata do not use themselves (not grpc-*, x-strata-*, *-bin, "
                    "authorization, user-agent, content-type, content-length, ...; "
                    "x-tenant-id, say), not \""
                 << header << "\"";
      return 2;
    }
    co.tenant_header = header;
  }
  std::shared_ptr<ApiKeyStore> api_keys;
  if (const std::string keys = absl::GetFlag(FLAGS_api_keys_file); !keys.empty()) {
    absl::StatusOr<std::unique_ptr<ApiKeyStore>> loaded = ApiKeyStore::Open(keys);
    if (!loaded.ok()) {
      LOG(ERROR) << "--api_keys_file: " << loaded.status();
      return 1;
    }
    api_keys = *std::move(loaded);
    const double reload_s = absl::GetFlag(FLAGS_api_keys_reload_s);
    if (reload_s > 0) api_keys->Watch(absl::Seconds(reload_s));
    co.api_keys = api_keys;
    LOG(INFO) << "API keys of " << api_keys->Current()->tenants().size() << " tenant(s) from "
              << keys << ": asked for over HTTP and gRPC"
              << (reload_s > 0 ? absl::StrCat(", the file read again every ", reload_s, " s") : "");
  }
  // The gateway's in-process calls always carry a secret of its own, so that the service can
  // tell them apart (and, with API keys, takes the gateway's checks for its own).
  if (co.gateway_secret.empty()) co.gateway_secret = NewSecret();
  // Declared before the service and the endpoint, so it outlives both.
  MetricsRegistry metrics;
  const std::string metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  if (!metrics_listen.empty()) co.metrics = &metrics;
  // What gRPC serves from the TLS files, watched (their expiry, and whether they still pass).
  TlsFileMonitor tls_monitor(*tls, co.metrics);
  std::unique_ptr<AccessLog> access_log;
  if (const std::string path = absl::GetFlag(FLAGS_access_log); !path.empty()) {
    AccessLogOptions ao;
    if (co.metrics != nullptr) {
      const char* help =
          "Access log records, by what became of them (dropped: the writer fell behind, or a "
          "write failed).";
      ao.written_counter = metrics.GetCounter("strata_coordinator_access_log_records_total", help,
                                              {{"outcome", "written"}});
      ao.dropped_counter = metrics.GetCounter("strata_coordinator_access_log_records_total", help,
                                              {{"outcome", "dropped"}});
    }
    absl::StatusOr<std::unique_ptr<AccessLog>> opened = AccessLog::Open(path, ao);
    if (!opened.ok()) {
      LOG(ERROR) << "--access_log: " << opened.status();
      return 2;
    }
    access_log = *std::move(opened);
    co.access_log = access_log.get();
  }
  co.cluster_secret = cluster_secret->get();
  {
    absl::BitGen gen;
    co.coordinator_id =
        absl::StrFormat("%016x%016x", absl::Uniform<uint64_t>(gen), absl::Uniform<uint64_t>(gen));
  }
  CoordinatorService service(&pool, models->get(), co);
  GrpcServerOptions so;
  so.listen_address = absl::GetFlag(FLAGS_listen);
  so.health_listen_address = absl::GetFlag(FLAGS_health_listen);
  if (!tls->cert_file.empty()) so.credentials = *credentials->ServerCredentials();
  absl::StatusOr<std::unique_ptr<GrpcServer>> server =
      GrpcServer::Start(so, {{static_cast<v1::Serving::CallbackService*>(&service),
                              std::string(v1::Serving::service_full_name())},
                             {static_cast<v1::Admin::CallbackService*>(&service),
                              std::string(v1::Admin::service_full_name())}});
  if (!server.ok()) {
    LOG(ERROR) << server.status();
    return 1;
  }
  // Declared after the service: it stops (and its gauges stop calling into the service) first.
  absl::StatusOr<std::unique_ptr<TlsAcceptor>> metrics_tls =
      MetricsTls(absl::GetFlag(FLAGS_metrics_tls), *tls);
  if (!metrics_tls.ok()) {
    LOG(ERROR) << metrics_tls.status().message();
    return 1;
  }
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> metrics_server =
      StartMetricsEndpoint(metrics_listen, &metrics, metrics_tls->get());
  if (!metrics_server.ok()) {
    LOG(ERROR) << metrics_server.status();
    return 1;
  }
  // The OpenAI-compatible API, through the server's own services in process. Started before the
  // port file is written, so that whoever waits for it finds both ready.
  // HTTPS with the gRPC API's certificate (declared before the gateway, which uses it).
  std::unique_ptr<TlsAcceptor> http_tls;
  if (!tls->cert_file.empty() && absl::GetFlag(FLAGS_http_tls) &&
      !absl::GetFlag(FLAGS_http_listen).empty()) {
    absl::StatusOr<std::unique_ptr<TlsAcceptor>> acceptor = TlsAcceptor::Create(*tls);
    if (!acceptor.ok()) {
      LOG(ERROR) << acceptor.status().message();
      return 2;
    }
    http_tls = *std::move(acceptor);
  }
  OpenAiGatewayOptions http_options;
  http_options.tls = http_tls.get();
  http_options.max_connections = std::max(1, absl::GetFlag(FLAGS_http_max_connections));
  http_options.api_keys = api_keys;
  http_options.gateway_secret = co.gateway_secret;
  http_options.tenant_header = co.tenant_header;
  http_options.access_log = co.access_log;
  http_options.metrics = co.metrics;
  for (const std::string& spec : absl::GetFlag(FLAGS_model)) {
    if (absl::GetFlag(FLAGS_http_listen).empty()) break;
    const size_t eq = spec.find('=');
    if (eq == std::string::npos) continue;  // ModelRegistry::Load refused it already
    const std::string name = spec.substr(0, eq), dir = spec.substr(eq + 1);
    std::string note;
    ChatTemplate& chat = http_options.chat_templates[name] =
        LoadChatTemplate(dir, chat_format, *(*models)->Find(name), &note);
    if (tool_call_format.has_value()) chat.tool_format = *tool_call_format;
    if (reasoning_format.has_value()) chat.reasoning_format = *reasoning_format;
    LOG(INFO) << "model " << name << ": chat format " << ChatFormatName(chat.format) << " (" << note
              << ")"
              << (chat.format == ChatFormat::kTemplate
                      ? absl::StrCat(", tool calls ", ToolCallFormatName(chat.tool_format),
                                     chat.takes_tools ? "" : " (its template takes no tools)",
                                     ", reasoning ", ReasoningFormatName(chat.reasoning_format))
                      : "");
  }
  absl::StatusOr<std::unique_ptr<OpenAiGateway>> http = StartOpenAiGateway(
      absl::GetFlag(FLAGS_http_listen), (*server)->InProcessChannel(), http_options);
  if (!http.ok()) {
    LOG(ERROR) << http.status();
    return 1;
  }
  // Tenants' limits across the cluster's coordinators. Declared after the service it reads the
  // keys of, so it stops first.
  // (A manifest may set --peers whether or not keys are on: without keys there is nothing to
  // share, and without the cluster secret peers could not ask each other.)
  std::unique_ptr<PeerSync> peer_sync;
  if (const std::string peers = absl::GetFlag(FLAGS_peers); !peers.empty()) {
    absl::StatusOr<WorkerTargets> targets = ParseWorkerTargets(peers);
    if (!targets.ok()) {
      LOG(ERROR) << "--peers: " << targets.status().message();
      return 2;
    }
    const double interval = absl::GetFlag(FLAGS_peer_sync_interval_s);
    if (!(interval >= 0.05 && interval <= 60)) {
      LOG(ERROR) << "--peer_sync_interval_s must be in [0.05, 60], not " << interval;
      return 2;
    }
    if (api_keys == nullptr) {
      LOG(INFO) << "--peers: no API keys, so no tenants' limits to share";
    } else if (co.cluster_secret == nullptr) {
      LOG(WARNING) << "--peers without --cluster_secret_file: peers cannot ask each other for "
                      "their tenants' use, so each coordinator holds tenants to their limits "
                      "alone";
    } else {
      PeerSync::Options ps;
      ps.peers = *std::move(targets);
      ps.interval = absl::Seconds(interval);
      ps.self_id = co.coordinator_id;
      ps.secret = co.cluster_secret;
      ps.metrics = co.metrics;
      ps.credentials = *credentials;
      peer_sync = std::make_unique<PeerSync>(api_keys, std::move(ps));
      peer_sync->Start();
      LOG(INFO) << "tenants' limits shared with the coordinators at " << peers << ", asked every "
                << interval << " s";
    }
  }
  if (const std::string pf = absl::GetFlag(FLAGS_port_file); !pf.empty()) {
    if (absl::Status s = WriteFileAtomically(pf, absl::StrCat((*server)->port(), "\n")); !s.ok()) {
      LOG(ERROR) << s;
      return 1;
    }
  }
  LOG(INFO) << "strata-coordinator " << kStrataVersion << " serving models "
            << absl::StrJoin((*models)->Names(), ", ") << " on " << (*server)->address()
            << "; workers: " << absl::GetFlag(FLAGS_workers) << "; routing: " << routing;

  const int sig = WaitForTerminationSignal();
  LOG(INFO) << "signal " << sig << ": shutting down (" << service.num_inflight()
            << " requests in flight)";
  (*server)->SetServing(false);
  if (*http != nullptr) (*http)->SetServing(false);
  // Still listening, NOT_SERVING: load balancers (a Kubernetes Service's endpoints) drop this
  // replica before it refuses connections. A second signal cuts the wait short.
  if (const int64_t delay = absl::GetFlag(FLAGS_shutdown_delay_s); delay > 0) {
    LOG(INFO) << "not serving; closing the listener in " << delay << " s";
    WaitForTerminationSignal(absl::Seconds(delay));
  }
  // New HTTP connections are refused; those accepted finish within the grace period first, since
  // the in-process channel they use closes as soon as the server shuts down. Then the gRPC
  // server gets what is left of the grace period, and the gateway goes.
  const absl::Time grace_end = absl::Now() + absl::Seconds(absl::GetFlag(FLAGS_shutdown_grace_s));
  if (*http != nullptr) {
    (*http)->StopAccepting();
    if (!(*http)->WaitIdle(grace_end)) {
      LOG(WARNING) << "HTTP requests still running at the end of the grace period: cancelling";
    }
  }
  (*server)->Shutdown(std::max(absl::ZeroDuration(), grace_end - absl::Now()));
  http->reset();
  pool.Stop();
  LOG(INFO) << "strata-coordinator stopped";
  return 0;
}

}  // namespace
}  // namespace strata

int main(int argc, char** argv) {
  strata::BlockTerminationSignals();
  strata::InitProgram(argc, argv,
                      "strata-coordinator --model NAME=DIR --workers host:port,... [--listen "
                      "HOST:PORT]: routes Strata requests to workers.");
  return strata::Main();
}
