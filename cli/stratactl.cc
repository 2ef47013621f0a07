// stratactl: Strata's operator CLI.
//
//   stratactl run --model DIR (--prompt TEXT | --prompt-ids 1,2,3) [--max-tokens N] [--temperature
//   T]
//       [--top-p P] [--top-k K] [--min-p P] [--seed S] [--stop STR]... [--logprobs K]
//       [--prompt-logprobs K] [--ignore-eos] [--threads N] [--delta FILE|DIR] [--json]
//   stratactl tokenize --model DIR (--text TEXT | --file F) [--add-special-tokens] [--json]
//   stratactl eval ppl --model DIR [--delta FILE|DIR] --text FILE [--context N] [--threads N]
//   [--json] stratactl delta compress --base DIR --fine-tune DIR --out FILE [--bits 2|4|8]
//       [--sparsity 2:4|none] [--base-name NAME] [--threads N] [--calibration TEXT_FILE
//       [--calibration-tokens N] [--calibration-context N]] [--json]
//   stratactl delta inspect FILE|LORA_DIR [--base DIR] [--json]
//   stratactl generate [--coordinator ADDR] [--model NAME] (--prompt TEXT | --prompt-ids 1,2,3)
//       [--max-tokens N] [--temperature T] [--top-p P] [--top-k K] [--min-p P] [--seed S]
//       [--stop STR]... [--ignore-eos] [--logprobs K] [--cache-salt S] [--fine-tune ID]
//       [--json-schema SCHEMA|@FILE | --json-object | --regex RE | --grammar GBNF|@FILE |
//        --choice TEXT...] [--compact-json] [--timeout-s N] [--json]
//   stratactl status [--coordinator ADDR] [--json]
//   stratactl drain WORKER [--coordinator ADDR] [--resume] [--wait] [--timeout-s N] [--json]
//   stratactl plan --model DIR|CONFIG.json [--gpu NAME] [workload and sizing flags] [--emit ...]
//   stratactl keys check FILE [--json] | keys new [--prefix P]
//
// Cluster commands reach the coordinator at --coordinator, else $STRATA_COORDINATOR, else
// 127.0.0.1:50051; over TLS with --tls-ca FILE|system [--tls-cert FILE --tls-key FILE]
// [--tls-server-name NAME] (or $STRATA_TLS_CA, $STRATA_TLS_CERT, $STRATA_TLS_KEY,
// $STRATA_TLS_SERVER_NAME).
//
// Exit status: 0 on success, 2 for a usage error, 1 for any other error (message on stderr).
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cli/args.h"
#include "cli/cluster.h"
#include "cli/delta_cmd.h"
#include "cli/keys_cmd.h"
#include "cli/offline.h"
#include "cli/plan.h"
#include "cli/profile.h"
#include "cli/simulate_cmd.h"

