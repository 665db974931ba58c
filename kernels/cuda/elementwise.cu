// Elementwise kernels: strided N-d (broadcasting) binary / unary ops, clamp, where, casts.
// Contiguous same-shape f32 operands with 16-byte-aligned pointers take a float4 path. The scalar math is
// kernels/cuda/ew_math.cuh (shared with the JIT's generated kernels); this file compiles with -fmad=false
// (cmake/cuda.cmake) so that its roundings are those of the generated kernels. Casts also take f16 and
// bf16 (through f32, rounding to nearest even: the CPU's conversions); arithmetic on them is done in f32
// by the ops (Op::run_in_f32).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <type_traits>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/ew_math.cuh"

namespace titanax::kernels::cuda {
namespace {

template <class T>
struct BinaryF {
  int op;
  __device__ __forceinline__ T operator()(T x, T y) const {
    switch (op) {
      case ew::add: return ewm::add(x, y);
      case ew::sub: return ewm::sub(x, y);
      case ew::mul: return ewm::mul(x, y);
      case ew::div: return ewm::div_(x, y);
      case ew::maximum: return ewm::maximum(x, y);
      case ew::minimum: return ewm::minimum(x, y);
      case ew::relu_backward: return ewm::relu_backward(x, y);
      default: break;
    }
    if constexpr (std::is_floating_point_v<T>) {
      switch (op) {
        case ew::pow: return ewm::pow_(x, y);
        case ew::gelu_tanh_backward: return ewm::gelu_tanh_backward(x, y);
        case ew::gelu_erf_backward: return ewm::gelu_erf_backward(x, y);
        default: break;
      }
    } else if (op == ew::pow) {
      return T(::pow(double(x), double(y)));
    }
    return T(0);
  }
};

template <class T>
struct CompareF {
  int op;
  __device__ __forceinline__ bool operator()(T x, T y) const {
    switch (op) {
      case ew::eq: return ewm::eq(x, y);
      case ew::ne: return ewm::ne(x, y);
      case ew::lt: return ewm::lt(x, y);
      case ew::le: return ewm::le(x, y);
      case ew::gt: return ewm::gt(x, y);
      default: return ewm::ge(x, y);
    }
  }
};

template <class T>
struct UnaryF {
  int op;
  __device__ __forceinline__ T operator()(T v) const {
    switch (op) {
      case ew::neg: return ewm::neg(v);
      case ew::abs: return ewm::abs_(v);
      case ew::square: return ewm::square(v);
      case ew::sign: return ewm::sign(v);
      case ew::relu: return ewm::relu(v);
      default: break;
    }
    if constexpr (std::is_floating_point_v<T>) {
      switch (op) {
        case ew::exp: return ewm::exp_(v);
        case ew::log: return ewm::log_(v);
        case ew::sqrt: return ewm::sqrt_(v);
        case ew::rsqrt: return ewm::rsqrt_(v);
        case ew::tanh: return ewm::tanh_(v);
        case ew::sigmoid: return ewm::sigmoid(v);
        case ew::reciprocal: return ewm::reciprocal(v);
        case ew::gelu_tanh: return ewm::gelu_tanh(v);
        case ew::gelu_erf: return ewm::gelu_erf(v);
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

template <class T> struct is16 : std::false_type {};
template <> struct is16<__half> : std::true_type {};
template <> struct is16<__nv_bfloat16> : std::true_type {};
__device__ __forceinline__ float widen16(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen16(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class D> __device__ __forceinline__ D narrow16(float f);
template <> __device__ __forceinline__ __half narrow16<__half>(float f) { return __float2half_rn(f); }
template <> __device__ __forceinline__ __nv_bfloat16 narrow16<__nv_bfloat16>(float f) { return __float2bfloat16_rn(f); }

// Conversion as astype; 16-bit floats go through f32 (as kernels/cpu/dispatch.h convert does).
template <class D, class S>
struct CastF {
  __device__ __forceinline__ D operator()(S v) const {
    if constexpr (is16<S>::value || is16<D>::value) {
      float f;
      if constexpr (is16<S>::value) f = widen16(v);
      else f = ewm::cast_to<float, S>::f(v);
      if constexpr (is16<D>::value) return narrow16<D>(f);
      else return ewm::cast_to<D, float>::f(f);
    } else {
      return ewm::cast_to<D, S>::f(v);
    }
  }
};
template <class T>
struct ClampF {
  T lo, hi;
  __device__ __forceinline__ T operator()(T v) const { return ewm::clamp(v, lo, hi); }
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
    default: return int(cudaErrorInvalidValue);
  }
  return int(cudaGetLastError());
}

// Every dtype including the 16-bit floats (copies and casts only).
template <class Body>
int dispatch_copy(Dt t, Body body) {
  switch (t) {
    case Dt::f16: body(__half{}); break;
    case Dt::bf16: body(__nv_bfloat16{}); break;
    default: return dispatch_all(t, body);
  }
  return int(cudaGetLastError());
}

}  // namespace

int launch_copy(Dt src, Dt dst, const void* s, void* d, const Layout& L, int64_t n, void* stream) {
  if (n == 0) return 0;
  int inner = 0;
  const int outer = dispatch_copy(src, [&](auto sv) {
    using S = decltype(sv);
    inner = dispatch_copy(dst, [&](auto dv) {
      using D = decltype(dv);
      k_unary<<<grid_for(n), kThreads, 0, as_stream(stream)>>>(static_cast<D*>(d), static_cast<const S*>(s), L, n,
                                                                 CastF<D, S>{});
    });
  });
  return outer ? outer : inner;
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
