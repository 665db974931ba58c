// GPT-2's byte-level BPE tokenizer (Radford et al. 2019; the algorithm of openai/gpt-2's src/encoder.py,
// which tiktoken's "gpt2" encoding and Hugging Face's GPT2Tokenizer reproduce), behind titanax::Tokenizer
// (io/tokenizer.h: Tokenizer::load of a folder holding vocab.json and merges.txt). Internal.
//
// Encoding: the text is cut into pre-tokens by GPT-2's pattern
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// (PCRE2 with Unicode properties); each pre-token's UTF-8 bytes start as one symbol per byte and the
// adjacent pair with the lowest merge rank (its line in merges.txt) is merged, every occurrence at once,
// until no pair has a rank; each symbol is then a vocabulary entry. vocab.json and merges.txt spell
// bytes with GPT-2's bytes_to_unicode table (printable Latin-1 bytes as themselves, the other 68 as
// U+0100 onwards: a space is "Ġ"), decoded back to raw bytes on load. The literal text "<|endoftext|>"
// becomes the end-of-text id, as in Hugging Face's tokenizer. Decoding concatenates the entries' bytes.
#pragma once

#include <memory>
#include <string>
#include <vector>

namespace titanax::detail {

class Gpt2Bpe {
 public:
  /// `vocab_json`: the content of vocab.json (openai's encoder.json), a JSON object of ids 0..n-1;
  /// `merges`: the content of merges.txt (vocab.bpe), an optional "#version" line then one "a b" pair per
  /// line, highest priority first. `vocab_path` and `merges_path` name the files in errors. Throws
  /// DataError for JSON that is not such an object, ids that are not 0..n-1 once each, an entry not
  /// spelled in GPT-2's byte alphabet, a missing single byte, a merge line that is not two entries, or a
  /// merge whose parts or result are not in the vocabulary (naming the line).
  Gpt2Bpe(const std::string& vocab_json, const std::string& merges, const std::string& vocab_path,
          const std::string& merges_path);
  Gpt2Bpe(Gpt2Bpe&&) noexcept;
  ~Gpt2Bpe();

  /// Ids of UTF-8 `text`. Throws DataError for text that is not valid UTF-8 (naming the byte offset),
  /// ValueError when Titanax was built without PCRE2 (TITANAX_PCRE2=OFF).
  std::vector<int> encode(const std::string& text) const;
  /// The bytes of `ids`, concatenated (a cut through a multi-byte character stays cut). Throws
  /// ValueError for an id out of range, naming its position.
  std::string decode(const std::vector<int>& ids) const;
  int vocab_size() const;
  /// The id of "<|endoftext|>", or -1 when the vocabulary has none.
  int eot_id() const;
  /// The vocabulary entry of `id` as spelled in vocab.json ("Ġthe"). Throws ValueError out of range.
  std::string piece(int id) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace titanax::detail
