// Operators of domain ai.sslc on the CPU execution provider:
//   SparseMatMul (fp32 values), SparseMatMulInt8, SparseMatMulInt4.
// y = [x, x·Vᵀ]·W'ᵀ with W' = [S | U] and V in the sparse-rows layout (sparse_rows.h).
// Attribute activation_bits (Int8/Int4 only): 32 (default) multiplies fp32 inputs with the
// dequantized weights; 8 quantizes the inputs of each product first, for every row count:
// x per group of V's columns for t = x·Vᵀ, then [x, t] per group of W''s columns, each group
// symmetric (x_scale = max|x|/127, q = round-half-even(x/x_scale) in [-127, 127], QuantizeRows),
// and y[m,n] = sum_g w_scale[n,g]·x_scale[m,g]·(sum_{c in g} W_int[n,c]·q[m,c]). Decode computes
// this with exact integer dot products; prefill multiplies the dequantized weights with the
// dequantized q·x_scale in fp32: the same value up to fp32 rounding.
// Attribute activation (any op): absent or "swiglu". With "swiglu" the rows of W' are pairs
// (gate, up) interleaved, and the output holds N/2 values: y[m,j] = silu(y'[m,2j])·y'[m,2j+1],
// the gated MLP's first half in one node (the export merges gate_proj and up_proj into it).
// Inputs 1.. are initializers: they are validated once, when the session creates the kernel,
// and a bad model is refused there with the node's name in the message. The kernels then read
// them in place (onnxruntime keeps initializers for the session's life); only the last rows'
// values are copied, padded, so that full-width vector loads never leave the buffer.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.h"
#include "sparse_rows.h"

