#include "io/tokens.h"

#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <numeric>
#include <vector>

#include "io/npm.h"

namespace titanax {
namespace {

namespace fs = std::filesystem;

static_assert(std::endian::native == std::endian::little || std::endian::native == std::endian::big);

int32_t le32(const unsigned char* p) {
  return int32_t(uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24));
}

void put_le32(unsigned char* p, int32_t v) {
  const uint32_t u = uint32_t(v);
  p[0] = u & 0xff, p[1] = (u >> 8) & 0xff, p[2] = (u >> 16) & 0xff, p[3] = (u >> 24) & 0xff;
}

struct File {
  std::FILE* f = nullptr;
  ~File() {
    if (f) std::fclose(f);
  }
};

std::string shard_name(const std::string& path) { return "token shard '" + path + "'"; }

}  // namespace

Tensor read_token_shard(const std::string& path) {
  std::error_code ec;
  if (!fs::exists(path, ec))
    throw IOError("token shard not found: '" + path + "'", "an existing file", "no such file",
                  "write shards with titanax::write_token_shard, or fetch one with `titanax fetch brown --out DIR`");
  if (fs::is_directory(path, ec)) throw IOError("token shard path is a directory", "a file", "'" + path + "'");
  const uintmax_t size = fs::file_size(path, ec);
  if (ec) throw IOError("cannot stat " + shard_name(path), "a readable file", ec.message());
  File file;
  file.f = std::fopen(path.c_str(), "rb");
  if (!file.f) throw IOError("cannot open " + shard_name(path), "a readable file", std::strerror(errno));

  if (size < uintmax_t(kTokenShardHeaderBytes))
    throw DataError(shard_name(path) + " is truncated in its header",
                    std::to_string(kTokenShardHeaderBytes) + " header bytes (256 int32)",
                    std::to_string(size) + " bytes in the file");
  unsigned char header[kTokenShardHeaderBytes];
  if (std::fread(header, 1, sizeof header, file.f) != sizeof header)
    throw IOError("cannot read the header of " + shard_name(path), "1024 bytes", std::strerror(errno));
  const int32_t magic = le32(header), version = le32(header + 4), count = le32(header + 8);
  if (magic != kTokenShardMagic)
    throw DataError(shard_name(path) + " has a bad magic number (header[0], bytes 0-3)",
                    std::to_string(kTokenShardMagic), std::to_string(magic),
                    "is this an llm.c / nanoGPT token shard (.bin)?");
  if (version != kTokenShardVersion)
    throw DataError(shard_name(path) + " has an unsupported version (header[1], bytes 4-7)",
                    std::to_string(kTokenShardVersion) + " (uint16 tokens)", std::to_string(version),
                    version == 2 ? "version 2 (uint32 tokens, llm.c's Llama 3 shards) is not supported" : "");
  if (count < 0)
    throw DataError(shard_name(path) + " has a negative token count (header[2], bytes 8-11)", "a count >= 0",
                    std::to_string(count));
  const uintmax_t want = uintmax_t(kTokenShardHeaderBytes) + 2u * uintmax_t(count);
  const std::string rule = "1024 + 2 * " + std::to_string(count) + " tokens = " + std::to_string(want) + " bytes";
  if (size < want)
    throw DataError(shard_name(path) + " is truncated: header[2] says " + std::to_string(count) + " tokens", rule,
                    std::to_string(size) + " bytes (" + std::to_string((size - kTokenShardHeaderBytes) / 2) +
                        " tokens)");
  if (size > want)
    throw DataError(shard_name(path) + " holds more data than its token count: the token count (header[2] = " +
                        std::to_string(count) + ") does not match the file size",
                    rule, std::to_string(size) + " bytes");

  std::vector<uint16_t> raw(static_cast<size_t>(count));
  if (count > 0 && std::fread(raw.data(), 2, raw.size(), file.f) != raw.size())
    throw IOError("cannot read the tokens of " + shard_name(path), std::to_string(count) + " tokens",
                  std::strerror(errno));
  Tensor t = empty(Shape{int64_t(count)}, DType::i64);
  int64_t* out = t.data<int64_t>();
  for (size_t i = 0; i < raw.size(); ++i) {
    uint16_t v = raw[i];
    if constexpr (std::endian::native == std::endian::big) v = uint16_t((v >> 8) | (v << 8));
    out[i] = v;
  }
  return t;
}

