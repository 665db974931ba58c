#include "kernels/cpu/reduce.h"

#include <cmath>
#include <limits>

#include "kernels/cpu/dispatch.h"
#include "kernels/cpu/loops.h"

namespace titanax::kernels::cpu {
namespace {

// A group of axes (kept or reduced) after dropping size-1 axes and merging contiguous neighbours.
struct Axes {
  int n = 0;
  int64_t size[kMaxRank];
  int64_t stride[kMaxRank];  // elements of x
  int64_t count() const {
    int64_t c = 1;
    for (int i = 0; i < n; ++i) c *= size[i];
    return c;
  }
  void add(int64_t sz, int64_t st) {
    if (sz == 1) return;
    if (n > 0 && stride[n - 1] == st * sz) {  // merge with the previous (outer) axis
      size[n - 1] *= sz;
      stride[n - 1] = st;
      return;
    }
    size[n] = sz;
    stride[n] = st;
    ++n;
  }
  // Element offset of linear index k (row-major over this group).
  int64_t offset(int64_t k) const {
    int64_t off = 0;
    for (int i = n - 1; i >= 0; --i) {
      off += (k % size[i]) * stride[i];
      k /= size[i];
    }
    return off;
  }
};

template <class T, class Acc, ReduceOp OP>
struct Combine {
  static Acc init() {
    if constexpr (OP == ReduceOp::sum) return Acc(0);
    else if constexpr (OP == ReduceOp::max) return -std::numeric_limits<Acc>::infinity();
    else return std::numeric_limits<Acc>::infinity();
  }
  static Acc apply(Acc a, T v) {
    if constexpr (OP == ReduceOp::sum) return a + Acc(v);
    else if constexpr (OP == ReduceOp::max) return (Acc(v) > a || v != v) ? Acc(v) : a;
    else return (Acc(v) < a || v != v) ? Acc(v) : a;
  }
};

// A full reduction of nred elements over nt threads: thread t runs body(start, stop, part[t]) on its
// contiguous share (the same shares for the same nt, so results do not depend on scheduling).
template <class Acc, class Body>
void split_reduction(int nt, int64_t nred, std::vector<Acc>& part, const Body& body) {
  if (nt <= 1) {
    body(0, nred, part[0]);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    int t = omp_get_thread_num(), m = omp_get_num_threads();
    int64_t chunk = (nred + m - 1) / m, s = std::min(nred, chunk * t), e = std::min(nred, s + chunk);
    body(s, e, part[size_t(t)]);
  }
}

template <class T, ReduceOp OP>
void reduce_impl(const Tensor& x, const std::vector<bool>& reduced, Tensor& out) {
  using Acc = std::conditional_t<OP == ReduceOp::sum, double, T>;
  using C = Combine<T, Acc, OP>;
  Axes kept, red;
  const auto& sh = x.shape();
  const auto& st = x.strides();
  for (int i = 0; i < x.dim(); ++i) (reduced[i] ? red : kept).add(sh[i], st[i]);
  const T* px = x.data<T>();
  T* po = out.data<T>();
  const int64_t nout = kept.count(), nred = red.count();

  if (nout == 1 && nred > 0) {
    // Full reduction: split the reduced range over threads, combine partials in a fixed order.
    int nt = threads_for(nred);
    std::vector<Acc> part(size_t(std::max(nt, 1)), C::init());
    auto body = [&](int64_t s, int64_t e, Acc& acc) {
      if (red.n == 1 && red.stride[0] == 1) {
        for (int64_t k = s; k < e; ++k) acc = C::apply(acc, px[k]);
      } else {
        for (int64_t k = s; k < e; ++k) acc = C::apply(acc, px[red.offset(k)]);
      }
    };
    split_reduction(nt, nred, part, body);
    Acc acc = C::init();
    for (auto p : part) {
      if constexpr (OP == ReduceOp::sum) acc += p;
      else acc = C::apply(acc, T(p));
    }
    po[0] = T(acc);
    return;
  }

  // Innermost kept axis contiguous in x: accumulate whole rows (vectorisable).
  if (kept.n > 0 && kept.stride[kept.n - 1] == 1 && red.n > 0) {
    // Work items: (outer index, block of kColumns columns), so that a few wide rows (a bias gradient: the
    // column sums of [tokens, features]) still spread over the threads. Each output keeps its own
    // accumulator and row order, so the split does not change a bit.
    constexpr int64_t kColumns = 512;
    const int64_t J = kept.size[kept.n - 1], nblk = (J + kColumns - 1) / kColumns;
    Axes outer = kept;
    outer.n -= 1;
    const int64_t nouter = outer.count();
    parallel_for(nouter * nblk, std::min(J, kColumns) * nred, [&](int64_t s, int64_t e) {
      std::vector<Acc> acc(static_cast<size_t>(std::min(J, kColumns)));
      for (int64_t w = s; w < e; ++w) {
        const int64_t o = w / nblk, j0 = (w % nblk) * kColumns, nj = std::min(kColumns, J - j0);
        const T* base = px + outer.offset(o) + j0;
        std::fill(acc.begin(), acc.begin() + nj, C::init());
        for (int64_t r = 0; r < nred; ++r) {
          const T* row = base + red.offset(r);
          for (int64_t j = 0; j < nj; ++j) acc[size_t(j)] = C::apply(acc[size_t(j)], row[j]);
        }
        T* dst = po + o * J + j0;
        for (int64_t j = 0; j < nj; ++j) dst[j] = T(acc[size_t(j)]);
      }
    });
    return;
  }

  // General: one accumulator per output element, parallel over outputs.
  const bool inner_contig = red.n > 0 && red.stride[red.n - 1] == 1;
  const int64_t inner = red.n > 0 ? red.size[red.n - 1] : 1;
  Axes red_outer = red;
  if (red.n > 0) red_outer.n -= 1;
  const int64_t nro = red_outer.count();
  parallel_for(nout, nred, [&](int64_t s, int64_t e) {
    for (int64_t o = s; o < e; ++o) {
      const T* base = px + kept.offset(o);
      Acc acc = C::init();
      if (red.n == 0) {
        acc = C::apply(acc, base[0]);
      } else if (inner_contig) {
        for (int64_t r = 0; r < nro; ++r) {
          const T* row = base + red_outer.offset(r);
          for (int64_t j = 0; j < inner; ++j) acc = C::apply(acc, row[j]);
        }
      } else {
        for (int64_t r = 0; r < nred; ++r) acc = C::apply(acc, base[red.offset(r)]);
      }
      po[o] = T(acc);
    }
  });
}

// Requests the elements of a generated tensor in runs of up to kGeneratedRun, merging segments that are
// adjacent in the tensor, and hands every element to take() in the order the segments were given.
template <class T, class Take>
class SegmentStream {
 public:
  SegmentStream(const ElementSource& source, Take& take) : source_(source), take_(take) {}
  void segment(int64_t off, int64_t len) {
    while (len > 0) {
      if (n_ > 0 && (off != start_ + n_ || n_ == kGeneratedRun)) flush();
      if (n_ == 0) start_ = off;
      const int64_t m = std::min(len, kGeneratedRun - n_);
      n_ += m;
      off += m;
      len -= m;
    }
  }
  void flush() {
    if (n_ == 0) return;
    source_(start_, n_, buf_);
    for (int64_t i = 0; i < n_; ++i) take_(buf_[i]);
    n_ = 0;
  }

