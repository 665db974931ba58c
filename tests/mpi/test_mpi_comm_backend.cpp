// make_device_communicator under mpirun on CPU ranks (parallel/nccl_communicator.h): the group keeps the
// MPI backend, TITANAX_COMM=nccl and ranks that disagree on TITANAX_COMM are errors on every rank (not a
// hang). The GPU side (NCCL, the shared-GPU fallback) is tests/cuda_mpi.
#include <catch2/catch.hpp>

#include <cstdlib>

#include "mpi_util.h"
#include "parallel/nccl_communicator.h"

using namespace titanax;
using namespace mpitest;
using Catch::Matchers::Contains;

namespace {

/// make_device_communicator over a fresh split of the world with TITANAX_COMM = value on this rank;
/// returns the CollectiveError's message and found text ("" when none was thrown) and the backend.
struct Outcome {
  std::string message, found, backend;
};
Outcome attempt(const char* value) {
  if (value) setenv("TITANAX_COMM", value, 1);
  else unsetenv("TITANAX_COMM");
  Outcome o;
  try {
    auto group = rt().world()->split(0, world_rank());
    o.backend = make_device_communicator(group, Device::cpu())->backend();
  } catch (const CollectiveError& e) {
    o.message = e.message();
    o.found = e.found();
  }
  unsetenv("TITANAX_COMM");
  return o;
}

}  // namespace

TEST_CASE("CPU ranks keep the MPI backend whatever TITANAX_COMM allows", "[mpi]") {
  if (world_size() == 1 && rt().world()->backend() == "local") return;  // not under mpirun
  for (const char* v : {(const char*)nullptr, "auto", "mpi"}) {
    Outcome o = attempt(v);
    CHECK(o.message.empty());
    CHECK(o.backend == "mpi");
  }
}

TEST_CASE("TITANAX_COMM=nccl on CPU ranks is an error on every rank", "[mpi]") {
  if (world_size() == 1 && rt().world()->backend() == "local") return;
  Outcome o = attempt("nccl");
  CHECK_THAT(o.message, Contains("TITANAX_COMM=nccl"));
  CHECK_THAT(o.found, Contains(nccl_built() ? "compute on the CPU" : "built without NCCL"));
  CHECK(all_ranks(!o.message.empty()));
}

TEST_CASE("ranks that disagree on TITANAX_COMM get the same error", "[mpi]") {
  if (world_size() < 2) return;
  Outcome o = attempt(world_rank() == 0 ? "mpi" : "auto");
  CHECK_THAT(o.message, Contains("disagree on TITANAX_COMM"));
  CHECK_THAT(o.found, Contains("rank 0: mpi"));
  CHECK_THAT(o.found, Contains("rank 1: auto"));
  CHECK(all_ranks(!o.message.empty()));
}
