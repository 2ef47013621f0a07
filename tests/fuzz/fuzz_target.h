// Fuzz targets: each file under tests/fuzz defines one with STRATA_FUZZ_TARGET, the libFuzzer entry
// point, so the same target runs two ways. `bazel test` runs it through fuzz_driver.cc: the
// target's checked-in corpus, then a fixed number of inputs mutated from it by a seeded generator
// (a regression test, under ASan in tools/test.sh too). tools/fuzz.sh builds it with clang's
// libFuzzer and AddressSanitizer for coverage-guided runs of any length, and files what it finds
// into the corpus.
//
// A target returns normally for every input: bad input is an error the code under test returns,
// not a crash. What it checks beyond that (a property that must hold for every input, such as a
// parser giving the same result however its input is split) fails with FUZZ_CHECK, which prints
// why and aborts, so that both drivers report the input.
#ifndef STRATA_TESTS_FUZZ_FUZZ_TARGET_H_
#define STRATA_TESTS_FUZZ_FUZZ_TARGET_H_

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "absl/strings/string_view.h"

#define STRATA_FUZZ_TARGET(data, size) \
  extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size)

// Aborts with `what` (a printf format and its arguments) when `condition` is false.
#define FUZZ_CHECK(condition, ...)                                                            \
  do {                                                                                        \
    if (!(condition)) {                                                                       \
      std::fprintf(stderr, "%s:%d: FUZZ_CHECK(%s) failed: ", __FILE__, __LINE__, #condition); \
      std::fprintf(stderr, __VA_ARGS__);                                                      \
      std::fprintf(stderr, "\n");                                                             \
      std::abort();                                                                           \
    }                                                                                         \
  } while (0)

namespace strata::fuzz {

// Reads a fuzz input front to back: a few leading bytes pick options, the rest is the text under
// test. Reads past the end give zeros and empty text.
class FuzzInput {
 public:
  FuzzInput(const uint8_t* data, size_t size)
      : data_(reinterpret_cast<const char*>(data)), size_(size) {}
  uint8_t Byte() { return pos_ < size_ ? static_cast<uint8_t>(data_[pos_++]) : 0; }
  uint32_t Uint32() {
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v = (v << 8) | Byte();
    return v;
  }
  // The next `n` bytes (fewer at the end).
  absl::string_view Take(size_t n) {
    const size_t k = n < size_ - pos_ ? n : size_ - pos_;
    absl::string_view out(data_ + pos_, k);
    pos_ += k;
    return out;
  }
  // Everything not yet read.
  absl::string_view Rest() { return Take(size_ - pos_); }

 private:
  const char* data_;
  size_t size_;
  size_t pos_ = 0;
};

}  // namespace strata::fuzz

#endif  // STRATA_TESTS_FUZZ_FUZZ_TARGET_H_
