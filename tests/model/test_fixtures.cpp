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

TEST(Fixtures, Present) { EXPECT_GE(fixtures().size(), 4u) << "expected the fixtures of tools/make_fixtures.py"; }

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
