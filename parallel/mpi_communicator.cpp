// MPI backend: see mpi_communicator.h for the behaviour (checks, staging, cross-rank signatures).
#include "parallel/mpi_communicator.h"

// The C API only: OpenMPI's mpi.h pulls in the deprecated C++ bindings (libmpi_cxx) otherwise.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <climits>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>

#include "parallel/comm_detail.h"

namespace titanax::mpi {
namespace {

using detail::tensor_sig;

[[noreturn]] void fail(int rc, const char* call, const char* file, int line) {
  char buf[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  if (MPI_Error_string(rc, buf, &len) != MPI_SUCCESS) len = std::snprintf(buf, sizeof buf, "unknown MPI error");
  std::string f(file);
  if (auto p = f.rfind("/parallel/"); p != std::string::npos) f = f.substr(p + 1);
  throw CollectiveError(std::string("MPI call failed: ") + call + " at " + f + ":" + std::to_string(line),
                        "MPI_SUCCESS", std::string(buf, size_t(len)) + " (error code " + std::to_string(rc) + ")",
                        "check that every rank reaches this collective with matching tensors; rerun with "
                        "OMPI_MCA_mpi_abort_print_stack=1 for more detail");
}

#define TX_MPI_CHECK(call)                                           \
  do {                                                               \
    int tx_mpi_rc_ = (call);                                         \
    if (tx_mpi_rc_ != MPI_SUCCESS) fail(tx_mpi_rc_, #call, __FILE__, __LINE__); \
  } while (0)

constexpr int kSendrecvTag = 32001;  // internal tag for sendrecv (MPI_TAG_UB is at least 32767)

MPI_Datatype mpi_type(DType t) {
  switch (t) {
    case DType::f32: return MPI_FLOAT;
    case DType::f64: return MPI_DOUBLE;
    case DType::i32: return MPI_INT32_T;
    case DType::i64: return MPI_INT64_T;
    case DType::u8: return MPI_UINT8_T;
    default:
      throw InternalError("no MPI datatype for " + std::string(dtype_name(t)), "f32, f64, i32, i64, u8",
                          std::string(dtype_name(t)));
  }
}

MPI_Op mpi_op(CollectiveOp op) {
  switch (op) {
    case CollectiveOp::sum: return MPI_SUM;
    case CollectiveOp::max: return MPI_MAX;
    case CollectiveOp::min: return MPI_MIN;
  }
  return MPI_SUM;
}

/// The dtype a reduction runs in: bf16 / f16 through f32.
DType reduce_dtype(DType t) { return (t == DType::bf16 || t == DType::f16) ? DType::f32 : t; }

int checked_count(size_t n, const char* what) {
  if (n > size_t(INT_MAX))
    throw CollectiveError(std::string(what) + ": message too large for one MPI call",
                          "at most 2^31 - 1 bytes (or elements) per rank", std::to_string(n),
                          "split the tensor into smaller pieces");
  return int(n);
}

/// A contiguous host buffer for t (t itself when it already is one in the wanted dtype). finish() copies
/// the buffer back into t (or bumps t's version when t was used directly).
struct Staged {
  Tensor orig, work;
  bool staged = false;
  Staged() = default;
  Staged(const Tensor& t, DType dtype, bool copy_in) : orig(t) {
    if (t.device().is_cpu() && t.is_contiguous() && t.dtype() == dtype) {
      work = t;
    } else {
      staged = true;
      work = empty(t.shape(), dtype, Device::cpu());
      if (copy_in) copy_(work, t);
    }
  }
  void finish() {
    if (staged) copy_(orig, work);
    else orig.storage()->bump_version();
  }
};

bool finalized() {
  int f = 0;
  MPI_Finalized(&f);
  return f != 0;
}

using Kind = CheckedCall;

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::all_reduce: return "all_reduce";
    case Kind::iall_reduce: return "iall_reduce";
    case Kind::broadcast: return "broadcast";
    case Kind::all_gather: return "all_gather";
    case Kind::reduce_scatter: return "reduce_scatter";
    case Kind::all_to_all: return "all_to_all";
    case Kind::barrier: return "barrier";
    case Kind::gather_string: return "all_gather_string";
    case Kind::split: return "split";
    case Kind::ireduce_scatter: return "ireduce_scatter";
  }
  return "?";
}

/// What one rank is about to do, compared across the group before the collective runs.
struct Signature {
  Kind kind;
  const Tensor* t = nullptr;
  int64_t op = -1, root = -1, extra = 0;
  std::string note;  // extra words for the message

