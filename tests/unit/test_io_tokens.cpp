// io/tokens, io/tokenizer, io/brown: token shards (format, malformed files), the sequential GPT batch
// reader against the reference formula, data-parallel rows, seek, Brown tag stripping and a tiny
// SentencePiece model. Nothing here needs the network.
#include <catch2/catch.hpp>

#include <algorithm>
#include <array>
#include <cstring>
#include <string>
#include <vector>

#include <titanax/titanax.h>

#include "io/brown.h"
#include "io/tokenizer.h"
#include "io/tokens.h"
#include "io_test_util.h"

using namespace titanax;
using io_test::TempDir;
using Catch::Matchers::Contains;

namespace {

void put_le32(std::vector<unsigned char>& v, size_t at, int32_t x) {
  const uint32_t u = uint32_t(x);
  for (int k = 0; k < 4; ++k) v[at + size_t(k)] = (u >> (8 * k)) & 0xff;
}

// A shard written by hand: header (magic, version, count) and `tokens` as little-endian uint16.
std::vector<unsigned char> shard_bytes(int32_t magic, int32_t version, int32_t count,
                                       const std::vector<uint16_t>& tokens) {
  std::vector<unsigned char> v(1024, 0);
  put_le32(v, 0, magic);
  put_le32(v, 4, version);
  put_le32(v, 8, count);
  for (uint16_t t : tokens) v.insert(v.end(), {(unsigned char)(t & 0xff), (unsigned char)(t >> 8)});
  return v;
}

// Expects read_token_shard(path) to throw DataError naming the file and `detail`.
void expect_shard_error(const std::string& path, const std::string& detail) {
  try {
    read_token_shard(path);
    FAIL("expected DataError for " << path);
  } catch (const DataError& e) {
    INFO(e.what());
    CHECK_THAT(std::string(e.what()), Contains(path));
    CHECK_THAT(std::string(e.what()), Contains(detail));
  }
}

// Tokens 0, 1, ..., n-1 (so a token's value is its position).
Tensor iota_tokens(int64_t n) { return arange(0, n, 1, DType::i64); }

// The reference reader (gpt_small_torch.py), written out: row b of global batch i starts at
// ((i*B + b) * T) mod (N - T - 1); with iota tokens, x[b][t] = start + t and y[b][t] = start + t + 1.
void check_batch(const Batch& batch, int64_t N, int64_t T, int64_t B, int64_t i, int64_t row0, int64_t rows) {
  const Tensor& x = batch["x"];
  const Tensor& y = batch["y"];
  REQUIRE(x.dtype() == DType::i64);
  REQUIRE(y.dtype() == DType::i64);
  REQUIRE(x.shape() == Shape{rows, T});
  REQUIRE(y.shape() == Shape{rows, T});
  const auto xv = x.to_vector<int64_t>(), yv = y.to_vector<int64_t>();
  const int64_t n = N - T - 1;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = row0 + r;
    const int64_t start = ((i * B + b) * T) % n;
    for (int64_t t = 0; t < T; ++t) {
      INFO("batch " << i << " row " << b << " position " << t);
      REQUIRE(xv[size_t(r * T + t)] == start + t);
      REQUIRE(yv[size_t(r * T + t)] == start + t + 1);
    }
  }
}

bool same_batch(const Batch& a, const Batch& b) {
  return a["x"].to_vector<int64_t>() == b["x"].to_vector<int64_t>() &&
         a["y"].to_vector<int64_t>() == b["y"].to_vector<int64_t>();
}

}  // namespace

// ---------------------------------------------------------------- shards

