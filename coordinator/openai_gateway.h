// OpenAiGateway: the OpenAI-compatible completions API over HTTP/1.1, in front of a coordinator's
// Serving service (strata-coordinator --http_listen), so that OpenAI clients, curl and the tools
// built on them can use a Strata cluster as they are.
//
//   GET  /v1/models            the base models and their fine-tunes (ListModels)
//   GET  /v1/models/{model}    one of them (404 when not listed)
//   POST /v1/completions       one completion (Generate); "stream": true sends server-sent events
//   POST /v1/chat/completions  the same for a conversation, written out in the model's ChatFormat;
//                              with "tools", the calls the model writes come back as tool_calls
//   GET  /health               200 while the coordinator serves
//
// A completion request is translated into one GenerateRequest (CompletionFromJson) and sent through
// the in-process channel, so every check, limit, metric and failover of the gRPC path applies.
// Errors answer with the OpenAI error object ({"error": {"message", "type", "param", "code"}}) and
// the HTTP status of the gRPC code (HttpStatusOf): 400 for a bad field (the message names it), 404
// for an unknown model or fine-tune, 429 when the coordinator's queue is full, 503 with no worker,
// 504 past a deadline; "param" is the request's field at fault, the coordinator's refusals too
// (their gRPC field names as the request's: sampling.top_p -> top_p, fine_tune_id -> model, text
// -> prompt or messages). A streamed call that fails after its first event ends with an error
// event.
// A chat completion for a model without a known chat format is refused (400, naming "model").
//
// Fine-tunes: "model" may name a fine-tune that ListModels lists under a base model (as vLLM names
// its adapters), or the request may give the base model and Strata's own "fine_tune_id". Other
// extensions to the OpenAI request: top_k, min_p, repetition_penalty, min_tokens, ignore_eos,
// stop_token_ids, skip_special_tokens, cache_salt (a tenant's cache isolation), priority,
// request_id.
//
// A thread per connection, at most max_connections at once (when full, an idle kept-alive
// connection is closed for a new one, else 503). Connections stay open between requests (see
// Serve). A client that disconnects cancels its generation. Each request must arrive within
// read_timeout; the response streams for as long as the generation runs.
#ifndef STRATA_COORDINATOR_OPENAI_GATEWAY_H_
#define STRATA_COORDINATOR_OPENAI_GATEWAY_H_

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/metrics.h"
#include "common/tls_stream.h"
#include "common/unique_fd.h"
#include "coordinator/access_log.h"
#include "coordinator/api_keys.h"
#include "coordinator/jinja.h"
#include "coordinator/tool_calls.h"
#include "grpcpp/channel.h"
#include "grpcpp/client_context.h"
#include "proto/strata/v1/serving.grpc.pb.h"
#include "tokenizer/tokenizer.h"

namespace strata {

// One message of a chat: system (a developer message becomes one), user, assistant or tool.
struct ChatMessage {
  ChatMessage() = default;
  ChatMessage(std::string role, std::optional<std::string> content)
      : role(std::move(role)), content(std::move(content)) {}

