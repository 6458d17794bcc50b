#include "ballast/io/checkpoint.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "support/expect_error.h"
#include "tmpdir.h"

namespace ballast::io {
namespace {

using test::expect_error;
using test::TmpDir;
using test::write_bytes;

Tensor filled(std::vector<int64_t> shape, float v) {
  Tensor t = Tensor::zeros(std::move(shape), DType::F32);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = v + float(i);
  return t;
}

// Two shards and an index: a, b in shard 1; c (and an unlisted extra) in shard 2.
void write_sharded(const TmpDir& dir, const nlohmann::json& weight_map) {
  write_safetensors(dir / "model-00001-of-00002.safetensors", {{"a", filled({2, 2}, 1)}, {"b", filled({3}, 10)}});
  write_safetensors(dir / "model-00002-of-00002.safetensors", {{"c", filled({4}, 100)}, {"extra", filled({1}, 0)}});
  nlohmann::json idx = {{"metadata", {{"total_size", 44}}}, {"weight_map", weight_map}};
  write_bytes(dir / "model.safetensors.index.json", idx.dump(2));
}

nlohmann::json good_map() {
  return {{"a", "model-00001-of-00002.safetensors"},
          {"b", "model-00001-of-00002.safetensors"},
          {"c", "model-00002-of-00002.safetensors"}};
}

TEST(Checkpoint, SingleFile) {
  TmpDir dir;
  write_safetensors(dir / "model.safetensors", {{"x", filled({2, 3}, 0)}, {"y", filled({1}, 5)}});
  auto ck = Checkpoint::open(dir.path());
  EXPECT_TRUE(ck.has("x"));
  EXPECT_FALSE(ck.has("z"));
  EXPECT_EQ(ck.names(), (std::vector<std::string>{"x", "y"}));
  EXPECT_EQ(ck.total_bytes(), 28u);
  EXPECT_FLOAT_EQ(ck.get("x", {2, 3}).f32()[5], 5.0f);
  EXPECT_EQ(ck.files().size(), 1u);
  // A file path works as well as its directory.
  EXPECT_EQ(Checkpoint::open(dir / "model.safetensors").size(), 2u);
}

TEST(Checkpoint, Sharded) {
  TmpDir dir;
  write_sharded(dir, good_map());
  auto ck = Checkpoint::open(dir.path());
  EXPECT_EQ(ck.names(), (std::vector<std::string>{"a", "b", "c"}));  // the index is authoritative
  EXPECT_FALSE(ck.has("extra"));
  EXPECT_EQ(ck.files().size(), 2u);
  EXPECT_FLOAT_EQ(ck.get("a", {2, 2}).f32()[3], 4.0f);
  EXPECT_FLOAT_EQ(ck.get("c").f32()[0], 100.0f);
  EXPECT_EQ(ck.file_of("c").path().filename(), "model-00002-of-00002.safetensors");
  EXPECT_EQ(ck.total_bytes(), 16u + 12u + 16u);
  EXPECT_EQ(ck.mapped_bytes(), 16u + 12u + 16u + 4u);
  uint64_t last = 0, total = 0;
  int calls = 0;
  ck.prefault([&](uint64_t d, uint64_t t) { last = d, total = t, ++calls; });
  EXPECT_EQ(total, ck.mapped_bytes());
  EXPECT_EQ(last, total);
  EXPECT_GE(calls, 1);
}

TEST(CheckpointErrors, MissingTensor) {
  TmpDir dir;
  write_safetensors(dir / "model.safetensors", {{"x", filled({2}, 0)}});
  auto ck = Checkpoint::open(dir.path());
  expect_error([&] { ck.get("model.norm.weight"); }, {"tensor 'model.norm.weight' not found in", dir.path().string()});
}

TEST(CheckpointErrors, WrongShape) {
  TmpDir dir;
  write_safetensors(dir / "model.safetensors", {{"x", filled({2, 3}, 0)}});
  auto ck = Checkpoint::open(dir.path());
  expect_error([&] { ck.get("x", {3, 2}); }, {"model.safetensors", "'x'", "[2, 3]", "expected [3, 2]"});
}

TEST(CheckpointErrors, EmptyDirectory) {
  TmpDir dir;
  expect_error([&] { Checkpoint::open(dir.path()); }, {dir.path().string(), "no model.safetensors"});
  expect_error([&] { Checkpoint::open(dir / "absent"); }, {"absent", "no such checkpoint"});
}

TEST(CheckpointErrors, ShardMissing) {
  TmpDir dir;
  auto m = good_map();
  m["c"] = "model-00003-of-00002.safetensors";
  write_sharded(dir, m);
  expect_error([&] { Checkpoint::open(dir.path()); },
               {"model.safetensors.index.json", "'c'", "model-00003-of-00002.safetensors", "does not exist"});
}

TEST(CheckpointErrors, TensorAbsentFromShard) {
  TmpDir dir;
  auto m = good_map();
  m["c"] = "model-00001-of-00002.safetensors";
  write_sharded(dir, m);
  expect_error([&] { Checkpoint::open(dir.path()); },
               {"model.safetensors.index.json", "'c'", "model-00001-of-00002.safetensors", "does not contain"});
}

TEST(CheckpointErrors, BadIndex) {
  TmpDir dir;
  write_sharded(dir, good_map());
  write_bytes(dir / "model.safetensors.index.json", "{\"weight_map\": {");
  expect_error([&] { Checkpoint::open(dir.path()); }, {"model.safetensors.index.json", "malformed JSON"});
  write_bytes(dir / "model.safetensors.index.json", "{\"metadata\": {}}");
  expect_error([&] { Checkpoint::open(dir.path()); }, {"model.safetensors.index.json", "weight_map"});
  write_bytes(dir / "model.safetensors.index.json", R"({"weight_map": {"a": "../x.safetensors"}})");
  expect_error([&] { Checkpoint::open(dir.path()); }, {"model.safetensors.index.json", "'a'", "plain file name"});
  write_bytes(dir / "model.safetensors.index.json", R"({"weight_map": {"a": 3}})");
  expect_error([&] { Checkpoint::open(dir.path()); }, {"model.safetensors.index.json", "'a'"});
}

TEST(CheckpointErrors, BrokenShard) {
  TmpDir dir;
  write_sharded(dir, good_map());
  std::filesystem::resize_file(dir / "model-00002-of-00002.safetensors", 5);
  expect_error([&] { Checkpoint::open(dir.path()); }, {"model-00002-of-00002.safetensors", "truncated"});
}

}  // namespace
}  // namespace ballast::io
