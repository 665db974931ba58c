#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <vector>

#include <nlohmann/json.hpp>

namespace titanax {

static_assert(std::endian::native == std::endian::little, "safetensors I/O assumes a little-endian host");

namespace {

using json = nlohmann::ordered_json;

constexpr uint64_t kMaxHeader = 100ull << 20;  // as the reference implementation

struct DTypeName {
  DType dtype;
  const char* name;
};
constexpr DTypeName kDTypes[] = {{DType::f32, "F32"}, {DType::f64, "F64"}, {DType::f16, "F16"},
                                 {DType::bf16, "BF16"}, {DType::i32, "I32"}, {DType::i64, "I64"},
                                 {DType::u8, "U8"},     {DType::bool_, "BOOL"}};

std::vector<std::string> dtype_names() {
  std::vector<std::string> v;
  for (auto& d : kDTypes) v.push_back(d.name);
  return v;
}

// Writes through a file descriptor, keeping a running CRC-32 and honouring the crash-test hook.
class Sink {
 public:
  Sink(const std::string& path, int64_t kill_after) : path_(path), kill_after_(kill_after) {
    fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd_ < 0) throw IOError("cannot create '" + path + "'", "a writable path", std::strerror(errno));
    crc_ = uint32_t(::crc32(0L, Z_NULL, 0));
  }
  ~Sink() {
    if (fd_ >= 0) ::close(fd_);
  }
  void write(const void* data, size_t n) {
    write(data, n, uint32_t(::crc32_z(::crc32(0L, Z_NULL, 0), static_cast<const Bytef*>(data), n)));
  }
  // Writes n bytes whose own CRC-32 the caller computed (it is folded into the file's).
  void write(const void* data, size_t n, uint32_t piece_crc) {
    const char* p = static_cast<const char*>(data);
    crc_ = uint32_t(::crc32_combine(crc_, piece_crc, z_off_t(n)));
    if (kill_after_ >= 0 && written_ + int64_t(n) >= kill_after_) {
      // Test hook: let exactly kill_after_ bytes reach the file, then die as a crash would.
      raw_write(p, size_t(kill_after_ - written_));
      ::fsync(fd_);
      std::raise(SIGKILL);
    }
    raw_write(p, n);
    written_ += int64_t(n);
  }
  void finish(bool do_fsync) {
    if (do_fsync && ::fsync(fd_) != 0)
      throw IOError("cannot flush '" + path_ + "' to disk", "fsync to succeed", std::strerror(errno));
    int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) throw IOError("cannot close '" + path_ + "'", "close to succeed", std::strerror(errno));
  }
  uint32_t crc() const { return crc_; }

 private:
  void raw_write(const char* p, size_t n) {
    while (n > 0) {
      ssize_t w = ::write(fd_, p, n);
      if (w < 0) {
        if (errno == EINTR) continue;
        throw IOError("cannot write '" + path_ + "'", "all bytes written", std::strerror(errno));
      }
      p += w;
      n -= size_t(w);
    }
  }
  std::string path_;
  int fd_ = -1;
  int64_t kill_after_;
  int64_t written_ = 0;
  uint32_t crc_ = 0;
};

[[noreturn]] void bad(const std::string& path, const std::string& check, const std::string& expected,
                      const std::string& found) {
  throw CheckpointError("safetensors file '" + path + "': " + check, expected, found);
}

struct FileCloser {
  FILE* f = nullptr;
  ~FileCloser() {
    if (f) std::fclose(f);
  }
};

}  // namespace

std::string safetensors_dtype_name(DType t) {
  for (auto& d : kDTypes)
    if (d.dtype == t) return d.name;
  throw DTypeError("no safetensors name for a dtype", join(dtype_names()), std::string(dtype_name(t)));
}

