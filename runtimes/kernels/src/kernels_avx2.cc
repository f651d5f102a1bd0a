// AVX2 + FMA (the baseline): 8 lanes per mask byte, expanded with one permute from a table.
#include "kernels_impl.h"
#include "simd256.h"

namespace sslc {
namespace {

struct Avx2 : Simd256<Avx2> {
  static constexpr size_t kGemvRows = 4;  // input rows per pass over the weights
  static constexpr size_t kGemmNR = 6;    // 6 x 16 tile: 12 accumulators + 2 loads + 1 broadcast

  // Lanes whose mask bit is 0 have a negative index: the blend turns them into 0.0.
  static Vec Place(Vec packed, unsigned bits) {
    const __m256i index = Index(bits);
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(packed, index), _mm256_setzero_ps(), _mm256_castsi256_ps(index));
  }
};

}  // namespace

constexpr KernelTable kAvx2Kernels = MakeTable<Avx2, Avx2>("avx2");

}  // namespace sslc
