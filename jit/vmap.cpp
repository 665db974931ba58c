#include "jit/vmap.h"

#include <mutex>
#include <numeric>
#include <optional>
#include <tuple>
#include <unordered_map>
#include <unordered_set>

#include "jit/batching.h"
#include "jit/graph.h"
#include "ops/ops.h"

namespace titanax::jit {
namespace {

thread_local VmapStats t_stats;

Shape with_batch_axis(int64_t B, const Shape& s) {
  Shape o{B};
  for (int64_t d : s) o.push_back(d);
  return o;
}

// t with its axis `a` moved to the front (a permute unless a == 0).
Tensor axis_to_front(const Tensor& t, int a) {
  if (a == 0) return t;
  std::vector<int> p{a};
  for (int i = 0; i < t.dim(); ++i)
    if (i != a) p.push_back(i);
  return permute(t, p);
}

// t with its axis 0 moved to position `a`.
Tensor front_to_axis(const Tensor& t, int a) {
  if (a == 0) return t;
  std::vector<int> p;
  for (int i = 1; i <= a; ++i) p.push_back(i);
  p.push_back(0);
  for (int i = a + 1; i < t.dim(); ++i) p.push_back(i);
  return permute(t, p);
}

// ------------------------------------------------------------------------------------ tracing one example

// The per-example graph of fn on `example`, without dead nodes. (The tracer resolves detach()ed aliases
// of traced tensors, which the tape hands to vjps and value_and_grad returns, to the traced values, so
// per-example gradients follow the example.)
Graph trace_example(const Fn& fn, const TensorList& example) {
  Graph g = trace(fn, example);
  if (!g.updates.empty())
    throw ValueError("vmap of a function that writes tensors in place", "a pure function (no copy_ / fill_ into outside tensors)",
                     std::to_string(g.updates.size()) + " in-place update(s), the first into " + g.target_name(g.updates[0].target),
                     "return the new values and write them after the vmapped call");
  eliminate_dead_code(g);
  return g;
}

// ------------------------------------------------------------------------------------ batching rules

// A value of the interpreted graph: batched ones hold the whole batch on axis 0.
using Operand = detail::BatchedValue;

// What a rule sees of one node: its op, operands and per-example input / output specs.
struct Ctx {
  const Node& node;
  const std::vector<Operand>& in;
  std::vector<TensorSpec> in_spec, out_spec;
  int64_t B;

  const Tensor& t(size_t i) const { return in[i].t; }
  bool batched(size_t i) const { return in[i].batched; }
  int rank(size_t i) const { return in_spec[i].shape.rank(); }
  const OpPtr& op() const { return node.op; }

