// cond / while_loop / scan: each traces its functions into sub-graphs (captures lifted into extra
// inputs) and applies one op that runs them (see control_flow.h).
#include "jit/control_flow.h"

#include <algorithm>
#include <cstdint>

#include "autodiff/autodiff.h"
#include "core/error.h"
#include "jit/batching.h"
#include "ops/ops.h"

namespace titanax::jit {
namespace {

// A traced function: its graph takes (the function's arguments..., captures...). The captures are
// tensors read from outside; the node that applies the graph takes them as inputs, so the op keeps only
// their number. (Holding them would keep an enclosing trace's temporaries alive past that trace, which
// then takes a literal filled during it for state written in place: a spurious update.)
struct SubGraph {
  std::shared_ptr<const Graph> g;
  size_t n_captures = 0;
  std::vector<TensorSpec> out_specs() const {
    std::vector<TensorSpec> s;
    for (int o : g->outputs) s.push_back(g->values[size_t(o)].spec);
    return s;
  }
};

// Traces fn on args (unrecorded: the tape sees only the op that applies the graph). Every constant or
// state value whose storage existed before the trace is a capture: it becomes an input of the graph,
// so its current value (under an outer trace: the outer graph's value) is passed in at each run. The
// captures are appended to `captures`, for the caller to pass as the node's inputs.
SubGraph trace_sub(const Fn& fn, const TensorList& args, const std::string& what, TensorList& captures) {
  const uint64_t first = Storage::next_serial();
  Graph g;
  {
    NoGradGuard ng;
    g = trace(fn, args);
  }
  if (!g.updates.empty())
    throw TraceError(what + " writes in place into a tensor from outside", "pure functions (results returned, not written)",
                     g.target_name(g.updates[0].target), "return the new value and write it after the call");
  SubGraph s;
  for (size_t id = 0; id < g.values.size(); ++id) {
    Value& v = g.values[id];
    if ((v.kind != Value::Kind::constant && v.kind != Value::Kind::state) || v.constant.storage()->serial() >= first) continue;
    captures.push_back(v.constant);
    ++s.n_captures;
    v.kind = Value::Kind::input;
    v.index = int(g.inputs.size());
    v.constant = Tensor();
    g.inputs.push_back(int(id));
  }
  s.g = std::make_shared<const Graph>(std::move(g));
  return s;
}

// Runs a sub-graph on (arguments..., values of its captures...); results that are its constants are
// copied, so callers never write into the graph.
TensorList run_sub(const SubGraph& s, const TensorList& args) {
  TensorList out = s.g->run(args);
  for (size_t k = 0; k < out.size(); ++k)
    if (s.g->values[size_t(s.g->outputs[k])].kind == Value::Kind::constant) out[k] = out[k].clone();
  return out;
}

// The sub-graph's nodes applied one by one through apply(): recorded on the tape (for a vjp) and seen
// by a tracer, unlike Graph::run.
TensorList replay_recorded(const Graph& g, const TensorList& args) {
  std::vector<Tensor> env(g.values.size());
  for (size_t i = 0; i < g.inputs.size(); ++i) env[size_t(g.inputs[i])] = args[i];
  for (size_t v = 0; v < g.values.size(); ++v)
    if (g.values[v].kind == Value::Kind::constant) env[v] = g.values[v].constant;
  for (const Node& n : g.nodes) {
    TensorList in;
    for (int v : n.inputs) in.push_back(env[size_t(v)]);
    TensorList out = titanax::apply(n.op, in);
    for (size_t k = 0; k < n.outputs.size(); ++k) env[size_t(n.outputs[k])] = out[k];
  }
  TensorList res;
  for (int o : g.outputs) res.push_back(env[size_t(o)]);
  return res;
}

// Throws unless `got` (results of `what`) has the specs `want` (those of `ref`).
void check_specs(const std::vector<TensorSpec>& want, const std::vector<TensorSpec>& got, const std::string& what,
                 const std::string& ref) {
  if (want.size() != got.size())
    throw ShapeError(what + " returns another number of results than " + ref, std::to_string(want.size()), std::to_string(got.size()),
                     "return the same tensors from both");
  for (size_t k = 0; k < want.size(); ++k) {
    const std::string r = what + " result " + std::to_string(k);
    if (want[k].shape != got[k].shape)
      throw ShapeError(r + " has another shape than " + ref, spec_str(want[k]), spec_str(got[k]), "reshape or broadcast it to match");
    if (want[k].dtype != got[k].dtype)
      throw DTypeError(r + " has another dtype than " + ref, spec_str(want[k]), spec_str(got[k]), "cast it with astype()");
  }
}

std::vector<TensorSpec> specs_of(const TensorList& ts) {
  std::vector<TensorSpec> s;
  for (const auto& t : ts) s.push_back({t.shape(), t.dtype(), t.device()});
  return s;
}

void check_scalar(const Tensor& t, const std::string& what) {
  if (!t.defined()) throw ValueError(what + " is undefined", "a 0-d tensor", "Tensor()");
  if (t.shape().size() != 0) throw ShapeError(what + " must be a 0-d tensor", "[]", t.shape().str(), "reduce it, e.g. with sum() or a comparison of a 0-d tensor");
}

// Nonzero (read inside an op's forward: not a host read of the traced function).
bool truth(const Tensor& pred) { return pred.item() != 0.0; }

// Base of the control-flow ops: forward() runs sub-graphs, so there is no kernel.
struct ControlOp : Op {
  // Each op wraps its own functions: no two are interchangeable (the JIT's CSE compares attrs).
  std::string attrs() const override { return "fn=" + std::to_string(reinterpret_cast<uintptr_t>(this)); }
  // The sub-graphs allocate the results: the memory plan must not place them.
  bool custom_forward() const override { return true; }
  // cond and while_loop read their predicate on the host; a captured scan would hide its body's nodes.
  bool capturable() const override { return false; }
  void cpu(const TensorList&, TensorList&) const override {
    throw InternalError(std::string(name()) + ": the kernel is the traced sub-graph", "forward()", "cpu()");
  }

