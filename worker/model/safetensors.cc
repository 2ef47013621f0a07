#include "worker/model/safetensors.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/json.h"
#include "common/status_macros.h"

namespace strata {
namespace {

// Larger headers are refused as corrupt (the format's own reference reader uses the same bound).
constexpr uint64_t kMaxHeaderBytes = 100u << 20;

bool FileExists(const std::string& path) { return MappedFile::Open(path).ok(); }

}  // namespace

int64_t TensorView::NumElements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string TensorView::DebugString() const {
  return absl::StrCat(name, " [", absl::StrJoin(shape, ", "), "] ", DTypeName(dtype));
}

absl::StatusOr<SafetensorsFile> SafetensorsFile::Open(const std::string& path, Access access) {
  SafetensorsFile out;
  absl::Span<const uint8_t> bytes;
  if (access == Access::kRead) {
    ASSIGN_OR_RETURN(std::string read, ReadFileToString(path));
    out.read_ = std::make_unique<std::string>(std::move(read));
    bytes = absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(out.read_->data()),
                                      out.read_->size());
  } else {
    ASSIGN_OR_RETURN(out.file_, MappedFile::Open(path));
    bytes = out.file_.bytes();
  }
  out.path_ = std::make_unique<std::string>(path);
  out.tensors_ = std::make_unique<std::vector<TensorView>>();
  auto bad = [&path](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", what));
  };
  if (bytes.size() < 8) return bad("too short to be a safetensors file");
  uint64_t header_bytes;
  std::memcpy(&header_bytes, bytes.data(), 8);
  if (header_bytes > kMaxHeaderBytes || header_bytes > bytes.size() - 8) {
    return bad(absl::StrCat("header length ", header_bytes, " exceeds the file (", bytes.size(),
                            " bytes)"));
  }
  const absl::string_view header(reinterpret_cast<const char*>(bytes.data() + 8), header_bytes);
  ASSIGN_OR_RETURN(JsonDocument doc, JsonDocument::Parse(header, path));
  ASSIGN_OR_RETURN(auto members, doc.root().AsObject());
  const uint8_t* data_start = bytes.data() + 8 + header_bytes;
  const uint64_t data_bytes = bytes.size() - 8 - header_bytes;

  for (const auto& [key, value] : members) {
    if (key == "__metadata__") {
      ASSIGN_OR_RETURN(auto meta, value.AsObject());
      for (const auto& [mk, mv] : meta) {
        ASSIGN_OR_RETURN(absl::string_view s, mv.AsString());
        out.metadata_[std::string(mk)] = std::string(s);
      }
      continue;
    }
    TensorView t;
    t.name = std::string(key);
    t.file = out.path_.get();
    ASSIGN_OR_RETURN(absl::string_view dtype, value.StringField("dtype"));
    if (!ParseDType(dtype, &t.dtype)) {
      return value.Error(absl::StrCat("has unsupported dtype \"", dtype, "\""));
    }
    ASSIGN_OR_RETURN(JsonValue shape, value.Field("shape"));
    ASSIGN_OR_RETURN(auto dims, shape.AsArray());
    int64_t numel = 1;
    for (const JsonValue& d : dims) {
      ASSIGN_OR_RETURN(int64_t v, d.AsInt());
      if (v < 0 || (v > 0 && numel > (int64_t{1} << 50) / v)) {
        return shape.Error("has a negative or absurd dimension");
      }
      t.shape.push_back(v);
      numel *= v;
    }
    ASSIGN_OR_RETURN(JsonValue offsets_value, value.Field("data_offsets"));
    ASSIGN_OR_RETURN(auto offsets, offsets_value.AsArray());
    if (offsets.size() != 2) return offsets_value.Error("must hold two offsets");
    ASSIGN_OR_RETURN(int64_t begin, offsets[0].AsInt());
    ASSIGN_OR_RETURN(int64_t end, offsets[1].AsInt());
    if (begin < 0 || end < begin || static_cast<uint64_t>(end) > data_bytes) {
      return offsets_value.Error(absl::StrCat("[", begin, ", ", end, "] lies outside the ",
                                              data_bytes, "-byte data section"));
    }
    const int64_t want = numel * DTypeBytes(t.dtype);
    if (end - begin != want) {
      return offsets_value.Error(
          absl::StrCat("spans ", end - begin, " bytes but ", t.DebugString(), " needs ", want));
    }
    t.data = absl::Span<const uint8_t>(data_start + begin, static_cast<size_t>(want));
    out.tensors_->push_back(std::move(t));
  }
  // Overlapping tensors mean a corrupt or hostile file.
  std::vector<const TensorView*> sorted;
  for (const TensorView& t : *out.tensors_) sorted.push_back(&t);
  std::sort(sorted.begin(), sorted.end(), [](const TensorView* a, const TensorView* b) {
    return a->data.data() < b->data.data();
  });
  for (size_t i = 1; i < sorted.size(); ++i) {
    if (sorted[i - 1]->data.data() + sorted[i - 1]->data.size() > sorted[i]->data.data()) {
      return bad(
          absl::StrCat("tensors ", sorted[i - 1]->name, " and ", sorted[i]->name, " overlap"));
    }
  }
  for (size_t i = 0; i < out.tensors_->size(); ++i) out.index_[(*out.tensors_)[i].name] = i;
  return out;
}

