#include "io/idx.h"

#include <zlib.h>

#include <bit>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <vector>

namespace titanax {
namespace {

namespace fs = std::filesystem;

struct GzFile {
  gzFile f = nullptr;
  ~GzFile() {
    if (f) gzclose(f);
  }
};

std::string hex_byte(unsigned v) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "0x%02X", v & 0xffu);
  return buf;
}

std::string gz_error(gzFile f) {
  int code = 0;
  const char* msg = gzerror(f, &code);
  if (code == Z_ERRNO) return std::strerror(errno);
  return msg ? msg : "unknown zlib error";
}

// Reads exactly n bytes unless the stream ends; returns the number read. A decompression error
// (corrupt gzip stream) is a DataError.
size_t read_some(gzFile f, void* dst, size_t n, const std::string& path, const std::string& what) {
  size_t got = 0;
  char* p = static_cast<char*>(dst);
  while (got < n) {
    unsigned chunk = unsigned(std::min<size_t>(n - got, size_t(1) << 30));
    int r = gzread(f, p + got, chunk);
    if (r < 0)
      throw DataError("IDX file '" + path + "': cannot read " + what, "a readable plain or gzip stream",
                      gz_error(f));
    if (r == 0) break;
    got += size_t(r);
  }
  return got;
}

void byteswap_elements(void* data, size_t count, size_t width) {
  auto* p = static_cast<unsigned char*>(data);
  for (size_t i = 0; i < count; ++i, p += width)
    for (size_t a = 0, b = width - 1; a < b; ++a, --b) std::swap(p[a], p[b]);
}

}  // namespace

Tensor read_idx(const std::string& path_in) {
  std::string path = path_in;
  std::error_code ec;
  if (!fs::exists(path, ec) && fs::exists(path + ".gz", ec)) path += ".gz";
  if (!fs::exists(path, ec))
    throw IOError("IDX file not found", "'" + path_in + "' (or '" + path_in + ".gz')", "no such file");
  if (fs::is_directory(path, ec)) throw IOError("IDX path is a directory", "a file", "'" + path + "'");
  const uintmax_t file_size = fs::file_size(path, ec);
  if (ec) throw IOError("cannot stat IDX file '" + path + "'", "a readable file", ec.message());

  GzFile g;
  g.f = gzopen(path.c_str(), "rb");
  if (!g.f) throw IOError("cannot open IDX file '" + path + "'", "a readable file", std::strerror(errno));

  unsigned char magic[4];
  size_t got = read_some(g.f, magic, 4, path, "the magic number");
  if (got < 4)
    throw DataError("IDX file '" + path + "' is truncated in its header (offset 0, magic number)",
                    "4 header bytes", std::to_string(got) + " bytes");
  if (magic[0] != 0 || magic[1] != 0)
    throw DataError("IDX file '" + path + "' has a bad magic number (offset 0, bytes 0-1)", "0x00 0x00",
                    hex_byte(magic[0]) + " " + hex_byte(magic[1]), "is this an IDX file (e.g. MNIST ubyte)?");
  DType dtype;
  size_t width;
  switch (magic[2]) {
    case 0x08: dtype = DType::u8, width = 1; break;
    case 0x0C: dtype = DType::i32, width = 4; break;
    case 0x0D: dtype = DType::f32, width = 4; break;
    case 0x0E: dtype = DType::f64, width = 8; break;
    default:
      throw DataError("IDX file '" + path + "' has an unsupported data type (offset 2)",
                      "0x08 (u8), 0x0C (i32), 0x0D (f32) or 0x0E (f64)", hex_byte(magic[2]));
  }
  const int ndim = magic[3];
  if (ndim < 1 || ndim > 4)
    throw DataError("IDX file '" + path + "' has an unsupported number of dimensions (offset 3)", "1 to 4",
                    std::to_string(ndim));

  unsigned char dims_be[16];
  got = read_some(g.f, dims_be, size_t(4 * ndim), path, "the dimension sizes");
  if (got < size_t(4 * ndim))
    throw DataError("IDX file '" + path + "' is truncated in its dimension sizes (offset 4)",
                    std::to_string(4 * ndim) + " bytes for " + std::to_string(ndim) + " sizes",
                    std::to_string(got) + " bytes");
  Shape shape;
  unsigned __int128 bytes = width;  // (2^32)^4 * 8 fits in 128 bits
  for (int i = 0; i < ndim; ++i) {
    const unsigned char* b = dims_be + 4 * i;
    uint64_t d = (uint64_t(b[0]) << 24) | (uint64_t(b[1]) << 16) | (uint64_t(b[2]) << 8) | b[3];
    shape.push_back(int64_t(d));
    bytes *= d;
  }
  const size_t header = size_t(4 + 4 * ndim);
  // Reject sizes the file cannot possibly hold before allocating: deflate expands at most ~1032x, and
  // a plain file is checked exactly by the read below.
  const bool overflow = bytes > (unsigned __int128)file_size * 1032u + 1024u;
  const uint64_t want = overflow ? 0 : uint64_t(bytes);
  const uint64_t numel = want / width;
  if (overflow)
    throw DataError("IDX file '" + path + "' is truncated: the sizes " + shape.str() +
                        " need more data than the file can hold (offset " + std::to_string(header) + ")",
                    "data for " + shape.str() + " elements of " + std::to_string(width) + " bytes",
                    std::to_string(file_size) + " bytes on disk");

  Tensor t = empty(shape, dtype);
  got = read_some(g.f, t.raw_data(), size_t(want), path, "the data");
  if (got < want)
    throw DataError("IDX file '" + path + "' is truncated (data at offset " + std::to_string(header) + ")",
                    std::to_string(want) + " data bytes for " + shape.str(), std::to_string(got) + " bytes");
  if (width > 1 && std::endian::native == std::endian::little) byteswap_elements(t.raw_data(), size_t(numel), width);
  return t;
}

