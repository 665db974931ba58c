#include <algorithm>
#include <optional>
#include <unordered_map>
#include <unordered_set>

#include "autodiff/autodiff.h"
#include "autodiff/anomaly.h"
#include "ops/ops.h"

namespace titanax {
namespace {

Tensor accumulate(const Tensor& acc, const Tensor& g) { return acc.defined() ? add(acc, g) : g; }

// g passed through a tensor's gradient hooks (Tensor::register_hook) in registration order. `what` names
// the tensor for errors.
Tensor run_grad_hooks(const Hooks<GradHook>& hooks, Tensor g, const std::string& what) {
  for (const GradHook& hook : hooks.snapshot()) {
    Tensor r = hook(g);
    if (!r.defined()) continue;
    detail::check_hook_result(g, r, "a gradient hook of " + what);
    g = std::move(r);
  }
  return g;
}

struct Engine {
  const TensorList& wrt;
  const BackwardOptions& opts;

  std::vector<Node*> nodes;                                  // reachable, sorted by decreasing seq
  std::unordered_map<TensorImpl*, int> leaf_pending;         // edges from reachable nodes into each leaf
  std::unordered_map<TensorImpl*, std::vector<size_t>> leaf_wanted;       // leaf -> indices in wrt
  std::unordered_map<Node*, std::vector<std::pair<uint32_t, size_t>>> mid_wanted;  // node -> (output, wrt index)
  std::unordered_map<TensorImpl*, Tensor> leaf_grad;
  std::unordered_map<Node*, TensorList> cts;
  std::unordered_map<Node*, std::shared_ptr<Node>> owners;  // Node* -> its owning pointer (for create_graph)
  std::unordered_set<Node*> targets;                         // nodes whose outputs need a cotangent
  std::unordered_set<Node*> stops;                           // under stop_at_wrt: producers of wrt tensors
  TensorList result;
  std::vector<bool> done;

  Engine(const TensorList& w, const BackwardOptions& o) : wrt(w), opts(o), result(w.size()), done(w.size(), false) {}

  void collect(Node* root) {
    std::unordered_set<Node*> seen{root};
    std::vector<Node*> stack{root};
    while (!stack.empty()) {
      Node* n = stack.back();
      stack.pop_back();
      nodes.push_back(n);
      for (const auto& in : n->inputs) {
        if (!in.requires_grad()) continue;
        if (Node* p = in.get()->grad_fn.get()) {
          if (seen.insert(p).second) {
            stack.push_back(p);
            owners[p] = in.get()->grad_fn;
          }
        } else {
          ++leaf_pending[in.get()];
        }
      }
    }
    std::sort(nodes.begin(), nodes.end(), [](Node* a, Node* b) { return a->seq > b->seq; });
  }

  // Only the part of the graph between the root and wrt runs (torch.autograd.grad's rule): a node is a
  // target when a wanted value is one of its outputs or one of its inputs feeds a target or is a wanted
  // leaf. Producers are recorded before their consumers, so increasing seq visits them first.
  void mark_targets() {
    for (auto it = nodes.rbegin(); it != nodes.rend(); ++it) {
      Node* n = *it;
      bool t = mid_wanted.count(n) > 0;
      if (t && opts.stop_at_wrt) stops.insert(n);
      for (size_t i = 0; !t && i < n->inputs.size(); ++i) t = feeds_wanted(n->inputs[i]);
      if (t) targets.insert(n);
    }
  }

  // Whether the cotangent of an input is needed: it leads to a wanted value.
  bool feeds_wanted(const Tensor& in) const {
    if (!in.requires_grad()) return false;
    if (Node* p = in.get()->grad_fn.get()) return targets.count(p) > 0;
    return leaf_wanted.count(in.get()) > 0;
  }

