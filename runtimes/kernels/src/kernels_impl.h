// The kernels, written once over ISA "traits" types and instantiated by each kernels_<isa>.cc
// (compiled with that ISA's flags). The traits types live in anonymous namespaces, so every
// instantiation has internal linkage and the linker can never hand the AVX-512 copy of a
// function to the scalar path. For the same reason this header uses no std:: templates.
//
// A row-walking type (GEMV, panel expansion) has W = 8 lanes (one mask byte per step), Vec,
// Zero, Load, Store, Set1, Add, Mul, Fma(a, b, c) = a*b + c, Hsum, Hsum8 (8 sums into 8 floats),
// kGemvRows, and the expanders
// ExpandF32/I8 (kept values at the cursor -> 8 lanes, zeros where the mask bit is 0; they
// advance the cursor). A GEMM tile type has W, Vec, Zero, Load, Store, Set1, Fma and kGemmNR:
// its register tile is kGemmNR rows of W' x 2W input rows.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>

#include <emmintrin.h>
#include <xmmintrin.h>

#include "dispatch.h"

namespace sslc {

// For each mask byte, one byte per lane j: 8 + rank(j) where bit j is set (packed element rank(j):
// the low 3 bits for an 8-lane permute, or the second source of a two-source permute), 0x80 where
// it is 0 (sign-extended: negative, which the AVX2 blend turns into 0.0; its low 4 bits pick lane 0
// of a zero first source). Bytes, loaded sign-extended, so the table is 2 KiB and needs no shift
// to index.
struct ExpandTable {
  alignas(64) uint8_t index[256][8];
  constexpr ExpandTable() : index() {
    for (int bits = 0; bits < 256; ++bits) {
      int rank = 0;
      for (int j = 0; j < 8; ++j) index[bits][j] = (bits >> j) & 1 ? 8 + rank++ : 0x80;
    }
  }
};
inline constexpr ExpandTable kExpandIndex{};  // data only: no code for the linker to share

// The `bytes` packed bytes of an int4 group at src as signed values q, in order (low nibble
// first), into dst (room for bytes * 2 + 32). Reads whole 16-byte blocks: within ReadPad().
// (A template only for linkage, see above.)
template <class Isa>
inline void UnpackGroup(const uint8_t* src, size_t bytes, int8_t* dst) {
  const __m128i low = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
  for (size_t i = 0; i < bytes; i += 16, dst += 32) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m128i lo = _mm_and_si128(packed, low), hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), eight));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm_sub_epi8(_mm_unpackhi_epi8(lo, hi), eight));
  }
}

// The values of one packed row: Start(row, w, n) is where its kept values begin (int4: an int8 copy), Next(p, bits)
// expands a step's kept values and advances p. The walking pointer is the caller's local, so it stays in a register.
template <class Isa, ValueType T>
struct Cursor;

template <class Isa>
struct Cursor<Isa, ValueType::kF32> {
  using Ptr = const float*;
  static Ptr Start(const uint8_t* row, const RowsView&, size_t) { return reinterpret_cast<Ptr>(row); }
  static auto Next(Ptr& p, unsigned bits) { return Isa::ExpandF32(p, bits); }
};

template <class Isa>
struct Cursor<Isa, ValueType::kI8> {
  using Ptr = const int8_t*;
  static Ptr Start(const uint8_t* row, const RowsView&, size_t) { return reinterpret_cast<Ptr>(row); }
  static auto Next(Ptr& p, unsigned bits) { return Isa::ExpandI8(p, bits); }
};

// Kept values of row n counted over mask bytes [b0, b1).
template <class Isa>
inline size_t KeptIn(const uint8_t* mask, size_t b0, size_t b1) {
  size_t kept = 0, b = b0;
  for (uint64_t word; b + 8 <= b1; b += 8) {
    memcpy(&word, mask + b, sizeof(word));
    kept += __builtin_popcountll(word);
  }
  for (; b < b1; ++b) kept += __builtin_popcount(mask[b]);
  return kept;
}

