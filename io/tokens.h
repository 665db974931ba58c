// Token shards (the llm.c / nanoGPT format) and the sequential GPT batch reader.
//
// Shard format: a header of 256 little-endian int32 (header[0] = 20240520 magic, header[1] = 1 version,
// header[2] = token count N, the rest 0), then N tokens as little-endian uint16. The file is exactly
// 1024 + 2*N bytes (llm.c rejects any other size, and so does read_token_shard).
//
// Batch reading (as ../shared/peers/gpt_small_torch.py and llm.c-style sequential readers do): with
// n = N - T - 1, row b of global batch i is the window tokens[s, s + T + 1), s = ((i*B + b) * T) mod n;
// x = window[:-1], y = window[1:]. Data-parallel rank r of `world` takes rows [r*B/world, (r+1)*B/world).
//
//   Tensor train = tx::read_token_shard("data/brown/train.bin");          // i64 [N]
//   auto loader = tx::token_loader(train, {.batch_size = 16, .seq_len = 128, .rank = r, .world = w});
//   engine.fit(model, loss, *loader, {.eval = {.data = tx::token_eval_dataset(val, 128, 16, 20), ...}});
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "core/tensor.h"
#include "io/data.h"

namespace titanax {

/// Magic number and version of the llm.c / nanoGPT token shard header (uint16 tokens).
inline constexpr int32_t kTokenShardMagic = 20240520;
inline constexpr int32_t kTokenShardVersion = 1;
/// Header size in bytes (256 int32).
inline constexpr int64_t kTokenShardHeaderBytes = 1024;

/// Reads a token shard into an i64 tensor [N] on the CPU (i64 because embedding / cross_entropy take
/// i64 ids). Throws IOError when the file is missing or unreadable, and DataError naming the file and
/// the failed check when: the file is shorter than the 1024-byte header ("truncated in its header");
/// header[0] != 20240520 ("bad magic"); header[1] != 1 ("unsupported version"); header[2] < 0
/// ("negative token count"); the file is shorter than 1024 + 2*N bytes ("truncated"); or longer
/// ("token count does not match the file size").
Tensor read_token_shard(const std::string& path);

/// Writes `tokens` (an integer tensor of any shape, read in row-major order: u8, i32 or i64, any device)
/// as a shard of N = tokens.numel() tokens. Writes "<path>.tmp<pid>" and renames it to `path`, so an
/// interrupted write never leaves a partial file under the final name. Throws ValueError for a token
/// outside [0, 65535] (naming its index) or more than 2^31 - 1 tokens, DTypeError for a non-integer
/// tensor, IOError when the file cannot be written.
void write_token_shard(const std::string& path, const Tensor& tokens);

/// Fixed-length windows of a token sequence, read the llm.c / nanoGPT way: example k (k >= 0) is the
/// window tokens[s, s + T + 1) with s = (k*T) mod (N - T - 1), as "x" = its first T tokens and
/// "y" = its last T tokens (both i64 [T] per example, so get() returns i64 [len(indices), T]).
/// Example index k = i*B + b is row b of global batch i of the reference reader.
///
/// size() is a constructor argument: window starts repeat with period P = period() (examples k and k + P
/// are the same window), so any size that is a multiple of P (and, for DataLoader, of the batch size)
/// reads the endless sequential stream exactly; token_loader picks lcm(P, B).
class TokenDataset final : public Dataset {
 public:
  /// tokens: i64 [N] on the CPU (as read_token_shard returns; kept by handle, not copied); seq_len: T.
  /// Throws DTypeError for a non-i64 tensor, ShapeError for a tensor that is not 1-D, ValueError for
  /// seq_len < 1, size < 1, or N < T + 2 (too few tokens for one window: say how many are needed).
  TokenDataset(Tensor tokens, int64_t seq_len, int64_t size);
  int64_t size() const override { return size_; }
  /// Throws ValueError for an index outside [0, size()).
  Batch get(const std::vector<int64_t>& indices) const override;

  int64_t seq_len() const { return seq_len_; }
  int64_t num_tokens() const { return tokens_.numel(); }
  const Tensor& tokens() const { return tokens_; }
  /// First token of window k: (k*T) mod (N - T - 1) (computed without overflow for any k >= 0).
  int64_t window_start(int64_t k) const;
  /// Number of distinct consecutive windows before the starts repeat: n / gcd(n, T), n = N - T - 1.
  int64_t period() const;

 private:
  Tensor tokens_;
  int64_t seq_len_, size_, n_;
};

struct TokenLoaderOptions {
  int64_t batch_size = 16;  ///< B: global batch over all data-parallel ranks (windows per step)
  int64_t seq_len = 128;    ///< T: tokens per window ("x" and "y" are [B_local, T])
  int rank = 0;             ///< this rank's rows [rank*B/world, (rank+1)*B/world) of each global batch
  int world = 1;            ///< data-parallel ranks; must divide batch_size
  int prefetch = 2;         ///< batches prepared ahead on a background thread (0 = synchronous)
};

/// The training stream: a DataLoader (shuffle = false) over a TokenDataset of lcm(period, B) examples,
/// so next() returns global batch i = 0, 1, 2, ... of the reference reader for every i, as
/// Batch{"x": i64 [B/world, T], "y": i64 [B/world, T]}; seek(i) / step() resume as with any DataLoader,
/// and Engine::fit takes *token_loader(...). Throws what TokenDataset and DataLoader throw (ValueError
/// when world does not divide batch_size).
std::unique_ptr<DataLoader> token_loader(const Tensor& tokens, const TokenLoaderOptions& opts);

/// The evaluation set: the first `batches` global batches of the reference reader (batch size B, window
/// T), i.e. a TokenDataset of batches*B examples. Evaluating all of it (Engine::evaluate, EvalSpec.data)
/// in any batch size and over any number of ranks gives the same per-token mean as averaging the
/// reference's per-batch means. Throws ValueError for batches < 1 or batch_size < 1, and what
/// TokenDataset throws.
std::shared_ptr<TokenDataset> token_eval_dataset(const Tensor& tokens, int64_t seq_len, int64_t batch_size,
                                                 int64_t batches);

}  // namespace titanax
