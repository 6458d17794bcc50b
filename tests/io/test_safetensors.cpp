#include "ballast/io/safetensors.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>

#include "ballast/core/error.h"
#include "support/expect_error.h"
#include "tmpdir.h"

namespace ballast::io {
namespace {

using test::safetensors_bytes;
using test::TmpDir;
using test::write_bytes;
using test::expect_error;

Tensor iota_f32(std::vector<int64_t> shape) {
  Tensor t = Tensor::zeros(std::move(shape), DType::F32);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = float(i) * 0.5f - 3.0f;
  return t;
}

TEST(Safetensors, RoundTripF32BF16F16) {
  TmpDir dir;
  Tensor a = iota_f32({2, 3});
  Tensor b = Tensor::zeros({5}, DType::BF16);
  Tensor c = Tensor::zeros({3, 1}, DType::F16);
  for (int i = 0; i < 5; ++i) b.data<uint16_t>()[i] = f32_to_bf16(float(i) - 1.5f);
  for (int i = 0; i < 3; ++i) c.data<uint16_t>()[i] = f32_to_f16(float(i) * 0.25f);
  Tensor empty = Tensor::zeros({0, 4}, DType::F32);
  auto path = dir / "x.safetensors";
  write_safetensors(path, {{"a", a}, {"b", b}, {"c", c}, {"empty", empty}}, {{"format", "pt"}});

  auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f->names(), (std::vector<std::string>{"a", "b", "c", "empty"}));
  EXPECT_EQ(f->metadata().at("format"), "pt");
  Tensor a2 = f->get("a"), b2 = f->get("b"), c2 = f->get("c");
  EXPECT_EQ(a2.shape(), a.shape());
  EXPECT_EQ(a2.dtype(), DType::F32);
  EXPECT_EQ(b2.dtype(), DType::BF16);
  EXPECT_EQ(c2.dtype(), DType::F16);
  EXPECT_EQ(f->get("empty").shape(), (std::vector<int64_t>{0, 4}));
  EXPECT_EQ(std::memcmp(a2.raw(), a.raw(), a.nbytes()), 0);
  EXPECT_EQ(std::memcmp(b2.raw(), b.raw(), b.nbytes()), 0);
  EXPECT_EQ(std::memcmp(c2.raw(), c.raw(), c.nbytes()), 0);
  // Each tensor is aligned to its element size (header padded, larger elements first).
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a2.raw()) % 4, 0u);
  EXPECT_EQ(f->tensor_bytes(), a.nbytes() + b.nbytes() + c.nbytes());
}

TEST(Safetensors, ViewOutlivesFile) {
  TmpDir dir;
  auto path = dir / "x.safetensors";
  write_safetensors(path, {{"w", iota_f32({4})}});
  Tensor w;
  {
    auto f = SafetensorsFile::open(path);
    w = f->get("w");
  }  // the mapping stays alive through the view
  EXPECT_FLOAT_EQ(w.f32()[3], -1.5f);
}

TEST(Safetensors, Prefault) {
  TmpDir dir;
  auto path = dir / "x.safetensors";
  write_safetensors(path, {{"w", iota_f32({1000})}});
  auto f = SafetensorsFile::open(path);
  uint64_t last = 0, total = 0;
  f->prefault([&](uint64_t d, uint64_t t) { last = d, total = t; });
  EXPECT_EQ(total, 4000u);
  EXPECT_EQ(last, total);
}

TEST(Safetensors, ReadsHandWrittenHeader) {
  // As the Python package writes it: spaces pad the header, metadata present.
  TmpDir dir;
  std::string h = R"({"__metadata__":{"format":"pt"},"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  h.append((8 - h.size() % 8) % 8, ' ');
  float v[2] = {1.0f, -2.0f};
  write_bytes(dir / "h.safetensors", safetensors_bytes(h, std::string(reinterpret_cast<char*>(v), 8)));
  auto f = SafetensorsFile::open(dir / "h.safetensors");
  EXPECT_FLOAT_EQ(f->get("x").f32()[1], -2.0f);
}

TEST(SafetensorsErrors, MissingFile) {
  TmpDir dir;
  auto p = (dir / "nope.safetensors").string();
  expect_error([&] { SafetensorsFile::open(p); }, {p, "cannot open"});
}

TEST(SafetensorsErrors, ShorterThanLength) {
  TmpDir dir;
  auto p = dir / "t.safetensors";
  write_bytes(p, "abc");
  expect_error([&] { SafetensorsFile::open(p); }, {p.string(), "truncated"});
}

TEST(SafetensorsErrors, HeaderLengthPastEnd) {
  TmpDir dir;
  auto p = dir / "t.safetensors";
  write_bytes(p, safetensors_bytes("{}", "", 4096));
  expect_error([&] { SafetensorsFile::open(p); }, {p.string(), "header length 4096", "truncated"});
}

TEST(SafetensorsErrors, HugeHeaderLength) {
  TmpDir dir;
  auto p = dir / "t.safetensors";
  write_bytes(p, safetensors_bytes("{}", "", uint64_t(1) << 62));
  expect_error([&] { SafetensorsFile::open(p); }, {p.string(), "header length"});
}

