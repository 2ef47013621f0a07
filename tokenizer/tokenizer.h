// Tokenizer: a Hugging Face tokenizer.json (with tokenizer_config.json) as a C++ object.
//
// Supported, which covers Llama 2/3, Mistral, Qwen2/3 and GPT-2-style models:
//   normalizers     NFC, NFKC, NFD, NFKD, Lowercase, Prepend, Replace, Strip, Sequence
//   pre-tokenizers  ByteLevel, Split (regex or string; every behavior), Metaspace, Digits,
//   Whitespace,
//                   WhitespaceSplit, Sequence
//   model           BPE: byte-level, or over characters with byte_fallback / unk; ignore_merges
//   post-processor  TemplateProcessing, ByteLevel, Sequence
//   decoders        ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip, Sequence
//   added tokens    matched in the raw text before normalization (longest match), with lstrip,
//   rstrip
//                   and single_word
// Anything else is refused at load with a message naming the file and field. Regexes run on PCRE2
// in Unicode mode (the patterns of GPT-2, Llama 3 and Qwen use \p{L}, \p{N} and lookahead).
//
// A Tokenizer is immutable after loading and safe to use from many threads at once.
#ifndef STRATA_TOKENIZER_TOKENIZER_H_
#define STRATA_TOKENIZER_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace strata {

class Tokenizer {
 public:
  // Loads `dir`/tokenizer.json and, when present, `dir`/tokenizer_config.json (bos/eos tokens,
  // add_bos_token / add_eos_token).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromModelDir(const std::string& dir);
  // From the text of a tokenizer.json; `source` names it in errors. `config_json` is the text of
  // tokenizer_config.json, or empty.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(absl::string_view tokenizer_json,
                                                             absl::string_view config_json,
                                                             std::string source);
  ~Tokenizer();

  // Token ids of `text`. With add_special_tokens, the post-processor's tokens (a BOS, say) are
  // added. INVALID_ARGUMENT when `text` is not valid UTF-8.
  absl::StatusOr<std::vector<int32_t>> Encode(absl::string_view text,
                                              bool add_special_tokens = false) const;

  // The text of `ids`; invalid UTF-8 (from byte tokens) becomes U+FFFD. INVALID_ARGUMENT for an id
  // outside [0, vocab_size()).
  absl::StatusOr<std::string> Decode(absl::Span<const int32_t> ids,
                                     bool skip_special_tokens = false) const;

  // The bytes that token `id` contributes when decoded in the middle of a sequence (possibly an
  // incomplete UTF-8 sequence); `first` applies the start-of-text rules (a stripped leading space).
  // Empty for special tokens when skip_special_tokens. For streaming (see IncrementalDecoder).
  std::string TokenBytes(int32_t id, bool first, bool skip_special_tokens) const;

  // The token's string as stored in the vocabulary (byte-level tokens in their mapped form).
  absl::string_view TokenString(int32_t id) const;
  // The id of a vocabulary or added token string, if any.
  std::optional<int32_t> TokenId(absl::string_view token) const;

  // Vocabulary size including added tokens (one past the largest id).
  int32_t vocab_size() const;
  bool IsSpecial(int32_t id) const;
  // -1 when the tokenizer has none.
  int32_t bos_token_id() const;
  int32_t eos_token_id() const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Streams text out of a growing sequence of token ids without ever emitting a broken UTF-8
// sequence: bytes of a character split across tokens are held back until the character is complete.
// Bytes that can never form valid UTF-8 are emitted as U+FFFD. Not thread-safe; one per sequence.
class IncrementalDecoder {
 public:
  IncrementalDecoder(const Tokenizer* tokenizer, bool skip_special_tokens)
      : tokenizer_(tokenizer), skip_special_tokens_(skip_special_tokens) {}
  // A completion's decoder: its tokens continue `prompt`'s. Where the prompt decodes to any text
  // (an id that is not a skipped special token), the first completion token is decoded as one
  // inside a sequence, so a SentencePiece word keeps its leading space: the text that decoding
  // the prompt and the completion at once gives after the prompt's (except after a prompt of
  // token ids that ends inside a character: its bytes are not carried over).
  IncrementalDecoder(const Tokenizer* tokenizer, bool skip_special_tokens,
                     absl::Span<const int32_t> prompt);

  // Adds a token; returns the text that became complete (possibly empty).
  std::string Add(int32_t id);
  // Returns whatever is held back (as U+FFFD where incomplete) and resets the held bytes.
  std::string Flush();

 private:
  const Tokenizer* tokenizer_;
  bool skip_special_tokens_;
  bool first_ = true;
  std::string pending_;
};

}  // namespace strata

#endif  // STRATA_TOKENIZER_TOKENIZER_H_
