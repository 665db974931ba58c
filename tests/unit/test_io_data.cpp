// io/data: TensorDataset gathering and the DataLoader's global order, rank slices, resume and prefetch.
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <numeric>
#include <set>
#include <thread>

#include <titanax/titanax.h>

#include "io/data.h"

using namespace titanax;

namespace {

// x[i] = i (i64), y[i] = [10 i, 10 i + 1, 10 i + 2] (f32): every row says which example it is.
std::shared_ptr<TensorDataset> indexed_dataset(int64_t n) {
  std::vector<int64_t> x(static_cast<size_t>(n));
  std::vector<float> y;
  for (int64_t i = 0; i < n; ++i) {
    x[size_t(i)] = i;
    for (int k = 0; k < 3; ++k) y.push_back(float(10 * i + k));
  }
  return std::make_shared<TensorDataset>(
      std::map<std::string, Tensor>{{"x", from_vector(x, Shape{n})}, {"y", from_vector(y, Shape{n, 3})}});
}

std::vector<int64_t> xs(const Batch& b) { return b["x"].to_vector<int64_t>(); }

// The documented epoch order, written out here from the header's description (Fisher-Yates over
// philox4x32 blocks with the folded key), independently of the loader's code.
std::vector<int64_t> documented_order(int64_t n, uint64_t seed, int64_t epoch) {
  std::vector<int64_t> p(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) p[size_t(i)] = i;
  RngKey key = fold_in(RngKey::from_seed(seed), uint64_t(epoch));
  uint64_t d = 0;
  for (int64_t i = n - 1; i >= 1; --i, ++d) {
    auto w = philox4x32({uint32_t(d), uint32_t(d >> 32), 0x7065726du, 0u}, key);
    uint64_t u = (uint64_t(w[0]) << 32) | w[1];
    std::swap(p[size_t(i)], p[size_t(u % uint64_t(i + 1))]);
  }
  return p;
}

// A dataset that fails when asked for example `bad`, and can be slow.
struct FlakyDataset final : Dataset {
  std::shared_ptr<TensorDataset> inner;
  int64_t bad;
  int sleep_ms = 0;
  mutable std::atomic<int> calls{0};
  FlakyDataset(int64_t n, int64_t bad_index) : inner(indexed_dataset(n)), bad(bad_index) {}
  int64_t size() const override { return inner->size(); }
  Batch get(const std::vector<int64_t>& idx) const override {
    ++calls;
    if (sleep_ms) std::this_thread::sleep_for(std::chrono::milliseconds(sleep_ms));
    for (auto i : idx)
      if (i == bad) throw DataError("example " + std::to_string(i) + " is unreadable");
    return inner->get(idx);
  }
};

}  // namespace

TEST_CASE("TensorDataset gathers rows of every dtype by index", "[io]") {
  std::vector<int32_t> a{1, 2, 3, 4, 5, 6};
  Tensor ta = from_vector(a, Shape{3, 2});
  Tensor tb = from_vector(std::vector<double>{0.5, 1.5, 2.5}, Shape{3});
  // A non-contiguous item (transposed) is gathered by logical rows.
  Tensor tc = from_vector(std::vector<float>{1, 2, 3, 4, 5, 6}, Shape{2, 3}).T();  // rows: [1,4] [2,5] [3,6]
  Tensor td = from_vector(std::vector<float>{7, 8, 9}, Shape{3}).astype(DType::bf16);
  TensorDataset ds({{"a", ta}, {"b", tb}, {"c", tc}, {"d", td}});
  CHECK(ds.size() == 3);
  Batch b = ds.get({2, 0, 2});
  CHECK(b.size() == 3);
  CHECK(b["a"].shape() == Shape{3, 2});
  CHECK(b["a"].dtype() == DType::i32);
  CHECK(b["a"].to_vector<int32_t>() == std::vector<int32_t>{5, 6, 1, 2, 5, 6});
  CHECK(b["b"].to_vector<double>() == std::vector<double>{2.5, 0.5, 2.5});
  CHECK(b["c"].to_vector<float>() == std::vector<float>{3, 6, 1, 4, 3, 6});
  CHECK(b["d"].dtype() == DType::bf16);
  CHECK(b["d"].to_vector<float>() == std::vector<float>{9, 7, 9});
  CHECK(b["a"].is_contiguous());
  CHECK_THROWS_AS(ds.get({3}), ValueError);
  CHECK_THROWS_AS(ds.get({-1}), ValueError);
  CHECK_THROWS_AS(TensorDataset({{"a", zeros(Shape{3})}, {"b", zeros(Shape{4})}}), ShapeError);
  CHECK_THROWS_AS(TensorDataset({{"a", scalar(1.0)}}), ShapeError);

  try {
    (void)b["z"];
    FAIL("expected ValueError");
  } catch (const ValueError& e) {
    CHECK(std::string(e.what()).find("a, b, c, d") != std::string::npos);
  }
  Batch s = b.slice(1, 3);
  CHECK(s.size() == 2);
  CHECK(s["b"].to_vector<double>() == std::vector<double>{0.5, 2.5});
}