const TensorView* SafetensorsFile::Find(absl::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &(*tensors_)[it->second];
}

absl::StatusOr<SafetensorsModel> SafetensorsModel::Open(const std::string& dir) {
  SafetensorsModel model;
  model.dir_ = dir;
  const std::string single = dir + "/model.safetensors";
  const std::string index_path = dir + "/model.safetensors.index.json";
  std::map<std::string, std::string> weight_map;  // tensor -> shard file
  if (FileExists(index_path)) {
    ASSIGN_OR_RETURN(std::string text, ReadFileToString(index_path));
    ASSIGN_OR_RETURN(JsonDocument doc, JsonDocument::Parse(text, index_path));
    ASSIGN_OR_RETURN(JsonValue map, doc.root().Field("weight_map"));
    ASSIGN_OR_RETURN(auto entries, map.AsObject());
    std::set<std::string> shards;
    for (const auto& [tensor, file] : entries) {
      ASSIGN_OR_RETURN(absl::string_view f, file.AsString());
      if (f.empty() || f.find('/') != absl::string_view::npos) {
        return file.Error("must name a file in the model directory");
      }
      weight_map[std::string(tensor)] = std::string(f);
      shards.insert(std::string(f));
    }
    for (const std::string& shard : shards) {
      ASSIGN_OR_RETURN(SafetensorsFile f, SafetensorsFile::Open(dir + "/" + shard),
                       _.Prepend(absl::StrCat(index_path, " names shard ", shard)));
      model.files_.push_back(std::move(f));
    }
  } else if (FileExists(single)) {
    ASSIGN_OR_RETURN(SafetensorsFile f, SafetensorsFile::Open(single));
    model.files_.push_back(std::move(f));
  } else {
    return absl::NotFoundError(
        absl::StrCat(dir, " has neither model.safetensors nor model.safetensors.index.json"));
  }
  for (const SafetensorsFile& f : model.files_) {
    for (const TensorView& t : f.tensors()) {
      if (!model.tensors_.emplace(t.name, &t).second) {
        return absl::InvalidArgumentError(
            absl::StrCat(dir, ": tensor ", t.name, " appears in more than one shard"));
      }
    }
  }
  for (const auto& [tensor, file] : weight_map) {
    auto it = model.tensors_.find(tensor);
    if (it == model.tensors_.end() || *it->second->file != dir + "/" + file) {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": weight_map puts ", tensor,
                                                     " in ", file, ", which does not hold it"));
    }
  }
  return model;
}

absl::StatusOr<const TensorView*> SafetensorsModel::Get(absl::string_view name) const {
  const TensorView* t = Find(name);
  if (t == nullptr) {
    return absl::NotFoundError(absl::StrCat(dir_, ": no tensor named ", name));
  }
  return t;
}

const TensorView* SafetensorsModel::Find(absl::string_view name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : it->second;
}

std::vector<std::string> SafetensorsModel::Names() const {
  std::vector<std::string> out;
  for (const auto& [name, t] : tensors_) out.push_back(name);
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace strata

namespace strata {

absl::Status WriteSafetensors(const std::string& path, absl::Span<const TensorToWrite> tensors,
                              const std::map<std::string, std::string>& metadata) {
  std::vector<std::string> entries;
  if (!metadata.empty()) {
    std::vector<std::string> kv;
    for (const auto& [k, v] : metadata) kv.push_back(JsonQuote(k) + ":" + JsonQuote(v));
    entries.push_back("\"__metadata__\":{" + absl::StrJoin(kv, ",") + "}");
  }
  std::set<std::string> names;
  uint64_t offset = 0;
  for (const TensorToWrite& t : tensors) {
    int64_t numel = 1;
    for (int64_t d : t.shape) numel *= d;
    if (static_cast<uint64_t>(numel * DTypeBytes(t.dtype)) != t.data.size()) {
      return absl::InvalidArgumentError(absl::StrCat("WriteSafetensors: ", t.name, " has ",
                                                     t.data.size(), " bytes for its shape"));
    }
    if (!names.insert(t.name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("WriteSafetensors: duplicate tensor ", t.name));
    }
    entries.push_back(absl::StrCat(JsonQuote(t.name), ":{\"dtype\":\"", DTypeName(t.dtype),
                                   "\",\"shape\":[", absl::StrJoin(t.shape, ","),
                                   "],\"data_offsets\":[", offset, ",", offset + t.data.size(),
                                   "]}"));
    offset += t.data.size();
  }
  std::string header = "{" + absl::StrJoin(entries, ",") + "}";
  while ((8 + header.size()) % 8 != 0) header += ' ';
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) {
    return absl::InternalError(absl::StrCat("cannot create ", path, ": ", std::strerror(errno)));
  }
  const uint64_t header_bytes = header.size();
  bool ok = std::fwrite(&header_bytes, 8, 1, f) == 1 &&
            std::fwrite(header.data(), 1, header.size(), f) == header.size();
  for (const TensorToWrite& t : tensors) {
    if (!ok) break;
    ok = t.data.empty() || std::fwrite(t.data.data(), 1, t.data.size(), f) == t.data.size();
  }
  ok = (std::fclose(f) == 0) && ok;
  if (!ok) return absl::InternalError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

}  // namespace strata