void write_token_shard(const std::string& path, const Tensor& tokens_in) {
  if (!tokens_in.defined()) throw ValueError("write_token_shard: undefined tensor", "a tensor of token ids", "undefined");
  const DType dt = tokens_in.dtype();
  if (dt != DType::i64 && dt != DType::i32 && dt != DType::u8)
    throw DTypeError("write_token_shard: tokens must be integers", "an i64, i32 or u8 tensor", tokens_in.str());
  Tensor t = tokens_in.detach();
  if (!t.device().is_cpu()) t = t.to(Device::cpu());
  t = t.contiguous().astype(DType::i64);
  const int64_t n = t.numel();
  if (n > int64_t(INT32_MAX))
    throw ValueError("write_token_shard: too many tokens for one shard", "at most 2^31 - 1 tokens (int32 count)",
                     std::to_string(n) + " tokens", "split the tokens over several shards");
  std::vector<uint16_t> raw(static_cast<size_t>(n));
  const int64_t* p = t.data<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    if (p[i] < 0 || p[i] > 65535)
      throw ValueError("write_token_shard: token " + std::to_string(i) + " does not fit in uint16",
                       "ids in [0, 65535] (version-1 shards store uint16)", std::to_string(p[i]),
                       "use a vocabulary of at most 65536 tokens");
    uint16_t v = uint16_t(p[i]);
    if constexpr (std::endian::native == std::endian::big) v = uint16_t((v >> 8) | (v << 8));
    raw[size_t(i)] = v;
  }
  unsigned char header[kTokenShardHeaderBytes] = {};
  put_le32(header, kTokenShardMagic);
  put_le32(header + 4, kTokenShardVersion);
  put_le32(header + 8, int32_t(n));

  const fs::path final_path(path);
  const fs::path tmp = detail::temp_path(final_path);
  {
    File file;
    file.f = std::fopen(tmp.c_str(), "wb");
    if (!file.f) throw IOError("cannot create '" + tmp.string() + "'", "a writable path", std::strerror(errno));
    bool ok = std::fwrite(header, 1, sizeof header, file.f) == sizeof header;
    ok = ok && (raw.empty() || std::fwrite(raw.data(), 2, raw.size(), file.f) == raw.size());
    ok = (std::fclose(file.f) == 0) && ok;
    file.f = nullptr;
    if (!ok) {
      const std::string why = std::strerror(errno);
      std::error_code ec;
      fs::remove(tmp, ec);
      throw IOError("cannot write token shard '" + tmp.string() + "'", std::to_string(kTokenShardHeaderBytes + 2 * n) +
                    " bytes written", why);
    }
  }
  detail::rename_into_place(tmp, final_path);
}

// ---------------------------------------------------------------- TokenDataset

