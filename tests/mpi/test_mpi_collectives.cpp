// Collectives under mpirun: values against expectations computed from rank ids, on {data: n} and
// {data: 2, model: n/2}; vjps and second derivatives against finite differences of the TOTAL loss (sum
// over ranks); misuse
// raising the same error on every rank instead of hanging.
#include <catch2/catch.hpp>

#include <limits>

#include "mpi_util.h"

using namespace titanax;
using namespace mpitest;
using Catch::Matchers::Contains;

namespace {

/// Runs body(mesh, axis name, axis position, group) for every mesh case and axis.
void for_each_axis(const std::function<void(const Mesh&, const std::string&, size_t, const std::vector<int>&)>& body) {
  for (const auto& mc : mesh_cases()) {
    Mesh mesh = MeshSpec{mc.axes, mc.shape}.build(rt());
    for (size_t ax = 0; ax < mc.axes.size(); ++ax) {
      INFO("mesh " << mc.name() << ", axis '" << mc.axes[ax] << "'");
      body(mesh, mc.axes[ax], ax, group_of(mc.shape, world_rank(), ax));
    }
  }
}

int index_in(const std::vector<int>& group, int r) {
  return int(std::find(group.begin(), group.end(), r) - group.begin());
}

}  // namespace

TEST_CASE("mesh axis groups hold the right ranks", "[mpi]") {
  for_each_axis([](const Mesh& mesh, const std::string& axis, size_t, const std::vector<int>& group) {
    const int r = world_rank();
    CHECK(mesh.axis_size(axis) == int(group.size()));
    CHECK(mesh.axis_index(axis) == index_in(group, r));
    CHECK(axis_size(axis) == int(group.size()));   // Mesh::current() is the mesh just built
    CHECK(axis_index(axis) == index_in(group, r));
    std::vector<std::string> members = mesh.comm(axis).all_gather_string(std::to_string(r));
    std::vector<std::string> expected;
    for (int g : group) expected.push_back(std::to_string(g));
    CHECK(members == expected);
    CHECK(mesh.comm(axis).rank() == index_in(group, r));
  });
}

TEST_CASE("psum, pmean and pmax values", "[mpi]") {
  for_each_axis([](const Mesh& mesh, const std::string& axis, size_t, const std::vector<int>& group) {
    const int r = world_rank();
    const Shape s{2, 3};
    std::vector<double> sum(6, 0.0), mx(6);
    for (size_t i = 0; i < 6; ++i) {
      for (int g : group) sum[i] += (g + 1) * 100.0 + double(i);
      int hi = *std::max_element(group.begin(), group.end()), lo = *std::min_element(group.begin(), group.end());
      mx[i] = i % 2 == 0 ? hi + 1.0 : -(lo + 1.0);
    }
    CHECK(vals(psum(value_of(r, s), axis)) == sum);
    CHECK(vals(psum(mesh, value_of(r, s).astype(DType::f32), axis)) == sum);
    CHECK(vals(psum(value_of(r, s).astype(DType::i64), axis)) == sum);
    std::vector<double> mean = sum;
    for (auto& v : mean) v /= double(group.size());
    auto pm = vals(pmean(value_of(r, s), axis));
    for (size_t i = 0; i < 6; ++i) CHECK(pm[i] == Approx(mean[i]));
    auto pm16 = vals(pmean(value_of(r, s).astype(DType::bf16), axis));
    for (size_t i = 0; i < 6; ++i) CHECK(pm16[i] == Approx(mean[i]).epsilon(1e-2));

    std::vector<double> xm(6);
    for (size_t i = 0; i < 6; ++i) xm[i] = (i % 2 == 0 ? 1.0 : -1.0) * (r + 1);
    CHECK(vals(pmax(from_vector(xm, s), axis)) == mx);
    CHECK(vals(pmax(from_vector(xm, s).astype(DType::i32), axis)) == mx);
  });
}

