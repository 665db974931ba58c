// matmul (batched, broadcasting) and linear (x @ w^T + b).
#include <omp.h>

#include <exception>

#include "core/onnx_builder.h"

#include "kernels/cpu/dispatch.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/loops.h"
#include "kernels/cuda/kernels.h"
#include "ops/ops.h"

namespace titanax {
namespace {

// How a [rows, cols] matrix view maps onto gemm's (transpose flag, leading dimension), or nothing.
struct MatLayout {
  bool trans = false;
  int64_t ld = 0;
};
bool gemm_layout(int64_t rows, int64_t cols, int64_t s_row, int64_t s_col, MatLayout& m) {
  if ((s_col == 1 || cols == 1) && s_row >= std::max<int64_t>(cols, 1)) {
    m = {false, std::max<int64_t>(s_row, std::max<int64_t>(cols, 1))};
    return true;
  }
  if ((s_row == 1 || rows == 1) && s_col >= std::max<int64_t>(rows, 1)) {
    m = {true, std::max<int64_t>(s_col, std::max<int64_t>(rows, 1))};
    return true;
  }
  return false;
}

Tensor gemm_ready(const Tensor& t, MatLayout& m) {
  int r = t.dim();
  if (gemm_layout(t.shape()[r - 2], t.shape()[r - 1], t.strides()[r - 2], t.strides()[r - 1], m)) return t;
  Tensor c = t.detach().contiguous();
  gemm_layout(c.shape()[r - 2], c.shape()[r - 1], c.strides()[r - 2], c.strides()[r - 1], m);
  return c;
}

// Runs one(i) for i in [0, n) over the OpenMP threads; an exception is rethrown after the region.
template <class F>
void parallel_batches(int64_t n, F& one) {
  std::exception_ptr err;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    try {
      one(i);
    } catch (...) {
#pragma omp critical(titanax_matmul_error)
      if (!err) err = std::current_exception();
    }
  }
  if (err) std::rethrow_exception(err);
}

class Matmul final : public Op {
 public:
  const char* name() const override { return "matmul"; }
  // d(a b) = da b + a db.
  std::optional<TensorList> jvp(const TensorList& in, const TensorList&, const TensorList& t) const override {
    return TensorList{sum_defined(t[0].defined() ? matmul(t[0], in[1]) : Tensor(), t[1].defined() ? matmul(in[0], t[1]) : Tensor())};
  }
  AutocastPolicy autocast_policy() const override { return AutocastPolicy::lower; }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    const Tensor &a = in[0], &b = in[1];
    check_same_dtype(in, "matmul");
    check_dtype(a, {DType::f32, DType::f64, DType::bf16, DType::f16}, "matmul");
    if (a.dim() < 2 || b.dim() < 2)
      throw ShapeError("matmul operands need rank >= 2 here", "[..., m, k] @ [..., k, n]", a.shape().str() + " @ " + b.shape().str());
    if (a.shape()[a.dim() - 1] != b.shape()[b.dim() - 2])
      throw ShapeError("matmul inner dimensions differ", "a.shape[-1] == b.shape[-2]", a.shape().str() + " @ " + b.shape().str(),
                       "transpose one operand (x.T()) or check the layer sizes");
    Shape ba(a.shape().begin(), a.shape().end() - 2), bb(b.shape().begin(), b.shape().end() - 2);
    Shape s = broadcast_shapes(ba, bb);
    s.push_back(a.shape()[a.dim() - 2]);
    s.push_back(b.shape()[b.dim() - 1]);
    return {{s, a.dtype(), a.device()}};
  }
  // f16 / bf16: an f32 GEMM of the widened operands, rounded (cuBLASLt's 16-bit GEMM with f32 accumulation
  // on CUDA).
  void cpu(const TensorList& in, TensorList& out) const override {
    if (is_half(in[0].dtype())) return run_in_f32(in, out);
    Tensor& c = out[0];
    const int r = c.dim();
    const int64_t M = c.shape()[r - 2], N = c.shape()[r - 1], K = in[0].shape()[in[0].dim() - 1];
    MatLayout la, lb;
    Tensor a = gemm_ready(in[0], la), b = gemm_ready(in[1], lb);
    Shape batch(c.shape().begin(), c.shape().end() - 2);
    // Broadcast strides of the batch axes only.
    auto batch_strides = [&](const Tensor& t) {
      Shape bs;
      bs.resize(batch.rank());
      int off = batch.rank() - (t.dim() - 2);
      for (int i = 0; i < batch.rank(); ++i) {
        int j = i - off;
        bs[i] = (j < 0 || t.shape()[j] == 1) ? 0 : t.strides()[j];
      }
      return bs;
    };
    Shape bsa = batch_strides(a), bsb = batch_strides(b);
    const int64_t nb = batch.numel();
    // One matrix b for every batch (a weight) and a's batches stacked as consecutive row blocks: fold the
    // batch into M and run one large GEMM instead of nb small ones.
    bool fold = nb > 1 && !la.trans;
    int64_t expect = M * la.ld;
    for (int d = batch.rank() - 1; fold && d >= 0; --d) {
      if (bsb[d] != 0) fold = false;
      if (batch[d] == 1) continue;
      if (bsa[d] != expect) fold = false;
      expect *= batch[d];
    }
    // Many small independent GEMMs (attention heads): one per thread (oneDNN runs single-threaded inside
    // a parallel region) rather than each one split over the threads.
    const bool by_batch = !fold && nb > 1 && M * N * K <= (int64_t(1) << 24) && omp_get_max_threads() > 1 && !omp_in_parallel();
    TX_DISPATCH_FLOAT(c.dtype(), "matmul", {
      using T = scalar_t;
      const T* pa = a.data<T>();
      const T* pb = b.data<T>();
      T* pc = c.data<T>();
      if (fold) {
        kernels::cpu::gemm(false, lb.trans, nb * M, N, K, T(1), pa, la.ld, pb, lb.ld, T(0), pc, std::max<int64_t>(N, 1));
        break;
      }
      auto one = [&](int64_t i) {
        int64_t oa = 0, ob = 0, rem = i;
        for (int d = batch.rank() - 1; d >= 0; --d) {
          int64_t idx = rem % batch[d];
          rem /= batch[d];
          oa += idx * bsa[d];
          ob += idx * bsb[d];
        }
        kernels::cpu::gemm(la.trans, lb.trans, M, N, K, T(1), pa + oa, la.ld, pb + ob, lb.ld, T(0), pc + i * M * N,
                           std::max<int64_t>(N, 1));
      };
      if (!by_batch) {
        for (int64_t i = 0; i < nb; ++i) one(i);
        break;
      }
      parallel_batches(nb, one);
    });
  }
  void cuda(const TensorList& in, TensorList& out) const override {
    kernels::cuda::matmul(in[0], in[1], out[0], kernels::cuda::allow_tf32());
  }
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct,
                 const std::vector<bool>& needs) const override {
    const Tensor &a = in[0], &b = in[1], &g = ct[0];
    TensorList r(2);
    if (needs[0]) r[0] = sum_to(matmul(g, b.transpose(-2, -1)), a.shape());
    if (needs[1]) r[1] = sum_to(matmul(a.transpose(-2, -1), g), b.shape());
    return r;
  }
  bool to_onnx(OnnxBuilder& b, const OnnxNodeIO& io) const override {
    b.node("MatMul", io.in, io.out);
    return true;
  }
};

