#include "jit/graph.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <unordered_map>
#include <unordered_set>

#include "autodiff/tape.h"
#include "autodiff/anomaly.h"
#include "core/error.h"
#include "jit/capture.h"
#include "jit/codegen.h"
#include "jit/fusion.h"
#include "jit/memory_plan.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <cstdlib>

namespace titanax::jit {
namespace {

TensorSpec spec_of(const Tensor& t) { return {t.shape(), t.dtype(), t.device()}; }

// Runs f with no observer installed (the tracer's own copies are not the traced function's).
template <class F>
auto untraced(F&& f) {
  NoTraceGuard guard;
  return f();
}

// Records apply() calls, in-place writes and host reads into a graph while installed.
class Tracer final : public ApplyObserver {
 public:
  Graph g;
  std::unordered_map<const TensorImpl*, int> ids;  // tensor -> value id
  TensorList keep;                                  // every traced tensor stays alive, so addresses stay unique
  const uint64_t first_serial = Storage::next_serial();  // storages from this serial on were made by the trace
  std::unordered_set<const Storage*> written;      // storages written in place during the trace
  std::unordered_set<int> stale;                   // values whose storage was written after they were made
  int external = 0;                                // constants and state values so far (their `index`)
  std::unordered_set<const TensorImpl*> written_handles;  // tensors written in place (they stand for the value written)

  bool fresh(const Tensor& t) const { return t.storage()->serial() >= first_serial; }
  std::string describe(int id) const {
    const Value& v = g.values[size_t(id)];
    const std::string what = v.kind == Value::Kind::node_output ? "the output of op '" + std::string(g.nodes[size_t(v.producer)].op->name()) + "'"
                             : v.kind == Value::Kind::input     ? "input " + std::to_string(v.index)
                             : v.kind == Value::Kind::state     ? "a state tensor (a parameter or optimizer state)"
                                                                : "a constant";
    return "%" + std::to_string(id) + ", " + what + ", " + spec_str(v.spec);
  }
  int checked(int id) const {
    if (stale.count(id))
      throw TraceError("jit::trace: the traced function uses a tensor after an in-place write to its storage through another handle",
                       "reads of a written tensor through the handle that was written", describe(id),
                       "read the written tensor itself after copy_, or write before taking views of it");
    return id;
  }
  // A tensor's layout over its storage: another handle with the same key (detach() makes one without an
  // op) is the same value.
  using ViewKey = std::tuple<const Storage*, int64_t, std::string, std::string, int>;
  static ViewKey key_of(const Tensor& t) { return {t.storage().get(), t.offset(), t.shape().str(), t.strides().str(), int(t.dtype())}; }
  std::map<ViewKey, int> views;

