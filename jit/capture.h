// Replay of a compiled graph through captured CUDA graphs (the CUDA Programming Guide, "CUDA Graphs",
// stream capture; PyTorch's torch.cuda.graph for the memory rules). A training step of small kernels is
// bound by the host: each launch costs microseconds of CPU time. A captured CUDA graph replays a whole
// run of kernels with one launch.
//
//   jit::Compiled step = jit::jit(fn);   // on CUDA tensors, replays go through make_cuda_graph_replay
//   step(args);                          // 1st call: trace (eager)
//   step(args);                          // 2nd: op by op on the replay's own stream (warm-up: kernel loads)
//   step(args);                          // 3rd: captures each segment into a CUDA graph and launches it
//   step(args);                          // later: one cudaGraphLaunch per segment
//
// Segments: maximal runs of consecutive nodes that can be captured (capturable_node): every input and
// output on the device, no host-scalar input (Op::host_input), Op::capturable() (not an op that reads
// indices on the host, runs sub-graphs or communicates). The others (the optimizer's learning-rate,
// step-count and update-scalar ops, which compute on the host; the embedding's host index check) run op
// by op between the segments' launches, in node order, on the same stream.
//
// Memory: a captured kernel reads and writes the addresses it had when it was captured, so
//  * the graph inputs the segments read are copied into buffers of the replay (one device copy each);
//  * values crossing a segment's boundary are held by the replay: a segment's results stay at their
//    captured address and are read from there (graph outputs are returned as copies, as a later launch
//    overwrites them); an op-by-op node's result that a segment reads is written into a buffer of the
//    replay at each call (copied there when the op allocates its own outputs);
//  * allocations while capturing come from a pool of this replay (cuda_rt::begin_capture), never handed
//    to allocations outside its captures, so no other tensor can be placed where a segment writes;
//  * parameters, optimizer state and constants are read and written where they are, as in any replay.
//    When one of them moved since the capture (Module::to gives a parameter new memory), the replay
//    drops its captures and captures again.
// Everything is queued on the replay's stream, which synchronises with the legacy default stream.
//
// When a capture fails (an op synchronised or queued something a graph cannot hold: a DeviceError while
// recording, or a graph CUDA cannot instantiate), the segment's nodes run op by op for that call, the
// node that failed (or the whole segment) is no longer captured, and the next call captures again
// without it: a failed capture costs time, never a result. Any other error a node throws while being
// recorded is its own (bad input): the capture is dropped and the error passes to the caller.
// TITANAX_CUDA_GRAPHS=0 in the environment (or JitOptions::cuda_graphs = false) replays op by op.
//
// CapturedReplay holds the bookkeeping and does not depend on CUDA: a SegmentRecorder records and
// launches the segments. make_cuda_graph_replay gives it the CUDA recorder (stream capture); the unit
// tests give it a recorder that emulates capture on the CPU (outputs unwritten until launched), so the
// bookkeeping is tested on every machine.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "jit/graph.h"

