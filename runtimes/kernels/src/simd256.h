// 256-bit vector operations shared by the AVX2 and AVX-512 kernel files. A CRTP template: each
// file instantiates it with its own internal-linkage type, so each gets a copy compiled with its
// own flags. Derived supplies Place(packed, bits): packed lanes -> mask positions, zeros elsewhere.
#pragma once

#include <immintrin.h>

#include <cstddef>
#include <cstdint>

namespace sslc {

template <class Derived>
struct Simd256 {
  static constexpr size_t W = 8;
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
  // out[j] = Hsum(s[j]) for j < 8.
  static void Hsum8(const Vec* s, float* out) {
    const __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(s[0], s[1]), _mm256_hadd_ps(s[2], s[3]));
    const __m256 cd = _mm256_hadd_ps(_mm256_hadd_ps(s[4], s[5]), _mm256_hadd_ps(s[6], s[7]));
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31)));
  }
  // The permute index for a mask byte (see ExpandTable in kernels_impl.h).
  static __m256i Index(unsigned bits) {
    return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kExpandIndex.index[bits])));
  }
  // The cursor may read up to ReadPad() bytes ahead, so full-width loads are safe.
  static Vec ExpandF32(const float*& p, unsigned bits) {
    const Vec v = Derived::Place(_mm256_loadu_ps(p), bits);
    p += _mm_popcnt_u32(bits);
    return v;
  }
  static Vec ExpandI8(const int8_t*& p, unsigned bits) {
    const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    p += _mm_popcnt_u32(bits);
    return Derived::Place(_mm256_cvtepi32_ps(q), bits);
  }
};

}  // namespace sslc
