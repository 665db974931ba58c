// Checkpoints saved by several processes under one layout and loaded under others (resharding), with
// every element checked against the function of its global index (tests/reshard_util.h).
#include <catch2/catch.hpp>

#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "io/checkpoint.h"
#include "mpi_util.h"
#include "reshard_util.h"

using namespace titanax;
using namespace mpitest;
using namespace reshard_test;
namespace fs = std::filesystem;

namespace {

Pos pos_of(const Mesh& m) { return Pos{m.axes(), m.shape(), m.coords(), m.rank()}; }

// Loads `step` as the ranks v = world_rank(), + world_size(), ... of target `t` and checks every element.
void check_virtual(const Checkpointer& ck, int64_t step, const std::vector<GlobalT>& gs, const Target& t) {
  INFO("target " << t.what);
  for (int v = world_rank(); v < mesh_size(t.shape); v += world_size()) {
    INFO("as rank " << v);
    Pos p = pos_at(t.axes, t.shape, v);
    ParamTree into = zeros_tree(gs, t.specs, p);
    ck.load(step, into, t.specs, coords_of(p));
    CHECK(check_tree(into, gs, t.specs, p) == "");
  }
}

nlohmann::json read_meta(const fs::path& p) {
  std::ifstream in(p);
  return nlohmann::json::parse(in);
}

}  // namespace

TEST_CASE("a TP 2 checkpoint saved by two processes loads under any mesh and world size", "[mpi][checkpoint]") {
  const int n = world_size(), r = world_rank();
  if (n < 2) return;
  SharedDir d;
  const auto gs = standard_tensors();
  // Ranks 0 and 1 save as {model: 2}; with more ranks the others form a group that saves nothing here.
  auto group = rt().world()->split(r < 2 ? 0 : 1, r);
  std::string err;
  if (r < 2) {
    try {
      Checkpointer ck(d.path.string(), 3, group);
      ck.save(5, local_tree(gs, tp_specs(), pos_at({"model"}, {2}, r)), R"({"epoch": 1})", tp_specs(),
              R"({"model": 2})");
    } catch (const std::exception& e) {
      err = e.what();
    }
  }
  CHECK(err == "");
  REQUIRE(all_ranks(err.empty()));

  Checkpointer ck(d.path.string());  // loading is not collective; no communicator needed
  CHECK(ck.latest() == 5);
  // Every rank of every target layout, spread over the processes.
  for (const auto& t : standard_targets()) check_virtual(ck, 5, gs, t);

  // Real meshes over the world: TP n, DP 2 x TP n/2, DP n (replicated).
  struct Real {
    MeshSpec spec;
    std::map<std::string, PartitionSpec> specs;
  };
  std::vector<Real> reals{{MeshSpec{{"model"}, {n}}, tp_specs()}, {MeshSpec{{"data"}, {n}}, {}}};
  if (n % 2 == 0) reals.push_back({MeshSpec{{"data", "model"}, {2, n / 2}}, tp_specs()});
  for (const auto& real : reals) {
    Mesh m = real.spec.build(rt());
    INFO(m.describe());
    Pos p = pos_of(m);
    ParamTree into = zeros_tree(gs, real.specs, p);
    CheckpointInfo info = ck.load(5, into, real.specs, m);
    CHECK(check_tree(into, gs, real.specs, p) == "");
    CHECK(info.world_size == 2);
    CHECK(nlohmann::json::parse(info.extra_json)["epoch"] == 1);
    // A model that is not the checkpoint's fails on every rank with the same error.
    into.insert("extra/w", zeros(Shape{2}));
    try {
      ck.load(5, into, real.specs, m);
      FAIL("expected CheckpointError");
    } catch (const CheckpointError& e) {
      CHECK_THAT(e.what(), Catch::Matchers::Contains("'extra/w' is missing"));
      CHECK_THAT(e.what(), Catch::Matchers::Contains("metadata.json"));
    }
  }
  // A same-layout load needs the saving world size.
  if (n != 2) {
    ParamTree into = zeros_tree(gs, tp_specs(), pos_at({"model"}, {2}, r % 2));
    Checkpointer world_ck(d.path.string(), 3, rt().world());
    CHECK_THROWS_WITH(world_ck.load(5, into), Catch::Matchers::Contains("another number of ranks"));
  }
  CHECK(all_ranks(true));
}

