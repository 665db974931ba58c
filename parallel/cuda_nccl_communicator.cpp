// NCCL backend (CUDA builds with NCCL; parallel/no_nccl.cpp otherwise): see nccl_communicator.h for the
// behaviour. The communicator wraps an MPI communicator of the same group (detail::MpiGroupCommunicator)
// and overrides the paths of CUDA tensors on its device.
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>

#include "core/cuda_runtime.h"
#include "kernels/cuda/check.h"
#include "parallel/comm_detail.h"
#include "parallel/mpi_communicator.h"
#include "parallel/nccl_communicator.h"

namespace titanax {
namespace {

using detail::tensor_sig;
using mpi::CheckedCall;

[[noreturn]] void nccl_fail(ncclResult_t r, const char* call, const char* file, int line) {
  std::string f(file);
  if (auto p = f.rfind("/parallel/"); p != std::string::npos) f = f.substr(p + 1);
  const char* last = ncclGetLastError(nullptr);  // the comm argument is unused by NCCL
  std::string found = std::string(ncclGetErrorString(r)) + " (ncclResult_t " + std::to_string(int(r)) + ")";
  if (last && *last) found += ": " + std::string(last);
  throw CollectiveError(std::string("NCCL call failed: ") + call + " at " + f + ":" + std::to_string(line),
                        "ncclSuccess", found,
                        "check that every rank reaches this collective with matching tensors and has its own GPU; "
                        "rerun with NCCL_DEBUG=WARN (or INFO) for NCCL's own log, or TITANAX_COMM=mpi to bypass NCCL");
}

#define TX_NCCL_CHECK(call)                                                   \
  do {                                                                        \
    const ncclResult_t tx_nccl_r_ = (call);                                   \
    if (tx_nccl_r_ != ncclSuccess) nccl_fail(tx_nccl_r_, #call, __FILE__, __LINE__); \
  } while (0)

/// Makes `d` the current device for the scope (the legacy default stream, and NCCL's launches, follow it).
class DeviceScope {
 public:
  explicit DeviceScope(int d) {
    TX_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != d) TX_CUDA_CHECK(cudaSetDevice(d));
    cur_ = d;
  }
  ~DeviceScope() {
    if (prev_ != cur_) cudaSetDevice(prev_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int prev_ = 0, cur_ = 0;
};

ncclDataType_t nccl_type(DType t) {
  switch (t) {
    case DType::f32: return ncclFloat32;
    case DType::f64: return ncclFloat64;
    case DType::f16: return ncclFloat16;
    case DType::bf16: return ncclBfloat16;
    case DType::i32: return ncclInt32;
    case DType::i64: return ncclInt64;
    case DType::u8: return ncclUint8;
    default:
      throw InternalError("no NCCL reduction type for " + std::string(dtype_name(t)),
                          "f32, f64, f16, bf16, i32, i64, u8", std::string(dtype_name(t)));
  }
}

ncclRedOp_t nccl_op(CollectiveOp op) {
  switch (op) {
    case CollectiveOp::sum: return ncclSum;
    case CollectiveOp::max: return ncclMax;
    case CollectiveOp::min: return ncclMin;
  }
  return ncclSum;
}

constexpr int64_t kNcclPath = 2;  // `extra` of the cross-rank signature on the NCCL path (host path: 0)
constexpr const char* kNcclNote = "on the GPU through NCCL";
constexpr int kMaxTag = 32001;    // as the MPI backend (its internal sendrecv tag)

/// A contiguous device buffer for t (t itself when already contiguous). finish() queues the copy back
/// (stream-ordered after the NCCL call) or bumps t's version when t was used directly.
struct DeviceStaged {
  Tensor orig, work;
  bool staged = false;
  DeviceStaged() = default;
  DeviceStaged(const Tensor& t, bool copy_in) : orig(t) {
    if (t.is_contiguous()) {
      work = t;
    } else {
      staged = true;
      work = empty(t.shape(), t.dtype(), t.device());
      if (copy_in) copy_(work, t);
    }
  }
  void finish() {
    if (staged) copy_(orig, work);
    else orig.storage()->bump_version();
  }
};

class NcclCommunicator;

/// An NCCL operation in flight: the event recorded after it on the stream. Keeps the tensors alive.
class NcclRequest final : public CollectiveRequest {
 public:
  NcclRequest(ncclComm_t comm, int device, cudaStream_t stream, std::vector<Tensor> keep)
      : comm_(comm), device_(device), keep_(std::move(keep)) {
    DeviceScope ds(device_);
    TX_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming));
    TX_CUDA_CHECK(cudaEventRecord(event_, stream));
  }
  ~NcclRequest() override {
    try {
      wait();
    } catch (...) {  // a destructor must not throw; wait() raised it already where it was called
    }
    if (event_) cudaEventDestroy(event_);
  }
  void wait() override {
    if (done_) return;
    done_ = true;
    // Poll rather than cudaEventSynchronize: an NCCL failure (a peer gone, a timeout) is reported through
    // ncclCommGetAsyncError while the event would never complete.
    for (;;) {
      const cudaError_t e = cudaEventQuery(event_);
      if (e == cudaSuccess) break;
      if (e != cudaErrorNotReady) TX_CUDA_CHECK(e);
      ncclResult_t async = ncclSuccess;
      TX_NCCL_CHECK(ncclCommGetAsyncError(comm_, &async));
      TX_NCCL_CHECK(async);
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
    keep_.clear();
  }
  bool test() override {
    if (done_) return true;
    const cudaError_t e = cudaEventQuery(event_);
    if (e == cudaSuccess) return true;
    if (e != cudaErrorNotReady) TX_CUDA_CHECK(e);
    return false;
  }

 private:
  ncclComm_t comm_;
  int device_;
  cudaEvent_t event_ = nullptr;
  std::vector<Tensor> keep_;
  bool done_ = false;
};

class NcclCommunicator final : public detail::MpiGroupCommunicator {
 public:
  NcclCommunicator(std::shared_ptr<Communicator> mpi, int device, ncclComm_t comm)
      : MpiGroupCommunicator(std::move(mpi), Device::cuda(device)), comm_(comm) {}
  ~NcclCommunicator() override {
    if (!comm_) return;
    cudaSetDevice(device_.index);
    ncclCommDestroy(comm_);  // waits for queued work of this communicator; errors cannot be thrown here
  }

  std::string backend() const override { return "nccl"; }

  void all_reduce(Tensor& t, CollectiveOp op) override {
    if (!mine(t)) return mpi_->all_reduce(t, op);
    detail::check_reducible(t, "all_reduce");
    verify(CheckedCall::all_reduce, &t, int64_t(op));
    if (t.numel() == 0) return;
    DeviceScope ds(device_.index);
    DeviceStaged s(t, true);
    TX_NCCL_CHECK(ncclAllReduce(s.work.raw_data(), s.work.raw_data(), size_t(s.work.numel()), nccl_type(t.dtype()),
                                nccl_op(op), comm_, stream()));
    s.finish();
  }

  std::unique_ptr<CollectiveRequest> iall_reduce(Tensor& t, CollectiveOp op) override {
    if (!mine(t)) return mpi_->iall_reduce(t, op);
    detail::check_reducible(t, "iall_reduce");
    verify(CheckedCall::iall_reduce, &t, int64_t(op));
    DeviceScope ds(device_.index);
    DeviceStaged s(t, true);
    if (t.numel() > 0)
      TX_NCCL_CHECK(ncclAllReduce(s.work.raw_data(), s.work.raw_data(), size_t(s.work.numel()), nccl_type(t.dtype()),
                                  nccl_op(op), comm_, stream()));
    s.finish();  // the copy back is queued after the reduction: the event below covers both
    return request({s.work, t});
  }

  void broadcast(Tensor& t, int root) override {
    if (!mine(t)) return mpi_->broadcast(t, root);
    detail::check_defined(t, "broadcast");
    check_root(root, "broadcast");
    verify(CheckedCall::broadcast, &t, -1, root);
    if (t.numel() == 0) return;
    DeviceScope ds(device_.index);
    DeviceStaged s(t, rank() == root);
    TX_NCCL_CHECK(ncclBroadcast(s.work.raw_data(), s.work.raw_data(), s.work.nbytes(), ncclUint8, root, comm_, stream()));
    if (rank() != root) s.finish();
  }

  Tensor all_gather(const Tensor& t) override {
    if (!mine(t)) return mpi_->all_gather(t);
    detail::check_defined(t, "all_gather");
    verify(CheckedCall::all_gather, &t);
    Shape out_shape = t.shape();
    if (out_shape.empty()) out_shape = Shape{int64_t(size())};
    else out_shape[0] *= size();
    Tensor out = empty(out_shape, t.dtype(), t.device());
    if (t.numel() == 0) return out;
    DeviceScope ds(device_.index);
    DeviceStaged s(t, true);
    TX_NCCL_CHECK(ncclAllGather(s.work.raw_data(), out.raw_data(), s.work.nbytes(), ncclUint8, comm_, stream()));
    return out;
  }

  Tensor reduce_scatter(const Tensor& t, CollectiveOp op) override {
    if (!mine(t)) return mpi_->reduce_scatter(t, op);
    detail::check_reducible(t, "reduce_scatter");
    detail::check_axis0_divides(t, size(), "reduce_scatter");
    verify(CheckedCall::reduce_scatter, &t, int64_t(op));
    Shape out_shape = t.shape();
    out_shape[0] /= size();
    Tensor out = empty(out_shape, t.dtype(), t.device());
    if (out.numel() == 0) return out;
    DeviceScope ds(device_.index);
    DeviceStaged s(t, true);
    TX_NCCL_CHECK(ncclReduceScatter(s.work.raw_data(), out.raw_data(), size_t(out.numel()), nccl_type(t.dtype()),
                                    nccl_op(op), comm_, stream()));
    return out;
  }

  std::unique_ptr<CollectiveRequest> ireduce_scatter(const Tensor& t, Tensor& out, CollectiveOp op) override {
    if (!mine(t)) return mpi_->ireduce_scatter(t, out, op);
    detail::check_reducible(t, "ireduce_scatter");
    detail::check_axis0_divides(t, size(), "ireduce_scatter");
    detail::check_scatter_out(t, out, size(), "ireduce_scatter");
    verify(CheckedCall::ireduce_scatter, &t, int64_t(op));
    DeviceScope ds(device_.index);
    DeviceStaged in(t, true), o(out, false);
    if (out.numel() > 0) {
      TX_NCCL_CHECK(ncclReduceScatter(in.work.raw_data(), o.work.raw_data(), size_t(out.numel()), nccl_type(t.dtype()),
                                      nccl_op(op), comm_, stream()));
      o.finish();  // queued after the reduction: the event below covers both
    }
    return request({in.work, t, o.work, out});
  }

  Tensor all_to_all(const Tensor& t) override {
    if (!mine(t)) return mpi_->all_to_all(t);
    detail::check_axis0_divides(t, size(), "all_to_all");
    verify(CheckedCall::all_to_all, &t);
    Tensor out = empty(t.shape(), t.dtype(), t.device());
    if (t.numel() == 0) return out;
    DeviceScope ds(device_.index);
    DeviceStaged s(t, true);
    const size_t block = s.work.nbytes() / size_t(size());
    const char* src = static_cast<const char*>(s.work.raw_data());
    char* dst = static_cast<char*>(out.raw_data());
    // This rank's own block is a device copy; the others are send / receive pairs in one NCCL group.
    TX_CUDA_CHECK(cudaMemcpyAsync(dst + size_t(rank()) * block, src + size_t(rank()) * block, block,
                                  cudaMemcpyDeviceToDevice, stream()));
    TX_NCCL_CHECK(ncclGroupStart());
    for (int p = 0; p < size(); ++p) {
      if (p == rank()) continue;
      TX_NCCL_CHECK(ncclSend(src + size_t(p) * block, block, ncclUint8, p, comm_, stream()));
      TX_NCCL_CHECK(ncclRecv(dst + size_t(p) * block, block, ncclUint8, p, comm_, stream()));
    }
    TX_NCCL_CHECK(ncclGroupEnd());
    return out;
  }

  Tensor sendrecv(const Tensor& t, int dst, int src) override {
    if (!mine(t)) return mpi_->sendrecv(t, dst, src);
    detail::check_defined(t, "sendrecv");
    check_peer(dst, true, "sendrecv", "destination");
    check_peer(src, true, "sendrecv", "source");
    Tensor out = empty(t.shape(), t.dtype(), t.device());
    if (t.numel() == 0) return out;
    DeviceScope ds(device_.index);
    if (src == -1) TX_CUDA_CHECK(cudaMemsetAsync(out.raw_data(), 0, out.nbytes(), stream()));  // zero bits = 0
    DeviceStaged s(t, dst != -1);
    if (dst == rank() && src == rank()) {
      TX_CUDA_CHECK(cudaMemcpyAsync(out.raw_data(), s.work.raw_data(), s.work.nbytes(), cudaMemcpyDeviceToDevice, stream()));
      return out;
    }
    TX_NCCL_CHECK(ncclGroupStart());
    if (dst >= 0) TX_NCCL_CHECK(ncclSend(s.work.raw_data(), s.work.nbytes(), ncclUint8, dst, comm_, stream()));
    if (src >= 0) TX_NCCL_CHECK(ncclRecv(out.raw_data(), out.nbytes(), ncclUint8, src, comm_, stream()));
    TX_NCCL_CHECK(ncclGroupEnd());
    return out;
  }

  void send(const Tensor& t, int dst, int tag) override {
    if (!mine(t)) return mpi_->send(t, dst, tag);
    detail::check_defined(t, "send");
    check_peer(dst, false, "send", "destination");
    check_tag(tag);
    if (t.numel() == 0) return;
    DeviceScope ds(device_.index);
    DeviceStaged s(t, true);
    TX_NCCL_CHECK(ncclSend(s.work.raw_data(), s.work.nbytes(), ncclUint8, dst, comm_, stream()));
  }

  void recv(Tensor& t, int src, int tag) override {
    if (!mine(t)) return mpi_->recv(t, src, tag);
    detail::check_defined(t, "recv");
    check_peer(src, false, "recv", "source");
    check_tag(tag);
    if (t.numel() == 0) return;
    DeviceScope ds(device_.index);
    DeviceStaged s(t, false);
    TX_NCCL_CHECK(ncclRecv(s.work.raw_data(), s.work.nbytes(), ncclUint8, src, comm_, stream()));
    s.finish();
  }

  std::unique_ptr<CollectiveRequest> isend(const Tensor& t, int dst, int tag) override {
    if (!mine(t)) return mpi_->isend(t, dst, tag);
    detail::check_defined(t, "isend");
    check_peer(dst, false, "isend", "destination");
    check_tag(tag);
    DeviceScope ds(device_.index);
    DeviceStaged s(t, true);
    if (t.numel() > 0) TX_NCCL_CHECK(ncclSend(s.work.raw_data(), s.work.nbytes(), ncclUint8, dst, comm_, stream()));
    return request({s.work, t});
  }

  std::unique_ptr<CollectiveRequest> irecv(Tensor& t, int src, int tag) override {
    if (!mine(t)) return mpi_->irecv(t, src, tag);
    detail::check_defined(t, "irecv");
    check_peer(src, false, "irecv", "source");
    check_tag(tag);
    DeviceScope ds(device_.index);
    DeviceStaged s(t, false);
    if (t.numel() > 0) {
      TX_NCCL_CHECK(ncclRecv(s.work.raw_data(), s.work.nbytes(), ncclUint8, src, comm_, stream()));
      s.finish();
    }
    return request({s.work, t});
  }

 private:
  /// Whether NCCL serves t: a CUDA tensor on this communicator's device (others go through MPI).
  bool mine(const Tensor& t) const { return t.defined() && t.device() == device_; }
  cudaStream_t stream() const { return static_cast<cudaStream_t>(cuda_rt::current_stream(device_.index)); }
  void verify(CheckedCall call, const Tensor* t, int64_t op = -1, int64_t root = -1) {
    mpi::verify_call(*mpi_, call, t, op, root, kNcclPath, kNcclNote);
  }
  std::unique_ptr<CollectiveRequest> request(std::vector<Tensor> keep) {
    return std::make_unique<NcclRequest>(comm_, device_.index, stream(), std::move(keep));
  }
  void check_root(int root, const char* what) const {
    if (root < 0 || root >= size())
      throw CollectiveError(std::string(what) + ": root rank out of range", "0 <= root < " + std::to_string(size()),
                            std::to_string(root));
  }
  void check_peer(int peer, bool allow_none, const char* what, const char* role) const {
    if ((peer >= 0 && peer < size()) || (allow_none && peer == -1)) return;
    throw CollectiveError(std::string(what) + ": " + role + " rank out of range",
                          std::string(allow_none ? "-1 (none) or " : "") + "0 <= rank < " + std::to_string(size()),
                          std::to_string(peer));
  }
  static void check_tag(int tag) {
    if (tag < 0 || tag >= kMaxTag)
      throw CollectiveError("send/recv tag out of range", "0 <= tag < " + std::to_string(kMaxTag), std::to_string(tag));
  }

  ncclComm_t comm_ = nullptr;
};

}  // namespace

bool nccl_built() { return true; }

namespace detail {

std::string gpu_identity(int device) {
  cudaDeviceProp p{};
  TX_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  const auto* u = reinterpret_cast<const unsigned char*>(p.uuid.bytes);
  char buf[64];
  std::snprintf(buf, sizeof buf, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0], u[1],
                u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]);
  char pci[32];
  std::snprintf(pci, sizeof pci, " (PCI %04x:%02x:%02x)", p.pciDomainID, p.pciBusID, p.pciDeviceID);
  return std::string(buf) + pci;
}

std::shared_ptr<Communicator> make_nccl_communicator(std::shared_ptr<Communicator> mpi_group, int device,
                                                     std::string* why_not) {
  const int rank = mpi_group->rank(), size = mpi_group->size();
  // Rank 0's id, with its ncclGetUniqueId result in front, so a failure there is known to every rank.
  Tensor buf = zeros(Shape{int64_t(1 + NCCL_UNIQUE_ID_BYTES)}, DType::u8, Device::cpu());
  if (rank == 0) {
    ncclUniqueId id;
    const ncclResult_t r = ncclGetUniqueId(&id);
    buf.data<uint8_t>()[0] = uint8_t(r);
    if (r == ncclSuccess) std::memcpy(buf.data<uint8_t>() + 1, id.internal, NCCL_UNIQUE_ID_BYTES);
  }
  mpi_group->broadcast(buf, 0);
  if (const auto r0 = ncclResult_t(buf.data<uint8_t>()[0]); r0 != ncclSuccess) {
    if (rank == 0) nccl_fail(r0, "ncclGetUniqueId(&id)", __FILE__, __LINE__);
    throw CollectiveError("NCCL call failed on group rank 0: ncclGetUniqueId", "ncclSuccess", ncclGetErrorString(r0),
                          "see rank 0's error; rerun with NCCL_DEBUG=WARN");
  }
  ncclUniqueId id;
  std::memcpy(id.internal, buf.data<uint8_t>() + 1, NCCL_UNIQUE_ID_BYTES);

  ncclComm_t comm = nullptr;
  ncclResult_t r;
  std::string last;
  {
    DeviceScope ds(device);
    r = ncclCommInitRank(&comm, size, id, rank);
    if (r != ncclSuccess) {
      const char* l = ncclGetLastError(nullptr);
      last = l ? l : "";
    }
  }
  // Agree on the outcome: 0 every rank succeeded, 1 some rank got ncclInvalidUsage (the GPU-sharing case
  // the identity check may miss, e.g. MPS or one GPU under two UUIDs), 2 some other failure.
  Tensor outcome = scalar(r == ncclSuccess ? 0.0 : r == ncclInvalidUsage ? 1.0 : 2.0, DType::i64);
  mpi_group->all_reduce(outcome, CollectiveOp::max);
  const int worst = int(outcome.item());
  if (worst == 0) return std::make_shared<NcclCommunicator>(mpi_group, device, comm);
  if (comm) {
    DeviceScope ds(device);
    ncclCommAbort(comm);  // this rank's init succeeded but another's did not: the comm is unusable
  }
  if (worst == 1) {
    std::vector<std::string> each = mpi_group->all_gather_string(
        r == ncclSuccess ? std::string() : std::string(ncclGetErrorString(r)) + (last.empty() ? "" : ": " + last));
    std::vector<std::string> parts;
    for (int i = 0; i < size; ++i)
      if (!each[size_t(i)].empty()) parts.push_back("rank " + std::to_string(i) + ": " + each[size_t(i)]);
    if (why_not) *why_not = "ncclCommInitRank refused the group (" + join(parts, "; ") + ")";
    return nullptr;
  }
  if (r != ncclSuccess) nccl_fail(r, "ncclCommInitRank(&comm, size, id, rank)", __FILE__, __LINE__);
  throw CollectiveError("ncclCommInitRank failed on another rank of this group", "ncclSuccess on every rank",
                        "a failure elsewhere", "see the other ranks' errors; rerun with NCCL_DEBUG=WARN");
}

}  // namespace detail
}  // namespace titanax