class Linear final : public Op {
 public:
  const char* name() const override { return "linear"; }
  // d(x w^T + b) = dx w^T + db + x dw^T: the first two in one linear.
  std::optional<TensorList> jvp(const TensorList& in, const TensorList&, const TensorList& t) const override {
    const Tensor db = in.size() > 2 ? t[2] : Tensor();
    const Tensor r = t[0].defined() ? titanax::linear(t[0], in[1], db) : Tensor();
    const Tensor xdw = t[1].defined() ? titanax::linear(in[0], t[1], r.defined() ? Tensor() : db) : Tensor();
    return TensorList{r.defined() || xdw.defined() ? sum_defined(r, xdw) : expand(db, infer(in)[0].shape)};
  }
  AutocastPolicy autocast_policy() const override { return AutocastPolicy::lower; }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    const Tensor &x = in[0], &w = in[1];
    check_same_dtype(in, "linear");
    check_dtype(x, {DType::f32, DType::f64, DType::bf16, DType::f16}, "linear");
    if (w.dim() != 2 || x.dim() < 1 || x.shape()[x.dim() - 1] != w.shape()[1])
      throw ShapeError("linear: x[..., in] and w[out, in] do not match", "x.shape[-1] == w.shape[1] with w of rank 2",
                       "x " + x.shape().str() + ", w " + w.shape().str(), "w is [out_features, in_features] (PyTorch's layout)");
    if (in.size() > 2 && (in[2].dim() != 1 || in[2].shape()[0] != w.shape()[0]))
      throw ShapeError("linear: bias does not match the output features", "b of shape [" + std::to_string(w.shape()[0]) + "]",
                       in[2].shape().str());
    Shape s = x.shape();
    s[s.rank() - 1] = w.shape()[0];
    return {{s, x.dtype(), x.device()}};
  }
  void cpu(const TensorList& in, TensorList& out) const override {
    if (is_half(in[0].dtype())) return run_in_f32(in, out);
    const Tensor& w0 = in[1];
    Tensor x = in[0].detach().contiguous();
    const int64_t in_f = w0.shape()[1], out_f = w0.shape()[0], M = x.numel() / std::max<int64_t>(in_f, 1);
    MatLayout lw;
    Tensor w = gemm_ready(w0, lw);  // [out, in]; used transposed
    TX_DISPATCH_FLOAT(x.dtype(), "linear", {
      using T = scalar_t;
      T* y = out[0].data<T>();
      T beta = T(0);
      if (in.size() > 2) {
        Tensor b = in[2].detach().contiguous();
        const T* pb = b.data<T>();
        for (int64_t i = 0; i < M; ++i) std::copy(pb, pb + out_f, y + i * out_f);
        beta = T(1);
      }
      kernels::cpu::gemm(false, !lw.trans, M, out_f, in_f, T(1), x.data<T>(), std::max<int64_t>(in_f, 1), w.data<T>(),
                         lw.ld, beta, y, std::max<int64_t>(out_f, 1));
    });
  }
  void cuda(const TensorList& in, TensorList& out) const override {
    Tensor b = in.size() > 2 ? in[2] : Tensor();
    kernels::cuda::linear(in[0], in[1], in.size() > 2 ? &b : nullptr, out[0], kernels::cuda::allow_tf32());
  }
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct,
                 const std::vector<bool>& needs) const override {
    const Tensor &x = in[0], &w = in[1], &g = ct[0];
    TensorList r(in.size());
    const int64_t in_f = w.shape()[1], out_f = w.shape()[0];
    if (needs[0]) r[0] = matmul(g, w);
    if (needs[1]) {
      Tensor g2 = g.reshape(Shape{-1, out_f}), x2 = x.reshape(Shape{-1, in_f});
      r[1] = matmul(g2.T(), x2);
    }
    if (in.size() > 2 && needs[2]) {
      std::vector<int> axes;
      for (int i = 0; i + 1 < g.dim(); ++i) axes.push_back(i);
      r[2] = axes.empty() ? g : sum(g, axes);
    }
    return r;
  }
  // x @ w^T + b: Gemm (transB) for a matrix x, else MatMul with the transposed w, and Add.
  bool to_onnx(OnnxBuilder& b, const OnnxNodeIO& io) const override {
    if (io.in_specs[0].shape.rank() == 2) {
      b.node("Gemm", io.in, io.out, {{"transB", int64_t(1)}});
      return true;
    }
    const std::string wt = b.op("Transpose", {io.in[1]}, {{"perm", std::vector<int64_t>{1, 0}}});
    if (io.in.size() > 2) b.node("Add", {b.op("MatMul", {io.in[0], wt}), io.in[2]}, io.out);
    else b.node("MatMul", {io.in[0], wt}, io.out);
    return true;
  }
};

}  // namespace

Tensor matmul(const Tensor& a, const Tensor& b) {
  if (a.dim() == 0 || b.dim() == 0)
    throw ShapeError("matmul of a 0-d tensor", "operands of rank >= 1", a.shape().str() + " @ " + b.shape().str(), "use mul()");
  Tensor aa = a.dim() == 1 ? a.unsqueeze(0) : a;
  Tensor bb = b.dim() == 1 ? b.unsqueeze(1) : b;
  Tensor c = apply1(std::make_shared<Matmul>(), {aa, bb});
  if (b.dim() == 1) c = c.squeeze(-1);
  if (a.dim() == 1) c = c.squeeze(c.dim() == 1 ? 0 : -2);
  return c;
}

Tensor linear(const Tensor& x, const Tensor& w, const Tensor& b) {
  if (b.defined()) return apply1(std::make_shared<Linear>(), {x, w, b});
  return apply1(std::make_shared<Linear>(), {x, w});
}

}  // namespace titanax
