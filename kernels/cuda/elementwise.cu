// Elementwise kernels: strided N-d (broadcasting) binary / unary ops, clamp, where, casts.
// Contiguous same-shape f32 operands with 16-byte-aligned pointers take a float4 path.
#include <cmath>

#include "kernels/cuda/common.cuh"

namespace titanax::kernels::cuda {
namespace {

constexpr double kSqrt2OverPi = 0.7978845608028654;
constexpr double kInvSqrt2 = 0.7071067811865476;
constexpr double kInvSqrt2Pi = 0.3989422804014327;

template <class T> __device__ __forceinline__ T dexp(T v) { return exp(v); }
template <> __device__ __forceinline__ float dexp(float v) { return expf(v); }

template <class T>
struct BinaryF {
  int op;
  __device__ __forceinline__ T operator()(T x, T y) const {
    switch (op) {
      case ew::add: return T(x + y);
      case ew::sub: return T(x - y);
      case ew::mul: return T(x * y);
      case ew::div:
        if constexpr (std::is_integral_v<T>) return y == 0 ? T(0) : T(x / y);
        else return T(x / y);
      case ew::maximum: return (x >= y || x != x) ? x : y;
      case ew::minimum: return (x <= y || x != x) ? x : y;
      case ew::pow:
        if constexpr (std::is_same_v<T, float>) return powf(x, y);
        else return T(::pow(double(x), double(y)));
      case ew::relu_backward: return y > T(0) ? x : T(0);
      case ew::gelu_tanh_backward:
        if constexpr (std::is_floating_point_v<T>) {
          const T c = T(kSqrt2OverPi), k = T(0.044715);
          T u = c * (y + k * y * y * y);
          T t = tanh(u);
          return x * (T(0.5) * (T(1) + t) + T(0.5) * y * (T(1) - t * t) * c * (T(1) + T(3) * k * y * y));
        }
        return T(0);
      case ew::gelu_erf_backward:
        if constexpr (std::is_floating_point_v<T>)
          return x * (T(0.5) * (T(1) + erf(y * T(kInvSqrt2))) + y * T(kInvSqrt2Pi) * dexp(T(-0.5) * y * y));
        return T(0);
      default: return T(0);
    }
  }
};

template <class T>
struct CompareF {
  int op;
  __device__ __forceinline__ bool operator()(T x, T y) const {
    switch (op) {
      case ew::eq: return x == y;
      case ew::ne: return x != y;
      case ew::lt: return x < y;
      case ew::le: return x <= y;
      case ew::gt: return x > y;
      default: return x >= y;
    }
  }
};

template <class T>
struct UnaryF {
  int op;
  __device__ __forceinline__ T operator()(T v) const {
    switch (op) {
      case ew::neg: return T(-v);
      case ew::abs: return v < T(0) ? T(-v) : v;
      case ew::square: return T(v * v);
      case ew::sign: return T((v > T(0)) - (v < T(0)));
      case ew::relu: return v > T(0) ? v : T(0);
      default: break;
    }
    if constexpr (std::is_floating_point_v<T>) {
      switch (op) {
        case ew::exp: return dexp(v);
        case ew::log: return log(v);
        case ew::sqrt: return sqrt(v);
        case ew::rsqrt: return T(1) / sqrt(v);
        case ew::tanh: return tanh(v);
        case ew::sigmoid: {
          const T e = dexp(v >= T(0) ? -v : v);
          return v >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
        }
        case ew::reciprocal: return T(1) / v;
        case ew::gelu_tanh: return T(0.5) * v * (T(1) + tanh(T(kSqrt2OverPi) * (v + T(0.044715) * v * v * v)));
        case ew::gelu_erf: return T(0.5) * v * (T(1) + erf(v * T(kInvSqrt2)));
        default: break;
      }
    }
    return T(0);
  }
};

template <class TO, class TA, class TB, class F>
__global__ void k_binary(TO* out, const TA* a, const TB* b, Layout L, int64_t n, F f) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t o[3];
    offsets<3>(L, i, o);
    out[o[0]] = f(a[o[1]], b[o[2]]);
  }
}
template <class TO, class TA, class TB, class F>
__global__ void k_binary_flat(TO* out, const TA* a, const TB* b, int64_t n, F f) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = f(a[i], b[i]);
}
template <class F>
__global__ void k_binary_vec4(float* out, const float* a, const float* b, int64_t n, F f) {
  const int64_t n4 = n / 4;
  const float4* a4 = reinterpret_cast<const float4*>(a);
  const float4* b4 = reinterpret_cast<const float4*>(b);
  float4* o4 = reinterpret_cast<float4*>(out);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n4; i += stride) {
    const float4 x = a4[i], y = b4[i];
    o4[i] = make_float4(f(x.x, y.x), f(x.y, y.y), f(x.z, y.z), f(x.w, y.w));
  }
  for (int64_t i = n4 * 4 + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += stride) out[i] = f(a[i], b[i]);
}
template <class TO, class TA, class F>
__global__ void k_unary(TO* out, const TA* x, Layout L, int64_t n, F f) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t o[2];
    offsets<2>(L, i, o);
    out[o[0]] = f(x[o[1]]);
  }
}
template <class F>
__global__ void k_unary_vec4(float* out, const float* x, int64_t n, F f) {
  const int64_t n4 = n / 4;
  const float4* x4 = reinterpret_cast<const float4*>(x);
  float4* o4 = reinterpret_cast<float4*>(out);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n4; i += stride) {
    const float4 v = x4[i];
    o4[i] = make_float4(f(v.x), f(v.y), f(v.z), f(v.w));
  }
  for (int64_t i = n4 * 4 + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += stride) out[i] = f(x[i]);
}
template <class T>
__global__ void k_where(T* out, const bool* c, const T* a, const T* b, Layout L, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t o[4];
    offsets<4>(L, i, o);
    out[o[0]] = c[o[1]] ? a[o[2]] : b[o[3]];
  }
}

