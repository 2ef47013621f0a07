#include "coordinator/openai_gateway.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <list>
#include <optional>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "common/grpc_status.h"
#include "common/json.h"
#include "common/log.h"
#include "common/mapped_file.h"
#include "common/secrets.h"
#include "common/status_macros.h"
#include "common/tcp.h"
#include "coordinator/serial_writer.h"
#include "grammar/structured_output.h"

namespace strata {
namespace {

constexpr size_t kMaxHeaderBytes = 64 << 10;
constexpr absl::Duration kWriteTimeout = absl::Seconds(30);

// %XX sequences decoded (others kept as they are).
std::string PercentDecoded(absl::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    int v = 0;
    if (s[i] == '%' && i + 2 < s.size() && absl::ascii_isxdigit(s[i + 1]) &&
        absl::ascii_isxdigit(s[i + 2]) && absl::SimpleHexAtoi(s.substr(i + 1, 2), &v)) {
      out.push_back(static_cast<char>(v));
      i += 2;
    } else {
      out.push_back(s[i]);
    }
  }
  return out;
}

// A connection's client as gRPC writes a peer ("ipv4:1.2.3.4:5", "ipv6:[::1]:5"), or empty.
std::string PeerAddress(int fd) {
  sockaddr_storage addr{};
  socklen_t len = sizeof(addr);
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) return "";
  char host[INET6_ADDRSTRLEN] = {};
  if (addr.ss_family == AF_INET) {
    const auto* in = reinterpret_cast<const sockaddr_in*>(&addr);
    if (::inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host)) == nullptr) return "";
    return absl::StrCat("ipv4:", host, ":", ntohs(in->sin_port));
  }
  if (addr.ss_family == AF_INET6) {
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(&addr);
    if (::inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host)) == nullptr) return "";
    return absl::StrCat("ipv6:[", host, "]:", ntohs(in6->sin6_port));
  }
  return "";
}
constexpr absl::Duration kModelsTtl = absl::Seconds(5);
// Most choices ("n") one request may ask for per prompt, and generations in all (prompts x n): each
// is a generation of its own, read on a thread of its own.
constexpr int64_t kMaxChoices = 16;
constexpr int64_t kMaxGenerations = 64;
constexpr size_t kMaxTools = 128;  // as OpenAI's API

const char* Reason(int status) {
  switch (status) {
    case 200:
      return "OK";
    case 400:
      return "Bad Request";
    case 401:
      return "Unauthorized";
    case 403:
      return "Forbidden";
    case 404:
      return "Not Found";
    case 405:
      return "Method Not Allowed";
    case 411:
      return "Length Required";
    case 413:
      return "Payload Too Large";
    case 429:
      return "Too Many Requests";
    case 431:
      return "Request Header Fields Too Large";
    case 501:
      return "Not Implemented";
    case 503:
      return "Service Unavailable";
    case 504:
      return "Gateway Timeout";
    default:
      return "Internal Server Error";
  }
}

// `extra`: more header lines, each ending in CRLF.
std::string Head(int status, const char* content_type, int64_t content_length,
                 absl::string_view extra = "") {
  std::string h = absl::StrCat("HTTP/1.1 ", status, " ", Reason(status),
                               "\r\nContent-Type: ", content_type, "\r\n", extra);
  if (content_length >= 0) absl::StrAppend(&h, "Content-Length: ", content_length, "\r\n");
  if (status == 401) absl::StrAppend(&h, "WWW-Authenticate: Bearer\r\n");  // (RFC 6750)
  absl::StrAppend(&h, "Cache-Control: no-cache\r\nConnection: close\r\n\r\n");
  return h;
}

std::string JsonResponse(int status, const std::string& body) {
  return absl::StrCat(Head(status, "application/json", static_cast<int64_t>(body.size())), body);
}

// The request field of the OpenAI API that a coordinator's refusal names first (its messages
// start with the gRPC field: "sampling.top_p must be ...", "model \"x\" is not served here"), or
// "" when it names none the client set (the answer's "param" is then null).
std::string ParamOfRefusal(absl::string_view message, bool chat) {
  const size_t end = message.find_first_not_of("abcdefghijklmnopqrstuvwxyz_.");
  const absl::string_view field = message.substr(0, end);
  absl::string_view name = field;
  if (absl::ConsumePrefix(&name, "sampling.") && !name.empty() &&
      name.find('.') == absl::string_view::npos) {
    return std::string(name);
  }
  if (field == "model" || field == "fine_tune_id") return "model";
  if (field == "text" || field == "token_ids" || field == "token_ids.ids" || field == "prompt") {
    return chat ? "messages" : "prompt";
  }
  if (field == "priority" || field == "cache_salt" || field == "request_id") {
    return std::string(field);
  }
  return "";
}

std::string ErrorResponse(int status, absl::string_view message, absl::string_view param = "") {
  const std::string body = OpenAiErrorJson(status, message, param);
  // A tenant's limits say when to try again (OpenAI's clients wait as Retry-After says); one
  // held to its concurrency, when a request ends: in a second, say.
  std::string retry;
  if (status == 429) {
    retry = absl::StrCat("Retry-After: ", RetryAfterSeconds(message).value_or(1), "\r\n");
  }
  return absl::StrCat(Head(status, "application/json", static_cast<int64_t>(body.size()), retry),
                      body);
}

// Ends a connection without losing the response: after our FIN, reads (and drops) what the
// client still sends until it closes, 2 s or 1 MiB at most. Closing with unread bytes in the
// receive buffer would send a reset, and the client could lose the response to it (a 413 before
// the body, a 503 before the request was read).
void LingeringClose(int fd, int wake_fd) {
  ::shutdown(fd, SHUT_WR);
  const absl::Time deadline = absl::Now() + absl::Seconds(2);
  std::string drained;
  while (drained.size() < (size_t{1} << 20) && RecvSome(fd, &drained, wake_fd, deadline)) {
  }
}

// Watches a connection while its generations run: when the client closes it (or the socket
// fails), or the gateway stops, cancels the calls, which frees their sequences on their workers.
// Bytes the client sends meanwhile (a pipelined next request) stay in the socket: it watches for
// the peer's close or a failure, never reading. Stops when destroyed.
class DisconnectWatch {
 public:
  DisconnectWatch(int fd, int wake_fd, std::vector<grpc::ClientContext*> calls)
      : stop_(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)),
        thread_([this, fd, wake_fd, calls = std::move(calls)] {
          while (true) {
            pollfd fds[3] = {{fd, POLLRDHUP, 0}, {wake_fd, POLLIN, 0}, {stop_.get(), POLLIN, 0}};
            // Without its eventfd (none to be had), it looks every 200 ms for the end.
            const int rc = ::poll(fds, stop_.valid() ? 3 : 2, stop_.valid() ? -1 : 200);
            if (done_.load()) break;
            if (rc < 0 && errno == EINTR) continue;
            if (rc < 0 || fds[1].revents != 0) break;
            if ((fds[0].revents & (POLLRDHUP | POLLHUP | POLLERR)) == 0) continue;
            gone_.store(true);
            for (grpc::ClientContext* ctx : calls) ctx->TryCancel();
            break;
          }
        }) {}
  ~DisconnectWatch() {
    done_.store(true);
    const uint64_t one = 1;
    if (stop_.valid() && ::write(stop_.get(), &one, sizeof(one)) != sizeof(one)) {
      LOG(ERROR) << "http: cannot stop a connection's watch: " << strerror(errno);
    }
    thread_.join();
  }
  bool gone() const { return gone_.load(); }

 private:
  std::atomic<bool> done_{false};
  std::atomic<bool> gone_{false};
  UniqueFd stop_;  // an eventfd: written to end the watch at once
  std::thread thread_;
};

std::string Float(double v) {
  if (!std::isfinite(v)) return v < 0 ? "-9999.0" : "0.0";  // -inf logprobs as OpenAI's floor
  return absl::StrFormat("%.6g", v);
}

// A token's entry in the chat API's logprobs: token, logprob, its UTF-8 bytes.
std::string ChatTokenJson(const v1::TokenLogprob& t, absl::string_view more) {
  std::string bytes;
  for (const char c : t.text()) {
    absl::StrAppend(&bytes, bytes.empty() ? "" : ",", static_cast<int>(static_cast<uint8_t>(c)));
  }
  return absl::StrCat("{\"token\":", JsonQuote(t.text()), ",\"logprob\":", Float(t.logprob()),
                      ",\"bytes\":[", bytes, "]", more, "}");
}

// A completion's log-probabilities in both APIs' shapes: /v1/completions' (tokens,
// token_logprobs, top_logprobs, text_offset) and the chat API's ({"content": [...]}).
struct Logprobs {
  std::vector<std::string> tokens, top, chat;
  std::vector<double> values;
  std::vector<int64_t> offsets;
  int64_t offset = 0;

  // The prompt's first token, which has no log-probability (echo); `counted`: its text is part
  // of the echoed text (not a BOS the server added).
  void AddFirst(const std::string& text, bool counted) {
    tokens.push_back(text);
    values.push_back(std::numeric_limits<double>::quiet_NaN());
    offsets.push_back(offset);
    if (counted) offset += static_cast<int64_t>(text.size());
    top.push_back("null");
  }
  void Add(const google::protobuf::RepeatedPtrField<v1::PositionLogprobs>& positions) {
    for (const v1::PositionLogprobs& p : positions) {
      tokens.push_back(p.token().text());
      values.push_back(p.token().logprob());
      offsets.push_back(offset);
      offset += static_cast<int64_t>(p.token().text().size());
      std::string t = "{";
      for (int i = 0; i < p.top_size(); ++i) {
        absl::StrAppend(&t, i == 0 ? "" : ",", JsonQuote(p.top(i).text()), ":",
                        Float(p.top(i).logprob()));
      }
      top.push_back(t + "}");
      std::string chat_top;
      for (int i = 0; i < p.top_size(); ++i) {
        absl::StrAppend(&chat_top, i == 0 ? "" : ",", ChatTokenJson(p.top(i), ""));
      }
      chat.push_back(ChatTokenJson(p.token(), absl::StrCat(",\"top_logprobs\":[", chat_top, "]")));
    }
  }
  std::string ChatJson() const {
    return absl::StrCat("{\"content\":[", absl::StrJoin(chat, ","), "]}");
  }
  std::string Json() const {
    std::string out = "{\"tokens\":[";
    for (size_t i = 0; i < tokens.size(); ++i) {
      absl::StrAppend(&out, i == 0 ? "" : ",", JsonQuote(tokens[i]));
    }
    absl::StrAppend(&out, "],\"token_logprobs\":[");
    for (size_t i = 0; i < values.size(); ++i) {
      absl::StrAppend(&out, i == 0 ? "" : ",", std::isnan(values[i]) ? "null" : Float(values[i]));
    }
    absl::StrAppend(&out, "],\"top_logprobs\":[", absl::StrJoin(top, ","), "],\"text_offset\":[",
                    absl::StrJoin(offsets, ","), "]}");
    return out;
  }
};

std::string UsageJson(const v1::Usage& u) {
  return absl::StrCat(
      "{\"prompt_tokens\":", u.num_prompt_tokens(),
      ",\"completion_tokens\":", u.num_completion_tokens(),
      ",\"total_tokens\":", u.num_prompt_tokens() + u.num_completion_tokens(),
      ",\"prompt_tokens_details\":{\"cached_tokens\":",
      u.cached().num_device_tokens() + u.cached().num_host_tokens() + u.cached().num_disk_tokens(),
      "}}");
}

// A prompt of token ids: every element an integer in int32.
absl::Status TokenIds(const std::vector<JsonValue>& items, v1::TokenIds* out) {
  for (const JsonValue& v : items) {
    ASSIGN_OR_RETURN(const int64_t id, v.AsInt());
    if (id < 0 || id > std::numeric_limits<int32_t>::max()) {
      return v.Error("must be a token id (0 or more)");
    }
    out->add_ids(static_cast<int32_t>(id));
  }
  return absl::OkStatus();
}

// The JSON Schema types `schema` allows: its `type` (one or a list) and its anyOf / oneOf
// entries' (one level down).
void SchemaTypes(const jinja::Value& schema, bool nested, std::vector<std::string>* out) {
  const jinja::Value type = schema.Get("type");
  if (type.IsString()) out->push_back(type.s());
  if (type.IsList()) {
    for (const jinja::Value& t : type.list()) {
      if (t.IsString()) out->push_back(t.s());
    }
  }
  if (nested) return;
  for (const char* key : {"anyOf", "oneOf"}) {
    const jinja::Value options = schema.Get(key);
    if (!options.IsList()) continue;
    for (const jinja::Value& option : options.list()) SchemaTypes(option, true, out);
  }
}

}  // namespace

ToolParamTypes ParamTypesOf(const jinja::List& tools) {
  ToolParamTypes types;
  for (const jinja::Value& tool : tools) {
    const jinja::Value function = tool.Get("function");
    const jinja::Value name = function.Get("name");
    if (!name.IsString()) continue;
    std::map<std::string, std::vector<std::string>>& params = types[name.s()];
    const jinja::Value properties = function.Get("parameters").Get("properties");
    if (!properties.IsDict()) continue;
    for (const auto& [param, schema] : properties.dict()) {
      SchemaTypes(schema, false, &params[param]);
    }
  }
  return types;
}

