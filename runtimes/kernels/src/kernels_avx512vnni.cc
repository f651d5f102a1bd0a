// activation_bits = 8 on AVX-512 with VBMI, VBMI2 and VNNI. Decode: a step is 64 columns (one 64-bit
// mask word), placed with vpexpandb and multiplied with one vpdpbusd per input row. Prefill: an
// integer GEMM on the same placement (VnniGemmRows, at the end). Its own file:
// these flags must not leak into the kernels that run on AVX-512 F/BW/VL alone.
//
// Groups of 16, 32 or 64 columns (OffsetGemv): vpdpbusd takes u8 x s8, so the weights are placed
// as w + offset (int4: the stored nibble, w + 8; int8: w + 128), lanes whose bit is 0 as the
// offset itself (w = 0), and every dot starts from -offset * sum(q) of its lanes, computed once
// per call for each input row: exact, and per step only the placement (one vpexpandb: a step is
// one int4 run) and one vpdpbusd per input row. A step holds 64 / group_size groups; their int32
// lanes are disjoint (4 columns per lane), so one conversion and one FMA with a per-lane scale
// serve all of them. Other group sizes take the generic walk (kernels_impl.h) with |w| and q
// carrying w's sign.
#include "kernels_impl.h"

#include <immintrin.h>

namespace sslc {
namespace {

struct Avx512VnniQuant {
  static constexpr size_t kLanes = 64;
  static constexpr size_t kRows = 8;
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

constexpr size_t kStepFloats = 32;  // per (input row, step): 16 int32 dot starts, 16 x_scales

// Index for vpermps: int32 lane j belongs to group j / (16 / kGroups) of its step.
template <size_t kGroups>
__m512i GroupOfLane() {
  alignas(64) int32_t index[16];
  for (int j = 0; j < 16; ++j) index[j] = j / (16 / static_cast<int>(kGroups));
  return _mm512_load_si512(index);
}

// A run's packed int4 bytes at p -> one value (the nibble, w + 8) per byte, in order: each dword of
// bytes widened to a qword, vpmultishiftqb picks the nibbles.
inline __m512i Nibbles(const uint8_t* p) {
  const __m512i dwords = _mm512_cvtepu32_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_and_si512(_mm512_multishift_epi64_epi8(_mm512_set1_epi64(0x1C1814100C080400), dwords),
                          _mm512_set1_epi8(0x0F));
}

template <ValueType T>
constexpr int kOffset = T == ValueType::kI4 ? 8 : 128;

// The step's weights as u8 (w + offset; the offset where a bit is 0); advances p. A step is one
// int4 run (64 columns), so its values start on a byte.
template <ValueType T>
inline __m512i Place(const uint8_t*& p, uint64_t bits) {
  const size_t kept = _mm_popcnt_u64(bits);
  if constexpr (T == ValueType::kI8) {
    const __m512i w = _mm512_maskz_expand_epi8(bits, _mm512_loadu_si512(p));
    p += kept;
    return _mm512_xor_si512(w, _mm512_set1_epi8(static_cast<char>(0x80)));
  } else {
    const __m512i u = _mm512_mask_expand_epi8(_mm512_set1_epi8(kOffset<T>), bits, Nibbles(p));
    p += (kept + 1) / 2;
    return u;
  }
}

// Per input row and step: the dots' starting values (-offset * sum of q over each lane's 4
// columns) and x_scale per lane. q is zero past the matrix width and readable 64 columns on.
template <ValueType T, size_t kGroups>
void PrepareSteps(const QuantInput& in, size_t count, size_t steps, size_t groups, float* out) {
  const __m512i lanes = GroupOfLane<kGroups>(), offset = _mm512_set1_epi8(static_cast<char>(kOffset<T>));
  for (size_t m = 0; m < count; ++m)
    for (size_t s = 0; s < steps; ++s, out += kStepFloats) {
      const __m512i q = _mm512_loadu_si512(in.q + m * in.ld_q + s * 64);
      const __m512i scaled = _mm512_dpbusd_epi32(_mm512_setzero_si512(), offset, q);  // offset as u8: 8 or 128
      _mm512_storeu_si512(out, _mm512_sub_epi32(_mm512_setzero_si512(), scaled));
      const size_t g = s * kGroups, live = groups - g < kGroups ? groups - g : kGroups;
      const __m128 x_scales = _mm_maskz_loadu_ps(static_cast<__mmask8>((1u << live) - 1), in.scales + m * in.ld_scales + g);
      _mm512_storeu_ps(out + 16, _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(x_scales)));
    }
}

template <ValueType T, size_t kGroups, size_t kRows>
__attribute__((noinline)) void OffsetGemvBlock(const RowsView& w, const QuantInput& in, const float* prepared,
                                               size_t steps, float* out, size_t ld_out, size_t n0, size_t n1) {
  const __m512i lanes = GroupOfLane<kGroups>();
  const size_t row_bytes = w.row_bytes, groups = w.groups;
  // Steps with 8 mask bytes and kGroups scales inside the row: plain loads.
  const size_t full = row_bytes / 8 < groups / kGroups ? row_bytes / 8 : groups / kGroups;
  const int8_t* const q = in.q;
  const size_t ld_q = in.ld_q;
  for (size_t n = n0; n < n1; ++n) {
    const uint8_t* mask = w.mask + n * row_bytes;
    const uint8_t* p = w.row_values[n];
    const float* w_scales = w.scales + n * groups;
    __m512 acc[kRows];
    for (size_t m = 0; m < kRows; ++m) acc[m] = _mm512_setzero_ps();
    auto step = [&](size_t s, uint64_t bits, __m512 lane_scales) __attribute__((always_inline)) {
      const __m512i u = Place<T>(p, bits);
      for (size_t m = 0; m < kRows; ++m) {
        const float* prep = prepared + (m * steps + s) * kStepFloats;
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_loadu_si512(prep), u, _mm512_loadu_si512(q + m * ld_q + s * 64));
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(lane_scales, _mm512_loadu_ps(prep + 16)), acc[m]);
      }
    };
    size_t s = 0;
    for (; s < full; ++s) {
      // Both streams ahead of the walk (the next rows' follow this row's): faster with the weights
      // out of cache (A/B of two builds; distances of 512 to 2048 bytes did alike).
      _mm_prefetch(reinterpret_cast<const char*>(p) + 1024, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(mask) + s * 8 + 512, _MM_HINT_T0);
      uint64_t bits;
      memcpy(&bits, mask + s * 8, sizeof(bits));
      if (bits == 0) continue;  // every group of the step empty: no term
      const float* ws = w_scales + s * kGroups;
      if constexpr (kGroups == 1) {
        step(s, bits, _mm512_set1_ps(*ws));
      } else {
        const __m128 scales = kGroups == 2 ? _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(ws))) : _mm_loadu_ps(ws);
        step(s, bits, _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(scales)));
      }
    }
    const bool wide = WideMaskLoads<Avx512VnniQuant>(w, n);
    for (; s < steps; ++s) {
      const uint64_t bits = MaskBits<Avx512VnniQuant, 8>(mask + s * 8, row_bytes - s * 8, wide);
      if (bits == 0) continue;
      const size_t g = s * kGroups, live = groups - g < kGroups ? groups - g : kGroups;
      const __m128 scales = _mm_maskz_loadu_ps(static_cast<__mmask8>((1u << live) - 1), w_scales + g);
      step(s, bits, _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(scales)));
    }
    for (size_t m = 0; m < kRows; ++m) out[m * ld_out + n] = _mm512_reduce_add_ps(acc[m]);
  }
}

