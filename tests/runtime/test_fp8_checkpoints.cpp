// Qwen's fine-grained FP8 checkpoints (issue 15, CPU): the *_fp8 fixtures load with their weights
// kept in FP8 and match transformers' logits of the dequantized model (the parity, EP and MTP
// suites run them like every fixture); fused FP8 experts equal per-expert ones; and every way such
// a checkpoint could be read wrong is refused with an error naming what is wrong.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>

#include "ballast/io/checkpoint.h"
#include "ballast/io/safetensors.h"
#include "ballast/model/fp8_at_load.h"
#include "ballast/model/random_checkpoint.h"
#include "ballast/runtime/engine.h"
#include "fixtures.h"
#include "io/tmpdir.h"
#include "support/expect_error.h"

namespace fs = std::filesystem;
using namespace ballast;
using nlohmann::json;

namespace {

using namespace ballast::test;

// Every tensor of a checkpoint (views into its files, which `ck` keeps mapped).
std::map<std::string, Tensor> tensors_of(const io::Checkpoint& ck) {
  std::map<std::string, Tensor> out;
  for (const auto& n : ck.names()) out[n] = ck.get(n);
  return out;
}

json read_json(const fs::path& p) { return json::parse(std::ifstream(p)); }

// `dir` made from `config` and `tensors` (one model.safetensors).
void write_checkpoint(const fs::path& dir, const json& config, const std::map<std::string, Tensor>& tensors) {
  fs::create_directories(dir);
  std::ofstream(dir / "config.json") << config.dump(2);
  io::write_safetensors(dir / "model.safetensors", tensors);
}

// An F8_E4M3 tensor of `shape` (all codes 0x38 = 1.0) and F32 scales of `scale_shape` (all 1).
Tensor fp8_ones(std::vector<int64_t> shape) {
  Tensor t = Tensor::zeros(std::move(shape), DType::F8_E4M3);
  std::fill_n(t.data<uint8_t>(), t.numel(), uint8_t(0x38));
  return t;
}
Tensor f32_fill(std::vector<int64_t> shape, float v) {
  Tensor t = Tensor::zeros(std::move(shape));
  std::fill_n(t.f32(), t.numel(), v);
  return t;
}

TEST(Fp8Checkpoint, WeightsStayFp8AndLogitsMatchTransformers) {
  for (const char* name : {"qwen3_next_fp8", "qwen3_5_moe_fp8"}) {
    SCOPED_TRACE(name);
    auto engine = load_engine(kFixtures / name, 2);
    const auto& w = engine->model().weights();
    // Experts, projections and the MTP layer are read as FP8 with their scales; lm_head and the
    // router stay as stored (bf16), as modules_to_not_convert has them.
    const auto& moe = w.layers[0].moe;
    EXPECT_EQ(moe.experts[0].gate.dtype(), DType::F8_E4M3_B128);
    EXPECT_EQ(moe.shared->down.dtype(), DType::F8_E4M3_B128);
    EXPECT_EQ(w.layers[0].delta.in_qkv.dtype(), DType::F8_E4M3_B128);
    EXPECT_EQ(w.mtp->layers[0].moe.experts[1].up.dtype(), DType::F8_E4M3_B128);
    EXPECT_EQ(w.lm_head.dtype(), DType::BF16);
    EXPECT_EQ(moe.router.dtype(), DType::BF16);
    EXPECT_EQ(w.mtp->fc.dtype(), DType::BF16);
    auto ref = io::SafetensorsFile::open(kFixtures / name / "reference.safetensors");
    const double err = rel_max_err(engine->prefill_logits(ids(*ref, "prompt_ids")), values<float>(ref->get("logits")));
    std::cout << name << ": max |ours - transformers| / max |transformers| = " << err << "\n";
    EXPECT_LE(err, 1e-3);
    EXPECT_EQ(engine->generate({ids(*ref, "prompt_ids")}, 16).outputs[0], ids(*ref, "continuation"));
  }
}

// A small Qwen3.5 with experts of I = 128 (a fused gate_up splits between blocks), H = 136 (a partial
// block at the right edge): per-expert FP8, fused FP8 and the dequantized weights in F32.
struct Fp8Variants {
  TmpDir tmp;
  fs::path per_expert = tmp / "per_expert", fused = tmp / "fused", dequantized = tmp / "dequantized";
  Fp8Variants() {
    model::RandomModelShape s{.hidden = 136, .layers = 2, .vocab = 96, .heads = 2, .kv_heads = 1, .head_dim = 32,
                              .key_heads = 1, .value_heads = 2, .key_dim = 16, .value_dim = 16, .experts = 4,
                              .top_k = 2, .moe_intermediate = 128, .shared_intermediate = 64,
                              .full_attention_interval = 2, .qwen35 = true};
    const json cfg = model::random_model_config(s);
    model::write_random_checkpoint(cfg, tmp / "bf16", 7);
    const auto ck = io::Checkpoint::open(tmp / "bf16");
    std::map<std::string, Tensor> per = tensors_of(ck), deq = per, fus = per;
    const int64_t I = 128, H = 136, E = 4;
    for (int l = 0; l < 2; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".mlp.experts.";
      Tensor gu = Tensor::zeros({E, 2 * I, H}, DType::F8_E4M3), gus = Tensor::zeros({E, 2, 2});
      Tensor dn = Tensor::zeros({E, H, I}, DType::F8_E4M3), dns = Tensor::zeros({E, 2, 1});
      for (int e = 0; e < E; ++e)
        for (const char* part : {"gate_proj", "up_proj", "down_proj"}) {
          const std::string n = p + std::to_string(e) + "." + part + ".weight";
          const Tensor src = per.at(n);
          const int64_t R = src.dim(0), C = src.dim(1);
          // Quantized as the releases are: per 128 x 128 block, scale = amax / 448, nearest e4m3.
          Tensor q = Tensor::zeros({R, C}, DType::F8_E4M3), sc = Tensor::zeros({scale_blocks(R), scale_blocks(C)});
          Tensor f = Tensor::zeros({R, C});
          std::vector<float> v(size_t(R * C));
          to_f32(src.raw(), src.dtype(), v.data(), v.size());
          for (int64_t br = 0; br < sc.dim(0); ++br)
            for (int64_t bc = 0; bc < sc.dim(1); ++bc) {
              float amax = 0;
              for (int64_t r = br * 128; r < std::min(R, br * 128 + 128); ++r)
                for (int64_t c = bc * 128; c < std::min(C, bc * 128 + 128); ++c)
                  amax = std::max(amax, std::abs(v[size_t(r * C + c)]));
              const float scale = amax / 448.0f;
              sc.f32()[br * sc.dim(1) + bc] = scale;
              for (int64_t r = br * 128; r < std::min(R, br * 128 + 128); ++r)
                for (int64_t c = bc * 128; c < std::min(C, bc * 128 + 128); ++c) {
                  uint8_t best = 0;
                  float berr = INFINITY;
                  for (int code = 0; code < 256; ++code) {
                    const float d = std::abs(fp8e4m3_to_f32(uint8_t(code)) - v[size_t(r * C + c)] / scale);
                    if (d < berr) berr = d, best = uint8_t(code);
                  }
                  q.data<uint8_t>()[r * C + c] = best;
                  f.f32()[r * C + c] = fp8e4m3_to_f32(best) * scale;
                }
            }
          per[n] = q;
          per[n + "_scale_inv"] = sc;
          deq[n] = f;
          fus.erase(n);
          // Fused: gate rows then up rows of expert e; I = 128, so whole scale blocks each.
          const bool down = std::string(part) == "down_proj";
          Tensor& dst = down ? dn : gu;
          Tensor& dsc = down ? dns : gus;
          const int64_t row0 = std::string(part) == "up_proj" ? I : 0;
          std::memcpy(static_cast<char*>(dst[e].raw()) + row0 * C, q.raw(), q.nbytes());
          std::memcpy(static_cast<char*>(dsc[e].raw()) + (row0 / 128) * sc.dim(1) * 4, sc.raw(), sc.nbytes());
        }
      fus[p + "gate_up_proj"] = gu;
      fus[p + "gate_up_proj_scale_inv"] = gus;
      fus[p + "down_proj"] = dn;
      fus[p + "down_proj_scale_inv"] = dns;
    }
    json qcfg = cfg;
    qcfg["quantization_config"] = {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"activation_scheme", "dynamic"},
                                   {"weight_block_size", {128, 128}}, {"modules_to_not_convert", {"lm_head"}}};
    write_checkpoint(per_expert, qcfg, per);
    write_checkpoint(fused, qcfg, fus);
    write_checkpoint(dequantized, cfg, deq);
  }
};

