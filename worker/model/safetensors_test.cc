#include "worker/model/safetensors.h"

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace strata {
namespace {

std::string TmpDir(const std::string& name) {
  const std::string dir = std::string(getenv("TEST_TMPDIR")) + "/" + name;
  std::filesystem::create_directories(dir);
  return dir;
}

void WriteRaw(const std::string& path, const std::string& bytes) {
  FILE* f = fopen(path.c_str(), "wb");
  fwrite(bytes.data(), 1, bytes.size(), f);
  fclose(f);
}

// A raw file with the given header JSON and data bytes.
std::string RawFile(const std::string& header, const std::string& data) {
  const uint64_t n = header.size();
  return std::string(reinterpret_cast<const char*>(&n), 8) + header + data;
}

absl::Span<const uint8_t> Bytes(const std::vector<float>& v) {
  return {reinterpret_cast<const uint8_t*>(v.data()), v.size() * sizeof(float)};
}

TEST(SafetensorsTest, WriteThenReadRoundTrips) {
  const std::string dir = TmpDir("roundtrip");
  const std::vector<float> a = {1, 2, 3, 4, 5, 6};
  const std::vector<uint16_t> b = {FloatToBf16(0.5f), FloatToBf16(-1.0f)};
  const std::vector<TensorToWrite> tensors = {
      {"model.embed_tokens.weight", DType::kF32, {2, 3}, Bytes(a)},
      {"model.norm.weight", DType::kBF16, {2}, {reinterpret_cast<const uint8_t*>(b.data()), 4}},
  };
  ASSERT_TRUE(WriteSafetensors(dir + "/model.safetensors", tensors, {{"format", "pt"}}).ok());

  auto model = SafetensorsModel::Open(dir);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ(model->num_files(), 1u);
  EXPECT_EQ(model->Names(),
            (std::vector<std::string>{"model.embed_tokens.weight", "model.norm.weight"}));
  auto emb = model->Get("model.embed_tokens.weight");
  ASSERT_TRUE(emb.ok());
  EXPECT_EQ((*emb)->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ((*emb)->dtype, DType::kF32);
  float got[6];
  std::memcpy(got, (*emb)->data.data(), sizeof(got));
  EXPECT_EQ(got[5], 6.0f);
  const TensorView* norm = model->Find("model.norm.weight");
  ASSERT_NE(norm, nullptr);
  uint16_t h;
  std::memcpy(&h, norm->data.data() + 2, 2);
  EXPECT_EQ(Bf16ToFloat(h), -1.0f);
  EXPECT_EQ(model->Get("lm_head.weight").status().code(), absl::StatusCode::kNotFound);

  auto file = SafetensorsFile::Open(dir + "/model.safetensors");
  ASSERT_TRUE(file.ok());
  EXPECT_EQ(file->metadata().at("format"), "pt");
}

// Read into memory (Access::kRead), a file truncated in place afterwards (a fine-tune overwritten
// while a worker loads it) is still whole to its reader: a mapping would raise SIGBUS here.
TEST(SafetensorsTest, AFileReadIntoMemoryOutlivesItsTruncation) {
  const std::string path = TmpDir("truncated") + "/delta.safetensors";
  std::vector<float> a(1 << 16);
  for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<float>(i);
  ASSERT_TRUE(WriteSafetensors(path, {{"t", DType::kF32, {1 << 16}, Bytes(a)}}, {}).ok());
  auto file = SafetensorsFile::Open(path, SafetensorsFile::Access::kRead);
  ASSERT_TRUE(file.ok()) << file.status();
  std::filesystem::resize_file(path, 0);
  SafetensorsFile moved = *std::move(file);  // the bytes move with it
  const TensorView* t = moved.Find("t");
  ASSERT_NE(t, nullptr);
  float last;
  std::memcpy(&last, t->data.data() + t->data.size() - 4, 4);
  EXPECT_EQ(last, 65535.0f);
  // Cut short before it is read: malformed, not a crash.
  WriteRaw(path,
           RawFile(R"({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", "ab"));
  EXPECT_EQ(SafetensorsFile::Open(path, SafetensorsFile::Access::kRead).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(SafetensorsTest, ShardedModelFollowsTheIndex) {
  const std::string dir = TmpDir("sharded");
  const std::vector<float> a = {1, 2}, b = {3, 4, 5};
  ASSERT_TRUE(WriteSafetensors(dir + "/model-00001-of-00002.safetensors",
                               {{{"a", DType::kF32, {2}, Bytes(a)}}})
                  .ok());
  ASSERT_TRUE(WriteSafetensors(dir + "/model-00002-of-00002.safetensors",
                               {{{"b", DType::kF32, {3}, Bytes(b)}}})
                  .ok());
  WriteRaw(dir + "/model.safetensors.index.json",
           R"({"metadata": {"total_size": 20}, "weight_map": {
               "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})");
  auto model = SafetensorsModel::Open(dir);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ(model->num_files(), 2u);
  EXPECT_EQ((*model->Get("b"))->NumElements(), 3);

  WriteRaw(dir + "/model.safetensors.index.json",
           R"({"weight_map": {"a": "model-00002-of-00002.safetensors",
                              "b": "model-00002-of-00002.safetensors"}})");
  auto wrong = SafetensorsModel::Open(dir);
  ASSERT_FALSE(wrong.ok());
  EXPECT_NE(wrong.status().message().find("weight_map puts a in model-00002-of-00002"),
            absl::string_view::npos)
      << wrong.status();

  WriteRaw(dir + "/model.safetensors.index.json",
           R"({"weight_map": {"a": "missing.safetensors"}})");
  auto missing = SafetensorsModel::Open(dir);
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("names shard missing.safetensors"),
            absl::string_view::npos)
      << missing.status();
}

struct BadCase {
  const char* what;
  std::string bytes;
  const char* message;
};

TEST(SafetensorsTest, MalformedFilesAreRefusedWithTheReason) {
  const std::string dir = TmpDir("bad");
  const std::string eight(8, '\0');
  const std::vector<BadCase> cases = {
      {"short", "abc", "too short"},
      {"huge header", std::string("\xff\xff\xff\xff\x00\x00\x00\x00", 8) + "{}",
       "exceeds the file"},
      {"not json", RawFile("{\"a\": ", ""), "invalid JSON"},
      {"bad dtype",
       RawFile(R"({"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 8]}})", eight),
       "field \"w\" has unsupported dtype \"F128\""},
      {"missing shape", RawFile(R"({"w": {"dtype": "F32", "data_offsets": [0, 4]}})", eight),
       "missing field \"w.shape\""},
      {"out of range",
       RawFile(R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", eight),
       "lies outside the 8-byte data section"},
      {"size mismatch",
       RawFile(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}})", eight),
       "spans 8 bytes but w [1] F32 needs 4"},
      {"overlap",
       RawFile(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                   "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})",
               eight),
       "overlap"},
      {"negative dim",
       RawFile(R"({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}})", ""),
       "negative or absurd dimension"},
  };
  for (const BadCase& c : cases) {
    const std::string path = dir + "/bad.safetensors";
    WriteRaw(path, c.bytes);
    auto f = SafetensorsFile::Open(path);
    ASSERT_FALSE(f.ok()) << c.what;
    EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument) << c.what;
    EXPECT_NE(f.status().message().find(c.message), absl::string_view::npos)
        << c.what << ": " << f.status();
    EXPECT_NE(f.status().message().find("bad.safetensors"), absl::string_view::npos) << c.what;
  }
}

TEST(SafetensorsTest, EmptyDirectoryIsNotFound) {
  auto model = SafetensorsModel::Open(TmpDir("empty"));
  EXPECT_EQ(model.status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace strata
