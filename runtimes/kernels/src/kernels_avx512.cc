// AVX-512 (F, BW, VL). The GEMM uses 512-bit registers (an 8 x 32 tile); the GEMV walks 8 lanes
// per mask byte like AVX2 but places them with one two-source permute (vpermi2ps). On Zen 4, 16
// lanes per step (with a permute index or with vexpandps) and vexpandps on 8 lanes were slower:
// zmm operations are double-pumped there (runtimes/kernels/README.md).
#include "kernels_impl.h"
#include "simd256.h"

namespace sslc {
namespace {

struct Avx512Vl : Simd256<Avx512Vl> {
  static constexpr size_t kGemvRows = 8;  // 32 vector registers: 8 accumulators and room to spare
  // Lanes whose bit is 0 take lane 0 of the zero first source: no mask register to build.
  static Vec Place(Vec packed, unsigned bits) { return _mm256_permutex2var_ps(_mm256_setzero_ps(), Index(bits), packed); }
};

// The GEMM's register tile on dense panels: 512-bit registers.
struct Avx512 {
  static constexpr size_t W = 16;
  // 8 x 32 tile: 16 accumulators. Measured on Zen 4 (576x1536, 128 rows, one thread): 12 x 32
  // 2.63 ms, 8 x 32 2.45-2.52 ms, 6 x 32 2.52-2.55 ms.
  static constexpr size_t kGemmNR = 8;
  using Vec = __m512;

  static Vec Zero() { return _mm512_setzero_ps(); }
  static Vec Set1(float x) { return _mm512_set1_ps(x); }
  static Vec Load(const float* p) { return _mm512_loadu_ps(p); }
  static void Store(float* p, Vec a) { _mm512_storeu_ps(p, a); }
  static Vec Fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
};

// fp32 decode with 16 lanes per step: two mask bytes, placed with one vexpandps from the values.
// Chosen where zmm operations run at full width (Intel, see dispatch.cc); Zen 4 splits them in two
// and there this was slower than the 8-lane walk above (runtimes/kernels/README.md).
template <size_t kRows>
__attribute__((noinline)) void WideGemvBlock(const RowsView& w, const float* in, size_t ld_in, float* out,
                                             size_t ld_out, size_t n0, size_t n1) {
  constexpr size_t kSlots = kRows == 1 ? 4 : kRows <= 4 ? 2 : 1;  // accumulators per input row, against FMA latency
  const size_t row_bytes = w.row_bytes;
  for (size_t n = n0; n < n1; ++n) {
    const uint8_t* mask = w.mask + n * row_bytes;
    const float* p = reinterpret_cast<const float*>(w.row_values[n]);
    __m512 acc[kSlots][kRows];
    for (size_t s = 0; s < kSlots; ++s)
      for (size_t m = 0; m < kRows; ++m) acc[s][m] = _mm512_setzero_ps();
    auto step = [&](size_t slot, size_t b, unsigned bits) __attribute__((always_inline)) {
      const __m512 v = _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(bits), p);
      p += _mm_popcnt_u32(bits);
      for (size_t m = 0; m < kRows; ++m) acc[slot][m] = _mm512_fmadd_ps(v, _mm512_loadu_ps(in + m * ld_in + b * 8), acc[slot][m]);
    };
    // Eight mask bytes (four steps) per pass: each step's offset comes from a popcount of the word's lower
    // bits, so the only serial chain is one popcount per four steps (not one per step).
    size_t b = 0;
    for (; b + 8 <= row_bytes; b += 8) {
      // Two lines 4 KiB ahead: a pass moves the cursor by up to 128 bytes at <= 50 % density (S's), so every line of
      // the values is asked for; one prefetch per pass left about half of them to the hardware prefetcher.
      _mm_prefetch(reinterpret_cast<const char*>(p) + 4096, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p) + 4096 + 64, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(mask) + b + 1024, _MM_HINT_T0);
      uint64_t word;
      memcpy(&word, mask + b, sizeof(word));
      const unsigned offset[4] = {0, static_cast<unsigned>(_mm_popcnt_u64(word & 0xFFFF)),
                                  static_cast<unsigned>(_mm_popcnt_u64(word & 0xFFFFFFFF)),
                                  static_cast<unsigned>(_mm_popcnt_u64(word & 0xFFFFFFFFFFFF))};
      for (size_t j = 0; j < 4; ++j) {
        const __m512 v = _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(word >> (16 * j)), p + offset[j]);
        for (size_t m = 0; m < kRows; ++m)
          acc[j % kSlots][m] = _mm512_fmadd_ps(v, _mm512_loadu_ps(in + m * ld_in + (b + 2 * j) * 8), acc[j % kSlots][m]);
      }
      p += _mm_popcnt_u64(word);
    }
    for (; b < row_bytes; b += 2) {
      const unsigned bits = mask[b] | (b + 1 < row_bytes ? mask[b + 1] << 8 : 0u);
      if (bits) step(0, b, bits);
    }
    for (size_t m = 0; m < kRows; ++m) {
      __m512 sum = acc[0][m];
      for (size_t s = 1; s < kSlots; ++s) sum = _mm512_add_ps(sum, acc[s][m]);
      out[m * ld_out + n] = _mm512_reduce_add_ps(sum);
    }
  }
}

void WideGemv(const RowsView& w, const float* in, size_t ld_in, size_t count, float* out, size_t ld_out, size_t n0,
              size_t n1) {
  ForRowBlocks<Avx512Vl::kGemvRows>(count, [&](auto rows, size_t m) {
    WideGemvBlock<rows>(w, in + m * ld_in, ld_in, out + m * ld_out, ld_out, n0, n1);
  });
}

constexpr KernelTable WithWideGemv(KernelTable table) {
  table.gemv[static_cast<int>(ValueType::kF32)] = WideGemv;
  return table;
}

}  // namespace

constexpr KernelTable kAvx512Kernels = MakeTable<Avx512Vl, Avx512>("avx512", &kAvx512VnniQuantGemv);
// AVX-512 F/BW/VL without VBMI2 or VNNI: the integer-activation GEMV runs on AVX2.
constexpr KernelTable kAvx512NoVnniKernels = MakeTable<Avx512Vl, Avx512>("avx512", &kAvx2QuantGemv);
constexpr KernelTable kAvx512WideKernels = WithWideGemv(kAvx512Kernels);
constexpr KernelTable kAvx512NoVnniWideKernels = WithWideGemv(kAvx512NoVnniKernels);

}  // namespace sslc