TEST_CASE("a DP x TP checkpoint saved with the Mesh resumes bitwise and reshards to TP, DP and one rank",
          "[mpi][checkpoint]") {
  const int n = world_size(), r = world_rank();
  if (n < 2 || n % 2) return;
  SharedDir d;
  const auto gs = standard_tensors();
  Mesh m = MeshSpec{{"data", "model"}, {2, n / 2}}.build(rt());
  const Pos me = pos_of(m);
  ParamTree mine = local_tree(gs, tp_specs(), me);
  Checkpointer ck(d.path.string(), 3, rt().world());
  ck.save(7, mine, tp_specs(), m, R"({"loader": 7})", R"({"dp": "data", "tp": "model"})");

  // Metadata: each rank's coordinates; every block written once (w and v: n / 2 each, b, s), and the
  // replicas share the writing: every rank writes some block.
  auto meta = read_meta(d.path / "step_00000007" / "metadata.json");
  CHECK(meta["layout"]["axes"] == nlohmann::json::array({"data", "model"}));
  CHECK(meta["shards"][size_t(r)]["coords"] == nlohmann::json::array({me.coords[0], me.coords[1]}));
  size_t entries = 0;
  int writing = 0;
  for (const auto& sh : meta["shards"]) {
    entries += sh["tensors"].size();
    writing += sh["tensors"].empty() ? 0 : 1;
  }
  CHECK(entries == size_t(n + 2));
  CHECK(writing == n);

  // Resume with the same layout: bitwise.
  ParamTree back = zeros_tree(gs, tp_specs(), me);
  ck.load(7, back);
  CHECK(check_tree(back, gs, tp_specs(), me) == "");
  for (const auto& [name, t] : mine)
    CHECK(t.astype(DType::f64).to_vector<double>() == back.at(name).astype(DType::f64).to_vector<double>());

  // TP n and DP n over the world, then one rank.
  for (const auto& [spec, specs] : std::vector<std::pair<MeshSpec, std::map<std::string, PartitionSpec>>>{
           {MeshSpec{{"model"}, {n}}, tp_specs()}, {MeshSpec{{"data"}, {n}}, {}}}) {
    Mesh t = spec.build(rt());
    Pos p = pos_of(t);
    ParamTree into = zeros_tree(gs, specs, p);
    ck.load(7, into, specs, t);
    CHECK(check_tree(into, gs, specs, p) == "");
  }
  Pos one = pos_at({"model"}, {1}, 0);
  ParamTree whole = zeros_tree(gs, tp_specs(), one);
  CheckpointInfo info = ck.load(7, whole, tp_specs(), coords_of(one));
  CHECK(check_tree(whole, gs, tp_specs(), one) == "");
  CHECK(info.files_read == writing);  // every file holds some block it needs
  for (const auto& t : standard_targets()) check_virtual(Checkpointer(d.path.string()), 7, gs, t);
  CHECK(all_ranks(true));
}