// Row n's int4 values unpacked to int8, in order (each run's padding nibble dropped), into a per-thread
// buffer with 64 readable bytes past the last value. Out of line, once per row.
template <class Isa>
__attribute__((noinline)) const int8_t* UnpackRow(const uint8_t* row, const RowsView& w, size_t n) {
  const size_t run_bytes = NibbleRunColumns(w.group_size) / 8;
  int8_t* const buffer = reinterpret_cast<int8_t*>(ThreadScratch(Scratch::kRow, (w.row_bytes * 8 + 2 * kMaxGroupSize + 128) / 4));
  const uint8_t* mask = w.mask + n * w.row_bytes;
  int8_t* dst = buffer;
  size_t b = 0;
  // Runs of 64 columns: one mask word and a fixed 32 bytes unpacked, no branch on the data (unpacking every run's
  // full width in the general loop below was slower, in a one-off A/B of 2026-12-07).
  if (run_bytes == 8) {
    for (uint64_t word; b + 8 <= w.row_bytes; b += 8) {
      memcpy(&word, mask + b, sizeof(word));
      const size_t kept = __builtin_popcountll(word);
      UnpackGroup<Isa>(row, 32, dst);
      dst += kept;
      row += (kept + 1) / 2;
    }
  }
  for (; b < w.row_bytes; b += run_bytes) {
    const size_t kept = KeptIn<Isa>(mask, b, b + run_bytes < w.row_bytes ? b + run_bytes : w.row_bytes);
    UnpackGroup<Isa>(row, (kept + 1) / 2, dst);  // writes past dst + kept: the next run overwrites it
    dst += kept;
    row += (kept + 1) / 2;
  }
  return buffer;
}

// int4: the whole row is unpacked to int8 before it is walked, then read like int8 values. The stores
// are long done when the walk loads them; unpacking one run ahead of the walk (the earlier design) was
// slower on AVX2 (commit message), each load waiting on recent stores.
template <class Isa>
struct Cursor<Isa, ValueType::kI4> {
  using Ptr = const int8_t*;
  static Ptr Start(const uint8_t* row, const RowsView& w, size_t n) { return UnpackRow<Isa>(row, w, n); }
  static auto Next(Ptr& p, unsigned bits) { return Isa::ExpandI8(p, bits); }
};

// step(slot 0, b), step(slot 1, b + 1), ... with compile-time slots.
template <size_t... kSlot, class Step>
__attribute__((always_inline)) inline void Unrolled(std::index_sequence<kSlot...>, Step& step, size_t b) {
  (step(std::integral_constant<size_t, kSlot>{}, b + kSlot), ...);
}

// Calls f(column, vec, slot) for every step of W columns of row n (dequantized, scaled); steps
// whose mask bits are all zero are skipped unless kVisitZeros. Consecutive steps get slots
// 0..kSlots-1 (compile-time constants), so a caller can keep independent accumulators per slot
// and not wait on one FMA chain.
template <class Isa, ValueType T, bool kVisitZeros, size_t kSlots, class F>
__attribute__((always_inline)) inline void WalkRow(const RowsView& w, size_t n, F&& f) {
  static_assert(Isa::W == 8, "one mask byte per step");
  const uint8_t* mask = w.mask + n * w.row_bytes;
  typename Cursor<Isa, T>::Ptr p = Cursor<Isa, T>::Start(w.row_values[n], w, n);
  const float* scales = T == ValueType::kF32 ? nullptr : w.scales + n * w.groups;
  const size_t group_bytes = w.group_size / 8;
  size_t next_group = 0;
  typename Isa::Vec scale = Isa::Set1(1.0f);
  auto step = [&](auto slot, size_t b) __attribute__((always_inline)) {
    if (T != ValueType::kF32 && b == next_group) {
      scale = Isa::Set1(*scales++);
      next_group += group_bytes;
    }
    const unsigned bits = mask[b];
    if (bits == 0) {
      if (kVisitZeros) f(b * 8, Isa::Zero(), slot);
      return;
    }
    typename Isa::Vec v = Cursor<Isa, T>::Next(p, bits);
    if (T != ValueType::kF32) v = Isa::Mul(v, scale);
    f(b * 8, v, slot);
  };
  size_t b = 0;
  for (; b + kSlots <= w.row_bytes; b += kSlots) {
    // fp32 GEMV: one line 2 KiB ahead of the values per step group (the next rows' values lie right after this
    // row's); the hardware prefetcher alone left the walk waiting on memory (runtimes/kernels/README.md).
    if constexpr (T == ValueType::kF32 && !kVisitZeros) _mm_prefetch(reinterpret_cast<const char*>(p) + 2048, _MM_HINT_T0);
    Unrolled(std::make_index_sequence<kSlots>{}, step, b);
  }
  for (; b < w.row_bytes; ++b) step(std::integral_constant<size_t, 0>{}, b);
}

