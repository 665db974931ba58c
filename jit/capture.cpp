#include "jit/capture.h"

#include <cstdlib>
#include <exception>
#include <set>

#include <spdlog/spdlog.h>

#include "autodiff/tape.h"
#include "core/cuda_runtime.h"
#include "core/error.h"
#include "jit/memory_plan.h"

namespace titanax::jit {
namespace {

bool logging() {
  const char* e = std::getenv("TITANAX_LOG_COMPILES");
  return e && std::string(e) == "1";
}

// Makes a stream the calling thread's current one for a scope.
struct StreamScope {
  int device;
  void* prev;
  StreamScope(int d, void* s) : device(d), prev(cuda_rt::current_stream(d)) { cuda_rt::set_current_stream(d, s); }
  ~StreamScope() {
    try {
      cuda_rt::set_current_stream(device, prev);
    } catch (...) {
    }
  }
};

// CUDA stream capture on a stream of the replay's own, allocations while capturing from a pool tagged
// with this recorder (core/cuda_runtime.h).
class CudaRecorder final : public SegmentRecorder {
 public:
  explicit CudaRecorder(int device) : device_(device), stream_(cuda_rt::create_stream(device)) {}
  ~CudaRecorder() override {
    cuda_rt::release_pool(device_, this);
    cuda_rt::destroy_stream(device_, stream_);
  }
  std::shared_ptr<void> enter() override { return std::make_shared<StreamScope>(device_, stream_); }
  void begin() override { cuda_rt::begin_capture(device_, this); }
  TensorList record(size_t, const TensorList&, const std::function<TensorList()>& run) override { return run(); }
  void* end(std::string* why) noexcept override { return cuda_rt::end_capture(device_, why); }
  void launch(void* segment) override { cuda_rt::launch_graph(device_, segment); }
  void destroy(void* segment) noexcept override { cuda_rt::destroy_graph(segment); }
  void synchronize() noexcept override {
    try {
      cuda_rt::synchronize(device_);
    } catch (...) {
    }
  }

