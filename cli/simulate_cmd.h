// `stratactl simulate`: a workload replayed through a simulated cluster (cli/simulate.h), with
// step costs from a GPU's roofline (the model and GPU flags of `stratactl plan`) or from a
// measured engine (`stratactl profile`). One rate, a sweep of rates (the latency/load curve, as
// a table, JSON or an SVG chart), or the fewest workers that meet p99 TTFT and TPOT targets.
#ifndef STRATA_CLI_SIMULATE_CMD_H_
#define STRATA_CLI_SIMULATE_CMD_H_

#include <cstdio>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cli/args.h"
#include "cli/simulate.h"

namespace strata {

absl::StatusOr<Args> ParseSimulateArgs(const std::vector<std::string>& argv);
absl::Status SimulateCommand(const Args& args, std::FILE* out);

// One simulated run per offered rate, drawn as p99 TTFT and TPOT against the rate.
struct CurvePoint {
  double rate = 0;
  SimResult result;
};
std::string CurveSvg(const std::vector<CurvePoint>& points, const std::string& title);

}  // namespace strata

#endif  // STRATA_CLI_SIMULATE_CMD_H_
