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

// One cached primitive per (kind, geometry).
enum Kind : int64_t { kConvFwd, kConvBwdData, kConvBwdWeights, kPoolFwd, kPoolBwd };
using Key = std::array<int64_t, 13>;
struct Entry {
  dnnl::primitive prim;
  memory::desc ws;  // pooling workspace (empty for convolutions)
};

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

void run(const dnnl::primitive& p, const std::unordered_map<int, memory>& args, const char* what) {
  try {
    p.execute(stream(), args);
    stream().wait();
  } catch (const dnnl::error& e) {
    dnnl_failed(what, e);
  }
}

memory mem(const memory::desc& d, const Tensor& t) { return memory(d, engine(), const_cast<void*>(t.raw_data())); }

struct ConvDescs {
  memory::desc src, wei, bias, dst;
  memory::dims strides, pad;
};
ConvDescs conv_descs(const Conv2dGeom& g, bool bias) {
  ConvDescs d;
  d.src = md({g.N, g.C, g.H, g.W}, tag::nchw);
  d.wei = md({g.O, g.C, g.KH, g.KW}, tag::oihw);
  d.bias = bias ? md({g.O}, tag::x) : memory::desc();
  d.dst = md({g.N, g.O, g.OH(), g.OW()}, tag::nchw);
  d.strides = {g.SH, g.SW};
  d.pad = {g.PH, g.PW};
  return d;
}
Key conv_key(Kind k, const Conv2dGeom& g, bool bias) {
  return {k, g.N, g.C, g.H, g.W, g.O, g.KH, g.KW, g.SH, g.SW, g.PH, g.PW, bias};
}
dnnl::convolution_forward::primitive_desc conv_fwd_pd(const ConvDescs& d) {
  dnnl::convolution_forward::desc fd(dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, d.src,
                                     d.wei, d.bias, d.dst, d.strides, d.pad, d.pad);
  return dnnl::convolution_forward::primitive_desc(fd, engine());
}

void conv_fwd_f32(const Tensor& x, const Tensor& w, const Tensor* b, const Conv2dGeom& g, Tensor& y) {
  ConvDescs d = conv_descs(g, b != nullptr);
  const Entry& e = cached(conv_key(kConvFwd, g, b != nullptr), "convolution forward",
                          [&] { return Entry{dnnl::convolution_forward(conv_fwd_pd(d)), {}}; });
  std::unordered_map<int, memory> args{
      {DNNL_ARG_SRC, mem(d.src, x)}, {DNNL_ARG_WEIGHTS, mem(d.wei, w)}, {DNNL_ARG_DST, mem(d.dst, y)}};
  if (b) args.insert({DNNL_ARG_BIAS, mem(d.bias, *b)});
  run(e.prim, args, "convolution forward");
}

void conv_bwd_data_f32(const Tensor& dy, const Tensor& w, const Conv2dGeom& g, Tensor& dx) {
  ConvDescs d = conv_descs(g, false);
  const Entry& e = cached(conv_key(kConvBwdData, g, false), "convolution backward data", [&] {
    dnnl::convolution_backward_data::desc bd(dnnl::algorithm::convolution_direct, d.src, d.wei, d.dst, d.strides,
                                             d.pad, d.pad);
    return Entry{dnnl::convolution_backward_data(dnnl::convolution_backward_data::primitive_desc(bd, engine(), conv_fwd_pd(d))),
                 {}};
  });
  run(e.prim, {{DNNL_ARG_DIFF_DST, mem(d.dst, dy)}, {DNNL_ARG_WEIGHTS, mem(d.wei, w)}, {DNNL_ARG_DIFF_SRC, mem(d.src, dx)}},
      "convolution backward data");
}

void conv_bwd_weights_f32(const Tensor& dy, const Tensor& x, const Conv2dGeom& g, Tensor& dw, Tensor* db) {
  ConvDescs d = conv_descs(g, db != nullptr);
  const Entry& e = cached(conv_key(kConvBwdWeights, g, db != nullptr), "convolution backward weights", [&] {
    dnnl::convolution_backward_weights::desc bd(dnnl::algorithm::convolution_direct, d.src, d.wei, d.bias, d.dst,
                                                d.strides, d.pad, d.pad);
    return Entry{dnnl::convolution_backward_weights(
                     dnnl::convolution_backward_weights::primitive_desc(bd, engine(), conv_fwd_pd(d))),
                 {}};
  });
  std::unordered_map<int, memory> args{
      {DNNL_ARG_SRC, mem(d.src, x)}, {DNNL_ARG_DIFF_DST, mem(d.dst, dy)}, {DNNL_ARG_DIFF_WEIGHTS, mem(d.wei, dw)}};
  if (db) args.insert({DNNL_ARG_DIFF_BIAS, mem(d.bias, *db)});
  run(e.prim, args, "convolution backward weights");
}