TEST(Fp8Checkpoint, FusedExpertsEqualPerExpertAndTheDequantizedModel) {
  const Fp8Variants v;
  const std::vector<int32_t> prompt{3, 17, 90, 44, 5, 61, 8, 8, 70, 12, 33, 2};
  const auto per = load_engine(v.per_expert, 2)->prefill_logits(prompt);
  auto fused_engine = load_engine(v.fused, 2);
  EXPECT_EQ(fused_engine->model().weights().layers[1].moe.experts[3].up.dtype(), DType::F8_E4M3_B128);
  EXPECT_EQ(fused_engine->prefill_logits(prompt), per) << "fused experts are views of the same blocks";
  // FP8 products equal products with the dequantized weights, up to fp32 summation order.
  EXPECT_LE(rel_max_err(per, load_engine(v.dequantized, 2)->prefill_logits(prompt)), 1e-5);
}

// The ways a checkpoint in the released FP8 layout could be misread, each refused naming its cause.
class Fp8Errors : public ::testing::Test {
 protected:
  Fp8Errors() : src_(io::Checkpoint::open(kFixtures / "qwen3_next_fp8")) {}
  // Engine::load of the fixture with `edit` applied to its tensors and config.json.
  void expect_refused(const std::function<void(std::map<std::string, Tensor>&, json&)>& edit,
                      std::initializer_list<std::string> parts) {
    std::map<std::string, Tensor> t = tensors_of(src_);
    json cfg = read_json(kFixtures / "qwen3_next_fp8" / "config.json");
    edit(t, cfg);
    const fs::path dir = tmp_ / ("case" + std::to_string(n_++));
    write_checkpoint(dir, cfg, t);
    expect_error([&] { load_engine(dir, 1); }, parts);
  }
  io::Checkpoint src_;
  TmpDir tmp_;
  int n_ = 0;
};