  explicit Signature(Kind k, const Tensor* tensor = nullptr, int64_t reduce_op = -1, int64_t root_rank = -1)
      : kind(k), t(tensor), op(reduce_op), root(root_rank) {}

  static constexpr int K = 8;
  void encode(int64_t* v) const {
    v[0] = int64_t(kind);
    v[1] = t ? int64_t(t->dtype()) : -1;
    v[2] = op;
    v[3] = root;
    v[4] = t ? t->numel() : -1;
    v[5] = t ? t->dim() : -1;
    uint64_t h = 1469598103934665603ull;  // FNV-1a over the dims
    if (t)
      for (int64_t d : t->shape()) {
        h ^= uint64_t(d);
        h *= 1099511628211ull;
      }
    v[6] = int64_t(h >> 2);  // keep it non-negative so negation cannot overflow
    v[7] = extra;
  }
  std::string describe() const {
    std::string s = std::string(kind_name(kind)) + "(";
    std::string args;
    if (t) args = tensor_sig(*t);
    if (op >= 0) args += (args.empty() ? "" : ", ") + std::string(detail::collective_op_name(CollectiveOp(op)));
    if (root >= 0) args += (args.empty() ? "root " : ", root ") + std::to_string(root);
    if (!note.empty()) args += (args.empty() ? "" : ", ") + note;
    return s + args + ")";
  }
};

class MpiRequest;

class MpiCommunicator final : public Communicator {
 public:
  /// Takes ownership of `comm` (freed in the destructor while MPI is active).
  explicit MpiCommunicator(MPI_Comm comm) : comm_(comm) {
    TX_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
    TX_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    TX_MPI_CHECK(MPI_Comm_size(comm_, &size_));
    TX_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &world_rank_));
  }
  ~MpiCommunicator() override {
    if (comm_ != MPI_COMM_NULL && !finalized()) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "mpi"; }

