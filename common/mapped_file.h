// MappedFile: a read-only memory map of a whole file, the one RAII owner of an mmap in Strata.
// Model weights are read through it so that loading touches no byte twice and the page cache is
// shared between processes serving the same model.
#ifndef STRATA_COMMON_MAPPED_FILE_H_
#define STRATA_COMMON_MAPPED_FILE_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace strata {

// Move-only. The mapping stays valid, and its bytes unchanged as long as nobody rewrites the file,
// until the object is destroyed. Thread-compatible; the bytes may be read from any thread.
class MappedFile {
 public:
  // Maps `path` read-only. NOT_FOUND when it does not exist, INVALID_ARGUMENT when it is not a
  // regular file, INTERNAL for other OS errors; messages name the path. An empty file maps to an
  // empty span.
  static absl::StatusOr<MappedFile> Open(const std::string& path);

  MappedFile() = default;
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile();

  absl::Span<const uint8_t> bytes() const { return {data_, size_}; }
  absl::string_view text() const { return {reinterpret_cast<const char*>(data_), size_}; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile(const uint8_t* data, size_t size, std::string path)
      : data_(data), size_(size), path_(std::move(path)) {}
  void Reset();

  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  std::string path_;
};

// Reads a whole file into a string (small text files such as config.json; and files that may be
// rewritten while they are read, which a mapping would answer with SIGBUS once truncated).
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

}  // namespace strata

#endif  // STRATA_COMMON_MAPPED_FILE_H_
