// One entry per operation, per-ISA kernels picked at run time (MLAS style): every ISA file
// fills a KernelTable; Select() returns the one for this CPU or for $SSLC_KERNEL_ISA.
#pragma once

#include <cstddef>

#include "sparse_rows.h"

namespace sslc {

// out[m * ld_out + n] = sum_c W[n][c] * in[m * ld_in + c] for n in [n0, n1), m < count.
// `in` rows are zero-padded to a multiple of 16 columns past W's width.
using GemvFn = void (*)(const RowsView& w, const float* in, size_t ld_in, size_t count, float* out, size_t ld_out,
                        size_t n0, size_t n1);

// The same product for many rows of `in`, given packed as PackInput() lays it out.
using GemmFn = void (*)(const RowsView& w, const float* packed, size_t packed_cols, size_t count, float* out,
                        size_t ld_out, size_t n0, size_t n1);

struct KernelTable {
  const char* name;
  size_t gemm_mr;     // rows of `in` per packed block
  size_t gemm_nr;     // rows of W per register tile (a good unit for splitting work)
  GemvFn gemv[3];     // by ValueType
  GemmFn gemm[3];
};

extern const KernelTable kScalarKernels;
extern const KernelTable kAvx2Kernels;
extern const KernelTable kAvx512Kernels;

// The table for this CPU, or the one $SSLC_KERNEL_ISA names (throws if unknown or unsupported).
const KernelTable& Select();

// Packed layout for GemmFn: blocks of mr rows of `in`; block b holds, for every column c <
// packed_cols, the mr values in[b*mr + i][c] contiguously (zero past `count` rows and past the
// matrix width). PackInput writes columns [col0, col0 + cols) of a zero-filled buffer.
inline size_t PackedColumns(size_t cols) { return (cols + 15) / 16 * 16; }
void PackInput(const float* in, size_t ld_in, size_t count, size_t cols, size_t mr, float* packed,
               size_t packed_cols, size_t col0);

// Per-thread scratch reused across calls (fresh large allocations cost page faults on every
// call). kCall: the calling thread's inputs for one node; kPanel: a GEMM task's dense weights.
// Defined outside the ISA files so no std container code is compiled with AVX-512 flags and
// then shared with the other paths by the linker.
enum class Scratch { kCall = 0, kPanel = 1 };
float* ThreadScratch(Scratch slot, size_t floats);

}  // namespace sslc
