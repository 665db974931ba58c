// Fused multi-tensor optimizer updates: one launch updates up to kMaxTensors parameters (blockIdx.y picks
// the tensor), in place, with the formulas of kernels/cpu/optim.cpp.
#include "kernels/cuda/common.cuh"

namespace titanax::kernels::cuda {
namespace {

// The step's scalars: from device memory when given (a captured launch), else the launch's own copy.
__device__ inline const double* scalars_of(const UpdateScalars& s, const double* sd) { return sd ? sd : s.v; }

template <class T>
__global__ void k_adam(TensorChunk c, UpdateScalars s, const double* sd, T e, T l2, T b1, T b2, T ob1, T ob2,
                       bool decoupled) {
  const double* sc = scalars_of(s, sd);
  if (sc[0] == 0) return;  // a skipped step
  const T step = T(sc[1]), inv_sqrt_bc2 = T(sc[2]), decay = T(sc[3]);
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
__global__ void k_sgd(TensorChunk c, UpdateScalars s, const double* sd, T mu, T wd, bool nesterov) {
  const double* sc = scalars_of(s, sd);
  if (sc[0] == 0) return;
  const T lr = T(sc[1]);
  const bool first = sc[2] != 0;
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

__global__ void k_set_update_scalars(double* dst, UpdateScalars s) {
  if (threadIdx.x < UpdateScalars::size) dst[threadIdx.x] = s.v[threadIdx.x];
}

dim3 chunk_grid(const TensorChunk& c) {
  int64_t mx = 1;
  for (int i = 0; i < c.count; ++i) mx = c.n[i] > mx ? c.n[i] : mx;
  unsigned x = grid_for(mx);
  if (x > 1024) x = 1024;
  return dim3(x, unsigned(c.count));
}

}  // namespace

int launch_adam(Dt t, const TensorChunk& c, const UpdateScalars& s, const double* s_device, double b1, double b2,
                double eps, double wd, bool decoupled, void* stream) {
  if (c.count == 0) return 0;
  auto st = as_stream(stream);
  if (t == Dt::f32)
    k_adam<float><<<chunk_grid(c), kThreads, 0, st>>>(c, s, s_device, float(eps), float(wd), float(b1), float(b2),
                                                      float(1 - b1), float(1 - b2), decoupled);
  else if (t == Dt::f64)
    k_adam<double><<<chunk_grid(c), kThreads, 0, st>>>(c, s, s_device, eps, wd, b1, b2, 1 - b1, 1 - b2, decoupled);
  else return int(cudaErrorInvalidValue);
  return int(cudaGetLastError());
}

int launch_sgd(Dt t, const TensorChunk& c, const UpdateScalars& s, const double* s_device, double mu, double wd,
               bool nesterov, void* stream) {
  if (c.count == 0) return 0;
  auto st = as_stream(stream);
  if (t == Dt::f32)
    k_sgd<float><<<chunk_grid(c), kThreads, 0, st>>>(c, s, s_device, float(mu), float(wd), nesterov);
  else if (t == Dt::f64)
    k_sgd<double><<<chunk_grid(c), kThreads, 0, st>>>(c, s, s_device, mu, wd, nesterov);
  else return int(cudaErrorInvalidValue);
  return int(cudaGetLastError());
}

int launch_set_update_scalars(double* dst, const UpdateScalars& s, void* stream) {
  k_set_update_scalars<<<1, 32, 0, as_stream(stream)>>>(dst, s);
  return int(cudaGetLastError());
}

}  // namespace titanax::kernels::cuda
