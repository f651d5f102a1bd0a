// AVX2 + FMA (the baseline): 8 lanes per mask byte, expanded with one permute from a table.
#include <immintrin.h>

#include "kernels_impl.h"

namespace sslc {
namespace {

struct Avx2 {
  static constexpr size_t W = 8;
  static constexpr size_t kGemvRows = 4;  // input rows per pass over the weights
  static constexpr size_t kGemmNR = 6;  // 6 x 16 tile: 12 accumulators + 2 loads + 1 broadcast
  using Vec = __m256;

  static Vec Zero() { return _mm256_setzero_ps(); }
  static Vec Set1(float x) { return _mm256_set1_ps(x); }
  static Vec Load(const float* p) { return _mm256_loadu_ps(p); }
  static void Store(float* p, Vec a) { _mm256_storeu_ps(p, a); }
  static Vec Add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  static Vec Mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  static Vec Fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static float Hsum(Vec a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  // Packed (dense) lanes -> mask positions; the cursor may read up to kReadPad bytes ahead.
  static Vec Place(Vec packed, unsigned bits) {
    const __m256i index = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpandIndex.index[bits]));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(packed, index), _mm256_setzero_ps(), _mm256_castsi256_ps(index));
  }
  static Vec ExpandF32(const float*& p, unsigned bits) {
    const Vec v = Place(_mm256_loadu_ps(p), bits);
    p += _mm_popcnt_u32(bits);
    return v;
  }
  static Vec ExpandI8(const int8_t*& p, unsigned bits) {
    const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    p += _mm_popcnt_u32(bits);
    return Place(_mm256_cvtepi32_ps(q), bits);
  }
};

}  // namespace

const KernelTable kAvx2Kernels = MakeTable<Avx2>("avx2");

}  // namespace sslc
