// Reductions over any set of axes and argmax (kernels/cuda/reduce.cuh holds the block bodies): the
// __global__ wrappers over the GPU's primitives (kernels/cuda/hw_policy.h) and the launchers.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/reduce.cuh"

namespace titanax::kernels::cuda {
namespace {
using namespace reduce_kernels;

template <class T, class A, int GROUP>
__global__ void k_reduce_rows(int op, const T* x, T* out, A* partial, ReduceLayout L, int64_t splits, int64_t chunk) {
  reduce_rows<DevicePrim, T, A, GROUP>(op, x, out, partial, L, splits, chunk);
}
template <class T, class A>
__global__ void k_reduce_cols(int op, const T* x, T* out, A* partial, ReduceLayout L, int64_t splits, int64_t chunk) {
  reduce_cols<DevicePrim, T, A>(op, x, out, partial, L, splits, chunk);
}
template <class T, class A>
__global__ void k_reduce_partials(int op, const A* partial, T* out, int64_t nout, int64_t splits) {
  reduce_partials<DevicePrim, T, A>(op, partial, out, nout, splits);
}

template <class T>
__global__ void k_argmax(const T* x, int64_t* out, ReduceLayout L) {
  argmax<DevicePrim>(x, out, L);
}

unsigned capped(int64_t n) { return unsigned(n < 1 ? 1 : n > 65535 ? 65535 : n); }

template <class T, class A>
void run(int op, const T* x, T* out, const ReduceLayout& L, const ReducePlan& P, A* partial, cudaStream_t st) {
  const int64_t items = L.nout * P.splits;
  switch (P.shape) {
    case ReducePlan::kRowsBlock:
      k_reduce_rows<T, A, kReduceThreads><<<grid_for(items, 1), kReduceThreads, 0, st>>>(op, x, out, partial, L, P.splits, P.chunk);
      break;
    case ReducePlan::kRowsWarp:
      k_reduce_rows<T, A, 32><<<grid_for(items, kReduceThreads / 32), kReduceThreads, 0, st>>>(op, x, out, partial, L, P.splits, P.chunk);
      break;
    case ReducePlan::kCols:
      k_reduce_cols<T, A><<<dim3(grid_for(L.nout, 32), capped(P.splits)), kReduceThreads, 0, st>>>(op, x, out, partial, L, P.splits,
                                                                                         P.chunk);
      break;
  }
  if (P.splits > 1)
    k_reduce_partials<T, A><<<grid_for(L.nout, kReduceThreads / 32), kReduceThreads, 0, st>>>(op, partial, out, L.nout, P.splits);
}

// Sums accumulate in double; max / min in T's compute type.
template <class T>
void run_op(int op, const void* x, void* out, const ReduceLayout& L, const ReducePlan& P, void* work, cudaStream_t st) {
  if (op == 0) run(op, static_cast<const T*>(x), static_cast<T*>(out), L, P, static_cast<double*>(work), st);
  else run(op, static_cast<const T*>(x), static_cast<T*>(out), L, P, static_cast<compute_t<T>*>(work), st);
}

}  // namespace

int launch_argmax(Dt t, const void* x, int64_t* out, const ReduceLayout& L, void* stream) {
  if (L.nout == 0) return 0;
  auto st = as_stream(stream);
  switch (t) {
    case Dt::f32: k_argmax<<<grid_for(L.nout), kThreads, 0, st>>>(static_cast<const float*>(x), out, L); break;
    case Dt::f64: k_argmax<<<grid_for(L.nout), kThreads, 0, st>>>(static_cast<const double*>(x), out, L); break;
    case Dt::i32: k_argmax<<<grid_for(L.nout), kThreads, 0, st>>>(static_cast<const int32_t*>(x), out, L); break;
    case Dt::i64: k_argmax<<<grid_for(L.nout), kThreads, 0, st>>>(static_cast<const int64_t*>(x), out, L); break;
    default: return int(cudaErrorInvalidValue);
  }
  return int(cudaGetLastError());
}

int launch_reduce(int op, Dt t, const void* x, void* out, const ReduceLayout& L, const ReducePlan& P, void* work,
                  void* stream) {
  if (L.nout == 0) return 0;
  return dispatch_floating(t, [&](auto v) { run_op<decltype(v)>(op, x, out, L, P, work, as_stream(stream)); });
}

}  // namespace titanax::kernels::cuda