TEST_CASE("DataLoader visits every index exactly once per epoch", "[io]") {
  auto ds = indexed_dataset(100);
  DataLoader dl(ds, {.batch_size = 10, .shuffle = true, .seed = 7, .prefetch = 0});
  CHECK(dl.steps_per_epoch() == 10);
  for (int epoch = 0; epoch < 3; ++epoch) {
    std::multiset<int64_t> seen;
    for (int s = 0; s < 10; ++s) {
      Batch b = dl.next();
      REQUIRE(b.size() == 10);
      auto x = xs(b);
      auto y = b["y"].to_vector<float>();
      for (size_t i = 0; i < x.size(); ++i) {
        CHECK(y[3 * i] == float(10 * x[i]));  // rows of the items stay together
        CHECK(y[3 * i + 2] == float(10 * x[i] + 2));
      }
      seen.insert(x.begin(), x.end());
    }
    REQUIRE(seen.size() == 100);
    for (int64_t i = 0; i < 100; ++i) CHECK(seen.count(i) == 1);
  }
  CHECK(dl.step() == 30);
}

TEST_CASE("DataLoader drops the partial batch and never repeats within an epoch", "[io]") {
  auto ds = indexed_dataset(103);
  DataLoader dl(ds, {.batch_size = 10, .seed = 1, .prefetch = 0});
  CHECK(dl.steps_per_epoch() == 10);
  std::set<int64_t> seen;
  for (int s = 0; s < 10; ++s)
    for (auto v : xs(dl.next())) CHECK(seen.insert(v).second);
  CHECK(seen.size() == 100);
  // Step 10 starts epoch 1 (its permutation is a different one).
  auto e1 = documented_order(103, 1, 1);
  CHECK(dl.indices(10) == std::vector<int64_t>(e1.begin(), e1.begin() + 10));
}

TEST_CASE("DataLoader order follows the documented Philox Fisher-Yates permutation", "[io]") {
  auto ds = indexed_dataset(50);
  DataLoader dl(ds, {.batch_size = 5, .seed = 1234, .prefetch = 0});
  for (int64_t epoch : {0, 1, 5}) {
    auto want = documented_order(50, 1234, epoch);
    std::vector<int64_t> got;
    for (int s = 0; s < 10; ++s) {
      auto v = dl.indices(epoch * 10 + s);
      got.insert(got.end(), v.begin(), v.end());
    }
    CHECK(got == want);
    CHECK(DataLoader::epoch_permutation(50, 1234, epoch) == want);
  }
  std::vector<int64_t> identity(50);
  std::iota(identity.begin(), identity.end(), 0);
  CHECK(documented_order(50, 1234, 0) != identity);
}

TEST_CASE("DataLoader: same seed same order, new epoch or seed a new order, no shuffle in order", "[io]") {
  auto ds = indexed_dataset(64);
  DataLoader a(ds, {.batch_size = 8, .seed = 3, .prefetch = 0});
  DataLoader b(ds, {.batch_size = 8, .seed = 3, .prefetch = 0});
  DataLoader c(ds, {.batch_size = 8, .seed = 4, .prefetch = 0});
  std::vector<int64_t> ea, eb, ec, ea1;
  for (int s = 0; s < 8; ++s) {
    auto va = xs(a.next()), vb = xs(b.next()), vc = xs(c.next());
    ea.insert(ea.end(), va.begin(), va.end());
    eb.insert(eb.end(), vb.begin(), vb.end());
    ec.insert(ec.end(), vc.begin(), vc.end());
  }
  for (int s = 0; s < 8; ++s) {
    auto v = xs(a.next());
    ea1.insert(ea1.end(), v.begin(), v.end());
  }
  CHECK(ea == eb);
  CHECK(ea != ec);
  CHECK(ea != ea1);
  std::vector<int64_t> s0 = ea, s1 = ea1;
  std::sort(s0.begin(), s0.end());
  std::sort(s1.begin(), s1.end());
  CHECK(s0 == s1);

  DataLoader plain(ds, {.batch_size = 8, .shuffle = false, .prefetch = 0});
  CHECK(xs(plain.next()) == std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7});
  CHECK(xs(plain.next()) == std::vector<int64_t>{8, 9, 10, 11, 12, 13, 14, 15});
  plain.seek(8);  // epoch 1 again starts at 0
  CHECK(xs(plain.next()) == std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7});
}

