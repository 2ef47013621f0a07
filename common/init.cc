#include "common/init.h"

#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "common/log.h"

ABSL_FLAG(std::string, log_level, "info",
          "Least severe messages to log: info, warning, error or fatal.");
ABSL_FLAG(int, v, 0, "Verbose logging level: VLOG(n) messages with n <= v are logged.");

namespace strata {

std::vector<char*> InitProgram(int argc, char** argv, absl::string_view usage) {
  absl::SetProgramUsageMessage(usage);
  std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  LogSeverity severity;
  const absl::Status parsed = ParseLogSeverity(absl::GetFlag(FLAGS_log_level), &severity);
  if (!parsed.ok()) {
    std::fprintf(stderr, "--log_level: %s\n", std::string(parsed.message()).c_str());
    std::exit(2);
  }
  SetMinLogSeverity(severity);
  SetVLogLevel(absl::GetFlag(FLAGS_v));
  return positional;
}

}  // namespace strata