namespace {

// A chat request's tools, tool_choice and parallel_tool_calls.
absl::Status ParseTools(const JsonValue& root, CompletionCall* call, std::string* param) {
  *param = "tools";
  if (std::optional<JsonValue> v = root.FindField("tools")) {
    ASSIGN_OR_RETURN(const std::vector<JsonValue> tools, v->AsArray());
    if (tools.size() > kMaxTools) {
      return v->Error(absl::StrCat("holds ", tools.size(), " tools; at most ", kMaxTools));
    }
    for (const JsonValue& tool : tools) {
      ASSIGN_OR_RETURN(const absl::string_view type, tool.StringField("type"));
      if (type != "function") return tool.Field("type")->Error("must be \"function\"");
      ASSIGN_OR_RETURN(const JsonValue function, tool.Field("function"));
      ASSIGN_OR_RETURN(const absl::string_view name, function.StringField("name"));
      // The name goes into the prompt when a call is forced.
      if (name.size() > 64 || !IsToolName(name)) {
        return function.Field("name")->Error(
            "must be 1 to 64 letters, digits, underscores, dots or dashes");
      }
      if (std::find(call->tool_names.begin(), call->tool_names.end(), name) !=
          call->tool_names.end()) {
        return function.Field("name")->Error(absl::StrCat("names \"", name, "\" twice"));
      }
      if (std::optional<JsonValue> p = function.FindField("parameters"); p.has_value()) {
        if (!p->IsObject()) return p->Error("must be a JSON Schema object");
        // A call's arguments are an object (as OpenAI's API requires of the schema too).
        if (std::optional<JsonValue> t = p->FindField("type");
            t.has_value() && !(t->IsString() && *t->AsString() == "object")) {
          return t->Error("must be \"object\": a call's arguments are a JSON object");
        }
      }
      ASSIGN_OR_RETURN(jinja::Value value, jinja::Value::FromJson(tool));
      call->tools.push_back(std::move(value));
      call->tool_names.emplace_back(name);
      std::optional<JsonValue> p = function.FindField("parameters");
      call->tool_parameters.push_back(p.has_value() ? simdjson::minify(p->raw()) : "");
    }
  }
  *param = "tool_choice";
  call->tool_choice = call->tools.empty() ? ToolChoice::kNone : ToolChoice::kAuto;
  if (std::optional<JsonValue> v = root.FindField("tool_choice")) {
    if (v->IsString()) {
      const absl::string_view choice = *v->AsString();
      if (choice == "none") {
        call->tool_choice = ToolChoice::kNone;
      } else if (choice == "auto") {
        // (Without tools, as none.)
      } else if (choice == "required") {
        call->tool_choice = ToolChoice::kRequired;
      } else {
        return v->Error("must be none, auto, required or {\"type\": \"function\", ...}");
      }
    } else {
      ASSIGN_OR_RETURN(const absl::string_view type, v->StringField("type"));
      if (type != "function") return v->Field("type")->Error("must be \"function\"");
      ASSIGN_OR_RETURN(const JsonValue function, v->Field("function"));
      ASSIGN_OR_RETURN(const absl::string_view name, function.StringField("name"));
      if (std::find(call->tool_names.begin(), call->tool_names.end(), name) ==
          call->tool_names.end()) {
        return function.Field("name")->Error(
            absl::StrCat("names \"", name, "\", which is not one of the tools"));
      }
      call->tool_choice = ToolChoice::kNamed;
      call->tool_choice_name = std::string(name);
    }
    if (call->tools.empty() &&
        (call->tool_choice == ToolChoice::kRequired || call->tool_choice == ToolChoice::kNamed)) {
      return v->Error("asks for a tool call, but the request has no tools");
    }
  }
  *param = "parallel_tool_calls";
  ASSIGN_OR_RETURN(call->parallel_tool_calls, root.BoolFieldOr("parallel_tool_calls", true));
  return absl::OkStatus();
}

// A chat request's chat_template_kwargs, add_generation_prompt and continue_final_message.
// Structured output, in any of the spellings clients use: OpenAI's response_format (json_object,
// json_schema), vLLM's structured_outputs (json, regex, choice, grammar in GBNF, json_object)
// and its older guided_json, guided_regex, guided_choice and guided_grammar. At most one may
// constrain a request. The schema or pattern itself is the coordinator's to check
// (sampling.structured_output). With `tools_in_play` (tools the model may call) none is taken: the
// grammar would keep the model from writing a call.
absl::Status ParseStructuredOutput(const JsonValue& root, bool tools_in_play,
                                   v1::StructuredOutput* out, std::string* param) {
  std::string first;  // the field that set it
  auto claim = [&](const JsonValue& v, absl::string_view name) -> absl::Status {
    if (!first.empty()) {
      return v.Error(
          absl::StrCat("conflicts with \"", first, "\": a request takes one structured output"));
    }
    if (tools_in_play) {
      return v.Error(
          "cannot be combined with tools the model may call (set tool_choice to \"none\")");
    }
    first = std::string(name);
    return absl::OkStatus();
  };
  // A schema given as a JSON object or as JSON text.
  auto schema_text = [](const JsonValue& v) -> absl::StatusOr<std::string> {
    if (v.IsString()) return std::string(*v.AsString());
    if (!v.IsObject() && !v.IsBool()) return v.Error("must be a JSON schema (an object)");
    return simdjson::minify(v.raw());
  };
  // vLLM's kinds (structured_outputs' keys, guided_ names): false when `kind` is none of them.
  auto take = [&](absl::string_view kind, const JsonValue& v,
                  absl::string_view field) -> absl::StatusOr<bool> {
    if (kind != "json" && kind != "regex" && kind != "choice" && kind != "grammar") return false;
    RETURN_IF_ERROR(claim(v, field));
    if (kind == "json") {
      ASSIGN_OR_RETURN(*out->mutable_json_schema(), schema_text(v));
    } else if (kind == "choice") {
      ASSIGN_OR_RETURN(const std::vector<JsonValue> items, v.AsArray());
      v1::Choices* c = out->mutable_choice();
      for (const JsonValue& item : items) {
        ASSIGN_OR_RETURN(const absl::string_view text, item.AsString());
        c->add_texts(std::string(text));
      }
    } else {
      ASSIGN_OR_RETURN(const absl::string_view text, v.AsString());
      if (kind == "regex") {
        out->set_regex(std::string(text));
      } else {
        out->set_grammar(std::string(text));
      }
    }
    return true;
  };
  *param = "response_format";
  if (std::optional<JsonValue> v = root.FindField("response_format")) {
    if (!v->IsObject()) return v->Error("must be an object");
    ASSIGN_OR_RETURN(const absl::string_view type, v->StringField("type"));
    if (type == "json_object") {
      RETURN_IF_ERROR(claim(*v, "response_format"));
      out->set_json_object(true);
    } else if (type == "json_schema") {
      ASSIGN_OR_RETURN(const JsonValue js, v->Field("json_schema"));
      if (!js.IsObject()) return js.Error("must be an object");
      ASSIGN_OR_RETURN(const JsonValue schema, js.Field("schema"));
      RETURN_IF_ERROR(claim(*v, "response_format"));
      ASSIGN_OR_RETURN(*out->mutable_json_schema(), schema_text(schema));
    } else if (type != "text") {
      return v->Field("type")->Error("must be text, json_object or json_schema");
    }
  }
  *param = "structured_outputs";
  if (std::optional<JsonValue> v = root.FindField("structured_outputs")) {
    if (!v->IsObject()) return v->Error("must be an object");
    ASSIGN_OR_RETURN(const auto members, v->AsObject());
    for (const auto& [key, value] : members) {
      if (value.IsNull()) continue;
      ASSIGN_OR_RETURN(const bool taken,
                       take(key, value, absl::StrCat("structured_outputs.", key)));
      if (taken) continue;
      if (key == "disable_any_whitespace") {
        ASSIGN_OR_RETURN(const bool compact, value.AsBool());
        out->set_compact_json(compact);
      } else if (key == "json_object") {
        ASSIGN_OR_RETURN(const bool on, value.AsBool());
        if (!on) continue;
        RETURN_IF_ERROR(claim(value, "structured_outputs.json_object"));
        out->set_json_object(true);
      } else {
        return value.Error(
            "is not supported (json, regex, choice, grammar, json_object and "
            "disable_any_whitespace are)");
      }
    }
  }
  for (const char* name : {"guided_json", "guided_regex", "guided_choice", "guided_grammar"}) {
    *param = name;
    std::optional<JsonValue> v = root.FindField(name);
    if (!v.has_value()) continue;
    RETURN_IF_ERROR(take(absl::string_view(name).substr(7), *v, name).status());  // "guided_"
  }
  return absl::OkStatus();
}

absl::Status ParseTemplateFields(const JsonValue& root, CompletionCall* call, std::string* param) {
  *param = "chat_template_kwargs";
  if (std::optional<JsonValue> v = root.FindField("chat_template_kwargs")) {
    ASSIGN_OR_RETURN(const auto members, v->AsObject());
    for (const auto& [name, value] : members) {
      if (IsChatTemplateVariable(name)) {
        return v->Error(
            absl::StrCat("sets \"", name, "\", which Strata gives the template itself"));
      }
      ASSIGN_OR_RETURN(jinja::Value converted, jinja::Value::FromJson(value));
      call->template_kwargs.emplace_back(std::string(name), std::move(converted));
    }
  }
  *param = "include_reasoning";
  ASSIGN_OR_RETURN(call->include_reasoning, root.BoolFieldOr("include_reasoning", true));
  *param = "continue_final_message";
  ASSIGN_OR_RETURN(call->continue_final_message, root.BoolFieldOr("continue_final_message", false));
  *param = "add_generation_prompt";
  // Continuing the final message: no new turn unless asked for (which contradicts it).
  ASSIGN_OR_RETURN(call->add_generation_prompt,
                   root.BoolFieldOr("add_generation_prompt", !call->continue_final_message));
  if (call->continue_final_message) {
    if (call->add_generation_prompt) {
      return root.Field("add_generation_prompt")
          ->Error("must be false with continue_final_message (the final message goes on)");
    }
    const ChatMessage& last = call->messages.back();
    if (last.role != "assistant" || !last.content.has_value()) {
      *param = "messages";
      return root.Field("messages")
          ->Error("must end with an assistant message with content for continue_final_message");
    }
    if (call->tool_choice == ToolChoice::kRequired || call->tool_choice == ToolChoice::kNamed) {
      *param = "tool_choice";
      return root.Field("tool_choice")
          ->Error("cannot force a tool call while continuing the final message");
    }
  }
  return absl::OkStatus();
}

// The body of /v1/completions (`chat` false) or /v1/chat/completions.
absl::StatusOr<CompletionCall> ParseRequest(absl::string_view body, bool chat, std::string* param) {
  param->clear();
  absl::StatusOr<JsonDocument> parsed = JsonDocument::Parse(body, "request body");
  if (!parsed.ok()) return parsed.status();
  const JsonValue root = parsed->root();
  if (!root.IsObject()) return root.Error("must be a JSON object");
  CompletionCall call;
  v1::GenerateRequest& r = call.request;
  v1::SamplingParams& s = *r.mutable_sampling();

  *param = "model";
  ASSIGN_OR_RETURN(const absl::string_view model, root.StringField("model"));
  r.set_model(std::string(model));

  if (chat) {
    *param = "messages";
    ASSIGN_OR_RETURN(const JsonValue messages, root.Field("messages"));
    ASSIGN_OR_RETURN(const std::vector<JsonValue> items, messages.AsArray());
    if (items.empty()) return messages.Error("must not be empty");
    for (const JsonValue& m : items) {
      ASSIGN_OR_RETURN(const absl::string_view role, m.StringField("role"));
      if (role != "system" && role != "user" && role != "assistant" && role != "developer" &&
          role != "tool") {
        return m.Field("role")->Error("must be system, developer, user, assistant or tool");
      }
      ChatMessage& message = call.messages.emplace_back();
      message.role = role == "developer" ? "system" : std::string(role);
      ASSIGN_OR_RETURN(message.name, m.StringFieldOr("name", ""));
      if (role == "assistant") {
        if (std::optional<JsonValue> calls = m.FindField("tool_calls")) {
          ASSIGN_OR_RETURN(const std::vector<JsonValue> list, calls->AsArray());
          for (const JsonValue& c : list) {
            ASSIGN_OR_RETURN(const std::string type, c.StringFieldOr("type", "function"));
            if (type != "function") return c.Field("type")->Error("must be \"function\"");
            ASSIGN_OR_RETURN(const absl::string_view id, c.StringField("id"));
            ASSIGN_OR_RETURN(const JsonValue function, c.Field("function"));
            ASSIGN_OR_RETURN(const absl::string_view name, function.StringField("name"));
            ASSIGN_OR_RETURN(const absl::string_view arguments, function.StringField("arguments"));
            message.tool_calls.push_back(
                {std::string(id), std::string(name), std::string(arguments)});
          }
        }
      }
      if (role == "tool") {
        ASSIGN_OR_RETURN(const absl::string_view id, m.StringField("tool_call_id"));
        message.tool_call_id = std::string(id);
      }
      // A string, or text parts ([{"type": "text", "text": ...}]); null (or left out) for an
      // assistant turn that only called tools.
      if (role == "assistant" && !message.tool_calls.empty() &&
          !m.FindField("content").has_value()) {
        continue;
      }
      ASSIGN_OR_RETURN(const JsonValue content, m.Field("content"));
      std::string text;
      if (content.IsString()) {
        text = std::string(*content.AsString());
      } else {
        ASSIGN_OR_RETURN(const std::vector<JsonValue> parts, content.AsArray());
        for (const JsonValue& part : parts) {
          ASSIGN_OR_RETURN(const absl::string_view type, part.StringField("type"));
          if (type != "text") return part.Error("must be a text part: only text is supported");
          ASSIGN_OR_RETURN(const absl::string_view t, part.StringField("text"));
          absl::StrAppend(&text, text.empty() ? "" : "\n", t);  // parts a line apart, as vLLM
        }
      }
      message.content = std::move(text);
    }
    RETURN_IF_ERROR(ParseTools(root, &call, param));
    RETURN_IF_ERROR(ParseTemplateFields(root, &call, param));
  }
  *param = "prompt";
  // Chat: the messages make the prompt (RenderChat, once the model's chat format is known).
  if (!chat) {
    ASSIGN_OR_RETURN(const JsonValue prompt, root.Field("prompt"));
    if (prompt.IsString()) {
      ASSIGN_OR_RETURN(const absl::string_view text, prompt.AsString());
      r.set_text(std::string(text));
    } else if (prompt.IsArray()) {
      ASSIGN_OR_RETURN(const std::vector<JsonValue> items, prompt.AsArray());
      if (items.empty()) return prompt.Error("must not be empty");
      if (items[0].IsNumber()) {
        RETURN_IF_ERROR(TokenIds(items, r.mutable_token_ids()));
      } else {
        // One prompt or several: strings, or arrays of token ids; no more than a request may
        // generate for (checked again with n below), before any is copied.
        if (static_cast<int64_t>(items.size()) > kMaxGenerations) {
          return prompt.Error(absl::StrCat("holds ", items.size(), " prompts; at most ",
                                           kMaxGenerations, " generations a request"));
        }
        for (size_t i = 0; i < items.size(); ++i) {
          v1::GenerateRequest* p = i == 0 ? &r : &call.more_prompts.emplace_back();
          if (items[i].IsString()) {
            ASSIGN_OR_RETURN(const absl::string_view text, items[i].AsString());
            p->set_text(std::string(text));
          } else if (items[i].IsArray()) {
            ASSIGN_OR_RETURN(const std::vector<JsonValue> ids, items[i].AsArray());
            if (ids.empty()) return items[i].Error("must not be empty");
            RETURN_IF_ERROR(TokenIds(ids, p->mutable_token_ids()));
          } else {
            return items[i].Error("must be a string or an array of token ids");
          }
        }
      }
    } else {
      return prompt.Error("must be a string or an array of token ids");
    }
  }

  if (!chat) {
    *param = "echo";
    ASSIGN_OR_RETURN(call.echo, root.BoolFieldOr("echo", false));
  }
  // Chat: max_completion_tokens (the newer name) or max_tokens; neither: until the model ends its
  // turn or the context is full (set once the model's context length is known).
  const char* max_name = chat && root.FindField("max_completion_tokens").has_value()
                             ? "max_completion_tokens"
                             : "max_tokens";
  *param = max_name;
  if (chat && !root.FindField(max_name).has_value()) {
    call.default_max_tokens = true;
  } else {
    ASSIGN_OR_RETURN(const int64_t max_tokens, root.IntFieldOr(max_name, 16));
    if (max_tokens == 0 && call.echo) {
      call.score_only = true;  // the prompt scored (echo with logprobs), nothing generated
      s.set_max_tokens(1);     // (min_tokens, below, is then ignored)
    } else if (max_tokens < 1 || max_tokens > std::numeric_limits<uint32_t>::max()) {
      return root.Field(max_name)->Error("must be 1 to 4294967295 (0 only with echo)");
    }
    if (!call.score_only) s.set_max_tokens(static_cast<uint32_t>(max_tokens));
  }
  *param = "min_tokens";
  ASSIGN_OR_RETURN(const int64_t min_tokens, root.IntFieldOr("min_tokens", 0));
  if (min_tokens < 0 || min_tokens > std::numeric_limits<uint32_t>::max()) {
    return root.Field("min_tokens")->Error("must be 0 or more");
  }
  s.set_min_tokens(call.score_only ? 0 : static_cast<uint32_t>(min_tokens));

  // Optional floats: left unset (the server's default) when missing or null.
  auto optional_float = [&](const char* name,
                            void (v1::SamplingParams::*set)(float)) -> absl::Status {
    *param = name;
    std::optional<JsonValue> v = root.FindField(name);
    if (!v.has_value()) return absl::OkStatus();
    ASSIGN_OR_RETURN(const double x, v->AsDouble());
    (s.*set)(static_cast<float>(x));
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(optional_float("temperature", &v1::SamplingParams::set_temperature));
  RETURN_IF_ERROR(optional_float("top_p", &v1::SamplingParams::set_top_p));
  RETURN_IF_ERROR(
      optional_float("repetition_penalty", &v1::SamplingParams::set_repetition_penalty));
  *param = "min_p";
  ASSIGN_OR_RETURN(const double min_p, root.DoubleFieldOr("min_p", 0));
  s.set_min_p(static_cast<float>(min_p));
  *param = "presence_penalty";
  ASSIGN_OR_RETURN(const double presence, root.DoubleFieldOr("presence_penalty", 0));
  s.set_presence_penalty(static_cast<float>(presence));
  *param = "frequency_penalty";
  ASSIGN_OR_RETURN(const double frequency, root.DoubleFieldOr("frequency_penalty", 0));
  s.set_frequency_penalty(static_cast<float>(frequency));
  *param = "top_k";
  ASSIGN_OR_RETURN(const int64_t top_k, root.IntFieldOr("top_k", 0));
  if (top_k < -1 || top_k > std::numeric_limits<uint32_t>::max()) {
    return root.Field("top_k")->Error("must be -1 or 0 (off), or a number of tokens");
  }
  s.set_top_k(top_k < 0 ? 0 : static_cast<uint32_t>(top_k));
  *param = "seed";
  if (std::optional<JsonValue> v = root.FindField("seed")) {
    ASSIGN_OR_RETURN(const int64_t seed, v->AsInt());
    if (seed < 0) return v->Error("must be 0 or more");
    s.set_seed(static_cast<uint64_t>(seed));
  }
  *param = "stop";
  if (std::optional<JsonValue> v = root.FindField("stop")) {
    if (v->IsString()) {
      ASSIGN_OR_RETURN(const absl::string_view stop, v->AsString());
      s.add_stop(std::string(stop));
    } else {
      ASSIGN_OR_RETURN(const std::vector<JsonValue> items, v->AsArray());
      for (const JsonValue& item : items) {
        ASSIGN_OR_RETURN(const absl::string_view stop, item.AsString());
        s.add_stop(std::string(stop));
      }
    }
  }
  *param = "stop_token_ids";
  if (std::optional<JsonValue> v = root.FindField("stop_token_ids")) {
    ASSIGN_OR_RETURN(const std::vector<JsonValue> items, v->AsArray());
    for (const JsonValue& item : items) {
      ASSIGN_OR_RETURN(const int64_t id, item.AsInt());
      if (id < 0 || id > std::numeric_limits<int32_t>::max()) {
        return item.Error("must be a token id");
      }
      s.add_stop_token_ids(static_cast<int32_t>(id));
    }
  }
  *param = "ignore_eos";
  ASSIGN_OR_RETURN(const bool ignore_eos, root.BoolFieldOr("ignore_eos", false));
  s.set_ignore_eos(ignore_eos);
  *param = "skip_special_tokens";
  ASSIGN_OR_RETURN(const bool skip_special, root.BoolFieldOr("skip_special_tokens", true));
  s.set_skip_special_tokens(skip_special);
  *param = "logprobs";
  if (chat) {
    // The chat API's: logprobs true, and top_logprobs alternatives at each position.
    ASSIGN_OR_RETURN(const bool logprobs, root.BoolFieldOr("logprobs", false));
    *param = "top_logprobs";
    ASSIGN_OR_RETURN(const int64_t top, root.IntFieldOr("top_logprobs", 0));
    if (top < 0 || top > 20) return root.Field("top_logprobs")->Error("must be 0 to 20");
    if (!logprobs && root.FindField("top_logprobs").has_value()) {
      return root.Field("top_logprobs")->Error("needs \"logprobs\": true");
    }
    if (logprobs) s.set_logprobs(static_cast<uint32_t>(top));
  } else if (std::optional<JsonValue> v = root.FindField("logprobs")) {
    // OpenAI's completions take a count; a boolean is the chat API's and is refused.
    ASSIGN_OR_RETURN(const int64_t n, v->AsInt());
    if (n < 0 || n > 20) return v->Error("must be 0 to 20");
    s.set_logprobs(static_cast<uint32_t>(n));
  }

  *param = "n";
  ASSIGN_OR_RETURN(const int64_t n, root.IntFieldOr("n", 1));
  if (n < 1 || n > kMaxChoices) {
    return root.Field("n")->Error(absl::StrCat("must be 1 to ", kMaxChoices));
  }
  call.n = static_cast<int>(n);
  const int64_t prompts = 1 + static_cast<int64_t>(call.more_prompts.size());
  static_assert(kMaxChoices <= kMaxGenerations, "one prompt's n alone never exceeds it");
  if (prompts * n > kMaxGenerations) {
    *param = "prompt";
    return root.Field(*param)->Error(absl::StrCat("asks for ", prompts * n, " generations (",
                                                  prompts, " prompts x n ", n, "); at most ",
                                                  kMaxGenerations, " a request"));
  }
  *param = "best_of";
  ASSIGN_OR_RETURN(const int64_t best_of, root.IntFieldOr("best_of", 1));
  if (best_of != 1) return root.Field("best_of")->Error("must be 1 (best_of is not supported)");
  if (!chat) {
    // Echoed with logprobs: the prompt's tokens' too.
    if (call.echo && s.has_logprobs()) s.set_prompt_logprobs(s.logprobs());
    *param = "suffix";
    ASSIGN_OR_RETURN(const std::string suffix, root.StringFieldOr("suffix", ""));
    if (!suffix.empty()) return root.Field("suffix")->Error("is not supported");
  }
  // {"token id": bias, ...}; the ids and ranges are the server's to check (sampling.logit_bias).
  *param = "logit_bias";
  // A key given twice keeps its last value, as a JSON object read into a dict does.
  if (std::optional<JsonValue> v = root.FindField("logit_bias")) {
    ASSIGN_OR_RETURN(const auto members, v->AsObject());
    absl::flat_hash_map<int32_t, int> index;  // token -> its entry (linear in the keys)
    for (const auto& [key, value] : members) {
      int32_t token = 0;
      if (key.empty() || key.size() > 10 ||
          !std::all_of(key.begin(), key.end(), absl::ascii_isdigit) ||
          !absl::SimpleAtoi(key, &token)) {
        return v->Error(absl::StrCat("has a key \"", key, "\" that is not a token id"));
      }
      ASSIGN_OR_RETURN(const double bias, value.AsDouble());
      const auto [it, added] = index.try_emplace(token, s.logit_bias_size());
      v1::TokenBias* b = added ? s.add_logit_bias() : s.mutable_logit_bias(it->second);
      b->set_token_id(token);
      b->set_bias(static_cast<float>(bias));
    }
  }

  RETURN_IF_ERROR(ParseStructuredOutput(
      root, chat && !call.tools.empty() && call.tool_choice != ToolChoice::kNone,
      s.mutable_structured_output(), param));

  *param = "stream";
  ASSIGN_OR_RETURN(call.stream, root.BoolFieldOr("stream", false));
  *param = "stream_options";
  if (std::optional<JsonValue> v = root.FindField("stream_options")) {
    if (!v->IsObject()) return v->Error("must be an object");
    ASSIGN_OR_RETURN(call.include_usage, v->BoolFieldOr("include_usage", false));
  }

  // Strata's own.
  *param = "fine_tune_id";
  ASSIGN_OR_RETURN(const std::string fine_tune, root.StringFieldOr("fine_tune_id", ""));
  r.set_fine_tune_id(fine_tune);
  *param = "cache_salt";
  ASSIGN_OR_RETURN(const std::string salt, root.StringFieldOr("cache_salt", ""));
  r.set_cache_salt(salt);
  *param = "request_id";
  ASSIGN_OR_RETURN(const std::string id, root.StringFieldOr("request_id", ""));
  // Choice i > 0 runs as "<id>-i", within the coordinator's 128 bytes.
  if ((call.n > 1 || !call.more_prompts.empty()) && id.size() > 125) {
    return root.Field("request_id")->Error("must be at most 125 bytes with several choices");
  }
  r.set_request_id(id);
  *param = "priority";
  ASSIGN_OR_RETURN(const int64_t priority, root.IntFieldOr("priority", 0));
  if (priority < std::numeric_limits<int32_t>::min() ||
      priority > std::numeric_limits<int32_t>::max()) {
    return root.Field("priority")->Error("is out of range");
  }
  r.set_priority(static_cast<int32_t>(priority));
  param->clear();
  return call;
}

}  // namespace

absl::StatusOr<CompletionCall> CompletionFromJson(absl::string_view body, std::string* param) {
  std::string unused;
  return ParseRequest(body, /*chat=*/false, param != nullptr ? param : &unused);
}

absl::StatusOr<CompletionCall> ChatFromJson(absl::string_view body, std::string* param) {
  std::string unused;
  return ParseRequest(body, /*chat=*/true, param != nullptr ? param : &unused);
}

void ConstrainForcedCall(ToolCallFormat format, CompletionCall* call) {
  std::vector<ToolSchema> tools;
  for (size_t i = 0; i < call->tool_names.size(); ++i) {
    tools.push_back({call->tool_names[i], call->tool_parameters[i]});
  }
  for (int attempt = 0; attempt < 2; ++attempt) {
    if (attempt == 1) {
      for (ToolSchema& t : tools) t.parameters.clear();
    }
    std::optional<ForcedCallGrammar> g =
        ForcedToolCallGrammar(format, call->tool_choice_name, tools, call->parallel_tool_calls);
    if (!g.has_value()) return;
    v1::StructuredOutput so;
    if (!g->gbnf.empty()) {
      // Its parameters come from the schema's properties; without them no call is left to keep.
      if (attempt == 1) return;
      so.set_grammar(std::move(g->gbnf));
    } else {
      so.set_json_schema(std::move(g->json_schema));
      so.set_prefix(std::move(g->prefix));
    }
    // Clients send the same tools with request after request: their grammars are kept.
    static GrammarCache* const checked = new GrammarCache(64);
    if (checked->Get(so, "forced call").ok()) {
      *call->request.mutable_sampling()->mutable_structured_output() = std::move(so);
      return;
    }
  }
}

ChatFormat DetectChatFormat(absl::string_view chat_template) {
  if (absl::StrContains(chat_template, "<|start_header_id|>")) return ChatFormat::kLlama3;
  if (absl::StrContains(chat_template, "<|im_start|>")) return ChatFormat::kChatml;
  return ChatFormat::kNone;
}

absl::StatusOr<ChatFormat> ChatFormatFromName(absl::string_view name) {
  if (name == "llama3") return ChatFormat::kLlama3;
  if (name == "chatml") return ChatFormat::kChatml;
  if (name == "none") return ChatFormat::kNone;
  return absl::InvalidArgumentError(
      absl::StrCat("no chat format \"", name, "\": llama3, chatml or none"));
}

const char* ChatFormatName(ChatFormat format) {
  switch (format) {
    case ChatFormat::kLlama3:
      return "llama3";
    case ChatFormat::kChatml:
      return "chatml";
    case ChatFormat::kTemplate:
      return "template";
    default:
      return "none";
  }
}

std::optional<std::string> ChatTemplateSource(absl::string_view tokenizer_config_json) {
  absl::StatusOr<JsonDocument> d = JsonDocument::Parse(tokenizer_config_json, "tokenizer_config");
  if (!d.ok()) return std::nullopt;
  std::optional<JsonValue> t = d->root().FindField("chat_template");
  if (!t.has_value()) return std::nullopt;
  if (t->IsString()) return std::string(*t->AsString());
  // A list of named templates: the "default" one.
  absl::StatusOr<std::vector<JsonValue>> list = t->AsArray();
  if (!list.ok()) return std::nullopt;
  for (const JsonValue& named : *list) {
    if (named.StringFieldOr("name", "").value_or("") == "default") {
      return named.StringFieldOr("template", "").value_or("");
    }
  }
  return std::nullopt;
}

namespace {

// A special token's text in tokenizer_config.json: a string, or an AddedToken's "content".
std::string SpecialTokenText(absl::string_view config_json, absl::string_view field) {
  absl::StatusOr<JsonDocument> d = JsonDocument::Parse(config_json, "tokenizer_config");
  if (!d.ok()) return "";
  std::optional<JsonValue> t = d->root().FindField(field);
  if (!t.has_value()) return "";
  if (t->IsString()) return std::string(*t->AsString());
  if (t->IsObject()) return t->StringFieldOr("content", "").value_or("");
  return "";
}

// Markers that end an assistant turn in common templates (the first one a template writes).
constexpr const char* kEndMarkers[] = {
    "<|eot_id|>",   "<|im_end|>", "<end_of_turn>", "<|end|>", "<|END_OF_TURN_TOKEN|>",
    "<|endoftext|>"};

}  // namespace

ChatTemplate LoadChatTemplate(const std::string& dir, std::optional<ChatFormat> forced,
                              const Tokenizer& tokenizer, std::string* note) {
  ChatTemplate chat;
  std::string config;
  // --chat_format needs neither file.
  if (!forced.has_value()) {
    if (absl::StatusOr<std::string> c = ReadFileToString(dir + "/tokenizer_config.json"); c.ok()) {
      config = *std::move(c);
    }
  }
  // Newer transformers save the template beside the config, and that file wins over the
  // config's (as transformers reads them).
  std::optional<std::string> source;
  if (!forced.has_value()) {
    if (absl::StatusOr<std::string> j = ReadFileToString(dir + "/chat_template.jinja"); j.ok()) {
      source = *std::move(j);
    } else {
      source = ChatTemplateSource(config);
    }
  }
  if (forced.has_value()) {
    chat.format = *forced;
    *note = "--chat_format";
  } else if (!source.has_value()) {
    *note = "no chat template";
  } else {
    absl::StatusOr<jinja::Template> t = jinja::Template::Parse(*source);
    if (t.ok()) {
      chat.jinja = std::make_shared<const jinja::Template>(*std::move(t));
      chat.bos_token = SpecialTokenText(config, "bos_token");
      chat.eos_token = SpecialTokenText(config, "eos_token");
      chat.format = ChatFormat::kTemplate;
      // A leading BOS in the template's output is cut when the tokenizer adds one itself.
      const int32_t bos = tokenizer.bos_token_id();
      absl::StatusOr<std::vector<int32_t>> with = tokenizer.Encode("a", true);
      chat.strip_bos = bos >= 0 && !chat.bos_token.empty() && with.ok() && !with->empty() &&
                       with->front() == bos;
      for (const char* m : kEndMarkers) {
        if (absl::StrContains(*source, m)) {
          chat.end_marker = m;
          break;
        }
      }
      // It must render a one-message conversation (a template may need what Strata does not give).
      absl::StatusOr<std::string> probe = RenderChatTemplate(chat, {{"user", "Hello"}});
      chat.takes_tools = absl::StrContains(*source, "tools");
      chat.tool_format = DetectToolCallFormat(*source);
      chat.reasoning_format = DetectReasoningFormat(*source);
      if (probe.ok()) {
        *note = "the model's chat template";
      } else {
        chat = ChatTemplate();
        *note =
            absl::StrCat("its chat template failed to render (", probe.status().message(), "); ");
      }
    } else {
      *note =
          absl::StrCat("its chat template is beyond Strata's Jinja (", t.status().message(), "); ");
    }
    if (chat.format != ChatFormat::kTemplate) {
      chat.format = DetectChatFormat(*source);
      absl::StrAppend(note, chat.format == ChatFormat::kNone
                                ? "no built-in format matches"
                                : "its markers name a built-in format");
    }
  }
  // The turn's end marker: a stop token when the vocabulary has it as one.
  const std::string marker = chat.format == ChatFormat::kTemplate ? chat.end_marker
                             : chat.format == ChatFormat::kNone   ? ""
                                                                  : ChatEndOfTurn(chat.format);
  if (!marker.empty()) {
    absl::StatusOr<std::vector<int32_t>> ids = tokenizer.Encode(marker);
    if (ids.ok() && ids->size() == 1) chat.end_of_turn = (*ids)[0];
  }
  return chat;
}

bool IsChatTemplateVariable(absl::string_view name) {
  for (const char* v :
       {"messages", "tools", "documents", "add_generation_prompt", "bos_token", "eos_token"}) {
    if (name == v) return true;
  }
  return false;
}

namespace {

// Written after the content of a final message to continue: the prompt ends where it lands.
constexpr absl::string_view kContinueMark = "\x1e\x1fstrata-continue\x1f\x1e";

absl::StatusOr<std::string> RenderTemplate(const ChatTemplate& chat,
                                           const std::vector<ChatMessage>& messages,
                                           const ChatRenderOptions& options,
                                           bool add_generation_prompt) {
  if (chat.jinja == nullptr) return absl::FailedPreconditionError("no chat template loaded");
  jinja::List list;
  for (const ChatMessage& m : messages) {
    jinja::Dict d{
        {"role", jinja::Value(m.role)},
        {"content", m.content.has_value() ? jinja::Value(*m.content) : jinja::Value::None()}};
    if (!m.name.empty()) d.emplace_back("name", jinja::Value(m.name));
    if (!m.tool_call_id.empty()) d.emplace_back("tool_call_id", jinja::Value(m.tool_call_id));
    if (!m.tool_calls.empty()) {
      jinja::List calls;
      for (const ToolCall& c : m.tool_calls) {
        // The arguments as a mapping where they are a JSON object (templates write them with
        // tojson, or walk their items), as vLLM gives them.
        jinja::Value arguments(c.arguments);
        if (absl::StatusOr<JsonDocument> doc = JsonDocument::Parse(c.arguments, "arguments");
            doc.ok() && doc->root().IsObject()) {
          if (absl::StatusOr<jinja::Value> v = jinja::Value::FromJson(doc->root()); v.ok()) {
            arguments = *std::move(v);
          }
        }
        calls.push_back(jinja::Value(jinja::Dict{
            {"id", jinja::Value(c.id)},
            {"type", jinja::Value("function")},
            {"function", jinja::Value(jinja::Dict{{"name", jinja::Value(c.name)},
                                                  {"arguments", std::move(arguments)}})}}));
      }
      d.emplace_back("tool_calls", jinja::Value(std::move(calls)));
    }
    list.push_back(jinja::Value(std::move(d)));
  }
  // As transformers renders: tools and documents given, as None when there are none (Llama
  // 3.1's template, say, asks `tools is not none`).
  const jinja::List* tools = options.tools;
  jinja::Dict context{
      {"messages", jinja::Value(std::move(list))},
      {"tools", tools != nullptr && !tools->empty() ? jinja::Value(*tools) : jinja::Value::None()},
      {"documents", jinja::Value::None()},
      {"add_generation_prompt", jinja::Value(add_generation_prompt)},
      {"bos_token", jinja::Value(chat.bos_token)},
      {"eos_token", jinja::Value(chat.eos_token)},
  };
  if (options.template_kwargs != nullptr) {
    for (const auto& [name, value] : *options.template_kwargs) {
      if (IsChatTemplateVariable(name)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "chat_template_kwargs sets \"", name, "\", which Strata gives the template itself"));
      }
      context.emplace_back(name, value);
    }
  }
  ASSIGN_OR_RETURN(std::string text, chat.jinja->Render(jinja::Value(std::move(context))));
  if (chat.strip_bos && absl::StartsWith(text, chat.bos_token)) {
    text.erase(0, chat.bos_token.size());
  }
  return text;
}

}  // namespace