namespace {

constexpr char kUsage[] =
    "usage:\n"
    "  stratactl run --model DIR (--prompt TEXT | --prompt-ids 1,2,3) [--max-tokens N]\n"
    "      [--temperature T] [--top-p P] [--top-k K] [--min-p P] [--seed S] [--stop STR]...\n"
    "      [--logprobs K] [--prompt-logprobs K] [--ignore-eos] [--threads N] [--delta FILE|DIR]\n"
    "      [--json]\n"
    "  stratactl tokenize --model DIR (--text TEXT | --file F) [--add-special-tokens] [--json]\n"
    "  stratactl eval ppl --model DIR [--delta FILE|DIR] --text FILE [--context N] [--threads N]\n"
    "      [--json]\n"
    "fine-tune deltas (docs/FINE_TUNES.md):\n"
    "  stratactl delta compress --base DIR --fine-tune DIR --out FILE [--bits 2|4|8]\n"
    "      [--sparsity 2:4|none] [--base-name NAME] [--threads N] [--calibration TEXT_FILE\n"
    "      [--calibration-tokens N] [--calibration-context N]] [--json]\n"
    "  stratactl delta inspect FILE|LORA_DIR [--base DIR] [--json]\n"
    "  (--delta takes a delta file or a PEFT LoRA adapter directory)\n"
    "cluster (a running coordinator: --coordinator ADDR, $STRATA_COORDINATOR, 127.0.0.1:50051):\n"
    "  stratactl generate [--model NAME] (--prompt TEXT | --prompt-ids 1,2,3) [--max-tokens N]\n"
    "      [--temperature T] [--top-p P] [--top-k K] [--min-p P] [--seed S] [--stop STR]...\n"
    "      [--ignore-eos] [--logprobs K] [--cache-salt S] [--fine-tune ID] [--timeout-s N]\n"
    "      [--json-schema SCHEMA|@FILE | --json-object | --regex RE | --grammar GBNF|@FILE |\n"
    "       --choice TEXT...] [--compact-json] [--json]\n"
    "  stratactl status [--json]\n"
    "  stratactl drain WORKER [--resume] [--wait] [--timeout-s N] [--json]\n"
    "  over TLS: --tls-ca FILE|system [--tls-cert FILE --tls-key FILE] [--tls-server-name NAME]\n"
    "      (or $STRATA_TLS_CA, $STRATA_TLS_CERT, $STRATA_TLS_KEY, $STRATA_TLS_SERVER_NAME)\n"
    "API keys (strata-coordinator --api_keys_file; coordinator/api_keys.h):\n"
    "  stratactl keys check FILE [--json]   (each tenant's settings, or the file's error)\n"
    "  stratactl keys new [--prefix P]      (a new random key)\n"
    "capacity planning (docs/KUBERNETES.md):\n"
    "  stratactl plan --model DIR|CONFIG.json [--gpu h100|h200|a100|l40s|list] [--rate RPS]\n"
    "      [--prompt-tokens N] [--output-tokens N] [--shared-prefix-tokens N] [--tpot-ms T]\n"
    "      [--conversations N] [--conversation-tokens N] [--host-cache-gib G]\n"
    "      [--kv-compression none|int8|fp8] [--tensor-parallel N] [--dtype bf16|f16|f32]\n"
    "      [--max-running-sequences N] [--max-batch-tokens N] [--gpu-memory-gib G\n"
    "      --gpu-bandwidth-gbps B --gpu-tflops F] [--decode-efficiency E] [--kv-efficiency E]\n"
    "      [--prefill-efficiency E]\n"
    "      [--gpu-memory-utilization U] [--target-utilization U] [--fine-tunes N\n"
    "      [--active-fine-tunes K] [--delta-bits 2|4|8] [--delta-sparsity 2:4|none] |\n"
    "      [--lora-rank R]]\n"
    "      [--draft-model DIR|CONFIG.json [--draft-acceptance P] [--num-speculative-tokens K]\n"
    "      [--speculative-max-batch N]]\n"
    "      [--json | --emit table|json|k8s|k8s-disaggregated]\n"
    "  stratactl simulate (--model DIR|CONFIG.json --gpu G [plan's GPU and option flags] |\n"
    "      --profile FILE) [--workers N | --find-workers] [--rate RPS | --rates R1,R2,...]\n"
    "      [--workload random|shared-prefix|multi-turn] [--requests N] [--prompt-tokens N|A:B]\n"
    "      [--output-tokens N|A:B] [--shared-prefix-tokens N] [--shared-fraction F]\n"
    "      [--shared-prefixes N] [--turns N] [--turn-tokens N|A:B] [--think-time-ms T]\n"
    "      [--replies-in-history 0|1] [--seed S]\n"
    "      [--ttft-p99-ms T] [--tpot-p99-ms T] [--router cost|round-robin] [--kv-blocks N]\n"
    "      [--host-blocks N] [--disk-blocks N] [--disk-read-gbps G] [--fine-tunes N]\n"
    "      [--fine-tune-zipf S] [--base-fraction F] [--resident-deltas K] [--delta-load-ms T]\n"
    "      [--cold-fine-tune-blocks B] [--decode-weight W] [--inflight-prefill-min-tokens N]\n"
    "      [--kv-copy-gbps G] [--kv-fetch-weight W] [--prefill-workers P]\n"
    "      [--disaggregate-min-uncached-tokens T] [--disaggregate-max-prefill-queue-tokens Q]\n"
    "      [--svg FILE] [--json]\n"
    "  stratactl profile --model DIR [--random-weights] [--device cpu|gpu] [--gpu-dtype D]\n"
    "      [--threads N] [--kv-cache-mb N] [--max-batch-tokens N] [--max-running-sequences N]\n"
    "      [--block-tokens N] [--context N] [--reps N] [--delta FILE] [--coordinator ADDR]\n"
    "      [--out FILE] [--json]\n";

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "stratactl: %s\n", std::string(s.message()).c_str());
  return s.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> argv_s(argv + 1, argv + argc);
  if (argv_s.empty() || argv_s[0] == "--help" || argv_s[0] == "help") {
    std::fputs(kUsage, argv_s.empty() ? stderr : stdout);
    return argv_s.empty() ? 2 : 0;
  }
  const std::string command = argv_s[0];
  std::vector<std::string> rest(argv_s.begin() + 1, argv_s.end());
  if (command == "run") {
    auto args = strata::Args::Parse(
        rest, {"json", "ignore-eos"},
        {"model", "prompt", "prompt-ids", "max-tokens", "temperature", "top-p", "top-k", "min-p",
         "seed", "stop", "logprobs", "prompt-logprobs", "threads", "delta"});
    if (!args.ok()) return Fail(args.status());
    const absl::Status s = strata::RunCommand(*args, stdout);
    return s.ok() ? 0 : Fail(s);
  }
  if (command == "tokenize") {
    auto args =
        strata::Args::Parse(rest, {"json", "add-special-tokens"}, {"model", "text", "file"});
    if (!args.ok()) return Fail(args.status());
    const absl::Status s = strata::TokenizeCommand(*args, stdout);
    return s.ok() ? 0 : Fail(s);
  }
  if (command == "eval" && !rest.empty() && rest[0] == "ppl") {
    rest.erase(rest.begin());
    auto args =
        strata::Args::Parse(rest, {"json"}, {"model", "delta", "text", "context", "threads"});
    if (!args.ok()) return Fail(args.status());
    const absl::Status s = strata::EvalPplCommand(*args, stdout);
    return s.ok() ? 0 : Fail(s);
  }
  if (command == "delta" && !rest.empty() && rest[0] == "compress") {
    rest.erase(rest.begin());
    auto args =
        strata::Args::Parse(rest, {"json"},
                            {"base", "fine-tune", "out", "bits", "sparsity", "base-name", "threads",
                             "calibration", "calibration-tokens", "calibration-context"});
    if (!args.ok()) return Fail(args.status());
    const absl::Status s = strata::DeltaCompressCommand(*args, stdout);
    return s.ok() ? 0 : Fail(s);
  }
  if (command == "delta" && !rest.empty() && rest[0] == "inspect") {
    rest.erase(rest.begin());
    auto args = strata::Args::Parse(rest, {"json"}, {"base"});
    if (!args.ok()) return Fail(args.status());
    const absl::Status s = strata::DeltaInspectCommand(*args, stdout);
    return s.ok() ? 0 : Fail(s);
  }
  if (command == "generate") {
    auto args = strata::Args::Parse(
        rest, {"json", "ignore-eos", "json-object", "compact-json"},
        {"coordinator", "model",     "prompt",    "prompt-ids",  "max-tokens",     "temperature",
         "top-p",       "top-k",     "min-p",     "seed",        "stop",           "logprobs",
         "cache-salt",  "fine-tune", "timeout-s", "json-schema", "regex",          "grammar",
         "choice",      "tls-ca",    "tls-cert",  "tls-key",     "tls-server-name"});
    if (!args.ok()) return Fail(args.status());
    const absl::Status s = strata::GenerateCommand(*args, stdout);
    return s.ok() ? 0 : Fail(s);
  }
  if (command == "status") {
    auto args = strata::Args::Parse(
        rest, {"json"}, {"coordinator", "tls-ca", "tls-cert", "tls-key", "tls-server-name"});
    if (!args.ok()) return Fail(args.status());
    const absl::Status s = strata::StatusCommand(*args, stdout);
    return s.ok() ? 0 : Fail(s);
  }
  if (command == "drain") {
    auto args = strata::Args::Parse(
        rest, {"json", "resume", "wait"},
        {"coordinator", "timeout-s", "tls-ca", "tls-cert", "tls-key", "tls-server-name"});
    if (!args.ok()) return Fail(args.status());
    const absl::Status s = strata::DrainCommand(*args, stdout);
    return s.ok() ? 0 : Fail(s);
  }
  if (command == "keys" && !rest.empty() && (rest[0] == "check" || rest[0] == "new")) {
    const bool check = rest[0] == "check";
    rest.erase(rest.begin());
    auto args =
        check ? strata::Args::Parse(rest, {"json"}, {}) : strata::Args::Parse(rest, {}, {"prefix"});
    if (!args.ok()) return Fail(args.status());
    const absl::Status s =
        check ? strata::KeysCheckCommand(*args, stdout) : strata::KeysNewCommand(*args, stdout);
    return s.ok() ? 0 : Fail(s);
  }
  if (command == "plan") {
    auto args = strata::ParsePlanArgs(rest);
    if (!args.ok()) return Fail(args.status());
    const absl::Status s = strata::PlanCommand(*args, stdout);
    return s.ok() ? 0 : Fail(s);
  }
  if (command == "simulate") {
    auto args = strata::ParseSimulateArgs(rest);
    if (!args.ok()) return Fail(args.status());
    const absl::Status s = strata::SimulateCommand(*args, stdout);
    return s.ok() ? 0 : Fail(s);
  }
  if (command == "profile") {
    auto args = strata::ParseProfileArgs(rest);
    if (!args.ok()) return Fail(args.status());
    const absl::Status s = strata::ProfileCommand(*args, stdout);
    return s.ok() ? 0 : Fail(s);
  }
  std::fprintf(stderr, "stratactl: unknown command \"%s\"\n%s", command.c_str(), kUsage);
  return 2;
}