// kRows rows of the input against rows [n0, n1) of W: each step of W is expanded once and
// multiplied into every input row (decode: weights dominate the bytes moved). Few rows get
// several accumulators each, so the loop is bound by loads, not by FMA latency.
template <class Isa, ValueType T, size_t kRows>
void GemvBlock(const RowsView& w, const float* in, size_t ld_in, float* out, size_t ld_out, size_t n0, size_t n1) {
  constexpr size_t kSlots = kRows == 1 ? 4 : kRows <= 4 ? 2 : 1;
  using Vec = typename Isa::Vec;
  // Row n of W against every input row: sums[m], still a vector (its horizontal sum is the output).
  auto row_sums = [&](size_t n, Vec (&sums)[kRows]) __attribute__((always_inline)) {
    Vec acc[kSlots][kRows];
    for (size_t s = 0; s < kSlots; ++s)
      for (size_t m = 0; m < kRows; ++m) acc[s][m] = Isa::Zero();
    WalkRow<Isa, T, false, kSlots>(w, n, [&](size_t c, Vec v, auto slot) {
      for (size_t m = 0; m < kRows; ++m) acc[slot][m] = Isa::Fma(v, Isa::Load(in + m * ld_in + c), acc[slot][m]);
    });
    for (size_t m = 0; m < kRows; ++m) {
      sums[m] = acc[0][m];
      for (size_t s = 1; s < kSlots; ++s) sums[m] = Isa::Add(sums[m], acc[s][m]);
    }
  };
  size_t n = n0;
  if constexpr (kRows == 1) {  // decode: 8 rows' sums reduced together, not one horizontal sum per row
    for (; n + 8 <= n1; n += 8) {
      Vec sums[8][1];
      for (size_t j = 0; j < 8; ++j) row_sums(n + j, sums[j]);
      Isa::Hsum8(&sums[0][0], out + n);  // [8][1]: 8 consecutive vectors
    }
  }
  for (; n < n1; ++n) {
    Vec sums[kRows];
    row_sums(n, sums);
    for (size_t m = 0; m < kRows; ++m) out[m * ld_out + n] = Isa::Hsum(sums[m]);
  }
}

// Calls block(std::integral_constant<size_t, rows>{}, m) for each block of up to kMaxRows input rows
// starting at row m: the kernels get the row count as a constant for their register arrays.
template <size_t... kRows, class F>
inline void WithRowCount(std::index_sequence<kRows...>, size_t rows, size_t m, F& block) {
  ((rows == kRows + 1 ? block(std::integral_constant<size_t, kRows + 1>{}, m) : void()), ...);
}

template <size_t kMaxRows, class F>
inline void ForRowBlocks(size_t count, F&& block) {
  for (size_t m = 0; m < count; m += kMaxRows)
    WithRowCount(std::make_index_sequence<kMaxRows>{}, count - m < kMaxRows ? count - m : kMaxRows, m, block);
}

template <class Isa, ValueType T>
void Gemv(const RowsView& w, const float* in, size_t ld_in, size_t count, float* out, size_t ld_out, size_t n0,
          size_t n1) {
  ForRowBlocks<Isa::kGemvRows>(count, [&](auto rows, size_t m) {
    GemvBlock<Isa, T, rows>(w, in + m * ld_in, ld_in, out + m * ld_out, ld_out, n0, n1);
  });
}

