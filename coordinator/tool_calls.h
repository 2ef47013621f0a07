// What the chat API finds in a model's output: tool calls, for the chat API's "tools" (the formats
// models write calls in, finding the calls in generated text, whole or as it streams, and the text
// that makes a model start one: tool_choice "required" or a named function), and reasoning (see
// ReasoningSplitter).
//
// Formats (each as models trained on it write it; vLLM's parsers of the same names):
//   hermes       <tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>, any number, text
//                around them (Hermes 2/3, Qwen 2.5 and 3, and the many templates that copied them)
//   llama3_json  the whole answer a JSON call {"name": "f", "parameters": {...}}, or several
//                separated by ";", optionally after <|python_tag|> (Llama 3.1 to 3.3)
//   mistral      [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...] (Mistral's v3 tokenizers) or
//                [TOOL_CALLS]f[ARGS]{...} (v11 and later: `mistral_args`, which is what forcing a
//                call writes for them); both are read either way.
//   pythonic     the whole answer a list of Python calls [f(a=1, b='x'), g()], keyword arguments
//                of Python or JSON literals, optionally between <|python_start|> and
//                <|python_end|> (Llama 3.2 / 4 pythonic templates, Gemma 3, ToolACE); the
//                arguments come back as the JSON object of the keywords.
//   qwen3_coder  <tool_call>\n<function=f>\n<parameter=a>\nvalue\n</parameter>\n</function>\n
//                </tool_call> (Qwen3-Coder): each value raw text, read as its parameter's JSON
//                Schema type says (a string as is, numbers, booleans, objects and arrays as JSON).
//   deepseek     <｜tool▁calls▁begin｜> then calls <｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n
//                ```json\n{...}\n```<｜tool▁call▁end｜> (DeepSeek V3 / R1), then
//                <｜tool▁calls▁end｜>
//   deepseek_v31 the same markers, each call <｜tool▁call▁begin｜>f<｜tool▁sep｜>{...}
//                <｜tool▁call▁end｜> (DeepSeek V3.1); either DeepSeek form is read in both.
//   minimax      <tool_calls>\n{"name": "f", "arguments": {...}}\n...</tool_calls> (MiniMax-M1)
//   phi4_mini    functools[{"name": "f", "arguments": {...}}, ...] to the end (Phi-4-mini)
//   internlm2    <|action_start|><|plugin|>\n{"name": "f", "arguments": {...}}<|action_end|>
//                (InternLM2 / 2.5)
// A call's arguments are the model's JSON object as it wrote it. A call that does not parse (not
// JSON, no name, arguments that are not an object) is left in the text as content, so nothing the
// model wrote is lost.
#ifndef STRATA_COORDINATOR_TOOL_CALLS_H_
#define STRATA_COORDINATOR_TOOL_CALLS_H_

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace strata {

enum class ToolCallFormat {
  kNone,
  kHermes,
  kLlama3Json,
  kMistral,
  kMistralArgs,
  kPythonic,
  kQwen3Coder,
  kDeepSeek,
  kDeepSeekV31,
  kMiniMax,
  kPhi4Mini,
  kInternLm2,
};

const char* ToolCallFormatName(ToolCallFormat format);
// hermes, llama3_json, mistral, mistral_args, pythonic, qwen3_coder, deepseek, deepseek_v31,
// minimax, phi4_mini, internlm2 or none.
absl::StatusOr<ToolCallFormat> ToolCallFormatFromName(absl::string_view name);
// The format whose markers a chat template writes (kNone when none, or when the template never
// mentions its tools).
ToolCallFormat DetectToolCallFormat(absl::string_view chat_template);

// The JSON Schema types each tool's parameters may take ("string", "integer", "null", ...; those
// of `type` and of anyOf / oneOf's entries), by tool and parameter name: how qwen3_coder's raw
// parameter values are read.
using ToolParamTypes = std::map<std::string, std::map<std::string, std::vector<std::string>>>;

struct ToolCall {
  std::string id;         // "call_" and 24 letters or digits; 9 of them for Mistral's formats
  std::string name;       // the function
  std::string arguments;  // a JSON object, as the model wrote it
};

bool operator==(const ToolCall& a, const ToolCall& b);

// Whether `name` is a function's name as tools name them (and as forced calls write them into a
// prompt): letters, digits, _ . and -, at least one.
bool IsToolName(absl::string_view name);

// A new call id for `format` (Mistral's templates refuse ids that are not 9 letters or digits).
std::string NewToolCallId(ToolCallFormat format);

// What the prompt ends with to make the model call a function: `name` (up to its arguments'
// opening brace), or any function when empty. The model's output then continues this text; give
// the same text to the parser.
std::string ForcedToolCallPrefix(ToolCallFormat format, absl::string_view name);

// A tool as a forced call's grammar needs it: its name and its parameters' JSON schema (as JSON
// text; empty when it has none).
struct ToolSchema {
  std::string name;
  std::string parameters;
};

// What keeps a forced call's text to a well-formed call of one of `tools` (of `name` when not
// empty), for formats whose calls are JSON: a JSON schema for the call (the name and its arguments
// under the tool's parameters; for Mistral and Phi-4-mini the list of calls, one only unless
// `parallel`; for formats that write the name outside the JSON, the arguments alone) and the
// part of ForcedToolCallPrefix that the schema's text starts with (structured output's prefix).
// The arguments are an object whatever the parameters say: a schema that cannot be seen to allow
// only objects (another "type", enum, const, not, or a $ref, anyOf, oneOf or allOf that does not
// lead to object schemas) takes any object instead. The grammar ends with the call's JSON, and
// ToolCallParser::Finish reads a call whose closing marker never came. Qwen3-Coder's XML and
// pythonic calls (not JSON) get a GBNF grammar instead. Nullopt for formats that write the name
// outside the JSON when no name is given.
struct ForcedCallGrammar {
  std::string json_schema;
  std::string prefix;
  // Instead of json_schema, for Qwen3-Coder's XML and pythonic calls: a GBNF grammar of the rest
  // of the call (parameters as the tool's schema names them, required ones present, values typed
  // where the schema types them, text or any literal otherwise), with no prefix.
  std::string gbnf;
};
std::optional<ForcedCallGrammar> ForcedToolCallGrammar(ToolCallFormat format,
                                                       absl::string_view name,
                                                       const std::vector<ToolSchema>& tools,
                                                       bool parallel);

// Finds the calls in one generation's text as it arrives. Text that cannot be part of a call goes
// out as content at once; text that may open one is held until the call completes (or turns out
// not to be one). The same text gives the same content and calls however it is split. One per
// generation; not thread-safe.
class ToolCallParser {
 public:
  struct Output {
    std::string content;
    std::vector<ToolCall> calls;
  };

  // `forced`: the ForcedToolCallPrefix the prompt ended with, read as if generated. `types`
  // (qwen3_coder; may be null; must outlive the parser): the tools' parameter types.
  explicit ToolCallParser(ToolCallFormat format, absl::string_view forced = "",
                          const ToolParamTypes* types = nullptr);

  // The next piece of generated text.
  Output Add(absl::string_view text);
  // The generation ended: what was held, as calls or content.
  Output Finish();
  // Calls found so far.
  int num_calls() const { return num_calls_; }

 private:
  enum class Mode {
    kStart,    // llama3_json, pythonic: leading whitespace held until the answer's start decides
    kContent,  // text outside calls
    kCall,     // inside a call (hermes: after <tool_call>; the others: to the end)
    kText,     // llama3_json, pythonic: the answer is text, no call can follow
  };
  void Scan(Output* out);
  void Parse(absl::string_view call_text, absl::string_view raw, Output* out);
  void Say(absl::string_view text, Output* out);

  const ToolCallFormat format_;
  const ToolParamTypes* const types_;
  Mode mode_;
  std::string held_;  // text not yet given out
  // Whitespace before the call being read: content again if the call does not parse.
  std::string space_before_call_;
  bool said_ = false;      // content given out
  size_t space_sent_ = 0;  // whitespace at the end of the content given out
  size_t searched_ = 0;    // hermes, in a call: no close marker starts before this offset
  int num_calls_ = 0;
};

// Reasoning ("thinking"): the text between <think> and </think> that Qwen3, QwQ, DeepSeek-R1 and
// its distills and many others write before the answer proper. The chat API returns it as
// "reasoning_content", apart from "content" (as DeepSeek's API and vLLM's reasoning parsers do),
// so that clients can show or hide it, and looks for tool calls in the answer only.
enum class ReasoningFormat { kNone, kThink };

const char* ReasoningFormatName(ReasoningFormat format);
// think or none.
absl::StatusOr<ReasoningFormat> ReasoningFormatFromName(absl::string_view name);
// kThink for a chat template that writes </think> (its model thinks), else kNone.
ReasoningFormat DetectReasoningFormat(absl::string_view chat_template);

// Where an answer starts, as far as reasoning goes.
enum class ReasoningStart {
  kOpen,      // it may open with <think>
  kThinking,  // inside the reasoning: the prompt ends with <think> (a <think> written anyway goes)
  kGoingOn,   // inside reasoning text it continues (continue_final_message): nothing is dropped
  kAnswer,    // in the answer: no reasoning comes (a forced tool call, or an answer continued)
};

// The start of an answer to `prompt`; `continued`: when the answer continues the final message
// (continue_final_message), that message's content. Only the end of the prompt counts (a <think>
// in a user's message does not open anything).
ReasoningStart ReasoningStartOf(absl::string_view prompt, absl::string_view continued);

// Splits one generation's text, as it arrives, into reasoning and answer. The reasoning is what
// follows a <think> that opens the answer (or one the prompt leaves open, as DeepSeek-R1's
// template does) up to </think>; the rest is the answer. Leading whitespace of the reasoning and
// of an answer after it is dropped. Text that may be the start of a marker is held until it is
// known; the same text gives the same parts however it is split. With kNone everything is
// answer. One per generation; not thread-safe.
class ReasoningSplitter {
 public:
  struct Output {
    std::string reasoning;
    std::string content;
  };

  ReasoningSplitter(ReasoningFormat format, ReasoningStart start);

  Output Add(absl::string_view text);
  // The generation ended: what was held.
  Output Finish();

 private:
  enum class Mode {
    kStart,     // before the answer's first characters show whether it opens with <think>
    kThinking,  // inside the reasoning
    kAnswer,    // after it, or with none
  };
  void Scan(Output* out);

  Mode mode_;
  std::string held_;
  bool reasoning_started_ = false;  // a non-space character of the reasoning given out
  bool skip_open_ = false;          // kThinking: a <think> the model writes first is dropped
  bool answer_started_ = false;     // the same for the answer after a </think>
  bool had_reasoning_ = false;      // a </think> came: the answer's leading whitespace goes
};

}  // namespace strata

#endif  // STRATA_COORDINATOR_TOOL_CALLS_H_