template <ValueType T, size_t kGroups>
void OffsetGemv(const RowsView& w, const QuantInput& in, size_t count, float* out, size_t ld_out, size_t n0, size_t n1) {
  constexpr size_t kRows = Avx512VnniQuant::kRows;
  const size_t steps = (w.row_bytes + 7) / 8;
  float* prepared = ThreadScratch(Scratch::kSteps, count * steps * kStepFloats);
  PrepareSteps<T, kGroups>(in, count, steps, w.groups, prepared);
  ForRowBlocks<kRows>(count, [&](auto rows, size_t m) {
    const QuantInput block{in.q + m * in.ld_q, in.ld_q, in.scales + m * in.ld_scales, in.ld_scales};
    OffsetGemvBlock<T, kGroups, rows>(w, block, prepared + m * steps * kStepFloats, steps, out + m * ld_out, ld_out, n0, n1);
  });
}

template <ValueType T>
void VnniGemv(const RowsView& w, const QuantInput& in, size_t count, float* out, size_t ld_out, size_t n0, size_t n1) {
  switch (w.group_size) {
    case 64: return OffsetGemv<T, 1>(w, in, count, out, ld_out, n0, n1);
    case 32: return OffsetGemv<T, 2>(w, in, count, out, ld_out, n0, n1);
    case 16: return OffsetGemv<T, 4>(w, in, count, out, ld_out, n0, n1);
    default: return QuantGemvAll<Avx512VnniQuant, T>(w, in, count, out, ld_out, n0, n1);
  }
}

