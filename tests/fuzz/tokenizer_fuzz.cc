// The tokenizer from untrusted bytes: prompts (any text a client sends) encoded, and token ids
// (a client's, or a model's) decoded whole and as they stream, with the bundled model's byte-level
// BPE (GPT-2's regex), Qwen3's (Llama 3's regex, NFC) and Mistral 7B's (SentencePiece-style, byte
// fallback).
//
// Input: one option byte (bits 0-1 pick the tokenizer, bit 2 adds special tokens, bit 3 skips them
// in decoding), then the text; the same bytes are also read as token ids, two bytes each.
//
// Checks: valid UTF-8 encodes and invalid UTF-8 is refused with INVALID_ARGUMENT; the bundled
// tokenizer decodes what it encoded back to the very text, and all of them to a fixed point
// (decoding what the first round trip gave encodes and decodes to itself: normalization happens
// once; not for Mistral's around special tokens, which gain a space each round as Hugging Face's
// do); every id decodes, and streaming (IncrementalDecoder) gives what decoding at once gives.
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/utf8.h"
#include "tests/fuzz/fuzz_target.h"
#include "tokenizer/tokenizer.h"

namespace {

const std::vector<std::unique_ptr<strata::Tokenizer>>& Tokenizers() {
  static const auto* const all = [] {
    auto* t = new std::vector<std::unique_ptr<strata::Tokenizer>>;
    for (const char* dir : {"models/strata-tiny/base", "tokenizer/testdata/qwen3_unpacked",
                            "tokenizer/testdata/mistral7b_unpacked"}) {
      auto loaded = strata::Tokenizer::FromModelDir(dir);
      FUZZ_CHECK(loaded.ok(), "%s: %s", dir, loaded.status().ToString().c_str());
      t->push_back(*std::move(loaded));
    }
    return t;
  }();
  return *all;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  Tokenizers();
  return 0;
}

STRATA_FUZZ_TARGET(data, size) {
  strata::fuzz::FuzzInput in(data, size);
  const uint8_t options = in.Byte();
  const size_t which = (options & 3) % Tokenizers().size();
  const strata::Tokenizer& t = *Tokenizers()[which];
  const bool add_special = (options & 4) != 0;
  const bool skip_special = (options & 8) != 0;
  const absl::string_view text = in.Rest();

  const absl::StatusOr<std::vector<int32_t>> ids = t.Encode(text, add_special);
  if (!strata::IsValidUtf8(text)) {
    FUZZ_CHECK(absl::IsInvalidArgument(ids.status()), "invalid UTF-8 gave %s",
               ids.status().ToString().c_str());
  } else {
    FUZZ_CHECK(ids.ok(), "%s", ids.status().ToString().c_str());
    for (int32_t id : *ids) FUZZ_CHECK(id >= 0 && id < t.vocab_size(), "id %d", id);
    const absl::StatusOr<std::vector<int32_t>> plain = t.Encode(text);
    const absl::StatusOr<std::string> once = t.Decode(*plain);
    FUZZ_CHECK(once.ok(), "%s", once.status().ToString().c_str());
    if (which == 0) {
      FUZZ_CHECK(*once == text, "tokenizer %zu: \"%s\" decodes as \"%s\"", which,
                 std::string(text).c_str(), once->c_str());
    }
    // SentencePiece-style tokenizers (Mistral's) start every piece of text between added tokens
    // with a space, as Hugging Face's do: text after a special token gains one each round.
    bool special = false;
    for (int32_t id : *plain) special = special || t.IsSpecial(id);
    if (which != 2 || !special) {
      const absl::StatusOr<std::vector<int32_t>> again = t.Encode(*once);
      FUZZ_CHECK(again.ok(), "%s", again.status().ToString().c_str());
      const absl::StatusOr<std::string> twice = t.Decode(*again);
      FUZZ_CHECK(twice.ok() && *twice == *once,
                 "tokenizer %zu: \"%s\" decodes as \"%s\", then \"%s\"", which,
                 std::string(text).c_str(), once->c_str(),
                 twice.ok() ? twice->c_str() : twice.status().ToString().c_str());
    }
  }

  std::vector<int32_t> raw;
  for (size_t i = 0; i + 1 < text.size(); i += 2) {
    const uint32_t v = static_cast<uint8_t>(text[i]) << 8 | static_cast<uint8_t>(text[i + 1]);
    raw.push_back(static_cast<int32_t>(v % static_cast<uint32_t>(t.vocab_size())));
  }
  const absl::StatusOr<std::string> decoded = t.Decode(raw, skip_special);
  FUZZ_CHECK(decoded.ok(), "%s", decoded.status().ToString().c_str());
  FUZZ_CHECK(strata::IsValidUtf8(*decoded), "decoding gave invalid UTF-8");
  strata::IncrementalDecoder stream(&t, skip_special);
  std::string streamed;
  for (int32_t id : raw) streamed += stream.Add(id);
  streamed += stream.Flush();
  FUZZ_CHECK(streamed == *decoded, "tokenizer %zu: streaming gave \"%s\", decoding \"%s\"", which,
             streamed.c_str(), decoded->c_str());
  return 0;
}
