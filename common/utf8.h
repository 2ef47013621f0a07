// UTF-8 helpers for tokenization and streaming detokenization.
#ifndef STRATA_COMMON_UTF8_H_
#define STRATA_COMMON_UTF8_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"

namespace strata {

// Appends the UTF-8 encoding of code point `cp` (which must be a valid scalar value).
void AppendUtf8(char32_t cp, std::string* out);

// Length in bytes of the valid UTF-8 sequence starting at s[0], or 0 when s[0] does not start one
// (invalid lead byte, bad continuation, overlong form, surrogate, beyond U+10FFFF, or truncated).
size_t ValidUtf8SequenceLength(absl::string_view s);

// Decodes the valid sequence at the start of `s` (see ValidUtf8SequenceLength) into *cp.
size_t DecodeUtf8(absl::string_view s, char32_t* cp);

bool IsValidUtf8(absl::string_view s);

// Replaces every maximal invalid subsequence with U+FFFD, the way WHATWG and Rust's from_utf8_lossy
// do.
std::string Utf8Lossy(absl::string_view s);

// For streaming: the length of the longest prefix of `s` that can be emitted now. Complete valid
// sequences are emittable; so is any byte that can never become part of a valid sequence (the
// caller replaces it with U+FFFD). A trailing sequence that is valid so far but incomplete is held
// back.
size_t EmittableUtf8Prefix(absl::string_view s);

}  // namespace strata

#endif  // STRATA_COMMON_UTF8_H_
