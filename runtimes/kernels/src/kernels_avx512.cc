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

}  // namespace

constexpr KernelTable kAvx512Kernels = MakeTable<Avx512Vl, Avx512>("avx512", &kAvx512VnniQuantGemv);
// AVX-512 F/BW/VL without VBMI2 or VNNI: the integer-activation GEMV runs on AVX2.
constexpr KernelTable kAvx512NoVnniKernels = MakeTable<Avx512Vl, Avx512>("avx512", &kAvx2QuantGemv);

}  // namespace sslc
