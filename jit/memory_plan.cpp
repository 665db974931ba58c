#include "jit/memory_plan.h"

#include <algorithm>
#include <cstdint>
#include <memory>

#include <fmt/format.h>

#include "core/error.h"

namespace titanax::jit {
namespace {

size_t align_up(size_t n) { return (n + MemoryPlan::alignment - 1) / MemoryPlan::alignment * MemoryPlan::alignment; }

std::string kib(size_t bytes) { return fmt::format("{:.1f} KiB", double(bytes) / 1024.0); }

// Whether a node runs through the default Op::forward on the CPU, so its outputs can be preallocated.
bool preallocatable(const Graph& g, const Node& n) {
  if (n.op->custom_forward()) return false;
  for (int v : n.inputs)
    if (!g.values[size_t(v)].spec.device.is_cpu()) return false;
  for (int v : n.outputs)
    if (!g.values[size_t(v)].spec.device.is_cpu()) return false;
  return true;
}

}  // namespace

std::string MemoryPlan::str() const {
  return "arena " + kib(arena_bytes) + " for " + kib(total_bytes) + " of values in " + std::to_string(planned.size()) +
         " buffers (peak live " + kib(peak_live_bytes) + ")";
}

uint64_t structure_hash(const Graph& g) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a over 64-bit words
  auto mix = [&h](uint64_t x) { h = (h ^ x) * 1099511628211ull; };
  mix(g.values.size());
  for (const Value& v : g.values) mix(uint64_t(v.kind));
  for (const Node& n : g.nodes) {
    mix(reinterpret_cast<uintptr_t>(n.op.get()));
    mix(n.inputs.size());
    for (int v : n.inputs) mix(uint64_t(v));
    mix(n.outputs.size());
    for (int v : n.outputs) mix(uint64_t(v));
    for (int j : n.in_place) mix(uint64_t(j + 1));
  }
  mix(g.outputs.size());
  for (int v : g.outputs) mix(uint64_t(v));
  mix(g.updates.size());
  for (const Update& u : g.updates) mix(uint64_t(u.value));
  return h;
}

MemoryPlan plan_memory(const Graph& g) {
  const int end = int(g.nodes.size());  // "used after the last node"
  std::vector<int> last(g.values.size(), -1);
  std::vector<bool> escapes(g.values.size(), false);  // a graph output, or storage one may share
  for (size_t i = 0; i < g.nodes.size(); ++i)
    for (int v : g.nodes[i].inputs) last[size_t(v)] = int(i);
  for (int o : g.outputs) last[size_t(o)] = end, escapes[size_t(o)] = true;
  for (const Update& u : g.updates) last[size_t(u.value)] = end;
  // Outputs of custom-forward ops may share their inputs' storage: the inputs live as long as those
  // outputs, and escape with them. In reverse order, so chains of views carry back to their base.
  for (size_t i = g.nodes.size(); i-- > 0;) {
    const Node& n = g.nodes[i];
    if (!n.op->custom_forward()) continue;
    for (int o : n.outputs)
      for (int x : n.inputs) {
        last[size_t(x)] = std::max(last[size_t(x)], last[size_t(o)]);
        escapes[size_t(x)] = escapes[size_t(x)] || escapes[size_t(o)];
      }
  }

  MemoryPlan plan;
  plan.graph_hash = structure_hash(g);
  plan.slot.assign(g.values.size(), -1);
  for (size_t i = 0; i < g.nodes.size(); ++i) {
    const Node& n = g.nodes[i];
    if (!preallocatable(g, n)) continue;
    for (size_t k = 0; k < n.outputs.size(); ++k) {
      const int o = n.outputs[k];
      if (k < n.in_place.size() && n.in_place[k] >= 0) continue;  // the state tensor itself
      const TensorSpec& s = g.values[size_t(o)].spec;
      const size_t bytes = align_up(s.nbytes());
      if (escapes[size_t(o)] || bytes == 0) continue;
      plan.planned.push_back({o, int(i), std::max(last[size_t(o)], int(i)), bytes, 0});
    }
  }
  std::sort(plan.planned.begin(), plan.planned.end(), [](const PlannedValue& a, const PlannedValue& b) { return a.value < b.value; });
  for (size_t k = 0; k < plan.planned.size(); ++k) plan.slot[size_t(plan.planned[k].value)] = int(k);

  // Greedy by size: largest first, each at the smallest gap between the values placed so far that are
  // live at the same time (offset order), else past the highest of them.
  std::vector<size_t> order(plan.planned.size());
  for (size_t k = 0; k < order.size(); ++k) order[k] = k;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    const PlannedValue &x = plan.planned[a], &y = plan.planned[b];
    return x.bytes != y.bytes ? x.bytes > y.bytes : x.first < y.first;
  });
  std::vector<size_t> placed;  // indices into planned, by offset
  for (size_t k : order) {
    PlannedValue& p = plan.planned[k];
    size_t cur = 0, best = SIZE_MAX, best_gap = SIZE_MAX;
    for (size_t j : placed) {
      const PlannedValue& q = plan.planned[j];
      if (q.last < p.first || q.first > p.last) continue;
      if (q.offset >= cur + p.bytes && q.offset - cur < best_gap) best = cur, best_gap = q.offset - cur;
      cur = std::max(cur, q.offset + q.bytes);
    }
    p.offset = best == SIZE_MAX ? cur : best;
    placed.insert(std::upper_bound(placed.begin(), placed.end(), k,
                                   [&](size_t a, size_t b) { return plan.planned[a].offset < plan.planned[b].offset; }),
                  k);
    plan.arena_bytes = std::max(plan.arena_bytes, p.offset + p.bytes);
    plan.total_bytes += p.bytes;
  }

  // Live bytes at each node index: +bytes where a value starts, -bytes after its last use.
  std::vector<int64_t> delta(g.nodes.size() + 2, 0);
  for (const PlannedValue& p : plan.planned) delta[size_t(p.first)] += int64_t(p.bytes), delta[size_t(p.last) + 1] -= int64_t(p.bytes);
  int64_t live = 0;
  for (int64_t d : delta) plan.peak_live_bytes = std::max(plan.peak_live_bytes, size_t(live += d));
  return plan;
}