namespace titanax::jit {

/// What a CapturedReplay did so far.
struct CaptureStats {
  int segments = 0;         ///< captured segments (each one launch per replay)
  int captured_nodes = 0;   ///< nodes inside them
  int eager_nodes = 0;      ///< nodes run op by op between them
  int failed_captures = 0;  ///< captures refused (their nodes then run op by op)
  int recaptures = 0;       ///< captures dropped because a tensor they read had moved
  int64_t launches = 0;     ///< segment launches, the captures' own included
};

/// Whether TITANAX_CUDA_GRAPHS is not "0".
bool cuda_graphs_enabled();

/// Whether node n of g can be captured into a CUDA graph on device d (see the header comment).
bool capturable_node(const Graph& g, const Node& n, Device d);

/// Node index -> whether the node may be captured.
using NodeFilter = std::function<bool(size_t node)>;

/// The segments [begin, end) of g's nodes a replay captures: maximal runs of nodes `capturable` accepts
/// holding at least one node with device work (a run of views alone, Op::custom_forward, is left op
/// by op).
std::vector<std::pair<size_t, size_t>> capture_segments(const Graph& g, const NodeFilter& capturable);

/// Records runs of nodes and launches them again (CapturedReplay's device side).
class SegmentRecorder {
 public:
  virtual ~SegmentRecorder() = default;
  /// Called at the start of every CapturedReplay::run (e.g. makes the replay's stream current); what
  /// it returns is released at the end of that run (undoing it).
  virtual std::shared_ptr<void> enter() { return nullptr; }
  /// Starts recording. Throws on failure.
  virtual void begin() = 0;
  /// Runs node `node` while recording (run computes its outputs from `in`); returns its outputs. What
  /// run queues is recorded, not necessarily done: the outputs hold their values only once the segment
  /// is launched. Throws what run throws, or when the node cannot be recorded.
  virtual TensorList record(size_t node, const TensorList& in, const std::function<TensorList()>& run) = 0;
  /// Ends recording: a handle of the recorded segment, or nullptr (with the reason in *why) when it
  /// cannot be replayed. Never throws.
  virtual void* end(std::string* why) noexcept = 0;
  /// Queues the recorded segment once. Throws on failure.
  virtual void launch(void* segment) = 0;
  /// Releases a segment (nullptr: no-op). Never throws.
  virtual void destroy(void* segment) noexcept = 0;
  /// Waits until no launch is in flight. Never throws.
  virtual void synchronize() noexcept {}
};

/// Replays one graph with its capturable runs of nodes recorded once and launched as one unit each
/// (see the header comment). Holds a reference to the graph, which must outlive it and not change.
class CapturedReplay {
 public:
  /// `capturable` says which nodes may be recorded. Throws ValueError for a null recorder.
  CapturedReplay(const Graph& g, std::unique_ptr<SegmentRecorder> recorder, NodeFilter capturable);
  ~CapturedReplay();
  CapturedReplay(const CapturedReplay&) = delete;
  CapturedReplay& operator=(const CapturedReplay&) = delete;

  /// The same results and effects as g.run(args) (the same kernels on the same inputs: bitwise): the
  /// first call runs g.run (warm-up), the second captures the segments and launches them, later calls
  /// launch them. Throws what Graph::run throws for bad inputs and what the op-by-op nodes throw.
  TensorList run(const TensorList& args);
  const CaptureStats& stats() const { return stats_; }

 private:
  struct Segment {
    size_t begin = 0, end = 0;
    void* handle = nullptr;
    std::vector<int> results;  // values made inside and read after it (held at their captured address)
  };
  TensorList capture(const TensorList& args);
  TensorList launch(const TensorList& args);
  bool moved() const;
  void drop_captures() noexcept;
  // Node j's inputs from env (per value id).
  TensorList node_inputs(size_t j, const std::vector<Tensor>& env) const;
  // Drops from env the node outputs node j reads for the last time; with b < e only those made by
  // nodes in [b, e).
  void release_last_uses(size_t j, std::vector<Tensor>& env, size_t b = 0, size_t e = 0) const;

  const Graph& g_;
  std::unique_ptr<SegmentRecorder> rec_;
  NodeFilter capturable_;
  int64_t calls_ = 0;
  std::vector<bool> excluded_;     // per node: its capture failed once
  std::vector<Segment> segments_;  // captured, in node order; empty until captured
  std::vector<Tensor> held_;       // per value id: the buffer segments read or write it at (crossing values)
  std::vector<Tensor> static_in_;  // per graph input: the buffer the segments read (undefined: none reads it)
  std::vector<std::pair<int, const void*>> addresses_;  // state / constant values segments use, at capture
  std::vector<int> last_;          // Graph::last_uses()
  CaptureStats stats_;
};

/// A CapturedReplay of g through CUDA graphs on the device of g's first capturable node, or nullptr when
/// g does not qualify: a build without CUDA, TITANAX_CUDA_GRAPHS=0, no GPU, or no capture segment.
/// Throws DeviceError when the replay's stream cannot be made.
std::unique_ptr<CapturedReplay> make_cuda_graph_replay(const Graph& g);

}  // namespace titanax::jit
