// io/idx and io/mnist: IDX reading (plain, gzip, malformed files) and the MNIST dataset.
#include <catch2/catch.hpp>

#include <zlib.h>

#include <cmath>
#include <cstring>
#include <map>

#include <titanax/titanax.h>

#include "io/idx.h"
#include "io/mnist.h"
#include "io_test_util.h"

using namespace titanax;
using io_test::idx_header;
using io_test::TempDir;

namespace {

void write_gz(const std::string& path, const std::vector<unsigned char>& bytes) {
  gzFile f = gzopen(path.c_str(), "wb");
  REQUIRE(f != nullptr);
  REQUIRE(gzwrite(f, bytes.data(), unsigned(bytes.size())) == int(bytes.size()));
  REQUIRE(gzclose(f) == Z_OK);
}

bool contains(const std::string& s, const std::string& sub) { return s.find(sub) != std::string::npos; }

// Expects read_idx(path) to throw DataError whose message names the file and `detail`.
void expect_data_error(const std::string& path, const std::string& detail) {
  try {
    read_idx(path);
    FAIL("expected DataError for " << path);
  } catch (const DataError& e) {
    INFO(e.what());
    CHECK(contains(e.what(), path));
    CHECK(contains(e.what(), detail));
  }
}

}  // namespace

TEST_CASE("IDX reads hand-written big-endian files of each type", "[io]") {
  TempDir d;
  auto u8 = idx_header(0x08, {2, 3});
  u8.insert(u8.end(), {1, 2, 3, 250, 251, 255});
  io_test::write_bytes(d / "u8", u8);
  Tensor t = read_idx(d / "u8");
  CHECK(t.dtype() == DType::u8);
  CHECK(t.shape() == Shape{2, 3});
  CHECK(t.to_vector<uint8_t>() == std::vector<uint8_t>{1, 2, 3, 250, 251, 255});

  auto i32 = idx_header(0x0C, {2});
  i32.insert(i32.end(), {0x00, 0x00, 0x01, 0x02, 0xFF, 0xFF, 0xFF, 0xFE});  // 258, -2
  io_test::write_bytes(d / "i32", i32);
  t = read_idx(d / "i32");
  CHECK(t.dtype() == DType::i32);
  CHECK(t.to_vector<int32_t>() == std::vector<int32_t>{258, -2});

  auto f32 = idx_header(0x0D, {1, 1, 1, 2});
  f32.insert(f32.end(), {0x3F, 0x80, 0x00, 0x00, 0xC0, 0x00, 0x00, 0x00});  // 1.0f, -2.0f
  f32.insert(f32.end(), {0xDE, 0xAD});                                        // trailing bytes are ignored
  io_test::write_bytes(d / "f32", f32);
  t = read_idx(d / "f32");
  CHECK(t.dtype() == DType::f32);
  CHECK(t.shape() == Shape{1, 1, 1, 2});
  CHECK(t.to_vector<float>() == std::vector<float>{1.0f, -2.0f});
}

TEST_CASE("IDX round trip through write_idx, plain and gzip", "[io]") {
  TempDir d;
  std::vector<float> v(60);
  for (size_t i = 0; i < v.size(); ++i) v[i] = float(i % 256);
  Tensor u8 = from_vector(v, Shape{3, 4, 5}).astype(DType::u8);
  Tensor f32 = from_vector(std::vector<float>{0.5f, -1.25f, 3e7f, 0.0f}, Shape{2, 2});
  Tensor i32 = from_vector(std::vector<int32_t>{-7, 1 << 30, 0}, Shape{3});
  for (const std::string suffix : {"", ".gz"}) {
    for (const auto& [name, t] : std::map<std::string, Tensor>{{"u8", u8}, {"f32", f32}, {"i32", i32}}) {
      std::string p = d / (name + suffix);
      write_idx(p, t);
      Tensor r = read_idx(p);
      CHECK(r.dtype() == t.dtype());
      CHECK(r.shape() == t.shape());
      CHECK(r.to_vector<double>() == t.to_vector<double>());
    }
  }
  // The plain file is exactly the IDX layout.
  auto bytes = io_test::read_bytes(d / "u8");
  REQUIRE(bytes.size() == 4 + 3 * 4 + 60);
  CHECK(std::vector<unsigned char>(bytes.begin(), bytes.begin() + 8) ==
        std::vector<unsigned char>{0, 0, 0x08, 3, 0, 0, 0, 3});
  CHECK(bytes.back() == 59);
  // The .gz file is really compressed (gzip magic 1f 8b).
  auto gz = io_test::read_bytes(d / "u8.gz");
  REQUIRE(gz.size() > 2);
  CHECK((gz[0] == 0x1f && gz[1] == 0x8b));
  // A transposed (non-contiguous) tensor is written in logical order.
  Tensor tt = from_vector(std::vector<float>{1, 2, 3, 4, 5, 6}, Shape{2, 3}).T();
  write_idx(d / "t", tt);
  CHECK(read_idx(d / "t").to_vector<float>() == std::vector<float>{1, 4, 2, 5, 3, 6});
  CHECK_THROWS_AS(write_idx(d / "bad", zeros(Shape{2}, DType::i64)), DTypeError);
  CHECK_THROWS_AS(write_idx(d / "bad", scalar(1.0)), ShapeError);
  CHECK_THROWS_AS(write_idx((d / "no_such_dir") + "/x", u8), IOError);
}

