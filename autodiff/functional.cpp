#include "autodiff/functional.h"

#include <algorithm>
#include <string>

#include "jit/vmap.h"
#include "ops/ops.h"

namespace titanax {
namespace {

bool differentiable(const Tensor& t) { return t.defined() && is_floating(t.dtype()); }

// Fresh leaves sharing each floating primal's storage, so fn's graph starts here and the caller's flags
// and .grad() stay as they were. Under create_graph a primal that is itself recorded is copied by an op
// instead, so results stay differentiable with respect to whatever it was computed from.
TensorList leaves_of(const TensorList& primals, bool create_graph, const char* api, Loc loc) {
  TensorList xs;
  for (size_t i = 0; i < primals.size(); ++i) {
    const Tensor& p = primals[i];
    if (!p.defined())
      throw AutodiffError(std::string(api) + ": primal " + std::to_string(i) + " is undefined", "a tensor", "Tensor()",
                          "pass every argument fn takes", loc);
    if (!is_floating(p.dtype())) xs.push_back(p);
    else if (create_graph && p.requires_grad()) xs.push_back(p.clone());
    else xs.push_back(p.detach().set_requires_grad());
  }
  return xs;
}

// Checks a list of tangents / cotangents against the tensors they pair with (`of`): the same length,
// each of its partner's shape (cast to its dtype), undefined for a non-floating partner. Undefined for a
// floating partner means zero.
TensorList paired(const TensorList& ts, const TensorList& of, const char* api, const char* what, const char* partner,
                  Loc loc) {
  if (ts.size() != of.size())
    throw AutodiffError(std::string(api) + ": " + what + " do not pair with the " + partner + "s",
                        "one per " + std::string(partner) + ": " + std::to_string(of.size()), std::to_string(ts.size()),
                        std::string("pass an undefined Tensor() for a ") + partner + " that should contribute nothing", loc);
  TensorList out(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    if (!ts[i].defined()) continue;
    const std::string which = std::string(what) + " " + std::to_string(i);
    if (!is_floating(of[i].dtype()))
      throw AutodiffError(std::string(api) + ": " + which + " is given for a non-floating " + partner,
                          "an undefined Tensor() (" + std::string(partner) + " " + std::to_string(i) + " is " +
                              std::string(dtype_name(of[i].dtype())) + ": not differentiated)",
                          ts[i].str(), "", loc);
    if (ts[i].shape() != of[i].shape())
      throw AutodiffError(std::string(api) + ": " + which + " has the wrong shape",
                          of[i].shape().str() + " (" + partner + " " + std::to_string(i) + ")", ts[i].shape().str(), "", loc);
    out[i] = ts[i].dtype() == of[i].dtype() ? ts[i] : ts[i].astype(of[i].dtype());
  }
  return out;
}

// sum over i of <a_i, b_i> for the recorded floating a_i with a defined b_i: the scalar whose gradient
// is the vjp with cotangents b. Undefined when no term remains. Terms of different dtypes add in f64.
Tensor contract(const TensorList& a, const TensorList& b) {
  TensorList terms;
  bool mixed = false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!differentiable(a[i]) || !a[i].requires_grad() || !b[i].defined()) continue;
    terms.push_back(sum(a[i] * b[i]));
    mixed = mixed || terms.back().dtype() != terms.front().dtype();
  }
  Tensor acc;
  for (const Tensor& t : terms) {
    const Tensor s = mixed ? t.astype(DType::f64) : t;
    acc = acc.defined() ? acc + s : s;
  }
  return acc;
}

// d root / d wrt[i] (seeded) for the floating wrt; zeros where root does not depend on wrt[i] or root is
// undefined; undefined for non-floating wrt. Detached unless create_graph.
TensorList gradients(const Tensor& root, const TensorList& wrt, bool create_graph, const Tensor& seed = {}) {
  TensorList floating, out(wrt.size());
  for (const Tensor& w : wrt)
    if (differentiable(w)) floating.push_back(w);
  TensorList g;
  if (root.defined() && root.requires_grad()) {
    BackwardOptions o;
    o.create_graph = create_graph;
    o.seed = seed;
    g = grad(root, floating, o);
  }
  for (size_t i = 0, k = 0; i < wrt.size(); ++i) {
    if (!differentiable(wrt[i])) continue;
    Tensor gi = k < g.size() ? g[k] : zeros_like(wrt[i]);
    ++k;
    out[i] = create_graph ? gi : gi.detach();
  }
  return out;
}

TensorList detached(TensorList ts, bool create_graph) {
  if (!create_graph)
    for (auto& t : ts)
      if (t.defined()) t = t.detach();
  return ts;
}

Tensor scalar_value(const Tensor& y, const char* api, Loc loc) {
  if (!y.defined() || !is_floating(y.dtype()) || y.numel() != 1)
    throw AutodiffError(std::string(api) + " needs fn to return a floating scalar", "one floating element",
                        y.defined() ? y.str() : "an undefined tensor", "reduce fn's result (sum, mean), or use jacobian", loc);
  return y;
}

// Rows k0 .. k0 + n of the identity over y's elements, as a [n, *y.shape] batch of seeds.
Tensor basis(const Tensor& y, int64_t k0, int64_t n) {
  const int64_t m = y.numel();
  std::vector<double> e(size_t(n * m), 0.0);
  for (int64_t k = 0; k < n; ++k) e[size_t(k * m + k0 + k)] = 1.0;
  std::vector<int64_t> d{n};
  for (int64_t x : y.shape().vec()) d.push_back(x);
  return from_vector(e, Shape(d), y.dtype()).to(y.device());
}

// Rows of the Jacobian fed to one vmapped backward pass (bounds the batch's memory).
constexpr int64_t kRowsPerBatch = 128;

