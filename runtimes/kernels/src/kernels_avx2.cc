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

// For each mask byte: byte j takes packed byte rank(j); 0x80 (pshufb's zero) where the bit is 0.
struct ShuffleTable {
  alignas(64) uint8_t index[256][8];
  constexpr ShuffleTable() : index() {
    for (int bits = 0; bits < 256; ++bits) {
      int rank = 0;
      for (int j = 0; j < 8; ++j) index[bits][j] = (bits >> j) & 1 ? rank++ : 0x80;
    }
  }
};
constexpr ShuffleTable kShuffle{};

// activation_bits = 8 without VNNI: 32 columns per step, 16 placed per pshufb. The products use
// maddubs (u8 x s8 -> pairs summed into i16, saturating) on |w| and q with w's sign: each pair
// is at most 2 * 127 * 127 < 2^15, so the sums are exact (llama.cpp's q8 dot products).
struct Avx2Quant {
  static constexpr size_t kLanes = 32;
  static constexpr size_t kRows = 4;
  struct Weights {
    __m256i magnitude, sign;
  };
  using IAcc = __m256i;
  using FAcc = __m256;

  static __m128i Place16(const int8_t*& p, unsigned bits) {
    const unsigned low = bits & 0xFF, low_count = _mm_popcnt_u32(low);
    const __m128i high_index = _mm_add_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kShuffle.index[bits >> 8])),
                                            _mm_set1_epi8(static_cast<char>(low_count)));  // 0x80 + 8 stays negative
    const __m128i index = _mm_unpacklo_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kShuffle.index[low])), high_index);
    const __m128i placed = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), index);
    p += _mm_popcnt_u32(bits);
    return placed;
  }
  static Weights Expand(const int8_t*& p, uint64_t bits) {
    const __m128i low = Place16(p, bits & 0xFFFF);
    const __m256i w = _mm256_inserti128_si256(_mm256_castsi128_si256(low), Place16(p, (bits >> 16) & 0xFFFF), 1);
    return {_mm256_abs_epi8(w), w};
  }
  static IAcc IZero() { return _mm256_setzero_si256(); }
  static IAcc Dot(IAcc acc, const Weights& w, const int8_t* q) {
    const __m256i x = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)), w.sign);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w.magnitude, x), _mm256_set1_epi16(1)));
  }
  static FAcc FZero() { return _mm256_setzero_ps(); }
  static FAcc ScaleAdd(FAcc acc, IAcc dot, float scale) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(scale), acc);
  }
  static float Sum(FAcc acc) { return Avx2::Hsum(acc); }
};

}  // namespace

constexpr QuantGemv kAvx2QuantGemv = MakeQuantGemv<Avx2Quant>();
constexpr KernelTable kAvx2Kernels = MakeTable<Avx2, Avx2>("avx2", &kAvx2QuantGemv);

}  // namespace sslc
