// The "sparse rows" layout (see sslc_export/sparse_rows.py for the normative description):
// a bit mask per row plus the kept values packed row-major, fp32, int8 or int4 (each run of
// NibbleRunColumns(group_size) columns starts on a byte boundary), with one float scale per
// (row, group) when quantized. This header validates untrusted tensors and builds the views the kernels walk.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace sslc {

enum class ValueType { kF32 = 0, kI8 = 1, kI4 = 2 };

// Largest group_size accepted (a group's floats are staged in a stack buffer of this size when inputs are quantized).
constexpr size_t kMaxGroupSize = 1024;

// int4 values are byte-aligned per run of whole groups: as many as fill 64 columns (one kernel
// step), one group when groups are wider.
inline size_t NibbleRunColumns(size_t group_size) { return (64 + group_size - 1) / group_size * group_size; }

// Bytes a kernel may read past its cursor: every read of packed values stays inside
// [row start, row end + ReadPad()), so rows close to the end of the buffer get a padded copy.
// int4 kernels unpack each run (its columns / 2 bytes, in 16-byte loads; 32 bytes for runs of 64 columns).
inline size_t ReadPad(ValueType type, size_t group_size) {
  return type == ValueType::kI4 ? 64 + NibbleRunColumns(group_size) / 2 : 64;
}

// What the kernels see of one matrix: plain pointers only (no std containers cross into the
// per-ISA translation units, see kernels_impl.h).
struct RowsView {
  size_t rows = 0;
  size_t cols = 0;          // logical width; bits at columns >= cols are zero
  size_t row_bytes = 0;     // mask bytes per row, ceil(cols / 8)
  const uint8_t* mask = nullptr;
  const uint8_t* const* row_values = nullptr;  // start of each row's packed values
  const float* scales = nullptr;               // [rows, groups] when quantized
  size_t groups = 0;                           // scales per row
  size_t group_size = 0;
};

// Raw tensor as the operator received it: element type, shape, data (owned by onnxruntime).
struct RawTensor {
  int elem_type = 0;  // ONNXTensorElementDataType
  std::vector<int64_t> shape;
  const void* data = nullptr;
};

// A validated matrix: keeps the row-start table and the padded tail copy the view points into.
class SparseRows {
 public:
  // Throws std::invalid_argument naming `what` ("W'" or "V") and the inconsistency.
  SparseRows(const char* what, ValueType type, size_t cols, size_t group_size, const RawTensor& mask,
             const RawTensor& values, const RawTensor* scales);
  SparseRows(const SparseRows&) = delete;
  SparseRows& operator=(const SparseRows&) = delete;

  const RowsView& view() const { return view_; }
  size_t value_bytes() const { return value_bytes_; }

 private:
  RowsView view_;
  size_t value_bytes_ = 0;
  std::vector<const uint8_t*> row_values_;
  std::vector<uint8_t> tail_;
};

}  // namespace sslc
