#include "io/checkpoint.h"

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <regex>
#include <set>
#include <sstream>
#include <tuple>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "io/safetensors.h"

namespace titanax {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

constexpr int kFormatVersion = 3;  // 3 added flat parts; 2 is read too
constexpr const char* kFormatName = "titanax-checkpoint";
constexpr uint64_t kMaxReadBuffer = 64ull << 20;  // bytes read per pread when loading

std::string step_name(int64_t step) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "step_%08lld", (long long)step);
  return buf;
}

std::string shard_name(int rank) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "rank_%05d.safetensors", rank);
  return buf;
}

std::string hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "%08x", v);
  return buf;
}

std::string hex_chunks(const std::vector<uint32_t>& v) {
  std::string s;
  s.reserve(v.size() * 8);
  for (uint32_t x : v) s += hex32(x);
  return s;
}

// 8 hex digits at s[pos..pos+8) -> value; false when malformed.
bool parse_hex32(const std::string& s, size_t pos, uint32_t& out) {
  if (pos + 8 > s.size()) return false;
  uint32_t v = 0;
  for (size_t i = pos; i < pos + 8; ++i) {
    char c = s[i];
    int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
    if (d < 0) return false;
    v = (v << 4) | uint32_t(d);
  }
  out = v;
  return true;
}

uint32_t crc_of(const void* p, size_t n) {
  return uint32_t(::crc32_z(::crc32(0L, Z_NULL, 0), static_cast<const Bytef*>(p), n));
}

std::string shape_str(const std::vector<int64_t>& v) { return Shape(v).str(); }

std::string spec_str(const PartitionSpec& spec) {
  std::vector<std::string> parts;
  for (const auto& s : spec) parts.push_back(s.empty() ? "-" : s);
  return "[" + join(parts) + "]";
}

std::string names_str(const std::vector<std::string>& names) {
  constexpr size_t kShow = 12;
  std::vector<std::string> v(names.begin(), names.begin() + long(std::min(names.size(), kShow)));
  std::string s = "[" + join(v);
  if (names.size() > kShow) s += ", ... (" + std::to_string(names.size()) + " in all)";
  return s + "]";
}