absl::StatusOr<std::string> RenderChatTemplate(const ChatTemplate& chat,
                                               const std::vector<ChatMessage>& messages,
                                               const ChatRenderOptions& options) {
  // Continuing: the final message is written with a mark before its trailing whitespace, and the
  // prompt ends where the mark lands (whatever the template writes after the content is left
  // out), with that whitespace where the template kept it: a template that trims contents ends
  // the prompt at the trimmed content, as transformers does.
  const std::vector<ChatMessage>* written = &messages;
  std::vector<ChatMessage> marked;
  std::string trailing;  // the final content's trailing whitespace
  if (options.continue_final_message) {
    if (messages.empty() || messages.back().role != "assistant" ||
        !messages.back().content.has_value()) {
      return absl::InvalidArgumentError(
          "continue_final_message needs a final assistant message with content");
    }
    for (const ChatMessage& m : messages) {
      if (m.content.has_value() && absl::StrContains(*m.content, kContinueMark)) {
        return absl::InvalidArgumentError("a message holds Strata's continue_final_message mark");
      }
    }
    marked = messages;
    std::string& content = *marked.back().content;
    const size_t kept = absl::StripTrailingAsciiWhitespace(content).size();
    trailing = content.substr(kept);
    content.insert(kept, kContinueMark.data(), kContinueMark.size());
    written = &marked;
  }
  const bool generation_prompt = options.add_generation_prompt && !options.continue_final_message;
  std::string text;
  if (chat.format == ChatFormat::kTemplate) {
    ASSIGN_OR_RETURN(text, RenderTemplate(chat, *written, options, generation_prompt));
  } else {
    text = RenderChat(chat.format, *written, generation_prompt);
  }
  if (options.continue_final_message) {
    const size_t at = absl::string_view(text).find(kContinueMark);
    if (at == std::string::npos ||
        absl::string_view(text).find(kContinueMark, at + 1) != absl::string_view::npos) {
      return absl::InvalidArgumentError(
          "continue_final_message: the chat template does not write the final message's content "
          "once, as given");
    }
    const bool kept =
        absl::StartsWith(absl::string_view(text).substr(at + kContinueMark.size()), trailing);
    text.resize(at);
    if (kept) text += trailing;
  }
  return text;
}

