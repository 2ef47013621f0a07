// Test tokenizers: a Llama-2-style (SentencePiece) tokenizer.json, as Hugging Face writes one for a
// Llama or Mistral model: "▁" prepended and spaces replaced by "▁" in a normalizer, BPE over
// characters with byte fallback, <s> prepended by a TemplateProcessing post-processor, a decoder
// that turns "▁" back into spaces and strips the first one.
#ifndef STRATA_TOKENIZER_LLAMA2_STYLE_H_
#define STRATA_TOKENIZER_LLAMA2_STYLE_H_

#include <string>

#include "absl/strings/str_cat.h"

namespace strata {

// `vocab`: the BPE vocabulary's JSON members ("\"<unk>\": 0, ..."); `merges`: the JSON array's
// members ("\"▁ h\", ..."). <unk>, <s> and </s> (special, ids unk_id, bos_id, eos_id) must be in
// the vocabulary.
inline std::string Llama2StyleTokenizerJson(const std::string& vocab, const std::string& merges,
                                            int unk_id, int bos_id, int eos_id) {
  return absl::StrCat(R"({
  "added_tokens": [
    {"id": )",
                      unk_id, R"(, "content": "<unk>", "special": true},
    {"id": )",
                      bos_id, R"(, "content": "<s>", "special": true},
    {"id": )",
                      eos_id, R"(, "content": "</s>", "special": true}],
  "normalizer": {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": "▁"},
    {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
  "pre_tokenizer": null,
  "post_processor": {"type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
    "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [)",
                      bos_id, R"(], "tokens": ["<s>"]}}},
  "decoder": {"type": "Sequence", "decoders": [
    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
    {"type": "ByteFallback"}, {"type": "Fuse"},
    {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
  "model": {"type": "BPE", "unk_token": "<unk>", "byte_fallback": true, "fuse_unk": true,
    "vocab": {)",
                      vocab, R"(},
    "merges": [)",
                      merges, "]}}");
}

}  // namespace strata

#endif  // STRATA_TOKENIZER_LLAMA2_STYLE_H_
