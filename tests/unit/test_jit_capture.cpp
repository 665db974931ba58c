// jit/capture.h's CapturedReplay, the bookkeeping of the JIT's CUDA-graph replay, on the CPU: an
// emulated capture (EmulatedCapture below) stands in for CUDA stream capture with its semantics, so the
// replay of whole training steps through recorded segments is checked bitwise against Graph::run on
// every machine, including captures that fail and tensors that move under a capture. (On a GPU,
// tests/cuda/test_cuda_jit.cpp runs the same replay through real CUDA graphs.)
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <set>

#include <titanax/titanax.h>

#include "jit/capture.h"
#include "jit/fusion.h"
#include "jit/graph.h"
#include "jit/memory_plan.h"
#include "jit_test_util.h"

using namespace titanax;

namespace {

// CUDA stream capture's semantics on the CPU. While recording, a node's work is recorded, not done: its
// outputs hold garbage (NaN; -777 for integers) and the state it writes in place keeps its value. A
// launch redoes each recorded node on the recorded input buffers and writes the recorded output buffers:
// the addresses a CUDA graph holds. So a replay that reads a value before launching its segment, feeds
// a segment from a buffer it does not refill, or hands out a buffer a later launch overwrites, gets
// wrong numbers here as it would on a GPU.
class EmulatedCapture final : public jit::SegmentRecorder {
 public:
  explicit EmulatedCapture(const jit::Graph& g) : g_(g) {}
  std::set<size_t> throw_at;     // record() throws at these nodes (an op that cannot be captured)
  std::set<size_t> refuse_with;  // end() refuses a segment holding one of these (instantiation fails)
  int begun = 0, launches = 0, live = 0;

  void begin() override {
    REQUIRE(!recording_);
    recording_ = true;
    cur_.clear();
    ++begun;
  }
  TensorList record(size_t node, const TensorList& in, const std::function<TensorList()>& run) override {
    REQUIRE(recording_);
    if (throw_at.count(node)) throw DeviceError("emulated capture: not capturable", "a capturable op", "node " + std::to_string(node));
    std::vector<std::pair<Tensor, Tensor>> saved;  // state written in place, as it was
    for (int j : g_.nodes[node].in_place)
      if (j >= 0) saved.push_back({in[size_t(j)], in[size_t(j)].clone()});
    TensorList out = run();
    for (auto& [t, before] : saved) copy_(t, before);
    for (Tensor o : out) {
      bool aliases = false;  // views and in-place outputs: the input's own memory, nothing to poison
      for (const Tensor& i : in) aliases = aliases || (i.defined() && i.storage() == o.storage());
      if (!aliases) fill_(o, is_floating(o.dtype()) ? std::numeric_limits<double>::quiet_NaN() : -777.0);
    }
    cur_.push_back({node, in, out});
    return out;
  }
  void* end(std::string* why) noexcept override {
    recording_ = false;
    for (const Step& s : cur_)
      if (refuse_with.count(s.node)) {
        *why = "emulated: the graph cannot be instantiated";
        return nullptr;
      }
    ++live;
    return new std::vector<Step>(std::move(cur_));
  }
  void launch(void* segment) override {
    REQUIRE(!recording_);
    ++launches;
    for (Step& s : *static_cast<std::vector<Step>*>(segment)) {
      const TensorList r = jit::run_node(g_, nullptr, nullptr, s.node, s.in);
      for (size_t k = 0; k < r.size(); ++k)
        if (!jit::same_memory(r[k], s.out[k])) copy_(s.out[k], r[k]);
    }
  }
  void destroy(void* segment) noexcept override {
    if (!segment) return;
    delete static_cast<std::vector<Step>*>(segment);
    --live;
  }

