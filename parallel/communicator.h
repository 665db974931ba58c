// Communicator: a group of ranks and the collectives over it. Backends: "local" (one process, no MPI),
// "mpi" (OpenMPI; device tensors are staged through host memory), later "nccl". Every method is
// collective over the group unless it says otherwise: all ranks call it in the same order with
// matching shapes and dtypes. The MPI backend checks this before each collective (one small allreduce
// of a signature; TITANAX_CHECK_COLLECTIVES=0 turns it off) and throws the same CollectiveError on every
// rank on a mismatch, instead of hanging or corrupting memory.
//
// These methods work on raw data: they are not recorded on the autodiff tape (parallel/collectives.h has
// the differentiable versions). Any layout and device is accepted: non-contiguous and CUDA tensors are
// staged through a contiguous host buffer. Common errors: ValueError for an undefined tensor,
// DTypeError for a reduction of bool, CollectiveError for a bad root / peer / tag, a size that does not
// divide, ranks that disagree, or a failed MPI call (naming the call, file:line and MPI's message).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace titanax {

enum class CollectiveOp { sum, max, min };

/// An in-flight non-blocking collective. wait() completes it (idempotent); the destructor waits too.
class CollectiveRequest {
 public:
  virtual ~CollectiveRequest() = default;
  /// Blocks until the collective has completed and its result is in the tensor. Throws CollectiveError
  /// when the underlying call failed. Idempotent.
  virtual void wait() = 0;
  /// Non-blocking: drives progress (MPI only advances a non-blocking collective inside MPI calls) and
  /// returns true once the collective has completed; wait() must still be called to finish it (copy
  /// staged data back). The default returns false ("not known to be complete").
  virtual bool test() { return false; }
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  /// "local", "mpi", "nccl".
  virtual std::string backend() const = 0;

  /// In place: every rank's t becomes the elementwise reduction over ranks (bumps t's version). Dtypes
  /// f32, f64, i32, i64, u8 (bf16 / f16 reduce through f32). Contiguous host tensors are reduced in
  /// place; others are staged and copied back.
  virtual void all_reduce(Tensor& t, CollectiveOp op = CollectiveOp::sum) = 0;
  /// Starts all_reduce without waiting; t must not be read or written until wait() (which also copies
  /// staged data back into t). The MPI backend's cross-rank check runs before it starts (blocking).
  virtual std::unique_ptr<CollectiveRequest> iall_reduce(Tensor& t, CollectiveOp op = CollectiveOp::sum) = 0;
  /// In place: every rank's t becomes root's t. CollectiveError unless 0 <= root < size().
  virtual void broadcast(Tensor& t, int root) = 0;
  /// Concatenation of every rank's t (same shape on every rank) along axis 0, in rank order:
  /// [size * t.shape[0], ...] ([size] for a 0-d t). A new tensor on t's device.
  virtual Tensor all_gather(const Tensor& t) = 0;
  /// t: [size * n, ...] on every rank; returns rank r's block [n, ...] of the elementwise reduction.
  /// Throws CollectiveError unless t.shape[0] divides by size.
  virtual Tensor reduce_scatter(const Tensor& t, CollectiveOp op = CollectiveOp::sum) = 0;
  /// Starts reduce_scatter without waiting: wait() writes rank r's block of the reduction of every rank's
  /// t into `out` ([n, ...]: t's shape with axis 0 divided by size, t's dtype and device; CollectiveError
  /// otherwise, and for t as reduce_scatter). t must not be written and out not read until wait(); the
  /// request keeps both alive. Used to overlap ZeRO's gradient reduce-scatter with backward.
  virtual std::unique_ptr<CollectiveRequest> ireduce_scatter(const Tensor& t, Tensor& out,
                                                             CollectiveOp op = CollectiveOp::sum) = 0;
  /// t: [size * n, ...]; block j goes to rank j; returns the blocks received, in source-rank order.
  virtual Tensor all_to_all(const Tensor& t) = 0;
  /// Sends t to `dst` and returns what `src` sent (same shape and dtype as t). dst / src may be -1 for
  /// none (then returns zeros resp. sends nothing). Pairs with the peers' sendrecv calls (not collective
  /// over the group). CollectiveError when the message received has a different size.
  virtual Tensor sendrecv(const Tensor& t, int dst, int src) = 0;
  /// Point-to-point (not collective): blocking send / receive into a preallocated tensor. Tags are
  /// 0 <= tag < 32001. CollectiveError when the message has a different size than t. The local backend
  /// queues sends to itself, so send-then-recv works on one rank (recv of nothing throws).
  virtual void send(const Tensor& t, int dst, int tag = 0) = 0;
  virtual void recv(Tensor& t, int src, int tag = 0) = 0;
  /// Non-blocking send / receive (MPI_Isend / MPI_Irecv; not collective): start the transfer and return
  /// at once. t must stay unmodified (isend) resp. unread (irecv) until wait(); the request keeps t's
  /// storage alive. irecv's wait() throws CollectiveError when the message has a different size than t.
  /// Tags and peers as send / recv. The local backend sends at once (to its mailbox) and receives in
  /// wait(), so isend-then-irecv works on one rank. Used by pipeline parallelism to overlap the transfer
  /// of activations and their gradients with compute.
  virtual std::unique_ptr<CollectiveRequest> isend(const Tensor& t, int dst, int tag = 0) = 0;
  virtual std::unique_ptr<CollectiveRequest> irecv(Tensor& t, int src, int tag = 0) = 0;
  virtual void barrier() = 0;
  /// Every rank's string, in rank order (for metadata, consistency checks and error messages).
  virtual std::vector<std::string> all_gather_string(const std::string& s) = 0;
  /// Sub-groups: ranks with the same color form a group, ordered by key (MPI_Comm_split semantics).
  /// Every rank must get a group: CollectiveError for a negative color.
  virtual std::shared_ptr<Communicator> split(int color, int key) = 0;
};

/// A one-rank communicator: every collective is the identity (used without mpirun and in tests).
std::shared_ptr<Communicator> make_local_communicator();

}  // namespace titanax
