// OpProfiler (core/profiler.h): per-op calls, times and output bytes of the ops applied at the top level.
#include <catch2/catch.hpp>

#include <titanax/titanax.h>

using namespace titanax;

namespace {
const OpProfiler::Entry* find(const std::vector<OpProfiler::Entry>& es, const std::string& op) {
  for (const auto& e : es)
    if (e.op == op) return &e;
  return nullptr;
}
}  // namespace

TEST_CASE("OpProfiler: counts top-level ops by name, with their output bytes", "[profiler]") {
  const Tensor a = ones(Shape{4, 8}), b = ones(Shape{8, 3});
  REQUIRE(OpProfiler::current() == nullptr);
  std::vector<OpProfiler::Entry> es;
  double total = 0;
  {
    OpProfiler prof;
    CHECK(OpProfiler::current() == &prof);
    CHECK_THROWS_AS(OpProfiler(), ValueError);  // one per thread
    const Tensor c = a + a;
    const Tensor d = c + a;
    const Tensor m = matmul(d, b);
    // A reshape of a transposed view copies inside the reshape op: one "reshape", no "copy" of its own.
    const Tensor r = a.T().reshape(Shape{32});
    CHECK(r.shape() == Shape{32});
    es = prof.entries();
    total = prof.total_seconds();
    const std::string t = prof.table(2);
    CHECK(t.find("op") != std::string::npos);
    CHECK(t.find("total") != std::string::npos);
    CHECK(t.find("more ops") != std::string::npos);  // 4 kinds of op, 2 shown
    CHECK_THROWS_AS(prof.table(20, 0), ValueError);
    prof.reset();
    CHECK(prof.entries().empty());
    CHECK(prof.total_seconds() == 0);
  }
  CHECK(OpProfiler::current() == nullptr);
  const OpProfiler::Entry* add = find(es, "add");
  const OpProfiler::Entry* mm = find(es, "matmul");
  const OpProfiler::Entry* rs = find(es, "reshape");
  REQUIRE(add);
  REQUIRE(mm);
  REQUIRE(rs);
  CHECK(add->calls == 2);
  CHECK(add->output_bytes == 2 * 32 * 4);
  CHECK(mm->calls == 1);
  CHECK(mm->output_bytes == 4 * 3 * 4);
  CHECK(rs->calls == 1);
  CHECK(find(es, "copy") == nullptr);
  CHECK(find(es, "permute") != nullptr);  // .T(): a view, still an op
  double sum = 0;
  for (size_t i = 0; i < es.size(); ++i) {
    CHECK(es[i].seconds >= 0);
    if (i > 0) CHECK(es[i - 1].seconds >= es[i].seconds);  // the most time first
    sum += es[i].seconds;
  }
  CHECK(sum == Approx(total));
}

TEST_CASE("ProfileRange: regions without ops (an optimizer's update) are recorded by name", "[profiler]") {
  { ProfileRange nothing("unprofiled", Device::cpu()); }  // no profiler: nothing to record into
  OpProfiler prof;
  { ProfileRange r("region", Device::cpu()); }
  { ProfileRange r("region", Device::cpu()); }
  // An eager AdamW step on the CPU updates each parameter through its kernel, not through apply().
  ParamTree params{{"w", ones(Shape{3, 2})}, {"b", zeros(Shape{2})}};
  const ParamTree grads{{"w", ones(Shape{3, 2})}, {"b", ones(Shape{2})}};
  auto opt = optim::adamw(optim::constant(1e-3));
  opt->init(params);
  prof.reset();
  { ProfileRange r("region", Device::cpu()); }
  opt->step(params, grads);
  const std::vector<OpProfiler::Entry> es = prof.entries();
  const OpProfiler::Entry* region = find(es, "region");
  const OpProfiler::Entry* update = find(es, "adamw_update");
  REQUIRE(region);
  REQUIRE(update);
  CHECK(region->calls == 1);
  CHECK(region->output_bytes == 0);
  CHECK(update->calls == 2);
  CHECK(find(es, "unprofiled") == nullptr);
}
