#include "common/secrets.h"

#include <cstdint>
#include <random>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "common/mapped_file.h"
#include "common/status_macros.h"

namespace strata {

bool SecretsEqual(absl::string_view known, absl::string_view given) {
  // Every byte of `known` is compared whatever `given` is: the time tells only its length, which
  // the caller chose.
  unsigned char diff = known.size() != given.size() ? 1 : 0;
  for (size_t i = 0; i < known.size(); ++i) {
    diff |= static_cast<unsigned char>(known[i] ^ (i < given.size() ? given[i] : 0));
  }
  return diff == 0;
}

std::string NewSecret() {
  std::random_device dev;  // the kernel's random source
  std::string out;
  for (int i = 0; i < 4; ++i) {
    absl::StrAppend(&out, absl::Hex((uint64_t{dev()} << 32) | dev(), absl::kZeroPad16));
  }
  return out;
}

absl::StatusOr<std::string> LoadSecretFile(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  const absl::string_view secret = absl::StripAsciiWhitespace(text);
  bool printable = secret.size() >= 16 && secret.size() <= 256;
  for (char c : secret) printable = printable && c > ' ' && c < 127;
  if (!printable) {
    return absl::InvalidArgumentError(
        absl::StrCat(path,
                     ": the secret must be 16 to 256 printable ASCII characters without "
                     "spaces (for example: openssl rand -hex 32)"));
  }
  return std::string(secret);
}

}  // namespace strata