// The rows of d outs[i] / d xs[j], each reshaped to outs[i].shape ++ xs[j].shape: a backward pass per
// element of each recorded floating output, batched by vmap unless the result is recorded.
std::vector<TensorList> jacobian_rows(const TensorList& outs, const TensorList& xs, const FunctionalOptions& opts) {
  std::vector<TensorList> result(outs.size(), TensorList(xs.size()));
  TensorList floating;
  for (const Tensor& x : xs)
    if (differentiable(x)) floating.push_back(x);
  for (size_t i = 0; i < outs.size(); ++i) {
    const Tensor& y = outs[i];
    if (!differentiable(y)) continue;
    const int64_t m = y.numel();
    std::vector<TensorList> rows(floating.size());  // per floating x: [n, *x.shape] row blocks
    if (y.requires_grad() && opts.vectorize && !opts.create_graph) {
      const jit::Fn pull = jit::vmap([&](const TensorList& seed) { return gradients(y, floating, false, seed[0]); }, {0},
                                     std::vector<int>(floating.size(), 0));
      for (int64_t k0 = 0; k0 < m; k0 += kRowsPerBatch) {
        const int64_t n = std::min(kRowsPerBatch, m - k0);
        const TensorList g = pull({basis(y, k0, n)});
        for (size_t j = 0; j < floating.size(); ++j) rows[j].push_back(reshape(g[j], Shape{n, floating[j].numel()}));
      }
    } else if (y.requires_grad()) {
      for (int64_t k = 0; k < m; ++k) {
        const TensorList g = gradients(y, floating, opts.create_graph, reshape(basis(y, k, 1), y.shape()));
        for (size_t j = 0; j < floating.size(); ++j) rows[j].push_back(reshape(g[j], Shape{1, floating[j].numel()}));
      }
    }
    for (size_t j = 0, f = 0; j < xs.size(); ++j) {
      if (!differentiable(xs[j])) continue;
      std::vector<int64_t> d = y.shape().vec();
      for (int64_t e : xs[j].shape().vec()) d.push_back(e);
      result[i][j] = rows[f].empty() ? zeros(Shape(d), xs[j].dtype(), xs[j].device()) : reshape(concat(rows[f], 0), Shape(d));
      ++f;
    }
  }
  return result;
}

}  // namespace

std::pair<TensorList, TensorList> jvp(const VectorFn& fn, const TensorList& primals, const TensorList& tangents,
                                      const FunctionalOptions& opts, Loc loc) {
  const TensorList v = paired(tangents, primals, "jvp", "tangents", "primal", loc);
  GradModeGuard on(true);
  const TensorList xs = leaves_of(primals, opts.create_graph, "jvp", loc);
  const TensorList ys = fn(xs);
  // g(u) = J^T u is linear in u; the vjp of g with cotangent v is J v.
  TensorList us(ys.size());
  for (size_t i = 0; i < ys.size(); ++i)
    if (differentiable(ys[i]) && ys[i].requires_grad()) us[i] = zeros_like(ys[i]).set_requires_grad();
  const TensorList jt_u = gradients(contract(ys, us), xs, /*create_graph=*/true);
  const TensorList jv = gradients(contract(jt_u, v), us, opts.create_graph);
  TensorList out(ys.size());
  for (size_t i = 0; i < ys.size(); ++i) {
    if (!differentiable(ys[i])) continue;
    out[i] = us[i].defined() ? jv[i] : zeros_like(ys[i]);
  }
  return {detached(ys, opts.create_graph), out};
}

VjpResult vjp(const VectorFn& fn, const TensorList& primals, const FunctionalOptions& opts, Loc loc) {
  GradModeGuard on(true);
  const TensorList xs = leaves_of(primals, opts.create_graph, "vjp", loc);
  const TensorList ys = fn(xs);
  VjpResult r;
  r.outputs = detached(ys, opts.create_graph);
  r.pullback = [xs, ys, create_graph = opts.create_graph, loc](const TensorList& cotangents) {
    const TensorList u = paired(cotangents, ys, "vjp's pullback", "cotangents", "output", loc);
    GradModeGuard on(true);
    return gradients(contract(ys, u), xs, create_graph);
  };
  return r;
}

std::pair<Tensor, TensorList> hvp(const ScalarFn& fn, const TensorList& primals, const TensorList& v,
                                  const FunctionalOptions& opts, Loc loc) {
  const TensorList vs = paired(v, primals, "hvp", "vectors v", "primal", loc);
  GradModeGuard on(true);
  const TensorList xs = leaves_of(primals, opts.create_graph, "hvp", loc);
  const Tensor y = scalar_value(fn(xs), "hvp", loc);
  const TensorList g = gradients(y, xs, /*create_graph=*/true);
  return {opts.create_graph ? y : y.detach(), gradients(contract(g, vs), xs, opts.create_graph)};
}

std::vector<TensorList> jacobian(const VectorFn& fn, const TensorList& primals, const FunctionalOptions& opts, Loc loc) {
  GradModeGuard on(true);
  const TensorList xs = leaves_of(primals, opts.create_graph, "jacobian", loc);
  return jacobian_rows(fn(xs), xs, opts);
}

std::vector<TensorList> hessian(const ScalarFn& fn, const TensorList& primals, const FunctionalOptions& opts, Loc loc) {
  GradModeGuard on(true);
  const TensorList xs = leaves_of(primals, opts.create_graph, "hessian", loc);
  const Tensor y = scalar_value(fn(xs), "hessian", loc);
  return jacobian_rows(gradients(y, xs, /*create_graph=*/true), xs, opts);
}

}  // namespace titanax
