// Fused multi-tensor optimizer updates: one launch updates up to kMaxTensors parameters (blockIdx.y picks
// the tensor), in place, with the formulas of kernels/cpu/optim.cpp.
#include "kernels/cuda/common.cuh"

namespace titanax::kernels::cuda {
namespace {

template <class T>
__global__ void k_adam(TensorChunk c, T step, T inv_sqrt_bc2, T e, T decay, T l2, T b1, T b2, T ob1, T ob2,
                       bool decoupled) {
  const int t = blockIdx.y;
  T* p = static_cast<T*>(c.p[t]);
  const T* g = static_cast<const T*>(c.g[t]);
  T* m = static_cast<T*>(c.m[t]);
  T* v = static_cast<T*>(c.v[t]);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < c.n[t]; i += int64_t(gridDim.x) * blockDim.x) {
    T gi = g[i], pi = p[i];
    if (decoupled) pi *= decay;
    else gi += l2 * pi;
    const T mi = b1 * m[i] + ob1 * gi;
    const T vi = b2 * v[i] + ob2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = pi - step * mi / (sqrt(vi) * inv_sqrt_bc2 + e);
  }
}

template <class T>
__global__ void k_sgd(TensorChunk c, T lr, T mu, T wd, bool nesterov, bool first) {
  const int t = blockIdx.y;
  T* p = static_cast<T*>(c.p[t]);
  const T* g = static_cast<const T*>(c.g[t]);
  T* buf = static_cast<T*>(c.m[t]);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < c.n[t]; i += int64_t(gridDim.x) * blockDim.x) {
    T gi = g[i] + wd * p[i];
    if (buf) {
      const T b = first ? gi : mu * buf[i] + gi;
      buf[i] = b;
      gi = nesterov ? gi + mu * b : b;
    }
    p[i] -= lr * gi;
  }
}

dim3 chunk_grid(const TensorChunk& c) {
  int64_t mx = 1;
  for (int i = 0; i < c.count; ++i) mx = c.n[i] > mx ? c.n[i] : mx;
  unsigned x = grid_for(mx);
  if (x > 1024) x = 1024;
  return dim3(x, unsigned(c.count));
}

}  // namespace

int launch_adam(Dt t, const TensorChunk& c, double lr, double b1, double b2, double eps, double wd, int64_t step,
                bool decoupled, void* stream) {
  if (c.count == 0) return 0;
  const double bc1 = 1 - ::pow(b1, double(step)), bc2 = 1 - ::pow(b2, double(step));
  auto st = as_stream(stream);
  if (t == Dt::f32)
    k_adam<float><<<chunk_grid(c), kThreads, 0, st>>>(c, float(lr / bc1), float(1 / ::sqrt(bc2)), float(eps),
                                                      float(1 - lr * wd), float(wd), float(b1), float(b2),
                                                      float(1 - b1), float(1 - b2), decoupled);
  else if (t == Dt::f64)
    k_adam<double><<<chunk_grid(c), kThreads, 0, st>>>(c, lr / bc1, 1 / ::sqrt(bc2), eps, 1 - lr * wd, wd, b1, b2,
                                                       1 - b1, 1 - b2, decoupled);
  else return int(cudaErrorInvalidValue);
  return int(cudaGetLastError());
}

int launch_sgd(Dt t, const TensorChunk& c, double lr, double mu, double wd, bool nesterov, bool first, void* stream) {
  if (c.count == 0) return 0;
  auto st = as_stream(stream);
  if (t == Dt::f32)
    k_sgd<float><<<chunk_grid(c), kThreads, 0, st>>>(c, float(lr), float(mu), float(wd), nesterov, first);
  else if (t == Dt::f64)
    k_sgd<double><<<chunk_grid(c), kThreads, 0, st>>>(c, lr, mu, wd, nesterov, first);
  else return int(cudaErrorInvalidValue);
  return int(cudaGetLastError());
}

}  // namespace titanax::kernels::cuda