const std::string kGate = "model.layers.0.mlp.experts.0.gate_proj.weight";

TEST_F(Fp8Errors, Fp8WeightsWithoutQuantizationConfig) {
  expect_refused([](auto&, json& c) { c.erase("quantization_config"); },
                 {"model.safetensors", "is F8_E4M3", "no quantization_config"});
}

TEST_F(Fp8Errors, MissingScales) {
  expect_refused([](auto& t, json&) { t.erase(kGate + "_scale_inv"); },
                 {"model.safetensors", kGate, "has no block scales", kGate + "_scale_inv"});
}

TEST_F(Fp8Errors, ScalesOfTheWrongShapeOrDtype) {
  // The gate is [96, 144]: 1 x 2 blocks, the second partial.
  expect_refused([](auto& t, json&) { t[kGate + "_scale_inv"] = f32_fill({1, 1}, 1.0f); },
                 {kGate + "_scale_inv", "shape [1, 1]", "expected [1, 2]"});
  expect_refused([](auto& t, json&) { t[kGate + "_scale_inv"] = Tensor::zeros({1, 2}, DType::BF16); },
                 {kGate + "_scale_inv", "BF16", "expected F32"});
}

TEST_F(Fp8Errors, Fp8InAModuleTheConfigKeepsUnquantized) {
  expect_refused(
      [](auto&, json& c) {
        c["quantization_config"]["modules_to_not_convert"].push_back("model.layers.0.mlp.experts.0.gate_proj");
      },
      {kGate, "modules_to_not_convert", "model.layers.0.mlp.experts.0.gate_proj"});
}

