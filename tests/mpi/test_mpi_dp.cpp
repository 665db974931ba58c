// GradientSync under mpirun: averages against means computed here from rank ids, with buckets of several
// sizes, gradients reported in rank-dependent orders (and some never), overlapped with backward; and a
// parameter-list mismatch between ranks raising PlanError on every rank.
#include <catch2/catch.hpp>

#include <algorithm>
#include <random>

#include "mpi_util.h"

using namespace titanax;
using namespace mpitest;
using Catch::Matchers::Contains;

namespace {

ParamTree make_params(int rank_for_mismatch = -1) {
  ParamTree p;
  p.insert("a/w", zeros(Shape{5, rank_for_mismatch == world_rank() ? 4 : 3}));
  p.insert("a/b", zeros(Shape{3}));
  p.insert("count", zeros(Shape{1}, DType::i64));
  p.insert("c/w", zeros(Shape{3, 2}, DType::f64));
  p.insert("c/h", zeros(Shape{4}, DType::bf16));
  return p;
}

/// Rank r's gradient for parameter p: g[i] = (r + 1) * (i % 4 + 1) + p (exact in bf16 too).
double gval(int r, size_t p, int64_t i) { return (r + 1) * double(i % 4 + 1) + double(p); }

Tensor grad_for(int r, size_t p, const Tensor& like) {
  std::vector<double> v(size_t(like.numel()));
  for (size_t i = 0; i < v.size(); ++i) v[i] = gval(r, p, int64_t(i));
  return from_vector(v, like.shape()).astype(like.dtype());
}

/// The mean over `group` of gval, leaving out rank `skip_rank`'s gradient of parameter `skip_param`.
std::vector<double> expected_mean(const std::vector<int>& group, size_t p, int64_t numel, int skip_rank = -1,
                                  size_t skip_param = size_t(-1)) {
  std::vector<double> m(size_t(numel), 0.0);
  for (int g : group) {
    if (g == skip_rank && p == skip_param) continue;
    for (int64_t i = 0; i < numel; ++i) m[size_t(i)] += gval(g, p, i);
  }
  for (auto& v : m) v /= double(group.size());
  return m;
}

void check_close(const std::vector<double>& got, const std::vector<double>& want, double eps = 1e-6) {
  REQUIRE(got.size() == want.size());
  for (size_t i = 0; i < got.size(); ++i) CHECK(got[i] == Approx(want[i]).epsilon(eps));
}

}  // namespace

TEST_CASE("GradientSync averages over the data axis, any bucket size, any report order", "[mpi]") {
  const int r = world_rank();
  for (const auto& mc : mesh_cases()) {
    Mesh mesh = MeshSpec{mc.axes, mc.shape}.build(rt());
    std::vector<int> group = group_of(mc.shape, r, 0);  // the "data" axis is first
    ParamTree params = make_params();
    for (auto [bucket, first] : std::vector<std::pair<size_t, size_t>>{{8, 8}, {64, 16}, {25 << 20, 1 << 20}}) {
      INFO("mesh " << mc.name() << " bucket_bytes " << bucket << " first " << first);
      GradientSync gs(mesh, "data", params, bucket, first);
      CHECK(gs.axis_size() == int(group.size()));
      if (bucket == 8) CHECK(gs.buckets().size() == 4);
      // Report order differs by rank: reverse, forward, shuffled.
      std::vector<size_t> order(params.size());
      for (size_t i = 0; i < order.size(); ++i) order[i] = order.size() - 1 - i;
      if (r % 3 == 1) std::reverse(order.begin(), order.end());
      if (r % 3 == 2) std::shuffle(order.begin(), order.end(), std::mt19937(unsigned(r)));
      for (int step = 0; step < 2; ++step) {
        for (size_t p : order) gs.on_grad_ready(p, grad_for(r, p, params[p].second));
        ParamTree avg = gs.finish();
        REQUIRE(avg.paths() == params.paths());
        for (size_t p = 0; p < params.size(); ++p) {
          INFO(params[p].first);
          CHECK(avg[p].second.dtype() == params[p].second.dtype());
          if (params[p].first == "count") {  // integers are passed through, not averaged
            CHECK(avg[p].second.to_vector<double>() == vals(grad_for(r, p, params[p].second)));
            continue;
          }
          check_close(vals(avg[p].second), expected_mean(group, p, params[p].second.numel()),
                      params[p].second.dtype() == DType::bf16 ? 1e-2 : 1e-6);
        }
      }
      // sync(): the no-overlap path.
      ParamTree grads = params.map([&](const std::string& path, const Tensor& t) {
        return grad_for(r, size_t(params.index_of(path)), t);
      });
      ParamTree avg = gs.sync(grads);
      check_close(vals(avg.at("c/w")), expected_mean(group, 3, 6));
      // A gradient rank 0 never reports counts as zeros.
      for (size_t p = 0; p < params.size(); ++p)
        if (!(r == 0 && p == 1)) gs.on_grad_ready(p, grad_for(r, p, params[p].second));
      ParamTree part = gs.finish();
      check_close(vals(part.at("a/b")), expected_mean(group, 1, 3, 0, 1));
      check_close(vals(part.at("a/w")), expected_mean(group, 0, 15));
    }
  }
}