// activation_bits = 8, prefill: an integer GEMM. The same offset trick as OffsetGemv with the roles
// turned for a register tile: kGemmRows rows of W are placed (u8, w + offset) into a dense panel
// once, and for every block of 32 input rows each 4 columns of a W row are broadcast against the
// block's q (one vpdpbusd per 16 input rows: 64 products), int32 sums per group starting from
// -offset * sum(q), then one conversion and one FMA with x_scale * w_scale per group. Four times
// the products per instruction of the fp32 tile, which multiplies the fake-quantized input.

// QuantizeRows' definition (dispatch.cc) for groups of 16, 32 or 64 columns, 16 lanes per step: the same
// fp32 max, division and round-half-even conversion, so the same q and x_scale (for finite inputs).
// Row m's q into q + m * ld_q (zero from cols to ld_q, a multiple of group_size), its x_scale per group
// into scales + m * groups.
void QuantizeRows512(const float* in, size_t ld_in, size_t count, size_t cols, size_t group_size, int8_t* q,
                     size_t ld_q, float* scales, size_t groups) {
  const __m512i low = _mm512_set1_epi32(-127), high = _mm512_set1_epi32(127);
  const size_t lanes = group_size / 16;
  for (size_t m = 0; m < count; ++m) {
    const float* row = in + m * ld_in;
    int8_t* q_row = q + m * ld_q;
    for (size_t g = 0; g < groups; ++g) {
      __m512 x[4];
      __m512 max = _mm512_setzero_ps();
      for (size_t i = 0; i < lanes; ++i) {
        const size_t c = g * group_size + 16 * i, live = c < cols ? (cols - c < 16 ? cols - c : 16) : 0;
        x[i] = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << live) - 1), row + c);
        max = _mm512_max_ps(max, _mm512_abs_ps(x[i]));
      }
      const float scale = _mm512_reduce_max_ps(max) / 127.0f;
      scales[m * groups + g] = scale;
      const __m512 divisor = _mm512_set1_ps(scale > 0.0f ? scale : 1.0f);
      for (size_t i = 0; i < lanes; ++i) {
        const __m512i rounded = _mm512_cvtps_epi32(_mm512_div_ps(x[i], divisor));
        const __m512i v = _mm512_min_epi32(_mm512_max_epi32(rounded, low), high);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q_row + g * group_size + 16 * i), _mm512_cvtepi32_epi8(v));
      }
    }
  }
}

