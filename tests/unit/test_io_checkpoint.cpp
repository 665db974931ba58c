// io/safetensors and io/checkpoint: format compatibility, validation of hostile files, atomic
// checkpoints, pruning, corruption detection and crash safety.
#include <catch2/catch.hpp>

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>

#include <csignal>
#include <cstdlib>
#include <cstring>
#include <condition_variable>
#include <filesystem>
#include <functional>
#include <mutex>
#include <random>
#include <thread>

#include <nlohmann/json.hpp>
#include <titanax/titanax.h>

#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "io_test_util.h"
#include "reshard_util.h"

using namespace titanax;
using io_test::TempDir;
namespace fs = std::filesystem;

namespace {

bool contains(const std::string& s, const std::string& sub) { return s.find(sub) != std::string::npos; }

std::vector<unsigned char> bytes_of(const Tensor& t) {
  Tensor c = t.contiguous();
  std::vector<unsigned char> v(c.nbytes());
  if (!v.empty()) std::memcpy(v.data(), c.raw_data(), v.size());
  return v;
}

void le64(std::vector<unsigned char>& v, uint64_t x) {
  for (int i = 0; i < 8; ++i) v.push_back((unsigned char)(x >> (8 * i)));
}

// A safetensors file assembled by hand: 8-byte little-endian header length, header, data.
std::vector<unsigned char> st_file(const std::string& header, const std::vector<unsigned char>& data) {
  std::vector<unsigned char> f;
  le64(f, header.size());
  f.insert(f.end(), header.begin(), header.end());
  f.insert(f.end(), data.begin(), data.end());
  return f;
}

// Expects read_safetensors(path) to throw CheckpointError naming the file and `check`.
void expect_st_error(const std::string& path, const std::string& check) {
  try {
    read_safetensors(path);
    FAIL("expected CheckpointError for " << path);
  } catch (const CheckpointError& e) {
    INFO(e.what());
    CHECK(contains(e.what(), path));
    CHECK(contains(e.what(), check));
  }
}

ParamTree sample_tree(uint64_t seed) {
  RngKey k = RngKey::from_seed(seed);
  ParamTree p;
  p.insert("layers/0/w", random_normal(fold_in(k, 0), Shape{4, 3}));
  p.insert("layers/0/b", random_normal(fold_in(k, 1), Shape{3}).astype(DType::bf16));
  p.insert("step_count", scalar(double(seed) + 41, DType::i64));
  p.insert("mask", from_vector(std::vector<float>{1, 0, 1}, Shape{3}).astype(DType::u8));
  p.insert("opt/m", random_uniform(fold_in(k, 2), Shape{2, 2}, DType::f64));
  return p;
}

ParamTree zeros_like_tree(const ParamTree& p) {
  return p.map([](const std::string&, const Tensor& t) { return zeros_like(t); });
}

void check_bitwise_equal(const ParamTree& a, const ParamTree& b) {
  REQUIRE(a.size() == b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    INFO(a[i].first);
    CHECK(a[i].first == b[i].first);
    CHECK(a[i].second.dtype() == b[i].second.dtype());
    CHECK(a[i].second.shape() == b[i].second.shape());
    CHECK(bytes_of(a[i].second) == bytes_of(b[i].second));
  }
}

nlohmann::json read_json(const std::string& path) {
  auto b = io_test::read_bytes(path);
  return nlohmann::json::parse(std::string(b.begin(), b.end()));
}

uint32_t zlib_crc(const std::string& path) {
  auto b = io_test::read_bytes(path);
  return uint32_t(crc32(crc32(0L, Z_NULL, 0), b.data(), uInt(b.size())));
}

}  // namespace

// ---------------------------------------------------------------------------------------- safetensors

TEST_CASE("safetensors round trip of every dtype, bitwise", "[io]") {
  TempDir d;
  ParamTree p;
  p.insert("f32", from_vector(std::vector<float>{1.5f, -0.0f, 3.25e-20f, INFINITY}, Shape{2, 2}));
  p.insert("f64", from_vector(std::vector<double>{1e300, -2.5}, Shape{2}));
  p.insert("f16", from_vector(std::vector<float>{1.0f, -65504.0f, 0.333f}, Shape{3}).astype(DType::f16));
  p.insert("bf16", from_vector(std::vector<float>{3.14159f, -1e30f}, Shape{1, 2}).astype(DType::bf16));
  p.insert("i32", from_vector(std::vector<int32_t>{INT32_MIN, 7, -1}, Shape{3}));
  p.insert("i64", from_vector(std::vector<int64_t>{INT64_MAX, -5}, Shape{2, 1}));
  p.insert("u8", from_vector(std::vector<float>{0, 255, 128}, Shape{3}).astype(DType::u8));
  p.insert("bool", from_vector(std::vector<float>{1, 0, 0, 1}, Shape{2, 2}).astype(DType::bool_));
  p.insert("scalar", scalar(2.0, DType::f32));
  p.insert("empty", empty(Shape{0, 3}));  // (zeros() of an empty shape trips a core bug: fill divides by 0)
  p.insert("strided", from_vector(std::vector<float>{1, 2, 3, 4, 5, 6}, Shape{2, 3}).T());  // written contiguous
  std::map<std::string, std::string> meta{{"format", "pt"}, {"note", "hello \"world\""}};
  uint32_t crc = write_safetensors(d / "all.safetensors", p, meta);
  CHECK(crc == zlib_crc(d / "all.safetensors"));

  SafetensorsFile f = read_safetensors(d / "all.safetensors");
  CHECK(f.metadata == meta);
  check_bitwise_equal(p, f.tensors);
  CHECK(f.tensors.at("strided").to_vector<float>() == std::vector<float>{1, 4, 2, 5, 3, 6});

  // The bytes follow the specification (checked here with a JSON parser, not the reader).
  auto raw = io_test::read_bytes(d / "all.safetensors");
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t(raw[size_t(i)]) << (8 * i);
  CHECK((8 + n) % 8 == 0);
  auto h = nlohmann::json::parse(std::string(raw.begin() + 8, raw.begin() + 8 + long(n)));
  CHECK(h["__metadata__"]["format"] == "pt");
  CHECK(h["bf16"]["dtype"] == "BF16");
  CHECK(h["bool"]["dtype"] == "BOOL");
  CHECK(h["f16"]["dtype"] == "F16");
  CHECK(h["i64"]["shape"] == nlohmann::json::array({2, 1}));
  CHECK(h["scalar"]["shape"] == nlohmann::json::array());
  uint64_t b = h["i32"]["data_offsets"][0], e = h["i32"]["data_offsets"][1];
  CHECK(e - b == 12);
  const unsigned char* p_i32 = raw.data() + 8 + n + b;
  CHECK(std::vector<unsigned char>(p_i32, p_i32 + 4) == std::vector<unsigned char>{0, 0, 0, 0x80});  // INT32_MIN LE
  CHECK(h["f32"]["data_offsets"][0] == 0);  // ParamTree order
  CHECK(h["empty"]["data_offsets"][0] == h["empty"]["data_offsets"][1]);
  CHECK(raw.size() == 8 + n + uint64_t(h["strided"]["data_offsets"][1]));

  CHECK_THROWS_AS(write_safetensors(d / "bad", ParamTree{{"__metadata__", zeros(Shape{1})}}), ValueError);
}

TEST_CASE("safetensors reads a file laid out as Python's safetensors writes it", "[io]") {
  TempDir d;
  // As safetensors.serialize would: compact JSON, "__metadata__" first, tensors sorted by alignment then
  // name in the data (I64 before F32 before BF16), header padded with spaces to 8 bytes.
  std::string header =
      R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},)"
      R"("b":{"dtype":"I64","shape":[1,1],"data_offsets":[0,8]},"c":{"dtype":"BF16","shape":[],"data_offsets":[16,18]}})";
  while ((8 + header.size()) % 8) header += ' ';
  std::vector<unsigned char> data = {
      0xFD, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,  // b = -3 (i64 LE)
      0x00, 0x00, 0xC0, 0x3F, 0x00, 0x00, 0x00, 0xC0,  // a = [1.5, -2.0] (f32 LE)
      0x80, 0x3F,                                      // c = 1.0 (bf16 0x3F80)
  };
  io_test::write_bytes(d / "py.safetensors", st_file(header, data));
  SafetensorsFile f = read_safetensors(d / "py.safetensors");
  CHECK(f.metadata.at("format") == "pt");
  REQUIRE(f.tensors.size() == 3);
  CHECK(f.tensors.paths() == std::vector<std::string>{"b", "a", "c"});  // data order
  CHECK(f.tensors.at("a").dtype() == DType::f32);
  CHECK(f.tensors.at("a").to_vector<float>() == std::vector<float>{1.5f, -2.0f});
  CHECK(f.tensors.at("b").shape() == Shape{1, 1});
  CHECK(f.tensors.at("b").to_vector<int64_t>() == std::vector<int64_t>{-3});
  CHECK(f.tensors.at("c").dtype() == DType::bf16);
  CHECK(f.tensors.at("c").shape() == Shape{});
  CHECK(f.tensors.at("c").item() == 1.0);
  // No metadata and no padding at all is fine too.
  std::string h2 = R"({"x":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}})";
  io_test::write_bytes(d / "min.safetensors", st_file(h2, {7, 8, 9}));
  auto g = read_safetensors(d / "min.safetensors");
  CHECK(g.metadata.empty());
  CHECK(g.tensors.at("x").to_vector<uint8_t>() == std::vector<uint8_t>{7, 8, 9});
}

