// The one-rank communicator: every collective is the identity (or a copy), so code written for a mesh runs
// unchanged without mpirun. Argument checks match the MPI backend's, so misuse shows up on one process too.
#include <deque>
#include <map>

#include "parallel/comm_detail.h"
#include "parallel/communicator.h"

namespace titanax {
namespace {

using detail::check_axis0_divides;
using detail::check_defined;
using detail::check_reducible;
using detail::tensor_sig;

class DoneRequest final : public CollectiveRequest {
 public:
  void wait() override {}
  bool test() override { return true; }
};

/// A fresh tensor with t's values, dtype and device, laid out row-major with `shape` (same numel).
Tensor copy_as(const Tensor& t, const Shape& shape) {
  Tensor out = empty(shape, t.dtype(), t.device());
  Tensor view = make_view(out, t.shape(), t.shape().contiguous_strides(), 0);
  copy_(view, t);
  return out;
}

void check_peer(int peer, bool allow_none, const char* what, const char* role) {
  if (peer == 0 || (allow_none && peer == -1)) return;
  throw CollectiveError(std::string(what) + ": " + role + " rank out of range", allow_none ? "0 or -1 (none) in a group of 1 rank" : "0 in a group of 1 rank",
                        std::to_string(peer), "this communicator has one rank (run under mpirun for more)");
}

class LocalCommunicator;

/// irecv on one rank: the message must have been sent before wait() (else it would block forever).
struct DeferredRecv final : CollectiveRequest {
  DeferredRecv(LocalCommunicator& c, Tensor t, int tag) : comm(c), t(std::move(t)), tag(tag) {}
  void wait() override;
  LocalCommunicator& comm;
  Tensor t;
  int tag;
  bool done = false;
};

class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string backend() const override { return "local"; }

  void all_reduce(Tensor& t, CollectiveOp) override { check_reducible(t, "all_reduce"); }

  std::unique_ptr<CollectiveRequest> iall_reduce(Tensor& t, CollectiveOp) override {
    check_reducible(t, "iall_reduce");
    return std::make_unique<DoneRequest>();
  }

  void broadcast(Tensor& t, int root) override {
    check_defined(t, "broadcast");
    if (root != 0)
      throw CollectiveError("broadcast: root rank out of range", "0 in a group of 1 rank", std::to_string(root));
  }

  Tensor all_gather(const Tensor& t) override {
    check_defined(t, "all_gather");
    return copy_as(t, t.dim() == 0 ? Shape{1} : t.shape());
  }

  Tensor reduce_scatter(const Tensor& t, CollectiveOp) override {
    check_reducible(t, "reduce_scatter");
    check_axis0_divides(t, 1, "reduce_scatter");
    return copy_as(t, t.shape());
  }

  std::unique_ptr<CollectiveRequest> ireduce_scatter(const Tensor& t, Tensor& out, CollectiveOp) override {
    check_reducible(t, "ireduce_scatter");
    check_axis0_divides(t, 1, "ireduce_scatter");
    detail::check_scatter_out(t, out, 1, "ireduce_scatter");
    copy_(out, t);
    return std::make_unique<DoneRequest>();
  }

  Tensor all_to_all(const Tensor& t) override {
    check_axis0_divides(t, 1, "all_to_all");
    return copy_as(t, t.shape());
  }

  Tensor sendrecv(const Tensor& t, int dst, int src) override {
    check_defined(t, "sendrecv");
    check_peer(dst, true, "sendrecv", "destination");
    check_peer(src, true, "sendrecv", "source");
    if (src == -1) return zeros(t.shape(), t.dtype(), t.device());
    if (dst == -1)
      throw CollectiveError("sendrecv: receiving from rank 0 but nothing is sent to it",
                            "dst == 0 whenever src == 0 in a group of 1 rank", "dst = -1, src = 0",
                            "this would block forever under MPI");
    return copy_as(t, t.shape());
  }

  void send(const Tensor& t, int dst, int tag) override {
    check_defined(t, "send");
    check_peer(dst, false, "send", "destination");
    mailbox_[tag].push_back(copy_as(t, t.shape()));
  }

  void recv(Tensor& t, int src, int tag) override {
    check_defined(t, "recv");
    check_peer(src, false, "recv", "source");
    auto it = mailbox_.find(tag);
    if (it == mailbox_.end() || it->second.empty())
      throw CollectiveError("recv: no message from rank 0 with tag " + std::to_string(tag),
                            "a matching send() before recv() on a single rank", "nothing sent",
                            "this would block forever under MPI");
    Tensor m = it->second.front();
    if (m.dtype() != t.dtype() || m.numel() != t.numel())
      throw CollectiveError("recv: message does not match the receive tensor", tensor_sig(t), tensor_sig(m),
                            "send and receive tensors of the same dtype and size");
    it->second.pop_front();
    copy_(t, make_view(m, t.shape(), t.shape().contiguous_strides(), 0));
  }

  std::unique_ptr<CollectiveRequest> isend(const Tensor& t, int dst, int tag) override {
    send(t, dst, tag);
    return std::make_unique<DoneRequest>();
  }

  std::unique_ptr<CollectiveRequest> irecv(Tensor& t, int src, int tag) override {
    check_defined(t, "irecv");
    check_peer(src, false, "irecv", "source");
    return std::make_unique<DeferredRecv>(*this, t, tag);
  }

  void barrier() override {}
  std::vector<std::string> all_gather_string(const std::string& s) override { return {s}; }

  std::shared_ptr<Communicator> split(int color, int key) override {
    if (color < 0)
      throw CollectiveError("split with a negative color", "color >= 0", std::to_string(color));
    return std::make_shared<LocalCommunicator>();
  }

 private:
  std::map<int, std::deque<Tensor>> mailbox_;
};

void DeferredRecv::wait() {
  if (done) return;
  done = true;
  comm.recv(t, 0, tag);
}

}  // namespace

std::shared_ptr<Communicator> make_local_communicator() { return std::make_shared<LocalCommunicator>(); }

}  // namespace titanax
