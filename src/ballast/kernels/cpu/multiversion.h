#pragma once
// BALLAST_MV: a hot function is compiled twice on x86-64 (AVX2+FMA and the baseline) and picked at
// load time, so the binary stays portable without -march=native.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define BALLAST_MV __attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
#endif
#ifndef BALLAST_MV
#define BALLAST_MV
#endif
