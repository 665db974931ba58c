#include "kernels/cpu/elementwise.h"

#include <cmath>

#include "kernels/cpu/dispatch.h"
#include "kernels/cpu/loops.h"
#include "kernels/cpu/vmath.h"

namespace titanax::kernels::cpu {

void unsupported_dtype(const char* kernel, DType t, const char* allowed) {
  throw DTypeError(std::string(kernel) + ": unsupported dtype on the CPU", allowed, std::string(dtype_name(t)),
                   "cast with astype(DType::f32)");
}

const char* binary_name(BinaryOp op) {
  static const char* names[] = {"add", "sub", "mul", "div", "maximum", "minimum", "pow", "eq", "ne", "lt", "le",
                                "gt", "ge", "relu_backward", "gelu_tanh_backward", "gelu_erf_backward"};
  return names[int(op)];
}
const char* unary_name(UnaryOp op) {
  static const char* names[] = {"neg", "exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "abs", "square",
                                "reciprocal", "relu", "gelu_tanh", "gelu_erf", "sign"};
  return names[int(op)];
}
bool is_comparison(BinaryOp op) { return op >= BinaryOp::eq && op <= BinaryOp::ge; }

namespace {

constexpr double kSqrt2OverPi = 0.7978845608028654;
constexpr double kInvSqrt2 = 0.7071067811865476;
constexpr double kInvSqrt2Pi = 0.3989422804014327;

template <class T>
[[gnu::always_inline]] inline T gelu_tanh_grad(T x) {
  const T c = T(kSqrt2OverPi), k = T(0.044715);
  T u = c * (x + k * x * x * x);
  T t = ftanh(u);
  return T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * c * (T(1) + T(3) * k * x * x);
}
template <class T>
inline T gelu_erf_grad(T x) {
  return T(0.5) * (T(1) + std::erf(x * T(kInvSqrt2))) + x * T(kInvSqrt2Pi) * std::exp(T(-0.5) * x * x);
}

// Runs f over (out, a, b) with fast paths for contiguous and scalar-broadcast inner runs.
template <class TO, class TA, class TB, class F>
void loop3(const Tensor& a, const Tensor& b, Tensor& out, F f) {
  Shape sa = broadcast_strides(a, out.shape()), sb = broadcast_strides(b, out.shape());
  auto L = make_layout<3>(out.shape(), {out.strides(), sa, sb}, {int64_t(sizeof(TO)), int64_t(sizeof(TA)), int64_t(sizeof(TB))});
  strided_loop<3>(L, {static_cast<char*>(out.raw_data()), static_cast<char*>(a.raw_data()), static_cast<char*>(b.raw_data())},
                  [&](int64_t n, char** p, const int64_t* s) {
                    TO* o = reinterpret_cast<TO*>(p[0]);
                    const TA* x = reinterpret_cast<const TA*>(p[1]);
                    const TB* y = reinterpret_cast<const TB*>(p[2]);
                    if (s[0] == sizeof(TO) && s[1] == sizeof(TA) && s[2] == sizeof(TB)) {
                      for (int64_t i = 0; i < n; ++i) o[i] = f(x[i], y[i]);
                    } else if (s[0] == sizeof(TO) && s[1] == sizeof(TA) && s[2] == 0) {
                      const TB yv = *y;
                      for (int64_t i = 0; i < n; ++i) o[i] = f(x[i], yv);
                    } else if (s[0] == sizeof(TO) && s[1] == 0 && s[2] == sizeof(TB)) {
                      const TA xv = *x;
                      for (int64_t i = 0; i < n; ++i) o[i] = f(xv, y[i]);
                    } else {
                      for (int64_t i = 0; i < n; ++i)
                        *reinterpret_cast<TO*>(p[0] + i * s[0]) =
                            f(*reinterpret_cast<const TA*>(p[1] + i * s[1]), *reinterpret_cast<const TB*>(p[2] + i * s[2]));
                    }
                  });
}

template <class TO, class TA, class F>
void loop2(const Tensor& a, Tensor& out, F f) {
  Shape sa = broadcast_strides(a, out.shape());
  auto L = make_layout<2>(out.shape(), {out.strides(), sa}, {int64_t(sizeof(TO)), int64_t(sizeof(TA))});
  strided_loop<2>(L, {static_cast<char*>(out.raw_data()), static_cast<char*>(a.raw_data())},
                  [&](int64_t n, char** p, const int64_t* s) {
                    TO* o = reinterpret_cast<TO*>(p[0]);
                    const TA* x = reinterpret_cast<const TA*>(p[1]);
                    if (s[0] == sizeof(TO) && s[1] == sizeof(TA)) {
                      for (int64_t i = 0; i < n; ++i) o[i] = f(x[i]);
                    } else if (s[0] == sizeof(TO) && s[1] == 0) {
                      const TO v = f(*x);
                      for (int64_t i = 0; i < n; ++i) o[i] = v;
                    } else {
                      for (int64_t i = 0; i < n; ++i)
                        *reinterpret_cast<TO*>(p[0] + i * s[0]) = f(*reinterpret_cast<const TA*>(p[1] + i * s[1]));
                    }
                  });
}

template <class T>
void arith(BinaryOp op, const Tensor& a, const Tensor& b, Tensor& out) {
  switch (op) {
    case BinaryOp::add: loop3<T, T, T>(a, b, out, [](T x, T y) { return T(x + y); }); break;
    case BinaryOp::sub: loop3<T, T, T>(a, b, out, [](T x, T y) { return T(x - y); }); break;
    case BinaryOp::mul: loop3<T, T, T>(a, b, out, [](T x, T y) { return T(x * y); }); break;
    case BinaryOp::div:
      if constexpr (std::is_integral_v<T>) {
        loop3<T, T, T>(a, b, out, [](T x, T y) { return y == 0 ? T(0) : T(x / y); });
      } else {
        loop3<T, T, T>(a, b, out, [](T x, T y) { return T(x / y); });
      }
      break;
    case BinaryOp::maximum: loop3<T, T, T>(a, b, out, [](T x, T y) { return x >= y || x != x ? x : y; }); break;
    case BinaryOp::minimum: loop3<T, T, T>(a, b, out, [](T x, T y) { return x <= y || x != x ? x : y; }); break;
    case BinaryOp::pow: loop3<T, T, T>(a, b, out, [](T x, T y) { return T(std::pow(x, y)); }); break;
    case BinaryOp::relu_backward: loop3<T, T, T>(a, b, out, [](T dy, T y) { return y > T(0) ? dy : T(0); }); break;
    case BinaryOp::gelu_tanh_backward:
      if constexpr (std::is_floating_point_v<T>) loop3<T, T, T>(a, b, out, [](T dy, T x) __attribute__((always_inline)) { return dy * gelu_tanh_grad(x); });
      else unsupported_dtype("gelu_backward", a.dtype(), "f32, f64");
      break;
    case BinaryOp::gelu_erf_backward:
      if constexpr (std::is_floating_point_v<T>) loop3<T, T, T>(a, b, out, [](T dy, T x) { return dy * gelu_erf_grad(x); });
      else unsupported_dtype("gelu_backward", a.dtype(), "f32, f64");
      break;
    default: break;
  }
}

template <class T>
void compare(BinaryOp op, const Tensor& a, const Tensor& b, Tensor& out) {
  switch (op) {
    case BinaryOp::eq: loop3<bool, T, T>(a, b, out, [](T x, T y) { return x == y; }); break;
    case BinaryOp::ne: loop3<bool, T, T>(a, b, out, [](T x, T y) { return x != y; }); break;
    case BinaryOp::lt: loop3<bool, T, T>(a, b, out, [](T x, T y) { return x < y; }); break;
    case BinaryOp::le: loop3<bool, T, T>(a, b, out, [](T x, T y) { return x <= y; }); break;
    case BinaryOp::gt: loop3<bool, T, T>(a, b, out, [](T x, T y) { return x > y; }); break;
    case BinaryOp::ge: loop3<bool, T, T>(a, b, out, [](T x, T y) { return x >= y; }); break;
    default: break;
  }
}

}  // namespace

void binary(BinaryOp op, const Tensor& a, const Tensor& b, Tensor& out) {
  if (is_comparison(op)) {
    if (a.dtype() == DType::bool_) return compare<bool>(op, a, b, out);
    if (a.dtype() == DType::u8) return compare<uint8_t>(op, a, b, out);
    TX_DISPATCH_ARITH(a.dtype(), binary_name(op), compare<scalar_t>(op, a, b, out));
    return;
  }
  TX_DISPATCH_ARITH(a.dtype(), binary_name(op), arith<scalar_t>(op, a, b, out));
}

void unary(UnaryOp op, const Tensor& x, Tensor& out) {
  const char* nm = unary_name(op);
  switch (op) {
    case UnaryOp::neg:
      TX_DISPATCH_ARITH(x.dtype(), nm, loop2<scalar_t, scalar_t>(x, out, [](scalar_t v) { return scalar_t(-v); }));
      return;
    case UnaryOp::abs:
      TX_DISPATCH_ARITH(x.dtype(), nm, loop2<scalar_t, scalar_t>(x, out, [](scalar_t v) { return v < 0 ? scalar_t(-v) : v; }));
      return;
    case UnaryOp::square:
      TX_DISPATCH_ARITH(x.dtype(), nm, loop2<scalar_t, scalar_t>(x, out, [](scalar_t v) { return scalar_t(v * v); }));
      return;
    case UnaryOp::sign:
      TX_DISPATCH_ARITH(x.dtype(), nm, loop2<scalar_t, scalar_t>(x, out, [](scalar_t v) { return scalar_t((v > 0) - (v < 0)); }));
      return;
    case UnaryOp::relu:
      TX_DISPATCH_ARITH(x.dtype(), nm, loop2<scalar_t, scalar_t>(x, out, [](scalar_t v) { return v > 0 ? v : scalar_t(0); }));
      return;
    default: break;
  }
  TX_DISPATCH_FLOAT(x.dtype(), nm, {
    using T = scalar_t;
    switch (op) {
      case UnaryOp::exp: loop2<T, T>(x, out, [](T v) __attribute__((always_inline)) { return fexp(v); }); break;
      case UnaryOp::log: loop2<T, T>(x, out, [](T v) { return std::log(v); }); break;
      case UnaryOp::sqrt: loop2<T, T>(x, out, [](T v) { return std::sqrt(v); }); break;
      case UnaryOp::rsqrt: loop2<T, T>(x, out, [](T v) { return T(1) / std::sqrt(v); }); break;
      case UnaryOp::tanh: loop2<T, T>(x, out, [](T v) __attribute__((always_inline)) { return ftanh(v); }); break;
      case UnaryOp::sigmoid:
        loop2<T, T>(x, out, [](T v) __attribute__((always_inline)) {
          const T e = fexp(v >= 0 ? -v : v);  // exp(-|v|) never overflows
          return v >= 0 ? T(1) / (T(1) + e) : e / (T(1) + e);
        });
        break;
      case UnaryOp::reciprocal: loop2<T, T>(x, out, [](T v) { return T(1) / v; }); break;
      case UnaryOp::gelu_tanh:
        loop2<T, T>(x, out, [](T v) __attribute__((always_inline)) {
          return T(0.5) * v * (T(1) + ftanh(T(kSqrt2OverPi) * (v + T(0.044715) * v * v * v)));
        });
        break;
      case UnaryOp::gelu_erf:
        loop2<T, T>(x, out, [](T v) { return T(0.5) * v * (T(1) + std::erf(v * T(kInvSqrt2))); });
        break;
      default: break;
    }
  });
}

void clamp(const Tensor& x, double lo, double hi, Tensor& out) {
  TX_DISPATCH_ARITH(x.dtype(), "clamp", {
    scalar_t l = scalar_t(lo), h = scalar_t(hi);
    loop2<scalar_t, scalar_t>(x, out, [l, h](scalar_t v) { return v < l ? l : (v > h ? h : v); });
  });
}

void where(const Tensor& cond, const Tensor& a, const Tensor& b, Tensor& out) {
  Shape sc = broadcast_strides(cond, out.shape()), sa = broadcast_strides(a, out.shape()),
        sb = broadcast_strides(b, out.shape());
  TX_DISPATCH_ALL(out.dtype(), "where", {
    using T = scalar_t;
    auto L = make_layout<4>(out.shape(), {out.strides(), sc, sa, sb},
                            {int64_t(sizeof(T)), 1, int64_t(sizeof(T)), int64_t(sizeof(T))});
    strided_loop<4>(L,
                    {static_cast<char*>(out.raw_data()), static_cast<char*>(cond.raw_data()),
                     static_cast<char*>(a.raw_data()), static_cast<char*>(b.raw_data())},
                    [](int64_t n, char** p, const int64_t* s) {
                      for (int64_t i = 0; i < n; ++i)
                        *reinterpret_cast<T*>(p[0] + i * s[0]) = *reinterpret_cast<const bool*>(p[1] + i * s[1])
                                                                      ? *reinterpret_cast<const T*>(p[2] + i * s[2])
                                                                      : *reinterpret_cast<const T*>(p[3] + i * s[3]);
                    });
  });
}

void copy_cast(const Tensor& src, Tensor& dst) {
  TX_DISPATCH_ALL(src.dtype(), "copy", {
    using S = scalar_t;
    TX_DISPATCH_ALL(dst.dtype(), "copy", {
      using D = scalar_t;
      loop2<D, S>(src, dst, [](S v) { return convert<D, S>(v); });
    });
  });
}

void fill(Tensor& dst, double value) {
  TX_DISPATCH_ALL(dst.dtype(), "fill", {
    const scalar_t v = convert<scalar_t, double>(value);
    auto L = make_layout<1>(dst.shape(), {dst.strides()}, {int64_t(sizeof(scalar_t))});
    strided_loop<1>(L, {static_cast<char*>(dst.raw_data())}, [v](int64_t n, char** p, const int64_t* s) {
      if (s[0] == sizeof(scalar_t)) {
        scalar_t* o = reinterpret_cast<scalar_t*>(p[0]);
        for (int64_t i = 0; i < n; ++i) o[i] = v;
      } else {
        for (int64_t i = 0; i < n; ++i) *reinterpret_cast<scalar_t*>(p[0] + i * s[0]) = v;
      }
    });
  });
}

}  // namespace titanax::kernels::cpu