TEST_CASE("all_gather and reduce_scatter values", "[mpi]") {
  for_each_axis([](const Mesh&, const std::string& axis, size_t, const std::vector<int>& group) {
    const int r = world_rank(), k = int(group.size()), a = index_in(group, r);
    // all_gather along dim 0 and dim 1 of [2, 3]
    std::vector<double> g0, g1(size_t(2 * 3 * k));
    for (int p = 0; p < k; ++p)
      for (int i = 0; i < 6; ++i) g0.push_back((group[p] + 1) * 100.0 + i);
    for (int i = 0; i < 2; ++i)
      for (int p = 0; p < k; ++p)
        for (int j = 0; j < 3; ++j) g1[size_t(i * 3 * k + p * 3 + j)] = (group[p] + 1) * 100.0 + i * 3 + j;
    Tensor x = value_of(r, Shape{2, 3});
    Tensor y0 = all_gather(x, axis, 0), y1 = all_gather(x, axis, 1);
    CHECK(y0.shape() == Shape{2 * k, 3});
    CHECK(vals(y0) == g0);
    CHECK(y1.shape() == Shape{2, 3 * k});
    CHECK(vals(y1) == g1);
    CHECK(vals(all_gather(x.T(), axis, -1)) == vals(all_gather(x, axis, 0).T().contiguous()));

    // reduce_scatter: x[idx] = (r + 1) * 1000 + idx; S = the sum over the group.
    auto rs_input = [&](const Shape& s) {
      std::vector<double> v(size_t(s.numel()));
      for (size_t i = 0; i < v.size(); ++i) v[i] = (r + 1) * 1000.0 + double(i);
      return from_vector(v, s);
    };
    auto S = [&](int idx) {
      double t = 0;
      for (int g : group) t += (g + 1) * 1000.0 + idx;
      return t;
    };
    std::vector<double> e0, e1;
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 3; ++j) e0.push_back(S((a * 2 + i) * 3 + j));
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 2; ++j) e1.push_back(S(i * 2 * k + a * 2 + j));
    Tensor r0 = reduce_scatter(rs_input(Shape{2 * k, 3}), axis, 0);
    Tensor r1 = reduce_scatter(rs_input(Shape{3, 2 * k}), axis, 1);
    CHECK(r0.shape() == Shape{2, 3});
    CHECK(vals(r0) == e0);
    CHECK(r1.shape() == Shape{3, 2});
    CHECK(vals(r1) == e1);
    if (k > 1) CHECK_THROWS_AS(reduce_scatter(rs_input(Shape{2 * k + 1, 3}), axis, 0), ShapeError);
  });
}

TEST_CASE("ireduce_scatter gives reduce_scatter's block, by dtype and op, for strided inputs too", "[mpi]") {
  const int r = world_rank(), n = world_size();
  Communicator& world = *rt().world();
  for (DType d : {DType::f32, DType::f64, DType::i32, DType::bf16}) {
    INFO(dtype_name(d));
    // x[i] = (r + 1) * 10 + i % 7 (exact in bf16): every rank's block differs and every rank's input too.
    std::vector<double> v(size_t(2 * n * 3));
    for (size_t i = 0; i < v.size(); ++i) v[i] = (r + 1) * 10.0 + double(i % 7);
    const Tensor x = from_vector(v, Shape{2 * n, 3}).astype(d);
    for (CollectiveOp op : {CollectiveOp::sum, CollectiveOp::max}) {
      Tensor out = full(Shape{2, 3}, -1.0, d);  // poisoned: an unwritten element fails
      auto req = world.ireduce_scatter(x, out, op);
      req->test();
      req->wait();
      req->wait();  // idempotent
      CHECK(out.dtype() == d);
      CHECK(vals(out) == vals(world.reduce_scatter(x, op)));
    }
    const Tensor xt = from_vector(v, Shape{3, 2 * n}).astype(d).T();  // [2n, 3], strided
    Tensor out = full(Shape{2, 3}, -1.0, d);
    world.ireduce_scatter(xt, out)->wait();
    CHECK(vals(out) == vals(world.reduce_scatter(xt.contiguous())));
  }
  // The request keeps its input alive: the caller's handle may go before wait(), and memory allocated
  // meanwhile (the caching allocator would hand out a freed block of that size again) is another block.
  Tensor out = zeros(Shape{1});
  std::unique_ptr<CollectiveRequest> req;
  {
    Tensor x = full(Shape{n * 4096}, double(r + 1));
    out = zeros(Shape{4096});
    req = world.ireduce_scatter(x, out);
  }
  const Tensor junk = full(Shape{n * 4096}, -1e6);
  req->wait();
  out = out.slice(0, 0, 1);
  CHECK(vals(out) == std::vector<double>{double(n * (n + 1) / 2)});
  // An output that does not fit is refused before the collective, naming the expected tensor.
  Tensor wrong = zeros(Shape{3});
  CHECK_THROWS_WITH(world.ireduce_scatter(zeros(Shape{2 * n}), wrong), Contains("f32[2]"));
  Tensor wrong_dtype = zeros(Shape{2}, DType::f64);
  CHECK_THROWS_AS(world.ireduce_scatter(zeros(Shape{2 * n}), wrong_dtype), CollectiveError);
  CHECK(all_ranks(true));
}

