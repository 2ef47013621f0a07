// FreshTestDir: an empty directory for the running GoogleTest test, under the test's TEST_TMPDIR
// (/tmp outside Bazel), named after the test, emptied if an earlier run left it behind.
#ifndef STRATA_TESTS_TEST_DIR_H_
#define STRATA_TESTS_TEST_DIR_H_

#include <cstdlib>
#include <filesystem>
#include <string>

#include "gtest/gtest.h"

namespace strata {

inline std::string FreshTestDir() {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::filesystem::path dir = std::filesystem::path(tmp != nullptr ? tmp : "/tmp") /
                                    ::testing::UnitTest::GetInstance()->current_test_info()->name();
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir.string();
}

}  // namespace strata

#endif  // STRATA_TESTS_TEST_DIR_H_
