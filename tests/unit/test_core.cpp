// core/: shapes, dtypes, Philox, allocator statistics, errors, tensor views.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>

#include <titanax/titanax.h>

using namespace titanax;

TEST_CASE("shape basics and broadcasting", "[core]") {
  Shape s{2, 3, 4};
  CHECK(s.numel() == 24);
  CHECK(s.contiguous_strides() == Shape{12, 4, 1});
  CHECK(s.str() == "[2, 3, 4]");
  CHECK(broadcast_shapes(Shape{2, 3, 4}, Shape{3, 1}) == Shape{2, 3, 4});
  CHECK(broadcast_shapes(Shape{4}, Shape{2, 1, 4}) == Shape{2, 1, 4});
  CHECK(broadcast_shapes(Shape{}, Shape{5}) == Shape{5});
  CHECK_THROWS_AS(broadcast_shapes(Shape{2, 3}, Shape{4, 3, 2}), ShapeError);
  CHECK(normalize_axis(-1, 3) == 2);
  CHECK_THROWS_AS(normalize_axis(3, 3), ShapeError);
  CHECK_THROWS_AS(Shape({1, 2, 3, 4, 5, 6, 7, 8, 9}), ShapeError);
}

TEST_CASE("bf16 and f16 conversions round to nearest even", "[core][dtype]") {
  // Reference bit patterns from the IEEE 754 binary16 and bfloat16 definitions.
  CHECK(f16_t(1.0f).bits == 0x3c00);
  CHECK(f16_t(-2.0f).bits == 0xc000);
  CHECK(f16_t(65504.0f).bits == 0x7bff);
  CHECK(f16_t(65520.0f).bits == 0x7c00);              // rounds up to inf
  CHECK(f16_t(5.9604644775390625e-08f).bits == 0x0001);  // smallest subnormal 2^-24
  CHECK(f16_t(0.333333343f).bits == 0x3555);
  CHECK(std::isnan(float(f16_t(NAN))));
  CHECK(float(f16_t(uint16_t(0)) ) == 0.0f);
  CHECK(bf16_t(1.0f).bits == 0x3f80);
  CHECK(bf16_t(3.14159265f).bits == 0x4049);
  CHECK(std::isnan(float(bf16_t(NAN))));
  // Every f16 value converts to float and back unchanged.
  for (uint32_t b = 0; b < 0x10000; ++b) {
    f16_t h;
    h.bits = uint16_t(b);
    float f = float(h);
    if (std::isnan(f)) continue;
    REQUIRE(f16_t(f).bits == h.bits);
  }
  CHECK(dtype_from_name("bfloat16") == DType::bf16);
  CHECK_THROWS_AS(dtype_from_name("flaot32"), DTypeError);
}

TEST_CASE("Philox 4x32-10 matches the Random123 known-answer vectors", "[core][rng]") {
  // kat_vectors from Random123 (Salmon et al.): philox4x32 10 rounds.
  auto r = philox4x32({0, 0, 0, 0}, {0, 0});
  CHECK(r == std::array<uint32_t, 4>{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8});
  r = philox4x32({0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff});
  CHECK(r == std::array<uint32_t, 4>{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd});
  r = philox4x32({0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0});
  CHECK(r == std::array<uint32_t, 4>{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1});
}

TEST_CASE("fold_in and split give distinct, reproducible keys", "[core][rng]") {
  RngKey k = RngKey::from_seed(42);
  CHECK(fold_in(k, 0) == fold_in(k, 0));
  CHECK_FALSE(fold_in(k, 0) == fold_in(k, 1));
  auto [a, b] = split(k);
  CHECK_FALSE(a == b);
  // Samples: uniform in [0, 1), normal with mean ~0 and variance ~1 over many draws.
  Tensor u = random_uniform(k, Shape{100000});
  auto uv = u.to_vector<float>();
  double mean = 0;
  for (float x : uv) {
    REQUIRE(x >= 0.0f);
    REQUIRE(x < 1.0f);
    mean += x;
  }
  CHECK(mean / uv.size() == Approx(0.5).margin(0.01));
  auto nv = random_normal(k, Shape{100001}, DType::f64).to_vector<double>();
  double m = 0, v = 0;
  for (double x : nv) m += x;
  m /= nv.size();
  for (double x : nv) v += (x - m) * (x - m);
  v /= nv.size();
  CHECK(m == Approx(0).margin(0.02));
  CHECK(v == Approx(1).margin(0.02));
  // Same key, same numbers; different key, different numbers.
  CHECK(random_uniform(k, Shape{8}).to_vector<float>() == random_uniform(k, Shape{8}).to_vector<float>());
  CHECK(random_uniform(k, Shape{8}).to_vector<float>() != random_uniform(fold_in(k, 1), Shape{8}).to_vector<float>());
}

