// Elementwise kernels: strided N-d (broadcasting) binary / unary ops, clamp, where, casts. The bodies and
// functors are kernels/cuda/elementwise.cuh (over the hardware-primitive policy, so tests/emulated/ runs
// them too); this file holds the __global__ wrappers and the launchers, and compiles with -fmad=false
// (cmake/cuda.cmake) so that its roundings are those of the JIT's generated kernels.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/elementwise.cuh"

namespace titanax::kernels::cuda {
namespace {

using namespace elementwise_kernels;

template <class TO, class TA, class TB, class F>
__global__ void k_binary(TO* out, const TA* a, const TB* b, Layout L, int64_t n, F f) {
  binary<DevicePrim>(out, a, b, L, n, f);
}
template <class TO, class TA, class TB, class F>
__global__ void k_binary_flat(TO* out, const TA* a, const TB* b, int64_t n, F f) {
  binary_flat<DevicePrim>(out, a, b, n, f);
}
template <class T, class F>
__global__ void k_binary_packed(T* out, const T* a, const T* b, int64_t n, F f) {
  binary_packed<DevicePrim>(out, a, b, n, f);
}
template <class TO, class TA, class F>
__global__ void k_unary(TO* out, const TA* x, Layout L, int64_t n, F f) {
  unary<DevicePrim>(out, x, L, n, f);
}
template <class T, class F>
__global__ void k_unary_packed(T* out, const T* x, int64_t n, F f) {
  unary_packed<DevicePrim>(out, x, n, f);
}
template <class T>
__global__ void k_where(T* out, const bool* c, const T* a, const T* b, Layout L, int64_t n) {
  where<DevicePrim>(out, c, a, b, L, n);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// f(x) over layout L: the packed body for contiguous aligned f32 / f16 / bf16, else the strided one.
template <class T, class F>
void unary_any(T* out, const T* x, const Layout& L, int64_t n, bool contig, F f, cudaStream_t st) {
  if constexpr (kPackable<T>) {
    if (contig && aligned16(x) && aligned16(out)) {
      k_unary_packed<<<grid_for((n + Pack16<T>::n - 1) / Pack16<T>::n), kThreads, 0, st>>>(out, x, n, f);
      return;
    }
  }
  k_unary<<<grid_for(n), kThreads, 0, st>>>(out, x, L, n, f);
}

}  // namespace

int launch_copy(Dt src, Dt dst, const void* s, void* d, const Layout& L, int64_t n, void* stream) {
  if (n == 0) return 0;
  int inner = 0;
  const int outer = dispatch_all(src, [&](auto sv) {
    using S = decltype(sv);
    inner = dispatch_all(dst, [&](auto dv) {
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
      const auto f = widened<T>(CompareF<compute_t<T>>{op});
      if (contig)
        k_binary_flat<<<grid_for(n), kThreads, 0, st>>>(static_cast<bool*>(out), static_cast<const T*>(a),
                                                        static_cast<const T*>(b), n, f);
      else
        k_binary<<<grid_for(n), kThreads, 0, st>>>(static_cast<bool*>(out), static_cast<const T*>(a),
                                                   static_cast<const T*>(b), L, n, f);
    });
  }
  return dispatch_arith(t, [&](auto v) {
    using T = decltype(v);
    const auto f = widened<T>(BinaryF<compute_t<T>>{op});
    T* o = static_cast<T*>(out);
    const T *pa = static_cast<const T*>(a), *pb = static_cast<const T*>(b);
    if constexpr (kPackable<T>) {
      if (contig && aligned16(pa) && aligned16(pb) && aligned16(o)) {
        k_binary_packed<<<grid_for((n + Pack16<T>::n - 1) / Pack16<T>::n), kThreads, 0, st>>>(o, pa, pb, n, f);
        return;
      }
    }
    if (contig) k_binary_flat<<<grid_for(n), kThreads, 0, st>>>(o, pa, pb, n, f);
    else k_binary<<<grid_for(n), kThreads, 0, st>>>(o, pa, pb, L, n, f);
  });
}

int launch_unary(int op, Dt t, const void* x, void* out, const Layout& L, int64_t n, bool contig, void* stream) {
  if (n == 0) return 0;
  return dispatch_arith(t, [&](auto v) {
    using T = decltype(v);
    unary_any(static_cast<T*>(out), static_cast<const T*>(x), L, n, contig, widened<T>(UnaryF<compute_t<T>>{op}),
              as_stream(stream));
  });
}

int launch_clamp(Dt t, const void* x, void* out, double lo, double hi, const Layout& L, int64_t n, bool contig,
                 void* stream) {
  if (n == 0) return 0;
  return dispatch_arith(t, [&](auto v) {
    using T = decltype(v);
    using C = compute_t<T>;
    unary_any(static_cast<T*>(out), static_cast<const T*>(x), L, n, contig, widened<T>(ClampF<C>{C(lo), C(hi)}),
              as_stream(stream));
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