TokenDataset::TokenDataset(Tensor tokens, int64_t seq_len, int64_t size)
    : tokens_(std::move(tokens)), seq_len_(seq_len), size_(size) {
  if (!tokens_.defined()) throw ValueError("TokenDataset: undefined tokens tensor", "i64 [N]", "undefined");
  if (tokens_.dtype() != DType::i64)
    throw DTypeError("TokenDataset: tokens must be i64", "i64 [N] (as read_token_shard returns)", tokens_.str(),
                     "convert with tokens.astype(DType::i64)");
  if (tokens_.dim() != 1) throw ShapeError("TokenDataset: tokens must be 1-D", "i64 [N]", tokens_.str());
  if (seq_len_ < 1) throw ValueError("TokenDataset: sequence length must be positive", "seq_len >= 1", std::to_string(seq_len_));
  if (size_ < 1) throw ValueError("TokenDataset: size must be positive", "size >= 1", std::to_string(size_));
  const int64_t N = tokens_.numel();
  if (N < seq_len_ + 2)
    throw ValueError("TokenDataset: too few tokens for one window of seq_len + 1",
                     "at least seq_len + 2 = " + std::to_string(seq_len_ + 2) + " tokens",
                     std::to_string(N) + " tokens", "use a shorter seq_len or a larger token file");
  if (!tokens_.device().is_cpu()) tokens_ = tokens_.to(Device::cpu());
  if (!tokens_.is_contiguous()) tokens_ = tokens_.contiguous();
  n_ = N - seq_len_ - 1;
}

int64_t TokenDataset::window_start(int64_t k) const {
  // (k*T) mod n without overflowing k*T: (k mod n) * (T mod n) mod n, in 128 bits.
  const unsigned __int128 a = uint64_t(k % n_), b = uint64_t(seq_len_ % n_);
  return int64_t((a * b) % uint64_t(n_));
}

int64_t TokenDataset::period() const { return n_ / std::gcd(n_, seq_len_); }

Batch TokenDataset::get(const std::vector<int64_t>& indices) const {
  const int64_t m = int64_t(indices.size()), T = seq_len_;
  for (int64_t k : indices)
    if (k < 0 || k >= size_)
      throw ValueError("TokenDataset index out of range", "0 <= index < " + std::to_string(size_), std::to_string(k));
  Tensor x = empty(Shape{m, T}, DType::i64), y = empty(Shape{m, T}, DType::i64);
  const int64_t* src = tokens_.data<int64_t>();
  int64_t* xp = x.data<int64_t>();
  int64_t* yp = y.data<int64_t>();
  for (int64_t j = 0; j < m; ++j) {
    const int64_t s = window_start(indices[size_t(j)]);
    std::memcpy(xp + j * T, src + s, size_t(T) * sizeof(int64_t));
    std::memcpy(yp + j * T, src + s + 1, size_t(T) * sizeof(int64_t));
  }
  Batch b;
  b.items.emplace("x", x);
  b.items.emplace("y", y);
  return b;
}

std::unique_ptr<DataLoader> token_loader(const Tensor& tokens, const TokenLoaderOptions& opts) {
  if (opts.batch_size < 1)
    throw ValueError("token_loader: batch size must be positive", "batch_size >= 1", std::to_string(opts.batch_size));
  // Probe the period with a one-example dataset (validates tokens and seq_len), then size the real one so
  // the loader's epochs (size / B batches, never a partial one) tile the endless stream exactly.
  const int64_t P = TokenDataset(tokens, opts.seq_len, 1).period();
  const int64_t g = std::gcd(P, opts.batch_size);
  const int64_t size = (P / g) * opts.batch_size;  // lcm(P, B): at most P * B
  auto data = std::make_shared<TokenDataset>(tokens, opts.seq_len, size);
  LoaderOptions lo;
  lo.batch_size = opts.batch_size;
  lo.shuffle = false;
  lo.rank = opts.rank;
  lo.world = opts.world;
  lo.prefetch = opts.prefetch;
  return std::make_unique<DataLoader>(std::move(data), lo);
}

std::shared_ptr<TokenDataset> token_eval_dataset(const Tensor& tokens, int64_t seq_len, int64_t batch_size,
                                                 int64_t batches) {
  if (batch_size < 1)
    throw ValueError("token_eval_dataset: batch size must be positive", "batch_size >= 1", std::to_string(batch_size));
  if (batches < 1)
    throw ValueError("token_eval_dataset: number of batches must be positive", "batches >= 1", std::to_string(batches));
  return std::make_shared<TokenDataset>(tokens, seq_len, batches * batch_size);
}

}  // namespace titanax