// fsync a file or a directory so that a rename / creation survives a power loss.
void fsync_path(const fs::path& p, bool directory) {
  int fd = ::open(p.c_str(), (directory ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) throw IOError("cannot open '" + p.string() + "' to flush it", "an existing path", std::strerror(errno));
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (rc != 0) throw IOError("cannot flush '" + p.string() + "' to disk", "fsync to succeed", std::strerror(err));
}

void write_file_synced(const fs::path& p, const std::string& text) {
  int fd = ::open(p.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw IOError("cannot create '" + p.string() + "'", "a writable path", std::strerror(errno));
  const char* d = text.data();
  size_t n = text.size();
  while (n > 0) {
    ssize_t w = ::write(fd, d, n);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) {
      int err = errno;
      ::close(fd);
      throw IOError("cannot write '" + p.string() + "'", "all bytes written", std::strerror(err));
    }
    d += w;
    n -= size_t(w);
  }
  if (::fsync(fd) != 0) {
    int err = errno;
    ::close(fd);
    throw IOError("cannot flush '" + p.string() + "' to disk", "fsync to succeed", std::strerror(err));
  }
  ::close(fd);
}

json parse_arg(const std::string& text, const std::string& what) {
  try {
    return json::parse(text.empty() ? std::string("{}") : text);
  } catch (const std::exception& e) {
    throw ValueError("Checkpointer::save: " + what + " is not valid JSON", "a JSON document", e.what());
  }
}

// The mesh axes in order with their sizes.
struct Layout {
  std::vector<std::string> axes;
  std::vector<int64_t> shape;
  int index(const std::string& axis) const {
    for (size_t i = 0; i < axes.size(); ++i)
      if (axes[i] == axis) return int(i);
    return -1;
  }
  int64_t size() const {
    int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
  std::string describe() const {
    std::vector<std::string> parts;
    for (size_t i = 0; i < axes.size(); ++i) parts.push_back(axes[i] + ": " + std::to_string(shape[i]));
    return "{" + join(parts) + "}";
  }
};

// From the caller's mesh JSON: {"data": 2, "model": 2} (keys in axis order) or {"axes": [...], "shape": [...]}.
Layout layout_of(const json& mesh) {
  Layout out;
  if (!mesh.is_object()) return out;
  if (mesh.contains("axes") && mesh.contains("shape") && mesh["axes"].is_array() && mesh["shape"].is_array() &&
      mesh["axes"].size() == mesh["shape"].size()) {
    for (size_t i = 0; i < mesh["axes"].size(); ++i)
      if (mesh["axes"][i].is_string() && mesh["shape"][i].is_number_integer()) {
        out.axes.push_back(mesh["axes"][i].get<std::string>());
        out.shape.push_back(mesh["shape"][i].get<int64_t>());
      }
    return out;
  }
  for (auto it = mesh.begin(); it != mesh.end(); ++it)
    if (it.value().is_number_integer()) {
      out.axes.push_back(it.key());
      out.shape.push_back(it.value().get<int64_t>());
    }
  return out;
}

std::vector<int> row_major_coords(const std::vector<int64_t>& shape, int64_t rank) {
  std::vector<int> c(shape.size());
  for (size_t i = shape.size(); i-- > 0;) {
    c[i] = int(rank % shape[i]);
    rank /= shape[i];
  }
  return c;
}

// ValueError unless the run [f.begin, f.begin + numel) lies within f.block's elements.
void check_flat_part(const std::string& name, const FlatPart& f, int64_t numel, const std::string& where) {
  if (f.begin < 0 || f.begin + numel > f.block.numel())
    throw ValueError(where + ": the flat part of '" + name + "' lies outside its block",
                     "elements within [0, " + std::to_string(f.block.numel()) + ") of block " + f.block.str(),
                     "[" + std::to_string(f.begin) + ", " + std::to_string(f.begin + numel) + ")",
                     "begin is the part's first element in the block's row-major order, block the tensor's (local) shape");
}

int64_t test_kill_after_bytes() {
  const char* v = std::getenv("TITANAX_TEST_KILL_DURING_SAVE");
  if (!v || !*v) return -1;
  char* end = nullptr;
  long long n = std::strtoll(v, &end, 10);
  return (end && *end == '\0' && n >= 0) ? int64_t(n) : -1;
}

std::optional<json> read_metadata(const fs::path& file) {
  std::ifstream in(file);
  if (!in) return std::nullopt;
  try {
    json j = json::parse(in);
    if (j.is_object() && j.contains("format_version")) return j;
  } catch (const std::exception&) {
  }
  return std::nullopt;
}

// ---------------------------------------------------------------------------------------- metadata model

struct SavedShard {
  std::string file;
  int rank = 0;
  std::vector<int> coords;
  uint64_t bytes = 0, header_bytes = 0, chunk_bytes = 1;
  uint32_t header_crc = 0, file_crc = 0;
};

struct SavedPiece {
  int shard = 0;
  std::vector<int64_t> offsets, shape;  // the block
  int64_t f0 = 0, f1 = 0;               // the run of the block's flattened elements held (the whole block unless flat)
  bool flat = false;
  uint64_t begin = 0, end = 0;  // relative to the data section
  std::string chunk_crcs;       // 8 hex digits per chunk
};

struct SavedTensor {
  DType dtype = DType::f32;
  std::vector<int64_t> global;
  PartitionSpec spec;
  std::vector<SavedPiece> pieces;  // in shard order
};

struct Parsed {
  fs::path dir, meta_path;
  json meta;
  int64_t world = 0;
  Layout layout;
  std::vector<std::string> names;  // metadata order
  std::map<std::string, SavedTensor> tensors;
  std::vector<SavedShard> shards;
};

// Reads and validates metadata.json of `cdir` (every field a load relies on), or throws CheckpointError.
// With same_world > 0, a checkpoint saved by another number of ranks is refused first.
Parsed parse_checkpoint(const fs::path& cdir, int64_t step, int same_world = 0) {
  Parsed P;
  P.dir = cdir;
  P.meta_path = cdir / "metadata.json";
  const std::string mp = P.meta_path.string();
  std::ifstream in(P.meta_path);
  if (!in) throw CheckpointError("checkpoint file '" + mp + "' is missing", "metadata.json", "no such file");
  try {
    P.meta = json::parse(in);
  } catch (const std::exception& e) {
    throw CheckpointError("checkpoint file '" + mp + "' is not valid JSON", "a JSON object", e.what());
  }
  const json& meta = P.meta;
  auto bad = [&](const std::string& what, const std::string& expected, const std::string& found) -> void {
    throw CheckpointError("checkpoint file '" + mp + "' is malformed: " + what, expected, found,
                          "the file was edited or is not a Titanax checkpoint; load another step");
  };
  auto field = [&](const char* key, bool (json::*is)() const noexcept, const char* kind) -> const json& {
    if (!meta.is_object() || !meta.contains(key) || !(meta[key].*is)())
      throw CheckpointError("checkpoint file '" + mp + "' lacks a valid \"" + key + "\"", kind,
                            meta.is_object() && meta.contains(key) ? meta[key].dump() : "missing");
    return meta[key];
  };
  const int64_t version = field("format_version", &json::is_number_integer, "an integer").get<int64_t>();
  if (version == 1)
    throw CheckpointError("checkpoint '" + mp + "' is in format version 1, which this Titanax no longer reads",
                          "format_version " + std::to_string(kFormatVersion), "1",
                          "load it with the Titanax version that wrote it and save it again, or start afresh");
  if (version != kFormatVersion && version != 2)
    throw CheckpointError("checkpoint '" + mp + "' has an unknown format version",
                          "format_version " + std::to_string(kFormatVersion), std::to_string(version),
                          "load it with the Titanax version that wrote it");
  if (field("step", &json::is_number_integer, "an integer").get<int64_t>() != step)
    throw CheckpointError("checkpoint '" + mp + "' holds another step", std::to_string(step), meta["step"].dump());
  P.world = field("world_size", &json::is_number_integer, "an integer").get<int64_t>();
  if (P.world < 1 || P.world > (1 << 24)) bad("world_size out of range", "1 or more", std::to_string(P.world));
  if (same_world > 0 && P.world != same_world)
    throw CheckpointError("checkpoint '" + cdir.string() + "' was saved by another number of ranks",
                          std::to_string(same_world) + " ranks (this run)", std::to_string(P.world) + " ranks",
                          "resume with the world size it was saved with, or reshard with "
                          "load(step, into, specs, mesh)");

  auto int_vec = [&](const json& j, const std::string& what, int64_t min) {
    if (!j.is_array()) bad(what + " is not an array", "an array of integers", j.dump());
    std::vector<int64_t> v;
    for (const auto& x : j) {
      if (!x.is_number_integer() || x.get<int64_t>() < min)
        bad(what + " holds a bad entry", "integers >= " + std::to_string(min), j.dump());
      v.push_back(x.get<int64_t>());
    }
    return v;
  };
  auto uint_of = [&](const json& obj, const char* key, const std::string& what) -> uint64_t {
    if (!obj.contains(key) || !obj[key].is_number_unsigned())
      bad(what + " lacks a valid \"" + key + "\"", "a non-negative integer", obj.contains(key) ? obj[key].dump() : "missing");
    return obj[key].get<uint64_t>();
  };
  auto crc_of_field = [&](const json& obj, const char* key, const std::string& what) -> uint32_t {
    uint32_t v = 0;
    if (!obj.contains(key) || !obj[key].is_string() || obj[key].get<std::string>().size() != 8 ||
        !parse_hex32(obj[key].get<std::string>(), 0, v))
      bad(what + " lacks a valid \"" + key + "\"", "8 hex digits", obj.contains(key) ? obj[key].dump() : "missing");
    return v;
  };

  const json& lay = field("layout", &json::is_object, "an object {axes, shape}");
  if (!lay.contains("axes") || !lay["axes"].is_array() || !lay.contains("shape"))
    bad("\"layout\" lacks axes / shape", "{\"axes\": [...], \"shape\": [...]}", lay.dump());
  for (const auto& a : lay["axes"]) {
    if (!a.is_string() || a.get<std::string>().empty()) bad("\"layout\" axes are not names", "strings", lay.dump());
    P.layout.axes.push_back(a.get<std::string>());
  }
  P.layout.shape = int_vec(lay["shape"], "\"layout\" shape", 1);
  if (P.layout.shape.size() != P.layout.axes.size()) bad("\"layout\" axes and shape differ in length", "equal lengths", lay.dump());

  const json& tens = field("tensors", &json::is_object, "an object of tensors");
  for (auto it = tens.begin(); it != tens.end(); ++it) {
    const std::string what = "tensor '" + it.key() + "'";
    const json& t = it.value();
    if (!t.is_object() || !t.contains("dtype") || !t["dtype"].is_string() || !t.contains("global_shape") ||
        !t.contains("spec") || !t["spec"].is_array())
      bad(what + " lacks dtype / global_shape / spec", "{dtype, global_shape, spec}", t.dump());
    SavedTensor st;
    try {
      st.dtype = dtype_from_name(t["dtype"].get<std::string>());
    } catch (const Error&) {
      bad(what + " has an unknown dtype", "f32, bf16, ...", t["dtype"].dump());
    }
    st.global = int_vec(t["global_shape"], what + " global_shape", 0);
    for (const auto& s : t["spec"]) {
      if (!s.is_string()) bad(what + " has a bad spec", "axis names or \"\"", t["spec"].dump());
      const std::string a = s.get<std::string>();
      if (!a.empty() && P.layout.index(a) < 0) bad(what + " is split over an axis not in the layout", P.layout.describe(), a);
      st.spec.push_back(a);
    }
    if (st.spec.size() > st.global.size()) bad(what + " has a spec longer than its rank", shape_str(st.global), t["spec"].dump());
    for (size_t d = 0; d < st.spec.size(); ++d)
      if (!st.spec[d].empty() && st.global[d] % P.layout.shape[size_t(P.layout.index(st.spec[d]))] != 0)
        bad(what + " has a split dim its axis size does not divide", "a multiple", shape_str(st.global));
    P.names.push_back(it.key());
    P.tensors.emplace(it.key(), std::move(st));
  }

  const json& shards = field("shards", &json::is_array, "an array of shards");
  if (shards.size() != size_t(P.world))
    throw CheckpointError("checkpoint file '" + mp + "' lists the wrong shards", std::to_string(P.world) + " shard entries",
                          std::to_string(shards.size()));
  for (size_t i = 0; i < shards.size(); ++i) {
    const json& s = shards[i];
    const std::string what = "shard entry " + std::to_string(i);
    if (!s.is_object() || !s.contains("file") || !s["file"].is_string() || !s.contains("tensors") || !s["tensors"].is_object())
      bad(what + " lacks file / tensors", "{file, rank, coords, bytes, crc32, ...}", s.dump().substr(0, 200));
    SavedShard sh;
    sh.file = s["file"].get<std::string>();
    sh.rank = int(i);
    if (sh.file != shard_name(int(i))) bad(what + " names an unexpected shard file", shard_name(int(i)), sh.file);
    if (!s.contains("coords")) bad(what + " lacks coords", "one coordinate per layout axis", "missing");
    for (int64_t c : int_vec(s["coords"], what + " coords", 0)) sh.coords.push_back(int(c));
    if (sh.coords.size() != P.layout.axes.size()) bad(what + " coords do not match the layout", P.layout.describe(), s["coords"].dump());
    for (size_t a = 0; a < sh.coords.size(); ++a)
      if (sh.coords[a] >= P.layout.shape[a]) bad(what + " coords lie outside the layout", P.layout.describe(), s["coords"].dump());
    sh.bytes = uint_of(s, "bytes", what);
    sh.header_bytes = uint_of(s, "header_bytes", what);
    sh.chunk_bytes = uint_of(s, "chunk_bytes", what);
    if (sh.chunk_bytes == 0) bad(what + " has chunk_bytes 0", ">= 1", "0");
    if (sh.header_bytes < 8 || sh.header_bytes > sh.bytes) bad(what + " has a bad header_bytes", "8 .. bytes", std::to_string(sh.header_bytes));
    sh.header_crc = crc_of_field(s, "header_crc32", what);
    sh.file_crc = crc_of_field(s, "crc32", what);
    const uint64_t data_size = sh.bytes - sh.header_bytes;
    const json& st = s["tensors"];
    for (auto it = st.begin(); it != st.end(); ++it) {
      const std::string tw = what + " tensor '" + it.key() + "'";
      auto g = P.tensors.find(it.key());
      if (g == P.tensors.end()) bad(tw + " is not in \"tensors\"", "one of the saved tensors", it.key());
      const json& e = it.value();
      if (!e.is_object() || !e.contains("dtype") || !e.contains("shape") || !e.contains("offsets") ||
          !e.contains("data_offsets") || !e["data_offsets"].is_array() || e["data_offsets"].size() != 2 ||
          !e.contains("chunk_crc32") || !e["chunk_crc32"].is_string())
        bad(tw + " lacks dtype / shape / offsets / data_offsets / chunk_crc32", "all of them", e.dump().substr(0, 200));
      if (!e["dtype"].is_string() || e["dtype"].get<std::string>() != dtype_name(g->second.dtype)) bad(tw + " has another dtype than the tensor", std::string(dtype_name(g->second.dtype)), e["dtype"].dump());
      SavedPiece p;
      p.shard = int(i);
      p.shape = int_vec(e["shape"], tw + " shape", 0);
      p.offsets = int_vec(e["offsets"], tw + " offsets", 0);
      const auto& G = g->second.global;
      if (p.shape.size() != G.size() || p.offsets.size() != G.size())
        bad(tw + " has another rank than the tensor", shape_str(G), shape_str(p.shape));
      unsigned __int128 numel = 1;
      for (size_t d = 0; d < G.size(); ++d) {
        if (p.offsets[d] + p.shape[d] > G[d])
          bad(tw + " lies outside the global tensor", shape_str(G), "offsets " + shape_str(p.offsets) + " shape " + shape_str(p.shape));
        numel *= uint64_t(p.shape[d]);
      }
      p.f1 = int64_t(numel);
      if (e.contains("flat")) {
        const std::vector<int64_t> f = int_vec(e["flat"], tw + " flat", 0);
        if (version < 3 || f.size() != 2 || f[0] > f[1] || (unsigned __int128)f[1] > numel)
          bad(tw + " has a bad flat run", "[begin, end] within the block's " + std::to_string(uint64_t(numel)) +
              " elements (format_version 3)", e["flat"].dump());
        p.flat = true, p.f0 = f[0], p.f1 = f[1];
        numel = uint64_t(p.f1 - p.f0);
      }
      if (!e["data_offsets"][0].is_number_unsigned() || !e["data_offsets"][1].is_number_unsigned())
        bad(tw + " has bad data_offsets", "[begin, end]", e["data_offsets"].dump());
      p.begin = e["data_offsets"][0].get<uint64_t>();
      p.end = e["data_offsets"][1].get<uint64_t>();
      if (p.end < p.begin || p.end > data_size || (unsigned __int128)(p.end - p.begin) != numel * itemsize(g->second.dtype))
        bad(tw + " has data_offsets that do not fit its shape or the file", "numel * itemsize bytes within " +
            std::to_string(data_size), e["data_offsets"].dump());
      p.chunk_crcs = e["chunk_crc32"].get<std::string>();
      const uint64_t nb = p.end - p.begin;
      const uint64_t chunks = nb / sh.chunk_bytes + (nb % sh.chunk_bytes ? 1 : 0);
      if (p.chunk_crcs.size() != chunks * 8)
        bad(tw + " has the wrong number of chunk checksums", std::to_string(chunks * 8) + " hex digits",
            std::to_string(p.chunk_crcs.size()));
      g->second.pieces.push_back(std::move(p));
    }
    P.shards.push_back(std::move(sh));
  }
  return P;
}

// A contiguous byte run: `len` bytes at `src` (relative to a saved piece's data) go to `dst` (relative
// to the destination buffer).
struct Run {
  uint64_t src, len, dst;
};

// The runs copying the box [ilo, ihi) (global indices) from a saved piece (box at plo, extent pshape)
// into the destination (box at nlo, extent nshape), both row-major.
void make_runs(const std::vector<int64_t>& plo, const std::vector<int64_t>& pshape, const std::vector<int64_t>& nlo,
               const std::vector<int64_t>& nshape, const std::vector<int64_t>& ilo, const std::vector<int64_t>& ihi,
               uint64_t isz, std::vector<Run>& out) {
  const int n = int(plo.size());
  std::vector<int64_t> E(static_cast<size_t>(n)), ps(E.size()), ns(E.size());
  for (int d = 0; d < n; ++d) E[size_t(d)] = ihi[size_t(d)] - ilo[size_t(d)];
  int64_t sp = 1, sn = 1;
  for (int d = n - 1; d >= 0; --d) {
    ps[size_t(d)] = sp, ns[size_t(d)] = sn;
    sp *= pshape[size_t(d)], sn *= nshape[size_t(d)];
  }
  // Dims after j are whole in the piece, the destination and the intersection: one run covers them.
  int j = n - 1;
  while (j >= 0 && E[size_t(j)] == pshape[size_t(j)] && E[size_t(j)] == nshape[size_t(j)]) --j;
  int64_t run = 1;
  for (int d = std::max(j, 0); d < n; ++d) run *= E[size_t(d)];
  std::vector<int64_t> idx(ilo.begin(), ilo.end());
  while (true) {
    int64_t s = 0, t = 0;
    for (int d = 0; d < n; ++d) {
      s += (idx[size_t(d)] - plo[size_t(d)]) * ps[size_t(d)];
      t += (idx[size_t(d)] - nlo[size_t(d)]) * ns[size_t(d)];
    }
    out.push_back({uint64_t(s) * isz, uint64_t(run) * isz, uint64_t(t) * isz});
    int d = j - 1;  // odometer over the dims before j
    for (; d >= 0; --d) {
      if (++idx[size_t(d)] < ihi[size_t(d)]) break;
      idx[size_t(d)] = ilo[size_t(d)];
    }
    if (d < 0) break;
  }
}

struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

// pread exactly n bytes at off; false on a short read (end of file).
bool pread_full(int fd, void* buf, uint64_t n, uint64_t off, const std::string& path) {
  auto* p = static_cast<char*>(buf);
  while (n > 0) {
    ssize_t r = ::pread(fd, p, size_t(std::min<uint64_t>(n, 1ull << 30)), off_t(off));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) throw IOError("cannot read checkpoint shard '" + path + "'", "a readable file", std::strerror(errno));
    if (r == 0) return false;
    p += r, n -= uint64_t(r), off += uint64_t(r);
  }
  return true;
}

// Runs fn on this rank and all-gathers every rank's outcome over comm (nullptr: one rank), so that the
// ranks fail together instead of some waiting forever in a later collective. Returns each rank's payload
// when every fn returned; otherwise runs cleanup (when given), then this rank rethrows its own exception
// and the others throw a CheckpointError "<what> failed on another rank (<phase>)" listing the failures.
std::vector<std::string> exchange_outcomes(Communicator* comm, const std::string& what, const std::string& phase,
                                           const std::function<std::string()>& fn,
                                           const std::function<void()>& cleanup = nullptr) {
  std::exception_ptr err;
  std::string out;
  try {
    out = "R" + fn();
  } catch (const std::exception& e) {
    err = std::current_exception();
    out = std::string("E") + (*e.what() ? e.what() : "error");
  } catch (...) {
    err = std::current_exception();
    out = "Eunknown error";
  }
  auto all = comm ? comm->all_gather_string(out) : std::vector<std::string>{out};
  std::vector<std::string> failed;
  for (size_t r = 0; r < all.size(); ++r) {
    if (all[r].empty() || all[r][0] != 'R') failed.push_back("rank " + std::to_string(r) + ": " + all[r].substr(all[r].empty() ? 0 : 1));
    else all[r].erase(0, 1);
  }
  if (failed.empty()) return all;
  if (cleanup) cleanup();
  if (err) std::rethrow_exception(err);
  throw CheckpointError(what + " failed on another rank (" + phase + ")", "every rank to succeed", join(failed, "; "));
}

// exchange_outcomes for a phase of saving checkpoint `step` in `dir`: a failure on one rank removes the
// step's .tmp directory (rank 0) and makes every rank throw.
std::vector<std::string> exchange_save_outcomes(Communicator* comm, const std::string& dir, int64_t step,
                                                const std::string& phase, const std::function<std::string()>& fn) {
  return exchange_outcomes(comm, "saving checkpoint step " + std::to_string(step), phase, fn, [&] {
    if (comm && comm->rank() != 0) return;
    std::error_code ec;
    fs::remove_all(fs::path(dir) / (step_name(step) + ".tmp"), ec);
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------- MeshCoords

MeshCoords MeshCoords::of(const Mesh& mesh) { return MeshCoords{mesh.axes(), mesh.shape(), mesh.coords(), mesh.rank()}; }

MeshCoords MeshCoords::at(std::vector<std::string> axes, std::vector<int> shape, int rank) {
  if (axes.size() != shape.size())
    throw ValueError("MeshCoords::at: axes and shape differ in length", std::to_string(axes.size()),
                     std::to_string(shape.size()));
  int64_t n = 1;
  for (int s : shape) {
    if (s < 1) throw ValueError("MeshCoords::at: axis sizes must be >= 1", ">= 1", std::to_string(s));
    n *= s;
  }
  if (rank < 0 || rank >= n)
    throw ValueError("MeshCoords::at: rank outside the mesh", "0 <= rank < " + std::to_string(n), std::to_string(rank));
  std::vector<int64_t> sh(shape.begin(), shape.end());
  MeshCoords m{std::move(axes), std::move(shape), row_major_coords(sh, rank), rank};
  return m;
}

std::string MeshCoords::describe() const {
  std::vector<std::string> a, c;
  for (size_t i = 0; i < axes.size(); ++i) {
    a.push_back(axes[i] + ": " + std::to_string(i < shape.size() ? shape[i] : 0));
    c.push_back(axes[i] + ": " + std::to_string(i < coords.size() ? coords[i] : 0));
  }
  return "{" + join(a) + "} at {" + join(c) + "} (rank " + std::to_string(rank) + ")";
}

// ---------------------------------------------------------------------------------------- Checkpointer

Checkpointer::Checkpointer(std::string dir, int keep_last, std::shared_ptr<Communicator> comm)
    : dir_(std::move(dir)), keep_last_(keep_last), comm_(std::move(comm)) {
  if (dir_.empty()) throw ValueError("Checkpointer needs a directory", "a path", "\"\"");
  if (keep_last_ < 1)
    throw ValueError("Checkpointer keep_last must be at least 1", "keep_last >= 1", std::to_string(keep_last_));
}

// A save between its plan and its commit: what phases 3 and 4 need.
struct Checkpointer::PendingSave {
  int64_t step = 0;
  json meta;           // metadata.json but its "shards" and "extra"
  json extra;
  ParamTree staged;    // save_async's host copies (freed on the caller's thread, after the write)
  std::future<std::string> report;  // this rank's shard report (JSON), or the write's exception
};

Checkpointer::Checkpointer(Checkpointer&&) noexcept = default;
Checkpointer& Checkpointer::operator=(Checkpointer&&) noexcept = default;

Checkpointer::~Checkpointer() {
  if (!pending_) return;
  if (pending_->report.valid()) pending_->report.wait();
  spdlog::warn("checkpoint step {} in '{}' was written but never committed (Checkpointer::wait() was not called); "
               "its .tmp directory is removed by the next save",
               pending_->step, dir_);
}

void Checkpointer::prepare() const {
  const int rank = comm_ ? comm_->rank() : 0;
  exchange_outcomes(comm_.get(), "preparing checkpoint directory '" + dir_ + "'", "create", [&] {
    if (rank != 0) return std::string();
    const fs::path root(dir_);
    std::error_code ec;
    fs::create_directories(root, ec);
    if (ec)
      throw IOError("cannot create checkpoint directory '" + dir_ + "'", "a directory this process can create",
                    ec.message(), "choose another checkpoint directory (checkpoint.dir)");
    const fs::path probe = root / (".write_probe_" + std::to_string(::getpid()));
    {
      std::ofstream f(probe, std::ios::binary);
      if (!(f << "titanax") || !f.flush())
        throw IOError("cannot write in checkpoint directory '" + dir_ + "'", "a writable directory",
                      "creating " + probe.filename().string() + " failed", "check its permissions and free space");
    }
    fs::remove(probe, ec);
    return std::string();
  });
}

void Checkpointer::set_crc_chunk_bytes(uint64_t n) {
  if (n == 0) throw ValueError("Checkpointer CRC chunk size must be at least 1 byte", ">= 1", "0");
  chunk_bytes_ = n;
}

void Checkpointer::save(int64_t step, const ParamTree& tensors, const std::string& extra_json,
                        const std::map<std::string, PartitionSpec>& specs, const std::string& mesh_json,
                        const std::string& plan_json, const FlatParts& flat) {
  save_impl(step, tensors, extra_json, specs, mesh_json, plan_json, nullptr, flat, false);
}

void Checkpointer::save_async(int64_t step, const ParamTree& tensors, const std::string& extra_json,
                              const std::map<std::string, PartitionSpec>& specs, const std::string& mesh_json,
                              const std::string& plan_json, const FlatParts& flat) {
  save_impl(step, tensors, extra_json, specs, mesh_json, plan_json, nullptr, flat, true);
}

namespace {
// {"axes": [...], "shape": [...]} of a mesh: keeps the axis order whatever the names.
std::string mesh_layout_json(const Mesh& mesh, int world, const char* fn) {
  if (mesh.size() != world)  // same on every rank: all throw, none waits
    throw ValueError(std::string("Checkpointer::") + fn + ": the mesh does not match the saving group",
                     std::to_string(world) + " ranks", "a mesh of " + std::to_string(mesh.size()),
                     "give the Checkpointer the communicator the mesh was built over (mesh.world())");
  json axes = json::array(), shape = json::array();
  for (size_t i = 0; i < mesh.axes().size(); ++i) axes.push_back(mesh.axes()[i]), shape.push_back(mesh.shape()[i]);
  return json{{"axes", axes}, {"shape", shape}}.dump();
}
}  // namespace

void Checkpointer::save(int64_t step, const ParamTree& tensors, const std::map<std::string, PartitionSpec>& specs,
                        const Mesh& mesh, const std::string& extra_json, const std::string& plan_json,
                        const FlatParts& flat) {
  const std::string mj = mesh_layout_json(mesh, comm_ ? comm_->size() : 1, "save");
  save_impl(step, tensors, extra_json, specs, mj, plan_json, &mesh.coords(), flat, false);
}

void Checkpointer::save_async(int64_t step, const ParamTree& tensors, const std::map<std::string, PartitionSpec>& specs,
                              const Mesh& mesh, const std::string& extra_json, const std::string& plan_json,
                              const FlatParts& flat) {
  const std::string mj = mesh_layout_json(mesh, comm_ ? comm_->size() : 1, "save_async");
  save_impl(step, tensors, extra_json, specs, mj, plan_json, &mesh.coords(), flat, true);
}

void Checkpointer::save_impl(int64_t step, const ParamTree& tensors, const std::string& extra_json,
                             const std::map<std::string, PartitionSpec>& specs, const std::string& mesh_json,
                             const std::string& plan_json, const std::vector<int>* coords, const FlatParts& flat,
                             bool async) {
  wait();  // one save at a time: an earlier asynchronous one commits first
  const int rank = comm_ ? comm_->rank() : 0;
  const int world = comm_ ? comm_->size() : 1;
  const fs::path root(dir_);
  const fs::path tmp_dir = root / (step_name(step) + ".tmp");

  auto exchange = [&](const std::string& phase, const std::function<std::string()>& fn) {
    return exchange_save_outcomes(comm_.get(), dir_, step, phase, fn);
  };
  auto run_phase = [&](const std::string& phase, auto&& fn) {
    exchange(phase, [&] {
      fn();
      return std::string();
    });
  };

  // ---- 1. validate; rank 0 prepares step_XXXXXXXX.tmp/
  json extra, mesh, plan;
  Layout layout;
  std::vector<int> my_coords;
  run_phase("prepare", [&] {
    if (step < 0) throw ValueError("checkpoint step must be >= 0", "step >= 0", std::to_string(step));
    extra = parse_arg(extra_json, "extra_json");
    mesh = parse_arg(mesh_json, "mesh_json");
    plan = parse_arg(plan_json, "plan_json");
    for (const auto& [name, t] : tensors)
      if (!t.defined()) throw ValueError("Checkpointer::save: tensor '" + name + "' is undefined");
    for (const auto& [name, f] : flat) {
      if (!tensors.contains(name))
        throw ValueError("Checkpointer::save: a flat part names a tensor that is not saved", "one of the saved tensors",
                         "'" + name + "'", did_you_mean(name, tensors.paths()));
      check_flat_part(name, f, tensors.at(name).numel(), "Checkpointer::save");
    }
    layout = layout_of(mesh);
    for (size_t i = 0; i < layout.axes.size(); ++i)
      if (layout.shape[i] < 1)
        throw ValueError("mesh_json gives axis '" + layout.axes[i] + "' a size below 1", ">= 1", std::to_string(layout.shape[i]));
    if (coords) {
      if (coords->size() != layout.axes.size())
        throw ValueError("Checkpointer::save: mesh coordinates do not match its axes", std::to_string(layout.axes.size()),
                         std::to_string(coords->size()));
      my_coords = *coords;
    } else if (!layout.axes.empty()) {
      if (rank >= layout.size())
        throw ValueError("mesh_json covers fewer ranks than save the checkpoint", "a mesh covering rank " + std::to_string(rank),
                         layout.describe(), "pass the mesh the ranks run on (Mesh::to_json())");
      my_coords = row_major_coords(layout.shape, rank);
    }
    for (const auto& [name, spec] : specs) {
      std::set<std::string> seen;
      for (const auto& a : spec) {
        if (a.empty()) continue;
        if (layout.index(a) < 0)
          throw ValueError("the PartitionSpec of '" + name + "' names an axis that is not in the mesh",
                           "one of the mesh axes " + layout.describe(), "'" + a + "'", did_you_mean(a, layout.axes));
        if (!seen.insert(a).second)
          throw ValueError("the PartitionSpec of '" + name + "' splits two dims over axis '" + a + "'",
                           "each axis at most once", spec_str(spec));
      }
    }
    if (rank == 0) {
      std::error_code ec;
      fs::create_directories(root, ec);
      if (ec) throw IOError("cannot create checkpoint directory '" + dir_ + "'", "a writable path", ec.message());
      fs::remove_all(tmp_dir, ec);
      if (!fs::create_directory(tmp_dir, ec) || ec)
        throw IOError("cannot create '" + tmp_dir.string() + "'", "a writable directory", ec.message());
    }
  });

  // ---- 2. every rank learns what every rank holds and the same writer for each block is chosen
  using Range = std::pair<int64_t, int64_t>;  // [begin, end) of a block's flattened elements
  struct TensorPlan {
    DType dtype;
    std::vector<int64_t> local, global;  // local: the block's shape (a flat part's FlatPart::block)
    PartitionSpec spec;
    // block (coords on the spec's axes) -> run of it -> the ranks holding that run (ascending), and the one
    // that writes it
    std::map<std::vector<int>, std::map<Range, std::vector<int>>> holders;
    std::map<std::vector<int>, std::map<Range, int>> writer;
    std::vector<int> key(const std::vector<int>& c, const Layout& l) const {
      std::vector<int> k;
      for (const auto& a : spec)
        if (!a.empty()) k.push_back(c[size_t(l.index(a))]);
      return k;
    }
  };
  std::map<std::string, TensorPlan> plans;
  std::vector<std::string> order;
  auto block_of = [&](const std::string& name, const Tensor& t) {  // this rank's block shape and run of it
    auto f = flat.find(name);
    if (f == flat.end()) return std::pair{t.shape().vec(), Range{0, t.numel()}};
    return std::pair{f->second.block.vec(), Range{f->second.begin, f->second.begin + t.numel()}};
  };
  {
    auto listings = exchange("list tensors", [&] {
      json l = {{"coords", my_coords}, {"tensors", json::array()}};
      // With its spec: under pipeline parallelism no rank holds every tensor, so rank 0 (which writes
      // the metadata) learns the splits of the other stages' tensors only from their holders.
      for (const auto& [name, t] : tensors) {
        auto sp = specs.find(name);
        const auto [block, run] = block_of(name, t);
        l["tensors"].push_back({name, std::string(dtype_name(t.dtype())), block, sp == specs.end() ? PartitionSpec{} : sp->second,
                                run.first, run.second});
      }
      return l.dump();
    });
    run_phase("plan", [&] {
      for (size_t r = 0; r < listings.size(); ++r) {
        json l = json::parse(listings[r]);
        const auto rc = l["coords"].get<std::vector<int>>();
        for (const auto& e : l["tensors"]) {
          const std::string name = e[0].get<std::string>();
          const DType dt = dtype_from_name(e[1].get<std::string>());
          const auto shape = e[2].get<std::vector<int64_t>>();
          const auto spec = e[3].get<PartitionSpec>();
          const Range run{e[4].get<int64_t>(), e[5].get<int64_t>()};
          auto [it, fresh] = plans.try_emplace(name);
          TensorPlan& p = it->second;
          if (fresh) {
            order.push_back(name);
            p.dtype = dt;
            p.local = shape;
            p.spec = spec;
            if (p.spec.size() > shape.size())
              throw ValueError("PartitionSpec of '" + name + "' has more entries than the tensor has dimensions",
                               "at most " + std::to_string(shape.size()) + " entries", std::to_string(p.spec.size()));
          } else if (p.dtype != dt || p.local != shape) {
            throw ValueError("ranks hold tensor '" + name + "' with different dtypes or shapes",
                             std::string(dtype_name(p.dtype)) + shape_str(p.local) + " (the first rank holding it)",
                             std::string(dtype_name(dt)) + shape_str(shape) + " on rank " + std::to_string(r),
                             "a split tensor must have the same local shape on every rank (equal blocks)");
          } else if (p.spec != spec) {
            throw ValueError("ranks hold tensor '" + name + "' with different PartitionSpecs",
                             spec_str(p.spec) + " (the first rank holding it)", spec_str(spec) + " on rank " + std::to_string(r),
                             "pass the same specs on every rank");
          }
          p.holders[p.key(rc, layout)][run].push_back(int(r));
        }
      }
      for (const auto& [name, spec] : specs)
        if (!plans.count(name))
          throw ValueError("a PartitionSpec names a tensor that no rank saves", "one of the saved tensors",
                           "'" + name + "'", did_you_mean(name, order));
      for (auto& [name, p] : plans) {
        p.global = p.local;
        int64_t blocks = 1;
        for (size_t d = 0; d < p.spec.size(); ++d)
          if (!p.spec[d].empty()) {
            const int64_t k = layout.shape[size_t(layout.index(p.spec[d]))];
            p.global[d] *= k;
            blocks *= k;
          }
        const bool covers = !layout.axes.empty() && layout.size() == world;
        if (covers && int64_t(p.holders.size()) != blocks)
          throw ValueError("tensor '" + name + "' split by " + spec_str(p.spec) + " is missing blocks",
                           "all " + std::to_string(blocks) + " blocks held by some rank",
                           std::to_string(p.holders.size()) + " blocks", "every rank of the mesh must pass its block");
        // The runs of each block (flat parts): disjoint, and together the whole block when the mesh covers the group.
        int64_t numel = 1;
        for (int64_t x : p.local) numel *= x;
        for (const auto& [block, runs] : p.holders) {
          int64_t end = 0;
          for (const auto& [run, ranks] : runs) {
            if (run.first == run.second) continue;
            const std::string at = "[" + std::to_string(run.first) + ", " + std::to_string(run.second) + ")";
            if (run.first < end)
              throw ValueError("ranks hold overlapping flat parts of tensor '" + name + "'",
                               "disjoint runs of its block's elements", at + " (rank " + std::to_string(ranks[0]) +
                               ") starts before " + std::to_string(end), "give each rank its own part (ZeroShards::range)");
            if (covers && run.first > end)
              throw ValueError("the flat parts of tensor '" + name + "' leave elements unsaved",
                               "runs covering all " + std::to_string(numel) + " elements of each block",
                               "no rank holds [" + std::to_string(end) + ", " + std::to_string(run.first) + ")",
                               "every rank of the mesh must pass its part");
            end = run.second;
          }
          if (covers && end != numel)
            throw ValueError("the flat parts of tensor '" + name + "' leave elements unsaved",
                             "runs covering all " + std::to_string(numel) + " elements of each block",
                             "no rank holds [" + std::to_string(end) + ", " + std::to_string(numel) + ")",
                             "every rank of the mesh must pass its part");
        }
      }
      // Who writes each distinct run: one of the ranks holding it, so that replicas share the writing
      // (Megatron-LM's fully parallel save). Largest first, each to the holder with the fewest bytes so far
      // (LPT scheduling; ties to the lowest rank): every rank derives the same choice from the same listings.
      struct Item {
        uint64_t bytes;
        TensorPlan* plan;
        const std::vector<int>* block;
        Range run;
        const std::vector<int>* ranks;
      };
      std::vector<Item> items;
      for (auto& [name, p] : plans)
        for (const auto& [block, runs] : p.holders)
          for (const auto& [run, ranks] : runs)
            items.push_back({uint64_t(run.second - run.first) * itemsize(p.dtype), &p, &block, run, &ranks});
      std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.bytes > b.bytes; });
      std::vector<uint64_t> assigned(size_t(world), 0);
      for (const Item& it : items) {
        int w = it.ranks->front();
        for (int r : *it.ranks)
          if (assigned[size_t(r)] < assigned[size_t(w)]) w = r;
        assigned[size_t(w)] += it.bytes;
        it.plan->writer[*it.block][it.run] = w;
      }
    });
  }

  // ---- 3. every rank writes (and fsyncs) the blocks it is the writer of; reports checksums and slices
  auto pending = std::make_unique<PendingSave>();
  pending->step = step;
  json& meta = pending->meta;
  {
    json global = json::object();
    for (const auto& name : order) {
      const TensorPlan& p = plans.at(name);
      global[name] = {{"dtype", std::string(dtype_name(p.dtype))}, {"global_shape", p.global}, {"spec", p.spec}};
    }
    meta["format"] = kFormatName;
    meta["format_version"] = kFormatVersion;
    meta["step"] = step;
    meta["world_size"] = world;
    meta["mesh"] = mesh;
    meta["plan"] = plan;
    meta["layout"] = {{"axes", layout.axes}, {"shape", layout.shape}};
    meta["tensors"] = global;
    pending->extra = extra;
  }
  // What this rank writes (flat parts as 1-d tensors; an empty one is not written), and the slice of its
  // global tensor each holds.
  ParamTree mine;
  json slices = json::object();
  for (const auto& [name, t] : tensors) {
    const TensorPlan& p = plans.at(name);
    const Range run = block_of(name, t).second;
    if (flat.count(name) && run.first == run.second) continue;
    if (!layout.axes.empty() && p.writer.at(p.key(my_coords, layout)).at(run) != rank) continue;
    mine.insert(name, flat.count(name) ? t.contiguous().reshape(Shape{t.numel()}) : t);
    std::vector<int64_t> offsets(p.local.size(), 0);
    for (size_t d = 0; d < p.spec.size(); ++d)
      if (!p.spec[d].empty()) offsets[d] = int64_t(my_coords[size_t(layout.index(p.spec[d]))]) * p.local[d];
    json& e = slices[name] = {{"dtype", std::string(dtype_name(t.dtype()))}, {"shape", p.local}, {"offsets", offsets}};
    if (flat.count(name)) e["flat"] = {run.first, run.second};
  }
  auto write = [tmp_dir, rank, step, slices = std::move(slices), chunk = chunk_bytes_, my_coords](const ParamTree& blocks) {
    detail::WriteReport rep = detail::write_safetensors_chunked(
        (tmp_dir / shard_name(rank)).string(), blocks,
        {{"titanax_step", std::to_string(step)}, {"rank", std::to_string(rank)}}, /*fsync=*/true,
        test_kill_after_bytes(), chunk);
    json tens = json::object();
    for (const auto& e : rep.tensors) {
      tens[e.name] = slices.at(e.name);
      tens[e.name]["data_offsets"] = {e.begin, e.end};
      tens[e.name]["chunk_crc32"] = hex_chunks(e.chunk_crcs);
    }
    json r = {{"file", shard_name(rank)},     {"rank", rank},
              {"coords", my_coords},          {"bytes", rep.file_bytes},
              {"crc32", hex32(rep.file_crc)}, {"header_bytes", rep.header_bytes},
              {"header_crc32", hex32(rep.header_crc)}, {"chunk_bytes", chunk},
              {"tensors", tens}};
    return r.dump();
  };
  if (async) {
    // Copied to host memory (the caller may update its tensors once this returns), then written by a
    // background thread. A phase of its own: a copy failing on one rank must fail every rank's save.
    run_phase("copy to host", [&] {
      for (const auto& [name, t] : mine) {
        Tensor h = t.detach();
        pending->staged.insert(name, h.device().is_cpu() ? h.clone() : h.to(Device::cpu()).contiguous());
      }
      pending->report = std::async(std::launch::async, [write = std::move(write), &staged = pending->staged] {
        // The lowest priority (nice 19, this thread only): the write takes what the training threads leave.
        // Measured on 2 cores (bench/gpt_step --zero, GPT-2 124M, 2 ranks): a step taken during the write
        // was 2.6 - 3.5 s slower than a plain one at nice 0, 1.1 - 2.3 s at 19; the commit comes 1 - 3 s later.
        setpriority(PRIO_PROCESS, id_t(syscall(SYS_gettid)), 19);
        return write(staged);
      });
    });
  } else {
    // Written on this thread when finish_save() asks for the report.
    pending->report = std::async(std::launch::deferred, [write = std::move(write), &mine] { return write(mine); });
  }
  pending_ = std::move(pending);
  if (!async) finish_save();
}

bool Checkpointer::poll() {
  if (!pending_) return true;  // the same on every rank: nothing collective to do
  const bool done = pending_->report.wait_for(std::chrono::seconds(0)) == std::future_status::ready;
  const auto all = comm_ ? comm_->all_gather_string(done ? "1" : "0") : std::vector<std::string>{done ? "1" : "0"};
  for (const auto& d : all)
    if (d != "1") return false;
  finish_save();
  return true;
}

void Checkpointer::wait() {
  if (pending_) finish_save();
}

void Checkpointer::finish_save() {
  // Taken out first: whatever happens below, the save is no longer pending (on every rank alike).
  std::unique_ptr<PendingSave> p = std::move(pending_);
  const int rank = comm_ ? comm_->rank() : 0;
  const fs::path root(dir_);
  const fs::path final_dir = root / step_name(p->step);
  const fs::path tmp_dir = root / (step_name(p->step) + ".tmp");
  auto reports = exchange_save_outcomes(comm_.get(), dir_, p->step, "write shard", [&] { return p->report.get(); });

  // ---- 4. rank 0 writes metadata.json and commits with a rename
  exchange_save_outcomes(comm_.get(), dir_, p->step, "commit", [&] {
    if (rank != 0) return std::string();
    json shards = json::array();
    for (const auto& s : reports) shards.push_back(json::parse(s));
    json meta = p->meta;
    meta["shards"] = shards;
    meta["extra"] = p->extra;
    write_file_synced(tmp_dir / "metadata.json", meta.dump(2) + "\n");
    fsync_path(tmp_dir, true);

    std::error_code ec;
    fs::path replaced;
    if (fs::exists(final_dir, ec)) {  // the same step saved again: swap the new one in
      replaced = root / (step_name(p->step) + ".replaced.tmp");
      fs::remove_all(replaced, ec);
      fs::rename(final_dir, replaced, ec);
      if (ec) throw IOError("cannot move the old '" + final_dir.string() + "' aside", "a successful rename", ec.message());
    }
    fs::rename(tmp_dir, final_dir, ec);
    if (ec) throw IOError("cannot rename '" + tmp_dir.string() + "' to '" + final_dir.string() + "'",
                          "a successful rename", ec.message());
    fsync_path(root, true);
    if (!replaced.empty()) fs::remove_all(replaced, ec);

    // Prune: keep the keep_last newest complete checkpoints (never the one just written), and drop
    // leftovers of interrupted saves. Failures here do not fail the save.
    auto complete = steps();
    int64_t keep_from = complete.size() > size_t(keep_last_) ? complete[complete.size() - size_t(keep_last_)] : INT64_MIN;
    for (int64_t s : complete)
      if (s < keep_from && s != p->step) fs::remove_all(root / step_name(s), ec);
    static const std::regex tmp_re(R"(step_\d+(\.replaced)?\.tmp)");
    for (const auto& e : fs::directory_iterator(root, ec))
      if (e.is_directory(ec) && std::regex_match(e.path().filename().string(), tmp_re)) fs::remove_all(e.path(), ec);
    return std::string();
  });
}

std::vector<int64_t> Checkpointer::steps() const {
  std::vector<int64_t> out;
  std::error_code ec;
  if (!fs::is_directory(dir_, ec)) return out;
  static const std::regex re(R"(step_(\d{8,18}))");
  for (const auto& e : fs::directory_iterator(dir_, ec)) {
    std::smatch m;
    const std::string name = e.path().filename().string();
    if (!e.is_directory(ec) || !std::regex_match(name, m, re)) continue;
    if (!read_metadata(e.path() / "metadata.json")) continue;  // incomplete or foreign
    out.push_back(std::stoll(m[1].str()));
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::optional<int64_t> Checkpointer::latest() const {
  auto s = steps();
  if (s.empty()) return std::nullopt;
  return s.back();
}

namespace {

fs::path checkpoint_dir(const Checkpointer& ck, int64_t step) {
  const fs::path cdir = fs::path(ck.dir()) / step_name(step);
  std::error_code ec;
  if (!fs::is_directory(cdir, ec)) {
    std::vector<std::string> have;
    for (auto s : ck.steps()) have.push_back(std::to_string(s));
    throw CheckpointError("checkpoint directory '" + cdir.string() + "' not found",
                          have.empty() ? "a checkpoint in '" + ck.dir() + "'" : "one of the saved steps [" + join(have) + "]",
                          "no step " + std::to_string(step));
  }
  return cdir;
}

[[noreturn]] void shard_missing(const std::string& path, int err) {
  if (err == ENOENT) throw CheckpointError("checkpoint shard '" + path + "' is missing", "the file", "no such file");
  throw CheckpointError("checkpoint shard '" + path + "' cannot be opened", "a readable file", std::strerror(err));
}

// Opens a shard and checks its size against metadata.json.
void open_shard(Fd& f, const std::string& path, const SavedShard& sh) {
  f.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (f.fd < 0) shard_missing(path, errno);
  struct stat st {};
  if (::fstat(f.fd, &st) != 0 || !S_ISREG(st.st_mode))
    throw CheckpointError("checkpoint shard '" + path + "' is not a regular file", "a file", "something else");
  const uint64_t size = uint64_t(st.st_size);
  if (size < sh.bytes)
    throw CheckpointError("checkpoint shard '" + path + "' is truncated", std::to_string(sh.bytes) + " bytes (metadata.json)",
                          std::to_string(size) + " bytes", "the file was cut short after it was saved; load an older step");
  if (size > sh.bytes)
    throw CheckpointError("checkpoint shard '" + path + "' is larger than when it was saved",
                          std::to_string(sh.bytes) + " bytes (metadata.json)", std::to_string(size) + " bytes",
                          "the file changed after it was saved; load an older step");
}

}  // namespace

CheckpointInfo Checkpointer::load(int64_t step, ParamTree& into, const FlatParts& flat) const {
  return load_impl(step, into, nullptr, nullptr, false, flat);
}

CheckpointInfo Checkpointer::load(int64_t step, ParamTree& into, const std::map<std::string, PartitionSpec>& specs,
                                  const Mesh& mesh, bool subset, const FlatParts& flat) const {
  const MeshCoords where = MeshCoords::of(mesh);
  return load_impl(step, into, &specs, &where, subset, flat);
}

CheckpointInfo Checkpointer::load(int64_t step, ParamTree& into, const std::map<std::string, PartitionSpec>& specs,
                                  const MeshCoords& where, bool subset, const FlatParts& flat) const {
  return load_impl(step, into, &specs, &where, subset, flat);
}

CheckpointInfo Checkpointer::load_impl(int64_t step, ParamTree& into, const std::map<std::string, PartitionSpec>* new_specs,
                                       const MeshCoords* where, bool subset, const FlatParts& flat) const {
  const bool same_layout = new_specs == nullptr;
  const int my_rank = comm_ ? comm_->rank() : 0;
  const int world = comm_ ? comm_->size() : 1;
  const fs::path cdir = checkpoint_dir(*this, step);
  const Parsed P = parse_checkpoint(cdir, step, same_layout ? world : 0);
  const std::string mp = P.meta_path.string();

  // ---- the layout this rank loads into
  MeshCoords tgt;
  std::map<std::string, PartitionSpec> specs;
  for (const auto& [name, f] : flat) {
    if (!into.contains(name))
      throw ValueError("Checkpointer::load: a flat part names a tensor that is not being loaded",
                       "one of the tensors of `into`", "'" + name + "'", did_you_mean(name, into.paths()));
    check_flat_part(name, f, into.at(name).numel(), "Checkpointer::load");
  }
  if (same_layout) {
    const SavedShard& own = P.shards[size_t(my_rank)];
    tgt.axes = P.layout.axes;
    tgt.shape.assign(P.layout.shape.begin(), P.layout.shape.end());
    tgt.coords = own.coords;
    tgt.rank = my_rank;
    for (const auto& [name, st] : P.tensors) specs[name] = st.spec;
  } else {
    tgt = *where;
    if (tgt.shape.size() != tgt.axes.size() || tgt.coords.size() != tgt.axes.size())
      throw ValueError("Checkpointer::load: the mesh position is inconsistent", "axes, shape and coords of equal length",
                       tgt.describe());
    for (size_t i = 0; i < tgt.axes.size(); ++i)
      if (tgt.shape[i] < 1 || tgt.coords[i] < 0 || tgt.coords[i] >= tgt.shape[i])
        throw ValueError("Checkpointer::load: mesh coordinates outside the mesh", "0 <= coord < size", tgt.describe());
    specs = *new_specs;
    for (const auto& [name, spec] : specs) {
      if (!into.contains(name))
        throw ValueError("Checkpointer::load: a PartitionSpec names a tensor that is not being loaded",
                         "one of the tensors of `into`", "'" + name + "'", did_you_mean(name, into.paths()));
      std::set<std::string> seen;
      for (const auto& a : spec) {
        if (a.empty()) continue;
        if (std::find(tgt.axes.begin(), tgt.axes.end(), a) == tgt.axes.end())
          throw ValueError("the PartitionSpec of '" + name + "' names an axis that is not in the mesh",
                           "one of [" + join(tgt.axes) + "]", "'" + a + "'", did_you_mean(a, tgt.axes));
        if (!seen.insert(a).second)
          throw ValueError("the PartitionSpec of '" + name + "' splits two dims over axis '" + a + "'",
                           "each axis at most once", spec_str(spec));
      }
      const auto f = flat.find(name);  // a flat part's spec splits its block
      const size_t rank = f == flat.end() ? into.at(name).shape().size() : f->second.block.size();
      if (spec.size() > rank)
        throw ValueError("PartitionSpec of '" + name + "' has more entries than the tensor has dimensions",
                         "at most " + std::to_string(rank) + " entries", std::to_string(spec.size()));
    }
  }
  const std::string own_shard = (cdir / shard_name(my_rank)).string();
  const std::string where_file = same_layout ? "checkpoint shard '" + own_shard + "'" : "checkpoint '" + mp + "'";

  // ---- names
  for (const auto& [name, t] : into)
    if (!P.tensors.count(name))
      throw CheckpointError("tensor '" + name + "' is missing from " + where_file, "a tensor named '" + name + "'",
                            "tensors " + names_str(P.names), did_you_mean(name, P.names));
  for (const auto& name : P.names)
    if (!subset && !into.contains(name))
      throw CheckpointError(where_file + " holds an unexpected tensor '" + name + "'",
                            "only the tensors " + names_str(into.paths()), "'" + name + "'", did_you_mean(name, into.paths()));

  // ---- per tensor: the slice this rank needs and the byte runs that fill it, grouped by shard
  struct Read {
    size_t tensor;  // index in `into`
    const SavedPiece* piece;
    std::vector<Run> runs;
  };
  std::map<int, std::vector<Read>> by_shard;
  std::vector<Tensor> bufs(into.size());
  CheckpointInfo info;
  info.saved_tensors = P.names;
  for (size_t i = 0; i < into.size(); ++i) {
    const auto& [name, t] = into[i];
    const SavedTensor& st = P.tensors.at(name);
    if (st.dtype != t.dtype())
      throw CheckpointError("tensor '" + name + "' in " + where_file + " has another dtype",
                            std::string(dtype_name(t.dtype())) + " (the model's)",
                            std::string(dtype_name(st.dtype)) + " (saved)");
    const auto it = specs.find(name);
    const PartitionSpec spec = it == specs.end() ? PartitionSpec{} : it->second;
    const auto fit = flat.find(name);
    // This rank's block, and the run [w0, w1) of its flattened elements that `t` holds.
    const std::vector<int64_t> local = fit == flat.end() ? t.shape().vec() : fit->second.block.vec();
    const int64_t w0 = fit == flat.end() ? 0 : fit->second.begin, w1 = w0 + t.numel();
    const size_t n = local.size();
    std::vector<int64_t> global = local, lo(n, 0), hi = local;
    for (size_t d = 0; d < n && d < spec.size(); ++d) {
      if (spec[d].empty()) continue;
      const size_t ax = size_t(std::find(tgt.axes.begin(), tgt.axes.end(), spec[d]) - tgt.axes.begin());
      global[d] = local[d] * tgt.shape[ax];
      lo[d] = local[d] * tgt.coords[ax];
      hi[d] = lo[d] + local[d];
    }
    if (global != st.global) {
      if (same_layout) {
        std::vector<int64_t> saved_local = st.global;
        for (size_t d = 0; d < st.spec.size(); ++d)
          if (!st.spec[d].empty()) saved_local[d] /= P.layout.shape[size_t(P.layout.index(st.spec[d]))];
        const bool saved_flat = std::any_of(st.pieces.begin(), st.pieces.end(), [](const SavedPiece& p) { return p.flat; });
        throw CheckpointError("tensor '" + name + "' in " + where_file + " has another shape",
                              shape_str(local) + " (the model's)", shape_str(saved_local) + " (saved)",
                              saved_flat && fit == flat.end()
                                  ? "it was saved as flat parts (sharded optimizer state): pass this rank's FlatPart to load"
                                  : "the checkpoint is from another model or layout");
      }
      throw CheckpointError("tensor '" + name + "' in " + where_file + " has another global shape",
                            shape_str(global) + " (the model's: local " + shape_str(local) + ", spec " + spec_str(spec) +
                                " on " + tgt.describe() + ")",
                            shape_str(st.global) + " (saved)",
                            "the checkpoint is from another model, or the specs / mesh given to load do not describe "
                            "the tensors");
    }
    Tensor buf = empty(t.shape(), t.dtype());
    bufs[i] = buf;
    info.bytes_needed += buf.nbytes();
    if (buf.numel() == 0) continue;

    // One piece per distinct saved block and run: this rank's own shard when it holds it, else the lowest rank's.
    std::map<std::tuple<std::vector<int64_t>, std::vector<int64_t>, int64_t, int64_t>, const SavedPiece*> blocks;
    for (const auto& p : st.pieces) {
      auto [b, fresh] = blocks.try_emplace({p.offsets, p.shape, p.f0, p.f1}, &p);
      if (!fresh && p.shard == tgt.rank) b->second = &p;
    }
    // Each piece's byte runs into the destination: the runs of the boxes' intersection (relative to the
    // blocks' flattenings), cut to the piece's run and the destination's.
    const uint64_t isz = itemsize(t.dtype());
    struct Span {
      uint64_t dst, len;
      const SavedPiece* p;
    };
    std::vector<Span> spans;  // every destination byte range filled, to check that they tile it
    for (const auto& [key, p] : blocks) {
      if (p->f0 == p->f1) continue;
      std::vector<int64_t> ilo(n), ihi(n);
      bool empty_box = false;
      for (size_t d = 0; d < n; ++d) {
        ilo[d] = std::max(lo[d], p->offsets[d]);
        ihi[d] = std::min(hi[d], p->offsets[d] + p->shape[d]);
        empty_box = empty_box || ihi[d] <= ilo[d];
      }
      if (empty_box) continue;
      std::vector<Run> box;
      make_runs(p->offsets, p->shape, lo, local, ilo, ihi, isz, box);
      Read r{i, p, {}};
      const uint64_t ps = uint64_t(p->f0) * isz, pe = uint64_t(p->f1) * isz, ds = uint64_t(w0) * isz, de = uint64_t(w1) * isz;
      for (const Run& q : box) {
        const uint64_t u0 = std::max({uint64_t(0), ps > q.src ? ps - q.src : 0, ds > q.dst ? ds - q.dst : 0});
        const uint64_t u1 = std::min({q.len, pe > q.src ? pe - q.src : 0, de > q.dst ? de - q.dst : 0});
        if (u0 >= u1) continue;
        r.runs.push_back({q.src + u0 - ps, u1 - u0, q.dst + u0 - ds});
        spans.push_back({r.runs.back().dst, u1 - u0, p});
      }
      if (!r.runs.empty()) by_shard[p->shard].push_back(std::move(r));
    }
    std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.dst < b.dst; });
    uint64_t covered = 0;
    for (size_t k = 0; k < spans.size(); ++k) {
      if (k > 0 && spans[k].dst < spans[k - 1].dst + spans[k - 1].len)  // saved pieces overlap: the metadata lies
        throw CheckpointError("checkpoint file '" + mp + "' is malformed: saved pieces of tensor '" + name + "' overlap",
                              "disjoint blocks and runs", P.shards[size_t(spans[k - 1].p->shard)].file + " and " +
                                  P.shards[size_t(spans[k].p->shard)].file);
      covered += spans[k].len;
    }
    if (covered != buf.nbytes()) {
      std::vector<std::string> box;
      for (size_t d = 0; d < n; ++d) box.push_back(std::to_string(lo[d]) + ":" + std::to_string(hi[d]));
      const std::string run = fit == flat.end() ? "" : ", its elements [" + std::to_string(w0) + ", " + std::to_string(w1) + ")";
      throw CheckpointError("checkpoint '" + mp + "' does not hold all of tensor '" + name + "' that this rank needs",
                            "the global slice [" + join(box) + "]" + run + " (" + tgt.describe() + ")",
                            "shards holding " + std::to_string(covered / isz) + " of its " + std::to_string(buf.numel()) + " elements",
                            "the checkpoint was saved with a mesh that left blocks unsaved (saved layout " +
                                P.layout.describe() + ")");
    }
  }

  // ---- read and verify, shard by shard
  std::vector<unsigned char> buf;
  for (auto& [s, reads] : by_shard) {
    const SavedShard& sh = P.shards[size_t(s)];
    const std::string path = (cdir / sh.file).string();
    Fd f;
    open_shard(f, path, sh);
    ++info.files_read;
    // The header: its CRC, then its entries for the tensors read must agree with metadata.json.
    std::string header(size_t(sh.header_bytes), '\0');
    if (!pread_full(f.fd, header.data(), sh.header_bytes, 0, path))
      throw CheckpointError("checkpoint shard '" + path + "' is truncated", "a header of " + std::to_string(sh.header_bytes) + " bytes",
                            "end of file");
    info.bytes_read += sh.header_bytes;
    const uint32_t hcrc = crc_of(header.data(), header.size());
    if (hcrc != sh.header_crc)
      throw CheckpointError("checksum mismatch in the header of checkpoint shard '" + path + "' (corrupt file)",
                            "CRC-32 " + hex32(sh.header_crc) + " (metadata.json)", "CRC-32 " + hex32(hcrc),
                            "the file changed after it was saved; load an older step");
    uint64_t hl = 0;
    for (int b = 0; b < 8; ++b) hl |= uint64_t((unsigned char)header[size_t(b)]) << (8 * b);
    json hj;
    try {
      if (hl != sh.header_bytes - 8) throw std::runtime_error("header length " + std::to_string(hl));
      hj = json::parse(header.begin() + 8, header.end());
    } catch (const std::exception& e) {
      throw CheckpointError("checkpoint shard '" + path + "' has a header that does not parse", "a safetensors header", e.what());
    }
    for (auto& r : reads) {
      const std::string& name = into[r.tensor].first;
      const SavedPiece& p = *r.piece;
      const SavedTensor& st = P.tensors.at(name);
      const json shape = p.flat ? std::vector<int64_t>{p.f1 - p.f0} : p.shape;  // a flat run is stored 1-d
      const json want = {{"dtype", safetensors_dtype_name(st.dtype)}, {"shape", shape}, {"data_offsets", {p.begin, p.end}}};
      const bool agrees = hj.is_object() && hj.contains(name) && hj[name].is_object() &&
                          hj[name].value("dtype", json()) == want["dtype"] && hj[name].value("shape", json()) == want["shape"] &&
                          hj[name].value("data_offsets", json()) == want["data_offsets"];
      if (!agrees)
        throw CheckpointError("checkpoint shard '" + path + "' disagrees with metadata.json about tensor '" + name + "'",
                              want.dump(), hj.is_object() && hj.contains(name) ? hj[name].dump() : "no such tensor",
                              "the shard belongs to another checkpoint; load another step");

      // Whole checksum chunks around the runs, read in buffers of up to kMaxReadBuffer bytes.
      const uint64_t C = sh.chunk_bytes, nb = p.end - p.begin, base = sh.header_bytes + p.begin;
      std::vector<std::pair<uint64_t, uint64_t>> spans;  // chunk index ranges [c0, c1)
      for (const auto& run : r.runs) {
        const uint64_t c0 = run.src / C, c1 = (run.src + run.len - 1) / C + 1;
        if (!spans.empty() && c0 <= spans.back().second) spans.back().second = std::max(spans.back().second, c1);
        else spans.push_back({c0, c1});
      }
      const uint64_t per_read = std::max<uint64_t>(1, kMaxReadBuffer / C);
      auto* dst = static_cast<unsigned char*>(bufs[r.tensor].raw_data());
      size_t ri = 0;
      for (const auto& [s0, s1] : spans)
        for (uint64_t c = s0; c < s1; c += per_read) {
          const uint64_t ce = std::min(s1, c + per_read);
          const uint64_t bs = c * C, be = std::min(ce * C, nb);
          buf.resize(size_t(be - bs));
          if (!pread_full(f.fd, buf.data(), be - bs, base + bs, path))
            throw CheckpointError("checkpoint shard '" + path + "' is truncated", "tensor '" + name + "' data up to byte " +
                                  std::to_string(base + be), "end of file", "load an older step");
          info.data_bytes_read += be - bs;
          info.bytes_read += be - bs;
          for (uint64_t k = c; k < ce; ++k) {
            const uint64_t a = k * C, b = std::min(a + C, nb);
            uint32_t want_crc = 0;
            parse_hex32(p.chunk_crcs, size_t(k) * 8, want_crc);
            const uint32_t got = crc_of(buf.data() + (a - bs), size_t(b - a));
            if (got != want_crc)
              throw CheckpointError("checksum mismatch in checkpoint shard '" + path + "' (corrupt file): tensor '" + name +
                                        "', bytes [" + std::to_string(base + a) + ", " + std::to_string(base + b) + ")",
                                    "CRC-32 " + hex32(want_crc) + " (metadata.json)", "CRC-32 " + hex32(got),
                                    "the file changed after it was saved; load an older step");
          }
          while (ri < r.runs.size() && r.runs[ri].src + r.runs[ri].len <= bs) ++ri;
          for (size_t q = ri; q < r.runs.size() && r.runs[q].src < be; ++q) {
            const Run& run = r.runs[q];
            const uint64_t a = std::max(run.src, bs), b = std::min(run.src + run.len, be);
            if (a < b) std::memcpy(dst + run.dst + (a - run.src), buf.data() + (a - bs), size_t(b - a));
          }
        }
    }
  }

  // ---- every piece verified: copy into the caller's tensors (in place)
  for (size_t i = 0; i < into.size(); ++i)
    if (into[i].second.numel() > 0) copy_(into[i].second, bufs[i]);

  info.step = step;
  info.world_size = int(P.world);
  info.path = cdir.string();
  info.extra_json = P.meta.contains("extra") ? P.meta["extra"].dump() : "{}";
  return info;
}

void Checkpointer::verify(int64_t step) const {
  const fs::path cdir = checkpoint_dir(*this, step);
  const Parsed P = parse_checkpoint(cdir, step);
  for (const auto& sh : P.shards) {
    const std::string path = (cdir / sh.file).string();
    {
      Fd f;
      open_shard(f, path, sh);
    }
    const uint32_t got = detail::crc32_file(path);
    if (got != sh.file_crc)
      throw CheckpointError("checksum mismatch in checkpoint shard '" + path + "' (corrupt file)",
                            "CRC-32 " + hex32(sh.file_crc) + " (metadata.json)", "CRC-32 " + hex32(got),
                            "the file changed after it was saved; load an older step");
  }
}

}  // namespace titanax