TEST_CASE("broadcast, ppermute and all_to_all values", "[mpi]") {
  for_each_axis([](const Mesh&, const std::string& axis, size_t, const std::vector<int>& group) {
    const int r = world_rank(), k = int(group.size()), a = index_in(group, r);
    const Shape s{2, 3};
    CHECK(vals(broadcast(value_of(r, s), axis, k - 1)) == vals(value_of(group[size_t(k - 1)], s)));
    CHECK(vals(broadcast(value_of(r, s), axis)) == vals(value_of(group[0], s)));

    std::vector<std::pair<int, int>> ring;
    for (int p = 0; p < k; ++p) ring.emplace_back(p, (p + 1) % k);
    CHECK(vals(ppermute(value_of(r, s), axis, ring)) == vals(value_of(group[size_t((a - 1 + k) % k)], s)));
    // One pair: only its destination receives; everyone else gets zeros.
    Tensor one = ppermute(value_of(r, s), axis, {{0, k - 1}});
    CHECK(vals(one) == (a == k - 1 ? vals(value_of(group[0], s)) : std::vector<double>(6, 0.0)));

    // all_to_all, split 0 / concat 1: out[i, src*3 + j] = x_src[a*2 + i, j]
    std::vector<double> e(size_t(2 * 3 * k));
    for (int i = 0; i < 2; ++i)
      for (int src = 0; src < k; ++src)
        for (int j = 0; j < 3; ++j)
          e[size_t(i * 3 * k + src * 3 + j)] = (group[size_t(src)] + 1) * 100.0 + (a * 2 + i) * 3 + j;
    Tensor y = all_to_all(value_of(r, Shape{2 * k, 3}), axis, 0, 1);
    CHECK(y.shape() == Shape{2, 3 * k});
    CHECK(vals(y) == e);
    // split 1 / concat 0 of [3, 2k]: out[src*3 + i, j] = x_src[i, a*2 + j]
    std::vector<double> e2(size_t(3 * k * 2));
    for (int src = 0; src < k; ++src)
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 2; ++j)
          e2[size_t((src * 3 + i) * 2 + j)] = (group[size_t(src)] + 1) * 100.0 + i * 2 * k + a * 2 + j;
    Tensor y2 = all_to_all(value_of(r, Shape{3, 2 * k}), axis, 1, 0);
    CHECK(y2.shape() == Shape{3 * k, 2});
    CHECK(vals(y2) == e2);
  });
}

namespace {

/// d/dx_r of the total over ranks of f(x_r) by central differences (step 1e-6), for this rank's elements:
/// one element of one rank moves at a time, every rank evaluates f and the totals are all-reduced.
std::vector<double> total_fd(const Tensor& x, const std::function<double(const Tensor&)>& f) {
  const int r = world_rank(), n = world_size();
  const double eps = 1e-6;
  std::vector<double> d(size_t(x.numel()), 0.0);
  for (int p = 0; p < n; ++p)
    for (int64_t e = 0; e < x.numel(); ++e) {
      double total[2];
      for (int side = 0; side < 2; ++side) {
        Tensor xp = x.clone();
        if (r == p) xp.data<double>()[e] += side == 0 ? eps : -eps;
        total[side] = world_sum(f(xp));
      }
      if (r == p) d[size_t(e)] = (total[0] - total[1]) / (2 * eps);
    }
  return d;
}

/// Checks the vjp of `f` (a function of this rank's x that may call collectives) against central
/// differences of the total loss L = sum_r l_r, l_r = sum(w_r * tanh(f(x_r))), perturbing one element
/// of one rank at a time.
void check_total_vjp(const std::string& what, const Shape& xs, const std::function<Tensor(const Tensor&)>& f) {
  INFO(what);
  const int r = world_rank();
  const RngKey key = RngKey::from_seed(1234);
  Tensor x = random_normal(fold_in(key, uint64_t(r)), xs, DType::f64);
  Shape ys = f(x).shape();
  Tensor w = random_normal(fold_in(key, uint64_t(1000 + r)), ys, DType::f64);
  auto local_loss = [&](const Tensor& xin) { return sum(w * tanh(f(xin))); };

  Tensor xv = x.detach().clone().detach().set_requires_grad();
  std::vector<double> analytic = vals(grad(local_loss(xv), {xv})[0]);

  NoGradGuard ng;
  const std::vector<double> numeric = total_fd(x, [&](const Tensor& xp) { return local_loss(xp).item(); });
  for (size_t e = 0; e < numeric.size(); ++e) {
    INFO("rank " << r << " element " << e);
    CHECK(analytic[e] == Approx(numeric[e]).margin(1e-6).epsilon(1e-5));
  }

  // Second derivatives: the gradient of the total over ranks of <gradient_r, u_r> (the vjp of each
  // collective's vjp), against finite differences of that total. Every rank must record the same
  // collectives in its backward for the second pass to stay in step.
  const Tensor u = random_normal(fold_in(key, uint64_t(2000 + r)), xs, DType::f64);
  auto projected_gradient = [&](const Tensor& xin, bool create_graph) {
    GradModeGuard on(true);
    const Tensor leaf = xin.detach().clone().detach().set_requires_grad();
    BackwardOptions o;
    o.create_graph = create_graph;
    const Tensor g = grad(local_loss(leaf), {leaf}, o)[0];
    return std::pair{leaf, sum(g * u)};
  };
  std::vector<double> second;
  {
    GradModeGuard on(true);
    auto [leaf, q] = projected_gradient(x, true);
    second = q.requires_grad() ? vals(grad(q, {leaf})[0]) : std::vector<double>(size_t(x.numel()), 0.0);
  }
  const std::vector<double> numeric2 =
      total_fd(x, [&](const Tensor& xp) { return projected_gradient(xp, false).second.item(); });
  for (size_t e = 0; e < numeric2.size(); ++e) {
    INFO("second derivative, rank " << r << " element " << e);
    CHECK(second[e] == Approx(numeric2[e]).margin(1e-6).epsilon(1e-5));
  }
}

}  // namespace