 protected:
  // `out` with every result that shares storage with an input or an earlier result copied. A branch or
  // body may pass an argument through or return one tensor twice (a vjp's equal cotangents), and a loop
  // may run zero times. Under a trace, a result that aliases another tensor takes over its storage and
  // layout, so that later reads of that tensor through another handle (a detach()ed leaf, a cotangent)
  // resolve to the result, and a replay that takes another branch or trip count reads the wrong value.
  static TensorList unaliased(TensorList out, const TensorList& in) {
    for (size_t k = 0; k < out.size(); ++k) {
      auto shares = [&](const Tensor& t) { return t.storage() == out[k].storage(); };
      if (std::any_of(in.begin(), in.end(), shares) || std::any_of(out.begin(), out.begin() + ptrdiff_t(k), shares))
        out[k] = out[k].clone();
    }
    return out;
  }
};

// Inputs: {pred, operands..., captures of the false branch..., captures of the true branch...}.
struct CondOp final : ControlOp {
  CondOp(SubGraph f, SubGraph t, size_t n) : br{std::move(f), std::move(t)}, n_operands(n) {}
  const char* name() const override { return "cond"; }
  std::vector<TensorSpec> infer(const TensorList&) const override { return br[1].out_specs(); }
  // The operands and captures of branch b (as its graph takes them), from the node's inputs after pred.
  template <class T>
  std::vector<T> args_of(const std::vector<T>& rest, int b) const {
    std::vector<T> a(rest.begin(), rest.begin() + ptrdiff_t(n_operands));
    const size_t off = n_operands + (b ? br[0].n_captures : 0);
    a.insert(a.end(), rest.begin() + ptrdiff_t(off), rest.begin() + ptrdiff_t(off + br[size_t(b)].n_captures));
    return a;
  }
  // Position of a node input after pred (`i`) among branch b's graph inputs, or -1 (the other's capture).
  int local(size_t i, int b) const {
    if (i < n_operands) return int(i);
    const size_t cap0 = n_operands + (b ? br[0].n_captures : 0);
    return i >= cap0 && i < cap0 + br[size_t(b)].n_captures ? int(n_operands + (i - cap0)) : -1;
  }
  TensorList forward(const TensorList& in) const override {
    const int b = truth(in[0]);
    return unaliased(run_sub(br[size_t(b)], args_of(TensorList(in.begin() + 1, in.end()), b)), in);
  }
  // A cond over the two branches' vjps: branch b replays its sub-graph recorded and differentiates it
  // with the incoming cotangents; inputs the other branch owns (its captures) get zeros. Being a cond,
  // it is one node under an outer trace, choosing at replay time like the forward.
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct, const std::vector<bool>& needs) const override {
    std::vector<size_t> wanted;  // node inputs after pred that get a cotangent
    for (size_t i = 1; i < in.size(); ++i)
      if (needs[i] && is_floating(in[i].dtype())) wanted.push_back(i - 1);
    TensorList result(in.size());
    if (wanted.empty()) return result;
    // The vjp's operands: the node's inputs after pred, then the cotangents of its results.
    TensorList operands(in.begin() + 1, in.end());
    const size_t n_rest = operands.size();
    operands.insert(operands.end(), ct.begin(), ct.end());
    auto branch_vjp = [this, wanted, n_rest](int b) {
      return [this, wanted, n_rest, b](const TensorList& v) {
        GradModeGuard on(true);
        TensorList a = args_of(TensorList(v.begin(), v.begin() + ptrdiff_t(n_rest)), b);
        for (auto& t : a) {
          t = t.detach();
          if (is_floating(t.dtype())) t.set_requires_grad(true);
        }
        TensorList outs = replay_recorded(*br[size_t(b)].g, a);
        Tensor root;  // sum_k <out_k, ct_k>: its gradient is the vjp
        for (size_t k = 0; k < outs.size(); ++k) {
          if (!is_floating(outs[k].dtype())) continue;
          Tensor term = sum(outs[k] * v[n_rest + k]);
          root = root.defined() ? root + term.astype(root.dtype()) : term;
        }
        TensorList wrt;
        for (size_t i : wanted)
          if (local(i, b) >= 0) wrt.push_back(a[size_t(local(i, b))]);
        const TensorList g = root.defined() ? grad(root, wrt) : TensorList{};
        TensorList res;
        size_t j = 0;
        for (size_t i : wanted) res.push_back(local(i, b) >= 0 && !g.empty() ? g[j++] : zeros_like(v[i]));
        return res;
      };
    };
    const TensorList got = cond(in[0], branch_vjp(1), branch_vjp(0), operands);
    for (size_t k = 0; k < wanted.size(); ++k) result[wanted[k] + 1] = got[k];
    return result;
  }
  SubGraph br[2];  // [0] false_fn, [1] true_fn
  size_t n_operands;
};

// Inputs: {init..., captures of cond_fn..., captures of body_fn...}.
struct WhileOp final : ControlOp {
  WhileOp(SubGraph c, SubGraph b, size_t n) : cond_g(std::move(c)), body_g(std::move(b)), n_carry(n) {}
  const char* name() const override { return "while_loop"; }
  std::vector<TensorSpec> infer(const TensorList&) const override { return body_g.out_specs(); }
  TensorList forward(const TensorList& in) const override {
    const ptrdiff_t n = ptrdiff_t(n_carry), nc = ptrdiff_t(cond_g.n_captures);
    const TensorList cond_caps(in.begin() + n, in.begin() + n + nc), body_caps(in.begin() + n + nc, in.end());
    TensorList carry(in.begin(), in.begin() + n);
    auto with = [](TensorList a, const TensorList& caps) {
      a.insert(a.end(), caps.begin(), caps.end());
      return a;
    };
    while (truth(cond_g.g->run(with(carry, cond_caps))[0])) carry = run_sub(body_g, with(carry, body_caps));
    return unaliased(carry, in);
  }
  TensorList vjp(const TensorList&, const TensorList&, const TensorList&, const std::vector<bool>&) const override {
    throw AutodiffError("while_loop is not reverse-mode differentiable (its trip count is only known at run time)",
                        "scan or a C++ loop with a fixed number of steps", "a gradient through while_loop",
                        "use jit::scan with a fixed length, or detach() the loop's inputs");
  }
  SubGraph cond_g, body_g;
  size_t n_carry;
};

// Inputs: {init..., xs..., captures...}; results: {carry..., ys...}. Steps run over t = 0 .. T-1, or
// T-1 .. 0 when reverse; y_t lands at index t either way.
struct ScanOp final : ControlOp {
  ScanOp(SubGraph f, size_t nc, size_t nx, bool rev) : body(std::move(f)), n_carry(nc), n_xs(nx), reverse(rev) {}
  const char* name() const override { return "scan"; }
  std::string attrs() const override { return ControlOp::attrs() + (reverse ? " reverse=1" : ""); }
  std::vector<TensorSpec> infer(const TensorList& in) const override {
    std::vector<TensorSpec> s = body.out_specs();
    for (size_t k = n_carry; k < s.size(); ++k) {
      std::vector<int64_t> d{in[n_carry].shape()[0]};
      for (size_t a = 0; a < s[k].shape.size(); ++a) d.push_back(s[k].shape[a]);
      s[k].shape = Shape(d);
    }
    return s;
  }
  TensorList forward(const TensorList& in) const override {
    NoGradGuard ng;  // the slicing and stacking below belong to this op
    const int64_t steps = in[n_carry].shape()[0];
    const TensorList caps(in.begin() + ptrdiff_t(n_carry + n_xs), in.end());
    TensorList carry(in.begin(), in.begin() + ptrdiff_t(n_carry));
    const size_t n_ys = body.g->outputs.size() - n_carry;
    std::vector<TensorList> ys(n_ys, TensorList(size_t(steps)));
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t t = reverse ? steps - 1 - s : s;
      TensorList args = carry;
      for (size_t i = 0; i < n_xs; ++i) args.push_back(in[n_carry + i].slice(0, t, t + 1).squeeze(0));
      args.insert(args.end(), caps.begin(), caps.end());
      TensorList out = body.g->run(args);
      carry.assign(out.begin(), out.begin() + ptrdiff_t(n_carry));
      for (size_t k = 0; k < n_ys; ++k) ys[k][size_t(t)] = out[n_carry + k].unsqueeze(0);
    }
    const std::vector<TensorSpec> specs = infer(in);
    TensorList res = carry;
    for (size_t k = 0; k < n_ys; ++k) {
      const TensorSpec& s = specs[n_carry + k];
      res.push_back(steps == 0 ? zeros(s.shape, s.dtype, s.device) : concat(ys[k], 0));
    }
    for (size_t k = 0; k < n_carry; ++k)  // a carry that is a constant of the body is copied out
      if (steps > 0 && body.g->values[size_t(body.g->outputs[k])].kind == Value::Kind::constant) res[k] = res[k].clone();
    return unaliased(res, in);
  }
  // Reverse mode as two scans (JAX's scan transpose, with the carries recomputed instead of saved): a
  // scan in the forward direction emits the carry entering each step; a scan in the other direction
  // replays the body at each step recorded on the tape and pulls the cotangents back through it:
  //   d_carry_t = (d f / d carry_t)^T (d_carry_{t+1}, ct_y_t),  d_x_t likewise (stacked as ys),
  //   d_captures = sum over t of their step's pullback (accumulated in the carry).
  // Both are scans written with ops, so under an outer trace the backward is two nodes, and it is itself
  // differentiable. Integer carries, xs and ys take no cotangent.
  TensorList vjp(const TensorList& in, const TensorList&, const TensorList& ct, const std::vector<bool>& needs) const override {
    const size_t n_ys = body.g->outputs.size() - n_carry;
    TensorList result(in.size());
    bool any = false;
    for (size_t i = 0; i < in.size(); ++i) any = any || (needs[i] && is_floating(in[i].dtype()));
    if (!any) return result;
    const TensorList init(in.begin(), in.begin() + ptrdiff_t(n_carry)),
        xs(in.begin() + ptrdiff_t(n_carry), in.begin() + ptrdiff_t(n_carry + n_xs)),
        caps(in.begin() + ptrdiff_t(n_carry + n_xs), in.end());
    const std::shared_ptr<const Graph> g = body.g;
    const size_t nc = n_carry, nx = n_xs;
    auto floating_at = [](const TensorList& ts) {
      std::vector<size_t> idx;
      for (size_t k = 0; k < ts.size(); ++k)
        if (is_floating(ts[k].dtype())) idx.push_back(k);
      return idx;
    };
    // 1. The carry entering each step, stacked: [T, ...] per carry.
    const TensorList fwd = scan(
        [&](const TensorList& c, const TensorList& x) {
          TensorList a = c;
          a.insert(a.end(), x.begin(), x.end());
          a.insert(a.end(), caps.begin(), caps.end());
          const TensorList o = replay_recorded(*g, a);
          return std::make_pair(TensorList(o.begin(), o.begin() + ptrdiff_t(nc)), c);
        },
        init, xs, reverse);
    const TensorList carries(fwd.begin() + ptrdiff_t(n_carry), fwd.end());
    // 2. Backwards through the steps. Carry: {d carry (floating carries), d captures (floating)};
    // xs: {carry entering the step..., x_t..., ct of y_t (floating ys), the captures}; ys: d x_t (floating xs).
    const std::vector<size_t> fc = floating_at(init), fx = floating_at(xs), fcap = floating_at(caps);
    std::vector<size_t> fy;
    for (size_t k = 0; k < n_ys; ++k)
      if (is_floating(ct[n_carry + k].dtype())) fy.push_back(k);
    // The captures enter as xs too, broadcast over the steps (a view): read through the closure, they
    // would be detached below and lifted into the traced body as new leaves, cutting the path of a
    // second derivative back to them.
    TensorList gc0, gxs = carries;
    for (size_t k : fc) gc0.push_back(ct[k]);
    for (size_t j : fcap) gc0.push_back(zeros_like(caps[j]));
    gxs.insert(gxs.end(), xs.begin(), xs.end());
    for (size_t k : fy) gxs.push_back(ct[n_carry + k]);
    const int64_t steps = xs[0].shape()[0];
    for (const Tensor& c : caps) {
      std::vector<int64_t> d{steps};
      for (int64_t e : c.shape()) d.push_back(e);
      gxs.push_back(expand(c.unsqueeze(0), Shape(d)));
    }
    const size_t n_ct_ys = fy.size();
    const TensorList bwd = scan(
        [&](const TensorList& gc, const TensorList& gx) {
          GradModeGuard on(true);
          TensorList a(gx.begin(), gx.begin() + ptrdiff_t(nc + nx));  // carry_t, x_t
          a.insert(a.end(), gx.begin() + ptrdiff_t(nc + nx + n_ct_ys), gx.end());  // the captures
          for (auto& t : a) {
            t = t.detach();
            if (is_floating(t.dtype())) t.set_requires_grad(true);
          }
          const TensorList o = replay_recorded(*g, a);
          Tensor root;  // sum <out, cotangent>: its gradient is the pullback
          auto add = [&](const Tensor& out, const Tensor& cot) {
            Tensor term = sum(out * cot);
            root = root.defined() ? root + term.astype(root.dtype()) : term;
          };
          for (size_t i = 0; i < fc.size(); ++i) add(o[fc[i]], gc[i]);
          for (size_t i = 0; i < fy.size(); ++i) add(o[nc + fy[i]], gx[nc + nx + i]);
          TensorList wrt;
          for (size_t k : fc) wrt.push_back(a[k]);
          for (size_t i : fx) wrt.push_back(a[nc + i]);
          for (size_t j : fcap) wrt.push_back(a[nc + nx + j]);
          TensorList d = root.defined() ? grad(root, wrt) : TensorList{};
          if (d.empty())
            for (const Tensor& w : wrt) d.push_back(zeros_like(w));
          TensorList next(d.begin(), d.begin() + ptrdiff_t(fc.size()));  // d carry_t
          for (size_t j = 0; j < fcap.size(); ++j) next.push_back(gc[fc.size() + j] + d[fc.size() + fx.size() + j]);
          return std::make_pair(next, TensorList(d.begin() + ptrdiff_t(fc.size()), d.begin() + ptrdiff_t(fc.size() + fx.size())));
        },
        gc0, gxs, !reverse);
    for (size_t i = 0; i < fc.size(); ++i)
      if (needs[fc[i]]) result[fc[i]] = bwd[i];
    for (size_t j = 0; j < fcap.size(); ++j)
      if (needs[n_carry + n_xs + fcap[j]]) result[n_carry + n_xs + fcap[j]] = bwd[fc.size() + j];
    for (size_t i = 0; i < fx.size(); ++i)
      if (needs[n_carry + fx[i]]) result[n_carry + fx[i]] = bwd[fc.size() + fcap.size() + i];
    return result;
  }
  SubGraph body;
  size_t n_carry, n_xs;
  bool reverse;
};
}  // namespace

