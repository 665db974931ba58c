#include "io/tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <filesystem>
#include <fstream>
#include <mutex>
#include <unordered_map>

#include "core/error.h"
#include "io/gpt2_bpe.h"
#include "io/npm.h"

namespace titanax {
namespace {

namespace fs = std::filesystem;

// Feeds the trainer from memory, in order.
class VectorIterator final : public sentencepiece::SentenceIterator {
 public:
  explicit VectorIterator(const std::vector<std::string>& v) : v_(v) {}
  bool done() const override { return i_ >= v_.size(); }
  void Next() override { ++i_; }
  const std::string& value() const override { return v_[i_]; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  const std::vector<std::string>& v_;
  size_t i_ = 0;
};

}  // namespace

struct Tokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
  std::unique_ptr<detail::Gpt2Bpe> gpt2;  // set: GPT-2's byte-level BPE, not sp
};

namespace {
std::string read_whole(const fs::path& p, const char* what) {
  std::ifstream in(p, std::ios::binary);
  if (!in) throw IOError(std::string("cannot open ") + what + " '" + p.string() + "'", "a readable file", "open failed");
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}
}  // namespace

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::load(const std::string& path) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) {  // GPT-2's files: Hugging Face's names, or openai's
    for (const auto& [vocab, merges] : {std::pair<const char*, const char*>{"vocab.json", "merges.txt"}, {"encoder.json", "vocab.bpe"}}) {
      const fs::path v = fs::path(path) / vocab, m = fs::path(path) / merges;
      if (!fs::is_regular_file(v, ec) || !fs::is_regular_file(m, ec)) continue;
      auto impl = std::make_unique<Impl>();
      impl->gpt2 = std::make_unique<detail::Gpt2Bpe>(read_whole(v, "GPT-2 vocabulary"), read_whole(m, "GPT-2 merges"),
                                                     v.string(), m.string());
      return Tokenizer(std::move(impl));
    }
    throw IOError("no tokenizer in folder '" + path + "'", "vocab.json and merges.txt (GPT-2's, as on the Hugging Face Hub) "
                  "or encoder.json and vocab.bpe (openai's)", "neither pair", "name a SentencePiece .model file or a GPT-2 folder");
  }
  if (!fs::is_regular_file(path, ec))
    throw IOError("tokenizer model not found: '" + path + "'",
                  "a SentencePiece .model file, or a folder with GPT-2's vocab.json and merges.txt", "no such file",
                  "train one with titanax::train_bpe_tokenizer, or fetch the Brown corpus (`titanax fetch brown`)");
  auto impl = std::make_unique<Impl>();
  auto st = impl->sp.LoadFromSerializedProto(read_whole(path, "tokenizer model"));
  if (!st.ok())
    throw DataError("'" + path + "' is not a SentencePiece model", "a serialized sentencepiece ModelProto",
                    st.ToString());
  return Tokenizer(std::move(impl));
}

Tokenizer Tokenizer::from_bytes(const std::string& serialized) {
  auto impl = std::make_unique<Impl>();
  auto st = impl->sp.LoadFromSerializedProto(serialized);
  if (!st.ok())
    throw DataError("bytes are not a SentencePiece model", "a serialized sentencepiece ModelProto", st.ToString());
  return Tokenizer(std::move(impl));
}

std::vector<int> Tokenizer::encode(const std::string& text) const {
  if (impl_->gpt2) return impl_->gpt2->encode(text);
  std::vector<int> ids;
  auto st = impl_->sp.Encode(text, &ids);
  if (!st.ok()) throw DataError("SentencePiece cannot encode the text", "UTF-8 text", st.ToString());
  return ids;
}

std::string Tokenizer::decode(const std::vector<int>& ids) const {
  if (impl_->gpt2) return impl_->gpt2->decode(ids);
  const int n = vocab_size();
  for (size_t i = 0; i < ids.size(); ++i)
    if (ids[i] < 0 || ids[i] >= n)
      throw ValueError("Tokenizer::decode: id " + std::to_string(ids[i]) + " at position " + std::to_string(i) +
                           " is out of range",
                       "0 <= id < " + std::to_string(n), std::to_string(ids[i]));
  std::string out;
  auto st = impl_->sp.Decode(ids, &out);
  if (!st.ok()) throw DataError("SentencePiece cannot decode the ids", "valid ids", st.ToString());
  return out;
}

int Tokenizer::vocab_size() const { return impl_->gpt2 ? impl_->gpt2->vocab_size() : impl_->sp.GetPieceSize(); }
int Tokenizer::eos_id() const { return impl_->gpt2 ? impl_->gpt2->eot_id() : impl_->sp.eos_id(); }
int Tokenizer::bos_id() const { return impl_->gpt2 ? impl_->gpt2->eot_id() : impl_->sp.bos_id(); }
int Tokenizer::unk_id() const { return impl_->gpt2 ? -1 : impl_->sp.unk_id(); }

std::string Tokenizer::id_to_piece(int id) const {
  if (id < 0 || id >= vocab_size())
    throw ValueError("Tokenizer::id_to_piece: id out of range", "0 <= id < " + std::to_string(vocab_size()),
                     std::to_string(id));
  return impl_->gpt2 ? impl_->gpt2->piece(id) : impl_->sp.IdToPiece(id);
}

void train_bpe_tokenizer(const std::vector<std::string>& sentences, const std::string& model_path,
                         const TokenizerTrainOptions& opts) {
  if (sentences.empty())
    throw ValueError("train_bpe_tokenizer: no training sentences", "at least one sentence", "none");
  if (opts.vocab_size < 4)
    throw ValueError("train_bpe_tokenizer: vocabulary too small", "vocab_size >= 4 (<unk>, <s>, </s> and a piece)",
                     std::to_string(opts.vocab_size));
  const std::unordered_map<std::string, std::string> args = {
      {"model_type", "bpe"},
      {"vocab_size", std::to_string(opts.vocab_size)},
      {"character_coverage", std::to_string(opts.character_coverage)},
      {"num_threads", std::to_string(opts.num_threads)},
      {"max_sentence_length", std::to_string(opts.max_sentence_length)},
      {"input_sentence_size", "0"},
      {"shuffle_input_sentence", "false"},
      {"unk_id", "0"},
      {"bos_id", "1"},
      {"eos_id", "2"},
      {"pad_id", "-1"},
      {"normalization_rule_name", "nmt_nfkc"},
      {"minloglevel", opts.verbose ? "0" : "2"},
  };
  std::string model;
  {
    // The trainer and its log level are process-wide state: one training at a time.
    static std::mutex mu;
    std::lock_guard<std::mutex> lock(mu);
    sentencepiece::SetRandomGeneratorSeed(opts.seed);
    VectorIterator it(sentences);
    auto st = sentencepiece::SentencePieceTrainer::Train(args, &it, &model);
    if (!st.ok())
      throw DataError("SentencePiece could not train a BPE model on the given sentences",
                      "a vocabulary of " + std::to_string(opts.vocab_size) + " pieces the text supports",
                      st.ToString(), "use a smaller vocab_size or more text");
  }
  const fs::path final_path(model_path);
  const fs::path tmp = detail::temp_path(final_path);
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(model.data(), std::streamsize(model.size()));
    out.close();
    if (!out) {
      std::error_code ec;
      fs::remove(tmp, ec);
      throw IOError("cannot write tokenizer model '" + tmp.string() + "'", "a writable path", "write failed");
    }
  }
  detail::rename_into_place(tmp, final_path);
}

}  // namespace titanax