TEST_F(Fp8Errors, ScalesBesideAWeightThatIsNotFp8) {
  expect_refused([](auto& t, json&) { t["lm_head.weight_scale_inv"] = f32_fill({3, 2}, 1.0f); },
                 {"lm_head.weight_scale_inv", "'lm_head.weight' is BF16"});
}

TEST_F(Fp8Errors, Fp8WhereOnlyLinearWeightsMayBe) {
  expect_refused([](auto& t, json&) { t["model.norm.weight"] = fp8_ones({144}); },
                 {"model.norm.weight", "F8_E4M3", "only linear weights"});
  expect_refused([](auto& t, json&) { t["model.embed_tokens.weight"] = fp8_ones({320, 144}); },
                 {"model.embed_tokens.weight", "only linear weights"});
}

TEST_F(Fp8Errors, UnsupportedQuantizationConfigs) {
  expect_refused([](auto&, json& c) { c["quantization_config"]["quant_method"] = "gptq"; },
                 {"config.json", "quantization_config.quant_method", "gptq"});
  expect_refused([](auto&, json& c) { c["quantization_config"]["activation_scheme"] = "static"; },
                 {"config.json", "quantization_config.activation_scheme", "static"});
  // json::array: assigning a braced list over the parsed array leaks it under clang 14 (LeakSanitizer).
  expect_refused([](auto&, json& c) { c["quantization_config"]["weight_block_size"] = json::array({64, 64}); },
                 {"config.json", "quantization_config.weight_block_size"});
  expect_refused([](auto&, json& c) { c["quantization_config"]["fmt"] = "e5m2"; },
                 {"config.json", "quantization_config.fmt", "e5m2"});
}

TEST_F(Fp8Errors, FusedExpertsThatABlockStraddles) {
  // moe_intermediate_size 96: fused gate_up rows [0, 192) in blocks [0, 128), [128, 192): the first
  // holds gate and up rows alike, so no gate view can carry its scales.
  expect_refused(
      [](auto& t, json&) {
        const std::string p = "model.layers.0.mlp.experts.";
        for (int e = 0; e < 6; ++e)
          for (const char* part : {"gate_proj", "up_proj", "down_proj"}) {
            t.erase(p + std::to_string(e) + "." + part + ".weight");
            t.erase(p + std::to_string(e) + "." + part + ".weight_scale_inv");
          }
        t[p + "gate_up_proj"] = fp8_ones({6, 192, 144});
        t[p + "gate_up_proj_scale_inv"] = f32_fill({6, 2, 2}, 1.0f);
        t[p + "down_proj"] = fp8_ones({6, 144, 96});
        t[p + "down_proj_scale_inv"] = f32_fill({6, 2, 1}, 1.0f);
      },
      {"model.layers.0.mlp.experts.gate_up_proj", "moe_intermediate_size 96", "cannot be split"});
}