TensorList cond(const Tensor& pred, const Fn& true_fn, const Fn& false_fn, const TensorList& operands) {
  check_scalar(pred, "cond: pred");
  TensorList in{pred}, t_captures;
  in.insert(in.end(), operands.begin(), operands.end());
  SubGraph t = trace_sub(true_fn, operands, "cond: true_fn", t_captures);
  SubGraph f = trace_sub(false_fn, operands, "cond: false_fn", in);
  check_specs(t.out_specs(), f.out_specs(), "cond: false_fn", "true_fn");
  in.insert(in.end(), t_captures.begin(), t_captures.end());
  const size_t n = operands.size();
  return titanax::apply(std::make_shared<CondOp>(std::move(f), std::move(t), n), std::move(in));
}

TensorList while_loop(const Fn& cond_fn, const Fn& body_fn, const TensorList& init) {
  TensorList in = init;
  SubGraph c = trace_sub(cond_fn, init, "while_loop: cond_fn", in);
  if (c.g->outputs.size() != 1)
    throw ShapeError("while_loop: cond_fn must return one 0-d tensor", "1 result", std::to_string(c.g->outputs.size()) + " results");
  if (const TensorSpec s = c.out_specs()[0]; s.shape.size() != 0)
    throw ShapeError("while_loop: cond_fn result 0 must be a 0-d tensor", "[]", spec_str(s), "reduce it, e.g. with sum() or a comparison of a 0-d tensor");
  SubGraph b = trace_sub(body_fn, init, "while_loop: body_fn", in);
  check_specs(specs_of(init), b.out_specs(), "while_loop: body_fn", "the carry init");
  const size_t n = init.size();
  return titanax::apply(std::make_shared<WhileOp>(std::move(c), std::move(b), n), std::move(in));
}