  void finish_leaf_edge(TensorImpl* leaf) {
    auto it = leaf_pending.find(leaf);
    if (it == leaf_pending.end() || --it->second > 0) return;
    auto w = leaf_wanted.find(leaf);
    if (w == leaf_wanted.end()) return;
    auto g = leaf_grad.find(leaf);
    if (g != leaf_grad.end() && !leaf->grad_hooks.empty())
      g->second = run_grad_hooks(leaf->grad_hooks, g->second, "the leaf " + wrt[w->second[0]].str());
    for (size_t idx : w->second) {
      result[idx] = g != leaf_grad.end() ? g->second : zeros_like(wrt[idx]);
      report(idx);
    }
    if (opts.release_reported && g != leaf_grad.end()) leaf_grad.erase(g);
  }

  // result[i] is final: hand it to on_grad_ready (and let go of it when asked to).
  void report(size_t i) {
    done[i] = true;
    if (!opts.on_grad_ready) return;
    opts.on_grad_ready(i, result[i]);
    if (opts.release_reported) result[i] = Tensor();
  }

  void finish_leaf_edges(const Node& n) {
    for (const auto& in : n.inputs)
      if (in.requires_grad() && !in.get()->grad_fn) finish_leaf_edge(in.get());
  }

  void run(const Tensor& root, const Tensor& seed) {
    for (size_t i = 0; i < wrt.size(); ++i) {
      TensorImpl* t = wrt[i].get();
      if (t->grad_fn) mid_wanted[t->grad_fn.get()].push_back({t->output_index, i});
      else leaf_wanted[t].push_back(i);
    }
    Node* rn = root.get()->grad_fn.get();
    if (!rn) {  // the root is itself a leaf
      const Tensor g = root.get()->grad_hooks.empty() ? seed : run_grad_hooks(root.get()->grad_hooks, seed, "the leaf " + root.str());
      for (size_t i = 0; i < wrt.size(); ++i) {
        result[i] = wrt[i].same(root) ? g : zeros_like(wrt[i]);
        report(i);
      }
      return;
    }
    owners[rn] = root.get()->grad_fn;
    collect(rn);
    mark_targets();
    cts[rn].resize(rn->out_specs.size());
    cts[rn][root.get()->output_index] = seed;

    GradModeGuard mode(opts.create_graph);
    for (Node* n : nodes) {
      auto it = cts.find(n);
      if (it == cts.end()) {  // nothing flows through this node: its leaf edges still count as done
        finish_leaf_edges(*n);
        continue;
      }
      TensorList ct = std::move(it->second);
      cts.erase(it);
      ct.resize(n->out_specs.size());
      for (size_t k = 0; k < ct.size(); ++k) {
        if (!ct[k].defined()) ct[k] = zeros(n->out_specs[k].shape, n->out_specs[k].dtype, n->out_specs[k].device);
        else if (k < n->grad_hooks.size() && !n->grad_hooks[k].empty())  // a gradient reached output k
          ct[k] = run_grad_hooks(n->grad_hooks[k], ct[k], "output " + std::to_string(k) + " of op '" + n->op->name() + "'");
      }
      if (auto mw = mid_wanted.find(n); mw != mid_wanted.end())
        for (auto [out_idx, wi] : mw->second) {
          result[wi] = ct[out_idx];
          report(wi);
        }
      if (stops.count(n)) {  // a wrt tensor held fixed: nothing flows past it
        finish_leaf_edges(*n);
        continue;
      }
      check_versions(*n);
      std::vector<bool> needs(n->inputs.size());
      bool any = false;
      for (size_t i = 0; i < needs.size(); ++i) any |= (needs[i] = feeds_wanted(n->inputs[i]));
      if (!any) continue;
      std::string what;  // under anomaly detection, reports of the vjp's ops name the op it differentiates
      std::optional<detail::AnomalyContext> ctx;
      if (anomaly_options()) {
        const std::string a = n->op->attrs();
        what = std::string("in the backward (vjp) of op '") + n->op->name() + "'" + (a.empty() ? "" : "[" + a + "]") +
               (n->scope.empty() ? "" : " from '" + n->scope + "'");
        ctx.emplace(what, n->op->name());
      }
      TensorList g = n->op->vjp(n->inputs, saved_outputs(n), ct, needs);
      ctx.reset();
      if (g.size() != n->inputs.size())
        throw InternalError(std::string("vjp of '") + n->op->name() + "' returned the wrong number of cotangents",
                            std::to_string(n->inputs.size()), std::to_string(g.size()));
      for (size_t i = 0; i < g.size(); ++i) {
        const Tensor& in = n->inputs[i];
        if (!needs[i]) continue;
        if (g[i].defined()) {
          if (g[i].shape() != in.shape())
            throw InternalError(std::string("vjp of '") + n->op->name() + "' returned a cotangent of the wrong shape",
                                in.shape().str() + " for input " + std::to_string(i), g[i].shape().str());
          Tensor gi = g[i].dtype() == in.dtype() ? g[i] : g[i].astype(in.dtype());
          if (Node* p = in.get()->grad_fn.get()) {
            auto& slot = cts[p];
            slot.resize(p->out_specs.size());
            slot[in.get()->output_index] = accumulate(slot[in.get()->output_index], gi);
          } else {
            leaf_grad[in.get()] = accumulate(leaf_grad[in.get()], gi);
          }
        }
        if (!in.get()->grad_fn) finish_leaf_edge(in.get());
      }
    }
  }