namespace detail {

uint32_t write_safetensors(const std::string& path, const ParamTree& tensors,
                           const std::map<std::string, std::string>& metadata, bool do_fsync,
                           int64_t kill_after_bytes) {
  return write_safetensors_chunked(path, tensors, metadata, do_fsync, kill_after_bytes, UINT64_MAX).file_crc;
}

WriteReport write_safetensors_chunked(const std::string& path, const ParamTree& tensors,
                                      const std::map<std::string, std::string>& metadata, bool do_fsync,
                                      int64_t kill_after_bytes, uint64_t chunk_bytes) {
  if (chunk_bytes == 0) throw ValueError("write_safetensors_chunked: chunk_bytes must be at least 1", ">= 1", "0");
  WriteReport report;
  json header = json::object();
  if (!metadata.empty()) {
    json m = json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    header["__metadata__"] = m;
  }
  std::vector<Tensor> host;
  host.reserve(tensors.size());
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    if (name == "__metadata__")
      throw ValueError("a tensor may not be named \"__metadata__\" in a safetensors file", "another name", name);
    if (!t.defined()) throw ValueError("write_safetensors: tensor '" + name + "' is undefined");
    Tensor h = t.detach();
    if (!h.device().is_cpu()) h = h.to(Device::cpu());
    h = h.contiguous();
    json e = json::object();
    e["dtype"] = safetensors_dtype_name(h.dtype());
    e["shape"] = h.shape().vec();
    e["data_offsets"] = {offset, offset + uint64_t(h.nbytes())};
    header[name] = e;
    report.tensors.push_back({name, offset, offset + uint64_t(h.nbytes()), {}});
    offset += h.nbytes();
    host.push_back(h);
  }
  std::string text = header.dump();
  while ((8 + text.size()) % 8 != 0) text.push_back(' ');  // the data section starts 8-byte aligned
  unsigned char len[8];
  uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) len[i] = (unsigned char)(n >> (8 * i));

  Sink sink(path, kill_after_bytes);
  sink.write(len, 8);
  sink.write(text.data(), text.size());
  report.header_bytes = 8 + n;
  report.header_crc = sink.crc();
  for (size_t i = 0; i < host.size(); ++i) {
    const auto* p = static_cast<const unsigned char*>(host[i].raw_data());
    const uint64_t nb = host[i].nbytes();
    for (uint64_t at = 0; at < nb; at += std::min(chunk_bytes, nb - at)) {
      const size_t len = size_t(std::min(chunk_bytes, nb - at));
      const uint32_t c = uint32_t(::crc32_z(::crc32(0L, Z_NULL, 0), p + at, len));
      report.tensors[i].chunk_crcs.push_back(c);
      sink.write(p + at, len, c);
    }
  }
  sink.finish(do_fsync);
  report.file_crc = sink.crc();
  report.file_bytes = report.header_bytes + offset;
  return report;
}

uint32_t crc32_file(const std::string& path) {
  FileCloser f{std::fopen(path.c_str(), "rb")};
  if (!f.f) throw IOError("cannot open '" + path + "'", "a readable file", std::strerror(errno));
  uLong crc = ::crc32(0L, Z_NULL, 0);
  std::vector<unsigned char> buf(1 << 20);
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), f.f)) > 0) crc = ::crc32_z(crc, buf.data(), n);
  if (std::ferror(f.f)) throw IOError("cannot read '" + path + "'", "a readable file", std::strerror(errno));
  return uint32_t(crc);
}

}  // namespace detail

uint32_t write_safetensors(const std::string& path, const ParamTree& tensors,
                           const std::map<std::string, std::string>& metadata) {
  return detail::write_safetensors(path, tensors, metadata, false, -1);
}