TEST_CASE("allocator statistics track current and peak bytes", "[core][allocator]") {
  Allocator& a = allocator_for(Device::cpu());
  a.reset_peak();
  auto before = a.stats();
  {
    Tensor t = empty(Shape{1024, 256}, DType::f32);  // 1 MiB
    auto during = a.stats();
    CHECK(during.current_bytes - before.current_bytes >= 1 << 20);
    CHECK(during.peak_bytes >= during.current_bytes);
  }
  auto after = a.stats();
  CHECK(after.current_bytes == before.current_bytes);
  CHECK(after.peak_bytes - before.current_bytes >= 1 << 20);
  // A freed block of the same size is reused: no new system allocation.
  { Tensor t = empty(Shape{1024, 256}); }
  auto s0 = a.stats();
  { Tensor t = empty(Shape{1024, 256}); }
  CHECK(a.stats().num_system_allocs == s0.num_system_allocs);
}

TEST_CASE("errors carry what was expected, what was found, the call site and a fix", "[core][errors]") {
  try {
    throw MeshError("axis 'dat' is not in the mesh", "one of data, model", "'dat'", did_you_mean("dat", {"data", "model"}));
  } catch (const Error& e) {
    std::string w = e.what();
    CHECK(w.find("MeshError") != std::string::npos);
    CHECK(w.find("expected: one of data, model") != std::string::npos);
    CHECK(w.find("found:    'dat'") != std::string::npos);
    CHECK(w.find("did you mean 'data'?") != std::string::npos);
    CHECK(w.find("test_core.cpp") != std::string::npos);
  }
  CHECK(nearest("lerning_rate", {"learning_rate", "batch_size"}) == "learning_rate");
  CHECK(nearest("zzzzzz", {"learning_rate", "batch_size"}).empty());
}

TEST_CASE("tensor views share storage; contiguous copies", "[core][tensor]") {
  Tensor x = from_vector(std::vector<float>{0, 1, 2, 3, 4, 5}, Shape{2, 3});
  Tensor t = x.T();
  CHECK(t.shape() == Shape{3, 2});
  CHECK_FALSE(t.is_contiguous());
  CHECK(t.storage() == x.storage());
  CHECK(t.to_vector<float>() == std::vector<float>{0, 3, 1, 4, 2, 5});
  Tensor c = t.contiguous();
  CHECK(c.is_contiguous());
  CHECK(c.storage() != x.storage());
  CHECK(x.slice(1, 1, 3).to_vector<float>() == std::vector<float>{1, 2, 4, 5});
  CHECK(x.reshape(Shape{3, -1}).shape() == Shape{3, 2});
  CHECK_THROWS_AS(x.reshape(Shape{4, -1}), ShapeError);
  CHECK(x.astype(DType::bf16).astype(DType::f32).to_vector<float>() == x.to_vector<float>());
  CHECK_THROWS_AS(Tensor().shape(), ValueError);
  CHECK_THROWS_AS(x.to(Device::cuda(0)), DeviceError);
  CHECK(arange(0, 5).to_vector<int64_t>() == std::vector<int64_t>{0, 1, 2, 3, 4});
  CHECK(scalar(2.5).item() == 2.5);
}

TEST_CASE("ParamTree keeps order and suggests near paths", "[core][tree]") {
  ParamTree t;
  t.insert("layers/0/weight", zeros(Shape{2, 2}));
  t.insert("layers/0/bias", zeros(Shape{2}));
  CHECK(t.paths() == std::vector<std::string>{"layers/0/weight", "layers/0/bias"});
  CHECK(t.numel() == 6);
  try {
    (void)t.at("layers/0/wieght");
    FAIL("expected an error");
  } catch (const ValueError& e) {
    CHECK(std::string(e.what()).find("did you mean 'layers/0/weight'?") != std::string::npos);
  }
  CHECK_THROWS_AS(t.insert("layers/0/bias", zeros(Shape{1})), ValueError);
}

TEST_CASE("empty tensors go through every kernel path", "[core][tensor]") {
  Tensor e = zeros(Shape{0, 3});
  CHECK(e.numel() == 0);
  CHECK((e + 1.0).shape() == Shape{0, 3});
  CHECK(sum(e, {0}).to_vector<float>() == std::vector<float>{0, 0, 0});
  CHECK(e.astype(DType::f64).T().contiguous().shape() == Shape{3, 0});
  CHECK(concat({e, ones(Shape{2, 3})}, 0).shape() == Shape{2, 3});
}