TEST_CASE("GradientSync overlapped with value_and_grad", "[mpi]") {
  const int r = world_rank(), n = world_size();
  Mesh mesh = MeshSpec{{"data"}, {-1}}.build(rt());
  ParamTree params{{"w", from_vector(std::vector<double>{1, 2, 3, 4}, Shape{4})}, {"b", scalar(0.0, DType::f64)}};
  GradientSync gs(mesh, "data", params, 8, 8);
  BackwardOptions o;
  o.on_grad_ready = gs.hook();
  // loss_r = sum(w * x_r) + (r + 1) * b with x_r[i] = r * 10 + i: dw = x_r, db = r + 1.
  std::vector<double> xr(4);
  for (int i = 0; i < 4; ++i) xr[size_t(i)] = r * 10.0 + i;
  Tensor x = from_vector(xr, Shape{4});
  auto [loss, g] = value_and_grad([&] { return sum(params.at("w") * x) + params.at("b") * double(r + 1); }, params, o);
  ParamTree avg = gs.finish();
  std::vector<double> want(4, 0.0);
  double db = 0;
  for (int p = 0; p < n; ++p) {
    for (int i = 0; i < 4; ++i) want[size_t(i)] += (p * 10.0 + i) / n;
    db += (p + 1.0) / n;
  }
  check_close(vals(avg.at("w")), want);
  CHECK(avg.at("b").item() == Approx(db));
  // The local gradients were not modified.
  CHECK(vals(g.at("w")) == xr);
}

TEST_CASE("parameter lists that differ between ranks raise PlanError on every rank", "[mpi]") {
  const int n = world_size();
  Mesh mesh = MeshSpec{{"data"}, {-1}}.build(rt());
  if (n == 1) return;
  std::string err;
  try {
    GradientSync gs(mesh, "data", make_params(/*rank_for_mismatch=*/n - 1));
  } catch (const PlanError& e) {
    err = e.what();
  }
  CHECK_THAT(err, Contains("parameter lists differ"));
  CHECK_THAT(err, Contains("'a/w' f32[5, 3]"));
  CHECK_THAT(err, Contains("'a/w' f32[5, 4]"));
  CHECK_THAT(err, Contains("rank " + std::to_string(n - 1)));

  // A missing parameter on one rank.
  err.clear();
  try {
    ParamTree p = make_params();
    if (world_rank() == 0) p.insert("extra", zeros(Shape{2}));
    GradientSync gs(mesh, "data", p);
  } catch (const PlanError& e) {
    err = e.what();
  }
  CHECK_THAT(err, Contains("'extra'"));
  CHECK_THAT(err, Contains("(no parameter)"));

  // Different bucket sizes would pair different collectives: also caught at construction.
  err.clear();
  try {
    GradientSync gs(mesh, "data", make_params(), world_rank() == 0 ? 64 : 128);
  } catch (const PlanError& e) {
    err = e.what();
  }
  CHECK_THAT(err, Contains("bucket sizes"));
  CHECK(world_sum(1.0) == double(n));
}

TEST_CASE("data shards and rank keys under MPI", "[mpi]") {
  const int r = world_rank(), n = world_size();
  for (const auto& mc : mesh_cases()) {
    Mesh mesh = MeshSpec{mc.axes, mc.shape}.build(rt());
    DataShard s = data_shard(mesh, Plan{.dp = DP{"data"}});
    std::vector<int> g = group_of(mc.shape, r, 0);
    CHECK(s.count == mc.shape[0]);
    CHECK(s.index == int(std::find(g.begin(), g.end(), r) - g.begin()));
  }
  Mesh mesh = MeshSpec{{"data"}, {-1}}.build(rt());
  RngKey k = rank_key(RngKey::from_seed(7), mesh);
  auto all = rt().world()->all_gather_string(k.str());
  std::sort(all.begin(), all.end());
  CHECK(std::unique(all.begin(), all.end()) == all.end());  // a distinct stream per rank
  CHECK(int(all.size()) == n);
}
