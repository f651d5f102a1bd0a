// Run-time choice of the kernel table, and the ISA-neutral helpers the kernels share.
#include "dispatch.h"

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

}  // namespace

const KernelTable& Select() {
  const char* forced = std::getenv("SSLC_KERNEL_ISA");
  if (forced == nullptr || *forced == '\0') {
    if (HasAvx512()) return kAvx512Kernels;
    if (HasAvx2()) return kAvx2Kernels;
    throw std::runtime_error("this CPU lacks AVX2+FMA, which the ai.sslc kernels require (SSLC_KERNEL_ISA=scalar forces the slow portable path)");
  }
  const std::string isa(forced);
  if (isa == "scalar") return kScalarKernels;
  if (isa == "avx2" || isa == "avx512") {
    if (isa == "avx2" ? HasAvx2() : HasAvx512()) return isa == "avx2" ? kAvx2Kernels : kAvx512Kernels;
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

float* ThreadScratch(Scratch slot, size_t floats) {
  thread_local std::vector<float> buffers[2];
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
