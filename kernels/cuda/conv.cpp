// Convolution through cuDNN and the max-pooling wrappers (kernels/cuda/kernels.h). cuDNN's legacy
// convolution API (cudnnConvolutionForward / BackwardData / BackwardFilter, still in cuDNN 9): plain
// NCHW tensor and KCRS filter descriptors, cross-correlation, dilation 1. Algorithms: the first of
// cuDNN's heuristic ranking (cudnnGet*Algorithm_v7) that is deterministic and uses the requested math
// (CUDNN_FMA_MATH: full FP32; CUDNN_DEFAULT_MATH when TF32 is allowed), cached per geometry, dtype, math
// and device; its workspace comes from the caching allocator for the call.
#include <cudnn.h>

#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

#include "core/allocator.h"
#include "core/cuda_runtime.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/kernels.h"
#include "kernels/cuda/launch.h"

namespace titanax::kernels::cuda {
namespace {

[[noreturn]] void throw_cudnn_error(cudnnStatus_t st, const char* call, const char* file, int line) {
  throw DeviceError(std::string("cuDNN call failed: ") + call, "CUDNN_STATUS_SUCCESS",
                    std::string(cudnnGetErrorString(st)) + " (status " + std::to_string(int(st)) + ") at " + file + ":" +
                        std::to_string(line),
                    "check that the cuDNN library matches the CUDA driver (cudnnGetVersion)");
}
#define TX_CUDNN_CHECK(call)                                                   \
  do {                                                                         \
    const cudnnStatus_t tx_st_ = (call);                                       \
    if (tx_st_ != CUDNN_STATUS_SUCCESS) throw_cudnn_error(tx_st_, #call, __FILE__, __LINE__); \
  } while (0)

cudnnHandle_t handle(int device) {
  static std::mutex mu;
  static std::vector<cudnnHandle_t> handles;  // leaked at exit on purpose (driver teardown order)
  std::lock_guard<std::mutex> g(mu);
  if (handles.size() <= size_t(device)) handles.resize(size_t(device) + 1, nullptr);
  if (!handles[size_t(device)]) TX_CUDNN_CHECK(cudnnCreate(&handles[size_t(device)]));
  return handles[size_t(device)];
}

template <class T, cudnnStatus_t (*Destroy)(T)>
struct Owned {
  T h = nullptr;
  Owned() = default;
  Owned(const Owned&) = delete;
  Owned& operator=(const Owned&) = delete;
  ~Owned() {
    if (h) Destroy(h);
  }
};

// The descriptors of one convolution: x [N, C, H, W], w [O, C, KH, KW], y [N, O, OH, OW].
struct ConvDescs {
  Owned<cudnnTensorDescriptor_t, cudnnDestroyTensorDescriptor> x, y;
  Owned<cudnnFilterDescriptor_t, cudnnDestroyFilterDescriptor> w;
  Owned<cudnnConvolutionDescriptor_t, cudnnDestroyConvolutionDescriptor> conv;
  cudnnMathType_t math = CUDNN_FMA_MATH;
  ConvDescs(const cpu::Conv2dGeom& g, DType dt) {
    const cudnnDataType_t t = dt == DType::f64 ? CUDNN_DATA_DOUBLE : CUDNN_DATA_FLOAT;
    TX_CUDNN_CHECK(cudnnCreateTensorDescriptor(&x.h));
    TX_CUDNN_CHECK(cudnnCreateTensorDescriptor(&y.h));
    TX_CUDNN_CHECK(cudnnCreateFilterDescriptor(&w.h));
    TX_CUDNN_CHECK(cudnnCreateConvolutionDescriptor(&conv.h));
    TX_CUDNN_CHECK(cudnnSetTensor4dDescriptor(x.h, CUDNN_TENSOR_NCHW, t, int(g.N), int(g.C), int(g.H), int(g.W)));
    TX_CUDNN_CHECK(cudnnSetTensor4dDescriptor(y.h, CUDNN_TENSOR_NCHW, t, int(g.N), int(g.O), int(g.OH()), int(g.OW())));
    TX_CUDNN_CHECK(cudnnSetFilter4dDescriptor(w.h, t, CUDNN_TENSOR_NCHW, int(g.O), int(g.C), int(g.KH), int(g.KW)));
    TX_CUDNN_CHECK(cudnnSetConvolution2dDescriptor(conv.h, int(g.PH), int(g.PW), int(g.SH), int(g.SW), 1, 1,
                                                   CUDNN_CROSS_CORRELATION, t));
    math = dt == DType::f32 && allow_tf32() ? CUDNN_DEFAULT_MATH : CUDNN_FMA_MATH;
    TX_CUDNN_CHECK(cudnnSetConvolutionMathType(conv.h, math));
  }
};

enum class Pass { forward, backward_data, backward_filter };

// (pass, device, dtype, math, geometry) -> (algorithm, workspace bytes, math type).
using AlgoKey = std::tuple<int, int, int, int, std::vector<int64_t>>;
struct Algo {
  int algo = 0;
  size_t workspace = 0;
  cudnnMathType_t math = CUDNN_FMA_MATH;
};

template <class Perf>
Algo pick(const Perf* perf, int n, cudnnMathType_t want, const char* pass) {
  for (int i = 0; i < n; ++i)
    if (perf[i].status == CUDNN_STATUS_SUCCESS && perf[i].determinism == CUDNN_DETERMINISTIC &&
        (want == CUDNN_DEFAULT_MATH || perf[i].mathType == want))
      return {int(perf[i].algo), perf[i].memory, perf[i].mathType};
  throw DeviceError(std::string("cuDNN has no deterministic algorithm for this convolution ") + pass,
                    "a deterministic algorithm with the requested math type", std::to_string(n) + " candidates, none usable",
                    "try another kernel size, stride or padding, or run the convolution on the CPU");
}

Algo algorithm(Pass pass, int device, DType dt, const cpu::Conv2dGeom& g, const ConvDescs& d) {
  static std::mutex mu;
  static std::map<AlgoKey, Algo> cache;
  AlgoKey key{int(pass), device, int(dt), int(d.math), {g.N, g.C, g.H, g.W, g.O, g.KH, g.KW, g.SH, g.SW, g.PH, g.PW}};
  {
    std::lock_guard<std::mutex> l(mu);
    if (auto it = cache.find(key); it != cache.end()) return it->second;
  }
  cudnnHandle_t h = handle(device);
  Algo a;
  int n = 0;
  if (pass == Pass::forward) {
    cudnnConvolutionFwdAlgoPerf_t perf[CUDNN_CONVOLUTION_FWD_ALGO_COUNT];
    TX_CUDNN_CHECK(cudnnGetConvolutionForwardAlgorithm_v7(h, d.x.h, d.w.h, d.conv.h, d.y.h, CUDNN_CONVOLUTION_FWD_ALGO_COUNT, &n, perf));
    a = pick(perf, n, d.math, "forward");
  } else if (pass == Pass::backward_data) {
    cudnnConvolutionBwdDataAlgoPerf_t perf[CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT];
    TX_CUDNN_CHECK(cudnnGetConvolutionBackwardDataAlgorithm_v7(h, d.w.h, d.y.h, d.conv.h, d.x.h,
                                                               CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT, &n, perf));
    a = pick(perf, n, d.math, "backward (data)");
  } else {
    cudnnConvolutionBwdFilterAlgoPerf_t perf[CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT];
    TX_CUDNN_CHECK(cudnnGetConvolutionBackwardFilterAlgorithm_v7(h, d.x.h, d.y.h, d.conv.h, d.w.h,
                                                                 CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT, &n, perf));
    a = pick(perf, n, d.math, "backward (filter)");
  }
  std::lock_guard<std::mutex> l(mu);
  cache[key] = a;
  return a;
}

// Workspace bytes from the caching allocator for one call (stream-ordered: freed after queuing).
struct Workspace {
  Allocator& alloc;
  void* p = nullptr;
  size_t n = 0;
  Workspace(int device, size_t bytes) : alloc(cuda_allocator(device)), n(bytes) {
    if (n) p = alloc.allocate(n);
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  ~Workspace() {
    if (p) alloc.deallocate(p, n);
  }
};

// alpha = 1, beta = 0 in the tensors' precision (cuDNN reads doubles for double data, floats otherwise).
struct Scalars {
  double d1 = 1, d0 = 0;
  float f1 = 1, f0 = 0;
  const void* one(DType t) const { return t == DType::f64 ? static_cast<const void*>(&d1) : &f1; }
  const void* zero(DType t) const { return t == DType::f64 ? static_cast<const void*>(&d0) : &f0; }
};

cudnnHandle_t bound_handle(const Tensor& t) {
  cudnnHandle_t h = handle(t.device().index);
  TX_CUDNN_CHECK(cudnnSetStream(h, static_cast<cudaStream_t>(cuda_rt::current_stream(t.device().index))));
  return h;
}

void check_float(const Tensor& t, const char* what) {
  if (t.dtype() != DType::f32 && t.dtype() != DType::f64)
    throw DTypeError(std::string(what) + ": unsupported dtype on CUDA", "f32, f64", std::string(dtype_name(t.dtype())),
                     "cast with astype(DType::f32)");
}

Pool2dParams params(const cpu::Pool2dGeom& g) {
  return {g.N, g.C, g.H, g.W, g.KH, g.KW, g.SH, g.SW, g.PH, g.PW, g.OH(), g.OW()};
}

}  // namespace

void conv2d_forward(const Tensor& x, const Tensor& w, const Tensor* b, const cpu::Conv2dGeom& g, Tensor& y) {
  check_float(x, "conv2d");
  if (y.numel() == 0) return;
  const int dev = x.device().index;
  ConvDescs d(g, x.dtype());
  const Algo a = algorithm(Pass::forward, dev, x.dtype(), g, d);
  TX_CUDNN_CHECK(cudnnSetConvolutionMathType(d.conv.h, a.math));
  Workspace ws(dev, a.workspace);
  Scalars s;
  cudnnHandle_t h = bound_handle(x);
  TX_CUDNN_CHECK(cudnnConvolutionForward(h, s.one(x.dtype()), d.x.h, x.raw_data(), d.w.h, w.raw_data(), d.conv.h,
                                         cudnnConvolutionFwdAlgo_t(a.algo), ws.p, ws.n, s.zero(x.dtype()), d.y.h,
                                         y.raw_data()));
  if (b) {
    Owned<cudnnTensorDescriptor_t, cudnnDestroyTensorDescriptor> bd;
    TX_CUDNN_CHECK(cudnnCreateTensorDescriptor(&bd.h));
    TX_CUDNN_CHECK(cudnnSetTensor4dDescriptor(bd.h, CUDNN_TENSOR_NCHW, x.dtype() == DType::f64 ? CUDNN_DATA_DOUBLE : CUDNN_DATA_FLOAT,
                                              1, int(g.O), 1, 1));
    TX_CUDNN_CHECK(cudnnAddTensor(h, s.one(x.dtype()), bd.h, b->raw_data(), s.one(x.dtype()), d.y.h, y.raw_data()));
  }
}

void conv2d_backward_input(const Tensor& dy, const Tensor& w, const cpu::Conv2dGeom& g, Tensor& dx) {
  check_float(dy, "conv2d_backward_input");
  if (dx.numel() == 0) return;
  const int dev = dy.device().index;
  ConvDescs d(g, dy.dtype());
  const Algo a = algorithm(Pass::backward_data, dev, dy.dtype(), g, d);
  TX_CUDNN_CHECK(cudnnSetConvolutionMathType(d.conv.h, a.math));
  Workspace ws(dev, a.workspace);
  Scalars s;
  TX_CUDNN_CHECK(cudnnConvolutionBackwardData(bound_handle(dy), s.one(dy.dtype()), d.w.h, w.raw_data(), d.y.h,
                                              dy.raw_data(), d.conv.h, cudnnConvolutionBwdDataAlgo_t(a.algo), ws.p, ws.n,
                                              s.zero(dy.dtype()), d.x.h, dx.raw_data()));
}

void conv2d_backward_weight(const Tensor& dy, const Tensor& x, const cpu::Conv2dGeom& g, Tensor& dw, Tensor* db) {
  check_float(dy, "conv2d_backward_weight");
  if (dw.numel() == 0) return;
  const int dev = dy.device().index;
  ConvDescs d(g, dy.dtype());
  const Algo a = algorithm(Pass::backward_filter, dev, dy.dtype(), g, d);
  TX_CUDNN_CHECK(cudnnSetConvolutionMathType(d.conv.h, a.math));
  Workspace ws(dev, a.workspace);
  Scalars s;
  TX_CUDNN_CHECK(cudnnConvolutionBackwardFilter(bound_handle(dy), s.one(dy.dtype()), d.x.h, x.raw_data(), d.y.h,
                                                dy.raw_data(), d.conv.h, cudnnConvolutionBwdFilterAlgo_t(a.algo), ws.p,
                                                ws.n, s.zero(dy.dtype()), d.w.h, dw.raw_data()));
  if (db) {  // db [O] seen as [1, O, 1, 1]: the reduction keeps the reduced axes; sums in double, as the CPU
    const Shape keep{1, g.O, 1, 1};
    Tensor o = make_view(*db, keep, keep.contiguous_strides(), db->offset());
    cuda::reduce(ReduceOp::sum, dy, {true, false, true, true}, o);
  }
}

int64_t max_pool2d_workspace_bytes(const cpu::Pool2dGeom& g) { return g.N * g.C * g.OH() * g.OW() * 4; }

void max_pool2d_forward(const Tensor& x, const cpu::Pool2dGeom& g, Tensor& y, Tensor& ws) {
  check_float(x, "max_pool2d");
  const int err = launch_max_pool2d(x.dtype() == DType::f64 ? Dt::f64 : Dt::f32, x.raw_data(), y.raw_data(),
                                    static_cast<int32_t*>(ws.raw_data()), params(g), cuda_rt::current_stream(x.device().index));
  if (err) throw_cuda_error(err, "launch_max_pool2d", __FILE__, __LINE__);
}

void max_pool2d_backward(const Tensor& dy, const Tensor& ws, const cpu::Pool2dGeom& g, Tensor& dx) {
  check_float(dx, "max_pool2d_backward");
  const int err = launch_max_pool2d_backward(dx.dtype() == DType::f64 ? Dt::f64 : Dt::f32, dy.raw_data(),
                                             static_cast<const int32_t*>(ws.raw_data()), dx.raw_data(), params(g),
                                             cuda_rt::current_stream(dx.device().index));
  if (err) throw_cuda_error(err, "launch_max_pool2d_backward", __FILE__, __LINE__);
}

}  // namespace titanax::kernels::cuda
