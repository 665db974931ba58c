// Fused multi-tensor optimizer updates: one launch updates up to kMaxTensors parameters (blockIdx.y picks
// the tensor), in place, with the formulas of kernels/cpu/optim.cpp. The block bodies are in
// kernels/cuda/optim.cuh (over the GPU's primitives here).
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/optim.cuh"

namespace titanax::kernels::cuda {
namespace {

using namespace optim_kernels;

template <class T>
__global__ void k_adam(TensorChunk c, UpdateScalars s, const double* sd, T e, T l2, T b1, T b2, T ob1, T ob2,
                       bool decoupled) {
  adam<DevicePrim>(c, s, sd, e, l2, b1, b2, ob1, ob2, decoupled);
}

template <class T>
__global__ void k_sgd(TensorChunk c, UpdateScalars s, const double* sd, T mu, T wd, bool nesterov) {
  sgd<DevicePrim>(c, s, sd, mu, wd, nesterov);
}

template <class T>
__global__ void k_sum_squares(SquaresChunk c, double* partial) {
  sum_squares<DevicePrim, T>(c, partial);
}

__global__ void k_sum_partials(const double* partial, int64_t P, double* out) { sum_partials<DevicePrim>(partial, P, out); }

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

int launch_sum_squares(Dt t, const SquaresChunk& c, double* partial, void* stream) {
  if (c.count == 0) return 0;
  int64_t most = 1;  // chunks of the longest tensor (blocks stride over them beyond 1024)
  for (int i = 0; i < c.count; ++i) {
    const int64_t k = (c.n[i] + kSquaresChunk - 1) / kSquaresChunk;
    most = k > most ? k : most;
  }
  const dim3 grid(unsigned(most < 1024 ? most : 1024), unsigned(c.count));
  return dispatch_floating(t, [&](auto v) {
    k_sum_squares<decltype(v)><<<grid, kThreads, 0, as_stream(stream)>>>(c, partial);
  });
}

int launch_sum_partials(const double* partial, int64_t P, double* out, void* stream) {
  k_sum_partials<<<1, 1024, 0, as_stream(stream)>>>(partial, P, out);
  return int(cudaGetLastError());
}

int launch_set_update_scalars(double* dst, const UpdateScalars& s, void* stream) {
  k_set_update_scalars<<<1, 32, 0, as_stream(stream)>>>(dst, s);
  return int(cudaGetLastError());
}

}  // namespace titanax::kernels::cuda
