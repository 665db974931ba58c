// Helpers shared by the io/ tests: scratch directories, raw file bytes, and the Python oracles.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

namespace io_test {

/// A fresh directory under the system temp dir, removed (recursively) when the object dies.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    static std::atomic<int> counter{0};
    path = std::filesystem::temp_directory_path() /
           ("titanax_io_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

inline void write_bytes(const std::string& path, const std::vector<unsigned char>& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
}

inline std::vector<unsigned char> read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<unsigned char>(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

inline void append_be32(std::vector<unsigned char>& v, uint32_t x) {
  v.insert(v.end(), {(unsigned char)(x >> 24), (unsigned char)(x >> 16), (unsigned char)(x >> 8), (unsigned char)x});
}

/// The whole content of a text file ("" when it cannot be read).
inline std::string read_text(const std::filesystem::path& p) {
  std::ifstream f(p);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

/// The interpreter of the tests' Python oracles: Debian's, with python3-numpy and python3-onnx
/// (scripts/install-deps.sh installs them).
inline const std::string kPython = "/usr/bin/python3";

/// Runs a shell command; returns its exit code, with its output (stdout and stderr) in `log`.
inline int shell(const std::string& cmd, const std::filesystem::path& log) {
  const int st = std::system((cmd + " >" + log.string() + " 2>&1").c_str());
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/// An IDX header: magic 0 0 type ndim, then the big-endian sizes.
inline std::vector<unsigned char> idx_header(unsigned char type, const std::vector<uint32_t>& dims) {
  std::vector<unsigned char> v{0, 0, type, (unsigned char)dims.size()};
  for (auto d : dims) append_be32(v, d);
  return v;
}

}  // namespace io_test
