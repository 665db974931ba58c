// GPT-2's byte-level BPE (io/gpt2_bpe.h) through Tokenizer::load of a folder. The oracle is
// tests/gpt2/gpt2_bpe_reference.py: openai's encoder.py algorithm with the `regex` module's \p{L} / \p{N}
// (python3-regex), sharing no code with Titanax. It learns merges on a small multilingual text, writes
// them as vocab.json / merges.txt, and encodes test strings; Titanax must give the same ids and decode
// them back to the same bytes.
#include <catch2/catch.hpp>

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/tokenizer.h"
#include "io_test_util.h"
#include "test_util.h"

using namespace titanax;
using Catch::Matchers::Contains;
using testing::catch_error;

namespace {

// The reference's files, written once for the test binary.
const io_test::TempDir& reference_dir() {
  static const io_test::TempDir dir = [] {
    io_test::TempDir d;
    const std::string cmd =
        io_test::kPython + " " + std::string(TITANAX_SOURCE_DIR) + "/tests/gpt2/gpt2_bpe_reference.py " + d.path.string();
    if (io_test::shell(cmd, d.path / "log.txt") != 0)  // python3-regex missing? scripts/install-deps.sh installs it
      throw std::runtime_error("gpt2_bpe_reference.py failed: " + io_test::read_text(d.path / "log.txt"));
    return d;
  }();
  return dir;
}

void check_cases(const Tokenizer& tok) {
  const nlohmann::json cases = nlohmann::json::parse(io_test::read_text(reference_dir() / "cases.json"));
  REQUIRE(cases.size() >= 10);
  for (const auto& c : cases) {
    const std::string text = c["text"];
    INFO("text: " << text);
    const std::vector<int> want = c["ids"];
    CHECK(tok.encode(text) == want);
    CHECK(tok.decode(want) == text);
  }
}

}  // namespace

TEST_CASE("GPT-2 tokenizer: the reference's ids for every test string, and back", "[tokenizer][gpt2]") {
  const auto& d = reference_dir();
  const Tokenizer tok = Tokenizer::load(d.path.string());
  check_cases(tok);
  const nlohmann::json vocab = nlohmann::json::parse(io_test::read_text(d / "vocab.json"));
  CHECK(tok.vocab_size() == int(vocab.size()));
  CHECK(tok.eos_id() == vocab["<|endoftext|>"].get<int>());
  CHECK(tok.unk_id() == -1);
  CHECK(tok.id_to_piece(vocab["Ġthe"].get<int>()) == "Ġthe");
  CHECK(tok.decode({tok.eos_id()}) == "<|endoftext|>");

  // openai's file names hold the same tokenizer.
  io_test::TempDir openai;
  std::filesystem::copy_file(d / "vocab.json", openai / "encoder.json");
  std::filesystem::copy_file(d / "merges.txt", openai / "vocab.bpe");
  check_cases(Tokenizer::load(openai.path.string()));
}

TEST_CASE("GPT-2 tokenizer: invalid UTF-8 and malformed files are refused", "[tokenizer][gpt2]") {
  const auto& d = reference_dir();
  const Tokenizer tok = Tokenizer::load(d.path.string());
  CHECK_THAT(catch_error<DataError>([&] { tok.encode("ok so far \xC3\x28 then"); }).what(),
             Contains("not valid UTF-8 at byte 10"));
  CHECK_THAT(catch_error<DataError>([&] { tok.encode("a<|endoftext|>b \xFF"); }).what(), Contains("at byte 16"));
  CHECK_THROWS_AS(tok.decode({tok.vocab_size()}), ValueError);

  io_test::TempDir bad;
  const std::string vocab = io_test::read_text(d / "vocab.json"), merges = io_test::read_text(d / "merges.txt");
  auto refused = [&](const std::string& v, const std::string& m) {
    io_test::write_bytes(bad / "vocab.json", std::vector<unsigned char>(v.begin(), v.end()));
    io_test::write_bytes(bad / "merges.txt", std::vector<unsigned char>(m.begin(), m.end()));
    return std::string(catch_error<DataError>([&] { Tokenizer::load(bad.path.string()); }).what());
  };
  nlohmann::json j = nlohmann::json::parse(vocab);
  nlohmann::json gap = j;
  gap.erase("Ġthe");  // an id missing from 0..n-1
  CHECK_THAT(refused(gap.dump(), merges), Contains("the ids are not 0.."));
  nlohmann::json no_byte = j;
  const int id_of_a = no_byte["a"];
  no_byte.erase("a");
  no_byte["α"] = id_of_a;  // not in GPT-2's byte alphabet
  CHECK_THAT(refused(no_byte.dump(), merges), Contains("'α' is not spelled in GPT-2's byte alphabet"));
  const size_t lines = size_t(std::count(merges.begin(), merges.end(), '\n'));
  CHECK_THAT(refused(vocab, merges + "zz qq\n"),
             Contains("merges.txt', line " + std::to_string(lines + 1) + ": not a merge of two vocabulary entries"));
  CHECK_THAT(refused(vocab, merges + "a b c\n"), Contains("'a b c'"));
  CHECK_THAT(refused("[1, 2]", merges), Contains("not a JSON object of ids"));
  CHECK_THAT(refused("{", merges), Contains("is not JSON"));
  io_test::TempDir empty;
  CHECK_THAT(catch_error<IOError>([&] { Tokenizer::load(empty.path.string()); }).what(),
             Contains("vocab.json and merges.txt"));
}