namespace sslc {
namespace {

// Up to 3/4 of a GEMM input block of rows (12 on AVX2, 24 on AVX-512), the weights are streamed
// once per few rows (GEMV: one weight expansion feeds kGemvRows FMAs); beyond, they are
// expanded into dense panels for the register-blocked GEMM, whose blocks of input rows waste
// work on fewer rows. Measured on Zen 4, 576x576 fp32, one thread, GEMV vs GEMM: AVX2 12 rows
// 148 vs 156 us, 16 rows 262 vs ~156 us; AVX-512 16 rows 234 vs 254 us (GEMM at 17 to 32 rows).
// Work items per ParallelFor: enough to balance any usual thread count, few enough to be cheap.
constexpr size_t kMaxTasks = 64;
// A GEMV task walks at least this many mask bytes (x input rows), a few microseconds of work:
// smaller products (V's few rows in decode) run on the calling thread without waking the pool.
constexpr size_t kMinGemvTaskSteps = 4096;

size_t GemvUnit(const RowsView& w, size_t rows) {
  const size_t steps_per_row = w.row_bytes * rows + 1;
  return kMinGemvTaskSteps / steps_per_row > 8 ? kMinGemvTaskSteps / steps_per_row : 8;
}

const char* OpName(ValueType type) {
  return type == ValueType::kF32 ? "SparseMatMul" : type == ValueType::kI8 ? "SparseMatMulInt8" : "SparseMatMulInt4";
}

RawTensor ConstantInput(const Ort::ConstKernelInfo& info, size_t index) {
  int is_constant = 0;
  Ort::ConstValue value = info.GetTensorConstantInput(index, &is_constant);
  if (!is_constant)
    throw std::invalid_argument("input " + std::to_string(index) + " (" + info.GetInputName(index) +
                                ") must be a constant initializer");
  auto shape_info = value.GetTensorTypeAndShapeInfo();
  return RawTensor{static_cast<int>(shape_info.GetElementType()), shape_info.GetShape(), value.GetTensorRawData()};
}

// Runs f(task) for task in [0, tasks) on onnxruntime's intra-op pool.
template <class F>
void ParallelFor(const Ort::KernelContext& ctx, size_t tasks, F& f) {
  if (tasks <= 1) {
    if (tasks == 1) f(0);
    return;
  }
  ctx.ParallelFor([](void* data, size_t task) { (*static_cast<F*>(data))(task); }, tasks, 0, &f);
}

// Splits rows [0, rows) into at most kMaxTasks ranges, each a multiple of `unit` rows.
template <class F>
void ParallelRows(const Ort::KernelContext& ctx, size_t rows, size_t unit, F&& f) {
  if (rows == 0) return;
  const size_t units = (rows + unit - 1) / unit;
  const size_t per_task = (units + kMaxTasks - 1) / kMaxTasks * unit;
  auto task = [&](size_t t) {
    const size_t n0 = t * per_task, n1 = n0 + per_task < rows ? n0 + per_task : rows;
    f(n0, n1);
  };
  ParallelFor(ctx, (rows + per_task - 1) / per_task, task);
}

class SparseMatMulKernel {
 public:
  SparseMatMulKernel(ValueType type, const OrtKernelInfo* kernel_info) : type_(type), table_(&Select()) {
    Ort::ConstKernelInfo info(kernel_info);
    const bool quantized = type != ValueType::kF32;
    const size_t expected_inputs = quantized ? 7 : 5;
    if (info.GetInputCount() != expected_inputs)
      throw std::invalid_argument("expects " + std::to_string(expected_inputs) + " inputs, got " +
                                  std::to_string(info.GetInputCount()));
    const int64_t in_features = info.GetAttribute<int64_t>("in_features");
    if (in_features <= 0) throw std::invalid_argument("attribute in_features must be positive");
    int64_t group_size = 0, activation_bits = 32;
    Ort::Status has_bits(Ort::GetApi().KernelInfoGetAttribute_int64(kernel_info, "activation_bits", &activation_bits));
    if (!has_bits.IsOK()) activation_bits = 32;
    if (activation_bits != 32 && (!quantized || activation_bits != 8))
      throw std::invalid_argument(std::string("attribute activation_bits must be ") + (quantized ? "8 or 32" : "32") +
                                  ", got " + std::to_string(activation_bits));
    quantize_inputs_ = activation_bits == 8;
    std::string activation;
    try {
      activation = info.GetAttribute<std::string>("activation");
    } catch (const Ort::Exception&) {  // absent: none
    }
    if (!activation.empty() && activation != "swiglu")
      throw std::invalid_argument("attribute activation must be absent or \"swiglu\", got \"" + activation + "\"");
    swiglu_ = activation == "swiglu";
    if (quantized) {
      Ort::Status status(Ort::GetApi().KernelInfoGetAttribute_int64(kernel_info, "group_size", &group_size));
      if (!status.IsOK()) group_size = 64;
      if (group_size <= 0 || group_size % 16 || group_size > static_cast<int64_t>(kMaxGroupSize))
        throw std::invalid_argument("attribute group_size must be a positive multiple of 16 up to " +
                                    std::to_string(kMaxGroupSize) + ", got " + std::to_string(group_size));
    }
    std::vector<RawTensor> inputs;
    for (size_t i = 1; i < expected_inputs; ++i) inputs.push_back(ConstantInput(info, i));
    const size_t per_part = quantized ? 3 : 2;
    const RawTensor* main_part = inputs.data();
    const RawTensor* v_part = inputs.data() + per_part;
    k_ = static_cast<size_t>(in_features);
    if (v_part[0].shape.size() != 2 || v_part[0].shape[0] < 0)
      throw std::invalid_argument("V: mask must be 2-D [rank, ceil(in_features/8)]");
    r_ = static_cast<size_t>(v_part[0].shape[0]);
    const size_t g = static_cast<size_t>(group_size);
    v_ = std::make_unique<SparseRows>("V", type, k_, g, v_part[0], v_part[1], quantized ? &v_part[2] : nullptr);
    w_ = std::make_unique<SparseRows>("W' = [S | U]", type, k_ + r_, g, main_part[0], main_part[1],
                                      quantized ? &main_part[2] : nullptr);
    n_ = w_->view().rows;
    // $SSLC_INT_GEMM=0 keeps prefill on the fp32 tile over fake-quantized inputs (for A/B and tests).
    const char* int_gemm = std::getenv("SSLC_INT_GEMM");
    if (quantize_inputs_ && table_->quant->gemm != nullptr && QuantGemmSupports(g) &&
        (int_gemm == nullptr || std::string(int_gemm) != "0"))
      quant_gemm_ = table_->quant->gemm;
    if (swiglu_ && n_ % 2)
      throw std::invalid_argument("activation swiglu needs (gate, up) row pairs, but W' has " + std::to_string(n_) +
                                  " rows");
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Ort::KernelContext ctx(context);
      Ort::ConstValue x = ctx.GetInput(0);
      auto x_info = x.GetTensorTypeAndShapeInfo();
      std::vector<int64_t> shape = x_info.GetShape();
      if (x_info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || shape.empty() ||
          shape.back() != static_cast<int64_t>(k_))
        return Ort::Status(("x must be float32 [..., " + std::to_string(k_) + "], got last dimension " +
                            (shape.empty() ? std::string("none") : std::to_string(shape.back())))
                               .c_str(),
                           ORT_INVALID_ARGUMENT)
            .release();
      const size_t rows = static_cast<size_t>(x_info.GetElementCount()) / (k_ ? k_ : 1);
      shape.back() = static_cast<int64_t>(swiglu_ ? n_ / 2 : n_);
      float* y = ctx.GetOutput(0, shape).GetTensorMutableData<float>();
      if (rows && n_) Run(ctx, x.GetTensorData<float>(), rows, y);
      return nullptr;
    } catch (const std::exception& e) {
      return Ort::Status(e.what(), ORT_RUNTIME_EXCEPTION).release();
    }
  }

