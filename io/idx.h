// IDX files (the format of the MNIST distribution, LeCun et al.):
//   bytes 0-1  zero
//   byte  2    data type: 0x08 unsigned byte, 0x0C int32, 0x0D float32, 0x0E float64
//   byte  3    number of dimensions d (1..4 here)
//   then d big-endian uint32 sizes, then the elements, big-endian, row-major.
// Bytes after the last element are ignored (some distributions pad files).
#pragma once

#include <string>

#include "core/tensor.h"

namespace titanax {

/// Reads an IDX file, plain or gzip-compressed (detected from its content, not its name). When `path`
/// does not exist but `path + ".gz"` does, that file is read instead.
/// Returns a contiguous CPU tensor: u8 (0x08), i32 (0x0C), f32 (0x0D) or f64 (0x0E), shape = the sizes.
/// Throws IOError when neither file can be opened, DataError naming the file, the byte offset and the
/// field, with expected vs found, for a malformed file: non-zero magic bytes, an unsupported data
/// type, 0 or more than 4 dimensions, fewer data bytes than the sizes require (truncated).
Tensor read_idx(const std::string& path);

/// Writes `t` (any layout, CPU or device) as an IDX file: u8, i32, f32 or f64 tensors of rank 1..4.
/// A path ending in ".gz" is written gzip-compressed, any other path plain. Not atomic: callers that
/// need it write to a temporary name and rename. Throws DTypeError / ShapeError for an unsupported
/// dtype / rank, IOError when the file cannot be written.
void write_idx(const std::string& path, const Tensor& t);

}  // namespace titanax
