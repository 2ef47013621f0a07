// Reading safetensors files (the Hugging Face weight format) without copying: each file is
// memory-mapped and tensors are views into the mapping.
//
// Format: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor name to
// {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the end of the header) plus
// an optional "__metadata__" object of strings, then the data. A model directory holds either one
// `model.safetensors` or several shards listed by `model.safetensors.index.json` ({"weight_map":
// {tensor: file}}). Every offset, size and shard reference is validated before any tensor is
// returned.
#ifndef STRATA_WORKER_MODEL_SAFETENSORS_H_
#define STRATA_WORKER_MODEL_SAFETENSORS_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/mapped_file.h"
#include "kernels/dtype.h"

namespace strata {

// A tensor inside a mapped file. Valid while its SafetensorsFile (or SafetensorsModel) lives.
struct TensorView {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  // Exactly NumElements() * DTypeBytes(dtype) bytes. Not necessarily aligned to the element size.
  absl::Span<const uint8_t> data;
  // The file it lives in, for error messages.
  const std::string* file = nullptr;

  int64_t NumElements() const;
  // "name [d0, d1] BF16".
  std::string DebugString() const;
};

// One safetensors file. Move-only; immutable after Open, so safe to read from any thread.
class SafetensorsFile {
 public:
  // Maps and validates `path`. INVALID_ARGUMENT (naming the file and the offending tensor or field)
  // for malformed content, NOT_FOUND when the file does not exist. kRead reads the file into
  // memory instead: for files that may be rewritten in place while they are read (fine-tunes put
  // in a directory a worker rescans), where a truncated mapping would kill the process (SIGBUS);
  // a file cut short reads as malformed or fails its checksum instead.
  enum class Access { kMap, kRead };
  static absl::StatusOr<SafetensorsFile> Open(const std::string& path,
                                              Access access = Access::kMap);

  // nullptr when absent.
  const TensorView* Find(absl::string_view name) const;
  const std::vector<TensorView>& tensors() const { return *tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& path() const { return *path_; }

 private:
  SafetensorsFile() = default;
  MappedFile file_;
  std::unique_ptr<std::string> read_;  // Access::kRead: the file's bytes
  std::unique_ptr<std::string> path_;
  std::unique_ptr<std::vector<TensorView>> tensors_;
  absl::flat_hash_map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// The weights of a model directory: `model.safetensors`, or the shards named by
// `model.safetensors.index.json`. Immutable after Open; thread-safe for reads.
class SafetensorsModel {
 public:
  static absl::StatusOr<SafetensorsModel> Open(const std::string& dir);

  // NOT_FOUND naming the tensor and the directory when absent.
  absl::StatusOr<const TensorView*> Get(absl::string_view name) const;
  const TensorView* Find(absl::string_view name) const;
  // Every tensor name, sorted.
  std::vector<std::string> Names() const;
  size_t num_files() const { return files_.size(); }
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
  std::vector<SafetensorsFile> files_;
  absl::flat_hash_map<std::string, const TensorView*> tensors_;
};

// A tensor to write: its bytes must be NumElements(shape) * DTypeBytes(dtype) long.
struct TensorToWrite {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  absl::Span<const uint8_t> data;
};

// Writes a safetensors file (tensors in the given order, data aligned to 8 bytes as the reference
// writer does). INVALID_ARGUMENT for a size mismatch or duplicate name; INTERNAL for I/O errors.
absl::Status WriteSafetensors(const std::string& path, absl::Span<const TensorToWrite> tensors,
                              const std::map<std::string, std::string>& metadata = {});

}  // namespace strata

#endif  // STRATA_WORKER_MODEL_SAFETENSORS_H_