 private:
  struct Step {
    size_t node;
    TensorList in, out;
  };
  const jit::Graph& g_;
  bool recording_ = false;
  std::vector<Step> cur_;
};

// The rule make_cuda_graph_replay applies on a GPU, less the device check (everything is on the CPU
// here): Op::capturable() and no host-scalar input.
jit::NodeFilter like_cuda(const jit::Graph& g) {
  return [&g](size_t j) {
    const jit::Node& n = g.nodes[j];
    if (!n.op->capturable()) return false;
    for (size_t i = 0; i < n.inputs.size(); ++i)
      if (n.op->host_input(i)) return false;
    return true;
  };
}

TensorList batch(uint64_t s) {
  const RngKey k = RngKey::from_seed(500 + s);
  Tensor x = random_normal(k, Shape{8, 6});
  Tensor y = (random_uniform(fold_in(k, 1), Shape{8}, DType::f64) * 3.0).astype(DType::i64);
  return {x, y};
}

// An MLP training step (forward, cross-entropy, backward, clipping, AdamW with a schedule) traced and
// compiled as jit() does; each instance has its own model (same initial weights) and optimizer.
struct Step {
  nn::MLP model{{6, 16, 16, 3}};
  std::unique_ptr<optim::Optimizer> opt = optim::adamw(optim::warmup_cosine(1e-2, 3, 20));
  ParamTree params;
  jit::Graph g;
  Step() {
    model.init_parameters(11);
    params = model.parameters();
    g = jit::trace(
        [this](const TensorList& in) {
          auto [loss, grads] = value_and_grad([&] { return cross_entropy(model.forward(in[0]), in[1]); }, params);
          Tensor norm = optim::clip_grad_norm_tensor(grads, 0.5);
          opt->step(params, grads);
          return TensorList{loss, norm};
        },
        batch(0));
    jit::optimize(g);
    if (jit::fuse(g) > 0) jit::optimize(g);
    jit::update_in_place(g);
  }
};

bool bitwise_equal(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.to_vector<double>() == b.to_vector<double>();
}

// Runs `calls` steps through `replay` (on s.g) and the same steps through Graph::run on a twin; checks
// every output bitwise at every call, that outputs handed out earlier keep their values, and the weights
// and step count at the end.
void check_against_graph_run(Step& s, jit::CapturedReplay& replay, int calls, const std::function<void(int)>& before = {}) {
  Step twin;
  std::vector<TensorList> got, want;
  for (int c = 1; c <= calls; ++c) {
    if (before) before(c);
    got.push_back(replay.run(batch(uint64_t(c))));
    want.push_back(twin.g.run(batch(uint64_t(c))));
    INFO("call " << c);
    REQUIRE(got.back().size() == 2);
    REQUIRE(std::isfinite(got.back()[0].item()));
    CHECK(got.back()[0].item() == want.back()[0].item());
    CHECK(got.back()[1].item() == want.back()[1].item());
  }
  for (size_t c = 0; c < got.size(); ++c) {  // no output was overwritten by a later launch
    INFO("outputs of call " << c + 1 << " read at the end");
    CHECK(bitwise_equal(got[c][0], want[c][0]));
    CHECK(bitwise_equal(got[c][1], want[c][1]));
  }
  CHECK(s.opt->steps() == twin.opt->steps());
  for (size_t i = 0; i < s.params.size(); ++i) {
    INFO(s.params[i].first);
    CHECK(bitwise_equal(s.params[i].second, twin.params[i].second));
  }
}

}  // namespace

TEST_CASE("captured replay: segments are maximal runs of capturable nodes with device work", "[jit][capture]") {
  Step s;
  const auto segs = jit::capture_segments(s.g, like_cuda(s.g));
  REQUIRE(segs.size() >= 2);  // the update scalars (host values) split it
  // The optimizer's updates read their step's scalars from memory on their device: capturable.
  int updates = 0;
  for (size_t j = 0; j < s.g.nodes.size(); ++j)
    if (std::string(s.g.nodes[j].op->name()) == "adamw_update") {
      ++updates;
      CHECK(like_cuda(s.g)(j));
    }
  CHECK(updates == 1);  // one multi-tensor update for the parameters' group
  for (size_t k = 0; k < segs.size(); ++k) {
    const auto [b, e] = segs[k];
    REQUIRE(b < e);
    for (size_t j = b; j < e; ++j) CHECK(like_cuda(s.g)(j));
    if (b > 0) CHECK_FALSE(like_cuda(s.g)(b - 1));  // maximal: the neighbours are not capturable
    if (e < s.g.nodes.size()) CHECK_FALSE(like_cuda(s.g)(e));
  }
  // Views alone do no device work: no segment.
  const auto views_only = jit::capture_segments(s.g, [&](size_t j) { return s.g.nodes[j].op->custom_forward(); });
  CHECK(views_only.empty());
  CHECK(jit::capture_segments(s.g, [](size_t) { return false; }).empty());
  const auto all = jit::capture_segments(s.g, [](size_t) { return true; });
  REQUIRE(all.size() == 1);
  CHECK(all[0] == std::make_pair(size_t(0), s.g.nodes.size()));
}