  std::string role;
  std::optional<std::string> content;  // null: an assistant turn that only called tools
  // An assistant turn's calls (their arguments as the client sent them, JSON text).
  std::vector<ToolCall> tool_calls;
  std::string tool_call_id;  // a tool's answer: the call it answers
  std::string name;          // the participant's or the tool's name, when given
};

// What the chat request lets the model do with its tools (OpenAI's tool_choice).
enum class ToolChoice {
  kAuto,      // call them or answer in text (the default with tools)
  kNone,      // answer in text (the tools are still shown to the model)
  kRequired,  // call at least one
  kNamed,     // call the named one
};

// A /v1/completions or /v1/chat/completions request as Generate takes it.
struct CompletionCall {
  v1::GenerateRequest request;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage: a last event with usage
  int n = 1;                   // choices per prompt: one generation each, in parallel
  // Completions given several prompts (an array of strings or of token-id arrays): the second
  // and later, each as a GenerateRequest holding only its prompt; `request` holds the first.
  // Their choices follow the first's, n each.
  std::vector<v1::GenerateRequest> more_prompts;
  // Completions: the prompt's text (and with logprobs, its tokens' log-probabilities, the first
  // null) comes before each choice's; with max_tokens 0 (score_only) nothing else does: the
  // request generates one token, which the answer leaves out.
  bool echo = false;
  bool score_only = false;
  // Chat: the messages, rendered into request.text by the model's chat format; no max_tokens
  // given (until the turn ends or the context is full).
  std::vector<ChatMessage> messages;
  bool default_max_tokens = false;
  // Chat: the tools as given ({"type": "function", "function": {"name", "description",
  // "parameters"}}) for the template, their names, and tool_choice (the function's name for
  // kNamed). parallel_tool_calls is checked and not enforced: every call the model writes comes
  // back (as vLLM does), since dropping one would lose what the model wrote.
  jinja::List tools;
  std::vector<std::string> tool_names;
  // Each tool's parameters' JSON schema as JSON text ("" when it has none), for a forced call's
  // grammar, and parallel_tool_calls (a forced call in a list format makes one call unless true).
  std::vector<std::string> tool_parameters;
  bool parallel_tool_calls = true;
  ToolChoice tool_choice = ToolChoice::kAuto;
  std::string tool_choice_name;
  // Chat: chat_template_kwargs (more variables for the template: enable_thinking, say),
  // add_generation_prompt and continue_final_message (vLLM's: the answer continues the last,
  // assistant, message).
  jinja::Dict template_kwargs;
  bool add_generation_prompt = true;
  bool continue_final_message = false;
  // Chat with a model that thinks: whether its reasoning is answered (reasoning_content).
  bool include_reasoning = true;
};

// How a model's chat turns are written out: by the model's own Jinja chat template (kTemplate:
// tokenizer_config.json's chat_template or chat_template.jinja, run by coordinator/jinja.h), or
// by a built-in format: Llama 3's header tokens, ChatML (Qwen and many others). Chosen per model
// by LoadChatTemplate, or named for every model with strata-coordinator --chat_format.
enum class ChatFormat { kNone, kLlama3, kChatml, kTemplate };
ChatFormat DetectChatFormat(absl::string_view chat_template);
absl::StatusOr<ChatFormat> ChatFormatFromName(absl::string_view name);
const char* ChatFormatName(ChatFormat format);
// The prompt for `messages`, ending with the assistant's turn opened (no BOS: the tokenizer adds
// it), and the token that ends a turn. The built-in formats write text turns only (a tool's
// answer or an assistant's calls need the model's own template).
std::string RenderChat(ChatFormat format, const std::vector<ChatMessage>& messages,
                       bool add_generation_prompt = true);
const char* ChatEndOfTurn(ChatFormat format);

// Parses a /v1/chat/completions body: messages (system / developer / user / assistant / tool, text
// content, an assistant's tool_calls), the sampling fields of CompletionFromJson,
// max_completion_tokens, logprobs (true) with top_logprobs, n, tools, tool_choice,
// parallel_tool_calls, chat_template_kwargs, add_generation_prompt, continue_final_message.
absl::StatusOr<CompletionCall> ChatFromJson(absl::string_view body, std::string* param);

// Parses a /v1/completions body (one prompt or several, n, echo, logit_bias). INVALID_ARGUMENT
// naming the field for a malformed body, a field of the wrong type, or what this endpoint does not
// do (best_of, suffix); the status's message is the client's, `param` (when not null) the field.
absl::StatusOr<CompletionCall> CompletionFromJson(absl::string_view body, std::string* param);

// A forced call (tool_choice required or named) kept to a well-formed call of `call`'s tools in
// `format` (ForcedToolCallGrammar): sets call.request's structured output, continuing the forced
// prefix (for Qwen3-Coder's XML and pythonic calls, a GBNF grammar). A tool whose parameters'
// schema cannot be enforced has them taken as any object; a call no grammar keeps (more tools than
// a matcher follows at once) stays free text, with no structured output set.
void ConstrainForcedCall(ToolCallFormat format, CompletionCall* call);

// Each of a chat request's tools' parameters' JSON Schema types (`type`, one or a list, and
// anyOf / oneOf entries'): how qwen3_coder's raw parameter values are read.
ToolParamTypes ParamTypesOf(const jinja::List& tools);

// The HTTP status for a gRPC status code.
int HttpStatusOf(grpc::StatusCode code);

// The OpenAI error object for an HTTP status: {"error": {"message", "type", "param", "code"}}.
std::string OpenAiErrorJson(int http_status, absl::string_view message, absl::string_view param);

// "stop" (EOS, a stop token or string), "length" (max_tokens or the context), or null while the
// generation goes on.
const char* OpenAiFinishReason(v1::FinishReason reason);

// A base model's chat format, and the token that ends a turn when its vocabulary has the format's
// marker as one token (else the marker is a stop string).
struct ChatTemplate {
  ChatFormat format = ChatFormat::kNone;
  std::optional<int32_t> end_of_turn;
  // kTemplate: the parsed template, the special tokens' texts it is given (bos_token, eos_token),
  // whether a leading bos_token is cut from its output (the tokenizer adds the BOS itself), and
  // the marker that ends an assistant turn (empty: the turn ends at the model's EOS).
  std::shared_ptr<const jinja::Template> jinja;
  std::string bos_token, eos_token;
  bool strip_bos = false;
  std::string end_marker;
  // kTemplate: whether the template reads "tools", and how the model writes its calls (detected
  // from the template, or named by strata-coordinator --tool_call_format).
  bool takes_tools = false;
  ToolCallFormat tool_format = ToolCallFormat::kNone;
  // kTemplate: whether the model writes reasoning before its answer (detected from the template,
  // or named by strata-coordinator --reasoning_format).
  ReasoningFormat reasoning_format = ReasoningFormat::kNone;
};

// The chat template text of a tokenizer_config.json (its "chat_template", or the "default" one of
// a list of named templates), if any.
std::optional<std::string> ChatTemplateSource(absl::string_view tokenizer_config_json);

// The chat template of the model in `dir` for the gateway. `forced`: --chat_format's choice for
// every model (nullopt: auto). In auto, the model's Jinja template when it parses and renders a
// one-message conversation, else a built-in format its markers name, else kNone; `tokenizer`
// (not null) gives the end-of-turn token and whether it adds a BOS itself. `*note` says what was
// chosen and why (for the log).
ChatTemplate LoadChatTemplate(const std::string& dir, std::optional<ChatFormat> forced,
                              const Tokenizer& tokenizer, std::string* note);

// What a conversation is written out with, besides its messages.
struct ChatRenderOptions {
  const jinja::List* tools = nullptr;            // the request's tools (null or empty: None)
  const jinja::Dict* template_kwargs = nullptr;  // more variables for the template
  bool add_generation_prompt = true;             // open the assistant's turn
  // End with the final (assistant) message's content, its turn left open for the model to go on.
  bool continue_final_message = false;
};

// The variables Strata gives every chat template itself (chat_template_kwargs may not set them).
bool IsChatTemplateVariable(absl::string_view name);

// The prompt for `messages` in `chat`'s format (see RenderChat); INVALID_ARGUMENT with the
// template's message when its template refuses them (roles that do not alternate, say), or when
// the final message cannot be continued (not an assistant's, or the template does not write its
// content). An assistant's call arguments reach the template as a mapping where they are a JSON
// object (as transformers' templates expect), else as the text.
absl::StatusOr<std::string> RenderChatTemplate(const ChatTemplate& chat,
                                               const std::vector<ChatMessage>& messages,
                                               const ChatRenderOptions& options = {});

struct OpenAiGatewayOptions {
  // By base model; a model missing here is not served (404), one with kNone refuses chats (400).
  std::map<std::string, ChatTemplate> chat_templates;
  int max_connections = 256;
  absl::Duration read_timeout = absl::Seconds(30);
  // How long a kept-alive connection may sit idle between requests (uvicorn's default: each idle
  // connection holds one of max_connections).
  absl::Duration keep_alive_timeout = absl::Seconds(5);
  int64_t max_body_bytes = int64_t{8} << 20;
  // When set (--api_keys_file), every endpoint but /health wants "Authorization: Bearer KEY" of
  // one of its tenants (401 otherwise): /v1/models lists what the tenant may use, a completion
  // for another model is 404 as for one that does not exist, past the tenant's
  // max_concurrent_requests it is 429, and an isolated tenant's requests use its own prefix cache
  // (coordinator/api_keys.h).
  std::shared_ptr<ApiKeyStore> api_keys;
  // Where the gateway counts, with API keys, each tenant's requests, refusals and requests
  // running, and the calls without a valid key (null: not counted).
  MetricsRegistry* metrics = nullptr;
  // Sent with every call into the coordinator's services (kGatewaySecretMetadata), which then
  // take the gateway's own checks for theirs (CoordinatorOptions::gateway_secret).
  std::string gateway_secret;
  // Without API keys: the header (lowercase) a trusted proxy names each request's tenant in, sent
  // on as the same gRPC metadata for fair sharing on the workers (CoordinatorOptions::
  // tenant_header); empty: none.
  std::string tenant_header;
  // Where each HTTP request is logged when answered (--access_log), or null. Not owned. Its
  // Generate calls then carry the client's address, the request's id and its traceparent header
  // (beside gateway_secret) into their own records.
  AccessLog* access_log = nullptr;
  // HTTPS: every connection's TLS handshake, then its HTTP over a TlsBridge (common/tls_stream.h);
  // null: plaintext. Not owned; it must outlive the gateway.
  TlsAcceptor* tls = nullptr;
};

class OpenAiGateway {
 public:
  // Listens on `listen` (HOST:PORT; errors name --http_listen) and serves through `serving`, a
  // channel to the coordinator's Serving service.
  static absl::StatusOr<std::unique_ptr<OpenAiGateway>> Start(
      const std::string& listen, std::shared_ptr<grpc::Channel> serving,
      OpenAiGatewayOptions options = {});
  // Stops accepting, cancels the generations in flight and waits for every connection to end.
  ~OpenAiGateway();
  OpenAiGateway(const OpenAiGateway&) = delete;
  OpenAiGateway& operator=(const OpenAiGateway&) = delete;

