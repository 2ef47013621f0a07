#include "common/utf8.h"

namespace strata {
namespace {

// Number of bytes a sequence with this lead byte has, or 0 for a byte that cannot lead.
int LeadLength(uint8_t b) {
  if (b < 0x80) return 1;
  if (b >= 0xc2 && b <= 0xdf) return 2;
  if (b >= 0xe0 && b <= 0xef) return 3;
  if (b >= 0xf0 && b <= 0xf4) return 4;
  return 0;
}

// The valid range of the second byte for a given lead (excludes overlongs, surrogates, > U+10FFFF).
bool SecondByteOk(uint8_t lead, uint8_t b) {
  switch (lead) {
    case 0xe0:
      return b >= 0xa0 && b <= 0xbf;
    case 0xed:
      return b >= 0x80 && b <= 0x9f;
    case 0xf0:
      return b >= 0x90 && b <= 0xbf;
    case 0xf4:
      return b >= 0x80 && b <= 0x8f;
    default:
      return b >= 0x80 && b <= 0xbf;
  }
}

// How many bytes of `s` form a valid (possibly incomplete) prefix of one sequence: returns the
// number of bytes that are consistent, and sets *complete when they form a whole sequence.
size_t ValidPrefix(absl::string_view s, bool* complete) {
  *complete = false;
  if (s.empty()) return 0;
  const uint8_t lead = static_cast<uint8_t>(s[0]);
  const int n = LeadLength(lead);
  if (n == 0) return 0;
  if (n == 1) {
    *complete = true;
    return 1;
  }
  size_t i = 1;
  for (; i < static_cast<size_t>(n) && i < s.size(); ++i) {
    const uint8_t b = static_cast<uint8_t>(s[i]);
    const bool ok = (i == 1) ? SecondByteOk(lead, b) : (b >= 0x80 && b <= 0xbf);
    if (!ok) return i;  // the first i bytes were consistent, but this one breaks the sequence
  }
  *complete = (i == static_cast<size_t>(n));
  return i;
}

}  // namespace

void AppendUtf8(char32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xc0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xe0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  } else {
    out->push_back(static_cast<char>(0xf0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3f)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  }
}

size_t ValidUtf8SequenceLength(absl::string_view s) {
  bool complete;
  const size_t n = ValidPrefix(s, &complete);
  return complete ? n : 0;
}

size_t DecodeUtf8(absl::string_view s, char32_t* cp) {
  const size_t n = ValidUtf8SequenceLength(s);
  if (n == 0) return 0;
  const uint8_t b0 = static_cast<uint8_t>(s[0]);
  char32_t v = n == 1 ? b0 : n == 2 ? (b0 & 0x1f) : n == 3 ? (b0 & 0x0f) : (b0 & 0x07);
  for (size_t i = 1; i < n; ++i) v = (v << 6) | (static_cast<uint8_t>(s[i]) & 0x3f);
  *cp = v;
  return n;
}

bool IsValidUtf8(absl::string_view s) {
  while (!s.empty()) {
    const size_t n = ValidUtf8SequenceLength(s);
    if (n == 0) return false;
    s.remove_prefix(n);
  }
  return true;
}

std::string Utf8Lossy(absl::string_view s) {
  std::string out;
  out.reserve(s.size());
  while (!s.empty()) {
    bool complete;
    const size_t n = ValidPrefix(s, &complete);
    if (complete) {
      out.append(s.data(), n);
      s.remove_prefix(n);
    } else {
      out.append("\xef\xbf\xbd");
      s.remove_prefix(n == 0 ? 1 : n);  // a maximal invalid subsequence becomes one U+FFFD
    }
  }
  return out;
}

size_t EmittableUtf8Prefix(absl::string_view s) {
  size_t pos = 0;
  while (pos < s.size()) {
    bool complete;
    const size_t n = ValidPrefix(s.substr(pos), &complete);
    if (complete) {
      pos += n;
    } else if (pos + n == s.size() && n > 0) {
      break;  // valid so far, may complete with more bytes
    } else {
      pos += (n == 0 ? 1 : n);  // can never become valid
    }
  }
  return pos;
}

}  // namespace strata