  void all_reduce(Tensor& t, CollectiveOp op) override {
    detail::check_reducible(t, "all_reduce");
    verify(Signature{Kind::all_reduce, &t, int64_t(op)});
    if (t.numel() == 0) return;
    Staged s(t, reduce_dtype(t.dtype()), true);
    char* p = static_cast<char*>(s.work.raw_data());
    const size_t n = size_t(s.work.numel()), isz = itemsize(s.work.dtype());
    for (size_t off = 0; off < n; off += kChunk) {
      int cnt = int(std::min(kChunk, n - off));
      TX_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, p + off * isz, cnt, mpi_type(s.work.dtype()), mpi_op(op), comm_));
    }
    s.finish();
  }

  std::unique_ptr<CollectiveRequest> iall_reduce(Tensor& t, CollectiveOp op) override;
  std::unique_ptr<CollectiveRequest> ireduce_scatter(const Tensor& t, Tensor& out, CollectiveOp op) override;

  void broadcast(Tensor& t, int root) override {
    detail::check_defined(t, "broadcast");
    check_root(root, "broadcast");
    verify(Signature{Kind::broadcast, &t, -1, root});
    if (t.numel() == 0) return;
    Staged s(t, t.dtype(), rank_ == root);
    char* p = static_cast<char*>(s.work.raw_data());
    const size_t n = s.work.nbytes();
    for (size_t off = 0; off < n; off += kChunk)
      TX_MPI_CHECK(MPI_Bcast(p + off, int(std::min(kChunk, n - off)), MPI_BYTE, root, comm_));
    if (rank_ != root) s.finish();
  }

  Tensor all_gather(const Tensor& t) override {
    detail::check_defined(t, "all_gather");
    verify(Signature{Kind::all_gather, &t});
    Shape out_shape = t.shape();
    if (out_shape.empty()) out_shape = Shape{int64_t(size_)};
    else out_shape[0] *= size_;
    Tensor out = empty(out_shape, t.dtype(), Device::cpu());
    if (t.numel() > 0) {
      Staged s(t, t.dtype(), true);
      int bytes = checked_count(s.work.nbytes(), "all_gather");
      TX_MPI_CHECK(MPI_Allgather(s.work.raw_data(), bytes, MPI_BYTE, out.raw_data(), bytes, MPI_BYTE, comm_));
    }
    return detail::to_device(out, t.dtype(), t.device());
  }

  Tensor reduce_scatter(const Tensor& t, CollectiveOp op) override {
    detail::check_reducible(t, "reduce_scatter");
    detail::check_axis0_divides(t, size_, "reduce_scatter");
    verify(Signature{Kind::reduce_scatter, &t, int64_t(op)});
    Shape out_shape = t.shape();
    out_shape[0] /= size_;
    DType rd = reduce_dtype(t.dtype());
    Tensor out = empty(out_shape, rd, Device::cpu());
    if (out.numel() > 0) {
      Staged s(t, rd, true);
      int cnt = checked_count(size_t(out.numel()), "reduce_scatter");
      TX_MPI_CHECK(MPI_Reduce_scatter_block(s.work.raw_data(), out.raw_data(), cnt, mpi_type(rd), mpi_op(op), comm_));
    }
    return detail::to_device(out, t.dtype(), t.device());
  }

  Tensor all_to_all(const Tensor& t) override {
    detail::check_axis0_divides(t, size_, "all_to_all");
    verify(Signature{Kind::all_to_all, &t});
    Tensor out = empty(t.shape(), t.dtype(), Device::cpu());
    if (t.numel() > 0) {
      Staged s(t, t.dtype(), true);
      int block = checked_count(s.work.nbytes() / size_t(size_), "all_to_all");
      TX_MPI_CHECK(MPI_Alltoall(s.work.raw_data(), block, MPI_BYTE, out.raw_data(), block, MPI_BYTE, comm_));
    }
    return detail::to_device(out, t.dtype(), t.device());
  }

  Tensor sendrecv(const Tensor& t, int dst, int src) override {
    detail::check_defined(t, "sendrecv");
    check_peer(dst, true, "sendrecv", "destination");
    check_peer(src, true, "sendrecv", "source");
    Tensor out = empty(t.shape(), t.dtype(), Device::cpu());
    if (src == -1) fill_(out, 0.0);
    Staged s(t, t.dtype(), dst != -1);
    int bytes = checked_count(s.work.nbytes(), "sendrecv");
    MPI_Status st;
    TX_MPI_CHECK(MPI_Sendrecv(s.work.raw_data(), bytes, MPI_BYTE, dst < 0 ? MPI_PROC_NULL : dst, kSendrecvTag,
                              out.raw_data(), bytes, MPI_BYTE, src < 0 ? MPI_PROC_NULL : src, kSendrecvTag, comm_, &st));
    if (src >= 0) check_received(st, bytes, t, "sendrecv", src);
    return detail::to_device(out, t.dtype(), t.device());
  }

  void send(const Tensor& t, int dst, int tag) override {
    detail::check_defined(t, "send");
    check_peer(dst, false, "send", "destination");
    check_tag(tag);
    Staged s(t, t.dtype(), true);
    TX_MPI_CHECK(MPI_Send(s.work.raw_data(), checked_count(s.work.nbytes(), "send"), MPI_BYTE, dst, tag, comm_));
  }

  void recv(Tensor& t, int src, int tag) override {
    detail::check_defined(t, "recv");
    check_peer(src, false, "recv", "source");
    check_tag(tag);
    Staged s(t, t.dtype(), false);
    int bytes = checked_count(s.work.nbytes(), "recv");
    MPI_Status st;
    TX_MPI_CHECK(MPI_Recv(s.work.raw_data(), bytes, MPI_BYTE, src, tag, comm_, &st));
    check_received(st, bytes, t, "recv", src);
    s.finish();
  }

  std::unique_ptr<CollectiveRequest> isend(const Tensor& t, int dst, int tag) override;
  std::unique_ptr<CollectiveRequest> irecv(Tensor& t, int src, int tag) override;

  void barrier() override {
    verify(Signature{Kind::barrier});
    TX_MPI_CHECK(MPI_Barrier(comm_));
  }

  std::vector<std::string> all_gather_string(const std::string& s) override {
    verify(Signature{Kind::gather_string});
    return gather_strings(s);
  }

  std::shared_ptr<Communicator> split(int color, int key) override {
    Signature sig{Kind::split};
    sig.extra = color < 0 ? 1 : 0;
    sig.note = "color " + std::to_string(color);
    verify(sig);
    if (color < 0)
      throw CollectiveError("split with a negative color", "color >= 0", std::to_string(color));
    MPI_Comm nc = MPI_COMM_NULL;
    TX_MPI_CHECK(MPI_Comm_split(comm_, color, key, &nc));
    return std::make_shared<MpiCommunicator>(nc);
  }

 private:
  static constexpr size_t kChunk = size_t(1) << 30;

  void check_root(int root, const char* what) const {
    if (root < 0 || root >= size_)
      throw CollectiveError(std::string(what) + ": root rank out of range",
                            "0 <= root < " + std::to_string(size_), std::to_string(root));
  }
  void check_peer(int peer, bool allow_none, const char* what, const char* role) const {
    if ((peer >= 0 && peer < size_) || (allow_none && peer == -1)) return;
    throw CollectiveError(std::string(what) + ": " + role + " rank out of range",
                          std::string(allow_none ? "-1 (none) or " : "") + "0 <= rank < " + std::to_string(size_),
                          std::to_string(peer));
  }
  static void check_tag(int tag) {
    if (tag < 0 || tag >= kSendrecvTag)
      throw CollectiveError("send/recv tag out of range", "0 <= tag < " + std::to_string(kSendrecvTag),
                            std::to_string(tag));
  }
  void check_received(const MPI_Status& st, int bytes, const Tensor& t, const char* what, int src) const {
    int got = 0;
    TX_MPI_CHECK(MPI_Get_count(&st, MPI_BYTE, &got));
    if (got != bytes)
      throw CollectiveError(std::string(what) + ": the message from rank " + std::to_string(src) +
                                " has the wrong size",
                            std::to_string(bytes) + " bytes for " + tensor_sig(t), std::to_string(got) + " bytes",
                            "send and receive tensors of the same shape and dtype");
  }

  std::vector<std::string> gather_strings(const std::string& s) const {
    int len = checked_count(s.size(), "all_gather_string");
    std::vector<int> lens(static_cast<size_t>(size_)), displs(static_cast<size_t>(size_));
    TX_MPI_CHECK(MPI_Allgather(&len, 1, MPI_INT, lens.data(), 1, MPI_INT, comm_));
    size_t total = 0;
    for (int i = 0; i < size_; ++i) displs[size_t(i)] = int(total), total += size_t(lens[size_t(i)]);
    checked_count(total, "all_gather_string");
    std::string buf(total, '\0');
    TX_MPI_CHECK(MPI_Allgatherv(s.data(), len, MPI_CHAR, buf.data(), lens.data(), displs.data(), MPI_CHAR, comm_));
    std::vector<std::string> out;
    for (int i = 0; i < size_; ++i) out.push_back(buf.substr(size_t(displs[size_t(i)]), size_t(lens[size_t(i)])));
    return out;
  }

  /// Compares `sig` across the group (min == max of every field, in one allreduce); on a mismatch every
  /// rank gathers the descriptions and throws the same CollectiveError.
  void verify(const Signature& sig) const {
    if (size_ == 1 || !detail::collective_checks_enabled()) return;
    constexpr int K = Signature::K;
    int64_t v[2 * K];
    sig.encode(v);
    for (int i = 0; i < K; ++i) v[K + i] = -v[i];
    TX_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, v, 2 * K, MPI_INT64_T, MPI_MAX, comm_));
    bool same = true;
    for (int i = 0; i < K; ++i) same &= (v[i] == -v[K + i]);
    if (same) return;
    std::vector<std::string> all = gather_strings(sig.describe() + "\n" + std::to_string(world_rank_));
    // Group the ranks by what they called: "all_reduce(f32[4], sum) on ranks 0, 2 (world 0, 2)".
    std::map<std::string, std::pair<std::vector<std::string>, std::vector<std::string>>> by;
    std::vector<std::string> order;
    for (int r = 0; r < size_; ++r) {
      const std::string& e = all[size_t(r)];
      auto nl = e.rfind('\n');
      std::string d = e.substr(0, nl), w = e.substr(nl + 1);
      if (!by.count(d)) order.push_back(d);
      by[d].first.push_back(std::to_string(r));
      by[d].second.push_back(w);
    }
    std::vector<std::string> parts;
    for (const auto& d : order) {
      const auto& [g, w] = by[d];
      parts.push_back(d + " on group rank" + (g.size() > 1 ? "s " : " ") + join(g) + " (world " + join(w) + ")");
    }
    throw CollectiveError("ranks of one communicator called different collectives (or different shapes)",
                          "every rank of the group calling the same collective with the same dtype, shape and "
                          "arguments, in the same order",
                          join(parts, "; "),
                          "look for rank-dependent code paths or data shapes before this call");
  }

  friend class MpiRequest;
  friend void mpi::verify_call(Communicator&, CheckedCall, const Tensor*, int64_t, int64_t, int64_t, const std::string&);
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1, world_rank_ = 0;
};