const MemoryPlan& plan_memory_pass(Graph& g) {
  g.plan = std::make_shared<const MemoryPlan>(plan_memory(g));
  return *g.plan;
}

std::shared_ptr<Storage> make_arena(const Graph& g, const MemoryPlan& plan) {
  if (plan.graph_hash != structure_hash(g))
    throw ValueError("jit: the graph's memory plan is stale: the graph changed after it was planned",
                     "a plan made by plan_memory_pass on the graph as it is", "a graph with other nodes or uses",
                     "run plan_memory_pass(g) again after the other passes");
  std::lock_guard<std::mutex> lock(plan.spare->mu);
  std::shared_ptr<Storage>& spare = plan.spare->arena;
  if (spare && spare.use_count() == 1) return spare;  // no run holds it
  auto fresh = std::make_shared<Storage>(plan.arena_bytes, Device::cpu());
  if (!spare) spare = fresh;
  return fresh;
}

TensorList run_node(const Graph& g, const MemoryPlan* plan, const std::shared_ptr<Storage>& arena, size_t node,
                    const TensorList& in, const std::vector<Tensor>* into) {
  const Node& n = g.nodes[node];
  bool planned = false;
  if (plan)
    for (int o : n.outputs) planned = planned || plan->slot[size_t(o)] >= 0;
  // A buffer of the caller for an output (only for ops whose outputs Op::forward would allocate).
  auto given = [&](size_t k, const TensorSpec& s) -> const Tensor* {
    if (!into || n.op->custom_forward() || k >= n.outputs.size()) return nullptr;
    const Tensor& t = (*into)[size_t(n.outputs[k])];
    const bool fits = t.defined() && t.shape() == s.shape && t.dtype() == s.dtype && t.device() == s.device && t.is_contiguous();
    return fits ? &t : nullptr;
  };
  bool direct = false;
  if (into && !n.op->custom_forward())
    for (int o : n.outputs) direct = direct || (*into)[size_t(o)].defined();
  if (!planned && n.in_place.empty() && !direct) return n.op->forward(in);
  const std::vector<TensorSpec> specs = n.op->infer(in);
  TensorList out;
  out.reserve(specs.size());
  for (size_t k = 0; k < specs.size(); ++k) {
    const TensorSpec& s = specs[k];
    const int into = k < n.in_place.size() ? n.in_place[k] : -1;
    if (into >= 0) {  // update_in_place: the output is the state tensor itself
      const Tensor& t = in[size_t(into)];
      if (!(t.shape() == s.shape) || t.dtype() != s.dtype || !(t.device() == s.device) || !t.is_contiguous())
        throw InternalError("jit: op '" + std::string(n.op->name()) + "' writes output " + std::to_string(k) +
                                " in place into an input of another spec or layout",
                            std::string(dtype_name(s.dtype)) + s.shape.str() + " on " + s.device.str() + ", contiguous", t.str());
      out.push_back(t);
      continue;
    }
    if (const Tensor* t = given(k, s)) {
      out.push_back(*t);
      continue;
    }
    const int slot = plan && k < n.outputs.size() ? plan->slot[size_t(n.outputs[k])] : -1;
    if (slot < 0) {
      out.push_back(empty(s.shape, s.dtype, s.device));
      continue;
    }
    const PlannedValue& p = plan->planned[size_t(slot)];
    const size_t bytes = s.nbytes();
    if (align_up(bytes) != p.bytes || bytes == 0)
      throw InternalError("jit: op '" + std::string(n.op->name()) + "' inferred another output size than the memory plan holds",
                          std::to_string(p.bytes) + " bytes (aligned) for %" + std::to_string(p.value),
                          std::to_string(bytes) + " bytes");
    auto impl = std::make_shared<TensorImpl>();  // a contiguous view of the arena at the planned offset
    impl->shape = s.shape;
    impl->strides = s.shape.contiguous_strides();
    impl->offset = int64_t(p.offset / itemsize(s.dtype));
    impl->dtype = s.dtype;
    impl->storage = arena;
    out.emplace_back(std::move(impl));
  }
  const Device d = !in.empty() ? in[0].device() : !specs.empty() ? specs[0].device : Device::cpu();
  if (d.is_cpu()) n.op->cpu(in, out);
  else n.op->cuda(in, out);
  return out;
}

}  // namespace titanax::jit