std::string RenderChat(ChatFormat format, const std::vector<ChatMessage>& messages,
                       bool add_generation_prompt) {
  std::string out;
  for (const ChatMessage& m : messages) {
    const std::string& role = m.role;
    const std::string content = m.content.value_or("");
    if (format == ChatFormat::kLlama3) {
      // As Llama 3's template: the content trimmed; the BOS comes from the tokenizer.
      absl::StrAppend(&out, "<|start_header_id|>", role, "<|end_header_id|>\n\n",
                      absl::StripAsciiWhitespace(content), "<|eot_id|>");
    } else {
      absl::StrAppend(&out, "<|im_start|>", role, "\n", content, "<|im_end|>\n");
    }
  }
  if (add_generation_prompt) {
    absl::StrAppend(&out, format == ChatFormat::kLlama3
                              ? "<|start_header_id|>assistant<|end_header_id|>\n\n"
                              : "<|im_start|>assistant\n");
  }
  return out;
}

const char* ChatEndOfTurn(ChatFormat format) {
  return format == ChatFormat::kLlama3 ? "<|eot_id|>" : "<|im_end|>";
}

namespace {

// A call that ended with `code` before any output was refused as a request (the coordinator's
// checks of the client's request), not taken and then failed. (A worker's FAILED_PRECONDITION
// comes after: the coordinator itself never answers it.)
bool RefusedBeforeRunning(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::OUT_OF_RANGE:
    case grpc::StatusCode::UNAUTHENTICATED:
    case grpc::StatusCode::PERMISSION_DENIED:
    case grpc::StatusCode::NOT_FOUND:
      return true;
    default:
      return false;
  }
}

}  // namespace

int HttpStatusOf(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return 200;
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::OUT_OF_RANGE:
    case grpc::StatusCode::FAILED_PRECONDITION:
      return 400;
    case grpc::StatusCode::UNAUTHENTICATED:
      return 401;
    case grpc::StatusCode::PERMISSION_DENIED:
      return 403;
    case grpc::StatusCode::NOT_FOUND:
      return 404;
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return 429;
    // The server cancelled (shutting down): the client, had it cancelled, would not be reading.
    case grpc::StatusCode::CANCELLED:
      return 503;
    case grpc::StatusCode::UNIMPLEMENTED:
      return 501;
    case grpc::StatusCode::UNAVAILABLE:
      return 503;
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return 504;
    default:
      return 500;
  }
}

std::string OpenAiErrorJson(int http_status, absl::string_view message, absl::string_view param) {
  const char* type = http_status == 400 || http_status == 404 || http_status == 405 ||
                             http_status == 411 || http_status == 413 || http_status == 431
                         ? "invalid_request_error"
                     : http_status == 401 ? "authentication_error"
                     : http_status == 403 ? "permission_error"
                     : http_status == 429 ? "rate_limit_error"
                     : http_status == 501 ? "not_implemented"
                                          : "server_error";
  return absl::StrCat("{\"error\":{\"message\":", JsonQuote(message), ",\"type\":\"", type,
                      "\",\"param\":", param.empty() ? "null" : JsonQuote(param),
                      ",\"code\":", http_status, "}}");
}

const char* OpenAiFinishReason(v1::FinishReason reason) {
  switch (reason) {
    case v1::FINISH_REASON_LENGTH:
    case v1::FINISH_REASON_CONTEXT_LENGTH:
      return "length";
    case v1::FINISH_REASON_UNSPECIFIED:
      return nullptr;
    default:
      return "stop";
  }
}

absl::StatusOr<std::unique_ptr<OpenAiGateway>> OpenAiGateway::Start(
    const std::string& listen, std::shared_ptr<grpc::Channel> serving,
    OpenAiGatewayOptions options) {
  ASSIGN_OR_RETURN(ListenSocket socket, ListenTcp(listen, "--http_listen", 256));
  UniqueFd wake(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  UniqueFd stop_accepting(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  UniqueFd shed(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK | EFD_SEMAPHORE));
  if (!wake.valid() || !stop_accepting.valid() || !shed.valid()) {
    return absl::UnavailableError(absl::StrCat("eventfd: ", strerror(errno)));
  }
  std::unique_ptr<OpenAiGateway> g(new OpenAiGateway(std::move(socket.fd), std::move(wake),
                                                     socket.port, std::move(serving), options));
  g->stop_accepting_fd_ = std::move(stop_accepting);
  g->shed_fd_ = std::move(shed);
  g->thread_ = std::thread([p = g.get()] { p->Loop(); });
  return g;
}

OpenAiGateway::OpenAiGateway(UniqueFd listen_fd, UniqueFd wake_fd, int port,
                             std::shared_ptr<grpc::Channel> serving, OpenAiGatewayOptions options)
    : listen_fd_(std::move(listen_fd)),
      wake_fd_(std::move(wake_fd)),
      port_(port),
      options_(options),
      stub_(v1::Serving::NewStub(std::move(serving))),
      exchange_prefix_(NewSecret().substr(0, 12)) {}

OpenAiGateway::~OpenAiGateway() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    for (grpc::ClientContext* ctx : calls_) ctx->TryCancel();
  }
  // A connection whose call just ended writes its last event (an error, [DONE]) and closes: give
  // that a second before cutting every wait short.
  StopAccepting();
  WaitIdle(absl::Now() + absl::Seconds(1));
  // The eventfd stays readable: every wait on a connection ends too.
  const uint64_t one = 1;
  if (::write(wake_fd_.get(), &one, sizeof(one)) != sizeof(one)) {
    LOG(ERROR) << "http: cannot wake the server threads: " << strerror(errno);
  }
  if (thread_.joinable()) thread_.join();  // joins every connection's thread too
}

bool OpenAiGateway::NoteStatus(int fd, int status, bool replace) const {
  if (options_.access_log == nullptr) return false;
  absl::MutexLock lock(&keep_mu_);
  auto it = exchanges_.find(fd);
  if (it == exchanges_.end() || (it->second.status != 0 && !replace)) return false;
  it->second.status = status;
  return true;
}

OpenAiGateway::Exchange OpenAiGateway::ExchangeOf(int fd) const {
  if (options_.access_log == nullptr) return {};
  absl::MutexLock lock(&keep_mu_);
  auto it = exchanges_.find(fd);
  return it == exchanges_.end() ? Exchange{} : it->second;
}

void OpenAiGateway::EndExchange(int fd) {
  if (options_.access_log == nullptr) return;
  Exchange x;
  {
    absl::MutexLock lock(&keep_mu_);
    auto it = exchanges_.find(fd);
    if (it == exchanges_.end()) return;
    x = std::move(it->second);
    exchanges_.erase(it);
  }
  LogExchange(x);
}

void OpenAiGateway::LogExchange(const Exchange& x) const {
  // 499 (nginx's): no answer was written: the client went first, or its request never came
  // whole.
  options_.access_log->Append(AccessRecord(x.start, "http")
                                  .Str("id", x.id)
                                  .Str("method", x.method)
                                  .Str("path", x.path)
                                  .Int("status", x.status == 0 ? 499 : x.status)
                                  .Ms("duration_ms", absl::Now() - x.start)
                                  .StrIfSet("peer", x.peer)
                                  .StrIfSet("trace_id", TraceIdOf(x.traceparent))
                                  .StrIfSet("tenant", x.tenant)
                                  .Done());
}

void OpenAiGateway::Reply(int fd, const std::string& response) const {
  // "HTTP/1.1 NNN ...": the answer's status, for the access log; an answer whose write fails is
  // logged as left unanswered (499), unless a streamed answer's head went before.
  int status = 0;
  bool noted = false;
  if (options_.access_log != nullptr && response.size() > 12 &&
      absl::SimpleAtoi(absl::string_view(response).substr(9, 3), &status)) {
    noted = NoteStatus(fd, status);
  }
  auto write_failed = [&] {
    if (noted) NoteStatus(fd, 499, /*replace=*/true);
  };
  // Heads say "Connection: close"; a whole response (it has a Content-Length) to a request that
  // may keep the connection says keep-alive instead.
  static constexpr std::string_view kClose = "Connection: close\r\n";
  const size_t head_end = response.find("\r\n\r\n");
  const size_t at = response.find(kClose);
  const bool keep = KeepAlive(fd);
  if (keep && serving_.load() && at != std::string::npos && at < head_end &&
      response.find("Content-Length: ") < head_end) {
    const std::string kept =
        absl::StrCat(response.substr(0, at), "Connection: keep-alive\r\nKeep-Alive: timeout=",
                     absl::ToInt64Seconds(options_.keep_alive_timeout), "\r\n",
                     response.substr(at + kClose.size()));
    if (!WriteAllPaced(fd, kept, wake_fd_.get(), kWriteTimeout)) {
      SetKeepAlive(fd, false);  // the peer is gone or too slow: no next request
      write_failed();
    }
    return;
  }
  if (keep) SetKeepAlive(fd, false);  // the answer says close: so be it
  if (!WriteAllPaced(fd, response, wake_fd_.get(), kWriteTimeout)) write_failed();
}