  int value_of(const Tensor& t) {
    if (auto it = ids.find(t.get()); it != ids.end()) return checked(it->second);
    if (auto it = views.find(key_of(t)); it != views.end()) {
      ids[t.get()] = it->second;
      keep.push_back(t);
      return checked(it->second);
    }
    if (written.count(t.storage().get()))
      throw TraceError("jit::trace: the traced function reads a tensor through another view after an in-place write to it",
                       "reads of a written tensor through the handle that was written", t.str(),
                       "read the written tensor itself after copy_");
    // Read by the function, made outside the trace: live state if it is a parameter being
    // differentiated (a write later in the trace also makes it state), else a constant.
    const bool state = t.requires_grad() && !fresh(t);
    return add(Value{state ? Value::Kind::state : Value::Kind::constant, spec_of(t), -1, external++, t}, t);
  }
  int add(Value v, const Tensor& t) {
    g.values.push_back(std::move(v));
    const int id = int(g.values.size()) - 1;
    ids[t.get()] = id;
    views[key_of(t)] = id;
    keep.push_back(t);
    return id;
  }
  std::vector<int> remat_stack;  // the recomputations open now (on_recompute), innermost last
  int remats = 0;                // how many have begun
  void on_recompute(bool begin) override {
    if (begin) remat_stack.push_back(++remats);
    else if (!remat_stack.empty()) remat_stack.pop_back();
  }
  void on_apply(const OpPtr& op, const TensorList& in, const TensorList& out) override {
    Node n{op, {}, {}, {}, current_scope(), remat_stack.empty() ? 0 : remat_stack.back()};
    for (const auto& t : in) n.inputs.push_back(value_of(t));
    const int idx = int(g.nodes.size());
    for (size_t k = 0; k < out.size(); ++k) n.outputs.push_back(add(Value{Value::Kind::node_output, spec_of(out[k]), idx, int(k), {}}, out[k]));
    g.nodes.push_back(std::move(n));
  }
  // Called before the write: src is the value written (fill_ passes an expanded constant). Every write
  // becomes an update; finish() drops those into temporaries of the trace.
  void on_write(const Tensor& dst, const Tensor& src) override {
    auto it = ids.find(dst.get());
    if (it != ids.end() && !written_handles.count(dst.get()) &&
        (g.values[size_t(it->second)].kind == Value::Kind::input || g.values[size_t(it->second)].kind == Value::Kind::node_output))
      throw TraceError("jit::trace: in-place write into a tensor the traced function computed or received as input",
                       "in-place writes only into tensors that outlive the call (parameters, optimizer state)", describe(it->second),
                       "compute a new tensor with ops instead of writing into this one");
    if (src.dtype() != dst.dtype())
      throw TraceError("jit::trace: copy_ that changes the dtype inside a traced function",
                       std::string(dtype_name(dst.dtype())), std::string(dtype_name(src.dtype())), "cast with astype() before copy_");
    const int v = value_of(src);
    if (fresh(dst) && (!dst.is_contiguous() || dst.offset() != 0 || dst.nbytes() != dst.storage()->nbytes()))
      throw TraceError("jit::trace: copy_ into part of a tensor made inside a traced function", "writes into whole tensors",
                       dst.str() + " (a view of a larger tensor)",
                       "build the tensor with ops (concat, slice_scatter, pad) instead of copy_ into its slices");
    // Values read from this storage so far keep what they saw: a snapshot, used if the storage turns out
    // to be a temporary of the trace (finish()); other handles on it become stale.
    for (const auto& [impl, id] : ids) {
      if (impl->storage != dst.storage()) continue;
      Value& c = g.values[size_t(id)];
      if (c.kind == Value::Kind::constant && fresh(dst) && !snapshots.count(id))
        snapshots[id] = untraced([&] { return c.constant.detach().clone(); });
      if (c.kind == Value::Kind::constant && !fresh(dst)) c.kind = Value::Kind::state;  // read live, never folded
      if (impl != dst.get()) stale.insert(id);
    }
    g.updates.push_back(Update{dst, v});
    written.insert(dst.storage().get());
    written_handles.insert(dst.get());
    ids[dst.get()] = v;
    views[key_of(dst)] = v;
    keep.push_back(dst);
  }
  // After fn returned and the tracer's own references are the last ones it holds: a storage made during
  // the trace and written in place is state if something outside still holds it (an optimizer's moments
  // created on the first call), else a temporary whose writes are dropped and whose earlier reads become
  // constants (their snapshots).
  void finish() {
    std::unordered_map<const Storage*, std::weak_ptr<Storage>> fresh_written;
    for (const Update& u : g.updates)
      if (fresh(u.target)) fresh_written[u.target.storage().get()] = u.target.storage();
    if (fresh_written.empty()) return;
    // Hold fresh-written tensors weakly while the check runs.
    std::vector<std::pair<size_t, std::weak_ptr<TensorImpl>>> targets, reads;
    for (size_t i = 0; i < g.updates.size(); ++i)
      if (fresh_written.count(g.updates[i].target.storage().get())) {
        targets.emplace_back(i, g.updates[i].target.impl_ptr());
        g.updates[i].target = Tensor();
      }
    for (auto& [id, snap] : snapshots) {
      reads.emplace_back(size_t(id), g.values[size_t(id)].constant.impl_ptr());
      g.values[size_t(id)].constant = snap;
    }
    snapshots.clear();
    keep.clear();
    ids.clear();
    views.clear();
    std::unordered_set<const Storage*> persistent;
    for (auto& [i, w] : targets)
      if (auto impl = w.lock()) {
        g.updates[i].target = Tensor(impl);
        persistent.insert(impl->storage.get());
      }
    for (auto& [id, w] : reads)
      if (auto impl = w.lock(); impl && persistent.count(impl->storage.get())) {
        g.values[id].constant = Tensor(impl);
        g.values[id].kind = Value::Kind::state;
      }
    std::erase_if(g.updates, [](const Update& u) { return !u.target.defined(); });
  }
  std::unordered_map<int, Tensor> snapshots;  // constant value -> its contents before the first write