// One block of QuantBlockBytes: per group the q in quads of 4 columns, their sums, x_scales.
void PackQuantBlock(const float* in, size_t ld_in, size_t count, size_t cols, size_t group_size, size_t first_group,
                    uint8_t* dst) {
  const size_t c0 = first_group * group_size, groups = (cols - c0 + group_size - 1) / group_size;
  const size_t ld_q = groups * group_size;
  float* scales = ThreadScratch(Scratch::kSteps, kQuantBlockRows * groups + kQuantBlockRows * ld_q / 4);
  int8_t* q = reinterpret_cast<int8_t*>(scales + kQuantBlockRows * groups);
  QuantizeRows512(in + c0, ld_in, count, cols - c0, group_size, q, ld_q, scales, groups);
  if (count < kQuantBlockRows) memset(q + count * ld_q, 0, (kQuantBlockRows - count) * ld_q);
  dst += first_group * (group_size + 8) * kQuantBlockRows;
  // dword (4 columns) j of row m -> lane m of quad j: two 16-lane gathers per quad.
  const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int>(ld_q)));
  const __m512i ones = _mm512_set1_epi8(1);
  for (size_t g = 0; g < groups; ++g) {
    __m512i sums[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
    for (size_t j = 0; j < group_size / 4; ++j, dst += 4 * kQuantBlockRows) {
      for (size_t h = 0; h < 2; ++h) {
        const int8_t* base = q + 16 * h * ld_q + g * group_size + 4 * j;
        const __m512i quad = _mm512_i32gather_epi32(rows, base, 1);
        _mm512_storeu_si512(dst + 64 * h, quad);
        sums[h] = _mm512_dpbusd_epi32(sums[h], ones, quad);
      }
    }
    _mm512_storeu_si512(dst, sums[0]);
    _mm512_storeu_si512(dst + 64, sums[1]);
    float* x_scales = reinterpret_cast<float*>(dst + 4 * kQuantBlockRows);
    for (size_t m = 0; m < kQuantBlockRows; ++m) x_scales[m] = m < count ? scales[m * groups + g] : 0.0f;
    dst += 8 * kQuantBlockRows;
  }
}

constexpr size_t kGemmRows = 6;  // rows of W per tile: 12 int32 and 12 fp32 accumulators

// Row n of W as u8 (w + offset, the offset where the mask bit is 0), steps * 64 columns.
template <ValueType T>
inline void PlaceRow(const RowsView& w, size_t n, size_t steps, uint8_t* dst) {
  const uint8_t* mask = w.mask + n * w.row_bytes;
  const uint8_t* p = w.row_values[n];
  const size_t full = w.row_bytes / 8;
  size_t s = 0;
  for (; s < full; ++s) {
    uint64_t bits;
    memcpy(&bits, mask + s * 8, sizeof(bits));
    _mm512_storeu_si512(dst + 64 * s, Place<T>(p, bits));
  }
  const bool wide = WideMaskLoads<Avx512VnniQuant>(w, n);
  for (; s < steps; ++s) {
    const uint64_t bits = MaskBits<Avx512VnniQuant, 8>(mask + s * 8, w.row_bytes - s * 8, wide);
    _mm512_storeu_si512(dst + 64 * s, Place<T>(p, bits));
  }
}