TensorList scan(const ScanFn& f, const TensorList& init, const TensorList& xs, bool reverse) {
  if (xs.empty()) throw ShapeError("scan: xs is empty", "at least one tensor to scan over", "0 tensors", "pass the sequence as xs");
  TensorList example;  // x[0] of each xs (zeros when T == 0): what f is traced on
  for (size_t i = 0; i < xs.size(); ++i) {
    if (!xs[i].defined()) throw ValueError("scan: xs " + std::to_string(i) + " is undefined", "a tensor", "Tensor()");
    if (xs[i].shape().size() == 0) throw ShapeError("scan: xs " + std::to_string(i) + " is 0-d", "a leading axis to scan over", "[]");
    if (xs[i].shape()[0] != xs[0].shape()[0])
      throw ShapeError("scan: xs have different leading extents", "xs 0: " + xs[0].shape().str(),
                       "xs " + std::to_string(i) + ": " + xs[i].shape().str());
    NoTraceGuard nt;  // building the example is not part of the traced function
    NoGradGuard ng;
    const Tensor x = xs[i].detach();
    std::vector<int64_t> d;
    for (size_t a = 1; a < x.shape().size(); ++a) d.push_back(x.shape()[a]);
    example.push_back(x.shape()[0] > 0 ? x.slice(0, 0, 1).squeeze(0) : zeros(Shape(d), x.dtype(), x.device()));
  }
  const size_t nc = init.size();
  Fn body = [&](const TensorList& in) {
    auto [carry, y] = f(TensorList(in.begin(), in.begin() + ptrdiff_t(nc)), TensorList(in.begin() + ptrdiff_t(nc), in.end()));
    check_specs(specs_of(init), specs_of(carry), "scan: f's carry", "the carry init");
    carry.insert(carry.end(), y.begin(), y.end());
    return carry;
  };
  TensorList args = init;
  args.insert(args.end(), example.begin(), example.end());
  TensorList in = init;
  in.insert(in.end(), xs.begin(), xs.end());
  SubGraph s = trace_sub(body, args, "scan: f", in);
  return titanax::apply(std::make_shared<ScanOp>(std::move(s), nc, xs.size(), reverse), std::move(in));
}

