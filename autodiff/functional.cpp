#include "autodiff/functional.h"

#include <algorithm>
#include <string>

#include "autodiff/tape.h"
#include "jit/vmap.h"
#include "ops/ops.h"

namespace titanax {

namespace {

bool differentiable(const Tensor& t) { return t.defined() && is_floating(t.dtype()); }

// Fresh leaves sharing each floating primal's storage, so fn's graph starts here and the caller's flags
// and .grad() stay as they were (requiring grad unless `require_grad` is false: jvp's, which needs no
// tape). Under create_graph a primal that is itself recorded is copied by an op instead, so results stay
// differentiable with respect to whatever it was computed from. Each keeps its primal's tangents under
// an enclosing jvp (detail::detach).
TensorList leaves_of(const TensorList& primals, bool create_graph, const char* api, Loc loc, bool require_grad = true) {
  TensorList xs;
  for (size_t i = 0; i < primals.size(); ++i) {
    const Tensor& p = primals[i];
    if (!p.defined())
      throw AutodiffError(std::string(api) + ": primal " + std::to_string(i) + " is undefined", "a tensor", "Tensor()",
                          "pass every argument fn takes", loc);
    if (!is_floating(p.dtype())) xs.push_back(p);
    else if (create_graph && p.requires_grad()) xs.push_back(p.clone());
    else xs.push_back(require_grad ? detail::detach(p).set_requires_grad() : detail::detach(p));
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
    out[i] = create_graph ? gi : detail::detach(gi);
  }
  return out;
}

TensorList detached(TensorList ts, bool create_graph) {
  if (!create_graph)
    for (auto& t : ts)
      t = detail::detach(t);
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

// ------------------------------------------------------------------------------------ forward mode

namespace detail {

namespace {
thread_local JvpStats t_jvp_stats;
thread_local std::vector<ForwardMode*> t_forward_modes;  // the active jvps, innermost last

// J t from the op's vjp: g(u) = J^T u is linear in the output cotangents u, so the gradient of
// <g(u), t> with respect to u is J t. Recorded (differentiable again) when the caller records.
TensorList jvp_by_vjp(const Op& op, const TensorList& in, const TensorList& out, const TensorList& t, bool record) {
  GradModeGuard on(true);
  TensorList us, cts;
  for (const Tensor& y : out) {
    const bool f = y.defined() && is_floating(y.dtype());
    us.push_back(f ? zeros_like(y).set_requires_grad() : Tensor());
    cts.push_back(f ? us.back() : zeros_like(y));
  }
  std::vector<bool> needs;
  for (const Tensor& ti : t) needs.push_back(ti.defined());
  const TensorList g = op.vjp(in, op.saves_outputs() ? out : TensorList(out.size()), cts, needs);
  const Tensor s = contract(g, t);  // the vjp's cotangents of the inputs have the inputs' (= t's) dtypes
  TensorList r(out.size());
  if (!s.defined()) return r;
  TensorList wrt;
  for (const Tensor& u : us)
    if (u.defined()) wrt.push_back(u);
  BackwardOptions o;
  o.create_graph = record;
  const TensorList gu = grad(s, wrt, o);
  for (size_t k = 0, w = 0; k < out.size(); ++k)
    if (us[k].defined()) r[k] = record ? gu[w++] : detach(gu[w++]);
  return r;
}
}  // namespace

ForwardMode::ForwardMode() : prev_(set_apply_observer(this)) { t_forward_modes.push_back(this); }
ForwardMode::~ForwardMode() {
  t_forward_modes.pop_back();
  set_apply_observer(prev_);
}

Tensor detach(const Tensor& t) {
  if (!t.defined()) return t;
  Tensor d = t.detach();
  for (ForwardMode* f : t_forward_modes)
    if (Tensor tt = f->tangent(t); tt.defined()) f->set_tangent(d, tt);
  return d;
}

void ForwardMode::set_tangent(const Tensor& primal, const Tensor& tangent) {
  if (tangents_.size() >= 2 * swept_size_ + 64) {  // drop the entries of primals that died (amortised)
    for (auto it = tangents_.begin(); it != tangents_.end();) it = it->second.primal.expired() ? tangents_.erase(it) : std::next(it);
    swept_size_ = tangents_.size();
  }
  tangents_[primal.get()] = {primal.impl_ptr(), tangent};
}

Tensor ForwardMode::tangent(const Tensor& primal) const {
  auto it = tangents_.find(primal.get());
  if (it == tangents_.end() || it->second.primal.lock().get() != primal.get()) return {};
  return it->second.tangent;
}

void ForwardMode::on_apply(const OpPtr& op, const TensorList& inputs, const TensorList& outputs) {
  if (prev_) prev_->on_apply(op, inputs, outputs);
  TensorList t;
  bool any = false;
  for (const Tensor& x : inputs) {
    t.push_back(x.defined() && is_floating(x.dtype()) ? tangent(x) : Tensor());
    any = any || t.back().defined();
  }
  if (!any || !op->differentiable()) return;
  // The tangents' ops are seen by the observers below this one (an outer jvp, a trace), not by this one.
  ApplyObserver* self = set_apply_observer(prev_);
  struct Restore {
    ApplyObserver* o;
    ~Restore() { set_apply_observer(o); }
  } restore{self};
  // Recorded on the tape only where the caller differentiates it again (create_graph, or a tangent or
  // primal that requires grad inside fn).
  bool record = false;
  for (size_t i = 0; i < inputs.size(); ++i)
    record = record || (inputs[i].defined() && inputs[i].requires_grad()) || (t[i].defined() && t[i].requires_grad());
  record = record && GradMode::enabled();
  TensorList out_t;
  if (op->linear()) {
    TensorList args;
    for (size_t i = 0; i < inputs.size(); ++i)
      args.push_back(!inputs[i].defined() || !is_floating(inputs[i].dtype()) ? inputs[i] : t[i].defined() ? t[i] : zeros_like(inputs[i]));
    out_t = apply(op, args);
    ++t_jvp_stats.by_rule;
  } else if (auto r = op->jvp(inputs, outputs, t)) {
    out_t = *r;
    ++t_jvp_stats.by_rule;
  } else {
    out_t = jvp_by_vjp(*op, inputs, outputs, t, record);
    ++t_jvp_stats.by_vjp;
  }
  for (size_t k = 0; k < outputs.size() && k < out_t.size(); ++k) {
    if (!out_t[k].defined() || !outputs[k].defined() || !is_floating(outputs[k].dtype())) continue;
    const Tensor tk = out_t[k].dtype() == outputs[k].dtype() ? out_t[k] : out_t[k].astype(outputs[k].dtype());
    set_tangent(outputs[k], tk);
    // The tape keeps an op's outputs for its vjp as detached aliases (autodiff/tape.cpp): they carry the
    // same tangent, so a backward pass inside fn (forward over reverse) sees it.
    const std::shared_ptr<Node>& node = outputs[k].get()->grad_fn;
    if (node && outputs[k].get()->output_index < node->outputs.size()) set_tangent(node->outputs[outputs[k].get()->output_index], tk);
  }
}

void ForwardMode::on_write(const Tensor& dst, const Tensor& src) {
  if (prev_) prev_->on_write(dst, src);
  bool involved = tangent(src).defined();
  for (const auto& [impl, e] : tangents_)
    if (auto p = e.primal.lock(); p && p->storage == dst.storage()) involved = true;
  if (involved)
    throw AutodiffError("jvp: an in-place write (copy_ / fill_) of a value that carries a tangent", "fn written out of place",
                        "a write into " + spec_str(dst), "compute a new tensor instead (where(), concat(), slice_scatter)");
}

void ForwardMode::on_host_read(const Tensor& t) {
  if (prev_) prev_->on_host_read(t);
}

void ForwardMode::on_alias(const Tensor& from, const Tensor& to) {
  if (prev_) prev_->on_alias(from, to);
  if (Tensor t = tangent(from); t.defined()) set_tangent(to, t);
}

const JvpStats& jvp_stats() { return t_jvp_stats; }
void reset_jvp_stats() { t_jvp_stats = {}; }

}  // namespace detail

std::pair<TensorList, TensorList> jvp(const VectorFn& fn, const TensorList& primals, const TensorList& tangents,
                                      const FunctionalOptions& opts, Loc loc) {
  const TensorList v = paired(tangents, primals, "jvp", "tangents", "primal", loc);
  GradModeGuard on(true);
  // Fresh handles on the primals' memory that need no tape (forward mode keeps none).
  const TensorList xs = leaves_of(primals, opts.create_graph, "jvp", loc, /*require_grad=*/false);
  TensorList ys, ts;
  {
    detail::ForwardMode forward;
    for (size_t i = 0; i < xs.size(); ++i)
      if (differentiable(xs[i]) && v[i].defined()) forward.set_tangent(xs[i], v[i]);
    ys = fn(xs);
    for (const Tensor& y : ys) ts.push_back(differentiable(y) ? forward.tangent(y) : Tensor());
  }
  for (size_t i = 0; i < ys.size(); ++i)
    if (differentiable(ys[i]) && !ts[i].defined()) ts[i] = zeros_like(ys[i]);
  return {detached(ys, opts.create_graph), detached(ts, opts.create_graph)};
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
  return {opts.create_graph ? y : detail::detach(y), gradients(contract(g, vs), xs, opts.create_graph)};
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
