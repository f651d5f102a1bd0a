// activation_bits = 8 on AVX-512 with VBMI2 and VNNI: a step is 64 columns (one 64-bit mask
// word), placed with one vpexpandb and multiplied with one vpdpbusd per input row. vpdpbusd
// takes u8 x s8, so it gets |w| and q with w's sign (|w| <= 127, |q| <= 127: exact, and no
// per-row correction sums to keep). Its own file: these flags must not leak into the kernels
// that run on AVX-512 F/BW/VL alone.
#include "kernels_impl.h"

#include <immintrin.h>

namespace sslc {
namespace {

struct Avx512VnniQuant {
  static constexpr size_t kLanes = 64;
  static constexpr size_t kRows = 8;
  static constexpr bool kPlacesNibbles = true;
  struct Weights {
    __m512i magnitude;
    __mmask64 negative;
  };
  using IAcc = __m512i;
  using FAcc = __m512;

  static Weights Expand(const int8_t*& p, uint64_t bits) {
    // GCC folds the load into vpexpandb's memory form: measured on this Zen 4, int8 decode took
    // 1.6x longer with a separate load forced.
    const __m512i w = _mm512_maskz_expand_epi8(bits, _mm512_loadu_si512(p));
    p += _mm_popcnt_u64(bits);
    return {_mm512_abs_epi8(w), _mm512_movepi8_mask(w)};
  }
  // A group's (up to 32) packed bytes -> 64 values in order: each byte widened to 16 bits, its
  // high nibble moved to the upper byte.
  static Weights ExpandNibbles(const uint8_t*& p, uint64_t bits) {
    const __m512i wide = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    const __m512i nibbles = _mm512_and_si512(_mm512_or_si512(wide, _mm512_slli_epi16(wide, 4)), _mm512_set1_epi8(0x0F));
    const __m512i w = _mm512_maskz_expand_epi8(bits, _mm512_sub_epi8(nibbles, _mm512_set1_epi8(8)));
    p += (_mm_popcnt_u64(bits) + 1) / 2;
    return {_mm512_abs_epi8(w), _mm512_movepi8_mask(w)};
  }
  static IAcc IZero() { return _mm512_setzero_si512(); }
  static IAcc Dot(IAcc acc, const Weights& w, const int8_t* q) {
    const __m512i x = _mm512_loadu_si512(q);
    return _mm512_dpbusd_epi32(acc, w.magnitude, _mm512_mask_sub_epi8(x, w.negative, _mm512_setzero_si512(), x));
  }
  static FAcc FZero() { return _mm512_setzero_ps(); }
  static FAcc ScaleAdd(FAcc acc, IAcc dot, float scale) {
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(scale), acc);
  }
  static float Sum(FAcc acc) { return _mm512_reduce_add_ps(acc); }
};

}  // namespace

constexpr QuantGemv kAvx512VnniQuantGemv = MakeQuantGemv<Avx512VnniQuant>();

}  // namespace sslc