  // The op's attribute `key` (the text after "key=" in attrs(): a word, or a bracketed list).
  std::string attr(const std::string& key) const {
    const std::string a = node.op->attrs();
    for (size_t i = 0; i < a.size();) {
      while (i < a.size() && a[i] == ' ') ++i;
      const size_t eq = a.find('=', i);
      if (eq == std::string::npos) break;
      size_t end = eq + 1;
      if (end < a.size() && a[end] == '[') end = std::min(a.find(']', end), a.size() - 1) + 1;
      else
        while (end < a.size() && a[end] != ' ') ++end;
      if (a.compare(i, eq - i, key) == 0) return a.substr(eq + 1, end - eq - 1);
      i = end;
    }
    throw InternalError(std::string("vmap: the attributes of op '") + node.op->name() + "' lack '" + key + "'",
                        "attrs() naming " + key, "\"" + a + "\"", "update the op's batching rule in jit/vmap.cpp");
  }
  int64_t attr_int(const std::string& key) const { return std::stoll(attr(key)); }
  // "[1, -2]" or "[1,-2]" -> {1, -2}.
  std::vector<int64_t> attr_ints(const std::string& key) const {
    std::string s = attr(key);
    std::vector<int64_t> out;
    for (size_t i = 1; i + 1 < s.size();) {
      size_t used = 0;
      out.push_back(std::stoll(s.substr(i), &used));
      i += used;
      while (i < s.size() && (s[i] == ',' || s[i] == ' ')) ++i;
    }
    return out;
  }
  int max_rank() const {
    int r = 0;
    for (size_t i = 0; i < in.size(); ++i) r = std::max(r, rank(i));
    return r;
  }
  // Operand i with per-example rank `r` behind its batch axis (size-1 axes inserted after it); an
  // unbatched operand is returned as it is (it broadcasts from the right).
  Tensor aligned(size_t i, int r) const {
    if (!batched(i) || rank(i) >= r) return t(i);
    Shape s{B};
    for (int k = rank(i); k < r; ++k) s.push_back(1);
    for (int64_t d : in_spec[i].shape) s.push_back(d);
    return reshape(t(i), s);
  }
  // Operand i with a batch axis (an unbatched one broadcast to the batch, a view).
  Tensor with_batch(size_t i) const { return titanax::with_batch(t(i), batched(i), B); }
  // A per-example axis of input 0 shifted past the batch axis.
  int shifted(int64_t axis) const { return normalize_axis(int(axis), rank(0)) + 1; }
};

using Result = std::optional<TensorList>;  // nullopt: no rule for this case, loop over the batch
using Rule = Result (*)(const Ctx&);

// Elementwise on one operand: the op itself.
Result same_op(const Ctx& c) { return apply(c.op(), {c.t(0)}); }

// Broadcasting n-ary ops: operands aligned to one per-example rank.
Result broadcasting(const Ctx& c) {
  TensorList in;
  for (size_t i = 0; i < c.in.size(); ++i) in.push_back(c.aligned(i, c.max_rank()));
  return apply(c.op(), in);
}

Result reduce(const Ctx& c) {
  const std::string name = c.op()->name();
  bool keepdims = c.attr_int("keepdims") != 0;
  std::vector<int> axes;
  Tensor x = c.t(0);
  if (c.rank(0) == 0) {  // a 0-d example reduces to itself: reduce a size-1 axis instead of none
    x = reshape(x, Shape{c.B, 1});
    axes = {1};
    keepdims = false;
  } else {
    const std::vector<int64_t> a = c.attr_ints("axes");
    for (int64_t ax : a) axes.push_back(c.shifted(ax));
    for (int k = 1; a.empty() && k <= c.rank(0); ++k) axes.push_back(k);  // no axes: every per-example axis
  }
  if (name == "sum") return TensorList{sum(x, axes, keepdims)};
  if (name == "max") return TensorList{max(x, axes, keepdims)};
  return TensorList{min(x, axes, keepdims)};
}

Result argmax_rule(const Ctx& c) { return TensorList{argmax(c.t(0), c.shifted(c.attr_int("axis")), c.attr_int("keepdims") != 0)}; }

Result softmax_rule(const Ctx& c) {
  const int a = c.shifted(c.attr_int("axis"));
  return TensorList{std::string(c.op()->name()) == "softmax" ? softmax(c.t(0), a) : log_softmax(c.t(0), a)};
}

Result layer_norm_rule(const Ctx& c) {
  const bool has_w = c.attr_int("w") != 0, has_b = c.attr_int("b") != 0;
  const size_t iw = 1, ib = has_w ? 2 : 1;
  if (!(has_w && c.batched(iw)) && !(has_b && c.batched(ib))) {
    TensorList in;
    for (size_t i = 0; i < c.in.size(); ++i) in.push_back(c.t(i));
    return apply(c.op(), in);
  }
  // Per-example parameters: normalise with w = 1, b = 0 (the same op, so the same eps), then scale and
  // shift as the kernel does ((x - mean) * rstd, then * w, then + b).
  TensorList in{c.with_batch(0)};
  if (has_w) in.push_back(ones(c.in_spec[iw].shape, c.in_spec[iw].dtype, c.in_spec[iw].device));
  if (has_b) in.push_back(zeros(c.in_spec[ib].shape, c.in_spec[ib].dtype, c.in_spec[ib].device));
  Tensor y = apply1(c.op(), in);
  if (has_w) y = mul(y, c.aligned(iw, c.rank(0)));
  if (has_b) y = add(y, c.aligned(ib, c.rank(0)));
  return TensorList{y};
}

Result cross_entropy_rule(const Ctx& c) {
  const Tensor logits = c.with_batch(0), labels = c.with_batch(1);
  const std::string red = c.attr("reduction");
  if (red == "none") return apply(c.op(), {logits, labels});
  const int64_t ignore = c.attr_int("ignore_index");
  Tensor loss = cross_entropy(logits, labels, Reduction::none, ignore);  // [B, labels...]
  std::vector<int> rows(size_t(c.rank(1)));
  std::iota(rows.begin(), rows.end(), 1);
  auto per_example_sum = [&](const Tensor& t) { return rows.empty() ? t : sum(t, rows); };
  Tensor s = per_example_sum(loss);
  if (red == "sum") return TensorList{s};
  // mean: over the labels that are not ignore_index (0 when there are none, as the kernel).
  Tensor count = per_example_sum(ne(labels, scalar(double(ignore), labels.dtype(), labels.device())).astype(loss.dtype()));
  return TensorList{div(s, maximum(count, scalar_like(1.0, count)))};
}

Result concat_rule(const Ctx& c) {
  TensorList in;
  for (size_t i = 0; i < c.in.size(); ++i) in.push_back(c.with_batch(i));
  return TensorList{concat(in, c.shifted(c.attr_int("axis")))};
}

Result unbind_rule(const Ctx& c) { return unbind(c.t(0), c.shifted(c.attr_int("axis"))); }

Result slice_rule(const Ctx& c) {
  return TensorList{slice(c.t(0), c.shifted(c.attr_int("axis")), c.attr_int("start"), c.attr_int("stop"), c.attr_int("step"))};
}

Result permute_rule(const Ctx& c) {
  std::vector<int> p{0};
  for (int64_t a : c.attr_ints("axes")) p.push_back(c.shifted(a));
  return TensorList{permute(c.t(0), p)};
}

Result reshape_rule(const Ctx& c) { return TensorList{reshape(c.t(0), with_batch_axis(c.B, c.out_spec[0].shape))}; }

Result expand_rule(const Ctx& c) {
  const Shape& s = c.out_spec[0].shape;
  return TensorList{expand(c.aligned(0, s.rank()), with_batch_axis(c.B, s))};
}

Result linear_rule(const Ctx& c) {
  const bool has_b = c.in.size() > 2;
  TensorList xw{c.t(0), c.t(1)};
  if (!c.batched(1) && !(has_b && c.batched(2))) {  // a shared layer: the op on the batched x, one GEMM
    if (has_b) xw.push_back(c.t(2));
    return apply(c.op(), xw);
  }
  // A batched weight (an ensemble) or bias: x @ w^T, then + b.
  const Shape& out = c.out_spec[0].shape;
  Tensor y;
  if (!c.batched(1)) {
    y = apply1(c.op(), xw);  // the op without its bias
  } else {
    const Shape& xs = c.in_spec[0].shape;
    const int64_t in_f = c.in_spec[1].shape[1], rows = Shape(xs.begin(), xs.end() - 1).numel();
    Tensor x3 = c.batched(0) ? reshape(c.t(0), Shape{c.B, rows, in_f}) : reshape(c.t(0), Shape{rows, in_f});
    y = reshape(matmul(x3, transpose(c.t(1), -2, -1)), with_batch_axis(c.B, out));
  }
  if (has_b) y = add(y, c.aligned(2, out.rank()));
  return TensorList{y};
}

// scaled_dot_product_attention and its backward treat every axis before [T, D] (and before lse's [T]) as a
// batch of independent problems: the vmapped batch is one more leading axis of every operand.
Result leading_batch(const Ctx& c) {
  TensorList in;
  for (size_t i = 0; i < c.in.size(); ++i) in.push_back(c.with_batch(i));
  return apply(c.op(), in);
}

std::vector<Operand> run_batched(const Graph& g, const std::vector<Operand>& args, int64_t B);

// cond, while_loop, scan: new control-flow ops over the sub-graphs run batched (jit/control_flow.cpp).
Result control_flow(const Ctx& c) {
  const int64_t B = c.B;
  return detail::batch_control_flow(*c.op(), c.in, B, [B](const Graph& g, const std::vector<Operand>& args) { return run_batched(g, args, B); });
}

const std::unordered_map<std::string, Rule>& rules() {
  static const std::unordered_map<std::string, Rule> table = [] {
    std::unordered_map<std::string, Rule> m;
    for (const char* n : {"neg", "exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "abs", "square", "reciprocal", "relu",
                          "gelu_tanh", "gelu_erf", "sign", "copy", "astype", "to_device", "clamp", "one_hot"})
      m[n] = same_op;
    for (const char* n : {"add", "sub", "mul", "div", "maximum", "minimum", "pow", "eq", "ne", "lt", "le", "gt", "ge",
                          "relu_backward", "gelu_tanh_backward", "gelu_erf_backward", "where", "matmul"})
      m[n] = broadcasting;
    for (const char* n : {"sum", "max", "min"}) m[n] = reduce;
    m["argmax"] = argmax_rule;
    m["softmax"] = m["log_softmax"] = softmax_rule;
    m["layer_norm"] = layer_norm_rule;
    m["cross_entropy"] = cross_entropy_rule;
    m["concat"] = concat_rule;
    m["slice"] = slice_rule;
    m["unbind"] = unbind_rule;
    m["permute"] = permute_rule;
    m["reshape"] = reshape_rule;
    m["expand"] = expand_rule;
    m["linear"] = linear_rule;
    m["scaled_dot_product_attention"] = m["scaled_dot_product_attention_backward"] = leading_batch;
    m["scaled_dot_product_attention_qkvpacked"] = m["scaled_dot_product_attention_qkvpacked_backward"] = leading_batch;
    m["cond"] = m["while_loop"] = m["scan"] = control_flow;
    return m;
  }();
  return table;
}

// The fallback: the node's op once per example, on slices of the batched operands; results stacked.
TensorList loop_over_batch(const Ctx& c) {
  std::vector<TensorList> per_out(c.out_spec.size());
  for (int64_t b = 0; b < c.B; ++b) {
    TensorList in;
    for (size_t i = 0; i < c.in.size(); ++i)
      in.push_back(c.batched(i) ? reshape(slice(c.t(i), 0, b, b + 1), c.in_spec[i].shape) : c.t(i));
    TensorList out = apply(c.op(), in);
    for (size_t k = 0; k < out.size(); ++k) per_out[k].push_back(reshape(out[k], with_batch_axis(1, c.out_spec[k].shape)));
  }
  TensorList res;
  for (const auto& parts : per_out) res.push_back(concat(parts, 0));
  return res;
}

// ------------------------------------------------------------------------------------ the interpreter

// Runs the per-example graph on the batch: `args` holds the graph's inputs (batched ones with the
// batch on axis 0). Returns its outputs.
std::vector<Operand> run_batched(const Graph& g, const std::vector<Operand>& args, int64_t B) {
  std::vector<Operand> env(g.values.size());
  for (size_t i = 0; i < g.inputs.size(); ++i) env[size_t(g.inputs[i])] = args[i];
  for (size_t v = 0; v < g.values.size(); ++v)
    if (g.values[v].kind == Value::Kind::constant || g.values[v].kind == Value::Kind::state)
      env[v] = {g.values[v].constant, false};  // unbatched operands (state: its current contents)
  std::vector<int> last(g.values.size(), -1);  // last use of each value, to release it
  for (size_t i = 0; i < g.nodes.size(); ++i)
    for (int v : g.nodes[i].inputs) last[size_t(v)] = int(i);
  for (int o : g.outputs) last[size_t(o)] = int(g.nodes.size());
  for (size_t i = 0; i < g.nodes.size(); ++i) {
    const Node& n = g.nodes[i];
    std::vector<Operand> in;
    bool any = false;
    for (int v : n.inputs) {
      in.push_back(env[size_t(v)]);
      any = any || in.back().batched;
    }
    TensorList out;
    if (!any) {  // shared by the whole batch: run it once
      TensorList ts;
      for (const auto& o : in) ts.push_back(o.t);
      out = apply(n.op, ts);
    } else {
      Ctx c{n, in, {}, {}, B};
      for (int v : n.inputs) c.in_spec.push_back(g.values[size_t(v)].spec);
      for (int v : n.outputs) c.out_spec.push_back(g.values[size_t(v)].spec);
      const std::string name = n.op->name();
      auto rule = rules().find(name);
      Result r;
      if (rule != rules().end()) {
        r = rule->second(c);
      } else {
        TensorList ts;
        std::vector<bool> flags;
        for (const auto& o : in) ts.push_back(o.t), flags.push_back(o.batched);
        r = n.op->batch(ts, flags, B);  // the op's own rule (Op::batch), if it has one
      }
      if (r) {
        ++t_stats.batched[name];
        out = std::move(*r);
        for (size_t k = 0; k < c.out_spec.size(); ++k)
          if (k >= out.size() || out[k].shape() != with_batch_axis(B, c.out_spec[k].shape) || out[k].dtype() != c.out_spec[k].dtype)
            throw InternalError("vmap: the batching rule of '" + name + "' gave a wrong result " + std::to_string(k),
                                std::string(dtype_name(c.out_spec[k].dtype)) + with_batch_axis(B, c.out_spec[k].shape).str(),
                                k < out.size() ? spec_str(out[k]) : "no result", "fix the rule in jit/vmap.cpp");
      } else {
        ++t_stats.fallback[name];
        out = loop_over_batch(c);
      }
    }
    for (size_t k = 0; k < n.outputs.size(); ++k) env[size_t(n.outputs[k])] = {out[k], any};
    for (int v : n.inputs)
      if (last[size_t(v)] == int(i) && g.values[size_t(v)].kind == Value::Kind::node_output) env[size_t(v)] = {};
  }
  std::vector<Operand> res;
  for (int o : g.outputs) res.push_back(env[size_t(o)]);
  return res;
}

}  // namespace

std::vector<bool> detail::batched_outputs(const Graph& g, const std::vector<bool>& in) {
  if (in.size() != g.inputs.size())
    throw InternalError("vmap: batched_outputs needs one flag per graph input", std::to_string(g.inputs.size()), std::to_string(in.size()),
                        "pass the graph's arguments and captures");
  std::vector<bool> batched(g.values.size(), false);
  for (size_t i = 0; i < in.size(); ++i) batched[size_t(g.inputs[i])] = in[i];
  for (const Node& n : g.nodes) {
    bool any = false;
    for (int v : n.inputs) any = any || batched[size_t(v)];
    for (int v : n.outputs) batched[size_t(v)] = any;
  }
  std::vector<bool> out;
  for (int o : g.outputs) out.push_back(batched[size_t(o)]);
  return out;
}

namespace {

// The state of one vmapped function: its arguments and the per-example graphs traced so far.
class Vmapped {
 public:
  Vmapped(Fn fn, std::vector<int> in_axes, std::vector<int> out_axes)
      : fn_(std::move(fn)), in_axes_(std::move(in_axes)), out_axes_(std::move(out_axes)) {}