TEST_CASE("safetensors rejects files that lie or are cut short", "[io]") {
  TempDir d;
  const std::string ok = R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  const std::vector<unsigned char> eight(8, 0);
  // Files are numbered, so a check word can never match the file's own name.
  int counter = 0;
  auto put = [&](const std::string& /*what*/, const std::vector<unsigned char>& bytes) {
    std::string path = d / ("case" + std::to_string(counter++) + ".safetensors");
    io_test::write_bytes(path, bytes);
    return path;
  };

  auto lie = st_file(ok, eight);
  lie[0] = 0xFF, lie[1] = 0xFF;  // header length 65535 + ... in a 70-byte file
  expect_st_error(put("lie", lie), "header length beyond the file size");
  auto huge = st_file(ok, eight);
  for (int i = 0; i < 8; ++i) huge[size_t(i)] = 0xFF;
  expect_st_error(put("huge", huge), "header length beyond the file size");
  expect_st_error(put("tiny", {1, 2, 3}), "too short");

  auto cut = st_file(ok, eight);
  cut.resize(cut.size() - 3);
  expect_st_error(put("truncated", cut), "past the end");

  expect_st_error(put("badjson", st_file(R"({"x":{"dtype":"F32",)", eight)), "not valid JSON");
  expect_st_error(put("array", st_file("[1,2]", {})), "not a JSON object");
  expect_st_error(put("dtype", st_file(R"({"x":{"dtype":"I16","shape":[4],"data_offsets":[0,8]}})", eight)),
                  "unsupported dtype");
  expect_st_error(put("size", st_file(R"({"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", eight)),
                  "numel * itemsize");
  expect_st_error(put("overlap", st_file(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                         R"("y":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                                         eight)),
                  "overlap");
  expect_st_error(put("gap", st_file(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", eight)), "gap");
  expect_st_error(put("trailing", st_file(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", eight)),
                  "longer than its tensors");
  expect_st_error(put("noshape", st_file(R"({"x":{"dtype":"F32","data_offsets":[0,8]}})", eight)), "shape");
  expect_st_error(put("negdim", st_file(R"({"x":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", eight)),
                  "bad dimension");
  expect_st_error(put("offsets", st_file(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[8]}})", eight)),
                  "data_offsets");
  expect_st_error(put("reversed", st_file(R"({"x":{"dtype":"U8","shape":[0],"data_offsets":[8,0]}})", eight)),
                  "end < begin");
  expect_st_error(put("meta", st_file(R"({"__metadata__":{"a":1},"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", eight)),
                  "__metadata__");
  expect_st_error(put("bool", st_file(R"({"x":{"dtype":"BOOL","shape":[2],"data_offsets":[0,2]}})", {1, 2})), "BOOL");
  expect_st_error(put("bigshape", st_file(R"({"x":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", eight)),
                  "numel * itemsize");
  CHECK_THROWS_AS(read_safetensors(d / "does_not_exist"), IOError);
}

// ---------------------------------------------------------------------------------------- Checkpointer

TEST_CASE("Checkpointer save / load round trip is bitwise and keeps tensor identity", "[io]") {
  TempDir d;
  Checkpointer ck((d.path / "ckpt").string(), 3);
  CHECK(ck.steps().empty());
  CHECK_FALSE(ck.latest().has_value());
  ParamTree p = sample_tree(1);
  ck.save(100, p, R"({"loader_step": 100, "config": "lr: 0.1"})", {{"layers/0/w", {"model", ""}}},
          R"({"data": 1, "model": 2})", R"({"dp": "data"})");
  CHECK(fs::is_directory(d.path / "ckpt" / "step_00000100"));
  CHECK(fs::is_regular_file(d.path / "ckpt" / "step_00000100" / "rank_00000.safetensors"));
  CHECK_FALSE(fs::exists(d.path / "ckpt" / "step_00000100.tmp"));
  CHECK(ck.steps() == std::vector<int64_t>{100});
  CHECK(ck.latest() == 100);

  ParamTree into = zeros_like_tree(p);
  std::vector<const void*> ptrs;
  for (const auto& [n, t] : into) ptrs.push_back(t.raw_data());
  CheckpointInfo info = ck.load(100, into);
  check_bitwise_equal(p, into);
  for (size_t i = 0; i < into.size(); ++i) CHECK(into[i].second.raw_data() == ptrs[i]);  // in place
  CHECK(info.step == 100);
  CHECK(info.world_size == 1);
  CHECK(info.path == (d.path / "ckpt" / "step_00000100").string());
  auto extra = nlohmann::json::parse(info.extra_json);
  CHECK(extra["loader_step"] == 100);
  CHECK(extra["config"] == "lr: 0.1");

  // metadata.json as documented; the checksum is the file's CRC-32 computed here with zlib.
  auto meta = read_json((d.path / "ckpt" / "step_00000100" / "metadata.json").string());
  CHECK(meta["format_version"] == 3);
  CHECK(meta["step"] == 100);
  CHECK(meta["world_size"] == 1);
  CHECK(meta["plan"]["dp"] == "data");
  CHECK(meta["mesh"]["model"] == 2);
  REQUIRE(meta["shards"].size() == 1);
  CHECK(meta["shards"][0]["file"] == "rank_00000.safetensors");
  char want[16];
  std::snprintf(want, sizeof want, "%08x", zlib_crc((d.path / "ckpt" / "step_00000100" / "rank_00000.safetensors").string()));
  CHECK(meta["shards"][0]["crc32"] == want);
  CHECK(meta["tensors"]["layers/0/w"]["global_shape"] == nlohmann::json::array({8, 3}));
  CHECK(meta["tensors"]["layers/0/w"]["spec"] == nlohmann::json::array({"model", ""}));
  CHECK(meta["tensors"]["layers/0/b"]["global_shape"] == nlohmann::json::array({3}));
  CHECK(meta["tensors"]["layers/0/b"]["dtype"] == "bf16");
  // The shard is a plain safetensors file.
  auto shard = read_safetensors((d.path / "ckpt" / "step_00000100" / "rank_00000.safetensors").string());
  check_bitwise_equal(p, shard.tensors);

  CHECK_THROWS_AS(ck.save(101, p, "{not json"), ValueError);
  CHECK_THROWS_AS(ck.save(101, p, "{}", {{"layers/0/W", {"model"}}}), ValueError);  // no such tensor
  CHECK_THROWS_AS(ck.save(-1, p), ValueError);
  CHECK(ck.steps() == std::vector<int64_t>{100});  // failed saves leave nothing behind
  CHECK_FALSE(fs::exists(d.path / "ckpt" / "step_00000101.tmp"));
  CHECK_THROWS_AS(Checkpointer(d.path.string(), 0), ValueError);
}

TEST_CASE("Checkpointer keeps the last N checkpoints and ignores incomplete ones", "[io]") {
  TempDir d;
  Checkpointer ck(d.path.string(), 2);
  ParamTree p = sample_tree(2);
  fs::create_directories(d.path / "step_00000009.tmp");  // a crashed save's leftovers
  fs::create_directories(d.path / "step_00000007");      // no metadata.json: incomplete
  fs::create_directories(d.path / "notes");
  for (int64_t s : {1, 2, 3, 4, 5}) ck.save(s * 10, p);
  CHECK(ck.steps() == std::vector<int64_t>{40, 50});
  CHECK(ck.latest() == 50);
  CHECK_FALSE(fs::exists(d.path / "step_00000010"));
  CHECK_FALSE(fs::exists(d.path / "step_00000030"));
  CHECK_FALSE(fs::exists(d.path / "step_00000009.tmp"));
  CHECK(fs::exists(d.path / "step_00000007"));  // not ours to delete
  CHECK(fs::exists(d.path / "notes"));

  // Saving a step again replaces it.
  ParamTree q = sample_tree(3);
  ck.save(50, q);
  CHECK(ck.steps() == std::vector<int64_t>{40, 50});
  ParamTree into = zeros_like_tree(q);
  ck.load(50, into);
  check_bitwise_equal(q, into);
  // A step above 10^8 still sorts numerically.
  ck.save(123456789, p);
  CHECK(ck.latest() == 123456789);
  CHECK(fs::exists(d.path / "step_123456789"));
}

TEST_CASE("Checkpointer load detects corruption and mismatches, leaving the tensors untouched", "[io]") {
  TempDir d;
  Checkpointer ck(d.path.string(), 5);
  ParamTree p = sample_tree(4);
  ck.save(1, p);
  const std::string shard = (d.path / "step_00000001" / "rank_00000.safetensors").string();
  const std::string meta_path = (d.path / "step_00000001" / "metadata.json").string();
  auto expect_ck_error = [&](ParamTree& into, std::vector<std::string> words, int64_t step = 1) {
    ParamTree before = into.map([](const std::string&, const Tensor& t) { return t.clone(); });
    try {
      ck.load(step, into);
      FAIL("expected CheckpointError");
    } catch (const CheckpointError& e) {
      INFO(e.what());
      for (const auto& w : words) CHECK(contains(e.what(), w));
    }
    check_bitwise_equal(before, into);
  };

  SECTION("a flipped byte in the shard") {
    auto b = io_test::read_bytes(shard);
    b[b.size() - 5] ^= 0x01;
    io_test::write_bytes(shard, b);
    ParamTree into = zeros_like_tree(p);
    expect_ck_error(into, {"checksum", "rank_00000.safetensors"});
  }
  SECTION("a tensor of another shape") {
    ParamTree into = zeros_like_tree(p);
    into.at("layers/0/w") = zeros(Shape{3, 4});
    expect_ck_error(into, {"layers/0/w", "shape", "[3, 4]", "[4, 3]", "rank_00000.safetensors"});
  }
  SECTION("a tensor of another dtype") {
    ParamTree into = zeros_like_tree(p);
    into.at("opt/m") = zeros(Shape{2, 2}, DType::f32);
    expect_ck_error(into, {"opt/m", "dtype"});
  }
  SECTION("a tensor missing from the checkpoint") {
    ParamTree into = zeros_like_tree(p);
    into.insert("layers/1/w", zeros(Shape{2}));
    expect_ck_error(into, {"layers/1/w", "missing"});
  }
  SECTION("a tensor the model does not have") {
    ParamTree into;
    for (const auto& [n, t] : p)
      if (n != "mask") into.insert(n, zeros_like(t));
    expect_ck_error(into, {"unexpected", "mask"});
  }
  SECTION("another world size") {
    auto m = read_json(meta_path);
    m["world_size"] = 2;
    std::string s = m.dump();
    io_test::write_bytes(meta_path, std::vector<unsigned char>(s.begin(), s.end()));
    ParamTree into = zeros_like_tree(p);
    expect_ck_error(into, {"ranks", "2"});
  }
  SECTION("an unknown format version") {
    auto m = read_json(meta_path);
    m["format_version"] = 99;
    std::string s = m.dump();
    io_test::write_bytes(meta_path, std::vector<unsigned char>(s.begin(), s.end()));
    ParamTree into = zeros_like_tree(p);
    expect_ck_error(into, {"format version", "99"});
  }
  SECTION("a metadata.json that is not JSON") {
    io_test::write_bytes(meta_path, {'{', 'x'});
    ParamTree into = zeros_like_tree(p);
    expect_ck_error(into, {"metadata.json", "not valid JSON"});
    CHECK(ck.steps().empty());  // no longer a complete checkpoint
  }
  SECTION("a missing shard or step") {
    fs::remove(shard);
    ParamTree into = zeros_like_tree(p);
    expect_ck_error(into, {"rank_00000.safetensors", "missing"});
    expect_ck_error(into, {"step_00000002", "not found"}, 2);
  }
}

TEST_CASE("Checkpointer: a crash mid-save leaves the previous checkpoint intact", "[io]") {
  TempDir d;
  ParamTree p1 = sample_tree(5);
  {
    Checkpointer ck(d.path.string(), 3);
    ck.save(1, p1);
  }
  const bool async = GENERATE(false, true);  // the shard written by the caller, or by save_async's thread
  INFO((async ? "save_async" : "save"));
  pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    // Child: die by SIGKILL after 100 bytes of the step-2 shard (mid-header).
    setenv("TITANAX_TEST_KILL_DURING_SAVE", "100", 1);
    try {
      Checkpointer ck(d.path.string(), 3);
      if (async) {
        ck.save_async(2, sample_tree(6));
        ck.wait();
      } else {
        ck.save(2, sample_tree(6));
      }
    } catch (...) {
      _exit(3);
    }
    _exit(0);  // not reached when the hook works
  }
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGKILL);
  // The partial save is there, under its temporary name, with exactly 100 bytes written.
  const fs::path partial = d.path / "step_00000002.tmp" / "rank_00000.safetensors";
  REQUIRE(fs::exists(partial));
  CHECK(fs::file_size(partial) == 100);
  CHECK_FALSE(fs::exists(d.path / "step_00000002"));

  Checkpointer ck(d.path.string(), 3);
  CHECK(ck.latest() == 1);
  CHECK(ck.steps() == std::vector<int64_t>{1});
  ParamTree into = zeros_like_tree(p1);
  ck.load(1, into);
  check_bitwise_equal(p1, into);
  // The next save goes through and clears the leftovers.
  ck.save(2, p1);
  CHECK(ck.steps() == std::vector<int64_t>{1, 2});
  CHECK_FALSE(fs::exists(d.path / "step_00000002.tmp"));
}

// ---------------------------------------------------------------------------------------- collective save

namespace {

// In-process "ranks" as threads: only what Checkpointer uses (rank, size, all_gather_string) works.
struct GatherHub {
  std::mutex mu;
  std::condition_variable cv;
  int size;
  int arrived = 0;
  uint64_t generation = 0;
  std::vector<std::string> slots, result;
  explicit GatherHub(int n) : size(n), slots(size_t(n)) {}
  std::vector<std::string> gather(int rank, const std::string& s) {
    std::unique_lock<std::mutex> lock(mu);
    slots[size_t(rank)] = s;
    uint64_t gen = generation;
    if (++arrived == size) {
      result = slots;
      arrived = 0;
      ++generation;
      cv.notify_all();
    } else {
      cv.wait(lock, [&] { return generation != gen; });
    }
    return result;
  }
};

struct ThreadComm final : Communicator {
  std::shared_ptr<GatherHub> hub;
  int r;
  ThreadComm(std::shared_ptr<GatherHub> h, int rank) : hub(std::move(h)), r(rank) {}
  int rank() const override { return r; }
  int size() const override { return hub->size; }
  std::string backend() const override { return "threads"; }
  std::vector<std::string> all_gather_string(const std::string& s) override { return hub->gather(r, s); }
  [[noreturn]] static void no() { throw InternalError("not used by Checkpointer"); }
  void all_reduce(Tensor&, CollectiveOp) override { no(); }
  std::unique_ptr<CollectiveRequest> iall_reduce(Tensor&, CollectiveOp) override { no(); }
  void broadcast(Tensor&, int) override { no(); }
  Tensor all_gather(const Tensor&) override { no(); }
  Tensor reduce_scatter(const Tensor&, CollectiveOp) override { no(); }
  std::unique_ptr<CollectiveRequest> ireduce_scatter(const Tensor&, Tensor&, CollectiveOp) override { no(); }
  Tensor all_to_all(const Tensor&) override { no(); }
  Tensor sendrecv(const Tensor&, int, int) override { no(); }
  void send(const Tensor&, int, int) override { no(); }
  void recv(Tensor&, int, int) override { no(); }
  std::unique_ptr<CollectiveRequest> isend(const Tensor&, int, int) override { no(); }
  std::unique_ptr<CollectiveRequest> irecv(Tensor&, int, int) override { no(); }
  void barrier() override { hub->gather(r, ""); }
  std::shared_ptr<Communicator> split(int, int) override { no(); }
};

// Runs fn(rank, comm) on `world` threads; returns each rank's error message ("" when it succeeded).
std::vector<std::string> run_ranks(int world, const std::function<void(int, std::shared_ptr<Communicator>)>& fn) {
  auto hub = std::make_shared<GatherHub>(world);
  std::vector<std::string> errors(static_cast<size_t>(world));
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r)
    threads.emplace_back([&, r] {
      try {
        fn(r, std::make_shared<ThreadComm>(hub, r));
      } catch (const std::exception& e) {
        errors[size_t(r)] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  return errors;
}

}  // namespace

TEST_CASE("Checkpointer saves collectively: one shard per rank, metadata from rank 0", "[io]") {
  TempDir d;
  const int world = 2;
  // Rank r holds its half of a [4, 3] weight split over "model" and a replicated bias.
  auto shard_of = [](int r) {
    ParamTree p;
    p.insert("w", full(Shape{2, 3}, double(r + 1)));
    p.insert("b", from_vector(std::vector<float>{0.5f, 1.5f}, Shape{2}));
    return p;
  };
  auto errors = run_ranks(world, [&](int r, std::shared_ptr<Communicator> comm) {
    Checkpointer ck(d.path.string(), 2, comm);
    ck.save(7, shard_of(r), R"({"epoch": 3})", {{"w", {"model", ""}}}, R"({"axes": ["model"], "shape": [2]})");
    ParamTree into{{"w", zeros(Shape{2, 3})}, {"b", zeros(Shape{2})}};
    CheckpointInfo info = ck.load(7, into);
    if (info.world_size != 2) throw std::runtime_error("world_size");
    if (into.at("w").to_vector<float>() != std::vector<float>(6, float(r + 1))) throw std::runtime_error("w values");
  });
  CHECK(errors == std::vector<std::string>{"", ""});
  CHECK(fs::exists(d.path / "step_00000007" / "rank_00000.safetensors"));
  CHECK(fs::exists(d.path / "step_00000007" / "rank_00001.safetensors"));
  auto meta = read_json((d.path / "step_00000007" / "metadata.json").string());
  CHECK(meta["world_size"] == 2);
  CHECK(meta["shards"].size() == 2);
  CHECK(meta["shards"][1]["file"] == "rank_00001.safetensors");
  CHECK(meta["tensors"]["w"]["global_shape"] == nlohmann::json::array({4, 3}));
  CHECK(meta["extra"]["epoch"] == 3);

  // A single-rank run cannot load a two-rank checkpoint.
  Checkpointer single(d.path.string(), 2);
  CHECK(single.latest() == 7);
  ParamTree into{{"w", zeros(Shape{2, 3})}, {"b", zeros(Shape{2})}};
  try {
    single.load(7, into);
    FAIL("expected CheckpointError");
  } catch (const CheckpointError& e) {
    CHECK(contains(e.what(), "number of ranks"));
  }
}

TEST_CASE("Checkpointer: a failure on one rank fails the save on every rank, without a hang", "[io]") {
  TempDir d;
  auto errors = run_ranks(3, [&](int r, std::shared_ptr<Communicator> comm) {
    Checkpointer ck(d.path.string(), 2, comm);
    ParamTree p{{"x", full(Shape{2}, 1.0)}};
    ck.save(1, p, r == 1 ? "{broken" : "{}");
  });
  REQUIRE(errors.size() == 3);
  CHECK(contains(errors[1], "ValueError"));  // the failing rank gets its own error
  CHECK(contains(errors[0], "rank 1"));      // the others learn which rank failed
  CHECK(contains(errors[2], "rank 1"));
  CHECK(Checkpointer(d.path.string()).steps().empty());
  CHECK_FALSE(fs::exists(d.path / "step_00000001.tmp"));
}

// ---------------------------------------------------------------------------------------- asynchronous save

namespace {

// Writes of files beyond `bytes` fail (EFBIG) while it lives: RLIMIT_FSIZE, process-wide, with SIGXFSZ
// ignored so that the write returns the error instead of killing the process.
struct FileSizeLimit {
  rlimit old{};
  void (*old_handler)(int);
  explicit FileSizeLimit(rlim_t bytes) {
    old_handler = std::signal(SIGXFSZ, SIG_IGN);
    getrlimit(RLIMIT_FSIZE, &old);
    rlimit lim = old;
    lim.rlim_cur = bytes;
    REQUIRE(setrlimit(RLIMIT_FSIZE, &lim) == 0);
  }
  ~FileSizeLimit() {
    setrlimit(RLIMIT_FSIZE, &old);
    std::signal(SIGXFSZ, old_handler);
  }
};

// poll() until it commits (a bounded wait: a write that never ends fails the test instead of hanging it).
// Throws rather than REQUIREs: it runs on run_ranks' threads too.
void poll_until_committed(Checkpointer& ck) {
  for (int i = 0; i < 60000 && !ck.poll(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  if (ck.pending()) throw std::runtime_error("the asynchronous save was not committed within 60 s");
}

}  // namespace

TEST_CASE("Checkpointer::save_async writes a copy in the background and commits on poll or wait", "[io]") {
  TempDir d;
  Checkpointer ck(d.path.string(), 2);
  ParamTree p = sample_tree(21);
  // Large enough that the write takes far longer than overwriting it: a save that wrote the caller's
  // tensors instead of a copy would hold the values below.
  p.insert("big", random_normal(RngKey::from_seed(22), Shape{1 << 22}));
  ParamTree want = p.map([](const std::string&, const Tensor& t) { return t.clone(); });
  ck.save_async(10, p, R"({"note": "async"})");
  for (auto& [name, t] : p) copy_(t, ones_like(t).astype(t.dtype()));  // the next step's update, in place
  CHECK(ck.pending());
  CHECK(ck.steps().empty());  // not committed before a poll says every rank is done
  CHECK_FALSE(fs::exists(d.path / "step_00000010"));
  poll_until_committed(ck);
  CHECK(ck.steps() == std::vector<int64_t>{10});
  CHECK_FALSE(fs::exists(d.path / "step_00000010.tmp"));
  ParamTree into = zeros_like_tree(want);
  CheckpointInfo info = ck.load(10, into);
  // Compared as a count of differing bytes: printing two 16 MiB vectors would outlast the test.
  for (const auto& [name, t] : want) {
    const auto a = bytes_of(t), b = bytes_of(into.at(name));
    REQUIRE(a.size() == b.size());
    size_t differ = 0;
    for (size_t i = 0; i < a.size(); ++i) differ += a[i] != b[i];
    INFO(name);
    CHECK(differ == 0);
  }
  CHECK(nlohmann::json::parse(info.extra_json)["note"] == "async");
  ck.verify(10);
  CHECK(ck.poll());  // nothing pending: nothing to do

  // A save while one is pending commits that one first: saves stay in order and pruning sees both.
  ParamTree q = sample_tree(23);
  ck.save_async(20, q);
  ck.save_async(30, p);
  CHECK(ck.steps() == std::vector<int64_t>{10, 20});
  ck.save(40, q);
  CHECK_FALSE(ck.pending());
  CHECK(ck.steps() == std::vector<int64_t>{30, 40});
  into = zeros_like_tree(p);
  ck.load(30, into);
  check_bitwise_equal(p, into);
  ck.save_async(50, q);
  ck.wait();
  CHECK(ck.steps() == std::vector<int64_t>{40, 50});

  // Bad arguments fail at the call, as save()'s do, and leave nothing pending.
  CHECK_THROWS_AS(ck.save_async(60, q, "{not json"), ValueError);
  CHECK_FALSE(ck.pending());
  CHECK_FALSE(fs::exists(d.path / "step_00000060.tmp"));

  // Dropped without wait(): the write finishes, nothing is committed, and the next save clears it.
  {
    Checkpointer gone(d.path.string(), 2);
    gone.save_async(70, q);
  }
  CHECK(ck.steps() == std::vector<int64_t>{40, 50});
  CHECK(fs::exists(d.path / "step_00000070.tmp" / "rank_00000.safetensors"));
  ck.save(80, q);
  CHECK_FALSE(fs::exists(d.path / "step_00000070.tmp"));
}

TEST_CASE("Checkpointer::save_async: a failed background write surfaces from wait() on every rank", "[io]") {
  TempDir d;
  {
    // One rank: the write runs past the file-size limit; wait() throws its IOError and commits nothing.
    Checkpointer ck(d.path.string(), 2);
    ck.save(1, sample_tree(24));
    ParamTree big{{"w", zeros(Shape{1 << 16})}};  // 256 KiB
    {
      FileSizeLimit limit(64 << 10);
      ck.save_async(2, big);
      CHECK_THROWS_AS(ck.wait(), IOError);
    }
    CHECK_FALSE(ck.pending());
    CHECK(ck.steps() == std::vector<int64_t>{1});
    CHECK_FALSE(fs::exists(d.path / "step_00000002.tmp"));
    ck.save_async(2, big);  // the same save goes through once the disk allows it
    ck.wait();
    CHECK(ck.steps() == std::vector<int64_t>{1, 2});
  }
  // Three ranks, rank 1's shard too large: rank 1 gets its IOError, the others an error naming rank 1,
  // from the poll that commits it; nothing is committed.
  TempDir d3;
  FileSizeLimit limit(64 << 10);
  auto errors = run_ranks(3, [&](int r, std::shared_ptr<Communicator> comm) {
    Checkpointer ck(d3.path.string(), 2, comm);
    ParamTree p{{"rank" + std::to_string(r), zeros(Shape{r == 1 ? (1 << 16) : 4})}};
    ck.save_async(5, p);
    poll_until_committed(ck);
  });
  REQUIRE(errors.size() == 3);
  INFO(errors[0] << "\n" << errors[1] << "\n" << errors[2]);
  CHECK(contains(errors[1], "IOError"));
  CHECK(contains(errors[0], "rank 1"));
  CHECK(contains(errors[2], "rank 1"));
  CHECK(Checkpointer(d3.path.string()).steps().empty());
  CHECK_FALSE(fs::exists(d3.path / "step_00000005.tmp"));
}

// ---------------------------------------------------------------------------------------- resharding

namespace {

using namespace reshard_test;

// Saves `gs` from `world` thread-ranks laid out row-major on (axes, shape) with `specs`.
void save_as_ranks(const std::string& dir, int64_t step, const std::vector<GlobalT>& gs,
                   const std::vector<std::string>& axes, const std::vector<int>& shape,
                   const std::map<std::string, PartitionSpec>& specs, uint64_t chunk = Checkpointer::kDefaultCrcChunkBytes,
                   const FlatAxes& flat = {}) {
  const int world = mesh_size(shape);
  auto errors = run_ranks(world, [&](int r, std::shared_ptr<Communicator> comm) {
    Checkpointer ck(dir, 5, comm);
    ck.set_crc_chunk_bytes(chunk);
    const Pos p = pos_at(axes, shape, r);
    ck.save(step, local_tree(gs, specs, p, flat), R"({"note": "resharding"})", specs, mesh_json(axes, shape), "{}",
            flat_parts(gs, specs, flat, p));
  });
  REQUIRE(errors == std::vector<std::string>(size_t(world), ""));
}

// Loads checkpoint `step` as every rank of `t` (one process) and checks every element.
void check_target(const Checkpointer& ck, int64_t step, const std::vector<GlobalT>& gs, const Target& t) {
  INFO("target " << t.what);
  for (int r = 0; r < mesh_size(t.shape); ++r) {
    INFO("as rank " << r);
    Pos p = pos_at(t.axes, t.shape, r);
    ParamTree into = zeros_tree(gs, t.specs, p, t.flat);
    CheckpointInfo info = ck.load(step, into, t.specs, coords_of(p), false, flat_parts(gs, t.specs, t.flat, p));
    CHECK(check_tree(into, gs, t.specs, p, t.flat) == "");
    uint64_t need = 0;
    for (const auto& [n, x] : into) need += x.nbytes();
    CHECK(info.bytes_needed == need);
    CHECK(info.data_bytes_read >= need);
    CHECK(info.extra_json == R"({"note":"resharding"})");
  }
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const CheckpointError& e) {
    return std::string("CheckpointError: ") + e.what();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("MeshCoords places ranks row-major and validates", "[io]") {
  MeshCoords m = MeshCoords::at({"data", "model"}, {2, 3}, 4);
  CHECK(m.coords == std::vector<int>{1, 1});
  CHECK(m.rank == 4);
  CHECK(m.describe() == "{data: 2, model: 3} at {data: 1, model: 1} (rank 4)");
  CHECK_THROWS_AS(MeshCoords::at({"data"}, {2}, 2), ValueError);
  CHECK_THROWS_AS(MeshCoords::at({"data"}, {0}, 0), ValueError);
  CHECK_THROWS_AS(MeshCoords::at({"data", "model"}, {2}, 0), ValueError);
  Mesh mesh = MeshSpec{{"model"}, {1}}.build(make_local_communicator());
  MeshCoords o = MeshCoords::of(mesh);
  CHECK(o.axes == std::vector<std::string>{"model"});
  CHECK(o.coords == std::vector<int>{0});
}

TEST_CASE("Checkpointer records each shard's coordinates and slices, and writes replicated blocks once", "[io]") {
  TempDir d;
  const auto gs = standard_tensors();
  save_as_ranks(d.path.string(), 3, gs, {"data", "model"}, {2, 2}, tp_specs());
  auto meta = read_json(d / "step_00000003/metadata.json");
  CHECK(meta["format_version"] == 3);
  CHECK(meta["layout"]["axes"] == nlohmann::json::array({"data", "model"}));
  CHECK(meta["layout"]["shape"] == nlohmann::json::array({2, 2}));
  CHECK(meta["tensors"]["w"]["global_shape"] == nlohmann::json::array({8, 6}));
  CHECK(meta["tensors"]["v"]["global_shape"] == nlohmann::json::array({6, 8}));
  CHECK(meta["tensors"]["v"]["spec"] == nlohmann::json::array({"", "model"}));
  CHECK(meta["tensors"]["b"]["spec"] == nlohmann::json::array());
  REQUIRE(meta["shards"].size() == 4);
  for (int r = 0; r < 4; ++r) {
    INFO("rank " << r);
    const auto& s = meta["shards"][size_t(r)];
    CHECK(s["rank"] == r);
    CHECK(s["coords"] == nlohmann::json::array({r / 2, r % 2}));
    CHECK(s["crc32"].get<std::string>().size() == 8);
    // Each block is written once, the replicas sharing the writing, largest first to the least-loaded
    // holder: v's blocks (192 B, held by ranks {0, 2} and {1, 3}) go to ranks 0 and 1, w's (96 B, same
    // holders) to 2 and 3, then b (12 B, every rank) to rank 2 (96 B so far, the lowest of the least
    // loaded) and s (8 B) to rank 3.
    std::set<std::string> names;
    for (auto it = s["tensors"].begin(); it != s["tensors"].end(); ++it) names.insert(it.key());
    const std::vector<std::set<std::string>> wants{{"v"}, {"v"}, {"w", "b"}, {"w", "s"}};
    const std::set<std::string>& want = wants[size_t(r)];
    CHECK(names == want);
    if (r < 2) CHECK(s["tensors"]["v"]["offsets"] == nlohmann::json::array({0, 4 * (r % 2)}));
    if (r >= 2) {
      CHECK(s["tensors"]["w"]["offsets"] == nlohmann::json::array({4 * (r % 2), 0}));
      CHECK(s["tensors"]["w"]["shape"] == nlohmann::json::array({4, 6}));
    }
    // The shard file is a plain safetensors file holding exactly those tensors.
    auto f = read_safetensors(d / ("step_00000003/" + s["file"].get<std::string>()));
    CHECK(f.tensors.size() == want.size());
  }
  // The same-layout load still works on every rank (b and s come from ranks 2's and 3's files).
  auto errors = run_ranks(4, [&](int r, std::shared_ptr<Communicator> comm) {
    Checkpointer ck(d.path.string(), 5, comm);
    Pos p = pos_at({"data", "model"}, {2, 2}, r);
    ParamTree into = zeros_tree(gs, tp_specs(), p);
    ck.load(3, into);
    std::string bad = check_tree(into, gs, tp_specs(), p);
    if (!bad.empty()) throw std::runtime_error(bad);
  });
  CHECK(errors == std::vector<std::string>(4, ""));
}

TEST_CASE("Checkpointer spreads the writing of replicated tensors over the ranks holding them", "[io]") {
  // Data parallelism over 4 ranks: every rank holds all 9 tensors (96 to 1440 bytes). Each is written
  // once, and as each goes to the least-loaded rank, the ranks' bytes differ by at most the largest
  // tensor (rank 0 writing everything would put all 6912 bytes on it).
  TempDir d;
  std::vector<GlobalT> many;
  for (int i = 0; i < 9; ++i) many.push_back({"t" + std::to_string(i), i, {int64_t(4 + 7 * i), 6}, DType::f32});
  save_as_ranks(d.path.string(), 1, many, {"data"}, {4}, {});
  const auto meta = read_json(d / "step_00000001/metadata.json");
  std::map<std::string, int> written;
  std::vector<int64_t> bytes(4, 0);
  int64_t largest = 0;
  for (int r = 0; r < 4; ++r) {
    const auto& t = meta["shards"][size_t(r)]["tensors"];
    for (auto it = t.begin(); it != t.end(); ++it) {
      ++written[it.key()];
      const int64_t n = it.value()["data_offsets"][1].get<int64_t>() - it.value()["data_offsets"][0].get<int64_t>();
      bytes[size_t(r)] += n;
      largest = std::max(largest, n);
    }
  }
  CHECK(written.size() == many.size());
  for (const auto& [name, k] : written) CHECK(k == 1);
  INFO("bytes per rank " << bytes[0] << " " << bytes[1] << " " << bytes[2] << " " << bytes[3]);
  CHECK(*std::max_element(bytes.begin(), bytes.end()) - *std::min_element(bytes.begin(), bytes.end()) <= largest);
  CHECK(*std::min_element(bytes.begin(), bytes.end()) > 0);
  check_target(Checkpointer(d.path.string()), 1, many, Target{"one rank", {"data"}, {1}, {}});
}

TEST_CASE("Checkpointer saves flat parts (ZeRO's) once each, and loads them into any layout", "[io]") {
  // {data: 3, model: 2}: w and v split over "model", then each block's flattened elements over "data" as
  // ZeroShards cuts them (24 per block: 8 per rank); b (6) and the scalar s (1: parts [0, 1), [1, 1),
  // [1, 1)) over "data" too.
  TempDir d;
  const auto gs = standard_tensors();
  const std::vector<std::string> axes{"data", "model"};
  const std::vector<int> shape{3, 2};
  const FlatAxes flat{{"w", "data"}, {"v", "data"}, {"b", "data"}, {"s", "data"}};
  save_as_ranks(d.path.string(), 3, gs, axes, shape, tp_specs(), 16, flat);
  auto meta = read_json(d / "step_00000003/metadata.json");
  CHECK(meta["tensors"]["w"]["global_shape"] == nlohmann::json::array({8, 6}));
  std::map<std::string, std::vector<int>> writers;  // "b<dc>" and "s": the ranks whose shards hold that run
  for (int r = 0; r < 6; ++r) {
    INFO("rank " << r);
    const int dc = r / 2, mc = r % 2;
    const auto& t = meta["shards"][size_t(r)]["tensors"];
    // Each rank writes its own run of its block, nothing gathered; model-axis ranks hold other blocks.
    CHECK(t["w"]["offsets"] == nlohmann::json::array({4 * mc, 0}));
    CHECK(t["w"]["shape"] == nlohmann::json::array({4, 6}));
    CHECK(t["w"]["flat"] == nlohmann::json::array({8 * dc, 8 * dc + 8}));
    CHECK(t["w"]["data_offsets"][1].get<int64_t>() - t["w"]["data_offsets"][0].get<int64_t>() == 8 * 4);
    CHECK(t["v"]["offsets"] == nlohmann::json::array({0, 4 * mc}));
    CHECK(t["v"]["flat"] == nlohmann::json::array({8 * dc, 8 * dc + 8}));
    // b and s are not split over "model": the two model-axis replicas hold the same runs (one writes each).
    if (t.contains("b")) {
      CHECK(t["b"]["flat"] == nlohmann::json::array({2 * dc, 2 * dc + 2}));
      writers["b" + std::to_string(dc)].push_back(r);
    }
    if (t.contains("s")) {
      CHECK(t["s"]["flat"] == nlohmann::json::array({0, 1}));
      writers["s"].push_back(r);
    }
    auto f = read_safetensors(d / ("step_00000003/" + meta["shards"][size_t(r)]["file"].get<std::string>()));
    CHECK(f.tensors.at("w").shape() == Shape{8});  // a plain 1-d safetensors tensor
  }
  for (int dc = 0; dc < 3; ++dc) {
    REQUIRE(writers["b" + std::to_string(dc)].size() == 1);
    CHECK(writers["b" + std::to_string(dc)][0] / 2 == dc);
  }
  REQUIRE(writers["s"].size() == 1);  // the empty parts [1, 1) of ranks with dc > 0 are not written
  CHECK(writers["s"][0] < 2);
  Checkpointer ck(d.path.string());
  for (const auto& t : standard_targets()) check_target(ck, 3, gs, t);  // whole blocks, any layout
  // Into flat parts of another layout: DP 2 x TP 2 (w's blocks cut in 12s), and w unsplit over DP 4.
  check_target(ck, 3, gs, Target{"DP 2 x TP 2, flat over data", {"data", "model"}, {2, 2}, tp_specs(), flat});
  check_target(ck, 3, gs, Target{"DP 4, w flat", {"data"}, {4}, {}, {{"w", "data"}}});
  // The same layout: each rank reads its own part (and an empty part loads as nothing).
  auto errors = run_ranks(6, [&](int r, std::shared_ptr<Communicator> comm) {
    Checkpointer c(d.path.string(), 5, comm);
    const Pos p = pos_at(axes, shape, r);
    ParamTree into = zeros_tree(gs, tp_specs(), p, flat);
    const CheckpointInfo info = c.load(3, into, flat_parts(gs, tp_specs(), flat, p));
    std::set<int> files{r, writers.at("b" + std::to_string(r / 2))[0]};  // its own w and v, its run of b, and s
    if (r < 2) files.insert(writers.at("s")[0]);
    if (info.files_read != int(files.size())) throw std::runtime_error("read " + std::to_string(info.files_read) + " files");
    const std::string bad = check_tree(into, gs, tp_specs(), p, flat);
    if (!bad.empty()) throw std::runtime_error(bad);
    c.load(3, into);  // without the parts: refused, naming them
  });
  for (const auto& e : errors) {
    INFO(e);
    CHECK(e.find("pass this rank's FlatPart to load") != std::string::npos);
  }
  // And whole blocks saved load into flat parts.
  TempDir e;
  save_as_ranks(e.path.string(), 1, gs, {"model"}, {2}, tp_specs());
  check_target(Checkpointer(e.path.string()), 1, gs, Target{"flat over data", {"data", "model"}, {3, 2}, tp_specs(), flat});
}

TEST_CASE("Checkpointer refuses flat parts that overlap, leave elements unsaved or lie outside their block", "[io]") {
  TempDir d;
  auto save2 = [&](int64_t b0, int64_t n0, int64_t b1, int64_t n1) {
    return run_ranks(2, [&](int r, std::shared_ptr<Communicator> comm) {
      Checkpointer c(d.path.string(), 3, comm);
      const int64_t begin = r ? b1 : b0, n = r ? n1 : n0;
      c.save(1, ParamTree{{"m", full(Shape{n}, 1.0)}}, "{}", {}, R"({"data": 2})", "{}", {{"m", FlatPart{Shape{2, 2}, begin}}});
    });
  };
  auto has_all = [](const std::vector<std::string>& errors, const std::string& what) {
    for (const auto& e : errors) CHECK(e.find(what) != std::string::npos);
  };
  has_all(save2(0, 3, 1, 3), "overlapping flat parts of tensor 'm'");
  has_all(save2(0, 2, 3, 1), "leave elements unsaved");
  has_all(save2(0, 1, 1, 2), "no rank holds [3, 4)");
  has_all(save2(0, 2, 3, 2), "lies outside its block");
  CHECK(Checkpointer(d.path.string()).steps().empty());
  const auto ok = save2(0, 2, 2, 2);
  CHECK(ok == std::vector<std::string>{"", ""});
  Checkpointer ck(d.path.string());
  ParamTree into{{"m", zeros(Shape{3})}};
  CHECK(error_of([&] { ck.load(1, into, {}, MeshCoords::at({}, {}, 0), false, {{"m", FlatPart{Shape{2, 2}, 2}}}); })
            .find("lies outside its block") != std::string::npos);
  CHECK(error_of([&] { ck.load(1, into, {}, MeshCoords::at({}, {}, 0), false, {{"n", FlatPart{Shape{2, 2}, 0}}}); })
            .find("flat part names a tensor that is not being loaded") != std::string::npos);
  ParamTree whole{{"m", zeros(Shape{2, 2})}};
  ck.load(1, whole, {}, MeshCoords::at({}, {}, 0));
  CHECK(whole.at("m").to_vector<float>() == std::vector<float>(4, 1.0f));
  // metadata.json that lies about a run, or claims one in format version 2, is refused; version 2 without runs loads.
  const std::string mp = (d.path / "step_00000001" / "metadata.json").string();
  const auto pristine = io_test::read_bytes(mp);
  auto edit = [&](const std::function<void(nlohmann::json&)>& fn) {
    auto m = read_json(mp);
    fn(m);
    const std::string s = m.dump();
    io_test::write_bytes(mp, std::vector<unsigned char>(s.begin(), s.end()));
  };
  edit([](nlohmann::json& m) { m["shards"][1]["tensors"]["m"]["flat"] = {2, 5}; });
  CHECK(error_of([&] { ck.load(1, whole, {}, MeshCoords::at({}, {}, 0)); }).find("bad flat run") != std::string::npos);
  io_test::write_bytes(mp, pristine);
  edit([](nlohmann::json& m) { m["format_version"] = 2; });
  CHECK(error_of([&] { ck.load(1, whole, {}, MeshCoords::at({}, {}, 0)); }).find("format_version 3") != std::string::npos);
  TempDir e;
  Checkpointer v2(e.path.string());
  v2.save(1, ParamTree{{"m", full(Shape{2, 2}, 2.0)}});
  const std::string mp2 = (e.path / "step_00000001" / "metadata.json").string();
  auto m2 = read_json(mp2);
  m2["format_version"] = 2;
  const std::string s2 = m2.dump();
  io_test::write_bytes(mp2, std::vector<unsigned char>(s2.begin(), s2.end()));
  v2.load(1, whole);
  CHECK(whole.at("m").to_vector<float>() == std::vector<float>(4, 2.0f));
}

TEST_CASE("Checkpointer reshards a TP 2 checkpoint into other degrees, dims, meshes and world sizes", "[io]") {
  TempDir d;
  const auto gs = standard_tensors();
  save_as_ranks(d.path.string(), 10, gs, {"model"}, {2}, tp_specs(), /*chunk=*/16);  // many small chunks
  Checkpointer ck(d.path.string());
  for (const auto& t : standard_targets()) check_target(ck, 10, gs, t);
  // The default chunk size too (one chunk per piece).
  TempDir e;
  save_as_ranks(e.path.string(), 10, gs, {"model"}, {2}, tp_specs());
  Checkpointer ck2(e.path.string());
  for (const auto& t : standard_targets()) check_target(ck2, 10, gs, t);
}

TEST_CASE("Checkpointer reshards DP x TP 2 x 2, TP 4 and DP checkpoints", "[io]") {
  const auto gs = standard_tensors();
  struct Source {
    std::vector<std::string> axes;
    std::vector<int> shape;
    std::map<std::string, PartitionSpec> specs;
  };
  for (const Source& src : {Source{{"data", "model"}, {2, 2}, tp_specs()}, Source{{"model"}, {4}, tp_specs()},
                            Source{{"data"}, {2}, {}},
                            Source{{"data", "model"}, {2, 2}, {{"w", {"data", "model"}}, {"v", {"model", ""}}}}}) {
    INFO("saved on " << mesh_json(src.axes, src.shape));
    TempDir d;
    save_as_ranks(d.path.string(), 1, gs, src.axes, src.shape, src.specs, 8);
    Checkpointer ck(d.path.string());
    for (const auto& t : standard_targets()) check_target(ck, 1, gs, t);
  }
}

TEST_CASE("Checkpointer::save with a Mesh records its layout; a one-rank load of it is bitwise", "[io]") {
  TempDir d;
  Mesh mesh = MeshSpec{{"pipe", "model"}, {1, 1}}.build(make_local_communicator());
  const auto gs = standard_tensors();
  Checkpointer ck(d.path.string());
  Pos p = pos_at({"pipe", "model"}, {1, 1}, 0);
  ParamTree src = local_tree(gs, tp_specs(), p);
  ck.save(4, src, tp_specs(), mesh, R"({"k": 1})", R"({"tp": "model"})");
  auto meta = read_json(d / "step_00000004/metadata.json");
  CHECK(meta["layout"]["axes"] == nlohmann::json::array({"pipe", "model"}));  // not alphabetical
  CHECK(meta["plan"]["tp"] == "model");
  ParamTree into = zeros_tree(gs, tp_specs(), p);
  ck.load(4, into, tp_specs(), mesh);
  check_bitwise_equal(src, into);
  CHECK_NOTHROW(ck.verify(4));
  // Another mesh of the group's size; a spec naming an axis it lacks.
  Mesh two = MeshSpec{{"model"}, {1}}.build(make_local_communicator());
  CHECK_NOTHROW(ck.save(5, src, tp_specs(), two));
  CHECK(error_of([&] { ck.save(6, src, {{"w", {"modle", ""}}}, two); }).find("did you mean 'model'") != std::string::npos);
}

TEST_CASE("Checkpointer resharding reads about the slice it needs", "[io]") {
  // A [64, 256] f32 tensor (64 KiB) saved as TP 2, loaded as TP 4: each rank needs 16 KiB.
  const std::vector<GlobalT> dim0{{"x", 1, {64, 256}, DType::f32}};
  const std::vector<GlobalT> dim1{{"x", 1, {64, 256}, DType::f32}};
  const std::map<std::string, PartitionSpec> s0{{"x", {"model", ""}}}, s1{{"x", {"", "model"}}};
  const uint64_t total = 64 * 256 * 4;
  auto load_quarter = [&](const std::string& dir, const std::vector<GlobalT>& gs,
                          const std::map<std::string, PartitionSpec>& specs, int r) {
    Checkpointer ck(dir);
    Pos p = pos_at({"model"}, {4}, r);
    ParamTree into = zeros_tree(gs, specs, p);
    CheckpointInfo info = ck.load(1, into, specs, coords_of(p));
    CHECK(check_tree(into, gs, specs, p) == "");
    CHECK(info.bytes_needed == total / 4);
    CHECK(info.files_read == 1);
    CHECK(info.bytes_read > info.data_bytes_read);  // plus the header
    CHECK(info.bytes_read < info.data_bytes_read + 1024);
    return info;
  };
  SECTION("split along dim 0: contiguous runs, exactly the slice") {
    TempDir d;
    save_as_ranks(d.path.string(), 1, dim0, {"model"}, {2}, s0, 4096);
    for (int r = 0; r < 4; ++r) CHECK(load_quarter(d.path.string(), dim0, s0, r).data_bytes_read == total / 4);
    // With 1 MiB chunks (the default) the rank reads its whole saved half (one chunk): the trade-off.
    TempDir e;
    save_as_ranks(e.path.string(), 1, dim0, {"model"}, {2}, s0);
    CHECK(load_quarter(e.path.string(), dim0, s0, 1).data_bytes_read == total / 2);
  }
  SECTION("split along dim 1: one run per row, chunks no longer than a run read exactly the slice") {
    TempDir d;
    save_as_ranks(d.path.string(), 1, dim1, {"model"}, {2}, s1, 256);  // a row of a saved half = 512 B
    for (int r = 0; r < 4; ++r) CHECK(load_quarter(d.path.string(), dim1, s1, r).data_bytes_read == total / 4);
    TempDir e;
    save_as_ranks(e.path.string(), 1, dim1, {"model"}, {2}, s1, 4096);  // chunks span rows: the whole half
    CHECK(load_quarter(e.path.string(), dim1, s1, 2).data_bytes_read == total / 2);
  }
  SECTION("a replicated tensor is read from one file, not from every rank's") {
    TempDir d;
    save_as_ranks(d.path.string(), 1, dim0, {"data"}, {4}, {}, 4096);
    Checkpointer ck(d.path.string());
    Pos p = pos_at({"data"}, {1}, 0);
    ParamTree into = zeros_tree(dim0, {}, p);
    CheckpointInfo info = ck.load(1, into, {}, coords_of(p));
    CHECK(info.files_read == 1);
    CHECK(info.data_bytes_read == total);
    CHECK(check_tree(into, dim0, {}, p) == "");
  }
}

TEST_CASE("Checkpointer resharding rejects other models, bad specs and damaged shards", "[io]") {
  TempDir d;
  const auto gs = standard_tensors();
  save_as_ranks(d.path.string(), 2, gs, {"model"}, {2}, tp_specs(), 32);
  Checkpointer ck(d.path.string());
  const std::string dir = (d.path / "step_00000002").string();
  const Pos p4 = pos_at({"model"}, {4}, 3);  // needs rows 6..8 of w and columns 6..8 of v: rank 1's file
  auto load4 = [&](ParamTree& into, std::map<std::string, PartitionSpec> specs = tp_specs(), Pos p = pos_at({"model"}, {4}, 3)) {
    return error_of([&] { ck.load(2, into, specs, coords_of(p)); });
  };
  auto has = [](const std::string& msg, std::vector<std::string> words) {
    INFO(msg);
    for (const auto& w : words) CHECK(msg.find(w) != std::string::npos);
  };

  SECTION("a tensor missing from the checkpoint, and one the model lacks") {
    ParamTree into = zeros_tree(gs, tp_specs(), p4);
    into.insert("u", zeros(Shape{2}));
    has(load4(into), {"CheckpointError", "'u' is missing", "metadata.json"});
    ParamTree fewer;
    for (const auto& [n, t] : zeros_tree(gs, tp_specs(), p4))
      if (n != "b") fewer.insert(n, t);
    has(load4(fewer), {"CheckpointError", "unexpected tensor 'b'"});
  }
  SECTION("another global shape, and another dtype") {
    ParamTree into = zeros_tree(gs, tp_specs(), p4);
    into.at("w") = zeros(Shape{2, 5});  // global [8, 5] under TP 4
    has(load4(into), {"CheckpointError", "'w'", "global shape", "[8, 5]", "[8, 6] (saved)", "metadata.json", "model: 4"});
    ParamTree into2 = zeros_tree(gs, tp_specs(), p4);
    into2.at("v") = zeros(Shape{6, 2}, DType::f32);
    has(load4(into2), {"CheckpointError", "'v'", "dtype", "f32 (the model's)", "f64 (saved)"});
    // A spec the tensors do not follow makes the global shape wrong too.
    ParamTree into3 = zeros_tree(gs, tp_specs(), p4);
    has(load4(into3, {{"w", {"", "model"}}, {"v", {"", "model"}}}), {"'w'", "global shape", "[2, 24]"});
  }
  SECTION("specs naming unknown tensors or axes") {
    ParamTree into = zeros_tree(gs, tp_specs(), p4);
    has(load4(into, {{"w", {"modle", ""}}, {"v", {"", "model"}}}), {"ValueError", "did you mean 'model'"});
    has(load4(into, {{"ww", {"model", ""}}}), {"ValueError", "'ww'"});
    has(load4(into, {{"b", {"model", "model"}}}), {"ValueError"});
  }
  SECTION("a truncated shard") {
    const std::string f = dir + "/rank_00001.safetensors";
    auto b = io_test::read_bytes(f);
    b.resize(b.size() - 10);
    io_test::write_bytes(f, b);
    ParamTree into = zeros_tree(gs, tp_specs(), p4);
    has(load4(into), {"CheckpointError", "rank_00001.safetensors", "truncated", std::to_string(b.size() + 10) + " bytes (metadata.json)",
                      std::to_string(b.size()) + " bytes"});
    // A load that needs only rank 0's file (rank 0 of TP 4 loading w alone: rows 0..1) still succeeds.
    ParamTree w0{{"w", zeros_tree(gs, tp_specs(), pos_at({"model"}, {4}, 0)).at("w")}};
    CHECK(error_of([&] { ck.load(2, w0, {{"w", {"model", ""}}}, coords_of(pos_at({"model"}, {4}, 0)), true); }) == "");
    CHECK(check_tree(w0, {gs[0]}, tp_specs(), pos_at({"model"}, {4}, 0)) == "");
    has(error_of([&] { ck.verify(2); }), {"rank_00001.safetensors", "truncated"});
  }
  SECTION("corrupted bytes: found by the ranks that read them, and by verify()") {
    // Flip a byte of w's row 6 (in rank 1's block, bytes 48..96) inside the 32-byte chunk [64, 96), which
    // only TP 4 rank 3 reads (rank 2 reads bytes 0..48: chunks [0, 64)).
    auto meta = read_json(dir + "/metadata.json");
    const auto& e = meta["shards"][1]["tensors"]["w"];
    const uint64_t at = meta["shards"][1]["header_bytes"].get<uint64_t>() + e["data_offsets"][0].get<uint64_t>() + 2 * 6 * 4 + 20;
    const std::string f = dir + "/rank_00001.safetensors";
    auto b = io_test::read_bytes(f);
    b[at] ^= 0x40;
    io_test::write_bytes(f, b);
    for (int r = 0; r < 4; ++r) {
      ParamTree into = zeros_tree(gs, tp_specs(), pos_at({"model"}, {4}, r));
      ParamTree before = into.map([](const std::string&, const Tensor& t) { return t.clone(); });
      std::string err = load4(into, tp_specs(), pos_at({"model"}, {4}, r));
      if (r == 3) {
        has(err, {"CheckpointError", "checksum mismatch", "rank_00001.safetensors", "tensor 'w'"});
        check_bitwise_equal(before, into);  // untouched
      } else {
        CHECK(err == "");  // with 32-byte chunks, ranks 0..2 never read the bad chunk
      }
    }
    has(error_of([&] { ck.verify(2); }), {"checksum mismatch", "rank_00001.safetensors"});
    // The same-layout load of rank 1 reads it too.
    auto errors = run_ranks(2, [&](int r, std::shared_ptr<Communicator> comm) {
      Checkpointer c(d.path.string(), 5, comm);
      ParamTree into = zeros_tree(gs, tp_specs(), pos_at({"model"}, {2}, r));
      c.load(2, into);
    });
    CHECK(errors[0] == "");
    has(errors[1], {"checksum mismatch", "rank_00001.safetensors"});
  }
  SECTION("a corrupted header, or a shard from another save") {
    const std::string f = dir + "/rank_00000.safetensors";
    auto b = io_test::read_bytes(f);
    auto b2 = b;
    b2[20] = b2[20] == 'x' ? 'y' : 'x';
    io_test::write_bytes(f, b2);
    ParamTree into = zeros_tree(gs, tp_specs(), p4);
    has(load4(into, tp_specs(), pos_at({"model"}, {4}, 0)), {"checksum mismatch in the header", "rank_00000.safetensors"});
    // Both shards swapped: sizes and header checksums disagree with metadata.json.
    io_test::write_bytes(f, io_test::read_bytes(dir + "/rank_00001.safetensors"));
    std::string err = load4(into, tp_specs(), pos_at({"model"}, {4}, 0));
    has(err, {"CheckpointError", "rank_00000.safetensors"});
  }
  SECTION("a checkpoint of the old format") {
    auto meta = read_json(dir + "/metadata.json");
    meta["format_version"] = 1;
    std::string s = meta.dump();
    io_test::write_bytes(dir + "/metadata.json", std::vector<unsigned char>(s.begin(), s.end()));
    ParamTree into = zeros_tree(gs, tp_specs(), p4);
    has(load4(into), {"CheckpointError", "format version 1", "metadata.json", "save it again"});
  }
  SECTION("a checkpoint that does not hold every block") {
    TempDir e;
    // One rank saving "as rank 0 of {model: 2}": the second half of w and v is in no file.
    Checkpointer one(e.path.string());
    one.save(1, local_tree(gs, tp_specs(), pos_at({"model"}, {2}, 0)), "{}", tp_specs(), R"({"model": 2})");
    ParamTree into = zeros_tree(gs, tp_specs(), pos_at({"model"}, {1}, 0));
    has(error_of([&] { one.load(1, into, tp_specs(), coords_of(pos_at({"model"}, {1}, 0))); }),
        {"CheckpointError", "does not hold all of tensor", "24 of its 48 elements"});
    // The first half loads.
    ParamTree half = zeros_tree(gs, tp_specs(), pos_at({"model"}, {4}, 1));
    CHECK(error_of([&] { one.load(1, half, tp_specs(), coords_of(pos_at({"model"}, {4}, 1))); }) == "");
  }
}

TEST_CASE("Checkpointer::save validates specs against the mesh and across ranks", "[io]") {
  TempDir d;
  ParamTree p{{"w", zeros(Shape{4, 2})}};
  Checkpointer ck(d.path.string());
  CHECK(error_of([&] { ck.save(1, p, "{}", {{"w", {"model"}}}); }).find("not in the mesh") != std::string::npos);
  CHECK(error_of([&] { ck.save(1, p, "{}", {{"w", {"model", "model"}}}, R"({"model": 1})"); }).find("two dims") !=
        std::string::npos);
  // Ranks holding one tensor with different shapes (blocks must be equal).
  auto errors = run_ranks(2, [&](int r, std::shared_ptr<Communicator> comm) {
    Checkpointer c(d.path.string(), 3, comm);
    c.save(2, ParamTree{{"w", zeros(Shape{r + 1, 2})}}, "{}", {{"w", {"model", ""}}}, R"({"model": 2})");
  });
  CHECK(errors[0].find("different dtypes or shapes") != std::string::npos);
  CHECK(errors[1].find("different dtypes or shapes") != std::string::npos);
  // ... or with different specs.
  errors = run_ranks(2, [&](int r, std::shared_ptr<Communicator> comm) {
    Checkpointer c(d.path.string(), 3, comm);
    c.save(2, ParamTree{{"w", zeros(Shape{2, 2})}}, "{}", {{"w", r ? PartitionSpec{"", "model"} : PartitionSpec{"model", ""}}},
           R"({"model": 2})");
  });
  CHECK(errors[0].find("different PartitionSpecs") != std::string::npos);
  CHECK(errors[1].find("different PartitionSpecs") != std::string::npos);
  CHECK(Checkpointer(d.path.string()).steps().empty());
}

TEST_CASE("Checkpointer::save takes each tensor's spec from the ranks holding it", "[io]") {
  // As pipeline stages under TP: ranks (pipe, model) of {pipe: 2, model: 2}; stage 0 holds "a", stage 1
  // "b", each split over "model", and each rank passes the specs of its own tensors only. Rank 0 writes
  // the metadata: b's global shape comes from stage 1's ranks.
  TempDir d;
  const auto errors = run_ranks(4, [&](int r, std::shared_ptr<Communicator> comm) {
    const std::string name = r < 2 ? "a" : "b";
    Checkpointer c(d.path.string(), 3, comm);
    c.save(1, ParamTree{{name, full(Shape{2, 3}, double(r))}}, "{}", {{name, {"model", ""}}}, R"({"pipe": 2, "model": 2})");
  });
  for (const auto& e : errors) CHECK(e == "");
  const auto meta = read_json((d.path / "step_00000001" / "metadata.json").string());
  CHECK(meta["tensors"]["a"]["global_shape"] == nlohmann::json({4, 3}));
  CHECK(meta["tensors"]["b"]["global_shape"] == nlohmann::json({4, 3}));
  ParamTree whole{{"a", zeros(Shape{4, 3})}, {"b", zeros(Shape{4, 3})}};
  Checkpointer(d.path.string()).load(1, whole, {}, MeshCoords::at({}, {}, 0));
  CHECK(whole.at("b").to_vector<float>() == std::vector<float>{2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3});
}

TEST_CASE("Checkpointer loads of randomly damaged files: an error and untouched tensors, or the saved values",
          "[io][fuzz]") {
  // 600 damaged copies of one checkpoint (bytes flipped, mostly in the headers the CRC does not cover;
  // files cut short or extended; ranges overwritten), each loaded by the same-layout and the resharding
  // loader. Every load throws a titanax::Error leaving `into` as it was, or returns the saved values
  // bitwise: never a crash, another exception or a silently different tensor. FUZZ_SEED picks other damage.
  // One tensor is a flat part (its whole [2, 3] block as 6 elements), so "flat" runs get damaged too.
  TempDir d;
  Checkpointer ck(d.path.string(), 5);
  ParamTree saved = sample_tree(6);
  saved.insert("opt/v", random_normal(RngKey::from_seed(61), Shape{6}));
  const FlatParts flat{{"opt/v", FlatPart{Shape{2, 3}, 0}}};
  ck.save(1, saved, "{}", {}, "{}", "{}", flat);
  const fs::path dir = d.path / "step_00000001";
  const std::vector<std::string> files = {(dir / "rank_00000.safetensors").string(), (dir / "metadata.json").string()};
  std::vector<std::vector<unsigned char>> pristine;
  for (const auto& f : files) pristine.push_back(io_test::read_bytes(f));
  const Mesh one = MeshSpec{{"data"}, {1}}.build(make_local_communicator());
  std::mt19937_64 g(std::getenv("FUZZ_SEED") ? std::stoull(std::getenv("FUZZ_SEED")) : 614);
  auto pick = [&](size_t n) { return size_t(std::uniform_int_distribution<size_t>(0, n - 1)(g)); };
  int refused = 0, loaded = 0;
  for (int trial = 0; trial < 600; ++trial) {
    const size_t which = pick(2);
    std::vector<unsigned char> b = pristine[which];
    std::string what;
    switch (pick(4)) {
      case 0: {  // flip bytes, 3 in 4 trials within the first 256 (the safetensors header, or the JSON)
        for (size_t k = 0, n = 1 + pick(4); k < n; ++k) {
          const size_t at = pick(4) ? pick(std::min<size_t>(256, b.size())) : pick(b.size());
          b[at] ^= uint8_t(1 + pick(255));
          what += "flip@" + std::to_string(at) + " ";
        }
        break;
      }
      case 1: b.resize(pick(b.size())), what = "cut to " + std::to_string(b.size()); break;
      case 2:
        for (size_t k = 0, n = 1 + pick(64); k < n; ++k) b.push_back(uint8_t(pick(256)));
        what = "extended to " + std::to_string(b.size());
        break;
      default: {
        const size_t at = pick(b.size()), n = std::min(b.size() - at, 1 + pick(16));
        for (size_t k = 0; k < n; ++k) b[at + k] = uint8_t(pick(256));
        what = "overwrote " + std::to_string(n) + " at " + std::to_string(at);
      }
    }
    io_test::write_bytes(files[which], b);
    INFO("trial " << trial << ": " << files[which] << " " << what);
    for (bool reshard : {false, true}) {
      ParamTree into = zeros_like_tree(saved);
      const ParamTree before = into.map([](const std::string&, const Tensor& t) { return t.clone(); });
      try {
        if (reshard) ck.load(1, into, {}, one, false, flat);
        else ck.load(1, into, flat);
        ++loaded;
        check_bitwise_equal(saved, into);
      } catch (const Error&) {
        ++refused;
        check_bitwise_equal(before, into);
      } catch (const std::exception& e) {
        FAIL((reshard ? "resharding" : "same-layout") << " load threw a non-titanax exception: " << e.what());
      }
    }
    io_test::write_bytes(files[which], pristine[which]);
  }
  INFO(refused << " loads refused, " << loaded << " returned the saved values");
  CHECK(refused > 600);  // the damage is seen, not merely survived
}

TEST_CASE("Checkpointer reshards random layouts: random meshes, specs, dtypes and chunk sizes", "[io][fuzz]") {
  // 40 checkpoints of 2-4 tensors (0-3 dims of 1, 2, 6 or 12; f32, f64, i32, i64), each saved by the
  // thread-ranks of a random mesh (1-2 axes of 1-3 ranks) under random PartitionSpecs, some tensors as
  // flat parts (ZeRO's) over an axis their spec leaves free, then loaded as every rank of another random
  // mesh, specs and flat parts: every element against f(global index).
  std::mt19937_64 g(std::getenv("FUZZ_SEED") ? std::stoull(std::getenv("FUZZ_SEED")) : 2027);
  auto pick = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(g); };
  auto mesh = [&](std::vector<std::string>& axes, std::vector<int>& shape) {
    std::vector<std::string> names{"data", "model", "pipe"};
    std::shuffle(names.begin(), names.end(), g);
    axes.assign(names.begin(), names.begin() + pick(1, 2));
    shape.clear();
    for (size_t i = 0; i < axes.size(); ++i) shape.push_back(int(pick(1, 3)));
  };
  auto specs_for = [&](const std::vector<GlobalT>& gs, const std::vector<std::string>& axes, const std::vector<int>& shape) {
    std::map<std::string, PartitionSpec> specs;
    for (const auto& t : gs) {
      PartitionSpec s(t.shape.size(), "");
      for (size_t a = 0; a < axes.size(); ++a) {
        if (t.shape.empty() || pick(0, 2) == 0) continue;
        const size_t d = size_t(pick(0, int64_t(t.shape.size()) - 1));
        if (s[d].empty() && t.shape[d] % shape[a] == 0) s[d] = axes[a];
      }
      if (pick(0, 3)) specs[t.name] = s;  // sometimes no entry at all: replicated
    }
    return specs;
  };
  auto flat_for = [&](const std::vector<GlobalT>& gs, const std::vector<std::string>& axes,
                      const std::map<std::string, PartitionSpec>& specs, int& count) {
    FlatAxes flat;
    for (const auto& t : gs) {
      const PartitionSpec s = spec_of(specs, t.name);
      const std::string& a = axes[size_t(pick(0, int64_t(axes.size()) - 1))];
      if (pick(0, 2) == 0 && std::find(s.begin(), s.end(), a) == s.end()) flat[t.name] = a, ++count;
    }
    return flat;
  };
  int flat_saved = 0, flat_loaded = 0;
  for (int trial = 0; trial < 40; ++trial) {
    std::vector<GlobalT> gs;
    const DType dtypes[] = {DType::f32, DType::f64, DType::i32, DType::i64};
    for (int i = 0, n = int(pick(2, 4)); i < n; ++i) {
      std::vector<int64_t> shape(static_cast<size_t>(pick(0, 3)));
      for (auto& x : shape) x = std::vector<int64_t>{1, 2, 6, 12}[size_t(pick(0, 3))];
      gs.push_back({"t" + std::to_string(i), i + 1, shape, dtypes[pick(0, 3)]});
    }
    std::vector<std::string> axes;
    std::vector<int> shape;
    mesh(axes, shape);
    const auto specs = specs_for(gs, axes, shape);
    const FlatAxes flat = flat_for(gs, axes, specs, flat_saved);
    Target t;
    mesh(t.axes, t.shape);
    t.specs = specs_for(gs, t.axes, t.shape);
    t.flat = flat_for(gs, t.axes, t.specs, flat_loaded);
    t.what = "random target " + mesh_json(t.axes, t.shape) + " with " + std::to_string(t.flat.size()) + " flat parts";
    INFO("trial " << trial << ": saved on " << mesh_json(axes, shape) << " with " << flat.size() << " flat parts");
    TempDir d;
    save_as_ranks(d.path.string(), 2, gs, axes, shape, specs, uint64_t(pick(1, 64)), flat);
    check_target(Checkpointer(d.path.string()), 2, gs, t);
  }
  CHECK(flat_saved > 10);  // the draws cover flat parts both ways
  CHECK(flat_loaded > 10);
}
