// The choice between the NCCL and MPI backends (parallel/nccl_communicator.h) without a GPU or mpirun:
// the pure decision over device identities, TITANAX_COMM parsing, and make_device_communicator over a
// one-rank group (what it can decide without NCCL).
#include <catch2/catch.hpp>

#include <cstdlib>

#include "test_util.h"

#include "parallel/nccl_communicator.h"

using namespace titanax;
using Catch::Matchers::Contains;
using testing::catch_error;

namespace {

/// Sets TITANAX_COMM for a scope (unset when `value` is null), restoring the previous value.
struct CommEnv {
  std::string prev;
  bool had = false;
  explicit CommEnv(const char* value) {
    if (const char* p = std::getenv("TITANAX_COMM")) prev = p, had = true;
    if (value) setenv("TITANAX_COMM", value, 1);
    else unsetenv("TITANAX_COMM");
  }
  ~CommEnv() {
    if (had) setenv("TITANAX_COMM", prev.c_str(), 1);
    else unsetenv("TITANAX_COMM");
  }
};

}  // namespace

TEST_CASE("collective backend: one GPU per rank chooses nccl", "[parallel][nccl]") {
  auto c = choose_collective_backend({"GPU-aaaa@node1", "GPU-bbbb@node1", "GPU-aaaa@node2", "GPU-bbbb@node2"});
  CHECK(c.backend == "nccl");
  CHECK(c.shared.empty());
  CHECK_THAT(c.reason, Contains("4 ranks has its own GPU"));
  CHECK(choose_collective_backend({"GPU-aaaa@node1"}).backend == "nccl");  // one rank: NCCL serves it too
}

TEST_CASE("collective backend: two ranks sharing a GPU fall back to mpi", "[parallel][nccl]") {
  auto c = choose_collective_backend({"GPU-aaaa@node1", "GPU-aaaa@node1"});
  CHECK(c.backend == "mpi");
  REQUIRE(c.shared.size() == 1);
  CHECK(c.shared[0] == std::vector<int>{0, 1});
  CHECK_THAT(c.reason, Contains("ranks 0, 1 share GPU GPU-aaaa@node1"));

  // 4 ranks on 2 GPUs (local_rank % gpus): both GPUs are shared, each listed with its ranks.
  c = choose_collective_backend({"GPU-aaaa@n", "GPU-bbbb@n", "GPU-aaaa@n", "GPU-bbbb@n"});
  CHECK(c.backend == "mpi");
  CHECK(c.shared == std::vector<std::vector<int>>{{0, 2}, {1, 3}});
  CHECK_THAT(c.reason, Contains("ranks 0, 2 share GPU GPU-aaaa@n"));
  CHECK_THAT(c.reason, Contains("ranks 1, 3 share GPU GPU-bbbb@n"));

  // The same UUID on different hosts is not sharing (the identity includes the host).
  CHECK(choose_collective_backend({"GPU-aaaa@n1", "GPU-aaaa@n2"}).backend == "nccl");
  // Only one of three shared.
  c = choose_collective_backend({"GPU-a@n", "GPU-b@n", "GPU-b@n"});
  CHECK(c.backend == "mpi");
  CHECK(c.shared == std::vector<std::vector<int>>{{1, 2}});
}

TEST_CASE("collective backend: a CPU rank means mpi", "[parallel][nccl]") {
  auto c = choose_collective_backend({"GPU-aaaa@n", "cpu@n"});
  CHECK(c.backend == "mpi");
  CHECK(c.shared.empty());
  CHECK_THAT(c.reason, Contains("rank 1 of 2 computes on the CPU"));
  CHECK(choose_collective_backend({"cpu@n", "cpu@n"}).backend == "mpi");  // CPU ranks never "share a GPU"
  CHECK(choose_collective_backend({"cpu@n", "cpu@n"}).shared.empty());
  CHECK(choose_collective_backend({}).backend == "mpi");
}

TEST_CASE("TITANAX_COMM parsing", "[parallel][nccl]") {
  {
    CommEnv e(nullptr);
    CHECK(requested_collective_backend() == "auto");
  }
  {
    CommEnv e("");
    CHECK(requested_collective_backend() == "auto");
  }
  for (const char* v : {"auto", "mpi", "nccl"}) {
    CommEnv e(v);
    CHECK(requested_collective_backend() == v);
  }
  CommEnv e("ncl");
  auto err = catch_error<ValueError>([] { requested_collective_backend(); });
  CHECK_THAT(err.message(), Contains("TITANAX_COMM='ncl'"));
  CHECK_THAT(err.suggestion(), Contains("nccl"));
}

TEST_CASE("device identity names the host", "[parallel][nccl]") {
  const std::string id = device_identity(Device::cpu());
  CHECK(id.rfind("cpu@", 0) == 0);
  CHECK(id.size() > 4);
}

TEST_CASE("make_device_communicator over a one-rank CPU group", "[parallel][nccl]") {
  auto local = make_local_communicator();
  {
    CommEnv e(nullptr);  // auto: a CPU rank keeps the group's own communicator
    CHECK(make_device_communicator(local, Device::cpu()).get() == local.get());
  }
  {
    CommEnv e("mpi");
    CHECK(make_device_communicator(local, Device::cpu()).get() == local.get());
  }
  {
    CommEnv e("nccl");  // impossible on the CPU: an error saying why
    auto err = catch_error<CollectiveError>([&] { make_device_communicator(local, Device::cpu()); });
    CHECK_THAT(err.message(), Contains("TITANAX_COMM=nccl"));
    CHECK_THAT(err.found(), Contains(nccl_built() ? "computes on the CPU" : "built without NCCL"));
  }
  {
    CommEnv e("bogus");
    CHECK_THROWS_AS(make_device_communicator(local, Device::cpu()), ValueError);
  }
  CHECK_THROWS_AS(make_device_communicator(nullptr, Device::cpu()), InternalError);
}

TEST_CASE("a CPU build has no NCCL factory", "[parallel][nccl]") {
  if (nccl_built()) return;  // a CUDA build with NCCL: tests/cuda_mpi covers the real one
  std::string why;
  CHECK(detail::make_nccl_communicator(make_local_communicator(), 0, &why) == nullptr);
  CHECK_THAT(why, Contains("without NCCL"));
}
