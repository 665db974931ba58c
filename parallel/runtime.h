// Runtime: one per process. Initialises MPI when launched by mpirun (OMPI_COMM_WORLD_SIZE or
// PMIX_RANK set), else runs as a single rank without MPI; picks this rank's device (local_rank % gpus,
// or the CPU); sets the OpenMP threads per rank to cores / ranks-on-this-node; sets up logging with the
// rank in every line ("[12:00:01.123] [rank 1/2] [info] ...").
#pragma once

#include <memory>
#include <string>

#include "core/device.h"
#include "parallel/communicator.h"

namespace titanax {

struct RuntimeOptions {
  /// "auto": the first CUDA device by local rank if any, else the CPU; or "cpu", "cuda".
  std::string device = "auto";
  /// Threads per rank; 0 = hardware threads / ranks on this node (at least 1).
  int threads = 0;
  /// spdlog level: "trace", "debug", "info", "warn", "error", "off".
  std::string log_level = "info";
};

class Runtime {
 public:
  /// Initialises once per process; a second Runtime in the same process shares the first's state.
  Runtime(int& argc, char**& argv, RuntimeOptions opts = {});
  explicit Runtime(RuntimeOptions opts = {});
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  int rank() const;
  int world_size() const;
  /// Rank among the processes on this node, and their number.
  int local_rank() const;
  int local_size() const;
  Device device() const;
  /// The world communicator ("local" without mpirun, else "mpi").
  std::shared_ptr<Communicator> world() const;
  bool is_main() const { return rank() == 0; }

  /// The process's runtime, initialising it with default options on first use (used by tests).
  static Runtime& instance();
};

}  // namespace titanax
