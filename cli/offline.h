// Offline commands of stratactl: inference, tokenization and perplexity on a local model directory,
// without a cluster. Each writes its results to `out` and returns a status whose message is shown
// to the user.
#ifndef STRATA_CLI_OFFLINE_H_
#define STRATA_CLI_OFFLINE_H_

#include <cstdio>

#include "absl/status/status.h"
#include "cli/args.h"

namespace strata {

// stratactl run --model DIR (--prompt TEXT | --prompt-ids 1,2,3) [--max-tokens N] [--temperature T]
//   [--top-p P] [--top-k K] [--min-p P] [--seed S] [--stop STR]... [--logprobs K]
//   [--prompt-logprobs K] [--ignore-eos] [--threads N] [--delta FILE] [--json]: --delta runs the
//   fine-tune in that delta file over the base in --model, as a worker serves it.
absl::Status RunCommand(const Args& args, std::FILE* out);

// stratactl tokenize --model DIR (--text TEXT | --file F) [--add-special-tokens] [--json]
absl::Status TokenizeCommand(const Args& args, std::FILE* out);

// stratactl eval ppl --model DIR [--delta FILE] --text FILE [--context N] [--threads N] [--json]
// With --delta, the model is the fine-tune the delta file makes of the base in DIR.
absl::Status EvalPplCommand(const Args& args, std::FILE* out);

}  // namespace strata

#endif  // STRATA_CLI_OFFLINE_H_