  int port() const { return port_; }
  // /health answers 503 from now on (load balancers drop this replica), while requests are still
  // taken: for a shutdown's delay before the listener closes.
  void SetServing(bool serving) { serving_.store(serving); }
  // Closes the listener (new connections are refused) and sets /health to 503; connections already
  // accepted go on. For shutdown, before the coordinator's server stops.
  void StopAccepting();
  // Waits until no connection is open, or `deadline`; true when none is. The coordinator's
  // in-process channel closes at once when its server shuts down (no grace for its calls), so
  // shutdown waits here first.
  bool WaitIdle(absl::Time deadline) const;

 private:
  OpenAiGateway(UniqueFd listen_fd, UniqueFd wake_fd, int port,
                std::shared_ptr<grpc::Channel> serving, OpenAiGatewayOptions options);
  void Loop();
  // One connection: requests one after another while both sides keep it alive (HTTP/1.1's
  // default; "Connection: close" or HTTP/1.0 without "keep-alive" ends it after the answer, as
  // does a streamed answer, whose end is the close).
  void Serve(UniqueFd fd);
  // Reads one request (`pending`: bytes received past the one before; `first`: the connection's
  // first, else an idle wait that a stop or the peer's close ends quietly) and answers it. True
  // when the connection stays open for another.
  // `*idle_end`: set when the connection ended waiting for a next request.
  bool ServeRequest(int fd, const std::string& peer, std::string* pending, bool first,
                    bool* idle_end);
  // Waits, idle, for the start of a next request on `fd` into `data`: false at the keep-alive
  // timeout, the peer's close, the gateway no longer accepting, or when the gateway, full, asks
  // an idle connection to make room (shed_fd_).
  bool AwaitNextRequest(int fd, std::string* data);
  // Whether the answer to the request in progress on `fd` may keep the connection open (Reply
  // then says "Connection: keep-alive"); a streamed answer clears it.
  void SetKeepAlive(int fd, bool keep) const;
  bool KeepAlive(int fd) const;
  // The HTTP exchange on `fd` after the request was read.
  // Answers 401 for a call without a valid API key (`why`), and counts it.
  void Unauthenticated(int fd, const absl::Status& why);
  // `authorization`: the Authorization header's value (empty when absent); `proxy_tenant`: the
  // tenant_header's (empty when absent or not asked for).
  void Handle(int fd, const std::string& method, const std::string& path, const std::string& body,
              const std::string& authorization, const std::string& proxy_tenant);
  // Writes a whole response to `fd`, each 64 KiB within kWriteTimeout of the last (WriteAllPaced;
  // or until the gateway stops).
  void Reply(int fd, const std::string& response) const;
  // `tenant`: the caller's, with API keys (null without): only what it may use is listed.
  // `only`: GET /v1/models/{only}, that model alone (404 when it is not listed).
  void Models(int fd, const Tenant* tenant, const std::string& only = "");
  // POST /tokenize ({"model", "prompt", "add_special_tokens", "return_token_strs"}: {"count",
  // "max_model_len", "tokens", "token_strs"}) and /detokenize ({"model", "tokens"}: {"prompt"}),
  // in vLLM's shape, through the Tokenize and Detokenize RPCs.
  void Tokens(int fd, const std::string& body, bool tokenize, const Tenant* tenant);
  // /v1/completions, or with `chat` /v1/chat/completions.
  // `authorization`: the caller's Authorization value, sent on with its tenant's calls (so that
  // the coordinator ends them should a reload revoke the key).
  void Completion(int fd, const std::string& body, bool chat, const Tenant* tenant,
                  const std::string& proxy_tenant, const std::string& authorization);
  // Resolves a fine-tune named as the model (ListModels, cached a few seconds); the model's
  // context length (0: unknown).
  uint32_t ResolveModel(v1::GenerateRequest* request);
  // Whether ResolveModel's list (as it last fetched it) serves the request's model and its
  // fine-tune; that model's fine-tunes into `fine_tunes` (may be null).
  bool Served(const v1::GenerateRequest& request, std::vector<std::string>* fine_tunes);
  // For echo: the prompt's text, the text of its first token (which has no log-probability), and
  // whether the server adds that token itself (a BOS before a text prompt: no characters of the
  // echoed text), the last two only with `want_first_token` (for log-probabilities). Through
  // Tokenize / Detokenize.
  grpc::Status EchoPrompt(const v1::GenerateRequest& request, bool want_first_token,
                          std::string* text, std::string* first_token, bool* first_added);
  // One unary call of the Serving service within `timeout`, registered so that a stop cancels it:
  // `rpc` makes it with the context it is given. UNAVAILABLE when the gateway is stopping.
  template <typename Rpc>
  grpc::Status Unary(absl::Duration timeout, Rpc&& rpc);
  bool Register(grpc::ClientContext* ctx);
  void Unregister(grpc::ClientContext* ctx);

