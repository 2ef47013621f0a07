// Identifiers that clients and operators choose (request ids, fine-tune ids): one character set
// across the tree, so that an id is safe in logs, file names and metric labels.
#ifndef STRATA_COMMON_IDS_H_
#define STRATA_COMMON_IDS_H_

#include <cstddef>

#include "absl/strings/ascii.h"
#include "absl/strings/string_view.h"

namespace strata {

// True when `id` is at most `max_bytes` bytes of [A-Za-z0-9._-] (the empty id included).
inline bool IsValidId(absl::string_view id, size_t max_bytes = 128) {
  if (id.size() > max_bytes) return false;
  for (char c : id) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') {
      return false;
    }
  }
  return true;
}

}  // namespace strata

#endif  // STRATA_COMMON_IDS_H_
