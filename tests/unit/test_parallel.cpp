// parallel/ without mpirun: mesh resolution and errors, plans, the local communicator, the collectives
// on a one-rank mesh (identity) and their vjps, gradient averaging on one rank.
#include <catch2/catch.hpp>

#include "test_util.h"
#include <nlohmann/json.hpp>

#include "op_cases.h"
#include "parallel/collectives.h"
#include "parallel/dp.h"
#include "parallel/mesh.h"
#include "parallel/plan.h"
#include "parallel/runtime.h"

using namespace titanax;
using Catch::Matchers::Contains;

namespace {

Mesh local_mesh(std::vector<std::string> axes = {"data"}, std::vector<int> shape = {-1}) {
  return MeshSpec{std::move(axes), std::move(shape)}.build(make_local_communicator());
}

std::vector<double> vals(const Tensor& t) { return t.to_vector<double>(); }

Tensor seq(const Shape& s, double start = 1.0) {
  std::vector<double> v(size_t(s.numel()));
  for (size_t i = 0; i < v.size(); ++i) v[i] = start + double(i);
  return from_vector(v, s);
}

using testing::catch_error;

}  // namespace

// ------------------------------------------------------------------------------------------ MeshSpec

TEST_CASE("MeshSpec::resolve infers the -1 axis", "[parallel]") {
  CHECK(MeshSpec{{"data"}, {-1}}.resolve(4) == std::vector<int>{4});
  CHECK(MeshSpec{{"data", "model"}, {2, -1}}.resolve(8) == std::vector<int>{2, 4});
  CHECK(MeshSpec{{"a", "b", "c"}, {1, -1, 2}}.resolve(6) == std::vector<int>{1, 3, 2});
  CHECK(MeshSpec{{"data", "model"}, {2, 2}}.resolve(4) == std::vector<int>{2, 2});
  CHECK(MeshSpec{{"data"}, {-1}}.resolve(1) == std::vector<int>{1});
  CHECK(MeshSpec{{"data", "model"}, {2, -1}}.describe() == "{data: 2, model: -1}");
}

TEST_CASE("MeshSpec::resolve errors", "[parallel]") {
  auto e = catch_error<MeshError>([] { MeshSpec{{"data"}, {3}}.resolve(4); });
  CHECK(e.message() == "mesh {data: 3} does not divide 4 ranks");
  CHECK_THAT(e.suggestion(), Contains("-1"));
  CHECK(e.location().line() == __LINE__ - 3);  // reported at the caller's line

  e = catch_error<MeshError>([] { MeshSpec{{"data", "model"}, {3, -1}}.resolve(4); });
  CHECK(e.message() == "mesh {data: 3, model: -1} does not divide 4 ranks");
  CHECK_THAT(e.suggestion(), Contains("multiple of 3"));

  e = catch_error<MeshError>([] { MeshSpec{{"data"}, {2}}.resolve(4); });
  CHECK_THAT(e.message(), Contains("covers 2 of 4 ranks"));

  e = catch_error<MeshError>([] { MeshSpec{{"data", "model"}, {-1, -1}}.resolve(4); });
  CHECK_THAT(e.message(), Contains("two axes of size -1"));

  e = catch_error<MeshError>([] { MeshSpec{{"data", "model"}, {0, -1}}.resolve(4); });
  CHECK_THAT(e.message(), Contains("axis 'data' has size 0"));

  e = catch_error<MeshError>([] { MeshSpec{{"data", "data"}, {2, 2}}.resolve(4); });
  CHECK_THAT(e.message(), Contains("names axis 'data' twice"));

  e = catch_error<MeshError>([] { MeshSpec{{"data", ""}, {2, 2}}.resolve(4); });
  CHECK_THAT(e.message(), Contains("empty axis name"));

  e = catch_error<MeshError>([] { MeshSpec{{"data", "model"}, {4}}.resolve(4); });
  CHECK_THAT(e.message(), Contains("2 axis names but 1 sizes"));

  e = catch_error<MeshError>([] { MeshSpec{{}, {}}.resolve(1); });
  CHECK_THAT(e.message(), Contains("at least one axis"));
}

