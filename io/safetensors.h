// safetensors files (the Hugging Face format, https://github.com/huggingface/safetensors):
//   bytes 0-7   N, the header length, unsigned 64-bit little-endian
//   bytes 8..   the header: N bytes of UTF-8 JSON (padded with spaces to a multiple of 8 by this writer)
//               {"__metadata__": {"key": "value", ...},
//                "name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...}
//   then        the data section: every tensor's bytes, row-major, little-endian, at
//               [begin, end) relative to the start of the section.
// dtypes: F32, F64, F16, BF16, I32, I64, U8, BOOL (one byte, 0 or 1).
// Files written here load with Python's safetensors (safe_open / load_file), and files it writes in
// these dtypes load here.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/tree.h"

namespace titanax {

struct SafetensorsFile {
  ParamTree tensors;                            ///< in data-section order (= write order for our files)
  std::map<std::string, std::string> metadata;  ///< the "__metadata__" entries (string values)
};

/// Writes `tensors` (any layout and device; copied to contiguous host memory) to `path`, contiguous in
/// ParamTree order, with `metadata` as "__metadata__" (omitted when empty). Overwrites `path`; not atomic
/// (write to a temporary name and rename for that). Returns the CRC-32 (zlib crc32) of the whole file.
/// Throws ValueError for a tensor named "__metadata__" or an undefined tensor, IOError when the file
/// cannot be written.
uint32_t write_safetensors(const std::string& path, const ParamTree& tensors,
                           const std::map<std::string, std::string>& metadata = {});

/// Reads a safetensors file into fresh contiguous CPU tensors. Validates everything before trusting it
/// and throws CheckpointError naming the file and the failed check: file shorter than 8 bytes, header
/// length beyond the file size (or over 100 MB), header not a JSON object, "__metadata__" not a map of
/// strings, an entry without a valid dtype / shape / data_offsets, an unsupported dtype, a byte range
/// whose size differs from numel * itemsize, ranges that overlap, leave gaps, run past the end of the
/// data or stop short of it, BOOL bytes other than 0 / 1. IOError when the file cannot be opened.
SafetensorsFile read_safetensors(const std::string& path);

/// "F32", "BF16", ... for a DType.
std::string safetensors_dtype_name(DType t);

namespace detail {
/// Internal (used by Checkpointer): write_safetensors with an fsync of the file before it returns, and
/// a crash-test hook: when kill_after_bytes >= 0 the process raises SIGKILL right after the first
/// kill_after_bytes bytes of the file reached the disk.
uint32_t write_safetensors(const std::string& path, const ParamTree& tensors,
                           const std::map<std::string, std::string>& metadata, bool fsync,
                           int64_t kill_after_bytes);
/// What a chunked write reports (Checkpointer records it in metadata.json).
struct WriteReport {
  uint32_t file_crc = 0;      ///< CRC-32 of the whole file
  uint64_t file_bytes = 0;    ///< its size
  uint64_t header_bytes = 0;  ///< 8 + header length: the offset of the data section
  uint32_t header_crc = 0;    ///< CRC-32 of those first header_bytes bytes
  struct Entry {
    std::string name;
    uint64_t begin = 0, end = 0;       ///< byte range relative to the data section (as data_offsets)
    std::vector<uint32_t> chunk_crcs;  ///< CRC-32 of each chunk_bytes-long piece of [begin, end) (last one shorter)
  };
  std::vector<Entry> tensors;  ///< in file order
};
/// write_safetensors (fsync and crash-test hook as above) that also reports a CRC-32 per
/// `chunk_bytes` (>= 1) chunk of every tensor's data, computed in the same pass as the file's.
WriteReport write_safetensors_chunked(const std::string& path, const ParamTree& tensors,
                                      const std::map<std::string, std::string>& metadata, bool fsync,
                                      int64_t kill_after_bytes, uint64_t chunk_bytes);
/// CRC-32 (zlib) of a whole file; IOError when it cannot be read.
uint32_t crc32_file(const std::string& path);
}  // namespace detail

}  // namespace titanax
