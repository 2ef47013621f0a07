#include "cli/args.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace strata {

absl::StatusOr<Args> Args::Parse(const std::vector<std::string>& argv,
                                 const absl::flat_hash_set<std::string>& booleans,
                                 const absl::flat_hash_set<std::string>& valued) {
  Args out;
  for (size_t i = 0; i < argv.size(); ++i) {
    const std::string& a = argv[i];
    if (a.size() < 3 || a.compare(0, 2, "--") != 0) {
      out.positional_.push_back(a);
      continue;
    }
    std::string name = a.substr(2);
    std::optional<std::string> value;
    if (const size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    if (booleans.contains(name)) {
      if (value && *value != "true" && *value != "false") {
        return absl::InvalidArgumentError(absl::StrCat("--", name, " takes no value"));
      }
      out.values_[name].push_back(value.value_or("true"));
    } else if (valued.contains(name)) {
      if (!value) {
        if (i + 1 >= argv.size())
          return absl::InvalidArgumentError(absl::StrCat("--", name, " needs a value"));
        value = argv[++i];
      }
      out.values_[name].push_back(*value);
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name));
    }
  }
  return out;
}

std::optional<std::string> Args::Get(const std::string& name) const {
  auto it = values_.find(name);
  if (it == values_.end()) return std::nullopt;
  return it->second.back();
}

absl::StatusOr<std::string> Args::GetRequired(const std::string& name) const {
  std::optional<std::string> v = Get(name);
  if (!v || v->empty()) return absl::InvalidArgumentError(absl::StrCat("--", name, " is required"));
  return *v;
}

std::vector<std::string> Args::GetAll(const std::string& name) const {
  auto it = values_.find(name);
  return it == values_.end() ? std::vector<std::string>{} : it->second;
}

absl::StatusOr<int64_t> Args::GetInt(const std::string& name, int64_t fallback) const {
  std::optional<std::string> v = Get(name);
  if (!v) return fallback;
  int64_t out;
  if (!absl::SimpleAtoi(*v, &out)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, " must be an integer, not \"", *v, "\""));
  }
  return out;
}

absl::StatusOr<double> Args::GetDouble(const std::string& name, double fallback) const {
  std::optional<std::string> v = Get(name);
  if (!v) return fallback;
  double out;
  if (!absl::SimpleAtod(*v, &out)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, " must be a number, not \"", *v, "\""));
  }
  return out;
}

absl::StatusOr<std::vector<int32_t>> Args::GetIntList(const std::string& name) const {
  std::vector<int32_t> out;
  std::optional<std::string> v = Get(name);
  if (!v) return out;
  for (absl::string_view part : absl::StrSplit(*v, ',', absl::SkipWhitespace())) {
    int32_t x;
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(part), &x)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", name, " must be comma-separated integers; \"", part, "\" is not one"));
    }
    out.push_back(x);
  }
  return out;
}

}  // namespace strata