  // The node keeps its outputs as detached aliases (no reference cycle). When the backward pass is itself
  // recorded, hand the vjp aliases that point back at the node, so a vjp reading its outputs (exp,
  // softmax, ...) stays differentiable with respect to the node's inputs.
  TensorList saved_outputs(Node* n) {
    if (!opts.create_graph || n->outputs.empty()) return n->outputs;
    TensorList outs;
    for (size_t i = 0; i < n->outputs.size(); ++i) {
      auto impl = std::make_shared<TensorImpl>(*n->outputs[i].get());
      if (is_floating(impl->dtype)) {
        impl->requires_grad = true;
        impl->grad_fn = owners[n];
        impl->output_index = uint32_t(i);
      }
      outs.emplace_back(std::move(impl));
      detail::notify_alias(n->outputs[i], outs.back());
    }
    return outs;
  }

  static void check_versions(const Node& n) {
    for (size_t i = 0; i < n.inputs.size(); ++i)
      if (n.inputs[i].storage()->version() != n.input_versions[i])
        throw AutodiffError(std::string("an input of '") + n.op->name() + "' was modified in place after it was used",
                            "the value saved when the op ran", "a tensor changed by an in-place write (copy_, fill_, an optimizer step)",
                            "clone() the tensor before modifying it, or run the optimizer step after backward");
    for (size_t i = 0; i < n.outputs.size(); ++i)
      if (n.outputs[i].storage()->version() != n.output_versions[i])
        throw AutodiffError(std::string("an output of '") + n.op->name() + "' was modified in place before backward",
                            "the value saved when the op ran", "a tensor changed by an in-place write",
                            "clone() the tensor before modifying it");
  }
};

Tensor make_seed(const Tensor& root, const Tensor& seed) {
  if (seed.defined()) {
    if (seed.shape() != root.shape())
      throw AutodiffError("backward seed has the wrong shape", root.shape().str(), seed.shape().str());
    return seed.dtype() == root.dtype() ? seed : seed.astype(root.dtype());
  }
  if (root.numel() != 1)
    throw AutodiffError("gradient of a non-scalar output without a seed", "a scalar (one element) or an explicit seed",
                        root.str(), "reduce it first (sum, mean) or pass BackwardOptions::seed");
  return ones(root.shape(), root.dtype(), root.device());
}

}  // namespace

void detail::check_hook_result(const Tensor& grad, const Tensor& returned, const std::string& what) {
  if (returned.shape() != grad.shape() || returned.dtype() != grad.dtype() || returned.device() != grad.device())
    throw AutodiffError(what + " returned another kind of tensor than the gradient it was given", spec_str(grad), spec_str(returned),
                        "return a tensor like that gradient, or Tensor() to keep it");
}

TensorList grad(const Tensor& root, const TensorList& wrt, const BackwardOptions& opts) {
  if (!is_floating(root.dtype()))
    throw AutodiffError("gradient of a non-floating output", "a floating root", root.str());
  Tensor seed = make_seed(root, opts.seed);
  Engine e(wrt, opts);
  if (!root.requires_grad()) {
    for (size_t i = 0; i < wrt.size(); ++i) {
      e.result[i] = zeros_like(wrt[i]);
      e.report(i);
    }
    return e.result;
  }
  e.run(root, seed);
  for (size_t i = 0; i < wrt.size(); ++i)
    if (!e.done[i]) {  // not reached from the root
      e.result[i] = zeros_like(wrt[i]);
      e.report(i);
    }
  return e.result;
}

void backward(const Tensor& root, const Tensor& seed) {
  if (!root.requires_grad())
    throw AutodiffError("backward() of a tensor that does not require grad", "a result of ops on tensors with requires_grad",
                        root.str(), "call set_requires_grad() on the parameters before the forward pass");
  // Find the leaves reachable from the root, then differentiate with respect to them.
  TensorList leaves;
  if (!root.get()->grad_fn) {
    leaves.push_back(root);
  } else {
    std::unordered_set<Node*> seen;
    std::unordered_set<TensorImpl*> leaf_seen;
    std::vector<Node*> stack{root.get()->grad_fn.get()};
    seen.insert(stack.back());
    while (!stack.empty()) {
      Node* n = stack.back();
      stack.pop_back();
      for (const auto& in : n->inputs) {
        if (!in.requires_grad()) continue;
        if (Node* p = in.get()->grad_fn.get()) {
          if (seen.insert(p).second) stack.push_back(p);
        } else if (leaf_seen.insert(in.get()).second) {
          leaves.push_back(in);
        }
      }
    }
  }
  BackwardOptions o;
  o.seed = seed;
  TensorList g = grad(root, leaves, o);
  NoGradGuard ng;
  for (size_t i = 0; i < leaves.size(); ++i) {
    TensorImpl* l = leaves[i].get();
    Tensor acc = l->grad ? add(Tensor(l->grad), g[i]) : g[i].detach();
    l->grad = acc.impl_ptr();
  }
}

std::pair<Tensor, ParamTree> value_and_grad(const std::function<Tensor()>& fn, const ParamTree& params,
                                            const BackwardOptions& opts) {
  TensorList ps = params.tensors();
  std::vector<bool> prev(ps.size());
  for (size_t i = 0; i < ps.size(); ++i) {
    if (!ps[i].is_leaf())
      throw AutodiffError("value_and_grad over a parameter that is not a leaf", "leaf tensors (model parameters)",
                          "'" + params[i].first + "' was produced by an op", "pass params.detach() copies or the model's own tensors");
    prev[i] = ps[i].requires_grad();
    ps[i].get()->requires_grad = is_floating(ps[i].dtype());
  }
  struct Restore {
    TensorList& ps;
    std::vector<bool>& prev;
    ~Restore() {
      for (size_t i = 0; i < ps.size(); ++i) ps[i].get()->requires_grad = prev[i];
    }
  } restore{ps, prev};
  Tensor value;
  {
    GradModeGuard on(true);
    value = fn();
  }
  TensorList g = grad(value, ps, opts);
  ParamTree out;
  for (size_t i = 0; i < ps.size(); ++i) out.insert(params[i].first, g[i]);
  return {value.detach(), std::move(out)};
}

}  // namespace titanax