// Register tile: kGemmNR dense rows of W (row stride ld_panel) times one packed block of 2W
// input rows, over `cols` columns; the products are stored in (or, when kAccumulate, added to)
// tile[kGemmNR][2W].
template <class Isa, bool kAccumulate>
inline void MicroKernel(const float* panel, size_t ld_panel, const float* block, size_t cols, float* tile) {
  constexpr size_t kNR = Isa::kGemmNR, kW = Isa::W;
  typename Isa::Vec acc[kNR][2];
  for (size_t j = 0; j < kNR; ++j) {
    acc[j][0] = kAccumulate ? Isa::Load(tile + j * 2 * kW) : Isa::Zero();
    acc[j][1] = kAccumulate ? Isa::Load(tile + j * 2 * kW + kW) : Isa::Zero();
  }
  for (size_t c = 0; c < cols; ++c, block += 2 * kW) {
    const typename Isa::Vec b0 = Isa::Load(block), b1 = Isa::Load(block + kW);
#pragma GCC unroll 16
    for (size_t j = 0; j < kNR; ++j) {
      const typename Isa::Vec a = Isa::Set1(panel[j * ld_panel + c]);
      acc[j][0] = Isa::Fma(a, b0, acc[j][0]);
      acc[j][1] = Isa::Fma(a, b1, acc[j][1]);
    }
  }
  for (size_t j = 0; j < kNR; ++j) {
    Isa::Store(tile + j * 2 * kW, acc[j][0]);
    Isa::Store(tile + j * 2 * kW + kW, acc[j][1]);
  }
}

// Asks for rows [n0, n1)'s packed values (usually one contiguous range) to be brought into L2
// while the current tile computes: expanding a tile otherwise waits on memory.
template <class Isa>
inline void PrefetchRows(const RowsView& w, size_t n0, size_t n1) {
  if (n0 >= n1) return;
  const uint8_t* begin = w.row_values[n0];
  const uint8_t* end = n1 < w.rows ? w.row_values[n1] : begin;
  if (end <= begin || static_cast<size_t>(end - begin) > (n1 - n0) * w.cols * sizeof(float)) return;  // tail copy
  for (const uint8_t* p = begin; p < end; p += 64) _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1);
}

// Prefill: expand kGemmNR rows of W into a dense panel (thread-local, with ExpandIsa's
// expanders), then run Isa's register tile over every packed block of input rows; each tile is
// stored transposed into out.
template <class ExpandIsa, class Isa, ValueType T>
void Gemm(const RowsView& w, const float* packed, size_t packed_cols, size_t count, float* out, size_t ld_out,
          size_t n0, size_t n1) {
  constexpr size_t kNR = Isa::kGemmNR, kMR = 2 * Isa::W;
  // Columns per pass, so that the panel's slice stays in L1 (measured: K = 1536 ran at 0.75x of
  // MatMul in one pass, the panel then being 12 x 1552 floats).
  constexpr size_t kColumnBlock = 256;
  const size_t ld_panel = PackedColumns(w.cols), blocks = (count + kMR - 1) / kMR;
  float* panel = ThreadScratch(Scratch::kPanel, kNR * ld_panel + blocks * kNR * kMR);
  float* tiles = panel + kNR * ld_panel;  // one tile per block of input rows
  for (size_t n = n0; n < n1; n += kNR) {
    const size_t rows = n1 - n < kNR ? n1 - n : kNR;
    PrefetchRows<Isa>(w, n + kNR, n + 2 * kNR < n1 ? n + 2 * kNR : n1);
    for (size_t j = 0; j < kNR; ++j) {
      float* dst = panel + j * ld_panel;
      size_t done = 0;
      if (j < rows) {
        WalkRow<ExpandIsa, T, true, 1>(w, n + j,
                                        [&](size_t c, typename ExpandIsa::Vec v, auto) { ExpandIsa::Store(dst + c, v); });
        done = (w.row_bytes * 8 + ExpandIsa::W - 1) / ExpandIsa::W * ExpandIsa::W;
      }
      if (done < ld_panel) memset(dst + done, 0, (ld_panel - done) * sizeof(float));
    }
    for (size_t c0 = 0; c0 < w.cols; c0 += kColumnBlock) {
      const size_t cols = w.cols - c0 < kColumnBlock ? w.cols - c0 : kColumnBlock;
      for (size_t b = 0; b < blocks; ++b) {
        const float* block = packed + (b * packed_cols + c0) * kMR;
        if (c0 == 0)
          MicroKernel<Isa, false>(panel + c0, ld_panel, block, cols, tiles + b * kNR * kMR);
        else
          MicroKernel<Isa, true>(panel + c0, ld_panel, block, cols, tiles + b * kNR * kMR);
      }
    }
    for (size_t m = 0; m < count; ++m) {  // tiles are [rows of W][input rows]: stored transposed
      const float* tile = tiles + (m / kMR) * kNR * kMR + m % kMR;
      for (size_t j = 0; j < rows; ++j) out[m * ld_out + n + j] = tile[j * kMR];
    }
  }
}