// ------------------------------------------------------------------------------------------ Mesh

TEST_CASE("a mesh on one rank", "[parallel]") {
  Mesh m = local_mesh({"data", "model"}, {-1, 1});
  CHECK(m.size() == 1);
  CHECK(m.rank() == 0);
  CHECK(m.axes() == std::vector<std::string>{"data", "model"});
  CHECK(m.shape() == std::vector<int>{1, 1});
  CHECK(m.axis_size("data") == 1);
  CHECK(m.axis_index("model") == 0);
  CHECK(m.comm("data").size() == 1);
  CHECK(m.comm("model").backend() == "local");
  CHECK(m.world().size() == 1);
  CHECK(m.has_axis("data"));
  CHECK_FALSE(m.has_axis("pipe"));
  CHECK(m.describe() == "mesh {data: 1, model: 1} over 1 rank (local); rank 0 at {data: 0, model: 0}");
  CHECK(Mesh::has_current());
  CHECK(Mesh::current().axes() == m.axes());

  // A mesh that needs more ranks than there are.
  auto e = catch_error<MeshError>([] { local_mesh({"data"}, {2}); });
  CHECK_THAT(e.message(), Contains("mesh {data: 2}"));
}

TEST_CASE("unknown mesh axes suggest the nearest", "[parallel]") {
  Mesh m = local_mesh({"data", "model"}, {1, 1});
  auto e = catch_error<MeshError>([&] { m.axis_size("dat"); });
  CHECK(e.message() == "axis 'dat' is not in the mesh; did you mean 'data'?");
  CHECK(e.expected() == "one of [data, model]");
  CHECK(e.location().line() == __LINE__ - 3);
  e = catch_error<MeshError>([&] { m.comm("modle"); });
  CHECK_THAT(e.message(), Contains("did you mean 'model'?"));
  e = catch_error<MeshError>([&] { m.check_axis("pipeline"); });
  CHECK(e.message() == "axis 'pipeline' is not in the mesh");
  CHECK_THAT(e.suggestion(), Contains("data"));
  e = catch_error<MeshError>([&] { m.axis_index("x"); });

  Mesh empty;
  CHECK(empty.size() == 0);
  e = catch_error<MeshError>([&] { empty.check_axis("data"); });
  CHECK_THAT(e.message(), Contains("empty"));
  CHECK_THROWS_AS(empty.world(), MeshError);
  MeshSpec spec{{"data"}, {-1}};
  CHECK_THROWS_AS(spec.build(std::shared_ptr<Communicator>()), MeshError);
}

// ------------------------------------------------------------------------------------------ Plan

TEST_CASE("Plan::validate", "[parallel]") {
  Mesh m = local_mesh({"data", "model"}, {1, 1});
  Plan ok{.dp = DP{"data", 2}};
  CHECK_NOTHROW(ok.validate(m));
  CHECK_NOTHROW(Plan{}.validate(m));

  auto e = catch_error<PlanError>([&] { Plan{.dp = DP{"dta"}}.validate(m); });
  CHECK(e.message() == "DP axis 'dta' is not in the mesh; did you mean 'data'?");
  CHECK_THAT(e.suggestion(), Contains("DP{.axis = \"data\"}"));
  CHECK(e.location().line() == __LINE__ - 3);

  e = catch_error<PlanError>([&] { Plan{.dp = DP{"pipe"}}.validate(m); });
  CHECK(e.message() == "DP axis 'pipe' is not in the mesh");
  CHECK(e.expected() == "one of [data, model]");

  e = catch_error<PlanError>([&] { Plan{.dp = DP{"data", 0}}.validate(m); });
  CHECK_THAT(e.message(), Contains("accumulate_steps"));
  CHECK(e.found() == "0");

  CHECK_NOTHROW(Plan{.dp = DP{"data", 1, true}, .tp = TP{"model"}}.validate(m));

  e = catch_error<PlanError>([&] { Plan{.dp = DP{""}}.validate(m); });
  CHECK_THAT(e.message(), Contains("empty axis"));

  e = catch_error<PlanError>([&] { Plan{.dp = DP{}}.validate(Mesh{}); });
  CHECK_THAT(e.message(), Contains("mesh is empty"));
}