template <ValueType T, size_t kGroupSize>
__attribute__((noinline)) void VnniGemmRows(const RowsView& w, const uint8_t* packed, size_t block_bytes, size_t count,
                                            float* out, size_t ld_out, size_t n0, size_t n1) {
  constexpr size_t kNR = kGemmRows, kQuads = kGroupSize / 4, kGroupBytes = (kGroupSize + 8) * kQuantBlockRows;
  constexpr int kOffsetShift = T == ValueType::kI4 ? 3 : 7;  // offset 8 or 128
  const size_t steps = (w.row_bytes + 7) / 8, ld_panel = 64 * steps, groups = w.groups;
  const size_t blocks = (count + kQuantBlockRows - 1) / kQuantBlockRows;
  uint8_t* panel = reinterpret_cast<uint8_t*>(ThreadScratch(Scratch::kPanel, kNR * ld_panel / 4 + kNR * groups));
  float* w_scales = reinterpret_cast<float*>(panel + kNR * ld_panel);  // [kNR][groups], 0 past the last row
  for (size_t n = n0; n < n1; n += kNR) {
    const size_t rows = n1 - n < kNR ? n1 - n : kNR;
    PrefetchRows<Avx512VnniQuant>(w, n + kNR, n + 2 * kNR < n1 ? n + 2 * kNR : n1);
    for (size_t j = 0; j < kNR; ++j) {
      if (j < rows) {
        PlaceRow<T>(w, n + j, steps, panel + j * ld_panel);
        memcpy(w_scales + j * groups, w.scales + (n + j) * groups, groups * sizeof(float));
      } else {
        memset(panel + j * ld_panel, kOffset<T>, ld_panel);
        memset(w_scales + j * groups, 0, groups * sizeof(float));
      }
    }
    for (size_t b = 0; b < blocks; ++b) {
      const uint8_t* group = packed + b * block_bytes;
      __m512 acc[kNR][2];
      for (size_t j = 0; j < kNR; ++j) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
      for (size_t g = 0; g < groups; ++g, group += kGroupBytes) {
        const uint8_t* sums = group + kGroupSize * kQuantBlockRows;
        auto start = [&](size_t half) {  // -offset * sum(q) of 16 input rows
          const __m512i sum_q = _mm512_loadu_si512(sums + 64 * half);
          return _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sum_q, kOffsetShift));
        };
        const __m512i start0 = start(0), start1 = start(1);
        __m512i dot[kNR][2];
        for (size_t j = 0; j < kNR; ++j) dot[j][0] = start0, dot[j][1] = start1;
        const uint8_t* weights = panel + g * kGroupSize;
#pragma GCC unroll 16  // whole group: a rolled loop made GCC copy the 12 sums between registers every pass
        for (size_t c = 0; c < kQuads; ++c) {
          const __m512i x0 = _mm512_loadu_si512(group + c * 128), x1 = _mm512_loadu_si512(group + c * 128 + 64);
#pragma GCC unroll 8
          for (size_t j = 0; j < kNR; ++j) {
            int32_t four;
            memcpy(&four, weights + j * ld_panel + 4 * c, sizeof(four));
            const __m512i a = _mm512_set1_epi32(four);
            dot[j][0] = _mm512_dpbusd_epi32(dot[j][0], a, x0);
            dot[j][1] = _mm512_dpbusd_epi32(dot[j][1], a, x1);
          }
        }
        const __m512 xs0 = _mm512_loadu_ps(reinterpret_cast<const float*>(sums + 128));
        const __m512 xs1 = _mm512_loadu_ps(reinterpret_cast<const float*>(sums + 192));
        for (size_t j = 0; j < kNR; ++j) {
          const __m512 ws = _mm512_set1_ps(w_scales[j * groups + g]);
          acc[j][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[j][0]), _mm512_mul_ps(xs0, ws), acc[j][0]);
          acc[j][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[j][1]), _mm512_mul_ps(xs1, ws), acc[j][1]);
        }
      }
      alignas(64) float tile[kNR][kQuantBlockRows];
      for (size_t j = 0; j < kNR; ++j) {
        _mm512_store_ps(tile[j], acc[j][0]);
        _mm512_store_ps(tile[j] + 16, acc[j][1]);
      }
      const size_t m0 = b * kQuantBlockRows, live = count - m0 < kQuantBlockRows ? count - m0 : kQuantBlockRows;
      for (size_t m = 0; m < live; ++m)
        for (size_t j = 0; j < rows; ++j) out[(m0 + m) * ld_out + n + j] = tile[j][m];
    }
  }
}

template <ValueType T>
void VnniGemm(const RowsView& w, const uint8_t* packed, size_t block_bytes, size_t count, float* out, size_t ld_out,
              size_t n0, size_t n1) {
  switch (w.group_size) {
    case 64: return VnniGemmRows<T, 64>(w, packed, block_bytes, count, out, ld_out, n0, n1);
    case 32: return VnniGemmRows<T, 32>(w, packed, block_bytes, count, out, ld_out, n0, n1);
    default: return VnniGemmRows<T, 16>(w, packed, block_bytes, count, out, ld_out, n0, n1);  // QuantGemmSupports
  }
}

constexpr QuantGemm kVnniGemm{PackQuantBlock, {VnniGemm<ValueType::kI8>, VnniGemm<ValueType::kI4>}, kGemmRows};

}  // namespace

constexpr QuantGemv kAvx512VnniQuantGemv{{VnniGemv<ValueType::kI8>, VnniGemv<ValueType::kI4>}, &kVnniGemm};

}  // namespace sslc
