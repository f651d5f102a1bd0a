// Portable path: the reference for the SIMD ones (same walk, plain loops).
#include "kernels_impl.h"

namespace sslc {
namespace {

struct Scalar {
  static constexpr size_t W = 8;
  static constexpr size_t kGemvRows = 4;  // input rows per pass over the weights
  static constexpr size_t kGemmNR = 4;
  struct Vec {
    float v[W];
  };

  static Vec Zero() { return Set1(0.0f); }
  static Vec Set1(float x) {
    Vec r;
    for (float& e : r.v) e = x;
    return r;
  }
  static Vec Load(const float* p) {
    Vec r;
    memcpy(r.v, p, sizeof(r.v));
    return r;
  }
  static void Store(float* p, const Vec& a) { memcpy(p, a.v, sizeof(a.v)); }
  static Vec Add(Vec a, const Vec& b) {
    for (size_t i = 0; i < W; ++i) a.v[i] += b.v[i];
    return a;
  }
  static Vec Mul(Vec a, const Vec& b) {
    for (size_t i = 0; i < W; ++i) a.v[i] *= b.v[i];
    return a;
  }
  static Vec Fma(const Vec& a, const Vec& b, Vec c) {
    for (size_t i = 0; i < W; ++i) c.v[i] += a.v[i] * b.v[i];
    return c;
  }
  static float Hsum(const Vec& a) {
    float s = 0.0f;
    for (float e : a.v) s += e;
    return s;
  }

  static void Hsum8(const Vec* s, float* out) {
    for (size_t j = 0; j < 8; ++j) out[j] = Hsum(s[j]);
  }

  template <class Next>
  static Vec Expand(unsigned bits, Next&& next) {
    Vec r;
    for (size_t i = 0; i < W; ++i) r.v[i] = (bits >> i) & 1 ? next() : 0.0f;
    return r;
  }
  static Vec ExpandF32(const float*& p, unsigned bits) {
    return Expand(bits, [&] { return *p++; });
  }
  static Vec ExpandI8(const int8_t*& p, unsigned bits) {
    return Expand(bits, [&] { return static_cast<float>(*p++); });
  }
};

// activation_bits = 8: the same integer arithmetic, plainly.
struct ScalarQuant {
  static constexpr size_t kLanes = 64;
  static constexpr size_t kRows = 4;
  struct Weights {
    int8_t v[kLanes];
  };
  using IAcc = int32_t;
  using FAcc = float;

  static Weights Expand(const int8_t*& p, uint64_t bits) {
    Weights r;
    for (size_t i = 0; i < kLanes; ++i) r.v[i] = (bits >> i) & 1 ? *p++ : 0;
    return r;
  }
  static IAcc IZero() { return 0; }
  static IAcc Dot(IAcc acc, const Weights& w, const int8_t* q) {
    for (size_t i = 0; i < kLanes; ++i) acc += w.v[i] * q[i];
    return acc;
  }
  static FAcc FZero() { return 0.0f; }
  static FAcc ScaleAdd(FAcc acc, IAcc dot, float scale) { return acc + static_cast<float>(dot) * scale; }
  static float Sum(FAcc acc) { return acc; }
};

}  // namespace

constexpr QuantGemv kScalarQuantGemv = MakeQuantGemv<ScalarQuant>();
constexpr KernelTable kScalarKernels = MakeTable<Scalar, Scalar>("scalar", &kScalarQuantGemv);

}  // namespace sslc