TEST_CASE("Plan::describe and to_json", "[parallel]") {
  Plan p{.dp = DP{"data", 4}};
  CHECK_THAT(p.describe(), Contains("data parallel: axis 'data', gradients averaged every 4 steps"));
  CHECK_THAT(p.describe(), Contains("tensor parallel: off"));
  CHECK_THAT(Plan{}.describe(), Contains("data parallel: off"));
  Mesh m = local_mesh();
  CHECK_THAT(p.describe(m), Contains("averaged over 1 rank(s) on axis 'data'"));

  auto j = nlohmann::json::parse(p.to_json());
  CHECK(j["dp"]["axis"] == "data");
  CHECK(j["dp"]["accumulate_steps"] == 4);
  CHECK(j["dp"]["shard_optimizer"] == false);
  const Plan zero{.dp = DP{"data", 1, true}};
  CHECK_THAT(zero.describe(), Contains("optimizer state sharded over it (ZeRO-1)"));
  CHECK(nlohmann::json::parse(zero.to_json())["dp"]["shard_optimizer"] == true);
  CHECK(nlohmann::json::parse(Plan{}.to_json())["dp"].is_null());
}

// ------------------------------------------------------------------------------------------ Runtime

TEST_CASE("Runtime without mpirun is one local rank", "[parallel]") {
  Runtime& rt = Runtime::instance();
  CHECK(rt.rank() == 0);
  CHECK(rt.world_size() == 1);
  CHECK(rt.local_rank() == 0);
  CHECK(rt.local_size() == 1);
  CHECK(rt.is_main());
  CHECK(rt.device() == Device::cpu());
  CHECK(rt.world()->backend() == "local");
  Runtime second;  // shares the process state
  CHECK(second.world().get() == rt.world().get());
  CHECK_THROWS_AS(Runtime(RuntimeOptions{.device = "cuda"}), DeviceError);  // no GPU in this build
  CHECK_THROWS_AS(Runtime(RuntimeOptions{.device = "tpu"}), DeviceError);
  CHECK_THROWS_AS(Runtime(RuntimeOptions{.threads = -1}), ValueError);  // refused even when not applied
  auto e = catch_error<ValueError>([] { Runtime(RuntimeOptions{.log_level = "inf"}); });
  CHECK_THAT(e.suggestion(), Contains("info"));
  Mesh m = MeshSpec{{"data"}, {-1}}.build(rt);
  CHECK(m.size() == 1);
}

// ------------------------------------------------------------------------------------------ local communicator

