// Text <-> token ids with a SentencePiece model, or with GPT-2's byte-level BPE (io/gpt2_bpe.h: the
// vocab.json and merges.txt of a Hugging Face GPT-2 folder). libsentencepiece and PCRE2 stay private
// dependencies: their headers are not included here.
//
//   auto tok = tx::Tokenizer::load("data/brown/tokenizer.model");
//   std::vector<int> ids = tok.encode("The jury said .");   // ids in [0, tok.vocab_size())
//   std::string text = tok.decode(ids);                     // "The jury said ."
//   auto gpt2 = tx::Tokenizer::load("gpt2");                // gpt2/vocab.json, gpt2/merges.txt
//   gpt2.encode("Hello world");                             // {15496, 995}, as tiktoken's "gpt2"
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace titanax {

class Tokenizer {
 public:
  /// Loads a SentencePiece model file (as train_bpe_tokenizer or spm_train write), or, when `path` is a
  /// folder, GPT-2's tokenizer from its vocab.json and merges.txt (or openai's encoder.json and vocab.bpe).
  /// Throws IOError when the file is missing or unreadable or the folder holds neither pair, DataError
  /// when the file is not a SentencePiece model or GPT-2's files are malformed (detail::Gpt2Bpe).
  static Tokenizer load(const std::string& path);
  /// Loads a model from its serialized bytes (the content of a .model file). Throws DataError.
  static Tokenizer from_bytes(const std::string& serialized);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  /// Token ids of `text` (UTF-8), after the model's normalisation (SentencePiece: NFKC, whitespace runs
  /// collapsed, a leading "▁" word-boundary marker; GPT-2: none, every byte is kept). No bos / eos is
  /// added (GPT-2: the literal "<|endoftext|>" is its id). Throws DataError if SentencePiece fails or
  /// (GPT-2) the text is not valid UTF-8.
  std::vector<int> encode(const std::string& text) const;
  /// Text of `ids` (SentencePiece: pieces joined, "▁" back to spaces, the leading space dropped; control
  /// ids such as eos decode to nothing. GPT-2: the bytes of the ids joined, "<|endoftext|>" as that
  /// text). Throws ValueError for an id outside [0, vocab_size()) naming its position.
  std::string decode(const std::vector<int>& ids) const;
  /// Number of ids (pieces), control and unknown pieces included.
  int vocab_size() const;
  /// Id of the end-of-sequence control piece "</s>" (GPT-2: "<|endoftext|>"; -1 when the model has none).
  int eos_id() const;
  /// Id of the begin-of-sequence control piece "<s>" (GPT-2: "<|endoftext|>"; -1 when the model has none).
  int bos_id() const;
  /// Id of the unknown piece "<unk>", given to characters the model has not seen (GPT-2: -1, none).
  int unk_id() const;
  /// The piece string of `id` ("▁the", "</s>"; GPT-2: vocab.json's spelling, "Ġthe"). Throws ValueError
  /// for an id out of range.
  std::string id_to_piece(int id) const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

/// Options of train_bpe_tokenizer; each maps to the SentencePiece trainer flag of the same name.
struct TokenizerTrainOptions {
  int vocab_size = 8192;             ///< pieces in the model, including <unk>, <s>, </s>
  double character_coverage = 1.0;   ///< 1.0: every character of the input gets a piece
  int num_threads = 1;               ///< trainer threads
  int max_sentence_length = 1 << 16; ///< bytes; longer input sentences are skipped by the trainer
  unsigned seed = 0;                 ///< sentencepiece::SetRandomGeneratorSeed before training
  bool verbose = false;              ///< SentencePiece's own progress log on stderr
};

/// Trains a SentencePiece BPE model on `sentences` (UTF-8, one training "sentence" each, in this order)
/// and writes it to `model_path` (under a temporary name, then renamed). Trainer flags: model_type=bpe,
/// vocab_size, character_coverage, num_threads, max_sentence_length from `opts`; input_sentence_size=0
/// and shuffle_input_sentence=false (all sentences are used, none sampled); unk_id=0, bos_id=1, eos_id=2,
/// pad_id=-1; normalization_rule_name=nmt_nfkc; everything else at SentencePiece's defaults (byte_fallback
/// off, split_digits off, add_dummy_prefix on). With these flags BPE training has no random choices, so
/// the same sentences give the same model file. Throws ValueError for an empty `sentences` or
/// vocab_size < 4, DataError when SentencePiece refuses the input (e.g. vocab_size larger than the text
/// supports, with SentencePiece's message), IOError when the file cannot be written.
void train_bpe_tokenizer(const std::vector<std::string>& sentences, const std::string& model_path,
                         const TokenizerTrainOptions& opts = {});

}  // namespace titanax