TEST_CASE("token shard: write then read round-trips, with the llm.c header byte for byte", "[io][tokens]") {
  TempDir d;
  const std::vector<int64_t> ids = {0, 1, 65535, 42, 7, 256};
  write_token_shard(d / "a.bin", from_vector(ids, Shape{6}));
  const auto bytes = io_test::read_bytes(d / "a.bin");
  // Expected bytes written out by hand: 20240520 = 0x0134D888, version 1, count 6, zeros, then uint16 LE.
  REQUIRE(bytes.size() == 1024 + 2 * 6);
  CHECK(std::vector<unsigned char>(bytes.begin(), bytes.begin() + 12) ==
        std::vector<unsigned char>{0x88, 0xD8, 0x34, 0x01, 1, 0, 0, 0, 6, 0, 0, 0});
  bool rest_zero = true;
  for (size_t i = 12; i < 1024; ++i) rest_zero = rest_zero && bytes[i] == 0;
  CHECK(rest_zero);
  CHECK(std::vector<unsigned char>(bytes.begin() + 1024, bytes.end()) ==
        std::vector<unsigned char>{0, 0, 1, 0, 0xFF, 0xFF, 42, 0, 7, 0, 0, 1});

  Tensor t = read_token_shard(d / "a.bin");
  CHECK(t.dtype() == DType::i64);
  CHECK(t.shape() == Shape{6});
  CHECK(t.to_vector<int64_t>() == ids);

  // i32 input, a hand-written file, and an empty shard read back too.
  write_token_shard(d / "b.bin", from_vector(std::vector<int32_t>{5, 4, 3}, Shape{3}));
  CHECK(read_token_shard(d / "b.bin").to_vector<int64_t>() == std::vector<int64_t>{5, 4, 3});
  io_test::write_bytes(d / "c.bin", shard_bytes(20240520, 1, 2, {1000, 2}));
  CHECK(read_token_shard(d / "c.bin").to_vector<int64_t>() == std::vector<int64_t>{1000, 2});
  write_token_shard(d / "e.bin", empty(Shape{0}, DType::i64));
  CHECK(read_token_shard(d / "e.bin").numel() == 0);
  // No temporary file is left behind.
  int files = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(d.path)) ++files;
  CHECK(files == 4);
}

TEST_CASE("token shard: write rejects ids outside uint16 and non-integer tensors", "[io][tokens]") {
  TempDir d;
  try {
    write_token_shard(d / "x.bin", from_vector(std::vector<int64_t>{1, 2, 65536}, Shape{3}));
    FAIL("expected ValueError");
  } catch (const ValueError& e) {
    CHECK_THAT(e.message(), Contains("token 2"));
    CHECK(e.found() == "65536");
  }
  CHECK_THROWS_AS(write_token_shard(d / "x.bin", from_vector(std::vector<int64_t>{-1}, Shape{1})), ValueError);
  CHECK_THROWS_AS(write_token_shard(d / "x.bin", zeros(Shape{3}, DType::f32)), DTypeError);
  CHECK_FALSE(std::filesystem::exists(d / "x.bin"));
}

TEST_CASE("token shard: each malformed file gives a DataError naming the file and the check", "[io][tokens]") {
  TempDir d;
  io_test::write_bytes(d / "short_header.bin", std::vector<unsigned char>(500, 0));
  expect_shard_error(d / "short_header.bin", "truncated in its header");

  io_test::write_bytes(d / "magic.bin", shard_bytes(20240521, 1, 2, {1, 2}));
  expect_shard_error(d / "magic.bin", "bad magic number");

  io_test::write_bytes(d / "version.bin", shard_bytes(20240520, 2, 2, {1, 2}));
  expect_shard_error(d / "version.bin", "unsupported version");

  io_test::write_bytes(d / "truncated.bin", shard_bytes(20240520, 1, 10, {1, 2, 3, 4, 5}));
  expect_shard_error(d / "truncated.bin", "is truncated: header[2] says 10 tokens");

  io_test::write_bytes(d / "count.bin", shard_bytes(20240520, 1, 2, {1, 2, 3}));
  expect_shard_error(d / "count.bin", "does not match the file size");

  io_test::write_bytes(d / "negative.bin", shard_bytes(20240520, 1, -3, {}));
  expect_shard_error(d / "negative.bin", "negative token count");

  // A valid shard with one odd trailing byte is a size mismatch too.
  auto odd = shard_bytes(20240520, 1, 1, {9});
  odd.push_back(0);
  io_test::write_bytes(d / "odd.bin", odd);
  expect_shard_error(d / "odd.bin", "does not match the file size");

  CHECK_THROWS_AS(read_token_shard(d / "missing.bin"), IOError);
}

// ---------------------------------------------------------------- the batch reader

TEST_CASE("token_loader reads the reference windows, across the wrap of the token stream", "[io][tokens]") {
  const int64_t N = 1000, T = 8, B = 4;  // n = 991: the stream wraps after 31 batches
  auto loader = token_loader(iota_tokens(N), {.batch_size = B, .seq_len = T});
  for (int64_t i = 0; i < 100; ++i) {
    CHECK(loader->step() == i);
    check_batch(loader->next(), N, T, B, i, 0, B);
  }
}

TEST_CASE("token_loader matches the formula past the loader's epochs (small periods)", "[io][tokens]") {
  // (N, T, B): n = N - T - 1 coprime to T (period n), sharing a factor with T (period n / gcd), and
  // B not dividing the period, so the loader's epoch of lcm(period, B) windows wraps several times.
  const std::vector<std::array<int64_t, 3>> cases = {{30, 4, 4}, {27, 4, 6}, {20, 3, 5}, {12, 10, 3}};
  for (auto [N, T, B] : cases) {
    INFO("N=" << N << " T=" << T << " B=" << B);
    auto loader = token_loader(iota_tokens(N), {.batch_size = B, .seq_len = T, .prefetch = 0});
    for (int64_t i = 0; i < 80; ++i) check_batch(loader->next(), N, T, B, i, 0, B);
  }
}