  void on_host_read(const Tensor& t) override {
    auto it = ids.find(t.get());
    const bool traced = it != ids.end() ? g.values[size_t(it->second)].kind != Value::Kind::constant
                                        : (t.requires_grad() && !fresh(t)) || written.count(t.storage().get());
    if (!traced) return;
    throw TraceError("jit::trace: the traced function reads a traced value on the host (item() / to_vector())",
                     "no host reads of traced values: a C++ branch on one would be fixed in the graph at its trace-time value",
                     it != ids.end() ? describe(it->second) : t.str(),
                     "branch with jit::cond / loop with jit::while_loop (jit/control_flow.h), choose per element with where(), "
                     "pass the value as a static input (JitOptions::static_inputs), or read it outside the traced function");
  }
};

// Every use of value `from` becomes a use of `to`.
void replace_uses(Graph& g, int from, int to) {
  for (auto& n : g.nodes)
    for (auto& i : n.inputs)
      if (i == from) i = to;
  for (auto& o : g.outputs)
    if (o == from) o = to;
  for (auto& u : g.updates)
    if (u.value == from) u.value = to;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  if (a.dtype() != b.dtype() || a.shape() != b.shape() || !(a.device() == b.device())) return false;
  Tensor x = a.to(Device::cpu()).contiguous(), y = b.to(Device::cpu()).contiguous();
  return std::memcmp(x.raw_data(), y.raw_data(), x.nbytes()) == 0;
}

void renumber_producers(Graph& g) {
  for (size_t i = 0; i < g.nodes.size(); ++i)
    for (int o : g.nodes[i].outputs) g.values[size_t(o)].producer = int(i);
}

}  // namespace

Graph trace(const std::function<TensorList(const TensorList&)>& fn, const TensorList& args,
            const std::vector<int>& static_inputs, TensorList* eager_outputs) {
  Tracer tr;
  TensorList handles;
  for (size_t i = 0; i < args.size(); ++i) {
    if (!args[i].defined()) throw ValueError("jit::trace: input " + std::to_string(i) + " is undefined", "a tensor", "Tensor()");
    const bool is_static = std::find(static_inputs.begin(), static_inputs.end(), int(i)) != static_inputs.end();
    // A fresh handle per input: two arguments sharing a tensor stay two inputs. A static input is a
    // copy, so the graph's constant does not change with the caller's tensor.
    Tensor h = is_static ? args[i].detach().clone() : args[i].detach();
    if (is_static) tr.add(Value{Value::Kind::constant, spec_of(h), -1, int(i), h}, h);
    else tr.g.inputs.push_back(tr.add(Value{Value::Kind::input, spec_of(h), -1, int(tr.g.inputs.size()), {}}, h));
    handles.push_back(h);
  }
  for (int s : static_inputs)
    if (s < 0 || s >= int(args.size()))
      throw ValueError("jit::trace: static input position out of range", "0 <= position < " + std::to_string(args.size()), std::to_string(s));
  TensorList out;
  {
    ApplyObserver* prev = set_apply_observer(&tr);
    struct Restore {
      ApplyObserver* prev;
      ~Restore() { set_apply_observer(prev); }
    } r{prev};
    titanax::detail::TopLevelOps top;  // fn's ops are fn's, even when the trace starts inside an op's forward
    out = fn(handles);
  }
  for (size_t k = 0; k < out.size(); ++k) {
    if (!out[k].defined()) throw ValueError("jit::trace: output " + std::to_string(k) + " is undefined", "a tensor", "Tensor()");
    tr.g.outputs.push_back(tr.value_of(out[k]));
  }
  // The call's results, as copies: the tensors fn returned must not count as holders of its temporaries.
  if (eager_outputs) {
    eager_outputs->clear();
    for (const auto& o : out) eager_outputs->push_back(o.detach().clone());
  }
  out.clear();
  handles.clear();
  tr.finish();
  for (const Update& u : tr.g.updates) {
    const Value& v = tr.g.values[size_t(u.value)];
    if (v.kind == Value::Kind::state && tr.written.count(v.constant.storage().get()))
      throw TraceError("jit::trace: a state tensor is copied into another after being written itself",
                       "copy_ sources that are computed values or unwritten tensors", tr.describe(u.value),
                       "copy a computed value (e.g. x * 1.0) instead");
  }
  return std::move(tr.g);
}

std::string common_scope(const std::string& a, const std::string& b) {
  size_t n = 0;  // the length of the shared whole components
  for (size_t i = 0; i <= a.size() && i <= b.size(); ++i) {
    const bool end_a = i == a.size() || a[i] == '/', end_b = i == b.size() || b[i] == '/';
    if (end_a && end_b) n = i;
    if (i == a.size() || i == b.size() || a[i] != b[i]) break;
  }
  return a.substr(0, n);
}

bool same_memory(const Tensor& a, const Tensor& b) {
  return a.defined() && b.defined() && a.storage() == b.storage() && a.offset() == b.offset() && a.shape() == b.shape() &&
         a.strides() == b.strides() && a.dtype() == b.dtype();
}

void Graph::check_inputs(const TensorList& args) const {
  if (args.size() != inputs.size())
    throw ValueError("jit graph: wrong number of inputs", std::to_string(inputs.size()), std::to_string(args.size()));
  for (size_t i = 0; i < inputs.size(); ++i) {
    const TensorSpec& want = values[size_t(inputs[i])].spec;
    const Tensor& a = args[i];
    const std::string what = "jit graph input " + std::to_string(i);
    if (!a.defined()) throw ValueError(what + " is undefined", spec_str(want), "Tensor()");
    if (a.shape() != want.shape) throw ShapeError(what + " has another shape than when traced", want.shape.str(), a.shape().str(), "trace again for this shape");
    if (a.dtype() != want.dtype) throw DTypeError(what + " has another dtype than when traced", std::string(dtype_name(want.dtype)), std::string(dtype_name(a.dtype())), "trace again for this dtype");
    if (!(a.device() == want.device)) throw DeviceError(what + " is on another device than when traced", want.device.str(), a.device().str(), "trace again on this device");
  }
}

std::vector<int> Graph::last_uses() const {
  std::vector<int> last(values.size(), -1);
  for (size_t i = 0; i < nodes.size(); ++i)
    for (int v : nodes[i].inputs) last[size_t(v)] = int(i);
  for (int o : outputs) last[size_t(o)] = int(nodes.size());
  for (const Update& u : updates) last[size_t(u.value)] = int(nodes.size());
  return last;
}

void Graph::write_updates(const std::vector<Tensor>& env) const {
  for (const Update& u : updates) {
    Tensor target = u.target;
    const Tensor& src = env[size_t(u.value)];
    if (!same_memory(target, src)) copy_(target, src);  // else written in place (update_in_place)
  }
}

std::vector<Tensor> Graph::environment(const TensorList& args) const {
  check_inputs(args);
  std::vector<Tensor> env(values.size());
  for (size_t i = 0; i < inputs.size(); ++i) env[size_t(inputs[i])] = args[i];
  for (size_t v = 0; v < values.size(); ++v)
    if (values[v].kind == Value::Kind::constant || values[v].kind == Value::Kind::state) env[v] = values[v].constant;
  return env;
}

namespace {
// "%5, %6 = name(%1, %2)": a node's values without its attributes.
std::string node_ssa(const Node& n) {
  std::string s;
  for (size_t k = 0; k < n.outputs.size(); ++k) s += (k ? ", %" : "%") + std::to_string(n.outputs[k]);
  s += " = " + std::string(n.op->name()) + "(";
  for (size_t k = 0; k < n.inputs.size(); ++k) s += (k ? ", %" : "%") + std::to_string(n.inputs[k]);
  return s + ")";
}

// Anomaly detection's check of node i's outputs, in the node's module path. A fused node that made a NaN
// runs again as its member ops, each checked, so that the report names the member (unless it wrote into
// its inputs in place).
void check_node(const AnomalyOptions& opts, const Node& n, size_t i, const TensorList& in, const TensorList& out) {
  const titanax::detail::ScopeOverride scope(n.scope);
  const std::string where = "at node " + std::to_string(i) + " of a jit graph (" + node_ssa(n) + ")";
  try {
    titanax::detail::check_outputs(opts, *n.op, in, out, where);
  } catch (const FloatingPointError&) {
    if (n.in_place.empty()) {
      const std::string again = where + ", run again op by op";
      titanax::detail::AnomalyContext ctx(again);
      n.op->run_unfused(in);  // throws at the member op that made it
    }
    throw;
  }
}
}  // namespace

TensorList Graph::run(const TensorList& args) const {
  std::vector<Tensor> env = environment(args);
  const std::vector<int> last = last_uses();  // node index of each value's last use
  NoGradGuard ng;
  const std::shared_ptr<Storage> arena = plan ? make_arena(*this, *plan) : nullptr;  // planned intermediates live here
  const AnomalyOptions* anomaly = anomaly_options();
  for (size_t i = 0; i < nodes.size(); ++i) {
    const Node& n = nodes[i];
    TensorList in;
    for (int v : n.inputs) in.push_back(env[size_t(v)]);
    TensorList out = plan || !n.in_place.empty() ? run_node(*this, plan.get(), arena, i, in) : n.op->forward(in);
    if (anomaly) check_node(*anomaly, n, i, in, out);
    for (size_t k = 0; k < n.outputs.size(); ++k) env[size_t(n.outputs[k])] = out[k];
    for (int v : n.inputs)
      if (last[size_t(v)] == int(i) && values[size_t(v)].kind == Value::Kind::node_output) env[size_t(v)] = Tensor();
  }
  TensorList res;
  for (int o : outputs) res.push_back(env[size_t(o)]);
  write_updates(env);
  return res;
}

namespace {
// Values some node, output or update reads (the inputs and constants str() and dot() show).
std::vector<bool> used_values(const Graph& g) {
  std::vector<bool> used(g.values.size(), false);
  for (const auto& n : g.nodes)
    for (int i : n.inputs) used[size_t(i)] = true;
  for (int o : g.outputs) used[size_t(o)] = true;
  for (const Update& u : g.updates) used[size_t(u.value)] = true;
  return used;
}
}  // namespace

std::string Graph::target_name(const Tensor& t) const {
  for (size_t id = 0; id < values.size(); ++id)
    if (values[id].kind == Value::Kind::state && values[id].constant.same(t)) return "%" + std::to_string(id);
  return "tensor " + spec_str(t);
}

std::string Graph::str() const {
  auto v = [](int id) { return "%" + std::to_string(id); };
  std::string s = "graph(";
  for (size_t i = 0; i < inputs.size(); ++i) s += (i ? ", " : "") + v(inputs[i]) + ": " + spec_str(values[size_t(inputs[i])].spec);
  s += ") {\n";
  const std::vector<bool> used = used_values(*this);
  for (size_t id = 0; id < values.size(); ++id)
    if (values[id].kind == Value::Kind::constant && used[id]) {
      const Tensor& c = values[id].constant;
      s += "  " + v(int(id)) + " = const " + spec_str(values[id].spec) + (c.numel() == 1 ? " " + attr_num(c.item()) : "") + "\n";
    } else if (values[id].kind == Value::Kind::state && used[id]) {
      const std::string& name = values[id].constant.name();
      s += "  " + v(int(id)) + " = state " + spec_str(values[id].spec) + (name.empty() ? "" : " '" + name + "'") + "\n";
    }
  for (const auto& n : nodes) {
    s += "  ";
    for (size_t k = 0; k < n.outputs.size(); ++k) s += (k ? ", " : "") + v(n.outputs[k]);
    s += " = " + std::string(n.op->name());
    const std::string a = n.op->attrs();
    if (!a.empty()) s += "[" + a + "]";
    s += "(";
    for (size_t k = 0; k < n.inputs.size(); ++k) s += (k ? ", " : "") + v(n.inputs[k]);
    s += ") :";
    for (size_t k = 0; k < n.outputs.size(); ++k) s += (k ? ", " : " ") + spec_str(values[size_t(n.outputs[k])].spec);
    std::string inplace;
    for (size_t k = 0; k < n.in_place.size(); ++k)
      if (n.in_place[k] >= 0) inplace += (inplace.empty() ? "" : ", ") + v(n.outputs[k]) + " into " + v(n.inputs[size_t(n.in_place[k])]);
    if (!inplace.empty()) s += "   (in place: " + inplace + ")";
    if (!n.scope.empty()) s += "   # " + n.scope;
    if (n.remat) s += "   (recomputation " + std::to_string(n.remat) + ")";
    s += "\n";
  }
  for (const Update& u : updates) s += "  " + target_name(u.target) + " <- " + v(u.value) + "\n";
  s += "  return";
  for (size_t k = 0; k < outputs.size(); ++k) s += (k ? ", " : " ") + v(outputs[k]);
  return s + "\n}\n";
}

std::string Graph::dot() const {
  auto esc = [](std::string x) {
    std::string o;
    for (char c : x) o += c == '"' ? std::string("\\\"") : std::string(1, c);
    return o;
  };
  std::string s = "digraph jit {\n  rankdir=TB;\n";
  auto src = [&](int id) {
    const Value& val = values[size_t(id)];
    return val.kind == Value::Kind::node_output ? "n" + std::to_string(val.producer) : "v" + std::to_string(id);
  };
  const std::vector<bool> used = used_values(*this);
  for (size_t id = 0; id < values.size(); ++id)
    if (values[id].kind != Value::Kind::node_output && used[id])
      s += "  v" + std::to_string(id) + " [shape=ellipse, label=\"" +
           (values[id].kind == Value::Kind::input ? "input " : values[id].kind == Value::Kind::state ? "state " : "const ") +
           "%" + std::to_string(id) + "\\n" + spec_str(values[id].spec) + "\"];\n";
  for (size_t i = 0; i < nodes.size(); ++i) {
    const std::string a = nodes[i].op->attrs();
    s += "  n" + std::to_string(i) + " [shape=box, label=\"" + esc(std::string(nodes[i].op->name()) + (a.empty() ? "" : "\\n" + a)) + "\"];\n";
    for (int in : nodes[i].inputs)
      s += "  " + src(in) + " -> n" + std::to_string(i) + " [label=\"" + spec_str(values[size_t(in)].spec) + "\"];\n";
  }
  for (size_t k = 0; k < outputs.size(); ++k)
    s += "  out" + std::to_string(k) + " [shape=doublecircle, label=\"out " + std::to_string(k) + "\"];\n  " + src(outputs[k]) +
         " -> out" + std::to_string(k) + ";\n";
  for (size_t k = 0; k < updates.size(); ++k)
    s += "  w" + std::to_string(k) + " [shape=house, label=\"" + esc(target_name(updates[k].target)) + " <-\"];\n  " +
         src(updates[k].value) + " -> w" + std::to_string(k) + ";\n";
  return s + "}\n";
}

int eliminate_dead_code(Graph& g) {
  std::vector<bool> live(g.values.size(), false);
  for (int o : g.outputs) live[size_t(o)] = true;
  for (const Update& u : g.updates) live[size_t(u.value)] = true;
  std::vector<bool> keep(g.nodes.size(), false);
  for (size_t i = g.nodes.size(); i-- > 0;) {
    for (int o : g.nodes[i].outputs) keep[i] = keep[i] || live[size_t(o)];
    if (keep[i])
      for (int in : g.nodes[i].inputs) live[size_t(in)] = true;
  }
  std::vector<Node> kept;
  for (size_t i = 0; i < g.nodes.size(); ++i)
    if (keep[i]) kept.push_back(std::move(g.nodes[i]));
  const int removed = int(g.nodes.size() - kept.size());
  g.nodes = std::move(kept);
  renumber_producers(g);
  return removed;
}

int eliminate_common_subexpressions(Graph& g) {
  // Equal constants first, so that nodes reading them compare equal.
  std::vector<int> consts;
  for (size_t id = 0; id < g.values.size(); ++id)
    if (g.values[id].kind == Value::Kind::constant) {
      bool merged = false;
      for (int c : consts)
        if (same_bytes(g.values[size_t(c)].constant, g.values[id].constant)) {
          replace_uses(g, int(id), c);
          merged = true;
          break;
        }
      if (!merged) consts.push_back(int(id));
    }
  std::map<std::tuple<std::string, std::string, std::vector<int>, int>, int> seen;  // (op, attrs, inputs, remat) -> node
  std::vector<Node> kept;
  int merged = 0;
  for (auto& n : g.nodes) {
    auto key = std::make_tuple(std::string(n.op->name()), n.op->attrs(), n.inputs, n.remat);
    auto [it, fresh] = seen.try_emplace(key, int(kept.size()));
    if (!fresh && kept[size_t(it->second)].outputs.size() == n.outputs.size()) {
      for (size_t k = 0; k < n.outputs.size(); ++k) replace_uses(g, n.outputs[k], kept[size_t(it->second)].outputs[k]);
      // Later nodes were already rewritten through g.nodes; the kept copies need it too.
      for (auto& kn : kept)
        for (auto& i : kn.inputs)
          for (size_t k = 0; k < n.outputs.size(); ++k)
            if (i == n.outputs[k]) i = kept[size_t(it->second)].outputs[k];
      ++merged;
      continue;
    }
    kept.push_back(std::move(n));
  }
  g.nodes = std::move(kept);
  renumber_producers(g);
  return merged;
}

namespace {
// Whether value v is a constant whose every element equals x.
bool constant_all(const Graph& g, int v, double x) {
  const Value& val = g.values[size_t(v)];
  if (val.kind != Value::Kind::constant || val.constant.numel() == 0) return false;
  for (double e : val.constant.astype(DType::f64).contiguous().to_vector<double>())
    if (e != x) return false;
  return true;
}
// "axes=[1,0,2]" -> {1, 0, 2}.
std::vector<int> axes_of(const std::string& attrs) {
  std::vector<int> out;
  const size_t a = attrs.find('['), b = attrs.find(']');
  if (a == std::string::npos || b == std::string::npos) return out;
  std::string body = attrs.substr(a + 1, b - a - 1);
  for (size_t i = 0, j; i < body.size(); i = j + 1) {
    j = body.find(',', i);
    if (j == std::string::npos) j = body.size();
    out.push_back(std::stoi(body.substr(i, j - i)));
  }
  return out;
}
bool same_spec(const TensorSpec& a, const TensorSpec& b) { return a.shape == b.shape && a.dtype == b.dtype && a.device == b.device; }
}  // namespace

int simplify_algebra(Graph& g) {
  int bypassed = 0;
  for (size_t i = 0; i < g.nodes.size(); ++i) {
    const Node& n = g.nodes[i];
    if (n.outputs.size() != 1) continue;
    const std::string op = n.op->name();
    const int out = n.outputs[0];
    int same = -1;  // the input the node's output equals
    if (n.inputs.size() == 2) {
      const int a = n.inputs[0], b = n.inputs[1];
      if ((op == "mul" || op == "div") && constant_all(g, b, 1.0)) same = a;
      else if (op == "mul" && constant_all(g, a, 1.0)) same = b;
      else if ((op == "add" || op == "sub") && constant_all(g, b, 0.0)) same = a;
      else if (op == "add" && constant_all(g, a, 0.0)) same = b;
    } else if (op == "permute" && n.inputs.size() == 1) {
      const Value& in = g.values[size_t(n.inputs[0])];
      if (in.kind == Value::Kind::node_output && std::string(g.nodes[size_t(in.producer)].op->name()) == "permute") {
        const std::vector<int> p = axes_of(g.nodes[size_t(in.producer)].op->attrs()), q = axes_of(n.op->attrs());
        const int d = int(q.size());
        bool identity = d > 0 && int(p.size()) == d;
        for (int j = 0; identity && j < d; ++j) {
          const int qj = (q[size_t(j)] % d + d) % d;
          identity = (p[size_t(qj)] % d + d) % d == j;
        }
        if (identity) same = g.nodes[size_t(in.producer)].inputs[0];
      }
    }
    if (same < 0 || same == out || !same_spec(g.values[size_t(same)].spec, g.values[size_t(out)].spec)) continue;
    replace_uses(g, out, same);
    ++bypassed;
  }
  return bypassed;
}

int fold_constants(Graph& g) {
  std::vector<Node> kept;
  int folded = 0;
  NoGradGuard ng;
  for (auto& n : g.nodes) {
    bool all_const = !n.inputs.empty();
    for (int v : n.inputs) all_const = all_const && g.values[size_t(v)].kind == Value::Kind::constant;
    if (!all_const) {
      kept.push_back(std::move(n));
      continue;
    }
    TensorList in;
    for (int v : n.inputs) in.push_back(g.values[size_t(v)].constant);
    TensorList out = n.op->forward(in);
    for (size_t k = 0; k < n.outputs.size(); ++k) {
      Value& val = g.values[size_t(n.outputs[k])];
      val.kind = Value::Kind::constant;
      val.constant = out[k].contiguous();
      val.producer = -1;
    }
    ++folded;
  }
  g.nodes = std::move(kept);
  renumber_producers(g);
  return folded;
}

void optimize(Graph& g) {
  for (int changed = 1; changed > 0;)
    changed = fold_constants(g) + simplify_algebra(g) + eliminate_common_subexpressions(g) + eliminate_dead_code(g);
}

int update_in_place(Graph& g) {
  // Per storage: the updates writing it and the state / constant values holding it.
  std::map<const Storage*, int> writes, holders;
  for (const Update& u : g.updates) ++writes[u.target.storage().get()];
  for (const Value& val : g.values)
    if ((val.kind == Value::Kind::state || val.kind == Value::Kind::constant) && val.constant.defined())
      ++holders[val.constant.storage().get()];
  std::vector<bool> is_output(g.values.size(), false), update_reads(g.values.size(), false);
  for (int o : g.outputs) is_output[size_t(o)] = true;
  for (const Update& u : g.updates) update_reads[size_t(u.value)] = true;
  int made = 0;
  for (const Update& u : g.updates) {
    const Value& val = g.values[size_t(u.value)];
    if (val.kind != Value::Kind::node_output || is_output[size_t(u.value)]) continue;
    const size_t at = size_t(val.producer);
    Node& n = g.nodes[at];
    const int j = n.op->in_place_input(size_t(val.index));
    if (j < 0 || size_t(j) >= n.inputs.size()) continue;
    const int s = n.inputs[size_t(j)];
    const Value& sv = g.values[size_t(s)];
    const Storage* st = u.target.storage().get();
    if (sv.kind != Value::Kind::state || !same_memory(sv.constant, u.target) || !u.target.is_contiguous() ||
        !(sv.spec.shape == val.spec.shape && sv.spec.dtype == val.spec.dtype && sv.spec.device == val.spec.device) || writes[st] != 1 || holders[st] != 1 ||
        std::count(n.inputs.begin(), n.inputs.end(), s) != 1)
      continue;
    // T's value and the views of it (outputs of custom-forward ops on an alias, in node order).
    std::vector<bool> alias(g.values.size(), false);
    alias[size_t(s)] = true;
    bool read_later = false;
    for (size_t m = 0; m < g.nodes.size() && !read_later; ++m) {
      const Node& o = g.nodes[m];
      const bool reads = std::any_of(o.inputs.begin(), o.inputs.end(), [&](int x) { return alias[size_t(x)]; });
      if (!reads) continue;
      if (m > at) read_later = true;
      if (o.op->custom_forward())
        for (int y : o.outputs) alias[size_t(y)] = true;
    }
    for (size_t x = 0; x < g.values.size() && !read_later; ++x)
      read_later = alias[x] && (is_output[x] || update_reads[x]);
    if (read_later) continue;
    if (n.in_place.empty()) n.in_place.assign(n.outputs.size(), -1);
    n.in_place[size_t(val.index)] = j;
    ++made;
  }
  return made;
}

namespace {
// A static input's key: its spec and its values (the first 16, and a hash of all bytes beyond that).
std::string static_key(const Tensor& t) {
  const Tensor c = t.detach().contiguous().to(Device::cpu());
  const auto* p = static_cast<const unsigned char*>(c.raw_data());
  std::string s = "static " + spec_str(spec_of(t)) + "{";
  const std::vector<double> vals = c.to_vector<double>();
  for (size_t i = 0; i < vals.size() && i < 16; ++i) s += (i ? "," : "") + fmt::format("{}", vals[i]);
  if (vals.size() > 16) {
    uint64_t h = 1469598103934665603ull;  // FNV-1a
    for (size_t i = 0; i < c.nbytes(); ++i) h = (h ^ p[i]) * 1099511628211ull;
    s += fmt::format(",...#{:016x}", h);
  }
  return s + "}";
}
std::vector<std::string> split_sig(const std::string& s) {
  std::vector<std::string> out;
  size_t a = 0;
  for (size_t b; (b = s.find(';', a)) != std::string::npos; a = b + 1) out.push_back(s.substr(a, b - a));
  out.push_back(s.substr(a));
  return out;
}
}  // namespace

std::string Compiled::signature(const TensorList& args) const {
  std::string s;
  for (size_t i = 0; i < args.size(); ++i) {
    const bool is_static = std::find(opts_.static_inputs.begin(), opts_.static_inputs.end(), int(i)) != opts_.static_inputs.end();
    s += (i ? ";" : "") + (!args[i].defined() ? std::string("undefined") : is_static ? static_key(args[i]) : spec_str(spec_of(args[i])));
  }
  return s;
}

TensorList Compiled::graph_args(const TensorList& args) const {
  TensorList out;
  for (size_t i = 0; i < args.size(); ++i)
    if (std::find(opts_.static_inputs.begin(), opts_.static_inputs.end(), int(i)) == opts_.static_inputs.end()) out.push_back(args[i]);
  return out;
}

const Graph* Compiled::graph_for(const TensorList& args) const {
  auto it = cache_.find(signature(args));
  return it == cache_.end() ? nullptr : &it->second.graph;
}

const CaptureStats* Compiled::capture_stats_for(const TensorList& args) const {
  auto it = cache_.find(signature(args));
  return it == cache_.end() || !it->second.replay ? nullptr : &it->second.replay->stats();
}

namespace {
bool log_compiles() {
  const char* e = std::getenv("TITANAX_LOG_COMPILES");
  return e && std::string(e) == "1";
}
}  // namespace

TensorList Compiled::operator()(const TensorList& args) {
  if (apply_observer()) return fn_(args);  // inside another trace: inline
  if (GradMode::enabled()) {  // results that must carry gradients: fn recorded on the tape, not a replay
    const auto needs = std::find_if(args.begin(), args.end(), [](const Tensor& t) { return t.defined() && t.requires_grad(); });
    if (needs != args.end()) {
      if (stats_.eager_for_grad++ == 0 && log_compiles())
        spdlog::info("jit: input {} requires grad: running the function eagerly so that its results carry gradients "
                     "(take the gradient inside the jitted function to compile the backward pass too)",
                     needs - args.begin());
      return fn_(args);
    }
  }
  const std::string sig = signature(args);
  auto it = cache_.find(sig);
  if (it != cache_.end()) {
    ++stats_.hits;
    Entry& e = it->second;
    if (!e.replay_made) {
      e.replay_made = true;
      if (opts_.cuda_graphs) e.replay = make_cuda_graph_replay(e.graph);
    }
    // Under anomaly detection, node by node (Graph::run checks each node's outputs).
    return e.replay && !anomaly_options() ? e.replay->run(graph_args(args)) : e.graph.run(graph_args(args));
  }
  if (log_compiles()) {
    std::string why = "first call";
    if (!cache_.empty()) {  // name the first input that differs from the nearest cached signature
      const auto mine = split_sig(sig);
      size_t best = 0;
      std::string reason;
      for (const auto& [cached, entry] : cache_) {
        const auto theirs = split_sig(cached);
        size_t same = 0;
        std::string diff = theirs.size() != mine.size()
                               ? std::to_string(mine.size()) + " inputs (cached: " + std::to_string(theirs.size()) + ")"
                               : "";
        for (size_t i = 0; i < mine.size() && i < theirs.size(); ++i) {
          if (mine[i] == theirs[i]) ++same;
          else if (diff.empty()) diff = "input " + std::to_string(i) + ": " + mine[i] + " (cached: " + theirs[i] + ")";
        }
        if (reason.empty() || same > best) best = same, reason = diff;
      }
      why = "new signature, " + reason;
    }
    spdlog::info("jit: compiling ({}); {} graph(s) cached", why, cache_.size());
  }
  const auto t0 = std::chrono::steady_clock::now();
  TensorList eager;  // tracing runs fn once, with its effects: that run answers this call
  Graph g = trace(fn_, args, opts_.static_inputs, &eager);
  optimize_for_replay(g, opts_);
  precompile_fused_kernels(g);  // the generated kernels in parallel, now rather than one by one at first replay
  stats_.compile_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ++stats_.misses;
  cache_.emplace(sig, Entry{std::move(g)});
  return eager;
}

void optimize_for_replay(Graph& g, const JitOptions& opts) {
  optimize(g);
  if (fuse(g) > 0) optimize(g);
  update_in_place(g);
  if (opts.memory_plan) plan_memory_pass(g);
}

Compiled jit(std::function<TensorList(const TensorList&)> fn, JitOptions opts) { return Compiled(std::move(fn), std::move(opts)); }

}  // namespace titanax::jit