TEST_CASE("DataLoader rank slices of 1, 2 and 4 ranks make up the same global batch", "[io]") {
  auto ds = indexed_dataset(96);
  const int64_t B = 8;
  for (int64_t step : {0, 3, 11, 12, 25}) {
    DataLoader one(ds, {.batch_size = B, .seed = 9, .prefetch = 0});
    one.seek(step);
    auto global = xs(one.next());
    REQUIRE(global.size() == size_t(B));
    for (int world : {2, 4}) {
      std::vector<int64_t> cat;
      for (int r = 0; r < world; ++r) {
        DataLoader dl(ds, {.batch_size = B, .seed = 9, .rank = r, .world = world, .prefetch = 1});
        dl.seek(step);
        auto part = xs(dl.next());
        CHECK(part.size() == size_t(B / world));
        CHECK(dl.indices(step) == part);
        cat.insert(cat.end(), part.begin(), part.end());
      }
      CHECK(cat == global);
    }
  }
}

TEST_CASE("DataLoader seek(s) then next() equals batch s of a fresh loader", "[io]") {
  auto ds = indexed_dataset(40);
  for (int prefetch : {0, 3}) {
    DataLoader fresh(ds, {.batch_size = 6, .seed = 5, .prefetch = prefetch});
    std::vector<std::vector<int64_t>> ref;
    for (int s = 0; s < 20; ++s) ref.push_back(xs(fresh.next()));  // 6 steps per epoch: crosses 3 epochs
    DataLoader dl(ds, {.batch_size = 6, .seed = 5, .prefetch = prefetch});
    (void)dl.next();
    for (int64_t s : {13, 2, 0, 19, 6, 5}) {
      dl.seek(s);
      CHECK(dl.step() == s);
      CHECK(xs(dl.next()) == ref[size_t(s)]);
      CHECK(dl.step() == s + 1);
      if (s + 1 < 20) CHECK(xs(dl.next()) == ref[size_t(s + 1)]);
    }
    CHECK_THROWS_AS(dl.seek(-1), ValueError);
  }
}

TEST_CASE("DataLoader with and without prefetch gives identical batches", "[io]") {
  auto ds = indexed_dataset(77);
  DataLoader sync(ds, {.batch_size = 7, .seed = 11, .rank = 1, .world = 7, .prefetch = 0});
  DataLoader pre(ds, {.batch_size = 7, .seed = 11, .rank = 1, .world = 7, .prefetch = 4});
  for (int s = 0; s < 40; ++s) {
    Batch a = sync.next(), b = pre.next();
    CHECK(xs(a) == xs(b));
    CHECK(a["y"].to_vector<float>() == b["y"].to_vector<float>());
  }
}

TEST_CASE("DataLoader validates its options", "[io]") {
  auto ds = indexed_dataset(20);
  CHECK_THROWS_AS(DataLoader(ds, {.batch_size = 6, .world = 4}), ValueError);
  try {
    DataLoader(ds, {.batch_size = 6, .world = 4});
  } catch (const ValueError& e) {
    CHECK(std::string(e.what()).find("divide") != std::string::npos);
  }
  CHECK_THROWS_AS(DataLoader(ds, {.batch_size = 21}), ValueError);
  CHECK_THROWS_AS(DataLoader(ds, {.batch_size = 0}), ValueError);
  CHECK_THROWS_AS(DataLoader(ds, {.batch_size = 4, .rank = 2, .world = 2}), ValueError);
  CHECK_THROWS_AS(DataLoader(nullptr, {.batch_size = 4}), ValueError);
  CHECK_THROWS_AS(DataLoader(ds, {.batch_size = 4, .prefetch = -1}), ValueError);
  DataLoader ok(ds, {.batch_size = 20, .world = 4});
  CHECK(ok.steps_per_epoch() == 1);
  CHECK(ok.next().size() == 5);
}

TEST_CASE("DataLoader propagates dataset errors to next() at the failing batch", "[io]") {
  auto ds = std::make_shared<FlakyDataset>(30, 17);
  for (int prefetch : {0, 2}) {
    DataLoader dl(ds, {.batch_size = 5, .shuffle = false, .prefetch = prefetch});
    for (int s = 0; s < 3; ++s) CHECK(dl.next().size() == 5);  // examples 0..14
    CHECK_THROWS_AS(dl.next(), DataError);                     // batch 3 holds example 17
    CHECK_THROWS_AS(dl.next(), DataError);                     // the loader stays failed...
    dl.seek(4);                                                // ...until a seek restarts it
    CHECK(xs(dl.next()) == std::vector<int64_t>{20, 21, 22, 23, 24});
  }
}

TEST_CASE("DataLoader destroys cleanly while its worker is busy", "[io]") {
  auto ds = std::make_shared<FlakyDataset>(100, -1);
  ds->sleep_ms = 20;
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < 5; ++i) {
    DataLoader dl(ds, {.batch_size = 4, .prefetch = 8});
    if (i % 2) (void)dl.next();
  }
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
  CHECK(ms < 2000);  // did not wait for 8 prefetched batches per loader
}