  TensorList operator()(const TensorList& args) {
    if (!in_axes_.empty() && in_axes_.size() != args.size())
      throw ValueError("vmap: in_axes has another size than the number of inputs", std::to_string(args.size()) + " entries (or none)",
                       std::to_string(in_axes_.size()) + " entries", "give one axis per input, not_batched for a shared one");
    // Each input's batch axis (normalised; -1 when not batched) and the batch size.
    std::vector<int> axis(args.size(), -1);
    int64_t B = -1;
    size_t first = 0;
    for (size_t i = 0; i < args.size(); ++i) {
      const std::string name = "input " + std::to_string(i);
      if (!args[i].defined()) throw ValueError("vmap: " + name + " is undefined", "a tensor", "Tensor()");
      const int a = in_axes_.empty() ? 0 : in_axes_[i], r = args[i].dim();
      if (a == not_batched) continue;
      if (a < -r || a >= r)
        throw ShapeError("vmap: in_axes[" + std::to_string(i) + "] is out of range for " + name,
                         r == 0 ? "not_batched (a 0-d input has no axis to map over)" : "an axis in [" + std::to_string(-r) + ", " + std::to_string(r - 1) + "] or not_batched",
                         std::to_string(a) + " for shape " + args[i].shape().str());
      axis[i] = a < 0 ? a + r : a;
      const int64_t n = args[i].shape()[axis[i]];
      if (B < 0) {
        B = n, first = i;
      } else if (n != B) {
        throw ShapeError("vmap: batched inputs have different batch sizes",
                         std::to_string(B) + " (input " + std::to_string(first) + " " + args[first].shape().str() + " along axis " + std::to_string(axis[first]) + ")",
                         std::to_string(n) + " (" + name + " " + args[i].shape().str() + " along axis " + std::to_string(axis[i]) + ")",
                         "map over axes of equal size, or pass not_batched for an input shared by the batch");
      }
    }
    if (B < 0)
      throw ValueError("vmap: no input is batched", "at least one in_axes entry other than not_batched",
                       std::to_string(args.size()) + " input(s), none batched", "call the function directly instead");
    if (B == 0)
      throw ValueError("vmap: the batch is empty", "a batch size >= 1 (fn is traced on one example)",
                       "0 along axis " + std::to_string(axis[first]) + " of input " + std::to_string(first));
    // One example per batched input (index 0: a view), and the batch with its axis in front.
    TensorList example;
    std::vector<Operand> operands;
    std::string sig;
    for (size_t i = 0; i < args.size(); ++i) {
      if (axis[i] < 0) {
        example.push_back(args[i]);
        operands.push_back({args[i], false});
        sig += "shared " + spec_str(args[i]) + ";";
        continue;
      }
      Shape s = args[i].shape(), st = args[i].strides();
      s.erase(axis[i]);
      st.erase(axis[i]);
      example.push_back(make_view(args[i], s, st, args[i].offset()));
      operands.push_back({axis_to_front(args[i], axis[i]), true});
      sig += "batched " + spec_str(example.back()) + ";";
    }
    const Graph& g = graph_for(sig, example);
    if (!out_axes_.empty() && out_axes_.size() != g.outputs.size())
      throw ValueError("vmap: out_axes has another size than the number of outputs", std::to_string(g.outputs.size()) + " entries (or none)",
                       std::to_string(out_axes_.size()) + " entries", "give one axis per output of fn");
    std::vector<Operand> outs = run_batched(g, operands, B);
    TensorList res;
    for (size_t k = 0; k < outs.size(); ++k) {
      const Shape& per_example = g.values[size_t(g.outputs[k])].spec.shape;
      Tensor t = outs[k].batched ? outs[k].t : expand(outs[k].t, with_batch_axis(B, per_example));
      const int a = out_axes_.empty() ? 0 : out_axes_[k], r = t.dim();
      if (a < -r || a >= r)
        throw ShapeError("vmap: out_axes[" + std::to_string(k) + "] is out of range for output " + std::to_string(k),
                         "an axis in [" + std::to_string(-r) + ", " + std::to_string(r - 1) + "]",
                         std::to_string(a) + " for the batched output's shape " + t.shape().str());
      res.push_back(front_to_axis(t, a < 0 ? a + r : a));
    }
    return res;
  }

 private:
  const Graph& graph_for(const std::string& sig, const TensorList& example) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (auto it = cache_.find(sig); it != cache_.end()) return it->second;
    }
    Graph g = trace_example(fn_, example);  // outside the lock: fn may itself call vmapped functions
    std::lock_guard<std::mutex> lock(mu_);
    return cache_.emplace(sig, std::move(g)).first->second;
  }

  Fn fn_;
  std::vector<int> in_axes_, out_axes_;
  std::mutex mu_;
  std::map<std::string, Graph> cache_;  // per-example graph by signature
};

}  // namespace

Fn vmap(Fn fn, std::vector<int> in_axes, std::vector<int> out_axes) {
  if (!fn) throw ValueError("vmap of an empty function", "a callable", "an empty std::function");
  auto v = std::make_shared<Vmapped>(std::move(fn), std::move(in_axes), std::move(out_axes));
  return [v](const TensorList& args) { return (*v)(args); };
}

const VmapStats& vmap_stats() { return t_stats; }
void reset_vmap_stats() { t_stats = {}; }

}  // namespace titanax::jit