TEST_CASE("token_loader: rank r of 2 ranks reads its half of the one-rank batch rows", "[io][tokens]") {
  const int64_t N = 500, T = 6, B = 8;
  Tensor tok = iota_tokens(N);
  auto one = token_loader(tok, {.batch_size = B, .seq_len = T});
  auto r0 = token_loader(tok, {.batch_size = B, .seq_len = T, .rank = 0, .world = 2});
  auto r1 = token_loader(tok, {.batch_size = B, .seq_len = T, .rank = 1, .world = 2});
  for (int64_t i = 0; i < 30; ++i) {
    Batch full = one->next(), a = r0->next(), b = r1->next();
    check_batch(a, N, T, B, i, 0, B / 2);
    check_batch(b, N, T, B, i, B / 2, B / 2);
    CHECK(same_batch(a, full.slice(0, B / 2)));
    CHECK(same_batch(b, full.slice(B / 2, B)));
  }
  // B must divide by the number of ranks.
  try {
    token_loader(tok, {.batch_size = 4, .seq_len = T, .rank = 0, .world = 3});
    FAIL("expected ValueError");
  } catch (const ValueError& e) {
    CHECK_THAT(e.message(), Contains("does not divide by the number of ranks"));
  }
}

TEST_CASE("token_loader: seek(s) then next() is batch s and step() follows", "[io][tokens]") {
  const int64_t N = 300, T = 5, B = 4;
  Tensor tok = iota_tokens(N);
  auto straight = token_loader(tok, {.batch_size = B, .seq_len = T});
  std::vector<Batch> seen;
  for (int i = 0; i < 60; ++i) seen.push_back(straight->next());
  auto resumed = token_loader(tok, {.batch_size = B, .seq_len = T, .rank = 1, .world = 2});
  resumed->seek(37);
  CHECK(resumed->step() == 37);
  for (int64_t i = 37; i < 60; ++i) {
    Batch b = resumed->next();
    CHECK(same_batch(b, seen[size_t(i)].slice(B / 2, B)));
    check_batch(b, N, T, B, i, B / 2, B / 2);
  }
  CHECK(resumed->step() == 60);
  // Far ahead: a plain DataLoader (shuffle = false) over a huge lazy TokenDataset costs no memory.
  auto big = std::make_shared<TokenDataset>(tok, T, int64_t(1) << 40);
  DataLoader far(big, {.batch_size = B, .shuffle = false, .prefetch = 0});
  far.seek(int64_t(1) << 35);
  check_batch(far.next(), N, T, B, int64_t(1) << 35, 0, B);
}

TEST_CASE("TokenDataset and token_eval_dataset: windows, sizes and errors", "[io][tokens]") {
  const int64_t N = 100, T = 7, B = 3;
  auto ev = token_eval_dataset(iota_tokens(N), T, B, 5);
  CHECK(ev->size() == 15);
  std::vector<int64_t> all;
  for (int64_t k = 0; k < 15; ++k) all.push_back(k);
  Batch b = ev->get(all);
  // The first 5 reference batches, one after another.
  for (int64_t i = 0; i < 5; ++i) check_batch(b.slice(i * B, (i + 1) * B), N, T, B, i, 0, B);
  CHECK_THROWS_AS(ev->get({15}), ValueError);
  // Periods n / gcd(n, T): n = 92, gcd(92, 7) = 1.
  CHECK(ev->period() == 92);
  CHECK(TokenDataset(iota_tokens(22), 4, 1).period() == 17);  // n = 17
  CHECK(TokenDataset(iota_tokens(21), 4, 1).period() == 4);   // n = 16, gcd 4
  CHECK(TokenDataset(iota_tokens(21), 4, 1).window_start(5) == 4);  // 20 mod 16

  try {
    TokenDataset(iota_tokens(9), 8, 1);
    FAIL("expected ValueError");
  } catch (const ValueError& e) {
    CHECK_THAT(e.expected(), Contains("10 tokens"));
  }
  CHECK_THROWS_AS(TokenDataset(iota_tokens(50).astype(DType::i32), 8, 1), DTypeError);
  CHECK_THROWS_AS(TokenDataset(iota_tokens(50).reshape(Shape{5, 10}), 2, 1), ShapeError);
  CHECK_THROWS_AS(token_eval_dataset(iota_tokens(50), 8, 2, 0), ValueError);
}

