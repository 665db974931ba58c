// Checkpoints: a directory per step, step_00001000/, holding
//   metadata.json   format version, step, world size, mesh, plan, each tensor's global shape, dtype and
//                   PartitionSpec, a CRC-32 per shard file, and caller-provided JSON ("extra")
//   rank_00000.safetensors, rank_00001.safetensors, ...   one per rank: the tensors that rank holds
// Written under step_XXXXXXXX.tmp/, each file flushed (fsync), then renamed into place, so a crash
// mid-save leaves the previous checkpoint intact. Loading verifies the checksum and every tensor, and
// throws CheckpointError naming the file and the check that failed.
//
// metadata.json (format_version 1):
//   {"format": "titanax-checkpoint", "format_version": 1, "step": 1000, "world_size": 2,
//    "mesh": <mesh_json>, "plan": <plan_json>,
//    "tensors": {"layers/0/w": {"dtype": "f32", "local_shape": [256, 784], "global_shape": [512, 784],
//                               "spec": ["model", ""]}, ...},
//    "shards": [{"file": "rank_00000.safetensors", "crc32": "89abcdef", "bytes": 123456,
//                "tensors": {"layers/0/w": {"dtype": "f32", "shape": [256, 784]}, ...}}, ...],
//    "extra": <extra_json>}
// "global_shape" multiplies each split dimension by its axis size, read from mesh_json when that is an
// object of axis sizes ({"data": 2, "model": 2}) or {"axes": [...], "shape": [...]}; it is omitted
// when a spec's axis size is unknown. "local_shape" is that of the first rank holding the tensor.
// The shard files are plain safetensors files (io/safetensors.h): Python's safetensors reads them.
//
// Test-only hook: when the environment variable TITANAX_TEST_KILL_DURING_SAVE=N is set, a rank saving
// its shard raises SIGKILL right after N bytes of that shard reached the disk (crash-safety tests).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "core/tree.h"
#include "parallel/communicator.h"
#include "parallel/mesh.h"

namespace titanax {

struct CheckpointInfo {
  int64_t step = 0;
  int world_size = 1;
  std::string path;        ///< the checkpoint directory
  std::string extra_json;  ///< the caller's JSON as saved (e.g. loader position, config)
};

class Checkpointer {
 public:
  /// `dir` holds the step_* directories; keep_last >= 1 checkpoints are kept (older ones deleted).
  /// `comm` is the group that saves together (the world); nullptr means a single rank.
  /// Throws ValueError for an empty dir or keep_last < 1. Touches no file.
  Checkpointer(std::string dir, int keep_last = 3, std::shared_ptr<Communicator> comm = nullptr);

  /// Collective: every rank writes its `tensors`; rank 0 writes metadata.json (with `extra_json`,
  /// `mesh_json` and `plan_json` verbatim, and `specs` by tensor name) and commits by renaming.
  /// Steps: rank 0 creates step_XXXXXXXX.tmp/ (8-digit zero-padded step); every rank writes and fsyncs
  /// rank_RRRRR.safetensors there (tensors in any layout / device: copied to host) and reports its
  /// CRC-32 with all_gather_string; rank 0 writes and fsyncs metadata.json, fsyncs the directory,
  /// renames it to step_XXXXXXXX/ (replacing an earlier save of the same step), fsyncs `dir`, then
  /// deletes all but the keep_last newest complete checkpoints (never the one just written) and stale
  /// step_*.tmp/ directories. Each phase ends in an all-gather of every rank's outcome, so a failure on
  /// one rank makes every rank throw (the failing rank its own error, the others a CheckpointError
  /// naming it) instead of hanging; the .tmp directory is removed then.
  /// Throws ValueError: step < 0, extra_json / mesh_json / plan_json not JSON, an undefined tensor, a
  /// spec naming a tensor no rank saves or longer than its tensor's rank; IOError: a write failed.
  void save(int64_t step, const ParamTree& tensors, const std::string& extra_json = "{}",
            const std::map<std::string, PartitionSpec>& specs = {}, const std::string& mesh_json = "{}",
            const std::string& plan_json = "{}");

  /// Steps of the complete checkpoints present, ascending: directories step_XXXXXXXX/ holding a
  /// metadata.json that parses (.tmp leftovers of interrupted saves are not listed). Not collective.
  std::vector<int64_t> steps() const;
  /// The newest complete checkpoint's step, if any.
  std::optional<int64_t> latest() const;

  /// Reads this rank's shard of checkpoint `step` into the tensors of `into` (same names, shapes and
  /// dtypes; values copied in place, so optimizer state and parameters keep their identity).
  /// Throws CheckpointError: missing directory or file, world size differs, checksum mismatch,
  /// a tensor missing / unexpected / of another shape or dtype (naming the tensor and the file),
  /// metadata.json unparsable or of an unknown format_version, a malformed shard (see
  /// read_safetensors). Everything is checked before the first tensor is written, so on error `into`
  /// is unchanged. Not collective (each rank reads its own shard, rank_<comm->rank()>).
  CheckpointInfo load(int64_t step, ParamTree& into) const;

  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
  int keep_last_;
  std::shared_ptr<Communicator> comm_;
};

}  // namespace titanax