void write_idx(const std::string& path, const Tensor& t_in) {
  unsigned char code;
  switch (t_in.dtype()) {
    case DType::u8: code = 0x08; break;
    case DType::i32: code = 0x0C; break;
    case DType::f32: code = 0x0D; break;
    case DType::f64: code = 0x0E; break;
    default:
      throw DTypeError("write_idx: unsupported dtype", "u8, i32, f32 or f64", t_in.str());
  }
  if (t_in.dim() < 1 || t_in.dim() > 4) throw ShapeError("write_idx: unsupported rank", "rank 1 to 4", t_in.str());
  for (auto d : t_in.shape())
    if (uint64_t(d) > 0xffffffffull) throw ShapeError("write_idx: dimension too large for IDX", "< 2^32", t_in.str());

  Tensor t = t_in.detach();
  if (!t.device().is_cpu()) t = t.to(Device::cpu());
  t = t.contiguous();

  std::vector<unsigned char> header{0, 0, code, (unsigned char)t.dim()};
  for (auto d : t.shape()) {
    uint32_t v = uint32_t(d);
    header.insert(header.end(), {(unsigned char)(v >> 24), (unsigned char)(v >> 16), (unsigned char)(v >> 8),
                                 (unsigned char)v});
  }
  std::vector<unsigned char> body(t.nbytes());
  if (!body.empty()) std::memcpy(body.data(), t.raw_data(), body.size());
  const size_t width = itemsize(t.dtype());
  if (width > 1 && std::endian::native == std::endian::little) byteswap_elements(body.data(), size_t(t.numel()), width);

  const bool gz = path.size() >= 3 && path.compare(path.size() - 3, 3, ".gz") == 0;
  gzFile f = gzopen(path.c_str(), gz ? "wb" : "wbT");
  if (!f) throw IOError("cannot create IDX file '" + path + "'", "a writable path", std::strerror(errno));
  auto write_all = [&](const unsigned char* p, size_t n) {
    while (n > 0) {
      unsigned chunk = unsigned(std::min<size_t>(n, size_t(1) << 30));
      int w = gzwrite(f, p, chunk);
      if (w <= 0) {
        std::string err = gz_error(f);
        gzclose(f);
        throw IOError("cannot write IDX file '" + path + "'", "all bytes written", err);
      }
      p += w;
      n -= size_t(w);
    }
  };
  write_all(header.data(), header.size());
  write_all(body.data(), body.size());
  if (gzclose(f) != Z_OK) throw IOError("cannot finish IDX file '" + path + "'", "a successful close", std::strerror(errno));
}

}  // namespace titanax