SafetensorsFile read_safetensors(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0)
    throw IOError("cannot open safetensors file '" + path + "'", "an existing file", std::strerror(errno));
  if (!S_ISREG(st.st_mode)) throw IOError("safetensors path '" + path + "' is not a regular file");
  const uint64_t file_size = uint64_t(st.st_size);
  FileCloser f{std::fopen(path.c_str(), "rb")};
  if (!f.f) throw IOError("cannot open safetensors file '" + path + "'", "a readable file", std::strerror(errno));

  if (file_size < 8) bad(path, "file too short for the header length", "at least 8 bytes", std::to_string(file_size) + " bytes");
  unsigned char len[8];
  if (std::fread(len, 1, 8, f.f) != 8) bad(path, "cannot read the header length", "8 bytes", "a read error");
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t(len[i]) << (8 * i);
  if (n > file_size - 8)
    bad(path, "header length beyond the file size", "at most " + std::to_string(file_size - 8) + " bytes",
        std::to_string(n) + " bytes");
  if (n > kMaxHeader) bad(path, "header length over 100 MB", "at most " + std::to_string(kMaxHeader), std::to_string(n));
  std::string text(size_t(n), '\0');
  if (n && std::fread(text.data(), 1, size_t(n), f.f) != n) bad(path, "cannot read the header", std::to_string(n) + " bytes", "a read error");

  json header;
  try {
    header = json::parse(text);
  } catch (const std::exception& e) {
    bad(path, "header is not valid JSON", "a JSON object", e.what());
  }
  if (!header.is_object()) bad(path, "header is not a JSON object", "an object", header.type_name());

  SafetensorsFile out;
  struct Entry {
    std::string name;
    DType dtype;
    Shape shape;
    uint64_t begin, end;
  };
  std::vector<Entry> entries;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) bad(path, "\"__metadata__\" is not an object", "a map of strings", v.type_name());
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string())
          bad(path, "\"__metadata__\" value of '" + m.key() + "' is not a string", "a string", m.value().dump());
        out.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = "tensor '" + name + "'";
    if (!v.is_object()) bad(path, where + " is not an object", "{dtype, shape, data_offsets}", v.dump());
    if (!v.contains("dtype") || !v["dtype"].is_string()) bad(path, where + " has no dtype string", "\"dtype\": \"F32\" etc.", v.dump());
    const std::string dt = v["dtype"].get<std::string>();
    Entry e{name, DType::f32, {}, 0, 0};
    bool known = false;
    for (auto& d : kDTypes)
      if (dt == d.name) e.dtype = d.dtype, known = true;
    if (!known) bad(path, where + " has an unsupported dtype", "one of " + join(dtype_names()), "'" + dt + "'");
    if (!v.contains("shape") || !v["shape"].is_array()) bad(path, where + " has no shape array", "\"shape\": [...]", v.dump());
    const json& sh = v["shape"];
    if (sh.size() > size_t(kMaxRank)) bad(path, where + " has too many dimensions", "at most " + std::to_string(kMaxRank), sh.dump());
    unsigned __int128 numel = 1;
    for (const auto& d : sh) {
      if (!d.is_number_unsigned()) bad(path, where + " has a bad dimension", "non-negative integers", sh.dump());
      uint64_t dv = d.get<uint64_t>();
      if (dv > uint64_t(INT64_MAX)) bad(path, where + " has a dimension too large", "< 2^63", sh.dump());
      numel *= dv;
      if (numel > (unsigned __int128)file_size) numel = (unsigned __int128)file_size + 1;  // cannot fit anyway
      e.shape.push_back(int64_t(dv));
    }
    if (!v.contains("data_offsets") || !v["data_offsets"].is_array() || v["data_offsets"].size() != 2 ||
        !v["data_offsets"][0].is_number_unsigned() || !v["data_offsets"][1].is_number_unsigned())
      bad(path, where + " has no valid data_offsets", "\"data_offsets\": [begin, end]", v.dump());
    e.begin = v["data_offsets"][0].get<uint64_t>();
    e.end = v["data_offsets"][1].get<uint64_t>();
    if (e.end < e.begin) bad(path, where + " has data_offsets with end < begin", "begin <= end", v["data_offsets"].dump());
    const unsigned __int128 want = numel * itemsize(e.dtype);
    if ((unsigned __int128)(e.end - e.begin) != want)
      bad(path, where + ": byte range size differs from numel * itemsize",
          std::to_string(uint64_t(std::min<unsigned __int128>(want, UINT64_MAX))) + " bytes for " + dt + e.shape.str(),
          std::to_string(e.end - e.begin) + " bytes [" + std::to_string(e.begin) + ", " + std::to_string(e.end) + ")");
    entries.push_back(std::move(e));
  }

  const uint64_t data_size = file_size - 8 - n;
  std::stable_sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t pos = 0;
  std::string prev = "the start of the data";
  for (const auto& e : entries) {
    const std::string range = "[" + std::to_string(e.begin) + ", " + std::to_string(e.end) + ")";
    if (e.begin < pos)
      bad(path, "data_offsets of tensor '" + e.name + "' overlap " + prev, "begin >= " + std::to_string(pos), range);
    if (e.begin > pos)
      bad(path, "data_offsets leave a gap before tensor '" + e.name + "'", "begin == " + std::to_string(pos), range);
    if (e.end > data_size)
      bad(path, "data_offsets of tensor '" + e.name + "' run past the end of the file (truncated?)",
          "end <= " + std::to_string(data_size) + " (data section size)", range);
    pos = e.end;
    prev = "tensor '" + e.name + "'";
  }
  if (pos != data_size)
    bad(path, "data section is longer than its tensors", std::to_string(pos) + " bytes", std::to_string(data_size) + " bytes");

  for (const auto& e : entries) {
    Tensor t = empty(e.shape, e.dtype);
    const size_t nb = size_t(e.end - e.begin);
    if (nb && std::fread(t.raw_data(), 1, nb, f.f) != nb)
      bad(path, "cannot read the data of tensor '" + e.name + "'", std::to_string(nb) + " bytes", "a short read");
    if (e.dtype == DType::bool_) {
      const unsigned char* p = static_cast<const unsigned char*>(t.raw_data());
      for (size_t i = 0; i < nb; ++i)
        if (p[i] > 1) bad(path, "BOOL tensor '" + e.name + "' holds a byte other than 0 / 1", "0 or 1", std::to_string(int(p[i])));
    }
    out.tensors.insert(e.name, t);
  }
  return out;
}

}  // namespace titanax
