// Synthetic models (random weights made on the backend, Engine::create): the presets have the
// published sizes, the weights are what bind_weights would give for a checkpoint holding them, and
// an engine over them computes what an engine loading that checkpoint computes.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>

#include "ballast/io/safetensors.h"
#include "ballast/model/param_count.h"
#include "ballast/model/random_weights.h"
#include "fixtures.h"
#include "support/expect_error.h"

namespace ballast {
namespace {

using model::LayerType;

TEST(SyntheticModel, PresetsHaveThePublishedSizes) {
  const auto params = [](const std::string& name) {
    const auto cfg = model::parse_model_config(model::random_model_config(model::preset_shape(name)), name);
    return model::count_parameters(cfg);
  };
  const auto next = params("qwen3-next-80b-a3b"), q35 = params("qwen3.5-397b-a17b");
  // Total parameters as the names give them; active per token (embedding row and lm_head
  // included) about the names' "A3B" and "A17B".
  EXPECT_NEAR(double(next.total()), 80e9, 1e9) << "80B-A3B";
  EXPECT_NEAR(double(next.active_per_token()), 3.5e9, 0.5e9);
  EXPECT_NEAR(double(q35.total()), 397e9, 2e9) << "397B-A17B";
  EXPECT_NEAR(double(q35.active_per_token()), 17e9, 0.5e9);
  const auto cut = model::preset_shape("qwen3-next-80b-a3b", 8);
  EXPECT_EQ(cut.layers, 8);
  test::expect_error([] { model::preset_shape("qwen3-next-80b-a3b", 49); }, {"--layers 49", "48 layers"});
  test::expect_error([] { model::preset_shape("llama"); }, {"unknown synthetic model \"llama\"", "qwen3.5-397b-a17b"});
}

// The canonical tensors of random weights written under Qwen3.5's (unpacked) checkpoint names.
std::map<std::string, Tensor> as_checkpoint(const model::ModelConfig& c, const model::ModelWeights& w) {
  std::map<std::string, Tensor> t;
  t["model.embed_tokens.weight"] = w.embed;
  t["model.norm.weight"] = w.final_norm;
  t["lm_head.weight"] = w.lm_head;
  for (int i = 0; i < c.num_layers; ++i) {
    const auto& l = w.layers[size_t(i)];
    const std::string p = fmt::format("model.layers.{}.", i);
    t[p + "input_layernorm.weight"] = l.input_norm;
    t[p + "post_attention_layernorm.weight"] = l.post_norm;
    if (l.type == LayerType::FullAttention) {
      const std::string a = p + "self_attn.";
      t[a + "q_proj.weight"] = l.attn.q_proj, t[a + "k_proj.weight"] = l.attn.k_proj;
      t[a + "v_proj.weight"] = l.attn.v_proj, t[a + "o_proj.weight"] = l.attn.o_proj;
      t[a + "q_norm.weight"] = l.attn.q_norm, t[a + "k_norm.weight"] = l.attn.k_norm;
    } else {
      const std::string a = p + "linear_attn.";
      t[a + "in_proj_qkv.weight"] = l.delta.in_qkv, t[a + "in_proj_z.weight"] = l.delta.in_z;
      t[a + "in_proj_b.weight"] = l.delta.in_b, t[a + "in_proj_a.weight"] = l.delta.in_a;
      t[a + "conv1d.weight"] = l.delta.conv.reshape({l.delta.conv.dim(0), 1, l.delta.conv.dim(1)});
      t[a + "A_log"] = l.delta.A_log, t[a + "dt_bias"] = l.delta.dt_bias, t[a + "norm.weight"] = l.delta.norm;
      t[a + "out_proj.weight"] = l.delta.out_proj;
    }
    const std::string m = p + "mlp.";
    auto swiglu = [&](const std::string& q, const kernels::SwigluWeights& s) {
      t[q + "gate_proj.weight"] = s.gate, t[q + "up_proj.weight"] = s.up, t[q + "down_proj.weight"] = s.down;
    };
    t[m + "gate.weight"] = l.moe.router;
    for (size_t e = 0; e < l.moe.experts.size(); ++e) swiglu(fmt::format("{}experts.{}.", m, e), l.moe.experts[e]);
    swiglu(m + "shared_expert.", *l.moe.shared);
    t[m + "shared_expert_gate.weight"] = l.moe.shared_gate;
  }
  // Views into shared allocations are written as tensors of their own; block-scaled FP8 as its
  // e4m3 elements beside `<name>_scale_inv`, as Qwen's -FP8 releases store it.
  std::map<std::string, Tensor> out;
  auto own = [](const Tensor& x) {
    Tensor o = Tensor::zeros(x.shape(), x.dtype());
    std::memcpy(o.raw(), x.raw(), x.nbytes());
    return o;
  };
  for (auto& [name, x] : t) {
    if (x.dtype() != DType::F8_E4M3_B128) {
      out[name] = own(x);
      continue;
    }
    out[name] = own(x.elements());
    out[name + "_scale_inv"] = own(x.scales());
  }
  return out;
}

// bf16, and Qwen's block-scaled FP8 (experts and hidden size multiples of 128; the matrices its
// releases keep unquantized in bf16 and named in modules_to_not_convert).
class SyntheticModelDtype : public ::testing::TestWithParam<DType> {};

// Qwen's FP8 releases' quantization_config (block-scaled e4m3; the router, the shared expert's gate,
// DeltaNet's a / b projections and lm_head kept in bf16).
nlohmann::json qwen_fp8_quantization() {
  return {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"activation_scheme", "dynamic"}, {"weight_block_size", {128, 128}},
          {"modules_to_not_convert",
           {"lm_head", "mlp.gate", "mlp.shared_expert_gate", "linear_attn.in_proj_a", "linear_attn.in_proj_b"}}};
}
INSTANTIATE_TEST_SUITE_P(Dtypes, SyntheticModelDtype, ::testing::Values(DType::BF16, DType::F8_E4M3_B128),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

TEST_P(SyntheticModelDtype, AnEngineOverRandomWeightsEqualsOneLoadingThemFromACheckpoint) {
  const DType dt = GetParam();
  const bool fp8 = dt == DType::F8_E4M3_B128;
  model::RandomModelShape s;
  s.hidden = fp8 ? 128 : 64, s.layers = 4, s.vocab = 300, s.heads = 4, s.kv_heads = 2, s.head_dim = 16;
  s.key_heads = 2, s.value_heads = 4, s.key_dim = 16, s.value_dim = 16;
  s.experts = 8, s.top_k = 2, s.moe_intermediate = fp8 ? 128 : 32, s.shared_intermediate = 48, s.qwen35 = true;
  nlohmann::json config = model::random_model_config(s);
  if (fp8) config["quantization_config"] = qwen_fp8_quantization();
  const model::ModelConfig cfg = model::parse_model_config(config, "test");

  // The same weights, made on the CPU backend and written as a checkpoint...
  kernels::CpuBackend cpu(1);
  const model::ModelWeights host = model::random_weights(cfg, cpu, 99, dt);
  EXPECT_EQ(host.layers[0].moe.experts[3].down.dtype(), dt);
  EXPECT_EQ(host.layers[0].moe.router.dtype(), DType::BF16);
  const auto dir =
      std::filesystem::temp_directory_path() / fmt::format("ballast-synthetic-{}-{}", ::getpid(), dtype_name(dt));
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "config.json") << config.dump();
  io::write_safetensors(dir / "model.safetensors", as_checkpoint(cfg, host));

  // ... bind to the same shapes and dtypes,
  auto loaded = test::load_engine(dir, 2);
  std::vector<std::pair<std::vector<int64_t>, DType>> a, b;
  model::ModelWeights lw = loaded->model().weights(), rw = host;
  model::for_each_tensor(lw, [&](Tensor& t) { a.emplace_back(t.shape(), t.dtype()); });
  model::for_each_tensor(rw, [&](Tensor& t) { b.emplace_back(t.shape(), t.dtype()); });
  EXPECT_EQ(a, b);

  // ... and an engine made over them on the test backend gives the loaded engine's logits and
  // greedy tokens exactly.
  auto backend = test::test_backend(2);
  model::ModelWeights dev = model::random_weights(cfg, *backend, 99, dt);
  auto made = runtime::Engine::create(cfg, std::move(dev), std::move(backend));
  const std::vector<int32_t> prompt{5, 17, 250, 3, 99, 42, 7};
  EXPECT_EQ(made->prefill_logits(prompt), loaded->prefill_logits(prompt));
  const std::vector<std::vector<int32_t>> prompts{prompt, {1, 2, 3}};
  EXPECT_EQ(made->generate(prompts, 6).outputs, loaded->generate(prompts, 6).outputs);
  std::filesystem::remove_all(dir);
}

// Decode steps of one token against one prefill of the same tokens, at shapes where a CUDA backend
// takes its one-pass routed experts at decode with the shared expert inside (routed and shared
// experts of one width, rows of whole vector steps) and its grouped ops and side stream at prefill:
// the two ways of a MoE layer give the same logits within fp32 rounding (on the CPU both are the
// grouped ops). Where the backend is CUDA, the steps are checked to take that one pass.
TEST_P(SyntheticModelDtype, DecodeStepsEqualOnePrefillWhereTheSharedExpertJoinsTheRoutedPass) {
  const DType dt = GetParam();
  const bool fp8 = dt == DType::F8_E4M3_B128;
  model::RandomModelShape s;
  s.hidden = fp8 ? 512 : 256, s.layers = 4, s.vocab = 300, s.heads = 4, s.kv_heads = 2, s.head_dim = 32;
  s.key_heads = 2, s.value_heads = 4, s.key_dim = 32, s.value_dim = 32;
  s.experts = 8, s.top_k = 2, s.moe_intermediate = fp8 ? 128 : 64, s.shared_intermediate = s.moe_intermediate;
  nlohmann::json config = model::random_model_config(s);
  if (fp8) config["quantization_config"] = qwen_fp8_quantization();
  const model::ModelConfig cfg = model::parse_model_config(config, "test");
  auto backend = test::test_backend(2);
  model::ModelWeights w = model::random_weights(cfg, *backend, 7, dt);
  auto engine = runtime::Engine::create(cfg, std::move(w), std::move(backend));
  const std::vector<int32_t> prompt{5, 17, 250, 3, 99, 42, 7, 128, 64, 11, 200, 1};
  const std::vector<float> full = engine->prefill_logits(prompt);

  auto& cache = engine->cache();
  auto& runner = engine->runner();
  using Entry = runtime::ModelRunner::Entry;
  runtime::CacheEntry st;
  ASSERT_TRUE(cache.allocate(st));
  const size_t split = 4;
  ASSERT_TRUE(cache.append(st, {.rows = int64_t(split)}));
  const Entry c{&st, std::span<const int32_t>(prompt).first(split), runtime::ModelRunner::Logits::all};
  std::vector<float> got = test::download<float>(engine->backend(), runner.forward(std::span<const Entry>(&c, 1)).logits);
  bool one_pass = false;
  for (size_t t = split; t < prompt.size(); ++t) {
    ASSERT_TRUE(cache.append(st, {.rows = 1}));
    const Entry d{&st, std::span<const int32_t>(prompt).subspan(t, 1), runtime::ModelRunner::Logits::all};
    engine->backend().start_op_timing();
    const Tensor logits = runner.forward(std::span<const Entry>(&d, 1)).logits;
    for (const kernels::OpTime& op : engine->backend().stop_op_timing())
      one_pass = one_pass || op.op.rfind("moe_routed with the shared expert", 0) == 0;
    const std::vector<float> row = test::download<float>(engine->backend(), logits);
    got.insert(got.end(), row.begin(), row.end());
  }
  cache.release(st);
  if (engine->backend().device() == Device::CUDA) {
    EXPECT_TRUE(one_pass) << "the decode steps took the one pass";
  }
  EXPECT_LE(test::rel_max_err(got, full), 1e-4);
}

}  // namespace
}  // namespace ballast