template <class D, class S>
struct CastF {
  __device__ __forceinline__ D operator()(S v) const {
    if constexpr (std::is_same_v<D, bool>) return v != S(0);
    else return static_cast<D>(v);
  }
};
template <class T>
struct ClampF {
  T lo, hi;
  __device__ __forceinline__ T operator()(T v) const { return v < lo ? lo : (v > hi ? hi : v); }
};

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <class T, class Body>
int dispatch_arith(Dt t, Body body) {
  switch (t) {
    case Dt::f32: body(float{}); break;
    case Dt::f64: body(double{}); break;
    case Dt::i32: body(int32_t{}); break;
    case Dt::i64: body(int64_t{}); break;
    default: return int(cudaErrorInvalidValue);
  }
  return int(cudaGetLastError());
}

template <class Body>
int dispatch_all(Dt t, Body body) {
  switch (t) {
    case Dt::f32: body(float{}); break;
    case Dt::f64: body(double{}); break;
    case Dt::i32: body(int32_t{}); break;
    case Dt::i64: body(int64_t{}); break;
    case Dt::u8: body(uint8_t{}); break;
    case Dt::b8: body(bool{}); break;
  }
  return int(cudaGetLastError());
}

}  // namespace

int launch_copy(Dt src, Dt dst, const void* s, void* d, const Layout& L, int64_t n, void* stream) {
  if (n == 0) return 0;
  return dispatch_all(src, [&](auto sv) {
    using S = decltype(sv);
    dispatch_all(dst, [&](auto dv) {
      using D = decltype(dv);
      k_unary<<<grid_for(n), kThreads, 0, as_stream(stream)>>>(static_cast<D*>(d), static_cast<const S*>(s), L, n,
                                                                 CastF<D, S>{});
    });
  });
}

int launch_binary(int op, Dt t, const void* a, const void* b, void* out, const Layout& L, int64_t n, bool contig,
                  void* stream) {
  if (n == 0) return 0;
  const bool cmp = op >= ew::eq && op <= ew::ge;
  auto st = as_stream(stream);
  if (cmp) {
    return dispatch_all(t, [&](auto v) {
      using T = decltype(v);
      if (contig)
        k_binary_flat<<<grid_for(n), kThreads, 0, st>>>(static_cast<bool*>(out), static_cast<const T*>(a),
                                                        static_cast<const T*>(b), n, CompareF<T>{op});
      else
        k_binary<<<grid_for(n), kThreads, 0, st>>>(static_cast<bool*>(out), static_cast<const T*>(a),
                                                   static_cast<const T*>(b), L, n, CompareF<T>{op});
    });
  }
  if (t == Dt::f32 && contig && aligned16(a) && aligned16(b) && aligned16(out)) {
    k_binary_vec4<<<grid_for((n + 3) / 4), kThreads, 0, st>>>(static_cast<float*>(out), static_cast<const float*>(a),
                                                              static_cast<const float*>(b), n, BinaryF<float>{op});
    return int(cudaGetLastError());
  }
  return dispatch_arith<void>(t, [&](auto v) {
    using T = decltype(v);
    if (contig)
      k_binary_flat<<<grid_for(n), kThreads, 0, st>>>(static_cast<T*>(out), static_cast<const T*>(a),
                                                      static_cast<const T*>(b), n, BinaryF<T>{op});
    else
      k_binary<<<grid_for(n), kThreads, 0, st>>>(static_cast<T*>(out), static_cast<const T*>(a),
                                                 static_cast<const T*>(b), L, n, BinaryF<T>{op});
  });
}

int launch_unary(int op, Dt t, const void* x, void* out, const Layout& L, int64_t n, bool contig, void* stream) {
  if (n == 0) return 0;
  auto st = as_stream(stream);
  if (t == Dt::f32 && contig && aligned16(x) && aligned16(out)) {
    k_unary_vec4<<<grid_for((n + 3) / 4), kThreads, 0, st>>>(static_cast<float*>(out), static_cast<const float*>(x),
                                                             n, UnaryF<float>{op});
    return int(cudaGetLastError());
  }
  return dispatch_arith<void>(t, [&](auto v) {
    using T = decltype(v);
    k_unary<<<grid_for(n), kThreads, 0, st>>>(static_cast<T*>(out), static_cast<const T*>(x), L, n, UnaryF<T>{op});
  });
}

int launch_clamp(Dt t, const void* x, void* out, double lo, double hi, const Layout& L, int64_t n, void* stream) {
  if (n == 0) return 0;
  return dispatch_arith<void>(t, [&](auto v) {
    using T = decltype(v);
    k_unary<<<grid_for(n), kThreads, 0, as_stream(stream)>>>(static_cast<T*>(out), static_cast<const T*>(x), L, n,
                                                              ClampF<T>{T(lo), T(hi)});
  });
}

int launch_where(Dt t, const void* c, const void* a, const void* b, void* out, const Layout& L, int64_t n,
                 void* stream) {
  if (n == 0) return 0;
  return dispatch_all(t, [&](auto v) {
    using T = decltype(v);
    k_where<<<grid_for(n), kThreads, 0, as_stream(stream)>>>(static_cast<T*>(out), static_cast<const bool*>(c),
                                                              static_cast<const T*>(a), static_cast<const T*>(b), L, n);
  });
}

}  // namespace titanax::kernels::cuda