TEST_CASE("captured replay of a training step equals Graph::run bitwise, call after call", "[jit][capture]") {
  Step s;
  SECTION("segments as on a GPU: the host-scalar ops op by op") {
    auto rec = std::make_unique<EmulatedCapture>(s.g);
    EmulatedCapture& emu = *rec;
    jit::CapturedReplay replay(s.g, std::move(rec), like_cuda(s.g));
    check_against_graph_run(s, replay, 7);
    const auto& st = replay.stats();
    CHECK(st.segments == int(jit::capture_segments(s.g, like_cuda(s.g)).size()));
    CHECK(st.captured_nodes > 0);
    CHECK(st.eager_nodes > 0);
    CHECK(st.captured_nodes + st.eager_nodes == int(s.g.nodes.size()));
    CHECK(st.failed_captures == 0);
    CHECK(emu.begun == st.segments);                  // captured once (call 2), launched since
    CHECK(st.launches == int64_t(st.segments) * 6);   // calls 2..7
    CHECK(emu.launches == st.launches);
    CHECK(emu.live == st.segments);
  }
  SECTION("everything but cross-entropy captured: updates written in place inside segments") {
    jit::NodeFilter filter = [&](size_t j) { return std::string(s.g.nodes[j].op->name()).rfind("cross_entropy", 0) != 0; };
    int in_place = 0;
    for (const auto& [b, e] : jit::capture_segments(s.g, filter))
      for (size_t j = b; j < e; ++j) in_place += !s.g.nodes[j].in_place.empty();
    CHECK(in_place == 2);  // the AdamW update (every parameter and its moments) and the step count
    jit::CapturedReplay replay(s.g, std::make_unique<EmulatedCapture>(s.g), filter);
    check_against_graph_run(s, replay, 6);
    CHECK(replay.stats().failed_captures == 0);
  }
}

TEST_CASE("captured replay: a refused capture costs a call op by op, never a result", "[jit][capture]") {
  Step s;
  const auto segs = jit::capture_segments(s.g, like_cuda(s.g));
  REQUIRE(segs.size() >= 2);
  auto rec = std::make_unique<EmulatedCapture>(s.g);
  EmulatedCapture& emu = *rec;
  const size_t thrower = (segs[0].first + segs[0].second) / 2;  // an op fails mid-capture
  const size_t refused = segs[1].first;                        // a segment cannot be instantiated
  emu.throw_at = {thrower};
  emu.refuse_with = {refused};
  jit::CapturedReplay replay(s.g, std::move(rec), like_cuda(s.g));
  check_against_graph_run(s, replay, 6);
  const auto& st = replay.stats();
  CHECK(st.failed_captures == 2);  // both found on the first capture; the next one leaves them out
  CHECK(emu.live == st.segments);  // the refused captures were released
  CHECK(st.segments > 0);
  // The thrower runs op by op; the refused segment's nodes too: fewer nodes captured than could be.
  int capturable = 0;
  for (const auto& [b, e] : segs) capturable += int(e - b);
  CHECK(st.captured_nodes < capturable - int(segs[1].second - segs[1].first));
}

TEST_CASE("captured replay: state that moved under a capture is captured again", "[jit][capture]") {
  Step s;
  auto rec = std::make_unique<EmulatedCapture>(s.g);
  EmulatedCapture& emu = *rec;
  jit::CapturedReplay replay(s.g, std::move(rec), like_cuda(s.g));
  // Before call 5, the first weight gets new memory with the same values (as Module::to does).
  check_against_graph_run(s, replay, 7, [&](int c) {
    if (c != 5) return;
    Tensor& w = s.params[0].second;
    const Tensor fresh = w.detach().clone();
    w.get()->storage = fresh.storage();
  });
  CHECK(replay.stats().recaptures == 1);
  CHECK(emu.begun == 2 * replay.stats().segments);
}

TEST_CASE("captured replay: a node that throws its own error while captured leaves no segment behind", "[jit][capture]") {
  Step s, twin;
  auto rec = std::make_unique<EmulatedCapture>(s.g);
  EmulatedCapture& emu = *rec;
  jit::CapturedReplay replay(s.g, std::move(rec), like_cuda(s.g));
  auto check_call = [&](const TensorList& args) {
    const TensorList got = replay.run(args), want = twin.g.run(args);
    CHECK(got[0].item() == want[0].item());
    CHECK(got[1].item() == want[1].item());
  };
  check_call(batch(1));  // warm-up
  // A label out of range: cross-entropy throws (on the CPU at once) while its segment is being recorded,
  // as Graph::run throws; that is the node's error, not a refused capture: nothing is left out, and
  // what the call captured is released.
  TensorList bad = batch(2);
  bad[1] = from_vector(std::vector<int64_t>{0, 1, 2, 7, 0, 1, 2, 0}, Shape{8});
  CHECK_THROWS_AS(replay.run(bad), ValueError);
  CHECK_THROWS_AS(twin.g.run(bad), ValueError);
  CHECK(emu.begun >= 1);
  CHECK(emu.live == 0);
  CHECK(replay.stats().segments == 0);
  CHECK(replay.stats().failed_captures == 0);
  for (uint64_t c = 3; c < 7; ++c) check_call(batch(c));  // captures again, then launches
  CHECK(replay.stats().segments > 0);
  CHECK(emu.live == replay.stats().segments);
  for (size_t i = 0; i < s.params.size(); ++i) CHECK(bitwise_equal(s.params[i].second, twin.params[i].second));
}