Key pool_key(Kind k, const Pool2dGeom& g) { return {k, g.N, g.C, g.H, g.W, g.KH, g.KW, g.SH, g.SW, g.PH, g.PW, 0, 0}; }
dnnl::pooling_forward::primitive_desc pool_fwd_pd(const Pool2dGeom& g) {
  dnnl::pooling_forward::desc fd(dnnl::prop_kind::forward_training, dnnl::algorithm::pooling_max,
                                 md({g.N, g.C, g.H, g.W}, tag::nchw), md({g.N, g.C, g.OH(), g.OW()}, tag::nchw),
                                 {g.SH, g.SW}, {g.KH, g.KW}, {g.PH, g.PW}, {g.PH, g.PW});
  return dnnl::pooling_forward::primitive_desc(fd, engine());
}
const Entry& pool_fwd_entry(const Pool2dGeom& g) {
  return cached(pool_key(kPoolFwd, g), "max pooling forward", [&] {
    auto pd = pool_fwd_pd(g);
    return Entry{dnnl::pooling_forward(pd), pd.workspace_desc()};
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
template <class T>
void pool_fwd_ref(const T* x, const Pool2dGeom& g, T* y, int32_t* ws) {
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
          y[(t * OH + i) * OW + j] = best;
          ws[(t * OH + i) * OW + j] = at;
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
    const Entry& e = pool_fwd_entry(g);
    run(e.prim,
        {{DNNL_ARG_SRC, mem(md({g.N, g.C, g.H, g.W}, tag::nchw), x)},
         {DNNL_ARG_DST, mem(md({g.N, g.C, g.OH(), g.OW()}, tag::nchw), y)},
         {DNNL_ARG_WORKSPACE, mem(e.ws, ws)}},
        "max pooling forward");
    return;
  }
  TX_DISPATCH_FLOAT(x.dtype(), "max_pool2d", {
    using T = scalar_t;
    pool_fwd_ref(x.data<T>(), g, y.data<T>(), static_cast<int32_t*>(ws.raw_data()));
  });
}

void max_pool2d_backward(const Tensor& dy, const Tensor& ws, const Pool2dGeom& g, Tensor& dx) {
  if (dx.numel() == 0) return;
  if (dy.numel() == 0) return fill(dx, 0.0);
  if (dx.dtype() == DType::f32) {
    const Entry& fwd = pool_fwd_entry(g);
    const Entry& e = cached(pool_key(kPoolBwd, g), "max pooling backward", [&] {
      dnnl::pooling_backward::desc bd(dnnl::algorithm::pooling_max, md({g.N, g.C, g.H, g.W}, tag::nchw),
                                      md({g.N, g.C, g.OH(), g.OW()}, tag::nchw), {g.SH, g.SW}, {g.KH, g.KW},
                                      {g.PH, g.PW}, {g.PH, g.PW});
      return Entry{dnnl::pooling_backward(dnnl::pooling_backward::primitive_desc(bd, engine(), pool_fwd_pd(g))), {}};
    });
    run(e.prim,
        {{DNNL_ARG_DIFF_DST, mem(md({g.N, g.C, g.OH(), g.OW()}, tag::nchw), dy)},
         {DNNL_ARG_DIFF_SRC, mem(md({g.N, g.C, g.H, g.W}, tag::nchw), dx)},
         {DNNL_ARG_WORKSPACE, mem(fwd.ws, ws)}},
        "max pooling backward");
    return;
  }
  TX_DISPATCH_FLOAT(dx.dtype(), "max_pool2d_backward", {
    using T = scalar_t;
    pool_bwd_ref(dy.data<T>(), static_cast<const int32_t*>(ws.raw_data()), g, dx.data<T>());
  });
}

}  // namespace titanax::kernels::cpu