TEST_CASE("local communicator semantics", "[parallel]") {
  auto c = make_local_communicator();
  CHECK(c->rank() == 0);
  CHECK(c->size() == 1);
  CHECK(c->backend() == "local");

  Tensor t = seq(Shape{2, 3});
  c->all_reduce(t);
  CHECK(vals(t) == std::vector<double>{1, 2, 3, 4, 5, 6});
  c->all_reduce(t, CollectiveOp::max);
  c->iall_reduce(t)->wait();
  CHECK(vals(t) == std::vector<double>{1, 2, 3, 4, 5, 6});
  Tensor b = zeros(Shape{2}, DType::bool_);
  CHECK_THROWS_AS(c->all_reduce(b), DTypeError);
  CHECK_THROWS_AS(c->all_reduce(t = Tensor()), ValueError);
  t = seq(Shape{2, 3});

  c->broadcast(t, 0);
  CHECK(vals(t) == std::vector<double>{1, 2, 3, 4, 5, 6});
  CHECK_THROWS_AS(c->broadcast(t, 1), CollectiveError);

  Tensor g = c->all_gather(t);
  CHECK(g.shape() == Shape{2, 3});
  fill_(t, 0.0);  // the result is a copy
  CHECK(vals(g) == std::vector<double>{1, 2, 3, 4, 5, 6});
  CHECK(c->all_gather(scalar(7.0, DType::f64)).shape() == Shape{1});

  Tensor rs = c->reduce_scatter(g);
  CHECK(vals(rs) == vals(g));
  CHECK_THROWS_AS(c->reduce_scatter(scalar(1.0)), CollectiveError);
  Tensor rs_out = full(Shape{2, 3}, -1.0, g.dtype());
  c->ireduce_scatter(g, rs_out)->wait();
  CHECK(vals(rs_out) == vals(g));
  Tensor rs_bad = zeros(Shape{3, 2}, g.dtype());
  CHECK_THROWS_AS(c->ireduce_scatter(g, rs_bad), CollectiveError);
  CHECK(vals(c->all_to_all(g)) == vals(g));

  CHECK(vals(c->sendrecv(g, -1, -1)) == std::vector<double>(6, 0.0));
  CHECK(vals(c->sendrecv(g, 0, 0)) == vals(g));
  CHECK(vals(c->sendrecv(g, 0, -1)) == std::vector<double>(6, 0.0));
  CHECK_THROWS_AS(c->sendrecv(g, -1, 0), CollectiveError);  // would block forever under MPI
  CHECK_THROWS_AS(c->sendrecv(g, 1, -1), CollectiveError);

  c->send(g, 0, 5);
  Tensor r = zeros(Shape{2, 3}, DType::f64);
  CHECK_THROWS_AS(c->recv(r, 0, 6), CollectiveError);  // nothing sent with tag 6
  c->recv(r, 0, 5);
  CHECK(vals(r) == vals(g));
  CHECK_THROWS_AS(c->recv(r, 0, 5), CollectiveError);
  c->send(g, 0, 1);
  Tensor wrong = zeros(Shape{4}, DType::f64);
  CHECK_THROWS_AS(c->recv(wrong, 0, 1), CollectiveError);

  c->barrier();
  CHECK(c->all_gather_string("hello") == std::vector<std::string>{"hello"});
  auto s = c->split(3, 0);
  CHECK(s->size() == 1);
  CHECK(s->rank() == 0);
  CHECK_THROWS_AS(c->split(-1, 0), CollectiveError);
}

// ------------------------------------------------------------------------------------------ collectives, one rank

TEST_CASE("collectives on a one-rank mesh are the identity", "[parallel]") {
  Mesh m = local_mesh({"data", "model"}, {1, 1});
  Tensor x = seq(Shape{2, 4});
  const auto xv = vals(x);
  CHECK(vals(psum(x, "data")) == xv);
  CHECK(vals(psum(m, x, "model")) == xv);
  CHECK(vals(pmean(x, "data")) == xv);
  CHECK(vals(pmax(x, "model")) == xv);
  CHECK(vals(all_gather(x, "data", 1)) == xv);
  CHECK(all_gather(x, "data", -1).shape() == Shape{2, 4});
  CHECK(vals(reduce_scatter(x, "data", 1)) == xv);
  CHECK(vals(broadcast(x, "data", 0)) == xv);
  CHECK(vals(ppermute(x, "data", {{0, 0}})) == xv);
  CHECK(vals(ppermute(x, "data", {})) == std::vector<double>(8, 0.0));
  CHECK(vals(all_to_all(x, "data", 0, 1)) == xv);
  CHECK(axis_index("data") == 0);
  CHECK(axis_size("model") == 1);
  // Strided inputs and other dtypes.
  CHECK(vals(psum(x.T(), "data")) == vals(x.T().contiguous()));
  CHECK(psum(x.astype(DType::i32), "data").dtype() == DType::i32);
  CHECK(vals(pmean(x.astype(DType::bf16), "data")) == xv);
  // The output never aliases the input.
  Tensor y = psum(x, "data");
  fill_(y, 0.0);
  CHECK(vals(x) == xv);
}