bool OpenAiGateway::WaitIdle(absl::Time deadline) const {
  while (active_.load() > 0) {
    if (absl::Now() >= deadline) return false;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return true;
}

void OpenAiGateway::StopAccepting() {
  serving_.store(false);
  const uint64_t one = 1;
  if (::write(stop_accepting_fd_.get(), &one, sizeof(one)) != sizeof(one)) {
    LOG(ERROR) << "http: cannot stop accepting: " << strerror(errno);
  }
}

bool OpenAiGateway::Register(grpc::ClientContext* ctx) {
  if (!options_.gateway_secret.empty()) {
    ctx->AddMetadata(kGatewaySecretMetadata, options_.gateway_secret);
  }
  absl::MutexLock lock(&mu_);
  if (stopping_) return false;
  calls_.insert(ctx);
  return true;
}

void OpenAiGateway::Unregister(grpc::ClientContext* ctx) {
  absl::MutexLock lock(&mu_);
  calls_.erase(ctx);
}

void OpenAiGateway::Loop() {
  // Each connection on its own thread, joined once it is done (and all of them when stopping).
  struct Connection {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
  };
  std::list<Connection> connections;
  auto reap = [&connections](bool all) {
    for (auto it = connections.begin(); it != connections.end();) {
      if (all || it->done->load()) {
        it->thread.join();
        it = connections.erase(it);
      } else {
        ++it;
      }
    }
  };
  while (true) {
    pollfd fds[3] = {{listen_fd_.get(), POLLIN, 0},
                     {wake_fd_.get(), POLLIN, 0},
                     {stop_accepting_fd_.get(), POLLIN, 0}};
    if (::poll(fds, 3, -1) < 0) {
      if (errno == EINTR) continue;
      LOG(ERROR) << "http: poll: " << strerror(errno);
      break;
    }
    if (fds[1].revents != 0 || fds[2].revents != 0) break;
    if ((fds[0].revents & POLLIN) == 0) continue;
    UniqueFd conn(::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!conn.valid()) {
      if (errno != EAGAIN && errno != ECONNABORTED && errno != EINTR) {
        pollfd wake = {wake_fd_.get(), POLLIN, 0};
        ::poll(&wake, 1, 100);  // descriptors ran out: back off instead of spinning
      }
      continue;
    }
    reap(false);
    auto refuse = [this](int fd) {
      // Without reading the request: drop what has arrived of it so that the close sends no
      // reset, and do not wait for more (this is the accept loop). Over TLS, without a
      // handshake, there is no way to answer: the connection is closed.
      if (options_.tls == nullptr) {
        WriteAll(fd, ErrorResponse(503, "too many connections: try again"), wake_fd_.get(),
                 absl::Now() + absl::Milliseconds(200));
      }
      if (options_.access_log != nullptr) {  // its request unread
        Exchange x;
        x.start = absl::Now();
        x.id = absl::StrCat(exchange_prefix_, "-", next_exchange_.fetch_add(1));
        x.peer = PeerAddress(fd);
        x.status = 503;
        LogExchange(x);
      }
      ::shutdown(fd, SHUT_WR);
      char buf[16384];
      while (::recv(fd, buf, sizeof(buf), MSG_DONTWAIT) > 0) {
      }
    };
    if (static_cast<int>(connections.size()) >= options_.max_connections && idle_.load() > 0) {
      // Full, but some connections only wait for a next request: close one of them for this
      // one (a client's pool reconnects when it needs to), waiting up to 100 ms for its slot.
      const uint64_t one = 1;
      if (::write(shed_fd_.get(), &one, sizeof(one)) == sizeof(one)) {
        const absl::Time give_up = absl::Now() + absl::Milliseconds(100);
        while (static_cast<int>(connections.size()) >= options_.max_connections &&
               absl::Now() < give_up) {
          absl::SleepFor(absl::Milliseconds(2));
          reap(false);
        }
        // A token no idle connection took (they all woke meanwhile) must not close a later one.
        uint64_t left = 0;
        while (::read(shed_fd_.get(), &left, sizeof(left)) == sizeof(left)) {
        }
      }
    }
    if (static_cast<int>(connections.size()) >= options_.max_connections) {
      refuse(conn.get());
      continue;
    }
    auto done = std::make_shared<std::atomic<bool>>(false);
    const int raw = conn.get();
    ++active_;
    try {
      // The thread takes the descriptor over only once it exists: if it cannot start, the
      // connection is still here to be refused.
      connections.push_back({std::thread([this, done, raw] {
                               Serve(UniqueFd(raw));
                               --active_;
                               done->store(true);
                             }),
                             done});
      conn.release();
    } catch (const std::system_error& e) {  // no thread to be had
      --active_;
      LOG(ERROR) << "http: cannot start a connection thread: " << e.what();
      refuse(conn.get());
    }
  }
  // Stopped accepting (StopAccepting, or the gateway going): new connections are refused.
  listen_fd_.reset();
  reap(true);
}

void OpenAiGateway::Serve(UniqueFd conn) {
  std::string pending;
  bool idle_end = false;
  const std::string peer = options_.access_log != nullptr ? PeerAddress(conn.get()) : "";
  int fd = conn.get();
  // HTTPS: the handshake within the time a request has to arrive, then the HTTP exchanges over
  // the bridge's end, as over the client's socket (the bridge is closed and joined last).
  std::unique_ptr<TlsBridge> bridge;
  if (options_.tls != nullptr) {
    absl::StatusOr<std::unique_ptr<TlsBridge>> accepted =
        options_.tls->Accept(std::move(conn), wake_fd_.get(), absl::Now() + options_.read_timeout);
    if (!accepted.ok()) {
      VLOG(1) << "http: " << peer << ": " << accepted.status().message();
      if (options_.metrics != nullptr) {
        options_.metrics
            ->GetCounter("strata_coordinator_http_tls_failures_total",
                         "HTTPS connections whose TLS handshake failed (not TLS, the certificate "
                         "refused, too slow)")
            ->Add();
      }
      return;
    }
    bridge = *std::move(accepted);
    fd = bridge->fd();
  }
  for (bool first = true; ServeRequest(fd, peer, &pending, first, &idle_end); first = false) {
  }
  // A connection closed while idle has nothing of ours in flight to protect from a reset.
  if (!idle_end) LingeringClose(fd, wake_fd_.get());
}

bool OpenAiGateway::AwaitNextRequest(int fd, std::string* data) {
  ++idle_;
  const absl::Time until = absl::Now() + options_.keep_alive_timeout;
  bool next = false;
  while (serving_.load()) {
    const absl::Duration left = until - absl::Now();
    if (left <= absl::ZeroDuration()) break;
    pollfd fds[3] = {
        {fd, POLLIN, 0}, {stop_accepting_fd_.get(), POLLIN, 0}, {shed_fd_.get(), POLLIN, 0}};
    const int rc = ::poll(fds, 3, static_cast<int>(absl::ToInt64Milliseconds(left)) + 1);
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0 || fds[1].revents != 0) break;
    // A request that has arrived is served before any call to make room.
    if (fds[0].revents != 0) {
      next = RecvSome(fd, data, wake_fd_.get(), absl::Now() + options_.read_timeout);
      break;
    }
    if (fds[2].revents != 0) {
      // The gateway wants a slot: the first idle connection to take the token closes.
      uint64_t token = 0;
      if (::read(shed_fd_.get(), &token, sizeof(token)) == sizeof(token)) break;
      continue;  // another took it
    }
  }
  --idle_;
  return next;
}

void OpenAiGateway::SetKeepAlive(int fd, bool keep) const {
  absl::MutexLock lock(&keep_mu_);
  keep_alive_[fd] = keep;
}

bool OpenAiGateway::KeepAlive(int fd) const {
  absl::MutexLock lock(&keep_mu_);
  auto it = keep_alive_.find(fd);
  return it != keep_alive_.end() && it->second;
}

bool OpenAiGateway::ServeRequest(int fd, const std::string& peer, std::string* pending, bool first,
                                 bool* idle_end) {
  const int wake = wake_fd_.get();
  std::string data = std::move(*pending);
  pending->clear();
  if (!first && data.empty()) {
    // Idle between requests: the peer's next one, its close, the keep-alive timeout, or the gateway
    // no longer accepting (which ends idle connections at once) ends the wait.
    // A request read here is served (as the connection's last if the gateway is draining).
    if (!AwaitNextRequest(fd, &data)) {
      *idle_end = true;
      return false;
    }
  }
  // From here on every request is logged as it is answered, or left (499) unanswered.
  absl::Cleanup log_exchange = [this, fd] { EndExchange(fd); };
  if (options_.access_log != nullptr) {
    Exchange x;
    x.start = absl::Now();
    x.id = absl::StrCat(exchange_prefix_, "-", next_exchange_.fetch_add(1));
    x.peer = peer;
    absl::MutexLock lock(&keep_mu_);
    exchanges_[fd] = std::move(x);
  }
  const absl::Time deadline = absl::Now() + options_.read_timeout;
  size_t header_end = std::string::npos;
  while ((header_end = data.find("\r\n\r\n")) == std::string::npos) {
    if (data.size() > kMaxHeaderBytes) {
      Reply(fd, ErrorResponse(431, "request headers too large"));
      return false;
    }
    if (!RecvSome(fd, &data, wake, deadline)) return false;
  }
  const std::vector<std::string> lines =
      absl::StrSplit(absl::string_view(data).substr(0, header_end), "\r\n");
  const std::vector<std::string> parts = absl::StrSplit(lines[0], ' ');
  if (options_.access_log != nullptr) {
    std::string traceparent;
    for (size_t i = 1; i < lines.size(); ++i) {
      if (absl::StartsWithIgnoreCase(lines[i], "traceparent:")) {
        traceparent = std::string(absl::StripAsciiWhitespace(lines[i].substr(12)));
      }
    }
    absl::MutexLock lock(&keep_mu_);
    Exchange& x = exchanges_[fd];
    if (parts.size() == 3) {
      x.method = parts[0].substr(0, 16);
      x.path = parts[1].substr(0, std::min(parts[1].find('?'), size_t{256}));
    }
    x.traceparent = traceparent.substr(0, 256);
  }
  if (parts.size() != 3 || !absl::StartsWith(parts[2], "HTTP/1.")) {
    Reply(fd, ErrorResponse(400, "bad request line"));
    return false;
  }
  int64_t content_length = -1;
  bool expect_continue = false, chunked = false;
  // HTTP/1.1 keeps the connection unless asked not to; HTTP/1.0 only when asked to; "close"
  // anywhere in a Connection header wins.
  bool keep = parts[2] != "HTTP/1.0", saw_close = false, saw_length = false;
  std::string authorization, proxy_tenant;
  bool saw_authorization = false, saw_proxy_tenant = false;
  for (size_t i = 1; i < lines.size(); ++i) {
    const size_t colon = lines[i].find(':');
    if (colon == std::string::npos) continue;
    const std::string name = absl::AsciiStrToLower(lines[i].substr(0, colon));
    if (name == "authorization") {  // as sent: a key's case matters
      if (saw_authorization) {
        // Two could be read differently by a proxy in front than here.
        Reply(fd, ErrorResponse(400, "more than one Authorization header"));
        return false;
      }
      saw_authorization = true;
      authorization = std::string(absl::StripAsciiWhitespace(lines[i].substr(colon + 1)));
    }
    if (!options_.tenant_header.empty() && name == options_.tenant_header) {
      if (saw_proxy_tenant) {  // (as for Authorization: a proxy might read two otherwise)
        Reply(fd, ErrorResponse(400,
                                absl::StrCat("more than one ", options_.tenant_header, " header")));
        return false;
      }
      saw_proxy_tenant = true;
      proxy_tenant = std::string(absl::StripAsciiWhitespace(lines[i].substr(colon + 1)));
      if (!ValidTenantName(proxy_tenant)) {  // present, so not empty either
        Reply(fd, ErrorResponse(400, absl::StrCat("the ", options_.tenant_header,
                                                  " header must be 1 to 128 of [A-Za-z0-9._-]")));
        return false;
      }
    }
    const std::string value =
        absl::AsciiStrToLower(absl::StripAsciiWhitespace(lines[i].substr(colon + 1)));
    if (name == "content-length") {
      // Digits only, and one value however often it is given (a proxy in front might read
      // "+5" or two different lengths otherwise than this server does).
      int64_t n = -1;
      if (value.empty() || value.find_first_not_of("0123456789") != std::string::npos ||
          !absl::SimpleAtoi(value, &n) || (saw_length && n != content_length)) {
        Reply(fd, ErrorResponse(400, "bad Content-Length"));
        return false;
      }
      content_length = n;
      saw_length = true;
    }
    if (name == "connection") {
      for (absl::string_view token : absl::StrSplit(value, ',')) {
        token = absl::StripAsciiWhitespace(token);
        if (token == "close") saw_close = true;
        if (token == "keep-alive") keep = true;
      }
    }
    if (name == "expect" && value == "100-continue") expect_continue = true;
    if (name == "transfer-encoding" && value != "identity") chunked = true;
  }
  if (saw_close) keep = false;
  const std::string& method = parts[0];
  // With API keys, a caller without a valid one is answered before its body is read (which may
  // be megabytes), and the connection ends.
  if (options_.api_keys != nullptr && parts[1].substr(0, parts[1].find('?')) != "/health") {
    if (absl::Status s = options_.api_keys->Current()->Authenticate(authorization).status();
        !s.ok()) {
      Unauthenticated(fd, s);
      return false;
    }
  }
  std::string body = data.substr(header_end + 4);
  // Only POST bodies are read: another method with a body (or chunked) ends the connection after
  // the answer, so that its unread bytes are never taken for a request. A HEAD does too (its
  // answer here carries a body, which a client reusing the connection would not expect).
  if (method != "POST" && (content_length > 0 || chunked || method == "HEAD")) keep = false;
  if (method == "POST") {
    if (chunked || content_length < 0) {
      Reply(fd, ErrorResponse(411, "send the body with a Content-Length"));
      return false;
    }
    if (content_length > options_.max_body_bytes) {
      Reply(fd, ErrorResponse(
                    413, absl::StrCat("the body is over ", options_.max_body_bytes, " bytes")));
      return false;
    }
    if (expect_continue && static_cast<int64_t>(body.size()) < content_length &&
        !WriteAll(fd, "HTTP/1.1 100 Continue\r\n\r\n", wake, deadline)) {
      return false;
    }
    while (static_cast<int64_t>(body.size()) < content_length) {
      if (!RecvSome(fd, &body, wake, deadline)) return false;
    }
  } else if (content_length < 0) {
    content_length = 0;
  }
  // What came after this request's body is the next request's start.
  if (static_cast<int64_t>(body.size()) > content_length) {
    *pending = body.substr(static_cast<size_t>(content_length));
    body.resize(static_cast<size_t>(content_length));
  }
  const std::string path = parts[1].substr(0, parts[1].find('?'));
  SetKeepAlive(fd, keep && serving_.load());
  if (!proxy_tenant.empty() && options_.access_log != nullptr) {
    absl::MutexLock lock(&keep_mu_);
    exchanges_[fd].tenant = proxy_tenant;
  }
  Handle(fd, method, path, body, authorization, proxy_tenant);
  keep = KeepAlive(fd);
  {
    absl::MutexLock lock(&keep_mu_);
    keep_alive_.erase(fd);
  }
  return keep && serving_.load();
}