 private:
  void Run(const Ort::KernelContext& ctx, const float* x, size_t rows, float* y) const {
    const size_t cols = k_ + r_, padded = PackedColumns(cols);
    const int t = static_cast<int>(type_);
    const RowsView &w = w_->view(), &v = v_->view();
    if (4 * rows <= 3 * table_->gemm_mr) {
      // Joined rows [x, t, 0...]: t is written in place by the V product.
      float* joined = ThreadScratch(Scratch::kCall, rows * padded);
      for (size_t m = 0; m < rows; ++m) {
        std::copy(x + m * k_, x + (m + 1) * k_, joined + m * padded);
        std::fill(joined + m * padded + k_, joined + (m + 1) * padded, 0.0f);
      }
      if (quantize_inputs_) return RunQuantGemv(ctx, joined, rows, y);
      const GemvFn gemv = table_->gemv[t];
      ParallelRows(ctx, r_, GemvUnit(v, rows),
                   [&](size_t n0, size_t n1) { gemv(v, joined, padded, rows, joined + k_, padded, n0, n1); });
      return OutputRows(ctx, rows, GemvUnit(w, rows), y, [&](float* out, size_t n0, size_t n1) {
        gemv(w, joined, padded, rows, out, n_, n0, n1);
      });
    }
    if (quant_gemm_ != nullptr) return RunQuantGemm(ctx, x, rows, y);
    // joined: [x, t] rows (stride cols); with activation_bits = 8 the packed copy holds the
    // inputs fake-quantized (q·x_scale), by V's groups for t and by W''s groups for y. Each block
    // of mr input rows is prepared by its own task: serial packing cost ~10 % at two threads.
    const size_t mr = table_->gemm_mr, blocks = (rows + mr - 1) / mr, packed_size = blocks * mr * padded;
    float* packed = ThreadScratch(Scratch::kCall, packed_size + rows * cols);
    float* joined = packed + packed_size;
    // Columns [c0, c1) of every block packed; `first`: the block is zeroed and x copied in first,
    // otherwise x is copied back only where quantization overwrote it.
    auto pack = [&](size_t c0, size_t c1, bool first) {
      auto block = [&](size_t b) {
        const size_t m0 = b * mr, count = rows - m0 < mr ? rows - m0 : mr;
        float* in = joined + m0 * cols;
        if (first) std::fill(packed + m0 * padded, packed + (m0 + mr) * padded, 0.0f);
        if (first || quantize_inputs_)  // W''s groups of x are quantized from x itself
          for (size_t m = 0; m < count; ++m) std::copy(x + (m0 + m) * k_, x + (m0 + m + 1) * k_, in + m * cols);
        size_t from = c0;
        if (quantize_inputs_) {  // columns [0, c1) fake-quantized in place, then all packed
          float* scales = ThreadScratch(Scratch::kQuant, count * w.groups);
          QuantizeRows(in, cols, count, c1, w.group_size, nullptr, 0, scales, w.groups, in);
          from = 0;
        }
        PackInput(in + from, cols, count, c1 - from, mr, packed + m0 * padded, padded, from);
      };
      ParallelFor(ctx, blocks, block);
    };
    pack(0, k_, true);
    const GemmFn gemm = table_->gemm[t];
    if (r_) {
      ParallelRows(ctx, r_, table_->gemm_nr,
                   [&](size_t n0, size_t n1) { gemm(v, packed, padded, rows, joined + k_, cols, n0, n1); });
      pack(k_, cols, false);
    }
    OutputRows(ctx, rows, table_->gemm_nr, y,
               [&](float* out, size_t n0, size_t n1) { gemm(w, packed, padded, rows, out, n_, n0, n1); });
  }

