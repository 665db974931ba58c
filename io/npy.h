// NumPy's .npy files (format 1.0 / 2.0 / 3.0, numpy.lib.format, https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html):
//   bytes 0-5   "\x93NUMPY", then the major and minor version bytes
//   then        the header length (2 bytes little-endian in 1.0, 4 bytes in 2.0 / 3.0) and the header:
//               a Python dict literal {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
//               padded with spaces and a newline so the data starts at a multiple of 64 bytes
//   then        the elements, row-major (C order), in the dtype the descr names.
// For handing tensors to and from Python (numpy.load / numpy.save) and between tests and tools: inputs
// and outputs of an exported ONNX model (io/onnx.h), activations to inspect in a notebook.
// dtypes: f32 '<f4', f64 '<f8', f16 '<f2', i32 '<i4', i64 '<i8', u8 '|u1', bool '|b1'. NumPy has no
// bfloat16: cast to f32 first.
#pragma once

#include <memory>
#include <string>

#include "core/tensor.h"
#include "io/data.h"

namespace titanax {

/// Writes `t` (any layout and device: copied to contiguous host memory) to `path` as a version 1.0 .npy
/// file, C order. Overwrites `path`. Throws ValueError for an undefined tensor, DTypeError for bf16
/// (NumPy has no such dtype: save t.astype(DType::f32)), IOError when the file cannot be written.
void save_npy(const std::string& path, const Tensor& t);

/// Reads a .npy file (versions 1.0 to 3.0) into a fresh contiguous CPU tensor. Throws IOError when the
/// file cannot be opened, DataError naming the file and what is wrong for a bad magic string or version,
/// a header that is not the dict numpy writes, fortran_order True (save it with np.ascontiguousarray),
/// a dtype other than the ones above (big-endian ones included), or data shorter or longer than the
/// shape needs.
Tensor load_npy(const std::string& path);

/// The shape of the array a .npy file holds, from its header alone (its data is not read). Throws what
/// load_npy throws for a bad header.
Shape npy_shape(const std::string& path);

/// A classification dataset from .npy arrays (the config's data.dataset: npy): <dir>/<split>_x.npy, f32
/// [N, ...] (the model's inputs, already normalised), and <split>_y.npy, integer class ids [N] (any
/// integer dtype; read as i64). Returns a TensorDataset with "x" and "y". Throws what load_npy throws,
/// DataError naming the file for x not f32, y not integer or not [N], N that differ, or a negative
/// label.
std::shared_ptr<TensorDataset> load_npy_dataset(const std::string& dir, const std::string& split);

}  // namespace titanax
