// The tiny transformers checkpoints under tests/fixtures: every config parses to what
// transformers derived (reference.json "derived"), every checkpoint opens and holds exactly the
// parameters the config implies.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "ballast/io/checkpoint.h"
#include "ballast/model/config.h"
#include "ballast/model/param_count.h"

namespace ballast::model {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

std::vector<fs::path> fixtures() {
  std::vector<fs::path> out;
  fs::path root = BALLAST_FIXTURES_DIR;
  if (!fs::is_directory(root)) return out;
  for (const auto& e : fs::directory_iterator(root))
    if (fs::exists(e.path() / "config.json")) out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}

TEST(Fixtures, Present) {
  EXPECT_GE(fixtures().size(), 6u) << "expected the fixtures of tools/make_fixtures.py and tools/make_fp8_fixtures.py";
}

// The FP8 fixtures are in Qwen's released layout: quantization_config as the releases write it,
// e4m3 weights with F32 scales of ceil-div shape, partial blocks at the edges.
TEST(Fixtures, Fp8FixturesAreInTheReleasedLayout) {
  for (const char* name : {"qwen3_next_fp8", "qwen3_5_moe_fp8"}) {
    SCOPED_TRACE(name);
    const fs::path dir = fs::path(BALLAST_FIXTURES_DIR) / name;
    const auto c = load_model_config(dir);
    ASSERT_TRUE(c.quant.fp8);
    EXPECT_FALSE(c.quant.converts("lm_head"));
    const auto ck = io::Checkpoint::open(dir);
    int fp8 = 0, partial_rows = 0, partial_cols = 0;
    for (const auto& n : ck.names()) {
      const auto& t = ck.info(n);
      if (t.dtype != DType::F8_E4M3) continue;
      ++fp8;
      ASSERT_EQ(t.shape.size(), 2u) << n;
      const auto& s = ck.info(n + "_scale_inv");
      EXPECT_EQ(s.dtype, DType::F32) << n;
      EXPECT_EQ(s.shape, (std::vector<int64_t>{scale_blocks(t.shape[0]), scale_blocks(t.shape[1])})) << n;
      partial_rows += t.shape[0] % 128 != 0;
      partial_cols += t.shape[1] % 128 != 0;
    }
    EXPECT_GT(fp8, 50);
    EXPECT_GT(partial_rows, 0);
    EXPECT_GT(partial_cols, 0);
  }
}

TEST(Fixtures, ConfigMatchesTransformers) {
  for (const auto& dir : fixtures()) {
    SCOPED_TRACE(dir.string());
    auto c = load_model_config(dir);
    if (!fs::exists(dir / "reference.json")) continue;
    json ref = json::parse(std::ifstream(dir / "reference.json"));
    const json& d = ref["derived"];
    ASSERT_EQ(int(d["layer_types"].size()), c.num_layers);
    for (int i = 0; i < c.num_layers; ++i) {
      EXPECT_EQ(d["layer_types"][i] == "full_attention", c.layer_types[i] == LayerType::FullAttention) << i;
      EXPECT_EQ(d["mlp_kinds"][i] == "moe", c.ffn_types[i] == FfnType::Moe) << i;
    }
    EXPECT_EQ(c.rotary_dim(), d["rotary_dim"].get<int>());
    EXPECT_DOUBLE_EQ(c.rope_theta, d["rope_parameters"]["rope_theta"].get<double>());
    EXPECT_EQ(c.tie_word_embeddings, ref["weights"]["tied_embeddings"].get<bool>());
    EXPECT_EQ(c.family == Family::Qwen3Next, ref["family"] == "qwen3_next");
  }
}

TEST(Fixtures, CheckpointMatchesConfig) {
  for (const auto& dir : fixtures()) {
    SCOPED_TRACE(dir.string());
    auto c = load_model_config(dir);
    auto ck = io::Checkpoint::open(dir);
    int64_t trunk = 0;
    for (const auto& name : ck.names()) {
      if (name.rfind("mtp.", 0) == 0 || name.find("visual.") != std::string::npos) continue;
      // FP8 block scales (weight_scale_inv) are no parameters; each sits beside an F8_E4M3 weight.
      if (name.size() > 10 && name.compare(name.size() - 10, 10, "_scale_inv") == 0) {
        EXPECT_EQ(ck.info(name.substr(0, name.size() - 10)).dtype, DType::F8_E4M3) << name;
        continue;
      }
      int64_t n = 1;
      for (auto s : ck.info(name).shape) n *= s;
      trunk += n;
    }
    EXPECT_EQ(trunk, count_parameters(c).total());
    const std::string prefix = ck.has("model.language_model.embed_tokens.weight") ? "model.language_model." : "model.";
    ck.get(prefix + "embed_tokens.weight", {c.vocab_size, c.hidden_size});
    EXPECT_EQ(ck.has("lm_head.weight"), !c.tie_word_embeddings);
    ck.prefault();

    if (!fs::exists(dir / "reference.safetensors")) continue;
    auto ref = io::Checkpoint::open(dir / "reference.safetensors");
    auto ids = ref.get("prompt_ids");
    EXPECT_EQ(ids.dtype(), DType::I32);
    ASSERT_EQ(ids.rank(), 1);
    auto logits = ref.get("logits", {ids.dim(0), c.vocab_size});
    EXPECT_EQ(logits.dtype(), DType::F32);
    for (int64_t i = 0; i < ids.dim(0); ++i) EXPECT_LT(ids.data<int32_t>()[i], c.vocab_size);
  }
}

}  // namespace
}  // namespace ballast::model
