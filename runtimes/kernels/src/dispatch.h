// One entry per operation, per-ISA kernels picked at run time (MLAS style): every ISA file
// fills a KernelTable; Select() returns the one for this CPU or for $SSLC_KERNEL_ISA.
#pragma once

#include <cstddef>
#include <cstdint>

#include "sparse_rows.h"

namespace sslc {

// out[m * ld_out + n] = sum_c W[n][c] * in[m * ld_in + c] for n in [n0, n1), m < count.
// `in` rows are zero-padded to a multiple of 16 columns past W's width.
using GemvFn = void (*)(const RowsView& w, const float* in, size_t ld_in, size_t count, float* out, size_t ld_out,
                        size_t n0, size_t n1);

// The same product for many rows of `in`, given packed as PackInput() lays it out.
using GemmFn = void (*)(const RowsView& w, const float* packed, size_t packed_cols, size_t count, float* out,
                        size_t ld_out, size_t n0, size_t n1);

// activation_bits = 8: the input rows quantized per group of group_size columns (QuantizeRows).
struct QuantInput {
  const int8_t* q;  // [count, ld_q]: zero past the matrix width, readable 64 columns further
  size_t ld_q;
  const float* scales;  // [count, ld_scales]: x_scale per (row, group)
  size_t ld_scales;
};

// out[m * ld_out + n] = sum_g w_scale[n][g] * x_scale[m][g] * sum_{c in g} W_int[n][c] * q[m][c]
// (exact integer dot products, fp32 sums over groups) for n in [n0, n1), m < count.
using QuantGemvFn = void (*)(const RowsView& w, const QuantInput& in, size_t count, float* out, size_t ld_out,
                             size_t n0, size_t n1);

// activation_bits = 8 with many input rows, where the CPU has VNNI: the input rows quantized
// (QuantizeRows' definition) and laid out for an integer register tile, kQuantBlockRows rows per
// block; per block and group: the group's q as [group_size / 4][kQuantBlockRows rows][4 bytes],
// then per row the int32 sum of its q over the group, then per row x_scale (fp32).
constexpr size_t kQuantBlockRows = 32;
inline size_t QuantBlockBytes(size_t cols, size_t group_size) {
  return (cols + group_size - 1) / group_size * (group_size + 8) * kQuantBlockRows;
}
inline bool QuantGemmSupports(size_t group_size) { return group_size == 16 || group_size == 32 || group_size == 64; }
// Rows [0, count <= kQuantBlockRows) of `in` (width cols) into one block at dst, groups from first_group
// on (the earlier ones are left as they are: x's groups packed for V serve W' too).
using QuantPackFn = void (*)(const float* in, size_t ld_in, size_t count, size_t cols, size_t group_size,
                             size_t first_group, uint8_t* dst);
// The same products as QuantGemvFn, from blocks of QuantPackFn (block b at packed + b * block_bytes).
using QuantGemmFn = void (*)(const RowsView& w, const uint8_t* packed, size_t block_bytes, size_t count, float* out,
                             size_t ld_out, size_t n0, size_t n1);
struct QuantGemm {
  QuantPackFn pack;
  QuantGemmFn gemm[2];  // kI8, kI4
  size_t nr;            // rows of W per register tile (the unit for splitting work)
};

struct QuantGemv {
  QuantGemvFn gemv[2];  // kI8, kI4
  const QuantGemm* gemm = nullptr;  // where the integer GEMM exists (AVX-512 VNNI)
};
extern const QuantGemv kScalarQuantGemv;
extern const QuantGemv kAvx2QuantGemv;
extern const QuantGemv kAvx512VnniQuantGemv;  // needs AVX-512 VBMI, VBMI2 and VNNI besides F/BW/VL

// out[j] = silu(pairs[2j]) * pairs[2j + 1] for j < count: the SwiGLU of interleaved (gate, up) rows.
using SwiGluFn = void (*)(const float* pairs, size_t count, float* out);

struct KernelTable {
  const char* name;
  size_t gemm_mr;     // rows of `in` per packed block
  size_t gemm_nr;     // rows of W per register tile (a good unit for splitting work)
  GemvFn gemv[3];     // by ValueType
  GemmFn gemm[3];
  const QuantGemv* quant;  // integer-activation GEMV of this ISA (AVX-512 without VNNI: AVX2's)
  SwiGluFn swiglu;
};

extern const KernelTable kScalarKernels;
extern const KernelTable kAvx2Kernels;
extern const KernelTable kAvx512Kernels;
extern const KernelTable kAvx512NoVnniKernels;
extern const KernelTable kAvx512WideKernels;  // the same with the fp32 GEMV on 16 lanes
extern const KernelTable kAvx512NoVnniWideKernels;

// The table for this CPU, or the one $SSLC_KERNEL_ISA names (throws if unknown or unsupported).
const KernelTable& Select();

// Packed layout for GemmFn: blocks of mr rows of `in`; block b holds, for every column c <
// packed_cols, the mr values in[b*mr + i][c] contiguously (zero past `count` rows and past the
// matrix width). PackInput writes columns [col0, col0 + cols) of a zero-filled buffer.
inline size_t PackedColumns(size_t cols) { return (cols + 15) / 16 * 16; }
void PackInput(const float* in, size_t ld_in, size_t count, size_t cols, size_t mr, float* packed,
               size_t packed_cols, size_t col0);

// activation_bits = 8, per row and per group of group_size columns: x_scale = max|x| / 127 (fp32),
// q = x / x_scale rounded half to even, clamped to [-127, 127]; x_scale 0 gives q = 0. Writes
// x_scales; q unless null (zero from `cols` to ld_q); q * x_scale (fp32, row stride ld_in: in
// place is fine) unless `dequantized` is null, for the GEMM path.
void QuantizeRows(const float* in, size_t ld_in, size_t count, size_t cols, size_t group_size, int8_t* q,
                  size_t ld_q, float* scales, size_t ld_scales, float* dequantized);

// Per-thread scratch reused across calls (fresh large allocations cost page faults on every
// call). kCall: the calling thread's inputs for one node; kPanel: a GEMM task's dense weights.
// Defined outside the ISA files so no std container code is compiled with AVX-512 flags and
// then shared with the other paths by the linker.
// kOutput: a node's products before its activation. kSteps: a quantized GEMV task's per-step input terms, or
// the rows of one block being quantized for the integer GEMM.
// kRow: one row of int4 values unpacked to int8.
enum class Scratch { kCall = 0, kPanel = 1, kQuant = 2, kOutput = 3, kSteps = 4, kRow = 5 };
float* ThreadScratch(Scratch slot, size_t floats);

}  // namespace sslc