void OpenAiGateway::Unauthenticated(int fd, const absl::Status& why) {
  TenantMetrics{options_.metrics, "http"}.Unauthenticated();
  Reply(fd, ErrorResponse(401, why.message()));
}

void OpenAiGateway::Handle(int fd, const std::string& method, const std::string& path,
                           const std::string& body, const std::string& authorization,
                           const std::string& proxy_tenant) {
  if (path == "/health") {
    // 503 once the coordinator stops serving, so that load balancers drop it first.
    Reply(fd, serving_.load() ? JsonResponse(200, "{\"status\":\"ok\"}")
                              : ErrorResponse(503, "the coordinator is shutting down"));
    return;
  }
  const Tenant* tenant = nullptr;
  std::shared_ptr<const ApiKeys> keys;  // the keys in force, held while their tenant is used
  if (options_.api_keys != nullptr) {
    keys = options_.api_keys->Current();
    absl::StatusOr<const Tenant*> t = keys->Authenticate(authorization);
    if (!t.ok()) {  // (a key revoked since ServeRequest checked it)
      Unauthenticated(fd, t.status());
      return;
    }
    tenant = *t;
    if (options_.access_log != nullptr) {
      absl::MutexLock lock(&keep_mu_);
      exchanges_[fd].tenant = tenant->name;
    }
  }
  if (path == "/v1/models" || absl::StartsWith(path, "/v1/models/")) {
    // A model's name may hold '/' (an organisation's prefix), sent as is or as %2F.
    const std::string only = PercentDecoded(
        absl::string_view(path).substr(std::min(path.size(), std::strlen("/v1/models/"))));
    if (method != "GET") {
      Reply(fd, ErrorResponse(405, absl::StrCat("use GET ", path)));
    } else if (path != "/v1/models" && only.empty()) {
      Reply(fd, ErrorResponse(404, "no model named in the path"));
    } else {
      Models(fd, tenant, only);
    }
  } else if (path == "/v1/completions") {
    if (method != "POST") {
      Reply(fd, ErrorResponse(405, "use POST /v1/completions"));
    } else {
      Completion(fd, body, /*chat=*/false, tenant, proxy_tenant, authorization);
    }
  } else if (path == "/v1/chat/completions") {
    if (method != "POST") {
      Reply(fd, ErrorResponse(405, "use POST /v1/chat/completions"));
    } else {
      Completion(fd, body, /*chat=*/true, tenant, proxy_tenant, authorization);
    }
  } else if (path == "/tokenize" || path == "/detokenize") {
    if (method != "POST") {
      Reply(fd, ErrorResponse(405, absl::StrCat("use POST ", path)));
    } else {
      Tokens(fd, body, /*tokenize=*/path == "/tokenize", tenant);
    }
  } else {
    Reply(fd, ErrorResponse(404, absl::StrCat("no such endpoint: ", path)));
  }
}

template <typename Rpc>
grpc::Status OpenAiGateway::Unary(absl::Duration timeout, Rpc&& rpc) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  if (!Register(&ctx)) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the coordinator is stopping");
  }
  const grpc::Status s = rpc(&ctx);
  Unregister(&ctx);
  return s;
}

void OpenAiGateway::Tokens(int fd, const std::string& body, bool tokenize, const Tenant* tenant) {
  auto refuse = [&](const absl::Status& s, absl::string_view param) {
    Reply(fd, ErrorResponse(400, s.message(), param));
  };
  absl::StatusOr<JsonDocument> parsed = JsonDocument::Parse(body, "request body");
  if (!parsed.ok()) return refuse(parsed.status(), "");
  const JsonValue root = parsed->root();
  absl::StatusOr<absl::string_view> model_name = root.StringField("model");
  if (!model_name.ok()) return refuse(model_name.status(), "model");
  // A fine-tune named as the model tokenizes as its base.
  v1::GenerateRequest named;
  named.set_model(std::string(*model_name));
  ResolveModel(&named);
  if (tenant != nullptr) {
    // A tenant tokenizes with the models it may use (a base, or one of its fine-tunes).
    std::vector<std::string> fine_tunes;
    const bool allowed = Served(named, &fine_tunes) &&
                         (named.fine_tune_id().empty()
                              ? ApiKeys::AllowsAny(*tenant, named.model(), fine_tunes)
                              : ApiKeys::Allows(*tenant, named.model(), named.fine_tune_id()));
    if (!allowed) {
      Reply(fd, ErrorResponse(404, ApiKeys::NotFound(*model_name, "").message(), "model"));
      return;
    }
  }
  std::string answer;
  grpc::Status status;
  if (tokenize) {
    v1::TokenizeRequest request;
    request.set_model(named.model());
    absl::StatusOr<absl::string_view> prompt = root.StringField("prompt");
    if (!prompt.ok()) return refuse(prompt.status(), "prompt");
    request.set_text(std::string(*prompt));
    absl::StatusOr<bool> special = root.BoolFieldOr("add_special_tokens", true);
    if (!special.ok()) return refuse(special.status(), "add_special_tokens");
    request.set_add_special_tokens(*special);
    absl::StatusOr<bool> strs = root.BoolFieldOr("return_token_strs", false);
    if (!strs.ok()) return refuse(strs.status(), "return_token_strs");
    request.set_return_token_texts(*strs);
    v1::TokenizeResponse response;
    status = Unary(absl::Seconds(10), [&](grpc::ClientContext* ctx) {
      return stub_->Tokenize(ctx, request, &response);
    });
    std::vector<std::string> texts;
    for (const std::string& t : response.token_texts()) texts.push_back(JsonQuote(t));
    answer = absl::StrCat(
        "{\"count\":", response.token_ids_size(),
        ",\"max_model_len\":", response.max_context_tokens(), ",\"tokens\":[",
        absl::StrJoin(response.token_ids(), ","), "]",
        *strs ? absl::StrCat(",\"token_strs\":[", absl::StrJoin(texts, ","), "]") : "", "}");
  } else {
    v1::DetokenizeRequest request;
    request.set_model(named.model());
    absl::StatusOr<JsonValue> tokens = root.Field("tokens");
    if (!tokens.ok()) return refuse(tokens.status(), "tokens");
    absl::StatusOr<std::vector<JsonValue>> items = tokens->AsArray();
    if (!items.ok()) return refuse(items.status(), "tokens");
    v1::TokenIds ids;
    if (absl::Status s = TokenIds(*items, &ids); !s.ok()) return refuse(s, "tokens");
    *request.mutable_token_ids() = ids.ids();
    v1::DetokenizeResponse response;
    status = Unary(absl::Seconds(10), [&](grpc::ClientContext* ctx) {
      return stub_->Detokenize(ctx, request, &response);
    });
    answer = absl::StrCat("{\"prompt\":", JsonQuote(response.text()), "}");
  }
  if (!status.ok()) {
    Reply(fd, ErrorResponse(HttpStatusOf(status.error_code()), status.error_message()));
    return;
  }
  Reply(fd, JsonResponse(200, answer));
}

namespace {

// A fine-tune's context as ListModels gives it (the model's from a coordinator that gives none).
uint32_t FineTuneContext(const v1::ModelInfo& m, int i) {
  return i < m.fine_tune_max_context_tokens_size() ? m.fine_tune_max_context_tokens(i)
                                                   : m.max_context_tokens();
}

}  // namespace

void OpenAiGateway::Models(int fd, const Tenant* tenant, const std::string& only) {
  v1::ListModelsResponse resp;
  const grpc::Status status = Unary(absl::Seconds(10), [&](grpc::ClientContext* ctx) {
    return stub_->ListModels(ctx, v1::ListModelsRequest(), &resp);
  });
  if (!status.ok()) {
    Reply(fd, ErrorResponse(HttpStatusOf(status.error_code()), status.error_message()));
    return;
  }
  std::vector<std::string> data;
  for (const v1::ModelInfo& m : resp.models()) {
    // The base model (no parent), then each of its fine-tunes.
    auto entry = [&m](const std::string& id, const std::string& parent, uint32_t context) {
      return absl::StrCat("{\"id\":", JsonQuote(id),
                          ",\"object\":\"model\",\"created\":0,\"owned_by\":\"strata\",\"root\":",
                          JsonQuote(m.name()),
                          ",\"parent\":", parent.empty() ? "null" : JsonQuote(parent),
                          ",\"max_model_len\":", context, "}");
    };
    if ((only.empty() || only == m.name()) &&
        (tenant == nullptr || ApiKeys::Allows(*tenant, m.name(), ""))) {
      data.push_back(entry(m.name(), "", m.max_context_tokens()));
    }
    for (int i = 0; i < m.fine_tune_ids_size(); ++i) {
      const std::string& ft = m.fine_tune_ids(i);
      if ((only.empty() || only == ft) &&
          (tenant == nullptr || ApiKeys::Allows(*tenant, m.name(), ft))) {
        data.push_back(entry(ft, m.name(), FineTuneContext(m, i)));
      }
    }
  }
  if (!only.empty()) {
    // GET /v1/models/{model}: that one, or 404 as for a model the tenant may not use.
    if (data.empty()) {
      Reply(fd,
            ErrorResponse(404, absl::StrCat("The model `", only, "` does not exist."), "model"));
    } else {
      Reply(fd, JsonResponse(200, data.front()));
    }
    return;
  }
  Reply(fd, JsonResponse(200, absl::StrCat("{\"object\":\"list\",\"data\":[",
                                           absl::StrJoin(data, ","), "]}")));
}

bool OpenAiGateway::Served(const v1::GenerateRequest& request,
                           std::vector<std::string>* fine_tunes) {
  std::shared_ptr<const v1::ListModelsResponse> models;
  {
    absl::MutexLock lock(&mu_);
    models = models_;
  }
  if (models == nullptr) return false;
  for (const v1::ModelInfo& m : models->models()) {
    if (m.name() != request.model()) continue;
    if (fine_tunes != nullptr)
      fine_tunes->assign(m.fine_tune_ids().begin(), m.fine_tune_ids().end());
    return request.fine_tune_id().empty() ||
           std::find(m.fine_tune_ids().begin(), m.fine_tune_ids().end(), request.fine_tune_id()) !=
               m.fine_tune_ids().end();
  }
  return false;
}

uint32_t OpenAiGateway::ResolveModel(v1::GenerateRequest* request) {
  // The cached list (ListModels, kModelsTtl), or a new one when it is stale, or when the name is
  // not in it and it is over half a second old (a fine-tune registered just now).
  for (int attempt = 0; attempt < 2; ++attempt) {
    std::shared_ptr<const v1::ListModelsResponse> models;  // shared, never copied
    absl::Duration age;
    {
      absl::MutexLock lock(&mu_);
      age = absl::Now() - models_at_;
      models = models_;
    }
    if (age >= (attempt == 0 ? kModelsTtl : absl::Milliseconds(500))) {
      auto fresh = std::make_shared<v1::ListModelsResponse>();
      const grpc::Status s = Unary(absl::Seconds(5), [&](grpc::ClientContext* ctx) {
        return stub_->ListModels(ctx, v1::ListModelsRequest(), fresh.get());
      });
      if (!s.ok()) return 0;  // Generate reports what is wrong
      models = std::move(fresh);
      absl::MutexLock lock(&mu_);
      models_ = models;
      models_at_ = absl::Now();
    } else if (attempt == 1) {
      return 0;  // fresh, and the name is not in it
    }
    for (const v1::ModelInfo& m : models->models()) {
      if (m.name() == request->model()) {
        for (int i = 0; i < m.fine_tune_ids_size(); ++i) {
          if (m.fine_tune_ids(i) == request->fine_tune_id()) return FineTuneContext(m, i);
        }
        return m.max_context_tokens();
      }
      if (!request->fine_tune_id().empty()) continue;
      for (int i = 0; i < m.fine_tune_ids_size(); ++i) {
        if (m.fine_tune_ids(i) == request->model()) {
          request->set_fine_tune_id(m.fine_tune_ids(i));
          request->set_model(m.name());
          return FineTuneContext(m, i);
        }
      }
    }
  }
  return 0;
}

grpc::Status OpenAiGateway::EchoPrompt(const v1::GenerateRequest& request, bool want_first_token,
                                       std::string* text, std::string* first_token,
                                       bool* first_added) {
  const absl::Duration timeout = absl::Seconds(10);
  *first_added = false;
  if (request.prompt_case() == v1::GenerateRequest::kText) {
    *text = request.text();
    if (!want_first_token) return grpc::Status::OK;
    // As Generate tokenizes it (BOS first); the empty text shows the tokens the server adds.
    v1::TokenizeRequest with;
    with.set_model(request.model());
    with.set_text(request.text());
    with.set_add_special_tokens(true);
    with.set_return_token_texts(true);
    v1::TokenizeRequest empty;
    empty.set_model(request.model());
    empty.set_add_special_tokens(true);
    v1::TokenizeResponse tokens, added;
    grpc::Status s = Unary(
        timeout, [&](grpc::ClientContext* ctx) { return stub_->Tokenize(ctx, with, &tokens); });
    if (!s.ok()) return s;
    s = Unary(timeout,
              [&](grpc::ClientContext* ctx) { return stub_->Tokenize(ctx, empty, &added); });
    if (!s.ok()) return s;
    *first_token = tokens.token_texts_size() > 0 ? tokens.token_texts(0) : "";
    *first_added = added.token_ids_size() > 0;
    return grpc::Status::OK;
  }
  const v1::TokenIds& ids = request.token_ids();
  v1::DetokenizeRequest all;
  all.set_model(request.model());
  *all.mutable_token_ids() = ids.ids();
  all.set_skip_special_tokens(request.sampling().skip_special_tokens());
  v1::DetokenizeRequest one;
  one.set_model(request.model());
  one.set_skip_special_tokens(all.skip_special_tokens());
  if (ids.ids_size() > 0) one.add_token_ids(ids.ids(0));
  v1::DetokenizeResponse whole;
  grpc::Status s =
      Unary(timeout, [&](grpc::ClientContext* ctx) { return stub_->Detokenize(ctx, all, &whole); });
  if (!s.ok()) return s;
  *text = whole.text();
  if (!want_first_token) return grpc::Status::OK;
  v1::DetokenizeResponse one_text;
  s = Unary(timeout,
            [&](grpc::ClientContext* ctx) { return stub_->Detokenize(ctx, one, &one_text); });
  if (!s.ok()) return s;
  *first_token = one_text.text();
  return grpc::Status::OK;
}

