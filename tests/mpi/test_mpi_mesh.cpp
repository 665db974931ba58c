// Runtime and mesh construction under mpirun, including errors raised on every rank.
#include <catch2/catch.hpp>

#include <cstdlib>

#include "mpi_util.h"

using namespace titanax;
using namespace mpitest;
using Catch::Matchers::Contains;

TEST_CASE("runtime sees the mpirun world", "[mpi]") {
  Runtime& r = rt();
  if (const char* ws = std::getenv("OMPI_COMM_WORLD_SIZE")) {
    CHECK(r.world_size() == std::atoi(ws));
    CHECK(r.rank() == std::atoi(std::getenv("OMPI_COMM_WORLD_RANK")));
    CHECK(r.world()->backend() == "mpi");
  } else {
    CHECK(r.world_size() == 1);
    CHECK(r.world()->backend() == "local");
  }
  if (const char* ls = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE")) {  // one node in CI: local == world
    CHECK(r.local_size() == std::atoi(ls));
    CHECK(r.local_rank() == std::atoi(std::getenv("OMPI_COMM_WORLD_LOCAL_RANK")));
  }
  CHECK(r.device() == Device::cpu());
  CHECK(r.world()->rank() == r.rank());
  CHECK(r.world()->size() == r.world_size());
  Runtime again;  // shares the process state
  CHECK(again.world().get() == r.world().get());
}

TEST_CASE("meshes that do not fit the world fail on every rank", "[mpi]") {
  const int n = world_size();
  auto msg = [](const MeshSpec& spec) {
    try {
      spec.build(rt());
    } catch (const MeshError& e) {
      return e.message();
    }
    return std::string();
  };
  CHECK(msg(MeshSpec{{"data"}, {n + 1}}) ==
        "mesh {data: " + std::to_string(n + 1) + "} does not divide " + std::to_string(n) + " ranks");
  CHECK_THAT(msg(MeshSpec{{"data", "model"}, {-1, -1}}), Contains("two axes of size -1"));
  if (n > 1) CHECK_THAT(msg(MeshSpec{{"data"}, {1}}), Contains("covers 1 of"));
  // Everyone still in step.
  CHECK(world_sum(1.0) == double(n));
}

TEST_CASE("ranks building different meshes fail on every rank", "[mpi]") {
  const int r = world_rank(), n = world_size();
  if (n == 1) return;
  std::string err;
  try {
    MeshSpec spec = r == 0 ? MeshSpec{{"data"}, {-1}} : MeshSpec{{"dp"}, {-1}};
    spec.build(rt());
  } catch (const MeshError& e) {
    err = e.what();
  }
  CHECK_THAT(err, Contains("ranks built different meshes"));
  CHECK_THAT(err, Contains("rank 0: {data: " + std::to_string(n) + "}"));
  // A spec valid on some ranks only (rank 0 asks for more ranks than exist).
  err.clear();
  try {
    MeshSpec spec = r == 0 ? MeshSpec{{"data"}, {n + 1}} : MeshSpec{{"data"}, {-1}};
    spec.build(rt());
  } catch (const MeshError& e) {
    err = e.what();
  }
  CHECK_THAT(err, Contains("ranks built different meshes"));
  CHECK(world_sum(1.0) == double(n));
}

TEST_CASE("mesh describe and unknown axes under MPI", "[mpi]") {
  const int r = world_rank(), n = world_size();
  for (const auto& mc : mesh_cases()) {
    std::vector<int> spec_shape = mc.shape;
    spec_shape.back() = -1;  // inferred
    Mesh mesh = MeshSpec{mc.axes, spec_shape}.build(rt());
    CHECK(mesh.shape() == mc.shape);
    CHECK(mesh.size() == n);
    CHECK(mesh.rank() == r);
    CHECK_THAT(mesh.describe(), Contains("over " + std::to_string(n) + " rank"));
    CHECK_THAT(mesh.describe(), Contains(n > 1 ? "(mpi)" : "rank 0"));
    auto& cur = Mesh::current();
    CHECK(cur.shape() == mc.shape);
    try {
      psum(ones(Shape{1}), "modle");
      FAIL("no error");
    } catch (const MeshError& e) {
      CHECK_THAT(e.message(), Contains(mc.axes.size() == 2 ? "did you mean 'model'?" : "is not in the mesh"));
    }
  }
}