// Qwen3-Next's packed in_proj_qkvz is unpacked by head groups; in FP8 those must be whole blocks
// (qwen3_next_a has dk = 8, so its groups cut through every block).
TEST(Fp8ErrorsPacked, UnpackingThatSplitsBlocks) {
  TmpDir tmp;
  const auto ck = io::Checkpoint::open(kFixtures / "qwen3_next_a");
  std::map<std::string, Tensor> t = tensors_of(ck);
  const std::string n = "model.layers.0.linear_attn.in_proj_qkvz.weight";
  const Tensor w = t.at(n);
  t[n] = fp8_ones(w.shape());
  t[n + "_scale_inv"] = f32_fill({scale_blocks(w.dim(0)), scale_blocks(w.dim(1))}, 0.01f);
  json cfg = read_json(kFixtures / "qwen3_next_a" / "config.json");
  cfg["quantization_config"] = {{"quant_method", "fp8"}, {"weight_block_size", {128, 128}}};
  write_checkpoint(tmp / "m", cfg, t);
  expect_error([&] { load_engine(tmp / "m", 1); }, {n, "splits its 128-row FP8 scale blocks"});
}


// --quantization fp8: a block of 128 x 128 (partial at the edges) scaled by its amax / 448, every
// value the nearest e4m3 of w / s: within half an e4m3 step of w (3 mantissa bits: 2^-4 of |w|,
// or half the subnormal step 2^-10 s near zero); an all-zero block scaled by 1.
TEST(Fp8AtLoad, BlocksScaledByAmaxAndValuesWithinHalfAStep) {
  const int64_t N = 200, K = 300;  // partial blocks at both edges
  Tensor w = Tensor::zeros({N, K}, DType::BF16);
  std::vector<float> v(size_t(N * K));
  uint64_t state = 12345;
  for (int64_t i = 0; i < N * K; ++i) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    const float u = float(int64_t(state >> 40) % 2001 - 1000) / 1000.0f;  // [-1, 1]
    const int64_t r = i / K, c = i % K;
    const float scale = r >= 128 && c >= 256 ? 0.0f : (r < 128 ? 0.02f : 3.0f);  // one all-zero block
    w.data<uint16_t>()[i] = f32_to_bf16(u * scale);
    v[size_t(i)] = bf16_to_f32(w.data<uint16_t>()[i]);
  }
  const Tensor q = model::quantize_fp8_blocks(w);
  ASSERT_EQ(q.dtype(), DType::F8_E4M3_B128);
  ASSERT_EQ(q.scales().shape(), (std::vector<int64_t>{2, 3}));
  const float* s = static_cast<const float*>(q.scales().raw());
  for (int64_t br = 0; br < 2; ++br)
    for (int64_t bc = 0; bc < 3; ++bc) {
      float amax = 0;
      for (int64_t r = br * 128; r < std::min(N, br * 128 + 128); ++r)
        for (int64_t c = bc * 128; c < std::min(K, bc * 128 + 128); ++c) amax = std::max(amax, std::abs(v[size_t(r * K + c)]));
      EXPECT_EQ(s[br * 3 + bc], amax > 0 ? amax / 448.0f : 1.0f) << br << "," << bc;
    }
  EXPECT_EQ(s[1 * 3 + 2], 1.0f);
  const uint8_t* e = static_cast<const uint8_t*>(q.elements().raw());
  for (int64_t r = 0; r < N; ++r)
    for (int64_t c = 0; c < K; ++c) {
      const float sc = s[(r / 128) * 3 + c / 128], x = v[size_t(r * K + c)];
      const float back = fp8e4m3_to_f32(e[r * K + c]) * sc;
      ASSERT_LE(std::abs(back - x), std::abs(x) * 0.0625f + sc * 0.001f) << r << "," << c;
    }
  expect_error([] { model::quantize_fp8_blocks(Tensor::zeros({2, 2}, DType::F8_E4M3)); },
               {"quantize to FP8", "must be a host matrix of BF16, F16 or F32"});
  for (float x : {INFINITY, NAN}) {
    Tensor bad = Tensor::zeros({2, 130});
    bad.f32()[129] = x;
    expect_error([&] { model::quantize_fp8_blocks(bad); }, {"quantize to FP8", "not finite", "block (0, 1)"});
  }
}