// ---------------------------------------------------------------- Brown corpus text

TEST_CASE("Brown tag stripping keeps the text before each token's last '/'", "[io][brown]") {
  CHECK(strip_brown_tags("\tThe/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd Friday/nr") ==
        "The Fulton County Grand Jury said Friday");
  CHECK(strip_brown_tags("of/in Atlanta's/np$ recent/jj ``/`` no/at evidence/nn ''/'' ./.") ==
        "of Atlanta's recent `` no evidence '' .");
  // Words that contain '/' themselves, and a '/' word.
  CHECK(strip_brown_tags("1/2/cd inch and/or/cc //in mg/l/hr/nn AAb//nn") == "1/2 inch and/or / mg/l/hr AAb/");
  // Contractions and compound tags; runs of spaces and tabs; a trailing carriage return.
  CHECK(strip_brown_tags("  I'm/ppss+bem \t wouldn't/md*   do/do \r") == "I'm wouldn't do");
  CHECK(strip_brown_tags("") == "");
  CHECK(strip_brown_tags(" \t ") == "");
  CHECK(strip_brown_tags("/nn word/nn") == "word");

  const std::string file = "\n\n\tThe/at jury/nn said/vbd ./.\nIt/pps did/dod ./.\n\n\n\tHold/vb on/rp ./.\n";
  CHECK(brown_sentences(file) == std::vector<std::string>{"The jury said .", "It did .", "Hold on ."});
  CHECK(brown_sentences("").empty());
}

// ---------------------------------------------------------------- tokenizer

namespace {
std::vector<std::string> tiny_corpus() {
  return {"the cat sat on the mat .", "the dog sat on the log .", "a cat and a dog met on the mat .",
          "the mat was red and the log was brown .", "then the cat ran , and the dog sat .",
          "on the mat the cat sat and sat .", "the dog and the cat were friends ."};
}
}  // namespace

TEST_CASE("Tokenizer: a tiny BPE model trains deterministically and round-trips text", "[io][tokenizer]") {
  TempDir d;
  TokenizerTrainOptions o;
  o.vocab_size = 60;
  train_bpe_tokenizer(tiny_corpus(), d / "a.model", o);
  train_bpe_tokenizer(tiny_corpus(), d / "b.model", o);
  CHECK(io_test::read_bytes(d / "a.model") == io_test::read_bytes(d / "b.model"));

  Tokenizer tok = Tokenizer::load(d / "a.model");
  CHECK(tok.vocab_size() == 60);
  CHECK(tok.unk_id() == 0);
  CHECK(tok.bos_id() == 1);
  CHECK(tok.eos_id() == 2);
  CHECK(tok.id_to_piece(2) == "</s>");
  for (const auto& s : tiny_corpus()) {
    auto ids = tok.encode(s);
    INFO(s);
    CHECK(tok.decode(ids) == s);
    CHECK(ids.size() < s.size());  // BPE merged characters into longer pieces
    for (int id : ids) CHECK((id >= 3 && id < 60));
  }
  // A frequent word is one piece with the word-boundary marker.
  auto the = tok.encode("the");
  REQUIRE(the.size() == 1);
  CHECK(tok.id_to_piece(the[0]) == "\xE2\x96\x81the");  // "▁the"
  // Unseen text round-trips up to characters the model has not seen (<unk>).
  CHECK(tok.decode(tok.encode("the cat met the dog")) == "the cat met the dog");
  auto unk = tok.encode("zebra");
  CHECK(std::find(unk.begin(), unk.end(), tok.unk_id()) != unk.end());
  // eos decodes to nothing.
  auto with_eos = tok.encode("the cat");
  with_eos.insert(with_eos.begin(), tok.eos_id());
  CHECK(tok.decode(with_eos) == "the cat");

  CHECK_THROWS_AS(tok.decode({5, 60}), ValueError);
  CHECK_THROWS_AS(tok.decode({-1}), ValueError);
  CHECK_THROWS_AS(Tokenizer::load(d / "missing.model"), IOError);
  io_test::write_bytes(d / "junk.model", {'n', 'o', 't', ' ', 'a', ' ', 'm', 'o', 'd', 'e', 'l'});
  CHECK_THROWS_AS(Tokenizer::load(d / "junk.model"), DataError);
  // A vocabulary larger than the text supports is refused with SentencePiece's reason.
  o.vocab_size = 5000;
  CHECK_THROWS_AS(train_bpe_tokenizer(tiny_corpus(), d / "c.model", o), DataError);
  CHECK_THROWS_AS(train_bpe_tokenizer({}, d / "c.model", {}), ValueError);
}
