// Runtime: one per process. Initialises MPI when launched by mpirun (OMPI_COMM_WORLD_SIZE, PMIX_RANK or
// PMI_RANK set; MPI_Init_thread with MPI_THREAD_FUNNELED: call collectives from the main thread), else
// runs as a single rank without MPI; picks this rank's device (local_rank % gpus, or the CPU); builds the
// world communicator (NCCL when every rank has its own GPU and the build has NCCL, else MPI; TITANAX_COMM
// overrides: parallel/nccl_communicator.h); sets the OpenMP threads per rank to cores / ranks-on-this-node;
// sets up spdlog's default logger with the rank in every line ("[12:00:01.123] [rank 1/2] [info] ...").
//
// The state is per process: every Runtime object (and Runtime::instance()) shares the first one's
// setup; a later Runtime's options are validated (same errors) but not applied (a warning says so).
// MPI is finalised once, at process exit (atexit), not by ~Runtime, so meshes and communicators stay
// usable for the whole program. If the program called MPI_Init itself, Titanax uses that MPI and leaves
// finalisation to the program.
#pragma once

#include <memory>
#include <string>

#include "core/device.h"
#include "parallel/communicator.h"

namespace titanax {

struct RuntimeOptions {
  /// "auto": the first CUDA device by local rank if any, else the CPU; or "cpu", "cuda".
  std::string device = "auto";
  /// Threads per rank; 0 = OMP_NUM_THREADS when set, else hardware threads / ranks on this node (>= 1).
  /// Negative: ValueError from the Runtime.
  int threads = 0;
  /// spdlog level: "trace", "debug", "info", "warn", "error", "off".
  std::string log_level = "info";
};

class Runtime {
 public:
  /// Initialises once per process; a second Runtime in the same process shares the first's state.
  /// Throws ValueError for an unknown log level, DeviceError for a device that is not there ("cuda" in a
  /// CPU build or on a machine without GPUs, "cuda:3" with two GPUs, "tpu"), CollectiveError when an
  /// MPI or NCCL call fails, MPI was already finalised, or TITANAX_COMM=nccl cannot be honoured (the
  /// message says why), ValueError for a bad TITANAX_COMM.
  Runtime(int& argc, char**& argv, RuntimeOptions opts = {});
  explicit Runtime(RuntimeOptions opts = {});
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  /// This process's rank in the world, and the number of ranks (1 without mpirun).
  int rank() const;
  int world_size() const;
  /// Rank among the processes on this node, and their number.
  int local_rank() const;
  int local_size() const;
  /// This rank's device (RuntimeOptions::device resolved).
  Device device() const;
  /// The world communicator: "local" without mpirun; under mpirun "nccl" when every rank computes on its
  /// own GPU and the build has NCCL, else "mpi" (parallel/nccl_communicator.h; TITANAX_COMM=mpi|nccl
  /// overrides). Mesh axes split from it choose again per axis.
  std::shared_ptr<Communicator> world() const;
  bool is_main() const { return rank() == 0; }

  /// The process's runtime, initialising it with default options on first use (used by tests).
  static Runtime& instance();
};

}  // namespace titanax
