#include "tokenizer/tokenizer.h"

#include <unicode/unorm2.h>
#include <unicode/ustring.h>

#include <algorithm>
#include <cstring>
#include <queue>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "common/json.h"
#include "common/mapped_file.h"
#include "common/status_macros.h"
#include "common/utf8.h"
#include "tokenizer/regex.h"

namespace strata {
namespace {

// The GPT-2 pre-tokenization pattern that ByteLevel(use_regex=true) applies.
constexpr absl::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// GPT-2's reversible map from bytes to printable characters.
struct ByteMap {
  std::string byte_to_char[256];
  absl::flat_hash_map<char32_t, uint8_t> char_to_byte;
  ByteMap() {
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
      const char32_t cp = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + n++);
      AppendUtf8(cp, &byte_to_char[b]);
      char_to_byte[cp] = static_cast<uint8_t>(b);
    }
  }
};

const ByteMap& Bytes() {
  static const ByteMap* map = new ByteMap();
  return *map;
}

bool IsAscii(absl::string_view s) {
  for (char c : s) {
    if (static_cast<unsigned char>(c) >= 0x80) return false;
  }
  return true;
}

bool IsWordChar(char32_t c) {
  return c == '_' || (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
         c >= 0x80;  // letters of other scripts count as word characters
}

bool IsSpace(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

// ---- Normalizers -------------------------------------------------------------------------------

struct Normalizer {
  enum class Kind { kUnicode, kLowercase, kPrepend, kReplace, kStrip };
  Kind kind;
  const UNormalizer2* form = nullptr;  // kUnicode
  std::string a, b;                    // kPrepend: a; kReplace: pattern a -> content b
  std::optional<Regex> regex;          // kReplace with a regex pattern
  bool left = false, right = false;    // kStrip
};

std::u16string ToUtf16(absl::string_view s) {
  UErrorCode err = U_ZERO_ERROR;
  int32_t len16 = 0;
  u_strFromUTF8(nullptr, 0, &len16, s.data(), static_cast<int32_t>(s.size()), &err);
  std::u16string out(static_cast<size_t>(len16), u'\0');
  err = U_ZERO_ERROR;
  u_strFromUTF8(reinterpret_cast<UChar*>(out.data()), len16, nullptr, s.data(),
                static_cast<int32_t>(s.size()), &err);
  return out;  // the input was validated as UTF-8 before normalization
}

absl::StatusOr<std::string> ToUtf8(const std::u16string& s, int32_t len) {
  UErrorCode err = U_ZERO_ERROR;
  int32_t len8 = 0;
  u_strToUTF8(nullptr, 0, &len8, reinterpret_cast<const UChar*>(s.data()), len, &err);
  std::string out(static_cast<size_t>(len8), '\0');
  err = U_ZERO_ERROR;
  u_strToUTF8(out.data(), len8, nullptr, reinterpret_cast<const UChar*>(s.data()), len, &err);
  if (U_FAILURE(err)) return absl::InternalError(absl::StrCat("ICU to UTF-8: ", u_errorName(err)));
  return out;
}

// Runs an ICU UTF-16 transformation `fn(dest, capacity, src, src_len, &err) -> length`, growing the
// destination once if it was too small.
template <typename Fn>
absl::StatusOr<std::string> TransformUtf16(absl::string_view s, const char* what, Fn fn) {
  const std::u16string in = ToUtf16(s);
  const int32_t in_len = static_cast<int32_t>(in.size());
  std::u16string out(in.size() * 3 + 16, u'\0');
  UErrorCode err = U_ZERO_ERROR;
  int32_t n = fn(reinterpret_cast<UChar*>(out.data()), static_cast<int32_t>(out.size()),
                 reinterpret_cast<const UChar*>(in.data()), in_len, &err);
  if (err == U_BUFFER_OVERFLOW_ERROR) {
    err = U_ZERO_ERROR;
    out.resize(static_cast<size_t>(n));
    n = fn(reinterpret_cast<UChar*>(out.data()), n, reinterpret_cast<const UChar*>(in.data()),
           in_len, &err);
  }
  if (U_FAILURE(err))
    return absl::InternalError(absl::StrCat("ICU ", what, ": ", u_errorName(err)));
  return ToUtf8(out, n);
}

absl::StatusOr<std::string> UnicodeNormalize(const UNormalizer2* form, absl::string_view s) {
  if (IsAscii(s)) return std::string(s);
  return TransformUtf16(
      s, "normalize",
      [form](UChar* dst, int32_t cap, const UChar* src, int32_t len, UErrorCode* err) {
        return unorm2_normalize(form, src, len, dst, cap, err);
      });
}

absl::StatusOr<std::string> Lowercase(absl::string_view s) {
  if (IsAscii(s)) {
    std::string out(s);
    for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return out;
  }
  return TransformUtf16(
      s, "lowercase", [](UChar* dst, int32_t cap, const UChar* src, int32_t len, UErrorCode* err) {
        return u_strToLower(dst, cap, src, len, "", err);
      });
}

// ---- Pre-tokenizers ----------------------------------------------------------------------------

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct PreTokenizer {
  enum class Kind { kByteLevel, kSplit, kMetaspace };
  Kind kind;
  // kByteLevel
  bool add_prefix_space = false;
  // kSplit (also ByteLevel's regex and Metaspace's split)
  std::optional<Regex> regex;
  std::string literal;  // a String pattern
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
  // kMetaspace
  std::string replacement;
  enum class Prepend { kAlways, kFirst, kNever } prepend = Prepend::kAlways;
  bool split = true;
};

struct Piece {
  std::string text;
  bool first_section;  // the piece starts the first text section of the input
};

// Splits `s` by the matches of a regex or literal, per the behavior.
void SplitPiece(const Piece& piece, const PreTokenizer& p, std::vector<Piece>* out) {
  const std::string& s = piece.text;
  std::vector<std::pair<size_t, size_t>> matches;
  if (p.regex) {
    matches = p.regex->FindAll(s);
  } else if (!p.literal.empty()) {
    for (size_t pos = s.find(p.literal); pos != std::string::npos;
         pos = s.find(p.literal, pos + p.literal.size())) {
      matches.emplace_back(pos, pos + p.literal.size());
    }
  }
  // Segments covering s: (begin, end, is_match).
  struct Segment {
    size_t b, e;
    bool match;
  };
  std::vector<Segment> segs;
  size_t pos = 0;
  for (const auto& [b, e] : matches) {
    if (b > pos) segs.push_back({pos, b, false});
    segs.push_back({b, e, true});
    pos = e;
  }
  if (pos < s.size()) segs.push_back({pos, s.size(), false});
  if (p.invert) {
    for (Segment& seg : segs) seg.match = !seg.match;
  }
  std::vector<std::string> parts;
  bool pending_next = false;  // kMergedWithNext: the last part waits for the next segment
  for (size_t i = 0; i < segs.size(); ++i) {
    const Segment& seg = segs[i];
    const std::string text = s.substr(seg.b, seg.e - seg.b);
    switch (p.behavior) {
      case SplitBehavior::kRemoved:
        if (!seg.match) parts.push_back(text);
        break;
      case SplitBehavior::kIsolated:
        parts.push_back(text);
        break;
      case SplitBehavior::kMergedWithPrevious:
        if (seg.match && !parts.empty()) {
          parts.back() += text;
        } else {
          parts.push_back(text);
        }
        break;
      case SplitBehavior::kMergedWithNext:
        if (pending_next) {
          parts.back() += text;
        } else {
          parts.push_back(text);
        }
        pending_next = seg.match;
        break;
      case SplitBehavior::kContiguous:
        if (seg.match && i > 0 && segs[i - 1].match) {
          parts.back() += text;
        } else {
          parts.push_back(text);
        }
        break;
    }
  }
  bool first = piece.first_section;
  for (std::string& part : parts) {
    if (part.empty()) continue;
    out->push_back({std::move(part), first});
    first = false;
  }
}

// ---- BPE ---------------------------------------------------------------------------------------

uint64_t PairKey(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

struct Merge {
  int32_t rank;
  int32_t merged;
};

// ---- Decoders ----------------------------------------------------------------------------------

struct Decoder {
  enum class Kind { kByteLevel, kMetaspace, kReplace, kByteFallback, kFuse, kStrip };
  Kind kind;
  std::string a, b;  // kReplace: pattern -> content; kMetaspace: replacement in a; kStrip: content
  bool strip_first = true;  // kMetaspace: strip the first token's leading space
  int start = 0, stop = 0;  // kStrip
};

// Loads a {"Regex": ...} or {"String": ...} pattern into `regex` or `literal`.
absl::Status LoadPattern(const JsonValue& pattern, std::optional<Regex>* regex,
                         std::string* literal) {
  if (std::optional<JsonValue> r = pattern.FindField("Regex")) {
    ASSIGN_OR_RETURN(absl::string_view re, r->AsString());
    absl::StatusOr<Regex> compiled = Regex::Compile(re);
    if (!compiled.ok()) return r->Error(compiled.status().message());
    *regex = std::move(*compiled);
    return absl::OkStatus();
  }
  std::optional<JsonValue> str = pattern.FindField("String");
  if (!str) return pattern.Error("must be {\"Regex\": ...} or {\"String\": ...}");
  ASSIGN_OR_RETURN(absl::string_view v, str->AsString());
  *literal = std::string(v);
  return absl::OkStatus();
}

// Calls load(item) for each element of the array `field` of a Sequence component.
template <typename Load>
absl::Status LoadSequence(const JsonValue& seq, absl::string_view field, Load load) {
  ASSIGN_OR_RETURN(JsonValue list, seq.Field(field));
  ASSIGN_OR_RETURN(auto items, list.AsArray());
  for (const JsonValue& item : items) RETURN_IF_ERROR(load(item));
  return absl::OkStatus();
}

absl::StatusOr<std::string> PatternString(const JsonValue& pattern) {
  if (std::optional<JsonValue> s = pattern.FindField("String")) {
    ASSIGN_OR_RETURN(absl::string_view v, s->AsString());
    return std::string(v);
  }
  return pattern.Error("must be {\"String\": ...} here");
}

}  // namespace

struct Tokenizer::Impl {
  std::string source;
  std::vector<std::string> id_to_token;
  absl::flat_hash_map<std::string, int32_t> token_to_id;
  std::vector<bool> special;

  struct Added {
    int32_t id;
    std::string content;
    bool special, lstrip, rstrip, single_word;
  };
  std::vector<Added> added;
  // Added tokens by first byte, longest first.
  std::vector<std::vector<const Added*>> added_by_byte =
      std::vector<std::vector<const Added*>>(256);

  std::vector<Normalizer> normalizers;
  std::vector<PreTokenizer> pre;
  bool byte_level = false;

  absl::flat_hash_map<uint64_t, Merge> merges;
  bool byte_fallback = false;
  bool ignore_merges = false;
  bool fuse_unk = false;
  int32_t unk_id = -1;
  int32_t byte_ids[256];

  std::vector<int32_t> prefix_ids, suffix_ids;
  std::vector<Decoder> decoders;
  int32_t bos_id = -1, eos_id = -1;

  absl::Status LoadModel(const JsonValue& model);
  absl::Status LoadAdded(const JsonValue& list);
  absl::Status LoadNormalizer(const JsonValue& n);
  absl::Status LoadPreTokenizer(const JsonValue& p);
  absl::Status LoadPostProcessor(const JsonValue& p);
  absl::Status LoadDecoder(const JsonValue& d);
  absl::Status LoadConfig(const JsonValue& config, bool have_template);

  absl::StatusOr<std::string> Normalize(std::string text) const;
  std::vector<Piece> PreTokenize(std::string text, bool first_section) const;
  void Bpe(absl::string_view word, std::vector<int32_t>* out) const;
  std::string DecodeToken(int32_t id, bool first) const;
};

// ---- Loading -----------------------------------------------------------------------------------

absl::Status Tokenizer::Impl::LoadModel(const JsonValue& model) {
  ASSIGN_OR_RETURN(std::string type, model.StringFieldOr("type", "BPE"));
  if (type != "BPE") {
    return model.Field("type")->Error(
        absl::StrCat("is \"", type, "\"; only BPE tokenizers are supported"));
  }
  for (const char* field : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    ASSIGN_OR_RETURN(std::string v, model.StringFieldOr(field, ""));
    if (!v.empty()) return model.Field(field)->Error("is not supported");
  }
  ASSIGN_OR_RETURN(byte_fallback, model.BoolFieldOr("byte_fallback", false));
  ASSIGN_OR_RETURN(ignore_merges, model.BoolFieldOr("ignore_merges", false));
  ASSIGN_OR_RETURN(fuse_unk, model.BoolFieldOr("fuse_unk", false));

  ASSIGN_OR_RETURN(JsonValue vocab, model.Field("vocab"));
  ASSIGN_OR_RETURN(auto entries, vocab.AsObject());
  int32_t max_id = -1;
  token_to_id.reserve(entries.size());
  for (const auto& [token, id_value] : entries) {
    ASSIGN_OR_RETURN(int64_t id, id_value.AsInt());
    if (id < 0 || id > (int64_t{1} << 30)) return id_value.Error("is not a valid token id");
    token_to_id[std::string(token)] = static_cast<int32_t>(id);
    max_id = std::max(max_id, static_cast<int32_t>(id));
  }
  id_to_token.assign(static_cast<size_t>(max_id + 1), std::string());
  for (const auto& [token, id] : token_to_id) id_to_token[id] = token;

  ASSIGN_OR_RETURN(std::string unk, model.StringFieldOr("unk_token", ""));
  if (!unk.empty()) {
    auto it = token_to_id.find(unk);
    if (it == token_to_id.end()) return model.Field("unk_token")->Error("is not in the vocabulary");
    unk_id = it->second;
  }

  ASSIGN_OR_RETURN(JsonValue merges_value, model.Field("merges"));
  ASSIGN_OR_RETURN(auto merge_list, merges_value.AsArray());
  merges.reserve(merge_list.size());
  int32_t rank = 0;
  for (const JsonValue& m : merge_list) {
    std::string left, right;
    if (m.IsString()) {
      ASSIGN_OR_RETURN(absl::string_view s, m.AsString());
      const size_t space = s.find(' ');
      if (space == absl::string_view::npos || space == 0 || space + 1 >= s.size()) {
        return m.Error("must be two tokens separated by one space");
      }
      left = std::string(s.substr(0, space));
      right = std::string(s.substr(space + 1));
    } else {
      ASSIGN_OR_RETURN(auto pair, m.AsArray());
      if (pair.size() != 2) return m.Error("must be a pair of tokens");
      ASSIGN_OR_RETURN(absl::string_view l, pair[0].AsString());
      ASSIGN_OR_RETURN(absl::string_view r, pair[1].AsString());
      left = std::string(l);
      right = std::string(r);
    }
    auto li = token_to_id.find(left);
    auto ri = token_to_id.find(right);
    auto mi = token_to_id.find(left + right);
    if (li == token_to_id.end() || ri == token_to_id.end() || mi == token_to_id.end()) {
      return m.Error("merges tokens that are not in the vocabulary");
    }
    merges.emplace(PairKey(li->second, ri->second), Merge{rank++, mi->second});
  }
  return absl::OkStatus();
}

absl::Status Tokenizer::Impl::LoadAdded(const JsonValue& list) {
  ASSIGN_OR_RETURN(auto items, list.AsArray());
  for (const JsonValue& item : items) {
    Added a;
    ASSIGN_OR_RETURN(int64_t id, item.IntField("id"));
    if (id < 0 || id > (int64_t{1} << 30))
      return item.Field("id")->Error("is not a valid token id");
    a.id = static_cast<int32_t>(id);
    ASSIGN_OR_RETURN(absl::string_view content, item.StringField("content"));
    if (content.empty()) return item.Field("content")->Error("must not be empty");
    a.content = std::string(content);
    ASSIGN_OR_RETURN(a.special, item.BoolFieldOr("special", false));
    ASSIGN_OR_RETURN(a.lstrip, item.BoolFieldOr("lstrip", false));
    ASSIGN_OR_RETURN(a.rstrip, item.BoolFieldOr("rstrip", false));
    ASSIGN_OR_RETURN(a.single_word, item.BoolFieldOr("single_word", false));
    added.push_back(std::move(a));
  }
  for (const Added& a : added) {
    if (static_cast<size_t>(a.id) >= id_to_token.size()) id_to_token.resize(a.id + 1);
    id_to_token[a.id] = a.content;
    token_to_id[a.content] = a.id;
  }
  special.assign(id_to_token.size(), false);
  for (const Added& a : added) {
    if (a.special) special[a.id] = true;
    added_by_byte[static_cast<unsigned char>(a.content[0])].push_back(&a);
  }
  for (auto& v : added_by_byte) {
    std::stable_sort(v.begin(), v.end(), [](const Added* x, const Added* y) {
      return x->content.size() > y->content.size();
    });
  }
  return absl::OkStatus();
}

absl::Status Tokenizer::Impl::LoadNormalizer(const JsonValue& n) {
  ASSIGN_OR_RETURN(absl::string_view type, n.StringField("type"));
  Normalizer step;
  UErrorCode err = U_ZERO_ERROR;
  if (type == "Sequence") {
    return LoadSequence(n, "normalizers",
                        [this](const JsonValue& item) { return LoadNormalizer(item); });
  } else if (type == "NFC") {
    step.kind = Normalizer::Kind::kUnicode;
    step.form = unorm2_getNFCInstance(&err);
  } else if (type == "NFKC") {
    step.kind = Normalizer::Kind::kUnicode;
    step.form = unorm2_getNFKCInstance(&err);
  } else if (type == "NFD") {
    step.kind = Normalizer::Kind::kUnicode;
    step.form = unorm2_getNFDInstance(&err);
  } else if (type == "NFKD") {
    step.kind = Normalizer::Kind::kUnicode;
    step.form = unorm2_getNFKDInstance(&err);
  } else if (type == "Lowercase") {
    step.kind = Normalizer::Kind::kLowercase;
  } else if (type == "Prepend") {
    step.kind = Normalizer::Kind::kPrepend;
    ASSIGN_OR_RETURN(absl::string_view p, n.StringField("prepend"));
    step.a = std::string(p);
  } else if (type == "Replace") {
    step.kind = Normalizer::Kind::kReplace;
    ASSIGN_OR_RETURN(JsonValue pattern, n.Field("pattern"));
    RETURN_IF_ERROR(LoadPattern(pattern, &step.regex, &step.a));
    ASSIGN_OR_RETURN(absl::string_view content, n.StringField("content"));
    step.b = std::string(content);
  } else if (type == "Strip") {
    step.kind = Normalizer::Kind::kStrip;
    ASSIGN_OR_RETURN(step.left, n.BoolFieldOr("strip_left", true));
    ASSIGN_OR_RETURN(step.right, n.BoolFieldOr("strip_right", true));
  } else {
    return n.Field("type")->Error(absl::StrCat("names unsupported normalizer \"", type, "\""));
  }
  if (U_FAILURE(err)) return absl::InternalError(absl::StrCat("ICU: ", u_errorName(err)));
  normalizers.push_back(std::move(step));
  return absl::OkStatus();
}

absl::Status Tokenizer::Impl::LoadPreTokenizer(const JsonValue& p) {
  ASSIGN_OR_RETURN(absl::string_view type, p.StringField("type"));
  PreTokenizer step;
  if (type == "Sequence") {
    return LoadSequence(p, "pretokenizers",
                        [this](const JsonValue& item) { return LoadPreTokenizer(item); });
  } else if (type == "ByteLevel") {
    byte_level = true;
    step.kind = PreTokenizer::Kind::kByteLevel;
    ASSIGN_OR_RETURN(step.add_prefix_space, p.BoolFieldOr("add_prefix_space", true));
    ASSIGN_OR_RETURN(bool use_regex, p.BoolFieldOr("use_regex", true));
    if (use_regex) {
      ASSIGN_OR_RETURN(step.regex, Regex::Compile(kGpt2Pattern));
    }
  } else if (type == "Split") {
    step.kind = PreTokenizer::Kind::kSplit;
    ASSIGN_OR_RETURN(JsonValue pattern, p.Field("pattern"));
    RETURN_IF_ERROR(LoadPattern(pattern, &step.regex, &step.literal));
    ASSIGN_OR_RETURN(std::string behavior, p.StringFieldOr("behavior", "Isolated"));
    if (behavior == "Removed") {
      step.behavior = SplitBehavior::kRemoved;
    } else if (behavior == "Isolated") {
      step.behavior = SplitBehavior::kIsolated;
    } else if (behavior == "MergedWithPrevious") {
      step.behavior = SplitBehavior::kMergedWithPrevious;
    } else if (behavior == "MergedWithNext") {
      step.behavior = SplitBehavior::kMergedWithNext;
    } else if (behavior == "Contiguous") {
      step.behavior = SplitBehavior::kContiguous;
    } else {
      return p.Field("behavior")->Error(absl::StrCat("is unknown: \"", behavior, "\""));
    }
    ASSIGN_OR_RETURN(step.invert, p.BoolFieldOr("invert", false));
  } else if (type == "Metaspace") {
    step.kind = PreTokenizer::Kind::kMetaspace;
    ASSIGN_OR_RETURN(step.replacement, p.StringFieldOr("replacement", "\xe2\x96\x81"));
    ASSIGN_OR_RETURN(std::string scheme, p.StringFieldOr("prepend_scheme", ""));
    if (scheme.empty()) {
      ASSIGN_OR_RETURN(bool add, p.BoolFieldOr("add_prefix_space", true));
      scheme = add ? "always" : "never";
    }
    if (scheme == "always") {
      step.prepend = PreTokenizer::Prepend::kAlways;
    } else if (scheme == "first") {
      step.prepend = PreTokenizer::Prepend::kFirst;
    } else if (scheme == "never") {
      step.prepend = PreTokenizer::Prepend::kNever;
    } else {
      return p.Field("prepend_scheme")->Error(absl::StrCat("is unknown: \"", scheme, "\""));
    }
    ASSIGN_OR_RETURN(step.split, p.BoolFieldOr("split", true));
  } else if (type == "Digits") {
    step.kind = PreTokenizer::Kind::kSplit;
    ASSIGN_OR_RETURN(bool individual, p.BoolFieldOr("individual_digits", false));
    ASSIGN_OR_RETURN(step.regex, Regex::Compile(R"(\p{N})"));
    step.behavior = individual ? SplitBehavior::kIsolated : SplitBehavior::kContiguous;
  } else if (type == "Whitespace") {
    step.kind = PreTokenizer::Kind::kSplit;
    ASSIGN_OR_RETURN(step.regex, Regex::Compile(R"(\w+|[^\w\s]+)"));
    step.behavior = SplitBehavior::kRemoved;
    step.invert = true;
  } else if (type == "WhitespaceSplit") {
    step.kind = PreTokenizer::Kind::kSplit;
    ASSIGN_OR_RETURN(step.regex, Regex::Compile(R"(\s+)"));
    step.behavior = SplitBehavior::kRemoved;
  } else {
    return p.Field("type")->Error(absl::StrCat("names unsupported pre-tokenizer \"", type, "\""));
  }
  pre.push_back(std::move(step));
  return absl::OkStatus();
}

absl::Status Tokenizer::Impl::LoadPostProcessor(const JsonValue& p) {
  ASSIGN_OR_RETURN(absl::string_view type, p.StringField("type"));
  if (type == "Sequence") {
    return LoadSequence(p, "processors",
                        [this](const JsonValue& item) { return LoadPostProcessor(item); });
  }
  if (type == "ByteLevel") return absl::OkStatus();  // offsets only
  if (type != "TemplateProcessing") {
    return p.Field("type")->Error(absl::StrCat("names unsupported post-processor \"", type, "\""));
  }
  ASSIGN_OR_RETURN(JsonValue single, p.Field("single"));
  ASSIGN_OR_RETURN(auto items, single.AsArray());
  ASSIGN_OR_RETURN(JsonValue specials, p.Field("special_tokens"));
  bool seen_sequence = false;
  for (const JsonValue& item : items) {
    if (item.FindField("Sequence")) {
      seen_sequence = true;
      continue;
    }
    ASSIGN_OR_RETURN(JsonValue st, item.Field("SpecialToken"));
    ASSIGN_OR_RETURN(absl::string_view name, st.StringField("id"));
    ASSIGN_OR_RETURN(JsonValue entry, specials.Field(name));
    ASSIGN_OR_RETURN(JsonValue ids_value, entry.Field("ids"));
    ASSIGN_OR_RETURN(auto ids, ids_value.AsArray());
    for (const JsonValue& idv : ids) {
      ASSIGN_OR_RETURN(int64_t id, idv.AsInt());
      (seen_sequence ? suffix_ids : prefix_ids).push_back(static_cast<int32_t>(id));
    }
  }
  return absl::OkStatus();
}

absl::Status Tokenizer::Impl::LoadDecoder(const JsonValue& d) {
  ASSIGN_OR_RETURN(absl::string_view type, d.StringField("type"));
  Decoder step;
  if (type == "Sequence") {
    return LoadSequence(d, "decoders", [this](const JsonValue& item) { return LoadDecoder(item); });
  } else if (type == "ByteLevel") {
    step.kind = Decoder::Kind::kByteLevel;
  } else if (type == "Metaspace") {
    step.kind = Decoder::Kind::kMetaspace;
    ASSIGN_OR_RETURN(step.a, d.StringFieldOr("replacement", "\xe2\x96\x81"));
    ASSIGN_OR_RETURN(std::string scheme, d.StringFieldOr("prepend_scheme", ""));
    if (scheme.empty()) {
      ASSIGN_OR_RETURN(bool add, d.BoolFieldOr("add_prefix_space", true));
      scheme = add ? "always" : "never";
    }
    step.strip_first = scheme != "never";
  } else if (type == "Replace") {
    step.kind = Decoder::Kind::kReplace;
    ASSIGN_OR_RETURN(JsonValue pattern, d.Field("pattern"));
    ASSIGN_OR_RETURN(step.a, PatternString(pattern));
    ASSIGN_OR_RETURN(absl::string_view content, d.StringField("content"));
    step.b = std::string(content);
  } else if (type == "ByteFallback") {
    step.kind = Decoder::Kind::kByteFallback;
  } else if (type == "Fuse") {
    step.kind = Decoder::Kind::kFuse;
  } else if (type == "Strip") {
    step.kind = Decoder::Kind::kStrip;
    ASSIGN_OR_RETURN(absl::string_view content, d.StringField("content"));
    step.a = std::string(content);
    ASSIGN_OR_RETURN(int64_t start, d.IntFieldOr("start", 0));
    ASSIGN_OR_RETURN(int64_t stop, d.IntFieldOr("stop", 0));
    step.start = static_cast<int>(start);
    step.stop = static_cast<int>(stop);
  } else {
    return d.Field("type")->Error(absl::StrCat("names unsupported decoder \"", type, "\""));
  }
  decoders.push_back(std::move(step));
  return absl::OkStatus();
}

absl::Status Tokenizer::Impl::LoadConfig(const JsonValue& config, bool have_template) {
  auto token_of = [this, &config](const char* field) -> absl::StatusOr<int32_t> {
    std::optional<JsonValue> v = config.FindField(field);
    if (!v) return -1;
    std::string content;
    if (v->IsString()) {
      ASSIGN_OR_RETURN(absl::string_view s, v->AsString());
      content = std::string(s);
    } else {
      ASSIGN_OR_RETURN(absl::string_view s, v->StringField("content"));
      content = std::string(s);
    }
    auto it = token_to_id.find(content);
    if (it == token_to_id.end()) {
      return v->Error(absl::StrCat("names \"", content, "\", which is not a token"));
    }
    return it->second;
  };
  ASSIGN_OR_RETURN(bos_id, token_of("bos_token"));
  ASSIGN_OR_RETURN(eos_id, token_of("eos_token"));
  if (!have_template) {
    ASSIGN_OR_RETURN(bool add_bos, config.BoolFieldOr("add_bos_token", false));
    ASSIGN_OR_RETURN(bool add_eos, config.BoolFieldOr("add_eos_token", false));
    if (add_bos && bos_id >= 0) prefix_ids = {bos_id};
    if (add_eos && eos_id >= 0) suffix_ids = {eos_id};
  }
  return absl::OkStatus();
}

// ---- Encoding ----------------------------------------------------------------------------------

absl::StatusOr<std::string> Tokenizer::Impl::Normalize(std::string text) const {
  for (const Normalizer& n : normalizers) {
    switch (n.kind) {
      case Normalizer::Kind::kUnicode: {
        ASSIGN_OR_RETURN(text, UnicodeNormalize(n.form, text));
        break;
      }
      case Normalizer::Kind::kLowercase: {
        ASSIGN_OR_RETURN(text, Lowercase(text));
        break;
      }
      case Normalizer::Kind::kPrepend:
        if (!text.empty()) text = n.a + text;
        break;
      case Normalizer::Kind::kReplace:
        if (n.regex) {
          std::string out;
          size_t pos = 0;
          for (const auto& [b, e] : n.regex->FindAll(text)) {
            out.append(text, pos, b - pos);
            out += n.b;
            pos = e;
          }
          out.append(text, pos, std::string::npos);
          text = std::move(out);
        } else if (!n.a.empty()) {
          text = absl::StrReplaceAll(text, {{n.a, n.b}});
        }
        break;
      case Normalizer::Kind::kStrip: {
        size_t b = 0, e = text.size();
        if (n.left) {
          while (b < e && IsSpace(text[b])) ++b;
        }
        if (n.right) {
          while (e > b && IsSpace(text[e - 1])) --e;
        }
        text = text.substr(b, e - b);
        break;
      }
    }
  }
  return text;
}

std::vector<Piece> Tokenizer::Impl::PreTokenize(std::string text, bool first_section) const {
  std::vector<Piece> pieces;
  pieces.push_back({std::move(text), first_section});
  for (const PreTokenizer& p : pre) {
    std::vector<Piece> next;
    for (Piece& piece : pieces) {
      switch (p.kind) {
        case PreTokenizer::Kind::kByteLevel:
          if (p.add_prefix_space && !piece.text.empty() && piece.text[0] != ' ') {
            piece.text.insert(0, 1, ' ');
          }
          if (p.regex) {
            SplitPiece(piece, p, &next);
          } else {
            next.push_back(std::move(piece));
          }
          break;
        case PreTokenizer::Kind::kSplit:
          SplitPiece(piece, p, &next);
          break;
        case PreTokenizer::Kind::kMetaspace: {
          std::string s = absl::StrReplaceAll(piece.text, {{" ", p.replacement}});
          const bool prepend = p.prepend == PreTokenizer::Prepend::kAlways ||
                               (p.prepend == PreTokenizer::Prepend::kFirst && piece.first_section);
          if (prepend && s.compare(0, p.replacement.size(), p.replacement) != 0) {
            s = p.replacement + s;
          }
          Piece replaced{std::move(s), piece.first_section};
          if (p.split) {
            PreTokenizer splitter;
            splitter.kind = PreTokenizer::Kind::kSplit;
            splitter.literal = p.replacement;
            splitter.behavior = SplitBehavior::kMergedWithNext;
            SplitPiece(replaced, splitter, &next);
          } else {
            next.push_back(std::move(replaced));
          }
          break;
        }
      }
    }
    pieces = std::move(next);
  }
  return pieces;
}

void Tokenizer::Impl::Bpe(absl::string_view word, std::vector<int32_t>* out) const {
  if (word.empty()) return;
  const ByteMap& bytes = Bytes();
  if (ignore_merges) {
    std::string key;
    if (byte_level) {
      for (char c : word) key += bytes.byte_to_char[static_cast<unsigned char>(c)];
    } else {
      key = std::string(word);
    }
    auto it = token_to_id.find(key);
    if (it != token_to_id.end()) {
      out->push_back(it->second);
      return;
    }
  }
  // Initial symbols.
  std::vector<int32_t> sym;
  sym.reserve(word.size());
  if (byte_level) {
    for (char c : word) {
      const int32_t id = byte_ids[static_cast<unsigned char>(c)];
      if (id >= 0) {
        sym.push_back(id);
      } else if (unk_id >= 0) {
        sym.push_back(unk_id);
      }
    }
  } else {
    size_t pos = 0;
    bool last_unk = false;
    while (pos < word.size()) {
      size_t n = ValidUtf8SequenceLength(word.substr(pos));
      if (n == 0) n = 1;
      auto it = token_to_id.find(word.substr(pos, n));
      if (it != token_to_id.end()) {
        sym.push_back(it->second);
        last_unk = false;
      } else {
        bool all_bytes = byte_fallback;
        for (size_t i = 0; i < n && all_bytes; ++i) {
          all_bytes = byte_ids[static_cast<unsigned char>(word[pos + i])] >= 0;
        }
        if (all_bytes) {
          for (size_t i = 0; i < n; ++i)
            sym.push_back(byte_ids[static_cast<unsigned char>(word[pos + i])]);
          last_unk = false;
        } else if (unk_id >= 0 && !(fuse_unk && last_unk)) {
          sym.push_back(unk_id);
          last_unk = true;
        }
      }
      pos += n;
    }
  }
  // Merge the lowest-ranked adjacent pair until none applies. Symbols form a linked list; stale
  // queue entries are skipped when popped.
  const int n = static_cast<int>(sym.size());
  std::vector<int> prev(n), next(n);
  for (int i = 0; i < n; ++i) {
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  struct Candidate {
    int32_t rank;
    int left;
    int32_t left_id, right_id;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : left > o.left;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  auto push = [&](int left) {
    const int right = next[left];
    if (right < 0) return;
    auto it = merges.find(PairKey(sym[left], sym[right]));
    if (it != merges.end()) queue.push({it->second.rank, left, sym[left], sym[right]});
  };
  for (int i = 0; i + 1 < n; ++i) push(i);
  while (!queue.empty()) {
    const Candidate c = queue.top();
    queue.pop();
    const int right = next[c.left];
    if (sym[c.left] != c.left_id || right < 0 || sym[right] != c.right_id) continue;  // stale
    auto it = merges.find(PairKey(c.left_id, c.right_id));
    sym[c.left] = it->second.merged;
    sym[right] = -1;
    next[c.left] = next[right];
    if (next[right] >= 0) prev[next[right]] = c.left;
    if (prev[c.left] >= 0) push(prev[c.left]);
    push(c.left);
  }
  for (int i = 0; i >= 0 && i < n; i = next[i]) out->push_back(sym[i]);
}

std::string Tokenizer::Impl::DecodeToken(int32_t id, bool first) const {
  std::string s = id_to_token[id];
  if (special[id]) return s;  // added special tokens decode to their content
  bool fused = false;
  for (const Decoder& d : decoders) {
    switch (d.kind) {
      case Decoder::Kind::kReplace:
        s = absl::StrReplaceAll(s, {{d.a, d.b}});
        break;
      case Decoder::Kind::kByteFallback:
        if (s.size() == 6 && s[0] == '<' && s[1] == '0' && s[2] == 'x' && s[5] == '>') {
          unsigned v = 0;
          bool ok = true;
          for (int i = 3; i < 5; ++i) {
            const char c = s[i];
            v <<= 4;
            if (c >= '0' && c <= '9') {
              v |= c - '0';
            } else if (c >= 'A' && c <= 'F') {
              v |= c - 'A' + 10;
            } else if (c >= 'a' && c <= 'f') {
              v |= c - 'a' + 10;
            } else {
              ok = false;
            }
          }
          if (ok) s = std::string(1, static_cast<char>(v));
        }
        break;
      case Decoder::Kind::kFuse:
        fused = true;
        break;
      case Decoder::Kind::kStrip:
        if (!fused || first) {
          for (int i = 0; i < d.start && s.compare(0, d.a.size(), d.a) == 0; ++i) {
            s.erase(0, d.a.size());
          }
        }
        break;
      case Decoder::Kind::kMetaspace:
        s = absl::StrReplaceAll(s, {{d.a, " "}});
        if (first && d.strip_first && !s.empty() && s[0] == ' ') s.erase(0, 1);
        break;
      case Decoder::Kind::kByteLevel: {
        const ByteMap& bytes = Bytes();
        std::string out;
        absl::string_view rest = s;
        bool ok = true;
        while (!rest.empty()) {
          char32_t cp;
          const size_t n = DecodeUtf8(rest, &cp);
          auto it = n == 0 ? bytes.char_to_byte.end() : bytes.char_to_byte.find(cp);
          if (it == bytes.char_to_byte.end()) {
            ok = false;
            break;
          }
          out.push_back(static_cast<char>(it->second));
          rest.remove_prefix(n);
        }
        if (ok) s = std::move(out);
        break;
      }
    }
  }
  return s;
}

// ---- Tokenizer ---------------------------------------------------------------------------------

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromModelDir(const std::string& dir) {
  const std::string path = dir + "/tokenizer.json";
  ASSIGN_OR_RETURN(MappedFile file, MappedFile::Open(path));
  std::string config;
  absl::StatusOr<std::string> config_text = ReadFileToString(dir + "/tokenizer_config.json");
  if (config_text.ok()) {
    config = std::move(*config_text);
  } else if (config_text.status().code() != absl::StatusCode::kNotFound) {
    return config_text.status();
  }
  return FromJson(file.text(), config, path);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(absl::string_view tokenizer_json,
                                                               absl::string_view config_json,
                                                               std::string source) {
  auto impl = std::make_unique<Impl>();
  impl->source = source;
  ASSIGN_OR_RETURN(JsonDocument doc, JsonDocument::Parse(tokenizer_json, source));
  const JsonValue root = doc.root();
  ASSIGN_OR_RETURN(JsonValue model, root.Field("model"));
  RETURN_IF_ERROR(impl->LoadModel(model));
  if (std::optional<JsonValue> added = root.FindField("added_tokens")) {
    RETURN_IF_ERROR(impl->LoadAdded(*added));
  } else {
    impl->special.assign(impl->id_to_token.size(), false);
  }
  if (std::optional<JsonValue> n = root.FindField("normalizer"))
    RETURN_IF_ERROR(impl->LoadNormalizer(*n));
  if (std::optional<JsonValue> p = root.FindField("pre_tokenizer")) {
    RETURN_IF_ERROR(impl->LoadPreTokenizer(*p));
  }
  bool have_template = false;
  if (std::optional<JsonValue> p = root.FindField("post_processor")) {
    RETURN_IF_ERROR(impl->LoadPostProcessor(*p));
    have_template = !impl->prefix_ids.empty() || !impl->suffix_ids.empty();
  }
  if (std::optional<JsonValue> d = root.FindField("decoder"))
    RETURN_IF_ERROR(impl->LoadDecoder(*d));

  // Byte ids: the mapped character for byte-level models, "<0xXX>" tokens for byte fallback.
  const ByteMap& bytes = Bytes();
  for (int b = 0; b < 256; ++b) {
    std::string key = impl->byte_level ? bytes.byte_to_char[b] : absl::StrFormat("<0x%02X>", b);
    auto it = impl->token_to_id.find(key);
    impl->byte_ids[b] = it == impl->token_to_id.end() ? -1 : it->second;
  }
  if (!config_json.empty()) {
    ASSIGN_OR_RETURN(JsonDocument config,
                     JsonDocument::Parse(config_json, "tokenizer_config.json"));
    RETURN_IF_ERROR(impl->LoadConfig(config.root(), have_template));
  }
  for (int32_t id : impl->prefix_ids) {
    if (id < 0 || id >= static_cast<int32_t>(impl->id_to_token.size())) {
      return root.Field("post_processor")->Error("adds a token id outside the vocabulary");
    }
  }
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(impl)));
}

absl::StatusOr<std::vector<int32_t>> Tokenizer::Encode(absl::string_view text,
                                                       bool add_special_tokens) const {
  if (!IsValidUtf8(text)) return absl::InvalidArgumentError("text is not valid UTF-8");
  const Impl& im = *impl_;
  std::vector<int32_t> out;
  if (add_special_tokens) out = im.prefix_ids;

  // Split off added tokens, longest match first at each position.
  struct Section {
    size_t b, e;
    int32_t added_id;  // -1 for text
  };
  std::vector<Section> sections;
  size_t text_start = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    const Impl::Added* hit = nullptr;
    for (const Impl::Added* a : im.added_by_byte[static_cast<unsigned char>(text[pos])]) {
      if (text.compare(pos, a->content.size(), a->content) != 0) continue;
      if (a->single_word) {
        char32_t before = 0, after = 0;
        if (pos > 0) {
          size_t k = pos - 1;
          while (k > 0 && (static_cast<unsigned char>(text[k]) & 0xc0) == 0x80) --k;
          DecodeUtf8(text.substr(k), &before);
        }
        if (pos + a->content.size() < text.size())
          DecodeUtf8(text.substr(pos + a->content.size()), &after);
        if ((before && IsWordChar(before)) || (after && IsWordChar(after))) continue;
      }
      hit = a;
      break;
    }
    if (hit == nullptr) {
      ++pos;
      continue;
    }
    size_t b = pos, e = pos + hit->content.size();
    if (hit->lstrip) {
      while (b > text_start && IsSpace(text[b - 1])) --b;
    }
    if (hit->rstrip) {
      while (e < text.size() && IsSpace(text[e])) ++e;
    }
    if (b > text_start) sections.push_back({text_start, b, -1});
    sections.push_back({b, e, hit->id});
    text_start = pos = e;
  }
  if (text_start < text.size()) sections.push_back({text_start, text.size(), -1});

  for (size_t i = 0; i < sections.size(); ++i) {
    const Section& s = sections[i];
    if (s.added_id >= 0) {
      out.push_back(s.added_id);
      continue;
    }
    ASSIGN_OR_RETURN(std::string normalized,
                     im.Normalize(std::string(text.substr(s.b, s.e - s.b))));
    for (const Piece& piece : im.PreTokenize(std::move(normalized), i == 0))
      im.Bpe(piece.text, &out);
  }
  if (add_special_tokens) out.insert(out.end(), im.suffix_ids.begin(), im.suffix_ids.end());
  return out;
}

std::string Tokenizer::TokenBytes(int32_t id, bool first, bool skip_special_tokens) const {
  if (id < 0 || id >= vocab_size()) return "";
  if (skip_special_tokens && impl_->special[id]) return "";
  return impl_->DecodeToken(id, first);
}

absl::StatusOr<std::string> Tokenizer::Decode(absl::Span<const int32_t> ids,
                                              bool skip_special_tokens) const {
  std::string bytes;
  bool first = true;
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", id, " is outside the vocabulary [0, ", vocab_size(), ")"));
    }
    if (skip_special_tokens && impl_->special[id]) continue;
    bytes += impl_->DecodeToken(id, first);
    first = false;
  }
  return Utf8Lossy(bytes);
}

