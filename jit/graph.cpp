#include "jit/graph.h"

#include <cstring>
#include <map>
#include <unordered_map>

#include "autodiff/tape.h"
#include "core/error.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <cstdlib>

namespace titanax::jit {
namespace {

TensorSpec spec_of(const Tensor& t) { return {t.shape(), t.dtype(), t.device()}; }

std::string spec_str(const TensorSpec& s) { return std::string(dtype_name(s.dtype)) + s.shape.str() + (s.device.is_cpu() ? "" : "@" + s.device.str()); }

// Records apply() calls into a graph while installed.
class Tracer final : public ApplyObserver {
 public:
  Graph g;
  std::unordered_map<const TensorImpl*, int> ids;  // tensor -> value id
  TensorList keep;                                  // every traced tensor stays alive, so addresses stay unique

  int value_of(const Tensor& t) {
    if (auto it = ids.find(t.get()); it != ids.end()) return it->second;
    Value v{Value::Kind::constant, spec_of(t), -1, 0, t};  // read by the function, made outside the trace
    for (const Value& c : g.values) v.index += c.kind == Value::Kind::constant;
    return add(std::move(v), t);
  }
  int add(Value v, const Tensor& t) {
    g.values.push_back(std::move(v));
    const int id = int(g.values.size()) - 1;
    ids[t.get()] = id;
    keep.push_back(t);
    return id;
  }
  void on_apply(const OpPtr& op, const TensorList& in, const TensorList& out) override {
    Node n{op, {}, {}};
    for (const auto& t : in) n.inputs.push_back(value_of(t));
    const int idx = int(g.nodes.size());
    for (size_t k = 0; k < out.size(); ++k) n.outputs.push_back(add(Value{Value::Kind::node_output, spec_of(out[k]), idx, int(k), {}}, out[k]));
    g.nodes.push_back(std::move(n));
  }
};

// Every use of value `from` becomes a use of `to`.
void replace_uses(Graph& g, int from, int to) {
  for (auto& n : g.nodes)
    for (auto& i : n.inputs)
      if (i == from) i = to;
  for (auto& o : g.outputs)
    if (o == from) o = to;
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

Graph trace(const std::function<TensorList(const TensorList&)>& fn, const TensorList& args) {
  Tracer tr;
  for (size_t i = 0; i < args.size(); ++i) {
    if (!args[i].defined()) throw ValueError("jit::trace: input " + std::to_string(i) + " is undefined", "a tensor", "Tensor()");
    // A fresh handle per input: two arguments sharing a tensor stay two inputs.
    Tensor h = args[i].detach();
    tr.g.inputs.push_back(tr.add(Value{Value::Kind::input, spec_of(h), -1, int(i), {}}, h));
  }
  TensorList handles(tr.keep.begin(), tr.keep.end());
  ApplyObserver* prev = set_apply_observer(&tr);
  TensorList out;
  try {
    out = fn(handles);
  } catch (...) {
    set_apply_observer(prev);
    throw;
  }
  set_apply_observer(prev);
  for (size_t k = 0; k < out.size(); ++k) {
    if (!out[k].defined()) throw ValueError("jit::trace: output " + std::to_string(k) + " is undefined", "a tensor", "Tensor()");
    tr.g.outputs.push_back(tr.value_of(out[k]));
  }
  return std::move(tr.g);
}

TensorList Graph::run(const TensorList& args) const {
  if (args.size() != inputs.size())
    throw ValueError("jit graph: wrong number of inputs", std::to_string(inputs.size()), std::to_string(args.size()));
  std::vector<Tensor> env(values.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    const TensorSpec& want = values[size_t(inputs[i])].spec;
    const Tensor& a = args[i];
    const std::string what = "jit graph input " + std::to_string(i);
    if (!a.defined()) throw ValueError(what + " is undefined", spec_str(want), "Tensor()");
    if (a.shape() != want.shape) throw ShapeError(what + " has another shape than when traced", want.shape.str(), a.shape().str(), "trace again for this shape");
    if (a.dtype() != want.dtype) throw DTypeError(what + " has another dtype than when traced", std::string(dtype_name(want.dtype)), std::string(dtype_name(a.dtype())), "trace again for this dtype");
    if (!(a.device() == want.device)) throw DeviceError(what + " is on another device than when traced", want.device.str(), a.device().str(), "trace again on this device");
    env[size_t(inputs[i])] = a;
  }
  for (size_t v = 0; v < values.size(); ++v)
    if (values[v].kind == Value::Kind::constant) env[v] = values[v].constant;
  // Last use of each value (node index; outputs live to the end).
  std::vector<int> last(values.size(), -1);
  for (size_t i = 0; i < nodes.size(); ++i)
    for (int v : nodes[i].inputs) last[size_t(v)] = int(i);
  for (int o : outputs) last[size_t(o)] = int(nodes.size());
  NoGradGuard ng;
  for (size_t i = 0; i < nodes.size(); ++i) {
    const Node& n = nodes[i];
    TensorList in;
    for (int v : n.inputs) in.push_back(env[size_t(v)]);
    TensorList out = n.op->forward(in);
    for (size_t k = 0; k < n.outputs.size(); ++k) env[size_t(n.outputs[k])] = out[k];
    for (int v : n.inputs)
      if (last[size_t(v)] == int(i) && values[size_t(v)].kind == Value::Kind::node_output) env[size_t(v)] = Tensor();
  }
  TensorList res;
  for (int o : outputs) res.push_back(env[size_t(o)]);
  return res;
}

std::string Graph::str() const {
  auto v = [](int id) { return "%" + std::to_string(id); };
  std::string s = "graph(";
  for (size_t i = 0; i < inputs.size(); ++i) s += (i ? ", " : "") + v(inputs[i]) + ": " + spec_str(values[size_t(inputs[i])].spec);
  s += ") {\n";
  std::vector<bool> used(values.size(), false);
  for (const auto& n : nodes)
    for (int i : n.inputs) used[size_t(i)] = true;
  for (int o : outputs) used[size_t(o)] = true;
  for (size_t id = 0; id < values.size(); ++id)
    if (values[id].kind == Value::Kind::constant && used[id]) {
      const Tensor& c = values[id].constant;
      s += "  " + v(int(id)) + " = const " + spec_str(values[id].spec) + (c.numel() == 1 ? " " + std::to_string(c.item()) : "") + "\n";
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
    s += "\n";
  }
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
  std::vector<bool> used(values.size(), false);
  for (const auto& n : nodes)
    for (int i : n.inputs) used[size_t(i)] = true;
  for (int o : outputs) used[size_t(o)] = true;
  for (size_t id = 0; id < values.size(); ++id)
    if (values[id].kind != Value::Kind::node_output && used[id])
      s += "  v" + std::to_string(id) + " [shape=ellipse, label=\"" +
           (values[id].kind == Value::Kind::input ? "input " : "const ") + "%" + std::to_string(id) + "\\n" +
           spec_str(values[id].spec) + "\"];\n";
  for (size_t i = 0; i < nodes.size(); ++i) {
    const std::string a = nodes[i].op->attrs();
    s += "  n" + std::to_string(i) + " [shape=box, label=\"" + esc(std::string(nodes[i].op->name()) + (a.empty() ? "" : "\\n" + a)) + "\"];\n";
    for (int in : nodes[i].inputs)
      s += "  " + src(in) + " -> n" + std::to_string(i) + " [label=\"" + spec_str(values[size_t(in)].spec) + "\"];\n";
  }
  for (size_t k = 0; k < outputs.size(); ++k)
    s += "  out" + std::to_string(k) + " [shape=doublecircle, label=\"out " + std::to_string(k) + "\"];\n  " + src(outputs[k]) +
         " -> out" + std::to_string(k) + ";\n";
  return s + "}\n";
}

int eliminate_dead_code(Graph& g) {
  std::vector<bool> live(g.values.size(), false);
  for (int o : g.outputs) live[size_t(o)] = true;
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
  std::map<std::tuple<std::string, std::string, std::vector<int>>, int> seen;  // (op, attrs, inputs) -> node
  std::vector<Node> kept;
  int merged = 0;
  for (auto& n : g.nodes) {
    auto key = std::make_tuple(std::string(n.op->name()), n.op->attrs(), n.inputs);
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

namespace {
std::string signature(const TensorList& args) {
  std::string s;
  for (size_t i = 0; i < args.size(); ++i)
    s += (i ? ";" : "") + (args[i].defined() ? spec_str(spec_of(args[i])) : std::string("undefined"));
  return s;
}
std::vector<std::string> split_sig(const std::string& s) {
  std::vector<std::string> out;
  size_t a = 0;
  for (size_t b; (b = s.find(';', a)) != std::string::npos; a = b + 1) out.push_back(s.substr(a, b - a));
  out.push_back(s.substr(a));
  return out;
}
}  // namespace

const Graph* Compiled::graph_for(const TensorList& args) const {
  auto it = cache_.find(signature(args));
  return it == cache_.end() ? nullptr : &it->second;
}

TensorList Compiled::operator()(const TensorList& args) {
  const std::string sig = signature(args);
  auto it = cache_.find(sig);
  if (it != cache_.end()) {
    ++stats_.hits;
    return it->second.run(args);
  }
  if (const char* e = std::getenv("TITANAX_LOG_COMPILES"); e && std::string(e) == "1") {
    std::string why = "first call";
    if (!cache_.empty()) {  // name the first input that differs from the nearest cached signature
      const auto mine = split_sig(sig);
      size_t best = 0;
      std::string reason;
      for (const auto& [cached, g] : cache_) {
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
  Graph g = trace(fn_, args);
  for (int changed = 1; changed > 0;)
    changed = fold_constants(g) + simplify_algebra(g) + eliminate_common_subexpressions(g) + eliminate_dead_code(g);
  stats_.compile_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ++stats_.misses;
  return cache_.emplace(sig, std::move(g)).first->second.run(args);
}

Compiled jit(std::function<TensorList(const TensorList&)> fn) { return Compiled(std::move(fn)); }

}  // namespace titanax::jit
