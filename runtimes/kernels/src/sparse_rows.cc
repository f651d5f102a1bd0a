#include "sparse_rows.h"

#include <stdexcept>

#include "onnxruntime_c_api.h"

namespace sslc {
namespace {

[[noreturn]] void Fail(const char* what, const std::string& message) {
  throw std::invalid_argument(std::string(what) + ": " + message);
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

const char* TypeName(int elem_type) {
  switch (elem_type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    default: return "another type";
  }
}

void ExpectTensor(const char* what, const char* name, const RawTensor& t, int elem_type,
                  const std::vector<int64_t>& shape) {
  if (t.elem_type != elem_type)
    Fail(what, std::string(name) + " must be " + TypeName(elem_type) + ", got " + TypeName(t.elem_type));
  if (t.shape != shape)
    Fail(what, std::string(name) + " must have shape " + ShapeString(shape) + ", got " + ShapeString(t.shape));
}

}  // namespace

SparseRows::SparseRows(const char* what, ValueType type, size_t cols, size_t group_size, const RawTensor& mask,
                       const RawTensor& values, const RawTensor* scales) {
  if (mask.shape.size() != 2 || mask.shape[0] < 0)
    Fail(what, "mask must be 2-D [rows, ceil(cols/8)], got " + ShapeString(mask.shape));
  const size_t rows = static_cast<size_t>(mask.shape[0]);
  const size_t row_bytes = (cols + 7) / 8;
  ExpectTensor(what, "mask", mask, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
               {static_cast<int64_t>(rows), static_cast<int64_t>(row_bytes)});
  const bool quantized = type != ValueType::kF32;
  const size_t groups = quantized ? (cols + group_size - 1) / group_size : 0;
  if (quantized) {
    if (scales == nullptr) Fail(what, "scales are missing");
    ExpectTensor(what, "scales", *scales, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                 {static_cast<int64_t>(rows), static_cast<int64_t>(groups)});
  }

  // Row start offsets in bytes from popcounts; stray bits past `cols` are refused.
  const auto* m = static_cast<const uint8_t*>(mask.data);
  const uint8_t stray = cols % 8 ? static_cast<uint8_t>(0xFF << (cols % 8)) : 0;
  std::vector<size_t> starts(rows + 1, 0);
  for (size_t n = 0; n < rows; ++n) {
    const uint8_t* row = m + n * row_bytes;
    if (row_bytes && (row[row_bytes - 1] & stray))
      Fail(what, "mask row " + std::to_string(n) + " keeps columns past its width " + std::to_string(cols));
    size_t bytes = 0;
    if (type == ValueType::kI4) {
      const size_t run_bytes = NibbleRunColumns(group_size) / 8;  // mask bytes per run
      for (size_t b0 = 0; b0 < row_bytes; b0 += run_bytes) {
        size_t kept = 0;
        for (size_t b = b0; b < row_bytes && b < b0 + run_bytes; ++b) kept += __builtin_popcount(row[b]);
        bytes += (kept + 1) / 2;
      }
    } else {
      for (size_t b = 0; b < row_bytes; ++b) bytes += __builtin_popcount(row[b]);
      if (type == ValueType::kF32) bytes *= sizeof(float);
    }
    starts[n + 1] = starts[n] + bytes;
  }
  value_bytes_ = starts[rows];

  const int value_type = type == ValueType::kF32  ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
                         : type == ValueType::kI8 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8
                                                  : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  const size_t elements = type == ValueType::kF32 ? value_bytes_ / sizeof(float) : value_bytes_;
  if (values.shape.size() != 1 || values.elem_type != value_type || values.shape[0] != static_cast<int64_t>(elements))
    Fail(what, std::string("values must be 1-D ") + TypeName(value_type) + " with " + std::to_string(elements) +
                   (type == ValueType::kI4 ? " bytes (the kept nibbles, each run of groups byte-aligned)"
                                           : " elements (the mask's popcount)") +
                   ", got " + TypeName(values.elem_type) + " " + ShapeString(values.shape));

  // Rows whose reads could run past the end of the buffer point into a padded copy of the tail.
  const size_t pad = ReadPad(type, group_size);
  size_t tail_row = rows;
  while (tail_row > 0 && starts[tail_row] + pad > value_bytes_) --tail_row;
  const auto* base = static_cast<const uint8_t*>(values.data);
  tail_.assign(value_bytes_ - starts[tail_row] + pad, 0);
  if (value_bytes_ > starts[tail_row]) std::copy(base + starts[tail_row], base + value_bytes_, tail_.begin());
  row_values_.resize(rows);
  for (size_t n = 0; n < rows; ++n)
    row_values_[n] = n < tail_row ? base + starts[n] : tail_.data() + (starts[n] - starts[tail_row]);

  view_.rows = rows;
  view_.cols = cols;
  view_.row_bytes = row_bytes;
  view_.mask = m;
  view_.row_values = row_values_.data();
  view_.scales = quantized ? static_cast<const float*>(scales->data) : nullptr;
  view_.groups = groups;
  view_.group_size = group_size;
}

}  // namespace sslc
