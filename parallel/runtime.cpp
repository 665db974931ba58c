// Runtime: process-wide MPI, device, threads and logging setup. One state per process, shared by every
// Runtime object; MPI is finalised once, at process exit.
#include "parallel/runtime.h"

#include <omp.h>
#include <spdlog/spdlog.h>

#include <cstdlib>
#include <mutex>
#include <thread>

#include "parallel/mpi_communicator.h"
#include "parallel/nccl_communicator.h"

namespace titanax {
namespace {

struct ProcessState {
  std::mutex mu;
  bool ready = false;
  bool mpi = false;
  int rank = 0, size = 1, local_rank = 0, local_size = 1;
  Device device = Device::cpu();
  int threads = 1;
  RuntimeOptions opts;
  std::shared_ptr<Communicator> world;
};

ProcessState& state() {
  static ProcessState* s = new ProcessState;  // never destroyed: used from atexit and static destructors
  return *s;
}

void finalize_at_exit() { mpi::finalize(); }

spdlog::level::level_enum parse_level(const std::string& name) {
  static const std::vector<std::string> names{"trace", "debug", "info", "warn", "error", "critical", "off"};
  for (size_t i = 0; i < names.size(); ++i)
    if (name == names[i]) return spdlog::level::level_enum(i);
  if (name == "warning") return spdlog::level::warn;
  throw ValueError("unknown log level '" + name + "'", "one of " + join(names), "'" + name + "'",
                   did_you_mean(name, names));
}

Device pick_device(const std::string& req, int local_rank) {
  const int gpus = cuda_device_count();
  if (req == "auto") return gpus > 0 ? Device::cuda(local_rank % gpus) : Device::cpu();
  Device d = parse_device(req);  // DeviceError for anything else
  if (d.is_cpu()) return d;
  if (gpus == 0)
    throw DeviceError("device '" + req + "' requested but no CUDA device is visible", "at least one CUDA device",
                      "0 CUDA devices (" + std::string("cpu build or no GPU") + ")",
                      "use RuntimeOptions{.device = \"cpu\"} or \"auto\" (titanax: --set runtime.device=cpu)");
  if (req.find(':') == std::string::npos) return Device::cuda(local_rank % gpus);
  if (d.index >= gpus)
    throw DeviceError("device '" + req + "' does not exist", "cuda:0 .. cuda:" + std::to_string(gpus - 1), req,
                      "use \"cuda\" to pick local_rank % gpus");
  return d;
}

void init_state(int* argc, char*** argv, const RuntimeOptions& opts) {
  if (opts.threads < 0)
    throw ValueError("RuntimeOptions::threads must be >= 0", ">= 0 (0 = OMP_NUM_THREADS or cores / local ranks)",
                     std::to_string(opts.threads), "pass 0 for the default");
  ProcessState& s = state();
  std::lock_guard lock(s.mu);
  if (s.ready) {
    parse_level(opts.log_level);          // invalid options are errors even when they are not applied
    pick_device(opts.device, s.local_rank);
    if (opts.device != s.opts.device || opts.threads != s.opts.threads || opts.log_level != s.opts.log_level)
      spdlog::warn("a second Runtime with different options: keeping the first one's (device {}, threads {}, "
                   "log level {})", s.opts.device, s.opts.threads, s.opts.log_level);
    return;
  }
  auto level = parse_level(opts.log_level);  // validate before touching MPI
  if (mpi::launched() || mpi::active()) {
    mpi::InitInfo info = mpi::init(argc, argv);
    if (info.initialized_here) std::atexit(finalize_at_exit);
    s.mpi = true;
    s.rank = info.rank;
    s.size = info.size;
    s.local_rank = info.local_rank;
    s.local_size = info.local_size;
  }
  spdlog::set_pattern("[%H:%M:%S.%e] [rank " + std::to_string(s.rank) + "/" + std::to_string(s.size) + "] [%l] %v");
  spdlog::set_level(level);

  s.device = pick_device(opts.device, s.local_rank);
  // NCCL where every rank has its own GPU (and the build has it), else MPI; TITANAX_COMM overrides.
  s.world = s.mpi ? make_device_communicator(mpi::world(), s.device) : make_local_communicator();

  if (opts.threads > 0) {
    s.threads = opts.threads;
    omp_set_num_threads(s.threads);
  } else if (std::getenv("OMP_NUM_THREADS")) {
    s.threads = omp_get_max_threads();  // the user's explicit choice wins
  } else {
    unsigned hw = std::thread::hardware_concurrency();
    s.threads = std::max(1, int(hw) / std::max(1, s.local_size));
    omp_set_num_threads(s.threads);
  }
  s.opts = opts;
  s.ready = true;
  spdlog::debug("runtime: {} rank(s), local {}/{}, device {}, {} thread(s), backend {}", s.size, s.local_rank,
                s.local_size, s.device.str(), s.threads, s.world->backend());
}

}  // namespace

Runtime::Runtime(int& argc, char**& argv, RuntimeOptions opts) { init_state(&argc, &argv, opts); }
Runtime::Runtime(RuntimeOptions opts) { init_state(nullptr, nullptr, opts); }
Runtime::~Runtime() = default;

int Runtime::rank() const { return state().rank; }
int Runtime::world_size() const { return state().size; }
int Runtime::local_rank() const { return state().local_rank; }
int Runtime::local_size() const { return state().local_size; }
Device Runtime::device() const { return state().device; }
std::shared_ptr<Communicator> Runtime::world() const { return state().world; }

Runtime& Runtime::instance() {
  static Runtime* rt = new Runtime();  // never destroyed; MPI is finalised by the atexit handler
  return *rt;
}

}  // namespace titanax