absl::string_view Tokenizer::TokenString(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return "";
  return impl_->id_to_token[id];
}

std::optional<int32_t> Tokenizer::TokenId(absl::string_view token) const {
  auto it = impl_->token_to_id.find(token);
  if (it == impl_->token_to_id.end()) return std::nullopt;
  return it->second;
}

int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->id_to_token.size()); }
bool Tokenizer::IsSpecial(int32_t id) const {
  return id >= 0 && id < vocab_size() && impl_->special[id];
}
int32_t Tokenizer::bos_token_id() const { return impl_->bos_id; }
int32_t Tokenizer::eos_token_id() const { return impl_->eos_id; }

IncrementalDecoder::IncrementalDecoder(const Tokenizer* tokenizer, bool skip_special_tokens,
                                       absl::Span<const int32_t> prompt)
    : IncrementalDecoder(tokenizer, skip_special_tokens) {
  for (int32_t id : prompt) {
    if (id >= 0 && id < tokenizer->vocab_size() &&
        !(skip_special_tokens && tokenizer->IsSpecial(id))) {
      first_ = false;
      break;
    }
  }
}

std::string IncrementalDecoder::Add(int32_t id) {
  if (skip_special_tokens_ && tokenizer_->IsSpecial(id)) return "";
  pending_ += tokenizer_->TokenBytes(id, first_, skip_special_tokens_);
  first_ = false;
  const size_t n = EmittableUtf8Prefix(pending_);
  std::string out = Utf8Lossy(absl::string_view(pending_).substr(0, n));
  pending_.erase(0, n);
  return out;
}

std::string IncrementalDecoder::Flush() {
  std::string out = Utf8Lossy(pending_);
  pending_.clear();
  return out;
}

}  // namespace strata
