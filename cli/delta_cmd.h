// stratactl delta: making and inspecting fine-tune delta files (worker/model/delta.h).
#ifndef STRATA_CLI_DELTA_CMD_H_
#define STRATA_CLI_DELTA_CMD_H_

#include <cstdio>

#include "absl/status/status.h"
#include "cli/args.h"

namespace strata {

// stratactl delta compress --base DIR --fine-tune DIR --out FILE [--bits 2|4|8 (4)]
//   [--sparsity 2:4|none (none)] [--base-name NAME] [--threads N] [--calibration TEXT_FILE
//   [--calibration-tokens N (32768)] [--calibration-context N (512)]] [--json]
// Writes the delta file and prints each tensor's size and relative error, then the totals. With
// --calibration, the base reads the text first (tokenized with its tokenizer.json) and each
// matrix is packed by the importance of its input columns there (worker/model/delta_calibration.h).
absl::Status DeltaCompressCommand(const Args& args, std::FILE* out);

// stratactl delta inspect FILE [--base DIR] [--json]
// Prints the file's header; with --base, also whether it loads over that base.
absl::Status DeltaInspectCommand(const Args& args, std::FILE* out);

}  // namespace strata

#endif  // STRATA_CLI_DELTA_CMD_H_
