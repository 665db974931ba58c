// The NCCL backend of Communicator, and the choice between it and the MPI backend for a group of ranks.
// <nccl.h> stays inside parallel/cuda_nccl_communicator.cpp (CUDA builds with NCCL); builds without CUDA
// or without NCCL link parallel/no_nccl.cpp instead, whose factory never creates one.
//
// Choosing (make_device_communicator, called by the Runtime for the world and by split() for each mesh
// axis): the ranks of the group all-gather (TITANAX_COMM, device identity); NCCL serves the group when
// every rank computes on its own GPU and the build has NCCL, else the MPI backend does (device tensors
// staged through host memory). Two ranks on one GPU is the case NCCL refuses (ncclInvalidUsage): the
// group's rank 0 logs which ranks share which GPU, once per group. TITANAX_COMM in the environment:
//   unset, "" or "auto"  NCCL where it can serve, else MPI (the default);
//   "mpi"                always MPI (host staging);
//   "nccl"               NCCL or a CollectiveError on every rank saying why it cannot serve.
// Ranks that disagree on TITANAX_COMM get a CollectiveError on every rank. Without mpirun the Runtime
// uses the local backend (one rank, nothing to communicate) and TITANAX_COMM is not consulted.
//
// Behaviour of the NCCL communicator (see parallel/communicator.h for each collective's semantics):
//   * It wraps an MPI communicator of the same group, which serves host tensors, all_gather_string,
//     barrier and split()'s bookkeeping, and broadcasts the ncclUniqueId. CUDA tensors on the group's
//     device go through NCCL; CUDA tensors on another device are staged through host memory (MPI).
//   * NCCL work is queued on the tensor device's current stream (cuda_rt::current_stream), in stream
//     order with the kernels that produce and consume the tensors: a blocking call returns once the
//     work is queued (host reads of the result, Tensor::to(cpu), wait for it). Non-contiguous tensors
//     are staged through a contiguous device copy.
//   * Dtypes: reductions in f32, f64, i32, i64, u8, f16 and bf16 (natively: f16 / bf16 sums round in
//     16 bits, where the MPI backend reduces them in f32); the other collectives move bytes (any dtype).
//   * Requests (iall_reduce, isend, irecv): a CUDA event recorded after the NCCL call; wait() waits for
//     it (polling ncclCommGetAsyncError, so a failed peer raises CollectiveError instead of hanging).
//   * The cross-rank signature check of the MPI backend runs before every collective (mpi::verify_call,
//     one small MPI_Allreduce; TITANAX_CHECK_COLLECTIVES=0 turns it off). The NCCL path signs its calls
//     differently from the host path, so a rank with a CPU tensor meeting one with a GPU tensor is an
//     error on both, not a hang.
//   * Point-to-point: NCCL has no tags and no message-size check. A send matches the peer's receive by
//     issue order between each pair of ranks (tags are range-checked only), a size mismatch is undefined,
//     and a receive blocks its stream until its send arrives: post sends and receives in an order the
//     peer matches (sendrecv pairs its send and receive in one NCCL group, so exchanges cannot deadlock).
//   * Every NCCL call goes through a check that throws CollectiveError naming the call, the file:line,
//     ncclGetErrorString and ncclGetLastError.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/device.h"
#include "parallel/communicator.h"