TEST_CASE("collective argument errors", "[parallel]") {
  Mesh m = local_mesh({"data"}, {-1});
  Tensor x = seq(Shape{2, 4});
  auto e = catch_error<MeshError>([&] { psum(x, "dat"); });
  CHECK(e.message() == "axis 'dat' is not in the mesh; did you mean 'data'?");
  CHECK(e.location().line() == __LINE__ - 2);  // the user's line
  CHECK_THROWS_AS(pmean(x, "model"), MeshError);
  CHECK_THROWS_AS(all_gather(x, "data", 2), ShapeError);
  CHECK_THROWS_AS(all_gather(scalar(1.0), "data"), ShapeError);
  CHECK_THROWS_AS(reduce_scatter(x, "data", -3), ShapeError);
  CHECK_THROWS_AS(all_to_all(x, "data", 0, 5), ShapeError);
  auto ce = catch_error<CollectiveError>([&] { broadcast(x, "data", 1); });
  CHECK_THAT(ce.message(), Contains("root out of range"));
  CHECK(ce.location().line() == __LINE__ - 2);
  ce = catch_error<CollectiveError>([&] { ppermute(x, "data", {{0, 1}}); });
  CHECK_THAT(ce.message(), Contains("out of range"));
  ce = catch_error<CollectiveError>([&] { ppermute(x, "data", {{0, 0}, {0, 0}}); });
  CHECK_THAT(ce.message(), Contains("appears twice"));
  CHECK_THROWS_AS(pmean(x.astype(DType::i64), "data"), DTypeError);
  CHECK_THROWS_AS(psum(zeros(Shape{2}, DType::bool_), "data"), DTypeError);
  CHECK_THROWS_AS(psum(Tensor(), "data"), ValueError);
}

TEST_CASE("collective vjps on one rank (gradcheck)", "[parallel]") {
  Mesh m = local_mesh({"data"}, {-1});
  using testing::randn64;
  Tensor x = randn64(RngKey::from_seed(11), Shape{2, 4});
  auto check = [&](const char* what, std::function<Tensor(const Tensor&)> f) {
    INFO(what);
    auto r = gradcheck([&](const TensorList& in) { return f(in[0]); }, {x});
    INFO(r.report);
    CHECK(r.ok);
  };
  check("psum", [](const Tensor& t) { return psum(t * t, "data"); });
  check("pmean", [](const Tensor& t) { return tanh(pmean(t, "data")); });
  check("pmax", [](const Tensor& t) { return pmax(t * 3.0, "data"); });
  check("all_gather", [](const Tensor& t) { return all_gather(t * t, "data", 1); });
  check("reduce_scatter", [](const Tensor& t) { return reduce_scatter(tanh(t), "data", 0); });
  check("broadcast", [](const Tensor& t) { return broadcast(t * t, "data", 0); });
  check("ppermute", [](const Tensor& t) { return ppermute(exp(t), "data", {{0, 0}}); });
  check("ppermute to nobody", [](const Tensor& t) { return ppermute(t, "data", {}) + t; });
  check("all_to_all", [](const Tensor& t) { return all_to_all(t * t, "data", 1, 0); });

  // Differentiating twice goes through the collectives' own vjps.
  Tensor v = x.detach().clone().set_requires_grad();
  BackwardOptions o;
  o.create_graph = true;
  Tensor d = grad(sum(psum(v * v * v, "data")), {v}, o)[0];  // 3 v^2
  Tensor d2 = grad(sum(d), {v})[0];                          // 6 v
  auto xv = vals(x), d2v = vals(d2);
  for (size_t i = 0; i < xv.size(); ++i) CHECK(d2v[i] == Approx(6 * xv[i]));
}

// ------------------------------------------------------------------------------------------ data parallel, one rank