// ------------------------------------------------------------------------------------ batching rules (vmap)

namespace detail {
namespace {

TensorList tensors_of(const std::vector<BatchedValue>& vs) {
  TensorList ts;
  for (const auto& v : vs) ts.push_back(v.t);
  return ts;
}

std::vector<bool> flags_of(const std::vector<BatchedValue>& vs) {
  std::vector<bool> f;
  for (const auto& v : vs) f.push_back(v.batched);
  return f;
}

std::vector<BatchedValue> with_flags(const TensorList& ts, const std::vector<bool>& f) {
  std::vector<BatchedValue> vs;
  for (size_t i = 0; i < ts.size(); ++i) vs.push_back({ts[i], f[i]});
  return vs;
}

template <class T>
std::vector<T> joined(std::vector<T> a, const std::vector<T>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// v with the batch on axis 0 (a shared value broadcast to the batch: a view).
Tensor with_batch(const BatchedValue& v, int64_t B) {
  if (v.batched) return v.t;
  std::vector<int64_t> d{B};
  for (int64_t e : v.t.shape()) d.push_back(e);
  return expand(v.t, Shape(d));
}

// A batched predicate [B] (any dtype, nonzero is true) as bool [B, 1, ...] with `rank` size-1 axes
// behind the batch, to select per example between values of that per-example rank.
Tensor example_mask(const Tensor& pred, int rank) {
  Tensor p = pred.dtype() == DType::bool_ ? pred : ne(pred, scalar(0.0, pred.dtype(), pred.device()));
  std::vector<int64_t> d{p.shape()[0]};
  d.resize(size_t(rank) + 1, 1);
  return reshape(p, Shape(d));
}

// The carries of a loop body (graph inputs: carry..., then `rest`) that are batched in the least
// fixpoint: a carry is batched when its init is or when the body makes it so from batched inputs.
std::vector<bool> carry_fixpoint(const Graph& body, std::vector<bool> carry, const std::vector<bool>& rest) {
  for (bool changed = true; changed;) {
    changed = false;
    const std::vector<bool> out = batched_outputs(body, joined(carry, rest));
    for (size_t k = 0; k < carry.size(); ++k)
      if (out[k] && !carry[k]) carry[k] = changed = true;
  }
  return carry;
}

// Values of a loop's carry: each batched one (flag set) with its batch, the others as they are.
TensorList carry_values(const std::vector<BatchedValue>& vs, const std::vector<bool>& batched, int64_t B) {
  TensorList ts;
  for (size_t k = 0; k < batched.size(); ++k) ts.push_back(batched[k] ? with_batch(vs[k], B) : vs[k].t);
  return ts;
}

TensorList batch_cond(const CondOp& c, const std::vector<BatchedValue>& in, int64_t B, const RunBatched& run) {
  const std::vector<BatchedValue> rest(in.begin() + 1, in.end());
  const std::vector<bool> rest_flags = flags_of(rest);
  if (!in[0].batched) {  // one branch for the whole batch: a cond whose branches are batched
    auto branch = [&](int b) {
      return [&, b](const TensorList& v) {
        const std::vector<BatchedValue> out = run(*c.br[size_t(b)].g, c.args_of(with_flags(v, rest_flags), b));
        TensorList res;
        for (const auto& o : out) res.push_back(with_batch(o, B));
        return res;
      };
    };
    return cond(in[0].t, branch(1), branch(0), tensors_of(rest));
  }
  // A branch per example: both branches on the whole batch, then a select.
  const std::vector<BatchedValue> t = run(*c.br[1].g, c.args_of(rest, 1)), f = run(*c.br[0].g, c.args_of(rest, 0));
  const std::vector<TensorSpec> specs = c.br[1].out_specs();
  TensorList res;
  for (size_t k = 0; k < t.size(); ++k)
    res.push_back(where(example_mask(in[0].t, specs[k].shape.rank()), with_batch(t[k], B), with_batch(f[k], B)));
  return res;
}

TensorList batch_while(const WhileOp& w, const std::vector<BatchedValue>& in, int64_t B, const RunBatched& run) {
  const size_t n = w.n_carry, ncc = w.cond_g.n_captures;
  const std::vector<BatchedValue> init(in.begin(), in.begin() + ptrdiff_t(n)),
      cond_caps(in.begin() + ptrdiff_t(n), in.begin() + ptrdiff_t(n + ncc)), body_caps(in.begin() + ptrdiff_t(n + ncc), in.end());
  std::vector<bool> carry = carry_fixpoint(*w.body_g.g, flags_of(init), flags_of(body_caps));
  const bool per_example = batched_outputs(*w.cond_g.g, joined(carry, flags_of(cond_caps)))[0];
  if (per_example) carry.assign(n, true);
  auto pred = [&](const TensorList& v) { return run(*w.cond_g.g, joined(with_flags(v, carry), cond_caps))[0].t; };
  auto body = [&](const TensorList& v) { return carry_values(run(*w.body_g.g, joined(with_flags(v, carry), body_caps)), carry, B); };
  TensorList res;
  if (!per_example) {
    res = while_loop([&](const TensorList& v) { return TensorList{pred(v)}; }, body, carry_values(init, carry, B));
  } else {
    const std::vector<TensorSpec> specs = w.body_g.out_specs();
    res = while_loop(
        [&](const TensorList& v) {  // while any example goes on
          return TensorList{gt(sum(example_mask(pred(v), 0).astype(DType::f32)), scalar(0.0, DType::f32, v[0].device()))};
        },
        [&](const TensorList& v) {  // examples whose predicate is false keep their carry
          const Tensor p = pred(v);
          TensorList next = body(v);
          for (size_t k = 0; k < n; ++k) next[k] = where(example_mask(p, specs[k].shape.rank()), next[k], v[k]);
          return next;
        },
        carry_values(init, carry, B));
  }
  for (size_t k = 0; k < n; ++k) res[k] = with_batch({res[k], carry[k]}, B);
  return res;
}

TensorList batch_scan(const ScanOp& s, const std::vector<BatchedValue>& in, int64_t B, const RunBatched& run) {
  const size_t nc = s.n_carry, nx = s.n_xs;
  const std::vector<BatchedValue> init(in.begin(), in.begin() + ptrdiff_t(nc)),
      xs(in.begin() + ptrdiff_t(nc), in.begin() + ptrdiff_t(nc + nx)), caps(in.begin() + ptrdiff_t(nc + nx), in.end());
  const std::vector<bool> x_flags = flags_of(xs), cap_flags = flags_of(caps);
  const std::vector<bool> carry = carry_fixpoint(*s.body.g, flags_of(init), joined(x_flags, cap_flags));
  const std::vector<bool> out = batched_outputs(*s.body.g, joined(joined(carry, x_flags), cap_flags));
  TensorList xs_t;  // a batched x scanned along its second axis: [T, B, ...], so x_t is [B, ...]
  for (const auto& x : xs) xs_t.push_back(x.batched ? transpose(x.t, 0, 1) : x.t);
  const TensorList res = scan(
      [&](const TensorList& c, const TensorList& x) {
        const std::vector<BatchedValue> o = run(*s.body.g, joined(joined(with_flags(c, carry), with_flags(x, x_flags)), caps));
        TensorList ys;
        for (size_t k = nc; k < o.size(); ++k) ys.push_back(o[k].t);
        return std::make_pair(carry_values(o, carry, B), ys);
      },
      carry_values(init, carry, B), xs_t, s.reverse);
  TensorList batched;
  for (size_t k = 0; k < nc; ++k) batched.push_back(with_batch({res[k], carry[k]}, B));
  for (size_t k = nc; k < res.size(); ++k)  // ys: [T, B, ...] -> [B, T, ...]; a shared one [T, ...] broadcast
    batched.push_back(out[k] ? transpose(res[k], 0, 1) : with_batch({res[k], false}, B));
  return batched;
}

}  // namespace

std::optional<TensorList> batch_control_flow(const Op& op, const std::vector<BatchedValue>& in, int64_t B, const RunBatched& run) {
  if (const auto* c = dynamic_cast<const CondOp*>(&op)) return batch_cond(*c, in, B, run);
  if (const auto* w = dynamic_cast<const WhileOp*>(&op)) return batch_while(*w, in, B, run);
  if (const auto* s = dynamic_cast<const ScanOp*>(&op)) return batch_scan(*s, in, B, run);
  return std::nullopt;
}

}  // namespace detail

}  // namespace titanax::jit
