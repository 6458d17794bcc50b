#pragma once
// Qwen's fine-grained FP8 made at load from a checkpoint of 16- or 32-bit weights (as vLLM's and
// SGLang's `--quantization fp8` quantize a bf16 checkpoint online): the linear weights that Qwen's
// -FP8 releases store in e4m3 become e4m3 values with one F32 scale per 128 x 128 block (amax /
// 448, the releases' weight_scale_inv), read by the same kernels as a released FP8 checkpoint.
// The releases keep the embedding, the head, the routers, the shared-expert gate, DeltaNet's a/b
// projections, the MTP head's fc and every norm in bf16: so does this.
#include <cstdint>

#include "ballast/core/tensor.h"
#include "ballast/model/weights.h"

namespace ballast::model {

// w [N, K] of BF16, F16 or F32 in host memory -> F8_E4M3_B128: each 128 x 128 block (partial at
// the edges) scaled by amax / 448 (1 for an all-zero block), each value rounded to the nearest e4m3.
Tensor quantize_fp8_blocks(const Tensor& w);

struct Fp8AtLoad {
  int64_t tensors = 0;       // weights quantized
  int64_t bytes_before = 0;  // their bytes as stored
  int64_t bytes_after = 0;   // e4m3 values and scales
};
// Quantizes those linear weights of `w` (host tensors) that are not FP8 already.
Fp8AtLoad quantize_linear_fp8(ModelWeights& w);

}  // namespace ballast::model