namespace titanax {

/// Which backend should serve a group, and why (one sentence, for logs and errors).
struct CollectiveBackendChoice {
  std::string backend;  ///< "nccl" or "mpi"
  std::string reason;
  /// Group ranks that share one GPU, one list per shared GPU (empty unless that is the reason).
  std::vector<std::vector<int>> shared;
};

/// Decides from every rank's device identity (device_identity(): "GPU-<uuid>@<host>" or "cpu@<host>"),
/// in group rank order. Pure; compiled in every build. "mpi" when a rank computes on the CPU (an
/// identity starting with "cpu") or two ranks have the same identity (they share a GPU, which NCCL
/// refuses; `shared` lists them), "nccl" otherwise. An empty list gives "mpi".
CollectiveBackendChoice choose_collective_backend(const std::vector<std::string>& device_ids_per_rank);

/// True when this build can create NCCL communicators (CUDA build, NCCL found at configure time).
bool nccl_built();

/// "auto", "mpi" or "nccl" from TITANAX_COMM (unset or "" = "auto"); ValueError for anything else.
std::string requested_collective_backend();

/// "GPU-<uuid>@<host>" for a CUDA device (UUID from cudaGetDeviceProperties), "cpu@<host>" for the CPU
/// (<host> from gethostname). Builds without NCCL write "cuda:<index>@<host>" for a CUDA device. Throws
/// DeviceError when CUDA cannot describe the device.
std::string device_identity(Device device);

/// The communicator for the group of `mpi_group` (an MPI communicator) whose ranks compute on `device`:
/// the NCCL backend where it can serve (see the top of this header), else an MPI-backed one. Collective
/// over the group. With a CUDA device its split() decides again for each sub-group (so a mesh axis whose
/// ranks have their own GPUs gets NCCL even when another axis's ranks share one). Throws CollectiveError
/// when TITANAX_COMM=nccl and NCCL cannot serve (naming why), when the ranks disagree on TITANAX_COMM,
/// or when an NCCL or MPI call fails; ValueError for a bad TITANAX_COMM.
std::shared_ptr<Communicator> make_device_communicator(std::shared_ptr<Communicator> mpi_group, Device device);

namespace detail {

/// A communicator that forwards every call to an MPI communicator of the same group and whose split()
/// calls make_device_communicator for the sub-group (the fallback when NCCL cannot serve a group of GPU
/// ranks, and the base of the NCCL communicator, which overrides the CUDA-tensor paths).
class MpiGroupCommunicator : public Communicator {
 public:
  MpiGroupCommunicator(std::shared_ptr<Communicator> mpi, Device device) : mpi_(std::move(mpi)), device_(device) {}
  int rank() const override { return mpi_->rank(); }
  int size() const override { return mpi_->size(); }
  std::string backend() const override { return "mpi"; }
  void all_reduce(Tensor& t, CollectiveOp op) override { mpi_->all_reduce(t, op); }
  std::unique_ptr<CollectiveRequest> iall_reduce(Tensor& t, CollectiveOp op) override { return mpi_->iall_reduce(t, op); }
  void broadcast(Tensor& t, int root) override { mpi_->broadcast(t, root); }
  Tensor all_gather(const Tensor& t) override { return mpi_->all_gather(t); }
  Tensor reduce_scatter(const Tensor& t, CollectiveOp op) override { return mpi_->reduce_scatter(t, op); }
  std::unique_ptr<CollectiveRequest> ireduce_scatter(const Tensor& t, Tensor& out, CollectiveOp op) override {
    return mpi_->ireduce_scatter(t, out, op);
  }
  Tensor all_to_all(const Tensor& t) override { return mpi_->all_to_all(t); }
  Tensor sendrecv(const Tensor& t, int dst, int src) override { return mpi_->sendrecv(t, dst, src); }
  void send(const Tensor& t, int dst, int tag) override { mpi_->send(t, dst, tag); }
  void recv(Tensor& t, int src, int tag) override { mpi_->recv(t, src, tag); }
  std::unique_ptr<CollectiveRequest> isend(const Tensor& t, int dst, int tag) override { return mpi_->isend(t, dst, tag); }
  std::unique_ptr<CollectiveRequest> irecv(Tensor& t, int src, int tag) override { return mpi_->irecv(t, src, tag); }
  void barrier() override { mpi_->barrier(); }
  std::vector<std::string> all_gather_string(const std::string& s) override { return mpi_->all_gather_string(s); }
  std::shared_ptr<Communicator> split(int color, int key) override {
    return make_device_communicator(mpi_->split(color, key), device_);
  }

 protected:
  std::shared_ptr<Communicator> mpi_;
  Device device_;
};

/// "GPU-<uuid>" of CUDA device `device` (cudaGetDeviceProperties; the nvidia-smi spelling). Builds without
/// NCCL, where the identity decides nothing, return "cuda:<device>" without asking CUDA.
std::string gpu_identity(int device);

/// The NCCL communicator over `mpi_group` on CUDA device `device` (collective over the group: rank 0's
/// ncclGetUniqueId broadcast over MPI, then ncclCommInitRank, whose outcome the ranks agree on over
/// MPI). Returns nullptr on every rank, with the reason in *why_not, when init returned
/// ncclInvalidUsage on some rank (and no rank failed otherwise); throws CollectiveError on every rank for
/// any other failure. parallel/no_nccl.cpp's version always returns nullptr ("built without NCCL").
std::shared_ptr<Communicator> make_nccl_communicator(std::shared_ptr<Communicator> mpi_group, int device,
                                                     std::string* why_not);

}  // namespace detail
}  // namespace titanax
