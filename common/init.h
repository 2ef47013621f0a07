// Program start-up for every Strata binary: flags and logging.
#ifndef STRATA_COMMON_INIT_H_
#define STRATA_COMMON_INIT_H_

#include <vector>

#include "absl/strings/string_view.h"

namespace strata {

// Parses command-line flags (Abseil flags; --help lists them), then applies the logging flags
// --log_level (info, warning, error) and --v (VLOG level). Returns the positional arguments,
// argv[0] first. An unknown flag or bad value prints a message naming it and exits with status 2.
// Call once, first thing in main.
std::vector<char*> InitProgram(int argc, char** argv, absl::string_view usage);

}  // namespace strata

#endif  // STRATA_COMMON_INIT_H_