class MpiRequest final : public CollectiveRequest {
 public:
  /// `check`, when set, validates the one request's status after completion (irecv's message size).
  /// `keep`: buffers MPI reads until completion (released by wait()).
  MpiRequest(std::vector<MPI_Request> reqs, Staged staged, std::function<void(const MPI_Status&)> check = nullptr,
             std::vector<Tensor> keep = {})
      : reqs_(std::move(reqs)), staged_(std::move(staged)), check_(std::move(check)), keep_(std::move(keep)) {}
  ~MpiRequest() override {
    if (done_ || finalized()) return;
    try {
      wait();
    } catch (...) {  // a destructor must not throw; the error was already reported by MPI's return code
    }
  }
  void wait() override {
    if (done_) return;
    done_ = true;
    std::vector<MPI_Status> st(reqs_.size());
    if (!reqs_.empty()) TX_MPI_CHECK(MPI_Waitall(int(reqs_.size()), reqs_.data(), st.data()));
    keep_.clear();
    if (check_) check_(st.at(0));
    if (staged_.orig.defined()) staged_.finish();
    staged_ = Staged{};  // a completed request pins no buffer
  }
  bool test() override {
    if (done_ || reqs_.empty()) return true;
    int flag = 0;
    TX_MPI_CHECK(MPI_Testall(int(reqs_.size()), reqs_.data(), &flag, MPI_STATUSES_IGNORE));
    return flag != 0;
  }

