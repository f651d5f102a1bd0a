// Run-time choice of the kernel table, and the ISA-neutral helpers the kernels share.
#include "dispatch.h"

#include <emmintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace sslc {
namespace {

bool HasAvx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
}

bool HasAvx512() {
  return HasAvx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

bool HasAvx512Vnni() {
  return __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vbmi2") &&
         __builtin_cpu_supports("avx512vnni");
}

// 16-lane fp32 GEMV on Intel cores (zmm at full width); AMD's Zen 4 runs zmm as two halves, where
// the 8-lane walk was faster. $SSLC_WIDE_GEMV=0|1 overrides the choice.
bool PrefersWideGemv() {
  const char* forced = std::getenv("SSLC_WIDE_GEMV");
  if (forced != nullptr && *forced != '\0') return std::string(forced) != "0";
  return __builtin_cpu_is("intel");
}

const KernelTable& Avx512Table() {
  if (HasAvx512Vnni()) return PrefersWideGemv() ? kAvx512WideKernels : kAvx512Kernels;
  return PrefersWideGemv() ? kAvx512NoVnniWideKernels : kAvx512NoVnniKernels;
}

}  // namespace

const KernelTable& Select() {
  const char* forced = std::getenv("SSLC_KERNEL_ISA");
  if (forced == nullptr || *forced == '\0') {
    if (HasAvx512()) return Avx512Table();
    if (HasAvx2()) return kAvx2Kernels;
    throw std::runtime_error("this CPU lacks AVX2+FMA, which the ai.sslc kernels require (SSLC_KERNEL_ISA=scalar forces the slow portable path)");
  }
  const std::string isa(forced);
  if (isa == "scalar") return kScalarKernels;
  if (isa == "avx2" || isa == "avx512") {
    if (isa == "avx2" ? HasAvx2() : HasAvx512()) return isa == "avx2" ? kAvx2Kernels : Avx512Table();
    throw std::runtime_error("SSLC_KERNEL_ISA=" + isa + " but this CPU does not support it");
  }
  throw std::runtime_error("SSLC_KERNEL_ISA must be scalar, avx2 or avx512, got '" + isa + "'");
}

void PackInput(const float* in, size_t ld_in, size_t count, size_t cols, size_t mr, float* packed, size_t packed_cols,
               size_t col0) {
  for (size_t m0 = 0; m0 < count; m0 += mr) {  // sequential writes; mr rows read side by side
    const size_t rows = count - m0 < mr ? count - m0 : mr;
    float* block = packed + m0 * packed_cols + col0 * mr;
    for (size_t c = 0; c < cols; ++c, block += mr)
      for (size_t i = 0; i < rows; ++i) block[i] = in[(m0 + i) * ld_in + c];
  }
}

void QuantizeRows(const float* in, size_t ld_in, size_t count, size_t cols, size_t group_size, int8_t* q,
                  size_t ld_q, float* scales, size_t ld_scales, float* dequantized) {
  // SSE2 (the x86-64 baseline): cvtps_epi32 rounds half to even under the default MXCSR, where
  // nearbyintf is a library call per value without SSE4.1.
  const __m128 sign = _mm_set1_ps(-0.0f);
  alignas(16) float group[kMaxGroupSize];
  for (size_t m = 0; m < count; ++m) {
    const float* row = in + m * ld_in;
    int8_t* q_row = q != nullptr ? q + m * ld_q : nullptr;
    for (size_t c0 = 0, g = 0; c0 < cols; c0 += group_size, ++g) {
      const size_t n = cols - c0 < group_size ? cols - c0 : group_size, padded = (n + 3) / 4 * 4;
      std::memcpy(group, row + c0, n * sizeof(float));
      std::memset(group + n, 0, (padded - n) * sizeof(float));
      __m128 max4 = _mm_setzero_ps();
      for (size_t i = 0; i < padded; i += 4) max4 = _mm_max_ps(max4, _mm_andnot_ps(sign, _mm_load_ps(group + i)));
      alignas(16) float lanes[4];
      _mm_store_ps(lanes, max4);
      const float max = std::max(std::max(lanes[0], lanes[1]), std::max(lanes[2], lanes[3]));
      const float scale = max / 127.0f;
      scales[m * ld_scales + g] = scale;
      const __m128 divisor = _mm_set1_ps(scale > 0.0f ? scale : 1.0f);
      for (size_t i = 0; i < padded; i += 4) {
        // |x| <= max makes |x / x_scale| <= 127 up to rounding; the clamp only catches NaN/inf.
        __m128i v = _mm_packs_epi32(_mm_cvtps_epi32(_mm_div_ps(_mm_load_ps(group + i), divisor)), _mm_setzero_si128());
        v = _mm_max_epi16(_mm_min_epi16(v, _mm_set1_epi16(127)), _mm_set1_epi16(-127));
        const __m128i wide = _mm_srai_epi32(_mm_unpacklo_epi16(v, v), 16);
        _mm_store_ps(group + i, _mm_mul_ps(_mm_cvtepi32_ps(wide), _mm_set1_ps(scale)));
        // 4 bytes even past `cols`: within the row (padded <= group_size), zeroed below past cols
        const int32_t bytes = _mm_cvtsi128_si32(_mm_packs_epi16(v, v));
        if (q_row != nullptr) std::memcpy(q_row + c0 + i, &bytes, sizeof(bytes));
      }
      if (dequantized != nullptr) std::memcpy(dequantized + m * ld_in + c0, group, n * sizeof(float));
    }
    if (q_row != nullptr) std::memset(q_row + cols, 0, ld_q - cols);
  }
}

float* ThreadScratch(Scratch slot, size_t floats) {
  thread_local std::vector<float> buffers[6];
  std::vector<float>& buffer = buffers[static_cast<int>(slot)];
  if (buffer.size() < floats) buffer.resize(floats);
  return buffer.data();
}

}  // namespace sslc

// What a session created now would use: "scalar", "avx2", "avx512", or "error: <why>".
extern "C" __attribute__((visibility("default"))) const char* sslc_kernels_isa(void) {
  thread_local std::string answer;
  try {
    answer = sslc::Select().name;
  } catch (const std::exception& e) {
    answer = std::string("error: ") + e.what();
  }
  return answer.c_str();
}