// activation_bits = 8. A quantized-GEMV traits type has kLanes (columns per step, a multiple of
// 8 up to 64), kRows (input rows per pass), Weights / Expand(p, bits) (the kept int8 values at
// the cursor placed into the lanes whose bit is set, zeros elsewhere; advances p), IAcc / IZero
// / Dot(acc, weights, q) (exact int32 dot product with kLanes activations at q), FAcc / FZero /
// ScaleAdd(acc, dot, scale) (acc += float(dot) * scale) and Sum(acc).

// The mask bits of a step, bit i = column b*8 + i, `valid` (> 0) bytes of them. `wide`: an
// 8-byte load from any byte of this row stays inside the mask tensor (all rows but the last
// few); otherwise only the valid bytes are read. (Isa: a template only for linkage, see above.)
template <class Isa, size_t kBytes>
inline uint64_t MaskBits(const uint8_t* mask, size_t valid, bool wide) {
  uint64_t bits = 0;
  if (wide) {
    memcpy(&bits, mask, kBytes);  // little-endian: byte b -> bits 8b..8b+7
    return valid >= kBytes ? bits : bits & ((uint64_t{1} << (8 * valid)) - 1);
  }
  for (size_t i = 0; i < valid && i < kBytes; ++i) bits |= static_cast<uint64_t>(mask[i]) << (8 * i);
  return bits;
}

// Whether an 8-byte mask load from any byte of row n stays inside the mask tensor (see MaskBits).
template <class Isa>
inline bool WideMaskLoads(const RowsView& w, size_t n) {
  return (w.rows - n) * w.row_bytes >= w.row_bytes + sizeof(uint64_t);
}

// Per output row: per group, exact integer dot products with every input row, then one scaled
// fp32 accumulation per (input row, group). Groups without kept values cost one mask test.
// kOneStep: groups of at most kLanes columns, one step each (the usual case), walked with less
// bookkeeping while whole mask words can be loaded. Out of line, `in` copied to locals:
// otherwise GCC ran out of registers and kept the source pointer in memory.
template <class Isa, ValueType T, size_t kRows, bool kOneStep>
__attribute__((noinline)) void QuantGemvBlock(const RowsView& w, const QuantInput& in, float* out, size_t ld_out,
                                              size_t n0, size_t n1) {
  constexpr size_t kStep = Isa::kLanes / 8;  // mask bytes per step
  const int8_t* const q = in.q;
  const float* const x_scales = in.scales;
  const size_t ld_q = in.ld_q, ld_scales = in.ld_scales, group_bytes = w.group_size / 8, row_bytes = w.row_bytes;
  // Mask-word bits of a one-step group, and of the last group of a row (maybe narrower).
  auto keep = [](size_t bytes) { return bytes >= 8 ? ~uint64_t{0} : (uint64_t{1} << (8 * bytes)) - 1; };
  const uint64_t group_keep = keep(group_bytes), last_keep = keep(row_bytes - (w.groups - 1) * group_bytes);
  for (size_t n = n0; n < n1; ++n) {
    const uint8_t* mask = w.mask + n * row_bytes;
    const bool wide = WideMaskLoads<Isa>(w, n);
    const float* w_scales = w.scales + n * w.groups;
    typename Cursor<Isa, T>::Ptr p = Cursor<Isa, T>::Start(w.row_values[n], w, n);
    typename Isa::FAcc acc[kRows];
    for (size_t m = 0; m < kRows; ++m) acc[m] = Isa::FZero();
    // Step at mask byte b with mask bits `bits` (not 0) into dot.
    auto step = [&](typename Isa::IAcc* dot, size_t b, uint64_t bits) __attribute__((always_inline)) {
      const typename Isa::Weights weights = Isa::Expand(p, bits);
      for (size_t m = 0; m < kRows; ++m) dot[m] = Isa::Dot(dot[m], weights, q + m * ld_q + b * 8);
    };
    auto scale = [&](const typename Isa::IAcc* dot, size_t g) __attribute__((always_inline)) {
      for (size_t m = 0; m < kRows; ++m) acc[m] = Isa::ScaleAdd(acc[m], dot[m], w_scales[g] * x_scales[m * ld_scales + g]);
    };
    // A one-step group from one whole-word mask load.
    auto one_step = [&](size_t g, size_t b0, uint64_t keep_bits) __attribute__((always_inline)) {
      uint64_t bits;
      memcpy(&bits, mask + b0, sizeof(bits));
      if ((bits &= keep_bits) == 0) return;
      typename Isa::IAcc dot[kRows];
      for (size_t m = 0; m < kRows; ++m) dot[m] = Isa::IZero();
      step(dot, b0, bits);
      scale(dot, g);
    };
    size_t g = 0, b0 = 0;
    if (kOneStep && wide) {
      for (; g + 1 < w.groups; ++g, b0 += group_bytes) one_step(g, b0, group_keep);
      one_step(g++, b0, last_keep);
      b0 = row_bytes;
    }
    for (; b0 < row_bytes; ++g, b0 += group_bytes) {
      const size_t b1 = b0 + group_bytes < row_bytes ? b0 + group_bytes : row_bytes;
      typename Isa::IAcc dot[kRows];
      for (size_t m = 0; m < kRows; ++m) dot[m] = Isa::IZero();
      bool kept = false;
      for (size_t b = b0; b < b1; b += kStep) {
        const uint64_t bits = MaskBits<Isa, kStep>(mask + b, b1 - b, wide);
        if (bits == 0) continue;
        kept = true;
        step(dot, b, bits);
      }
      if (kept) scale(dot, g);
    }
    for (size_t m = 0; m < kRows; ++m) out[m * ld_out + n] = Isa::Sum(acc[m]);
  }
}