void OpenAiGateway::Completion(int fd, const std::string& body, bool chat, const Tenant* tenant,
                               const std::string& proxy_tenant, const std::string& authorization) {
  const int wake = wake_fd_.get();
  std::string param;
  absl::StatusOr<CompletionCall> call =
      chat ? ChatFromJson(body, &param) : CompletionFromJson(body, &param);
  if (!call.ok()) {
    Reply(fd, ErrorResponse(400, call.status().message(), param));
    return;
  }
  // A stream's end is the connection's close.
  if (call->stream) SetKeepAlive(fd, false);
  const std::string model_asked = call->request.model();
  const uint32_t context = ResolveModel(&call->request);
  ApiKeys::Lease lease;  // one of the tenant's concurrent requests, until this returns
  Gauge* running = nullptr;
  absl::Cleanup leave = [&running] {
    if (running != nullptr) running->Add(-1);
  };
  const TenantMetrics metrics{options_.metrics, "http"};
  if (tenant != nullptr) {
    auto refused = [&](const char* reason) { metrics.Refused(*tenant, reason); };
    // A model the tenant may not use reads as one that does not exist (its name tells nothing).
    // Checked here, against what the cluster serves, before any call could answer otherwise.
    if (!Served(call->request, nullptr) ||
        !ApiKeys::Allows(*tenant, call->request.model(), call->request.fine_tune_id())) {
      refused("model");
      const bool named_fine_tune =
          !call->request.fine_tune_id().empty() && model_asked == call->request.model();
      Reply(fd,
            ErrorResponse(404,
                          ApiKeys::NotFound(named_fine_tune ? call->request.model() : model_asked,
                                            named_fine_tune ? call->request.fine_tune_id() : "")
                              .message(),
                          named_fine_tune ? "fine_tune_id" : "model"));
      return;
    }
    // Every generation of the request (n choices of each prompt) is one of the tenant's.
    const int64_t generations =
        static_cast<int64_t>(call->n) * (1 + static_cast<int64_t>(call->more_prompts.size()));
    if (absl::Status rate = ApiKeys::Admit(*tenant, generations, absl::Now()); !rate.ok()) {
      refused("rate");
      Reply(fd, ErrorResponse(429, rate.message()));
      return;
    }
    absl::StatusOr<ApiKeys::Lease> l = ApiKeys::Acquire(*tenant, generations);
    if (!l.ok()) {
      refused("concurrency");
      Reply(fd, ErrorResponse(429, l.status().message()));
      return;
    }
    lease = std::move(*l);
    running = metrics.Running(*tenant);  // counted as taken once past the tokens check (below)
    call->request.set_cache_salt(ApiKeys::CacheSalt(*tenant, call->request.cache_salt()));
  }
  // Chat with tools the model may call: how it writes calls (kNone: no calls are looked for), and
  // the text the prompt ends with to make it call one (tool_choice required or named).
  ToolCallFormat tool_format = ToolCallFormat::kNone;
  std::string forced_call;
  // Chat with a model that thinks: its reasoning comes apart from its answer, which starts there.
  ReasoningFormat reasoning_format = ReasoningFormat::kNone;
  ReasoningStart reasoning_start = ReasoningStart::kOpen;
  if (chat) {
    auto it = options_.chat_templates.find(call->request.model());
    if (it == options_.chat_templates.end()) {
      Reply(fd, ErrorResponse(404, absl::StrCat("model \"", model_asked, "\" is not served here"),
                              "model"));
      return;
    }
    const ChatTemplate& chat_template = it->second;
    const ChatFormat format = chat_template.format;
    if (format == ChatFormat::kNone) {
      Reply(fd, ErrorResponse(400,
                              absl::StrCat("model \"", model_asked,
                                           "\" has no chat template Strata can run: start the "
                                           "coordinator with --chat_format (llama3, chatml), or "
                                           "use /v1/completions"),
                              "model"));
      return;
    }
    const bool tool_turns =
        std::any_of(call->messages.begin(), call->messages.end(),
                    [](const ChatMessage& m) { return m.role == "tool" || !m.tool_calls.empty(); });
    if (format != ChatFormat::kTemplate && (!call->tools.empty() || tool_turns)) {
      Reply(fd,
            ErrorResponse(400,
                          absl::StrCat("model \"", model_asked, "\" is served with the built-in ",
                                       ChatFormatName(format),
                                       " chat format, which has no way to give it tools or "
                                       "their results: serve it with its own chat template"),
                          call->tools.empty() ? "messages" : "tools"));
      return;
    }
    if (!call->tools.empty()) {
      if (!chat_template.takes_tools) {
        Reply(fd, ErrorResponse(400,
                                absl::StrCat("model \"", model_asked,
                                             "\"'s chat template does not give it tools"),
                                "tools"));
        return;
      }
      if (call->tool_choice != ToolChoice::kNone) {
        tool_format = chat_template.tool_format;
        if (tool_format == ToolCallFormat::kNone) {
          Reply(fd, ErrorResponse(
                        400,
                        absl::StrCat("Strata does not know how model \"", model_asked,
                                     "\" writes tool calls: start the coordinator with "
                                     "--tool_call_format (hermes, llama3_json, mistral, "
                                     "mistral_args, pythonic, qwen3_coder, deepseek, deepseek_v31, "
                                     "minimax, phi4_mini or internlm2), or send "
                                     "\"tool_choice\": \"none\""),
                        "tools"));
          return;
        }
      }
    }
    absl::StatusOr<std::string> prompt =
        RenderChatTemplate(chat_template, call->messages,
                           {.tools = &call->tools,
                            .template_kwargs = &call->template_kwargs,
                            .add_generation_prompt = call->add_generation_prompt,
                            .continue_final_message = call->continue_final_message});
    if (!prompt.ok()) {
      // The template refused the conversation (raise_exception: roles that do not alternate, a
      // role it does not know), or failed on it.
      Reply(fd, ErrorResponse(400, prompt.status().message(), "messages"));
      return;
    }
    reasoning_format = chat_template.reasoning_format;
    reasoning_start = ReasoningStartOf(
        *prompt, call->continue_final_message ? *call->messages.back().content : "");
    const bool forced =
        call->tool_choice == ToolChoice::kRequired || call->tool_choice == ToolChoice::kNamed;
    const bool structured = call->request.sampling().structured_output().kind_case() !=
                            v1::StructuredOutput::KIND_NOT_SET;
    if (forced || structured) {
      // The call or the structured answer is the answer: a reasoning the prompt left open is
      // closed before it (the grammar would not let the model close it).
      if (reasoning_format != ReasoningFormat::kNone &&
          reasoning_start == ReasoningStart::kThinking) {
        absl::StrAppend(&*prompt, "</think>\n\n");
      }
      reasoning_start = ReasoningStart::kAnswer;
    }
    if (forced) {
      forced_call = ForcedToolCallPrefix(tool_format, call->tool_choice_name);
      ConstrainForcedCall(tool_format, &*call);
      absl::StrAppend(&*prompt, forced_call);
    }
    call->request.set_text(*std::move(prompt));
    // The calls' and the reasoning's markers may be special tokens (Mistral's [TOOL_CALLS]), which
    // the parsers must see.
    if (tool_format != ToolCallFormat::kNone || reasoning_format != ReasoningFormat::kNone) {
      call->request.mutable_sampling()->set_skip_special_tokens(false);
    }
    // The turn ends at the format's marker: a stop token when the vocabulary has it as one (left
    // out of the text), else a stop string. Not with ignore_eos, which asks to go on past ends.
    v1::SamplingParams& s = *call->request.mutable_sampling();
    if (!s.ignore_eos()) {
      if (chat_template.end_of_turn.has_value()) {
        s.add_stop_token_ids(*chat_template.end_of_turn);
      } else if (format != ChatFormat::kTemplate) {
        s.add_stop(ChatEndOfTurn(format));
      } else if (!chat_template.end_marker.empty()) {
        s.add_stop(chat_template.end_marker);
      }
    }
    // Until the turn ends or the context is full (the coordinator ends a sequence there; an
    // unknown context, before any worker reported one, must not cut the answer short).
    if (call->default_max_tokens) {
      s.set_max_tokens(std::min<uint32_t>(65536, context > 0 ? context : 65536));
    }
  }
  // One Generate call per choice: n per prompt, prompt p's choices at p * n + i. Choice i of a
  // prompt has seed + i where a seed was given (unset, each call draws its own); choice k > 0's
  // request id gets "-k". Choice 0 is read on this thread, the others on threads of their own.
  // A prompt's choices share its cached blocks.
  struct Choice {
    grpc::ClientContext ctx;
    std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader;
    std::string text;
    // Answered whole: the generated and (echo) the prompt's log-probabilities as they came.
    google::protobuf::RepeatedPtrField<v1::PositionLogprobs> logprobs, prompt_logprobs;
    int64_t offset = 0;  // streamed: the text offset of the next token
    const char* finish = nullptr;
    v1::Usage usage;
    bool first_event = true;
    // Echo: its prompt's text and first token's, and whether the server adds that token.
    std::string echo_text, first_token;
    bool first_added = false;
    // Chat: the reasoning apart from the answer (models that think), the calls in the answer
    // (with tools), and how many calls were answered (streamed) so far.
    std::optional<ReasoningSplitter> reasoning;
    std::optional<ToolCallParser> tool_calls;
    int calls_sent = 0;
  };
  const bool score_only = call->score_only;
  const bool want_logprobs = call->request.sampling().has_logprobs();
  const int n = call->n;
  const int num_prompts = 1 + static_cast<int>(call->more_prompts.size());
  const int total = num_prompts * n;
  std::vector<v1::GenerateRequest> requests;
  for (int p = 0; p < num_prompts; ++p) {
    v1::GenerateRequest request = call->request;
    if (p > 0) {
      const v1::GenerateRequest& other = call->more_prompts[p - 1];
      if (other.prompt_case() == v1::GenerateRequest::kText) {
        request.set_text(other.text());
      } else {
        *request.mutable_token_ids() = other.token_ids();
      }
    }
    requests.push_back(std::move(request));
  }
  std::vector<std::unique_ptr<Choice>> choices;
  std::vector<grpc::ClientContext*> contexts;
  // Only qwen3_coder's raw values are read by their schemas' types.
  const ToolParamTypes param_types =
      tool_format == ToolCallFormat::kQwen3Coder ? ParamTypesOf(call->tools) : ToolParamTypes();
  for (int k = 0; k < total; ++k) {
    choices.push_back(std::make_unique<Choice>());
    contexts.push_back(&choices.back()->ctx);
    if (tool_format != ToolCallFormat::kNone) {
      choices.back()->tool_calls.emplace(tool_format, forced_call, &param_types);
    }
    if (reasoning_format != ReasoningFormat::kNone) {
      choices.back()->reasoning.emplace(reasoning_format, reasoning_start);
    }
  }
  // A piece of a chat answer's text (`last`: the generation's end) as reasoning, content and the
  // calls completed in it.
  struct ChatPiece {
    std::string reasoning, content;
    std::vector<ToolCall> calls;
  };
  auto chat_piece = [&](Choice& c, absl::string_view text, bool last) {
    ChatPiece piece;
    std::string answer(text);
    if (c.reasoning.has_value()) {
      ReasoningSplitter::Output r = c.reasoning->Add(text);
      if (last) {
        ReasoningSplitter::Output rest = c.reasoning->Finish();
        r.reasoning += rest.reasoning;
        r.content += rest.content;
      }
      if (call->include_reasoning) piece.reasoning = std::move(r.reasoning);
      answer = std::move(r.content);
    }
    if (c.tool_calls.has_value()) {
      ToolCallParser::Output o = c.tool_calls->Add(answer);
      if (last) {
        ToolCallParser::Output rest = c.tool_calls->Finish();
        o.content += rest.content;
        for (ToolCall& t : rest.calls) o.calls.push_back(std::move(t));
      }
      piece.content = std::move(o.content);
      piece.calls = std::move(o.calls);
    } else {
      piece.content = std::move(answer);
    }
    return piece;
  };
  const bool say_reasoning = reasoning_format != ReasoningFormat::kNone && call->include_reasoning;
  // finish_reason "tool_calls" for a choice that called tools and stopped; with a named function
  // forced, "stop" (as OpenAI and vLLM answer).
  const bool calls_finish = call->tool_choice != ToolChoice::kNamed;
  // A chat answer's piece as "content", "reasoning_content" and "tool_calls" (`delta`: a stream's,
  // the calls numbered from c.calls_sent, the reasoning only when there is some); content is null
  // when there are calls and no text, reasoning_content null when the model did not think.
  auto chat_message = [&](Choice& c, const ChatPiece& piece, bool delta) {
    const std::string& text = piece.content;
    std::vector<std::string> entries;
    for (const ToolCall& t : piece.calls) {
      entries.push_back(
          absl::StrCat("{", delta ? absl::StrCat("\"index\":", c.calls_sent, ",") : "",
                       "\"id\":", JsonQuote(t.id), ",\"type\":\"function\",\"function\":{\"name\":",
                       JsonQuote(t.name), ",\"arguments\":", JsonQuote(t.arguments), "}}"));
      ++c.calls_sent;
    }
    std::vector<std::string> fields;
    // A delta of reasoning alone has no content (as vLLM's), so that clients tell the phases apart.
    const bool reasoning_only =
        delta && text.empty() && entries.empty() && !piece.reasoning.empty();
    if (!reasoning_only) {
      fields.push_back(absl::StrCat("\"content\":",
                                    text.empty() && !entries.empty() ? "null" : JsonQuote(text)));
    }
    if (say_reasoning && (!delta || !piece.reasoning.empty())) {
      fields.push_back(absl::StrCat("\"reasoning_content\":",
                                    piece.reasoning.empty() ? "null" : JsonQuote(piece.reasoning)));
    }
    if (!entries.empty()) {
      fields.push_back(absl::StrCat("\"tool_calls\":[", absl::StrJoin(entries, ","), "]"));
    }
    return absl::StrJoin(fields, ",");
  };
  if (call->echo) {
    for (int p = 0; p < num_prompts; ++p) {
      Choice& c = *choices[p * n];
      const grpc::Status s =
          EchoPrompt(requests[p], want_logprobs, &c.echo_text, &c.first_token, &c.first_added);
      if (!s.ok()) {
        Reply(fd, ErrorResponse(HttpStatusOf(s.error_code()), s.error_message()));
        return;
      }
      for (int i = 1; i < n; ++i) {
        choices[p * n + i]->echo_text = c.echo_text;
        choices[p * n + i]->first_token = c.first_token;
        choices[p * n + i]->first_added = c.first_added;
      }
    }
  }
  // The echoed prompt's log-probabilities: its first token's none, then the worker's.
  auto prompt_logprobs = [&](const Choice& c,
                             const google::protobuf::RepeatedPtrField<v1::PositionLogprobs>& lp) {
    Logprobs out;
    out.AddFirst(c.first_token, !c.first_added);
    out.Add(lp);
    // A SentencePiece tokenizer writes the first word's dummy-prefix space into its token's text
    // (" The" for a prompt "The...", " " then " The" for " The..."), a space the echoed text does
    // not have: where the token texts come to one byte more than the echoed text and the first
    // token with text starts with a space, that space is the prefix, and the offsets after that
    // token count one less.
    const size_t k = c.first_added ? 1 : 0;  // the prompt's first token of the text
    size_t first_text = k;
    while (first_text < out.tokens.size() && out.tokens[first_text].empty()) ++first_text;
    if (out.offset == static_cast<int64_t>(c.echo_text.size()) + 1 &&
        first_text < out.tokens.size() && absl::StartsWith(out.tokens[first_text], " ")) {
      for (size_t j = first_text + 1; j < out.offsets.size(); ++j) --out.offsets[j];
      --out.offset;
    }
    return out;
  };
  const Exchange exchange = ExchangeOf(fd);
  // Passed on only when well formed (gRPC metadata is printable ASCII), at version 00's length.
  const std::string traceparent =
      TraceIdOf(exchange.traceparent).empty() ? "" : exchange.traceparent.substr(0, 55);
  for (int k = 0; k < total; ++k) {
    if (!Register(contexts[k])) {
      for (int j = 0; j < k; ++j) Unregister(contexts[j]);
      Reply(fd, ErrorResponse(503, "the coordinator is stopping"));
      return;
    }
    // Whose generations they are, for fair sharing on the workers (beside the secret), or the
    // trusted proxy's tenant as it named it.
    if (tenant != nullptr && !options_.gateway_secret.empty()) {
      contexts[k]->AddMetadata(kGatewayTenantMetadata, tenant->name);
      // Rewritten whole: the key (which authenticated, so printable) after one space, as gRPC
      // metadata must be printable; the header may have held tabs around it.
      contexts[k]->AddMetadata(
          "authorization",
          absl::StrCat("Bearer ", absl::StripAsciiWhitespace(
                                      absl::StripAsciiWhitespace(authorization).substr(7))));
    } else if (!proxy_tenant.empty()) {
      contexts[k]->AddMetadata(options_.tenant_header, proxy_tenant);
    }
    // For the access log: the calls' records name this request, its client and its trace.
    if (options_.access_log != nullptr && !options_.gateway_secret.empty()) {
      contexts[k]->AddMetadata(kGatewayHttpRequestMetadata, exchange.id);
      contexts[k]->AddMetadata(kGatewayClientMetadata, exchange.peer);
      if (!traceparent.empty()) contexts[k]->AddMetadata("traceparent", traceparent);
    }
  }
  // Each prompt's request, its seed and id set per choice in place (the call has sent it when
  // Generate returns): choice i seeded seed + i, choice k > 0 named "<id>-k".
  const v1::SamplingParams& asked = call->request.sampling();
  const std::string& id_asked = call->request.request_id();
  // Echo with logprobs: only each prompt's first choice asks for the prompt's log-probabilities
  // (they turn prefix caching off, so n choices asking would prefill the prompt n times); its
  // reader hands them to the prompt's other choices.
  const bool share_scores = call->echo && want_logprobs && n > 1;
  struct PromptScores {
    absl::Notification ready;
    // Written before ready; `filled` false: the first choice ended without them (failed or
    // cancelled), and the request is failing.
    google::protobuf::RepeatedPtrField<v1::PositionLogprobs> logprobs;
    bool filled = false;
  };
  std::vector<std::unique_ptr<PromptScores>> scores;
  for (int p = 0; share_scores && p < num_prompts; ++p) {
    scores.push_back(std::make_unique<PromptScores>());
  }
  for (int k = 0; k < total; ++k) {
    v1::GenerateRequest& request = requests[k / n];
    const int i = k % n;
    if (share_scores && i == 1) request.mutable_sampling()->clear_prompt_logprobs();
    if (asked.has_seed())
      request.mutable_sampling()->set_seed(asked.seed() + static_cast<uint64_t>(i));
    if (k > 0 && !id_asked.empty()) request.set_request_id(absl::StrCat(id_asked, "-", k));
    choices[k]->reader = stub_->Generate(contexts[k], request);
  }
  // A client that leaves while no token flows (queued, in a long prefill) cancels too.
  // (Without a thread for it, the calls go on unwatched: a client that leaves is then noticed at
  // the first write.)
  std::optional<DisconnectWatch> watch;
  try {
    watch.emplace(fd, wake, contexts);
  } catch (const std::system_error& e) {
    LOG(WARNING) << "http: no thread to watch a connection: " << e.what();
  }
  const int64_t created = absl::ToUnixSeconds(absl::Now());
  const char* object = chat ? "chat.completion.chunk" : "text_completion";
  std::string id;          // from the first chunk of any choice (streamed: under the writer's lock)
  bool streaming = false;  // the 200 head went out (the same)
  std::atomic<bool> client_gone{false};
  // A stream's events, written in order by whichever choice's thread finds the socket free.
  SerialWriter writer(fd, wake, kWriteTimeout, [&] {
    client_gone.store(true);
    for (grpc::ClientContext* ctx : contexts) ctx->TryCancel();  // frees the sequences
  });
  absl::Mutex mu;
  grpc::Status failure;  // the first choice to fail (under mu)
  // The fields every answer and event opens with ({"id", "object", "created", "model").
  auto envelope = [&](const char* object_name) {
    return absl::StrCat("{\"id\":", JsonQuote(id), ",\"object\":\"", object_name,
                        "\",\"created\":", created, ",\"model\":", JsonQuote(model_asked));
  };
  // One entry of "choices".
  auto choice_json = [&](int index, const std::string& content, const Logprobs* lp,
                         const char* reason) {
    return absl::StrCat(
        "{\"index\":", index, ",", content, ",\"logprobs\":",
        lp == nullptr ? "null"
        : chat        ? lp->ChatJson()
                      : lp->Json(),
        ",\"finish_reason\":", reason != nullptr ? absl::StrCat("\"", reason, "\"") : "null", "}");
  };
  std::atomic<int64_t> refused_for_tokens{0};
  // The request is taken once one of its generations is past the tokens check: it sent an event,
  // or ended without one otherwise than refused (for tokens, or as a request no worker could
  // take). One refused only is not counted as taken, as over gRPC.
  std::atomic<bool> counted{false};
  auto taken = [&] {
    if (tenant != nullptr && !counted.exchange(true)) metrics.Counted(*tenant);
  };
  auto read = [&](int index) {
    Choice& c = *choices[index];
    v1::GenerateResponse chunk;
    while (c.reader->Read(&chunk)) {
      taken();
      if (chunk.has_usage()) c.usage = chunk.usage();
      const char* reason = OpenAiFinishReason(chunk.finish_reason());
      if (score_only && reason != nullptr) reason = "length";  // the one token left out
      if (reason != nullptr) c.finish = reason;
      if (score_only) {  // the generated token is not part of the answer
        chunk.clear_text();
        chunk.clear_logprobs();
      }
      if (client_gone.load()) continue;  // draining after a cancel
      if (!call->stream) {
        if (index == 0 && id.empty()) {
          id = absl::StrCat(chat ? "chatcmpl-" : "cmpl-", chunk.request_id());
        }
        c.text += chunk.text();
        if (want_logprobs) {
          c.logprobs.MergeFrom(chunk.logprobs());
          c.prompt_logprobs.MergeFrom(chunk.prompt_logprobs());
        }
        continue;
      }
      // This chunk's entries of "choices", one event each.
      std::vector<std::string> entries;
      if (call->echo && c.first_event) {
        // The prompt first, in an event of its own (its scores from the prompt's first choice).
        std::optional<Logprobs> lp;
        if (want_logprobs && !share_scores) {
          lp = prompt_logprobs(c, chunk.prompt_logprobs());
        } else if (want_logprobs) {
          PromptScores& ps = *scores[index / n];
          if (index % n == 0) {
            ps.logprobs = chunk.prompt_logprobs();
            ps.filled = true;
            ps.ready.Notify();
          } else {
            ps.ready.WaitForNotification();
            // No scores to echo: the first choice failed, and so does the request (its error
            // ends the stream); this choice sends nothing more.
            if (!ps.filled) continue;
          }
          lp = prompt_logprobs(c, ps.logprobs);
        }
        entries.push_back(choice_json(index, absl::StrCat("\"text\":", JsonQuote(c.echo_text)),
                                      lp ? &*lp : nullptr, nullptr));
        c.offset = static_cast<int64_t>(c.echo_text.size());
        c.first_event = false;
      }
      // Chat with tools: the text that is not part of a call, and the calls completed.
      ChatPiece parsed;
      if (chat) {
        parsed = chat_piece(c, chunk.text(), reason != nullptr);
      } else {
        parsed.content = chunk.text();
      }
      if (!parsed.content.empty() || !parsed.reasoning.empty() || !parsed.calls.empty() ||
          reason != nullptr || chunk.logprobs_size() > 0) {
        Logprobs lp;
        lp.offset = c.offset;  // text_offset counts from the completion's start
        if (want_logprobs) lp.Add(chunk.logprobs());
        c.offset = lp.offset;
        // Chat: each choice's first delta names the role.
        std::string content;
        if (chat) {
          content = absl::StrCat("\"delta\":{", c.first_event ? "\"role\":\"assistant\"," : "",
                                 chat_message(c, parsed, true), "}");
          if (calls_finish && c.calls_sent > 0 && reason != nullptr &&
              std::string_view(reason) == "stop") {
            reason = "tool_calls";
          }
        } else {
          content = absl::StrCat("\"text\":", JsonQuote(chunk.text()));
        }
        c.first_event = false;
        entries.push_back(choice_json(index, content, want_logprobs ? &lp : nullptr, reason));
      }
      // The head before the first event of any choice; a failed write ends the stream (the
      // writer cancels every call).
      writer.Append([&](std::string* out) {
        if (id.empty()) id = absl::StrCat(chat ? "chatcmpl-" : "cmpl-", chunk.request_id());
        if (!streaming) {
          absl::StrAppend(out, Head(200, "text/event-stream", -1));
          NoteStatus(fd, 200);
          streaming = true;
        }
        for (const std::string& entry : entries) {
          absl::StrAppend(out, "data: ", envelope(object), ",\"choices\":[", entry, "]}\n\n");
        }
      });
    }
    // The prompt's other choices wait for its scores only while streaming: a first choice that
    // ended without an event (failed, cancelled) releases them.
    if (share_scores && index % n == 0 && !scores[index / n]->ready.HasBeenNotified()) {
      scores[index / n]->ready.Notify();
    }
    grpc::Status status = c.reader->Finish();
    if (tenant != nullptr && ApiKeys::IsTokensRefusal(FromGrpcStatus(status))) {
      refused_for_tokens.fetch_add(1);  // never ran: its requests_per_minute share goes back
    } else if (!RefusedBeforeRunning(status.error_code())) {
      taken();
    }
    if (status.ok() && share_scores && call->stream && index % n == 0 &&
        !scores[index / n]->filled) {
      // Ended well without a first event: the prompt's other choices have nothing to echo.
      status = grpc::Status(grpc::StatusCode::INTERNAL, "no prompt log-probabilities to echo");
    }
    if (!status.ok() && !client_gone.load()) {
      // One choice failed: the answer is that error, so the others stop now (first one wins).
      absl::MutexLock lock(&mu);
      if (failure.ok()) {
        failure = status;
        for (grpc::ClientContext* ctx : contexts) ctx->TryCancel();
      }
    }
  };
  std::vector<std::thread> others;
  int started = 1;  // choices read on threads of their own: [1, started)
  for (; started < total; ++started) {
    try {
      others.emplace_back(read, started);
    } catch (const std::system_error& e) {
      // No thread for this choice: the request fails, and every call stops now.
      LOG(WARNING) << "http: no thread for a choice: " << e.what();
      absl::MutexLock lock(&mu);
      failure = grpc::Status(grpc::StatusCode::UNAVAILABLE, "out of threads: try again");
      for (grpc::ClientContext* ctx : contexts) ctx->TryCancel();
      break;
    }
  }
  read(0);
  for (int k = started; k < total; ++k) read(k);  // cancelled: they end at once
  for (std::thread& t : others) t.join();
  for (grpc::ClientContext* ctx : contexts) Unregister(ctx);
  if (tenant != nullptr) ApiKeys::Unadmit(*tenant, refused_for_tokens.load());
  const bool gone = client_gone.load() || (watch.has_value() && watch->gone());
  watch.reset();
  if (gone) {
    SetKeepAlive(fd, false);  // nothing was answered: the connection must not carry on
    return;
  }
  if (!failure.ok()) {
    const int http = HttpStatusOf(failure.error_code());
    const std::string param =
        http == 400 || http == 404 ? ParamOfRefusal(failure.error_message(), chat) : "";
    if (streaming) {
      Reply(fd, absl::StrCat("data: ", OpenAiErrorJson(http, failure.error_message(), param),
                             "\n\ndata: [DONE]\n\n"));
    } else {
      Reply(fd, ErrorResponse(http, failure.error_message(), param));
    }
    return;
  }
  // Each prompt once (its first choice's, with its cache use), the completions of every choice
  // (none when only scoring the prompts).
  v1::Usage usage = choices[0]->usage;
  for (int p = 1; p < num_prompts; ++p) {
    const v1::Usage& u = choices[p * n]->usage;
    usage.set_num_prompt_tokens(usage.num_prompt_tokens() + u.num_prompt_tokens());
    v1::CachedTokens& cached = *usage.mutable_cached();
    cached.set_num_device_tokens(cached.num_device_tokens() + u.cached().num_device_tokens());
    cached.set_num_host_tokens(cached.num_host_tokens() + u.cached().num_host_tokens());
    cached.set_num_disk_tokens(cached.num_disk_tokens() + u.cached().num_disk_tokens());
  }
  uint32_t completion = 0;
  for (const auto& c : choices) completion += c->usage.num_completion_tokens();
  usage.set_num_completion_tokens(score_only ? 0 : completion);
  if (!call->stream) {
    std::vector<std::string> entries;
    for (int k = 0; k < total; ++k) {
      Choice& c = *choices[k];
      std::string content;
      if (chat) {
        content = absl::StrCat("\"message\":{\"role\":\"assistant\",",
                               chat_message(c, chat_piece(c, c.text, true), false), "}");
        if (calls_finish && c.calls_sent > 0 && c.finish != nullptr &&
            std::string_view(c.finish) == "stop") {
          c.finish = "tool_calls";
        }
      } else {
        content = absl::StrCat("\"text\":", JsonQuote(c.echo_text + c.text));
      }
      Logprobs lp;
      if (want_logprobs) {
        if (call->echo) {
          lp = prompt_logprobs(c, choices[k / n * n]->prompt_logprobs);  // the prompt's first
          lp.offset = static_cast<int64_t>(c.echo_text.size());
        }
        lp.Add(c.logprobs);
      }
      entries.push_back(choice_json(k, content, want_logprobs ? &lp : nullptr, c.finish));
    }
    Reply(fd, JsonResponse(200, absl::StrCat(envelope(chat ? "chat.completion" : "text_completion"),
                                             ",\"choices\":[", absl::StrJoin(entries, ","),
                                             "],\"usage\":", UsageJson(usage), "}")));
    return;
  }
  std::string tail = streaming ? "" : Head(200, "text/event-stream", -1);
  if (call->include_usage) {
    absl::StrAppend(&tail, "data: ", envelope(object),
                    ",\"choices\":[],\"usage\":", UsageJson(usage), "}\n\n");
  }
  absl::StrAppend(&tail, "data: [DONE]\n\n");
  Reply(fd, tail);
}

absl::StatusOr<std::unique_ptr<OpenAiGateway>> StartOpenAiGateway(
    const std::string& listen, std::shared_ptr<grpc::Channel> serving,
    OpenAiGatewayOptions options) {
  if (listen.empty()) return nullptr;
  const bool tls = options.tls != nullptr;
  absl::StatusOr<std::unique_ptr<OpenAiGateway>> g =
      OpenAiGateway::Start(listen, serving, std::move(options));
  if (g.ok()) {
    LOG(INFO) << "OpenAI-compatible API at " << (tls ? "https://" : "http://") << listen
              << "/v1 (port " << (*g)->port() << ")";
  }
  return g;
}

}  // namespace strata