TEST_CASE("collective vjps and their vjps match finite differences of the total loss", "[mpi]") {
  for_each_axis([](const Mesh&, const std::string& axis, size_t, const std::vector<int>& group) {
    const int k = int(group.size());
    check_total_vjp("psum", Shape{2, 3}, [&](const Tensor& x) { return psum(x, axis); });
    check_total_vjp("pmean", Shape{2, 3}, [&](const Tensor& x) { return pmean(x * x, axis); });
    check_total_vjp("pmax", Shape{2, 3}, [&](const Tensor& x) { return pmax(x, axis); });
    check_total_vjp("all_gather", Shape{2, 2}, [&](const Tensor& x) { return all_gather(x, axis, 1); });
    check_total_vjp("reduce_scatter", Shape{k, 2}, [&](const Tensor& x) { return reduce_scatter(x, axis, 0); });
    check_total_vjp("broadcast", Shape{2, 2}, [&](const Tensor& x) { return broadcast(x, axis, k - 1); });
    std::vector<std::pair<int, int>> ring;
    for (int p = 0; p < k; ++p) ring.emplace_back(p, (p + 1) % k);
    check_total_vjp("ppermute", Shape{2, 2}, [&](const Tensor& x) { return ppermute(x, axis, ring); });
    check_total_vjp("ppermute one pair", Shape{2, 2}, [&](const Tensor& x) { return ppermute(x, axis, {{0, k - 1}}); });
    check_total_vjp("all_to_all", Shape{k, 2}, [&](const Tensor& x) { return all_to_all(x, axis, 0, 1); });
  });
}

TEST_CASE("ranks that disagree get the same error, not a hang", "[mpi]") {
  const int r = world_rank(), n = world_size();
  Mesh mesh = MeshSpec{{"data"}, {-1}}.build(rt());
  if (n == 1) return;
  // Shapes differ across ranks.
  auto e = [&] {
    try {
      psum(zeros(Shape{r == 0 ? 3 : 4}), "data");
    } catch (const CollectiveError& err) {
      return std::string(err.what());
    }
    return std::string();
  }();
  CHECK_THAT(e, Contains("different collectives (or different shapes)"));
  CHECK_THAT(e, Contains("f32[3]"));
  CHECK_THAT(e, Contains("f32[4]"));
  CHECK_THAT(e, Contains("psum over axis 'data'"));
  // Different collectives on the same communicator.
  Communicator& world = *rt().world();
  Tensor t = ones(Shape{4});
  if (r % 2 == 0) CHECK_THROWS_AS(world.all_reduce(t), CollectiveError);
  else CHECK_THROWS_AS(world.all_gather(t), CollectiveError);
  // Different ppermute pairs.
  std::vector<std::pair<int, int>> perm{{0, r == 0 ? 1 : n - 1}};
  if (n > 2) CHECK_THROWS_AS(ppermute(t, "data", perm), CollectiveError);
  // Different broadcast roots.
  CHECK_THROWS_AS(broadcast(t, "data", r == 0 ? 0 : 1), CollectiveError);
  // Everyone is still in step: a correct collective works.
  CHECK(psum(ones(Shape{2}), "data").to_vector<double>() == std::vector<double>(2, double(n)));
}