  UniqueFd listen_fd_;
  UniqueFd wake_fd_;            // an eventfd: written to stop the loop and every connection
  UniqueFd stop_accepting_fd_;  // an eventfd: written to stop accepting
  UniqueFd shed_fd_;            // a semaphore eventfd: each token closes one idle connection
  std::atomic<int> idle_{0};    // connections waiting for a next request
  std::atomic<bool> serving_{true};
  std::atomic<int> active_{0};  // connection threads not yet done
  const int port_;
  const OpenAiGatewayOptions options_;
  std::unique_ptr<v1::Serving::Stub> stub_;
  std::thread thread_;

  mutable absl::Mutex keep_mu_;
  mutable std::map<int, bool> keep_alive_ ABSL_GUARDED_BY(keep_mu_);
  // With an access log: the request being answered on each connection.
  struct Exchange {
    absl::Time start;
    std::string id, method, path, peer, tenant, traceparent;
    int status = 0;  // of the answer's head, once written
  };
  mutable std::map<int, Exchange> exchanges_ ABSL_GUARDED_BY(keep_mu_);
  const std::string exchange_prefix_;  // random, per start
  std::atomic<uint64_t> next_exchange_{0};
  // Notes the status of the answer to the request on `fd`: the first one noted counts, unless
  // `replace`. Whether it was noted.
  bool NoteStatus(int fd, int status, bool replace = false) const;
  // The exchange on `fd` (a copy; empty without an access log).
  Exchange ExchangeOf(int fd) const;
  // Logs the exchange on `fd` and forgets it.
  void EndExchange(int fd);
  void LogExchange(const Exchange& x) const;

  absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::set<grpc::ClientContext*> calls_ ABSL_GUARDED_BY(mu_);
  // ListModels' answer and when it was asked.
  std::shared_ptr<const v1::ListModelsResponse> models_ ABSL_GUARDED_BY(mu_);
  absl::Time models_at_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
};

// For strata-coordinator's main: null when `listen` is empty, else the started gateway, its
// address logged.
absl::StatusOr<std::unique_ptr<OpenAiGateway>> StartOpenAiGateway(
    const std::string& listen, std::shared_ptr<grpc::Channel> serving,
    OpenAiGatewayOptions options = {});

}  // namespace strata

#endif  // STRATA_COORDINATOR_OPENAI_GATEWAY_H_