  // y = the products of W''s rows [n0, n1) (stride n_), `product(out, n0, n1)` on onnxruntime's
  // pool; with swiglu they go to a scratch first and each task combines its own (gate, up) pairs.
  template <class F>
  void OutputRows(const Ort::KernelContext& ctx, size_t rows, size_t unit, float* y, F&& product) const {
    if (!swiglu_) return ParallelRows(ctx, n_, unit, [&](size_t n0, size_t n1) { product(y, n0, n1); });
    float* full = ThreadScratch(Scratch::kOutput, rows * n_);
    const size_t half = n_ / 2;
    ParallelRows(ctx, n_, unit + unit % 2, [&](size_t n0, size_t n1) {  // even ranges: whole pairs
      product(full, n0, n1);
      for (size_t m = 0; m < rows; ++m) table_->swiglu(full + m * n_ + n0, (n1 - n0) / 2, y + m * half + n0 / 2);
    });
  }

  // activation_bits = 8, decode: V and W' as integer GEMVs over the quantized rows of joined.
  void RunQuantGemv(const Ort::KernelContext& ctx, float* joined, size_t rows, float* y) const {
    const size_t cols = k_ + r_, padded = PackedColumns(cols), ld_q = padded + 64, groups = w_->view().groups;
    float* scales = ThreadScratch(Scratch::kQuant, rows * groups + (rows * ld_q + 3) / 4);
    int8_t* q = reinterpret_cast<int8_t*>(scales + rows * groups);
    const QuantInput in{q, ld_q, scales, groups};
    const QuantGemvFn gemv = table_->quant->gemv[static_cast<int>(type_) - 1];
    const RowsView &w = w_->view(), &v = v_->view();
    if (r_) {
      QuantizeRows(joined, padded, rows, k_, v.group_size, q, ld_q, scales, groups, nullptr);
      ParallelRows(ctx, r_, GemvUnit(v, rows),
                   [&](size_t n0, size_t n1) { gemv(v, in, rows, joined + k_, padded, n0, n1); });
    }
    QuantizeRows(joined, padded, rows, cols, w.group_size, q, ld_q, scales, groups, nullptr);
    OutputRows(ctx, rows, GemvUnit(w, rows), y, [&](float* out, size_t n0, size_t n1) { gemv(w, in, rows, out, n_, n0, n1); });
  }

  // activation_bits = 8, many rows, where the CPU has an integer GEMM: t = x·Vᵀ from x quantized by V's groups,
  // then y from [x, t] quantized by W''s groups, each packed block by block on the pool.
  void RunQuantGemm(const Ort::KernelContext& ctx, const float* x, size_t rows, float* y) const {
    const size_t cols = k_ + r_, blocks = (rows + kQuantBlockRows - 1) / kQuantBlockRows;
    const RowsView &w = w_->view(), &v = v_->view();
    const size_t block_bytes =
        std::max(QuantBlockBytes(cols, w.group_size), r_ ? QuantBlockBytes(k_, v.group_size) : 0);
    float* joined = ThreadScratch(Scratch::kCall, rows * cols + (blocks * block_bytes + 3) / 4);
    uint8_t* packed = reinterpret_cast<uint8_t*>(joined + rows * cols);
    for (size_t m = 0; m < rows; ++m) std::copy(x + m * k_, x + (m + 1) * k_, joined + m * cols);
    auto pack = [&](size_t width, size_t first_group) {
      auto block = [&](size_t b) {
        const size_t m0 = b * kQuantBlockRows, count = rows - m0 < kQuantBlockRows ? rows - m0 : kQuantBlockRows;
        quant_gemm_->pack(joined + m0 * cols, cols, count, width, w.group_size, first_group, packed + b * block_bytes);
      };
      ParallelFor(ctx, blocks, block);
    };
    const QuantGemmFn gemm = quant_gemm_->gemm[static_cast<int>(type_) - 1];
    size_t x_groups = 0;  // groups of x alone, packed for V and the same for W' (one group_size for both)
    if (r_) {
      pack(k_, 0);
      ParallelRows(ctx, r_, quant_gemm_->nr,
                   [&](size_t n0, size_t n1) { gemm(v, packed, block_bytes, rows, joined + k_, cols, n0, n1); });
      x_groups = k_ / w.group_size;
    }
    pack(cols, x_groups);
    OutputRows(ctx, rows, quant_gemm_->nr, y,
               [&](float* out, size_t n0, size_t n1) { gemm(w, packed, block_bytes, rows, out, n_, n0, n1); });
  }

