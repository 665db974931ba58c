#include "kernels/cpu/conv.h"

#include <oneapi/dnnl/dnnl.hpp>

#include <array>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "kernels/cpu/dispatch.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/loops.h"

namespace titanax::kernels::cpu {
namespace {

// ====================================================================================== oneDNN (f32)
//
// Convolutions let oneDNN pick its memory formats (format_tag::any: blocked nChw16c / OIhw16i16o on AVX-512,
// where its direct JIT kernels run about twice as fast as the im2col + GEMM it uses on plain nchw) and
// reorder our plain nchw / oihw tensors in and out around the primitive. The reorders are cached with
// the primitive; their temporary buffers come from the (caching) CPU allocator.

using dnnl::memory;
using tag = memory::format_tag;
using dt = memory::data_type;

dnnl::engine& engine() {
  static dnnl::engine e(dnnl::engine::kind::cpu, 0);
  return e;
}
dnnl::stream& stream() {
  thread_local dnnl::stream s(engine());
  return s;
}

[[noreturn]] void dnnl_failed(const char* what, const dnnl::error& e) {
  throw InternalError(std::string("oneDNN ") + what + " failed: " + e.what(), "dnnl_success",
                      "status " + std::to_string(int(e.status)));
}

memory::desc md(std::initializer_list<int64_t> dims, tag t) { return memory::desc(memory::dims(dims), dt::f32, t); }

// One argument of a cached primitive: our plain layout, the layout the primitive wants, and the reorder
// between them (plain -> chosen for inputs, chosen -> plain for outputs) when they differ.
struct Arg {
  int id = 0;
  bool output = false;
  memory::desc plain, chosen;
  dnnl::primitive reorder;  // empty when plain == chosen
};

// One cached primitive per (kind, geometry).
enum Kind : int64_t { kConvFwd, kConvBwdData, kConvBwdWeights, kPoolFwd, kPoolBwd };
using Key = std::array<int64_t, 13>;
struct Entry {
  dnnl::primitive prim;
  std::vector<Arg> args;
  memory::desc ws;  // pooling workspace (empty for convolutions)
};

Arg make_arg(int id, bool output, const memory::desc& plain, const memory::desc& chosen) {
  Arg a{id, output, plain, chosen, {}};
  if (!(plain == chosen)) {
    auto rpd = output ? dnnl::reorder::primitive_desc(engine(), chosen, engine(), plain)
                      : dnnl::reorder::primitive_desc(engine(), plain, engine(), chosen);
    a.reorder = dnnl::reorder(rpd);
  }
  return a;
}

template <class Make>
const Entry& cached(const Key& key, const char* what, Make&& make) {
  static std::mutex mu;
  static std::map<Key, std::unique_ptr<Entry>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return *it->second;
  try {
    auto e = std::make_unique<Entry>(make());
    return *cache.emplace(key, std::move(e)).first->second;
  } catch (const dnnl::error& e) {
    dnnl_failed(what, e);
  }
}

memory mem(const memory::desc& d, const Tensor& t) { return memory(d, engine(), const_cast<void*>(t.raw_data())); }

// Runs e.prim with tensors[i] bound to e.args[i] (in plain layout; nullptr: argument absent), reordering
// through temporaries where the primitive wants another layout.
void run(const Entry& e, std::initializer_list<const Tensor*> tensors, const char* what) {
  try {
    dnnl::stream& s = stream();
    std::unordered_map<int, memory> args;
    std::vector<Tensor> temps;
    std::vector<std::array<memory, 2>> outs;  // (temporary, plain) reordered back after the primitive
    std::vector<const Arg*> out_args;
    size_t i = 0;
    for (const Tensor* t : tensors) {
      const Arg& a = e.args[i++];
      if (!t) continue;
      memory plain = mem(a.plain, *t);
      if (!a.reorder) {
        args.insert({a.id, plain});
        continue;
      }
      temps.push_back(empty(Shape{int64_t(a.chosen.get_size())}, DType::u8));
      memory tmp(a.chosen, engine(), temps.back().raw_data());
      if (a.output) outs.push_back({tmp, plain}), out_args.push_back(&a);
      else a.reorder.execute(s, {{DNNL_ARG_FROM, plain}, {DNNL_ARG_TO, tmp}});
      args.insert({a.id, tmp});
    }
    e.prim.execute(s, args);
    for (size_t k = 0; k < outs.size(); ++k)
      out_args[k]->reorder.execute(s, {{DNNL_ARG_FROM, outs[k][0]}, {DNNL_ARG_TO, outs[k][1]}});
    s.wait();
  } catch (const dnnl::error& err) {
    dnnl_failed(what, err);
  }
}

struct ConvDescs {
  memory::desc src, wei, bias, dst;                   // plain: nchw, oihw, x, nchw
  memory::desc any_src, any_wei, any_dst;             // format_tag::any
  memory::dims strides, pad;
};
ConvDescs conv_descs(const Conv2dGeom& g, bool bias) {
  ConvDescs d;
  d.src = md({g.N, g.C, g.H, g.W}, tag::nchw);
  d.wei = md({g.O, g.C, g.KH, g.KW}, tag::oihw);
  d.bias = bias ? md({g.O}, tag::x) : memory::desc();
  d.dst = md({g.N, g.O, g.OH(), g.OW()}, tag::nchw);
  d.any_src = md({g.N, g.C, g.H, g.W}, tag::any);
  d.any_wei = md({g.O, g.C, g.KH, g.KW}, tag::any);
  d.any_dst = md({g.N, g.O, g.OH(), g.OW()}, tag::any);
  d.strides = {g.SH, g.SW};
  d.pad = {g.PH, g.PW};
  return d;
}
Key conv_key(Kind k, const Conv2dGeom& g, bool bias) {
  return {k, g.N, g.C, g.H, g.W, g.O, g.KH, g.KW, g.SH, g.SW, g.PH, g.PW, bias};
}
dnnl::convolution_forward::primitive_desc conv_fwd_pd(const ConvDescs& d) {
  dnnl::convolution_forward::desc fd(dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
                                     d.any_src, d.any_wei, d.bias, d.any_dst, d.strides, d.pad, d.pad);
  return dnnl::convolution_forward::primitive_desc(fd, engine());
}

void conv_fwd_f32(const Tensor& x, const Tensor& w, const Tensor* b, const Conv2dGeom& g, Tensor& y) {
  ConvDescs d = conv_descs(g, b != nullptr);
  const Entry& e = cached(conv_key(kConvFwd, g, b != nullptr), "convolution forward", [&] {
    auto pd = conv_fwd_pd(d);
    return Entry{dnnl::convolution_forward(pd),
                 {make_arg(DNNL_ARG_SRC, false, d.src, pd.src_desc()), make_arg(DNNL_ARG_WEIGHTS, false, d.wei, pd.weights_desc()),
                  make_arg(DNNL_ARG_BIAS, false, d.bias, d.bias), make_arg(DNNL_ARG_DST, true, d.dst, pd.dst_desc())},
                 {}};
  });
  run(e, {&x, &w, b, &y}, "convolution forward");
}

void conv_bwd_data_f32(const Tensor& dy, const Tensor& w, const Conv2dGeom& g, Tensor& dx) {
  ConvDescs d = conv_descs(g, false);
  const Entry& e = cached(conv_key(kConvBwdData, g, false), "convolution backward data", [&] {
    // With few input channels the blocked kernel has nothing to block: plain nchw (GEMM) is faster there.
    const bool blocked = g.C >= 16;
    dnnl::convolution_backward_data::desc bd(dnnl::algorithm::convolution_direct, blocked ? d.any_src : d.src,
                                             blocked ? d.any_wei : d.wei, blocked ? d.any_dst : d.dst, d.strides, d.pad,
                                             d.pad);
    dnnl::convolution_backward_data::primitive_desc pd(bd, engine(), conv_fwd_pd(d));
    return Entry{dnnl::convolution_backward_data(pd),
                 {make_arg(DNNL_ARG_DIFF_DST, false, d.dst, pd.diff_dst_desc()),
                  make_arg(DNNL_ARG_WEIGHTS, false, d.wei, pd.weights_desc()),
                  make_arg(DNNL_ARG_DIFF_SRC, true, d.src, pd.diff_src_desc())},
                 {}};
  });
  run(e, {&dy, &w, &dx}, "convolution backward data");
}

void conv_bwd_weights_f32(const Tensor& dy, const Tensor& x, const Conv2dGeom& g, Tensor& dw, Tensor* db) {
  ConvDescs d = conv_descs(g, db != nullptr);
  const Entry& e = cached(conv_key(kConvBwdWeights, g, db != nullptr), "convolution backward weights", [&] {
    dnnl::convolution_backward_weights::desc bd(dnnl::algorithm::convolution_direct, d.any_src, d.any_wei, d.bias,
                                                d.any_dst, d.strides, d.pad, d.pad);
    dnnl::convolution_backward_weights::primitive_desc pd(bd, engine(), conv_fwd_pd(d));
    return Entry{dnnl::convolution_backward_weights(pd),
                 {make_arg(DNNL_ARG_SRC, false, d.src, pd.src_desc()),
                  make_arg(DNNL_ARG_DIFF_DST, false, d.dst, pd.diff_dst_desc()),
                  make_arg(DNNL_ARG_DIFF_WEIGHTS, true, d.wei, pd.diff_weights_desc()),
                  make_arg(DNNL_ARG_DIFF_BIAS, true, d.bias, d.bias)},
                 {}};
  });
  run(e, {&x, &dy, &dw, db}, "convolution backward weights");
}

Key pool_key(Kind k, const Pool2dGeom& g) { return {k, g.N, g.C, g.H, g.W, g.KH, g.KW, g.SH, g.SW, g.PH, g.PW, 0, 0}; }
dnnl::pooling_forward::primitive_desc pool_fwd_pd(const Pool2dGeom& g) {
  dnnl::pooling_forward::desc fd(dnnl::prop_kind::forward_training, dnnl::algorithm::pooling_max,
                                 md({g.N, g.C, g.H, g.W}, tag::nchw), md({g.N, g.C, g.OH(), g.OW()}, tag::nchw),
                                 {g.SH, g.SW}, {g.KH, g.KW}, {g.PH, g.PW}, {g.PH, g.PW});
  return dnnl::pooling_forward::primitive_desc(fd, engine());
}
// Pooling runs on plain nchw (oneDNN's JIT pooling handles it directly).
const Entry& pool_fwd_entry(const Pool2dGeom& g) {
  return cached(pool_key(kPoolFwd, g), "max pooling forward", [&] {
    auto pd = pool_fwd_pd(g);
    return Entry{dnnl::pooling_forward(pd),
                 {make_arg(DNNL_ARG_SRC, false, pd.src_desc(), pd.src_desc()),
                  make_arg(DNNL_ARG_DST, true, pd.dst_desc(), pd.dst_desc()),
                  make_arg(DNNL_ARG_WORKSPACE, true, pd.workspace_desc(), pd.workspace_desc())},
                 pd.workspace_desc()};
  });
}
const Entry& pool_bwd_entry(const Pool2dGeom& g) {
  return cached(pool_key(kPoolBwd, g), "max pooling backward", [&] {
    dnnl::pooling_backward::desc bd(dnnl::algorithm::pooling_max, md({g.N, g.C, g.H, g.W}, tag::nchw),
                                    md({g.N, g.C, g.OH(), g.OW()}, tag::nchw), {g.SH, g.SW}, {g.KH, g.KW},
                                    {g.PH, g.PW}, {g.PH, g.PW});
    dnnl::pooling_backward::primitive_desc pd(bd, engine(), pool_fwd_pd(g));
    return Entry{dnnl::pooling_backward(pd),
                 {make_arg(DNNL_ARG_DIFF_DST, false, pd.diff_dst_desc(), pd.diff_dst_desc()),
                  make_arg(DNNL_ARG_WORKSPACE, false, pd.workspace_desc(), pd.workspace_desc()),
                  make_arg(DNNL_ARG_DIFF_SRC, true, pd.diff_src_desc(), pd.diff_src_desc())},
                 {}};
  });
}

// ====================================================================================== direct loops (f64)

template <class T>
void conv_fwd_ref(const T* x, const T* w, const T* b, const Conv2dGeom& g, T* y) {
  const int64_t OH = g.OH(), OW = g.OW();
  parallel_for(g.N * g.O, g.C * g.KH * g.KW * OH * OW, [&](int64_t s, int64_t e) {
    for (int64_t t = s; t < e; ++t) {
      const int64_t n = t / g.O, o = t % g.O;
      T* yp = y + t * OH * OW;
      std::fill(yp, yp + OH * OW, b ? b[o] : T(0));
      for (int64_t c = 0; c < g.C; ++c) {
        const T* xp = x + (n * g.C + c) * g.H * g.W;
        for (int64_t p = 0; p < g.KH; ++p)
          for (int64_t q = 0; q < g.KW; ++q) {
            const T wv = w[((o * g.C + c) * g.KH + p) * g.KW + q];
            for (int64_t i = 0; i < OH; ++i) {
              const int64_t ih = i * g.SH - g.PH + p;
              if (ih < 0 || ih >= g.H) continue;
              for (int64_t j = 0; j < OW; ++j) {
                const int64_t iw = j * g.SW - g.PW + q;
                if (iw >= 0 && iw < g.W) yp[i * OW + j] += wv * xp[ih * g.W + iw];
              }
            }
          }
      }
    }
  });
}

template <class T>
void conv_bwd_data_ref(const T* dy, const T* w, const Conv2dGeom& g, T* dx) {
  const int64_t OH = g.OH(), OW = g.OW();
  parallel_for(g.N * g.C, g.O * g.KH * g.KW * OH * OW, [&](int64_t s, int64_t e) {
    for (int64_t t = s; t < e; ++t) {
      const int64_t n = t / g.C, c = t % g.C;
      T* xp = dx + t * g.H * g.W;
      std::fill(xp, xp + g.H * g.W, T(0));
      for (int64_t o = 0; o < g.O; ++o) {
        const T* gp = dy + (n * g.O + o) * OH * OW;
        for (int64_t p = 0; p < g.KH; ++p)
          for (int64_t q = 0; q < g.KW; ++q) {
            const T wv = w[((o * g.C + c) * g.KH + p) * g.KW + q];
            for (int64_t i = 0; i < OH; ++i) {
              const int64_t ih = i * g.SH - g.PH + p;
              if (ih < 0 || ih >= g.H) continue;
              for (int64_t j = 0; j < OW; ++j) {
                const int64_t iw = j * g.SW - g.PW + q;
                if (iw >= 0 && iw < g.W) xp[ih * g.W + iw] += wv * gp[i * OW + j];
              }
            }
          }
      }
    }
  });
}

template <class T>
void conv_bwd_weights_ref(const T* dy, const T* x, const Conv2dGeom& g, T* dw, T* db) {
  const int64_t OH = g.OH(), OW = g.OW();
  parallel_for(g.O * g.C, g.N * g.KH * g.KW * OH * OW, [&](int64_t s, int64_t e) {
    for (int64_t t = s; t < e; ++t) {
      const int64_t o = t / g.C, c = t % g.C;
      for (int64_t p = 0; p < g.KH; ++p)
        for (int64_t q = 0; q < g.KW; ++q) {
          T acc = 0;
          for (int64_t n = 0; n < g.N; ++n) {
            const T* gp = dy + (n * g.O + o) * OH * OW;
            const T* xp = x + (n * g.C + c) * g.H * g.W;
            for (int64_t i = 0; i < OH; ++i) {
              const int64_t ih = i * g.SH - g.PH + p;
              if (ih < 0 || ih >= g.H) continue;
              for (int64_t j = 0; j < OW; ++j) {
                const int64_t iw = j * g.SW - g.PW + q;
                if (iw >= 0 && iw < g.W) acc += gp[i * OW + j] * xp[ih * g.W + iw];
              }
            }
          }
          dw[t * g.KH * g.KW + p * g.KW + q] = acc;
        }
    }
  });
  if (!db) return;
  for (int64_t o = 0; o < g.O; ++o) {
    T acc = 0;
    for (int64_t n = 0; n < g.N; ++n) {
      const T* gp = dy + (n * g.O + o) * OH * OW;
      for (int64_t k = 0; k < OH * OW; ++k) acc += gp[k];
    }
    db[o] = acc;
  }
}

// ws: per output element, the winning offset ih * W + iw in its input plane (-1: empty window).
// y (when not null) and the winner's offset in its plane (I: int32 for the workspace, int64 for
// max_pool2d_indices): the first maximum of each window in row-major window order, the first NaN if any.
template <class T, class I>
void pool_fwd_ref(const T* x, const Pool2dGeom& g, T* y, I* ws) {
  const int64_t OH = g.OH(), OW = g.OW();
  parallel_for(g.N * g.C, OH * OW * g.KH * g.KW, [&](int64_t s, int64_t e) {
    for (int64_t t = s; t < e; ++t) {
      const T* xp = x + t * g.H * g.W;
      for (int64_t i = 0; i < OH; ++i)
        for (int64_t j = 0; j < OW; ++j) {
          T best = -std::numeric_limits<T>::infinity();
          int32_t at = -1;
          for (int64_t p = 0; p < g.KH; ++p) {
            const int64_t ih = i * g.SH - g.PH + p;
            if (ih < 0 || ih >= g.H) continue;
            for (int64_t q = 0; q < g.KW; ++q) {
              const int64_t iw = j * g.SW - g.PW + q;
              if (iw < 0 || iw >= g.W) continue;
              const T v = xp[ih * g.W + iw];
              if (at < 0 || v > best || (v != v && best == best)) {  // a NaN wins (the first one)
                best = v;
                at = int32_t(ih * g.W + iw);
              }
            }
          }
          if (y) y[(t * OH + i) * OW + j] = best;
          ws[(t * OH + i) * OW + j] = I(at);
        }
    }
  });
}

template <class T>
void pool_bwd_ref(const T* dy, const int32_t* ws, const Pool2dGeom& g, T* dx) {
  const int64_t OH = g.OH(), OW = g.OW();
  parallel_for(g.N * g.C, OH * OW + g.H * g.W, [&](int64_t s, int64_t e) {
    for (int64_t t = s; t < e; ++t) {
      T* xp = dx + t * g.H * g.W;
      std::fill(xp, xp + g.H * g.W, T(0));
      for (int64_t k = 0; k < OH * OW; ++k) {
        const int32_t at = ws[t * OH * OW + k];
        if (at >= 0) xp[at] += dy[t * OH * OW + k];
      }
    }
  });
}

}  // namespace

void conv2d_forward(const Tensor& x, const Tensor& w, const Tensor* b, const Conv2dGeom& g, Tensor& y) {
  if (y.numel() == 0) return;
  if (x.dtype() == DType::f32) return conv_fwd_f32(x, w, b, g, y);
  TX_DISPATCH_FLOAT(x.dtype(), "conv2d", {
    using T = scalar_t;
    conv_fwd_ref(x.data<T>(), w.data<T>(), b ? b->data<T>() : (const T*)nullptr, g, y.data<T>());
  });
}

void conv2d_backward_input(const Tensor& dy, const Tensor& w, const Conv2dGeom& g, Tensor& dx) {
  if (dx.numel() == 0) return;
  if (dy.numel() == 0) return fill(dx, 0.0);
  if (dy.dtype() == DType::f32) return conv_bwd_data_f32(dy, w, g, dx);
  TX_DISPATCH_FLOAT(dy.dtype(), "conv2d_backward_input", {
    using T = scalar_t;
    conv_bwd_data_ref(dy.data<T>(), w.data<T>(), g, dx.data<T>());
  });
}

void conv2d_backward_weight(const Tensor& dy, const Tensor& x, const Conv2dGeom& g, Tensor& dw, Tensor* db) {
  if (dy.numel() == 0) {
    if (dw.numel()) fill(dw, 0.0);
    if (db && db->numel()) fill(*db, 0.0);
    return;
  }
  if (dy.dtype() == DType::f32) return conv_bwd_weights_f32(dy, x, g, dw, db);
  TX_DISPATCH_FLOAT(dy.dtype(), "conv2d_backward_weight", {
    using T = scalar_t;
    conv_bwd_weights_ref(dy.data<T>(), x.data<T>(), g, dw.data<T>(), db ? db->data<T>() : (T*)nullptr);
  });
}

int64_t max_pool2d_workspace_bytes(const Pool2dGeom& g, DType dtype) {
  if (g.N * g.C * g.OH() * g.OW() == 0) return 0;
  if (dtype == DType::f32) return int64_t(pool_fwd_entry(g).ws.get_size());
  return g.N * g.C * g.OH() * g.OW() * int64_t(sizeof(int32_t));
}

void max_pool2d_forward(const Tensor& x, const Pool2dGeom& g, Tensor& y, Tensor& ws) {
  if (y.numel() == 0) return;
  if (x.dtype() == DType::f32) {
    run(pool_fwd_entry(g), {&x, &y, &ws}, "max pooling forward");
    return;
  }
  TX_DISPATCH_FLOAT(x.dtype(), "max_pool2d", {
    using T = scalar_t;
    pool_fwd_ref(x.data<T>(), g, y.data<T>(), static_cast<int32_t*>(ws.raw_data()));
  });
}

void max_pool2d_indices(const Tensor& x, const Pool2dGeom& g, Tensor& idx) {
  if (idx.numel() == 0) return;
  TX_DISPATCH_FLOAT(x.dtype(), "max_pool2d_indices", {
    using T = scalar_t;
    pool_fwd_ref(x.data<T>(), g, static_cast<T*>(nullptr), idx.data<int64_t>());
  });
}

void max_pool2d_backward(const Tensor& dy, const Tensor& ws, const Pool2dGeom& g, Tensor& dx) {
  if (dx.numel() == 0) return;
  if (dy.numel() == 0) return fill(dx, 0.0);
  if (dx.dtype() == DType::f32) {
    run(pool_bwd_entry(g), {&dy, &ws, &dx}, "max pooling backward");
    return;
  }
  TX_DISPATCH_FLOAT(dx.dtype(), "max_pool2d_backward", {
    using T = scalar_t;
    pool_bwd_ref(dy.data<T>(), static_cast<const int32_t*>(ws.raw_data()), g, dx.data<T>());
  });
}

}  // namespace titanax::kernels::cpu