TEST_CASE("GradientSync on one rank returns the gradients", "[parallel]") {
  Mesh m = local_mesh();
  ParamTree params{{"l1/w", ones(Shape{4, 3})},
                   {"l1/b", ones(Shape{3})},
                   {"step", zeros(Shape{1}, DType::i64)},
                   {"l2/w", ones(Shape{3, 2}, DType::bf16)},
                   {"l2/b", ones(Shape{2}, DType::f64)}};
  // Tiny buckets: every parameter gets its own (the first bucket is the last floating parameter).
  GradientSync gs(m, "data", params, /*bucket_bytes=*/8, /*first_bucket_bytes=*/8);
  CHECK(gs.axis_size() == 1);
  REQUIRE(gs.buckets().size() == 4);
  CHECK(gs.buckets()[0] == std::vector<size_t>{4});
  CHECK(gs.buckets()[3] == std::vector<size_t>{0});

  ParamTree grads = params.map([](const std::string&, const Tensor& t) {
    return is_floating(t.dtype()) ? seq(t.shape()).astype(t.dtype()) : t;
  });
  ParamTree out = gs.sync(grads);
  REQUIRE(out.paths() == params.paths());
  for (size_t i = 0; i < params.size(); ++i) {
    CHECK(out[i].second.dtype() == params[i].second.dtype());
    CHECK(vals(out[i].second) == vals(grads[i].second));
  }

  // Large buckets: everything floating fits in one after the small first bucket.
  GradientSync big(m, "data", params, 1 << 20, 8);
  CHECK(big.buckets().size() == 2);
  CHECK(big.buckets()[1] == std::vector<size_t>{3, 1, 0});  // bf16 packs as f32 beside f32 params

  // Reported one by one, in any order, with one never reported (zeros).
  gs.on_grad_ready(0, grads[0].second);
  gs.on_grad_ready(3, grads[3].second);
  gs.on_grad_ready(4, grads[4].second);
  ParamTree partial = gs.finish();
  CHECK(vals(partial.at("l1/w")) == vals(grads[0].second));
  CHECK(vals(partial.at("l1/b")) == std::vector<double>{0, 0, 0});
  CHECK(vals(partial.at("l2/w")) == vals(grads[3].second));

  CHECK_THROWS_AS(gs.on_grad_ready(9, grads[0].second), ValueError);
  CHECK_THROWS_AS(gs.on_grad_ready(1, grads[0].second), ShapeError);
  gs.on_grad_ready(1, grads[1].second);
  CHECK_THROWS_AS(gs.on_grad_ready(1, grads[1].second), ValueError);  // twice in one step
  CHECK_THROWS_AS(gs.sync(grads), ValueError);                        // mid-step
  gs.reset();
  ParamTree extra = grads;
  extra.insert("l3/w", ones(Shape{1}));
  CHECK_THROWS_AS(gs.sync(extra), ValueError);
  CHECK_NOTHROW(gs.sync(grads));

  auto e = catch_error<PlanError>([&] { GradientSync(m, "dta", params); });
  CHECK_THAT(e.suggestion(), Contains("did you mean 'data'?"));
}

TEST_CASE("GradientSync overlaps value_and_grad on one rank", "[parallel]") {
  Mesh m = local_mesh();
  ParamTree params{{"w", from_vector(std::vector<double>{1, -2, 3}, Shape{3})}, {"b", scalar(0.5, DType::f64)}};
  Tensor xin = from_vector(std::vector<double>{2, 1, -1}, Shape{3});
  GradientSync gs(m, "data", params, 8, 8);
  BackwardOptions o;
  o.on_grad_ready = gs.hook();
  for (int step = 0; step < 2; ++step) {
    auto [loss, g] = value_and_grad([&] { return square(sum(params.at("w") * xin) + params.at("b")); }, params, o);
    ParamTree avg = gs.finish();
    // f = (w.x + b)^2 = (2 - 2 - 3 + 0.5)^2; df/dw = 2 (w.x + b) x = -5 x; df/db = -5
    CHECK(vals(avg.at("w")) == std::vector<double>{-10, -5, 5});
    CHECK(avg.at("b").item() == Approx(-5));
  }
}

TEST_CASE("data shards and rank keys", "[parallel]") {
  Mesh m = local_mesh();
  DataShard s = data_shard(m, Plan{.dp = DP{}});
  CHECK(s.index == 0);
  CHECK(s.count == 1);
  CHECK(data_shard(m, Plan{}).count == 1);
  CHECK_THROWS_AS(data_shard(m, Plan{.dp = DP{"dat"}}), PlanError);
  RngKey base = RngKey::from_seed(42);
  CHECK(rank_key(base, m) == fold_in(base, 0));
}
