// Command-line arguments for stratactl: `--name value`, `--name=value` and bare `--flag` booleans,
// with dashes as users type them (--max-tokens). Every flag a command reads is declared, so an
// unknown or malformed flag is an error that names it.
#ifndef STRATA_CLI_ARGS_H_
#define STRATA_CLI_ARGS_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"

namespace strata {

class Args {
 public:
  // `booleans`: flags that take no value; `valued`: flags that take one (repeatable).
  static absl::StatusOr<Args> Parse(const std::vector<std::string>& argv,
                                    const absl::flat_hash_set<std::string>& booleans,
                                    const absl::flat_hash_set<std::string>& valued);

  bool Has(const std::string& name) const { return values_.contains(name); }
  std::optional<std::string> Get(const std::string& name) const;
  // The flag's value; INVALID_ARGUMENT ("--name is required") when it is absent or empty.
  absl::StatusOr<std::string> GetRequired(const std::string& name) const;
  std::vector<std::string> GetAll(const std::string& name) const;
  absl::StatusOr<int64_t> GetInt(const std::string& name, int64_t fallback) const;
  absl::StatusOr<double> GetDouble(const std::string& name, double fallback) const;
  // "1,2,3" as integers.
  absl::StatusOr<std::vector<int32_t>> GetIntList(const std::string& name) const;
  const std::vector<std::string>& positional() const { return positional_; }

 private:
  absl::flat_hash_map<std::string, std::vector<std::string>> values_;
  std::vector<std::string> positional_;
};

}  // namespace strata

#endif  // STRATA_CLI_ARGS_H_