 private:
  std::vector<MPI_Request> reqs_;
  Staged staged_;
  std::function<void(const MPI_Status&)> check_;
  std::vector<Tensor> keep_;
  bool done_ = false;
};

std::unique_ptr<CollectiveRequest> MpiCommunicator::isend(const Tensor& t, int dst, int tag) {
  detail::check_defined(t, "isend");
  check_peer(dst, false, "isend", "destination");
  check_tag(tag);
  Staged s(t, t.dtype(), true);
  s.orig = Tensor();  // nothing to copy back; `work` keeps the bytes alive until the send completes
  MPI_Request r;
  TX_MPI_CHECK(MPI_Isend(s.work.raw_data(), checked_count(s.work.nbytes(), "isend"), MPI_BYTE, dst, tag, comm_, &r));
  return std::make_unique<MpiRequest>(std::vector<MPI_Request>{r}, std::move(s));
}

std::unique_ptr<CollectiveRequest> MpiCommunicator::irecv(Tensor& t, int src, int tag) {
  detail::check_defined(t, "irecv");
  check_peer(src, false, "irecv", "source");
  check_tag(tag);
  Staged s(t, t.dtype(), false);
  const int bytes = checked_count(s.work.nbytes(), "irecv");
  MPI_Request r;
  TX_MPI_CHECK(MPI_Irecv(s.work.raw_data(), bytes, MPI_BYTE, src, tag, comm_, &r));
  return std::make_unique<MpiRequest>(std::vector<MPI_Request>{r}, std::move(s),
                                      [this, bytes, t, src](const MPI_Status& st) { check_received(st, bytes, t, "irecv", src); });
}