 private:
  int device_;
  void* stream_;
};

// The CUDA device of g's first node whose inputs and outputs all live on one CUDA device (cpu: none).
Device device_of(const Graph& g) {
  for (const Node& n : g.nodes) {
    if (n.outputs.empty()) continue;
    const Device d = g.values[size_t(n.outputs[0])].spec.device;
    if (d.is_cuda() && capturable_node(g, n, d)) return d;
  }
  return Device::cpu();
}

}  // namespace

bool cuda_graphs_enabled() {
  const char* e = std::getenv("TITANAX_CUDA_GRAPHS");
  return !(e && std::string(e) == "0");
}

bool capturable_node(const Graph& g, const Node& n, Device d) {
  if (!d.is_cuda() || !n.op->capturable()) return false;
  for (size_t i = 0; i < n.inputs.size(); ++i)
    if (n.op->host_input(i) || !(g.values[size_t(n.inputs[i])].spec.device == d)) return false;
  for (int o : n.outputs)
    if (!(g.values[size_t(o)].spec.device == d)) return false;
  return true;
}

std::vector<std::pair<size_t, size_t>> capture_segments(const Graph& g, const NodeFilter& capturable) {
  std::vector<std::pair<size_t, size_t>> segs;
  const size_t n = g.nodes.size();
  for (size_t i = 0; i < n;) {
    if (!capturable(i)) {
      ++i;
      continue;
    }
    size_t e = i;
    bool work = false;
    for (; e < n && capturable(e); ++e) work = work || !g.nodes[e].op->custom_forward();
    if (work) segs.push_back({i, e});
    i = e;
  }
  return segs;
}

CapturedReplay::CapturedReplay(const Graph& g, std::unique_ptr<SegmentRecorder> recorder, NodeFilter capturable)
    : g_(g), rec_(std::move(recorder)), capturable_(std::move(capturable)) {
  if (!rec_ || !capturable_)
    throw ValueError("CapturedReplay: needs a recorder and a node filter", "non-null", "null");
  excluded_.assign(g.nodes.size(), false);
  last_ = g.last_uses();
}

CapturedReplay::~CapturedReplay() { drop_captures(); }

void CapturedReplay::drop_captures() noexcept {
  if (!segments_.empty()) rec_->synchronize();  // no launch of them in flight
  for (Segment& s : segments_) rec_->destroy(s.handle);
  segments_.clear();
  held_.clear();
  static_in_.clear();
  addresses_.clear();
}

bool CapturedReplay::moved() const {
  for (const auto& [v, p] : addresses_)
    if (g_.values[size_t(v)].constant.raw_data() != p) return true;
  return false;
}

TensorList CapturedReplay::node_inputs(size_t j, const std::vector<Tensor>& env) const {
  TensorList in;
  for (int v : g_.nodes[j].inputs) in.push_back(env[size_t(v)]);
  return in;
}

void CapturedReplay::release_last_uses(size_t j, std::vector<Tensor>& env, size_t b, size_t e) const {
  for (int v : g_.nodes[j].inputs) {
    if (last_[size_t(v)] != int(j) || g_.values[size_t(v)].kind != Value::Kind::node_output) continue;
    const size_t p = size_t(g_.values[size_t(v)].producer);
    if (b < e && !(p >= b && p < e)) continue;
    env[size_t(v)] = Tensor();
  }
}

TensorList CapturedReplay::run(const TensorList& args) {
  const std::shared_ptr<void> scope = rec_->enter();
  if (calls_++ == 0) return g_.run(args);  // warm-up: kernels load and libraries initialise outside a capture
  if (!segments_.empty() && moved()) {
    spdlog::info("jit: a tensor the captured segments use has moved (e.g. Module::to); capturing again");
    ++stats_.recaptures;
    drop_captures();
  }
  return segments_.empty() ? capture(args) : launch(args);
}

TensorList CapturedReplay::capture(const TensorList& args) {
  const auto segs = capture_segments(g_, [&](size_t j) { return !excluded_[j] && capturable_(j); });
  if (segs.empty()) return g_.run(args);  // every capture failed once: op by op from now on
  std::vector<Tensor> env = g_.environment(args);
  NoGradGuard ng;
  const size_t N = g_.nodes.size(), V = g_.values.size();
  std::vector<int> unit(V, -1);  // per node output: the segment making it, -1 for an op-by-op node
  for (size_t s = 0; s < segs.size(); ++s)
    for (size_t j = segs[s].first; j < segs[s].second; ++j)
      for (int o : g_.nodes[j].outputs) unit[size_t(o)] = int(s);
  held_.assign(V, Tensor());
  static_in_.assign(g_.inputs.size(), Tensor());
  addresses_.clear();
  std::vector<bool> read_in_segment(V, false);
  for (const auto& [b, e] : segs)
    for (size_t j = b; j < e; ++j)
      for (int v : g_.nodes[j].inputs) read_in_segment[size_t(v)] = true;
  for (size_t v = 0; v < V; ++v) {
    const Value::Kind kind = g_.values[v].kind;
    if (read_in_segment[v] && (kind == Value::Kind::state || kind == Value::Kind::constant))
      addresses_.push_back({int(v), env[v].raw_data()});
  }
  for (size_t k = 0; k < g_.inputs.size(); ++k) {
    const int v = g_.inputs[k];
    if (!read_in_segment[size_t(v)]) continue;
    static_in_[k] = args[k].detach().clone();  // the segments read this buffer; launch() copies into it
    env[size_t(v)] = static_in_[k];
  }
  const std::shared_ptr<Storage> arena = g_.plan ? make_arena(g_, *g_.plan) : nullptr;
  auto inputs_of = [&](size_t j) { return node_inputs(j, env); };
  auto set_outputs = [&](size_t j, const TensorList& out) {
    for (size_t k = 0; k < g_.nodes[j].outputs.size(); ++k) env[size_t(g_.nodes[j].outputs[k])] = out[k];
  };
  auto release_inputs = [&](size_t j, size_t b, size_t e) { release_last_uses(j, env, b, e); };
  auto eager = [&](size_t j) {
    set_outputs(j, run_node(g_, g_.plan.get(), arena, j, inputs_of(j)));
    release_inputs(j, 0, 0);
  };
  int failed = 0;
  std::vector<Segment> made;
  // An op-by-op node that throws (bad labels, say) ends the call: release what this capture made.
  struct Unwind {
    SegmentRecorder& rec;
    std::vector<Segment>& made;
    bool armed = true;
    ~Unwind() {
      if (!armed || made.empty()) return;
      rec.synchronize();
      for (Segment& s : made) rec.destroy(s.handle);
    }
  } unwind{*rec_, made};
  size_t next = 0;
  for (size_t i = 0; i < N;) {
    if (next >= segs.size() || segs[next].first != i) {
      eager(i++);
      continue;
    }
    const auto [b, e] = segs[next++];
    // Values an op-by-op node made and this segment reads: a buffer of the replay the segment reads
    // from, which launch() fills at every call.
    for (size_t j = b; j < e; ++j)
      for (int v : g_.nodes[j].inputs)
        if (g_.values[size_t(v)].kind == Value::Kind::node_output && unit[size_t(v)] == -1 && !held_[size_t(v)].defined())
          env[size_t(v)] = held_[size_t(v)] = env[size_t(v)].detach().clone();
    std::string why;
    size_t at = e;
    bool begun = false;
    try {
      rec_->begin();
      begun = true;
    } catch (const std::exception& ex) {
      why = ex.what();
    }
    for (size_t j = b; begun && j < e && at == e; ++j) {
      try {
        const TensorList in = inputs_of(j);
        set_outputs(j, rec_->record(j, in, [&] { return run_node(g_, g_.plan.get(), arena, j, in); }));
        release_inputs(j, b, e);  // the segment's own temporaries (outside values stay for a rerun)
      } catch (const DeviceError& ex) {  // CUDA refused what the node queued: leave the node out
        why = ex.what();
        at = j;
      } catch (...) {  // the node's own error (bad input): not the capture's; end it and pass it on
        std::string ignored;
        rec_->destroy(rec_->end(&ignored));
        throw;
      }
    }
    std::string refused;
    void* handle = begun ? rec_->end(&refused) : nullptr;
    if (handle && at == e) {
      Segment s{b, e, handle, {}};
      for (size_t j = b; j < e; ++j)
        for (int o : g_.nodes[j].outputs)
          if (env[size_t(o)].defined()) s.results.push_back(o), held_[size_t(o)] = env[size_t(o)];
      made.push_back(std::move(s));
      rec_->launch(handle);  // the capture recorded the kernels; this runs them
      ++stats_.launches;
      for (size_t j = b; j < e; ++j) release_inputs(j, 0, 0);
      i = e;
      continue;
    }
    // Refused: this call runs the segment op by op; later calls capture without the failing node.
    rec_->destroy(handle);
    ++failed;
    ++stats_.failed_captures;
    if (at < e) excluded_[at] = true;
    else
      for (size_t j = b; j < e; ++j) excluded_[j] = true;
    spdlog::info("jit: capture of nodes {}..{} refused{}: {}; {} op by op", b, e - 1,
                 at < e ? " at node " + std::to_string(at) + " (" + g_.nodes[at].op->name() + ")" : std::string(),
                 why.empty() ? refused : why, at < e ? "that node runs" : "they run");
    for (size_t j = b; j < e; ++j)
      for (int o : g_.nodes[j].outputs) env[size_t(o)] = Tensor();
    for (size_t j = b; j < e; ++j) eager(j);
    i = e;
  }
  TensorList res;
  for (int o : g_.outputs) res.push_back(env[size_t(o)]);
  g_.write_updates(env);
  unwind.armed = false;
  segments_ = std::move(made);
  if (failed) {
    drop_captures();  // captures again next call, without the refused nodes
    return res;
  }
  stats_.segments = int(segments_.size());
  stats_.captured_nodes = 0;
  for (const Segment& s : segments_) stats_.captured_nodes += int(s.end - s.begin);
  stats_.eager_nodes = int(N) - stats_.captured_nodes;
  if (logging())
    spdlog::info("jit: captured {} segment(s) of {} nodes; {} nodes run op by op between them", stats_.segments,
                 stats_.captured_nodes, stats_.eager_nodes);
  for (size_t k = 0; k < res.size(); ++k)  // a later launch overwrites held values: hand out copies
    if (held_[size_t(g_.outputs[k])].defined()) res[k] = res[k].clone();
  return res;
}

TensorList CapturedReplay::launch(const TensorList& args) {
  std::vector<Tensor> env = g_.environment(args);
  NoGradGuard ng;
  for (size_t k = 0; k < g_.inputs.size(); ++k)
    if (static_in_[k].defined()) {
      copy_(static_in_[k], args[k]);
      env[size_t(g_.inputs[k])] = static_in_[k];
    }
  const std::shared_ptr<Storage> arena = g_.plan ? make_arena(g_, *g_.plan) : nullptr;
  const size_t N = g_.nodes.size();
  size_t next = 0;
  for (size_t i = 0; i < N;) {
    if (next < segments_.size() && segments_[next].begin == i) {
      const Segment& s = segments_[next++];
      rec_->launch(s.handle);
      ++stats_.launches;
      for (int v : s.results) env[size_t(v)] = held_[size_t(v)];
      for (size_t j = s.begin; j < s.end; ++j) release_last_uses(j, env);
      i = s.end;
      continue;
    }
    // An op-by-op node writes a value the segments read straight into the buffer they read it from
    // (run_node's `into`); an op with its own forward allocates, and its result is copied there.
    const Node& n = g_.nodes[i];
    const TensorList out = run_node(g_, g_.plan.get(), arena, i, node_inputs(i, env), &held_);
    for (size_t k = 0; k < n.outputs.size(); ++k) {
      const int v = n.outputs[k];
      Tensor& h = held_[size_t(v)];
      if (h.defined() && !same_memory(h, out[k])) copy_(h, out[k]);
      env[size_t(v)] = h.defined() ? h : out[k];
    }
    release_last_uses(i, env);
    ++i;
  }
  TensorList res;
  for (int o : g_.outputs) res.push_back(held_[size_t(o)].defined() ? env[size_t(o)].clone() : env[size_t(o)]);
  g_.write_updates(env);
  return res;
}

std::unique_ptr<CapturedReplay> make_cuda_graph_replay(const Graph& g) {
  if (!cuda_rt::built_with_cuda() || !cuda_graphs_enabled()) return nullptr;
  const Device d = device_of(g);
  if (!d.is_cuda() || d.index >= cuda_rt::device_count()) return nullptr;
  NodeFilter capturable = [&g, d](size_t j) { return capturable_node(g, g.nodes[j], d); };
  if (capture_segments(g, capturable).empty()) return nullptr;
  return std::make_unique<CapturedReplay>(g, std::make_unique<CudaRecorder>(d.index), std::move(capturable));
}

}  // namespace titanax::jit
