// stratactl keys: API keys files for strata-coordinator --api_keys_file (coordinator/api_keys.h).
#ifndef STRATA_CLI_KEYS_CMD_H_
#define STRATA_CLI_KEYS_CMD_H_

#include <cstdio>

#include "absl/status/status.h"
#include "cli/args.h"

namespace strata {

// stratactl keys check FILE [--json]
// Reads the file as the coordinator would and prints each tenant's settings (never its keys), or
// the error that would keep the coordinator on its previous keys, naming the file and the field.
absl::Status KeysCheckCommand(const Args& args, std::FILE* out);

// stratactl keys new [--prefix P]
// Prints a new random API key: P (default "sk-strata-") and 48 hex digits from the kernel's
// random source.
absl::Status KeysNewCommand(const Args& args, std::FILE* out);

}  // namespace strata

#endif  // STRATA_CLI_KEYS_CMD_H_
