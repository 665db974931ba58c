// The MPI backend of Communicator (OpenMPI 4.1) and the process-level MPI helpers the Runtime uses.
// <mpi.h> stays inside mpi_communicator.cpp; this header is MPI-free.
//
// Behaviour of the MPI communicator (see parallel/communicator.h for each collective's semantics):
//   * Every MPI call goes through a check that throws CollectiveError naming the call, the file:line and
//     MPI_Error_string (communicators use MPI_ERRORS_RETURN, so a failed call never aborts silently).
//   * Host tensors are used in place when contiguous; other layouts and CUDA tensors are staged through
//     a contiguous host buffer (and copied back). bf16 / f16 reductions run in f32.
//   * Cross-rank check: before each collective, the ranks of the group compare a small signature (the
//     collective, dtype, shape, reduction op, root) with one 128-byte MPI_Allreduce. On a mismatch every
//     rank throws the same CollectiveError listing what each rank called, instead of hanging or
//     corrupting memory. TITANAX_CHECK_COLLECTIVES=0 in the environment turns the check off.
//   * Messages are limited to 2^31 - 1 bytes per rank for all_gather / reduce_scatter / all_to_all /
//     sendrecv / send / recv (CollectiveError beyond); all_reduce and broadcast split larger tensors.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "parallel/communicator.h"

namespace titanax::mpi {

/// True when this process was started by a process manager that MPI can join: one of
/// OMPI_COMM_WORLD_SIZE, PMIX_RANK or PMI_RANK is set in the environment.
bool launched();

/// True when MPI is initialised and not yet finalised in this process.
bool active();

/// What init() found.
struct InitInfo {
  int rank = 0, size = 1;              ///< in MPI_COMM_WORLD
  int local_rank = 0, local_size = 1;  ///< among the ranks on this node (MPI_COMM_TYPE_SHARED)
  int thread_level = 0;                ///< MPI_THREAD_* provided
  bool initialized_here = false;       ///< false when the program had already called MPI_Init
};

/// Calls MPI_Init_thread(MPI_THREAD_FUNNELED) unless MPI is already initialised, sets MPI_ERRORS_RETURN
/// on MPI_COMM_WORLD and queries the world and node ranks. Throws CollectiveError when MPI was
/// already finalised or a call fails.
InitInfo init(int* argc, char*** argv);

/// MPI_Finalize when init() initialised MPI and it is still active; otherwise nothing. Idempotent.
void finalize();

/// A communicator over a duplicate of MPI_COMM_WORLD (so Titanax's traffic never matches user MPI
/// calls). Requires active(); throws CollectiveError otherwise.
std::shared_ptr<Communicator> world();

/// MPI_Abort(MPI_COMM_WORLD, code) when MPI is active, else std::_Exit(code).
[[noreturn]] void abort(int code);

/// The collectives the cross-rank check knows (one code each in the compared signature).
enum class CheckedCall : int64_t {
  all_reduce = 1, iall_reduce, broadcast, all_gather, reduce_scatter, all_to_all, barrier, gather_string, split,
  ireduce_scatter
};

/// For backends layered on an MPI communicator (the NCCL one, parallel/nccl_communicator.h): runs the
/// MPI backend's cross-rank check of one call on `mpi_comm`'s group, exactly as its own collectives do:
/// every rank compares (call, t's dtype and shape, reduction op, root, extra) in one 128-byte
/// MPI_Allreduce; on a mismatch every rank throws the same CollectiveError listing what each rank called
/// (`note` is added to this rank's description). `extra` tells apart calls that must not meet (the NCCL
/// backend passes a nonzero value for its device path, so one rank on NCCL and another on host MPI is an
/// error, not a hang). Collective over the group; nothing when the group has one rank or
/// TITANAX_CHECK_COLLECTIVES=0. Throws InternalError when `mpi_comm` has more than one rank and is not
/// an MPI communicator.
void verify_call(Communicator& mpi_comm, CheckedCall call, const Tensor* t, int64_t op = -1, int64_t root = -1,
                 int64_t extra = 0, const std::string& note = {});

}  // namespace titanax::mpi