TEST_CASE("point-to-point size mismatches are errors on the receiver", "[mpi]") {
  const int r = world_rank(), n = world_size();
  if (n == 1) return;
  Communicator& world = *rt().world();
  if (r == 0) {
    world.send(ones(Shape{4}, DType::f64), 1, 3);   // more than rank 1 expects
    world.send(ones(Shape{2}, DType::f64), 1, 4);   // less than rank 1 expects
  } else if (r == 1) {
    Tensor small = zeros(Shape{3}, DType::f64);
    CHECK_THROWS_AS(world.recv(small, 0, 3), CollectiveError);
    CHECK_THROWS_AS(world.recv(small, 0, 4), CollectiveError);
  }
  CHECK_THROWS_AS(world.send(ones(Shape{1}), n, 0), CollectiveError);
  world.barrier();
  // sendrecv with staging of a strided tensor and a bf16 payload
  Tensor x = value_of(r, Shape{3, 2}).T();
  Tensor got = world.sendrecv(x, (r + 1) % n, (r - 1 + n) % n);
  CHECK(vals(got) == vals(value_of((r - 1 + n) % n, Shape{3, 2}).T().contiguous()));
  Tensor h = world.sendrecv(full(Shape{2}, r + 1, DType::bf16), (r + 1) % n, (r - 1 + n) % n);
  CHECK(h.dtype() == DType::bf16);
  CHECK(vals(h) == std::vector<double>(2, double((r - 1 + n) % n + 1)));
}

TEST_CASE("communicator reductions by dtype and op", "[mpi]") {
  const int r = world_rank(), n = world_size();
  Communicator& world = *rt().world();
  double sum = 0;
  for (int p = 0; p < n; ++p) sum += p + 1;
  for (DType d : {DType::f32, DType::f64, DType::i32, DType::i64, DType::u8, DType::bf16, DType::f16}) {
    INFO(dtype_name(d));
    Tensor t = full(Shape{3}, r + 1, d);
    world.all_reduce(t);
    CHECK(t.dtype() == d);
    CHECK(vals(t) == std::vector<double>(3, sum));
    Tensor mx = full(Shape{2}, r + 1, d), mn = full(Shape{2}, r + 1, d);
    world.all_reduce(mx, CollectiveOp::max);
    world.all_reduce(mn, CollectiveOp::min);
    CHECK(vals(mx) == std::vector<double>(2, double(n)));
    CHECK(vals(mn) == std::vector<double>(2, 1.0));
    Tensor it = full(Shape{5}, r + 1, d);
    auto req = world.iall_reduce(it);
    req->test();
    req->wait();
    req->wait();  // idempotent
    CHECK(vals(it) == std::vector<double>(5, sum));
  }
  // In place on a strided view: only the view's elements change.
  Tensor base = full(Shape{2, 2}, r + 1, DType::f32);
  Tensor col = base.slice(1, 0, 1);
  world.all_reduce(col);
  CHECK(vals(base) == std::vector<double>{sum, double(r + 1), sum, double(r + 1)});
  // Strings of different lengths.
  auto s = world.all_gather_string(std::string(size_t(r), 'x'));
  REQUIRE(s.size() == size_t(n));
  for (int p = 0; p < n; ++p) CHECK(s[size_t(p)] == std::string(size_t(p), 'x'));
}

TEST_CASE("anomaly detection: a NaN one rank brings into a psum is reported on every rank, none hangs", "[mpi][anomaly]") {
  Mesh mesh = MeshSpec{{"data"}, {world_size()}}.build(rt());
  const int r = world_rank();
  // Rank 0's input holds a NaN made outside any op (as data or a written parameter would be).
  std::vector<double> v{1.0 + r, 2.0, 3.0};
  if (r == 0) v[1] = std::numeric_limits<double>::quiet_NaN();
  const Tensor x = from_vector(v, Shape{3});
  DetectAnomalyGuard on;
  std::string what;
  try {
    psum(x, "data");
  } catch (const FloatingPointError& e) {
    what = e.what();
  }
  CAPTURE(what);
  CHECK(what.find("op 'psum'") != std::string::npos);
  CHECK(what.find("the first at [1]") != std::string::npos);
  if (r == 0) CHECK(what.find("input 0 already held it") != std::string::npos);
  else CHECK(what.find("this rank's inputs were finite, so another rank's were not") != std::string::npos);
  CHECK(all_ranks(!what.empty()));  // every rank threw, after the collective: the next one still matches
}
