// The choice between the NCCL and MPI backends for a group (every build): see nccl_communicator.h. The
// NCCL communicator itself is in cuda_nccl_communicator.cpp (no_nccl.cpp in builds without it).
#include "parallel/nccl_communicator.h"

#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <map>

#include "core/error.h"

namespace titanax {
namespace {

std::string ranks_str(const std::vector<int>& r) {
  std::vector<std::string> s;
  for (int x : r) s.push_back(std::to_string(x));
  return (r.size() > 1 ? "ranks " : "rank ") + join(s);
}

std::string host_name() {
  char buf[HOST_NAME_MAX + 1] = {};
  if (gethostname(buf, sizeof buf - 1) != 0) return "unknown-host";
  return buf;
}

}  // namespace

CollectiveBackendChoice choose_collective_backend(const std::vector<std::string>& ids) {
  if (ids.empty()) return {"mpi", "the group is empty", {}};
  std::vector<int> cpu;
  std::vector<std::string> order;  // distinct identities in order of first appearance
  std::map<std::string, std::vector<int>> by_id;
  for (int r = 0; r < int(ids.size()); ++r) {
    const std::string& id = ids[size_t(r)];
    if (id.rfind("cpu", 0) == 0) {
      cpu.push_back(r);
      continue;
    }
    if (!by_id.count(id)) order.push_back(id);
    by_id[id].push_back(r);
  }
  if (!cpu.empty())
    return {"mpi", ranks_str(cpu) + " of " + std::to_string(ids.size()) + " compute" + (cpu.size() > 1 ? "" : "s") +
                       " on the CPU (NCCL serves GPU tensors only)", {}};
  CollectiveBackendChoice c{"nccl", "each of the " + std::to_string(ids.size()) + " ranks has its own GPU", {}};
  std::vector<std::string> parts;
  for (const auto& id : order)
    if (by_id[id].size() > 1) {
      c.shared.push_back(by_id[id]);
      parts.push_back(ranks_str(by_id[id]) + " share GPU " + id);
    }
  if (!c.shared.empty()) {
    c.backend = "mpi";
    c.reason = join(parts, "; ") + " (NCCL needs one GPU per rank)";
  }
  return c;
}

std::string requested_collective_backend() {
  const char* v = std::getenv("TITANAX_COMM");
  const std::string s = v ? v : "";
  if (s.empty() || s == "auto") return "auto";
  if (s == "mpi" || s == "nccl") return s;
  const std::vector<std::string> known{"auto", "mpi", "nccl"};
  throw ValueError("TITANAX_COMM='" + s + "' is not a collective backend", "auto, mpi or nccl (or unset)", "'" + s + "'",
                   did_you_mean(s, known));
}

std::string device_identity(Device device) {
  if (device.is_cpu()) return "cpu@" + host_name();
  return detail::gpu_identity(device.index) + "@" + host_name();
}

std::shared_ptr<Communicator> make_device_communicator(std::shared_ptr<Communicator> mpi_group, Device device) {
  if (!mpi_group)
    throw InternalError("make_device_communicator without a communicator", "an MPI communicator", "nullptr");
  const std::string policy = requested_collective_backend();
  // One exchange tells every rank everyone's request and device, so all ranks take the same branch below.
  const std::vector<std::string> all = mpi_group->all_gather_string(policy + "|" + device_identity(device));
  std::vector<std::string> policies, ids;
  for (const auto& e : all) {
    const auto bar = e.find('|');
    policies.push_back(e.substr(0, bar));
    ids.push_back(e.substr(bar + 1));
  }
  if (std::any_of(policies.begin(), policies.end(), [&](const std::string& p) { return p != policies[0]; })) {
    std::vector<std::string> parts;
    for (size_t r = 0; r < policies.size(); ++r) parts.push_back("rank " + std::to_string(r) + ": " + policies[r]);
    throw CollectiveError("the ranks of one group disagree on TITANAX_COMM", "the same TITANAX_COMM on every rank",
                          join(parts, ", "), "export TITANAX_COMM to every rank (mpirun -x TITANAX_COMM=...)");
  }
  if (policy == "mpi") return mpi_group;
  const bool any_gpu = std::any_of(ids.begin(), ids.end(), [](const std::string& id) { return id.rfind("cpu", 0) != 0; });

  CollectiveBackendChoice c = nccl_built() ? choose_collective_backend(ids)
                                           : CollectiveBackendChoice{"mpi", "this Titanax was built without NCCL", {}};
  bool log_fallback = !c.shared.empty() || (any_gpu && !nccl_built());
  if (c.backend == "nccl") {
    std::string why;
    if (auto comm = detail::make_nccl_communicator(mpi_group, device.index, &why)) return comm;
    c = {"mpi", why, {}};
    log_fallback = true;
  }
  if (policy == "nccl")
    throw CollectiveError("TITANAX_COMM=nccl, but NCCL cannot serve this group of " +
                              std::to_string(mpi_group->size()) + " rank(s)",
                          "one GPU per rank and a build with NCCL", c.reason,
                          "run one rank per GPU (mpirun -np <number of GPUs>), build with the cuda preset on a "
                          "machine with NCCL, or unset TITANAX_COMM to fall back to MPI");
  if (log_fallback && mpi_group->rank() == 0)
    spdlog::warn("collectives of this {}-rank group go through host memory (MPI backend), not NCCL: {}",
                 mpi_group->size(), c.reason);
  else
    spdlog::debug("collective backend mpi for a {}-rank group: {}", mpi_group->size(), c.reason);
  // Where some rank computes on a GPU, sub-groups decide again on split() (they may have one GPU each).
  if (any_gpu && nccl_built()) return std::make_shared<detail::MpiGroupCommunicator>(mpi_group, device);
  return mpi_group;
}

}  // namespace titanax