// A bf16 checkpoint loaded with quantize_fp8: the linear weights the releases quantize are FP8,
// the others as stored; logits near the bf16 model's (the weights move by up to 2^-4 each) and
// equal to those of the same weights quantized first and loaded as a released FP8 checkpoint.
TEST(Fp8AtLoad, ModelWeightsAsTheReleasesQuantizeThem) {
  // A small Qwen3-Next in bf16 whose packed in_proj_qkvz unpacks in whole 128-row blocks (dk = r dv
  // = 128, as the 80B's), so that a release can quantize it packed; H = 136: partial blocks.
  TmpDir tmp;
  const fs::path bf16 = tmp / "bf16";
  const model::RandomModelShape shape{.hidden = 136, .layers = 2, .vocab = 96, .heads = 2, .kv_heads = 1,
                                      .head_dim = 32, .key_heads = 1, .value_heads = 1, .key_dim = 128,
                                      .value_dim = 128, .experts = 4, .top_k = 2, .moe_intermediate = 128,
                                      .shared_intermediate = 64, .full_attention_interval = 2};
  model::write_random_checkpoint(model::random_model_config(shape), bf16, 7);
  runtime::EngineOptions opts;
  opts.quantize_fp8 = true;
  auto engine = load_engine(bf16, 2, opts);
  const auto& w = engine->model().weights();
  const auto& l0 = w.layers[0];
  for (const Tensor* t : {&l0.moe.experts[0].gate, &l0.moe.experts[3].down, &l0.moe.shared->up, &l0.delta.in_qkv,
                          &l0.delta.in_z, &l0.delta.out_proj, &w.layers[1].attn.q_proj, &w.layers[1].attn.o_proj})
    EXPECT_EQ(t->dtype(), DType::F8_E4M3_B128);
  for (const Tensor* t : {&w.embed, &w.lm_head, &l0.moe.router, &l0.moe.shared_gate, &l0.delta.in_b, &l0.delta.in_a})
    EXPECT_EQ(t->dtype(), DType::BF16);
  if (w.mtp) {
    EXPECT_EQ(w.mtp->fc.dtype(), DType::BF16);
    EXPECT_EQ(w.mtp->layers[0].moe.experts[1].up.dtype(), DType::F8_E4M3_B128);
  }
  const std::vector<int32_t> prompt{3, 17, 90, 44, 5, 61, 8, 8, 70, 12, 33, 2};
  const std::vector<float> got = engine->prefill_logits(prompt);
  const double err = rel_max_err(got, load_engine(bf16, 2)->prefill_logits(prompt));
  std::cout << "FP8 at load vs bf16: max |diff| / max |bf16| = " << err << "\n";
  EXPECT_GT(err, 0.0);
  EXPECT_LE(err, 0.1);
  // The same quantization done ahead, written as a release: what the engine quantized at load.
  auto ck = io::Checkpoint::open(bf16);
  std::map<std::string, Tensor> t = tensors_of(ck);
  std::vector<std::string> names;
  for (const auto& [n, x] : t) {
    const bool linear = n.ends_with(".weight") && n.find("proj") != std::string::npos &&
                        !n.ends_with("in_proj_b.weight") && !n.ends_with("in_proj_a.weight") &&
                        !n.ends_with("in_proj_ba.weight");
    if (linear && x.rank() == 2) names.push_back(n);
  }
  ASSERT_GT(names.size(), 10u);
  for (const auto& n : names) {
    const Tensor q = model::quantize_fp8_blocks(t.at(n));
    t[n] = q.elements();
    t[n + "_scale_inv"] = q.scales();
  }
  json cfg = read_json(bf16 / "config.json");
  cfg["quantization_config"] = {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"activation_scheme", "dynamic"},
                                {"weight_block_size", {128, 128}}};
  write_checkpoint(tmp / "q", cfg, t);
  EXPECT_EQ(load_engine(tmp / "q", 2)->prefill_logits(prompt), got);
  EXPECT_EQ(load_engine(tmp / "q", 2, opts)->prefill_logits(prompt), got);  // FP8 already: left as it is
}

}  // namespace