 private:
  const ElementSource& source_;
  Take& take_;
  T buf_[kGeneratedRun];
  int64_t start_ = 0, n_ = 0;
};

// reduce_impl<T, sum> over a contiguous x whose elements come from `source`: the same three cases, the
// same accumulator per output and the same order of additions into it.
template <class T>
void reduce_sum_generated_impl(const Shape& shape, const std::vector<bool>& reduced, Tensor& out,
                               const ElementSource& source) {
  using Acc = double;
  using C = Combine<T, Acc, ReduceOp::sum>;
  Axes kept, red;
  const Shape st = shape.contiguous_strides();
  for (int i = 0; i < shape.rank(); ++i) (reduced[size_t(i)] ? red : kept).add(shape[i], st[i]);
  T* po = out.data<T>();
  const int64_t nout = kept.count(), nred = red.count();

  if (nout == 1 && nred > 0) {
    // Full reduction. x is contiguous, so red is one stride-1 axis (or none): element k is at offset k.
    int nt = threads_for(nred);
    std::vector<Acc> part(size_t(std::max(nt, 1)), C::init());
    auto body = [&](int64_t s, int64_t e, Acc& acc) {
      auto take = [&acc](T v) { acc = C::apply(acc, v); };
      SegmentStream<T, decltype(take)> in(source, take);
      in.segment(s, e - s);
      in.flush();
    };
    split_reduction(nt, nred, part, body);
    Acc acc = C::init();
    for (auto p : part) acc += p;
    po[0] = T(acc);
    return;
  }

  if (kept.n > 0 && kept.stride[kept.n - 1] == 1 && red.n > 0) {
    // Innermost kept axis contiguous: rows of J accumulators, rows visited in reduced order.
    const int64_t J = kept.size[kept.n - 1];
    Axes outer = kept;
    outer.n -= 1;
    const int64_t nouter = outer.count();
    parallel_for(nouter, J * nred, [&](int64_t s, int64_t e) {
      std::vector<Acc> acc(static_cast<size_t>(J), C::init());
      int64_t o = s, j = 0, r = 0;  // the output row, column and reduced row the next element belongs to
      auto take = [&](T v) {
        acc[size_t(j)] = C::apply(acc[size_t(j)], v);
        if (++j < J) return;
        j = 0;
        if (++r < nred) return;
        r = 0;
        T* dst = po + o * J;
        for (int64_t q = 0; q < J; ++q) dst[q] = T(acc[size_t(q)]);
        std::fill(acc.begin(), acc.end(), C::init());
        ++o;
      };
      SegmentStream<T, decltype(take)> in(source, take);
      for (int64_t oo = s; oo < e; ++oo) {
        const int64_t base = outer.offset(oo);
        for (int64_t rr = 0; rr < nred; ++rr) in.segment(base + red.offset(rr), J);
      }
      in.flush();
      for (; o < e; ++o)  // nred == 0: sums of nothing
        for (int64_t q = 0; q < J; ++q) po[o * J + q] = T(C::init());
    });
    return;
  }

  // One accumulator per output. x is contiguous, so the innermost reduced axis (if any) has stride 1.
  const int64_t inner = red.n > 0 ? red.size[red.n - 1] : 1;
  Axes red_outer = red;
  if (red.n > 0) red_outer.n -= 1;
  const int64_t nro = red_outer.count();
  parallel_for(nout, nred, [&](int64_t s, int64_t e) {
    Acc acc = C::init();
    int64_t o = s, k = 0;  // the output and the index among its nred elements of the next element
    auto take = [&](T v) {
      acc = C::apply(acc, v);
      if (++k < nred) return;
      k = 0;
      po[o++] = T(acc);
      acc = C::init();
    };
    SegmentStream<T, decltype(take)> in(source, take);
    for (int64_t oo = s; oo < e; ++oo) {
      const int64_t base = kept.offset(oo);
      for (int64_t r = 0; r < nro; ++r) in.segment(base + red_outer.offset(r), inner);
    }
    in.flush();
    for (; o < e; ++o) po[o] = T(C::init());  // nred == 0: sums of nothing
  });
}

}  // namespace

void reduce(ReduceOp op, const Tensor& x, const std::vector<bool>& reduced, Tensor& out) {
  TX_DISPATCH_FLOAT(x.dtype(), "reduce", {
    switch (op) {
      case ReduceOp::sum: reduce_impl<scalar_t, ReduceOp::sum>(x, reduced, out); break;
      case ReduceOp::max: reduce_impl<scalar_t, ReduceOp::max>(x, reduced, out); break;
      case ReduceOp::min: reduce_impl<scalar_t, ReduceOp::min>(x, reduced, out); break;
    }
  });
}

void argmax(const Tensor& x, int axis, Tensor& out) {
  TX_DISPATCH_ARITH(x.dtype(), "argmax", {
    using T = scalar_t;
    Axes kept;
    for (int i = 0; i < x.dim(); ++i)
      if (i != axis) kept.add(x.shape()[i], x.strides()[i]);
    const int64_t n = x.shape()[axis], st = x.strides()[axis];
    const T* px = x.data<T>();
    int64_t* po = out.data<int64_t>();
    parallel_for(kept.count(), n, [&](int64_t s, int64_t e) {
      for (int64_t o = s; o < e; ++o) {
        const T* base = px + kept.offset(o);
        int64_t best = 0;
        T bv = base[0];
        for (int64_t j = 1; j < n; ++j) {
          T v = base[j * st];
          if (v > bv) bv = v, best = j;
        }
        po[o] = best;
      }
    });
  });
}

void reduce_sum_generated(DType dtype, const Shape& shape, const std::vector<bool>& reduced, Tensor& out,
                          const ElementSource& source) {
  TX_DISPATCH_FLOAT(dtype, "reduce_sum_generated", reduce_sum_generated_impl<scalar_t>(shape, reduced, out, source));
}

}  // namespace titanax::kernels::cpu
