#include "common/mapped_file.h"

#include <cstdio>
#include <string>

#include "gtest/gtest.h"

namespace strata {
namespace {

std::string WriteTemp(const std::string& name, const std::string& contents) {
  const std::string path = std::string(getenv("TEST_TMPDIR")) + "/" + name;
  FILE* f = fopen(path.c_str(), "wb");
  fwrite(contents.data(), 1, contents.size(), f);
  fclose(f);
  return path;
}

TEST(MappedFileTest, MapsWholeFile) {
  const std::string path = WriteTemp("a.bin", std::string("hello\0world", 11));
  auto f = MappedFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->size(), 11u);
  EXPECT_EQ(f->text(), std::string("hello\0world", 11));
  MappedFile moved = std::move(*f);
  EXPECT_EQ(moved.bytes()[6], 'w');
  EXPECT_EQ(moved.path(), path);
}

TEST(MappedFileTest, EmptyFileIsEmpty) {
  auto f = MappedFile::Open(WriteTemp("empty", ""));
  ASSERT_TRUE(f.ok());
  EXPECT_TRUE(f->bytes().empty());
}

TEST(MappedFileTest, ErrorsNameThePath) {
  auto missing = MappedFile::Open("/nonexistent/model.safetensors");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("/nonexistent/model.safetensors"),
            absl::string_view::npos);
  auto dir = MappedFile::Open(getenv("TEST_TMPDIR"));
  EXPECT_EQ(dir.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(MappedFileTest, ReadFileToString) {
  EXPECT_EQ(*ReadFileToString(WriteTemp("t.json", "{\"a\": 1}")), "{\"a\": 1}");
  EXPECT_EQ(ReadFileToString("/nonexistent").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace strata