TEST_CASE("IDX reads gzip written by zlib and falls back to path.gz", "[io]") {
  TempDir d;
  auto b = idx_header(0x08, {4});
  b.insert(b.end(), {9, 8, 7, 6});
  write_gz(d / "labels.gz", b);
  CHECK(read_idx(d / "labels.gz").to_vector<uint8_t>() == std::vector<uint8_t>{9, 8, 7, 6});
  CHECK(read_idx(d / "labels").to_vector<uint8_t>() == std::vector<uint8_t>{9, 8, 7, 6});  // fallback
  // Content decides, not the name: a gzip stream without the suffix reads too.
  write_gz(d / "zipped_no_suffix", b);
  CHECK(read_idx(d / "zipped_no_suffix").to_vector<uint8_t>() == std::vector<uint8_t>{9, 8, 7, 6});
  CHECK_THROWS_AS(read_idx(d / "missing"), IOError);
}

TEST_CASE("IDX malformed files give DataError naming the file and the field", "[io]") {
  TempDir d;
  auto good = idx_header(0x08, {2, 2});
  good.insert(good.end(), {1, 2, 3, 4});

  auto truncated = good;
  truncated.resize(truncated.size() - 1);
  io_test::write_bytes(d / "case_a", truncated);
  expect_data_error(d / "case_a", "truncated");

  auto bad_magic = good;
  bad_magic[0] = 0x1F;
  io_test::write_bytes(d / "case_b", bad_magic);
  expect_data_error(d / "case_b", "magic");

  auto bad_type = good;
  bad_type[2] = 0x0B;  // int16: not supported
  io_test::write_bytes(d / "bad_type", bad_type);
  expect_data_error(d / "bad_type", "0x0B");

  io_test::write_bytes(d / "zero_dims", {0, 0, 0x08, 0, 1, 2, 3});
  expect_data_error(d / "zero_dims", "dimensions");

  auto five = idx_header(0x08, {1, 1, 1, 1, 1});
  five.push_back(0);
  io_test::write_bytes(d / "five_dims", five);
  expect_data_error(d / "five_dims", "dimensions");

  io_test::write_bytes(d / "short_header", {0, 0, 0x08, 2, 0, 0, 0});
  expect_data_error(d / "short_header", "dimension sizes");

  io_test::write_bytes(d / "tiny", {0, 0});
  expect_data_error(d / "tiny", "truncated");

  // Absurd sizes must fail before any allocation.
  io_test::write_bytes(d / "huge", idx_header(0x0D, {0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu}));
  expect_data_error(d / "huge", "truncated");

  // A truncated gzip file: its stream ends before the data does.
  std::vector<unsigned char> big = idx_header(0x08, {100, 100});
  for (int i = 0; i < 10000; ++i) big.push_back((unsigned char)(i * 7919 % 251));
  write_gz(d / "big.gz", big);
  auto gz = io_test::read_bytes(d / "big.gz");
  gz.resize(gz.size() / 2);
  io_test::write_bytes(d / "cut.gz", gz);
  CHECK_THROWS_AS(read_idx(d / "cut.gz"), DataError);
  // A corrupted gzip stream (bytes flipped in the middle of the deflate data).
  gz = io_test::read_bytes(d / "big.gz");
  for (size_t i = 20; i < 60 && i < gz.size(); ++i) gz[i] ^= 0x5A;
  io_test::write_bytes(d / "corrupt.gz", gz);
  CHECK_THROWS_AS(read_idx(d / "corrupt.gz"), DataError);
}

// ---------------------------------------------------------------------------------------- MNIST

namespace {

// Writes a synthetic MNIST split: n images where image i has pixel (r, c) = (i + r + c) % 256.
void write_mnist_split(const TempDir& d, const std::string& prefix, int n, const std::vector<unsigned char>& labels,
                       bool gz = false) {
  auto img = idx_header(0x08, {uint32_t(n), 28, 28});
  for (int i = 0; i < n; ++i)
    for (int r = 0; r < 28; ++r)
      for (int c = 0; c < 28; ++c) img.push_back((unsigned char)((i + r + c) % 256));
  auto lbl = idx_header(0x08, {uint32_t(labels.size())});
  lbl.insert(lbl.end(), labels.begin(), labels.end());
  std::string ip = d / (prefix + "-images-idx3-ubyte"), lp = d / (prefix + "-labels-idx1-ubyte");
  if (gz) {
    write_gz(ip + ".gz", img);
    write_gz(lp + ".gz", lbl);
  } else {
    io_test::write_bytes(ip, img);
    io_test::write_bytes(lp, lbl);
  }
}

}  // namespace