  ValueType type_;
  bool quantize_inputs_ = false;  // activation_bits = 8
  const QuantGemm* quant_gemm_ = nullptr;  // the integer GEMM for prefill, where this CPU and group size have one
  bool swiglu_ = false;           // activation = "swiglu"
  const KernelTable* table_;
  size_t k_ = 0, r_ = 0, n_ = 0;
  std::unique_ptr<SparseRows> w_, v_;
};

template <ValueType kType>
struct SparseMatMulOp : Ort::CustomOpBase<SparseMatMulOp<kType>, SparseMatMulKernel, true> {
  SparseMatMulOp() {
    this->CreateKernel = nullptr;
    this->KernelCompute = nullptr;
  }

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new SparseMatMulKernel(kType, info);
      return nullptr;
    } catch (const std::exception& e) {
      std::string node = "?";
      try {
        node = Ort::ConstKernelInfo(info).GetNodeName();
      } catch (const std::exception&) {
      }
      const std::string message = std::string(OpName(kType)) + " node '" + node + "': " + e.what();
      return api.CreateStatus(ORT_INVALID_GRAPH, message.c_str());
    }
  }

  // y: x's shape with the last dimension N (rows of the mask), for onnxruntime's graph passes.
  // An anonymous dimension of x comes here as -1, which would be set as a literal size: then the
  // output shape is left unknown.
  static OrtStatusPtr InferOutputShape(Ort::ShapeInferContext& ctx) {
    Ort::ShapeInferContext::Shape shape = ctx.GetInputShape(0);
    const Ort::ShapeInferContext::Shape& mask = ctx.GetInputShape(1);
    if (shape.empty() || mask.size() != 2)
      return Ort::Status("x must have a last dimension and mask two dimensions", ORT_INVALID_GRAPH).release();
    for (const auto& dim : shape)
      if (dim.IsInt() && dim.AsInt() < 0) return nullptr;
    shape.back() = mask[0];
    std::string activation;
    try {
      activation = ctx.GetAttrString("activation");
    } catch (const Ort::Exception&) {  // absent
    }
    if (activation == "swiglu") {
      if (!mask[0].IsInt()) return nullptr;
      shape.back() = Ort::ShapeInferContext::SymbolicInteger(mask[0].AsInt() / 2);
    }
    return ctx.SetOutputShape(0, shape).release();
  }

  const char* GetName() const { return OpName(kType); }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return kType == ValueType::kF32 ? 5 : 7; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    const size_t per_part = kType == ValueType::kF32 ? 2 : 3;
    if (index == 0) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    switch ((index - 1) % per_part) {
      case 0: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;  // mask
      case 1:                                              // values
        return kType == ValueType::kF32  ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
               : kType == ValueType::kI8 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8
                                         : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
      default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;  // scales
    }
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace
}  // namespace sslc

// Entry point for SessionOptions.register_custom_ops_library. The ops are built against the
// headers' API version (21); a newer onnxruntime serves that version too.
extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                          const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr)
    return api_base->GetApi(1)->CreateStatus(
        ORT_FAIL, ("libsslc_kernels needs onnxruntime API version " + std::to_string(ORT_API_VERSION) +
                   " or newer; this onnxruntime is " + api_base->GetVersionString())
                      .c_str());
  Ort::InitApi(api);
  static sslc::SparseMatMulOp<sslc::ValueType::kF32> f32_op;
  static sslc::SparseMatMulOp<sslc::ValueType::kI8> i8_op;
  static sslc::SparseMatMulOp<sslc::ValueType::kI4> i4_op;
  static std::once_flag once;
  static OrtCustomOpDomain* domain = nullptr;
  try {
    std::call_once(once, [&] {
      Ort::ThrowOnError(api->CreateCustomOpDomain("ai.sslc", &domain));
      for (OrtCustomOp* op : {static_cast<OrtCustomOp*>(&f32_op), static_cast<OrtCustomOp*>(&i8_op),
                              static_cast<OrtCustomOp*>(&i4_op)})
        Ort::ThrowOnError(api->CustomOpDomain_Add(domain, op));
    });
    return api->AddCustomOpDomain(options, domain);
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  }
}