template <class Isa, ValueType T>
void QuantGemvAll(const RowsView& w, const QuantInput& in, size_t count, float* out, size_t ld_out, size_t n0,
                  size_t n1) {
  const bool one_step = w.group_size <= Isa::kLanes;
  ForRowBlocks<Isa::kRows>(count, [&](auto rows, size_t m) {
    const QuantInput block{in.q + m * in.ld_q, in.ld_q, in.scales + m * in.ld_scales, in.ld_scales};
    if (one_step)
      QuantGemvBlock<Isa, T, rows, true>(w, block, out + m * ld_out, ld_out, n0, n1);
    else
      QuantGemvBlock<Isa, T, rows, false>(w, block, out + m * ld_out, ld_out, n0, n1);
  });
}

// exp(x) for x in [-87.3, 88.3] (clamped there), Cephes' polynomial: relative error < 2e-7.
// Branch-free plain code, so that every ISA file's flags vectorize the loop that calls it
// (no -ffast-math: the rounding constant survives). A template only for linkage, see above.
template <class Isa>
inline float ExpClamped(float x) {
  x = x < -87.3f ? -87.3f : x > 88.3f ? 88.3f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 128)
  float scale;
  memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

template <class Isa>
void SwiGlu(const float* pairs, size_t count, float* out) {
  for (size_t j = 0; j < count; ++j) {
    const float gate = pairs[2 * j], up = pairs[2 * j + 1];
    out[j] = gate / (1.0f + ExpClamped<Isa>(-gate)) * up;
  }
}

template <class Isa>
constexpr QuantGemv MakeQuantGemv() {
  return QuantGemv{{QuantGemvAll<Isa, ValueType::kI8>, QuantGemvAll<Isa, ValueType::kI4>}};
}

// The table of one kernel file: rows are walked (GEMV, panel expansion) on GemvIsa, the GEMM's
// register tile runs on GemmIsa (they differ on AVX-512).
template <class GemvIsa, class GemmIsa>
constexpr KernelTable MakeTable(const char* name, const QuantGemv* quant) {
  return KernelTable{name,
                     2 * GemmIsa::W,
                     GemmIsa::kGemmNR,
                     {Gemv<GemvIsa, ValueType::kF32>, Gemv<GemvIsa, ValueType::kI8>, Gemv<GemvIsa, ValueType::kI4>},
                     {Gemm<GemvIsa, GemmIsa, ValueType::kF32>, Gemm<GemvIsa, GemmIsa, ValueType::kI8>,
                      Gemm<GemvIsa, GemmIsa, ValueType::kI4>},
                     quant,
                     SwiGlu<GemvIsa>};
}

}  // namespace sslc