std::unique_ptr<CollectiveRequest> MpiCommunicator::iall_reduce(Tensor& t, CollectiveOp op) {
  detail::check_reducible(t, "iall_reduce");
  verify(Signature{Kind::iall_reduce, &t, int64_t(op)});
  if (t.numel() == 0) return std::make_unique<MpiRequest>(std::vector<MPI_Request>{}, Staged{});
  Staged s(t, reduce_dtype(t.dtype()), true);
  char* p = static_cast<char*>(s.work.raw_data());
  const size_t n = size_t(s.work.numel()), isz = itemsize(s.work.dtype());
  std::vector<MPI_Request> reqs;
  for (size_t off = 0; off < n; off += kChunk) {
    MPI_Request r;
    TX_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, p + off * isz, int(std::min(kChunk, n - off)), mpi_type(s.work.dtype()),
                                mpi_op(op), comm_, &r));
    reqs.push_back(r);
  }
  return std::make_unique<MpiRequest>(std::move(reqs), std::move(s));
}

std::unique_ptr<CollectiveRequest> MpiCommunicator::ireduce_scatter(const Tensor& t, Tensor& out, CollectiveOp op) {
  detail::check_reducible(t, "ireduce_scatter");
  detail::check_axis0_divides(t, size_, "ireduce_scatter");
  detail::check_scatter_out(t, out, size_, "ireduce_scatter");
  verify(Signature{Kind::ireduce_scatter, &t, int64_t(op)});
  if (out.numel() == 0) return std::make_unique<MpiRequest>(std::vector<MPI_Request>{}, Staged{});
  const DType rd = reduce_dtype(t.dtype());
  Staged in(t, rd, true);
  Staged o(out, rd, false);
  MPI_Request r;
  TX_MPI_CHECK(MPI_Ireduce_scatter_block(in.work.raw_data(), o.work.raw_data(),
                                         checked_count(size_t(out.numel()), "ireduce_scatter"), mpi_type(rd),
                                         mpi_op(op), comm_, &r));
  return std::make_unique<MpiRequest>(std::vector<MPI_Request>{r}, std::move(o), nullptr, std::vector<Tensor>{in.work});
}

bool g_initialized_here = false;

}  // namespace

bool launched() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK"})
    if (std::getenv(v)) return true;
  return false;
}

bool active() {
  int i = 0;
  MPI_Initialized(&i);
  return i && !finalized();
}

InitInfo init(int* argc, char*** argv) {
  InitInfo info;
  if (finalized())
    throw CollectiveError("MPI was already finalised in this process", "MPI not yet finalised", "MPI_Finalized",
                          "create the Runtime once, before any other MPI use, and keep it for the whole program");
  int inited = 0;
  TX_MPI_CHECK(MPI_Initialized(&inited));
  if (!inited) {
    TX_MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &info.thread_level));
    g_initialized_here = info.initialized_here = true;
  } else {
    TX_MPI_CHECK(MPI_Query_thread(&info.thread_level));
  }
  TX_MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  TX_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &info.rank));
  TX_MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &info.size));
  MPI_Comm node = MPI_COMM_NULL;
  TX_MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, info.rank, MPI_INFO_NULL, &node));
  TX_MPI_CHECK(MPI_Comm_rank(node, &info.local_rank));
  TX_MPI_CHECK(MPI_Comm_size(node, &info.local_size));
  TX_MPI_CHECK(MPI_Comm_free(&node));
  return info;
}

void finalize() {
  if (g_initialized_here && active()) MPI_Finalize();
}

std::shared_ptr<Communicator> world() {
  if (!active())
    throw CollectiveError("MPI is not initialised", "an initialised MPI (a Runtime under mpirun)", "no MPI",
                          "construct titanax::Runtime first");
  MPI_Comm dup = MPI_COMM_NULL;
  TX_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &dup));
  return std::make_shared<MpiCommunicator>(dup);
}

void verify_call(Communicator& mpi_comm, CheckedCall call, const Tensor* t, int64_t op, int64_t root, int64_t extra,
                 const std::string& note) {
  if (mpi_comm.size() == 1) return;  // nothing to compare (also lets a one-rank local group through)
  auto* m = dynamic_cast<MpiCommunicator*>(&mpi_comm);
  if (!m)
    throw InternalError("mpi::verify_call on a communicator that is not MPI's", "backend mpi", mpi_comm.backend());
  Signature sig{call, t, op, root};
  sig.extra = extra;
  sig.note = note;
  m->verify(sig);
}

void abort(int code) {
  if (active()) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

}  // namespace titanax::mpi
