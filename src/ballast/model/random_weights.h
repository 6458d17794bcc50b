#pragma once
// Random weights made on the backend itself, in the canonical layout bind_weights gives (no
// checkpoint, no disk, no host copy): how benchmarks get models of the published sizes (an 80B
// model's weights in bf16 are 160 GB; generating them on the host and uploading would take
// longer than the benchmark). Matrices are uniform in +-1/sqrt(fan_in) (the embedding +-1),
// zero-centred norm weights 0, DeltaNet parameters small: values with the statistics of a
// trained model's are not needed for speed, only the shapes and dtypes.
#include <cstdint>
#include <string>
#include <vector>

#include "ballast/core/dtype.h"
#include "ballast/kernels/backend.h"
#include "ballast/model/config.h"
#include "ballast/model/random_checkpoint.h"
#include "ballast/model/weights.h"

namespace ballast::model {

// The shapes of the published models, by name: "mid-size" (the CPU benchmark's model),
// "qwen3-next-80b-a3b", "qwen3.5-397b-a17b". `layers` > 0 keeps only the first `layers` layers
// (the layer pattern as published). Throws naming the known presets for any other name.
RandomModelShape preset_shape(const std::string& name, int layers = 0);
std::vector<std::string> preset_names();

// Every tensor the config calls for (no MTP head), allocated on `be` and filled there; matrices
// in `dtype` (BF16, F16, F32, or F8_E4M3_B128: the matrices Qwen's -FP8 releases quantize, the
// others in BF16), small vectors F32. Experts of a layer share one allocation per projection
// (views into [E, I, H] and [E, H, I]).
ModelWeights random_weights(const ModelConfig& cfg, kernels::Backend& be, uint64_t seed, DType dtype = DType::BF16);

}  // namespace ballast::model