TEST(SafetensorsErrors, TruncatedData) {
  // A good file cut short: the last tensor's offsets now run past the end.
  TmpDir dir;
  auto p = dir / "t.safetensors";
  write_safetensors(p, {{"a", iota_f32({4})}, {"b", iota_f32({4})}});
  auto size = std::filesystem::file_size(p);
  std::filesystem::resize_file(p, size - 3);
  expect_error([&] { SafetensorsFile::open(p); }, {p.string(), "out of range", "truncated"});
}

TEST(SafetensorsErrors, MalformedJson) {
  TmpDir dir;
  auto p = dir / "t.safetensors";
  write_bytes(p, safetensors_bytes(R"({"a": {"dtype": "F32", )", ""));
  expect_error([&] { SafetensorsFile::open(p); }, {p.string(), "malformed JSON header"});
}

TEST(SafetensorsErrors, HeaderNotObject) {
  TmpDir dir;
  auto p = dir / "t.safetensors";
  write_bytes(p, safetensors_bytes("[1,2]", ""));
  expect_error([&] { SafetensorsFile::open(p); }, {p.string(), "must be an object"});
}

TEST(SafetensorsErrors, OffsetsOutOfRange) {
  TmpDir dir;
  auto p = dir / "t.safetensors";
  write_bytes(p, safetensors_bytes(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})",
                                   std::string(8, '\0')));
  expect_error([&] { SafetensorsFile::open(p); }, {p.string(), "'w'", "out of range"});
}

TEST(SafetensorsErrors, OffsetsOverlap) {
  TmpDir dir;
  auto p = dir / "t.safetensors";
  write_bytes(p, safetensors_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                   R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                                   std::string(12, '\0')));
  expect_error([&] { SafetensorsFile::open(p); }, {p.string(), "'b'", "overlap", "'a'"});
}

TEST(SafetensorsErrors, OffsetsLeaveGap) {
  TmpDir dir;
  auto p = dir / "t.safetensors";
  write_bytes(p, safetensors_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                                   std::string(8, '\0')));
  expect_error([&] { SafetensorsFile::open(p); }, {p.string(), "'a'", "gap"});
}

TEST(SafetensorsErrors, TrailingBytes) {
  TmpDir dir;
  auto p = dir / "t.safetensors";
  write_bytes(p, safetensors_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                                   std::string(12, '\0')));
  expect_error([&] { SafetensorsFile::open(p); }, {p.string(), "8 bytes after the last tensor", "'a'"});
}

TEST(SafetensorsErrors, SizeDoesNotMatchShape) {
  TmpDir dir;
  auto p = dir / "t.safetensors";
  write_bytes(p, safetensors_bytes(R"({"w":{"dtype":"BF16","shape":[3,2],"data_offsets":[0,8]}})",
                                   std::string(8, '\0')));
  expect_error([&] { SafetensorsFile::open(p); }, {p.string(), "'w'", "needs 12"});
}

TEST(SafetensorsErrors, EndBeforeBegin) {
  TmpDir dir;
  auto p = dir / "t.safetensors";
  write_bytes(p, safetensors_bytes(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})",
                                   std::string(8, '\0')));
  expect_error([&] { SafetensorsFile::open(p); }, {p.string(), "'w'", "end before begin"});
}

TEST(SafetensorsErrors, UnsupportedDtype) {
  TmpDir dir;
  for (const char* dt : {"F64", "I8", "BOOL"}) {
    auto p = dir / (std::string(dt) + ".safetensors");
    write_bytes(p, safetensors_bytes(std::string(R"({"weird":{"dtype":")") + dt +
                                         R"(","shape":[1],"data_offsets":[0,1]}})",
                                     std::string(1, '\0')));
    expect_error([&] { SafetensorsFile::open(p); }, {p.string(), "'weird'", "unsupported dtype", dt});
  }
}

TEST(SafetensorsErrors, BadFieldTypes) {
  TmpDir dir;
  struct Case {
    const char* header;
    const char* expect;
  } cases[] = {
      {R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,0]}})", "\"shape\""},
      {R"({"w":{"dtype":"F32","shape":"2","data_offsets":[0,0]}})", "\"shape\""},
      {R"({"w":{"dtype":"F32","shape":[1.5],"data_offsets":[0,0]}})", "\"shape\""},
      {R"({"w":{"dtype":7,"shape":[0],"data_offsets":[0,0]}})", "\"dtype\""},
      {R"({"w":{"shape":[0],"data_offsets":[0,0]}})", "missing \"dtype\""},
      {R"({"w":{"dtype":"F32","shape":[0]}})", "missing \"data_offsets\""},
      {R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[0]}})", "[begin, end]"},
      {R"({"w":[1,2]})", "entry must be an object"},
      {R"({"__metadata__":{"k":1}})", "__metadata__"},
  };
  for (const auto& c : cases) {
    auto p = dir / "t.safetensors";
    write_bytes(p, safetensors_bytes(c.header, ""));
    expect_error([&] { SafetensorsFile::open(p); }, {p.string(), c.expect});
  }
}

TEST(SafetensorsErrors, MissingTensor) {
  TmpDir dir;
  auto p = dir / "x.safetensors";
  write_safetensors(p, {{"w", iota_f32({4})}});
  auto f = SafetensorsFile::open(p);
  EXPECT_FALSE(f->has("v"));
  expect_error([&] { f->get("v"); }, {p.string(), "'v'", "not found"});
}

}  // namespace
}  // namespace ballast::io
