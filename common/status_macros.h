// RETURN_IF_ERROR and ASSIGN_OR_RETURN: early return of a non-OK absl::Status.
//
// Debian 12's Abseil (20220623) has no status_macros.h; these are Strata's, used across the tree.
//
//   RETURN_IF_ERROR(file.Write(block));
//   ASSIGN_OR_RETURN(Model model, LoadModel(path));
//   ASSIGN_OR_RETURN(auto blocks, store.Lookup(hashes), _.Prepend("prefetch: "));
//
// ASSIGN_OR_RETURN's optional third argument is returned instead of the bare error; inside it `_`
// is a StatusBuilder holding the error, so `_.Prepend("context")` adds context. RETURN_IF_ERROR
// takes context through WithContext: RETURN_IF_ERROR(WithContext(status, "loading delta"));
#ifndef STRATA_COMMON_STATUS_MACROS_H_
#define STRATA_COMMON_STATUS_MACROS_H_

#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace strata {

// Returns `status` with `context` prepended to its message ("context: message"), keeping the code
// and payloads. OK stays OK.
absl::Status WithContext(const absl::Status& status, absl::string_view context);

namespace status_internal {

// The `_` of ASSIGN_OR_RETURN's error expression: an error status that context can be added to.
class StatusBuilder {
 public:
  explicit StatusBuilder(absl::Status status) : status_(std::move(status)) {}
  StatusBuilder& Prepend(absl::string_view context) {
    status_ = WithContext(status_, context);
    return *this;
  }
  // Converts to the enclosing function's return type (absl::Status or absl::StatusOr<T>).
  operator absl::Status() const { return status_; }  // NOLINT(google-explicit-constructor)
  template <typename T>
  operator absl::StatusOr<T>() const {  // NOLINT(google-explicit-constructor)
    return status_;
  }

 private:
  absl::Status status_;
};

inline const absl::Status& GetStatus(const absl::Status& s) { return s; }
template <typename T>
const absl::Status& GetStatus(const absl::StatusOr<T>& s) {
  return s.status();
}

}  // namespace status_internal
}  // namespace strata

#define STRATA_STATUS_CONCAT_INNER_(a, b) a##b
#define STRATA_STATUS_CONCAT_(a, b) STRATA_STATUS_CONCAT_INNER_(a, b)

// Evaluates `expr` (an absl::Status or absl::StatusOr) and returns its status from the enclosing
// function when it is not OK.
#define RETURN_IF_ERROR(expr)                                         \
  do {                                                                \
    const auto& _strata_status_or = (expr);                           \
    if (!_strata_status_or.ok()) {                                    \
      return ::strata::status_internal::GetStatus(_strata_status_or); \
    }                                                                 \
  } while (false)

#define STRATA_ASSIGN_OR_RETURN_2_(lhs, rexpr) STRATA_ASSIGN_OR_RETURN_3_(lhs, rexpr, _)

#define STRATA_ASSIGN_OR_RETURN_3_(lhs, rexpr, error_expr)                                      \
  STRATA_ASSIGN_OR_RETURN_IMPL_(STRATA_STATUS_CONCAT_(_strata_statusor_, __LINE__), lhs, rexpr, \
                                error_expr)

#define STRATA_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr, error_expr)       \
  auto statusor = (rexpr);                                                    \
  if (!statusor.ok()) {                                                       \
    ::strata::status_internal::StatusBuilder _(std::move(statusor).status()); \
    (void)_;                                                                  \
    return (error_expr);                                                      \
  }                                                                           \
  lhs = std::move(statusor).value()

#define STRATA_GET_4TH_ARG_(a, b, c, d, ...) d

// ASSIGN_OR_RETURN(lhs, rexpr[, error_expr]): evaluates `rexpr` (an absl::StatusOr<T>); on error
// returns it (or `error_expr`, in which `_` is the error as a StatusBuilder), else assigns the
// value to `lhs`, which may declare a variable. Expands to several statements: not for use as the
// body of an unbraced if.
#define ASSIGN_OR_RETURN(...)                                                                      \
  STRATA_GET_4TH_ARG_(__VA_ARGS__, STRATA_ASSIGN_OR_RETURN_3_, STRATA_ASSIGN_OR_RETURN_2_, unused) \
  (__VA_ARGS__)

#endif  // STRATA_COMMON_STATUS_MACROS_H_