TEST_CASE("each rank reads about its share of a resharded tensor", "[mpi][checkpoint]") {
  const int n = world_size(), r = world_rank();
  if (n < 2) return;
  // A [128, 256] f32 tensor (128 KiB) saved as TP 2 by ranks 0 and 1, loaded as TP n: 1/n each.
  const std::vector<GlobalT> gs{{"x", 4, {128, 256}, DType::f32}};
  const uint64_t total = 128 * 256 * 4;
  auto group = rt().world()->split(r < 2 ? 0 : 1, r);
  for (int dim : {0, 1}) {
    INFO("split along dim " << dim);
    SharedDir d;
    const std::map<std::string, PartitionSpec> specs{{"x", dim == 0 ? PartitionSpec{"model", ""} : PartitionSpec{"", "model"}}};
    if (r < 2) {
      Checkpointer ck(d.path.string(), 3, group);
      // Chunks no longer than the runs a TP-n slice is made of (a row of 256 / n floats along dim 1).
      ck.set_crc_chunk_bytes(dim == 0 ? 4096 : uint64_t(256 / n * 4));
      ck.save(1, local_tree(gs, specs, pos_at({"model"}, {2}, r)), "{}", specs, R"({"model": 2})");
    }
    rt().world()->barrier();
    Mesh m = MeshSpec{{"model"}, {n}}.build(rt());
    Pos p = pos_of(m);
    ParamTree into = zeros_tree(gs, specs, p);
    CheckpointInfo info = Checkpointer(d.path.string()).load(1, into, specs, m);
    CHECK(check_tree(into, gs, specs, p) == "");
    CHECK(info.bytes_needed == total / uint64_t(n));
    CHECK(info.data_bytes_read == total / uint64_t(n));
    CHECK(info.files_read == 1);
    CHECK(world_sum(double(info.data_bytes_read)) == double(total));  // the tensor read once in all
  }
}

TEST_CASE("a failure on one rank fails prepare() and save() on every rank, naming it", "[mpi][checkpoint]") {
  const int n = world_size(), r = world_rank();
  if (n < 2) return;
  SharedDir d;
  // Under a regular file the directory cannot be created: rank 0 reports the system's reason, every
  // other rank a CheckpointError naming rank 0 (before, only rank 0 knew, at the first save).
  if (r == 0) std::ofstream(d.path / "file") << "x";
  rt().world()->barrier();
  Checkpointer bad((d.path / "file" / "ck").string(), 2, rt().world());
  try {
    bad.prepare();
    FAIL("expected an error from prepare()");
  } catch (const CheckpointError& e) {
    CHECK(r != 0);
    CHECK_THAT(e.what(), Catch::Matchers::Contains("preparing checkpoint directory") &&
                             Catch::Matchers::Contains("rank 0: IOError: cannot create checkpoint directory"));
  } catch (const IOError& e) {
    CHECK(r == 0);
    CHECK_THAT(e.what(), Catch::Matchers::Contains("Not a directory"));
  }
  // prepare() on a good path creates it; a save whose tensor is undefined on the last rank fails there
  // with its own error and on the others with a CheckpointError naming it, and leaves no step behind.
  Checkpointer good((d.path / "ck").string(), 2, rt().world());
  good.prepare();
  CHECK(fs::is_directory(d.path / "ck"));
  CHECK(std::distance(fs::directory_iterator(d.path / "ck"), fs::directory_iterator()) == 0);  // the probe is gone
  rt().world()->barrier();  // every rank has looked before rank 0 starts the save's .tmp directory
  ParamTree mine{{"w", r == n - 1 ? Tensor() : zeros(Shape{2})}};
  try {
    good.save(3, mine);
    FAIL("expected an error from save()");
  } catch (const CheckpointError& e) {
    CHECK(r != n - 1);
    CHECK_THAT(e.what(), Catch::Matchers::Contains("saving checkpoint step 3 failed on another rank (prepare)") &&
                             Catch::Matchers::Contains("rank " + std::to_string(n - 1) + ": "));
  } catch (const ValueError& e) {
    CHECK(r == n - 1);
    CHECK_THAT(e.what(), Catch::Matchers::Contains("'w' is undefined"));
  }
  rt().world()->barrier();
  CHECK(good.steps().empty());
  CHECK_FALSE(fs::exists(d.path / "ck" / "step_00000003.tmp"));
  CHECK(all_ranks(true));
}
