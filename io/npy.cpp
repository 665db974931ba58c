// .npy reader and writer (io/npy.h).
#include "io/npy.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <regex>

#include "core/error.h"

namespace titanax {
namespace {

constexpr char kMagic[] = "\x93NUMPY";

struct NpyType {
  DType dtype;
  const char* descr;
};
constexpr NpyType kTypes[] = {{DType::f32, "<f4"}, {DType::f64, "<f8"}, {DType::f16, "<f2"}, {DType::i32, "<i4"},
                              {DType::i64, "<i8"}, {DType::u8, "|u1"},  {DType::bool_, "|b1"}};

DType dtype_of(const std::string& descr, const std::string& path) {
  for (const NpyType& t : kTypes)
    if (descr == t.descr) return t.dtype;
  std::string known;
  for (const NpyType& t : kTypes) known += std::string(known.empty() ? "" : ", ") + t.descr;
  throw DataError(".npy file '" + path + "' has a dtype Titanax does not read", known, "'" + descr + "'",
                  "convert it in NumPy first: np.save(path, a.astype('<f4'))");
}

// A DataError about `path`'s contents.
DataError bad(const std::string& path, const std::string& what, const std::string& expected, const std::string& found) {
  return DataError(".npy file '" + path + "': " + what, expected, found, "write it with numpy.save");
}

struct Header {
  DType dtype;
  Shape shape;
};

// Opens `path` and reads its header: `f` is left at the first element.
Header read_header(std::ifstream& f, const std::string& path) {
  f.open(path, std::ios::binary);
  if (!f) throw IOError("cannot open '" + path + "'", "a readable .npy file", std::strerror(errno));
  char pre[8] = {};
  if (!f.read(pre, 8) || std::memcmp(pre, kMagic, 6) != 0)
    throw bad(path, "bad magic string (bytes 0-5)", "\\x93NUMPY", "something else (not a .npy file, or truncated)");
  const int major = pre[6];
  if (major < 1 || major > 3) throw bad(path, "unknown format version (byte 6)", "1, 2 or 3", std::to_string(major));
  unsigned char lb[4] = {};
  const int nlen = major == 1 ? 2 : 4;
  if (!f.read(reinterpret_cast<char*>(lb), nlen)) throw bad(path, "truncated header length", std::to_string(nlen) + " bytes", "fewer");
  const uint32_t len = uint32_t(lb[0]) | uint32_t(lb[1]) << 8 | uint32_t(lb[2]) << 16 | uint32_t(lb[3]) << 24;
  if (len > (1u << 20)) throw bad(path, "header length over 1 MiB", "a short header", std::to_string(len) + " bytes");
  std::string header(len, '\0');
  if (!f.read(header.data(), len)) throw bad(path, "truncated header", std::to_string(len) + " bytes", "fewer");

  static const std::regex descr_re(R"('descr'\s*:\s*'([^']*)')"), order_re(R"('fortran_order'\s*:\s*(True|False))"),
      shape_re(R"('shape'\s*:\s*\(([^)]*)\))"), dim_re(R"(\s*(\d+)\s*)");
  std::smatch d, o, s;
  if (!std::regex_search(header, d, descr_re) || !std::regex_search(header, o, order_re) ||
      !std::regex_search(header, s, shape_re))
    throw bad(path, "header is not numpy's dict", "{'descr': ..., 'fortran_order': ..., 'shape': (...), }", header);
  if (o[1] == "True")
    throw DataError(".npy file '" + path + "' is in Fortran order", "fortran_order False (C order)", "True",
                    "save np.ascontiguousarray(a) instead");
  const DType dtype = dtype_of(d[1], path);
  Shape shape;
  const std::string dims = s[1];
  size_t pos = 0;
  while (pos < dims.size()) {
    const size_t comma = dims.find(',', pos);
    const std::string item = dims.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    std::smatch m;
    if (std::regex_match(item, m, dim_re)) shape.push_back(std::stoll(m[1]));
    else if (item.find_first_not_of(" \t") != std::string::npos) throw bad(path, "bad shape in the header", "(d0, d1, ...)", "(" + dims + ")");
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return {dtype, shape};
}

}  // namespace

void save_npy(const std::string& path, const Tensor& t) {
  if (!t.defined()) throw ValueError("save_npy of an undefined tensor", "a tensor", "undefined", "path '" + path + "'");
  const char* descr = nullptr;
  for (const NpyType& k : kTypes)
    if (k.dtype == t.dtype()) descr = k.descr;
  if (!descr)
    throw DTypeError("save_npy: NumPy has no " + std::string(dtype_name(t.dtype())), "f32, f64, f16, i32, i64, u8 or bool",
                     std::string(dtype_name(t.dtype())), "save t.astype(DType::f32)");
  std::string shape;  // "(2, 3)", "(5,)" for rank 1, "()" for rank 0: Python's tuple syntax
  for (int i = 0; i < t.dim(); ++i) shape += (i ? ", " : "") + std::to_string(t.shape()[i]);
  if (t.dim() == 1) shape += ",";
  std::string header = "{'descr': '" + std::string(descr) + "', 'fortran_order': False, 'shape': (" + shape + "), }";
  // Pad with spaces so that magic (6) + version (2) + length (2) + header + '\n' is a multiple of 64.
  header.append(63 - (10 + header.size()) % 64, ' ');
  header += '\n';
  const Tensor host = t.to(Device::cpu()).contiguous();
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) throw IOError("cannot create '" + path + "'", "a writable path", std::strerror(errno));
  const uint16_t len = uint16_t(header.size());
  const char version[2] = {1, 0}, len_le[2] = {char(len & 0xff), char(len >> 8)};
  f.write(kMagic, 6).write(version, 2).write(len_le, 2).write(header.data(), std::streamsize(header.size()));
  f.write(static_cast<const char*>(host.raw_data()), std::streamsize(host.nbytes()));
  if (!f.flush()) throw IOError("cannot write '" + path + "'", "the whole file written", std::strerror(errno));
}

Tensor load_npy(const std::string& path) {
  std::ifstream f;
  const auto [dtype, shape] = read_header(f, path);
  Tensor t = empty(shape, dtype);
  if (!f.read(static_cast<char*>(t.raw_data()), std::streamsize(t.nbytes())))
    throw bad(path, "data shorter than its shape needs", std::to_string(t.nbytes()) + " bytes for " + shape.str(),
              std::to_string(f.gcount()) + " bytes");
  if (f.peek() != std::char_traits<char>::eof())
    throw bad(path, "data longer than its shape needs", std::to_string(t.nbytes()) + " bytes for " + shape.str(), "more bytes");
  if (dtype == DType::bool_) {
    const auto* b = static_cast<const uint8_t*>(t.raw_data());
    for (int64_t i = 0; i < t.numel(); ++i)
      if (b[i] > 1) throw bad(path, "a bool element other than 0 or 1", "bytes 0 or 1", std::to_string(b[i]) + " at element " + std::to_string(i));
  }
  return t;
}

Shape npy_shape(const std::string& path) {
  std::ifstream f;
  return read_header(f, path).shape;
}

std::shared_ptr<TensorDataset> load_npy_dataset(const std::string& dir, const std::string& split) {
  const std::string xp = dir + "/" + split + "_x.npy", yp = dir + "/" + split + "_y.npy";
  const Tensor x = load_npy(xp), y = load_npy(yp);
  if (x.dtype() != DType::f32 || x.dim() < 1)
    throw DataError("'" + xp + "' must hold the inputs as f32 [N, ...]", "'<f4' of rank >= 1",
                    std::string(dtype_name(x.dtype())) + x.shape().str(), "np.save(path, x.astype(np.float32))");
  if (y.dim() != 1 || !(y.dtype() == DType::i64 || y.dtype() == DType::i32 || y.dtype() == DType::u8))
    throw DataError("'" + yp + "' must hold one integer class id per example", "'<i8', '<i4' or '|u1' of shape [N]",
                    std::string(dtype_name(y.dtype())) + y.shape().str(), "np.save(path, y.astype(np.int64))");
  if (y.shape()[0] != x.shape()[0])
    throw DataError("'" + yp + "' and '" + xp + "' hold different numbers of examples", std::to_string(x.shape()[0]) + " labels",
                    std::to_string(y.shape()[0]));
  const Tensor labels = y.astype(DType::i64);
  const int64_t* lp = labels.data<int64_t>();
  for (int64_t i = 0; i < labels.numel(); ++i)
    if (lp[i] < 0)
      throw DataError("'" + yp + "' holds a negative class id", "ids >= 0", std::to_string(lp[i]) + " at example " + std::to_string(i));
  return std::make_shared<TensorDataset>(std::map<std::string, Tensor>{{"x", x}, {"y", labels}});
}

}  // namespace titanax
