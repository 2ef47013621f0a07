#include "cli/keys_cmd.h"

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/json.h"
#include "common/secrets.h"
#include "common/status_macros.h"
#include "coordinator/api_keys.h"

namespace strata {
namespace {

std::string Limit(int64_t n) { return n > 0 ? absl::StrCat(n) : "-"; }

}  // namespace

absl::Status KeysCheckCommand(const Args& args, std::FILE* out) {
  if (args.positional().size() != 1) {
    return absl::InvalidArgumentError("keys check takes one keys file");
  }
  ASSIGN_OR_RETURN(std::shared_ptr<const ApiKeys> keys, ApiKeys::Load(args.positional()[0]));
  if (args.Has("json")) {
    std::vector<std::string> tenants;
    for (const auto& t : keys->tenants()) {
      std::vector<std::string> models;
      for (const std::string& m : t->models) models.push_back(JsonQuote(m));
      tenants.push_back(absl::StrFormat(
          "{\"name\":%s,\"keys\":%d,\"models\":%s,\"max_concurrent_requests\":%d,"
          "\"requests_per_minute\":%d,\"tokens_per_minute\":%d,\"max_priority\":%d,"
          "\"scheduling_weight\":%g,\"isolate_cache\":%s,\"admin\":%s}",
          JsonQuote(t->name), t->keys.size(),
          t->all_models ? "null" : absl::StrCat("[", absl::StrJoin(models, ","), "]"),
          t->max_concurrent_requests, t->requests_per_minute, t->tokens_per_minute, t->max_priority,
          t->scheduling_weight, t->isolate_cache ? "true" : "false", t->admin ? "true" : "false"));
    }
    std::fprintf(out, "{\"tenants\":[%s]}\n", absl::StrJoin(tenants, ",").c_str());
    return absl::OkStatus();
  }
  std::fprintf(out, "%s: %zu tenants\n", args.positional()[0].c_str(), keys->tenants().size());
  std::fprintf(out, "%-20s %4s %-28s %10s %8s %10s %8s %6s %7s %5s\n", "tenant", "keys", "models",
               "concurrent", "req/min", "tokens/min", "max prio", "weight", "cache", "admin");
  for (const auto& t : keys->tenants()) {
    std::string models = t->all_models ? "(all)" : absl::StrJoin(t->models, ",");
    if (models.empty()) models = "(none)";
    std::fprintf(out, "%-20s %4zu %-28s %10s %8s %10s %8lld %6g %7s %5s\n", t->name.c_str(),
                 t->keys.size(), models.c_str(), Limit(t->max_concurrent_requests).c_str(),
                 Limit(t->requests_per_minute).c_str(), Limit(t->tokens_per_minute).c_str(),
                 static_cast<long long>(t->max_priority), t->scheduling_weight,
                 t->isolate_cache ? "own" : "shared", t->admin ? "yes" : "no");
  }
  return absl::OkStatus();
}

absl::Status KeysNewCommand(const Args& args, std::FILE* out) {
  if (!args.positional().empty()) return absl::InvalidArgumentError("keys new takes no file");
  const std::string prefix = args.Get("prefix").value_or("sk-strata-");
  const std::string key = absl::StrCat(prefix, NewSecret().substr(0, 48));
  // What the coordinator will take.
  if (key.size() > 256) {
    return absl::InvalidArgumentError(
        "--prefix must be at most 208 characters (keys are at most 256)");
  }
  if (!ValidSecret(key)) {
    return absl::InvalidArgumentError("--prefix must be printable ASCII without spaces");
  }
  std::fprintf(out, "%s\n", key.c_str());
  return absl::OkStatus();
}

}  // namespace strata
