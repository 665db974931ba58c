#include "kernels/cpu/elementwise.h"

#include "kernels/cpu/dispatch.h"
#include "kernels/cpu/elementwise_math.h"
#include "kernels/cpu/loops.h"

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

// Binary op OP over a, b into out (T -> T, comparisons T -> bool), the math of elementwise_math.h.
template <BinaryOp OP, class T>
void binary_loop(const Tensor& a, const Tensor& b, Tensor& out) {
  loop3<binary_result_t<OP, T>, T, T>(a, b, out, [](T x, T y) __attribute__((always_inline)) { return binary_fn<OP, T>(x, y); });
}

template <class T>
void arith(BinaryOp op, const Tensor& a, const Tensor& b, Tensor& out) {
  switch (op) {
    case BinaryOp::add: binary_loop<BinaryOp::add, T>(a, b, out); break;
    case BinaryOp::sub: binary_loop<BinaryOp::sub, T>(a, b, out); break;
    case BinaryOp::mul: binary_loop<BinaryOp::mul, T>(a, b, out); break;
    case BinaryOp::div: binary_loop<BinaryOp::div, T>(a, b, out); break;
    case BinaryOp::maximum: binary_loop<BinaryOp::maximum, T>(a, b, out); break;
    case BinaryOp::minimum: binary_loop<BinaryOp::minimum, T>(a, b, out); break;
    case BinaryOp::pow: binary_loop<BinaryOp::pow, T>(a, b, out); break;
    case BinaryOp::relu_backward: binary_loop<BinaryOp::relu_backward, T>(a, b, out); break;
    case BinaryOp::gelu_tanh_backward:
      if constexpr (std::is_floating_point_v<T>) binary_loop<BinaryOp::gelu_tanh_backward, T>(a, b, out);
      else unsupported_dtype("gelu_backward", a.dtype(), "f32, f64");
      break;
    case BinaryOp::gelu_erf_backward:
      if constexpr (std::is_floating_point_v<T>) binary_loop<BinaryOp::gelu_erf_backward, T>(a, b, out);
      else unsupported_dtype("gelu_backward", a.dtype(), "f32, f64");
      break;
    default: break;
  }
}

template <class T>
void compare(BinaryOp op, const Tensor& a, const Tensor& b, Tensor& out) {
  switch (op) {
    case BinaryOp::eq: binary_loop<BinaryOp::eq, T>(a, b, out); break;
    case BinaryOp::ne: binary_loop<BinaryOp::ne, T>(a, b, out); break;
    case BinaryOp::lt: binary_loop<BinaryOp::lt, T>(a, b, out); break;
    case BinaryOp::le: binary_loop<BinaryOp::le, T>(a, b, out); break;
    case BinaryOp::gt: binary_loop<BinaryOp::gt, T>(a, b, out); break;
    case BinaryOp::ge: binary_loop<BinaryOp::ge, T>(a, b, out); break;
    default: break;
  }
}

// Unary op OP over x into out, the math of elementwise_math.h.
template <UnaryOp OP, class T>
void unary_loop(const Tensor& x, Tensor& out) {
  loop2<T, T>(x, out, [](T v) __attribute__((always_inline)) { return unary_fn<OP, T>(v); });
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
    case UnaryOp::neg: TX_DISPATCH_ARITH(x.dtype(), nm, unary_loop<UnaryOp::neg, scalar_t>(x, out)); return;
    case UnaryOp::abs: TX_DISPATCH_ARITH(x.dtype(), nm, unary_loop<UnaryOp::abs, scalar_t>(x, out)); return;
    case UnaryOp::square: TX_DISPATCH_ARITH(x.dtype(), nm, unary_loop<UnaryOp::square, scalar_t>(x, out)); return;
    case UnaryOp::sign: TX_DISPATCH_ARITH(x.dtype(), nm, unary_loop<UnaryOp::sign, scalar_t>(x, out)); return;
    case UnaryOp::relu: TX_DISPATCH_ARITH(x.dtype(), nm, unary_loop<UnaryOp::relu, scalar_t>(x, out)); return;
    default: break;
  }
  TX_DISPATCH_FLOAT(x.dtype(), nm, {
    using T = scalar_t;
    switch (op) {
      case UnaryOp::exp: unary_loop<UnaryOp::exp, T>(x, out); break;
      case UnaryOp::log: unary_loop<UnaryOp::log, T>(x, out); break;
      case UnaryOp::sqrt: unary_loop<UnaryOp::sqrt, T>(x, out); break;
      case UnaryOp::rsqrt: unary_loop<UnaryOp::rsqrt, T>(x, out); break;
      case UnaryOp::tanh: unary_loop<UnaryOp::tanh, T>(x, out); break;
      case UnaryOp::sigmoid: unary_loop<UnaryOp::sigmoid, T>(x, out); break;
      case UnaryOp::reciprocal: unary_loop<UnaryOp::reciprocal, T>(x, out); break;
      case UnaryOp::gelu_tanh: unary_loop<UnaryOp::gelu_tanh, T>(x, out); break;
      case UnaryOp::gelu_erf: unary_loop<UnaryOp::gelu_erf, T>(x, out); break;
      default: break;
    }
  });
}

void clamp(const Tensor& x, double lo, double hi, Tensor& out) {
  TX_DISPATCH_ARITH(x.dtype(), "clamp", {
    scalar_t l = scalar_t(lo), h = scalar_t(hi);
    loop2<scalar_t, scalar_t>(x, out, [l, h](scalar_t v) { return clamp_fn(v, l, h); });
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
