#pragma once
// The model's weights bound by name from a checkpoint, in one canonical layout whatever the
// checkpoint's: DeltaNet projections unpacked ([Q | K | V], Z, B, A), experts as per-expert
// views (into fused tensors where the checkpoint fuses them), small vectors widened to F32.
#include <functional>
#include <optional>
#include <vector>

#include "ballast/core/tensor.h"
#include "ballast/model/config.h"
#include "ballast/kernels/ops.h"

namespace ballast::io {
class Checkpoint;
}

namespace ballast::model {

struct AttentionWeights {
  Tensor q_proj;  // [Hq * 2 * hd, H], per head [q | gate]
  Tensor k_proj, v_proj;  // [Hkv * hd, H]
  Tensor o_proj;  // [H, Hq * hd]
  Tensor q_norm, k_norm;  // [hd] F32
};

struct DeltaNetWeights {
  Tensor in_qkv;  // [2 * Hk * dk + Hv * dv, H]: all Q heads, all K heads, all V heads
  Tensor in_z;    // [Hv * dv, H]
  Tensor in_b, in_a;  // [Hv, H]
  Tensor conv;    // [conv_dim, kc] F32
  Tensor A_log, dt_bias;  // [Hv] F32
  Tensor norm;    // [dv] F32
  Tensor out_proj;  // [H, Hv * dv]
};

struct MoeWeights {
  Tensor router;  // [E, H]
  std::vector<kernels::SwigluWeights> experts;  // [E]
  std::optional<kernels::SwigluWeights> shared;
  Tensor shared_gate;  // [1, H] (undefined without a shared expert)
};

struct LayerWeights {
  LayerType type = LayerType::LinearAttention;
  FfnType ffn = FfnType::Moe;
  Tensor input_norm, post_norm;  // [H] F32
  AttentionWeights attn;
  DeltaNetWeights delta;
  MoeWeights moe;
  kernels::SwigluWeights dense;  // dense SwiGLU MLP
};

struct MtpWeights {
  Tensor fc;  // [H, 2H]
  Tensor norm_embedding, norm_hidden, norm;  // [H] F32
  std::vector<LayerWeights> layers;  // full-attention decoder layers
};

struct ModelWeights {
  Tensor embed;       // [V, H]
  Tensor final_norm;  // [H] F32
  Tensor lm_head;     // [V, H] (the embedding when tied)
  std::vector<LayerWeights> layers;
  std::optional<MtpWeights> mtp;  // present when the checkpoint has mtp.* tensors
};

// Binds every tensor the config calls for, checking each shape. Errors name the tensor and the
// checkpoint directory.
ModelWeights bind_weights(const ModelConfig& cfg, const io::Checkpoint& ckpt);

// Calls fn on every tensor of the weights (to move them to a device: Backend::to_device).
void for_each_tensor(ModelWeights& w, const std::function<void(Tensor&)>& fn);

// Lets go of every routed expert (trunk and MTP head): under expert parallelism the ranks' expert
// slots hold them, and a second copy in the model would cost the experts' memory twice.
void drop_routed_experts(ModelWeights& w);

}  // namespace ballast::model