TEST_CASE("load_mnist reads synthetic IDX files", "[io]") {
  TempDir d;
  write_mnist_split(d, "train", 3, {7, 0, 9});
  write_mnist_split(d, "t10k", 2, {1, 2}, /*gz=*/true);
  CHECK(mnist_present(d.path.string()));

  auto tr = load_mnist(d.path.string(), "train");
  REQUIRE(tr->size() == 3);
  const Tensor& x = tr->items().at("x");
  const Tensor& y = tr->items().at("y");
  CHECK(x.dtype() == DType::f32);
  CHECK(x.shape() == Shape{3, 1, 28, 28});
  CHECK(y.dtype() == DType::i64);
  CHECK(y.to_vector<int64_t>() == std::vector<int64_t>{7, 0, 9});
  auto xv = x.to_vector<float>();
  // image 2, row 5, column 9: pixel 16
  CHECK(xv[2 * 784 + 5 * 28 + 9] == Approx((16.0 / 255.0 - 0.1307) / 0.3081).epsilon(1e-6));
  CHECK(xv[0] == Approx(-0.1307 / 0.3081).epsilon(1e-6));

  auto raw = load_mnist(d.path.string(), "train", {.normalize = false, .flatten = true});
  CHECK(raw->items().at("x").shape() == Shape{3, 784});
  auto rv = raw->items().at("x").to_vector<float>();
  CHECK(rv[2 * 784 + 5 * 28 + 9] == Approx(16.0 / 255.0));
  CHECK(rv[1 * 784 + 27 * 28 + 27] == Approx(55.0 / 255.0));

  auto te = load_mnist(d.path.string(), "test");  // from the .gz files
  CHECK(te->size() == 2);
  CHECK(te->items().at("y").to_vector<int64_t>() == std::vector<int64_t>{1, 2});
}

TEST_CASE("load_mnist rejects bad splits, missing files, mismatched counts and bad labels", "[io]") {
  TempDir d;
  try {
    load_mnist(d.path.string(), "tset");
    FAIL("expected ValueError");
  } catch (const ValueError& e) {
    CHECK(contains(e.what(), "did you mean 'test'?"));
  }
  CHECK_FALSE(mnist_present(d.path.string()));
  try {
    load_mnist(d.path.string(), "train");
    FAIL("expected IOError");
  } catch (const IOError& e) {
    CHECK(contains(e.what(), "train-images-idx3-ubyte"));
  }

  write_mnist_split(d, "train", 3, {1, 2});  // 3 images, 2 labels
  try {
    load_mnist(d.path.string(), "train");
    FAIL("expected DataError");
  } catch (const DataError& e) {
    CHECK(contains(e.what(), "counts differ"));
  }
  write_mnist_split(d, "train", 3, {1, 10, 2});
  try {
    load_mnist(d.path.string(), "train");
    FAIL("expected DataError");
  } catch (const DataError& e) {
    CHECK(contains(e.what(), "train-labels-idx1-ubyte"));
    CHECK(contains(e.what(), "0..9"));
  }
  // Labels stored as images (wrong rank) are refused.
  auto img = idx_header(0x08, {1, 28, 28});
  img.resize(img.size() + 784, 0);
  io_test::write_bytes(d / "train-labels-idx1-ubyte", img);
  CHECK_THROWS_AS(load_mnist(d.path.string(), "train"), DataError);
}

TEST_CASE("fetched MNIST subset (only when data/mnist exists)", "[io][mnist_data]") {
  const std::string dir = std::string(TITANAX_SOURCE_DIR) + "/data/mnist";
  if (!mnist_present(dir)) {
    WARN("skipped: " << dir << " holds no MNIST files (fetch them with titanax::fetch_mnist)");
    SUCCEED();
    return;
  }
  auto tr = load_mnist(dir, "train", {.normalize = false});
  auto te = load_mnist(dir, "test", {.normalize = false});
  CHECK(tr->size() == 9003);
  CHECK(te->size() == 997);
  // Per class: n_c - floor(n_c / 10) train, floor(n_c / 10) test.
  const std::vector<int64_t> n_c = {1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978};
  std::map<int64_t, int64_t> ctr, cte;
  for (auto v : tr->items().at("y").to_vector<int64_t>()) ctr[v]++;
  for (auto v : te->items().at("y").to_vector<int64_t>()) cte[v]++;
  for (int64_t c = 0; c < 10; ++c) {
    CHECK(ctr[c] == n_c[size_t(c)] - n_c[size_t(c)] / 10);
    CHECK(cte[c] == n_c[size_t(c)] / 10);
  }
  // Real digits: mostly background, some full-intensity strokes.
  auto px = te->items().at("x").to_vector<float>();
  size_t zeros_ = 0, bright = 0;
  for (float p : px) zeros_ += p == 0.0f, bright += p > 0.9f;
  CHECK(double(zeros_) / double(px.size()) > 0.7);
  CHECK(bright > 1000);
  CHECK_FALSE(fetch_mnist(dir));  // present: nothing to do
}
